//! `wasmesh-proxy init` against the real kernel, each test in network namespaces it creates and
//! deletes (see `support`). Needs root, `ip` (iproute2), `iptables` and `setpriv` (util-linux);
//! without root the tests are skipped with a note, unless `CI` is set.
//!
//! The listeners stand in for the proxy (`outbound` on 15001, `inbound` on 15006, `admin` on
//! 15000) and the app (`app` on 8080 and 9999, ...); every assertion is about which listener a
//! connection reached and the original destination it read there.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;

use support::{
    Cluster, Listeners, Netns, Outcome, PEER_IP, PEER_IP_2, PEER_IP6, POD_IP, POD_IP6, User,
    connect, have_root, run_ok,
};
use wasmesh_proxy::intercept::{Family, InitConfig, Ruleset, render_rules};

/// Entry point of the helper processes the tests start (listeners, clients); an empty test in
/// a normal run.
#[test]
fn helper_process() {
    support::run_helper_if_asked();
}

const PROXY_LISTENERS: [(&str, &str); 3] = [
    ("outbound", "0.0.0.0:15001"),
    ("inbound", "0.0.0.0:15006"),
    ("admin", "0.0.0.0:15000"),
];

fn pod_listeners(cluster: &Cluster, app: &[(&str, &str)]) -> Listeners {
    Listeners::start(&cluster.pod, &[&PROXY_LISTENERS[..], app].concat())
}

fn peer_listeners(cluster: &Cluster) -> Listeners {
    Listeners::start(
        &cluster.peer,
        &[("peer:9080", "0.0.0.0:9080"), ("peer:9081", "0.0.0.0:9081")],
    )
}

fn addr(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

#[track_caller]
fn assert_redirected(outcome: &Outcome, listener: &str, orig_dst: &str) {
    let (_, dst) = outcome.landed_at(listener);
    assert_eq!(
        dst.map(|d| d.to_string()).as_deref(),
        Some(orig_dst),
        "original destination of {outcome:?}"
    );
}

/// Our chains and every rule in or into them, per (table, chain), as `iptables-save` shows them.
type RuleMap = BTreeMap<(String, String), Vec<String>>;

fn installed(ns: &Netns, family: Family) -> RuleMap {
    let save = match family {
        Family::Ipv4 => "iptables-save",
        Family::Ipv6 => "ip6tables-save",
    };
    let dump = run_ok(&mut ns.command(save, &[]));
    let mut map = RuleMap::new();
    let mut table = String::new();
    for line in dump.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_owned();
        } else if let Some(decl) = line.strip_prefix(":WASMESH_") {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            map.entry((table.clone(), ":chains".into()))
                .or_default()
                .push(format!("WASMESH_{chain}"));
        } else if line.starts_with("-A ") && line.contains("WASMESH_") {
            let chain = line.split_whitespace().nth(1).unwrap_or_default();
            map.entry((table.clone(), chain.to_owned()))
                .or_default()
                .push(line.to_owned());
        }
    }
    map
}

fn rendered(ruleset: &Ruleset) -> RuleMap {
    let mut map = RuleMap::new();
    for t in &ruleset.tables {
        let table = t.table.name().to_owned();
        map.insert(
            (table.clone(), ":chains".into()),
            t.chains.iter().map(|c| c.to_string()).collect(),
        );
        for rule in &t.rules {
            map.entry((table.clone(), rule.chain.to_owned()))
                .or_default()
                .push(rule.to_string());
        }
    }
    map
}

#[track_caller]
fn assert_installed_exactly(ns: &Netns, cfg: &InitConfig) {
    let rules = render_rules(cfg);
    for family in Family::ALL {
        assert_eq!(
            installed(ns, family),
            rendered(rules.family(family)),
            "{family} rules in the namespace differ from the rendered set"
        );
    }
}

fn no_trace_of_wasmesh(ns: &Netns) {
    for save in ["iptables-save", "ip6tables-save"] {
        let dump = run_ok(&mut ns.command(save, &[]));
        assert!(!dump.contains("WASMESH"), "{save} still shows:\n{dump}");
    }
    let lo = ns.ip(&["-6", "addr", "show", "dev", "lo"]);
    assert!(!lo.contains("::6/128"), "::6 still on lo:\n{lo}");
}

