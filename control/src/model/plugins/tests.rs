//! Plugins in the model: what proxies receive (defaults filled, mesh-wide in the root
//! namespace), and that a plugin change sends exactly that plugin and nothing else.

use std::collections::BTreeSet;

use wasmesh_api::discovery as pb;

use crate::model::{Delta, Model};
use crate::source::folder::{Outcome, parse_file};
use crate::source::wasmplugin::Module;
use crate::source::wasmplugin::module::WASM_MAGIC;
use crate::source::{Event, Kind, Object};

fn module(tag: &str) -> Module {
    let mut bytes = WASM_MAGIC.to_vec();
    bytes.extend_from_slice(tag.as_bytes());
    Module::from_bytes(format!("/modules/{tag}.wasm"), bytes)
}

/// A plugin from YAML (defaulted and validated as the folder source does), its module `tag`.
fn plugin(yaml: &str, tag: &str) -> Object {
    let mut docs = parse_file(yaml);
    let Outcome::Objects(mut objs) = docs.remove(0).outcome else {
        panic!("bad test YAML: {yaml}");
    };
    let Object::WasmPlugin(mut p) = objs.remove(0) else {
        panic!("not a plugin: {yaml}");
    };
    p.module = Some(module(tag));
    Object::WasmPlugin(p)
}

fn yaml(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: wasmesh.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  url: file:///modules/m.wasm\n{spec}"
    )
}

fn synced(m: &mut Model, plugins: Vec<Object>) {
    for kind in Kind::ALL {
        let objects = if kind == Kind::WasmPlugin {
            plugins.clone()
        } else {
            vec![]
        };
        m.apply(Event::Replace {
            kind,
            namespace: None,
            objects,
        });
        m.apply(Event::Synced(kind));
    }
}

fn ids(delta: &Delta) -> (Vec<String>, Vec<String>) {
    (
        delta.plugin_upserts.keys().cloned().collect(),
        delta.plugin_removals.iter().cloned().collect(),
    )
}

fn only_plugins(delta: &Delta) {
    assert!(
        delta.upserts.is_empty()
            && delta.removals.is_empty()
            && delta.node_upserts.is_empty()
            && delta.node_removals.is_empty(),
        "a plugin change touches nothing else: {delta:?}"
    );
}

#[test]
fn proxies_receive_every_field_with_defaults_filled() {
    let full = plugin(
        &yaml(
            "demo",
            "auth",
            "  selector: {matchLabels: {app: web}}
  targetRefs: [{kind: Service, group: '', name: web}]
  pluginName: auth_root
  pluginConfig: {header: x-auth, n: 1}
  vmConfig: {env: [{name: MODE, value: strict}]}
  phase: AUTHZ
  priority: -5
  failStrategy: FAIL_OPEN
  match: [{mode: SERVER, ports: [{number: 8080}]}, {mode: UNDEFINED}]
",
        ),
        "a",
    );
    let bare = plugin(&yaml("wasmesh-system", "stats", ""), "b");
    let mut m = Model::new();
    synced(&mut m, vec![full, bare]);
    let p = m.plugins()["demo/auth"].to_proto();
    let want = pb::WasmPlugin {
        namespace: "demo".into(),
        name: "auth".into(),
        selector: [("app".to_string(), "web".to_string())].into(),
        target_services: vec!["web".into()],
        sha256: module("a").sha256,
        module_size: 9,
        root_id: "auth_root".into(),
        plugin_config: br#"{"header":"x-auth","n":1}"#.to_vec(),
        vm_env: [("MODE".to_string(), "strict".to_string())].into(),
        phase: pb::wasm_plugin::Phase::Authz as i32,
        priority: -5,
        fail_strategy: pb::wasm_plugin::FailStrategy::FailOpen as i32,
        r#match: vec![
            pb::TrafficSelector {
                mode: pb::traffic_selector::Mode::Server as i32,
                ports: vec![8080],
            },
            pb::TrafficSelector {
                mode: pb::traffic_selector::Mode::ClientAndServer as i32,
                ports: vec![],
            },
        ],
        generation: 1,
        mesh_wide: false,
    };
    assert_eq!(p, want);

    let s = m.plugins()["wasmesh-system/stats"].to_proto();
    assert!(s.mesh_wide, "plugins in the root namespace are mesh-wide");
    assert_eq!(
        (s.phase, s.fail_strategy, s.priority, s.root_id.as_str()),
        (0, 0, 0, ""),
        "UNSPECIFIED_PHASE, FAIL_CLOSE"
    );
    assert!(s.plugin_config.is_empty(), "no pluginConfig: empty bytes");
    assert!(s.r#match.is_empty() && s.selector.is_empty());

    // Another root namespace.
    let mut m = Model::with_root_namespace("mesh");
    synced(
        &mut m,
        vec![plugin(&yaml("wasmesh-system", "stats", ""), "b")],
    );
    assert!(!m.plugins()["wasmesh-system/stats"].mesh_wide);
}

