//! An in-process fake kube-apiserver over loopback HTTP, good enough for `kube::runtime::watcher`.
//!
//! It serves LIST and WATCH (nothing else) for Services, EndpointSlices, Pods, Nodes,
//! HTTPRoutes, WasmPlugins and AuthorizationPolicies, on the paths the real API server uses
//! (`/api/v1/services`, `/api/v1/namespaces/{ns}/pods`,
//! `/apis/discovery.k8s.io/v1/endpointslices`, `/apis/gateway.networking.k8s.io/v1/httproutes`,
//! ...), with:
//! - one global, monotonically increasing `resourceVersion` and a change log, so a watch "from
//!   rv N" replays every change after N, then streams live changes as newline-delimited JSON
//!   `WatchEvent`s (ADDED / MODIFIED / DELETED / BOOKMARK / ERROR) while the connection is open;
//! - `limit` / `continue` paging over a snapshot taken by the first page;
//! - label selectors (`k=v`, `k==v`, `k!=v`, `k`, `!k`) and field selectors on
//!   `metadata.name` / `metadata.namespace`; a watch with a selector sees an object that stops
//!   matching as DELETED and one that starts matching as ADDED, like the real watch cache;
//! - "410 Gone" after [`FakeApiServer::compact`]: as an ERROR event for a watch from an older
//!   rv, as HTTP 410 for an expired `continue` token or a `resourceVersionMatch=Exact` list;
//! - `timeoutSeconds` (the watch response ends after it) and `allowWatchBookmarks`;
//! - kinds that are not served, as when a CRD is not installed
//!   ([`set_served`](FakeApiServer::set_served)): 404 for their paths.
//!
//! It also answers TokenReviews (`POST /apis/authentication.k8s.io/v1/tokenreviews`) for the
//! tokens a test registers with [`FakeApiServer::add_token`] (and revokes with
//! [`FakeApiServer::revoke_token`]), like an API server checking projected ServiceAccount tokens.
//!
//! Test hooks change objects ([`apply`](FakeApiServer::apply), [`delete`](FakeApiServer::delete)),
//! break things ([`close_watches`](FakeApiServer::close_watches),
//! [`hold_watches`](FakeApiServer::hold_watches), [`compact`](FakeApiServer::compact),
//! [`fail_next`](FakeApiServer::fail_next)) and observe the client
//! ([`requests`](FakeApiServer::requests), [`watching`](FakeApiServer::watching)).
//!
//! Note that kube's client retries 429, 503 and 504 by itself: inject 500 or 403 to make a
//! failure reach the watcher.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use wasmesh_control::testing::fake_apiserver::FakeApiServer;
//! let server = FakeApiServer::start().await?;
//! let client = server.client()?; // a kube::Client talking to it
//! # Ok(()) }
//! ```

mod request;
mod store;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::source::{Kind, Object};
use request::{parse_params, route};
pub use store::RequestCounts;
use store::{Failure, Store, Verb};

/// How long a watch lasts when the client sends no `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A fake API server listening on `127.0.0.1:<random port>`; stops when dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    /// `true` while watches are held (see [`FakeApiServer::hold_watches`]).
    hold: watch::Sender<bool>,
    /// Bumped whenever a watch is registered, to wake [`FakeApiServer::watching`].
    registered: watch::Sender<u64>,
    /// Valid ServiceAccount tokens.
    tokens: Mutex<std::collections::HashMap<String, TokenOwner>>,
}

/// Who a registered token belongs to: (namespace, serviceaccount, audiences).
type TokenOwner = (String, String, Vec<String>);

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a client for the fake could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FakeClientError {
    #[error("fake API server address {addr} is not a valid URL: {source}")]
    Url {
        addr: SocketAddr,
        source: http::Error,
    },
    #[error("cannot build a kube client for the fake API server at {addr}: {source}")]
    Client {
        addr: SocketAddr,
        source: kube::Error,
    },
}

