//! The Kubernetes objects a job owns, built from the planner's replicas.
//! Pure: no API calls, so every field is unit-tested.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, Pod,
    PodSchedulingGate, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile, Secret,
    SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use crate::api::TrainingJob;
use crate::api::validate::GPU_RESOURCE;
use crate::plan::Replica;

/// Label keys, shared by the builders, selectors and observers.
pub mod labels {
    /// The job a child belongs to.
    pub const JOB_NAME: &str = "trainyard.dev/job-name";
    /// `worker`, `aggregator` or `client`.
    pub const REPLICA_ROLE: &str = "trainyard.dev/replica-role";
    /// Index within the role.
    pub const REPLICA_INDEX: &str = "trainyard.dev/replica-index";
    /// Run attempt the pod was created for.
    pub const ATTEMPT: &str = "trainyard.dev/attempt";
}

/// The scheduling gate that holds a gang's pods until all of them exist.
pub const GANG_GATE: &str = "trainyard.dev/gang";

/// Name of the trainer container.
pub const CONTAINER: &str = "trainer";

/// Schedulers that gang-schedule on their own; with them, no gate is set.
pub const GANG_SCHEDULERS: &[&str] = &["volcano", "scheduler-plugins-scheduler", "coscheduler"];

fn owner(job: &TrainingJob) -> OwnerReference {
    job.controller_owner_ref(&())
        .expect("a TrainingJob from the API server has a name and uid")
}

fn common_labels(job: &TrainingJob) -> BTreeMap<String, String> {
    let name = job.metadata.name.clone().unwrap_or_default();
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "trainyard-trainer".into()),
        ("app.kubernetes.io/instance".into(), name.clone()),
        ("app.kubernetes.io/part-of".into(), "trainyard".into()),
        (
            "app.kubernetes.io/managed-by".into(),
            "trainyard-operator".into(),
        ),
        (labels::JOB_NAME.into(), name),
    ])
}

/// Whether the pods of `job` are created gated (no gang scheduler named).
pub fn gang_gated(job: &TrainingJob) -> bool {
    job.spec
        .template
        .scheduler_name
        .as_deref()
        .is_none_or(|s| !GANG_SCHEDULERS.contains(&s))
}

/// How a pod reaches the progress endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressEnv {
    /// Full URL of the job's endpoint.
    pub url: String,
    /// The Secret holding the job's token (key [`TOKEN_KEY`]).
    pub secret: String,
}

/// Key of the token in the job's Secret.
pub const TOKEN_KEY: &str = "token";

/// Name of the Secret with the job's progress token.
pub fn token_secret_name(job: &str) -> String {
    format!("{job}-progress")
}

/// A Secret of the job's (labelled and owned like its pods) named `secret`
/// holding `data`.
pub fn job_secret(job: &TrainingJob, secret: &str, data: BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(secret.into()),
            namespace: job.metadata.namespace.clone(),
            labels: Some(common_labels(job)),
            owner_references: Some(vec![owner(job)]),
            ..Default::default()
        },
        string_data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// The value under `key` in a Secret (as read back, or as written).
pub fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key).cloned())
        })
}

/// The token in a job's Secret.
pub fn token_of(secret: &Secret) -> Option<String> {
    secret_value(secret, TOKEN_KEY)
}

