//! The outbound HTTP path in-process: the proxy's table is installed as control would stream it
//! (Service ports with HTTPRoutes attached), the proxy's outbound handler gets connections as
//! if iptables had redirected them to a Service's clusterIP, and HTTP backends on 127.0.0.x
//! say who answered. What is checked is what the app sees: statuses, headers, bodies, which
//! replica answered. (The same path through real iptables and namespaces:
//! `examples/local-mesh/tests/l7.rs`.)

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
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
use tokio::task::JoinHandle;
use wasmesh_api::discovery as pb;
use wasmesh_api::table::Table as WireTable;
use wasmesh_proxy::filters::Filters;
use wasmesh_proxy::filters::select::Me;
use wasmesh_proxy::outbound::{Outbound, OutboundConfig};
use wasmesh_proxy::state::ProxyState;
use wasmesh_proxy::table::Locality;

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- backends

/// An HTTP/1.1 + h2c backend that says who it is (`x-backend`, and the body), and on request:
/// `/status/N` answers N, `/sleep/MS` waits first, `/echo` returns the body and reports the
/// request's path, host and `x-*` headers as `x-got-*`, `/trailers` ends with a trailer,
/// `/ws` upgrades and echoes bytes.
async fn http_backend(addr: SocketAddr, name: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind(addr).await.expect("bind backend");
    let a = l.local_addr().expect("addr");
    let h = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req| answer(req, name));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (a, h)
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn text(s: impl Into<Bytes>) -> BoxBody {
    Full::new(s.into()).boxed()
}

async fn answer(
    mut req: Request<Incoming>,
    name: &'static str,
) -> Result<Response<BoxBody>, Infallible> {
    let path = req.uri().path().to_string();
    let mut resp = Response::builder().header("x-backend", name);
    if let Some(code) = path.strip_prefix("/status/") {
        let code: u16 = code.parse().unwrap_or(500);
        return Ok(resp.status(code).body(text(name)).expect("resp"));
    }
    if let Some(ms) = path.strip_prefix("/sleep/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    if path == "/ws" {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(resp
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(text(""))
            .expect("resp"));
    }
    if path == "/trailers" {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().expect("value"));
        let frames = vec![
            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(name))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        return Ok(resp.body(body.boxed()).expect("resp"));
    }
    if path == "/echo" {
        resp = resp
            .header(
                "x-got-path",
                req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
            )
            .header("x-got-version", format!("{:?}", req.version()));
        let host = req
            .headers()
            .get("host")
            .map(|h| h.to_str().unwrap_or("").to_string())
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        resp = resp.header("x-got-host", host);
        for (k, v) in req.headers() {
            if let Some(rest) = k.as_str().strip_prefix("x-") {
                resp = resp.header(format!("x-got-{rest}"), v.clone());
            }
        }
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Ok(resp.body(text(body)).expect("resp"));
    }
    Ok(resp.body(text(name)).expect("resp"))
}

/// HTTP backends named `names` on 127.0.0.2, .3, … at one port.
async fn backends(names: &[&'static str]) -> (u16, Vec<JoinHandle<()>>) {
    let mut port = 0;
    let mut handles = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let ip = format!("127.0.0.{}", i + 2);
        let (a, h) = http_backend(SocketAddr::new(ip.parse().expect("ip"), port), name).await;
        port = a.port();
        handles.push(h);
    }
    (port, handles)
}

// ---------------------------------------------------------------- the table

fn ep(ip: &str, port: u16) -> pb::Endpoint {
    pb::Endpoint {
        address: ip
            .parse::<std::net::Ipv4Addr>()
            .expect("ip")
            .octets()
            .to_vec(),
        port: u32::from(port),
        ready: true,
        serving: true,
        ..Default::default()
    }
}

fn service_port(
    name: &str,
    vip: [u8; 4],
    port_name: &str,
    endpoints: Vec<pb::Endpoint>,
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
        endpoints,
        http_routes: routes,
        ..Default::default()
    }
}

fn backend_ref(service: &str, weight: u32) -> pb::HttpBackendRef {
    pb::HttpBackendRef {
        namespace: "default".into(),
        service: service.into(),
        port: 80,
        weight,
        filters: vec![],
    }
}

fn rule(matches: Vec<pb::HttpRouteMatch>, backends: Vec<pb::HttpBackendRef>) -> pb::HttpRouteRule {
    pb::HttpRouteRule {
        matches,
        backends,
        ..Default::default()
    }
}

fn route(name: &str, rules: Vec<pb::HttpRouteRule>) -> pb::HttpRoute {
    pb::HttpRoute {
        namespace: "default".into(),
        name: name.into(),
        created_unix: 1,
        rules,
    }
}

fn path_match(t: pb::MatchType, value: &str) -> pb::HttpRouteMatch {
    pb::HttpRouteMatch {
        path: Some(pb::StringMatch {
            r#type: t as i32,
            value: value.into(),
        }),
        ..Default::default()
    }
}

