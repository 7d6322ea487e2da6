//! A loaded plugin: its module, its configuration and a small pool of instances (one per
//! worker by default, like Envoy's VM per worker). Streams are spread over the instances; each
//! callback locks its instance for the duration of one guest call.
//!
//! When a callback faults the instance is discarded (counted as `instance_replaced`), every
//! stream that had a context in it is told so through its mailbox (with what it had buffered
//! there), and the next use creates a fresh instance — after `reload_backoff`, so a module that
//! faults on every request can't keep a core busy re-instantiating. Timers (`on_tick`), queue
//! wake-ups and callout responses are delivered by tokio tasks that hold only a weak reference:
//! dropping the last [`Plugin`] handle stops them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::{FailStrategy, ModuleSource, Phase, PluginConfig};
use crate::context::StreamEvent;
use crate::host::HostInner;
use crate::instance::{Fault, Instance};
use crate::metrics::HostEvent;
use crate::module::{self, CompiledModule};
use crate::properties::StreamInfo;
use crate::shared::QueueWaker;
use crate::stream::HttpStream;

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes don't match the sha256 control announced.
    #[error("plugin {plugin}: module sha256 is {actual}, expected {expected}")]
    Sha256Mismatch {
        /// Plugin name.
        plugin: String,
        /// Announced.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// Loading by sha256 a module this host never compiled.
    #[error("plugin {plugin}: module {sha256} is not in this host's cache: ship its bytes")]
    NotCached {
        /// Plugin name.
        plugin: String,
        /// The sha256 asked for.
        sha256: String,
    },
    /// Not WebAssembly, or invalid.
    #[error("plugin {plugin}: not a valid WebAssembly module: {reason}")]
    Invalid {
        /// Plugin name.
        plugin: String,
        /// wasmtime's diagnosis.
        reason: String,
    },
    /// No `proxy_abi_version_*` export.
    #[error(
        "plugin {plugin}: missing Proxy-Wasm ABI version export (proxy_abi_version_0_2_1 or _0_2_0): is this a proxy-wasm filter?"
    )]
    NoAbiVersion {
        /// Plugin name.
        plugin: String,
    },
    /// An ABI we don't host.
    #[error("plugin {plugin}: {marker}: only Proxy-Wasm ABI 0.2.1 and 0.2.0 are supported")]
    UnsupportedAbi {
        /// Plugin name.
        plugin: String,
        /// The marker found.
        marker: String,
    },
    /// A required export is missing.
    #[error("plugin {plugin}: the module does not export {export}")]
    MissingExport {
        /// Plugin name.
        plugin: String,
        /// What is missing.
        export: &'static str,
    },
    /// An export has the wrong signature.
    #[error("plugin {plugin}: export {export} has the wrong signature: {reason}")]
    Signature {
        /// Plugin name.
        plugin: String,
        /// The export.
        export: &'static str,
        /// wasmtime's diagnosis.
        reason: String,
    },
    /// The module imports something this host does not provide.
    #[error("plugin {plugin}: the module needs an import this host does not provide: {reason}")]
    Link {
        /// Plugin name.
        plugin: String,
        /// wasmtime's diagnosis (names the import).
        reason: String,
    },
    /// Instantiation failed (e.g. initial memory above the cap).
    #[error("plugin {plugin}: could not instantiate the module: {reason}")]
    Instantiate {
        /// Plugin name.
        plugin: String,
        /// wasmtime's diagnosis.
        reason: String,
    },
    /// A start-up callback faulted.
    #[error("plugin {plugin}: {callback} {fault}")]
    Start {
        /// Plugin name.
        plugin: String,
        /// `_initialize`, `proxy_on_vm_start`, …
        callback: &'static str,
        /// How it failed.
        fault: Fault,
    },
    /// `on_vm_start` returned false.
    #[error(
        "plugin {plugin}: on_vm_start returned false: the filter rejected its VM configuration"
    )]
    VmStartRejected {
        /// Plugin name.
        plugin: String,
    },
    /// `on_configure` returned false.
    #[error(
        "plugin {plugin}: on_configure returned false: the filter rejected its configuration (see its log lines)"
    )]
    ConfigRejected {
        /// Plugin name.
        plugin: String,
    },
}

/// The parts of a [`PluginConfig`] instances need at run time.
pub(crate) struct PluginMeta {
    pub(crate) name: String,
    pub(crate) root_id: String,
    pub(crate) vm_id: String,
    pub(crate) plugin_config: Bytes,
    pub(crate) vm_config: Bytes,
    /// `KEY=value\0` entries for WASI `environ_get`.
    pub(crate) environ: Vec<Vec<u8>>,
    pub(crate) fail_strategy: FailStrategy,
    pub(crate) phase: Phase,
    pub(crate) priority: i32,
    /// Guest callbacks run, counted under the plugin's name (shared across reloads).
    pub(crate) calls: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Default)]
