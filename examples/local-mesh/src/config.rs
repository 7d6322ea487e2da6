//! Everything `up` needs, in one place: where the manifests and the state live, the prefix every
//! name we create starts with, the binaries, and the fixed addresses of the local "cluster".

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The node namespace's bridge address: the pods' default gateway, where control listens.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// Pod addresses: 10.244.0.0/16, as in a default kubeadm cluster.
pub const POD_NETWORK: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 0);
pub const POD_PREFIX_LEN: u8 = 16;
/// Where ClusterIPs are allocated from.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The node every pod runs on unless its spec names another.
pub const NODE_NAME: &str = "local-node";
/// The zone label of every node.
pub const ZONE: &str = "local-zone";
/// Control's discovery port and admin port (on [`NODE_IP`], inside the node namespace).
pub const CONTROL_PORT: u16 = 15010;
/// The local OTLP receiver (`--otlp local`): gRPC and HTTP ports on the node address.
pub const OTLP_GRPC_PORT: u16 = 4317;
pub const OTLP_HTTP_PORT: u16 = 4318;
pub const CONTROL_ADMIN_PORT: u16 = 15014;
/// The sidecar's admin port (`/ready`, `/config`, `/metrics`) in every pod.
pub const PROXY_ADMIN_PORT: u16 = 15000;
/// The sidecar's UID and GID; the interception rules exempt its connections.
pub const PROXY_UID: u32 = 1337;
/// The name of the bridge inside the node namespace.
pub const BRIDGE: &str = "br0";
/// The bridge's MAC address, set when it is made (locally administered, ending in
/// [`NODE_IP`]). A bridge left to choose takes the lowest MAC of its ports and changes it as
/// pods come and go; pods that had resolved the gateway to an old one lose their packets until
/// their ARP entry is probed again (tens of seconds), see [`crate::netns`].
pub const BRIDGE_MAC: &str = "02:00:0a:f4:00:01";

/// Names we create start with this unless told otherwise.
pub const DEFAULT_PREFIX: &str = "wm-";
pub const DEFAULT_STATE_DIR: &str = "/run/wasmesh-local";

/// Something wrong with the configuration, found before anything is created.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{name} not found at {path}: wasmesh-local looks for it next to its own binary; build it in the same profile (e.g. `cargo build --release -p {package}`)"
    )]
    MissingBinary {
        name: &'static str,
        package: &'static str,
        path: PathBuf,
    },
    #[error(
        "the prefix {0:?} is not usable: use 1-20 lowercase letters, digits or '-', starting with a letter"
    )]
    BadPrefix(String),
    #[error("{0} is not a directory of manifests")]
    NotADirectory(PathBuf),
    #[error("`{tool}` is not installed; wasmesh-local needs it (Debian package `{package}`)")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
}

/// The programs a mesh runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `wasmesh-local` itself: every pod's agent is this binary run inside the pod.
    pub local: PathBuf,
    pub proxy: PathBuf,
    pub control: PathBuf,
    /// Put in front of every container's PATH, so `wasmesh-demo` is found.
    pub dir: PathBuf,
}

impl Binaries {
    /// `wasmesh-proxy` and `wasmesh-control` next to `local` (e.g. `target/release/`).
    pub fn next_to(local: impl Into<PathBuf>) -> Self {
        let local = local.into();
        let dir = local
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self {
            proxy: dir.join("wasmesh-proxy"),
            control: dir.join("wasmesh-control"),
            local,
            dir,
        }
    }

    pub fn check(&self, sidecar: bool) -> Result<(), ConfigError> {
        let mut wanted = vec![
            ("wasmesh-local", "wasmesh-local", &self.local),
            ("wasmesh-control", "wasmesh-control", &self.control),
        ];
        if sidecar {
            wanted.push(("wasmesh-proxy", "wasmesh-proxy", &self.proxy));
        }
        for (name, package, path) in wanted {
            if !path.is_file() {
                return Err(ConfigError::MissingBinary {
                    name,
                    package,
                    path: path.clone(),
                });
            }
        }
        Ok(())
    }
}

/// How the sidecar, which runs as UID 1337, gets to execute `wasmesh-proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarExec {
    /// By path when every directory above it is searchable by other users, else as
    /// [`SidecarExec::Stdin`] (a clone under `/root` is not).
    Auto,
    /// By path.
    Path,
    /// The agent opens the binary as root and hands it over as the sidecar's stdin; the
    /// sidecar executes `/proc/self/fd/0`. Works wherever the binary is.
    Stdin,
}

/// One mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The folder of Kubernetes YAML.
    pub manifests: PathBuf,
    /// Status, objects for control, pod specs and logs; removed by `down`.
    pub state_dir: PathBuf,
    /// Every network namespace, and every `/etc/netns` directory, starts with this.
    pub prefix: String,
    pub binaries: Binaries,
    /// Inject the sidecar into pods that do not opt out (`wasmesh.io/inject: "false"`).
    pub sidecar: bool,
    pub sidecar_exec: SidecarExec,
    /// Extra arguments for `wasmesh-proxy run` in every pod.
    pub proxy_args: Vec<String>,
    /// Grace period of a pod that does not set `terminationGracePeriodSeconds`.
    pub default_grace: Duration,
    /// Longest grace period honoured (the pod's own is capped to this).
    pub max_grace: Duration,
    /// How often the folder is read again.
    pub rescan: Duration,
    /// mTLS between sidecars: control is the CA (root generated in `<state>/ca`), every pod
    /// with a sidecar gets a token file that proves its ServiceAccount.
    pub mtls: bool,
    /// Extra arguments for `wasmesh-control serve` (e.g. `--cert-lifetime 1m`).
    pub control_args: Vec<String>,
    /// Where sidecars send spans: `local` (the mesh's own receiver, [`crate::otlp`]) or an
    /// OTLP endpoint URL; None = no tracing.
    pub otlp: Option<String>,
    /// `grpc` or `http/protobuf`.
    pub otlp_protocol: String,
}

