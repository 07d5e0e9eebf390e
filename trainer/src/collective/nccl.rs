//! The GPU collective: NCCL through cudarc (feature `cuda`).
//!
//! Rank 0 creates the 128-byte NCCL unique id and publishes it through the
//! rendezvous store; every rank builds its communicator from it. cudarc loads
//! libcuda and libnccl at run time and panics if they are missing, so both are
//! probed first and a missing one is a clear error instead.
//!
//! Buffers are host `f32` slices (the trainer's flat gradient layout): each
//! call copies to the device, reduces there and copies back.
#![allow(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp as NcclOp};

use super::store::StoreClient;
use super::{Collective, CollectiveError, ReduceOp};

const ID_KEY: &str = "nccl/unique-id";
const DEVICE_KEY: &str = "nccl/device";

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
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

impl NcclCollective {
    /// Opens GPU `device` and joins the NCCL group through the store.
    pub fn connect(
        store: &mut StoreClient,
        rank: usize,
        world: usize,
        device: usize,
        join_timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        probe()?;
        let opened = CudaContext::new(device)
            .map_err(|e| gpu("failed to open the CUDA device")(format!("{device}: {e:?}")));
        // ncclCommInitRank blocks until every rank has called it, with no
        // timeout: a peer that dies before its call would hang the others for
        // ever (seen on an H200 with a bad LOCAL_RANK). So every rank first
        // publishes whether its GPU opened, and waits for all the others
        // within the join timeout, failing with the peer's own reason.
        let status = match &opened {
            Ok(_) => b"ok".to_vec(),
            Err(CollectiveError::Gpu(message)) => message.clone().into_bytes(),
            Err(e) => e.to_string().into_bytes(),
        };
        store.set(&format!("{DEVICE_KEY}/{rank}"), &status)?;
        let ctx = opened?;
        for peer in (0..world).filter(|&p| p != rank) {
            let status = match store.get(&format!("{DEVICE_KEY}/{peer}"), join_timeout) {
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
        let stream = ctx.default_stream();
        let id = if rank == 0 {
            let id = Id::new()
                .map_err(|e| gpu("failed to create the NCCL unique id")(format!("{e:?}")))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            store.set(ID_KEY, &bytes)?;
            id
        } else {
            let bytes = store.get(ID_KEY, join_timeout)?;
            let internal: [std::ffi::c_char; 128] = bytes
                .iter()
                .map(|&b| b as std::ffi::c_char)
                .collect::<Vec<_>>()
                .try_into()
                .map_err(|_| CollectiveError::Protocol {
                    peer: 0,
                    message: format!("the NCCL unique id has {} bytes, expected 128", bytes.len()),
                })?;
            Id::uninit(internal)
        };
        let comm = Comm::from_rank(stream.clone(), rank, world, id)
            .map_err(|e| gpu("failed to join the NCCL group")(format!("{e:?}")))?;
        Ok(Self {
            comm,
            stream,
            rank,
            world,
        })
    }

    fn roundtrip(
        &mut self,
        buf: &mut [f32],
        run: impl FnOnce(&Comm, &mut cudarc::driver::CudaSlice<f32>) -> Result<(), String>,
    ) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut device = self
            .stream
            .clone_htod(buf)
            .map_err(|e| gpu("failed to copy to the GPU")(format!("{e:?}")))?;
        run(&self.comm, &mut device).map_err(gpu("NCCL call failed"))?;
        self.stream
            .memcpy_dtoh(&device, buf)
            .map_err(|e| gpu("failed to copy from the GPU")(format!("{e:?}")))?;
        self.stream
            .synchronize()
            .map_err(|e| gpu("failed to synchronise the stream")(format!("{e:?}")))
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
            ReduceOp::Sum => NcclOp::Sum,
            ReduceOp::Average => NcclOp::Avg,
        };
        self.roundtrip(buf, |comm, device| {
            comm.all_reduce_in_place(device, &op)
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
        })
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.roundtrip(buf, |comm, device| {
            comm.broadcast_in_place(device, root as i32)
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
        })
    }
}
