//! Who is injected: the opt-in / opt-out / skip matrix, one row per case, through the webhook.

mod support;

use serde_json::{Value, json};
use support::*;
use wasmesh_injector::annotations::Source;
use wasmesh_injector::mutate::{NamespaceInjection, SkipReason};
use wasmesh_injector::webhook::Verdict;

use NamespaceInjection::{Enabled, NotEnabled, Unknown};

/// (namespace, namespace opted in?, pod label, pod annotation, hostNetwork, expected)
type Row = (
    &'static str,
    NamespaceInjection,
    Option<&'static str>,
    Option<&'static str>,
    bool,
    Want,
);

#[derive(Debug)]
enum Want {
    Inject,
    Skip(SkipReason),
}

fn not_opted_in(ns: &str) -> Want {
    Want::Skip(SkipReason::NotOptedIn(ns.to_owned()))
}

fn excluded(ns: &str) -> Want {
    Want::Skip(SkipReason::ExcludedNamespace(ns.to_owned()))
}

#[test]
fn opt_in_opt_out_and_skips() {
    use Want::*;
    let out_label = Skip(SkipReason::OptedOut(Source::Label));
    let out_annotation = Skip(SkipReason::OptedOut(Source::Annotation));
    let host = Skip(SkipReason::HostNetwork);
    // (namespace, namespace opted in?, pod label, pod annotation, hostNetwork, expected)
    let rows: Vec<Row> = vec![
        // Namespace opted in: everything not opted out.
        ("shop", Enabled, None, None, false, Inject),
        ("shop", Enabled, Some("true"), None, false, Inject),
        ("shop", Enabled, None, Some("true"), false, Inject),
        ("shop", Enabled, Some("false"), None, false, out_label),
        ("shop", Enabled, None, Some("false"), false, out_annotation),
        // The opt-out wins over an opt-in on the other field.
        (
            "shop",
            Enabled,
            Some("true"),
            Some("false"),
            false,
            Skip(SkipReason::OptedOut(Source::Annotation)),
        ),
        (
            "shop",
            Enabled,
            Some("false"),
            Some("true"),
            false,
            Skip(SkipReason::OptedOut(Source::Label)),
        ),
        // Namespace not opted in: only pods that opt in.
        ("shop", NotEnabled, None, None, false, not_opted_in("shop")),
        ("shop", NotEnabled, Some("true"), None, false, Inject),
        ("shop", NotEnabled, None, Some("true"), false, Inject),
        (
            "shop",
            NotEnabled,
            Some("true"),
            Some("false"),
            false,
            Skip(SkipReason::OptedOut(Source::Annotation)),
        ),
        // Offline (unknown namespace): everything not opted out, like `linkerd inject`.
        ("shop", Unknown, None, None, false, Inject),
        (
            "shop",
            Unknown,
            None,
            Some("false"),
            false,
            Skip(SkipReason::OptedOut(Source::Annotation)),
        ),
        // hostNetwork: never.
        (
            "shop",
            Enabled,
            None,
            None,
            true,
            Skip(SkipReason::HostNetwork),
        ),
        ("shop", NotEnabled, Some("true"), None, true, host),
        // The control plane's and Kubernetes' namespaces: never, whatever the pod says.
        (
            "wasmesh-system",
            Enabled,
            Some("true"),
            None,
            false,
            excluded("wasmesh-system"),
        ),
        (
            "wasmesh-system",
            Unknown,
            None,
            None,
            false,
            excluded("wasmesh-system"),
        ),
        (
            "kube-system",
            Enabled,
            None,
            Some("true"),
            false,
            excluded("kube-system"),
        ),
        (
            "kube-public",
            Unknown,
            None,
            None,
            false,
            excluded("kube-public"),
        ),
        (
            "kube-node-lease",
            Enabled,
            None,
            None,
            false,
            excluded("kube-node-lease"),
        ),
    ];
    for (i, (ns, injection, label, annotation, host_network, want)) in rows.into_iter().enumerate()
    {
        let mut pod = pod("p");
        if let Some(v) = label {
            pod["metadata"]["labels"]["wasmesh.io/inject"] = json!(v);
        }
        if let Some(v) = annotation {
            pod["metadata"]["annotations"] = json!({"wasmesh.io/inject": v});
        }
        if host_network {
            pod["spec"]["hostNetwork"] = json!(true);
        }
        let body = review_of(&pod, ns, false);
        let (answer, outcome) = respond(&body, injection);
        let row = format!(
            "row {i}: {ns} {injection:?} label={label:?} annotation={annotation:?} hostNetwork={host_network}"
        );
        assert_eq!(answer["response"]["allowed"], true, "{row}");
        match want {
            Want::Inject => {
                assert!(patch_of(&answer).is_some(), "{row}: want a patch");
                as_pod(&patched(&body, &answer));
            }
            Want::Skip(reason) => {
                assert!(patch_of(&answer).is_none(), "{row}: want no patch");
                assert_eq!(outcome.result, Verdict::Skipped(reason), "{row}");
                // A skip the user asked for (or that is policy) is silent.
                assert!(answer["response"].get("warnings").is_none(), "{row}");
            }
        }
    }
}

#[test]
fn an_inject_value_we_do_not_understand_is_not_a_yes() {
    for (label, annotation) in [
        (Some("yes"), None),
        (None, Some("enabled")),
        (Some("True "), None),
    ] {
        let mut pod = pod("p");
        if let Some(v) = label {
            pod["metadata"]["labels"]["wasmesh.io/inject"] = json!(v);
        }
        if let Some(v) = annotation {
            pod["metadata"]["annotations"] = json!({"wasmesh.io/inject": v});
        }
        let body = review_of(&pod, "shop", false);
        let (answer, _) = respond(&body, Enabled);
        assert!(patch_of(&answer).is_none(), "{label:?} {annotation:?}");
        let warning = answer["response"]["warnings"][0]
            .as_str()
            .unwrap_or_default();
        assert!(
            warning.starts_with("wasmesh: pod not injected: annotation wasmesh.io/inject: ")
                && warning.ends_with("is not \"true\" or \"false\""),
            "{warning}"
        );
    }
}

#[test]
fn namespace_from_the_object_wins_over_an_empty_request_namespace() {
    let mut pod: Value = pod("p");
    pod["metadata"]["namespace"] = json!("wasmesh-system");
    let body = review_of(&pod, "", false);
    let (_, outcome) = respond(&body, Enabled);
    assert_eq!(outcome.namespace, "wasmesh-system");
    assert_eq!(
        outcome.result,
        Verdict::Skipped(SkipReason::ExcludedNamespace("wasmesh-system".to_owned()))
    );
}
