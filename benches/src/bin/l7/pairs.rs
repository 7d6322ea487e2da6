//! The pairs under test and how each is started; the shape (pods, interception, cores, UID) is
//! the harness's ([`wasmesh_benches::harness::mesh`]).
//!
//! - `wasmesh`: `wasmesh-proxy run` in both pods, following control, whose Service port is
//!   named `http` (declared HTTP: the client side serves it with its L7 path at once, no
//!   detection wait). The client-side proxy parses every request, routes it and sends it on a
//!   pooled connection (HTTP/1.1 to HTTP/1.1, HTTP/2 multiplexed on one connection per
//!   endpoint); the server-side proxy runs the build's inbound path: L4 (bytes copied to
//!   the app) before commit e73d66a, L7 (hyper, pooled connections to the app) from it on.
//! - `envoy`: Envoy with the HTTP connection manager on both sides, Istio's sidecar shape:
//!   outbound listener with the original_dst listener filter, a filter chain matching
//!   10.96.0.10:80 → HCM (codec AUTO) → router → a STATIC cluster at the server pod's :8080;
//!   inbound listener with original_dst → HCM → router → an ORIGINAL_DST cluster bound to
//!   127.0.0.6; the listeners' `traffic_direction` OUTBOUND and INBOUND. Both clusters speak
//!   upstream what the client spoke downstream (`use_downstream_protocol_config`). No access log; stats off (`reject_all`).
//! - `wasmesh-mtls`: `wasmesh` with mTLS between the sidecars (certificates from control as the
//!   CA, [`wasmesh_benches::harness::mtls`]); the client side carries HTTP/1.1 requests over one
//!   HTTP/2 mTLS connection per endpoint, the server side gives the app HTTP/1.1 again.
//! - `envoy-mtls`: `envoy` with mTLS between the Envoys (certificates from the same CA): an
//!   UpstreamTlsContext on the client's cluster, a DownstreamTlsContext requiring the client's
//!   certificate on the inbound listener; upstream protocol = downstream protocol.
//! - `envoy-mtls-h2`: `envoy-mtls` with HTTP/2 between the Envoys whatever the app speaks and
//!   HTTP/1.1 from the inbound Envoy to the app (Istio's sidecars upgrade to HTTP/2 between
//!   them): measured with HTTP/1.1 only — for HTTP/2 it is `envoy-mtls`.
//! - `wasmesh-traceN` (`wasmesh-trace1`, `wasmesh-trace100`, any N from 1 to 100): `wasmesh`
//!   with OpenTelemetry tracing on, from the pod's standard variables: OTLP/gRPC (or OTLP/HTTP,
//!   `--otlp-protocol`) to the run's receiver ([`crate::otlp`], in the node's namespace), the
//!   sampler `parentbased_traceidratio` at N %. The load generator sends no `traceparent`, so
//!   the client sidecar starts every trace and samples N % of them; the server sidecar follows
//!   the decision it gets in the `traceparent` the client sidecar adds. Batching: the exporter's
//!   defaults.
//! - `envoy-traceN` (`envoy-trace1`, `envoy-trace100`): `envoy` with its OpenTelemetry tracer
//!   (`envoy.tracers.opentelemetry`) in both HCMs, exporting over OTLP/gRPC (or OTLP/HTTP,
//!   `--otlp-protocol`) to the same receiver through a STATIC cluster `otlp`, `random_sampling`
//!   N %: the client Envoy samples N % of the new traces, the server Envoy follows the
//!   `traceparent` it gets. Span kinds from the listeners' `traffic_direction` (client span on
//!   the outbound side, server span on the inbound side, as Istio sets them). Batching: Envoy's
//!   defaults (an export every 5 spans or every 5 s, per worker), or every N spans with
//!   `--envoy-flush-spans N`. Stats: only the tracing counters and `downstream_rq_total` the
//!   span check reads.
//! - `wasmesh-wasm` / `envoy-wasm`: `wasmesh` / `envoy` with the same Proxy-Wasm filter on the
//!   client side's outbound HTTP path: `filters/header-route` (one request header and one
//!   response header set, [`WASM_CONFIG`]), the same `.wasm` file. wasmesh gets it as a
//!   WasmPlugin (mode CLIENT, port 80) in control's folder, written before the pair starts
//!   (removed before any other wasmesh pair starts); Envoy as `envoy.filters.http.wasm` (V8)
//!   before the router in the outbound HCM. The filter's cost is the difference with the pair
//!   without it, same run.
//! - `direct`: no rules, no proxies; the client connects to the server pod's :8080.
//! - `--alt NAME=PATH`: another wasmesh-proxy build, run like `wasmesh`.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use wasmesh_benches::harness::mesh::{
    self, APP_PORT, Alt, ENVOY_ADMIN, LOAD_CPU, SERVICE_IP, SERVICE_PORT,
};
use wasmesh_benches::harness::mtls::{self, Flavor, Pki};
use wasmesh_benches::harness::netns::{Daemon, NODE_IP, Placement, Pod, command_in};
use wasmesh_benches::harness::run::{self, Run};

