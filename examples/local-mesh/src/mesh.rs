//! `up`: one loop that keeps the machine's namespaces and processes matching the folder.
//!
//! Every tick (and on every pod agent event or command) it:
//! 1. reads the folder again ([`crate::manifests`]) and takes `delete pod` requests;
//! 2. plans pods ([`crate::workloads`]): creates new ones (address, namespace, veth, hosts
//!    file, agent) and starts the termination of the ones to go (endpoint terminating, SIGTERM
//!    to the agent, SIGKILL after the grace period), removing what is left once the agent exits;
//! 3. computes the objects control reads ([`crate::controller`] for the slices,
//!    [`crate::pods`] for Pods and Nodes) and writes those that changed
//!    ([`crate::objects`]);
//! 4. rewrites the hosts files that changed ([`crate::dns`]) and the status file
//!    ([`crate::state`]).
//!
//! On shutdown every agent gets SIGTERM and a moment, then every namespace with the prefix is
//! removed with whatever still runs in it, control is stopped, and the state directory goes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rand::SeedableRng;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch};

use crate::agent::AgentEvent;
use crate::config::{ConfigError, MeshConfig, NODE_NAME, PROXY_UID, ZONE, path_with};
use crate::control::Control;
use crate::controller::{self, PodView, SERVICE_NAME_LABEL};
use crate::dns;
use crate::ipam::{POD_IP_ANNOTATION, PodIps, ServiceIps};
use crate::manifests::{FolderError, Manifests, NsName, Reader};
use crate::netns::{self, NetnsError};
use crate::objects::{self, ObjectsDir};
use crate::pods::{self, Placement};
use crate::process::{self, Signal};
use crate::state::{
    self, EndpointStatus, Phase, PodStatus, Request, ServiceStatus, SliceStatus, StateError, Status,
};
use crate::workloads::{self, Existing, PodPlan};

/// Why a mesh cannot start or run.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Folder(#[from] FolderError),
    #[error(
        "another `wasmesh-local up` (pid {pid}) is running with state directory {dir}: stop it first (`wasmesh-local down --state-dir {dir}`)"
    )]
    AlreadyRunning { pid: u32, dir: PathBuf },
    #[error(
        "another `wasmesh-local up` (pid {pid}) uses the prefix {prefix:?}: starting would remove its namespaces; give this mesh another --prefix (and --state-dir)"
    )]
    PrefixInUse { pid: u32, prefix: String },
    #[error("cannot start wasmesh-control: {0}")]
    Control(std::io::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("timed out after {timeout:?} waiting for {what}; status: {status}")]
    Timeout {
        what: String,
        timeout: Duration,
        status: String,
    },
    #[error("the mesh did not start: {0}")]
    Start(String),
    #[error("the mesh did not stop cleanly: {0}")]
    Stop(String),
    #[error("the mesh stopped")]
    Stopped,
}

/// What a running mesh can be asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Shutdown,
    /// As `kubectl delete pod`: a Deployment's pod is replaced.
    DeletePod(NsName),
    /// Stop wasmesh-control (and keep it stopped), e.g. to see the proxies carry on.
    StopControl,
    StartControl,
}

/// A message from a pod agent's reader task.
enum AgentMsg {
    Event(AgentEvent),
    /// The agent process is gone.
    Exited(String),
}

struct PodRecord {
    plan: PodPlan,
    uid: String,
    seq: u64,
    ip: Ipv4Addr,
    netns: String,
    node: String,
    sidecar: bool,
    phase: Phase,
    ready: bool,
    message: String,
    restarts: u32,
    created: SystemTime,
    deletion: Option<SystemTime>,
    kill_at: Option<Instant>,
    /// The agent's pid and the write end of its stdin (closing it stops the pod at once).
    agent: Option<(u32, tokio::process::ChildStdin)>,
    /// Network namespace made and not yet removed.
    netns_made: bool,
    hosts: String,
    log_dir: PathBuf,
}

impl PodRecord {
    fn live(&self) -> bool {
        matches!(
            self.phase,
            Phase::Pending | Phase::Running | Phase::Terminating
        )
    }

    fn placement<'a>(&'a self, path: &'a str) -> Placement<'a> {
        Placement {
            key: &self.plan.key,
            uid: &self.uid,
            ip: self.ip,
            node: &self.node,
            log_dir: self.log_dir.clone(),
            path,
        }
    }
}