impl MeshConfig {
    pub fn new(
        manifests: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
        binaries: Binaries,
    ) -> Self {
        Self {
            manifests: manifests.into(),
            state_dir: state_dir.into(),
            prefix: DEFAULT_PREFIX.to_string(),
            binaries,
            sidecar: true,
            sidecar_exec: SidecarExec::Auto,
            proxy_args: Vec::new(),
            default_grace: Duration::from_secs(2),
            max_grace: Duration::from_secs(10),
            rescan: Duration::from_millis(250),
            mtls: true,
            control_args: Vec::new(),
            otlp: None,
            otlp_protocol: "grpc".into(),
        }
    }

    /// Where control keeps the CA root (`ca.pem`, `ca-key.pem`).
    pub fn ca_dir(&self) -> PathBuf {
        self.state_dir.join("ca")
    }

    /// Token files: `<dir>/<namespace>/<serviceaccount>/<pod>.token`.
    pub fn tokens_dir(&self) -> PathBuf {
        self.state_dir.join("tokens")
    }

    /// A pod's token file.
    pub fn token_file(&self, namespace: &str, service_account: &str, pod: &str) -> PathBuf {
        self.tokens_dir()
            .join(namespace)
            .join(service_account)
            .join(format!("{pod}.token"))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_prefix(&self.prefix)?;
        if !self.manifests.is_dir() {
            return Err(ConfigError::NotADirectory(self.manifests.clone()));
        }
        self.binaries.check(self.sidecar)?;
        let mut tools = vec![("ip", "iproute2"), ("kill", "procps")];
        if self.sidecar {
            tools.push(("setpriv", "util-linux"));
            tools.push(("iptables-restore", "iptables"));
        }
        for (tool, package) in tools {
            if find_in_path(tool).is_none() {
                return Err(ConfigError::MissingTool { tool, package });
            }
        }
        Ok(())
    }

    /// The node namespace.
    pub fn node_netns(&self) -> String {
        format!("{}node", self.prefix)
    }

    /// A pod's namespace: `<prefix><namespace>_<pod>` (`_` never appears in either name).
    pub fn pod_netns(&self, namespace: &str, name: &str) -> String {
        format!("{}{namespace}_{name}", self.prefix)
    }

    /// Control's discovery address as the sidecars see it.
    pub fn control_url(&self) -> String {
        format!("http://{NODE_IP}:{CONTROL_PORT}")
    }

    pub fn otlp_local(&self) -> bool {
        self.otlp.as_deref() == Some("local")
    }

    /// Control's mesh-wide tracing flags (none without `--otlp`): control tells every
    /// sidecar where to send spans, as in a cluster.
    pub fn otlp_control_args(&self) -> Vec<String> {
        let Some(o) = &self.otlp else {
            return Vec::new();
        };
        let endpoint = if self.otlp_local() {
            match self.otlp_protocol.as_str() {
                "grpc" => format!("http://{NODE_IP}:{OTLP_GRPC_PORT}"),
                _ => format!("http://{NODE_IP}:{OTLP_HTTP_PORT}/v1/traces"),
            }
        } else {
            o.clone()
        };
        vec![
            "--otlp-endpoint".into(),
            endpoint,
            "--otlp-protocol".into(),
            self.otlp_protocol.clone(),
        ]
    }

    /// The `OTEL_*` variables every sidecar gets: spans batched for half a second (the
    /// default, 5 s, is long to wait for in a demo).
    pub fn otlp_env(&self) -> Vec<(String, String)> {
        match &self.otlp {
            Some(_) => vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "500".into())],
            None => Vec::new(),
        }
    }
}

pub fn check_prefix(prefix: &str) -> Result<(), ConfigError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 20
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadPrefix(prefix.to_string()))
    }
}

/// `PATH` lookup, as a shell would do it.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// `dir` in front of the current PATH (plus the sbin directories, where `ip` lives).
pub fn path_with(dir: &Path) -> String {
    let mut parts = vec![dir.to_path_buf()];
    if let Some(p) = std::env::var_os("PATH") {
        parts.extend(std::env::split_paths(&p));
    }
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        let d = PathBuf::from(d);
        if !parts.contains(&d) {
            parts.push(d);
        }
    }
    std::env::join_paths(parts)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(check_prefix("wm-").is_ok());
        assert!(check_prefix("wmt123x4-").is_ok());
        assert!(check_prefix("").is_err());
        assert!(check_prefix("WM").is_err());
        assert!(check_prefix("1wm").is_err());
        assert!(check_prefix("wm_").is_err());
        assert!(check_prefix("a-very-long-prefix-indeed").is_err());
    }

    #[test]
    fn names() {
        let cfg = MeshConfig::new("/m", "/s", Binaries::next_to("/t/wasmesh-local"));
        assert_eq!(cfg.node_netns(), "wm-node");
        assert_eq!(cfg.pod_netns("demo", "backend-1"), "wm-demo_backend-1");
        assert_eq!(cfg.binaries.proxy, PathBuf::from("/t/wasmesh-proxy"));
        assert_eq!(cfg.control_url(), "http://10.244.0.1:15010");
    }
}
