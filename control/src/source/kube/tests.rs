//! The Kubernetes source against the in-process fake API server, through the real kube client
//! and watcher. Every test asserts what a consumer of the source sees (events and the set of
//! objects they add up to), and every wait is bounded.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};

use super::KubeSource;
use crate::source::{Event, Kind, Object, ObjectKey, SourceError};
use crate::testing::fake_apiserver::FakeApiServer;

/// Upper bound of every wait. Generous for a loaded machine: one watch error costs the
/// watcher's backoff (0.8 s to 1.6 s) before it retries.
const BOUND: Duration = Duration::from_secs(10);

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

fn meta(namespace: Option<&str>, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: Some([("app".to_string(), name.to_string())].into()),
        ..ObjectMeta::default()
    }
}

fn service(ns: &str, name: &str) -> Object {
    Object::Service(Service {
        metadata: meta(Some(ns), name),
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

fn slice(ns: &str, name: &str) -> Object {
    let mut metadata = meta(Some(ns), name);
    let service_name = name.split('-').next().unwrap_or(name).to_string();
    metadata
        .labels
        .get_or_insert_default()
        .insert("kubernetes.io/service-name".into(), service_name);
    Object::EndpointSlice(EndpointSlice {
        metadata,
        address_type: "IPv4".into(),
        endpoints: vec![Endpoint {
            addresses: vec!["10.0.0.1".into()],
            ..Endpoint::default()
        }],
        ports: None,
    })
}

fn pod(ns: &str, name: &str) -> Object {
    Object::Pod(Pod {
        metadata: meta(Some(ns), name),
        ..Pod::default()
    })
}

fn node(name: &str) -> Object {
    Object::Node(Node {
        metadata: meta(None, name),
        ..Node::default()
    })
}

/// The same object with one more label (a change a watcher must deliver).
fn relabeled(mut obj: Object, value: &str) -> Object {
    obj.meta_mut()
        .labels
        .get_or_insert_default()
        .insert("rev".into(), value.into());
    obj
}

fn trimmed(mut obj: Object) -> Object {
    obj.trim();
    obj
}

fn name_of(obj: &Object) -> &str {
    obj.meta().name.as_deref().unwrap_or_default()
}

/// What a consumer of the source has seen.
#[derive(Debug, Default)]
struct Seen {
    events: Vec<Event>,
    objects: BTreeMap<ObjectKey, Object>,
}

impl Seen {
    fn absorb(&mut self, event: Event) {
        match &event {
            Event::Replace {
                kind,
                namespace,
                objects,
            } => {
                self.objects.retain(|key, _| {
                    key.kind != *kind || namespace.as_ref().is_some_and(|ns| *ns != key.namespace)
                });
                for obj in objects {
                    self.objects.insert(obj.key(), obj.clone());
                }
            }
            Event::Apply(obj) => {
                self.objects.insert(obj.key(), obj.clone());
            }
            Event::Delete(obj) => {
                self.objects.remove(&obj.key());
            }
            Event::Synced(_) => {}
        }
        self.events.push(event);
    }

    fn objects(&self, kind: Kind) -> Vec<Object> {
        self.objects
            .iter()
            .filter(|(key, _)| key.kind == kind)
            .map(|(_, obj)| obj.clone())
            .collect()
    }

    fn synced(&self, kind: Kind) -> usize {
        self.events
            .iter()
            .filter(|e| **e == Event::Synced(kind))
            .count()
    }

    fn all_synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.synced(*k) > 0)
    }

    /// Positions and contents of the `Replace` events of a kind.
    fn replaces(&self, kind: Kind) -> Vec<(usize, Option<String>, Vec<Object>)> {
        self.events
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                Event::Replace {
                    kind: k,
                    namespace,
                    objects,
                } if *k == kind => Some((i, namespace.clone(), objects.clone())),
                _ => None,
            })
            .collect()
    }

    fn position(&self, event: &Event) -> Option<usize> {
        self.events.iter().position(|e| e == event)
    }

    fn applied(&self, kind: Kind, name: &str) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, Event::Apply(o) if o.kind() == kind && name_of(o) == name))
    }

    fn deleted(&self, kind: Kind, name: &str) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, Event::Delete(o) if o.kind() == kind && name_of(o) == name))
    }

    /// Every object carried by any event.
    fn every_object(&self) -> impl Iterator<Item = &Object> {
        self.events.iter().flat_map(|e| match e {
            Event::Replace { objects, .. } => objects.iter().collect::<Vec<_>>(),
            Event::Apply(o) | Event::Delete(o) => vec![o],
            Event::Synced(_) => vec![],
        })
    }
}

/// A running source and its fake API server.
struct Harness {
    server: FakeApiServer,
    rx: mpsc::Receiver<Event>,
    task: JoinHandle<Result<(), SourceError>>,
    seen: Seen,
}

impl Harness {
    async fn start(
        server: FakeApiServer,
        configure: impl FnOnce(KubeSource) -> KubeSource,
    ) -> Self {
        Self::start_in(server, vec![], configure).await
    }

    async fn start_in(
        server: FakeApiServer,
        namespaces: Vec<&str>,
        configure: impl FnOnce(KubeSource) -> KubeSource,
    ) -> Self {
        let client = server.client().expect("client for the fake API server");
        let namespaces = namespaces.into_iter().map(String::from).collect();
        let source = configure(KubeSource::new(client, namespaces));
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(source.run(tx));
        Harness {
            server,
            rx,
            task,
            seen: Seen::default(),
        }
    }

