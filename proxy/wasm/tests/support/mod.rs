//! Test helpers: finding the compiled filters, hosts with test-friendly limits, and a
//! simulated exchange that drives a chain the way the proxy does (headers, body in chunks
//! then an empty end-of-stream chunk, an upstream response, the response path).

#![allow(dead_code)]

pub mod harness;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use wasmesh_wasm::{
    BodyVerdict, FilterChain, HostConfig, LocalReply, StreamInfo, Verdict, WasmHost,
};

pub const BUILD: &str = "rustup target add wasm32-wasip1 && cargo build --manifest-path filters/Cargo.toml --target wasm32-wasip1 --release";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The compiled filter `name` (`abi_test`, `canary`, `header_route`) for `target`.
pub fn wasm_for(name: &str, target: &str) -> Vec<u8> {
    let mut dirs = Vec::new();
    if let Ok(d) = std::env::var("WASMESH_FILTERS_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(d) = std::env::var("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(d).join(target).join("release"));
    }
    dirs.push(repo().join("target").join(target).join("release"));
    dirs.push(repo().join("filters/target").join(target).join("release"));
    for d in &dirs {
        if let Ok(b) = std::fs::read(d.join(format!("{name}.wasm"))) {
            return b;
        }
    }
    panic!(
        "{name}.wasm for {target} not found (looked in {dirs:?}); build the filters first, from the repository root:\n  {}",
        if target == "wasm32-wasip1" {
            BUILD.to_string()
        } else {
            format!(
                "rustup target add {target} && cargo build --manifest-path filters/Cargo.toml --target {target} --release -p abi-test"
            )
        }
    );
}

pub fn wasm(name: &str) -> Vec<u8> {
    wasm_for(name, "wasm32-wasip1")
}

/// A host with short backoff and a small pool (tests run many hosts at once).
pub fn host_with(f: impl FnOnce(&mut HostConfig)) -> WasmHost {
    let mut c = HostConfig {
        instances_per_plugin: 2,
        max_instances: 16,
        reload_backoff: Duration::from_millis(10),
        // Tests share two cores with builds: a wall-clock deadline of 10 ms would misfire.
        callback_deadline: Duration::from_millis(300),
        // Compiling a filter in a debug build takes seconds: share the precompiled modules
        // between the tests' hosts.
        cache_dir: Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("wasm-cache")),
        ..HostConfig::default()
    };
    f(&mut c);
    WasmHost::new(c).expect("host starts")
}

pub fn host() -> WasmHost {
    host_with(|_| {})
}

/// What a simulated exchange came to.
#[derive(Debug, Default)]
pub struct Exchange {
    /// The request as the upstream got it (None: it never left).
    pub upstream_request: Option<http::request::Parts>,
    pub upstream_body: Vec<u8>,
    /// The response the client got.
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
    pub reply: Option<LocalReply>,
    pub reset: bool,
}

pub fn request(op: &str) -> http::request::Builder {
    http::Request::builder()
        .uri("/test/path?q=1")
        .header("host", "svc.test")
        .header("x-abi-op", op)
}

/// Runs `req` through `chain`; the upstream answers with `respond`.
pub async fn exchange(
    chain: &FilterChain,
    req: http::Request<Vec<u8>>,
    respond: impl FnOnce(&http::request::Parts, &[u8]) -> http::Response<Vec<u8>>,
) -> Exchange {
    let info = StreamInfo {
        source: Some("127.0.0.1:40000".parse().unwrap()),
        destination: Some("127.0.0.1:8080".parse().unwrap()),
        ..Default::default()
    };
    let mut s = chain.new_stream(info);
    let (mut parts, body) = req.into_parts();
    let mut out = Exchange::default();
    let reply = |out: &mut Exchange, r: LocalReply| {
        out.status = r.status;
        out.headers = r.headers.clone();
        out.body = r.body.to_vec();
        out.reply = Some(r);
    };
    match s.on_request_headers(&mut parts, body.is_empty()).await {
        Verdict::Continue => {}
        Verdict::LocalReply(r) => {
            reply(&mut out, r);
            return out;
        }
        Verdict::Reset => {
            out.reset = true;
            return out;
        }
    }
    if !body.is_empty() {
        let mid = body.len() / 2;
        let chunks = [
            Bytes::copy_from_slice(&body[..mid]),
            Bytes::copy_from_slice(&body[mid..]),
            Bytes::new(),
        ];
        let n = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            match s.on_request_body(c, i == n - 1).await {
                BodyVerdict::Data(d) => out.upstream_body.extend_from_slice(&d),
                BodyVerdict::LocalReply(r) => {
                    reply(&mut out, r);
                    return out;
                }
                BodyVerdict::Reset => {
                    out.reset = true;
                    return out;
                }
            }
        }
    }
    let res = respond(&parts, &out.upstream_body);
    out.upstream_request = Some(parts);
    let (mut rparts, rbody) = res.into_parts();
    match s.on_response_headers(&mut rparts, rbody.is_empty()).await {
        Verdict::Continue => {}
        Verdict::LocalReply(r) => {
            reply(&mut out, r);
            return out;
        }
        Verdict::Reset => {
            out.reset = true;
            return out;
        }
    }
    if !rbody.is_empty() {
        for (i, c) in [Bytes::from(rbody), Bytes::new()].into_iter().enumerate() {
            match s.on_response_body(c, i == 1).await {
                BodyVerdict::Data(d) => out.body.extend_from_slice(&d),
                BodyVerdict::LocalReply(r) => {
                    reply(&mut out, r);
                    return out;
                }
                BodyVerdict::Reset => {
                    out.reset = true;
                    return out;
                }
            }
        }
    }
    out.status = rparts.status.as_u16();
    out.headers = rparts.headers;
    s.finish();
    out
}

/// An upstream that answers 200 with a fixed body.
pub fn ok(_: &http::request::Parts, _: &[u8]) -> http::Response<Vec<u8>> {
    http::Response::builder()
        .status(200)
        .header("content-type", "text/plain")
        .body(b"upstream body".to_vec())
        .unwrap()
}

pub fn header<'a>(p: &'a http::request::Parts, name: &str) -> Option<&'a str> {
    p.headers.get(name).and_then(|v| v.to_str().ok())
}

pub fn shared<T>(t: T) -> Arc<T> {
    Arc::new(t)
}