fn header_match(name: &str, value: &str) -> pb::HttpRouteMatch {
    pb::HttpRouteMatch {
        headers: vec![pb::NamedMatch {
            r#type: pb::MatchType::Exact as i32,
            name: name.into(),
            value: value.into(),
        }],
        ..Default::default()
    }
}

// ---------------------------------------------------------------- the proxy

struct Proxy {
    state: Arc<ProxyState>,
    /// Connections to this address are handed to the outbound handler as if headed for `dst`.
    front: SocketAddr,
    _accept: JoinHandle<()>,
}

const WEB: &str = "10.96.0.10:80";
const WEB_VIP: [u8; 4] = [10, 96, 0, 10];

async fn proxy(ports: Vec<pb::ServicePort>, dst: &str) -> Proxy {
    proxy_with(ports, dst, OutboundConfig::default()).await
}

async fn proxy_with(ports: Vec<pb::ServicePort>, dst: &str, config: OutboundConfig) -> Proxy {
    proxy_full(ports, dst, config, None).await
}

async fn proxy_full(
    ports: Vec<pb::ServicePort>,
    dst: &str,
    config: OutboundConfig,
    filters: Option<Arc<Filters>>,
) -> Proxy {
    let state = ProxyState::new(Locality {
        node: None,
        zone: None,
        namespace: Some("default".into()),
    });
    install(&state, ports);
    proxy_on(state, dst, config, filters).await
}

async fn proxy_on(
    state: Arc<ProxyState>,
    dst: &str,
    config: OutboundConfig,
    filters: Option<Arc<Filters>>,
) -> Proxy {
    let out = Arc::new(Outbound::new(state.clone(), config, vec![]).with_filters(filters));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
    let front = l.local_addr().expect("addr");
    let dst: SocketAddr = dst.parse().expect("dst");
    let accept = tokio::spawn(async move {
        while let Ok((s, peer)) = l.accept().await {
            let out = out.clone();
            tokio::spawn(async move { out.handle(s, peer, dst).await });
        }
    });
    Proxy {
        state,
        front,
        _accept: accept,
    }
}

/// Installs a table the way the discovery task does after a snapshot.
fn install(state: &Arc<ProxyState>, ports: Vec<pb::ServicePort>) {
    let mut wire = WireTable::default();
    wire.apply(pb::TableUpdate {
        version: 1,
        kind: pb::table_update::Kind::Snapshot as i32,
        service_ports: ports,
        complete: true,
        ..Default::default()
    })
    .expect("snapshot applies");
    let mut builder = state.builder.lock().expect("lock");
    if let Some(t) = builder.apply(&wire, None) {
        state.table.store(Arc::new(t));
    }
    state.set_ready();
}

// ---------------------------------------------------------------- clients

type ReqBody = Full<Bytes>;

enum Client {
    H1(hyper::client::conn::http1::SendRequest<ReqBody>),
    H2(hyper::client::conn::http2::SendRequest<ReqBody>),
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
    trailers: Option<http::HeaderMap>,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("?"))
            .unwrap_or("")
    }
}

impl Client {
    async fn h1(p: &Proxy) -> Client {
        Client::h1_to(p.front).await
    }

    async fn h1_to(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.expect("connect");
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .expect("h1");
        tokio::spawn(conn.with_upgrades());
        Client::H1(tx)
    }

    async fn h2(p: &Proxy) -> Client {
        Client::h2_to(p.front).await
    }

    async fn h2_to(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.expect("connect");
        let (tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .expect("h2");
        tokio::spawn(conn);
        Client::H2(tx)
    }

    async fn get(&mut self, path: &str) -> Answer {
        self.send(Request::get(path).body(Full::default()).expect("req"))
            .await
    }

    async fn send(&mut self, mut req: Request<ReqBody>) -> Answer {
        let resp = tokio::time::timeout(WAIT, async {
            match self {
                Client::H1(tx) => {
                    if !req.headers().contains_key("host") {
                        req.headers_mut()
                            .insert("host", "web".parse().expect("host"));
                    }
                    tx.ready().await.expect("ready");
                    tx.send_request(req).await
                }
                Client::H2(tx) => {
                    let uri = format!("http://web{}", req.uri());
                    *req.uri_mut() = uri.parse().expect("uri");
                    tx.ready().await.expect("ready");
                    tx.send_request(req).await
                }
            }
        })
        .await
        .expect("never a hang")
        .expect("a response");
        let (parts, body) = resp.into_parts();
        let collected = tokio::time::timeout(WAIT, body.collect())
            .await
            .expect("body in time")
            .expect("body");
        let trailers = collected.trailers().cloned();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            trailers,
        }
    }
}

async fn tally(c: &mut Client, path: &str, n: usize) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for _ in 0..n {
        let a = c.get(path).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        *t.entry(a.header("x-backend").to_string()).or_default() += 1;
    }
    t
}

