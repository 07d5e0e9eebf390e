//! The Kubernetes side without a cluster: `reconcile` against a fake API
//! server (a tower service behind kube's `Client`) that records every
//! request and keeps pods, the Service and the job's status in memory.
//! Tests drive a job's whole life by changing pod states between reconciles.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::client::Body;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use trainyard::api::TrainingJob;
use trainyard::k8s::{self, Children, Context};

#[derive(Default)]
struct World {
    job: Value,
    pods: BTreeMap<String, Value>,
    services: BTreeMap<String, Value>,
    secrets: BTreeMap<String, Value>,
    events: Vec<Value>,
    requests: Vec<String>,
    /// The job is gone from the API server (deleted, no finalizer left).
    job_deleted: bool,
    /// Every write to the job bumps its resourceVersion, as on a real server.
    job_version: u64,
}

impl World {
    /// A write to the job: a new resourceVersion; a job being deleted whose
    /// last finalizer went is gone.
    fn job_written(&mut self) {
        self.job_version += 1;
        self.job["metadata"]["resourceVersion"] = json!(self.job_version.to_string());
        let finalizers = self.job["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if !self.job["metadata"]["deletionTimestamp"].is_null() && !finalizers {
            self.job_deleted = true;
        }
    }
}

/// A refusal as the API server writes it: a `Status` object.
fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    respond(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn conflict(message: &str) -> Response<Body> {
    failure(StatusCode::CONFLICT, "Conflict", message)
}

/// Every (API group, resource, verb) any fake API server in this file was
/// asked for, as RBAC authorises it.
static ACCESS: Mutex<std::collections::BTreeSet<(String, String, String)>> =
    Mutex::new(std::collections::BTreeSet::new());

/// Records a request as the API server's authoriser sees it: a collection
/// GET is `list` (`watch` with ?watch), a named GET `get`, POST `create`,
/// PUT `update`, DELETE `delete`, and PATCH `patch` (a server-side apply can
/// create its object, which is authorised as `create` too).
fn record_access(method: &http::Method, query: &str, path: &str, content_type: &str) {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("not an API path: {path}"),
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => panic!("unexpected API path {path}"),
    };
    let verbs: &[&str] = match (method.as_str(), named) {
        ("GET", false) if query.contains("watch=") => &["watch"],
        ("GET", false) => &["list"],
        ("GET", true) => &["get"],
        ("POST", _) => &["create"],
        ("PUT", _) => &["update"],
        ("DELETE", _) => &["delete"],
        // A subresource (status) cannot be created by an apply.
        ("PATCH", _)
            if content_type.starts_with("application/apply-patch") && !resource.contains('/') =>
        {
            &["patch", "create"]
        }
        ("PATCH", _) => &["patch"],
        (m, _) => panic!("unexpected method {m}"),
    };
    let mut access = ACCESS.lock().unwrap();
    for verb in verbs {
        access.insert((group.to_string(), resource.clone(), verb.to_string()));
    }
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn not_found(name: &str) -> Response<Body> {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{name} not found"),
    )
}

async fn handle(world: Arc<Mutex<World>>, req: Request<Body>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = req.into_body().collect_bytes().await.unwrap();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap()
    };
    record_access(&method, &query, &path, &content_type);
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
            if let Err(why) = restricted(&body) {
                return failure(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!(
                        "pods \"{name}\" is forbidden: violates PodSecurity \"restricted:latest\": {why}"
                    ),
                );
            }
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
        ("GET", ["api", "v1", "namespaces", _, "secrets", name]) => match w.secrets.get(*name) {
            Some(s) => respond(StatusCode::OK, s),
            None => not_found(name),
        },
        ("POST", ["api", "v1", "namespaces", _, "secrets"]) => {
            let name = body["metadata"]["name"].as_str().unwrap().to_string();
            if w.secrets.contains_key(&name) {
                return conflict("already exists");
            }
            let mut secret = body.clone();
            secret["metadata"]["uid"] = json!(format!("secret-{name}-{}", w.requests.len()));
            w.secrets.insert(name, secret.clone());
            respond(StatusCode::CREATED, &secret)
        }
        ("DELETE", ["api", "v1", "namespaces", _, "secrets", name]) => {
            let Some(secret) = w.secrets.get(*name) else {
                return not_found(name);
            };
            let precondition = &body["preconditions"]["uid"];
            if !precondition.is_null() && *precondition != secret["metadata"]["uid"] {
                return conflict("the uid precondition failed");
            }
            let secret = w.secrets.remove(*name).unwrap();
            respond(StatusCode::OK, &secret)
        }
        ("PATCH", ["api", "v1", "namespaces", _, "services", name]) => {
            w.services.insert(name.to_string(), body.clone());
            respond(StatusCode::OK, &body)
        }
        ("PATCH", ["api", "v1", "namespaces", _, "secrets", name]) => {
            // A JSON merge patch of stringData, as the operator sends.
            let Some(secret) = w.secrets.get_mut(*name) else {
                return not_found(name);
            };
            for (k, v) in body["stringData"].as_object().cloned().unwrap_or_default() {
                secret["stringData"][k] = v;
            }
            let secret = secret.clone();
            respond(StatusCode::OK, &secret)
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
            // An apply that names a resourceVersion is conditional on it.
            let version = &body["metadata"]["resourceVersion"];
            if !version.is_null() && *version != w.job["metadata"]["resourceVersion"] {
                return conflict(
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            w.job["status"] = body["status"].clone();
            w.job_written();
            let job = w.job.clone();
            respond(StatusCode::OK, &job)
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
            ],
        ) => {
            // The JSON patches of kube-runtime's finalizer helper; a failed
            // `test` operation is refused as the API server refuses it.
            assert!(
                content_type.starts_with("application/json-patch"),
                "{content_type}"
            );
            let mut ops: json_patch::Patch = serde_json::from_value(body).unwrap();
            // The API server's JSON patch (evanphx/json-patch) reads a
            // missing member as null in a `test`; json-patch refuses it.
            let job_now = w.job.clone();
            ops.0.retain(|op| match op {
                json_patch::PatchOperation::Test(t) => {
                    !(t.value.is_null() && t.path.resolve(&job_now).is_err())
                }
                _ => true,
            });
            let mut job = w.job.clone();
            if let Err(e) = json_patch::patch(&mut job, &ops) {
                return failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e.to_string());
            }
            w.job = job;
            w.job_written();
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
            // With finalizers the object stays, marked for deletion.
            if w.job["metadata"]["deletionTimestamp"].is_null() {
                w.job["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
            }
            w.job_written();
            let job = w.job.clone();
            respond(StatusCode::OK, &job)
        }
        _ => panic!("unexpected request {method} {path}"),
    }
}

