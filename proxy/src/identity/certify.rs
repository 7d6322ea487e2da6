//! Getting and keeping this proxy's certificate: a fresh key and CSR (rcgen), Certify with the
//! pod's token, renewal at 2/3 of the certificate's life (retried with jittered backoff while
//! the old one is still valid), and the trust bundle followed as it changes. A new bundle is
//! applied at once; a bundle whose signing root differs from the one that signed our certificate
//! (a CA rotation) makes us renew soon, at a jittered moment so proxies do not all ask at once.
//! If control is no CA (Certify unimplemented), the proxy runs without mTLS and asks again
//! every minute.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio::time::Instant;
use wasmesh_api::identity::identity_client::IdentityClient;
use wasmesh_api::identity::{CertifyRequest, TrustBundle, WatchTrustBundleRequest};
use wasmesh_api::spiffe::SpiffeId;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::stats::MeshStats;
use super::tls::{Bundle, IdentityStore, TlsState, WorkloadCert};

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// Control's address (the discovery port serves identity too).
    pub control: String,
    /// The token that proves who we are (projected ServiceAccount token, or the local mesh's
    /// per-pod token file). Read again before each request: kubelet rotates it.
    pub token_file: PathBuf,
    /// Certificate lifetime to ask for (control caps it); None = control's default.
    pub lifetime: Option<Duration>,
    pub pod_name: String,
    pub pod_namespace: String,
}

/// Why one Certify round failed.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("cannot read the identity token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the identity token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error("cannot make a key or CSR: {0}")]
    Key(rcgen::Error),
    #[error("cannot reach control at {control}: {reason}")]
    Connect { control: String, reason: String },
    #[error("control refused to certify us: {0}")]
    Refused(tonic::Status),
    #[error("control's answer is unusable: {0}")]
    Answer(String),
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
}

pub fn bundle_from(b: &TrustBundle) -> Bundle {
    Bundle {
        trust_domain: b.trust_domain.clone(),
        roots: b
            .roots
            .iter()
            .map(|r| CertificateDer::from(r.clone()))
            .collect(),
        signer: b.signer.clone(),
        version: b.version,
    }
}

/// One Certify round: key, CSR, request, answer checked.
pub async fn certify_once(
    cfg: &IdentityConfig,
    channel: tonic::transport::Channel,
) -> Result<(WorkloadCert, Bundle), CertifyError> {
    let token = tokio::fs::read_to_string(&cfg.token_file)
        .await
        .map_err(|source| CertifyError::Token {
            path: cfg.token_file.clone(),
            source,
        })?;
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(CertifyError::EmptyToken(cfg.token_file.clone()));
    }
    let key = KeyPair::generate().map_err(CertifyError::Key)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(CertifyError::Key)?;
    let mut client = IdentityClient::new(channel);
    let answer = client
        .certify(CertifyRequest {
            csr: csr.der().to_vec(),
            token,
            requested_lifetime_seconds: cfg
                .lifetime
                .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => CertifyError::Connect {
                control: cfg.control.clone(),
                reason: s.message().to_string(),
            },
            _ => CertifyError::Refused(s),
        })?
        .into_inner();
    let id: SpiffeId = answer
        .spiffe_id
        .parse()
        .map_err(|e| CertifyError::Answer(format!("{e}")))?;
    let chain: Vec<CertificateDer<'static>> =
        answer.chain.into_iter().map(CertificateDer::from).collect();
    let leaf = chain
        .first()
        .ok_or_else(|| CertifyError::Answer("no certificate in the chain".into()))?;
    let (_, parsed) = X509Certificate::from_der(leaf)
        .map_err(|e| CertifyError::Answer(format!("the certificate does not parse: {e}")))?;
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    let cert = WorkloadCert {
        id,
        not_before: at(parsed.validity().not_before.timestamp()),
        not_after: at(parsed.validity().not_after.timestamp()),
        chain,
        key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        ))),
    };
    let bundle = answer
        .trust_bundle
        .as_ref()
        .map(bundle_from)
        .ok_or_else(|| CertifyError::Answer("no trust bundle".into()))?;
    Ok((cert, bundle))
}

