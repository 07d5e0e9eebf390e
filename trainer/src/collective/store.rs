//! The rendezvous store: a small TCP key-value store served by rank 0, like
//! torch's `TCPStore`. Ranks join it, publish their data-plane addresses (and,
//! for NCCL, the unique id) and wait for each other's keys.
//!
//! See [`StoreServer`] and [`StoreClient`]. Wire format: every message is a
//! frame `u32 length (LE) | payload`; a request is `op u8 | fields`, each field
//! a frame. Joining is a handshake that checks world size, run attempt and
//! rank uniqueness, so a process from an older attempt or a duplicate rank is
//! refused with an error that says which.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Frames larger than this are refused (a store holds small values).
const MAX_FRAME: usize = 16 << 20;

const OP_JOIN: u8 = 1;
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

fn write_frame(w: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(bytes)
}

fn read_frame(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is too large"),
        ));
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
    bytes.try_into().map(u64::from_le_bytes).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "expected an 8-byte integer",
        )
    })
}

#[derive(Default)]
struct State {
    values: HashMap<String, Vec<u8>>,
    joined: HashSet<usize>,
}

/// The store, served from background threads of rank 0's process. It lives
/// as long as the process (ranks may still be reading keys when rank 0's
/// training loop ends).
pub struct StoreServer {
    addr: SocketAddr,
}

impl StoreServer {
    /// Binds `addr` and serves a store for `world_size` ranks of run attempt
    /// `attempt`.
    pub fn start(addr: SocketAddr, world_size: usize, attempt: u64) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        std::thread::Builder::new()
            .name("store-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let shared = shared.clone();
                    let _ = std::thread::Builder::new()
                        .name("store-conn".into())
                        .spawn(move || serve(conn, &shared, world_size, attempt));
                }
            })?;
        Ok(Self { addr: local })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Serves one client until it disconnects.
fn serve(mut conn: TcpStream, shared: &(Mutex<State>, Condvar), world_size: usize, attempt: u64) {
    let _ = conn.set_nodelay(true);
    let (lock, cvar) = shared;
    let mut joined_rank: Option<usize> = None;
    while let Ok(op) = read_u8(&mut conn) {
        let reply: std::io::Result<(u8, Vec<u8>)> = (|| match op {
            OP_JOIN => {
                let rank = u64_of(&read_frame(&mut conn)?)? as usize;
                let their_world = u64_of(&read_frame(&mut conn)?)? as usize;
                let their_attempt = u64_of(&read_frame(&mut conn)?)?;
                let refusal = if their_world != world_size {
                    Some(format!(
                        "WORLD_SIZE is {their_world} here but {world_size} at rank 0"
                    ))
                } else if their_attempt != attempt {
                    Some(format!(
                        "this process belongs to run attempt {their_attempt} but the group is on attempt {attempt} (TRAINYARD_RUN_ATTEMPT); a stale process must not join"
                    ))
                } else if rank >= world_size {
                    Some(format!("RANK {rank} is not below WORLD_SIZE {world_size}"))
                } else if !lock.lock().expect("store lock").joined.insert(rank) {
                    Some(format!(
                        "rank {rank} has already joined; two processes claim the same RANK"
                    ))
                } else {
                    None
                };
                match refusal {
                    Some(r) => Ok((ERR, r.into_bytes())),
                    None => {
                        joined_rank = Some(rank);
                        cvar.notify_all();
                        Ok((OK, Vec::new()))
                    }
                }
            }
            OP_SET => {
                let key = String::from_utf8_lossy(&read_frame(&mut conn)?).into_owned();
                let value = read_frame(&mut conn)?;
                lock.lock().expect("store lock").values.insert(key, value);
                cvar.notify_all();
                Ok((OK, Vec::new()))
            }
            OP_GET => {
                let key = String::from_utf8_lossy(&read_frame(&mut conn)?).into_owned();
                let timeout = Duration::from_millis(u64_of(&read_frame(&mut conn)?)?);
                let deadline = Instant::now() + timeout;
                let mut state = lock.lock().expect("store lock");
                loop {
                    if let Some(v) = state.values.get(&key) {
                        return Ok((OK, v.clone()));
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok((TIMEOUT, Vec::new()));
                    }
                    state = cvar
                        .wait_timeout(state, deadline - now)
                        .expect("store lock")
                        .0;
                }
            }
            other => Ok((ERR, format!("unknown request {other}").into_bytes())),
        })();
        let Ok((status, payload)) = reply else { break };
        if conn
            .write_all(&[status])
            .and_then(|_| write_frame(&mut conn, &payload))
            .is_err()
        {
            break;
        }
    }
    // A rank that disconnects may rejoin (same attempt) after a restart of its own.
    if let Some(rank) = joined_rank {
        lock.lock().expect("store lock").joined.remove(&rank);
    }
}

