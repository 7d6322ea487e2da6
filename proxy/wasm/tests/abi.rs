//! Every Proxy-Wasm call the host offers, exercised by the `abi-test` filter (filters/abi-test)
//! and checked where a user would see it: the request the upstream got, the response the
//! client got, metrics, logs.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use support::{exchange, header, host, host_with, ok, request, wasm};
use wasmesh_wasm::{
    CalloutError, CalloutFailure, CalloutResponse, FilterChain, HttpCallouts, PluginConfig,
    Verdict, WasmHost,
};

fn abi_chain(host: &WasmHost, vm_id: &str, config: &str) -> FilterChain {
    let mut cfg = PluginConfig::new("abi-test", wasm("abi_test")).with_config(config.to_string());
    cfg.vm_id = vm_id.into();
    cfg.env = vec![("ABI_ENV".into(), "from-plugin-env".into())];
    FilterChain::new(vec![host.load(cfg).expect("abi-test loads")])
}

#[tokio::test]
async fn headers_added_replaced_removed_and_pseudo_headers_read() {
    let h = host();
    let chain = abi_chain(&h, "headers", "{}");
    let req = request("headers")
        .header("x-abi-replace", "original")
        .header("x-abi-remove", "bye")
        .header("x-dup", "first")
        .header("x-dup", "second")
        .body(vec![])
        .unwrap();
    let x = exchange(&chain, req, ok).await;
    let up = x.upstream_request.expect("forwarded");
    let added: Vec<_> = up
        .headers
        .get_all("x-abi-added")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(added, ["1", "2"], "add keeps both values");
    assert_eq!(header(&up, "x-abi-replace"), Some("replaced"));
    assert_eq!(header(&up, "x-abi-remove"), None);
    assert_eq!(
        header(&up, "x-abi-seen"),
        Some("GET /test/path?q=1 svc.test http")
    );
    assert_eq!(
        header(&up, "x-abi-dup-first"),
        Some("first"),
        "get returns the first value"
    );
    assert_eq!(header(&up, "x-abi-mixed-case"), Some("lowered"));
    assert_eq!(
        header(&up, "x-abi-eos"),
        Some("true"),
        "no body: end_of_stream on headers"
    );
    assert_eq!(
        header(&up, "host"),
        Some("svc.test"),
        ":authority goes back as host"
    );
    assert_eq!(x.status, 200);
    assert_eq!(x.headers["x-abi-response"], "headers");
    assert_eq!(x.body, b"upstream body");
}

#[tokio::test]
async fn whole_map_get_and_set() {
    let h = host();
    let chain = abi_chain(&h, "pairs", "{}");
    let req = request("pairs")
        .header("x-abi-remove", "1")
        .header("x-keep", "k")
        .body(vec![])
        .unwrap();
    let up = exchange(&chain, req, ok)
        .await
        .upstream_request
        .expect("forwarded");
    // :authority :path :method :scheme x-abi-op x-abi-remove x-keep x-abi-eos = 8
    assert_eq!(header(&up, "x-abi-pairs"), Some("8"));
    assert_eq!(header(&up, "x-abi-remove"), None);
    assert_eq!(header(&up, "x-keep"), Some("k"));
    assert_eq!(
        up.uri.path(),
        "/test/path",
        "pseudo-headers survive a whole-map set"
    );
}

#[tokio::test]
async fn path_rewrite_changes_the_uri() {
    let h = host();
    let chain = abi_chain(&h, "rewrite", "{}");
    let up = exchange(&chain, request("path-rewrite").body(vec![]).unwrap(), ok)
        .await
        .upstream_request
        .unwrap();
    assert_eq!(up.uri, "/rewritten/test/path?q=1");
}

#[tokio::test]
async fn local_reply_runs_the_response_callbacks_and_never_reaches_upstream() {
    let h = host();
    let chain = abi_chain(&h, "reply", "{}");
    let x = exchange(&chain, request("local-reply").body(vec![]).unwrap(), ok).await;
    assert!(x.upstream_request.is_none());
    assert_eq!(x.status, 403);
    assert_eq!(x.body, b"denied by abi-test");
    assert_eq!(x.headers["x-abi-reply"], "1");
    assert_eq!(x.headers["content-length"], "18");
    assert_eq!(
        x.headers["x-abi-response"], "local-reply",
        "the sender's response callback ran"
    );

    let x = exchange(
        &chain,
        request("local-reply-continue").body(vec![]).unwrap(),
        ok,
    )
    .await;
    assert!(
        x.upstream_request.is_none(),
        "Continue after a local reply does not forward"
    );
    assert_eq!(x.status, 401, "the second reply is ignored");
}

