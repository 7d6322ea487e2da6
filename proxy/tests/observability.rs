//! Metrics and access logs of two sidecars in-process: a client pod's (outbound) and a server
//! pod's (inbound), joined by mTLS with certificates from a real control CA, the way they are in
//! a cluster. A known number of HTTP requests and TCP connections goes through; what is checked
//! is what an operator reads: the exact values on each sidecar's `/metrics` (served by the
//! admin server) and the JSON lines of the access logs.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wasmesh_api::discovery as pb;
use wasmesh_api::table::Table as WireTable;
use wasmesh_control::discovery::{Hub, server};
use wasmesh_control::identity::{
    Authority, AuthorityConfig, IdentityService, Root, TokenReviewer, token,
};
use wasmesh_proxy::access_log::{AccessLog, AccessLogConfig, Target};
use wasmesh_proxy::identity::authz::{self, Authorizer, MtlsMode};
use wasmesh_proxy::identity::{IdentityStore, Mesh, certify};
use wasmesh_proxy::inbound::Inbound;
use wasmesh_proxy::outbound::{Outbound, OutboundConfig};
use wasmesh_proxy::state::ProxyState;
use wasmesh_proxy::table::Locality;

const WAIT: Duration = Duration::from_secs(15);

/// HTTP requests that match the route, requests that match none, TCP connections.
const OK: usize = 12;
const NO_ROUTE: usize = 4;
const CONNS: usize = 5;
/// Bytes each TCP connection sends (and gets back from the echo server).
const PAYLOAD: usize = 1000;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

// ---------------------------------------------------------------- control's CA

struct Ca {
    addr: SocketAddr,
    tokens: tempfile::TempDir,
}

