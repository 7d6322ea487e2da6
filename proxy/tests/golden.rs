//! Golden tests for the rule renderer and the `init` command line; no privileges needed.
//!
//! Each case renders a config and compares the text with `tests/golden/<case>.rules`, byte for
//! byte (what `--dry-run` prints). After an intended change, rewrite the files with
//! `UPDATE_GOLDEN=1 cargo test -p wasmesh-proxy --test golden` and review the diff.

use std::fmt::Display;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::str::FromStr;

use wasmesh_proxy::intercept::{InitConfig, List, render_rules};

fn golden_path(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{case}.rules"))
}

fn assert_golden(case: &str, rendered: &str) {
    let path = golden_path(case);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::write(&path, rendered).expect("write golden file");
        return;
    }
    let expected = fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 creates it)", path.display()));
    assert!(
        rendered == expected,
        "rendered rules differ from {}\n--- expected\n{expected}\n--- rendered\n{rendered}",
        path.display()
    );
}

fn parse<T: FromStr>(flag: &str, value: &str) -> T
where
    T::Err: Display,
{
    value
        .parse()
        .unwrap_or_else(|e| panic!("{flag} {value}: {e}"))
}

/// The config the command line `args` would give (the golden files double as the CLI's).
fn config(args: &[(&str, &str)]) -> InitConfig {
    let mut cfg = InitConfig::default();
    for &(flag, value) in args {
        match flag {
            "--proxy-uid" => cfg.proxy_uid = parse(flag, value),
            "--proxy-gid" => cfg.proxy_gid = Some(parse(flag, value)),
            "--inbound-port" => cfg.inbound_port = parse(flag, value),
            "--outbound-port" => cfg.outbound_port = parse(flag, value),
            "--exclude-inbound-ports" => {
                cfg.exclude_inbound_ports = parse::<List<_>>(flag, value).0
            }
            "--exclude-outbound-ports" => {
                cfg.exclude_outbound_ports = parse::<List<_>>(flag, value).0
            }
            "--exclude-outbound-cidrs" => {
                cfg.exclude_outbound_cidrs = parse::<List<_>>(flag, value).0
            }
            "--include-outbound-cidrs" => cfg.include_outbound_cidrs = parse(flag, value),
            "--include-inbound-ports" => cfg.include_inbound_ports = parse(flag, value),
            other => panic!("unknown flag {other}"),
        }
    }
    cfg.validate().expect("valid config");
    cfg
}

/// Every flag, IPv4 values only; the values are Linkerd's defaults where it has one.
const EVERY_OPTION: &[(&str, &str)] = &[
    ("--proxy-uid", "2102"),
    ("--proxy-gid", "2103"),
    ("--inbound-port", "4143"),
    ("--outbound-port", "4140"),
    ("--exclude-inbound-ports", "4190,4191,9000-9100"),
    ("--exclude-outbound-ports", "25,3306"),
    ("--exclude-outbound-cidrs", "169.254.169.254,10.96.0.1/32"),
    ("--include-outbound-cidrs", "10.96.0.0/12,192.168.0.0/16"),
    ("--include-inbound-ports", "8080,9090"),
];

/// IPv4 and IPv6 networks mixed: each family gets its own.
const MIXED_FAMILIES: &[(&str, &str)] = &[
    ("--exclude-outbound-cidrs", "169.254.169.254,fd00:ec2::254"),
    ("--include-outbound-cidrs", "10.96.0.0/12,fd00:96::/108"),
];

#[test]
fn defaults() {
    assert_golden(
        "defaults",
        &render_rules(&InitConfig::default()).to_string(),
    );
}

#[test]
fn every_option() {
    assert_golden(
        "every_option",
        &render_rules(&config(EVERY_OPTION)).to_string(),
    );
}

#[test]
fn ipv6_networks_only_reach_ip6tables() {
    assert_golden("ipv6", &render_rules(&config(MIXED_FAMILIES)).to_string());
}

#[test]
fn empty_include_lists_capture_nothing() {
    let cfg = config(&[
        ("--include-outbound-cidrs", ""),
        ("--include-inbound-ports", ""),
    ]);
    assert_golden("capture_nothing", &render_rules(&cfg).to_string());
}

