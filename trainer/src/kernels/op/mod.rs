//! Our kernels as burn operations with their own backward passes, through
//! burn's backend-extension mechanism: each op takes and returns ordinary
//! `Tensor`s and works under autodiff like any built-in operation, one
//! module per op ([`conv`], [`bn_relu`], [`maxpool`], [`unpool`]).
//!
//! On the CPU (`flex`) backend the forward and the gradients run our
//! kernels; tensors of other dtypes fall back to burn's own operations.

mod bn_relu;
mod conv;
mod maxpool;
mod unpool;

use std::borrow::Cow;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Flex, TensorMetadata};
use burn::tensor::TensorData;

pub use bn_relu::{BnReluBackend, BnReluOutput, BnReluTensors, bn_relu_train};
pub use conv::{Conv3x3Backend, conv3x3};
pub use maxpool::{MaxPoolBackend, MaxPoolOutput, max_pool2x2_with_indices};
pub use unpool::{UnpoolBackend, max_unpool2d};

type FlexTensor = FloatTensor<Flex>;

/// The autodiff tensor type over the CPU backend (burn keeps the struct's own
/// path private; its backend trait names it).
type AutodiffFlexTensor<C> = FloatTensor<Autodiff<Flex, C>>;

/// The indices of an int tensor as i64 (burn's default int dtype; i32 is widened).
fn index_values(t: &FlexTensor) -> Cow<'_, [i64]> {
    match t.as_slice::<i64>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(
            t.clone()
                .into_data()
                .convert::<i64>()
                .try_into_vec::<i64>()
                .expect("converted to i64 above"),
        ),
    }
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let shape = t.shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

/// The values of an f32 tensor, borrowed when it is contiguous (the usual
/// case: no copy), copied otherwise.
fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(
            t.clone()
                .into_data()
                .try_into_vec::<f32>()
                .expect("f32 checked by the caller"),
        ),
    }
}

