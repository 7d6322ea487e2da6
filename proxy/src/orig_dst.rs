//! The destination a redirected connection was originally addressed to.
//!
//! A connection the nat rules REDIRECTed to the proxy's listener arrives with the listener's
//! address as its local address; the kernel keeps the pre-NAT destination in conntrack and
//! returns it for `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (IPv4) or
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` (IPv6), read here through socket2's safe API.
//! Works for a `std` or a tokio `TcpStream` (anything with a socket fd).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use socket2::SockRef;

/// The original destination of an accepted, redirected TCP connection.
///
/// A connection that reached the listener without NAT has the listener's own address as its
/// original destination if conntrack tracks it, and fails with `ENOENT` (`NotFound`) if not.
/// An IPv4 connection accepted on a dual-stack IPv6 listener (local address `::ffff:a.b.c.d`) is
/// looked up as IPv4, where the kernel tracked it.
pub fn original_dst<S: AsFd>(stream: &S) -> io::Result<SocketAddr> {
    let socket = SockRef::from(stream);
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))?;
    let is_ipv4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let dst = if is_ipv4 {
        socket.original_dst_v4()?
    } else {
        socket.original_dst_v6()?
    };
    dst.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the kernel returned a non-IP original destination",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_connection_that_was_not_redirected_was_addressed_to_the_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        // Which of the two depends on whether conntrack is active in this namespace.
        match original_dst(&accepted) {
            Ok(dst) => assert_eq!(dst, addr),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}"),
        }
    }
}
