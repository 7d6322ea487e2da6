//! Moving bytes: both directions at once with large reusable buffers, half-close passed on
//! (EOF on one side shuts down the write side of the other) until both sides are done. And
//! the one way a proxied connection is refused: a TCP reset.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::state::Stats;

/// Buffer per direction.
const BUF: usize = 64 * 1024;

/// Copies until both directions are finished; counts the bytes.
pub async fn proxy(mut client: TcpStream, mut upstream: TcpStream, stats: &Stats) {
    let _ = upstream.set_nodelay(true);
    match tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF).await {
        Ok((sent, received)) => {
            stats
                .bytes_sent
                .fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
            stats
                .bytes_received
                .fetch_add(received, std::sync::atomic::Ordering::Relaxed);
        }
        Err(e) => {
            tracing::debug!(error = %e, "connection ended with an error");
            // Pass an abort on as an abort.
            reset(client);
            reset(upstream);
        }
    }
}

/// Closes with RST (SO_LINGER 0): the peer sees "connection reset" at once, never a hang.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
