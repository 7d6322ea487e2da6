//! `wasmesh-injector inject` on a multi-document file with mixed kinds: workloads injected,
//! everything else byte for byte unchanged, a second run changes nothing.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;
use support::*;
use wasmesh_injector::annotations::Source;
use wasmesh_injector::config::{Config, SidecarMode};
use wasmesh_injector::mutate::SkipReason;
use wasmesh_injector::offline::{self, Outcome};

fn input() -> String {
    String::from_utf8(fixture("mixed.yaml")).expect("UTF-8")
}

/// The documents of a YAML text, split on `---` lines, each with its marker line.
fn documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.split_inclusive('\n') {
        if line.starts_with("---") && docs.last().is_some_and(|d| !d.is_empty()) {
            docs.push(String::new());
        }
        if let Some(d) = docs.last_mut() {
            d.push_str(line);
        }
    }
    docs
}

fn yaml(text: &str) -> Value {
    serde_saphyr::from_str(text).expect("valid YAML")
}

#[test]
fn workloads_are_injected_and_everything_else_is_untouched() {
    let input = input();
    let result = offline::inject(&input, &Config::default()).expect("inject");

    let reports: Vec<(usize, String, Outcome)> = result
        .reports
        .iter()
        .map(|r| (r.document, r.object.clone(), r.outcome.clone()))
        .collect();
    let native = Outcome::Injected(SidecarMode::Native);
    assert_eq!(
        reports,
        [
            (1, "configmap/settings".to_owned(), Outcome::PassedThrough),
            (2, "service/web".to_owned(), Outcome::PassedThrough),
            (3, "deployment/web".to_owned(), native.clone()),
            (
                4,
                "job/migrate".to_owned(),
                Outcome::Injected(SidecarMode::Classic)
            ),
            (5, "cronjob/report".to_owned(), native.clone()),
            (6, "statefulset/db".to_owned(), native.clone()),
            (7, "daemonset/agent".to_owned(), native.clone()),
            (8, "replicaset/rs".to_owned(), native.clone()),
            (
                9,
                "pod/debug".to_owned(),
                Outcome::Skipped(SkipReason::OptedOut(Source::Label))
            ),
            (
                10,
                "deployment/wasmesh-control".to_owned(),
                Outcome::Skipped(SkipReason::ExcludedNamespace("wasmesh-system".to_owned()))
            ),
            (
                11,
                "pod/node-tool".to_owned(),
                Outcome::Skipped(SkipReason::HostNetwork)
            ),
            (
                12,
                "list".to_owned(),
                Outcome::Unsupported(
                    "the items of a List are not injected; put them in documents of their own"
                        .to_owned()
                )
            ),
            (14, "deployment/not-apps".to_owned(), Outcome::PassedThrough),
        ]
    );
    // The classic Job is told how it completes.
    assert_eq!(result.reports[3].warnings.len(), 1);
    assert!(result.reports[3].warnings[0].contains("quitquitquit"));

    let before = documents(&input);
    let after = documents(&result.output);
    assert_eq!(before.len(), after.len());
    let injected = [3, 4, 5, 6, 7, 8];
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let number = i + 1;
        if injected.contains(&number) {
            assert_ne!(a, b, "document {number} is injected");
        } else {
            assert_eq!(a, b, "document {number} is byte for byte unchanged");
        }
    }

    // Injected documents keep their marker line and leading comments.
    assert!(after[2].starts_with("---\n# The web Deployment: injected.\napiVersion: apps/v1\n"));
    assert!(after[3].starts_with("--- # a Job, classic mode\n"));

    // The Deployment: the sidecar in its pod template, scalars as kubectl reads them.
    let web = yaml(&after[2]);
    let template = &web["spec"]["template"];
    assert_eq!(
        names(&template["spec"]["initContainers"]),
        ["wasmesh-init", "wasmesh-proxy"]
    );
    assert_eq!(names(&template["spec"]["containers"]), ["web"]);
    let app = &template["spec"]["containers"][0];
    assert_eq!(app["env"][0]["name"], "N"); // not YAML 1.1's `false`
    assert_eq!(app["env"][0]["value"], "0644"); // a string field keeps the digits
    assert_eq!(app["resources"]["requests"]["cpu"], "0.5");
    assert_eq!(
        template["spec"]["volumes"][0]["configMap"]["defaultMode"],
        420
    ); // 0644 octal
    assert_eq!(
        template["metadata"]["annotations"]["example.com/flag"],
        "yes"
    );
    assert!(template["metadata"]["annotations"]["wasmesh.io/injected"].is_string());
    assert_eq!(web["spec"]["replicas"], 3);
    let typed: k8s_openapi::api::apps::v1::Deployment =
        serde_json::from_value(web.clone()).expect("a valid Deployment");
    assert_eq!(typed.metadata.name.as_deref(), Some("web"));

    // The Job: classic.
    let job = yaml(&after[3]);
    let spec = &job["spec"]["template"]["spec"];
    assert_eq!(names(&spec["containers"]), ["wasmesh-proxy", "migrate"]);
    assert_eq!(names(&spec["initContainers"]), ["wasmesh-init"]);

    // The CronJob's template, two levels down.
    let cron = yaml(&after[4]);
    let spec = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(
        names(&spec["initContainers"]),
        ["wasmesh-init", "wasmesh-proxy"]
    );
    assert_eq!(cron["spec"]["schedule"], "0 3 * * *");

    // The StatefulSet: ours before the user's init container.
    let db = yaml(&after[5]);
    assert_eq!(
        names(&db["spec"]["template"]["spec"]["initContainers"]),
        ["wasmesh-init", "wasmesh-proxy", "init-permissions"]
    );
}

