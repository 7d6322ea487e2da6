//! `wasmesh-injector`: `serve` runs the mutating admission webhook, `inject` applies the same
//! mutation to YAML files. Flags here, the work in the library (`src/lib.rs` has the map).

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wasmesh_injector::annotations::Quantity;
use wasmesh_injector::config::{
    self, Config, DEFAULT_CONTROL_ADDRESS, DEFAULT_CONTROL_NAMESPACE, DEFAULT_IMAGE,
    DEFAULT_PROXY_UID, DEFAULT_TOKEN_AUDIENCE, DEFAULT_WORKERS, Resources, SidecarMode,
};
use wasmesh_injector::offline::{self, Outcome};
use wasmesh_injector::server::{self, ServerConfig};
use wasmesh_injector::tls::CertFiles;

/// Puts the wasmesh sidecar into pods: as a Kubernetes mutating admission webhook (`serve`) or
/// offline on YAML files (`inject`). See docs/injection.md.
#[derive(Debug, Parser)]
#[command(name = "wasmesh-injector", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the admission webhook over HTTPS: POST /inject (pods that opt in with the label
    /// wasmesh.io/inject: "true"), POST /inject/namespace-enabled (pods of namespaces labelled
    /// wasmesh.io/inject=enabled), GET /healthz.
    ///
    /// The certificate and key files are re-read every --cert-reload-interval and a new pair is
    /// served without a restart (cert-manager renewals). A pod the injector cannot handle is
    /// allowed unchanged, with a warning to the user and a log line.
    Serve(ServeArgs),
    /// Add the sidecar to the Pods and pod templates (Deployment, StatefulSet, DaemonSet,
    /// ReplicaSet, ReplicationController, Job, CronJob) of a multi-document
    /// YAML file, like `linkerd inject`; write the result to stdout.
    ///
    /// Offline, a namespace's wasmesh.io/inject=enabled label cannot be checked: every pod that
    /// is not opted out (wasmesh.io/inject: "false") is injected, except in the control plane's
    /// and Kubernetes' own namespaces. Every other document is written back byte for byte,
    /// comments included; injected documents are re-encoded (their leading comments are kept).
    /// What happened to each object is printed on stderr.
    Inject(InjectArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on (HTTPS).
    #[arg(
        long,
        env = "WASMESH_INJECTOR_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:15017"
    )]
    listen: SocketAddr,

    /// PEM certificate chain, leaf first (cert-manager: tls.crt).
    #[arg(
        long,
        env = "WASMESH_INJECTOR_TLS_CERT",
        value_name = "FILE",
        default_value = "/etc/wasmesh/tls/tls.crt"
    )]
    tls_cert: PathBuf,

    /// PEM private key of that certificate (cert-manager: tls.key).
    #[arg(
        long,
        env = "WASMESH_INJECTOR_TLS_KEY",
        value_name = "FILE",
        default_value = "/etc/wasmesh/tls/tls.key"
    )]
    tls_key: PathBuf,

    /// How often the certificate files are checked for changes, in seconds.
    #[arg(
        long,
        env = "WASMESH_INJECTOR_CERT_RELOAD_INTERVAL",
        value_name = "SECONDS",
        default_value_t = 10
    )]
    cert_reload_interval: u64,

    #[command(flatten)]
    injector: InjectorArgs,
}

#[derive(Debug, Args)]
struct InjectArgs {
    /// The YAML file, or - for stdin.
    #[arg(value_name = "FILE|-", default_value = "-")]
    file: String,

    /// Print nothing on stderr.
    #[arg(long, short)]
    quiet: bool,

    #[command(flatten)]
    injector: InjectorArgs,
}

/// What is injected; every pod annotation overrides its flag (docs/injection.md).
#[derive(Debug, Args)]
struct InjectorArgs {
    /// Image of the wasmesh-init and wasmesh-proxy containers.
    #[arg(long, env = "WASMESH_PROXY_IMAGE", value_name = "IMAGE", default_value = DEFAULT_IMAGE)]
    proxy_image: String,