fn three(port: u16) -> Vec<pb::Endpoint> {
    vec![
        ep("127.0.0.2", port),
        ep("127.0.0.3", port),
        ep("127.0.0.4", port),
    ]
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn one_http1_connection_is_balanced_per_request() {
    let (port, _b) = backends(&["b1", "b2", "b3"]).await;
    let p = proxy(
        vec![service_port("web", WEB_VIP, "http", three(port), vec![])],
        WEB,
    )
    .await;
    let mut c = Client::h1(&p).await;
    let t = tally(&mut c, "/", 90).await;
    assert_eq!(
        t.len(),
        3,
        "every replica answered one keep-alive connection: {t:?}"
    );
}

#[tokio::test]
async fn one_http2_connection_is_spread_over_every_replica() {
    let (port, _b) = backends(&["b1", "b2", "b3"]).await;
    // Declared nothing: detection finds the HTTP/2 preface.
    let p = proxy(
        vec![service_port("web", WEB_VIP, "", three(port), vec![])],
        WEB,
    )
    .await;
    let mut c = Client::h2(&p).await;
    let t = tally(&mut c, "/", 90).await;
    assert_eq!(
        t.len(),
        3,
        "every replica answered one HTTP/2 connection: {t:?}"
    );
}

#[tokio::test]
async fn http2_keeps_trailers_and_http1_keeps_chunked_bodies() {
    let (port, _b) = backends(&["b1"]).await;
    let eps = vec![ep("127.0.0.2", port)];
    let p = proxy(vec![service_port("web", WEB_VIP, "grpc", eps, vec![])], WEB).await;
    let mut c = Client::h2(&p).await;
    let a = c.get("/trailers").await;
    assert_eq!(a.body, "b1");
    let trailers = a.trailers.expect("trailers arrived");
    assert_eq!(trailers["x-checksum"], "abc");

    // HTTP/1.1 client to a port declared grpc (HTTP/2 to the endpoint): a chunked POST body
    // with Expect: 100-continue arrives whole.
    let mut c = Client::h1(&p).await;
    let body = "x".repeat(200_000);
    let req = Request::post("/echo")
        .header("expect", "100-continue")
        .header("x-trace", "t1")
        .body(Full::new(Bytes::from(body.clone())))
        .expect("req");
    let a = c.send(req).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body.len(), body.len());
    assert_eq!(a.header("x-got-trace"), "t1");
    assert_eq!(a.header("x-got-version"), "HTTP/2.0");
    assert_eq!(a.header("x-got-host"), "web");
}

#[tokio::test]
async fn routes_by_header_and_path_and_weight() {
    let (p1, _b1) = backends(&["v1"]).await;
    let l2 = http_backend("127.0.0.3:0".parse().expect("addr"), "v2").await;
    let v1 = service_port(
        "web-v1",
        [10, 96, 0, 11],
        "http",
        vec![ep("127.0.0.2", p1)],
        vec![],
    );
    let v2 = service_port(
        "web-v2",
        [10, 96, 0, 12],
        "http",
        vec![ep("127.0.0.3", l2.0.port())],
        vec![],
    );
    let routes = vec![route(
        "web",
        vec![
            rule(
                vec![header_match("x-canary", "yes")],
                vec![backend_ref("web-v2", 1)],
            ),
            rule(
                vec![path_match(pb::MatchType::PathPrefix, "/v2")],
                vec![backend_ref("web-v2", 1)],
            ),
            rule(
                vec![path_match(pb::MatchType::Exact, "/split")],
                vec![backend_ref("web-v1", 90), backend_ref("web-v2", 10)],
            ),
            rule(
                vec![path_match(pb::MatchType::PathPrefix, "/")],
                vec![backend_ref("web-v1", 1)],
            ),
        ],
    )];
    let web = service_port("web", WEB_VIP, "http", vec![], routes);
    let p = proxy(vec![web, v1, v2], WEB).await;
    let mut c = Client::h1(&p).await;

    assert_eq!(c.get("/").await.header("x-backend"), "v1");
    assert_eq!(c.get("/v2/items").await.header("x-backend"), "v2");
    assert_eq!(
        c.get("/v2x").await.header("x-backend"),
        "v1",
        "prefixes match whole segments"
    );
    let req = Request::get("/")
        .header("x-canary", "yes")
        .body(Full::default())
        .expect("req");
    assert_eq!(c.send(req).await.header("x-backend"), "v2");

    let t = tally(&mut c, "/split", 1000).await;
    let to_v2 = t.get("v2").copied().unwrap_or(0);
    // 10 % of 1000: σ ≈ 9.5; ±4σ.
    assert!((62..=138).contains(&to_v2), "90/10 split gave {t:?}");
}

