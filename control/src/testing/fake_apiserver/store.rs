//! The fake API server's state: objects per kind, one global resourceVersion, the change log that
//! watches replay from, open watches, paged-list snapshots, injected failures and request counts.
//!
//! Everything here is synchronous and runs under one lock, so a change is recorded in the log and
//! pushed to every open watch atomically: a watch registered "from rv N" sees every change after N
//! exactly once, whether it was replayed from the log or pushed live.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde::ser::Serializer;
use serde_json::json;
use tokio::sync::mpsc;

use super::request::{Collection, Params, Selector, info};
use crate::source::{Kind, Object};

/// The first resourceVersion handed out (real ones are large numbers too; none is "0").
const FIRST_RESOURCE_VERSION: u64 = 1000;

/// An error answer: becomes a `Status` body with this HTTP code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub code: u16,
    pub message: String,
}

impl Failure {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    fn gone(message: impl Into<String>) -> Self {
        Failure::new(410, message)
    }

    /// The `Status` object the API server sends for this failure.
    pub fn status(&self) -> serde_json::Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": reason(self.code),
            "code": self.code,
        })
    }
}

/// The `reason` Kubernetes puts in a `Status` for an HTTP code.
fn reason(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

/// LIST or WATCH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verb {
    List,
    Watch,
}

/// How many requests of each verb one resource received (every page of a paged list counts,
/// and so do requests that were failed on purpose).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RequestCounts {
    pub lists: usize,
    pub watches: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One entry of the change log.
#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    change: ChangeType,
    object: Arc<Object>,
    /// The object before a modification (to tell watches with a selector that an object
    /// started or stopped matching).
    previous: Option<Arc<Object>>,
}

impl Change {
    /// The watch event type a watch with `selector` sees for this change, if any: like the real
    /// watch cache, an object that stops matching is DELETED and one that starts is ADDED.
    fn seen_as(&self, selector: &Selector) -> Option<&'static str> {
        let now = selector.matches(self.object.meta());
        match self.change {
            ChangeType::Added => now.then_some("ADDED"),
            ChangeType::Deleted => now.then_some("DELETED"),
            ChangeType::Modified => {
                let before = self
                    .previous
                    .as_ref()
                    .is_some_and(|p| selector.matches(p.meta()));
                match (before, now) {
                    (true, true) => Some("MODIFIED"),
                    (false, true) => Some("ADDED"),
                    (true, false) => Some("DELETED"),
                    (false, false) => None,
                }
            }
        }
    }
}

/// An open watch.
#[derive(Debug)]
struct Watch {
    collection: Collection,
    selector: Selector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Watch {
    fn sees(&self, change: &Change) -> Option<&'static str> {
        if change.kind != self.collection.kind || !in_scope(&self.collection, &change.object) {
            return None;
        }
        change.seen_as(&self.selector)
    }
}

fn in_scope(collection: &Collection, obj: &Object) -> bool {
    match &collection.namespace {
        None => true,
        Some(ns) => obj.meta().namespace.as_deref() == Some(ns.as_str()),
    }
}

/// The rest of a paged list, served from the snapshot taken by its first page.
#[derive(Debug)]
struct Pages {
    collection: Collection,
    rv: u64,
    rest: VecDeque<Arc<Object>>,
}

/// A failure waiting to be injected into the next matching request.
#[derive(Debug)]
struct Injected {
    kind: Option<Kind>,
    /// Matching requests to let through before failing one.
    skip: usize,
    code: u16,
}

/// What a WATCH answers with: lines to send at once, then (unless the answer is final, as for
/// "410 Gone") a live feed of further lines.
pub(crate) struct WatchStart {
    pub initial: Vec<Bytes>,
    pub live: Option<mpsc::UnboundedReceiver<Bytes>>,
}

