//! Throw-away network namespaces and helper processes for the kernel tests.
//!
//! A [`Cluster`] is two namespaces the test creates (and always deletes, on drop): the "pod"
//! (10.244.1.5, fd00:244::5) and a "peer" standing for the rest of the cluster (10.244.1.6 and
//! .7, fd00:244::6), joined by a veth pair made directly inside them. The Service ranges
//! 10.96.0.0/12 and fd00:96::/108 are routed from the pod to the peer, where nothing answers,
//! like a ClusterIP nobody NATed. Nothing is created in, or routed through, the host's own
//! namespace.
//!
//! Listeners and clients are this test binary run again inside a namespace (`ip netns exec`,
//! `setpriv` for the app or proxy UID) with [`HELPER_ENV`] set: `tests/netns.rs`'s
//! `helper_process` test hands control to [`run_helper_if_asked`]. A listener tells every
//! connection where it landed (`<tag> local=... peer=... orig_dst=...`, the original destination
//! read with `wasmesh_proxy::orig_dst::original_dst`), and the client prints what it was told,
//! so a test asserts where the bytes arrived.

use std::env;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use wasmesh_proxy::orig_dst::original_dst;

pub const PROXY_BIN: &str = env!("CARGO_BIN_EXE_wasmesh-proxy");

pub const POD_IP: &str = "10.244.1.5";
pub const PEER_IP: &str = "10.244.1.6";
pub const PEER_IP_2: &str = "10.244.1.7";
pub const POD_IP6: &str = "fd00:244::5";
pub const PEER_IP6: &str = "fd00:244::6";

/// Upper bound for anything a helper waits for; never reached when things work.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// A listener exits by itself after this, should its test die without killing it.
const LISTENER_LIFETIME: Duration = Duration::from_secs(300);

/// Whether this test can run: root is needed for namespaces and iptables. Without root the
/// test is skipped with a note, unless `CI` is set, where it fails.
pub fn have_root(test: &str) -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_owned));
    if euid.as_deref() == Some("0") {
        return true;
    }
    assert!(
        env::var_os("CI").is_none(),
        "{test} needs root (network namespaces, iptables); CI is set, so this fails instead of skipping"
    );
    eprintln!("note: skipping {test}: needs root (network namespaces, iptables)");
    false
}

/// Runs a command to completion; panics, with its stderr, unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace named `wmtest-<pid>-<n>`, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "wmtest-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program args...` inside this namespace, stopped after a minute at most.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "timeout", "60", program])
            .args(args);
        cmd
    }

    /// `ip -n <ns> args...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Who a client connects as.
#[derive(Clone, Copy, Debug)]
pub enum User {
    /// An application process: uid/gid 1000.
    App,
    /// The proxy: uid/gid 1337.
    Proxy,
    /// Any uid and gid.
    Ids(u32, u32),
}

impl User {
    fn ids(self) -> (u32, u32) {
        match self {
            User::App => (1000, 1000),
            User::Proxy => (1337, 1337),
            User::Ids(uid, gid) => (uid, gid),
        }
    }
}

/// The pod namespace, the peer namespace and the veth between them.
pub struct Cluster {
    pub pod: Netns,
    pub peer: Netns,
}

impl Cluster {
    pub fn new() -> Self {
        let pod = Netns::new();
        let peer = Netns::new();
        pod.ip(&[
            "link",
            "add",
            "v0",
            "type",
            "veth",
            "peer",
            "name",
            "v1",
            "netns",
            peer.name(),
        ]);
        for (ns, dev, addrs) in [
            (
                &pod,
                "v0",
                &[("10.244.1.5/24", false), ("fd00:244::5/64", true)][..],
            ),
            (
                &peer,
                "v1",
                &[
                    ("10.244.1.6/24", false),
                    ("10.244.1.7/24", false),
                    ("fd00:244::6/64", true),
                ][..],
            ),
        ] {
            for (addr, v6) in addrs {
                let mut args = vec!["addr", "add", addr, "dev", dev];
                if *v6 {
                    // Usable at once: no duplicate address detection to wait for.
                    args.push("nodad");
                }
                ns.ip(&args);
            }
            ns.ip(&["link", "set", dev, "up"]);
        }
        pod.ip(&["route", "add", "10.96.0.0/12", "via", PEER_IP]);
        pod.ip(&["-6", "route", "add", "fd00:96::/108", "via", PEER_IP6]);
        Self { pod, peer }
    }

    /// `wasmesh-proxy init args...` in the pod namespace.
    pub fn init(&self, args: &[&str]) -> Output {
        self.pod
            .command(PROXY_BIN, &[&["init"], args].concat())
            .output()
            .expect("run wasmesh-proxy init")
    }

