//! The queue between the request path and the collector: spans are batched (up to
//! `batch_size`, or every `schedule_delay`), written as one OTLP protobuf request
//! ([`super::encode`]) and sent — OTLP/gRPC (`TraceService/Export` over HTTP/2, the gRPC
//! message framing, `grpc-status` read from the trailers) or OTLP/HTTP (`POST` of
//! `application/x-protobuf` to the traces URL) — one export at a time, each within the
//! export timeout. A batch that fails is dropped and counted (no retry: the next batch is the
//! one worth sending).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytes::buf::{Buf, Chain};
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, USER_AGENT};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::config::{Protocol, TraceConfig};
use super::encode::Encoder;
use super::{SpanQueue, TraceStats, Tracer};

const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// How much the export thread yields to the proxy's workers (its `nice` value, added to the
/// process's).
const EXPORT_NICENESS: i32 = 10;

/// Builds the transport, starts the export thread and returns the tracer that feeds it. Fails
/// on an unusable endpoint, or if the thread cannot be started.
///
/// The batches are encoded and sent on a thread of their own (a one-thread runtime), not on
/// the proxy's workers: an encode of 512 spans held a worker, and every request queued behind
/// it, for a fraction of a millisecond, and the upload's connection competed with the traffic.
/// The thread runs at a lower priority (nice +10): it gets the CPU the traffic leaves, and
/// still about a tenth of a busy core, much more than exporting takes. Should the traffic
/// take everything, the queue fills and spans are dropped and counted; requests never wait.
pub fn start(cfg: TraceConfig, stats: Arc<TraceStats>) -> Result<Arc<Tracer>, String> {
    let transport = Transport::new(&cfg)?;
    let encoder = Encoder::new(&cfg.resource, "wasmesh-proxy", env!("CARGO_PKG_VERSION"));
    let queue = Arc::new(SpanQueue::new(cfg.queue_size, cfg.batch_size));
    let task = batches(
        transport,
        encoder,
        queue.clone(),
        cfg.schedule_delay,
        cfg.export_timeout,
        stats.clone(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the span exporter's runtime: {e}"))?;
    std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || {
            yield_to_workers();
            // Ends when the tracer is replaced or dropped and its queue drained.
            runtime.block_on(task);
        })
        .map_err(|e| format!("cannot start the span exporter's thread: {e}"))?;
    Ok(Arc::new(Tracer {
        sampler: cfg.sampler,
        queue,
        stats,
        config: cfg,
    }))
}

/// Lowers the calling thread's priority by [`EXPORT_NICENESS`]. On Linux the nice value is
/// per thread: `PRIO_PROCESS` with id 0 is the calling thread, not the whole proxy.
#[allow(unsafe_code)]
fn yield_to_workers() {
    // SAFETY: two system calls about the calling thread; no memory is passed to them.
    let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let target = (now + EXPORT_NICENESS).min(19);
    // SAFETY: as above.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, target) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "tracing: the export thread keeps the proxy's priority"
        );
    }
}

/// Where and how a batch goes.
struct Transport {
    client: Client<HttpConnector, Full<Chain<Bytes, Bytes>>>,
    uri: Uri,
    grpc: bool,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Transport {
    fn new(cfg: &TraceConfig) -> Result<Transport, String> {
        let grpc = cfg.protocol == Protocol::Grpc;
        let unusable = |why: &str| {
            format!(
                "cannot export spans to {:?} ({}): {why}",
                cfg.endpoint, cfg.protocol
            )
        };
        let uri: Uri = cfg
            .endpoint
            .parse()
            .map_err(|e| unusable(&format!("not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(unusable(
                    "TLS to the collector is not supported; send to a collector in the \
                     cluster (or on the node) over http://",
                ));
            }
            _ => return Err(unusable("want http://host:port")),
        }
        let Some(authority) = uri.authority().cloned() else {
            return Err(unusable("no host"));
        };
        let uri = if grpc {
            // gRPC names the method in the path; an endpoint's own path is not used.
            Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(GRPC_EXPORT)
                .build()
                .map_err(|e| unusable(&e.to_string()))?
        } else {
            uri
        };
        let mut headers = Vec::with_capacity(cfg.headers.len());
        for (k, v) in &cfg.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| unusable(&format!("header name {k:?} is not valid")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| unusable(&format!("header {k}: value is not valid")))?;
            headers.push((name, value));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.export_timeout));
        let client = Client::builder(TokioExecutor::new())
            .http2_only(grpc)
            .build(connector);
        Ok(Transport {
            client,
            uri,
            grpc,
            headers,
        })
    }

    /// Sends one encoded request (its envelope, then its spans); Ok once the collector
    /// accepted it.
    async fn send(&self, body: Chain<Bytes, Bytes>) -> Result<(), String> {
        let content_type = if self.grpc {
            "application/grpc"
        } else {
            "application/x-protobuf"
        };
        let mut req = Request::post(self.uri.clone())
            .header(CONTENT_TYPE, content_type)
            .header(
                USER_AGENT,
                concat!("wasmesh-proxy/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        if self.grpc {
            req.headers_mut()
                .insert(http::header::TE, HeaderValue::from_static("trailers"));
        }
        for (k, v) in &self.headers {
            req.headers_mut().append(k.clone(), v.clone());
        }
        let resp = self.client.request(req).await.map_err(|e| {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg = format!("{msg}: {s}");
                source = s.source();
            }
            msg
        })?;
        let status = resp.status();
        let head_grpc = grpc_status(resp.headers());
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if !status.is_success() {
            let text = body.to_bytes();
            let text = String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned();
            return Err(format!("HTTP {status}: {}", text.trim()));
        }
        if !self.grpc {
            return Ok(());
        }
        // A trailers-only answer carries the status in its headers.
        match head_grpc.or_else(|| body.trailers().and_then(grpc_status)) {
            Some((0, _)) => Ok(()),
            Some((code, message)) => Err(format!("gRPC status {code}: {message}")),
            None => Err("the answer has no grpc-status".into()),
        }
    }
}

