//! `BENCH __tls-probe`: the tool that checks a pair's server side enforces mTLS. Run in the
//! node namespace (no interception there), it connects to the server pod's app port — which the
//! pod's inbound rule hands to the server-side proxy — five times:
//!
//! 1. no TLS, the app's request in plaintext;
//! 2. TLS 1.3, no client certificate;
//! 3. TLS 1.3, a client certificate of another CA (same trust domain);
//! 4. TLS 1.3, a client certificate of the run's CA;
//! 5. the same again, to see whether the server resumed the session of 4.
//!
//! Each is `accepted` when the app's answer came back, else `refused: <why>`. The server's
//! certificate is recorded, with whether its chain verifies to the run's CA. The client offers
//! the mesh's ALPN `wasmesh/1` (wasmesh's inbound requires it; Envoy ignores it). Prints one JSON
//! line ([`super::mtls::ProbeReport`]).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, HandshakeKind, SignatureScheme,
    StreamOwned,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::mtls::ProbeReport;
use super::run::Args;

const TIMEOUT: Duration = Duration::from_secs(3);
const MESH_ALPN: &[u8] = b"wasmesh/1";
const ECHO_BYTES: usize = 64;

pub fn main(args: &[String]) -> anyhow::Result<()> {
    let a = Args::parse(args)?;
    let to: SocketAddr = a.get("to")?;
    let app: String = a.get("app")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let anchors: Vec<TrustAnchor<'static>> = certs(&a.get("ca")?)?
        .iter()
        .map(|c| {
            webpki::anchor_from_trusted_cert(c)
                .map(|t| t.to_owned())
                .context("the CA certificate is no trust anchor")
        })
        .collect::<anyhow::Result<_>>()?;
    let recorder = Arc::new(Recorder {
        anchors,
        provider: provider.clone(),
        seen: Mutex::new(None),
    });
    let identity = |cert: &str, key: &str| -> anyhow::Result<_> {
        let cert: PathBuf = a.get(cert)?;
        let key: PathBuf = a.get(key)?;
        Ok((
            certs(&cert)?,
            PrivateKeyDer::from_pem_file(&key)
                .with_context(|| format!("reading the key {}", key.display()))?,
        ))
    };
    let none = config(&provider, &recorder, None)?;
    let foreign = config(
        &provider,
        &recorder,
        Some(identity("foreign-cert", "foreign-key")?),
    )?;
    let ours = config(&provider, &recorder, Some(identity("cert", "key")?))?;

    let plaintext = attempt(to, &app, None)?.0;
    let no_cert = attempt(to, &app, Some(none))?.0;
    let foreign_ca = attempt(to, &app, Some(foreign))?.0;
    // Only what the server presented to the run's certificate counts.
    *recorder.seen.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let mesh_ca = attempt(to, &app, Some(ours.clone()))?.0;
    let (server_uris, server_chain) = recorder
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(|| (Vec::new(), "no certificate seen".into()));
    let (_, kind) = attempt(to, &app, Some(ours))?;
    let report = ProbeReport {
        plaintext,
        no_cert,
        foreign_ca,
        mesh_ca,
        server_uris,
        server_chain,
        resumed: kind == Some(HandshakeKind::Resumed),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn certs(path: &PathBuf) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {}", path.display()))
}

fn config(
    provider: &Arc<CryptoProvider>,
    recorder: &Arc<Recorder>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone());
    let mut config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .context("the probe's certificate and key")?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// One connection: `accepted` when the app answered, else `refused: <why>`; and how the TLS
/// handshake went.
fn attempt(
    to: SocketAddr,
    app: &str,
    tls: Option<Arc<ClientConfig>>,
) -> anyhow::Result<(String, Option<HandshakeKind>)> {
    let tcp = match TcpStream::connect_timeout(&to, TIMEOUT) {
        Ok(s) => s,
        Err(e) => return Ok((format!("refused: connect: {e}"), None)),
    };
    tcp.set_read_timeout(Some(TIMEOUT))?;
    tcp.set_write_timeout(Some(TIMEOUT))?;
    Ok(match tls {
        None => {
            let mut tcp = tcp;
            (exchange(&mut tcp, app), None)
        }
        Some(config) => {
            let conn = ClientConnection::new(config, ServerName::IpAddress(to.ip().into()))?;
            let mut stream = StreamOwned::new(conn, tcp);
            let outcome = exchange(&mut stream, app);
            (outcome, stream.conn.handshake_kind())
        }
    })
}

/// The app's request and whether its answer came back.
fn exchange(s: &mut (impl Read + Write), app: &str) -> String {
    let why = |e: std::io::Error| match e.kind() {
        ErrorKind::UnexpectedEof => "refused: closed without an answer".to_string(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("refused: no answer within {TIMEOUT:?}")
        }
        _ => format!("refused: {e}"),
    };
    if app == "echo" {
        let mut req = vec![0x42u8; ECHO_BYTES + 1];
        req[0] = b'E';
        let mut resp = [0u8; ECHO_BYTES];
        match s.write_all(&req).and_then(|()| s.read_exact(&mut resp)) {
            Ok(()) if resp == [0x42u8; ECHO_BYTES] => "accepted".into(),
            Ok(()) => "refused: answered something else than the echo".into(),
            Err(e) => why(e),
        }
    } else {
        let req = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
        if let Err(e) = s.write_all(req) {
            return why(e);
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while got.len() < 12 {
            match s.read(&mut buf) {
                Ok(0) if got.is_empty() => return "refused: closed without an answer".into(),
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return why(e),
            }
        }
        if got.starts_with(b"HTTP/1.1 200") {
            "accepted".into()
        } else {
            let text = String::from_utf8_lossy(&got);
            format!(
                "refused: answered {:?}",
                text.lines().next().unwrap_or_default()
            )
        }
    }
}

/// Records the server's certificate (URI SANs, whether it chains to the run's CA) and lets the
/// handshake go on: the probe tests the server's side; the check judges what was recorded.
#[derive(Debug)]
struct Recorder {
    anchors: Vec<TrustAnchor<'static>>,
    provider: Arc<CryptoProvider>,
    seen: Mutex<Option<(Vec<String>, String)>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = match webpki::EndEntityCert::try_from(end_entity) {
            Ok(cert) => match cert.verify_for_usage(
                self.provider.signature_verification_algorithms.all,
                &self.anchors,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
                None,
                None,
            ) {
                Ok(_) => "chain to the run's CA".to_string(),
                Err(e) => format!("no chain to the run's CA: {e}"),
            },
            Err(e) => format!("not an end-entity certificate: {e}"),
        };
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some((uris(end_entity), chain));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
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
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The URI SANs of a certificate.
fn uris(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return vec!["(certificate does not parse)".into()];
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}