    /// Receives events until `done` holds; panics (with what was seen) after [`BOUND`].
    async fn until(&mut self, what: &str, done: impl Fn(&Seen, &FakeApiServer) -> bool) {
        let deadline = Instant::now() + BOUND;
        while !done(&self.seen, &self.server) {
            match timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(event)) => self.seen.absorb(event),
                Ok(None) => panic!("the source stopped while waiting for {what}"),
                Err(_) => panic!(
                    "timed out waiting for {what}; events seen: {:#?}",
                    self.seen.events
                ),
            }
        }
    }

    async fn until_synced(&mut self) {
        self.until("every kind synced", |seen, _| seen.all_synced())
            .await;
    }

    /// Whether the consumer's objects of `kind` are exactly the server's (trimmed).
    fn converged(seen: &Seen, server: &FakeApiServer, kind: Kind) -> bool {
        let expected: Vec<Object> = server.objects(kind).into_iter().map(trimmed).collect();
        seen.objects(kind) == expected
    }

    async fn watching(&self, kind: Kind) {
        timeout(BOUND, self.server.watching(kind))
            .await
            .unwrap_or_else(|_| panic!("no watch of {kind} opened"));
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn server_with(objects: impl IntoIterator<Item = Object>) -> FakeApiServer {
    let server = FakeApiServer::start()
        .await
        .expect("fake API server starts");
    for obj in objects {
        server.apply(obj);
    }
    server
}

fn small_world() -> Vec<Object> {
    vec![
        service("apps", "web"),
        service("apps", "db"),
        service("shop", "cart"),
        slice("apps", "web-x1"),
        slice("apps", "db-x1"),
        slice("shop", "cart-x1"),
        pod("apps", "web-0"),
        pod("shop", "cart-0"),
        node("node-a"),
        node("node-b"),
    ]
}

#[tokio::test]
async fn the_first_list_of_each_kind_is_one_replace_then_synced() {
    let server = server_with(small_world()).await;
    let mut h = Harness::start(server, |s| s).await;
    h.until_synced().await;

    for kind in Kind::ALL {
        let replaces = h.seen.replaces(kind);
        assert_eq!(replaces.len(), 1, "{kind}: one Replace: {replaces:#?}");
        let (at, namespace, objects) = &replaces[0];
        assert_eq!(*namespace, None, "{kind}: all namespaces");
        let expected: Vec<Object> = h.server.objects(kind).into_iter().map(trimmed).collect();
        let mut got = objects.clone();
        got.sort_by_key(Object::key);
        assert_eq!(
            got, expected,
            "{kind}: the Replace carries the server's set"
        );
        let synced_at = h.seen.position(&Event::Synced(kind)).expect("synced");
        assert!(*at < synced_at, "{kind}: Replace comes before Synced");
        assert_eq!(h.seen.synced(kind), 1, "{kind}: synced once");
    }
}

#[tokio::test]
async fn nothing_is_synced_until_the_first_complete_list() {
    let server = server_with(small_world()).await;
    // The first two Service lists fail, as without RBAC for Services.
    server.fail_next_for(Kind::Service, 403);
    server.fail_next_for(Kind::Service, 403);
    let mut h = Harness::start(server, |s| s).await;

    h.until("the other kinds synced", |seen, _| {
        [Kind::EndpointSlice, Kind::Pod, Kind::Node]
            .iter()
            .all(|k| seen.synced(*k) == 1)
    })
    .await;
    assert!(
        h.seen.replaces(Kind::Service).is_empty() && h.seen.synced(Kind::Service) == 0,
        "nothing about Services while their list fails: {:#?}",
        h.seen.events
    );

    h.until("Services synced after retrying", |seen, _| {
        seen.synced(Kind::Service) == 1
    })
    .await;
    let replaces = h.seen.replaces(Kind::Service);
    assert_eq!(replaces.len(), 1);
    assert!(replaces[0].0 < h.seen.position(&Event::Synced(Kind::Service)).unwrap_or(0));
    assert!(Harness::converged(&h.seen, &h.server, Kind::Service));
    assert_eq!(
        h.server.requests(Kind::Service).lists,
        3,
        "two failed lists, one good"
    );
}

#[tokio::test]
async fn a_list_that_fails_halfway_is_never_sent_in_part() {
    let server = server_with((0..5).map(|i| service("apps", &format!("svc-{i}")))).await;
    // Page 1 of 5 is served, page 2 fails: the watcher starts the list over.
    server.fail_after(Kind::Service, 1, 500);
    let mut h = Harness::start(server, |s| s.with_page_size(1)).await;
    h.until_synced().await;

    let replaces = h.seen.replaces(Kind::Service);
    assert_eq!(replaces.len(), 1, "no partial Replace: {replaces:#?}");
    let names: Vec<&str> = replaces[0].2.iter().map(name_of).collect();
    assert_eq!(names, ["svc-0", "svc-1", "svc-2", "svc-3", "svc-4"]);
    assert_eq!(h.server.requests(Kind::Service).lists, 2 + 5);
}

#[tokio::test]
async fn paging_with_a_small_page_size_returns_everything() {
    let mut world: Vec<Object> = (0..7)
        .map(|i| service(["a", "b", "c"][i % 3], &format!("svc-{i}")))
        .collect();
    world.extend((0..3).map(|i| node(&format!("node-{i}"))));
    let server = server_with(world).await;
    let mut h = Harness::start(server, |s| s.with_page_size(2)).await;
    h.until_synced().await;

    for kind in [Kind::Service, Kind::Node] {
        assert!(Harness::converged(&h.seen, &h.server, kind), "{kind}");
        assert_eq!(h.seen.replaces(kind).len(), 1, "{kind}: one Replace");
    }
    assert_eq!(h.seen.objects(Kind::Service).len(), 7);
    assert_eq!(
        h.server.requests(Kind::Service).lists,
        4,
        "pages of 2, 2, 2, 1"
    );
    assert_eq!(h.server.requests(Kind::Node).lists, 2, "pages of 2, 1");
}

#[tokio::test]
async fn churn_converges_to_exactly_the_servers_set() {
    let server = server_with(small_world()).await;
    let mut h = Harness::start(server, |s| s).await;
    h.until_synced().await;

    // A deterministic pseudo-random sequence of applies and deletes.
    let mut state: u64 = 0x5eed;
    let mut next = move |n: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % n
    };
    for step in 0..400 {
        let ns = ["apps", "shop", "ops"][next(3) as usize];
        let name = format!("obj{}", next(12));
        let kind = [Kind::Service, Kind::EndpointSlice, Kind::Pod][next(3) as usize];
        if next(10) < 3 {
            h.server.delete(kind, ns, &name);
        } else {
            let obj = match kind {
                Kind::Service => service(ns, &name),
                Kind::EndpointSlice => slice(ns, &name),
                _ => pod(ns, &name),
            };
            h.server.apply(relabeled(obj, &step.to_string()));
        }
    }
    h.server.delete(Kind::Node, "", "node-a");
    h.server.apply(node("node-c"));

    h.until("the consumer converges to the server", |seen, server| {
        Kind::ALL
            .iter()
            .all(|k| Harness::converged(seen, server, *k))
    })
    .await;
    for kind in Kind::ALL {
        assert_eq!(h.seen.synced(kind), 1, "{kind}: synced exactly once");
        assert_eq!(
            h.server.requests(kind).lists,
            1,
            "{kind}: no re-list needed"
        );
    }
}

