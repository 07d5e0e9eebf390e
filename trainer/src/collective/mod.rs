//! Collective communication between the ranks of a data-parallel group.
//!
//! See [`Collective`] for the operations, [`ring::TcpRing`] for the CPU
//! implementation, [`store`] for the rendezvous through which ranks find each
//! other, and [`DistEnv`] for the torchrun-compatible environment that says who
//! is who.

pub mod auth;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;
pub mod store;

use std::time::Duration;

use burn::tensor::Tensor;

use crate::model::params::{from_host, to_host};

/// How [`Collective::all_reduce`] combines the ranks' buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise mean.
    Average,
}

/// The wire format of an all-reduce: full precision, or a 16-bit float that
/// halves the bytes sent (gradient compression).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    /// 32-bit floats, exact.
    #[default]
    F32,
    /// IEEE half precision (10-bit mantissa, range ±65504).
    F16,
    /// bfloat16 (7-bit mantissa, f32's range).
    Bf16,
}

impl Payload {
    /// Bytes per value on the wire.
    pub fn bytes(self) -> usize {
        match self {
            Payload::F32 => 4,
            Payload::F16 | Payload::Bf16 => 2,
        }
    }

    /// Rounds `src` to the wire format into `dst` (F16C instructions when the
    /// CPU has them, through the half crate).
    pub fn encode_slice(self, src: &[f32], dst: &mut [u16]) {
        use half::slice::HalfBitsSliceExt;
        use half::slice::HalfFloatSliceExt;
        match self {
            Payload::F16 => dst
                .reinterpret_cast_mut::<half::f16>()
                .convert_from_f32_slice(src),
            _ => dst
                .iter_mut()
                .zip(src)
                .for_each(|(d, &v)| *d = self.encode(v)),
        }
    }

    /// Widens wire bits `src` into `dst`.
    pub fn decode_slice(self, src: &[u16], dst: &mut [f32]) {
        use half::slice::HalfBitsSliceExt;
        use half::slice::HalfFloatSliceExt;
        match self {
            Payload::F16 => src
                .reinterpret_cast::<half::f16>()
                .convert_to_f32_slice(dst),
            _ => dst
                .iter_mut()
                .zip(src)
                .for_each(|(d, &b)| *d = self.decode(b)),
        }
    }

    /// Rounds `v` to the wire format, as bits.
    #[inline]
    pub fn encode(self, v: f32) -> u16 {
        match self {
            Payload::F16 => half::f16::from_f32(v).to_bits(),
            Payload::Bf16 => bf16_bits(v),
            Payload::F32 => unreachable!("f32 payloads are sent as they are"),
        }
    }

    /// Widens wire bits back to f32.
    #[inline]
    pub fn decode(self, bits: u16) -> f32 {
        match self {
            Payload::F16 => half::f16::from_bits(bits).to_f32(),
            Payload::Bf16 => f32::from_bits((bits as u32) << 16),
            Payload::F32 => unreachable!("f32 payloads are sent as they are"),
        }
    }
}

/// f32 → bfloat16 bits, rounding to nearest even: the same result as
/// `half::bf16::from_f32` but branch-free for finite values, so the encoding
/// loop vectorises (the library's conversion made compressed all-reduce
/// slower than sending f32). NaN stays NaN.
#[inline]
fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
    if v.is_nan() {
        (bits >> 16) as u16 | 0x0040
    } else {
        rounded
    }
}

