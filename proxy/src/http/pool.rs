//! Connections to endpoints, kept for reuse: per endpoint address, idle HTTP/1.1 connections
//! (one request at a time each) and one shared HTTP/2 connection (every request multiplexed).
//!
//! Getting a connection ([`Pools::checkout`]) is separate from sending on it, so a refused or
//! timed-out connect can move on to another endpoint before the request (and its body) is
//! handed over. A request a reused connection never started to send (the server closed it
//! while idle) is given back ([`Sent::NotSent`]) to be sent on a fresh one.
//!
//! With mTLS on, a connection to an endpoint whose pod has the sidecar is mesh TLS
//! ([`crate::identity::connect::secure`]): the endpoint must prove its ServiceAccount's
//! identity before any request goes out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::Body;
use crate::identity::Mesh;
use crate::identity::connect::{self, Peer, Upstream};

/// At most this many idle HTTP/1.1 connections are kept per endpoint.
const MAX_IDLE_H1: usize = 64;

/// The HTTP version spoken to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    Http1,
    Http2,
}

/// How connections to endpoints are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dial {
    /// Straight to the address (outbound).
    Direct,
    /// To the local app, from 127.0.0.6 so the pod's rules let it through (inbound).
    LocalApp,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} failed: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("{addr}: {source}")]
    Mesh {
        addr: SocketAddr,
        source: connect::SecureError,
    },
}

/// A connection to an endpoint: plain, or mesh TLS.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[derive(Debug, Default)]
pub struct EndpointPool {
    idle_h1: Mutex<Vec<http1::SendRequest<Body>>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Body>>>,
}

/// Every endpoint's connections.
#[derive(Debug)]
pub struct Pools {
    dial: Dial,
    connect_timeout: Duration,
    map: Mutex<HashMap<(SocketAddr, Wire), Arc<EndpointPool>>>,
    /// mTLS to meshed endpoints (outbound), when the proxy has an identity.
    mesh: Option<Arc<Mesh>>,
}

/// A plain endpoint (the local app, a test's backend).
pub fn plain(addr: SocketAddr) -> Peer<'static> {
    Peer {
        addr,
        meshed: false,
        pod: None,
        service_account: None,
    }
}

/// A connection ready for one request.
pub enum Conn {
    Http1 {
        tx: http1::SendRequest<Body>,
        pool: Arc<EndpointPool>,
        reused: bool,
    },
    Http2 {
        tx: http2::SendRequest<Body>,
        /// The connection's first request: its `traceparent` enters the HPACK dynamic table,
        /// so that the next requests name the header by its index
        /// ([`crate::otel::propagation::index_name`]). Only the first: h2 compares a header
        /// with every value of its name in the table, and another value entered every few
        /// hundred requests made that walk cost more than the name saved (docs/benchmarks.md,
        /// "Session 19").
        index_context: bool,
    },
}

/// What sending did.
pub enum Sent {
    Response(Response<Incoming>),
    /// The connection closed before the request was written: it can go elsewhere.
    NotSent(Request<Body>, hyper::Error),
    /// It failed after (part of) the request may have been written.
    Failed(hyper::Error),
}

impl Pools {
    pub fn new(dial: Dial, connect_timeout: Duration) -> Self {
        Self {
            dial,
            connect_timeout,
            map: Mutex::new(HashMap::new()),
            mesh: None,
        }
    }

    /// Mesh TLS to meshed endpoints.
    pub fn set_mesh(&mut self, mesh: Option<Arc<Mesh>>) {
        self.mesh = mesh;
    }

    /// Whether connections to `peer` are mesh TLS (HTTP/2 can then carry HTTP/1.1 requests).
    /// The SPIFFE ID a meshed endpoint must present (for spans and logs); None over plaintext.
    pub fn peer_identity(&self, peer: &Peer<'_>) -> Option<String> {
        if !self.is_mesh(peer) {
            return None;
        }
        let state = self.mesh.as_ref()?.store.current()?;
        peer.expected_identity(&state.bundle.trust_domain)
            .map(|id| id.to_string())
    }

