//! One outbound HTTP request, from the app to an endpoint: route → rule filters → backend by
//! weight → endpoint by the per-request balancer → pooled connection, with the rule's timeouts
//! and retries. Every failure comes back as an [`HttpError`] (made into a response by
//! [`respond`](super::respond)).
//!
//! Retries: a failed connect moves on to another endpoint whatever the route says (nothing was
//! sent). Status retries (`HTTPRouteRule.retry`) and retries after a per-try timeout happen
//! only for idempotent methods whose body is empty or small enough to keep (64 KiB), with a
//! jittered, doubling backoff, within the proxy's [`Budget`](super::retry::Budget).

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use rand::Rng;

use super::headers::{authority, is_grpc, is_upgrade, set_target, strip_hop_by_hop};
use super::pool::{Conn, Pools, Sent, Wire};
use super::respond::HttpError;
use super::retry::{Budget, idempotent};
use super::route::{Backend, Pick, Redirect, RequestView, Rule, rewrite_path};
use super::{Body, boxed, full};
use crate::balance::{self, Unit};
use crate::detect::Declared;
use crate::filters::select::Direction as FilterSide;
use crate::metrics::{Direction, Exchange};
use crate::otel::{Attributes, Span};
use crate::outbound::Outbound;
use crate::state::Stats;
use crate::table::{Route, Selection, ServicePort, Via};
use opentelemetry::trace::SpanKind;
use wasmesh_wasm::body::FilteredBody;
use wasmesh_wasm::{ChainStream, Direction as WasmDirection, StreamInfo, Verdict};

/// Bodies up to this size are kept so the request can be retried.
const MAX_REPLAY_BODY: u64 = 64 * 1024;
/// Requests a reused connection never sent (closed while idle) are re-sent at most this often.
const MAX_NOT_SENT: usize = 3;

/// What the outbound HTTP path keeps between requests.
#[derive(Debug)]
pub struct Forwarder {
    pub pools: Pools,
    pub budget: Budget,
}

/// Where the request came from and where it was going.
#[derive(Debug, Clone, Copy)]
pub struct Conn4 {
    pub peer: SocketAddr,
    pub dst: SocketAddr,
    pub via: Via,
}

