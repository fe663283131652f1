//! The `Platform` trait: everything the orchestrator needs from "the kernel side".
//!
//! The orchestrator ([`crate::orchestrator`]) is written only against this trait, so the
//! same state machine drives:
//!
//! * [`emulated`]: an **emulation** of the multikernel interface that runs on any Linux
//!   machine (instances are supervisor processes pinned to their cpus);
//! * the real multikernel interface (sysfs overlays, `kexec_file_load` with
//!   `KEXEC_MULTIKERNEL`, vsock) when such a host exists;
//! * mainline LUO, where "booting the new instance" replaces the running kernel.
//!
//! The trait is deliberately small: instance lifecycle (`create`, `load`, `boot`, `halt`,
//! `transfer_resources`), workload control on an instance (`freeze`, `thaw`, `stop`,
//! `preserved_fds`), and the channel to an instance (`connect`). See
//! `docs/architecture.md` for the diagram and the state machine built on top.

pub mod emulated;
pub mod luo;

use std::fmt;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;

use kho_proto::channel::{Transport, UpgradeId};
use serde::{Deserialize, Serialize};

use crate::workload::WorkloadSpec;

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    pub name: String,
    pub pid: i32,
    pub frozen: bool,
    /// Received by a move that was not committed yet (stopped if the move's channel drops).
    #[serde(default)]
    pub pending_commit: bool,
}

/// What a platform can do on this host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capabilities {
    pub kind: PlatformKind,
    /// Whether the platform is an emulation (labelled as such in every output).
    pub emulated: bool,
    /// Whether a new kernel boots beside the old one (multikernel) rather than replacing it
    /// (LUO kexec).
    pub side_by_side: bool,
    /// Whether fds travel with channel frames (SCM_RIGHTS) rather than by preservation tokens.
    pub fds_over_channel: bool,
    /// All cpus of the machine.
    pub cpus: Vec<u32>,
    /// Cpus no instance owns ("spare cores").
    pub spare_cpus: Vec<u32>,
    /// Memory not owned by any instance.
    pub spare_memory_bytes: u64,
    /// How workloads are frozen ("cgroup.freeze" or "SIGSTOP").
    pub freezer: String,
    /// Human-readable remarks (what is emulated, what is missing).
    pub notes: Vec<String>,
}

/// A kernel image ready to be loaded: the sealed memfd that was verified, and what it is.
#[derive(Debug)]
pub struct LoadableKernel<'a> {
    pub image: BorrowedFd<'a>,
    pub release: String,
    pub sha256: [u8; 32],
    pub initrd: Option<BorrowedFd<'a>>,
    pub cmdline: &'a str,
}

/// A named preserved descriptor of a workload (its memfds and listening sockets).
#[derive(Debug)]
pub struct PreservedFd {
    pub name: String,
    pub fd: OwnedFd,
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

/// Where a platform keeps its state (emulated instances, sockets).
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    pub state_dir: PathBuf,
}

/// The operations the orchestrator needs. See the module documentation.
pub trait Platform {
    /// Probes what the platform can do here.
    fn probe(&mut self) -> Result<Capabilities, PlatformError>;

    /// Lists the instances with their resources, kernels and workloads.
    fn instances(&mut self) -> Result<Vec<InstanceInfo>, PlatformError>;

    /// Reserves spare resources for a new instance (state `ready`).
    fn create_instance(&mut self, resources: &Resources) -> Result<InstanceId, PlatformError>;

    /// Loads a verified kernel into a `ready` instance (state `loaded`).
    fn load(&mut self, id: InstanceId, kernel: &LoadableKernel<'_>) -> Result<(), PlatformError>;

    /// Boots a `loaded` instance (state `active`).
    fn boot(&mut self, id: InstanceId) -> Result<(), PlatformError>;

    /// Opens the inter-instance channel to an `active` instance's agent, which is told to
    /// expect frames of `upgrade_id` (on multikernel the new kernel's command line carries
    /// it; the emulator tells its supervisor).
    fn connect(
        &mut self,
        id: InstanceId,
        upgrade_id: UpgradeId,
    ) -> Result<Box<dyn Transport>, PlatformError>;

    /// Changes the resources of an `active` instance (cpu-add/cpu-remove, memory-add/remove
    /// overlays on multikernel). Cpus taken away become spare.
    fn resize(&mut self, id: InstanceId, resources: &Resources) -> Result<(), PlatformError>;

    /// Starts a workload on an instance (first start: fresh preserved fds).
    fn start_workload(
        &mut self,
        id: InstanceId,
        spec: &WorkloadSpec,
    ) -> Result<WorkloadInfo, PlatformError>;

    /// Freezes a workload (no instruction of it runs until `thaw`).
    fn freeze(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError>;

    /// Thaws a frozen workload.
    fn thaw(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError>;

    /// Duplicates of the workload's preserved descriptors (memfds, listening sockets).
    fn preserved_fds(
        &mut self,
        id: InstanceId,
        workload: &str,
    ) -> Result<Vec<PreservedFd>, PlatformError>;

    /// Stops a workload for good (its preserved fds are released by that instance).
    fn stop_workload(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError>;

    /// Halts an instance; it goes back to `loaded`.
    fn halt(&mut self, id: InstanceId) -> Result<(), PlatformError>;

    /// Gives a halted instance's cpus and memory to another instance; returns what moved.
    fn transfer_resources(
        &mut self,
        from: InstanceId,
        to: InstanceId,
    ) -> Result<Resources, PlatformError>;

    /// Removes a halted instance (its image is unloaded).
    fn destroy(&mut self, id: InstanceId) -> Result<(), PlatformError>;
}
