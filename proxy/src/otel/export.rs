//! The queue between the request path and the collector: spans are batched (up to
//! `batch_size`, or every `schedule_delay`) and handed to `opentelemetry-otlp`'s exporter,
//! one export at a time, each within `export_timeout`. A batch that fails is dropped and
//! counted (the exporter does not retry it: the next batch is the one worth sending).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use tokio::sync::mpsc;

use super::config::{Protocol, TraceConfig};
use super::{TraceStats, Tracer};

/// Builds the exporter, starts the batching task and returns the tracer that feeds it.
/// Must be called on the tokio runtime. Fails only on an unusable endpoint.
pub fn start(cfg: TraceConfig, stats: Arc<TraceStats>) -> Result<Arc<Tracer>, String> {
    let mut exporter = build(&cfg)?;
    let resource = Resource::builder_empty()
        .with_attributes(
            cfg.resource
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build();
    exporter.set_resource(&resource);
    let (tx, rx) = mpsc::channel(cfg.queue_size.max(1));
    tokio::spawn(batches(
        exporter,
        rx,
        cfg.batch_size.max(1),
        cfg.schedule_delay,
        cfg.export_timeout,
        stats.clone(),
    ));
    Ok(Arc::new(Tracer {
        sampler: cfg.sampler,
        queue: tx,
        stats,
        scope: InstrumentationScope::builder("wasmesh-proxy")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
        config: cfg,
    }))
}

fn build(cfg: &TraceConfig) -> Result<SpanExporter, String> {
    let built = match cfg.protocol {
        Protocol::Grpc => {
            let mut b = SpanExporter::builder()
                .with_tonic()
                .with_timeout(cfg.export_timeout);
            if let Some(e) = &cfg.endpoint {
                b = b.with_endpoint(e.clone());
            }
            b.build()
        }
        Protocol::HttpProtobuf => {
            let mut b = SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_timeout(cfg.export_timeout);
            if let Some(e) = &cfg.endpoint {
                b = b.with_endpoint(http_traces_url(e));
            }
            b.build()
        }
    };
    built.map_err(|e| {
        format!(
            "cannot export spans to {} ({}): {e}",
            cfg.endpoint
                .as_deref()
                .unwrap_or("the OTEL_EXPORTER_OTLP_* endpoint"),
            cfg.protocol
        )
    })
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
    exporter: SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    batch_size: usize,
    delay: Duration,
    timeout: Duration,
    stats: Arc<TraceStats>,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(batch_size);
    let mut last_warning: Option<Instant> = None;
    loop {
        let deadline = tokio::time::Instant::now() + delay;
        let mut closed = false;
        while batch.len() < batch_size {
            let room = batch_size - batch.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            let spans = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
            let outcome = tokio::time::timeout(timeout, exporter.export(spans)).await;
            let error = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
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
                        tracing::warn!(spans = n, error = %e, "tracing: cannot export spans; dropped (counted in wasmesh_tracing_spans_dropped_total)");
                    }
                }
            }
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