pub(crate) struct SlotState {
    instance: Option<Instance>,
    generation: u64,
    retry_after: Option<Instant>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

pub(crate) struct PluginInner {
    pub(crate) meta: Arc<PluginMeta>,
    module: Arc<CompiledModule>,
    pub(crate) host: Arc<HostInner>,
    slots: Vec<Mutex<SlotState>>,
    weak: Weak<PluginInner>,
}

impl Drop for PluginInner {
    fn drop(&mut self) {
        for s in &self.slots {
            if let Some(t) = s.lock().unwrap_or_else(|e| e.into_inner()).ticker.take() {
                t.abort();
            }
        }
    }
}

/// What happened to a guest call made through [`PluginInner::run`].
pub(crate) enum Run<R> {
    Done(R, u64),
    Fault,
    /// The instance the caller's context lived in is gone.
    Orphaned,
    /// No instance could be made (backoff after a fault, or it failed to start again).
    Unavailable,
}

/// A loaded plugin. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Plugin {
    pub(crate) inner: Arc<PluginInner>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.meta.name)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    pub(crate) fn load(host: Arc<HostInner>, config: PluginConfig) -> Result<Plugin, LoadError> {
        let module = match &config.module {
            ModuleSource::Bytes { wasm, sha256 } => {
                module::compile(&host, &config.name, wasm, sha256.as_deref())?
            }
            ModuleSource::Sha256(sha) => module::cached(&host, &config.name, sha)?,
        };
        let meta = Arc::new(PluginMeta {
            calls: host.metrics.calls_counter(&config.name),
            environ: config
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}\0").into_bytes())
                .collect(),
            name: config.name,
            root_id: config.root_id,
            vm_id: config.vm_id,
            plugin_config: config.plugin_config,
            vm_config: config.vm_config,
            fail_strategy: config.fail_strategy,
            phase: config.phase,
            priority: config.priority,
        });
        let n = host.config.instances_per_plugin.max(1);
        let inner = Arc::new_cyclic(|weak| PluginInner {
            meta,
            module,
            host,
            slots: (0..n).map(|_| Mutex::new(SlotState::default())).collect(),
            weak: weak.clone(),
        });
        // The first instance starts now, so a bad module or config is an error here.
        let mut slot = inner.lock(0);
        let inst = Instance::new(
            &inner.host,
            &inner.module,
            &inner.meta,
            inner.queue_waker(0),
        )?;
        inner.install(0, &mut slot, inst);
        drop(slot);
        Ok(Plugin { inner })
    }

    /// Plugin name.
    pub fn name(&self) -> &str {
        &self.inner.meta.name
    }

    /// Fail strategy.
    pub fn fail_strategy(&self) -> FailStrategy {
        self.inner.meta.fail_strategy
    }

    /// Phase and priority (for ordering in a chain).
    pub fn order(&self) -> (Phase, i32) {
        (self.inner.meta.phase, self.inner.meta.priority)
    }

    /// The module's sha256.
    pub fn sha256(&self) -> &str {
        &self.inner.module.sha256
    }

    /// The ABI version the module declares.
    pub fn abi_version(&self) -> crate::abi::AbiVersion {
        self.inner.module.abi
    }

    /// Starts a stream through this plugin. No guest code runs until the first step.
    /// The instance is the one of the calling thread (each thread — a tokio worker — is
    /// given an instance index when it first starts a stream), so a worker keeps using the
    /// instance whose memory is warm in its cache, as Envoy's VM per worker.
    pub fn new_http_stream(&self, info: Arc<StreamInfo>) -> HttpStream {
        thread_local! {
            static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
        }
        static NEXT_WORKER: AtomicUsize = AtomicUsize::new(0);
        let worker = WORKER.with(|w| match w.get() {
            Some(n) => n,
            None => {
                let n = NEXT_WORKER.fetch_add(1, Ordering::Relaxed);
                w.set(Some(n));
                n
            }
        });
        let slot = worker % self.inner.slots.len();
        HttpStream::new(self.inner.clone(), slot, info)
    }
}

impl PluginInner {
    fn lock(&self, slot: usize) -> MutexGuard<'_, SlotState> {
        self.slots[slot].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queue_waker(&self, slot: usize) -> Option<QueueWaker> {
        let weak = self.weak.clone();
        Some(Arc::new(move |queue: u32| {
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let weak = weak.clone();
            rt.spawn(async move {
                if let Some(p) = weak.upgrade() {
                    let _ = p.run(slot, None, |i, _| i.on_queue_ready(queue));
                }
            });
        }))
    }

    fn install(&self, slot: usize, g: &mut SlotState, mut inst: Instance) {
        g.generation += 1;
        g.retry_after = None;
        inst.publish_calls();
        let tick = inst.take_tick_change();
        let outgoing = inst.take_outgoing();
        g.instance = Some(inst);
        self.after_call(slot, g, tick, outgoing);
    }