/// When to renew, from `now` (when the certificate arrived): 2/3 into its remaining life, minus
/// up to 5% of it (jitter). Control back-dates notBefore a little for clock skew, so the life
/// is counted from arrival, not from notBefore.
pub fn renewal_time(cert: &WorkloadCert, now: SystemTime) -> Duration {
    let start = cert.not_before.max(now);
    let life = cert.not_after.duration_since(start).unwrap_or_default();
    let jitter = life.mul_f64(rand::rng().random_range(0.0..0.05));
    (life * 2 / 3).saturating_sub(jitter)
}

/// Backoff after `failures` failed rounds: 1 s doubling to 30 s, ×0.5–1.5. Before the first
/// certificate (`have_one` false) it stays at about a second: mesh connections wait on it.
fn backoff(failures: u32, have_one: bool) -> Duration {
    let base = Duration::from_secs(1) * 2u32.saturating_pow(failures.min(5));
    let cap = if have_one {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(1)
    };
    base.min(cap).mul_f64(rand::rng().random_range(0.5..1.5))
}

fn channel(control: &str) -> Result<tonic::transport::Channel, CertifyError> {
    Ok(tonic::transport::Endpoint::from_shared(control.to_string())
        .map_err(|e| CertifyError::Connect {
            control: control.to_string(),
            reason: format!("bad address: {e}"),
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Keeps `store` holding a valid certificate and the current bundle, forever.
pub async fn run(cfg: IdentityConfig, store: Arc<IdentityStore>, stats: Arc<MeshStats>) {
    let channel = match channel(&cfg.control) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "identity: cannot start");
            return;
        }
    };
    let (bundle_tx, mut bundle_rx) = watch::channel::<Option<Bundle>>(None);
    tokio::spawn(follow_bundle(cfg.clone(), channel.clone(), bundle_tx));
    let mut renew_at = Instant::now();
    let mut failures = 0u32;
    // The root that signed our certificate.
    let mut our_signer: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(renew_at) => {
                let round = match certify_once(&cfg, channel.clone()).await {
                    Ok((cert, bundle)) => {
                        our_signer = bundle.signer.clone();
                        // A newer bundle from the stream wins over the one in the answer.
                        let bundle = match &*bundle_rx.borrow() {
                            Some(b) if b.version > bundle.version => b.clone(),
                            _ => bundle,
                        };
                        TlsState::new(cert, bundle).map_err(CertifyError::from)
                    }
                    Err(e) => Err(e),
                };
                match round {
                    Ok(state) => {
                        failures = 0;
                        // Never sooner than a second: a certificate too short-lived must not
                        // make us hammer control.
                        let wait = renewal_time(&state.cert, SystemTime::now()).max(Duration::from_secs(1));
                        MeshStats::inc(&stats.certificates);
                        let expiry = state.cert.not_after.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                        stats.certificate_expiry.store(expiry.as_secs(), std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(
                            identity = %state.cert.id,
                            expires_in = ?state.cert.not_after.duration_since(SystemTime::now()).unwrap_or_default(),
                            renew_in = ?wait,
                            "identity: certificate installed"
                        );
                        install(&store, &stats, state);
                        renew_at = Instant::now() + wait;
                    }
                    Err(CertifyError::Refused(status)) if status.code() == tonic::Code::Unimplemented => {
                        // Control runs without a CA root: no mTLS until it has one.
                        if !store.is_unavailable() && store.current().is_none() {
                            tracing::warn!(control = %cfg.control, "identity: control is not a certificate authority (no --ca-cert/--ca-dir); running without mTLS, asking again every minute");
                        }
                        store.set_unavailable();
                        renew_at = Instant::now() + Duration::from_secs(60);
                    }
                    Err(e) => {
                        failures += 1;
                        MeshStats::inc(&stats.certify_failures);
                        let wait = backoff(failures, store.current().is_some());
                        let valid_for = store.current().and_then(|s| s.cert.not_after.duration_since(SystemTime::now()).ok());
                        tracing::warn!(error = %e, retry_in = ?wait, current_valid_for = ?valid_for, "identity: cannot get a certificate");
                        renew_at = Instant::now() + wait;
                    }
                }
            }
            changed = bundle_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let Some(bundle) = bundle_rx.borrow_and_update().clone() else { continue };
                let Some(current) = store.current() else { continue };
                if current.bundle == bundle {
                    continue;
                }
                match TlsState::new(current.cert.clone(), bundle.clone()) {
                    Ok(state) => {
                        tracing::info!(version = bundle.version, roots = bundle.roots.len(), "identity: trust bundle updated");
                        install(&store, &stats, state);
                    }
                    Err(e) => tracing::warn!(error = %e, "identity: trust bundle unusable; keeping the previous one"),
                }
                if bundle.signer != our_signer {
                    let soon = Duration::from_millis(rand::rng().random_range(0..2000));
                    tracing::info!(renew_in = ?soon, "identity: the CA signs with a new root; renewing");
                    renew_at = renew_at.min(Instant::now() + soon);
                }
            }
        }
    }
}