use crate::load::Proto;
use crate::trace_check::Receiver;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Wasmesh,
    /// The wasmesh pair with mTLS between the sidecars.
    WasmeshMtls,
    Envoy,
    /// The Envoy pair with mTLS between the Envoys, upstream protocol = downstream protocol.
    EnvoyMtls,
    /// The same, HTTP/2 between the Envoys and HTTP/1.1 to the app.
    EnvoyMtlsH2,
    /// The wasmesh pair with the Wasm filter on the client side.
    WasmeshWasm,
    /// The Envoy pair with the same Wasm filter on the client side.
    EnvoyWasm,
    /// The wasmesh pair with tracing on, sampling `percent` % of new traces.
    Traced {
        percent: u8,
    },
    /// The Envoy pair with its OpenTelemetry tracer on, sampling `percent` % of new traces.
    EnvoyTraced {
        percent: u8,
    },
    /// Another `wasmesh-proxy` build (`--alt`): the `index`th of [`Tools::alts`].
    Alt {
        index: usize,
        name: &'static str,
    },
}

impl Kind {
    pub fn parse(name: &str, alts: &[Alt]) -> anyhow::Result<Self> {
        if let Some(index) = alts.iter().position(|a| a.name == name) {
            // Lives for the whole run.
            let name: &'static str = Box::leak(name.to_string().into_boxed_str());
            return Ok(Self::Alt { index, name });
        }
        for (prefix, envoy) in [("wasmesh-trace", false), ("envoy-trace", true)] {
            if let Some(n) = name.strip_prefix(prefix) {
                return match (n.parse::<u8>(), envoy) {
                    (Ok(percent @ 1..=100), false) => Ok(Self::Traced { percent }),
                    (Ok(percent @ 1..=100), true) => Ok(Self::EnvoyTraced { percent }),
                    _ => bail!("pair {name}: {prefix}N samples N % of the traces, N from 1 to 100"),
                };
            }
        }
        Ok(match name {
            "direct" => Self::Direct,
            "wasmesh" => Self::Wasmesh,
            "wasmesh-mtls" => Self::WasmeshMtls,
            "envoy" => Self::Envoy,
            "envoy-mtls" => Self::EnvoyMtls,
            "envoy-mtls-h2" => Self::EnvoyMtlsH2,
            "wasmesh-wasm" => Self::WasmeshWasm,
            "envoy-wasm" => Self::EnvoyWasm,
            other => bail!(
                "unknown pair {other} (known: direct, wasmesh, wasmesh-mtls, wasmesh-trace1, \
                 wasmesh-trace100 (any wasmesh-traceN, N from 1 to 100), wasmesh-wasm, envoy, \
                 envoy-mtls, envoy-mtls-h2, envoy-trace1, envoy-trace100 (any envoy-traceN), \
                 envoy-wasm, and --alt names)"
            ),
        })
    }

