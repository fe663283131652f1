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

use crate::platform::{InstanceId, PlatformError, WorkloadInfo};
use crate::sys::fdpass;
use crate::workload::WorkloadSpec;

/// How long a control request may take (freezing and starting are quick; a stop may wait
/// for the process to die).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A request to an instance supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Who are you, what runs on you.
    Ping,
    /// First start of a workload (fresh preserved fds).
    Start { spec: Box<WorkloadSpec> },
    /// Freeze a workload.
    Freeze { name: String },
    /// Thaw a workload.
    Thaw { name: String },
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
    Error {
        message: String,
    },
}

/// Sends `req` to the supervisor listening on `socket`; returns the response and any fds.
pub fn call(
    id: InstanceId,
    socket: &Path,
    req: &Request,
) -> Result<(Response, Vec<OwnedFd>), PlatformError> {
    let err = |what: String| PlatformError::Instance { id, what };
    let stream = UnixStream::connect(socket).map_err(|e| {
        err(format!(
            "cannot reach its supervisor at {} ({e}); is the instance active?",
            socket.display()
        ))
    })?;
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(|e| PlatformError::io("setting control socket timeouts", e))?;
    let body = serde_json::to_vec(req).map_err(|e| err(format!("encoding request: {e}")))?;
    fdpass::send(&stream, &body, &[]).map_err(|e| PlatformError::io("control request", e))?;
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
