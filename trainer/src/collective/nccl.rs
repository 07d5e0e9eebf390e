//! The GPU collective: NCCL on the device memory of burn's CUDA tensors
//! (feature `cuda`), through cudarc's raw bindings so that every call has a
//! deadline.
//!
//! # Joining
//! Every rank first publishes through the rendezvous store whether its GPU
//! opened and waits for the others' answers within the join timeout: NCCL's
//! initialisation waits for every rank, and a peer that died before calling
//! it would otherwise hang the rest (seen on an H200 with a bad LOCAL_RANK).
//! Rank 0 then creates the 128-byte NCCL unique id and publishes it; every
//! rank builds its communicator from it.
//!
//! # Tensors stay on the GPU
//! A flat tensor is reduced where it lives. burn's CUDA runtime keeps its
//! streams private, so the hand-over is by synchronisation instead of a
//! stream-ordered event: the device is synchronised (the kernels that wrote
//! the tensor have finished), NCCL reduces the buffer in place on its own
//! stream in the same primary CUDA context, and that stream is waited for
//! before burn reads the result. No byte of a tensor crosses to the host;
//! host slices (the control values, a few words) are staged through a small
//! device buffer.
//!
//! # No hang on a dead peer
//! The communicator is non-blocking (NCCL's `blocking = 0`), so no NCCL call
//! blocks: the caller polls `ncclCommGetAsyncError` and the stream. Past the
//! collective timeout, or on an asynchronous NCCL error (a peer that died
//! is seen by the transport as a remote or system error), the communicator is
//! aborted (`ncclCommAbort`) and the error names the operation and the group;
//! it is retryable, so the trainer exits 75 and the gang restarts from the
//! last checkpoint. An aborted communicator refuses every later call.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::backend::{BackendTensor, DispatchTensorKind};
use burn::tensor::{FloatDType, Tensor};
use cubecl_runtime::runtime::Runtime;
use cudarc::driver::{CudaContext, CudaStream, DevicePtrMut, sys as cuda};
use cudarc::nccl::sys;

use super::ring::RingTimeouts;
use super::store::StoreClient;
use super::{Collective, CollectiveError, Payload, ReduceOp};

const ID_KEY: &str = "nccl/unique-id";
const DEVICE_KEY: &str = "nccl/device";

/// NCCL's `NCCL_CONFIG_UNDEF_INT`: "leave this setting to NCCL".
const UNDEF_INT: i32 = i32::MIN;

/// `ncclConfig_t` as NCCL 2.17 defined it, the prefix every later version
/// extends: NCCL reads a config by its `size` and `version`, so this one
/// layout works with any NCCL from 2.17 on, whichever version cudarc's
/// bindings were generated for.
#[repr(C)]
struct Config217 {
    size: usize,
    magic: u32,
    version: u32,
    blocking: i32,
    cga_cluster_size: i32,
    min_ctas: i32,
    max_ctas: i32,
    net_name: *const c_char,
    split_share: i32,
}

impl Config217 {
    fn non_blocking() -> Self {
        Self {
            size: std::mem::size_of::<Self>(),
            magic: 0xcafe_beef,
            version: 2 * 10_000 + 17 * 100,
            blocking: 0,
            cga_cluster_size: UNDEF_INT,
            min_ctas: UNDEF_INT,
            max_ctas: UNDEF_INT,
            net_name: std::ptr::null(),
            split_share: UNDEF_INT,
        }
    }
}

fn gpu(context: &str) -> impl Fn(String) -> CollectiveError + '_ {
    move |detail| CollectiveError::Gpu(format!("{context}: {detail}"))
}

/// Checks that the CUDA driver and NCCL libraries can be loaded.
pub fn probe() -> Result<(), CollectiveError> {
    // SAFETY: both functions only try to dlopen the libraries by name.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CollectiveError::Gpu(
            "libcuda.so (the NVIDIA driver) cannot be loaded on this machine; use the CPU ring instead".into(),
        ));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(CollectiveError::Gpu(
            "libnccl.so cannot be loaded; install NCCL and make libnccl.so resolvable (pip's NCCL wheels ship only libnccl.so.2: add a libnccl.so symlink)".into(),
        ));
    }
    Ok(())
}

