//! The Kubernetes side: observe a job's pods, [`plan`](crate::plan::plan),
//! and carry out the plan with server-side apply under one field manager.
//!
//! Kubernetes state is authoritative: a reconcile starts from the job's
//! status and its pods as the API server has them, so an operator restart in
//! the middle of a job creates no duplicate pods and loses no restart count
//! (pod names are deterministic, and `status.restarts` only grows).

pub mod leader;
pub mod observe;
pub mod resources;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType as KubeEventType, Recorder, Reporter};
use kube::runtime::reflector::reflector;
use kube::runtime::reflector::{self, ObjectRef, Store as Cache};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};

use crate::api::{Phase, TrainingJob};
use crate::metrics::OperatorMetrics;
use crate::plan::{self, Action, EventType, Observation, Placement};
use crate::progress::ProgressHub;
use crate::store::{Store, history};
use resources::labels;
use trainyard_trainer::protocol::PROGRESS_PATH;

/// The field manager of every write (server-side apply).
pub const MANAGER: &str = "trainyard-operator";

/// Why a reconcile failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The API server refused or could not be reached.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The object lacks what every stored object has.
    #[error("{0}")]
    Malformed(&'static str),
}

/// Shared by every reconcile.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Durable history, if configured.
    pub store: Option<Store>,
    /// Prometheus metrics.
    pub metrics: Arc<OperatorMetrics>,
    /// Where trainers report progress, and the reports received.
    pub progress: Option<ProgressEndpoint>,
    /// The watched children; without it every reconcile lists pods.
    pub children: Option<Children>,
}

/// Reflector caches of the pods and Services the operator owns, kept by the
/// same watches that trigger reconciles, so a reconcile reads memory instead
/// of listing from the API server.
#[derive(Clone)]
pub struct Children {
    /// Pods labelled with a job name.
    pub pods: Cache<Pod>,
    /// Services labelled with a job name.
    pub services: Cache<Service>,
}

impl Children {
    /// `job`'s pods in the cache: same namespace, its label, owned by its uid
    /// (a job recreated under the same name must not adopt its predecessor's pods).
    fn pods_of(&self, ns: &str, name: &str, uid: &str) -> Vec<Pod> {
        self.pods
            .state()
            .into_iter()
            .filter(|p| {
                p.metadata.namespace.as_deref() == Some(ns)
                    && p.labels().get(labels::JOB_NAME).map(String::as_str) == Some(name)
                    && owned_by(p.as_ref(), uid)
            })
            .map(|p| p.as_ref().clone())
            .collect()
    }

    /// Whether `job`'s Service exists, owned by this incarnation of it.
    fn has_service(&self, ns: &str, name: &str, uid: &str) -> bool {
        self.services
            .get(&ObjectRef::new(name).within(ns))
            .is_some_and(|s| owned_by(s.as_ref(), uid))
    }
}

fn owned_by<K: Resource>(object: &K, uid: &str) -> bool {
    object.owner_references().iter().any(|o| o.uid == uid)
}

/// The progress endpoint as pods reach it.
#[derive(Clone)]
pub struct ProgressEndpoint {
    /// Base URL trainers post to (e.g. `http://trainyard-operator.trainyard.svc:8081`).
    pub url: String,
    /// Tokens and newest reports.
    pub hub: Arc<ProgressHub>,
}

impl Context {
    /// A context for `client`, reporting events as `instance` (the pod name).
    pub fn new(client: Client, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            store: None,
            metrics: Arc::new(OperatorMetrics::new()),
            progress: None,
            children: None,
        }
    }

    /// Reads children from reflector caches instead of listing them.
    pub fn with_children(mut self, children: Children) -> Self {
        self.children = Some(children);
        self
    }

    /// Gives pods a progress URL and token, and reads their reports.
    pub fn with_progress(mut self, endpoint: ProgressEndpoint) -> Self {
        self.progress = Some(endpoint);
        self
    }

    /// Counts into `metrics` (shared with the `/metrics` server).
    pub fn with_metrics(mut self, metrics: Arc<OperatorMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Records history in `store`.
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }
}

