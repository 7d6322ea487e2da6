//! OpenTelemetry traces of the HTTP requests the proxy carries.
//!
//! For each request the outbound side records a client span and the inbound side a server
//! span; the caller's context (W3C `traceparent`, or B3) is continued, or a trace is started,
//! and the next hop gets a `traceparent` whose parent is our span — the app's spans, both
//! sidecars' and the next service's form one trace.
//!
//! Recording costs little on the request path. An unsampled span is a few ids on the stack
//! (no allocation but the `traceparent` value the next hop needs). A sampled span is a
//! [`SpanRecord`]: static keys, values that are mostly static strings, shared names or numbers
//! (an address is kept as an address and only written out at export), pushed onto a bounded
//! [`SpanQueue`] when the request ends. A task takes the queue a batch at a time, writes each batch
//! straight into an OTLP protobuf request ([`encode`]; no intermediate message types) and
//! sends it over OTLP/gRPC or OTLP/HTTP ([`export`]). When the collector is slow or down the
//! queue fills and spans are dropped and counted: traffic never waits for the collector.
//!
//! - [`propagation`]: reading and writing the context headers;
//! - [`sampler`]: the specification's samplers (`OTEL_TRACES_SAMPLER`);
//! - [`config`]: what the environment (`OTEL_*`) and control (mesh-wide) say, merged;
//! - [`encode`]: spans into `ExportTraceServiceRequest` bytes;
//! - [`export`]: the queue, the batching task and the two transports.
//!
//! See `docs/observability.md`.

pub mod config;
pub mod encode;
pub mod export;
pub mod propagation;
pub mod sampler;

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use http::{HeaderMap, HeaderValue};
use opentelemetry::trace::{SpanId, SpanKind, TraceFlags, TraceId};
use tokio::sync::Notify;

pub use config::TraceConfig;
use propagation::{Format, Parent};
use sampler::Sampler;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct TraceStats {
    /// Spans recorded (sampled) and queued.
    pub spans: AtomicU64,
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full (the collector slow or down).
    pub dropped_queue_full: AtomicU64,
    /// Spans dropped because their batch could not be exported.
    pub dropped_export_failed: AtomicU64,
    /// Export calls that failed or timed out.
    pub export_failures: AtomicU64,
}

/// The finished spans waiting for export: a buffer behind a mutex held for one push, bounded
/// (`OTEL_BSP_MAX_QUEUE_SIZE`; beyond it spans are dropped and counted). The export task is
/// woken only when a batch is full, or by its timer — not once per span, which cost a task
/// wake-up and poll per span with a channel.
#[derive(Debug)]
pub struct SpanQueue {
    spans: Mutex<Vec<SpanRecord>>,
    capacity: usize,
    batch: usize,
    ready: Notify,
    closed: AtomicBool,
}