#[test]
fn a_plugin_change_is_a_delta_of_that_plugin_alone() {
    let mut m = Model::new();
    synced(&mut m, vec![plugin(&yaml("demo", "a", ""), "one")]);
    assert_eq!(m.plugins()["demo/a"].generation, 1);

    // Added.
    let d = m.apply(Event::Apply(plugin(&yaml("demo", "b", ""), "one")));
    only_plugins(&d);
    assert_eq!(ids(&d), (vec!["demo/b".to_string()], vec![]));

    // The same again: nothing.
    let d = m.apply(Event::Apply(plugin(&yaml("demo", "b", ""), "one")));
    assert!(d.is_empty(), "{d:?}");

    // Spec changed: that plugin, next generation.
    let d = m.apply(Event::Apply(plugin(
        &yaml("demo", "b", "  priority: 3\n"),
        "one",
    )));
    only_plugins(&d);
    assert_eq!(ids(&d), (vec!["demo/b".to_string()], vec![]));
    assert_eq!(d.plugin_upserts["demo/b"].generation, 2);

    // Module changed, spec not: a new sha256, next generation.
    let d = m.apply(Event::Apply(plugin(
        &yaml("demo", "b", "  priority: 3\n"),
        "two",
    )));
    let b = &d.plugin_upserts["demo/b"];
    assert_eq!(
        (b.sha256.as_str(), b.generation),
        (module("two").sha256.as_str(), 3)
    );
    assert_eq!(&b.module[8..], b"two");

    // Removed.
    let d = m.apply(Event::Delete(plugin(&yaml("demo", "a", ""), "one")));
    only_plugins(&d);
    assert_eq!(ids(&d), (vec![], vec!["demo/a".to_string()]));

    // A re-list without b removes it; one with a new plugin adds it.
    let d = m.apply(Event::Replace {
        kind: Kind::WasmPlugin,
        namespace: None,
        objects: vec![plugin(&yaml("other", "c", ""), "one")],
    });
    assert_eq!(
        ids(&d),
        (vec!["other/c".to_string()], vec!["demo/b".to_string()])
    );
    // A namespace-scoped re-list leaves other namespaces alone.
    let d = m.apply(Event::Replace {
        kind: Kind::WasmPlugin,
        namespace: Some("demo".into()),
        objects: vec![],
    });
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(
        m.plugins().keys().cloned().collect::<BTreeSet<_>>(),
        ["other/c".to_string()].into()
    );
}

#[test]
fn deltas_merge_plugin_changes() {
    let mut m = Model::new();
    synced(&mut m, vec![]);
    let mut d = m.apply(Event::Apply(plugin(&yaml("demo", "a", ""), "one")));
    d.merge(m.apply(Event::Delete(plugin(&yaml("demo", "a", ""), "one"))));
    assert_eq!(ids(&d), (vec![], vec!["demo/a".to_string()]));
    d.merge(m.apply(Event::Apply(plugin(&yaml("demo", "a", ""), "two"))));
    assert_eq!(ids(&d), (vec!["demo/a".to_string()], vec![]));
}
