//! Proving membership of a data-parallel group before anything else is said.
//!
//! Every job has a secret that only its replicas hold
//! ([`crate::env::GROUP_SECRET`]). A connection to the rendezvous store and a
//! ring link both open with a challenge–response over it:
//!
//! ```text
//! acceptor  → connector   magic "TYG1" | acceptor nonce (32 bytes)
//! connector → acceptor    connector nonce (32) | claim length u8 | claim | tag_c (32)
//! acceptor  → connector   tag_a (32)
//! tag_x = HMAC-SHA256(secret, side x | purpose | claim | acceptor nonce | connector nonce)
//! ```
//!
//! The claim says who the connector is (store: rank, world size, run attempt;
//! ring: sender rank, receiver rank, attempt), so a tag proves the claim as
//! well as the secret. Both nonces are fresh, so nothing recorded off the
//! wire can be replayed; the acceptor's tag proves the acceptor to the
//! connector. Nothing a connector sends is read past this fixed-size
//! greeting before its tag verifies, and the caller puts a short deadline on
//! the whole exchange.

use std::io::{Read, Write};

use hmac::{Hmac, Mac};

/// First bytes of a greeting (protocol and version).
const MAGIC: &[u8; 4] = b"TYG1";
/// Bytes of a nonce and of a tag.
const NONCE: usize = 32;
const TAG: usize = 32;
/// Longest claim (a few integers).
const MAX_CLAIM: usize = 64;

/// Shortest secret accepted: 128 bits.
pub const MIN_SECRET_BYTES: usize = 16;

/// What a connection is for: a tag for one purpose is useless for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Joining the rendezvous store.
    Store,
    /// A ring link from one rank to the next.
    Ring,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Self::Store => b"store",
            Self::Ring => b"ring",
        }
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The peer does not know the group's secret, or sent a different claim.
    #[error("the peer did not prove it holds the group's secret ({0})")]
    Rejected(&'static str),
    /// The peer does not speak this protocol.
    #[error("the peer does not speak the group protocol: {0}")]
    Protocol(String),
    /// The connection broke or stalled.
    #[error("handshake failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The group's secret.
#[derive(Clone, PartialEq, Eq)]
pub struct GroupKey(Vec<u8>);

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupKey(..)")
    }
}

impl GroupKey {
    /// A key from the secret's text; `None` when it is shorter than
    /// [`MIN_SECRET_BYTES`].
    pub fn new(secret: &str) -> Option<Self> {
        (secret.len() >= MIN_SECRET_BYTES).then(|| Self(secret.as_bytes().to_vec()))
    }

    /// The publicly known key of `--insecure-group`: the handshake still runs
    /// (one protocol), but proves nothing.
    pub fn insecure() -> Self {
        Self(b"trainyard insecure group".to_vec())
    }

    /// A fresh random key, for a group of one that no one else may join.
    pub fn random() -> Self {
        Self(rand::random::<[u8; 32]>().to_vec())
    }

    fn mac(
        &self,
        side: &[u8],
        purpose: Purpose,
        claim: &[u8],
        a: &[u8],
        c: &[u8],
    ) -> Hmac<sha2::Sha256> {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("HMAC takes any key");
        // Lengths first: no two field lists hash the same bytes.
        for part in [side, purpose.label(), claim, a, c] {
            mac.update(&(part.len() as u32).to_le_bytes());
            mac.update(part);
        }
        mac
    }
}

/// Accepts a connection: challenges the connector, verifies its tag, answers
/// with ours, and returns the claim it proved.
pub fn accept(
    s: &mut (impl Read + Write),
    key: &GroupKey,
    purpose: Purpose,
) -> Result<Vec<u8>, AuthError> {
    let ours: [u8; NONCE] = rand::random();
    let mut greeting = Vec::with_capacity(MAGIC.len() + NONCE);
    greeting.extend_from_slice(MAGIC);
    greeting.extend_from_slice(&ours);
    s.write_all(&greeting)?;
    let mut theirs = [0u8; NONCE];
    s.read_exact(&mut theirs)?;
    let mut len = [0u8; 1];
    s.read_exact(&mut len)?;
    let len = usize::from(len[0]);
    if len > MAX_CLAIM {
        return Err(AuthError::Protocol(format!("a claim of {len} bytes")));
    }
    let mut claim = vec![0u8; len];
    s.read_exact(&mut claim)?;
    let mut tag = [0u8; TAG];
    s.read_exact(&mut tag)?;
    if key
        .mac(b"c", purpose, &claim, &ours, &theirs)
        .verify_slice(&tag)
        .is_err()
    {
        // A tag no secret produces: the connector learns its secret differs
        // (a permanent misconfiguration) instead of waiting for a timeout,
        // and a stranger learns nothing it did not know.
        let _ = s.write_all(&[0u8; TAG]);
        return Err(AuthError::Rejected("wrong tag"));
    }
    let answer = key
        .mac(b"a", purpose, &claim, &ours, &theirs)
        .finalize()
        .into_bytes();
    s.write_all(&answer)?;
    Ok(claim)
}

