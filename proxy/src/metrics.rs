//! The proxy's metrics, served on the admin port's `/metrics` in the OpenMetrics text format
//! (prometheus-client). One [`Registry`] is built at start ([`registry`]):
//!
//! - labeled families ([`Metrics`]) recorded where the data path learns an outcome: an HTTP
//!   response ([`Exchange`], counted through the [`Outcomes`] of its Service port, HTTPRoute
//!   rule or inbound connection, which keep the series they resolved), the end of a proxied TCP
//!   connection ([`TcpConn`]), an endpoint picked by a balancer (a counter handle kept in each
//!   [`crate::table::Endpoint`], so a pick is one atomic add);
//! - everything else read when scraped by one collector: the plain counters of
//!   [`Stats`](crate::state::Stats), the mTLS counters, table and control-stream state, the
//!   access log's drops and the Wasm host's metrics.
//!
//! Labels are bounded by design: Service, route (HTTPRoute rule), pod and SPIFFE ID values come
//! from the table or a verified certificate, never from request data; response class and
//! `x-wasmesh-error` cause are fixed sets. No pod IPs, ports or paths. Label values are
//! reference-counted strings made once per table change, so recording allocates nothing.
//! Every metric: docs/observability.md.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, Request, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;

use crate::access_log::{self, HttpLine, Line, TcpLine};
use crate::copy::Transferred;
use crate::state::ProxyState;

/// A label value that may be empty (`""` when `None`), shared, never copied per request.
pub type Name = Option<Arc<str>>;

/// Which way a request or connection went: from this pod's app (`outbound`) or to it
/// (`inbound`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// A label value from names that come from outside (Kubernetes object names, SPIFFE IDs):
/// characters the text format would have to escape are replaced, once, when the value is made.
pub fn label(s: &str) -> Arc<str> {
    if s.contains(['"', '\\', '\n']) {
        Arc::from(s.replace(['"', '\\', '\n'], "_"))
    } else {
        Arc::from(s)
    }
}

/// `wasmesh_http_responses_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub direction: Direction,
    /// `namespace/name` of the destination Service.
    pub service: Name,
    /// `namespace/route/rule` of the HTTPRoute rule that matched.
    pub route: Name,
    /// `1xx` … `5xx`.
    pub class: &'static str,
    /// `x-wasmesh-error` of the response, one of [`crate::http::respond::CAUSES`].
    pub cause: &'static str,
    /// The client's SPIFFE ID (inbound mTLS).
    pub peer: Name,
}

/// Direction and Service: latency and TCP families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub direction: Direction,
    pub service: Name,
}

/// `wasmesh_balancer_picks_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: Arc<str>,
    /// The name of the endpoint's Pod ("" for an endpoint without one).
    pub pod: Name,
}

