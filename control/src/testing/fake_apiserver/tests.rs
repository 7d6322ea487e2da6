//! Tests of the fake API server itself: its wire format through the real kube client, and its
//! parsers. Every wait is bounded.

use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, VersionMatch, WatchEvent, WatchParams};
use tokio::time::timeout;

use super::FakeApiServer;
use super::request::{LabelTerm, parse_label_selector, parse_params, percent_decode, route};
use crate::source::{Kind, Object};

const BOUND: Duration = Duration::from_secs(5);

async fn server() -> (FakeApiServer, kube::Client) {
    let server = FakeApiServer::start()
        .await
        .expect("fake API server starts");
    let client = server.client().expect("client");
    (server, client)
}

fn svc(ns: &str, name: &str, labels: &[(&str, &str)]) -> Object {
    Object::Service(Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        ..Service::default()
    })
}

fn node(name: &str) -> Object {
    Object::Node(Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    })
}

fn names<K: kube::Resource>(items: &[K]) -> Vec<String> {
    items
        .iter()
        .map(|o| o.meta().name.clone().unwrap_or_default())
        .collect()
}

fn rv_of(obj: &Object) -> String {
    obj.meta().resource_version.clone().unwrap_or_default()
}

/// The next watch event, as `"ADDED name"`, `"BOOKMARK rv"`, `"ERROR code"` or `"END"`.
async fn next_event<S>(stream: &mut S) -> String
where
    S: Stream<Item = kube::Result<WatchEvent<Service>>> + Unpin,
{
    let item = timeout(BOUND, stream.next())
        .await
        .expect("a watch event in time");
    let name = |o: &Service| o.metadata.name.clone().unwrap_or_default();
    match item {
        None => "END".into(),
        Some(Ok(WatchEvent::Added(o))) => format!("ADDED {}", name(&o)),
        Some(Ok(WatchEvent::Modified(o))) => format!("MODIFIED {}", name(&o)),
        Some(Ok(WatchEvent::Deleted(o))) => format!("DELETED {}", name(&o)),
        Some(Ok(WatchEvent::Bookmark(b))) => format!("BOOKMARK {}", b.metadata.resource_version),
        Some(Ok(WatchEvent::Error(s))) => format!("ERROR {}", s.code),
        Some(Err(e)) => format!("client error: {e}"),
    }
}

#[tokio::test]
async fn lists_page_through_a_snapshot() {
    let (server, client) = server().await;
    for i in 0..5 {
        server.apply(svc("apps", &format!("s{i}"), &[]));
    }
    let api: Api<Service> = Api::all(client);
    let first = api
        .list(&ListParams::default().limit(2))
        .await
        .expect("page 1");
    let rv = first.metadata.resource_version.clone();
    // Written after the first page: not part of this list.
    server.apply(svc("apps", "s9", &[]));
    let mut all = names(&first.items);
    let mut token = first.metadata.continue_;
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = api
            .list(&ListParams::default().limit(2).continue_token(&t))
            .await
            .expect("next page");
        assert_eq!(page.metadata.resource_version, rv, "one snapshot");
        all.extend(names(&page.items));
        token = page.metadata.continue_;
    }
    assert_eq!(all, ["s0", "s1", "s2", "s3", "s4"]);
    assert_eq!(server.requests(Kind::Service).lists, 3);
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists() {
    let (server, client) = server().await;
    server.apply(svc("apps", "web", &[("app", "web"), ("tier", "front")]));
    server.apply(svc("apps", "db", &[("app", "db")]));
    server.apply(svc("apps", "legacy", &[("app", "web"), ("legacy", "true")]));
    server.apply(svc("other", "web2", &[("app", "web")]));
    let api: Api<Service> = Api::all(client.clone());
    let cases: [(&str, &str, &[&str]); 8] = [
        ("", "", &["db", "legacy", "web", "web2"]),
        ("app=web", "", &["legacy", "web", "web2"]),
        ("app==web,!legacy", "", &["web", "web2"]),
        ("app!=web", "", &["db"]),
        ("tier", "", &["web"]),
        ("app=nothing", "", &[]),
        ("", "metadata.name=db", &["db"]),
        ("app=web", "metadata.namespace!=apps", &["web2"]),
    ];
    for (labels, fields, expected) in cases {
        let mut lp = ListParams::default();
        if !labels.is_empty() {
            lp = lp.labels(labels);
        }
        if !fields.is_empty() {
            lp = lp.fields(fields);
        }
        let list = api.list(&lp).await.expect("list");
        assert_eq!(
            names(&list.items),
            expected,
            "labels {labels:?} fields {fields:?}"
        );
    }
    let other: Api<Service> = Api::namespaced(client.clone(), "other");
    let list = other
        .list(&ListParams::default())
        .await
        .expect("namespaced list");
    assert_eq!(names(&list.items), ["web2"]);

    let bad = api
        .list(&ListParams::default().labels("app in (web)"))
        .await;
    assert!(matches!(bad, Err(kube::Error::Api(s)) if s.code == 400));
}

