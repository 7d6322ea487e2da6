//! Routes in the model: which ports a route attaches to, what proxies receive (every default
//! filled), and that a route change re-publishes exactly the ports it touches.

use std::collections::BTreeSet;

use wasmesh_api::discovery as pb;

use crate::model::{Delta, Model, PortKey, Protocol};
use crate::source::folder::{Outcome, parse_file};
use crate::source::{Event, Kind, Object};

/// Objects from YAML, defaulted and validated as the folder source does.
fn objects(yaml: &str) -> Vec<Object> {
    parse_file(yaml)
        .into_iter()
        .flat_map(|d| match d.outcome {
            Outcome::Objects(o) => o,
            Outcome::Skipped(_) => vec![],
            o @ Outcome::Invalid { .. } => panic!("bad test YAML: {o:?}"),
        })
        .collect()
}

fn one(yaml: &str) -> Object {
    let mut o = objects(yaml);
    assert_eq!(o.len(), 1, "{o:?}");
    o.remove(0)
}

/// A synced model holding `yaml`.
fn model(yaml: &str) -> Model {
    let mut m = Model::new();
    let objs = objects(yaml);
    for kind in Kind::ALL {
        m.apply(Event::Replace {
            kind,
            namespace: None,
            objects: objs.iter().filter(|o| o.kind() == kind).cloned().collect(),
        });
        m.apply(Event::Synced(kind));
    }
    m
}

fn key(svc: &str, port: &str, protocol: Protocol) -> PortKey {
    let (ns, name) = svc.split_once('/').expect("ns/name");
    PortKey {
        namespace: ns.into(),
        service: name.into(),
        port_name: port.into(),
        protocol,
    }
}

/// `namespace/name` of the routes on a port.
fn routes_on(m: &Model, svc: &str, port: &str, protocol: Protocol) -> Vec<String> {
    let e = m
        .entry(&key(svc, port, protocol))
        .unwrap_or_else(|| panic!("no {svc} {port}"));
    e.http_routes
        .iter()
        .map(|r| format!("{}/{}", r.namespace, r.name))
        .collect()
}

/// The ports a delta publishes (upserts and removals), as `ns/svc:port`.
fn touched(d: &Delta) -> BTreeSet<String> {
    d.upserts
        .keys()
        .chain(&d.removals)
        .map(|k| format!("{}/{}:{}", k.namespace, k.service, k.port_name))
        .collect()
}

const WEB: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: http, port: 80}
  - {name: admin, port: 9090}
  - {name: dns, port: 53, protocol: UDP}
";

const OTHER: &str = "
apiVersion: v1
kind: Service
metadata: {name: other, namespace: shop}
spec:
  clusterIP: 10.96.0.21
  ports: [{name: http, port: 80}]
";

fn route(ns: &str, name: &str, parent_refs: &str) -> String {
    format!(
        "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {ns}}}
spec:
  parentRefs: {parent_refs}
  rules: [{{backendRefs: [{{name: web, port: 80}}]}}]
"
    )
}