    pub fn name(self) -> String {
        match self {
            Self::Direct => "direct".into(),
            Self::Wasmesh => "wasmesh".into(),
            Self::WasmeshMtls => "wasmesh-mtls".into(),
            Self::Envoy => "envoy".into(),
            Self::EnvoyMtls => "envoy-mtls".into(),
            Self::EnvoyMtlsH2 => "envoy-mtls-h2".into(),
            Self::WasmeshWasm => "wasmesh-wasm".into(),
            Self::EnvoyWasm => "envoy-wasm".into(),
            Self::Traced { percent } => format!("wasmesh-trace{percent}"),
            Self::EnvoyTraced { percent } => format!("envoy-trace{percent}"),
            Self::Alt { name, .. } => name.to_string(),
        }
    }

    /// Whether it needs wasmesh control.
    pub fn wasmesh(self) -> bool {
        matches!(
            self,
            Self::Wasmesh
                | Self::WasmeshMtls
                | Self::WasmeshWasm
                | Self::Traced { .. }
                | Self::Alt { .. }
        )
    }

    /// Whether it runs the Wasm filter.
    pub fn wasm(self) -> bool {
        matches!(self, Self::WasmeshWasm | Self::EnvoyWasm)
    }

    /// The share of new traces it samples, when it traces.
    pub fn tracing(self) -> Option<f64> {
        match self {
            Self::Traced { percent } | Self::EnvoyTraced { percent } => {
                Some(f64::from(percent) / 100.0)
            }
            _ => None,
        }
    }

    /// The pair a tracing pair is compared with: the same proxies with tracing off.
    pub fn untraced(self) -> Self {
        match self {
            Self::Traced { .. } => Self::Wasmesh,
            Self::EnvoyTraced { .. } => Self::Envoy,
            other => other,
        }
    }

    /// Whether it runs Envoy.
    pub fn envoy(self) -> bool {
        matches!(
            self,
            Self::Envoy
                | Self::EnvoyMtls
                | Self::EnvoyMtlsH2
                | Self::EnvoyWasm
                | Self::EnvoyTraced { .. }
        )
    }

    /// Whose proxies it runs.
    pub fn flavor(self) -> Flavor {
        if self.envoy() {
            Flavor::Envoy
        } else {
            Flavor::Wasmesh
        }
    }

    /// Whose proxies speak mTLS to each other, if any.
    pub fn mtls(self) -> Option<Flavor> {
        match self {
            Self::WasmeshMtls => Some(Flavor::Wasmesh),
            Self::EnvoyMtls | Self::EnvoyMtlsH2 => Some(Flavor::Envoy),
            _ => None,
        }
    }

    /// Whether it is measured with this protocol (`envoy-mtls-h2` is `envoy-mtls` for HTTP/2).
    pub fn measures(self, proto: Proto) -> bool {
        !(self == Self::EnvoyMtlsH2 && proto == Proto::H2)
    }
}

/// Paths of everything a run executes.
#[derive(Debug, Clone)]
pub struct Tools {
    /// This binary, for the app and the load tools.
    pub me: PathBuf,
    pub proxy: PathBuf,
    pub control: PathBuf,
    pub envoy: Option<PathBuf>,
    /// Experiment builds of wasmesh-proxy (`--alt`), paths already copied into the run folder.
    pub alts: Vec<Alt>,
    /// The run's CA and certificates, when it has mTLS pairs.
    pub pki: Option<Pki>,
    /// The OTLP receiver's address (in the node's namespace), when the run has tracing pairs.
    pub otlp: Option<Receiver>,
    /// The Wasm filter's module (a copy in the run folder), when the run has Wasm pairs.
    pub wasm: Option<PathBuf>,
    /// The Envoy tracers' export batch (runtime `tracing.opentelemetry.min_flush_spans`), when
    /// not Envoy's default (5).
    pub envoy_flush_spans: Option<u32>,
    /// The node's namespace (the mTLS checks probe from there).
    pub node: String,
    /// The run's folder (configs, logs); readable by UID 1337.
    pub dir: PathBuf,
}

