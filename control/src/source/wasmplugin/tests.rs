//! Reading, defaulting and validating WasmPlugins, and reading their modules.

use std::path::Path;

use super::module::{WASM_MAGIC, sha256_hex};
use super::*;

/// A plugin in namespace `demo` with this spec (YAML, indented as under `spec:`).
fn plugin(spec: &str) -> Result<WasmPlugin, String> {
    let yaml = format!(
        "apiVersion: wasmesh.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: p, namespace: demo}}\nspec:\n{spec}"
    );
    let value: serde_json::Value = serde_saphyr::from_str(&yaml).map_err(|e| e.to_string())?;
    let mut p: WasmPlugin = serde_json::from_value(value).map_err(|e| e.to_string())?;
    default_and_validate(&mut p).map_err(|e| e.to_string())?;
    Ok(p)
}

const URL: &str = "  url: file:///modules/p.wasm\n";

#[test]
fn defaults() {
    let p = plugin(URL).expect("valid");
    let s = &p.spec;
    assert_eq!(s.type_.as_deref(), Some("HTTP"));
    assert_eq!(s.phase.as_deref(), Some("UNSPECIFIED_PHASE"));
    assert_eq!(s.fail_strategy.as_deref(), Some("FAIL_CLOSE"));
    assert!(s.match_.is_empty() && s.target_refs.is_empty() && s.selector.is_none());
    assert_eq!(p.module, None, "modules are read by the sources, not here");

    let p = plugin(&format!(
        "{URL}  match: [{{mode: UNDEFINED}}, {{ports: [{{number: 80}}]}}]\n  targetRef: {{kind: Service, group: '', name: web}}\n  sha256: {}\n",
        "AB".repeat(32)
    ))
    .expect("valid");
    let modes: Vec<_> = p.spec.match_.iter().map(|m| m.mode.as_deref()).collect();
    assert_eq!(
        modes,
        [Some("CLIENT_AND_SERVER"), Some("CLIENT_AND_SERVER")]
    );
    assert_eq!(p.spec.target_refs[0].name, "web", "targetRef folded in");
    assert_eq!(p.spec.sha256, Some("ab".repeat(32)), "sha256 lower-cased");
}

#[test]
fn every_field_is_read() {
    let p = plugin(
        "  selector: {matchLabels: {app: web}}
  targetRefs: [{kind: Service, group: '', name: web}, {kind: Service, name: api, namespace: demo}]
  url: file://filters/auth.wasm
  pluginName: auth_root
  pluginConfig: {header: x-auth, limits: {rps: 10}, list: [1, 2]}
  vmConfig: {env: [{name: MODE, value: strict}, {name: EMPTY}]}
  phase: AUTHN
  priority: 10
  failStrategy: FAIL_OPEN
  match: [{mode: SERVER, ports: [{number: 8080}]}]
  type: HTTP
",
    )
    .expect("valid");
    let s = &p.spec;
    assert_eq!(
        s.selector.as_ref().expect("selector").match_labels["app"],
        "web"
    );
    assert_eq!(s.target_refs.len(), 2);
    assert_eq!(s.plugin_name.as_deref(), Some("auth_root"));
    assert_eq!(
        s.plugin_config.as_ref().expect("config")["limits"]["rps"],
        10
    );
    assert_eq!(s.vm_config.as_ref().expect("vm").env.len(), 2);
    assert_eq!(
        (
            s.phase.as_deref(),
            s.priority,
            s.fail_strategy.as_deref(),
            s.match_[0].mode.as_deref(),
            s.match_[0].ports[0].number
        ),
        (
            Some("AUTHN"),
            Some(10),
            Some("FAIL_OPEN"),
            Some("SERVER"),
            8080
        )
    );
    assert_eq!(
        module_path(&s.url).expect("path"),
        Path::new("filters/auth.wasm")
    );
}