async fn start_ca() -> Ca {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tokens = tempfile::tempdir().expect("tempdir");
    let authority = Arc::new(Authority::new(
        AuthorityConfig::new("cluster.local"),
        Root::generate("cluster.local", Duration::from_secs(3600)).expect("root"),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(server::serve_with_identity(
        listener,
        Arc::new(Hub::new()),
        Some(IdentityService::new(
            authority,
            TokenReviewer::Dir(tokens.path().into()),
        )),
        std::future::pending(),
    ));
    Ca { addr, tokens }
}

/// The identity side of a sidecar in `default`, certified as ServiceAccount `sa`.
async fn identity(ca: &Ca, state: &ProxyState, sa: &str, pod: &str) -> Arc<Mesh> {
    let path = token::token_path(ca.tokens.path(), "default", sa, pod);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("token dir");
    std::fs::write(&path, format!("token-of-{pod}")).expect("token");
    let mesh = Arc::new(Mesh {
        store: IdentityStore::new(),
        authorizer: Authorizer::new(
            authz::Workload {
                namespace: "default".into(),
                labels: Default::default(),
            },
            "cluster.local".into(),
            MtlsMode::Permissive,
        ),
        stats: state.mesh_stats.clone(),
    });
    tokio::spawn(certify::run(
        certify::IdentityConfig {
            control: format!("http://{}", ca.addr),
            token_file: path,
            lifetime: None,
            pod_name: pod.into(),
            pod_namespace: "default".into(),
        },
        mesh.store.clone(),
        mesh.stats.clone(),
    ));
    mesh.wait_identity(WAIT).await.expect("certified in time");
    mesh
}

// ---------------------------------------------------------------- apps

/// An HTTP app answering 200 with its name.
async fn http_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"web"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A TCP app that echoes until the client half-closes.
async fn echo_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------- the table

/// An endpoint of pod `default/web-0` (ServiceAccount `server`, meshed).
fn ep(ip: [u8; 4], port: u16) -> pb::Endpoint {
    pb::Endpoint {
        address: ip.to_vec(),
        port: u32::from(port),
        ready: true,
        serving: true,
        workload: Some(pb::Workload {
            name: "web-0".into(),
            namespace: "default".into(),
            service_account: "server".into(),
            meshed: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn service_port(
    name: &str,
    vip: [u8; 4],
    port_name: &str,
    endpoint: pb::Endpoint,
    routes: Vec<pb::HttpRoute>,
) -> pb::ServicePort {
    pb::ServicePort {
        key: Some(pb::ServicePortKey {
            namespace: "default".into(),
            service: name.into(),
            port_name: port_name.into(),
            protocol: pb::Protocol::Tcp as i32,
        }),
        port: 80,
        service_type: pb::ServiceType::ClusterIp as i32,
        cluster_ips: vec![vip.to_vec()],
        endpoints: vec![endpoint],
        http_routes: routes,
        ..Default::default()
    }
}

/// HTTPRoute `default/web`: one rule, paths under `/ok` to `web`; anything else matches no
/// rule (404 `no-route`).
fn web_route() -> pb::HttpRoute {
    pb::HttpRoute {
        namespace: "default".into(),
        name: "web".into(),
        created_unix: 1,
        rules: vec![pb::HttpRouteRule {
            matches: vec![pb::HttpRouteMatch {
                path: Some(pb::StringMatch {
                    r#type: pb::MatchType::PathPrefix as i32,
                    value: "/ok".into(),
                }),
                ..Default::default()
            }],
            backends: vec![pb::HttpBackendRef {
                namespace: "default".into(),
                service: "web".into(),
                port: 80,
                weight: 1,
                filters: vec![],
            }],
            ..Default::default()
        }],
    }
}

const WEB: &str = "10.96.0.10:80";
const ECHO: &str = "10.96.0.11:80";

fn install(state: &ProxyState, ports: Vec<pb::ServicePort>) {
    let mut wire = WireTable::default();
    wire.apply(pb::TableUpdate {
        version: 1,
        kind: pb::table_update::Kind::Snapshot as i32,
        service_ports: ports,
        complete: true,
        ..Default::default()
    })
    .expect("snapshot applies");
    wasmesh_proxy::discovery::install(state, &wire, None);
    state.set_ready();
}

// ---------------------------------------------------------------- the two sidecars

struct Pair {
    client: Arc<ProxyState>,
    server: Arc<ProxyState>,
    client_admin: SocketAddr,
    server_admin: SocketAddr,
    /// Connections here are handled by the client's sidecar as if headed for `(web, echo)`.
    web_front: SocketAddr,
    echo_front: SocketAddr,
    _ca: Ca,
}

async fn admin(state: Arc<ProxyState>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(wasmesh_proxy::admin::serve(l, state));
    addr
}

/// Connections to the returned address are handled by `handle(stream, peer)`.
async fn front<F, Fut>(ip: &str, handle: F) -> SocketAddr
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind(format!("{ip}:0"))
        .await
        .expect("bind front");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, peer)) = l.accept().await {
            tokio::spawn(handle(s, peer));
        }
    });
    addr
}

/// The client pod's sidecar and the server pod's (`default/web-0`, behind Services `web` and
/// `echo`), each with an admin server; `logs`: access logs of (client, server).
async fn pair(logs: Option<(&Path, &Path)>) -> Pair {
    let ca = start_ca().await;
    let me = Locality {
        node: None,
        zone: None,
        namespace: Some("default".into()),
    };
    let log = |path: Option<&Path>| match path {
        None => AccessLog::off(),
        Some(p) => AccessLog::start(&AccessLogConfig {
            target: Target::File(p.to_path_buf()),
            sample: 1.0,
        })
        .expect("access log"),
    };
    let client = ProxyState::with_access_log(me.clone(), log(logs.map(|l| l.0)));
    let server = ProxyState::with_access_log(me, log(logs.map(|l| l.1)));
    server
        .builder
        .lock()
        .expect("lock")
        .set_pod("default/web-0".into());
    let client_mesh = identity(&ca, &client, "client", "client-0").await;
    let server_mesh = identity(&ca, &server, "server", "web-0").await;

    // The server pod: its inbound sidecar in front of both apps, on 127.0.0.5 (its "pod IP").
    let (web_app, echo_app) = (http_app().await, echo_app().await);
    let inbound = Arc::new(Inbound {
        state: server.clone(),
        own_ports: vec![],
        connect_timeout: Duration::from_secs(5),
        copy: Default::default(),
        mesh: Some(server_mesh),
        detect_timeout: Duration::from_millis(500),
        opaque_ports: vec![echo_app.port()],
        pools: wasmesh_proxy::http::pool::Pools::new(
            wasmesh_proxy::http::pool::Dial::LocalApp,
            Duration::from_secs(5),
        ),
        filters: None,
    });
    let to = |app: SocketAddr| {
        let inbound = inbound.clone();
        move |s, peer| {
            let inbound = inbound.clone();
            async move { inbound.handle(s, peer, app).await }
        }
    };
    let web_in = front("127.0.0.5", to(web_app)).await;
    let echo_in = front("127.0.0.5", to(echo_app)).await;
    // The server's table: the pod's own endpoints are the apps' ports.
    install(
        &server,
        vec![
            service_port(
                "web",
                [10, 96, 0, 10],
                "http",
                ep([127, 0, 0, 5], web_app.port()),
                vec![],
            ),
            service_port(
                "echo",
                [10, 96, 0, 11],
                "tcp",
                ep([127, 0, 0, 5], echo_app.port()),
                vec![],
            ),
        ],
    );
    // The client's table: the same Services, their endpoint the server's inbound sidecar.
    install(
        &client,
        vec![
            service_port(
                "web",
                [10, 96, 0, 10],
                "http",
                ep([127, 0, 0, 5], web_in.port()),
                vec![web_route()],
            ),
            service_port(
                "echo",
                [10, 96, 0, 11],
                "tcp",
                ep([127, 0, 0, 5], echo_in.port()),
                vec![],
            ),
        ],
    );
    let out = Arc::new(
        Outbound::new(client.clone(), OutboundConfig::default(), vec![])
            .with_mesh(Some(client_mesh)),
    );
    let to = |dst: &str| {
        let out = out.clone();
        let dst: SocketAddr = dst.parse().expect("dst");
        move |s, peer| {
            let out = out.clone();
            async move { out.handle(s, peer, dst).await }
        }
    };
    let web_front = front("127.0.0.1", to(WEB)).await;
    let echo_front = front("127.0.0.1", to(ECHO)).await;
    Pair {
        client_admin: admin(client.clone()).await,
        server_admin: admin(server.clone()).await,
        client,
        server,
        web_front,
        echo_front,
        _ca: ca,
    }
}

// ---------------------------------------------------------------- traffic

/// `OK` requests to `/ok/<i>` and `NO_ROUTE` to `/nope` on one kept-alive HTTP/1.1 connection.
async fn http_traffic(p: &Pair) {
    let s = TcpStream::connect(p.web_front).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let paths = (0..OK)
        .map(|i| format!("/ok/{i}"))
        .chain((0..NO_ROUTE).map(|_| "/nope".to_string()));
    for path in paths {
        let req = Request::get(&path)
            .header("host", "web")
            .body(Full::<Bytes>::default())
            .expect("req");
        let resp = tokio::time::timeout(WAIT, async {
            tx.ready().await.expect("ready");
            tx.send_request(req).await.expect("response")
        })
        .await
        .expect("never a hang");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        if path.starts_with("/ok") {
            assert_eq!(status, StatusCode::OK, "{path}: {body:?}");
            assert_eq!(body, "web");
        } else {
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body:?}");
        }
    }
}

