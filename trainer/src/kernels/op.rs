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
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor, TensorData};

use super::conv3x3::Conv3x3;

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

fn values(t: FlexTensor) -> Vec<f32> {
    t.into_data()
        .try_into_vec::<f32>()
        .expect("f32 checked by the caller")
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
            g.forward(&values(x), &values(weight)),
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
        let dy = values(dy);
        if let Some(node) = node_x {
            let dx = geo.backward_input(&dy, &values(weight.clone()));
            grads.register::<Flex>(node.id, from_values(dx, [geo.n, geo.cin, geo.h, geo.w]));
        }
        if let Some(node) = node_weight {
            let dw = geo.backward_weight(&values(x), &dy);
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
    use burn::tensor::Device;
    use burn::tensor::module::conv2d;

    fn tensor(len: usize, shape: [usize; 4], seed: u32, device: &Device) -> Tensor<4> {
        let mut s = seed.wrapping_mul(747796405).wrapping_add(1);
        let v: Vec<f32> = (0..len)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        Tensor::from_data(TensorData::new(v, shape), device)
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
