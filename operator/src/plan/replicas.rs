//! The replicas a job needs: abstract descriptions that the Kubernetes side
//! turns into Pods and the local side into processes.

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};
use trainyard_trainer::cli::{self, flag};
use trainyard_trainer::env;

use crate::api::Mode;
use crate::job::{Roles, ValidatedJob};

/// What a replica does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A data-parallel trainer (Distributed and Peft modes).
    Worker,
    /// The federated aggregator.
    Aggregator,
    /// A federated client.
    Client,
}

impl Role {
    /// Lower-case name used in replica names, labels and env.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Worker => "worker",
            Self::Aggregator => "aggregator",
            Self::Client => "client",
        }
    }
}

/// Where replicas run, which decides addresses and paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Pods behind the job's headless Service (named like the job).
    Kubernetes,
    /// Child processes on 127.0.0.1 (`trainyard local`).
    Local {
        /// Free port for rank 0's rendezvous store (ports in the spec are for pods).
        master_port: u16,
        /// Directory under which each replica gets its run directory.
        out_root: String,
        /// Where the leader's trainer serves its `/metrics`, if anywhere
        /// (one address: the other replicas would collide on it).
        leader_metrics: Option<std::net::SocketAddr>,
        /// The run's secret: data-parallel workers prove it to each other;
        /// in Federated mode the aggregator holds it and each client gets
        /// only its derived token.
        secret: String,
    },
}

/// Name of the Secret holding a federated job's secret and client tokens.
pub fn federation_secret_name(job: &str) -> String {
    format!("{job}-federation")
}

/// Key of the federation secret in that Secret.
pub const FEDERATION_SECRET_KEY: &str = "secret";

/// Name of the Secret holding a data-parallel job's group secret, which its
/// workers prove to each other on every connection (`TRAINYARD_GROUP_SECRET`).
pub fn group_secret_name(job: &str) -> String {
    format!("{job}-group")
}

/// Key of the group secret in that Secret.
pub const GROUP_SECRET_KEY: &str = "secret";

/// Key of client `index`'s token in that Secret.
pub fn client_token_key(index: usize) -> String {
    format!("client-{index}")
}

/// One replica, abstractly.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    /// Unique within the namespace: `<job>-<role>-<index>`.
    pub name: String,
    /// What it does.
    pub role: Role,
    /// Index within its role (the rank for workers).
    pub index: u32,
    /// The run attempt it belongs to.
    pub attempt: u32,
    /// Arguments of `trainyard-trainer`.
    pub args: Vec<String>,
    /// Environment: Trainyard's variables first, then the user's.
    pub env: Vec<EnvVar>,
    /// `nvidia.com/gpu` to request.
    pub gpus: u32,
    /// Named container ports.
    pub ports: Vec<(String, u16)>,
    /// Its run directory, as it sees it.
    pub out_dir: String,
    /// Secrets mounted read-only: (Secret name, mount path).
    pub secret_mounts: Vec<(String, String)>,
}

/// Where a federated job's TLS Secret is mounted.
pub const FEDERATION_TLS_DIR: &str = "/etc/trainyard/federation-tls";

/// NVIDIA's variable for the GPUs a process may see.
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

/// Port of the trainer's Prometheus endpoint in pods.
pub const METRICS_PORT: u16 = 9400;

/// The name of replica `index` of `role` in job `job`.
pub fn replica_name(job: &str, role: Role, index: u32) -> String {
    format!("{job}-{role}-{index}", role = role.as_str())
}

/// The replica whose success means the job succeeded (rank 0, or the aggregator).
pub fn leader(mode: Mode) -> Role {
    match mode {
        Mode::Federated => Role::Aggregator,
        Mode::Distributed | Mode::Peft => Role::Worker,
    }
}

/// Every replica of `attempt`, in a fixed order (leader first).
pub fn desired(job: &ValidatedJob, attempt: u32, placement: &Placement) -> Vec<Replica> {
    let gang = Gang::new(job, attempt, placement);
    gang.layout()
        .into_iter()
        .map(|(role, index)| gang.replica(role, index))
        .collect()
}

/// What every replica of one attempt shares.
struct Gang<'a> {
    job: &'a ValidatedJob,
    attempt: u32,
    placement: &'a Placement,
    /// Where the leader is reached: its pod's DNS name, or loopback.
    leader_host: String,
    /// The leader's port as the others dial it.
    master_port: u16,
    config_json: String,
}

fn var(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    }
}