#[tokio::test]
async fn no_matching_route_is_404_and_missing_backends_are_named() {
    let (port, _b) = backends(&["b1"]).await;
    let routes = vec![route(
        "web",
        vec![
            rule(
                vec![path_match(pb::MatchType::Exact, "/ok")],
                vec![backend_ref("web", 1)],
            ),
            rule(
                vec![path_match(pb::MatchType::Exact, "/gone")],
                vec![backend_ref("nowhere", 1)],
            ),
            rule(
                vec![path_match(pb::MatchType::Exact, "/empty")],
                vec![backend_ref("empty", 1)],
            ),
        ],
    )];
    let web = service_port("web", WEB_VIP, "http", vec![ep("127.0.0.2", port)], routes);
    let empty = service_port("empty", [10, 96, 0, 13], "http", vec![], vec![]);
    let p = proxy(vec![web, empty], WEB).await;
    let mut c = Client::h1(&p).await;
    assert_eq!(c.get("/ok").await.status, StatusCode::OK);
    let a = c.get("/other").await;
    assert_eq!(
        (a.status, a.header("x-wasmesh-error")),
        (StatusCode::NOT_FOUND, "no-route")
    );
    let a = c.get("/gone").await;
    assert_eq!(
        (a.status, a.header("x-wasmesh-error")),
        (StatusCode::INTERNAL_SERVER_ERROR, "backend-not-found")
    );
    assert!(a.body.contains("default/nowhere:80"), "{}", a.body);
    let a = c.get("/empty").await;
    assert_eq!(
        (a.status, a.header("x-wasmesh-error")),
        (StatusCode::SERVICE_UNAVAILABLE, "no-endpoints")
    );
    // The connection survived every error.
    assert_eq!(c.get("/ok").await.status, StatusCode::OK);
}

#[tokio::test]
async fn filters_modify_headers_rewrite_and_redirect() {
    let (port, _b) = backends(&["b1"]).await;
    let hm = |set: &[(&str, &str)], remove: &[&str]| pb::HeaderModifier {
        set: set
            .iter()
            .map(|(n, v)| pb::HttpHeader {
                name: (*n).into(),
                value: (*v).into(),
            })
            .collect(),
        add: vec![],
        remove: remove.iter().map(|s| s.to_string()).collect(),
    };
    // /old… → /echo… on host `internal`, one header set and one removed on the way in, one set
    // on the way out.
    let mut rewrite = rule(
        vec![path_match(pb::MatchType::PathPrefix, "/old")],
        vec![backend_ref("web", 1)],
    );
    rewrite.filters = vec![
        pb::HttpFilter {
            kind: Some(pb::http_filter::Kind::RequestHeaderModifier(hm(
                &[("x-added", "yes")],
                &["x-secret"],
            ))),
        },
        pb::HttpFilter {
            kind: Some(pb::http_filter::Kind::ResponseHeaderModifier(hm(
                &[("x-resp", "1")],
                &[],
            ))),
        },
        pb::HttpFilter {
            kind: Some(pb::http_filter::Kind::UrlRewrite(pb::UrlRewrite {
                hostname: "internal".into(),
                path: Some(pb::PathModifier {
                    r#type: pb::path_modifier::Type::ReplacePrefixMatch as i32,
                    value: "/echo".into(),
                }),
            })),
        },
    ];
    let mut redirect = rule(vec![path_match(pb::MatchType::Exact, "/moved")], vec![]);
    redirect.filters = vec![pb::HttpFilter {
        kind: Some(pb::http_filter::Kind::RequestRedirect(
            pb::RequestRedirect {
                scheme: "https".into(),
                hostname: "example.com".into(),
                path: None,
                port: 0,
                status_code: 301,
            },
        )),
    }];
    // A header modifier does not change the authority: that is `URLRewrite`'s hostname.
    let mut plain = rule(
        vec![path_match(pb::MatchType::PathPrefix, "/echo")],
        vec![backend_ref("web", 1)],
    );
    plain.filters = vec![pb::HttpFilter {
        kind: Some(pb::http_filter::Kind::RequestHeaderModifier(hm(
            &[("host", "elsewhere")],
            &[],
        ))),
    }];
    let web = service_port(
        "web",
        WEB_VIP,
        "http",
        vec![ep("127.0.0.2", port)],
        vec![route("web", vec![rewrite, redirect, plain])],
    );
    let p = proxy(vec![web], WEB).await;
    let mut c = Client::h1(&p).await;
    let req = Request::get("/old?q=1")
        .header("x-secret", "s")
        .header("x-kept", "k")
        .body(Full::default())
        .expect("req");
    let a = c.send(req).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("x-got-path"), "/echo?q=1");
    assert_eq!(a.header("x-got-host"), "internal");
    assert_eq!(a.header("x-got-added"), "yes");
    assert_eq!(a.header("x-got-kept"), "k");
    assert_eq!(a.header("x-got-secret"), "", "removed before it left");
    assert_eq!(a.header("x-resp"), "1");

    let a = c.get("/moved?x=1").await;
    assert_eq!(a.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(a.header("location"), "https://example.com/moved?x=1");

    let a = c.get("/echo?z=2&z=%20").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("x-got-path"), "/echo?z=2&z=%20", "sent as it came");
    assert_eq!(a.header("x-got-host"), "web");
    let mut c = Client::h2(&p).await;
    let a = c.get("/echo?z=4").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("x-got-path"), "/echo?z=4");
    assert_eq!(a.header("x-got-host"), "web");
}

