//! The one way Trainyard serves HTTP (trainer metrics, the federation
//! endpoint with or without TLS, and the operator's progress and metrics
//! endpoints): hyper's HTTP/1.1 over a bounded accept loop.
//!
//! Every port is reachable by strangers, so a connection gets
//! [`Limits::header_timeout`] for each request's headers, counted from when
//! the server is ready to read them: a silent connection, a slowloris
//! dribbling headers and an idle keep-alive connection are all closed then.
//! TLS handshakes have [`Limits::tls_handshake_timeout`]. At most
//! [`Limits::max_connections`] connections are served at once and
//! [`Limits::max_per_peer`] from one address; beyond that new connections
//! are closed at once, so one host cannot take every slot. Accept errors
//! (EMFILE, say) back off instead of spinning. Request bodies are bounded by
//! the handlers that read them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a server allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once from one address.
    pub max_per_peer: usize,
    /// Time to receive a request's headers, and the longest a connection may
    /// sit idle between requests.
    pub header_timeout: Duration,
    /// Time to complete a TLS handshake.
    pub tls_handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_per_peer: 32,
            header_timeout: Duration::from_secs(20),
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Connections in service, in all and by address.
#[derive(Default)]
struct Slots {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

/// A connection's place, freed when it ends.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.lock().expect("slots lock");
        s.total -= 1;
        if let Some(n) = s.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                s.by_peer.remove(&self.peer);
            }
        }
    }
}

fn take_slot(slots: &Arc<Mutex<Slots>>, peer: IpAddr, limits: &Limits) -> Option<Slot> {
    let mut s = slots.lock().expect("slots lock");
    let from_peer = s.by_peer.get(&peer).copied().unwrap_or(0);
    if s.total >= limits.max_connections || from_peer >= limits.max_per_peer {
        return None;
    }
    s.total += 1;
    *s.by_peer.entry(peer).or_default() += 1;
    Some(Slot {
        slots: slots.clone(),
        peer,
    })
}

/// Serves `app` on `listener` (over TLS with `tls`) within `limits`, until
/// the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut backoff = Duration::from_millis(5);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept connections; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(5);
        let Some(slot) = take_slot(&slots, peer.ip(), &limits) else {
            tracing::debug!(%peer, "closed a connection over the limits");
            continue;
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tcp.set_nodelay(true);
            match acceptor {
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(tcp));
                    match handshake.await {
                        Ok(Ok(tls)) => serve_connection(tls, app, &limits, peer).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
                None => serve_connection(tcp, app, &limits, peer).await,
            }
        });
    }
}

async fn serve_connection<I>(io: I, app: axum::Router, limits: &Limits, peer: std::net::SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn start(limits: Limits) -> std::net::SocketAddr {
        start_with(limits, None)
    }

    fn start_with(limits: Limits, tls: Option<Arc<rustls::ServerConfig>>) -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    serve(listener, app, tls, limits).await
                });
        });
        addr
    }

    fn get(addr: std::net::SocketAddr) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// Slowloris: while connections dribble headers or say nothing, an
    /// honest request is served; past the per-address budget new connections
    /// are closed at once; past the header deadline no hostile one is left.
    #[test]
    fn slow_and_silent_connections_cannot_hold_the_server() {
        let limits = Limits {
            max_connections: 16,
            max_per_peer: 6,
            header_timeout: Duration::from_millis(800),
            tls_handshake_timeout: Duration::from_secs(1),
        };
        let addr = start(limits);
        let mut hostile: Vec<std::net::TcpStream> = (0..5)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        for s in &mut hostile[..3] {
            s.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            get(addr).starts_with("HTTP/1.1 200"),
            "served while they hold"
        );
        hostile.push(std::net::TcpStream::connect(addr).unwrap());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(get(addr), "", "over the per-address budget: closed at once");
        std::thread::sleep(Duration::from_millis(1500));
        for s in &mut hostile {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut rest = Vec::new();
            // A closed connection reads to its end at once (hyper may answer 408 first).
            let _ = s.read_to_end(&mut rest);
        }
        assert!(get(addr).starts_with("HTTP/1.1 200"), "and afterwards");
    }

    /// A connection that never starts its TLS handshake is closed at the
    /// handshake deadline.
    #[test]
    fn a_stalled_tls_handshake_is_closed() {
        let certs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
        let config =
            crate::federated::tls::server_config(&certs.join("tls.crt"), &certs.join("tls.key"))
                .unwrap();
        let addr = start_with(
            Limits {
                tls_handshake_timeout: Duration::from_millis(500),
                ..Limits::default()
            },
            Some(config),
        );
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_total_cap_closes_what_is_over_it() {
        let limits = Limits {
            max_connections: 2,
            max_per_peer: 2,
            header_timeout: Duration::from_secs(5),
            tls_handshake_timeout: Duration::from_secs(1),
        };
        let addr = start(limits);
        let held: Vec<_> = (0..2)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(get(addr), "", "a third connection is closed at once");
        drop(held);
        std::thread::sleep(Duration::from_millis(200));
        assert!(get(addr).starts_with("HTTP/1.1 200"));
    }
}
