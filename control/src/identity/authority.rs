//! The certificate authority: signs workload certificates for proven identities, and keeps the
//! trust bundle through rotations.
//!
//! A rotation never breaks a connection: a new root first joins the bundle (proxies trust both),
//! and signs only after `propagation`, by when every proxy has the new bundle. The old root
//! then stays in the bundle until every certificate it signed has expired.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, ExtendedKeyUsagePurpose,
    Issuer, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use tokio::sync::watch;
use wasmesh_api::identity::TrustBundle;
use wasmesh_api::spiffe::SpiffeId;

use super::root::{Root, hex, random_serial};

/// Lifetimes of what the authority signs.
#[derive(Debug, Clone)]
pub struct AuthorityConfig {
    pub trust_domain: String,
    /// Lifetime of a workload certificate when the proxy asks for none, and the most it gets.
    pub cert_lifetime: Duration,
    /// How long a new root is trusted before it signs.
    pub propagation: Duration,
}

impl AuthorityConfig {
    pub fn new(trust_domain: impl Into<String>) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            cert_lifetime: Duration::from_secs(24 * 3600),
            propagation: Duration::from_secs(10),
        }
    }
}

/// Why a certificate was not signed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the certificate signing request does not parse or its signature is wrong: {0}")]
    BadCsr(rcgen::Error),
    #[error("the certificate signing request asks for {asked}, but the token proves {proven}")]
    OtherIdentity { asked: String, proven: String },
    #[error("cannot sign: {0}")]
    Sign(rcgen::Error),
}

/// A signed workload certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub id: SpiffeId,
    /// The workload certificate, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
}

#[derive(Debug)]
struct State {
    signing: Arc<Root>,
    /// A root in the bundle, signing from the instant given.
    incoming: Option<(Arc<Root>, Instant)>,
    /// Roots that no longer sign, trusted until the time given.
    retired: Vec<(Arc<Root>, SystemTime)>,
    version: u64,
}

#[derive(Debug)]
pub struct Authority {
    cfg: AuthorityConfig,
    state: RwLock<State>,
    bundle: watch::Sender<TrustBundle>,
}

impl Authority {
    pub fn new(cfg: AuthorityConfig, root: Root) -> Self {
        let state = State {
            signing: Arc::new(root),
            incoming: None,
            retired: Vec::new(),
            version: 1,
        };
        let bundle = watch::Sender::new(bundle_of(&cfg, &state));
        Self {
            cfg,
            state: RwLock::new(state),
            bundle,
        }
    }

    pub fn config(&self) -> &AuthorityConfig {
        &self.cfg
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The trust bundle now.
    pub fn bundle(&self) -> TrustBundle {
        self.bundle.borrow().clone()
    }

    /// The trust bundle now and each time it changes.
    pub fn subscribe(&self) -> watch::Receiver<TrustBundle> {
        self.bundle.subscribe()
    }

    /// Fingerprint of the root that signs now.
    pub fn signer_fingerprint(&self) -> [u8; 32] {
        self.state().signing.fingerprint
    }

    /// Starts a rotation to `root`: trusted at once, signing after the propagation delay. A root
    /// already signing or incoming is ignored (returns false).
    pub fn introduce(&self, root: Root) -> bool {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if st.signing.fingerprint == root.fingerprint
            || st
                .incoming
                .as_ref()
                .is_some_and(|(r, _)| r.fingerprint == root.fingerprint)
        {
            return false;
        }
        tracing::info!(
            new_root = %hex(&root.fingerprint[..8]), signs_in = ?self.cfg.propagation,
            "CA rotation: new root added to the trust bundle"
        );
        st.incoming = Some((Arc::new(root), Instant::now() + self.cfg.propagation));
        st.version += 1;
        self.bundle.send_replace(bundle_of(&self.cfg, &st));
        true
    }

    /// Moves rotations along: an incoming root whose time has come signs; retired roots whose
    /// certificates have all expired leave the bundle. Returns when to call again, if needed.
    pub fn tick(&self) -> Option<Instant> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        if let Some((_, at)) = &st.incoming
            && *at <= Instant::now()
            && let Some((root, _)) = st.incoming.take()
        {
            let old = std::mem::replace(&mut st.signing, root);
            let until = SystemTime::now() + self.cfg.cert_lifetime + Duration::from_secs(60);
            tracing::info!(
                signing = %hex(&st.signing.fingerprint[..8]), retired = %hex(&old.fingerprint[..8]),
                "CA rotation: the new root signs; the old one stays trusted until its certificates expire"
            );
            st.retired.push((old, until));
            changed = true;
        }
        let now = SystemTime::now();
        let before = st.retired.len();
        st.retired.retain(|(_, until)| *until > now);
        changed |= st.retired.len() != before;
        if changed {
            st.version += 1;
            self.bundle.send_replace(bundle_of(&self.cfg, &st));
        }
        let next_retire = st
            .retired
            .iter()
            .map(|(_, u)| Instant::now() + u.duration_since(now).unwrap_or_default())
            .min();
        [st.incoming.as_ref().map(|(_, at)| *at), next_retire]
            .into_iter()
            .flatten()
            .min()
    }

