//! The host agent of a LUO kernel: `mk-agentd serve --state-dir D [--workloads F]
//! [--kernel-image K]`.
//!
//! At start it opens `/dev/liveupdate` (exclusive; the fd is kept for the agent's life).
//! If the `mk-agent` session exists this boot is the second half of a kexec: it
//! [resumes](resume) (retrieve, verify, restore, health-check, then commit, or kexec back).
//! Otherwise it starts every workload of the workload file with fresh fds, and checks the
//! trial-boot record (a kernel that never confirmed is marked bad). Then it serves
//! `D/luo/ctl.sock` with the instance supervisor's protocol plus `LuoUpgrade`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kho_proto::keys::NodeKey;

use super::handoff::{
    Direction, HANDOFF_FORMAT, Handoff, HandoffWorkload, MAX_HANDOFF, MemfdDigest,
};
use super::{
    AGENT_SESSION, RESULT_PREFIX, TOKEN_HANDOFF, TOKEN_IMAGE, TOKEN_INITRD, TOKEN_SOURCE_KERNEL,
    TOKEN_TARGET_KERNEL, realtime_ns, running_release, with_liveupdate, workload_session,
};
use crate::handover::{self, SendFaults};
use crate::orchestrator::record::{Event, MoveStatus, Outcome, Phase, UpgradeRecord};
use crate::platform::PreservedFd;
use crate::platform::emulated::ctl::{LuoFaults, Request, Response};
use crate::platform::emulated::supervisor::{self, Instance, Running, Shared, lock};
use crate::sys::kexec::{self, KexecFlags};
use crate::sys::luo::{LiveUpdate, LuoError, Session};
use crate::workload::{WorkloadFile, WorkloadSpec};

/// Options of `mk-agentd serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub state_dir: PathBuf,
    /// Workloads started at a normal boot.
    pub workloads: Option<PathBuf>,
    /// The image of the kernel this agent runs on (needed to come back to it after a
    /// failed upgrade; after a kexec the previous kernel hands it over in the session).
    pub kernel_image: Option<PathBuf>,
}

/// A kernel image the agent holds, with its release.
#[derive(Debug)]
struct KernelRef {
    fd: OwnedFd,
    release: String,
}

/// What the agent keeps besides the workloads.
#[derive(Debug)]
pub struct HostAgent {
    state_dir: PathBuf,
    dev: Option<LiveUpdate>,
    /// The kernel running now.
    running: Option<KernelRef>,
    /// The kernel before it (after an upgrade): the target of `mk-upgrade rollback`.
    previous: Option<KernelRef>,
    /// Its command line.
    previous_cmdline: Option<String>,
    /// The initramfs the kernels boot with (when known).
    initrd: Option<OwnedFd>,
}

/// What the boot did, written to `D/luo/boot.json` before the control socket opens.
#[derive(Debug, serde::Serialize)]
struct BootReport {
    release: String,
    luo: bool,
    resumed: bool,
    result: Option<serde_json::Value>,
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn luo_err(e: &LuoError) -> String {
    e.to_string()
}

fn read_memfd(fd: BorrowedFd<'_>, limit: u64, what: &str) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let len = crate::sys::memfd::size(fd).map_err(|e| format!("{what}: fstat: {e}"))?;
    if len > limit {
        return Err(format!("{what} is {len} bytes, more than {limit}"));
    }
    let f = std::fs::File::from(
        fd.try_clone_to_owned()
            .map_err(|e| format!("{what}: {e}"))?,
    );
    let mut buf = vec![0u8; usize::try_from(len).map_err(|e| e.to_string())?];
    f.read_exact_at(&mut buf, 0)
        .map_err(|e| format!("{what}: read: {e}"))?;
    Ok(buf)
}

fn proc_cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn online_cpus() -> Vec<u32> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return vec![0];
    };
    (0..nix::sched::CpuSet::count())
        .filter(|c| set.is_set(*c).unwrap_or(false))
        .filter_map(|c| u32::try_from(c).ok())
        .collect()
}

fn node_key(state_dir: &Path) -> Result<NodeKey, String> {
    crate::cli::app::Global {
        state_dir: state_dir.to_owned(),
        platform: crate::cli::app::PlatformChoice::Luo,
        workloads: None,
        trusted_keys: None,
    }
    .node_key()
    .map_err(|e| e.message)
}

fn event(rec: &mut UpgradeRecord, what: impl Into<String>) {
    let t_ms = (realtime_ns() / 1_000_000).saturating_sub(rec.started_at.saturating_mul(1000));
    rec.events.push(Event {
        t_ms,
        what: what.into(),
    });
}

fn print_result(rec: &UpgradeRecord) -> serde_json::Value {
    let doc = crate::cli::upgrade::record_json(rec);
    say(&format!("{RESULT_PREFIX} {doc}"));
    doc
}

/// Binds the listeners a spec declares (LUO cannot preserve sockets).
fn bind_listeners(spec: &WorkloadSpec) -> Result<Vec<PreservedFd>, String> {
    spec.listeners
        .iter()
        .map(|l| {
            std::net::TcpListener::bind(l.addr)
                .map(|s| PreservedFd {
                    name: l.name.clone(),
                    fd: OwnedFd::from(s),
                })
                .map_err(|e| format!("{}: binding {} for {}: {e}", spec.name, l.addr, l.name))
        })
        .collect()
}

