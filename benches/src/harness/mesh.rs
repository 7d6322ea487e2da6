//! The pieces of a pair every bench starts the same way. A pair is a client pod and a server
//! pod; a proxied pair has the interception rules of `wasmesh-proxy init` in both, so the client
//! connecting to the Service address 10.96.0.10:80 is redirected to its proxy on
//! 127.0.0.1:15001, which connects to the server pod's :8080; the server pod's inbound rule
//! redirects that to the server-side proxy on :15006, which connects to the app from
//! 127.0.0.6. The proxies run as UID 1337 (which the rules exempt) pinned to [`PROXY_CPU`]; the
//! app, the load tools and control run on [`LOAD_CPU`].
//!
//! Here: wasmesh control following a folder with the bench's Service ([`start_control`]), as
//! the mesh's CA too when the run has mTLS pairs, a wasmesh sidecar pair with or without mTLS
//! ([`start_wasmesh`]), an Envoy pair from two configs ([`start_envoy`]), and what a phase cost
//! the pair's processes ([`measure`]).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::mtls::{self, NAMESPACE, Pki};
use super::netns::{Daemon, NODE_IP, Placement, Pod, Topology, command_in};
use super::procfs;
use super::run::{Run, tool, tool_ok};

pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const SERVICE_PORT: u16 = 80;
pub const APP_PORT: u16 = 8080;
pub const PROXY_UID: u32 = 1337;
/// The core the proxies are pinned to.
pub const PROXY_CPU: u32 = 1;
/// The core the app, the load generators and control are pinned to.
pub const LOAD_CPU: u32 = 0;

/// An experiment build of `wasmesh-proxy` run like `wasmesh` (`--alt NAME=PATH[,K=V…]`).
#[derive(Debug, Clone)]
pub struct Alt {
    pub name: String,
    pub path: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Alt {
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let mut parts = spec.split(',');
        let head = parts.next().unwrap_or_default();
        let (name, path) = head
            .split_once('=')
            .with_context(|| format!("--alt {spec}: expected NAME=PATH[,KEY=VALUE…]"))?;
        let env = parts
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .with_context(|| format!("--alt {spec}: {kv} is not KEY=VALUE"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            name: name.to_string(),
            path: path.into(),
            env,
        })
    }
}

/// Envoy's admin on 127.0.0.1:15000 (for /ready), as in an Istio sidecar.
pub const ENVOY_ADMIN: &str =
    "admin:\n  address:\n    socket_address: { address: 127.0.0.1, port_value: 15000 }\n";

/// Where a proxy runs: its pod's namespace, the proxy core, UID 1337.
pub fn as_proxy(pod: &Pod) -> Placement<'_> {
    Placement {
        ns: &pod.ns,
        cpu: PROXY_CPU,
        uid: Some(PROXY_UID),
    }
}

