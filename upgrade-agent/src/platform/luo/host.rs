//! [`LuoPlatform`]: the LUO kernel seen through the [`Platform`] trait, inside the host agent
//! that owns `/dev/liveupdate` and runs the workloads.
//!
//! Instances are logical: the running kernel is one instance (id 0 on the first boot), the
//! kernel an upgrade boots is the other (id 1, then they alternate). Staging a workload
//! ([`Platform::deliver`]) preserves its signed hand-over image and memfds in a
//! `mk-w-<name>` session; [`Platform::load`] runs `kexec_file_load`; [`Platform::boot`]
//! preserves the agent session (the journal record, both kernels, their initramfs images)
//! and kexecs. In the next kernel [`LuoPlatform::open`] retrieves the agent session (and
//! keeps the signed handoff on disk for an agent restarted in the same boot), and
//! [`Platform::claim`] retrieves one workload's session, verifies, restores and
//! health-checks it;
//! [`Platform::return_to_previous`] re-preserves every workload's memfds with fresh
//! digests and kexecs the previous kernel with its own initramfs and command line.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use kho_proto::channel::UpgradeId;
use kho_proto::keys::TrustedKeys;

use super::handoff::{
    Direction, HANDOFF_FORMAT, Handoff, HandoffWorkload, MAX_HANDOFF, MemfdDigest,
};
use super::{
    AGENT_SESSION, SAMPLE_COUNT, SAMPLE_PAGE, TOKEN_HANDOFF, TOKEN_IMAGE, TOKEN_INITRD,
    TOKEN_SOURCE_INITRD, TOKEN_SOURCE_KERNEL, TOKEN_TARGET_KERNEL, boottime_us, micros,
    realtime_ns, running_release, with_liveupdate, workload_session,
};
use crate::handover::{self, Outgoing};
use crate::host::ctl::{Request, Response};
use crate::host::supervisor::{self, Shared, lock};
use crate::platform::{
    Capabilities, Claimed, Delivered, InstanceId, InstanceInfo, InstanceState, LoadableKernel,
    Platform, PlatformError, PlatformKind, PreservedFd, Resources, WorkloadInfo,
};
use crate::record::{Phase, UpgradeRecord};
use crate::statedir::StateDir;
use crate::sys::kexec::{self, KexecFlags};
use crate::sys::luo::{LiveUpdate, LuoError, Session};
use crate::workload::WorkloadSpec;

/// A kernel the agent holds: its image, initramfs and command line, all as memfds and
/// text ready to be preserved or loaded.
#[derive(Debug)]
pub struct KernelRef {
    pub image: OwnedFd,
    pub release: String,
    pub initrd: Option<OwnedFd>,
    pub cmdline: String,
}

impl KernelRef {
    fn try_clone(&self) -> std::io::Result<KernelRef> {
        Ok(KernelRef {
            image: self.image.try_clone()?,
            release: self.release.clone(),
            initrd: self.initrd.as_ref().map(OwnedFd::try_clone).transpose()?,
            cmdline: self.cmdline.clone(),
        })
    }
}

/// One workload staged for the next kernel: its session stays open (and preserved) until
/// the kexec.
#[derive(Debug)]
struct Staged {
    _session: Session,
    _image: OwnedFd,
    _memfds: Vec<PreservedFd>,
    handoff: HandoffWorkload,
}

/// The memfds of a workload preserved before its freeze (`preserve_before_freeze`): its
/// session, and what each memfd was then (name, device, inode, size, seals). The move
/// uses the session only if the memfds taken at the freeze are these very objects in this
/// state; otherwise the session is closed (which drops the preservation) and the memfds
/// are preserved inside the blackout as usual.
#[derive(Debug)]
struct Early {
    session: Session,
    idents: Vec<(String, handover::FdIdentity)>,
    preserve_ms: f64,
}

/// What `fds` are now (name, device, inode, size, seals), in order; `None` if one is not a
/// memfd any more.
fn memfd_idents(fds: &[PreservedFd]) -> Option<Vec<(String, handover::FdIdentity)>> {
    (1u64..)
        .zip(fds)
        .map(|(t, p)| Some((p.name.clone(), handover::identity_of(t, p.fd.as_fd()).ok()?)))
        .collect()
}

/// One workload that arrived with a kexec.
#[derive(Debug)]
struct Arrived {
    handoff: HandoffWorkload,
    /// Forward: the signed hand-over image.
    image: Option<OwnedFd>,
    memfds: Vec<OwnedFd>,
}

/// What a kexec carried into this kernel.
#[derive(Debug)]
struct Carried {
    direction: Direction,
    record: Option<UpgradeRecord>,
    /// The workloads not claimed yet. Their sessions are retrieved only when they are
    /// claimed (or taken back), so that until then LUO, not this process, holds their
    /// memfds: an agent that dies meanwhile loses nothing.
    arrived: BTreeMap<String, HandoffWorkload>,
    /// Copies of every retrieved workload's memfds, for the way back.
    kept: BTreeMap<String, Vec<OwnedFd>>,
    /// Handoff entries of the workloads claimed so far.
    claimed: BTreeMap<String, HandoffWorkload>,
    /// Retrieving the agent session (the handoff record and the kernels).
    retrieve_ms: f64,
}

/// The handoff a kexec carried, kept on disk for an agent restarted in the same boot
/// (`STATE_DIR/luo/carried.json`, 0600): the agent session is gone once retrieved (LUO
/// finishes a retrieved session when its fd closes), the workload sessions are not.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CarriedFile {
    boot_id: String,
    /// The signed handoff record as retrieved (hex).
    handoff: String,
}

/// The next kernel of an upgrade in progress.
#[derive(Debug)]
struct Next {
    id: InstanceId,
    kernel: Option<KernelRef>,
    state: InstanceState,
}

fn luo(e: &LuoError) -> PlatformError {
    PlatformError::Instance {
        id: 0,
        what: e.to_string(),
    }
}