fn journal(state_dir: &Path) -> Result<rollback::Journal<UpgradeRecord>, String> {
    rollback::Journal::open(state_dir).map_err(|e| e.to_string())
}

fn trials(state_dir: &Path) -> Result<rollback::TrialBoots, String> {
    rollback::TrialBoots::open(state_dir).map_err(|e| e.to_string())
}

/// Runs the host agent. Returns only on a set-up error.
pub fn serve(opts: &ServeOptions) -> Result<(), String> {
    let dir = super::agent_dir(&opts.state_dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let release = running_release();
    let dev = match LiveUpdate::open() {
        Ok(d) => Some(d),
        Err(e @ LuoError::DeviceMissing { .. }) => {
            tracing::warn!(error = %e, "no /dev/liveupdate: upgrades are refused on this boot");
            None
        }
        Err(e) => return Err(e.to_string()),
    };
    let running = match &opts.kernel_image {
        Some(p) if p.exists() => {
            let f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
            let fd = handover::copy_memfd("running-kernel", f.as_fd())
                .map_err(|e| format!("copying {}: {e}", p.display()))?;
            Some(KernelRef {
                fd,
                release: release.clone(),
            })
        }
        _ => None,
    };
    let agent = Arc::new(Mutex::new(HostAgent {
        state_dir: opts.state_dir.clone(),
        dev,
        running,
        previous: None,
        previous_cmdline: None,
        initrd: None,
    }));
    let shared: Shared = Arc::new(Mutex::new(Instance {
        id: 0,
        kernel_release: release.clone(),
        cpus: online_cpus(),
        freezer: crate::sys::cgroup::Freezer::detect("mk-upgrade-luo"),
        workloads: BTreeMap::new(),
        dir: dir.clone(),
        state_dir: opts.state_dir.clone(),
        halting: false,
        expected_upgrade: None,
    }));
    let session = {
        let ag = agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match ag.dev.as_ref().map(|d| d.retrieve_session(AGENT_SESSION)) {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(e)) if e.errno() == Some(nix::errno::Errno::ENOENT) => None,
            Some(Err(e)) => return Err(format!("retrieving session {AGENT_SESSION}: {e}")),
        }
    };
    let luo = agent
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .dev
        .is_some();
    let report = if let Some(s) = session {
        let result = resume(&shared, &agent, &s);
        BootReport {
            release,
            luo,
            resumed: true,
            result: Some(result),
        }
    } else {
        let result = normal_boot(&shared, opts, &release);
        BootReport {
            release,
            luo,
            resumed: false,
            result,
        }
    };
    let _ = std::fs::write(
        dir.join("boot.json"),
        serde_json::to_vec(&report).unwrap_or_default(),
    );
    let path = super::ctl_socket(&opts.state_dir);
    let _ = std::fs::remove_file(&path);
    let ctl = UnixListener::bind(&path).map_err(|e| format!("binding {}: {e}", path.display()))?;
    say(&format!(
        "MK-AGENT-READY release={} luo={} resumed={} workloads={}",
        report.release,
        report.luo,
        report.resumed,
        lock(&shared).workloads.len()
    ));
    let handler_agent = Arc::clone(&agent);
    let handler: Arc<supervisor::CtlHandler> = Arc::new(move |sh, req, fds| match req {
        Request::LuoUpgrade {
            upgrade_id,
            record_json,
            cmdline,
            faults,
            kernel_attached,
            initrd_attached,
        } => {
            let ask = UpgradeAsk {
                upgrade_id,
                record_json,
                cmdline,
                faults,
                kernel_attached,
                initrd_attached,
            };
            let message = match luo_upgrade(sh, &handler_agent, ask, fds) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            (Response::Error { message }, vec![])
        }
        Request::Ping => {
            let (resp, fds) = supervisor::handle_ctl(sh, req);
            (resp, fds)
        }
        other => supervisor::handle_ctl(sh, other),
    });
    supervisor::serve_ctl_listener(&shared, &ctl, &handler);
    Ok(())
}