/// Pod Security admission at `restricted`, as every namespace of this fake
/// enforces it (the checks of the restricted profile that a pod spec can
/// fail; a container's settings override the pod's).
fn restricted(pod: &Value) -> Result<(), String> {
    let spec = &pod["spec"];
    let pod_sc = &spec["securityContext"];
    for c in spec["containers"].as_array().into_iter().flatten() {
        let sc = &c["securityContext"];
        let either = |key: &str| {
            if sc[key].is_null() {
                pod_sc[key].clone()
            } else {
                sc[key].clone()
            }
        };
        if sc["allowPrivilegeEscalation"] != json!(false) {
            return Err("allowPrivilegeEscalation != false".into());
        }
        if !sc["capabilities"]["drop"]
            .as_array()
            .is_some_and(|d| d.contains(&json!("ALL")))
        {
            return Err("unrestricted capabilities".into());
        }
        if either("runAsNonRoot") != json!(true) {
            return Err("runAsNonRoot != true".into());
        }
        if either("runAsUser") == json!(0) {
            return Err("runAsUser=0".into());
        }
        let seccomp = either("seccompProfile");
        if !matches!(
            seccomp["type"].as_str(),
            Some("RuntimeDefault" | "Localhost")
        ) {
            return Err("seccompProfile".into());
        }
    }
    if spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| !v["hostPath"].is_null())
    {
        return Err("restricted volume types".into());
    }
    Ok(())
}

/// A world holding the one job of `manifest` (name, namespace and uid in
/// it), stored as the API server keeps it, and carrying the operator's
/// finalizer as every job does after its first reconcile.
fn world_of(manifest: &str) -> World {
    let job = trainyard::api::validate::parse_manifests(manifest)
        .unwrap()
        .remove(0);
    let mut job = serde_json::to_value(&job).unwrap();
    job["metadata"]["finalizers"] = json!([k8s::FINALIZER]);
    job["metadata"]["resourceVersion"] = json!("1");
    World {
        job,
        job_version: 1,
        ..Default::default()
    }
}

const FEDERATED: &str = "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: fl, namespace: ml, uid: job-uid, generation: 1}\nspec:\n  mode: Federated\n  image: reg/trainer:1\n  federated: {clients: 3, minClients: 2, rounds: 5}\n";

struct Harness {
    world: Arc<Mutex<World>>,
    ctx: Arc<Context>,
    /// Set when the operator reads children from caches: the test plays the
    /// watch, copying the world into them before each reconcile.
    caches: Option<Mutex<(Writer<Pod>, Writer<Service>)>>,
}

impl Harness {
    fn new(spec_extra: &str) -> Self {
        let manifest = format!(
            "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: seg, namespace: ml, uid: job-uid, generation: 1}}\nspec:\n  mode: Distributed\n  image: reg/trainer:1\n  distributed: {{workers: 2}}\n{spec_extra}"
        );
        Self::over(Arc::new(Mutex::new(world_of(&manifest))))
    }

    /// A harness (an operator process) over an existing world.
    fn over(world: Arc<Mutex<World>>) -> Self {
        Self::with(world, |ctx| ctx)
    }

    fn with(world: Arc<Mutex<World>>, setup: impl FnOnce(Context) -> Context) -> Self {
        let w = world.clone();
        let service = tower::service_fn(move |req| {
            let w = w.clone();
            async move { Ok::<_, Infallible>(handle(w, req).await) }
        });
        let client = Client::new(service, "ml");
        Self {
            world,
            ctx: Arc::new(setup(Context::new(client, Some("test".into())))),
            caches: None,
        }
    }

    /// A harness whose operator reads pods and Services from reflector caches.
    fn cached(spec_extra: &str) -> Self {
        let mut h = Self::new(spec_extra);
        let (pods, services) = (Writer::default(), Writer::default());
        let children = Children {
            pods: pods.as_reader(),
            services: services.as_reader(),
        };
        let world = h.world.clone();
        h = Self::with(world, |ctx| ctx.with_children(children));
        h.caches = Some(Mutex::new((pods, services)));
        h
    }

    /// Delivers the world to the caches as a watch re-list would.
    fn sync_caches(&self) {
        let Some(caches) = &self.caches else { return };
        let (pods, services) = &mut *caches.lock().unwrap();
        let w = self.world.lock().unwrap();
        fn relist<K: Resource<DynamicType = ()> + Clone + DeserializeOwned>(
            writer: &mut Writer<K>,
            objects: impl Iterator<Item = Value>,
        ) {
            writer.apply_watcher_event(&watcher::Event::Init);
            for o in objects {
                let mut o = o;
                o["metadata"]["namespace"] = json!("ml");
                writer.apply_watcher_event(&watcher::Event::InitApply(
                    serde_json::from_value(o).unwrap(),
                ));
            }
            writer.apply_watcher_event(&watcher::Event::InitDone);
        }
        relist(pods, w.pods.values().cloned());
        relist(services, w.services.values().cloned());
    }

