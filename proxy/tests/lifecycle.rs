//! The sidecar's lifecycle as the kubelet and a Job see it: `wasmesh-proxy wait` holds until
//! `/ready`, and `POST /quitquitquit` ends `run` with exit code 0.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_wasmesh-proxy");

/// An admin stand-in that answers 503 `not_ready_for` times, then 200.
async fn fake_admin(not_ready_for: usize) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            let status = if n < not_ready_for {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            n += 1;
            let _ = s
                .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                .await;
        }
    });
    a
}

#[tokio::test]
async fn wait_returns_once_ready_and_fails_after_its_timeout() {
    let admin = fake_admin(3).await;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args([
                "wait",
                "--timeout-seconds",
                "20",
                "--admin",
                &admin.to_string(),
            ])
            .output()
    })
    .await
    .expect("join")
    .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing listens here.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let start = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args([
                "wait",
                "--timeout-seconds",
                "1",
                "--admin",
                &dead.to_string(),
            ])
            .output()
    })
    .await
    .expect("join")
    .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("was not ready after 1s"));
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn quitquitquit_ends_run_with_exit_code_zero() {
    let admin = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    // Ports above 15000 on loopback, chosen free by binding first.
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
    };
    let (outp, inp) = (free().expect("port"), free().expect("port"));
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--control",
            "http://127.0.0.1:9",
            "--admin",
            &admin.to_string(),
            "--outbound-port",
            &outp.to_string(),
            "--inbound-port",
            &inp.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(log.reopen().expect("log"))
        .spawn()
        .expect("spawn");
    // Wait for the admin port (a debug build on a busy machine can take seconds to start),
    // then ask it to quit. A proxy that exited instead says why in its log.
    let mut stream = None;
    for _ in 0..400 {
        if let Ok(s) = TcpStream::connect(admin).await {
            stream = Some(s);
            break;
        }
        if let Some(st) = child.try_wait().expect("wait") {
            let why = std::fs::read_to_string(log.path()).unwrap_or_default();
            panic!("the proxy exited before its admin port was up ({st}):\n{why}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(mut s) = stream else {
        let _ = child.kill();
        let why = std::fs::read_to_string(log.path()).unwrap_or_default();
        panic!("admin port not up after 20 s:\n{why}");
    };
    s.write_all(
        b"POST /quitquitquit HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("post");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("join")
    .expect("the proxy exited");
    assert!(status.success(), "exit code 0 so a Job succeeds: {status}");
}

#[test]
fn bad_access_log_flags_are_refused_with_a_clear_error() {
    let run = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args([
                "run",
                "--control",
                "http://127.0.0.1:9",
                "--admin",
                "127.0.0.1:0",
            ])
            .args(["--outbound-port", "0", "--inbound-port", "0"])
            .args(extra)
            .output()
            .expect("run the proxy");
        assert!(!out.status.success(), "{extra:?} refused");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--access-log", "/nonexistent-dir/access.json"]);
    assert!(
        err.contains("cannot open the access log /nonexistent-dir/access.json"),
        "{err}"
    );
    let err = run(&["--access-log", "stdout", "--access-log-sample", "1.5"]);
    assert!(err.contains("is not a sample rate"), "{err}");
}
