//! The folder source: loading, defaults, edits, deletions, malformed YAML, invalid objects.

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::source::{Event, HttpRoute, Kind, Object};

fn cidr() -> Cidr {
    Cidr::parse(DEFAULT_SERVICE_CIDR).expect("cidr")
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write");
}

fn service<'a>(
    folder: &'a Folder,
    ns: &str,
    name: &str,
) -> Option<&'a k8s_openapi::api::core::v1::Service> {
    folder.objects().find_map(|o| match o {
        Object::Service(s)
            if s.metadata.name.as_deref() == Some(name)
                && s.metadata.namespace.as_deref() == Some(ns) =>
        {
            Some(s)
        }
        _ => None,
    })
}

fn port_of(svc: &k8s_openapi::api::core::v1::Service) -> i32 {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(|p| p[0].port)
        .unwrap_or(0)
}

const WEB: &str = "
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec: {replicas: 1}
---
# a comment-only document is not a document
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.5]}]
";

#[test]
fn first_scan_loads_every_kind_with_api_server_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "web.yaml", WEB);
    let mut f = Folder::new(dir.path(), cidr());
    let report = f.scan().expect("scan");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.skipped.get("Deployment"), Some(&1));
    // A Replace and a Synced for each of the four kinds.
    let synced: Vec<Kind> = report
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Synced(k) => Some(*k),
            _ => None,
        })
        .collect();
    assert_eq!(synced, Kind::ALL);

    let svc = service(&f, "default", "web").expect("namespace defaults to default");
    let spec = svc.spec.as_ref().expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(
        spec.ports.as_ref().expect("ports")[0].protocol.as_deref(),
        Some("TCP")
    );
    let ip: std::net::IpAddr = spec
        .cluster_ip
        .as_deref()
        .expect("allocated")
        .parse()
        .expect("ip");
    assert!(cidr().contains(ip), "{ip} from the service CIDR");
    assert_eq!(spec.cluster_ips.as_deref(), Some(&[ip.to_string()][..]));

    let slice = f
        .objects()
        .find_map(|o| match o {
            Object::EndpointSlice(s) => Some(s),
            _ => None,
        })
        .expect("slice");
    let p = &slice.ports.as_ref().expect("ports")[0];
    assert_eq!(
        (p.name.as_deref(), p.protocol.as_deref()),
        (Some(""), Some("TCP"))
    );
}

#[test]
fn edits_and_deletions_become_apply_and_delete_events_only_for_what_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "web.yaml", WEB);
    write(
        dir.path(),
        "other.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: x}\nspec: {ports: [{port: 9000}]}\n",
    );
    let mut f = Folder::new(dir.path(), cidr());
    f.scan().expect("scan");
    let ip_before = service(&f, "default", "web")
        .and_then(|s| s.spec.clone())
        .and_then(|s| s.cluster_ip);

    write(
        dir.path(),
        "web.yaml",
        &WEB.replace("port: 80,", "port: 81,"),
    );
    let r = f.scan().expect("rescan");
    assert_eq!(r.events.len(), 1, "{:?}", r.events);
    match &r.events[0] {
        Event::Apply(Object::Service(s)) => assert_eq!(port_of(s), 81),
        e => panic!("unexpected {e:?}"),
    }
    let ip_after = service(&f, "default", "web")
        .and_then(|s| s.spec.clone())
        .and_then(|s| s.cluster_ip);
    assert_eq!(
        ip_before, ip_after,
        "an allocated clusterIP is stable across edits"
    );

    // Nothing changed: nothing sent.
    assert!(f.scan().expect("rescan").events.is_empty());

    std::fs::remove_file(dir.path().join("other.yaml")).expect("rm");
    let r = f.scan().expect("rescan");
    assert_eq!(r.events.len(), 1);
    assert!(
        matches!(&r.events[0], Event::Delete(Object::Service(s)) if s.metadata.name.as_deref() == Some("other"))
    );
}

