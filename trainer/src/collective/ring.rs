//! The CPU collective: a ring over TCP. Each rank keeps one connection to its
//! successor and one from its predecessor, set up through the rendezvous
//! store.
//!
//! All-reduce is reduce-scatter then all-gather, `2(n-1)` steps: the buffer is
//! cut into `n` contiguous chunks; in reduce-scatter step `s` rank `r` sends
//! chunk `r - s` and adds the chunk `r - s - 1` it receives, so after `n - 1`
//! steps it holds the finished sum of chunk `r + 1`; all-gather then passes the
//! finished chunks round the ring. Every element is summed once, at one rank,
//! in ring order, and copied everywhere else, so all ranks get bit-identical
//! results. Sending and receiving overlap (a writer thread per step), and
//! received data is added segment by segment as it arrives.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::auth::{self, AuthError, GroupKey, Purpose};
use super::store::{HANDSHAKE_TIMEOUT, StoreClient};
use super::{Collective, CollectiveError, Payload, ReduceOp};

/// Floats read and added at a time while a chunk streams in.
const SEGMENT_FLOATS: usize = 64 * 1024;

/// Timeouts of a ring.
#[derive(Debug, Clone, Copy)]
pub struct RingTimeouts {
    /// How long to wait for peers to appear at start-up.
    pub join: Duration,
    /// How long any single transfer may stall before the peer is declared dead.
    pub collective: Duration,
}

impl Default for RingTimeouts {
    fn default() -> Self {
        Self {
            join: Duration::from_secs(crate::env::DEFAULT_JOIN_TIMEOUT_SECONDS),
            collective: Duration::from_secs(crate::env::DEFAULT_COLLECTIVE_TIMEOUT_SECONDS),
        }
    }
}

/// A TCP ring of `world` ranks.
pub struct TcpRing {
    rank: usize,
    world: usize,
    /// To `rank + 1` (absent for a world of one).
    next: Option<TcpStream>,
    /// From `rank - 1`.
    prev: Option<TcpStream>,
    timeout: Duration,
}

fn io_err(
    peer: usize,
    action: &'static str,
    timeout: Duration,
) -> impl Fn(std::io::Error) -> CollectiveError {
    move |source| {
        if matches!(
            source.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            CollectiveError::Timeout {
                peer,
                action,
                timeout,
            }
        } else {
            CollectiveError::Peer {
                peer,
                action,
                source,
            }
        }
    }
}

/// Handshakes a ring port runs at once; more connections wait in the backlog.
pub const MAX_RING_HANDSHAKES: usize = 8;

/// Connects to the successor and proves to be its predecessor, retrying
/// until `join` has passed while it is not listening yet.
fn connect_forward(
    addr: &str,
    rank: usize,
    next_rank: usize,
    attempt: u64,
    key: &GroupKey,
    join: Duration,
) -> Result<TcpStream, CollectiveError> {
    let claim = auth::claim(&[rank as u64, next_rank as u64, attempt]);
    let deadline = Instant::now() + join;
    loop {
        let tried = TcpStream::connect(addr).and_then(|mut s| {
            s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
            s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
            match auth::connect(&mut s, key, Purpose::Ring, &claim) {
                Ok(()) => Ok(Ok(s)),
                Err(AuthError::Io(e)) => Err(e),
                Err(e) => Ok(Err(e)),
            }
        });
        match tried {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => {
                return Err(CollectiveError::Protocol {
                    peer: next_rank,
                    message: format!("the ring link to rank {next_rank} failed its handshake: {e}"),
                });
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "successor not reachable yet");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(io_err(next_rank, "connect to", join)(e)),
        }
    }
}

/// The link a ring port waits for.
#[derive(Clone, Copy)]
struct Link {
    rank: usize,
    prev_rank: usize,
    /// The predecessor's address as it published it, if it parsed.
    prev_ip: Option<IpAddr>,
    attempt: u64,
}

