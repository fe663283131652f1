//! A **SIMULATED** multikernel kernel, for tests and for `MK_MULTIKERNEL_SIM=DIR`: a fake
//! `/sys/fs/multikernel` tree plus a recording syscall layer ([`SimKernel`], implementing
//! [`MultikernelSys`]) that does what the patch set documents
//! (`Documentation/multikernel/{overlays,usage}.rst` of `multikernel/linux`):
//!
//! * a baseline DTB written to `device_tree` makes the pool (its cpus, its memory chunks);
//! * an overlay written to `overlays/new` is decoded (bounded decoder, [`super::fdt`]) and
//!   applied as one transaction, fragments in unit-address order (instance-create,
//!   memory-remove, memory-add, cpu-remove, cpu-add, device-remove, device-add,
//!   instance-remove); any error leaves the pool untouched and the transaction `failed`;
//!   every write creates `overlays/tx_<N>/{id,status,instance,dtbo}` (N from 101);
//! * `kexec_file_load` with `KEXEC_MULTIKERNEL | id << 5` loads an ELF (anything else:
//!   `ENOEXEC`) into a `ready` instance (`loaded`); `UNLOAD` returns it to `ready`;
//! * `reboot(…, 0x4D4B4C49, &id)` makes a `loaded` instance `active` and starts its
//!   agent — here a local process (`mk-agentd sim-instance`), standing in for the agent a
//!   spawned kernel's init would start; `0x4D4B4C48`/`0x4D4B4C46` halt it back to `loaded`;
//! * `/proc/iomem` lists the pool's chunks and each instance's regions as the kernel names
//!   them.
//!
//! It can fail any step (`faults.json` in its directory, see [`SimFaults`]): an errno for any
//! call, a failed overlay, an instance that never becomes active, a halt that never parks.
//! Every call is appended to `calls.jsonl` (the recording) so tests assert the exact flags
//! and commands. State lives in `state.json` under an `flock`, so a "crashed" orchestrator
//! and its successor see the same kernel.
//!
//! What it cannot show: that a real multikernel kernel accepts these blobs and calls (only
//! kerf's byte-identical blobs speak to that), boot times, the vsock transport between
//! kernels (the simulated agents listen on Unix sockets, and fds pass with SCM_RIGHTS
//! because every simulated instance shares this one kernel).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::fdt::{self, Node};
use super::overlay::{OVERLAY_COMPATIBLE, PAGE_SIZE};
use crate::sys::kexec::{KexecError, KexecFlags, load_hint};
use crate::sys::multikernel::{
    IOMEM_POOL_NAME, InstanceStatus, MAX_INSTANCE_ID, MultikernelSys, RebootCmd,
};

/// Where the simulated pool's memory starts (4 GiB, as on a machine whose low memory
/// belongs to the host kernel).
const POOL_BASE: u64 = 1 << 32;
/// First transaction number (as in the patch set's examples).
const FIRST_TX: u32 = 101;
/// How long a simulated halt waits for the agent to exit before killing it.
const AGENT_EXIT_PATIENCE: Duration = Duration::from_secs(5);
/// Largest "kernel" the simulated loader reads.
const MAX_IMAGE_BYTES: u64 = 1 << 30;

/// Faults the simulated kernel injects; read from `faults.json` before every call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimFaults {
    /// Errno names (`EBUSY`, `EPERM`, …) by call: `overlay`, `device_tree`, `kexec_load`,
    /// `kexec_unload`, `start`, `halt`, `force_halt`, `rmdir`.
    pub errno: BTreeMap<String, String>,
    /// The next overlay writes fail with status `failed` (and `EINVAL`) this many times.
    pub overlay_failed: u32,
    /// A started instance stays `loaded` (its kernel never comes up).
    pub never_active: bool,
    /// A started instance turns `active` but its agent never answers.
    pub agent_silent: bool,
    /// A graceful halt leaves the instance `active`.
    pub halt_never_parks: bool,
    /// A forced halt leaves it `active` too.
    pub force_halt_never_parks: bool,
}