fn err(what: impl Into<String>) -> PlatformError {
    PlatformError::Instance {
        id: 0,
        what: what.into(),
    }
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn proc_cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn read_memfd(fd: BorrowedFd<'_>, limit: u64, what: &str) -> Result<Vec<u8>, PlatformError> {
    use std::os::unix::fs::FileExt;
    let len = crate::sys::memfd::size(fd).map_err(|e| err(format!("{what}: fstat: {e}")))?;
    if len > limit {
        return Err(err(format!("{what} is {len} bytes, more than {limit}")));
    }
    let f = std::fs::File::from(
        fd.try_clone_to_owned()
            .map_err(|e| err(format!("{what}: {e}")))?,
    );
    let mut buf = vec![0u8; usize::try_from(len).map_err(|e| err(e.to_string()))?];
    f.read_exact_at(&mut buf, 0)
        .map_err(|e| err(format!("{what}: read: {e}")))?;
    Ok(buf)
}

/// Binds the listeners a spec declares (LUO cannot preserve sockets).
fn bind_listeners(spec: &WorkloadSpec) -> Result<Vec<PreservedFd>, PlatformError> {
    spec.listeners
        .iter()
        .map(|l| {
            std::net::TcpListener::bind(l.addr)
                .map(|s| PreservedFd {
                    name: l.name.clone(),
                    fd: OwnedFd::from(s),
                })
                .map_err(|e| {
                    PlatformError::io(
                        format!("{}: binding {} for {}", spec.name, l.addr, l.name),
                        e,
                    )
                })
        })
        .collect()
}

/// The LUO platform inside the host agent.
#[derive(Debug)]
pub struct LuoPlatform {
    state: StateDir,
    dev: Option<LiveUpdate>,
    shared: Shared,
    self_id: InstanceId,
    running: Option<KernelRef>,
    previous: Option<KernelRef>,
    next: Option<Next>,
    upgrade_id: Option<UpgradeId>,
    staged: BTreeMap<String, Staged>,
    /// Workloads whose memfds were preserved before their freeze.
    early: BTreeMap<String, Early>,
    /// Per workload: CLOCK_REALTIME (ns) and CLOCK_MONOTONIC at its freeze.
    frozen_at: BTreeMap<String, (u64, Instant)>,
    carried: Option<Carried>,
}

impl LuoPlatform {
    /// The platform of this boot: `dev` is `/dev/liveupdate` (none: upgrades are refused),
    /// `shared` the agent's workloads, `running` the running kernel as far as the agent
    /// knows it. If a kexec carried an `mk-agent` session, everything in it is retrieved and
    /// the session finished (the fds stay valid memfds of this kernel); the previous kernel
    /// is then known too. The workloads' sessions are retrieved as they are claimed. Without
    /// an agent session, the handoff this agent kept on disk in this boot before it was
    /// restarted carries the upgrade on.
    pub fn open(
        state: StateDir,
        dev: Option<LiveUpdate>,
        shared: Shared,
        running: Option<KernelRef>,
    ) -> Result<Self, PlatformError> {
        // `integrity = "auto"` of the workloads this agent's orchestrator moves.
        crate::workload::Integrity::set_platform_default(super::DEFAULT_INTEGRITY);
        let mut p = LuoPlatform {
            state,
            dev,
            shared,
            self_id: 0,
            running,
            previous: None,
            next: None,
            upgrade_id: None,
            staged: BTreeMap::new(),
            early: BTreeMap::new(),
            frozen_at: BTreeMap::new(),
            carried: None,
        };
        let session = match p.dev.as_ref().map(|d| d.retrieve_session(AGENT_SESSION)) {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(e)) if e.errno() == Some(nix::errno::Errno::ENOENT) => None,
            Some(Err(e)) => {
                return Err(err(format!("retrieving session {AGENT_SESSION}: {e}")));
            }
        };
        if let Some(s) = session {
            p.retrieve_all(&s)?;
        } else if p.dev.is_some() && p.resume_from_disk()? {
            // This agent restarted after a kexec, before the upgrade ended: the handoff
            // kept on disk, and the workload sessions not claimed yet, carry it on.
        } else {
            // A normal boot: the kernels kept on disk (after an upgrade this agent
            // committed) make a rollback possible, and stand in for --kernel-image.
            let store = super::store::KernelStore::new(p.state.root());
            match store.load(super::store::Role::Previous) {
                Ok(k) => p.previous = k,
                Err(e) => tracing::warn!(error = %e, "the kept previous kernel is not usable"),
            }
            if p.running.is_none() {
                match store.load(super::store::Role::Current) {
                    Ok(Some(k)) if k.release == running_release() => p.running = Some(k),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "the kept running kernel is not usable"),
                }
            }
        }
        Ok(p)
    }

    /// Whether this boot is the second half of a kexec.
    pub fn resumed(&self) -> bool {
        self.carried.is_some()
    }

    /// Whether `/dev/liveupdate` is open.
    pub fn has_liveupdate(&self) -> bool {
        self.dev.is_some()
    }

    /// The previous kernel (target of `mk-upgrade rollback`), if the agent holds it.
    pub fn previous(&self) -> Option<&KernelRef> {
        self.previous.as_ref()
    }

    fn retrieve_all(&mut self, agent_session: &Session) -> Result<(), PlatformError> {
        let t0 = Instant::now();
        let hfd = agent_session
            .retrieve_fd(TOKEN_HANDOFF)
            .map_err(|e| luo(&e))?;
        // Nothing the record says is acted on before its signature checks out.
        let trusted = self
            .state
            .trusted_node_keys()
            .map_err(|e| err(format!("the handoff record cannot be checked: {e}")))?;
        let hbytes = read_memfd(hfd.as_fd(), MAX_HANDOFF, "handoff record")?;
        let handoff = super::handoff::open(&hbytes, &trusted).map_err(|e| err(e.to_string()))?;
        let source = agent_session
            .retrieve_fd(TOKEN_SOURCE_KERNEL)
            .map_err(|e| luo(&e))?;
        let target = agent_session
            .retrieve_fd(TOKEN_TARGET_KERNEL)
            .map_err(|e| luo(&e))?;
        let target_initrd = handoff
            .target_initrd
            .then(|| agent_session.retrieve_fd(TOKEN_INITRD))
            .transpose()
            .map_err(|e| luo(&e))?;
        let source_initrd = handoff
            .source_initrd
            .then(|| agent_session.retrieve_fd(TOKEN_SOURCE_INITRD))
            .transpose()
            .map_err(|e| luo(&e))?;
        // The workload sessions stay in LUO until each is claimed (see `Carried::arrived`).
        if let Err(e) = agent_session.finish() {
            tracing::warn!(session = agent_session.name(), error = %e, "FINISH");
        }
        self.keep_on_disk(&hbytes);
        // The kernel we came from, and the one we run.
        self.previous = Some(KernelRef {
            image: source,
            release: handoff.source_release.clone(),
            initrd: source_initrd,
            cmdline: handoff.source_cmdline.clone(),
        });
        self.running = Some(KernelRef {
            image: target,
            release: running_release(),
            initrd: target_initrd,
            cmdline: handoff.target_cmdline.clone(),
        });
        let release = running_release();
        if handoff.direction == Direction::Forward && release != handoff.target_release {
            tracing::warn!(expected = %handoff.target_release, running = %release, "running release differs from the target");
        }
        self.carry(handoff, t0.elapsed().as_secs_f64() * 1000.0);
        Ok(())
    }

    fn carried_path(&self) -> std::path::PathBuf {
        super::agent_dir(self.state.root()).join("carried.json")
    }

    /// Keeps the signed handoff on disk for an agent restarted in this boot (best effort:
    /// without it, such an agent cannot carry the upgrade on).
    fn keep_on_disk(&self, handoff: &[u8]) {
        let Some(boot_id) = crate::sys::boot_id() else {
            return;
        };
        let file = CarriedFile {
            boot_id,
            handoff: hex::encode(handoff),
        };
        let written = serde_json::to_vec(&file)
            .map_err(std::io::Error::other)
            .and_then(|b| crate::host::adopt::write_checked(&self.carried_path(), &b));
        if let Err(e) = written {
            tracing::warn!(error = %e, "keeping the handoff on disk for an agent restart");
        }
    }

    /// Drops the handoff kept on disk (the upgrade ended in this kernel, or it leaves).
    fn forget_on_disk(&self) {
        let _ = std::fs::remove_file(self.carried_path());
    }

    /// An agent restarted after a kexec, before the upgrade ended: takes the handoff kept
    /// on disk if it was kept in this boot and the journal still holds that upgrade,
    /// unfinished and not turning back. The kernels it named are gone with the agent
    /// session: after such a restart there is no way back to the previous kernel. Whether
    /// it did.
    fn resume_from_disk(&mut self) -> Result<bool, PlatformError> {
        let path = self.carried_path();
        let file: Option<CarriedFile> = match crate::host::adopt::read_checked(
            &path,
            2 * MAX_HANDOFF + 4096,
        ) {
            Ok(None) => return Ok(false),
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).ok(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the kept handoff is not usable");
                None
            }
        };
        // Read as a command without the lock reads it: an agent of this boot may hold it.
        let journaled = self
            .state
            .journal_for_reading()
            .ok()
            .and_then(|j| j.current().ok().flatten());
        let Some(file) = file.filter(|f| Some(&f.boot_id) == crate::sys::boot_id().as_ref()) else {
            self.forget_on_disk();
            return Ok(false);
        };
        let trusted = self
            .state
            .trusted_node_keys()
            .map_err(|e| err(format!("the kept handoff record cannot be checked: {e}")))?;
        let handoff = hex::decode(&file.handoff)
            .map_err(|e| e.to_string())
            .and_then(|b| super::handoff::open(&b, &trusted).map_err(|e| e.to_string()))
            .map_err(|e| {
                err(format!(
                    "the handoff record kept in {}: {e}",
                    path.display()
                ))
            })?;
        let live = journaled.as_ref().is_some_and(|j| {
            j.upgrade_id == handoff.record.upgrade_id
                && !(handoff.direction == Direction::Forward && j.phase == Phase::RollingBack)
        });
        if !live {
            self.forget_on_disk();
            return Ok(false);
        }
        say(&format!(
            "MK-LUO-RESUMED-FROM-DISK upgrade={} direction={:?}: the agent restarted after \
             the kexec; the workloads not claimed yet are still in LUO",
            handoff.record.upgrade_id, handoff.direction
        ));
        self.carry(handoff, 0.0);
        Ok(true)
    }

    /// This kernel is the one `handoff` went to: its instance id, and what it carried (the
    /// workloads' sessions still to be claimed).
    fn carry(&mut self, handoff: Handoff, retrieve_ms: f64) {
        self.self_id = match handoff.direction {
            Direction::Forward => handoff.record.new_instance.unwrap_or(1),
            Direction::Return => handoff.record.old_instance,
        };
        self.carried = Some(Carried {
            direction: handoff.direction,
            record: Some(handoff.record),
            arrived: handoff
                .workloads
                .into_iter()
                .map(|w| (w.name.clone(), w))
                .collect(),
            kept: BTreeMap::new(),
            claimed: BTreeMap::new(),
            retrieve_ms,
        });
    }

    /// Retrieves one carried workload's session: its image (forward) and memfds, kept
    /// copies of the memfds for the way back, then FINISH. `None` when the session is not
    /// there (`ENOENT`: a previous run of this agent retrieved it).
    fn retrieve_workload(
        &mut self,
        hw: &HandoffWorkload,
    ) -> Result<Option<Arrived>, PlatformError> {
        let forward = self
            .carried
            .as_ref()
            .is_some_and(|c| c.direction == Direction::Forward);
        let dev = self.dev()?;
        let s = match dev.retrieve_session(&hw.session) {
            Ok(s) => s,
            Err(e) if e.errno() == Some(nix::errno::Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(luo(&e)),
        };
        let image = if forward {
            Some(s.retrieve_fd(TOKEN_IMAGE).map_err(|e| luo(&e))?)
        } else {
            None
        };
        let memfds = (1..=hw.memfds.len() as u64)
            .map(|t| s.retrieve_fd(t).map_err(|e| luo(&e)))
            .collect::<Result<Vec<_>, _>>()?;
        let copies = memfds
            .iter()
            .map(OwnedFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| PlatformError::io("duplicating retrieved memfds", e))?;
        // Everything is retrieved: FINISH (the fds stay valid memfds of this kernel).
        if let Err(e) = s.finish() {
            tracing::warn!(session = s.name(), error = %e, "FINISH");
        }
        if let Some(c) = self.carried.as_mut() {
            c.kept.insert(hw.name.clone(), copies);
        }
        Ok(Some(Arrived {
            handoff: hw.clone(),
            image,
            memfds,
        }))
    }

    /// A workload whose session a previous run of this agent retrieved: it claimed it and
    /// then stopped, so the copy it started is the one to keep, if this agent adopted it
    /// and it is healthy. Its timings went with that run.
    fn claimed_before_restart(&mut self, workload: &str) -> Result<Claimed, PlatformError> {
        let here = self.self_id;
        let spec = lock(&self.shared)
            .workloads
            .get(workload)
            .map(|w| w.spec.clone())
            .ok_or_else(|| PlatformError::Refused {
                workload: workload.to_owned(),
                instance: here,
                check: "verification".into(),
                detail: "its session was retrieved by a previous run of the agent, and no \
                         copy of it runs here to adopt: its state is lost"
                    .into(),
            })?;
        let (healthy, detail) = supervisor::check_health(&self.shared, workload, &spec);
        if !healthy {
            return Err(PlatformError::Unhealthy {
                workload: workload.to_owned(),
                instance: here,
                detail,
            });
        }
        say(&format!(
            "MK-LUO-ADOPTED-CLAIM workload={workload}: claimed before the agent restarted; its \
             adopted copy is healthy"
        ));
        Ok(Claimed {
            adopted: true,
            ..Claimed::default()
        })
    }

    fn dev(&self) -> Result<&LiveUpdate, PlatformError> {
        self.dev.as_ref().ok_or_else(|| {
            err(
                "this boot has no /dev/liveupdate (CONFIG_LIVEUPDATE and `liveupdate=on` are \
                 needed): refusing the upgrade",
            )
        })
    }

    fn ctl(&self, req: Request) -> Result<(Response, Vec<OwnedFd>), PlatformError> {
        match supervisor::handle_ctl(&self.shared, req) {
            (Response::Error { message }, _) => Err(PlatformError::Instance {
                id: self.self_id,
                what: message,
            }),
            ok => Ok(ok),
        }
    }

    fn check_self(&self, id: InstanceId, op: &'static str) -> Result<(), PlatformError> {
        if id == self.self_id {
            Ok(())
        } else {
            Err(PlatformError::WrongState {
                id,
                op,
                state: InstanceState::Empty,
                needed: "the running kernel",
            })
        }
    }

    /// Preserves the memfds of `workload` in a new session of its name before its freeze.
    fn preserve_early(&self, workload: &str) -> Result<Early, PlatformError> {
        let fds = self.memfds_of(workload)?;
        let idents = memfd_idents(&fds)
            .ok_or_else(|| err(format!("{workload}: a descriptor is not a memfd")))?;
        let sname = workload_session(workload).map_err(|e| err(e.to_string()))?;
        let t = Instant::now();
        let session = self.dev()?.create_session(&sname).map_err(|e| luo(&e))?;
        for (tok, p) in (1u64..).zip(&fds) {
            session
                .preserve_fd(p.fd.as_fd(), tok)
                .map_err(|e| err(format!("{workload}: preserving memfd {}: {e}", p.name)))?;
        }
        let preserve_ms = t.elapsed().as_secs_f64() * 1000.0;
        // What a preservation fixed is checked against what was examined before it.
        if memfd_idents(&fds).as_ref() != Some(&idents) {
            return Err(err(format!(
                "{workload}: a memfd changed while it was preserved"
            )));
        }
        Ok(Early {
            session,
            idents,
            preserve_ms,
        })
    }

    /// The memfds of `workload` as its supervisor holds them, in their declared order.
    fn memfds_of(&self, workload: &str) -> Result<Vec<PreservedFd>, PlatformError> {
        let (resp, fds) = self.ctl(Request::Fds {
            name: workload.to_owned(),
        })?;
        let Response::Fds { names } = resp else {
            return Err(err(format!("unexpected control response {resp:?}")));
        };
        // Only memfds: LUO cannot preserve sockets (the next kernel binds the listeners).
        Ok(names
            .into_iter()
            .zip(fds)
            .filter(|(_, fd)| state_serializers::sys::get_seals(fd.as_fd()).is_ok())
            .map(|(name, fd)| PreservedFd { name, fd })
            .collect())
    }

    /// Preserves the agent session for a kexec from `source` into `target`.
    fn preserve_agent_session(
        &self,
        handoff: &Handoff,
        source: &KernelRef,
        target: &KernelRef,
    ) -> Result<(Session, OwnedFd), PlatformError> {
        let dev = self.dev()?;
        let key = self
            .state
            .node_key()
            .map_err(|e| err(format!("the node key signs the handoff record: {e}")))?;
        let bytes = super::handoff::seal(handoff, &key).map_err(|e| err(e.to_string()))?;
        let hfd = handover::sealed_memfd("mk-luo-handoff", &bytes)
            .map_err(|e| PlatformError::io("sealing the handoff record", e))?;
        let s = dev.create_session(AGENT_SESSION).map_err(|e| luo(&e))?;
        s.preserve_fd(hfd.as_fd(), TOKEN_HANDOFF)
            .and_then(|()| s.preserve_fd(source.image.as_fd(), TOKEN_SOURCE_KERNEL))
            .and_then(|()| s.preserve_fd(target.image.as_fd(), TOKEN_TARGET_KERNEL))
            .map_err(|e| err(format!("preserving the agent session: {e}")))?;
        if let Some(i) = &target.initrd {
            s.preserve_fd(i.as_fd(), TOKEN_INITRD)
                .map_err(|e| err(format!("preserving the initramfs: {e}")))?;
        }
        if let Some(i) = &source.initrd {
            s.preserve_fd(i.as_fd(), TOKEN_SOURCE_INITRD)
                .map_err(|e| err(format!("preserving the running kernel's initramfs: {e}")))?;
        }
        Ok((s, hfd))
    }

    /// Stops every workload of this kernel (their memfds stay open here and preserved:
    /// nothing may write a memfd after its digest was taken).
    fn stop_all(&self) {
        let mut inst = lock(&self.shared);
        let names: Vec<String> = inst.workloads.keys().cloned().collect();
        for n in names {
            let _ = supervisor::stop(&mut inst, &n);
        }
    }

    /// Starts `spec` again from its kept fds after a failed kexec.
    fn restart(&self, name: &str) {
        let mut inst = lock(&self.shared);
        let Some(mut w) = inst.workloads.remove(name) else {
            return;
        };
        if let Err(e) = supervisor::relaunch(&inst, &mut w) {
            tracing::error!(workload = %name, error = %e, "restart after a failed kexec");
        }
        inst.workloads.insert(name.to_owned(), w);
    }

    /// Kills every workload's process (keeping its fds), kexecs, and on failure restarts
    /// them. Returns only on failure.
    fn kexec_now(&self, line: String) -> PlatformError {
        let names: Vec<String> = {
            let mut inst = lock(&self.shared);
            let inst_ref = &mut *inst;
            let names: Vec<String> = inst_ref.workloads.keys().cloned().collect();
            for (name, w) in &mut inst_ref.workloads {
                // Marked as in a move, so supervision does not restart it meanwhile.
                w.frozen = true;
                if let Some(p) = w.process.as_mut() {
                    let _ = inst_ref.freezer.kill(name, w.pid);
                    p.kill_and_reap();
                }
                w.process = None;
            }
            names
        };
        say(&line);
        let e = match kexec::reboot_kexec() {
            Ok(never) => match never {},
            Err(e) => e,
        };
        let _ = kexec::kexec_unload();
        for n in &names {
            self.restart(n);
        }
        err(format!(
            "reboot(LINUX_REBOOT_CMD_KEXEC) returned: {e}; the workloads were restarted"
        ))
    }
}

