//! Processes: signals by pid (through `kill(1)`, so no `unsafe`), liveness, and running a
//! command to completion with a bound on its time.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Kill => "KILL",
        }
    }
}

/// Sends `signal` to every pid; pids already gone are fine.
pub fn signal(pids: &[u32], signal: Signal) {
    if pids.is_empty() {
        return;
    }
    let mut cmd = Command::new("kill");
    cmd.args(["-s", signal.name(), "--"]);
    cmd.args(pids.iter().map(u32::to_string));
    let _ = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether the process exists and has not exited (a zombie has).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// Waits until none of `pids` is alive, or `timeout`; returns those still alive.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, up to `grace` to exit, then SIGKILL.
pub fn stop(pids: &[u32], grace: Duration) {
    signal(pids, Signal::Term);
    let left = wait_gone(pids, grace);
    if !left.is_empty() {
        signal(&left, Signal::Kill);
        wait_gone(&left, Duration::from_secs(2));
    }
}

/// Whether the process's command line mentions `needle` (to tell our `up` from a reused pid).
pub fn cmdline_contains(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

/// A running `wasmesh-local up` other than this process whose prefix (`--prefix`, default
/// [`crate::config::DEFAULT_PREFIX`]) is `prefix`.
pub fn other_up_with_prefix(prefix: &str) -> Option<u32> {
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me || !alive(pid) {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_up = args.first().is_some_and(|a| a.ends_with("wasmesh-local"))
            && args.get(1).is_some_and(|a| a == "up");
        if is_up && up_prefix(&args) == prefix {
            return Some(pid);
        }
    }
    None
}

/// The prefix an `up` command line uses.
fn up_prefix(args: &[String]) -> String {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--prefix" {
            if let Some(v) = it.next() {
                return v.clone();
            }
        } else if let Some(v) = a.strip_prefix("--prefix=") {
            return v.to_string();
        }
    }
    crate::config::DEFAULT_PREFIX.to_string()
}

/// The output of a command that must succeed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// Runs `program args` and returns its stdout; an error names the command and its stderr.
pub fn run(program: impl AsRef<Path>, args: &[&str]) -> Result<String, RunError> {
    let program = program.as_ref();
    let command = std::iter::once(program.display().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RunError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(RunError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_and_stop() {
        let mut child = Command::new("sleep").arg("30").spawn().expect("sleep");
        let pid = child.id();
        assert!(alive(pid));
        // The command line is there once exec is done.
        std::thread::sleep(Duration::from_millis(100));
        assert!(cmdline_contains(pid, "sleep"));
        stop(&[pid], Duration::from_secs(2));
        // Reaped by us; until then it is a zombie, which counts as gone.
        assert!(!alive(pid));
        let _ = child.wait();
        assert!(!alive(pid));
    }

    #[test]
    fn prefixes_of_up_command_lines() {
        let args = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
        assert_eq!(up_prefix(&args("wasmesh-local up dir")), "wm-");
        assert_eq!(
            up_prefix(&args("wasmesh-local up dir --prefix wmdemo-")),
            "wmdemo-"
        );
        assert_eq!(up_prefix(&args("wasmesh-local up --prefix=x- dir")), "x-");
    }

    #[test]
    fn run_reports_the_command_and_its_stderr() {
        assert_eq!(run("echo", &["hi"]).expect("echo").trim(), "hi");
        let e = run("sh", &["-c", "echo nope >&2; exit 3"]).expect_err("fails");
        let msg = e.to_string();
        assert!(msg.contains("sh -c") && msg.contains("nope"), "{msg}");
    }
}
