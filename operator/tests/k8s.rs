//! The Kubernetes side without a cluster: `reconcile` against a fake API
//! server (a tower service behind kube's `Client`) that records every
//! request and keeps pods, the Service and the job's status in memory.
//! Tests drive a job's whole life by changing pod states between reconciles.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use trainyard::api::TrainingJob;
use trainyard::k8s::{self, Context};

#[derive(Default)]
struct World {
    job: Value,
    pods: BTreeMap<String, Value>,
    services: BTreeMap<String, Value>,
    events: Vec<Value>,
    requests: Vec<String>,
    job_deleted: bool,
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn not_found(name: &str) -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("{name} not found"), "reason": "NotFound", "code": 404}),
    )
}

async fn handle(world: Arc<Mutex<World>>, req: Request<Body>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = req.into_body().collect_bytes().await.unwrap();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap()
    };
    let mut w = world.lock().unwrap();
    w.requests.push(format!("{method} {path}"));
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["api", "v1", "namespaces", _, "pods"]) => {
            let items: Vec<Value> = w.pods.values().cloned().collect();
            respond(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}),
            )
        }
        ("PATCH", ["api", "v1", "namespaces", _, "pods", name]) => {
            let name = name.to_string();
            let pod = match w.pods.get(&name) {
                // Server-side apply by the only manager: its spec is what it applied.
                Some(existing) => {
                    let mut pod = existing.clone();
                    pod["spec"] = body["spec"].clone();
                    pod
                }
                None => {
                    let mut pod = body.clone();
                    pod["metadata"]["uid"] = json!(format!("pod-{name}"));
                    pod["status"] = json!({"phase": "Pending"});
                    pod
                }
            };
            w.pods.insert(name, pod.clone());
            respond(StatusCode::OK, &pod)
        }
        ("DELETE", ["api", "v1", "namespaces", _, "pods", name]) => match w.pods.remove(*name) {
            Some(pod) => respond(StatusCode::OK, &pod),
            None => not_found(name),
        },
        ("PATCH", ["api", "v1", "namespaces", _, "services", name]) => {
            w.services.insert(name.to_string(), body.clone());
            respond(StatusCode::OK, &body)
        }
        ("POST" | "PATCH", ["apis", "events.k8s.io", "v1", "namespaces", _, "events", ..]) => {
            w.events.push(body.clone());
            respond(StatusCode::CREATED, &body)
        }
        (
            "PATCH",
            [
                "apis",
                "trainyard.dev",
                "v1alpha1",
                "namespaces",
                _,
                "trainingjobs",
                _,
                "status",
            ],
        ) => {
            w.job["status"] = body["status"].clone();
            let job = w.job.clone();
            respond(StatusCode::OK, &job)
        }
        (
            "DELETE",
            [
                "apis",
                "trainyard.dev",
                "v1alpha1",
                "namespaces",
                _,
                "trainingjobs",
                _,
            ],
        ) => {
            w.job_deleted = true;
            let job = w.job.clone();
            respond(StatusCode::OK, &job)
        }
        _ => panic!("unexpected request {method} {path}"),
    }
}

struct Harness {
    world: Arc<Mutex<World>>,
    ctx: Arc<Context>,
}

impl Harness {
    fn new(spec_extra: &str) -> Self {
        let manifest = format!(
            "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: seg, namespace: ml, uid: job-uid, generation: 1}}\nspec:\n  mode: Distributed\n  image: reg/trainer:1\n  distributed: {{workers: 2}}\n{spec_extra}"
        );
        let job = trainyard::api::validate::parse_manifests(&manifest)
            .unwrap()
            .remove(0);
        let world = Arc::new(Mutex::new(World {
            job: serde_json::to_value(&job).unwrap(),
            ..Default::default()
        }));
        Self::over(world)
    }