    /// Reconciles the job as the API server has it now; returns the requests made.
    async fn reconcile(&self) -> Vec<String> {
        let job = self.job();
        let (result, requests) = self.reconcile_as(job).await;
        result.expect("reconcile succeeds");
        requests
    }

    /// The job as the API server has it now.
    fn job(&self) -> TrainingJob {
        serde_json::from_value(self.world.lock().unwrap().job.clone()).unwrap()
    }

    /// Reconciles `job` as a cache may hold it (perhaps older than the
    /// API server's); returns the outcome and the requests made.
    async fn reconcile_as(
        &self,
        job: TrainingJob,
    ) -> (
        Result<kube::runtime::controller::Action, k8s::ReconcileError>,
        Vec<String>,
    ) {
        self.world.lock().unwrap().requests.clear();
        self.sync_caches();
        let result = k8s::reconcile(Arc::new(job), self.ctx.clone()).await;
        let w = self.world.lock().unwrap();
        let requests = w
            .requests
            .iter()
            .filter(|r| !r.contains("/events"))
            .cloned()
            .collect();
        (result, requests)
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
    whole_life(Harness::new(""), true).await;
}

#[tokio::test]
async fn a_jobs_whole_life_read_from_caches() {
    whole_life(Harness::cached(""), false).await;
}

async fn whole_life(h: Harness, lists: bool) {
    // Creation: the Service, then both pods, gated, then the status.
    let requests = h.reconcile().await;
    let list = lists.then(|| format!("GET {PODS}"));
    assert_eq!(
        requests,
        [
            list.into_iter().collect(),
            vec![
                "PATCH /api/v1/namespaces/ml/services/seg".into(),
                // The group secret the workers prove to each other, first.
                "GET /api/v1/namespaces/ml/secrets/seg-group".into(),
                "POST /api/v1/namespaces/ml/secrets".into(),
                format!("PATCH {PODS}/seg-worker-0"),
                format!("PATCH {PODS}/seg-worker-1"),
                "PATCH /apis/trainyard.dev/v1alpha1/namespaces/ml/trainingjobs/seg/status".into(),
            ]
        ]
        .concat()
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
    assert_eq!(
        h.world.lock().unwrap().secrets.len(),
        1,
        "the new gang reuses the job's group secret"
    );
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
async fn a_federated_job_gets_its_secret_and_restarts_a_client_alone() {
    federated_life().await
}

async fn federated_life() {
    let h = Harness::over(Arc::new(Mutex::new(world_of(FEDERATED))));
    h.reconcile().await;
    let secret = h.world.lock().unwrap().secrets["fl-federation"].clone();
    let data = &secret["stringData"];
    let master = data["secret"].as_str().unwrap();
    assert_eq!(master.len(), 64);
    for i in 0..3 {
        assert_eq!(
            data[format!("client-{i}")].as_str().unwrap(),
            trainyard_trainer::config::client_token(master, i)
        );
    }
    // Each client pod reads only its own key; only the aggregator the secret.
    let env_key = |pod: &str, var: &str| {
        let w = h.world.lock().unwrap();
        w.pods[pod]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == var)
            .map(|e| e["valueFrom"]["secretKeyRef"]["key"].clone())
    };
    assert_eq!(
        env_key("fl-client-2", "TRAINYARD_CLIENT_TOKEN"),
        Some(json!("client-2"))
    );
    assert_eq!(env_key("fl-client-2", "TRAINYARD_FEDERATION_SECRET"), None);
    assert_eq!(
        env_key("fl-aggregator-0", "TRAINYARD_FEDERATION_SECRET"),
        Some(json!("secret"))
    );
    h.reconcile().await;
    for p in h.pods() {
        h.set_pod(&p, running());
    }
    h.reconcile().await;
    assert_eq!(h.status()["phase"], "Running");
    // A killed client goes alone; the aggregator and the others stay.
    h.set_pod("fl-client-1", exited(137));
    let requests = h.reconcile().await;
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.starts_with("DELETE"))
            .collect::<Vec<_>>(),
        [&format!("DELETE {PODS}/fl-client-1")]
    );
    assert_eq!(h.status()["phase"], "Running");
    assert_eq!(h.status()["restarts"], 1);
    h.reconcile().await;
    assert!(h.pods().contains(&"fl-client-1".to_string()), "recreated");
    assert!(
        !h.gated("fl-client-1"),
        "a lone replica of a running job is not gated"
    );
}

/// A fine-tuning job on a cluster: the replica gets the LoRA section in its
/// config (base, rank, targets, saved modules), reports the adapter's
/// location, and the status carries it to the end.
#[tokio::test]
async fn a_peft_job_runs_to_success_and_reports_its_adapter() {
    peft_life().await
}

