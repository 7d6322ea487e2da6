//! `wasmesh-proxy`: the sidecar binary. One subcommand per job; `init` installs the pod's
//! interception rules (run once, in an init container, with NET_ADMIN and NET_RAW).

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wasmesh_proxy::intercept::{
    self, Cidr, DEFAULT_PROXY_UID, Include, InitConfig, Ipv6Mode, List, Port, PortRange,
};

/// mimalloc instead of glibc's malloc: a request allocates and frees many small blocks on the
/// proxy's threads (headers, futures, buffers), where glibc's arenas spent about a tenth of the
/// proxy's CPU (perf, `l7` bench) and its consolidation of freed chunks came in bursts.
/// linkerd2-proxy ships jemalloc for the same reason; mimalloc builds in seconds. Built with
/// `no_thp` (transparent huge pages off for this process): with them, mimalloc's aligned
/// regions took the idle RSS from 12.8 to 20.5 MiB; without, it stays where glibc had it
/// (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The wasmesh sidecar.
#[derive(Debug, Parser)]
#[command(name = "wasmesh-proxy", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Install this pod's traffic interception rules (iptables nat) in the current network
    /// namespace: outbound TCP to the outbound port, inbound TCP to the inbound port.
    ///
    /// Safe to run again: the WASMESH_* chains are replaced, never duplicated. All or nothing:
    /// if any step fails, everything it made is removed again. Lists are comma-separated and
    /// take ports (8080) or port ranges (8000-8100); CIDR lists take IPv4 and IPv6 networks or
    /// addresses. Rules, chains and why each exclusion exists: docs/interception.md.
    Init(InitArgs),

    /// Run the sidecar: follow control's service table, proxy the pod's outbound connections
    /// to Services (kube-proxy semantics, balancing, failover) and pass inbound connections to
    /// the app. Admin endpoints: /ready, /live, /config, /metrics.
    Run(RunArgs),

    /// Wait until the proxy on this pod is ready (its /ready answers 200), then exit 0; exit 1
    /// after the timeout. Classic-mode sidecars run it as the proxy container's postStart hook,
    /// which holds the app until the proxy can carry its traffic.
    Wait(WaitArgs),
}

#[derive(Debug, Args)]
struct WaitArgs {
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_seconds: u64,