/// Runs the controller until the process is asked to stop.
pub async fn run(
    client: Client,
    instance: Option<String>,
    store: Option<Store>,
    metrics: Arc<OperatorMetrics>,
    progress: Option<ProgressEndpoint>,
) -> anyhow::Result<()> {
    let jobs = Api::<TrainingJob>::all(client.clone());
    // Fail fast with a clear message when the CRD is missing.
    jobs.list(&ListParams::default().limit(1)).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot list TrainingJobs ({e}); install the CRD first: trainyard crd | kubectl apply -f -"
        )
    })?;
    let owned = watcher::Config::default().labels(labels::JOB_NAME);
    // managedFields are most of a pod's bytes and never read here.
    let (pods, pod_writer) = reflector::store();
    let pod_events = reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client.clone()), owned.clone())
            .modify(|p| p.managed_fields_mut().clear()),
    )
    .default_backoff()
    .touched_objects();
    let (services, service_writer) = reflector::store();
    let service_events = reflector(
        service_writer,
        watcher(Api::<Service>::all(client.clone()), owned)
            .modify(|s| s.managed_fields_mut().clear()),
    )
    .default_backoff()
    .touched_objects();
    metrics.set_ready(true);
    let mut ctx = Context::new(client.clone(), instance)
        .with_metrics(metrics)
        .with_children(Children { pods, services });
    if let Some(store) = store {
        ctx = ctx.with_store(store);
    }
    if let Some(progress) = progress {
        ctx = ctx.with_progress(progress);
    }
    let ctx = Arc::new(ctx);
    Controller::new(jobs, watcher::Config::default())
        .owns_stream(pod_events)
        .owns_stream(service_events)
        .with_config(kube::runtime::controller::Config::default().concurrency(16))
        .shutdown_on_signal()
        .run(reconcile_timed, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((job, _)) => tracing::debug!(job = %job, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        })
        .await;
    Ok(())
}

async fn reconcile_timed(
    job: Arc<TrainingJob>,
    ctx: Arc<Context>,
) -> Result<Requeue, ReconcileError> {
    let started = std::time::Instant::now();
    let result = reconcile(job, ctx.clone()).await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconcile_seconds
        .with_label_values(&[outcome])
        .observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        ctx.metrics.reconcile_errors.inc();
    }
    result
}

fn error_policy(_job: Arc<TrainingJob>, error: &ReconcileError, _ctx: Arc<Context>) -> Requeue {
    tracing::warn!(%error, "reconcile failed; retrying");
    Requeue::requeue(Duration::from_secs(5))
}

