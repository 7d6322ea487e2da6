//! `spy`: a passive listener for tests. Accepts connections, prints the first bytes each one
//! carries as hex (`first bytes from <peer>: 16 03 01 ...`), then closes it: a test can see
//! what is on the wire between two pods (e.g. a TLS record, not the app's plaintext).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

#[derive(Debug, clap::Args)]
pub struct SpyArgs {
    /// Where to listen.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// How many bytes of each connection to print.
    #[arg(long, default_value_t = 8)]
    bytes: usize,
}

pub async fn run(args: SpyArgs) -> anyhow::Result<std::process::ExitCode> {
    let listener = TcpListener::bind(args.listen).await?;
    println!("spy listening on {}", args.listen);
    loop {
        let (mut s, peer) = listener.accept().await?;
        let n = args.bytes;
        tokio::spawn(async move {
            let mut buf = vec![0u8; n];
            let mut got = 0;
            let read = tokio::time::timeout(Duration::from_secs(2), async {
                while got < n {
                    match s.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => got += k,
                    }
                }
            });
            let _ = read.await;
            let hex: Vec<String> = buf[..got].iter().map(|b| format!("{b:02x}")).collect();
            println!("first bytes from {peer}: {}", hex.join(" "));
        });
    }
}
