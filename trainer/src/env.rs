//! Environment variable names a replica is started with: the single source of
//! truth for the trainer (which reads them) and the operator's planner (which
//! sets them). torchrun's names for the process group, `TRAINYARD_*` for ours.

/// This process's rank.
pub const RANK: &str = "RANK";
/// Number of ranks.
pub const WORLD_SIZE: &str = "WORLD_SIZE";
/// Rank within the node: on a GPU, which of the pod's GPUs the process uses.
pub const LOCAL_RANK: &str = "LOCAL_RANK";
/// Processes in this pod, one per GPU (torchrun's name); read by the in-pod
/// supervisor, `trainyard-trainer launch`.
pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
/// This pod's index among the worker pods (torchrun's name): the supervisor
/// gives its processes `RANK = GROUP_RANK·LOCAL_WORLD_SIZE + LOCAL_RANK`.
pub const GROUP_RANK: &str = "GROUP_RANK";
/// Host of rank 0's rendezvous store.
pub const MASTER_ADDR: &str = "MASTER_ADDR";
/// Port of rank 0's rendezvous store.
pub const MASTER_PORT: &str = "MASTER_PORT";
/// [`MASTER_PORT`] when it is not set (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;
/// Seconds a group waits for every rank to join, unless told otherwise.
pub const DEFAULT_JOIN_TIMEOUT_SECONDS: u64 = 300;
/// Seconds a collective may stall before a peer is declared dead, unless
/// told otherwise.
pub const DEFAULT_COLLECTIVE_TIMEOUT_SECONDS: u64 = 300;
/// Gang-restart counter set by the operator; a process from an older attempt
/// is refused by the rendezvous.
pub const RUN_ATTEMPT: &str = "TRAINYARD_RUN_ATTEMPT";
/// The job's secret: every connection of a data-parallel group (the
/// rendezvous store, the ring) proves it holds it. At least 16 bytes;
/// required for groups of more than one rank.
pub const GROUP_SECRET: &str = "TRAINYARD_GROUP_SECRET";
/// `namespace/name` of the TrainingJob the replica belongs to.
pub const JOB: &str = "TRAINYARD_JOB";
/// The replica's role in the job (`worker`, `aggregator`, `client`).
pub const REPLICA_ROLE: &str = "TRAINYARD_REPLICA_ROLE";
/// The trainer configuration itself, inline as JSON, when `train` is given no
/// `--config` file (how the operator hands a replica its config).
pub const CONFIG: &str = "TRAINYARD_CONFIG";

/// URL of the operator's progress endpoint for this job (absent: no reports).
pub const PROGRESS_URL: &str = "TRAINYARD_PROGRESS_URL";
/// The job's secret token for progress reports.
pub const PROGRESS_TOKEN: &str = "TRAINYARD_PROGRESS_TOKEN";

/// The federation secret (aggregator only): client tokens are derived from it.
pub const FEDERATION_SECRET: &str = "TRAINYARD_FEDERATION_SECRET";
/// A federated client's own token ([`crate::config::client_token`]).
pub const CLIENT_TOKEN: &str = "TRAINYARD_CLIENT_TOKEN";

/// Every name above: the planner refuses user env overrides of these.
pub const RESERVED: &[&str] = &[
    RANK,
    WORLD_SIZE,
    LOCAL_RANK,
    LOCAL_WORLD_SIZE,
    GROUP_RANK,
    MASTER_ADDR,
    MASTER_PORT,
    RUN_ATTEMPT,
    GROUP_SECRET,
    JOB,
    REPLICA_ROLE,
    CONFIG,
    PROGRESS_URL,
    PROGRESS_TOKEN,
    FEDERATION_SECRET,
    CLIENT_TOKEN,
];
