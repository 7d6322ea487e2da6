//! Inbound HTTP: requests to this pod's app, from other pods (through their sidecars, or
//! plaintext clients in permissive mode). With mTLS on, each request is first authorized for the
//! client's identity and the destination port (denied: 403 `x-wasmesh-error: forbidden`, logged
//! with both identities and counted; the connection stays open for the requests that are
//! allowed, and a changed policy applies from the next request). Then it goes through the
//! inbound Wasm filters and on to the app over a pooled connection from 127.0.0.6 — no routing,
//! the app is the only destination. Upgrades (WebSocket) and CONNECT get a connection of their
//! own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use http::header::{self};
use http::{Request, Response, StatusCode, Version};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use wasmesh_wasm::body::FilteredBody;
use wasmesh_wasm::{Direction as WasmDirection, StreamInfo, Verdict};

use super::ORIG_PROTO;
use super::forward::{
    filter_event, filter_response, finish, head_with, local_reply, method_name, protocol_name,
    set_method_and_version, tunnel,
};
use super::headers::{is_grpc, is_upgrade, set_target, strip_hop_by_hop};
use super::pool::{Sent, Wire, plain};
use super::prefixed::Prefixed;
use super::respond::HttpError;
use super::{Body, boxed};
use crate::detect::Protocol;
use crate::filters::select::Direction as FilterSide;
use crate::identity::{Decision, MeshStats, accept};
use crate::inbound::Inbound;
use crate::metrics::{Direction, Exchange, Outcomes};
use crate::otel::{Attributes, Span};
use crate::state::Stats;
use opentelemetry::trace::SpanKind;

/// Who sent an inbound connection and where it was going.
#[derive(Debug, Clone)]
pub struct InboundConn {
    pub peer: SocketAddr,
    pub dst: SocketAddr,
    /// The client's SPIFFE ID when it came over mesh mTLS.
    pub identity: Option<wasmesh_api::spiffe::SpiffeId>,
    /// Where the responses are counted: the Service that selects this pod on the destination
    /// port and the client's identity.
    pub outcomes: Arc<Outcomes>,
    /// Its attributes in a server span (the same for every request it carries), made by its
    /// first traced request.
    pub span_attributes: OnceLock<Attributes>,
}

impl InboundConn {
    /// `service`: the Service that selects this pod on `dst`'s port.
    pub fn new(
        peer: SocketAddr,
        dst: SocketAddr,
        identity: Option<wasmesh_api::spiffe::SpiffeId>,
        service: crate::metrics::Name,
    ) -> Self {
        let label = identity
            .as_ref()
            .map(|id| crate::metrics::label(&id.to_string()));
        let outcomes = Outcomes::new(Direction::Inbound, service, None, label);
        Self {
            peer,
            dst,
            identity,
            outcomes: Arc::new(outcomes),
            span_attributes: OnceLock::new(),
        }
    }
}

/// Serves one inbound connection the bytes say is HTTP.
pub async fn serve_inbound<IO>(
    inb: Arc<Inbound>,
    io: IO,
    protocol: Protocol,
    prefix: BytesMut,
    c: InboundConn,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Stats::inc(&inb.state.stats.inbound_http_connections);
    let (peer, dst) = (c.peer, c.dst);
    let c = Arc::new(c);
    let svc = service_fn(move |req| {
        let inb = inb.clone();
        let c = c.clone();
        // Boxed, as on the outbound side (`http/server.rs`).
        Box::pin(async move { Ok::<_, Infallible>(inb.to_app(req, &c).await) })
    });
    let io = TokioIo::new(Prefixed::new(prefix, io));
    let result = match protocol {
        Protocol::Http2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(4 << 20)
                .adaptive_window(true)
                .serve_connection(io, svc)
                .await
        }
        _ => {
            hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(io, svc)
                .with_upgrades()
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, %dst, error = %e, "inbound HTTP connection ended");
    }
}

impl Inbound {
    /// May this request's client reach the destination port? Decided per request (policies
    /// change under long-lived connections); without mTLS there are no policies.
    fn authorize_request(&self, req: &Request<Incoming>, c: &InboundConn) -> Result<(), HttpError> {
        let Some(mesh) = &self.mesh else {
            return Ok(());
        };
        let client = c.identity.as_ref();
        match mesh.authorizer.authorize(client, c.dst.port()) {
            Decision::Allow => Ok(()),
            Decision::Deny { policies } => {
                MeshStats::inc(&mesh.stats.authz_denied);
                tracing::warn!(
                    peer = %c.peer, dst = %c.dst, client = %accept::client_name(client),
                    local = %accept::local_identity(mesh), %policies, method = %req.method(),
                    path = req.uri().path(), "request denied by authorization policy (403)"
                );
                Err(HttpError::Forbidden {
                    client: accept::client_name(client),
                    port: c.dst.port(),
                })
            }
        }
    }

