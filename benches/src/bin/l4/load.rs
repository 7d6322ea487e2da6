//! The server and the load generators. They run inside the pod namespaces as this same binary
//! (`l4 __serve`, `l4 __bulk`, …, started by the orchestrator with `ip netns exec`) and print
//! one JSON line with their result.
//!
//! The server speaks a one-byte protocol: the first byte of a connection picks the mode.
//! - `B` (bulk): read and discard until EOF, then answer the byte count (8 bytes, big-endian).
//!   The client computes throughput from what the server really received, so bytes still in
//!   flight when the client stops writing are counted only once they arrive.
//! - `E` (echo): read 64-byte messages and send each back, until EOF.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wasmesh_benches::harness::run::{Args, own_cpu, percentile, shared_tool, wait_http};

/// Size of a request and of a response.
pub const MSG: usize = 64;
const BULK_WRITE: usize = 128 * 1024;

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
        "bulk" => serde_json::to_string(&rt()?.block_on(bulk(
            a.get("to")?,
            a.get("streams")?,
            Duration::from_secs_f64(a.get("secs")?),
        ))?)?,
        "conns" => serde_json::to_string(&rt()?.block_on(conns(
            a.get("to")?,
            a.get("count")?,
            a.get("concurrency")?,
            Duration::from_secs_f64(a.get("secs")?),
        ))?)?,
        "rr" => serde_json::to_string(&rt()?.block_on(rr(
            a.get("to")?,
            a.get("conns")?,
            Duration::from_secs_f64(a.get("secs")?),
        ))?)?,
        "latency" => serde_json::to_string(&latency(
            a.get("to")?,
            a.get("rate")?,
            a.get("conns")?,
            Duration::from_secs_f64(a.get("secs")?),
            Duration::from_secs_f64(a.get("warmup")?),
        )?)?,
        "wait-http" => {
            wait_http(
                a.get("addr")?,
                &a.get::<String>("path")?,
                Duration::from_secs_f64(a.get("secs")?),
            )?;
            return Ok(());
        }
        "probe" => {
            probe(a.get("to")?, Duration::from_secs_f64(a.get("secs")?))?;
            return Ok(());
        }
        other => bail!("unknown tool __{other}"),
    };
    println!("{json}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Server

async fn serve(listen: SocketAddr, lifetime: Duration) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    // The server never outlives a run, even if the orchestrator is killed.
    let deadline = tokio::time::sleep(lifetime);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return Ok(()),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                tokio::spawn(async move {
                    let _ = handle(stream).await;
                });
            }
        }
    }
}

async fn handle(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode).await?;
    match mode[0] {
        b'B' => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            loop {
                let r = s.read(&mut buf).await?;
                if r == 0 {
                    break;
                }
                n += r as u64;
            }
            s.write_all(&n.to_be_bytes()).await?;
        }
        b'E' => {
            let mut m = [0u8; MSG];
            while s.read_exact(&mut m).await.is_ok() {
                s.write_all(&m).await?;
            }
        }
        _ => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bulk throughput

#[derive(Debug, Serialize, Deserialize)]
pub struct BulkResult {
    pub streams: usize,
    /// Bytes the server received, all streams.
    pub bytes: u64,
    /// From the start until the last stream's count came back.
    pub secs: f64,
    pub gbit_per_s: f64,
    pub client_cpu_s: f64,
}

async fn bulk(to: SocketAddr, streams: usize, secs: Duration) -> anyhow::Result<BulkResult> {
    let start = Instant::now();
    let stop_writing = start + secs;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams.max(1) {
        tasks.spawn(async move {
            let run = async {
                let mut s = TcpStream::connect(to).await?;
                s.write_all(b"B").await?;
                let buf = vec![0x5au8; BULK_WRITE];
                while Instant::now() < stop_writing {
                    s.write_all(&buf).await?;
                }
                s.shutdown().await?;
                let mut count = [0u8; 8];
                s.read_exact(&mut count).await?;
                Ok::<_, std::io::Error>((u64::from_be_bytes(count), start.elapsed()))
            };
            tokio::time::timeout(secs + Duration::from_secs(30), run).await
        });
    }
    let mut bytes = 0;
    let mut longest = Duration::ZERO;
    while let Some(r) = tasks.join_next().await {
        let (n, took) = r?
            .context("a bulk stream did not finish in time")?
            .context("a bulk stream failed")?;
        bytes += n;
        longest = longest.max(took);
    }
    let secs = longest.as_secs_f64();
    Ok(BulkResult {
        streams,
        bytes,
        secs,
        gbit_per_s: bytes as f64 * 8.0 / secs / 1e9,
        client_cpu_s: own_cpu(),
    })
}

