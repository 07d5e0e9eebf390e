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
use crate::job::{Identity, MissingMetadata, ValidatedJob};
use crate::metrics::OperatorMetrics;
use crate::plan::{self, Action, EventType, Observation, Placement};
use crate::progress::ProgressHub;
use crate::store::{Store, history};
use resources::labels;

/// The field manager of every write (server-side apply).
pub const MANAGER: &str = "trainyard-operator";

/// The finalizer that makes a deletion reach [`reconcile`]. Without the
/// operator nothing removes it: `kubectl patch trainingjob NAME --type=json
/// -p '[{"op":"remove","path":"/metadata/finalizers"}]'` lets the job go.
pub const FINALIZER: &str = "trainyard.dev/cleanup";

/// The longest any one API call may take before the reconcile gives up on it
/// (kube's client has no read timeout: a hung call would hold the job's
/// reconcile for ever).
pub const API_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest a whole reconcile may take.
pub const RECONCILE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a status we wrote may take to reach the cache before a
/// reconcile acts on the older one anyway (the status write's
/// resourceVersion precondition still refuses it).
const EXPECTATION_TTL: Duration = Duration::from_secs(30);

/// Why a reconcile failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The API server refused or could not be reached.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An API call got no answer in time.
    #[error("Kubernetes API: {call} got no answer within {timeout:?}")]
    Timeout {
        /// What was asked.
        call: &'static str,
        /// How long it was given.
        timeout: Duration,
    },
    /// The object lacks what every stored object has.
    #[error(transparent)]
    MissingMetadata(#[from] MissingMetadata),
    /// One of the job's Secrets lacks the key the operator put there.
    #[error(
        "Secret {secret} has no key {key:?}; delete the Secret and the operator creates a new one"
    )]
    SecretWithoutKey {
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
    /// A Secret with the name of one of the job's is not a TrainingJob's.
    #[error(
        "Secret {secret} exists and belongs to no TrainingJob; rename the job, or delete the Secret if it is not needed"
    )]
    ForeignSecret {
        /// The Secret.
        secret: String,
    },
    /// The API server refused a pod (admission, RBAC, an invalid field).
    #[error("the API server refused pod {pod}: {message}")]
    Refused {
        /// The pod.
        pod: String,
        /// The API server's message.
        message: String,
    },
    /// The operating system gave no randomness for a new secret.
    #[error("no randomness for a new secret: {0}")]
    Randomness(getrandom::Error),
    /// kube-runtime's finalizer helper refused the object.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl ReconcileError {
    /// Every value of [`ReconcileError::category`].
    pub const CATEGORIES: [&'static str; 6] = [
        "conflict",
        "api",
        "timeout",
        "refused",
        "invalid_object",
        "randomness",
    ];

    /// The label of `trainyard_reconcile_errors_total`: a conflict (another
    /// writer, or our own stale read: harmless, retried), another API error,
    /// a call that hung, a pod the API server refused (admission), an
    /// object the operator cannot work with, or no
    /// randomness. (History never fails a reconcile: it is queued.)
    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            Self::Kube(_) => "api",
            Self::Timeout { .. } => "timeout",
            Self::Refused { .. } => "refused",
            Self::MissingMetadata(_)
            | Self::SecretWithoutKey { .. }
            | Self::ForeignSecret { .. }
            | Self::Finalizer(_) => "invalid_object",
            Self::Randomness(_) => "randomness",
        }
    }
}

