//! The pod agent: a tiny kubelet for one pod, run by `up` inside the pod's network namespace
//! (`ip netns exec <pod> wasmesh-local pod-agent --spec FILE`), so everything it starts is in
//! the pod.
//!
//! 1. With a sidecar: `wasmesh-proxy init` as root (the interception rules), then `wasmesh-proxy
//!    run` as UID/GID 1337 (`setpriv`), and waits for its `/ready` (the table arrived), like
//!    a native sidecar's startup probe.
//! 2. Starts every container's command with its environment, output to `<log dir>/<name>.log`;
//!    restarts them per `restartPolicy` with backoff (1 s doubling to 10 s).
//! 3. Probes readiness: every container running and every declared container port accepting
//!    connections on 127.0.0.1 (or the pod IP; from inside the pod neither is intercepted).
//! 4. On SIGTERM: SIGTERM to the containers, up to the grace period for them to exit, SIGKILL;
//!    then the sidecar the same way (it outlives the app, as a native sidecar does).
//! 5. When its stdin closes (`up` is gone) it kills everything at once and exits.
//!
//! It tells `up` what happens as JSON lines on stdout ([`AgentEvent`]).

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::PROXY_ADMIN_PORT;
use crate::manifests::NsName;
use crate::process::{self, Signal};

/// Everything the agent needs; written by `up` as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSpec {
    pub pod: NsName,
    pub ip: Ipv4Addr,
    pub log_dir: PathBuf,
    pub sidecar: Option<SidecarSpec>,
    pub containers: Vec<ContainerSpec>,
    pub restart_policy: RestartPolicy,
    pub grace_ms: u64,
    /// Container ports that must accept connections for the pod to be ready.
    pub probe_ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SidecarSpec {
    pub proxy: PathBuf,
    /// Execute the binary through its open file (`/proc/self/fd/0`) rather than its path.
    pub via_stdin: bool,
    pub init_args: Vec<String>,
    pub run_args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub uid: u32,
    pub ready_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub name: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// What the agent reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum AgentEvent {
    /// The interception rules are installed.
    Initialized,
    SidecarReady,
    Started {
        container: String,
        pid: u32,
    },
    Exited {
        container: String,
        status: String,
        /// When it will be started again, if it will.
        restart_in_ms: Option<u64>,
    },
    /// Readiness changed (during termination too: this is `serving`).
    Ready {
        ready: bool,
    },
    Warning {
        message: String,
    },
    /// The last event: the pod is done (`Succeeded`, `Failed`, or `Terminated` after SIGTERM).
    Finished {
        phase: String,
        message: String,
    },
}

/// The name a sidecar's process gets in events and logs.
pub const SIDECAR_NAME: &str = "wasmesh-proxy";