/// Upper bounds of the request latency histogram, in seconds (and +Inf).
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// [`LATENCY_BUCKETS`] in nanoseconds.
const LATENCY_BOUNDS_NS: [u64; 15] = {
    let mut ns = [0u64; 15];
    let mut i = 0;
    while i < 15 {
        ns[i] = (LATENCY_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    ns
};

/// A latency histogram without a lock: an atomic per bucket and one for the sum, so requests
/// on every worker thread record at once (prometheus-client's own histogram takes a mutex per
/// observation). The count is the sum of the buckets, read when scraped.
#[derive(Debug, Clone, Default)]
pub struct Latency(Arc<LatencyCells>);

#[derive(Debug, Default)]
struct LatencyCells {
    /// Per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; 16],
    sum_ns: AtomicU64,
}

impl Latency {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS
            .iter()
            .position(|b| ns <= *b)
            .unwrap_or(LATENCY_BOUNDS_NS.len());
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0u64); 16];
        for (i, (b, c)) in buckets.iter_mut().zip(&self.0.buckets).enumerate() {
            *b = (
                LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
                c.load(Ordering::Relaxed),
            );
        }
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The status classes, the `class` label.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The responses of one (direction, Service, route, peer) — a Service port, an HTTPRoute
/// rule, an inbound connection — with their counter per status class and their latency
/// histogram resolved in the families on first use, so recording a response is an atomic load
/// and an add, not a lookup.
#[derive(Debug)]
pub struct Outcomes {
    direction: Direction,
    service: Name,
    route: Name,
    peer: Name,
    by_class: [OnceLock<Counter>; 5],
    latency: OnceLock<Latency>,
}

impl Outcomes {
    pub fn new(direction: Direction, service: Name, route: Name, peer: Name) -> Self {
        Self {
            direction,
            service,
            route,
            peer,
            by_class: Default::default(),
            latency: OnceLock::new(),
        }
    }

    fn labels(&self, class: &'static str, cause: &'static str) -> ResponseLabels {
        ResponseLabels {
            direction: self.direction,
            service: self.service.clone(),
            route: self.route.clone(),
            class,
            cause,
            peer: self.peer.clone(),
        }
    }

    /// Counts a response of status class `class` (index into [`CLASSES`]) and `cause`.
    fn count(&self, m: &Metrics, class: usize, cause: Option<&'static str>) {
        match cause {
            None => self.by_class[class]
                .get_or_init(|| {
                    m.http_responses
                        .get_or_create_owned(&self.labels(CLASSES[class], ""))
                })
                .inc(),
            // The proxy's own answers: rare enough for a lookup.
            Some(cause) => m
                .http_responses
                .get_or_create(&self.labels(CLASSES[class], cause))
                .inc(),
        };
    }

    fn latency(&self, m: &Metrics) -> &Latency {
        self.latency.get_or_init(|| {
            m.http_duration.get_or_create_owned(&ServiceLabels {
                direction: self.direction,
                service: self.service.clone(),
            })
        })
    }
}

/// The labeled families. Cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub http_responses: Family<ResponseLabels, Counter>,
    pub http_duration: Family<ServiceLabels, Latency>,
    pub tcp_opened: Family<ServiceLabels, Counter>,
    pub tcp_closed: Family<ServiceLabels, Counter>,
    pub tcp_sent: Family<ServiceLabels, Counter>,
    pub tcp_received: Family<ServiceLabels, Counter>,
    pub balancer_picks: Family<EndpointLabels, Counter>,
}

/// The registry `/metrics` encodes: the families of `state.metrics` and a collector that reads
/// the rest of `state` when scraped.
pub fn registry(state: Arc<ProxyState>) -> Registry {
    let mut r = Registry::default();
    let m = &state.metrics;
    r.register(
        "wasmesh_http_responses",
        "HTTP responses sent back, by direction, destination Service, HTTPRoute rule, status class, x-wasmesh-error cause and peer identity",
        m.http_responses.clone(),
    );
    r.register_with_unit(
        "wasmesh_http_request_duration",
        "Time from a request's arrival to its response head, by direction and Service",
        Unit::Seconds,
        m.http_duration.clone(),
    );
    r.register(
        "wasmesh_tcp_connections_opened",
        "Proxied TCP (L4) connections opened, by direction and Service",
        m.tcp_opened.clone(),
    );
    r.register(
        "wasmesh_tcp_connections_closed",
        "Proxied TCP (L4) connections closed, by direction and Service",
        m.tcp_closed.clone(),
    );
    r.register_with_unit(
        "wasmesh_tcp_sent",
        "Bytes from clients to upstreams on proxied TCP connections, by direction and Service",
        Unit::Bytes,
        m.tcp_sent.clone(),
    );
    r.register_with_unit(
        "wasmesh_tcp_received",
        "Bytes from upstreams to clients on proxied TCP connections, by direction and Service",
        Unit::Bytes,
        m.tcp_received.clone(),
    );
    r.register(
        "wasmesh_balancer_picks",
        "Endpoints chosen by the balancers (connections, requests, failovers and retries), by Service and Pod",
        m.balancer_picks.clone(),
    );
    r.register_collector(Box::new(StateCollector(state)));
    r
}

/// The registry in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding /metrics failed");
    }
    out
}

/// The `1xx` … `5xx` label of a status code.
pub fn class(status: u16) -> &'static str {
    CLASSES[class_index(status)]
}

fn class_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// What the access log needs from a request's head, taken when the request is sampled.
#[derive(Debug)]
struct LogStart {
    time: SystemTime,
    /// The request's trace, when tracing is on.
    trace_id: Option<String>,
    method: String,
    authority: Option<String>,
    path: String,
    protocol: &'static str,
}