impl Platform for LuoPlatform {
    fn probe(&mut self) -> Result<Capabilities, PlatformError> {
        let inst = lock(&self.shared);
        let mut notes = vec![
            "mainline LUO: the new kernel replaces this one by kexec; memfds survive it in \
             /dev/liveupdate sessions"
                .to_owned(),
        ];
        if self.dev.is_none() {
            notes.push("no /dev/liveupdate on this boot: upgrades are refused".into());
        }
        if self.running.is_none() {
            notes.push(
                "the agent does not hold the running kernel's image (mk-agentd serve \
                 --kernel-image): upgrades are refused"
                    .into(),
            );
        }
        Ok(Capabilities {
            kind: PlatformKind::Luo,
            emulated: false,
            side_by_side: false,
            fds_over_channel: false,
            cpus: inst.cpus.clone(),
            spare_cpus: Vec::new(),
            spare_memory_bytes: 0,
            freezer: inst.freezer.describe().to_owned(),
            notes,
        })
    }

    fn instances(&mut self) -> Result<Vec<InstanceInfo>, PlatformError> {
        let workloads = match self.ctl(Request::Ping)?.0 {
            Response::Pong { workloads, .. } => workloads,
            other => return Err(err(format!("unexpected control response {other:?}"))),
        };
        let mut out = vec![InstanceInfo {
            id: self.self_id,
            state: InstanceState::Active,
            resources: Resources::default(),
            kernel_release: Some(running_release()),
            workloads,
        }];
        if let Some(n) = &self.next {
            out.push(InstanceInfo {
                id: n.id,
                state: n.state,
                resources: Resources::default(),
                kernel_release: n.kernel.as_ref().map(|k| k.release.clone()),
                workloads: Vec::new(),
            });
        }
        Ok(out)
    }