// ---------------------------------------------------------------------------------------------
// New connections per second

#[derive(Debug, Serialize, Deserialize)]
pub struct ConnsResult {
    pub ok: usize,
    pub failed: usize,
    pub secs: f64,
    pub per_s: f64,
    /// One connection: connect, request, response (close not included), microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Connections per second over the first and the last quarter of the connections: a
    /// cost that grows with the sockets left in TIME_WAIT shows as a falling rate.
    pub first_quarter_per_s: f64,
    pub last_quarter_per_s: f64,
    pub client_cpu_s: f64,
    pub first_error: Option<String>,
}

/// `concurrency` workers, each: connect, send one request, read the response, close; until
/// `count` connections were made or `max` has passed.
async fn conns(
    to: SocketAddr,
    count: usize,
    concurrency: usize,
    max: Duration,
) -> anyhow::Result<ConnsResult> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + max;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let next = next.clone();
        tasks.spawn(async move {
            let mut took = Vec::new();
            let mut finished = Vec::new();
            let mut failed = 0usize;
            let mut first_error = None;
            while next.fetch_add(1, Ordering::Relaxed) < count && Instant::now() < deadline {
                let t = Instant::now();
                let one = async {
                    let mut s = TcpStream::connect(to).await?;
                    s.set_nodelay(true)?;
                    let mut req = [0x42u8; MSG + 1];
                    req[0] = b'E';
                    s.write_all(&req).await?;
                    let mut resp = [0u8; MSG];
                    s.read_exact(&mut resp).await?;
                    Ok::<_, std::io::Error>(())
                };
                match tokio::time::timeout(Duration::from_secs(2), one).await {
                    Ok(Ok(())) => {
                        took.push(t.elapsed().as_secs_f64() * 1e6);
                        finished.push((t.elapsed() + (t - start)).as_secs_f64());
                    }
                    Ok(Err(e)) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                    Err(_) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| "timed out after 2 s".into());
                    }
                }
            }
            (took, finished, failed, first_error)
        });
    }
    let mut all = Vec::new();
    let mut done_at = Vec::new();
    let mut failed = 0;
    let mut first_error = None;
    while let Some(r) = tasks.join_next().await {
        let (t, d, f, e) = r?;
        all.extend(t);
        done_at.extend(d);
        failed += f;
        first_error = first_error.or(e);
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    done_at.sort_by(f64::total_cmp);
    let q = done_at.len() / 4;
    let (first_quarter_per_s, last_quarter_per_s) = if q > 0 {
        let n = done_at.len();
        (
            q as f64 / done_at[q - 1].max(1e-9),
            q as f64 / (done_at[n - 1] - done_at[n - 1 - q]).max(1e-9),
        )
    } else {
        (0.0, 0.0)
    };
    Ok(ConnsResult {
        ok: all.len(),
        failed,
        secs,
        per_s: all.len() as f64 / secs,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
        first_quarter_per_s,
        last_quarter_per_s,
        client_cpu_s: own_cpu(),
        first_error,
    })
}

// ---------------------------------------------------------------------------------------------
// Requests per second on persistent connections (closed loop)

#[derive(Debug, Serialize, Deserialize)]
pub struct RrResult {
    pub conns: usize,
    pub requests: u64,
    pub secs: f64,
    pub per_s: f64,
    pub client_cpu_s: f64,
}

