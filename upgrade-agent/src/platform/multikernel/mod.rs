//! `--platform multikernel`: the out-of-tree multikernel patch set's interface — a new
//! kernel booted on spare cores beside the old one, workloads moved instance by instance,
//! then the old instance's cpus and memory moved over and the old instance removed.
//!
//! Every kernel call goes through [`MultikernelSys`] (the sysfs root is injectable):
//!
//! | step | calls |
//! |---|---|
//! | `create_instance` | `instance-create` overlay → `overlays/new`; `tx_N/status` must read `applied`; `instances/<name>/{id,status}` = `ready` |
//! | `load` | the ELF vmlinux extracted from the verified bzImage, in a sealed memfd → `kexec_file_load(…, KEXEC_MULTIKERNEL \| id << 5 [\| NO_INITRAMFS])`; status `loaded` |
//! | `boot` | `reboot(…, 0x4D4B4C49, &id)`; status `active`; then the agent must answer (status is not health) |
//! | `resize` | update overlay (`cpu-add`/`cpu-remove`) |
//! | `halt` | the agent is asked to stop its workloads, `reboot(…, 0x4D4B4C48, &id)`, status back to `loaded`; else `0x4D4B4C46` (force); else an error |
//! | `transfer_resources` | one overlay: `/instances/OLD` `cpu-remove` + `memory-remove` of its regions (from `/proc/iomem`, in 128 MiB blocks), then `/instances/NEW` `cpu-add` + `memory-add` of the same |
//! | `destroy` | `kexec_file_load(-1, -1, 0, NULL, UNLOAD \| KEXEC_MULTIKERNEL \| id << 5)` when loaded, then `instance-remove` |
//!
//! Which kernel it drives is part of every output: `MK_MULTIKERNEL_SIM=DIR` selects the
//! SIMULATED kernel of [`sim`] (the agents of its instances are local processes reached
//! over Unix sockets); otherwise the real interface under `/sys/fs/multikernel`, whose
//! instance agents are reached over AF_VSOCK — which this release does not do yet (see
//! `docs/kernel.md`: the control protocol and the hand-over pass descriptors, which vsock
//! cannot carry), so on a real kernel the lifecycle works and workload moves are refused
//! with that reason.

pub mod fdt;
pub mod overlay;
pub mod sim;

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kho_proto::channel::UpgradeId;
use serde::{Deserialize, Serialize};

use super::agents::{Agent, Links};
use super::channel::{ChannelLink, Connector};
use crate::handover::Outgoing;
use crate::host::ctl::Request;
use crate::platform::{
    Capabilities, Delivered, InstanceId, InstanceInfo, InstanceState, LoadableKernel, Platform,
    PlatformError, PlatformKind, PreservedFd, Resources, WorkloadInfo,
};
use crate::record::UpgradeRecord;
use crate::sys::multikernel::{
    self as mk, InstanceStatus, MEMORY_BLOCK_BYTES, MultikernelSys, RebootCmd,
};
use crate::workload::WorkloadSpec;

/// The environment variable selecting the simulated kernel (its directory).
pub const SIM_ENV: &str = "MK_MULTIKERNEL_SIM";
/// How long a started instance may take to turn `active` and its agent to answer.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a graceful halt may take before the forced one.
pub const HALT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a forced halt may take before the halt fails.
pub const FORCE_HALT_TIMEOUT: Duration = Duration::from_secs(5);
/// Status polling period (the kernel notifies nothing: status must be polled).
const POLL: Duration = Duration::from_millis(5);

/// Which kernel the platform drives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelKind {
    /// A kernel with the multikernel patch set.
    Real,
    /// The simulated kernel in this directory.
    Simulated(PathBuf),
}

impl KernelKind {
    /// The label every output carries.
    pub fn label(&self) -> &'static str {
        match self {
            KernelKind::Real => "multikernel (real kernel interface)",
            KernelKind::Simulated(_) => "multikernel (SIMULATED kernel: no multikernel kernel ran)",
        }
    }
}

/// What the platform remembers of an instance it created (the kernel keeps no release).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEntry {
    pub name: String,
    pub resources: Resources,
    pub kernel_release: Option<String>,
    pub kernel_sha256: Option<String>,
}

