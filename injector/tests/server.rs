//! The webhook over real HTTPS on 127.0.0.1:0 with a test CA (rcgen): status codes, a real
//! injection, and a replaced certificate being served without a restart.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::json;
use support::*;
use tokio::sync::oneshot;
use wasmesh_injector::config::Config;
use wasmesh_injector::server::{self, ServerConfig};
use wasmesh_injector::tls::CertFiles;

struct Running {
    addr: SocketAddr,
    ca: TestCa,
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), server::ServerError>>,
}

impl Running {
    async fn start() -> Self {
        let ca = TestCa::new("wasmesh test CA");
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = ca.issue("first");
        let (cert, key) = write_pair(dir.path(), &cert, &key);
        let mut config = ServerConfig::new(CertFiles { cert, key }, Config::default());
        config.reload_interval = Duration::from_millis(20);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, config, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            ca,
            dir,
            stop: Some(stop),
            task,
        }
    }

    async fn client(&self) -> Client {
        Client::connect(self.addr, self.ca.client_config()).await
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server stops");
        result.expect("server task").expect("server ran fine");
    }
}

#[tokio::test]
async fn status_codes_and_a_real_injection() {
    let server = Running::start().await;
    let mut c = server.client().await;

    let r = c.request("GET", "/healthz", None, Vec::new()).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok\n"));

    let r = c.post_json("/inject", Vec::new()).await;
    assert_eq!(r.status.as_u16(), 400);
    assert_eq!(
        r.text(),
        "empty body: expected an admission.k8s.io/v1 AdmissionReview (JSON)\n"
    );

    let r = c
        .request(
            "POST",
            "/inject",
            Some("text/yaml"),
            fixture("gke-pod-review.json"),
        )
        .await;
    assert_eq!(r.status.as_u16(), 415);
    assert_eq!(
        r.text(),
        "unsupported content type: send Content-Type: application/json\n"
    );
    let r = c
        .request("POST", "/inject", None, fixture("gke-pod-review.json"))
        .await;
    assert_eq!(r.status.as_u16(), 415);

    let r = c
        .post_json("/inject", br#"{"kind":"Pod","apiVersion":"v1"}"#.to_vec())
        .await;
    assert_eq!(r.status.as_u16(), 400);
    assert_eq!(
        r.text(),
        "Pod v1 is not supported: expected kind AdmissionReview, apiVersion admission.k8s.io/v1 \
         (set admissionReviewVersions: [v1] on the webhook)\n"
    );
    let r = c
        .post_json("/inject", br#"{"hello": "world"}"#.to_vec())
        .await;
    assert_eq!(r.status.as_u16(), 400);
    assert!(
        r.text()
            .starts_with("body is not an admission.k8s.io/v1 AdmissionReview: missing field"),
        "{}",
        r.text()
    );

    let r = c.request("GET", "/inject", None, Vec::new()).await;
    assert_eq!(r.status.as_u16(), 405);
    let r = c.post_json("/mutate", Vec::new()).await;
    assert_eq!(r.status.as_u16(), 404);

    // Another kind: allowed, no patch.
    let r = c
        .post_json(
            "/inject/namespace-enabled",
            fixture("k8s-docs-scale-review.json"),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    let answer = r.json();
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(
        answer["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert!(patch_of(&answer).is_none());

    // A pod in an opted-in namespace: injected, on the same connection.
    let body = fixture("gke-pod-review.json");
    let r = c.post_json("/inject/namespace-enabled", body.clone()).await;
    assert_eq!(r.status.as_u16(), 200);
    let answer = r.json();
    assert_eq!(
        answer["response"]["uid"],
        "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4"
    );
    let injected = patched(&body, &answer);
    as_pod(&injected);
    assert_eq!(
        names(&injected["spec"]["initContainers"]),
        ["wasmesh-init", "wasmesh-proxy"]
    );

    // The same pod on /inject: its namespace is not opted in and the pod does not opt in.
    let r = c.post_json("/inject", body).await;
    assert_eq!(r.status.as_u16(), 200);
    assert!(patch_of(&r.json()).is_none());

    // A pod that opts in by label, on /inject.
    let mut p = pod("opted");
    p["metadata"]["labels"]["wasmesh.io/inject"] = json!("true");
    let body = review_of(&p, "default", false);
    let r = c.post_json("/inject", body.clone()).await;
    let injected = patched(&body, &r.json());
    assert_eq!(
        names(&injected["spec"]["initContainers"]),
        ["wasmesh-init", "wasmesh-proxy"]
    );

    server.stop().await;
}

#[tokio::test]
async fn http2_is_served_too() {
    let server = Running::start().await;
    let tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let mut tls = (*server.ca.client_config()).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .expect("TLS");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("POST")
        .uri("https://localhost/inject/namespace-enabled")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(
            fixture("gke-pod-review.json"),
        )))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status().as_u16(), 200);
    drop(sender);
    server.stop().await;
}

#[tokio::test]
async fn a_replaced_certificate_is_served_without_a_restart() {
    let server = Running::start().await;
    let first = server.client().await.peer_leaf;

    // A broken pair (key of another certificate) is not served: the old one stays.
    let (cert_a, _) = server.ca.issue("broken");
    let (_, key_b) = server.ca.issue("other");
    write_pair(server.dir.path(), &cert_a, &key_b);
    let (cert, key) = server.ca.issue("second");
    // Wait for the server to have looked at the broken pair at least once (it keeps serving).
    for _ in 0..20 {
        assert_eq!(server.client().await.peer_leaf, first);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    write_pair(server.dir.path(), &cert, &key);
    let expected = CertificateDer::from_pem_slice(cert.as_bytes()).expect("PEM certificate");
    let mut served = first.clone();
    for _ in 0..500 {
        served = server.client().await.peer_leaf;
        if served != first {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_ne!(served, first, "the new certificate is served");
    assert_eq!(served, expected);
    server.stop().await;
}

#[tokio::test]
async fn a_server_without_a_usable_certificate_does_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::write(&cert, "not a certificate").expect("write");
    std::fs::write(&key, "not a key").expect("write");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = server::run(
        listener,
        ServerConfig::new(
            CertFiles {
                cert: cert.clone(),
                key,
            },
            Config::default(),
        ),
        std::future::pending(),
    )
    .await
    .expect_err("no certificate, no server");
    assert_eq!(
        err.to_string(),
        format!(
            "TLS certificate: {}: no certificate in it; expected PEM (-----BEGIN CERTIFICATE-----)",
            cert.display()
        )
    );

    let missing = dir.path().join("missing.crt");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = server::run(
        listener,
        ServerConfig::new(
            CertFiles {
                cert: missing.clone(),
                key: dir.path().join("tls.key"),
            },
            Config::default(),
        ),
        std::future::pending(),
    )
    .await
    .expect_err("no file, no server");
    assert!(
        err.to_string()
            .starts_with(&format!("TLS certificate: reading {}:", missing.display())),
        "{err}"
    );
}
