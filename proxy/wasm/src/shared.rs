//! Shared data (a key-value store with compare-and-swap) and shared queues, both scoped by
//! `vm_id` and shared by every instance of every plugin in the host — the state filters use
//! across instances (Envoy: across worker threads).
//!
//! CAS tokens come from one counter and are never 0, so `cas = 0` means "unconditional" and a
//! value that changed since it was read is refused. A queue belongs to the instance that
//! registered it last: enqueueing wakes that instance's root context (`on_queue_ready`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;

/// Why a shared-data or queue call was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum SharedError {
    #[error("the value changed since it was read (CAS mismatch)")]
    CasMismatch,
    #[error("no such queue")]
    NoQueue,
    #[error("queue is empty")]
    Empty,
}

/// Called with the queue id when something is enqueued.
pub(crate) type QueueWaker = Arc<dyn Fn(u32) + Send + Sync>;

struct Queue {
    items: VecDeque<Vec<u8>>,
    waker: Option<QueueWaker>,
}

#[derive(Default)]
struct Data {
    values: HashMap<(String, Vec<u8>), (Vec<u8>, u32)>,
    next_cas: u32,
}

/// Shared data and queues of one host.
#[derive(Default)]
pub(crate) struct Shared {
    data: Mutex<Data>,
    queue_ids: Mutex<HashMap<(String, Vec<u8>), u32>>,
    queues: Mutex<HashMap<u32, Queue>>,
}

impl Shared {
    pub(crate) fn get(&self, vm_id: &str, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        data.values.get(&(vm_id.to_string(), key.to_vec())).cloned()
    }

    pub(crate) fn set(
        &self,
        vm_id: &str,
        key: &[u8],
        value: &[u8],
        cas: u32,
    ) -> Result<(), SharedError> {
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let k = (vm_id.to_string(), key.to_vec());
        if cas != 0 && data.values.get(&k).is_some_and(|(_, c)| *c != cas) {
            return Err(SharedError::CasMismatch);
        }
        data.next_cas = data.next_cas.wrapping_add(1).max(1);
        let token = data.next_cas;
        data.values.insert(k, (value.to_vec(), token));
        Ok(())
    }

    /// Registers (or re-registers) a queue; the waker replaces the previous owner's.
    pub(crate) fn register_queue(
        &self,
        vm_id: &str,
        name: &[u8],
        waker: Option<QueueWaker>,
    ) -> u32 {
        let mut ids = self.queue_ids.lock().unwrap_or_else(|e| e.into_inner());
        let next = ids.len() as u32 + 1;
        let id = *ids
            .entry((vm_id.to_string(), name.to_vec()))
            .or_insert(next);
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let q = queues.entry(id).or_insert_with(|| Queue {
            items: VecDeque::new(),
            waker: None,
        });
        q.waker = waker;
        id
    }

    pub(crate) fn resolve_queue(&self, vm_id: &str, name: &[u8]) -> Option<u32> {
        let ids = self.queue_ids.lock().unwrap_or_else(|e| e.into_inner());
        ids.get(&(vm_id.to_string(), name.to_vec())).copied()
    }

    pub(crate) fn enqueue(&self, id: u32, value: &[u8]) -> Result<(), SharedError> {
        let waker = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            let q = queues.get_mut(&id).ok_or(SharedError::NoQueue)?;
            q.items.push_back(value.to_vec());
            q.waker.clone()
        };
        if let Some(w) = waker {
            w(id);
        }
        Ok(())
    }

    pub(crate) fn dequeue(&self, id: u32) -> Result<Vec<u8>, SharedError> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let q = queues.get_mut(&id).ok_or(SharedError::NoQueue)?;
        q.items.pop_front().ok_or(SharedError::Empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn cas_refuses_a_stale_write() {
        let s = Shared::default();
        s.set("vm", b"k", b"1", 0).unwrap();
        let (v, cas) = s.get("vm", b"k").unwrap();
        assert_eq!(v, b"1");
        assert_ne!(cas, 0);
        s.set("vm", b"k", b"2", cas).unwrap();
        assert_eq!(s.set("vm", b"k", b"3", cas), Err(SharedError::CasMismatch));
        assert_eq!(s.get("vm", b"k").unwrap().0, b"2");
        assert_eq!(s.get("other-vm", b"k"), None, "data is scoped by vm_id");
    }

    #[test]
    fn queues_wake_their_owner() {
        let s = Shared::default();
        let woken = Arc::new(AtomicU32::new(0));
        let w = woken.clone();
        let id = s.register_queue(
            "vm",
            b"q",
            Some(Arc::new(move |id| w.store(id, Ordering::SeqCst))),
        );
        assert_eq!(s.resolve_queue("vm", b"q"), Some(id));
        assert_eq!(s.resolve_queue("vm", b"nope"), None);
        assert_eq!(s.dequeue(id), Err(SharedError::Empty));
        s.enqueue(id, b"x").unwrap();
        assert_eq!(woken.load(Ordering::SeqCst), id);
        assert_eq!(s.dequeue(id).unwrap(), b"x");
        assert_eq!(s.enqueue(999, b"x"), Err(SharedError::NoQueue));
    }
}