async fn peft_life() {
    use tower::ServiceExt;
    use trainyard::k8s::ProgressEndpoint;
    use trainyard::progress::{ProgressHub, router};
    let manifest = "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: ft, namespace: ml, uid: job-uid, generation: 1}\nspec:\n  mode: Peft\n  image: reg/trainer:1\n  model: {squeezeExcitation: true}\n  training: {steps: 100}\n  peft: {baseCheckpoint: /models/base.safetensors, rank: 8, alpha: 16, targetModules: [conv, fc1, fc2], modulesToSave: [head]}\n";
    let world = Arc::new(Mutex::new(world_of(manifest)));
    let hub = Arc::new(ProgressHub::new(None));
    let endpoint = ProgressEndpoint {
        url: "http://trainyard-operator.trainyard.svc:8081".into(),
        hub: hub.clone(),
    };
    let h = Harness::with(world, |ctx| ctx.with_progress(endpoint));
    h.reconcile().await;
    assert_eq!(h.pods(), ["ft-worker-0"]);
    let (config, token) = {
        let w = h.world.lock().unwrap();
        let env = w.pods["ft-worker-0"]["spec"]["containers"][0]["env"].clone();
        let config = env
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "TRAINYARD_CONFIG")
            .and_then(|e| e["value"].as_str())
            .map(|v| serde_json::from_str::<Value>(v).unwrap())
            .unwrap();
        let token = w.secrets["ft-progress"]["stringData"]["token"]
            .as_str()
            .unwrap()
            .to_string();
        (config, token)
    };
    let peft = &config["peft"];
    assert_eq!(peft["base"], "/models/base.safetensors");
    assert_eq!(peft["r"], 8);
    assert_eq!(peft["lora_alpha"], 16.0);
    assert_eq!(peft["target_modules"], json!(["conv", "fc1", "fc2"]));
    assert_eq!(peft["modules_to_save"], json!(["head"]));
    assert_eq!(config["model"]["squeeze_excitation"], true);

    h.reconcile().await;
    h.set_pod("ft-worker-0", running());
    h.reconcile().await;
    assert_eq!(h.status()["phase"], "Running");
    let adapter = "/checkpoints/ml/ft/adapter";
    let report = json!({"step": 100, "total_steps": 100, "loss": 0.3, "adapter": adapter});
    let post = http::Request::post("/v1/progress/ml/ft")
        .header("authorization", format!("Bearer {token}"))
        .body(axum::body::Body::from(report.to_string()))
        .unwrap();
    let answer = router(hub.clone()).oneshot(post).await.unwrap();
    assert_eq!(answer.status(), http::StatusCode::NO_CONTENT);
    h.reconcile().await;
    assert_eq!(h.status()["progress"]["adapter"], adapter);
    h.set_pod("ft-worker-0", exited(0));
    h.reconcile().await;
    let status = h.status();
    assert_eq!(status["phase"], "Succeeded");
    assert_eq!(status["progress"]["adapter"], adapter, "kept after the end");
}

#[tokio::test]
async fn a_gpu_job_becomes_supervised_pods_with_their_gpus() {
    let manifest = "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: seg, namespace: ml, uid: job-uid, generation: 1}\nspec:\n  mode: Distributed\n  image: reg/trainer:1\n  distributed: {workers: 2, gpusPerWorker: 2}\n";
    let h = Harness::over(Arc::new(Mutex::new(world_of(manifest))));
    h.reconcile().await;
    assert_eq!(h.pods(), ["seg-worker-0", "seg-worker-1"]);
    let w = h.world.lock().unwrap();
    let group = w.secrets["seg-group"]["stringData"]["secret"]
        .as_str()
        .unwrap();
    assert_eq!(
        group.len(),
        64,
        "a 256-bit group secret, made before the pods"
    );
    for (index, name) in ["seg-worker-0", "seg-worker-1"].iter().enumerate() {
        let spec = &w.pods[*name]["spec"];
        let container = &spec["containers"][0];
        let resources = &container["resources"];
        assert_eq!(resources["limits"]["nvidia.com/gpu"], "2", "{name}");
        assert_eq!(resources["requests"]["nvidia.com/gpu"], "2", "{name}");
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(
            args[..3],
            ["launch", "--", "train"],
            "{name}: the supervisor is the entrypoint"
        );
        let env = |key: &str| {
            container["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == key)
                .and_then(|e| e["value"].as_str())
                .map(str::to_owned)
        };
        assert_eq!(env("WORLD_SIZE").as_deref(), Some("4"), "{name}");
        assert_eq!(env("LOCAL_WORLD_SIZE").as_deref(), Some("2"), "{name}");
        assert_eq!(env("GROUP_RANK"), Some(index.to_string()), "{name}");
        assert_eq!(
            env("RANK"),
            None,
            "{name}: the supervisor sets each process's rank"
        );
        let config: Value = serde_json::from_str(&env("TRAINYARD_CONFIG").unwrap()).unwrap();
        assert_eq!(config["train"]["device"], "cuda");
        assert_eq!(config["train"]["backend"], "auto");
        let shm = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "dshm")
            .unwrap();
        assert_eq!(
            shm["emptyDir"]["medium"], "Memory",
            "NCCL needs a memory-backed /dev/shm"
        );
    }
}

#[tokio::test]
async fn with_caches_a_steady_running_job_costs_no_requests() {
    let h = Harness::cached("");
    h.reconcile().await;
    h.reconcile().await;
    h.set_pod("seg-worker-0", running());
    h.set_pod("seg-worker-1", running());
    h.reconcile().await;
    assert_eq!(h.status()["phase"], "Running");
    // No list, no Service re-apply, no unchanged status write.
    assert_eq!(h.reconcile().await, Vec::<String>::new());
}

