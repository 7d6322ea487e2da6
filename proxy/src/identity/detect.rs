//! What a connection's first bytes are, without consuming them (peek): mesh TLS (a ClientHello
//! offering a `wasmesh/...` ALPN, e.g. [`MESH_ALPN`](super::MESH_ALPN)), other TLS (the app's own), HTTP/1, HTTP/2 with
//! prior knowledge, or anything else. Inbound uses it to tell a meshed peer from plaintext; the
//! L7 path can use the same result to pick its protocol.
//!
//! A server-first protocol sends nothing: after `timeout` without bytes the answer is
//! [`Detected::Other`].

use std::time::Duration;

use tokio::net::TcpStream;

#[cfg(test)]
use super::tls::MESH_ALPN;
use super::tls::MESH_ALPN_PREFIX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// A TLS ClientHello offering our ALPN: another wasmesh proxy.
    MeshTls,
    /// A TLS ClientHello without our ALPN: the app's own TLS, passed through.
    Tls,
    /// Starts like a TLS handshake record but is not a ClientHello.
    BrokenTls,
    Http1,
    Http2,
    Other,
}

use crate::detect::H2_PREFACE;
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Classifies `buf`; None when more bytes are needed to tell.
pub fn detect(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0x16 {
        return detect_tls(buf);
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    let mut maybe_http = false;
    for m in METHODS {
        let k = buf.len().min(m.len());
        if buf[..k] == m[..k] {
            if k == m.len() {
                return Some(Detected::Http1);
            }
            maybe_http = true;
        }
    }
    if maybe_http {
        None
    } else {
        Some(Detected::Other)
    }
}

fn detect_tls(buf: &[u8]) -> Option<Detected> {
    // Record header: type 0x16, version 3.x, length.
    if buf.len() < 5 {
        return if buf.len() >= 2 && buf[1] != 0x03 {
            Some(Detected::Other)
        } else {
            None
        };
    }
    if buf[1] != 0x03 {
        return Some(Detected::Other);
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if !(4..=16384 + 256).contains(&record_len) {
        return Some(Detected::BrokenTls);
    }
    if buf.len() < 5 + record_len {
        return None;
    }
    let body = &buf[5..5 + record_len];
    match client_hello_alpns(body) {
        Some(alpns) if alpns.iter().any(|a| a.starts_with(MESH_ALPN_PREFIX)) => {
            Some(Detected::MeshTls)
        }
        Some(_) => Some(Detected::Tls),
        None => Some(Detected::BrokenTls),
    }
}

/// A cursor over a byte slice that fails instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

/// The ALPN protocols a ClientHello offers (empty if none); None if it is not a ClientHello.
fn client_hello_alpns(handshake: &[u8]) -> Option<Vec<&[u8]>> {
    let mut r = Reader(handshake);
    if r.u8()? != 1 {
        return None;
    }
    let len = r.u24()?;
    let mut r = Reader(r.take(len)?);
    r.take(2 + 32)?; // version, random
    let sid = r.u8()?;
    r.take(sid)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let comp = r.u8()?;
    r.take(comp)?;
    if r.0.is_empty() {
        return Some(Vec::new());
    }
    let ext_len = r.u16()?;
    let mut exts = Reader(r.take(ext_len)?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let len = exts.u16()?;
        let data = exts.take(len)?;
        if ty == 0x0010 {
            let mut d = Reader(data);
            let list = d.u16()?;
            let mut list = Reader(d.take(list)?);
            let mut out = Vec::new();
            while !list.0.is_empty() {
                let n = list.u8()?;
                out.push(list.take(n)?);
            }
            return Some(out);
        }
    }
    Some(Vec::new())
}

/// Peeks at `stream` until [`detect`] can tell, or `timeout` passes (then: what the bytes so
/// far say, [`Detected::Other`] if none came).
pub async fn peek(stream: &TcpStream, timeout: Duration) -> std::io::Result<Detected> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 16384 + 512];
    let mut last = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => {
                return Ok(if last == 0 {
                    Detected::Other
                } else {
                    fallback(&buf[..last])
                });
            }
        };
        if n == 0 {
            return Ok(Detected::Other);
        }
        if let Some(d) = detect(&buf[..n]) {
            return Ok(d);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(fallback(&buf[..n]));
        }
        last = n;
        // More bytes are on their way; peek returns at once while the same ones wait.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn fallback(buf: &[u8]) -> Detected {
    if buf.first() == Some(&0x16) {
        Detected::BrokenTls
    } else {
        Detected::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls writes it, offering `alpn`.
    fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(cfg),
            "backend.demo".try_into().unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn tells_mesh_tls_from_app_tls() {
        let mesh = client_hello(&[MESH_ALPN]);
        assert_eq!(detect(&mesh), Some(Detected::MeshTls));
        assert_eq!(detect(&client_hello(&[b"h2"])), Some(Detected::Tls));
        assert_eq!(
            detect(&client_hello(&[b"h2", b"wasmesh/h2"])),
            Some(Detected::MeshTls),
            "any wasmesh/ ALPN is mesh TLS"
        );
        assert_eq!(detect(&client_hello(&[])), Some(Detected::Tls));
        assert_eq!(
            detect(&mesh[..40]),
            None,
            "a partial ClientHello needs more bytes"
        );
    }

    #[test]
    fn plaintext_protocols() {
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(detect(b"GE"), None);
        assert_eq!(detect(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(detect(b"PRI * HT"), None);
        assert_eq!(detect(b"\x00\x00\x00\x01hello"), Some(Detected::Other));
        assert_eq!(detect(b"SSH-2.0-OpenSSH"), Some(Detected::Other));
    }

    #[test]
    fn garbage_in_a_handshake_record_is_broken_tls() {
        let mut garbage = vec![0x16, 0x03, 0x01, 0x00, 0x10];
        garbage.extend_from_slice(&[0xff; 16]);
        assert_eq!(detect(&garbage), Some(Detected::BrokenTls));
        let mut truncated = client_hello(&[MESH_ALPN]);
        // Claim a shorter record than the ClientHello inside it.
        truncated[3] = 0;
        truncated[4] = 20;
        assert_eq!(detect(&truncated), Some(Detected::BrokenTls));
    }
}