#[tokio::test]
async fn retries_hide_a_failing_replica() {
    // b1 fails every request with 503; b2 and b3 work.
    let l1 = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let port = l1.local_addr().expect("addr").port();
    let _bad = tokio::spawn(async move {
        while let Ok((s, _)) = l1.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(503)
                            .header("x-backend", "bad")
                            .body(text("down"))
                            .expect("resp"),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let _g2 = http_backend(
        SocketAddr::new("127.0.0.3".parse().expect("ip"), port),
        "b2",
    )
    .await;
    let _g3 = http_backend(
        SocketAddr::new("127.0.0.4".parse().expect("ip"), port),
        "b3",
    )
    .await;
    let mut r = rule(vec![], vec![backend_ref("web", 1)]);
    r.retry = Some(pb::HttpRetry {
        codes: vec![503],
        attempts: 2,
        backoff_ms: 1,
    });
    let web = service_port(
        "web",
        WEB_VIP,
        "http",
        three(port),
        vec![route("web", vec![r])],
    );
    let p = proxy(vec![web], WEB).await;
    let mut c = Client::h1(&p).await;
    let t = tally(&mut c, "/", 60).await;
    assert!(!t.contains_key("bad"), "{t:?}");
    let retries = p
        .state
        .stats
        .http_retries
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(retries >= 1, "the bad replica was tried and retried");
    // Only the bad replica: a GET is tried 1 + 2 times, then its 503 comes through; a POST
    // (not idempotent) is sent once.
    let mut r = rule(vec![], vec![backend_ref("web", 1)]);
    r.retry = Some(pb::HttpRetry {
        codes: vec![503],
        attempts: 2,
        backoff_ms: 1,
    });
    let only_bad = service_port(
        "web",
        WEB_VIP,
        "http",
        vec![ep("127.0.0.2", port)],
        vec![route("web", vec![r])],
    );
    let p = proxy(vec![only_bad], WEB).await;
    let retries = || {
        p.state
            .stats
            .http_retries
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut c = Client::h1(&p).await;
    let a = c.get("/").await;
    assert_eq!(
        (a.status, a.header("x-backend")),
        (StatusCode::SERVICE_UNAVAILABLE, "bad")
    );
    assert_eq!(retries(), 2);
    let req = Request::post("/")
        .body(Full::new(Bytes::from("x")))
        .expect("req");
    assert_eq!(c.send(req).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retries(), 2, "POSTs are never retried on a status");
}

#[tokio::test]
async fn a_dead_endpoint_is_skipped_and_a_slow_one_times_out_with_504() {
    let (port, _b) = backends(&["b1", "b2"]).await;
    // 127.0.0.9: nothing listens there.
    let eps = vec![
        ep("127.0.0.2", port),
        ep("127.0.0.3", port),
        ep("127.0.0.9", port),
    ];
    let mut r = rule(vec![], vec![backend_ref("web", 1)]);
    r.request_timeout_ms = Some(300);
    let web = service_port("web", WEB_VIP, "http", eps, vec![route("web", vec![r])]);
    let p = proxy(vec![web], WEB).await;
    let mut c = Client::h1(&p).await;
    let t = tally(&mut c, "/", 60).await;
    assert_eq!(t.keys().cloned().collect::<Vec<_>>(), vec!["b1", "b2"]);
    let started = Instant::now();
    let a = c.get("/sleep/3000").await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a.header("x-wasmesh-error"), "timeout");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "answered near the 300 ms limit"
    );
}

#[tokio::test]
async fn a_websocket_style_upgrade_carries_bytes_both_ways() {
    let (port, _b) = backends(&["b1"]).await;
    let p = proxy(
        vec![service_port(
            "web",
            WEB_VIP,
            "http",
            vec![ep("127.0.0.2", port)],
            vec![],
        )],
        WEB,
    )
    .await;
    let mut s = TcpStream::connect(p.front).await.expect("connect");
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut byte))
            .await
            .expect("in time")
            .expect("read");
        assert_ne!(
            n,
            0,
            "closed before the 101: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in ["hello", "world"] {
        s.write_all(msg.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(buf, msg.as_bytes());
    }
}

#[tokio::test]
async fn a_server_that_speaks_first_on_an_undeclared_port_works_after_the_detection_timeout() {
    // A MySQL-like server: greets first, then echoes.
    let l = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let _srv = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 hello\r\n").await;
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf).await {
                    let _ = s.write_all(&buf[..n]).await;
                }
            });
        }
    });
    let config = OutboundConfig {
        detect_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let p = proxy_with(
        vec![service_port(
            "db",
            WEB_VIP,
            "",
            vec![ep("127.0.0.2", port)],
            vec![],
        )],
        WEB,
        config,
    )
    .await;
    let mut s = TcpStream::connect(p.front).await.expect("connect");
    let mut greeting = [0u8; 11];
    tokio::time::timeout(WAIT, s.read_exact(&mut greeting))
        .await
        .expect("greeting in time")
        .expect("read");
    assert_eq!(&greeting, b"220 hello\r\n");
    s.write_all(b"QUIT").await.expect("write");
    let mut echo = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut echo))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&echo, b"QUIT");
}

