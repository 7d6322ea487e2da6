//! The commands beside `up`, which work from the state directory: `get` (kubectl-like tables),
//! `exec`, `logs`, `delete pod`, `wait` and `down`.

use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::{DEFAULT_PREFIX, NODE_IP, NODE_NAME, path_with};
use crate::manifests::NsName;
use crate::netns;
use crate::process::{self, Signal};
use crate::state::{self, Phase, Request, StateError, Status};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("pod {namespace}/{name} not found (`wasmesh-local get pods -A` lists them)")]
    NoPod { namespace: String, name: String },
    #[error("pod {pod} has no network namespace any more (it is {phase})")]
    PodGone { pod: String, phase: Phase },
    #[error("pod {pod} has containers {containers}: choose one with -c")]
    WhichContainer { pod: String, containers: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("timed out after {0:?}; pods not ready:\n{1}")]
    Timeout(Duration, String),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
}

/// What `get` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Resource {
    #[value(alias = "pod", alias = "po")]
    Pods,
    #[value(alias = "service", alias = "svc")]
    Services,
    #[value(alias = "endpointslices", alias = "ep", alias = "endpointslice")]
    Endpoints,
}

/// A kubectl-like table of `status`, for one namespace or all (`None`).
pub fn render(status: &Status, what: Resource, namespace: Option<&str>) -> String {
    let all = namespace.is_none();
    let in_ns = |ns: &str| namespace.is_none_or(|n| n == ns);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let mut rows: Vec<Vec<String>> = Vec::new();
    match what {
        Resource::Pods => {
            rows.push(cols(
                all,
                &["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"],
            ));
            for p in status.pods.iter().filter(|p| in_ns(&p.namespace)) {
                let total = p.containers.len() + usize::from(p.sidecar);
                let ready = if p.ready { total } else { 0 };
                let mut row = vec![
                    p.name.clone(),
                    format!("{ready}/{total}"),
                    p.phase.to_string(),
                    p.restarts.to_string(),
                    age(now.saturating_sub(p.created)),
                    p.ip.to_string(),
                    p.node.clone(),
                ];
                if all {
                    row.insert(0, p.namespace.clone());
                }
                rows.push(row);
            }
        }
        Resource::Services => {
            rows.push(cols(
                all,
                &["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"],
            ));
            for s in status.services.iter().filter(|s| in_ns(&s.namespace)) {
                let mut row = vec![
                    s.name.clone(),
                    s.type_.clone(),
                    if s.cluster_ip.is_empty() {
                        "<none>".into()
                    } else {
                        s.cluster_ip.clone()
                    },
                    s.external_name.clone().unwrap_or_else(|| "<none>".into()),
                    if s.ports.is_empty() {
                        "<none>".into()
                    } else {
                        s.ports.join(",")
                    },
                ];
                if all {
                    row.insert(0, s.namespace.clone());
                }
                rows.push(row);
            }
        }
        Resource::Endpoints => {
            rows.push(cols(all, &["NAME", "SERVICE", "PORTS", "ENDPOINTS"]));
            for s in status.slices.iter().filter(|s| in_ns(&s.namespace)) {
                let eps: Vec<String> = s
                    .endpoints
                    .iter()
                    .map(|e| {
                        let mut t = e.ip.clone();
                        if let Some(p) = &e.pod {
                            let _ = write!(t, " {p}");
                        }
                        if e.terminating {
                            t.push_str(if e.serving {
                                " (terminating)"
                            } else {
                                " (terminating, not serving)"
                            });
                        } else if !e.ready {
                            t.push_str(" (not ready)");
                        }
                        t
                    })
                    .collect();
                let mut row = vec![
                    s.name.clone(),
                    s.service.clone(),
                    if s.ports.is_empty() {
                        "<unset>".into()
                    } else {
                        s.ports.join(",")
                    },
                    if eps.is_empty() {
                        "<none>".into()
                    } else {
                        eps.join(", ")
                    },
                ];
                if all {
                    row.insert(0, s.namespace.clone());
                }
                rows.push(row);
            }
        }
    }
    table(&rows)
}

fn cols(all: bool, names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    if all {
        v.insert(0, "NAMESPACE".into());
    }
    v
}

fn table(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}   ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

