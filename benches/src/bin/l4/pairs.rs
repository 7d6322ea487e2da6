//! The pairs under test and how each is started. Every proxied pair has the same shape: a
//! client pod and a server pod, both with the interception rules of `wasmesh-proxy init`; the
//! client connects to the Service address 10.96.0.10:80, its outbound rule redirects to the
//! client-side proxy on 127.0.0.1:15001, which connects to the server pod at :8080; the server
//! pod's inbound rule redirects that to the server-side proxy on :15006, which reads the
//! original destination and connects to the app from 127.0.0.6. The proxies run as UID 1337
//! (which the rules exempt) pinned to [`PROXY_CPU`]; the app and load tools run on
//! [`LOAD_CPU`].
//!
//! - `wasmesh`: `wasmesh-proxy run` in both pods, following `wasmesh-control serve --source
//!   dir:` (a Service 10.96.0.10:80 → the server pod's :8080), which runs in the node namespace.
//! - `envoy`: Envoy with Istio's sidecar shape in tcp_proxy mode: outbound listener with the
//!   original_dst listener filter and a filter chain matching 10.96.0.10:80 → a STATIC cluster;
//!   inbound listener with original_dst → an ORIGINAL_DST cluster bound to 127.0.0.6.
//! - `haproxy`: `mode tcp`; the outbound frontend routes on the original destination (`dst`,
//!   which HAProxy reads with SO_ORIGINAL_DST); the inbound backend is `server 0.0.0.0` (the
//!   original destination) with `source 127.0.0.6`. `haproxy-splice` adds `option splice-auto`.
//! - `wasmesh-mtls`, `envoy-mtls`: the same pairs with mTLS between the proxies, certificates
//!   from one CA ([`wasmesh_benches::harness::mtls`]): every app connection is a new TLS 1.3
//!   connection between the sidecars (tcp_proxy opens one upstream connection per downstream
//!   connection; wasmesh's L4 path likewise).
//! - `wasmesh-buffered`: the same with `--copy buffered` (no splice).
//! - `proto*`: the experiment `benches/src/bin/copy_proto.rs`, same shape.
//! - `direct`: no rules, no proxies; the client connects to the server pod's :8080.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
pub use wasmesh_benches::harness::mesh::Alt;
use wasmesh_benches::harness::mesh::{
    self, APP_PORT, ENVOY_ADMIN, LOAD_CPU, SERVICE_IP, SERVICE_PORT, as_proxy, write_config,
};
use wasmesh_benches::harness::mtls::{self, Flavor, Pki};
use wasmesh_benches::harness::netns::{Daemon, Placement, Pod, command_in};
use wasmesh_benches::harness::run::{self, Run};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Wasmesh,
    /// The wasmesh pair with mTLS between the sidecars.
    WasmeshMtls,
    /// `wasmesh-proxy run --copy buffered` (read/write through a 64 KiB buffer, no splice).
    WasmeshBuffered,
    Envoy,
    /// The Envoy pair with mTLS between the proxies (certificates from the same CA).
    EnvoyMtls,
    Haproxy,
    HaproxySplice,
    /// `copy-proto`: current-thread runtime?, inbound to loopback without a bind?
    Proto {
        current: bool,
        loopback: bool,
    },
    /// Another `wasmesh-proxy` build (`--alt`): the `index`th of [`Tools::alts`].
    Alt {
        index: usize,
        name: &'static str,
    },
}

/// Names `--pairs` accepts.
pub const KNOWN: &str = "direct, wasmesh, wasmesh-mtls, wasmesh-buffered, envoy, envoy-mtls, \
                         haproxy, haproxy-splice, proto, proto-current, proto-lo, \
                         proto-current-lo, and --alt names";

impl Kind {
    pub fn parse(name: &str, alts: &[Alt]) -> anyhow::Result<Self> {
        if let Some(index) = alts.iter().position(|a| a.name == name) {
            // Lives for the whole run.
            let name: &'static str = Box::leak(name.to_string().into_boxed_str());
            return Ok(Self::Alt { index, name });
        }
        Ok(match name {
            "direct" => Self::Direct,
            "wasmesh" => Self::Wasmesh,
            "wasmesh-mtls" => Self::WasmeshMtls,
            "wasmesh-buffered" => Self::WasmeshBuffered,
            "envoy" => Self::Envoy,
            "envoy-mtls" => Self::EnvoyMtls,
            "haproxy" => Self::Haproxy,
            "haproxy-splice" => Self::HaproxySplice,
            "proto" => Self::Proto {
                current: false,
                loopback: false,
            },
            "proto-current" => Self::Proto {
                current: true,
                loopback: false,
            },
            "proto-lo" => Self::Proto {
                current: false,
                loopback: true,
            },
            "proto-current-lo" => Self::Proto {
                current: true,
                loopback: true,
            },
            other => bail!("unknown pair {other} (known: {KNOWN})"),
        })
    }

