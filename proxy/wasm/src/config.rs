//! Configuration, in one place: [`HostConfig`] for the host (one per proxy), [`PluginConfig`]
//! for one plugin (what Istio's `WasmPlugin` carries), and the knobs they share. Plain structs:
//! tests build them as literals; parsing CRDs or flags into them is the proxy's job.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::callouts::HttpCallouts;

/// What happens to a request when a filter traps, overruns its deadline or runs out of memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailStrategy {
    /// The request fails with a 503 (Istio `FAIL_CLOSE`, the default).
    #[default]
    FailClose,
    /// The filter is skipped for that request (Istio `FAIL_OPEN`).
    FailOpen,
}

/// Where a plugin runs relative to the proxy's own filters (Istio `phase`). Plugins run in
/// this order, then by descending priority, then by name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Before authentication.
    Authn,
    /// Before authorization.
    Authz,
    /// Before stats.
    Stats,
    /// Last, just before routing (Istio `UNSPECIFIED_PHASE`).
    #[default]
    Unspecified,
}

/// Where the module's bytes come from.
#[derive(Clone, Debug)]
pub enum ModuleSource {
    /// The module itself (checked against `sha256` when one is given).
    Bytes {
        /// The `.wasm` file's content.
        wasm: Bytes,
        /// Expected lowercase hex sha256, as shipped by control.
        sha256: Option<String>,
    },
    /// A module this host compiled before (in this process or in its on-disk cache).
    Sha256(String),
}

/// One plugin: a module plus its configuration (the content of a `WasmPlugin`).
#[derive(Clone, Debug)]
pub struct PluginConfig {
    /// Plugin name (Envoy `name`; the `plugin_name` property, logs and metrics labels).
    pub name: String,
    /// Root id (Istio `pluginName`, Envoy `root_id`; the `plugin_root_id` property).
    pub root_id: String,
    /// VM id: scopes shared data and queues (Envoy `vm_id`). Empty is a valid id.
    pub vm_id: String,
    /// The module.
    pub module: ModuleSource,
    /// Bytes handed to `on_configure` (Istio `pluginConfig`, JSON).
    pub plugin_config: Bytes,
    /// Bytes handed to `on_vm_start`.
    pub vm_config: Bytes,
    /// Environment seen through WASI `environ_get` (Istio `vmConfig.env`).
    pub env: Vec<(String, String)>,
    /// Trap handling.
    pub fail_strategy: FailStrategy,
    /// Position in the chain.
    pub phase: Phase,
    /// Order within a phase, higher first.
    pub priority: i32,
}

impl PluginConfig {
    /// A plugin with defaults: `root_id` and `vm_id` = `name`, empty configs, FAIL_CLOSE.
    pub fn new(name: impl Into<String>, wasm: impl Into<Bytes>) -> Self {
        let name = name.into();
        PluginConfig {
            root_id: name.clone(),
            vm_id: name.clone(),
            name,
            module: ModuleSource::Bytes {
                wasm: wasm.into(),
                sha256: None,
            },
            plugin_config: Bytes::new(),
            vm_config: Bytes::new(),
            env: Vec::new(),
            fail_strategy: FailStrategy::default(),
            phase: Phase::default(),
            priority: 0,
        }
    }

    /// Sets the configuration given to `on_configure`.
    pub fn with_config(mut self, config: impl Into<Bytes>) -> Self {
        self.plugin_config = config.into();
        self
    }

    /// Sets the fail strategy.
    pub fn with_fail_strategy(mut self, fail: FailStrategy) -> Self {
        self.fail_strategy = fail;
        self
    }
}

/// Facts about this proxy that filters can read (`node.*`, `xds.node.id`).
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    /// Proxy id, e.g. `sidecar~10.244.0.5~client-abc.demo~demo.svc.cluster.local`.
    pub id: String,
    /// Pod name.
    pub pod: String,
    /// Pod namespace.
    pub namespace: String,
    /// Cluster / mesh id.
    pub cluster: String,
}

/// The host's configuration (one host per proxy).
#[derive(Clone)]
pub struct HostConfig {
    /// Where precompiled modules are cached (`<sha256>-<engine>.cwasm`); `None` = memory only.
    pub cache_dir: Option<PathBuf>,
    /// CPU time a single callback may use before it is interrupted (default 10 ms; checked
    /// once this much wall-clock time passed, so a callback gets 1–2× this).
    pub callback_deadline: Duration,
    /// Longest the start-up callbacks (`_initialize`, `on_vm_start`, `on_configure`) may run
    /// (default 1 s: parsing a configuration may take longer than a request callback).
    pub start_deadline: Duration,
    /// Granularity of the deadline (the epoch ticker's period, default 1 ms).
    pub epoch_tick: Duration,
    /// Linear memory cap per instance (default 64 MiB).
    pub memory_limit: usize,
    /// Instances kept per plugin (default: one per CPU, like Envoy's VM per worker).
    pub instances_per_plugin: usize,
    /// Most instances alive at once in this host (sizes the pooling allocator).
    pub max_instances: u32,
    /// Largest body a filter may buffer per stream and direction (default 1 MiB): beyond it the
    /// request gets 413 (the response 500), as in Envoy.
    pub max_buffered_body: usize,
    /// After a fault, how long an instance slot waits before it is recreated (default 100 ms).
    pub reload_backoff: Duration,
    /// Where `proxy_http_call` goes; `None` = callouts fail with `BAD_ARGUMENT`.
    pub callouts: Option<Arc<dyn HttpCallouts>>,
    /// This proxy, for `node.*` properties.
    pub node: NodeInfo,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cache_dir: None,
            callback_deadline: Duration::from_millis(10),
            start_deadline: Duration::from_secs(1),
            epoch_tick: Duration::from_millis(1),
            memory_limit: 64 << 20,
            instances_per_plugin: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_instances: 256,
            max_buffered_body: 1 << 20,
            reload_backoff: Duration::from_millis(100),
            callouts: None,
            node: NodeInfo::default(),
        }
    }
}

impl std::fmt::Debug for HostConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostConfig")
            .field("cache_dir", &self.cache_dir)
            .field("callback_deadline", &self.callback_deadline)
            .field("memory_limit", &self.memory_limit)
            .field("instances_per_plugin", &self.instances_per_plugin)
            .field("callouts", &self.callouts.is_some())
            .finish_non_exhaustive()
    }
}
