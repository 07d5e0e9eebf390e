//! Leader election with a `coordination.k8s.io/v1` Lease, so that two
//! operator replicas never reconcile at once.
//!
//! kube-rs 5 has no elector. This one follows client-go's
//! `leaderelection` rules:
//! - Every API call has a deadline ([`Timing::call_timeout`]): kube's client
//!   has no read timeout, and a renewal that hangs must not keep a leader
//!   that can no longer prove it leads.
//! - The leader renews every [`Timing::retry_period`]; when no renewal has
//!   succeeded for [`Timing::renew_deadline`] on its own monotonic clock, it
//!   stops leading (the process exits), before a candidate may take over.
//! - A candidate never trusts the holder's `renewTime` (another machine's
//!   clock): it takes the Lease only after observing the same record
//!   unchanged for the lease duration on its own monotonic clock, so clock
//!   skew cannot make a live lease look expired.
//! - Every write is a `replace` with the resourceVersion read, so two
//!   candidates cannot both win.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;

/// How long a lease lasts without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);

/// The election's clock settings (client-go's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease lasts without renewal (written into the Lease).
    pub lease_duration: Duration,
    /// How long the leader keeps acting without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the leader renews and a candidate retries.
    pub retry_period: Duration,
    /// The deadline of each API call.
    pub call_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: LEASE_DURATION,
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            call_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a round of the election failed.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// The API server refused or could not be reached.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A call got no answer in time.
    #[error("the Lease API did not answer within {0:?}")]
    Timeout(Duration),
}

/// Competes for one Lease as `identity`.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// The holder's record as last seen, and when (our clock) it last changed.
    observed: Mutex<Option<(LeaseSpec, Instant)>>,
}

/// What a round of the election found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// We hold the lease until at least the next renewal.
    Leader,
    /// Someone else holds it.
    Follower {
        /// The holder.
        holder: String,
    },
}

impl Elector {
    /// An elector for Lease `name` in the namespace of `api`.
    pub fn new(api: Api<Lease>, name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            timing: Timing::default(),
            observed: Mutex::new(None),
        }
    }

    /// The same elector with other clock settings.
    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    async fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, ElectionError> {
        tokio::time::timeout(self.timing.call_timeout, fut)
            .await
            .map_err(|_| ElectionError::Timeout(self.timing.call_timeout))?
            .map_err(Into::into)
    }

    /// Whether the holder's record has stood unchanged for its lease
    /// duration on our clock (`now`); remembers when it last changed.
    fn expired(&self, spec: &LeaseSpec, now: Instant) -> bool {
        let mut observed = self.observed.lock().expect("elector lock");
        let since = match observed.as_ref() {
            Some((seen, since)) if seen == spec => *since,
            _ => {
                *observed = Some((spec.clone(), now));
                now
            }
        };
        let duration = spec
            .lease_duration_seconds
            .map_or(self.timing.lease_duration, |s| {
                Duration::from_secs(s.max(1) as u64)
            });
        now.duration_since(since) >= duration
    }

    /// One round at `now` (our monotonic clock): take the lease if it is
    /// free or was seen unrenewed for its duration, renew it if ours.
    pub async fn try_acquire(&self, now: Instant) -> Result<Standing, ElectionError> {
        let wall = Timestamp::now();
        let Some(mut lease) = self.call(self.api.get_opt(&self.name)).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(wall, 0, wall)),
            };
            return match self
                .call(self.api.create(&PostParams::default(), &lease))
                .await
            {
                Ok(_) => Ok(Standing::Leader),
                Err(ElectionError::Kube(kube::Error::Api(e))) if e.code == 409 => {
                    Ok(Standing::Follower {
                        holder: "(another candidate)".into(),
                    })
                }
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        if !ours && !holder.is_empty() && !self.expired(&spec, now) {
            return Ok(Standing::Follower { holder });
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = match (&spec.acquire_time, ours) {
            (Some(t), true) => t.0,
            _ => wall,
        };
        lease.spec = Some(self.spec(acquired, transitions, wall));
        match self
            .call(self.api.replace(&self.name, &PostParams::default(), &lease))
            .await
        {
            Ok(_) => Ok(Standing::Leader),
            // Someone else wrote first; they lead this round.
            Err(ElectionError::Kube(kube::Error::Api(e))) if e.code == 409 => {
                Ok(Standing::Follower {
                    holder: "(another candidate)".into(),
                })
            }
            Err(e) => Err(e),
        }
    }

    fn spec(&self, acquired: Timestamp, transitions: i32, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration.as_secs() as i32),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Waits until this candidate leads.
    pub async fn wait_for_leadership(&self) {
        let mut announced = None;
        loop {
            match self.try_acquire(Instant::now()).await {
                Ok(Standing::Leader) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "leading");
                    return;
                }
                Ok(Standing::Follower { holder }) => {
                    if announced.as_ref() != Some(&holder) {
                        tracing::info!(%holder, "another operator leads; standing by");
                        announced = Some(holder);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "leader election failed; retrying"),
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Renews for as long as it can; returns when leadership is lost:
    /// someone else holds the lease, or no renewal succeeded within the
    /// renew deadline (each attempt, even a hanging one, ends by then).
    pub async fn keep_leading(&self) {
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry_period).await;
            let left = self
                .timing
                .renew_deadline
                .saturating_sub(last_renewal.elapsed());
            let round = tokio::time::timeout(left, self.try_acquire(Instant::now())).await;
            match round {
                Ok(Ok(Standing::Leader)) => last_renewal = Instant::now(),
                Ok(Ok(Standing::Follower { holder })) => {
                    tracing::error!(%holder, "lost the leader lease");
                    return;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "failed to renew the leader lease"),
                Err(_) => tracing::warn!("a renewal of the leader lease did not finish in time"),
            }
            if last_renewal.elapsed() >= self.timing.renew_deadline {
                tracing::error!(
                    deadline = ?self.timing.renew_deadline,
                    "could not renew the leader lease within the renew deadline; stepping down"
                );
                return;
            }
        }
    }
}