#[test]
fn init_installs_exactly_one_set_and_replaces_it_when_run_again() {
    if !have_root("init_installs_exactly_one_set_and_replaces_it_when_run_again") {
        return;
    }
    let cluster = Cluster::new();
    cluster.init_ok(&[]);
    assert_installed_exactly(&cluster.pod, &InitConfig::default());
    let lo = cluster.pod.ip(&["-6", "addr", "show", "dev", "lo"]);
    assert!(
        lo.contains("::6/128"),
        "IPv6 passthrough address missing:\n{lo}"
    );

    cluster.init_ok(&[]);
    assert_installed_exactly(&cluster.pod, &InitConfig::default());

    // Different flags: the old rules are replaced, not added to.
    cluster.init_ok(&["--exclude-inbound-ports", "9999", "--proxy-gid", "1500"]);
    let cfg = InitConfig {
        exclude_inbound_ports: vec!["9999".parse().expect("port")],
        proxy_gid: Some(1500),
        ..InitConfig::default()
    };
    assert_installed_exactly(&cluster.pod, &cfg);
}

#[test]
fn cleanup_removes_every_chain_jump_and_address() {
    if !have_root("cleanup_removes_every_chain_jump_and_address") {
        return;
    }
    let cluster = Cluster::new();
    cluster.init_ok(&[]);
    // What `run` will do: list a Service without endpoints in the reject chain.
    run_ok(&mut cluster.pod.command(
        "iptables",
        &[
            "-A",
            "WASMESH_REJECT",
            "-p",
            "tcp",
            "-d",
            "10.96.0.11",
            "-j",
            "REJECT",
        ],
    ));
    cluster.init_ok(&["--cleanup"]);
    no_trace_of_wasmesh(&cluster.pod);
    // Nothing left to remove is not an error.
    cluster.init_ok(&["--cleanup"]);
}

#[test]
fn a_failed_install_leaves_nothing_behind() {
    if !have_root("a_failed_install_leaves_nothing_behind") {
        return;
    }
    let cluster = Cluster::new();
    // IPv4 goes in, then ip6tables-restore fails: the IPv4 rules must be taken out again.
    let fake = tempfile::tempdir().expect("temp dir");
    let restore = fake.path().join("ip6tables-restore");
    fs::write(
        &restore,
        "#!/bin/sh\ncat >/dev/null\necho 'ip6tables-restore: simulated failure' >&2\nexit 1\n",
    )
    .expect("write fake ip6tables-restore");
    fs::set_permissions(&restore, fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        fake.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = cluster
        .pod
        .command(
            "env",
            &[&format!("PATH={path}"), support::PROXY_BIN, "init"],
        )
        .output()
        .expect("run init");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "init succeeded with a failing ip6tables-restore"
    );
    assert!(
        stderr.contains("simulated failure") && stderr.contains("was undone"),
        "stderr: {stderr}"
    );
    no_trace_of_wasmesh(&cluster.pod);
}

