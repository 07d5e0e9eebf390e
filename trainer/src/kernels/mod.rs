//! CPU kernels of our own, over raw `f32` buffers, for the operations where
//! burn's generic CPU backend is slowest (see shared/reference/stack.md).

pub mod bn_relu;
pub mod conv3x3;
mod gemm;
pub mod op;

use std::sync::atomic::{AtomicBool, Ordering};

static NATIVE_CONV: AtomicBool = AtomicBool::new(true);
static NATIVE_BN_RELU: AtomicBool = AtomicBool::new(true);

/// Whether 3x3 convolutions run our kernels ([`op::conv3x3`]) rather than
/// burn's generic ones. On by default; benchmarks turn it off to measure the
/// difference in one process.
pub fn native_conv() -> bool {
    NATIVE_CONV.load(Ordering::Relaxed)
}

/// Whether training-mode batch norm + ReLU runs our fused kernel
/// ([`op::bn_relu_train`]) rather than burn's composite batch norm and ReLU.
pub fn native_bn_relu() -> bool {
    NATIVE_BN_RELU.load(Ordering::Relaxed)
}

/// Chooses the implementations for this process (both on by default).
pub fn set_native(conv: bool, bn_relu: bool) {
    NATIVE_CONV.store(conv, Ordering::Relaxed);
    NATIVE_BN_RELU.store(bn_relu, Ordering::Relaxed);
}