/// Accepts connections until one proves it is the predecessor's link in
/// this attempt; every other one is closed and logged. Handshakes from the
/// predecessor's address and from elsewhere have separate budgets of
/// [`MAX_RING_HANDSHAKES`], so strangers cannot crowd the predecessor out.
fn accept_predecessor(
    listener: &TcpListener,
    link: Link,
    key: &GroupKey,
    join: Duration,
) -> Result<TcpStream, CollectiveError> {
    let expected = [link.prev_rank as u64, link.rank as u64, link.attempt];
    listener
        .set_nonblocking(true)
        .map_err(CollectiveError::Setup)?;
    let (tx, rx) = std::sync::mpsc::channel::<TcpStream>();
    let [from_prev, from_elsewhere] = [(); 2].map(|_| Arc::new(AtomicUsize::new(0)));
    let deadline = Instant::now() + join;
    loop {
        if let Ok(s) = rx.try_recv() {
            return Ok(s);
        }
        match listener.accept() {
            Ok((s, peer)) => {
                let budget = if Some(peer.ip()) == link.prev_ip {
                    &from_prev
                } else {
                    &from_elsewhere
                };
                if budget.load(Ordering::SeqCst) >= MAX_RING_HANDSHAKES {
                    tracing::warn!(%peer, "closed a connection to the ring port: too many handshakes at once");
                    continue;
                }
                budget.fetch_add(1, Ordering::SeqCst);
                let (tx, budget, key) = (tx.clone(), budget.clone(), key.clone());
                std::thread::spawn(move || {
                    let verified = handshake(s, &key).and_then(|(s, claim)| {
                        if auth::parse_claim::<3>(&claim) == Some(expected) {
                            Ok(s)
                        } else {
                            Err(AuthError::Rejected("a claim for another link or attempt"))
                        }
                    });
                    match verified {
                        Ok(s) => {
                            let _ = tx.send(s);
                        }
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "closed a connection to the ring port that is not the predecessor")
                        }
                    }
                    budget.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                tracing::warn!(error = %e, "the ring port cannot accept; backing off");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) if Instant::now() >= deadline => {
                return Err(CollectiveError::Timeout {
                    peer: link.prev_rank,
                    action: "wait for a connection from",
                    timeout: join,
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The acceptor's side of a ring handshake under [`HANDSHAKE_TIMEOUT`].
fn handshake(mut s: TcpStream, key: &GroupKey) -> Result<(TcpStream, Vec<u8>), AuthError> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let claim = auth::accept(&mut s, key, Purpose::Ring)?;
    Ok((s, claim))
}

impl TcpRing {
    /// Builds the ring: binds a data-plane port on the interface that reaches
    /// the store, publishes it, connects to the successor and accepts the
    /// predecessor. Both links open with the group handshake
    /// ([`super::auth`], claim: sender, receiver, run attempt), so a
    /// connection that cannot prove it is the predecessor is closed and
    /// counted, and the real one is still awaited; handshakes run
    /// concurrently (at most [`MAX_RING_HANDSHAKES`]) under
    /// [`HANDSHAKE_TIMEOUT`], so silent strangers cannot delay it.
    pub fn connect(
        store: &mut StoreClient,
        rank: usize,
        world: usize,
        attempt: u64,
        key: &GroupKey,
        timeouts: RingTimeouts,
    ) -> Result<Self, CollectiveError> {
        if world == 1 {
            return Ok(Self {
                rank,
                world,
                next: None,
                prev: None,
                timeout: timeouts.collective,
            });
        }
        let ip = store.local_ip().map_err(CollectiveError::Setup)?;
        let listener = TcpListener::bind((ip, 0)).map_err(CollectiveError::Setup)?;
        let addr = listener.local_addr().map_err(CollectiveError::Setup)?;
        store.set(&format!("ring/addr/{rank}"), addr.to_string().as_bytes())?;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let next_addr =
            String::from_utf8_lossy(&store.get(&format!("ring/addr/{next_rank}"), timeouts.join)?)
                .into_owned();
        // Where the predecessor connects from: its handshakes never wait
        // behind strangers'.
        let prev_ip =
            String::from_utf8_lossy(&store.get(&format!("ring/addr/{prev_rank}"), timeouts.join)?)
                .parse::<std::net::SocketAddr>()
                .map(|a| a.ip())
                .ok();

        // Connect forward on another thread while accepting from behind, or a
        // ring of blocking connects could wait on each other.
        let forward_key = key.clone();
        let connector = std::thread::spawn(move || {
            connect_forward(
                &next_addr,
                rank,
                next_rank,
                attempt,
                &forward_key,
                timeouts.join,
            )
        });
        let prev = accept_predecessor(
            &listener,
            Link {
                rank,
                prev_rank,
                prev_ip,
                attempt,
            },
            key,
            timeouts.join,
        )?;
        let next = connector.join().expect("connector thread does not panic")?;
        for s in [&next, &prev] {
            s.set_nodelay(true).map_err(CollectiveError::Setup)?;
            s.set_read_timeout(Some(timeouts.collective))
                .map_err(CollectiveError::Setup)?;
            s.set_write_timeout(Some(timeouts.collective))
                .map_err(CollectiveError::Setup)?;
        }
        Ok(Self {
            rank,
            world,
            next: Some(next),
            prev: Some(prev),
            timeout: timeouts.collective,
        })
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// Sends `out` to the successor while receiving `into.len()` values from
    /// the predecessor, either added onto `into` or copied over it, with
    /// `payload` as the wire format.
    fn exchange(
        &mut self,
        out: &[f32],
        into: &mut [f32],
        add: bool,
        payload: Payload,
    ) -> Result<(), CollectiveError> {
        let (next_rank, prev_rank, timeout) = (self.next_rank(), self.prev_rank(), self.timeout);
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Ok(());
        };
        std::thread::scope(|scope| -> Result<(), CollectiveError> {
            let writer = scope.spawn(move || {
                let sent = match payload {
                    // f32 in memory is the wire format (little-endian hosts
                    // only; checked at compile time below).
                    Payload::F32 => next.write_all(bytemuck::cast_slice(out)),
                    half => {
                        let mut encoded = vec![0u16; out.len()];
                        half.encode_slice(out, &mut encoded);
                        next.write_all(bytemuck::cast_slice(&encoded))
                    }
                };
                sent.map_err(io_err(next_rank, "send to", timeout))
            });
            let received = match (payload, add) {
                (Payload::F32, false) => prev
                    .read_exact(bytemuck::cast_slice_mut(into))
                    .map_err(io_err(prev_rank, "receive from", timeout)),
                (Payload::F32, true) => {
                    let mut segment = vec![0f32; SEGMENT_FLOATS.min(into.len())];
                    into.chunks_mut(SEGMENT_FLOATS).try_for_each(|target| {
                        let seg = &mut segment[..target.len()];
                        prev.read_exact(bytemuck::cast_slice_mut(seg))
                            .map_err(io_err(prev_rank, "receive from", timeout))?;
                        for (t, v) in target.iter_mut().zip(seg.iter()) {
                            *t += v;
                        }
                        Ok(())
                    })
                }
                (half, add) => {
                    let mut segment = vec![0u16; SEGMENT_FLOATS.min(into.len())];
                    let mut widened = vec![0f32; segment.len()];
                    into.chunks_mut(SEGMENT_FLOATS).try_for_each(|target| {
                        let seg = &mut segment[..target.len()];
                        prev.read_exact(bytemuck::cast_slice_mut(seg))
                            .map_err(io_err(prev_rank, "receive from", timeout))?;
                        if add {
                            let wide = &mut widened[..target.len()];
                            half.decode_slice(seg, wide);
                            target
                                .iter_mut()
                                .zip(wide.iter())
                                .for_each(|(t, v)| *t += v);
                        } else {
                            half.decode_slice(seg, target);
                        }
                        Ok(())
                    })
                }
            };
            let sent = writer.join().expect("writer thread does not panic");
            received.and(sent)
        })
    }

    /// All-reduce with `payload` on the wire. Half-precision payloads halve
    /// the bytes sent; partial sums travel rounded, and each finished chunk is
    /// rounded once at its owner, so every rank still ends with the same bits.
    /// For an average the values are divided by the world size first, so that
    /// f16 sums do not overflow.
    fn ring_all_reduce(
        &mut self,
        buf: &mut [f32],
        op: ReduceOp,
        payload: Payload,
    ) -> Result<(), CollectiveError> {
        let n = self.world;
        if n == 1 {
            return Ok(());
        }
        let inv = 1.0 / n as f32;
        let prescale = payload != Payload::F32 && op == ReduceOp::Average;
        if prescale {
            buf.iter_mut().for_each(|v| *v *= inv);
        }
        let len = buf.len();
        let r = self.rank;
        for s in 0..n - 1 {
            let send = chunk(len, n, (r + n - s) % n);
            let recv = chunk(len, n, (r + 2 * n - s - 1) % n);
            let (out, into) = split_pair(buf, send, recv);
            self.exchange(out, into, true, payload)?;
        }
        if payload != Payload::F32 {
            // The owner keeps what everyone else will receive.
            let owned = &mut buf[chunk(len, n, (r + 1) % n)];
            let mut bits = vec![0u16; owned.len()];
            payload.encode_slice(owned, &mut bits);
            payload.decode_slice(&bits, owned);
        }
        for s in 0..n - 1 {
            let send = chunk(len, n, (r + 1 + n - s) % n);
            let recv = chunk(len, n, (r + n - s) % n);
            let (out, into) = split_pair(buf, send, recv);
            self.exchange(out, into, false, payload)?;
        }
        if op == ReduceOp::Average && !prescale {
            buf.iter_mut().for_each(|v| *v *= inv);
        }
        Ok(())
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("the TCP ring sends f32 in native byte order, which must be little-endian");

/// Two disjoint ranges of `buf`, one to read and one to write.
fn split_pair(
    buf: &mut [f32],
    read: std::ops::Range<usize>,
    write: std::ops::Range<usize>,
) -> (&[f32], &mut [f32]) {
    if read.start >= write.end {
        let (lo, hi) = buf.split_at_mut(read.start);
        (&hi[..read.len()], &mut lo[write])
    } else {
        assert!(read.end <= write.start, "chunks are disjoint");
        let (lo, hi) = buf.split_at_mut(write.start);
        (&lo[read], &mut hi[..write.len()])
    }
}

/// The half-open range of chunk `c` when `len` values are cut into `n` chunks.
fn chunk(len: usize, n: usize, c: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / n, len % n);
    let start = c * base + c.min(extra);
    start..start + base + usize::from(c < extra)
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CollectiveError> {
        self.ring_all_reduce(buf, op, Payload::F32)
    }

    fn all_reduce_with(
        &mut self,
        buf: &mut [f32],
        op: ReduceOp,
        payload: Payload,
    ) -> Result<(), CollectiveError> {
        self.ring_all_reduce(buf, op, payload)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let n = self.world;
        // Pass the buffer round the ring from the root; the root's
        // predecessor receives last and forwards nothing.
        let position = (self.rank + n - root) % n;
        for step in 0..n.saturating_sub(1) {
            let sending = position == step;
            let receiving = position == step + 1;
            if !(sending || receiving) {
                continue;
            }
            let out: Vec<f32> = if sending { buf.to_vec() } else { Vec::new() };
            let incoming = if receiving { buf.len() } else { 0 };
            let (next_rank, prev_rank, timeout) =
                (self.next_rank(), self.prev_rank(), self.timeout);
            if sending {
                let next = self.next.as_mut().expect("a ring of more than one rank");
                let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
                next.write_all(&bytes)
                    .map_err(io_err(next_rank, "send to", timeout))?;
            }
            if incoming > 0 {
                let prev = self.prev.as_mut().expect("a ring of more than one rank");
                let mut bytes = vec![0u8; incoming * 4];
                prev.read_exact(&mut bytes)
                    .map_err(io_err(prev_rank, "receive from", timeout))?;
                for (v, c) in buf.iter_mut().zip(bytes.chunks_exact(4)) {
                    *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_length_exactly_once() {
        for len in [0, 1, 2, 3, 7, 100] {
            for n in 1..=5 {
                let mut covered = vec![0; len];
                for c in 0..n {
                    for i in chunk(len, n, c) {
                        covered[i] += 1;
                    }
                }
                assert!(covered.iter().all(|&k| k == 1), "len {len}, n {n}");
            }
        }
    }
}