    pub fn name(self) -> String {
        match self {
            Self::Direct => "direct".into(),
            Self::Wasmesh => "wasmesh".into(),
            Self::WasmeshMtls => "wasmesh-mtls".into(),
            Self::WasmeshBuffered => "wasmesh-buffered".into(),
            Self::Envoy => "envoy".into(),
            Self::EnvoyMtls => "envoy-mtls".into(),
            Self::Haproxy => "haproxy".into(),
            Self::HaproxySplice => "haproxy-splice".into(),
            Self::Proto { current, loopback } => format!(
                "proto{}{}",
                if current { "-current" } else { "" },
                if loopback { "-lo" } else { "" }
            ),
            Self::Alt { name, .. } => name.to_string(),
        }
    }

    /// Whether its pods get the interception rules.
    pub fn intercepted(self) -> bool {
        self != Self::Direct
    }

    /// Whether it needs wasmesh control.
    pub fn wasmesh(self) -> bool {
        matches!(
            self,
            Self::Wasmesh | Self::WasmeshMtls | Self::WasmeshBuffered | Self::Alt { .. }
        )
    }

    /// Whether it runs Envoy.
    pub fn envoy(self) -> bool {
        matches!(self, Self::Envoy | Self::EnvoyMtls)
    }

    /// Whose proxies speak mTLS to each other, if any.
    pub fn mtls(self) -> Option<Flavor> {
        match self {
            Self::WasmeshMtls => Some(Flavor::Wasmesh),
            Self::EnvoyMtls => Some(Flavor::Envoy),
            _ => None,
        }
    }
}

/// Paths of everything a run executes.
#[derive(Debug, Clone)]
pub struct Tools {
    /// This binary, for the server and the load tools.
    pub me: PathBuf,
    pub proxy: PathBuf,
    pub control: PathBuf,
    pub proto: PathBuf,
    pub envoy: Option<PathBuf>,
    pub haproxy: Option<PathBuf>,
    /// Experiment builds of wasmesh-proxy (`--alt`), paths already copied into the run folder.
    pub alts: Vec<Alt>,
    /// The run's CA and certificates, when it has mTLS pairs.
    pub pki: Option<Pki>,
    /// The node's namespace (the mTLS checks probe from there).
    pub node: String,
    /// The run's folder (configs, logs); readable by UID 1337.
    pub dir: PathBuf,
}