    /// A harness (an operator process) over an existing world.
    fn over(world: Arc<Mutex<World>>) -> Self {
        let w = world.clone();
        let service = tower::service_fn(move |req| {
            let w = w.clone();
            async move { Ok::<_, Infallible>(handle(w, req).await) }
        });
        let client = Client::new(service, "ml");
        Self {
            world,
            ctx: Arc::new(Context::new(client, Some("test".into()))),
        }
    }

    /// Reconciles the job as the API server has it now; returns the requests made.
    async fn reconcile(&self) -> Vec<String> {
        let job: TrainingJob = {
            let mut w = self.world.lock().unwrap();
            w.requests.clear();
            serde_json::from_value(w.job.clone()).unwrap()
        };
        k8s::reconcile(Arc::new(job), self.ctx.clone())
            .await
            .expect("reconcile succeeds");
        let w = self.world.lock().unwrap();
        w.requests
            .iter()
            .filter(|r| !r.contains("/events"))
            .cloned()
            .collect()
    }

    fn status(&self) -> Value {
        self.world.lock().unwrap().job["status"].clone()
    }

    fn pods(&self) -> Vec<String> {
        self.world.lock().unwrap().pods.keys().cloned().collect()
    }

    fn set_pod(&self, name: &str, status: Value) {
        let mut w = self.world.lock().unwrap();
        w.pods.get_mut(name).expect("pod exists")["status"] = status;
    }

    fn gated(&self, name: &str) -> bool {
        let w = self.world.lock().unwrap();
        w.pods[name]["spec"]["schedulingGates"]
            .as_array()
            .is_some_and(|g| !g.is_empty())
    }

    fn event_reasons(&self) -> Vec<String> {
        let w = self.world.lock().unwrap();
        w.events
            .iter()
            .filter_map(|e| e["reason"].as_str().map(String::from))
            .collect()
    }
}

fn running() -> Value {
    json!({"phase": "Running", "containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": true, "restartCount": 0, "state": {"running": {}}}]})
}

fn exited(code: i32) -> Value {
    let phase = if code == 0 { "Succeeded" } else { "Failed" };
    json!({"phase": phase, "containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": code}}}]})
}

const PODS: &str = "/api/v1/namespaces/ml/pods";

