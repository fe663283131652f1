//! Health checks run by the instance that received a workload, before the move commits.
//!
//! Each check retries until its timeout (a workload needs a moment to start serving), and
//! reports what it saw. Checks only ever contact the address the workload file names.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::workload::HealthCheck;

/// Pause between attempts.
const RETRY_EVERY: Duration = Duration::from_millis(2);
/// Largest HTTP response head read.
const MAX_HEAD: usize = 8192;

/// What a health check saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthOutcome {
    pub healthy: bool,
    pub detail: String,
    pub elapsed_us: u64,
    pub attempts: u32,
}

/// Why one attempt of a health check failed (the last one ends up, as text, in
/// [`HealthOutcome::detail`]).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The TCP connection was refused or timed out.
    #[error("connect failed: {0}")]
    Connect(#[source] io::Error),
    /// The socket's read or write timeout could not be set.
    #[error("setting the socket timeout: {0}")]
    SocketTimeout(#[source] io::Error),
    /// Sending the HTTP request failed.
    #[error("send failed: {0}")]
    Send(#[source] io::Error),
    /// Reading the HTTP response failed.
    #[error("read failed: {0}")]
    Read(#[source] io::Error),
    /// The response does not start with an HTTP status line (the line, trimmed).
    #[error("not an HTTP status line: {0:?}")]
    NotHttp(String),
    /// The HTTP status is not the expected one.
    #[error("got status {got}, expected {want}")]
    Status { got: u16, want: u16 },
    /// An `exec` check with no command.
    #[error("empty command")]
    EmptyCommand,
    /// The check command could not be started.
    #[error("cannot run {prog}: {source}")]
    Spawn {
        prog: String,
        #[source]
        source: io::Error,
    },
    /// The check command exited unsuccessfully.
    #[error("{prog} {status}")]
    Exited { prog: String, status: ExitStatus },
    /// The check command was still running at the deadline (it was killed).
    #[error("{prog} did not finish in time")]
    TimedOut { prog: String },
    /// Waiting for the check command failed.
    #[error("waiting for {prog}: {source}")]
    Wait {
        prog: String,
        #[source]
        source: io::Error,
    },
}

/// Runs `check`, retrying until it passes or its timeout elapses.
pub fn run(check: &HealthCheck) -> HealthOutcome {
    let start = Instant::now();
    type Attempt = Box<dyn Fn(Duration) -> Result<String, ProbeError>>;
    let (timeout, attempt): (u64, Attempt) = match check {
        HealthCheck::None => {
            return HealthOutcome {
                healthy: true,
                detail: "no health check configured".to_owned(),
                elapsed_us: 0,
                attempts: 0,
            };
        }
        HealthCheck::Notify { .. } => {
            return HealthOutcome {
                healthy: false,
                detail: "a notify check is decided by the workload's supervisor (READY=1 on \
                         its notify socket), not by a probe"
                    .to_owned(),
                elapsed_us: 0,
                attempts: 0,
            };
        }
        HealthCheck::Tcp { addr, timeout_ms } => {
            let addr = *addr;
            (*timeout_ms, Box::new(move |left| tcp(addr, left)))
        }
        HealthCheck::Http {
            addr,
            path,
            expect_status,
            timeout_ms,
        } => {
            let (addr, path, want) = (*addr, path.clone(), *expect_status);
            (
                *timeout_ms,
                Box::new(move |left| http(addr, &path, want, left)),
            )
        }
        HealthCheck::Exec {
            command,
            timeout_ms,
        } => {
            let command = command.clone();
            (*timeout_ms, Box::new(move |left| exec(&command, left)))
        }
    };
    let deadline = start + Duration::from_millis(timeout);
    let mut attempts = 0;
    // The last failure that was a complete answer (not cut short by the deadline): it is
    // what the operator needs to hear ("exit status 3"), not "did not finish in time".
    let mut last_answer: Option<ProbeError> = None;
    loop {
        attempts += 1;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let result = attempt(left);
        let elapsed_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        match result {
            Ok(detail) => {
                return HealthOutcome {
                    healthy: true,
                    detail,
                    elapsed_us,
                    attempts,
                };
            }
            Err(detail) if Instant::now() >= deadline => {
                let detail = last_answer.unwrap_or(detail);
                return HealthOutcome {
                    healthy: false,
                    detail: format!("{check}: {detail} (after {attempts} attempts, {timeout} ms)"),
                    elapsed_us,
                    attempts,
                };
            }
            Err(detail) => {
                last_answer = Some(detail);
                std::thread::sleep(RETRY_EVERY);
            }
        }
    }
}

fn tcp(addr: SocketAddr, left: Duration) -> Result<String, ProbeError> {
    TcpStream::connect_timeout(&addr, left)
        .map(|_| format!("tcp connect {addr} ok"))
        .map_err(ProbeError::Connect)
}

fn http(addr: SocketAddr, path: &str, want: u16, left: Duration) -> Result<String, ProbeError> {
    let mut s = TcpStream::connect_timeout(&addr, left).map_err(ProbeError::Connect)?;
    s.set_read_timeout(Some(left))
        .map_err(ProbeError::SocketTimeout)?;
    s.set_write_timeout(Some(left))
        .map_err(ProbeError::SocketTimeout)?;
    // One write: a server may answer and close as soon as it has the request line.
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: mk-upgrade-health\r\n\r\n");
    s.write_all(request.as_bytes()).map_err(ProbeError::Send)?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < MAX_HEAD {
        let n = s.read(&mut buf).map_err(ProbeError::Read)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| ProbeError::NotHttp(line.trim_end().to_owned()))?;
    if status == want {
        Ok(format!("http GET {addr}{path} -> {status}"))
    } else {
        Err(ProbeError::Status { got: status, want })
    }
}

fn exec(command: &[String], left: Duration) -> Result<String, ProbeError> {
    let (prog, args) = command.split_first().ok_or(ProbeError::EmptyCommand)?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| ProbeError::Spawn {
            prog: prog.clone(),
            source,
        })?;
    let deadline = Instant::now() + left;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(format!("{prog} exited 0")),
            Ok(Some(status)) => {
                return Err(ProbeError::Exited {
                    prog: prog.clone(),
                    status,
                });
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ProbeError::TimedOut { prog: prog.clone() });
            }
            Ok(None) => std::thread::sleep(RETRY_EVERY),
            Err(source) => {
                return Err(ProbeError::Wait {
                    prog: prog.clone(),
                    source,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn none_is_healthy() {
        assert!(run(&HealthCheck::None).healthy);
    }

    #[test]
    fn tcp_passes_on_a_listener_and_fails_without() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let ok = run(&HealthCheck::Tcp {
            addr,
            timeout_ms: 500,
        });
        assert!(ok.healthy, "{ok:?}");
        drop(l);
        let bad = run(&HealthCheck::Tcp {
            addr,
            timeout_ms: 50,
        });
        assert!(!bad.healthy);
        assert!(bad.detail.contains("connect failed"), "{}", bad.detail);
        assert!(bad.attempts >= 1);
    }

    fn serve_once(reply: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            while let Ok((mut s, _)) = l.accept() {
                // Read the whole request head, then answer and close.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(reply.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn http_checks_the_status() {
        let addr = serve_once("HTTP/1.0 200 OK\r\n\r\n");
        let check = |want| HealthCheck::Http {
            addr,
            path: "/health".into(),
            expect_status: want,
            timeout_ms: 500,
        };
        assert!(run(&check(200)).healthy);
        let bad = run(&check(204));
        assert!(
            !bad.healthy && bad.detail.contains("got status 200"),
            "{bad:?}"
        );
        let junk = serve_once("SSH-2.0-nope\r\n");
        let bad = run(&HealthCheck::Http {
            addr: junk,
            path: "/".into(),
            expect_status: 200,
            timeout_ms: 500,
        });
        assert!(bad.detail.contains("not an HTTP status line"), "{bad:?}");
    }

    #[test]
    fn exec_uses_the_exit_status() {
        let ok = run(&HealthCheck::Exec {
            command: vec!["/bin/sh".into(), "-c".into(), "exit 0".into()],
            timeout_ms: 2000,
        });
        assert!(ok.healthy, "{ok:?}");
        let bad = run(&HealthCheck::Exec {
            command: vec!["/bin/sh".into(), "-c".into(), "exit 3".into()],
            timeout_ms: 500,
        });
        assert!(
            !bad.healthy && bad.detail.contains("exit status: 3"),
            "{bad:?}"
        );
        let missing = run(&HealthCheck::Exec {
            command: vec!["/nonexistent/check".into()],
            timeout_ms: 10,
        });
        assert!(missing.detail.contains("cannot run"), "{missing:?}");
        let slow = run(&HealthCheck::Exec {
            command: vec!["/bin/sleep".into(), "5".into()],
            timeout_ms: 50,
        });
        assert!(slow.detail.contains("did not finish"), "{slow:?}");
    }
}