impl Tools {
    pub fn run(&self) -> Run<'_> {
        Run {
            label: "l7",
            me: &self.me,
            dir: &self.dir,
        }
    }
}

/// A pair: its kind and its two pods.
#[derive(Debug, Clone)]
pub struct Pair {
    pub kind: Kind,
    pub client: Pod,
    pub server: Pod,
}

/// A started pair.
#[derive(Debug)]
pub struct Running {
    pub daemons: Vec<Daemon>,
    /// (role, pid) of each proxy process.
    pub proxies: Vec<(&'static str, u32)>,
    pub server_pid: u32,
    /// Where the client connects.
    pub target: SocketAddr,
}

impl Running {
    /// Fails if any process of the pair has exited.
    pub fn check(&mut self) -> anyhow::Result<()> {
        for d in &mut self.daemons {
            d.check()?;
        }
        Ok(())
    }
}

impl Pair {
    pub fn target(&self) -> SocketAddr {
        match self.kind {
            Kind::Direct => SocketAddr::V4(SocketAddrV4::new(self.server.ip, APP_PORT)),
            _ => SocketAddr::V4(SocketAddrV4::new(SERVICE_IP, SERVICE_PORT)),
        }
    }

    /// Starts the app and the proxies and waits until a request goes through.
    pub fn start(&self, tools: &Tools, round: usize) -> anyhow::Result<Running> {
        let tag = format!("{}-r{round}", self.kind.name());
        let log = |what: &str| tools.dir.join(format!("{tag}-{what}.log"));
        let mut daemons = Vec::new();
        let server = Daemon::spawn(
            "app server",
            command_in(
                &Placement {
                    ns: &self.server.ns,
                    cpu: LOAD_CPU,
                    uid: None,
                },
                &tools.me,
                &[
                    "__serve".into(),
                    "--listen".into(),
                    format!("0.0.0.0:{APP_PORT}"),
                    "--max-secs".into(),
                    "7200".into(),
                ],
            ),
            log("app"),
        )?;
        let server_pid = server.pid();
        daemons.push(server);
        let started = match self.kind {
            Kind::Direct => Vec::new(),
            Kind::Wasmesh
            | Kind::WasmeshMtls
            | Kind::WasmeshWasm
            | Kind::Traced { .. }
            | Kind::Alt { .. } => {
                let wasm = match self.kind {
                    Kind::WasmeshWasm => Some(tools.wasm.as_deref().context("no Wasm module")?),
                    _ => None,
                };
                set_wasm_plugin(tools, wasm)?;
                let (binary, env) = match self.kind {
                    Kind::Alt { index, .. } => {
                        let alt = &tools.alts[index];
                        (&alt.path, alt.env.clone())
                    }
                    Kind::Traced { percent } => (
                        &tools.proxy,
                        tracing_env(
                            tools.otlp.as_ref().context("no OTLP receiver")?,
                            f64::from(percent) / 100.0,
                        ),
                    ),
                    _ => (&tools.proxy, Vec::new()),
                };
                let pki = match self.kind {
                    Kind::WasmeshMtls => Some(tools.pki.as_ref().context("no CA")?),
                    _ => None,
                };
                mesh::start_wasmesh(
                    tools.run(),
                    binary,
                    &env,
                    &self.client,
                    &self.server,
                    pki,
                    &log,
                )?
            }
            Kind::Envoy
            | Kind::EnvoyMtls
            | Kind::EnvoyMtlsH2
            | Kind::EnvoyWasm
            | Kind::EnvoyTraced { .. } => {
                let pki = match self.kind {
                    Kind::EnvoyMtls | Kind::EnvoyMtlsH2 => {
                        Some(tools.pki.as_ref().context("no CA")?)
                    }
                    _ => None,
                };
                let h2 = self.kind == Kind::EnvoyMtlsH2;
                let wasm = match self.kind {
                    Kind::EnvoyWasm => Some(tools.wasm.as_deref().context("no Wasm module")?),
                    _ => None,
                };
                let tracer = |service| -> anyhow::Result<_> {
                    Ok(match self.kind {
                        Kind::EnvoyTraced { percent } => Some(EnvoyTracer {
                            receiver: tools.otlp.as_ref().context("no OTLP receiver")?,
                            percent,
                            service,
                            flush_spans: tools.envoy_flush_spans,
                        }),
                        _ => None,
                    })
                };
                mesh::start_envoy(
                    tools.run(),
                    tools.envoy.as_ref().context("no envoy")?,
                    (
                        &self.client,
                        envoy_outbound(self.server.ip, pki, h2, wasm, tracer("client")?.as_ref()),
                    ),
                    (
                        &self.server,
                        envoy_inbound(pki, h2, tracer("server")?.as_ref()),
                    ),
                    &log,
                )?
            }
        };
        let mut proxies = Vec::new();
        for (role, d) in started {
            proxies.push((role, d.pid()));
            daemons.push(d);
        }
        let mut running = Running {
            daemons,
            proxies,
            server_pid,
            target: self.target(),
        };
        let probed = run::tool_ok(
            tools.run(),
            &self.client.ns,
            &[
                "__probe",
                "--to",
                &self.target().to_string(),
                "--secs",
                "30",
            ],
        );
        running.check()?;
        probed.with_context(|| format!("{tag}: the first request did not go through"))?;
        Ok(running)
    }
}

/// The Wasm pairs' filter configuration: filters/header-route setting one request header and
/// one response header (as `proxy/wasm/benches/added_latency.rs`).
pub const WASM_CONFIG: &str =
    r#"{"request": {"set": {"x-added": "1"}}, "response": {"set": {"x-served-by": "wasm"}}}"#;

/// The plugin's name (wasmesh's metrics label, Envoy's root id).
pub const WASM_PLUGIN: &str = "header-route";

/// Writes the WasmPlugin for `module` into control's folder (or, without, removes it) and, when
/// that changed anything, gives control time to send it on before sidecars start.
fn set_wasm_plugin(tools: &Tools, module: Option<&Path>) -> anyhow::Result<()> {
    let path = tools.dir.join("control").join("wasm.yaml");
    let want = module.map(|m| {
        format!(
            "apiVersion: wasmesh.io/v1alpha1
kind: WasmPlugin
metadata: {{ name: {WASM_PLUGIN}, namespace: default }}
spec:
  url: file://{}
  pluginConfig: {WASM_CONFIG}
  match:
  - mode: CLIENT
    ports: [{{ number: {SERVICE_PORT} }}]
",
            m.display()
        )
    });
    let have = std::fs::read_to_string(&path).ok();
    if have == want {
        return Ok(());
    }
    match &want {
        Some(text) => {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?
        }
    }
    // Control notices folder changes within its debounce (well under a second).
    std::thread::sleep(std::time::Duration::from_secs(2));
    Ok(())
}

/// The pod environment of a tracing pair: OTLP over `protocol` (`grpc`, `http/protobuf`) to
/// `receiver`, parent-based sampling of `ratio` of the new traces, everything else the
/// defaults (batching included).
pub fn tracing_env(receiver: &Receiver, ratio: f64) -> Vec<(String, String)> {
    [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{}", receiver.addr),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", receiver.protocol.to_string()),
        (
            "OTEL_TRACES_SAMPLER",
            "parentbased_traceidratio".to_string(),
        ),
        ("OTEL_TRACES_SAMPLER_ARG", ratio.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Where the run's OTLP receiver listens: the node's bridge address, reachable from every pod
/// (where control listens too).
pub fn otlp_address() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(NODE_IP, 4317))
}

// ---------------------------------------------------------------------------------------------
// Envoy (static config): HTTP connection manager + router on both sides

/// Stats off: no stat is instantiated (the admin's /ready still answers).
const ENVOY_STATS: &str = "stats_config:\n  stats_matcher: { reject_all: true }\n";

/// Upstream HTTP/1.1 when the client spoke HTTP/1.1, HTTP/2 when it spoke HTTP/2.
const DOWNSTREAM_PROTOCOL: &str = r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        use_downstream_protocol_config:
          http_protocol_options: {}
          http2_protocol_options: {}
"#;

/// Upstream HTTP/2 whatever the client spoke (between the Envoys of `envoy-mtls-h2`).
const UPSTREAM_H2: &str = r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}
"#;

