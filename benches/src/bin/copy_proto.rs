//! The proxy experiment: a minimal stand-in for `wasmesh-proxy run` with the same listeners and
//! the same contract with the interception rules (outbound on 127.0.0.1:15001, inbound on
//! 0.0.0.0:15006, original destination from SO_ORIGINAL_DST, inbound connections to the app
//! from 127.0.0.6), a fixed route in place of the table, and knobs the real proxy does not
//! have. The l4 bench runs it as the pairs `proto-*` to separate what the kernel costs from
//! what the proxy's own code costs.
//!
//! `copy-proto [--runtime multi|current] [--inbound-to pod|loopback] [--route VIP:PORT=EP:PORT]`
//! - `--runtime`: tokio's multi-thread runtime (one worker per core it may use; what
//!   `wasmesh-proxy run` uses) or the current-thread runtime.
//! - `--inbound-to`: `pod` connects to the app at the original destination from
//!   127.0.0.6:0 — a `bind()` before `connect()`, as `proxy/src/inbound.rs` does; `loopback`
//!   connects to 127.0.0.1:port with no `bind()`, to measure what that bind costs.
//!
//! Bytes are copied with `copy_bidirectional_with_sizes` and 64 KiB buffers (the proxy's
//! `--copy buffered`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use socket2::SockRef;
use tokio::net::{TcpListener, TcpSocket};

#[derive(Debug, Clone)]
struct Config {
    current_thread: bool,
    inbound_loopback: bool,
    /// (virtual address, endpoint): a Service and its one endpoint.
    routes: Vec<(SocketAddr, SocketAddr)>,
}

const BUF: usize = 64 * 1024;
const PASSTHROUGH: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

fn config(args: &[String]) -> anyhow::Result<Config> {
    let mut c = Config {
        current_thread: false,
        inbound_loopback: false,
        routes: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--runtime" => {
                c.current_thread = match value()?.as_str() {
                    "multi" => false,
                    "current" => true,
                    m => bail!("unknown --runtime {m} (multi, current)"),
                }
            }
            "--inbound-to" => {
                c.inbound_loopback = match value()?.as_str() {
                    "pod" => false,
                    "loopback" => true,
                    m => bail!("unknown --inbound-to {m} (pod, loopback)"),
                }
            }
            "--route" => {
                let v = value()?;
                let (vip, ep) = v
                    .split_once('=')
                    .with_context(|| format!("--route {v}: expected VIP:PORT=ENDPOINT:PORT"))?;
                c.routes.push((vip.parse()?, ep.parse()?));
            }
            "-h" | "--help" => {
                println!(
                    "copy-proto [--runtime multi|current] [--inbound-to pod|loopback] \
                     [--route VIP:PORT=EP:PORT]: see benches/README.md"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(c)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = config(&args)?;
    let rt = if cfg.current_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    rt.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let out = TcpListener::bind("127.0.0.1:15001").await?;
    let inb = TcpListener::bind("0.0.0.0:15006").await?;
    let cfg = Arc::new(cfg);
    tokio::spawn(accept(out, cfg.clone(), true));
    accept(inb, cfg, false).await;
    Ok(())
}

async fn accept(l: TcpListener, cfg: Arc<Config>, outbound: bool) {
    loop {
        let Ok((client, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let Some(dst) = SockRef::from(&client)
                .original_dst_v4()
                .ok()
                .and_then(|a| a.as_socket())
            else {
                return;
            };
            let _ = client.set_nodelay(true);
            let Ok(socket) = TcpSocket::new_v4() else {
                return;
            };
            let to = if outbound {
                cfg.routes
                    .iter()
                    .find(|(vip, _)| *vip == dst)
                    .map_or(dst, |(_, ep)| *ep)
            } else if cfg.inbound_loopback {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), dst.port())
            } else {
                if socket
                    .bind(SocketAddr::new(IpAddr::V4(PASSTHROUGH), 0))
                    .is_err()
                {
                    return;
                }
                dst
            };
            let _ = socket.set_nodelay(true);
            let Ok(Ok(up)) = tokio::time::timeout(Duration::from_secs(1), socket.connect(to)).await
            else {
                return;
            };
            let (mut a, mut b) = (client, up);
            let _ = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUF, BUF).await;
        });
    }
}
