//! Serving a client connection that detection found to be HTTP: hyper's HTTP/1.1 (keep-alive,
//! upgrades) or HTTP/2 server, every request handed to [`Outbound::forward`].
//!
//! The first HTTP/1 request's head is checked before hyper sees it, so a malformed request gets
//! a 400 that says so (`x-wasmesh-error: bad-request`) and the connection is closed; hyper
//! answers later malformed requests on a kept-alive connection with its own plain 400.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::forward::Conn4;
use super::prefixed::Prefixed;
use crate::detect::Protocol;
use crate::outbound::Outbound;

/// How long the rest of a first request head may take once its request line arrived.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head accepted.
const MAX_HEAD: usize = 64 * 1024;

pub async fn serve_outbound(
    out: Arc<Outbound>,
    mut client: TcpStream,
    protocol: Protocol,
    mut prefix: BytesMut,
    c: Conn4,
) {
    if protocol == Protocol::Http1 {
        match read_head(&mut client, &mut prefix).await {
            Ok(()) => {}
            Err(why) => return bad_request(client, &why).await,
        }
    }
    let svc = service_fn(move |req| {
        let out = out.clone();
        // Boxed: over HTTP/2 hyper moves each request's future into a task of its own, and
        // tokio copies a task's whole stage when it is spawned and when it ends — a pointer
        // rather than the request's state machine (about 900 bytes).
        Box::pin(async move { Ok::<_, Infallible>(out.forward(req, c).await) })
    });
    let io = TokioIo::new(Prefixed::new(prefix, client));
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
        tracing::debug!(peer = %c.peer, dst = %c.dst, error = %e, "HTTP connection from the app ended");
    }
}

/// Reads until the first request's head is complete and checks that it parses.
async fn read_head(client: &mut TcpStream, buf: &mut BytesMut) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(_)) => return Ok(()),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Ok(()), // hyper decides
            Err(e) => return Err(format!("malformed HTTP/1 request: {e}")),
        }
        if buf.len() > MAX_HEAD {
            return Err(format!("request head larger than {MAX_HEAD} bytes"));
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, client.read_buf(buf)).await {
            Ok(Ok(0)) => return Err("connection closed in the request head".into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("reading the request head: {e}")),
            Err(_) => return Err("request head incomplete after 10 s".into()),
        }
    }
}

/// Answers 400 and closes: what a client sending something that is not HTTP to an HTTP port
/// sees.
pub async fn bad_request(mut client: TcpStream, why: &str) {
    tracing::info!(peer = ?client.peer_addr().ok(), reason = why, "malformed request; answered 400");
    let body = format!("malformed request: {why}\n");
    let resp = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n{}: bad-request\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        super::respond::ERROR_HEADER,
        body.len()
    );
    let _ = client.write_all(resp.as_bytes()).await;
    let _ = client.shutdown().await;
    // Whatever else the client sent is read and dropped, so closing does not reset the answer.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while let Ok(n) = client.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