#[tokio::test]
async fn a_watch_replays_after_its_resource_version_then_streams_live() {
    let (server, client) = server().await;
    let a = server.apply(svc("apps", "a", &[]));
    server.apply(svc("apps", "b", &[]));
    let api: Api<Service> = Api::all(client);
    let mut events = api
        .watch(&WatchParams::default(), &rv_of(&a))
        .await
        .expect("watch")
        .boxed();
    assert_eq!(next_event(&mut events).await, "ADDED b", "replayed");
    server.apply(svc("apps", "c", &[]));
    server.apply(svc("apps", "a", &[("changed", "yes")]));
    server.delete(Kind::Service, "apps", "b");
    server.delete(Kind::Service, "apps", "nonexistent");
    assert_eq!(next_event(&mut events).await, "ADDED c");
    assert_eq!(next_event(&mut events).await, "MODIFIED a");
    assert_eq!(next_event(&mut events).await, "DELETED b");
    assert_eq!(server.requests(Kind::Service).watches, 1);
}

#[tokio::test]
async fn a_watch_with_a_selector_sees_objects_enter_and_leave_it() {
    let (server, client) = server().await;
    let api: Api<Service> = Api::all(client);
    let from = server.resource_version().to_string();
    let mut events = api
        .watch(&WatchParams::default().labels("app=web"), &from)
        .await
        .expect("watch")
        .boxed();
    server.apply(svc("apps", "x", &[("app", "db")]));
    server.apply(svc("apps", "x", &[("app", "web")]));
    server.apply(svc("apps", "x", &[("app", "web"), ("v", "2")]));
    server.apply(svc("apps", "x", &[("app", "db")]));
    assert_eq!(next_event(&mut events).await, "ADDED x");
    assert_eq!(next_event(&mut events).await, "MODIFIED x");
    assert_eq!(next_event(&mut events).await, "DELETED x");
}

#[tokio::test]
async fn compaction_makes_older_versions_gone() {
    let (server, client) = server().await;
    let api: Api<Service> = Api::all(client);
    let old = rv_of(&server.apply(svc("apps", "a", &[])));
    server.apply(svc("apps", "b", &[]));
    let paged = api
        .list(&ListParams::default().limit(1))
        .await
        .expect("page 1");
    let token = paged.metadata.continue_.expect("a continue token");
    server.apply(svc("apps", "c", &[]));
    server.compact();

    let mut events = api
        .watch(&WatchParams::default(), &old)
        .await
        .expect("watch")
        .boxed();
    assert_eq!(next_event(&mut events).await, "ERROR 410");
    assert_eq!(next_event(&mut events).await, "END");

    let exact = ListParams::default().at(&old).matching(VersionMatch::Exact);
    assert!(matches!(api.list(&exact).await, Err(kube::Error::Api(s)) if s.code == 410));
    let expired = ListParams::default().limit(1).continue_token(&token);
    assert!(matches!(api.list(&expired).await, Err(kube::Error::Api(s)) if s.code == 410));

    let now = server.resource_version().to_string();
    let mut events = api
        .watch(&WatchParams::default(), &now)
        .await
        .expect("watch")
        .boxed();
    server.apply(svc("apps", "d", &[]));
    assert_eq!(next_event(&mut events).await, "ADDED d");
}

#[tokio::test]
async fn bookmarks_go_only_to_watches_that_asked_for_them() {
    let (server, client) = server().await;
    let api: Api<Service> = Api::all(client);
    let from = server.resource_version().to_string();
    let mut with = api
        .watch(&WatchParams::default(), &from)
        .await
        .expect("watch")
        .boxed();
    let mut without = api
        .watch(&WatchParams::default().disable_bookmarks(), &from)
        .await
        .expect("watch")
        .boxed();
    server.apply(node("n1"));
    server.bookmark();
    let rv = server.resource_version();
    server.apply(svc("apps", "a", &[]));
    assert_eq!(next_event(&mut with).await, format!("BOOKMARK {rv}"));
    assert_eq!(next_event(&mut with).await, "ADDED a");
    assert_eq!(next_event(&mut without).await, "ADDED a");
}

#[tokio::test]
async fn watches_end_on_timeout_and_on_close() {
    let (server, client) = server().await;
    let api: Api<Service> = Api::all(client);
    let from = server.resource_version().to_string();
    let mut short = api
        .watch(&WatchParams::default().timeout(1), &from)
        .await
        .expect("watch")
        .boxed();
    assert_eq!(next_event(&mut short).await, "END");

    let mut long = api
        .watch(&WatchParams::default(), &from)
        .await
        .expect("watch")
        .boxed();
    timeout(BOUND, server.watching(Kind::Service))
        .await
        .expect("watch registered");
    server.close_watches();
    assert_eq!(next_event(&mut long).await, "END");
}

