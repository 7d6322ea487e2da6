//! The folder of Kubernetes YAML: what the user asked for.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file below the folder (hidden ones excepted), many
//! documents per file, `List`s expanded. Read: v1 Namespace, Pod, Service; apps/v1 Deployment;
//! discovery.k8s.io/v1 EndpointSlice. Services and EndpointSlices get the API server's defaults
//! from control's own folder code ([`wasmesh_control::source::folder::default_and_validate`]),
//! so both see the same objects. Other kinds control reads and wasmesh-local does not manage
//! (HTTPRoute, WasmPlugin, AuthorizationPolicy) are parsed and checked by control's code
//! ([`wasmesh_control::source::folder::objects_from_manifest`]) and handed to control as they
//! are; control ships AuthorizationPolicies to the sidecars. Anything else is skipped with a
//! note.
//!
//! A document that does not parse, or an object the API server would refuse, is reported with
//! file, line and reason; if its file loaded before, the file's last good version stays in
//! force. Files are re-parsed only when their text changed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, PodSpec, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use wasmesh_control::source::folder::{default_and_validate, objects_from_manifest};
use wasmesh_control::source::{Kind, Object, ObjectKey};

/// A namespaced object's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NsName {
    pub namespace: String,
    pub name: String,
}

impl NsName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for NsName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything the folder asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifests {
    pub namespaces: BTreeSet<String>,
    pub pods: BTreeMap<NsName, Pod>,
    pub deployments: BTreeMap<NsName, Deployment>,
    pub services: BTreeMap<NsName, Service>,
    pub slices: BTreeMap<NsName, EndpointSlice>,
    /// Objects only control reads (HTTPRoutes, WasmPlugins, AuthorizationPolicies), handed to
    /// it unchanged.
    pub control: BTreeMap<ObjectKey, Object>,
}

/// One object from the folder.
#[derive(Debug, Clone, PartialEq)]
pub enum Manifest {
    Namespace(String),
    Pod(NsName, Box<Pod>),
    Deployment(NsName, Box<Deployment>),
    Service(NsName, Box<Service>),
    Slice(NsName, Box<EndpointSlice>),
    /// A kind control reads and wasmesh-local does not manage (HTTPRoute, WasmPlugin,
    /// AuthorizationPolicy).
    Control(Box<Object>),
}

impl Manifest {
    fn describe(&self) -> String {
        match self {
            Manifest::Namespace(n) => format!("Namespace {n}"),
            Manifest::Pod(k, _) => format!("Pod {k}"),
            Manifest::Deployment(k, _) => format!("Deployment {k}"),
            Manifest::Service(k, _) => format!("Service {k}"),
            Manifest::Slice(k, _) => format!("EndpointSlice {k}"),
            Manifest::Control(o) => o.key().to_string(),
        }
    }
}

/// Something wrong in the folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based document index (0: the file as a whole).
    pub document: usize,
    pub line: usize,
    pub reason: String,
    /// The file's last good version stays in force.
    pub kept: bool,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.document > 0 {
            write!(f, ":{} (document {})", self.line, self.document)?;
        }
        write!(f, ": {}", self.reason)?;
        if self.kept {
            f.write_str("; keeping the file's last good version")?;
        }
        Ok(())
    }
}

/// A document of a kind wasmesh-local has no use for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub file: PathBuf,
    pub line: usize,
    pub kind: String,
    pub name: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: skipping {} {:?}: wasmesh-local has no use for this kind",
            self.file.display(),
            self.line,
            self.kind,
            self.name
        )
    }
}

/// The folder cannot be read at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the manifests folder {path}: {source}")]
pub struct FolderError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// One parsed document.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub index: usize,
    pub line: usize,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Objects(Vec<Manifest>),
    Skipped { kind: String, name: String },
    Invalid(String),
}

#[derive(Debug, Default)]
struct FileState {
    text: String,
    /// The objects of the last version of the file that loaded without problems.
    good: Vec<Manifest>,
    /// What the file contributes now.
    current: Vec<Manifest>,
}

/// What a scan found. Problems and skipped documents are reported for changed files only.
#[derive(Debug, Default)]
pub struct Scan {
    pub manifests: Manifests,
    pub problems: Vec<Problem>,
    pub skipped: Vec<Skipped>,
    /// Whether any file changed since the last scan.
    pub changed: bool,
}