#[test]
fn routes_attach_to_the_ports_their_parent_refs_name() {
    let m = model(
        &[
            WEB.to_string(),
            OTHER.to_string(),
            // Every TCP port of web.
            route("shop", "all", "[{group: '', kind: Service, name: web}]"),
            // Port number 9090 only.
            route(
                "shop",
                "by-port",
                "[{group: '', kind: Service, name: web, port: 9090}]",
            ),
            // Port name http only ("core" is accepted for the core group).
            route(
                "shop",
                "by-name",
                "[{group: core, kind: Service, name: web, sectionName: http}]",
            ),
            // A consumer route: another namespace, naming web explicitly. Attached all the same.
            route(
                "client",
                "consumer",
                "[{group: '', kind: Service, name: web, namespace: shop}]",
            ),
            // Same name in another namespace without a namespace: names client/web, not shop/web.
            route(
                "client",
                "elsewhere",
                "[{group: '', kind: Service, name: web}]",
            ),
            // A Gateway parent (the CRD's default group and kind) is not ours.
            route("shop", "gateway", "[{name: web}]"),
            // Another Service.
            route(
                "shop",
                "to-other",
                "[{group: '', kind: Service, name: other}]",
            ),
            // A port that web does not have.
            route(
                "shop",
                "no-port",
                "[{group: '', kind: Service, name: web, port: 81}]",
            ),
        ]
        .join("\n---\n"),
    );
    assert_eq!(
        routes_on(&m, "shop/web", "http", Protocol::Tcp),
        ["client/consumer", "shop/all", "shop/by-name"],
        "sorted by namespace, then name"
    );
    assert_eq!(
        routes_on(&m, "shop/web", "admin", Protocol::Tcp),
        ["client/consumer", "shop/all", "shop/by-port"]
    );
    assert!(
        routes_on(&m, "shop/web", "dns", Protocol::Udp).is_empty(),
        "UDP ports carry no HTTP"
    );
    assert_eq!(
        routes_on(&m, "shop/other", "http", Protocol::Tcp),
        ["shop/to-other"]
    );
    // One route attached to two ports is one shared value.
    let http = &m
        .entry(&key("shop/web", "http", Protocol::Tcp))
        .expect("http")
        .http_routes;
    let admin = &m
        .entry(&key("shop/web", "admin", Protocol::Tcp))
        .expect("admin")
        .http_routes;
    assert!(std::sync::Arc::ptr_eq(&http[1], &admin[1]));
    // And the stream carries them.
    let sp = m
        .entry(&key("shop/web", "http", Protocol::Tcp))
        .expect("http")
        .to_proto();
    assert_eq!(sp.http_routes.len(), 3);
    assert_eq!(sp.http_routes[0].namespace, "client");
}

#[test]
fn a_route_change_republishes_exactly_the_ports_it_touches() {
    let mut m = model(&[WEB, OTHER].join("\n---\n"));
    let on_http = one(&route(
        "shop",
        "r",
        "[{group: '', kind: Service, name: web, port: 80}]",
    ));
    let d = m.apply(Event::Apply(on_http.clone()));
    assert_eq!(touched(&d), BTreeSet::from(["shop/web:http".to_string()]));
    assert_eq!(routes_on(&m, "shop/web", "http", Protocol::Tcp), ["shop/r"]);

    // The same route again: nothing to publish.
    assert!(m.apply(Event::Apply(on_http.clone())).is_empty());

    // Moved to another Service: the old port loses it, the new one gains it.
    let on_other = one(&route(
        "shop",
        "r",
        "[{group: '', kind: Service, name: other}]",
    ));
    let d = m.apply(Event::Apply(on_other.clone()));
    assert_eq!(
        touched(&d),
        BTreeSet::from(["shop/web:http".to_string(), "shop/other:http".to_string()])
    );
    assert!(d.removals.is_empty(), "ports change, they are not removed");
    assert!(routes_on(&m, "shop/web", "http", Protocol::Tcp).is_empty());
    assert_eq!(
        routes_on(&m, "shop/other", "http", Protocol::Tcp),
        ["shop/r"]
    );

    // Widened to every port of web plus other: web's two TCP ports gain it, other is unchanged.
    let both = one(&route(
        "shop",
        "r",
        "[{group: '', kind: Service, name: web}, {group: '', kind: Service, name: other}]",
    ));
    let d = m.apply(Event::Apply(both));
    assert_eq!(
        touched(&d),
        BTreeSet::from(["shop/web:http".to_string(), "shop/web:admin".to_string()])
    );

    // A change of rules re-publishes every port the route is on.
    let mut changed = one(&route(
        "shop",
        "r",
        "[{group: '', kind: Service, name: web}, {group: '', kind: Service, name: other}]",
    ));
    if let Object::HttpRoute(r) = &mut changed {
        r.spec.rules = Some(vec![Default::default()]);
    }
    let d = m.apply(Event::Apply(changed.clone()));
    assert_eq!(touched(&d).len(), 3, "{:?}", touched(&d));

    // Deleted: every port it was on.
    let d = m.apply(Event::Delete(changed));
    assert_eq!(touched(&d).len(), 3);
    assert!(routes_on(&m, "shop/other", "http", Protocol::Tcp).is_empty());

    // A complete list without it after it came back: the same.
    m.apply(Event::Apply(on_other));
    let d = m.apply(Event::Replace {
        kind: Kind::HttpRoute,
        namespace: None,
        objects: vec![],
    });
    assert_eq!(touched(&d), BTreeSet::from(["shop/other:http".to_string()]));
}

