//! What the proxy's tasks share: the table, readiness, counters, metrics, the access log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// The labeled metric families (see [`crate::metrics`]).
    pub metrics: crate::metrics::Metrics,
    pub access_log: crate::access_log::AccessLog,
    /// This pod's ports → the Service (`namespace/name`) that selects this pod there
    /// ([`TableBuilder::local_services`]): the `service` label of inbound traffic.
    pub local_services: ArcSwap<HashMap<u16, Arc<str>>>,
    /// When the last table update was applied (ms since `born`; 0: never).
    table_updated_ms: AtomicU64,
    control_state: AtomicU8,
    born: Instant,
    /// With mTLS on: the authorizer the discovery task gives control's AuthorizationPolicies
    /// to, before the table that carries them counts as received.
    pub authorizer: std::sync::OnceLock<Arc<crate::identity::Authorizer>>,
}

/// Where the control stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlState {
    /// Dialing control, or waiting for its first complete table on a new stream.
    Connecting = 0,
    /// The stream is up and its table applied.
    Connected = 1,
    /// The stream was lost; waiting before the next attempt.
    Backoff = 2,
}

impl ControlState {
    pub const ALL: [ControlState; 3] = [
        ControlState::Connecting,
        ControlState::Connected,
        ControlState::Backoff,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ControlState::Connecting => "connecting",
            ControlState::Connected => "connected",
            ControlState::Backoff => "backoff",
        }
    }
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
    /// Table updates applied.
    pub table_updates: AtomicU64,
}

impl Stats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// `(name, help, value)` of every counter, for `/metrics`.
    pub fn counters(&self) -> [(&'static str, &'static str, u64); 22] {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (
                "wasmesh_outbound_connections_total",
                "Outbound connections accepted",
                v(&self.outbound_accepted),
            ),
            (
                "wasmesh_outbound_service_connections_total",
                "Outbound connections to a Service",
                v(&self.outbound_to_service),
            ),
            (
                "wasmesh_outbound_passthrough_connections_total",
                "Outbound connections passed through to their original destination",
                v(&self.outbound_passthrough),
            ),
            (
                "wasmesh_outbound_refused_no_endpoints_total",
                "Outbound connections refused: no usable endpoint",
                v(&self.outbound_refused_no_endpoints),
            ),
            (
                "wasmesh_outbound_refused_local_policy_total",
                "Outbound connections refused: internalTrafficPolicy Local and no local endpoint",
                v(&self.outbound_refused_local_policy),
            ),
            (
                "wasmesh_outbound_refused_unknown_port_total",
                "Outbound connections refused: a virtual IP without that port",
                v(&self.outbound_refused_unknown_port),
            ),
            (
                "wasmesh_outbound_connect_failures_total",
                "Connects to an endpoint that failed",
                v(&self.outbound_connect_failures),
            ),
            (
                "wasmesh_outbound_failovers_total",
                "Connects retried on another endpoint",
                v(&self.outbound_failovers),
            ),
            (
                "wasmesh_outbound_failed_total",
                "Outbound connections no endpoint accepted",
                v(&self.outbound_failed),
            ),
            (
                "wasmesh_inbound_connections_total",
                "Inbound connections accepted",
                v(&self.inbound_accepted),
            ),
            (
                "wasmesh_inbound_app_refused_total",
                "Inbound connections the app did not accept",
                v(&self.inbound_app_refused),
            ),
            (
                "wasmesh_http_connections_total",
                "Outbound connections served as HTTP",
                v(&self.http_connections),
            ),
            (
                "wasmesh_detected_opaque_total",
                "Outbound connections to undeclared ports that detection left as TCP",
                v(&self.detected_opaque),
            ),
            (
                "wasmesh_http_requests_total",
                "HTTP requests from the app",
                v(&self.http_requests),
            ),
            (
                "wasmesh_http_proxy_errors_total",
                "HTTP requests the proxy answered itself (x-wasmesh-error)",
                v(&self.http_errors),
            ),
            (
                "wasmesh_http_timeouts_total",
                "HTTP tries that ran out of time",
                v(&self.http_timeouts),
            ),
            (
                "wasmesh_http_retries_total",
                "HTTP requests sent again (status code, failure or timeout)",
                v(&self.http_retries),
            ),
            (
                "wasmesh_http_retries_over_budget_total",
                "HTTP retries the retry budget refused",
                v(&self.http_retries_over_budget),
            ),
            (
                "wasmesh_inbound_http_connections_total",
                "Inbound connections served as HTTP",
                v(&self.inbound_http_connections),
            ),
            (
                "wasmesh_inbound_http_requests_total",
                "HTTP requests to the app",
                v(&self.inbound_http_requests),
            ),
            (
                "wasmesh_control_reconnects_total",
                "Times the control stream was lost",
                v(&self.control_reconnects),
            ),
            (
                "wasmesh_table_updates_total",
                "Table updates from control applied (snapshots and deltas)",
                v(&self.table_updates),
            ),
        ]
    }
}

impl ProxyState {
    pub fn new(me: Locality) -> Arc<Self> {
        Self::with_access_log(me, crate::access_log::AccessLog::off())
    }

    /// With an access log ([`crate::access_log::AccessLog::start`]).
    pub fn with_access_log(me: Locality, access_log: crate::access_log::AccessLog) -> Arc<Self> {
        let (ready, _) = watch::channel(false);
        let metrics = crate::metrics::Metrics::default();
        let mut builder = TableBuilder::new(me);
        builder.count_picks(metrics.balancer_picks.clone());
        Arc::new(Self {
            table: ArcSwap::from_pointee(Table::default()),
            builder: Mutex::new(builder),
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
            metrics,
            access_log,
            local_services: ArcSwap::from_pointee(HashMap::new()),
            table_updated_ms: AtomicU64::new(0),
            control_state: AtomicU8::new(ControlState::Connecting as u8),
            born: Instant::now(),
            authorizer: std::sync::OnceLock::new(),
        })
    }

    /// The Service that selects this pod on `port` (the inbound `service` label).
    pub fn local_service(&self, port: u16) -> crate::metrics::Name {
        self.local_services.load().get(&port).cloned()
    }

    /// A table update from control was just applied.
    pub fn table_updated(&self) {
        Stats::inc(&self.stats.table_updates);
        let ms = self.born.elapsed().as_millis() as u64;
        self.table_updated_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// Time since the last table update (None before the first).
    pub fn table_age(&self) -> Option<Duration> {
        let at = self.table_updated_ms.load(Ordering::Relaxed);
        (at > 0).then(|| {
            self.born
                .elapsed()
                .saturating_sub(Duration::from_millis(at))
        })
    }

    pub fn set_control_state(&self, s: ControlState) {
        self.control_state.store(s as u8, Ordering::Relaxed);
    }

    pub fn control_state(&self) -> ControlState {
        match self.control_state.load(Ordering::Relaxed) {
            1 => ControlState::Connected,
            2 => ControlState::Backoff,
            _ => ControlState::Connecting,
        }
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
