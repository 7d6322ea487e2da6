//! The install manifests in examples/k8s: they parse as the Kubernetes types they claim to be,
//! the webhook configuration follows the rules in docs/injection.md, and the names that tie the
//! files together (Service, Secret, Certificate, paths, ports, flags) agree.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde_json::Value;
use wasmesh_injector::mutate::NamespaceInjection;
use wasmesh_injector::webhook;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/k8s")
}

fn docs(file: &str) -> Vec<Value> {
    let path = examples().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn one<T: DeserializeOwned>(file: &str, kind: &str) -> T {
    let doc = docs(file)
        .into_iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {file}"));
    serde_json::from_value(doc).unwrap_or_else(|e| panic!("{kind} in {file}: {e}"))
}

fn expr(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.to_owned(),
        operator: operator.to_owned(),
        values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
    }
}

#[test]
fn the_webhook_configuration_follows_the_rules() {
    let config: MutatingWebhookConfiguration = one("webhook.yaml", "MutatingWebhookConfiguration");
    let webhooks = config.webhooks.expect("webhooks");
    assert_eq!(webhooks.len(), 2);
    let excluded = expr(
        "kubernetes.io/metadata.name",
        "NotIn",
        &[
            "kube-system",
            "kube-public",
            "kube-node-lease",
            "wasmesh-system",
        ],
    );
    for w in &webhooks {
        assert_eq!(w.admission_review_versions, ["v1"], "{}", w.name);
        assert_eq!(w.side_effects, "None", "{}", w.name);
        let timeout = w.timeout_seconds.expect("timeoutSeconds set");
        assert!((1..=10).contains(&timeout), "{}", w.name);
        assert!(
            w.failure_policy.is_some(),
            "{}: explicit failurePolicy",
            w.name
        );
        assert_eq!(w.reinvocation_policy.as_deref(), Some("Never"));
        let rules = w.rules.as_ref().expect("rules");
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].operations.as_deref(),
            Some(&["CREATE".to_owned()][..])
        );
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["pods".to_owned()][..])
        );
        let service = w.client_config.service.as_ref().expect("a service");
        assert_eq!(
            (service.name.as_str(), service.namespace.as_str()),
            ("wasmesh-injector", "wasmesh-system")
        );
        assert_eq!(service.port, Some(443));
        let ns = w.namespace_selector.as_ref().expect("namespaceSelector");
        assert!(
            ns.match_expressions
                .as_ref()
                .is_some_and(|e| e.contains(&excluded)),
            "{}: kube-system and wasmesh-system are excluded",
            w.name
        );
    }

    // The namespace webhook: opted-in namespaces, every pod but those opting out.
    let by_ns = &webhooks[0];
    let path = by_ns
        .client_config
        .service
        .as_ref()
        .and_then(|s| s.path.as_deref());
    assert_eq!(
        path.and_then(webhook::namespace_injection),
        Some(NamespaceInjection::Enabled)
    );
    let ns_exprs = by_ns
        .namespace_selector
        .as_ref()
        .and_then(|s| s.match_expressions.clone());
    assert!(ns_exprs.is_some_and(|e| e.contains(&expr("wasmesh.io/inject", "In", &["enabled"]))));
    assert_eq!(
        by_ns
            .object_selector
            .as_ref()
            .and_then(|s| s.match_expressions.clone()),
        Some(vec![expr("wasmesh.io/inject", "NotIn", &["false"])])
    );

    // The object webhook: the other namespaces, only pods that opt in.
    let by_pod = &webhooks[1];
    let path = by_pod
        .client_config
        .service
        .as_ref()
        .and_then(|s| s.path.as_deref());
    assert_eq!(
        path.and_then(webhook::namespace_injection),
        Some(NamespaceInjection::NotEnabled)
    );
    let ns_exprs = by_pod
        .namespace_selector
        .as_ref()
        .and_then(|s| s.match_expressions.clone());
    assert!(ns_exprs.is_some_and(|e| e.contains(&expr(
        "wasmesh.io/inject",
        "NotIn",
        &["enabled", "disabled"]
    ))));
    assert_eq!(
        by_pod
            .object_selector
            .as_ref()
            .and_then(|s| s.match_expressions.clone()),
        Some(vec![expr("wasmesh.io/inject", "In", &["true"])])
    );

    // The CA comes from the injector's Certificate.
    let annotations = config.metadata.annotations.expect("annotations");
    assert_eq!(
        annotations["cert-manager.io/inject-ca-from"],
        "wasmesh-system/wasmesh-injector"
    );
}