#[test]
fn routes_wait_for_their_service_and_outlive_its_recreation() {
    let mut m = model(OTHER);
    let r = one(&route(
        "shop",
        "r",
        "[{group: '', kind: Service, name: web}]",
    ));
    assert!(
        m.apply(Event::Apply(r)).is_empty(),
        "no Service, nothing to publish"
    );
    let web = one(WEB);
    m.apply(Event::Apply(web.clone()));
    assert_eq!(routes_on(&m, "shop/web", "http", Protocol::Tcp), ["shop/r"]);
    m.apply(Event::Delete(web.clone()));
    m.apply(Event::Apply(web));
    assert_eq!(
        routes_on(&m, "shop/web", "admin", Protocol::Tcp),
        ["shop/r"]
    );
}

#[test]
fn a_namespaced_relist_only_forgets_routes_of_its_namespace() {
    let mut m = model(
        &[
            WEB.to_string(),
            route("shop", "a", "[{group: '', kind: Service, name: web}]"),
            route(
                "client",
                "b",
                "[{group: '', kind: Service, name: web, namespace: shop}]",
            ),
        ]
        .join("\n---\n"),
    );
    m.apply(Event::Replace {
        kind: Kind::HttpRoute,
        namespace: Some("client".into()),
        objects: vec![],
    });
    assert_eq!(routes_on(&m, "shop/web", "http", Protocol::Tcp), ["shop/a"]);
}

/// The first rule of `spec` (YAML under `spec:`) as proxies receive it.
fn proto_rule(spec: &str) -> pb::HttpRouteRule {
    let r = one(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n{spec}"
    ));
    let Object::HttpRoute(r) = r else {
        panic!("{r:?}")
    };
    let mut p = super::Route::new(&r).entry.to_proto();
    assert_eq!((p.namespace.as_str(), p.name.as_str()), ("shop", "r"));
    p.rules.remove(0)
}

fn path(t: pb::MatchType, value: &str) -> Option<pb::StringMatch> {
    Some(pb::StringMatch {
        r#type: t as i32,
        value: value.into(),
    })
}

fn named(t: pb::MatchType, name: &str, value: &str) -> pb::NamedMatch {
    pb::NamedMatch {
        r#type: t as i32,
        name: name.into(),
        value: value.into(),
    }
}

fn header(name: &str, value: &str) -> pb::HttpHeader {
    pb::HttpHeader {
        name: name.into(),
        value: value.into(),
    }
}

fn filter(kind: pb::http_filter::Kind) -> pb::HttpFilter {
    pb::HttpFilter { kind: Some(kind) }
}

fn backend(ns: &str, svc: &str, port: u32, weight: u32) -> pb::HttpBackendRef {
    pb::HttpBackendRef {
        namespace: ns.into(),
        service: svc.into(),
        port,
        weight,
        filters: vec![],
    }
}