/// The folder between scans.
#[derive(Debug)]
pub struct Reader {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

impl Reader {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            files: BTreeMap::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn scan(&mut self) -> Result<Scan, FolderError> {
        let paths = list_manifests(&self.root).map_err(|source| FolderError {
            path: self.root.clone(),
            source,
        })?;
        let mut scan = Scan::default();
        let mut files = BTreeMap::new();
        for path in paths {
            let known = self.files.contains_key(&path);
            let mut state = self.files.remove(&path).unwrap_or_default();
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    scan.problems.push(Problem {
                        file: path.clone(),
                        document: 0,
                        line: 0,
                        reason: format!("cannot read: {e}"),
                        kept: !state.current.is_empty(),
                    });
                    files.insert(path, state);
                    continue;
                }
            };
            if !known || text != state.text {
                scan.changed = true;
                let docs = parse_text(&text);
                let mut objects = Vec::new();
                let mut bad = Vec::new();
                for doc in docs {
                    match doc.outcome {
                        Outcome::Objects(o) => {
                            let base = path.parent().unwrap_or(Path::new("/"));
                            for m in o {
                                match with_module_path(m, base) {
                                    Ok(m) => objects.push(m),
                                    Err(reason) => bad.push((doc.index, doc.line, reason)),
                                }
                            }
                        }
                        Outcome::Skipped { kind, name } => scan.skipped.push(Skipped {
                            file: path.clone(),
                            line: doc.line,
                            kind,
                            name,
                        }),
                        Outcome::Invalid(reason) => bad.push((doc.index, doc.line, reason)),
                    }
                }
                let keep = !bad.is_empty() && !state.good.is_empty();
                for (document, line, reason) in bad.iter().cloned() {
                    scan.problems.push(Problem {
                        file: path.clone(),
                        document,
                        line,
                        reason,
                        kept: keep,
                    });
                }
                if keep {
                    state.current = state.good.clone();
                } else {
                    if bad.is_empty() {
                        state.good = objects.clone();
                    }
                    state.current = objects;
                }
                state.text = text;
            }
            files.insert(path, state);
        }
        // What is left was deleted.
        scan.changed |= !self.files.is_empty();
        self.files = files;

        let mut origin: BTreeMap<String, PathBuf> = BTreeMap::new();
        for (path, state) in &self.files {
            for m in &state.current {
                let what = m.describe();
                if let Some(other) = origin.insert(what.clone(), path.clone())
                    && scan.changed
                {
                    scan.problems.push(Problem {
                        file: path.clone(),
                        document: 0,
                        line: 0,
                        reason: format!(
                            "{what} is also defined in {}; using this one",
                            other.display()
                        ),
                        kept: false,
                    });
                }
                add(&mut scan.manifests, m.clone());
            }
        }
        Ok(scan)
    }
}

fn add(out: &mut Manifests, m: Manifest) {
    match m {
        Manifest::Namespace(n) => {
            out.namespaces.insert(n);
        }
        Manifest::Pod(k, p) => {
            out.namespaces.insert(k.namespace.clone());
            out.pods.insert(k, *p);
        }
        Manifest::Deployment(k, d) => {
            out.namespaces.insert(k.namespace.clone());
            out.deployments.insert(k, *d);
        }
        Manifest::Service(k, s) => {
            out.namespaces.insert(k.namespace.clone());
            out.services.insert(k, *s);
        }
        Manifest::Slice(k, s) => {
            out.namespaces.insert(k.namespace.clone());
            out.slices.insert(k, *s);
        }
        Manifest::Control(o) => {
            let key = o.key();
            if !key.namespace.is_empty() {
                out.namespaces.insert(key.namespace.clone());
            }
            out.control.insert(key, *o);
        }
    }
}

