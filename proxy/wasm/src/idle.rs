//! Work that can wait until a worker thread has nothing else to do: the end of a stream's
//! filter contexts (`on_done`, `on_log`, `on_delete`, then forgetting the context).
//!
//! A request's filter streams end when the proxy drops the response body, which hyper does
//! on the body's last frame, *before* it writes those bytes to the socket: running three guest
//! callbacks there would put them in front of the response, on the latency the client sees.
//! Envoy runs a stream's access log and deferred deletion after the response, too. So on a
//! thread whose runtime calls [`worker_idle`] from its `on_thread_park` hook (wasmesh-proxy's
//! workers do), endings are queued per thread and run when the thread is about to park: after
//! the response went out, on the same thread (caches warm), with no task, wake-up or syscall.
//! The queue is bounded: a thread that stays busy runs them as soon as [`MAX_QUEUED`] wait.
//! On any other thread (no hook: a runtime built without it, a test, no runtime) an ending runs
//! on the spot.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use crate::plugin::PluginInner;

/// Endings a busy thread holds at most before it runs them.
pub(crate) const MAX_QUEUED: usize = 64;

/// A stream context to end: on drop, runs its end callbacks (if its instance is still the
/// one it was created in).
pub(crate) struct Ending {
    pub(crate) plugin: Arc<PluginInner>,
    pub(crate) slot: usize,
    pub(crate) generation: u64,
    pub(crate) ctx: u32,
}

impl Drop for Ending {
    fn drop(&mut self) {
        let ctx = self.ctx;
        let _ = self
            .plugin
            .run(self.slot, Some(self.generation), |inst, _| {
                inst.finish_stream(ctx)
            });
    }
}

thread_local! {
    /// This thread calls [`worker_idle`] when it parks (it did at least once).
    static PARKS: Cell<bool> = const { Cell::new(false) };
    static QUEUE: RefCell<Vec<Ending>> = const { RefCell::new(Vec::new()) };
}

/// Runs what this thread deferred, and from then on lets it defer. For a tokio runtime's
/// `on_thread_park` hook:
///
/// ```no_run
/// let rt = tokio::runtime::Builder::new_multi_thread()
///     .enable_all()
///     .on_thread_park(wasmesh_wasm::worker_idle)
///     .build()
///     .unwrap();
/// ```
pub fn worker_idle() {
    PARKS.with(|p| p.set(true));
    run_queued();
}

fn run_queued() {
    // Taken out first: ending one may end (and so queue) more.
    let queued = QUEUE.with(|q| std::mem::take(&mut *q.borrow_mut()));
    drop(queued);
}

/// Ends `ending` when this thread goes idle, or now (see the module's doc).
pub(crate) fn defer(ending: Ending) {
    if !PARKS.with(Cell::get) {
        drop(ending);
        return;
    }
    let full = QUEUE.with(|q| {
        let mut q = q.borrow_mut();
        q.push(ending);
        q.len() >= MAX_QUEUED
    });
    if full {
        run_queued();
    }
}
