//! OpenTelemetry traces of the HTTP requests the proxy carries.
//!
//! For each request the outbound side records a client span and the inbound side a server
//! span; the caller's context (W3C `traceparent`, or B3) is continued, or a trace is started,
//! and the next hop gets a `traceparent` whose parent is our span — the app's spans, both
//! sidecars' and the next service's form one trace.
//!
//! Recording costs little on the request path: a sampled span is plain data (the SDK's
//! `SpanData`) built when the request ends and handed to a bounded queue with `try_send`.
//! A task batches the queue and exports it with `opentelemetry-otlp` (OTLP gRPC or
//! HTTP/protobuf). When the collector is slow or down the queue fills and spans are dropped
//! and counted: traffic never waits for the collector.
//!
//! - [`propagation`]: reading and writing the context headers;
//! - [`sampler`]: the SDK's samplers (`OTEL_TRACES_SAMPLER`);
//! - [`config`]: what the environment (`OTEL_*`) and control (mesh-wide) say, merged;
//! - [`export`]: the queue, the batching task and the exporter.
//!
//! See `docs/observability.md`.

pub mod config;
pub mod export;
pub mod propagation;
pub mod sampler;

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use http::HeaderMap;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use tokio::sync::mpsc;

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

/// Starts spans and queues the finished ones for export. One per configuration; a new
/// configuration (from control) starts a new one, and the old one's task drains and ends.
#[derive(Debug)]
pub struct Tracer {
    sampler: Sampler,
    queue: mpsc::Sender<SpanData>,
    stats: Arc<TraceStats>,
    scope: InstrumentationScope,
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
        let trace_state = if sampled {
            headers
                .get(&propagation::TRACESTATE)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default()
        } else {
            TraceState::NONE
        };
        Span {
            tracer: self.clone(),
            trace_id,
            span_id: SpanId::from(rand::random::<u64>().max(1)),
            parent_span,
            parent_format: parent.as_ref().map(|p: &Parent| p.format),
            trace_state,
            sampled,
            kind,
            start: SystemTime::now(),
            name: None,
            attributes: if sampled {
                Vec::with_capacity(16)
            } else {
                Vec::new()
            },
            events: Vec::new(),
        }
    }

    pub fn stats(&self) -> &Arc<TraceStats> {
        &self.stats
    }
}

/// One request's span while it is in flight. Ended with [`Span::end`]; dropped without it
/// (the request future was cancelled) it is still recorded, with no status code.
#[derive(Debug)]
pub struct Span {
    tracer: Arc<Tracer>,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    parent_span: Option<SpanId>,
    parent_format: Option<Format>,
    trace_state: TraceState,
    sampled: bool,
    kind: SpanKind,
    start: SystemTime,
    name: Option<Cow<'static, str>>,
    attributes: Vec<KeyValue>,
    events: Vec<opentelemetry::trace::Event>,
}

impl Span {
    pub fn is_sampled(&self) -> bool {
        self.sampled
    }