#[test]
fn a_second_run_changes_nothing() {
    let once = offline::inject(&input(), &Config::default()).expect("inject");
    let twice = offline::inject(&once.output, &Config::default()).expect("inject again");
    assert_eq!(twice.output, once.output);
    assert!(
        twice
            .reports
            .iter()
            .all(|r| !matches!(r.outcome, Outcome::Injected(_)))
    );
    assert_eq!(
        twice
            .reports
            .iter()
            .filter(|r| r.outcome == Outcome::Skipped(SkipReason::AlreadyInjected))
            .count(),
        6
    );
}

#[test]
fn files_without_workloads_and_odd_layouts_come_back_identical() {
    for text in [
        "",
        "\n",
        "# just a comment\n",
        "---\n",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\r\ndata: {k: v}\r\n---\r\napiVersion: v1\nkind: Secret\nmetadata: {name: b}\n",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    wasmesh.io/inject: enabled\n...\n",
    ] {
        let result = offline::inject(text, &Config::default()).expect("inject");
        assert_eq!(result.output, text);
    }
}

#[test]
fn broken_documents_are_named() {
    let text = "apiVersion: v1\nkind: ConfigMap\n---\napiVersion: v1\nkind: Pod\nspec: [unclosed\n";
    let err = offline::inject(text, &Config::default()).expect_err("invalid YAML");
    assert!(
        err.to_string()
            .starts_with("document 2 (line 3): not valid YAML:"),
        "{err}"
    );

    let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    spec:\n      containers: 3\n";
    let err = offline::inject(text, &Config::default()).expect_err("not a Deployment");
    assert!(
        err.to_string()
            .starts_with("document 1 (line 1), deployment/d: not a valid object of its kind:"),
        "{err}"
    );
}

#[test]
fn the_command_reads_stdin_and_reports_on_stderr() {
    let input = input();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasmesh-injector"))
        .args([
            "inject",
            "-",
            "--control-address",
            "http://control.example:15010",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wasmesh-injector");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let config = Config {
        control_address: "http://control.example:15010".to_owned(),
        ..Config::default()
    };
    let expected = offline::inject(&input, &config).expect("inject");
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected.output);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("deployment/web (document 3): injected (native sidecar)"),
        "{stderr}"
    );
    assert!(stderr.contains("job/migrate (document 4): injected (classic sidecar)\n  warning: wasmesh: classic sidecar"), "{stderr}");
    assert!(
        stderr.contains("pod/debug (document 9): not injected: the pod opts out (label wasmesh.io/inject: \"false\")"),
        "{stderr}"
    );
    assert!(
        stderr.contains("list (document 12): unchanged: the items of a List are not injected"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("configmap"),
        "pass-throughs are not listed: {stderr}"
    );

    // A file that does not exist: one line naming it, exit status 1.
    let out = Command::new(env!("CARGO_BIN_EXE_wasmesh-injector"))
        .args(["inject", "/nonexistent/app.yaml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "wasmesh-injector: reading /nonexistent/app.yaml: No such file or directory (os error 2)\n"
    );
}