fn list_manifests(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !std::fs::metadata(root)?.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Splits a file on `---` lines and parses every document that is not empty.
pub fn parse_text(text: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut body = String::new();
    let mut start = 1;
    let flush = |body: &str, start: usize, docs: &mut Vec<Document>| {
        let blank = |l: &str| l.trim().is_empty() || l.trim_start().starts_with('#');
        if body.lines().all(blank) {
            return;
        }
        let skip = body.lines().take_while(|l| blank(l)).count();
        let index = docs.len() + 1;
        docs.push(Document {
            index,
            line: start + skip,
            outcome: parse_document(body),
        });
    };
    for (n, line) in text.lines().enumerate() {
        let t = line.trim_end();
        if t == "---" || t.starts_with("--- ") {
            flush(&body, start, &mut docs);
            body.clear();
            start = n + 2;
        } else {
            body.push_str(line);
            body.push('\n');
        }
    }
    flush(&body, start, &mut docs);
    docs
}

fn parse_document(body: &str) -> Outcome {
    let value: Value = match serde_saphyr::from_str(body) {
        Ok(v) => v,
        Err(e) => {
            let msg = e.to_string();
            return Outcome::Invalid(format!(
                "not valid YAML: {}",
                msg.lines().next().unwrap_or(&msg).trim()
            ));
        }
    };
    match objects(value) {
        Ok(Parsed::Objects(o)) => Outcome::Objects(o),
        Ok(Parsed::Skipped { kind, name }) => Outcome::Skipped { kind, name },
        Err(reason) => Outcome::Invalid(reason),
    }
}

enum Parsed {
    Objects(Vec<Manifest>),
    Skipped { kind: String, name: String },
}

fn objects(value: Value) -> Result<Parsed, String> {
    let Value::Object(map) = &value else {
        return Err("a manifest must be a mapping with apiVersion and kind".into());
    };
    let api = map.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = map
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("missing `kind`")?
        .to_string();
    if kind == "List" {
        let mut out = Vec::new();
        for item in map
            .get("items")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Parsed::Objects(o) = objects(item.clone())? {
                out.extend(o);
            }
        }
        return Ok(Parsed::Objects(out));
    }
    let meta = map.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let known = matches!(
        (api, kind.as_str()),
        ("v1", "Namespace" | "Pod" | "Service")
            | ("apps/v1", "Deployment")
            | ("discovery.k8s.io/v1", "EndpointSlice")
    );
    if !known {
        if matches!(
            kind.as_str(),
            "Namespace" | "Pod" | "Service" | "Deployment" | "EndpointSlice"
        ) {
            return Err(format!(
                "{kind} with apiVersion `{api}`: wasmesh-local reads v1 Namespace/Pod/Service, apps/v1 Deployment and discovery.k8s.io/v1 EndpointSlice"
            ));
        }
        return for_control(value, kind, name);
    }
    if name.is_empty() {
        return Err(format!("{kind} without metadata.name"));
    }
    if kind == "Namespace" {
        check_label(&name).map_err(|e| format!("Namespace {name:?}: {e}"))?;
        return Ok(Parsed::Objects(vec![Manifest::Namespace(name)]));
    }
    let key = NsName::new(namespace, name);
    let fail = |e: String| format!("{kind} {key}: {e}");
    check_label(&key.namespace).map_err(|e| fail(format!("metadata.namespace: {e}")))?;
    check_subdomain(&key.name).map_err(|e| fail(format!("metadata.name: {e}")))?;
    let m = match kind.as_str() {
        "Pod" => {
            let mut pod: Pod = typed(value).map_err(fail)?;
            pod.metadata.namespace = Some(key.namespace.clone());
            let spec = pod.spec.as_ref().ok_or_else(|| fail("no spec".into()))?;
            check_pod_spec(spec).map_err(fail)?;
            check_annotations(pod.metadata.annotations.as_ref()).map_err(fail)?;
            Manifest::Pod(key, Box::new(pod))
        }
        "Deployment" => {
            let mut d: Deployment = typed(value).map_err(fail)?;
            d.metadata.namespace = Some(key.namespace.clone());
            check_deployment(&d).map_err(fail)?;
            Manifest::Deployment(key, Box::new(d))
        }
        "Service" => {
            let svc: Service = typed(value).map_err(fail)?;
            let mut obj = Object::Service(svc);
            obj.meta_mut().namespace = Some(key.namespace.clone());
            default_and_validate(&mut obj).map_err(fail)?;
            let Object::Service(svc) = obj else {
                return Err(fail("not a Service".into()));
            };
            Manifest::Service(key, Box::new(svc))
        }
        _ => {
            let slice: EndpointSlice = typed(value).map_err(fail)?;
            let mut obj = Object::EndpointSlice(slice);
            obj.meta_mut().namespace = Some(key.namespace.clone());
            default_and_validate(&mut obj).map_err(fail)?;
            let Object::EndpointSlice(slice) = obj else {
                return Err(fail("not an EndpointSlice".into()));
            };
            Manifest::Slice(key, Box::new(slice))
        }
    };
    Ok(Parsed::Objects(vec![m]))
}