fn emit(event: &AgentEvent) {
    if let Ok(line) = serde_json::to_string(event) {
        let mut out = std::io::stdout().lock();
        // `up` may be gone; that is noticed on stdin.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// `wasmesh-local pod-agent --spec FILE`.
pub fn main(spec_file: &Path) -> ExitCode {
    let spec: AgentSpec = match std::fs::read(spec_file)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            finish(
                "Failed",
                format!("cannot read the pod spec {}: {e}", spec_file.display()),
            );
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            finish("Failed", format!("cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(Agent::new(spec).run())
}

fn finish(phase: &str, message: String) {
    emit(&AgentEvent::Finished {
        phase: phase.to_string(),
        message,
    });
}

/// Which process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Sidecar,
    Container(usize),
}

enum Msg {
    Exited {
        which: Which,
        status: std::process::ExitStatus,
    },
    Restart(Which),
    Orphaned,
}

#[derive(Debug)]
struct Proc {
    name: String,
    pid: Option<u32>,
    restarts: u32,
    started: Instant,
    /// Exited and will not run again.
    done: Option<bool>,
}

struct Agent {
    spec: AgentSpec,
    procs: Vec<Proc>,
    sidecar: Option<Proc>,
    sidecar_ready: bool,
    terminating: bool,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
}

impl Agent {
    fn new(spec: AgentSpec) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let procs = spec
            .containers
            .iter()
            .map(|c| Proc {
                name: c.name.clone(),
                pid: None,
                restarts: 0,
                started: Instant::now(),
                done: None,
            })
            .collect();
        Self {
            spec,
            procs,
            sidecar: None,
            sidecar_ready: false,
            terminating: false,
            tx,
            rx,
        }
    }

    async fn run(mut self) -> ExitCode {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    finish("Failed", format!("cannot handle SIGTERM: {e}"));
                    return ExitCode::FAILURE;
                }
            };
        watch_stdin(self.tx.clone());
        if let Err(e) = std::fs::create_dir_all(&self.spec.log_dir) {
            finish(
                "Failed",
                format!("cannot create {}: {e}", self.spec.log_dir.display()),
            );
            return ExitCode::FAILURE;
        }

        if let Some(sc) = self.spec.sidecar.clone() {
            if let Err(message) = self.init(&sc).await {
                finish("Failed", message);
                return ExitCode::FAILURE;
            }
            emit(&AgentEvent::Initialized);
            self.start(Which::Sidecar);
            let deadline = Instant::now() + Duration::from_millis(sc.ready_timeout_ms);
            loop {
                if admin_ready().await {
                    self.sidecar_ready = true;
                    emit(&AgentEvent::SidecarReady);
                    break;
                }
                if Instant::now() >= deadline {
                    emit(&AgentEvent::Warning {
                        message: format!(
                            "the sidecar is not ready after {:?} (no table from control?); starting the containers anyway",
                            Duration::from_millis(sc.ready_timeout_ms)
                        ),
                    });
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = term.recv() => return self.terminate(Instant::now()).await,
                    Some(msg) = self.rx.recv() => {
                        if self.handle(msg) {
                            return self.kill_all();
                        }
                    }
                }
            }
        }
        for i in 0..self.procs.len() {
            self.start(Which::Container(i));
        }

        let mut ready = false;
        let mut probe = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = probe.tick() => {
                    let now = self.probe().await;
                    if now != ready {
                        ready = now;
                        emit(&AgentEvent::Ready { ready });
                    }
                    if self.procs.iter().all(|p| p.done.is_some()) {
                        return self.complete().await;
                    }
                }
                _ = term.recv() => return self.terminate(Instant::now()).await,
                Some(msg) = self.rx.recv() => {
                    if self.handle(msg) {
                        return self.kill_all();
                    }
                }
            }
        }
    }

    /// `wasmesh-proxy init`, as root.
    async fn init(&self, sc: &SidecarSpec) -> Result<(), String> {
        let log = self.spec.log_dir.join("wasmesh-proxy-init.log");
        let mut cmd = tokio::process::Command::new(&sc.proxy);
        cmd.arg("init")
            .args(&sc.init_args)
            .env_clear()
            .envs(
                sc.env
                    .iter()
                    .filter(|(k, _)| k == "PATH" || k == "RUST_LOG")
                    .cloned(),
            )
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .map_err(|_| "wasmesh-proxy init did not finish within 30 s".to_string())?
            .map_err(|e| format!("cannot run {} init: {e}", sc.proxy.display()))?;
        let mut text = out.stdout.clone();
        text.extend_from_slice(&out.stderr);
        let _ = std::fs::write(&log, &text);
        if !out.status.success() {
            return Err(format!(
                "wasmesh-proxy init failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }

    fn start(&mut self, which: Which) {
        let spawned = match which {
            Which::Sidecar => self.spawn_sidecar(),
            Which::Container(i) => self.spawn_container(i),
        };
        let name = self.name(which);
        match spawned {
            Ok(mut child) => {
                let pid = child.id().unwrap_or_default();
                emit(&AgentEvent::Started {
                    container: name,
                    pid,
                });
                let proc = self.proc_mut(which);
                proc.pid = Some(pid);
                proc.started = Instant::now();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    if let Ok(status) = child.wait().await {
                        let _ = tx.send(Msg::Exited { which, status });
                    }
                });
            }
            Err(e) => {
                emit(&AgentEvent::Warning {
                    message: format!("cannot start {name}: {e}"),
                });
                self.after_exit(which, "failed to start".into(), false);
            }
        }
    }

    fn spawn_container(&self, i: usize) -> std::io::Result<tokio::process::Child> {
        let c = &self.spec.containers[i];
        let (program, args) = c
            .argv
            .split_first()
            .ok_or_else(|| std::io::Error::other("empty command"))?;
        let log = self.log_file(&c.name)?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(c.env.iter().cloned())
            .current_dir(c.working_dir.as_deref().unwrap_or("/"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // With PATH among the variables, the program is looked up in the container's PATH.
        cmd.spawn()
    }

    fn spawn_sidecar(&self) -> std::io::Result<tokio::process::Child> {
        let Some(sc) = &self.spec.sidecar else {
            return Err(std::io::Error::other("no sidecar"));
        };
        let log = self.log_file(SIDECAR_NAME)?;
        let uid = sc.uid.to_string();
        let mut cmd = tokio::process::Command::new("setpriv");
        cmd.args(["--reuid", &uid, "--regid", &uid, "--clear-groups"]);
        if sc.via_stdin {
            cmd.arg("/proc/self/fd/0")
                .stdin(std::fs::File::open(&sc.proxy)?);
        } else {
            cmd.arg(&sc.proxy).stdin(Stdio::null());
        }
        cmd.args(&sc.run_args)
            .env_clear()
            .envs(sc.env.iter().cloned())
            .current_dir("/")
            .stdout(log.try_clone()?)
            .stderr(log);
        cmd.spawn()
    }

    fn log_file(&self, name: &str) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.spec.log_dir.join(format!("{name}.log")))
    }

    fn name(&self, which: Which) -> String {
        match which {
            Which::Sidecar => SIDECAR_NAME.to_string(),
            Which::Container(i) => self.spec.containers[i].name.clone(),
        }
    }

    fn proc_mut(&mut self, which: Which) -> &mut Proc {
        match which {
            Which::Sidecar => self.sidecar.get_or_insert_with(|| Proc {
                name: SIDECAR_NAME.into(),
                pid: None,
                restarts: 0,
                started: Instant::now(),
                done: None,
            }),
            Which::Container(i) => &mut self.procs[i],
        }
    }

    /// Handles a message; `true` when the agent must stop at once.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Orphaned => true,
            Msg::Exited { which, status } => {
                self.after_exit(which, status.to_string(), status.success());
                false
            }
            Msg::Restart(which) => {
                if !self.terminating {
                    self.start(which);
                }
                false
            }
        }
    }

    fn after_exit(&mut self, which: Which, status: String, success: bool) {
        let policy = match which {
            Which::Sidecar => RestartPolicy::Always,
            Which::Container(_) => self.spec.restart_policy,
        };
        let terminating = self.terminating;
        let name = self.name(which);
        let proc = self.proc_mut(which);
        proc.pid = None;
        let restart = !terminating
            && match policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !success,
                RestartPolicy::Never => false,
            };
        let restart_in = restart.then(|| {
            // A process that ran for a while starts over with a short backoff.
            if proc.started.elapsed() > Duration::from_secs(10) {
                proc.restarts = 0;
            }
            proc.restarts += 1;
            Duration::from_secs(1 << proc.restarts.min(4).saturating_sub(1))
                .min(Duration::from_secs(10))
        });
        if !restart {
            proc.done = Some(success);
        }
        emit(&AgentEvent::Exited {
            container: name,
            status,
            restart_in_ms: restart_in.map(|d| d.as_millis() as u64),
        });
        if let Some(d) = restart_in {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                let _ = tx.send(Msg::Restart(which));
            });
        }
    }

    async fn probe(&self) -> bool {
        if self.procs.iter().any(|p| p.pid.is_none()) {
            return false;
        }
        if let Some(sc) = &self.sidecar {
            if sc.pid.is_none() || !self.sidecar_ready {
                return false;
            }
        } else if self.spec.sidecar.is_some() {
            return false;
        }
        for port in &self.spec.probe_ports {
            if !accepts(Ipv4Addr::LOCALHOST, *port).await && !accepts(self.spec.ip, *port).await {
                return false;
            }
        }
        true
    }

    fn container_pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(|p| p.pid).collect()
    }

    /// Graceful shutdown after SIGTERM.
    async fn terminate(mut self, since: Instant) -> ExitCode {
        self.terminating = true;
        let grace = Duration::from_millis(self.spec.grace_ms);
        process::signal(&self.container_pids(), Signal::Term);
        let deadline = since + grace;
        let mut ready = true;
        let mut probe = tokio::time::interval(Duration::from_millis(100));
        while !self.container_pids().is_empty() && Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.into()) => {}
                _ = probe.tick() => {
                    // While the app drains, its endpoint is serving (or not).
                    let now = self.serving().await;
                    if now != ready {
                        ready = now;
                        emit(&AgentEvent::Ready { ready });
                    }
                }
                Some(msg) = self.rx.recv() => {
                    if self.handle(msg) {
                        return self.kill_all();
                    }
                }
            }
        }
        let left = self.container_pids();
        if !left.is_empty() {
            emit(&AgentEvent::Warning {
                message: format!(
                    "containers did not stop within the grace period of {grace:?}; killing them"
                ),
            });
            process::signal(&left, Signal::Kill);
        }
        self.stop_sidecar().await;
        finish("Terminated", String::new());
        ExitCode::SUCCESS
    }

    /// Readiness during termination: only the ports count.
    async fn serving(&self) -> bool {
        for port in &self.spec.probe_ports {
            if !accepts(Ipv4Addr::LOCALHOST, *port).await && !accepts(self.spec.ip, *port).await {
                return false;
            }
        }
        !self.container_pids().is_empty()
    }

    async fn stop_sidecar(&mut self) {
        self.terminating = true;
        if let Some(pid) = self.sidecar.as_ref().and_then(|s| s.pid) {
            let pids = [pid];
            tokio::task::spawn_blocking(move || process::stop(&pids, Duration::from_secs(2)))
                .await
                .ok();
        }
    }

    /// Every container finished and none is restarted (restartPolicy Never / OnFailure).
    async fn complete(mut self) -> ExitCode {
        self.stop_sidecar().await;
        let ok = self.procs.iter().all(|p| p.done == Some(true));
        let failed: Vec<&str> = self
            .procs
            .iter()
            .filter(|p| p.done == Some(false))
            .map(|p| p.name.as_str())
            .collect();
        if ok {
            finish("Succeeded", String::new());
        } else {
            finish(
                "Failed",
                format!("containers failed: {}", failed.join(", ")),
            );
        }
        ExitCode::SUCCESS
    }

    /// `up` is gone: nobody will clean up after us gracefully.
    fn kill_all(&self) -> ExitCode {
        let mut pids = self.container_pids();
        pids.extend(self.sidecar.as_ref().and_then(|s| s.pid));
        process::signal(&pids, Signal::Kill);
        ExitCode::FAILURE
    }
}