/// `<state-dir>/multikernel/instances.json`: id → entry, written atomically.
#[derive(Debug)]
struct Table {
    path: PathBuf,
}

impl Table {
    fn read(&self) -> Result<BTreeMap<InstanceId, TableEntry>, PlatformError> {
        match fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| PlatformError::Instance {
                id: 0,
                what: format!(
                    "{} is damaged ({e}): it records the kernel release and the cpus of each \
                     instance mk-upgrade created; restore it from a backup, or remove it and \
                     expect `status` to show those instances without release or cpus",
                    self.path.display()
                ),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(PlatformError::io(
                format!("reading {}", self.path.display()),
                e,
            )),
        }
    }

    fn update<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<InstanceId, TableEntry>) -> T,
    ) -> Result<T, PlatformError> {
        let mut t = self.read()?;
        let r = f(&mut t);
        let bytes = serde_json::to_vec_pretty(&t).map_err(|e| PlatformError::Instance {
            id: 0,
            what: e.to_string(),
        })?;
        rollback::atomic_write(&self.path, &bytes).map_err(|e| PlatformError::Instance {
            id: 0,
            what: e.to_string(),
        })?;
        Ok(r)
    }
}

/// The multikernel platform. See the module documentation.
#[derive(Debug)]
pub struct MultikernelPlatform {
    sys: Box<dyn MultikernelSys>,
    kind: KernelKind,
    table: Table,
    links: Links,
}

fn kernel_err(id: InstanceId, what: impl std::fmt::Display) -> PlatformError {
    PlatformError::Instance {
        id,
        what: what.to_string(),
    }
}

impl MultikernelPlatform {
    /// The platform over `sys`, remembering its instances in `<state_dir>/multikernel`.
    pub fn new(
        state_dir: &Path,
        sys: Box<dyn MultikernelSys>,
        kind: KernelKind,
    ) -> Result<Self, PlatformError> {
        let dir = state_dir.join("multikernel");
        rollback::ensure_private_dir(&dir)
            .map_err(|e| PlatformError::io(format!("creating {}", dir.display()), e.source))?;
        Ok(Self {
            sys,
            kind,
            table: Table {
                path: dir.join("instances.json"),
            },
            links: Links::default(),
        })
    }

    /// The platform this host offers: the simulated kernel when `MK_MULTIKERNEL_SIM` names
    /// its directory (agents started with `mk-agentd`, found like the emulated platform's),
    /// else the real interface at `/sys/fs/multikernel`.
    pub fn open(state_dir: &Path) -> Result<Self, PlatformError> {
        if let Some(dir) = std::env::var_os(SIM_ENV) {
            let dir = PathBuf::from(dir);
            let launcher = super::emulated::agentd_path()
                .ok()
                .map(|agentd| sim::AgentLauncher {
                    agentd,
                    state_dir: state_dir.to_owned(),
                });
            let k = sim::SimKernel::open(&dir, launcher).map_err(|e| {
                PlatformError::io(
                    format!("opening the simulated kernel in {}", dir.display()),
                    e,
                )
            })?;
            return Self::new(state_dir, Box::new(k), KernelKind::Simulated(dir));
        }
        Self::new(
            state_dir,
            Box::new(mk::RealMultikernel::new(mk::DEFAULT_ROOT)),
            KernelKind::Real,
        )
    }

    /// Writes the pool baseline (`cpus`, one memory request of `memory_bytes`) unless the
    /// kernel already has a pool; returns whether it wrote one.
    pub fn ensure_pool(&mut self, cpus: &[u32], memory_bytes: u64) -> Result<bool, PlatformError> {
        let dt = self.sys.read(mk::DEVICE_TREE).unwrap_or_default();
        if fdt::parse(&dt).is_ok_and(|r| r.child("resources").is_some()) {
            return Ok(false);
        }
        let node = cpus
            .first()
            .map_or(0, |c| overlay::numa_node_of_cpu(Path::new("/"), *c));
        let blob = overlay::baseline(cpus, &[(memory_bytes, Some(node))]);
        self.sys.write_blob(mk::DEVICE_TREE, &blob).map_err(|e| {
            PlatformError::io(
                format!(
                    "writing the pool baseline to {}/{}",
                    self.sys.root().display(),
                    mk::DEVICE_TREE
                ),
                e,
            )
        })?;
        Ok(true)
    }