/// A normal boot: trial-boot check, then every workload of the file with fresh fds.
fn normal_boot(shared: &Shared, opts: &ServeOptions, release: &str) -> Option<serde_json::Value> {
    let mut result = None;
    match trials(&opts.state_dir)
        .and_then(|mut t| t.check_on_boot(release).map_err(|e| e.to_string()))
    {
        Ok(rollback::BootVerdict::TrialFailed {
            attempt,
            running,
            reason,
        }) => {
            say(&format!(
                "MK-AGENT-TRIAL-FAILED release={} attempt={} running={running}: {reason}",
                attempt.release, attempt.attempt
            ));
            if let Ok(mut j) = journal(&opts.state_dir)
                && let Ok(Some(mut rec)) = j.current()
            {
                rec.outcome = Some(Outcome::Failed);
                rec.phase = Phase::Done;
                rec.recovered = true;
                rec.error = Some(format!(
                    "kernel {} did not come up (cold boot back into {running}); it is marked \
                     bad: {reason}. The workloads restart from the workload file; state kept \
                     only in memory is lost",
                    attempt.release
                ));
                event(&mut rec, "cold boot into the previous kernel: trial failed");
                let _ = j.finish(&rec);
                result = Some(print_result(&rec));
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "trial-boot check"),
    }
    if result.is_none() {
        result = finish_interrupted(&opts.state_dir, release);
    }
    let Some(path) = &opts.workloads else {
        return result;
    };
    let file = match WorkloadFile::load(path) {
        Ok(f) => f,
        Err(e) => {
            say(&format!("MK-AGENT-WORKLOADS-FAILED {e}"));
            return result;
        }
    };
    for spec in &file.workloads {
        let (resp, _) = supervisor::handle_ctl(
            shared,
            Request::Start {
                spec: Box::new(spec.clone()),
            },
        );
        if let Response::Error { message } = resp {
            say(&format!(
                "MK-AGENT-WORKLOAD-FAILED {}: {message}",
                spec.name
            ));
        }
    }
    result
}

/// A normal boot with a luo upgrade still journaled: it was interrupted before its kexec
/// (a kexec that happened resumes instead), so nothing of it survived but the journal. The
/// record is finished as rolled back and printed. Returns the printed document.
pub fn finish_interrupted(state_dir: &Path, release: &str) -> Option<serde_json::Value> {
    let mut j = journal(state_dir).ok()?;
    let mut rec = j.current().ok()??;
    if rec.platform != crate::platform::PlatformKind::Luo {
        return None;
    }
    let phase = rec.phase;
    rec.phase = Phase::Done;
    rec.outcome = Some(Outcome::RolledBack);
    rec.recovered = true;
    rec.error = Some(format!(
        "interrupted before the kexec (phase {phase:?}): the machine restarted on {release}; \
         the workloads restart from the workload file"
    ));
    for w in &mut rec.workloads {
        w.status = MoveStatus::Aborted;
    }
    event(
        &mut rec,
        "recovered at boot: the upgrade never reached its kexec",
    );
    if let Ok(mut t) = trials(state_dir) {
        let _ = t.cancel();
    }
    j.finish(&rec).ok()?;
    Some(print_result(&rec))
}

/// A `LuoUpgrade` request.
#[derive(Debug)]
struct UpgradeAsk {
    upgrade_id: String,
    record_json: String,
    cmdline: String,
    faults: LuoFaults,
    kernel_attached: bool,
    initrd_attached: bool,
}

/// One workload prepared for the kexec.
struct Prepared {
    /// Kept open until the kexec: closing it drops the preservation.
    _session: Session,
    _image: OwnedFd,
    _memfds: Vec<PreservedFd>,
    handoff: HandoffWorkload,
}

/// Kernel A: preserve every workload and kexec. Returns only on failure, after unwinding
/// (workloads running again, nothing preserved or loaded, journal finished).
fn luo_upgrade(
    shared: &Shared,
    agent: &Mutex<HostAgent>,
    ask: UpgradeAsk,
    fds: Vec<OwnedFd>,
) -> Result<Infallible, String> {
    let ag = agent
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let state_dir = ag.state_dir.clone();
    let Some(dev) = ag.dev.as_ref() else {
        return Err(
            "this boot has no /dev/liveupdate (CONFIG_LIVEUPDATE and `liveupdate=on` are \
             needed): refusing the upgrade"
                .into(),
        );
    };
    let mut record: UpgradeRecord = serde_json::from_str(&ask.record_json)
        .map_err(|e| format!("bad journal record in the request: {e}"))?;
    let mut upgrade_id = [0u8; 16];
    hex::decode_to_slice(&ask.upgrade_id, &mut upgrade_id)
        .map_err(|_| format!("bad upgrade id {:?}", ask.upgrade_id))?;
    let mut fds = fds.into_iter();
    let target = if ask.kernel_attached {
        let fd = fds
            .next()
            .ok_or("the request names a kernel but none is attached")?;
        KernelRef {
            fd,
            release: record.kernel_after.clone(),
        }
    } else {
        let p = ag
            .previous
            .as_ref()
            .ok_or("no previous kernel is kept by this agent: nothing to roll back to")?;
        record.kernel_after.clone_from(&p.release);
        KernelRef {
            fd: p.fd.try_clone().map_err(|e| e.to_string())?,
            release: p.release.clone(),
        }
    };
    let initrd: Option<OwnedFd> = if ask.initrd_attached {
        let f = fds
            .next()
            .ok_or("the request names an initrd but none is attached")?;
        Some(handover::copy_memfd("initrd", f.as_fd()).map_err(|e| format!("initrd: {e}"))?)
    } else {
        ag.initrd
            .as_ref()
            .map(OwnedFd::try_clone)
            .transpose()
            .map_err(|e| e.to_string())?
    };
    let cmdline = if ask.cmdline.trim().is_empty() {
        ag.previous_cmdline.clone().unwrap_or_default()
    } else {
        ask.cmdline.clone()
    };
    let cmdline = with_liveupdate(&cmdline);
    let Some(source) = ag.running.as_ref() else {
        return Err(
            "the agent does not hold the image of the running kernel (start it with \
             --kernel-image): without it a failed upgrade could not come back; refusing"
                .into(),
        );
    };
    let key = node_key(&state_dir)?;
    let mut journal = journal(&state_dir)?;
    let mut trials = trials(&state_dir)?;
    trials
        .begin(&target.release, 1)
        .map_err(|e| e.to_string())?;
    event(
        &mut record,
        format!("booting {}, attempt 1 (trial recorded)", target.release),
    );
    let release = running_release();
    let mut inst = lock(shared);
    let names: Vec<String> = inst.workloads.keys().cloned().collect();
    let mut frozen: Vec<String> = Vec::new();
    let mut prepared: Vec<Prepared> = Vec::new();
    let result: Result<(Session, OwnedFd), String> = (|| {
        for (i, name) in names.iter().enumerate() {
            let w = inst.workloads.get(name).ok_or("workload vanished")?;
            let pid = i32::try_from(w.child.id()).unwrap_or(-1);
            let mut spec = w.spec.clone();
            let task = state_serializers::task::capture_tasks(
                Path::new("/"),
                &[pid],
                &state_serializers::task::CaptureOptions::default(),
            )
            .map_err(|e| format!("{name}: capturing task state: {e}"))?;
            inst.freezer
                .freeze(name, pid)
                .map_err(|e| format!("freezing {name}: {e}"))?;
            let frozen_at_ns = realtime_ns();
            frozen.push(name.clone());
            if let Some(w) = inst.workloads.get_mut(name) {
                w.frozen = true;
            }
            let w = inst.workloads.get(name).ok_or("workload vanished")?;
            let memfds: Vec<PreservedFd> = w
                .fds
                .iter()
                .filter(|p| state_serializers::sys::get_seals(p.fd.as_fd()).is_ok())
                .map(|p| {
                    p.fd.try_clone().map(|fd| PreservedFd {
                        name: p.name.clone(),
                        fd,
                    })
                })
                .collect::<std::io::Result<_>>()
                .map_err(|e| format!("{name}: duplicating its memfds: {e}"))?;
            let clean_spec = spec.clone();
            if ask.faults.health_fail && i == 0 {
                spec.env
                    .insert(crate::receiver::HEALTH_FAIL_ENV.to_owned(), "1".to_owned());
            }
            let faults = SendFaults {
                corrupt_region: ask.faults.corrupt_region && i == 0,
            };
            let out = handover::build(&spec, &task, memfds, &release, upgrade_id, 0, &key, faults)
                .map_err(|e| format!("{name}: building the handover image: {e}"))?;
            let digests: Vec<MemfdDigest> = out
                .offer
                .fds
                .iter()
                .skip(1)
                .filter(|d| d.kind == kho_proto::channel::FdKind::Memfd)
                .map(|d| MemfdDigest {
                    name: d.name.clone(),
                    len: d.length,
                    crc32: d.crc32,
                    sha256: hex::encode(d.sha256),
                })
                .collect();
            let sname = workload_session(name)?;
            let session = dev.create_session(&sname).map_err(|e| luo_err(&e))?;
            session
                .preserve_fd(out.image.as_fd(), TOKEN_IMAGE)
                .map_err(|e| format!("{name}: preserving its handover image: {e}"))?;
            for (t, p) in (1u64..).zip(&out.fds) {
                session
                    .preserve_fd(p.fd.as_fd(), t)
                    .map_err(|e| format!("{name}: preserving memfd {}: {e}", p.name))?;
            }
            if let Some(m) = record.workload_mut(name) {
                m.status = MoveStatus::Offered;
            }
            prepared.push(Prepared {
                _session: session,
                _image: out.image,
                _memfds: out.fds,
                handoff: HandoffWorkload {
                    name: name.clone(),
                    session: sname,
                    spec: clean_spec,
                    memfds: digests,
                    frozen_at_ns,
                },
            });
        }
        record.phase = Phase::KernelLoaded;
        event(
            &mut record,
            format!(
                "{} workload(s) preserved in LUO sessions; loading {}",
                prepared.len(),
                target.release
            ),
        );
        let handoff = Handoff {
            format: HANDOFF_FORMAT.to_owned(),
            direction: Direction::Forward,
            record: record.clone(),
            source_release: release.clone(),
            source_cmdline: proc_cmdline(),
            target_release: target.release.clone(),
            has_initrd: initrd.is_some(),
            workloads: prepared.iter().map(|p| p.handoff.clone()).collect(),
        };
        let bytes = serde_json::to_vec(&handoff).map_err(|e| e.to_string())?;
        let hfd = handover::sealed_memfd("mk-luo-handoff", &bytes)
            .map_err(|e| format!("sealing the handoff record: {e}"))?;
        let s = dev.create_session(AGENT_SESSION).map_err(|e| luo_err(&e))?;
        s.preserve_fd(hfd.as_fd(), TOKEN_HANDOFF)
            .and_then(|()| s.preserve_fd(source.fd.as_fd(), TOKEN_SOURCE_KERNEL))
            .and_then(|()| s.preserve_fd(target.fd.as_fd(), TOKEN_TARGET_KERNEL))
            .map_err(|e| format!("preserving the agent session: {e}"))?;
        if let Some(i) = &initrd {
            s.preserve_fd(i.as_fd(), TOKEN_INITRD)
                .map_err(|e| format!("preserving the initramfs: {e}"))?;
        }
        journal.write(&record).map_err(|e| e.to_string())?;
        kexec::kexec_file_load(
            target.fd.as_fd(),
            initrd.as_ref().map(AsFd::as_fd),
            &cmdline,
            KexecFlags::NONE,
        )
        .map_err(|e| format!("loading {}: {e}", target.release))?;
        Ok((s, hfd))
    })();
    let err = match result {
        Err(e) => e,
        Ok((agent_session, hfd)) => {
            // Stop the workloads (their memfds stay open here and preserved): nothing may
            // write a memfd after its digest was taken.
            let inst_ref = &mut *inst;
            for name in &frozen {
                if let Some(w) = inst_ref.workloads.get_mut(name) {
                    let pid = i32::try_from(w.child.id()).unwrap_or(-1);
                    let _ = inst_ref.freezer.kill(name, pid);
                    let _ = w.child.kill();
                    let _ = w.child.wait();
                }
            }
            say(&format!(
                "MK-LUO-KEXEC {} -> {} realtime_ns={} cmdline={cmdline:?}",
                release,
                target.release,
                realtime_ns()
            ));
            let e = match kexec::reboot_kexec() {
                Ok(never) => match never {},
                Err(e) => e,
            };
            let _ = kexec::kexec_unload();
            drop(agent_session);
            drop(hfd);
            // Restart every stopped workload from its kept fds.
            let cpus = inst.cpus.clone();
            let inst_ref = &mut *inst;
            for name in &frozen {
                if let Some(w) = inst_ref.workloads.get_mut(name) {
                    match supervisor::spawn_workload(&w.spec, &w.fds, &cpus, &inst_ref.freezer, &[])
                    {
                        Ok(child) => {
                            w.child = child;
                            w.frozen = false;
                        }
                        Err(err) => {
                            tracing::error!(workload = %name, error = %err, "restart after a failed kexec");
                        }
                    }
                }
            }
            frozen.clear();
            format!("reboot(LINUX_REBOOT_CMD_KEXEC) returned: {e}; the upgrade was unwound")
        }
    };
    drop(prepared);
    let inst_ref = &mut *inst;
    for name in &frozen {
        if let Some(w) = inst_ref.workloads.get_mut(name) {
            let pid = i32::try_from(w.child.id()).unwrap_or(-1);
            let _ = inst_ref.freezer.thaw(name, pid);
            w.frozen = false;
        }
    }
    let _ = trials.cancel();
    record.phase = Phase::Done;
    record.outcome = Some(Outcome::RolledBack);
    record.error = Some(err.clone());
    for w in &mut record.workloads {
        w.status = MoveStatus::Aborted;
    }
    event(&mut record, "unwound before the kexec");
    let _ = journal.finish(&record);
    Err(err)
}

/// Everything retrieved from LUO after a kexec.
struct Retrieved {
    handoff: Handoff,
    /// Per workload: the image (forward only) and the memfds.
    workloads: Vec<(Option<OwnedFd>, Vec<OwnedFd>)>,
}

fn retrieve_all(ag: &mut HostAgent, agent_session: &Session) -> Result<Retrieved, String> {
    let dev = ag.dev.as_ref().ok_or("no /dev/liveupdate")?;
    let hfd = agent_session
        .retrieve_fd(TOKEN_HANDOFF)
        .map_err(|e| luo_err(&e))?;
    let source = agent_session
        .retrieve_fd(TOKEN_SOURCE_KERNEL)
        .map_err(|e| luo_err(&e))?;
    let target = agent_session
        .retrieve_fd(TOKEN_TARGET_KERNEL)
        .map_err(|e| luo_err(&e))?;
    let handoff = Handoff::parse(&read_memfd(hfd.as_fd(), MAX_HANDOFF, "handoff record")?)?;
    let initrd = if handoff.has_initrd {
        Some(
            agent_session
                .retrieve_fd(TOKEN_INITRD)
                .map_err(|e| luo_err(&e))?,
        )
    } else {
        None
    };
    let mut workloads = Vec::new();
    let mut sessions = Vec::new();
    for w in &handoff.workloads {
        let s = dev.retrieve_session(&w.session).map_err(|e| luo_err(&e))?;
        let image = if handoff.direction == Direction::Forward {
            Some(s.retrieve_fd(TOKEN_IMAGE).map_err(|e| luo_err(&e))?)
        } else {
            None
        };
        let memfds = (1..=w.memfds.len() as u64)
            .map(|t| s.retrieve_fd(t).map_err(|e| luo_err(&e)))
            .collect::<Result<Vec<_>, _>>()?;
        workloads.push((image, memfds));
        sessions.push(s);
    }
    // Everything is retrieved: FINISH (the fds stay valid memfds of this kernel).
    for s in sessions.iter().chain(std::iter::once(agent_session)) {
        if let Err(e) = s.finish() {
            tracing::warn!(session = s.name(), error = %e, "FINISH");
        }
    }
    ag.previous = Some(KernelRef {
        fd: source,
        release: handoff.source_release.clone(),
    });
    ag.previous_cmdline = Some(handoff.source_cmdline.clone());
    ag.running = Some(KernelRef {
        fd: target,
        release: running_release(),
    });
    ag.initrd = initrd;
    Ok(Retrieved { handoff, workloads })
}

/// The second half of a kexec: retrieve, verify, restore, health-check; then commit, or
/// kexec back to the previous kernel. Returns the printed result document.
fn resume(shared: &Shared, agent: &Mutex<HostAgent>, agent_session: &Session) -> serde_json::Value {
    let mut ag = agent
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let state_dir = ag.state_dir.clone();
    let release = running_release();
    let t0 = Instant::now();
    let retrieved = match retrieve_all(&mut ag, agent_session) {
        Ok(r) => r,
        Err(e) => {
            let doc = serde_json::json!({"result": "failed", "kernel_after": release,
                "error": format!("retrieving the preserved state: {e}")});
            say(&format!("{RESULT_PREFIX} {doc}"));
            return doc;
        }
    };
    let Retrieved { handoff, workloads } = retrieved;
    let retrieve_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let mut record = handoff.record.clone();
    let mut j = journal(&state_dir).ok();
    if let Some(j) = j.as_mut() {
        let _ = j.write(&record);
    }
    let forward = handoff.direction == Direction::Forward;
    event(
        &mut record,
        format!(
            "{release} up: retrieved {} workload session(s)",
            handoff.workloads.len()
        ),
    );
    if forward && release != handoff.target_release {
        tracing::warn!(expected = %handoff.target_release, running = %release, "running release differs from the target");
    }
    record.phase = if forward {
        Phase::Migrating
    } else {
        Phase::RollingBack
    };
    let trusted = crate::receiver::trusted_node_keys(&state_dir);
    let mut upgrade_id = [0u8; 16];
    let _ = hex::decode_to_slice(&record.upgrade_id, &mut upgrade_id);
    // Copies of every workload's memfds, for a kexec back.
    let mut kept: Vec<Vec<OwnedFd>> = Vec::new();
    let mut failure: Option<String> = None;
    for (hw, (image, memfds)) in handoff.workloads.iter().zip(workloads) {
        let dup: std::io::Result<Vec<OwnedFd>> = memfds.iter().map(OwnedFd::try_clone).collect();
        match dup {
            Ok(d) => kept.push(d),
            Err(e) => {
                failure.get_or_insert(format!("{}: duplicating memfds: {e}", hw.name));
                kept.push(Vec::new());
            }
        }
        if failure.is_some() {
            continue;
        }
        let started = restore_one(shared, &trusted, upgrade_id, hw, image, memfds, forward);
        match started {
            Ok(t) => {
                let blackout_us = realtime_ns().saturating_sub(hw.frozen_at_ns) / 1000;
                let bytes: u64 = hw.memfds.iter().map(|m| m.len).sum();
                say(&format!(
                    "MK-LUO-RESTORE workload={} bytes={bytes} retrieve_ms={retrieve_ms:.1} \
                     verify_ms={:.1} start_ms={:.1} health_ms={:.1} blackout_ms={:.1}",
                    hw.name,
                    t.verify_ms,
                    t.start_ms,
                    t.health_ms,
                    blackout_us as f64 / 1000.0
                ));
                event(
                    &mut record,
                    format!(
                        "{}: {bytes} bytes verified in {:.1} ms, started in {:.1} ms, healthy \
                         after {:.1} ms",
                        hw.name, t.verify_ms, t.start_ms, t.health_ms
                    ),
                );
                if let Some(m) = record.workload_mut(&hw.name) {
                    m.status = if forward {
                        MoveStatus::Committed
                    } else {
                        MoveStatus::MovedBack
                    };
                    m.blackout_us = Some(blackout_us);
                    m.handover_us = Some(t.started_at_ns.saturating_sub(hw.frozen_at_ns) / 1000);
                }
            }
            Err(e) => {
                if let Some(m) = record.workload_mut(&hw.name) {
                    m.detail = Some(e.clone());
                }
                failure = Some(format!("{}: {e}", hw.name));
            }
        }
    }
    match (failure, forward) {
        (None, true) => {
            record.phase = Phase::Done;
            record.outcome = Some(Outcome::Upgraded);
            event(
                &mut record,
                "every workload verified, restored and healthy: committed",
            );
            if let Ok(mut t) = trials(&state_dir) {
                // On a host whose state directory did not survive the kexec (tmpfs), the
                // attempt A recorded is not here: record it from the handoff, then confirm.
                if !matches!(t.pending(), Ok(Some(p)) if p.release == release) {
                    let _ = t.begin(&release, 1);
                }
                let _ = t.confirm(&release);
            }
        }
        (None, false) => {
            record.phase = Phase::Done;
            record.outcome = Some(Outcome::RolledBack);
            event(
                &mut record,
                "back on the previous kernel: every workload restarted and healthy",
            );
        }
        (Some(e), false) => {
            record.phase = Phase::Done;
            record.outcome = Some(Outcome::Failed);
            record.error = Some(format!(
                "{}; back on {release}, the workload needs an operator",
                record.error.clone().unwrap_or_default()
            ));
            event(
                &mut record,
                format!("restart after coming back failed: {e}"),
            );
        }
        (Some(e), true) => {
            record.error = Some(e.clone());
            event(&mut record, format!("failed in {release}: {e}; kexec back"));
            let err = kexec_back(shared, &ag, &handoff, record.clone(), kept);
            // Only reached when the kexec back failed.
            record.phase = Phase::Done;
            record.outcome = Some(Outcome::Failed);
            record.error = Some(format!("{e}; coming back failed too: {err}"));
        }
    }
    if let Some(j) = j.as_mut() {
        let _ = j.finish(&record);
    }
    print_result(&record)
}

/// How long each step of [`restore_one`] took.
#[derive(Debug, Clone, Copy)]
struct RestoreTimes {
    /// Verification of the image and every memfd digest.
    verify_ms: f64,
    /// Binding the listeners and starting the process.
    start_ms: f64,
    /// Until the health check passed.
    health_ms: f64,
    /// CLOCK_REALTIME when the process was started.
    started_at_ns: u64,
}

/// Verifies and restarts one workload in this kernel, then health-checks it.
fn restore_one(
    shared: &Shared,
    trusted: &Result<kho_proto::keys::TrustedKeys, String>,
    upgrade_id: [u8; 16],
    hw: &HandoffWorkload,
    image: Option<OwnedFd>,
    memfds: Vec<OwnedFd>,
    forward: bool,
) -> Result<RestoreTimes, String> {
    let t0 = Instant::now();
    let (spec, task, mut fds) = if forward {
        let trusted = trusted
            .as_ref()
            .map_err(|e| format!("trusted node keys: {e}"))?;
        let image = image.ok_or("no handover image")?;
        let inc = handover::verify_preserved(&hw.name, &image, memfds, trusted, upgrade_id)
            .map_err(|e| format!("verification failed: {e}"))?;
        (inc.spec, Some(inc.task), inc.fds)
    } else {
        let mut fds = Vec::new();
        for (fd, d) in memfds.into_iter().zip(&hw.memfds) {
            state_serializers::verify_fd(&d.name, fd.as_fd(), &d.region())
                .map_err(|e| format!("memfd {}: {e}", d.name))?;
            fds.push(PreservedFd {
                name: d.name.clone(),
                fd,
            });
        }
        (hw.spec.clone(), None, fds)
    };
    let verify_ms = t0.elapsed().as_secs_f64() * 1000.0;
    fds.extend(bind_listeners(&spec)?);
    let extra: Vec<String> = if spec.env.contains_key(crate::receiver::HEALTH_FAIL_ENV) {
        vec![crate::receiver::HEALTH_FAIL_ARG.to_owned()]
    } else {
        Vec::new()
    };
    {
        let mut inst = lock(shared);
        let child = match &task {
            Some(task) => supervisor::restore_workload(&inst, &hw.name, task, &fds, &extra)?,
            None => supervisor::spawn_workload(&spec, &fds, &inst.cpus, &inst.freezer, &extra)
                .map_err(|e| format!("starting {}: {e}", spec.exec.display()))?,
        };
        inst.workloads.insert(
            hw.name.clone(),
            Running {
                spec: spec.clone(),
                child,
                fds,
                frozen: false,
                pending_commit: false,
            },
        );
    }
    let start_ms = t0.elapsed().as_secs_f64() * 1000.0 - verify_ms;
    let started_at_ns = realtime_ns();
    let t1 = Instant::now();
    let outcome = crate::health::run(&spec.health);
    let health_ms = t1.elapsed().as_secs_f64() * 1000.0;
    let alive = lock(shared)
        .workloads
        .get_mut(&hw.name)
        .is_some_and(|w| matches!(w.child.try_wait(), Ok(None)));
    if outcome.healthy && alive {
        Ok(RestoreTimes {
            verify_ms,
            start_ms,
            health_ms,
            started_at_ns,
        })
    } else if !alive {
        Err(format!("the restored process exited ({})", outcome.detail))
    } else {
        Err(format!("health check failed: {}", outcome.detail))
    }
}

/// Kernel B after a failure: stop the restored copies, preserve the same memfds again
/// (digests taken now), and kexec the previous kernel. Returns only on failure.
fn kexec_back(
    shared: &Shared,
    ag: &HostAgent,
    handoff: &Handoff,
    mut record: UpgradeRecord,
    kept: Vec<Vec<OwnedFd>>,
) -> String {
    let result: Result<Infallible, String> = (|| {
        let dev = ag.dev.as_ref().ok_or("no /dev/liveupdate")?;
        let previous = ag
            .previous
            .as_ref()
            .ok_or("the previous kernel was not handed over")?;
        let running = ag
            .running
            .as_ref()
            .ok_or("this kernel's image was not handed over")?;
        {
            let mut inst = lock(shared);
            let names: Vec<String> = inst.workloads.keys().cloned().collect();
            for n in names {
                let _ = supervisor::stop(&mut inst, &n);
            }
        }
        record.phase = Phase::RollingBack;
        let mut sessions = Vec::new();
        let mut workloads = Vec::new();
        for (hw, fds) in handoff.workloads.iter().zip(&kept) {
            if fds.len() != hw.memfds.len() {
                return Err(format!("{}: its memfds were not kept", hw.name));
            }
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            let digests = state_serializers::digest_many(&borrowed)
                .into_iter()
                .zip(&hw.memfds)
                .map(|(d, m)| {
                    d.map(|d| MemfdDigest::new(&m.name, &d))
                        .map_err(|e| format!("{}: digesting {}: {e}", hw.name, m.name))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let s = dev.create_session(&hw.session).map_err(|e| luo_err(&e))?;
            for (t, fd) in (1u64..).zip(fds) {
                s.preserve_fd(fd.as_fd(), t).map_err(|e| luo_err(&e))?;
            }
            sessions.push(s);
            workloads.push(HandoffWorkload {
                memfds: digests,
                ..hw.clone()
            });
        }
        let back = Handoff {
            format: HANDOFF_FORMAT.to_owned(),
            direction: Direction::Return,
            record: record.clone(),
            source_release: running_release(),
            source_cmdline: proc_cmdline(),
            target_release: previous.release.clone(),
            has_initrd: ag.initrd.is_some(),
            workloads,
        };
        let bytes = serde_json::to_vec(&back).map_err(|e| e.to_string())?;
        let hfd = handover::sealed_memfd("mk-luo-handoff", &bytes).map_err(|e| e.to_string())?;
        let s = dev.create_session(AGENT_SESSION).map_err(|e| luo_err(&e))?;
        s.preserve_fd(hfd.as_fd(), TOKEN_HANDOFF)
            .and_then(|()| s.preserve_fd(running.fd.as_fd(), TOKEN_SOURCE_KERNEL))
            .and_then(|()| s.preserve_fd(previous.fd.as_fd(), TOKEN_TARGET_KERNEL))
            .map_err(|e| luo_err(&e))?;
        if let Some(i) = &ag.initrd {
            s.preserve_fd(i.as_fd(), TOKEN_INITRD)
                .map_err(|e| luo_err(&e))?;
        }
        let cmdline = with_liveupdate(ag.previous_cmdline.as_deref().unwrap_or_default());
        kexec::kexec_file_load(
            previous.fd.as_fd(),
            ag.initrd.as_ref().map(AsFd::as_fd),
            &cmdline,
            KexecFlags::NONE,
        )
        .map_err(|e| format!("loading {}: {e}", previous.release))?;
        say(&format!(
            "MK-LUO-KEXEC-BACK {} -> {} reason={:?}",
            running_release(),
            previous.release,
            record.error.as_deref().unwrap_or_default()
        ));
        let e = match kexec::reboot_kexec() {
            Ok(never) => match never {},
            Err(e) => e,
        };
        let _ = kexec::kexec_unload();
        drop((s, hfd, sessions));
        Err(format!("reboot(LINUX_REBOOT_CMD_KEXEC) returned: {e}"))
    })();
    match result {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::record::WorkloadMove;
    use crate::platform::{PlatformKind, Resources};

    fn record(platform: PlatformKind) -> UpgradeRecord {
        UpgradeRecord {
            upgrade_id: "00".repeat(16),
            kind: crate::orchestrator::record::UpgradeKind::Apply,
            platform,
            started_at: 1,
            kernel_before: "a".into(),
            kernel_after: "b".into(),
            image_sha256: String::new(),
            old_instance: 0,
            old_resources: Resources::default(),
            new_instance: None,
            phase: Phase::KernelLoaded,
            workloads: vec![WorkloadMove {
                name: "kv".into(),
                status: MoveStatus::Offered,
                blackout_us: None,
                handover_us: None,
                detail: None,
            }],
            events: Vec::new(),
            outcome: None,
            error: None,
            recovered: false,
        }
    }

    #[test]
    fn an_interrupted_luo_upgrade_is_finished_as_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        assert!(finish_interrupted(dir.path(), "a").is_none());
        let mut j = journal(dir.path()).unwrap();
        j.write(&record(PlatformKind::Luo)).unwrap();
        let doc = finish_interrupted(dir.path(), "a").unwrap();
        assert_eq!(doc["result"], "rolled-back");
        assert!(
            doc["error"]
                .as_str()
                .unwrap()
                .contains("phase KernelLoaded"),
            "{doc}"
        );
        let j = journal(dir.path()).unwrap();
        assert!(j.current().unwrap().is_none());
        let h = j.history().unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].workloads[0].status, MoveStatus::Aborted);
    }

    #[test]
    fn an_emulated_record_is_left_to_the_orchestrator() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(dir.path()).unwrap();
        j.write(&record(PlatformKind::Emulated)).unwrap();
        assert!(finish_interrupted(dir.path(), "a").is_none());
        assert!(journal(dir.path()).unwrap().current().unwrap().is_some());
    }
}