/// Sends [`Msg::Orphaned`] when stdin reaches its end: `up` holds the other end.
fn watch_stdin(tx: mpsc::UnboundedSender<Msg>) {
    // A plain thread: blocking reads on stdin.
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let _ = tx.send(Msg::Orphaned);
        });
}

/// Whether something accepts TCP connections at `ip:port`.
async fn accepts(ip: Ipv4Addr, port: u16) -> bool {
    let addr = SocketAddr::from((ip, port));
    matches!(
        tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// The sidecar's `/ready` answers 200.
async fn admin_ready() -> bool {
    let attempt = async {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, PROXY_ADMIN_PORT)).await?;
        s.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await?;
        std::io::Result::Ok(
            buf[..n].starts_with(b"HTTP/1.1 200") || buf[..n].starts_with(b"HTTP/1.0 200"),
        )
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Ok(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_json_object_per_line() {
        let e = AgentEvent::Exited {
            container: "web".into(),
            status: "exit status: 1".into(),
            restart_in_ms: Some(1000),
        };
        let line = serde_json::to_string(&e).expect("json");
        assert_eq!(
            line,
            r#"{"event":"exited","container":"web","status":"exit status: 1","restart_in_ms":1000}"#
        );
        assert_eq!(serde_json::from_str::<AgentEvent>(&line).expect("parse"), e);
    }
}