    /// Which kernel this drives.
    pub fn kind(&self) -> &KernelKind {
        &self.kind
    }

    /// The syscall layer (tests inspect the simulated kernel through it).
    pub fn sys(&mut self) -> &mut dyn MultikernelSys {
        self.sys.as_mut()
    }

    /// Every instance the kernel lists: `(name, id, status)`.
    fn kernel_instances(
        &mut self,
    ) -> Result<Vec<(String, InstanceId, InstanceStatus)>, PlatformError> {
        let names = match self.sys.list(mk::INSTANCES) {
            Ok(n) => n,
            Err(e) => {
                return Err(PlatformError::io(
                    format!(
                        "listing {}/{} (is this a multikernel kernel? `mk-upgrade check --platform multikernel`)",
                        self.sys.root().display(),
                        mk::INSTANCES
                    ),
                    e,
                ));
            }
        };
        let mut out = Vec::new();
        for name in names {
            let id = self.read_text(&format!("{}/{name}/id", mk::INSTANCES))?;
            let Ok(id) = id.trim().parse::<InstanceId>() else {
                continue;
            };
            if id == 0 || id > mk::MAX_INSTANCE_ID {
                continue;
            }
            let st = self.read_text(&format!("{}/{name}/status", mk::INSTANCES))?;
            let status = InstanceStatus::parse(&st).ok_or_else(|| {
                kernel_err(
                    id,
                    format!("unknown status {:?} of instance {name}", st.trim()),
                )
            })?;
            out.push((name, id, status));
        }
        Ok(out)
    }

