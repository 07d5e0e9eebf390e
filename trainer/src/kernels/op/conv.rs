//! 3x3 convolution as a burn operation.

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::ModuleOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor};

use crate::kernels::conv3x3::Conv3x3;

use super::{AutodiffFlexTensor, FlexTensor, dims4, from_values, values};

/// Backends that can run [`conv3x3`].
#[backend_extension(Flex, Autodiff)]
pub trait Conv3x3Backend: Backend {
    /// 3x3 convolution, stride 1, zero padding 1, no bias.
    fn conv3x3(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
}

pub(super) fn padding_one() -> ConvOptions<2> {
    ConvOptions::new([1, 1], [1, 1], [1, 1], 1)
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