impl SpanQueue {
    pub fn new(capacity: usize, batch: usize) -> SpanQueue {
        let capacity = capacity.max(1);
        let batch = batch.clamp(1, capacity);
        SpanQueue {
            spans: Mutex::new(Vec::with_capacity(batch)),
            capacity,
            batch,
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Queues a span; false (and the span dropped) when the queue is full.
    fn push(&self, record: SpanRecord) -> bool {
        let mut q = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        if q.len() >= self.capacity {
            return false;
        }
        q.push(record);
        let full = q.len() == self.batch;
        drop(q);
        if full {
            self.ready.notify_one();
        }
        true
    }

    pub fn len(&self) -> usize {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Moves up to one batch, oldest first, into `out` (which is empty).
    pub fn take(&self, out: &mut Vec<SpanRecord>) {
        let mut q = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        if q.len() <= self.batch {
            // Swapped, not copied: `out`'s allocation becomes the queue's next buffer.
            std::mem::swap(&mut *q, out);
        } else {
            out.extend(q.drain(..self.batch));
        }
    }

    /// Waits until a batch is full or `deadline` passes (or the queue is closed).
    pub async fn wait(&self, deadline: tokio::time::Instant) {
        while self.len() < self.batch && !self.is_closed() {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = self.ready.notified() => {}
            }
        }
    }

    /// No more spans will come (the tracer was replaced); the task drains and ends.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Starts spans and queues the finished ones for export. One per configuration; a new
/// configuration (from control) starts a new one, and the old one's task drains and ends.
#[derive(Debug)]
pub struct Tracer {
    sampler: Sampler,
    queue: Arc<SpanQueue>,
    stats: Arc<TraceStats>,
    /// What it was built from (to tell whether control's update changes anything).
    pub config: TraceConfig,
}

impl Tracer {
    /// Starts a span for a request with these headers: a child of the caller's span if the
    /// headers carry one, else the root of a new trace.
    pub fn start(self: &Arc<Self>, kind: SpanKind, headers: &HeaderMap) -> Span {
        let parent = propagation::extract(headers);
        let (trace_id, parent_span) = match &parent {
            Some(p) => (p.trace_id, Some(p.span_id)),
            None => (TraceId::from(rand::random::<u128>().max(1)), None),
        };
        let sampled = self
            .sampler
            .sample(trace_id, parent.as_ref().and_then(|p| p.sampled));
        let span_id = SpanId::from(rand::random::<u64>().max(1));
        let parent_format = parent.as_ref().map(|p: &Parent| p.format);
        let record = sampled.then(|| {
            Box::new(Recording {
                tracer: self.clone(),
                record: SpanRecord {
                    trace_id,
                    span_id,
                    parent_span,
                    // Passed through as the caller wrote it; the collector reads it.
                    trace_state: headers.get(&propagation::TRACESTATE).cloned(),
                    kind: kind.clone(),
                    start: SystemTime::now(),
                    end: SystemTime::UNIX_EPOCH,
                    name: Cow::Borrowed("HTTP"),
                    attributes: Vec::with_capacity(16),
                    events: Vec::new(),
                    status: Status::Unset,
                },
            })
        });
        Span {
            trace_id,
            span_id,
            parent_format,
            record,
        }
    }

    pub fn stats(&self) -> &Arc<TraceStats> {
        &self.stats
    }

    fn queue(&self, record: SpanRecord) {
        self.stats.spans.fetch_add(1, Ordering::Relaxed);
        if !self.queue.push(record) {
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // The last span holding it has ended: nothing more will be queued.
        self.queue.close();
    }
}

/// An attribute's value, kept in the cheapest form the request path has it in; written out as
/// an OTLP `AnyValue` at export.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(Cow<'static, str>),
    Shared(Arc<str>),
    Int(i64),
    /// Written as its text form (`network.peer.address`, `client.address`).
    Ip(IpAddr),
}

impl From<&'static str> for AttrValue {
    fn from(s: &'static str) -> Self {
        AttrValue::Str(Cow::Borrowed(s))
    }
}
impl From<String> for AttrValue {
    fn from(s: String) -> Self {
        AttrValue::Str(Cow::Owned(s))
    }
}
impl From<Arc<str>> for AttrValue {
    fn from(s: Arc<str>) -> Self {
        AttrValue::Shared(s)
    }
}
impl From<i64> for AttrValue {
    fn from(n: i64) -> Self {
        AttrValue::Int(n)
    }
}
impl From<IpAddr> for AttrValue {
    fn from(ip: IpAddr) -> Self {
        AttrValue::Ip(ip)
    }
}

/// A span's status (OTLP `Status`): unset, or an error with a description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Unset,
    Error(&'static str),
}

/// A timed event inside a span (e.g. a Wasm filter's verdict).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: &'static str,
    pub time: SystemTime,
    pub attributes: Vec<(&'static str, AttrValue)>,
}

/// A sampled span as it is queued for export.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanRecord {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The caller's span (a remote parent), if the request carried one.
    pub parent_span: Option<SpanId>,
    pub trace_state: Option<HeaderValue>,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub name: Cow<'static, str>,
    pub attributes: Vec<(&'static str, AttrValue)>,
    pub events: Vec<Event>,
    pub status: Status,
}

#[derive(Debug)]
struct Recording {
    tracer: Arc<Tracer>,
    record: SpanRecord,
}

/// One request's span while it is in flight. Ended with [`Span::end`]; dropped without it
/// (the request future was cancelled) a sampled span is still recorded, with no status code.
#[derive(Debug)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    parent_format: Option<Format>,
    /// Some while a sampled span records (boxed: an unsampled span stays a few words).
    record: Option<Box<Recording>>,
}

impl Span {
    pub fn is_sampled(&self) -> bool {
        self.record.is_some()
    }

    /// Sets an attribute (a no-op when the span is not recorded).
    pub fn set(&mut self, key: &'static str, value: impl Into<AttrValue>) {
        if let Some(r) = self.record.as_mut() {
            r.record.attributes.push((key, value.into()));
        }
    }

    /// Sets an attribute, replacing an earlier value of the same key.
    pub fn put(&mut self, key: &'static str, value: impl Into<AttrValue>) {
        let Some(r) = self.record.as_mut() else {
            return;
        };
        let value = value.into();
        match r.record.attributes.iter_mut().find(|(k, _)| *k == key) {
            Some(kv) => kv.1 = value,
            None => r.record.attributes.push((key, value)),
        }
    }

    /// Sets an attribute whose value is costly to build only when the span is recorded.
    pub fn set_with<V: Into<AttrValue>>(&mut self, key: &'static str, value: impl FnOnce() -> V) {
        if let Some(r) = self.record.as_mut() {
            r.record.attributes.push((key, value().into()));
        }
    }

    /// The span's name (semantic conventions: `{method} {http.route}`, or `{method}`).
    pub fn name(&mut self, name: impl Into<Cow<'static, str>>) {
        if let Some(r) = self.record.as_mut() {
            r.record.name = name.into();
        }
    }