    fn read_text(&mut self, rel: &str) -> Result<String, PlatformError> {
        let b = self.sys.read(rel).map_err(|e| {
            PlatformError::io(format!("reading {}/{rel}", self.sys.root().display()), e)
        })?;
        if b.len() > 4096 {
            return Err(PlatformError::Instance {
                id: 0,
                what: format!("{rel} holds {} bytes, more than a status file can", b.len()),
            });
        }
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    fn status_of(&mut self, id: InstanceId) -> Result<(String, InstanceStatus), PlatformError> {
        self.kernel_instances()?
            .into_iter()
            .find(|(_, i, _)| *i == id)
            .map(|(n, _, s)| (n, s))
            .ok_or(PlatformError::NoSuchInstance(id))
    }

    fn expect_status(
        &mut self,
        id: InstanceId,
        op: &'static str,
        want: &[InstanceStatus],
        needed: &'static str,
    ) -> Result<String, PlatformError> {
        let (name, s) = self.status_of(id)?;
        if want.contains(&s) {
            Ok(name)
        } else {
            Err(PlatformError::WrongState {
                id,
                op,
                state: map_state(s),
                needed,
            })
        }
    }

    /// Polls instance `id` until its status is `want` or `timeout` passes.
    fn wait_status(
        &mut self,
        id: InstanceId,
        want: InstanceStatus,
        timeout: Duration,
    ) -> Result<bool, PlatformError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status_of(id)?.1 == want {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Writes one overlay and checks its transaction reads `applied`.
    fn apply_overlay(
        &mut self,
        id: InstanceId,
        what: &str,
        blob: &[u8],
    ) -> Result<(), PlatformError> {
        let before: Vec<String> = self.sys.list(mk::OVERLAYS).unwrap_or_default();
        let write = self.sys.write_blob(mk::OVERLAY_NEW, blob);
        let after: Vec<String> = self.sys.list(mk::OVERLAYS).unwrap_or_default();
        let tx = after
            .iter()
            .filter(|n| n.starts_with(mk::TX_PREFIX) && !before.contains(n))
            .max_by_key(|n| n[mk::TX_PREFIX.len()..].parse::<u64>().unwrap_or(0))
            .cloned();
        let status = tx
            .as_ref()
            .and_then(|t| self.read_text(&format!("{}/{t}/status", mk::OVERLAYS)).ok())
            .map(|s| s.trim().to_owned());
        match (write, status.as_deref()) {
            (Ok(()), Some("applied")) => Ok(()),
            (Ok(()), None) => Err(kernel_err(
                id,
                format!(
                    "{what}: the overlay write returned but no new transaction appeared in {}/{}",
                    self.sys.root().display(),
                    mk::OVERLAYS
                ),
            )),
            (r, s) => {
                // A failed transaction is cleared so it does not pile up (best effort).
                if let Some(t) = &tx
                    && s == Some("failed")
                {
                    let _ = self.sys.rmdir(&format!("{}/{t}", mk::OVERLAYS));
                }
                Err(kernel_err(
                    id,
                    format!(
                        "{what}: overlay refused ({}; transaction {} status {}); see dmesg",
                        match r {
                            Ok(()) => "write accepted".to_owned(),
                            Err(e) => format!("write: {e}"),
                        },
                        tx.as_deref().unwrap_or("none"),
                        s.unwrap_or("unknown"),
                    ),
                ))
            }
        }
    }

    /// Tells instance `id`'s agent which cpus it owns now (its kernel hot-plugged them
    /// already). On a real kernel, whose agents this release does not reach, the kernel's
    /// own hot-plug is all there is.
    fn tell_cpus(&self, id: InstanceId, cpus: &[u32]) -> Result<(), PlatformError> {
        match self.kind {
            KernelKind::Real => Ok(()),
            KernelKind::Simulated(_) => self.agent(id)?.set_cpus(cpus),
        }
    }

    /// The agent of active instance `id`.
    fn agent(&self, id: InstanceId) -> Result<Agent, PlatformError> {
        match &self.kind {
            KernelKind::Simulated(dir) => Ok(Agent::new(id, sim::SimKernel::agent_dir(dir, id))),
            KernelKind::Real => Err(PlatformError::Unsupported(
                "reaching a spawned kernel's agent over AF_VSOCK (CID = instance id): this \
                 release moves workloads on the simulated multikernel kernel only (its control \
                 protocol and hand-over pass descriptors, which vsock cannot carry); see \
                 docs/kernel.md",
            )),
        }
    }

    fn with_link<T>(
        &mut self,
        f: impl FnOnce(&mut ChannelLink, &mut Connector<'_>) -> Result<T, PlatformError>,
    ) -> Result<T, PlatformError> {
        let speaker = {
            let active = self
                .kernel_instances()?
                .into_iter()
                .filter(|(_, _, s)| *s == InstanceStatus::Active)
                .map(|(_, id, _)| id)
                .min()
                .unwrap_or(0);
            let release = self
                .table
                .read()?
                .get(&active)
                .and_then(|e| e.kernel_release.clone())
                .unwrap_or_default();
            (active, release)
        };
        let mut links = std::mem::take(&mut self.links);
        let this = &*self;
        let r = links.with(|| Ok(speaker), &|id| this.agent(id), f);
        self.links = links;
        r
    }

    /// Spare cpus from the pool read back (`cpus-available`), spare memory from
    /// `/proc/iomem` (pool chunks minus instance regions).
    fn spare(&mut self) -> Result<(Vec<u32>, Vec<u32>, u64), PlatformError> {
        let dt = self.sys.read(mk::DEVICE_TREE).map_err(|e| {
            PlatformError::io(
                format!("reading {}/{}", self.sys.root().display(), mk::DEVICE_TREE),
                e,
            )
        })?;
        if dt.is_empty() {
            return Err(PlatformError::NoResources(
                "no multikernel pool: write a baseline first (`mk-upgrade multikernel overlay \
                 baseline` or `kerf init`)"
                    .into(),
            ));
        }
        let root = fdt::parse(&dt)
            .map_err(|e| kernel_err(0, format!("the pool read back from device_tree: {e}")))?;
        let res = root
            .child("resources")
            .ok_or_else(|| kernel_err(0, "the pool read back has no /resources"))?;
        let to32 = |v: Option<Vec<u64>>| -> Vec<u32> {
            v.unwrap_or_default()
                .into_iter()
                .filter_map(|c| u32::try_from(c).ok())
                .collect()
        };
        let all = to32(res.prop_u64s("cpus"));
        let free = to32(res.prop_u64s("cpus-available"));
        let iomem = self
            .sys
            .iomem()
            .map_err(|e| PlatformError::io("reading /proc/iomem", e))?;
        let mut pool = 0u64;
        let mut used = 0u64;
        for l in iomem.lines() {
            let Some((range, label)) = l.trim().split_once(':') else {
                continue;
            };
            let Some((a, b)) = range.trim().split_once('-') else {
                continue;
            };
            let (Ok(a), Ok(b)) = (
                u64::from_str_radix(a.trim(), 16),
                u64::from_str_radix(b.trim(), 16),
            ) else {
                continue;
            };
            let size = b.saturating_sub(a).saturating_add(1);
            let label = label.trim();
            if label.contains(mk::IOMEM_POOL_NAME) {
                pool = pool.saturating_add(size);
            } else if label.starts_with("mk-instance-") {
                used = used.saturating_add(size);
            }
        }
        Ok((all, free, pool.saturating_sub(used)))
    }

    fn regions(&mut self, id: InstanceId, name: &str) -> Result<Vec<(u64, u64)>, PlatformError> {
        let iomem = self
            .sys
            .iomem()
            .map_err(|e| PlatformError::io("reading /proc/iomem", e))?;
        Ok(mk::instance_regions(&iomem, id, name))
    }

    /// Writes `bytes` to a sealed memfd (what `kexec_file_load` reads).
    fn sealed(name: &str, bytes: &[u8]) -> Result<std::os::fd::OwnedFd, PlatformError> {
        crate::handover::sealed_memfd(name, bytes)
            .map_err(|e| PlatformError::io(format!("writing {name} to a sealed memfd"), e))
    }
}

fn map_state(s: InstanceStatus) -> InstanceState {
    match s {
        InstanceStatus::Empty => InstanceState::Empty,
        InstanceStatus::Ready => InstanceState::Ready,
        InstanceStatus::Loaded => InstanceState::Loaded,
        InstanceStatus::Active => InstanceState::Active,
        InstanceStatus::Failed => InstanceState::Failed,
    }
}

/// Reads a whole memfd from offset 0.
fn read_fd(fd: BorrowedFd<'_>) -> std::io::Result<Vec<u8>> {
    let f = fs::File::from(fd.try_clone_to_owned()?);
    let len = usize::try_from(f.metadata()?.len()).map_err(std::io::Error::other)?;
    let mut out = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut out, 0)?;
    Ok(out)
}

impl Platform for MultikernelPlatform {
    fn probe(&mut self) -> Result<Capabilities, PlatformError> {
        let (cpus, spare_cpus, spare_memory_bytes) = self.spare()?;
        let simulated = matches!(self.kind, KernelKind::Simulated(_));
        let mut notes = vec![self.kind.label().to_owned()];
        if simulated {
            notes.push(
                "SIMULATED: the kernel calls go to a recording simulation of the patch set's \
                 interface; instance agents are local processes and descriptors move with \
                 SCM_RIGHTS"
                    .into(),
            );
        } else {
            notes.push(
                "real kernel: instances are created, loaded, started, resized and removed \
                 through /sys/fs/multikernel, kexec_file_load and reboot(2); workload moves \
                 over vsock are not implemented in this release"
                    .into(),
            );
        }
        Ok(Capabilities {
            kind: PlatformKind::Multikernel,
            emulated: false,
            side_by_side: true,
            fds_over_channel: simulated,
            cpus,
            spare_cpus,
            spare_memory_bytes,
            freezer: "cgroup.freeze (in the instance's own kernel)".into(),
            notes,
        })
    }

    fn instances(&mut self) -> Result<Vec<InstanceInfo>, PlatformError> {
        let table = self.table.read()?;
        let list = self.kernel_instances()?;
        Ok(list
            .into_iter()
            .map(|(name, id, status)| {
                let e = table.get(&id).filter(|e| e.name == name);
                let mut state = map_state(status);
                let mut workloads = Vec::new();
                if state == InstanceState::Active {
                    // `status` is not health: an active instance whose agent does not answer
                    // is reported failed.
                    match self.agent(id).ok().and_then(|a| a.workloads()) {
                        Some(w) => workloads = w,
                        None if matches!(self.kind, KernelKind::Simulated(_)) => {
                            state = InstanceState::Failed;
                        }
                        None => {}
                    }
                }
                InstanceInfo {
                    id,
                    state,
                    resources: e.map(|e| e.resources.clone()).unwrap_or_default(),
                    kernel_release: e.and_then(|e| e.kernel_release.clone()),
                    workloads,
                }
            })
            .collect())
    }

    fn create_instance(&mut self, resources: &Resources) -> Result<InstanceId, PlatformError> {
        if resources.cpus.is_empty() {
            return Err(PlatformError::NoResources(
                "an instance needs at least one cpu".into(),
            ));
        }
        let taken: Vec<InstanceId> = self
            .kernel_instances()?
            .iter()
            .map(|(_, id, _)| *id)
            .collect();
        let id = (1..=mk::MAX_INSTANCE_ID)
            .find(|i| !taken.contains(i))
            .ok_or_else(|| PlatformError::NoResources("all 511 instance ids are in use".into()))?;
        let name = format!("mk-upgrade-{id}");
        // Whole memory blocks: the spawned kernel hot-plugs memory in blocks.
        let memory_bytes = resources.memory_bytes / MEMORY_BLOCK_BYTES * MEMORY_BLOCK_BYTES;
        if memory_bytes == 0 {
            return Err(PlatformError::NoResources(format!(
                "{} bytes of spare memory: an instance needs at least one {} MiB block",
                resources.memory_bytes,
                MEMORY_BLOCK_BYTES >> 20
            )));
        }
        let req = overlay::CreateRequest {
            name: name.clone(),
            id: Some(id),
            cpus: resources.cpus.clone(),
            memory_bytes,
            devices: Vec::new(),
        };
        self.apply_overlay(
            id,
            &format!("creating instance {name}"),
            &overlay::create(&req),
        )?;
        let got = self.expect_status(id, "create", &[InstanceStatus::Ready], "ready")?;
        if got != name {
            return Err(kernel_err(
                id,
                format!("created {name} but id {id} is named {got}"),
            ));
        }
        self.table.update(|t| {
            t.insert(
                id,
                TableEntry {
                    name,
                    resources: Resources {
                        cpus: resources.cpus.clone(),
                        memory_bytes,
                    },
                    ..TableEntry::default()
                },
            );
        })?;
        Ok(id)
    }

    fn load(&mut self, id: InstanceId, kernel: &LoadableKernel<'_>) -> Result<(), PlatformError> {
        self.expect_status(id, "load", &[InstanceStatus::Ready], "ready")?;
        let bytes = read_fd(kernel.image)
            .map_err(|e| PlatformError::io("reading the verified kernel image", e))?;
        // The verified object is the signed bzImage; the vmlinux is derived from those
        // very bytes in memory (never re-read from disk).
        let vmlinux = crate::verify::vmlinux::extract(&bytes)
            .map_err(|e| kernel_err(id, format!("refusing to load: {e}")))?;
        let elf = Self::sealed("mk-upgrade-vmlinux", &vmlinux.elf)?;
        self.sys
            .kexec_load(id, elf.as_fd(), kernel.initrd, kernel.cmdline)
            .map_err(|e| kernel_err(id, e))?;
        if !self.wait_status(id, InstanceStatus::Loaded, Duration::from_secs(1))? {
            return Err(kernel_err(
                id,
                "kexec_file_load returned but the instance is not loaded",
            ));
        }
        let release = kernel.release.clone();
        let sha = hex::encode(kernel.sha256);
        self.table.update(|t| {
            if let Some(e) = t.get_mut(&id) {
                e.kernel_release = Some(release);
                e.kernel_sha256 = Some(sha);
            }
        })
    }

    fn boot(
        &mut self,
        id: InstanceId,
        _record: Option<&UpgradeRecord>,
    ) -> Result<(), PlatformError> {
        self.expect_status(id, "boot", &[InstanceStatus::Loaded], "loaded")?;
        self.sys.reboot(RebootCmd::Start, id).map_err(|e| {
            kernel_err(
                id,
                format!(
                    "reboot(start): {e}: {}",
                    mk::reboot_hint(RebootCmd::Start, e)
                ),
            )
        })?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        if !self.wait_status(id, InstanceStatus::Active, BOOT_TIMEOUT)? {
            return Err(kernel_err(
                id,
                format!(
                    "started, but its status did not become active within {BOOT_TIMEOUT:?}: the kernel did not come up"
                ),
            ));
        }
        // Active is not alive: its agent must answer.
        let agent = self.agent(id)?;
        loop {
            if agent.workloads().is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(kernel_err(
                    id,
                    format!("active, but its agent did not answer within {BOOT_TIMEOUT:?}"),
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    fn set_upgrade(&mut self, upgrade_id: UpgradeId) {
        self.links.set_upgrade(upgrade_id);
    }

    fn ping(&mut self, id: InstanceId) -> Result<(), PlatformError> {
        self.with_link(|l, c| l.heartbeat(id, c))
    }

    fn prepare(&mut self, to: InstanceId, spec: &WorkloadSpec) -> Result<(), PlatformError> {
        self.with_link(|l, c| l.prepare(to, spec, c))
    }

    fn deliver(
        &mut self,
        to: InstanceId,
        workload: &str,
        out: Outgoing,
        deadline: Instant,
    ) -> Result<Delivered, PlatformError> {
        self.with_link(|l, c| l.offer(to, workload, out, deadline, c))
    }

    fn commit(&mut self, to: InstanceId, workload: &str) -> Result<(), PlatformError> {
        self.with_link(|l, c| l.commit(to, workload, c))
    }

    fn abort(&mut self, to: InstanceId, workload: &str, reason: &str) {
        self.links.abort(to, workload, reason);
    }

    fn disconnect(&mut self, release: Option<&Resources>) {
        self.links.disconnect(release);
    }

    fn resize(&mut self, id: InstanceId, resources: &Resources) -> Result<(), PlatformError> {
        if resources.cpus.is_empty() {
            return Err(PlatformError::NoResources(
                "an active instance keeps at least one cpu".into(),
            ));
        }
        let name = self.expect_status(id, "resize", &[InstanceStatus::Active], "active")?;
        let old = self
            .table
            .read()?
            .get(&id)
            .map(|e| e.resources.clone())
            .unwrap_or_default();
        let mut ops = overlay::UpdateOps {
            cpu_remove: old
                .cpus
                .iter()
                .copied()
                .filter(|c| !resources.cpus.contains(c))
                .collect(),
            cpu_add: resources
                .cpus
                .iter()
                .copied()
                .filter(|c| !old.cpus.contains(c))
                .collect(),
            ..overlay::UpdateOps::default()
        };
        // Memory leaves an instance in whole regions, newest first (the kernel refuses the
        // region holding the instance's kernel image, so the oldest one always stays): as
        // many as reach the shrink. Growing is left to `transfer_resources`.
        let mut memory = old.memory_bytes;
        if resources.memory_bytes < old.memory_bytes {
            let want = old.memory_bytes - resources.memory_bytes;
            let regions = self.regions(id, &name)?;
            let mut taken = 0u64;
            for r in regions.iter().skip(1).rev() {
                if taken >= want {
                    break;
                }
                ops.memory_remove.push(*r);
                taken += r.1;
            }
            memory -= taken.min(memory);
        }
        if !ops.is_empty() {
            self.apply_overlay(
                id,
                &format!("resizing instance {name}"),
                &overlay::update(&name, &ops),
            )?;
        }
        // The kernel changed: remember it before anything else can fail.
        let cpus = resources.cpus.clone();
        self.table.update(|t| {
            if let Some(e) = t.get_mut(&id) {
                e.resources.cpus = cpus;
                e.resources.memory_bytes = memory;
            }
        })?;
        self.tell_cpus(id, &resources.cpus)
    }

    fn start_workload(
        &mut self,
        id: InstanceId,
        spec: &WorkloadSpec,
    ) -> Result<WorkloadInfo, PlatformError> {
        self.agent(id)?.start_workload(spec)
    }

    fn freeze(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError> {
        self.agent(id)?.freeze(workload)
    }

    fn thaw(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError> {
        self.agent(id)?.thaw(workload)
    }

    fn health(&mut self, id: InstanceId, workload: &str) -> Result<(bool, String), PlatformError> {
        self.agent(id)?.health(workload)
    }

    fn preserved_fds(
        &mut self,
        id: InstanceId,
        workload: &str,
    ) -> Result<Vec<PreservedFd>, PlatformError> {
        self.agent(id)?.preserved_fds(workload)
    }

    fn freeze_for_move(
        &mut self,
        id: InstanceId,
        workload: &str,
    ) -> Result<Vec<PreservedFd>, PlatformError> {
        self.agent(id)?.freeze_for_move(workload)
    }

    fn stop_workload(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError> {
        self.agent(id)?.stop_workload(workload)
    }

    fn halt(&mut self, id: InstanceId) -> Result<(), PlatformError> {
        self.expect_status(id, "halt", &[InstanceStatus::Active], "active")?;
        // Its agent stops its workloads first (best effort: a dead agent cannot).
        if let Ok(a) = self.agent(id)
            && let Err(e) = a.expect_done(&Request::Halt)
        {
            tracing::warn!(instance = id, error = %e, "the agent did not take the halt; halting the kernel anyway");
        }
        for (cmd, patience) in [
            (RebootCmd::Halt, HALT_TIMEOUT),
            (RebootCmd::ForceHalt, FORCE_HALT_TIMEOUT),
        ] {
            if let Err(e) = self.sys.reboot(cmd, id) {
                tracing::warn!(instance = id, cmd = cmd.name(), error = %e, "{}", mk::reboot_hint(cmd, e));
                continue;
            }
            if self.wait_status(id, InstanceStatus::Loaded, patience)? {
                return Ok(());
            }
            tracing::warn!(
                instance = id,
                cmd = cmd.name(),
                "the instance did not park (status still not loaded)"
            );
        }
        Err(kernel_err(
            id,
            "neither halt nor force halt parked it (status never returned to loaded): the \
             instance may still run; check its console (/dev/mktty) and dmesg",
        ))
    }

    fn transfer_resources(
        &mut self,
        from: InstanceId,
        to: InstanceId,
    ) -> Result<Resources, PlatformError> {
        let from_name = self.expect_status(
            from,
            "give resources away",
            &[InstanceStatus::Ready, InstanceStatus::Loaded],
            "halted (ready or loaded)",
        )?;
        let to_name =
            self.expect_status(to, "receive resources", &[InstanceStatus::Active], "active")?;
        let table = self.table.read()?;
        let moved_cpus = table
            .get(&from)
            .map(|e| e.resources.cpus.clone())
            .unwrap_or_default();
        let regions = overlay::block_chunks(&self.regions(from, &from_name)?, MEMORY_BLOCK_BYTES);
        let bytes: u64 = regions.iter().map(|(_, s)| s).sum();
        if !moved_cpus.is_empty() || !regions.is_empty() {
            self.apply_overlay(
                to,
                &format!(
                    "moving cpus {moved_cpus:?} and {} MiB from {from_name} to {to_name}",
                    bytes >> 20
                ),
                &overlay::transfer(&from_name, &to_name, &moved_cpus, &regions),
            )?;
        }
        let moved = Resources {
            cpus: moved_cpus,
            memory_bytes: bytes,
        };
        let target = self.table.update(|t| {
            if let Some(e) = t.get_mut(&from) {
                e.resources = Resources::default();
            }
            let e = t.entry(to).or_default();
            e.resources.cpus.extend(moved.cpus.iter().copied());
            e.resources.cpus.sort_unstable();
            e.resources.cpus.dedup();
            e.resources.memory_bytes += moved.memory_bytes;
            e.resources.clone()
        })?;
        self.tell_cpus(to, &target.cpus)?;
        Ok(moved)
    }

    fn destroy(&mut self, id: InstanceId) -> Result<(), PlatformError> {
        let (name, status) = self.status_of(id)?;
        match status {
            InstanceStatus::Active => {
                return Err(PlatformError::WrongState {
                    id,
                    op: "destroy",
                    state: InstanceState::Active,
                    needed: "not active (halt it first)",
                });
            }
            InstanceStatus::Loaded => {
                self.sys.kexec_unload(id).map_err(|e| kernel_err(id, e))?;
            }
            _ => {}
        }
        self.apply_overlay(
            id,
            &format!("removing instance {name}"),
            &overlay::delete(&name),
        )?;
        self.table.update(|t| {
            t.remove(&id);
        })?;
        Ok(())
    }
}
