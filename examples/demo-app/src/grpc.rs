//! gRPC: the backend's `wasmesh.demo.v1.Demo` service ([`serve`]) and `wasmesh-demo
//! grpc-call` ([`run`]), which makes every call on one channel — one HTTP/2 connection — and
//! counts which pod answered each.
//!
//! The server is the generated tonic service behind hyper-util's connection builder (tonic's
//! own router is not built), so it needs nothing beyond what the workspace already compiles.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::backend::Identity;
use crate::duration;

pub mod pb {
    tonic::include_proto!("wasmesh.demo.v1");
}

use pb::demo_client::DemoClient;
use pb::demo_server::{Demo, DemoServer};
use pb::{CountReply, CountRequest, SayReply, SayRequest};

/// The most replies one `Count` call streams.
const MAX_COUNT: u32 = 10_000;

struct Service {
    id: Arc<Identity>,
}

#[tonic::async_trait]
impl Demo for Service {
    async fn say(&self, req: Request<SayRequest>) -> Result<Response<SayReply>, Status> {
        Ok(Response::new(SayReply {
            pod: self.id.name.clone(),
            version: self.id.version.clone().unwrap_or_default(),
            message: req.into_inner().message,
        }))
    }

    type CountStream = Pin<Box<dyn Stream<Item = Result<CountReply, Status>> + Send>>;

    async fn count(
        &self,
        req: Request<CountRequest>,
    ) -> Result<Response<Self::CountStream>, Status> {
        let CountRequest { n, interval_ms } = req.into_inner();
        if n > MAX_COUNT {
            return Err(Status::invalid_argument(format!(
                "n = {n}: at most {MAX_COUNT}"
            )));
        }
        let pod = self.id.name.clone();
        let interval = Duration::from_millis(u64::from(interval_ms.min(10_000)));
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            for i in 1..=n {
                if i > 1 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                let reply = CountReply {
                    i,
                    pod: pod.clone(),
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Serves the Demo service on every connection `listener` accepts (HTTP/2; HTTP/1.1 gets
/// nowhere, as with any gRPC server).
pub async fn serve(listener: TcpListener, id: Arc<Identity>) {
    let svc = DemoServer::new(Service { id: id.clone() });
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}: gRPC accept failed: {e}", id.name);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let svc = TowerToHyperService::new(svc.clone());
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[derive(Debug, clap::Args)]
pub struct GrpcCallArgs {
    /// The server, e.g. http://web:9000 (names resolve through /etc/hosts).
    #[arg(long)]
    to: String,

    /// How many unary `Say` calls to make on the one channel.
    #[arg(long, default_value_t = 10)]
    count: u64,

    /// The deadline of each call (sent as `grpc-timeout`).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration::parse)]
    deadline: Duration,

    /// After the unary calls, one server-streaming `Count` call of this many replies.
    #[arg(long, value_name = "N")]
    stream: Option<u32>,

    /// Pause between unary calls.
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = duration::parse)]
    interval: Duration,

    /// Unary calls in flight at once, all multiplexed on the one channel.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    concurrency: u64,
}

pub async fn run(args: GrpcCallArgs) -> anyhow::Result<ExitCode> {
    let endpoint = tonic::transport::Endpoint::from_shared(args.to.clone())
        .with_context(|| format!("{}: not a URL", args.to))?
        .connect_timeout(args.deadline);
    // One channel to one address: one HTTP/2 connection carries every call.
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connect to {}", args.to))?;
    let mut client = DemoClient::new(channel);
    let mut tally: BTreeMap<String, u64> = BTreeMap::new();
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed = 0u64;
    let mut set = tokio::task::JoinSet::new();
    let mut next = 1u64;
    while next <= args.count || !set.is_empty() {
        while (set.len() as u64) < args.concurrency && next <= args.count {
            if next > 1 && !args.interval.is_zero() {
                tokio::time::sleep(args.interval).await;
            }
            let mut client = client.clone();
            let (i, deadline) = (next, args.deadline);
            set.spawn(async move {
                let mut req = Request::new(SayRequest {
                    message: format!("call {i}"),
                });
                req.set_timeout(deadline);
                let start = Instant::now();
                // A little longer than the deadline, so the deadline's own error is what is
                // seen.
                let result = tokio::time::timeout(deadline * 2, client.say(req))
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer (client timer)")));
                (i, result, start.elapsed().as_millis())
            });
            next += 1;
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (i, result, ms) = joined.context("a call's task")?;
        let mut line = format!("#{i} ");
        match result {
            Ok(resp) => {
                let r = resp.into_inner();
                let _ = write!(line, "OK answered by {} ({ms} ms)", r.pod);
                if !r.version.is_empty() {
                    let _ = write!(line, " version {}", r.version);
                    *versions.entry(r.version).or_default() += 1;
                }
                *tally.entry(r.pod).or_default() += 1;
            }
            Err(s) => {
                failed += 1;
                let _ = write!(line, "failed after {ms} ms: {}", describe(&s));
            }
        }
        line.push_str("  |");
        for (pod, n) in &tally {
            let _ = write!(line, " {pod}={n}");
        }
        if failed > 0 {
            let _ = write!(line, " failed={failed}");
        }
        println!("{line}");
    }
    let mut stream_ok = true;
    if let Some(n) = args.stream {
        stream_ok = count(&mut client, n, args.deadline).await;
    }
    let mut done = format!(
        "done: {} calls, {failed} failed, answered by {} pods",
        args.count,
        tally.len()
    );
    if !versions.is_empty() {
        done.push_str(", versions");
        for (v, n) in &versions {
            let _ = write!(done, " {v}={n}");
        }
    }
    println!("{done}");
    Ok(if failed == 0 && stream_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One `Count(n)`: every reply must arrive, in order.
async fn count(
    client: &mut DemoClient<tonic::transport::Channel>,
    n: u32,
    deadline: Duration,
) -> bool {
    let mut req = Request::new(CountRequest { n, interval_ms: 0 });
    req.set_timeout(deadline);
    let start = Instant::now();
    let result = tokio::time::timeout(deadline * 2, async {
        let mut stream = client.count(req).await?.into_inner();
        let mut got = Vec::new();
        while let Some(r) = stream.message().await? {
            got.push(r);
        }
        Ok::<_, Status>(got)
    })
    .await
    .unwrap_or_else(|_| Err(Status::deadline_exceeded("no end of stream (client timer)")));
    let ms = start.elapsed().as_millis();
    match result {
        Ok(got) => {
            let in_order = got.iter().enumerate().all(|(k, r)| r.i as usize == k + 1);
            let pod = got.first().map(|r| r.pod.as_str()).unwrap_or("?");
            println!(
                "stream: {} of {n} replies from {pod}{} ({ms} ms)",
                got.len(),
                if in_order {
                    ", in order"
                } else {
                    ", OUT OF ORDER"
                }
            );
            in_order && got.len() == n as usize
        }
        Err(s) => {
            println!("stream: failed after {ms} ms: {}", describe(&s));
            false
        }
    }
}

/// A status as the user needs it: code, message, and the proxy's cause if it answered.
fn describe(s: &Status) -> String {
    let mut out = format!("{:?}: {}", s.code(), s.message());
    if let Some(cause) = s
        .metadata()
        .get("x-wasmesh-error")
        .and_then(|v| v.to_str().ok())
    {
        let _ = write!(out, " (x-wasmesh-error={cause})");
    }
    out
}
