//! The rendezvous store: a small TCP key-value store served by rank 0, like
//! torch's `TCPStore`. Ranks join it, publish their data-plane addresses (and,
//! for NCCL, the unique id) and wait for each other's keys.
//!
//! See [`StoreServer`] and [`StoreClient`]. A connection opens with the
//! group handshake ([`super::auth`]): the connector proves it holds the
//! job's secret and claims its rank, world size and run attempt; the store
//! refuses a stale attempt, a duplicate rank or a world-size mismatch with a
//! reason. Only then are requests served. Wire format after the handshake:
//! every message is a frame `u32 length (LE) | payload`; a request is
//! `op u8 | fields`, each field a frame.
//!
//! # Bounds
//! A stranger gets [`HANDSHAKE_TIMEOUT`] to prove itself, at most
//! [`MAX_PENDING_PER_HOST`] handshakes at a time from one address and
//! [`MAX_PENDING`] in all; what fails or exceeds them is closed and counted
//! ([`StoreServer::refused`]). Members' keys are at most [`MAX_KEY`] bytes,
//! values [`MAX_VALUE`], the store [`MAX_KEYS`] keys and [`MAX_BYTES`] bytes;
//! a request beyond them is refused, and a GET waits at most [`MAX_WAIT`].

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::auth::{self, AuthError, GroupKey, Purpose};

/// How long a new connection has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress from one address.
pub const MAX_PENDING_PER_HOST: usize = 4;
/// Handshakes in progress in all.
pub const MAX_PENDING: usize = 64;
/// Longest key.
pub const MAX_KEY: usize = 256;
/// Largest value (store values are addresses, ids and short messages).
pub const MAX_VALUE: usize = 64 << 10;
/// Most keys.
pub const MAX_KEYS: usize = 4096;
/// Most bytes of keys and values together.
pub const MAX_BYTES: usize = 16 << 20;
/// Longest a GET may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// How long a member may take to read a reply before it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

const OP_SET: u8 = 2;
const OP_GET: u8 = 3;

const OK: u8 = 0;
const ERR: u8 = 1;
const TIMEOUT: u8 = 2;

/// Why talking to the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached before the join timeout.
    #[error(
        "could not reach the rendezvous store at {addr} within {timeout:?} (is rank 0 running and MASTER_ADDR/MASTER_PORT right?): {source}"
    )]
    Unreachable {
        /// The store address.
        addr: String,
        /// How long we tried.
        timeout: Duration,
        /// The last connection error.
        source: std::io::Error,
    },
    /// The store refused this process.
    #[error("the rendezvous store refused rank {rank}: {reason}")]
    Refused {
        /// This process's rank.
        rank: usize,
        /// What the store said.
        reason: String,
    },
    /// A key did not appear in time.
    #[error(
        "timed out after {timeout:?} waiting for `{key}` in the rendezvous store (did a peer fail to start?)"
    )]
    Timeout {
        /// The key.
        key: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The connection broke or the peer spoke nonsense.
    #[error("rendezvous store connection failed: {0}")]
    Io(#[from] std::io::Error),
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

fn write_frame(w: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(bytes)
}

/// Reads a frame of at most `limit` bytes; a longer one is refused before
/// anything is allocated for it.
fn read_frame(r: &mut impl Read, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > limit {
        return Err(invalid(format!(
            "a frame of {len} bytes, more than the {limit} allowed"
        )));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn read_u8(r: &mut impl Read) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn u64_of(bytes: &[u8]) -> std::io::Result<u64> {
    bytes
        .try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| invalid("expected an 8-byte integer".into()))
}

#[derive(Default)]
struct State {
    values: HashMap<String, Vec<u8>>,
    bytes: usize,
    joined: HashSet<usize>,
}

impl State {
    /// Stores `value` under `key` within the store's bounds.
    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        let old = self.values.get(&key).map_or(0, |v| key.len() + v.len());
        let bytes = self.bytes - old + key.len() + value.len();
        if old == 0 && self.values.len() >= MAX_KEYS {
            return Err(format!("the store holds {MAX_KEYS} keys already"));
        }
        if bytes > MAX_BYTES {
            return Err(format!("the store would hold more than {MAX_BYTES} bytes"));
        }
        self.bytes = bytes;
        self.values.insert(key, value);
        Ok(())
    }
}

/// Handshakes in progress, by address: the admission of new connections.
#[derive(Default)]
struct Pending {
    by_host: HashMap<IpAddr, usize>,
    total: usize,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    pending: Mutex<Pending>,
    refused: AtomicU64,
    world_size: usize,
    attempt: u64,
    key: GroupKey,
}

/// A slot among the handshakes in progress, freed when dropped.
struct PendingSlot {
    shared: Arc<Shared>,
    host: IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut p = self.shared.pending.lock().expect("pending lock");
        p.total -= 1;
        if let Some(n) = p.by_host.get_mut(&self.host) {
            *n -= 1;
            if *n == 0 {
                p.by_host.remove(&self.host);
            }
        }
    }
}

impl Shared {
    fn admit(self: &Arc<Self>, host: IpAddr) -> Option<PendingSlot> {
        let mut p = self.pending.lock().expect("pending lock");
        let from_host = p.by_host.get(&host).copied().unwrap_or(0);
        if p.total >= MAX_PENDING || from_host >= MAX_PENDING_PER_HOST {
            return None;
        }
        p.total += 1;
        *p.by_host.entry(host).or_default() += 1;
        Some(PendingSlot {
            shared: self.clone(),
            host,
        })
    }

    fn refuse(&self, peer: SocketAddr, why: &dyn std::fmt::Display) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, reason = %why, "rendezvous store closed a connection");
    }
}

