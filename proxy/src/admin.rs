//! The proxy's admin port (15000): `/ready` (the first table arrived), `/live`, `/config`
//! (this proxy's table as JSON), `/metrics` (Prometheus text).

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpListener;

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

fn metrics(state: &ProxyState) -> String {
    let s = &state.stats;
    let counters: [(&str, &str, &AtomicU64); 21] = [
        (
            "wasmesh_outbound_connections_total",
            "Outbound connections accepted",
            &s.outbound_accepted,
        ),
        (
            "wasmesh_outbound_service_connections_total",
            "Outbound connections to a Service",
            &s.outbound_to_service,
        ),
        (
            "wasmesh_outbound_passthrough_connections_total",
            "Outbound connections passed through to their original destination",
            &s.outbound_passthrough,
        ),
        (
            "wasmesh_outbound_refused_no_endpoints_total",
            "Outbound connections refused: no usable endpoint",
            &s.outbound_refused_no_endpoints,
        ),
        (
            "wasmesh_outbound_refused_local_policy_total",
            "Outbound connections refused: internalTrafficPolicy Local and no local endpoint",
            &s.outbound_refused_local_policy,
        ),
        (
            "wasmesh_outbound_refused_unknown_port_total",
            "Outbound connections refused: a virtual IP without that port",
            &s.outbound_refused_unknown_port,
        ),
        (
            "wasmesh_outbound_connect_failures_total",
            "Connects to an endpoint that failed",
            &s.outbound_connect_failures,
        ),
        (
            "wasmesh_outbound_failovers_total",
            "Connects retried on another endpoint",
            &s.outbound_failovers,
        ),
        (
            "wasmesh_outbound_failed_total",
            "Outbound connections no endpoint accepted",
            &s.outbound_failed,
        ),
        (
            "wasmesh_inbound_connections_total",
            "Inbound connections accepted",
            &s.inbound_accepted,
        ),
        (
            "wasmesh_inbound_app_refused_total",
            "Inbound connections the app did not accept",
            &s.inbound_app_refused,
        ),
        (
            "wasmesh_tcp_sent_bytes_total",
            "Bytes from clients to upstreams",
            &s.bytes_sent,
        ),
        (
            "wasmesh_tcp_received_bytes_total",
            "Bytes from upstreams to clients",
            &s.bytes_received,
        ),
        (
            "wasmesh_http_connections_total",
            "Outbound connections served as HTTP",
            &s.http_connections,
        ),
        (
            "wasmesh_detected_opaque_total",
            "Outbound connections to undeclared ports that detection left as TCP",
            &s.detected_opaque,
        ),
        (
            "wasmesh_http_requests_total",
            "HTTP requests from the app",
            &s.http_requests,
        ),
        (
            "wasmesh_http_proxy_errors_total",
            "HTTP requests the proxy answered itself (x-wasmesh-error)",
            &s.http_errors,
        ),
        (
            "wasmesh_http_timeouts_total",
            "HTTP tries that ran out of time",
            &s.http_timeouts,
        ),
        (
            "wasmesh_http_retries_total",
            "HTTP requests sent again (status code, failure or timeout)",
            &s.http_retries,
        ),
        (
            "wasmesh_http_retries_over_budget_total",
            "HTTP retries the retry budget refused",
            &s.http_retries_over_budget,
        ),
        (
            "wasmesh_control_reconnects_total",
            "Times the control stream was lost",
            &s.control_reconnects,
        ),
    ];
    let mut out = String::new();
    for (name, help, c) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            c.load(Ordering::Relaxed)
        );
    }
    let gauges = [
        (
            "wasmesh_ready",
            "1 once the first table arrived",
            u64::from(state.is_ready()),
        ),
        (
            "wasmesh_control_connected",
            "1 while the control stream is up",
            u64::from(state.control_connected.load(Ordering::Relaxed)),
        ),
        (
            "wasmesh_table_version",
            "Version of the table in use",
            state.version.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    state.mesh_stats.render(&mut out);
    state
        .trace_stats
        .render(&mut out, state.tracer.load().is_some());
    if let Some(h) = state.filters.get().and_then(|f| f.host()) {
        h.render_prometheus(&mut out);
    }
    out
}

fn respond(
    state: &ProxyState,
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
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", metrics(state)),
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

pub async fn serve(listener: TcpListener, state: Arc<ProxyState>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = respond(&state, req.method(), req.uri().path(), peer);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