impl FakeApiServer {
    /// Binds `127.0.0.1:0` and starts serving on the current tokio runtime.
    pub async fn start() -> std::io::Result<FakeApiServer> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            hold: watch::Sender::new(false),
            registered: watch::Sender::new(0),
            tokens: Mutex::default(),
        });
        let task = tokio::spawn(serve(listener, Arc::clone(&shared)));
        Ok(FakeApiServer { shared, addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes `token` a valid ServiceAccount token of `namespace/service_account` for
    /// `audiences` (TokenReview).
    pub fn add_token(
        &self,
        token: &str,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
    ) {
        self.shared
            .tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                token.to_string(),
                (
                    namespace.to_string(),
                    service_account.to_string(),
                    audiences.iter().map(|a| a.to_string()).collect(),
                ),
            );
    }

    /// Makes `token` invalid (as if it expired).
    pub fn revoke_token(&self, token: &str) {
        self.shared
            .tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(token);
    }

    /// `http://127.0.0.1:<port>/`
    pub fn url(&self) -> Result<http::Uri, FakeClientError> {
        http::Uri::builder()
            .scheme("http")
            .authority(self.addr.to_string())
            .path_and_query("/")
            .build()
            .map_err(|source| FakeClientError::Url {
                addr: self.addr,
                source,
            })
    }

    /// A kube client for this server (plain HTTP, no auth, default namespace "default").
    pub fn client(&self) -> Result<kube::Client, FakeClientError> {
        let config = kube::Config::new(self.url()?);
        kube::Client::try_from(config).map_err(|source| FakeClientError::Client {
            addr: self.addr,
            source,
        })
    }

    /// Creates or replaces an object (namespaced kinds default to namespace "default") and
    /// notifies watches; returns the object as stored, with its new `resourceVersion`.
    pub fn apply(&self, obj: Object) -> Object {
        self.shared.store().apply(obj)
    }

    /// Deletes an object and notifies watches; returns it (with the deletion's
    /// `resourceVersion`), or `None` if it did not exist. `namespace` is ignored for Nodes.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<Object> {
        self.shared.store().delete(kind, namespace, name)
    }

    /// The server's current objects of a kind, sorted by namespace and name.
    pub fn objects(&self, kind: Kind) -> Vec<Object> {
        self.shared.store().objects(kind)
    }

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Ends every open watch response cleanly, as a server-side timeout does; clients resume
    /// from their last resourceVersion.
    pub fn close_watches(&self) {
        self.shared.store().close_watches();
    }

    /// Makes every resourceVersion before the current one too old ("410 Gone"), as etcd
    /// compaction does. Open watches keep streaming; a client that reconnects from an older
    /// resourceVersion must list again.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Simulates a broken network path to the watch endpoint: open watches end and new WATCH
    /// requests wait (they are counted on arrival) until [`release_watches`]. Changes made
    /// meanwhile are not seen by any watch until then.
    ///
    /// [`release_watches`]: FakeApiServer::release_watches
    pub fn hold_watches(&self) {
        self.shared.hold.send_replace(true);
        self.shared.store().close_watches();
    }

    /// Lets held and future WATCH requests proceed.
    pub fn release_watches(&self) {
        self.shared.hold.send_replace(false);
    }

    /// Sends a BOOKMARK with the current resourceVersion to every open watch that asked for
    /// bookmarks (`allowWatchBookmarks=true`).
    pub fn bookmark(&self) {
        self.shared.store().bookmark();
    }

    /// Fails the next request (of any kind, list or watch) with this HTTP status and a
    /// `Status` body.
    pub fn fail_next(&self, status: u16) {
        self.shared.store().inject_failure(None, 0, status);
    }

    /// Fails the next request for `kind` with this HTTP status. Calls queue up: two calls fail
    /// the next two requests for that kind.
    pub fn fail_next_for(&self, kind: Kind, status: u16) {
        self.shared.store().inject_failure(Some(kind), 0, status);
    }

    /// Lets `successes` requests for `kind` through, then fails the next one (e.g. the second
    /// page of a paged list).
    pub fn fail_after(&self, kind: Kind, successes: usize, status: u16) {
        self.shared
            .store()
            .inject_failure(Some(kind), successes, status);
    }

    /// Serves a kind or not: an unserved kind answers 404 to every request, as the API server
    /// does for the resources of a CRD that is not installed. Every kind is served at first.
    /// Stopping ends the kind's open watches.
    pub fn set_served(&self, kind: Kind, served: bool) {
        self.shared.store().set_served(kind, served);
    }

    /// LIST and WATCH requests received for a kind so far.
    pub fn requests(&self, kind: Kind) -> RequestCounts {
        self.shared.store().counts(kind)
    }

    /// Open watches of a kind.
    pub fn open_watches(&self, kind: Kind) -> usize {
        self.shared.store().open_watches(kind)
    }

    /// Waits until at least one watch of `kind` is open (bound it with a timeout).
    pub async fn watching(&self, kind: Kind) {
        let mut registered = self.shared.registered.subscribe();
        while self.open_watches(kind) == 0 {
            if registered.changed().await.is_err() {
                return;
            }
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&shared)));
                }
                Err(e) => tracing::debug!(error = %e, "fake API server: accept failed"),
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let service = service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(respond(&shared, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %e, "fake API server: connection ended with an error");
    }
}

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// Answers a TokenReview from the registered tokens.
async fn token_review(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return failure_response(&Failure::new(400, e.to_string())),
    };
    let review: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return failure_response(&Failure::new(400, e.to_string())),
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let known = shared
        .tokens
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(token)
        .cloned();
    let status = match known {
        Some((ns, sa, audiences)) if wanted.iter().all(|w| audiences.contains(w)) => {
            serde_json::json!({
                "authenticated": true,
                "audiences": audiences,
                "user": {"username": format!("system:serviceaccount:{ns}:{sa}"), "groups": ["system:serviceaccounts"]},
            })
        }
        Some(_) => {
            serde_json::json!({"authenticated": false, "error": "token audiences do not match"})
        }
        None => {
            serde_json::json!({"authenticated": false, "error": "invalid bearer token, token lookup failed"})
        }
    };
    let answer = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "metadata": {},
        "spec": review["spec"],
        "status": status,
    });
    json_response(
        StatusCode::CREATED,
        serde_json::to_vec(&answer).unwrap_or_default(),
    )
}