/// All state of the fake API server.
#[derive(Debug)]
pub(crate) struct Store {
    rv: u64,
    /// Resource versions below this are too old to watch from ("410 Gone").
    compacted: u64,
    objects: BTreeMap<Kind, BTreeMap<(String, String), Arc<Object>>>,
    log: VecDeque<Change>,
    watches: Vec<Watch>,
    pages: HashMap<String, Pages>,
    next_token: u64,
    failures: VecDeque<Injected>,
    counts: BTreeMap<Kind, RequestCounts>,
    /// Kinds answered with 404 (a CRD not installed).
    unserved: BTreeSet<Kind>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            rv: FIRST_RESOURCE_VERSION,
            compacted: 0,
            objects: BTreeMap::new(),
            log: VecDeque::new(),
            watches: Vec::new(),
            pages: HashMap::new(),
            next_token: 0,
            failures: VecDeque::new(),
            counts: BTreeMap::new(),
            unserved: BTreeSet::new(),
        }
    }
}

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Creates or replaces an object; returns it as stored (namespace defaulted, new
    /// `resourceVersion`).
    pub fn apply(&mut self, mut obj: Object) -> Object {
        self.rv += 1;
        let kind = obj.kind();
        let meta = obj.meta_mut();
        if info(kind).namespaced {
            if meta.namespace.as_deref().unwrap_or_default().is_empty() {
                meta.namespace = Some("default".to_string());
            }
        } else {
            meta.namespace = None;
        }
        meta.resource_version = Some(self.rv.to_string());
        let key = object_key(&obj);
        let stored = Arc::new(obj);
        let previous = self
            .objects
            .entry(kind)
            .or_default()
            .insert(key, Arc::clone(&stored));
        let change = if previous.is_some() {
            ChangeType::Modified
        } else {
            ChangeType::Added
        };
        self.record(Change {
            rv: self.rv,
            kind,
            change,
            object: Arc::clone(&stored),
            previous,
        });
        Object::clone(&stored)
    }

    /// Deletes an object (`namespace` is ignored for cluster-scoped kinds); returns it as it
    /// was, or `None` if there was no such object.
    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Option<Object> {
        let namespace = if info(kind).namespaced { namespace } else { "" };
        let removed = self
            .objects
            .get_mut(&kind)?
            .remove(&(namespace.to_string(), name.to_string()))?;
        self.rv += 1;
        let mut gone = Object::clone(&removed);
        gone.meta_mut().resource_version = Some(self.rv.to_string());
        let gone = Arc::new(gone);
        self.record(Change {
            rv: self.rv,
            kind,
            change: ChangeType::Deleted,
            object: Arc::clone(&gone),
            previous: Some(removed),
        });
        Some(Object::clone(&gone))
    }

    /// Every object of a kind, sorted by namespace and name.
    pub fn objects(&self, kind: Kind) -> Vec<Object> {
        self.objects
            .get(&kind)
            .map(|m| m.values().map(|o| Object::clone(o)).collect())
            .unwrap_or_default()
    }

    fn record(&mut self, change: Change) {
        let mut lines: [Option<Bytes>; 3] = [None, None, None];
        self.watches.retain(|w| {
            let Some(event_type) = w.sees(&change) else {
                return !w.tx.is_closed();
            };
            let slot = match event_type {
                "ADDED" => 0,
                "MODIFIED" => 1,
                _ => 2,
            };
            let line = lines[slot].get_or_insert_with(|| event_line(event_type, &change.object));
            w.tx.send(line.clone()).is_ok()
        });
        self.log.push_back(change);
    }

    /// Makes every resourceVersion before the current one too old: watches from them get
    /// "410 Gone" and so do continue tokens of older lists. Open watches keep streaming.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        let compacted = self.compacted;
        self.log.retain(|c| c.rv > compacted);
        self.pages.retain(|_, p| p.rv >= compacted);
    }

    /// Ends every open watch (the client sees the response body end, as on a server timeout).
    pub fn close_watches(&mut self) {
        self.watches.clear();
    }

    /// Sends a BOOKMARK at the current resourceVersion to every open watch that allows them.
    pub fn bookmark(&mut self) {
        let rv = self.rv;
        self.watches.retain(|w| {
            !w.bookmarks
                || w.tx
                    .send(bookmark_line(w.collection.kind, rv, false))
                    .is_ok()
        });
    }

    pub fn open_watches(&self, kind: Kind) -> usize {
        self.watches
            .iter()
            .filter(|w| w.collection.kind == kind && !w.tx.is_closed())
            .count()
    }

    pub fn set_served(&mut self, kind: Kind, served: bool) {
        if served {
            self.unserved.remove(&kind);
        } else {
            self.unserved.insert(kind);
            self.watches.retain(|w| w.collection.kind != kind);
        }
    }

    pub fn serves(&self, kind: Kind) -> bool {
        !self.unserved.contains(&kind)
    }

    pub fn count(&mut self, kind: Kind, verb: Verb) {
        let counts = self.counts.entry(kind).or_default();
        match verb {
            Verb::List => counts.lists += 1,
            Verb::Watch => counts.watches += 1,
        }
    }

    pub fn counts(&self, kind: Kind) -> RequestCounts {
        self.counts.get(&kind).copied().unwrap_or_default()
    }

    /// Queues a failure for a future request (of `kind`, or of any kind), after letting `skip`
    /// matching requests through.
    pub fn inject_failure(&mut self, kind: Option<Kind>, skip: usize, code: u16) {
        self.failures.push_back(Injected { kind, skip, code });
    }

    /// The injected failure this request must get, if any. Only the first queued failure that
    /// matches the request's kind is considered.
    pub fn take_failure(&mut self, kind: Kind) -> Option<u16> {
        let index = self
            .failures
            .iter()
            .position(|f| f.kind.is_none_or(|k| k == kind))?;
        let failure = self.failures.get_mut(index)?;
        if failure.skip > 0 {
            failure.skip -= 1;
            return None;
        }
        self.failures.remove(index).map(|f| f.code)
    }

    /// Answers a LIST: the JSON body of a `<Kind>List`.
    pub fn list(&mut self, collection: &Collection, params: &Params) -> Result<Vec<u8>, Failure> {
        let (rv, mut items) = match &params.continue_token {
            Some(token) => self.continue_list(collection, token)?,
            None => {
                if params.resource_version_match.as_deref() == Some("Exact") {
                    let rv = parse_rv(params.resource_version.as_deref())?;
                    if rv < self.compacted {
                        return Err(too_old(rv));
                    }
                }
                let items = self.select(collection, &params.selector).collect();
                (self.rv, items)
            }
        };
        let page: Vec<Arc<Object>> = match params.limit {
            Some(limit) if items.len() > limit => items.drain(..limit).collect(),
            _ => items.drain(..).collect(),
        };
        let remaining = items.len();
        let continue_token = (remaining > 0).then(|| {
            self.next_token += 1;
            let token = format!("{rv}-{}", self.next_token);
            self.pages.insert(
                token.clone(),
                Pages {
                    collection: collection.clone(),
                    rv,
                    rest: items,
                },
            );
            token
        });
        let resource = info(collection.kind);
        let body = ListBody {
            kind: resource.list_kind,
            api_version: resource.api_version,
            metadata: ListMeta {
                resource_version: rv.to_string(),
                continue_token,
                remaining_item_count: (remaining > 0).then_some(remaining),
            },
            items: page.iter().map(|o| Json(o)).collect(),
        };
        serde_json::to_vec(&body).map_err(|e| Failure::new(500, format!("cannot encode list: {e}")))
    }

    fn continue_list(
        &mut self,
        collection: &Collection,
        token: &str,
    ) -> Result<(u64, VecDeque<Arc<Object>>), Failure> {
        let pages = self.pages.remove(token).ok_or_else(|| {
            Failure::gone(format!(
                "the provided continue parameter {token:?} is too old or unknown; list again"
            ))
        })?;
        if pages.collection != *collection {
            return Err(Failure::new(
                400,
                format!("continue token {token:?} belongs to another list"),
            ));
        }
        Ok((pages.rv, pages.rest))
    }

    fn select<'a>(
        &'a self,
        collection: &'a Collection,
        selector: &'a Selector,
    ) -> impl Iterator<Item = Arc<Object>> + 'a {
        self.objects
            .get(&collection.kind)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(move |o| in_scope(collection, o) && selector.matches(o.meta()))
            .cloned()
    }

    /// Starts a WATCH: from a resourceVersion (replaying the log after it), or from "now" with
    /// the current objects as ADDED (no resourceVersion, or "0"), or as a streaming list
    /// (`sendInitialEvents=true`: current objects, then a bookmark marking their end).
    pub fn watch(
        &mut self,
        collection: &Collection,
        params: &Params,
    ) -> Result<WatchStart, Failure> {
        let kind = collection.kind;
        let from = match params.resource_version.as_deref() {
            None | Some("0") => None,
            Some(rv) => Some(parse_rv(Some(rv))?),
        };
        if params.send_initial_events && !params.allow_bookmarks {
            return Err(Failure::new(
                400,
                "sendInitialEvents requires allowWatchBookmarks=true",
            ));
        }
        let mut initial = Vec::new();
        match from {
            Some(rv) if rv < self.compacted => {
                let status = too_old(rv).status();
                initial.push(line(&json!({"type": "ERROR", "object": status})));
                return Ok(WatchStart {
                    initial,
                    live: None,
                });
            }
            Some(rv) => {
                let replay = self
                    .log
                    .iter()
                    .filter(|ch| ch.rv > rv && ch.kind == kind && in_scope(collection, &ch.object))
                    .filter_map(|ch| {
                        let event_type = ch.seen_as(&params.selector)?;
                        Some(event_line(event_type, &ch.object))
                    });
                initial.extend(replay);
            }
            None => {
                for obj in self.select(collection, &params.selector) {
                    initial.push(event_line("ADDED", &obj));
                }
                if params.send_initial_events {
                    initial.push(bookmark_line(kind, self.rv, true));
                }
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.watches.push(Watch {
            collection: collection.clone(),
            selector: params.selector.clone(),
            bookmarks: params.allow_bookmarks,
            tx,
        });
        Ok(WatchStart {
            initial,
            live: Some(rx),
        })
    }
}

fn object_key(obj: &Object) -> (String, String) {
    let meta = obj.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn parse_rv(rv: Option<&str>) -> Result<u64, Failure> {
    let rv = rv.unwrap_or_default();
    rv.parse()
        .map_err(|_| Failure::new(400, format!("resourceVersion must be a number, got {rv:?}")))
}

fn too_old(rv: u64) -> Failure {
    Failure::gone(format!("too old resource version: {rv}"))
}

/// Serializes an [`Object`] as the Kubernetes JSON of the object inside.
struct Json<'a>(&'a Object);

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListBody<'a> {
    kind: &'static str,
    api_version: &'static str,
    metadata: ListMeta,
    items: Vec<Json<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    resource_version: String,
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    continue_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining_item_count: Option<usize>,
}

#[derive(Serialize)]
struct EventLine<'a> {
    #[serde(rename = "type")]
    event_type: &'static str,
    object: Json<'a>,
}

/// One newline-terminated line of a watch response.
fn line(value: &impl Serialize) -> Bytes {
    match serde_json::to_vec(value) {
        Ok(mut v) => {
            v.push(b'\n');
            Bytes::from(v)
        }
        // k8s-openapi types always serialize; should one not, the client sees a broken line
        // and restarts its watch, which a test would notice.
        Err(e) => Bytes::from(format!("{{\"unencodable\": \"{e}\"}}\n")),
    }
}

fn event_line(event_type: &'static str, obj: &Object) -> Bytes {
    line(&EventLine {
        event_type,
        object: Json(obj),
    })
}

fn bookmark_line(kind: Kind, rv: u64, initial_events_end: bool) -> Bytes {
    let resource = info(kind);
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_events_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    line(&json!({
        "type": "BOOKMARK",
        "object": {
            "kind": kind.as_str(),
            "apiVersion": resource.api_version,
            "metadata": metadata,
        }
    }))
}
