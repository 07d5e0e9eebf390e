//! Our 3x3 convolution as a burn operation with its own backward pass, through
//! burn's backend-extension mechanism: [`conv3x3`] takes and returns ordinary
//! `Tensor`s and works under autodiff like any built-in operation.
//!
//! On the CPU (`flex`) backend the forward and both gradients run our kernels
//! ([`super::conv3x3::Conv3x3`]); tensors of other dtypes fall back to burn's
//! own convolution.

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::ModuleOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{
    Autodiff, Backend, Dispatch, ExtensionType, Flex, TensorMetadata, backend_extension,
};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Int, Tensor, TensorData};

use std::borrow::Cow;

use super::bn_relu::BnRelu;
use super::conv3x3::Conv3x3;
use super::maxpool::MaxPool2x2;
use super::unpool::Unpool;

/// Backends that can run [`conv3x3`].
#[backend_extension(Flex, Autodiff)]
pub trait Conv3x3Backend: Backend {
    /// 3x3 convolution, stride 1, zero padding 1, no bias.
    fn conv3x3(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
}

fn padding_one() -> ConvOptions<2> {
    ConvOptions::new([1, 1], [1, 1], [1, 1], 1)
}

type FlexTensor = FloatTensor<Flex>;

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

fn geometry(x: &FlexTensor, weight: &FlexTensor) -> Conv3x3 {
    let [n, cin, h, w] = dims4(x);
    let [cout, wcin, kh, kw] = dims4(weight);
    assert_eq!(
        (wcin, kh, kw),
        (cin, 3, 3),
        "conv3x3 weight must be [cout, cin, 3, 3]"
    );
    Conv3x3 { n, cin, cout, h, w }
}

fn ours(x: &FlexTensor, weight: &FlexTensor) -> bool {
    x.dtype() == DType::F32 && weight.dtype() == DType::F32 && dims4(x)[3] >= 2
}

impl Conv3x3Backend for Flex {
    fn conv3x3(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
        if !ours(&x, &weight) {
            return Flex::conv2d(x, weight, None, padding_one());
        }
        let g = geometry(&x, &weight);
        from_values(
            g.forward(&values(&x), &values(&weight)),
            [g.n, g.cout, g.h, g.w],
        )
    }
}

#[derive(Debug)]
struct Conv3x3Grad;

impl Backward<Flex, 2> for Conv3x3Grad {
    type State = (NodeId, NodeId);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_weight] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (x_state, weight_state) = ops.state;
        let x = checkpointer.retrieve_node_output::<FlexTensor>(x_state);
        let weight = checkpointer.retrieve_node_output::<FlexTensor>(weight_state);
        if !ours(&x, &weight) {
            if let Some(node) = node_x {
                let g =
                    Flex::conv2d_x_backward(x.clone(), weight.clone(), dy.clone(), padding_one());
                grads.register::<Flex>(node.id, g);
            }
            if let Some(node) = node_weight {
                let g = Flex::conv2d_weight_backward(x, weight, dy, padding_one());
                grads.register::<Flex>(node.id, g);
            }
            return;
        }
        let geo = geometry(&x, &weight);
        let dy = values(&dy);
        if let Some(node) = node_x {
            let dx = geo.backward_input(&dy, &values(&weight));
            grads.register::<Flex>(node.id, from_values(dx, [geo.n, geo.cin, geo.h, geo.w]));
        }
        if let Some(node) = node_weight {
            let dw = geo.backward_weight(&values(&x), &dy);
            grads.register::<Flex>(node.id, from_values(dw, [geo.cout, geo.cin, 3, 3]));
        }
    }
}

/// The autodiff tensor type over the CPU backend (burn keeps the struct's own
/// path private; its backend trait names it).
type AutodiffFlexTensor<C> = FloatTensor<Autodiff<Flex, C>>;

impl<C: CheckpointStrategy> Conv3x3Backend for Autodiff<Flex, C> {
    fn conv3x3(x: AutodiffFlexTensor<C>, weight: AutodiffFlexTensor<C>) -> AutodiffFlexTensor<C> {
        match Conv3x3Grad
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let weight_state = prep.checkpoint(&weight);
                let out = Flex::conv3x3(x.into_primitive(), weight.into_primitive());
                prep.finish((x_state, weight_state), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::conv3x3(x.into_primitive(), weight.into_primitive()))
            }
        }
    }
}

