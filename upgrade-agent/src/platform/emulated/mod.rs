//! `--platform emulated`: an **emulation** of the multikernel interface for any Linux
//! machine. No kernel is booted: each "instance" is a supervisor process (`mk-agentd
//! --instance ID`, see [`instance`] and [`crate::host::supervisor`]) pinned to the cpus the
//! instance owns, reporting the release of the bzImage it was loaded with.
//!
//! What it enforces, because the real interface does (`/work`'s multikernel reference):
//! instance ids 1..=511; states `empty → ready → loaded → active`; no boot without a loaded
//! image and cpus; no load unless `ready`; resources only from spare cpus/memory; a halted
//! instance goes back to `loaded`; cpus of an active instance cannot be given away.
//!
//! Layout under `<state-dir>/emulated/`: `pool.json` (the instance table, see [`pool`]),
//! and per instance `instance-<id>/` with `kernel` (the loaded image), `ctl.sock`,
//! `chan.sock` and `supervisor.log`.

pub mod instance;
pub mod machine;
pub mod pool;

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::BorrowedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kho_proto::channel::UpgradeId;
use sha2::{Digest, Sha256};

use self::pool::{InstanceEntry, PoolStore};
use super::agents::{Agent, Links};
use super::channel::ChannelLink;
use crate::handover::Outgoing;
use crate::host::ctl::{self, Request};
use crate::platform::{
    Capabilities, Delivered, InstanceId, InstanceInfo, InstanceState, LoadableKernel, Platform,
    PlatformError, PlatformKind, PreservedFd, Resources, WorkloadInfo,
};
use crate::record::UpgradeRecord;
use crate::workload::WorkloadSpec;

/// How long a booting supervisor may take to answer its first ping.
const BOOT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a halting supervisor may take to exit.
const HALT_TIMEOUT: Duration = Duration::from_secs(10);

/// The emulated platform, as seen by the orchestrator.
#[derive(Debug)]
pub struct EmulatedPlatform {
    store: PoolStore,
    state_dir: PathBuf,
    /// The channels of the current upgrade (opened on first use).
    links: Links,
    /// A control connection per instance, kept across requests (`ctl::call_kept`): a
    /// move's `FreezeFds` then goes over the connection its `Ping` opened.
    kept: Mutex<BTreeMap<InstanceId, Arc<Mutex<ctl::Kept>>>>,
    /// The orchestrating thread's cpu mask before the first move kept it off a receiving
    /// instance's cpus ([`Self::keep_off`]); put back by `abort` (a failed move),
    /// `disconnect` and on drop.
    own_cpus: Option<nix::sched::CpuSet>,
}

/// The directory of instance `id`.
pub fn instance_dir(emu_dir: &Path, id: InstanceId) -> PathBuf {
    emu_dir.join(format!("instance-{id}"))
}

/// A short stable tag for a state directory (names its cgroups, so two emulated machines
/// on one host do not collide).
pub fn state_tag(state_dir: &Path) -> String {
    let canon = fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let digest = Sha256::digest(canon.as_os_str().as_encoded_bytes());
    hex::encode(&digest[..6])
}

/// Where `mk-agentd` is: `$MK_AGENTD`, else beside the running executable (or one level up,
/// for test binaries in `target/*/deps`).
pub fn agentd_path() -> Result<PathBuf, PlatformError> {
    if let Some(p) = std::env::var_os("MK_AGENTD") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()
        .map_err(|e| PlatformError::io("locating the running executable", e))?;
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join("mk-agentd");
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().filter(|p| {
            p.ends_with("debug")
                || p.ends_with("release")
                || p.file_name().is_some_and(|n| n == "target")
        });
    }
    Err(PlatformError::Instance {
        id: 0,
        what: format!(
            "cannot find mk-agentd beside {}; install it there or set MK_AGENTD",
            exe.display()
        ),
    })
}

/// `own` without `cpus`, if any cpu is left.
fn cpus_outside(own: &nix::sched::CpuSet, cpus: &[u32]) -> Option<nix::sched::CpuSet> {
    let mut allowed = *own;
    for c in cpus {
        let _ = allowed.unset(*c as usize);
    }
    (0..nix::sched::CpuSet::count())
        .any(|c| allowed.is_set(c).unwrap_or(false))
        .then_some(allowed)
}

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && crate::sys::cgroup::proc_state(pid).is_some_and(|s| s != 'Z')
}

