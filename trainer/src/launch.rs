//! `trainyard-trainer launch`: the in-pod supervisor that runs one trainer
//! process per GPU, the way `torchrun --nproc-per-node` does.
//!
//! A worker pod with N GPUs is one *node* of the group: the planner gives it
//! `WORLD_SIZE` (every process of the job), `GROUP_RANK` (the pod's index among
//! the workers) and `LOCAL_WORLD_SIZE` (N). The supervisor starts N copies of
//! this binary with the command after `--`, each with `LOCAL_RANK` 0..N−1 (its
//! GPU) and `RANK = GROUP_RANK·N + LOCAL_RANK`.
//!
//! # Signals and exits
//! - SIGTERM/SIGINT are forwarded to every child, which checkpoints and exits
//!   143; a second signal is forwarded too (the trainer then exits at once).
//! - When a child fails, the others are sent SIGTERM (their collectives are
//!   broken anyway) and, after the grace period, SIGKILL.
//! - The supervisor's exit code is the one the operator's gang rules act on
//!   ([`exit_code`]): 0 when every child succeeded; a child's permanent code
//!   (1, or a panic's 101) when one failed that way, since a restart cannot
//!   help; 75 when a child failed in a way a gang restart cures (it exited 75,
//!   was killed by a signal, or stopped by a signal the supervisor did not
//!   send); 143 when the supervisor was asked to stop and every child stopped
//!   with a checkpoint.
#![allow(unsafe_code)]

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::env;
use crate::exit;

/// Most processes one supervisor starts (the spec allows 8 GPUs per worker;
/// this bounds what a hand-written `LOCAL_WORLD_SIZE` can ask for).
pub const MAX_LOCAL_PROCESSES: usize = 64;

