//! A small OTLP trace receiver for the local mesh — OTLP/gRPC (`TraceService/Export`) and
//! OTLP/HTTP with protobuf bodies (`POST /v1/traces`) — built on the official
//! `opentelemetry-proto` types (the OpenTelemetry Collector is not installable from the package
//! registries this project builds from). Every span received becomes one JSON line in a file;
//! `wasmesh-local traces` prints them as trees, and the tests read them.
//!
//! `wasmesh-local up --otlp local` runs it in the node's namespace on 10.244.0.1:4317 (gRPC) and
//! :4318 (HTTP), writing `<state>/traces.jsonl`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// One received span, flattened.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SpanLine {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// `client`, `server`, `internal`, `producer`, `consumer` or `unspecified`.
    pub kind: String,
    /// The resource's `service.name`.
    pub service: String,
    pub resource: BTreeMap<String, serde_json::Value>,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// `unset`, `ok` or `error`.
    pub status: String,
    pub attributes: BTreeMap<String, serde_json::Value>,
    pub events: Vec<EventLine>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventLine {
    pub name: String,
    pub attributes: BTreeMap<String, serde_json::Value>,
}

fn value(v: &Option<AnyValue>) -> serde_json::Value {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone().into(),
        Some(any_value::Value::BoolValue(b)) => (*b).into(),
        Some(any_value::Value::IntValue(i)) => (*i).into(),
        Some(any_value::Value::DoubleValue(d)) => (*d).into(),
        Some(other) => format!("{other:?}").into(),
        None => serde_json::Value::Null,
    }
}

fn map(kvs: &[KeyValue]) -> BTreeMap<String, serde_json::Value> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(&kv.value)))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The spans of one export request.
pub fn lines(req: &ExportTraceServiceRequest) -> Vec<SpanLine> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| map(&r.attributes))
            .unwrap_or_default();
        let service = resource
            .get("service.name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                out.push(SpanLine {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name.clone(),
                    kind: match s.kind {
                        1 => "internal",
                        2 => "server",
                        3 => "client",
                        4 => "producer",
                        5 => "consumer",
                        _ => "unspecified",
                    }
                    .to_string(),
                    service: service.clone(),
                    resource: resource.clone(),
                    start_unix_nano: s.start_time_unix_nano,
                    end_unix_nano: s.end_time_unix_nano,
                    status: match s.status.as_ref().map(|st| st.code) {
                        Some(1) => "ok",
                        Some(2) => "error",
                        _ => "unset",
                    }
                    .to_string(),
                    attributes: map(&s.attributes),
                    events: s
                        .events
                        .iter()
                        .map(|e| EventLine {
                            name: e.name.clone(),
                            attributes: map(&e.attributes),
                        })
                        .collect(),
                });
            }
        }
    }
    out
}

/// Appends spans to the file, a JSON line each.
#[derive(Debug, Clone)]
struct Sink(Arc<Mutex<std::fs::File>>);

impl Sink {
    fn write(&self, req: &ExportTraceServiceRequest) {
        let mut text = String::new();
        for l in lines(req) {
            if let Ok(j) = serde_json::to_string(&l) {
                text.push_str(&j);
                text.push('\n');
            }
        }
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(text.as_bytes()).and_then(|()| f.flush()) {
            tracing::warn!(error = %e, "otlp receiver: cannot write spans");
        }
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.write(request.get_ref());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Serves OTLP/gRPC on `grpc` and OTLP/HTTP on `http` until the process ends, appending every
/// span to `out`.
pub async fn serve(grpc: TcpListener, http: TcpListener, out: &Path) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)?;
    let sink = Sink(Arc::new(Mutex::new(file)));
    let http_sink = sink.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = http.accept().await else {
                continue;
            };
            let sink = http_sink.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let sink = sink.clone();
                        async move { Ok::<_, std::convert::Infallible>(http_export(req, &sink).await) }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc))
        .await
        .map_err(std::io::Error::other)
}

async fn http_export(
    req: http::Request<hyper::body::Incoming>,
    sink: &Sink,
) -> http::Response<Full<Bytes>> {
    let respond = |status: u16, body: Vec<u8>| {
        http::Response::builder()
            .status(status)
            .header("content-type", "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.method() != http::Method::POST || req.uri().path() != "/v1/traces" {
        return respond(404, b"POST /v1/traces\n".to_vec());
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return respond(400, e.to_string().into_bytes()),
    };
    match ExportTraceServiceRequest::decode(body) {
        Ok(r) => {
            sink.write(&r);
            respond(200, ExportTraceServiceResponse::default().encode_to_vec())
        }
        Err(e) => respond(400, e.to_string().into_bytes()),
    }
}

/// The spans a receiver wrote (lines that do not parse are skipped).
pub fn read(path: &Path) -> Vec<SpanLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Traces as trees, oldest first: one line per span, indented under its parent, with its
/// service, kind, duration and the attributes worth a glance.
pub fn render(spans: &[SpanLine]) -> String {
    let mut traces: BTreeMap<&str, Vec<&SpanLine>> = BTreeMap::new();
    for s in spans {
        traces.entry(&s.trace_id).or_default().push(s);
    }
    let mut order: Vec<(&str, u64)> = traces
        .iter()
        .map(|(t, ss)| (*t, ss.iter().map(|s| s.start_unix_nano).min().unwrap_or(0)))
        .collect();
    order.sort_by_key(|(_, start)| *start);
    let mut out = String::new();
    for (trace, _) in order {
        let ss = &traces[trace];
        out.push_str(&format!("trace {trace} ({} spans)\n", ss.len()));
        let ids: std::collections::HashSet<&str> = ss.iter().map(|s| s.span_id.as_str()).collect();
        let mut roots: Vec<&&SpanLine> = ss
            .iter()
            .filter(|s| s.parent_span_id.is_empty() || !ids.contains(s.parent_span_id.as_str()))
            .collect();
        roots.sort_by_key(|s| s.start_unix_nano);
        for r in roots {
            tree(&mut out, ss, r, 1);
        }
    }
    out
}

fn tree(out: &mut String, spans: &[&SpanLine], s: &SpanLine, depth: usize) {
    let attr = |k: &str| {
        s.attributes.get(k).map(|v| match v {
            serde_json::Value::String(x) => x.clone(),
            other => other.to_string(),
        })
    };
    let mut notes = Vec::new();
    for k in [
        "http.response.status_code",
        "wasmesh.destination.service",
        "http.route",
        "wasmesh.endpoint.pod",
        "wasmesh.peer.identity",
        "http.request.resend_count",
        "error.type",
    ] {
        if let Some(v) = attr(k) {
            notes.push(format!("{k}={v}"));
        }
    }
    let micros = s.end_unix_nano.saturating_sub(s.start_unix_nano) / 1000;
    out.push_str(&format!(
        "{}{} [{} {}] {} µs  {}\n",
        "  ".repeat(depth),
        s.name,
        s.service,
        s.kind,
        micros,
        notes.join(" ")
    ));
    let mut children: Vec<&&SpanLine> = spans
        .iter()
        .filter(|c| c.parent_span_id == s.span_id)
        .collect();
    children.sort_by_key(|c| c.start_unix_nano);
    for c in children {
        tree(out, spans, c, depth + 1);
    }
}

/// Where `up --otlp local` writes the spans.
pub fn traces_file(state_dir: &Path) -> PathBuf {
    state_dir.join("traces.jsonl")
}
