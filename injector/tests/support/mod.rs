//! Shared by the integration tests (and the admission benchmark): fixtures, running a review
//! and applying its patch, a test CA, and an HTTPS client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use wasmesh_injector::config::Config;
use wasmesh_injector::mutate::NamespaceInjection;
use wasmesh_injector::webhook::{self, Outcome};

pub fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub fn fixture_json(name: &str) -> Value {
    serde_json::from_slice(&fixture(name)).expect("fixture is JSON")
}

/// An AdmissionReview for `pod` in the shape kube-apiserver sends (Kubernetes docs).
pub fn review_of(pod: &Value, namespace: &str, dry_run: bool) -> Vec<u8> {
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": name,
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {
                "username": "admin",
                "uid": "014fbff9a07c",
                "groups": ["system:authenticated", "my-admin-group"],
                "extra": {"some-key": ["some-value1", "some-value2"]}
            },
            "object": pod,
            "oldObject": null,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            "dryRun": dry_run
        }
    }))
    .expect("serializes")
}

/// A minimal valid pod.
pub fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]}
    })
}

/// The answer to `body` as JSON, and the outcome, with the default config.
pub fn respond(body: &[u8], injection: NamespaceInjection) -> (Value, Outcome) {
    respond_with(body, injection, &Config::default())
}

pub fn respond_with(
    body: &[u8],
    injection: NamespaceInjection,
    config: &Config,
) -> (Value, Outcome) {
    let reviewed = webhook::review(body, injection, config).expect("a valid review is answered");
    let value = serde_json::from_slice(&reviewed.body).expect("the answer is JSON");
    (value, reviewed.outcome)
}

/// The JSON Patch of an answer: checks the documented wire form (patchType JSONPatch, patch a
/// base64 string of a JSON array). `None` when the answer carries no patch.
pub fn patch_of(answer: &Value) -> Option<json_patch::Patch> {
    let response = &answer["response"];
    match (response.get("patchType"), response.get("patch")) {
        (None, None) => None,
        (Some(t), Some(Value::String(b64))) => {
            assert_eq!(t, "JSONPatch");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("patch is base64");
            let ops: Value = serde_json::from_slice(&bytes).expect("patch is JSON");
            assert!(ops.is_array(), "patch is a JSON array: {ops}");
            Some(serde_json::from_value(ops).expect("patch is a JSON Patch"))
        }
        other => panic!("patchType and patch must come together, patch a string: {other:?}"),
    }
}

/// `request.object` of a review with the answer's patch applied (unchanged if no patch).
pub fn patched(review_body: &[u8], answer: &Value) -> Value {
    let review: Value = serde_json::from_slice(review_body).expect("review is JSON");
    let mut object = review["request"]["object"].clone();
    if let Some(patch) = patch_of(answer) {
        json_patch::patch(&mut object, &patch.0).expect("the patch applies to the object");
    }
    object
}

/// Checks that `value` is a valid Pod for k8s-openapi and returns it.
pub fn as_pod(value: &Value) -> Pod {
    serde_json::from_value(value.clone()).expect("the result is a valid k8s_openapi Pod")
}

/// Names of a list of containers.
pub fn names(containers: &Value) -> Vec<String> {
    containers
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The container named `name` in `list`.
pub fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in {list}"))
}

/// The command of a container as strings.
pub fn command(c: &Value) -> Vec<String> {
    serde_json::from_value(c["command"].clone()).expect("command is a list of strings")
}

// ---- TLS ---------------------------------------------------------------------------------

/// A CA that issues server certificates for 127.0.0.1 / localhost.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("key");
        Self {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("CA"),
        }
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A leaf for `wasmesh-injector.wasmesh-system.svc`, localhost and 127.0.0.1, with
    /// `common_name` so tests can tell two leaves apart: (cert PEM, key PEM).
    pub fn issue(&self, common_name: &str) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec![
            "wasmesh-injector.wasmesh-system.svc".to_owned(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der()).expect("CA is a valid root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

/// Writes a cert/key pair into `dir` (replacing atomically, as the kubelet does) and returns
/// the paths.
pub fn write_pair(dir: &Path, cert: &str, key: &str) -> (PathBuf, PathBuf) {
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    for (path, text) in [(&cert_path, cert), (&key_path, key)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    }
    (cert_path, key_path)
}

/// One HTTP/1.1 connection over TLS to the server.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// The leaf certificate the server presented.
    pub peer_leaf: CertificateDer<'static>,
}

/// What came back.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let name = ServerName::try_from("localhost").expect("name");
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        let peer_leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first().cloned())
            .expect("server sent a certificate");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { sender, peer_leaf }
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Reply {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        if let Some(ct) = content_type {
            builder = builder.header("content-type", ct);
        }
        let req = builder.body(Full::new(Bytes::from(body))).expect("request");
        self.sender.ready().await.expect("connection ready");
        let resp = self.sender.send_request(req).await.expect("response");
        let status = resp.status();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        Reply {
            status,
            content_type,
            body,
        }
    }

    pub async fn post_json(&mut self, path: &str, body: Vec<u8>) -> Reply {
        self.request("POST", path, Some("application/json"), body)
            .await
    }
}
