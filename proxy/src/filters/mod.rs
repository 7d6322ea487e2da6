//! Wasm filters in the sidecar: the WasmPlugins control streams that apply to this pod
//! ([`select`]), loaded into the Proxy-Wasm host (`wasmesh-wasm`) and handed to the HTTP path
//! as a [`FilterChain`] per request.
//!
//! A plugin is (re)loaded when its spec or module changes; module bytes are fetched once per
//! sha256 (from control's `GetModule`) and compiled off the async workers. A plugin that does
//! not load — a module that fails validation, traps while starting, a configuration the filter
//! rejects — is logged and counted, and the version that ran before (if any) goes on running.
//! A new set of plugins is swapped in at once: requests already started keep the chain they
//! started with, so a reload drops or fails none.

pub mod callouts;
pub mod select;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures::future::BoxFuture;
use wasmesh_api::discovery as pb;
use wasmesh_wasm::{FailStrategy, FilterChain, Phase, Plugin, PluginConfig, WasmHost};

use select::{Direction, Me, applies, runs_on};

/// A plugin that runs here, with the spec it was loaded from.
#[derive(Clone)]
struct Loaded {
    spec: pb::WasmPlugin,
    plugin: Plugin,
}

/// Where module bytes come from (control's `GetModule`, or a test's map).
pub type Fetch = Arc<dyn Fn(String) -> BoxFuture<'static, Result<Bytes, String>> + Send + Sync>;

/// The plugins in force in this sidecar.
pub struct Filters {
    /// The Proxy-Wasm host, started with the first plugin that applies to this pod: a pod
    /// without filters pays nothing for it (no engine, no instance pool, no epoch thread).
    host: std::sync::OnceLock<WasmHost>,
    host_config: wasmesh_wasm::HostConfig,
    me: Me,
    current: ArcSwap<Vec<Loaded>>,
    /// Module bytes by sha256, kept while a plugin uses them.
    modules: Mutex<HashMap<String, Bytes>>,
    /// Serializes [`Filters::apply`] calls.
    applying: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Filters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filters")
            .field("me", &self.me)
            .field("plugins", &self.names())
            .finish()
    }
}

impl Filters {
    pub fn new(host_config: wasmesh_wasm::HostConfig, me: Me) -> Self {
        Self {
            host: std::sync::OnceLock::new(),
            host_config,
            me,
            current: ArcSwap::from_pointee(Vec::new()),
            modules: Mutex::new(HashMap::new()),
            applying: tokio::sync::Mutex::new(()),
        }
    }

    /// The host, once a plugin started it.
    pub fn host(&self) -> Option<&WasmHost> {
        self.host.get()
    }

    /// The host, started now if it is not running yet (loads are serialized by `apply`).
    async fn started_host(&self) -> Result<WasmHost, String> {
        if let Some(h) = self.host.get() {
            return Ok(h.clone());
        }
        let config = self.host_config.clone();
        let h = tokio::task::spawn_blocking(move || WasmHost::new(config))
            .await
            .map_err(|e| format!("the Wasm host did not start: {e}"))?
            .map_err(|e| format!("the Wasm host did not start: {e}"))?;
        tracing::info!("Wasm host started (the first WasmPlugin for this pod)");
        Ok(self.host.get_or_init(|| h).clone())
    }

    /// `namespace/name` of the plugins running here, in no particular order.
    pub fn names(&self) -> Vec<String> {
        self.current
            .load()
            .iter()
            .map(|l| format!("{}/{}", l.spec.namespace, l.spec.name))
            .collect()
    }

    /// The chain for one request, or None when no plugin runs on it (the common case costs one
    /// atomic load).
    pub fn chain(
        &self,
        direction: Direction,
        port: u16,
        service: Option<(&str, &str)>,
    ) -> Option<FilterChain> {
        let current = self.current.load();
        if current.is_empty() {
            return None;
        }
        let plugins: Vec<Plugin> = current
            .iter()
            .filter(|l| runs_on(&l.spec, direction, port, service))
            .map(|l| l.plugin.clone())
            .collect();
        (!plugins.is_empty()).then(|| FilterChain::new(plugins))
    }

    /// Makes the plugins control sent the ones in force: those that apply to this pod are
    /// loaded if new or changed, kept if not; the others are dropped.
    pub async fn apply(&self, specs: Vec<pb::WasmPlugin>, fetch: &Fetch) {
        let _one_at_a_time = self.applying.lock().await;
        let before = self.current.load_full();
        let mut next: Vec<Loaded> = Vec::new();
        for spec in specs.into_iter().filter(|s| applies(s, &self.me)) {
            let id = format!("{}/{}", spec.namespace, spec.name);
            let old = before
                .iter()
                .find(|l| l.spec.namespace == spec.namespace && l.spec.name == spec.name);
            if let Some(old) = old
                && same_load(&old.spec, &spec)
            {
                // Only where it runs changed (match, targets): no reload needed.
                next.push(Loaded {
                    spec,
                    plugin: old.plugin.clone(),
                });
                continue;
            }
            match self.load(&spec, fetch).await {
                Ok(plugin) => {
                    tracing::info!(plugin = %id, sha256 = %spec.sha256, "wasm plugin loaded");
                    next.push(Loaded { spec, plugin });
                }
                Err(e) => {
                    tracing::error!(plugin = %id, sha256 = %spec.sha256, error = %e, kept_previous = old.is_some(), "wasm plugin not loaded");
                    if let Some(old) = old {
                        next.push(old.clone());
                    }
                }
            }
        }
        // Modules no plugin uses any more are forgotten.
        {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            modules.retain(|sha, _| next.iter().any(|l| &l.spec.sha256 == sha));
        }
        self.current.store(Arc::new(next));
    }

