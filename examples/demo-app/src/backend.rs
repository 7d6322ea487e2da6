//! `wasmesh-demo backend`: answers every request with the pod's name, over HTTP/1.1 or h2c
//! (whichever the client speaks), with a WebSocket echo at `/ws` and, on `--grpc-listen`, the
//! gRPC service of [`crate::grpc`].
//!
//! Paths: `/sleep/<ms>` answers after that long, `/status/<n>` with status n, `/headers` with
//! the request's headers (one `name: value` per line), `/ws` is a WebSocket echo; anything else
//! is `hello from <pod>`. `--status N` makes every answer status N (a failing replica).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::{duration, grpc, ws};

#[derive(Debug, clap::Args)]
pub struct BackendArgs {
    /// Address to listen on for HTTP/1.1 and h2c; repeat the flag to listen on several ports.
    #[arg(long = "listen", value_name = "ADDR", default_value = "0.0.0.0:8080")]
    listen: Vec<SocketAddr>,

    /// Also serve the gRPC service (`wasmesh.demo.v1.Demo`) on this address.
    #[arg(long = "grpc-listen", value_name = "ADDR")]
    grpc_listen: Vec<SocketAddr>,

    /// How long to keep serving after SIGTERM, like an app that drains while its endpoint is
    /// terminating.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration::parse)]
    drain: Duration,

    /// The name to answer with.
    #[arg(long, env = "POD_NAME", default_value = "backend")]
    name: String,

    /// The version to announce in `x-version` (e.g. v1, v2 of a canary).
    #[arg(long, env = "VERSION")]
    version: Option<String>,

    /// Answer every request with this status (a replica that fails).
    #[arg(long, value_name = "CODE", value_parser = clap::value_parser!(u16).range(100..1000))]
    status: Option<u16>,

    /// Before answering, call this URL (a service behind this one), passing on the request's
    /// trace context (`traceparent`, `tracestate`, B3) as an instrumented app does; its answer's
    /// first line is added to ours, and a failed call answers 502.
    #[arg(long, value_name = "URL")]
    call: Option<http::Uri>,
}

type CallClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<Bytes>,
>;

/// The trace context headers an instrumented app passes on to the services it calls.
const TRACE_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// Who answers, shared by every connection.
#[derive(Debug)]
pub struct Identity {
    pub name: String,
    pub version: Option<String>,
    status: Option<StatusCode>,
    call: Option<(http::Uri, CallClient)>,
}

pub async fn run(args: BackendArgs) -> anyhow::Result<ExitCode> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let status = match args.status {
        Some(s) => Some(StatusCode::from_u16(s).with_context(|| format!("status {s}"))?),
        None => None,
    };
    let id = Arc::new(Identity {
        name: args.name,
        version: args.version.filter(|v| !v.is_empty()),
        status,
        call: args.call.map(|u| {
            let client =
                hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
            (u, client)
        }),
    });
    let name = id.name.clone();
    for addr in &args.listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("{name}: listening on {addr} (HTTP/1.1, h2c, WebSocket at /ws)");
        tokio::spawn(serve(listener, id.clone()));
    }
    for addr in &args.grpc_listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("{name}: gRPC on {addr}");
        tokio::spawn(grpc::serve(listener, id.clone()));
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    println!("{name}: stopping; still serving for {:?}", args.drain);
    tokio::time::sleep(args.drain).await;
    println!("{name}: stopped");
    Ok(ExitCode::SUCCESS)
}

async fn serve(listener: TcpListener, id: Arc<Identity>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}: accept failed: {e}", id.name);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let local = stream.local_addr().ok();
        let id = id.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let id = id.clone();
                async move { Ok::<_, Infallible>(answer(req, &id, local, peer).await) }
            });
            // A client that goes away mid-request is not our problem.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    id: &Identity,
    local: Option<SocketAddr>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let mut status = StatusCode::OK;
    let mut body = format!("hello from {}\n", id.name);
    let mut plain_text = false;
    if path == "/ws" {
        match ws::accept(req, &id.name) {
            Ok(resp) => return identify(resp, id, local, peer),
            Err(why) => {
                status = StatusCode::BAD_REQUEST;
                body = format!("{why}\n");
            }
        }
    } else if let Some(ms) = path.strip_prefix("/sleep/") {
        match ms.parse::<u64>() {
            Ok(ms) => tokio::time::sleep(Duration::from_millis(ms.min(600_000))).await,
            Err(_) => {
                status = StatusCode::BAD_REQUEST;
                body = format!("/sleep/<ms>: `{ms}` is not a number\n");
            }
        }
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(c) => status = c,
            None => {
                status = StatusCode::BAD_REQUEST;
                body = format!("/status/<code>: `{code}` is not a status\n");
            }
        }
    } else if let Some((uri, client)) = &id.call {
        let mut call = Request::get(uri.clone());
        for name in TRACE_HEADERS {
            if let Some(v) = req.headers().get(name) {
                call = call.header(name, v.clone());
            }
        }
        let outcome = match call.body(http_body_util::Empty::new()) {
            Ok(r) => match tokio::time::timeout(Duration::from_secs(10), client.request(r)).await {
                Ok(Ok(resp)) => {
                    let code = resp.status();
                    match http_body_util::BodyExt::collect(resp.into_body()).await {
                        Ok(b) => Ok((code, b.to_bytes())),
                        Err(e) => Err(e.to_string()),
                    }
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer within 10s".to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok((code, b)) => {
                let first = String::from_utf8_lossy(&b);
                body = format!(
                    "hello from {} → {uri} answered {}: {}\n",
                    id.name,
                    code.as_u16(),
                    first.lines().next().unwrap_or("")
                );
            }
            Err(e) => {
                status = StatusCode::BAD_GATEWAY;
                body = format!("hello from {}: calling {uri} failed: {e}\n", id.name);
            }
        }
    } else if path == "/headers" {
        body = req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
            .collect();
        plain_text = true;
    }
    if let Some(s) = id.status {
        status = s;
    }
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if plain_text {
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    identify(resp, id, local, peer)
}

/// Adds the headers that say who answered, where, and for whom.
fn identify<B>(
    mut resp: Response<B>,
    id: &Identity,
    local: Option<SocketAddr>,
    peer: SocketAddr,
) -> Response<B> {
    let headers = resp.headers_mut();
    let mut set = |k: &'static str, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            headers.insert(k, v);
        }
    };
    set("x-pod", &id.name);
    if let Some(v) = &id.version {
        set("x-version", v);
    }
    if let Some(local) = local {
        set("x-served-at", &local.to_string());
    }
    set("x-peer", &peer.to_string());
    resp
}