impl Outbound {
    /// Answers one request from the app: the endpoint's response, or the proxy's own.
    pub async fn forward(&self, req: Request<Incoming>, c: Conn4) -> Response<Body> {
        let mut x = Exchange::start(&self.state, Direction::Outbound, c.peer, &req);
        let grpc = is_grpc(req.headers());
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let version = req.version();
        // The client span: the caller's trace continued (or a new one), ours the parent of
        // the endpoint's.
        let mut span = self
            .state
            .tracer
            .load()
            .as_ref()
            .map(|t| t.start(SpanKind::Client, req.headers()));
        if let Some(s) = span.as_mut() {
            set_method_and_version(s, &method, version);
            s.set_str("url.path", &path);
            s.name(method_name(&method));
        }
        if let Some(s) = span.as_ref() {
            x.trace(|| s.trace_id_hex());
        }
        // Boxed: the request's state machine is large, and hyper moves the service future
        // into a task per HTTP/2 stream — a pointer moves cheaper than kilobytes.
        let resp = match Box::pin(self.forward_inner(req, c, &mut x, &mut span)).await {
            Ok(resp) => {
                if let Some(s) = span {
                    s.end(Some(resp.status().as_u16()), None);
                }
                resp
            }
            Err(e) => {
                Stats::inc(&self.state.stats.http_errors);
                tracing::info!(peer = %c.peer, dst = %c.dst, %method, %path, cause = e.cause(), error = %e, "answered by the proxy");
                let close = matches!(e, HttpError::BadRequest(_)) && version < Version::HTTP_2;
                let cause = e.cause();
                let mut resp = e.into_response(grpc);
                if close {
                    // After a malformed request the connection's state is not to be trusted.
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                if let Some(s) = span {
                    s.end(Some(resp.status().as_u16()), Some(cause));
                }
                resp
            }
        };
        x.finish(&self.state, &resp);
        resp
    }

    async fn forward_inner(
        &self,
        mut req: Request<Incoming>,
        c: Conn4,
        x: &mut Exchange,
        span: &mut Option<Span>,
    ) -> Result<Response<Body>, HttpError> {
        let started = Instant::now();
        let stats = &self.state.stats;
        Stats::inc(&stats.http_requests);
        let client_version = req.version();
        if client_version == Version::HTTP_11 && !req.headers().contains_key(header::HOST) {
            return Err(HttpError::BadRequest(
                "HTTP/1.1 request without Host".into(),
            ));
        }
        let upgrade = is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        // hyper answers `Expect: 100-continue` when the body is first read; the endpoint gets
        // the body without having to ask.
        parts.headers.remove(header::EXPECT);

        let table = self.state.table.load();
        let Route::Service(sp, via) = table.route(c.dst) else {
            return Err(HttpError::NoService);
        };
        x.outcomes = Some(sp.outcomes.clone());
        // Wasm filters see the request first: the route is chosen on what they leave.
        let request_eos = body.is_end_stream();
        let chain = self
            .filters
            .as_ref()
            .and_then(|f| {
                f.chain(
                    FilterSide::Outbound,
                    sp.port,
                    Some((&sp.namespace, &sp.service)),
                )
            })
            .map(|chain| {
                Arc::new(tokio::sync::Mutex::new(chain.new_stream(StreamInfo {
                    source: Some(c.peer),
                    destination: Some(c.dst),
                    protocol: protocol_name(client_version),
                    upstream_service: Some(format!("{}.{}", sp.service, sp.namespace)),
                    ..StreamInfo::default()
                })))
            });
        if let Some(ch) = &chain {
            let verdict = ch
                .lock()
                .await
                .on_request_headers(&mut parts, request_eos)
                .await;
            filter_event(span, "outbound", &verdict);
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
        let view = RequestView {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        };
        let (rule, matched_prefix): (Option<Arc<Rule>>, Option<String>) =
            match sp.routes.pick(&view) {
                Pick::Default => (None, None),
                Pick::NoMatch => return Err(HttpError::NoRoute),
                Pick::Rule(r) => (
                    Some(r.clone()),
                    sp.routes.matched_prefix(r, &view).map(str::to_string),
                ),
            };
        if let Some(r) = &rule {
            x.outcomes = Some(r.outcomes(&sp.label));
        }
        if let Some(s) = span.as_mut()
            && s.is_sampled()
        {
            s.set_all(sp.span_attributes.get_or_init(|| {
                Attributes::new()
                    .with("wasmesh.destination.service", sp.label.clone())
                    .with_concat("server.address", &[&sp.service, ".", &sp.namespace, ".svc"])
                    .with("server.port", i64::from(sp.port))
            }));
            if let Some(r) = &rule {
                s.set("http.route", r.name.clone());
                s.name_with_route(method_name(&parts.method), &r.name);
            }
        }
        // The target as the route rewrites it; None: the request's own, kept as it came.
        let mut rewritten_path: Option<String> = None;
        let mut rewritten_host: Option<&str> = None;
        if let Some(rule) = &rule {
            if let Some(rd) = &rule.redirect {
                return Ok(redirect(
                    rd,
                    parts.uri.path(),
                    parts.uri.query(),
                    authority(&parts.uri, &parts.headers).as_deref(),
                    matched_prefix.as_deref(),
                ));
            }
            if let Some(m) = &rule.request_headers {
                m.apply(&mut parts.headers);
            }
            if let Some(rw) = &rule.rewrite {
                if let Some(p) = &rw.path {
                    let path = rewrite_path(parts.uri.path(), p, matched_prefix.as_deref());
                    rewritten_path = Some(match parts.uri.query() {
                        Some(q) => format!("{path}?{q}"),
                        None => path,
                    });
                }
                rewritten_host = rw.hostname.as_deref();
            }
        }
        let backend: Option<Backend> = match &rule {
            None => None,
            Some(r) => Some(
                r.pick_backend(&mut |n| rand::rng().random_range(0..n))
                    .cloned()
                    .ok_or(HttpError::NoBackend)?,
            ),
        };
        let (target, target_via) = match &backend {
            None => (sp.clone(), via),
            Some(b) => {
                let port = if b.port == 0 { sp.port } else { b.port };
                if b.namespace == sp.namespace && b.service == sp.service && port == sp.port {
                    (sp.clone(), via)
                } else {
                    let t = table
                        .service_port(&b.namespace, &b.service, port)
                        .ok_or_else(|| {
                            HttpError::BackendNotFound(format!(
                                "{}/{}:{port}",
                                b.namespace, b.service
                            ))
                        })?;
                    (t, Via::ClusterIp)
                }
            }
        };
        if let Some(m) = backend.as_ref().and_then(|b| b.request_headers.as_ref()) {
            m.apply(&mut parts.headers);
        }
        let candidates: Vec<usize> = match target.selection(target_via, c.dst) {
            Selection::Endpoints(e) => e.clone(),
            Selection::Reject | Selection::Drop => {
                return Err(HttpError::NoEndpoints(target.name()));
            }
        };

        let wire = if upgrade {
            Wire::Http1
        } else if client_version == Version::HTTP_2 || target.protocol == Declared::Http2 {
            Wire::Http2
        } else {
            Wire::Http1
        };
        let version = match wire {
            Wire::Http1 => Version::HTTP_11,
            Wire::Http2 => Version::HTTP_2,
        };
        // HTTP/1.0 may come without a Host: name the Service, as the app addressed it.
        set_target(
            &mut parts,
            version,
            rewritten_host,
            rewritten_path.as_deref(),
            || format!("{}.{}:{}", sp.service, sp.namespace, sp.port),
        )
        .map_err(|e| HttpError::BadRequest(format!("cannot form the request target: {e}")))?;
        if let Some(s) = span.as_ref() {
            s.inject(&mut parts.headers);
        }

        // Retries beyond failed connects need a body that can be sent again.
        let retry = rule
            .as_ref()
            .and_then(|r| r.retry.clone())
            .filter(|_| idempotent(&parts.method) && !upgrade);
        // The route's limit, else the proxy's default (a hung endpoint must not hang the app's
        // connection forever); "0s" in the route means none.
        let deadline = rule
            .as_ref()
            .and_then(|r| r.request_timeout)
            .or(self.config.request_timeout)
            .filter(|t| !t.is_zero())
            .map(|t| (started + t, t));
        let per_try = rule.as_ref().and_then(|r| r.backend_timeout);
        let (replay, mut body): (Option<Bytes>, Option<Body>) = if body.is_end_stream() {
            (Some(Bytes::new()), None)
        } else if retry.is_some()
            && body
                .size_hint()
                .upper()
                .is_some_and(|n| n <= MAX_REPLAY_BODY)
        {
            let collect = body.collect();
            let bytes = match deadline {
                Some((at, t)) => tokio::time::timeout_at(at.into(), collect)
                    .await
                    .map_err(|_| HttpError::Timeout(t))?,
                None => collect.await,
            }
            .map_err(|e| HttpError::BadRequest(format!("reading the request body: {e}")))?
            .to_bytes();
            (Some(bytes), None)
        } else {
            (None, Some(body))
        };

        let kind = target.balancer.unwrap_or(self.config.balancer);
        let mut tried: Vec<usize> = Vec::new();
        let mut connect_failures = 0usize;
        let mut not_sent = 0usize;
        let mut status_retries = 0u32;
        let mut last_error = String::from("no endpoint could be tried");
        let mut pending_conn: Option<(usize, Conn)> = None;
        let mut sends = 0u32;
        self.http.budget.deposit();
        loop {
            // The endpoint: kept from a request that was not sent; else affinity; else the
            // balancer, preferring endpoints this request has not tried.
            let (i, conn) = match pending_conn.take() {
                Some(p) => p,
                None => {
                    let i = self
                        .affinity_pick(&target, c, &candidates)
                        .filter(|i| !tried.contains(i))
                        .or_else(|| {
                            balance::pick(
                                kind,
                                Unit::Request,
                                &candidates,
                                &|i| target.endpoints[i].load.clone(),
                                &tried,
                                &target.rr,
                            )
                        })
                        .or_else(|| {
                            // Every endpoint tried: a status retry may go to any of them again.
                            (status_retries > 0)
                                .then(|| {
                                    balance::pick(
                                        kind,
                                        Unit::Request,
                                        &candidates,
                                        &|i| target.endpoints[i].load.clone(),
                                        &[],
                                        &target.rr,
                                    )
                                })
                                .flatten()
                        });
                    let Some(i) = i else { break };
                    tried.push(i);
                    let ep = &target.endpoints[i];
                    ep.picks.inc();
                    x.picks += 1;
                    x.upstream = Some(ep.addr);
                    let ep_wire = self.wire_to(ep, wire, upgrade);
                    let checkout = async {
                        if upgrade {
                            self.http.pools.dedicated_h1(ep.mesh_peer()).await
                        } else {
                            self.http.pools.checkout(ep.mesh_peer(), ep_wire).await
                        }
                    };
                    let conn = match deadline {
                        Some((at, t)) => tokio::time::timeout_at(at.into(), checkout)
                            .await
                            .map_err(|_| HttpError::Timeout(t))?,
                        None => checkout.await,
                    };
                    match conn {
                        Ok(conn) => (i, conn),
                        Err(e) => {
                            ep.load.record_failure();
                            Stats::inc(&stats.outbound_connect_failures);
                            tracing::info!(service = %target.name(), endpoint = %ep.addr, error = %e, "connect failed; trying another endpoint");
                            last_error = e.to_string();
                            connect_failures += 1;
                            if connect_failures >= self.config.connect_attempts.max(1) {
                                break;
                            }
                            Stats::inc(&stats.outbound_failovers);
                            continue;
                        }
                    }
                }
            };
            let ep = &target.endpoints[i];
            sends += 1;
            if let Some(s) = span.as_mut()
                && s.is_sampled()
            {
                // The endpoint of this try (a retry replaces the previous one's).
                s.put_all(
                    "endpoint",
                    ep.span_attributes.get_or_init(|| {
                        let a = Attributes::new()
                            .with("network.peer.address", ep.addr.ip())
                            .with("network.peer.port", i64::from(ep.addr.port()));
                        match &ep.pod {
                            Some(pod) => a.with_concat("wasmesh.endpoint.pod", &[pod.as_str()]),
                            None => a,
                        }
                    }),
                );
                match self.http.pools.peer_identity(&ep.mesh_peer()) {
                    Some(id) => s.put("wasmesh.peer.identity", id),
                    // Not the previous try's.
                    None if sends > 1 => s.unput("wasmesh.peer.identity"),
                    None => {}
                }
                if sends > 1 {
                    s.put("http.request.resend_count", i64::from(sends - 1));
                }
            }
            let this_body = match (&replay, body.take()) {
                (Some(bytes), _) => full(bytes.clone()),
                (None, Some(b)) => b,
                // A streamed body already went out on an earlier try: nothing left to resend.
                (None, None) => break,
            };
            let mut req = rebuild(&parts, this_body);
            // An HTTP/2 connection carrying an HTTP/1.1 request: a meshed endpoint.
            if conn.is_http2() && parts.version != Version::HTTP_2 {
                over_mesh_h2(&mut req);
            }
            let guard = ep.load.request();
            let t0 = Instant::now();
            let limit = match (per_try, deadline) {
                (Some(p), Some((at, _))) => Some((at.min(Instant::now() + p), p)),
                (Some(p), None) => Some((Instant::now() + p, p)),
                (None, Some((at, t))) => Some((at, t)),
                (None, None) => None,
            };
            let sent = match limit {
                Some((at, t)) => match tokio::time::timeout_at(at.into(), conn.send(req)).await {
                    Ok(s) => s,
                    Err(_) => {
                        Stats::inc(&stats.http_timeouts);
                        let overall = deadline.is_some_and(|(d, _)| Instant::now() >= d);
                        if !overall
                            && retry.is_some()
                            && replay.is_some()
                            && self.may_retry(&retry, &mut status_retries)
                        {
                            tracing::debug!(service = %target.name(), endpoint = %ep.addr, "try timed out; retrying");
                            continue;
                        }
                        return Err(HttpError::Timeout(
                            deadline.map(|(_, t)| t).filter(|_| overall).unwrap_or(t),
                        ));
                    }
                },
                None => conn.send(req).await,
            };
            match sent {
                Sent::Response(mut resp) => {
                    // The endpoint's own sidecar could not reach its app: the request never
                    // got there, so it is a failed connect — try another endpoint.
                    // (A sidecar without mTLS, or one control does not know as meshed, says so
                    // the same way.)
                    if resp
                        .headers()
                        .get(super::respond::ERROR_HEADER)
                        .is_some_and(|v| v == "connect-failed")
                    {
                        ep.load.record_failure();
                        Stats::inc(&stats.outbound_connect_failures);
                        last_error = format!("the sidecar of {} could not reach its app", ep.addr);
                        tracing::info!(service = %target.name(), endpoint = %ep.addr, "endpoint's app refused; trying another endpoint");
                        connect_failures += 1;
                        if replay.is_some()
                            && connect_failures < self.config.connect_attempts.max(1)
                        {
                            Stats::inc(&stats.outbound_failovers);
                            continue;
                        }
                        if replay.is_some() {
                            break;
                        }
                    }
                    guard.observe(t0.elapsed());
                    ep.load.record_success();
                    if let Some(t) = target.affinity {
                        self.affinity.record(&target.id, c.peer.ip(), ep.addr, t);
                    }
                    let status = resp.status().as_u16();
                    if let Some(r) = &retry
                        && r.codes.contains(&status)
                        && replay.is_some()
                        && self.may_retry(&retry, &mut status_retries)
                    {
                        // A fast failure would otherwise look like the best endpoint to the
                        // latency balancer: avoid it for a while, as after a failed connect.
                        ep.load.record_failure();
                        tracing::debug!(service = %target.name(), endpoint = %ep.addr, status, "retrying");
                        backoff(r.backoff, status_retries).await;
                        continue;
                    }
                    let upstream_upgrade = (resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        || (parts.method == http::Method::CONNECT && resp.status().is_success()))
                    .then(|| hyper::upgrade::on(&mut resp));
                    if let (Some(client), Some(upstream)) = (client_upgrade, upstream_upgrade) {
                        tunnel(client, upstream, target.name());
                    }
                    let resp = finish(resp, client_version, rule.as_deref(), backend.as_ref());
                    return Ok(match &chain {
                        Some(ch) => filter_response(ch, resp, ep.addr).await,
                        None => resp,
                    });
                }
                Sent::NotSent(req, e) => {
                    // The connection closed while idle; the request is intact.
                    not_sent += 1;
                    if not_sent > MAX_NOT_SENT {
                        return Err(HttpError::Upstream(e.to_string()));
                    }
                    body = Some(req.into_body());
                    let conn = self
                        .http
                        .pools
                        .checkout(ep.mesh_peer(), self.wire_to(ep, wire, upgrade))
                        .await
                        .map_err(|e| HttpError::ConnectFailed {
                            service: target.name(),
                            tried: tried.len(),
                            last: e.to_string(),
                        })?;
                    pending_conn = Some((i, conn));
                }
                Sent::Failed(e) => {
                    ep.load.record_failure();
                    last_error = e.to_string();
                    if replay.is_some()
                        && retry.is_some()
                        && self.may_retry(&retry, &mut status_retries)
                    {
                        continue;
                    }
                    return Err(HttpError::Upstream(e.to_string()));
                }
            }
        }
        Stats::inc(&stats.outbound_failed);
        Err(HttpError::ConnectFailed {
            service: target.name(),
            tried: tried.len(),
            last: last_error,
        })
    }

    /// The version spoken to `ep`: HTTP/1.1 requests to a meshed endpoint travel over the
    /// one HTTP/2 mTLS connection to it (the inbound sidecar gives its app HTTP/1.1 again).
    fn wire_to(&self, ep: &crate::table::Endpoint, wire: Wire, upgrade: bool) -> Wire {
        if !upgrade && wire == Wire::Http1 && self.http.pools.is_mesh(&ep.mesh_peer()) {
            Wire::Http2
        } else {
            wire
        }
    }

    fn affinity_pick(&self, sp: &ServicePort, c: Conn4, candidates: &[usize]) -> Option<usize> {
        let t = sp.affinity?;
        let ep = self.affinity.lookup(&sp.id, c.peer.ip(), t, |a| {
            candidates.iter().any(|i| sp.endpoints[*i].addr == a)
        })?;
        candidates
            .iter()
            .copied()
            .find(|i| sp.endpoints[*i].addr == ep)
    }

    /// One more status or timeout retry, if the rule and the budget allow it.
    fn may_retry(&self, retry: &Option<super::route::Retry>, done: &mut u32) -> bool {
        let Some(r) = retry else { return false };
        if *done >= r.attempts {
            return false;
        }
        if !self.http.budget.withdraw() {
            Stats::inc(&self.state.stats.http_retries_over_budget);
            return false;
        }
        *done += 1;
        Stats::inc(&self.state.stats.http_retries);
        true
    }
}

/// The methods semantic conventions name (RFC 9110 and PATCH); any other is `_OTHER`.
const STANDARD_METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
];

/// `network.protocol.version`'s values, in [`version_index`]'s order.
const VERSIONS: [&str; 5] = ["0.9", "1.0", "1.1", "2", "3"];

fn method_index(m: &http::Method) -> Option<usize> {
    Some(match *m {
        http::Method::GET => 0,
        http::Method::POST => 1,
        http::Method::PUT => 2,
        http::Method::DELETE => 3,
        http::Method::HEAD => 4,
        http::Method::OPTIONS => 5,
        http::Method::PATCH => 6,
        http::Method::CONNECT => 7,
        http::Method::TRACE => 8,
        _ => return None,
    })
}

fn version_index(v: Version) -> usize {
    match v {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        _ => 2,
    }
}

/// `GET`, `POST`, …: the span name when no route names the request (semantic conventions:
/// `{method}`, `HTTP` for methods outside the standard set).
pub(super) fn method_name(m: &http::Method) -> &'static str {
    method_index(m).map_or("HTTP", |i| STANDARD_METHODS[i])
}

