//! The state behind one instance (wasmtime store data): the plugin it runs, its root context,
//! the stream contexts alive in it with the headers and bodies their callbacks may touch, and
//! what the callbacks asked for that must wait until they return (resumes, local replies,
//! callouts, timers). Also the [`Mailbox`] through which an instance tells a stream's driver
//! that the filter resumed it, answered it or reset it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use wasmtime::{Memory, ResourceLimiter, TypedFunc};

use crate::abi::Direction;
use crate::action::LocalReply;
use crate::callouts::{CalloutFailure, CalloutResponse};
use crate::headers::Headers;
use crate::host::HostInner;
use crate::plugin::PluginMeta;
use crate::properties::{RequestFacts, StreamInfo};
use crate::shared::QueueWaker;

/// Hashes context ids and tokens (small integers the host allocates) with one multiply:
/// these maps are looked up several times per callback.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by context id or token.
pub(crate) type IdMap<V> = HashMap<u32, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Something a filter did to a stream, delivered after the callback returned.
#[derive(Debug)]
pub(crate) enum StreamEvent {
    Resume(Direction),
    LocalReply(LocalReply),
    Close,
    /// The instance holding the stream's context was discarded after a fault; this is what it
    /// held for the stream.
    Lost(Box<Salvage>),
}

/// What a lost instance held for a stream: the driver puts it back where it belongs.
#[derive(Debug, Default)]
pub(crate) struct Salvage {
    pub(crate) request_headers: Option<Headers>,
    pub(crate) request_trailers: Option<Headers>,
    pub(crate) response_headers: Option<Headers>,
    pub(crate) response_trailers: Option<Headers>,
    pub(crate) request_body: bytes::Bytes,
    pub(crate) response_body: bytes::Bytes,
}

/// Events for one stream, and a wake-up for its driver when it is waiting.
#[derive(Default)]
pub(crate) struct Mailbox {
    events: Mutex<Vec<StreamEvent>>,
    notify: tokio::sync::Notify,
}

impl Mailbox {
    pub(crate) fn push(&self, ev: StreamEvent) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ev);
        self.notify.notify_one();
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    pub(crate) fn take(&self) -> Vec<StreamEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits until an event is pushed (returns at once if one was pushed since the last wait).
    pub(crate) async fn wait(&self) {
        self.notify.notified().await;
    }
}

/// One HTTP stream's context inside an instance.
pub(crate) struct StreamCtx {
    pub(crate) info: Arc<StreamInfo>,
    pub(crate) mailbox: Arc<Mailbox>,
    pub(crate) request_headers: Option<Headers>,
    pub(crate) request_trailers: Option<Headers>,
    pub(crate) response_headers: Option<Headers>,
    pub(crate) response_trailers: Option<Headers>,
    pub(crate) request_body: BytesMut,
    pub(crate) response_body: BytesMut,
    pub(crate) request: Option<RequestFacts>,
    pub(crate) response_code: Option<u16>,
    pub(crate) upstream: Option<SocketAddr>,
    pub(crate) properties: HashMap<Vec<u8>, Vec<u8>>,
    pub(crate) local_reply_sent: bool,
}

impl StreamCtx {
    pub(crate) fn new(info: Arc<StreamInfo>, mailbox: Arc<Mailbox>) -> Self {
        StreamCtx {
            info,
            mailbox,
            request_headers: None,
            request_trailers: None,
            response_headers: None,
            response_trailers: None,
            request_body: BytesMut::new(),
            response_body: BytesMut::new(),
            request: None,
            response_code: None,
            upstream: None,
            properties: HashMap::new(),
            local_reply_sent: false,
        }
    }
}

/// A callout to start once the callback returns.
pub(crate) struct Outgoing {
    pub(crate) token: u32,
    pub(crate) future: futures::future::BoxFuture<'static, Result<CalloutResponse, CalloutFailure>>,
    pub(crate) timeout: std::time::Duration,
}