impl Drop for EmulatedPlatform {
    fn drop(&mut self) {
        self.restore_cpus();
    }
}

impl EmulatedPlatform {
    /// The emulated machine whose state lives in `<state_dir>/emulated`.
    pub fn new(state_dir: &Path) -> Result<Self, PlatformError> {
        Ok(EmulatedPlatform {
            store: PoolStore::open(&state_dir.join("emulated"))?,
            state_dir: state_dir.to_owned(),
            links: Links::default(),
            kept: Mutex::default(),
            own_cpus: None,
        })
    }

    /// EMULATED topology: on a multikernel machine the orchestrator is a process of the old
    /// kernel, so it never runs on the cpus of the instance it hands a workload to. Here it
    /// is a host process the scheduler may put anywhere, and it was put there: a unix
    /// socket's wake-up is synchronous, so the receiving instance's agent (pinned to its
    /// cpus) woke on the orchestrator's cpu and kept it from reading `RegionVerified`
    /// while the standby copy adopted its descriptors, a few hundred microseconds of every
    /// handover (docs/performance.md). Before a move (outside the blackout: changing the
    /// mask migrates the thread) the calling thread leaves instance `to`'s cpus, when any
    /// of its own allowed cpus remain. Best effort: an error leaves the mask as it was. A
    /// move that fails between `prepare` and `disconnect` leaves it narrowed until the
    /// platform is dropped.
    fn keep_off(&mut self, to: InstanceId) {
        use nix::sched::{sched_getaffinity, sched_setaffinity};
        let this_thread = nix::unistd::Pid::from_raw(0);
        let Ok(cpus) = self
            .store
            .read()
            .and_then(|pool| Ok(pool.get(to)?.resources.cpus.clone()))
        else {
            return;
        };
        // Threads started while the mask is narrowed would keep it for good: rayon's pool
        // (the digests) starts now, sized by and spread over the thread's own cpus.
        rayon::current_num_threads();
        let own = match self.own_cpus {
            Some(m) => m,
            None => match sched_getaffinity(this_thread) {
                Ok(m) => *self.own_cpus.insert(m),
                Err(_) => return,
            },
        };
        if let Some(allowed) = cpus_outside(&own, &cpus)
            && let Err(e) = sched_setaffinity(this_thread, &allowed)
        {
            tracing::debug!(error = %e, "cannot keep the orchestrator off the new instance's cpus");
        }
    }

