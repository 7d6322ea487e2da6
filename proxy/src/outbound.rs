//! Outbound: connections the pod's apps make, redirected to 15001.
//!
//! Original destination → table → a Service port (balance over the usable endpoints, with
//! failover on connect errors and ClientIP affinity) or anything else (connect to the original
//! destination unchanged). A Service port with no usable endpoint is refused at once with a TCP
//! reset: the kernel has already completed the client's handshake with us, so kube-proxy's
//! ECONNREFUSED at `connect()` is not possible from here (see docs/proxy.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::affinity::Affinity;
use crate::balance::{self, BalancerKind};
use crate::copy;
use crate::detect::{self, Declared, Protocol};
use crate::http::forward::{Conn4, Forwarder};
use crate::http::pool::{Dial, Pools};
use crate::http::retry::Budget;
use crate::identity::Mesh;
use crate::identity::connect::{self, Upstream};
use crate::metrics::{Direction, TcpConn};
use crate::state::{ProxyState, Stats};
use crate::table::{Route, Selection, ServicePort, Via};

#[derive(Debug, Clone)]
pub struct OutboundConfig {
    pub balancer: BalancerKind,
    /// Per attempt.
    pub connect_timeout: Duration,
    /// Endpoints tried before the client's connection is reset.
    pub connect_attempts: usize,
    /// How long a connection captured before the first table waits for it.
    pub table_wait: Duration,
    pub copy: copy::CopyMode,
    /// How long a connection to an undeclared Service port may stay silent before it is
    /// treated as L4 (server-speaks-first protocols wait this long once).
    pub detect_timeout: Duration,
    /// Time to the response headers of an HTTP request when its route sets no
    /// `timeouts.request` (None: no limit).
    pub request_timeout: Option<Duration>,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            balancer: BalancerKind::P2c,
            connect_timeout: Duration::from_secs(1),
            connect_attempts: 3,
            table_wait: Duration::from_secs(5),
            copy: copy::CopyMode::default(),
            detect_timeout: Duration::from_millis(500),
            request_timeout: Some(Duration::from_secs(15)),
        }
    }
}

#[derive(Debug)]
pub struct Outbound {
    pub state: Arc<ProxyState>,
    pub affinity: Affinity,
    pub config: OutboundConfig,
    /// The listener's own addresses: a connection made straight to them is not proxied.
    pub own: Vec<SocketAddr>,
    /// Connection pools and the retry budget of the HTTP path.
    pub http: Forwarder,
    /// mTLS to meshed endpoints, when the proxy has an identity (see [`crate::identity`]).
    pub mesh: Option<Arc<Mesh>>,
    /// Wasm filters for requests the app sends (None: no Wasm host in this proxy).
    pub filters: Option<Arc<crate::filters::Filters>>,
}

