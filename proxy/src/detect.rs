//! Which protocol a connection speaks: declared (a Service port's `appProtocol`, then its port
//! name's prefix), marked opaque (an annotation, or a well-known server-speaks-first port), or
//! detected from the client's first bytes — an HTTP/2 connection preface or an HTTP/1 request
//! line — within a short timeout. Anything else, or nothing within the timeout (the server
//! speaks first: MySQL, SMTP, …), is plain L4.
//!
//! Detection reads the bytes it looks at; they are handed on ([`Detected::prefix`]) and sent
//! first to whatever the connection ends up talking to.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Ports that are never HTTP even when nothing declares them: server-speaks-first protocols,
/// where detection could only wait for its timeout (Linkerd's and Istio's lists).
pub const DEFAULT_OPAQUE_PORTS: &[u16] =
    &[25, 587, 3306, 4444, 4567, 4568, 5432, 6379, 9300, 11211];

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest HTTP/1 request line detection waits for before calling it L4.
const MAX_REQUEST_LINE: usize = 8192;

/// What a Service port says about its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Declared {
    /// HTTP/1.1 (or whatever HTTP the client speaks: detection still tells 1 from 2).
    Http,
    /// HTTP/2 with prior knowledge (h2c, gRPC).
    Http2,
    /// Plain TCP: never parsed.
    Opaque,
    /// Nothing declared: look at the first bytes.
    Detect,
}

/// `appProtocol` first, then the port name's prefix (Istio's convention).
pub fn declared(app_protocol: &str, port_name: &str) -> Declared {
    match app_protocol.to_ascii_lowercase().as_str() {
        "http" | "kubernetes.io/ws" | "kubernetes.io/wss" | "ws" => return Declared::Http,
        "http2" | "h2c" | "grpc" | "grpc-web" | "kubernetes.io/h2c" => return Declared::Http2,
        "tcp" | "tls" | "https" | "mysql" | "mongo" | "redis" | "opaque" => {
            return Declared::Opaque;
        }
        _ => {}
    }
    let name = port_name.to_ascii_lowercase();
    let prefix = name.split('-').next().unwrap_or("");
    match prefix {
        "http" if name == "http" || name.starts_with("http-") => Declared::Http,
        "http2" | "grpc" | "h2c" => Declared::Http2,
        "tcp" | "tls" | "https" | "mysql" | "mongo" | "redis" => Declared::Opaque,
        _ => Declared::Detect,
    }
}

/// What the first bytes said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Not HTTP, or nothing arrived within the timeout.
    Opaque,
}

#[derive(Debug)]
pub struct Detected {
    pub protocol: Protocol,
    /// The bytes read while looking; they belong at the start of the stream.
    pub prefix: BytesMut,
}

