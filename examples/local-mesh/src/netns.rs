//! Network namespaces: the node, the pods, and removing them.
//!
//! The node namespace holds a bridge ([`BRIDGE`], [`NODE_IP`]/16). A pod's namespace gets
//! `lo`, and `eth0` whose veth peer is created directly inside the node namespace and attached
//! to the bridge; its default route is the bridge address. Nothing is created in the machine's
//! own namespace and the node namespace does not forward, so no packet has a way out.
//!
//! The bridge gets a fixed MAC address ([`BRIDGE_MAC`]). Without one, Linux gives a bridge the
//! lowest MAC of its ports and changes it whenever a port with a lower one is added (or the
//! lowest removed). Pods starting together then race it: a pod that resolved the gateway just
//! before a change keeps the old MAC (ARP updates within a second of the last are ignored),
//! frames to it are not for the bridge any more and are dropped, and the pod cannot reach
//! control, or anything, until its ARP entry is probed again. That was the local-mesh tests'
//! "sidecar never became ready" flake: one TCP connection to control made, the next ones
//! hanging for about 30 s.
//!
//! Removal kills every process still in the namespace (`ip netns pids`), deletes it, and
//! removes its `/etc/netns/<name>` directory. [`cleanup`] does that for every namespace and
//! directory with a prefix: the leftovers of a crash.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{BRIDGE, BRIDGE_MAC, NODE_IP, POD_PREFIX_LEN};
use crate::process::{self, RunError, Signal};

/// A network namespace could not be made or changed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {netns}: {source}")]
    Command { netns: String, source: RunError },
    #[error("network namespace {netns}: {path}: {source}")]
    File {
        netns: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn ip(netns: &str, args: &[&str]) -> Result<String, NetnsError> {
    process::run("ip", args).map_err(|source| NetnsError::Command {
        netns: netns.to_string(),
        source,
    })
}

/// Runs `ip -batch` inside `netns` (one process for many changes).
fn ip_batch(netns: &str, script: &str) -> Result<(), NetnsError> {
    let dir = std::env::temp_dir();
    let path = dir.join(format!(".wasmesh-local-ip-{}-{netns}", std::process::id()));
    std::fs::write(&path, script).map_err(|source| NetnsError::File {
        netns: netns.to_string(),
        path: path.clone(),
        source,
    })?;
    let p = path.to_string_lossy().into_owned();
    let r = ip(netns, &["-n", netns, "-batch", &p]);
    let _ = std::fs::remove_file(&path);
    r.map(|_| ())
}

/// `/etc/netns/<name>`: files there replace those in `/etc` for `ip netns exec <name>`.
pub fn etc_dir(netns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(netns)
}

/// Creates the node namespace and its bridge.
pub fn add_node(netns: &str) -> Result<(), NetnsError> {
    ip(netns, &["netns", "add", netns])?;
    ip_batch(
        netns,
        &format!(
            "link set lo up\nlink add {BRIDGE} address {BRIDGE_MAC} type bridge\naddr add {NODE_IP}/{POD_PREFIX_LEN} dev {BRIDGE}\nlink set {BRIDGE} up\n"
        ),
    )
}

/// Creates a pod's namespace, wired to the node's bridge through `veth` (a name inside the
/// node namespace).
pub fn add_pod(node: &str, netns: &str, veth: &str, pod_ip: Ipv4Addr) -> Result<(), NetnsError> {
    ip(netns, &["netns", "add", netns])?;
    ip_batch(
        node,
        &format!(
            "link add {veth} type veth peer name eth0 netns {netns}\nlink set {veth} master {BRIDGE}\nlink set {veth} up\n"
        ),
    )?;
    ip_batch(
        netns,
        &format!(
            "link set lo up\naddr add {pod_ip}/{POD_PREFIX_LEN} dev eth0\nlink set eth0 up\nroute add default via {NODE_IP} dev eth0\n"
        ),
    )
}

/// Pids of the processes in a namespace.
pub fn pids(netns: &str) -> Vec<u32> {
    process::run("ip", &["netns", "pids", netns])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills whatever still runs in the namespace, deletes it and its `/etc/netns` directory.
/// Missing pieces are fine.
pub fn remove(netns: &str) -> Result<(), NetnsError> {
    let left = pids(netns);
    if !left.is_empty() {
        process::signal(&left, Signal::Kill);
        process::wait_gone(&left, Duration::from_secs(2));
    }
    let dir = etc_dir(netns);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| NetnsError::File {
            netns: netns.to_string(),
            path: dir.clone(),
            source,
        })?;
    }
    if list("")?.iter().any(|n| n == netns) {
        ip(netns, &["netns", "del", netns])?;
    }
    Ok(())
}

/// Names of the network namespaces starting with `prefix`.
pub fn list(prefix: &str) -> Result<Vec<String>, NetnsError> {
    let out = ip("(all)", &["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect())
}

/// Removes every namespace and `/etc/netns` directory starting with `prefix`, pods first and
/// the node last; returns what was removed.
pub fn cleanup(prefix: &str, node: &str) -> Result<Vec<String>, NetnsError> {
    let mut names = list(prefix)?;
    if let Ok(dirs) = std::fs::read_dir("/etc/netns") {
        for d in dirs.flatten() {
            let n = d.file_name().to_string_lossy().into_owned();
            if n.starts_with(prefix) && !names.contains(&n) {
                names.push(n);
            }
        }
    }
    names.sort_by_key(|n| n == node);
    // Stop every process first, so nothing runs in a namespace while its peers disappear.
    let all: Vec<u32> = names.iter().flat_map(|n| pids(n)).collect();
    process::stop(&all, Duration::from_secs(1));
    let mut first_error = None;
    for n in &names {
        if let Err(e) = remove(n) {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(names),
    }
}
