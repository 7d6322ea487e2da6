//! A CA root (or intermediate) that signs workload certificates: read from PEM files, or made
//! here and written to a directory for the local mesh.
//!
//! The certificate file may hold a chain: the first certificate signs, the ones after it lead
//! up to the trust anchor (the last one), which is what proxies trust. A file that does not
//! parse, a key that does not belong to the certificate, or a certificate that may not sign
//! others is refused with the file's name.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

/// File names in a CA directory (`--ca-dir`).
pub const CERT_FILE: &str = "ca.pem";
pub const KEY_FILE: &str = "ca-key.pem";

/// Why a root cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} does not parse as a CA certificate: {reason} (give a PEM file whose first certificate is the signing CA)"
    )]
    Cert { path: PathBuf, reason: String },
    #[error(
        "{path} does not parse as a private key: {reason} (give a PEM PKCS#8 key, -----BEGIN PRIVATE KEY-----; `openssl pkcs8 -topk8 -nocrypt` converts others)"
    )]
    Key { path: PathBuf, reason: String },
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot generate a CA: {0}")]
    Generate(rcgen::Error),
}

/// The signing certificate and its key.
pub struct Root {
    /// The certificate that signs (first in the file).
    pub signer: CertificateDer<'static>,
    /// Certificates between the signer and the anchor (sent with every workload chain).
    pub intermediates: Vec<CertificateDer<'static>>,
    /// What proxies trust: the last certificate of the file (the signer itself when alone).
    pub anchor: CertificateDer<'static>,
    pub key: KeyPair,
    /// SHA-256 of the signer certificate.
    pub fingerprint: [u8; 32],
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Root")
            .field("fingerprint", &hex(&self.fingerprint[..8]))
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

pub fn sha256(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Root {
    /// A new self-signed root for `trust_domain`, valid for `validity`.
    pub fn generate(trust_domain: &str, validity: Duration) -> Result<Root, RootError> {
        let key = KeyPair::generate().map_err(RootError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "wasmesh");
        dn.push(
            DnType::CommonName,
            format!("wasmesh root CA {trust_domain}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let uri = format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(RootError::Generate)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + validity;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(RootError::Generate)?;
        let der = cert.der().clone();
        Ok(Root {
            fingerprint: sha256(&der),
            signer: der.clone(),
            intermediates: Vec::new(),
            anchor: der,
            key,
            not_after: SystemTime::now() + validity,
        })
    }

    /// Reads a root from a certificate PEM file and a key PEM file.
    pub fn from_files(cert_path: &Path, key_path: &Path) -> Result<Root, RootError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| RootError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        Self::from_pem(&read(cert_path)?, &read(key_path)?, cert_path, key_path)
    }

    /// Parses a root; the paths only name the files in errors.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Root, RootError> {
        let cert_err = |reason: String| RootError::Cert {
            path: cert_path.to_path_buf(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| cert_err(e.to_string()))?;
        let Some(signer) = certs.first().cloned() else {
            return Err(cert_err("no CERTIFICATE block".into()));
        };
        let (_, parsed) =
            X509Certificate::from_der(&signer).map_err(|e| cert_err(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(cert_err(
                "the certificate is not a CA (basicConstraints cA is not set)".into(),
            ));
        }
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(parsed.validity().not_after.timestamp().max(0) as u64);
        let key = KeyPair::from_pem(key_pem).map_err(|e| RootError::Key {
            path: key_path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if key.subject_public_key_info() != parsed.tbs_certificate.subject_pki.raw {
            return Err(RootError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            });
        }
        for (i, c) in certs.iter().enumerate().skip(1) {
            X509Certificate::from_der(c)
                .map_err(|e| cert_err(format!("certificate {} of the chain: {e}", i + 1)))?;
        }
        let anchor = certs.last().cloned().unwrap_or_else(|| signer.clone());
        let intermediates = if certs.len() > 2 {
            certs[1..certs.len() - 1].to_vec()
        } else {
            Vec::new()
        };
        Ok(Root {
            fingerprint: sha256(&signer),
            signer,
            intermediates,
            anchor,
            key,
            not_after,
        })
    }

    /// The certificate (chain) and key as PEM.
    pub fn to_pem(&self) -> (String, String) {
        let mut certs = vec![self.signer.clone()];
        certs.extend(self.intermediates.iter().cloned());
        if self.anchor != self.signer {
            certs.push(self.anchor.clone());
        }
        let cert_pem = certs
            .iter()
            .map(|c| pem_block("CERTIFICATE", c))
            .collect::<String>();
        (cert_pem, self.key.serialize_pem())
    }

    /// Writes `ca.pem` and `ca-key.pem` (mode 0600) into `dir`.
    pub fn write_to_dir(&self, dir: &Path) -> Result<(), RootError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir).map_err(|source| RootError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let (cert, key) = self.to_pem();
        for (name, body, mode) in [(KEY_FILE, key, 0o600), (CERT_FILE, cert, 0o644)] {
            let path = dir.join(name);
            let tmp = dir.join(format!(".{name}.tmp"));
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(mode)
                    .open(&tmp)?;
                f.write_all(body.as_bytes())?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            };
            write().map_err(|source| RootError::Write { path, source })?;
        }
        Ok(())
    }

    /// Reads the root in `dir`, or makes one and writes it there if the directory holds none.
    pub fn load_or_generate(
        dir: &Path,
        trust_domain: &str,
        validity: Duration,
    ) -> Result<(Root, bool), RootError> {
        let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if cert.exists() || key.exists() {
            return Ok((Root::from_files(&cert, &key)?, false));
        }
        let root = Root::generate(trust_domain, validity)?;
        root.write_to_dir(dir)?;
        Ok((root, true))
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

pub fn random_serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    rcgen::SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_root_round_trips_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let (made, created) =
            Root::load_or_generate(dir.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
        assert!(created);
        let (read, created) =
            Root::load_or_generate(dir.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
        assert!(!created, "the second start reuses the persisted root");
        assert_eq!(made.fingerprint, read.fingerprint);
        assert_eq!(read.anchor, read.signer);
    }

    #[test]
    fn a_file_that_does_not_parse_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("root.pem");
        let key = dir.path().join("root-key.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(&key, "garbage").unwrap();
        let err = Root::from_files(&cert, &key).unwrap_err().to_string();
        assert!(
            err.contains("root.pem") && err.contains("does not parse"),
            "{err}"
        );

        let good = Root::generate("cluster.local", Duration::from_secs(60)).unwrap();
        let (cert_pem, _) = good.to_pem();
        std::fs::write(&cert, cert_pem).unwrap();
        let err = Root::from_files(&cert, &key).unwrap_err().to_string();
        assert!(
            err.contains("root-key.pem") && err.contains("private key"),
            "{err}"
        );

        let other = Root::generate("cluster.local", Duration::from_secs(60)).unwrap();
        std::fs::write(&key, other.to_pem().1).unwrap();
        let err = Root::from_files(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("does not belong"), "{err}");
    }
}
