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

/// The binaries, checked.
pub fn binaries() -> Binaries {
    let bins = Binaries::next_to(env!("CARGO_BIN_EXE_wasmesh-local"));
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
            .unwrap_or_else(|e| panic!("{e}"))
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
        let status = self.status();
        let mut full = vec!["timeout".to_string(), "30".to_string()];
        full.extend(argv.iter().map(|s| s.to_string()));
        let mut cmd = cli::exec_command(&status, ns, pod, &full)
            .unwrap_or_else(|e| panic!("exec in {ns}/{pod}: {e}"));
        cmd.output()
            .unwrap_or_else(|e| panic!("exec in {ns}/{pod}: {e}"))
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
        let count_s = count.to_string();
        let mut argv = vec![
            "wasmesh-demo",
            "client",
            "--url",
            url,
            "--count",
            &count_s,
            "--interval",
            "0",
            "--timeout",
            "3s",
            "--verbose",
        ];
        argv.extend_from_slice(extra);
        let out = self.exec(ns, pod, &argv);
        Calls::parse(
            &String::from_utf8_lossy(&out.stdout),
            &String::from_utf8_lossy(&out.stderr),
        )
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
    pub output: String,
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub pod: String,
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
            if let Some(rest) = line.split_once(" answered by ").map(|(_, r)| r) {
                // `<pod> (<ms> ms) served at <addr> for <peer>`
                let mut words = rest.split_whitespace();
                let pod = words.next().unwrap_or("").to_string();
                let ms = words
                    .next()
                    .and_then(|w| w.trim_start_matches('(').parse().ok())
                    .unwrap_or(0);
                let served_at = rest
                    .split_once(" served at ")
                    .and_then(|(_, r)| r.split_whitespace().next())
                    .unwrap_or("")
                    .to_string();
                let peer = rest
                    .rsplit_once(" for ")
                    .map(|(_, p)| p.trim().to_string())
                    .unwrap_or_default();
                c.answers.push(Answer {
                    pod,
                    served_at,
                    peer,
                    ms,
                });
            } else if let Some((_, e)) = line.split_once(" failed after ") {
                c.failures.push(e.to_string());
            }
        }
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