/// Output of [`bn_relu_train`]: the activation and the batch statistics.
#[derive(ExtensionType)]
pub struct BnReluOutput<B: Backend> {
    /// `max(0, γ·x̂ + β)`.
    pub output: FloatTensor<B>,
    /// Batch mean per channel (no gradient).
    pub mean: FloatTensor<B>,
    /// Biased batch variance per channel (no gradient).
    pub var: FloatTensor<B>,
}

/// Backends that can run [`bn_relu_train`].
#[backend_extension(Flex, Autodiff)]
pub trait BnReluBackend: Backend {
    /// Training-mode batch norm (batch statistics) followed by ReLU.
    fn bn_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> BnReluOutput<Self>;
}

fn vec1(values: Vec<f32>) -> FlexTensor {
    let n = values.len();
    FlexTensor::from_data(TensorData::new(values, [n]))
}

fn bn_geometry(x: &FlexTensor, eps: f64) -> BnRelu {
    let [n, c, h, w] = dims4(x);
    BnRelu {
        n,
        c,
        hw: h * w,
        eps,
    }
}

impl BnReluBackend for Flex {
    fn bn_relu_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f64,
    ) -> BnReluOutput<Self> {
        assert_eq!(x.dtype(), DType::F32, "bn_relu_train runs on f32 tensors");
        let geo = bn_geometry(&x, eps);
        let shape = dims4(&x);
        let f = geo.forward(&values(&x), &values(&gamma), &values(&beta));
        BnReluOutput {
            output: from_values(f.output, shape),
            mean: vec1(f.mean),
            var: vec1(f.var),
        }
    }
}

#[derive(Debug)]
struct BnReluGrad;

impl Backward<Flex, 3> for BnReluGrad {
    /// Input, γ and β (checkpointed), the batch statistics and eps.
    type State = (NodeId, NodeId, NodeId, Vec<f32>, Vec<f32>, f64);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (x_state, gamma_state, beta_state, mean, var, eps) = ops.state;
        let x = checkpointer.retrieve_node_output::<FlexTensor>(x_state);
        let gamma = checkpointer.retrieve_node_output::<FlexTensor>(gamma_state);
        let beta = checkpointer.retrieve_node_output::<FlexTensor>(beta_state);
        let geo = bn_geometry(&x, eps);
        let shape = dims4(&x);
        let g = geo.backward(
            &values(&x),
            (&values(&gamma), &values(&beta)),
            (&mean, &var),
            &values(&dy),
        );
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, from_values(g.dx, shape));
        }
        if let Some(node) = node_gamma {
            grads.register::<Flex>(node.id, vec1(g.dgamma));
        }
        if let Some(node) = node_beta {
            grads.register::<Flex>(node.id, vec1(g.dbeta));
        }
    }
}

impl<C: CheckpointStrategy> BnReluBackend for Autodiff<Flex, C> {
    fn bn_relu_train(
        x: AutodiffFlexTensor<C>,
        gamma: AutodiffFlexTensor<C>,
        beta: AutodiffFlexTensor<C>,
        eps: f64,
    ) -> BnReluOutput<Self> {
        let prep = BnReluGrad
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let (output, mean, var) = match prep {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let gamma_state = prep.checkpoint(&gamma);
                let beta_state = prep.checkpoint(&beta);
                let f = Flex::bn_relu_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    eps,
                );
                let (mean, var) = (values(&f.mean).into_owned(), values(&f.var).into_owned());
                let state = (x_state, gamma_state, beta_state, mean, var, eps);
                (prep.finish(state, f.output), f.mean, f.var)
            }
            OpsKind::UnTracked(prep) => {
                let f = Flex::bn_relu_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    eps,
                );
                (prep.finish(f.output), f.mean, f.var)
            }
        };
        BnReluOutput {
            output,
            mean: AutodiffFlexTensor::<C>::new(mean),
            var: AutodiffFlexTensor::<C>::new(var),
        }
    }
}