/// The store, served from background threads of rank 0's process. It lives
/// as long as the process (ranks may still be reading keys when rank 0's
/// training loop ends).
pub struct StoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl StoreServer {
    /// Binds `addr` and serves a store for `world_size` ranks of run attempt
    /// `attempt` that hold `key`.
    pub fn start(
        addr: SocketAddr,
        world_size: usize,
        attempt: u64,
        key: GroupKey,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            pending: Mutex::new(Pending::default()),
            refused: AtomicU64::new(0),
            world_size,
            attempt,
            key,
        });
        let accepting = shared.clone();
        std::thread::Builder::new()
            .name("store-accept".into())
            .spawn(move || accept_loop(&listener, &accepting))?;
        Ok(Self {
            addr: local,
            shared,
        })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections closed before or at the handshake: strangers, garbage,
    /// silence, wrong secrets, refused joins and connections over the limits.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut backoff = Duration::from_millis(5);
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: wait rather than spin on the error.
                tracing::warn!(error = %e, "rendezvous store cannot accept; backing off");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(5);
        let Ok(peer) = conn.peer_addr() else { continue };
        let Some(slot) = shared.admit(peer.ip()) else {
            shared.refuse(peer, &"too many handshakes in progress");
            continue;
        };
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("store-conn".into())
            .spawn(move || serve(conn, peer, &shared, slot));
        if spawned.is_err() {
            tracing::warn!(%peer, "no thread for a store connection");
        }
    }
}

/// One connection: the handshake and the join within [`HANDSHAKE_TIMEOUT`],
/// then the member's requests until it disconnects.
fn serve(mut conn: TcpStream, peer: SocketAddr, shared: &Shared, slot: PendingSlot) {
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = conn.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    let claim = match auth::accept(&mut conn, &shared.key, Purpose::Store) {
        Ok(claim) => claim,
        Err(e) => return shared.refuse(peer, &e),
    };
    drop(slot);
    let Some([rank, world, attempt]) = auth::parse_claim::<3>(&claim) else {
        return shared.refuse(peer, &"a join claim of the wrong shape");
    };
    let (rank, world) = (rank as usize, world as usize);
    let refusal = if world != shared.world_size {
        Some(format!(
            "WORLD_SIZE is {world} here but {} at rank 0",
            shared.world_size
        ))
    } else if attempt != shared.attempt {
        Some(format!(
            "this process belongs to run attempt {attempt} but the group is on attempt {} (TRAINYARD_RUN_ATTEMPT); a stale process must not join",
            shared.attempt
        ))
    } else if rank >= world {
        Some(format!("RANK {rank} is not below WORLD_SIZE {world}"))
    } else if !shared.state.lock().expect("store lock").joined.insert(rank) {
        Some(format!(
            "rank {rank} has already joined; two processes claim the same RANK"
        ))
    } else {
        None
    };
    if let Some(reason) = refusal {
        // Counted before the reply, so whoever reads the refusal also sees it counted.
        shared.refuse(peer, &reason);
        let _ = conn
            .write_all(&[ERR])
            .and_then(|_| write_frame(&mut conn, reason.as_bytes()));
        return;
    }
    shared.changed.notify_all();
    // A member: it waits on keys for as long as it needs, but must read its
    // replies.
    let _ = conn.set_read_timeout(None);
    let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
    if conn
        .write_all(&[OK])
        .and_then(|_| write_frame(&mut conn, &[]))
        .is_ok()
    {
        while let Ok(op) = read_u8(&mut conn) {
            let Ok((status, payload)) = request(&mut conn, op, shared) else {
                break;
            };
            if conn
                .write_all(&[status])
                .and_then(|_| write_frame(&mut conn, &payload))
                .is_err()
            {
                break;
            }
        }
    }
    // A rank that disconnects may rejoin (same attempt) after a restart of its own.
    shared
        .state
        .lock()
        .expect("store lock")
        .joined
        .remove(&rank);
}