/// `call`, given at most [`API_TIMEOUT`].
async fn api<T>(
    call: &'static str,
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, ReconcileError> {
    match tokio::time::timeout(API_TIMEOUT, fut).await {
        Ok(answer) => Ok(answer?),
        Err(_) => Err(ReconcileError::Timeout {
            call,
            timeout: API_TIMEOUT,
        }),
    }
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
    /// Per job uid: the resourceVersion our last status write replaced, and
    /// when. A reconcile that reads that version again reads a cache that
    /// has not seen our write yet, and must not act on it.
    written: std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
    /// Per job uid: admission refusals of its pods in a row (this process's
    /// count: a restarted operator gives a job its tries again).
    refusals: std::sync::Mutex<std::collections::HashMap<String, plan::AdmissionRefusal>>,
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
    /// The cached pods labelled with `job`'s name in its namespace, of any owner.
    fn pods_named(&self, ns: &str, name: &str) -> Vec<Pod> {
        self.pods
            .state()
            .into_iter()
            .filter(|p| {
                p.metadata.namespace.as_deref() == Some(ns)
                    && p.labels().get(labels::JOB_NAME).map(String::as_str) == Some(name)
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
            written: Default::default(),
            refusals: Default::default(),
        }
    }

    fn refusal(&self, uid: &str) -> Option<plan::AdmissionRefusal> {
        self.refusals
            .lock()
            .expect("refusals lock")
            .get(uid)
            .cloned()
    }

    /// Counts a refusal of `uid`'s pod, or forgets them once one is admitted.
    fn admitted(&self, uid: &str, refused: Option<String>) {
        let mut refusals = self.refusals.lock().expect("refusals lock");
        match refused {
            None => {
                refusals.remove(uid);
            }
            Some(message) => {
                let r = refusals
                    .entry(uid.to_string())
                    .or_insert(plan::AdmissionRefusal {
                        tries: 0,
                        message: String::new(),
                    });
                r.tries += 1;
                r.message = message;
            }
        }
    }

    /// Whether `job` is older than what we last wrote for it.
    fn is_stale(&self, job: &TrainingJob) -> bool {
        let (Some(uid), Some(version)) = (job.uid(), job.resource_version()) else {
            return false;
        };
        let mut written = self.written.lock().expect("expectations lock");
        match written.get(&uid) {
            Some((replaced, at)) if at.elapsed() < EXPECTATION_TTL => *replaced == version,
            Some(_) => {
                written.remove(&uid);
                false
            }
            None => false,
        }
    }

    /// Remembers that our write replaced `read` (the version we planned on)
    /// with `now`; a write that changed nothing leaves nothing to wait for.
    fn wrote(&self, job: &TrainingJob, now: Option<String>) {
        let (Some(uid), Some(read)) = (job.uid(), job.resource_version()) else {
            return;
        };
        let mut written = self.written.lock().expect("expectations lock");
        if now.as_deref() == Some(read.as_str()) {
            written.remove(&uid);
        } else {
            written.insert(uid, (read, std::time::Instant::now()));
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

/// The span every reconcile of `job` runs in.
fn span_of(job: &TrainingJob) -> tracing::Span {
    tracing::info_span!(
        "reconcile",
        namespace = job.metadata.namespace.as_deref().unwrap_or(""),
        name = job.metadata.name.as_deref().unwrap_or(""),
        uid = job.metadata.uid.as_deref().unwrap_or(""),
    )
}

async fn reconcile_timed(
    job: Arc<TrainingJob>,
    ctx: Arc<Context>,
) -> Result<Requeue, ReconcileError> {
    use tracing::Instrument;
    let started = std::time::Instant::now();
    let span = span_of(&job);
    let result = reconcile(job, ctx.clone()).instrument(span).await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconcile_seconds
        .with_label_values(&[outcome])
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        ctx.metrics
            .reconcile_errors
            .with_label_values(&[e.category()])
            .inc();
    }
    result
}

fn error_policy(job: Arc<TrainingJob>, error: &ReconcileError, _ctx: Arc<Context>) -> Requeue {
    let _span = span_of(&job).entered();
    tracing::warn!(%error, category = error.category(), "reconcile failed; retrying");
    // Our own stale read: the cache catches up within moments.
    let after = if error.category() == "conflict" { 1 } else { 5 };
    Requeue::requeue(Duration::from_secs(after))
}

/// One reconcile of one job, within [`RECONCILE_TIMEOUT`]: a live job is
/// given the finalizer, then observed, planned and acted on; a deleted one
/// is cleaned up and let go.
pub async fn reconcile(
    job: Arc<TrainingJob>,
    ctx: Arc<Context>,
) -> Result<Requeue, ReconcileError> {
    use kube::runtime::finalizer::{Error as FinalizerError, Event as Finalized, finalizer};
    let ns = job.namespace().ok_or(MissingMetadata("namespace"))?;
    if job.metadata.deletion_timestamp.is_some() && !job.finalizers().iter().any(|f| f == FINALIZER)
    {
        // Deleted before it carried our finalizer: nothing waits for us,
        // but what we hold for it goes all the same.
        cleanup(&job, &ctx);
        return Ok(Requeue::await_change());
    }
    let jobs = Api::<TrainingJob>::namespaced(ctx.client.clone(), &ns);
    let run = finalizer(&jobs, FINALIZER, job, |event| async {
        match event {
            Finalized::Apply(job) => apply(job, ctx.clone()).await,
            Finalized::Cleanup(job) => {
                cleanup(&job, &ctx);
                Ok(Requeue::await_change())
            }
        }
    });
    match tokio::time::timeout(RECONCILE_TIMEOUT, run).await {
        Err(_) => Err(ReconcileError::Timeout {
            call: "reconcile",
            timeout: RECONCILE_TIMEOUT,
        }),
        Ok(Ok(requeue)) => Ok(requeue),
        Ok(Err(FinalizerError::ApplyFailed(e) | FinalizerError::CleanupFailed(e))) => Err(e),
        Ok(Err(FinalizerError::AddFinalizer(e) | FinalizerError::RemoveFinalizer(e))) => {
            Err(e.into())
        }
        Ok(Err(e)) => Err(ReconcileError::Finalizer(e.to_string())),
    }
}

/// What the operator holds for a job that is gone: its metric series, its
/// progress token and report, and the expectation of its status; history
/// records that it was deleted. The children go with their owner (garbage
/// collection); the history stays in PostgreSQL.
fn cleanup(job: &TrainingJob, ctx: &Context) {
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    ctx.metrics.forget(&ns, &name);
    if let Some(p) = &ctx.progress {
        p.hub.forget(&ns, &name);
    }
    if let Some(uid) = job.uid() {
        ctx.written.lock().expect("expectations lock").remove(&uid);
        ctx.refusals.lock().expect("refusals lock").remove(&uid);
    }
    if let Some(store) = &ctx.store {
        store.record(history::deleted(job, Timestamp::now()));
    }
    tracing::info!("deleted; its metrics, progress token and expectations are released");
}

/// Observe, plan, act, for a job that is not being deleted.
async fn apply(job: Arc<TrainingJob>, ctx: Arc<Context>) -> Result<Requeue, ReconcileError> {
    let id = Identity::of(&job)?;
    if ctx.is_stale(&job) {
        // Deciding on a status older than our own last write could undo it
        // (delete the gang it created, count a restart twice).
        tracing::debug!("the cache has not seen our last status write yet");
        return Ok(Requeue::requeue(Duration::from_millis(500)));
    }
    let pods = Pods::of(&ctx, &id).await?;
    let progress_env = progress_env(&ctx, &job, &id).await?;
    let observation = Observation {
        replicas: pods.ours.iter().filter_map(observe::replica).collect(),
        progress: ctx
            .progress
            .as_ref()
            .and_then(|p| p.hub.latest(&id.namespace, &id.name)),
        history: ctx.store.as_ref().map(Store::healthy),
        admission: ctx.refusal(&id.uid),
    };
    let now = Timestamp::now();
    // The one place a reconcile turns the spec into facts.
    let decision = match ValidatedJob::new(id.clone(), &job.spec) {
        Ok(facts) => plan::plan(
            &facts,
            job.status.as_ref(),
            &observation,
            now,
            &Placement::Kubernetes,
        ),
        Err(problem) => plan::reject(&job, &problem, &observation, now),
    };
    ctx.metrics
        .observe(&job, job.status.as_ref(), &decision.status, now);
    // History never holds up the pods: records are queued, not awaited.
    if let Some(store) = &ctx.store {
        for record in history::records(&job, job.status.as_ref(), &decision.status, now) {
            store.record(record);
        }
    }

    let gang = Gang {
        ctx: &ctx,
        job: &job,
        id: &id,
        plan: &decision,
        // Gates hold a starting gang together; a replica recreated alone in
        // a running job (federated) has no gang to wait for.
        gated: resources::gang_gated(&job) && decision.status.phase == Phase::Pending,
        progress_env: progress_env.as_ref(),
    };
    gang.prepare().await?;
    let waiting = match gang.act(&pods.predecessors).await? {
        Acted::Done { waiting } => waiting,
        Acted::Deleted => return Ok(Requeue::await_change()),
        Acted::Refused(refusal) => {
            // The status still says so (the condition the plan set), and
            // the retry comes with the error policy's backoff.
            gang.write_status().await?;
            return Err(refusal);
        }
    };
    if !waiting.is_empty() {
        let message = format!(
            "{} still exist(s), left by an earlier TrainingJob of this name; created once the garbage collector removes them",
            waiting.join(", ")
        );
        publish(
            &ctx,
            &job,
            EventType::Normal,
            "WaitingForPredecessor",
            &message,
        )
        .await;
    }
    gang.lift_gates(&pods.ours).await?;
    gang.write_status().await?;
    // Reports arrive without a Kubernetes event: look again soon while
    // running, so progress reaches the status at a bounded rate.
    let poll = (ctx.progress.is_some() && decision.status.phase == Phase::Running)
        .then_some(PROGRESS_POLL);
    let predecessor_gone = (!waiting.is_empty()).then_some(Duration::from_secs(2));
    Ok(
        match decision
            .requeue_after
            .into_iter()
            .chain(poll)
            .chain(predecessor_gone)
            .min()
        {
            Some(after) => Requeue::requeue(after.max(Duration::from_millis(500))),
            None => Requeue::await_change(),
        },
    )
}

/// The pods labelled with a job's name.
struct Pods {
    /// This job's (owned by its uid).
    ours: Vec<Pod>,
    /// Names of pods an earlier job of the same name left. A job recreated
    /// under the same name must not adopt them, nor apply its own over them
    /// (same names): it waits for the garbage collector to remove them.
    predecessors: std::collections::BTreeSet<String>,
}

impl Pods {
    /// From the cache where the controller keeps one, else listed.
    async fn of(ctx: &Context, id: &Identity) -> Result<Self, ReconcileError> {
        let labelled: Vec<Pod> = match &ctx.children {
            Some(children) => children.pods_named(&id.namespace, &id.name),
            None => {
                let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), &id.namespace);
                let selector = format!("{}={}", labels::JOB_NAME, id.name);
                api(
                    "list pods",
                    pods_api.list(&ListParams::default().labels(&selector)),
                )
                .await?
                .items
            }
        };
        let (ours, predecessors): (Vec<Pod>, Vec<Pod>) =
            labelled.into_iter().partition(|p| owned_by(p, &id.uid));
        Ok(Self {
            ours,
            predecessors: predecessors.into_iter().map(|p| p.name_any()).collect(),
        })
    }
}

/// Where the job's trainers post progress, with the job's token registered
/// in the hub (absent without a progress endpoint).
async fn progress_env(
    ctx: &Context,
    job: &TrainingJob,
    id: &Identity,
) -> Result<Option<resources::ProgressEnv>, ReconcileError> {
    let Some(p) = &ctx.progress else {
        return Ok(None);
    };
    let token = ensure_token(ctx, job, &id.namespace, &id.name).await?;
    p.hub.register(&id.namespace, &id.name, &token);
    Ok(Some(resources::ProgressEnv {
        url: crate::progress::job_url(&p.url, &id.namespace, &id.name),
        secret: resources::token_secret_name(&id.name),
    }))
}

/// One reconcile's plan, carried out against the API server.
struct Gang<'a> {
    ctx: &'a Context,
    job: &'a TrainingJob,
    id: &'a Identity,
    plan: &'a plan::Plan,
    /// Pods are created behind a scheduling gate.
    gated: bool,
    progress_env: Option<&'a resources::ProgressEnv>,
}

/// How carrying out the actions ended.
enum Acted {
    /// All done; these pods wait for their predecessors to go.
    Done { waiting: Vec<String> },
    /// The job itself was deleted (its TTL ran out).
    Deleted,
    /// Admission or RBAC refused a pod.
    Refused(ReconcileError),
}

impl Gang<'_> {
    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.ctx.client.clone(), &self.id.namespace)
    }

    fn creates(&self) -> bool {
        self.plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::Create(_)))
    }

    /// What must exist before the pods: the leader's Service while the job
    /// runs, and the Secrets the pods read (the federation's client tokens,
    /// the workers' group secret) before any pod is created.
    async fn prepare(&self) -> Result<(), ReconcileError> {
        let (ctx, job, name) = (self.ctx, self.job, &self.id.name);
        let ns = &self.id.namespace;
        let phase = self.plan.status.phase;
        if !phase.is_terminal()
            && phase != Phase::Suspended
            && let Some(leader) = self.plan.desired.first()
            // A cached Service is ours already: re-applying it every
            // reconcile would be one write per job per poll for nothing.
            && !ctx
                .children
                .as_ref()
                .is_some_and(|c| c.has_service(ns, name, &self.id.uid))
        {
            let service = resources::service(job, leader);
            let services = Api::<Service>::namespaced(ctx.client.clone(), ns);
            api(
                "apply the Service",
                services.patch(name, &apply_params(), &Patch::Apply(&service)),
            )
            .await?;
        }
        if !self.creates() {
            return Ok(());
        }
        match (job.spec.mode, &job.spec.federated) {
            (crate::api::Mode::Federated, Some(f)) => {
                ensure_federation_secret(ctx, job, ns, name, f.clients as usize).await
            }
            (crate::api::Mode::Distributed | crate::api::Mode::Peft, _) => {
                use crate::plan::replicas::{GROUP_SECRET_KEY, group_secret_name};
                ensure_random_secret(ctx, job, ns, &group_secret_name(name), GROUP_SECRET_KEY)
                    .await
                    .map(drop)
            }
            _ => Ok(()),
        }
    }

    /// The plan's actions, in order. A pod whose name a predecessor still
    /// holds is not created; a refused pod stops the rest.
    async fn act(
        &self,
        predecessors: &std::collections::BTreeSet<String>,
    ) -> Result<Acted, ReconcileError> {
        let (ctx, job, uid) = (self.ctx, self.job, &self.id.uid);
        let pods_api = self.pods();
        let mut waiting = Vec::new();
        for action in &self.plan.actions {
            match action {
                Action::Create(replica) if predecessors.contains(&replica.name) => {
                    waiting.push(replica.name.clone());
                }
                Action::Create(replica) => {
                    let pod = resources::pod(job, replica, self.gated, self.progress_env);
                    match api(
                        "apply a pod",
                        pods_api.patch(&replica.name, &apply_params(), &Patch::Apply(&pod)),
                    )
                    .await
                    {
                        Ok(_) => ctx.admitted(uid, None),
                        // Admission (Pod Security, a webhook, a quota) or
                        // RBAC said no: the next plan shows it and, after a
                        // few tries, fails the job with the API server's words.
                        Err(ReconcileError::Kube(kube::Error::Api(e)))
                            if matches!(e.code, 400 | 403 | 422) =>
                        {
                            ctx.admitted(uid, Some(e.message.clone()));
                            return Ok(Acted::Refused(ReconcileError::Refused {
                                pod: replica.name.clone(),
                                message: e.message,
                            }));
                        }
                        Err(e) => return Err(e),
                    }
                }
                Action::Delete { name } => {
                    match api(
                        "delete a pod",
                        pods_api.delete(name, &DeleteParams::default()),
                    )
                    .await
                    {
                        Ok(_) => {}
                        Err(ReconcileError::Kube(kube::Error::Api(e))) if e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                }
                Action::Event {
                    kind,
                    reason,
                    message,
                } => publish(ctx, job, *kind, reason, message).await,
                Action::DeleteJob => {
                    // The final status first, so that watchers see how the
                    // job ended even when a TTL of 0 deletes it in the same pass.
                    self.write_status().await?;
                    let jobs =
                        Api::<TrainingJob>::namespaced(ctx.client.clone(), &self.id.namespace);
                    api(
                        "delete the TrainingJob",
                        jobs.delete(&self.id.name, &DeleteParams::background()),
                    )
                    .await?;
                    return Ok(Acted::Deleted);
                }
            }
        }
        Ok(Acted::Done { waiting })
    }

    /// The gang is complete: lift the gates together, so no partial gang
    /// ever holds nodes.
    async fn lift_gates(&self, observed: &[Pod]) -> Result<(), ReconcileError> {
        let desired = &self.plan.desired;
        if !self.gated || desired.is_empty() {
            return Ok(());
        }
        let attempt = self.plan.status.attempt;
        let existing: Vec<&Pod> = observed
            .iter()
            .filter(|p| {
                observe::replica(p).is_some_and(|r| r.attempt == attempt)
                    && p.metadata.deletion_timestamp.is_none()
            })
            .collect();
        let find = |name: &str| {
            existing
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(name))
        };
        if !desired.iter().all(|r| find(&r.name).is_some()) {
            return Ok(());
        }
        for replica in desired {
            if find(&replica.name).is_some_and(|p| observe::is_gated(p)) {
                let ungated = resources::pod(self.job, replica, false, self.progress_env);
                api(
                    "lift a pod's scheduling gate",
                    self.pods()
                        .patch(&replica.name, &apply_params(), &Patch::Apply(&ungated)),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Writes the planned status where it differs from the stored one.
    async fn write_status(&self) -> Result<(), ReconcileError> {
        if self.job.status.as_ref() != Some(&self.plan.status) {
            write_status(self.ctx, self.job, &self.plan.status).await?;
        }
        Ok(())
    }
}

/// Server-side apply as the operator's field manager, taking over fields
/// another manager set (the operator owns its children).
fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// Server-side applies the job's status subresource, on the condition that
/// the job is still the version the status was planned on (a 409 otherwise:
/// the reconcile is retried on fresh state), and remembers the write so the
/// next reconcile waits for the cache to see it.
async fn write_status(
    ctx: &Context,
    job: &TrainingJob,
    status: &crate::api::TrainingJobStatus,
) -> Result<(), ReconcileError> {
    let body = serde_json::json!({
        "apiVersion": TrainingJob::api_version(&()),
        "kind": TrainingJob::kind(&()),
        "metadata": { "resourceVersion": job.resource_version() },
        "status": status,
    });
    let jobs =
        Api::<TrainingJob>::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let written = api(
        "write the status",
        jobs.patch_status(&job.name_any(), &apply_params(), &Patch::Apply(&body)),
    )
    .await?;
    ctx.wrote(job, written.resource_version());
    Ok(())
}

/// How often a running job's status takes in its progress reports.
pub const PROGRESS_POLL: Duration = Duration::from_secs(10);

/// 256 random bits, hex.
fn random_hex() -> Result<String, ReconcileError> {
    crate::random_hex(32).map_err(ReconcileError::Randomness)
}

/// The job's Secret `secret_name`, if it exists and is this job's. One left
/// by an earlier TrainingJob of the same name (deleted and recreated) would
/// be garbage-collected with its old owner under the new pods: it is
/// deleted (only that very object: a uid precondition) to be created anew,
/// and an Event says so. A Secret of that name that no TrainingJob owns is
/// someone else's and is never touched.
async fn own_secret(
    ctx: &Context,
    job: &TrainingJob,
    secrets: &Api<Secret>,
    secret_name: &str,
) -> Result<Option<Secret>, ReconcileError> {
    let Some(existing) = api("get a Secret", secrets.get_opt(secret_name)).await? else {
        return Ok(None);
    };
    let uid = job.uid().unwrap_or_default();
    if owned_by(&existing, &uid) {
        return Ok(Some(existing));
    }
    let predecessor = existing.owner_references().iter().find(|o| {
        o.kind == TrainingJob::kind(&()) && o.api_version == TrainingJob::api_version(&())
    });
    let Some(predecessor) = predecessor else {
        return Err(ReconcileError::ForeignSecret {
            secret: secret_name.into(),
        });
    };
    let delete = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: existing.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api(
        "delete a predecessor's Secret",
        secrets.delete(secret_name, &delete),
    )
    .await
    {
        Ok(_) => {}
        Err(ReconcileError::Kube(kube::Error::Api(e))) if e.code == 404 || e.code == 409 => {}
        Err(e) => return Err(e),
    }
    let message = format!(
        "Secret {secret_name} belonged to an earlier TrainingJob of this name (uid {}); it was deleted and is created anew for this one",
        predecessor.uid
    );
    publish(ctx, job, EventType::Warning, "ReplacedSecret", &message).await;
    Ok(None)
}

/// Publishes a Kubernetes Event on `job` (its note cut to the API server's
/// 1 KiB). Events are for people: losing one must not stall the job, so a
/// failure is logged, not returned.
async fn publish(ctx: &Context, job: &TrainingJob, kind: EventType, reason: &str, message: &str) {
    let event = Event {
        type_: match kind {
            EventType::Normal => KubeEventType::Normal,
            EventType::Warning => KubeEventType::Warning,
        },
        reason: reason.into(),
        note: Some(message.chars().take(1000).collect()),
        action: reason.into(),
        secondary: None,
    };
    let reference = job.object_ref(&());
    if let Err(e) = api("publish an event", ctx.recorder.publish(&event, &reference)).await {
        tracing::warn!(error = %e, "failed to publish an event");
    }
}

/// The Secret with the federation secret (for the aggregator) and one
/// derived token per client (each client pod reads only its own key),
/// created on first use; keys for clients added later are filled in.
async fn ensure_federation_secret(
    ctx: &Context,
    job: &TrainingJob,
    ns: &str,
    name: &str,
    clients: usize,
) -> Result<(), ReconcileError> {
    use crate::plan::replicas::{FEDERATION_SECRET_KEY, client_token_key, federation_secret_name};
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), ns);
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
    if let Some(existing) = own_secret(ctx, job, &secrets, &secret_name).await? {
        let secret = read(&existing, FEDERATION_SECRET_KEY).ok_or_else(|| {
            ReconcileError::SecretWithoutKey {
                secret: secret_name.clone(),
                key: FEDERATION_SECRET_KEY.into(),
            }
        })?;
        let missing: std::collections::BTreeMap<String, String> = keys(&secret)
            .into_iter()
            .filter(|(k, _)| read(&existing, k).is_none())
            .collect();
        if !missing.is_empty() {
            let patch = serde_json::json!({ "stringData": missing });
            api(
                "add client keys to the federation Secret",
                secrets.patch(&secret_name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await?;
        }
        return Ok(());
    }
    let object = resources::job_secret(job, &secret_name, keys(&random_hex()?));
    match api(
        "create a Secret",
        secrets.create(&PostParams::default(), &object),
    )
    .await
    {
        Ok(_) => Ok(()),
        // Created concurrently by another reconcile: theirs stands.
        Err(ReconcileError::Kube(kube::Error::Api(e))) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The job's progress token, from its Secret (created on first use).
async fn ensure_token(
    ctx: &Context,
    job: &TrainingJob,
    ns: &str,
    name: &str,
) -> Result<String, ReconcileError> {
    ensure_random_secret(
        ctx,
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
    ctx: &Context,
    job: &TrainingJob,
    ns: &str,
    secret_name: &str,
    key: &str,
) -> Result<String, ReconcileError> {
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    let read = |s: &Secret| {
        resources::secret_value(s, key).ok_or_else(|| ReconcileError::SecretWithoutKey {
            secret: secret_name.into(),
            key: key.into(),
        })
    };
    if let Some(existing) = own_secret(ctx, job, &secrets, secret_name).await? {
        return read(&existing);
    }
    let value = random_hex()?;
    let object = resources::job_secret(
        job,
        secret_name,
        std::collections::BTreeMap::from([(key.to_string(), value.clone())]),
    );
    match api(
        "create a Secret",
        secrets.create(&PostParams::default(), &object),
    )
    .await
    {
        Ok(_) => Ok(value),
        // Created concurrently (a second reconcile): use theirs.
        Err(ReconcileError::Kube(kube::Error::Api(e))) if e.code == 409 => {
            read(&api("get a Secret", secrets.get(secret_name)).await?)
        }
        Err(e) => Err(e),
    }
}