/// `http.request.method` and `network.protocol.version` (semantic conventions). A standard
/// method's pair is one block per method and version, written once and copied whole into
/// each span (docs/benchmarks.md, "Session 20"); another method is `_OTHER`, with
/// `http.request.method_original`.
pub(super) fn set_method_and_version(s: &mut Span, m: &http::Method, v: Version) {
    static BLOCKS: LazyLock<Vec<Attributes>> = LazyLock::new(|| {
        STANDARD_METHODS
            .iter()
            .flat_map(|m| {
                VERSIONS.iter().map(|v| {
                    Attributes::new()
                        .with("http.request.method", *m)
                        .with("network.protocol.version", *v)
                })
            })
            .collect()
    });
    if !s.is_sampled() {
        return;
    }
    match method_index(m) {
        Some(i) => s.set_all(&BLOCKS[i * VERSIONS.len() + version_index(v)]),
        None => {
            s.set("http.request.method", "_OTHER");
            s.set_str("http.request.method_original", m.as_str());
            s.set("network.protocol.version", VERSIONS[version_index(v)]);
        }
    }
}

/// The Wasm filters' verdict on the request headers, as a span event.
pub(super) fn filter_event(span: &mut Option<Span>, side: &'static str, verdict: &Verdict) {
    if let Some(s) = span.as_mut() {
        let outcome = match verdict {
            Verdict::Continue => "continue",
            Verdict::LocalReply(_) => "local_reply",
            Verdict::Reset => "reset",
        };
        s.event(
            "wasm.request_headers",
            &[
                ("wasmesh.filter.side", side.into()),
                ("wasmesh.filter.outcome", outcome.into()),
            ],
        );
    }
}