#[tokio::test]
async fn gone_relists_and_drops_what_was_deleted_while_disconnected() {
    let server = server_with(small_world()).await;
    let mut h = Harness::start(server, |s| s).await;
    h.until_synced().await;

    // The watch path breaks; meanwhile a Service is deleted, one changes, one is created, and
    // the API server's history is compacted past everything the watcher saw.
    h.server.hold_watches();
    h.server.delete(Kind::Service, "apps", "db");
    h.server.apply(relabeled(service("apps", "web"), "2"));
    h.server.apply(service("apps", "api"));
    h.server.compact();
    h.server.release_watches();

    h.until("Services re-listed and converged", |seen, server| {
        seen.replaces(Kind::Service).len() == 2 && Harness::converged(seen, server, Kind::Service)
    })
    .await;
    assert!(
        !h.seen.deleted(Kind::Service, "db"),
        "db left through the re-list, not a Delete event"
    );
    let names: Vec<String> = h
        .seen
        .objects(Kind::Service)
        .iter()
        .map(|o| name_of(o).to_string())
        .collect();
    assert_eq!(names, ["api", "web", "cart"], "no ghost of db");
    assert_eq!(h.server.requests(Kind::Service).lists, 2);
    assert_eq!(
        h.seen.synced(Kind::Service),
        1,
        "a re-list is not a second Synced"
    );
}

#[tokio::test]
async fn a_closed_watch_resumes_from_the_last_resource_version_without_a_relist() {
    let server = server_with(small_world()).await;
    let mut h = Harness::start(server, |s| s).await;
    h.until_synced().await;
    h.watching(Kind::Service).await;
    let before = h.server.requests(Kind::Service);

    h.server.close_watches();
    h.server.apply(service("apps", "late"));
    h.server.delete(Kind::Service, "shop", "cart");

    h.until("the change after the closed watch", |seen, _| {
        seen.applied(Kind::Service, "late") && seen.deleted(Kind::Service, "cart")
    })
    .await;
    let after = h.server.requests(Kind::Service);
    assert_eq!(after.lists, before.lists, "no re-list");
    assert_eq!(after.watches, before.watches + 1, "one new watch");
    assert_eq!(h.seen.replaces(Kind::Service).len(), 1);
    assert!(Harness::converged(&h.seen, &h.server, Kind::Service));
}

#[tokio::test]
async fn a_bookmark_moves_the_point_a_watch_resumes_from() {
    let server = server_with(small_world()).await;
    let mut h = Harness::start(server, |s| s).await;
    h.until_synced().await;
    h.watching(Kind::Service).await;

    // Pods change: the resourceVersion moves on, but no Service event tells the Service
    // watcher. Only the bookmark does; after compaction, resuming from its own older version
    // would be "410 Gone" and a re-list.
    for i in 0..3 {
        h.server.apply(pod("apps", &format!("extra-{i}")));
    }
    h.server.bookmark();
    h.server.compact();
    h.server.close_watches();
    h.server.apply(service("apps", "after-bookmark"));

    h.until("the Service applied after the bookmark", |seen, _| {
        seen.applied(Kind::Service, "after-bookmark")
    })
    .await;
    assert_eq!(
        h.server.requests(Kind::Service).lists,
        1,
        "resumed, not re-listed"
    );
    assert_eq!(h.seen.replaces(Kind::Service).len(), 1);
}