/// Opens a connection: answers the acceptor's challenge with `claim` and
/// verifies that the acceptor holds the secret too.
pub fn connect(
    s: &mut (impl Read + Write),
    key: &GroupKey,
    purpose: Purpose,
    claim: &[u8],
) -> Result<(), AuthError> {
    assert!(claim.len() <= MAX_CLAIM, "claims are a few integers");
    let mut greeting = [0u8; 4 + NONCE];
    s.read_exact(&mut greeting)?;
    if &greeting[..4] != MAGIC {
        return Err(AuthError::Protocol("no group greeting".into()));
    }
    let theirs = &greeting[4..];
    let ours: [u8; NONCE] = rand::random();
    let tag = key
        .mac(b"c", purpose, claim, theirs, &ours)
        .finalize()
        .into_bytes();
    let mut message = Vec::with_capacity(NONCE + 1 + claim.len() + TAG);
    message.extend_from_slice(&ours);
    message.push(claim.len() as u8);
    message.extend_from_slice(claim);
    message.extend_from_slice(&tag);
    s.write_all(&message)?;
    let mut answer = [0u8; TAG];
    s.read_exact(&mut answer)?;
    key.mac(b"a", purpose, claim, theirs, &ours)
        .verify_slice(&answer)
        .map_err(|_| AuthError::Rejected("the acceptor's tag is wrong"))
}

/// A claim of a few integers, little-endian.
pub fn claim(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The integers of a claim; `None` when it has another shape.
pub fn parse_claim<const N: usize>(bytes: &[u8]) -> Option<[u64; N]> {
    if bytes.len() != 8 * N {
        return None;
    }
    let mut out = [0u64; N];
    for (v, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        *v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn pair(
        server_key: GroupKey,
        client_key: GroupKey,
        server_purpose: Purpose,
    ) -> (Result<Vec<u8>, AuthError>, Result<(), AuthError>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            accept(&mut s, &server_key, server_purpose)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let client = connect(&mut c, &client_key, Purpose::Store, &claim(&[1, 2, 3]));
        drop(c);
        (server.join().unwrap(), client)
    }

    fn key(s: &str) -> GroupKey {
        GroupKey::new(s).unwrap()
    }

    #[test]
    fn the_same_secret_proves_the_claim_both_ways() {
        let (claimed, ok) = pair(
            key("0123456789abcdef"),
            key("0123456789abcdef"),
            Purpose::Store,
        );
        assert_eq!(parse_claim::<3>(&claimed.unwrap()), Some([1, 2, 3]));
        ok.unwrap();
    }

    #[test]
    fn a_wrong_secret_or_purpose_is_rejected() {
        let (claimed, _) = pair(
            key("0123456789abcdef"),
            key("fedcba9876543210"),
            Purpose::Store,
        );
        assert!(
            matches!(claimed, Err(AuthError::Rejected(_))),
            "{claimed:?}"
        );
        // A store tag does not open a ring link.
        let (claimed, _) = pair(
            key("0123456789abcdef"),
            key("0123456789abcdef"),
            Purpose::Ring,
        );
        assert!(
            matches!(claimed, Err(AuthError::Rejected(_))),
            "{claimed:?}"
        );
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(GroupKey::new("short").is_none());
    }

    /// A recorded answer is worthless: the acceptor's nonce is new each time.
    #[test]
    fn replayed_answers_fail() {
        let k = key("0123456789abcdef");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let k2 = k.clone();
        let server = std::thread::spawn(move || {
            (0..2)
                .map(|_| {
                    let (mut s, _) = listener.accept().unwrap();
                    accept(&mut s, &k2, Purpose::Store).map(|_| ())
                })
                .collect::<Vec<_>>()
        });
        // An honest exchange, recorded.
        let mut c = TcpStream::connect(addr).unwrap();
        let mut greeting = [0u8; 36];
        c.read_exact(&mut greeting).unwrap();
        let ours = [7u8; 32];
        let claim = claim(&[1]);
        let tag = k
            .mac(b"c", Purpose::Store, &claim, &greeting[4..], &ours)
            .finalize()
            .into_bytes();
        let mut recorded = ours.to_vec();
        recorded.push(claim.len() as u8);
        recorded.extend_from_slice(&claim);
        recorded.extend_from_slice(&tag);
        c.write_all(&recorded).unwrap();
        let mut answer = [0u8; 32];
        c.read_exact(&mut answer).unwrap();
        // The same bytes on a new connection.
        let mut replay = TcpStream::connect(addr).unwrap();
        replay.read_exact(&mut greeting).unwrap();
        replay.write_all(&recorded).unwrap();
        let results = server.join().unwrap();
        assert!(results[0].is_ok());
        assert!(
            matches!(results[1], Err(AuthError::Rejected(_))),
            "{:?}",
            results[1]
        );
    }
}