#[test]
fn malformed_yaml_is_reported_with_file_document_and_line_and_the_last_good_version_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "web.yaml", WEB);
    write(
        dir.path(),
        "ok.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\nspec: {ports: [{port: 1}]}\n",
    );
    let mut f = Folder::new(dir.path(), cidr());
    f.scan().expect("scan");

    // Break the first document's YAML syntax: it cannot even say which object it is.
    let broken = WEB.replacen("metadata: {name: web}", "metadata: {name: web", 1);
    write(dir.path(), "web.yaml", &broken);
    let r = f.scan().expect("rescan");
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    let p = &r.problems[0];
    assert!(p.file.ends_with("web.yaml"));
    assert_eq!((p.document, p.line), (1, 2));
    assert!(p.reason.contains("not valid YAML"), "{}", p.reason);
    assert!(p.kept);
    let msg = p.to_string();
    assert!(
        msg.contains("web.yaml:2 (document 1)") && msg.ends_with("keeping the last good version"),
        "{msg}"
    );
    // The old Service is still in force; the slice in the same file is unaffected; nothing was
    // deleted or re-sent.
    assert!(r.events.is_empty(), "{:?}", r.events);
    assert_eq!(service(&f, "default", "web").map(port_of), Some(80));
    assert!(service(&f, "default", "ok").is_some());
}

#[test]
fn an_invalid_object_next_to_valid_ones_keeps_its_last_good_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let two = "
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns1}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: ns1}
spec: {ports: [{port: 80}]}
";
    write(dir.path(), "two.yaml", two);
    let mut f = Folder::new(dir.path(), cidr());
    f.scan().expect("scan");

    let edited = two.replacen("port: 80", "port: 70000", 1).replacen(
        "name: b, namespace: ns1}\nspec: {ports: [{port: 80}]}",
        "name: b, namespace: ns1}\nspec: {ports: [{port: 90}]}",
        1,
    );
    write(dir.path(), "two.yaml", &edited);
    let r = f.scan().expect("rescan");
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    let p = &r.problems[0];
    assert_eq!(
        p.object.as_ref().map(|k| k.to_string()).as_deref(),
        Some("Service ns1/a")
    );
    assert!(
        p.reason.contains("70000 is not a valid port"),
        "{}",
        p.reason
    );
    assert!(p.kept);
    assert_eq!(
        service(&f, "ns1", "a").map(port_of),
        Some(80),
        "last good version"
    );
    assert_eq!(
        service(&f, "ns1", "b").map(port_of),
        Some(90),
        "its neighbour changed normally"
    );
    assert_eq!(r.events.len(), 1, "{:#?}", r.events);

    // A type error is reported with the object too.
    write(
        dir.path(),
        "two.yaml",
        &two.replacen("port: 80", "port: eighty", 1),
    );
    let r = f.scan().expect("rescan");
    assert_eq!(r.problems.len(), 1);
    assert!(
        r.problems[0].to_string().contains("Service ns1/a"),
        "{}",
        r.problems[0]
    );

    // A new invalid object has nothing to keep: it is reported and absent.
    write(
        dir.path(),
        "new.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: c}\nspec: {ports: [{port: 1, protocol: QUIC}]}\n",
    );
    let r = f.scan().expect("rescan");
    let p = r
        .problems
        .iter()
        .find(|p| p.file.ends_with("new.yaml"))
        .expect("reported");
    assert!(!p.kept && p.reason.contains("QUIC"), "{p}");
    assert!(service(&f, "default", "c").is_none());
}

