//! `wasmesh-demo client` and `fetch`: HTTP GETs, counted per answering pod.
//!
//! By default every call is a new HTTP/1.1 connection (`Connection: close`): with an L4 proxy
//! in the path each call is balanced on its own. `--reuse` keeps one HTTP/1.1 connection for
//! every call and `--h2` one HTTP/2 connection (prior knowledge, calls multiplexed with
//! `--concurrency`): there only a proxy that balances per request spreads the calls.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

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

    /// Make every call on one kept-alive HTTP/1.1 connection (a new one only if it closes).
    #[arg(long, conflicts_with = "h2")]
    reuse: bool,

    /// HTTP/2 with prior knowledge (h2c): one connection, every call a stream on it.
    #[arg(long)]
    h2: bool,

    /// Calls in flight at once (needs --count; with --h2 they are multiplexed on the one
    /// connection, else each has its own).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    concurrency: u64,

    /// A request header, NAME:VALUE; repeat for more.
    #[arg(long = "header", value_name = "NAME:VALUE", value_parser = parse_header)]
    headers: Vec<(HeaderName, HeaderValue)>,

    /// The path (and query) to request instead of the URL's.
    #[arg(long)]
    path: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// The URL to GET.
    url: Uri,

    /// Time allowed for the call.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration::parse)]
    timeout: Duration,
}

fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: a header is NAME:VALUE"))?;
    let name =
        HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| format!("`{name}`: {e}"))?;
    let value = HeaderValue::from_str(value.trim()).map_err(|e| format!("`{value}`: {e}"))?;
    Ok((name, value))
}

/// One answered call.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
    /// `x-pod`, else `proxy` when the proxy answered (`x-wasmesh-error`), else the body's
    /// `hello from <pod>`.
    pod: String,
    version: Option<String>,
    error: Option<String>,
    served_at: Option<String>,
    peer: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A new HTTP/1.1 connection per call.
    Close,
    /// One HTTP/1.1 connection, kept alive.
    Reuse,
    /// One HTTP/2 connection.
    H2,
}

/// Makes calls to one target, on connections as the mode says.
struct Caller {
    target: Target,
    mode: Mode,
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
    h1: Mutex<Option<http1::SendRequest<Empty<Bytes>>>>,
    h2: Mutex<Option<http2::SendRequest<Empty<Bytes>>>>,
    /// Connections opened so far.
    connections: AtomicU64,
}

impl Caller {
    fn new(target: Target, mode: Mode, timeout: Duration) -> Self {
        Self {
            target,
            mode,
            headers: Vec::new(),
            timeout,
            h1: Mutex::new(None),
            h2: Mutex::new(None),
            connections: AtomicU64::new(0),
        }
    }

    async fn call(&self) -> anyhow::Result<Answer> {
        match self.mode {
            Mode::Close => Ok(self.bounded(self.call_h1(None)).await?.0),
            Mode::Reuse => {
                // One call at a time on the connection; it is kept only after a whole answer.
                let mut slot = self.h1.lock().await;
                let kept = slot.take();
                let (answer, sender) = self.bounded(self.call_h1(kept)).await?;
                *slot = sender;
                Ok(answer)
            }
            Mode::H2 => self.bounded(self.call_h2()).await,
        }
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        tokio::time::timeout(self.timeout, f)
            .await
            .map_err(|_| anyhow!("no answer within {:?}", self.timeout))?
    }

    async fn connect(&self) -> anyhow::Result<TcpStream> {
        // Resolved on every connect: the names in /etc/hosts change as Services do.
        let t = &self.target;
        let addrs: Vec<_> = tokio::net::lookup_host((t.host.as_str(), t.port))
            .await
            .with_context(|| format!("cannot resolve {}", t.host))?
            .collect();
        let addr = addrs
            .first()
            .ok_or_else(|| anyhow!("{} resolves to no address", t.host))?;
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        self.connections.fetch_add(1, Ordering::Relaxed);
        Ok(stream)
    }

