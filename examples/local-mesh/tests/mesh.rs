//! The local mesh's own mechanics, in real network namespaces: pods, names, EndpointSlices,
//! scaling, deleting, and that nothing is left behind. Most run without sidecars (the mesh
//! works the same with them; `tests/l4.rs` goes through them). Needs root; see
//! `tests/support/mod.rs`.

mod support;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{NS, TestMesh, backend, client, leftovers, namespace, processes_with, service};
use wasmesh_local::config::Binaries;
use wasmesh_local::mesh::Command as MeshCommand;
use wasmesh_local::state::{self, Phase, SliceStatus, Status};

fn no_sidecar(cfg: &mut wasmesh_local::MeshConfig) {
    cfg.sidecar = false;
}

fn host_links() -> usize {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn pods_get_addresses_and_run_their_commands_with_the_downward_api() {
    let links_before = host_links();
    let pod = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: envdump, namespace: {NS}, labels: {{app: envdump}}}}
spec:
  serviceAccountName: dumper
  containers:
  - name: dump
    command: ["sh", "-c", "echo POD_NAME=$POD_NAME POD_NAMESPACE=$POD_NAMESPACE POD_IP=$POD_IP NODE_NAME=$NODE_NAME GREETING=$GREETING SA=$SA; exec sleep 3600"]
    env:
    - {{name: GREETING, value: "hello $(POD_NAME)"}}
    - name: SA
      valueFrom: {{fieldRef: {{fieldPath: spec.serviceAccountName}}}}
"#
    );
    let files = [
        ("ns.yaml", namespace()),
        ("pod.yaml", pod),
        ("backend.yaml", backend(NS, "web", 2, &[("http", 8080)], "")),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let Some(mesh) = TestMesh::up_with(
        "pods_get_addresses_and_run_their_commands_with_the_downward_api",
        &files,
        no_sidecar,
    ) else {
        return;
    };
    let pods = mesh.ready_pods(NS, "web-", 2);
    let s = mesh.wait("envdump running", |s| {
        s.pod(NS, "envdump")
            .is_some_and(|p| p.phase == Phase::Running)
    });
    let p = s.pod(NS, "envdump").expect("envdump").clone();
    assert!(p.netns.starts_with(&mesh.prefix), "{}", p.netns);

    // The container printed its environment.
    let log = p.log_dir.join("dump.log");
    let deadline = Instant::now() + support::WAIT;
    let text = loop {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        if !t.is_empty() || Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        text.trim(),
        format!(
            "POD_NAME=envdump POD_NAMESPACE={NS} POD_IP={} NODE_NAME=local-node GREETING=hello envdump SA=dumper",
            p.ip
        )
    );

    // The pod's namespace has its address on eth0 and a default route to the node's bridge.
    let addr = mesh.exec(
        NS,
        "envdump",
        &["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
    );
    assert!(
        String::from_utf8_lossy(&addr.stdout).contains(&format!("inet {}/16", p.ip)),
        "{addr:?}"
    );
    let route = mesh.exec(NS, "envdump", &["ip", "route", "show", "default"]);
    assert!(
        String::from_utf8_lossy(&route.stdout).contains("via 10.244.0.1"),
        "{route:?}"
    );

    // Pods reach each other directly (no sidecars here).
    let target = format!("http://{}:8080/", pods[0].ip);
    let calls = mesh.calls(NS, "envdump", &target, 3);
    assert_eq!(
        calls.tally().get(&pods[0].name),
        Some(&3),
        "{}",
        calls.output
    );

    // Nothing was added to the machine's own namespace, and the node does not forward.
    assert_eq!(
        host_links(),
        links_before,
        "no interface in the host namespace"
    );
    let fwd = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}node", mesh.prefix),
            "cat",
            "/proc/sys/net/ipv4/ip_forward",
        ])
        .output()
        .expect("sysctl");
    assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "0");
}