#[tokio::test]
async fn a_jobs_whole_life_gang_start_restart_success_cleanup() {
    let h = Harness::new("");
    // Creation: the Service, then both pods, gated, then the status.
    let requests = h.reconcile().await;
    assert_eq!(
        requests,
        [
            format!("GET {PODS}"),
            "PATCH /api/v1/namespaces/ml/services/seg".into(),
            format!("PATCH {PODS}/seg-worker-0"),
            format!("PATCH {PODS}/seg-worker-1"),
            "PATCH /apis/trainyard.dev/v1alpha1/namespaces/ml/trainingjobs/seg/status".into(),
        ]
    );
    assert!(h.gated("seg-worker-0") && h.gated("seg-worker-1"));
    assert_eq!(h.status()["phase"], "Pending");
    let service = h.world.lock().unwrap().services["seg"].clone();
    assert_eq!(service["spec"]["publishNotReadyAddresses"], true);
    assert_eq!(service["spec"]["clusterIP"], "None");

    // The whole gang exists: the gates come off together.
    let requests = h.reconcile().await;
    assert!(requests.contains(&format!("PATCH {PODS}/seg-worker-0")));
    assert!(requests.contains(&format!("PATCH {PODS}/seg-worker-1")));
    assert!(!h.gated("seg-worker-0") && !h.gated("seg-worker-1"));

    // One pod running is not a running job.
    h.set_pod("seg-worker-0", running());
    h.reconcile().await;
    assert_eq!(h.status()["phase"], "Pending");
    h.set_pod("seg-worker-1", running());
    h.reconcile().await;
    assert_eq!(h.status()["phase"], "Running");
    assert_eq!(h.status()["replicas"]["ready"], 2);

    // A killed worker restarts the whole gang.
    h.set_pod("seg-worker-1", exited(137));
    let requests = h.reconcile().await;
    assert!(requests.contains(&format!("DELETE {PODS}/seg-worker-0")));
    assert!(requests.contains(&format!("DELETE {PODS}/seg-worker-1")));
    assert_eq!(h.status()["phase"], "Restarting");
    assert_eq!(h.status()["restarts"], 1);
    assert!(h.pods().is_empty());

    // After the backoff, attempt 1 starts with the same stable names.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.reconcile().await;
    assert_eq!(h.status()["phase"], "Pending");
    assert_eq!(h.status()["attempt"], 1);
    assert_eq!(h.pods(), ["seg-worker-0", "seg-worker-1"]);
    let attempt =
        h.world.lock().unwrap().pods["seg-worker-0"]["metadata"]["labels"]["trainyard.dev/attempt"]
            .clone();
    assert_eq!(attempt, "1");
    h.reconcile().await;
    h.set_pod("seg-worker-0", running());
    h.set_pod("seg-worker-1", running());
    h.reconcile().await;
    assert_eq!(h.status()["phase"], "Running");

    // Rank 0 finishes: success, and still-running pods are cleaned up
    // (cleanPodPolicy Running keeps finished ones for their logs).
    h.set_pod("seg-worker-0", exited(0));
    let requests = h.reconcile().await;
    assert_eq!(h.status()["phase"], "Succeeded");
    assert!(requests.contains(&format!("DELETE {PODS}/seg-worker-1")));
    assert_eq!(h.pods(), ["seg-worker-0"]);
    assert_eq!(h.status()["restarts"], 1, "the restart count survived");

    let reasons = h.event_reasons();
    for r in [
        "Creating",
        "GangRunning",
        "ReplicaFailed",
        "Restarted",
        "Completed",
    ] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no {r} event in {reasons:?}"
        );
    }
}

#[tokio::test]
async fn a_bad_image_fails_the_job_naming_the_pod() {
    let h = Harness::new("");
    h.reconcile().await;
    h.reconcile().await;
    h.set_pod(
        "seg-worker-1",
        json!({"phase": "Pending", "containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ErrImagePull", "message": "manifest unknown"}}}]}),
    );
    let requests = h.reconcile().await;
    let status = h.status();
    assert_eq!(status["phase"], "Failed");
    assert_eq!(status["reason"], "ImagePullFailed");
    let message = status["message"].as_str().unwrap();
    assert!(
        message.contains("seg-worker-1") && message.contains("manifest unknown"),
        "{message}"
    );
    assert!(requests.contains(&format!("DELETE {PODS}/seg-worker-0")));
    assert!(h.pods().is_empty());
}

#[tokio::test]
async fn a_gang_that_does_not_start_in_time_is_torn_down_and_retried() {
    let h = Harness::new("  runPolicy: {startupTimeoutSeconds: 1}\n");
    h.reconcile().await;
    h.set_pod("seg-worker-0", running());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.reconcile().await;
    let status = h.status();
    assert_eq!(status["phase"], "Restarting");
    assert_eq!(status["reason"], "StartupTimeout");
    assert!(h.pods().is_empty());
}

#[tokio::test]
async fn a_restarted_operator_creates_no_duplicates() {
    let h = Harness::new("");
    h.reconcile().await;
    h.reconcile().await;
    h.set_pod("seg-worker-0", running());
    h.set_pod("seg-worker-1", running());
    h.reconcile().await;
    // A new client and context is a restarted operator: it sees the same world.
    let fresh = Harness::over(h.world.clone());
    let requests = fresh.reconcile().await;
    assert!(
        requests
            .iter()
            .all(|r| !r.starts_with("PATCH /api/v1/namespaces/ml/pods")),
        "{requests:?}"
    );
    assert_eq!(fresh.status()["phase"], "Running");
}
