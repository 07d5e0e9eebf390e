//! Max-pooling that remembers where each maximum came from, and the
//! max-unpooling that puts values back there (SegNet's decoder upsampling).
//!
//! Index convention (PyTorch's and burn's): an index is the flat position
//! `row * width + col` of the maximum inside its `(batch, channel)` plane of the
//! *pre-pool* tensor.

use burn::tensor::module::{interpolate, max_pool2d, max_pool2d_with_indices};
use burn::tensor::ops::{InterpolateMode, InterpolateOptions, MaxPoolOptions};
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

/// 2x2 max-pool with stride 2; returns the pooled map and the argmax indices.
///
/// # Shapes
/// - input `[b, c, h, w]` → output and indices `[b, c, h/2, w/2]`
pub fn max_pool2x2(x: Tensor<4>) -> (Tensor<4>, Tensor<4, Int>) {
    if crate::kernels::native(&x.device()).pooling {
        return crate::kernels::op::max_pool2x2_with_indices(x);
    }
    max_pool2d_with_indices(x, MaxPoolOptions::new([2, 2]).with_stride([2, 2]))
}

/// 2x2 max-pool with stride 2, without indices (for decoders that do not unpool).
pub fn max_pool2x2_values(x: Tensor<4>) -> Tensor<4> {
    max_pool2d(x, MaxPoolOptions::new([2, 2]).with_stride([2, 2]))
}

/// Scatters every value of `x` to the position its index names in an
/// `out_hw`-sized plane; everything else is zero. The gradient (a gather with
/// the same indices) is exact.
///
/// # Shapes
/// - `x`, `indices` `[b, c, h, w]` → output `[b, c, out_h, out_w]`
pub fn max_unpool2d(x: Tensor<4>, indices: Tensor<4, Int>, out_hw: [usize; 2]) -> Tensor<4> {
    if crate::kernels::native(&x.device()).pooling {
        return crate::kernels::op::max_unpool2d(x, indices, out_hw);
    }
    let [b, c, h, w] = x.dims();
    let [out_h, out_w] = out_hw;
    let device = x.device();
    Tensor::<3>::zeros([b, c, out_h * out_w], &device)
        .scatter(
            2,
            indices.reshape([b, c, h * w]),
            x.reshape([b, c, h * w]),
            IndexingUpdateOp::Add,
        )
        .reshape([b, c, out_h, out_w])
}

/// Nearest-neighbour upsampling to `out_hw` (the decoder variant without indices).
pub fn upsample_nearest(x: Tensor<4>, out_hw: [usize; 2]) -> Tensor<4> {
    interpolate(
        x,
        InterpolateOptions::new(InterpolateMode::Nearest).with_output_size(out_hw),
    )
}