#[test]
fn validation_catches_what_the_api_server_would_refuse() {
    let cases = [
        ("spec: {ports: [{port: 80}, {port: 81}]}", "needs a name"),
        ("spec: {type: Magic, ports: [{port: 80}]}", "spec.type"),
        (
            "spec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 90000}}, ports: [{port: 80}]}",
            "timeoutSeconds 90000",
        ),
        (
            "spec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}",
            "clusterIP",
        ),
        ("spec: {type: ExternalName}", "externalName"),
        ("spec: {ports: []}", "spec.ports is empty"),
    ];
    for (spec, want) in cases {
        let doc = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\n{spec}\n");
        let docs = parse_file(&doc);
        match &docs[0].outcome {
            Outcome::Invalid { reason, .. } => assert!(reason.contains(want), "{spec}: {reason}"),
            o => panic!("{spec}: accepted: {o:?}"),
        }
    }
    let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: [{addresses: ['fd00::1']}]\n";
    assert!(
        matches!(&parse_file(slice)[0].outcome, Outcome::Invalid { reason, .. } if reason.contains("not an IPv4 address"))
    );
    assert!(matches!(
        &parse_file("kind: Service\n")[0].outcome,
        Outcome::Invalid { .. }
    ));
    assert!(matches!(
        &parse_file("- a\n- b\n")[0].outcome,
        Outcome::Invalid { .. }
    ));
}

#[test]
fn lists_are_expanded_and_explicit_cluster_ips_are_never_handed_out_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut items = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for i in 0..50 {
        items.push_str(&format!(
            "- {{apiVersion: v1, kind: Service, metadata: {{name: s{i}}}, spec: {{ports: [{{port: 80}}]}}}}\n"
        ));
    }
    write(dir.path(), "list.yaml", &items);
    // A /28 has 13 usable addresses beyond the network and first host; fill most of it by hand.
    let small = Cidr::parse("10.96.0.0/26").expect("cidr");
    let mut f = Folder::new(dir.path(), small);
    f.scan().expect("scan");
    let mut ips: Vec<String> = f
        .objects()
        .filter_map(|o| match o {
            Object::Service(s) => s.spec.as_ref().and_then(|s| s.cluster_ip.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ips.len(), 50);
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 50, "no two Services share an address");
    assert!(
        !ips.contains(&"10.96.0.1".to_string()),
        "the first host is left for `kubernetes`"
    );
}

#[tokio::test]
async fn the_running_source_follows_edits() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "web.yaml", WEB);
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(FolderSource::new(dir.path(), cidr()).run(tx));
    // The initial load: a Replace and a Synced per kind.
    for _ in 0..2 * Kind::ALL.len() {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("initial events")
            .expect("open");
    }
    write(
        dir.path(),
        "web.yaml",
        &WEB.replace("port: 80,", "port: 8081,"),
    );
    let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("change seen")
        .expect("open");
    assert!(
        matches!(ev, Event::Apply(Object::Service(ref s)) if port_of(s) == 8081),
        "{ev:?}"
    );
    drop(rx);
    // Closing the channel stops the source.
    let _ = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("source stops");
}

#[tokio::test]
async fn a_missing_folder_is_a_clear_error() {
    let (tx, _rx) = tokio::sync::mpsc::channel(4);
    let err = FolderSource::new("/nonexistent/wasmesh", cidr())
        .run(tx)
        .await
        .expect_err("fails");
    assert!(err.to_string().contains("/nonexistent/wasmesh"), "{err}");
}

const ROUTE: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-split}
spec:
  parentRefs: [{group: '', kind: Service, name: web}]
  rules:
  - backendRefs: [{name: web-v2, port: 80}]
";

fn route<'a>(folder: &'a Folder, ns: &str, name: &str) -> Option<&'a HttpRoute> {
    folder.objects().find_map(|o| match o {
        Object::HttpRoute(r)
            if r.metadata.name.as_deref() == Some(name)
                && r.metadata.namespace.as_deref() == Some(ns) =>
        {
            Some(r)
        }
        _ => None,
    })
}

