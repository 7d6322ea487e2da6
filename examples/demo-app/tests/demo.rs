//! `wasmesh-demo` end to end on loopback: the backend says who it is and where the connection
//! landed, the client counts (new connections, one kept-alive, one HTTP/2), `fetch` prints,
//! SIGTERM drains before exiting; WebSocket, gRPC, the greeter and `raw` work.
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
        Self::start_with(name, &["--drain", drain], &[])
    }

    /// `wasmesh-demo <args> --listen 127.0.0.1:<port>` (`backend` unless `args` says
    /// otherwise), ready once the port accepts.
    fn start_with(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["backend", "--listen", &listen];
        if extra.first() == Some(&"greeter") {
            args = vec!["greeter", "--listen", &listen];
            args.extend_from_slice(&extra[1..]);
        } else {
            args.extend_from_slice(extra);
        }
        let child = Command::new(BIN)
            .args(&args)
            .env("POD_NAME", name)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .expect("backend");
        wait_listening(port);
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

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the backend never listened on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
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
    assert_eq!(
        lines[3],
        "done: 3 calls, 0 failed, answered by 1 pods, 3 connections"
    );

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

#[test]
fn reuse_and_h2_keep_one_connection_and_the_tally_shows_versions() {
    let b = Backend::start_with("web-3", &["--drain", "0"], &[("VERSION", "v2")]);
    for mode in ["--reuse", "--h2"] {
        let (ok, out) = run(&[
            "client",
            "--url",
            &b.url(),
            "--count",
            "8",
            "--interval",
            "0",
            mode,
        ]);
        assert!(ok, "{mode}: {out}");
        assert!(
            out.contains("#1 200 answered by web-3 (") && out.contains(" version v2"),
            "{mode}: {out}"
        );
        assert!(
            out.lines().last().unwrap_or("").ends_with(
                "done: 8 calls, 0 failed, answered by 1 pods, versions v2=8, 1 connections"
            ),
            "{mode}: {out}"
        );
    }
    // Multiplexed: 20 calls, 5 at a time, one connection.
    let (ok, out) = run(&[
        "client",
        "--url",
        &b.url(),
        "--count",
        "20",
        "--h2",
        "--concurrency",
        "5",
        "--path",
        "/sleep/20",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains(", 1 connections"), "{out}");
}

#[test]
fn paths_status_and_headers_answer_as_documented() {
    let b = Backend::start_with("web-4", &["--drain", "0"], &[]);
    let (ok, out) = run(&[
        "client",
        "--url",
        &b.url(),
        "--count",
        "1",
        "--path",
        "/status/418",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("#1 418 answered by web-4"), "{out}");
    assert!(out.contains("statuses 418=1"), "{out}");
    let (ok, out) = run(&["fetch", &format!("{}headers", b.url())]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("host: 127.0.0.1:{}\n", b.port)),
        "{out}"
    );

    let started = Instant::now();
    let (ok, out) = run(&["fetch", &format!("{}sleep/300", b.url())]);
    assert!(ok && out == "hello from web-4\n", "{out}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    let failing = Backend::start_with("web-5", &["--drain", "0", "--status", "503"], &[]);
    let (ok, out) = run(&[
        "client",
        "--url",
        &failing.url(),
        "--count",
        "2",
        "--interval",
        "0",
        "--header",
        "x-test: 1",
    ]);
    assert!(ok, "a 503 is an answer, not a failed call: {out}");
    assert!(out.contains("#2 503 answered by web-5"), "{out}");
}

#[test]
fn websocket_grpc_and_greeter_work_end_to_end() {
    let grpc_port = free_port();
    let grpc_listen = format!("127.0.0.1:{grpc_port}");
    let b = Backend::start_with(
        "web-6",
        &["--drain", "0", "--grpc-listen", &grpc_listen],
        &[("VERSION", "v1")],
    );
    wait_listening(grpc_port);
    let ws_url = format!("ws://127.0.0.1:{}/ws", b.port);
    let (ok, out) = run(&["ws", "--url", &ws_url, "--count", "3"]);
    assert!(ok, "{out}");
    assert!(out.contains("connected: 101 from web-6"), "{out}");
    assert!(
        out.contains("done: 3 messages, 0 failed, echoed by web-6"),
        "{out}"
    );

    let grpc_url = format!("http://{grpc_listen}");
    let (ok, out) = run(&[
        "grpc-call",
        "--to",
        &grpc_url,
        "--count",
        "3",
        "--stream",
        "4",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("#3 OK answered by web-6 ("), "{out}");
    assert!(
        out.contains("stream: 4 of 4 replies from web-6, in order"),
        "{out}"
    );
    assert!(
        out.contains("done: 3 calls, 0 failed, answered by 1 pods, versions v1=3"),
        "{out}"
    );

    let g = Backend::start_with("greeter-1", &["greeter"], &[]);
    let (ok, out) = run(&["greeter", "--connect", &format!("127.0.0.1:{}", g.port)]);
    assert!(ok, "{out}");
    assert!(out.contains(": 220 greeter-1 greeter ready"), "{out}");
    assert!(out.contains("bye: 221 bye"), "{out}");

    let (ok, out) = run(&[
        "raw",
        "--to",
        &format!("127.0.0.1:{}", b.port),
        "--send",
        "GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n",
    ]);
    assert!(ok, "{out}");
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.contains("closed by the server"), "{out}");
}
