//! The host: one per proxy. It owns the wasmtime [`Engine`] (epoch interruption on, pooling
//! allocator sized by [`HostConfig`]), the [`Linker`] with every host function, the epoch
//! ticker thread that enforces callback deadlines, the compiled-module cache, and what all
//! plugins share (metrics, shared data and queues, the callout provider).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Linker, OptLevel, PoolingAllocationConfig,
};

use crate::abi;
use crate::config::{HostConfig, PluginConfig};
use crate::context::HostState;
use crate::metrics::Metrics;
use crate::module::CompiledModule;
use crate::plugin::{LoadError, Plugin};
use crate::shared::Shared;

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// wasmtime refused the configuration.
    #[error("wasm engine: {0}")]
    Engine(String),
    /// The deadline ticker thread could not be started.
    #[error("wasm epoch ticker thread: {0}")]
    Ticker(#[from] std::io::Error),
}

pub(crate) struct HostInner {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<HostState>,
    pub(crate) config: HostConfig,
    pub(crate) metrics: Metrics,
    pub(crate) shared: Shared,
    pub(crate) modules: Mutex<HashMap<String, Arc<CompiledModule>>>,
    /// Identifies the engine's code format in cache file names.
    pub(crate) engine_key: String,
    /// Epoch ticks a callback may run.
    pub(crate) deadline_ticks: u64,
    /// Epoch ticks start-up callbacks (`_initialize`, `on_vm_start`, `on_configure`) may run.
    pub(crate) start_ticks: u64,
    stop: Arc<AtomicBool>,
}

impl Drop for HostInner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The Proxy-Wasm host. Cheap to clone; share one per proxy.
#[derive(Clone)]
pub struct WasmHost {
    pub(crate) inner: Arc<HostInner>,
}

impl WasmHost {
    /// Starts a host: builds the engine and linker and starts the epoch ticker thread.
    pub fn new(config: HostConfig) -> Result<WasmHost, HostError> {
        let mut wc = Config::new();
        wc.epoch_interruption(true);
        wc.cranelift_opt_level(OptLevel::Speed);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_memories(config.max_instances);
        pool.total_tables(config.max_instances);
        pool.total_core_instances(config.max_instances);
        // The store's limiter enforces the cap (and records that it did); the pool's own
        // maximum sits just above it so the limiter is the one that refuses.
        pool.max_memory_size(config.memory_limit.saturating_add(1 << 16));
        wc.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wc).map_err(|e| HostError::Engine(format!("{e:#}")))?;

        let mut linker = Linker::new(&engine);
        abi::hostcalls::add_to_linker(&mut linker)
            .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        abi::wasi::add_to_linker(&mut linker).map_err(|e| HostError::Engine(format!("{e:#}")))?;

        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_key = format!("{:016x}", h.finish());

        let tick = config.epoch_tick.max(std::time::Duration::from_micros(100));
        let deadline_ticks = (config.callback_deadline.as_nanos() / tick.as_nanos()) as u64 + 1;
        let start_deadline = config.callback_deadline.max(config.start_deadline);
        let start_ticks = (start_deadline.as_nanos() / tick.as_nanos()) as u64 + 1;
        let stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })?;
        }
        Ok(WasmHost {
            inner: Arc::new(HostInner {
                engine,
                linker,
                config,
                metrics: Metrics::default(),
                shared: Shared::default(),
                modules: Mutex::new(HashMap::new()),
                engine_key,
                deadline_ticks,
                start_ticks,
                stop,
            }),
        })
    }

    /// Loads a plugin: validates and compiles the module (or takes it from the cache),
    /// instantiates it, runs `_initialize`, `on_vm_start` and `on_configure`. A module that
    /// isn't a valid Proxy-Wasm filter, traps while starting or rejects its configuration is an
    /// error (counted as `load_failed`); nothing else is affected.
    pub fn load(&self, config: PluginConfig) -> Result<Plugin, LoadError> {
        let name = config.name.clone();
        let r = Plugin::load(self.inner.clone(), config);
        match &r {
            Ok(_) => self
                .inner
                .metrics
                .event(&name, crate::metrics::HostEvent::Loaded),
            Err(e) => {
                tracing::error!(plugin = %name, "wasm plugin not loaded: {e}");
                self.inner
                    .metrics
                    .event(&name, crate::metrics::HostEvent::LoadFailed);
            }
        }
        r
    }

    /// Compiles a module ahead of use (and caches it), returning its sha256. For control-shipped
    /// modules: compile once when the bytes arrive, load plugins by sha256 afterwards.
    pub fn precompile(&self, wasm: &[u8]) -> Result<String, LoadError> {
        let m = crate::module::compile(&self.inner, "(precompile)", wasm, None)?;
        Ok(m.sha256.clone())
    }

    /// The host's metrics (filter-defined and host events), for `/metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Appends the metrics in the Prometheus text format.
    pub fn render_prometheus(&self, out: &mut String) {
        self.inner.metrics.render_prometheus(out);
    }
}