    /// Sets an attribute (a no-op when the span is not recorded).
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if self.sampled {
            self.attributes.push(KeyValue::new(key, value));
        }
    }

    /// Sets an attribute, replacing an earlier value of the same key.
    pub fn put(&mut self, key: &'static str, value: impl Into<Value>) {
        if !self.sampled {
            return;
        }
        let value = value.into();
        match self.attributes.iter_mut().find(|kv| kv.key.as_str() == key) {
            Some(kv) => kv.value = value,
            None => self.attributes.push(KeyValue::new(key, value)),
        }
    }

    /// Sets an attribute whose value is costly to build only when the span is recorded.
    pub fn set_with<V: Into<Value>>(&mut self, key: &'static str, value: impl FnOnce() -> V) {
        if self.sampled {
            self.attributes.push(KeyValue::new(key, value()));
        }
    }

    /// The span's name (semantic conventions: `{method} {http.route}`, or `{method}`).
    pub fn name(&mut self, name: impl Into<Cow<'static, str>>) {
        if self.sampled {
            self.name = Some(name.into());
        }
    }

    /// Adds an event (e.g. a Wasm filter's outcome).
    pub fn event(&mut self, name: &'static str, attributes: Vec<KeyValue>) {
        if self.sampled {
            self.events.push(opentelemetry::trace::Event::new(
                name,
                SystemTime::now(),
                attributes,
                0,
            ));
        }
    }

    /// Writes the context the next hop continues (our span as its parent) into `headers`.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let flags = if self.sampled {
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
        self.trace_id.to_string()
    }

    /// Ends the span with the response's status code (None: no response, e.g. a reset);
    /// `error` names what went wrong when the proxy answered itself.
    pub fn end(mut self, status: Option<u16>, error: Option<&'static str>) {
        if !self.sampled {
            return;
        }
        let status_code = match status {
            Some(s) => {
                self.attributes
                    .push(KeyValue::new("http.response.status_code", i64::from(s)));
                // Client spans: 4xx and 5xx are errors; server spans: only 5xx.
                let limit = if self.kind == SpanKind::Client {
                    400
                } else {
                    500
                };
                if s >= limit {
                    Status::Error {
                        description: Cow::Borrowed(""),
                    }
                } else {
                    Status::Unset
                }
            }
            None => Status::Error {
                description: Cow::Borrowed("no response"),
            },
        };
        let status_code = match error {
            Some(e) => {
                self.attributes.push(KeyValue::new("error.type", e));
                Status::Error {
                    description: Cow::Borrowed(e),
                }
            }
            None => status_code,
        };
        self.finish(status_code);
    }

    fn finish(&mut self, status: Status) {
        self.sampled = false;
        let tracer = &self.tracer;
        let data = SpanData {
            span_context: SpanContext::new(
                self.trace_id,
                self.span_id,
                TraceFlags::SAMPLED,
                false,
                std::mem::take(&mut self.trace_state),
            ),
            parent_span_id: self.parent_span.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: self.parent_span.is_some(),
            span_kind: self.kind.clone(),
            name: self.name.take().unwrap_or(Cow::Borrowed("HTTP")),
            start_time: self.start,
            end_time: SystemTime::now(),
            attributes: std::mem::take(&mut self.attributes),
            dropped_attributes_count: 0,
            events: events(std::mem::take(&mut self.events)),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: tracer.scope.clone(),
        };
        tracer.stats.spans.fetch_add(1, Ordering::Relaxed);
        if tracer.queue.try_send(data).is_err() {
            tracer
                .stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if self.sampled {
            self.finish(Status::Error {
                description: Cow::Borrowed("cancelled"),
            });
        }
    }
}

fn events(events: Vec<opentelemetry::trace::Event>) -> SpanEvents {
    let mut e = SpanEvents::default();
    e.events = events;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer(sampler: Sampler) -> (Arc<Tracer>, mpsc::Receiver<SpanData>) {
        let (tx, rx) = mpsc::channel(4);
        (
            Arc::new(Tracer {
                sampler,
                queue: tx,
                stats: Arc::default(),
                scope: InstrumentationScope::builder("wasmesh-proxy").build(),
                config: TraceConfig::default(),
            }),
            rx,
        )
    }

    #[test]
    fn a_span_continues_the_callers_trace_and_names_itself_the_next_parent() {
        let (t, mut rx) = tracer(Sampler::default());
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
        let d = rx.try_recv().expect("queued");
        assert_eq!(d.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert!(d.parent_span_is_remote);
        assert!(matches!(d.status, Status::Error { .. }));
        assert!(d.attributes.iter().any(
            |kv| kv.key.as_str() == "http.response.status_code" && kv.value == Value::I64(503)
        ));
    }

    #[test]
    fn an_unsampled_caller_is_respected_and_a_full_queue_drops_and_counts() {
        let (t, mut rx) = tracer(Sampler::default());
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
        assert!(out["traceparent"].to_str().expect("ascii").ends_with("-00"));
        span.end(Some(200), None);
        assert!(rx.try_recv().is_err());
        // A new trace each; the queue holds 4.
        for _ in 0..6 {
            t.start(SpanKind::Server, &HeaderMap::new())
                .end(Some(200), None);
        }
        assert_eq!(t.stats.spans.load(Ordering::Relaxed), 6);
        assert_eq!(t.stats.dropped_queue_full.load(Ordering::Relaxed), 2);
        let d = rx.try_recv().expect("queued");
        assert_eq!(d.parent_span_id, SpanId::INVALID);
        assert!(!d.parent_span_is_remote);
    }
}