/// A WasmPlugin's module path relative to its manifest made absolute: control reads the
/// plugin from its own objects folder, the module from where the user put it.
fn with_module_path(m: Manifest, base: &Path) -> Result<Manifest, String> {
    match m {
        Manifest::Control(mut obj) => {
            if let Object::WasmPlugin(p) = obj.as_mut() {
                p.absolutize_module_url(base)
                    .map_err(|e| format!("WasmPlugin {}: {e}", p.id()))?;
            }
            Ok(Manifest::Control(obj))
        }
        other => Ok(other),
    }
}

/// A kind wasmesh-local does not read: handed to control if control reads it (and it is not
/// one of the kinds wasmesh-local makes itself, Nodes), else skipped.
fn for_control(value: Value, kind: String, name: String) -> Result<Parsed, String> {
    let managed_here = |k: Kind| {
        matches!(
            k,
            Kind::Service | Kind::EndpointSlice | Kind::Pod | Kind::Node
        )
    };
    match objects_from_manifest(value)? {
        Some(objs) if !objs.is_empty() && !objs.iter().any(|o| managed_here(o.kind())) => {
            for o in &objs {
                let key = o.key();
                check_label(&key.namespace)
                    .map_err(|e| format!("{key}: metadata.namespace: {e}"))?;
                check_subdomain(&key.name).map_err(|e| format!("{key}: metadata.name: {e}"))?;
            }
            Ok(Parsed::Objects(
                objs.into_iter()
                    .map(|o| Manifest::Control(Box::new(o)))
                    .collect(),
            ))
        }
        _ => Ok(Parsed::Skipped { kind, name }),
    }
}

fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// What a pod needs to run here: a command for every container (images are ignored).
fn check_pod_spec(spec: &PodSpec) -> Result<(), String> {
    if spec.containers.is_empty() {
        return Err("spec.containers is empty".into());
    }
    let mut names = BTreeSet::new();
    for (i, c) in spec.containers.iter().enumerate() {
        if !names.insert(c.name.as_str()) {
            return Err(format!(
                "spec.containers[{i}]: name {:?} is used twice",
                c.name
            ));
        }
        if c.command.as_ref().is_none_or(Vec::is_empty) {
            return Err(format!(
                "container {:?} has no `command`: wasmesh-local ignores images and runs the command on this machine, so every container needs one (e.g. command: [\"wasmesh-demo\", \"backend\"])",
                c.name
            ));
        }
        let mut port_names = BTreeSet::new();
        for p in c.ports.iter().flatten() {
            if !(1..=65535).contains(&p.container_port) {
                return Err(format!(
                    "container {:?}: containerPort {} is not a valid port",
                    c.name, p.container_port
                ));
            }
            if let Some(n) = &p.name
                && !port_names.insert(n.clone())
            {
                return Err(format!(
                    "container {:?}: port name {n:?} is used twice",
                    c.name
                ));
            }
        }
    }
    if let Some(p) = spec.restart_policy.as_deref()
        && !matches!(p, "Always" | "OnFailure" | "Never")
    {
        return Err(format!(
            "spec.restartPolicy {p:?} is not Always, OnFailure or Never"
        ));
    }
    if let Some(n) = spec.node_name.as_deref() {
        check_subdomain(n).map_err(|e| format!("spec.nodeName: {e}"))?;
    }
    Ok(())
}

