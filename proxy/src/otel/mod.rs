//! OpenTelemetry traces of the HTTP requests the proxy carries.
//!
//! For each request the outbound side records a client span and the inbound side a server
//! span; the caller's context (W3C `traceparent`, or B3) is continued, or a trace is started,
//! and the next hop gets a `traceparent` whose parent is our span — the app's spans, both
//! sidecars' and the next service's form one trace.
//!
//! Recording costs little on the request path. An unsampled span is a few ids on the stack
//! (no allocation but the `traceparent` value the next hop needs). A sampled span is written
//! as OTLP protobuf while the request runs ([`encode`]): ids and start time when it starts,
//! each attribute and event where it is set (strings copied, numbers and addresses written
//! out there, nothing kept as a value), name, end time and status when it ends; then its bytes
//! are copied into a bounded [`SpanQueue`] under a lock held for that copy. The export thread
//! takes a batch's bytes and sends them behind the request's envelope over OTLP/gRPC or
//! OTLP/HTTP ([`export`]). When the collector is slow or down the queue fills and spans are
//! dropped and counted: traffic never waits for the collector.
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
mod ids;
pub mod propagation;
pub mod sampler;

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::VecDeque;
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

/// The finished spans waiting for export, as protobuf: runs of up to one batch of spans
/// ([`Chunk`]s) behind a mutex held for one span's copy, bounded (`OTEL_BSP_MAX_QUEUE_SIZE`;
/// beyond it spans are dropped and counted). The export task is woken only when a batch is
/// full, or by its timer — not once per span, which cost a task wake-up and poll per span
/// with a channel. A chunk's buffer goes back to the queue once its request is written, so
/// once the buffers have grown a span costs the queue no allocation.
#[derive(Debug)]
pub struct SpanQueue {
    pending: Mutex<Pending>,
    capacity: usize,
    batch: usize,
    ready: Notify,
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct Pending {
    chunks: VecDeque<Chunk>,
    /// Spans in `chunks`.
    spans: usize,
    /// Emptied buffers of exported chunks, for the next ones.
    spare: Vec<Vec<u8>>,
}

/// Up to one batch of finished spans: `ScopeSpans.spans` entries, oldest first.
#[derive(Debug, Default)]
pub struct Chunk {
    pub bytes: Vec<u8>,
    pub spans: usize,
}

/// Emptied chunk buffers kept for reuse (beside the one being filled).
const SPARE_CHUNKS: usize = 2;

impl SpanQueue {
    pub fn new(capacity: usize, batch: usize) -> SpanQueue {
        let capacity = capacity.max(1);
        let batch = batch.clamp(1, capacity);
        SpanQueue {
            pending: Mutex::new(Pending::default()),
            capacity,
            batch,
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Queues a finished span's bytes; false (and the span dropped) when the queue is full.
    fn push(&self, span: &[u8]) -> bool {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if p.spans >= self.capacity {
            return false;
        }
        let Pending { chunks, spare, .. } = &mut *p;
        if chunks.back().is_none_or(|c| c.spans >= self.batch) {
            chunks.push_back(Chunk {
                bytes: spare.pop().unwrap_or_default(),
                spans: 0,
            });
        }
        let Some(chunk) = chunks.back_mut() else {
            return false;
        };
        encode::frame_span(&mut chunk.bytes, span);
        chunk.spans += 1;
        let full = chunk.spans == self.batch;
        p.spans += 1;
        drop(p);
        if full {
            self.ready.notify_one();
        }
        true
    }

    /// Spans waiting.
    pub fn len(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .spans
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The oldest spans, up to one batch.
    pub fn take(&self) -> Option<Chunk> {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let chunk = p.chunks.pop_front()?;
        p.spans -= chunk.spans;
        Some(chunk)
    }

    /// Gives a taken chunk's buffer back once its bytes are written out.
    pub fn recycle(&self, mut bytes: Vec<u8>) {
        bytes.clear();
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if p.spare.len() < SPARE_CHUNKS {
            p.spare.push(bytes);
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
        let propagation::Incoming {
            parent,
            tracestate: trace_state,
            stray_tracestate,
        } = propagation::extract_with_state(headers);
        let (trace_id, parent_span) = match &parent {
            Some(p) => (p.trace_id, Some(p.span_id)),
            None => (ids::trace_id(), None),
        };
        let sampled = self
            .sampler
            .sample(trace_id, parent.as_ref().and_then(|p| p.sampled));
        let span_id = ids::span_id();
        let parent_format = parent.as_ref().map(|p: &Parent| p.format);
        let record = sampled.then(|| {
            let mut bytes = span_buffer();
            encode::span_start(
                &mut bytes,
                trace_id,
                span_id,
                parent_span,
                // Passed through as the caller wrote it; the collector reads it.
                trace_state.map(HeaderValue::as_bytes),
                &kind,
                SystemTime::now(),
            );
            Box::new(Recording {
                tracer: self.clone(),
                bytes,
                client: kind == SpanKind::Client,
                remote_parent: parent_span.is_some(),
                name: Cow::Borrowed("HTTP"),
                route: None,
                replaceable: [("", 0, 0); REPLACEABLE],
                replaceable_len: 0,
            })
        });
        Span {
            trace_id,
            span_id,
            parent_format,
            stray_tracestate,
            record,
        }
    }

    pub fn stats(&self) -> &Arc<TraceStats> {
        &self.stats
    }

    fn queue(&self, span: &[u8]) {
        self.stats.spans.fetch_add(1, Ordering::Relaxed);
        if !self.queue.push(span) {
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

/// What a span's bytes are allocated with: room for the ids, a dozen attributes and the end.
const SPAN_CAPACITY: usize = 512;

/// How many emptied span buffers a thread keeps for its next spans.
const SPARE_SPAN_BUFFERS: usize = 64;

thread_local! {
    /// The buffers of the spans this thread finished, for the next ones it starts: a sampled
    /// span's bytes cost no allocation once the worker has recorded a few, and the buffer
    /// is one the core wrote a moment ago.
    static SPAN_BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer for a span's bytes: this thread's last spare, else a new one.
fn span_buffer() -> Vec<u8> {
    SPAN_BUFFERS
        .try_with(|b| b.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| Vec::with_capacity(SPAN_CAPACITY))
}

/// Keeps a finished span's buffer for this thread's next span (an outsized one, grown by
/// many events, is freed; so is any beyond [`SPARE_SPAN_BUFFERS`]).
fn spare_span_buffer(mut bytes: Vec<u8>) {
    if bytes.capacity() > 4 * SPAN_CAPACITY {
        return;
    }
    bytes.clear();
    // A thread being torn down has no pool left: the buffer is freed.
    let _ = SPAN_BUFFERS.try_with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < SPARE_SPAN_BUFFERS {
            b.push(bytes);
        }
    });
}

/// How many attributes a span can replace ([`Span::put`]: the endpoint of each try).
const REPLACEABLE: usize = 6;

/// An attribute's value, as the request path has it; written out where it is set.
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

/// Attributes written once, as a span's protobuf, and copied whole into each span that
/// carries them: those a connection, a Service port or an endpoint fixes, the same for every
/// request it carries. One copy costs less than writing each attribute per request — an
/// address as text, a name made of parts (docs/benchmarks.md, "Session 19").
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Attributes(Vec<u8>);

impl Attributes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key = value`.
    pub fn with(mut self, key: &'static str, value: impl Into<AttrValue>) -> Self {
        encode::key_value(&mut self.0, encode::SPAN_ATTRIBUTE, key, &value.into());
        self
    }

    /// Adds a string attribute, the concatenation of `parts`.
    pub fn with_concat(mut self, key: &'static str, parts: &[&str]) -> Self {
        encode::key_value_concat(&mut self.0, encode::SPAN_ATTRIBUTE, key, parts);
        self
    }
}

/// A span's status (OTLP `Status`): unset, or an error with a description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Unset,
    Error(&'static str),
}

/// A sampled span being recorded.
#[derive(Debug)]
struct Recording {
    tracer: Arc<Tracer>,
    /// The `Span` message so far: [`encode::span_start`]'s fields, then each attribute and
    /// event as it was set.
    bytes: Vec<u8>,
    client: bool,
    remote_parent: bool,
    /// Written at the end: `name`, or `name route`.
    name: Cow<'static, str>,
    route: Option<Arc<str>>,
    /// The attributes [`Span::put`] wrote, and where in `bytes`: key, start, end.
    replaceable: [(&'static str, u32, u32); REPLACEABLE],
    replaceable_len: usize,
}

impl Recording {
    fn attribute(&mut self, key: &'static str, value: &AttrValue) {
        encode::key_value(&mut self.bytes, encode::SPAN_ATTRIBUTE, key, value);
    }

    /// Writes what `write` writes (one attribute, or a block of them) under `key`, first
    /// taking out what an earlier replaceable write under `key` wrote.
    fn replace(&mut self, key: &'static str, write: impl FnOnce(&mut Vec<u8>)) {
        let n = self.replaceable_len;
        if let Some(i) = self.replaceable[..n].iter().position(|r| r.0 == key) {
            let (_, start, end) = self.replaceable[i];
            self.bytes.drain(start as usize..end as usize);
            for r in &mut self.replaceable[..n] {
                if r.1 > start {
                    r.1 -= end - start;
                    r.2 -= end - start;
                }
            }
            self.replaceable[i] = self.replaceable[n - 1];
            self.replaceable_len -= 1;
        }
        let start = self.bytes.len() as u32;
        write(&mut self.bytes);
        if self.replaceable_len < REPLACEABLE {
            self.replaceable[self.replaceable_len] = (key, start, self.bytes.len() as u32);
            self.replaceable_len += 1;
        } else {
            debug_assert!(false, "more than {REPLACEABLE} replaceable attributes");
        }
    }

    /// Writes the span's last fields and queues it.
    fn finish(self: Box<Self>, status: Status) {
        let Recording {
            tracer,
            mut bytes,
            remote_parent,
            name,
            route,
            ..
        } = *self;
        encode::span_end(
            &mut bytes,
            &name,
            route.as_deref(),
            SystemTime::now(),
            status,
            remote_parent,
        );
        tracer.queue(&bytes);
        spare_span_buffer(bytes);
    }
}

/// One request's span while it is in flight. Ended with [`Span::end`]; dropped without it
/// (the request future was cancelled) a sampled span is still recorded, with no status code.
#[derive(Debug)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    parent_format: Option<Format>,
    /// The request's `tracestate` had no valid `traceparent` beside it: [`Span::inject`]
    /// removes it (W3C: such a `tracestate` is invalid and must be discarded).
    stray_tracestate: bool,
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
            r.attribute(key, &value.into());
        }
    }

    /// Sets a string attribute from a borrowed value, copied into the span.
    pub fn set_str(&mut self, key: &'static str, value: &str) {
        self.set_concat(key, &[value]);
    }

    /// Sets a string attribute to the concatenation of `parts` (no `String` is built).
    pub fn set_concat(&mut self, key: &'static str, parts: &[&str]) {
        if let Some(r) = self.record.as_mut() {
            encode::key_value_concat(&mut r.bytes, encode::SPAN_ATTRIBUTE, key, parts);
        }
    }

    /// Sets an attribute, replacing the value an earlier `put` gave the same key (the
    /// endpoint of a retried request's last try).
    pub fn put(&mut self, key: &'static str, value: impl Into<AttrValue>) {
        if let Some(r) = self.record.as_mut() {
            let value = value.into();
            r.replace(key, |b| {
                encode::key_value(b, encode::SPAN_ATTRIBUTE, key, &value)
            });
        }
    }

    /// Takes out what an earlier `put` or `put_all` wrote under `key` (the previous try's
    /// peer identity, when this try's endpoint has none).
    pub fn unput(&mut self, key: &'static str) {
        if let Some(r) = self.record.as_mut() {
            r.replace(key, |_| {});
        }
    }

    /// Copies in a block of attributes made once ([`Attributes`]).
    pub fn set_all(&mut self, attributes: &Attributes) {
        if let Some(r) = self.record.as_mut() {
            r.bytes.extend_from_slice(&attributes.0);
        }
    }

    /// Copies in a block of attributes made once, replacing the block an earlier `put_all`
    /// gave under the same `group` (the endpoint of a retried request's last try).
    pub fn put_all(&mut self, group: &'static str, attributes: &Attributes) {
        if let Some(r) = self.record.as_mut() {
            r.replace(group, |b| b.extend_from_slice(&attributes.0));
        }
    }

    /// The span's name (semantic conventions: `{method}`).
    pub fn name(&mut self, name: impl Into<Cow<'static, str>>) {
        if let Some(r) = self.record.as_mut() {
            r.name = name.into();
            r.route = None;
        }
    }

    /// The span's name when a route matched: `{method} {http.route}`.
    pub fn name_with_route(&mut self, method: &'static str, route: &Arc<str>) {
        if let Some(r) = self.record.as_mut() {
            r.name = Cow::Borrowed(method);
            r.route = Some(route.clone());
        }
    }

    /// Adds an event (e.g. a Wasm filter's outcome).
    pub fn event(&mut self, name: &'static str, attributes: &[(&'static str, AttrValue)]) {
        if let Some(r) = self.record.as_mut() {
            encode::event(&mut r.bytes, name, SystemTime::now(), attributes);
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
        if self.stray_tracestate {
            headers.remove(&propagation::TRACESTATE);
        }
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
        let mut outcome = match status {
            Some(s) => {
                r.attribute("http.response.status_code", &AttrValue::Int(i64::from(s)));
                // Client spans: 4xx and 5xx are errors; server spans: only 5xx.
                let limit = if r.client { 400 } else { 500 };
                if s >= limit {
                    Status::Error("")
                } else {
                    Status::Unset
                }
            }
            None => Status::Error("no response"),
        };
        if let Some(e) = error {
            r.attribute("error.type", &AttrValue::from(e));
            outcome = Status::Error(e);
        }
        r.finish(outcome);
    }

    /// Ends a TCP connection's span (no HTTP status): `error` names what failed, if anything.
    pub fn end_connection(mut self, error: Option<&'static str>) {
        let Some(mut r) = self.record.take() else {
            return;
        };
        let outcome = match error {
            Some(e) => {
                r.attribute("error.type", &AttrValue::from(e));
                Status::Error(e)
            }
            None => Status::Unset,
        };
        r.finish(outcome);
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(r) = self.record.take() {
            r.finish(Status::Error("cancelled"));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::Span as ProtoSpan;
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
    use prost::Message as _;

    use super::*;

    pub(crate) fn tracer(sampler: Sampler) -> (Arc<Tracer>, Arc<SpanQueue>) {
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

    /// The spans queued, as a collector decodes them.
    pub(crate) fn queued(q: &SpanQueue) -> Vec<ProtoSpan> {
        let enc = encode::Encoder::new(&[], "test", "0");
        let mut spans = Vec::new();
        while let Some(chunk) = q.take() {
            let req = ExportTraceServiceRequest::decode(enc.request(&chunk.bytes, false))
                .expect("decodes");
            let got: Vec<ProtoSpan> = req.resource_spans[0].scope_spans[0].spans.clone();
            assert_eq!(got.len(), chunk.spans);
            spans.extend(got);
            q.recycle(chunk.bytes);
        }
        spans
    }

    pub(crate) fn attr(s: &ProtoSpan, key: &str) -> Option<Value> {
        let found: Vec<_> = s.attributes.iter().filter(|kv| kv.key == key).collect();
        assert!(found.len() <= 1, "{key} written {} times", found.len());
        found
            .first()
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.clone())
    }

    /// A request whose caller did not sample its span.
    pub(crate) fn unsampled_caller() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
                .parse()
                .expect("value"),
        );
        h
    }

    pub(crate) fn text(v: &str) -> Option<Value> {
        Some(Value::StringValue(v.into()))
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
        h.insert("tracestate", "vendor=abc".parse().expect("value"));
        let mut span = t.start(SpanKind::Client, &h);
        span.set("http.request.method", "GET");
        span.set_str("url.path", "/orders/42");
        span.set_concat("server.address", &["backend", ".", "demo", ".svc"]);
        span.name_with_route("GET", &Arc::from("orders"));
        span.inject(&mut h);
        let sent = propagation::parse_traceparent(h["traceparent"].to_str().expect("ascii"))
            .expect("valid");
        assert_eq!(
            sent.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sent.span_id, span.span_id);
        let id = span.span_id;
        span.end(Some(503), None);
        let spans = queued(&rx);
        let d = &spans[0];
        assert_eq!(d.trace_id, sent.trace_id.to_bytes());
        assert_eq!(d.span_id, id.to_bytes());
        assert_eq!(d.parent_span_id, 0x00f0_67aa_0ba9_02b7u64.to_be_bytes());
        assert_eq!(d.trace_state, "vendor=abc");
        assert_eq!(d.name, "GET orders");
        // A client span: 4xx and 5xx are errors.
        assert_eq!(
            d.status.as_ref().map(|s| s.code),
            Some(StatusCode::Error as i32)
        );
        assert_eq!(
            attr(d, "http.response.status_code"),
            Some(Value::IntValue(503))
        );
        assert_eq!(attr(d, "url.path"), text("/orders/42"));
        assert_eq!(attr(d, "server.address"), text("backend.demo.svc"));
        assert_eq!(attr(d, "http.request.method"), text("GET"));
        assert!(d.end_time_unix_nano >= d.start_time_unix_nano);
        assert!(d.start_time_unix_nano > 0);
        // Sampled, remote parent.
        assert_eq!(d.flags, 0x301);
    }

    #[test]
    fn a_tracestate_without_a_valid_traceparent_is_neither_recorded_nor_forwarded() {
        let (t, rx) = tracer(Sampler::AlwaysOn);
        // Alone, beside a malformed `traceparent`, and beside B3: each starts or continues a
        // trace that the state does not belong to.
        for extra in [
            None,
            Some(("traceparent", "00-not-a-valid-context-01")),
            Some(("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")),
        ] {
            let mut h = HeaderMap::new();
            h.insert("tracestate", "vendor=abc".parse().expect("value"));
            if let Some((k, v)) = extra {
                h.insert(k, v.parse().expect("value"));
            }
            let span = t.start(SpanKind::Client, &h);
            span.inject(&mut h);
            assert!(h.get("tracestate").is_none(), "{extra:?}: forwarded");
            assert!(
                h.get("traceparent").is_some(),
                "{extra:?}: our context written"
            );
            span.end(Some(200), None);
            let spans = queued(&rx);
            assert_eq!(spans[0].trace_state, "", "{extra:?}: recorded");
        }
        // Beside a valid `traceparent` it passes through untouched.
        let mut h = unsampled_caller();
        h.insert("tracestate", "vendor=abc".parse().expect("value"));
        let span = t.start(SpanKind::Client, &h);
        span.inject(&mut h);
        assert_eq!(h["tracestate"], "vendor=abc");
    }

    #[test]
    fn a_span_started_after_another_ended_on_the_thread_reuses_its_buffer_and_none_of_its_bytes() {
        let (t, rx) = tracer(Sampler::AlwaysOn);
        let mut first = t.start(SpanKind::Client, &HeaderMap::new());
        first.set_str("url.path", "/first/a/rather/long/path");
        first.set("server.port", 8080i64);
        first.name("POST");
        let spares = || SPAN_BUFFERS.with(|b| b.borrow().len());
        let before = spares();
        first.end(Some(200), None);
        assert_eq!(spares(), before + 1, "the first span's buffer kept");
        let mut second = t.start(SpanKind::Server, &HeaderMap::new());
        assert_eq!(spares(), before, "and taken by the second");
        second.set_str("url.path", "/b");
        second.name("GET");
        second.end(Some(404), None);
        let spans = queued(&rx);
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].name, "POST");
        assert_eq!(
            attr(&spans[0], "url.path"),
            text("/first/a/rather/long/path")
        );
        assert_eq!(spans[1].name, "GET");
        assert_eq!(attr(&spans[1], "url.path"), text("/b"));
        assert_eq!(attr(&spans[1], "server.port"), None);
        assert_eq!(
            attr(&spans[1], "http.response.status_code"),
            Some(Value::IntValue(404))
        );
        assert_ne!(spans[0].span_id, spans[1].span_id);
    }

    #[test]
    fn a_retry_replaces_the_endpoint_attributes_and_keeps_the_others() {
        let (t, rx) = tracer(Sampler::AlwaysOn);
        let mut span = t.start(SpanKind::Client, &HeaderMap::new());
        span.set("http.request.method", "POST");
        let first: IpAddr = "10.244.0.5".parse().expect("ip");
        let second: IpAddr = "10.244.0.6".parse().expect("ip");
        span.put("network.peer.address", first);
        span.put("network.peer.port", 8080i64);
        span.put("wasmesh.endpoint.pod", Arc::<str>::from("backend-a"));
        span.set("server.port", 80i64);
        // The second try, on another endpoint, a pod with a longer name.
        span.put("network.peer.address", second);
        span.put("network.peer.port", 8081i64);
        span.put(
            "wasmesh.endpoint.pod",
            Arc::<str>::from("backend-bbbbbbbbbb"),
        );
        span.put("http.request.resend_count", 1i64);
        span.name("POST");
        span.end(Some(200), None);
        let spans = queued(&rx);
        let d = &spans[0];
        assert_eq!(attr(d, "network.peer.address"), text("10.244.0.6"));
        assert_eq!(attr(d, "network.peer.port"), Some(Value::IntValue(8081)));
        assert_eq!(attr(d, "wasmesh.endpoint.pod"), text("backend-bbbbbbbbbb"));
        assert_eq!(
            attr(d, "http.request.resend_count"),
            Some(Value::IntValue(1))
        );
        assert_eq!(attr(d, "http.request.method"), text("POST"));
        assert_eq!(attr(d, "server.port"), Some(Value::IntValue(80)));
        assert_eq!(
            attr(d, "http.response.status_code"),
            Some(Value::IntValue(200))
        );
        assert_eq!(d.attributes.len(), 7);
        assert_eq!(d.name, "POST");
        assert!(d.status.is_none(), "2xx leaves the status unset");
        // A root span: no parent, remoteness known and false.
        assert!(d.parent_span_id.is_empty());
        assert_eq!(d.flags, 0x101);
    }

    #[test]
    fn blocks_of_attributes_are_copied_whole_and_a_retry_replaces_the_endpoints() {
        let (t, rx) = tracer(Sampler::AlwaysOn);
        let service = Attributes::new()
            .with("wasmesh.destination.service", Arc::<str>::from("shop/cart"))
            .with_concat("server.address", &["cart", ".", "shop", ".svc"])
            .with("server.port", 80i64);
        let endpoint = |ip: &str, pod: &str| {
            Attributes::new()
                .with("network.peer.address", ip.parse::<IpAddr>().expect("ip"))
                .with("network.peer.port", 8080i64)
                .with_concat("wasmesh.endpoint.pod", &[pod])
        };
        let mut span = t.start(SpanKind::Client, &HeaderMap::new());
        span.set("http.request.method", "GET");
        span.set_all(&service);
        span.put_all("endpoint", &endpoint("10.244.0.5", "shop/cart-a"));
        span.put("wasmesh.peer.identity", Arc::<str>::from("spiffe://a"));
        // The second try, on an endpoint whose block is longer, and no identity this time.
        span.put_all("endpoint", &endpoint("10.244.0.16", "shop/cart-bbbbbbbbbb"));
        span.unput("wasmesh.peer.identity");
        span.put("http.request.resend_count", 1i64);
        span.end(Some(200), None);
        let spans = queued(&rx);
        let d = &spans[0];
        assert_eq!(attr(d, "wasmesh.destination.service"), text("shop/cart"));
        assert_eq!(attr(d, "server.address"), text("cart.shop.svc"));
        assert_eq!(attr(d, "server.port"), Some(Value::IntValue(80)));
        assert_eq!(attr(d, "network.peer.address"), text("10.244.0.16"));
        assert_eq!(
            attr(d, "wasmesh.endpoint.pod"),
            text("shop/cart-bbbbbbbbbb")
        );
        assert_eq!(attr(d, "wasmesh.peer.identity"), None);
        assert_eq!(
            attr(d, "http.request.resend_count"),
            Some(Value::IntValue(1))
        );
        assert_eq!(d.attributes.len(), 9);
    }

    #[test]
    fn events_and_a_cancelled_span_are_recorded() {
        let (t, rx) = tracer(Sampler::AlwaysOn);
        let mut span = t.start(SpanKind::Server, &HeaderMap::new());
        span.event(
            "wasm.request_headers",
            &[
                ("wasmesh.filter.side", "inbound".into()),
                ("wasmesh.filter.outcome", "local_reply".into()),
            ],
        );
        // A server span: 4xx is not an error.
        span.end(Some(404), None);
        // Dropped without an end: the request future was cancelled.
        drop(t.start(SpanKind::Server, &HeaderMap::new()));
        let spans = queued(&rx);
        assert_eq!(spans.len(), 2);
        let e = &spans[0].events;
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].name, "wasm.request_headers");
        assert!(e[0].time_unix_nano >= spans[0].start_time_unix_nano);
        assert_eq!(e[0].attributes[1].key, "wasmesh.filter.outcome");
        assert!(spans[0].status.is_none());
        let cancelled = spans[1].status.as_ref().expect("status");
        assert_eq!(cancelled.code, StatusCode::Error as i32);
        assert_eq!(cancelled.message, "cancelled");
    }

    #[test]
    fn an_unsampled_caller_is_respected_and_a_full_queue_drops_and_counts() {
        let (t, rx) = tracer(Sampler::default());
        let h = unsampled_caller();
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
        assert!(rx.is_empty());
        // A new trace each; the queue holds 4.
        for _ in 0..6 {
            t.start(SpanKind::Server, &HeaderMap::new())
                .end(Some(200), None);
        }
        assert_eq!(t.stats.spans.load(Ordering::Relaxed), 6);
        assert_eq!(t.stats.dropped_queue_full.load(Ordering::Relaxed), 2);
        assert_eq!(rx.len(), 4);
        let spans = queued(&rx);
        assert_eq!(spans.len(), 4);
        assert!(spans.iter().all(|s| s.parent_span_id.is_empty()));
        // Room again once taken.
        t.start(SpanKind::Server, &HeaderMap::new())
            .end(Some(200), None);
        assert_eq!(rx.len(), 1);
        // Dropping the last handle on the tracer closes its queue (its task drains and ends).
        assert!(!rx.is_closed());
        drop(t);
        assert!(rx.is_closed());
    }

    #[test]
    fn the_queue_hands_out_one_batch_at_a_time_oldest_first() {
        let q = SpanQueue::new(10, 3);
        for i in 0..7u8 {
            q.push(&[i]);
        }
        let sizes: Vec<(usize, Vec<u8>)> = std::iter::from_fn(|| q.take())
            .map(|c| (c.spans, c.bytes))
            .collect();
        // Each span framed as `ScopeSpans.spans` (field 2, length 1).
        assert_eq!(
            sizes,
            vec![
                (3, vec![0x12, 1, 0, 0x12, 1, 1, 0x12, 1, 2]),
                (3, vec![0x12, 1, 3, 0x12, 1, 4, 0x12, 1, 5]),
                (1, vec![0x12, 1, 6]),
            ]
        );
        assert!(q.is_empty());
    }
}
