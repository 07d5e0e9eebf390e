//! Data-parallel training's side of every step: what the ranks of a group
//! exchange and how.
//!
//! [`DataParallel`] joins the group with the collective the config and the
//! device call for (the TCP ring through host memory, or NCCL on GPU memory)
//! and owns the gradient exchange: flat gradients all-reduced in buckets
//! ([`crate::config::TrainConfig::bucket_mib`]) with an optional 16-bit wire
//! format, or top-k sparsified ([`topk`]); the control values every rank
//! must agree on (the loss, a stop request); the BatchNorm buffers; the
//! parameter averaging of local SGD ([`local_sgd`]); and the check that all
//! ranks hold the same bits ([`sync::check_in_sync`]). The training loop
//! calls it once per step and never sees a concrete collective.

pub mod local_sgd;
pub mod sync;
pub mod topk;

use std::time::{Duration, Instant};

use burn::tensor::Tensor;

use crate::collective::ring::{RingTimeouts, TcpRing};
use crate::collective::{self, Collective, CollectiveError, DistEnv, Payload, ReduceOp};
use crate::config::{CollectiveBackend, Compression, TrainConfig};
use crate::device::Compute;
use crate::model::params;
use topk::TopK;

/// Which collective a group uses, resolved from `train.backend` and the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The TCP ring, through host memory.
    Tcp,
    /// NCCL on device memory.
    Nccl,
}

/// `train.backend` for a process computing on `compute`: Auto is NCCL on a
/// GPU and the ring on the CPU; NCCL on the CPU is refused.
pub fn backend(requested: CollectiveBackend, compute: Compute) -> Result<Backend, CollectiveError> {
    match (requested, compute) {
        (CollectiveBackend::Tcp, _) | (CollectiveBackend::Auto, Compute::Cpu) => Ok(Backend::Tcp),
        (CollectiveBackend::Nccl | CollectiveBackend::Auto, Compute::Cuda { .. }) => {
            Ok(Backend::Nccl)
        }
        (CollectiveBackend::Nccl, Compute::Cpu) => Err(CollectiveError::Unsupported(
            "train.backend is nccl, but this process computes on the CPU (train.device resolved to cpu); \
             NCCL reduces GPU memory: use train.backend tcp or auto, or run where a GPU is visible"
                .into(),
        )),
    }
}

/// Time and bytes a rank spent communicating.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommStats {
    /// Wall time in collectives.
    pub time: Duration,
    /// Bytes all-reduced or broadcast (the f32 buffers, or their 16-bit wire form).
    pub bytes: u64,
}

/// This rank's membership of a data-parallel group.
pub struct DataParallel {
    /// The rendezvous, kept for the group's lifetime (rank 0 serves it).
    _rendezvous: collective::Rendezvous,
    collective: Box<dyn Collective>,
    payload: Payload,
    bucket_len: usize,
    /// Top-k's residual is per rank and not checkpointed: a resumed run starts
    /// with nothing owed.
    topk: Option<TopK>,
    /// Gradients are not exchanged under local SGD (parameters are).
    exchange_gradients: bool,
    stats: CommStats,
}

/// The wire format `train.compression` asks for.
pub fn payload(compression: Compression) -> Payload {
    match compression {
        Compression::None => Payload::F32,
        Compression::Fp16 => Payload::F16,
        Compression::Bf16 => Payload::Bf16,
    }
}

/// Values per all-reduce bucket for `train.bucket_mib` MiB.
pub fn bucket_len(bucket_mib: f64) -> usize {
    ((bucket_mib * (1 << 20) as f64) as usize / 4).max(1)
}