fn check_deployment(d: &Deployment) -> Result<(), String> {
    let spec = d.spec.as_ref().ok_or("no spec")?;
    if spec.replicas.is_some_and(|r| r < 0) {
        return Err("spec.replicas is negative".into());
    }
    if spec
        .selector
        .match_expressions
        .as_ref()
        .is_some_and(|e| !e.is_empty())
    {
        return Err(
            "spec.selector.matchExpressions are not supported by wasmesh-local; use matchLabels"
                .into(),
        );
    }
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    if selector.is_empty() {
        return Err("spec.selector.matchLabels is empty".into());
    }
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in &selector {
        if labels.get(k) != Some(v) {
            return Err(format!(
                "spec.selector does not match the template's labels ({k}={v} is missing): `selector` does not match template `labels`"
            ));
        }
    }
    let pod = spec
        .template
        .spec
        .as_ref()
        .ok_or("spec.template.spec is missing")?;
    if pod.restart_policy.as_deref().is_some_and(|p| p != "Always") {
        return Err("spec.template.spec.restartPolicy must be Always in a Deployment".into());
    }
    check_pod_spec(pod).map_err(|e| format!("spec.template: {e}"))?;
    check_annotations(
        spec.template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref()),
    )
    .map_err(|e| format!("spec.template: {e}"))
}

/// The annotations wasmesh-local turns into sidecar flags, checked as the injector checks them:
/// `wasmesh.io/mtls` is `strict` or `permissive` (anything else would leave a sidecar that
/// cannot start, or a pod that is not as strict as asked).
fn check_annotations(annotations: Option<&BTreeMap<String, String>>) -> Result<(), String> {
    match annotations.and_then(|a| a.get(crate::pods::MTLS_MODE)) {
        None => Ok(()),
        Some(v) if v == "strict" || v == "permissive" => Ok(()),
        Some(v) => Err(format!(
            "annotation {}: {v:?} is not an mTLS mode: use \"strict\" (refuse plaintext) or \"permissive\"",
            crate::pods::MTLS_MODE
        )),
    }
}

/// RFC 1123 label: namespaces, and the parts of names.
fn check_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err(format!("{s:?} is longer than 63 characters"));
    }
    check_subdomain(s)?;
    if s.contains('.') {
        return Err(format!("{s:?} must not contain dots"));
    }
    Ok(())
}

