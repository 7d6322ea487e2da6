//! The OTLP receiver of the tracing pairs (`l7 __otlp`): the proxies' exporters send it their
//! spans over OTLP/gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`) or
//! OTLP/HTTP (`POST /v1/traces`, `application/x-protobuf`), it decodes every export and counts
//! the spans by kind, and answers `GET /count` with the counts as JSON on the same port, for the
//! orchestrator's checks.
//!
//! It runs in the node's namespace on the load core (with the app, the load generator and
//! control), so it must cost little there: each export is decoded with [`ExportCount`], a view
//! of `ExportTraceServiceRequest` that keeps, of each span, its kind and parent — everything
//! else (names, attributes, events, resources) is skipped by the protobuf decoder without being
//! built. The full types of `opentelemetry-proto` are the reference: the tests encode exports
//! with them and check that this view counts what they hold.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use wasmesh_benches::harness::run::Args;

/// The gRPC method the exporters call.
const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The OTLP/HTTP traces path.
const HTTP_EXPORT: &str = "/v1/traces";

/// The largest OTLP/HTTP export read (a batch of 512 spans is about 180 KB).
const MAX_HTTP_EXPORT: usize = 16 << 20;

/// `ExportTraceServiceRequest`, down to each span's kind and parent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportCount {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpansCount>,
}

/// `ResourceSpans` without its resource.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceSpansCount {
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpansCount>,
}

/// `ScopeSpans` without its scope.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeSpansCount {
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<SpanCount>,
}

/// A `Span`: its parent's id (empty for a root) and its kind (2 server, 3 client).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SpanCount {
    #[prost(bytes = "vec", tag = "4")]
    pub parent_span_id: Vec<u8>,
    #[prost(int32, tag = "6")]
    pub kind: i32,
}

const KIND_SERVER: i32 = 2;
const KIND_CLIENT: i32 = 3;

/// What the receiver has counted since it started (`GET /count`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Export calls answered.
    pub exports: u64,
    pub spans: u64,
    pub client: u64,
    pub server: u64,
    /// Server spans with a parent (the client sidecar's span, from its `traceparent`).
    pub server_with_parent: u64,
}

impl Counts {
    /// What arrived since `before`.
    pub fn since(&self, before: &Counts) -> Counts {
        Counts {
            exports: self.exports.saturating_sub(before.exports),
            spans: self.spans.saturating_sub(before.spans),
            client: self.client.saturating_sub(before.client),
            server: self.server.saturating_sub(before.server),
            server_with_parent: self
                .server_with_parent
                .saturating_sub(before.server_with_parent),
        }
    }
}

/// The counters behind [`Counts`].
#[derive(Debug, Default)]
struct Tally {
    exports: AtomicU64,
    spans: AtomicU64,
    client: AtomicU64,
    server: AtomicU64,
    server_with_parent: AtomicU64,
}

impl Tally {
    fn record(&self, export: &ExportCount) {
        let (mut spans, mut client, mut server, mut with_parent) = (0, 0, 0, 0);
        for s in export
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
        {
            spans += 1;
            match s.kind {
                KIND_CLIENT => client += 1,
                KIND_SERVER => {
                    server += 1;
                    if !s.parent_span_id.is_empty() {
                        with_parent += 1;
                    }
                }
                _ => {}
            }
        }
        self.spans.fetch_add(spans, Ordering::Relaxed);
        self.client.fetch_add(client, Ordering::Relaxed);
        self.server.fetch_add(server, Ordering::Relaxed);
        self.server_with_parent
            .fetch_add(with_parent, Ordering::Relaxed);
        self.exports.fetch_add(1, Ordering::Relaxed);
    }

    fn counts(&self) -> Counts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            exports: g(&self.exports),
            spans: g(&self.spans),
            client: g(&self.client),
            server: g(&self.server),
            server_with_parent: g(&self.server_with_parent),
        }
    }
}

/// The Export method: counts, answers an empty `ExportTraceServiceResponse` (all accepted).
#[derive(Clone)]
struct Export(Arc<Tally>);

impl tonic::server::UnaryService<ExportCount> for Export {
    type Response = ExportTraceServiceResponse;
    type Future =
        std::future::Ready<Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<ExportCount>) -> Self::Future {
        self.0.record(request.get_ref());
        std::future::ready(Ok(tonic::Response::new(
            ExportTraceServiceResponse::default(),
        )))
    }
}

/// `l7 __otlp --listen ADDR --max-secs S`: serves until killed, or for at most S seconds.
pub fn main(args: &[String]) -> anyhow::Result<()> {
    let a = Args::parse(args)?;
    let listen: SocketAddr = a.get("listen")?;
    let lifetime = Duration::from_secs(a.get("max-secs")?);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            // Never outlives a run, even if the orchestrator is killed.
            tokio::select! {
                _ = tokio::time::sleep(lifetime) => Ok(()),
                r = serve(listener, Arc::default()) => r,
            }
        })
}

/// OTLP/gRPC (HTTP/2), OTLP/HTTP and `GET /count` (HTTP/1.1 or HTTP/2) on one listener.
async fn serve(listener: TcpListener, tally: Arc<Tally>) -> anyhow::Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("otlp receiver: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let tally = tally.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let tally = tally.clone();
                    async move { Ok::<_, Infallible>(handle(req, tally).await) }
                });
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("otlp receiver: connection: {e}");
            }
        });
    }
}