/// Reads from `io` until the bytes say HTTP/1, HTTP/2 or neither, or `timeout` passes.
pub async fn detect<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> std::io::Result<Detected> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(protocol) = classify(&buf) {
            return Ok(Detected {
                protocol,
                prefix: buf,
            });
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(4096);
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => {
                // Closed or silent: whatever arrived goes through as plain bytes.
                return Ok(Detected {
                    protocol: Protocol::Opaque,
                    prefix: buf,
                });
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// None = not enough bytes to tell yet.
pub fn classify(b: &[u8]) -> Option<Protocol> {
    if b.is_empty() {
        return None;
    }
    // The preface starts "PRI " — a method token HTTP/1 never uses.
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return (b.len() >= H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // HTTP/1: token SP request-target SP "HTTP/1." digit CRLF.
    let method_len = b.iter().take_while(|c| is_tchar(**c)).count();
    if method_len == 0 || method_len > 32 {
        return Some(Protocol::Opaque);
    }
    if method_len == b.len() {
        return None;
    }
    if b[method_len] != b' ' {
        return Some(Protocol::Opaque);
    }
    let Some(end) = b.iter().position(|c| *c == b'\n') else {
        if b.len() > MAX_REQUEST_LINE
            || b[method_len + 1..]
                .iter()
                .any(|c| c.is_ascii_control() && *c != b'\r')
        {
            return Some(Protocol::Opaque);
        }
        return None;
    };
    let line = &b[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() >= 9
        && line[line.len() - 9..line.len() - 1] == *b" HTTP/1."
        && line[line.len() - 1].is_ascii_digit()
    {
        Some(Protocol::Http1)
    } else {
        Some(Protocol::Opaque)
    }
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Whether a port is opaque by default or by the Service's `wasmesh.io/opaque-ports`
/// annotation (a comma-separated list of port numbers).
pub fn is_opaque_port(port: u16, annotation: Option<&str>) -> bool {
    match annotation {
        Some(list) => list
            .split(',')
            .filter_map(|p| p.trim().parse::<u16>().ok())
            .any(|p| p == port),
        None => DEFAULT_OPAQUE_PORTS.contains(&port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        let cases: &[(&[u8], Option<Protocol>)] = &[
            (b"", None),
            (b"GE", None),
            (b"GET", None),
            (b"GET /", None),
            (b"GET / HTTP/1.1\r\n", Some(Protocol::Http1)),
            (
                b"POST /a?b=c HTTP/1.0\r\nHost: x\r\n",
                Some(Protocol::Http1),
            ),
            (b"GET / HTTP/1.1\n", Some(Protocol::Http1)),
            (b"PRI * HTTP/2.0\r\n", None),
            (H2_PREFACE, Some(Protocol::Http2)),
            (b"\x16\x03\x01\x02\x00", Some(Protocol::Opaque)), // TLS ClientHello
            (b"SSH-2.0-OpenSSH\r\n", Some(Protocol::Opaque)),
            (b"GET / FTP/1.1\r\n", Some(Protocol::Opaque)),
            (b"*1\r\n$4\r\nPING\r\n", Some(Protocol::Opaque)), // redis
            (b"GET /\x01", Some(Protocol::Opaque)),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                classify(bytes),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn declared_protocols() {
        assert_eq!(declared("http", "x"), Declared::Http);
        assert_eq!(declared("kubernetes.io/h2c", ""), Declared::Http2);
        assert_eq!(declared("grpc", "tcp-x"), Declared::Http2);
        assert_eq!(declared("kubernetes.io/ws", ""), Declared::Http);
        assert_eq!(declared("", "http-web"), Declared::Http);
        assert_eq!(declared("", "http"), Declared::Http);
        assert_eq!(declared("", "httpx"), Declared::Detect);
        assert_eq!(declared("", "grpc-api"), Declared::Http2);
        assert_eq!(declared("", "http2-x"), Declared::Http2);
        assert_eq!(declared("", "tcp-db"), Declared::Opaque);
        assert_eq!(declared("", ""), Declared::Detect);
        assert_eq!(declared("example.com/custom", "web"), Declared::Detect);
    }

    #[test]
    fn opaque_ports() {
        assert!(is_opaque_port(3306, None));
        assert!(!is_opaque_port(80, None));
        assert!(is_opaque_port(9000, Some("9000, 9001")));
        assert!(!is_opaque_port(3306, Some("9000")));
    }

    #[tokio::test]
    async fn silent_client_is_opaque_after_the_timeout() {
        let (mut a, _b) = tokio::io::duplex(64);
        let d = detect(&mut a, Duration::from_millis(20)).await.unwrap();
        assert_eq!(d.protocol, Protocol::Opaque);
        assert!(d.prefix.is_empty());
    }

    #[tokio::test]
    async fn request_split_over_writes_is_http1_and_kept() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        let w = tokio::spawn(async move {
            b.write_all(b"GET /x HT").await.unwrap();
            tokio::task::yield_now().await;
            b.write_all(b"TP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
            b
        });
        let d = detect(&mut a, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d.protocol, Protocol::Http1);
        assert!(d.prefix.starts_with(b"GET /x HTTP/1.1\r\n"));
        drop(w.await);
    }
}