#[tokio::test]
async fn a_failed_watch_request_is_retried_without_a_relist() {
    let server = server_with(small_world()).await;
    // The list (request 1) succeeds, the first watch (request 2) fails.
    server.fail_after(Kind::Service, 1, 500);
    let mut h = Harness::start(server, |s| s).await;
    h.until_synced().await;
    h.server.apply(service("apps", "later"));

    h.until("the Service applied after the watch failed", |seen, _| {
        seen.applied(Kind::Service, "later")
    })
    .await;
    let requests = h.server.requests(Kind::Service);
    assert_eq!(requests.lists, 1);
    assert!(requests.watches >= 2, "{requests:?}");
}

#[tokio::test]
async fn managed_fields_and_last_applied_are_trimmed() {
    let mut obj = service("apps", "web");
    let meta = obj.meta_mut();
    meta.managed_fields = Some(vec![ManagedFieldsEntry {
        manager: Some("kubectl".into()),
        ..ManagedFieldsEntry::default()
    }]);
    meta.annotations = Some(
        [
            (LAST_APPLIED.to_string(), "{\"big\": true}".to_string()),
            ("keep".to_string(), "me".to_string()),
        ]
        .into(),
    );
    let server = server_with([obj.clone()]).await;
    let mut h = Harness::start(server, |s| s).await;
    h.until_synced().await;
    h.server.apply(relabeled(obj, "2"));
    h.server.delete(Kind::Service, "apps", "web");
    h.until("the change and the deletion", |seen, _| {
        seen.deleted(Kind::Service, "web")
    })
    .await;

    let services: Vec<&Object> = h
        .seen
        .every_object()
        .filter(|o| o.kind() == Kind::Service)
        .collect();
    assert_eq!(services.len(), 3, "listed, applied, deleted");
    for svc in services {
        let meta = svc.meta();
        assert_eq!(meta.managed_fields, None);
        let annotations = meta.annotations.clone().unwrap_or_default();
        assert!(!annotations.contains_key(LAST_APPLIED));
        assert_eq!(annotations.get("keep").map(String::as_str), Some("me"));
    }
}

#[tokio::test]
async fn a_namespace_list_only_yields_those_namespaces() {
    let server = server_with([
        service("a", "s1"),
        service("b", "s2"),
        service("c", "s3"),
        slice("b", "s2-x"),
        slice("c", "s3-x"),
        pod("a", "p1"),
        pod("c", "p3"),
        node("n1"),
    ])
    .await;
    let mut h = Harness::start_in(server, vec!["b", "a", "a"], |s| s).await;
    h.until_synced().await;

    for kind in [Kind::Service, Kind::EndpointSlice, Kind::Pod] {
        let replaces = h.seen.replaces(kind);
        let mut scopes: Vec<Option<String>> = replaces.iter().map(|r| r.1.clone()).collect();
        scopes.sort();
        assert_eq!(scopes, [Some("a".into()), Some("b".into())], "{kind}");
        for (_, ns, objects) in &replaces {
            assert!(
                objects.iter().all(|o| o.meta().namespace == *ns),
                "{kind}: a Replace for {ns:?} holds only that namespace"
            );
        }
        let synced_at = h.seen.position(&Event::Synced(kind)).unwrap_or(0);
        assert!(
            replaces.iter().all(|r| r.0 < synced_at),
            "{kind}: synced after both namespaces"
        );
    }
    let nodes = h.seen.replaces(Kind::Node);
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].1, None, "Nodes are cluster-wide");

    h.server.apply(service("c", "s4"));
    h.server.apply(pod("c", "p4"));
    h.server.apply(service("a", "s5"));
    h.until("the change in namespace a", |seen, _| {
        seen.applied(Kind::Service, "s5")
    })
    .await;
    assert!(
        h.seen
            .every_object()
            .all(|o| o.meta().namespace.as_deref() != Some("c")),
        "nothing from namespace c: {:#?}",
        h.seen.events
    );
    assert_eq!(
        h.server.requests(Kind::Pod).lists,
        2,
        "one list per namespace"
    );
}

#[tokio::test]
async fn run_returns_when_the_receiver_is_dropped() {
    let server = server_with(small_world()).await;
    let mut h = Harness::start(server, |s| s).await;
    h.until_synced().await;
    let Harness { rx, task, .. } = &mut h;
    drop(std::mem::replace(rx, mpsc::channel(1).1));
    let result = timeout(BOUND, task).await.expect("run returns");
    assert!(matches!(result, Ok(Ok(()))), "{result:?}");
}

