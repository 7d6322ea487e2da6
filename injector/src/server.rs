//! The HTTPS server: TLS (rustls, certificate reloaded from files) and HTTP/1.1 + HTTP/2
//! (hyper) in front of [`crate::webhook::review`].
//!
//! [`run`] takes a bound listener and a shutdown future and binds nothing itself, so tests run
//! it on `127.0.0.1:0`. Routes:
//!
//! | route | answer |
//! |---|---|
//! | `POST /inject`, `POST /inject/namespace-enabled` | 200 AdmissionReview; 400 empty body or not a review (with the reason); 413 body over the limit; 415 not `application/json`; 408 body too slow |
//! | `GET /healthz` | 200 `ok` |
//! | anything else | 404, or 405 with `Allow` |
//!
//! Nothing here can hang a caller: the TLS handshake, the request head and the body each have
//! a deadline.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::tls::{CertFiles, ReloadingCert, TlsError};
use crate::webhook::{self, ReviewError, Verdict};

/// Everything [`run`] needs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub tls: CertFiles,
    /// How often the certificate files are checked for changes.
    pub reload_interval: Duration,
    pub injector: Config,
    /// Deadline for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Deadline for a request's head and for its body.
    pub request_timeout: Duration,
    /// Largest AdmissionReview accepted (the API server's own limit on objects is 3 MiB).
    pub max_body_bytes: usize,
    /// How long in-flight requests may take to finish after shutdown.
    pub drain_timeout: Duration,
}

impl ServerConfig {
    /// Defaults for everything but the certificate files.
    pub fn new(tls: CertFiles, injector: Config) -> Self {
        Self {
            tls,
            reload_interval: Duration::from_secs(10),
            injector,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 8 << 20,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// The server could not start. Messages include their cause (nothing is chained).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("TLS certificate: {0}")]
    Tls(TlsError),
    #[error("TLS configuration: {0}")]
    Rustls(rustls::Error),
}

impl From<TlsError> for ServerError {
    fn from(e: TlsError) -> Self {
        Self::Tls(e)
    }
}

impl From<rustls::Error> for ServerError {
    fn from(e: rustls::Error) -> Self {
        Self::Rustls(e)
    }
}

struct State {
    injector: Config,
    request_timeout: Duration,
    max_body_bytes: usize,
}

/// Serves until `shutdown` completes, then lets in-flight requests finish (up to
/// `drain_timeout`). Fails only if the certificate cannot be loaded at start.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let cert = ReloadingCert::load(config.tls.clone())?;
    let acceptor = TlsAcceptor::from(Arc::new(cert.server_config()?));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let watcher = tokio::spawn(crate::tls::watch(
        cert.clone(),
        config.reload_interval,
        stopped(stop_rx),
    ));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.request_timeout);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let state = Arc::new(State {
        injector: config.injector.clone(),
        request_timeout: config.request_timeout,
        max_body_bytes: config.max_body_bytes,
    });
    let graceful = GracefulShutdown::new();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "injector listening (HTTPS)");
    }

    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let state = state.clone();
        let watch = graceful.watcher();
        let handshake_timeout = config.handshake_timeout;
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watch.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

    drop(listener);
    let _ = stop_tx.send(());
    let _ = watcher.await;
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(config.drain_timeout) => {
            tracing::warn!("requests still running after the drain timeout; closing them");
        }
    }
    Ok(())
}

async fn stopped(mut rx: tokio::sync::watch::Receiver<()>) {
    let _ = rx.changed().await;
}

type Answer = Response<Full<Bytes>>;

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Answer, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        return Ok(match *req.method() {
            Method::GET | Method::HEAD => text(StatusCode::OK, "ok\n"),
            _ => not_allowed("GET"),
        });
    }
    let Some(injection) = webhook::namespace_injection(&path) else {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "not found: admission reviews go to POST /inject or /inject/namespace-enabled\n",
        ));
    };
    if req.method() != Method::POST {
        return Ok(not_allowed("POST"));
    }
    if !is_json(req.headers().get(CONTENT_TYPE)) {
        return Ok(text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported content type: send Content-Type: application/json\n",
        ));
    }
    let body = Limited::new(req.into_body(), state.max_body_bytes).collect();
    let body = match tokio::time::timeout(state.request_timeout, body).await {
        Err(_) => {
            return Ok(text(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time\n",
            ));
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Ok(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("body over {} bytes\n", state.max_body_bytes),
            ));
        }
        Ok(Err(e)) => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                &format!("reading the body failed: {e}\n"),
            ));
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    Ok(match webhook::review(&body, injection, &state.injector) {
        Ok(reviewed) => {
            log(&path, &reviewed.outcome);
            let mut response = Response::new(Full::new(Bytes::from(reviewed.body)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e @ ReviewError::Encode(_)) => {
            tracing::error!(error = %e, "answering an admission review failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n"))
        }
        Err(e) => {
            tracing::warn!(%path, error = %e, "rejected a request that is not an admission review");
            text(StatusCode::BAD_REQUEST, &format!("{e}\n"))
        }
    })
}

fn log(path: &str, o: &webhook::Outcome) {
    let (uid, ns, pod, dry_run) = (&o.uid, &o.namespace, &o.pod, o.dry_run);
    match &o.result {
        Verdict::Injected(mode) => {
            tracing::info!(%path, %uid, namespace = %ns, %pod, dry_run, %mode, "injected");
        }
        Verdict::Skipped(reason) if reason.is_problem() => {
            tracing::warn!(%path, %uid, namespace = %ns, %pod, dry_run, %reason, "not injected");
        }
        Verdict::Skipped(reason) => {
            tracing::debug!(%path, %uid, namespace = %ns, %pod, dry_run, %reason, "skipped");
        }
        Verdict::Ignored(why) => {
            tracing::debug!(%path, %uid, namespace = %ns, %pod, %why, "ignored");
        }
        Verdict::Failed(why) => {
            tracing::warn!(%path, %uid, namespace = %ns, %pod, dry_run, error = %why,
                "could not handle the pod; allowed it unchanged");
        }
    }
}

/// `application/json`, parameters (`; charset=utf-8`) allowed.
fn is_json(value: Option<&HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

fn text(status: StatusCode, body: &str) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn not_allowed(allow: &'static str) -> Answer {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method not allowed: use {allow}\n"),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        let ok = |s: &'static str| is_json(Some(&HeaderValue::from_static(s)));
        assert!(ok("application/json"));
        assert!(ok("application/json; charset=utf-8"));
        assert!(ok("Application/JSON"));
        assert!(!ok("text/plain"));
        assert!(!ok("application/jsonx"));
        assert!(!is_json(None));
    }
}
