//! Bad modules and misbehaving filters: each is refused at load with a clear error, or
//! contained at run time (the request gets the fail strategy's answer, the fault is counted,
//! the instance is replaced) — and the host keeps serving.

mod support;

use std::time::Duration;

use support::{exchange, header, host, host_with, ok, request, wasm};
use wasmesh_wasm::{FailStrategy, FilterChain, HostEvent, LoadError, PluginConfig, WasmHost};

fn load(
    h: &WasmHost,
    name: &str,
    cfg: impl FnOnce(PluginConfig) -> PluginConfig,
) -> Result<wasmesh_wasm::Plugin, LoadError> {
    h.load(cfg(PluginConfig::new(name, wasm("abi_test"))))
}

#[test]
fn invalid_bytes_fail_validation() {
    let h = host();
    let err = h
        .load(PluginConfig::new(
            "junk",
            b"\0asm\x01\0\0\0\x99garbage".to_vec(),
        ))
        .unwrap_err();
    assert!(matches!(err, LoadError::Invalid { .. }), "{err}");
    let err = h
        .load(PluginConfig::new("text", b"hello, not wasm".to_vec()))
        .unwrap_err();
    assert!(
        err.to_string().contains("not a valid WebAssembly module"),
        "{err}"
    );
    assert_eq!(h.metrics().event_count("junk", HostEvent::LoadFailed), 1);
}

#[test]
fn a_module_without_the_abi_export_is_refused() {
    let h = host();
    // The smallest valid module: no exports at all.
    let err = h
        .load(PluginConfig::new("empty", b"\0asm\x01\0\0\0".to_vec()))
        .unwrap_err();
    assert!(matches!(err, LoadError::NoAbiVersion { .. }), "{err}");
    assert!(err.to_string().contains("proxy_abi_version_0_2_1"), "{err}");
}

#[test]
fn a_trap_in_initialize_is_a_load_error() {
    let h = host();
    let err = load(&h, "trap-init", |mut c| {
        c.env = vec![("ABI_TEST_TRAP_INIT".into(), "1".into())];
        c
    })
    .unwrap_err();
    match &err {
        LoadError::Start { callback, .. } => assert_eq!(*callback, "_initialize"),
        other => panic!("{other}"),
    }
}

#[test]
fn rejected_configurations_are_load_errors() {
    let h = host();
    let err = load(&h, "reject", |c| c.with_config(r#"{"reject": true}"#)).unwrap_err();
    assert!(matches!(err, LoadError::ConfigRejected { .. }), "{err}");
    let err = load(&h, "bad-json", |c| c.with_config("{not json")).unwrap_err();
    assert!(matches!(err, LoadError::ConfigRejected { .. }), "{err}");
    let err = load(&h, "bad-vm", |mut c| {
        c.vm_config = "reject".into();
        c
    })
    .unwrap_err();
    assert!(matches!(err, LoadError::VmStartRejected { .. }), "{err}");
}

#[test]
fn sha256_is_checked_and_the_precompiled_cache_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = wasm("abi_test");
    let h = host_with(|c| c.cache_dir = Some(dir.path().to_path_buf()));
    let mut cfg = PluginConfig::new("sha", bytes.clone());
    cfg.module = wasmesh_wasm::ModuleSource::Bytes {
        wasm: bytes.clone().into(),
        sha256: Some("00".repeat(32)),
    };
    assert!(matches!(
        h.load(cfg).unwrap_err(),
        LoadError::Sha256Mismatch { .. }
    ));
    let sha = h.precompile(&bytes).unwrap();
    assert_eq!(sha, wasmesh_wasm::sha256_hex(&bytes));
    let cached: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(cached.len(), 1, "one precompiled file");

    // A new host (a restarted proxy) loads by sha256 from the disk cache alone.
    let h2 = host_with(|c| c.cache_dir = Some(dir.path().to_path_buf()));
    let mut cfg = PluginConfig::new("by-sha", Vec::new());
    cfg.module = wasmesh_wasm::ModuleSource::Sha256(sha.clone());
    let p = h2.load(cfg).expect("loads from the cache");
    assert_eq!(p.sha256(), sha);
    let mut cfg = PluginConfig::new("unknown", Vec::new());
    cfg.module = wasmesh_wasm::ModuleSource::Sha256("ab".repeat(32));
    assert!(matches!(
        host().load(cfg).unwrap_err(),
        LoadError::NotCached { .. }
    ));
}

async fn contained(op: &str, event: HostEvent, message: &str) {
    let h = host();
    let chain = FilterChain::new(vec![load(&h, op, |c| c).unwrap()]);
    let x = exchange(&chain, request(op).body(vec![]).unwrap(), ok).await;
    assert_eq!(x.status, 503, "FAIL_CLOSE answers 503");
    assert!(x.upstream_request.is_none());
    assert!(x.body.is_empty());
    assert_eq!(
        h.metrics().event_count(op, event),
        1,
        "{op} counted as {event:?}"
    );
    assert_eq!(h.metrics().event_count(op, HostEvent::InstanceReplaced), 1);
    assert_eq!(h.metrics().event_count(op, HostEvent::FailClosed), 1);
    let mut text = String::new();
    h.render_prometheus(&mut text);
    assert!(text.contains(message), "{text}");
    // The host keeps serving: later requests go through a fresh instance.
    tokio::time::sleep(Duration::from_millis(20)).await;
    for _ in 0..4 {
        let x = exchange(&chain, request("headers").body(vec![]).unwrap(), ok).await;
        assert_eq!(x.status, 200);
        assert_eq!(
            header(x.upstream_request.as_ref().unwrap(), "x-abi-replace"),
            Some("replaced")
        );
    }
}

#[tokio::test]
async fn a_panic_is_contained() {
    contained("panic", HostEvent::Trap, "event=\"trap\"").await;
}

#[tokio::test]
async fn an_infinite_loop_hits_the_deadline() {
    contained("loop", HostEvent::Deadline, "event=\"deadline\"").await;
}

#[tokio::test]
async fn memory_growth_stops_at_the_cap() {
    contained("grow", HostEvent::MemoryLimit, "event=\"memory_limit\"").await;
}

#[tokio::test]
async fn out_of_bounds_pointers_trap_without_touching_other_memory() {
    contained("oob", HostEvent::Trap, "event=\"trap\"").await;
}

#[tokio::test]
async fn fail_open_skips_the_filter() {
    let h = host();
    let p = load(&h, "open", |c| c.with_fail_strategy(FailStrategy::FailOpen)).unwrap();
    let chain = FilterChain::new(vec![p]);
    let x = exchange(&chain, request("panic").body(vec![]).unwrap(), ok).await;
    assert_eq!(x.status, 200, "the request went on without the filter");
    let up = x.upstream_request.unwrap();
    assert_eq!(header(&up, "x-abi-op"), Some("panic"), "headers intact");
    assert_eq!(header(&up, "host"), Some("svc.test"));
    assert_eq!(h.metrics().event_count("open", HostEvent::FailOpen), 1);
    assert_eq!(h.metrics().event_count("open", HostEvent::Trap), 1);
}
