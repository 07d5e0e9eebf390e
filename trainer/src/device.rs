//! Where a trainer process computes: the CPU (burn's `flex` backend with our
//! kernels) or an NVIDIA GPU (burn's CUDA backend, cargo feature `cuda`).
//!
//! [`resolve`] turns `train.device` into a burn [`Device`] before anything
//! touches a GPU runtime: cudarc and CubeCL panic when the driver is missing
//! or an ordinal does not exist, so the driver library is loaded and the
//! visible GPUs are counted first, and a request that cannot be met is a
//! [`DeviceError`] naming the device, the library and the fix.

use burn::tensor::Device;

use crate::config::DeviceKind;

/// Where this process computes, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compute {
    /// The CPU.
    Cpu,
    /// NVIDIA GPU `ordinal` (the process's `LOCAL_RANK`).
    Cuda {
        /// Index among the GPUs this process sees.
        ordinal: usize,
    },
}

impl std::fmt::Display for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda { ordinal } => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// A resolved device: what it is and burn's handle to it (without autodiff).
#[derive(Debug, Clone)]
pub struct ComputeDevice {
    /// What it is.
    pub compute: Compute,
    /// burn's device.
    pub device: Device,
}

impl ComputeDevice {
    /// The CPU.
    pub fn cpu() -> Self {
        Self {
            compute: Compute::Cpu,
            device: Device::flex(),
        }
    }
}

/// `train.device` asks for something this process cannot have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// This binary has no CUDA backend.
    #[error(
        "train.device is cuda, but this trainer was built without CUDA support; run the CUDA image (trainer/Dockerfile.cuda) or a build with `--features cuda`, or set train.device to cpu or auto"
    )]
    NotBuilt,
    /// The NVIDIA driver library cannot be loaded.
    #[error(
        "train.device is cuda, but the NVIDIA driver cannot be loaded here ({library} not found); run where a GPU is visible (a pod that requests nvidia.com/gpu, on a node with the NVIDIA container toolkit), or set train.device to cpu or auto"
    )]
    NoDriver {
        /// The library that was looked for.
        library: &'static str,
    },
    /// The driver loads but the GPU this process should use is not there.
    #[error(
        "train.device is cuda and LOCAL_RANK is {ordinal}, but {visible} GPU(s) are visible here{detail}; start one process per visible GPU (LOCAL_RANK 0 to GPUs − 1, as `trainyard-trainer launch` does), or set train.device to cpu"
    )]
    NoGpu {
        /// The ordinal asked for.
        ordinal: usize,
        /// GPUs the driver reports.
        visible: usize,
        /// What the driver said, if it failed.
        detail: String,
    },
}

/// What the machine offers, as far as the driver says (see [`probe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No CUDA backend in this binary.
    NotBuilt,
    /// The driver library does not load.
    NoDriver,
    /// The driver loads and reports this many GPUs (`detail`: its error, if it failed).
    Gpus {
        /// Visible GPUs.
        count: usize,
        /// Why the count is 0, when the driver said.
        detail: Option<String>,
    },
}

/// The driver library cudarc loads (its soname on Linux).
pub const DRIVER_LIBRARY: &str = "libcuda.so.1";

/// Looks for the NVIDIA driver and counts the visible GPUs, without creating
/// a context.
pub fn probe() -> Probe {
    #[cfg(feature = "cuda")]
    {
        cuda_probe()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Probe::NotBuilt
    }
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn cuda_probe() -> Probe {
    // SAFETY: only tries to dlopen the driver library by its names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Probe::NoDriver;
    }
    let count =
        cudarc::driver::result::init().and_then(|()| cudarc::driver::result::device::get_count());
    match count {
        Ok(n) => Probe::Gpus {
            count: usize::try_from(n).unwrap_or(0),
            detail: None,
        },
        // CUDA_ERROR_NO_DEVICE and friends: a driver without a usable GPU.
        Err(e) => Probe::Gpus {
            count: 0,
            detail: Some(format!("{e:?}")),
        },
    }
}

/// What [`report`] prints (`trainyard-trainer devices`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceReport {
    /// This binary has the CUDA backend.
    pub cuda_built: bool,
    /// The NVIDIA driver library loads.
    pub driver: bool,
    /// GPUs the driver reports.
    pub gpus: usize,
    /// Their names, in ordinal order.
    pub names: Vec<String>,
    /// The NCCL library loads.
    pub nccl: bool,
    /// What the driver said when counting failed.
    pub detail: Option<String>,
}

/// What this machine offers the trainer, for `trainyard-trainer devices`.
pub fn report() -> DeviceReport {
    let (driver, gpus, detail) = match probe() {
        Probe::NotBuilt | Probe::NoDriver => (false, 0, None),
        Probe::Gpus { count, detail } => (true, count, detail),
    };
    DeviceReport {
        cuda_built: cfg!(feature = "cuda"),
        driver,
        gpus,
        names: (0..gpus).map(gpu_name).collect(),
        nccl: nccl_present(),
        detail,
    }
}

