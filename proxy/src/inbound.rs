//! Inbound: connections to the pod's addresses, redirected to 15006, handed to the local app at
//! the original destination port. The proxy connects from 127.0.0.6 (`::6`) so the rules let the
//! connection through to the app instead of capturing it again (docs/interception.md); if that
//! source cannot be used it connects to the loopback address instead. A closed app port resets
//! the client. With mTLS on, [`crate::identity::accept`] first tells mesh TLS from plaintext and
//! terminates; then a connection that stays L4 is authorized once (denied: closed) and an HTTP
//! one per request (denied: 403, [`crate::http::inbound`]). The app always sees plaintext.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use tokio::io::AsyncWriteExt;

use crate::copy;
use crate::detect::{self, Protocol};
use crate::http::inbound::{InboundConn, serve_inbound};
use crate::http::pool::Pools;
use crate::identity::Mesh;
use crate::identity::accept::{self, Accepted};
use crate::identity::detect::Detected as IdDetected;
use crate::metrics::{Direction, TcpConn};
use crate::state::{ProxyState, Stats};

/// Source address of inbound passthrough connections.
pub const PASSTHROUGH_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
pub const PASSTHROUGH_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

#[derive(Debug)]
pub struct Inbound {
    pub state: Arc<ProxyState>,
    /// Ports of the proxy itself: a connection whose original destination is one of them was
    /// not redirected and is not passed on (it would loop).
    pub own_ports: Vec<u16>,
    pub connect_timeout: Duration,
    pub copy: copy::CopyMode,
    /// Mesh TLS termination, strict/permissive and authorization (see [`crate::identity`]).
    pub mesh: Option<Arc<Mesh>>,
    /// How long a plaintext client may stay silent before its connection is treated as L4.
    pub detect_timeout: Duration,
    /// Ports never parsed as HTTP (server-speaks-first protocols).
    pub opaque_ports: Vec<u16>,
    /// Connections to the app, for HTTP.
    pub pools: Pools,
    /// Wasm filters for requests the app receives.
    pub filters: Option<Arc<crate::filters::Filters>>,
}

