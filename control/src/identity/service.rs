//! The `wasmesh.identity.v1.Identity` gRPC service: Certify (token + CSR → certificate chain and
//! trust bundle) and WatchTrustBundle. Served on the discovery port, next to `Watch`.
//!
//! Every refusal is logged with the peer's address and what was wrong, and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use wasmesh_api::identity::identity_server::{self, IdentityServer};
use wasmesh_api::identity::{
    CertifyRequest, CertifyResponse, TrustBundle, WatchTrustBundleRequest,
};
use wasmesh_api::spiffe::SpiffeId;

use super::authority::{Authority, IssueError};
use super::token::TokenReviewer;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct IdentityStats {
    pub certified: AtomicU64,
    pub refused_token: AtomicU64,
    pub refused_csr: AtomicU64,
    pub bundle_watchers: AtomicU64,
}

impl IdentityStats {
    /// Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let rows = [
            (
                "wasmesh_control_certificates_issued_total",
                "counter",
                "Workload certificates signed",
                &self.certified,
            ),
            (
                "wasmesh_control_certify_refused_token_total",
                "counter",
                "Certify refused: the token proves no identity (missing, unknown, expired, foreign)",
                &self.refused_token,
            ),
            (
                "wasmesh_control_certify_refused_csr_total",
                "counter",
                "Certify refused: the CSR does not parse or asks for another identity",
                &self.refused_csr,
            ),
            (
                "wasmesh_control_trust_bundle_watchers",
                "gauge",
                "Proxies following the trust bundle",
                &self.bundle_watchers,
            ),
        ];
        for (name, ty, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {ty}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

#[derive(Debug, Clone)]
pub struct IdentityService {
    pub authority: Arc<Authority>,
    pub reviewer: Arc<TokenReviewer>,
    pub stats: Arc<IdentityStats>,
}

impl IdentityService {
    pub fn new(authority: Arc<Authority>, reviewer: TokenReviewer) -> Self {
        Self {
            authority,
            reviewer: Arc::new(reviewer),
            stats: Arc::default(),
        }
    }

    /// The tonic service, to be routed to by path.
    pub fn into_server(self) -> IdentityServer<IdentityService> {
        IdentityServer::new(self)
    }
}

#[tonic::async_trait]
impl identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let req = request.into_inner();
        let claims = match self.reviewer.review(&req.token).await {
            Ok(c) => c,
            Err(e) if e.is_refusal() => {
                self.stats.refused_token.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, reason = %e, "certificate refused: the token proves no identity");
                return Err(Status::unauthenticated(e.to_string()));
            }
            Err(e) => {
                tracing::error!(%peer, error = %e, "cannot check a token");
                return Err(Status::unavailable(e.to_string()));
            }
        };
        let id = SpiffeId::new(
            self.authority.config().trust_domain.clone(),
            claims.namespace,
            claims.service_account,
        );
        let requested = (req.requested_lifetime_seconds > 0)
            .then(|| Duration::from_secs(req.requested_lifetime_seconds.into()));
        match self.authority.issue(&req.csr, &id, requested) {
            Ok(issued) => {
                self.stats.certified.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, identity = %id, pod = claims.pod.as_deref().unwrap_or(""), "certificate issued");
                Ok(Response::new(CertifyResponse {
                    spiffe_id: id.uri(),
                    chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
                    trust_bundle: Some(self.authority.bundle()),
                }))
            }
            Err(e @ (IssueError::BadCsr(_) | IssueError::OtherIdentity { .. })) => {
                self.stats.refused_csr.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, identity = %id, reason = %e, "certificate refused");
                Err(Status::permission_denied(e.to_string()))
            }
            Err(e) => {
                tracing::error!(%peer, identity = %id, error = %e, "cannot sign");
                Err(Status::internal(e.to_string()))
            }
        }
    }

    type WatchTrustBundleStream = BoxStream<'static, Result<TrustBundle, Status>>;

    async fn watch_trust_bundle(
        &self,
        request: Request<WatchTrustBundleRequest>,
    ) -> Result<Response<Self::WatchTrustBundleStream>, Status> {
        let who = request.into_inner();
        tracing::debug!(pod = %who.pod_name, namespace = %who.pod_namespace, "trust bundle watcher");
        let stats = self.stats.clone();
        stats.bundle_watchers.fetch_add(1, Ordering::Relaxed);
        let guard = Watcher(stats);
        let stream = WatchStream::new(self.authority.subscribe()).map(move |b| {
            let _ = &guard;
            Ok(b)
        });
        Ok(Response::new(stream.boxed()))
    }
}

/// Counts an open bundle stream until dropped.
struct Watcher(Arc<IdentityStats>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.bundle_watchers.fetch_sub(1, Ordering::Relaxed);
    }
}