#[test]
fn invalid_specs_say_which_field_and_why() {
    let cases: &[(&str, &str)] = &[
        ("  url: ''\n", "spec.url: missing"),
        (
            "  url: oci://ghcr.io/acme/auth:1.0\n",
            "control does not pull OCI images",
        ),
        (
            "  url: https://example.com/auth.wasm\n",
            "control does not download modules over HTTP",
        ),
        (
            "  url: s3://bucket/auth.wasm\n",
            "scheme \"s3\" is not supported",
        ),
        (
            "  url: file:///m.wasm\n  type: NETWORK\n",
            "NETWORK plugins are not supported",
        ),
        (
            "  url: file:///m.wasm\n  type: UDP\n",
            "spec.type: \"UDP\" is not HTTP",
        ),
        (
            "  url: file:///m.wasm\n  phase: LATE\n",
            "spec.phase: \"LATE\" is not one of",
        ),
        (
            "  url: file:///m.wasm\n  failStrategy: RETRY\n",
            "spec.failStrategy: \"RETRY\"",
        ),
        (
            "  url: file:///m.wasm\n  sha256: abc\n",
            "spec.sha256: \"abc\" is not a sha256",
        ),
        (
            "  url: file:///m.wasm\n  sha256: 1234\n",
            "(quote it in YAML)",
        ),
        (
            "  url: file:///m.wasm\n  match: [{mode: BOTH}]\n",
            "spec.match[0].mode: \"BOTH\"",
        ),
        (
            "  url: file:///m.wasm\n  match: [{ports: [{number: 0}]}]\n",
            "spec.match[0].ports[0].number: 0 is not a port",
        ),
        (
            "  url: file:///m.wasm\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n",
            "wasmesh attaches plugins to Services only",
        ),
        (
            "  url: file:///m.wasm\n  targetRefs: [{kind: Service, name: web, namespace: other}]\n",
            "targets Services of its own namespace",
        ),
        (
            "  url: file:///m.wasm\n  pluginConfig: [1, 2]\n",
            "spec.pluginConfig: must be an object",
        ),
        (
            "  url: file:///m.wasm\n  vmConfig: {env: [{name: A, value: x}, {name: A}]}\n",
            "spec.vmConfig.env[1].name: \"A\" is given twice",
        ),
        (
            "  url: file:///m.wasm\n  vmConfig: {env: [{name: A, valueFrom: HOST}]}\n",
            "HOST is not supported",
        ),
    ];
    for (spec, want) in cases {
        let err = plugin(spec).expect_err(spec);
        assert!(err.contains(want), "{spec}: {err:?} should say {want:?}");
    }
}

#[test]
fn module_paths() {
    let base = Path::new("/manifests/demo");
    for (url, want) in [
        ("file:///modules/a.wasm", "/modules/a.wasm"),
        ("/modules/a.wasm", "/modules/a.wasm"),
        ("file://a.wasm", "/manifests/demo/a.wasm"),
        ("filters/a.wasm", "/manifests/demo/filters/a.wasm"),
        ("FILE:///x.wasm", "/x.wasm"),
    ] {
        assert_eq!(
            resolve_module_path(url, Some(base)).expect(url),
            Path::new(want),
            "{url}"
        );
    }
    let err = resolve_module_path("file://a.wasm", None).expect_err("relative without base");
    assert!(err.to_string().contains("give an absolute path"), "{err}");
}

fn wasm(tail: &[u8]) -> Vec<u8> {
    let mut v = WASM_MAGIC.to_vec();
    v.extend_from_slice(tail);
    v
}

fn loaded(dir: &Path, spec: &str) -> Result<WasmPlugin, String> {
    let mut p = plugin(spec)?;
    p.load_module(Some(dir), &mut ModuleCache::new())
        .map_err(|e| e.to_string())?;
    Ok(p)
}