#[test]
fn long_port_lists_are_split_for_multiport() {
    let many: Vec<String> = (7001..=7020).map(|p| p.to_string()).collect();
    let cfg = config(&[
        ("--exclude-inbound-ports", &many.join(",")),
        (
            "--exclude-outbound-ports",
            "1-10,20-30,40-50,60-70,80-90,100-110,120-130,140-150",
        ),
    ]);
    assert_golden("many_ports", &render_rules(&cfg).to_string());
}

fn wasmesh_proxy(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasmesh-proxy"));
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("WASMESH_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run wasmesh-proxy")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "wasmesh-proxy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dry_run_prints_the_default_rules() {
    let out = wasmesh_proxy(&["init", "--dry-run"], &[]);
    assert_golden("defaults", &stdout(&out));
}

#[test]
fn every_flag_reaches_the_renderer() {
    let mut args = vec!["init", "--dry-run"];
    for (flag, value) in EVERY_OPTION {
        args.extend([*flag, *value]);
    }
    assert_golden("every_option", &stdout(&wasmesh_proxy(&args, &[])));
}

#[test]
fn every_flag_can_be_set_from_the_environment() {
    let env: Vec<(String, &str)> = EVERY_OPTION
        .iter()
        .map(|(flag, value)| {
            let name = flag
                .trim_start_matches("--")
                .replace('-', "_")
                .to_uppercase();
            (format!("WASMESH_{name}"), *value)
        })
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let out = wasmesh_proxy(
        &["init"],
        &[&env[..], &[("WASMESH_DRY_RUN", "true")]].concat(),
    );
    assert_golden("every_option", &stdout(&out));
}

/// A command line `init` must refuse, and what its error must say.
struct Refused {
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    says: &'static [&'static str],
}

const fn refused(args: &'static [&'static str], says: &'static [&'static str]) -> Refused {
    Refused {
        args,
        env: &[],
        says,
    }
}

#[test]
fn bad_values_are_refused_naming_the_flag() {
    let cases = [
        refused(
            &["--inbound-port", "0"],
            &["--inbound-port", "port 0 is out of range"],
        ),
        refused(&["--outbound-port", "70000"], &["--outbound-port", "70000"]),
        Refused {
            args: &[],
            env: &[("WASMESH_OUTBOUND_PORT", "0")],
            says: &["--outbound-port", "port 0"],
        },
        refused(
            &["--exclude-inbound-ports", "8080,70000"],
            &["--exclude-inbound-ports", "port 70000 is out of range"],
        ),
        refused(
            &["--exclude-outbound-ports", "http"],
            &["--exclude-outbound-ports", "`http` is not a port"],
        ),
        refused(
            &["--exclude-inbound-ports", "9-8"],
            &["--exclude-inbound-ports", "ends before it starts"],
        ),
        refused(
            &["--exclude-outbound-cidrs", "10.0.0.0/33"],
            &["--exclude-outbound-cidrs", "prefix length is longer"],
        ),
        refused(
            &["--include-outbound-cidrs", "10.96.0/12"],
            &["--include-outbound-cidrs", "not an IP address or network"],
        ),
        refused(
            &["--include-inbound-ports", "*,8080"],
            &["--include-inbound-ports", "`*` means everything"],
        ),
        refused(&["--proxy-uid=-1"], &["--proxy-uid"]),
        refused(&["--ipv6", "maybe"], &["--ipv6", "auto, on, off"]),
        refused(
            &["--inbound-port", "15001"],
            &["--inbound-port and --outbound-port are both 15001"],
        ),
        refused(
            &["--outbound-port", "15000"],
            &["--outbound-port is 15000, the proxy's admin port"],
        ),
    ];
    for Refused { args, env, says } in cases {
        let out = wasmesh_proxy(&[&["init", "--dry-run"], args].concat(), env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {env:?} was accepted");
        assert!(out.stdout.is_empty(), "{args:?}: printed rules anyway");
        for text in says {
            assert!(
                stderr.contains(text),
                "{args:?} {env:?}: stderr lacks {text:?}:\n{stderr}"
            );
        }
    }
}

#[test]
fn help_explains_every_flag_and_its_variable() {
    let help = stdout(&wasmesh_proxy(&["init", "--help"], &[]));
    for (flag, _) in EVERY_OPTION {
        let name = flag
            .trim_start_matches("--")
            .replace('-', "_")
            .to_uppercase();
        assert!(help.contains(flag), "--help lacks {flag}");
        assert!(
            help.contains(&format!("WASMESH_{name}")),
            "--help lacks WASMESH_{name}"
        );
    }
    for flag in ["--dry-run", "--cleanup", "--ipv6"] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}
