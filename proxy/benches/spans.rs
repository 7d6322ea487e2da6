//! What tracing costs one request on the proxy's worker, in both sidecars: the client
//! sidecar's span (no `traceparent` from the app: a new trace), its attributes, the
//! `traceparent` it adds, its end and queueing; then the server sidecar's span continuing it
//! from that header, its attributes, the `traceparent` it passes to the app, its end. The same
//! calls, with the same kinds of values, as `http/forward.rs` and `http/inbound.rs` make.
//!
//! Cases: every trace sampled (two spans recorded and queued), none sampled (ids and headers
//! only), and no tracer (the baseline: the header map work the loop does anyway), each timed
//! by the clock on the worker; and every trace sampled timed by the CPU the whole process used
//! (the worker's part plus the export thread's, which in a proxy runs on the same cores). The
//! spans go to a real export thread (`otel::export::start`) whose collector refuses the
//! connection, so each batch is assembled, its export refused, and dropped. At the end the
//! bench prints how many spans were dropped for a full queue (an export thread that did not
//! keep up would flatter the figures).
//!
//! `cargo bench -p wasmesh-proxy --bench spans`. The end-to-end cost (requests/s through a
//! sidecar pair) is `l7 --tracing` in `benches/`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use opentelemetry::trace::SpanKind;
use wasmesh_proxy::otel::config::Protocol;
use wasmesh_proxy::otel::propagation::TRACEPARENT;
use wasmesh_proxy::otel::sampler::{Root, Sampler};
use wasmesh_proxy::otel::{TraceConfig, Tracer, export};

/// The proxy's allocator (`proxy/src/main.rs`): what a span's allocations cost is its cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn tracer(sampler: Sampler) -> Arc<Tracer> {
    let cfg = TraceConfig {
        // Nothing listens there: each batch is encoded, its export refused, and dropped.
        endpoint: "http://127.0.0.1:9".into(),
        protocol: Protocol::Grpc,
        sampler,
        ..TraceConfig::default()
    };
    export::start(cfg, Arc::default()).expect("tracer")
}

/// A request's headers as an app sends them.
fn app_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "host",
        HeaderValue::from_static("backend.demo.svc.cluster.local"),
    );
    h.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    h.insert("accept", HeaderValue::from_static("*/*"));
    h
}

struct Values {
    path: String,
    service: Arc<str>,
    route: Arc<str>,
    pod: Arc<str>,
    endpoint: IpAddr,
    client: IpAddr,
}

/// Both sidecars' spans for one request; `headers` ends as the app's request (without
/// `traceparent`) again.
fn one_request(t: Option<&Arc<Tracer>>, headers: &mut HeaderMap, v: &Values) {
    // Client sidecar (forward.rs).
    let mut span = t.map(|t| t.start(SpanKind::Client, headers));
    if let Some(s) = span.as_mut() {
        s.set("http.request.method", "GET");
        s.set_str("url.path", &v.path);
        s.set("network.protocol.version", "2");
        s.name("GET");
    }
    if let Some(s) = span.as_mut()
        && s.is_sampled()
    {
        s.set("wasmesh.destination.service", v.service.clone());
        s.set_concat("server.address", &["backend", ".", "demo", ".svc"]);
        s.set("server.port", 80i64);
        s.set("http.route", v.route.clone());
        s.name_with_route("GET", &v.route);
    }
    if let Some(s) = span.as_ref() {
        s.inject(headers);
    }
    if let Some(s) = span.as_mut()
        && s.is_sampled()
    {
        s.put("network.peer.address", v.endpoint);
        s.put("network.peer.port", 8080i64);
        s.put("wasmesh.endpoint.pod", v.pod.clone());
    }
    // Server sidecar (inbound.rs), reading what the client sidecar sent.
    let mut server = t.map(|t| t.start(SpanKind::Server, headers));
    if let Some(s) = server.as_mut()
        && s.is_sampled()
    {
        s.set("http.request.method", "GET");
        s.set_str("url.path", &v.path);
        s.set("network.protocol.version", "2");
        s.set("server.port", 8080i64);
        s.set("client.address", v.client);
        s.set("network.peer.address", v.client);
        s.set("network.peer.port", 40000i64);
        s.name("GET");
    }
    if let Some(s) = server.as_ref() {
        s.inject(headers);
    }
    black_box(&*headers);
    if let Some(s) = server {
        s.end(Some(200), None);
    }
    if let Some(s) = span {
        s.end(Some(200), None);
    }
    headers.remove(&TRACEPARENT);
}

fn spans(c: &mut Criterion) {
    let v = Values {
        path: "/api/orders/42".into(),
        service: Arc::from("demo/backend:80"),
        route: Arc::from("demo/backend-route"),
        pod: Arc::from("demo/backend-7d9f-abcde"),
        endpoint: IpAddr::V4(Ipv4Addr::new(10, 244, 0, 12)),
        client: IpAddr::V4(Ipv4Addr::new(10, 244, 0, 11)),
    };
    let mut g = c.benchmark_group("one request, both sidecars");
    let mut headers = app_headers();
    g.bench_function("no tracer", |b| {
        b.iter(|| one_request(None, &mut headers, &v))
    });
    let all = tracer(Sampler::ParentBased(Root::AlwaysOn));
    g.bench_function("every trace sampled (2 spans)", |b| {
        b.iter(|| one_request(Some(&all), &mut headers, &v))
    });
    // The same, timed by the CPU the whole process used: the worker's part above plus the
    // export thread's (assembling, sending, dropping batches), which runs on the same cores as
    // the workers in a proxy.
    g.bench_function("every trace sampled, CPU of worker + export thread", |b| {
        b.iter_custom(|iters| {
            let start = process_cpu();
            for _ in 0..iters {
                one_request(Some(&all), &mut headers, &v);
            }
            process_cpu().saturating_sub(start)
        })
    });
    let none = tracer(Sampler::ParentBased(Root::AlwaysOff));
    g.bench_function("no trace sampled", |b| {
        b.iter(|| one_request(Some(&none), &mut headers, &v))
    });
    g.finish();
    // Whether the export thread kept up: a span dropped for a full queue costs the worker less
    // than one queued, and would flatter the figure.
    for (case, t) in [("every trace sampled", &all), ("no trace sampled", &none)] {
        let s = t.stats();
        eprintln!(
            "{case}: {} spans recorded, {} dropped for a full queue",
            s.spans.load(Ordering::Relaxed),
            s.dropped_queue_full.load(Ordering::Relaxed)
        );
    }
}

/// The CPU time of the whole process, all threads.
#[allow(unsafe_code)]
fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

criterion_group!(benches, spans);
criterion_main!(benches);