fn secret_var(name: &str, secret: String, key: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret,
                key,
                optional: Some(false),
            }),
            ..Default::default()
        }),
    }
}

impl<'a> Gang<'a> {
    fn new(job: &'a ValidatedJob, attempt: u32, placement: &'a Placement) -> Self {
        let (name, namespace) = (&job.id.name, &job.id.namespace);
        let leader_host = match placement {
            Placement::Kubernetes => format!(
                "{}.{name}.{namespace}.svc",
                replica_name(name, job.roles.leader, 0)
            ),
            Placement::Local { .. } => "127.0.0.1".into(),
        };
        let master_port = match placement {
            Placement::Kubernetes => job.roles.leader_port,
            Placement::Local { master_port, .. } => *master_port,
        };
        Self {
            job,
            attempt,
            placement,
            leader_host,
            master_port,
            config_json: serde_json::to_string(&job.trainer).expect("a config serializes"),
        }
    }

    /// (role, index) of every replica, leader first.
    fn layout(&self) -> Vec<(Role, u32)> {
        let Roles {
            leader,
            follower,
            followers,
            ..
        } = self.job.roles;
        let mut layout = Vec::new();
        if leader == Role::Aggregator {
            layout.push((Role::Aggregator, 0));
        }
        layout.extend((0..followers).map(|i| (follower, i)));
        layout
    }

    fn replica(&self, role: Role, index: u32) -> Replica {
        let name = replica_name(&self.job.id.name, role, index);
        let out_dir = self.out_dir(&name);
        let (mut args, ports) = self.args(role, index, &out_dir);
        let secret_mounts = self.tls(role, &mut args);
        Replica {
            name,
            role,
            index,
            attempt: self.attempt,
            args,
            env: self.env(role, index),
            gpus: if role == Role::Worker {
                self.job.gpus_per_worker()
            } else {
                0
            },
            ports,
            out_dir,
            secret_mounts,
        }
    }

    fn out_dir(&self, replica: &str) -> String {
        match self.placement {
            // Keyed by the job's uid: a job recreated under the same name on
            // the same volume starts afresh, never resuming (or "finishing"
            // with) its predecessor's run.
            Placement::Kubernetes => format!(
                "{}/{}-{}/{replica}",
                self.job.spec.checkpoints.location, self.job.id.name, self.job.id.uid
            ),
            Placement::Local { out_root, .. } => format!("{out_root}/{replica}"),
        }
    }

    /// Trainyard's variables first, then the user's.
    fn env(&self, role: Role, index: u32) -> Vec<EnvVar> {
        let job = self.job;
        let (gpus, world_size) = (job.gpus_per_worker(), job.world_size());
        let mut vars = vec![
            var(env::JOB, format!("{}/{}", job.id.namespace, job.id.name)),
            var(env::REPLICA_ROLE, role.as_str().into()),
            var(env::RUN_ATTEMPT, self.attempt.to_string()),
            var(env::MASTER_ADDR, self.leader_host.clone()),
            var(env::MASTER_PORT, self.master_port.to_string()),
            var(env::CONFIG, self.config_json.clone()),
        ];
        match role {
            // One process per GPU under the in-pod supervisor, which gives
            // each its RANK and LOCAL_RANK.
            Role::Worker if gpus > 0 => {
                vars.push(var(env::GROUP_RANK, index.to_string()));
                vars.push(var(env::LOCAL_WORLD_SIZE, gpus.to_string()));
                vars.push(var(env::WORLD_SIZE, world_size.to_string()));
                // On a cluster the device plugin shows each pod its own
                // GPUs; locally every worker shares the machine, so each is
                // shown its own slice of them.
                if let Placement::Local { .. } = self.placement {
                    let first = index * gpus;
                    let slice: Vec<String> = (first..first + gpus).map(|g| g.to_string()).collect();
                    vars.push(var(CUDA_VISIBLE_DEVICES, slice.join(",")));
                }
            }
            Role::Worker => {
                vars.push(var(env::RANK, index.to_string()));
                vars.push(var(env::LOCAL_RANK, "0".into()));
                vars.push(var(env::WORLD_SIZE, world_size.to_string()));
            }
            Role::Client => {
                vars.push(var(env::RANK, index.to_string()));
                vars.push(var(env::LOCAL_RANK, "0".into()));
                vars.push(var(env::WORLD_SIZE, job.roles.followers.to_string()));
            }
            Role::Aggregator => vars.push(var(env::LOCAL_RANK, "0".into())),
        }
        vars.push(self.secret(role, index));
        vars.extend(job.spec.template.env.iter().cloned());
        vars
    }

