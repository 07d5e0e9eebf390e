//! Leader election with a `coordination.k8s.io/v1` Lease, so that two
//! operator replicas never reconcile at once.
//!
//! kube-rs 5 has no elector. This one follows client-go's rules: a holder
//! renews every [`RENEW_EVERY`]; a Lease not renewed for its
//! `leaseDurationSeconds` may be taken over; every write is a `replace` with
//! the resourceVersion read, so two candidates cannot both win. A leader that
//! fails to renew before its lease expires stops leading at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

/// How long a lease lasts without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Competes for one Lease as `identity`.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
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
        }
    }

    /// One round: take the lease if it is free or expired, renew it if ours.
    pub async fn try_acquire(&self, now: Timestamp) -> Result<Standing, kube::Error> {
        let existing = self.api.get_opt(&self.name).await?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, 0, now)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Standing::Leader),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Standing::Follower {
                    holder: "(another candidate)".into(),
                }),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let renewed = spec.renew_time.as_ref().map(|t| t.0);
        let duration = spec
            .lease_duration_seconds
            .map_or(LEASE_DURATION, |s| Duration::from_secs(s.max(1) as u64));
        let expired = renewed.is_none_or(|t| {
            t + SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX) <= now
        });
        let ours = holder == self.identity;
        if !ours && !holder.is_empty() && !expired {
            return Ok(Standing::Follower { holder });
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours {
            spec.acquire_time.map_or(now, |t| t.0)
        } else {
            now
        };
        lease.spec = Some(self.spec(acquired, transitions, now));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Standing::Leader),
            // Someone else wrote first; they lead this round.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Standing::Follower {
                holder: "(another candidate)".into(),
            }),
            Err(e) => Err(e),
        }
    }

    fn spec(&self, acquired: Timestamp, transitions: i32, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
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
            match self.try_acquire(Timestamp::now()).await {
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
            tokio::time::sleep(RENEW_EVERY).await;
        }
    }

    /// Renews for as long as it can; returns when leadership is lost (a
    /// renewal failed past the lease's expiry, or someone else took it).
    pub async fn keep_leading(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match self.try_acquire(Timestamp::now()).await {
                Ok(Standing::Leader) => last_renewal = tokio::time::Instant::now(),
                Ok(Standing::Follower { holder }) => {
                    tracing::error!(%holder, "lost the leader lease");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "failed to renew the leader lease");
                    // Stop before the lease can expire under us.
                    if last_renewal.elapsed() + RENEW_EVERY >= LEASE_DURATION {
                        tracing::error!("could not renew the leader lease in time");
                        return;
                    }
                }
            }
        }
    }
}