#[tokio::test]
async fn a_job_recreated_under_the_same_name_ignores_cached_pods_of_its_predecessor() {
    let h = Harness::cached("");
    h.reconcile().await;
    {
        let mut w = h.world.lock().unwrap();
        for pod in w.pods.values_mut() {
            pod["metadata"]["ownerReferences"][0]["uid"] = json!("old-job-uid");
            pod["status"] = running();
        }
    }
    // The predecessor's pods (same names, running) are not this job's gang.
    h.reconcile().await;
    assert_eq!(h.status()["phase"], "Pending");
    assert_eq!(h.status()["replicas"]["ready"], 0);
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

#[tokio::test]
async fn trainers_report_progress_with_the_jobs_own_token() {
    progress_reports().await
}

async fn progress_reports() {
    use tower::ServiceExt;
    use trainyard::k8s::ProgressEndpoint;
    use trainyard::progress::{ProgressHub, router};
    let base = Harness::new("");
    let hub = Arc::new(ProgressHub::new(None));
    let endpoint = ProgressEndpoint {
        url: "http://trainyard-operator.trainyard.svc:8081".into(),
        hub: hub.clone(),
    };
    let h = Harness::with(base.world.clone(), |ctx| ctx.with_progress(endpoint));
    h.reconcile().await;
    let (token, env) = {
        let w = h.world.lock().unwrap();
        let token = w.secrets["seg-progress"]["stringData"]["token"]
            .as_str()
            .unwrap()
            .to_string();
        let env = w.pods["seg-worker-0"]["spec"]["containers"][0]["env"].clone();
        (token, env)
    };
    assert_eq!(token.len(), 64, "a 256-bit token");
    let env = env.as_array().unwrap();
    let url = env
        .iter()
        .find(|e| e["name"] == "TRAINYARD_PROGRESS_URL")
        .unwrap();
    assert_eq!(
        url["value"],
        "http://trainyard-operator.trainyard.svc:8081/v1/progress/ml/seg"
    );
    let tok = env
        .iter()
        .find(|e| e["name"] == "TRAINYARD_PROGRESS_TOKEN")
        .unwrap();
    assert_eq!(tok["valueFrom"]["secretKeyRef"]["name"], "seg-progress");
    assert!(
        tok.get("value").is_none(),
        "the token never appears in the pod spec"
    );

    h.reconcile().await;
    h.set_pod("seg-worker-0", running());
    h.set_pod("seg-worker-1", running());
    h.reconcile().await;
    let post = |token: &str| {
        http::Request::post("/v1/progress/ml/seg")
            .header("authorization", format!("Bearer {token}"))
            .body(axum::body::Body::from(
                r#"{"step": 42, "total_steps": 1000, "loss": 0.25, "samples_per_second": 180.0}"#,
            ))
            .unwrap()
    };
    let wrong = router(hub.clone()).oneshot(post("guess")).await.unwrap();
    assert_eq!(wrong.status(), http::StatusCode::UNAUTHORIZED);
    let ok = router(hub.clone()).oneshot(post(&token)).await.unwrap();
    assert_eq!(ok.status(), http::StatusCode::NO_CONTENT);
    h.reconcile().await;
    let status = h.status();
    assert_eq!(status["progress"]["step"], 42);
    assert_eq!(status["progress"]["loss"], 0.25);
    assert_eq!(status["progress"]["summary"], "4% 42/1000");
}

const JOB_PATH: &str = "/apis/trainyard.dev/v1alpha1/namespaces/ml/trainingjobs/seg";

/// A job the operator has never seen gets the finalizer and nothing else
/// (the patch's watch event brings the next reconcile); a job deleted
/// before that is never given one.
#[tokio::test]
async fn a_new_job_gets_the_finalizer_first_and_a_deleted_one_never() {
    let h = Harness::new("");
    let fresh = |h: &Harness| {
        let mut w = h.world.lock().unwrap();
        w.job["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("finalizers");
    };
    fresh(&h);
    assert_eq!(h.reconcile().await, [format!("PATCH {JOB_PATH}")]);
    assert_eq!(
        h.world.lock().unwrap().job["metadata"]["finalizers"],
        json!([k8s::FINALIZER])
    );
    assert!(h.pods().is_empty());
    assert!(!h.reconcile().await.is_empty(), "the next reconcile plans");

    let h = Harness::new("");
    fresh(&h);
    h.world.lock().unwrap().job["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
    assert_eq!(h.reconcile().await, Vec::<String>::new());
}

/// `kubectl delete` of a running job: the operator's finalizer holds the
/// object until the cleanup ran: the job's metric series and phase count,
/// its progress token and report are gone, and then so is the object.
#[tokio::test]
async fn a_deleted_job_is_cleaned_up_and_let_go() {
    deleted_job_life().await
}

async fn deleted_job_life() {
    use tower::ServiceExt;
    use trainyard::k8s::ProgressEndpoint;
    use trainyard::progress::{ProgressHub, router};
    let world = Arc::new(Mutex::new(world_of(
        "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: seg, namespace: ml, uid: job-uid, generation: 1}\nspec:\n  mode: Distributed\n  image: reg/trainer:1\n  distributed: {workers: 2}\n",
    )));
    let hub = Arc::new(ProgressHub::new(None));
    let endpoint = ProgressEndpoint {
        url: "http://op:8081".into(),
        hub: hub.clone(),
    };
    let h = Harness::with(world, |ctx| ctx.with_progress(endpoint));
    h.reconcile().await;
    h.reconcile().await;
    for p in h.pods() {
        h.set_pod(&p, running());
    }
    h.reconcile().await;
    let token = h.world.lock().unwrap().secrets["seg-progress"]["stringData"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let post = |token: &str| {
        http::Request::post("/v1/progress/ml/seg")
            .header("authorization", format!("Bearer {token}"))
            .body(axum::body::Body::from(
                r#"{"step": 7, "total_steps": 100, "loss": 0.5}"#,
            ))
            .unwrap()
    };
    let ok = router(hub.clone()).oneshot(post(&token)).await.unwrap();
    assert_eq!(ok.status(), http::StatusCode::NO_CONTENT);
    h.reconcile().await;
    let scrape = h.ctx.metrics.render(None);
    assert!(
        scrape.contains("trainyard_job_step{job_name=\"seg\",job_namespace=\"ml\"} 7"),
        "{scrape}"
    );
    assert!(scrape.contains("trainyard_jobs{mode=\"Distributed\",phase=\"Running\"} 1"));

    // kubectl delete: the API server marks it; the finalizer keeps it.
    {
        let mut w = h.world.lock().unwrap();
        w.job["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
        w.job_written();
        assert!(!w.job_deleted, "the finalizer holds the object");
    }
    let requests = h.reconcile().await;
    assert_eq!(
        requests,
        [format!("PATCH {JOB_PATH}")],
        "only the finalizer's removal"
    );
    assert!(h.world.lock().unwrap().job_deleted, "then it is gone");
    let scrape = h.ctx.metrics.render(None);
    assert!(!scrape.contains("trainyard_job_step{"), "{scrape}");
    assert!(!scrape.contains("trainyard_job_gang_restarts{"), "{scrape}");
    assert!(scrape.contains("trainyard_jobs{mode=\"Distributed\",phase=\"Running\"} 0"));
    assert_eq!(hub.latest("ml", "seg"), None);
    let late = router(hub.clone()).oneshot(post(&token)).await.unwrap();
    assert_eq!(
        late.status(),
        http::StatusCode::NOT_FOUND,
        "the token is forgotten"
    );
}

/// The restart race: after the operator restarted the gang (attempt 1),
/// a reconcile reads the job from a cache that has not seen that status
/// yet (Restarting, attempt 0). Nothing of the new gang is deleted: this
/// operator waits for its own write, and a fresh operator (no memory of
/// the write) keeps the new gang and has its stale status write refused.
#[tokio::test]
async fn a_stale_read_never_deletes_the_new_gang() {
    let h = Harness::cached("");
    h.reconcile().await;
    h.reconcile().await;
    for p in h.pods() {
        h.set_pod(&p, running());
    }
    h.reconcile().await;
    h.set_pod("seg-worker-1", exited(137));
    h.reconcile().await;
    assert_eq!(h.status()["phase"], "Restarting");
    let restarting = h.job();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.reconcile().await;
    assert_eq!(
        (h.status()["phase"].clone(), h.status()["attempt"].clone()),
        (json!("Pending"), json!(1))
    );
    assert_eq!(h.pods(), ["seg-worker-0", "seg-worker-1"]);

    let (result, requests) = h.reconcile_as(restarting.clone()).await;
    result.unwrap();
    assert_eq!(requests, Vec::<String>::new(), "it waits for the cache");

    let fresh = Harness::over(h.world.clone());
    let fresh = Harness {
        caches: h.caches,
        ..fresh
    };
    let (result, requests) = fresh.reconcile_as(restarting).await;
    assert!(
        requests.iter().all(|r| !r.starts_with("DELETE")),
        "{requests:?}"
    );
    let e = result.unwrap_err();
    assert_eq!(e.category(), "conflict", "{e}");
    assert_eq!(fresh.pods(), ["seg-worker-0", "seg-worker-1"]);
    assert_eq!(fresh.status()["attempt"], 1);
}

/// `kubectl delete` then `kubectl apply` of the same name: the new job
/// (new uid) replaces the Secrets its predecessor left (they would be
/// garbage-collected with it, under the new pods), says so in an Event,
/// waits for the predecessor's pods to go instead of applying over them,
/// and writes below a run directory of its own.
#[tokio::test]
async fn a_recreated_job_replaces_its_predecessors_secrets_and_waits_for_its_pods() {
    recreated_job().await
}

async fn recreated_job() {
    let h = Harness::new("");
    {
        let mut w = h.world.lock().unwrap();
        let old_owner = json!([{"apiVersion": "trainyard.dev/v1alpha1", "kind": "TrainingJob", "name": "seg", "uid": "old-job-uid", "controller": true}]);
        w.secrets.insert(
            "seg-group".into(),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "seg-group", "uid": "s-old", "ownerReferences": old_owner},
                   "stringData": {"secret": "the predecessor's"}}),
        );
        w.pods.insert(
            "seg-worker-1".into(),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "seg-worker-1", "uid": "p-old",
                   "labels": {"trainyard.dev/job-name": "seg", "trainyard.dev/attempt": "3"}, "ownerReferences": old_owner},
                   "spec": {"containers": [{"name": "trainer", "image": "old"}]}, "status": running()}),
        );
    }
    let requests = h.reconcile().await;
    {
        let w = h.world.lock().unwrap();
        let group = &w.secrets["seg-group"];
        assert_eq!(group["metadata"]["ownerReferences"][0]["uid"], "job-uid");
        assert_ne!(group["stringData"]["secret"], "the predecessor's");
        assert!(requests.contains(&"DELETE /api/v1/namespaces/ml/secrets/seg-group".to_string()));
        assert!(
            !requests.contains(&format!("PATCH {PODS}/seg-worker-1")),
            "never applied over the predecessor's pod: {requests:?}"
        );
        assert!(requests.contains(&format!("PATCH {PODS}/seg-worker-0")));
        assert_eq!(
            w.pods["seg-worker-1"]["spec"]["containers"][0]["image"],
            "old"
        );
        let reasons: Vec<&str> = w
            .events
            .iter()
            .filter_map(|e| e["reason"].as_str())
            .collect();
        assert!(reasons.contains(&"ReplacedSecret"), "{reasons:?}");
        assert!(reasons.contains(&"WaitingForPredecessor"), "{reasons:?}");
        let args = w.pods["seg-worker-0"]["spec"]["containers"][0]["args"].to_string();
        assert!(
            args.contains("/var/lib/trainyard/run/seg-job-uid/seg-worker-0"),
            "{args}"
        );
    }
    // The garbage collector removes the predecessor's pod: it is created.
    h.world.lock().unwrap().pods.remove("seg-worker-1");
    h.reconcile().await;
    assert_eq!(h.pods(), ["seg-worker-0", "seg-worker-1"]);
}

