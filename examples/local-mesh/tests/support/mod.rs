//! A whole local mesh per test, and what a test does with it.
//!
//! [`TestMesh::up`] writes the test's YAML to a temporary folder and starts a mesh on it with a
//! prefix of its own (`wmt<pid>x<n>-`), so tests run in parallel without seeing each other;
//! dropping it (also on panic) stops the mesh and removes every namespace with the prefix.
//! Everything the test runs — clients, probes — runs inside the mesh's pods, so all traffic
//! stays in namespaces the test made.
//!
//! The binaries come from the target directory: `wasmesh-local` is built by `cargo test`;
//! `wasmesh-proxy`, `wasmesh-control` and `wasmesh-demo` must be built first (`cargo build
//! --workspace --bins`, as `.ci/run` does).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wasmesh_local::cli;
use wasmesh_local::config::{Binaries, MeshConfig};
use wasmesh_local::mesh::{Command, MeshHandle};
use wasmesh_local::netns;
use wasmesh_local::state::{Phase, PodStatus, Status};

/// Upper bound for anything a test waits for; never reached when things work.
pub const WAIT: Duration = Duration::from_secs(30);

/// Whether this test can run: namespaces and iptables need root. Without root the test is
/// skipped with a note, unless `CI` is set, where it fails.
pub fn have_root(test: &str) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_owned));
    if euid.as_deref() == Some("0") {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root (network namespaces, iptables); CI is set, so this fails instead of skipping"
    );
    eprintln!("note: skipping {test}: needs root (network namespaces, iptables)");
    false
}

/// The binaries, checked: the target directory's, or those in `WASMESH_TEST_BINARIES` (a
/// directory with `wasmesh-local`, `wasmesh-proxy`, `wasmesh-control` and `wasmesh-demo`: a
/// copy taken right after a build, so a target directory shared with other builds cannot swap
/// them mid-run).
pub fn binaries() -> Binaries {
    let local = match std::env::var_os("WASMESH_TEST_BINARIES") {
        Some(dir) => PathBuf::from(dir).join("wasmesh-local"),
        None => PathBuf::from(env!("CARGO_BIN_EXE_wasmesh-local")),
    };
    let bins = Binaries::next_to(local);
    for name in ["wasmesh-proxy", "wasmesh-control", "wasmesh-demo"] {
        let p = bins.dir.join(name);
        assert!(
            p.is_file(),
            "{} is missing: the mesh tests run the workspace's binaries; run `cargo build --workspace --bins` first",
            p.display()
        );
    }
    bins
}

fn next_prefix() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "wmt{}x{}-",
        std::process::id() % 1000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub struct TestMesh {
    handle: Option<MeshHandle>,
    dir: tempfile::TempDir,
    pub state: PathBuf,
    pub prefix: String,
    pub bins: Binaries,
}

impl TestMesh {
    /// A mesh with the sidecar in every pod that does not opt out; `None` when skipped.
    pub fn up(test: &str, files: &[(&str, &str)]) -> Option<Self> {
        Self::up_with(test, files, |_| {})
    }

    /// A mesh whose config `adjust` changes first.
    pub fn up_with(
        test: &str,
        files: &[(&str, &str)],
        adjust: impl FnOnce(&mut MeshConfig),
    ) -> Option<Self> {
        if !have_root(test) {
            return None;
        }
        let bins = binaries();
        let dir = tempfile::tempdir().expect("manifests folder");
        for (name, yaml) in files {
            std::fs::write(dir.path().join(name), yaml).expect("write manifest");
        }
        let prefix = next_prefix();
        let state = std::env::temp_dir().join(format!("{prefix}state"));
        let mut cfg = MeshConfig::new(dir.path(), &state, bins.clone());
        cfg.prefix = prefix.clone();
        cfg.rescan = Duration::from_millis(100);
        adjust(&mut cfg);
        let handle = MeshHandle::start(cfg).unwrap_or_else(|e| panic!("{test}: {e}"));
        Some(Self {
            handle: Some(handle),
            dir,
            state,
            prefix,
            bins,
        })
    }

