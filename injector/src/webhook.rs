//! An admission.k8s.io/v1 AdmissionReview in, the AdmissionReview answer out; pure (the HTTP
//! side is [`crate::server`]).
//!
//! Answers follow the Kubernetes docs: the review comes back in the version it was sent, with
//! `response.uid` copied from the request, `allowed`, and for an injection
//! `patchType: "JSONPatch"` with `patch` the **base64 string** of the JSON Patch (kube-rs's
//! `AdmissionResponse` would write a JSON array of byte values, which Go's decoder happens to
//! accept but no document promises; we write the documented form).
//!
//! The injector's own failures never block a pod: a pod it cannot read is allowed unchanged with
//! a warning (`kubectl` prints it) and the cause is in the outcome for the log. Only a body that
//! is not an AdmissionReview at all is an error ([`ReviewError`], HTTP 400).

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::Value;

use crate::config::{Config, SidecarMode};
use crate::mutate::{Decision, NamespaceInfo, NamespaceInjection, SkipReason, mutate};

/// For the webhook that selects pods which opt in themselves (label `wasmesh.io/inject: "true"`)
/// in namespaces that did not: the namespace is *not* opted in.
pub const PATH_INJECT: &str = "/inject";
/// For the webhook whose namespaceSelector matches `wasmesh.io/inject=enabled`: the namespace
/// *is* opted in, every pod not opted out is injected.
pub const PATH_INJECT_NAMESPACE_ENABLED: &str = "/inject/namespace-enabled";

/// What each admission path tells about the namespace, `None` for other paths.
pub fn namespace_injection(path: &str) -> Option<NamespaceInjection> {
    match path {
        PATH_INJECT => Some(NamespaceInjection::NotEnabled),
        PATH_INJECT_NAMESPACE_ENABLED => Some(NamespaceInjection::Enabled),
        _ => None,
    }
}

const API_VERSION: &str = "admission.k8s.io/v1";
const KIND: &str = "AdmissionReview";

/// A body that cannot be answered with an AdmissionReview (HTTP 400 with this text). Messages
/// include their cause (nothing is chained).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("empty body: expected an admission.k8s.io/v1 AdmissionReview (JSON)")]
    EmptyBody,
    #[error("body is not an admission.k8s.io/v1 AdmissionReview: {0}")]
    NotAReview(serde_json::Error),
    #[error(
        "{kind} {api_version} is not supported: expected kind AdmissionReview, apiVersion \
         admission.k8s.io/v1 (set admissionReviewVersions: [v1] on the webhook)"
    )]
    Version { api_version: String, kind: String },
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("encoding the answer failed: {0}")]
    Encode(serde_json::Error),
}

/// The answer and what happened, for the log.
#[derive(Debug)]
pub struct Reviewed {
    /// The AdmissionReview to send back (JSON).
    pub body: Vec<u8>,
    pub outcome: Outcome,
}

/// One admission request, summarized for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub uid: String,
    pub namespace: String,
    /// The pod's name, or its `generateName` followed by `*` for controller-made pods.
    pub pod: String,
    pub dry_run: bool,
    pub result: Verdict,
}

/// What was done with the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Injected(SidecarMode),
    Skipped(SkipReason),
    /// Not a pod creation: nothing to do.
    Ignored(String),
    /// The injector could not handle the pod; it was allowed unchanged with a warning.
    Failed(String),
}