    fn create_instance(&mut self, _resources: &Resources) -> Result<InstanceId, PlatformError> {
        self.dev()?;
        if self.running.is_none() {
            return Err(err(
                "the agent does not hold the image of the running kernel (start it with \
                 --kernel-image): without it a failed upgrade could not come back; refusing",
            ));
        }
        if self.next.is_some() {
            return Err(err("an upgrade is already staged in this agent"));
        }
        let id = InstanceId::from(self.self_id == 0);
        self.next = Some(Next {
            id,
            kernel: None,
            state: InstanceState::Ready,
        });
        Ok(id)
    }

    fn load(&mut self, id: InstanceId, kernel: &LoadableKernel<'_>) -> Result<(), PlatformError> {
        let image = kernel
            .image
            .try_clone_to_owned()
            .map_err(|e| PlatformError::io("keeping the kernel image", e))?;
        let initrd = kernel
            .initrd
            .map(|f| handover::copy_memfd("initrd", f))
            .transpose()
            .map_err(|e| PlatformError::io("copying the initramfs into a memfd", e))?;
        let cmdline = if kernel.cmdline.trim().is_empty() {
            self.running
                .as_ref()
                .map(|r| r.cmdline.clone())
                .unwrap_or_default()
        } else {
            kernel.cmdline.to_owned()
        };
        let cmdline = with_liveupdate(&cmdline);
        let next = self
            .next
            .as_mut()
            .filter(|n| n.id == id)
            .ok_or(PlatformError::NoSuchInstance(id))?;
        kexec::kexec_file_load(
            image.as_fd(),
            initrd.as_ref().map(AsFd::as_fd),
            &cmdline,
            KexecFlags::NONE,
        )
        .map_err(|e| err(format!("loading {}: {e}", kernel.release)))?;
        next.kernel = Some(KernelRef {
            image,
            release: kernel.release.clone(),
            initrd,
            cmdline,
        });
        next.state = InstanceState::Loaded;
        Ok(())
    }

    fn boot(
        &mut self,
        id: InstanceId,
        record: Option<&UpgradeRecord>,
    ) -> Result<(), PlatformError> {
        let record = record.ok_or(PlatformError::Unsupported(
            "booting without an upgrade record (a LUO kernel is booted by an upgrade)",
        ))?;
        let target = self
            .next
            .as_ref()
            .filter(|n| n.id == id)
            .and_then(|n| n.kernel.as_ref())
            .ok_or(PlatformError::WrongState {
                id,
                op: "boot",
                state: InstanceState::Ready,
                needed: "loaded",
            })?
            .try_clone()
            .map_err(|e| PlatformError::io("duplicating the kernel", e))?;
        let source = self
            .running
            .as_ref()
            .ok_or_else(|| err("the running kernel's image is not held"))?
            .try_clone()
            .map_err(|e| PlatformError::io("duplicating the kernel", e))?;
        let mut source = source;
        if source.initrd.is_none() {
            // Only when the agent was not told the running kernel's initramfs (mk-agentd
            // serve --initrd): assume both kernels boot the same one.
            source.initrd = target
                .initrd
                .as_ref()
                .map(OwnedFd::try_clone)
                .transpose()
                .map_err(|e| PlatformError::io("duplicating the initramfs", e))?;
        }
        let handoff = Handoff {
            format: HANDOFF_FORMAT.to_owned(),
            direction: Direction::Forward,
            record: record.clone(),
            source_release: source.release.clone(),
            source_cmdline: if source.cmdline.is_empty() {
                proc_cmdline()
            } else {
                source.cmdline.clone()
            },
            source_initrd: source.initrd.is_some(),
            target_release: target.release.clone(),
            target_cmdline: target.cmdline.clone(),
            target_initrd: target.initrd.is_some(),
            workloads: self
                .staged
                .values()
                .map(|s| HandoffWorkload {
                    frozen_before_kexec_us: self
                        .frozen_at
                        .get(&s.handoff.name)
                        .map_or(0, |f| micros(f.1.elapsed()).max(1)),
                    ..s.handoff.clone()
                })
                .collect(),
        };
        let mut trials = self.state.trials().map_err(|e| err(e.to_string()))?;
        trials
            .begin(&target.release, 1)
            .map_err(|e| err(e.to_string()))?;
        let kept = self.preserve_agent_session(&handoff, &source, &target);
        crate::fault::wait_at_kexec_gate();
        let e = match kept {
            Err(e) => e,
            Ok((session, hfd)) => {
                let e = self.kexec_now(format!(
                    "MK-LUO-KEXEC {} -> {} realtime_ns={} cmdline={:?}",
                    source.release,
                    target.release,
                    realtime_ns(),
                    target.cmdline
                ));
                drop((session, hfd));
                e
            }
        };
        let _ = trials.cancel();
        Err(e)
    }