#[test]
fn http_routes_are_read_with_defaults_and_a_broken_one_keeps_its_last_good_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "web.yaml", &format!("{WEB}\n---\n{ROUTE}"));
    let mut f = Folder::new(dir.path(), cidr());
    let r = f.scan().expect("scan");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert!(r.events.contains(&Event::Synced(Kind::HttpRoute)));
    let got = route(&f, "default", "web-split").expect("namespace defaults to default");
    let rules = got.spec.rules.as_ref().expect("rules");
    let backend = &rules[0].backend_refs[0];
    assert_eq!(backend.weight, Some(1));
    assert_eq!(backend.namespace.as_deref(), Some("default"));
    assert_eq!(
        rules[0].matches.as_ref().expect("matches")[0]
            .path
            .as_ref()
            .map(|p| p.value()),
        Some("/")
    );

    // A bad regular expression: reported with file, line, route and field; the last good
    // version stays in force.
    let broken = ROUTE.replace(
        "  - backendRefs",
        "  - matches: [{path: {type: RegularExpression, value: '/('}}]\n    backendRefs",
    );
    write(dir.path(), "web.yaml", &format!("{WEB}\n---\n{broken}"));
    let r = f.scan().expect("rescan");
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    let p = r.problems[0].to_string();
    assert!(
        p.contains("web.yaml:")
            && p.contains("(document 4)")
            && p.contains("HTTPRoute default/web-split: spec.rules[0].matches[0].path.value: \"/(\" is not a valid regular expression")
            && p.ends_with("keeping the last good version"),
        "{p}"
    );
    assert!(r.events.is_empty(), "{:?}", r.events);
    assert!(route(&f, "default", "web-split").is_some());

    // Fixed: one Apply.
    let fixed = ROUTE.replace("port: 80", "port: 8080");
    write(dir.path(), "web.yaml", &format!("{WEB}\n---\n{fixed}"));
    let r = f.scan().expect("rescan");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert!(
        matches!(&r.events[..], [Event::Apply(Object::HttpRoute(_))]),
        "{:?}",
        r.events
    );

    // Removed: one Delete.
    write(dir.path(), "web.yaml", WEB);
    let r = f.scan().expect("rescan");
    assert!(
        matches!(&r.events[..], [Event::Delete(Object::HttpRoute(_))]),
        "{:?}",
        r.events
    );
}

#[test]
fn http_route_versions_and_unknown_filters() {
    let v1beta1 = ROUTE.replace(
        "gateway.networking.k8s.io/v1",
        "gateway.networking.k8s.io/v1beta1",
    );
    assert!(
        matches!(&parse_file(&v1beta1)[0].outcome, Outcome::Objects(o) if matches!(&o[..], [Object::HttpRoute(_)])),
        "v1beta1 is read too"
    );
    let v1alpha2 = ROUTE.replace(
        "gateway.networking.k8s.io/v1",
        "gateway.networking.k8s.io/v1alpha2",
    );
    match &parse_file(&v1alpha2)[0].outcome {
        Outcome::Invalid { reason, .. } => assert!(reason.contains("v1alpha2"), "{reason}"),
        o => panic!("accepted: {o:?}"),
    }
    let unknown = ROUTE.replace(
        "  - backendRefs",
        "  - filters: [{type: Teleport}]\n    backendRefs",
    );
    match &parse_file(&unknown)[0].outcome {
        Outcome::Invalid { object, reason } => {
            assert_eq!(
                object.as_ref().map(|k| k.to_string()).as_deref(),
                Some("HTTPRoute default/web-split")
            );
            assert!(reason.contains("\"Teleport\""), "{reason}");
        }
        o => panic!("accepted: {o:?}"),
    }
    // A type error in the spec names the route too.
    let typo = ROUTE.replace("port: 80", "port: eighty");
    match &parse_file(&typo)[0].outcome {
        Outcome::Invalid { reason, .. } => {
            assert!(
                reason.starts_with("HTTPRoute default/web-split: "),
                "{reason}"
            )
        }
        o => panic!("accepted: {o:?}"),
    }
}

fn plugin_in<'a>(
    folder: &'a Folder,
    ns: &str,
    name: &str,
) -> Option<&'a crate::source::WasmPlugin> {
    folder.objects().find_map(|o| match o {
        Object::WasmPlugin(p)
            if p.metadata.name.as_deref() == Some(name)
                && p.metadata.namespace.as_deref() == Some(ns) =>
        {
            Some(p)
        }
        _ => None,
    })
}