    async fn load(&self, spec: &pb::WasmPlugin, fetch: &Fetch) -> Result<Plugin, String> {
        let cached = {
            let modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            modules.get(&spec.sha256).cloned()
        };
        let wasm = match cached {
            Some(w) => w,
            None => {
                let w = fetch(spec.sha256.clone())
                    .await
                    .map_err(|e| format!("fetching module {}: {e}", spec.sha256))?;
                self.modules
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(spec.sha256.clone(), w.clone());
                w
            }
        };
        let config = plugin_config(spec, wasm);
        let host = self.started_host().await?;
        // Compiling is CPU work of up to a second: off the async workers.
        tokio::task::spawn_blocking(move || host.load(config))
            .await
            .map_err(|e| format!("loader task failed: {e}"))?
            .map_err(|e| e.to_string())
    }
}

/// Follows the WasmPlugins control streams (`plugins`) and keeps `filters` in step, fetching
/// modules from control's `GetModule`. Runs forever.
pub async fn follow(
    filters: Arc<Filters>,
    mut plugins: tokio::sync::watch::Receiver<Vec<pb::WasmPlugin>>,
    control: String,
) {
    let fetch: Fetch = Arc::new(move |sha: String| {
        let control = control.clone();
        Box::pin(async move { get_module(&control, &sha).await })
    });
    loop {
        let specs = plugins.borrow_and_update().clone();
        filters.apply(specs, &fetch).await;
        if plugins.changed().await.is_err() {
            return;
        }
    }
}

/// One module from control, checked against its sha256.
async fn get_module(control: &str, sha256: &str) -> Result<Bytes, String> {
    use wasmesh_api::discovery::discovery_client::DiscoveryClient;
    let endpoint = tonic::transport::Endpoint::from_shared(control.to_string())
        .map_err(|e| format!("bad control address {control:?}: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(60));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot reach control at {control}: {e}"))?;
    let mut client = DiscoveryClient::new(channel)
        .max_decoding_message_size(wasmesh_api::MAX_MODULE_SIZE + 1024);
    let module = client
        .get_module(pb::GetModuleRequest {
            sha256: sha256.to_string(),
        })
        .await
        .map_err(|e| format!("GetModule: {}", e.message()))?
        .into_inner();
    let got = wasmesh_wasm::sha256_hex(&module.wasm);
    if got != sha256 {
        return Err(format!(
            "control sent a module with sha256 {got}, not {sha256}"
        ));
    }
    Ok(Bytes::from(module.wasm))
}

/// Whether two specs load the same thing (module, configuration, order, fail strategy).
fn same_load(a: &pb::WasmPlugin, b: &pb::WasmPlugin) -> bool {
    a.sha256 == b.sha256
        && a.root_id == b.root_id
        && a.plugin_config == b.plugin_config
        && a.vm_env == b.vm_env
        && a.phase == b.phase
        && a.priority == b.priority
        && a.fail_strategy == b.fail_strategy
}

fn plugin_config(spec: &pb::WasmPlugin, wasm: Bytes) -> PluginConfig {
    let name = format!("{}/{}", spec.namespace, spec.name);
    let mut c = PluginConfig::new(name, wasm);
    if let wasmesh_wasm::ModuleSource::Bytes { sha256, .. } = &mut c.module {
        *sha256 = Some(spec.sha256.clone()).filter(|s| !s.is_empty());
    }
    if !spec.root_id.is_empty() {
        c.root_id = spec.root_id.clone();
    }
    c.plugin_config = Bytes::from(spec.plugin_config.clone());
    c.env = spec
        .vm_env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    c.fail_strategy = match spec.fail_strategy() {
        pb::wasm_plugin::FailStrategy::FailOpen => FailStrategy::FailOpen,
        pb::wasm_plugin::FailStrategy::FailClose => FailStrategy::FailClose,
    };
    c.phase = match spec.phase() {
        pb::wasm_plugin::Phase::Authn => Phase::Authn,
        pb::wasm_plugin::Phase::Authz => Phase::Authz,
        pb::wasm_plugin::Phase::Stats => Phase::Stats,
        pb::wasm_plugin::Phase::UnspecifiedPhase => Phase::Unspecified,
    };
    c.priority = spec.priority;
    c
}