    pub fn is_mesh(&self, peer: &Peer<'_>) -> bool {
        peer.meshed
            && self.dial == Dial::Direct
            && self
                .mesh
                .as_ref()
                .is_some_and(|m| !m.store.is_unavailable())
    }

    fn pool(&self, addr: SocketAddr, wire: Wire) -> Arc<EndpointPool> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((addr, wire)).or_default().clone()
    }

    /// A connection to `addr`, reused if one is idle.
    pub async fn checkout(&self, peer: Peer<'_>, wire: Wire) -> Result<Conn, ConnectError> {
        let addr = peer.addr;
        let pool = self.pool(addr, wire);
        match wire {
            Wire::Http1 => {
                let idle = {
                    let mut idle = pool.idle_h1.lock().unwrap_or_else(|e| e.into_inner());
                    let mut found = None;
                    while let Some(tx) = idle.pop() {
                        if tx.is_ready() {
                            found = Some(tx);
                            break;
                        }
                    }
                    found
                };
                if let Some(tx) = idle {
                    return Ok(Conn::Http1 {
                        tx,
                        pool,
                        reused: true,
                    });
                }
                let tx = self.handshake_h1(peer, false).await?;
                Ok(Conn::Http1 {
                    tx,
                    pool,
                    reused: false,
                })
            }
            Wire::Http2 => {
                let mut slot = pool.h2.lock().await;
                if let Some(tx) = slot.as_ref()
                    && !tx.is_closed()
                {
                    return Ok(Conn::Http2 {
                        tx: tx.clone(),
                        index_context: false,
                    });
                }
                let io = self.dial(peer).await?;
                let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(1 << 20)
                    .initial_connection_window_size(4 << 20)
                    .adaptive_window(true)
                    .keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_while_idle(false)
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|source| ConnectError::Handshake { addr, source })?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(endpoint = %addr, error = %e, "HTTP/2 connection to endpoint ended");
                    }
                });
                *slot = Some(tx.clone());
                Ok(Conn::Http2 {
                    tx,
                    index_context: true,
                })
            }
        }
    }

    /// A connection of its own for one request that upgrades (WebSocket, CONNECT): never
    /// pooled, since after the upgrade it carries raw bytes.
    pub async fn dedicated_h1(&self, peer: Peer<'_>) -> Result<Conn, ConnectError> {
        let tx = self.handshake_h1(peer, true).await?;
        Ok(Conn::Http1 {
            tx,
            pool: Arc::default(),
            reused: false,
        })
    }

    async fn handshake_h1(
        &self,
        peer: Peer<'_>,
        upgrades: bool,
    ) -> Result<http1::SendRequest<Body>, ConnectError> {
        let addr = peer.addr;
        let io = self.dial(peer).await?;
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| ConnectError::Handshake { addr, source })?;
        tokio::spawn(async move {
            let r = if upgrades {
                conn.with_upgrades().await
            } else {
                conn.await
            };
            if let Err(e) = r {
                tracing::debug!(endpoint = %addr, error = %e, "HTTP/1.1 connection to endpoint ended");
            }
        });
        Ok(tx)
    }

    async fn dial(&self, peer: Peer<'_>) -> Result<Io, ConnectError> {
        let addr = peer.addr;
        let tcp = self.dial_tcp(addr).await?;
        if self.dial == Dial::LocalApp {
            return Ok(Io::Plain(tcp));
        }
        match connect::secure(
            self.mesh.as_deref(),
            tcp,
            peer,
            Duration::from_secs(5),
            self.connect_timeout * 3,
        )
        .await
        {
            Ok(Upstream::Plain(tcp)) => Ok(Io::Plain(tcp)),
            Ok(Upstream::Mesh(tls)) => Ok(Io::Tls(tls)),
            Err(source) => Err(ConnectError::Mesh { addr, source }),
        }
    }

    async fn dial_tcp(&self, addr: SocketAddr) -> Result<TcpStream, ConnectError> {
        let connect = async {
            match self.dial {
                Dial::Direct => TcpStream::connect(addr).await,
                Dial::LocalApp => crate::inbound::connect_app(addr).await,
            }
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(source)) => Err(ConnectError::Io { addr, source }),
            Err(_) => Err(ConnectError::Timeout {
                addr,
                after: self.connect_timeout,
            }),
        }
    }

    /// Drops idle connections that closed, and pools left empty (endpoints that went away).
    pub fn sweep(&self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, pool| {
            let mut idle = pool.idle_h1.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|tx| !tx.is_closed());
            let h2_open = pool
                .h2
                .try_lock()
                .map(|s| s.as_ref().is_some_and(|tx| !tx.is_closed()))
                .unwrap_or(true);
            !idle.is_empty() || h2_open || Arc::strong_count(pool) > 1
        });
    }

    /// Idle HTTP/1.1 and open HTTP/2 connections, for `/config` and tests.
    pub fn idle(&self) -> usize {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.values()
            .map(|p| p.idle_h1.lock().map(|v| v.len()).unwrap_or(0))
            .sum()
    }
}