/// `n` connections, each sending a request as soon as the previous response arrived.
async fn rr(to: SocketAddr, n: usize, secs: Duration) -> anyhow::Result<RrResult> {
    let start = Instant::now();
    let stop = start + secs;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n.max(1) {
        tasks.spawn(async move {
            let run = async {
                let mut s = TcpStream::connect(to).await?;
                s.set_nodelay(true)?;
                s.write_all(b"E").await?;
                let req = [0x42u8; MSG];
                let mut resp = [0u8; MSG];
                let mut done = 0u64;
                while Instant::now() < stop {
                    s.write_all(&req).await?;
                    s.read_exact(&mut resp).await?;
                    done += 1;
                }
                Ok::<_, std::io::Error>(done)
            };
            tokio::time::timeout(secs + Duration::from_secs(10), run).await
        });
    }
    let mut requests = 0;
    while let Some(r) = tasks.join_next().await {
        requests += r?
            .context("a connection did not finish in time")?
            .context("a connection failed")?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(RrResult {
        conns: n,
        requests,
        secs,
        per_s: requests as f64 / secs,
        client_cpu_s: own_cpu(),
    })
}

// ---------------------------------------------------------------------------------------------
// Latency at a fixed rate

#[derive(Debug, Serialize, Deserialize)]
pub struct LatencyResult {
    pub rate: f64,
    pub conns: usize,
    pub samples: usize,
    /// From the time each request was *scheduled* to be sent until its response arrived: a
    /// response that is late delays the next request on its connection, and that wait counts
    /// (no coordinated omission). Microseconds.
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// From the moment each request was actually written (the network and proxies only).
    pub service_p50_us: f64,
    pub service_p99_us: f64,
    /// How late the sender woke up for its scheduled time (timer slack, a busy core), p99.
    pub send_lag_p99_us: f64,
    pub errors: usize,
    pub client_cpu_s: f64,
}

/// `rate` requests per second in total over `conns` persistent connections, each connection
/// on its own thread with a fixed schedule (offset so the connections interleave).
fn latency(
    to: SocketAddr,
    rate: f64,
    conns: usize,
    secs: Duration,
    warmup: Duration,
) -> anyhow::Result<LatencyResult> {
    let conns = conns.max(1);
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let t0 = Instant::now() + Duration::from_millis(200);
    let measure_from = t0 + warmup;
    let end = measure_from + secs;
    let hard_end = end + Duration::from_secs(10);
    let mut threads = Vec::new();
    for c in 0..conns {
        threads.push(std::thread::spawn(move || -> anyhow::Result<_> {
            let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"E")?;
            let req = [0x42u8; MSG];
            let mut resp = [0u8; MSG];
            let (mut total, mut service, mut lag) = (Vec::new(), Vec::new(), Vec::new());
            let mut errors = 0usize;
            let offset = interval.mul_f64(c as f64 / conns as f64);
            for k in 0u32.. {
                let scheduled = t0 + offset + interval * k;
                if scheduled >= end || Instant::now() >= hard_end {
                    break;
                }
                let now = Instant::now();
                if scheduled > now {
                    std::thread::sleep(scheduled - now);
                }
                let sent = Instant::now();
                if s.write_all(&req)
                    .and_then(|_| s.read_exact(&mut resp))
                    .is_err()
                {
                    errors += 1;
                    break;
                }
                let done = Instant::now();
                if scheduled >= measure_from {
                    total.push((done - scheduled).as_secs_f64() * 1e6);
                    service.push((done - sent).as_secs_f64() * 1e6);
                    lag.push((sent.saturating_duration_since(scheduled)).as_secs_f64() * 1e6);
                }
            }
            Ok((total, service, lag, errors))
        }));
    }
    let (mut total, mut service, mut lag) = (Vec::new(), Vec::new(), Vec::new());
    let mut errors = 0;
    for t in threads {
        let (a, b, c, e) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a latency thread panicked"))??;
        total.extend(a);
        service.extend(b);
        lag.extend(c);
        errors += e;
    }
    for v in [&mut total, &mut service, &mut lag] {
        v.sort_by(f64::total_cmp);
    }
    Ok(LatencyResult {
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
        client_cpu_s: own_cpu(),
    })
}

// ---------------------------------------------------------------------------------------------
// Readiness

/// Sends one echo request through the path until it succeeds, or fails after `max`.
fn probe(to: SocketAddr, max: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + max;
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = || -> std::io::Result<()> {
            let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut req = [0x42u8; MSG + 1];
            req[0] = b'E';
            s.write_all(&req)?;
            let mut resp = [0u8; MSG];
            s.read_exact(&mut resp)
        };
        match attempt() {
            Ok(()) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("no echo through {to} within {max:?} (last error: {last})")
}