impl Tools {
    /// What the harness needs to start this binary's tools.
    pub fn run(&self) -> Run<'_> {
        Run {
            label: "l4",
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
    /// The target the client connects to.
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
        let mut proxies = Vec::new();
        match self.kind {
            Kind::Direct => {}
            Kind::Wasmesh | Kind::WasmeshMtls | Kind::WasmeshBuffered | Kind::Alt { .. } => {
                let (binary, env) = match self.kind {
                    Kind::Alt { index, .. } => {
                        let alt = &tools.alts[index];
                        (&alt.path, alt.env.clone())
                    }
                    Kind::WasmeshBuffered => (
                        &tools.proxy,
                        vec![("WASMESH_COPY".to_string(), "buffered".to_string())],
                    ),
                    _ => (&tools.proxy, Vec::new()),
                };
                let pki = match self.kind {
                    Kind::WasmeshMtls => Some(tools.pki.as_ref().context("no CA")?),
                    _ => None,
                };
                for (role, d) in mesh::start_wasmesh(
                    tools.run(),
                    binary,
                    &env,
                    &self.client,
                    &self.server,
                    pki,
                    &log,
                )? {
                    proxies.push((role, d.pid()));
                    daemons.push(d);
                }
            }
            Kind::Envoy | Kind::EnvoyMtls => {
                let envoy = tools.envoy.as_ref().context("no envoy")?;
                let pki = match self.kind {
                    Kind::EnvoyMtls => Some(tools.pki.as_ref().context("no CA")?),
                    _ => None,
                };
                for (role, d) in mesh::start_envoy(
                    tools.run(),
                    envoy,
                    (&self.client, envoy_outbound(self.server.ip, pki)),
                    (&self.server, envoy_inbound(pki)),
                    &log,
                )? {
                    proxies.push((role, d.pid()));
                    daemons.push(d);
                }
            }
            Kind::Haproxy | Kind::HaproxySplice => {
                let haproxy = tools.haproxy.as_ref().context("no haproxy")?;
                let splice = self.kind == Kind::HaproxySplice;
                for (role, pod, cfg) in [
                    (
                        "client",
                        &self.client,
                        haproxy_outbound(self.server.ip, splice),
                    ),
                    ("server", &self.server, haproxy_inbound(splice)),
                ] {
                    let path = tools.dir.join(format!("haproxy-{role}.cfg"));
                    write_config(&path, &cfg)?;
                    let args = vec![
                        "-db".to_string(),
                        "-f".into(),
                        path.to_string_lossy().into(),
                    ];
                    let d = Daemon::spawn(
                        &format!("haproxy ({role})"),
                        command_in(&as_proxy(pod), haproxy, &args),
                        log(role),
                    )?;
                    proxies.push((role, d.pid()));
                    daemons.push(d);
                }
            }
            Kind::Proto { current, loopback } => {
                for (role, pod) in [("client", &self.client), ("server", &self.server)] {
                    let args = vec![
                        "--runtime".to_string(),
                        if current { "current" } else { "multi" }.into(),
                        "--inbound-to".into(),
                        if loopback { "loopback" } else { "pod" }.into(),
                        "--route".into(),
                        format!("{SERVICE_IP}:{SERVICE_PORT}={}:{APP_PORT}", self.server.ip),
                    ];
                    let d = Daemon::spawn(
                        &format!("copy-proto ({role})"),
                        command_in(&as_proxy(pod), &tools.proto, &args),
                        log(role),
                    )?;
                    proxies.push((role, d.pid()));
                    daemons.push(d);
                }
            }
        }
        let mut running = Running {
            daemons,
            proxies,
            server_pid,
            target: self.target(),
        };
        let probed = tool_ok(
            tools,
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
        probed.with_context(|| format!("{}: the first request did not go through", tag))?;
        Ok(running)
    }
}

/// Runs one of this binary's tools inside `ns` on the load core; returns its stdout.
pub fn tool(tools: &Tools, ns: &str, args: &[&str], limit: Duration) -> anyhow::Result<String> {
    run::tool(tools.run(), ns, args, limit)
}

fn tool_ok(tools: &Tools, ns: &str, args: &[&str]) -> anyhow::Result<()> {
    run::tool_ok(tools.run(), ns, args)
}

// ---------------------------------------------------------------------------------------------
// Envoy (static config; admin on 127.0.0.1:15000 for /ready, as in an Istio sidecar)

/// With `pki`, the cluster speaks mTLS to the server side.
fn envoy_outbound(server: Ipv4Addr, pki: Option<&Pki>) -> String {
    let mut s = String::from(ENVOY_ADMIN);
    let _ = write!(
        s,
        r#"static_resources:
  listeners:
  - name: outbound
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
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: outbound_bench
          cluster: bench
  clusters:
  - name: bench
    type: STATIC
    connect_timeout: 1s
    lb_policy: LEAST_REQUEST
{tls}    load_assignment:
      cluster_name: bench
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {server}, port_value: {APP_PORT} }}
"#,
        tls = pki
            .map(|p| mtls::envoy_upstream_tls(p, 4))
            .unwrap_or_default(),
    );
    s
}

/// With `pki`, the listener requires mTLS.
fn envoy_inbound(pki: Option<&Pki>) -> String {
    let mut s = String::from(ENVOY_ADMIN);
    let _ = write!(
        s,
        r#"static_resources:
  listeners:
  - name: inbound
    address:
      socket_address: {{ address: 0.0.0.0, port_value: 15006 }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: inbound_bench
          cluster: inbound_passthrough
{tls}  clusters:
  - name: inbound_passthrough
    type: ORIGINAL_DST
    connect_timeout: 1s
    lb_policy: CLUSTER_PROVIDED
    upstream_bind_config:
      source_address: {{ address: 127.0.0.6, port_value: 0 }}
"#,
        tls = pki
            .map(|p| mtls::envoy_downstream_tls(p, 6))
            .unwrap_or_default(),
    );
    s
}

// ---------------------------------------------------------------------------------------------
// HAProxy (one thread, like the others; no stats socket, no logging)

fn haproxy_head(splice: bool) -> String {
    format!(
        "global\n  nbthread 1\n  maxconn 4000\n\ndefaults\n  mode tcp\n  timeout connect 1s\n  \
         timeout client 1h\n  timeout server 1h\n{}\n",
        if splice { "  option splice-auto\n" } else { "" }
    )
}

fn haproxy_outbound(server: Ipv4Addr, splice: bool) -> String {
    format!(
        "{}frontend outbound\n  bind 127.0.0.1:15001\n  \
         use_backend bench if {{ dst {SERVICE_IP} }} {{ dst_port {SERVICE_PORT} }}\n\n\
         backend bench\n  server s1 {server}:{APP_PORT}\n",
        haproxy_head(splice)
    )
}

fn haproxy_inbound(splice: bool) -> String {
    format!(
        "{}frontend inbound\n  bind 0.0.0.0:15006\n  default_backend app\n\n\
         backend app\n  source 127.0.0.6\n  server app 0.0.0.0\n",
        haproxy_head(splice)
    )
}
