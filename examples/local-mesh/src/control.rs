//! wasmesh control, run inside the node namespace on the objects folder:
//! `wasmesh-control serve --source dir:<state>/objects --listen 10.244.0.1:15010 --admin
//! 10.244.0.1:15014`, and with mTLS (the default) `--ca-dir <state>/ca --tokens
//! dir:<state>/tokens`: control is the CA, its root generated on first start and kept for the
//! mesh's life (a restarted control signs with the same root). Its output goes to `<state>/logs/wasmesh-control.log`. If it exits while
//! wanted, it is started again (at most once a second).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::config::{
    CONTROL_ADMIN_PORT, CONTROL_PORT, MeshConfig, NODE_IP, OTLP_GRPC_PORT, OTLP_HTTP_PORT,
};
use crate::process;

pub struct Control {
    child: Option<tokio::process::Child>,
    /// The OTLP receiver of `--otlp local` (see [`crate::otlp`]).
    receiver: Option<tokio::process::Child>,
    started: Option<Instant>,
    pub wanted: bool,
}

impl Control {
    pub fn new() -> Self {
        Self {
            child: None,
            receiver: None,
            started: None,
            wanted: true,
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts control if it is wanted and not running (and did not just start); reports an
    /// exit.
    pub fn keep(&mut self, cfg: &MeshConfig) -> std::io::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            tracing::warn!(%status, log = %cfg.state_dir.join("logs/wasmesh-control.log").display(), "wasmesh-control exited");
            self.child = None;
        }
        if self.wanted && cfg.otlp_local() && self.receiver.is_none() {
            self.receiver = Some(spawn_receiver(cfg)?);
            tracing::info!(grpc = %format!("{NODE_IP}:{OTLP_GRPC_PORT}"), http = %format!("{NODE_IP}:{OTLP_HTTP_PORT}"), spans = %crate::otlp::traces_file(&cfg.state_dir).display(), "OTLP receiver started");
        }
        if !self.wanted || self.child.is_some() {
            return Ok(());
        }
        if self
            .started
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return Ok(());
        }
        self.started = Some(Instant::now());
        self.child = Some(spawn(cfg)?);
        tracing::info!(listen = %format!("{NODE_IP}:{CONTROL_PORT}"), "wasmesh-control started");
        Ok(())
    }

    /// Stops control (SIGTERM, then SIGKILL after a second).
    pub async fn stop(&mut self) {
        if let Some(mut r) = self.receiver.take() {
            let _ = r.kill().await;
        }
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let pids = [pid];
                let _ = tokio::task::spawn_blocking(move || {
                    process::stop(&pids, Duration::from_secs(1))
                })
                .await;
            }
            let _ = child.kill().await;
            tracing::info!("wasmesh-control stopped");
        }
    }
}

impl Default for Control {
    fn default() -> Self {
        Self::new()
    }
}

fn spawn(cfg: &MeshConfig) -> std::io::Result<tokio::process::Child> {
    let log_path = cfg.state_dir.join("logs").join("wasmesh-control.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let objects = cfg.state_dir.join("objects");
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &cfg.node_netns()])
        .arg(&cfg.binaries.control)
        .arg("serve")
        .arg("--source")
        .arg(source_arg(&objects))
        .args(["--listen", &format!("{NODE_IP}:{CONTROL_PORT}")])
        .args(["--admin", &format!("{NODE_IP}:{CONTROL_ADMIN_PORT}")]);
    if cfg.mtls {
        cmd.arg("--ca-dir")
            .arg(cfg.ca_dir())
            .arg("--tokens")
            .arg(format!("dir:{}", cfg.tokens_dir().display()));
    }
    cmd.args(cfg.otlp_control_args())
        .args(&cfg.control_args)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
}

/// `wasmesh-local otlp-receiver` in the node's namespace (its output in
/// `<state>/logs/otlp-receiver.log`).
fn spawn_receiver(cfg: &MeshConfig) -> std::io::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.state_dir.join("logs").join("otlp-receiver.log"))?;
    tokio::process::Command::new("ip")
        .args(["netns", "exec", &cfg.node_netns()])
        .arg(&cfg.binaries.local)
        .arg("otlp-receiver")
        .args(["--grpc", &format!("{NODE_IP}:{OTLP_GRPC_PORT}")])
        .args(["--http", &format!("{NODE_IP}:{OTLP_HTTP_PORT}")])
        .arg("--out")
        .arg(crate::otlp::traces_file(&cfg.state_dir))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
}

fn source_arg(objects: &Path) -> String {
    format!("dir:{}", objects.display())
}