/// An HTTP/1.1 request made fit for HTTP/2 to a meshed endpoint: the Host header becomes the
/// `:authority`, and the inbound sidecar is told the app speaks HTTP/1.1.
fn over_mesh_h2(req: &mut Request<Body>) {
    let host = req
        .headers_mut()
        .remove(header::HOST)
        .and_then(|h| h.to_str().ok().map(str::to_string));
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut b = http::Uri::builder().scheme("http").path_and_query(path);
    if let Some(h) = host {
        b = b.authority(h);
    }
    if let Ok(uri) = b.build() {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = Version::HTTP_2;
    req.headers_mut()
        .insert(super::ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
}

/// A copy of the request head with a new body (the head is kept for retries).
pub(super) fn rebuild(parts: &http::request::Parts, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req
}

/// The request head with a body, moved where [`rebuild`] copies: method, target, version and
/// headers; the incoming request's extensions are left behind, as there.
pub(super) fn head_with(parts: http::request::Parts, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method;
    *req.uri_mut() = parts.uri;
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers;
    req
}

async fn backoff(base: Duration, attempt: u32) {
    let exp = base.saturating_mul(1 << attempt.saturating_sub(1).min(6));
    let jitter = rand::rng().random_range(0.5..1.5);
    tokio::time::sleep(exp.mul_f64(jitter)).await;
}

/// The endpoint's response, made fit for the client.
pub(super) fn finish(
    resp: Response<Incoming>,
    client_version: Version,
    rule: Option<&Rule>,
    backend: Option<&Backend>,
) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    let upgraded = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(&mut parts.headers, upgraded);
    if let Some(m) = rule.and_then(|r| r.response_headers.as_ref()) {
        m.apply(&mut parts.headers);
    }
    if let Some(m) = backend.and_then(|b| b.response_headers.as_ref()) {
        m.apply(&mut parts.headers);
    }
    parts.version = if client_version == Version::HTTP_2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    Response::from_parts(parts, boxed(body))
}

/// The response through the filters' response steps (last filter first).
pub(super) async fn filter_response(
    chain: &Arc<tokio::sync::Mutex<ChainStream>>,
    resp: Response<Body>,
    upstream: SocketAddr,
) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    let eos = body.is_end_stream();
    {
        let mut ch = chain.lock().await;
        ch.set_upstream(upstream);
        match ch.on_response_headers(&mut parts, eos).await {
            Verdict::Continue => {}
            Verdict::LocalReply(r) => return local_reply(r),
            Verdict::Reset => return HttpError::FilterReset.into_response(false),
        }
    }
    let body = if eos {
        body
    } else {
        boxed(FilteredBody::new(
            body,
            chain.clone(),
            WasmDirection::Response,
            false,
        ))
    };
    Response::from_parts(parts, body)
}

