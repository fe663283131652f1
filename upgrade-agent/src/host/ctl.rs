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

impl Request {
    /// How long the answer may take.
    pub fn timeout(&self) -> Duration {
        match self {
            Request::Freeze { .. } => {
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
    /// First start of a workload (fresh preserved fds).
    Start { spec: Box<WorkloadSpec> },
    /// Freeze a workload for a move: `cgroup.freeze` (handover, socket-activation); for a
    /// restart-mode workload, stop its process gracefully (`stop_signal`, then `SIGKILL`
    /// after `stop_timeout_ms`), keeping its fd store.
    Freeze { name: String },
    /// Undo `Freeze`: thaw it, or start a stopped restart-mode workload again.
    Thaw { name: String },
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
    let err = |what: String| PlatformError::Instance { id, what };
    let stream = UnixStream::connect(socket).map_err(|e| {
        err(format!(
            "cannot reach its supervisor at {} ({e}); is the instance active?",
            socket.display()
        ))
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(|e| PlatformError::io("setting control socket timeouts", e))?;
    let body = serde_json::to_vec(req).map_err(|e| err(format!("encoding request: {e}")))?;
    fdpass::send(&stream, &body, send_fds).map_err(|e| PlatformError::io("control request", e))?;
    let Some((body, fds)) =
        fdpass::recv(&stream).map_err(|e| PlatformError::io("control response", e))?
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
