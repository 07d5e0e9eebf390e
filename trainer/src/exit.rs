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