#[test]
fn bad_flags_change_nothing() {
    if !have_root("bad_flags_change_nothing") {
        return;
    }
    let cluster = Cluster::new();
    for args in [
        &["--exclude-outbound-cidrs", "10.0.0.0/33"][..],
        &["--inbound-port", "70000"],
        &["--inbound-port", "15001"],
    ] {
        let out = cluster.init(args);
        assert!(!out.status.success(), "{args:?} accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(args[0]), "{args:?}: {stderr}");
        no_trace_of_wasmesh(&cluster.pod);
    }
}

#[test]
fn app_connections_land_on_the_outbound_listener_with_their_original_destination() {
    if !have_root("app_connections_land_on_the_outbound_listener_with_their_original_destination") {
        return;
    }
    let cluster = Cluster::new();
    cluster.init_ok(&[]);
    let _pod = pod_listeners(&cluster, &[]);
    let _peer = peer_listeners(&cluster);

    // A Service address, routed out of the pod but answered by nobody.
    let service = connect(&cluster.pod, User::App, None, "10.96.0.10:80");
    assert_redirected(&service, "outbound", "10.96.0.10:80");
    let (local, _) = service.landed_at("outbound");
    assert_eq!(local.to_string(), "127.0.0.1:15001");
    // Another pod's IP is captured too (the proxy passes it through).
    let pod_ip = connect(&cluster.pod, User::App, None, &addr(PEER_IP, 9080));
    assert_redirected(&pod_ip, "outbound", &addr(PEER_IP, 9080));
}

#[test]
fn proxy_uid_and_gid_connections_are_not_captured() {
    if !have_root("proxy_uid_and_gid_connections_are_not_captured") {
        return;
    }
    let cluster = Cluster::new();
    cluster.init_ok(&["--proxy-gid", "1500"]);
    let _pod = pod_listeners(&cluster, &[]);
    let _peer = peer_listeners(&cluster);

    let endpoint = addr(PEER_IP, 9080);
    connect(&cluster.pod, User::Proxy, None, &endpoint).landed_at("peer:9080");
    connect(&cluster.pod, User::Ids(1000, 1500), None, &endpoint).landed_at("peer:9080");
    // The same connection from the app is captured.
    connect(&cluster.pod, User::App, None, &endpoint).landed_at("outbound");
}

#[test]
fn excluded_outbound_ports_and_cidrs_are_not_captured() {
    if !have_root("excluded_outbound_ports_and_cidrs_are_not_captured") {
        return;
    }
    let cluster = Cluster::new();
    cluster.init_ok(&[
        "--exclude-outbound-ports",
        "9081",
        "--exclude-outbound-cidrs",
        &format!("{PEER_IP_2}/32"),
    ]);
    let _pod = pod_listeners(&cluster, &[]);
    let _peer = peer_listeners(&cluster);

    connect(&cluster.pod, User::App, None, &addr(PEER_IP, 9081)).landed_at("peer:9081");
    let (local, _) =
        connect(&cluster.pod, User::App, None, &addr(PEER_IP_2, 9080)).landed_at("peer:9080");
    assert_eq!(local.ip().to_string(), PEER_IP_2);
    // Neither excluded: captured.
    assert_redirected(
        &connect(&cluster.pod, User::App, None, &addr(PEER_IP, 9080)),
        "outbound",
        &addr(PEER_IP, 9080),
    );
}

#[test]
fn inbound_connections_land_on_the_inbound_listener_with_their_original_destination() {
    if !have_root(
        "inbound_connections_land_on_the_inbound_listener_with_their_original_destination",
    ) {
        return;
    }
    let cluster = Cluster::new();
    cluster.init_ok(&[]);
    let _pod = pod_listeners(&cluster, &[("app:8080", "0.0.0.0:8080")]);

    let inbound = connect(&cluster.peer, User::App, None, &addr(POD_IP, 8080));
    assert_redirected(&inbound, "inbound", &addr(POD_IP, 8080));
    let (local, _) = inbound.landed_at("inbound");
    assert_eq!(local.to_string(), addr(POD_IP, 15006));
    assert_eq!(
        inbound.peer().map(|p| p.ip().to_string()).as_deref(),
        Some(PEER_IP)
    );
    // A port the app does not listen on is accepted by the inbound listener all the same.
    assert_redirected(
        &connect(&cluster.peer, User::App, None, &addr(POD_IP, 7777)),
        "inbound",
        &addr(POD_IP, 7777),
    );
}

#[test]
fn excluded_inbound_ports_and_the_proxy_ports_reach_the_pod_directly() {
    if !have_root("excluded_inbound_ports_and_the_proxy_ports_reach_the_pod_directly") {
        return;
    }
    let cluster = Cluster::new();
    cluster.init_ok(&["--exclude-inbound-ports", "9999"]);
    let _pod = pod_listeners(
        &cluster,
        &[("app:8080", "0.0.0.0:8080"), ("app:9999", "0.0.0.0:9999")],
    );

    connect(&cluster.peer, User::App, None, &addr(POD_IP, 9999)).landed_at("app:9999");
    connect(&cluster.peer, User::App, None, &addr(POD_IP, 15000)).landed_at("admin");
    let (_, dst) =
        connect(&cluster.peer, User::App, None, &addr(POD_IP, 15006)).landed_at("inbound");
    // Reached directly, not redirected: the original destination is the listener itself.
    assert_eq!(dst.map(|d| d.to_string()), Some(addr(POD_IP, 15006)));
    connect(&cluster.peer, User::App, None, &addr(POD_IP, 8080)).landed_at("inbound");
}

#[test]
fn loopback_and_own_pod_ip_connections_of_the_app_are_not_captured() {
    if !have_root("loopback_and_own_pod_ip_connections_of_the_app_are_not_captured") {
        return;
    }
    let cluster = Cluster::new();
    cluster.init_ok(&[]);
    let _pod = pod_listeners(&cluster, &[("app:8080", "0.0.0.0:8080")]);

    connect(&cluster.pod, User::App, None, "127.0.0.1:8080").landed_at("app:8080");
    connect(&cluster.pod, User::App, None, "127.0.0.9:8080").landed_at("app:8080");
    connect(&cluster.pod, User::App, None, &addr(POD_IP, 8080)).landed_at("app:8080");
    connect(&cluster.pod, User::Proxy, None, "127.0.0.1:8080").landed_at("app:8080");
}

#[test]
fn proxy_connections_to_its_own_pod_go_through_the_inbound_listener() {
    if !have_root("proxy_connections_to_its_own_pod_go_through_the_inbound_listener") {
        return;
    }
    let cluster = Cluster::new();
    cluster.init_ok(&["--exclude-inbound-ports", "9999"]);
    let _pod = pod_listeners(
        &cluster,
        &[("app:8080", "0.0.0.0:8080"), ("app:9999", "0.0.0.0:9999")],
    );

    // app → Service → endpoint is this very pod: the proxy's connection is hairpinned to the
    // inbound listener, so inbound policy applies as for any other client.
    assert_redirected(
        &connect(&cluster.pod, User::Proxy, None, &addr(POD_IP, 8080)),
        "inbound",
        &addr(POD_IP, 8080),
    );
    // The inbound side passing the connection on to the app, from 127.0.0.6: not captured.
    let passthrough = connect(
        &cluster.pod,
        User::Proxy,
        Some("127.0.0.6"),
        &addr(POD_IP, 8080),
    );
    passthrough.landed_at("app:8080");
    assert_eq!(
        passthrough.peer().map(|p| p.ip().to_string()).as_deref(),
        Some("127.0.0.6")
    );
    // Excluded inbound ports stay excluded for the hairpin.
    connect(&cluster.pod, User::Proxy, None, &addr(POD_IP, 9999)).landed_at("app:9999");
}

#[test]
fn include_lists_limit_what_is_captured() {
    if !have_root("include_lists_limit_what_is_captured") {
        return;
    }
    let cluster = Cluster::new();
    cluster.init_ok(&[
        "--include-outbound-cidrs",
        "10.96.0.0/12",
        "--include-inbound-ports",
        "8080",
    ]);
    let _pod = pod_listeners(
        &cluster,
        &[("app:8080", "0.0.0.0:8080"), ("app:9090", "0.0.0.0:9090")],
    );
    let _peer = peer_listeners(&cluster);

    assert_redirected(
        &connect(&cluster.pod, User::App, None, "10.96.0.10:80"),
        "outbound",
        "10.96.0.10:80",
    );
    connect(&cluster.pod, User::App, None, &addr(PEER_IP, 9080)).landed_at("peer:9080");
    assert_redirected(
        &connect(&cluster.peer, User::App, None, &addr(POD_IP, 8080)),
        "inbound",
        &addr(POD_IP, 8080),
    );
    connect(&cluster.peer, User::App, None, &addr(POD_IP, 9090)).landed_at("app:9090");
}

#[test]
fn services_listed_in_the_reject_chain_are_refused() {
    if !have_root("services_listed_in_the_reject_chain_are_refused") {
        return;
    }
    let cluster = Cluster::new();
    cluster.init_ok(&[]);
    let _pod = pod_listeners(&cluster, &[]);
    // What `run` adds for a Service port without endpoints. Filter OUTPUT sees the packet after
    // nat OUTPUT redirected it, so the rule matches the original destination in conntrack.
    run_ok(&mut cluster.pod.command(
        "iptables",
        &[
            "-A",
            "WASMESH_REJECT",
            "-p",
            "tcp",
            "-m",
            "conntrack",
            "--ctorigdst",
            "10.96.0.11",
            "--ctorigdstport",
            "80",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ],
    ));
    match connect(&cluster.pod, User::App, None, "10.96.0.11:80") {
        Outcome::Failed(e) => assert!(e.starts_with("ConnectionRefused"), "{e}"),
        other => panic!("expected ECONNREFUSED, got {other:?}"),
    }
    assert_redirected(
        &connect(&cluster.pod, User::App, None, "10.96.0.10:80"),
        "outbound",
        "10.96.0.10:80",
    );
}

#[test]
fn ipv6_connections_are_captured_both_ways() {
    if !have_root("ipv6_connections_are_captured_both_ways") {
        return;
    }
    let cluster = Cluster::new();
    cluster.init_ok(&["--ipv6", "on"]);
    let _pod = Listeners::start(
        &cluster.pod,
        &[
            ("outbound", "[::]:15001"),
            ("inbound", "[::]:15006"),
            ("app:8080", "[::]:8080"),
        ],
    );

    let service = connect(&cluster.pod, User::App, None, "[fd00:96::10]:80");
    assert_redirected(&service, "outbound", "[fd00:96::10]:80");
    assert_eq!(service.landed_at("outbound").0.to_string(), "[::1]:15001");
    let inbound = connect(&cluster.peer, User::App, None, &addr(POD_IP6, 8080));
    assert_redirected(&inbound, "inbound", &addr(POD_IP6, 8080));
    assert_eq!(
        inbound.peer().map(|p| p.ip().to_string()).as_deref(),
        Some(PEER_IP6)
    );
    connect(&cluster.pod, User::App, None, "[::1]:8080").landed_at("app:8080");
    // Hairpin and passthrough, as for IPv4, from the ::6 address init put on lo.
    assert_redirected(
        &connect(&cluster.pod, User::Proxy, None, &addr(POD_IP6, 8080)),
        "inbound",
        &addr(POD_IP6, 8080),
    );
    connect(&cluster.pod, User::Proxy, Some("::6"), &addr(POD_IP6, 8080)).landed_at("app:8080");
    // IPv4 on the same dual-stack listeners: original_dst looks a mapped address up as IPv4.
    assert_redirected(
        &connect(&cluster.pod, User::App, None, "10.96.0.10:80"),
        "outbound",
        "10.96.0.10:80",
    );
}
