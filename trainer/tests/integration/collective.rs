//! The TCP ring on loopback: all-reduce against a serial sum, bit-identical
//! results across ranks, broadcast, and failure when a peer dies.

use std::time::{Duration, Instant};

use trainyard_trainer::collective::auth::GroupKey;
use trainyard_trainer::collective::ring::{RingTimeouts, TcpRing};
use trainyard_trainer::collective::store::{StoreClient, StoreServer};
use trainyard_trainer::collective::{Collective, CollectiveError, ReduceOp};

/// Runs `body` on every rank of a fresh ring of `world` threads and returns
/// the results by rank.
fn group<T: Send + 'static>(
    world: usize,
    timeouts: RingTimeouts,
    body: impl Fn(TcpRing) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let server = StoreServer::start("127.0.0.1:0".parse().unwrap(), world, 0, key()).unwrap();
    let addr = server.addr().to_string();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (addr, body) = (addr.clone(), body.clone());
            std::thread::spawn(move || {
                let mut store =
                    StoreClient::join(&addr, rank, world, 0, &key(), timeouts.join).unwrap();
                let ring = TcpRing::connect(&mut store, rank, world, 0, &key(), timeouts).unwrap();
                body(ring)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn key() -> GroupKey {
    GroupKey::new(crate::util::SECRET).unwrap()
}

/// A stranger that connects to a rank's ring port before its predecessor,
/// with a wrong secret or a replayed claim, or says nothing, is closed; the
/// ring still forms with the real predecessor and reduces correctly.
#[test]
fn a_fake_ring_predecessor_is_refused_and_the_ring_forms() {
    use std::io::{Read, Write};
    let world = 2;
    let timeouts = quick();
    let server = StoreServer::start("127.0.0.1:0".parse().unwrap(), world, 0, key()).unwrap();
    let addr = server.addr().to_string();
    // Rank 0 joins and waits at its ring port; strangers get there before
    // its predecessor, rank 1.
    let a0 = addr.clone();
    let rank0 = std::thread::spawn(move || {
        let mut store = StoreClient::join(&a0, 0, world, 0, &key(), timeouts.join).unwrap();
        let mut ring = TcpRing::connect(&mut store, 0, world, 0, &key(), timeouts).unwrap();
        let mut v = vec![1.0f32; 1000];
        ring.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        v
    });
    let a1 = addr.clone();
    let started = Instant::now();
    let rank1 = std::thread::spawn(move || {
        let mut store = StoreClient::join(&a1, 1, world, 0, &key(), timeouts.join).unwrap();
        let ring_port =
            String::from_utf8(store.get("ring/addr/0", timeouts.join).unwrap()).unwrap();
        let strangers = std::thread::spawn(move || {
            let open = || {
                let s = std::net::TcpStream::connect(&ring_port).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
                s
            };
            let (mut fake, mut garbage) = (open(), open());
            let silent: Vec<_> = (0..4).map(|_| open()).collect();
            let _ = garbage.write_all(&[0xAB; 200]);
            let other = GroupKey::new("not this group's secret").unwrap();
            let claim = trainyard_trainer::collective::auth::claim(&[1, 0, 0]);
            let refused = trainyard_trainer::collective::auth::connect(
                &mut fake,
                &other,
                trainyard_trainer::collective::auth::Purpose::Ring,
                &claim,
            );
            let mut rest = Vec::new();
            let _ = garbage.read_to_end(&mut rest);
            drop(silent);
            refused.is_err()
        });
        std::thread::sleep(Duration::from_millis(200));
        let joining = Instant::now();
        let mut ring = TcpRing::connect(&mut store, 1, world, 0, &key(), timeouts).unwrap();
        // Handshakes run side by side: silent strangers (closed at the 5 s
        // handshake deadline) do not hold the predecessor up.
        assert!(
            joining.elapsed() < Duration::from_secs(3),
            "took {:?}",
            joining.elapsed()
        );
        let mut v = vec![2.0f32; 1000];
        ring.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        assert!(
            strangers.join().unwrap(),
            "the fake predecessor was refused"
        );
        v
    });
    let (v0, v1) = (rank0.join().unwrap(), rank1.join().unwrap());
    assert!(v0.iter().chain(&v1).all(|&x| x == 3.0));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "silent strangers did not hold up the ring"
    );
}

fn quick() -> RingTimeouts {
    RingTimeouts {
        join: Duration::from_secs(10),
        collective: Duration::from_secs(10),
    }
}

/// Rank r's input: small integers, so any summation order is exact.
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 19) as f32 - 9.0)
        .collect()
}

#[test]
fn all_reduce_equals_the_serial_sum_for_every_length_and_world() {
    for world in 1..=4 {
        for len in [0, 1, 2, 3, 5, 1000, 70_001] {
            let results = group(world, quick(), move |mut ring| {
                let mut sum = input(ring.rank(), len);
                ring.all_reduce(&mut sum, ReduceOp::Sum).unwrap();
                let mut avg = input(ring.rank(), len);
                ring.all_reduce(&mut avg, ReduceOp::Average).unwrap();
                (sum, avg)
            });
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len)).collect();
            let expect: Vec<f32> = (0..len)
                .map(|i| inputs.iter().map(|x| x[i]).sum())
                .collect();
            for (rank, (sum, avg)) in results.iter().enumerate() {
                assert_eq!(sum, &expect, "sum: world {world}, len {len}, rank {rank}");
                let mean: Vec<f32> = expect.iter().map(|v| v * (1.0 / world as f32)).collect();
                assert_eq!(avg, &mean, "average: world {world}, len {len}, rank {rank}");
            }
        }
    }
}

