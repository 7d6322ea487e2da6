//! Control's admin endpoint: `/ready` (the table is synced), `/live`, `/metrics` (with the CA's
//! counters when control is the mesh's CA).

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::discovery::Hub;
use crate::identity::service::IdentityStats;

fn respond(hub: &Hub, identity: Option<&IdentityStats>, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/live" => (StatusCode::OK, "live\n".to_string()),
        "/ready" if hub.is_synced() => (StatusCode::OK, "ready\n".to_string()),
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for a complete list of Services, EndpointSlices, Pods and Nodes\n"
                .to_string(),
        ),
        "/metrics" => {
            let mut m = metrics(hub);
            if let Some(i) = identity {
                i.render(&mut m);
            }
            (StatusCode::OK, m)
        }
        _ => (
            StatusCode::NOT_FOUND,
            "not found: try /ready, /live or /metrics\n".to_string(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn metrics(hub: &Hub) -> String {
    let s = &hub.stats;
    let mut out = String::new();
    let (modules, module_bytes) = hub.module_stats();
    let rows: [(&str, &str, &str, u64); 10] = [
        (
            "wasmesh_control_synced",
            "gauge",
            "1 once the table is complete",
            u64::from(hub.is_synced()),
        ),
        (
            "wasmesh_control_table_version",
            "gauge",
            "Version of the last published table",
            hub.version(),
        ),
        (
            "wasmesh_control_subscribers",
            "gauge",
            "Proxies connected to the discovery stream",
            s.subscribers.load(Ordering::Relaxed) as u64,
        ),
        (
            "wasmesh_control_snapshots_sent_total",
            "counter",
            "Snapshots sent to proxies",
            s.snapshots_sent.load(Ordering::Relaxed),
        ),
        (
            "wasmesh_control_deltas_published_total",
            "counter",
            "Deltas published",
            s.deltas_published.load(Ordering::Relaxed),
        ),
        (
            "wasmesh_control_resyncs_total",
            "counter",
            "Proxies that fell behind and were sent a fresh snapshot",
            s.resyncs.load(Ordering::Relaxed),
        ),
        (
            "wasmesh_control_wasm_modules",
            "gauge",
            "Wasm modules held for GetModule (one per sha256 some WasmPlugin names)",
            modules as u64,
        ),
        (
            "wasmesh_control_wasm_module_bytes",
            "gauge",
            "Total size of the Wasm modules held",
            module_bytes as u64,
        ),
        (
            "wasmesh_control_modules_sent_total",
            "counter",
            "GetModule requests answered with a module",
            s.modules_sent.load(Ordering::Relaxed),
        ),
        (
            "wasmesh_control_modules_not_found_total",
            "counter",
            "GetModule requests for a sha256 no WasmPlugin names",
            s.modules_not_found.load(Ordering::Relaxed),
        ),
    ];
    for (name, ty, help, value) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {ty}\n{name} {value}"
        );
    }
    out
}

/// Serves admin requests on `listener` forever.
pub async fn serve(listener: TcpListener, hub: Arc<Hub>) {
    serve_with_identity(listener, hub, None).await
}

/// [`serve`], with the CA's counters on `/metrics`.
pub async fn serve_with_identity(
    listener: TcpListener,
    hub: Arc<Hub>,
    identity: Option<Arc<IdentityStats>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let hub = hub.clone();
        let identity = identity.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = respond(&hub, identity.as_deref(), req.uri().path());
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
