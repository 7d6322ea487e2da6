//! Moving bytes: both directions at once, half-close passed on (EOF on one side shuts down the
//! write side of the other) until both sides are done. And the one way a proxied connection is
//! refused: a TCP reset.
//!
//! Three ways to copy ([`CopyMode`]):
//! - `auto` (the default): each direction starts with read(2)/write(2) through a small buffer,
//!   and moves to splice once it carries bulk (two reads in a row fill the buffer). Small
//!   request/response exchanges and short connections never pay for a pipe (two pipe2, two
//!   fcntl and four close calls per connection, and two splice calls per message where a read
//!   and a write would do); long transfers get splice's zero copy. HAProxy's `splice-auto`
//!   works the same way.
//! - `splice`: socket → pipe → socket with splice(2) from the first byte, one pipe per
//!   direction; the bytes never enter user space.
//! - `buffered`: read into a 64 KiB buffer per direction and write it out.
//!
//! If a pipe cannot be made (e.g. the fd limit), the connection goes on copying through a
//! buffer.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Buffer per direction (buffered mode).
const BUF: usize = 64 * 1024;
/// Pipe capacity asked for per direction (splice mode); the kernel may give less.
const PIPE: usize = 256 * 1024;
/// The buffer a direction starts with in `auto` mode.
const SMALL: usize = 16 * 1024;
/// Full reads in a row after which an `auto` direction moves to splice.
const BULK_READS: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    #[default]
    Auto,
    Splice,
    Buffered,
}

impl std::str::FromStr for CopyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(CopyMode::Auto),
            "splice" => Ok(CopyMode::Splice),
            "buffered" => Ok(CopyMode::Buffered),
            _ => Err(format!(
                "unknown copy mode {s:?}: use auto, splice or buffered"
            )),
        }
    }
}

/// Bytes one proxied connection moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Client → upstream.
    pub sent: u64,
    /// Upstream → client.
    pub received: u64,
}

/// Copies until both directions are finished; returns the bytes moved (none counted when the
/// connection ended with an error).
pub async fn proxy(client: TcpStream, upstream: TcpStream, mode: CopyMode) -> Transferred {
    let _ = upstream.set_nodelay(true);
    let pipes = match mode {
        CopyMode::Splice => match (Pipe::new(), Pipe::new()) {
            (Ok(a), Ok(b)) => Some((a, b)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "no pipe for splice; copying through a buffer");
                None
            }
        },
        CopyMode::Buffered => None,
        CopyMode::Auto => {
            let (a, b) = tokio::join!(auto_one(&client, &upstream), auto_one(&upstream, &client));
            let result = a.and_then(|sent| b.map(|received| (sent, received)));
            if result.is_err() {
                reset(client);
                reset(upstream);
            }
            return count(result);
        }
    };
    let result = match pipes {
        Some((up, down)) => {
            let (a, b) = tokio::join!(
                splice_one(&client, &upstream, &up),
                splice_one(&upstream, &client, &down)
            );
            a.and_then(|sent| b.map(|received| (sent, received)))
        }
        None => {
            let (mut client, mut upstream) = (client, upstream);
            let r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF)
                .await;
            if r.is_err() {
                reset(client);
                reset(upstream);
            }
            return count(r);
        }
    };
    if result.is_err() {
        // Pass an abort on as an abort.
        reset(client);
        reset(upstream);
    }
    count(result)
}

/// Copies between any two streams (e.g. a TLS stream and a socket) until both directions are
/// finished, through a buffer per direction; returns the bytes moved.
pub async fn proxy_streams<A, B>(mut client: A, mut upstream: B) -> Transferred
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF).await;
    count(r)
}

fn count(r: io::Result<(u64, u64)>) -> Transferred {
    match r {
        Ok((sent, received)) => Transferred { sent, received },
        Err(e) => {
            tracing::debug!(error = %e, "connection ended with an error");
            Transferred::default()
        }
    }
}

/// A non-blocking pipe for one direction.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let size = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE as i32))
            .map(|s| s as usize)
            .unwrap_or(64 * 1024);
        Ok(Pipe { read, write, size })
    }
}

/// One direction: `from` → pipe → `to` until EOF, then shut down `to`'s write side.
async fn splice_one(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<u64> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        let n = from
            .async_io(Interest::READABLE, || {
                splice(from, None, &pipe.write, None, pipe.size, flags).map_err(io::Error::from)
            })
            .await?;
        if n == 0 {
            // EOF: pass the half-close on; the other direction may go on.
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            let m = to
                .async_io(Interest::WRITABLE, || {
                    splice(&pipe.read, None, to, None, left, flags).map_err(io::Error::from)
                })
                .await?;
            if m == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "peer stopped accepting data",
                ));
            }
            left -= m;
        }
        total += n as u64;
    }
}

/// One direction in `auto` mode: through a small buffer while the traffic is small, then
/// through a pipe.
async fn auto_one(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; SMALL];
    let mut total = 0u64;
    let mut full = 0u32;
    loop {
        let n = from
            .async_io(Interest::READABLE, || from.try_read(&mut buf))
            .await?;
        if n == 0 {
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            return Ok(total);
        }
        let mut off = 0;
        while off < n {
            let m = to
                .async_io(Interest::WRITABLE, || to.try_write(&buf[off..n]))
                .await?;
            if m == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "peer stopped accepting data",
                ));
            }
            off += m;
        }
        total += n as u64;
        full = if n == SMALL { full + 1 } else { 0 };
        if full >= BULK_READS {
            match Pipe::new() {
                Ok(pipe) => {
                    drop(buf);
                    return splice_one(from, to, &pipe).await.map(|more| total + more);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "no pipe for splice; going on through a buffer");
                    full = 0;
                }
            }
        }
    }
}

/// Closes with RST (SO_LINGER 0): the peer sees "connection reset" at once, never a hang.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A client ↔ proxy ↔ echo-with-upper-case server, in both modes: every byte arrives, both
    /// half-closes are passed on.
    async fn roundtrip(mode: CopyMode) {
        let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let saddr = server.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.expect("accept");
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.expect("read");
            s.write_all(&all.to_ascii_uppercase()).await.expect("write");
            s.shutdown().await.expect("shutdown");
        });
        let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let faddr = front.local_addr().expect("addr");
        let proxy_task = tokio::spawn(async move {
            let (c, _) = front.accept().await.expect("accept");
            let up = TcpStream::connect(saddr).await.expect("connect");
            proxy(c, up, mode).await
        });
        let mut c = TcpStream::connect(faddr).await.expect("connect");
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let (mut r, mut w) = c.split();
        let write = async {
            w.write_all(&payload).await.expect("write");
            w.shutdown().await.expect("half-close");
        };
        let mut got = Vec::new();
        let read = r.read_to_end(&mut got);
        let (_, n) = tokio::join!(write, read);
        n.expect("read");
        assert_eq!(got, payload.to_ascii_uppercase());
        let moved = proxy_task.await.expect("proxy done");
        assert_eq!(
            moved,
            Transferred {
                sent: 3_000_000,
                received: 3_000_000
            }
        );
    }

    #[tokio::test]
    async fn splice_moves_every_byte_and_passes_half_closes_on() {
        roundtrip(CopyMode::Splice).await;
    }

    #[tokio::test]
    async fn auto_moves_every_byte_and_passes_half_closes_on() {
        roundtrip(CopyMode::Auto).await;
    }

    #[tokio::test]
    async fn buffered_moves_every_byte_and_passes_half_closes_on() {
        roundtrip(CopyMode::Buffered).await;
    }
}
