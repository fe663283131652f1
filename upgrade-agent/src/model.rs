//! The vocabulary every layer above the formats shares: instances, their states and
//! resources, workloads as an instance sees them, preserved descriptors, and the error of
//! an instance operation. The [`Platform`](crate::platform::Platform) trait is written in
//! these terms; so are the instance host ([`crate::host`]) and the journal record
//! ([`crate::record`]).

use std::fmt;
use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

/// Instance id: 0 is the host kernel on multikernel; spawned instances use 1..=511.
pub type InstanceId = u16;

/// Highest instance id the multikernel interface accepts.
pub const MAX_INSTANCE_ID: InstanceId = 511;

/// Which implementation a platform is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlatformKind {
    /// The multikernel emulator (supervisor processes). Not a real kernel boot.
    Emulated,
    /// Real multikernel (out-of-tree patch set).
    Multikernel,
    /// Mainline Live Update Orchestrator (`/dev/liveupdate` + kexec).
    Luo,
}

impl fmt::Display for PlatformKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlatformKind::Emulated => "emulated (multikernel emulation, no real kernel boot)",
            PlatformKind::Multikernel => "multikernel",
            PlatformKind::Luo => "luo",
        })
    }
}

/// Lifecycle state of an instance, as `/sys/fs/multikernel/instances/<name>/status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Empty,
    Ready,
    Loaded,
    Active,
    Failed,
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InstanceState::Empty => "empty",
            InstanceState::Ready => "ready",
            InstanceState::Loaded => "loaded",
            InstanceState::Active => "active",
            InstanceState::Failed => "failed",
        })
    }
}

/// CPUs and memory owned by an instance (or requested for one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: Vec<u32>,
    pub memory_bytes: u64,
}

/// What the platform reports about an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: InstanceId,
    pub state: InstanceState,
    pub resources: Resources,
    /// Release of the kernel loaded or running in the instance.
    pub kernel_release: Option<String>,
    /// Workloads the instance runs.
    pub workloads: Vec<WorkloadInfo>,
}

/// A workload as an instance sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    pub name: String,
    pub pid: i32,
    pub frozen: bool,
    /// Received by a move that was not committed yet (stopped if the move's channel drops).
    #[serde(default)]
    pub pending_commit: bool,
    /// What its process is doing.
    #[serde(default)]
    pub state: WorkloadState,
    /// How its process last ended (`exit status 1`, `killed by signal 9`), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<String>,
    /// How often the supervisor restarted it after it exited on its own.
    #[serde(default)]
    pub restarts: u32,
    /// The last `STATUS=` it sent on its notify socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_text: Option<String>,
}

/// The life of a workload's process on an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadState {
    #[default]
    Running,
    /// Frozen for a move.
    Frozen,
    /// Stopped for a move (restart mode): the process is gone, its fd store kept.
    Stopped,
    /// Exited on its own; restarted after a back-off (`restart = "on-failure"`).
    Restarting,
    /// Exited on its own and not restarted (`restart = "no"`, or a clean exit).
    Exited,
}

impl WorkloadState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadState::Running => "running",
            WorkloadState::Frozen => "frozen",
            WorkloadState::Stopped => "stopped",
            WorkloadState::Restarting => "restarting",
            WorkloadState::Exited => "exited",
        }
    }
}

/// A named preserved descriptor of a workload (its memfds and listening sockets, its fd
/// store's entries, connections it handed over).
#[derive(Debug)]
pub struct PreservedFd {
    pub name: String,
    pub fd: OwnedFd,
}

/// `FDNAME` under which a workload hands its established connections over (`host::watch`).
pub const CONNECTION_FDNAME: &str = "connection";

/// Whether a preserved descriptor's name is a handed-over connection's (`connection-N`).
pub fn is_connection(name: &str) -> bool {
    name.strip_prefix(CONNECTION_FDNAME)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// How many of `fds` are handed-over connections.
pub fn connections_in(fds: &[PreservedFd]) -> usize {
    fds.iter().filter(|p| is_connection(&p.name)).count()
}

/// Whether `fd` is a connected stream socket (what a connection hand-over moves).
pub fn is_connected_stream(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::sys::socket::{SockType, SockaddrStorage, getpeername, getsockopt, sockopt};
    use std::os::fd::AsRawFd;
    matches!(getsockopt(&fd, sockopt::SockType), Ok(SockType::Stream))
        && matches!(getsockopt(&fd, sockopt::AcceptConn), Ok(false))
        && getpeername::<SockaddrStorage>(fd.as_raw_fd()).is_ok()
}

/// Errors of a platform operation.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("instance {0} does not exist")]
    NoSuchInstance(InstanceId),
    #[error("instance {id} is {state}, but {op} needs it {needed}")]
    WrongState {
        id: InstanceId,
        op: &'static str,
        state: InstanceState,
        needed: &'static str,
    },
    #[error("instance id {0} is out of range (spawned instances use 1..=511)")]
    BadInstanceId(u32),
    #[error("not enough spare resources: {0}")]
    NoResources(String),
    #[error("workload {workload:?} is not running on instance {instance}")]
    NoSuchWorkload {
        instance: InstanceId,
        workload: String,
    },
    #[error("instance {id}: {what}")]
    Instance { id: InstanceId, what: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not supported on this platform")]
    Unsupported(&'static str),
    /// The target refused a hand-over: one of its checks failed.
    #[error("{workload}: check {check} failed on instance {instance}: {detail}")]
    Refused {
        workload: String,
        instance: InstanceId,
        check: String,
        detail: String,
    },
    /// The restored copy did not pass its health check (or died).
    #[error("{workload}: unhealthy on instance {instance}: {detail}")]
    Unhealthy {
        workload: String,
        instance: InstanceId,
        detail: String,
    },
    /// The channel to an instance failed (negotiation, a frame, a timeout, a protocol
    /// violation).
    #[error("instance {id}: channel: {what}")]
    Channel { id: InstanceId, what: String },
    /// Test-only: a failure injected by the fake platform.
    #[error("injected failure of {0}")]
    Injected(String),
}

impl PlatformError {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        PlatformError::Io {
            what: what.into(),
            source,
        }
    }
}
