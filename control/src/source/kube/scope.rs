//! Turning one watcher's events into source [`Event`]s (pure, no I/O).
//!
//! A [`Scope`] is one watcher: a kind in all namespaces, or a kind in one namespace. It buffers
//! the objects of a (re)list from `Init` to `InitDone` and then sends them as one
//! [`Event::Replace`], so a list that fails halfway never shows a partial set. [`SyncTracker`]
//! sends [`Event::Synced`] for a kind once every scope of that kind has been listed once.

use std::collections::BTreeMap;

use kube::runtime::watcher;

use crate::source::{Event, Kind, Object};

/// One watcher's view: which kind, which namespace, and the list in progress.
#[derive(Debug)]
pub(super) struct Scope {
    pub kind: Kind,
    /// `None`: all namespaces (or a cluster-scoped kind).
    pub namespace: Option<String>,
    /// Objects of the list in progress (between `Init` and `InitDone`).
    listing: Vec<Object>,
    listed_once: bool,
    /// The kind could not be listed and that was reported as an empty list.
    unavailable: bool,
}

/// What one watcher event produced.
#[derive(Debug, PartialEq)]
pub(super) struct Output {
    pub event: Event,
    /// This is the scope's first complete list.
    pub first_list: bool,
}

impl Scope {
    pub fn new(kind: Kind, namespace: Option<String>) -> Self {
        Scope {
            kind,
            namespace,
            listing: Vec::new(),
            listed_once: false,
            unavailable: false,
        }
    }

    /// Whether a list of this scope ever completed (or was reported empty).
    pub fn listed_once(&self) -> bool {
        self.listed_once
    }

    /// The kind cannot be listed for now (an optional kind whose CRD is not installed): an
    /// empty [`Event::Replace`] the first time after a list (or before any), nothing after
    /// that until a list succeeds again.
    pub fn on_unavailable(&mut self) -> Option<Output> {
        if self.unavailable {
            return None;
        }
        self.unavailable = true;
        self.listing.clear();
        let first_list = !self.listed_once;
        self.listed_once = true;
        Some(Output {
            event: Event::Replace {
                kind: self.kind,
                namespace: self.namespace.clone(),
                objects: Vec::new(),
            },
            first_list,
        })
    }

    /// Feeds one watcher event; objects are trimmed on arrival, so buffers stay small.
    pub fn on_event(&mut self, event: watcher::Event<Object>) -> Option<Output> {
        let output = |event| Output {
            event,
            first_list: false,
        };
        match event {
            watcher::Event::Init => {
                // A new list starts; whatever a failed earlier attempt buffered is stale.
                self.listing.clear();
                None
            }
            watcher::Event::InitApply(obj) => {
                self.listing.push(trimmed(obj));
                None
            }
            watcher::Event::InitDone => {
                let first_list = !self.listed_once;
                self.listed_once = true;
                self.unavailable = false;
                Some(Output {
                    event: Event::Replace {
                        kind: self.kind,
                        namespace: self.namespace.clone(),
                        objects: std::mem::take(&mut self.listing),
                    },
                    first_list,
                })
            }
            watcher::Event::Apply(obj) => Some(output(Event::Apply(trimmed(obj)))),
            watcher::Event::Delete(obj) => Some(output(Event::Delete(trimmed(obj)))),
        }
    }

    /// `Service` or `Service in namespace "apps"`, for logs.
    pub fn describe(&self) -> String {
        match &self.namespace {
            None => self.kind.to_string(),
            Some(ns) => format!("{} in namespace {ns:?}", self.kind),
        }
    }
}

fn trimmed(mut obj: Object) -> Object {
    obj.trim();
    obj
}

/// Counts, per kind, the scopes not listed yet; says when a kind becomes synced.
#[derive(Debug)]
pub(super) struct SyncTracker {
    pending: BTreeMap<Kind, usize>,
}