impl Conn {
    pub fn is_http2(&self) -> bool {
        matches!(self, Conn::Http2 { .. })
    }

    pub fn reused(&self) -> bool {
        matches!(self, Conn::Http1 { reused: true, .. })
    }

    /// Sends one request. An HTTP/1.1 connection goes back to its pool once the response body
    /// has been read to the end.
    pub async fn send(self, mut req: Request<Body>) -> Sent {
        match self {
            Conn::Http1 { mut tx, pool, .. } => {
                let result = tx.try_send_request(req).await;
                match result {
                    Ok(resp) => {
                        tokio::spawn(async move {
                            if tx.ready().await.is_ok() {
                                let mut idle =
                                    pool.idle_h1.lock().unwrap_or_else(|e| e.into_inner());
                                if idle.len() < MAX_IDLE_H1 {
                                    idle.push(tx);
                                }
                            }
                        });
                        Sent::Response(resp)
                    }
                    Err(mut e) => match e.take_message() {
                        Some(req) => Sent::NotSent(req, e.into_error()),
                        None => Sent::Failed(e.into_error()),
                    },
                }
            }
            Conn::Http2 {
                mut tx,
                index_context,
            } => {
                if index_context {
                    crate::otel::propagation::index_name(req.headers_mut());
                }
                match tx.try_send_request(req).await {
                    Ok(resp) => Sent::Response(resp),
                    Err(mut e) => match e.take_message() {
                        Some(req) => Sent::NotSent(req, e.into_error()),
                        None => Sent::Failed(e.into_error()),
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::BodyExt as _;
    use hyper::service::service_fn;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::otel::propagation::{self, TRACEPARENT};

    /// An h2c server that answers each request with its `traceparent`.
    async fn h2_backend() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let tp = req
                        .headers()
                        .get(&TRACEPARENT)
                        .map(|v| v.as_bytes().to_vec());
                    Ok::<_, Infallible>(Response::new(super::super::full(Bytes::from(
                        tp.unwrap_or_default(),
                    ))))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc),
                );
            }
        });
        addr
    }

    /// A relay to `to` that keeps a copy of every byte the client sends.
    async fn recording_relay(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let sent = Arc::new(Mutex::new(Vec::new()));
        let log = sent.clone();
        tokio::spawn(async move {
            let Ok((client, _)) = l.accept().await else {
                return;
            };
            let server = TcpStream::connect(to).await.expect("backend");
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n @ 1..) = cr.read(&mut buf).await {
                log.lock().expect("log").extend_from_slice(&buf[..n]);
                if sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        (addr, sent)
    }

    /// The header blocks of the HEADERS frames an HTTP/2 client sent (none of these requests
    /// needs a CONTINUATION frame).
    fn header_blocks(bytes: &[u8]) -> Vec<&[u8]> {
        let mut b = bytes
            .strip_prefix(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .expect("the client preface");
        let mut blocks = Vec::new();
        while b.len() >= 9 {
            let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
            if b.len() < 9 + len {
                break; // a frame still being relayed
            }
            let (kind, flags) = (b[3], b[4]);
            let mut p = &b[9..9 + len];
            if kind == 1 {
                assert_ne!(flags & 0x4, 0, "END_HEADERS");
                let pad = if flags & 0x8 != 0 {
                    let pad = usize::from(p[0]);
                    p = &p[1..];
                    pad
                } else {
                    0
                };
                if flags & 0x20 != 0 {
                    p = &p[5..];
                }
                blocks.push(&p[..p.len() - pad]);
            }
            b = &b[9 + len..];
        }
        blocks
    }

    /// An HPACK integer with a `prefix`-bit prefix (RFC 7541 §5.1).
    fn hpack_int(b: &mut &[u8], prefix: u32) -> usize {
        let max = (1usize << prefix) - 1;
        let mut v = usize::from(b[0]) & max;
        *b = &b[1..];
        if v == max {
            let mut shift = 0;
            loop {
                let c = b[0];
                *b = &b[1..];
                v += usize::from(c & 0x7f) << shift;
                shift += 7;
                if c & 0x80 == 0 {
                    break;
                }
            }
        }
        v
    }

    /// How a header block's never-indexed fields (RFC 7541 §6.2.3) name their header: by a
    /// table index (Some), or with the name's text (None).
    fn never_indexed_names(mut b: &[u8]) -> Vec<Option<usize>> {
        let mut names = Vec::new();
        while !b.is_empty() {
            let first = b[0];
            let (prefix, never) = if first & 0x80 != 0 {
                hpack_int(&mut b, 7); // indexed field
                continue;
            } else if first & 0x40 != 0 {
                (6, false) // literal with incremental indexing
            } else if first & 0x20 != 0 {
                hpack_int(&mut b, 5); // table size update
                continue;
            } else {
                (4, first & 0x10 != 0) // literal without indexing, or never indexed
            };
            let name = hpack_int(&mut b, prefix);
            let strings = if name == 0 { 2 } else { 1 };
            for _ in 0..strings {
                let n = hpack_int(&mut b, 7);
                b = &b[n..];
            }
            if never {
                names.push((name != 0).then_some(name));
            }
        }
        names
    }

    #[tokio::test]
    async fn over_http2_the_trace_context_is_named_by_index_after_a_connections_first_request() {
        let (relay, sent) = recording_relay(h2_backend().await).await;
        let pools = Pools::new(Dial::Direct, Duration::from_secs(2));
        for i in 1..=5u64 {
            let mut req = Request::builder()
                .uri(format!("http://{relay}/"))
                .body(super::super::empty())
                .expect("request");
            let trace = TraceId::from(u128::from(i) << 64 | 0xabc);
            propagation::inject(
                req.headers_mut(),
                trace,
                SpanId::from(i),
                TraceFlags::SAMPLED,
                None,
            );
            let expected = req.headers()[&TRACEPARENT].clone();
            let conn = pools
                .checkout(plain(relay), Wire::Http2)
                .await
                .expect("connects");
            let Sent::Response(resp) = conn.send(req).await else {
                panic!("request {i} not answered");
            };
            let got = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(
                got,
                expected.as_bytes(),
                "request {i}'s traceparent arrives"
            );
        }
        let bytes = sent.lock().expect("log").clone();
        let blocks = header_blocks(&bytes);
        assert_eq!(blocks.len(), 5, "one connection, five requests");
        // The first request's value enters the table (no never-indexed field); the next ones'
        // values are never indexed, and name the header by its index in the table.
        assert_eq!(never_indexed_names(blocks[0]), Vec::<Option<usize>>::new());
        for (i, block) in blocks.iter().enumerate().skip(1) {
            let names = never_indexed_names(block);
            assert_eq!(names.len(), 1, "request {}: {names:?}", i + 1);
            assert!(
                names[0].is_some_and(|n| n > 61),
                "request {}: {names:?}",
                i + 1
            );
        }
    }
}