    /// Gives the calling thread back the cpu mask [`Self::keep_off`] found.
    fn restore_cpus(&mut self) {
        if let Some(m) = self.own_cpus.take() {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &m);
        }
    }

    /// The active instance with the lowest id (the old instance of the upgrade) and its
    /// release: who the channel link speaks as.
    fn speaker(&self) -> Result<(InstanceId, String), PlatformError> {
        let pool = self.store.read()?;
        Ok(pool
            .instances
            .iter()
            .filter(|e| e.state == InstanceState::Active)
            .min_by_key(|e| e.id)
            .map_or((0, String::new()), |e| {
                (e.id, e.kernel_release.clone().unwrap_or_default())
            }))
    }

    /// Runs `f` with the channel link and a connector to this machine's instances.
    fn with_link<T>(
        &mut self,
        f: impl FnOnce(&mut ChannelLink, &mut super::channel::Connector<'_>) -> Result<T, PlatformError>,
    ) -> Result<T, PlatformError> {
        let mut links = std::mem::take(&mut self.links);
        let this = &*self;
        let r = links.with(|| this.speaker(), &|id| this.agent(id), f);
        self.links = links;
        r
    }

    /// The instance table.
    pub fn store(&self) -> &PoolStore {
        &self.store
    }

    fn dir(&self, id: InstanceId) -> PathBuf {
        instance_dir(self.store.dir(), id)
    }

    /// The agent (supervisor) of active instance `id`, checked to be alive.
    fn agent(&self, id: InstanceId) -> Result<Agent, PlatformError> {
        let pool = self.store.read()?;
        let entry = pool.expect(id, "control", &[InstanceState::Active], "active")?;
        if let Some(pid) = entry.supervisor_pid
            && !pid_alive(pid)
        {
            return Err(PlatformError::Instance {
                id,
                what: format!(
                    "its supervisor (pid {pid}) is gone: the emulated instance crashed; see {}",
                    self.dir(id).join("supervisor.log").display()
                ),
            });
        }
        let kept = Arc::clone(
            self.kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(id)
                .or_default(),
        );
        Ok(Agent::new(id, self.dir(id)).keeping(kept))
    }

    /// Closes the control connection kept to instance `id` (it halted or is gone).
    fn forget_connection(&self, id: InstanceId) {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
    }

    /// Tells instance `id` to accept channel frames of `upgrade_id`.
    pub fn expect_upgrade(
        &self,
        id: InstanceId,
        upgrade_id: UpgradeId,
    ) -> Result<(), PlatformError> {
        self.agent(id)?.expect_upgrade(upgrade_id)
    }

    fn info(&self, e: &InstanceEntry) -> InstanceInfo {
        let workloads = if e.state == InstanceState::Active {
            self.agent(e.id)
                .ok()
                .and_then(|a| a.workloads())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        InstanceInfo {
            id: e.id,
            state: if e.state == InstanceState::Active
                && e.supervisor_pid.is_some_and(|p| !pid_alive(p))
            {
                InstanceState::Failed
            } else {
                e.state
            },
            resources: e.resources.clone(),
            kernel_release: e.kernel_release.clone(),
            workloads,
        }
    }
}

/// Reads a whole (sealed) memfd from offset 0, whatever its shared file position is.
fn read_fd_to_vec(fd: BorrowedFd<'_>) -> std::io::Result<Vec<u8>> {
    let f = fs::File::from(fd.try_clone_to_owned()?);
    let len = usize::try_from(f.metadata()?.len()).map_err(std::io::Error::other)?;
    let mut out = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut out, 0)?;
    Ok(out)
}

impl Platform for EmulatedPlatform {
    fn probe(&mut self) -> Result<Capabilities, PlatformError> {
        let pool = self.store.read()?;
        let freezer =
            if crate::sys::cgroup::cgroup2_mount().is_some() && nix::unistd::geteuid().is_root() {
                "cgroup.freeze"
            } else {
                "SIGSTOP"
            };
        Ok(Capabilities {
            kind: PlatformKind::Emulated,
            emulated: true,
            side_by_side: true,
            fds_over_channel: true,
            cpus: pool.cpus.clone(),
            spare_cpus: pool.spare_cpus(),
            spare_memory_bytes: pool.spare_memory(),
            freezer: freezer.to_owned(),
            notes: vec![
                "EMULATED multikernel: instances are supervisor processes pinned to their cpus; no kernel is booted".into(),
                "memfds and listening sockets move between instances with SCM_RIGHTS (standing in for KHO/LUO preservation)".into(),
            ],
        })
    }

    fn instances(&mut self) -> Result<Vec<InstanceInfo>, PlatformError> {
        let pool = self.store.read()?;
        Ok(pool.instances.iter().map(|e| self.info(e)).collect())
    }

    fn workload_info(
        &mut self,
        id: InstanceId,
        workload: &str,
    ) -> Result<(Option<String>, WorkloadInfo), PlatformError> {
        let missing = || PlatformError::NoSuchWorkload {
            instance: id,
            workload: workload.to_owned(),
        };
        let pool = self.store.read()?;
        let e = pool
            .instances
            .iter()
            .find(|e| e.id == id && e.state == InstanceState::Active)
            .ok_or_else(missing)?;
        // As `instances`: an instance that does not answer lists no workloads.
        let info = self
            .agent(id)
            .and_then(|a| a.workload(workload))
            .map_err(|_| missing())?;
        Ok((e.kernel_release.clone(), info))
    }

