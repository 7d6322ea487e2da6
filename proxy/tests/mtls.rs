//! mTLS between two proxies in-process: a real control CA (gRPC on loopback, token files as in
//! the local mesh) certifies a "client" and a "backend" proxy through the proxy's own certify
//! loop; connections go through the proxy's outbound `secure` and inbound `accept` over real
//! loopback sockets. What is checked is what a user sees: bytes arrive in plaintext at the app,
//! or the connection is refused and the refusal counted.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wasmesh_control::discovery::{Hub, server};
use wasmesh_control::identity::{
    Authority, AuthorityConfig, IdentityService, Root, TokenReviewer, token,
};
use wasmesh_proxy::identity::accept::{self, Accepted};
use wasmesh_proxy::identity::authz::{self, Authorizer, MtlsMode};
use wasmesh_proxy::identity::connect::{self, Peer, SecureError, Upstream};
use wasmesh_proxy::identity::tls::{Bundle, HandshakeError, TlsState, WorkloadCert};
use wasmesh_proxy::identity::{IdentityStore, Mesh, MeshStats, PeerCertError, certify};

const WAIT: Duration = Duration::from_secs(10);

struct Ca {
    addr: SocketAddr,
    tokens: tempfile::TempDir,
    authority: Arc<Authority>,
}

async fn start_ca() -> Ca {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tokens = tempfile::tempdir().unwrap();
    let mut cfg = AuthorityConfig::new("cluster.local");
    cfg.propagation = Duration::from_millis(300);
    let authority = Arc::new(Authority::new(
        cfg,
        Root::generate("cluster.local", Duration::from_secs(3600)).unwrap(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::serve_with_identity(
        listener,
        Arc::new(Hub::new()),
        Some(IdentityService::new(
            authority.clone(),
            TokenReviewer::Dir(tokens.path().into()),
        )),
        std::future::pending(),
    ));
    tokio::spawn(wasmesh_control::identity::authority::run_rotations(
        authority.clone(),
    ));
    Ca {
        addr,
        tokens,
        authority,
    }
}

fn write_token(dir: &Path, ns: &str, sa: &str, pod: &str) -> std::path::PathBuf {
    let path = token::token_path(dir, ns, sa, pod);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, format!("token-of-{pod}")).unwrap();
    path
}

/// A proxy's identity side: certified by `ca` as `ns/sa`.
async fn proxy(ca: &Ca, ns: &str, sa: &str, pod: &str, lifetime: Option<Duration>) -> Arc<Mesh> {
    let token_file = write_token(ca.tokens.path(), ns, sa, pod);
    let mesh = Arc::new(Mesh {
        store: IdentityStore::new(),
        authorizer: Authorizer::new(
            authz::Workload {
                namespace: ns.into(),
                labels: [("app".to_string(), sa.to_string())].into(),
            },
            "cluster.local".into(),
            MtlsMode::Permissive,
        ),
        stats: Arc::new(MeshStats::default()),
    });
    tokio::spawn(certify::run(
        certify::IdentityConfig {
            control: format!("http://{}", ca.addr),
            token_file,
            lifetime,
            pod_name: pod.into(),
            pod_namespace: ns.into(),
        },
        mesh.store.clone(),
        mesh.stats.clone(),
    ));
    mesh.wait_identity(WAIT).await.expect("certified in time");
    mesh
}

/// An inbound listener: each connection goes through `accept` and the L4 `authorize`, then
/// echoes with a prefix naming the client identity (what the app would see is the plaintext).
async fn inbound(mesh: Arc<Mesh>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, peer)) = l.accept().await {
            let mesh = mesh.clone();
            tokio::spawn(async move {
                match accept::accept(&mesh, s, peer, addr).await {
                    Some(Accepted::Mesh(_, id))
                        if !accept::authorize(&mesh, Some(&id), peer, addr) => {}
                    Some(Accepted::Plain(..)) if !accept::authorize(&mesh, None, peer, addr) => {}
                    Some(Accepted::Mesh(mut tls, id)) => {
                        let mut buf = [0u8; 5];
                        if tls.read_exact(&mut buf).await.is_ok() {
                            let reply = format!("{id} said {}", String::from_utf8_lossy(&buf));
                            let _ = tls.write_all(reply.as_bytes()).await;
                            let _ = tls.shutdown().await;
                        }
                    }
                    Some(Accepted::Plain(mut tcp, _)) => {
                        let mut buf = [0u8; 5];
                        if tcp.read_exact(&mut buf).await.is_ok() {
                            let reply = format!("plaintext said {}", String::from_utf8_lossy(&buf));
                            let _ = tcp.write_all(reply.as_bytes()).await;
                        }
                    }
                    None => {}
                }
            });
        }
    });
    addr
}