#[tokio::test]
async fn malformed_http_gets_400_and_others_are_still_served() {
    let (port, _b) = backends(&["b1"]).await;
    let p = proxy(
        vec![service_port(
            "web",
            WEB_VIP,
            "http",
            vec![ep("127.0.0.2", port)],
            vec![],
        )],
        WEB,
    )
    .await;
    for bad in [
        &b"GET / HTTP/1.1\r\nHost: web\r\nBad Header\r\n\r\n"[..],
        b"\x16\x03\x01\x00\x05hello",
        b"GET / HTTP/1.1\r\n\r\n", // no Host
    ] {
        let mut s = TcpStream::connect(p.front).await.expect("connect");
        s.write_all(bad).await.expect("write");
        let mut out = String::new();
        tokio::time::timeout(WAIT, s.read_to_string(&mut out))
            .await
            .expect("answered, not hung")
            .ok();
        let lower = out.to_lowercase();
        assert!(
            lower.starts_with("http/1.1 400"),
            "{:?} → {out}",
            String::from_utf8_lossy(bad)
        );
        assert!(lower.contains("x-wasmesh-error: bad-request"), "{out}");
    }
    let mut c = Client::h1(&p).await;
    assert_eq!(c.get("/").await.body, "b1");
}

// ---------------------------------------------------------------- Wasm filters

/// A compiled filter from `filters/` (built by `.ci/run`).
fn filter_wasm(name: &str) -> Bytes {
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs = Vec::new();
    if let Ok(d) = std::env::var("CARGO_TARGET_DIR") {
        dirs.push(std::path::PathBuf::from(d).join("wasm32-wasip1/release"));
    }
    dirs.push(repo.join("target/wasm32-wasip1/release"));
    dirs.push(repo.join("filters/target/wasm32-wasip1/release"));
    for d in &dirs {
        if let Ok(b) = std::fs::read(d.join(format!("{name}.wasm"))) {
            return Bytes::from(b);
        }
    }
    panic!(
        "{name}.wasm not found in {dirs:?}: build the filters first: rustup target add wasm32-wasip1 && cargo build --manifest-path filters/Cargo.toml --target wasm32-wasip1 --release"
    );
}

/// Filters in force with one plugin `name` running `module` with `config`.
async fn filters_with(plugins: Vec<(&str, &str, &str)>) -> Arc<Filters> {
    filters_in(plugins, None).await
}

async fn filters_in(
    plugins: Vec<(&str, &str, &str)>,
    callouts: Option<Arc<dyn wasmesh_wasm::HttpCallouts>>,
) -> Arc<Filters> {
    let host = wasmesh_wasm::HostConfig {
        instances_per_plugin: 2,
        max_instances: 16,
        // Tests share two cores with builds: a 10 ms wall-clock deadline could misfire.
        callback_deadline: Duration::from_secs(1),
        callouts,
        ..Default::default()
    };
    let filters = Arc::new(Filters::new(
        host,
        Me {
            namespace: "default".into(),
            labels: Default::default(),
        },
    ));
    let mut modules = std::collections::HashMap::new();
    let mut specs = Vec::new();
    for (name, module, config) in plugins {
        let wasm = filter_wasm(module);
        let sha = wasmesh_wasm::sha256_hex(&wasm);
        modules.insert(sha.clone(), wasm);
        specs.push(pb::WasmPlugin {
            namespace: "default".into(),
            name: name.into(),
            sha256: sha,
            plugin_config: config.as_bytes().to_vec(),
            ..Default::default()
        });
    }
    let modules = Arc::new(modules);
    let fetch: wasmesh_proxy::filters::Fetch = Arc::new(move |sha: String| {
        let m = modules.clone();
        Box::pin(async move {
            m.get(&sha)
                .cloned()
                .ok_or_else(|| format!("no module {sha}"))
        })
    });
    // The host starts with the first plugin, not before: a pod without filters pays nothing.
    assert!(filters.host().is_none());
    let any = !specs.is_empty();
    filters.apply(specs, &fetch).await;
    assert_eq!(filters.host().is_some(), any);
    filters
}

#[tokio::test]
async fn a_header_set_by_a_wasm_filter_picks_the_route() {
    let (p1, _b1) = backends(&["v1"]).await;
    let l2 = http_backend("127.0.0.3:0".parse().expect("addr"), "v2").await;
    let v1 = service_port(
        "web-v1",
        [10, 96, 0, 11],
        "http",
        vec![ep("127.0.0.2", p1)],
        vec![],
    );
    let v2 = service_port(
        "web-v2",
        [10, 96, 0, 12],
        "http",
        vec![ep("127.0.0.3", l2.0.port())],
        vec![],
    );
    let routes = vec![route(
        "web",
        vec![
            rule(
                vec![header_match("x-canary", "canary")],
                vec![backend_ref("web-v2", 1)],
            ),
            rule(vec![], vec![backend_ref("web-v1", 1)]),
        ],
    )];
    let web = service_port("web", WEB_VIP, "http", vec![], routes);
    // The canary filter: users opted in by a header go to the canary, nobody else (0 %).
    let filters = filters_with(vec![(
        "canary",
        "canary",
        r#"{"percentage": 0, "match_headers": {"x-opt-in": "yes"}}"#,
    )])
    .await;
    assert_eq!(filters.names(), vec!["default/canary"], "the plugin loaded");
    let p = proxy_full(
        vec![web, v1, v2],
        WEB,
        OutboundConfig::default(),
        Some(filters),
    )
    .await;
    let mut c = Client::h1(&p).await;
    let a = c.get("/").await;
    assert_eq!(a.header("x-backend"), "v1");
    assert!(
        a.header("x-canary-decision").starts_with("stable"),
        "the filter's response header: {}",
        a.header("x-canary-decision")
    );
    let req = Request::get("/")
        .header("x-opt-in", "yes")
        .body(Full::default())
        .expect("req");
    let a = c.send(req).await;
    assert_eq!(
        a.header("x-backend"),
        "v2",
        "routed on the header the filter set"
    );
    assert!(
        a.header("x-canary-decision").starts_with("canary"),
        "{}",
        a.header("x-canary-decision")
    );
}