struct Mesh {
    cfg: MeshConfig,
    reader: Reader,
    manifests: Manifests,
    services: BTreeMap<NsName, Service>,
    service_ips: ServiceIps,
    pod_ips: PodIps,
    pods: BTreeMap<NsName, PodRecord>,
    seq: u64,
    veths: u64,
    objects: ObjectsDir,
    control: Control,
    agents_tx: mpsc::UnboundedSender<(String, AgentMsg)>,
    status_tx: watch::Sender<Arc<Status>>,
    path: String,
    rng: rand::rngs::StdRng,
    last_status: Option<Status>,
    pending_deletes: Vec<(NsName, String)>,
}

/// Runs a mesh until [`Command::Shutdown`] (or the command channel closes). `started` is
/// called once: with `Ok` when the node and control are up and the first pods are being
/// made, or with the error that prevented it (which is also returned).
pub async fn run(
    cfg: MeshConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    status_tx: watch::Sender<Arc<Status>>,
    started: impl FnOnce(Result<(), String>),
) -> Result<(), MeshError> {
    let (agents_tx, mut agents_rx) = mpsc::unbounded_channel();
    let mut mesh = match Mesh::start(cfg, agents_tx, status_tx).await {
        Ok(m) => m,
        Err(e) => {
            started(Err(e.to_string()));
            return Err(e);
        }
    };
    started(Ok(()));
    let mut tick = tokio::time::interval(mesh.cfg.rescan);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = mesh.scan() {
                    tracing::error!("{e}; keeping the last good objects");
                }
                for r in state::take_requests(&mesh.cfg.state_dir) {
                    match r {
                        Request::DeletePod(key) => mesh.request_delete(key),
                    }
                }
                mesh.check_deadlines();
            }
            cmd = commands.recv() => match cmd {
                None | Some(Command::Shutdown) => break Ok(()),
                Some(Command::DeletePod(key)) => mesh.request_delete(key),
                Some(Command::StopControl) => {
                    mesh.control.wanted = false;
                    mesh.control.stop().await;
                }
                Some(Command::StartControl) => mesh.control.wanted = true,
            },
            Some((uid, msg)) = agents_rx.recv() => mesh.on_agent(&uid, msg),
        }
        if let Err(e) = mesh.reconcile().await {
            break Err(e);
        }
    };
    mesh.teardown(&mut agents_rx).await;
    result
}

impl Mesh {
    async fn start(
        mut cfg: MeshConfig,
        agents_tx: mpsc::UnboundedSender<(String, AgentMsg)>,
        status_tx: watch::Sender<Arc<Status>>,
    ) -> Result<Self, MeshError> {
        cfg.validate()?;
        if let Ok(old) = state::read_status(&cfg.state_dir)
            && old.pid != std::process::id()
            && process::alive(old.pid)
            && process::cmdline_contains(old.pid, "wasmesh-local")
        {
            return Err(MeshError::AlreadyRunning {
                pid: old.pid,
                dir: cfg.state_dir.clone(),
            });
        }
        if let Some(pid) = process::other_up_with_prefix(&cfg.prefix) {
            return Err(MeshError::PrefixInUse {
                pid,
                prefix: cfg.prefix.clone(),
            });
        }
        let removed = netns::cleanup(&cfg.prefix, &cfg.node_netns())?;
        if !removed.is_empty() {
            tracing::warn!(
                "removed what a previous run left behind: {}",
                removed.join(", ")
            );
        }
        state::prepare(&cfg.state_dir)?;
        // Pod agents and control run from `/`: every path they get must be absolute.
        for path in [&mut cfg.state_dir, &mut cfg.manifests] {
            if let Ok(abs) = std::fs::canonicalize(&*path) {
                *path = abs;
            }
        }
        netns::add_node(&cfg.node_netns())?;
        tracing::info!(
            netns = %cfg.node_netns(),
            bridge = %format!("{}/{}", crate::config::NODE_IP, crate::config::POD_PREFIX_LEN),
            "node namespace ready"
        );
        let path = path_with(&cfg.binaries.dir);
        let mut mesh = Self {
            reader: Reader::new(&cfg.manifests),
            manifests: Manifests::default(),
            services: BTreeMap::new(),
            service_ips: ServiceIps::default(),
            pod_ips: PodIps::new(),
            pods: BTreeMap::new(),
            seq: 0,
            veths: 0,
            objects: ObjectsDir::new(cfg.state_dir.join("objects")),
            control: Control::new(),
            agents_tx,
            status_tx,
            path,
            rng: rand::rngs::StdRng::from_os_rng(),
            last_status: None,
            pending_deletes: Vec::new(),
            cfg,
        };
        let setup = async {
            mesh.scan()?;
            // Control starts on the Services and Nodes, before any pod asks for a table.
            mesh.sync_objects()?;
            mesh.control.keep(&mesh.cfg).map_err(MeshError::Control)?;
            mesh.reconcile().await
        };
        if let Err(e) = setup.await {
            let mut none = mpsc::unbounded_channel().1;
            mesh.teardown(&mut none).await;
            return Err(e);
        }
        Ok(mesh)
    }