/// RFC 1123 subdomain: object names. They become file and namespace names here, so this is
/// also what keeps `/` and `..` out of paths.
fn check_subdomain(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !s.contains("..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid name (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(yaml: &str) -> Outcome {
        let docs = parse_text(yaml);
        assert_eq!(docs.len(), 1, "{docs:?}");
        docs.into_iter()
            .next()
            .map(|d| d.outcome)
            .expect("one document")
    }

    #[test]
    fn kinds_are_read_skipped_or_refused() {
        let docs = parse_text(
            "# comment\napiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\n---\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec: {selector: {app: web}, ports: [{port: 80}]}\n",
        );
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0].line, 2);
        assert_eq!(
            docs[0].outcome,
            Outcome::Objects(vec![Manifest::Namespace("demo".into())])
        );
        assert_eq!(
            docs[1].outcome,
            Outcome::Skipped {
                kind: "ConfigMap".into(),
                name: "cfg".into()
            }
        );
        assert_eq!(docs[2].line, 11);
        let Outcome::Objects(o) = &docs[2].outcome else {
            panic!("{:?}", docs[2]);
        };
        let Manifest::Service(k, svc) = &o[0] else {
            panic!("{o:?}");
        };
        assert_eq!(k, &NsName::new("demo", "web"));
        // The API server's defaults, from control's folder code.
        let spec = svc.spec.as_ref().expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(
            spec.ports.as_ref().expect("ports")[0].protocol.as_deref(),
            Some("TCP")
        );
    }

    #[test]
    fn kinds_only_control_reads_are_handed_to_it() {
        let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: split, namespace: demo}\nspec:\n  parentRefs: [{group: '', kind: Service, name: backend}]\n  rules: [{backendRefs: [{name: backend, port: 80}]}]\n";
        let Outcome::Objects(o) = one(route) else {
            panic!("{route}");
        };
        let [Manifest::Control(obj)] = &o[..] else {
            panic!("{o:?}");
        };
        assert_eq!(obj.key().to_string(), "HTTPRoute demo/split");
        // Defaulted by control's code, as control's folder source would.
        let Object::HttpRoute(r) = obj.as_ref() else {
            panic!("{obj:?}");
        };
        let rules = r.spec.rules.as_ref().expect("rules");
        assert_eq!(rules[0].backend_refs[0].weight, Some(1));

        // Written to the objects folder, it reads back as the same route in control.
        let mut files = BTreeMap::new();
        let key = obj.key();
        crate::objects::add(
            &mut files,
            key.kind.api_version(),
            key.kind.as_str(),
            Some(&key.namespace),
            &key.name,
            obj,
        );
        let (name, text) = files.iter().next().expect("one file");
        assert_eq!(name, "httproute.demo.split.json");
        let docs = wasmesh_control::source::folder::parse_file(text);
        assert!(
            matches!(&docs[0].outcome, wasmesh_control::source::folder::Outcome::Objects(back) if back[..] == [obj.as_ref().clone()]),
            "{docs:?}"
        );

        // Refused as control would refuse it, with the reason.
        let bad = route.replace("port: 80", "port: 80, weight: -3");
        let Outcome::Invalid(reason) = one(&bad) else {
            panic!("{bad}");
        };
        assert!(
            reason.contains("HTTPRoute demo/split") && reason.contains("weight: -3"),
            "{reason}"
        );
        // AuthorizationPolicies go to control too (which ships them to the sidecars), checked
        // by the same code.
        let policy = "apiVersion: wasmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web, namespace: demo}\nspec:\n  rules: [{from: [ns/demo/sa/client], ports: [8080]}]\n";
        let Outcome::Objects(o) = one(policy) else {
            panic!("{policy}");
        };
        assert!(
            matches!(&o[..], [Manifest::Control(p)] if p.key().to_string() == "AuthorizationPolicy demo/web"),
            "{o:?}"
        );
        let Outcome::Invalid(reason) = one(&policy.replace("ns/demo/sa/client", "client")) else {
            panic!("accepted");
        };
        assert!(
            reason.contains("AuthorizationPolicy demo/web: spec.rules[0].from[0]"),
            "{reason}"
        );
        // Nodes are the mesh's own: skipped as before.
        let node = one("apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n");
        assert!(matches!(node, Outcome::Skipped { .. }), "{node:?}");
    }

    #[test]
    fn the_mtls_annotation_is_strict_or_permissive() {
        let pod = |mode: &str| {
            one(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, annotations: {{wasmesh.io/mtls: {mode}}}}}\nspec: {{containers: [{{name: c, command: [sleep, '1']}}]}}\n"
            ))
        };
        assert!(matches!(pod("strict"), Outcome::Objects(_)));
        assert!(matches!(pod("permissive"), Outcome::Objects(_)));
        let Outcome::Invalid(reason) = pod("Strict") else {
            panic!("accepted");
        };
        assert_eq!(
            reason,
            "Pod default/p: annotation wasmesh.io/mtls: \"Strict\" is not an mTLS mode: use \"strict\" (refuse plaintext) or \"permissive\""
        );
        let deployment = one(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchLabels: {app: x}}\n  template:\n    metadata: {labels: {app: x}, annotations: {wasmesh.io/mtls: strcit}}\n    spec: {containers: [{name: c, command: [sleep, '1']}]}\n",
        );
        let Outcome::Invalid(reason) = deployment else {
            panic!("{deployment:?}");
        };
        assert!(
            reason.contains("spec.template: annotation wasmesh.io/mtls: \"strcit\""),
            "{reason}"
        );
    }

    #[test]
    fn containers_need_a_command() {
        let out = one(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: nginx}]}\n",
        );
        let Outcome::Invalid(reason) = out else {
            panic!("{out:?}");
        };
        assert!(
            reason.contains("Pod default/p") && reason.contains("no `command`"),
            "{reason}"
        );
    }

    #[test]
    fn deployments_are_checked_like_the_api_server_does() {
        let out = one(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchLabels: {app: x}}\n  template:\n    metadata: {labels: {app: other}}\n    spec: {containers: [{name: c, command: [sleep, '1']}]}\n",
        );
        assert!(
            matches!(&out, Outcome::Invalid(r) if r.contains("does not match")),
            "{out:?}"
        );
        let out = one(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: prod}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: x}}\n  template:\n    metadata: {labels: {app: x}}\n    spec: {containers: [{name: c, command: [sleep, '1']}]}\n",
        );
        assert!(
            matches!(&out, Outcome::Objects(o) if matches!(&o[0], Manifest::Deployment(k, _) if k.name == "d" && k.namespace == "prod")),
            "{out:?}"
        );
    }

    #[test]
    fn names_that_would_make_bad_paths_are_refused() {
        for name in ["../x", "a/b", "A", "a_b", ""] {
            let out = one(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name:?}}}\nspec: {{containers: [{{name: c, command: [x]}}]}}\n"
            ));
            assert!(matches!(out, Outcome::Invalid(_)), "{name}: {out:?}");
        }
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.yaml");
        let good =
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";
        std::fs::write(&file, good).expect("write");
        let mut reader = Reader::new(dir.path());
        let scan = reader.scan().expect("scan");
        assert!(scan.changed);
        assert!(scan.problems.is_empty());
        assert_eq!(scan.manifests.services.len(), 1);
        let again = reader.scan().expect("scan");
        assert!(!again.changed);

        std::fs::write(&file, "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 70000}]}\n").expect("write");
        let scan = reader.scan().expect("scan");
        assert!(scan.changed);
        assert_eq!(scan.problems.len(), 1);
        assert!(scan.problems[0].kept, "{}", scan.problems[0]);
        assert!(
            scan.problems[0]
                .to_string()
                .contains("a.yaml:1 (document 1)"),
            "{}",
            scan.problems[0]
        );
        assert_eq!(scan.manifests.services.len(), 1);

        std::fs::remove_file(&file).expect("rm");
        let scan = reader.scan().expect("scan");
        assert!(scan.changed);
        assert!(scan.manifests.services.is_empty());
    }

    /// A WasmPlugin's module path is relative to the user's manifest; control reads the plugin
    /// from its objects folder elsewhere and must still find the module.
    #[test]
    fn a_wasm_plugin_reaches_control_with_its_module_from_the_users_folder() {
        let user = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(user.path().join("apps/filters")).expect("mkdir");
        let module = b"\0asm\x01\0\0\0local".to_vec();
        std::fs::write(user.path().join("apps/filters/auth.wasm"), &module).expect("write");
        std::fs::write(
            user.path().join("apps/plugin.yaml"),
            "apiVersion: wasmesh.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: auth, namespace: demo}\nspec:\n  selector: {matchLabels: {app: web}}\n  url: file://filters/auth.wasm\n",
        )
        .expect("write");
        let mut reader = Reader::new(user.path());
        let scan = reader.scan().expect("scan");
        assert!(scan.problems.is_empty(), "{:?}", scan.problems);
        let (key, obj) = scan.manifests.control.iter().next().expect("one object");
        assert_eq!(key.to_string(), "WasmPlugin demo/auth");
        let Object::WasmPlugin(p) = obj else {
            panic!("{obj:?}");
        };
        let abs = std::path::absolute(user.path().join("apps/filters/auth.wasm")).expect("abs");
        assert_eq!(p.spec.url, format!("file://{}", abs.display()));

        // Written to control's objects folder (somewhere else) and read by control's folder
        // source: the plugin comes with the module's bytes.
        let mut files = BTreeMap::new();
        crate::objects::add(
            &mut files,
            key.kind.api_version(),
            key.kind.as_str(),
            Some(&key.namespace),
            &key.name,
            obj,
        );
        let objects_dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in &files {
            std::fs::write(objects_dir.path().join(name), text).expect("write");
        }
        let mut folder = wasmesh_control::source::folder::Folder::new(
            objects_dir.path(),
            wasmesh_control::model::Cidr::parse("10.96.0.0/12").expect("cidr"),
        );
        let report = folder.scan().expect("control scans");
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        let loaded = folder
            .objects()
            .find_map(|o| match o {
                Object::WasmPlugin(p) => p.module.clone(),
                _ => None,
            })
            .expect("control read the plugin's module");
        assert_eq!(&loaded.bytes[..], &module[..]);

        // A refused URL is reported like any invalid document.
        std::fs::write(
            user.path().join("apps/plugin.yaml"),
            "apiVersion: wasmesh.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: auth, namespace: demo}\nspec: {url: 'https://example.com/a.wasm'}\n",
        )
        .expect("write");
        let scan = reader.scan().expect("scan");
        assert_eq!(scan.problems.len(), 1, "{:?}", scan.problems);
        assert!(
            scan.problems[0].to_string().contains("over HTTP"),
            "{}",
            scan.problems[0]
        );
    }
}
