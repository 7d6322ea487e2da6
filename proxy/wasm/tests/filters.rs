//! Our filters (filters/canary, filters/header-route) in the host: the canary split over
//! 1,000 users, stickiness, header and cookie matches; header-route's edits and rules; a
//! chain of both, ordered; a new configuration swapped in under load with no failed request.

mod support;

use std::time::Duration;

use support::{exchange, header, host, ok, request, wasm};
use wasmesh_wasm::{FilterChain, LoadError, Phase, PluginConfig, WasmHost};

fn canary(h: &WasmHost, config: &str) -> wasmesh_wasm::Plugin {
    h.load(PluginConfig::new("canary", wasm("canary")).with_config(config.to_string()))
        .expect("canary loads")
}

#[tokio::test]
async fn canary_split_is_within_tolerance_and_sticky() {
    let h = host();
    let chain = FilterChain::new(vec![canary(
        &h,
        r#"{"percentage": 20, "sticky_header": "x-user"}"#,
    )]);
    let mut canary_users = Vec::new();
    for i in 0..1000 {
        let req = request("")
            .header("x-user", format!("user-{i}"))
            .body(vec![])
            .unwrap();
        let x = exchange(&chain, req, ok).await;
        let route = header(x.upstream_request.as_ref().unwrap(), "x-canary")
            .unwrap()
            .to_string();
        let decision = x.headers["x-canary-decision"].to_str().unwrap().to_string();
        assert_eq!(decision, format!("{route}; by=user"));
        if route == "canary" {
            canary_users.push(i);
        }
    }
    let share = canary_users.len() as f64 / 1000.0;
    assert!((0.16..=0.24).contains(&share), "20% ± 4%: got {share}");
    // Sticky: the same users get the same answer again.
    for i in canary_users.iter().take(50) {
        let req = request("")
            .header("x-user", format!("user-{i}"))
            .body(vec![])
            .unwrap();
        let x = exchange(&chain, req, ok).await;
        assert_eq!(
            header(x.upstream_request.as_ref().unwrap(), "x-canary"),
            Some("canary")
        );
    }
}

#[tokio::test]
async fn canary_header_and_cookie_matches_win() {
    let h = host();
    let cfg = r#"{"percentage": 0, "match_headers": {"x-canary-opt-in": "yes"}, "match_cookie": "canary=always",
                  "route_header": "x-version", "canary_value": "v2", "stable_value": "v1"}"#;
    let chain = FilterChain::new(vec![canary(&h, cfg)]);
    let x = exchange(
        &chain,
        request("")
            .header("x-canary-opt-in", "yes")
            .body(vec![])
            .unwrap(),
        ok,
    )
    .await;
    assert_eq!(
        header(x.upstream_request.as_ref().unwrap(), "x-version"),
        Some("v2")
    );
    assert_eq!(x.headers["x-canary-decision"], "v2; by=header");
    let x = exchange(
        &chain,
        request("")
            .header("cookie", "a=b; canary=always")
            .body(vec![])
            .unwrap(),
        ok,
    )
    .await;
    assert_eq!(x.headers["x-canary-decision"], "v2; by=cookie");
    let x = exchange(&chain, request("").body(vec![]).unwrap(), ok).await;
    assert_eq!(
        header(x.upstream_request.as_ref().unwrap(), "x-version"),
        Some("v1"),
        "0% and no match: stable"
    );
}

#[test]
fn canary_rejects_bad_config() {
    let h = host();
    for bad in [
        r#"{"percentage": 101}"#,
        "{}",
        "nope",
        r#"{"percentage": 5, "typo": 1}"#,
    ] {
        let err = h
            .load(PluginConfig::new("canary", wasm("canary")).with_config(bad))
            .unwrap_err();
        assert!(
            matches!(err, LoadError::ConfigRejected { .. }),
            "{bad}: {err}"
        );
    }
}

const ROUTES: &str = r#"{
  "request": {"set": {"x-env": "prod"}, "remove": ["x-debug"],
              "rewrite": [{"header": ":path", "prefix": "/v1/", "to": "/v2/"}, {"header": "x-a", "find": "old", "to": "new"}]},
  "response": {"set": {"x-served-by": "wasmesh"}, "remove": ["server"]},
  "routes": [{"match": {"header": "x-tenant", "exact": "acme"}, "set": {"x-route": "acme"}},
             {"match": {"header": ":path", "prefix": "/v2/beta"}, "set": {"x-route": "beta"}}],
  "default_route": {"x-route": "default"},
  "route_header_echo": "x-route-decision"
}"#;

