//! Versioned encoding of states: postcard bytes for handover regions, JSON for operators.
//!
//! A region carries `(schema_version: u16, kind, bytes)`. [`encode`] always writes
//! [`SCHEMA_VERSION`]; [`decode`] reads that version and version 1, migrating version-1
//! states forward ([`v1`]). The schema version is also stored inside each state and
//! must agree with the region's.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::device::DeviceState;
use crate::error::{Result, StateError};
use crate::memory::MemoryState;
use crate::task::TaskState;
use crate::{MIN_SCHEMA_VERSION, SCHEMA_VERSION};

/// Largest encoded state accepted by [`decode`] (64 MiB): bigger inputs are refused
/// before parsing.
pub const MAX_ENCODED_LEN: usize = 64 << 20;

/// Which state a region holds (the region kind of the handover image's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateKind {
    DeviceState,
    MemoryState,
    TaskState,
}

impl StateKind {
    /// Lower-case name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::DeviceState => "device",
            Self::MemoryState => "memory",
            Self::TaskState => "task",
        }
    }
}

/// A state that can be stored in a handover region.
pub trait Versioned: Serialize + DeserializeOwned + Sized {
    /// The region kind.
    const KIND: StateKind;
    /// The version-1 form of the state.
    type V1: DeserializeOwned;
    /// The schema version recorded in the state.
    fn schema_version(&self) -> u16;
    /// The schema version recorded inside a version-1 state.
    fn v1_version(old: &Self::V1) -> u16;
    /// Migrates a version-1 state to the current schema.
    fn migrate(old: Self::V1) -> Self;
}

impl Versioned for TaskState {
    const KIND: StateKind = StateKind::TaskState;
    type V1 = v1::TaskStateV1;
    fn schema_version(&self) -> u16 {
        self.schema_version
    }
    fn v1_version(old: &Self::V1) -> u16 {
        old.schema_version
    }
    fn migrate(old: Self::V1) -> Self {
        v1::migrate_task(old)
    }
}

impl Versioned for MemoryState {
    const KIND: StateKind = StateKind::MemoryState;
    type V1 = v1::MemoryStateV1;
    fn schema_version(&self) -> u16 {
        self.schema_version
    }
    fn v1_version(old: &Self::V1) -> u16 {
        old.schema_version
    }
    fn migrate(old: Self::V1) -> Self {
        v1::migrate_memory(old)
    }
}

impl Versioned for DeviceState {
    const KIND: StateKind = StateKind::DeviceState;
    type V1 = v1::DeviceStateV1;
    fn schema_version(&self) -> u16 {
        self.schema_version
    }
    fn v1_version(old: &Self::V1) -> u16 {
        old.schema_version
    }
    fn migrate(old: Self::V1) -> Self {
        v1::migrate_device(old)
    }
}

/// Encodes a state for a region: `(schema_version, postcard bytes)`.
pub fn encode<T: Versioned>(state: &T) -> Result<(u16, Vec<u8>)> {
    if state.schema_version() != SCHEMA_VERSION {
        return Err(StateError::Encode {
            kind: T::KIND.name(),
            detail: format!(
                "state says schema version {}, this writer writes {SCHEMA_VERSION}",
                state.schema_version()
            ),
        });
    }
    let bytes = postcard::to_stdvec(state).map_err(|e| StateError::Encode {
        kind: T::KIND.name(),
        detail: e.to_string(),
    })?;
    Ok((SCHEMA_VERSION, bytes))
}

fn from_postcard<U: DeserializeOwned>(kind: &'static str, version: u16, bytes: &[u8]) -> Result<U> {
    let err = |detail: String| StateError::Decode {
        kind,
        version,
        detail,
    };
    let (v, rest) = postcard::take_from_bytes::<U>(bytes).map_err(|e| err(e.to_string()))?;
    if !rest.is_empty() {
        return Err(err(format!(
            "{} trailing byte(s) after the state at offset {}",
            rest.len(),
            bytes.len() - rest.len()
        )));
    }
    Ok(v)
}