    /// Runs `f` on slot `slot`'s instance. With `generation`, only if the instance is still
    /// that generation (the caller's context lives there); without, creating one if needed.
    pub(crate) fn run<R>(
        &self,
        slot: usize,
        generation: Option<u64>,
        f: impl FnOnce(&mut Instance, u64) -> Result<R, Fault>,
    ) -> Run<R> {
        let mut g = self.lock(slot);
        if let Some(want) = generation
            && (want != g.generation || g.instance.is_none())
        {
            return Run::Orphaned;
        }
        if g.instance.is_none() {
            if g.retry_after.is_some_and(|t| Instant::now() < t) {
                return Run::Unavailable;
            }
            match Instance::new(&self.host, &self.module, &self.meta, self.queue_waker(slot)) {
                Ok(inst) => self.install(slot, &mut g, inst),
                Err(e) => {
                    tracing::error!(plugin = %self.meta.name, "wasm instance could not be recreated: {e}");
                    self.host
                        .metrics
                        .event(&self.meta.name, HostEvent::LoadFailed);
                    g.retry_after = Some(Instant::now() + self.host.config.reload_backoff);
                    return Run::Unavailable;
                }
            }
        }
        let generation = g.generation;
        let Some(inst) = g.instance.as_mut() else {
            return Run::Unavailable;
        };
        let r = f(inst, generation);
        inst.publish_calls();
        match r {
            Ok(v) => {
                let tick = inst.take_tick_change();
                let outgoing = inst.take_outgoing();
                self.after_call(slot, &mut g, tick, outgoing);
                Run::Done(v, generation)
            }
            Err(fault) => {
                self.fault(&mut g, &fault);
                Run::Fault
            }
        }
    }

    /// Discards the slot's instance after `fault`, telling its streams.
    fn fault(&self, g: &mut SlotState, fault: &Fault) {
        let name = &self.meta.name;
        tracing::error!(plugin = %name, "wasm filter {fault}; instance replaced");
        let event = match fault {
            Fault::Trap(_) => HostEvent::Trap,
            Fault::Deadline(_) => HostEvent::Deadline,
            Fault::MemoryLimit(..) => HostEvent::MemoryLimit,
        };
        self.host.metrics.event(name, event);
        self.host.metrics.event(name, HostEvent::InstanceReplaced);
        if let Some(t) = g.ticker.take() {
            t.abort();
        }
        if let Some(mut inst) = g.instance.take() {
            for (_, ctx) in inst.store.data_mut().streams.drain() {
                ctx.mailbox
                    .push(StreamEvent::Lost(Box::new(crate::context::Salvage {
                        request_headers: ctx.request_headers,
                        request_trailers: ctx.request_trailers,
                        response_headers: ctx.response_headers,
                        response_trailers: ctx.response_trailers,
                        request_body: ctx.request_body.freeze(),
                        response_body: ctx.response_body.freeze(),
                    })));
            }
        }
        g.generation += 1;
        g.retry_after = Some(Instant::now() + self.host.config.reload_backoff);
    }

    fn after_call(
        &self,
        slot: usize,
        g: &mut SlotState,
        tick: Option<u32>,
        outgoing: Vec<crate::context::Outgoing>,
    ) {
        if tick.is_none() && outgoing.is_empty() {
            return;
        }
        let generation = g.generation;
        let rt = tokio::runtime::Handle::try_current();
        if let Some(ms) = tick {
            if let Some(t) = g.ticker.take() {
                t.abort();
            }
            match (&rt, ms) {
                (_, 0) => {}
                (Ok(rt), ms) => {
                    let weak = self.weak.clone();
                    g.ticker = Some(rt.spawn(async move {
                        let period = Duration::from_millis(ms.into());
                        let mut iv =
                            tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        loop {
                            iv.tick().await;
                            let Some(p) = weak.upgrade() else { return };
                            if !matches!(
                                p.run(slot, Some(generation), |i, _| i.on_tick()),
                                Run::Done(..)
                            ) {
                                return;
                            }
                        }
                    }));
                }
                (Err(_), _) => {
                    tracing::warn!(plugin = %self.meta.name, "timers need a tokio runtime: on_tick will not be called");
                }
            }
        }
        for out in outgoing {
            let Ok(rt) = &rt else { continue };
            let weak = self.weak.clone();
            rt.spawn(async move {
                let resp = match tokio::time::timeout(out.timeout, out.future).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => {
                        tracing::debug!("callout failed: {e}");
                        crate::callouts::CalloutResponse::unreachable()
                    }
                    Err(_) => crate::callouts::CalloutResponse::timeout(),
                };
                if let Some(p) = weak.upgrade() {
                    let _ = p.run(slot, Some(generation), |i, _| {
                        i.on_http_call_response(out.token, resp)
                    });
                }
            });
        }
    }
}