/// `examples/k8s/control-rbac.yaml` grants list and watch on exactly the resources the
/// watchers use (named by the same Rust types), plus the commented TokenReview rule.
#[test]
fn the_example_rbac_grants_exactly_what_the_watchers_need() {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    use kube::Resource;

    let yaml = include_str!("../../../../examples/k8s/control-rbac.yaml");
    let role: ClusterRole = yaml
        .split("\n---\n")
        .filter_map(|doc| serde_saphyr::from_str::<serde_json::Value>(doc).ok())
        .find(|doc| doc["kind"] == "ClusterRole")
        .and_then(|doc| serde_json::from_value(doc).ok())
        .expect("a ClusterRole in the example");
    let mut granted: Vec<(String, String, Vec<String>)> = Vec::new();
    for rule in role.rules.unwrap_or_default() {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                granted.push((group.clone(), resource, rule.verbs.clone()));
            }
        }
    }
    granted.sort();
    let watch = || vec!["list".to_string(), "watch".to_string()];
    let mut expected = vec![
        (
            Service::group(&()).into(),
            Service::plural(&()).into(),
            watch(),
        ),
        (
            EndpointSlice::group(&()).into(),
            EndpointSlice::plural(&()).into(),
            watch(),
        ),
        (Pod::group(&()).into(), Pod::plural(&()).into(), watch()),
        (Node::group(&()).into(), Node::plural(&()).into(), watch()),
        (
            super::httproute::api_resource().group,
            super::httproute::api_resource().plural,
            watch(),
        ),
        (
            super::wasmplugin::api_resource().group,
            super::wasmplugin::api_resource().plural,
            watch(),
        ),
        (
            super::authz::api_resource().group,
            super::authz::api_resource().plural,
            watch(),
        ),
        (
            "authentication.k8s.io".to_string(),
            "tokenreviews".to_string(),
            vec!["create".to_string()],
        ),
    ];
    expected.sort();
    assert_eq!(granted, expected);
}

/// The warning logged for a watch error says what to do about it.
#[test]
fn watch_errors_name_what_to_fix() {
    use kube::runtime::watcher::Error;

    let status = |code| {
        Box::new(kube::core::Status {
            code,
            ..kube::core::Status::default()
        })
    };
    let forbidden = Error::InitialListFailed(kube::Error::Api(status(403)));
    assert!(super::hint(&forbidden).contains("examples/k8s/control-rbac.yaml"));
    assert!(super::hint(&Error::WatchError(status(401))).contains("credentials"));
    assert!(super::hint(&Error::WatchError(status(410))).contains("listing again"));
    assert_eq!(super::hint(&Error::NoResourceVersion), "");
}

/// An HTTPRoute on Service `svc` with a bad regular expression when `broken`, defaulted as the
/// source leaves it (so what the server stores and what the source reports are equal).
fn http_route(ns: &str, name: &str, svc: &str, broken: bool) -> Object {
    let path = if broken {
        serde_json::json!({"type": "RegularExpression", "value": "/("})
    } else {
        serde_json::json!({"type": "PathPrefix", "value": "/api"})
    };
    let mut route: crate::source::HttpRoute = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": svc}],
            "rules": [{"matches": [{"path": path}], "backendRefs": [{"name": svc, "port": 80}]}],
        },
    }))
    .expect("route");
    if !broken {
        crate::source::httproute::default_and_validate(&mut route).expect("valid");
    }
    Object::HttpRoute(route)
}

#[tokio::test]
async fn http_routes_are_watched_and_a_bad_one_is_left_out() {
    let mut world = small_world();
    world.push(http_route("apps", "good", "web", false));
    world.push(http_route("apps", "bad", "web", true));
    let server = server_with(world).await;
    let mut h = Harness::start(server, |s| s).await;
    h.until_synced().await;
    let names: Vec<String> = h
        .seen
        .objects(Kind::HttpRoute)
        .iter()
        .map(|o| name_of(o).to_string())
        .collect();
    assert_eq!(
        names,
        ["good"],
        "the invalid route is left out, the rest is not held back"
    );
    assert_eq!(
        h.seen.objects(Kind::HttpRoute)[0],
        trimmed(h.server.objects(Kind::HttpRoute).remove(1)),
        "read back as stored"
    );

    // A change, a route turning bad (it goes away) and a deletion.
    h.server.apply(http_route("shop", "new", "cart", false));
    h.until("the new route", |seen, _| {
        seen.applied(Kind::HttpRoute, "new")
    })
    .await;
    h.server.apply(http_route("apps", "good", "web", true));
    h.until("the route that broke is removed", |seen, _| {
        seen.deleted(Kind::HttpRoute, "good")
    })
    .await;
    h.server.delete(Kind::HttpRoute, "shop", "new");
    h.until("the deleted route", |seen, _| {
        seen.deleted(Kind::HttpRoute, "new")
    })
    .await;
    assert!(h.seen.objects(Kind::HttpRoute).is_empty());
}

