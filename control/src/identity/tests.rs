//! The identity service as a proxy sees it: a real tonic client against control's port, with
//! TokenReview answered by the fake API server and token files as in the local mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::discovery::{Hub, server};
use crate::identity::service::IdentityStats;
use crate::identity::{Authority, AuthorityConfig, IdentityService, Root, TokenReviewer, token};
use crate::testing::fake_apiserver::FakeApiServer;
use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::net::TcpListener;
use tonic::Code;
use wasmesh_api::identity::identity_client::IdentityClient;
use wasmesh_api::identity::{CertifyRequest, WatchTrustBundleRequest};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

async fn start(
    reviewer: TokenReviewer,
    propagation: Duration,
) -> (SocketAddr, Arc<Authority>, Arc<IdentityStats>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut cfg = AuthorityConfig::new("cluster.local");
    cfg.propagation = propagation;
    let root = Root::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let authority = Arc::new(Authority::new(cfg, root));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = IdentityService::new(authority.clone(), reviewer);
    let stats = service.stats.clone();
    tokio::spawn(server::serve_with_identity(
        listener,
        Arc::new(Hub::new()),
        Some(service),
        std::future::pending(),
    ));
    (addr, authority, stats)
}

fn csr(uri: Option<&str>) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    if let Some(u) = uri {
        params.subject_alt_names = vec![SanType::URI(u.try_into().unwrap())];
    }
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn spiffe_ids(der: &[u8]) -> Vec<String> {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

async fn client(addr: SocketAddr) -> IdentityClient<tonic::transport::Channel> {
    IdentityClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

#[tokio::test]
async fn service_account_tokens_are_checked_with_token_review() {
    let api = FakeApiServer::start().await.unwrap();
    api.add_token("backend-token", "demo", "backend", &["wasmesh"]);
    api.add_token("other-audience", "demo", "backend", &["vault"]);
    let reviewer = TokenReviewer::Kube {
        client: api.client().unwrap(),
        audiences: vec!["wasmesh".into()],
    };
    let (addr, _, stats) = start(reviewer, Duration::ZERO).await;
    let mut c = client(addr).await;

    let ok = c
        .certify(CertifyRequest {
            csr: csr(None),
            token: "backend-token".into(),
            requested_lifetime_seconds: 300,
        })
        .await
        .expect("a valid token is certified")
        .into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://cluster.local/ns/demo/sa/backend");
    assert_eq!(
        spiffe_ids(&ok.chain[0]),
        std::slice::from_ref(&ok.spiffe_id)
    );
    let bundle = ok.trust_bundle.expect("bundle");
    assert_eq!(bundle.roots.len(), 1);

    for (token, why) in [
        ("", "missing"),
        ("forged", "foreign"),
        ("other-audience", "wrong audience"),
    ] {
        let err = c
            .certify(CertifyRequest {
                csr: csr(None),
                token: token.into(),
                requested_lifetime_seconds: 0,
            })
            .await
            .expect_err(why);
        assert_eq!(err.code(), Code::Unauthenticated, "{why}: {err:?}");
    }
    api.revoke_token("backend-token");
    let err = c
        .certify(CertifyRequest {
            csr: csr(None),
            token: "backend-token".into(),
            requested_lifetime_seconds: 0,
        })
        .await
        .expect_err("an expired token");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("invalid bearer token"), "{err:?}");
    let mut metrics = String::new();
    stats.render(&mut metrics);
    assert!(
        metrics.contains("wasmesh_control_certificates_issued_total 1\n")
            && metrics.contains("wasmesh_control_certify_refused_token_total 4\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_request_for_another_identity_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = token::token_path(dir.path(), "demo", "client", "client-1");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "client-token").unwrap();
    let (addr, _, stats) = start(TokenReviewer::Dir(dir.path().into()), Duration::ZERO).await;
    let mut c = client(addr).await;
    let err = c
        .certify(CertifyRequest {
            csr: csr(Some("spiffe://cluster.local/ns/demo/sa/backend")),
            token: "client-token".into(),
            requested_lifetime_seconds: 0,
        })
        .await
        .expect_err("asks for backend with client's token");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("ns/demo/sa/backend"), "{err:?}");
    let ok = c
        .certify(CertifyRequest {
            csr: csr(Some("spiffe://cluster.local/ns/demo/sa/client")),
            token: "client-token".into(),
            requested_lifetime_seconds: 0,
        })
        .await
        .expect("asking for its own identity is fine")
        .into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://cluster.local/ns/demo/sa/client");
    let err = c
        .certify(CertifyRequest {
            csr: b"not a csr".to_vec(),
            token: "client-token".into(),
            requested_lifetime_seconds: 0,
        })
        .await
        .expect_err("garbage CSR");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        stats.refused_csr.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn trust_bundle_watchers_see_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, authority, _) = start(
        TokenReviewer::Dir(dir.path().into()),
        Duration::from_millis(200),
    )
    .await;
    tokio::spawn(crate::identity::authority::run_rotations(authority.clone()));
    let mut c = client(addr).await;
    let mut stream = c
        .watch_trust_bundle(WatchTrustBundleRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.roots.len(), 1);
    authority.introduce(Root::generate("cluster.local", Duration::from_secs(3600)).unwrap());
    let during = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(during.roots.len(), 2);
    assert_eq!(during.signer, first.signer, "trusted before it signs");
    let after = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_ne!(after.signer, first.signer, "then it signs");
    assert_eq!(after.roots.len(), 2, "the old root is still trusted");
}
