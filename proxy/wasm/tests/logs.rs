//! Filter log lines reach the proxy's log through `tracing`, with the plugin's name, at the
//! level the filter chose (stdout as info). Alone in its test binary: `tracing`'s per-callsite
//! interest cache is process-wide, and other tests running without a subscriber would race it.

mod support;

use std::sync::Arc;

use support::{exchange, host, ok, request, wasm};
use wasmesh_wasm::{FilterChain, PluginConfig};

#[tokio::test]
async fn logs_carry_the_plugin_name() {
    use std::io::Write;
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let w = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || w.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(sub);
    let h = host();
    let chain = FilterChain::new(vec![
        h.load(PluginConfig::new("abi-test", wasm("abi_test")))
            .unwrap(),
    ]);
    exchange(&chain, request("log").body(vec![]).unwrap(), ok).await;
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    for line in [
        "abi-test info",
        "abi-test warn",
        "abi-test error",
        "abi-test stdout",
    ] {
        let l = text
            .lines()
            .find(|l| l.contains(line))
            .unwrap_or_else(|| panic!("no {line:?} in {text}"));
        assert!(l.contains("plugin=abi-test"), "{l}");
    }
    assert!(
        text.lines()
            .any(|l| l.contains("WARN") && l.contains("abi-test warn")),
        "{text}"
    );
}