    /// Adds an event (e.g. a Wasm filter's outcome).
    pub fn event(&mut self, name: &'static str, attributes: Vec<(&'static str, AttrValue)>) {
        if let Some(r) = self.record.as_mut() {
            r.record.events.push(Event {
                name,
                time: SystemTime::now(),
                attributes,
            });
        }
    }

    /// Writes the context the next hop continues (our span as its parent) into `headers`.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let flags = if self.is_sampled() {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        propagation::inject(
            headers,
            self.trace_id,
            self.span_id,
            flags,
            self.parent_format,
        );
    }

    /// The W3C trace id (for access logs).
    pub fn trace_id_hex(&self) -> String {
        let mut hex = [0u8; 32];
        propagation::hex_into(&mut hex, &self.trace_id.to_bytes());
        String::from_utf8_lossy(&hex).into_owned()
    }

    /// Ends the span with the response's status code (None: no response, e.g. a reset);
    /// `error` names what went wrong when the proxy answered itself.
    pub fn end(mut self, status: Option<u16>, error: Option<&'static str>) {
        let Some(mut r) = self.record.take() else {
            return;
        };
        let record = &mut r.record;
        record.status = match status {
            Some(s) => {
                record
                    .attributes
                    .push(("http.response.status_code", AttrValue::Int(i64::from(s))));
                // Client spans: 4xx and 5xx are errors; server spans: only 5xx.
                let limit = if record.kind == SpanKind::Client {
                    400
                } else {
                    500
                };
                if s >= limit {
                    Status::Error("")
                } else {
                    Status::Unset
                }
            }
            None => Status::Error("no response"),
        };
        if let Some(e) = error {
            record.attributes.push(("error.type", AttrValue::from(e)));
            record.status = Status::Error(e);
        }
        r.finish();
    }
}

impl Span {
    /// Ends a TCP connection's span (no HTTP status): `error` names what failed, if anything.
    pub fn end_connection(mut self, error: Option<&'static str>) {
        let Some(mut r) = self.record.take() else {
            return;
        };
        if let Some(e) = error {
            r.record.attributes.push(("error.type", AttrValue::from(e)));
            r.record.status = Status::Error(e);
        }
        r.finish();
    }
}

impl Recording {
    fn finish(self: Box<Self>) {
        let Recording { tracer, mut record } = *self;
        record.end = SystemTime::now();
        tracer.queue(record);
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.record.status = Status::Error("cancelled");
            r.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer(sampler: Sampler) -> (Arc<Tracer>, Arc<SpanQueue>) {
        let q = Arc::new(SpanQueue::new(4, 4));
        (
            Arc::new(Tracer {
                sampler,
                queue: q.clone(),
                stats: Arc::default(),
                config: TraceConfig::default(),
            }),
            q,
        )
    }

    fn next(q: &SpanQueue) -> Option<SpanRecord> {
        let mut out = Vec::new();
        q.take(&mut out);
        let first = out.first().cloned();
        // Put the rest back, in order, for the next call.
        for r in out.into_iter().skip(1) {
            q.push(r);
        }
        first
    }

    #[test]
    fn a_span_continues_the_callers_trace_and_names_itself_the_next_parent() {
        let (t, rx) = tracer(Sampler::default());
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .expect("value"),
        );
        let mut span = t.start(SpanKind::Client, &h);
        span.set("http.request.method", "GET");
        span.inject(&mut h);
        let sent = propagation::parse_traceparent(h["traceparent"].to_str().expect("ascii"))
            .expect("valid");
        assert_eq!(
            sent.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sent.span_id, span.span_id);
        span.end(Some(503), None);
        let d = next(&rx).expect("queued");
        assert_eq!(
            d.parent_span.map(|p| p.to_string()).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_eq!(d.status, Status::Error(""));
        assert!(
            d.attributes
                .iter()
                .any(|(k, v)| *k == "http.response.status_code" && *v == AttrValue::Int(503))
        );
        assert!(d.end >= d.start);
    }

    #[test]
    fn an_unsampled_caller_is_respected_and_a_full_queue_drops_and_counts() {
        let (t, rx) = tracer(Sampler::default());
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
                .parse()
                .expect("value"),
        );
        let span = t.start(SpanKind::Server, &h);
        assert!(!span.is_sampled());
        let mut out = HeaderMap::new();
        span.inject(&mut out);
        assert_eq!(
            out["traceparent"].to_str().expect("ascii"),
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-00", span.span_id)
        );
        assert_eq!(span.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        span.end(Some(200), None);
        assert!(next(&rx).is_none());
        // A new trace each; the queue holds 4.
        for _ in 0..6 {
            t.start(SpanKind::Server, &HeaderMap::new())
                .end(Some(200), None);
        }
        assert_eq!(t.stats.spans.load(Ordering::Relaxed), 6);
        assert_eq!(t.stats.dropped_queue_full.load(Ordering::Relaxed), 2);
        let d = next(&rx).expect("queued");
        assert_eq!(d.parent_span, None);
        // Dropping the last handle on the tracer closes its queue (its task drains and ends).
        assert!(!rx.is_closed());
        drop(t);
        assert!(rx.is_closed());
    }
}