/// What [`bn_relu_train`] returns as tensors.
pub struct BnReluTensors {
    /// The activation `[n, c, h, w]`.
    pub output: Tensor<4>,
    /// Batch mean `[c]`.
    pub mean: Tensor<1>,
    /// Biased batch variance `[c]`.
    pub var: Tensor<1>,
}

/// Training-mode batch norm followed by ReLU with our fused CPU kernels.
///
/// # Shapes
/// - `x` `[n, c, h, w]`, `gamma`, `beta` `[c]`
pub fn bn_relu_train(x: Tensor<4>, gamma: Tensor<1>, beta: Tensor<1>, eps: f64) -> BnReluTensors {
    let out = <Dispatch as BnReluBackend>::bn_relu_train(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    );
    BnReluTensors {
        output: Tensor::from_dispatch(out.output),
        mean: Tensor::from_dispatch(out.mean),
        var: Tensor::from_dispatch(out.var),
    }
}

/// Output of [`max_pool2x2_with_indices`].
#[derive(ExtensionType)]
pub struct MaxPoolOutput<B: Backend> {
    /// Pooled values `[n, c, h/2, w/2]`.
    pub pooled: FloatTensor<B>,
    /// Flat per-plane argmax positions, same shape.
    pub indices: IntTensor<B>,
}

/// Backends that can run [`max_pool2x2_with_indices`].
#[backend_extension(Flex, Autodiff)]
pub trait MaxPoolBackend: Backend {
    /// 2x2, stride-2 max-pooling with argmax indices.
    fn max_pool2x2_with_indices(x: FloatTensor<Self>) -> MaxPoolOutput<Self>;
}

fn pool_geometry(x: &FlexTensor) -> MaxPool2x2 {
    let [n, c, h, w] = dims4(x);
    MaxPool2x2 {
        planes: n * c,
        h,
        w,
    }
}

impl MaxPoolBackend for Flex {
    fn max_pool2x2_with_indices(x: FlexTensor) -> MaxPoolOutput<Self> {
        assert_eq!(x.dtype(), DType::F32, "max pooling runs on f32 tensors");
        let [n, c, _, _] = dims4(&x);
        let geo = pool_geometry(&x);
        let (pooled, indices) = geo.forward(&values(&x));
        let shape = [n, c, geo.out_h(), geo.out_w()];
        MaxPoolOutput {
            pooled: from_values(pooled, shape),
            indices: FlexTensor::from_data(TensorData::new(indices, shape)),
        }
    }
}

#[derive(Debug)]
struct MaxPoolGrad;

impl Backward<Flex, 1> for MaxPoolGrad {
    /// The indices and the input shape.
    type State = (FlexTensor, [usize; 4]);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dpooled = grads.consume::<Flex>(&ops.node);
        let (indices, shape) = ops.state;
        if let Some(node) = node_x {
            let [n, c, h, w] = shape;
            let geo = MaxPool2x2 {
                planes: n * c,
                h,
                w,
            };
            let dx = geo.backward(&values(&dpooled), &index_values(&indices));
            grads.register::<Flex>(node.id, from_values(dx, shape));
        }
    }
}

impl<C: CheckpointStrategy> MaxPoolBackend for Autodiff<Flex, C> {
    fn max_pool2x2_with_indices(x: AutodiffFlexTensor<C>) -> MaxPoolOutput<Self> {
        let shape = dims4(x.primitive());
        match MaxPoolGrad
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = Flex::max_pool2x2_with_indices(x.into_primitive());
                let pooled = prep.finish((out.indices.clone(), shape), out.pooled);
                MaxPoolOutput {
                    pooled,
                    indices: out.indices,
                }
            }
            OpsKind::UnTracked(prep) => {
                let out = Flex::max_pool2x2_with_indices(x.into_primitive());
                MaxPoolOutput {
                    pooled: prep.finish(out.pooled),
                    indices: out.indices,
                }
            }
        }
    }
}