#[test]
fn the_injector_deployment_service_and_certificate_agree() {
    let deployment: Deployment = one("injector.yaml", "Deployment");
    let service: Service = one("injector.yaml", "Service");
    let account: ServiceAccount = one("injector.yaml", "ServiceAccount");
    assert_eq!(account.automount_service_account_token, Some(false));

    let pod = deployment
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("wasmesh-injector")
    );
    let container = &pod.containers[0];
    let port = &container.ports.as_ref().expect("ports")[0];
    assert_eq!(port.container_port, 15017);
    let service_port = &service.spec.expect("spec").ports.expect("ports")[0];
    assert_eq!(service_port.port, 443);
    assert_eq!(
        service_port.target_port,
        Some(IntOrString::String(port.name.clone().expect("named port")))
    );

    // The TLS Secret mounted is the one cert-manager writes, for the Service's DNS name.
    let secret = pod.volumes.as_ref().expect("volumes")[0]
        .secret
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .expect("a secret volume");
    let certificate = docs("cert-manager.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Certificate" && d["metadata"]["name"] == "wasmesh-injector")
        .expect("the injector's Certificate");
    assert_eq!(certificate["spec"]["secretName"], secret.as_str());
    assert_eq!(certificate["metadata"]["namespace"], "wasmesh-system");
    assert!(
        certificate["spec"]["dnsNames"]
            .as_array()
            .is_some_and(|n| n.contains(&Value::from("wasmesh-injector.wasmesh-system.svc")))
    );

    // The command line parses: run it with a loopback address and a missing certificate.
    let mut args = container.command.clone().expect("command");
    assert_eq!(args.remove(0), "wasmesh-injector");
    for a in &mut args {
        if a.starts_with("--listen=") {
            *a = "--listen=127.0.0.1:0".to_owned();
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_wasmesh-injector"))
        .args(&args)
        .env_clear()
        .output()
        .expect("run");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().last(),
        Some(
            "wasmesh-injector: TLS certificate: reading /etc/wasmesh/tls/tls.crt: No such file or directory (os error 2)"
        )
    );
}

#[test]
fn control_listens_where_the_sidecar_looks() {
    let deployment: Deployment = one("control.yaml", "Deployment");
    let service: Service = one("control.yaml", "Service");
    let pod = deployment
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some("wasmesh-control"));
    assert_eq!(
        pod.containers[0].command.as_deref(),
        Some(
            &[
                "wasmesh-control",
                "serve",
                "--source",
                "kube",
                "--listen",
                "0.0.0.0:15010",
                "--ca-cert",
                "/etc/wasmesh/ca/tls.crt",
                "--ca-key",
                "/etc/wasmesh/ca/tls.key"
            ]
            .map(str::to_owned)[..]
        )
    );
    // The mesh CA is the Secret cert-manager writes, mounted where the flags point, its key in
    // the one format control reads.
    let ca_volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "mesh-ca")
        .expect("the mesh CA volume");
    let ca_secret = ca_volume
        .secret
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .expect("a secret volume");
    let ca_mount = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "mesh-ca")
        .expect("the mesh CA mount");
    assert_eq!(ca_mount.mount_path, "/etc/wasmesh/ca");
    let ca = docs("cert-manager.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Certificate" && d["metadata"]["name"] == "wasmesh-mesh-ca")
        .expect("the mesh CA Certificate");
    assert_eq!(ca["spec"]["secretName"], ca_secret.as_str());
    assert_eq!(ca["spec"]["isCA"], true);
    assert_eq!(ca["spec"]["privateKey"]["encoding"], "PKCS8");
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("ghcr.io/wasmesh/wasmesh:0.1.0")
    );
    let port = &service.spec.expect("spec").ports.expect("ports")[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("grpc"), 15010));
    // http://wasmesh-control.wasmesh-system.svc:15010, the injector's default.
    assert_eq!(service.metadata.name.as_deref(), Some("wasmesh-control"));
    assert_eq!(
        service.metadata.namespace.as_deref(),
        Some("wasmesh-system")
    );
    assert_eq!(
        wasmesh_injector::config::DEFAULT_CONTROL_ADDRESS,
        "http://wasmesh-control.wasmesh-system.svc:15010"
    );
}