fn from_values(values: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn vec1(values: Vec<f32>) -> FlexTensor {
    let n = values.len();
    FlexTensor::from_data(TensorData::new(values, [n]))
}

#[cfg(test)]
mod tests {
    use super::conv::padding_one;
    use super::*;
    use crate::kernels::testutil::pseudo_random;
    use burn::tensor::Device;
    use burn::tensor::module::conv2d;
    use burn::tensor::{Int, Tensor};

    fn tensor(len: usize, shape: [usize; 4], seed: u64, device: &Device) -> Tensor<4> {
        Tensor::from_data(TensorData::new(pseudo_random(len, seed), shape), device)
    }

    fn vals(t: Tensor<4>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    }

    fn close(a: Vec<f32>, b: Vec<f32>) {
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-4, "max abs difference {worst}");
    }

    /// Forward values and both gradients equal burn's own convolution under autodiff.
    #[test]
    fn matches_burn_conv2d_forward_and_backward() {
        let device = Device::flex().autodiff();
        let x = tensor(2 * 3 * 5 * 6, [2, 3, 5, 6], 1, &device).require_grad();
        let w = tensor(4 * 3 * 9, [4, 3, 3, 3], 2, &device).require_grad();
        let r = tensor(2 * 4 * 5 * 6, [2, 4, 5, 6], 3, &device);

        let ours = conv3x3(x.clone(), w.clone());
        let theirs = conv2d(x.clone(), w.clone(), None, padding_one());
        close(vals(ours.clone()), vals(theirs.clone()));

        let g_ours = ours.mul(r.clone()).sum().backward();
        let g_theirs = theirs.mul(r).sum().backward();
        close(
            vals(x.grad(&g_ours).unwrap()),
            vals(x.grad(&g_theirs).unwrap()),
        );
        close(
            vals(w.grad(&g_ours).unwrap()),
            vals(w.grad(&g_theirs).unwrap()),
        );
    }

    /// The fused op equals burn's training batch norm followed by ReLU: output,
    /// batch statistics and the gradients of input, γ and β.
    #[test]
    fn bn_relu_matches_burn_batch_norm_then_relu() {
        use burn::tensor::activation::relu;
        use burn::tensor::module::batch_norm_train;
        let device = Device::flex().autodiff();
        let x = tensor(2 * 3 * 4 * 5, [2, 3, 4, 5], 7, &device).require_grad();
        let gamma = Tensor::<1>::from_data(TensorData::new(vec![0.5f32, 1.5, -1.0], [3]), &device)
            .require_grad();
        let beta = Tensor::<1>::from_data(TensorData::new(vec![0.1f32, -0.1, 0.2], [3]), &device)
            .require_grad();
        let r = tensor(2 * 3 * 4 * 5, [2, 3, 4, 5], 8, &device);

        let ours = bn_relu_train(x.clone(), gamma.clone(), beta.clone(), 1e-5);
        let theirs = batch_norm_train(x.clone(), gamma.clone(), beta.clone(), 1e-5);
        let theirs_out = relu(theirs.output);
        close(vals(ours.output.clone()), vals(theirs_out.clone()));
        let v1 = |t: Tensor<1>| {
            t.into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap()
        };
        close(v1(ours.mean.clone()), v1(theirs.mean));
        close(v1(ours.var.clone()), v1(theirs.variance));

        let g_ours = ours.output.mul(r.clone()).sum().backward();
        let g_theirs = theirs_out.mul(r).sum().backward();
        close(
            vals(x.grad(&g_ours).unwrap()),
            vals(x.grad(&g_theirs).unwrap()),
        );
        close(
            v1(gamma.grad(&g_ours).unwrap()),
            v1(gamma.grad(&g_theirs).unwrap()),
        );
        close(
            v1(beta.grad(&g_ours).unwrap()),
            v1(beta.grad(&g_theirs).unwrap()),
        );
    }

    /// Our unpooling equals burn's `zeros + scatter`, and its gradient burn's.
    #[test]
    fn unpool_matches_burn_scatter_forward_and_backward() {
        use crate::model::pool::max_pool2x2;
        use burn::tensor::IndexingUpdateOp;
        let device = Device::flex().autodiff();
        let (_, indices) = max_pool2x2(tensor(2 * 3 * 6 * 8, [2, 3, 6, 8], 9, &device));
        let v = tensor(2 * 3 * 3 * 4, [2, 3, 3, 4], 10, &device).require_grad();
        let r = tensor(2 * 3 * 6 * 8, [2, 3, 6, 8], 11, &device);

        let ours = max_unpool2d(v.clone(), indices.clone(), [6, 8]);
        let theirs = Tensor::<3>::zeros([2, 3, 48], &device)
            .scatter(
                2,
                indices.reshape([2, 3, 12]),
                v.clone().reshape([2, 3, 12]),
                IndexingUpdateOp::Add,
            )
            .reshape([2, 3, 6, 8]);
        close(vals(ours.clone()), vals(theirs.clone()));
        let g_ours = ours.mul(r.clone()).sum().backward();
        let g_theirs = theirs.mul(r).sum().backward();
        close(
            vals(v.grad(&g_ours).unwrap()),
            vals(v.grad(&g_theirs).unwrap()),
        );
    }

    /// Our pooling equals burn's: values, indices and the input gradient.
    #[test]
    fn max_pool_matches_burn_forward_and_backward() {
        use burn::tensor::module::max_pool2d_with_indices;
        use burn::tensor::ops::MaxPoolOptions;
        let device = Device::flex().autodiff();
        let x = tensor(2 * 3 * 6 * 8, [2, 3, 6, 8], 12, &device).require_grad();
        let r = tensor(2 * 3 * 3 * 4, [2, 3, 3, 4], 13, &device);
        let (ours, ours_idx) = max_pool2x2_with_indices(x.clone());
        let (theirs, theirs_idx) =
            max_pool2d_with_indices(x.clone(), MaxPoolOptions::new([2, 2]).with_stride([2, 2]));
        close(vals(ours.clone()), vals(theirs.clone()));
        let ints = |t: Tensor<4, Int>| {
            t.into_data()
                .convert::<i64>()
                .try_into_vec::<i64>()
                .unwrap()
        };
        assert_eq!(ints(ours_idx), ints(theirs_idx));
        let g_ours = ours.mul(r.clone()).sum().backward();
        let g_theirs = theirs.mul(r).sum().backward();
        close(
            vals(x.grad(&g_ours).unwrap()),
            vals(x.grad(&g_theirs).unwrap()),
        );
    }

    #[test]
    fn runs_without_autodiff_too() {
        let device = Device::flex();
        let x = tensor(3 * 2 * 4 * 4, [3, 2, 4, 4], 4, &device);
        let w = tensor(5 * 2 * 9, [5, 2, 3, 3], 5, &device);
        close(
            vals(conv3x3(x.clone(), w.clone())),
            vals(conv2d(x, w, None, padding_one())),
        );
    }
}