impl SyncTracker {
    pub fn new<'a>(scopes: impl IntoIterator<Item = &'a Scope>) -> Self {
        let mut pending = BTreeMap::new();
        for scope in scopes {
            *pending.entry(scope.kind).or_insert(0) += 1;
        }
        SyncTracker { pending }
    }

    /// A scope of `kind` completed its first list: returns [`Event::Synced`] if it was the last
    /// one of its kind (once per kind, ever).
    pub fn first_list_done(&mut self, kind: Kind) -> Option<Event> {
        let left = self.pending.get_mut(&kind)?;
        *left = left.saturating_sub(1);
        if *left > 0 {
            return None;
        }
        self.pending.remove(&kind);
        Some(Event::Synced(kind))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};

    use super::*;

    fn svc(name: &str) -> Object {
        Object::Service(Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("apps".into()),
                managed_fields: Some(vec![ManagedFieldsEntry::default()]),
                ..ObjectMeta::default()
            },
            ..Service::default()
        })
    }

    fn trimmed_svc(name: &str) -> Object {
        trimmed(svc(name))
    }

    #[test]
    fn a_list_becomes_one_replace_of_trimmed_objects() {
        let mut scope = Scope::new(Kind::Service, Some("apps".into()));
        assert_eq!(scope.on_event(watcher::Event::Init), None);
        assert_eq!(scope.on_event(watcher::Event::InitApply(svc("a"))), None);
        assert_eq!(scope.on_event(watcher::Event::InitApply(svc("b"))), None);
        let out = scope.on_event(watcher::Event::InitDone);
        assert_eq!(
            out,
            Some(Output {
                event: Event::Replace {
                    kind: Kind::Service,
                    namespace: Some("apps".into()),
                    objects: vec![trimmed_svc("a"), trimmed_svc("b")],
                },
                first_list: true,
            })
        );
    }

    #[test]
    fn a_restarted_list_drops_the_partial_one_and_only_the_first_list_counts_as_first() {
        let mut scope = Scope::new(Kind::Service, None);
        scope.on_event(watcher::Event::Init);
        scope.on_event(watcher::Event::InitApply(svc("a")));
        // the list failed halfway and restarts
        scope.on_event(watcher::Event::Init);
        scope.on_event(watcher::Event::InitApply(svc("b")));
        let first = scope.on_event(watcher::Event::InitDone);
        assert_eq!(
            first.map(|o| (o.event, o.first_list)),
            Some((
                Event::Replace {
                    kind: Kind::Service,
                    namespace: None,
                    objects: vec![trimmed_svc("b")],
                },
                true
            ))
        );
        scope.on_event(watcher::Event::Init);
        let second = scope.on_event(watcher::Event::InitDone);
        assert_eq!(second.map(|o| o.first_list), Some(false));
    }

    #[test]
    fn changes_pass_through_trimmed() {
        let mut scope = Scope::new(Kind::Service, None);
        let applied = scope.on_event(watcher::Event::Apply(svc("a")));
        assert_eq!(
            applied.map(|o| o.event),
            Some(Event::Apply(trimmed_svc("a")))
        );
        let deleted = scope.on_event(watcher::Event::Delete(svc("a")));
        assert_eq!(
            deleted.map(|o| o.event),
            Some(Event::Delete(trimmed_svc("a")))
        );
    }

    #[test]
    fn an_unavailable_kind_is_reported_empty_once_per_outage() {
        let mut scope = Scope::new(Kind::HttpRoute, Some("apps".into()));
        let empty = Event::Replace {
            kind: Kind::HttpRoute,
            namespace: Some("apps".into()),
            objects: vec![],
        };
        assert_eq!(
            scope.on_unavailable(),
            Some(Output {
                event: empty.clone(),
                first_list: true
            })
        );
        assert_eq!(scope.on_unavailable(), None, "once, however often it fails");
        scope.on_event(watcher::Event::Init);
        let listed = scope.on_event(watcher::Event::InitDone);
        assert_eq!(listed.map(|o| o.first_list), Some(false));
        assert_eq!(
            scope.on_unavailable(),
            Some(Output {
                event: empty,
                first_list: false
            }),
            "gone again after a good list"
        );
    }

    #[test]
    fn synced_once_when_every_scope_of_the_kind_is_listed() {
        let scopes = [
            Scope::new(Kind::Pod, Some("a".into())),
            Scope::new(Kind::Pod, Some("b".into())),
            Scope::new(Kind::Node, None),
        ];
        let mut tracker = SyncTracker::new(&scopes);
        assert_eq!(tracker.first_list_done(Kind::Pod), None);
        assert_eq!(
            tracker.first_list_done(Kind::Node),
            Some(Event::Synced(Kind::Node))
        );
        assert_eq!(
            tracker.first_list_done(Kind::Pod),
            Some(Event::Synced(Kind::Pod))
        );
        assert_eq!(tracker.first_list_done(Kind::Pod), None);
        assert_eq!(tracker.first_list_done(Kind::Node), None);
    }
}
