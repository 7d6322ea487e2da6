//! The state directory, shared by `up` and the other commands.
//!
//! ```text
//! <state>/.wasmesh-local     marker: this directory is ours (and may be removed)
//! <state>/status.json        what `get` prints and `exec` needs; rewritten by `up` on change
//! <state>/objects/           what control reads (its folder source)
//! <state>/pods/<ns>_<pod>.json   each pod agent's spec
//! <state>/logs/<ns>/<pod>/<container>.log, logs/wasmesh-control.log
//! <state>/requests/          `delete pod` requests for `up`
//! ```

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manifests::NsName;

pub const MARKER: &str = ".wasmesh-local";
pub const STATUS: &str = "status.json";

/// A state directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} exists and was not made by wasmesh-local (no {MARKER} in it): choose another --state-dir"
    )]
    NotOurs(PathBuf),
    #[error(
        "no mesh is running with state directory {0} (no status.json): start one with `wasmesh-local up DIR`"
    )]
    NoStatus(PathBuf),
    #[error("{path}: not a status file of this version of wasmesh-local: {reason}")]
    BadStatus { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Pod phases, as `get pods` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Running,
    Terminating,
    Succeeded,
    Failed,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Terminating => "Terminating",
            Phase::Succeeded => "Completed",
            Phase::Failed => "Failed",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub ip: Ipv4Addr,
    pub node: String,
    pub netns: String,
    pub phase: Phase,
    pub ready: bool,
    pub sidecar: bool,
    pub containers: Vec<String>,
    pub restarts: u32,
    /// Unix time, seconds.
    pub created: u64,
    pub message: String,
    /// Labels, for tests and `get -l` some day.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Where the agent's containers log.
    pub log_dir: PathBuf,
}

impl PodStatus {
    pub fn key(&self) -> NsName {
        NsName::new(&self.namespace, &self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    pub type_: String,
    pub cluster_ip: String,
    pub external_name: Option<String>,
    /// `80/TCP`, `80:8080/TCP` style.
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub ip: String,
    pub pod: Option<String>,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceStatus {
    pub namespace: String,
    pub name: String,
    pub service: String,
    /// Ours (derived from a selector) or the user's.
    pub managed: bool,
    /// `name:port/protocol`.
    pub ports: Vec<String>,
    pub endpoints: Vec<EndpointStatus>,
}

/// Everything `get` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The `up` process.
    pub pid: u32,
    pub prefix: String,
    pub node_netns: String,
    pub manifests: PathBuf,
    /// Prepended to PATH in pods (where `wasmesh-demo` is).
    pub bin_dir: PathBuf,
    pub control_running: bool,
    pub pods: Vec<PodStatus>,
    pub services: Vec<ServiceStatus>,
    pub slices: Vec<SliceStatus>,
}

impl Status {
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodStatus> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }
}

/// Prepares a state directory: refuses one that is not ours, empties one that is (the
/// leftovers of a crash), creates it world-traversable (the sidecar, UID 1337, reads nothing
/// there, but its logs are opened for it).
pub fn prepare(dir: &Path) -> Result<(), StateError> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir).map_err(io(dir))?.next().is_none();
        if !empty {
            remove(dir)?;
        }
    }
    for sub in ["", "objects", "pods", "logs", "requests"] {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).map_err(io(&p))?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io(dir))?;
    let marker = dir.join(MARKER);
    std::fs::write(
        &marker,
        "made by wasmesh-local up; removed by wasmesh-local down\n",
    )
    .map_err(io(&marker))?;
    Ok(())
}

/// Removes a state directory, if it is ours.
pub fn remove(dir: &Path) -> Result<(), StateError> {
    if !dir.exists() {
        return Ok(());
    }
    if !dir.join(MARKER).exists() {
        return Err(StateError::NotOurs(dir.to_path_buf()));
    }
    std::fs::remove_dir_all(dir).map_err(io(dir))
}

/// Writes `bytes` to `path` atomically (a hidden temporary file, renamed).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

pub fn write_status(dir: &Path, status: &Status) -> Result<(), StateError> {
    let json = serde_json::to_vec_pretty(status).map_err(|e| StateError::BadStatus {
        path: dir.join(STATUS),
        reason: e.to_string(),
    })?;
    write_atomic(&dir.join(STATUS), &json)
}

pub fn read_status(dir: &Path) -> Result<Status, StateError> {
    let path = dir.join(STATUS);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StateError::NoStatus(dir.to_path_buf()));
        }
        Err(e) => return Err(io(&path)(e)),
    };
    serde_json::from_slice(&bytes).map_err(|e| StateError::BadStatus {
        path,
        reason: e.to_string(),
    })
}

/// A request from another command to the running `up`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Request {
    DeletePod(NsName),
}

pub fn send_request(dir: &Path, request: &Request) -> Result<(), StateError> {
    let json = serde_json::to_vec(request).map_err(|e| StateError::BadStatus {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let path = dir
        .join("requests")
        .join(format!("{nanos}-{}.json", std::process::id()));
    write_atomic(&path, &json)
}

/// Takes the pending requests (oldest first) and removes their files.
pub fn take_requests(dir: &Path) -> Vec<Request> {
    let Ok(entries) = std::fs::read_dir(dir.join("requests")) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| {
            let r = std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let _ = std::fs::remove_file(&p);
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_is_made_refused_when_foreign_and_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        prepare(&dir).expect("prepare");
        assert!(dir.join("objects").is_dir());
        write_status(
            &dir,
            &Status {
                pid: 7,
                ..Default::default()
            },
        )
        .expect("write");
        assert_eq!(read_status(&dir).expect("read").pid, 7);
        // Prepared again: emptied.
        prepare(&dir).expect("again");
        assert!(matches!(read_status(&dir), Err(StateError::NoStatus(_))));
        remove(&dir).expect("remove");
        assert!(!dir.exists());

        let foreign = tmp.path().join("foreign");
        std::fs::create_dir_all(&foreign).expect("mkdir");
        std::fs::write(foreign.join("precious"), "x").expect("write");
        assert!(matches!(prepare(&foreign), Err(StateError::NotOurs(_))));
        assert!(matches!(remove(&foreign), Err(StateError::NotOurs(_))));
        assert!(foreign.join("precious").exists());
    }

    #[test]
    fn requests_round_trip_in_order() {
        let tmp = tempfile::tempdir().expect("tempdir");
        prepare(tmp.path()).expect("prepare");
        let a = Request::DeletePod(NsName::new("demo", "a"));
        let b = Request::DeletePod(NsName::new("demo", "b"));
        send_request(tmp.path(), &a).expect("a");
        send_request(tmp.path(), &b).expect("b");
        assert_eq!(take_requests(tmp.path()), vec![a, b]);
        assert!(take_requests(tmp.path()).is_empty());
    }
}
