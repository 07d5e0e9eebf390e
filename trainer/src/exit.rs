//! Exit codes of `trainyard-trainer`, shared with the operator's failure rules.
//!
//! A supervisor decides from the code alone whether restarting the group can
//! help: a config error fails the same way every time, a dead peer does not.

/// Training finished.
pub const SUCCESS: u8 = 0;
/// A permanent error: bad config, bad data, a checkpoint that does not fit.
/// Restarting will fail the same way.
pub const FAILURE: u8 = 1;
/// A transient error (sysexits' `EX_TEMPFAIL`): a peer died or stalled, or the
/// rendezvous could not be reached. Restarting the whole group from the last
/// checkpoint is the cure.
pub const RETRYABLE: u8 = 75;
/// Stopped by SIGTERM or SIGINT after writing a checkpoint (the shell's
/// 128 + 15): resumable.
pub const STOPPED: u8 = 143;

/// The exit code a supervisor acts on for an error that ended a command:
/// stopped on request, transient (a peer, the network), or permanent.
#[cfg(feature = "engine")]
pub fn code_of(e: &anyhow::Error) -> u8 {
    use crate::collective::CollectiveError;
    use crate::federated::FederatedError;
    use crate::train::TrainError;
    if let Some(f) = e.downcast_ref::<FederatedError>() {
        return match f {
            FederatedError::Stopped(_) => STOPPED,
            f if f.is_transient() => RETRYABLE,
            _ => FAILURE,
        };
    }
    let collective = match e.downcast_ref::<TrainError>() {
        Some(TrainError::Stopped { .. }) => return STOPPED,
        Some(TrainError::Collective(c)) => Some(c),
        _ => e.downcast_ref::<CollectiveError>(),
    };
    match collective {
        Some(c) if c.is_transient() => RETRYABLE,
        _ => FAILURE,
    }
}

#[cfg(all(test, feature = "engine"))]
mod tests {
    use super::*;
    use crate::collective::CollectiveError;
    use crate::federated::FederatedError;
    use crate::train::TrainError;

    #[test]
    fn stopped_transient_and_permanent_errors_get_their_codes() {
        let stopped = TrainError::Stopped {
            step: 3,
            checkpoint: "ck".into(),
        };
        assert_eq!(code_of(&stopped.into()), STOPPED);
        let stopped = FederatedError::Stopped("after round 2".into());
        assert_eq!(code_of(&stopped.into()), STOPPED);
        let stalled = CollectiveError::Timeout {
            peer: 1,
            action: "receive from",
            timeout: std::time::Duration::from_secs(300),
        };
        assert_eq!(code_of(&TrainError::Collective(stalled).into()), RETRYABLE);
        let unsupported = CollectiveError::Unsupported("x".into());
        assert_eq!(code_of(&unsupported.into()), FAILURE);
        let through_training = TrainError::Collective(CollectiveError::Setup(
            std::io::Error::other("no such interface"),
        ));
        assert_eq!(code_of(&through_training.into()), FAILURE);
        // Context added on the way up does not hide the cause.
        let e = anyhow::Error::new(TrainError::Stopped {
            step: 1,
            checkpoint: "ck".into(),
        })
        .context("train failed");
        assert_eq!(code_of(&e), STOPPED);
        assert_eq!(code_of(&anyhow::anyhow!("a bad config")), FAILURE);
    }
}