/// One reconcile of one job: observe, plan, act.
pub async fn reconcile(
    job: Arc<TrainingJob>,
    ctx: Arc<Context>,
) -> Result<Requeue, ReconcileError> {
    if job.metadata.deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove the children;
        // the history stays in PostgreSQL.
        let ns = job.namespace().unwrap_or_default();
        ctx.metrics.forget(&ns, &job.name_any());
        if let Some(p) = &ctx.progress {
            p.hub.forget(&ns, &job.name_any());
        }
        return Ok(Requeue::await_change());
    }
    let ns = job.namespace().ok_or(ReconcileError::Malformed(
        "a TrainingJob without a namespace",
    ))?;
    let name = job.name_any();
    let uid = job
        .uid()
        .ok_or(ReconcileError::Malformed("a TrainingJob without a uid"))?;
    let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
    let pods: Vec<Pod> = match &ctx.children {
        Some(children) => children.pods_of(&ns, &name, &uid),
        None => pods_api
            .list(&ListParams::default().labels(&format!("{}={name}", labels::JOB_NAME)))
            .await?
            .items
            .into_iter()
            .filter(|p| owned_by(p, &uid))
            .collect(),
    };
    let progress_env = match &ctx.progress {
        Some(p) => {
            let token = ensure_token(&ctx.client, &job, &ns, &name).await?;
            p.hub.register(&ns, &name, &token);
            Some(resources::ProgressEnv {
                url: format!("{}{PROGRESS_PATH}/{ns}/{name}", p.url.trim_end_matches('/')),
                secret: resources::token_secret_name(&name),
            })
        }
        None => None,
    };
    let observation = Observation {
        replicas: pods.iter().filter_map(observe::replica).collect(),
        progress: ctx.progress.as_ref().and_then(|p| p.hub.latest(&ns, &name)),
        history: ctx.store.as_ref().map(Store::healthy),
    };
    let now = Timestamp::now();
    let decision = plan::plan(&job, &observation, now, &Placement::Kubernetes);
    ctx.metrics
        .observe(&job, job.status.as_ref(), &decision.status, now);
    // History never holds up the pods: records are queued, not awaited.
    if let Some(store) = &ctx.store {
        for record in history::records(&job, job.status.as_ref(), &decision.status, now) {
            store.record(record);
        }
    }

    let apply = PatchParams::apply(MANAGER).force();
    if !decision.status.phase.is_terminal()
        && decision.status.phase != Phase::Suspended
        && let Some(leader) = decision.desired.first()
        // A cached Service is ours already: re-applying it every reconcile
        // would be one write per job per poll for nothing.
        && !ctx
            .children
            .as_ref()
            .is_some_and(|c| c.has_service(&ns, &name, &uid))
    {
        let service = resources::service(&job, leader);
        Api::<Service>::namespaced(ctx.client.clone(), &ns)
            .patch(&name, &apply, &Patch::Apply(&service))
            .await?;
    }
    // Gates hold a starting gang together; a replica recreated alone in a
    // running job (federated) has no gang to wait for.
    let gated = resources::gang_gated(&job) && decision.status.phase == Phase::Pending;
    // Pods read their tokens from the federation Secret: it must exist before
    // any pod is created, and is not needed (nor fetched) otherwise.
    if let (crate::api::Mode::Federated, Some(f)) = (job.spec.mode, &job.spec.federated)
        && decision
            .actions
            .iter()
            .any(|a| matches!(a, Action::Create(_)))
    {
        ensure_federation_secret(&ctx.client, &job, &ns, &name, f.clients as usize).await?;
    }
    // Workers prove the group's secret to each other: the Secret must exist
    // before any of them is created.
    if matches!(
        job.spec.mode,
        crate::api::Mode::Distributed | crate::api::Mode::Peft
    ) && decision
        .actions
        .iter()
        .any(|a| matches!(a, Action::Create(_)))
    {
        use crate::plan::replicas::{GROUP_SECRET_KEY, group_secret_name};
        ensure_random_secret(
            &ctx.client,
            &job,
            &ns,
            &group_secret_name(&name),
            GROUP_SECRET_KEY,
        )
        .await?;
    }
    for action in &decision.actions {
        match action {
            Action::Create(replica) => {
                let pod = resources::pod(&job, replica, gated, progress_env.as_ref());
                pods_api
                    .patch(&replica.name, &apply, &Patch::Apply(&pod))
                    .await?;
            }
            Action::Delete { name } => {
                match pods_api.delete(name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Action::Event {
                kind,
                reason,
                message,
            } => {
                let event = Event {
                    type_: match kind {
                        EventType::Normal => KubeEventType::Normal,
                        EventType::Warning => KubeEventType::Warning,
                    },
                    reason: reason.clone(),
                    note: Some(message.chars().take(1000).collect()),
                    action: reason.clone(),
                    secondary: None,
                };
                // Events are for people; losing one must not stall the job.
                if let Err(e) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
                    tracing::warn!(job = %name, error = %e, "failed to publish an event");
                }
            }
            Action::DeleteJob => {
                // The final status first, so that watchers see how the job
                // ended even when a TTL of 0 deletes it in the same pass.
                if job.status.as_ref() != Some(&decision.status) {
                    write_status(&ctx.client, &ns, &name, &decision.status).await?;
                }
                Api::<TrainingJob>::namespaced(ctx.client.clone(), &ns)
                    .delete(&name, &DeleteParams::background())
                    .await?;
                return Ok(Requeue::await_change());
            }
        }
    }
    // The gang is complete: lift the gates together, so no partial gang
    // ever holds nodes.
    let attempt = decision.status.attempt;
    let existing: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            observe::replica(p).is_some_and(|r| r.attempt == attempt)
                && p.metadata.deletion_timestamp.is_none()
        })
        .collect();
    if gated
        && decision.status.phase == Phase::Pending
        && !decision.desired.is_empty()
        && decision.desired.iter().all(|r| {
            existing
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some(&r.name))
        })
    {
        for replica in &decision.desired {
            let pod = existing
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(&replica.name));
            if pod.is_some_and(|p| observe::is_gated(p)) {
                let ungated = resources::pod(&job, replica, false, progress_env.as_ref());
                pods_api
                    .patch(&replica.name, &apply, &Patch::Apply(&ungated))
                    .await?;
            }
        }
    }
    if job.status.as_ref() != Some(&decision.status) {
        write_status(&ctx.client, &ns, &name, &decision.status).await?;
    }
    // Reports arrive without a Kubernetes event: look again soon while
    // running, so progress reaches the status at a bounded rate.
    let poll = (ctx.progress.is_some() && decision.status.phase == Phase::Running)
        .then_some(PROGRESS_POLL);
    Ok(match decision.requeue_after.into_iter().chain(poll).min() {
        Some(after) => Requeue::requeue(after.max(Duration::from_millis(500))),
        None => Requeue::await_change(),
    })
}