/// A rank's connection to the store.
pub struct StoreClient {
    conn: TcpStream,
    rank: usize,
}

impl StoreClient {
    /// Connects (retrying until `join_timeout`) and joins as `rank` of
    /// `world_size` in run attempt `attempt`.
    pub fn join(
        addr: &str,
        rank: usize,
        world_size: usize,
        attempt: u64,
        join_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let deadline = Instant::now() + join_timeout;
        let mut backoff = Duration::from_millis(50);
        let conn = loop {
            match TcpStream::connect(addr) {
                Ok(c) => break c,
                Err(e) if Instant::now() + backoff < deadline => {
                    tracing::debug!(addr, error = %e, "store not reachable yet, retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(source) => {
                    return Err(StoreError::Unreachable {
                        addr: addr.to_owned(),
                        timeout: join_timeout,
                        source,
                    });
                }
            }
        };
        conn.set_nodelay(true)?;
        let mut client = Self { conn, rank };
        client.conn.write_all(&[OP_JOIN])?;
        for v in [rank as u64, world_size as u64, attempt] {
            write_frame(&mut client.conn, &v.to_le_bytes())?;
        }
        let (status, payload) = client.reply()?;
        if status != OK {
            return Err(StoreError::Refused {
                rank,
                reason: String::from_utf8_lossy(&payload).into_owned(),
            });
        }
        Ok(client)
    }

    fn reply(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let status = read_u8(&mut self.conn)?;
        Ok((status, read_frame(&mut self.conn)?))
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

    fn server(world: usize, attempt: u64) -> String {
        StoreServer::start("127.0.0.1:0".parse().unwrap(), world, attempt)
            .unwrap()
            .addr()
            .to_string()
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn set_get_and_waiting_get() {
        let addr = server(2, 0);
        let mut a = StoreClient::join(&addr, 0, 2, 0, T).unwrap();
        let addr2 = addr.clone();
        let waiter = std::thread::spawn(move || {
            let mut b = StoreClient::join(&addr2, 1, 2, 0, T).unwrap();
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
        let addr = server(2, 3);
        let _ok = StoreClient::join(&addr, 0, 2, 3, T).unwrap();
        let stale = StoreClient::join(&addr, 1, 2, 2, T)
            .err()
            .unwrap()
            .to_string();
        assert!(
            stale.contains("attempt 2") && stale.contains("attempt 3"),
            "{stale}"
        );
        let dup = StoreClient::join(&addr, 0, 2, 3, T)
            .err()
            .unwrap()
            .to_string();
        assert!(dup.contains("already joined"), "{dup}");
        let world = StoreClient::join(&addr, 1, 3, 3, T)
            .err()
            .unwrap()
            .to_string();
        assert!(world.contains("WORLD_SIZE is 3"), "{world}");
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
            Duration::from_millis(400),
        )
        .err()
        .unwrap();
        assert!(matches!(e, StoreError::Unreachable { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(e.to_string().contains("MASTER_ADDR"));
    }
}