    /// The secret a replica proves itself with: from the job's Secret on a
    /// cluster (never in the pod spec), the run's own secret locally.
    fn secret(&self, role: Role, index: u32) -> EnvVar {
        let name = &self.job.id.name;
        match (role, self.placement) {
            (Role::Aggregator, Placement::Kubernetes) => secret_var(
                env::FEDERATION_SECRET,
                federation_secret_name(name),
                FEDERATION_SECRET_KEY.into(),
            ),
            (Role::Client, Placement::Kubernetes) => secret_var(
                env::CLIENT_TOKEN,
                federation_secret_name(name),
                client_token_key(index as usize),
            ),
            (Role::Worker, Placement::Kubernetes) => secret_var(
                env::GROUP_SECRET,
                group_secret_name(name),
                GROUP_SECRET_KEY.into(),
            ),
            (Role::Aggregator, Placement::Local { secret, .. }) => {
                var(env::FEDERATION_SECRET, secret.clone())
            }
            (Role::Client, Placement::Local { secret, .. }) => var(
                env::CLIENT_TOKEN,
                trainyard_trainer::config::client_token(secret, index as usize),
            ),
            (Role::Worker, Placement::Local { secret, .. }) => {
                var(env::GROUP_SECRET, secret.clone())
            }
        }
    }

    /// `trainyard-trainer`'s arguments and the named ports they open.
    fn args(&self, role: Role, index: u32, out_dir: &str) -> (Vec<String>, Vec<(String, u16)>) {
        let dist = self.job.spec.distributed.clone().unwrap_or_default();
        let mut args: Vec<String> = match role {
            Role::Worker => vec![
                cli::TRAIN.into(),
                flag(cli::OUT),
                out_dir.into(),
                // A fresh run directory starts fresh; after a gang restart
                // rank 0 continues from its newest checkpoint.
                flag(cli::RESUME),
                flag(cli::JOIN_TIMEOUT),
                dist.join_timeout_seconds.to_string(),
                flag(cli::COLLECTIVE_TIMEOUT),
                dist.collective_timeout_seconds.to_string(),
            ],
            // A restarted aggregator continues after its last round.
            Role::Aggregator => vec![
                cli::AGGREGATE.into(),
                flag(cli::OUT),
                out_dir.into(),
                flag(cli::RESUME),
            ],
            Role::Client => vec![cli::CLIENT.into(), flag(cli::OUT), out_dir.into()],
        };
        let leader = role == self.job.roles.leader && index == 0;
        let mut ports = Vec::new();
        match self.placement {
            Placement::Kubernetes => {
                args.push(flag(cli::METRICS_ADDR));
                args.push(format!("0.0.0.0:{METRICS_PORT}"));
                ports.push(("metrics".into(), METRICS_PORT));
                if leader {
                    ports.push(("rendezvous".into(), self.job.roles.leader_port));
                }
            }
            Placement::Local {
                leader_metrics: Some(addr),
                ..
            } if leader => {
                args.push(flag(cli::METRICS_ADDR));
                args.push(addr.to_string());
            }
            Placement::Local { .. } => {}
        }
        if role == Role::Worker && self.job.gpus_per_worker() > 0 {
            // `launch -- train …`: the supervisor reads GROUP_RANK,
            // LOCAL_WORLD_SIZE and WORLD_SIZE from the env.
            args.splice(0..0, [cli::LAUNCH.to_string(), "--".to_string()]);
        }
        (args, ports)
    }

    /// TLS of the federation endpoint on a cluster (loopback stays HTTP):
    /// the flags it adds to `args`, and the Secret mounts it needs.
    fn tls(&self, role: Role, args: &mut Vec<String>) -> Vec<(String, String)> {
        let (Some(tls), Placement::Kubernetes) = (
            self.job
                .spec
                .federated
                .as_ref()
                .and_then(|f| f.tls.as_ref()),
            self.placement,
        ) else {
            return Vec::new();
        };
        let file = |f: &str| format!("{FEDERATION_TLS_DIR}/{f}");
        match role {
            Role::Aggregator => args.extend([
                flag(cli::TLS_CERT),
                file("tls.crt"),
                flag(cli::TLS_KEY),
                file("tls.key"),
            ]),
            Role::Client => args.extend([
                flag(cli::TLS_CA),
                file("ca.crt"),
                flag(cli::AGGREGATOR),
                format!("https://{}:{}", self.leader_host, self.master_port),
            ]),
            Role::Worker => return Vec::new(),
        }
        vec![(tls.secret_name.clone(), FEDERATION_TLS_DIR.into())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::TrainingJob;
    use crate::api::validate::parse_manifests;
    use crate::job::facts;

    fn job() -> TrainingJob {
        parse_manifests(
            "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: seg, namespace: ml}\nspec:\n  mode: Distributed\n  image: t:1\n  distributed: {workers: 3}\n  template: {env: [{name: EXTRA, value: '1'}]}\n",
        )
        .unwrap()
        .remove(0)
    }

    fn get<'a>(r: &'a Replica, name: &str) -> &'a str {
        r.env
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
            .unwrap_or_else(|| panic!("{name} not set on {}", r.name))
    }

