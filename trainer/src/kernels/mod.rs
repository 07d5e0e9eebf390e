//! CPU kernels of our own, over raw `f32` buffers, for the operations where
//! burn's generic CPU backend is slowest (see shared/reference/stack.md).

pub mod bn_relu;
pub mod conv3x3;
mod gemm;
pub mod maxpool;
pub mod op;
#[cfg(test)]
pub(crate) mod testutil;
pub mod unpool;

use std::cell::Cell;

use burn::backend::DispatchDevice;
use burn::tensor::Device;

/// Which operations run our kernels instead of burn's generic ones.
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

    /// Nothing native: burn's own operations throughout (what every device
    /// but the CPU runs).
    pub const NONE: Self = Self {
        conv: false,
        bn_relu: false,
        pooling: false,
    };

    fn and(self, other: Self) -> Self {
        Self {
            conv: self.conv && other.conv,
            bn_relu: self.bn_relu && other.bn_relu,
            pooling: self.pooling && other.pooling,
        }
    }
}

thread_local! {
    /// Operations this thread may run natively (see [`with_native`]).
    static ALLOWED: Cell<NativeOps> = const { Cell::new(NativeOps::ALL) };
}

/// The operations that run our kernels for tensors on `device`: every one on
/// the CPU backend (`flex`), whose buffers our kernels read; none elsewhere,
/// where burn's own operations run (CubeCL's kernels on CUDA).
/// [`with_native`] can narrow the choice, never widen it.
pub fn native(device: &Device) -> NativeOps {
    let flex = matches!(
        device.clone().without_autodiff().as_dispatch(),
        DispatchDevice::Flex(_)
    );
    if flex {
        ALLOWED.with(Cell::get)
    } else {
        NativeOps::NONE
    }
}

/// Runs `f` with only the operations `ops` allows native on this thread: the
/// choice is made while a forward pass builds its graph, so a model run inside
/// `f` uses burn's operations where `ops` says no (benchmarks measure each
/// kernel this way; tests compare the two paths in one process).
pub fn with_native<R>(ops: NativeOps, f: impl FnOnce() -> R) -> R {
    let before = ALLOWED.with(|a| a.replace(a.get().and(ops)));
    struct Restore(NativeOps);
    impl Drop for Restore {
        fn drop(&mut self) {
            ALLOWED.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}