/// Server-side applies the job's status subresource.
async fn write_status(
    client: &Client,
    ns: &str,
    name: &str,
    status: &crate::api::TrainingJobStatus,
) -> Result<(), ReconcileError> {
    let body = serde_json::json!({
        "apiVersion": TrainingJob::api_version(&()),
        "kind": TrainingJob::kind(&()),
        "status": status,
    });
    Api::<TrainingJob>::namespaced(client.clone(), ns)
        .patch_status(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    Ok(())
}

/// How often a running job's status takes in its progress reports.
pub const PROGRESS_POLL: Duration = Duration::from_secs(10);

/// The Secret with the federation secret (for the aggregator) and one
/// derived token per client (each client pod reads only its own key),
/// created on first use; keys for clients added later are filled in.
async fn ensure_federation_secret(
    client: &Client,
    job: &TrainingJob,
    ns: &str,
    name: &str,
    clients: usize,
) -> Result<(), ReconcileError> {
    use crate::plan::replicas::{FEDERATION_SECRET_KEY, client_token_key, federation_secret_name};
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    let secret_name = federation_secret_name(name);
    let read = resources::secret_value;
    let keys = |secret: &str| -> std::collections::BTreeMap<String, String> {
        std::iter::once((FEDERATION_SECRET_KEY.to_string(), secret.to_string()))
            .chain((0..clients).map(|i| {
                (
                    client_token_key(i),
                    trainyard_trainer::config::client_token(secret, i),
                )
            }))
            .collect()
    };
    if let Some(existing) = secrets.get_opt(&secret_name).await? {
        let secret = read(&existing, FEDERATION_SECRET_KEY).ok_or(ReconcileError::Malformed(
            "the job's federation Secret has no secret",
        ))?;
        let missing: std::collections::BTreeMap<String, String> = keys(&secret)
            .into_iter()
            .filter(|(k, _)| read(&existing, k).is_none())
            .collect();
        if !missing.is_empty() {
            let patch = serde_json::json!({ "stringData": missing });
            secrets
                .patch(&secret_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        return Ok(());
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|_| ReconcileError::Malformed("no randomness for a federation secret"))?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut object = resources::token_secret(job, "");
    object.metadata.name = Some(secret_name);
    object.string_data = Some(keys(&secret));
    match secrets.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        // Created concurrently by another reconcile: theirs stands.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The job's progress token, from its Secret (created on first use).
async fn ensure_token(
    client: &Client,
    job: &TrainingJob,
    ns: &str,
    name: &str,
) -> Result<String, ReconcileError> {
    ensure_random_secret(
        client,
        job,
        ns,
        &resources::token_secret_name(name),
        resources::TOKEN_KEY,
    )
    .await
}

/// The random value under `key` in the job's Secret `secret_name`, which is
/// created (256 random bits, hex) on first use.
async fn ensure_random_secret(
    client: &Client,
    job: &TrainingJob,
    ns: &str,
    secret_name: &str,
    key: &str,
) -> Result<String, ReconcileError> {
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    let read = |s: &Secret| {
        resources::secret_value(s, key)
            .ok_or(ReconcileError::Malformed("a job's Secret lacks its key"))
    };
    if let Some(existing) = secrets.get_opt(secret_name).await? {
        return read(&existing);
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|_| ReconcileError::Malformed("no randomness for a secret"))?;
    let value: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let object = resources::job_secret(
        job,
        secret_name,
        std::collections::BTreeMap::from([(key.to_string(), value.clone())]),
    );
    match secrets.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(value),
        // Created concurrently (a second reconcile): use theirs.
        Err(kube::Error::Api(e)) if e.code == 409 => read(&secrets.get(secret_name).await?),
        Err(e) => Err(e.into()),
    }
}
