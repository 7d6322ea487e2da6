//! `proxy_http_call` from a filter: the upstream is a mesh Service — `name`, `name.namespace`
//! (the pod's namespace by default), optionally `:port` (default: the Service's first port) —
//! and the request goes to one of its endpoints the way the sidecar's own requests do: usable
//! endpoints only, the per-request balancer, pooled connections, mesh TLS to meshed pods.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use wasmesh_wasm::{CalloutError, CalloutFailure, CalloutResponse, HttpCallouts};

use crate::balance::{self, BalancerKind, Unit};
use crate::http::pool::{Pools, Sent, Wire};
use crate::http::{full, headers::set_target};
use crate::state::ProxyState;
use crate::table::{Selection, ServicePort};

pub struct MeshCallouts {
    pub state: Arc<ProxyState>,
    pub pools: Arc<Pools>,
    /// The pod's namespace: `name` alone means a Service there.
    pub namespace: String,
}

/// `name[.namespace][:port]`.
fn parse(upstream: &str, default_ns: &str) -> Option<(String, String, Option<u16>)> {
    let (host, port) = match upstream.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse().ok()?)),
        None => (upstream, None),
    };
    let host = host
        .trim_end_matches(".svc.cluster.local")
        .trim_end_matches(".svc");
    let (name, ns) = match host.split_once('.') {
        Some((n, ns)) => (n, ns),
        None => (host, default_ns),
    };
    (!name.is_empty()).then(|| (name.to_string(), ns.to_string(), port))
}

impl MeshCallouts {
    fn service(&self, upstream: &str) -> Option<Arc<ServicePort>> {
        let (name, ns, port) = parse(upstream, &self.namespace)?;
        let table = self.state.table.load();
        match port {
            Some(p) => table.service_port(&ns, &name, p),
            None => table.service_ports_of(&ns, &name).into_iter().next(),
        }
    }
}

impl HttpCallouts for MeshCallouts {
    fn call(
        &self,
        upstream: &str,
        request: http::Request<Bytes>,
        _timeout: Duration,
    ) -> Result<BoxFuture<'static, Result<CalloutResponse, CalloutFailure>>, CalloutError> {
        let sp = self
            .service(upstream)
            .ok_or_else(|| CalloutError::UnknownUpstream(upstream.to_string()))?;
        let pools = self.pools.clone();
        Ok(Box::pin(async move {
            let v4: SocketAddr = ([0, 0, 0, 0], sp.port).into();
            let Selection::Endpoints(candidates) = sp.selection(crate::table::Via::ClusterIp, v4)
            else {
                return Err(CalloutFailure(format!(
                    "no usable endpoint for {}",
                    sp.name()
                )));
            };
            let kind = sp.balancer.unwrap_or(BalancerKind::P2c);
            let i = balance::pick(
                kind,
                Unit::Request,
                candidates,
                &|i| sp.endpoints[i].load.clone(),
                &[],
                &sp.rr,
            )
            .ok_or_else(|| CalloutFailure(format!("no endpoint for {}", sp.name())))?;
            let ep = &sp.endpoints[i];
            let wire = if pools.is_mesh(&ep.mesh_peer()) {
                Wire::Http2
            } else {
                Wire::Http1
            };
            let (mut parts, body) = request.into_parts();
            let version = match wire {
                Wire::Http1 => http::Version::HTTP_11,
                Wire::Http2 => http::Version::HTTP_2,
            };
            set_target(&mut parts, version, None, None, || {
                format!("{}.{}:{}", sp.service, sp.namespace, sp.port)
            })
            .map_err(|e| CalloutFailure(e.to_string()))?;
            if wire == Wire::Http2 {
                parts.headers.insert(
                    crate::http::ORIG_PROTO,
                    http::HeaderValue::from_static("HTTP/1.1"),
                );
            }
            let conn = pools
                .checkout(ep.mesh_peer(), wire)
                .await
                .map_err(|e| CalloutFailure(e.to_string()))?;
            let guard = ep.load.request();
            let started = std::time::Instant::now();
            let resp = match conn
                .send(http::Request::from_parts(parts, full(body)))
                .await
            {
                Sent::Response(r) => r,
                Sent::NotSent(_, e) | Sent::Failed(e) => return Err(CalloutFailure(e.to_string())),
            };
            guard.observe(started.elapsed());
            let (parts, body) = resp.into_parts();
            let collected = body
                .collect()
                .await
                .map_err(|e| CalloutFailure(e.to_string()))?;
            let trailers = collected.trailers().cloned().unwrap_or_default();
            Ok(CalloutResponse {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body: collected.to_bytes(),
                trailers,
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn upstream_names() {
        let p = |s| parse(s, "demo");
        assert_eq!(p("auth"), Some(("auth".into(), "demo".into(), None)));
        assert_eq!(
            p("auth.sec:8080"),
            Some(("auth".into(), "sec".into(), Some(8080)))
        );
        assert_eq!(
            p("auth.sec.svc.cluster.local"),
            Some(("auth".into(), "sec".into(), None))
        );
        assert_eq!(p("auth:x"), None);
    }
}