#[tokio::test]
async fn a_plugin_that_rejects_its_config_is_refused_and_the_previous_version_keeps_running() {
    let (port, _b) = backends(&["b1"]).await;
    let filters = filters_with(vec![("canary", "canary", r#"{"percentage": 100}"#)]).await;
    let p = proxy_full(
        vec![service_port(
            "web",
            WEB_VIP,
            "http",
            vec![ep("127.0.0.2", port)],
            vec![],
        )],
        WEB,
        OutboundConfig::default(),
        Some(filters.clone()),
    )
    .await;
    let mut c = Client::h1(&p).await;
    assert!(
        c.get("/")
            .await
            .header("x-canary-decision")
            .starts_with("canary")
    );
    // A new version with a config the filter refuses (percentage out of range).
    let wasm = filter_wasm("canary");
    let sha = wasmesh_wasm::sha256_hex(&wasm);
    let fetch: wasmesh_proxy::filters::Fetch = Arc::new(move |_sha: String| {
        let w = wasm.clone();
        Box::pin(async move { Ok(w) })
    });
    filters
        .apply(
            vec![pb::WasmPlugin {
                namespace: "default".into(),
                name: "canary".into(),
                sha256: sha,
                plugin_config: br#"{"percentage": 900}"#.to_vec(),
                ..Default::default()
            }],
            &fetch,
        )
        .await;
    let a = c.get("/").await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.header("x-canary-decision").starts_with("canary"),
        "the last good version still runs"
    );
}

#[tokio::test]
async fn timeouts_on_one_http2_connection_do_not_delay_the_next_request() {
    let (port, _b) = backends(&["b1"]).await;
    let mut r = rule(vec![], vec![backend_ref("web", 1)]);
    r.request_timeout_ms = Some(300);
    let web = service_port(
        "web",
        WEB_VIP,
        "http",
        vec![ep("127.0.0.2", port)],
        vec![route("web", vec![r])],
    );
    let p = proxy(vec![web], WEB).await;
    let mut c = Client::h2(&p).await;
    for i in 0..3 {
        let started = Instant::now();
        let a = c.get("/sleep/3000").await;
        assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1200), "call {i} took {took:?}");
    }
}

/// An inbound sidecar in front of the app at `app`: connections to the returned address are
/// handled as if redirected to `app`.
async fn inbound_front(app: SocketAddr) -> SocketAddr {
    inbound_front_with(app, None).await
}

/// [`inbound_front`] with the mesh side on (`mesh`: its identity store and authorizer).
async fn inbound_front_with(
    app: SocketAddr,
    mesh: Option<Arc<wasmesh_proxy::identity::Mesh>>,
) -> SocketAddr {
    let state = ProxyState::new(Locality::default());
    let inb = Arc::new(wasmesh_proxy::inbound::Inbound {
        state,
        own_ports: vec![],
        connect_timeout: Duration::from_secs(2),
        copy: Default::default(),
        mesh,
        detect_timeout: Duration::from_millis(500),
        opaque_ports: vec![],
        pools: wasmesh_proxy::http::pool::Pools::new(
            wasmesh_proxy::http::pool::Dial::LocalApp,
            Duration::from_secs(2),
        ),
        filters: None,
    });
    let l = TcpListener::bind("127.0.0.5:0")
        .await
        .expect("bind inbound");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, peer)) = l.accept().await {
            let inb = inb.clone();
            tokio::spawn(async move { inb.handle(s, peer, app).await });
        }
    });
    addr
}

