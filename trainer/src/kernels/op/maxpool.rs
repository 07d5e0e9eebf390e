//! 2x2 max-pooling with argmax indices as a burn operation.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Dispatch, ExtensionType, Flex, backend_extension};
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::kernels::maxpool::MaxPool2x2;

use super::{AutodiffFlexTensor, FlexTensor, dims4, from_values, index_values, values};

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