#[tokio::test]
async fn properties_as_envoy_names_them() {
    let h = host();
    let chain = abi_chain(&h, "props", "{}");
    let req = request("properties")
        .header("x-prop", "hello-prop")
        .body(vec![])
        .unwrap();
    let x = exchange(&chain, req, ok).await;
    let up = x.upstream_request.unwrap();
    let p = |n: &str| header(&up, &format!("x-abi-prop-{n}")).map(str::to_string);
    assert_eq!(p("path").as_deref(), Some("/test/path?q=1"));
    assert_eq!(p("url-path").as_deref(), Some("/test/path"));
    assert_eq!(p("host").as_deref(), Some("svc.test"));
    assert_eq!(p("method").as_deref(), Some("GET"));
    assert_eq!(p("scheme").as_deref(), Some("http"));
    assert_eq!(p("protocol").as_deref(), Some("HTTP/1.1"));
    assert_eq!(p("query").as_deref(), Some("q=1"));
    assert_eq!(p("header").as_deref(), Some("hello-prop"));
    assert_eq!(p("plugin-name").as_deref(), Some("abi-test"));
    assert_eq!(p("root-id").as_deref(), Some("abi-test"));
    assert_eq!(p("missing").as_deref(), Some("<none>"));
    assert_eq!(p("destination-port-ok").as_deref(), Some("yes"));
    assert_eq!(p("source-has-port").as_deref(), Some("yes"));
    assert_eq!(x.headers["x-abi-prop-response-code"], "200");
    assert_eq!(
        x.headers["x-abi-prop-set"], "set-value",
        "set_property is readable later"
    );
    assert_eq!(x.headers["x-abi-prop-request-path-later"], "/test/path?q=1");
}

#[tokio::test]
async fn streaming_body_callbacks_and_buffered_rewrite() {
    let h = host();
    let chain = abi_chain(&h, "body", "{}");
    let req = request("body-count")
        .method("POST")
        .body(b"hello world".to_vec())
        .unwrap();
    let x = exchange(&chain, req, ok).await;
    assert_eq!(x.upstream_body, b"hello world");
    assert_eq!(
        header(x.upstream_request.as_ref().unwrap(), "x-abi-eos"),
        Some("false")
    );
    assert_eq!(
        x.headers["x-abi-body-calls"], "3",
        "two chunks and the end of stream"
    );

    let req = request("body-upper")
        .method("POST")
        .header("content-length", "11")
        .body(b"hello world".to_vec())
        .unwrap();
    let x = exchange(&chain, req, ok).await;
    assert_eq!(
        x.upstream_body, b"HELLO WORLD",
        "rewritten once the whole body was buffered"
    );
    assert_eq!(
        header(x.upstream_request.as_ref().unwrap(), "content-length"),
        None
    );
    assert_eq!(
        x.headers["x-abi-body-size"], "11",
        "sizes are cumulative while buffering"
    );

    let x = exchange(
        &chain,
        request("response-body-upper").body(vec![]).unwrap(),
        ok,
    )
    .await;
    assert_eq!(x.body, b"UPSTREAM BODY");
}

struct FakeCallouts;

impl HttpCallouts for FakeCallouts {
    fn call(
        &self,
        upstream: &str,
        request: http::Request<Bytes>,
        _timeout: Duration,
    ) -> Result<BoxFuture<'static, Result<CalloutResponse, CalloutFailure>>, CalloutError> {
        if upstream != "authz" {
            return Err(CalloutError::UnknownUpstream(upstream.into()));
        }
        let want = request
            .uri()
            .path()
            .trim_start_matches("/callout/")
            .to_string();
        let echo = request.headers().get("x-callout-echo").cloned();
        Ok(Box::pin(async move {
            if want == "hang" {
                futures::future::pending::<()>().await;
            }
            let mut headers = http::HeaderMap::new();
            if let Some(e) = echo {
                headers.insert("x-callout-echo", e);
            }
            Ok(CalloutResponse {
                status: want.parse().unwrap_or(500),
                headers,
                body: Bytes::from_static(b"ok!"),
                ..Default::default()
            })
        }))
    }
}