#[test]
fn every_rank_gets_the_same_bits() {
    let results = group(3, quick(), |mut ring| {
        let r = ring.rank() as f32;
        let mut buf: Vec<f32> = (0..100_003)
            .map(|i| (i as f32 * 0.37 + r).sin() * 1e-3 + 1.0 / (r + 3.0))
            .collect();
        ring.all_reduce(&mut buf, ReduceOp::Average).unwrap();
        buf.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
    });
    assert_eq!(results[0], results[1]);
    assert_eq!(results[1], results[2]);
}

#[test]
fn broadcast_barrier_and_gather() {
    for root in 0..3 {
        let results = group(3, quick(), move |mut ring| {
            let mut buf = vec![ring.rank() as f32; 5];
            ring.broadcast(&mut buf, root).unwrap();
            ring.barrier().unwrap();
            let gathered = ring.all_gather_f32(ring.rank() as f32 * 10.0).unwrap();
            (buf, gathered)
        });
        for (buf, gathered) in results {
            assert_eq!(buf, vec![root as f32; 5]);
            assert_eq!(gathered, vec![0.0, 10.0, 20.0]);
        }
    }
}

/// A rank that dies makes every other rank fail within the collective
/// timeout, with an error naming a peer, instead of hanging.
#[test]
fn a_dead_peer_fails_the_others_within_the_timeout() {
    let timeouts = RingTimeouts {
        join: Duration::from_secs(10),
        collective: Duration::from_secs(2),
    };
    let started = Instant::now();
    let results = group(3, timeouts, |mut ring| {
        if ring.rank() == 2 {
            drop(ring); // the process dies: its sockets close
            return None;
        }
        let mut buf = vec![1.0f32; 10_000];
        Some(ring.all_reduce(&mut buf, ReduceOp::Sum))
    });
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    for r in results.into_iter().flatten() {
        let e = r.unwrap_err();
        assert!(
            matches!(
                e,
                CollectiveError::Peer { .. } | CollectiveError::Timeout { .. }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("rank "), "{e}");
    }
}

/// Half-precision payloads: small integers and their halves and quarters are
/// exact in f16 and bf16, so with 2 and 4 ranks the compressed all-reduce must
/// still equal the serial sum and mean exactly; with 3 ranks (inexact thirds)
/// every rank must still get the same bits, within bf16 rounding of the mean.
#[test]
fn compressed_all_reduce_is_exact_where_representable_and_identical_everywhere() {
    use trainyard_trainer::collective::Payload;
    for payload in [Payload::F16, Payload::Bf16] {
        for world in [2usize, 4] {
            let len = 1001;
            let results = group(world, quick(), move |mut ring| {
                let mut sum = input(ring.rank(), len);
                ring.all_reduce_with(&mut sum, ReduceOp::Sum, payload)
                    .unwrap();
                let mut avg = input(ring.rank(), len);
                ring.all_reduce_with(&mut avg, ReduceOp::Average, payload)
                    .unwrap();
                (sum, avg)
            });
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len)).collect();
            let expect: Vec<f32> = (0..len)
                .map(|i| inputs.iter().map(|x| x[i]).sum())
                .collect();
            for (sum, avg) in &results {
                assert_eq!(sum, &expect, "{payload:?} sum, world {world}");
                let mean: Vec<f32> = expect.iter().map(|v| v / world as f32).collect();
                assert_eq!(avg, &mean, "{payload:?} mean, world {world}");
            }
        }
        let results = group(3, quick(), move |mut ring| {
            let r = ring.rank() as f32;
            let mut buf: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.013 + r).cos()).collect();
            ring.all_reduce_with(&mut buf, ReduceOp::Average, payload)
                .unwrap();
            buf
        });
        assert_eq!(results[0], results[1]);
        assert_eq!(results[1], results[2]);
        for (i, v) in results[0].iter().enumerate() {
            let exact: f32 = (0..3)
                .map(|r| (i as f32 * 0.013 + r as f32).cos())
                .sum::<f32>()
                / 3.0;
            // Three roundings of values below 1: well inside 1% here.
            assert!(
                (v - exact).abs() <= 0.01,
                "{payload:?} [{i}]: {v} vs {exact}"
            );
        }
    }
}

#[test]
fn the_self_check_passes_on_the_ring() {
    for world in [1, 3] {
        let results = group(world, quick(), |mut ring| {
            trainyard_trainer::collective::verify(&mut ring, 1001).map_err(|e| e.to_string())
        });
        assert!(
            results.iter().all(Result::is_ok),
            "world {world}: {results:?}"
        );
    }
}

/// A collective that forgets one peer's contribution: fast and wrong.
struct DropsLastElement(TcpRing);

impl Collective for DropsLastElement {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CollectiveError> {
        let mine = buf.last().copied();
        self.0.all_reduce(buf, op)?;
        if let (Some(v), Some(last)) = (mine, buf.last_mut()) {
            *last -= v;
        }
        Ok(())
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.0.broadcast(buf, root)
    }
}

#[test]
fn the_self_check_catches_a_wrong_collective() {
    let results = group(2, quick(), |ring| {
        trainyard_trainer::collective::verify(&mut DropsLastElement(ring), 50)
            .map_err(|e| e.to_string())
    });
    for r in results {
        let message = r.unwrap_err();
        assert!(message.contains("element 49"), "{message}");
    }
}