    fn set_upgrade(&mut self, upgrade_id: UpgradeId) {
        self.upgrade_id = Some(upgrade_id);
    }

    fn ping(&mut self, id: InstanceId) -> Result<(), PlatformError> {
        self.check_self(id, "ping")
    }

    fn prepare(&mut self, to: InstanceId, spec: &WorkloadSpec) -> Result<(), PlatformError> {
        // A session left from an earlier attempt goes first (its preservation with it).
        self.early.remove(&spec.name);
        if !spec.preserve_before_freeze || self.next.as_ref().map(|n| n.id) != Some(to) {
            return Ok(());
        }
        // Best effort: on any failure the memfds are preserved after the freeze instead.
        match self.preserve_early(&spec.name) {
            Ok(e) => {
                say(&format!(
                    "MK-LUO-PRESERVED-EARLY workload={} memfds={} preserve_ms={:.1}",
                    spec.name,
                    e.idents.len(),
                    e.preserve_ms
                ));
                self.early.insert(spec.name.clone(), e);
            }
            Err(e) => tracing::warn!(
                workload = %spec.name,
                error = %e,
                "preserving the memfds before the freeze failed; they are preserved after it"
            ),
        }
        Ok(())
    }

    fn deliver(
        &mut self,
        to: InstanceId,
        workload: &str,
        out: Outgoing,
        deadline: std::time::Instant,
    ) -> Result<Delivered, PlatformError> {
        // Staging is local and quick; the deadline bounds the claim's checks in the next
        // kernel, which run under the workload's own health timeout.
        let _ = deadline;
        if self.next.as_ref().map(|n| n.id) != Some(to) {
            return Err(PlatformError::NoSuchInstance(to));
        }
        let spec = lock(&self.shared)
            .workloads
            .get(workload)
            .map(|w| w.spec.clone())
            .ok_or_else(|| PlatformError::NoSuchWorkload {
                instance: self.self_id,
                workload: workload.to_owned(),
            })?;
        let t_refs = Instant::now();
        let check = spec.integrity.effective();
        let digests = content_refs(check, &out)
            .map_err(|e| err(format!("{workload}: content references: {e}")))?;
        let refs_ms = t_refs.elapsed().as_secs_f64() * 1000.0;
        let sname = workload_session(workload).map_err(|e| err(e.to_string()))?;
        // Preserved before the freeze: used if the memfds are still those very objects (a
        // preserved memfd cannot change size, but it can be replaced or sealed further).
        let early = self.early.remove(workload).and_then(|e| {
            if memfd_idents(&out.fds).is_some_and(|now| now == e.idents) {
                Some(e)
            } else {
                say(&format!(
                    "MK-LUO-PRESERVED-EARLY workload={workload} dropped: the memfds at the \
                     freeze are not the ones preserved before it"
                ));
                None
            }
        });
        let early_ms = early.as_ref().map(|e| e.preserve_ms);
        let session = match early {
            Some(e) => e.session,
            None => self.dev()?.create_session(&sname).map_err(|e| luo(&e))?,
        };
        session
            .preserve_fd(out.image.as_fd(), TOKEN_IMAGE)
            .map_err(|e| err(format!("{workload}: preserving its handover image: {e}")))?;
        let t_preserve = Instant::now();
        if early_ms.is_none() {
            for (t, p) in (1u64..).zip(&out.fds) {
                session
                    .preserve_fd(p.fd.as_fd(), t)
                    .map_err(|e| err(format!("{workload}: preserving memfd {}: {e}", p.name)))?;
            }
        }
        let preserve_ms = t_preserve.elapsed().as_secs_f64() * 1000.0;
        let now = realtime_ns();
        let frozen_at_ns = self.frozen_at.get(workload).map_or(now, |f| f.0);
        let staged_us = now.saturating_sub(frozen_at_ns) / 1000;
        let staged_ms = staged_us as f64 / 1000.0;
        let bytes: u64 = digests.iter().map(|m| m.len).sum();
        say(&format!(
            "MK-LUO-STAGED workload={workload} bytes={bytes} integrity={} refs_ms={refs_ms:.1} \
             preserve_ms={preserve_ms:.1} staged_ms={staged_ms:.1} \
             preserved_before_freeze_ms={}",
            check.as_str(),
            early_ms.map_or_else(|| "-".to_owned(), |m| format!("{m:.1}"))
        ));
        self.staged.insert(
            workload.to_owned(),
            Staged {
                _session: session,
                _image: out.image,
                _memfds: out.fds,
                handoff: HandoffWorkload {
                    name: workload.to_owned(),
                    session: sname,
                    spec,
                    memfds: digests,
                    frozen_at_ns,
                    staged_us,
                    // Set when the handoff is sealed (`boot`).
                    frozen_before_kexec_us: 0,
                },
            },
        );
        Ok(Delivered::Staged)
    }

    fn commit(&mut self, _to: InstanceId, _workload: &str) -> Result<(), PlatformError> {
        // A staged workload is committed by being claimed in the next kernel.
        Ok(())
    }

    fn abort(&mut self, _to: InstanceId, workload: &str, _reason: &str) {
        // Closing the session drops the preservation (and the memfd may change size again).
        self.staged.remove(workload);
        self.early.remove(workload);
    }

    fn disconnect(&mut self, _release: Option<&Resources>) {}

    fn resize(&mut self, _: InstanceId, _: &Resources) -> Result<(), PlatformError> {
        Err(PlatformError::Unsupported(
            "resizing (a LUO kernel owns the whole machine)",
        ))
    }

    fn start_workload(
        &mut self,
        id: InstanceId,
        spec: &WorkloadSpec,
    ) -> Result<WorkloadInfo, PlatformError> {
        self.check_self(id, "start")?;
        match self
            .ctl(Request::Start {
                spec: Box::new(spec.clone()),
            })?
            .0
        {
            Response::Started(info) => Ok(info),
            other => Err(err(format!("unexpected control response {other:?}"))),
        }
    }

