//! The app and the load generator, on hyper. They run inside the pod namespaces as this same
//! binary (`l7 __serve`, `l7 __sat`, …, started by the orchestrator with `ip netns exec`) and
//! print one JSON line with their result. One tool measures every pair and both protocols, so
//! the figures differ only by what sits between the client and the app.
//!
//! - `__serve`: HTTP/1.1 and h2c (prior knowledge) on one port; every request gets `200` with
//!   a [`BODY`]-byte body.
//! - `__sat` (closed loop): HTTP/1.1 over `conns` keep-alive connections, one request at a time
//!   each; or HTTP/2 with `streams` concurrent streams on each of `conns` connections. Each
//!   sends its next request when the previous response (body included) arrived.
//! - `__lat` (open loop): `rate` requests/s spread over `conns` connections on a fixed
//!   schedule, kept by a thread of its own (`std::thread::sleep`, not the runtime's
//!   millisecond timer). Latency runs from each request's *scheduled* send time: over HTTP/1.1
//!   a late response delays the next request on its connection and that wait counts; over
//!   HTTP/2 every request is sent at its time on a new stream.
//!
//! Requests are `GET /bench` with `user-agent` and `accept` ([`Shape::Curl`]), or with only
//! what the protocol requires ([`Shape::Bare`]: the orchestrator's `--bare-requests`, passed
//! to the tools as `--shape bare`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use wasmesh_benches::harness::run::{Args, own_cpu, percentile, shared_tool, wait_http};

/// Size of a response body.
pub const BODY: usize = 64;
/// The Host (HTTP/1.1) and authority (HTTP/2) of every request: the Service's name.
const AUTHORITY: &str = "bench.default.svc.cluster.local";
const PATH: &str = "/bench";
/// The `user-agent` of a [`Shape::Curl`] request.
const USER_AGENT: &str = concat!("wasmesh-bench/", env!("CARGO_PKG_VERSION"));

/// HTTP/1.1 or HTTP/2 (h2c with prior knowledge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Proto {
    H1,
    H2,
}

impl std::str::FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "h1" => Ok(Self::H1),
            "h2" => Ok(Self::H2),
            other => Err(format!("unknown protocol {other} (h1 or h2)")),
        }
    }
}

/// What a request carries beside what its protocol requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Shape {
    /// `user-agent` and `accept: */*`, the two headers curl sends: a real client's request
    /// always has a few (gRPC's have four).
    Curl,
    /// Only what the protocol requires: `Host` over HTTP/1.1, the pseudo-headers over HTTP/2
    /// (every request of this bench before session 14). Over HTTP/2 such a request reaches
    /// the proxy with an empty header map, where every lookup returns at once without hashing
    /// the name — until something adds a header on the way (the tracing pairs'
    /// `traceparent`), which then costs each later lookup its hash: a cost no real client's
    /// requests escape, charged to tracing alone.
    Bare,
}

impl std::str::FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "curl" => Ok(Self::Curl),
            "bare" => Ok(Self::Bare),
            other => Err(format!("unknown request shape {other} (curl or bare)")),
        }
    }
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Self::Curl => "curl",
            Self::Bare => "bare",
        }
    }

    /// For the report's settings line.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Curl => "with user-agent and accept",
            Self::Bare => "bare (--bare-requests)",
        }
    }
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Self::H1 => "h1",
            Self::H2 => "h2",
        }
    }
}

