//! What the proxy's tasks share: the table, readiness, counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::table::{Locality, Table, TableBuilder};

#[derive(Debug)]
pub struct ProxyState {
    pub table: ArcSwap<Table>,
    /// The builder behind `table` (the discovery task writes, `/config` reads).
    pub builder: Mutex<TableBuilder>,
    ready: watch::Sender<bool>,
    pub version: AtomicU64,
    pub control_connected: AtomicBool,
    /// Set on shutdown: `/ready` fails so no new traffic is sent here while connections drain.
    pub draining: AtomicBool,
    /// Proxied connections open right now (both directions).
    open: std::sync::atomic::AtomicUsize,
    /// Set by `POST /quitquitquit`: shut down as on SIGTERM.
    pub quit: tokio::sync::Notify,
    pub stats: Stats,
    /// Counters of the mTLS path (zero while it is off).
    pub mesh_stats: Arc<crate::identity::MeshStats>,
    /// Pod addresses behind Service ports declared opaque ([`TableBuilder::opaque_endpoints`]).
    pub opaque_endpoints: ArcSwap<std::collections::HashSet<std::net::SocketAddr>>,
    /// The Wasm filters, once the host started (for `/metrics` and `/config`).
    pub filters: std::sync::OnceLock<Arc<crate::filters::Filters>>,
    /// WasmPlugins from control, for the filters task.
    pub wasm_plugins: watch::Sender<Vec<wasmesh_api::discovery::WasmPlugin>>,
    /// The tracer while spans are exported (None: tracing off).
    pub tracer: arc_swap::ArcSwapOption<crate::otel::Tracer>,
    /// Its counters, kept across reconfigurations.
    pub trace_stats: Arc<crate::otel::TraceStats>,
    /// Mesh-wide tracing settings from control (the pod's `OTEL_*` variables win).
    pub mesh_tracing: watch::Sender<Option<crate::otel::config::MeshTracing>>,
}

/// Counts one open proxied connection until dropped.
#[derive(Debug)]
pub struct OpenGuard(Arc<ProxyState>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub outbound_accepted: AtomicU64,
    pub outbound_to_service: AtomicU64,
    pub outbound_passthrough: AtomicU64,
    pub outbound_refused_no_endpoints: AtomicU64,
    pub outbound_refused_local_policy: AtomicU64,
    pub outbound_refused_unknown_port: AtomicU64,
    pub outbound_connect_failures: AtomicU64,
    pub outbound_failovers: AtomicU64,
    pub outbound_failed: AtomicU64,
    pub inbound_accepted: AtomicU64,
    pub inbound_app_refused: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub control_reconnects: AtomicU64,
    /// HTTP requests from the app (outbound L7).
    pub http_requests: AtomicU64,
    /// Requests the proxy answered itself (no route, no endpoint, timeout, …).
    pub http_errors: AtomicU64,
    pub http_timeouts: AtomicU64,
    pub http_retries: AtomicU64,
    pub http_retries_over_budget: AtomicU64,
    /// Connections served as HTTP after detection or declaration, and those detection left L4.
    pub http_connections: AtomicU64,
    pub detected_opaque: AtomicU64,
    /// Inbound connections served as HTTP, and the requests on them.
    pub inbound_http_connections: AtomicU64,
    pub inbound_http_requests: AtomicU64,
}

impl Stats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl ProxyState {
    pub fn new(me: Locality) -> Arc<Self> {
        let (ready, _) = watch::channel(false);
        Arc::new(Self {
            table: ArcSwap::from_pointee(Table::default()),
            builder: Mutex::new(TableBuilder::new(me)),
            ready,
            version: AtomicU64::new(0),
            control_connected: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            open: Default::default(),
            quit: tokio::sync::Notify::new(),
            stats: Stats::default(),
            mesh_stats: Arc::default(),
            opaque_endpoints: ArcSwap::from_pointee(Default::default()),
            filters: std::sync::OnceLock::new(),
            wasm_plugins: watch::channel(Vec::new()).0,
            tracer: Default::default(),
            trace_stats: Arc::default(),
            mesh_tracing: watch::channel(None).0,
        })
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow() && !self.draining.load(Ordering::Relaxed)
    }

    /// Marks a connection open until the guard drops.
    pub fn open_connection(self: &Arc<Self>) -> OpenGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone())
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Waits until no connection is open, or `max` passes; returns how many are left.
    pub async fn drain(&self, max: Duration) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + max;
        while self.open_connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.open_connections()
    }

    pub fn set_ready(&self) {
        self.ready.send_replace(true);
    }

    /// Waits up to `max` for the first table; true if it is there.
    pub async fn wait_ready(&self, max: Duration) -> bool {
        if *self.ready.borrow() {
            return true;
        }
        let mut rx = self.ready.subscribe();
        matches!(
            tokio::time::timeout(max, rx.wait_for(|r| *r)).await,
            Ok(Ok(_))
        )
    }
}