fn find_pod<'a>(
    status: &'a Status,
    namespace: &str,
    name: &str,
) -> Result<&'a state::PodStatus, CliError> {
    status.pod(namespace, name).ok_or_else(|| CliError::NoPod {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// `exec`: `ip netns exec <pod> CMD...` with the pod's downward-API variables and the mesh's
/// PATH.
pub fn exec_command(
    status: &Status,
    namespace: &str,
    pod: &str,
    argv: &[String],
) -> Result<std::process::Command, CliError> {
    let p = find_pod(status, namespace, pod)?;
    if !matches!(
        p.phase,
        Phase::Pending | Phase::Running | Phase::Terminating
    ) {
        return Err(CliError::PodGone {
            pod: format!("{namespace}/{pod}"),
            phase: p.phase,
        });
    }
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &p.netns])
        .args(argv)
        .env("PATH", path_with(&status.bin_dir))
        .env("POD_NAME", &p.name)
        .env("POD_NAMESPACE", &p.namespace)
        .env("POD_IP", p.ip.to_string())
        .env(
            "NODE_NAME",
            if p.node.is_empty() {
                NODE_NAME
            } else {
                &p.node
            },
        )
        .env("HOST_IP", NODE_IP.to_string());
    Ok(cmd)
}

/// How `logs` reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogOptions {
    /// Keep printing as the log grows, until the pod is gone.
    pub follow: bool,
    /// Start with only the last this many lines (`Some(0)`: only what comes next).
    pub tail: Option<usize>,
}

