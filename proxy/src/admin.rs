//! The proxy's admin port (15000): `/ready` (the first table arrived), `/live`, `/config`
//! (this proxy's table as JSON), `/metrics` (OpenMetrics text, [`crate::metrics`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;

/// What `/metrics` answers in (Prometheus reads it; so do OpenMetrics parsers).
const METRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

use crate::state::ProxyState;
use crate::table::{Locality, ServicePort};

#[derive(Serialize)]
struct ConfigDump<'a> {
    ready: bool,
    control_connected: bool,
    version: u64,
    locality: Locality,
    service_ports: Vec<&'a ServicePort>,
}

#[derive(Serialize)]
struct EndpointLoadDump {
    active: usize,
    picked: u64,
    recently_failed: bool,
}

fn config(state: &ProxyState) -> String {
    let (locality, ports): (Locality, Vec<Arc<ServicePort>>) = {
        let builder = state.builder.lock().unwrap_or_else(|e| e.into_inner());
        (builder.locality().clone(), builder.ports())
    };
    let dump = ConfigDump {
        ready: state.is_ready(),
        control_connected: state.control_connected.load(Ordering::Relaxed),
        version: state.version.load(Ordering::Relaxed),
        locality,
        service_ports: ports.iter().map(|p| p.as_ref()).collect(),
    };
    let mut v = serde_json::to_value(&dump).unwrap_or_default();
    // Add live load figures next to each endpoint.
    if let Some(ports) = v.get_mut("service_ports").and_then(|p| p.as_array_mut()) {
        for (sp, json) in dump.service_ports.iter().zip(ports) {
            if let Some(eps) = json.get_mut("endpoints").and_then(|e| e.as_array_mut()) {
                for (ep, j) in sp.endpoints.iter().zip(eps) {
                    let load = EndpointLoadDump {
                        active: ep.load.active(),
                        picked: ep.load.picked.load(Ordering::Relaxed),
                        recently_failed: ep.load.recently_failed(),
                    };
                    if let Some(o) = j.as_object_mut() {
                        o.insert(
                            "load".into(),
                            serde_json::to_value(load).unwrap_or_default(),
                        );
                    }
                }
            }
        }
    }
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

fn respond(
    state: &ProxyState,
    registry: &Registry,
    method: &hyper::Method,
    path: &str,
    peer: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match path {
        // Ends the proxy (classic-mode sidecars in Jobs): only from inside the pod.
        "/quitquitquit" if method != hyper::Method::POST => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use POST\n".to_string(),
        ),
        "/quitquitquit" if !peer.ip().is_loopback() => (
            StatusCode::FORBIDDEN,
            "text/plain",
            "only from inside the pod (127.0.0.1)\n".to_string(),
        ),
        "/quitquitquit" => {
            tracing::info!(%peer, "asked to quit");
            state.quit.notify_one();
            (
                StatusCode::OK,
                "text/plain",
                "quitting: draining connections\n".to_string(),
            )
        }
        "/live" => (StatusCode::OK, "text/plain", "live\n".to_string()),
        "/ready" if state.is_ready() => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: no table from control yet\n".to_string(),
        ),
        "/config" => (StatusCode::OK, "application/json", config(state)),
        "/metrics" => (
            StatusCode::OK,
            METRICS_TYPE,
            crate::metrics::render(registry),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /ready, /live, /config, /metrics or POST /quitquitquit\n".to_string(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Serves the admin endpoints on `listener` forever. The metrics registry is built here, once.
pub async fn serve(listener: TcpListener, state: Arc<ProxyState>) {
    let registry = Arc::new(crate::metrics::registry(state.clone()));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = respond(&state, &registry, req.method(), req.uri().path(), peer);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