    /// The proxy's admin address.
    #[arg(long, env = "WASMESH_WAIT_ADMIN", default_value = "127.0.0.1:15000")]
    admin: std::net::SocketAddr,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Address of wasmesh control's discovery server.
    #[arg(
        long,
        env = "WASMESH_CONTROL",
        default_value = "http://wasmesh-control.wasmesh-system.svc:15010"
    )]
    control: String,

    /// Admin server address (/ready, /live, /config, /metrics).
    #[arg(long, env = "WASMESH_ADMIN", default_value = "0.0.0.0:15000")]
    admin: std::net::SocketAddr,

    /// Port the outbound rules redirect to (listened on 127.0.0.1 and ::1).
    #[arg(long, env = "WASMESH_OUTBOUND_PORT", default_value_t = 15001)]
    outbound_port: u16,

    /// Port the inbound rules redirect to (listened on every address).
    #[arg(long, env = "WASMESH_INBOUND_PORT", default_value_t = 15006)]
    inbound_port: u16,

    /// This pod's name (downward API).
    #[arg(long, env = "POD_NAME", default_value = "")]
    pod_name: String,

    /// This pod's namespace (downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pod_namespace: String,

    /// The node this pod runs on (downward API): decides node-local endpoints
    /// (internalTrafficPolicy Local) and, with control's Node data, the zone.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,

    /// This pod's zone, if control cannot tell it from the Node.
    #[arg(long, env = "WASMESH_ZONE")]
    zone: Option<String>,

    /// How endpoints are chosen: p2c (power of two choices on open connections), least-conn,
    /// round-robin or random (kube-proxy's). A Service can override it with the annotation
    /// `wasmesh.io/balancer`.
    #[arg(long, env = "WASMESH_BALANCER", default_value = "p2c")]
    balancer: wasmesh_proxy::balance::BalancerKind,

    /// Time allowed for one connect to an endpoint before another is tried (milliseconds).
    #[arg(long, env = "WASMESH_CONNECT_TIMEOUT_MS", default_value_t = 1000)]
    connect_timeout_ms: u64,

    /// Endpoints tried for one connection before the client is reset.
    #[arg(long, env = "WASMESH_CONNECT_ATTEMPTS", default_value_t = 3)]
    connect_attempts: usize,

    /// How long a connection captured before the first table arrives waits for it
    /// (milliseconds).
    #[arg(long, env = "WASMESH_TABLE_WAIT_MS", default_value_t = 5000)]
    table_wait_ms: u64,

    /// Refuse connections to Services without usable endpoints in the kernel, exactly like
    /// kube-proxy (ECONNREFUSED; DROP for internalTrafficPolicy Local with no local endpoint),
    /// by filling the WASMESH_REJECT chain `init` created. Needs CAP_NET_ADMIN; without it the
    /// proxy resets such connections instead.
    #[arg(long, env = "WASMESH_REJECT_CHAIN")]
    reject_chain: bool,

    /// On SIGTERM, stop accepting, fail /ready, and let open connections finish for up to this
    /// many milliseconds before exiting.
    #[arg(long, env = "WASMESH_DRAIN_TIMEOUT_MS", default_value_t = 5000)]
    drain_timeout_ms: u64,

    /// How bytes are moved: auto (through a small buffer, then zero-copy splice once a
    /// direction carries bulk), splice (zero-copy through a kernel pipe from the start) or
    /// buffered (through a 64 KiB buffer per direction).
    #[arg(long, env = "WASMESH_COPY", default_value = "auto")]
    copy: wasmesh_proxy::copy::CopyMode,

    /// The pod's labels as `key=value,…` (for WasmPlugin and AuthorizationPolicy selectors);
    /// merged over --pod-labels-file.
    #[arg(long, env = "WASMESH_POD_LABELS", default_value = "")]
    pod_labels: String,

    /// Where compiled Wasm modules are cached across restarts (default: in memory only).
    #[arg(long, env = "WASMESH_WASM_CACHE_DIR")]
    wasm_cache_dir: Option<std::path::PathBuf>,

    /// A downward API labels file (`key="value"` lines), as the injector mounts it.
    #[arg(long, env = "WASMESH_POD_LABELS_FILE")]
    pod_labels_file: Option<std::path::PathBuf>,

    /// On a Service port that declares no protocol, how long to wait for the client's first
    /// bytes to tell HTTP from anything else (milliseconds). A silent client (the server
    /// speaks first: MySQL, SMTP, …) is proxied as plain TCP after this.
    #[arg(long, env = "WASMESH_DETECT_TIMEOUT_MS", default_value_t = 500)]
    detect_timeout_ms: u64,

    /// For an HTTP request whose HTTPRoute sets no `timeouts.request`: how long the endpoint may
    /// take to send the response headers before the app gets 504 (milliseconds; 0 = no limit).
    /// Streams (gRPC) are not cut: only the wait for the headers is limited.
    #[arg(long, env = "WASMESH_REQUEST_TIMEOUT_MS", default_value_t = 15000)]
    request_timeout_ms: u64,

    /// mTLS between sidecars: the token that proves this pod's ServiceAccount to control (a
    /// projected ServiceAccount token, or the local mesh's per-pod token file). Without it the
    /// proxy speaks plaintext, as before.
    #[arg(long, env = "WASMESH_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,

    /// Lifetime of the workload certificate to ask control for, in seconds (control caps it;
    /// default: control's).
    #[arg(long, env = "WASMESH_CERT_LIFETIME_SECONDS")]
    cert_lifetime_seconds: Option<u64>,

    /// Trust domain of the mesh (SPIFFE IDs spiffe://<trust-domain>/ns/<ns>/sa/<sa>).
    #[arg(long, env = "WASMESH_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,

    /// Inbound plaintext (with --token-file): `permissive` accepts it, `strict` refuses it. An
    /// AuthorizationPolicy with `mtls: strict` makes it strict too.
    #[arg(long, env = "WASMESH_INBOUND_MTLS", default_value = "permissive")]
    inbound_mtls: wasmesh_proxy::identity::MtlsMode,

    /// Folder of AuthorizationPolicy YAML (wasmesh.io/v1alpha1), re-read every 2 s: policies
    /// of this proxy's own, applied together with those control sends (with --token-file).
    #[arg(long, env = "WASMESH_POLICY_DIR")]
    policy_dir: Option<std::path::PathBuf>,

    /// JSON access logs, one line per HTTP request and per proxied TCP connection: `off`,
    /// `stdout`, `stderr`, or a file path (appended to). Written by a thread of its own from a
    /// bounded queue: when it falls behind, lines are dropped and counted
    /// (wasmesh_access_log_dropped_total), traffic never waits.
    #[arg(
        long,
        env = "WASMESH_ACCESS_LOG",
        value_name = "off|stdout|stderr|PATH",
        default_value = "off"
    )]
    access_log: wasmesh_proxy::access_log::Target,

    /// Share of requests and connections that get an access log line, from 0.0 to 1.0.
    #[arg(
        long,
        env = "WASMESH_ACCESS_LOG_SAMPLE",
        value_name = "RATE",
        default_value = "1.0",
        value_parser = wasmesh_proxy::access_log::parse_sample
    )]
    access_log_sample: f64,

    /// Worker threads that run the data path. Default: the CPUs this process may use (its
    /// affinity mask and its cgroup's CPU quota rounded down, at least 1: a container limited
    /// to 1 CPU, or 500m, gets 1).
    /// With 1 the proxy runs a single-threaded runtime: no work-stealing machinery, and
    /// tasks woken by a request run after the ones already queued, so an HTTP/2
    /// connection's frames from many streams leave in one write.
    #[arg(long, env = "WASMESH_WORKERS", value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
}