/// `logs [-f] [--tail N]`: a container's output. A closed stdout (e.g. `| head`) ends it
/// quietly.
pub fn logs(
    state_dir: &Path,
    namespace: &str,
    pod: &str,
    container: Option<&str>,
    opts: LogOptions,
    out: &mut impl std::io::Write,
) -> Result<(), CliError> {
    let status = state::read_status(state_dir)?;
    let p = find_pod(&status, namespace, pod)?;
    let container = match container {
        Some(c) => c.to_string(),
        None if p.containers.len() == 1 => p.containers[0].clone(),
        None => {
            return Err(CliError::WhichContainer {
                pod: format!("{namespace}/{pod}"),
                containers: p.containers.join(", "),
            });
        }
    };
    let path = p.log_dir.join(format!("{container}.log"));
    let uid = p.uid.clone();
    let io = |source| CliError::Io {
        path: path.clone(),
        source,
    };
    let mut pos = 0u64;
    let mut first = true;
    let mut gone_since: Option<Instant> = None;
    loop {
        if let Ok(mut f) = std::fs::File::open(&path) {
            f.seek(SeekFrom::Start(pos)).map_err(io)?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).map_err(io)?;
            pos += buf.len() as u64;
            let mut show: &[u8] = &buf;
            if first && let Some(n) = opts.tail {
                show = last_lines(&buf, n);
            }
            first = false;
            let written = out.write_all(show).and_then(|()| out.flush());
            match written {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(io(e)),
            }
        }
        if !opts.follow {
            return Ok(());
        }
        let here = state::read_status(state_dir).ok().is_some_and(|s| {
            s.pods
                .iter()
                .any(|p| p.uid == uid && p.phase != Phase::Failed)
        });
        if here {
            gone_since = None;
        } else if gone_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(1) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The last `n` lines of `buf` (a final line without a newline counts).
fn last_lines(buf: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    let body = buf.strip_suffix(b"\n").unwrap_or(buf);
    match body
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n')
        .nth(n - 1)
    {
        Some((i, _)) => &buf[i + 1..],
        None => buf,
    }
}

pub fn delete_pod(state_dir: &Path, namespace: &str, pod: &str) -> Result<(), CliError> {
    let status = state::read_status(state_dir)?;
    find_pod(&status, namespace, pod)?;
    state::send_request(state_dir, &Request::DeletePod(NsName::new(namespace, pod)))?;
    Ok(())
}

/// `wait`: until every pod is ready (or completed) and none is pending or terminating.
pub fn wait_ready(state_dir: &Path, timeout: Duration) -> Result<Status, CliError> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = state::read_status(state_dir);
        if let Ok(s) = &status {
            let settled = !s.pods.is_empty()
                && s.pods
                    .iter()
                    .all(|p| (p.phase == Phase::Running && p.ready) || p.phase == Phase::Succeeded);
            if settled {
                return Ok(status?);
            }
        }
        if Instant::now() >= deadline {
            let table = match &status {
                Ok(s) => render(s, Resource::Pods, None),
                Err(e) => e.to_string(),
            };
            return Err(CliError::Timeout(timeout, table));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `down`: stops the `up` using this state directory (SIGTERM; it removes what it made), then
/// removes anything left with the prefix, and the state directory. Returns what it did.
pub fn down(state_dir: &Path, prefix: Option<&str>) -> Result<Vec<String>, CliError> {
    let mut done = Vec::new();
    let status = state::read_status(state_dir).ok();
    if let Some(s) = &status
        && s.pid != std::process::id()
        && process::alive(s.pid)
        && process::cmdline_contains(s.pid, "wasmesh-local")
    {
        process::signal(&[s.pid], Signal::Term);
        let left = process::wait_gone(&[s.pid], Duration::from_secs(30));
        if left.is_empty() {
            done.push(format!("stopped wasmesh-local up (pid {})", s.pid));
        } else {
            process::signal(&left, Signal::Kill);
            done.push(format!(
                "killed wasmesh-local up (pid {}): it did not stop within 30 s",
                s.pid
            ));
        }
    }
    let prefix = prefix
        .map(str::to_string)
        .or_else(|| status.as_ref().map(|s| s.prefix.clone()))
        .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    let node = format!("{prefix}node");
    for n in netns::cleanup(&prefix, &node)? {
        done.push(format!("removed network namespace {n}"));
    }
    if state_dir.join(state::MARKER).exists() {
        state::remove(state_dir)?;
        done.push(format!("removed {}", state_dir.display()));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{EndpointStatus, PodStatus, ServiceStatus, SliceStatus};
    use std::net::Ipv4Addr;

    fn status() -> Status {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Status {
            pods: vec![PodStatus {
                namespace: "demo".into(),
                name: "backend-abc".into(),
                uid: "u".into(),
                ip: Ipv4Addr::new(10, 244, 0, 2),
                node: "local-node".into(),
                netns: "wm-demo_backend-abc".into(),
                phase: Phase::Running,
                ready: true,
                sidecar: true,
                containers: vec!["backend".into()],
                restarts: 0,
                created: now - 5,
                message: String::new(),
                labels: Default::default(),
                log_dir: PathBuf::new(),
            }],
            services: vec![ServiceStatus {
                namespace: "demo".into(),
                name: "backend".into(),
                type_: "ClusterIP".into(),
                cluster_ip: "10.96.0.10".into(),
                external_name: None,
                ports: vec!["80/TCP".into()],
            }],
            slices: vec![SliceStatus {
                namespace: "demo".into(),
                name: "backend-x".into(),
                service: "backend".into(),
                managed: true,
                ports: vec!["http:8080/TCP".into()],
                endpoints: vec![
                    EndpointStatus {
                        ip: "10.244.0.2".into(),
                        pod: Some("backend-abc".into()),
                        node: None,
                        ready: true,
                        serving: true,
                        terminating: false,
                    },
                    EndpointStatus {
                        ip: "10.244.0.3".into(),
                        pod: Some("backend-def".into()),
                        node: None,
                        ready: false,
                        serving: true,
                        terminating: true,
                    },
                ],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn tail_lines() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 1), b"c");
        assert_eq!(last_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines(b"a\nb\n", 0), b"");
    }

    #[test]
    fn tables_look_like_kubectl() {
        let s = status();
        let pods = render(&s, Resource::Pods, Some("demo"));
        let lines: Vec<&str> = pods.lines().collect();
        assert_eq!(
            lines[0],
            "NAME          READY   STATUS    RESTARTS   AGE   IP           NODE"
        );
        assert_eq!(
            lines[1],
            "backend-abc   2/2     Running   0          5s    10.244.0.2   local-node"
        );
        let all = render(&s, Resource::Services, None);
        assert!(
            all.starts_with(
                "NAMESPACE   NAME      TYPE        CLUSTER-IP   EXTERNAL-IP   PORT(S)\n"
            ),
            "{all}"
        );
        assert!(
            all.contains("demo        backend   ClusterIP   10.96.0.10   <none>        80/TCP"),
            "{all}"
        );
        let eps = render(&s, Resource::Endpoints, Some("demo"));
        assert!(
            eps.contains("10.244.0.2 backend-abc, 10.244.0.3 backend-def (terminating)"),
            "{eps}"
        );
        assert_eq!(render(&s, Resource::Pods, Some("other")).lines().count(), 1);
    }
}