/// A filter's local reply, as the client gets it.
pub(super) fn local_reply(r: wasmesh_wasm::LocalReply) -> Response<Body> {
    let (parts, body) = r.into_response().into_parts();
    Response::from_parts(parts, full(body))
}

pub fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    }
}

/// After a 101 (or a CONNECT's 2xx), bytes flow both ways between the client's and the
/// endpoint's connections until both sides close.
pub(super) fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    service: String,
) {
    tokio::spawn(async move {
        let (c, u) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(%service, error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut c = hyper_util::rt::TokioIo::new(c);
        let mut u = hyper_util::rt::TokioIo::new(u);
        if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
            tracing::debug!(%service, error = %e, "upgraded connection ended");
        }
    });
}

/// `host[:port]` (IPv6 literals in brackets).
fn split_authority(a: &str) -> (String, Option<u16>) {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, p)) => (format!("[{h}]"), p.strip_prefix(':')),
            None => (a.to_string(), None),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (a.to_string(), None),
        }
    };
    (host, port.and_then(|p| p.parse().ok()))
}

/// The answer of a RequestRedirect filter.
fn redirect(
    rd: &Redirect,
    path: &str,
    query: Option<&str>,
    authority: Option<&str>,
    matched_prefix: Option<&str>,
) -> Response<Body> {
    let (req_host, req_port) = authority.map(split_authority).unwrap_or_default();
    let scheme = rd.scheme.clone().unwrap_or_else(|| "http".into());
    let host = rd.hostname.clone().unwrap_or(req_host);
    // Gateway API: the port is kept unless set; when the scheme changes and no port is set,
    // the new scheme's default is used (and left out).
    let port = match (rd.port, &rd.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => req_port,
    };
    let port =
        port.filter(|p| !((scheme == "http" && *p == 80) || (scheme == "https" && *p == 443)));
    let new_path = match &rd.path {
        Some(m) => rewrite_path(path, m, matched_prefix),
        None => path.to_string(),
    };
    let mut location = format!("{scheme}://{host}");
    if let Some(p) = port {
        location.push_str(&format!(":{p}"));
    }
    location.push_str(&new_path);
    if let Some(q) = query {
        location.push('?');
        location.push_str(q);
    }
    let mut resp = Response::new(super::empty());
    *resp.status_mut() = StatusCode::from_u16(rd.status).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::route::PathModifier;

    fn rd(
        scheme: Option<&str>,
        host: Option<&str>,
        port: Option<u16>,
        path: Option<PathModifier>,
    ) -> Redirect {
        Redirect {
            scheme: scheme.map(String::from),
            hostname: host.map(String::from),
            path,
            port,
            status: 301,
        }
    }

    fn location(r: &Response<Body>) -> &str {
        r.headers()[header::LOCATION].to_str().unwrap()
    }

    /// The blocks written once per method and version read as the attributes written one by
    /// one would; a method outside the standard set is `_OTHER` with its original.
    #[test]
    fn a_spans_method_and_version_are_the_semantic_conventions_attributes() {
        use crate::otel::sampler::Sampler;
        use crate::otel::tests::{attr, queued, text, tracer, unsampled_caller};
        let versions = [
            (Version::HTTP_09, "0.9"),
            (Version::HTTP_10, "1.0"),
            (Version::HTTP_11, "1.1"),
            (Version::HTTP_2, "2"),
            (Version::HTTP_3, "3"),
        ];
        let mut methods: Vec<(http::Method, &str, Option<&str>)> = STANDARD_METHODS
            .iter()
            .map(|m| (http::Method::from_bytes(m.as_bytes()).unwrap(), *m, None))
            .collect();
        methods.push((
            http::Method::from_bytes(b"PURGE").unwrap(),
            "_OTHER",
            Some("PURGE"),
        ));
        let (t, q) = tracer(Sampler::default());
        for (m, name, original) in &methods {
            for (v, version) in versions {
                let mut s = t.start(SpanKind::Server, &http::HeaderMap::new());
                set_method_and_version(&mut s, m, v);
                s.end(Some(200), None);
                let spans = queued(&q);
                assert_eq!(spans.len(), 1);
                let what = format!("{m} {v:?}");
                assert_eq!(attr(&spans[0], "http.request.method"), text(name), "{what}");
                assert_eq!(
                    attr(&spans[0], "http.request.method_original"),
                    original.and_then(text),
                    "{what}"
                );
                assert_eq!(
                    attr(&spans[0], "network.protocol.version"),
                    text(version),
                    "{what}"
                );
            }
        }
        // An unsampled span records nothing (and costs no block).
        let mut s = t.start(SpanKind::Server, &unsampled_caller());
        set_method_and_version(&mut s, &http::Method::GET, Version::HTTP_11);
        s.end(Some(200), None);
        assert!(queued(&q).is_empty());
    }

    #[test]
    fn redirects() {
        let r = redirect(
            &rd(None, Some("new"), None, None),
            "/a",
            Some("x=1"),
            Some("web:8080"),
            None,
        );
        assert_eq!(r.status(), 301);
        assert_eq!(location(&r), "http://new:8080/a?x=1");
        let r = redirect(
            &rd(Some("https"), None, None, None),
            "/a",
            None,
            Some("web:8080"),
            None,
        );
        assert_eq!(location(&r), "https://web/a");
        let r = redirect(
            &rd(None, None, None, Some(PathModifier::Prefix("/v2".into()))),
            "/v1/items",
            None,
            Some("web"),
            Some("/v1"),
        );
        assert_eq!(location(&r), "http://web/v2/items");
    }
}
