//! HTTPS on `--listen` (`--tls-cert`, `--tls-key`): the certificate and key
//! behind a resolver that a SIGHUP swaps whole.
//!
//! The handshake runs inside the accept loop's connection task ([`serve`]),
//! after admission, so the bound on connections, the eviction of idle ones,
//! the header-read and write timeouts and the shutdown deadline apply to a
//! TLS connection exactly as to a plain one, and every handler (read access
//! included) sees the same requests.
//!
//! Renewal without a restart: certbot and ACME clients replace the files
//! and send a reload. A SIGHUP re-reads both files and, only when they parse
//! and the key matches the certificate, swaps the [`CertifiedKey`] the
//! resolver hands to new handshakes. Open connections keep the session they
//! negotiated; a bad renewal keeps the old certificate (and says so in one
//! line) rather than leaving the server with none.
//!
//! The crypto is rustls with the `ring` provider, already in the tree (sqlx,
//! redis); aws-lc-rs would add a long C build for nothing more.
//!
//! [`serve`]: crate::serve

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// Why a certificate or key cannot be used. Each message starts with the
/// flag whose file is at fault, so the operator knows which one to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert {path}: {why}")]
    Cert { path: PathBuf, why: String },
    #[error("--tls-key {path}: {why}")]
    Key { path: PathBuf, why: String },
    #[error("--tls-cert and --tls-key: {0}")]
    Setup(String),
}

/// The certificate files and the resolver that serves what was last read
/// from them.
pub struct Tls {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads both files; a file that is missing, unreadable, not PEM, or a
    /// key that does not match the certificate is an error naming its flag.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = read_pair(cert_path, key_path, &provider)?;
        let resolver = Arc::new(Resolver {
            current: RwLock::new(Arc::new(key)),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // The server speaks HTTP/1.1 only; a client offering h2 first is
        // told so in the handshake instead of failing on the first frame.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            provider,
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// What the accept loop runs each handshake with.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Re-reads both files and, if they are good, serves them to every
    /// handshake from now on. On error the certificate in use stays.
    pub fn reload(&self) -> Result<String, TlsError> {
        let key = read_pair(&self.cert_path, &self.key_path, &self.provider)?;
        let chain = key.cert.len();
        *self
            .resolver
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(format!(
            "certificate ({chain} in chain) from {} and key from {}",
            self.cert_path.display(),
            self.key_path.display()
        ))
    }
}

/// Hands every handshake the certificate read last. A lock, not a new
/// `ServerConfig` per reload, so the acceptor (and its session cache) stays
/// one; the read is an `Arc` clone.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn read_pair(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let cert_err = |why: String| TlsError::Cert {
        path: cert_path.to_owned(),
        why,
    };
    let key_err = |why: String| TlsError::Key {
        path: key_path.to_owned(),
        why,
    };
    // Read whole first, so "cannot read" and "not PEM" are told apart.
    let cert_pem = std::fs::read(cert_path).map_err(|e| cert_err(format!("cannot read: {e}")))?;
    let key_pem = std::fs::read(key_path).map_err(|e| key_err(format!("cannot read: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err(
            "no `BEGIN CERTIFICATE` block: give the PEM certificate (chain), e.g. certbot's fullchain.pem".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        key_err(format!(
            "no PEM private key ({e}): give the key file, e.g. certbot's privkey.pem"
        ))
    })?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_err(format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        // A key type whose public half rustls cannot derive: the handshake
        // will tell, as rustls' own `from_der` lets it.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(key_err(format!(
                "is not the key of the certificate in {}",
                cert_path.display()
            )))
        }
        Err(e) => Err(cert_err(format!("unusable certificate: {e}"))),
    }
}