/// One HTTP request from arrival to response head: the handling fills in what it learns
/// (the Service and route's [`Outcomes`], the endpoint, picks), [`Exchange::finish`] records
/// the response.
#[derive(Debug)]
pub struct Exchange {
    pub direction: Direction,
    pub started: Instant,
    pub client: SocketAddr,
    /// Where the response is counted; None until the Service is known.
    pub outcomes: Option<Arc<Outcomes>>,
    /// The endpoint (outbound) or app address (inbound) that answered or was tried last.
    pub upstream: Option<SocketAddr>,
    /// Endpoints picked for this request (more than one after failovers or retries).
    pub picks: u32,
    log: Option<Box<LogStart>>,
}

impl Exchange {
    /// A request that just arrived from `client`.
    pub fn start<B>(
        state: &ProxyState,
        direction: Direction,
        client: SocketAddr,
        req: &Request<B>,
    ) -> Exchange {
        let log = state.access_log.sampled().then(|| {
            Box::new(LogStart {
                time: SystemTime::now(),
                trace_id: None,
                method: req.method().to_string(),
                authority: crate::http::headers::authority(req.uri(), req.headers()),
                path: req.uri().path().to_string(),
                protocol: crate::http::forward::protocol_name(req.version()),
            })
        });
        Exchange {
            direction,
            started: Instant::now(),
            client,
            outcomes: None,
            upstream: None,
            picks: 0,
            log,
        }
    }

    /// Puts the request's trace id in its access log line (built only if the line is kept).
    pub fn trace(&mut self, id: impl FnOnce() -> String) {
        if let Some(l) = self.log.as_mut() {
            l.trace_id = Some(id());
        }
    }

    /// Counts the response (status class, `x-wasmesh-error` cause), observes the latency and
    /// writes the access log line if the request was sampled.
    pub fn finish<B>(self, state: &ProxyState, resp: &Response<B>) {
        self.record(state, resp.status().as_u16(), resp.headers());
    }

    fn record(self, state: &ProxyState, status: u16, headers: &HeaderMap) {
        let elapsed = self.started.elapsed();
        let cause = headers
            .get(crate::http::respond::ERROR_HEADER)
            .and_then(crate::http::respond::known_cause);
        let m = &state.metrics;
        let unknown;
        let outcomes = match &self.outcomes {
            Some(o) => o.as_ref(),
            None => {
                // Answered before the Service was known.
                unknown = Outcomes::new(self.direction, None, None, None);
                &unknown
            }
        };
        outcomes.count(m, class_index(status), cause);
        outcomes.latency(m).observe(elapsed);
        if let Some(start) = self.log {
            let name = |n: &Name| n.as_deref().map(str::to_string);
            state.access_log.send(Line::Http(HttpLine {
                time: access_log::rfc3339(start.time),
                direction: self.direction,
                client: self.client,
                method: start.method,
                authority: start.authority,
                path: start.path,
                protocol: start.protocol,
                status,
                error: cause,
                duration_us: elapsed.as_micros() as u64,
                upstream: self.upstream,
                service: name(&outcomes.service),
                route: name(&outcomes.route),
                retries: self.picks.saturating_sub(1),
                peer: name(&outcomes.peer),
                trace_id: start.trace_id,
            }));
        }
    }
}

/// One proxied TCP connection: counted open when made, closed with its bytes when dropped
/// (after [`TcpConn::done`], or early if the task ends first), and logged if sampled.
#[derive(Debug)]
pub struct TcpConn<'a> {
    state: &'a ProxyState,
    labels: ServiceLabels,
    client: SocketAddr,
    upstream: SocketAddr,
    peer: Name,
    started: Instant,
    time: Option<SystemTime>,
    moved: Transferred,
    /// The connection's span, when TCP spans are on (`WASMESH_TRACE_TCP`) and it is sampled.
    span: Option<crate::otel::Span>,
}