/// Why a collective operation failed. Every variant that involves a peer
/// names it, so a group can tell which process died.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CollectiveError {
    /// Setting up sockets failed.
    #[error("failed to set up the collective: {0}")]
    Setup(std::io::Error),
    /// Rendezvous failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// A peer's connection broke.
    #[error("failed to {action} rank {peer}: {source} (did it exit?)")]
    Peer {
        /// The peer's rank.
        peer: usize,
        /// What we were doing.
        action: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A peer stalled beyond the collective timeout.
    #[error("timed out after {timeout:?} trying to {action} rank {peer} (is it alive?)")]
    Timeout {
        /// The peer's rank.
        peer: usize,
        /// What we were doing.
        action: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// The collective cannot do what was asked.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The GPU or NCCL failed (feature `cuda`).
    #[error("GPU collective: {0}")]
    Gpu(String),
    /// An NCCL operation failed asynchronously (a peer died, the network
    /// broke); the communicator was aborted.
    #[error("NCCL {action} across {world} ranks failed: {detail}; the communicator was aborted")]
    Nccl {
        /// The operation.
        action: &'static str,
        /// Ranks in the group.
        world: usize,
        /// What NCCL reported.
        detail: String,
    },
    /// A collective of the whole group did not finish in time (NCCL names no
    /// peer); the communicator was aborted.
    #[error(
        "NCCL {action} across {world} ranks did not finish within {timeout:?}; the communicator was aborted (did a rank die?)"
    )]
    GroupTimeout {
        /// The operation.
        action: &'static str,
        /// Ranks in the group.
        world: usize,
        /// The collective timeout.
        timeout: Duration,
    },
    /// A self-check found a wrong result (a broken library or device).
    #[error("the collective computed a wrong result: {0}")]
    WrongResult(String),
    /// A group of several ranks without the job's secret.
    #[error(
        "{variable} is not set: a group of {world} ranks authenticates every connection with the job's secret (the operator and `trainyard local` set it; by hand, give every rank the same random string of at least 16 bytes, or pass --insecure-group for an experiment on a trusted network)"
    )]
    NoSecret {
        /// The variable.
        variable: &'static str,
        /// Ranks in the group.
        world: usize,
    },
    /// A peer sent something unexpected.
    #[error("protocol error with rank {peer}: {message}")]
    Protocol {
        /// The peer's rank.
        peer: usize,
        /// What was wrong.
        message: String,
    },
}

impl CollectiveError {
    /// Whether restarting the group can cure this: a peer that died, stalled
    /// or spoke garbage, or a rendezvous that could not be reached. Refusals
    /// (a stale attempt, a duplicate rank) and unsupported requests are not.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Peer { .. }
            | Self::Timeout { .. }
            | Self::Protocol { .. }
            | Self::Nccl { .. }
            | Self::GroupTimeout { .. } => true,
            Self::Store(e) => !matches!(e, store::StoreError::Refused { .. }),
            Self::Setup(_)
            | Self::Unsupported(_)
            | Self::Gpu(_)
            | Self::WrongResult(_)
            | Self::NoSecret { .. } => false,
        }
    }
}

/// The collective operations data-parallel training needs. Every rank must
/// call the same operations in the same order with buffers of equal length.
pub trait Collective {
    /// This process's rank.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// Combines `buf` across ranks in place; every rank ends with the same bits.
    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CollectiveError>;

    /// [`Collective::all_reduce`] with `payload` on the wire. Implementations
    /// that cannot compress refuse 16-bit payloads.
    fn all_reduce_with(
        &mut self,
        buf: &mut [f32],
        op: ReduceOp,
        payload: Payload,
    ) -> Result<(), CollectiveError> {
        match payload {
            Payload::F32 => self.all_reduce(buf, op),
            other => Err(CollectiveError::Unsupported(format!(
                "{other:?} payloads on this collective"
            ))),
        }
    }

    /// Copies `root`'s `buf` to every rank.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError>;

    /// Combines a flat tensor across ranks, in consecutive buckets of at most
    /// `bucket_len` values (in order, as PyTorch DDP does), with `payload` on
    /// the wire; every rank ends with the same bits. This default goes through
    /// host memory, which is where a CPU tensor lives anyway; a collective on
    /// device memory (NCCL) reduces the tensor where it is.
    fn all_reduce_tensor(
        &mut self,
        t: Tensor<1>,
        op: ReduceOp,
        payload: Payload,
        bucket_len: usize,
    ) -> Result<Tensor<1>, CollectiveError> {
        let device = t.device();
        let mut values = to_host(&t);
        for bucket in values.chunks_mut(bucket_len.max(1)) {
            self.all_reduce_with(bucket, op, payload)?;
        }
        Ok(from_host(values, &device))
    }