/// Upstream HTTP/1.1 (to the app, in `envoy-mtls-h2`).
const UPSTREAM_H1: &str = r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http_protocol_options: {}
"#;

/// Stats off; or (mTLS pairs) only the TLS stats the checks read; or (tracing pairs) only the
/// tracing counters and the request count of the HCM `stat_prefix` that the span check reads.
fn stats(pki: Option<&Pki>, tracer: Option<&EnvoyTracer<'_>>, stat_prefix: &str) -> String {
    match (pki, tracer) {
        (Some(_), _) => mtls::ENVOY_SSL_STATS_ONLY.to_string(),
        (None, Some(_)) => format!(
            r#"stats_config:
  stats_matcher:
    inclusion_list:
      patterns:
      - prefix: "tracing.opentelemetry."
      - prefix: "http.{stat_prefix}.tracing."
      - exact: "http.{stat_prefix}.downstream_rq_total"
"#
        ),
        (None, None) => ENVOY_STATS.to_string(),
    }
}

/// A tracing Envoy's OpenTelemetry tracer: where it exports, what it samples, its
/// `service.name`, and (when not Envoy's default, an export every 5 spans) how many spans a
/// worker buffers before it exports.
#[derive(Debug, Clone, Copy)]
pub struct EnvoyTracer<'a> {
    pub receiver: &'a Receiver,
    pub percent: u8,
    pub service: &'static str,
    pub flush_spans: Option<u32>,
}

