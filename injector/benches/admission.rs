//! Admission latency over HTTPS on loopback: the real server (rustls + hyper) on 127.0.0.1:0
//! with a test CA, a real AdmissionReview (a Deployment's pod, injected every time), many
//! concurrent keep-alive connections, a bounded number of requests. Prints p50/p90/p99/max.
//!
//! ```text
//! cargo bench -p wasmesh-injector --bench admission
//! WASMESH_BENCH_REQUESTS=20000 WASMESH_BENCH_CONCURRENCY=200 cargo bench -p wasmesh-injector --bench admission
//! ```
//!
//! Runs, in order:
//! - the handler alone (`webhook::review`, no HTTP, no TLS), one thread: the CPU cost of a
//!   review;
//! - the closed loop at the configured concurrency: every connection sends its next review as
//!   soon as the previous answer arrives, so the server is saturated and latency is queueing
//!   (concurrency / throughput);
//! - open loops at fixed rates over the same number of connections (`WASMESH_BENCH_RATES`,
//!   requests per second, comma-separated): connection `i` sends its `k`-th review at
//!   `(i + k * concurrency) / rate` seconds, so each connection sends every
//!   `concurrency / rate` seconds (200 ms at 1000/s) — much longer than any answer takes, so
//!   no request waits for the one before it and latency is counted from the send;
//! - one connection alone: the service time.
//!
//! Client and server share this machine's cores. Figures: docs/benchmarks.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{Client, TestCa, fixture, write_pair};
use wasmesh_injector::config::Config;
use wasmesh_injector::server::{self, ServerConfig};
use wasmesh_injector::tls::CertFiles;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Figures {
    requests: usize,
    concurrency: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Figures {
    fn percentile(&self, p: f64) -> Duration {
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(i).copied().unwrap_or_default()
    }

    fn print(&self, label: &str) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{label}: {} requests, {} concurrent, {:.0} req/s, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.requests,
            self.concurrency,
            self.requests as f64 / self.elapsed.as_secs_f64(),
            ms(self.percentile(0.50)),
            ms(self.percentile(0.90)),
            ms(self.percentile(0.99)),
            ms(self.latencies.last().copied().unwrap_or_default()),
        );
    }
}

async fn load(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    body: Arc<Vec<u8>>,
    requests: usize,
    concurrency: usize,
) -> Figures {
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        clients.push(Client::connect(addr, tls.clone()).await);
    }
    let per = requests / concurrency;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for mut client in clients {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                let reply = client
                    .post_json("/inject/namespace-enabled", body.as_ref().clone())
                    .await;
                latencies.push(t.elapsed());
                assert_eq!(reply.status.as_u16(), 200);
            }
            latencies
        }));
    }
    let mut latencies = Vec::with_capacity(per * concurrency);
    for t in tasks {
        latencies.extend(t.await.expect("client task"));
    }
    let elapsed = start.elapsed();
    latencies.sort();
    Figures {
        requests: latencies.len(),
        concurrency,
        elapsed,
        latencies,
    }
}

/// `rate` requests per second spread over `concurrency` connections.
async fn load_at_rate(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    body: Arc<Vec<u8>>,
    requests: usize,
    concurrency: usize,
    rate: f64,
) -> Figures {
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        clients.push(Client::connect(addr, tls.clone()).await);
    }
    let per = requests / concurrency;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(concurrency);
    for (i, mut client) in clients.into_iter().enumerate() {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per);
            for k in 0..per {
                let at = start + interval.mul_f64((i + k * concurrency) as f64);
                tokio::time::sleep_until(at).await;
                let sent = Instant::now();
                let reply = client
                    .post_json("/inject/namespace-enabled", body.as_ref().clone())
                    .await;
                latencies.push(sent.elapsed());
                assert_eq!(reply.status.as_u16(), 200);
            }
            latencies
        }));
    }
    let mut latencies = Vec::with_capacity(per * concurrency);
    for t in tasks {
        latencies.extend(t.await.expect("client task"));
    }
    let elapsed = start.elapsed();
    latencies.sort();
    Figures {
        requests: latencies.len(),
        concurrency,
        elapsed,
        latencies,
    }
}

fn main() {
    let requests = env("WASMESH_BENCH_REQUESTS", 20_000);
    let concurrency = env("WASMESH_BENCH_CONCURRENCY", 200).max(1);
    let rates: Vec<f64> = std::env::var("WASMESH_BENCH_RATES")
        .unwrap_or_else(|_| "1000,5000,10000".to_owned())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .filter(|r: &f64| *r > 0.0)
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let ca = TestCa::new("bench CA");
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = ca.issue("bench");
        let (cert, key) = write_pair(dir.path(), &cert, &key);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(server::run(
            listener,
            ServerConfig::new(CertFiles { cert, key }, Config::default()),
            async {
                let _ = stopped.await;
            },
        ));
        let tls = ca.client_config();
        let body = Arc::new(fixture("deployment-pod-review.json"));
        println!(
            "injector admission latency: POST /inject/namespace-enabled, {} byte AdmissionReview (a Deployment's pod, injected), HTTPS (TLS 1.3, HTTP/1.1 keep-alive) on loopback, {} cores",
            body.len(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        // The handler alone, no HTTP or TLS: what one review costs in CPU.
        let config = Config::default();
        let rounds = 5_000;
        let start = Instant::now();
        for _ in 0..rounds {
            let reviewed = wasmesh_injector::webhook::review(
                &body,
                wasmesh_injector::mutate::NamespaceInjection::Enabled,
                &config,
            )
            .expect("review");
            std::hint::black_box(reviewed);
        }
        println!(
            "handler only: {:.1} µs per review ({} reviews, one thread)",
            start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds),
            rounds
        );
        // Warm-up.
        load(addr, tls.clone(), body.clone(), 2_000.min(requests), concurrency.min(50)).await;
        load(addr, tls.clone(), body.clone(), requests, concurrency)
            .await
            .print("closed loop");
        for rate in rates {
            let n = ((rate * 5.0) as usize).clamp(concurrency, requests);
            load_at_rate(addr, tls.clone(), body.clone(), n, concurrency, rate)
                .await
                .print(&format!("open loop at {rate:.0}/s"));
        }
        load(addr, tls.clone(), body.clone(), (requests / 4).max(1), 1)
            .await
            .print("one connection");
        let _ = stop.send(());
        let _ = server.await;
    });
}
