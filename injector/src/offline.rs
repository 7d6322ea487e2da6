//! `wasmesh-injector inject`: the webhook's mutation applied to YAML manifests, offline, like
//! `linkerd inject`.
//!
//! The input is split into documents on the raw text (`---` lines), so a document that is not
//! changed is written back byte for byte, comments and formatting included. Pods and the pod
//! templates of Deployments, StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers, Jobs
//! and CronJobs go through [`crate::mutate::mutate`] with the namespace's opt-in *unknown*:
//! there is no cluster to ask, so every pod not opted out is injected. Only the documents that
//! were injected are re-encoded; their leading comments are kept, comments inside them are not.
//! A `kind: List` is passed through unchanged (reported): split it into documents to inject it.
//!
//! YAML scalars mean what they mean to `kubectl`, which reads them by the field's type: a
//! document is read once untyped (YAML 1.1, `0644` is 420 and `no` is false, as go-yaml does)
//! and once into its `k8s_openapi` type, and every scalar of a field the type knows takes the
//! typed reading (so `name: N` stays the string "N" and `defaultMode: 0644` the number 420);
//! fields the type does not know keep the untyped reading. Every re-encoded document is read
//! back and compared with what was meant before it is written.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, ReplicationController};
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::{Config, SidecarMode};
use crate::mutate::{Decision, NamespaceInfo, NamespaceInjection, SkipReason, mutate};

/// The result of an `inject` run.
#[derive(Debug)]
pub struct Offline {
    /// The manifests, with the sidecar in every injected pod template.
    pub output: String,
    /// One line per object found, in order.
    pub reports: Vec<Report>,
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// 1-based document number.
    pub document: usize,
    /// 1-based line where the document starts.
    pub line: usize,
    /// `deployment/web`, `configmap/settings`, ...
    pub object: String,
    pub outcome: Outcome,
    pub warnings: Vec<String>,
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected(SidecarMode),
    Skipped(SkipReason),
    /// Not a workload: written back unchanged.
    PassedThrough,
    /// Holds pods the command does not reach (a `List`): written back unchanged.
    Unsupported(String),
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (document {}): ", self.object, self.document)?;
        match &self.outcome {
            Outcome::Injected(mode) => write!(f, "injected ({mode} sidecar)"),
            Outcome::Skipped(reason) => write!(f, "not injected: {reason}"),
            Outcome::PassedThrough => f.write_str("unchanged (no pod template)"),
            Outcome::Unsupported(why) => write!(f, "unchanged: {why}"),
        }
    }
}

/// A document that cannot be read or written; names it and its first line.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("document {document} (line {line}): not valid YAML: {reason}")]
    Yaml {
        document: usize,
        line: usize,
        reason: String,
    },
    #[error("document {document} (line {line}), {object}: {reason}")]
    Object {
        document: usize,
        line: usize,
        object: String,
        reason: String,
    },
}

/// One document of the input: the `---` line that opens it (if any) and its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Doc<'a> {
    /// 1-based line of the first line of `separator` or `body`.
    line: usize,
    separator: &'a str,
    body: &'a str,
}

impl Doc<'_> {
    fn raw(&self) -> String {
        [self.separator, self.body].concat()
    }
}

/// Splits on lines starting with `---` followed by a blank or the end of the line (YAML's
/// document marker, which cannot occur inside a document, not even in a block scalar).
fn split(input: &str) -> Vec<Doc<'_>> {
    let mut docs = Vec::new();
    let mut start = 0; // byte offset of the current document (its separator, if any)
    let mut body_start = 0;
    let mut doc_line = 1;
    let mut offset = 0;
    for (i, line) in input.split_inclusive('\n').enumerate() {
        if is_separator(line) {
            if offset > 0 {
                docs.push(Doc {
                    line: doc_line,
                    separator: &input[start..body_start],
                    body: &input[body_start..offset],
                });
            }
            start = offset;
            body_start = offset + line.len();
            doc_line = i + 1;
        }
        offset += line.len();
    }
    if offset > start || docs.is_empty() {
        docs.push(Doc {
            line: doc_line,
            separator: &input[start..body_start.min(input.len())],
            body: &input[body_start.min(input.len())..],
        });
    }
    docs
}