    #[test]
    fn workers_get_torchrun_env_and_stable_names() {
        let rs = desired(&facts(&job()), 2, &Placement::Kubernetes);
        let names: Vec<_> = rs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["seg-worker-0", "seg-worker-1", "seg-worker-2"]);
        for (i, r) in rs.iter().enumerate() {
            assert_eq!(get(r, env::RANK), i.to_string());
            assert_eq!(get(r, env::WORLD_SIZE), "3");
            assert_eq!(get(r, env::MASTER_ADDR), "seg-worker-0.seg.ml.svc");
            assert_eq!(get(r, env::MASTER_PORT), "29500");
            assert_eq!(get(r, env::RUN_ATTEMPT), "2");
            assert_eq!(get(r, env::JOB), "ml/seg");
            assert_eq!(get(r, "EXTRA"), "1");
            let config: trainyard_trainer::config::TrainerConfig =
                serde_json::from_str(get(r, env::CONFIG)).unwrap();
            config.validate().unwrap();
            assert!(r.args.contains(&"--resume".to_string()));
        }
        assert!(rs[0].ports.iter().any(|(n, _)| n == "rendezvous"));
        assert!(!rs[1].ports.iter().any(|(n, _)| n == "rendezvous"));
        // The group secret comes from the job's Secret, never in the pod spec.
        for r in &rs {
            let e = r.env.iter().find(|e| e.name == env::GROUP_SECRET).unwrap();
            assert_eq!(e.value, None);
            let key = e
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap();
            assert_eq!(
                (key.name.as_str(), key.key.as_str()),
                ("seg-group", GROUP_SECRET_KEY)
            );
        }
    }

    #[test]
    fn gpu_workers_run_one_process_per_gpu_under_the_supervisor() {
        let mut j = job();
        j.spec.distributed.as_mut().unwrap().gpus_per_worker = 4;
        let rs = desired(&facts(&j), 0, &Placement::Kubernetes);
        assert_eq!(rs.len(), 3, "one pod per worker");
        for (i, r) in rs.iter().enumerate() {
            assert_eq!(r.gpus, 4);
            assert_eq!(r.args[..3], ["launch", "--", "train"]);
            assert_eq!(get(r, env::WORLD_SIZE), "12");
            assert_eq!(get(r, env::LOCAL_WORLD_SIZE), "4");
            assert_eq!(get(r, env::GROUP_RANK), i.to_string());
            assert!(
                r.env
                    .iter()
                    .all(|e| e.name != env::RANK && e.name != env::LOCAL_RANK)
            );
        }
        // Locally the workers share one machine: each sees its own GPUs.
        let local = Placement::Local {
            master_port: 1,
            out_root: "/tmp/r".into(),
            leader_metrics: None,
            secret: "local-test-secret".into(),
        };
        let rs = desired(&facts(&j), 0, &local);
        assert_eq!(get(&rs[1], CUDA_VISIBLE_DEVICES), "4,5,6,7");
        // CPU workers keep one process each, without the supervisor.
        let rs = desired(&facts(&job()), 0, &Placement::Kubernetes);
        assert!(rs.iter().all(|r| r.gpus == 0 && r.args[0] == "train"));
    }

    #[test]
    fn run_directories_on_a_cluster_are_keyed_by_the_jobs_uid() {
        let dir = |uid: &str| {
            let mut j = job();
            j.metadata.uid = Some(uid.into());
            desired(&facts(&j), 0, &Placement::Kubernetes)[1]
                .out_dir
                .clone()
        };
        assert_eq!(dir("u-1"), "/var/lib/trainyard/run/seg-u-1/seg-worker-1");
        assert_ne!(dir("u-1"), dir("u-2"), "a recreated job starts afresh");
    }

    #[test]
    fn local_placement_uses_loopback_and_the_out_root() {
        let placement = Placement::Local {
            master_port: 40123,
            out_root: "/tmp/run".into(),
            leader_metrics: Some("127.0.0.1:9401".parse().unwrap()),
            secret: "s".into(),
        };
        let rs = desired(&facts(&job()), 0, &placement);
        assert_eq!(get(&rs[1], env::GROUP_SECRET), "s");
        assert_eq!(get(&rs[1], env::MASTER_ADDR), "127.0.0.1");
        assert_eq!(get(&rs[1], env::MASTER_PORT), "40123");
        assert_eq!(rs[1].out_dir, "/tmp/run/seg-worker-1");
        assert!(rs[1].ports.is_empty());
        // Only rank 0 serves metrics: one address cannot be bound twice.
        let metrics = |r: &Replica| {
            r.args
                .windows(2)
                .any(|w| w == ["--metrics-addr", "127.0.0.1:9401"])
        };
        assert!(metrics(&rs[0]));
        assert!(!rs[1].args.iter().any(|a| a == "--metrics-addr"));
    }

    #[test]
    fn federated_replicas_get_the_secret_or_only_their_own_token() {
        let mut j = job();
        j.spec.mode = Mode::Federated;
        j.spec.distributed = None;
        j.spec.federated = Some(crate::api::FederatedSpec {
            clients: 2,
            min_clients: 2,
            ..Default::default()
        });
        let local = Placement::Local {
            master_port: 1,
            out_root: "/tmp/r".into(),
            leader_metrics: None,
            secret: "s3cret".into(),
        };
        let rs = desired(&facts(&j), 0, &local);
        assert_eq!(get(&rs[0], env::FEDERATION_SECRET), "s3cret");
        assert!(rs[0].args.contains(&"--resume".to_string()));
        assert_eq!(
            get(&rs[2], env::CLIENT_TOKEN),
            trainyard_trainer::config::client_token("s3cret", 1)
        );
        assert!(
            rs[1..]
                .iter()
                .all(|r| r.env.iter().all(|e| e.name != env::FEDERATION_SECRET))
        );
        let rs = desired(&facts(&j), 0, &Placement::Kubernetes);
        let key = |r: &Replica, name: &str| {
            r.env
                .iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
                .map(|k| (k.name.clone(), k.key.clone()))
        };
        assert_eq!(
            key(&rs[0], env::FEDERATION_SECRET),
            Some(("seg-federation".into(), "secret".into()))
        );
        assert_eq!(
            key(&rs[2], env::CLIENT_TOKEN),
            Some(("seg-federation".into(), "client-1".into()))
        );
        assert!(rs.iter().all(|r| r.secret_mounts.is_empty()));
        // With TLS, the Secret is mounted and the flags point at its files.
        j.spec.federated.as_mut().unwrap().tls = Some(crate::api::FederatedTlsSpec {
            secret_name: "fl-tls".into(),
        });
        let rs = desired(&facts(&j), 0, &Placement::Kubernetes);
        let has = |r: &Replica, pair: [&str; 2]| r.args.windows(2).any(|w| w == pair);
        assert!(has(
            &rs[0],
            ["--tls-cert", "/etc/trainyard/federation-tls/tls.crt"]
        ));
        assert!(has(
            &rs[1],
            ["--tls-ca", "/etc/trainyard/federation-tls/ca.crt"]
        ));
        assert!(has(
            &rs[1],
            ["--aggregator", "https://seg-aggregator-0.seg.ml.svc:29600"]
        ));
        assert!(
            rs.iter().all(
                |r| r.secret_mounts == [("fl-tls".to_string(), FEDERATION_TLS_DIR.to_string())]
            )
        );
        // Locally the endpoint stays on loopback HTTP.
        assert!(
            desired(&facts(&j), 0, &local)
                .iter()
                .all(|r| !r.args.iter().any(|a| a.starts_with("--tls")))
        );
    }

    #[test]
    fn federated_layout_has_an_aggregator_first() {
        let mut j = job();
        j.spec.mode = Mode::Federated;
        j.spec.distributed = None;
        j.spec.federated = Some(crate::api::FederatedSpec {
            clients: 2,
            min_clients: 1,
            ..Default::default()
        });
        let rs = desired(&facts(&j), 0, &Placement::Kubernetes);
        let names: Vec<_> = rs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["seg-aggregator-0", "seg-client-0", "seg-client-1"]);
        assert_eq!(get(&rs[2], env::MASTER_ADDR), "seg-aggregator-0.seg.ml.svc");
    }
}