pub async fn serve(listener: TcpListener, inb: Arc<Inbound>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // An IPv4 peer on the dual-stack listener arrives as `::ffff:a.b.c.d`: logs,
                // spans and policies want the address it has.
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                let inb = inb.clone();
                tokio::spawn(async move {
                    match crate::orig_dst::original_dst(&stream) {
                        Ok(dst) => inb.handle(stream, peer, dst).await,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "inbound connection without an original destination; resetting");
                            copy::reset(stream);
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

impl Inbound {
    pub async fn handle(self: &Arc<Self>, client: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        Stats::inc(&self.state.stats.inbound_accepted);
        let _open = self.state.open_connection();
        let _ = client.set_nodelay(true);
        if self.own_ports.contains(&dst.port()) {
            tracing::debug!(%peer, %dst, "inbound connection to the proxy's own port; resetting");
            return copy::reset(client);
        }
        let (mesh, accepted) = match &self.mesh {
            None => {
                // No mesh TLS: the first bytes decide between HTTP and L4 right here.
                let mut tcp = client;
                if self.is_opaque(dst) {
                    return self.to_app_l4(tcp, peer, dst, &[]).await;
                }
                let d = match detect::detect(&mut tcp, self.detect_timeout).await {
                    Ok(d) => d,
                    Err(_) => return copy::reset(tcp),
                };
                return self.after_detect(tcp, d, peer, dst, None).await;
            }
            Some(mesh) => match accept::accept(mesh, client, peer, dst).await {
                Some(a) => (mesh, a),
                None => return,
            },
        };
        // L4: authorized once, here (denied: the connection is closed). HTTP: per request, in
        // `serve_inbound` (denied: 403).
        match accepted {
            Accepted::Plain(tcp, kind) => {
                let http = matches!(kind, IdDetected::Http1 | IdDetected::Http2);
                if !http || self.is_opaque(dst) {
                    if !accept::authorize(mesh, None, peer, dst) {
                        return;
                    }
                    return self.to_app_l4(tcp, peer, dst, &[]).await;
                }
                let mut tcp = tcp;
                match detect::detect(&mut tcp, self.detect_timeout).await {
                    Ok(d) => {
                        if d.protocol == Protocol::Opaque
                            && !accept::authorize(mesh, None, peer, dst)
                        {
                            return;
                        }
                        self.after_detect(tcp, d, peer, dst, None).await
                    }
                    Err(_) => copy::reset(tcp),
                }
            }
            Accepted::Mesh(tls, id) => {
                let mut tls = *tls;
                let label = Some(crate::metrics::label(&id.to_string()));
                if self.is_opaque(dst) {
                    if !accept::authorize(mesh, Some(&id), peer, dst) {
                        return;
                    }
                    return self.to_app_tls(tls, peer, dst, &[], label).await;
                }
                match detect::detect(&mut tls, self.detect_timeout).await {
                    Ok(d) if d.protocol != Protocol::Opaque => {
                        let service = self.state.local_service(dst.port());
                        let c = InboundConn::new(peer, dst, Some(id), service);
                        serve_inbound(self.clone(), tls, d.protocol, d.prefix, c).await
                    }
                    Ok(d) => {
                        if !accept::authorize(mesh, Some(&id), peer, dst) {
                            return;
                        }
                        self.to_app_tls(tls, peer, dst, &d.prefix, label).await
                    }
                    Err(e) => {
                        tracing::debug!(%peer, %dst, error = %e, "mesh connection failed during protocol detection");
                    }
                }
            }
        }
    }

    /// A well-known server-speaks-first port, or a port a Service declares opaque.
    fn is_opaque(&self, dst: SocketAddr) -> bool {
        self.opaque_ports.contains(&dst.port()) || self.state.opaque_endpoints.load().contains(&dst)
    }

    async fn after_detect(
        self: &Arc<Self>,
        tcp: TcpStream,
        d: detect::Detected,
        peer: SocketAddr,
        dst: SocketAddr,
        identity: Option<wasmesh_api::spiffe::SpiffeId>,
    ) {
        if d.protocol == Protocol::Opaque {
            return self.to_app_l4(tcp, peer, dst, &d.prefix).await;
        }
        let c = InboundConn::new(peer, dst, identity, self.state.local_service(dst.port()));
        serve_inbound(self.clone(), tcp, d.protocol, d.prefix, c).await
    }

    /// Plain bytes to the app (whatever detection read first).
    async fn to_app_l4(&self, client: TcpStream, peer: SocketAddr, dst: SocketAddr, prefix: &[u8]) {
        match tokio::time::timeout(self.connect_timeout, connect_app(dst)).await {
            Ok(Ok(mut app)) => {
                if !prefix.is_empty() && app.write_all(prefix).await.is_err() {
                    return copy::reset(client);
                }
                let service = self.state.local_service(dst.port());
                let conn = TcpConn::open(&self.state, Direction::Inbound, service, peer, dst, None);
                conn.done(copy::proxy(client, app, self.copy).await)
            }
            Ok(Err(e)) => {
                Stats::inc(&self.state.stats.inbound_app_refused);
                tracing::debug!(%peer, %dst, error = %e, "app did not accept; resetting the client");
                copy::reset(client)
            }
            Err(_) => {
                Stats::inc(&self.state.stats.inbound_app_refused);
                tracing::debug!(%peer, %dst, "app did not answer in time; resetting the client");
                copy::reset(client)
            }
        }
    }

    /// A terminated mesh connection's bytes to the app; `identity`: the client's SPIFFE ID.
    async fn to_app_tls<S>(
        &self,
        tls: S,
        peer: SocketAddr,
        dst: SocketAddr,
        prefix: &[u8],
        identity: Option<Arc<str>>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        match tokio::time::timeout(self.connect_timeout, connect_app(dst)).await {
            Ok(Ok(mut app)) => {
                if !prefix.is_empty() && app.write_all(prefix).await.is_err() {
                    return;
                }
                let service = self.state.local_service(dst.port());
                let conn = TcpConn::open(
                    &self.state,
                    Direction::Inbound,
                    service,
                    peer,
                    dst,
                    identity,
                );
                conn.done(copy::proxy_streams(tls, app).await)
            }
            _ => {
                Stats::inc(&self.state.stats.inbound_app_refused);
                tracing::debug!(%peer, %dst, "app did not accept a mesh connection; closing it");
            }
        }
    }
}

pub(crate) async fn connect_app(dst: SocketAddr) -> std::io::Result<TcpStream> {
    let (socket, src) = match dst.ip() {
        IpAddr::V4(_) => (TcpSocket::new_v4()?, IpAddr::V4(PASSTHROUGH_V4)),
        IpAddr::V6(_) => (TcpSocket::new_v6()?, IpAddr::V6(PASSTHROUGH_V6)),
    };
    // Without this, bind() reserves a source port for every connection whatever its
    // destination, and each bind scans further through ports held in TIME_WAIT: new
    // connections get slower and slower until the range runs out. With it the port is chosen at
    // connect(), shared among distinct 4-tuples.
    let _ = nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    );
    if dst.ip().is_loopback() || socket.bind(SocketAddr::new(src, 0)).is_err() {
        let lo = match dst.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        return TcpStream::connect(SocketAddr::new(lo, dst.port())).await;
    }
    socket.set_nodelay(true)?;
    socket.connect(dst).await
}
