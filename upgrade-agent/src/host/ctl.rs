//! The control socket of an emulated instance (`ctl.sock`). **Emulation**: on a real
//! multikernel host these operations are done by the agent inside that kernel (freezing
//! its own cgroups, handing its own preserved fds); here the instance supervisor does them
//! on the orchestrator's request.
//!
//! One request, one response, JSON bodies framed by [`crate::sys::fdpass`]; the `Fds`
//! response carries the workload's preserved descriptors with SCM_RIGHTS.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fault::Faults;
use crate::model::{InstanceId, PlatformError, WorkloadInfo};
use crate::record::{UpgradeKind, UpgradeRecord};
use crate::sys::fdpass;
use crate::workload::WorkloadSpec;

/// How long a control request may take (freezing and starting are quick; a stop may wait
/// for the process to die). A `Freeze` of a restart-mode workload waits for its graceful
/// stop and a `Health` for its check: each gets its workload file's longest bound on top.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How a supervisor's error answer to a request it cannot decode begins (it did nothing):
/// a client may then fall back to older requests.
pub const MALFORMED_REQUEST: &str = "malformed control request";

impl Request {
    /// How long the answer may take.
    pub fn timeout(&self) -> Duration {
        match self {
            Request::Freeze { .. } | Request::FreezeFds { .. } => {
                REQUEST_TIMEOUT + Duration::from_millis(crate::workload::MAX_STOP_TIMEOUT_MS)
            }
            Request::Health { .. } => {
                REQUEST_TIMEOUT + Duration::from_millis(crate::workload::MAX_HEALTH_TIMEOUT_MS)
            }
            _ => REQUEST_TIMEOUT,
        }
    }
}

/// A request to an instance supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Who are you, what runs on you.
    Ping,
    /// What `Ping` says of one workload (its process reaped if it exited), without the
    /// others: a move asks this before its freeze, at a cost that does not grow with the
    /// number of workloads on the instance. Answer: `Workload`. A supervisor before this
    /// request answers "malformed control request": the caller then pings.
    Workload { name: String },
    /// First start of a workload (fresh preserved fds).
    Start { spec: Box<WorkloadSpec> },
    /// Freeze a workload for a move: `cgroup.freeze` (handover, socket-activation); for a
    /// restart-mode workload, stop its process gracefully (`stop_signal`, then `SIGKILL`
    /// after `stop_timeout_ms`), keeping its fd store.
    Freeze { name: String },
    /// Undo `Freeze`: thaw it, or start a stopped restart-mode workload again.
    Thaw { name: String },
    /// `Freeze`, then `Fds`, in one round trip (the move's blackout starts with it): the
    /// answer is `Fds` with the descriptors attached, taken once the workload is frozen.
    /// If they cannot be taken, the freeze is undone (as by `Thaw`) before the error is
    /// answered: an error means the workload is not left frozen by this request.
    FreezeFds { name: String },
    /// Run the workload's health check now (and check that its process is alive).
    Health { name: String },
    /// Duplicates of the workload's preserved fds (attached to the response).
    Fds { name: String },
    /// Stop a workload for good and drop its preserved fds.
    Stop { name: String },
    /// Run on these cpus from now on (the instance and all its workloads).
    Cpus { cpus: Vec<u32> },
    /// Accept channel frames of this upgrade id (hex) from now on.
    Expect { upgrade_id: String },
    /// Halt the instance (every remaining workload is stopped).
    Halt,
    /// Host agent of a LUO kernel only (`mk-agentd serve`, see [`crate::platform::luo`]):
    /// run an upgrade with the orchestrator: stage every workload in LUO sessions and kexec
    /// into the attached kernel. Attached fds: the verified, sealed kernel image (absent
    /// for a rollback: the agent's previous kernel, with its own initramfs and command
    /// line), then the initramfs if any. No answer on success (the machine kexecs; the
    /// next kernel's agent reports); `Finished` when the upgrade ended in this kernel.
    LuoApply {
        kind: UpgradeKind,
        /// The verified release and SHA-256 (hex) of the attached kernel.
        release: String,
        sha256: String,
        /// Command line of the next kernel (`liveupdate=on` is added when missing).
        cmdline: String,
        /// Test-only faults (honoured by fault-injection builds only).
        #[serde(default)]
        faults: Faults,
        /// Whether a kernel image is attached (else: the agent's previous kernel).
        kernel_attached: bool,
        /// Whether an initramfs is attached (after the kernel, if any).
        initrd_attached: bool,
        /// The version floor the verified image's manifest sets (raised when the upgrade
        /// ends upgraded, by whichever kernel finishes it).
        #[serde(default)]
        floor: Option<String>,
    },
}

/// The supervisor's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Pong {
        id: InstanceId,
        kernel_release: String,
        cpus: Vec<u32>,
        freezer: String,
        workloads: Vec<WorkloadInfo>,
    },
    Started(WorkloadInfo),
    /// `Workload`: that workload.
    Workload(WorkloadInfo),
    /// `Fds`: the names of the attached descriptors, in order.
    Fds {
        names: Vec<String>,
    },
    Done,
    /// `Health`: the verdict and what was seen.
    Health {
        healthy: bool,
        detail: String,
    },
    Error {
        message: String,
    },
    /// `LuoApply`: there is nothing to do (a rollback with no previous kernel kept).
    NothingToDo {
        message: String,
    },
    /// `LuoApply`: refused, the kernel is below the version floor; nothing changed.
    BelowFloor {
        message: String,
    },
    /// `LuoApply`: the upgrade ended in this kernel (refused, rolled back, failed).
    Finished {
        record: Box<UpgradeRecord>,
        error: Option<String>,
    },
}