#[test]
fn service_names_resolve_inside_pods() {
    let files = [
        ("ns.yaml", namespace()),
        ("web.yaml", backend(NS, "web", 2, &[("http", 8080)], "")),
        (
            "svc.yaml",
            service(NS, "web", "web", &[("http", 80, "http")], ""),
        ),
        (
            "headless.yaml",
            service(
                NS,
                "web-headless",
                "web",
                &[("http", 8080, "8080")],
                "  clusterIP: None\n",
            ),
        ),
        (
            "alias.yaml",
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: alias, namespace: {NS}}}\nspec: {{type: ExternalName, externalName: web.{NS}.svc.cluster.local}}\n"
            ),
        ),
        (
            "other.yaml",
            service("other", "db", "db", &[("tcp", 5432, "5432")], ""),
        ),
        ("client.yaml", client(NS, "client", "")),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let Some(mesh) = TestMesh::up_with("service_names_resolve_inside_pods", &files, no_sidecar)
    else {
        return;
    };
    let pods = mesh.ready_pods(NS, "web-", 2);
    let s = mesh.status();
    let ip_of = |s: &Status, ns: &str, name: &str| {
        s.services
            .iter()
            .find(|x| x.namespace == ns && x.name == name)
            .map(|x| x.cluster_ip.clone())
            .expect("service")
    };
    let web_ip = ip_of(&s, NS, "web");
    assert!(web_ip.starts_with("10.") && web_ip != "None", "{web_ip}");

    let resolve = |name: &str| -> BTreeSet<String> {
        let out = mesh.exec(NS, "client", &["getent", "ahostsv4", name]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    };
    for name in [
        "web",
        &format!("web.{NS}"),
        &format!("web.{NS}.svc"),
        &format!("web.{NS}.svc.cluster.local"),
    ] {
        assert_eq!(resolve(name), BTreeSet::from([web_ip.clone()]), "{name}");
    }
    // The ExternalName alias resolves like its target.
    assert_eq!(resolve("alias"), BTreeSet::from([web_ip.clone()]));
    // Headless: the ready pods.
    let pod_ips: BTreeSet<String> = pods.iter().map(|p| p.ip.to_string()).collect();
    assert_eq!(resolve("web-headless"), pod_ips);
    // Another namespace: only qualified names.
    let db_ip = ip_of(&s, "other", "db");
    assert_eq!(resolve("db.other"), BTreeSet::from([db_ip]));
    assert!(resolve("db").is_empty());
    // An unknown name fails, and fast (nothing to ask).
    let start = Instant::now();
    assert!(resolve("nothing.example.com").is_empty());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    // A Service added while running resolves too.
    mesh.write(
        "late.yaml",
        &service(NS, "late", "web", &[("http", 80, "8080")], ""),
    );
    let s = mesh.wait("the new Service", |s| {
        s.services.iter().any(|x| x.name == "late")
    });
    let late_ip = ip_of(&s, NS, "late");
    let deadline = Instant::now() + support::WAIT;
    while resolve("late") != BTreeSet::from([late_ip.clone()]) {
        assert!(Instant::now() < deadline, "late never resolved");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn slices_of<'a>(s: &'a Status, service: &str) -> Vec<&'a SliceStatus> {
    s.slices
        .iter()
        .filter(|x| x.namespace == NS && x.service == service)
        .collect()
}

#[test]
fn endpoint_slices_follow_named_ports_and_readiness() {
    // Two Deployments behind one Service whose targetPort is the name `http`: 8080 in one,
    // 9090 in the other. The slow one opens its port only after a while.
    let slow = format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: slow, namespace: {NS}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web, track: slow}}}}
  template:
    metadata: {{labels: {{app: web, track: slow}}}}
    spec:
      containers:
      - name: app
        command: ["sh", "-c", "sleep 2; exec wasmesh-demo backend --listen 0.0.0.0:9090"]
        ports: [{{name: http, containerPort: 9090}}]