/// Why the supervisor could not run its children.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// A group variable is missing its meaning.
    #[error("invalid launch environment: {variable} {message}")]
    Env {
        /// The variable (or flag) at fault.
        variable: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// No trainer command was given.
    #[error(
        "nothing to launch: give the trainer command after `--`, e.g. `launch -- train --out run`"
    )]
    NoCommand,
    /// A child could not be started.
    #[error("failed to start local rank {local_rank} ({program}): {source}")]
    Spawn {
        /// Which child.
        local_rank: usize,
        /// What was run.
        program: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("failed to install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// This pod's place in the group: which processes it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Processes in this pod (one per GPU).
    pub nproc: usize,
    /// This pod's index among the worker pods.
    pub node_rank: usize,
    /// Processes in the whole group.
    pub world_size: usize,
}

impl Node {
    /// Reads `LOCAL_WORLD_SIZE`, `GROUP_RANK` and `WORLD_SIZE` through `get`;
    /// `nproc` and `node_rank` (flags) take precedence. Without any of them this
    /// is one node of one process.
    pub fn from_lookup(
        nproc: Option<usize>,
        node_rank: Option<usize>,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, LaunchError> {
        let number = |variable: &'static str, flag: Option<usize>, default: usize| {
            if let Some(v) = flag {
                return Ok(v);
            }
            match get(variable) {
                None => Ok(default),
                Some(raw) => raw.trim().parse().map_err(|_| LaunchError::Env {
                    variable,
                    message: format!("is `{raw}`, expected a non-negative integer"),
                }),
            }
        };
        let nproc = number(env::LOCAL_WORLD_SIZE, nproc, 1)?;
        if !(1..=MAX_LOCAL_PROCESSES).contains(&nproc) {
            return Err(LaunchError::Env {
                variable: env::LOCAL_WORLD_SIZE,
                message: format!(
                    "is {nproc}; a pod runs 1 to {MAX_LOCAL_PROCESSES} processes (one per GPU)"
                ),
            });
        }
        let node_rank = number(env::GROUP_RANK, node_rank, 0)?;
        let world_size = number(env::WORLD_SIZE, None, nproc)?;
        if world_size % nproc != 0 || world_size < (node_rank + 1) * nproc {
            return Err(LaunchError::Env {
                variable: env::WORLD_SIZE,
                message: format!(
                    "is {world_size}, which does not hold node {node_rank} of {nproc} processes: it must be (worker pods) × {nproc} with {} > GROUP_RANK",
                    world_size / nproc
                ),
            });
        }
        Ok(Self {
            nproc,
            node_rank,
            world_size,
        })
    }

    /// The global rank of local process `local_rank`.
    pub fn rank(&self, local_rank: usize) -> usize {
        self.node_rank * self.nproc + local_rank
    }

    /// The group variables child `local_rank` starts with.
    pub fn child_env(&self, local_rank: usize) -> [(&'static str, String); 5] {
        [
            (env::RANK, self.rank(local_rank).to_string()),
            (env::LOCAL_RANK, local_rank.to_string()),
            (env::WORLD_SIZE, self.world_size.to_string()),
            (env::LOCAL_WORLD_SIZE, self.nproc.to_string()),
            (env::GROUP_RANK, self.node_rank.to_string()),
        ]
    }
}

/// How one child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildExit {
    /// Which child.
    pub local_rank: usize,
    /// Its exit code, or 128 + the signal that killed it (the shell's convention).
    pub code: i32,
    /// Whether the supervisor had signalled it (a forwarded stop, or a sibling's failure).
    pub signalled: bool,
}

impl ChildExit {
    fn new(local_rank: usize, status: ExitStatus, signalled: bool) -> Self {
        let code = status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(i32::from(exit::FAILURE));
        Self {
            local_rank,
            code,
            signalled,
        }
    }

    /// A code that no restart can cure: anything but success, "retryable" and
    /// death by a signal.
    fn is_permanent(&self) -> bool {
        self.code != 0
            && self.code != i32::from(exit::RETRYABLE)
            && !(128..=255).contains(&self.code)
    }

    /// A failure of the child's own, as opposed to the consequence of a signal
    /// the supervisor sent (checkpoint-and-exit, a broken collective, SIGKILL
    /// after the grace period). A permanent code always counts as its own.
    fn failed_on_its_own(&self) -> bool {
        self.code != 0 && (!self.signalled || self.is_permanent())
    }
}

/// The supervisor's exit code for its children's exits (see the module docs).
pub fn exit_code(exits: &[ChildExit], stop_requested: bool) -> u8 {
    let own: Vec<&ChildExit> = exits.iter().filter(|e| e.failed_on_its_own()).collect();
    if let Some(permanent) = own.iter().find(|e| e.is_permanent()) {
        return u8::try_from(permanent.code).unwrap_or(exit::FAILURE);
    }
    if !own.is_empty() {
        return exit::RETRYABLE;
    }
    if exits.iter().all(|e| e.code == 0) {
        return exit::SUCCESS;
    }
    if stop_requested {
        exit::STOPPED
    } else {
        // Stopped by us without a failure or a request: cannot happen, but a
        // restart is the safe reading.
        exit::RETRYABLE
    }
}

struct Running {
    local_rank: usize,
    child: Child,
    signalled: bool,
}

impl Running {
    fn signal(&mut self, signal: Signal) {
        self.signalled = true;
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pids fit in i32"));
        // The child may have exited between the check and the signal: ESRCH
        // then, and its exit is collected on the next poll.
        let _ = kill(pid, signal);
    }
}

/// Starts `node.nproc` copies of `program args` and supervises them until all
/// have exited; returns the exit code to leave with. `grace` is how long
/// siblings of a failed child get to exit after SIGTERM before SIGKILL.
pub fn run(
    node: &Node,
    program: &Path,
    args: &[OsString],
    grace: Duration,
) -> Result<u8, LaunchError> {
    if args.is_empty() {
        return Err(LaunchError::NoCommand);
    }
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(LaunchError::Signals)?;
    let mut running: Vec<Running> = Vec::with_capacity(node.nproc);
    for local_rank in 0..node.nproc {
        match spawn(node, program, args, local_rank) {
            Ok(child) => running.push(Running {
                local_rank,
                child,
                signalled: false,
            }),
            Err(e) => {
                for r in &mut running {
                    r.signal(Signal::SIGKILL);
                    let _ = r.child.wait();
                }
                return Err(e);
            }
        }
    }
    tracing::info!(
        nproc = node.nproc,
        node_rank = node.node_rank,
        world_size = node.world_size,
        first_rank = node.rank(0),
        "started one trainer per local rank"
    );
    let mut exits = Vec::with_capacity(node.nproc);
    let mut stop_requested = false;
    let mut failed_at: Option<Instant> = None;
    while !running.is_empty() {
        for signal in signals.pending() {
            stop_requested = true;
            let signal = Signal::try_from(signal).unwrap_or(Signal::SIGTERM);
            tracing::info!(%signal, "forwarding to every local rank");
            running.iter_mut().for_each(|r| r.signal(signal));
        }
        let mut i = 0;
        while i < running.len() {
            let status = match running[i].child.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => {
                    i += 1;
                    continue;
                }
                // Only if the child was already reaped: count it as lost.
                Err(_) => ExitStatus::from_raw(i32::from(exit::RETRYABLE) << 8),
            };
            let r = running.swap_remove(i);
            let e = ChildExit::new(r.local_rank, status, r.signalled);
            if e.failed_on_its_own() {
                tracing::error!(
                    local_rank = e.local_rank,
                    rank = node.rank(e.local_rank),
                    code = e.code,
                    "a local rank failed"
                );
            } else {
                tracing::info!(
                    local_rank = e.local_rank,
                    code = e.code,
                    "a local rank exited"
                );
            }
            if e.failed_on_its_own() && failed_at.is_none() {
                failed_at = Some(Instant::now());
                running.iter_mut().for_each(|r| r.signal(Signal::SIGTERM));
            }
            exits.push(e);
        }
        if failed_at.is_some_and(|t| t.elapsed() >= grace) {
            for r in running.iter_mut() {
                tracing::warn!(
                    local_rank = r.local_rank,
                    "still running after the grace period; killing it"
                );
                r.signal(Signal::SIGKILL);
            }
            failed_at = None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    exits.sort_by_key(|e| e.local_rank);
    Ok(exit_code(&exits, stop_requested))
}

fn spawn(
    node: &Node,
    program: &Path,
    args: &[OsString],
    local_rank: usize,
) -> Result<Child, LaunchError> {
    let mut command = Command::new(program);
    command.args(args).envs(node.child_env(local_rank));
    // SAFETY: the closure runs in the forked child before exec and only makes
    // one async-signal-safe system call (prctl).
    unsafe {
        command.pre_exec(|| {
            // A child must not outlive its supervisor (SIGKILL of the pod's
            // main process, or of `trainyard local`).
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    command.spawn().map_err(|source| LaunchError::Spawn {
        local_rank,
        program: program.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn node(pairs: &[(&str, &str)]) -> Result<Node, LaunchError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Node::from_lookup(None, None, |k| map.get(k).cloned())
    }

    #[test]
    fn ranks_follow_torchrun() {
        let n = node(&[
            ("WORLD_SIZE", "8"),
            ("GROUP_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
        ])
        .unwrap();
        let env: Vec<_> = (0..4).map(|l| n.child_env(l)).collect();
        assert_eq!(
            env[2],
            [
                ("RANK", "6".into()),
                ("LOCAL_RANK", "2".into()),
                ("WORLD_SIZE", "8".into()),
                ("LOCAL_WORLD_SIZE", "4".into()),
                ("GROUP_RANK", "1".into()),
            ]
        );
        assert_eq!(n.rank(0), 4);
        let alone = node(&[]).unwrap();
        assert_eq!((alone.nproc, alone.node_rank, alone.world_size), (1, 0, 1));
    }

    #[test]
    fn inconsistent_groups_name_the_variable() {
        for (pairs, variable) in [
            (vec![("LOCAL_WORLD_SIZE", "0")], "LOCAL_WORLD_SIZE"),
            (vec![("LOCAL_WORLD_SIZE", "65")], "LOCAL_WORLD_SIZE"),
            (vec![("LOCAL_WORLD_SIZE", "x")], "LOCAL_WORLD_SIZE"),
            (
                vec![("LOCAL_WORLD_SIZE", "2"), ("WORLD_SIZE", "3")],
                "WORLD_SIZE",
            ),
            (
                vec![
                    ("LOCAL_WORLD_SIZE", "2"),
                    ("WORLD_SIZE", "4"),
                    ("GROUP_RANK", "2"),
                ],
                "WORLD_SIZE",
            ),
            (vec![("GROUP_RANK", "-1")], "GROUP_RANK"),
        ] {
            match node(&pairs) {
                Err(LaunchError::Env { variable: v, .. }) => assert_eq!(v, variable, "{pairs:?}"),
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
    }

    fn e(local_rank: usize, code: i32, signalled: bool) -> ChildExit {
        ChildExit {
            local_rank,
            code,
            signalled,
        }
    }

    #[test]
    fn exit_codes_are_the_most_telling() {
        // Every child finished.
        assert_eq!(exit_code(&[e(0, 0, false), e(1, 0, false)], false), 0);
        // One was killed (OOM, say); we stopped the other: a restart helps.
        assert_eq!(exit_code(&[e(0, 137, false), e(1, 143, true)], false), 75);
        // A peer died: the survivor's 75 is the group's.
        assert_eq!(exit_code(&[e(0, 75, false), e(1, 137, true)], false), 75);
        // A permanent failure wins, even seen after a retryable one.
        assert_eq!(exit_code(&[e(0, 75, false), e(1, 1, false)], false), 1);
        assert_eq!(exit_code(&[e(0, 101, true), e(1, 75, false)], false), 101);
        // Asked to stop: every child checkpointed.
        assert_eq!(exit_code(&[e(0, 143, true), e(1, 143, true)], true), 143);
        // Finished just as the stop arrived.
        assert_eq!(exit_code(&[e(0, 0, true), e(1, 0, true)], true), 0);
        // A child stopped by a signal we never sent: someone else's stop.
        assert_eq!(exit_code(&[e(0, 143, false), e(1, 143, true)], false), 75);
    }
}