/// Runs one tool; `cmd` is the subcommand without its leading `__`.
pub fn main(cmd: &str, args: &[String]) -> anyhow::Result<()> {
    if let Some(done) = shared_tool(cmd, args) {
        return done;
    }
    let a = Args::parse(args)?;
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let json = match cmd {
        "serve" => {
            rt()?.block_on(serve(
                a.get("listen")?,
                Duration::from_secs(a.get("max-secs")?),
            ))?;
            return Ok(());
        }
        "sat" => serde_json::to_string(&rt()?.block_on(saturate(
            a.get("to")?,
            a.get("proto")?,
            a.get("shape")?,
            a.get("conns")?,
            a.get("streams")?,
            Duration::from_secs_f64(a.get("secs")?),
        ))?)?,
        "lat" => serde_json::to_string(&latency(
            a.get("to")?,
            a.get("proto")?,
            a.get("shape")?,
            a.get("rate")?,
            a.get("conns")?,
            Duration::from_secs_f64(a.get("secs")?),
            Duration::from_secs_f64(a.get("warmup")?),
        )?)?,
        "probe" => {
            rt()?.block_on(probe(a.get("to")?, Duration::from_secs_f64(a.get("secs")?)))?;
            return Ok(());
        }
        "wait-http" => {
            wait_http(
                a.get("addr")?,
                &a.get::<String>("path")?,
                Duration::from_secs_f64(a.get("secs")?),
            )?;
            return Ok(());
        }
        other => bail!("unknown tool __{other}"),
    };
    println!("{json}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The app

async fn serve(listen: SocketAddr, lifetime: Duration) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let body = Bytes::from(vec![b'x'; BODY]);
    // The server never outlives a run, even if the orchestrator is killed.
    let deadline = tokio::time::sleep(lifetime);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return Ok(()),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let body = body.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

type ReqBody = Empty<Bytes>;

/// A connection's request sender.
#[derive(Clone)]
enum Sender {
    H1(Arc<tokio::sync::Mutex<http1::SendRequest<ReqBody>>>),
    H2(http2::SendRequest<ReqBody>),
}

async fn connect(to: SocketAddr, proto: Proto) -> anyhow::Result<Sender> {
    let s = TcpStream::connect(to)
        .await
        .with_context(|| format!("connecting to {to}"))?;
    s.set_nodelay(true)?;
    let io = TokioIo::new(s);
    Ok(match proto {
        Proto::H1 => {
            let (tx, conn) = http1::handshake(io).await?;
            tokio::spawn(conn);
            Sender::H1(Arc::new(tokio::sync::Mutex::new(tx)))
        }
        Proto::H2 => {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await?;
            tokio::spawn(conn);
            Sender::H2(tx)
        }
    })
}

fn request(proto: Proto, shape: Shape) -> Request<ReqBody> {
    let b = Request::get(PATH);
    let b = match proto {
        Proto::H1 => b.header(http::header::HOST, AUTHORITY),
        Proto::H2 => b.uri(format!("http://{AUTHORITY}{PATH}")),
    };
    match shape {
        // Static values: the load generator neither checks nor copies them per request.
        Shape::Curl => b
            .header(
                http::header::USER_AGENT,
                HeaderValue::from_static(USER_AGENT),
            )
            .header(http::header::ACCEPT, HeaderValue::from_static("*/*")),
        Shape::Bare => b,
    }
    .body(Empty::new())
    .expect("a valid request")
}

/// One request and its whole response; Err says what went wrong (the proxy's
/// `x-wasmesh-error` when it answered itself).
async fn one(tx: &Sender, proto: Proto, shape: Shape) -> Result<(), String> {
    let resp = match tx {
        Sender::H1(m) => {
            let mut tx = m.lock().await;
            tx.ready().await.map_err(|e| e.to_string())?;
            tx.send_request(request(proto, shape)).await
        }
        Sender::H2(tx) => {
            let mut tx = tx.clone();
            tx.ready().await.map_err(|e| e.to_string())?;
            tx.send_request(request(proto, shape)).await
        }
    }
    .map_err(|e| e.to_string())?;
    let status = resp.status();
    let why = resp
        .headers()
        .get("x-wasmesh-error")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(format!("status {status} {}", why.unwrap_or_default()));
    }
    if body.len() != BODY {
        return Err(format!("body of {} bytes, expected {BODY}", body.len()));
    }
    Ok(())
}

/// Sends one request through the path until it succeeds, or fails after `max`.
async fn probe(to: SocketAddr, max: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + max;
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = async {
            let tx = connect(to, Proto::H1).await.map_err(|e| format!("{e:#}"))?;
            one(&tx, Proto::H1, Shape::Curl).await
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e,
            Err(_) => last = "no response within 2 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no 200 through {to} within {max:?} (last: {last})")
}

// ---------------------------------------------------------------------------------------------
// Saturation (closed loop)

#[derive(Debug, Serialize)]
pub struct SatResult {
    pub proto: Proto,
    pub conns: usize,
    /// Concurrent requests per connection (1 for HTTP/1.1).
    pub streams: usize,
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub secs: f64,
    pub per_s: f64,
    pub client_cpu_s: f64,
}

async fn saturate(
    to: SocketAddr,
    proto: Proto,
    shape: Shape,
    conns: usize,
    streams: usize,
    secs: Duration,
) -> anyhow::Result<SatResult> {
    let streams = if proto == Proto::H1 {
        1
    } else {
        streams.max(1)
    };
    let mut senders = Vec::new();
    for _ in 0..conns.max(1) {
        senders.push(connect(to, proto).await?);
    }
    let start = Instant::now();
    let stop = start + secs;
    let mut tasks = tokio::task::JoinSet::new();
    for tx in &senders {
        for _ in 0..streams {
            let tx = tx.clone();
            tasks.spawn(async move {
                let (mut done, mut errors, mut first_error) = (0u64, 0u64, None);
                while Instant::now() < stop {
                    match tokio::time::timeout(Duration::from_secs(5), one(&tx, proto, shape)).await
                    {
                        Ok(Ok(())) => done += 1,
                        Ok(Err(e)) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                        Err(_) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| "no response within 5 s".into());
                        }
                    }
                    if errors > 100 {
                        break;
                    }
                }
                (done, errors, first_error)
            });
        }
    }
    let (mut requests, mut errors, mut first_error) = (0, 0, None);
    while let Some(r) = tasks.join_next().await {
        let (d, e, f) = r?;
        requests += d;
        errors += e;
        first_error = first_error.or(f);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(SatResult {
        proto,
        conns,
        streams,
        requests,
        errors,
        first_error,
        secs,
        per_s: requests as f64 / secs,
        client_cpu_s: own_cpu(),
    })
}