#[tokio::test]
async fn callouts_pause_the_request_and_resume_it() {
    let h = host_with(|c| c.callouts = Some(Arc::new(FakeCallouts)));
    let chain = abi_chain(&h, "callout", "{}");
    let x = exchange(&chain, request("callout").body(vec![]).unwrap(), ok).await;
    let up = x.upstream_request.expect("resumed and forwarded");
    assert_eq!(header(&up, "x-abi-callout-status"), Some("200"));
    assert_eq!(header(&up, "x-abi-callout-body-len"), Some("3"));
    assert_eq!(header(&up, "x-abi-callout-echo"), Some("ping"));

    let x = exchange(
        &chain,
        request("callout")
            .header("x-callout-want", "403")
            .body(vec![])
            .unwrap(),
        ok,
    )
    .await;
    assert!(x.upstream_request.is_none());
    assert_eq!(
        (x.status, x.body.as_slice()),
        (403, &b"denied by callout"[..])
    );

    let req = request("callout")
        .header("x-callout-want", "hang")
        .header("x-callout-timeout-ms", "50")
        .body(vec![])
        .unwrap();
    let x = exchange(&chain, req, ok).await;
    let up = x.upstream_request.expect("resumed after the timeout");
    assert_eq!(
        header(&up, "x-abi-callout-status"),
        Some("504"),
        "Envoy's synthesized timeout"
    );

    let up = exchange(
        &chain,
        request("callout-bad-upstream").body(vec![]).unwrap(),
        ok,
    )
    .await
    .upstream_request
    .unwrap();
    assert_eq!(
        header(&up, "x-abi-callout-error"),
        Some("Some(BadArgument)")
    );
}

#[tokio::test]
async fn metrics_are_defined_counted_and_rendered() {
    let h = host();
    let chain = abi_chain(&h, "metrics", "{}");
    for _ in 0..3 {
        exchange(&chain, request("metrics").body(vec![]).unwrap(), ok).await;
    }
    let up = exchange(&chain, request("metrics").body(vec![]).unwrap(), ok)
        .await
        .upstream_request
        .unwrap();
    assert_eq!(header(&up, "x-abi-counter-positive"), Some("yes"));
    assert_eq!(h.metrics().filter_metric("abi_test.requests"), Some(4));
    assert_eq!(
        h.metrics().filter_metric("abi_test.inflight"),
        Some(0),
        "gauge back to 0 after on_log"
    );
    let mut text = String::new();
    h.render_prometheus(&mut text);
    assert!(text.contains("wasmcustom_abi_test_requests 4"), "{text}");
    assert!(
        text.contains("wasmcustom_abi_test_path_length_count 4"),
        "{text}"
    );
    assert!(
        text.contains("wasmesh_wasm_events_total{plugin=\"abi-test\",event=\"loaded\"} 1"),
        "{text}"
    );
    // Guest callbacks: every request costs the same number of calls into the filter.
    let calls = || h.metrics().calls("abi-test");
    let before = calls();
    exchange(&chain, request("metrics").body(vec![]).unwrap(), ok).await;
    let per_request = calls() - before;
    assert!(
        per_request >= 3,
        "context, request and response headers at least: {per_request}"
    );
    for _ in 0..3 {
        exchange(&chain, request("metrics").body(vec![]).unwrap(), ok).await;
    }
    assert_eq!(calls() - before, 4 * per_request);
    let mut text = String::new();
    h.render_prometheus(&mut text);
    assert!(
        text.contains(&format!(
            "wasmesh_wasm_calls_total{{plugin=\"abi-test\"}} {}\n",
            calls()
        )),
        "{text}"
    );
}

#[tokio::test]
async fn shared_data_cas_counter_across_instances() {
    let h = host();
    let chain = abi_chain(&h, "shared", "{}");
    let mut seen = Vec::new();
    for _ in 0..4 {
        let up = exchange(&chain, request("shared").body(vec![]).unwrap(), ok)
            .await
            .upstream_request
            .unwrap();
        seen.push(header(&up, "x-abi-shared").unwrap().to_string());
    }
    assert_eq!(
        seen,
        ["1", "2", "3", "4"],
        "one increment per request, whichever instance"
    );
}

#[tokio::test]
async fn queues_wake_the_owner_and_timers_tick() {
    let h = host();
    let chain = abi_chain(&h, "queue", r#"{"tick_ms": 5}"#);
    let up = exchange(
        &chain,
        request("queue")
            .header("x-abi-item", "hello")
            .body(vec![])
            .unwrap(),
        ok,
    )
    .await;
    assert_eq!(
        header(up.upstream_request.as_ref().unwrap(), "x-abi-enqueued"),
        Some("yes")
    );
    let mut last = String::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let up = exchange(
            &chain,
            request("queue")
                .header("x-abi-item", "hello")
                .body(vec![])
                .unwrap(),
            ok,
        )
        .await;
        last = header(up.upstream_request.as_ref().unwrap(), "x-abi-queue-last")
            .unwrap_or_default()
            .to_string();
        if last == "hello" {
            break;
        }
    }
    assert_eq!(last, "hello", "on_queue_ready dequeued the item");
    // The 5-ms tick: counted by the filter, read back through a request. The queue may have
    // been drained within the first 10 ms, before the first tick on a busy machine: wait for
    // it, as for the queue, at most a second.
    let mut ticks = 0;
    for _ in 0..100 {
        let up = exchange(&chain, request("ticks").body(vec![]).unwrap(), ok)
            .await
            .upstream_request
            .unwrap();
        ticks = header(&up, "x-abi-ticks")
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
        if ticks > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ticks > 0, "on_tick ran ({ticks})");
}