/// An NCCL communicator on one GPU.
pub struct NcclCollective {
    comm: sys::ncclComm_t,
    aborted: bool,
    /// NCCL's stream, in the device's primary context (the one burn uses).
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
}

// SAFETY: the communicator handle is only used through `&mut self`, one
// thread at a time, as NCCL requires of a communicator.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Opens GPU `device` and joins the NCCL group through the store.
    pub fn connect(
        store: &mut StoreClient,
        rank: usize,
        world: usize,
        device: usize,
        timeouts: RingTimeouts,
    ) -> Result<Self, CollectiveError> {
        probe()?;
        let opened = CudaContext::new(device)
            .map_err(|e| gpu("failed to open the CUDA device")(format!("{device}: {e:?}")));
        let status = match &opened {
            Ok(_) => b"ok".to_vec(),
            Err(CollectiveError::Gpu(message)) => message.clone().into_bytes(),
            Err(e) => e.to_string().into_bytes(),
        };
        store.set(&format!("{DEVICE_KEY}/{rank}"), &status)?;
        let ctx = opened?;
        for peer in (0..world).filter(|&p| p != rank) {
            let status = match store.get(&format!("{DEVICE_KEY}/{peer}"), timeouts.join) {
                Ok(status) => status,
                Err(super::store::StoreError::Timeout { timeout, .. }) => {
                    return Err(CollectiveError::Timeout {
                        peer,
                        action: "wait for the GPU of",
                        timeout,
                    });
                }
                Err(e) => return Err(e.into()),
            };
            if status != b"ok" {
                return Err(CollectiveError::Gpu(format!(
                    "rank {peer} could not join: {}",
                    String::from_utf8_lossy(&status)
                )));
            }
        }
        let id = if rank == 0 {
            let id = cudarc::nccl::result::get_uniqueid()
                .map_err(|e| gpu("failed to create the NCCL unique id")(format!("{e:?}")))?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            store.set(ID_KEY, &bytes)?;
            id
        } else {
            let bytes = store.get(ID_KEY, timeouts.join)?;
            let internal: [c_char; 128] = bytes
                .iter()
                .map(|&b| b as c_char)
                .collect::<Vec<_>>()
                .try_into()
                .map_err(|_| CollectiveError::Protocol {
                    peer: 0,
                    message: format!("the NCCL unique id has {} bytes, expected 128", bytes.len()),
                })?;
            sys::ncclUniqueId { internal }
        };
        ctx.bind_to_thread()
            .map_err(|e| gpu("failed to make the CUDA context current")(format!("{e:?}")))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| gpu("failed to create NCCL's stream")(format!("{e:?}")))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let mut config = Config217::non_blocking();
        // SAFETY: `comm` and `config` outlive the call; the id came from rank
        // 0's ncclGetUniqueId; a non-blocking init returns at once.
        let started = unsafe {
            sys::ncclCommInitRankConfig(
                &mut comm,
                i32::try_from(world).expect("world sizes fit in i32"),
                id,
                i32::try_from(rank).expect("ranks fit in i32"),
                (&mut config as *mut Config217).cast::<sys::ncclConfig_t>(),
            )
        };
        let mut this = Self {
            comm,
            aborted: false,
            stream,
            rank,
            world,
            timeout: timeouts.collective,
        };
        this.check("join the NCCL group", started)?;
        this.settle("join the NCCL group", timeouts.join)?;
        tracing::info!(rank, world, device, "joined the NCCL group");
        Ok(this)
    }

    fn abort(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: the handle came from ncclCommInitRankConfig and is not
            // used again once aborted.
            unsafe {
                sys::ncclCommAbort(self.comm);
            }
        }
    }

    /// Turns the immediate result of an NCCL call into an error (aborting
    /// the communicator) unless it succeeded or was queued.
    fn check(
        &mut self,
        action: &'static str,
        result: sys::ncclResult_t,
    ) -> Result<(), CollectiveError> {
        use sys::ncclResult_t::{ncclInProgress, ncclSuccess};
        if matches!(result, ncclSuccess | ncclInProgress) {
            return Ok(());
        }
        self.abort();
        Err(CollectiveError::Nccl {
            action,
            world: self.world,
            detail: format!("{result:?}"),
        })
    }

    /// Waits until the communicator is idle and NCCL's stream has drained,
    /// within `limit`; aborts the communicator on an asynchronous error or at
    /// the deadline.
    fn settle(&mut self, action: &'static str, limit: Duration) -> Result<(), CollectiveError> {
        use sys::ncclResult_t::{ncclInProgress, ncclSuccess};
        let deadline = Instant::now() + limit;
        loop {
            let mut state = ncclSuccess;
            // SAFETY: a live communicator and a valid out-pointer.
            let asked = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            self.check(action, asked)?;
            match state {
                ncclSuccess => {
                    // SAFETY: NCCL's own live stream.
                    match unsafe { cuda::cuStreamQuery(self.stream.cu_stream()) } {
                        cuda::CUresult::CUDA_SUCCESS => return Ok(()),
                        cuda::CUresult::CUDA_ERROR_NOT_READY => {}
                        other => {
                            self.abort();
                            return Err(CollectiveError::Gpu(format!(
                                "NCCL's stream failed during {action}: {other:?}"
                            )));
                        }
                    }
                }
                ncclInProgress => {}
                error => {
                    self.check(action, error)?;
                }
            }
            if Instant::now() >= deadline {
                self.abort();
                return Err(CollectiveError::GroupTimeout {
                    action,
                    world: self.world,
                    timeout: limit,
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn usable(&self, action: &'static str) -> Result<(), CollectiveError> {
        if self.aborted {
            return Err(CollectiveError::Nccl {
                action,
                world: self.world,
                detail: "the communicator was aborted after an earlier failure".into(),
            });
        }
        Ok(())
    }

    /// Runs `call` (enqueueing NCCL work on its stream) and waits for it.
    fn run(
        &mut self,
        action: &'static str,
        call: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
    ) -> Result<(), CollectiveError> {
        self.usable(action)?;
        let result = call(self.comm, self.stream.cu_stream().cast());
        self.check(action, result)?;
        self.settle(action, self.timeout)
    }

    /// A host slice through a device staging buffer.
    fn staged(
        &mut self,
        action: &'static str,
        buf: &mut [f32],
        call: impl FnOnce(*mut c_void, usize, sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
    ) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        let stream = self.stream.clone();
        let mut device = stream
            .clone_htod(buf)
            .map_err(|e| gpu("failed to copy to the GPU")(format!("{e:?}")))?;
        {
            let (ptr, _sync) = device.device_ptr_mut(&stream);
            let len = buf.len();
            self.run(action, |comm, s| call(ptr as *mut c_void, len, comm, s))?;
        }
        stream
            .memcpy_dtoh(&device, buf)
            .map_err(|e| gpu("failed to copy from the GPU")(format!("{e:?}")))?;
        stream
            .synchronize()
            .map_err(|e| gpu("failed to synchronise the stream")(format!("{e:?}")))
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // Abort rather than destroy: destroying waits for peers that may be gone.
        self.abort();
    }
}

/// The CUDA runtime's server, to reach the storage behind a tensor's handle.
type CudaServer = <cubecl_cuda::CudaRuntime as Runtime>::Server;

/// A flat CUDA tensor's device memory, held in place while NCCL works on it.
struct DeviceBuffer {
    ptr: u64,
    /// Keeps the allocation bound: never freed, reused or moved meanwhile.
    _resource: Box<dyn std::any::Any>,
}

impl DeviceBuffer {
    /// The memory of `t`, which must be a contiguous tensor on a CUDA device.
    fn of(t: &Tensor<1>) -> Result<Self, CollectiveError> {
        let dispatch = t.clone().into_dispatch();
        let DispatchTensorKind::Cube(BackendTensor::Float(cube)) = dispatch.kind else {
            return Err(CollectiveError::Unsupported(
                "NCCL reduces tensors on a CUDA device; this one is elsewhere (train.backend nccl needs train.device cuda)"
                    .into(),
            ));
        };
        let resource = cube
            .client
            .get_resource::<CudaServer>(cube.handle.clone())
            .map_err(|e| gpu("failed to reach a tensor's device memory")(format!("{e:?}")))?;
        let ptr = resource.resource().ptr;
        Ok(Self {
            ptr,
            _resource: Box::new(resource),
        })
    }
}

/// NCCL's element type for a wire format.
fn nccl_type(payload: Payload) -> (sys::ncclDataType_t, Option<FloatDType>) {
    match payload {
        Payload::F32 => (sys::ncclDataType_t::ncclFloat32, None),
        Payload::F16 => (sys::ncclDataType_t::ncclFloat16, Some(FloatDType::F16)),
        Payload::Bf16 => (sys::ncclDataType_t::ncclBfloat16, Some(FloatDType::BF16)),
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CollectiveError> {
        let op = match op {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Average => sys::ncclRedOp_t::ncclAvg,
        };
        self.staged("all-reduce", buf, |ptr, len, comm, stream| {
            // SAFETY: `ptr` holds `len` f32 values on this communicator's GPU.
            unsafe {
                sys::ncclAllReduce(
                    ptr,
                    ptr,
                    len,
                    sys::ncclDataType_t::ncclFloat32,
                    op,
                    comm,
                    stream,
                )
            }
        })
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let root = i32::try_from(root).expect("ranks fit in i32");
        self.staged("broadcast", buf, |ptr, len, comm, stream| {
            // SAFETY: as above.
            unsafe {
                sys::ncclBroadcast(
                    ptr,
                    ptr,
                    len,
                    sys::ncclDataType_t::ncclFloat32,
                    root,
                    comm,
                    stream,
                )
            }
        })
    }

    fn all_reduce_tensor(
        &mut self,
        t: Tensor<1>,
        op: ReduceOp,
        payload: Payload,
        bucket_len: usize,
    ) -> Result<Tensor<1>, CollectiveError> {
        let n = t.dims()[0];
        if n == 0 {
            return Ok(t);
        }
        let (dtype, wire) = nccl_type(payload);
        // A 16-bit average sums values already divided by the world size, as
        // the ring does, so the sums stay in range.
        let (t, nccl_op) = match (wire, op) {
            (None, ReduceOp::Average) => (t, sys::ncclRedOp_t::ncclAvg),
            (None, ReduceOp::Sum) => (t, sys::ncclRedOp_t::ncclSum),
            (Some(d), ReduceOp::Average) => (
                t.div_scalar(self.world as f32).cast(d),
                sys::ncclRedOp_t::ncclSum,
            ),
            (Some(d), ReduceOp::Sum) => (t.cast(d), sys::ncclRedOp_t::ncclSum),
        };
        // NCCL writes in place, and the buffer may be shared with other
        // tensors (the parameters a model views, say): work on a copy (an
        // exact one: x·1 = x), which burn makes in place when nothing else
        // holds the buffer.
        let t = t.mul_scalar(1.0);
        t.device()
            .sync()
            .map_err(|e| gpu("the GPU failed before the all-reduce")(format!("{e:?}")))?;
        let buffer = DeviceBuffer::of(&t)?;
        let elem = payload.bytes() as u64;
        let bucket = bucket_len.max(1);
        let mut start = 0;
        while start < n {
            let count = bucket.min(n - start);
            let ptr = (buffer.ptr + start as u64 * elem) as *mut c_void;
            self.run("all-reduce", |comm, stream| {
                // SAFETY: `ptr` holds `count` elements of `dtype` inside the
                // tensor's allocation, which `buffer` keeps in place.
                unsafe { sys::ncclAllReduce(ptr, ptr, count, dtype, nccl_op, comm, stream) }
            })?;
            start += count;
        }
        drop(buffer);
        Ok(match wire {
            None => t,
            Some(_) => t.cast(FloatDType::F32),
        })
    }

    fn broadcast_tensor(
        &mut self,
        t: Tensor<1>,
        root: usize,
    ) -> Result<Tensor<1>, CollectiveError> {
        let n = t.dims()[0];
        if n == 0 {
            return Ok(t);
        }
        // As in all_reduce_tensor: NCCL writes in place.
        let t = t.mul_scalar(1.0);
        t.device()
            .sync()
            .map_err(|e| gpu("the GPU failed before the broadcast")(format!("{e:?}")))?;
        let buffer = DeviceBuffer::of(&t)?;
        let ptr = buffer.ptr as *mut c_void;
        let root = i32::try_from(root).expect("ranks fit in i32");
        self.run("broadcast", |comm, stream| {
            // SAFETY: `ptr` holds the tensor's `n` f32 values.
            unsafe {
                sys::ncclBroadcast(
                    ptr,
                    ptr,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    root,
                    comm,
                    stream,
                )
            }
        })?;
        drop(buffer);
        Ok(t)
    }
}