#[tokio::test]
async fn without_the_gateway_api_crds_the_table_syncs_and_routes_come_later() {
    let server = server_with(small_world()).await;
    server.set_served(Kind::HttpRoute, false);
    let mut h = Harness::start(server, |s| s).await;
    h.until_synced().await;
    let replaces = h.seen.replaces(Kind::HttpRoute);
    assert_eq!(replaces.len(), 1, "{replaces:#?}");
    assert!(replaces[0].2.is_empty(), "no routes");

    // Let the watcher fail again at least once, then install the CRD and add a route.
    timeout(BOUND, async {
        while h.server.requests(Kind::HttpRoute).lists < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the watcher retries");
    h.server.set_served(Kind::HttpRoute, true);
    h.server.apply(http_route("apps", "late", "web", false));
    h.until("the route once the CRD is there", |seen, _| {
        seen.objects(Kind::HttpRoute).len() == 1
    })
    .await;
    assert_eq!(
        h.seen.replaces(Kind::HttpRoute).len(),
        2,
        "repeated 404s report nothing more: {:#?}",
        h.seen.events
    );
    assert_eq!(h.seen.synced(Kind::HttpRoute), 1);

    // The CRD removed again: its routes are gone with it.
    h.server.set_served(Kind::HttpRoute, false);
    h.until("no routes", |seen, _| {
        seen.objects(Kind::HttpRoute).is_empty()
    })
    .await;
}

#[tokio::test]
async fn http_routes_follow_the_namespaces_control_watches() {
    let server = server_with([
        service("a", "s1"),
        http_route("a", "r1", "s1", false),
        http_route("c", "r3", "s1", false),
    ])
    .await;
    let mut h = Harness::start_in(server, vec!["a", "b"], |s| s).await;
    h.until_synced().await;
    let names: Vec<String> = h
        .seen
        .objects(Kind::HttpRoute)
        .iter()
        .map(|o| name_of(o).to_string())
        .collect();
    assert_eq!(names, ["r1"]);
    let mut scopes: Vec<Option<String>> = h
        .seen
        .replaces(Kind::HttpRoute)
        .into_iter()
        .map(|r| r.1)
        .collect();
    scopes.sort();
    assert_eq!(scopes, [Some("a".into()), Some("b".into())]);
}

/// What the kube source makes of route objects it cannot use (the fake API server only
/// stores well-typed routes, so these are read directly).
#[test]
fn unusable_route_objects_are_named_and_keep_their_identity() {
    use super::httproute::{Reading, read};
    let dynamic = |spec: serde_json::Value| -> kube::api::DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "apps", "resourceVersion": "7"},
            "spec": spec,
        }))
        .expect("dynamic object")
    };
    match read(dynamic(
        serde_json::json!({"rules": [{"backendRefs": [{"name": "a", "port": "eighty"}]}]}),
    )) {
        Reading::Skipped { identity, why } => {
            let why = why.to_string();
            assert!(
                why.starts_with("HTTPRoute apps/r: spec does not match"),
                "{why}"
            );
            assert_eq!(identity.metadata.name.as_deref(), Some("r"));
            assert_eq!(identity.metadata.resource_version.as_deref(), Some("7"));
        }
        Reading::Usable(r) => panic!("accepted {r:?}"),
    }
    match read(dynamic(
        serde_json::json!({"rules": [{"filters": [{"type": "RequestMirror", "requestMirror": {}}]}]}),
    )) {
        Reading::Skipped { why, .. } => {
            let why = why.to_string();
            assert!(
                why.starts_with("HTTPRoute apps/r: spec.rules[0].filters[0].type: RequestMirror is not supported"),
                "{why}"
            );
        }
        Reading::Usable(r) => panic!("accepted {r:?}"),
    }
    // No spec at all is a route with the default rule.
    match read(dynamic(serde_json::Value::Null)) {
        Reading::Usable(r) => assert_eq!(r.spec.rules.map(|r| r.len()), Some(1)),
        Reading::Skipped { why, .. } => panic!("{why}"),
    }
}

fn wasm(tail: &str) -> Vec<u8> {
    let mut v = crate::source::wasmplugin::module::WASM_MAGIC.to_vec();
    v.extend_from_slice(tail.as_bytes());
    v
}

/// A WasmPlugin as stored by the API server (no module: the source reads it).
fn wasm_plugin(ns: &str, name: &str, url: &str, sha256: Option<&str>) -> Object {
    let mut spec = serde_json::json!({"url": url, "phase": "STATS"});
    if let Some(sha) = sha256 {
        spec["sha256"] = sha.into();
    }
    let mut p: crate::source::WasmPlugin = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
    .expect("plugin");
    crate::source::wasmplugin::default_and_validate(&mut p).expect("valid");
    Object::WasmPlugin(p)
}