    fn scan(&mut self) -> Result<(), MeshError> {
        let scan = self.reader.scan()?;
        for p in &scan.problems {
            tracing::error!("{p}");
        }
        for s in &scan.skipped {
            tracing::info!("{s}");
        }
        if scan.changed || self.last_status.is_none() {
            self.manifests = scan.manifests;
            let mut services = self.manifests.services.clone();
            self.service_ips.assign(&mut services);
            self.services = services;
        }
        Ok(())
    }

    fn request_delete(&mut self, key: NsName) {
        if self.pods.contains_key(&key) {
            self.pending_deletes
                .push((key, "deleted on request".into()));
        } else {
            tracing::warn!(pod = %key, "no such pod to delete");
        }
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        for r in self.pods.values_mut() {
            if let (Some(at), Some((pid, _))) = (r.kill_at, &r.agent)
                && now >= at
            {
                tracing::warn!(pod = %r.plan.key, "still running after its grace period; killing it");
                process::signal(&[*pid], Signal::Kill);
                process::signal(&netns::pids(&r.netns), Signal::Kill);
                r.kill_at = None;
            }
        }
        if let Err(e) = self.control.keep(&self.cfg) {
            tracing::error!("cannot start wasmesh-control: {e}");
        }
    }

    fn on_agent(&mut self, uid: &str, msg: AgentMsg) {
        let Some(r) = self.pods.values_mut().find(|r| r.uid == uid) else {
            return;
        };
        let key = r.plan.key.clone();
        match msg {
            AgentMsg::Event(ev) => match ev {
                AgentEvent::Initialized => {
                    tracing::debug!(pod = %key, "interception rules installed")
                }
                AgentEvent::SidecarReady => tracing::info!(pod = %key, "sidecar ready"),
                AgentEvent::Started { container, pid } => {
                    if r.phase == Phase::Pending && container != crate::agent::SIDECAR_NAME {
                        r.phase = Phase::Running;
                    }
                    tracing::debug!(pod = %key, container, pid, "started");
                }
                AgentEvent::Exited {
                    container,
                    status,
                    restart_in_ms,
                } => {
                    if let Some(ms) = restart_in_ms {
                        r.restarts += 1;
                        r.message = format!("{container} exited ({status}); restarting");
                        tracing::warn!(pod = %key, container, %status, "exited; restarting in {ms} ms (log: {})", r.log_dir.join(format!("{container}.log")).display());
                    } else if r.phase != Phase::Terminating {
                        tracing::info!(pod = %key, container, %status, "exited");
                    }
                }
                AgentEvent::Ready { ready } => {
                    if r.ready != ready {
                        r.ready = ready;
                        if r.phase == Phase::Terminating {
                            tracing::info!(pod = %key, serving = ready, "terminating");
                        } else {
                            tracing::info!(pod = %key, ip = %r.ip, "{}", if ready { "ready" } else { "not ready" });
                        }
                    }
                }
                AgentEvent::Warning { message } => {
                    tracing::warn!(pod = %key, "{message}");
                    r.message = message;
                }
                AgentEvent::Finished { phase, message } => {
                    if r.phase != Phase::Terminating {
                        r.phase = if phase == "Succeeded" {
                            Phase::Succeeded
                        } else {
                            Phase::Failed
                        };
                        r.message = message.clone();
                        if r.phase == Phase::Failed {
                            tracing::error!(pod = %key, "failed: {message} (logs: {})", r.log_dir.display());
                        } else {
                            tracing::info!(pod = %key, "completed");
                        }
                    }
                }
            },
            AgentMsg::Exited(status) => {
                r.agent = None;
                r.ready = false;
                if r.phase == Phase::Terminating {
                    self.remove_pod(&key);
                    tracing::info!(pod = %key, "removed");
                } else {
                    if r.live() {
                        r.phase = Phase::Failed;
                        r.message = format!("the pod agent exited ({status})");
                        tracing::error!(pod = %key, "the pod agent exited ({status}); see {}", r.log_dir.join("agent.log").display());
                    }
                    self.release_network(&key);
                }
            }
        }
    }

