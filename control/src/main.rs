//! `wasmesh-control`: the control component of wasmesh.
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use wasmesh_control::app::{self, SourceOptions, SourceSpec};
use wasmesh_control::model::Cidr;
use wasmesh_control::view::{self, Format};

/// Watches Services, EndpointSlices, Pods and Nodes and streams the service table to every
/// wasmesh proxy.
#[derive(Debug, Parser)]
#[command(name = "wasmesh-control", version, about, long_about = None)]
struct Cli {
    /// Log format: text or json. Log level comes from RUST_LOG (default: info).
    #[arg(
        long,
        global = true,
        default_value = "text",
        env = "WASMESH_LOG_FORMAT"
    )]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the discovery stream (gRPC) to proxies.
    Serve(ServeArgs),
    /// Print the service table control computes: what the mesh thinks of each Service.
    Table(TableArgs),
}

#[derive(Debug, Args)]
struct SourceArgs {
    /// Where objects come from: `kube` (in-cluster config, or KUBECONFIG) or `dir:PATH`
    /// (a folder of Kubernetes YAML manifests, watched for changes).
    #[arg(long, env = "WASMESH_SOURCE")]
    source: SourceSpec,
    /// Only watch these namespaces (comma-separated; kube source). Default: all namespaces.
    #[arg(long, value_delimiter = ',', env = "WASMESH_NAMESPACES")]
    namespaces: Vec<String>,
    /// Range that Services without a clusterIP get one from (folder source), like the API
    /// server's --service-cluster-ip-range.
    #[arg(long, default_value = "10.96.0.0/12", value_parser = parse_cidr, env = "WASMESH_SERVICE_CIDR")]
    service_cidr: Cidr,
}

impl SourceArgs {
    fn options(&self) -> SourceOptions {
        let mut o = SourceOptions::new(self.source.clone());
        o.namespaces = self.namespaces.clone();
        o.service_cidr = self.service_cidr;
        o
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Address of the discovery gRPC server.
    #[arg(long, default_value = "0.0.0.0:15010", env = "WASMESH_LISTEN")]
    listen: SocketAddr,
    /// Address of the admin server (/ready, /live, /metrics); `off` to disable.
    #[arg(long, default_value = "0.0.0.0:15014", env = "WASMESH_ADMIN")]
    admin: String,
    /// How long a change that removes endpoints is held back, so that an endpoint moving
    /// between EndpointSlices never disappears in between (e.g. 200ms, 1s, 0 to disable).
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    removal_grace: Duration,
}

#[derive(Debug, Args)]
struct TableArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Output format: text, yaml or json.
    #[arg(short, long, default_value = "text")]
    output: Format,
    /// Only Services in this namespace.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Only this Service (name).
    service: Option<String>,
    /// Give up if the source has not listed everything by then.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    Cidr::parse(s).ok_or_else(|| format!("{s:?} is not a CIDR like 10.96.0.0/12"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 200ms, 5s or 1m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Table(args) => table(args).await,
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let source = args.source.options().build().await?;
    let listener = app::bind(args.listen, "discovery").await?;
    let admin = match args.admin.as_str() {
        "off" | "" => None,
        a => {
            let addr: SocketAddr = a.parse().with_context(|| {
                format!("--admin {a:?} is not an address like 0.0.0.0:15014 or `off`")
            })?;
            Some(app::bind(addr, "admin").await?)
        }
    };
    tracing::info!(listen = %args.listen, admin = %args.admin, source = ?args.source.source, "wasmesh-control serving");
    app::serve(
        source,
        listener,
        admin,
        args.removal_grace,
        shutdown_signal(),
    )
    .await?;
    tracing::info!("wasmesh-control stopped");
    Ok(())
}

async fn table(args: TableArgs) -> anyhow::Result<()> {
    let source = args.source.options().build().await?;
    let model = app::compute_table(source, args.timeout).await?;
    let selected = view::select(&model, args.namespace.as_deref(), args.service.as_deref());
    if selected.service_ports.is_empty() && args.service.is_some() {
        anyhow::bail!(
            "no Service {:?}{} in the table",
            args.service.unwrap_or_default(),
            args.namespace
                .map(|n| format!(" in namespace {n}"))
                .unwrap_or_default()
        );
    }
    print!(
        "{}",
        view::render(&selected, args.output).map_err(anyhow::Error::msg)?
    );
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
