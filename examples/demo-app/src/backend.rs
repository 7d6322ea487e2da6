//! `wasmesh-demo backend`: answers every request with the pod's name.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::duration;

#[derive(Debug, clap::Args)]
pub struct BackendArgs {
    /// Address to listen on; repeat the flag to listen on several ports.
    #[arg(long = "listen", value_name = "ADDR", default_value = "0.0.0.0:8080")]
    listen: Vec<SocketAddr>,

    /// How long to keep serving after SIGTERM, like an app that drains while its endpoint is
    /// terminating.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration::parse)]
    drain: Duration,

    /// The name to answer with.
    #[arg(long, env = "POD_NAME", default_value = "backend")]
    name: String,
}

pub async fn run(args: BackendArgs) -> anyhow::Result<ExitCode> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let name: &'static str = Box::leak(args.name.into_boxed_str());
    for addr in &args.listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("{name}: listening on {addr}");
        tokio::spawn(serve(listener, name));
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

async fn serve(listener: TcpListener, name: &'static str) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{name}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let local = stream.local_addr().ok();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                Ok::<_, Infallible>(answer(&req, name, local, peer))
            });
            // A client that goes away mid-request is not our problem.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn answer<B>(
    _req: &Request<B>,
    name: &str,
    local: Option<SocketAddr>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("hello from {name}\n"))));
    let headers = resp.headers_mut();
    let mut set = |k: &'static str, v: String| {
        if let Ok(v) = http::HeaderValue::from_str(&v) {
            headers.insert(k, v);
        }
    };
    set("x-pod", name.to_string());
    if let Some(local) = local {
        set("x-served-at", local.to_string());
    }
    set("x-peer", peer.to_string());
    resp
}
