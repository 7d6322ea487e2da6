//! The serving certificate: read from PEM files, checked (the key must fit the certificate),
//! and swapped in when the files change, so cert-manager's renewals take effect without a
//! restart.
//!
//! [`ReloadingCert`] is the rustls certificate resolver: every handshake takes the current
//! certificate. [`watch`] re-reads the files on an interval; a change that does not parse, or a
//! key that does not fit (a writer caught half-way), keeps the old certificate and is retried
//! on the next tick. Kubernetes updates Secret volumes atomically (a symlink swap), so the
//! pair read is always consistent there.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Where the certificate chain and its key are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate chain, leaf first (cert-manager's `tls.crt`).
    pub cert: PathBuf,
    /// PEM private key, PKCS#8, PKCS#1 or SEC1 (cert-manager's `tls.key`).
    pub key: PathBuf,
}

/// A certificate or key that cannot be served; names the file and what to do. The messages
/// are complete (they include the cause), so no `source` is chained.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error(
        "{}: no certificate in it; expected PEM (-----BEGIN CERTIFICATE-----)",
        path.display()
    )]
    NoCertificate { path: PathBuf },
    #[error(
        "{}: no usable private key in it; expected PEM (-----BEGIN PRIVATE KEY-----, \
         EC PRIVATE KEY or RSA PRIVATE KEY): {reason}",
        path.display()
    )]
    NoKey { path: PathBuf, reason: String },
    #[error(
        "the key in {} does not fit the certificate in {}: {reason}",
        key.display(),
        cert.display()
    )]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The rustls provider the injector uses: ring, as everywhere in wasmesh.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The current certificate, replaced by [`ReloadingCert::reload`].
#[derive(Debug)]
pub struct ReloadingCert {
    files: CertFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The file contents last tried (served or rejected), so unchanged files are not re-parsed
    /// and a bad pair is reported once.
    last_seen: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl ReloadingCert {
    /// Loads the files; fails if they cannot be served.
    pub fn load(files: CertFiles) -> Result<Arc<Self>, TlsError> {
        let provider = provider();
        let (cert, key) = read_pair(&files)?;
        let certified = certified_key(&files, &cert, &key, &provider)?;
        Ok(Arc::new(Self {
            files,
            provider,
            current: RwLock::new(Arc::new(certified)),
            last_seen: Mutex::new((cert, key)),
        }))
    }

    /// Re-reads the files. `Ok(true)`: a new certificate is now served; `Ok(false)`: nothing
    /// changed (or the change was already rejected); `Err`: the new files cannot be served and
    /// the old certificate stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (cert, key) = read_pair(&self.files)?;
        {
            let mut last = self
                .last_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.0 == cert && last.1 == key {
                return Ok(false);
            }
            *last = (cert.clone(), key.clone());
        }
        let certified = certified_key(&self.files, &cert, &key, &self.provider)?;
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = Arc::new(certified);
        Ok(true)
    }

    /// The certificate chain served now (leaf first).
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.current().cert.clone()
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A rustls server config serving the current certificate, HTTP/2 and HTTP/1.1 by ALPN.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, rustls::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Re-reads the files every `interval` until `shutdown`, logging what changed.
pub async fn watch(
    cert: Arc<ReloadingCert>,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(interval) => {}
        }
        let c = cert.clone();
        match tokio::task::spawn_blocking(move || c.reload()).await {
            Ok(Ok(true)) => tracing::info!(
                cert = %cert.files.cert.display(),
                "serving the new TLS certificate"
            ),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                "the TLS files changed but cannot be served; still serving the previous certificate"
            ),
            Err(e) => tracing::warn!(error = %e, "reloading the TLS files failed"),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })
}

fn read_pair(files: &CertFiles) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    Ok((read(&files.cert)?, read(&files.key)?))
}

fn certified_key(
    files: &CertFiles,
    cert: &[u8],
    key: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::NoKey {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })
}