fn upstream_with_server(_: &http::request::Parts, _: &[u8]) -> http::Response<Vec<u8>> {
    http::Response::builder()
        .status(200)
        .header("server", "backend/1")
        .body(b"ok".to_vec())
        .unwrap()
}

#[tokio::test]
async fn header_route_edits_and_rules() {
    let h = host();
    let p = h
        .load(PluginConfig::new("header-route", wasm("header_route")).with_config(ROUTES))
        .unwrap();
    let chain = FilterChain::new(vec![p]);
    let req = http::Request::builder()
        .uri("/v1/beta/x")
        .header("host", "svc")
        .header("x-debug", "1")
        .header("x-a", "very-old")
        .body(vec![])
        .unwrap();
    let x = exchange(&chain, req, upstream_with_server).await;
    let up = x.upstream_request.unwrap();
    assert_eq!(up.uri, "/v2/beta/x");
    assert_eq!(header(&up, "x-env"), Some("prod"));
    assert_eq!(header(&up, "x-debug"), None);
    assert_eq!(header(&up, "x-a"), Some("very-new"));
    assert_eq!(
        header(&up, "x-route"),
        Some("beta"),
        "rules match the rewritten path"
    );
    assert_eq!(x.headers["x-served-by"], "wasmesh");
    assert!(x.headers.get("server").is_none());
    assert_eq!(x.headers["x-route-decision"], "rule-1");

    let req = http::Request::builder()
        .uri("/")
        .header("host", "svc")
        .header("x-tenant", "acme")
        .body(vec![])
        .unwrap();
    let x = exchange(&chain, req, ok).await;
    assert_eq!(
        header(x.upstream_request.as_ref().unwrap(), "x-route"),
        Some("acme")
    );
    let req = http::Request::builder()
        .uri("/")
        .header("host", "svc")
        .body(vec![])
        .unwrap();
    let x = exchange(&chain, req, ok).await;
    assert_eq!(
        header(x.upstream_request.as_ref().unwrap(), "x-route"),
        Some("default")
    );
}

#[tokio::test]
async fn a_chain_runs_in_phase_order_and_responses_in_reverse() {
    let h = host();
    // header-route (AUTHN) sets x-tenant-derived x-user; canary (default phase) then hashes it.
    let mut hr = PluginConfig::new(
        "header-route",
        wasm("header_route"),
    )
    .with_config(r#"{"routes": [{"match": {"header": "x-tenant", "present": true}, "set": {"x-user": "tenant-user"}}]}"#);
    hr.phase = Phase::Authn;
    let hr = h.load(hr).unwrap();
    let c = canary(&h, r#"{"percentage": 100, "sticky_header": "x-user"}"#);
    let chain = FilterChain::new(vec![c, hr]);
    assert_eq!(chain.plugins()[0].name(), "header-route");
    let x = exchange(
        &chain,
        request("").header("x-tenant", "t").body(vec![]).unwrap(),
        ok,
    )
    .await;
    assert_eq!(
        x.headers["x-canary-decision"], "canary; by=user",
        "canary saw the header set before it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_swapped_under_load_fails_no_request() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let h = host();
    let current = std::sync::Arc::new(arc_swap_like::Swap::new(FilterChain::new(vec![canary(
        &h,
        r#"{"percentage": 0}"#,
    )])));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (current, stop) = (current.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let (mut requests, mut canaries) = (0, 0);
            while !stop.load(Ordering::Relaxed) && requests < 100_000 {
                let chain = current.get();
                let x = exchange(&chain, request("").body(vec![]).unwrap(), ok).await;
                assert_eq!(x.status, 200, "request {requests} failed");
                requests += 1;
                if header(x.upstream_request.as_ref().unwrap(), "x-canary") == Some("canary") {
                    canaries += 1;
                }
                tokio::task::yield_now().await;
            }
            (requests, canaries)
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    current.set(FilterChain::new(vec![canary(&h, r#"{"percentage": 100}"#)]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut requests, mut canaries) = (0, 0);
    for t in tasks {
        let (r, c) = t.await.expect("no request failed");
        requests += r;
        canaries += c;
    }
    assert!(
        canaries > 0 && canaries < requests,
        "both configurations served: {canaries} of {requests}"
    );
}

/// A tiny swap cell (the proxy uses arc-swap; a mutex is enough here).
mod arc_swap_like {
    pub struct Swap<T: Clone>(std::sync::Mutex<T>);
    impl<T: Clone> Swap<T> {
        pub fn new(t: T) -> Self {
            Swap(std::sync::Mutex::new(t))
        }
        pub fn get(&self) -> T {
            self.0.lock().unwrap().clone()
        }
        pub fn set(&self, t: T) {
            *self.0.lock().unwrap() = t;
        }
    }
}
