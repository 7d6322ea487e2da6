//! `wasmesh-demo client` and `fetch`: HTTP/1.1 GETs, one new connection each.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::duration;

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// What to call, e.g. http://backend.demo/ (names resolve through /etc/hosts).
    #[arg(long)]
    url: Uri,

    /// Pause between calls.
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = duration::parse)]
    interval: Duration,

    /// Stop after this many calls (default: run until stopped).
    #[arg(long)]
    count: Option<u64>,

    /// Exit with status 1 at the first failed call.
    #[arg(long)]
    fail_fast: bool,

    /// Time allowed for one call (resolve, connect, answer).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration::parse)]
    timeout: Duration,

    /// Before counting, retry quietly until the first call succeeds, for up to this long (for
    /// a client that starts before its backend is ready).
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = duration::parse)]
    wait: Duration,

    /// Also print where each call landed at the backend and the peer address it saw.
    #[arg(long)]
    verbose: bool,
}

#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// The URL to GET.
    url: Uri,

    /// Time allowed for the call.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration::parse)]
    timeout: Duration,
}

/// One answered call.
struct Answer {
    status: u16,
    body: String,
    served_at: Option<String>,
    peer: Option<String>,
}

pub async fn run(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let target = Target::from_uri(&args.url)?;
    if !args.wait.is_zero() {
        let deadline = Instant::now() + args.wait;
        loop {
            match call(&target, args.timeout).await {
                Ok(a) if a.status < 500 => break,
                _ if Instant::now() >= deadline => {
                    println!(
                        "no answer from {} within {:?}; counting anyway",
                        args.url, args.wait
                    );
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    let mut tally: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed = 0u64;
    let mut i = 0u64;
    loop {
        i += 1;
        let start = Instant::now();
        let result = call(&target, args.timeout).await;
        let ms = start.elapsed().as_millis();
        let mut line = format!("#{i} ");
        match &result {
            Ok(a) => {
                let pod = a
                    .body
                    .trim()
                    .strip_prefix("hello from ")
                    .unwrap_or(a.body.trim())
                    .to_string();
                let _ = write!(line, "{} answered by {pod} ({ms} ms)", a.status);
                if args.verbose {
                    let _ = write!(
                        line,
                        " served at {} for {}",
                        a.served_at.as_deref().unwrap_or("?"),
                        a.peer.as_deref().unwrap_or("?")
                    );
                }
                *tally.entry(pod).or_default() += 1;
            }
            Err(e) => {
                failed += 1;
                let _ = write!(line, "failed after {ms} ms: {e:#}");
            }
        }
        line.push_str("  |");
        for (pod, n) in &tally {
            let _ = write!(line, " {pod}={n}");
        }
        if failed > 0 {
            let _ = write!(line, " failed={failed}");
        }
        println!("{line}");
        if result.is_err() && args.fail_fast {
            return Ok(ExitCode::FAILURE);
        }
        if args.count.is_some_and(|n| i >= n) {
            break;
        }
        tokio::time::sleep(args.interval).await;
    }
    println!(
        "done: {i} calls, {failed} failed, answered by {} pods",
        tally.len()
    );
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn fetch(args: FetchArgs) -> anyhow::Result<ExitCode> {
    let target = Target::from_uri(&args.url)?;
    let a = call(&target, args.timeout).await?;
    print!("{}", a.body);
    Ok(if (200..300).contains(&a.status) {
        ExitCode::SUCCESS
    } else {
        eprintln!("{}: status {}", args.url, a.status);
        ExitCode::FAILURE
    })
}

/// Where a URL points.
struct Target {
    host: String,
    port: u16,
    path: String,
    authority: String,
}

impl Target {
    fn from_uri(uri: &Uri) -> anyhow::Result<Self> {
        if uri.scheme_str().is_some_and(|s| s != "http") {
            bail!("{uri}: only http:// URLs are supported");
        }
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("{uri}: no host"))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        Ok(Self {
            port: uri.port_u16().unwrap_or(80),
            path: uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()),
            authority: uri
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_else(|| host.clone()),
            host,
        })
    }
}

async fn call(target: &Target, timeout: Duration) -> anyhow::Result<Answer> {
    tokio::time::timeout(timeout, call_once(target))
        .await
        .map_err(|_| anyhow!("no answer within {timeout:?}"))?
}

async fn call_once(target: &Target) -> anyhow::Result<Answer> {
    // Resolved on every call: the names in /etc/hosts change as Services do.
    let addrs: Vec<_> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .with_context(|| format!("cannot resolve {}", target.host))?
        .collect();
    let addr = addrs
        .first()
        .ok_or_else(|| anyhow!("{} resolves to no address", target.host))?;
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(target.path.as_str())
        .header(http::header::HOST, target.authority.as_str())
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("request to {addr}"))?;
    let status = resp.status().as_u16();
    let header = |k: &str| {
        resp.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let served_at = header("x-served-at");
    let peer = header("x-peer");
    let body = resp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading the answer from {addr}"))?
        .to_bytes();
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        served_at,
        peer,
    })
}