/// `CONNS` connections to `echo`, each sending `PAYLOAD` bytes and reading them back.
async fn tcp_traffic(p: &Pair) {
    for i in 0..CONNS {
        let mut s = TcpStream::connect(p.echo_front).await.expect("connect");
        let payload = vec![b'a' + i as u8; PAYLOAD];
        s.write_all(&payload).await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut back))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(back, payload, "connection {i}");
    }
}

// ---------------------------------------------------------------- /metrics

/// `name{labels}` → value, from the admin server.
async fn metrics(admin: SocketAddr) -> BTreeMap<String, f64> {
    let mut s = TcpStream::connect(admin).await.expect("connect admin");
    s.write_all(b"GET /metrics HTTP/1.0\r\nhost: admin\r\n\r\n")
        .await
        .expect("write");
    let mut text = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut text))
        .await
        .expect("metrics in time")
        .expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(
        head.contains("application/openmetrics-text"),
        "OpenMetrics: {head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn value(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| {
        panic!(
            "{key} not on /metrics; there are:\n{}",
            m.keys().cloned().collect::<Vec<_>>().join("\n")
        )
    })
}

/// Waits until `key` reads `want` (connections are counted closed just after the client sees
/// them end).
async fn wait_for(admin: SocketAddr, key: &str, want: f64) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = metrics(admin).await;
        if m.get(key) == Some(&want) || Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_after_a_known_number_of_requests_and_connections_are_exact() {
    let p = pair(None).await;
    http_traffic(&p).await;
    tcp_traffic(&p).await;
    let n = |x: usize| x as f64;

    // The client's sidecar (outbound).
    let m = wait_for(
        p.client_admin,
        r#"wasmesh_tcp_connections_closed_total{direction="outbound",service="default/echo"}"#,
        n(CONNS),
    )
    .await;
    let expect = [
        (
            r#"wasmesh_http_responses_total{direction="outbound",service="default/web",route="default/web/0",class="2xx",cause="",peer=""}"#,
            n(OK),
        ),
        (
            r#"wasmesh_http_responses_total{direction="outbound",service="default/web",route="",class="4xx",cause="no-route",peer=""}"#,
            n(NO_ROUTE),
        ),
        (
            r#"wasmesh_http_request_duration_seconds_count{direction="outbound",service="default/web"}"#,
            n(OK + NO_ROUTE),
        ),
        (
            r#"wasmesh_http_request_duration_seconds_bucket{le="+Inf",direction="outbound",service="default/web"}"#,
            n(OK + NO_ROUTE),
        ),
        ("wasmesh_http_requests_total", n(OK + NO_ROUTE)),
        ("wasmesh_http_proxy_errors_total", n(NO_ROUTE)),
        ("wasmesh_http_retries_total", 0.0),
        // Requests that matched no rule never reached the balancer.
        (
            r#"wasmesh_balancer_picks_total{service="default/web",pod="web-0"}"#,
            n(OK),
        ),
        (
            r#"wasmesh_balancer_picks_total{service="default/echo",pod="web-0"}"#,
            n(CONNS),
        ),
        (
            r#"wasmesh_tcp_connections_opened_total{direction="outbound",service="default/echo"}"#,
            n(CONNS),
        ),
        (
            r#"wasmesh_tcp_connections_closed_total{direction="outbound",service="default/echo"}"#,
            n(CONNS),
        ),
        (
            r#"wasmesh_tcp_sent_bytes_total{direction="outbound",service="default/echo"}"#,
            n(CONNS * PAYLOAD),
        ),
        (
            r#"wasmesh_tcp_received_bytes_total{direction="outbound",service="default/echo"}"#,
            n(CONNS * PAYLOAD),
        ),
        // HTTP to a meshed endpoint is one mTLS connection; each TCP connection is one more.
        ("wasmesh_mtls_outbound_connections_total", n(1 + CONNS)),
        ("wasmesh_outbound_connections_total", n(1 + CONNS)),
        ("wasmesh_table_version", 1.0),
        ("wasmesh_ready", 1.0),
        ("wasmesh_access_log_dropped_total", 0.0),
    ];
    for (key, want) in expect {
        assert_eq!(value(&m, key), want, "client: {key}");
    }
    let age = value(&m, "wasmesh_table_age_seconds");
    assert!((0.0..3600.0).contains(&age), "table age {age}");
    // Labels are bounded: no addresses or paths anywhere.
    for key in m.keys() {
        assert!(
            !key.contains("127.0.0") && !key.contains("/ok") && !key.contains("/nope"),
            "{key}"
        );
    }

    // The server's sidecar (inbound): the Service that selects its pod, the client's identity.
    let m = wait_for(
        p.server_admin,
        r#"wasmesh_tcp_connections_closed_total{direction="inbound",service="default/echo"}"#,
        n(CONNS),
    )
    .await;
    let peer = format!(
        r#"wasmesh_http_responses_total{{direction="inbound",service="default/web",route="",class="2xx",cause="",peer="{CLIENT_ID}"}}"#
    );
    let expect = [
        (peer.as_str(), n(OK)),
        (
            r#"wasmesh_http_request_duration_seconds_count{direction="inbound",service="default/web"}"#,
            n(OK),
        ),
        ("wasmesh_inbound_http_requests_total", n(OK)),
        (
            r#"wasmesh_tcp_connections_opened_total{direction="inbound",service="default/echo"}"#,
            n(CONNS),
        ),
        (
            r#"wasmesh_tcp_sent_bytes_total{direction="inbound",service="default/echo"}"#,
            n(CONNS * PAYLOAD),
        ),
        (
            r#"wasmesh_tcp_received_bytes_total{direction="inbound",service="default/echo"}"#,
            n(CONNS * PAYLOAD),
        ),
        ("wasmesh_mtls_inbound_connections_total", n(1 + CONNS)),
        (r#"wasmesh_mtls_refused_total{reason="handshake"}"#, 0.0),
    ];
    for (key, want) in expect {
        assert_eq!(value(&m, key), want, "server: {key}");
    }
    assert!(
        !m.keys().any(|k| k.contains("direction=\"outbound\"")),
        "the server sent nothing out"
    );
    // Access logs are off by default: nothing queued.
    assert_eq!(
        p.client.access_log.queued() + p.server.access_log.queued(),
        0
    );
}

// ---------------------------------------------------------------- access logs

/// The JSON lines of `path`, once there are `n` (bounded wait).
async fn lines(path: &PathBuf, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let complete = text.ends_with('\n') || text.is_empty();
        let got: Vec<&str> = text.lines().collect();
        if (got.len() >= n && complete) || Instant::now() > deadline {
            return got
                .iter()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn access_logs_have_one_json_line_per_request_and_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (client_log, server_log) = (
        dir.path().join("client.json"),
        dir.path().join("server.json"),
    );
    let p = pair(Some((&client_log, &server_log))).await;
    http_traffic(&p).await;
    tcp_traffic(&p).await;

    let client = lines(&client_log, OK + NO_ROUTE + CONNS).await;
    assert_eq!(client.len(), OK + NO_ROUTE + CONNS, "{client:#?}");
    let kind = |lines: &[serde_json::Value], k: &str| -> Vec<serde_json::Value> {
        lines.iter().filter(|l| l["kind"] == k).cloned().collect()
    };
    let http = kind(&client, "http");
    assert_eq!(http.len(), OK + NO_ROUTE);
    let ok: Vec<_> = http.iter().filter(|l| l["status"] == 200).collect();
    assert_eq!(ok.len(), OK);
    for l in &ok {
        assert_eq!(l["direction"], "outbound", "{l}");
        assert_eq!(l["method"], "GET", "{l}");
        assert_eq!(l["authority"], "web", "{l}");
        assert!(
            l["path"].as_str().is_some_and(|s| s.starts_with("/ok/")),
            "{l}"
        );
        assert_eq!(l["protocol"], "HTTP/1.1", "{l}");
        assert_eq!(l["error"], serde_json::Value::Null, "{l}");
        assert_eq!(l["service"], "default/web", "{l}");
        assert_eq!(l["route"], "default/web/0", "{l}");
        assert_eq!(l["retries"], 0, "{l}");
        assert_eq!(l["peer"], serde_json::Value::Null, "{l}");
        assert_eq!(l["trace_id"], serde_json::Value::Null, "{l}");
        assert!(
            l["upstream"]
                .as_str()
                .is_some_and(|u| u.starts_with("127.0.0.5:")),
            "{l}"
        );
        assert!(
            l["client"]
                .as_str()
                .is_some_and(|c| c.starts_with("127.0.0.1:")),
            "{l}"
        );
        assert!(l["duration_us"].as_u64().is_some(), "{l}");
        let time = l["time"].as_str().expect("time");
        assert!(
            time.len() == 27 && time.ends_with('Z') && time.contains('T'),
            "{time}"
        );
    }
    let paths: Vec<&str> = ok.iter().filter_map(|l| l["path"].as_str()).collect();
    for i in 0..OK {
        assert!(
            paths.contains(&format!("/ok/{i}").as_str()),
            "/ok/{i}: {paths:?}"
        );
    }
    for l in http.iter().filter(|l| l["status"] == 404) {
        assert_eq!(l["error"], "no-route", "{l}");
        assert_eq!(l["route"], serde_json::Value::Null, "{l}");
        assert_eq!(l["upstream"], serde_json::Value::Null, "{l}");
        assert_eq!(l["path"], "/nope", "{l}");
    }
    let tcp = kind(&client, "tcp");
    assert_eq!(tcp.len(), CONNS);
    for l in &tcp {
        assert_eq!(l["direction"], "outbound", "{l}");
        assert_eq!(l["service"], "default/echo", "{l}");
        assert_eq!(l["sent_bytes"], PAYLOAD, "{l}");
        assert_eq!(l["received_bytes"], PAYLOAD, "{l}");
        assert!(
            l["upstream"]
                .as_str()
                .is_some_and(|u| u.starts_with("127.0.0.5:")),
            "{l}"
        );
    }

    // The server logs what reached its app, with the client's identity.
    let server = lines(&server_log, OK + CONNS).await;
    assert_eq!(server.len(), OK + CONNS, "{server:#?}");
    for l in kind(&server, "http") {
        assert_eq!(l["direction"], "inbound", "{l}");
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["service"], "default/web", "{l}");
        assert_eq!(l["peer"], CLIENT_ID, "{l}");
        assert_eq!(l["authority"], "web", "{l}");
    }
    for l in kind(&server, "tcp") {
        assert_eq!(l["direction"], "inbound", "{l}");
        assert_eq!(l["service"], "default/echo", "{l}");
        assert_eq!(l["peer"], CLIENT_ID, "{l}");
        assert_eq!(l["sent_bytes"], PAYLOAD, "{l}");
    }
    assert_eq!(p.client.access_log.dropped(), 0);
    assert_eq!(p.client.access_log.queued(), (OK + NO_ROUTE + CONNS) as u64);
    let m = metrics(p.client_admin).await;
    assert_eq!(
        value(&m, "wasmesh_access_log_lines_total"),
        (OK + NO_ROUTE + CONNS) as f64
    );
}

// ---------------------------------------------------------------- TCP spans

/// An OTLP/HTTP receiver (the official protobuf types): every span it gets, with its kind.
async fn otlp_receiver() -> (
    SocketAddr,
    Arc<std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let spans = got.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let spans = spans.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let spans = spans.clone();
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        if let Ok(export) = ExportTraceServiceRequest::decode(body) {
                            let mut spans = spans.lock().expect("lock");
                            for rs in export.resource_spans {
                                for ss in rs.scope_spans {
                                    spans.extend(ss.spans);
                                }
                            }
                        }
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .header("content-type", "application/x-protobuf")
                                .body(Full::new(Bytes::new()))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, got)
}