/// 2x2, stride-2 max-pooling with argmax indices, with our CPU kernel.
///
/// # Shapes
/// - `x` `[n, c, h, w]` → pooled and indices `[n, c, h/2, w/2]`
pub fn max_pool2x2_with_indices(x: Tensor<4>) -> (Tensor<4>, Tensor<4, Int>) {
    let out = <Dispatch as MaxPoolBackend>::max_pool2x2_with_indices(x.into_dispatch());
    (
        Tensor::from_dispatch(out.pooled),
        Tensor::from_dispatch(out.indices),
    )
}

/// Backends that can run [`max_unpool2d`].
#[backend_extension(Flex, Autodiff)]
pub trait UnpoolBackend: Backend {
    /// Max-unpooling of `x` `[n, c, h, w]` with flat per-plane `indices` into
    /// `[n, c, out_h, out_w]`.
    fn max_unpool2d(
        x: FloatTensor<Self>,
        indices: IntTensor<Self>,
        out_h: usize,
        out_w: usize,
    ) -> FloatTensor<Self>;
}

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

fn unpool_geometry(x: &FlexTensor, out_h: usize, out_w: usize) -> Unpool {
    let [n, c, h, w] = dims4(x);
    Unpool {
        planes: n * c,
        inner: h * w,
        outer: out_h * out_w,
    }
}

impl UnpoolBackend for Flex {
    fn max_unpool2d(x: FlexTensor, indices: FlexTensor, out_h: usize, out_w: usize) -> FlexTensor {
        assert_eq!(x.dtype(), DType::F32, "max_unpool2d runs on f32 tensors");
        let [n, c, _, _] = dims4(&x);
        let out = unpool_geometry(&x, out_h, out_w).forward(&values(&x), &index_values(&indices));
        from_values(out, [n, c, out_h, out_w])
    }
}

#[derive(Debug)]
struct UnpoolGrad;

impl Backward<Flex, 1> for UnpoolGrad {
    /// The indices and the input shape.
    type State = (FlexTensor, [usize; 4]);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dout = grads.consume::<Flex>(&ops.node);
        let (indices, shape) = ops.state;
        if let Some(node) = node_x {
            let [n, c, h, w] = shape;
            let [_, _, out_h, out_w] = dims4(&dout);
            let geo = Unpool {
                planes: n * c,
                inner: h * w,
                outer: out_h * out_w,
            };
            let dx = geo.backward(&values(&dout), &index_values(&indices));
            grads.register::<Flex>(node.id, from_values(dx, shape));
        }
    }
}

impl<C: CheckpointStrategy> UnpoolBackend for Autodiff<Flex, C> {
    fn max_unpool2d(
        x: AutodiffFlexTensor<C>,
        indices: FlexTensor,
        out_h: usize,
        out_w: usize,
    ) -> AutodiffFlexTensor<C> {
        let shape = dims4(x.primitive());
        match UnpoolGrad
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = Flex::max_unpool2d(x.into_primitive(), indices.clone(), out_h, out_w);
                prep.finish((indices, shape), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::max_unpool2d(
                x.into_primitive(),
                indices,
                out_h,
                out_w,
            )),
        }
    }
}

/// Max-unpooling with our CPU kernel: every value of `x` goes to the flat
/// position (within its plane) that `indices` names; everything else is zero.
///
/// # Shapes
/// - `x`, `indices` `[n, c, h, w]` → `[n, c, out_h, out_w]`
pub fn max_unpool2d(
    x: Tensor<4>,
    indices: Tensor<4, Int>,
    [out_h, out_w]: [usize; 2],
) -> Tensor<4> {
    let out = <Dispatch as UnpoolBackend>::max_unpool2d(
        x.into_dispatch(),
        indices.into_dispatch(),
        out_h,
        out_w,
    );
    Tensor::from_dispatch(out)
}

/// 3x3 convolution (stride 1, zero padding 1, no bias) with our CPU kernels.
///
/// # Shapes
/// - `x` `[n, cin, h, w]`, `weight` `[cout, cin, 3, 3]` → `[n, cout, h, w]`
pub fn conv3x3(x: Tensor<4>, weight: Tensor<4>) -> Tensor<4> {
    let out = <Dispatch as Conv3x3Backend>::conv3x3(x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::pseudo_random;
    use burn::tensor::Device;
    use burn::tensor::module::conv2d;

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