    /// One request to the app: its response, or the proxy's own answer.
    async fn to_app(&self, req: Request<Incoming>, c: &InboundConn) -> Response<Body> {
        let mut x = Exchange::start(&self.state, Direction::Inbound, c.peer, &req);
        x.outcomes = Some(c.outcomes.clone());
        x.upstream = Some(c.dst);
        let grpc = is_grpc(req.headers());
        // The server span: a child of the calling sidecar's client span (or of whatever the
        // client sent), the parent of the app's.
        let mut span = self
            .state
            .tracer
            .load()
            .as_ref()
            .map(|t| t.start(SpanKind::Server, req.headers()));
        if let Some(s) = span.as_mut()
            && s.is_sampled()
        {
            set_method_and_version(s, req.method(), req.version());
            s.set_str("url.path", req.uri().path());
            s.set_all(c.span_attributes.get_or_init(|| {
                let a = Attributes::new()
                    .with("server.port", i64::from(c.dst.port()))
                    .with("client.address", c.peer.ip())
                    .with("network.peer.address", c.peer.ip())
                    .with("network.peer.port", i64::from(c.peer.port()));
                match &c.identity {
                    Some(id) => a.with_concat("wasmesh.peer.identity", &id.uri_parts()),
                    None => a,
                }
            }));
            s.name(method_name(req.method()));
        }
        if let Some(s) = span.as_ref() {
            x.trace(|| s.trace_id_hex());
        }
        // Boxed, as on the outbound side: hyper moves this future into a task per stream.
        let resp = match Box::pin(self.to_app_inner(req, c, &mut span)).await {
            Ok(r) => {
                if let Some(s) = span {
                    s.end(Some(r.status().as_u16()), None);
                }
                r
            }
            Err(e) => {
                // A denial was logged already, with both identities.
                if !matches!(e, HttpError::Forbidden { .. }) {
                    tracing::info!(peer = %c.peer, dst = %c.dst, cause = e.cause(), error = %e, "inbound request answered by the proxy");
                }
                let cause = e.cause();
                let r = e.into_response(grpc);
                if let Some(s) = span {
                    s.end(Some(r.status().as_u16()), Some(cause));
                }
                r
            }
        };
        x.finish(&self.state, &resp);
        resp
    }

    async fn to_app_inner(
        &self,
        mut req: Request<Incoming>,
        c: &InboundConn,
        span: &mut Option<Span>,
    ) -> Result<Response<Body>, HttpError> {
        Stats::inc(&self.state.stats.inbound_http_requests);
        self.authorize_request(&req, c)?;
        let client_version = req.version();
        let upgrade = is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        parts.headers.remove(header::EXPECT);

        let request_eos = body.is_end_stream();
        let chain = self
            .filters
            .as_ref()
            .and_then(|f| f.chain(FilterSide::Inbound, c.dst.port(), None))
            .map(|chain| {
                Arc::new(tokio::sync::Mutex::new(chain.new_stream(StreamInfo {
                    source: Some(c.peer),
                    destination: Some(c.dst),
                    mtls: c.identity.is_some(),
                    peer_identity: c.identity.as_ref().map(ToString::to_string),
                    protocol: protocol_name(client_version),
                    ..StreamInfo::default()
                })))
            });
        if let Some(ch) = &chain {
            let verdict = ch
                .lock()
                .await
                .on_request_headers(&mut parts, request_eos)
                .await;
            filter_event(span, "inbound", &verdict);
            match verdict {
                Verdict::Continue => {}
                Verdict::LocalReply(r) => return Ok(local_reply(r)),
                Verdict::Reset => return Err(HttpError::FilterReset),
            }
        }
        let body: Body = match &chain {
            Some(ch) if !request_eos => boxed(FilteredBody::new(
                body,
                ch.clone(),
                WasmDirection::Request,
                false,
            )),
            _ => boxed(body),
        };

        // The app gets the version the client spoke: the outbound sidecar may have carried an
        // HTTP/1.1 request over its HTTP/2 mesh connection, and says so.
        let orig_h1 = parts.headers.remove(ORIG_PROTO).is_some();
        let (wire, version) = if client_version == Version::HTTP_2 && !upgrade && !orig_h1 {
            (Wire::Http2, Version::HTTP_2)
        } else {
            (Wire::Http1, Version::HTTP_11)
        };
        set_target(&mut parts, version, None, None, || c.dst.to_string())
            .map_err(|e| HttpError::BadRequest(format!("cannot form the request target: {e}")))?;
        if let Some(s) = span.as_ref() {
            s.inject(&mut parts.headers);
        }

        let app_unavailable = |e: String| HttpError::ConnectFailed {
            service: format!("the app on port {}", c.dst.port()),
            tried: 1,
            last: e,
        };
        let connect = parts.method == http::Method::CONNECT;
        // Moved, not copied (as the outbound side's retries need): a request the app's
        // connection never took comes back whole ([`Sent::NotSent`]).
        let mut req = Some(head_with(parts, body));
        for _ in 0..3 {
            let conn = if upgrade {
                self.pools.dedicated_h1(plain(c.dst)).await
            } else {
                self.pools.checkout(plain(c.dst), wire).await
            }
            .map_err(|e| {
                Stats::inc(&self.state.stats.inbound_app_refused);
                app_unavailable(e.to_string())
            })?;
            let Some(r) = req.take() else { break };
            match conn.send(r).await {
                Sent::Response(mut resp) => {
                    let upstream_upgrade = (resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        || (connect && resp.status().is_success()))
                    .then(|| hyper::upgrade::on(&mut resp));
                    if let (Some(client), Some(upstream)) = (client_upgrade, upstream_upgrade) {
                        tunnel(client, upstream, format!("app port {}", c.dst.port()));
                    }
                    let resp = finish(resp, client_version, None, None);
                    return Ok(match &chain {
                        Some(ch) => filter_response(ch, resp, c.dst).await,
                        None => resp,
                    });
                }
                // The app closed an idle pooled connection: the request is intact, send it on
                // a new one.
                Sent::NotSent(r, _) => req = Some(r),
                Sent::Failed(e) => return Err(HttpError::Upstream(e.to_string())),
            }
        }
        Err(app_unavailable("the app kept closing connections".into()))
    }
}