/// Makes `state` the one new connections use, and says so on `/metrics`.
fn install(store: &IdentityStore, stats: &MeshStats, state: TlsState) {
    use std::sync::atomic::Ordering::Relaxed;
    stats
        .trust_bundle_roots
        .store(state.bundle.roots.len() as u64, Relaxed);
    stats
        .trust_bundle_version
        .store(state.bundle.version, Relaxed);
    store.set(state);
}

/// Follows WatchTrustBundle forever, reconnecting with backoff.
async fn follow_bundle(
    cfg: IdentityConfig,
    channel: tonic::transport::Channel,
    tx: watch::Sender<Option<Bundle>>,
) {
    let mut failures = 0u32;
    loop {
        let mut client = IdentityClient::new(channel.clone());
        let err = match client
            .watch_trust_bundle(WatchTrustBundleRequest {
                pod_name: cfg.pod_name.clone(),
                pod_namespace: cfg.pod_namespace.clone(),
            })
            .await
        {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(b)) => {
                            failures = 0;
                            tx.send_replace(Some(bundle_from(&b)));
                        }
                        Ok(None) => break "control closed the stream".to_string(),
                        Err(e) => break e.to_string(),
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        failures += 1;
        let wait = backoff(failures, tx.borrow().is_some());
        tracing::debug!(error = %err, retry_in = ?wait, "identity: trust bundle stream lost");
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_or_empty_token_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = |token_file: PathBuf| IdentityConfig {
            control: "http://127.0.0.1:1".into(),
            token_file,
            lifetime: None,
            pod_name: "p".into(),
            pod_namespace: "demo".into(),
        };
        let channel = channel("http://127.0.0.1:1").unwrap();
        let missing = dir.path().join("nope.token");
        let err = certify_once(&cfg(missing.clone()), channel.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        let empty = dir.path().join("empty.token");
        std::fs::write(&empty, "\n").unwrap();
        let err = certify_once(&cfg(empty.clone()), channel)
            .await
            .unwrap_err();
        assert!(matches!(err, CertifyError::EmptyToken(p) if p == empty));
    }

    #[test]
    fn renewal_comes_at_two_thirds_of_the_life_left_at_arrival() {
        let now = SystemTime::now();
        let cert = WorkloadCert {
            id: SpiffeId::new("cluster.local", "demo", "backend"),
            chain: Vec::new(),
            key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(Vec::new()))),
            // Back-dated by control for clock skew.
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(90),
        };
        let wait = renewal_time(&cert, now);
        assert!(
            wait <= Duration::from_secs(60) && wait >= Duration::from_millis(55_500),
            "{wait:?}"
        );
        let expired = WorkloadCert {
            not_after: now - Duration::from_secs(1),
            ..cert
        };
        assert_eq!(renewal_time(&expired, now), Duration::ZERO);
    }
}
