//! `wasmesh-local`: a whole mesh on one Linux machine. See `docs/local-mesh.md`.

use std::io::IsTerminal;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::sync::{mpsc, watch};
use tracing_subscriber::EnvFilter;
use wasmesh_local::cli::{self, Resource};
use wasmesh_local::config::{Binaries, DEFAULT_PREFIX, DEFAULT_STATE_DIR, MeshConfig};
use wasmesh_local::mesh::{self, Command as MeshCommand};
use wasmesh_local::state::{self, Status};

/// A whole wasmesh mesh on one Linux machine, from a folder of Kubernetes YAML.
///
/// Pods are network namespaces hanging off a bridge in a "node" namespace; nothing is added to
/// the machine's own network. Needs root.
#[derive(Debug, Parser)]
#[command(name = "wasmesh-local", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct StateArgs {
    /// Where the running mesh keeps its state (status, logs, the objects control reads).
    #[arg(long, env = "WASMESH_LOCAL_STATE_DIR", default_value = DEFAULT_STATE_DIR, global = true)]
    state_dir: PathBuf,
}

#[derive(Debug, Args)]
struct NamespaceArgs {
    /// The Kubernetes namespace.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the folder's Namespaces, Pods, Deployments, Services and EndpointSlices until
    /// Ctrl-C or SIGTERM; edits to the folder take effect while it runs.
    Up {
        /// The folder of Kubernetes YAML.
        dir: PathBuf,
        #[command(flatten)]
        state: StateArgs,
        /// Start no sidecars (every pod as if annotated `wasmesh.io/inject: "false"`).
        #[arg(long)]
        no_sidecar: bool,
        /// Every network namespace and /etc/netns directory made starts with this; leftovers
        /// with it are removed at start.
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
        /// An extra argument for every `wasmesh-proxy run` (repeat for several).
        #[arg(long = "proxy-arg", value_name = "ARG", allow_hyphen_values = true)]
        proxy_args: Vec<String>,
        /// An extra argument for `wasmesh-control serve` (repeat for several), e.g.
        /// `--control-arg=--cert-lifetime --control-arg=1m`.
        #[arg(long = "control-arg", value_name = "ARG", allow_hyphen_values = true)]
        control_args: Vec<String>,
        /// Plaintext between sidecars (no CA, no certificates). Default: mTLS.
        #[arg(long)]
        no_mtls: bool,
        /// Trace every HTTP request: `local` runs the mesh's own OTLP receiver (spans in
        /// `<state>/traces.jsonl`, shown by `wasmesh-local traces`), or an OTLP endpoint URL
        /// reachable from the pods (e.g. a collector at http://10.244.0.1:4317).
        #[arg(long, value_name = "local|URL")]
        otlp: Option<String>,
        /// OTLP protocol: grpc or http/protobuf.
        #[arg(long, default_value = "grpc", value_parser = ["grpc", "http/protobuf"])]
        otlp_protocol: String,
    },
    /// The traces the local OTLP receiver got (`up --otlp local`), as trees of spans.
    Traces {
        #[command(flatten)]
        state: StateArgs,
        /// Only the last N traces.
        #[arg(long, default_value_t = 10)]
        last: usize,
        /// Only traces with a span of this service (`service.name`: the workload's `app`
        /// label, else the pod's name).
        #[arg(long)]
        service: Option<String>,
    },
    /// (internal) The OTLP receiver `up --otlp local` runs in the node's namespace.
    #[command(hide = true)]
    OtlpReceiver {
        #[arg(long)]
        grpc: std::net::SocketAddr,
        #[arg(long)]
        http: std::net::SocketAddr,
        #[arg(long)]
        out: PathBuf,
    },
    /// Stop the running mesh and remove everything it made (also what a crash left).
    Down {
        #[command(flatten)]
        state: StateArgs,
        /// Remove namespaces with this prefix (default: the running mesh's, else `wm-`).
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Show pods, services or endpoints (EndpointSlices) like kubectl.
    Get {
        #[arg(value_enum)]
        resource: Resource,
        #[command(flatten)]
        ns: NamespaceArgs,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Run a command in a pod's network namespace (with its /etc/hosts); the exit status is
    /// the command's.
    Exec {
        #[command(flatten)]
        ns: NamespaceArgs,
        pod: String,
        #[command(flatten)]
        state: StateArgs,
        /// The command, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print a container's output.
    Logs {
        #[command(flatten)]
        ns: NamespaceArgs,
        pod: String,
        /// The container (needed when the pod has several).
        #[arg(short = 'c', long)]
        container: Option<String>,
        /// Keep printing as it grows, until the pod is gone.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Start with only the last this many lines (0: only new ones).
        #[arg(long)]
        tail: Option<usize>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Delete a pod (a Deployment's pod is replaced).
    Delete {
        /// Only `pod`.
        #[arg(value_parser = ["pod", "pods", "po"])]
        resource: String,
        pod: String,
        #[command(flatten)]
        ns: NamespaceArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Wait until every pod is ready.
    Wait {
        /// Seconds to wait at most.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Internal: the agent `up` runs inside each pod.
    #[command(hide = true)]
    PodAgent {
        #[arg(long)]
        spec: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::PodAgent { spec } = &cli.command {
        return wasmesh_local::agent::main(spec);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Up {
            dir,
            state,
            no_sidecar,
            prefix,
            proxy_args,
            control_args,
            no_mtls,
            otlp,
            otlp_protocol,
        } => up(
            dir,
            state.state_dir,
            !no_sidecar,
            prefix,
            proxy_args,
            control_args,
            !no_mtls,
            otlp.map(|o| (o, otlp_protocol)),
        ),
        Command::Traces {
            state,
            last,
            service,
        } => {
            let mut spans =
                wasmesh_local::otlp::read(&wasmesh_local::otlp::traces_file(&state.state_dir));
            if let Some(svc) = &service {
                let with: std::collections::HashSet<String> = spans
                    .iter()
                    .filter(|s| &s.service == svc)
                    .map(|s| s.trace_id.clone())
                    .collect();
                spans.retain(|s| with.contains(&s.trace_id));
            }
            if spans.is_empty() {
                println!(
                    "no spans yet (is the mesh up with --otlp local, and has an HTTP request been made?)"
                );
                return Ok(ExitCode::SUCCESS);
            }
            let mut starts: std::collections::BTreeMap<&str, u64> = Default::default();
            for s in &spans {
                let e = starts.entry(s.trace_id.as_str()).or_insert(u64::MAX);
                *e = (*e).min(s.start_unix_nano);
            }
            let mut order: Vec<(&str, u64)> = starts.into_iter().collect();
            order.sort_by_key(|(_, t)| *t);
            let keep: std::collections::HashSet<&str> =
                order.iter().rev().take(last).map(|(t, _)| *t).collect();
            let shown: Vec<_> = spans
                .iter()
                .filter(|s| keep.contains(s.trace_id.as_str()))
                .cloned()
                .collect();
            print!("{}", wasmesh_local::otlp::render(&shown));
            Ok(ExitCode::SUCCESS)
        }
        Command::OtlpReceiver { grpc, http, out } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async move {
                let g = tokio::net::TcpListener::bind(grpc)
                    .await
                    .with_context(|| format!("cannot listen on {grpc}"))?;
                let h = tokio::net::TcpListener::bind(http)
                    .await
                    .with_context(|| format!("cannot listen on {http}"))?;
                println!(
                    "OTLP receiver: gRPC on {grpc}, HTTP on {http}, spans to {}",
                    out.display()
                );
                wasmesh_local::otlp::serve(g, h, &out)
                    .await
                    .context("OTLP receiver")?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Down { state, prefix } => {
            let done = cli::down(&state.state_dir, prefix.as_deref())?;
            if done.is_empty() {
                println!("nothing to remove");
            }
            for line in done {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Get {
            resource,
            ns,
            all_namespaces,
            state,
        } => {
            let status = state::read_status(&state.state_dir)?;
            let namespace = (!all_namespaces).then_some(ns.namespace.as_str());
            print!("{}", cli::render(&status, resource, namespace));
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec {
            ns,
            pod,
            state,
            command,
        } => {
            let status = state::read_status(&state.state_dir)?;
            let mut cmd = cli::exec_command(&status, &ns.namespace, &pod, &command)?;
            // Only returns on failure; otherwise the command's exit status is ours.
            let e = cmd.exec();
            Err(e).context("cannot run `ip netns exec` (is iproute2 installed?)")
        }
        Command::Logs {
            ns,
            pod,
            container,
            follow,
            tail,
            state,
        } => {
            let mut out = std::io::stdout();
            cli::logs(
                &state.state_dir,
                &ns.namespace,
                &pod,
                container.as_deref(),
                cli::LogOptions { follow, tail },
                &mut out,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete { pod, ns, state, .. } => {
            cli::delete_pod(&state.state_dir, &ns.namespace, &pod)?;
            println!("pod \"{pod}\" deleted");
            Ok(ExitCode::SUCCESS)
        }
        Command::Wait { timeout, state } => {
            let status = cli::wait_ready(&state.state_dir, Duration::from_secs(timeout))?;
            print!("{}", cli::render(&status, Resource::Pods, None));
            Ok(ExitCode::SUCCESS)
        }
        Command::PodAgent { .. } => Ok(ExitCode::FAILURE),
    }
}

#[allow(clippy::too_many_arguments)] // one per `up` flag
fn up(
    dir: PathBuf,
    state_dir: PathBuf,
    sidecar: bool,
    prefix: String,
    proxy_args: Vec<String>,
    control_args: Vec<String>,
    mtls: bool,
    otlp: Option<(String, String)>,
) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot tell where wasmesh-local is")?;
    let mut cfg = MeshConfig::new(dir, state_dir, Binaries::next_to(exe));
    cfg.sidecar = sidecar;
    cfg.prefix = prefix;
    cfg.proxy_args = proxy_args;
    cfg.control_args = control_args;
    cfg.mtls = mtls;
    if let Some((endpoint, protocol)) = otlp {
        cfg.otlp = Some(endpoint);
        cfg.otlp_protocol = protocol;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let (tx, rx) = mpsc::unbounded_channel();
        let (status_tx, _status_rx) = watch::channel(Arc::new(Status::default()));
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("stopping: removing every pod and namespace");
            let _ = tx.send(MeshCommand::Shutdown);
        });
        mesh::run(cfg, rx, status_tx, |r| {
            if r.is_ok() {
                tracing::info!(
                    "mesh running; Ctrl-C or `wasmesh-local down` stops it and removes everything"
                );
            }
        })
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