impl EnvoyTracer<'_> {
    /// A top-level `layered_runtime` setting the export batch, when one is given.
    fn runtime(&self) -> String {
        self.flush_spans
            .map(|n| {
                format!(
                    "layered_runtime:\n  layers:\n  - name: static\n    static_layer:\n      \
                     tracing.opentelemetry.min_flush_spans: {n}\n"
                )
            })
            .unwrap_or_default()
    }

    /// The HCM's `tracing:` (indented for [`hcm`]): the OpenTelemetry tracer exporting to the
    /// `otlp` cluster, over OTLP/gRPC or OTLP/HTTP as the receiver was started for.
    fn hcm_tracing(&self) -> String {
        let exporter = match self.receiver.protocol {
            "http/protobuf" => format!(
                "                http_service:\n                  http_uri: {{ uri: \"http://{}/v1/traces\", cluster: otlp, timeout: 1s }}\n",
                self.receiver.addr
            ),
            _ => "                grpc_service:\n                  envoy_grpc: { cluster_name: otlp }\n                  timeout: 1s\n".to_string(),
        };
        format!(
            r#"          tracing:
            random_sampling: {{ value: {percent} }}
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
{exporter}                service_name: {service}
"#,
            percent = self.percent,
            service = self.service,
        )
    }

    /// The `otlp` cluster (a `clusters:` entry): the receiver, over HTTP/2 for gRPC, HTTP/1.1
    /// for OTLP/HTTP.
    fn cluster(&self) -> String {
        let protocol = match self.receiver.protocol {
            "http/protobuf" => UPSTREAM_H1,
            _ => UPSTREAM_H2,
        };
        format!(
            r#"  - name: otlp
    type: STATIC
    connect_timeout: 1s
{protocol}    load_assignment:
      cluster_name: otlp
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {}, port_value: {} }}
"#,
            self.receiver.addr.ip(),
            self.receiver.addr.port(),
        )
    }
}

