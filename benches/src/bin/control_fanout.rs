//! Control at scale: 10,000 Services and 100,000 endpoints, 1,000 subscribed proxies.
//!
//! Measures, in one run:
//! - control's resident memory with the table loaded, and with 1,000 proxies subscribed;
//! - the time to build the model and the first encoded table, and to build one snapshot;
//! - the fan-out: from one EndpointSlice change entering control until the delta has reached
//!   every one of 1,000 subscribers (real gRPC streams over loopback, each its own connection);
//! - the work of one change inside control for a table of 1,000 and of 10,000 Services
//!   (it should not grow with the table).
//!
//! Control runs in a child process (this binary, `serve` mode), so its memory is its own; the
//! subscribers run here and decode only the header of each message.
//!
//! `cargo run --release -p wasmesh-benches --bin control-fanout [-- --services 10000
//! --endpoints-per-service 10 --subscribers 1000 --changes 200]`

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Node, Pod, PodSpec, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::Mutex;
use wasmesh_api::WatchRequest;
use wasmesh_control::discovery::hub::Hub;
use wasmesh_control::model::Model;
use wasmesh_control::source::{Event, Kind, Object};

#[derive(Debug, Clone, Copy)]
struct Params {
    services: usize,
    per_service: usize,
    subscribers: usize,
    changes: usize,
}

fn params(args: &[String]) -> anyhow::Result<Params> {
    let mut p = Params {
        services: 10_000,
        per_service: 10,
        subscribers: 1_000,
        changes: 200,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> anyhow::Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--services" => p.services = num(a)?,
            "--endpoints-per-service" => p.per_service = num(a)?,
            "--subscribers" => p.subscribers = num(a)?,
            "--changes" => p.changes = num(a)?,
            _ => bail!("unknown argument {a}"),
        }
    }
    Ok(p)
}

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(ns.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

fn ns_of(i: usize) -> String {
    format!("team-{}", i % 50)
}

fn endpoint_ip(i: usize, j: usize, per: usize) -> String {
    let n = (i * per + j) as u32;
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + n).to_string()
}

/// The synthetic cluster: Services with one slice each, the Pods behind them, and nodes.
fn cluster(p: Params) -> Vec<Event> {
    let mut services = Vec::with_capacity(p.services);
    let mut slices = Vec::with_capacity(p.services);
    let mut pods = Vec::with_capacity(p.services * p.per_service);
    for i in 0..p.services {
        let ns = ns_of(i);
        let name = format!("svc-{i}");
        let vip =
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 96, 0, 10)) + i as u32);
        services.push(Object::Service(Service {
            metadata: meta(&ns, &name),
            spec: Some(ServiceSpec {
                cluster_ip: Some(vip.to_string()),
                cluster_ips: Some(vec![vip.to_string()]),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        }));
        slices.push(Object::EndpointSlice(slice(p, i, 0)));
        for j in 0..p.per_service {
            let mut m = meta(&ns, &format!("{name}-{j}"));
            m.labels = Some(
                [
                    ("app".to_string(), name.clone()),
                    ("pod-template-hash".to_string(), "5d8f7c9b4".to_string()),
                ]
                .into_iter()
                .collect(),
            );
            pods.push(Object::Pod(Pod {
                metadata: m,
                spec: Some(PodSpec {
                    service_account_name: Some(name.clone()),
                    ..Default::default()
                }),
                status: None,
            }));
        }
    }
    let nodes = (0..100)
        .map(|n| {
            let mut m = ObjectMeta {
                name: Some(format!("node-{n}")),
                ..Default::default()
            };
            m.labels = Some(
                [(
                    "topology.kubernetes.io/zone".to_string(),
                    format!("zone-{}", n % 3),
                )]
                .into_iter()
                .collect(),
            );
            Object::Node(Node {
                metadata: m,
                ..Default::default()
            })
        })
        .collect();
    let mut events = Vec::new();
    for (kind, objects) in [
        (Kind::Node, nodes),
        (Kind::Pod, pods),
        (Kind::Service, services),
        (Kind::EndpointSlice, slices),
        (Kind::HttpRoute, Vec::new()),
        (Kind::WasmPlugin, Vec::new()),
        (Kind::AuthorizationPolicy, Vec::new()),
    ] {
        events.push(Event::Replace {
            kind,
            namespace: None,
            objects,
        });
        events.push(Event::Synced(kind));
    }
    events
}