fn wasm(tail: &str) -> Vec<u8> {
    let mut v = crate::source::wasmplugin::module::WASM_MAGIC.to_vec();
    v.extend_from_slice(tail.as_bytes());
    v
}

const PLUGIN: &str = "apiVersion: wasmesh.io/v1alpha1
kind: WasmPlugin
metadata: {name: auth, namespace: demo}
spec:
  url: file://filters/auth.wasm
  phase: AUTHN
";

#[test]
fn wasm_plugins_are_read_with_their_module_relative_to_the_manifest() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("demo/filters")).expect("mkdir");
    std::fs::write(dir.path().join("demo/filters/auth.wasm"), wasm("one")).expect("write");
    write(
        &dir.path().join("demo"),
        "plugin.yaml",
        &format!("{WEB}\n---\n{PLUGIN}"),
    );
    let mut f = Folder::new(dir.path(), cidr());
    let r = f.scan().expect("scan");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert!(r.events.contains(&Event::Synced(Kind::WasmPlugin)));
    let p = plugin_in(&f, "demo", "auth").expect("plugin");
    let m = p.module.as_ref().expect("module read");
    assert_eq!(m.path, dir.path().join("demo/filters/auth.wasm"));
    assert_eq!(&m.bytes[..], &wasm("one")[..]);
    let first_sha = m.sha256.clone();

    // Nothing changed: nothing sent.
    let r = f.scan().expect("rescan");
    assert!(r.events.is_empty(), "{:?}", r.events);

    // The module file changed (the manifest did not): the plugin again, with the new module.
    std::fs::write(dir.path().join("demo/filters/auth.wasm"), wasm("two")).expect("write");
    let r = f.scan().expect("rescan");
    let [Event::Apply(Object::WasmPlugin(p))] = &r.events[..] else {
        panic!("{:?}", r.events);
    };
    let second_sha = p.module.as_ref().expect("module").sha256.clone();
    assert_ne!(first_sha, second_sha);

    // Gone: reported with file, line, plugin and module path; the last good version (and its
    // bytes) stays.
    std::fs::remove_file(dir.path().join("demo/filters/auth.wasm")).expect("rm");
    let r = f.scan().expect("rescan");
    assert!(r.events.is_empty(), "{:?}", r.events);
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    let problem = r.problems[0].to_string();
    assert!(
        problem.contains("plugin.yaml:")
            && problem.contains("(document 4)")
            && problem.contains("WasmPlugin demo/auth: module ")
            && problem.contains("filters/auth.wasm: cannot read")
            && problem.ends_with("keeping the last good version"),
        "{problem}"
    );
    let kept = plugin_in(&f, "demo", "auth").expect("kept");
    assert_eq!(kept.module.as_ref().expect("module").sha256, second_sha);

    // A sha256 that does not match: refused the same way.
    std::fs::write(dir.path().join("demo/filters/auth.wasm"), wasm("three")).expect("write");
    let pinned = format!("{PLUGIN}  sha256: '{}'\n", "0".repeat(64));
    write(
        &dir.path().join("demo"),
        "plugin.yaml",
        &format!("{WEB}\n---\n{pinned}"),
    );
    let r = f.scan().expect("rescan");
    assert!(r.events.is_empty(), "{:?}", r.events);
    let problem = r.problems[0].to_string();
    assert!(
        problem.contains("WasmPlugin demo/auth: module ")
            && problem.contains("but spec.sha256 says 0000"),
        "{problem}"
    );

    // Fixed: one Apply. Removed: one Delete.
    write(
        &dir.path().join("demo"),
        "plugin.yaml",
        &format!("{WEB}\n---\n{PLUGIN}"),
    );
    let r = f.scan().expect("rescan");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert!(
        matches!(&r.events[..], [Event::Apply(Object::WasmPlugin(_))]),
        "{:?}",
        r.events
    );
    write(&dir.path().join("demo"), "plugin.yaml", WEB);
    let r = f.scan().expect("rescan");
    assert!(
        matches!(&r.events[..], [Event::Delete(Object::WasmPlugin(_))]),
        "{:?}",
        r.events
    );
}