    /// [`TestMesh::up`] with owned file contents.
    pub fn up_files(test: &str, files: &[(&str, String)]) -> Option<Self> {
        Self::up_files_with(test, files, |_| {})
    }

    /// [`TestMesh::up_with`] with owned file contents.
    pub fn up_files_with(
        test: &str,
        files: &[(&str, String)],
        adjust: impl FnOnce(&mut MeshConfig),
    ) -> Option<Self> {
        let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
        Self::up_with(test, &refs, adjust)
    }

    pub fn handle(&self) -> &MeshHandle {
        self.handle.as_ref().expect("running")
    }

    pub fn folder(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces (or adds) a manifest file, atomically.
    pub fn write(&self, name: &str, yaml: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).expect("write");
        std::fs::rename(&tmp, self.dir.path().join(name)).expect("rename");
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join(name)).expect("remove manifest");
    }

    pub fn status(&self) -> Arc<Status> {
        self.handle().status()
    }

    pub fn send(&self, cmd: Command) {
        self.handle().send(cmd).expect("mesh running");
    }

    /// Waits until `f` holds for the status; panics with the status otherwise.
    pub fn wait(&self, what: &str, f: impl Fn(&Status) -> bool) -> Arc<Status> {
        self.handle()
            .wait_for(what, WAIT, f)
            .unwrap_or_else(|e| panic!("{e}{}", self.unready_sidecar_logs()))
    }

    /// The last lines each sidecar that is not ready logged, and control's: what a failed
    /// wait needs to be diagnosed from CI's output alone.
    fn unready_sidecar_logs(&self) -> String {
        let mut out = String::new();
        for p in self.status().pods.iter().filter(|p| p.sidecar && !p.ready) {
            let log =
                std::fs::read_to_string(p.log_dir.join("wasmesh-proxy.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            out += &format!(
                "\n--- {}/{} sidecar log (last 30 lines):\n{}",
                p.namespace,
                p.name,
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
        if !out.is_empty() {
            out += &format!(
                "\n--- control's log (last 30 lines):\n{}",
                self.log_tail("logs/wasmesh-control.log", 30)
            );
        }
        out
    }

    /// Waits until exactly `n` pods named `name` (a prefix when it ends with `-`) run and
    /// are ready in `ns` (none terminating), and returns them.
    pub fn ready_pods(&self, ns: &str, name: &str, n: usize) -> Vec<PodStatus> {
        let matches = |p: &PodStatus| {
            p.namespace == ns
                && if name.ends_with('-') {
                    p.name.starts_with(name)
                } else {
                    p.name == name
                }
        };
        let s = self.wait(&format!("{n} ready pods {ns}/{name}"), |s| {
            let pods: Vec<_> = s.pods.iter().filter(|p| matches(p)).collect();
            pods.len() == n && pods.iter().all(|p| p.phase == Phase::Running && p.ready)
        });
        s.pods.iter().filter(|p| matches(p)).cloned().collect()
    }

    /// Runs `argv` in a pod (as root, with the pod's /etc/hosts), bounded to 30 s.
    pub fn exec(&self, ns: &str, pod: &str, argv: &[&str]) -> Output {
        self.exec_command(ns, pod, argv)
            .output()
            .unwrap_or_else(|e| panic!("exec in {ns}/{pod}: {e}"))
    }

    /// The command [`TestMesh::exec`] runs, to run elsewhere (another thread).
    pub fn exec_command(&self, ns: &str, pod: &str, argv: &[&str]) -> std::process::Command {
        let status = self.status();
        let mut full = vec!["timeout".to_string(), "30".to_string()];
        full.extend(argv.iter().map(|s| s.to_string()));
        cli::exec_command(&status, ns, pod, &full)
            .unwrap_or_else(|e| panic!("exec in {ns}/{pod}: {e}"))
    }

    /// `exec`, with the exit status and the output (stdout then stderr) as text.
    pub fn run(&self, ns: &str, pod: &str, argv: &[&str]) -> (bool, String) {
        let out = self.exec(ns, pod, argv);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// The last `n` lines of a log in the state directory, e.g. `logs/t/client/wasmesh-proxy.log`
    /// (for assertion messages).
    pub fn log_tail(&self, rel: &str, n: usize) -> String {
        let text = std::fs::read_to_string(self.state.join(rel)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `wasmesh-demo client` in a pod: `count` calls, a new connection each.
    pub fn calls(&self, ns: &str, pod: &str, url: &str, count: usize) -> Calls {
        self.calls_with(ns, pod, url, count, &[])
    }

    pub fn calls_with(
        &self,
        ns: &str,
        pod: &str,
        url: &str,
        count: usize,
        extra: &[&str],
    ) -> Calls {
        let argv = client_argv(url, count, extra);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = self.exec(ns, pod, &argv);
        Calls::parse(
            &String::from_utf8_lossy(&out.stdout),
            &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// [`TestMesh::calls_with`] on a thread of its own, while the test does something else.
    pub fn spawn_calls_with(
        &self,
        ns: &str,
        pod: &str,
        url: &str,
        count: usize,
        extra: &[&str],
    ) -> std::thread::JoinHandle<Calls> {
        let argv = client_argv(url, count, extra);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut cmd = self.exec_command(ns, pod, &argv);
        std::thread::spawn(move || {
            let out = cmd.output().expect("exec the client");
            Calls::parse(
                &String::from_utf8_lossy(&out.stdout),
                &String::from_utf8_lossy(&out.stderr),
            )
        })
    }

    /// The sidecar's `/metrics` in a pod, as name → value.
    pub fn metrics(&self, ns: &str, pod: &str) -> BTreeMap<String, f64> {
        let out = self.exec(
            ns,
            pod,
            &["wasmesh-demo", "fetch", "http://127.0.0.1:15000/metrics"],
        );
        assert!(
            out.status.success(),
            "metrics of {ns}/{pod}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }

    /// The sidecar's `/config` in a pod.
    pub fn proxy_config(&self, ns: &str, pod: &str) -> serde_json::Value {
        let out = self.exec(
            ns,
            pod,
            &["wasmesh-demo", "fetch", "http://127.0.0.1:15000/config"],
        );
        assert!(
            out.status.success(),
            "config of {ns}/{pod}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("config JSON")
    }

    /// Waits until the sidecar in `ns/pod` sees `want(endpoints)` for the Service port
    /// `(namespace, name, port)`.
    pub fn wait_proxy(
        &self,
        ns: &str,
        pod: &str,
        (svc_ns, svc, port): (&str, &str, u16),
        what: &str,
        want: impl Fn(&[ProxyEndpoint]) -> bool,
    ) {
        let deadline = Instant::now() + WAIT;
        loop {
            let cfg = self.proxy_config(ns, pod);
            let eps = proxy_endpoints(&cfg, svc_ns, svc, port);
            if let Some(eps) = &eps
                && want(eps)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sidecar of {ns}/{pod} never saw {what} for {svc_ns}/{svc}:{port}; it has {eps:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `wasmesh-demo client --verbose` making `count` calls back to back.
fn client_argv(url: &str, count: usize, extra: &[&str]) -> Vec<String> {
    let count = count.to_string();
    let mut argv = vec!["wasmesh-demo", "client", "--url", url, "--count", &count];
    // Defaults `extra` may override. The deadline is generous: what the tests look for fails
    // at once (a reset, a refusal, a 5xx) or not at all, and a CI machine under load (hypervisor
    // steal of 50 % has been seen) can pause the mesh for seconds; a per-call deadline of 3 s
    // once failed a call that then answered.
    for (flag, value) in [("--interval", "0"), ("--timeout", "10s")] {
        if !extra.contains(&flag) {
            argv.extend([flag, value]);
        }
    }
    argv.push("--verbose");
    argv.extend_from_slice(extra);
    argv.into_iter().map(str::to_string).collect()
}

impl TestMesh {
    /// Waits until the sidecar in `ns/client` has exactly `n` endpoints for the Service port,
    /// all ready.
    pub fn wait_endpoints(&self, client: &str, (ns, svc, port): (&str, &str, u16), n: usize) {
        self.wait_proxy(
            ns,
            client,
            (ns, svc, port),
            &format!("{n} ready endpoints"),
            |eps| eps.len() == n && eps.iter().all(|e| e.ready),
        );
    }

    /// Waits until the sidecar in `ns/client` carries exactly the HTTPRoutes `routes`
    /// (`namespace/name`) on the Service port.
    pub fn wait_routes(&self, client: &str, (ns, svc, port): (&str, &str, u16), routes: &[&str]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let cfg = self.proxy_config(ns, client);
            let have: Option<Vec<String>> = cfg["service_ports"].as_array().and_then(|ps| {
                let sp = ps.iter().find(|p| {
                    p["namespace"] == ns
                        && p["service"] == svc
                        && p["port"].as_u64() == Some(u64::from(port))
                })?;
                Some(
                    sp["http_routes"]
                        .as_array()?
                        .iter()
                        .filter_map(|r| r.as_str().map(str::to_string))
                        .collect(),
                )
            });
            if have.as_ref().is_some_and(|h| {
                let mut h = h.clone();
                h.sort();
                let mut want: Vec<String> = routes.iter().map(|r| r.to_string()).collect();
                want.sort();
                h == want
            }) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sidecar of {ns}/{client} never carried the routes {routes:?} on {ns}/{svc}:{port}; it has {have:?} (control's log: {})",
                self.log_tail("logs/wasmesh-control.log", 20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TestMesh {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take()
            && let Err(e) = h.shutdown()
        {
            eprintln!("stopping the mesh {}: {e}", self.prefix);
        }
    }
}

/// One endpoint as a sidecar sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyEndpoint {
    pub addr: String,
    pub pod: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
}

pub fn proxy_endpoints(
    cfg: &serde_json::Value,
    ns: &str,
    svc: &str,
    port: u16,
) -> Option<Vec<ProxyEndpoint>> {
    let sp = cfg["service_ports"].as_array()?.iter().find(|p| {
        p["namespace"] == ns && p["service"] == svc && p["port"].as_u64() == Some(u64::from(port))
    })?;
    Some(
        sp["endpoints"]
            .as_array()?
            .iter()
            .map(|e| ProxyEndpoint {
                addr: e["addr"].as_str().unwrap_or("").to_string(),
                pod: e["pod"].as_str().map(str::to_string),
                ready: e["ready"].as_bool().unwrap_or(false),
                serving: e["serving"].as_bool().unwrap_or(false),
                terminating: e["terminating"].as_bool().unwrap_or(false),
                node: e["node"].as_str().map(str::to_string),
            })
            .collect(),
    )
}

/// What `wasmesh-demo client --verbose` printed.
#[derive(Debug, Default)]
pub struct Calls {
    /// Per call: the pod that answered, where the connection landed, the peer it saw.
    pub answers: Vec<Answer>,
    /// Failed calls: the error text.
    pub failures: Vec<String>,
    /// Connections the client opened (from its last line).
    pub connections: Option<u64>,
    pub output: String,
}

#[derive(Debug, Clone)]
pub struct Answer {
    /// `proxy` when the sidecar answered itself (`x-wasmesh-error`).
    pub pod: String,
    pub status: u16,
    /// `x-version`, if the backend sent one.
    pub version: Option<String>,
    /// `x-wasmesh-error`, if the sidecar answered.
    pub error: Option<String>,
    pub served_at: String,
    pub peer: String,
    pub ms: u64,
}

impl Calls {
    fn parse(stdout: &str, stderr: &str) -> Self {
        let mut c = Calls {
            output: format!("{stdout}{stderr}"),
            ..Default::default()
        };
        // Call lines start with `#<i> `; the last line is a summary.
        for line in stdout.lines().filter(|l| l.starts_with('#')) {
            let line = line.split("  |").next().unwrap_or(line);
            if let Some((head, rest)) = line.split_once(" answered by ") {
                // `#<i> <status> answered by <pod> (<ms> ms)[ version V][ x-wasmesh-error E]
                // [ served at <addr> for <peer>]`
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|w| w.parse().ok())
                    .unwrap_or(0);
                let mut words = rest.split_whitespace();
                let pod = words.next().unwrap_or("").to_string();
                let ms = words
                    .next()
                    .and_then(|w| w.trim_start_matches('(').parse().ok())
                    .unwrap_or(0);
                let word_after = |key: &str| {
                    rest.split_once(key)
                        .and_then(|(_, r)| r.split_whitespace().next())
                        .map(str::to_string)
                };
                c.answers.push(Answer {
                    pod,
                    status,
                    version: word_after(" version "),
                    error: word_after(" x-wasmesh-error "),
                    served_at: word_after(" served at ").unwrap_or_default(),
                    peer: rest
                        .rsplit_once(" for ")
                        .map(|(_, p)| p.trim().to_string())
                        .unwrap_or_default(),
                    ms,
                });
            } else if let Some((_, e)) = line.split_once(" failed after ") {
                c.failures.push(e.to_string());
            }
        }
        c.connections = stdout
            .lines()
            .rfind(|l| l.starts_with("done: "))
            .and_then(|l| l.rsplit_once(", "))
            .and_then(|(_, last)| last.strip_suffix(" connections"))
            .and_then(|n| n.parse().ok());
        c
    }

    /// Calls per answering pod.
    pub fn tally(&self) -> BTreeMap<String, usize> {
        let mut t = BTreeMap::new();
        for a in &self.answers {
            *t.entry(a.pod.clone()).or_default() += 1;
        }
        t
    }

    /// Calls per `x-version` (`-` for answers without one).
    pub fn versions(&self) -> BTreeMap<String, usize> {
        let mut t = BTreeMap::new();
        for a in &self.answers {
            let v = a.version.clone().unwrap_or_else(|| "-".into());
            *t.entry(v).or_default() += 1;
        }
        t
    }

    /// Calls per status.
    pub fn statuses(&self) -> BTreeMap<u16, usize> {
        let mut t = BTreeMap::new();
        for a in &self.answers {
            *t.entry(a.status).or_default() += 1;
        }
        t
    }
}

/// Network namespaces and `/etc/netns` directories with `prefix` that still exist.
pub fn leftovers(prefix: &str) -> Vec<String> {
    let mut left = netns::list(prefix).expect("ip netns list");
    if let Ok(dirs) = std::fs::read_dir("/etc/netns") {
        for d in dirs.flatten() {
            let n = d.file_name().to_string_lossy().into_owned();
            if n.starts_with(prefix) {
                left.push(format!("/etc/netns/{n}"));
            }
        }
    }
    left
}

/// Processes whose command line or environment mentions `needle`.
pub fn processes_with(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let me = std::process::id().to_string();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) || name == me {
            continue;
        }
        let read = |f: &str| {
            std::fs::read(e.path().join(f))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default()
        };
        let cmdline = read("cmdline");
        if cmdline.contains(needle) || read("environ").contains(needle) {
            out.push(format!("{name}: {cmdline}"));
        }
    }
    out
}

/// A Deployment of `wasmesh-demo backend` (plus anything in `extra_spec`, indented as pod spec
/// fields) with `replicas`, labelled `app: <name>`, listening on `ports` ([(name, port)]).
pub fn backend(
    ns: &str,
    name: &str,
    replicas: u32,
    ports: &[(&str, u16)],
    annotations: &str,
) -> String {
    let listen: String = ports
        .iter()
        .map(|(_, p)| format!(", \"--listen\", \"0.0.0.0:{p}\""))
        .collect();
    let port_list: String = ports
        .iter()
        .map(|(n, p)| format!("        - {{name: {n}, containerPort: {p}}}\n"))
        .collect();
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata:
      labels: {{app: {name}}}
      annotations: {{{annotations}}}
    spec:
      containers:
      - name: app
        command: ["wasmesh-demo", "backend", "--drain", "300ms"{listen}]
        ports:
{port_list}"#
    )
}

/// A Deployment of `wasmesh-demo backend` with more say than [`backend`]: its own labels
/// (`labels` is YAML flow-map content, e.g. `app: web, version: v1`), extra arguments and
/// environment.
pub struct Demo<'a> {
    pub name: &'a str,
    pub replicas: u32,
    pub labels: &'a str,
    /// `[(name, port)]` served with `--listen`.
    pub ports: &'a [(&'a str, u16)],
    /// `[(name, port)]` served with `--grpc-listen`.
    pub grpc_ports: &'a [(&'a str, u16)],
    pub args: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
}

impl Demo<'_> {
    pub fn yaml(&self, ns: &str) -> String {
        let mut args: Vec<String> = vec!["--drain".into(), "300ms".into()];
        for (_, p) in self.ports {
            args.extend(["--listen".into(), format!("0.0.0.0:{p}")]);
        }
        for (_, p) in self.grpc_ports {
            args.extend(["--grpc-listen".into(), format!("0.0.0.0:{p}")]);
        }
        args.extend(self.args.iter().map(|a| a.to_string()));
        let command: String = args.iter().map(|a| format!(", \"{a}\"")).collect();
        let ports: String = self
            .ports
            .iter()
            .chain(self.grpc_ports)
            .map(|(n, p)| format!("        - {{name: {n}, containerPort: {p}}}\n"))
            .collect();
        let env: String = self
            .env
            .iter()
            .map(|(k, v)| format!("        - {{name: {k}, value: \"{v}\"}}\n"))
            .collect();
        let env = if env.is_empty() {
            String::new()
        } else {
            format!("        env:\n{env}")
        };
        format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{{labels}}}}}
  template:
    metadata:
      labels: {{{labels}}}
    spec:
      containers:
      - name: app
        command: ["wasmesh-demo", "backend"{command}]
{env}        ports:
{ports}"#,
            name = self.name,
            replicas = self.replicas,
            labels = self.labels,
        )
    }
}

/// A ClusterIP Service selecting `selector` (YAML flow-map content); `ports` as (name, port,
/// targetPort, appProtocol — empty for none).
pub fn service_for(
    ns: &str,
    name: &str,
    selector: &str,
    ports: &[(&str, u16, u16, &str)],
) -> String {
    let list: String = ports
        .iter()
        .map(|(n, p, t, app)| {
            let app = if app.is_empty() {
                String::new()
            } else {
                format!(", appProtocol: {app}")
            };
            format!("  - {{name: {n}, port: {p}, targetPort: {t}{app}}}\n")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  selector: {{{selector}}}\n  ports:\n{list}"
    )
}

/// A pod that sleeps, to run clients in.
pub fn client(ns: &str, name: &str, annotations: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  annotations: {{{annotations}}}
spec:
  terminationGracePeriodSeconds: 0
  containers:
  - name: sleep
    command: ["sleep", "3600"]
"#
    )
}

/// A ClusterIP Service selecting `app: <selector>`; `ports` as (name, port, targetPort).
pub fn service(
    ns: &str,
    name: &str,
    selector: &str,
    ports: &[(&str, u16, &str)],
    extra_spec: &str,
) -> String {
    let list: String = ports
        .iter()
        .map(|(n, p, t)| {
            let t = if t.chars().all(|c| c.is_ascii_digit()) {
                t.to_string()
            } else {
                format!("\"{t}\"")
            };
            format!("  - {{name: {n}, port: {p}, targetPort: {t}}}\n")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  selector: {{app: {selector}}}\n{extra_spec}  ports:\n{list}"
    )
}

/// The namespace everything of the tests lives in.
pub const NS: &str = "t";

pub fn namespace() -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n")
}