// ---------------------------------------------------------------------------------------------
// Latency at a fixed rate (open loop)

#[derive(Debug, Serialize)]
pub struct LatencyResult {
    pub proto: Proto,
    pub rate: f64,
    pub conns: usize,
    pub samples: usize,
    /// From each request's scheduled send time until its whole response arrived, µs.
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// From the moment each request was actually handed to hyper (the network and proxies).
    pub service_p50_us: f64,
    pub service_p99_us: f64,
    /// How late requests were handed to hyper after their scheduled time (the scheduler
    /// thread's wake-up, the hand-over, a busy core, an HTTP/1.1 connection still waiting), p99.
    pub send_lag_p99_us: f64,
    pub errors: usize,
    pub first_error: Option<String>,
    pub client_cpu_s: f64,
}

/// (total, service, lag) in µs, one per measured request.
type Samples = Arc<Mutex<Vec<(f64, f64, f64)>>>;

fn latency(
    to: SocketAddr,
    proto: Proto,
    shape: Shape,
    rate: f64,
    conns: usize,
    secs: Duration,
    warmup: Duration,
) -> anyhow::Result<LatencyResult> {
    let conns = conns.max(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let senders = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..conns {
            v.push(connect(to, proto).await?);
        }
        Ok::<_, anyhow::Error>(v)
    })?;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let t0 = Instant::now() + Duration::from_millis(200);
    let measure_from = t0 + warmup;
    let end = measure_from + secs;
    // The schedule: request k at t0 + k × interval, on connection k mod conns.
    let mut queues = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..conns {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        queues.push(tx);
        receivers.push(rx);
    }
    let ticker = std::thread::spawn(move || {
        for k in 0u32.. {
            let scheduled = t0 + interval * k;
            if scheduled >= end {
                break;
            }
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            if queues[k as usize % queues.len()].send(scheduled).is_err() {
                break;
            }
        }
    });
    let samples: Samples = Arc::default();
    let errors = Arc::new(Mutex::new((0usize, None::<String>)));
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (tx, mut rx) in senders.into_iter().zip(receivers) {
            let samples = samples.clone();
            let errors = errors.clone();
            tasks.spawn(async move {
                let mut streams = tokio::task::JoinSet::new();
                while let Some(scheduled) = rx.recv().await {
                    let (tx, samples, errors) = (tx.clone(), samples.clone(), errors.clone());
                    let send = async move {
                        let sent = Instant::now();
                        let r =
                            tokio::time::timeout(Duration::from_secs(5), one(&tx, proto, shape))
                                .await
                                .unwrap_or_else(|_| Err("no response within 5 s".into()));
                        let done = Instant::now();
                        match r {
                            Ok(()) if scheduled >= measure_from => {
                                samples.lock().unwrap_or_else(|e| e.into_inner()).push((
                                    (done - scheduled).as_secs_f64() * 1e6,
                                    (done - sent).as_secs_f64() * 1e6,
                                    sent.saturating_duration_since(scheduled).as_secs_f64() * 1e6,
                                ));
                            }
                            Ok(()) => {}
                            Err(e) => {
                                let mut g = errors.lock().unwrap_or_else(|e| e.into_inner());
                                g.0 += 1;
                                g.1.get_or_insert(e);
                            }
                        }
                    };
                    match proto {
                        // One request at a time per connection: the next waits its turn.
                        Proto::H1 => send.await,
                        // A new stream at the scheduled time, whatever is outstanding.
                        Proto::H2 => {
                            streams.spawn(send);
                        }
                    }
                }
                while streams.join_next().await.is_some() {}
            });
        }
        while tasks.join_next().await.is_some() {}
    });
    ticker
        .join()
        .map_err(|_| anyhow::anyhow!("the scheduler thread panicked"))?;
    let all = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    let (errors, first_error) =
        std::mem::take(&mut *errors.lock().unwrap_or_else(|e| e.into_inner()));
    let mut total: Vec<f64> = all.iter().map(|s| s.0).collect();
    let mut service: Vec<f64> = all.iter().map(|s| s.1).collect();
    let mut lag: Vec<f64> = all.iter().map(|s| s.2).collect();
    for v in [&mut total, &mut service, &mut lag] {
        v.sort_by(f64::total_cmp);
    }
    Ok(LatencyResult {
        proto,
        rate,
        conns,
        samples: total.len(),
        p50_us: percentile(&total, 0.50),
        p90_us: percentile(&total, 0.90),
        p99_us: percentile(&total, 0.99),
        p999_us: percentile(&total, 0.999),
        max_us: total.last().copied().unwrap_or(0.0),
        service_p50_us: percentile(&service, 0.50),
        service_p99_us: percentile(&service, 0.99),
        send_lag_p99_us: percentile(&lag, 0.99),
        errors,
        first_error,
        client_cpu_s: own_cpu(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An app that answers like [`serve`]'s and keeps the regular headers of each request.
    async fn recording_app() -> (SocketAddr, Arc<Mutex<Vec<Vec<String>>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("address");
        let seen: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let names = req
                                .headers()
                                .iter()
                                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                                .collect();
                            record.lock().expect("lock").push(names);
                            async {
                                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vec![
                                    b'x';
                                    BODY
                                ]))))
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn requests_carry_what_their_shape_says() {
        let (addr, seen) = recording_app().await;
        let ua = format!("user-agent: {USER_AGENT}");
        for proto in [Proto::H1, Proto::H2] {
            for shape in [Shape::Curl, Shape::Bare] {
                let tx = connect(addr, proto).await.expect("connects");
                one(&tx, proto, shape)
                    .await
                    .expect("a 200 with the whole body");
                let mut got = seen
                    .lock()
                    .expect("lock")
                    .pop()
                    .expect("the app saw the request");
                got.sort();
                let mut want = match shape {
                    Shape::Curl => vec!["accept: */*".to_string(), ua.clone()],
                    Shape::Bare => vec![],
                };
                if proto == Proto::H1 {
                    want.push(format!("host: {AUTHORITY}"));
                    want.sort();
                }
                assert_eq!(got, want, "{proto:?} {shape:?}");
            }
        }
    }
}