/// `name → sha256 of its module` of the plugins the consumer holds.
fn plugin_modules(seen: &Seen) -> BTreeMap<String, String> {
    seen.objects(Kind::WasmPlugin)
        .iter()
        .map(|o| match o {
            Object::WasmPlugin(p) => (
                name_of(o).to_string(),
                p.module
                    .as_ref()
                    .expect("sent with its module")
                    .sha256
                    .clone(),
            ),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn wasm_plugins_are_watched_with_their_modules_and_keep_their_last_good_version() {
    use crate::source::wasmplugin::module::sha256_hex;
    let dir = tempfile::tempdir().expect("tempdir");
    let m1 = dir.path().join("m1.wasm");
    std::fs::write(&m1, wasm("one")).expect("write");
    let url = format!("file://{}", m1.display());
    let mut world = small_world();
    world.push(wasm_plugin("apps", "good", &url, None));
    world.push(wasm_plugin(
        "apps",
        "missing",
        &format!("file://{}", dir.path().join("nope.wasm").display()),
        None,
    ));
    world.push(wasm_plugin("apps", "relative", "file://m1.wasm", None));
    let server = server_with(world).await;
    let mut h = Harness::start(server, |s| {
        s.with_module_recheck(Duration::from_millis(100))
    })
    .await;
    h.until_synced().await;
    assert_eq!(
        plugin_modules(&h.seen),
        [("good".to_string(), sha256_hex(&wasm("one")))].into(),
        "plugins whose module cannot be read are left out, the rest is not held back"
    );

    // The module file changes, the object does not: sent again with the new module.
    std::fs::write(&m1, wasm("two")).expect("write");
    h.until("the new module", |seen, _| {
        plugin_modules(seen).get("good") == Some(&sha256_hex(&wasm("two")))
    })
    .await;

    // The object changes to a sha256 that does not match: the last good version stays.
    h.server
        .apply(wasm_plugin("apps", "good", &url, Some(&"0".repeat(64))));
    // So does a module that disappears.
    std::fs::remove_file(&m1).expect("rm");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A plugin whose module shows up after it (a ConfigMap volume updated late) is picked up.
    h.server.apply(wasm_plugin(
        "shop",
        "later",
        &format!("file://{}", dir.path().join("m2.wasm").display()),
        None,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!plugin_modules(&h.seen).contains_key("later"));
    std::fs::write(dir.path().join("m2.wasm"), wasm("m2")).expect("write");
    h.until("a later plugin", |seen, _| {
        plugin_modules(seen).contains_key("later")
    })
    .await;
    assert_eq!(
        plugin_modules(&h.seen).get("good"),
        Some(&sha256_hex(&wasm("two"))),
        "the last good version stays"
    );
    assert!(!h.seen.deleted(Kind::WasmPlugin, "good"));

    // Fixed (the right sha256, the file back): sent; deleted: gone.
    std::fs::write(&m1, wasm("three")).expect("write");
    h.server.apply(wasm_plugin(
        "apps",
        "good",
        &url,
        Some(&sha256_hex(&wasm("three"))),
    ));
    h.until("the fixed plugin", |seen, _| {
        plugin_modules(seen).get("good") == Some(&sha256_hex(&wasm("three")))
    })
    .await;
    h.server.delete(Kind::WasmPlugin, "apps", "good");
    h.until("the deleted plugin", |seen, _| {
        seen.deleted(Kind::WasmPlugin, "good")
    })
    .await;
}

#[tokio::test]
async fn without_the_wasmplugin_crd_the_table_syncs_and_plugins_come_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = dir.path().join("m.wasm");
    std::fs::write(&m, wasm("m")).expect("write");
    let server = server_with(small_world()).await;
    server.set_served(Kind::WasmPlugin, false);
    let mut h = Harness::start(server, |s| s).await;
    h.until_synced().await;
    let replaces = h.seen.replaces(Kind::WasmPlugin);
    assert_eq!(replaces.len(), 1, "{replaces:#?}");
    assert!(replaces[0].2.is_empty(), "no plugins");
    h.server.set_served(Kind::WasmPlugin, true);
    h.server.apply(wasm_plugin(
        "apps",
        "late",
        &format!("file://{}", m.display()),
        None,
    ));
    h.until("the plugin once the CRD is there", |seen, _| {
        seen.objects(Kind::WasmPlugin).len() == 1
    })
    .await;
}

#[tokio::test]
async fn wasm_plugins_of_the_root_namespace_are_watched_whatever_the_namespaces() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = dir.path().join("m.wasm");
    std::fs::write(&m, wasm("m")).expect("write");
    let url = format!("file://{}", m.display());
    let server = server_with([
        service("a", "s1"),
        wasm_plugin("a", "p1", &url, None),
        wasm_plugin("c", "p3", &url, None),
        wasm_plugin("mesh", "global", &url, None),
    ])
    .await;
    let mut h = Harness::start_in(server, vec!["a", "b"], |s| s.with_root_namespace("mesh")).await;
    h.until_synced().await;
    assert_eq!(
        plugin_modules(&h.seen).into_keys().collect::<Vec<_>>(),
        ["global", "p1"]
    );
    let mut scopes: Vec<Option<String>> = h
        .seen
        .replaces(Kind::WasmPlugin)
        .into_iter()
        .map(|r| r.1)
        .collect();
    scopes.sort();
    assert_eq!(
        scopes,
        [Some("a".into()), Some("b".into()), Some("mesh".into())]
    );
}

/// What the kube source makes of plugin objects it cannot use.
#[test]
fn unusable_plugin_objects_are_named() {
    use super::wasmplugin::read;
    let dynamic = |spec: serde_json::Value| -> kube::api::DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "wasmesh.io/v1alpha1",
            "kind": "WasmPlugin",
            "metadata": {"name": "p", "namespace": "apps"},
            "spec": spec,
        }))
        .expect("dynamic object")
    };
    let mut cache = crate::source::wasmplugin::ModuleCache::new();
    let mut err = |spec| {
        read(dynamic(spec), &mut cache)
            .expect_err("refused")
            .to_string()
    };
    let e = err(serde_json::json!({"url": "/m.wasm", "priority": "high"}));
    assert!(
        e.starts_with("WasmPlugin apps/p: spec does not match the WasmPlugin schema"),
        "{e}"
    );
    let e = err(serde_json::json!({"url": "oci://ghcr.io/a/b:1"}));
    assert!(
        e.starts_with("WasmPlugin apps/p: spec.url") && e.contains("OCI"),
        "{e}"
    );
    let e = err(serde_json::json!({"url": "m.wasm"}));
    assert!(e.contains("give an absolute path"), "{e}");
    let e = err(serde_json::json!({"url": "file:///nonexistent/m.wasm"}));
    assert!(
        e.starts_with("WasmPlugin apps/p: module /nonexistent/m.wasm: cannot read"),
        "{e}"
    );
}

/// An AuthorizationPolicy letting ServiceAccount `sa` reach port 8080 of `app: web`; with a
/// `from` entry that names no one when `broken` (the CRD's schema cannot catch it).
fn authz_policy(ns: &str, name: &str, sa: &str, broken: bool) -> Object {
    let from = if broken {
        "bogus".to_string()
    } else {
        format!("ns/{ns}/sa/{sa}")
    };
    let p: crate::source::AuthorizationPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "rules": [{"from": [from], "ports": [8080]}],
        },
    }))
    .expect("policy");
    Object::AuthorizationPolicy(p)
}