impl<'a> TcpConn<'a> {
    pub fn open(
        state: &'a ProxyState,
        direction: Direction,
        service: Name,
        client: SocketAddr,
        upstream: SocketAddr,
        peer: Name,
    ) -> Self {
        let labels = ServiceLabels { direction, service };
        state.metrics.tcp_opened.get_or_create(&labels).inc();
        let span = state
            .tracer
            .load()
            .as_ref()
            .filter(|t| t.config.tcp_spans)
            .map(|t| {
                let kind = match direction {
                    Direction::Outbound => opentelemetry::trace::SpanKind::Client,
                    Direction::Inbound => opentelemetry::trace::SpanKind::Server,
                };
                // No context travels with raw TCP: each connection starts a trace.
                t.start(kind, &HeaderMap::new())
            })
            .filter(crate::otel::Span::is_sampled);
        TcpConn {
            state,
            labels,
            client,
            upstream,
            peer,
            started: Instant::now(),
            time: state.access_log.sampled().then(SystemTime::now),
            moved: Transferred::default(),
            span,
        }
    }

    /// Ends the connection's span with what it carried (attributes as docs/observability.md
    /// lists them for TCP spans).
    fn end_span(&mut self) {
        let Some(mut s) = self.span.take() else {
            return;
        };
        let (client, upstream) = (self.client, self.upstream);
        let peer = match self.labels.direction {
            Direction::Outbound => upstream,
            Direction::Inbound => client,
        };
        let name: std::borrow::Cow<'static, str> = match &self.labels.service {
            Some(svc) => format!("TCP {svc}").into(),
            None => "TCP".into(),
        };
        s.name(name);
        s.set("network.transport", "tcp");
        if let Some(svc) = &self.labels.service {
            s.set("wasmesh.destination.service", svc.clone());
        }
        s.set("client.address", client.ip());
        s.set("client.port", i64::from(client.port()));
        s.set("server.address", upstream.ip());
        s.set("server.port", i64::from(upstream.port()));
        s.set("network.peer.address", peer.ip());
        s.set("network.peer.port", i64::from(peer.port()));
        if let Some(id) = &self.peer {
            s.set("wasmesh.peer.identity", id.clone());
        }
        s.set("wasmesh.sent_bytes", self.moved.sent as i64);
        s.set("wasmesh.received_bytes", self.moved.received as i64);
        s.end_connection(None);
    }

    /// The copy finished having moved this much.
    pub fn done(mut self, moved: Transferred) {
        self.moved = moved;
    }
}

impl Drop for TcpConn<'_> {
    fn drop(&mut self) {
        let m = &self.state.metrics;
        m.tcp_sent
            .get_or_create(&self.labels)
            .inc_by(self.moved.sent);
        m.tcp_received
            .get_or_create(&self.labels)
            .inc_by(self.moved.received);
        m.tcp_closed.get_or_create(&self.labels).inc();
        self.end_span();
        if let Some(time) = self.time {
            self.state.access_log.send(Line::Tcp(TcpLine {
                time: access_log::rfc3339(time),
                direction: self.labels.direction,
                client: self.client,
                upstream: self.upstream,
                service: self.labels.service.as_deref().map(str::to_string),
                peer: self.peer.as_deref().map(str::to_string),
                sent_bytes: self.moved.sent,
                received_bytes: self.moved.received,
                duration_us: self.started.elapsed().as_micros() as u64,
            }));
        }
    }
}

/// Reads the proxy's state when `/metrics` is scraped.
#[derive(Debug)]
struct StateCollector(Arc<ProxyState>);

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    // Counters are named without `_total` here; the encoder appends it.
    let name = name.strip_suffix("_total").unwrap_or(name);
    let c = ConstCounter::new(v);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A gauge's value from an unsigned counter (saturating).