    fn freeze(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError> {
        self.check_self(id, "freeze")?;
        self.ctl(Request::Freeze {
            name: workload.to_owned(),
        })?;
        self.frozen_at
            .insert(workload.to_owned(), (realtime_ns(), Instant::now()));
        Ok(())
    }

    fn thaw(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError> {
        self.check_self(id, "thaw")?;
        self.ctl(Request::Thaw {
            name: workload.to_owned(),
        })?;
        Ok(())
    }

    fn health(&mut self, id: InstanceId, workload: &str) -> Result<(bool, String), PlatformError> {
        self.check_self(id, "health")?;
        match self
            .ctl(Request::Health {
                name: workload.to_owned(),
            })?
            .0
        {
            Response::Health { healthy, detail } => Ok((healthy, detail)),
            other => Err(err(format!("unexpected control response {other:?}"))),
        }
    }

    fn preserved_fds(
        &mut self,
        id: InstanceId,
        workload: &str,
    ) -> Result<Vec<PreservedFd>, PlatformError> {
        self.check_self(id, "fds")?;
        self.memfds_of(workload)
    }

    fn stop_workload(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError> {
        self.check_self(id, "stop")?;
        self.ctl(Request::Stop {
            name: workload.to_owned(),
        })?;
        Ok(())
    }

    fn halt(&mut self, id: InstanceId) -> Result<(), PlatformError> {
        Err(PlatformError::WrongState {
            id,
            op: "halt",
            state: InstanceState::Active,
            needed: "another kernel (a LUO kernel is not halted, it is replaced)",
        })
    }

    fn transfer_resources(
        &mut self,
        _: InstanceId,
        _: InstanceId,
    ) -> Result<Resources, PlatformError> {
        Err(PlatformError::Unsupported(
            "moving resources (a LUO kernel owns the whole machine)",
        ))
    }

    fn destroy(&mut self, id: InstanceId) -> Result<(), PlatformError> {
        if self.next.as_ref().map(|n| n.id) == Some(id) {
            if self
                .next
                .as_ref()
                .is_some_and(|n| n.state == InstanceState::Loaded)
            {
                let _ = kexec::kexec_unload();
            }
            self.next = None;
            self.staged.clear();
            self.early.clear();
            Ok(())
        } else if self.next.is_none() && id != self.self_id {
            // The next kernel of an upgrade a previous run of this agent began (it stopped
            // mid-upgrade, the recovery undoes it): whatever that run loaded for kexec goes.
            if std::fs::read_to_string("/sys/kernel/kexec_loaded").is_ok_and(|s| s.trim() == "1") {
                kexec::kexec_unload().map_err(|e| err(format!("unloading the kernel: {e}")))?;
            }
            Ok(())
        } else {
            Err(PlatformError::NoSuchInstance(id))
        }
    }

    fn claim(&mut self, workload: &str) -> Result<Claimed, PlatformError> {
        let here = self.self_id;
        let carried = self
            .carried
            .as_mut()
            .ok_or_else(|| err("nothing was carried over by a kexec"))?;
        let forward = carried.direction == Direction::Forward;
        let hw = carried
            .arrived
            .remove(workload)
            .ok_or_else(|| PlatformError::NoSuchWorkload {
                instance: here,
                workload: workload.to_owned(),
            })?;
        carried.claimed.insert(workload.to_owned(), hw.clone());
        let t_retrieve = Instant::now();
        let Some(a) = self.retrieve_workload(&hw)? else {
            return self.claimed_before_restart(workload);
        };
        let retrieve_ms = self.carried.as_ref().map_or(0.0, |c| c.retrieve_ms)
            + t_retrieve.elapsed().as_secs_f64() * 1000.0;
        let refused = |detail: String| PlatformError::Refused {
            workload: workload.to_owned(),
            instance: here,
            check: "verification".into(),
            detail,
        };
        let t0 = Instant::now();
        let (spec, mut fds) = if forward {
            let trusted: TrustedKeys = self
                .state
                .trusted_node_keys()
                .map_err(|e| refused(format!("verification failed: trusted node keys: {e}")))?;
            let image = a.image.ok_or_else(|| refused("no handover image".into()))?;
            let upgrade_id = self.upgrade_id.map(|u| u.0).unwrap_or_default();
            let names: Vec<String> = a.handoff.memfds.iter().map(|m| m.name.clone()).collect();
            let inc = handover::verify_preserved(
                workload, &image, &names, a.memfds, &trusted, upgrade_id,
            )
            .map_err(|e| refused(format!("verification failed: {e}")))?;
            // The image checked each memfd's size and seals (and with `digest` every byte);
            // the content reference the handoff carries is checked here.
            for (p, d) in inc.fds.iter().zip(&a.handoff.memfds) {
                if d.check != crate::workload::Integrity::Digest {
                    check_content(p.fd.as_fd(), d).map_err(|e| {
                        refused(format!("verification failed: memfd {}: {e}", d.name))
                    })?;
                }
            }
            (inc.spec, inc.fds)
        } else {
            let mut fds = Vec::new();
            for (fd, d) in a.memfds.into_iter().zip(&a.handoff.memfds) {
                check_content(fd.as_fd(), d)
                    .map_err(|e| refused(format!("verification failed: memfd {}: {e}", d.name)))?;
                fds.push(PreservedFd {
                    name: d.name.clone(),
                    fd,
                });
            }
            (a.handoff.spec.clone(), fds)
        };
        let verify_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let start_err = |what: String| PlatformError::Instance { id: here, what };
        fds.extend(bind_listeners(&spec)?);
        let extra: Vec<String> = if crate::fault::wants_health_fail(&spec.env) {
            vec![crate::fault::HEALTH_FAIL_ARG.to_owned()]
        } else {
            Vec::new()
        };
        // Pending until healthy: supervision does not restart a copy that is still on
        // trial (a copy that fails its check is the claim's failure, not a crash to retry).
        supervisor::admit(&self.shared, workload, &spec, fds, &extra, true)
            .map_err(|e| start_err(e.to_string()))?;
        let start_ms = t0.elapsed().as_secs_f64() * 1000.0 - verify_ms;
        let started_at_ns = realtime_ns();
        let started_boot_us = boottime_us();
        let t1 = Instant::now();
        let (healthy, detail) = supervisor::check_health(&self.shared, workload, &spec);
        let health_ms = t1.elapsed().as_secs_f64() * 1000.0;
        if !healthy {
            return Err(PlatformError::Unhealthy {
                workload: workload.to_owned(),
                instance: here,
                detail,
            });
        }
        if let Some(w) = lock(&self.shared).workloads.get_mut(workload) {
            w.pending_commit = false;
        }
        let frozen = a.handoff.frozen_at_ns;
        let realtime_us = realtime_ns().saturating_sub(frozen) / 1000;
        // Across a kexec no clock runs on in both kernels. The sender's monotonic time from
        // the freeze to the kexec call plus this kernel's boot clock is a lower bound (not in
        // it: the old kernel's shutdown, purgatory, this kernel's boot before its clock
        // starts); the difference of the two kernels' CLOCK_REALTIME is only as good as their
        // agreement (tens of seconds off in a loaded TCG guest), so it is the figure only
        // when an older sender did not carry the monotonic part.
        let carried_us = a.handoff.frozen_before_kexec_us;
        let lower_bound = carried_us > 0;
        let healthy_boot_us = boottime_us();
        let (blackout_us, handover_us) = if lower_bound {
            (
                carried_us.saturating_add(healthy_boot_us),
                carried_us.saturating_add(started_boot_us),
            )
        } else {
            (realtime_us, started_at_ns.saturating_sub(frozen) / 1000)
        };
        let bytes: u64 = a.handoff.memfds.iter().map(|m| m.len).sum();
        let checks: Vec<&str> = a.handoff.memfds.iter().map(|m| m.check.as_str()).collect();
        let staged_ms = a.handoff.staged_us as f64 / 1000.0;
        // The sending kernel's share: from the freeze to its kexec call (staging, sealing
        // the handoff, stopping the processes) when it carried that, else its staging.
        let sender_ms = if forward && carried_us > 0 {
            carried_us as f64 / 1000.0
        } else {
            staged_ms
        };
        let agent_ms = sender_ms + retrieve_ms + verify_ms + start_ms + health_ms;
        say(&format!(
            "MK-LUO-RESTORE workload={workload} bytes={bytes} integrity={} staged_ms={staged_ms:.1} \
             sender_ms={sender_ms:.1} retrieve_ms={retrieve_ms:.1} verify_ms={verify_ms:.1} start_ms={start_ms:.1} \
             health_ms={health_ms:.1} agent_ms={agent_ms:.1} blackout_ms={:.1} \
             blackout_lower_bound={lower_bound} frozen_before_kexec_ms={:.1} \
             boottime_ms={:.1} realtime_blackout_ms={:.1}",
            checks.join(","),
            blackout_us as f64 / 1000.0,
            carried_us as f64 / 1000.0,
            healthy_boot_us as f64 / 1000.0,
            realtime_us as f64 / 1000.0,
        ));
        Ok(Claimed {
            blackout_us,
            handover_us,
            blackout_lower_bound: lower_bound,
            bytes,
            verify_ms,
            start_ms,
            health_ms,
            adopted: false,
        })
    }

    fn return_to_previous(&mut self, record: &UpgradeRecord) -> Result<(), PlatformError> {
        let previous = self
            .previous
            .as_ref()
            .ok_or_else(|| err("the previous kernel was not handed over"))?
            .try_clone()
            .map_err(|e| PlatformError::io("duplicating the kernel", e))?;
        let running = self
            .running
            .as_ref()
            .ok_or_else(|| err("this kernel's image was not handed over"))?
            .try_clone()
            .map_err(|e| PlatformError::io("duplicating the kernel", e))?;
        // The workloads not claimed yet are still in LUO: retrieve them to take them back.
        let unclaimed: Vec<HandoffWorkload> = self
            .carried
            .as_ref()
            .map(|c| c.arrived.values().cloned().collect())
            .unwrap_or_default();
        for hw in &unclaimed {
            self.retrieve_workload(hw)?;
        }
        let carried = self
            .carried
            .as_ref()
            .ok_or_else(|| err("nothing was carried over by a kexec"))?;
        self.stop_all();
        let dev = self.dev()?;
        let mut sessions = Vec::new();
        let mut workloads = Vec::new();
        for w in &record.workloads {
            let fds = carried
                .kept
                .get(&w.name)
                .ok_or_else(|| err(format!("{}: its memfds were not kept", w.name)))?;
            let hw = carried
                .arrived
                .get(&w.name)
                .cloned()
                .or_else(|| carried.claimed.get(&w.name).cloned())
                .ok_or_else(|| err(format!("{}: nothing of it arrived with the kexec", w.name)))?;
            if fds.len() != hw.memfds.len() {
                return Err(err(format!("{}: its memfds were not kept", w.name)));
            }
            // Fresh references of the same kind (B's copy may have run).
            let digests = fds
                .iter()
                .zip(&hw.memfds)
                .map(|(fd, m)| {
                    memfd_ref(&m.name, m.check, fd.as_fd(), None).map_err(|e| {
                        err(format!("{}: content reference of {}: {e}", w.name, m.name))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let s = dev.create_session(&hw.session).map_err(|e| luo(&e))?;
            for (t, fd) in (1u64..).zip(fds) {
                s.preserve_fd(fd.as_fd(), t).map_err(|e| luo(&e))?;
            }
            sessions.push(s);
            // The outage goes on through this kernel's whole life: its boot clock now.
            let frozen_before_kexec_us = match hw.frozen_before_kexec_us {
                0 => 0,
                a => a.saturating_add(boottime_us()),
            };
            workloads.push(HandoffWorkload {
                memfds: digests,
                frozen_before_kexec_us,
                ..hw
            });
        }
        let mut rec = record.clone();
        rec.phase = Phase::RollingBack;
        let back = Handoff {
            format: HANDOFF_FORMAT.to_owned(),
            direction: Direction::Return,
            record: rec,
            source_release: running_release(),
            source_cmdline: running.cmdline.clone(),
            source_initrd: running.initrd.is_some(),
            target_release: previous.release.clone(),
            target_cmdline: previous.cmdline.clone(),
            target_initrd: previous.initrd.is_some(),
            workloads,
        };
        let (s, hfd) = self.preserve_agent_session(&back, &running, &previous)?;
        self.forget_on_disk();
        let cmdline = with_liveupdate(&previous.cmdline);
        kexec::kexec_file_load(
            previous.image.as_fd(),
            previous.initrd.as_ref().map(AsFd::as_fd),
            &cmdline,
            KexecFlags::NONE,
        )
        .map_err(|e| err(format!("loading {}: {e}", previous.release)))?;
        let e = self.kexec_now(format!(
            "MK-LUO-KEXEC-BACK {} -> {} reason={:?}",
            running_release(),
            previous.release,
            record.error.as_deref().unwrap_or_default()
        ));
        drop((s, hfd, sessions));
        Err(e)
    }

    fn handed_over(&mut self) -> Option<UpgradeRecord> {
        self.carried.as_mut().and_then(|c| c.record.take())
    }

    fn confirm(&mut self) -> Result<(), PlatformError> {
        self.forget_on_disk();
        let release = running_release();
        let mut t = self.state.trials().map_err(|e| err(e.to_string()))?;
        // On a host whose state directory did not survive the kexec (tmpfs), the attempt
        // the previous kernel recorded is not here: record it, then confirm.
        if !matches!(t.pending(), Ok(Some(p)) if p.release == release) {
            let _ = t.begin(&release, 1);
        }
        t.confirm(&release).map_err(|e| err(e.to_string()))?;
        // Keep both kernels on disk: a rollback must not depend on this agent staying up.
        let store = super::store::KernelStore::new(self.state.root());
        for (role, k) in [
            (super::store::Role::Current, self.running.as_ref()),
            (super::store::Role::Previous, self.previous.as_ref()),
        ] {
            if let Some(k) = k
                && let Err(e) = store.save(role, k)
            {
                tracing::warn!(error = %e, "keeping the {role:?} kernel on disk");
            }
        }
        Ok(())
    }
}

/// The content reference of one memfd for `check` (`digest`: `full`, the image's digest
/// when the caller has it, else computed here).
fn memfd_ref(
    name: &str,
    check: crate::workload::Integrity,
    fd: BorrowedFd<'_>,
    full: Option<&kho_proto::channel::FdDescriptor>,
) -> Result<MemfdDigest, String> {
    use crate::workload::Integrity;
    let seals = state_serializers::sys::get_seals(fd).map_err(|e| format!("F_GET_SEALS: {e}"))?;
    let len = crate::sys::memfd::size(fd).map_err(|e| format!("fstat: {e}"))?;
    let mut m = MemfdDigest {
        name: name.to_owned(),
        len,
        check,
        seals,
        crc32: 0,
        sha256: String::new(),
        sample: None,
    };
    match check {
        Integrity::Digest | Integrity::Auto => {
            m.check = Integrity::Digest;
            let (len, crc32, sha256) = if let Some(d) = full {
                (d.length, d.crc32, d.sha256)
            } else {
                let d = state_serializers::digest_fd(fd).map_err(|e| e.to_string())?;
                (d.len, d.crc32, d.sha256)
            };
            m.len = len;
            m.crc32 = crc32;
            m.sha256 = hex::encode(sha256);
        }
        Integrity::Crc32 => {
            let (l, crc) = state_serializers::crc32_parallel(fd).map_err(|e| e.to_string())?;
            m.len = l;
            m.crc32 = crc;
        }
        Integrity::Sampled => {
            // Positions drawn per move (not adversarial: a different set each time).
            let seed = realtime_ns() ^ u64::from(crc32fast::hash(name.as_bytes()));
            m.sample = Some(
                state_serializers::PageSample::take(fd, len, SAMPLE_PAGE, SAMPLE_COUNT, seed)
                    .map_err(|e| e.to_string())?,
            );
        }
        Integrity::Identity => {}
    }
    Ok(m)
}

/// The content references of a staged workload's memfds, in token order (A, frozen).
fn content_refs(
    check: crate::workload::Integrity,
    out: &Outgoing,
) -> Result<Vec<MemfdDigest>, String> {
    let descs: Vec<&kho_proto::channel::FdDescriptor> = out
        .offer
        .fds
        .iter()
        .skip(1)
        .filter(|d| d.kind == kho_proto::channel::FdKind::Memfd)
        .collect();
    let memfds: Vec<&PreservedFd> = out
        .fds
        .iter()
        .filter(|p| state_serializers::sys::get_seals(p.fd.as_fd()).is_ok())
        .collect();
    if descs.len() != memfds.len() {
        return Err(format!(
            "{} memfds described, {} held",
            descs.len(),
            memfds.len()
        ));
    }
    memfds
        .iter()
        .zip(descs)
        .map(|(p, d)| memfd_ref(&p.name, check, p.fd.as_fd(), Some(d)))
        .collect()
}

/// Checks a retrieved memfd against its reference: size and seals, then what `check` names.
fn check_content(fd: BorrowedFd<'_>, d: &MemfdDigest) -> Result<(), String> {
    use crate::workload::Integrity;
    let len = crate::sys::memfd::size(fd).map_err(|e| format!("fstat: {e}"))?;
    if len != d.len {
        return Err(format!("size {len}, the sending kernel had {}", d.len));
    }
    let seals = state_serializers::sys::get_seals(fd).map_err(|e| format!("F_GET_SEALS: {e}"))?;
    if d.check != Integrity::Digest && seals != d.seals {
        return Err(format!(
            "seals {seals:#x}, the sending kernel had {:#x}",
            d.seals
        ));
    }
    match d.check {
        Integrity::Digest | Integrity::Auto => {
            state_serializers::verify_fd(&d.name, fd, &d.region()).map_err(|e| e.to_string())
        }
        Integrity::Crc32 => {
            let (l, crc) = state_serializers::crc32_parallel(fd).map_err(|e| e.to_string())?;
            if (l, crc) == (d.len, d.crc32) {
                Ok(())
            } else {
                Err(format!(
                    "CRC32 {crc:08x} over {l} bytes, the sending kernel had {:08x} over {}",
                    d.crc32, d.len
                ))
            }
        }
        Integrity::Sampled => {
            let s = d.sample.as_ref().ok_or("no page sample")?;
            match s.check(fd, len).map_err(|e| e.to_string())? {
                Ok(()) => Ok(()),
                Err(found) => Err(format!(
                    "CRC32 of the {} sampled pages (seed {:#x}) is {found:08x}, the sending kernel had {:08x}",
                    s.count, s.seed, s.crc32
                )),
            }
        }
        Integrity::Identity => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Integrity;

    fn memfd(bytes: &[u8]) -> OwnedFd {
        let fd = crate::sys::memfd::create_sealable("t").unwrap();
        crate::sys::memfd::write_all(fd.as_fd(), bytes).unwrap();
        fd
    }

    /// More pages (1537) than a sample draws (1024): some pages are not sampled.
    fn data() -> Vec<u8> {
        (0..(6 << 20) + 123)
            .map(|i: usize| (i * 7 + i / 4096) as u8)
            .collect()
    }

    #[test]
    fn an_early_preservation_matches_only_the_same_memfds_in_the_same_state() {
        let pf = |name: &str, fd: &OwnedFd| PreservedFd {
            name: name.into(),
            fd: fd.try_clone().unwrap(),
        };
        let (a, b) = (memfd(b"one"), memfd(b"two"));
        let then = memfd_idents(&[pf("a", &a), pf("b", &b)]).unwrap();
        // Duplicates of the same objects (what the freeze hands back) match.
        assert_eq!(memfd_idents(&[pf("a", &a), pf("b", &b)]).unwrap(), then);
        // Another order, another name, another object with the same bytes, one fewer.
        assert_ne!(memfd_idents(&[pf("b", &b), pf("a", &a)]).unwrap(), then);
        assert_ne!(memfd_idents(&[pf("a", &a), pf("c", &b)]).unwrap(), then);
        assert_ne!(
            memfd_idents(&[pf("a", &a), pf("b", &memfd(b"two"))]).unwrap(),
            then
        );
        assert_ne!(memfd_idents(&[pf("a", &a)]).unwrap(), then);
        // A seal added since (LUO preserved the seals it saw), a size changed.
        nix::fcntl::fcntl(
            &b,
            nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_GROW),
        )
        .unwrap();
        assert_ne!(memfd_idents(&[pf("a", &a), pf("b", &b)]).unwrap(), then);
        let then = memfd_idents(&[pf("a", &a)]).unwrap();
        crate::sys::memfd::write_all(a.as_fd(), b"more").unwrap();
        assert_ne!(memfd_idents(&[pf("a", &a)]).unwrap(), then);
        // Not a memfd any more: nothing to match.
        let sock = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let sock = OwnedFd::from(sock);
        assert!(memfd_idents(&[pf("s", &sock)]).is_none());
    }

    #[test]
    fn every_check_passes_on_the_same_bytes_and_names_what_it_checks() {
        let fd = memfd(&data());
        for check in [
            Integrity::Digest,
            Integrity::Crc32,
            Integrity::Sampled,
            Integrity::Identity,
        ] {
            let m = memfd_ref("kv-data", check, fd.as_fd(), None).unwrap();
            assert_eq!(m.check, check);
            assert_eq!(m.len, data().len() as u64);
            m.validate().unwrap();
            check_content(fd.as_fd(), &m).unwrap();
        }
        // `auto` is resolved before it is written down: a reference never says "auto".
        let m = memfd_ref("kv-data", Integrity::Auto, fd.as_fd(), None).unwrap();
        assert_eq!(m.check, Integrity::Digest);
    }

    #[test]
    fn each_check_catches_what_it_covers() {
        let good = data();
        let fd = memfd(&good);
        let refs: Vec<MemfdDigest> = [
            Integrity::Digest,
            Integrity::Crc32,
            Integrity::Sampled,
            Integrity::Identity,
        ]
        .iter()
        .map(|c| memfd_ref("kv-data", *c, fd.as_fd(), None).unwrap())
        .collect();
        // Truncation: every check (size).
        let short = memfd(&good[..good.len() - 1]);
        for m in &refs {
            let e = check_content(short.as_fd(), m).unwrap_err();
            assert!(
                e.contains("size") || e.contains("digest") || e.contains("mismatch"),
                "{:?}: {e}",
                m.check
            );
        }
        // The last page changed (a lost tail folio): all but identity.
        let mut tail = good.clone();
        *tail.last_mut().unwrap() ^= 1;
        let tail = memfd(&tail);
        for m in &refs {
            let r = check_content(tail.as_fd(), m);
            assert_eq!(
                r.is_err(),
                m.check != Integrity::Identity,
                "{:?}: {r:?}",
                m.check
            );
        }
        // One byte in a page the sample did not draw: the full checks only.
        let sample = refs[2].sample.unwrap();
        let drawn = state_serializers::PageSample::pages(
            sample.page,
            sample.count,
            sample.seed,
            good.len() as u64,
        );
        let page = (0..(good.len() as u64 / 4096))
            .find(|p| !drawn.contains(p))
            .unwrap();
        let mut flip = good.clone();
        flip[page as usize * 4096 + 17] ^= 0x10;
        let flip = memfd(&flip);
        for m in &refs {
            let r = check_content(flip.as_fd(), m);
            let full = matches!(m.check, Integrity::Digest | Integrity::Crc32);
            assert_eq!(r.is_err(), full, "{:?}: {r:?}", m.check);
        }
        // A seal added since: every check but digest's (which checks every byte instead).
        let sealed = memfd(&good);
        nix::fcntl::fcntl(
            &sealed,
            nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_GROW),
        )
        .unwrap();
        for m in &refs[1..] {
            let e = check_content(sealed.as_fd(), m).unwrap_err();
            assert!(e.contains("seals"), "{:?}: {e}", m.check);
        }
    }
}
