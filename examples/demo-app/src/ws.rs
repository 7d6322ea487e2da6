//! WebSocket (RFC 6455): the backend's echo at `/ws` ([`accept`]) and `wasmesh-demo ws`, a
//! client that sends messages and checks each comes back ([`run`]).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, Uri, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::duration;

/// Answers a WebSocket handshake with 101 and echoes every message on the upgraded
/// connection until the client closes it.
pub fn accept<B>(mut req: Request<B>, name: &str) -> Result<Response<Full<Bytes>>, String> {
    let has = |h: header::HeaderName, want: &str| {
        req.headers().get_all(h).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(want)))
        })
    };
    if !has(header::UPGRADE, "websocket") || !has(header::CONNECTION, "upgrade") {
        return Err("/ws is a WebSocket: send Upgrade: websocket, Connection: Upgrade".into());
    }
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or("WebSocket handshake without Sec-WebSocket-Key")?;
    let accept = derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    let name = name.to_string();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(io) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
                echo(ws).await;
            }
            Err(e) => eprintln!("{name}: WebSocket upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Full::default())
        .map_err(|e| e.to_string())
}

async fn echo<S>(mut ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                if ws.send(m).await.is_err() {
                    return;
                }
            }
            // Pings are answered, and a Close echoed, by the library as it reads.
            Ok(Message::Close(_)) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct WsArgs {
    /// The WebSocket to open, e.g. ws://web/ws.
    #[arg(long)]
    url: Uri,

    /// How many messages to send (each must come back unchanged).
    #[arg(long, default_value_t = 5)]
    count: u64,

    /// Time allowed for the handshake and for each echo.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration::parse)]
    timeout: Duration,
}

pub async fn run(args: WsArgs) -> anyhow::Result<ExitCode> {
    if args.url.scheme_str() != Some("ws") {
        bail!("{}: only ws:// URLs are supported", args.url);
    }
    let host = args
        .url
        .host()
        .ok_or_else(|| anyhow!("{}: no host", args.url))?
        .to_string();
    let port = args.url.port_u16().unwrap_or(80);
    let t = args.timeout;
    let within = |what: String| move |_| anyhow!("{what}: nothing within {t:?}");
    let stream = tokio::time::timeout(t, TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(within(format!("connect to {host}:{port}")))?
        .with_context(|| format!("connect to {host}:{port}"))?;
    let handshake = tokio::time::timeout(
        t,
        tokio_tungstenite::client_async(args.url.to_string(), stream),
    )
    .await
    .map_err(within("the WebSocket handshake".into()))?;
    let (mut ws, resp) = match handshake {
        Ok(pair) => pair,
        Err(WsError::Http(resp)) => {
            let error = resp
                .headers()
                .get("x-wasmesh-error")
                .and_then(|v| v.to_str().ok())
                .map(|v| format!(" x-wasmesh-error={v}"))
                .unwrap_or_default();
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            println!(
                "handshake refused: {}{error}: {}",
                resp.status().as_u16(),
                body.trim()
            );
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e).context("the WebSocket handshake"),
    };
    let pod = resp
        .headers()
        .get("x-pod")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string();
    println!("connected: 101 from {pod}");
    let mut failed = 0u64;
    for i in 1..=args.count {
        let sent = format!("message {i} from wasmesh-demo");
        let start = Instant::now();
        let result = tokio::time::timeout(t, async {
            ws.send(Message::text(sent.clone())).await?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(got))) => return Ok(got.as_str().to_string()),
                    Some(Ok(Message::Close(_))) | None => {
                        return Err(anyhow!("the connection closed"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(anyhow!("no echo within {t:?}")));
        let ms = start.elapsed().as_millis();
        match result {
            Ok(got) if got == sent => println!("#{i} echoed ({ms} ms)"),
            Ok(got) => {
                failed += 1;
                println!("#{i} wrong echo ({ms} ms): sent {sent:?}, got {got:?}");
            }
            Err(e) => {
                failed += 1;
                println!("#{i} failed after {ms} ms: {e:#}");
                break;
            }
        }
    }
    let _ = tokio::time::timeout(t, ws.close(None)).await;
    println!(
        "done: {} messages, {failed} failed, echoed by {pod}",
        args.count
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
