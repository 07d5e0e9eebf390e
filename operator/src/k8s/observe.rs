//! What a job's pods say, in the planner's terms. Pure.

use k8s_openapi::api::core::v1::Pod;

use super::resources::{CONTAINER, GANG_GATE, labels};
use crate::plan::{ObservedReplica, ReplicaState};

/// The replica a pod is, or `None` for a pod that is not one of ours.
pub fn replica(pod: &Pod) -> Option<ObservedReplica> {
    let name = pod.metadata.name.clone()?;
    let attempt = pod
        .metadata
        .labels
        .as_ref()?
        .get(labels::ATTEMPT)?
        .parse()
        .ok()?;
    Some(ObservedReplica {
        name,
        attempt,
        state: state(pod),
    })
}

/// Whether the pod still waits for the gang gate.
pub fn is_gated(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.name == GANG_GATE))
}

fn state(pod: &Pod) -> ReplicaState {
    let status = pod.status.as_ref();
    let container = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == CONTAINER));
    let terminated = container
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    match status.and_then(|s| s.phase.as_deref()) {
        Some("Succeeded") => ReplicaState::Succeeded,
        Some("Failed") => ReplicaState::Failed {
            exit_code: terminated.map(|t| t.exit_code),
            // OOMKilled, Error, or the pod's own reason (Evicted, ...).
            reason: terminated
                .and_then(|t| t.reason.clone())
                .or_else(|| status.and_then(|s| s.reason.clone())),
        },
        Some("Running") => {
            if let Some(t) = terminated {
                // The container exited; the pod phase lags behind.
                return if t.exit_code == 0 {
                    ReplicaState::Succeeded
                } else {
                    ReplicaState::Failed {
                        exit_code: Some(t.exit_code),
                        reason: t.reason.clone(),
                    }
                };
            }
            ReplicaState::Running
        }
        // The node stopped reporting: the replica is as good as gone.
        Some("Unknown") => ReplicaState::Failed {
            exit_code: None,
            reason: Some("NodeLost".into()),
        },
        _ => {
            let waiting = container
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.waiting.as_ref());
            let unschedulable = status.and_then(|s| s.conditions.as_ref()).and_then(|cs| {
                cs.iter().find(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
            });
            match (waiting, unschedulable) {
                (Some(w), _) => ReplicaState::Pending {
                    reason: w.reason.clone(),
                    message: w.message.clone(),
                },
                (None, Some(c)) => ReplicaState::Pending {
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                },
                (None, None) => ReplicaState::Pending {
                    reason: is_gated(pod).then(|| "SchedulingGated".into()),
                    message: None,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "j-worker-0", "labels": {labels::ATTEMPT: "2"}},
            "spec": {"containers": [{"name": "trainer"}]},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn phases_and_container_states_map_to_replica_states() {
        let cases = [
            (
                serde_json::json!({"phase": "Running"}),
                ReplicaState::Running,
            ),
            (
                serde_json::json!({"phase": "Succeeded"}),
                ReplicaState::Succeeded,
            ),
            (
                serde_json::json!({"phase": "Failed", "containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}),
                ReplicaState::Failed {
                    exit_code: Some(137),
                    reason: Some("OOMKilled".into()),
                },
            ),
            (
                serde_json::json!({"phase": "Failed", "reason": "Evicted"}),
                ReplicaState::Failed {
                    exit_code: None,
                    reason: Some("Evicted".into()),
                },
            ),
            (
                serde_json::json!({"phase": "Running", "containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 75}}}]}),
                ReplicaState::Failed {
                    exit_code: Some(75),
                    reason: None,
                },
            ),
            (
                serde_json::json!({"phase": "Pending", "containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}]}),
                ReplicaState::Pending {
                    reason: Some("ImagePullBackOff".into()),
                    message: Some("not found".into()),
                },
            ),
            (
                serde_json::json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes"}]}),
                ReplicaState::Pending {
                    reason: Some("Unschedulable".into()),
                    message: Some("0/3 nodes".into()),
                },
            ),
            (
                serde_json::json!({"phase": "Unknown"}),
                ReplicaState::Failed {
                    exit_code: None,
                    reason: Some("NodeLost".into()),
                },
            ),
        ];
        for (status, want) in cases {
            let r = replica(&pod(status.clone())).unwrap();
            assert_eq!(r.attempt, 2);
            assert_eq!(r.state, want, "{status}");
        }
    }

    #[test]
    fn foreign_pods_are_not_replicas() {
        let p: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap();
        assert!(replica(&p).is_none());
    }
}