#[test]
fn a_plugin_never_readable_is_left_out_and_oci_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let oci = PLUGIN
        .replace("name: auth", "name: pulled")
        .replace("file://filters/auth.wasm", "oci://ghcr.io/acme/auth:1");
    write(dir.path(), "p.yaml", &format!("{PLUGIN}---\n{oci}"));
    let mut f = Folder::new(dir.path(), cidr());
    let r = f.scan().expect("scan");
    assert!(plugin_in(&f, "demo", "auth").is_none());
    assert!(plugin_in(&f, "demo", "pulled").is_none());
    let problems: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].contains("p.yaml:1 (document 1)")
            && problems[0].contains("auth.wasm: cannot read")
            && problems[0].contains("not sent to proxies until its module can be read")
            && !problems[0].contains("keeping"),
        "{problems:?}"
    );
    assert!(
        problems[1].contains("p.yaml:8 (document 2)")
            && problems[1].contains("WasmPlugin demo/pulled: spec.url")
            && problems[1].contains("does not pull OCI images"),
        "{problems:?}"
    );
    let Event::Replace { objects, .. } = r
        .events
        .iter()
        .find(|e| {
            matches!(
                e,
                Event::Replace {
                    kind: Kind::WasmPlugin,
                    ..
                }
            )
        })
        .expect("a replace")
    else {
        unreachable!()
    };
    assert!(objects.is_empty());
}

#[test]
fn the_folders_of_modules_not_there_yet_are_watched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    let later = outside.path().join("later/deeper/auth.wasm");
    let here = outside.path().join("stats.wasm");
    let stats = PLUGIN.replace("name: auth", "name: stats").replace(
        "file://filters/auth.wasm",
        &format!("file://{}", here.display()),
    );
    write(
        dir.path(),
        "p.yaml",
        &format!(
            "{}---\n{stats}---\n{PLUGIN}",
            PLUGIN
                .replace(
                    "file://filters/auth.wasm",
                    &format!("file://{}", later.display())
                )
                .replace("name: auth", "name: later")
        ),
    );
    let mut f = Folder::new(dir.path(), cidr());
    let r = f.scan().expect("scan");
    assert_eq!(r.problems.len(), 3, "{:?}", r.problems);
    // Outside the root: the module's folder, or the nearest existing one above it. (The one
    // inside is watched with the manifests.)
    assert_eq!(
        f.module_dirs_outside().into_iter().collect::<Vec<_>>(),
        [outside.path().to_path_buf()]
    );
    std::fs::create_dir_all(later.parent().expect("parent")).expect("mkdir");
    std::fs::write(&later, wasm("later")).expect("write");
    let r = f.scan().expect("rescan");
    assert!(
        matches!(&r.events[..], [Event::Apply(Object::WasmPlugin(p))] if p.metadata.name.as_deref() == Some("later")),
        "{:?}",
        r.events
    );
    assert_eq!(
        f.module_dirs_outside().into_iter().collect::<Vec<_>>(),
        [
            outside.path().to_path_buf(),
            later.parent().expect("parent").to_path_buf()
        ]
    );
}

#[tokio::test]
async fn a_module_outside_the_folder_is_watched_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let modules = tempfile::tempdir().expect("tempdir");
    let m = modules.path().join("auth.wasm");
    std::fs::write(&m, wasm("one")).expect("write");
    write(
        dir.path(),
        "p.yaml",
        &PLUGIN.replace(
            "file://filters/auth.wasm",
            &format!("file://{}", m.display()),
        ),
    );
    let mut source = FolderSource::new(dir.path(), cidr());
    // Far longer than the wait below: the change must come through the watch.
    source.resync = Duration::from_secs(600);
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let _task = tokio::spawn(source.run(tx));
    for _ in 0..2 * Kind::ALL.len() {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("initial events")
            .expect("open");
    }
    std::fs::write(&m, wasm("two")).expect("write");
    let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("change seen")
        .expect("open");
    let Event::Apply(Object::WasmPlugin(p)) = ev else {
        panic!("{ev:?}");
    };
    assert_eq!(&p.module.expect("module").bytes[8..], b"two");
}

