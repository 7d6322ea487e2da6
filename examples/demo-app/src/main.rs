//! `wasmesh-demo`: the app the local mesh demo runs.
//!
//! - `backend` ([`backend`]) answers every HTTP/1.1 request with `hello from <POD_NAME>`, and
//!   says in headers where the connection landed (`x-served-at`) and who it came from
//!   (`x-peer`), so a test can tell whether a sidecar was in the path.
//! - `client` ([`client`]) calls a URL in a loop, one new connection per call, and prints which
//!   pod answered and a running tally per pod.
//! - `fetch` prints one response body (e.g. a sidecar's `/metrics`).

mod backend;
mod client;
mod duration;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The wasmesh demo app.
#[derive(Debug, Parser)]
#[command(name = "wasmesh-demo", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Answer every HTTP/1.1 request with `hello from <POD_NAME>` (headers `x-pod`,
    /// `x-served-at`: the address the connection arrived at, `x-peer`: the address it came
    /// from). On SIGTERM keeps serving for `--drain`, then exits.
    Backend(backend::BackendArgs),
    /// Call a URL in a loop, a new connection per call, printing `#i <status> answered by
    /// <pod>` and a running tally per pod. With `--count`, exits 1 if any call failed.
    Client(client::ClientArgs),
    /// GET a URL once and print the body; exit status 1 unless the answer is 2xx.
    Fetch(client::FetchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wasmesh-demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Backend(args) => backend::run(args).await,
            Command::Client(args) => client::run(args).await,
            Command::Fetch(args) => client::fetch(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wasmesh-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