#[tokio::test]
async fn time_env_foreign_and_reset() {
    let h = host();
    let chain = abi_chain(&h, "misc", "{}");
    let up = exchange(&chain, request("time").body(vec![]).unwrap(), ok)
        .await
        .upstream_request
        .unwrap();
    assert_eq!(header(&up, "x-abi-time-ok"), Some("yes"));
    let up = exchange(&chain, request("env").body(vec![]).unwrap(), ok)
        .await
        .upstream_request
        .unwrap();
    assert_eq!(header(&up, "x-abi-env"), Some("from-plugin-env"));
    let up = exchange(&chain, request("foreign").body(vec![]).unwrap(), ok)
        .await
        .upstream_request
        .unwrap();
    assert_eq!(header(&up, "x-abi-foreign"), Some("ok"));
    let x = exchange(&chain, request("close").body(vec![]).unwrap(), ok).await;
    assert!(x.reset, "proxy_close_stream resets the stream");
}

#[tokio::test]
async fn request_trailers_can_be_added_to() {
    let h = host();
    let chain = abi_chain(&h, "trailers", "{}");
    let mut s = chain.new_stream(Default::default());
    let (mut parts, ()) = request("trailers")
        .method("POST")
        .body(())
        .unwrap()
        .into_parts();
    assert_eq!(
        s.on_request_headers(&mut parts, false).await,
        Verdict::Continue
    );
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-original", "1".parse().unwrap());
    s.on_request_trailers(&mut trailers).await;
    assert_eq!(trailers["x-abi-request-trailer"], "1");
    assert_eq!(trailers["x-original"], "1");
}

#[tokio::test]
async fn wasm32_unknown_unknown_modules_load_and_run() {
    // Exports `malloc` instead of `proxy_on_memory_allocate`, imports no WASI.
    let bytes = support::wasm_for("abi_test", "wasm32-unknown-unknown");
    let h = host();
    let chain = FilterChain::new(vec![
        h.load(PluginConfig::new("abi-unknown", bytes))
            .expect("loads"),
    ]);
    let x = exchange(&chain, request("headers").body(vec![]).unwrap(), ok).await;
    let up = x.upstream_request.expect("forwarded");
    assert_eq!(
        header(&up, "x-abi-seen"),
        Some("GET /test/path?q=1 svc.test http")
    );
    let x = exchange(&chain, request("local-reply").body(vec![]).unwrap(), ok).await;
    assert_eq!(x.status, 403);
}

#[tokio::test]
async fn calls_without_sdk_wrappers_and_grpc_stubs() {
    let h = host();
    let chain = abi_chain(&h, "raw", "{}");
    let up = exchange(&chain, request("raw").body(vec![]).unwrap(), ok)
        .await
        .upstream_request
        .unwrap();
    assert_eq!(header(&up, "x-abi-raw-log-level-status"), Some("0"));
    assert_eq!(header(&up, "x-abi-raw-map-size"), Some("0/true"));
    assert_eq!(header(&up, "x-abi-raw-buffer-status"), Some("0"));
    let up = exchange(&chain, request("grpc").body(vec![]).unwrap(), ok)
        .await
        .upstream_request
        .unwrap();
    assert_eq!(
        header(&up, "x-abi-grpc"),
        Some("Some(InternalFailure)"),
        "gRPC callouts: a tolerated status"
    );
}

#[tokio::test]
async fn a_body_arriving_while_headers_are_paused_is_held_then_forwarded() {
    let h = host_with(|c| c.callouts = Some(Arc::new(FakeCallouts)));
    let chain = abi_chain(&h, "held", "{}");
    let req = request("callout")
        .method("POST")
        .body(b"body held while paused".to_vec())
        .unwrap();
    let x = exchange(&chain, req, ok).await;
    assert_eq!(x.upstream_body, b"body held while paused");
    assert_eq!(
        header(x.upstream_request.as_ref().unwrap(), "x-abi-callout-status"),
        Some("200")
    );
}