    /// `wasmesh-proxy init args...`, which must succeed.
    pub fn init_ok(&self, args: &[&str]) {
        let out = self.init(args);
        assert!(
            out.status.success(),
            "init {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// What a helper process is asked to do; read from the environment.
pub const HELPER_ENV: &str = "WMTEST_HELPER";
const HELPER_ARGS_ENV: &str = "WMTEST_HELPER_ARGS";

fn helper_command(ns: &Netns, user: Option<User>, role: &str, args: &[String]) -> Command {
    let exe = env::current_exe().expect("test binary path");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()]);
    if role == "connect" {
        cmd.args(["timeout", "30"]);
    }
    if let Some(user) = user {
        let (uid, gid) = user.ids();
        cmd.args([
            "setpriv",
            "--reuid",
            &uid.to_string(),
            "--regid",
            &gid.to_string(),
        ])
        .arg("--clear-groups");
    }
    cmd.arg(exe)
        .args([
            "--exact",
            "helper_process",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(HELPER_ENV, role)
        .env(HELPER_ARGS_ENV, args.join(" "));
    cmd
}

/// Listeners (tag and address) in a namespace; killed on drop.
pub struct Listeners {
    child: Child,
}

impl Listeners {
    /// Starts listening on every `(tag, address)` and returns once all are bound.
    pub fn start(ns: &Netns, listeners: &[(&str, &str)]) -> Self {
        let args: Vec<String> = listeners.iter().map(|(t, a)| format!("{t}={a}")).collect();
        let mut child = helper_command(ns, None, "listen", &args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start listener helper");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut guard = Self { child };
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == "READY" {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(HELPER_TIMEOUT).is_err() {
            let _ = guard.child.kill();
            panic!("listeners {listeners:?} in {} did not come up", ns.name());
        }
        guard
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a connection ended up, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the listener tagged `at`.
    Landed {
        at: String,
        local: SocketAddr,
        peer: SocketAddr,
        /// `None` when the kernel had no conntrack entry (the peer namespace has no nat rules).
        orig_dst: Option<SocketAddr>,
    },
    /// connect or read failed; the io::ErrorKind and message.
    Failed(String),
}

impl Outcome {
    /// Panics unless the connection landed on `at`; returns `(local, orig_dst)`.
    #[track_caller]
    pub fn landed_at(&self, at: &str) -> (SocketAddr, Option<SocketAddr>) {
        match self {
            Outcome::Landed {
                at: tag,
                local,
                orig_dst,
                ..
            } if tag == at => (*local, *orig_dst),
            other => panic!("expected the connection to land on `{at}`, got {other:?}"),
        }
    }

    pub fn peer(&self) -> Option<SocketAddr> {
        match self {
            Outcome::Landed { peer, .. } => Some(*peer),
            Outcome::Failed(_) => None,
        }
    }
}

/// Connects from namespace `ns` as `user` (optionally from source address `from`) to `to`.
pub fn connect(ns: &Netns, user: User, from: Option<&str>, to: &str) -> Outcome {
    let mut args = vec![to.to_owned()];
    if let Some(from) = from {
        args.push(format!("from={from}"));
    }
    let out = run_ok(&mut helper_command(ns, Some(user), "connect", &args));
    let result = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("connect helper printed no result:\n{out}"));
    parse_outcome(result)
}

fn parse_outcome(result: &str) -> Outcome {
    if let Some(error) = result.strip_prefix("ERR ") {
        return Outcome::Failed(error.to_owned());
    }
    let mut words = result.split_whitespace();
    let at = words.next().unwrap_or_default().to_owned();
    let field = |name: &str| {
        result
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {result:?}"))
            .to_owned()
    };
    let addr = |name: &str| -> SocketAddr {
        field(name)
            .parse()
            .unwrap_or_else(|e| panic!("{name} in {result:?}: {e}"))
    };
    Outcome::Landed {
        at,
        local: addr("local="),
        peer: addr("peer="),
        orig_dst: field("orig_dst=").parse().ok(),
    }
}

/// The helper side: called first thing by `helper_process`; does nothing in a normal test run.
pub fn run_helper_if_asked() {
    let Ok(role) = env::var(HELPER_ENV) else {
        return;
    };
    let args: Vec<String> = env::var(HELPER_ARGS_ENV)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    match role.as_str() {
        "listen" => listen(&args),
        "connect" => println!("RESULT {}", connect_once(&args)),
        other => panic!("unknown helper role {other}"),
    }
}

fn listen(args: &[String]) {
    for arg in args {
        let (tag, addr) = arg.split_once('=').expect("tag=address");
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let tag = tag.to_owned();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let local = stream
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                let orig =
                    original_dst(&stream).map_or_else(|_| "none".to_owned(), |a| a.to_string());
                let _ = writeln!(stream, "{tag} local={local} peer={peer} orig_dst={orig}");
            }
        });
    }
    println!("READY");
    let _ = std::io::stdout().flush();
    thread::sleep(LISTENER_LIFETIME);
    std::process::exit(0);
}

fn connect_once(args: &[String]) -> String {
    let to: SocketAddr = args[0].parse().expect("destination address");
    let from: Option<IpAddr> = args
        .get(1)
        .and_then(|a| a.strip_prefix("from="))
        .map(|a| a.parse().expect("source address"));
    let attempt = || -> std::io::Result<String> {
        let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
        if let Some(from) = from {
            socket.bind(&SockAddr::from(SocketAddr::new(from, 0)))?;
        }
        socket.connect_timeout(&SockAddr::from(to), HELPER_TIMEOUT)?;
        socket.set_read_timeout(Some(HELPER_TIMEOUT))?;
        let mut stream: std::net::TcpStream = socket.into();
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply.trim().to_owned())
    };
    match attempt() {
        Ok(reply) if !reply.is_empty() => reply,
        Ok(_) => "ERR closed without a word".to_owned(),
        Err(e) => format!("ERR {:?} {e}", e.kind()),
    }
}