#[derive(Debug, Args)]
struct InitArgs {
    /// UID the proxy runs as. Its connections are not captured, except those to the pod's own
    /// IP, which go through the inbound listener (hairpin).
    #[arg(long, env = "WASMESH_PROXY_UID", value_name = "UID", default_value_t = DEFAULT_PROXY_UID)]
    proxy_uid: u32,

    /// Also exempt connections made by processes with this GID, like the proxy UID (for a
    /// proxy that runs as another user with this group). Default: none.
    #[arg(long, env = "WASMESH_PROXY_GID", value_name = "GID")]
    proxy_gid: Option<u32>,

    /// Port of the proxy's inbound listener: inbound TCP connections are redirected here.
    #[arg(
        long,
        env = "WASMESH_INBOUND_PORT",
        value_name = "PORT",
        default_value = "15006"
    )]
    inbound_port: Port,

    /// Port of the proxy's outbound listener: outbound TCP connections are redirected here.
    #[arg(
        long,
        env = "WASMESH_OUTBOUND_PORT",
        value_name = "PORT",
        default_value = "15001"
    )]
    outbound_port: Port,

    /// Inbound destination ports that reach the app directly, never the proxy (e.g. a port the
    /// app terminates TLS on itself). The admin port 15000 and the inbound and outbound ports
    /// are always excluded.
    #[arg(long, env = "WASMESH_EXCLUDE_INBOUND_PORTS", value_name = "LIST")]
    exclude_inbound_ports: Option<List<PortRange>>,

    /// Outbound destination ports never captured, for any process (e.g. a database protocol
    /// the proxy must not touch).
    #[arg(long, env = "WASMESH_EXCLUDE_OUTBOUND_PORTS", value_name = "LIST")]
    exclude_outbound_ports: Option<List<PortRange>>,

    /// Outbound destination networks never captured (e.g. the cloud metadata address
    /// 169.254.169.254).
    #[arg(long, env = "WASMESH_EXCLUDE_OUTBOUND_CIDRS", value_name = "LIST")]
    exclude_outbound_cidrs: Option<List<Cidr>>,

    /// Outbound destination networks that are captured: `*` for all, or a list (e.g. only the
    /// Service range 10.96.0.0/12); an empty list captures no outbound traffic. Exclusions win.
    #[arg(
        long,
        env = "WASMESH_INCLUDE_OUTBOUND_CIDRS",
        value_name = "LIST|*",
        default_value = "*"
    )]
    include_outbound_cidrs: Include<Cidr>,

    /// Inbound destination ports that are captured: `*` for all, or a list; an empty list
    /// captures no inbound traffic. Exclusions win.
    #[arg(
        long,
        env = "WASMESH_INCLUDE_INBOUND_PORTS",
        value_name = "LIST|*",
        default_value = "*"
    )]
    include_inbound_ports: Include<PortRange>,

    /// IPv6 rules (ip6tables): `auto` installs them when this network namespace has IPv6
    /// (net.ipv6.conf.all.disable_ipv6 = 0), `on` always, `off` never.
    #[arg(
        long,
        env = "WASMESH_IPV6",
        value_name = "auto|on|off",
        default_value = "auto"
    )]
    ipv6: Ipv6Mode,

    /// Print the rules (iptables-restore input, IPv4 then IPv6) and change nothing. Needs no
    /// privileges.
    #[arg(long, env = "WASMESH_DRY_RUN")]
    dry_run: bool,

    /// Remove every WASMESH_* chain, every jump into one and the ::6 address on lo, instead
    /// of installing.
    #[arg(long, env = "WASMESH_CLEANUP", conflicts_with = "dry_run")]
    cleanup: bool,
}