/// A namespace enforcing Pod Security `restricted`: pods the defaults
/// build are admitted (every test of this file checks that on every pod);
/// a template that asks for privilege escalation is refused, the refusal
/// shows as a condition and an Event with the API server's words, and
/// after a bounded number of tries the job fails with them.
#[tokio::test]
async fn pods_refused_by_admission_show_in_the_status_and_fail_the_job_in_bounded_tries() {
    use trainyard::plan::ADMISSION_TRIES;
    let h =
        Harness::new("  template: {containerSecurityContext: {allowPrivilegeEscalation: true}}\n");
    for attempt in 1..=ADMISSION_TRIES {
        let (result, _) = h.reconcile_as(h.job()).await;
        let e = result.unwrap_err();
        assert_eq!(e.category(), "refused", "{e}");
        assert!(e.to_string().contains("PodSecurity"), "{e}");
        if attempt > 1 {
            let status = h.status();
            let condition = status["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "AdmissionRefused")
                .cloned()
                .unwrap();
            assert_eq!(condition["status"], "True");
            assert!(
                condition["message"]
                    .as_str()
                    .unwrap()
                    .contains("allowPrivilegeEscalation"),
                "{condition}"
            );
        }
    }
    h.reconcile().await;
    let status = h.status();
    assert_eq!(status["phase"], "Failed");
    assert_eq!(status["reason"], "AdmissionRefused");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("violates PodSecurity"),
        "{status}"
    );
    assert!(h.event_reasons().iter().any(|r| r == "AdmissionRefused"));
    assert!(h.pods().is_empty());
}