    fn create_instance(&mut self, resources: &Resources) -> Result<InstanceId, PlatformError> {
        if resources.cpus.is_empty() {
            return Err(PlatformError::NoResources(
                "an instance needs at least one cpu".into(),
            ));
        }
        let id = self.store.update(|pool| {
            let spare = pool.spare_cpus();
            if let Some(c) = resources.cpus.iter().find(|c| !spare.contains(c)) {
                return Err(PlatformError::NoResources(format!(
                    "cpu {c} is not spare (spare cpus: {spare:?})"
                )));
            }
            if resources.memory_bytes > pool.spare_memory() {
                return Err(PlatformError::NoResources(format!(
                    "{} bytes of memory requested, {} spare",
                    resources.memory_bytes,
                    pool.spare_memory()
                )));
            }
            let id = pool.free_id()?;
            pool.instances.push(InstanceEntry {
                id,
                state: InstanceState::Ready,
                resources: resources.clone(),
                kernel_release: None,
                kernel_sha256: None,
                supervisor_pid: None,
            });
            Ok(id)
        })?;
        fs::create_dir_all(self.dir(id))
            .map_err(|e| PlatformError::io(format!("creating {}", self.dir(id).display()), e))?;
        Ok(id)
    }

    fn load(&mut self, id: InstanceId, kernel: &LoadableKernel<'_>) -> Result<(), PlatformError> {
        let bytes = read_fd_to_vec(kernel.image)
            .map_err(|e| PlatformError::io("reading the kernel image memfd", e))?;
        // The emulated "kernel" reports what the image header says, like a booted kernel
        // reports its own uname -r; a file that is not a kernel is refused here too.
        let info = crate::verify::bzimage::parse(&bytes).map_err(|e| PlatformError::Instance {
            id,
            what: format!("refusing to load: {e}"),
        })?;
        if info.release != kernel.release {
            return Err(PlatformError::Instance {
                id,
                what: format!(
                    "image header says release {}, caller expected {}",
                    info.release, kernel.release
                ),
            });
        }
        let sha = hex::encode(Sha256::digest(&bytes));
        self.store.update(|pool| {
            pool.expect(id, "load", &[InstanceState::Ready], "ready")?;
            let path = instance_dir(self.store.dir(), id).join("kernel");
            rollback::atomic_write(&path, &bytes).map_err(|e| PlatformError::Instance {
                id,
                what: e.to_string(),
            })?;
            let e = pool.get_mut(id)?;
            e.state = InstanceState::Loaded;
            e.kernel_release = Some(info.release.clone());
            e.kernel_sha256 = Some(sha.clone());
            Ok(())
        })
    }

    fn boot(
        &mut self,
        id: InstanceId,
        _record: Option<&UpgradeRecord>,
    ) -> Result<(), PlatformError> {
        let agentd = agentd_path()?;
        let pool = self.store.read()?;
        let entry = pool.expect(id, "boot", &[InstanceState::Loaded], "loaded")?;
        if entry.resources.cpus.is_empty() {
            return Err(PlatformError::NoResources(format!(
                "instance {id} owns no cpu"
            )));
        }
        let dir = self.dir(id);
        let (log, log2) = super::agents::private_log(&dir.join("supervisor.log"))
            .map_err(|e| PlatformError::io("creating supervisor.log", e))?;
        let mut cmd = Command::new(&agentd);
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--instance")
            .arg(id.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own session: the instance outlives the CLI that booted it.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| PlatformError::io(format!("starting {}", agentd.display()), e))?;
        let pid = i32::try_from(child.id()).unwrap_or(-1);
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let sock = dir.join("ctl.sock");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(PlatformError::Instance {
                    id,
                    what: format!(
                        "supervisor exited during boot ({status}); see {}",
                        dir.join("supervisor.log").display()
                    ),
                });
            }
            if sock.exists() && ctl::call(id, &sock, &Request::Ping).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(PlatformError::Instance {
                    id,
                    what: format!("did not come up within {BOOT_TIMEOUT:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // Reap it in the background when it halts, so no zombie outlives the halt.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        self.store.update(|pool| {
            let e = pool.get_mut(id)?;
            e.state = InstanceState::Active;
            e.supervisor_pid = Some(pid);
            Ok(())
        })
    }

    fn set_upgrade(&mut self, upgrade_id: UpgradeId) {
        self.links.set_upgrade(upgrade_id);
    }

    fn ping(&mut self, id: InstanceId) -> Result<(), PlatformError> {
        self.with_link(|l, c| l.heartbeat(id, c))
    }