/// A member's request: its reply, or an error that ends the connection.
fn request(conn: &mut impl Read, op: u8, shared: &Shared) -> std::io::Result<(u8, Vec<u8>)> {
    match op {
        OP_SET => {
            let key = String::from_utf8_lossy(&read_frame(conn, MAX_KEY)?).into_owned();
            let value = read_frame(conn, MAX_VALUE)?;
            let stored = shared.state.lock().expect("store lock").set(key, value);
            shared.changed.notify_all();
            Ok(match stored {
                Ok(()) => (OK, Vec::new()),
                Err(reason) => (ERR, reason.into_bytes()),
            })
        }
        OP_GET => {
            let key = String::from_utf8_lossy(&read_frame(conn, MAX_KEY)?).into_owned();
            let wait = Duration::from_millis(u64_of(&read_frame(conn, 8)?)?).min(MAX_WAIT);
            let deadline = Instant::now() + wait;
            let mut state = shared.state.lock().expect("store lock");
            loop {
                if let Some(v) = state.values.get(&key) {
                    return Ok((OK, v.clone()));
                }
                let now = Instant::now();
                if now >= deadline {
                    return Ok((TIMEOUT, Vec::new()));
                }
                state = shared
                    .changed
                    .wait_timeout(state, deadline - now)
                    .expect("store lock")
                    .0;
            }
        }
        other => Err(invalid(format!("unknown request {other}"))),
    }
}

/// A rank's connection to the store.
pub struct StoreClient {
    conn: TcpStream,
    rank: usize,
}