fn grpc_status(h: &http::HeaderMap) -> Option<(u32, String)> {
    let code = h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    let message = h
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or("")
        .to_string();
    Some((code, message))
}

/// A base URL (`http://collector:4318`) gets the traces path, as the specification says for
/// `OTEL_EXPORTER_OTLP_ENDPOINT`; a URL with a path is used as it is.
pub fn http_traces_url(endpoint: &str) -> String {
    let e = endpoint.trim();
    let after_scheme = e.split_once("://").map_or(e, |(_, rest)| rest);
    match after_scheme.find('/') {
        Some(i) if after_scheme.len() > i + 1 => e.to_string(),
        _ => format!("{}/v1/traces", e.trim_end_matches('/')),
    }
}

async fn batches(
    transport: Transport,
    encoder: Encoder,
    queue: Arc<SpanQueue>,
    delay: Duration,
    timeout: Duration,
    stats: Arc<TraceStats>,
) {
    let mut last_warning: Option<Instant> = None;
    loop {
        queue.wait(tokio::time::Instant::now() + delay).await;
        let closed = queue.is_closed();
        if let Some(chunk) = queue.take() {
            let n = chunk.spans as u64;
            let spans = Bytes::from(chunk.bytes);
            let head = encoder.head(spans.len(), transport.grpc);
            let outcome =
                tokio::time::timeout(timeout, transport.send(head.chain(spans.clone()))).await;
            // Once the answer is in, the connection has written the spans and let go of them:
            // their buffer goes back to the queue for a next chunk. (Still held after a timeout,
            // it is freed when the connection is done with it.)
            if let Ok(buffer) = spans.try_into_mut() {
                queue.recycle(buffer.into());
            }
            let error = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(format!("no answer within {timeout:?}")),
            };
            match error {
                None => {
                    stats.exported.fetch_add(n, Ordering::Relaxed);
                }
                Some(e) => {
                    stats.export_failures.fetch_add(1, Ordering::Relaxed);
                    stats.dropped_export_failed.fetch_add(n, Ordering::Relaxed);
                    // Once a minute at most: a collector that is down must not flood the log.
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        last_warning = Some(Instant::now());
                        tracing::warn!(spans = n, endpoint = %transport.uri, error = %e, "tracing: cannot export spans; dropped (counted in wasmesh_tracing_spans_dropped_total)");
                    }
                }
            }
        }
        if closed && queue.is_empty() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otel::encode;
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use opentelemetry::trace::{SpanId, SpanKind, TraceId};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    use std::sync::Mutex;
    use std::time::SystemTime;

    /// A collector on 127.0.0.1: OTLP/gRPC over HTTP/2 (`grpc`) or OTLP/HTTP over HTTP/1.1;
    /// every request it decodes is kept.
    async fn collector(grpc: bool) -> (String, Arc<Mutex<Vec<ExportTraceServiceRequest>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let got = Arc::new(Mutex::new(Vec::new()));
        let keep = got.clone();
        tokio::spawn(async move {
            let (io, _) = listener.accept().await.expect("accept");
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let keep = keep.clone();
                async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    let message = if grpc {
                        assert_eq!(body[0], 0, "uncompressed");
                        let n = u32::from_be_bytes(body[1..5].try_into().expect("4 bytes"));
                        assert_eq!(n as usize, body.len() - 5, "the gRPC prefix's length");
                        body.slice(5..)
                    } else {
                        body
                    };
                    let decoded = ExportTraceServiceRequest::decode(message).expect("decodes");
                    keep.lock().expect("lock").push(decoded);
                    let answer = http::Response::builder().status(200);
                    let answer = if grpc {
                        answer
                            .header(CONTENT_TYPE, "application/grpc")
                            .header("grpc-status", "0")
                    } else {
                        answer.header(CONTENT_TYPE, "application/x-protobuf")
                    };
                    Ok::<_, hyper::Error>(answer.body(Full::new(Bytes::new())).expect("answer"))
                }
            });
            let io = TokioIo::new(io);
            if grpc {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service)
                    .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            }
        });
        (format!("http://{addr}"), got)
    }

    /// A finished span's bytes, as the request path writes them.
    fn span(n: u64) -> Vec<u8> {
        let mut b = Vec::new();
        encode::span_start(
            &mut b,
            TraceId::from(u128::from(n)),
            SpanId::from(n),
            None,
            None,
            &SpanKind::Client,
            SystemTime::now(),
        );
        encode::key_value(&mut b, encode::SPAN_ATTRIBUTE, "url.path", &"/".into());
        encode::span_end(
            &mut b,
            "GET",
            None,
            SystemTime::now(),
            crate::otel::Status::Unset,
            false,
        );
        b
    }

    /// The transport and the encoder the export thread builds, for a collector at `endpoint`
    /// (a base URL: OTLP/HTTP posts to its traces path) and a workload named `service`.
    fn exporter(protocol: Protocol, endpoint: String, service: &str) -> (Transport, Encoder) {
        let cfg = TraceConfig {
            endpoint: if protocol == Protocol::Grpc {
                endpoint
            } else {
                http_traces_url(&endpoint)
            },
            protocol,
            resource: vec![("service.name".into(), service.into())],
            ..TraceConfig::default()
        };
        let transport = Transport::new(&cfg).expect("transport");
        let encoder = Encoder::new(&cfg.resource, "wasmesh-proxy", "0.1.0");
        (transport, encoder)
    }

    #[tokio::test]
    async fn a_batch_goes_out_as_one_request_behind_its_envelope_and_its_buffer_comes_back() {
        for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
            let grpc = protocol == Protocol::Grpc;
            let (endpoint, got) = collector(grpc).await;
            let (transport, encoder) = exporter(protocol, endpoint, "reviews");
            let queue = Arc::new(SpanQueue::new(8, 3));
            for n in 1..=3 {
                assert!(queue.push(&span(n)));
            }
            queue.close();
            let stats = Arc::new(TraceStats::default());
            batches(
                transport,
                encoder,
                queue.clone(),
                Duration::from_secs(5),
                Duration::from_secs(5),
                stats.clone(),
            )
            .await;
            assert_eq!(stats.exported.load(Ordering::Relaxed), 3, "{protocol}");
            let got = got.lock().expect("lock");
            assert_eq!(got.len(), 1, "one request for the batch ({protocol})");
            let rs = &got[0].resource_spans[0];
            let resource = &rs.resource.as_ref().expect("resource").attributes[0];
            assert_eq!(resource.key, "service.name");
            let spans = &rs.scope_spans[0].spans;
            let ids: Vec<Vec<u8>> = spans.iter().map(|s| s.span_id.clone()).collect();
            let want: Vec<Vec<u8>> = (1..=3u64).map(|n| n.to_be_bytes().to_vec()).collect();
            assert_eq!(ids, want, "the spans, in order ({protocol})");
            assert_eq!(
                rs.scope_spans[0].scope.as_ref().expect("scope").name,
                "wasmesh-proxy"
            );
            // The connection let go of the batch once answered: its buffer is the queue's again.
            let spare = queue.pending.lock().expect("lock").spare.len();
            assert_eq!(
                spare, 1,
                "the batch's buffer back for the next ({protocol})"
            );
        }
    }

    #[tokio::test]
    async fn a_batch_of_many_frames_arrives_whole_over_either_transport() {
        // ≈ 230 KB: over gRPC more than a dozen DATA frames of 16 KB; over HTTP/1.1 one body.
        const SPANS: u64 = 3000;
        for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
            let grpc = protocol == Protocol::Grpc;
            let (endpoint, got) = collector(grpc).await;
            let (transport, encoder) = exporter(protocol, endpoint, "reviews");
            let queue = Arc::new(SpanQueue::new(SPANS as usize, SPANS as usize));
            for n in 1..=SPANS {
                assert!(queue.push(&span(n)));
            }
            queue.close();
            let stats = Arc::new(TraceStats::default());
            tokio::time::timeout(
                Duration::from_secs(20),
                batches(
                    transport,
                    encoder,
                    queue,
                    Duration::from_secs(5),
                    Duration::from_secs(10),
                    stats.clone(),
                ),
            )
            .await
            .expect("the export ends");
            assert_eq!(stats.exported.load(Ordering::Relaxed), SPANS, "{protocol}");
            let got = got.lock().expect("lock");
            assert_eq!(got.len(), 1, "one request ({protocol})");
            let spans = &got[0].resource_spans[0].scope_spans[0].spans;
            assert_eq!(spans.len() as u64, SPANS, "{protocol}");
            assert!(
                spans
                    .iter()
                    .zip(1..)
                    .all(|(s, n): (_, u64)| s.span_id == n.to_be_bytes()),
                "every span, in order ({protocol})"
            );
        }
    }

    #[test]
    fn http_endpoints_get_the_traces_path_unless_they_have_one() {
        assert_eq!(
            http_traces_url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            http_traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            http_traces_url("http://collector:4318/custom/path"),
            "http://collector:4318/custom/path"
        );
    }
}