    /// imagePullPolicy of both containers (default: Kubernetes' own).
    #[arg(
        long,
        env = "WASMESH_IMAGE_PULL_POLICY",
        value_name = "Always|IfNotPresent|Never"
    )]
    image_pull_policy: Option<String>,

    /// Control's discovery address, passed to `wasmesh-proxy run --control`.
    #[arg(
        long,
        env = "WASMESH_CONTROL_ADDRESS",
        value_name = "URL",
        default_value = DEFAULT_CONTROL_ADDRESS
    )]
    control_address: String,

    /// The control plane's namespace: its pods are never injected.
    #[arg(
        long,
        env = "WASMESH_CONTROL_NAMESPACE",
        value_name = "NAMESPACE",
        default_value = DEFAULT_CONTROL_NAMESPACE
    )]
    control_namespace: String,

    /// More namespaces whose pods are never injected (comma-separated).
    #[arg(
        long,
        env = "WASMESH_SKIP_NAMESPACES",
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "kube-system,kube-public,kube-node-lease"
    )]
    skip_namespaces: Vec<String>,

    /// Sidecar mode of pods without a wasmesh.io/sidecar-mode annotation: native (an init
    /// container with restartPolicy Always, Kubernetes >= 1.29) or classic.
    #[arg(
        long,
        env = "WASMESH_SIDECAR_MODE",
        value_name = "native|classic",
        default_value = "native"
    )]
    sidecar_mode: SidecarMode,

    /// UID and GID of the proxy (wasmesh.io/proxy-uid).
    #[arg(long, env = "WASMESH_PROXY_UID", value_name = "UID", default_value_t = DEFAULT_PROXY_UID)]
    proxy_uid: u32,

    /// Proxy CPU request (wasmesh.io/proxy-cpu); empty for none.
    #[arg(long, env = "WASMESH_PROXY_CPU", value_name = "QUANTITY", default_value = "100m", value_parser = quantity)]
    proxy_cpu: String,

    /// Proxy memory request (wasmesh.io/proxy-memory); empty for none.
    #[arg(long, env = "WASMESH_PROXY_MEMORY", value_name = "QUANTITY", default_value = "64Mi", value_parser = quantity)]
    proxy_memory: String,

    /// Proxy CPU limit (wasmesh.io/proxy-cpu-limit); none by default.
    #[arg(long, env = "WASMESH_PROXY_CPU_LIMIT", value_name = "QUANTITY", value_parser = quantity)]
    proxy_cpu_limit: Option<String>,

    /// Proxy memory limit (wasmesh.io/proxy-memory-limit); none by default.
    #[arg(long, env = "WASMESH_PROXY_MEMORY_LIMIT", value_name = "QUANTITY", value_parser = quantity)]
    proxy_memory_limit: Option<String>,

    /// Worker threads of a proxy without a CPU limit (wasmesh.io/proxy-workers); 0 leaves it
    /// to the proxy (a worker per CPU of the node). A proxy with a CPU limit sizes itself by it.
    #[arg(long, env = "WASMESH_PROXY_WORKERS", value_name = "N", default_value_t = DEFAULT_WORKERS)]
    proxy_workers: u16,

    /// Audience of the projected ServiceAccount token the proxy presents to control.
    #[arg(long, env = "WASMESH_TOKEN_AUDIENCE", value_name = "AUDIENCE", default_value = DEFAULT_TOKEN_AUDIENCE)]
    token_audience: String,
}

fn quantity(value: &str) -> Result<String, String> {
    if value.is_empty() || Quantity::parse(value).is_some() {
        Ok(value.trim().to_owned())
    } else {
        Err("not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1Gi)".to_owned())
    }
}

impl InjectorArgs {
    fn config(&self) -> anyhow::Result<Config> {
        if self.proxy_uid == 0 || self.proxy_uid > i32::MAX as u32 {
            anyhow::bail!(
                "--proxy-uid {}: use a UID from 1 to 2147483647 (root's traffic cannot be exempt)",
                self.proxy_uid
            );
        }
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Ok(Config {
            image: self.proxy_image.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            control_address: self.control_address.clone(),
            control_namespace: self.control_namespace.clone(),
            skip_namespaces: self
                .skip_namespaces
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            default_mode: self.sidecar_mode,
            proxy_uid: self.proxy_uid,
            resources: Resources {
                cpu_request: non_empty(&self.proxy_cpu),
                memory_request: non_empty(&self.proxy_memory),
                cpu_limit: self.proxy_cpu_limit.as_deref().and_then(non_empty),
                memory_limit: self.proxy_memory_limit.as_deref().and_then(non_empty),
            },
            workers: (self.proxy_workers > 0).then_some(self.proxy_workers),
            token_audience: self.token_audience.clone(),
            ..Config::default()
        })
    }
}

fn main() -> ExitCode {
    // One crypto provider for rustls in the whole process, before anything uses TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Inject(args) => inject(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wasmesh-injector: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let injector = args.injector.config()?;
    let mut config = ServerConfig::new(
        CertFiles {
            cert: args.tls_cert,
            key: args.tls_key,
        },
        injector,
    );
    config.reload_interval = Duration::from_secs(args.cert_reload_interval.max(1));
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        tracing::info!(version = config::VERSION, "wasmesh-injector starting");
        server::run(listener, config, shutdown_signal()).await?;
        tracing::info!("wasmesh-injector stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// SIGTERM (the kubelet) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

fn inject(args: &InjectArgs) -> anyhow::Result<ExitCode> {
    let config = args.injector.config()?;
    let input = if args.file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading YAML from stdin")?;
        s
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file))?
    };
    let source = if args.file == "-" {
        "stdin"
    } else {
        &args.file
    };
    let result = offline::inject(&input, &config).with_context(|| source.to_owned())?;
    std::io::stdout()
        .lock()
        .write_all(result.output.as_bytes())
        .context("writing to stdout")?;
    if !args.quiet {
        let mut err = std::io::stderr().lock();
        for report in &result.reports {
            if report.outcome == Outcome::PassedThrough {
                continue;
            }
            let _ = writeln!(err, "{report}");
            for w in &report.warnings {
                let _ = writeln!(err, "  warning: {w}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
