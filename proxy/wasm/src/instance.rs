//! One instance of a module: a wasmtime store with its [`HostState`], the module's callbacks as
//! typed functions, and the guarded call every callback goes through — epoch deadline set,
//! memory cap armed, and a failure classified as a [`Fault`] (trap, deadline, memory cap).
//! An instance is created ready to serve: `_initialize`, root context, `on_vm_start`,
//! `on_configure`.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Store, Trap, TypedFunc, UpdateDeadline};

use crate::abi::GuestAction;
use crate::callouts::CalloutResponse;
use crate::context::{HostState, Mailbox, StreamCtx};
use crate::headers::Headers;
use crate::host::HostInner;
use crate::memory::HostAbort;
use crate::module::CompiledModule;
use crate::plugin::{LoadError, PluginMeta};
use crate::properties::StreamInfo;
use crate::shared::QueueWaker;

/// How a callback failed. The instance is discarded afterwards.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Fault {
    /// The module trapped: a panic (`unreachable`), a bad pointer handed to the host,
    /// `proc_exit`, an out-of-bounds access…
    #[error("trapped: {0}")]
    Trap(String),
    /// The callback ran past its deadline and was interrupted.
    #[error("interrupted: ran past its {0:?} deadline")]
    Deadline(Duration),
    /// The module needed more memory than its cap.
    #[error("ran out of memory: growth past the {0}-byte cap was refused ({1})")]
    MemoryLimit(usize, String),
}

type F1 = Option<TypedFunc<u32, ()>>;
type F1R = Option<TypedFunc<u32, u32>>;
type F2 = Option<TypedFunc<(u32, u32), ()>>;
type F2R = Option<TypedFunc<(u32, u32), u32>>;
type F3R = Option<TypedFunc<(u32, u32, u32), u32>>;
type F5 = Option<TypedFunc<(u32, u32, u32, u32, u32), ()>>;

#[derive(Default)]
struct Callbacks {
    on_context_create: F2,
    on_vm_start: F2R,
    on_configure: F2R,
    on_tick: F1,
    on_queue_ready: F2,
    on_done: F1R,
    on_log: F1,
    on_delete: F1,
    on_request_headers: F3R,
    on_request_body: F3R,
    on_request_trailers: F2R,
    on_response_headers: F3R,
    on_response_body: F3R,
    on_response_trailers: F2R,
    on_http_call_response: F5,
}

pub(crate) struct Instance {
    pub(crate) store: Store<HostState>,
    cb: Callbacks,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Callbacks of a failed start, or of the call that faulted, count too.
        self.publish_calls();
    }
}

