//! Verifying a peer's certificate: the chain ends in a root of the trust bundle (webpki), the
//! certificate is within its validity, and its one URI SAN is a SPIFFE ID of our trust domain
//! (x509-parser). On the client side the server must also be the identity we expect: the
//! endpoint's ServiceAccount.
//!
//! Errors name the identity the certificate claims, so a refusal can be logged with both.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use wasmesh_api::spiffe::SpiffeId;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Why a peer's certificate is refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerCertError {
    #[error("certificate does not parse")]
    Unparsable,
    #[error("certificate carries no SPIFFE ID (no URI SAN)")]
    NoSpiffeId,
    #[error("certificate carries {0} URI SANs; a workload certificate has exactly one")]
    ManyUris(usize),
    #[error("certificate names {uri:?}, which is not a SPIFFE ID: {reason}")]
    BadSpiffeId { uri: String, reason: String },
    #[error("certificate of {id} is from trust domain {found}, not ours ({ours})")]
    OtherTrustDomain {
        id: Box<SpiffeId>,
        found: String,
        ours: String,
    },
    #[error("certificate of {id} has expired")]
    Expired { id: Box<SpiffeId> },
    #[error("certificate of {id} is not valid yet")]
    NotValidYet { id: Box<SpiffeId> },
    #[error("certificate of {id} is not signed by a root of our trust bundle")]
    UnknownIssuer { id: Box<SpiffeId> },
    #[error("certificate of {id} is refused: {reason}")]
    Invalid { id: Box<SpiffeId>, reason: String },
    #[error("peer is {found}, expected {expected}")]
    WrongIdentity {
        expected: Box<SpiffeId>,
        found: Box<SpiffeId>,
    },
}

impl PeerCertError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerCertError::Expired { .. } | PeerCertError::NotValidYet { .. } => "expired",
            PeerCertError::UnknownIssuer { .. } | PeerCertError::OtherTrustDomain { .. } => {
                "untrusted"
            }
            PeerCertError::WrongIdentity { .. } => "wrong_identity",
            _ => "invalid",
        }
    }

    /// Finds our error inside a rustls error (from a failed handshake), if there is one.
    pub fn from_rustls(e: &rustls::Error) -> Option<PeerCertError> {
        match e {
            rustls::Error::InvalidCertificate(CertificateError::Other(o)) => {
                o.0.downcast_ref::<PeerCertError>().cloned()
            }
            _ => None,
        }
    }
}

impl From<PeerCertError> for rustls::Error {
    fn from(e: PeerCertError) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    }
}

/// The SPIFFE ID in a certificate: its one URI SAN.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, PeerCertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| PeerCertError::Unparsable)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| PeerCertError::Unparsable)?
        .ok_or(PeerCertError::NoSpiffeId)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(PeerCertError::NoSpiffeId),
        [one] => one
            .parse()
            .map_err(
                |e: wasmesh_api::spiffe::SpiffeIdError| PeerCertError::BadSpiffeId {
                    uri: one.to_string(),
                    reason: e.to_string(),
                },
            ),
        many => Err(PeerCertError::ManyUris(many.len())),
    }
}

/// Checks peers against the trust bundle; one per bundle, shared by every connection.
#[derive(Debug, Clone)]
pub struct MeshVerifier {
    roots: Vec<TrustAnchor<'static>>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
    /// Client side: the identity the server must have (None on the server side).
    expected: Option<SpiffeId>,
}

impl MeshVerifier {
    pub fn new(
        roots: Vec<TrustAnchor<'static>>,
        trust_domain: String,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            roots,
            trust_domain,
            provider,
            expected: None,
        }
    }

    /// The same bundle, for a connection that must reach `expected`.
    pub fn expecting(&self, expected: SpiffeId) -> Self {
        Self {
            roots: self.roots.clone(),
            trust_domain: self.trust_domain.clone(),
            provider: self.provider.clone(),
            expected: Some(expected),
        }
    }

    /// Verifies a peer's chain for `usage`; returns its identity.
    pub fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, PeerCertError> {
        let id = spiffe_id_of(end_entity)?;
        if id.trust_domain != self.trust_domain {
            return Err(PeerCertError::OtherTrustDomain {
                found: id.trust_domain.clone(),
                ours: self.trust_domain.clone(),
                id: Box::new(id),
            });
        }
        let cert =
            webpki::EndEntityCert::try_from(end_entity).map_err(|_| PeerCertError::Invalid {
                id: Box::new(id.clone()),
                reason: "not a valid end-entity certificate".into(),
            })?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } => PeerCertError::Expired {
                id: Box::new(id.clone()),
            },
            webpki::Error::CertNotValidYet { .. } => PeerCertError::NotValidYet {
                id: Box::new(id.clone()),
            },
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                PeerCertError::UnknownIssuer {
                    id: Box::new(id.clone()),
                }
            }
            other => PeerCertError::Invalid {
                id: Box::new(id.clone()),
                reason: other.to_string(),
            },
        })?;
        if let Some(expected) = &self.expected
            && *expected != id
        {
            return Err(PeerCertError::WrongIdentity {
                expected: Box::new(expected.clone()),
                found: Box::new(id),
            });
        }
        Ok(id)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for MeshVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify_peer(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for MeshVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify_peer(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}
