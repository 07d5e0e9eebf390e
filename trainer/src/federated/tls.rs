//! Optional TLS for the federation endpoint: the aggregator serves HTTPS
//! with a certificate and key from files (a mounted Secret in a cluster:
//! `tls.crt`, `tls.key`), clients trust the CA in `ca.crt`. rustls with ring,
//! so no system OpenSSL is involved.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::FederatedError;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn bad(path: &Path, what: &str, e: impl std::fmt::Display) -> FederatedError {
    FederatedError::Other(format!("{}: cannot read {what}: {e}", path.display()))
}

/// The server side: certificate chain and private key, PEM.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, FederatedError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, "the certificate", e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert, "the certificate", e))?;
    if chain.is_empty() {
        return Err(bad(cert, "the certificate", "no PEM certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, "the private key", e))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| FederatedError::Other(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            FederatedError::Other(format!(
                "{}: the certificate and key do not fit: {e}",
                cert.display()
            ))
        })?;
    Ok(Arc::new(config))
}

/// The client side: trust only the CA in `ca` (PEM).
pub fn client_tls(ca: &Path) -> Result<ureq::tls::TlsConfig, FederatedError> {
    let pem = std::fs::read(ca).map_err(|e| bad(ca, "the CA certificate", e))?;
    let certs: Vec<ureq::tls::Certificate<'static>> = CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| bad(ca, "the CA certificate", e))?;
    if certs.is_empty() {
        return Err(bad(ca, "the CA certificate", "no PEM certificate in it"));
    }
    Ok(ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
        .build())
}