impl Instance {
    /// Instantiates and starts the module for `meta`.
    pub(crate) fn new(
        host: &Arc<HostInner>,
        module: &CompiledModule,
        meta: &Arc<PluginMeta>,
        waker: Option<QueueWaker>,
    ) -> Result<Instance, LoadError> {
        let plugin = || meta.name.clone();
        let mut state = HostState::new(host.clone(), meta.clone());
        state.queue_waker = waker;
        let mut store = Store::new(&host.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(deadline_passed);
        store.set_epoch_deadline(host.deadline_ticks);
        let instance = module
            .pre
            .instantiate(&mut store)
            .map_err(|e| LoadError::Instantiate {
                plugin: plugin(),
                reason: format!("{e:#}"),
            })?;

        let memory = instance.get_memory(&mut store, "memory");
        let alloc = ["proxy_on_memory_allocate", "malloc"]
            .into_iter()
            .find_map(|n| instance.get_typed_func::<u32, u32>(&mut store, n).ok());
        store.data_mut().memory = memory;
        store.data_mut().alloc = alloc.map(Arc::new);

        let mut lookup_error = None;
        macro_rules! cb {
            ($name:literal) => {
                match instance.get_func(&mut store, $name) {
                    None => None,
                    Some(f) => match f.typed(&store) {
                        Ok(t) => Some(t),
                        Err(e) => {
                            lookup_error = Some(LoadError::Signature {
                                plugin: plugin(),
                                export: $name,
                                reason: format!("{e:#}"),
                            });
                            None
                        }
                    },
                }
            };
        }
        let cb = Callbacks {
            on_context_create: cb!("proxy_on_context_create"),
            on_vm_start: cb!("proxy_on_vm_start"),
            on_configure: cb!("proxy_on_configure"),
            on_tick: cb!("proxy_on_tick"),
            on_queue_ready: cb!("proxy_on_queue_ready"),
            on_done: cb!("proxy_on_done"),
            on_log: cb!("proxy_on_log"),
            on_delete: cb!("proxy_on_delete"),
            on_request_headers: cb!("proxy_on_request_headers"),
            on_request_body: cb!("proxy_on_request_body"),
            on_request_trailers: cb!("proxy_on_request_trailers"),
            on_response_headers: cb!("proxy_on_response_headers"),
            on_response_body: cb!("proxy_on_response_body"),
            on_response_trailers: cb!("proxy_on_response_trailers"),
            on_http_call_response: cb!("proxy_on_http_call_response"),
        };
        if let Some(e) = lookup_error {
            return Err(e);
        }
        let init = instance
            .get_typed_func::<(), ()>(&mut store, "_initialize")
            .or_else(|_| instance.get_typed_func::<(), ()>(&mut store, "_start"))
            .ok();
        let mut inst = Instance { store, cb };
        let fail = |callback: &'static str| {
            move |fault: Fault| LoadError::Start {
                plugin: plugin(),
                callback,
                fault,
            }
        };
        if let Some(init) = init {
            inst.guard_start(0, |s| init.call(s, ()))
                .map_err(fail("_initialize"))?;
        }
        let root = inst.store.data_mut().new_context_id();
        inst.store.data_mut().root_context = root;
        if let Some(f) = inst.cb.on_context_create.clone() {
            inst.guard_start(root, |s| f.call(s, (root, 0)))
                .map_err(fail("proxy_on_context_create"))?;
        }
        let vm_len = meta.vm_config.len() as u32;
        if let Some(f) = inst.cb.on_vm_start.clone()
            && inst
                .guard_start(root, |s| f.call(s, (root, vm_len)))
                .map_err(fail("proxy_on_vm_start"))?
                == 0
        {
            return Err(LoadError::VmStartRejected { plugin: plugin() });
        }
        let cfg_len = meta.plugin_config.len() as u32;
        if let Some(f) = inst.cb.on_configure.clone()
            && inst
                .guard_start(root, |s| f.call(s, (root, cfg_len)))
                .map_err(fail("proxy_on_configure"))?
                == 0
        {
            return Err(LoadError::ConfigRejected { plugin: plugin() });
        }
        Ok(inst)
    }