/// Memory cap for one instance; remembers whether it refused a growth.
pub(crate) struct Limiter {
    pub(crate) max: usize,
    pub(crate) hit: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// The store data of one instance.
pub(crate) struct HostState {
    pub(crate) host: Arc<HostInner>,
    pub(crate) plugin: Arc<PluginMeta>,
    pub(crate) limiter: Limiter,
    pub(crate) memory: Option<Memory>,
    /// Behind an `Arc`: a hostcall clones it to call it with the store (cloning a `TypedFunc`
    /// clones its registered type, far dearer).
    pub(crate) alloc: Option<Arc<TypedFunc<u32, u32>>>,
    pub(crate) root_context: u32,
    pub(crate) effective: u32,
    next_context: u32,
    pub(crate) streams: IdMap<StreamCtx>,
    pub(crate) root_properties: HashMap<Vec<u8>, Vec<u8>>,
    pub(crate) deferred: Vec<(u32, StreamEvent)>,
    /// `Some(period_ms)` when the root context changed its tick period in this callback.
    pub(crate) tick_change: Option<u32>,
    pub(crate) callouts: IdMap<u32>,
    next_token: u32,
    pub(crate) outgoing: Vec<Outgoing>,
    pub(crate) call_response: Option<(Headers, bytes::Bytes, Headers)>,
    pub(crate) queue_waker: Option<QueueWaker>,
    pub(crate) warned: HashSet<&'static str>,
    /// Contexts whose `on_done` returned false and that called `proxy_done` since.
    pub(crate) done: HashSet<u32>,
    /// The running callback's CPU budget, in time and in epoch ticks.
    pub(crate) budget: std::time::Duration,
    pub(crate) budget_ticks: u64,
    /// Thread CPU time when the wall-clock deadline first passed in this callback.
    pub(crate) cpu_mark: Option<std::time::Duration>,
    /// The callback used up its CPU budget.
    pub(crate) deadline_hit: bool,
    /// Callbacks run since they were last added to the plugin's counter.
    pub(crate) calls: u64,
}

impl HostState {
    pub(crate) fn new(host: Arc<HostInner>, plugin: Arc<PluginMeta>) -> Self {
        let max = host.config.memory_limit;
        HostState {
            host,
            plugin,
            limiter: Limiter { max, hit: false },
            memory: None,
            alloc: None,
            root_context: 0,
            effective: 0,
            next_context: 1,
            streams: IdMap::default(),
            root_properties: HashMap::new(),
            deferred: Vec::new(),
            tick_change: None,
            callouts: IdMap::default(),
            next_token: 1,
            outgoing: Vec::new(),
            call_response: None,
            queue_waker: None,
            warned: HashSet::new(),
            done: HashSet::new(),
            budget: std::time::Duration::ZERO,
            budget_ticks: 1,
            cpu_mark: None,
            deadline_hit: false,
            calls: 0,
        }
    }

    /// A context id not in use (never 0).
    pub(crate) fn new_context_id(&mut self) -> u32 {
        loop {
            let id = self.next_context;
            self.next_context = self.next_context.wrapping_add(1).max(1);
            if id != self.root_context && !self.streams.contains_key(&id) {
                return id;
            }
        }
    }

    pub(crate) fn new_token(&mut self) -> u32 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(1);
        t
    }

    /// The stream whose context is effective, if a stream's.
    pub(crate) fn stream(&self) -> Option<&StreamCtx> {
        self.streams.get(&self.effective)
    }

    pub(crate) fn stream_mut(&mut self) -> Option<&mut StreamCtx> {
        self.streams.get_mut(&self.effective)
    }

    /// Logs `what` once per instance at warn level (calls the host doesn't support yet).
    pub(crate) fn warn_once(&mut self, what: &'static str) {
        if self.warned.insert(what) {
            tracing::warn!(plugin = %self.plugin.name, "{what}");
        }
    }

    /// Hands events to the streams' mailboxes (after a callback returned).
    pub(crate) fn flush_deferred(&mut self) {
        for (ctx, ev) in self.deferred.drain(..) {
            if let Some(s) = self.streams.get(&ctx) {
                s.mailbox.push(ev);
            }
        }
    }
}