/// One instance in the simulated kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimInstance {
    pub name: String,
    pub id: u16,
    pub status: String,
    pub cpus: Vec<u32>,
    /// Memory regions, oldest first.
    pub regions: Vec<(u64, u64)>,
    pub devices: Vec<String>,
    /// Release read from the loaded image's banner (`Linux version …`).
    pub release: Option<String>,
    pub image_sha256: Option<String>,
    pub agent_pid: Option<i32>,
}

/// The simulated kernel's whole state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimState {
    pub baseline: bool,
    pub cpus: Vec<u32>,
    /// Pool chunks `(base, size)`.
    pub chunks: Vec<(u64, u64)>,
    pub instances: Vec<SimInstance>,
    pub next_tx: u32,
}

impl SimState {
    fn used_cpus(&self) -> Vec<u32> {
        self.instances
            .iter()
            .flat_map(|i| i.cpus.iter().copied())
            .collect()
    }

    fn free_cpus(&self) -> Vec<u32> {
        let used = self.used_cpus();
        self.cpus
            .iter()
            .copied()
            .filter(|c| !used.contains(c))
            .collect()
    }

    fn region_free(&self, base: u64, size: u64) -> bool {
        let end = base.saturating_add(size);
        let in_chunk = self
            .chunks
            .iter()
            .any(|(b, s)| *b <= base && end <= b.saturating_add(*s));
        let overlaps = self
            .instances
            .iter()
            .flat_map(|i| &i.regions)
            .any(|(b, s)| {
                let e = b.saturating_add(*s);
                base < e && *b < end
            });
        in_chunk && !overlaps && size > 0
    }

    /// First free page-aligned range of `size` bytes (block-aligned when it can be).
    fn allocate(&self, size: u64) -> Option<u64> {
        let block = crate::sys::multikernel::MEMORY_BLOCK_BYTES;
        for align in [block, PAGE_SIZE] {
            for (b, s) in &self.chunks {
                let mut at = b.div_ceil(align) * align;
                while at.saturating_add(size) <= b.saturating_add(*s) {
                    if self.region_free(at, size) {
                        return Some(at);
                    }
                    at = at.saturating_add(align);
                }
            }
        }
        None
    }

    fn get(&self, name: &str) -> Option<&SimInstance> {
        self.instances.iter().find(|i| i.name == name)
    }

    fn by_id_mut(&mut self, id: u16) -> Option<&mut SimInstance> {
        self.instances.iter_mut().find(|i| i.id == id)
    }
}

/// How to start the agent of an instance that boots (tests and `MK_MULTIKERNEL_SIM`
/// point it at `mk-agentd`; without it a started instance runs no agent).
#[derive(Debug, Clone)]
pub struct AgentLauncher {
    pub agentd: PathBuf,
    /// The state directory the agents use (their workloads' cgroups are named after it).
    pub state_dir: PathBuf,
}

/// The simulated kernel, rooted in `dir` (see the module documentation).
#[derive(Debug)]
pub struct SimKernel {
    dir: PathBuf,
    sys_root: PathBuf,
    launcher: Option<AgentLauncher>,
}

fn errno_named(name: &str) -> Errno {
    match name {
        "EBUSY" => Errno::EBUSY,
        "EPERM" => Errno::EPERM,
        "EINVAL" => Errno::EINVAL,
        "ENOENT" => Errno::ENOENT,
        "ENOMEM" => Errno::ENOMEM,
        "ENOEXEC" => Errno::ENOEXEC,
        "EKEYREJECTED" => Errno::EKEYREJECTED,
        "EAGAIN" => Errno::EAGAIN,
        _ => Errno::EIO,
    }
}

fn io_errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// The release in an image's `Linux version X ` banner.
fn banner_release(bytes: &[u8]) -> Option<String> {
    let pat = b"Linux version ";
    let at = bytes.windows(pat.len()).position(|w| w == pat)? + pat.len();
    let rest = &bytes[at..bytes.len().min(at + 128)];
    let end = rest.iter().position(|b| *b == b' ' || *b == 0)?;
    std::str::from_utf8(&rest[..end]).ok().map(str::to_owned)
}

