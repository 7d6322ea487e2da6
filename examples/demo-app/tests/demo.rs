//! `wasmesh-demo` end to end on loopback: the backend says who it is and where the connection
//! landed, the client counts, `fetch` prints, and SIGTERM drains before exiting.
//! (Also makes `cargo test --workspace` build the binary the local-mesh tests run.)

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_wasmesh-demo");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Backend {
    child: Child,
    port: u16,
}

impl Backend {
    fn start(name: &str, drain: &str) -> Self {
        let port = free_port();
        let child = Command::new(BIN)
            .args([
                "backend",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--drain",
                drain,
            ])
            .env("POD_NAME", name)
            .stdout(Stdio::null())
            .spawn()
            .expect("backend");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the backend never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("wasmesh-demo");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn the_client_counts_answers_per_pod() {
    let b = Backend::start("web-1", "0");
    let (ok, out) = run(&[
        "client",
        "--url",
        &b.url(),
        "--count",
        "3",
        "--interval",
        "0",
        "--verbose",
    ]);
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("#1 200 answered by web-1 ("), "{out}");
    assert!(
        lines[0].contains(&format!("served at 127.0.0.1:{} for 127.0.0.1:", b.port)),
        "{out}"
    );
    assert!(lines[2].ends_with("| web-1=3"), "{out}");
    assert_eq!(lines[3], "done: 3 calls, 0 failed, answered by 1 pods");

    let (ok, out) = run(&["fetch", &b.url()]);
    assert!(ok, "{out}");
    assert_eq!(out, "hello from web-1\n");
}

#[test]
fn failed_calls_are_reported_and_fail_fast_stops_at_the_first() {
    let url = format!("http://127.0.0.1:{}/", free_port());
    let (ok, out) = run(&["client", "--url", &url, "--count", "2", "--interval", "0"]);
    assert!(!ok);
    assert!(
        out.contains("#1 failed after") && out.contains("failed=2"),
        "{out}"
    );
    let (ok, out) = run(&[
        "client",
        "--url",
        &url,
        "--count",
        "5",
        "--interval",
        "0",
        "--fail-fast",
    ]);
    assert!(!ok);
    assert_eq!(
        out.lines().filter(|l| l.starts_with('#')).count(),
        1,
        "{out}"
    );
}

#[test]
fn the_backend_keeps_serving_while_it_drains() {
    let mut b = Backend::start("web-2", "700ms");
    let stopped = Instant::now();
    let term = Command::new("kill")
        .args(["-s", "TERM", &b.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    std::thread::sleep(Duration::from_millis(200));
    let (ok, out) = run(&["fetch", &b.url()]);
    assert!(ok, "still serving while draining: {out}");
    let status = loop {
        if let Some(s) = b.child.try_wait().expect("wait") {
            break s;
        }
        assert!(stopped.elapsed() < Duration::from_secs(10), "never exited");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(stopped.elapsed() >= Duration::from_millis(700));
}
