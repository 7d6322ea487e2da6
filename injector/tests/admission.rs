//! Real AdmissionReview requests through the webhook handler: decode the base64 patch, apply
//! it with json-patch, check the pod field by field, check it is a valid k8s_openapi Pod, and
//! feed it back (no patch the second time).

mod support;

use serde_json::{Value, json};
use support::*;
use wasmesh_injector::config::{Config, SidecarMode};
use wasmesh_injector::mutate::{NamespaceInjection, SkipReason};
use wasmesh_injector::webhook::{self, ReviewError, Verdict};

const ENABLED: NamespaceInjection = NamespaceInjection::Enabled;

/// The pod with everything the injector adds taken out again: must equal the original.
fn without_injection(mut pod: Value) -> Value {
    let spec = pod["spec"].as_object_mut().expect("spec");
    for list in ["initContainers", "containers"] {
        if let Some(Value::Array(cs)) = spec.get_mut(list) {
            cs.retain(|c| c["name"] != "wasmesh-init" && c["name"] != "wasmesh-proxy");
        }
    }
    if let Some(Value::Array(vs)) = spec.get_mut("volumes") {
        vs.retain(|v| {
            v.get("projected")
                .and_then(|p| p.pointer("/sources/0/serviceAccountToken/audience"))
                != Some(&json!("wasmesh-control"))
        });
    }
    for list in ["initContainers", "volumes"] {
        if spec.get(list) == Some(&json!([])) {
            spec.remove(list);
        }
    }
    let meta = pod["metadata"].as_object_mut().expect("metadata");
    if let Some(Value::Object(a)) = meta.get_mut("annotations") {
        a.remove("wasmesh.io/injected");
        if a.is_empty() {
            meta.remove("annotations");
        }
    }
    pod
}