    /// Copies `root`'s flat tensor to every rank (through the host by
    /// default, as [`Collective::all_reduce_tensor`]).
    fn broadcast_tensor(
        &mut self,
        t: Tensor<1>,
        root: usize,
    ) -> Result<Tensor<1>, CollectiveError> {
        let device = t.device();
        let mut values = to_host(&t);
        self.broadcast(&mut values, root)?;
        Ok(from_host(values, &device))
    }

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.all_reduce(&mut [0.0], ReduceOp::Sum)
    }

    /// Every rank's `value`, indexed by rank (for metrics).
    fn all_gather_f32(&mut self, value: f32) -> Result<Vec<f32>, CollectiveError> {
        // Exact: every slot but one is zero on every rank.
        let mut slots = vec![0.0f32; self.world_size()];
        slots[self.rank()] = value;
        self.all_reduce(&mut slots, ReduceOp::Sum)?;
        Ok(slots)
    }
}

/// Environment variable names (the crate-wide [`crate::env`]), re-exported
/// where the group is formed.
pub use crate::env;

/// Who this process is in the group, from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Rank within the node.
    pub local_rank: usize,
    /// Host of the rendezvous store.
    pub master_addr: String,
    /// Port of the rendezvous store.
    pub master_port: u16,
    /// Gang-restart counter.
    pub attempt: u64,
    /// The job's secret, which every connection of the group proves.
    pub key: Option<auth::GroupKey>,
}

/// The environment does not describe a valid group.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid distributed environment: {variable} {message}")]
pub struct EnvError {
    /// The variable at fault.
    pub variable: &'static str,
    /// What is wrong.
    pub message: String,
}

impl DistEnv {
    /// Reads the variables through `get` (normally `std::env::var`). Absent
    /// variables mean a single process: rank 0 of 1 on 127.0.0.1:29500.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        fn parse<T: std::str::FromStr>(
            get: &impl Fn(&str) -> Option<String>,
            variable: &'static str,
            default: T,
        ) -> Result<T, EnvError> {
            match get(variable) {
                None => Ok(default),
                Some(raw) => raw.trim().parse().map_err(|_| EnvError {
                    variable,
                    message: format!("is `{raw}`, expected a non-negative integer"),
                }),
            }
        }
        let world_size: usize = parse(&get, env::WORLD_SIZE, 1)?;
        if world_size == 0 {
            return Err(EnvError {
                variable: env::WORLD_SIZE,
                message: "is 0; a group needs at least one rank".into(),
            });
        }
        let rank: usize = parse(&get, env::RANK, 0)?;
        if rank >= world_size {
            return Err(EnvError {
                variable: env::RANK,
                message: format!(
                    "is {rank}, but ranks run from 0 to WORLD_SIZE-1 = {}",
                    world_size - 1
                ),
            });
        }
        let master_addr = get(env::MASTER_ADDR).unwrap_or_else(|| "127.0.0.1".into());
        if master_addr.trim().is_empty() {
            return Err(EnvError {
                variable: env::MASTER_ADDR,
                message: "is empty; set it to rank 0's host".into(),
            });
        }
        Ok(Self {
            rank,
            world_size,
            local_rank: parse(&get, env::LOCAL_RANK, 0)?,
            master_addr,
            master_port: parse(&get, env::MASTER_PORT, env::DEFAULT_MASTER_PORT)?,
            attempt: parse(&get, env::RUN_ATTEMPT, 0)?,
            key: match get(env::GROUP_SECRET) {
                None => None,
                Some(secret) => Some(auth::GroupKey::new(&secret).ok_or_else(|| EnvError {
                    variable: env::GROUP_SECRET,
                    message: format!(
                        "is {} bytes long; the job's secret needs at least {}",
                        secret.len(),
                        auth::MIN_SECRET_BYTES
                    ),
                })?),
            },
        })
    }

    /// A single process (rank 0 of 1).
    pub fn single() -> Self {
        Self::from_lookup(|_| None).expect("the defaults are valid")
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// `host:port` of the store.
    pub fn store_addr(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }

    /// The key the group's connections prove: the job's secret; for a
    /// group of one, which no one else may join, a random one.
    pub fn group_key(&self) -> Result<auth::GroupKey, CollectiveError> {
        match (&self.key, self.world_size) {
            (Some(key), _) => Ok(key.clone()),
            (None, 1) => Ok(auth::GroupKey::random()),
            (None, world) => Err(CollectiveError::NoSecret {
                variable: env::GROUP_SECRET,
                world,
            }),
        }
    }
}