#[tokio::test]
async fn held_watches_wait_and_then_catch_up() {
    let (server, client) = server().await;
    let api: Api<Service> = Api::all(client);
    let from = server.resource_version().to_string();
    server.hold_watches();
    let watch = tokio::spawn(async move {
        let mut events = api.watch(&WatchParams::default(), &from).await?.boxed();
        Ok::<_, kube::Error>(next_event(&mut events).await)
    });
    timeout(BOUND, async {
        while server.requests(Kind::Service).watches == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the watch request arrives");
    server.apply(svc("apps", "while-held", &[]));
    assert_eq!(server.open_watches(Kind::Service), 0, "held, not open");
    server.release_watches();
    let first = timeout(BOUND, watch).await.expect("released in time");
    assert_eq!(
        first.ok().and_then(Result::ok).as_deref(),
        Some("ADDED while-held")
    );
}

#[tokio::test]
async fn injected_failures_and_unknown_paths_are_status_errors() {
    let (server, client) = server().await;
    let services: Api<Service> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let lp = ListParams::default();

    server.fail_next(500);
    let failed = services.list(&lp).await;
    assert!(
        matches!(&failed, Err(kube::Error::Api(s)) if s.code == 500 && s.reason == "InternalError"),
        "{failed:?}"
    );
    assert!(
        services.list(&lp).await.is_ok(),
        "only the next request fails"
    );

    server.fail_next_for(Kind::Node, 403);
    assert!(services.list(&lp).await.is_ok(), "not a Node request");
    assert!(matches!(nodes.list(&lp).await, Err(kube::Error::Api(s)) if s.code == 403));

    server.fail_after(Kind::Node, 1, 500);
    assert!(nodes.list(&lp).await.is_ok());
    assert!(matches!(nodes.list(&lp).await, Err(kube::Error::Api(s)) if s.code == 500));

    let config_maps: Api<ConfigMap> = Api::all(client);
    assert!(matches!(config_maps.list(&lp).await, Err(kube::Error::Api(s)) if s.code == 404));
    assert_eq!(server.requests(Kind::Service).lists, 3);
    assert_eq!(server.requests(Kind::Node).lists, 3);
}

#[test]
fn paths_route_to_collections() {
    let cases = [
        ("/api/v1/services", Some((Kind::Service, None))),
        (
            "/api/v1/namespaces/apps/pods",
            Some((Kind::Pod, Some("apps"))),
        ),
        (
            "/apis/discovery.k8s.io/v1/endpointslices",
            Some((Kind::EndpointSlice, None)),
        ),
        (
            "/apis/discovery.k8s.io/v1/namespaces/a/endpointslices",
            Some((Kind::EndpointSlice, Some("a"))),
        ),
        ("/api/v1/nodes", Some((Kind::Node, None))),
        ("/api/v1/namespaces/a/nodes", None),
        ("/api/v1/endpointslices", None),
        ("/api/v1/namespaces/a/services/web", None),
        ("/api/v1/configmaps", None),
    ];
    for (path, expected) in cases {
        let got = route(path).map(|c| (c.kind, c.namespace));
        let expected = expected.map(|(k, ns)| (k, ns.map(String::from)));
        assert_eq!(got, expected, "{path}");
    }
}

#[test]
fn query_strings_and_selectors_parse() {
    assert_eq!(
        percent_decode("app%3Dweb%2C%21legacy+x"),
        "app=web,!legacy x"
    );
    assert_eq!(percent_decode("100%"), "100%");
    let params = parse_params(Some(
        "&watch=true&timeoutSeconds=290&labelSelector=kubernetes.io%2Fservice-name&allowWatchBookmarks=true&resourceVersion=1001",
    ))
    .expect("valid");
    assert!(params.watch && params.allow_bookmarks);
    assert_eq!(params.timeout_seconds, Some(290));
    assert_eq!(params.resource_version.as_deref(), Some("1001"));
    assert_eq!(
        params.selector.labels,
        [LabelTerm::Exists("kubernetes.io/service-name".into())]
    );
    assert_eq!(
        parse_label_selector("a=1, b==2,c!=3,d,!e").expect("valid"),
        [
            LabelTerm::Equals("a".into(), "1".into()),
            LabelTerm::Equals("b".into(), "2".into()),
            LabelTerm::NotEquals("c".into(), "3".into()),
            LabelTerm::Exists("d".into()),
            LabelTerm::NotExists("e".into()),
        ]
    );
    assert!(parse_label_selector("a in (x,y)").is_err());
    assert!(parse_params(Some("limit=ten")).is_err());
    assert!(parse_params(Some("fieldSelector=spec.nodeName%3Dn1")).is_err());
}