    /// Signs `csr` (PKCS#10 DER) for `id`, the identity the caller proved. The request's own
    /// names are not copied; a SPIFFE ID in it other than `id` is refused.
    pub fn issue(
        &self,
        csr: &[u8],
        id: &SpiffeId,
        requested: Option<Duration>,
    ) -> Result<Issued, IssueError> {
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
            csr.to_vec(),
        ))
        .map_err(IssueError::BadCsr)?;
        let uri = id.uri();
        for san in &csr.params.subject_alt_names {
            let asked = match san {
                SanType::URI(u) => u.as_str().to_string(),
                SanType::DnsName(d) => d.as_str().to_string(),
                SanType::Rfc822Name(e) => e.as_str().to_string(),
                SanType::IpAddress(ip) => ip.to_string(),
                other => format!("{other:?}"),
            };
            if asked != uri {
                return Err(IssueError::OtherIdentity { asked, proven: uri });
            }
        }
        let lifetime = requested
            .filter(|d| !d.is_zero())
            .map_or(self.cfg.cert_lifetime, |d| d.min(self.cfg.cert_lifetime));
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            uri.clone().try_into().map_err(IssueError::Sign)?,
        )];
        let now = time::OffsetDateTime::now_utc();
        // A little slack for clocks that are behind ours.
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + lifetime;
        params.serial_number = Some(random_serial());
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let signing = self.state().signing.clone();
        let issuer =
            Issuer::from_ca_cert_der(&signing.signer, &signing.key).map_err(IssueError::Sign)?;
        let cert = params
            .signed_by(&csr.public_key, &issuer)
            .map_err(IssueError::Sign)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(signing.intermediates.iter().cloned());
        Ok(Issued {
            id: id.clone(),
            chain,
            not_after: SystemTime::now() + lifetime,
        })
    }
}

fn bundle_of(cfg: &AuthorityConfig, st: &State) -> TrustBundle {
    let mut roots: Vec<Vec<u8>> = vec![st.signing.anchor.to_vec()];
    let others = st
        .incoming
        .iter()
        .map(|(r, _)| r)
        .chain(st.retired.iter().map(|(r, _)| r));
    for r in others {
        if !roots.iter().any(|a| a.as_slice() == r.anchor.as_ref()) {
            roots.push(r.anchor.to_vec());
        }
    }
    TrustBundle {
        trust_domain: cfg.trust_domain.clone(),
        roots,
        signer: st.signing.fingerprint.to_vec(),
        version: st.version,
    }
}

/// Moves rotations along for as long as it runs.
pub async fn run_rotations(authority: Arc<Authority>) {
    loop {
        let next = authority.tick();
        let wait = next
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(20), Duration::from_secs(1));
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::KeyPair;
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    fn authority(propagation: Duration) -> Authority {
        let mut cfg = AuthorityConfig::new("cluster.local");
        cfg.propagation = propagation;
        cfg.cert_lifetime = Duration::from_secs(600);
        Authority::new(
            cfg,
            Root::generate("cluster.local", Duration::from_secs(3600)).unwrap(),
        )
    }

    fn csr(sans: Vec<String>) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans
            .into_iter()
            .map(|s| SanType::URI(s.try_into().unwrap()))
            .collect();
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    fn uris(der: &[u8]) -> Vec<String> {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_identity_comes_from_the_proof_not_the_request() {
        let ca = authority(Duration::ZERO);
        let id = SpiffeId::new("cluster.local", "demo", "backend");
        let issued = ca.issue(&csr(vec![]), &id, None).unwrap();
        assert_eq!(
            uris(&issued.chain[0]),
            ["spiffe://cluster.local/ns/demo/sa/backend"]
        );

        let err = ca
            .issue(
                &csr(vec![
                    "spiffe://cluster.local/ns/kube-system/sa/admin".into(),
                ]),
                &id,
                None,
            )
            .unwrap_err();
        assert!(
            matches!(&err, IssueError::OtherIdentity { asked, .. } if asked.contains("kube-system")),
            "{err}"
        );
        assert!(matches!(
            ca.issue(b"garbage", &id, None),
            Err(IssueError::BadCsr(_))
        ));
    }

    #[test]
    fn lifetimes_are_capped() {
        let ca = authority(Duration::ZERO);
        let id = SpiffeId::new("cluster.local", "demo", "backend");
        let short = ca
            .issue(&csr(vec![]), &id, Some(Duration::from_secs(60)))
            .unwrap();
        let left = short.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(50));
        let long = ca
            .issue(&csr(vec![]), &id, Some(Duration::from_secs(1 << 30)))
            .unwrap();
        assert!(
            long.not_after.duration_since(SystemTime::now()).unwrap() <= Duration::from_secs(600)
        );
    }

    #[test]
    fn a_new_root_is_trusted_before_it_signs_and_the_old_one_after() {
        let ca = authority(Duration::from_millis(50));
        let first = ca.bundle();
        assert_eq!(first.roots.len(), 1);
        let new = Root::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let new_fp = new.fingerprint;
        assert!(ca.introduce(new));
        let during = ca.bundle();
        assert_eq!(during.roots.len(), 2, "old and new trusted");
        assert_eq!(during.signer, first.signer, "the old root still signs");
        std::thread::sleep(Duration::from_millis(60));
        ca.tick();
        let after = ca.bundle();
        assert_eq!(after.signer, new_fp.to_vec(), "the new root signs");
        assert_eq!(
            after.roots.len(),
            2,
            "the old root stays until its certificates expire"
        );
        assert!(after.version > during.version && during.version > first.version);
    }
}