/// The inbound L7 path authorizes every request: a client the policy denies on the port gets
/// 403 `x-wasmesh-error: forbidden` on a connection that stays open, is counted, and a policy
/// change applies from the next request on the same connection.
#[tokio::test]
async fn inbound_requests_are_authorized_one_by_one() {
    use wasmesh_proxy::identity::authz::{self, Authorizer, MtlsMode};
    use wasmesh_proxy::identity::{IdentityStore, Mesh, MeshStats};
    let (app, _h) = http_backend("127.0.0.1:0".parse().expect("addr"), "app").await;
    let mesh = Arc::new(Mesh {
        store: IdentityStore::new(),
        authorizer: Authorizer::new(
            authz::Workload {
                namespace: "demo".into(),
                labels: [("app".to_string(), "web".to_string())].into(),
            },
            "cluster.local".into(),
            MtlsMode::Permissive,
        ),
        stats: Arc::new(MeshStats::default()),
    });
    let front = inbound_front_with(app, Some(mesh.clone())).await;
    let policy = |rule: &str| {
        authz::parse_policies(
            &format!(
                "apiVersion: wasmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: web, namespace: demo}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  rules: [{rule}]\n"
            ),
            std::path::Path::new("policy.yaml"),
        )
        .expect("policy")
    };
    let denied = |mesh: &Mesh| {
        mesh.stats
            .authz_denied
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let port = app.port();

    for mut c in [Client::h1_to(front).await, Client::h2_to(front).await] {
        mesh.authorizer.set_local_policies(Vec::new());
        assert_eq!(c.get("/").await.body, "app", "no policy: allowed");

        // Only meshed identities on this port: a plaintext client is refused per request.
        mesh.authorizer
            .set_local_policies(policy(&format!("{{from: [\"*\"], ports: [{port}]}}")));
        let before = denied(&mesh);
        for _ in 0..2 {
            let a = c.get("/").await;
            assert_eq!(a.status, StatusCode::FORBIDDEN);
            assert_eq!(a.header("x-wasmesh-error"), "forbidden");
            assert!(a.body.contains(&format!("on port {port}")), "{}", a.body);
            assert_eq!(a.header("x-backend"), "", "the app never saw it");
        }
        assert_eq!(denied(&mesh), before + 2, "each denied request counted");

        // The policy changes: the next request on the same connection follows it.
        mesh.authorizer
            .set_local_policies(policy(&format!("{{ports: [{port}]}}")));
        let a = c.get("/").await;
        assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "app"));
        // A rule for another port only: this one is closed again.
        mesh.authorizer
            .set_local_policies(policy(&format!("{{ports: [{}]}}", port.wrapping_add(1))));
        assert_eq!(c.get("/").await.status, StatusCode::FORBIDDEN);
    }
}

#[tokio::test]
async fn through_both_sidecars_timeouts_on_http2_do_not_delay_the_next_request() {
    let (app, _h) = http_backend("127.0.0.1:0".parse().expect("addr"), "app").await;
    let front = inbound_front(app).await;
    let mut r = rule(vec![], vec![backend_ref("web", 1)]);
    r.request_timeout_ms = Some(300);
    let web = service_port(
        "web",
        WEB_VIP,
        "http",
        vec![ep("127.0.0.5", front.port())],
        vec![route("web", vec![r])],
    );
    let p = proxy(vec![web], WEB).await;
    let mut c = Client::h2(&p).await;
    assert_eq!(c.get("/").await.body, "app");
    for i in 0..3 {
        let started = Instant::now();
        let a = c.get("/sleep/3000").await;
        assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1200), "call {i} took {took:?}");
    }
    let mut c = Client::h1(&p).await;
    let a = c.get("/echo").await;
    assert_eq!(a.header("x-got-version"), "HTTP/1.1");
}

#[tokio::test]
async fn a_filter_calls_a_mesh_service_by_name() {
    let (web_port, _w) = backends(&["web"]).await;
    let authz = http_backend("127.0.0.3:0".parse().expect("addr"), "authz").await;
    let mut authz_port = service_port(
        "authz",
        [10, 96, 0, 14],
        "http",
        vec![ep("127.0.0.3", authz.0.port())],
        vec![],
    );
    authz_port.key.as_mut().expect("key").service = "authz".into();
    let web = service_port(
        "web",
        WEB_VIP,
        "http",
        vec![ep("127.0.0.2", web_port)],
        vec![],
    );
    let state = ProxyState::new(Locality {
        node: None,
        zone: None,
        namespace: Some("default".into()),
    });
    install(&state, vec![web, authz_port]);
    let callouts = wasmesh_proxy::filters::callouts::MeshCallouts {
        state: state.clone(),
        pools: Arc::new(wasmesh_proxy::http::pool::Pools::new(
            wasmesh_proxy::http::pool::Dial::Direct,
            Duration::from_secs(1),
        )),
        namespace: "default".into(),
    };
    let filters = filters_in(
        vec![("abi", "abi_test", r#"{"callout_upstream": "authz"}"#)],
        Some(Arc::new(callouts)),
    )
    .await;
    let p = proxy_on(state, WEB, OutboundConfig::default(), Some(filters)).await;
    let mut c = Client::h1(&p).await;
    let req = Request::get("/echo")
        .header("x-abi-op", "callout")
        .body(Full::default())
        .expect("req");
    let a = c.send(req).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        a.header("x-got-abi-callout-status"),
        "200",
        "the callout reached authz"
    );
    assert_eq!(
        a.header("x-got-abi-callout-body-len"),
        "5",
        "authz answered its name"
    );
}