/// A Secret of a job's name that no TrainingJob owns is someone else's:
/// refused, named, never touched.
#[tokio::test]
async fn a_foreign_secret_of_the_same_name_is_refused_and_kept() {
    let h = Harness::new("");
    h.world.lock().unwrap().secrets.insert(
        "seg-group".into(),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "seg-group", "uid": "s-user"}, "stringData": {"secret": "theirs"}}),
    );
    let job = h.job();
    let (result, _) = h.reconcile_as(job).await;
    let e = result.unwrap_err();
    assert!(e.to_string().contains("seg-group"), "{e}");
    assert_eq!(e.category(), "invalid_object");
    assert_eq!(
        h.world.lock().unwrap().secrets["seg-group"]["stringData"]["secret"],
        "theirs"
    );
    assert!(h.pods().is_empty());
}

/// A fake Lease API with optimistic concurrency: a write with a stale
/// resourceVersion is a 409, as on a real API server. While `hang` is set,
/// requests never get an answer (a dead connection without a read timeout).
fn lease_api(store: Arc<Mutex<Option<Value>>>, hang: Arc<std::sync::atomic::AtomicBool>) -> Client {
    let service = tower::service_fn(move |req: Request<Body>| {
        let store = store.clone();
        let hang = hang.clone();
        async move {
            let method = req.method().clone();
            record_access(&method, "", req.uri().path(), "");
            let body = req.into_body().collect_bytes().await.unwrap();
            if hang.load(std::sync::atomic::Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            let mut lease = store.lock().unwrap();
            let response = match method.as_str() {
                "GET" => match lease.as_ref() {
                    Some(l) => respond(StatusCode::OK, l),
                    None => not_found("lease"),
                },
                "POST" | "PUT" => {
                    let mut new: Value = serde_json::from_slice(&body).unwrap();
                    let current = lease
                        .as_ref()
                        .map(|l| l["metadata"]["resourceVersion"].clone());
                    let stale = match (method.as_str(), &current) {
                        ("POST", Some(_)) => true,
                        ("PUT", Some(v)) => &new["metadata"]["resourceVersion"] != v,
                        ("PUT", None) => true,
                        _ => false,
                    };
                    if stale {
                        conflict("conflict")
                    } else {
                        let version = current
                            .and_then(|v| v.as_str().and_then(|s| s.parse::<u64>().ok()))
                            .unwrap_or(0)
                            + 1;
                        new["metadata"]["resourceVersion"] = json!(version.to_string());
                        *lease = Some(new.clone());
                        respond(StatusCode::OK, &new)
                    }
                }
                other => panic!("unexpected {other}"),
            };
            Ok::<_, Infallible>(response)
        }
    });
    Client::new(service, "ops")
}

fn elector(store: &Arc<Mutex<Option<Value>>>, identity: &str) -> trainyard::k8s::leader::Elector {
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    trainyard::k8s::leader::Elector::new(
        kube::Api::namespaced(lease_api(store.clone(), hang), "ops"),
        "lead",
        identity,
    )
}

#[tokio::test]
async fn one_leader_at_a_time_and_takeover_after_expiry() {
    leader_election().await
}

async fn leader_election() {
    use tokio::time::Instant;
    use trainyard::k8s::leader::{LEASE_DURATION, Standing};
    let store = Arc::new(Mutex::new(None));
    let (a, b) = (elector(&store, "a"), elector(&store, "b"));
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    assert_eq!(a.try_acquire(at(0)).await.unwrap(), Standing::Leader);
    assert_eq!(
        b.try_acquire(at(1)).await.unwrap(),
        Standing::Follower { holder: "a".into() }
    );
    // a renews at 5; b sees the changed record at 10 and starts counting again.
    assert_eq!(a.try_acquire(at(5)).await.unwrap(), Standing::Leader);
    assert_eq!(
        b.try_acquire(at(10)).await.unwrap(),
        Standing::Follower { holder: "a".into() }
    );
    // a stops renewing. b takes over only once it has seen the same record
    // for a whole lease duration on its own clock, and then a must not lead.
    let seen = 10 + LEASE_DURATION.as_secs();
    assert_eq!(
        b.try_acquire(at(seen - 1)).await.unwrap(),
        Standing::Follower { holder: "a".into() }
    );
    assert_eq!(b.try_acquire(at(seen)).await.unwrap(), Standing::Leader);
    assert_eq!(
        a.try_acquire(at(seen + 1)).await.unwrap(),
        Standing::Follower { holder: "b".into() }
    );
    let lease = store.lock().unwrap().clone().unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

/// The holder's clock is an hour behind: its renewTime looks long expired
/// to anyone comparing it with their own wall clock. A candidate that has
/// just seen it renewed must not take it.
#[tokio::test]
async fn clock_skew_cannot_steal_a_live_lease() {
    use trainyard::k8s::leader::Standing;
    let store = Arc::new(Mutex::new(None));
    let (a, b) = (elector(&store, "a"), elector(&store, "b"));
    let t0 = tokio::time::Instant::now();
    assert_eq!(a.try_acquire(t0).await.unwrap(), Standing::Leader);
    {
        let mut lease = store.lock().unwrap();
        let lease = lease.as_mut().unwrap();
        lease["spec"]["renewTime"] = json!("2026-11-30T23:00:00.000000Z");
    }
    assert_eq!(
        b.try_acquire(t0 + Duration::from_secs(1)).await.unwrap(),
        Standing::Follower { holder: "a".into() }
    );
}

/// A leader whose renewals hang (the API server stops answering) steps
/// down by its renew deadline, before a candidate could take the lease.
#[tokio::test(start_paused = true)]
async fn a_leader_whose_renewals_hang_steps_down_by_the_renew_deadline() {
    use trainyard::k8s::leader::{Elector, Timing};
    let store = Arc::new(Mutex::new(None));
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let timing = Timing::default();
    let a = Elector::new(
        kube::Api::namespaced(lease_api(store.clone(), hang.clone()), "ops"),
        "lead",
        "a",
    )
    .with_timing(timing);
    a.wait_for_leadership().await;
    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let stepped_down = tokio::time::timeout(timing.lease_duration, a.keep_leading()).await;
    assert!(
        stepped_down.is_ok(),
        "still leading a lease it could not renew for {:?}",
        timing.lease_duration
    );
    let after = started.elapsed();
    assert!(
        after <= timing.renew_deadline + timing.retry_period,
        "stepped down after {after:?}"
    );
}

/// The chart's RBAC rules (`charts/trainyard/files/rbac/`) grant exactly
/// what the operator asks the API server for: every request of the
/// scenarios below (and of every other test in this file) is allowed, and
/// every granted verb is used by one of them or by the controller's watches.
#[tokio::test]
async fn the_charts_rbac_allows_exactly_what_the_operator_does() {
    whole_life(Harness::new(""), true).await;
    federated_life().await;
    federated_secret_gains_keys_for_new_clients().await;
    peft_life().await;
    progress_reports().await;
    leader_election().await;
    finished_job_is_deleted_after_its_ttl().await;
    deleted_job_life().await;
    recreated_job().await;

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Rule {
        api_groups: Vec<String>,
        resources: Vec<String>,
        verbs: Vec<String>,
    }
    let chart =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/trainyard/files/rbac");
    let mut granted = std::collections::BTreeSet::new();
    for file in ["cluster-rules.yaml", "leader-election-rules.yaml"] {
        let text = std::fs::read_to_string(chart.join(file)).unwrap();
        let rules: Vec<Rule> = serde_yaml::from_str(&text).unwrap();
        for r in rules {
            for g in &r.api_groups {
                for res in &r.resources {
                    for v in &r.verbs {
                        granted.insert((g.clone(), res.clone(), v.clone()));
                    }
                }
            }
        }
    }
    let mut used = ACCESS.lock().unwrap().clone();
    // k8s::run: the CRD check lists TrainingJobs once; the Controller lists
    // and watches TrainingJobs, and the pods and Services it owns.
    for (group, resource) in [
        ("trainyard.dev", "trainingjobs"),
        ("", "pods"),
        ("", "services"),
    ] {
        for verb in ["list", "watch"] {
            used.insert((group.into(), resource.into(), verb.into()));
        }
    }
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(missing.is_empty(), "the chart does not grant {missing:?}");
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "the chart grants what the operator never uses: {unused:?}"
    );
}

/// A federated job whose Secret predates a larger `clients`: the missing
/// client keys are merged in, the existing secret kept.
async fn federated_secret_gains_keys_for_new_clients() {
    let master = "ab".repeat(32);
    let world = Arc::new(Mutex::new(World {
        secrets: BTreeMap::from([(
            "fl-federation".to_string(),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fl-federation", "uid": "s-1",
                   "ownerReferences": [{"apiVersion": "trainyard.dev/v1alpha1", "kind": "TrainingJob", "name": "fl", "uid": "job-uid"}]},
                   "stringData": {"secret": master, "client-0": "kept"}}),
        )]),
        ..world_of(FEDERATED)
    }));
    let h = Harness::over(world);
    h.reconcile().await;
    let w = h.world.lock().unwrap();
    let data = &w.secrets["fl-federation"]["stringData"];
    assert_eq!(data["secret"], master.as_str());
    assert_eq!(data["client-0"], "kept", "existing keys are not rewritten");
    assert_eq!(
        data["client-2"],
        trainyard_trainer::config::client_token(&master, 2).as_str()
    );
}

/// `ttlSecondsAfterFinished: 0`: a succeeded job is deleted by the operator,
/// its final status written first.
async fn finished_job_is_deleted_after_its_ttl() {
    let h = Harness::new("  runPolicy: {ttlSecondsAfterFinished: 0}\n");
    h.reconcile().await;
    h.reconcile().await;
    for p in h.pods() {
        h.set_pod(&p, running());
    }
    h.reconcile().await;
    assert_eq!(h.status()["phase"], "Running");
    for p in h.pods() {
        h.set_pod(&p, exited(0));
    }
    h.reconcile().await;
    assert_eq!(
        h.status()["phase"],
        "Succeeded",
        "the final status is written before the job is deleted"
    );
    assert!(
        !h.world.lock().unwrap().job["metadata"]["deletionTimestamp"].is_null(),
        "deleted after its TTL"
    );
    // The deletion reaches the operator: it cleans up and lets the job go.
    h.reconcile().await;
    assert!(h.world.lock().unwrap().job_deleted);
}