impl InitArgs {
    fn config(&self) -> InitConfig {
        InitConfig {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            exclude_inbound_ports: list(&self.exclude_inbound_ports),
            exclude_outbound_ports: list(&self.exclude_outbound_ports),
            exclude_outbound_cidrs: list(&self.exclude_outbound_cidrs),
            include_outbound_cidrs: self.include_outbound_cidrs.clone(),
            include_inbound_ports: self.include_inbound_ports.clone(),
        }
    }
}

fn list<T: Clone>(flag: &Option<List<T>>) -> Vec<T> {
    flag.as_ref().map(|l| l.0.clone()).unwrap_or_default()
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let result = match cli.command {
        Command::Init(args) => init(&args),
        Command::Run(args) => run(args),
        Command::Wait(args) => wait(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    use std::time::Duration;
    use wasmesh_proxy::filters::select::{parse_labels_file, parse_labels_flag};
    let mut pod_labels = match &args.pod_labels_file {
        Some(path) => parse_labels_file(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading the pod labels file {}", path.display()))?,
        ),
        None => Default::default(),
    };
    pod_labels.extend(parse_labels_flag(&args.pod_labels));
    let cfg = wasmesh_proxy::run::RunConfig {
        control: args.control,
        admin: args.admin,
        outbound_port: args.outbound_port,
        inbound_port: args.inbound_port,
        pod_name: args.pod_name,
        pod_namespace: args.pod_namespace,
        pod_labels,
        wasm_cache_dir: args.wasm_cache_dir,
        node_name: args.node_name.filter(|n| !n.is_empty()),
        zone: args.zone.filter(|z| !z.is_empty()),
        outbound: wasmesh_proxy::outbound::OutboundConfig {
            balancer: args.balancer,
            connect_timeout: Duration::from_millis(args.connect_timeout_ms.max(1)),
            connect_attempts: args.connect_attempts.max(1),
            table_wait: Duration::from_millis(args.table_wait_ms),
            copy: args.copy,
            detect_timeout: Duration::from_millis(args.detect_timeout_ms),
            request_timeout: (args.request_timeout_ms > 0)
                .then(|| Duration::from_millis(args.request_timeout_ms)),
        },
        reject_chain: args.reject_chain,
        drain_timeout: Duration::from_millis(args.drain_timeout_ms),
        mtls: args
            .token_file
            .map(|token_file| wasmesh_proxy::run::MtlsConfig {
                token_file,
                cert_lifetime: args.cert_lifetime_seconds.map(Duration::from_secs),
                trust_domain: args.trust_domain,
                mode: args.inbound_mtls,
                policy_dir: args.policy_dir,
            }),
        access_log: wasmesh_proxy::access_log::AccessLogConfig {
            target: args.access_log,
            sample: args.access_log_sample,
        },
    };
    let workers = args.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    let mut rt = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let rt = rt
        .enable_all()
        // Wasm filter streams end (on_done/on_log/on_delete) when a worker goes idle, after
        // the response went out, not in front of it.
        .on_thread_park(wasmesh_wasm::worker_idle)
        .build()
        .context("starting the runtime")?;
    tracing::info!(workers, "data path runtime");
    rt.block_on(async {
        wasmesh_proxy::run::run(cfg, shutdown_signal()).await?;
        Ok(())
    })
}

fn wait(args: &WaitArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let timeout = std::time::Duration::from_secs(args.timeout_seconds);
    if rt.block_on(wasmesh_proxy::wait::wait(args.admin, timeout)) {
        Ok(())
    } else {
        anyhow::bail!(
            "the proxy at {} was not ready after {}s (is `wasmesh-proxy run` running, and can it reach control?)",
            args.admin,
            args.timeout_seconds
        )
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn init(args: &InitArgs) -> anyhow::Result<()> {
    if args.cleanup {
        let families = args.ipv6.families();
        let removed = intercept::remove(&families).context("removing the interception rules")?;
        if removed {
            tracing::info!("removed the interception rules");
        } else {
            tracing::info!("no interception rules to remove");
        }
        return Ok(());
    }
    let config = args.config();
    config.validate()?;
    let rules = intercept::render_rules(&config);
    if args.dry_run {
        print!("{rules}");
        return Ok(());
    }
    intercept::install(&rules, &args.ipv6.families())?;
    Ok(())
}
