//! Inbound side of the mesh: tell mesh TLS from plaintext, terminate and verify, then decide.
//!
//! - Mesh TLS (a ClientHello with our ALPN): handshake with a client certificate required; the
//!   client's SPIFFE ID is extracted and authorized for the destination port.
//! - Plaintext (or an app's own TLS): refused in strict mode; in permissive mode authorized as
//!   a client without identity.
//! - Bytes that start a TLS handshake record but are no ClientHello: refused.
//!
//! Every refusal is logged with the peer's address and both identities when known, and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use wasmesh_api::spiffe::SpiffeId;

use super::detect::{self, Detected};
use super::tls::HandshakeError;
use super::verify::spiffe_id_of;
use super::{Decision, Mesh, MeshStats, MtlsMode};

/// How long a client may take to send its first bytes before it counts as plaintext
/// (server-first protocols send nothing).
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(200);
/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// An inbound connection that may go on to the app.
#[derive(Debug)]
pub enum Accepted {
    /// Mesh TLS, terminated; the client's verified identity.
    Mesh(Box<TlsStream<TcpStream>>, SpiffeId),
    /// Plaintext (permissive mode), untouched, with what its first bytes looked like.
    Plain(TcpStream, Detected),
}

/// Classifies, terminates, verifies and authorizes one inbound connection. None: refused (the
/// connection is closed; the reason was logged and counted).
pub async fn accept(
    mesh: &Arc<Mesh>,
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
) -> Option<Accepted> {
    let stats = &mesh.stats;
    let kind = match detect::peek(&client, DETECT_TIMEOUT).await {
        Ok(k) => k,
        Err(e) => {
            tracing::debug!(%peer, %dst, error = %e, "inbound: connection failed before its first bytes");
            return None;
        }
    };
    let me = mesh.store.current();
    let me_id = me
        .as_ref()
        .map(|s| s.cert.id.to_string())
        .unwrap_or_else(|| "(no identity yet)".into());
    match kind {
        Detected::MeshTls => {
            let Some(state) = mesh.wait_identity(Duration::from_secs(5)).await else {
                stats.refused("config");
                tracing::warn!(%peer, %dst, "mesh TLS refused: this proxy has no certificate yet");
                return None;
            };
            let handshake =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, state.acceptor().accept(client)).await;
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    let e = HandshakeError::from_io(e);
                    stats.refused(e.kind());
                    tracing::warn!(%peer, %dst, local = %state.cert.id, error = %e, "mesh TLS refused");
                    return None;
                }
                Err(_) => {
                    stats.refused("handshake");
                    tracing::warn!(%peer, %dst, local = %state.cert.id, "mesh TLS refused: handshake timed out");
                    return None;
                }
            };
            let id = match tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| spiffe_id_of(c))
            {
                Some(Ok(id)) => id,
                Some(Err(e)) => {
                    stats.refused(e.kind());
                    tracing::warn!(%peer, %dst, local = %state.cert.id, error = %e, "mesh TLS refused");
                    return None;
                }
                None => {
                    stats.refused("no_certificate");
                    tracing::warn!(%peer, %dst, local = %state.cert.id, "mesh TLS refused: no client certificate");
                    return None;
                }
            };
            if let Decision::Deny { policies } = mesh.authorizer.authorize(Some(&id), dst.port()) {
                MeshStats::inc(&stats.authz_denied);
                tracing::warn!(%peer, %dst, client = %id, local = %state.cert.id, %policies, "connection denied by authorization policy");
                return None;
            }
            MeshStats::inc(&stats.inbound_mtls);
            tracing::debug!(%peer, %dst, client = %id, "inbound mTLS");
            Some(Accepted::Mesh(Box::new(tls), id))
        }
        Detected::BrokenTls => {
            stats.refused("broken_client_hello");
            tracing::warn!(%peer, %dst, local = %me_id, "refused: garbage where a TLS ClientHello should be");
            None
        }
        Detected::Tls | Detected::Http1 | Detected::Http2 | Detected::Other => {
            if mesh.authorizer.mode() == MtlsMode::Strict {
                MeshStats::inc(&stats.inbound_plaintext_refused);
                tracing::warn!(%peer, %dst, local = %me_id, "plaintext refused: mTLS is strict for this workload");
                return None;
            }
            if let Decision::Deny { policies } = mesh.authorizer.authorize(None, dst.port()) {
                MeshStats::inc(&stats.authz_denied);
                tracing::warn!(%peer, %dst, client = "(plaintext, no identity)", local = %me_id, %policies, "connection denied by authorization policy");
                return None;
            }
            MeshStats::inc(&stats.inbound_plaintext);
            Some(Accepted::Plain(client, kind))
        }
    }
}
