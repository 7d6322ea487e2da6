//! `wasmesh-proxy wait`: blocks until the proxy's `/ready` answers 200 (classic-mode sidecars
//! use it as the proxy container's postStart hook, so the app starts after the proxy is ready).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One `GET /ready`; the HTTP status, if the admin port answered.
async fn ready_status(admin: SocketAddr) -> Option<u16> {
    let mut s = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(admin))
        .await
        .ok()?
        .ok()?;
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut head = [0u8; 32];
    let n = tokio::time::timeout(Duration::from_secs(1), s.read(&mut head))
        .await
        .ok()?
        .ok()?;
    // "HTTP/1.1 200 OK"
    std::str::from_utf8(&head[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Polls until ready (true) or `timeout` (false).
pub async fn wait(admin: SocketAddr, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if ready_status(admin).await == Some(200) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
