//! Stream endings (`on_done`, `on_log`, `on_delete`) on a proxy worker: with the runtime's
//! `on_thread_park` hook set to `worker_idle`, a request's filter contexts end when the worker
//! goes idle — not in front of the response — and a worker that never idles still ends them,
//! 64 at a time. Without the hook they end on the spot. Counted with the plugin's
//! callback counter (`wasmesh_wasm_calls_total`): two callbacks per request up to its
//! headers (context create, request headers), three more at its end.

mod support;

use std::time::Duration;

use support::{host, wasm};
use wasmesh_wasm::{FilterChain, PluginConfig, StreamInfo, Verdict, WasmHost};

const MAX_QUEUED: u64 = 64;

fn chain(h: &WasmHost) -> FilterChain {
    let p = h
        .load(
            PluginConfig::new("hr", wasm("header_route"))
                .with_config(r#"{"request": {"set": {"x-a": "1"}}}"#),
        )
        .expect("loads");
    FilterChain::new(vec![p])
}

/// One request's headers through the chain, then the stream dropped (the request ended).
async fn one(chain: &FilterChain) {
    let mut s = chain.new_stream(StreamInfo::default());
    let (mut parts, ()) = http::Request::get("/")
        .body(())
        .expect("request")
        .into_parts();
    assert!(matches!(
        s.on_request_headers(&mut parts, true).await,
        Verdict::Continue
    ));
}

#[test]
fn endings_wait_for_the_worker_to_idle_and_a_busy_worker_still_runs_them() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_park(wasmesh_wasm::worker_idle)
        .build()
        .expect("runtime");
    let h = host();
    let chain = chain(&h);
    let calls = {
        let h = h.clone();
        move || h.metrics().calls("hr")
    };
    rt.block_on(async move {
        tokio::spawn(async move {
            // The worker's instance exists (its start-up callbacks are counted) and the worker
            // has parked at least once (it does when it waits for this timer).
            one(&chain).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let start = calls();
            for _ in 0..10 {
                one(&chain).await;
            }
            assert_eq!(
                calls() - start,
                10 * 2,
                "no ending ran while the worker was busy"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(
                calls() - start,
                10 * 5,
                "the worker idled: every ending ran"
            );

            let start = calls();
            for _ in 0..MAX_QUEUED {
                one(&chain).await;
            }
            assert_eq!(
                calls() - start,
                MAX_QUEUED * 5,
                "a worker that does not idle ends them once {MAX_QUEUED} wait"
            );
        })
        .await
        .expect("task");
    });
}

#[tokio::test]
async fn without_the_hook_a_stream_ends_when_it_is_dropped() {
    let h = host();
    let chain = chain(&h);
    one(&chain).await;
    let start = h.metrics().calls("hr");
    one(&chain).await;
    assert_eq!(h.metrics().calls("hr") - start, 5);
}