pub fn write_config(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `wasmesh-proxy init` in each pod (the same rules for every proxy).
pub fn init_rules(proxy: &Path, pods: &[&Pod]) -> anyhow::Result<()> {
    for pod in pods {
        super::netns::exec_in(&pod.ns, &proxy.to_string_lossy(), &["init"])
            .with_context(|| format!("`wasmesh-proxy init` in {}", pod.ns))?;
    }
    Ok(())
}

/// Control in the node namespace, listening on the bridge address, with a folder holding the
/// Service 10.96.0.10:80 (its port named `port_name`) and an EndpointSlice for the server
/// pod's :8080. With `pki`, control is also the mesh's CA (`--ca-dir`, `--tokens dir:`) and the
/// folder has the two pods as meshed Pods (`wasmesh.io/injected`, ServiceAccounts
/// `bench-client`, `bench-server`), the endpoint pointing at the server's: sidecars with a token
/// then speak mTLS to it; sidecars without one (the plaintext pairs) still do not.
pub fn start_control(
    run: Run<'_>,
    control: &Path,
    topo: &Topology,
    server_host: u8,
    port_name: &str,
    pki: Option<&Pki>,
    extra: &[String],
) -> anyhow::Result<Daemon> {
    let folder = run.dir.join("control");
    std::fs::create_dir_all(&folder)?;
    let server_ip = Ipv4Addr::new(10, 244, 0, server_host);
    let (target_ref, pods) = match pki {
        None => (String::new(), String::new()),
        Some(_) => (
            format!("  targetRef: {{ kind: Pod, name: bench-server, namespace: {NAMESPACE} }}\n"),
            ["client", "server"]
                .iter()
                .map(|role| {
                    let status = if *role == "server" {
                        format!("status: {{ podIP: \"{server_ip}\" }}\n")
                    } else {
                        String::new()
                    };
                    format!(
                        "---
apiVersion: v1
kind: Pod
metadata:
  name: bench-{role}
  namespace: {NAMESPACE}
  annotations: {{ wasmesh.io/injected: \"true\" }}
spec:
  serviceAccountName: {sa}
  nodeName: bench-node
  containers: [{{ name: app, image: bench }}]
{status}",
                        sa = mtls::identity(role).service_account,
                    )
                })
                .collect(),
        ),
    };
    let yaml = format!(
        "apiVersion: v1
kind: Service
metadata: {{ name: bench, namespace: default }}
spec:
  clusterIP: {ip}
  ports:
  - {{ name: {port_name}, port: {port}, targetPort: {app} }}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-1
  namespace: default
  labels: {{ kubernetes.io/service-name: bench }}
addressType: IPv4
ports:
- {{ name: {port_name}, port: {app} }}
endpoints:
- addresses: [\"{server_ip}\"]
  nodeName: bench-node
{target_ref}{pods}",
        ip = SERVICE_IP,
        port = SERVICE_PORT,
        app = APP_PORT,
    );
    std::fs::write(folder.join("bench.yaml"), yaml)?;
    let mut args: Vec<String> = [
        "serve",
        "--source",
        &format!("dir:{}", folder.display()),
        "--listen",
        &format!("{NODE_IP}:15010"),
        "--admin",
        "127.0.0.1:15014",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(pki) = pki {
        args.extend(pki.control_args());
    }
    args.extend_from_slice(extra);
    let mut cmd = command_in(
        &Placement {
            ns: &topo.node,
            cpu: LOAD_CPU,
            uid: None,
        },
        control,
        &args,
    );
    cmd.env("RUST_LOG", "warn");
    let mut d = Daemon::spawn("wasmesh-control", cmd, run.dir.join("control.log"))?;
    let ready = tool(
        run,
        &topo.node,
        &[
            "__wait-http",
            "--addr",
            "127.0.0.1:15014",
            "--path",
            "/ready",
            "--secs",
            "30",
        ],
        Duration::from_secs(40),
    );
    d.check()?;
    ready.with_context(|| format!("waiting for control's /ready; its log:\n{}", d.log_tail()))?;
    Ok(d)
}

/// `GET 127.0.0.1:15000<path>` in `pod` (the sidecar's admin: `/metrics`, Envoy's `/stats`…).
pub fn admin_get(run: Run<'_>, pod: &Pod, path: &str) -> anyhow::Result<String> {
    tool(
        run,
        &pod.ns,
        &["__get", "--addr", "127.0.0.1:15000", "--path", path],
        Duration::from_secs(30),
    )
}

/// Waits for `GET 127.0.0.1:15000/ready` in each pod (wasmesh-proxy's admin, Envoy's admin).
pub fn wait_ready(run: Run<'_>, pods: &[&Pod], what: &str) -> anyhow::Result<()> {
    for pod in pods {
        tool_ok(
            run,
            &pod.ns,
            &[
                "__wait-http",
                "--addr",
                "127.0.0.1:15000",
                "--path",
                "/ready",
                "--secs",
                "30",
            ],
        )
        .with_context(|| format!("waiting for {what}'s /ready"))?;
    }
    Ok(())
}

/// `wasmesh-proxy run` (or another build of it) in both pods, following control, with `env`
/// and without the bench's own `OTEL_*` variables; returns (role, daemon) once both are ready.
/// `log` names a role's log file. With `pki`, each sidecar has its token (mTLS on) and the
/// server side refuses plaintext.
pub fn start_wasmesh(
    run: Run<'_>,
    binary: &Path,
    env: &[(String, String)],
    client: &Pod,
    server: &Pod,
    pki: Option<&Pki>,
    log: &dyn Fn(&str) -> PathBuf,
) -> anyhow::Result<Vec<(&'static str, Daemon)>> {
    let mut started = Vec::new();
    for (role, pod) in [("client", client), ("server", server)] {
        let mut args: Vec<String> = [
            "run",
            "--control",
            &format!("http://{NODE_IP}:15010"),
            "--pod-name",
            &format!("bench-{role}"),
            "--pod-namespace",
            "default",
            "--node-name",
            "bench-node",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(pki) = pki {
            args.extend(pki.proxy_args(role));
        }
        let mut cmd = command_in(&as_proxy(pod), binary, &args);
        cmd.env("RUST_LOG", "warn");
        // Tracing only where the pair asks for it: not from the bench's own environment.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OTEL_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let d = Daemon::spawn(&format!("wasmesh-proxy ({role})"), cmd, log(role))?;
        started.push((role, d));
    }
    wait_ready(run, &[client, server], "wasmesh-proxy")?;
    Ok(started)
}

/// Envoy (`--concurrency 1`) in both pods with these configs (written to the run folder as
/// `envoy-<role>.yaml`); returns (role, daemon) once both are ready.
pub fn start_envoy(
    run: Run<'_>,
    envoy: &Path,
    client: (&Pod, String),
    server: (&Pod, String),
    log: &dyn Fn(&str) -> PathBuf,
) -> anyhow::Result<Vec<(&'static str, Daemon)>> {
    let mut started = Vec::new();
    let pods = [client.0, server.0];
    for (role, (pod, cfg)) in [("client", client), ("server", server)] {
        let path = run.dir.join(format!("envoy-{role}.yaml"));
        write_config(&path, &cfg)?;
        let args: Vec<String> = [
            "-c",
            &path.to_string_lossy(),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "-l",
            "warning",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let d = Daemon::spawn(
            &format!("envoy ({role})"),
            command_in(&as_proxy(pod), envoy, &args),
            log(role),
        )?;
        started.push((role, d));
    }
    wait_ready(run, &pods, "Envoy")?;
    Ok(started)
}

/// What one phase cost, measured around it.
#[derive(Debug, Clone)]
pub struct Cost {
    pub proxy_cpu: Vec<f64>,
    pub app_cpu: f64,
    pub cores: Vec<f64>,
    /// Busy CPU seconds of the whole machine (every core) during the phase.
    pub machine_cpu: f64,
    /// Share of the cores' time stolen by the hypervisor.
    pub steal: f64,
    pub peak_rss_mib: f64,
    pub secs: f64,
}

/// Runs `work` (a load tool) and measures around it: the proxies' and the app's CPU seconds,
/// each core's load, steal, the proxies' peak RSS. Returns what `work` returned.
pub fn measure(
    proxies: &[u32],
    app: u32,
    ticks: f64,
    work: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<(String, Cost)> {
    let cpu0: Vec<f64> = proxies
        .iter()
        .map(|p| procfs::cpu_seconds(*p, ticks))
        .collect::<anyhow::Result<_>>()?;
    let app0 = procfs::cpu_seconds(app, ticks)?;
    let cores0 = procfs::CoreTimes::now();
    let sampler = procfs::RssSampler::start(proxies.to_vec());
    let t = Instant::now();
    let out = work();
    let secs = t.elapsed().as_secs_f64();
    let peaks = sampler.finish();
    let cores1 = procfs::CoreTimes::now();
    let cores = cores0.busy_since(&cores1);
    let machine_cpu = cores0.busy_seconds_since(&cores1, ticks);
    let steal = cores0.steal_since(&cores1);
    let out = out?;
    let proxy_cpu = proxies
        .iter()
        .zip(&cpu0)
        .map(|(p, c0)| Ok(procfs::cpu_seconds(*p, ticks)? - c0))
        .collect::<anyhow::Result<_>>()?;
    let app_cpu = procfs::cpu_seconds(app, ticks)? - app0;
    Ok((
        out,
        Cost {
            proxy_cpu,
            app_cpu,
            cores,
            machine_cpu,
            steal,
            peak_rss_mib: peaks.values().copied().max().unwrap_or(0) as f64 / 1024.0,
            secs,
        },
    ))
}
