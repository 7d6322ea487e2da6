//! The rustls configurations of this proxy's identity, rebuilt whenever the certificate or the
//! trust bundle changes and swapped in atomically ([`IdentityStore`]): a handshake takes the
//! current [`TlsState`] and keeps it, so connections already open are never affected.
//!
//! Mesh connections are TLS 1.3 only, with client certificates required and the ALPN
//! [`MESH_ALPN`], which is how the inbound side tells a meshed peer from an app's own TLS.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use wasmesh_api::spiffe::SpiffeId;

use super::verify::{MeshVerifier, PeerCertError};

/// ALPN of a mesh connection (L4 bytes or HTTP between the sidecars).
pub const MESH_ALPN: &[u8] = b"wasmesh/1";
/// Every mesh ALPN starts with this; [`super::detect`] tells mesh TLS from other TLS by it.
pub const MESH_ALPN_PREFIX: &[u8] = b"wasmesh/";

/// Why TLS configurations could not be built from what control sent.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the trust bundle has no usable root: {0}")]
    Bundle(String),
    #[error("the certificate and key do not make a TLS identity: {0}")]
    Key(rustls::Error),
    #[error("cannot build the TLS configuration: {0}")]
    Config(rustls::Error),
}

/// A workload certificate with its key, as control signed it.
#[derive(Debug, Clone)]
pub struct WorkloadCert {
    pub id: SpiffeId,
    /// Workload certificate first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The roots peers' chains must end in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub trust_domain: String,
    pub roots: Vec<CertificateDer<'static>>,
    /// SHA-256 of the root that signs now (a change means: renew).
    pub signer: Vec<u8>,
    pub version: u64,
}

/// One generation of TLS configuration: the certificate and bundle it was built from.
pub struct TlsState {
    pub cert: WorkloadCert,
    pub bundle: Bundle,
    server: Arc<ServerConfig>,
    verifier: MeshVerifier,
    key: Arc<CertifiedKey>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// Client configurations per expected server identity (each keeps its session cache).
    clients: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("id", &self.cert.id)
            .field("bundle_version", &self.bundle.version)
            .finish_non_exhaustive()
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsState {
    pub fn new(cert: WorkloadCert, bundle: Bundle) -> Result<TlsState, TlsError> {
        let provider = provider();
        let anchors: Vec<TrustAnchor<'static>> = bundle
            .roots
            .iter()
            .filter_map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .ok()
                    .map(|a| a.to_owned())
            })
            .collect();
        if anchors.is_empty() {
            return Err(TlsError::Bundle(format!(
                "{} roots received, none parses",
                bundle.roots.len()
            )));
        }
        let key = Arc::new(
            CertifiedKey::from_der(cert.chain.clone(), cert.key.clone_key(), &provider)
                .map_err(TlsError::Key)?,
        );
        let verifier = MeshVerifier::new(anchors, bundle.trust_domain.clone(), provider.clone());
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(Arc::new(verifier.clone()))
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone())));
        server.alpn_protocols = vec![MESH_ALPN.to_vec()];
        Ok(TlsState {
            cert,
            bundle,
            server: Arc::new(server),
            verifier,
            key,
            provider,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// Accepts mesh connections (client certificate required).
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server.clone())
    }

    /// The client configuration for reaching `expected`.
    pub fn client_config(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, TlsError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(expected) {
            return Ok(c.clone());
        }
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(self.verifier.expecting(expected.clone())))
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(self.key.clone())));
        config.alpn_protocols = vec![MESH_ALPN.to_vec()];
        let config = Arc::new(config);
        clients.insert(expected.clone(), config.clone());
        Ok(config)
    }

    /// TLS to `ip` (the endpoint), which must present `expected`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        ip: IpAddr,
        expected: &SpiffeId,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, HandshakeError> {
        let config = self
            .client_config(expected)
            .map_err(HandshakeError::Config)?;
        TlsConnector::from(config)
            .connect(ServerName::IpAddress(ip.into()), tcp)
            .await
            .map_err(HandshakeError::from_io)
    }
}

/// Why a mesh handshake failed, as precisely as we can tell.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Peer(PeerCertError),
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    #[error("{0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Config(TlsError),
}

impl HandshakeError {
    pub fn from_io(e: std::io::Error) -> HandshakeError {
        let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return HandshakeError::Io(e);
        };
        match PeerCertError::from_rustls(inner) {
            Some(p) => HandshakeError::Peer(p),
            None => HandshakeError::Tls(inner.clone()),
        }
    }

    /// Label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            HandshakeError::Peer(p) => p.kind(),
            HandshakeError::Tls(rustls::Error::InvalidCertificate(_)) => "invalid",
            HandshakeError::Tls(rustls::Error::NoCertificatesPresented) => "no_certificate",
            HandshakeError::Tls(_) => "handshake",
            HandshakeError::Io(_) => "io",
            HandshakeError::Config(_) => "config",
        }
    }
}

/// The proxy's current identity: `None` until the first certificate arrives.
#[derive(Debug, Default)]
pub struct IdentityStore {
    current: ArcSwapOption<TlsState>,
    /// Set while control says it is no CA (Certify unimplemented): mTLS is off, plaintext to
    /// every endpoint, as without `--token-file`.
    unavailable: std::sync::atomic::AtomicBool,
}

impl IdentityStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The configuration new connections use.
    pub fn current(&self) -> Option<Arc<TlsState>> {
        self.current.load_full()
    }

    pub fn set(&self, state: TlsState) {
        self.unavailable
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.current.store(Some(Arc::new(state)));
    }

    /// Control is no CA: until a certificate arrives, connections go without mTLS.
    pub fn set_unavailable(&self) {
        self.unavailable
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// True while control says it is no CA and we hold no certificate.
    pub fn is_unavailable(&self) -> bool {
        self.unavailable.load(std::sync::atomic::Ordering::Relaxed) && self.current().is_none()
    }
}