"#
    );
    let files = [
        ("ns.yaml", namespace()),
        (
            "fast.yaml",
            backend(NS, "fast", 2, &[("http", 8080)], "")
                .replace("app: fast", "app: web, track: fast"),
        ),
        ("slow.yaml", slow),
        (
            "svc.yaml",
            service(NS, "web", "web", &[("http", 80, "http")], ""),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let Some(mesh) = TestMesh::up_with(
        "endpoint_slices_follow_named_ports_and_readiness",
        &files,
        no_sidecar,
    ) else {
        return;
    };
    // The slow pod shows up not ready first...
    let s = mesh.wait("the slow pod's endpoint, not ready", |s| {
        slices_of(s, "web").iter().any(|sl| {
            sl.ports == ["http:9090/TCP"] && sl.endpoints.len() == 1 && !sl.endpoints[0].ready
        })
    });
    let slow_pod = s
        .pods
        .iter()
        .find(|p| p.name.starts_with("slow-"))
        .expect("slow pod");
    assert!(!slow_pod.ready);
    // ...then ready, once its port accepts.
    let s = mesh.wait("every endpoint ready", |s| {
        let sl = slices_of(s, "web");
        sl.len() == 2
            && sl.iter().all(|x| {
                x.endpoints
                    .iter()
                    .all(|e| e.ready && e.serving && !e.terminating)
            })
            && sl.iter().map(|x| x.endpoints.len()).sum::<usize>() == 3
    });
    let mut shapes: Vec<(Vec<String>, usize)> = slices_of(&s, "web")
        .iter()
        .map(|x| (x.ports.clone(), x.endpoints.len()))
        .collect();
    shapes.sort();
    assert_eq!(
        shapes,
        vec![
            (vec!["http:8080/TCP".to_string()], 2),
            (vec!["http:9090/TCP".to_string()], 1)
        ]
    );

    // What control reads: the slice objects as the EndpointSlice controller writes them.
    let slice = slices_of(&s, "web")
        .into_iter()
        .find(|x| x.ports == ["http:9090/TCP"])
        .expect("slice");
    let file = mesh
        .state
        .join("objects")
        .join(format!("endpointslice.{NS}.{}.json", slice.name));
    let obj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("slice file")).expect("json");
    assert_eq!(
        obj["metadata"]["labels"]["kubernetes.io/service-name"],
        "web"
    );
    assert_eq!(
        obj["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
        "endpointslice-controller.k8s.io"
    );
    assert_eq!(obj["addressType"], "IPv4");
    assert_eq!(obj["ports"][0]["name"], "http");
    assert_eq!(obj["ports"][0]["port"], 9090);
    let ep = &obj["endpoints"][0];
    assert_eq!(ep["addresses"][0], slow_pod.ip.to_string());
    assert_eq!(ep["nodeName"], "local-node");
    assert_eq!(ep["zone"], "local-zone");
    assert_eq!(ep["targetRef"]["kind"], "Pod");
    assert_eq!(ep["targetRef"]["name"], slow_pod.name);
    assert_eq!(
        ep["conditions"],
        serde_json::json!({"ready": true, "serving": true, "terminating": false})
    );
    // The Pod and the Node as control sees them.
    let pod: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            mesh.state
                .join("objects")
                .join(format!("pod.{NS}.{}.json", slow_pod.name)),
        )
        .expect("pod file"),
    )
    .expect("json");
    assert_eq!(pod["status"]["podIP"], slow_pod.ip.to_string());
    assert_eq!(pod["spec"]["nodeName"], "local-node");
    assert_eq!(pod["spec"]["serviceAccountName"], "default");
    let node: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(mesh.state.join("objects").join("node.local-node.json"))
            .expect("node file"),
    )
    .expect("json");
    assert_eq!(
        node["metadata"]["labels"]["topology.kubernetes.io/zone"],
        "local-zone"
    );
}