#[cfg(feature = "cuda")]
fn gpu_name(ordinal: usize) -> String {
    let name = i32::try_from(ordinal)
        .ok()
        .and_then(|o| cudarc::driver::result::device::get(o).ok())
        .and_then(|d| cudarc::driver::result::device::get_name(d).ok());
    name.unwrap_or_else(|| "unknown".into())
}

#[cfg(not(feature = "cuda"))]
fn gpu_name(_: usize) -> String {
    unreachable!("no GPUs are counted without the cuda feature")
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library by its names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

#[cfg(not(feature = "cuda"))]
fn nccl_present() -> bool {
    false
}

/// What `requested` becomes for the process with `local_rank`, given what
/// [`probe`] found. Pure, so every branch is tested without a GPU.
pub fn choose(
    requested: DeviceKind,
    local_rank: usize,
    probe: &Probe,
) -> Result<Compute, DeviceError> {
    let cuda = Compute::Cuda {
        ordinal: local_rank,
    };
    match (requested, probe) {
        (DeviceKind::Cpu, _) => Ok(Compute::Cpu),
        (DeviceKind::Auto, Probe::NotBuilt | Probe::NoDriver) => Ok(Compute::Cpu),
        (DeviceKind::Auto, Probe::Gpus { count: 0, .. }) => Ok(Compute::Cpu),
        (DeviceKind::Cuda, Probe::NotBuilt) => Err(DeviceError::NotBuilt),
        (DeviceKind::Cuda, Probe::NoDriver) => Err(DeviceError::NoDriver {
            library: DRIVER_LIBRARY,
        }),
        // Auto with GPUs but none for this rank is a misconfigured launch, not
        // a reason to train silently on the CPU beside idle GPUs.
        (DeviceKind::Auto | DeviceKind::Cuda, Probe::Gpus { count, detail }) => {
            if local_rank < *count {
                Ok(cuda)
            } else {
                Err(DeviceError::NoGpu {
                    ordinal: local_rank,
                    visible: *count,
                    detail: detail
                        .as_ref()
                        .map(|d| format!(" (the driver says {d})"))
                        .unwrap_or_default(),
                })
            }
        }
    }
}

/// Resolves `requested` for the process with `local_rank` and opens the device.
pub fn resolve(requested: DeviceKind, local_rank: usize) -> Result<ComputeDevice, DeviceError> {
    let found = match requested {
        // The CPU needs no probe (and a CPU run must not touch the driver).
        DeviceKind::Cpu => Probe::NotBuilt,
        _ => probe(),
    };
    let compute = choose(requested, local_rank, &found)?;
    let device = open(compute);
    tracing::info!(device = %compute, requested = ?requested, "compute device");
    Ok(ComputeDevice { compute, device })
}

fn open(compute: Compute) -> Device {
    match compute {
        Compute::Cpu => Device::flex(),
        #[cfg(feature = "cuda")]
        Compute::Cuda { ordinal } => Device::cuda(ordinal),
        #[cfg(not(feature = "cuda"))]
        Compute::Cuda { .. } => unreachable!("choose() never picks CUDA without the cuda feature"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(count: usize) -> Probe {
        Probe::Gpus {
            count,
            detail: None,
        }
    }

    #[test]
    fn auto_takes_a_gpu_when_one_is_visible_and_the_cpu_otherwise() {
        for probe in [Probe::NotBuilt, Probe::NoDriver, gpus(0)] {
            assert_eq!(
                choose(DeviceKind::Auto, 0, &probe),
                Ok(Compute::Cpu),
                "{probe:?}"
            );
        }
        assert_eq!(
            choose(DeviceKind::Auto, 1, &gpus(2)),
            Ok(Compute::Cuda { ordinal: 1 })
        );
        assert_eq!(choose(DeviceKind::Cpu, 0, &gpus(8)), Ok(Compute::Cpu));
    }

    #[test]
    fn cuda_without_a_gpu_says_why_and_how_to_fix_it() {
        let not_built = choose(DeviceKind::Cuda, 0, &Probe::NotBuilt).unwrap_err();
        assert!(
            not_built.to_string().contains("built without CUDA"),
            "{not_built}"
        );
        let no_driver = choose(DeviceKind::Cuda, 0, &Probe::NoDriver).unwrap_err();
        let text = no_driver.to_string();
        assert!(
            text.contains(DRIVER_LIBRARY) && text.contains("train.device"),
            "{text}"
        );
        let none = choose(
            DeviceKind::Cuda,
            0,
            &Probe::Gpus {
                count: 0,
                detail: Some("CUDA_ERROR_NO_DEVICE".into()),
            },
        )
        .unwrap_err();
        assert!(none.to_string().contains("CUDA_ERROR_NO_DEVICE"), "{none}");
        // More processes than GPUs: refused under auto too.
        for kind in [DeviceKind::Cuda, DeviceKind::Auto] {
            let e = choose(kind, 2, &gpus(2)).unwrap_err();
            assert!(e.to_string().contains("LOCAL_RANK is 2"), "{e}");
        }
    }

    #[test]
    fn the_cpu_resolves_without_probing() {
        let d = resolve(DeviceKind::Cpu, 5).unwrap();
        assert_eq!(d.compute, Compute::Cpu);
        assert_eq!(
            crate::kernels::native(&d.device),
            crate::kernels::NativeOps::ALL
        );
    }
}