    fn prepare(&mut self, to: InstanceId, spec: &WorkloadSpec) -> Result<(), PlatformError> {
        self.keep_off(to);
        self.with_link(|l, c| l.prepare(to, spec, c))
    }

    fn stage(
        &mut self,
        to: InstanceId,
        workload: &str,
        out: &Outgoing,
    ) -> Result<bool, PlatformError> {
        self.with_link(|l, c| l.stage(to, workload, out, c))
    }

    fn deliver(
        &mut self,
        to: InstanceId,
        workload: &str,
        out: Outgoing,
        deadline: std::time::Instant,
    ) -> Result<Delivered, PlatformError> {
        self.with_link(|l, c| l.offer(to, workload, out, deadline, c))
    }

    fn commit(&mut self, to: InstanceId, workload: &str) -> Result<(), PlatformError> {
        self.with_link(|l, c| l.commit(to, workload, c))
    }

    fn abort(&mut self, to: InstanceId, workload: &str, reason: &str) {
        self.links.abort(to, workload, reason);
        // The move is over: the thread may run anywhere again (the next prepare narrows
        // it for its own target).
        self.restore_cpus();
    }

    fn disconnect(&mut self, release: Option<&Resources>) {
        self.links.disconnect(release);
        self.restore_cpus();
    }

    fn resize(&mut self, id: InstanceId, resources: &Resources) -> Result<(), PlatformError> {
        if resources.cpus.is_empty() {
            return Err(PlatformError::NoResources(
                "an active instance keeps at least one cpu".into(),
            ));
        }
        self.store.update(|pool| {
            let spare = pool.spare_cpus();
            let e = pool.expect(id, "resize", &[InstanceState::Active], "active")?;
            if let Some(c) = resources
                .cpus
                .iter()
                .find(|c| !spare.contains(c) && !e.resources.cpus.contains(c))
            {
                return Err(PlatformError::NoResources(format!(
                    "cpu {c} belongs to another instance"
                )));
            }
            Ok(())
        })?;
        self.agent(id)?.set_cpus(&resources.cpus)?;
        self.store.update(|pool| {
            pool.get_mut(id)?.resources = resources.clone();
            Ok(())
        })
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
        let pid = self
            .store
            .read()?
            .expect(id, "halt", &[InstanceState::Active], "active")?
            .supervisor_pid;
        // A supervisor that already died only needs its table entry fixed, and whatever
        // its workloads left running killed (an instance that crashes takes its processes
        // with it: no orphan may keep a port, a frozen group or a second copy alive).
        let crashed = !pid.is_some_and(pid_alive);
        if crashed {
            kill_instance_groups(&self.state_dir, id);
        }
        if pid.is_some_and(pid_alive) {
            let halted = self.agent(id)?.expect_done(&Request::Halt);
            self.forget_connection(id);
            halted?;
            let deadline = Instant::now() + HALT_TIMEOUT;
            while pid.is_some_and(pid_alive) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if let Some(p) = pid.filter(|p| pid_alive(*p)) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
                kill_instance_groups(&self.state_dir, id);
            }
        }
        self.store.update(|pool| {
            let e = pool.get_mut(id)?;
            e.state = InstanceState::Loaded;
            e.supervisor_pid = None;
            Ok(())
        })?;
        // The supervisor removes its groups as it halts; one that crashed or was killed
        // above could not: remove what is left of them (only empty groups), and the
        // machine's group when no other instance has one.
        remove_instance_groups(&self.state_dir, id);
        Ok(())
    }

    fn transfer_resources(
        &mut self,
        from: InstanceId,
        to: InstanceId,
    ) -> Result<Resources, PlatformError> {
        let (moved, target) = self.store.update(|pool| {
            pool.expect(
                from,
                "give resources away",
                &[InstanceState::Ready, InstanceState::Loaded],
                "halted (ready or loaded)",
            )?;
            pool.expect(to, "receive resources", &[InstanceState::Active], "active")?;
            let moved = std::mem::take(&mut pool.get_mut(from)?.resources);
            let t = pool.get_mut(to)?;
            t.resources.cpus.extend(moved.cpus.iter().copied());
            t.resources.cpus.sort_unstable();
            t.resources.cpus.dedup();
            t.resources.memory_bytes += moved.memory_bytes;
            Ok((moved, t.resources.clone()))
        })?;
        self.agent(to)?.set_cpus(&target.cpus)?;
        Ok(moved)
    }

    fn destroy(&mut self, id: InstanceId) -> Result<(), PlatformError> {
        let last = self.store.update(|pool| {
            pool.expect(
                id,
                "destroy",
                &[
                    InstanceState::Empty,
                    InstanceState::Ready,
                    InstanceState::Loaded,
                ],
                "not active (halt it first)",
            )?;
            pool.instances.retain(|e| e.id != id);
            Ok(pool.instances.is_empty())
        })?;
        self.forget_connection(id);
        let _ = fs::remove_dir_all(self.dir(id));
        // Its groups (a supervisor that never came up, or died, left them), then, once no
        // instance is left, whatever remains empty of the machine's groups.
        remove_instance_groups(&self.state_dir, id);
        if last {
            remove_machine_groups(&self.state_dir);
        }
        Ok(())
    }
}

