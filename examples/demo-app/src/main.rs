//! `wasmesh-demo`: the app the local mesh demos and tests run.
//!
//! - `backend` ([`backend`]) answers every request — HTTP/1.1 or h2c — with `hello from
//!   <POD_NAME>`, and says in headers who it is (`x-pod`, `x-version`), where the connection
//!   landed (`x-served-at`) and who it came from (`x-peer`), so a test can tell whether a
//!   sidecar was in the path; `/sleep/<ms>`, `/status/<n>`, `/headers` and a WebSocket echo at
//!   `/ws` ([`ws`]); with `--grpc-listen` also a gRPC service ([`grpc`]).
//! - `client` ([`client`]) calls a URL in a loop — a new connection per call, one kept-alive
//!   connection (`--reuse`) or one HTTP/2 connection (`--h2`) — and prints which pod answered
//!   and a running tally per pod.
//! - `grpc-call` makes gRPC calls on one channel and counts the pods; `ws` checks a WebSocket
//!   echo; `greeter` is a server-speaks-first TCP protocol; `raw` sends bytes as given ([`tcp`]).
//! - `fetch` prints one response body (e.g. a sidecar's `/metrics`).
//! - `spy` ([`spy`]) prints the first bytes of every connection (what is on the wire).

mod backend;
mod client;
mod duration;
mod grpc;
mod spy;
mod tcp;
mod ws;

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
    /// Answer every HTTP/1.1 or h2c request with `hello from <POD_NAME>` (headers `x-pod`,
    /// `x-version`, `x-served-at`: the address the connection arrived at, `x-peer`: the
    /// address it came from); `/sleep/<ms>`, `/status/<n>`, `/headers`, WebSocket echo at
    /// `/ws`; gRPC on `--grpc-listen`. On SIGTERM keeps serving for `--drain`, then exits.
    Backend(backend::BackendArgs),
    /// Call a URL in a loop, printing `#i <status> answered by <pod>` and a running tally per
    /// pod. With `--count`, exits 1 if any call failed (got no HTTP answer).
    Client(client::ClientArgs),
    /// GET a URL once and print the body; exit status 1 unless the answer is 2xx.
    Fetch(client::FetchArgs),
    /// Call the backend's gRPC service on one channel and count the pods that answered;
    /// exit status 1 if any call failed.
    GrpcCall(grpc::GrpcCallArgs),
    /// Open a WebSocket, send messages and check that each comes back; exit status 1 if not.
    Ws(ws::WsArgs),
    /// A server-speaks-first TCP protocol (like SMTP): `--listen` serves, `--connect` calls.
    Greeter(tcp::GreeterArgs),
    /// Send bytes as given (escapes: \r \n \t \\ \xNN) and print what comes back.
    Raw(tcp::RawArgs),
    /// Print the first bytes of every connection as hex, then close it (a passive listener
    /// for tests: what is on the wire).
    Spy(spy::SpyArgs),
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
            Command::GrpcCall(args) => grpc::run(args).await,
            Command::Ws(args) => ws::run(args).await,
            Command::Greeter(args) => tcp::greeter(args).await,
            Command::Raw(args) => tcp::raw(args).await,
            Command::Spy(args) => spy::run(args).await,
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