/// Decodes a region's bytes written with `version`, migrating older versions.
pub fn decode<T: Versioned>(version: u16, bytes: &[u8]) -> Result<T> {
    let kind = T::KIND.name();
    if bytes.len() > MAX_ENCODED_LEN {
        return Err(StateError::Decode {
            kind,
            version,
            detail: format!(
                "{} bytes exceed the {MAX_ENCODED_LEN}-byte limit",
                bytes.len()
            ),
        });
    }
    let state: T = match version {
        SCHEMA_VERSION => from_postcard(kind, version, bytes)?,
        1 => {
            let old = from_postcard::<T::V1>(kind, version, bytes)?;
            let inner = T::v1_version(&old);
            if inner != 1 {
                return Err(StateError::Decode {
                    kind,
                    version,
                    detail: format!("the state records schema version {inner}, the region 1"),
                });
            }
            T::migrate(old)
        }
        found => {
            return Err(StateError::UnsupportedVersion {
                kind,
                found,
                min: MIN_SCHEMA_VERSION,
                max: SCHEMA_VERSION,
            });
        }
    };
    let inner = state.schema_version();
    if inner != SCHEMA_VERSION {
        return Err(StateError::Decode {
            kind,
            version,
            detail: format!("the state records schema version {inner}, the region {version}"),
        });
    }
    Ok(state)
}

/// What `mk-upgrade state capture --json` prints and `state diff` reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capture {
    pub schema_version: u16,
    pub tasks: Option<TaskState>,
    pub memory: Option<MemoryState>,
    pub device: Option<DeviceState>,
}

/// The version-1 form of [`Capture`].
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CaptureV1 {
    pub schema_version: u16,
    pub tasks: Option<v1::TaskStateV1>,
    pub memory: Option<v1::MemoryStateV1>,
    pub device: Option<v1::DeviceStateV1>,
}

/// Serializes a capture as pretty JSON.
pub fn to_json(c: &Capture) -> Result<String> {
    serde_json::to_string_pretty(c).map_err(|e| StateError::Encode {
        kind: "capture",
        detail: e.to_string(),
    })
}

/// Reads a JSON capture of version 1 or 2 (version 1 is migrated).
pub fn from_json(text: &str) -> Result<Capture> {
    let err = |version: u16, detail: String| StateError::Decode {
        kind: "capture",
        version,
        detail,
    };
    #[derive(Deserialize)]
    struct Probe {
        schema_version: u16,
    }
    let probe: Probe = serde_json::from_str(text).map_err(|e| err(0, e.to_string()))?;
    match probe.schema_version {
        SCHEMA_VERSION => {
            let c: Capture =
                serde_json::from_str(text).map_err(|e| err(SCHEMA_VERSION, e.to_string()))?;
            for (what, v) in [
                ("tasks", c.tasks.as_ref().map(|s| s.schema_version)),
                ("memory", c.memory.as_ref().map(|s| s.schema_version)),
                ("device", c.device.as_ref().map(|s| s.schema_version)),
            ] {
                if let Some(v) = v.filter(|v| *v != SCHEMA_VERSION) {
                    return Err(err(SCHEMA_VERSION, format!("{what}.schema_version is {v}")));
                }
            }
            Ok(c)
        }
        1 => {
            let c: CaptureV1 = serde_json::from_str(text).map_err(|e| err(1, e.to_string()))?;
            Ok(Capture {
                schema_version: SCHEMA_VERSION,
                tasks: c.tasks.map(v1::migrate_task),
                memory: c.memory.map(v1::migrate_memory),
                device: c.device.map(v1::migrate_device),
            })
        }
        found => Err(StateError::UnsupportedVersion {
            kind: "capture",
            found,
            min: MIN_SCHEMA_VERSION,
            max: SCHEMA_VERSION,
        }),
    }
}

/// Schema version 1 and its migration to version 2.
///
/// Version 1 lacked: effective ids and supplementary groups, cgroup limits
/// (`cpu.max`, `memory.max`, `cpuset.cpus`), descriptor kinds and flags (only the link
/// target), memfd names and seals of regions, the `overcommit_ratio` and
/// `max_map_count` sysctls, link kinds and routes.
pub mod v1 {
    use serde::{Deserialize, Serialize};