    /// Removes a pod's namespace and address (the record stays, e.g. as Failed).
    fn release_network(&mut self, key: &NsName) {
        let Some(r) = self.pods.get_mut(key) else {
            return;
        };
        if r.netns_made {
            if let Err(e) = netns::remove(&r.netns) {
                tracing::error!(pod = %key, "{e}");
            }
            r.netns_made = false;
            self.pod_ips.release(r.ip);
        }
    }

    fn remove_pod(&mut self, key: &NsName) {
        self.release_network(key);
        if let Some(r) = self.pods.remove(key) {
            let _ = std::fs::remove_file(self.spec_file(&r.netns));
            // The pod's token proves nothing once it is gone.
            let sa = pods::service_account(&r.plan.spec);
            let _ = std::fs::remove_file(self.cfg.token_file(&key.namespace, &sa, &key.name));
        }
    }

    /// A fresh random token for the pod's sidecar (readable by the proxy's UID only); control
    /// maps it to the ServiceAccount by its path.
    fn write_token(&self, key: &NsName, service_account: &str) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let path = self
            .cfg
            .token_file(&key.namespace, service_account, &key.name);
        let err = |p: &std::path::Path, e: std::io::Error| format!("{}: {e}", p.display());
        let mut dir = path.parent().map(std::path::Path::to_path_buf);
        if let Some(d) = &dir {
            std::fs::create_dir_all(d).map_err(|e| err(d, e))?;
        }
        // Every directory down from the state dir must be searchable by the proxy.
        while let Some(d) = dir {
            if !d.starts_with(&self.cfg.state_dir) {
                break;
            }
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| err(&d, e))?;
            dir = d.parent().map(std::path::Path::to_path_buf);
        }
        let bytes: [u8; 32] = rand::random();
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        state::write_atomic(&path, token.as_bytes()).map_err(|e| e.to_string())?;
        std::os::unix::fs::chown(&path, Some(PROXY_UID), Some(PROXY_UID))
            .map_err(|e| err(&path, e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))
            .map_err(|e| err(&path, e))?;
        Ok(())
    }

    fn spec_file(&self, netns: &str) -> PathBuf {
        let file = netns.strip_prefix(&self.cfg.prefix).unwrap_or(netns);
        self.cfg.state_dir.join("pods").join(format!("{file}.json"))
    }

    /// Brings pods, objects, hosts files and status up to date.
    async fn reconcile(&mut self) -> Result<(), MeshError> {
        let existing: Vec<Existing> = self
            .pods
            .values()
            .map(|r| Existing {
                key: r.plan.key.clone(),
                owner: r.plan.owner.clone(),
                spec_hash: r.plan.spec_hash.clone(),
                terminating: r.phase == Phase::Terminating,
                ready: r.ready,
                seq: r.seq,
            })
            .collect();
        let mut plan = workloads::plan(&self.manifests, &existing, &mut self.rng);
        plan.delete.append(&mut self.pending_deletes);
        let mut seen = BTreeSet::new();
        for (key, reason) in plan.delete {
            if seen.insert(key.clone()) {
                self.terminate(&key, &reason);
            }
        }
        for p in plan.create {
            self.create_pod(p).await;
        }
        self.sync_objects()?;
        self.publish_status()?;
        Ok(())
    }

    fn terminate(&mut self, key: &NsName, reason: &str) {
        let Some(r) = self.pods.get_mut(key) else {
            return;
        };
        if r.phase == Phase::Terminating {
            return;
        }
        match &r.agent {
            Some((pid, _)) => {
                let grace = pods::grace(&r.plan.spec, &self.cfg);
                tracing::info!(pod = %key, "terminating: {reason} (grace period {grace:?})");
                r.phase = Phase::Terminating;
                r.deletion = Some(SystemTime::now());
                r.kill_at = Some(Instant::now() + grace + Duration::from_secs(3));
                process::signal(&[*pid], Signal::Term);
            }
            None => {
                tracing::info!(pod = %key, "removed: {reason}");
                self.remove_pod(key);
            }
        }
    }

    async fn create_pod(&mut self, plan: PodPlan) {
        self.seq += 1;
        let key = plan.key.clone();
        let netns = self.cfg.pod_netns(&key.namespace, &key.name);
        let node = pods::node_of(&plan.spec);
        let sidecar = pods::wants_sidecar(&plan.meta, self.cfg.sidecar);
        let log_dir = self
            .cfg
            .state_dir
            .join("logs")
            .join(&key.namespace)
            .join(&key.name);
        let pinned = plan
            .meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(POD_IP_ANNOTATION))
            .cloned();
        let mut record = PodRecord {
            uid: new_uid(&mut self.rng),
            seq: self.seq,
            ip: Ipv4Addr::UNSPECIFIED,
            netns: netns.clone(),
            node,
            sidecar,
            phase: Phase::Pending,
            ready: false,
            message: String::new(),
            restarts: 0,
            created: SystemTime::now(),
            deletion: None,
            kill_at: None,
            agent: None,
            netns_made: false,
            hosts: String::new(),
            log_dir,
            plan,
        };
        let result = match self.pod_ips.allocate(pinned.as_deref()) {
            Ok(ip) => {
                record.ip = ip;
                self.start_pod(&mut record).await
            }
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => {
                tracing::info!(pod = %key, ip = %record.ip, netns = %netns, sidecar, "created");
            }
            Err(message) => {
                tracing::error!(pod = %key, "cannot start: {message}");
                record.phase = Phase::Failed;
                record.message = message;
                if record.netns_made {
                    if let Err(e) = netns::remove(&netns) {
                        tracing::error!(pod = %key, "{e}");
                    }
                    record.netns_made = false;
                }
                if !record.ip.is_unspecified() {
                    self.pod_ips.release(record.ip);
                }
            }
        }
        self.pods.insert(key, record);
    }

    /// Namespace, hosts file, spec, agent.
    async fn start_pod(&mut self, r: &mut PodRecord) -> Result<(), String> {
        self.veths += 1;
        let veth = format!("veth{}", self.veths);
        r.netns_made = true;
        netns::add_pod(&self.cfg.node_netns(), &r.netns, &veth, r.ip).map_err(|e| e.to_string())?;
        let etc = netns::etc_dir(&r.netns);
        std::fs::create_dir_all(&etc).map_err(|e| format!("{}: {e}", etc.display()))?;
        let resolv = etc.join("resolv.conf");
        std::fs::write(&resolv, dns::render_resolv_conf(&r.plan.key.namespace))
            .map_err(|e| format!("{}: {e}", resolv.display()))?;
        // The hosts file must exist before `ip netns exec` bind-mounts it.
        let hosts = self.hosts_for(&r.plan.key, r.ip);
        let hosts_path = etc.join("hosts");
        std::fs::write(&hosts_path, &hosts)
            .map_err(|e| format!("{}: {e}", hosts_path.display()))?;
        r.hosts = hosts;
        std::fs::create_dir_all(&r.log_dir).map_err(|e| format!("{}: {e}", r.log_dir.display()))?;

        let (spec, warnings) = pods::agent_spec(
            &r.plan.meta,
            &r.plan.spec,
            &r.placement(&self.path),
            &self.cfg,
        );
        for w in warnings {
            tracing::warn!(pod = %r.plan.key, "{w}");
        }
        if spec.sidecar.is_some() && self.cfg.mtls {
            self.write_token(&r.plan.key, &pods::service_account(&r.plan.spec))?;
        }
        let spec_path = self.spec_file(&r.netns);
        let json = serde_json::to_vec_pretty(&spec).map_err(|e| e.to_string())?;
        state::write_atomic(&spec_path, &json).map_err(|e| e.to_string())?;

        let agent_log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(r.log_dir.join("agent.log"))
            .map_err(|e| format!("{}: {e}", r.log_dir.join("agent.log").display()))?;
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &r.netns])
            .arg(&self.cfg.binaries.local)
            .arg("pod-agent")
            .arg("--spec")
            .arg(&spec_path)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(agent_log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the pod agent: {e}"))?;
        let pid = child.id().unwrap_or_default();
        let stdin = child.stdin.take().ok_or("the pod agent has no stdin")?;
        let stdout = child.stdout.take().ok_or("the pod agent has no stdout")?;
        r.agent = Some((pid, stdin));
        let tx = self.agents_tx.clone();
        let uid = r.uid.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<AgentEvent>(&line) {
                    Ok(ev) => {
                        let _ = tx.send((uid.clone(), AgentMsg::Event(ev)));
                    }
                    Err(_) => tracing::debug!(%line, "unexpected output from a pod agent"),
                }
            }
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            let _ = tx.send((uid, AgentMsg::Exited(status)));
        });
        Ok(())
    }

    /// The slices every Service implies, from the live pods.
    fn derived_slices(&self) -> BTreeMap<NsName, EndpointSlice> {
        let empty = BTreeMap::new();
        let views: Vec<PodView<'_>> = self
            .pods
            .values()
            .filter(|r| r.live() && r.netns_made)
            .map(|r| PodView {
                key: &r.plan.key,
                uid: &r.uid,
                labels: r.plan.meta.labels.as_ref().unwrap_or(&empty),
                ip: r.ip,
                node: &r.node,
                zone: ZONE,
                ready: r.ready,
                terminating: r.phase == Phase::Terminating,
                containers: &r.plan.spec.containers,
                hostname: r.plan.spec.hostname.as_deref(),
                subdomain: r.plan.spec.subdomain.as_deref(),
            })
            .collect();
        controller::endpoint_slices(&self.services, &views)
    }

    fn hosts_for(&self, pod: &NsName, ip: Ipv4Addr) -> String {
        let derived = self.derived_slices();
        let addrs = dns::service_addresses(
            &self.services,
            derived.values().chain(self.manifests.slices.values()),
        );
        dns::render_hosts(pod, ip, &addrs)
    }

    fn sync_objects(&mut self) -> Result<(), MeshError> {
        let derived = self.derived_slices();
        let mut out = BTreeMap::new();
        for (k, svc) in &self.services {
            objects::add(&mut out, "v1", "Service", Some(&k.namespace), &k.name, svc);
        }
        for (k, s) in self.manifests.slices.iter().chain(derived.iter()) {
            objects::add(
                &mut out,
                "discovery.k8s.io/v1",
                "EndpointSlice",
                Some(&k.namespace),
                &k.name,
                s,
            );
        }
        let mut nodes: BTreeSet<String> = BTreeSet::from([NODE_NAME.to_string()]);
        for r in self.pods.values().filter(|r| r.live() && r.netns_made) {
            nodes.insert(r.node.clone());
            let pod = pods::pod_object(
                &r.plan.meta,
                &r.plan.spec,
                &r.placement(&self.path),
                r.sidecar,
                r.ready,
                r.deletion.and_then(time),
                time(r.created).unwrap_or(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
            );
            objects::add(
                &mut out,
                "v1",
                "Pod",
                Some(&r.plan.key.namespace),
                &r.plan.key.name,
                &pod,
            );
        }
        for n in &nodes {
            objects::add(&mut out, "v1", "Node", None, n, &pods::node_object(n));
        }
        for (k, obj) in &self.manifests.control {
            let ns = Some(k.namespace.as_str()).filter(|ns| !ns.is_empty());
            objects::add(
                &mut out,
                k.kind.api_version(),
                k.kind.as_str(),
                ns,
                &k.name,
                obj,
            );
        }
        self.objects.sync(&out)?;

        // Hosts files, for the pods whose view changed.
        let addrs = dns::service_addresses(
            &self.services,
            derived.values().chain(self.manifests.slices.values()),
        );
        for r in self.pods.values_mut().filter(|r| r.live() && r.netns_made) {
            let hosts = dns::render_hosts(&r.plan.key, r.ip, &addrs);
            if hosts != r.hosts {
                // In place: the pod's processes see this inode through a bind mount.
                let path = netns::etc_dir(&r.netns).join("hosts");
                match dns::write_in_place(&path, &hosts) {
                    Ok(()) => r.hosts = hosts,
                    Err(e) => tracing::error!(pod = %r.plan.key, "{}: {e}", path.display()),
                }
            }
        }
        Ok(())
    }

    fn status(&self) -> Status {
        let derived = self.derived_slices();
        let pods = self
            .pods
            .values()
            .map(|r| PodStatus {
                namespace: r.plan.key.namespace.clone(),
                name: r.plan.key.name.clone(),
                uid: r.uid.clone(),
                ip: r.ip,
                node: r.node.clone(),
                netns: r.netns.clone(),
                phase: r.phase,
                ready: r.ready && r.phase == Phase::Running,
                sidecar: r.sidecar,
                containers: r
                    .plan
                    .spec
                    .containers
                    .iter()
                    .map(|c| c.name.clone())
                    .collect(),
                restarts: r.restarts,
                created: r
                    .created
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default(),
                message: r.message.clone(),
                labels: r.plan.meta.labels.clone().unwrap_or_default(),
                log_dir: r.log_dir.clone(),
            })
            .collect();
        let services = self
            .services
            .iter()
            .map(|(k, s)| service_status(k, s))
            .collect();
        let mut slices: Vec<SliceStatus> = self
            .manifests
            .slices
            .iter()
            .map(|(k, s)| slice_status(k, s, false))
            .collect();
        slices.extend(derived.iter().map(|(k, s)| slice_status(k, s, true)));
        slices.sort_by(|a, b| {
            (&a.namespace, &a.service, &a.name).cmp(&(&b.namespace, &b.service, &b.name))
        });
        Status {
            pid: std::process::id(),
            prefix: self.cfg.prefix.clone(),
            node_netns: self.cfg.node_netns(),
            manifests: self.cfg.manifests.clone(),
            bin_dir: self.cfg.binaries.dir.clone(),
            control_running: self.control.running(),
            pods,
            services,
            slices,
        }
    }

    fn publish_status(&mut self) -> Result<(), MeshError> {
        let status = self.status();
        if self.last_status.as_ref() != Some(&status) {
            state::write_status(&self.cfg.state_dir, &status)?;
            self.status_tx.send_replace(Arc::new(status.clone()));
            self.last_status = Some(status);
        }
        Ok(())
    }

    /// Stops everything and removes everything.
    async fn teardown(&mut self, agents_rx: &mut mpsc::UnboundedReceiver<(String, AgentMsg)>) {
        let pids: Vec<u32> = self
            .pods
            .values()
            .filter_map(|r| r.agent.as_ref().map(|(pid, _)| *pid))
            .collect();
        if !pids.is_empty() {
            tracing::info!("stopping {} pods", pids.len());
            process::signal(&pids, Signal::Term);
            let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
            while self.pods.values().any(|r| r.agent.is_some()) {
                match tokio::time::timeout_at(deadline, agents_rx.recv()).await {
                    Ok(Some((uid, AgentMsg::Exited(_)))) => {
                        if let Some(r) = self.pods.values_mut().find(|r| r.uid == uid) {
                            r.agent = None;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
        // Closing the agents' stdin stops any that are left at once.
        for r in self.pods.values_mut() {
            r.agent = None;
        }
        self.control.wanted = false;
        self.control.stop().await;
        match netns::cleanup(&self.cfg.prefix, &self.cfg.node_netns()) {
            Ok(removed) => tracing::info!("removed {} network namespaces", removed.len()),
            Err(e) => tracing::error!("{e}; run `wasmesh-local down` to retry"),
        }
        if let Err(e) = state::remove(&self.cfg.state_dir) {
            tracing::error!("{e}");
        }
        self.pods.clear();
    }
}

fn time(t: SystemTime) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::try_from(t).ok().map(Time)
}

fn new_uid(rng: &mut impl rand::Rng) -> String {
    let b: [u8; 16] = rng.random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn service_status(k: &NsName, s: &Service) -> ServiceStatus {
    let spec = s.spec.clone().unwrap_or_default();
    ServiceStatus {
        namespace: k.namespace.clone(),
        name: k.name.clone(),
        type_: spec.type_.clone().unwrap_or_else(|| "ClusterIP".into()),
        cluster_ip: spec.cluster_ip.clone().unwrap_or_default(),
        external_name: spec.external_name.clone(),
        ports: spec
            .ports
            .iter()
            .flatten()
            .map(|p| {
                let proto = p.protocol.as_deref().unwrap_or("TCP");
                match p.node_port {
                    Some(np) => format!("{}:{np}/{proto}", p.port),
                    None => format!("{}/{proto}", p.port),
                }
            })
            .collect(),
    }
}

fn slice_status(k: &NsName, s: &EndpointSlice, managed: bool) -> SliceStatus {
    SliceStatus {
        namespace: k.namespace.clone(),
        name: k.name.clone(),
        service: s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned()
            .unwrap_or_default(),
        managed,
        ports: s
            .ports
            .iter()
            .flatten()
            .map(|p| {
                format!(
                    "{}:{}/{}",
                    p.name.as_deref().unwrap_or(""),
                    p.port.map(|n| n.to_string()).unwrap_or_else(|| "*".into()),
                    p.protocol.as_deref().unwrap_or("TCP")
                )
            })
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .flat_map(|e| {
                let c = e.conditions.clone().unwrap_or_default();
                e.addresses.iter().map(move |a| EndpointStatus {
                    ip: a.clone(),
                    pod: e.target_ref.as_ref().and_then(|r| r.name.clone()),
                    node: e.node_name.clone(),
                    ready: c.ready.unwrap_or(true),
                    serving: c.serving.or(c.ready).unwrap_or(true),
                    terminating: c.terminating.unwrap_or(false),
                })
            })
            .collect(),
    }
}

/// A mesh running on its own thread, for tests and embedding. Dropping it shuts the mesh down
/// and removes everything, also when a test panics.
pub struct MeshHandle {
    commands: mpsc::UnboundedSender<Command>,
    status: watch::Receiver<Arc<Status>>,
    done: std::sync::mpsc::Receiver<Result<(), String>>,
    thread: Option<std::thread::JoinHandle<()>>,
    prefix: String,
    node: String,
}

impl MeshHandle {
    /// Starts a mesh and waits until its node and control are up (at most a minute).
    pub fn start(cfg: MeshConfig) -> Result<Self, MeshError> {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(Arc::new(Status::default()));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let prefix = cfg.prefix.clone();
        let node = cfg.node_netns();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(MeshError::Runtime)?;
        let thread = std::thread::Builder::new()
            .name(format!("mesh-{prefix}"))
            .spawn(move || {
                let result = rt.block_on(run(cfg, cmd_rx, status_tx, move |r| {
                    let _ = started_tx.send(r);
                }));
                let _ = done_tx.send(result.map_err(|e| e.to_string()));
            })
            .map_err(MeshError::Runtime)?;
        let handle = Self {
            commands: cmd_tx,
            status: status_rx,
            done: done_rx,
            thread: Some(thread),
            prefix,
            node,
        };
        match started_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => Err(MeshError::Start(e)),
            Err(_) => Err(MeshError::Start("no answer within 60 s".into())),
        }
    }

    pub fn status(&self) -> Arc<Status> {
        self.status.borrow().clone()
    }

    /// Polls the status until `f` holds.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&Status) -> bool,
    ) -> Result<Arc<Status>, MeshError> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if f(&s) {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(MeshError::Timeout {
                    what: what.to_string(),
                    timeout,
                    status: serde_json::to_string(&*s).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn send(&self, cmd: Command) -> Result<(), MeshError> {
        self.commands.send(cmd).map_err(|_| MeshError::Stopped)
    }

    /// Shuts down and removes everything; returns the loop's result.
    pub fn shutdown(mut self) -> Result<(), MeshError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), MeshError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let _ = self.commands.send(Command::Shutdown);
        let result = match self.done.recv_timeout(Duration::from_secs(60)) {
            Ok(r) => {
                let _ = thread.join();
                r
            }
            Err(_) => Err("the mesh did not stop within 60 s".into()),
        };
        // Whatever happened, nothing with our prefix stays.
        if let Err(e) = netns::cleanup(&self.prefix, &self.node) {
            tracing::error!("{e}");
        }
        result.map_err(MeshError::Stop)
    }
}

impl Drop for MeshHandle {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
