//! `wasmesh-control`: the control component of wasmesh.
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use wasmesh_control::app::{self, SourceOptions, SourceSpec};
use wasmesh_control::identity;
use wasmesh_control::model::Cidr;
use wasmesh_control::view::{self, Format};

/// Watches Services, EndpointSlices, Pods, Nodes, HTTPRoutes, WasmPlugins and
/// AuthorizationPolicies and streams the service table to every wasmesh proxy.
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
    Serve(Box<ServeArgs>),
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
    /// The mesh's root namespace: WasmPlugins there apply to pods of every namespace (and are
    /// watched even when --namespaces leaves it out).
    #[arg(long, default_value = "wasmesh-system", env = "WASMESH_ROOT_NAMESPACE")]
    root_namespace: String,
}

impl SourceArgs {
    fn options(&self) -> SourceOptions {
        let mut o = SourceOptions::new(self.source.clone());
        o.namespaces = self.namespaces.clone();
        o.service_cidr = self.service_cidr;
        o.root_namespace = self.root_namespace.clone();
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
    #[command(flatten)]
    identity: IdentityArgs,
    #[command(flatten)]
    tracing: MeshTracingArgs,
}

/// Mesh-wide OpenTelemetry settings, sent to every proxy (a pod's own `OTEL_*` variables win).
#[derive(Debug, Args)]
struct MeshTracingArgs {
    /// Where every proxy exports its spans: an OTLP endpoint URL, e.g.
    /// http://otel-collector.observability:4317. Unset: proxies trace only if their pod says so.
    #[arg(long, env = "WASMESH_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The OTLP protocol of --otlp-endpoint: grpc or http/protobuf.
    #[arg(long, default_value = "grpc", value_parser = ["grpc", "http/protobuf"], env = "WASMESH_OTLP_PROTOCOL")]
    otlp_protocol: String,
    /// Ratio of new traces every proxy records (parent-based: a caller's decision is kept),
    /// from 0 to 1.
    #[arg(long, value_parser = parse_ratio, env = "WASMESH_TRACE_SAMPLING")]
    trace_sampling: Option<f64>,
}

impl MeshTracingArgs {
    fn mesh_config(&self) -> Option<wasmesh_api::discovery::MeshConfig> {
        if self.otlp_endpoint.is_none() && self.trace_sampling.is_none() {
            return None;
        }
        Some(wasmesh_api::discovery::MeshConfig {
            otlp_endpoint: self.otlp_endpoint.clone().unwrap_or_default(),
            otlp_protocol: self.otlp_protocol.clone(),
            trace_sampling: self.trace_sampling.unwrap_or(1.0),
            has_trace_sampling: self.trace_sampling.is_some(),
        })
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or_else(|| format!("{s:?}: want a ratio from 0 to 1, e.g. 0.01"))
}

/// Control as the mesh's CA: on when a root is given (`--ca-cert`/`--ca-key` or `--ca-dir`).
#[derive(Debug, Args)]
struct IdentityArgs {
    /// Trust domain of the SPIFFE IDs: spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>.
    #[arg(long, default_value = "cluster.local", env = "WASMESH_TRUST_DOMAIN")]
    trust_domain: String,
    /// CA certificate (PEM; a chain may follow it, ending in the root proxies trust). Changes to
    /// the file are picked up as a CA rotation.
    #[arg(
        long,
        env = "WASMESH_CA_CERT",
        requires = "ca_key",
        conflicts_with = "ca_dir"
    )]
    ca_cert: Option<std::path::PathBuf>,
    /// The CA certificate's private key (PEM).
    #[arg(long, env = "WASMESH_CA_KEY", requires = "ca_cert")]
    ca_key: Option<std::path::PathBuf>,
    /// Directory holding ca.pem and ca-key.pem; a root is generated there on first start.
    #[arg(long, env = "WASMESH_CA_DIR")]
    ca_dir: Option<std::path::PathBuf>,
    /// Lifetime of workload certificates (also the most a proxy may ask for), e.g. 24h or 5m.
    #[arg(long, default_value = "24h", value_parser = parse_duration, env = "WASMESH_CERT_LIFETIME")]
    cert_lifetime: Duration,
    /// How long a new CA root is trusted by every proxy before it signs.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "WASMESH_CA_PROPAGATION")]
    ca_propagation: Duration,
    /// How proxies prove who they are: `kube` (TokenReview of the pod's ServiceAccount token)
    /// or `dir:PATH` (token files <PATH>/<namespace>/<serviceaccount>/<pod>.token, the local
    /// mesh). Default: kube with the kube source.
    #[arg(long, env = "WASMESH_TOKENS")]
    tokens: Option<String>,
    /// Audiences a ServiceAccount token must carry (TokenReview); the injector projects the
    /// sidecar's token with `wasmesh-control`.
    #[arg(
        long,
        default_value = "wasmesh-control",
        value_delimiter = ',',
        env = "WASMESH_TOKEN_AUDIENCES"
    )]
    token_audiences: Vec<String>,
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
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unit must be ms, s, m or h")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match cli.command {
        Command::Serve(args) => serve(*args).await,
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
    let options = args.source.options();
    let source = options.build().await?;
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
    let identity = certificate_authority(&args.identity, &args.source.source).await?;
    tracing::info!(listen = %args.listen, admin = %args.admin, source = ?args.source.source, ca = identity.is_some(), "wasmesh-control serving");
    let mesh_config = args.tracing.mesh_config();
    if let Some(m) = &mesh_config {
        tracing::info!(otlp_endpoint = %m.otlp_endpoint, otlp_protocol = %m.otlp_protocol, trace_sampling = ?args.tracing.trace_sampling, "mesh-wide tracing settings for every proxy");
    }
    app::serve_with_identity(
        source,
        options.model().with_mesh_config(mesh_config),
        listener,
        admin,
        args.removal_grace,
        identity,
        shutdown_signal(),
    )
    .await?;
    tracing::info!("wasmesh-control stopped");
    Ok(())
}

