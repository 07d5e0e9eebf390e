//! CPU kernels of our own, over raw `f32` buffers, for the operations where
//! burn's generic CPU backend is slowest (see shared/reference/stack.md).

pub mod conv3x3;
mod gemm;
pub mod op;

use std::sync::atomic::{AtomicBool, Ordering};

static NATIVE_CONV: AtomicBool = AtomicBool::new(true);

/// Whether 3x3 convolutions run our kernels ([`op::conv3x3`]) rather than
/// burn's generic ones. On by default; benchmarks turn it off to measure the
/// difference in one process.
pub fn native_conv() -> bool {
    NATIVE_CONV.load(Ordering::Relaxed)
}

/// Chooses the 3x3 convolution implementation for this process.
pub fn set_native_conv(enabled: bool) {
    NATIVE_CONV.store(enabled, Ordering::Relaxed);
}
