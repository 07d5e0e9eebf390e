//! Max-unpooling as a burn operation.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Int, Tensor};

use crate::kernels::unpool::Unpool;

use super::{AutodiffFlexTensor, FlexTensor, dims4, from_values, index_values, values};

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
