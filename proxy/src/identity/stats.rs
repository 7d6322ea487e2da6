//! Counters of the mesh identity path, exported on `/metrics` ([`crate::metrics`]).

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a mesh connection was refused (the `reason` label).
pub const REFUSAL_REASONS: [&str; 9] = [
    "expired",
    "untrusted",
    "wrong_identity",
    "invalid",
    "no_certificate",
    "handshake",
    "broken_client_hello",
    "io",
    "config",
];

#[derive(Debug, Default)]
pub struct MeshStats {
    pub certificates: AtomicU64,
    pub certify_failures: AtomicU64,
    pub outbound_mtls: AtomicU64,
    pub outbound_no_identity: AtomicU64,
    pub inbound_mtls: AtomicU64,
    pub inbound_plaintext: AtomicU64,
    pub inbound_plaintext_refused: AtomicU64,
    pub authz_denied: AtomicU64,
    /// notAfter of the certificate in use, Unix seconds (0: none yet).
    pub certificate_expiry: AtomicU64,
    /// Roots in the trust bundle in use (0: none yet): 2 during a CA rotation.
    pub trust_bundle_roots: AtomicU64,
    /// Control's version of the trust bundle in use (0: none yet).
    pub trust_bundle_version: AtomicU64,
    refused: [AtomicU64; REFUSAL_REASONS.len()],
}

impl MeshStats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refused handshake under `reason` (one of [`REFUSAL_REASONS`]).
    pub fn refused(&self, reason: &str) {
        let i = REFUSAL_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(REFUSAL_REASONS.len() - 1);
        Self::inc(&self.refused[i]);
    }

    pub fn refused_count(&self, reason: &str) -> u64 {
        REFUSAL_REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.refused[i].load(Ordering::Relaxed))
    }

    /// `(name, help, value)` of every counter, for `/metrics`.
    pub fn counters(&self) -> [(&'static str, &'static str, u64); 8] {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (
                "wasmesh_mtls_certificates_total",
                "Workload certificates received from control",
                v(&self.certificates),
            ),
            (
                "wasmesh_mtls_certify_failures_total",
                "Certify rounds that failed",
                v(&self.certify_failures),
            ),
            (
                "wasmesh_mtls_outbound_connections_total",
                "Outbound connections carried over mTLS (handshakes completed)",
                v(&self.outbound_mtls),
            ),
            (
                "wasmesh_mtls_outbound_no_identity_total",
                "Outbound connections to a meshed endpoint refused: no certificate yet",
                v(&self.outbound_no_identity),
            ),
            (
                "wasmesh_mtls_inbound_connections_total",
                "Inbound mTLS connections accepted (handshakes completed)",
                v(&self.inbound_mtls),
            ),
            (
                "wasmesh_inbound_plaintext_connections_total",
                "Inbound plaintext connections accepted (permissive)",
                v(&self.inbound_plaintext),
            ),
            (
                "wasmesh_inbound_plaintext_refused_total",
                "Inbound plaintext connections refused (strict)",
                v(&self.inbound_plaintext_refused),
            ),
            (
                "wasmesh_authz_denied_total",
                "Connections (L4) and requests (L7) denied by an authorization policy",
                v(&self.authz_denied),
            ),
        ]
    }

    /// `(reason, handshakes refused)` for every reason in [`REFUSAL_REASONS`].
    pub fn refusals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        REFUSAL_REASONS
            .iter()
            .zip(&self.refused)
            .map(|(r, c)| (*r, c.load(Ordering::Relaxed)))
    }
}