/// An HCM (codec AUTO: HTTP/1.1, or HTTP/2 from its preface) routing everything to `cluster`
/// (with `wasm`, through the Wasm filter first; with `tracer`, tracing); indented as a filter
/// chain's `filters:` list.
fn hcm(
    stat_prefix: &str,
    cluster: &str,
    wasm: Option<&Path>,
    tracer: Option<&EnvoyTracer<'_>>,
) -> String {
    let wasm = wasm.map(envoy_wasm_filter).unwrap_or_default();
    let tracing = tracer.map(EnvoyTracer::hcm_tracing).unwrap_or_default();
    format!(
        r#"      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {stat_prefix}
          codec_type: AUTO
{tracing}          route_config:
            name: {cluster}
            virtual_hosts:
            - name: {cluster}
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: {cluster}, timeout: 0s }}
          http_filters:
{wasm}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
    )
}

/// `envoy.filters.http.wasm` (V8) running `module` with [`WASM_CONFIG`], as an HCM
/// `http_filters:` entry (before the router).
fn envoy_wasm_filter(module: &Path) -> String {
    format!(
        r#"          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {WASM_PLUGIN}
                root_id: {WASM_PLUGIN}
                vm_config:
                  vm_id: {WASM_PLUGIN}
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: {} }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {}
"#,
        module.display(),
        serde_json::to_string(WASM_CONFIG).unwrap_or_default(),
    )
}

/// With `pki`, the cluster speaks mTLS to the server side; with `h2`, HTTP/2; with `wasm`, the
/// Wasm filter runs before the router; with `tracer`, the HCM traces.
fn envoy_outbound(
    server: Ipv4Addr,
    pki: Option<&Pki>,
    h2: bool,
    wasm: Option<&Path>,
    tracer: Option<&EnvoyTracer<'_>>,
) -> String {
    const PREFIX: &str = "outbound_bench";
    let mut s = format!(
        "{ENVOY_ADMIN}{}{}",
        stats(pki, tracer, PREFIX),
        tracer.map(EnvoyTracer::runtime).unwrap_or_default()
    );
    let _ = write!(
        s,
        r#"static_resources:
  listeners:
  - name: outbound
    traffic_direction: OUTBOUND
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 15001 }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:
    - filter_chain_match:
        prefix_ranges: [{{ address_prefix: {SERVICE_IP}, prefix_len: 32 }}]
        destination_port: {SERVICE_PORT}
      filters:
{hcm}  clusters:
  - name: bench
    type: STATIC
    connect_timeout: 1s
    lb_policy: LEAST_REQUEST
{protocol}{tls}    load_assignment:
      cluster_name: bench
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {server}, port_value: {APP_PORT} }}
{otlp}"#,
        hcm = hcm(PREFIX, "bench", wasm, tracer),
        protocol = if h2 { UPSTREAM_H2 } else { DOWNSTREAM_PROTOCOL },
        tls = pki
            .map(|p| mtls::envoy_upstream_tls(p, 4))
            .unwrap_or_default(),
        otlp = tracer.map(EnvoyTracer::cluster).unwrap_or_default(),
    );
    s
}