/// The CA and token reviewer, when a root is configured; starts rotation and file watching.
async fn certificate_authority(
    args: &IdentityArgs,
    source: &SourceSpec,
) -> anyhow::Result<Option<identity::IdentityService>> {
    use identity::{Authority, AuthorityConfig, Root, TokenReviewer, reload::RootFiles};
    const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
    let (root, files) = match (&args.ca_cert, &args.ca_key, &args.ca_dir) {
        (Some(cert), Some(key), _) => (
            Root::from_files(cert, key)?,
            RootFiles {
                cert: cert.clone(),
                key: key.clone(),
            },
        ),
        (_, _, Some(dir)) => {
            let (root, created) = Root::load_or_generate(dir, &args.trust_domain, ROOT_VALIDITY)?;
            if created {
                tracing::info!(dir = %dir.display(), "generated a CA root");
            }
            (
                root,
                RootFiles {
                    cert: dir.join(identity::root::CERT_FILE),
                    key: dir.join(identity::root::KEY_FILE),
                },
            )
        }
        _ => return Ok(None),
    };
    if args.cert_lifetime < Duration::from_secs(60) {
        anyhow::bail!("--cert-lifetime must be at least 1m");
    }
    let tokens = args.tokens.clone().unwrap_or_else(|| match source {
        SourceSpec::Kube => "kube".into(),
        SourceSpec::Dir(_) => String::new(),
    });
    let reviewer = match tokens.as_str() {
        "kube" => TokenReviewer::Kube {
            client: kube::Client::try_default()
                .await
                .context("connecting to the API server for TokenReviews (--tokens kube)")?,
            audiences: args.token_audiences.clone(),
        },
        t => match t.strip_prefix("dir:") {
            Some(p) if !p.is_empty() => TokenReviewer::Dir(p.into()),
            _ => anyhow::bail!(
                "control is a CA but --tokens is {t:?}: give `kube` (TokenReview) or `dir:PATH` (token files)"
            ),
        },
    };
    let mut cfg = AuthorityConfig::new(args.trust_domain.clone());
    cfg.cert_lifetime = args.cert_lifetime;
    cfg.propagation = args.ca_propagation;
    let authority = std::sync::Arc::new(Authority::new(cfg, root));
    tracing::info!(trust_domain = %args.trust_domain, cert_lifetime = ?args.cert_lifetime, tokens = ?reviewer, "control is the mesh's CA");
    tokio::spawn(identity::authority::run_rotations(authority.clone()));
    tokio::spawn(identity::reload::watch(
        files,
        authority.clone(),
        Duration::from_secs(2),
    ));
    Ok(Some(identity::IdentityService::new(authority, reviewer)))
}

async fn table(args: TableArgs) -> anyhow::Result<()> {
    let options = args.source.options();
    let source = options.build().await?;
    let model = app::compute_table(source, options.model(), args.timeout).await?;
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