/// Answers one AdmissionReview. `injection` comes from the path the review was posted to.
pub fn review(
    body: &[u8],
    injection: NamespaceInjection,
    config: &Config,
) -> Result<Reviewed, ReviewError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ReviewError::EmptyBody);
    }
    // Pods (all the webhook is sent) are read straight into `Pod`; anything that does not
    // read as a pod review is read again generically, to answer it or say what is wrong.
    let request = match serde_json::from_slice::<AdmissionReview<Pod>>(body) {
        Ok(review) if is_v1(&review) => {
            Some(review.try_into().map_err(|_| ReviewError::NoRequest)?)
        }
        _ => None,
    };
    let (request, pod): (Request, Result<Pod, Unhandled>) = match request {
        Some(mut typed) => {
            let pod = pod_check(&typed).and_then(|()| {
                typed
                    .object
                    .take()
                    .ok_or_else(|| Unhandled::Fail("the request has no object".to_owned()))
            });
            (Request::of(&typed), pod)
        }
        None => {
            let review: AdmissionReview<DynamicObject> =
                serde_json::from_slice(body).map_err(ReviewError::NotAReview)?;
            if !is_v1(&review) {
                return Err(ReviewError::Version {
                    api_version: review.types.api_version,
                    kind: review.types.kind,
                });
            }
            let request: AdmissionRequest<DynamicObject> =
                review.try_into().map_err(|_| ReviewError::NoRequest)?;
            (Request::of(&request), pod_of(&request))
        }
    };
    let mut response = request.response;
    let mut outcome = Outcome {
        uid: request.uid.clone(),
        namespace: request.namespace.clone().unwrap_or_default(),
        pod: request.name.clone(),
        dry_run: request.dry_run,
        result: Verdict::Ignored(String::new()),
    };
    let mut patch = None;
    match pod {
        Err(Unhandled::Ignore(why)) => outcome.result = Verdict::Ignored(why),
        Err(Unhandled::Fail(why)) => {
            response.warnings = Some(vec![format!("wasmesh: pod not injected: {why}")]);
            outcome.result = Verdict::Failed(why);
        }
        Ok(pod) => {
            outcome.pod = display_name(&pod, &request.name);
            let namespace = match pod.metadata.namespace.as_deref() {
                Some(ns) if !ns.is_empty() => ns.to_owned(),
                _ => request.namespace.clone().unwrap_or_default(),
            };
            outcome.namespace.clone_from(&namespace);
            let info = NamespaceInfo {
                name: &namespace,
                injection,
            };
            let decision = mutate(&pod, &info, config);
            let warnings = decision.warnings().to_vec();
            if !warnings.is_empty() {
                response.warnings = Some(warnings);
            }
            match decision {
                Decision::Skip(skip) => outcome.result = Verdict::Skipped(skip.reason),
                Decision::Inject(injection) => match serde_json::to_vec(&injection.patch) {
                    Ok(bytes) => {
                        patch = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
                        let mode = injection.record.mode.parse().unwrap_or(config.default_mode);
                        outcome.result = Verdict::Injected(mode);
                    }
                    Err(e) => {
                        let why = format!("encoding the patch failed: {e}");
                        response
                            .warnings
                            .get_or_insert_with(Vec::new)
                            .push(format!("wasmesh: pod not injected: {why}"));
                        outcome.result = Verdict::Failed(why);
                    }
                },
            }
        }
    }

    let mut answer = serde_json::to_value(response.into_review()).map_err(ReviewError::Encode)?;
    if let (Some(patch), Some(Value::Object(r))) = (patch, answer.get_mut("response")) {
        r.insert("patchType".to_owned(), Value::from("JSONPatch"));
        r.insert("patch".to_owned(), Value::from(patch));
    }
    let body = serde_json::to_vec(&answer).map_err(ReviewError::Encode)?;
    Ok(Reviewed { body, outcome })
}

enum Unhandled {
    /// Not ours to handle (another kind, not a CREATE): allowed, no warning.
    Ignore(String),
    /// Ours, but unreadable: allowed with a warning.
    Fail(String),
}

fn is_v1<T: kube::core::Resource>(review: &AdmissionReview<T>) -> bool {
    review.types.api_version == API_VERSION && review.types.kind == KIND
}

/// Whether a request is for us: a Pod being created (not a subresource).
fn pod_check<T: kube::core::Resource>(request: &AdmissionRequest<T>) -> Result<(), Unhandled> {
    let kind = &request.kind;
    if !(kind.group.is_empty() && kind.kind == "Pod") {
        let group = if kind.group.is_empty() {
            "core"
        } else {
            &kind.group
        };
        return Err(Unhandled::Ignore(format!(
            "{}/{} {} is not a Pod",
            group, kind.version, kind.kind
        )));
    }
    if let Some(sub) = request.sub_resource.as_deref().filter(|s| !s.is_empty()) {
        return Err(Unhandled::Ignore(format!("subresource {sub}")));
    }
    if !matches!(request.operation, Operation::Create) {
        return Err(Unhandled::Ignore(format!(
            "operation {:?}: pods are only injected when created",
            request.operation
        )));
    }
    Ok(())
}

/// The pod of a generically read request.
fn pod_of(request: &AdmissionRequest<DynamicObject>) -> Result<Pod, Unhandled> {
    pod_check(request)?;
    let object = request
        .object
        .as_ref()
        .ok_or_else(|| Unhandled::Fail("the request has no object".to_owned()))?;
    serde_json::to_value(object)
        .and_then(serde_json::from_value::<Pod>)
        .map_err(|e| Unhandled::Fail(format!("the object is not a valid Pod: {e}")))
}

/// What the answer needs from a request, whichever way it was read.
struct Request {
    response: AdmissionResponse,
    uid: String,
    name: String,
    namespace: Option<String>,
    dry_run: bool,
}

impl Request {
    fn of<T: kube::core::Resource>(request: &AdmissionRequest<T>) -> Self {
        Self {
            response: AdmissionResponse::from(request),
            uid: request.uid.clone(),
            name: request.name.clone(),
            namespace: request.namespace.clone(),
            dry_run: request.dry_run,
        }
    }
}

fn display_name(pod: &Pod, request_name: &str) -> String {
    match (&pod.metadata.name, &pod.metadata.generate_name) {
        (Some(name), _) if !name.is_empty() => name.clone(),
        (_, Some(prefix)) if !prefix.is_empty() => format!("{prefix}*"),
        _ => request_name.to_owned(),
    }
}