/// With `pki`, the listener requires mTLS; with `h1_to_app`, the app gets HTTP/1.1; with
/// `tracer`, the HCM traces.
fn envoy_inbound(pki: Option<&Pki>, h1_to_app: bool, tracer: Option<&EnvoyTracer<'_>>) -> String {
    const PREFIX: &str = "inbound_bench";
    format!(
        r#"{ENVOY_ADMIN}{stats}{runtime}static_resources:
  listeners:
  - name: inbound
    traffic_direction: INBOUND
    address:
      socket_address: {{ address: 0.0.0.0, port_value: 15006 }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:
    - filters:
{hcm}{tls}  clusters:
  - name: inbound_app
    type: ORIGINAL_DST
    connect_timeout: 1s
    lb_policy: CLUSTER_PROVIDED
{protocol}    upstream_bind_config:
      source_address: {{ address: 127.0.0.6, port_value: 0 }}
{otlp}"#,
        stats = stats(pki, tracer, PREFIX),
        runtime = tracer.map(EnvoyTracer::runtime).unwrap_or_default(),
        hcm = hcm(PREFIX, "inbound_app", None, tracer),
        tls = pki
            .map(|p| mtls::envoy_downstream_tls(p, 6))
            .unwrap_or_default(),
        protocol = if h1_to_app {
            UPSTREAM_H1
        } else {
            DOWNSTREAM_PROTOCOL
        },
        otlp = tracer.map(EnvoyTracer::cluster).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Envoy accepts every configuration the Envoy pairs run (`--mode validate`: the config
    /// parsed, every extension found, the clusters built), the tracing pairs' for both export
    /// protocols included; and a tracing pair's Envoys send their spans to the run's receiver.
    #[test]
    fn envoy_accepts_every_config_the_envoy_pairs_run() {
        let envoy = run::find_envoy(None).expect("envoy (`.ci/run` installs it)");
        let dir =
            std::env::temp_dir().join(format!("wasmesh-l7-envoy-configs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki::create(&dir).unwrap();
        let server = Ipv4Addr::new(10, 244, 0, 12);
        let receivers = ["grpc", "http/protobuf"].map(|protocol| Receiver {
            addr: otlp_address(),
            pid: 0,
            protocol,
        });
        let tracers: Vec<_> = receivers
            .iter()
            .zip([None, Some(512)])
            .map(|(receiver, flush_spans)| {
                [
                    EnvoyTracer {
                        receiver,
                        percent: 1,
                        service: "client",
                        flush_spans,
                    },
                    EnvoyTracer {
                        receiver,
                        percent: 1,
                        service: "server",
                        flush_spans,
                    },
                ]
            })
            .collect();
        let mut configs = vec![
            ("plain-out", envoy_outbound(server, None, false, None, None)),
            ("plain-in", envoy_inbound(None, false, None)),
            (
                "mtls-out",
                envoy_outbound(server, Some(&pki), false, None, None),
            ),
            ("mtls-in", envoy_inbound(Some(&pki), false, None)),
            (
                "mtls-h2-out",
                envoy_outbound(server, Some(&pki), true, None, None),
            ),
            ("mtls-h2-in", envoy_inbound(Some(&pki), true, None)),
        ];
        for [client, server_side] in &tracers {
            let out = envoy_outbound(server, None, false, None, Some(client));
            let inb = envoy_inbound(None, false, Some(server_side));
            for text in [&out, &inb] {
                let protocol = client.receiver.protocol;
                let want = match protocol {
                    "grpc" => "envoy_grpc: { cluster_name: otlp }".to_string(),
                    _ => format!("uri: \"http://{}/v1/traces\"", otlp_address()),
                };
                assert!(text.contains(&want), "{protocol}: no {want} in\n{text}");
                assert!(
                    text.contains("socket_address: { address: 10.244.0.1, port_value: 4317 }"),
                    "{text}"
                );
                assert!(text.contains("random_sampling: { value: 1 }"), "{text}");
                assert_eq!(
                    text.contains("tracing.opentelemetry.min_flush_spans: 512"),
                    client.flush_spans.is_some(),
                    "{text}"
                );
            }
            let (out_name, in_name) = match client.receiver.protocol {
                "grpc" => ("trace-grpc-out", "trace-grpc-in"),
                _ => ("trace-http-out", "trace-http-in"),
            };
            configs.push((out_name, out));
            configs.push((in_name, inb));
        }
        for (name, text) in &configs {
            let path = dir.join(format!("{name}.yaml"));
            std::fs::write(&path, text).unwrap();
            let out = std::process::Command::new(&envoy)
                .args(["--mode", "validate", "-l", "error", "-c"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "envoy rejects the {name} config: {}{}\n{text}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
