//! Running the system tools `init` drives (`iptables-save`, `iptables-restore`, their `ip6`
//! twins, `ip`), with input on stdin and errors that carry the tool's own message.

use std::io::{self, Write};
use std::process::{Command, Stdio};
use std::thread;

/// A tool could not be run, or said no.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("could not run `{program}` (is it installed and on PATH?)")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {message}{}", permission_hint(message))]
    Failed {
        command: String,
        status: String,
        message: String,
    },
}

fn permission_hint(message: &str) -> &'static str {
    let denied = [
        "Permission denied",
        "Operation not permitted",
        "must be root",
    ];
    if denied.iter().any(|d| message.contains(d)) {
        " — changing a network namespace's rules needs CAP_NET_ADMIN and CAP_NET_RAW (run as root, or add both capabilities to the init container)"
    } else {
        ""
    }
}

/// Runs `program args...`, feeding `stdin` if given; returns its stdout when it exits with 0.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ToolError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ToolError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    let output = thread::scope(|scope| {
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A tool that fails early stops reading; its exit status tells why, so a broken
            // pipe here is not the error to report.
            scope.spawn(move || pipe.write_all(input.as_bytes()));
        }
        child.wait_with_output()
    })
    .map_err(|source| ToolError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let mut message = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if message.is_empty() {
        message = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    }
    Err(ToolError::Failed {
        command,
        status: output.status.to_string(),
        message: message.replace('\n', "; "),
    })
}