    use crate::SCHEMA_VERSION;
    use crate::device::{BlockDevice, DeviceState, Interface, IpPrefix, PciDevice};
    use crate::digest::RegionDigest;
    use crate::memory::{HugepagePool, MemoryRegion, MemoryState, VmSysctls};
    use crate::procfs::MountEntry;
    use crate::task::{
        CgroupInfo, Credentials, FdKind, FdRecord, Rlimit, Sched, TaskRecord, TaskState,
    };

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct TaskStateV1 {
        pub schema_version: u16,
        pub tasks: Vec<TaskRecordV1>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct TaskRecordV1 {
        pub pid: i32,
        pub ppid: i32,
        pub starttime: u64,
        pub comm: String,
        pub exe: String,
        pub cmdline: Vec<String>,
        pub environ: Vec<String>,
        pub cwd: String,
        pub uid: u32,
        pub gid: u32,
        pub rlimits: Vec<Rlimit>,
        pub affinity: Vec<u32>,
        pub sched: Sched,
        pub cgroup: String,
        pub fds: Vec<FdRecordV1>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct FdRecordV1 {
        pub fd: i32,
        pub target: String,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MemoryStateV1 {
        pub schema_version: u16,
        pub regions: Vec<MemoryRegionV1>,
        pub hugepages: Vec<HugepagePool>,
        pub vm: VmSysctlsV1,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MemoryRegionV1 {
        pub token: String,
        pub digest: RegionDigest,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct VmSysctlsV1 {
        pub overcommit_memory: Option<u64>,
        pub swappiness: Option<u64>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct DeviceStateV1 {
        pub schema_version: u16,
        pub interfaces: Vec<InterfaceV1>,
        pub pci: Vec<PciDevice>,
        pub block: Vec<BlockDevice>,
        pub mounts: Vec<MountEntry>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct InterfaceV1 {
        pub index: u32,
        pub name: String,
        pub mac: Option<String>,
        pub mtu: Option<u32>,
        pub up: bool,
        pub addresses: Vec<IpPrefix>,
    }

    fn bracket(target: &str, prefix: &str) -> Option<u64> {
        target
            .strip_prefix(prefix)?
            .strip_prefix('[')?
            .strip_suffix(']')?
            .parse()
            .ok()
    }

    /// Version 1 → 2 for tasks. Effective ids equal the real ones, no supplementary
    /// groups, no cgroup limits (restore leaves them untouched), flags 0; descriptor kinds
    /// are derived from the target where that is exact (pipes, sockets by inode) and
    /// `Other` elsewhere, since v1 recorded neither offsets nor memfd seals.
    pub fn migrate_task(old: TaskStateV1) -> TaskState {
        TaskState {
            schema_version: SCHEMA_VERSION,
            tasks: old
                .tasks
                .into_iter()
                .map(|t| TaskRecord {
                    pid: t.pid,
                    ppid: t.ppid,
                    starttime: t.starttime,
                    comm: t.comm,
                    exe: t.exe,
                    cmdline: t.cmdline,
                    environ: t.environ,
                    cwd: t.cwd,
                    creds: Credentials {
                        uid: t.uid,
                        euid: t.uid,
                        gid: t.gid,
                        egid: t.gid,
                        groups: Vec::new(),
                    },
                    rlimits: t.rlimits,
                    affinity: t.affinity,
                    sched: t.sched,
                    cgroup: CgroupInfo {
                        path: t.cgroup,
                        cpu_max: None,
                        memory_max: None,
                        cpuset_cpus: None,
                    },
                    fds: t
                        .fds
                        .into_iter()
                        .map(|f| {
                            let kind = if let Some(inode) = bracket(&f.target, "pipe:") {
                                FdKind::Pipe { inode }
                            } else if let Some(inode) = bracket(&f.target, "socket:") {
                                FdKind::Socket { inode }
                            } else {
                                FdKind::Other
                            };
                            FdRecord {
                                fd: f.fd,
                                target: f.target,
                                flags: 0,
                                kind,
                            }
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Version 1 → 2 for memory: regions get an empty name and no seals (verification
    /// then checks digests only); the sysctls v1 did not record stay `None` (not applied).
    pub fn migrate_memory(old: MemoryStateV1) -> MemoryState {
        MemoryState {
            schema_version: SCHEMA_VERSION,
            regions: old
                .regions
                .into_iter()
                .map(|r| MemoryRegion {
                    token: r.token,
                    name: String::new(),
                    seals: 0,
                    digest: r.digest,
                })
                .collect(),
            hugepages: old.hugepages,
            vm: VmSysctls {
                overcommit_memory: old.vm.overcommit_memory,
                overcommit_ratio: None,
                swappiness: old.vm.swappiness,
                max_map_count: None,
            },
        }
    }

    /// Version 1 → 2 for devices: no link kinds, no routes (restore adds none).
    pub fn migrate_device(old: DeviceStateV1) -> DeviceState {
        DeviceState {
            schema_version: SCHEMA_VERSION,
            interfaces: old
                .interfaces
                .into_iter()
                .map(|i| Interface {
                    index: i.index,
                    name: i.name,
                    mac: i.mac,
                    mtu: i.mtu,
                    up: i.up,
                    kind: None,
                    addresses: i.addresses,
                })
                .collect(),
            routes: Vec::new(),
            pci: old.pci,
            block: old.block,
            mounts: old.mounts,
        }
    }
}