fn gauge_value(v: &std::sync::atomic::AtomicU64) -> i64 {
    v.load(Ordering::Relaxed).try_into().unwrap_or(i64::MAX)
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let state = &self.0;
        for (name, help, v) in state.stats.counters() {
            counter(&mut encoder, name, help, v)?;
        }
        for (name, help, v) in state.mesh_stats.counters() {
            counter(&mut encoder, name, help, v)?;
        }
        {
            let mut family = encoder.encode_descriptor(
                "wasmesh_mtls_refused",
                "Mesh TLS handshakes refused, by reason",
                None,
                MetricType::Counter,
            )?;
            for (reason, v) in state.mesh_stats.refusals() {
                ConstCounter::new(v).encode(family.encode_family(&[("reason", reason)])?)?;
            }
        }
        gauge(
            &mut encoder,
            "wasmesh_mtls_certificate_expiry_seconds",
            "notAfter of the workload certificate in use (Unix time; 0: none yet)",
            gauge_value(&state.mesh_stats.certificate_expiry),
        )?;
        gauge(
            &mut encoder,
            "wasmesh_mtls_trust_bundle_roots",
            "CA roots in the trust bundle in use (2 while a CA rotation is under way; 0: none yet)",
            gauge_value(&state.mesh_stats.trust_bundle_roots),
        )?;
        gauge(
            &mut encoder,
            "wasmesh_mtls_trust_bundle_version",
            "Control's version of the trust bundle in use (0: none yet)",
            gauge_value(&state.mesh_stats.trust_bundle_version),
        )?;
        gauge(
            &mut encoder,
            "wasmesh_ready",
            "1 once the first table arrived (0 again while draining)",
            i64::from(state.is_ready()),
        )?;
        gauge(
            &mut encoder,
            "wasmesh_open_connections",
            "Proxied connections open now (both directions)",
            state.open_connections() as i64,
        )?;
        gauge(
            &mut encoder,
            "wasmesh_control_connected",
            "1 while the control stream is up",
            i64::from(state.control_connected.load(Ordering::Relaxed)),
        )?;
        {
            let now = state.control_state();
            let mut family = encoder.encode_descriptor(
                "wasmesh_control_state",
                "State of the control stream: 1 for the current state, 0 for the others",
                None,
                MetricType::Gauge,
            )?;
            for s in crate::state::ControlState::ALL {
                ConstGauge::new(i64::from(s == now))
                    .encode(family.encode_family(&[("state", s.as_str())])?)?;
            }
        }
        gauge(
            &mut encoder,
            "wasmesh_table_version",
            "Version of the table in use",
            state
                .version
                .load(Ordering::Relaxed)
                .try_into()
                .unwrap_or(i64::MAX),
        )?;
        if let Some(age) = state.table_age() {
            let g = ConstGauge::new(age.as_secs_f64());
            g.encode(encoder.encode_descriptor(
                "wasmesh_table_age_seconds",
                "Seconds since the last table update from control was applied",
                None,
                g.metric_type(),
            )?)?;
        }
        {
            let t = &state.trace_stats;
            let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            gauge(
                &mut encoder,
                "wasmesh_tracing_enabled",
                "1 while spans are exported",
                i64::from(state.tracer.load().is_some()),
            )?;
            counter(
                &mut encoder,
                "wasmesh_tracing_spans_total",
                "Spans recorded (sampled) and queued for export",
                g(&t.spans),
            )?;
            counter(
                &mut encoder,
                "wasmesh_tracing_spans_exported_total",
                "Spans the collector accepted",
                g(&t.exported),
            )?;
            counter(
                &mut encoder,
                "wasmesh_tracing_export_failures_total",
                "Export calls that failed or timed out",
                g(&t.export_failures),
            )?;
            let mut family = encoder.encode_descriptor(
                "wasmesh_tracing_spans_dropped",
                "Spans dropped instead of exported, by reason",
                None,
                MetricType::Counter,
            )?;
            for (reason, v) in [
                ("queue_full", g(&t.dropped_queue_full)),
                ("export_failed", g(&t.dropped_export_failed)),
            ] {
                ConstCounter::new(v).encode(family.encode_family(&[("reason", reason)])?)?;
            }
        }
        counter(
            &mut encoder,
            "wasmesh_access_log_lines_total",
            "Access log lines queued for writing (sampled requests and connections)",
            state.access_log.queued(),
        )?;
        counter(
            &mut encoder,
            "wasmesh_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind (traffic never waits)",
            state.access_log.dropped(),
        )?;
        if let Some(h) = state.filters.get().and_then(|f| f.host()) {
            encode_wasm(&mut encoder, &h.metrics().snapshot())?;
        }
        Ok(())
    }
}