fn is_separator(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

/// A separator that carries nothing but the marker (and maybe a comment) can be kept as is.
fn bare_separator(separator: &str) -> bool {
    let rest = separator.trim_start_matches('-').trim();
    rest.is_empty() || rest.starts_with('#')
}

fn is_comment_or_blank(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

fn yaml_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.legacy_octal_numbers = true;
    options
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

/// Runs the mutation over every document of `input`.
pub fn inject(input: &str, config: &Config) -> Result<Offline, OfflineError> {
    let mut output = String::with_capacity(input.len() + input.len() / 2);
    let mut reports = Vec::new();
    for (i, doc) in split(input).into_iter().enumerate() {
        let number = i + 1;
        let text = doc.raw();
        if doc.body.lines().all(is_comment_or_blank) && bare_separator(doc.separator) {
            output.push_str(&text);
            continue;
        }
        let head: Option<Head> = serde_saphyr::from_str_with_options(&text, yaml_options())
            .map_err(|e| OfflineError::Yaml {
                document: number,
                line: doc.line,
                reason: e.to_string(),
            })?;
        let Some(head) = head else {
            output.push_str(&text);
            continue;
        };
        if template_path(&head).is_none() {
            let outcome = if head.kind.as_deref() == Some("List") {
                Outcome::Unsupported(
                    "the items of a List are not injected; put them in documents of their own"
                        .to_owned(),
                )
            } else {
                Outcome::PassedThrough
            };
            reports.push(Report {
                document: number,
                line: doc.line,
                object: object_name_from_head(&head, &text),
                outcome,
                warnings: Vec::new(),
            });
            output.push_str(&text);
            continue;
        }
        let err = |object: String, reason: String| OfflineError::Object {
            document: number,
            line: doc.line,
            object,
            reason,
        };
        let mut value: Value = serde_saphyr::from_str_with_options(&text, yaml_options())
            .map_err(|e| err(object_name_from_head(&head, &text), e.to_string()))?;
        let object = object_name(&value, &head);
        let typed = typed_value(&text, &head).map_err(|reason| err(object.clone(), reason))?;
        reconcile(&mut value, &typed);
        let (outcome, warnings) = inject_object(&mut value, &head, config)
            .map_err(|reason| err(object.clone(), reason))?;
        let changed = matches!(outcome, Outcome::Injected(_));
        reports.push(Report {
            document: number,
            line: doc.line,
            object: object.clone(),
            outcome,
            warnings,
        });
        if !changed {
            output.push_str(&text);
            continue;
        }
        let yaml = encode(&value).map_err(|reason| err(object, reason))?;
        if !doc.separator.is_empty() {
            output.push_str(if bare_separator(doc.separator) {
                doc.separator
            } else {
                "---\n"
            });
        }
        for line in doc.body.split_inclusive('\n') {
            if !is_comment_or_blank(line) {
                break;
            }
            output.push_str(line);
        }
        output.push_str(&yaml);
    }
    Ok(Offline { output, reports })
}

/// JSON path of the pod template inside an object of this kind; empty for a Pod itself.
fn template_path(head: &Head) -> Option<&'static [&'static str]> {
    let group = head
        .api_version
        .as_deref()
        .map(|v| v.rsplit_once('/').map_or("", |(g, _)| g))?;
    match (group, head.kind.as_deref()?) {
        ("", "Pod") => Some(&[]),
        ("", "ReplicationController") => Some(&["spec", "template"]),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => {
            Some(&["spec", "template"])
        }
        ("batch", "Job") => Some(&["spec", "template"]),
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// The document read into its `k8s_openapi` type, as JSON: scalars read by their field's type.
fn typed_value(text: &str, head: &Head) -> Result<Value, String> {
    fn read<T: DeserializeOwned + Serialize>(text: &str) -> Result<Value, String> {
        let typed: T = serde_saphyr::from_str_with_options(text, yaml_options())
            .map_err(|e| format!("not a valid object of its kind: {e}"))?;
        serde_json::to_value(&typed).map_err(|e| format!("re-encoding failed: {e}"))
    }
    match head.kind.as_deref().unwrap_or_default() {
        "Pod" => read::<Pod>(text),
        "ReplicationController" => read::<ReplicationController>(text),
        "Deployment" => read::<Deployment>(text),
        "StatefulSet" => read::<StatefulSet>(text),
        "DaemonSet" => read::<DaemonSet>(text),
        "ReplicaSet" => read::<ReplicaSet>(text),
        "Job" => read::<Job>(text),
        "CronJob" => read::<CronJob>(text),
        other => Err(format!("kind {other} has no pod template")),
    }
}

/// Every scalar of `untyped` that `typed` also has takes the typed value; the rest (fields the
/// type does not know) stays as it was read.
fn reconcile(untyped: &mut Value, typed: &Value) {
    match (untyped, typed) {
        (Value::Object(u), Value::Object(t)) => {
            for (key, value) in u.iter_mut() {
                if let Some(tv) = t.get(key) {
                    reconcile(value, tv);
                }
            }
        }
        (Value::Array(u), Value::Array(t)) if u.len() == t.len() => {
            for (value, tv) in u.iter_mut().zip(t) {
                reconcile(value, tv);
            }
        }
        (u, t) if !u.is_object() && !u.is_array() && !t.is_object() && !t.is_array() => {
            u.clone_from(t);
        }
        _ => {}
    }
}

/// Injects into the pod template of `object`.
fn inject_object(
    object: &mut Value,
    head: &Head,
    config: &Config,
) -> Result<(Outcome, Vec<String>), String> {
    let Some(path) = template_path(head) else {
        return Ok((Outcome::PassedThrough, Vec::new()));
    };
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut template = &mut *object;
    for key in path {
        template = template
            .get_mut(*key)
            .ok_or_else(|| format!("has no pod template at .{}", path.join(".")))?;
    }
    let Value::Object(fields) = template else {
        return Err(format!(".{} is not a mapping", path.join(".")));
    };
    // The patch adds under /metadata; a template without metadata gets an empty one.
    fields
        .entry("metadata")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    let pod: Pod = serde_json::from_value(template.clone())
        .map_err(|e| format!("the pod template is not valid: {e}"))?;
    let info = NamespaceInfo {
        name: &namespace,
        injection: NamespaceInjection::Unknown,
    };
    match mutate(&pod, &info, config) {
        Decision::Skip(skip) => Ok((Outcome::Skipped(skip.reason), skip.warnings)),
        Decision::Inject(injection) => {
            json_patch::patch(template, &injection.patch.0)
                .map_err(|e| format!("applying the patch failed: {e}"))?;
            let mode = injection.record.mode.parse().unwrap_or(config.default_mode);
            Ok((Outcome::Injected(mode), injection.warnings))
        }
    }
}

/// `deployment/web`, `pod/<generateName>*`, or the kind alone.
fn object_name(object: &Value, head: &Head) -> String {
    let kind = head.kind.as_deref().unwrap_or("object").to_lowercase();
    let meta = object.get("metadata");
    let get = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
    match (get("name"), get("generateName")) {
        (Some(n), _) if !n.is_empty() => format!("{kind}/{n}"),
        (_, Some(g)) if !g.is_empty() => format!("{kind}/{g}*"),
        _ => kind,
    }
}

fn object_name_from_head(head: &Head, text: &str) -> String {
    #[derive(Deserialize)]
    struct Named {
        #[serde(default)]
        metadata: Option<Value>,
    }
    let meta = serde_saphyr::from_str_with_options::<Named>(text, yaml_options())
        .ok()
        .and_then(|n| n.metadata)
        .unwrap_or(Value::Null);
    object_name(&serde_json::json!({ "metadata": meta }), head)
}

/// YAML for `value`, checked by reading it back.
fn encode(value: &Value) -> Result<String, String> {
    let mut yaml =
        serde_saphyr::to_string(value).map_err(|e| format!("encoding as YAML failed: {e}"))?;
    let back: Value = serde_saphyr::from_str_with_options(&yaml, yaml_options())
        .map_err(|e| format!("the YAML written does not read back: {e}"))?;
    if &back != value {
        return Err("the YAML written reads back differently; please report this".to_owned());
    }
    if !yaml.ends_with('\n') {
        yaml.push('\n');
    }
    Ok(yaml)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_document_markers_only() {
        let input = "# head\na: 1\n---\nb: |\n  --- not a marker\n--- # c\nc: 3\n---\n";
        let docs = split(input);
        let parts: Vec<(usize, &str, &str)> =
            docs.iter().map(|d| (d.line, d.separator, d.body)).collect();
        assert_eq!(
            parts,
            [
                (1, "", "# head\na: 1\n"),
                (3, "---\n", "b: |\n  --- not a marker\n"),
                (6, "--- # c\n", "c: 3\n"),
                (8, "---\n", ""),
            ]
        );
        let joined: String = docs.iter().map(Doc::raw).collect();
        assert_eq!(joined, input);
    }

    #[test]
    fn split_keeps_every_byte() {
        for input in [
            "",
            "---",
            "a: 1",
            "---\n---\n",
            "a: 1\r\n---\r\nb: 2",
            "----\n",
        ] {
            let joined: String = split(input).iter().map(Doc::raw).collect();
            assert_eq!(joined, input, "{input:?}");
        }
    }
}
