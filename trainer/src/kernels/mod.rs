//! CPU kernels of our own, over raw `f32` buffers, for the operations where
//! burn's generic CPU backend is slowest (see shared/reference/stack.md).

pub mod bn_relu;
pub mod conv3x3;
mod gemm;
pub mod maxpool;
pub mod op;
#[cfg(test)]
mod testutil;
pub mod unpool;

use std::sync::atomic::{AtomicU8, Ordering};

/// Which operations run our kernels instead of burn's generic ones. All on by
/// default; benchmarks switch them off one by one to measure each in one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NativeOps {
    /// 3x3 convolutions ([`op::conv3x3`]).
    pub conv: bool,
    /// Training-mode batch norm + ReLU ([`op::bn_relu_train`]).
    pub bn_relu: bool,
    /// Max-pooling with indices and max-unpooling
    /// ([`op::max_pool2x2_with_indices`], [`op::max_unpool2d`]).
    pub pooling: bool,
}

impl NativeOps {
    /// Everything native.
    pub const ALL: Self = Self {
        conv: true,
        bn_relu: true,
        pooling: true,
    };

    fn bits(self) -> u8 {
        self.conv as u8 | (self.bn_relu as u8) << 1 | (self.pooling as u8) << 2
    }
}

static NATIVE: AtomicU8 = AtomicU8::new(0b111);

/// The operations that currently run our kernels.
pub fn native() -> NativeOps {
    let bits = NATIVE.load(Ordering::Relaxed);
    NativeOps {
        conv: bits & 1 != 0,
        bn_relu: bits & 2 != 0,
        pooling: bits & 4 != 0,
    }
}

/// Chooses, for this process, which operations run our kernels.
pub fn set_native(ops: NativeOps) {
    NATIVE.store(ops.bits(), Ordering::Relaxed);
}