#[test]
fn gke_review_gets_a_base64_patch_that_adds_the_sidecar() {
    let body = fixture("gke-pod-review.json");
    let (answer, outcome) = respond(&body, ENABLED);

    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(
        answer["response"]["uid"],
        "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4"
    );
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    assert!(
        answer["response"]["patch"].is_string(),
        "patch is a base64 string"
    );
    assert!(answer["response"].get("warnings").is_none());
    assert_eq!(outcome.result, Verdict::Injected(SidecarMode::Native));
    assert_eq!(outcome.namespace, "colin-coder");
    assert_eq!(outcome.pod, "echo-pod");

    // The annotation key is escaped in the patch path ("/" is "~1").
    let patch = patch_of(&answer).expect("a patch");
    let paths: Vec<String> = patch.0.iter().map(|op| op.path().to_string()).collect();
    assert_eq!(
        paths,
        [
            "/spec/initContainers",
            "/spec/volumes/-",
            "/metadata/annotations/wasmesh.io~1injected"
        ]
    );

    let original = fixture_json("gke-pod-review.json")["request"]["object"].clone();
    let pod = patched(&body, &answer);
    as_pod(&pod);

    // Native: the rules, then the proxy, as init containers; the app untouched.
    let inits = &pod["spec"]["initContainers"];
    assert_eq!(names(inits), ["wasmesh-init", "wasmesh-proxy"]);
    assert_eq!(pod["spec"]["containers"], original["spec"]["containers"]);

    let init = container(inits, "wasmesh-init");
    assert_eq!(
        command(init),
        [
            "wasmesh-proxy",
            "init",
            "--proxy-uid",
            "1337",
            "--inbound-port",
            "15006",
            "--outbound-port",
            "15001"
        ]
    );
    assert_eq!(init["image"], "ghcr.io/wasmesh/wasmesh:0.1.0");
    let sc = &init["securityContext"];
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["runAsNonRoot"], false);
    assert_eq!(sc["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));

    let proxy = container(inits, "wasmesh-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(
        command(proxy),
        [
            "wasmesh-proxy",
            "run",
            "--control",
            "http://wasmesh-control.wasmesh-system.svc:15010"
        ]
    );
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    assert_eq!(proxy["securityContext"]["runAsGroup"], 1337);
    assert_eq!(proxy["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        proxy["readinessProbe"]["httpGet"],
        json!({"path": "/ready", "port": 15000, "scheme": "HTTP"})
    );
    assert_eq!(
        proxy["startupProbe"]["httpGet"],
        json!({"path": "/ready", "port": 15000, "scheme": "HTTP"})
    );
    assert_eq!(
        proxy["livenessProbe"]["httpGet"],
        json!({"path": "/live", "port": 15000, "scheme": "HTTP"})
    );
    assert_eq!(
        proxy["ports"],
        json!([{"name": "http-admin", "containerPort": 15000, "protocol": "TCP"}])
    );
    assert_eq!(
        proxy["resources"],
        json!({"requests": {"cpu": "100m", "memory": "64Mi"}})
    );
    let env: Vec<(String, String)> = proxy["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().to_owned(),
                e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    let expected = [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_IP", "status.podIP"),
        ("NODE_NAME", "spec.nodeName"),
        ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ("WASMESH_POD_LABELS_FILE", ""),
        ("WASMESH_TOKEN_FILE", ""),
        ("WASMESH_WORKERS", ""),
    ]
    .map(|(a, b)| (a.to_owned(), b.to_owned()));
    assert_eq!(env, expected);
    // The labels (for WasmPlugin selectors) come from the downward API, in the token volume.
    let labels_file = proxy["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "WASMESH_POD_LABELS_FILE")
        .expect("labels file env");
    assert_eq!(
        labels_file["value"],
        "/var/run/secrets/wasmesh.io/serviceaccount/labels"
    );
    assert_eq!(
        proxy["volumeMounts"],
        json!([{"name": "wasmesh-token", "mountPath": "/var/run/secrets/wasmesh.io/serviceaccount", "readOnly": true}])
    );

    // The token volume is appended after the pod's own.
    let volumes = &pod["spec"]["volumes"];
    assert_eq!(volumes[0], original["spec"]["volumes"][0]);
    assert_eq!(
        volumes[1],
        json!({"name": "wasmesh-token", "projected": {"sources": [
            {"serviceAccountToken": {
                "audience": "wasmesh-control", "expirationSeconds": 3600, "path": "token"}},
            {"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}
        ]}})
    );

    // The record, next to the annotation the pod had.
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(
        annotations["kubectl.kubernetes.io/last-applied-configuration"],
        original["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
    );
    let record: Value = serde_json::from_str(
        annotations["wasmesh.io/injected"]
            .as_str()
            .expect("record is a string"),
    )
    .expect("record is JSON");
    assert_eq!(
        record,
        json!({"version": "0.1.0", "mode": "native", "initContainers": ["wasmesh-init", "wasmesh-proxy"],
               "containers": [], "volumes": ["wasmesh-token"]})
    );

    // Nothing else changed.
    assert_eq!(without_injection(pod), original);
}

#[test]
fn an_injected_pod_fed_back_gets_no_patch() {
    for (fixture_name, injection) in [
        ("gke-pod-review.json", ENABLED),
        ("deployment-pod-review.json", ENABLED),
        ("job-pod-review.json", ENABLED),
        ("statefulset-pod-review.json", ENABLED),
    ] {
        for mode in [SidecarMode::Native, SidecarMode::Classic] {
            let config = Config {
                default_mode: mode,
                ..Config::default()
            };
            let body = fixture(fixture_name);
            let (first, _) = respond_with(&body, injection, &config);
            assert!(
                patch_of(&first).is_some(),
                "{fixture_name} {mode}: injected"
            );
            let pod = patched(&body, &first);
            let namespace = fixture_json(fixture_name)["request"]["namespace"].clone();
            let again = review_of(&pod, namespace.as_str().unwrap_or_default(), false);
            let (second, outcome) = respond_with(&again, injection, &config);
            assert_eq!(second["response"]["allowed"], true);
            assert!(
                patch_of(&second).is_none(),
                "{fixture_name} {mode}: no second patch"
            );
            assert_eq!(
                outcome.result,
                Verdict::Skipped(SkipReason::AlreadyInjected)
            );
        }
    }
}

#[test]
fn kubernetes_docs_review_of_another_kind_is_allowed_unchanged() {
    let body = fixture("k8s-docs-scale-review.json");
    let (answer, outcome) = respond(&body, ENABLED);
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(
        answer["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(answer["response"]["allowed"], true);
    assert!(patch_of(&answer).is_none());
    assert!(answer["response"].get("warnings").is_none());
    assert_eq!(
        outcome.result,
        Verdict::Ignored("autoscaling/v1 Scale is not a Pod".to_owned())
    );
}

#[test]
fn deployment_pod_without_name_or_namespace_uses_the_request_namespace() {
    let body = fixture("deployment-pod-review.json");
    let (answer, outcome) = respond(&body, ENABLED);
    assert_eq!(outcome.namespace, "shop");
    assert_eq!(outcome.pod, "web-7d4b9c8f5d-*");
    assert_eq!(outcome.result, Verdict::Injected(SidecarMode::Native));
    let pod = patched(&body, &answer);
    as_pod(&pod);
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["wasmesh-init", "wasmesh-proxy"]
    );
    assert_eq!(names(&pod["spec"]["containers"]), ["web"]);
    // The name is still for the API server to generate.
    assert!(pod["metadata"].get("name").is_none());
    assert_eq!(pod["metadata"]["generateName"], "web-7d4b9c8f5d-");
    let original = fixture_json("deployment-pod-review.json")["request"]["object"].clone();
    assert_eq!(without_injection(pod), original);

    // The same pod in the control plane's namespace is left alone.
    let mut review = fixture_json("deployment-pod-review.json");
    review["request"]["namespace"] = json!("wasmesh-system");
    let (answer, outcome) = respond(&serde_json::to_vec(&review).unwrap_or_default(), ENABLED);
    assert!(patch_of(&answer).is_none());
    assert_eq!(
        outcome.result,
        Verdict::Skipped(SkipReason::ExcludedNamespace("wasmesh-system".to_owned()))
    );
}

#[test]
fn job_pod_native_and_classic() {
    let body = fixture("job-pod-review.json");

    // Native (default): the Job completes on its own; no warning.
    let (answer, outcome) = respond(&body, ENABLED);
    assert_eq!(outcome.pod, "migrate-*");
    assert!(answer["response"].get("warnings").is_none());
    let pod = patched(&body, &answer);
    as_pod(&pod);
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["wasmesh-init", "wasmesh-proxy"]
    );
    assert_eq!(names(&pod["spec"]["containers"]), ["migrate"]);
    // automountServiceAccountToken: false does not stop the projected token.
    assert_eq!(pod["spec"]["volumes"][0]["name"], "wasmesh-token");

    // Classic: the proxy first among containers, held until ready; the user is told how the
    // Job completes.
    let mut review = fixture_json("job-pod-review.json");
    review["request"]["object"]["metadata"]["annotations"]["wasmesh.io/sidecar-mode"] =
        json!("classic");
    let body = serde_json::to_vec(&review).unwrap_or_default();
    let (answer, outcome) = respond(&body, ENABLED);
    assert_eq!(outcome.result, Verdict::Injected(SidecarMode::Classic));
    let warnings = answer["response"]["warnings"]
        .as_array()
        .expect("a warning");
    assert_eq!(warnings.len(), 1);
    let w = warnings[0].as_str().unwrap_or_default();
    assert!(
        w.contains("restartPolicy Never") && w.contains("POST http://127.0.0.1:15000/quitquitquit"),
        "{w}"
    );
    let pod = patched(&body, &answer);
    as_pod(&pod);
    assert_eq!(names(&pod["spec"]["initContainers"]), ["wasmesh-init"]);
    assert_eq!(
        names(&pod["spec"]["containers"]),
        ["wasmesh-proxy", "migrate"]
    );
    let proxy = container(&pod["spec"]["containers"], "wasmesh-proxy");
    assert!(proxy.get("restartPolicy").is_none());
    assert_eq!(
        proxy["lifecycle"]["postStart"]["exec"]["command"],
        json!(["wasmesh-proxy", "wait", "--timeout-seconds", "120"])
    );
    let record: Value = serde_json::from_str(
        pod["metadata"]["annotations"]["wasmesh.io/injected"]
            .as_str()
            .unwrap_or_default(),
    )
    .expect("record");
    assert_eq!(record["mode"], "classic");
    assert_eq!(record["containers"], json!(["wasmesh-proxy"]));
    assert_eq!(record["initContainers"], json!(["wasmesh-init"]));
}

#[test]
fn statefulset_pod_keeps_its_init_containers_volumes_and_port_names() {
    let body = fixture("statefulset-pod-review.json");
    let original = fixture_json("statefulset-pod-review.json")["request"]["object"].clone();

    // Native: ours first, so the user's init container runs meshed.
    let (answer, outcome) = respond(&body, ENABLED);
    assert_eq!(outcome.pod, "db-0");
    let pod = patched(&body, &answer);
    as_pod(&pod);
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["wasmesh-init", "wasmesh-proxy", "init-permissions"]
    );
    let proxy = container(&pod["spec"]["initContainers"], "wasmesh-proxy");
    // The pod has a volume called wasmesh-token and a port called http-admin: ours get other
    // names, theirs are untouched.
    assert_eq!(proxy["volumeMounts"][0]["name"], "wasmesh-token-2");
    assert_eq!(proxy["ports"][0]["name"], "wasmesh-admin");
    let volumes = names(&pod["spec"]["volumes"]);
    assert_eq!(volumes, ["data", "wasmesh-token", "wasmesh-token-2"]);
    assert_eq!(
        pod["spec"]["volumes"][1],
        json!({"name": "wasmesh-token", "emptyDir": {}})
    );
    // The exclusion annotation reaches the init container.
    let init = container(&pod["spec"]["initContainers"], "wasmesh-init");
    assert_eq!(
        command(init)[8..],
        ["--exclude-inbound-ports".to_owned(), "9187".to_owned()]
    );
    let mut stripped = without_injection(pod);
    stripped["spec"]["volumes"]
        .as_array_mut()
        .expect("volumes")
        .retain(|v| v["name"] != "wasmesh-token-2");
    assert_eq!(stripped, original);

    // Classic: the rules after the user's init container (no proxy runs during init, so it
    // must not be blackholed), the proxy first among containers.
    let mut review = fixture_json("statefulset-pod-review.json");
    review["request"]["object"]["metadata"]["annotations"]["wasmesh.io/sidecar-mode"] =
        json!("classic");
    let body = serde_json::to_vec(&review).unwrap_or_default();
    let (answer, _) = respond(&body, ENABLED);
    let pod = patched(&body, &answer);
    as_pod(&pod);
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["init-permissions", "wasmesh-init"]
    );
    assert_eq!(
        names(&pod["spec"]["containers"]),
        ["wasmesh-proxy", "postgres", "exporter"]
    );
    // A long-running pod in classic mode: no warning.
    assert!(answer["response"].get("warnings").is_none());
}

#[test]
fn dry_run_gets_the_same_answer() {
    let mut review = fixture_json("deployment-pod-review.json");
    let wet = serde_json::to_vec(&review).unwrap_or_default();
    review["request"]["dryRun"] = json!(true);
    let dry = serde_json::to_vec(&review).unwrap_or_default();
    let (a, wet_outcome) = respond(&wet, ENABLED);
    let (b, dry_outcome) = respond(&dry, ENABLED);
    assert_eq!(a, b);
    assert!(!wet_outcome.dry_run);
    assert!(dry_outcome.dry_run);
}

#[test]
fn bare_pod_gets_whole_arrays_and_maps() {
    // No annotations, no init containers, no volumes, no ports: `add` of the whole field.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bare"},
        "spec": {"containers": [{"name": "app", "image": "busybox", "command": ["sleep", "3600"]}]}
    });
    let body = review_of(&pod, "default", false);
    let (answer, _) = respond(&body, ENABLED);
    let patch = patch_of(&answer).expect("patch");
    let paths: Vec<String> = patch.0.iter().map(|op| op.path().to_string()).collect();
    assert_eq!(
        paths,
        [
            "/spec/initContainers",
            "/spec/volumes",
            "/metadata/annotations"
        ]
    );
    let result = patched(&body, &answer);
    as_pod(&result);
    assert_eq!(without_injection(result), pod);
}

#[test]
fn annotation_keys_with_slashes_and_tildes_survive() {
    let mut pod = pod("odd");
    pod["metadata"]["annotations"] = json!({
        "example.com/a~b": "1",
        "example.com/path/with/slashes": "2",
        "wasmesh.io/inject": "true"
    });
    let body = review_of(&pod, "default", false);
    let (answer, _) = respond(&body, NamespaceInjection::NotEnabled);
    let result = patched(&body, &answer);
    let a = &result["metadata"]["annotations"];
    assert_eq!(a["example.com/a~b"], "1");
    assert_eq!(a["example.com/path/with/slashes"], "2");
    assert!(a["wasmesh.io/injected"].is_string());
    assert_eq!(a.as_object().map(|m| m.len()), Some(4));
}

#[test]
fn annotations_set_uid_resources_and_traffic_flags() {
    let mut pod = pod("tuned");
    pod["metadata"]["annotations"] = json!({
        "wasmesh.io/proxy-uid": "2102",
        "wasmesh.io/proxy-cpu": "200m",
        "wasmesh.io/proxy-memory": "128Mi",
        "wasmesh.io/proxy-cpu-limit": "1",
        "wasmesh.io/proxy-memory-limit": "256Mi",
        "traffic.wasmesh.io/exclude-inbound-ports": "8443, 9000-9100",
        "traffic.wasmesh.io/exclude-outbound-ports": "3306,5432",
        "traffic.wasmesh.io/exclude-outbound-ip-ranges": "169.254.169.254/32",
        "traffic.wasmesh.io/include-outbound-ip-ranges": "10.96.0.0/12,fd00::/108",
        "traffic.wasmesh.io/include-inbound-ports": "*"
    });
    let body = review_of(&pod, "default", false);
    let (answer, _) = respond(&body, ENABLED);
    let result = patched(&body, &answer);
    as_pod(&result);
    let inits = &result["spec"]["initContainers"];
    assert_eq!(
        command(container(inits, "wasmesh-init")),
        [
            "wasmesh-proxy",
            "init",
            "--proxy-uid",
            "2102",
            "--inbound-port",
            "15006",
            "--outbound-port",
            "15001",
            "--exclude-inbound-ports",
            "8443,9000-9100",
            "--exclude-outbound-ports",
            "3306,5432",
            "--exclude-outbound-cidrs",
            "169.254.169.254/32",
            "--include-outbound-cidrs",
            "10.96.0.0/12,fd00::/108",
            "--include-inbound-ports",
            "*"
        ]
    );
    let proxy = container(inits, "wasmesh-proxy");
    assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
    assert_eq!(proxy["securityContext"]["runAsGroup"], 2102);
    assert_eq!(
        proxy["resources"],
        json!({"requests": {"cpu": "200m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}})
    );
}

/// The injected proxy's variables with a plain value (not from the downward API).
fn proxy_env_values(body: &[u8], answer: &Value) -> Vec<(String, String)> {
    let result = patched(body, answer);
    as_pod(&result);
    container(&result["spec"]["initContainers"], "wasmesh-proxy")["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter(|e| e["value"].is_string())
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().to_owned(),
                e["value"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A pod with these annotations is let through untouched, with `warning` as the only warning,
/// and the outcome says why.
fn assert_not_injected(annotations: Value, warning: &str) {
    let mut pod = pod("typo");
    pod["metadata"]["annotations"] = annotations;
    let body = review_of(&pod, "default", false);
    let (answer, outcome) = respond(&body, ENABLED);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(patch_of(&answer).is_none());
    assert_eq!(answer["response"]["warnings"], json!([warning]));
    assert!(matches!(
        outcome.result,
        Verdict::Skipped(SkipReason::InvalidAnnotations(_))
    ));
}

#[test]
fn the_mtls_annotation_sets_the_sidecars_inbound_mode() {
    for mode in ["strict", "permissive"] {
        let mut pod = pod("vault");
        pod["metadata"]["annotations"] = json!({"wasmesh.io/mtls": mode});
        let body = review_of(&pod, "default", false);
        let (answer, _) = respond(&body, ENABLED);
        let env = proxy_env_values(&body, &answer);
        assert!(
            env.contains(&("WASMESH_INBOUND_MTLS".to_owned(), mode.to_owned())),
            "{env:?}"
        );
    }
    // Without the annotation the proxy's default applies: no variable.
    let body = review_of(&pod("plain"), "default", false);
    let (answer, _) = respond(&body, ENABLED);
    assert!(
        proxy_env_values(&body, &answer)
            .iter()
            .all(|(k, _)| k != "WASMESH_INBOUND_MTLS")
    );
    // A value that is neither: no sidecar, and a warning that says what to write.
    assert_not_injected(
        json!({"wasmesh.io/mtls": "strcit"}),
        "wasmesh: pod not injected: annotation wasmesh.io/mtls: \"strcit\" is not an mTLS mode: use \"strict\" (refuse plaintext) or \"permissive\"",
    );
}

#[test]
fn the_sidecar_runs_two_workers_unless_a_cpu_limit_or_the_annotation_says_otherwise() {
    let workers_of = |annotations: Value| -> Option<String> {
        let mut pod = pod("web");
        pod["metadata"]["annotations"] = annotations;
        let body = review_of(&pod, "default", false);
        let (answer, _) = respond(&body, ENABLED);
        proxy_env_values(&body, &answer)
            .into_iter()
            .find_map(|(k, v)| (k == "WASMESH_WORKERS").then_some(v))
    };
    // No CPU limit: two workers, not one per CPU of the node.
    assert_eq!(workers_of(json!({})).as_deref(), Some("2"));
    // A CPU limit: the proxy sizes itself by its cgroup quota.
    assert_eq!(
        workers_of(json!({"wasmesh.io/proxy-cpu-limit": "1500m"})),
        None
    );
    // The annotation wins over both.
    assert_eq!(
        workers_of(json!({"wasmesh.io/proxy-workers": "4"})).as_deref(),
        Some("4")
    );
    assert_eq!(
        workers_of(json!({"wasmesh.io/proxy-workers": "1", "wasmesh.io/proxy-cpu-limit": "2"}))
            .as_deref(),
        Some("1")
    );
    // Zero workers would be a proxy that never starts: no sidecar, and a warning.
    assert_not_injected(
        json!({"wasmesh.io/proxy-workers": "0"}),
        "wasmesh: pod not injected: annotation wasmesh.io/proxy-workers: \"0\" is not a number of worker threads (a whole number from 1 to 65535)",
    );
}

#[test]
fn invalid_annotations_mean_no_injection_and_a_warning_per_value() {
    assert_not_injected(
        json!({
            "traffic.wasmesh.io/exclude-inbound-ports": "80,http",
            "wasmesh.io/sidecar-mode": "sidecar"
        }),
        "wasmesh: pod not injected: annotation wasmesh.io/sidecar-mode: \"sidecar\" is not a sidecar mode: use \"native\" or \"classic\"; annotation traffic.wasmesh.io/exclude-inbound-ports: \"80,http\" has \"http\", which is not a port",
    );
}

#[test]
fn conflicts_are_skipped_with_a_warning() {
    let cases = [
        (
            json!([{"name": "app", "image": "a", "ports": [{"containerPort": 15001}]}]),
            "wasmesh: pod not injected: container \"app\" declares port 15001, which the proxy listens on (15000 admin, 15001 outbound, 15006 inbound); change the app's port",
        ),
        (
            json!([{"name": "app", "image": "a"}, {"name": "istio-proxy", "image": "istio/proxyv2"}]),
            "wasmesh: pod not injected: the pod already has \"istio-proxy\", another service mesh's container; use one mesh per pod",
        ),
        (
            json!([{"name": "wasmesh-proxy", "image": "a"}]),
            "wasmesh: pod not injected: the pod already has a container named \"wasmesh-proxy\" but no wasmesh.io/injected annotation; rename the container or remove it to let the injector add its own",
        ),
    ];
    for (containers, warning) in cases {
        let mut pod = pod("conflict");
        pod["spec"]["containers"] = containers;
        let body = review_of(&pod, "default", false);
        let (answer, _) = respond(&body, ENABLED);
        assert!(patch_of(&answer).is_none());
        assert_eq!(answer["response"]["warnings"], json!([warning]));
    }
}

#[test]
fn app_running_as_the_proxy_uid_is_warned_about() {
    let mut pod = pod("same-uid");
    pod["spec"]["securityContext"] = json!({"runAsUser": 1337});
    let body = review_of(&pod, "default", false);
    let (answer, _) = respond(&body, ENABLED);
    assert!(patch_of(&answer).is_some());
    let w = answer["response"]["warnings"][0]
        .as_str()
        .unwrap_or_default();
    assert!(w.contains("container \"app\" runs as UID 1337"), "{w}");
}

#[test]
fn an_unreadable_pod_is_allowed_with_a_warning() {
    let mut pod = pod("broken");
    pod["spec"]["containers"] = json!("not a list");
    let body = review_of(&pod, "default", false);
    let (answer, outcome) = respond(&body, ENABLED);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(patch_of(&answer).is_none());
    let w = answer["response"]["warnings"][0]
        .as_str()
        .unwrap_or_default();
    assert!(
        w.starts_with("wasmesh: pod not injected: the object is not a valid Pod:"),
        "{w}"
    );
    assert!(matches!(outcome.result, Verdict::Failed(_)));
}

#[test]
fn updates_and_subresources_are_ignored() {
    let mut review: Value =
        serde_json::from_slice(&review_of(&pod("p"), "default", false)).unwrap_or_default();
    review["request"]["operation"] = json!("UPDATE");
    let (answer, outcome) = respond(&serde_json::to_vec(&review).unwrap_or_default(), ENABLED);
    assert!(patch_of(&answer).is_none());
    assert!(matches!(outcome.result, Verdict::Ignored(_)));

    review["request"]["operation"] = json!("CREATE");
    review["request"]["subResource"] = json!("binding");
    let (answer, outcome) = respond(&serde_json::to_vec(&review).unwrap_or_default(), ENABLED);
    assert!(patch_of(&answer).is_none());
    assert_eq!(
        outcome.result,
        Verdict::Ignored("subresource binding".to_owned())
    );
}

#[test]
fn bodies_that_are_not_reviews_are_errors_with_the_reason() {
    let config = Config::default();
    let err = |body: &[u8]| {
        webhook::review(body, ENABLED, &config)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        err(b""),
        "empty body: expected an admission.k8s.io/v1 AdmissionReview (JSON)"
    );
    assert_eq!(
        err(b"  \n"),
        "empty body: expected an admission.k8s.io/v1 AdmissionReview (JSON)"
    );
    assert!(
        err(b"{\"hello\":1}")
            .starts_with("body is not an admission.k8s.io/v1 AdmissionReview: missing field")
    );
    assert!(
        err(b"not json")
            .starts_with("body is not an admission.k8s.io/v1 AdmissionReview: expected")
    );
    assert_eq!(
        err(br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#),
        "AdmissionReview admission.k8s.io/v1beta1 is not supported: expected kind AdmissionReview, apiVersion admission.k8s.io/v1 (set admissionReviewVersions: [v1] on the webhook)"
    );
    assert_eq!(
        err(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#),
        "the AdmissionReview has no request"
    );
    assert!(matches!(
        webhook::review(b"[]", ENABLED, &config),
        Err(ReviewError::NotAReview(_))
    ));
}