fn backend_peer(addr: SocketAddr) -> Peer<'static> {
    Peer {
        addr,
        meshed: true,
        pod: Some("demo/backend-1"),
        service_account: Some("backend"),
    }
}

async fn call(mesh: &Mesh, addr: SocketAddr, peer: Peer<'_>) -> Result<String, SecureError> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    match connect::secure(Some(mesh), tcp, peer, WAIT, WAIT).await? {
        Upstream::Mesh(mut tls) => {
            // A server that refuses us may already have closed: then nothing comes back.
            let _ = tls.write_all(b"hello").await;
            let mut out = String::new();
            let _ = tls.read_to_string(&mut out).await;
            Ok(out)
        }
        Upstream::Plain(mut tcp) => {
            let _ = tcp.write_all(b"hello").await;
            let mut out = String::new();
            let _ = tcp.read_to_string(&mut out).await;
            Ok(out)
        }
    }
}

async fn plaintext_call(addr: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(b"hello").await;
    let mut out = String::new();
    let _ = tcp.read_to_string(&mut out).await;
    out
}

#[tokio::test]
async fn meshed_peers_talk_mtls_and_the_app_sees_plaintext() {
    let ca = start_ca().await;
    let client = proxy(&ca, "demo", "client", "client-1", None).await;
    let backend = proxy(&ca, "demo", "backend", "backend-1", None).await;
    let addr = inbound(backend.clone()).await;
    let answer = call(&client, addr, backend_peer(addr)).await.unwrap();
    assert_eq!(
        answer,
        "spiffe://cluster.local/ns/demo/sa/client said hello"
    );
    assert_eq!(client.stats.outbound_mtls.load(Ordering::Relaxed), 1);
    assert_eq!(backend.stats.inbound_mtls.load(Ordering::Relaxed), 1);

    // A non-meshed endpoint gets plaintext, and permissive mode accepts it.
    let mut plain = backend_peer(addr);
    plain.meshed = false;
    assert_eq!(
        call(&client, addr, plain).await.unwrap(),
        "plaintext said hello"
    );
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused() {
    let ca = start_ca().await;
    let client = proxy(&ca, "demo", "client", "client-1", None).await;
    let impostor = proxy(&ca, "demo", "impostor", "impostor-1", None).await;
    let addr = inbound(impostor).await;
    let err = call(&client, addr, backend_peer(addr)).await.unwrap_err();
    match &err {
        SecureError::Handshake {
            source: HandshakeError::Peer(PeerCertError::WrongIdentity { expected, found }),
            ..
        } => {
            assert_eq!(
                expected.to_string(),
                "spiffe://cluster.local/ns/demo/sa/backend"
            );
            assert_eq!(
                found.to_string(),
                "spiffe://cluster.local/ns/demo/sa/impostor"
            );
        }
        other => panic!("expected a wrong-identity refusal, got {other}"),
    }
    assert!(err.to_string().contains("impostor"), "{err}");
    assert_eq!(client.stats.refused_count("wrong_identity"), 1);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let ca = start_ca().await;
    let other_ca = start_ca().await;
    let backend = proxy(&ca, "demo", "backend", "backend-1", None).await;
    let stranger = proxy(&other_ca, "demo", "client", "client-1", None).await;
    let addr = inbound(backend.clone()).await;
    let err = call(&stranger, addr, backend_peer(addr)).await.unwrap_err();
    // The stranger does not trust our backend either: refused on its side first.
    assert!(
        matches!(
            &err,
            SecureError::Handshake {
                source: HandshakeError::Peer(PeerCertError::UnknownIssuer { .. }),
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("not signed by a root of our trust bundle"),
        "{err}"
    );
}

/// A certificate for `id` signed by `root`, valid between the two times.
fn hand_made(root: &Root, id: &str, not_before: SystemTime, not_after: SystemTime) -> WorkloadCert {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let issuer = Issuer::from_ca_cert_der(&root.signer, &root.key).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    WorkloadCert {
        id: id.parse().unwrap(),
        chain: vec![cert.der().clone()],
        key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        ))),
        not_before,
        not_after,
    }
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused_and_the_proxy_keeps_serving() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let root = Root::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let bundle = Bundle {
        trust_domain: "cluster.local".into(),
        roots: vec![root.anchor.clone()],
        signer: root.fingerprint.to_vec(),
        version: 1,
    };
    let now = SystemTime::now();
    let mesh = |cert: WorkloadCert| {
        let store = IdentityStore::new();
        store.set(TlsState::new(cert, bundle.clone()).unwrap());
        Arc::new(Mesh {
            store,
            authorizer: Authorizer::new(
                authz::Workload::default(),
                "cluster.local".into(),
                MtlsMode::Permissive,
            ),
            stats: Arc::new(MeshStats::default()),
        })
    };
    let hour = Duration::from_secs(3600);
    let backend = mesh(hand_made(
        &root,
        "spiffe://cluster.local/ns/demo/sa/backend",
        now - hour,
        now + hour,
    ));
    let expired = mesh(hand_made(
        &root,
        "spiffe://cluster.local/ns/demo/sa/client",
        now - 2 * hour,
        now - hour,
    ));
    let valid = mesh(hand_made(
        &root,
        "spiffe://cluster.local/ns/demo/sa/client",
        now - hour,
        now + hour,
    ));
    let addr = inbound(backend.clone()).await;
    // TLS 1.3: the client finishes its side before the server checks its certificate, so the
    // client sees the connection closed without an answer.
    let refused = call(&expired, addr, backend_peer(addr)).await;
    assert!(
        !matches!(&refused, Ok(answer) if !answer.is_empty()),
        "an expired certificate got an answer: {refused:?}"
    );
    // The server refused it, counted as expired.
    tokio::time::timeout(WAIT, async {
        while backend.stats.refused_count("expired") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the expired certificate is counted");
    assert_eq!(
        call(&valid, addr, backend_peer(addr)).await.unwrap(),
        "spiffe://cluster.local/ns/demo/sa/client said hello",
        "the proxy keeps serving the rest"
    );
}

#[tokio::test]
async fn garbage_where_a_client_hello_should_be_is_refused() {
    let ca = start_ca().await;
    let backend = proxy(&ca, "demo", "backend", "backend-1", None).await;
    let addr = inbound(backend.clone()).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01, 0x00, 0x10])
        .await
        .unwrap();
    tcp.write_all(&[0xab; 16]).await.unwrap();
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    assert!(out.is_empty(), "nothing reaches the app");
    assert_eq!(backend.stats.refused_count("broken_client_hello"), 1);
    assert_eq!(
        plaintext_call(addr).await,
        "plaintext said hello",
        "still serving"
    );
}