#[test]
fn modules_are_read_hashed_and_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = wasm(b"one");
    std::fs::write(dir.path().join("p.wasm"), &bytes).expect("write");
    let sha = sha256_hex(&bytes);

    let p = loaded(dir.path(), "  url: file://p.wasm\n").expect("loads");
    let m = p.module.expect("module");
    assert_eq!(
        (m.sha256.as_str(), &m.bytes[..]),
        (sha.as_str(), &bytes[..])
    );
    assert_eq!(m.path, dir.path().join("p.wasm"));

    // The right sha256, in any case.
    loaded(
        dir.path(),
        &format!("  url: p.wasm\n  sha256: {}\n", sha.to_uppercase()),
    )
    .expect("matching sha256");

    // A mismatch names the plugin, the file, both hashes.
    let wrong = "0".repeat(64);
    let err =
        loaded(dir.path(), &format!("  url: p.wasm\n  sha256: '{wrong}'\n")).expect_err("mismatch");
    assert!(
        err.starts_with("WasmPlugin demo/p: module ")
            && err.contains(&dir.path().join("p.wasm").display().to_string())
            && err.contains(&sha)
            && err.contains(&wrong),
        "{err}"
    );

    // A missing file.
    let err = loaded(dir.path(), "  url: file://gone.wasm\n").expect_err("missing");
    assert!(
        err.starts_with("WasmPlugin demo/p: module ")
            && err.contains("gone.wasm: cannot read")
            && err.contains("No such file"),
        "{err}"
    );

    // Not Wasm.
    std::fs::write(dir.path().join("text.wasm"), "(module)").expect("write");
    let err = loaded(dir.path(), "  url: text.wasm\n").expect_err("not wasm");
    assert!(err.contains("not a binary Wasm module"), "{err}");

    // oci:// never gets as far as reading.
    let err = loaded(dir.path(), "  url: oci://ghcr.io/x/y:1\n").expect_err("oci");
    assert!(err.contains("does not pull OCI images"), "{err}");
}

#[test]
fn the_cache_reads_a_file_again_only_when_it_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.wasm");
    std::fs::write(&path, wasm(b"one")).expect("write");
    let mut cache = ModuleCache::new();
    let a = cache.read(&path, None).expect("read");
    let b = cache.read(&path, None).expect("cached");
    assert_eq!(a.sha256, b.sha256);
    std::fs::write(&path, wasm(b"two, longer")).expect("write");
    let c = cache.read(&path, None).expect("read again");
    assert_ne!(a.sha256, c.sha256);
    assert_eq!(&c.bytes[8..], b"two, longer");
    cache.retain(&Default::default());
    assert!(cache.is_empty());
}

#[test]
fn written_out_and_read_back_it_is_the_same_plugin() {
    let p = plugin(
        "  url: /m.wasm\n  pluginConfig: {a: 1}\n  match: [{mode: CLIENT, ports: [{number: 80}]}]\n",
    )
    .expect("valid");
    let json = serde_json::to_value(&p).expect("serialize");
    assert_eq!(json["apiVersion"], API_VERSION);
    assert_eq!(json["kind"], KIND);
    let mut back: WasmPlugin = serde_json::from_value(json).expect("read back");
    default_and_validate(&mut back).expect("valid");
    assert_eq!(back, p);
}

/// `examples/k8s/wasmplugin-crd.yaml` serves our group, version and plural, and its enums are
/// the values control accepts.
#[test]
fn the_example_crd_matches_what_control_reads() {
    let crd: serde_json::Value =
        serde_saphyr::from_str(include_str!("../../../../examples/k8s/wasmplugin-crd.yaml"))
            .expect("CRD YAML");
    let spec = &crd["spec"];
    assert_eq!(crd["metadata"]["name"], format!("{PLURAL}.{GROUP}"));
    assert_eq!(spec["group"], GROUP);
    assert_eq!(spec["names"]["kind"], KIND);
    assert_eq!(spec["names"]["plural"], PLURAL);
    let version = &spec["versions"][0];
    assert_eq!(version["name"], VERSION);
    let props = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .expect("enum")
            .iter()
            .map(|s| s.as_str().expect("string").to_string())
            .collect()
    };
    assert_eq!(strings(&props["phase"]["enum"]), PHASES);
    assert_eq!(strings(&props["failStrategy"]["enum"]), FAIL_STRATEGIES);
    assert_eq!(
        strings(&props["match"]["items"]["properties"]["mode"]["enum"]),
        MODES
    );
}