impl StoreClient {
    /// Connects (retrying until `join_timeout`), proves membership with
    /// `key` and joins as `rank` of `world_size` in run attempt `attempt`.
    pub fn join(
        addr: &str,
        rank: usize,
        world_size: usize,
        attempt: u64,
        key: &GroupKey,
        join_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let deadline = Instant::now() + join_timeout;
        let mut backoff = Duration::from_millis(50);
        let claim = auth::claim(&[rank as u64, world_size as u64, attempt]);
        loop {
            let attempt_result = TcpStream::connect(addr).and_then(|conn| {
                conn.set_nodelay(true)?;
                conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
                conn.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
                Ok(conn)
            });
            let failure = match attempt_result {
                Ok(mut conn) => match auth::connect(&mut conn, key, Purpose::Store, &claim) {
                    Ok(()) => {
                        let mut client = Self { conn, rank };
                        let (status, payload) = client.reply()?;
                        if status != OK {
                            return Err(StoreError::Refused {
                                rank,
                                reason: String::from_utf8_lossy(&payload).into_owned(),
                            });
                        }
                        client.conn.set_read_timeout(None)?;
                        client.conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
                        return Ok(client);
                    }
                    Err(AuthError::Rejected(_)) => {
                        return Err(StoreError::Refused {
                            rank,
                            reason: format!(
                                "the store at {addr} holds another group secret ({}); every rank of a job needs the same one",
                                crate::env::GROUP_SECRET
                            ),
                        });
                    }
                    // Busy (too many handshakes) or not a store yet: retry.
                    Err(AuthError::Io(e)) => e,
                    Err(AuthError::Protocol(m)) => invalid(m),
                },
                Err(e) => e,
            };
            if Instant::now() + backoff >= deadline {
                return Err(StoreError::Unreachable {
                    addr: addr.to_owned(),
                    timeout: join_timeout,
                    source: failure,
                });
            }
            tracing::debug!(addr, error = %failure, "store not reachable yet, retrying");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    fn reply(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let status = read_u8(&mut self.conn)?;
        Ok((status, read_frame(&mut self.conn, MAX_VALUE)?))
    }

    /// The address of this end of the connection: the interface through
    /// which this host reaches rank 0, hence one its peers can reach too.
    pub fn local_ip(&self) -> std::io::Result<std::net::IpAddr> {
        Ok(self.conn.local_addr()?.ip())
    }

    /// Sets `key` to `value`.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.conn.write_all(&[OP_SET])?;
        write_frame(&mut self.conn, key.as_bytes())?;
        write_frame(&mut self.conn, value)?;
        match self.reply()? {
            (OK, _) => Ok(()),
            (_, msg) => Err(StoreError::Refused {
                rank: self.rank,
                reason: String::from_utf8_lossy(&msg).into_owned(),
            }),
        }
    }

    /// Waits up to `timeout` for `key` and returns its value.
    pub fn get(&mut self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        self.conn.write_all(&[OP_GET])?;
        write_frame(&mut self.conn, key.as_bytes())?;
        write_frame(&mut self.conn, &(timeout.as_millis() as u64).to_le_bytes())?;
        match self.reply()? {
            (OK, value) => Ok(value),
            (TIMEOUT, _) => Err(StoreError::Timeout {
                key: key.to_owned(),
                timeout,
            }),
            (_, msg) => Err(StoreError::Refused {
                rank: self.rank,
                reason: String::from_utf8_lossy(&msg).into_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> GroupKey {
        GroupKey::new("a store test secret").unwrap()
    }

    fn server(world: usize, attempt: u64) -> StoreServer {
        StoreServer::start("127.0.0.1:0".parse().unwrap(), world, attempt, key()).unwrap()
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn set_get_and_waiting_get() {
        let s = server(2, 0);
        let addr = s.addr().to_string();
        let mut a = StoreClient::join(&addr, 0, 2, 0, &key(), T).unwrap();
        let addr2 = addr.clone();
        let waiter = std::thread::spawn(move || {
            let mut b = StoreClient::join(&addr2, 1, 2, 0, &key(), T).unwrap();
            b.get("late", T).unwrap()
        });
        std::thread::sleep(Duration::from_millis(100));
        a.set("late", b"hello").unwrap();
        assert_eq!(waiter.join().unwrap(), b"hello");
        let e = a.get("never", Duration::from_millis(50)).unwrap_err();
        assert!(matches!(e, StoreError::Timeout { .. }), "{e}");
    }

    #[test]
    fn stale_attempts_duplicates_and_mismatched_worlds_are_refused() {
        let s = server(2, 3);
        let addr = s.addr().to_string();
        let _ok = StoreClient::join(&addr, 0, 2, 3, &key(), T).unwrap();
        let stale = StoreClient::join(&addr, 1, 2, 2, &key(), T)
            .err()
            .unwrap()
            .to_string();
        assert!(
            stale.contains("attempt 2") && stale.contains("attempt 3"),
            "{stale}"
        );
        let dup = StoreClient::join(&addr, 0, 2, 3, &key(), T)
            .err()
            .unwrap()
            .to_string();
        assert!(dup.contains("already joined"), "{dup}");
        let world = StoreClient::join(&addr, 1, 3, 3, &key(), T)
            .err()
            .unwrap()
            .to_string();
        assert!(world.contains("WORLD_SIZE is 3"), "{world}");
        assert_eq!(s.refused(), 3);
    }

    #[test]
    fn a_wrong_secret_is_refused_at_once_naming_the_variable() {
        let s = server(2, 0);
        let started = Instant::now();
        let other = GroupKey::new("another group's secret").unwrap();
        let e = StoreClient::join(&s.addr().to_string(), 1, 2, 0, &other, T)
            .err()
            .unwrap();
        assert!(matches!(e, StoreError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("TRAINYARD_GROUP_SECRET"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    /// Strangers are closed before any request is served: no SET lands and
    /// the rank they squat on stays free for its owner.
    #[test]
    fn strangers_cannot_squat_set_or_hold_the_store() {
        let s = server(2, 0);
        let addr = s.addr();
        // A plain request without the handshake, and garbage.
        for bytes in [&[OP_SET, 4, 0, 0, 0][..], &[0xff; 64][..]] {
            let mut c = TcpStream::connect(addr).unwrap();
            let _ = c.write_all(bytes);
            let mut rest = Vec::new();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = c.read_to_end(&mut rest);
        }
        // A squatter for rank 1 with a wrong secret.
        let squatter = GroupKey::new("a guessed secret!").unwrap();
        assert!(StoreClient::join(&addr.to_string(), 1, 2, 0, &squatter, T).is_err());
        // Silent connections beyond the per-host limit are closed at once;
        // those within it, at the handshake deadline.
        let silent: Vec<TcpStream> = (0..MAX_PENDING_PER_HOST + 2)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(HANDSHAKE_TIMEOUT + Duration::from_millis(500));
        // The real rank 1 joins once the silent ones are gone.
        let mut member = StoreClient::join(&addr.to_string(), 1, 2, 0, &key(), T).unwrap();
        let e = member.get("x", Duration::from_millis(10)).unwrap_err();
        assert!(
            matches!(e, StoreError::Timeout { .. }),
            "nothing was SET: {e}"
        );
        assert!(s.refused() >= 3 + silent.len() as u64, "{}", s.refused());
        drop(silent);
    }

    #[test]
    fn values_keys_and_the_store_are_bounded() {
        let s = server(1, 0);
        let mut m = StoreClient::join(&s.addr().to_string(), 0, 1, 0, &key(), T).unwrap();
        m.set("ok", &vec![1u8; MAX_VALUE]).unwrap();
        // An oversize value ends the connection before it is read.
        assert!(m.set("big", &vec![1u8; MAX_VALUE + 1]).is_err());
        let mut m = StoreClient::join(&s.addr().to_string(), 0, 1, 0, &key(), T).unwrap();
        for i in 0..MAX_KEYS - 1 {
            m.set(&i.to_string(), b"v").unwrap();
        }
        let e = m.set("one too many", b"v").unwrap_err();
        assert!(e.to_string().contains("keys already"), "{e}");
        m.set("0", b"overwrite is fine").unwrap();
    }

    /// A Read + Write over fixed input that records what is written.
    struct Wire {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Wire {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Wire {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn shared() -> Shared {
        Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            pending: Mutex::new(Pending::default()),
            refused: AtomicU64::new(0),
            world_size: 2,
            attempt: 0,
            key: key(),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Whatever a stranger sends, the handshake neither panics nor
        /// accepts it, and reads no more than its fixed-size greeting.
        #[test]
        fn no_input_passes_the_handshake_without_the_secret(input in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let mut wire = Wire { input: std::io::Cursor::new(input), output: Vec::new() };
            proptest::prop_assert!(auth::accept(&mut wire, &key(), Purpose::Store).is_err());
            proptest::prop_assert!(wire.input.position() <= 32 + 1 + 64 + 32);
        }

        /// Whatever a member's request holds, decoding it neither panics nor
        /// allocates past the bounds, and the store stays within its own. (A
        /// GET waits as long as it asks; its decoding is the SET's.)
        #[test]
        fn member_requests_decode_within_bounds(
            op in proptest::prop_oneof![proptest::strategy::Just(OP_SET), 0u8..2, 4u8..=255],
            input in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            let s = shared();
            let _ = request(&mut std::io::Cursor::new(input), op, &s);
            let state = s.state.lock().unwrap();
            proptest::prop_assert!(state.values.len() <= 1 && state.bytes <= 300);
        }

        /// Well-framed SETs: keys over the bound are refused, the rest stored.
        #[test]
        fn framed_sets_respect_the_key_bound(
            key in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            value in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let s = shared();
            let mut bytes = Vec::new();
            write_frame(&mut bytes, &key).unwrap();
            write_frame(&mut bytes, &value).unwrap();
            let reply = request(&mut std::io::Cursor::new(bytes), OP_SET, &s);
            proptest::prop_assert_eq!(reply.is_ok(), key.len() <= MAX_KEY);
            let stored = s.state.lock().unwrap().values.len();
            proptest::prop_assert_eq!(stored, usize::from(key.len() <= MAX_KEY));
        }
    }

    #[test]
    fn unreachable_store_fails_after_the_join_timeout() {
        // A port nobody listens on: bind then drop.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = Instant::now();
        let e = StoreClient::join(
            &format!("127.0.0.1:{port}"),
            1,
            2,
            0,
            &key(),
            Duration::from_millis(400),
        )
        .err()
        .unwrap();
        assert!(matches!(e, StoreError::Unreachable { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(e.to_string().contains("MASTER_ADDR"));
    }
}