/// Accepts on `listener` forever.
pub async fn serve(listener: TcpListener, out: Arc<Outbound>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let out = out.clone();
                tokio::spawn(async move {
                    match crate::orig_dst::original_dst(&stream) {
                        Ok(dst) => out.handle(stream, peer, dst).await,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "outbound connection without an original destination; resetting");
                            copy::reset(stream);
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

impl Outbound {
    pub fn new(state: Arc<ProxyState>, config: OutboundConfig, own: Vec<SocketAddr>) -> Self {
        Self {
            http: Forwarder {
                pools: Pools::new(Dial::Direct, config.connect_timeout),
                budget: Budget::default(),
            },
            state,
            affinity: Affinity::default(),
            config,
            own,
            mesh: None,
            filters: None,
        }
    }

    /// With Wasm filters on the HTTP path.
    pub fn with_filters(mut self, filters: Option<Arc<crate::filters::Filters>>) -> Self {
        self.filters = filters;
        self
    }

    /// mTLS to meshed endpoints with this identity (L4 path).
    pub fn with_mesh(mut self, mesh: Option<Arc<Mesh>>) -> Self {
        self.http.pools.set_mesh(mesh.clone());
        self.mesh = mesh;
        self
    }

    /// Proxies one connection from `peer` that was headed for `dst`.
    pub async fn handle(self: &Arc<Self>, client: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        Stats::inc(&self.state.stats.outbound_accepted);
        let _open = self.state.open_connection();
        let _ = client.set_nodelay(true);
        if self.own.contains(&dst) {
            tracing::debug!(%peer, %dst, "connection to the outbound listener itself; resetting");
            return copy::reset(client);
        }
        if !self.state.wait_ready(self.config.table_wait).await {
            tracing::warn!(%peer, %dst, "no table from control yet; resetting");
            return copy::reset(client);
        }
        let route = self.state.table.load().route(dst);
        match route {
            Route::Passthrough => {
                Stats::inc(&self.state.stats.outbound_passthrough);
                match tokio::time::timeout(self.config.connect_timeout * 3, TcpStream::connect(dst))
                    .await
                {
                    Ok(Ok(up)) => {
                        let conn =
                            TcpConn::open(&self.state, Direction::Outbound, None, peer, dst, None);
                        conn.done(copy::proxy(client, up, self.config.copy).await)
                    }
                    _ => {
                        Stats::inc(&self.state.stats.outbound_failed);
                        copy::reset(client)
                    }
                }
            }
            Route::UnknownPort => {
                Stats::inc(&self.state.stats.outbound_refused_unknown_port);
                tracing::debug!(%peer, %dst, "no Service port at this virtual IP and port; refusing");
                copy::reset(client)
            }
            Route::Service(sp, via) => self.by_protocol(client, peer, dst, sp, via).await,
        }
    }

    /// HTTP to the L7 path, everything else L4 ([`crate::detect`]).
    async fn by_protocol(
        self: &Arc<Self>,
        mut client: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        sp: Arc<ServicePort>,
        via: Via,
    ) {
        if sp.protocol == Declared::Opaque {
            return self.to_service(client, peer, dst, &sp, via, &[]).await;
        }
        let detected = match detect::detect(&mut client, self.config.detect_timeout).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(%peer, %dst, error = %e, "connection failed during protocol detection");
                return copy::reset(client);
            }
        };
        match detected.protocol {
            Protocol::Http1 | Protocol::Http2 => {
                Stats::inc(&self.state.stats.outbound_to_service);
                Stats::inc(&self.state.stats.http_connections);
                let c = Conn4 { peer, dst, via };
                crate::http::server::serve_outbound(
                    self.clone(),
                    client,
                    detected.protocol,
                    detected.prefix,
                    c,
                )
                .await
            }
            Protocol::Opaque if sp.protocol != Declared::Detect && !detected.prefix.is_empty() => {
                crate::http::server::bad_request(
                    client,
                    "not HTTP, on a Service port declared HTTP",
                )
                .await
            }
            Protocol::Opaque => {
                Stats::inc(&self.state.stats.detected_opaque);
                self.to_service(client, peer, dst, &sp, via, &detected.prefix)
                    .await
            }
        }
    }

    async fn to_service(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        sp: &ServicePort,
        via: Via,
        prefix: &[u8],
    ) {
        let stats = &self.state.stats;
        let candidates = match sp.selection(via, dst) {
            Selection::Endpoints(c) => c,
            Selection::Reject => {
                Stats::inc(&stats.outbound_refused_no_endpoints);
                tracing::debug!(service = %sp.name(), %dst, "no usable endpoint; refusing");
                return copy::reset(client);
            }
            Selection::Drop => {
                Stats::inc(&stats.outbound_refused_local_policy);
                tracing::debug!(service = %sp.name(), %dst, "internalTrafficPolicy Local and no endpoint on this node; refusing");
                return copy::reset(client);
            }
        };
        Stats::inc(&stats.outbound_to_service);
        let kind = sp.balancer.unwrap_or(self.config.balancer);
        let mut tried: Vec<usize> = Vec::new();
        // ClientIP affinity picks first, if the remembered endpoint is still usable.
        let mut first = sp.affinity.and_then(|t| {
            let ep = self.affinity.lookup(&sp.id, peer.ip(), t, |a| {
                candidates.iter().any(|i| sp.endpoints[*i].addr == a)
            })?;
            candidates
                .iter()
                .copied()
                .find(|i| sp.endpoints[*i].addr == ep)
        });
        let attempts = self.config.connect_attempts.max(1).min(candidates.len());
        for attempt in 0..attempts {
            let Some(i) = first.take().or_else(|| {
                balance::pick(
                    kind,
                    balance::Unit::Connection,
                    candidates,
                    &|i| sp.endpoints[i].load.clone(),
                    &tried,
                    &sp.rr,
                )
            }) else {
                break;
            };
            tried.push(i);
            let ep = &sp.endpoints[i];
            ep.picks.inc();
            if attempt > 0 {
                Stats::inc(&stats.outbound_failovers);
            }
            match tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(ep.addr))
                .await
            {
                Ok(Ok(up)) => {
                    let mut up = match connect::secure(
                        self.mesh.as_deref(),
                        up,
                        ep.mesh_peer(),
                        self.config.table_wait,
                        self.config.connect_timeout * 3,
                    )
                    .await
                    {
                        Ok(up) => up,
                        Err(e) => {
                            ep.load.record_failure();
                            Stats::inc(&stats.outbound_connect_failures);
                            tracing::warn!(service = %sp.name(), endpoint = %ep.addr, error = %e, "endpoint refused over mTLS; trying another endpoint");
                            continue;
                        }
                    };
                    ep.load.record_success();
                    // Bytes protocol detection read go first.
                    if !prefix.is_empty() && up.write_all(prefix).await.is_err() {
                        Stats::inc(&stats.outbound_failed);
                        return copy::reset(client);
                    }
                    if let Some(t) = sp.affinity {
                        self.affinity.record(&sp.id, peer.ip(), ep.addr, t);
                    }
                    let _active = ep.load.open();
                    tracing::trace!(service = %sp.name(), endpoint = %ep.addr, "connected");
                    let service = Some(sp.label.clone());
                    let conn = TcpConn::open(
                        &self.state,
                        Direction::Outbound,
                        service,
                        peer,
                        ep.addr,
                        None,
                    );
                    let moved = match up {
                        Upstream::Plain(up) => copy::proxy(client, up, self.config.copy).await,
                        Upstream::Mesh(tls) => copy::proxy_streams(client, *tls).await,
                    };
                    return conn.done(moved);
                }
                Ok(Err(e)) => {
                    ep.load.record_failure();
                    Stats::inc(&stats.outbound_connect_failures);
                    tracing::info!(service = %sp.name(), endpoint = %ep.addr, error = %e, "connect failed; trying another endpoint");
                }
                Err(_) => {
                    ep.load.record_failure();
                    Stats::inc(&stats.outbound_connect_failures);
                    tracing::info!(service = %sp.name(), endpoint = %ep.addr, timeout = ?self.config.connect_timeout, "connect timed out; trying another endpoint");
                }
            }
        }
        Stats::inc(&stats.outbound_failed);
        tracing::warn!(service = %sp.name(), tried = tried.len(), "no endpoint accepted the connection; resetting the client");
        copy::reset(client)
    }
}
