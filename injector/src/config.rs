//! What the injector injects and where it never does: one plain [`Config`], built from flags in
//! `main.rs` and as a literal (or [`Config::default`]) in tests.
//!
//! Per-pod overrides come from annotations (see [`crate::annotations`]); everything here is the
//! cluster-wide default they override.

use std::fmt;
use std::str::FromStr;

/// The injector's version, recorded on every injected pod (`wasmesh.io/injected`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The image holding `wasmesh-proxy` (the same image holds every wasmesh binary).
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/wasmesh/wasmesh:", env!("CARGO_PKG_VERSION"));

/// Where the sidecar finds control's discovery stream.
pub const DEFAULT_CONTROL_ADDRESS: &str = "http://wasmesh-control.wasmesh-system.svc:15010";

/// The control plane's namespace: never injected (the injector must be able to restart itself
/// without waiting on itself, see `docs/injection.md`).
pub const DEFAULT_CONTROL_NAMESPACE: &str = "wasmesh-system";

/// Kubernetes' own namespaces: never injected, whatever their labels say.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// UID (and GID) the proxy runs as; the interception rules exempt its traffic.
pub const DEFAULT_PROXY_UID: u32 = 1337;

/// Worker threads of a sidecar without a CPU limit: Istio runs its sidecars with 2
/// (`concurrency`); a worker per CPU of a large node would be dozens of threads (and their
/// memory) per pod for one pod's traffic.
pub const DEFAULT_WORKERS: u16 = 2;

/// Audience of the projected ServiceAccount token the proxy presents to control.
pub const DEFAULT_TOKEN_AUDIENCE: &str = "wasmesh-control";

/// Lifetime requested for that token; the kubelet refreshes it at 80 % of this.
pub const DEFAULT_TOKEN_EXPIRATION_SECONDS: i64 = 3600;

/// How the sidecar runs next to the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SidecarMode {
    /// Kubernetes native sidecar (≥ 1.29): the proxy is an init container with
    /// `restartPolicy: Always`, started (and ready, via its startupProbe) before the app and
    /// stopped after it; Jobs complete on their own.
    Native,
    /// A regular container, first in `containers`, with a postStart hook that holds the app
    /// until the proxy is ready. For clusters without native sidecars.
    Classic,
}

impl SidecarMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Classic => "classic",
        }
    }
}

impl fmt::Display for SidecarMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown sidecar mode; says which ones exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a sidecar mode: use \"native\" or \"classic\"")]
pub struct UnknownMode(pub String);

impl FromStr for SidecarMode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, UnknownMode> {
        match s.trim() {
            "native" => Ok(Self::Native),
            "classic" => Ok(Self::Classic),
            other => Err(UnknownMode(other.to_owned())),
        }
    }
}

/// The proxy's resource requests and limits, as Kubernetes quantities (`100m`, `64Mi`).
/// `None` leaves the field out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

/// Everything the mutation needs besides the pod itself.
#[derive(Clone, Debug)]
pub struct Config {
    /// Image of the init container and the sidecar.
    pub image: String,
    /// `imagePullPolicy` for both; `None` leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// Passed to `wasmesh-proxy run --control`.
    pub control_address: String,
    /// The control plane's namespace: never injected.
    pub control_namespace: String,
    /// Further namespaces never injected (Kubernetes' own by default).
    pub skip_namespaces: Vec<String>,
    /// Mode for pods without a `wasmesh.io/sidecar-mode` annotation.
    pub default_mode: SidecarMode,
    /// UID/GID of the proxy unless `wasmesh.io/proxy-uid` says otherwise.
    pub proxy_uid: u32,
    /// Proxy resources unless the `wasmesh.io/proxy-*` annotations say otherwise.
    pub resources: Resources,
    /// Worker threads of a proxy without a CPU limit, unless `wasmesh.io/proxy-workers` says
    /// otherwise (`WASMESH_WORKERS`). None: the proxy's own default, a worker per CPU of the
    /// node. A proxy with a CPU limit sizes itself by it.
    pub workers: Option<u16>,
    /// Audience of the projected token (control checks it).
    pub token_audience: String,
    /// `expirationSeconds` of the projected token.
    pub token_expiration_seconds: i64,
    /// Classic mode: how long the proxy's postStart hook waits for it to be ready before it
    /// gives up (a failed hook makes the kubelet kill and restart the proxy container, per
    /// the pod's restartPolicy).
    pub hold_timeout_seconds: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_owned(),
            image_pull_policy: None,
            control_address: DEFAULT_CONTROL_ADDRESS.to_owned(),
            control_namespace: DEFAULT_CONTROL_NAMESPACE.to_owned(),
            skip_namespaces: SYSTEM_NAMESPACES.iter().map(|s| (*s).to_owned()).collect(),
            default_mode: SidecarMode::Native,
            proxy_uid: DEFAULT_PROXY_UID,
            resources: Resources {
                cpu_request: Some("100m".to_owned()),
                memory_request: Some("64Mi".to_owned()),
                cpu_limit: None,
                memory_limit: None,
            },
            workers: Some(DEFAULT_WORKERS),
            token_audience: DEFAULT_TOKEN_AUDIENCE.to_owned(),
            token_expiration_seconds: DEFAULT_TOKEN_EXPIRATION_SECONDS,
            hold_timeout_seconds: 120,
        }
    }
}

impl Config {
    /// Whether pods of `namespace` are never injected (control plane or system namespace).
    pub fn skips_namespace(&self, namespace: &str) -> bool {
        namespace == self.control_namespace || self.skip_namespaces.iter().any(|n| n == namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        assert_eq!("native".parse(), Ok(SidecarMode::Native));
        assert_eq!(" classic ".parse(), Ok(SidecarMode::Classic));
        let err = "sidecar".parse::<SidecarMode>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"sidecar\" is not a sidecar mode: use \"native\" or \"classic\""
        );
        assert_eq!(SidecarMode::Classic.to_string(), "classic");
    }

    #[test]
    fn control_and_system_namespaces_are_skipped() {
        let config = Config::default();
        assert!(config.skips_namespace("wasmesh-system"));
        assert!(config.skips_namespace("kube-system"));
        assert!(!config.skips_namespace("default"));
    }
}