    /// An HTTP/1.1 call on `kept` (if it is still open) or a new connection; returns the
    /// connection to keep when the mode keeps one.
    async fn call_h1(
        &self,
        kept: Option<http1::SendRequest<Empty<Bytes>>>,
    ) -> anyhow::Result<(Answer, Option<http1::SendRequest<Empty<Bytes>>>)> {
        let open = match kept {
            Some(mut s) => s.ready().await.is_ok().then_some(s),
            None => None,
        };
        let mut sender = match open {
            Some(s) => s,
            None => {
                let stream = self.connect().await?;
                let (sender, conn) = http1::handshake(TokioIo::new(stream))
                    .await
                    .context("HTTP handshake")?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                sender
            }
        };
        let mut req = http::Request::get(self.target.path.as_str())
            .header(http::header::HOST, self.target.authority.as_str());
        if self.mode == Mode::Close {
            req = req.header(http::header::CONNECTION, "close");
        }
        let req = self.with_headers(req)?;
        let resp = sender.send_request(req).await.context("request")?;
        let answer = read(resp).await?;
        Ok((answer, (self.mode == Mode::Reuse).then_some(sender)))
    }

    async fn call_h2(&self) -> anyhow::Result<Answer> {
        let mut sender = {
            let mut slot = self.h2.lock().await;
            match slot.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let stream = self.connect().await?;
                    let (sender, conn) =
                        http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                            .await
                            .context("HTTP/2 handshake")?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    *slot = Some(sender.clone());
                    sender
                }
            }
        };
        let uri = format!("http://{}{}", self.target.authority, self.target.path);
        let req = self.with_headers(http::Request::get(uri))?;
        sender.ready().await.context("HTTP/2 connection")?;
        let resp = sender.send_request(req).await.context("request")?;
        read(resp).await
    }

    fn with_headers(
        &self,
        mut req: http::request::Builder,
    ) -> anyhow::Result<http::Request<Empty<Bytes>>> {
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        req.body(Empty::new()).context("building the request")
    }

    /// Forgets kept connections and the count (after the `--wait` phase).
    async fn reset(&self) {
        *self.h1.lock().await = None;
        *self.h2.lock().await = None;
        self.connections.store(0, Ordering::Relaxed);
    }
}

async fn read(resp: http::Response<hyper::body::Incoming>) -> anyhow::Result<Answer> {
    let status = resp.status().as_u16();
    let header = |k: &str| {
        resp.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let pod = header("x-pod");
    let version = header("x-version");
    let error = header("x-wasmesh-error");
    let served_at = header("x-served-at");
    let peer = header("x-peer");
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading the answer")?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    let pod = pod.unwrap_or_else(|| {
        if error.is_some() {
            "proxy".into()
        } else {
            let b = body.trim();
            let b = b.strip_prefix("hello from ").unwrap_or(b);
            b.split_whitespace().next().unwrap_or("?").to_string()
        }
    });
    Ok(Answer {
        status,
        body,
        pod,
        version,
        error,
        served_at,
        peer,
    })
}

/// The running counts and the lines printed.
#[derive(Default)]
struct Report {
    pods: BTreeMap<String, u64>,
    versions: BTreeMap<String, u64>,
    statuses: BTreeMap<u16, u64>,
    failed: u64,
    calls: u64,
}

