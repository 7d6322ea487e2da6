//! Inbound side of the mesh: tell mesh TLS from plaintext, terminate and verify ([`accept`]),
//! then decide ([`authorize`]).
//!
//! - Mesh TLS (a ClientHello with our ALPN): handshake with a client certificate required; the
//!   client's SPIFFE ID is extracted.
//! - Plaintext (or an app's own TLS): refused in strict mode; in permissive mode passed on as
//!   a client without identity.
//! - Bytes that start a TLS handshake record but are no ClientHello: refused.
//!
//! Authorization is the caller's next step, because where it happens depends on what the
//! connection carries: a connection that stays L4 is authorized once ([`authorize`]; denied =
//! closed), an HTTP one per request (denied = 403, `crate::http::inbound`), so an HTTP client
//! sees a 403 rather than a reset, and a changed policy applies to the next request.
//!
//! While control's policies have not arrived (a sidecar that just started), [`accept`] waits
//! for them up to [`POLICY_WAIT`] and then refuses: no connection is let in on a partial set of
//! policies (the strict mode among them).
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
/// How long an inbound connection waits for control's first policies.
pub const POLICY_WAIT: Duration = Duration::from_secs(5);

/// An inbound connection that may go on to the app.
#[derive(Debug)]
pub enum Accepted {
    /// Mesh TLS, terminated; the client's verified identity.
    Mesh(Box<TlsStream<TcpStream>>, SpiffeId),
    /// Plaintext (permissive mode), untouched, with what its first bytes looked like.
    Plain(TcpStream, Detected),
}

/// Classifies, terminates and verifies one inbound connection, and refuses plaintext in strict
/// mode. None: refused (the connection is closed; the reason was logged and counted). The
/// caller authorizes what is returned (see the module docs).
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
    let me_id = local_identity(mesh);
    if !mesh.authorizer.wait_ready(POLICY_WAIT).await {
        MeshStats::inc(&stats.authz_denied);
        tracing::warn!(%peer, %dst, local = %me_id, "connection refused: no authorization policies from control yet");
        return None;
    }
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
            MeshStats::inc(&stats.inbound_plaintext);
            Some(Accepted::Plain(client, kind))
        }
    }
}

/// This proxy's identity, for log lines.
pub fn local_identity(mesh: &Mesh) -> String {
    mesh.store
        .current()
        .map(|s| s.cert.id.to_string())
        .unwrap_or_else(|| "(no identity yet)".into())
}

/// The client, for log lines.
pub fn client_name(client: Option<&SpiffeId>) -> String {
    client.map_or_else(|| "(plaintext, no identity)".into(), ToString::to_string)
}

/// The L4 decision for a connection [`accept`] let in: may `client` (None: plaintext) reach
/// `dst`? A denial is logged with both identities and the policies that apply, and counted;
/// the caller closes the connection.
pub fn authorize(
    mesh: &Mesh,
    client: Option<&SpiffeId>,
    peer: SocketAddr,
    dst: SocketAddr,
) -> bool {
    match mesh.authorizer.authorize(client, dst.port()) {
        Decision::Allow => true,
        Decision::Deny { policies } => {
            MeshStats::inc(&mesh.stats.authz_denied);
            tracing::warn!(%peer, %dst, client = %client_name(client), local = %local_identity(mesh), %policies, "connection denied by authorization policy");
            false
        }
    }
}