impl SimKernel {
    /// A simulated kernel whose state is in `dir` (created empty if new: no baseline).
    pub fn open(dir: &Path, launcher: Option<AgentLauncher>) -> io::Result<Self> {
        let sys_root = dir.join("sys");
        fs::create_dir_all(sys_root.join("overlays"))?;
        fs::create_dir_all(sys_root.join("instances"))?;
        fs::create_dir_all(dir.join("agents"))?;
        let k = SimKernel {
            dir: dir.to_owned(),
            sys_root,
            launcher,
        };
        if !k.sys_root.join("overlays/new").exists() {
            fs::write(k.sys_root.join("overlays/new"), b"")?;
        }
        if !k.dir.join("state.json").exists() {
            k.save(&SimState {
                next_tx: FIRST_TX,
                ..SimState::default()
            })?;
        }
        Ok(k)
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where instance `id`'s agent listens (`ctl.sock`, `chan.sock`).
    pub fn agent_dir(dir: &Path, id: u16) -> PathBuf {
        dir.join("agents").join(format!("instance-{id}"))
    }

    /// Replaces the faults.
    pub fn set_faults(&self, f: &SimFaults) -> io::Result<()> {
        fs::write(
            self.dir.join("faults.json"),
            serde_json::to_vec_pretty(f).map_err(io::Error::other)?,
        )
    }

    fn faults(&self) -> SimFaults {
        fs::read(self.dir.join("faults.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn errno_fault(&self, call: &str) -> Option<Errno> {
        self.faults().errno.get(call).map(|n| errno_named(n))
    }

    /// The state (for tests and `mk-upgrade check`).
    pub fn state(&self) -> io::Result<SimState> {
        let b = fs::read(self.dir.join("state.json"))?;
        serde_json::from_slice(&b).map_err(io::Error::other)
    }

    fn save(&self, s: &SimState) -> io::Result<()> {
        let b = serde_json::to_vec_pretty(s).map_err(io::Error::other)?;
        let tmp = self.dir.join("state.json.tmp");
        fs::write(&tmp, b)?;
        fs::rename(tmp, self.dir.join("state.json"))?;
        self.publish(s)
    }

    /// Mirrors the state into the fake sysfs tree (instances, the pool read-back).
    fn publish(&self, s: &SimState) -> io::Result<()> {
        let inst = self.sys_root.join("instances");
        for e in fs::read_dir(&inst)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if s.get(&name).is_none() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        for i in &s.instances {
            let d = inst.join(&i.name);
            fs::create_dir_all(&d)?;
            fs::write(d.join("id"), format!("{}\n", i.id))?;
            fs::write(d.join("status"), format!("{}\n", i.status))?;
        }
        if s.baseline {
            let mut w = fdt::Writer::new();
            let cells = |v: &[u32]| -> Vec<u8> {
                v.iter().flat_map(|c| u64::from(*c).to_be_bytes()).collect()
            };
            w.begin_node("")
                .property_string("compatible", "multikernel-v1")
                .property_u32("id", 0)
                .begin_node("resources")
                .property("cpus", &cells(&s.cpus))
                .property("cpus-available", &cells(&s.free_cpus()));
            for (b, sz) in &s.chunks {
                let mut reg = b.to_be_bytes().to_vec();
                reg.extend_from_slice(&sz.to_be_bytes());
                w.begin_node(&format!("memory@{b:x}"))
                    .property_string("device_type", "memory")
                    .property("reg", &reg)
                    .property_u32("numa-node-id", 0)
                    .end_node();
            }
            fs::write(self.sys_root.join("device_tree"), w.finish())?;
        } else if !self.sys_root.join("device_tree").exists() {
            fs::write(self.sys_root.join("device_tree"), b"")?;
        }
        Ok(())
    }

    fn lock(&self) -> io::Result<Flock<fs::File>> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("state.lock"))?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| io_errno(e))
    }