impl DataParallel {
    /// Joins the group `dist` describes with the collective `train.backend`
    /// picks for `compute`; `n` is the number of trained values.
    pub fn join(
        dist: &DistEnv,
        config: &TrainConfig,
        compute: Compute,
        n: usize,
        timeouts: RingTimeouts,
    ) -> Result<Self, CollectiveError> {
        let backend = backend(config.backend, compute)?;
        if backend == Backend::Nccl && config.topk.is_some() {
            return Err(CollectiveError::Unsupported(
                "train.topk runs on the CPU ring only; use train.compression on GPUs".into(),
            ));
        }
        tracing::info!(rank = dist.rank, world = dist.world_size, store = %dist.store_addr(), ?backend, "joining the data-parallel group");
        let mut rendezvous = collective::rendezvous(dist, timeouts)?;
        let collective: Box<dyn Collective> = match (backend, compute) {
            (Backend::Tcp, _) => Box::new(TcpRing::connect(
                &mut rendezvous.store,
                dist.rank,
                dist.world_size,
                dist.attempt,
                &rendezvous.key,
                timeouts,
            )?),
            #[cfg(feature = "cuda")]
            (Backend::Nccl, Compute::Cuda { ordinal }) => {
                Box::new(collective::nccl::NcclCollective::connect(
                    &mut rendezvous.store,
                    dist.rank,
                    dist.world_size,
                    ordinal,
                    timeouts,
                )?)
            }
            (Backend::Nccl, _) => {
                return Err(CollectiveError::Unsupported(
                    "NCCL needs a trainer built with the cuda feature and a GPU".into(),
                ));
            }
        };
        Ok(Self {
            _rendezvous: rendezvous,
            collective,
            payload: payload(config.compression),
            bucket_len: bucket_len(config.bucket_mib),
            topk: config.topk.as_ref().map(|t| TopK::new(t.ratio, n)),
            exchange_gradients: config.local_sgd.is_none(),
            stats: CommStats::default(),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.collective.world_size()
    }

    /// The collective, for exchanges outside a step (validation counts, start-up state).
    pub fn collective(&mut self) -> &mut dyn Collective {
        self.collective.as_mut()
    }

    /// Time and bytes spent so far.
    pub fn stats(&self) -> CommStats {
        self.stats
    }

    fn timed<T>(
        &mut self,
        bytes: u64,
        f: impl FnOnce(&mut dyn Collective) -> Result<T, CollectiveError>,
    ) -> Result<T, CollectiveError> {
        let t = Instant::now();
        let out = f(self.collective.as_mut())?;
        self.stats.time += t.elapsed();
        self.stats.bytes += bytes;
        Ok(out)
    }

    /// The group's mean of every rank's `grads` (identical bits on every
    /// rank); under local SGD, `grads` unchanged.
    pub fn average_gradients(&mut self, grads: Tensor<1>) -> Result<Tensor<1>, CollectiveError> {
        if !self.exchange_gradients {
            return Ok(grads);
        }
        let n = grads.dims()[0];
        if let Some(mut topk) = self.topk.take() {
            let device = grads.device();
            let mut values = params::to_host(&grads);
            let t = Instant::now();
            let bytes = topk.all_reduce_mean(self.collective.as_mut(), &mut values);
            self.stats.time += t.elapsed();
            self.topk = Some(topk);
            self.stats.bytes += bytes?;
            return Ok(params::from_host(values, &device));
        }
        let (payload, bucket_len) = (self.payload, self.bucket_len);
        self.timed((n * payload.bytes()) as u64, |c| {
            c.all_reduce_tensor(grads, ReduceOp::Average, payload, bucket_len)
        })
    }

    /// What every rank must agree on after a step: the mean loss, and whether
    /// any rank was asked to stop.
    pub fn agree(&mut self, loss: f32, stop: bool) -> Result<(f32, bool), CollectiveError> {
        let world = self.world_size() as f32;
        let mut control = [loss, f32::from(u8::from(stop))];
        self.timed((control.len() * 4) as u64, |c| {
            c.all_reduce(&mut control, ReduceOp::Sum)
        })?;
        Ok((control[0] / world, control[1] > 0.0))
    }

    /// The group's mean of a flat tensor in full precision and in one piece
    /// (BatchNorm buffers, local SGD's parameters).
    pub fn average(&mut self, t: Tensor<1>) -> Result<Tensor<1>, CollectiveError> {
        let n = t.dims()[0];
        self.timed((n * 4) as u64, |c| {
            c.all_reduce_tensor(t, ReduceOp::Average, Payload::F32, n)
        })
    }
}