/// Service `i`'s slice; `generation` flips one endpoint's readiness so every change differs.
fn slice(p: Params, i: usize, generation: usize) -> EndpointSlice {
    let ns = ns_of(i);
    let name = format!("svc-{i}");
    let mut m = meta(&ns, &format!("{name}-x7k2p"));
    m.labels = Some(
        [("kubernetes.io/service-name".to_string(), name.clone())]
            .into_iter()
            .collect(),
    );
    EndpointSlice {
        metadata: m,
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            app_protocol: None,
        }]),
        endpoints: (0..p.per_service)
            .map(|j| Endpoint {
                addresses: vec![endpoint_ip(i, j, p.per_service)],
                conditions: Some(EndpointConditions {
                    ready: Some(!(j == 0 && generation % 2 == 1)),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: Some(format!("node-{}", (i + j) % 100)),
                zone: Some(format!("zone-{}", (i + j) % 3)),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(format!("{name}-{j}")),
                    namespace: Some(ns.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Child: control with the synthetic table, driven over stdin.

async fn serve(p: Params) -> anyhow::Result<()> {
    let start = Instant::now();
    let (tx, hub, _publisher) = wasmesh_control::app::start_publisher(Duration::ZERO);
    for ev in cluster(p) {
        tx.send(ev).await?;
    }
    while !hub.is_synced() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let build = start.elapsed();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(wasmesh_control::discovery::server::serve(
        listener,
        hub.clone(),
        std::future::pending(),
    ));
    let mut out = std::io::stdout();
    writeln!(out, "ready {addr} {}", build.as_micros())?;
    out.flush()?;
    let stdin = BufReader::new(std::io::stdin());
    let mut generations: HashMap<usize, usize> = HashMap::new();
    for line in stdin.lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        match words.next() {
            Some("change") => {
                let i: usize = words.next().context("change N")?.parse()?;
                let g = generations.entry(i).or_default();
                *g += 1;
                tx.send(Event::Apply(Object::EndpointSlice(slice(p, i, *g))))
                    .await?;
            }
            Some("quit") | None => break,
            Some(other) => bail!("unknown command {other}"),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Parent: subscribers and measurements.

/// Only the header of an update: version, kind, complete. Prost skips the rest.
#[derive(Clone, PartialEq, prost::Message)]
struct UpdateHeader {
    #[prost(uint64, tag = "1")]
    version: u64,
    #[prost(int32, tag = "2")]
    kind: i32,
    #[prost(bool, tag = "7")]
    complete: bool,
}

type Arrivals = Arc<Mutex<HashMap<u64, Vec<Instant>>>>;

async fn subscribe(
    addr: SocketAddr,
    id: usize,
    arrivals: Arrivals,
    synced: tokio::sync::mpsc::Sender<u64>,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<WatchRequest, UpdateHeader>::default();
    let req = WatchRequest {
        pod_name: format!("bench-{id}"),
        pod_namespace: "bench".into(),
        node_name: format!("node-{}", id % 100),
        ..Default::default()
    };
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(req),
            wasmesh_api::WATCH_PATH.parse()?,
            codec,
        )
        .await?
        .into_inner();
    let mut told = false;
    while let Some(h) = stream.message().await? {
        if h.kind == wasmesh_api::UpdateKind::Delta as i32 {
            let now = Instant::now();
            arrivals
                .lock()
                .await
                .entry(h.version)
                .or_default()
                .push(now);
        } else if h.complete && !told {
            told = true;
            let _ = synced.send(h.version).await;
        }
    }
    Ok(())
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Work inside control for one change, for a table of `services` Services.
fn change_cost(services: usize, per_service: usize) -> (Duration, Duration, Duration) {
    let p = Params {
        services,
        per_service,
        subscribers: 0,
        changes: 0,
    };
    let mut model = Model::new();
    for ev in cluster(p) {
        model.apply(ev);
    }
    let hub = Hub::new();
    hub.init(model.entries().values(), model.nodes().values());
    let rounds = 2000;
    let mut generations: HashMap<usize, usize> = HashMap::new();
    let start = Instant::now();
    for r in 0..rounds {
        let i = (r * 7919) % services;
        let g = generations.entry(i).or_default();
        *g += 1;
        let delta = model.apply(Event::Apply(Object::EndpointSlice(slice(p, i, *g))));
        assert_eq!(
            delta.upserts.len(),
            1,
            "every change changes one service port"
        );
        hub.publish(wasmesh_control::discovery::hub::Publish {
            upserts: delta.upserts.into_values().collect(),
            ..Default::default()
        });
    }
    let per_change = start.elapsed() / rounds as u32;

    // A snapshot as a subscriber joining after a change builds it (the first one after each
    // change is built; later joiners at the same version share it).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut snaps = Vec::new();
    for r in 0..5 {
        let g = generations.entry(r).or_default();
        *g += 1;
        let delta = model.apply(Event::Apply(Object::EndpointSlice(slice(p, r, *g))));
        hub.publish(wasmesh_control::discovery::hub::Publish {
            upserts: delta.upserts.into_values().collect(),
            ..Default::default()
        });
        let t = Instant::now();
        let (snap, _rx) = rt.block_on(hub.subscribe());
        let parts: Vec<bytes::Bytes> = snap.parts(Hub::SNAPSHOT_PART).collect();
        std::hint::black_box(parts);
        snaps.push(t.elapsed());
    }
    snaps.sort();

    let t = Instant::now();
    let mut m2 = Model::new();
    for ev in cluster(p) {
        m2.apply(ev);
    }
    let h2 = Hub::new();
    h2.init(m2.entries().values(), m2.nodes().values());
    (per_change, snaps[snaps.len() / 2], t.elapsed())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        let p = params(&args[1..])?;
        return tokio::runtime::Runtime::new()?.block_on(serve(p));
    }
    let p = params(&args)?;
    println!(
        "control fan-out benchmark: {} Services x {} endpoints = {} endpoints, {} subscribers, {} changes",
        p.services,
        p.per_service,
        p.services * p.per_service,
        p.subscribers,
        p.changes
    );

    // The work of one change, and snapshot build time, for a small and a large table.
    println!("\n-- work inside control (single thread, this process)");
    println!(
        "{:>9}  {:>16}  {:>16}  {:>22}",
        "services", "one change", "one snapshot", "model + first table"
    );
    for n in [p.services / 10, p.services] {
        let (change, snap, build) = change_cost(n.max(1), p.per_service);
        println!(
            "{n:>9}  {:>16}  {:>16}  {:>22}",
            format!("{:.1} us", change.as_secs_f64() * 1e6),
            ms(snap),
            ms(build)
        );
    }

    // Control in its own process.
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("serve")
        .args(["--services", &p.services.to_string()])
        .args(["--endpoints-per-service", &p.per_service.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let ready = lines.next().context("child exited")??;
    let mut words = ready.split_whitespace().skip(1);
    let addr: SocketAddr = words.next().context("addr")?.parse()?;
    let build_us: u64 = words.next().context("build")?.parse()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    std::thread::sleep(Duration::from_millis(300));
    let rss_loaded = rss_kib(pid);
    println!("\n-- control process (pid {pid})");
    println!(
        "model + first table built in   {}",
        ms(Duration::from_micros(build_us))
    );
    println!(
        "RSS with the table loaded      {:.1} MiB",
        rss_loaded as f64 / 1024.0
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let arrivals: Arrivals = Arc::default();
        let (stx, mut srx) = tokio::sync::mpsc::channel(p.subscribers.max(1));
        let t = Instant::now();
        for id in 0..p.subscribers {
            let a = arrivals.clone();
            let s = stx.clone();
            tokio::spawn(async move {
                // Errors show up as missing arrivals; the streams break when control exits.
                let _ = subscribe(addr, id, a, s).await;
            });
            if id % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let mut version = 0;
        for _ in 0..p.subscribers {
            version = tokio::time::timeout(Duration::from_secs(600), srx.recv())
                .await
                .context("subscribers did not all get their snapshot")?
                .context("closed")?;
        }
        println!(
            "{} subscribers got their snapshot in {}",
            p.subscribers,
            ms(t.elapsed())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_subscribed = rss_kib(pid);
        println!(
            "RSS with {} subscribers          {:.1} MiB",
            p.subscribers,
            rss_subscribed as f64 / 1024.0
        );

        let mut fanout = Vec::new();
        let mut all = Vec::new();
        for c in 0..p.changes {
            version += 1;
            let i = (c * 7919) % p.services;
            let t0 = Instant::now();
            writeln!(stdin, "change {i}")?;
            stdin.flush()?;
            let deadline = t0 + Duration::from_secs(10);
            loop {
                let n = arrivals.lock().await.get(&version).map_or(0, Vec::len);
                if n >= p.subscribers || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let got = arrivals.lock().await.remove(&version).unwrap_or_default();
            if got.len() < p.subscribers {
                bail!(
                    "change {c}: only {} of {} subscribers got version {version}",
                    got.len(),
                    p.subscribers
                );
            }
            let last = got.iter().max().copied().unwrap_or(t0);
            fanout.push(last - t0);
            all.extend(got.iter().map(|a| *a - t0));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        fanout.sort();
        all.sort();
        println!(
            "\n-- fan-out of one EndpointSlice change (change sent to control -> delta received)"
        );
        println!(
            "to the last of {} subscribers: p50 {}  p99 {}  max {}",
            p.subscribers,
            ms(pct(&fanout, 0.5)),
            ms(pct(&fanout, 0.99)),
            ms(pct(&fanout, 1.0))
        );
        println!(
            "to any one subscriber:          p50 {}  p99 {}",
            ms(pct(&all, 0.5)),
            ms(pct(&all, 0.99))
        );
        println!(
            "RSS after the changes          {:.1} MiB",
            rss_kib(pid) as f64 / 1024.0
        );
        writeln!(stdin, "quit")?;
        Ok::<_, anyhow::Error>(())
    });
    let _ = child.kill();
    let _ = child.wait();
    result
}