async fn handle(
    req: http::Request<hyper::body::Incoming>,
    tally: Arc<Tally>,
) -> http::Response<tonic::body::Body> {
    let plain = |status: u16, text: String, ctype: &str| {
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, ctype)
            .body(tonic::body::Body::new(Full::new(Bytes::from(text))))
            .unwrap_or_default()
    };
    match (req.method(), req.uri().path()) {
        (&http::Method::POST, EXPORT) => {
            let codec =
                tonic_prost::ProstCodec::<ExportTraceServiceResponse, ExportCount>::default();
            tonic::server::Grpc::new(codec)
                .unary(Export(tally), req)
                .await
        }
        (&http::Method::POST, HTTP_EXPORT) => {
            let body = match Limited::new(req.into_body(), MAX_HTTP_EXPORT)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => return plain(400, format!("reading the export: {e}\n"), "text/plain"),
            };
            match ExportCount::decode(body) {
                Ok(export) => {
                    tally.record(&export);
                    // An empty ExportTraceServiceResponse: everything accepted.
                    plain(200, String::new(), "application/x-protobuf")
                }
                Err(e) => plain(400, format!("not an export: {e}\n"), "text/plain"),
            }
        }
        (&http::Method::GET, "/count") => plain(
            200,
            serde_json::to_string(&tally.counts()).unwrap_or_default(),
            "application/json",
        ),
        _ => plain(
            404,
            format!(
                "OTLP/gRPC: POST {EXPORT}; OTLP/HTTP: POST {HTTP_EXPORT}; counts: GET /count\n"
            ),
            "text/plain",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn span(kind: span::SpanKind, parent: &[u8]) -> Span {
        Span {
            trace_id: vec![7; 16],
            span_id: vec![9; 8],
            parent_span_id: parent.to_vec(),
            name: "GET".into(),
            kind: kind as i32,
            start_time_unix_nano: 1,
            end_time_unix_nano: 2,
            attributes: vec![KeyValue {
                key: "http.response.status_code".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::IntValue(200)),
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn counts_what_the_full_otlp_types_encode() {
        let resource = Resource {
            attributes: vec![KeyValue {
                key: "service.name".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue("bench-client".into())),
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let export = ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    resource: Some(resource.clone()),
                    scope_spans: vec![ScopeSpans {
                        spans: vec![
                            span(span::SpanKind::Client, &[]),
                            span(span::SpanKind::Client, &[1; 8]),
                        ],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                ResourceSpans {
                    resource: Some(resource),
                    scope_spans: vec![
                        ScopeSpans {
                            spans: vec![
                                span(span::SpanKind::Server, &[2; 8]),
                                span(span::SpanKind::Server, &[]),
                            ],
                            ..Default::default()
                        },
                        ScopeSpans {
                            spans: vec![span(span::SpanKind::Internal, &[3; 8])],
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
            ],
        };
        let view = ExportCount::decode(export.encode_to_vec().as_slice()).expect("decodes");
        let tally = Tally::default();
        tally.record(&view);
        tally.record(&ExportCount::decode(&[][..]).expect("an empty export decodes"));
        assert_eq!(
            tally.counts(),
            Counts {
                exports: 2,
                spans: 5,
                client: 2,
                server: 2,
                server_with_parent: 1,
            }
        );
        // Not protobuf: an error, not a count.
        assert!(ExportCount::decode(&[0x0a, 0xff][..]).is_err());
    }

    #[test]
    fn counts_since_an_earlier_reading() {
        let a = Counts {
            exports: 1,
            spans: 10,
            client: 5,
            server: 5,
            server_with_parent: 5,
        };
        let b = Counts {
            exports: 3,
            spans: 30,
            client: 15,
            server: 15,
            server_with_parent: 14,
        };
        assert_eq!(
            b.since(&a),
            Counts {
                exports: 2,
                spans: 20,
                client: 10,
                server: 10,
                server_with_parent: 9,
            }
        );
    }

    /// One HTTP/1.1 exchange with the receiver: the response's status line and body.
    async fn post(addr: SocketAddr, path: &str, body: &[u8]) -> (String, Vec<u8>) {
        let mut c = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connects");
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: collector\r\ncontent-type: application/x-protobuf\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        c.write_all(head.as_bytes()).await.expect("writes");
        c.write_all(body).await.expect("writes");
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).await.expect("reads");
        let end = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head");
        let status = String::from_utf8_lossy(&answer[..end])
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        (status, answer[end + 4..].to_vec())
    }

    #[tokio::test]
    async fn otlp_http_exports_are_counted_and_bad_ones_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("address");
        let tally = Arc::new(Tally::default());
        let server = tokio::spawn(serve(listener, tally.clone()));
        let export = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![
                        span(span::SpanKind::Client, &[]),
                        span(span::SpanKind::Server, &[1; 8]),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let (status, body) = post(addr, HTTP_EXPORT, &export.encode_to_vec()).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        // An empty ExportTraceServiceResponse (everything accepted) is zero bytes.
        assert!(body.is_empty(), "{body:?}");
        let (status, _) = post(addr, HTTP_EXPORT, &[0x0a, 0xff]).await;
        assert!(status.starts_with("HTTP/1.1 400"), "{status}");
        let (status, _) = post(addr, "/v1/metrics", &[]).await;
        assert!(status.starts_with("HTTP/1.1 404"), "{status}");
        assert_eq!(
            tally.counts(),
            Counts {
                exports: 1,
                spans: 2,
                client: 1,
                server: 1,
                server_with_parent: 1,
            }
        );
        server.abort();
    }
}