/// Sends `req` to the supervisor listening on `socket`; returns the response and any fds.
pub fn call(
    id: InstanceId,
    socket: &Path,
    req: &Request,
) -> Result<(Response, Vec<OwnedFd>), PlatformError> {
    call_with_fds(id, socket, req, &[], req.timeout())
}

/// [`call`] with `fds` attached to the request and a read timeout of `timeout`.
pub fn call_with_fds(
    id: InstanceId,
    socket: &Path,
    req: &Request,
    send_fds: &[std::os::fd::BorrowedFd<'_>],
    timeout: Duration,
) -> Result<(Response, Vec<OwnedFd>), PlatformError> {
    let stream = connect(id, socket)?;
    send(id, &stream, req, send_fds)?;
    receive(id, &stream, timeout)
}

/// A control connection kept open across requests, so that a request inside a move's
/// blackout (`FreezeFds`) finds a connection, and a thread serving it, already there.
/// Empty until the first request.
#[derive(Debug, Default)]
pub struct Kept(Option<UnixStream>);

/// [`call`] over `kept`, connected first if it holds no connection. A kept connection
/// whose supervisor has closed it (it halted, or exited) fails at the send, before any
/// supervisor read the request: it is then replaced by a new connection and the request
/// sent once more. Any failure after the send drops the connection (the next call
/// connects again).
pub fn call_kept(
    id: InstanceId,
    socket: &Path,
    kept: &mut Kept,
    req: &Request,
) -> Result<(Response, Vec<OwnedFd>), PlatformError> {
    let stream = match kept.0.take() {
        Some(s) if send(id, &s, req, &[]).is_ok() => s,
        _ => {
            let s = connect(id, socket)?;
            send(id, &s, req, &[])?;
            s
        }
    };
    let answer = receive(id, &stream, req.timeout());
    if answer.is_ok() {
        kept.0 = Some(stream);
    }
    answer
}

fn connect(id: InstanceId, socket: &Path) -> Result<UnixStream, PlatformError> {
    let stream = UnixStream::connect(socket).map_err(|e| PlatformError::Instance {
        id,
        what: format!(
            "cannot reach its supervisor at {} ({e}); is the instance active?",
            socket.display()
        ),
    })?;
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| PlatformError::io("setting control socket timeouts", e))?;
    Ok(stream)
}

fn send(
    id: InstanceId,
    stream: &UnixStream,
    req: &Request,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<(), PlatformError> {
    let body = serde_json::to_vec(req).map_err(|e| PlatformError::Instance {
        id,
        what: format!("encoding request: {e}"),
    })?;
    fdpass::send(stream, &body, fds).map_err(|e| PlatformError::io("control request", e))
}

fn receive(
    id: InstanceId,
    stream: &UnixStream,
    timeout: Duration,
) -> Result<(Response, Vec<OwnedFd>), PlatformError> {
    let err = |what: String| PlatformError::Instance { id, what };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| PlatformError::io("setting control socket timeouts", e))?;
    let Some((body, fds)) =
        fdpass::recv(stream).map_err(|e| PlatformError::io("control response", e))?
    else {
        return Err(err(
            "supervisor closed the control socket without answering".into(),
        ));
    };
    let resp: Response =
        serde_json::from_slice(&body).map_err(|e| err(format!("bad control response: {e}")))?;
    if let Response::Error { message } = resp {
        return Err(err(message));
    }
    Ok((resp, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// Serves `plan` connections in turn: each answers `Done` to as many requests as its
    /// number says, then closes (0: closes after reading one request, unanswered).
    fn serve(listener: UnixListener, plan: Vec<usize>) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            let mut requests = 0;
            for answers in plan {
                let (conn, _) = listener.accept().unwrap();
                if answers == 0 {
                    let _ = fdpass::recv(&conn);
                    requests += 1;
                    continue;
                }
                for _ in 0..answers {
                    if fdpass::recv(&conn).unwrap().is_none() {
                        break;
                    }
                    requests += 1;
                    let body = serde_json::to_vec(&Response::Done).unwrap();
                    fdpass::send(&conn, &body, &[]).unwrap();
                }
            }
            requests
        })
    }

    #[test]
    fn a_kept_connection_is_reused_and_replaced_once_closed() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl.sock");
        // Two requests on the first connection, then it closes; the third goes over a
        // second one.
        let server = serve(UnixListener::bind(&sock).unwrap(), vec![2, 1]);
        let mut kept = Kept::default();
        for _ in 0..2 {
            call_kept(1, &sock, &mut kept, &Request::Ping).unwrap();
        }
        // Let the server close the first connection before the third request.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            let mut probe = [0u8; 1];
            let s = kept.0.as_ref().unwrap();
            s.set_nonblocking(true).unwrap();
            let closed = matches!(std::io::Read::read(&mut &*s, &mut probe), Ok(0));
            s.set_nonblocking(false).unwrap();
            if closed {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        call_kept(1, &sock, &mut kept, &Request::Ping).unwrap();
        assert!(kept.0.is_some());
        assert_eq!(server.join().unwrap(), 3);
    }

    #[test]
    fn a_request_left_unanswered_is_an_error_and_drops_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl.sock");
        let server = serve(UnixListener::bind(&sock).unwrap(), vec![0]);
        let mut kept = Kept::default();
        let e = call_kept(1, &sock, &mut kept, &Request::Ping).unwrap_err();
        assert!(e.to_string().contains("without answering"), "{e}");
        assert!(kept.0.is_none());
        assert_eq!(server.join().unwrap(), 1);
        // Nobody listens any more: the next call says the supervisor is unreachable.
        drop(dir);
        let e = call_kept(1, &sock, &mut kept, &Request::Ping).unwrap_err();
        assert!(e.to_string().contains("cannot reach its supervisor"), "{e}");
    }
}
