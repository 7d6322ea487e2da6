//! The run's network: a "node" namespace holding a bridge, and one namespace per pod joined to
//! it by a veth pair. Every link is created inside the node namespace (`ip -n`), the node
//! forwards nothing (`ip_forward = 0`), and no namespace has a route out: nothing is added to,
//! or routed through, the host's namespace. Processes run inside with `ip netns exec`.
//!
//! [`Topology`] and [`Daemon`] undo themselves on drop: processes are killed and waited for,
//! then the namespaces are deleted (their rules and links go with them).

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Namespace names start with this, then the orchestrator's PID: `wmb-<pid>-<pod>`.
pub const PREFIX: &str = "wmb-";

/// The bridge's address in the node namespace, where control listens.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

/// The bridge's MAC address (locally administered), fixed so it never follows its ports'.
const BRIDGE_MAC: &str = "02:00:0a:f4:00:01";

/// A pod: its namespace and address on the bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

/// Runs a command to completion, failing with its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `program args` inside namespace `ns`, failing with its stderr.
pub fn exec_in(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    ip(&all)
}

/// The namespaces of one run. Dropping it deletes them.
#[derive(Debug)]
pub struct Topology {
    pub node: String,
    created: Vec<String>,
}

impl Topology {
    /// Creates the node namespace with its bridge.
    pub fn new() -> anyhow::Result<Self> {
        let node = format!("{PREFIX}{}-node", std::process::id());
        let mut topo = Self {
            node: node.clone(),
            created: Vec::new(),
        };
        topo.add_ns(&node)?;
        let n = node.as_str();
        // A fixed MAC: a bridge left to choose takes its lowest port's and changes it as pods
        // are added, and a pod holding the old one in its ARP cache loses its packets for
        // tens of seconds (see examples/local-mesh/src/netns.rs).
        ip(&[
            "-n", n, "link", "add", "br0", "address", BRIDGE_MAC, "type", "bridge",
        ])?;
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", n, "link", "set", "br0", "up"])?;
        exec_in(n, "sysctl", &["-qw", "net.ipv4.ip_forward=0"])?;
        Ok(topo)
    }

    fn add_ns(&mut self, ns: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", ns])
            .with_context(|| format!("creating network namespace {ns} (are you root?)"))?;
        self.created.push(ns.to_string());
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    /// Adds a pod namespace `wmb-<pid>-<name>` at `10.244.0.<host>`, with a route for the
    /// Service range (10.96.0.0/12) towards the node, as a cluster node would have.
    pub fn add_pod(&mut self, name: &str, host: u8) -> anyhow::Result<Pod> {
        let ns = format!("{PREFIX}{}-{name}", std::process::id());
        self.add_ns(&ns)?;
        let ip_addr = Ipv4Addr::new(10, 244, 0, host);
        let veth = format!("v{host}");
        let n = self.node.as_str();
        ip(&[
            "-n", n, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["-n", n, "link", "set", &veth, "master", "br0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip_addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "10.96.0.0/12",
            "via",
            &NODE_IP.to_string(),
        ])?;
        // Many short connections in a row: let connect() reuse ports in TIME_WAIT (per
        // namespace; the same for every pair).
        exec_in(&ns, "sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        Ok(Pod { ns, ip: ip_addr })
    }

    /// Deletes a pod's namespace (its veth, rules and sockets go with it) and forgets its
    /// address in the node, so a new pod can take the address at once.
    pub fn remove_pod(&mut self, pod: &Pod) -> anyhow::Result<()> {
        kill_pids_in(&pod.ns);
        // A deleted namespace is freed asynchronously; delete the veth now so the next pod
        // can take its name.
        let veth = format!("v{}", pod.ip.octets()[3]);
        self.created.retain(|n| n != &pod.ns);
        // Both fail only if the namespaces are gone already (someone removed them): say so.
        let link = ip(&["-n", &self.node, "link", "del", &veth]);
        ip(&["netns", "del", &pod.ns])?;
        link?;
        let _ = ip(&[
            "-n",
            &self.node,
            "neigh",
            "flush",
            "to",
            &pod.ip.to_string(),
        ]);
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            kill_pids_in(ns);
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

/// Kills whatever still runs in one of our namespaces (only ever called on `wmb-` names).
fn kill_pids_in(ns: &str) {
    if !ns.starts_with(PREFIX) {
        return;
    }
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if pid.parse::<u32>().is_ok() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
}

/// Removes namespaces a crashed earlier run left behind: `wmb-<pid>-…` whose PID is gone.
pub fn remove_leftovers() -> anyhow::Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running `ip netns list` (is iproute2 installed?)")?;
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_pids_in(name);
        ip(&["netns", "del", name])?;
        removed.push(name.to_string());
    }
    Ok(removed)
}

/// How a process is placed: namespace, CPU, user.
#[derive(Debug, Clone)]
pub struct Placement<'a> {
    pub ns: &'a str,
    pub cpu: u32,
    /// Run as this UID and GID (`setpriv`), or as root.
    pub uid: Option<u32>,
}

/// Builds `ip netns exec NS taskset -c CPU [setpriv …] PROGRAM ARGS`. Each of these execs
/// the next, so the child's PID is the program's own.
pub fn command_in(at: &Placement<'_>, program: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", at.ns, "taskset", "-c", &at.cpu.to_string()]);
    if let Some(uid) = at.uid {
        cmd.args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--",
        ]);
    }
    cmd.arg(program).args(args).stdin(Stdio::null());
    cmd
}

/// A long-running process of ours. Dropping it kills it.
#[derive(Debug)]
pub struct Daemon {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with stdout and stderr going to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails, with the end of its log, if the process has exited.
    pub fn check(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); end of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// The end of the log, for error messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 20)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        eprintln!(
            "warning: {} (pid {}) did not exit",
            self.name,
            self.child.id()
        );
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