#[test]
fn scaling_down_terminates_the_pod_then_removes_it_and_deleted_pods_are_replaced() {
    // Backends that keep serving for 1.5 s after SIGTERM, so the terminating phase is visible.
    let deploy = |replicas: u32| {
        backend(NS, "web", replicas, &[("http", 8080)], "").replace("\"300ms\"", "\"1500ms\"")
    };
    let files = [
        ("ns.yaml", namespace()),
        ("web.yaml", deploy(3)),
        (
            "svc.yaml",
            service(NS, "web", "web", &[("http", 80, "http")], ""),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let Some(mesh) = TestMesh::up_with(
        "scaling_down_terminates_the_pod_then_removes_it_and_deleted_pods_are_replaced",
        &files,
        no_sidecar,
    ) else {
        return;
    };
    let before = mesh.ready_pods(NS, "web-", 3);
    mesh.write("web.yaml", &deploy(2));
    // The removed pod's endpoint: not ready, still serving, terminating.
    let s = mesh.wait("a terminating endpoint", |s| {
        slices_of(s, "web")
            .iter()
            .flat_map(|x| &x.endpoints)
            .any(|e| e.terminating && e.serving && !e.ready)
    });
    let victim = slices_of(&s, "web")
        .iter()
        .flat_map(|x| &x.endpoints)
        .find(|e| e.terminating)
        .and_then(|e| e.pod.clone())
        .expect("victim");
    assert_eq!(
        s.pods.iter().find(|p| p.name == victim).map(|p| p.phase),
        Some(Phase::Terminating)
    );
    let victim_netns = s
        .pods
        .iter()
        .find(|p| p.name == victim)
        .map(|p| p.netns.clone())
        .expect("netns");
    // Then it is gone: from the slice, the pods, and the machine.
    let s = mesh.wait("the victim removed", |s| {
        s.pods.iter().all(|p| p.name != victim)
            && slices_of(s, "web")
                .iter()
                .flat_map(|x| &x.endpoints)
                .count()
                == 2
    });
    assert!(
        slices_of(&s, "web")
            .iter()
            .flat_map(|x| &x.endpoints)
            .all(|e| e.ready)
    );
    assert!(!support::leftovers(&mesh.prefix).contains(&victim_netns));
    assert!(before.iter().any(|p| p.name == victim));

    // Deleting a Deployment's pod: it terminates and a new one takes its place.
    let survivors = mesh.ready_pods(NS, "web-", 2);
    let doomed = survivors[0].name.clone();
    mesh.send(MeshCommand::DeletePod(
        wasmesh_local::manifests::NsName::new(NS, &doomed),
    ));
    let s = mesh.wait("a replacement", |s| {
        let web: Vec<_> = s
            .pods
            .iter()
            .filter(|p| p.name.starts_with("web-"))
            .collect();
        web.iter().all(|p| p.name != doomed)
            && web.len() == 2
            && web.iter().all(|p| p.phase == Phase::Running && p.ready)
    });
    let names: BTreeSet<_> = s.pods.iter().map(|p| p.name.clone()).collect();
    assert!(names.contains(&survivors[1].name));
}

/// Runs the `wasmesh-local` binary.
fn local(bins: &Binaries) -> Command {
    let mut c = Command::new(&bins.local);
    c.stdin(Stdio::null());
    c
}

/// `wasmesh-local up` as a process; dropping it kills it and runs `down`, so a failing test
/// leaves nothing behind either.
struct UpProcess {
    child: std::process::Child,
    bins: Binaries,
    state: std::path::PathBuf,
    prefix: String,
}

impl UpProcess {
    /// Starts `up` and waits until its pods are ready.
    fn start(
        bins: &Binaries,
        dir: &std::path::Path,
        state: &std::path::Path,
        prefix: &str,
    ) -> Self {
        let log_path = dir.join(".up.log");
        let log = std::fs::File::create(&log_path).expect("log");
        let child = local(bins)
            .args(["up"])
            .arg(dir)
            .arg("--state-dir")
            .arg(state)
            .args(["--prefix", prefix])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("wasmesh-local up");
        let up = Self {
            child,
            bins: bins.clone(),
            state: state.to_path_buf(),
            prefix: prefix.to_string(),
        };
        let pid = up.child.id();
        let deadline = Instant::now() + support::WAIT;
        loop {
            // This `up`'s status (a crashed one may have left its own).
            let ours = state::read_status(state).is_ok_and(|s| {
                s.pid == pid
                    && !s.pods.is_empty()
                    && s.pods.iter().all(|p| p.phase == Phase::Running && p.ready)
            });
            if ours {
                return up;
            }
            assert!(
                Instant::now() < deadline,
                "up never got ready; its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit by itself.
    fn wait_exit(&mut self) {
        let deadline = Instant::now() + support::WAIT;
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "up did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for UpProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = local(&self.bins)
            .args(["down", "--prefix", &self.prefix, "--state-dir"])
            .arg(&self.state)
            .output();
    }
}

/// What a mesh leaves running or lying around: namespaces and /etc/netns directories with the
/// prefix, processes mentioning the state directory (agents, control) or running in the
/// mesh's unique namespace (sidecars, containers).
fn traces(prefix: &str, state: &std::path::Path, ns: &str) -> Vec<String> {
    let mut t = leftovers(prefix);
    t.extend(processes_with(&state.to_string_lossy()));
    t.extend(processes_with(&format!("POD_NAMESPACE={ns}")));
    if state.exists() {
        t.push(state.display().to_string());
    }
    t
}

fn mesh_folder(ns: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("web.yaml"),
        backend(ns, "web", 2, &[("http", 8080)], ""),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("svc.yaml"),
        service(ns, "web", "web", &[("http", 80, "http")], ""),
    )
    .expect("write");
    dir
}

#[test]
fn down_removes_everything_and_sigterm_does_too() {
    if !support::have_root("down_removes_everything_and_sigterm_does_too") {
        return;
    }
    let bins = support::binaries();
    let prefix = format!("wmd{}-", std::process::id() % 1000);
    let ns = format!("down{}", std::process::id());
    let dir = mesh_folder(&ns);
    let state = std::env::temp_dir().join(format!("{prefix}state"));

    // `down`.
    let mut up = UpProcess::start(&bins, dir.path(), &state, &prefix);
    assert!(!leftovers(&prefix).is_empty());
    assert!(
        !processes_with(&format!("POD_NAMESPACE={ns}")).is_empty(),
        "the sidecars and containers run"
    );
    let out = local(&bins)
        .arg("down")
        .arg("--state-dir")
        .arg(&state)
        .output()
        .expect("down");
    assert!(out.status.success(), "{out:?}");
    up.wait_exit();
    assert_eq!(traces(&prefix, &state, &ns), Vec::<String>::new());

    // SIGTERM to `up` (what Ctrl-C does too).
    let mut up = UpProcess::start(&bins, dir.path(), &state, &prefix);
    wasmesh_local::process::signal(&[up.id()], wasmesh_local::process::Signal::Term);
    up.wait_exit();
    assert_eq!(traces(&prefix, &state, &ns), Vec::<String>::new());
}

#[test]
fn a_crashed_up_leaves_no_running_pods_and_the_next_up_removes_its_leftovers() {
    if !support::have_root(
        "a_crashed_up_leaves_no_running_pods_and_the_next_up_removes_its_leftovers",
    ) {
        return;
    }
    let bins = support::binaries();
    let prefix = format!("wmc{}-", std::process::id() % 1000);
    let ns = format!("crash{}", std::process::id());
    let dir = mesh_folder(&ns);
    let state = std::env::temp_dir().join(format!("{prefix}state"));

    let mut up = UpProcess::start(&bins, dir.path(), &state, &prefix);
    let pods = state::read_status(&state).expect("status").pods;
    assert_eq!(pods.len(), 2);
    wasmesh_local::process::signal(&[up.id()], wasmesh_local::process::Signal::Kill);
    up.wait_exit();
    // The pod agents notice and stop their pods at once; the namespaces stay.
    let deadline = Instant::now() + support::WAIT;
    while !processes_with(&format!("POD_NAMESPACE={ns}")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "pods still running: {:?}",
            processes_with(&format!("POD_NAMESPACE={ns}"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = leftovers(&prefix);
    assert!(
        left.iter().any(|n| n == &format!("{prefix}node")),
        "{left:?}"
    );

    // The next `up` starts clean, and `down` leaves nothing.
    let mut up = UpProcess::start(&bins, dir.path(), &state, &prefix);
    let now = state::read_status(&state).expect("status");
    assert!(
        now.pods
            .iter()
            .all(|p| pods.iter().all(|old| old.name != p.name))
    );
    let out = local(&bins)
        .arg("down")
        .arg("--state-dir")
        .arg(&state)
        .output()
        .expect("down");
    assert!(out.status.success(), "{out:?}");
    up.wait_exit();
    assert_eq!(traces(&prefix, &state, &ns), Vec::<String>::new());
}

#[test]
fn get_and_exec_work_like_kubectl() {
    let files = [
        ("ns.yaml", namespace()),
        ("web.yaml", backend(NS, "web", 1, &[("http", 8080)], "")),
        (
            "svc.yaml",
            service(NS, "web", "web", &[("http", 80, "http")], ""),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let Some(mesh) = TestMesh::up_with("get_and_exec_work_like_kubectl", &files, no_sidecar) else {
        return;
    };
    let pod = mesh.ready_pods(NS, "web-", 1).remove(0);
    let get = |what: &str| {
        let out = local(&mesh.bins)
            .args(["get", what, "-n", NS, "--state-dir"])
            .arg(&mesh.state)
            .output()
            .expect("get");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let pods = get("pods");
    assert!(pods.starts_with("NAME "), "{pods}");
    assert!(
        pods.contains(&pod.name) && pods.contains("Running") && pods.contains(&pod.ip.to_string()),
        "{pods}"
    );
    assert!(get("svc").contains("ClusterIP"));
    assert!(get("endpoints").contains(&format!("{} {}", pod.ip, pod.name)));

    let out = local(&mesh.bins)
        .args(["exec", "-n", NS, &pod.name, "--state-dir"])
        .arg(&mesh.state)
        .args(["--", "sh", "-c", "echo $POD_NAME; exit 7"])
        .output()
        .expect("exec");
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pod.name);
    let out = local(&mesh.bins)
        .args(["exec", "-n", NS, "nope", "--state-dir"])
        .arg(&mesh.state)
        .args(["--", "true"])
        .output()
        .expect("exec");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{out:?}"
    );
}

/// Pods starting together must not lose the gateway. The bridge would take the lowest MAC of
/// its ports and change it as ports come; a pod that resolved the gateway just before a
/// change then kept the old MAC (ARP updates within a second are ignored) and its packets were
/// dropped for ~30 s: the "sidecar never got its table" flake. Here a pod connects to the
/// node's address right after eight ports of the bridge got ever lower MACs, each connect
/// within 2 s.
#[test]
fn a_pod_keeps_reaching_the_node_when_the_ports_of_the_bridge_change_their_macs() {
    use wasmesh_local::config::NODE_IP;
    use wasmesh_local::netns;
    if !support::have_root("a_pod_keeps_reaching_the_node") {
        return;
    }
    let prefix = format!("wmtbr{}-", std::process::id() % 1000);
    let node = format!("{prefix}node");
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = netns::cleanup(&self.0, &self.1);
        }
    }
    let _cleanup = Cleanup(prefix.clone(), node.clone());
    netns::add_node(&node).expect("node namespace");
    let pod = format!("{prefix}a");
    netns::add_pod(&node, &pod, "vetha", "10.244.0.2".parse().unwrap()).expect("pod a");
    let mut server = Command::new("ip")
        .args(["netns", "exec", &node, "python3", "-c"])
        .arg(format!(
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('{NODE_IP}', 8000))\ns.listen(64)\nprint('up', flush=True)\nwhile True:\n    c, _ = s.accept()\n    c.close()\n"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .expect("listener in the node namespace");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("listener up");
    let connect = || {
        Command::new("ip")
            .args(["netns", "exec", &pod, "python3", "-c"])
            .arg(format!(
                "import socket\nsocket.create_connection(('{NODE_IP}', 8000), timeout=2).close()"
            ))
            .stderr(Stdio::null())
            .spawn()
            .expect("connect from the pod")
    };
    // Eight more pods, then their ports get ever lower MACs within a few milliseconds (one
    // `ip -batch`), right after the pod resolved the gateway.
    for i in 1..=8 {
        netns::add_pod(
            &node,
            &format!("{prefix}b{i}"),
            &format!("vethb{i}"),
            format!("10.244.0.{}", 10 + i).parse().unwrap(),
        )
        .expect("another pod");
    }
    assert!(
        connect().wait().expect("connect").success(),
        "the pod reaches the node"
    );
    let batch: String = (1..=8)
        .rev()
        .map(|i| format!("link set vethb{i} address 02:00:00:00:00:0{i}\n"))
        .collect();
    let mut set = Command::new("ip")
        .args(["-n", &node, "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("ip -batch");
    std::io::Write::write_all(&mut set.stdin.take().expect("stdin"), batch.as_bytes())
        .expect("write batch");
    assert!(set.wait().expect("ip -batch").success());
    let failed: Vec<usize> = (0..3)
        .filter(|_| !connect().wait().expect("connect").success())
        .collect();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        failed.is_empty(),
        "connects {failed:?} of 3 from the pod to the node failed after the ports' MACs changed"
    );
}