impl Report {
    fn record(&mut self, i: u64, result: &anyhow::Result<Answer>, ms: u128, verbose: bool) {
        self.calls += 1;
        let mut line = format!("#{i} ");
        match result {
            Ok(a) => {
                let _ = write!(line, "{} answered by {} ({ms} ms)", a.status, a.pod);
                if let Some(v) = &a.version {
                    let _ = write!(line, " version {v}");
                    *self.versions.entry(v.clone()).or_default() += 1;
                }
                if let Some(e) = &a.error {
                    let _ = write!(line, " x-wasmesh-error {e}");
                }
                if verbose {
                    let _ = write!(
                        line,
                        " served at {} for {}",
                        a.served_at.as_deref().unwrap_or("?"),
                        a.peer.as_deref().unwrap_or("?")
                    );
                }
                *self.pods.entry(a.pod.clone()).or_default() += 1;
                *self.statuses.entry(a.status).or_default() += 1;
            }
            Err(e) => {
                self.failed += 1;
                let _ = write!(line, "failed after {ms} ms: {e:#}");
            }
        }
        line.push_str("  |");
        for (pod, n) in &self.pods {
            let _ = write!(line, " {pod}={n}");
        }
        if self.failed > 0 {
            let _ = write!(line, " failed={}", self.failed);
        }
        if !self.versions.is_empty() {
            line.push_str("  | versions");
            for (v, n) in &self.versions {
                let _ = write!(line, " {v}={n}");
            }
        }
        println!("{line}");
    }

    fn done(&self, connections: u64) {
        let mut line = format!(
            "done: {} calls, {} failed, answered by {} pods",
            self.calls,
            self.failed,
            self.pods.len()
        );
        if self.statuses.keys().any(|s| *s != 200) {
            line.push_str(", statuses");
            for (s, n) in &self.statuses {
                let _ = write!(line, " {s}={n}");
            }
        }
        if !self.versions.is_empty() {
            line.push_str(", versions");
            for (v, n) in &self.versions {
                let _ = write!(line, " {v}={n}");
            }
        }
        let _ = write!(line, ", {connections} connections");
        println!("{line}");
    }
}

pub async fn run(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let mut target = Target::from_uri(&args.url)?;
    if let Some(p) = &args.path {
        if !p.starts_with('/') {
            bail!("--path {p}: a path starts with /");
        }
        target.path = p.clone();
    }
    let mode = if args.h2 {
        Mode::H2
    } else if args.reuse {
        Mode::Reuse
    } else {
        Mode::Close
    };
    if args.concurrency > 1 && args.count.is_none() {
        bail!("--concurrency needs --count");
    }
    if args.concurrency > 1 && mode == Mode::Reuse {
        bail!("--reuse makes one call at a time (HTTP/1.1); use --h2 for concurrent calls");
    }
    let mut caller = Caller::new(target, mode, args.timeout);
    caller.headers = args.headers.clone();
    let caller = Arc::new(caller);
    if !args.wait.is_zero() {
        let deadline = Instant::now() + args.wait;
        loop {
            match caller.call().await {
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
        caller.reset().await;
    }
    let mut report = Report::default();
    if args.concurrency > 1 {
        let count = args.count.unwrap_or(0);
        let mut set = tokio::task::JoinSet::new();
        let mut next = 1u64;
        while next <= count || !set.is_empty() {
            while (set.len() as u64) < args.concurrency && next <= count {
                let c = caller.clone();
                let i = next;
                set.spawn(async move {
                    let start = Instant::now();
                    let r = c.call().await;
                    (i, r, start.elapsed().as_millis())
                });
                next += 1;
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            let (i, result, ms) = joined.context("a call's task")?;
            report.record(i, &result, ms, args.verbose);
            if result.is_err() && args.fail_fast {
                return Ok(ExitCode::FAILURE);
            }
        }
    } else {
        let mut i = 0u64;
        loop {
            i += 1;
            let start = Instant::now();
            let result = caller.call().await;
            report.record(i, &result, start.elapsed().as_millis(), args.verbose);
            if result.is_err() && args.fail_fast {
                return Ok(ExitCode::FAILURE);
            }
            if args.count.is_some_and(|n| i >= n) {
                break;
            }
            tokio::time::sleep(args.interval).await;
        }
    }
    report.done(caller.connections.load(Ordering::Relaxed));
    Ok(if report.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn fetch(args: FetchArgs) -> anyhow::Result<ExitCode> {
    let target = Target::from_uri(&args.url)?;
    let a = Caller::new(target, Mode::Close, args.timeout)
        .call()
        .await?;
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