/// The Wasm host's metrics: callbacks and events per plugin, and what filters defined.
fn encode_wasm(
    encoder: &mut DescriptorEncoder<'_>,
    snap: &wasmesh_wasm::metrics::Snapshot,
) -> Result<(), std::fmt::Error> {
    if !snap.calls.is_empty() {
        let mut family = encoder.encode_descriptor(
            "wasmesh_wasm_calls",
            "Guest callbacks run, per Wasm plugin",
            None,
            MetricType::Counter,
        )?;
        for (plugin, n) in &snap.calls {
            ConstCounter::new(*n)
                .encode(family.encode_family(&[("plugin", label(plugin).as_ref())])?)?;
        }
    }
    if !snap.events.is_empty() {
        let mut family = encoder.encode_descriptor(
            "wasmesh_wasm_events",
            "Wasm plugin lifecycle events and faults (trap, deadline, memory_limit, …), per plugin",
            None,
            MetricType::Counter,
        )?;
        for (plugin, event, n) in &snap.events {
            let plugin = label(plugin);
            ConstCounter::new(*n).encode(
                family.encode_family(&[("plugin", plugin.as_ref()), ("event", event.label())])?,
            )?;
        }
    }
    // Filters name their metrics; two that land on one Prometheus name keep the first.
    let mut seen = std::collections::HashSet::new();
    for d in &snap.defined {
        use wasmesh_wasm::MetricKind;
        let name = match d.kind {
            MetricKind::Counter => d.name.strip_suffix("_total").unwrap_or(&d.name),
            _ => d.name.as_str(),
        };
        if !seen.insert(name.to_string()) {
            continue;
        }
        let help = "Defined by a Wasm filter";
        match d.kind {
            MetricKind::Counter => counter(encoder, name, help, d.value.max(0) as u64)?,
            MetricKind::Gauge => gauge(encoder, name, help, d.value)?,
            MetricKind::Histogram => {
                let mut e = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
                e.encode_histogram::<NoLabelSet>(
                    d.sum as f64,
                    d.value.max(0) as u64,
                    &d.buckets,
                    None,
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wasm(wasmesh_wasm::metrics::Snapshot);

    impl Collector for Wasm {
        fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
            encode_wasm(&mut encoder, &self.0)
        }
    }

    #[test]
    fn wasm_metrics_are_encoded_as_openmetrics() {
        use wasmesh_wasm::{DefinedMetric, HostEvent, MetricKind};
        let defined = |name: &str, kind, value, sum, buckets| DefinedMetric {
            name: name.into(),
            kind,
            value,
            sum,
            buckets,
        };
        let mut r = Registry::default();
        r.register_collector(Box::new(Wasm(wasmesh_wasm::metrics::Snapshot {
            defined: vec![
                defined("wasmcustom_reqs_total", MetricKind::Counter, 2, 0, vec![]),
                defined("wasmcustom_hits", MetricKind::Counter, 1, 0, vec![]),
                defined("wasmcustom_inflight", MetricKind::Gauge, -1, 0, vec![]),
                defined(
                    "wasmcustom_len",
                    MetricKind::Histogram,
                    2,
                    12,
                    vec![(5.0, 1), (10.0, 1), (f64::INFINITY, 0)],
                ),
                // Another filter's metric of the same Prometheus name: the first is kept.
                defined("wasmcustom_reqs_total", MetricKind::Counter, 9, 0, vec![]),
            ],
            events: vec![("p".into(), HostEvent::Trap, 1)],
            calls: vec![("p".into(), 7)],
        })));
        let text = render(&r);
        for line in [
            "wasmesh_wasm_calls_total{plugin=\"p\"} 7\n",
            "wasmesh_wasm_events_total{plugin=\"p\",event=\"trap\"} 1\n",
            "# TYPE wasmcustom_reqs counter\n",
            "wasmcustom_reqs_total 2\n",
            "wasmcustom_hits_total 1\n",
            "wasmcustom_inflight -1\n",
            "wasmcustom_len_count 2\n",
            "wasmcustom_len_bucket{le=\"10.0\"} 2\n",
            "wasmcustom_len_bucket{le=\"+Inf\"} 2\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(!text.contains(" 9\n"), "{text}");
    }

    #[test]
    fn latency_buckets() {
        let l = Latency::default();
        l.observe(Duration::from_micros(300)); // ≤ 0.0005
        l.observe(Duration::from_micros(500)); // ≤ 0.0005 (bounds are inclusive)
        l.observe(Duration::from_millis(7)); // ≤ 0.01
        l.observe(Duration::from_secs(60)); // +Inf
        let counts: Vec<u64> =
            l.0.buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
        assert_eq!(counts[0], 2);
        assert_eq!(counts[4], 1);
        assert_eq!(counts[15], 1);
        assert_eq!(counts.iter().sum::<u64>(), 4);
        assert_eq!(l.0.sum_ns.load(Ordering::Relaxed), 60_007_800_000);
    }

    #[test]
    fn classes_and_labels() {
        assert_eq!(class(101), "1xx");
        assert_eq!(class(204), "2xx");
        assert_eq!(class(302), "3xx");
        assert_eq!(class(404), "4xx");
        assert_eq!(class(503), "5xx");
        assert_eq!(&*label("default/web"), "default/web");
        assert_eq!(&*label("a\"b\\c\nd"), "a_b_c_d");
    }

    #[test]
    fn the_registry_renders_labeled_families_and_the_state() {
        let state = ProxyState::new(crate::table::Locality::default());
        let web = Some(label("default/web"));
        let routed = Arc::new(Outcomes::new(
            Direction::Outbound,
            web.clone(),
            Some(label("default/r/0")),
            None,
        ));
        let exchange = |direction, outcomes: Option<Arc<Outcomes>>| Exchange {
            direction,
            started: Instant::now(),
            client: "127.0.0.1:1".parse().expect("addr"),
            outcomes,
            upstream: None,
            picks: 1,
            log: None,
        };
        let mut headers = HeaderMap::new();
        for _ in 0..3 {
            exchange(Direction::Outbound, Some(routed.clone())).record(&state, 200, &headers);
        }
        let peer = Arc::new(Outcomes::new(
            Direction::Inbound,
            None,
            None,
            Some(label("spiffe://cluster.local/ns/default/sa/client")),
        ));
        exchange(Direction::Inbound, Some(peer)).record(&state, 404, &headers);
        headers.insert(
            crate::http::respond::ERROR_HEADER,
            http::HeaderValue::from_static("timeout"),
        );
        exchange(Direction::Outbound, Some(routed)).record(&state, 504, &headers);
        exchange(Direction::Outbound, None).record(&state, 504, &headers);
        TcpConn::open(
            &state,
            Direction::Outbound,
            web,
            "127.0.0.1:1".parse().expect("addr"),
            "127.0.0.1:2".parse().expect("addr"),
            None,
        )
        .done(Transferred {
            sent: 10,
            received: 20,
        });
        let text = render(&registry(state));
        for line in [
            "wasmesh_http_responses_total{direction=\"outbound\",service=\"default/web\",route=\"default/r/0\",class=\"2xx\",cause=\"\",peer=\"\"} 3\n",
            "wasmesh_http_responses_total{direction=\"outbound\",service=\"default/web\",route=\"default/r/0\",class=\"5xx\",cause=\"timeout\",peer=\"\"} 1\n",
            "wasmesh_http_responses_total{direction=\"outbound\",service=\"\",route=\"\",class=\"5xx\",cause=\"timeout\",peer=\"\"} 1\n",
            "wasmesh_http_responses_total{direction=\"inbound\",service=\"\",route=\"\",class=\"4xx\",cause=\"\",peer=\"spiffe://cluster.local/ns/default/sa/client\"} 1\n",
            "wasmesh_http_request_duration_seconds_count{direction=\"outbound\",service=\"default/web\"} 4\n",
            "wasmesh_http_request_duration_seconds_bucket{le=\"+Inf\",direction=\"outbound\",service=\"default/web\"} 4\n",
            "wasmesh_http_request_duration_seconds_count{direction=\"inbound\",service=\"\"} 1\n",
            "wasmesh_tcp_connections_opened_total{direction=\"outbound\",service=\"default/web\"} 1\n",
            "wasmesh_tcp_connections_closed_total{direction=\"outbound\",service=\"default/web\"} 1\n",
            "wasmesh_tcp_sent_bytes_total{direction=\"outbound\",service=\"default/web\"} 10\n",
            "wasmesh_tcp_received_bytes_total{direction=\"outbound\",service=\"default/web\"} 20\n",
            "wasmesh_outbound_connections_total 0\n",
            "wasmesh_http_retries_total 0\n",
            "wasmesh_mtls_refused_total{reason=\"expired\"} 0\n",
            "wasmesh_control_state{state=\"connecting\"} 1\n",
            "wasmesh_ready 0\n",
            "wasmesh_access_log_dropped_total 0\n",
            "# EOF\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        // No table yet: no age.
        assert!(!text.contains("wasmesh_table_age_seconds"), "{text}");
    }
}