/// The pod of `replica`; `gated` holds it from scheduling; `progress` tells
/// its trainer where to report.
pub fn pod(
    job: &TrainingJob,
    replica: &Replica,
    gated: bool,
    progress: Option<&ProgressEnv>,
) -> Pod {
    let spec = &job.spec;
    let t = &spec.template;
    let mut pod_labels = t.labels.clone();
    pod_labels.extend(common_labels(job));
    pod_labels.insert(
        "app.kubernetes.io/component".into(),
        replica.role.as_str().into(),
    );
    pod_labels.insert(labels::REPLICA_ROLE.into(), replica.role.as_str().into());
    pod_labels.insert(labels::REPLICA_INDEX.into(), replica.index.to_string());
    pod_labels.insert(labels::ATTEMPT.into(), replica.attempt.to_string());

    let mut resources = spec.resources.clone().unwrap_or_default();
    if replica.gpus > 0 {
        let gpus = Quantity(replica.gpus.to_string());
        resources
            .limits
            .get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.into(), gpus.clone());
        resources
            .requests
            .get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.into(), gpus);
    }
    let mut volumes = t.volumes.clone();
    // NCCL and the data loaders need more than the 64 MiB default /dev/shm.
    volumes.push(Volume {
        name: "dshm".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut mounts = t.volume_mounts.clone();
    mounts.push(VolumeMount {
        name: "dshm".into(),
        mount_path: "/dev/shm".into(),
        ..Default::default()
    });
    // The root filesystem is read-only: what the trainer writes needs a
    // mount. The run directory is the user's volume when they mount one at
    // (or above) checkpoints.location, else an emptyDir (a restart of the
    // pod then starts over, as it did on the container's own layer).
    let covered = |path: &str| {
        let path = path.trim_end_matches('/');
        t.volume_mounts.iter().any(|m| {
            let at = m.mount_path.trim_end_matches('/');
            path == at || path.starts_with(&format!("{at}/"))
        })
    };
    let scratch = [
        ("trainyard-tmp", "/tmp"),
        ("trainyard-run", spec.checkpoints.location.as_str()),
    ];
    for (volume, path) in scratch.into_iter().filter(|(_, path)| !covered(path)) {
        volumes.push(Volume {
            name: volume.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: volume.into(),
            mount_path: path.into(),
            ..Default::default()
        });
    }
    for (i, (secret, path)) in replica.secret_mounts.iter().enumerate() {
        let name = format!("trainyard-secret-{i}");
        volumes.push(Volume {
            name: name.clone(),
            secret: Some(k8s_openapi::api::core::v1::SecretVolumeSource {
                secret_name: Some(secret.clone()),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name,
            mount_path: path.clone(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let ports: Vec<ContainerPort> = replica
        .ports
        .iter()
        .map(|(name, port)| ContainerPort {
            name: Some(name.clone()),
            container_port: i32::from(*port),
            protocol: Some("TCP".into()),
            ..Default::default()
        })
        .collect();
    let mut env = replica.env.clone();
    if let Some(p) = progress {
        env.push(EnvVar {
            name: trainyard_trainer::env::PROGRESS_URL.into(),
            value: Some(p.url.clone()),
            value_from: None,
        });
        env.push(EnvVar {
            name: trainyard_trainer::env::PROGRESS_TOKEN.into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: p.secret.clone(),
                    key: TOKEN_KEY.into(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
        });
    }
    let container = Container {
        name: CONTAINER.into(),
        image: Some(spec.image.clone()),
        command: Some(vec!["trainyard-trainer".into()]),
        args: Some(replica.args.clone()),
        env: Some(env),
        resources: Some(ResourceRequirements {
            claims: None,
            ..resources
        }),
        ports: (!ports.is_empty()).then_some(ports),
        volume_mounts: Some(mounts),
        security_context: Some(
            t.container_security_context
                .clone()
                .unwrap_or_else(restricted_container),
        ),
        ..Default::default()
    };
    let name = job.metadata.name.clone().unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            name: Some(replica.name.clone()),
            namespace: job.metadata.namespace.clone(),
            labels: Some(pod_labels),
            annotations: (!t.annotations.is_empty()).then(|| t.annotations.clone()),
            owner_references: Some(vec![owner(job)]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            // Restarts are the planner's (whole gang, from a checkpoint),
            // never the kubelet's.
            restart_policy: Some("Never".into()),
            // `<pod>.<job>.<namespace>.svc` through the job's headless Service.
            hostname: Some(replica.name.clone()),
            subdomain: Some(name),
            // Trainers need no Service env vars; with many Services they only slow start-up.
            enable_service_links: Some(false),
            scheduling_gates: gated.then(|| {
                vec![PodSchedulingGate {
                    name: GANG_GATE.into(),
                }]
            }),
            scheduler_name: t.scheduler_name.clone(),
            priority_class_name: t.priority_class_name.clone(),
            service_account_name: t.service_account_name.clone(),
            node_selector: (!t.node_selector.is_empty()).then(|| t.node_selector.clone()),
            tolerations: (!t.tolerations.is_empty()).then(|| t.tolerations.clone()),
            affinity: t.affinity.clone(),
            image_pull_secrets: (!t.image_pull_secrets.is_empty())
                .then(|| t.image_pull_secrets.clone()),
            volumes: Some(volumes),
            containers: vec![container],
            security_context: Some(t.security_context.clone().unwrap_or_else(restricted_pod)),
            automount_service_account_token: Some(
                t.automount_service_account_token.unwrap_or(false),
            ),
            ..Default::default()
        }),
        status: None,
    }
}

/// The user (and group) of the trainer images.
pub const TRAINER_UID: i64 = 65532;

/// Pod Security `restricted`, pod level: non-root as the images' user,
/// volumes group-owned by it, the runtime's default seccomp profile.
fn restricted_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(TRAINER_UID),
        run_as_group: Some(TRAINER_UID),
        fs_group: Some(TRAINER_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// Pod Security `restricted`, container level, and a read-only root.
fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// The job's headless Service: stable DNS names for every replica, published
/// before readiness so the gang can rendezvous while starting.
pub fn service(job: &TrainingJob, leader: &Replica) -> Service {
    let ports: Vec<ServicePort> = leader
        .ports
        .iter()
        .map(|(name, port)| ServicePort {
            name: Some(name.clone()),
            port: i32::from(*port),
            protocol: Some("TCP".into()),
            ..Default::default()
        })
        .collect();
    let name = job.metadata.name.clone().unwrap_or_default();
    Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: job.metadata.namespace.clone(),
            labels: Some(common_labels(job)),
            owner_references: Some(vec![owner(job)]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(BTreeMap::from([(labels::JOB_NAME.into(), name)])),
            ports: (!ports.is_empty()).then_some(ports),
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::validate::parse_manifests;
    use crate::plan::{Placement, replicas};

    fn job(extra: &str) -> TrainingJob {
        let mut j = parse_manifests(&format!(
            "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: seg, namespace: ml}}\nspec:\n  mode: Distributed\n  image: reg/trainer:1\n  distributed: {{workers: 2}}\n{extra}"
        ))
        .unwrap()
        .remove(0);
        j.metadata.uid = Some("uid-1".into());
        j
    }

    #[test]
    fn pods_carry_identity_env_gate_and_owner() {
        let j = job(
            "  template:\n    labels: {team: vision, trainyard.dev/attempt: spoof}\n    nodeSelector: {pool: cpu}\n",
        );
        let rs = replicas::desired(&crate::job::facts(&j), 3, &Placement::Kubernetes);
        let p = pod(&j, &rs[1], true, None);
        let labels = p.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "vision");
        assert_eq!(labels[labels::ATTEMPT], "3", "our labels win");
        assert_eq!(labels[labels::REPLICA_INDEX], "1");
        assert_eq!(labels[labels::JOB_NAME], "seg");
        let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("TrainingJob", "uid-1")
        );
        assert_eq!(owner.controller, Some(true));
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.hostname.as_deref(), Some("seg-worker-1"));
        assert_eq!(spec.subdomain.as_deref(), Some("seg"));
        assert_eq!(spec.scheduling_gates.as_ref().unwrap()[0].name, GANG_GATE);
        assert_eq!(spec.node_selector.as_ref().unwrap()["pool"], "cpu");
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("reg/trainer:1"));
        assert_eq!(c.args.as_ref().unwrap()[0], "train");
        assert!(
            c.env
                .as_ref()
                .unwrap()
                .iter()
                .any(|e| e.name == "RANK" && e.value.as_deref() == Some("1"))
        );
        let shm = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "dshm")
            .unwrap();
        assert_eq!(
            shm.empty_dir.as_ref().unwrap().medium.as_deref(),
            Some("Memory")
        );
        assert!(
            pod(&j, &rs[1], false, None)
                .spec
                .unwrap()
                .scheduling_gates
                .is_none()
        );
    }

    #[test]
    fn pods_meet_the_restricted_profile_unless_the_template_says_otherwise() {
        let j = job("");
        let rs = replicas::desired(&crate::job::facts(&j), 0, &Placement::Kubernetes);
        let spec = pod(&j, &rs[0], false, None).spec.unwrap();
        let sc = spec.security_context.as_ref().unwrap();
        assert_eq!(
            (sc.run_as_non_root, sc.run_as_user, sc.fs_group),
            (Some(true), Some(TRAINER_UID), Some(TRAINER_UID))
        );
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        assert_eq!(spec.automount_service_account_token, Some(false));
        let c = spec.containers[0].security_context.as_ref().unwrap();
        assert_eq!(c.allow_privilege_escalation, Some(false));
        assert_eq!(c.read_only_root_filesystem, Some(true));
        assert_eq!(
            c.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        let mounts = |c: &Container| -> Vec<String> {
            c.volume_mounts
                .iter()
                .flatten()
                .map(|m| m.mount_path.clone())
                .collect()
        };
        // What a read-only root leaves writable: /tmp and the run directory.
        assert_eq!(
            mounts(&spec.containers[0]),
            ["/dev/shm", "/tmp", "/var/lib/trainyard/run"]
        );

        let j = job(
            "  checkpoints: {location: /ckpt/runs}\n  template:\n    securityContext: {runAsUser: 1000}\n    containerSecurityContext: {readOnlyRootFilesystem: false}\n    automountServiceAccountToken: true\n    volumes: [{name: ckpt, persistentVolumeClaim: {claimName: c}}]\n    volumeMounts: [{name: ckpt, mountPath: /ckpt}]\n",
        );
        let rs = replicas::desired(&crate::job::facts(&j), 0, &Placement::Kubernetes);
        let spec = pod(&j, &rs[0], false, None).spec.unwrap();
        assert_eq!(
            spec.security_context.as_ref().unwrap().run_as_user,
            Some(1000)
        );
        assert_eq!(spec.automount_service_account_token, Some(true));
        let c = &spec.containers[0];
        assert_eq!(
            c.security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(false)
        );
        assert_eq!(
            mounts(c),
            ["/ckpt", "/dev/shm", "/tmp"],
            "the user's volume holds the run directory"
        );
    }

    #[test]
    fn gang_schedulers_gate_for_themselves() {
        assert!(gang_gated(&job("")));
        assert!(!gang_gated(&job("  template: {schedulerName: volcano}\n")));
    }

    #[test]
    fn gpus_become_limits_and_requests() {
        let j = job("");
        let mut r = replicas::desired(&crate::job::facts(&j), 0, &Placement::Kubernetes).remove(0);
        r.gpus = 2;
        let p = pod(&j, &r, true, None);
        let res = p.spec.unwrap().containers[0].resources.clone().unwrap();
        assert_eq!(res.limits.unwrap()[GPU_RESOURCE].0, "2");
        assert_eq!(res.requests.unwrap()[GPU_RESOURCE].0, "2");
    }

    #[test]
    fn the_service_is_headless_and_publishes_unready_pods() {
        let j = job("");
        let rs = replicas::desired(&crate::job::facts(&j), 0, &Placement::Kubernetes);
        let s = service(&j, &rs[0]);
        let spec = s.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.selector.unwrap()[labels::JOB_NAME], "seg");
        assert!(spec.ports.unwrap().iter().any(|p| p.port == 29500));
    }
}