/// How long halt and destroy wait for processes still leaving a group they remove (the
/// supervisor has already waited for its own workloads' processes).
const GROUP_REMOVE_PATIENCE: Duration = Duration::from_millis(500);

/// The cgroup of the emulated machine whose state is in `state_dir`, relative to the
/// cgroup2 mount: `mk-upgrade-emulated/<state_tag>`. Its instance `id` uses
/// `<that>/instance-<id>` (created by [`instance::run`]), each workload a group below that.
fn machine_cgroup_tag(state_dir: &Path) -> String {
    format!("mk-upgrade-emulated/{}", state_tag(state_dir))
}

/// Removes instance `id`'s groups that are empty, leaf first, then its machine's group and
/// `mk-upgrade-emulated` while they are empty. A group still holding a process stays.
fn kill_instance_groups(state_dir: &Path, id: InstanceId) {
    let tag = format!("{}/instance-{id}", machine_cgroup_tag(state_dir));
    if let Some(f) = crate::sys::cgroup::Freezer::of_tag(&tag)
        && let Err(e) = f.kill_base()
    {
        tracing::warn!(instance = id, error = %e, "killing what a crashed instance left");
    }
}

fn remove_instance_groups(state_dir: &Path, id: InstanceId) {
    let tag = format!("{}/instance-{id}", machine_cgroup_tag(state_dir));
    if let Some(f) = crate::sys::cgroup::Freezer::of_tag(&tag)
        && !f.remove_base_within(GROUP_REMOVE_PATIENCE)
    {
        tracing::warn!(
            instance = id,
            tag,
            "a cgroup of the instance still holds processes; left in place"
        );
    }
}

/// Removes every empty group of the machine (stale groups of instances that are gone),
/// leaf first, then the machine's group and `mk-upgrade-emulated` while empty: for when no
/// instance is left.
fn remove_machine_groups(state_dir: &Path) {
    let tag = machine_cgroup_tag(state_dir);
    if let Some(f) = crate::sys::cgroup::Freezer::of_tag(&tag)
        && !f.remove_base_within(GROUP_REMOVE_PATIENCE)
    {
        tracing::warn!(
            tag,
            "a cgroup of the machine still holds processes; left in place"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::cpus_outside;
    use nix::sched::CpuSet;

    fn set(cpus: &[usize]) -> CpuSet {
        let mut s = CpuSet::new();
        for c in cpus {
            s.set(*c).unwrap();
        }
        s
    }

    fn list(s: &CpuSet) -> Vec<usize> {
        (0..CpuSet::count())
            .filter(|c| s.is_set(*c).unwrap())
            .collect()
    }

    #[test]
    fn the_orchestrator_leaves_the_receiving_cpus_when_any_remain() {
        assert_eq!(
            cpus_outside(&set(&[0, 1, 2, 3]), &[1, 3]).map(|s| list(&s)),
            Some(vec![0, 2])
        );
        // A cpu it was not allowed anyway changes nothing; a cpu number out of range is
        // ignored.
        assert_eq!(
            cpus_outside(&set(&[0, 1]), &[5, u32::MAX]).map(|s| list(&s)),
            Some(vec![0, 1])
        );
        // Nothing left: the mask stays as it is.
        assert_eq!(cpus_outside(&set(&[1]), &[1]).map(|s| list(&s)), None);
    }
}
