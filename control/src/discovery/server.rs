//! The `wasmesh.discovery.v1.Discovery` gRPC service, written by hand around a codec that
//! sends pre-encoded `TableUpdate`s: the generated server would re-encode every update for
//! every subscriber. `GetModule` answers with the bytes of a module some WasmPlugin names
//! (NOT_FOUND for any other sha256). The same port serves `wasmesh.identity.v1.Identity` when control is the
//! mesh's CA (see [`crate::identity`]).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use futures::future::BoxFuture;
use http_body::Body;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Status, server::ServerStreamingService};
use wasmesh_api::identity::identity_server::IdentityServer;
use wasmesh_api::{
    GET_MODULE_PATH, GetModuleRequest, IDENTITY_PATH_PREFIX, MAX_MODULE_SIZE, Module, WATCH_PATH,
    WatchRequest,
};

use crate::identity::IdentityService;

use super::hub::Hub;

/// Encodes nothing: the items already are encoded `TableUpdate`s.
#[derive(Debug, Default, Clone, Copy)]
struct PreEncoded;

#[derive(Debug, Default)]
struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

struct RequestDecoder(tonic_prost::ProstDecoder<WatchRequest>);

impl Decoder for RequestDecoder {
    type Item = WatchRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<WatchRequest>, Status> {
        self.0.decode(src)
    }
}

impl Codec for PreEncoded {
    type Encode = Bytes;
    type Decode = WatchRequest;
    type Encoder = BytesEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder(tonic_prost::ProstDecoder::default())
    }
}

/// Messages queued per subscriber before it pushes back (each ≤ a snapshot part or a delta).
const SUBSCRIBER_QUEUE: usize = 2;

#[derive(Clone, Debug)]
struct Watch(Arc<Hub>);

impl ServerStreamingService<WatchRequest> for Watch {
    type Response = Bytes;
    type ResponseStream = ReceiverStream<Result<Bytes, Status>>;
    type Future = BoxFuture<'static, Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: tonic::Request<WatchRequest>) -> Self::Future {
        let hub = self.0.clone();
        Box::pin(async move {
            let peer = request.remote_addr();
            let who = request.into_inner();
            let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
            tokio::spawn(feed(hub, who, peer, tx));
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        })
    }
}

/// Sends one subscriber a snapshot, then deltas; a fresh snapshot whenever it fell too far
/// behind. Ends when the subscriber goes away.
async fn feed(
    hub: Arc<Hub>,
    who: WatchRequest,
    peer: Option<std::net::SocketAddr>,
    tx: mpsc::Sender<Result<Bytes, Status>>,
) {
    hub.stats.subscribers.fetch_add(1, Ordering::Relaxed);
    let _gone = OnDrop(|| {
        hub.stats.subscribers.fetch_sub(1, Ordering::Relaxed);
    });
    tracing::info!(pod = %who.pod_name, namespace = %who.pod_namespace, node = %who.node_name, ?peer, "proxy subscribed");
    loop {
        let (snapshot, mut deltas) = tokio::select! {
            s = hub.subscribe() => s,
            _ = tx.closed() => return,
        };
        let version = snapshot.version;
        for part in snapshot.parts(Hub::SNAPSHOT_PART) {
            if tx.send(Ok(part)).await.is_err() {
                return;
            }
        }
        // Let the shared copy go as soon as this subscriber has it.
        drop(snapshot);
        loop {
            match deltas.recv().await {
                Ok(d) if d.version <= version => {}
                Ok(d) => {
                    if tx.send(Ok(d.bytes.clone())).await.is_err() {
                        tracing::info!(pod = %who.pod_name, namespace = %who.pod_namespace, "proxy unsubscribed");
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    hub.stats.resyncs.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(pod = %who.pod_name, namespace = %who.pod_namespace, missed = n, "proxy fell behind; resending a snapshot");
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// `GetModule`: a module's bytes by sha256.
#[derive(Clone, Debug)]
struct GetModule(Arc<Hub>);

impl tonic::server::UnaryService<GetModuleRequest> for GetModule {
    type Response = Module;
    type Future = BoxFuture<'static, Result<tonic::Response<Module>, Status>>;

    fn call(&mut self, request: tonic::Request<GetModuleRequest>) -> Self::Future {
        let hub = self.0.clone();
        Box::pin(async move {
            let peer = request.remote_addr();
            let sha256 = request.into_inner().sha256.trim().to_ascii_lowercase();
            match hub.module(&sha256) {
                Some(bytes) => {
                    hub.stats.modules_sent.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%sha256, size = bytes.len(), ?peer, "module sent");
                    Ok(tonic::Response::new(Module {
                        sha256,
                        wasm: bytes.to_vec(),
                    }))
                }
                None => {
                    hub.stats.modules_not_found.fetch_add(1, Ordering::Relaxed);
                    Err(Status::not_found(format!(
                        "no module with sha256 {sha256:?}: no WasmPlugin names it (any more)"
                    )))
                }
            }
        })
    }
}

struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// The gRPC services as a tower service over HTTP/2 requests.
#[derive(Clone)]
pub struct DiscoveryService {
    hub: Arc<Hub>,
    identity: Option<IdentityServer<IdentityService>>,
}

impl std::fmt::Debug for DiscoveryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoveryService")
            .field("identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl DiscoveryService {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            hub,
            identity: None,
        }
    }

    /// Also serves the identity service (Certify, WatchTrustBundle).
    pub fn with_identity(mut self, identity: Option<IdentityService>) -> Self {
        self.identity = identity.map(IdentityService::into_server);
        self
    }
}

impl<B> tower::Service<http::Request<B>> for DiscoveryService
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let hub = self.hub.clone();
        let identity = self.identity.clone();
        Box::pin(async move {
            let path = req.uri().path();
            if path == WATCH_PATH {
                let mut grpc = tonic::server::Grpc::new(PreEncoded);
                Ok(grpc.server_streaming(Watch(hub), req).await)
            } else if path == GET_MODULE_PATH {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                    Module,
                    GetModuleRequest,
                >::default())
                .max_encoding_message_size(MAX_MODULE_SIZE + 1024);
                Ok(grpc.unary(GetModule(hub), req).await)
            } else if let Some(mut identity) = identity
                && path.starts_with(IDENTITY_PATH_PREFIX)
            {
                tower::Service::call(&mut identity, req).await
            } else {
                Ok(Status::unimplemented(format!("no method {}", req.uri().path())).into_http())
            }
        })
    }
}

/// Serves discovery on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, hub: Arc<Hub>, shutdown: impl Future<Output = ()>) {
    serve_with_identity(listener, hub, None, shutdown).await
}

/// Serves discovery, and identity if given, on `listener` until `shutdown` resolves.
pub async fn serve_with_identity(
    listener: TcpListener,
    hub: Arc<Hub>,
    identity: Option<IdentityService>,
    shutdown: impl Future<Output = ()>,
) {
    let svc = DiscoveryService::new(hub).with_identity(identity);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_concurrent_streams(16)
        // Bound what one slow proxy can make us buffer (hyper's default is 400 KiB).
        .max_send_buf_size(Hub::SNAPSHOT_PART * 2);
    let builder = builder.http2_only();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            hyper_util::service::TowerToHyperService::new(svc.clone()),
        );
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "discovery connection ended");
            }
        });
    }
    // Watch streams never end by themselves: give in-flight writes a moment, then stop.
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}