fn attr(s: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match s
        .attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    {
        Some(Value::StringValue(v)) => v.clone(),
        Some(Value::IntValue(v)) => v.to_string(),
        other => format!("{other:?}"),
    }
}

/// With `WASMESH_TRACE_TCP=true`, each L4 connection is a span on each sidecar: a client span
/// on the outbound one, a server span on the inbound one, named after the Service, with the
/// bytes it carried and the peer's mTLS identity; HTTP has its request spans instead.
#[tokio::test]
async fn tcp_connections_get_a_span_each_when_asked() {
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    use wasmesh_proxy::otel::config::{Protocol, TraceConfig};
    let p = pair(None).await;
    let (receiver, spans) = otlp_receiver().await;
    let env = |k: &str| match k {
        "OTEL_EXPORTER_OTLP_ENDPOINT" => Some(format!("http://{receiver}")),
        "OTEL_BSP_SCHEDULE_DELAY" => Some("50".to_string()),
        "WASMESH_TRACE_TCP" => Some("true".to_string()),
        _ => None,
    };
    let (cfg, warnings) = wasmesh_proxy::otel::config::resolve(&env, None, &Default::default());
    let cfg: TraceConfig = cfg.expect("tracing on");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(cfg.tcp_spans && cfg.protocol == Protocol::HttpProtobuf);
    for state in [&p.client, &p.server] {
        let t = wasmesh_proxy::otel::export::start(cfg.clone(), state.trace_stats.clone())
            .expect("tracer");
        state.tracer.store(Some(t));
    }
    tcp_traffic(&p).await;
    http_traffic(&p).await;
    let deadline = Instant::now() + WAIT;
    let got = loop {
        let got = spans.lock().expect("lock").clone();
        let tcp = got.iter().filter(|s| s.name.starts_with("TCP")).count();
        let http = got.len() - tcp;
        if (tcp >= 2 * CONNS && http > 0) || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let tcp: Vec<_> = got.iter().filter(|s| s.name.starts_with("TCP")).collect();
    let clients: Vec<_> = tcp
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    let servers: Vec<_> = tcp
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(
        (clients.len(), servers.len()),
        (CONNS, CONNS),
        "one client and one server span per connection: {tcp:#?}"
    );
    for s in &clients {
        assert_eq!(s.name, "TCP default/echo");
        assert_eq!(attr(s, "network.transport"), "tcp");
        assert_eq!(attr(s, "wasmesh.destination.service"), "default/echo");
        assert_eq!(attr(s, "server.address"), "127.0.0.5");
        assert_eq!(
            attr(s, "wasmesh.sent_bytes"),
            attr(s, "wasmesh.received_bytes")
        );
        assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
    }
    for s in &servers {
        assert_eq!(attr(s, "wasmesh.peer.identity"), CLIENT_ID);
        assert_eq!(attr(s, "wasmesh.sent_bytes"), PAYLOAD.to_string());
        assert_eq!(attr(s, "wasmesh.received_bytes"), PAYLOAD.to_string());
    }
    // Each connection its own trace (raw TCP carries no context).
    let traces: std::collections::BTreeSet<_> = tcp.iter().map(|s| s.trace_id.clone()).collect();
    assert_eq!(traces.len(), 2 * CONNS);
    // HTTP requests have their request spans, not TCP ones.
    assert!(
        got.iter().any(|s| !s.name.starts_with("TCP")),
        "HTTP spans too"
    );
}

// ---------------------------------------------------------------- the export thread

/// Batches are encoded and sent off the proxy's workers: with the only worker thread of the
/// runtime that recorded the spans held busy (here: blocked), a full batch still reaches the
/// collector. (Exported on a worker, it would wait for the worker, and so would the requests
/// queued behind an encode.)
#[test]
fn a_full_batch_is_exported_while_the_proxys_worker_is_busy() {
    use opentelemetry::trace::SpanKind;
    use wasmesh_proxy::otel::config::{Protocol, TraceConfig};
    use wasmesh_proxy::otel::sampler::Sampler;
    use wasmesh_proxy::otel::{TraceStats, export};

    // The collector on a runtime of its own.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            addr_tx.send(otlp_receiver().await).expect("send");
            std::future::pending::<()>().await;
        });
    });
    let (collector, got) = addr_rx.recv().expect("receiver up");

    // The proxy's side: one worker, which records ten spans and then never yields.
    let worker = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stats = Arc::new(TraceStats::default());
    worker.block_on(async {
        let tracer = export::start(
            TraceConfig {
                endpoint: format!("http://{collector}/v1/traces"),
                protocol: Protocol::HttpProtobuf,
                sampler: Sampler::AlwaysOn,
                batch_size: 10,
                // Only a full batch is sent: the timer cannot be what sends it.
                schedule_delay: Duration::from_secs(3600),
                ..TraceConfig::default()
            },
            stats.clone(),
        )
        .expect("tracer");
        for _ in 0..10 {
            tracer
                .start(SpanKind::Server, &http::HeaderMap::new())
                .end(Some(200), None);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let exported = || stats.exported.load(std::sync::atomic::Ordering::Relaxed);
        while (got.lock().expect("lock").len() < 10 || exported() < 10) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    assert_eq!(
        got.lock().expect("lock").len(),
        10,
        "the collector got the batch while the worker was blocked"
    );
    assert_eq!(
        stats.exported.load(std::sync::atomic::Ordering::Relaxed),
        10
    );
}
