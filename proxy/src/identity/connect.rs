//! Outbound side of the mesh: after the TCP connect to an endpoint whose pod has the sidecar,
//! TLS 1.3 with our ALPN, our certificate presented, and the server required to be the
//! endpoint's ServiceAccount. Endpoints without the sidecar get the bytes as they are.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use wasmesh_api::spiffe::SpiffeId;

use super::tls::HandshakeError;
use super::{Mesh, MeshStats};

/// The connection to an endpoint, encrypted or not.
#[derive(Debug)]
pub enum Upstream {
    Plain(TcpStream),
    Mesh(Box<TlsStream<TcpStream>>),
}

impl Upstream {
    /// Writes `buf` (e.g. bytes protocol detection already read) to the endpoint.
    pub async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match self {
            Upstream::Plain(tcp) => tcp.write_all(buf).await,
            Upstream::Mesh(tls) => tls.write_all(buf).await,
        }
    }
}

/// What the table says about an endpoint's pod.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    pub addr: SocketAddr,
    pub meshed: bool,
    /// `namespace/name` of the pod.
    pub pod: Option<&'a str>,
    pub service_account: Option<&'a str>,
}

impl Peer<'_> {
    /// The identity a meshed endpoint must present, in `trust_domain`.
    pub fn expected_identity(&self, trust_domain: &str) -> Option<SpiffeId> {
        if !self.meshed {
            return None;
        }
        let ns = self.pod?.split_once('/')?.0;
        let sa = self
            .service_account
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        Some(SpiffeId::new(trust_domain, ns, sa))
    }
}

/// Why an endpoint could not be reached securely.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    #[error("no certificate yet to present to a meshed endpoint")]
    NoIdentity,
    #[error("mTLS to {expected} failed: {source}")]
    Handshake {
        expected: SpiffeId,
        source: HandshakeError,
    },
    #[error("mTLS to {expected} timed out")]
    Timeout { expected: SpiffeId },
}

/// Wraps `tcp` in mesh TLS when `peer` is meshed (and mTLS is on), else passes it through.
pub async fn secure(
    mesh: Option<&Mesh>,
    tcp: TcpStream,
    peer: Peer<'_>,
    identity_wait: Duration,
    timeout: Duration,
) -> Result<Upstream, SecureError> {
    let Some(mesh) = mesh else {
        return Ok(Upstream::Plain(tcp));
    };
    if !peer.meshed || mesh.store.is_unavailable() {
        return Ok(Upstream::Plain(tcp));
    }
    let Some(state) = mesh.wait_identity(identity_wait).await else {
        MeshStats::inc(&mesh.stats.outbound_no_identity);
        return Err(SecureError::NoIdentity);
    };
    let Some(expected) = peer.expected_identity(&state.bundle.trust_domain) else {
        return Ok(Upstream::Plain(tcp));
    };
    match tokio::time::timeout(timeout, state.connect(tcp, peer.addr.ip(), &expected)).await {
        Ok(Ok(tls)) => {
            MeshStats::inc(&mesh.stats.outbound_mtls);
            Ok(Upstream::Mesh(Box::new(tls)))
        }
        Ok(Err(source)) => {
            mesh.stats.refused(source.kind());
            Err(SecureError::Handshake { expected, source })
        }
        Err(_) => {
            mesh.stats.refused("handshake");
            Err(SecureError::Timeout { expected })
        }
    }
}