#[tokio::test]
async fn strict_refuses_plaintext_and_policies_allow_or_deny_identities() {
    let ca = start_ca().await;
    let client = proxy(&ca, "demo", "client", "client-1", None).await;
    let other = proxy(&ca, "demo", "other", "other-1", None).await;
    let backend = proxy(&ca, "demo", "backend", "backend-1", None).await;
    let addr = inbound(backend.clone()).await;
    assert_eq!(
        plaintext_call(addr).await,
        "plaintext said hello",
        "permissive by default"
    );

    let policies = authz::parse_policies(
        &format!(
            r#"
apiVersion: wasmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: backend, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: backend}}}}
  mtls: strict
  rules:
  - from: [spiffe://cluster.local/ns/demo/sa/client]
    ports: [{}]
"#,
            addr.port()
        ),
        Path::new("policy.yaml"),
    )
    .unwrap();
    backend.authorizer.set_local_policies(policies);
    assert_eq!(plaintext_call(addr).await, "", "strict: plaintext refused");
    assert_eq!(
        backend
            .stats
            .inbound_plaintext_refused
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(
        call(&client, addr, backend_peer(addr)).await.unwrap(),
        "spiffe://cluster.local/ns/demo/sa/client said hello"
    );
    assert_eq!(
        call(&other, addr, backend_peer(addr)).await.unwrap(),
        "",
        "denied: the connection is closed"
    );
    assert_eq!(backend.stats.authz_denied.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn renewal_keeps_open_connections_and_new_ones_use_the_new_certificate() {
    let ca = start_ca().await;
    // Control caps nothing here: ask for 3 s, renewed at 2/3 (~2 s).
    let client = proxy(
        &ca,
        "demo",
        "client",
        "client-1",
        Some(Duration::from_secs(3)),
    )
    .await;
    let backend = proxy(&ca, "demo", "backend", "backend-1", None).await;
    let first = client.store.current().unwrap().cert.chain[0].clone();

    // A long-lived echo stream through accept().
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let b = backend.clone();
    let server_seen = Arc::new(std::sync::Mutex::new(Vec::<CertificateDer<'static>>::new()));
    let seen = server_seen.clone();
    tokio::spawn(async move {
        while let Ok((s, peer)) = l.accept().await {
            let b = b.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                if let Some(Accepted::Mesh(mut tls, _)) = accept::accept(&b, s, peer, addr).await {
                    let cert = tls.get_ref().1.peer_certificates().unwrap()[0]
                        .clone()
                        .into_owned();
                    seen.lock().unwrap().push(cert);
                    let mut buf = [0u8; 1];
                    while tls.read_exact(&mut buf).await.is_ok() {
                        if tls.write_all(&buf).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let Upstream::Mesh(mut long) =
        connect::secure(Some(&client), tcp, backend_peer(addr), WAIT, WAIT)
            .await
            .unwrap()
    else {
        panic!("expected mTLS")
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < deadline {
        long.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        long.read_exact(&mut b)
            .await
            .expect("the long-lived stream stays up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = client.store.current().unwrap().cert.chain[0].clone();
    assert_ne!(first, now, "renewed at least once");
    assert!(client.stats.certificates.load(Ordering::Relaxed) >= 3);

    let tcp = TcpStream::connect(addr).await.unwrap();
    let Upstream::Mesh(mut fresh) =
        connect::secure(Some(&client), tcp, backend_peer(addr), WAIT, WAIT)
            .await
            .unwrap()
    else {
        panic!("expected mTLS")
    };
    fresh.write_all(b"y").await.unwrap();
    let mut b = [0u8; 1];
    fresh.read_exact(&mut b).await.unwrap();
    let seen = server_seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0], first);
    assert_ne!(
        seen[1], first,
        "a new connection presents the new certificate"
    );
}

#[tokio::test]
async fn a_ca_rotation_fails_no_connection() {
    let ca = start_ca().await;
    let client = proxy(&ca, "demo", "client", "client-1", None).await;
    let backend = proxy(&ca, "demo", "backend", "backend-1", None).await;
    let addr = inbound(backend.clone()).await;
    let old_signer = ca.authority.signer_fingerprint();
    let calls = tokio::spawn({
        let client = client.clone();
        async move {
            let mut n = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while tokio::time::Instant::now() < deadline {
                let answer = call(&client, addr, backend_peer(addr))
                    .await
                    .expect("no failed call");
                assert_eq!(
                    answer,
                    "spiffe://cluster.local/ns/demo/sa/client said hello"
                );
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            n
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ca.authority
        .introduce(Root::generate("cluster.local", Duration::from_secs(3600)).unwrap());
    let n = calls.await.unwrap();
    assert!(n > 20, "{n} calls");
    assert_ne!(ca.authority.signer_fingerprint(), old_signer);
    // Both proxies renewed from the new root.
    for m in [&client, &backend] {
        let s = m.store.current().unwrap();
        assert_eq!(s.bundle.signer, ca.authority.signer_fingerprint().to_vec());
        assert!(m.stats.certificates.load(Ordering::Relaxed) >= 2);
    }
}

#[tokio::test]
async fn without_a_ca_in_control_the_proxy_runs_without_mtls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = listener.local_addr().unwrap();
    tokio::spawn(server::serve_with_identity(
        listener,
        Arc::new(Hub::new()),
        None,
        std::future::pending(),
    ));
    let tokens = tempfile::tempdir().unwrap();
    let token_file = write_token(tokens.path(), "demo", "client", "client-1");
    let mesh = Arc::new(Mesh {
        store: IdentityStore::new(),
        authorizer: Authorizer::new(
            authz::Workload::default(),
            "cluster.local".into(),
            MtlsMode::Permissive,
        ),
        stats: Arc::new(MeshStats::default()),
    });
    tokio::spawn(certify::run(
        certify::IdentityConfig {
            control: format!("http://{control}"),
            token_file,
            lifetime: None,
            pod_name: "client-1".into(),
            pod_namespace: "demo".into(),
        },
        mesh.store.clone(),
        mesh.stats.clone(),
    ));
    tokio::time::timeout(WAIT, async {
        while !mesh.store.is_unavailable() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the proxy learns that control is no CA");
    // A meshed endpoint is reached in plaintext, at once.
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = backend.accept().await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(b"plaintext said hello").await.unwrap();
    });
    let started = std::time::Instant::now();
    assert_eq!(
        call(&mesh, addr, backend_peer(addr)).await.unwrap(),
        "plaintext said hello"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}