    /// [`guard`] with the longer start-up deadline.
    fn guard_start<R>(
        &mut self,
        ctx: u32,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Fault> {
        let host = &self.store.data().host;
        let (ticks, budget) = (
            host.start_ticks,
            host.config
                .start_deadline
                .max(host.config.callback_deadline),
        );
        guard_for(&mut self.store, ticks, budget, ctx, f)
    }

    /// Adds the callbacks run since the last time to the plugin's `calls` counter (once per
    /// [`crate::plugin::PluginInner::run`], not once per callback: the counter is shared by
    /// the instances of every worker).
    pub(crate) fn publish_calls(&mut self) {
        let s = self.store.data_mut();
        let n = std::mem::take(&mut s.calls);
        if n > 0 {
            s.plugin
                .calls
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub(crate) fn root_context(&self) -> u32 {
        self.store.data().root_context
    }

    /// Creates a stream context; returns its id.
    pub(crate) fn create_stream(
        &mut self,
        info: Arc<StreamInfo>,
        mailbox: Arc<Mailbox>,
    ) -> Result<u32, Fault> {
        let s = self.store.data_mut();
        let id = s.new_context_id();
        s.streams.insert(id, StreamCtx::new(info, mailbox));
        let root = s.root_context;
        if let Some(f) = &self.cb.on_context_create {
            guard(&mut self.store, id, |st| f.call(st, (id, root)))?;
        }
        Ok(id)
    }

    pub(crate) fn stream(&mut self, ctx: u32) -> Option<&mut StreamCtx> {
        self.store.data_mut().streams.get_mut(&ctx)
    }

    pub(crate) fn on_request_headers(
        &mut self,
        ctx: u32,
        n: usize,
        eos: bool,
    ) -> Result<GuestAction, Fault> {
        action(
            &mut self.store,
            &self.cb.on_request_headers,
            ctx,
            n as u32,
            eos,
        )
    }
    pub(crate) fn on_request_body(
        &mut self,
        ctx: u32,
        size: usize,
        eos: bool,
    ) -> Result<GuestAction, Fault> {
        action(
            &mut self.store,
            &self.cb.on_request_body,
            ctx,
            size as u32,
            eos,
        )
    }
    pub(crate) fn on_request_trailers(&mut self, ctx: u32, n: usize) -> Result<GuestAction, Fault> {
        action2(&mut self.store, &self.cb.on_request_trailers, ctx, n as u32)
    }
    pub(crate) fn on_response_headers(
        &mut self,
        ctx: u32,
        n: usize,
        eos: bool,
    ) -> Result<GuestAction, Fault> {
        action(
            &mut self.store,
            &self.cb.on_response_headers,
            ctx,
            n as u32,
            eos,
        )
    }
    pub(crate) fn on_response_body(
        &mut self,
        ctx: u32,
        size: usize,
        eos: bool,
    ) -> Result<GuestAction, Fault> {
        action(
            &mut self.store,
            &self.cb.on_response_body,
            ctx,
            size as u32,
            eos,
        )
    }
    pub(crate) fn on_response_trailers(
        &mut self,
        ctx: u32,
        n: usize,
    ) -> Result<GuestAction, Fault> {
        action2(
            &mut self.store,
            &self.cb.on_response_trailers,
            ctx,
            n as u32,
        )
    }

    /// `on_done` → `on_log` → `on_delete`, then forgets the context and its callouts.
    /// (wasmesh does not wait for `proxy_done` when `on_done` returns false.)
    pub(crate) fn finish_stream(&mut self, ctx: u32) -> Result<(), Fault> {
        let r = self.finish_calls(ctx);
        let s = self.store.data_mut();
        s.streams.remove(&ctx);
        s.callouts.retain(|_, c| *c != ctx);
        s.done.remove(&ctx);
        r
    }

    fn finish_calls(&mut self, ctx: u32) -> Result<(), Fault> {
        if let Some(f) = &self.cb.on_done {
            guard(&mut self.store, ctx, |s| f.call(s, ctx))?;
        }
        if let Some(f) = &self.cb.on_log {
            guard(&mut self.store, ctx, |s| f.call(s, ctx))?;
        }
        if let Some(f) = &self.cb.on_delete {
            guard(&mut self.store, ctx, |s| f.call(s, ctx))?;
        }
        Ok(())
    }

    pub(crate) fn on_tick(&mut self) -> Result<(), Fault> {
        let root = self.root_context();
        match &self.cb.on_tick {
            Some(f) => guard(&mut self.store, root, |s| f.call(s, root)),
            None => Ok(()),
        }
    }

    pub(crate) fn on_queue_ready(&mut self, queue: u32) -> Result<(), Fault> {
        let root = self.root_context();
        match &self.cb.on_queue_ready {
            Some(f) => guard(&mut self.store, root, |s| f.call(s, (root, queue))),
            None => Ok(()),
        }
    }

    /// Delivers a callout's response to the context that made it (if it is still alive).
    pub(crate) fn on_http_call_response(
        &mut self,
        token: u32,
        resp: CalloutResponse,
    ) -> Result<(), Fault> {
        let Some(ctx) = self.store.data_mut().callouts.remove(&token) else {
            return Ok(());
        };
        let Some(f) = &self.cb.on_http_call_response else {
            return Ok(());
        };
        let mut headers = Headers::plain(resp.headers);
        headers
            .pseudo
            .push((":status", bytes::Bytes::from(resp.status.to_string())));
        let (n_headers, body_len) = (headers.len() as u32, resp.body.len() as u32);
        let trailers = Headers::plain(resp.trailers);
        let n_trailers = trailers.len() as u32;
        self.store.data_mut().call_response = Some((headers, resp.body, trailers));
        guard(&mut self.store, ctx, |s| {
            f.call(s, (ctx, token, n_headers, body_len, n_trailers))
        })
    }

    /// Callouts started by the last call, to be spawned by the caller.
    pub(crate) fn take_outgoing(&mut self) -> Vec<crate::context::Outgoing> {
        std::mem::take(&mut self.store.data_mut().outgoing)
    }

    /// A tick period the root context set during the last call.
    pub(crate) fn take_tick_change(&mut self) -> Option<u32> {
        self.store.data_mut().tick_change.take()
    }
}

/// Runs one guest call for context `ctx` under the deadline and memory cap. (A free function
/// over the store, so the callbacks can be borrowed from the instance meanwhile.)
fn guard<R>(
    store: &mut Store<HostState>,
    ctx: u32,
    f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
) -> Result<R, Fault> {
    let host = &store.data().host;
    let (ticks, budget) = (host.deadline_ticks, host.config.callback_deadline);
    guard_for(store, ticks, budget, ctx, f)
}

fn guard_for<R>(
    store: &mut Store<HostState>,
    ticks: u64,
    budget: Duration,
    ctx: u32,
    f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
) -> Result<R, Fault> {
    store.set_epoch_deadline(ticks);
    {
        let s = store.data_mut();
        s.calls += 1;
        s.budget_ticks = ticks;
        s.budget = budget;
        s.cpu_mark = None;
        s.deadline_hit = false;
        s.effective = ctx;
        s.limiter.hit = false;
    }
    let r = f(store);
    let s = store.data_mut();
    s.effective = s.root_context;
    s.call_response = None;
    match r {
        Ok(v) => {
            s.flush_deferred();
            Ok(v)
        }
        Err(e) => {
            s.deferred.clear();
            Err(classify(e, s))
        }
    }
}

fn action(
    store: &mut Store<HostState>,
    f: &F3R,
    ctx: u32,
    a: u32,
    eos: bool,
) -> Result<GuestAction, Fault> {
    match f {
        Some(f) => Ok(GuestAction::from_abi(guard(store, ctx, |s| {
            f.call(s, (ctx, a, u32::from(eos)))
        })?)),
        None => Ok(GuestAction::Continue),
    }
}

fn action2(store: &mut Store<HostState>, f: &F2R, ctx: u32, a: u32) -> Result<GuestAction, Fault> {
    match f {
        Some(f) => Ok(GuestAction::from_abi(guard(store, ctx, |s| {
            f.call(s, (ctx, a))
        })?)),
        None => Ok(GuestAction::Continue),
    }
}

/// The wall-clock deadline of a callback passed. The deadline is meant for CPU time: a callback
/// the OS preempted (a loaded node) must not fault. So the first time, note the thread's CPU
/// time and give it another budget; fault when it has used a whole budget of CPU since (a busy
/// loop is stopped after one to two deadlines).
fn deadline_passed(
    mut ctx: wasmtime::StoreContextMut<'_, HostState>,
) -> wasmtime::Result<UpdateDeadline> {
    let s = ctx.data_mut();
    let now = thread_cpu_time();
    match (s.cpu_mark, now) {
        (None, Some(now)) => {
            s.cpu_mark = Some(now);
            Ok(UpdateDeadline::Continue(s.budget_ticks))
        }
        (Some(mark), Some(now)) if now.saturating_sub(mark) < s.budget => {
            Ok(UpdateDeadline::Continue(s.budget_ticks))
        }
        _ => {
            s.deadline_hit = true;
            Err(crate::memory::abort(HostAbort::Deadline))
        }
    }
}

/// CPU time of the calling thread (Linux: the first field of `/proc/thread-self/schedstat`).
/// Read only when a callback ran past its deadline in wall-clock time.
fn thread_cpu_time() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

fn classify(e: wasmtime::Error, s: &HostState) -> Fault {
    if s.deadline_hit || matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        return Fault::Deadline(s.host.config.callback_deadline);
    }
    if s.limiter.hit {
        return Fault::MemoryLimit(s.limiter.max, root_message(&e));
    }
    if let Some(h) = e.downcast_ref::<HostAbort>() {
        return Fault::Trap(h.to_string());
    }
    Fault::Trap(root_message(&e))
}

fn root_message(e: &wasmtime::Error) -> String {
    // The first line, without the wasm backtrace that follows it.
    let full = format!("{e:#}");
    full.lines().next().unwrap_or_default().to_string()
}