/// A joined group: the store (served here on rank 0) and the ring.
pub struct Group {
    /// Rank 0's store server, kept alive for the group's lifetime.
    pub server: Option<store::StoreServer>,
    /// This rank's store connection.
    pub store: store::StoreClient,
    /// The data plane.
    pub ring: ring::TcpRing,
}

/// The rendezvous of a group: rank 0's store server (kept alive for the
/// group's lifetime), this rank's connection to it, and the key every
/// connection of the group proves.
pub struct Rendezvous {
    /// Rank 0's store server.
    pub server: Option<store::StoreServer>,
    /// This rank's store connection.
    pub store: store::StoreClient,
    /// The group's key.
    pub key: auth::GroupKey,
}

/// Meets the group `env` describes: rank 0 serves the store on all interfaces
/// at MASTER_PORT, and every rank joins it with the job's secret.
pub fn rendezvous(
    env: &DistEnv,
    timeouts: ring::RingTimeouts,
) -> Result<Rendezvous, CollectiveError> {
    let key = env.group_key()?;
    let server = if env.rank == 0 {
        let bind: std::net::SocketAddr = ([0, 0, 0, 0], env.master_port).into();
        Some(
            store::StoreServer::start(bind, env.world_size, env.attempt, key.clone())
                .map_err(CollectiveError::Setup)?,
        )
    } else {
        None
    };
    let store = store::StoreClient::join(
        &env.store_addr(),
        env.rank,
        env.world_size,
        env.attempt,
        &key,
        timeouts.join,
    )?;
    Ok(Rendezvous { server, store, key })
}

/// Joins the group `env` describes and builds the TCP ring.
pub fn join_group(env: &DistEnv, timeouts: ring::RingTimeouts) -> Result<Group, CollectiveError> {
    let Rendezvous {
        server,
        mut store,
        key,
    } = rendezvous(env, timeouts)?;
    let ring = ring::TcpRing::connect(
        &mut store,
        env.rank,
        env.world_size,
        env.attempt,
        &key,
        timeouts,
    )?;
    Ok(Group {
        server,
        store,
        ring,
    })
}

/// What `trainyard-trainer bench-allreduce` prints (rank 0), with the
/// bandwidth definitions of nccl-tests.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AllReduceBench {
    /// Ranks.
    pub world_size: usize,
    /// Bytes reduced per call.
    pub bytes: usize,
    /// Payload type.
    pub dtype: &'static str,
    /// Timed calls.
    pub iters: usize,
    /// Median seconds per call.
    pub median_seconds: f64,
    /// `bytes / time`, GB/s.
    pub algbw_gbps: f64,
    /// `algbw · 2(n-1)/n`, GB/s: comparable across world sizes.
    pub busbw_gbps: f64,
}

/// Checks one sum all-reduce and one broadcast of `len` values against the
/// answer computed locally. The values are small integers, exact in f32 for
/// any order of summation, so the check is equality. Benchmarks run it first:
/// a fast wrong collective (a misconfigured NCCL, say) must not pass as a
/// bandwidth figure.
pub fn verify(c: &mut dyn Collective, len: usize) -> Result<(), CollectiveError> {
    let (rank, n) = (c.rank(), c.world_size());
    let value = |i: usize, r: usize| ((i % 17) + r) as f32;
    let mut buf: Vec<f32> = (0..len).map(|i| value(i, rank)).collect();
    c.all_reduce(&mut buf, ReduceOp::Sum)?;
    if let Some(i) = (0..len).find(|&i| buf[i] != (0..n).map(|r| value(i, r)).sum::<f32>()) {
        return Err(CollectiveError::WrongResult(format!(
            "sum all-reduce of {len} values over {n} ranks: element {i} is {}, expected {}",
            buf[i],
            (0..n).map(|r| value(i, r)).sum::<f32>()
        )));
    }
    let root = n - 1;
    let mut buf: Vec<f32> = (0..len).map(|i| value(i, rank)).collect();
    c.broadcast(&mut buf, root)?;
    if let Some(i) = (0..len).find(|&i| buf[i] != value(i, root)) {
        return Err(CollectiveError::WrongResult(format!(
            "broadcast of {len} values from rank {root}: element {i} is {}, expected {}",
            buf[i],
            value(i, root)
        )));
    }
    Ok(())
}