    fn record(&self, call: serde_json::Value) {
        use std::io::Write;
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("calls.jsonl"))
        {
            let _ = writeln!(f, "{call}");
        }
    }

    /// The recorded calls, oldest first.
    pub fn calls(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.dir.join("calls.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn write_tx(&self, s: &mut SimState, blob: &[u8], target: &str, ok: bool) -> io::Result<u32> {
        let n = s.next_tx;
        s.next_tx += 1;
        let d = self.sys_root.join("overlays").join(format!("tx_{n}"));
        fs::create_dir_all(&d)?;
        fs::write(d.join("id"), format!("{n}\n"))?;
        fs::write(d.join("status"), if ok { "applied\n" } else { "failed\n" })?;
        fs::write(d.join("instance"), format!("{target}\n"))?;
        fs::write(d.join("dtbo"), blob)?;
        Ok(n)
    }

    fn apply_baseline(&self, blob: &[u8]) -> Result<(), Errno> {
        let root = fdt::parse(blob).map_err(|_| Errno::EINVAL)?;
        if root.prop_str("compatible") != Some(super::overlay::HOST_COMPATIBLE) {
            return Err(Errno::EINVAL);
        }
        let r = root.child("resources").ok_or(Errno::EINVAL)?;
        let cpus: Vec<u32> = r
            .prop_u64s("cpus")
            .ok_or(Errno::EINVAL)?
            .into_iter()
            .map(|c| u32::try_from(c).map_err(|_| Errno::EINVAL))
            .collect::<Result<_, _>>()?;
        let _lock = self.lock().map_err(|_| Errno::EIO)?;
        let mut s = self.state().map_err(|_| Errno::EIO)?;
        if !s.instances.is_empty() {
            return Err(Errno::EBUSY);
        }
        let mut base = POOL_BASE;
        s.chunks.clear();
        for m in r.children.iter().filter(|c| c.name.starts_with("memory@")) {
            let size = m.prop_uint("size").ok_or(Errno::EINVAL)?;
            if size == 0 || size % PAGE_SIZE != 0 {
                return Err(Errno::EINVAL);
            }
            s.chunks.push((base, size));
            base = base.saturating_add(size.div_ceil(1 << 30) << 30);
        }
        s.cpus = cpus;
        s.baseline = true;
        self.save(&s).map_err(|_| Errno::EIO)
    }

    fn apply_overlay(&self, blob: &[u8]) -> Result<(), Errno> {
        let _lock = self.lock().map_err(|_| Errno::EIO)?;
        let mut s = self.state().map_err(|_| Errno::EIO)?;
        let mut faults = self.faults();
        let parsed = fdt::parse(blob);
        let target = parsed
            .as_ref()
            .ok()
            .and_then(|r| r.children.first())
            .and_then(|f| f.prop_str("target-path"))
            .unwrap_or("")
            .to_owned();
        let result = if faults.overlay_failed > 0 {
            faults.overlay_failed -= 1;
            let _ = self.set_faults(&faults);
            Err(Errno::EINVAL)
        } else {
            match parsed {
                Ok(root) => {
                    let mut next = s.clone();
                    apply_fragments(&mut next, &root).map(|()| next)
                }
                Err(_) => Err(Errno::EINVAL),
            }
        };
        match result {
            Ok(mut next) => {
                self.write_tx(&mut next, blob, &target, true)
                    .map_err(|_| Errno::EIO)?;
                self.save(&next).map_err(|_| Errno::EIO)
            }
            Err(e) => {
                self.write_tx(&mut s, blob, &target, false)
                    .map_err(|_| Errno::EIO)?;
                self.save(&s).map_err(|_| Errno::EIO)?;
                Err(e)
            }
        }
    }

    fn start_agent(&self, inst: &SimInstance) -> Option<i32> {
        let l = self.launcher.as_ref()?;
        let dir = Self::agent_dir(&self.dir, inst.id);
        fs::create_dir_all(&dir).ok()?;
        let (log, log2) = super::super::agents::private_log(&dir.join("agent.log")).ok()?;
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(&l.agentd)
            .arg("--state-dir")
            .arg(&l.state_dir)
            .arg("sim-instance")
            .arg("--sim-dir")
            .arg(&self.dir)
            .arg("--id")
            .arg(inst.id.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .ok()?;
        let pid = i32::try_from(child.id()).ok();
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        pid
    }

    fn stop_agent(&self, id: u16, pid: Option<i32>, patience: Duration) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        if let Some(p) = pid {
            let alive = || {
                kill(Pid::from_raw(p), None).is_ok()
                    && crate::sys::cgroup::proc_state(p).is_some_and(|s| s != 'Z')
            };
            let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
            let deadline = Instant::now() + patience;
            while alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if alive() {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
        // A halted kernel takes its processes with it.
        if let Some(l) = &self.launcher
            && let Some(f) =
                crate::sys::cgroup::Freezer::of_tag(&agent_cgroup_tag(&l.state_dir, id))
        {
            let _ = f.kill_base();
            let _ = f.remove_base_within(Duration::from_millis(500));
        }
    }
}

/// The cgroup of simulated instance `id`'s workloads (relative to the cgroup2 mount).
pub fn agent_cgroup_tag(state_dir: &Path, id: u16) -> String {
    format!(
        "mk-upgrade-mksim/{}/instance-{id}",
        super::super::emulated::state_tag(state_dir)
    )
}

fn u32s(v: Vec<u64>) -> Result<Vec<u32>, Errno> {
    v.into_iter()
        .map(|c| u32::try_from(c).map_err(|_| Errno::EINVAL))
        .collect()
}

fn reg_of(n: &Node) -> Result<(u64, u64), Errno> {
    let r = n.prop("reg").ok_or(Errno::EINVAL)?;
    if r.len() != 16 {
        return Err(Errno::EINVAL);
    }
    let b = u64::from_be_bytes(r[..8].try_into().map_err(|_| Errno::EINVAL)?);
    let s = u64::from_be_bytes(r[8..].try_into().map_err(|_| Errno::EINVAL)?);
    if s == 0 || s % PAGE_SIZE != 0 || b % PAGE_SIZE != 0 {
        return Err(Errno::EINVAL);
    }
    Ok((b, s))
}

fn cpu_of(n: &Node) -> Result<u32, Errno> {
    let c = n.prop_uint("reg").ok_or(Errno::EINVAL)?;
    u32::try_from(c).map_err(|_| Errno::EINVAL)
}

/// Applies every fragment of an overlay to `s` (in unit-address order), or fails.
fn apply_fragments(s: &mut SimState, root: &Node) -> Result<(), Errno> {
    if root.prop_str("compatible") != Some(OVERLAY_COMPATIBLE) {
        return Err(Errno::EINVAL);
    }
    let mut frags: Vec<(u64, &Node)> = root
        .children
        .iter()
        .filter_map(|f| {
            let n = f.name.strip_prefix("fragment@")?;
            Some((u64::from_str_radix(n, 16).ok()?, f))
        })
        .collect();
    if frags.is_empty() || frags.len() != root.children.len() {
        return Err(Errno::EINVAL);
    }
    frags.sort_by_key(|(n, _)| *n);
    for (_, f) in frags {
        let target = f.prop_str("target-path").ok_or(Errno::EINVAL)?;
        let ov = f.child("__overlay__").ok_or(Errno::EINVAL)?;
        if target == "/resources" {
            // The pool's own resizing is not simulated.
            return Err(if s.baseline {
                Errno::EOPNOTSUPP
            } else {
                Errno::EPERM
            });
        } else if target == "/instances" {
            if let Some(c) = ov.child("instance-create") {
                create(s, c)?;
            }
            if let Some(r) = ov.child("instance-remove") {
                let name = r.prop_str("instance-name").ok_or(Errno::EINVAL)?;
                let i = s.get(name).ok_or(Errno::ENOENT)?;
                if matches!(i.status.as_str(), "loaded" | "active") {
                    return Err(Errno::EBUSY);
                }
                s.instances.retain(|i| i.name != name);
            }
        } else if let Some(name) = target.strip_prefix("/instances/") {
            if name.is_empty() || name.contains('/') {
                return Err(Errno::EINVAL);
            }
            update(s, name, ov)?;
        } else {
            return Err(Errno::EINVAL);
        }
    }
    Ok(())
}

fn create(s: &mut SimState, c: &Node) -> Result<(), Errno> {
    if !s.baseline {
        return Err(Errno::EPERM);
    }
    let name = c.prop_str("instance-name").ok_or(Errno::EINVAL)?.to_owned();
    super::overlay::check_name(&name).map_err(|_| Errno::EINVAL)?;
    if s.get(&name).is_some() {
        return Err(Errno::EEXIST);
    }
    let id = match c.prop_uint("id") {
        Some(id) => {
            let id = u16::try_from(id).map_err(|_| Errno::EINVAL)?;
            if id == 0 || id > MAX_INSTANCE_ID || s.instances.iter().any(|i| i.id == id) {
                return Err(Errno::EINVAL);
            }
            id
        }
        None => (1..=MAX_INSTANCE_ID)
            .find(|id| !s.instances.iter().any(|i| i.id == *id))
            .ok_or(Errno::ENOSPC)?,
    };
    let r = c.child("resources").ok_or(Errno::EINVAL)?;
    let cpus = u32s(r.prop_u64s("cpus").ok_or(Errno::EINVAL)?)?;
    let free = s.free_cpus();
    if cpus.is_empty() || cpus.iter().any(|c| !free.contains(c)) {
        return Err(Errno::EBUSY);
    }
    let bytes = r.prop_uint("memory-bytes").ok_or(Errno::EINVAL)?;
    if bytes == 0 || bytes % PAGE_SIZE != 0 {
        return Err(Errno::EINVAL);
    }
    let base = s.allocate(bytes).ok_or(Errno::ENOMEM)?;
    s.instances.push(SimInstance {
        name,
        id,
        status: InstanceStatus::Ready.as_str().into(),
        cpus,
        regions: vec![(base, bytes)],
        devices: Vec::new(),
        release: None,
        image_sha256: None,
        agent_pid: None,
    });
    Ok(())
}

fn update(s: &mut SimState, name: &str, ov: &Node) -> Result<(), Errno> {
    let idx = s
        .instances
        .iter()
        .position(|i| i.name == name)
        .ok_or(Errno::ENOENT)?;
    if let Some(m) = ov.child("memory-remove") {
        for item in &m.children {
            let (b, sz) = reg_of(item)?;
            let i = &mut s.instances[idx];
            // A whole region, or a block-aligned piece of one (split).
            let at = i
                .regions
                .iter()
                .position(|(rb, rs)| *rb <= b && b + sz <= rb + rs)
                .ok_or(Errno::EINVAL)?;
            let (rb, rs) = i.regions.remove(at);
            let mut rest = Vec::new();
            if rb < b {
                rest.push((rb, b - rb));
            }
            if b + sz < rb + rs {
                rest.push((b + sz, rb + rs - b - sz));
            }
            for (k, r) in rest.into_iter().enumerate() {
                i.regions.insert(at + k, r);
            }
        }
    }
    if let Some(m) = ov.child("memory-add") {
        for item in &m.children {
            let (b, sz) = reg_of(item)?;
            if !s.region_free(b, sz) {
                return Err(Errno::EBUSY);
            }
            s.instances[idx].regions.push((b, sz));
        }
    }
    if let Some(m) = ov.child("cpu-remove") {
        for item in &m.children {
            let c = cpu_of(item)?;
            let i = &mut s.instances[idx];
            if !i.cpus.contains(&c) {
                return Err(Errno::EINVAL);
            }
            if i.status == "active" && i.cpus.len() == 1 {
                return Err(Errno::EBUSY);
            }
            i.cpus.retain(|x| *x != c);
        }
    }
    if let Some(m) = ov.child("cpu-add") {
        for item in &m.children {
            let c = cpu_of(item)?;
            if !s.free_cpus().contains(&c) {
                return Err(Errno::EBUSY);
            }
            s.instances[idx].cpus.push(c);
            s.instances[idx].cpus.sort_unstable();
        }
    }
    if let Some(m) = ov.child("device-remove") {
        for item in &m.children {
            let p = item.prop_str("pci-id").ok_or(Errno::EINVAL)?;
            let i = &mut s.instances[idx];
            let before = i.devices.len();
            i.devices.retain(|d| d != p);
            if i.devices.len() == before {
                return Err(Errno::EINVAL);
            }
        }
    }
    if let Some(m) = ov.child("device-add") {
        for item in &m.children {
            let p = item.prop_str("pci-id").ok_or(Errno::EINVAL)?.to_owned();
            super::overlay::check_pci(&p).map_err(|_| Errno::EINVAL)?;
            if s.instances.iter().any(|i| i.devices.contains(&p)) {
                return Err(Errno::EBUSY);
            }
            s.instances[idx].devices.push(p);
        }
    }
    Ok(())
}

impl MultikernelSys for SimKernel {
    fn root(&self) -> &Path {
        &self.sys_root
    }

    fn write_blob(&mut self, rel: &str, bytes: &[u8]) -> io::Result<()> {
        self.record(serde_json::json!({
            "call": "write", "path": rel, "len": bytes.len(),
            "sha256": hex::encode(Sha256::digest(bytes)),
        }));
        let r = match rel {
            "device_tree" => match self.errno_fault("device_tree") {
                Some(e) => Err(e),
                None => self.apply_baseline(bytes),
            },
            "overlays/new" => match self.errno_fault("overlay") {
                Some(e) => Err(e),
                None => self.apply_overlay(bytes),
            },
            _ => Err(Errno::EACCES),
        };
        r.map_err(io_errno)
    }

    fn read(&mut self, rel: &str) -> io::Result<Vec<u8>> {
        fs::read(self.sys_root.join(rel))
    }

    fn list(&mut self, rel: &str) -> io::Result<Vec<String>> {
        let mut v: Vec<String> = fs::read_dir(self.sys_root.join(rel))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        Ok(v)
    }

    fn rmdir(&mut self, rel: &str) -> io::Result<()> {
        self.record(serde_json::json!({"call": "rmdir", "path": rel}));
        if let Some(e) = self.errno_fault("rmdir") {
            return Err(io_errno(e));
        }
        // Only failed transactions are cleared here (rolling an applied one back is not
        // simulated).
        let d = self.sys_root.join(rel);
        let status = fs::read_to_string(d.join("status")).unwrap_or_default();
        if status.trim() != "failed" {
            return Err(io_errno(Errno::EOPNOTSUPP));
        }
        fs::remove_dir_all(d)
    }

    fn iomem(&mut self) -> io::Result<String> {
        let s = self.state()?;
        let mut out = String::new();
        for (b, sz) in &s.chunks {
            let _ = writeln!(out, "{b:x}-{:x} : {IOMEM_POOL_NAME}", b + sz - 1);
            for i in &s.instances {
                for (n, (rb, rs)) in i.regions.iter().enumerate() {
                    if *rb >= *b && rb + rs <= b + sz {
                        let _ = writeln!(
                            out,
                            "  {rb:x}-{:x} : mk-instance-{}-{}-region-{n}",
                            rb + rs - 1,
                            i.id,
                            i.name
                        );
                    }
                }
            }
        }
        Ok(out)
    }

    fn kexec_load(
        &mut self,
        id: u16,
        kernel: BorrowedFd<'_>,
        initrd: Option<BorrowedFd<'_>>,
        cmdline: &str,
    ) -> Result<(), KexecError> {
        let mut flags = KexecFlags::multikernel(id)?;
        if initrd.is_none() {
            flags = flags | KexecFlags::NO_INITRAMFS;
        }
        self.record(serde_json::json!({
            "call": "kexec_file_load", "id": id, "flags": flags.bits(),
            "initrd": initrd.is_some(), "cmdline": cmdline,
        }));
        let fail = |errno: Errno| KexecError::Load {
            flags,
            errno,
            hint: load_hint(errno),
        };
        if let Some(e) = self.errno_fault("kexec_load") {
            return Err(fail(e));
        }
        let image = {
            // From offset 0 whatever the fd's file position (a memfd just written is at
            // its end), at most MAX_IMAGE_BYTES.
            let f = fs::File::from(
                kernel
                    .try_clone_to_owned()
                    .map_err(|_| fail(Errno::EBADF))?,
            );
            let len = f.metadata().map_err(|_| fail(Errno::EBADF))?.len();
            if len > MAX_IMAGE_BYTES {
                return Err(fail(Errno::EFBIG));
            }
            let mut v = vec![0u8; usize::try_from(len).map_err(|_| fail(Errno::EFBIG))?];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut v, 0)
                .map_err(|_| fail(Errno::EIO))?;
            v
        };
        if !crate::verify::vmlinux::is_elf(&image) {
            return Err(fail(Errno::ENOEXEC));
        }
        let _lock = self.lock().map_err(|_| fail(Errno::EIO))?;
        let mut s = self.state().map_err(|_| fail(Errno::EIO))?;
        let i = s.by_id_mut(id).ok_or_else(|| fail(Errno::ENOENT))?;
        if i.status != "ready" {
            return Err(fail(Errno::EBUSY));
        }
        i.status = InstanceStatus::Loaded.as_str().into();
        i.release = banner_release(&image);
        i.image_sha256 = Some(hex::encode(Sha256::digest(&image)));
        self.save(&s).map_err(|_| fail(Errno::EIO))
    }

    fn kexec_unload(&mut self, id: u16) -> Result<(), KexecError> {
        let flags = KexecFlags::UNLOAD | KexecFlags::multikernel(id)?;
        self.record(serde_json::json!({"call": "kexec_file_load", "id": id, "flags": flags.bits(), "unload": true}));
        let fail = |errno: Errno| KexecError::Load {
            flags,
            errno,
            hint: load_hint(errno),
        };
        if let Some(e) = self.errno_fault("kexec_unload") {
            return Err(fail(e));
        }
        let _lock = self.lock().map_err(|_| fail(Errno::EIO))?;
        let mut s = self.state().map_err(|_| fail(Errno::EIO))?;
        let i = s.by_id_mut(id).ok_or_else(|| fail(Errno::ENOENT))?;
        match i.status.as_str() {
            "active" => return Err(fail(Errno::EBUSY)),
            "loaded" => {
                i.status = InstanceStatus::Ready.as_str().into();
                i.release = None;
                i.image_sha256 = None;
            }
            _ => {}
        }
        self.save(&s).map_err(|_| fail(Errno::EIO))
    }

    fn reboot(&mut self, cmd: RebootCmd, id: u16) -> Result<(), Errno> {
        self.record(serde_json::json!({"call": "reboot", "cmd": cmd.value(), "id": id}));
        let key = match cmd {
            RebootCmd::Start => "start",
            RebootCmd::Halt => "halt",
            RebootCmd::ForceHalt => "force_halt",
        };
        if let Some(e) = self.errno_fault(key) {
            return Err(e);
        }
        let faults = self.faults();
        let lock = self.lock().map_err(|_| Errno::EIO)?;
        let mut s = self.state().map_err(|_| Errno::EIO)?;
        let i = s.by_id_mut(id).ok_or(Errno::EINVAL)?;
        match cmd {
            RebootCmd::Start => {
                if i.status != "loaded" {
                    return Err(if i.status == "active" {
                        Errno::EBUSY
                    } else {
                        Errno::ENOENT
                    });
                }
                if faults.never_active {
                    return Ok(());
                }
                i.status = InstanceStatus::Active.as_str().into();
                let snapshot = i.clone();
                self.save(&s).map_err(|_| Errno::EIO)?;
                drop(lock);
                if !faults.agent_silent
                    && let Some(pid) = self.start_agent(&snapshot)
                {
                    let _lock = self.lock().map_err(|_| Errno::EIO)?;
                    let mut s = self.state().map_err(|_| Errno::EIO)?;
                    if let Some(i) = s.by_id_mut(id) {
                        i.agent_pid = Some(pid);
                    }
                    self.save(&s).map_err(|_| Errno::EIO)?;
                }
                Ok(())
            }
            RebootCmd::Halt | RebootCmd::ForceHalt => {
                if i.status != "active" {
                    return Err(Errno::EINVAL);
                }
                let parks = match cmd {
                    RebootCmd::Halt => !faults.halt_never_parks,
                    _ => !faults.force_halt_never_parks,
                };
                if !parks {
                    return Ok(());
                }
                let pid = i.agent_pid.take();
                i.status = InstanceStatus::Loaded.as_str().into();
                self.save(&s).map_err(|_| Errno::EIO)?;
                drop(lock);
                let patience = if cmd == RebootCmd::Halt {
                    AGENT_EXIT_PATIENCE
                } else {
                    Duration::ZERO
                };
                self.stop_agent(id, pid, patience);
                Ok(())
            }
        }
    }
}