fn policy<'a>(
    folder: &'a Folder,
    ns: &str,
    name: &str,
) -> Option<&'a crate::source::AuthorizationPolicy> {
    folder.objects().find_map(|o| match o {
        Object::AuthorizationPolicy(p)
            if p.metadata.name.as_deref() == Some(name)
                && p.metadata.namespace.as_deref() == Some(ns) =>
        {
            Some(p)
        }
        _ => None,
    })
}

const POLICIES: &str = "
apiVersion: wasmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [ns/default/sa/client], ports: [8080]}]
---
apiVersion: wasmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: strict, namespace: vault}
spec: {mtls: strict}
";

#[test]
fn authorization_policies_are_read_and_a_broken_one_keeps_its_last_good_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "web.yaml", WEB);
    write(dir.path(), "policies.yaml", POLICIES);
    let mut f = Folder::new(dir.path(), cidr());
    let r = f.scan().expect("scan");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert!(r.events.contains(&Event::Synced(Kind::AuthorizationPolicy)));
    let web = policy(&f, "default", "web").expect("namespace defaults to default");
    assert_eq!(
        web.spec.rules.as_ref().expect("rules")[0].from,
        Some(vec!["ns/default/sa/client".to_string()])
    );
    assert_eq!(
        policy(&f, "vault", "strict")
            .expect("strict")
            .spec
            .mtls
            .as_deref(),
        Some("strict")
    );

    // Each kind of mistake is named with file, document, line, policy and field; the last
    // good version stays, and nothing else in the folder is lost.
    for (broken, says) in [
        (
            POLICIES.replace("ns/default/sa/client", "client"),
            "AuthorizationPolicy default/web: spec.rules[0].from[0]: \"client\" names no client",
        ),
        (
            POLICIES.replace("ports: [8080]", "ports: [80800]"),
            "AuthorizationPolicy default/web: spec.rules[0].ports[0]: 80800 is not a port (1-65535)",
        ),
        (
            POLICIES.replace("  rules:", "  rulez:"),
            "AuthorizationPolicy default/web: unknown field `rulez`",
        ),
    ] {
        write(dir.path(), "policies.yaml", &broken);
        let r = f.scan().expect("rescan");
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        let p = r.problems[0].to_string();
        assert!(
            p.contains("policies.yaml:2 (document 1)")
                && p.contains(says)
                && p.ends_with("keeping the last good version"),
            "{p}"
        );
        assert!(r.events.is_empty(), "{:?}", r.events);
        assert!(policy(&f, "default", "web").is_some());
        assert!(policy(&f, "vault", "strict").is_some());
        assert!(service(&f, "default", "web").is_some());
    }
    // Another apiVersion of our kind is refused with what to use.
    write(
        dir.path(),
        "policies.yaml",
        &POLICIES.replace("wasmesh.io/v1alpha1", "wasmesh.io/v1"),
    );
    let r = f.scan().expect("rescan");
    assert!(
        r.problems.iter().any(|p| p
            .to_string()
            .contains("control reads wasmesh.io/v1alpha1 AuthorizationPolicy")),
        "{:?}",
        r.problems
    );

    // Changed: one Apply; removed: one Delete each.
    write(
        dir.path(),
        "policies.yaml",
        &POLICIES.replace("ns/default/sa/client", "ns/default/sa/other"),
    );
    let r = f.scan().expect("rescan");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert!(
        matches!(&r.events[..], [Event::Apply(Object::AuthorizationPolicy(p))] if p.id() == "default/web"),
        "{:?}",
        r.events
    );
    std::fs::remove_file(dir.path().join("policies.yaml")).expect("rm");
    let r = f.scan().expect("rescan");
    assert_eq!(r.events.len(), 2, "{:?}", r.events);
    assert!(
        r.events
            .iter()
            .all(|e| matches!(e, Event::Delete(Object::AuthorizationPolicy(_)))),
        "{:?}",
        r.events
    );
}