/// Times `iters` all-reduces of `bytes` of f32 values (sent as `payload`)
/// after `warmup` untimed ones; each call starts after a barrier so ranks are
/// aligned. `bytes` counts the f32 buffer, so half-precision payloads report
/// the bandwidth seen by the caller's f32 data.
pub fn bench_all_reduce(
    c: &mut dyn Collective,
    bytes: usize,
    iters: usize,
    warmup: usize,
    payload: Payload,
) -> Result<AllReduceBench, CollectiveError> {
    verify(c, bytes / 4)?;
    let mut buf: Vec<f32> = (0..bytes / 4).map(|i| (i % 97) as f32).collect();
    let mut times = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        c.barrier()?;
        let t0 = std::time::Instant::now();
        c.all_reduce_with(&mut buf, ReduceOp::Average, payload)?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    // Every rank must agree on the time, or they would report different rows:
    // take the slowest rank's median, as nccl-tests does.
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(0.0);
    let median = c
        .all_gather_f32(median as f32)?
        .into_iter()
        .fold(0.0f32, f32::max) as f64;
    let n = c.world_size() as f64;
    let algbw = if median > 0.0 {
        (buf.len() * 4) as f64 / median / 1e9
    } else {
        0.0
    };
    Ok(AllReduceBench {
        world_size: c.world_size(),
        bytes: buf.len() * 4,
        dtype: match payload {
            Payload::F32 => "f32",
            Payload::F16 => "f16",
            Payload::Bf16 => "bf16",
        },
        iters,
        median_seconds: median,
        algbw_gbps: algbw,
        busbw_gbps: algbw * 2.0 * (n - 1.0) / n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> Result<DistEnv, EnvError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn fast_bf16_rounding_equals_the_half_crate() {
        let mut specials = vec![
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        // Exact ties (lower 16 bits 0x8000) round to even in both directions.
        specials.extend([f32::from_bits(0x3F80_8000), f32::from_bits(0x3F81_8000)]);
        let mut s = 0x1234_5678u32;
        let randoms = (0..100_000).map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            f32::from_bits(s)
        });
        for v in specials.into_iter().chain(randoms).filter(|v| !v.is_nan()) {
            assert_eq!(
                Payload::Bf16.encode(v),
                half::bf16::from_f32(v).to_bits(),
                "{v:e}"
            );
        }
        assert!(
            Payload::Bf16
                .decode(Payload::Bf16.encode(f32::NAN))
                .is_nan()
        );
    }

    #[test]
    fn defaults_describe_a_single_process() {
        let e = env_of(&[]).unwrap();
        assert_eq!((e.rank, e.world_size, e.attempt), (0, 1, 0));
        assert_eq!(e.store_addr(), "127.0.0.1:29500");
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (pairs, variable) in [
            (vec![("WORLD_SIZE", "0")], "WORLD_SIZE"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "RANK"),
            (vec![("RANK", "x")], "RANK"),
            (vec![("MASTER_PORT", "99999")], "MASTER_PORT"),
            (vec![("MASTER_ADDR", " ")], "MASTER_ADDR"),
            (
                vec![("TRAINYARD_RUN_ATTEMPT", "-1")],
                "TRAINYARD_RUN_ATTEMPT",
            ),
        ] {
            assert_eq!(env_of(&pairs).unwrap_err().variable, variable);
        }
    }
}
