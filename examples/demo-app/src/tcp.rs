//! Plain TCP: `greeter`, a server-speaks-first protocol in the style of SMTP (the server
//! greets, then answers each line; `QUIT` ends), as a server (`--listen`) or a client
//! (`--connect`); and `raw`, which sends bytes as given and prints what comes back (for
//! requests no HTTP library would send).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::duration;

#[derive(Debug, clap::Args)]
pub struct GreeterArgs {
    /// Serve: greet every connection first, then answer each line.
    #[arg(long, value_name = "ADDR", conflicts_with = "connect")]
    listen: Option<SocketAddr>,

    /// Call a greeter at HOST:PORT: wait for its greeting, say hello, quit.
    #[arg(long, value_name = "HOST:PORT")]
    connect: Option<String>,

    /// Client: time allowed for the whole conversation.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration::parse)]
    timeout: Duration,

    /// The name to greet with.
    #[arg(long, env = "POD_NAME", default_value = "greeter")]
    name: String,
}

pub async fn greeter(args: GreeterArgs) -> anyhow::Result<ExitCode> {
    match (args.listen, &args.connect) {
        (Some(addr), None) => serve(addr, args.name).await,
        (None, Some(to)) => {
            let to = to.clone();
            match tokio::time::timeout(args.timeout, converse(&to)).await {
                Ok(Ok(())) => Ok(ExitCode::SUCCESS),
                Ok(Err(e)) => {
                    println!("failed: {e:#}");
                    Ok(ExitCode::FAILURE)
                }
                Err(_) => {
                    println!("failed: no complete conversation within {:?}", args.timeout);
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        _ => bail!("greeter needs --listen ADDR or --connect HOST:PORT"),
    }
}

async fn serve(addr: SocketAddr, name: String) -> anyhow::Result<ExitCode> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    println!("{name}: greeter on {addr}");
    let name: &'static str = Box::leak(name.into_boxed_str());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{name}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = greet(stream, name).await;
        });
    }
}

async fn greet(stream: TcpStream, name: &str) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    w.write_all(format!("220 {name} greeter ready\r\n").as_bytes())
        .await?;
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let line = line.trim_end();
        if line.eq_ignore_ascii_case("quit") {
            w.write_all(b"221 bye\r\n").await?;
            break;
        }
        w.write_all(format!("250 {name} heard: {line}\r\n").as_bytes())
            .await?;
    }
    w.shutdown().await
}

async fn converse(to: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    let stream = TcpStream::connect(to)
        .await
        .with_context(|| format!("connect to {to}"))?;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let mut next = async || {
        lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow!("the server closed the connection"))
    };
    let greeting = next().await.context("waiting for the greeting")?;
    println!(
        "greeting after {} ms: {greeting}",
        start.elapsed().as_millis()
    );
    w.write_all(b"HELLO wasmesh-demo\r\n").await?;
    let reply = next().await.context("waiting for the reply")?;
    println!("reply: {reply}");
    w.write_all(b"QUIT\r\n").await?;
    let bye = next().await.context("waiting for the goodbye")?;
    println!("bye: {bye}");
    if !greeting.starts_with("220 ") || !reply.starts_with("250 ") || !bye.starts_with("221") {
        bail!("not the greeter's conversation");
    }
    println!("done in {} ms", start.elapsed().as_millis());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct RawArgs {
    /// Where to connect: HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    to: String,

    /// What to send; `\r`, `\n`, `\t`, `\\` and `\xNN` are unescaped.
    #[arg(long)]
    send: String,

    /// How long to wait for the server to close before printing what arrived.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration::parse)]
    timeout: Duration,
}

/// Sends the bytes, then prints everything that arrives until the server closes or the
/// timeout passes; exits 1 only when the connection could not be made.
pub async fn raw(args: RawArgs) -> anyhow::Result<ExitCode> {
    let bytes = unescape(&args.send)?;
    let mut stream = tokio::time::timeout(args.timeout, TcpStream::connect(args.to.as_str()))
        .await
        .map_err(|_| anyhow!("connect to {}: nothing within {:?}", args.to, args.timeout))?
        .with_context(|| format!("connect to {}", args.to))?;
    stream.write_all(&bytes).await.context("sending")?;
    let mut got = Vec::new();
    let closed = tokio::time::timeout(args.timeout, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    print!("{}", String::from_utf8_lossy(&got));
    if !got.ends_with(b"\n") {
        println!();
    }
    println!(
        "-- {} bytes; {}",
        got.len(),
        if closed {
            "closed by the server"
        } else {
            "still open at the timeout"
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn unescape(s: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut it = s.bytes();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: Vec<u8> = it.by_ref().take(2).collect();
                let hex = std::str::from_utf8(&hex).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).map_err(|_| anyhow!("`\\x{hex}`: not hex"))?);
            }
            other => bail!(
                "unknown escape `\\{}`",
                other.map(char::from).unwrap_or(' ')
            ),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes() {
        assert_eq!(unescape(r"a\r\nb\x00\\").unwrap(), b"a\r\nb\x00\\");
        assert!(unescape(r"\q").is_err());
        assert!(unescape(r"\xzz").is_err());
    }
}