async fn respond(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    if req.method() == http::Method::POST && req.uri().path() == TOKEN_REVIEWS {
        return token_review(shared, req).await;
    }
    if req.method() != http::Method::GET {
        let message = format!("the fake API server only serves GET, not {}", req.method());
        return failure_response(&Failure::new(405, message));
    }
    let path = req.uri().path();
    let Some(collection) = route(path) else {
        let message = format!("the fake API server does not serve {path}");
        return failure_response(&Failure::new(404, message));
    };
    let params = match parse_params(req.uri().query()) {
        Ok(p) => p,
        Err(message) => return failure_response(&Failure::new(400, message)),
    };
    let verb = if params.watch {
        Verb::Watch
    } else {
        Verb::List
    };
    shared.store().count(collection.kind, verb);
    if !shared.store().serves(collection.kind) {
        let message = "the server could not find the requested resource";
        return failure_response(&Failure::new(404, message));
    }
    if verb == Verb::Watch {
        let mut hold = shared.hold.subscribe();
        // An error means the server is being dropped; answering is harmless then.
        drop(hold.wait_for(|held| !*held).await);
    }

    let mut store = shared.store();
    if let Some(code) = store.take_failure(collection.kind) {
        let message = format!(
            "failure injected by the fake API server into this {verb:?} of {}",
            collection.kind
        );
        return failure_response(&Failure::new(code, message));
    }
    match verb {
        Verb::List => match store.list(&collection, &params) {
            Ok(body) => json_response(StatusCode::OK, body),
            Err(failure) => failure_response(&failure),
        },
        Verb::Watch => match store.watch(&collection, &params) {
            Ok(start) => {
                drop(store);
                shared.registered.send_modify(|n| *n += 1);
                let timeout = params
                    .timeout_seconds
                    .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
                watch_response(start, timeout)
            }
            Err(failure) => failure_response(&failure),
        },
    }
}

fn watch_response(start: store::WatchStart, timeout: Duration) -> Response<Body> {
    let live = match start.live {
        Some(rx) => UnboundedReceiverStream::new(rx).left_stream(),
        None => futures::stream::empty().right_stream(),
    };
    let lines = futures::stream::iter(start.initial)
        .chain(live)
        .take_until(tokio::time::sleep(timeout))
        .map(|line| Ok::<_, Infallible>(Frame::data(line)));
    let mut response = Response::new(StreamBody::new(lines).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn failure_response(failure: &Failure) -> Response<Body> {
    let status = StatusCode::from_u16(failure.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(&failure.status()).unwrap_or_default();
    json_response(status, body)
}
