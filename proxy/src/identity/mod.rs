//! Mesh identity: this proxy's SPIFFE certificate, mutual TLS with other proxies, and
//! authorization by the peer's identity.
//!
//! - [`certify`]: key + CSR, Certify with the pod's token, renewal at 2/3 of life, trust bundle
//!   updates (CA rotations).
//! - [`tls`]: rustls server and client configurations built from the current certificate and
//!   bundle, swapped atomically ([`IdentityStore`]); TLS 1.3 with ALPN [`MESH_ALPN`].
//! - [`verify`]: the peer's chain ends in the bundle and its URI SAN is the expected SPIFFE ID.
//! - [`detect`]: peek at a connection's first bytes — mesh TLS, other TLS, HTTP/1, HTTP/2, other.
//! - [`authz`]: `AuthorizationPolicy` (allowed identities per workload and port; strict or
//!   permissive) and the one [`authz::Authorizer::authorize`] decision L4 and L7 share.
//! - [`connect`] (outbound: TLS to meshed endpoints, plaintext to the rest) and [`accept`]
//!   (inbound: detect, terminate, verify, authorize; strict refuses plaintext).
//! - [`stats`]: counters for `/metrics`.
//!
//! See `docs/identity.md`.

pub mod accept;
pub mod authz;
pub mod certify;
pub mod connect;
pub mod detect;
pub mod stats;
pub mod tls;
pub mod verify;

use std::sync::Arc;

pub use authz::{Authorizer, Decision, MtlsMode};
pub use detect::Detected;
pub use stats::MeshStats;
pub use tls::{IdentityStore, MESH_ALPN, TlsState};
pub use verify::PeerCertError;

/// What the data path needs for mesh connections: the identity, the policy, the counters.
#[derive(Debug)]
pub struct Mesh {
    pub store: Arc<IdentityStore>,
    pub authorizer: Arc<Authorizer>,
    pub stats: Arc<MeshStats>,
}

impl Mesh {
    /// Waits up to `max` for the first certificate (not at all while control says it is no
    /// CA).
    pub async fn wait_identity(&self, max: std::time::Duration) -> Option<Arc<TlsState>> {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            if let Some(s) = self.store.current() {
                return Some(s);
            }
            if self.store.is_unavailable() || tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