#[test]
fn conversion_to_the_contract_fills_every_default() {
    use pb::MatchType::{Exact, PathPrefix, RegularExpression};
    use pb::http_filter::Kind as F;
    let prefix_root = pb::HttpRouteMatch {
        path: path(PathPrefix, "/"),
        ..Default::default()
    };
    // (spec, the first rule as proxies receive it)
    let cases: Vec<(&str, pb::HttpRouteRule)> = vec![
        (
            // No rules: one rule matching every path, no backends (500), nothing else set.
            "  parentRefs: [{group: '', kind: Service, name: web}]\n",
            pb::HttpRouteRule {
                matches: vec![prefix_root.clone()],
                ..Default::default()
            },
        ),
        (
            "  rules:\n  - name: api\n    matches:\n    - path: {type: Exact, value: /login}\n      headers: [{name: X-User, value: a}, {name: x-user, value: b}, {type: RegularExpression, name: X-Tier, value: 'gold|silver'}]\n      queryParams: [{name: Debug, value: '1'}]\n      method: POST\n    - headers: [{name: x-canary, value: 'yes'}]\n",
            pb::HttpRouteRule {
                name: "api".into(),
                matches: vec![
                    pb::HttpRouteMatch {
                        path: path(Exact, "/login"),
                        // Lower-cased; of two equivalent names the first counts.
                        headers: vec![
                            named(Exact, "x-user", "a"),
                            named(RegularExpression, "x-tier", "gold|silver"),
                        ],
                        // Query parameter names are case-sensitive: as written.
                        query_params: vec![named(Exact, "Debug", "1")],
                        method: "POST".into(),
                    },
                    pb::HttpRouteMatch {
                        path: path(PathPrefix, "/"),
                        headers: vec![named(Exact, "x-canary", "yes")],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        ),
        (
            "  rules:\n  - backendRefs:\n    - {name: web-v1, port: 80}\n    - {name: web-v2, namespace: beta, port: 8080, weight: 0, filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Version, value: '2'}]}}]}\n    - {group: multicluster.x-k8s.io, kind: ServiceImport, name: far, port: 80, weight: 5}\n",
            pb::HttpRouteRule {
                matches: vec![prefix_root.clone()],
                backends: vec![
                    // Namespace: the route's; weight 1.
                    backend("shop", "web-v1", 80, 1),
                    pb::HttpBackendRef {
                        filters: vec![filter(F::RequestHeaderModifier(pb::HeaderModifier {
                            set: vec![header("x-version", "2")],
                            ..Default::default()
                        }))],
                        ..backend("beta", "web-v2", 8080, 0)
                    },
                    // Not a Service: names nothing, so its share gets 500.
                    backend("shop", "", 80, 5),
                ],
                ..Default::default()
            },
        ),
        (
            "  rules:\n  - filters:\n    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-A, value: a}], add: [{name: X-B, value: b}], remove: [X-C]}}\n    - {type: ResponseHeaderModifier, responseHeaderModifier: {remove: [Server]}}\n    - {type: URLRewrite, urlRewrite: {hostname: api.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}\n    backendRefs: [{name: web, port: 80}]\n",
            pb::HttpRouteRule {
                matches: vec![prefix_root.clone()],
                filters: vec![
                    filter(F::RequestHeaderModifier(pb::HeaderModifier {
                        set: vec![header("x-a", "a")],
                        add: vec![header("x-b", "b")],
                        remove: vec!["x-c".into()],
                    })),
                    filter(F::ResponseHeaderModifier(pb::HeaderModifier {
                        remove: vec!["server".into()],
                        ..Default::default()
                    })),
                    filter(F::UrlRewrite(pb::UrlRewrite {
                        hostname: "api.internal".into(),
                        path: Some(pb::PathModifier {
                            r#type: pb::path_modifier::Type::ReplacePrefixMatch as i32,
                            value: "/v2".into(),
                        }),
                    })),
                ],
                backends: vec![backend("shop", "web", 80, 1)],
                ..Default::default()
            },
        ),
        (
            // Redirect: status 302 by default, port 0 (keep).
            "  rules: [{filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]}]\n",
            pb::HttpRouteRule {
                matches: vec![prefix_root.clone()],
                filters: vec![filter(F::RequestRedirect(pb::RequestRedirect {
                    scheme: "https".into(),
                    status_code: 302,
                    ..Default::default()
                }))],
                ..Default::default()
            },
        ),
        (
            "  rules: [{filters: [{type: RequestRedirect, requestRedirect: {hostname: b.example, port: 8443, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /moved}}}]}]\n",
            pb::HttpRouteRule {
                matches: vec![prefix_root.clone()],
                filters: vec![filter(F::RequestRedirect(pb::RequestRedirect {
                    scheme: String::new(),
                    hostname: "b.example".into(),
                    path: Some(pb::PathModifier {
                        r#type: pb::path_modifier::Type::ReplaceFullPath as i32,
                        value: "/moved".into(),
                    }),
                    port: 8443,
                    status_code: 301,
                }))],
                ..Default::default()
            },
        ),
        (
            // Durations in ms; "0s" is an explicit 0 (disabled), absent is None.
            "  rules: [{timeouts: {request: 1h30m}}]\n",
            pb::HttpRouteRule {
                matches: vec![prefix_root.clone()],
                request_timeout_ms: Some(5_400_000),
                ..Default::default()
            },
        ),
        (
            "  rules: [{timeouts: {request: 0s, backendRequest: 1500ms}}]\n",
            pb::HttpRouteRule {
                matches: vec![prefix_root.clone()],
                request_timeout_ms: Some(0),
                backend_request_timeout_ms: Some(1500),
                ..Default::default()
            },
        ),
        (
            // An empty retry: Gateway API's required codes, 1 retry, 25 ms backoff.
            "  rules: [{retry: {}}]\n",
            pb::HttpRouteRule {
                matches: vec![prefix_root.clone()],
                retry: Some(pb::HttpRetry {
                    codes: vec![500, 502, 503, 504],
                    attempts: 1,
                    backoff_ms: 25,
                }),
                ..Default::default()
            },
        ),
        (
            "  rules: [{retry: {codes: [503, 429], attempts: 3, backoff: 1s}}]\n",
            pb::HttpRouteRule {
                matches: vec![prefix_root.clone()],
                retry: Some(pb::HttpRetry {
                    codes: vec![503, 429],
                    attempts: 3,
                    backoff_ms: 1000,
                }),
                ..Default::default()
            },
        ),
    ];
    for (spec, want) in cases {
        assert_eq!(proto_rule(spec), want, "{spec}");
    }
}

#[test]
fn the_creation_time_is_the_tie_break() {
    let r = one(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop, creationTimestamp: '2026-01-02T03:04:05Z'}\nspec: {}\n",
    );
    let Object::HttpRoute(r) = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        super::Route::new(&r).entry.to_proto().created_unix,
        1_767_323_045
    );
}

#[test]
fn routes_show_in_the_table_view() {
    let m = model(
        &[
            WEB.to_string(),
            route("shop", "all", "[{group: '', kind: Service, name: web}]"),
        ]
        .join("\n---\n"),
    );
    let view = crate::view::select(&m, Some("shop"), Some("web"));
    let json = crate::view::render(&view, crate::view::Format::Json).expect("json");
    let v: serde_json::Value = serde_json::from_str(&json).expect("parses");
    let http = v["servicePorts"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["portName"] == "http")
        .expect("http");
    let r = &http["httpRoutes"][0];
    assert_eq!(
        (r["namespace"].as_str(), r["name"].as_str()),
        (Some("shop"), Some("all"))
    );
    assert_eq!(
        r["rules"][0]["matches"][0]["path"]["type"], "PathPrefix",
        "defaults shown"
    );
    assert_eq!(r["rules"][0]["backendRefs"][0]["weight"], 1);
    let dns = v["servicePorts"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["portName"] == "dns")
        .expect("dns");
    assert!(
        dns.get("httpRoutes").is_none(),
        "no key when there are no routes"
    );
    let text = crate::view::render(&view, crate::view::Format::Text).expect("text");
    assert!(
        text.contains("HTTPRoutes on shop/web:http/TCP: shop/all"),
        "{text}"
    );
}