/// `name → the from entries` of the policies the consumer holds.
fn policy_froms(seen: &Seen) -> BTreeMap<String, Vec<String>> {
    seen.objects(Kind::AuthorizationPolicy)
        .iter()
        .map(|o| match o {
            Object::AuthorizationPolicy(p) => (
                name_of(o).to_string(),
                p.spec
                    .rules
                    .iter()
                    .flatten()
                    .flat_map(|r| r.from.iter().flatten().cloned())
                    .collect(),
            ),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn authorization_policies_are_watched_and_keep_their_last_good_version() {
    let mut world = small_world();
    world.push(authz_policy("apps", "web", "client", false));
    world.push(authz_policy("apps", "never-good", "client", true));
    let server = server_with(world).await;
    let mut h = Harness::start(server, |s| s).await;
    h.until_synced().await;
    assert_eq!(
        policy_froms(&h.seen),
        [("web".to_string(), vec!["ns/apps/sa/client".to_string()])].into(),
        "a policy that never validated is left out, the rest is not held back"
    );
    assert_eq!(
        h.seen.objects(Kind::AuthorizationPolicy)[0],
        trimmed(h.server.objects(Kind::AuthorizationPolicy).remove(1)),
        "read back as stored"
    );

    // A change reaches the consumer; one that breaks the policy does not take it away.
    h.server.apply(authz_policy("apps", "web", "other", false));
    h.until("the changed policy", |seen, _| {
        policy_froms(seen).get("web") == Some(&vec!["ns/apps/sa/other".to_string()])
    })
    .await;
    h.server.apply(authz_policy("apps", "web", "x", true));
    h.server
        .apply(authz_policy("shop", "later", "client", false));
    h.until("a later policy", |seen, _| {
        policy_froms(seen).contains_key("later")
    })
    .await;
    assert_eq!(
        policy_froms(&h.seen).get("web"),
        Some(&vec!["ns/apps/sa/other".to_string()]),
        "the last good version stays"
    );
    assert!(!h.seen.deleted(Kind::AuthorizationPolicy, "web"));

    // Fixed, then deleted.
    h.server.apply(authz_policy("apps", "web", "client", false));
    h.until("the fixed policy", |seen, _| {
        policy_froms(seen).get("web") == Some(&vec!["ns/apps/sa/client".to_string()])
    })
    .await;
    h.server.delete(Kind::AuthorizationPolicy, "apps", "web");
    h.until("the deleted policy", |seen, _| {
        seen.deleted(Kind::AuthorizationPolicy, "web")
    })
    .await;
    assert_eq!(
        policy_froms(&h.seen).into_keys().collect::<Vec<_>>(),
        ["later"]
    );
}

#[tokio::test]
async fn without_the_authorizationpolicy_crd_the_table_syncs_and_policies_come_later() {
    let server = server_with(small_world()).await;
    server.set_served(Kind::AuthorizationPolicy, false);
    let mut h = Harness::start(server, |s| s).await;
    h.until_synced().await;
    let replaces = h.seen.replaces(Kind::AuthorizationPolicy);
    assert_eq!(replaces.len(), 1, "{replaces:#?}");
    assert!(replaces[0].2.is_empty(), "no policies");
    h.server.set_served(Kind::AuthorizationPolicy, true);
    h.server
        .apply(authz_policy("apps", "late", "client", false));
    h.until("the policy once the CRD is there", |seen, _| {
        seen.objects(Kind::AuthorizationPolicy).len() == 1
    })
    .await;
}

#[tokio::test]
async fn authorization_policies_follow_the_namespaces_control_watches() {
    let server = server_with([
        service("a", "s1"),
        authz_policy("a", "p1", "client", false),
        authz_policy("c", "p3", "client", false),
    ])
    .await;
    let mut h = Harness::start_in(server, vec!["a", "b"], |s| s).await;
    h.until_synced().await;
    assert_eq!(
        policy_froms(&h.seen).into_keys().collect::<Vec<_>>(),
        ["p1"]
    );
}

/// What the kube source makes of policy objects it cannot use.
#[test]
fn unusable_policy_objects_are_named() {
    use super::authz::read;
    let dynamic = |spec: serde_json::Value| -> kube::api::DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "wasmesh.io/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "apps"},
            "spec": spec,
        }))
        .expect("dynamic object")
    };
    let err = |spec| read(dynamic(spec)).expect_err("refused").to_string();
    let e = err(serde_json::json!({"rulez": []}));
    assert!(
        e.starts_with(
            "AuthorizationPolicy apps/p: spec does not match the AuthorizationPolicy schema: unknown field `rulez`"
        ),
        "{e}"
    );
    let e = err(serde_json::json!({"rules": [{"from": ["bogus"]}]}));
    assert!(
        e.starts_with(
            "AuthorizationPolicy apps/p: spec.rules[0].from[0]: \"bogus\" names no client"
        ),
        "{e}"
    );
    let e = err(serde_json::json!({"mtls": "STRICT"}));
    assert_eq!(
        e,
        "AuthorizationPolicy apps/p: spec.mtls: \"STRICT\" is not strict or permissive"
    );
    // No spec at all: a policy that restricts no one.
    let p = read(dynamic(serde_json::Value::Null)).expect("usable");
    assert_eq!(p.spec, Default::default());
}
