//! The instance supervisor, `mk-agentd --instance ID`: one **emulated** kernel instance.
//!
//! What it stands for on a real multikernel host, and how it emulates it:
//!
//! | real instance                         | emulation                                         |
//! |---------------------------------------|---------------------------------------------------|
//! | a kernel booted on its own cpus       | this process, pinned with `sched_setaffinity`      |
//! | its `uname -r`                        | the release parsed from the loaded bzImage header |
//! | processes of that kernel              | children, pinned to the same cpus                 |
//! | its cgroup freezer                    | one cgroup v2 group per workload (SIGSTOP if none) |
//! | KHO/LUO-preserved memfds              | fds this process holds for each workload          |
//! | the IPI/vsock channel                 | `chan.sock`, kho-proto frames + SCM_RIGHTS        |
//!
//! It serves two sockets in its instance directory: `ctl.sock` (local control, see
//! [`super::ctl`]) and `chan.sock` (the inter-instance channel, see [`crate::host::receiver`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::host::ctl::{Request, Response};
use crate::host::{checkpoint, launch};
use crate::model::{InstanceId, PreservedFd, WorkloadInfo, WorkloadState};
use crate::sys::cgroup::Freezer;
use crate::sys::fdpass;
use crate::sys::spawn::{Ended, Process};
use crate::workload::{HealthCheck, Mode, WorkloadSpec};

/// Why the supervisor could not do what was asked of it.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A workload of that name runs here already.
    #[error("workload {0} already runs on this instance")]
    AlreadyRunning(String),
    /// No workload of that name runs here.
    #[error("workload {0:?} does not run on this instance")]
    NotRunning(String),
    /// A step failed after the workload was frozen, and undoing the freeze failed too.
    #[error("{error}; undoing the freeze failed as well: {undo}")]
    Undo {
        error: Box<SupervisorError>,
        undo: Box<SupervisorError>,
    },
    /// Duplicating one preserved fd (to hand it to a client) failed.
    #[error("duplicating {name}: {source}")]
    DupFd {
        name: String,
        #[source]
        source: io::Error,
    },
    /// Creating a fresh workload's memfds or listening sockets failed.
    #[error("preparing fds: {0}")]
    PrepareFds(#[source] io::Error),
    /// Starting the workload's executable failed.
    #[error("starting {}: {source}", .exec.display())]
    Start {
        exec: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Freezing, thawing or killing the workload (cgroup or signal) failed.
    #[error("{op} {name}: {source}")]
    Freezer {
        /// `freezing`, `thawing` or `killing`.
        op: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    /// Pinning this instance to new cpus failed.
    #[error("pinning to {cpus:?}: {source}")]
    Pin {
        cpus: Vec<u32>,
        #[source]
        source: io::Error,
    },
    /// An `Expect` request with a malformed upgrade id.
    #[error("bad upgrade id: {0}")]
    BadUpgradeId(#[source] kho_proto::channel::ParseUpgradeIdError),
    /// Checkpointing or restoring a `mode = "checkpoint"` workload failed.
    #[error("{name}: {source}")]
    Checkpoint {
        name: String,
        #[source]
        source: super::checkpoint::CheckpointError,
    },
    /// A request only the LUO host agent serves.
    #[error(
        "LuoApply is served only by the host agent of a LUO kernel (`mk-agentd serve`), not by \
         an emulated instance"
    )]
    NotServedHere,
}

/// A workload managed by this instance.
#[derive(Debug)]
pub struct Running {
    pub spec: WorkloadSpec,
    /// Its process; `None` once it exited (see `exit`) or while it is stopped for a
    /// restart-mode move.
    pub process: Option<Process>,
    /// The pid of its current or last process.
    pub pid: i32,
    /// The preserved descriptors: the declared ones (memfds, listeners), then the entries
    /// of its fd store (`FDSTORE=1`, names the spec does not declare).
    pub fds: Vec<PreservedFd>,
    /// Frozen (or, restart mode, stopped) for a move.
    pub frozen: bool,
    /// Received over the channel and not yet committed: killed if the channel drops.
    pub pending_commit: bool,
    /// How its last process ended, if it did.
    pub exit: Option<String>,
    pub restarts: u32,
    /// When its current process started.
    pub started: Instant,
    /// A pending restart (`restart = "on-failure"`).
    pub restart_at: Option<Instant>,
    pub backoff: Duration,
    /// `READY=1` of its current process.
    pub readiness: Arc<Readiness>,
    /// Its last `STATUS=`.
    pub status_text: Option<String>,
    /// Appended to its arguments at every start (fault injection only).
    pub extra_args: Vec<String>,
    /// A connection hand-over asked of its process (its `handoff_signal` sent): set by
    /// `MK_HANDOFF=1`. While it is `Some`, its fd store takes connections.
    pub handoff: Option<Arc<Readiness>>,
}

impl Running {
    /// A workload without a process yet (`launch` starts one; adoption sets one).
    pub fn new(spec: WorkloadSpec, fds: Vec<PreservedFd>, pending_commit: bool) -> Running {
        Running {
            spec,
            process: None,
            pid: -1,
            fds,
            frozen: false,
            pending_commit,
            exit: None,
            restarts: 0,
            started: Instant::now(),
            restart_at: None,
            backoff: Duration::from_millis(crate::workload::RESTART_BACKOFF_MIN_MS),
            readiness: Arc::new(Readiness::default()),
            status_text: None,
            extra_args: Vec::new(),
            handoff: None,
        }
    }

    /// Ends a connection hand-over of the process that is still running (the move did not
    /// happen): the handed-over connections are dropped from the store (the process kept
    /// its own descriptors of them) and `SIGCONT` tells it to serve them and accept again.
    fn take_back_connections(&mut self) {
        if self.handoff.take().is_none() {
            return;
        }
        self.fds.retain(|p| !is_connection(&p.name));
        if let Some(p) = &self.process
            && let Err(e) = p.signal(libc::SIGCONT)
        {
            tracing::warn!(workload = %self.spec.name, error = %e, "SIGCONT after a cancelled hand-over failed");
        }
    }

    /// How many of its descriptors (at the end) came from its fd store.
    pub fn stored(&self) -> usize {
        self.fds
            .iter()
            .filter(|p| !self.spec.declares(&p.name))
            .count()
    }

    pub fn state(&self) -> WorkloadState {
        match (&self.process, self.frozen) {
            (None, true) => WorkloadState::Stopped,
            (Some(_), true) => WorkloadState::Frozen,
            (Some(_), false) => WorkloadState::Running,
            (None, false) if self.restart_at.is_some() => WorkloadState::Restarting,
            (None, false) => WorkloadState::Exited,
        }
    }

    fn info(&self) -> WorkloadInfo {
        WorkloadInfo {
            name: self.spec.name.clone(),
            pid: self.pid,
            frozen: self.frozen,
            pending_commit: self.pending_commit,
            state: self.state(),
            exit: self.exit.clone(),
            restarts: self.restarts,
            status_text: self.status_text.clone(),
        }
    }

    /// Whether its process is alive (reaping it if it exited).
    pub fn alive(&mut self) -> bool {
        let Some(p) = self.process.as_mut() else {
            return false;
        };
        match p.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                self.exited(status, Instant::now());
                false
            }
            Err(_) => false,
        }
    }

    /// Records that its process ended with `status` and, unless it is in a move (whose
    /// outcome decides), schedules a restart per its `restart` policy with a back-off.
    fn exited(&mut self, status: Ended, now: Instant) {
        use crate::workload::{RESTART_BACKOFF_MIN_MS, RESTART_RESET_MS, RestartPolicy};
        self.process = None;
        let exit = describe_exit(status);
        let in_move = self.frozen || self.pending_commit;
        if now.saturating_duration_since(self.started) >= Duration::from_millis(RESTART_RESET_MS) {
            self.backoff = Duration::from_millis(RESTART_BACKOFF_MIN_MS);
        }
        if !in_move && self.spec.restart == RestartPolicy::OnFailure && !status.success() {
            tracing::warn!(workload = %self.spec.name, %exit, backoff_ms = u64::try_from(self.backoff.as_millis()).unwrap_or(u64::MAX), "workload exited; restarting after the back-off");
            self.retry_later(now);
        } else if !in_move {
            tracing::warn!(workload = %self.spec.name, %exit, policy = ?self.spec.restart, "workload exited; not restarted");
        }
        self.exit = Some(exit);
    }

    /// Schedules a (re)start after the back-off, and doubles the back-off.
    pub(crate) fn retry_later(&mut self, now: Instant) {
        self.restart_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(Duration::from_millis(
            crate::workload::RESTART_BACKOFF_MAX_MS,
        ));
    }
}

/// `READY=1` of one process of a workload, waited for without polling: by a thread
/// ([`Readiness::wait`]) or by a task of the channel's runtime ([`Readiness::wait_async`]),
/// which the notify listener then wakes directly, without a blocking thread between them.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: Mutex<bool>,
    changed: Condvar,
    changed_async: tokio::sync::Notify,
}

impl Readiness {
    pub fn set(&self) {
        *self
            .ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        self.changed.notify_all();
        self.changed_async.notify_waiters();
    }

    /// [`Readiness::wait`] for an async task: waits up to `timeout` for `READY=1`; whether
    /// it came.
    pub async fn wait_async(&self, timeout: Duration) -> bool {
        let notified = self.changed_async.notified();
        tokio::pin!(notified);
        // Registered before the flag is read: a `set` after the read wakes this waiter.
        notified.as_mut().enable();
        if self.is_set() {
            return true;
        }
        let _ = tokio::time::timeout(timeout, notified).await;
        self.is_set()
    }

    pub fn is_set(&self) -> bool {
        *self
            .ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits up to `timeout` for `READY=1`; whether it came.
    pub fn wait(&self, timeout: Duration) -> bool {
        let guard = self
            .ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |ready| !*ready)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard
    }
}

/// `exit status 3`, `killed by signal 9` (an adopted process's status is unknown).
pub fn describe_exit(status: Ended) -> String {
    status.to_string()
}

/// The state of this instance.
#[derive(Debug)]
pub struct Instance {
    pub id: InstanceId,
    pub kernel_release: String,
    pub cpus: Vec<u32>,
    pub freezer: Freezer,
    pub workloads: BTreeMap<String, Running>,
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub halting: bool,
    /// The upgrade whose channel frames this instance accepts.
    pub expected_upgrade: Option<kho_proto::channel::UpgradeId>,
    /// The notify socket every workload gets as `NOTIFY_SOCKET` (see [`start_background`]).
    pub notify_path: Option<PathBuf>,
    /// Where each start of a workload's process is recorded for a restarted supervisor to
    /// adopt it ([`super::adopt`]); `None`: not recorded (emulated instances).
    pub records: Option<PathBuf>,
    /// Whether a move hands established connections over (`handoff_signal`): true where
    /// the new copy runs beside the old one (emulated instances); a kexec ends every
    /// connection, so the LUO host agent leaves it off.
    pub connection_handoff: bool,
    /// Copies started ahead of their move (`standby = true`), waiting for their descriptors.
    pub standbys: BTreeMap<String, Standby>,
    /// The supervision loop's epoll set: every workload process's pidfd is in it, so an
    /// exit wakes the loop (see [`super::watch`]); `None` until the loop starts.
    pub exits: Option<Arc<nix::sys::epoll::Epoll>>,
}

/// A copy started before its move (`standby = true`; docs/state.md, "Standby start"): its
/// process runs, has done its start-up and waits on its socket for the descriptors.
#[derive(Debug)]
pub struct Standby {
    pub process: Process,
    /// The agent's end of its `SOCK_SEQPACKET` socket pair.
    pub socket: OwnedFd,
    /// The spec it was started from (checked against the verified one before it is used).
    pub spec: WorkloadSpec,
    pub extra_args: Vec<String>,
}

pub use crate::model::{CONNECTION_FDNAME, is_connection};

impl Instance {
    pub fn new(
        id: InstanceId,
        kernel_release: String,
        cpus: Vec<u32>,
        freezer: Freezer,
        dir: PathBuf,
        state_dir: PathBuf,
    ) -> Self {
        Instance {
            id,
            kernel_release,
            cpus,
            freezer,
            workloads: BTreeMap::new(),
            dir,
            state_dir,
            halting: false,
            expected_upgrade: None,
            notify_path: None,
            records: None,
            connection_handoff: false,
            standbys: BTreeMap::new(),
            exits: None,
        }
    }
}

/// Shared handle to the instance.
pub type Shared = Arc<Mutex<Instance>>;

/// An instance for unit tests: cpu 0, the signal freezer, and `records` as its directories
/// and where it keeps its adoption records.
#[cfg(test)]
pub(crate) fn test_instance(records: &std::path::Path) -> Shared {
    let mut inst = Instance::new(
        0,
        "test".into(),
        vec![0],
        crate::sys::cgroup::Freezer::Signal,
        records.to_owned(),
        records.to_owned(),
    );
    inst.records = Some(records.to_owned());
    Arc::new(Mutex::new(inst))
}

/// Locks the instance, recovering from a poisoned lock (a panicked handler thread must not
/// take the instance down with it).
pub fn lock(shared: &Shared) -> MutexGuard<'_, Instance> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn pin_self(cpus: &[u32]) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for c in cpus {
        set.set(*c as usize).map_err(io::Error::from)?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(io::Error::from)
}

fn pin_pid(pid: u32, cpus: &[u32]) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for c in cpus {
        set.set(*c as usize).map_err(io::Error::from)?;
    }
    let pid = i32::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(pid), &set).map_err(io::Error::from)
}

/// Puts the declared descriptors first, in the spec's order (memfds, then listeners), then
/// the fd store's entries in the order they came.
fn order_fds(spec: &WorkloadSpec, mut fds: Vec<PreservedFd>) -> Vec<PreservedFd> {
    // A stable sort: the store's entries keep their order.
    fds.sort_by_key(|p| {
        spec.declared_fds()
            .position(|n| n == p.name)
            .unwrap_or(usize::MAX)
    });
    fds
}

/// Starts a process of workload `w` on this instance (from its spec, with its fds), resets
/// its readiness. Does not touch its restart counters.
fn launch(inst: &Instance, w: &mut Running) -> Result<(), SupervisorError> {
    let start = |source| SupervisorError::Start {
        exec: w.spec.exec.clone(),
        source,
    };
    let dir = open_group(inst, &w.spec.name).map_err(start)?;
    let images = (w.spec.mode == Mode::Checkpoint)
        .then(|| w.fds.iter().position(|p| p.name == checkpoint::IMAGES))
        .flatten();
    let process = if let Some(i) = images {
        // A checkpointed copy (moved here, or kept here for a rollback): restored from its
        // images, which are then no longer needed.
        let criu = checkpoint::criu_path().ok_or_else(|| SupervisorError::Checkpoint {
            name: w.spec.name.clone(),
            source: checkpoint::CheckpointError::NoCriu,
        })?;
        let scratch = inst.dir.join("criu").join(&w.spec.name);
        let p = checkpoint::restore(
            &criu,
            w.fds[i].fd.as_fd(),
            &scratch,
            dir.as_ref().map(AsFd::as_fd),
        )
        .map_err(|source| SupervisorError::Checkpoint {
            name: w.spec.name.clone(),
            source,
        })?;
        w.fds.remove(i);
        p
    } else {
        launch::start(&launch::Launch {
            spec: &w.spec,
            fds: &w.fds,
            standby: false,
            stored: w.stored(),
            cpus: &inst.cpus,
            cgroup_dir: dir.as_ref().map(AsFd::as_fd),
            notify: inst.notify_path.as_deref(),
            extra_args: &w.extra_args,
        })
        .map_err(start)?
    };
    started(inst, w, process);
    Ok(())
}

/// The workload's cgroup directory on this instance (created if needed, thawed if a process
/// died in it while frozen), `None` without cgroups.
fn open_group(inst: &Instance, name: &str) -> io::Result<Option<File>> {
    inst.freezer.prepare(name)?;
    match inst.freezer.group(name) {
        Some(g) => {
            if std::fs::read_to_string(g.join("cgroup.freeze")).is_ok_and(|f| f.trim() == "1") {
                // A process that died while frozen leaves its group frozen: a child started
                // into it would never reach exec.
                inst.freezer.thaw(name, -1)?;
            }
            Ok(Some(File::open(&g)?))
        }
        None => Ok(None),
    }
}

/// Records that `process` now serves workload `w`.
fn started(inst: &Instance, w: &mut Running, process: Process) {
    register(inst, w, process);
    if let Some(dir) = &inst.records
        && let Err(e) = super::adopt::write_record(dir, w)
    {
        // The workload runs; only an adoption after a restart of this supervisor is lost.
        tracing::warn!(workload = %w.spec.name, error = %e, "recording the process for adoption failed");
    }
}

/// `w` runs on `process` from now on (its exit watched, a fresh readiness), without its
/// adoption record ([`started`] writes it).
fn register(inst: &Instance, w: &mut Running, process: Process) {
    super::watch::watch_exit(inst, &process);
    w.pid = i32::try_from(process.id()).unwrap_or(-1);
    w.process = Some(process);
    // Handed-over connections belong to this process now: never handed to another start.
    w.fds.retain(|p| !is_connection(&p.name));
    w.handoff = None;
    w.frozen = false;
    w.started = Instant::now();
    w.restart_at = None;
    w.readiness = Arc::new(Readiness::default());
}

/// The first message of a standby copy on its socket once it waits for its descriptors.
pub const STANDBY_READY: &[u8] = b"READY";

/// Starts a standby copy of `spec` (`standby = true`): its process starts now, before the
/// workload is frozen elsewhere, with `MK_STANDBY_FD`, and has `wait` to say `READY` on
/// its socket. A standby that fails to start or to get ready is killed: the move then
/// starts the copy the usual way. The wait runs without the instance lock.
pub fn start_standby(
    shared: &Shared,
    spec: &WorkloadSpec,
    extra_args: &[String],
    wait: Duration,
) -> Result<(), SupervisorError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let name = spec.name.clone();
    let fail = |source: io::Error| SupervisorError::Start {
        exec: spec.exec.clone(),
        source,
    };
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| fail(e.into()))?;
    let mut process = {
        let mut inst = lock(shared);
        if inst.workloads.contains_key(&name) {
            return Err(SupervisorError::AlreadyRunning(name));
        }
        if let Some(mut old) = inst.standbys.remove(&name) {
            old.process.kill_and_reap();
        }
        let dir = open_group(&inst, &name).map_err(fail)?;
        let fds = [PreservedFd {
            name: "mk-standby".into(),
            fd: theirs,
        }];
        launch::start(&launch::Launch {
            spec,
            fds: &fds,
            standby: true,
            stored: 0,
            cpus: &inst.cpus,
            cgroup_dir: dir.as_ref().map(AsFd::as_fd),
            notify: inst.notify_path.as_deref(),
            extra_args,
        })
        .map_err(fail)?
    };
    let ready = wait_standby_ready(ours.as_fd(), wait);
    if let Err(e) = ready {
        process.kill_and_reap();
        return Err(fail(e));
    }
    lock(shared).standbys.insert(
        name,
        Standby {
            process,
            socket: ours,
            spec: spec.clone(),
            extra_args: extra_args.to_vec(),
        },
    );
    Ok(())
}

fn wait_standby_ready(sock: BorrowedFd<'_>, wait: Duration) -> io::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(sock, PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, ms) {
        Ok(0) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the standby copy did not say READY within {wait:?}"),
            ));
        }
        Ok(_) => {}
        Err(e) => return Err(e.into()),
    }
    let mut buf = [0u8; 64];
    let got = fdpass::recv_datagram(sock, &mut buf, 0)?;
    if got.len == 0 {
        return Err(io::Error::other(
            "the standby copy exited before it was ready",
        ));
    }
    let said = &buf[..got.len.min(buf.len())];
    if said != STANDBY_READY {
        return Err(io::Error::other(format!(
            "the standby copy said {:?}, not READY",
            String::from_utf8_lossy(said)
        )));
    }
    Ok(())
}

/// Kills the standby copy of `name`, if any (its move was cancelled).
pub fn drop_standby(inst: &mut Instance, name: &str) {
    if let Some(mut sb) = inst.standbys.remove(name) {
        tracing::info!(workload = %name, "standby copy not used: stopped");
        sb.process.kill_and_reap();
    }
}

/// Kills every standby copy still waiting (the channel that announced them ended, or the
/// instance halts).
pub fn drop_all_standbys(inst: &mut Instance) {
    let waiting: Vec<String> = inst.standbys.keys().cloned().collect();
    for n in waiting {
        drop_standby(inst, &n);
    }
}

/// Takes the standby copy of `w` if one waits that was started from the same spec and still
/// runs (one that does not fit is killed).
fn usable_standby(inst: &mut Instance, w: &Running) -> Option<Standby> {
    let mut sb = inst.standbys.remove(&w.spec.name)?;
    if sb.spec == w.spec
        && sb.extra_args == w.extra_args
        && matches!(sb.process.try_wait(), Ok(None))
    {
        return Some(sb);
    }
    tracing::warn!(workload = %w.spec.name, "standby copy not usable (exited, or another spec): starting a new one");
    sb.process.kill_and_reap();
    None
}

/// What a standby copy is handed: `w`'s descriptors in their order, its handed-over
/// connections moved out of `w` (they belong to the copy from now on) and the others
/// duplicated (`w` keeps them for a later start). `None`, with `w` untouched, if one cannot
/// be duplicated.
fn handed_to_standby(w: &mut Running) -> Option<Vec<PreservedFd>> {
    let dups: io::Result<Vec<OwnedFd>> = w
        .fds
        .iter()
        .filter(|p| !is_connection(&p.name))
        .map(|p| p.fd.try_clone())
        .collect();
    let mut dups = match dups {
        Ok(d) => d.into_iter(),
        Err(e) => {
            tracing::warn!(workload = %w.spec.name, error = %e, "duplicating a descriptor for the standby copy");
            return None;
        }
    };
    let mut handed = Vec::with_capacity(w.fds.len());
    let mut kept = Vec::with_capacity(w.fds.len());
    for p in std::mem::take(&mut w.fds) {
        if is_connection(&p.name) {
            handed.push(p);
        } else if let Some(fd) = dups.next() {
            handed.push(PreservedFd {
                name: p.name.clone(),
                fd,
            });
            kept.push(p);
        }
    }
    w.fds = kept;
    Some(handed)
}

/// Starts workload `w`'s process again (supervision's restart), from its spec and fds.
pub(crate) fn relaunch(inst: &Instance, w: &mut Running) -> Result<(), SupervisorError> {
    launch(inst, w)
}

/// Starts a workload on this instance from its spec with `fds` (fresh ones for a first
/// start, received ones after a move: declared, then its fd store). The new copy is always
/// started from the declared spec (`exec`, `args`, `env`), never from a captured
/// `/proc/PID/cmdline`, which a process may rewrite. `pending_commit` marks a copy that is
/// stopped unless a commit follows.
pub fn admit(
    shared: &Shared,
    name: &str,
    spec: &WorkloadSpec,
    fds: Vec<PreservedFd>,
    extra_args: &[String],
    pending_commit: bool,
) -> Result<WorkloadInfo, SupervisorError> {
    let mut inst = lock(shared);
    if inst.workloads.contains_key(name) {
        return Err(SupervisorError::AlreadyRunning(name.to_owned()));
    }
    let mut w = Running::new(spec.clone(), order_fds(spec, fds), pending_commit);
    w.extra_args = extra_args.to_vec();
    let standby = usable_standby(&mut inst, &w).and_then(|mut sb| {
        let Some(handed) = handed_to_standby(&mut w) else {
            // Not used: it goes (nothing else would reap it).
            sb.process.kill_and_reap();
            return None;
        };
        Some((sb, handed))
    });
    let Some((sb, handed)) = standby else {
        launch(&inst, &mut w)?;
        let info = w.info();
        inst.workloads.insert(name.to_owned(), w);
        return Ok(info);
    };
    // The standby copy runs `w` from here. Registered (its pid, exit watch and readiness)
    // before its descriptors reach it, so that its `READY=1`, which may come at once, finds
    // it; the descriptors are sent without the instance lock, so that the notify listener
    // handling that `READY=1` (and the copy, if it runs on this cpu) never waits for this
    // thread. Its adoption record (kept by `mk-agentd serve` only) follows.
    let Standby {
        process, socket, ..
    } = sb;
    let pid = i32::try_from(process.id()).unwrap_or(-1);
    register(&inst, &mut w, process);
    let info = w.info();
    inst.workloads.insert(name.to_owned(), w);
    let records = inst.records.clone();
    drop(inst);
    let names: Vec<&str> = handed.iter().map(|p| p.name.as_str()).collect();
    let fds: Vec<BorrowedFd<'_>> = handed.iter().map(|p| p.fd.as_fd()).collect();
    if let Err(e) = fdpass::send_packet(socket.as_fd(), names.join(",").as_bytes(), &fds) {
        tracing::warn!(workload = %name, error = %e, "handing the descriptors to the standby copy failed: starting a new copy");
        return start_instead_of_standby(shared, name, pid, handed);
    }
    drop(fds);
    if let Some(dir) = records {
        // Under the lock, as every other write or removal of a record: a stop (which
        // removes it) or a new start (which writes its own) in between stands.
        let inst = lock(shared);
        if inst.workloads.get(name).is_some_and(|w| w.pid == pid)
            && let Err(e) = super::adopt::write_record_of(&dir, name, pid, &handed)
        {
            // The workload runs; only an adoption after a restart of this supervisor is
            // lost.
            tracing::warn!(workload = %name, error = %e, "recording the process for adoption failed");
        }
    }
    Ok(info)
}

/// The standby copy registered for `name` (process `pid`) did not get its descriptors:
/// it is killed and a copy started the usual way, with the descriptors `handed` held
/// (its connections among them go back to the workload).
fn start_instead_of_standby(
    shared: &Shared,
    name: &str,
    pid: i32,
    handed: Vec<PreservedFd>,
) -> Result<WorkloadInfo, SupervisorError> {
    let mut inst = lock(shared);
    let mut w = match inst.workloads.remove(name) {
        Some(w) if w.pid == pid => w,
        // Replaced meanwhile (stopped and started again): that copy stands.
        Some(other) => {
            inst.workloads.insert(name.to_owned(), other);
            return Err(SupervisorError::AlreadyRunning(name.to_owned()));
        }
        None => return Err(SupervisorError::NotRunning(name.to_owned())),
    };
    if let Some(mut p) = w.process.take() {
        p.kill_and_reap();
    }
    // Back in their places: `handed` is in the workload's order, and `w.fds` holds the
    // others in the same order.
    let mut kept = std::mem::take(&mut w.fds).into_iter();
    for p in handed {
        if is_connection(&p.name) {
            w.fds.push(p);
        } else {
            w.fds.extend(kept.next());
        }
    }
    w.fds.extend(kept);
    launch(&inst, &mut w)?;
    let info = w.info();
    inst.workloads.insert(name.to_owned(), w);
    Ok(info)
}

/// Runs `spec`'s health check against workload `name` and checks that its process is still
/// alive afterwards (a process that died after passing the check is not healthy). Returns
/// whether it is healthy and what was seen. A `notify` check waits (without polling) for
/// `READY=1` from the workload's current process.
pub fn check_health(shared: &Shared, name: &str, spec: &WorkloadSpec) -> (bool, String) {
    let outcome = match &spec.health {
        HealthCheck::Notify { timeout_ms } => {
            let t0 = Instant::now();
            let ready = readiness_of(shared, name)
                .is_some_and(|r| r.wait(Duration::from_millis(*timeout_ms)));
            notify_outcome(ready, t0, *timeout_ms)
        }
        check => crate::health::run(check),
    };
    health_verdict(shared, name, outcome)
}

/// [`check_health`] for the channel's runtime: a `notify` check is awaited on the calling
/// task (`READY=1` wakes it from the notify listener: one wake-up inside the blackout
/// instead of two through a blocking thread); a probe (TCP, HTTP, exec), which blocks,
/// runs on a blocking thread, which takes `spec` (hence by value: no copy of it).
pub async fn check_health_async(shared: &Shared, name: &str, spec: WorkloadSpec) -> (bool, String) {
    let HealthCheck::Notify { timeout_ms } = spec.health else {
        let (sh, n) = (Arc::clone(shared), name.to_owned());
        return tokio::task::spawn_blocking(move || check_health(&sh, &n, &spec))
            .await
            .unwrap_or_else(|e| (false, format!("health check panicked: {e}")));
    };
    let t0 = Instant::now();
    let ready = match readiness_of(shared, name) {
        Some(r) => r.wait_async(Duration::from_millis(timeout_ms)).await,
        None => false,
    };
    health_verdict(shared, name, notify_outcome(ready, t0, timeout_ms))
}

/// The readiness of workload `name`'s current process (`None`: not managed here).
fn readiness_of(shared: &Shared, name: &str) -> Option<Arc<Readiness>> {
    lock(shared)
        .workloads
        .get(name)
        .map(|w| Arc::clone(&w.readiness))
}

/// What a `notify` check saw: `ready` within `timeout_ms` of `t0`, or not.
fn notify_outcome(ready: bool, t0: Instant, timeout_ms: u64) -> crate::health::HealthOutcome {
    crate::health::HealthOutcome {
        healthy: ready,
        detail: if ready {
            format!("READY=1 after {} ms", t0.elapsed().as_millis())
        } else {
            format!("no READY=1 on the notify socket within {timeout_ms} ms")
        },
        elapsed_us: u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
        attempts: 1,
    }
}

/// The verdict on workload `name` from its check's `outcome`: healthy only if the check
/// passed and its process is still alive.
fn health_verdict(
    shared: &Shared,
    name: &str,
    outcome: crate::health::HealthOutcome,
) -> (bool, String) {
    let mut inst = lock(shared);
    let Some(w) = inst.workloads.get_mut(name) else {
        return (false, format!("{name} is not managed here"));
    };
    if !w.alive() {
        (
            false,
            format!(
                "its process is not running ({}; {})",
                w.exit.as_deref().unwrap_or("no process"),
                outcome.detail
            ),
        )
    } else if outcome.healthy {
        (true, outcome.detail)
    } else {
        (false, format!("health check failed: {}", outcome.detail))
    }
}

/// Creates the preserved descriptors a workload's first start needs: its memfds (sized,
/// sealable) and its bound listening sockets.
pub fn fresh_fds(spec: &WorkloadSpec) -> io::Result<Vec<PreservedFd>> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let mut out = Vec::new();
    for m in &spec.memfds {
        let fd = memfd_create(
            format!("mk:{}:{}", spec.name, m.name).as_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(io::Error::from)?;
        nix::unistd::ftruncate(&fd, i64::try_from(m.size).unwrap_or(i64::MAX))
            .map_err(io::Error::from)?;
        out.push(PreservedFd {
            name: m.name.clone(),
            fd,
        });
    }
    for l in &spec.listeners {
        let listener = std::net::TcpListener::bind(l.addr).map_err(|e| {
            io::Error::new(e.kind(), format!("binding {} for {}: {e}", l.addr, l.name))
        })?;
        out.push(PreservedFd {
            name: l.name.clone(),
            fd: OwnedFd::from(listener),
        });
    }
    Ok(out)
}

/// Serves one control request of the common protocol (every request but `LuoApply`,
/// which only the host agent of a LUO kernel serves, see [`crate::platform::luo`]).
pub fn handle_ctl(shared: &Shared, req: Request) -> (Response, Vec<OwnedFd>) {
    // Requests that wait (a graceful stop, a health check) run without the instance lock.
    match req {
        Request::Freeze { name } => return reply(freeze(shared, &name).map(|()| Response::Done)),
        Request::FreezeFds { name } => {
            if let Err(e) = freeze(shared, &name) {
                return reply::<Response>(Err(e));
            }
            let mut inst = lock(shared);
            return match fds_of(&mut inst, &name) {
                Ok(r) => r,
                Err(e) => {
                    // Not left frozen: the orchestrator takes an error for "not frozen".
                    let undone = thaw(&mut inst, &name);
                    reply::<Response>(Err(match undone {
                        Ok(()) => e,
                        Err(t) => SupervisorError::Undo {
                            error: Box::new(e),
                            undo: Box::new(t),
                        },
                    }))
                }
            };
        }
        Request::Health { name } => {
            let spec = lock(shared).workloads.get(&name).map(|w| w.spec.clone());
            return match spec {
                None => reply::<Response>(Err(SupervisorError::NotRunning(name))),
                Some(spec) => {
                    let (healthy, detail) = check_health(shared, &name, &spec);
                    (Response::Health { healthy, detail }, vec![])
                }
            };
        }
        _ => {}
    }
    let mut inst = lock(shared);
    let result: Result<(Response, Vec<OwnedFd>), SupervisorError> = (|| {
        match req {
            Request::Ping => {
                for w in inst.workloads.values_mut() {
                    w.alive();
                }
                Ok((
                    Response::Pong {
                        id: inst.id,
                        kernel_release: inst.kernel_release.clone(),
                        cpus: inst.cpus.clone(),
                        freezer: inst.freezer.describe().to_owned(),
                        workloads: inst.workloads.values().map(Running::info).collect(),
                    },
                    vec![],
                ))
            }
            Request::Workload { name } => {
                let w = get(&mut inst.workloads, &name)?;
                w.alive();
                Ok((Response::Workload(w.info()), vec![]))
            }
            Request::Start { spec } => {
                if inst.workloads.contains_key(&spec.name) {
                    return Err(SupervisorError::AlreadyRunning(spec.name.clone()));
                }
                let fds = fresh_fds(&spec).map_err(SupervisorError::PrepareFds)?;
                drop(inst);
                let info = admit(shared, &spec.name.clone(), &spec, fds, &[], false)?;
                Ok((Response::Started(info), vec![]))
            }
            Request::Thaw { name } => {
                thaw(&mut inst, &name)?;
                Ok((Response::Done, vec![]))
            }
            Request::Fds { name } => fds_of(&mut inst, &name),
            Request::Stop { name } => {
                stop(&mut inst, &name)?;
                Ok((Response::Done, vec![]))
            }
            Request::Cpus { cpus } => {
                pin_self(&cpus).map_err(|source| SupervisorError::Pin {
                    cpus: cpus.clone(),
                    source,
                })?;
                for w in inst.workloads.values() {
                    if let Some(p) = &w.process {
                        // A workload may have exited; the next ping reports that.
                        let _ = pin_pid(p.id(), &cpus);
                    }
                }
                inst.cpus = cpus;
                Ok((Response::Done, vec![]))
            }
            Request::Expect { upgrade_id } => {
                inst.expected_upgrade =
                    Some(upgrade_id.parse().map_err(SupervisorError::BadUpgradeId)?);
                Ok((Response::Done, vec![]))
            }
            Request::Halt => {
                drop_all_standbys(&mut inst);
                let names: Vec<String> = inst.workloads.keys().cloned().collect();
                for n in names {
                    stop(&mut inst, &n)?;
                }
                inst.halting = true;
                Ok((Response::Done, vec![]))
            }
            Request::Freeze { .. } | Request::FreezeFds { .. } | Request::Health { .. } => {
                unreachable!("served above without the lock")
            }
            Request::LuoApply { .. } => Err(SupervisorError::NotServedHere),
        }
    })();
    reply(result)
}

/// Thaws workload `name` (`Thaw`): or starts it again if its process is gone (stopped for
/// a restart-mode move, or it died while frozen).
fn thaw(inst: &mut Instance, name: &str) -> Result<(), SupervisorError> {
    let mut w = inst
        .workloads
        .remove(name)
        .ok_or_else(|| SupervisorError::NotRunning(name.to_owned()))?;
    let thawed = if w.process.is_none() {
        // launch thaws its group first.
        launch(inst, &mut w)
    } else {
        inst.freezer
            .thaw(name, w.pid)
            .map(|()| {
                w.frozen = false;
                w.take_back_connections();
            })
            .map_err(|source| SupervisorError::Freezer {
                op: "thawing",
                name: name.to_owned(),
                source,
            })
    };
    inst.workloads.insert(name.to_owned(), w);
    thawed
}

/// Duplicates of workload `name`'s preserved descriptors (`Fds`), with their names.
fn fds_of(inst: &mut Instance, name: &str) -> Result<(Response, Vec<OwnedFd>), SupervisorError> {
    let w = get(&mut inst.workloads, name)?;
    let mut names = Vec::new();
    let mut fds = Vec::new();
    for p in &w.fds {
        names.push(p.name.clone());
        fds.push(p.fd.try_clone().map_err(|source| SupervisorError::DupFd {
            name: p.name.clone(),
            source,
        })?);
    }
    Ok((Response::Fds { names }, fds))
}

fn reply<T: Into<(Response, Vec<OwnedFd>)>>(
    result: Result<T, SupervisorError>,
) -> (Response, Vec<OwnedFd>) {
    match result {
        Ok(r) => r.into(),
        Err(e) => (
            Response::Error {
                message: e.to_string(),
            },
            vec![],
        ),
    }
}

impl From<Response> for (Response, Vec<OwnedFd>) {
    fn from(r: Response) -> Self {
        (r, vec![])
    }
}

/// Freezes workload `name` for a move. Handover and socket-activation: `cgroup.freeze`
/// (SIGSTOP without cgroups). Restart: its process is asked to stop with its
/// `stop_signal`, given `stop_timeout_ms`, then killed with every process of its group;
/// returns once the group is empty (its ports closed, its files written), keeping its fd
/// store. The wait runs without the instance lock.
pub fn freeze(shared: &Shared, name: &str) -> Result<(), SupervisorError> {
    hand_off_connections(shared, name)?;
    let (process, spec) = {
        let mut inst = lock(shared);
        let inst = &mut *inst;
        let w = get(&mut inst.workloads, name)?;
        if w.spec.mode == Mode::Checkpoint {
            return checkpoint_now(inst, name);
        }
        if w.spec.mode != Mode::Restart {
            inst.freezer
                .freeze(name, w.pid)
                .map_err(|source| SupervisorError::Freezer {
                    op: "freezing",
                    name: name.to_owned(),
                    source,
                })?;
            w.frozen = true;
            return Ok(());
        }
        w.frozen = true;
        w.restart_at = None;
        (w.process.take(), w.spec.clone())
    };
    let Some(mut process) = process else {
        return Ok(());
    };
    let stopped = stop_gracefully(shared, &spec, &mut process);
    let mut inst = lock(shared);
    if let Some(w) = inst.workloads.get_mut(name) {
        w.exit = stopped.as_ref().ok().cloned();
    }
    stopped
        .map(|_| ())
        .map_err(|source| SupervisorError::Freezer {
            op: "stopping",
            name: name.to_owned(),
            source,
        })
}

/// Before the freeze of a workload with a `handoff_signal` (on an instance that hands
/// connections over): sends it the signal and waits, without the instance lock, up to its
/// `handoff_timeout_ms` for `MK_HANDOFF=1`, its established connections arriving in its fd
/// store meanwhile (`host::watch`). A workload that does not answer in time is frozen
/// anyway: the connections it kept end with it, as without a hand-over.
fn hand_off_connections(shared: &Shared, name: &str) -> Result<(), SupervisorError> {
    let (done, timeout, signal) = {
        let mut inst = lock(shared);
        let enabled = inst.connection_handoff;
        let w = get(&mut inst.workloads, name)?;
        let Some(signal) = w.spec.handoff_signal.filter(|_| enabled) else {
            return Ok(());
        };
        if w.frozen || w.handoff.is_some() || !w.alive() {
            return Ok(());
        }
        let Some(p) = &w.process else {
            return Ok(());
        };
        if !handles_signal(w.pid, signal.0) {
            // Its default action would end the process (SIGUSR2 terminates).
            tracing::warn!(workload = %name, signal = %signal.name(), pid = w.pid, "the workload neither catches nor blocks its handoff_signal: moving without a connection hand-over");
            return Ok(());
        }
        if let Err(e) = p.signal(signal.0) {
            tracing::warn!(workload = %name, error = %e, "sending the handoff_signal failed; moving without a connection hand-over");
            return Ok(());
        }
        let done = Arc::new(Readiness::default());
        w.handoff = Some(Arc::clone(&done));
        (
            done,
            Duration::from_millis(w.spec.handoff_timeout_ms),
            signal,
        )
    };
    let t0 = Instant::now();
    let handed = done.wait(timeout);
    let inst = lock(shared);
    let connections = inst
        .workloads
        .get(name)
        .map_or(0, |w| crate::model::connections_in(&w.fds));
    let waited_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
    if handed {
        tracing::info!(workload = %name, connections, waited_ms, "connections handed over");
    } else {
        tracing::warn!(workload = %name, connections, waited_ms, signal = %signal.name(), "no MK_HANDOFF=1 within handoff_timeout_ms: frozen anyway (connections it kept end with it)");
    }
    Ok(())
}

/// Whether process `pid` catches or blocks `signal` (`SigCgt`, `SigBlk` of
/// `/proc/PID/status`): sending a signal it does neither would run its default action.
pub(crate) fn handles_signal(pid: i32, signal: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let Some(bit) = u32::try_from(signal - 1).ok().filter(|b| *b < 64) else {
        return false;
    };
    status.lines().any(|l| {
        ["SigCgt:", "SigBlk:"].iter().any(|k| {
            l.strip_prefix(k)
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .is_some_and(|mask| mask & (1u64 << bit) != 0)
        })
    })
}

/// The freeze of a `mode = "checkpoint"` workload: CRIU dumps its process tree (stopping,
/// then killing it) into the packed images, kept as its preserved descriptor
/// [`checkpoint::IMAGES`]. On failure CRIU resumed the tree: nothing changed.
fn checkpoint_now(inst: &mut Instance, name: &str) -> Result<(), SupervisorError> {
    let scratch = inst.dir.join("criu").join(name);
    let w = get(&mut inst.workloads, name)?;
    let failed = |source| SupervisorError::Checkpoint {
        name: name.to_owned(),
        source,
    };
    let criu =
        checkpoint::criu_path().ok_or_else(|| failed(checkpoint::CheckpointError::NoCriu))?;
    if !w.alive() {
        return Err(SupervisorError::NotRunning(name.to_owned()));
    }
    let images = checkpoint::dump(&criu, w.pid, &scratch, name).map_err(failed)?;
    // CRIU killed the tree after the dump: collect it.
    if let Some(mut p) = w.process.take() {
        let _ = p.wait_timeout(Duration::from_secs(5));
    }
    w.fds.retain(|p| p.name != checkpoint::IMAGES);
    w.fds.push(PreservedFd {
        name: checkpoint::IMAGES.to_owned(),
        fd: images,
    });
    w.frozen = true;
    w.restart_at = None;
    w.exit = Some("checkpointed (CRIU dump)".into());
    Ok(())
}

/// `stop_signal`, up to `stop_timeout_ms` for the process to exit, then `SIGKILL` of its
/// whole group; waits until no process of the group is left. Returns how it ended.
fn stop_gracefully(
    shared: &Shared,
    spec: &WorkloadSpec,
    process: &mut Process,
) -> io::Result<String> {
    process.signal(spec.stop_signal.0)?;
    let timeout = Duration::from_millis(spec.stop_timeout_ms);
    let status = if let Some(s) = process.wait_timeout(timeout)? {
        describe_exit(s)
    } else {
        tracing::warn!(
            workload = %spec.name,
            timeout_ms = spec.stop_timeout_ms,
            "did not exit after {}: killed", spec.stop_signal.name()
        );
        process.kill()?;
        format!(
            "{} (killed after {} ms)",
            describe_exit(process.wait()?),
            spec.stop_timeout_ms
        )
    };
    // Children it left behind (a forked saver, a worker) die with the group.
    let group = lock(shared).freezer.group(&spec.name);
    if let Some(g) = group {
        empty_group(&g, Duration::from_millis(spec.stop_timeout_ms))?;
    }
    Ok(status)
}

/// Kills what is left in cgroup `g` (frozen or not) and waits (up to `patience`) until it
/// is empty. Returns whether anything was left.
pub(crate) fn empty_group(g: &std::path::Path, patience: Duration) -> io::Result<bool> {
    let populated = || {
        std::fs::read_to_string(g.join("cgroup.events"))
            .is_ok_and(|e| e.lines().any(|l| l == "populated 1"))
    };
    if !populated() {
        return Ok(false);
    }
    let _ = std::fs::write(g.join("cgroup.kill"), "1");
    let deadline = Instant::now() + patience;
    while populated() {
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "{} still holds processes after cgroup.kill",
                g.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(true)
}

fn get<'a>(
    workloads: &'a mut BTreeMap<String, Running>,
    name: &str,
) -> Result<&'a mut Running, SupervisorError> {
    workloads
        .get_mut(name)
        .ok_or_else(|| SupervisorError::NotRunning(name.to_owned()))
}

/// Stops a workload: kills its processes, reaps it, drops its preserved fds and group.
pub fn stop(inst: &mut Instance, name: &str) -> Result<(), SupervisorError> {
    let mut w = inst
        .workloads
        .remove(name)
        .ok_or_else(|| SupervisorError::NotRunning(name.to_owned()))?;
    let killing = |source| SupervisorError::Freezer {
        op: "killing",
        name: name.to_owned(),
        source,
    };
    match w.process.as_mut() {
        // Its pid is not reused while the process is unreaped: a kill by pid is safe.
        Some(p) => {
            inst.freezer.kill(name, w.pid).map_err(killing)?;
            // A frozen group dies on cgroup.kill; a SIGSTOPped process dies on SIGKILL.
            p.kill_and_reap();
        }
        None => {
            if let Some(g) = inst.freezer.group(name) {
                empty_group(&g, Duration::from_secs(5)).map_err(killing)?;
            }
        }
    }
    inst.freezer.remove(name);
    if let Some(dir) = &inst.records {
        super::adopt::remove_record(dir, name);
    }
    Ok(())
}

/// Stops workload `name` if it is a received copy not yet committed (a move that was
/// aborted, or whose channel closed), logging `why`. With a `handoff_signal`, the copy first
/// hands its connections over ([`hand_off_connections`]): it stops reading them at a
/// request boundary, so the old copy, thawed next, takes them up with no request lost.
pub fn stop_uncommitted(shared: &Shared, name: &str, why: &str) {
    {
        let mut inst = lock(shared);
        drop_standby(&mut inst, name);
        if !inst.workloads.get(name).is_some_and(|w| w.pending_commit) {
            return;
        }
    }
    let _ = hand_off_connections(shared, name);
    let mut inst = lock(shared);
    if inst.workloads.get(name).is_some_and(|w| w.pending_commit) {
        tracing::warn!(workload = %name, %why, "stopping the received copy");
        let _ = stop(&mut inst, name);
    }
}

/// A control-request handler: the request, the fds attached to it; the response and the
/// fds to attach to it.
pub type CtlHandler =
    dyn Fn(&Shared, Request, Vec<OwnedFd>) -> (Response, Vec<OwnedFd>) + Send + Sync;

/// The handler of an emulated instance: [`handle_ctl`]; attached fds are ignored.
pub fn emulated_handler(
    shared: &Shared,
    req: Request,
    _fds: Vec<OwnedFd>,
) -> (Response, Vec<OwnedFd>) {
    handle_ctl(shared, req)
}

fn serve_ctl(shared: &Shared, stream: &UnixStream, handler: &CtlHandler) {
    while let Ok(Some((body, in_fds))) = fdpass::recv(stream) {
        // Only the connection that carried the Halt ends the process, after answering it:
        // another connection's thread that notices `halting` could otherwise exit before the
        // Halt's answer is sent (seen under load as "supervisor closed the control socket
        // without answering").
        let mut halt = false;
        let (resp, fds) = match serde_json::from_slice::<Request>(&body) {
            Ok(req) => {
                halt = matches!(req, Request::Halt);
                handler(shared, req, in_fds)
            }
            Err(e) => (
                Response::Error {
                    message: format!("{}: {e}", super::ctl::MALFORMED_REQUEST),
                },
                vec![],
            ),
        };
        let body = serde_json::to_vec(&resp).unwrap_or_default();
        if fdpass::send(stream, &body, &fdpass::borrow_all(&fds)).is_err() {
            return;
        }
        if halt && lock(shared).halting {
            halt_now(shared);
        }
    }
}

fn halt_now(shared: &Shared) -> ! {
    let inst = lock(shared);
    let _ = std::fs::remove_file(inst.dir.join("ctl.sock"));
    let _ = std::fs::remove_file(inst.dir.join("chan.sock"));
    inst.freezer.remove_base();
    tracing::info!(id = inst.id, "instance halted");
    std::process::exit(0);
}

/// Serves control connections on `ctl` (one thread each) with `handler`, until the
/// listener fails; a `Halt` ends the process (see [`handle_ctl`]).
pub fn serve_ctl_listener(shared: &Shared, ctl: &UnixListener, handler: &Arc<CtlHandler>) {
    let gate = super::peer::Gate::new(super::peer::MAX_CONTROL_CONNECTIONS);
    for conn in ctl.incoming().flatten() {
        // Only root or the agent's own user, and at most a few at once (host::peer).
        let Some(ticket) = super::peer::admit(&gate, &conn, "ctl.sock") else {
            continue;
        };
        let shared = Arc::clone(shared);
        let handler = Arc::clone(handler);
        std::thread::spawn(move || {
            serve_ctl(&shared, &conn, handler.as_ref());
            drop(ticket);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_counts_as_handled_only_when_caught_or_blocked() {
        let spawn = |script: &str| {
            std::process::Command::new("bash")
                .args(["-c", script])
                .spawn()
                .unwrap()
        };
        let mut plain = spawn("while :; do sleep 0.05; done");
        let mut trapping = spawn("trap 'echo usr2' USR2; while :; do sleep 0.05; done");
        // bash installs its trap after start-up: wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = |c: &std::process::Child| i32::try_from(c.id()).unwrap();
        while !handles_signal(pid(&trapping), libc::SIGUSR2) {
            assert!(Instant::now() < deadline, "the trap never showed in SigCgt");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!handles_signal(pid(&plain), libc::SIGUSR2));
        assert!(!handles_signal(pid(&trapping), libc::SIGUSR1));
        assert!(!handles_signal(-1, libc::SIGUSR2), "no such process");
        assert!(!handles_signal(pid(&trapping), 0), "no such signal");
        for c in [&mut plain, &mut trapping] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(is_connection("connection-12") && !is_connection("connection-x"));
    }

    /// A shell workload that, as a standby copy, says READY on `MK_STANDBY_FD` and then
    /// (with `close`) shuts its end, so that handing it the descriptors fails; either way
    /// it then runs `sleep`.
    fn standby_spec(close: bool) -> WorkloadSpec {
        let mut s = WorkloadSpec::new("sb", "/bin/sh");
        let shut = if close {
            "eval \"exec $MK_STANDBY_FD>&-\""
        } else {
            ":"
        };
        s.args = vec![
            "-c".into(),
            format!(
                "if [ -n \"$MK_STANDBY_FD\" ]; then printf READY >&$MK_STANDBY_FD; {shut}; fi; \
                 exec sleep 1000"
            ),
        ];
        s.memfds = vec![crate::workload::MemfdSpec {
            name: "data".into(),
            size: 4096,
        }];
        s
    }

    /// An instance with a standby copy of [`standby_spec`]`(close)` waiting: it, the spec
    /// and the copy's pid.
    fn waiting_standby(records: &std::path::Path, close: bool) -> (Shared, WorkloadSpec, i32) {
        let shared = test_instance(records);
        let s = standby_spec(close);
        start_standby(&shared, &s, &[], Duration::from_secs(10)).unwrap();
        let pid = i32::try_from(lock(&shared).standbys["sb"].process.id()).unwrap();
        (shared, s, pid)
    }

    /// The fds a move hands over: the declared memfd and a handed-over connection.
    fn moved_fds(s: &WorkloadSpec) -> Vec<PreservedFd> {
        let mut fds = fresh_fds(s).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        fds.push(PreservedFd {
            name: "connection-1".into(),
            fd: a.into(),
        });
        fds
    }

    fn comm(pid: i32) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// Waits until `pid` runs `sleep` (past its standby steps).
    fn wait_sleeping(pid: i32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while comm(pid) != "sleep" {
            assert!(Instant::now() < deadline, "pid {pid} never reached sleep");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_standby_copy_runs_the_workload_registered_and_recorded_with_its_connections_handed() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, s, sb_pid) = waiting_standby(dir.path(), false);
        let fds = moved_fds(&s);
        let ino = |fd: BorrowedFd<'_>| nix::sys::stat::fstat(fd).unwrap().st_ino;
        let sent: Vec<u64> = fds.iter().map(|p| ino(p.fd.as_fd())).collect();
        let info = admit(&shared, "sb", &s, fds, &[], true).unwrap();
        assert_eq!(info.pid, sb_pid, "the standby copy took the workload");
        {
            let inst = lock(&shared);
            assert!(inst.standbys.is_empty());
            let w = &inst.workloads["sb"];
            assert_eq!(w.pid, sb_pid);
            // The connection went to the copy; the memfd stays for a later start.
            let names: Vec<&str> = w.fds.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, ["data"]);
            // What the copy got, read from its end of the socket (MK_STANDBY_FD=3): one
            // packet naming both descriptors in the workload's order, with those very
            // objects attached.
            let end = w.process.as_ref().unwrap().take_fd(3).unwrap();
            let mut buf = [0u8; 64];
            let got = fdpass::recv_datagram(end.as_fd(), &mut buf, 4).unwrap();
            assert_eq!(&buf[..got.len], b"data,connection-1");
            let inos: Vec<u64> = got.fds.iter().map(|f| ino(f.as_fd())).collect();
            assert_eq!(inos, sent);
        }
        // Its adoption record names the copy and the memfd only.
        let rec =
            super::super::adopt::read_record(&super::super::adopt::record_path(dir.path(), "sb"))
                .unwrap()
                .expect("a record");
        assert_eq!(rec.pid, sb_pid);
        let names: Vec<&str> = rec.fds.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["data"]);
        let mut inst = lock(&shared);
        if let Some(p) = inst
            .workloads
            .get_mut("sb")
            .and_then(|w| w.process.as_mut())
        {
            p.kill_and_reap();
        }
    }

    #[test]
    fn a_standby_copy_that_cannot_take_the_descriptors_is_replaced_by_a_new_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, s, sb_pid) = waiting_standby(dir.path(), true);
        // Its end of the socket is shut once it sleeps; it is alive and started from the
        // same spec, so it is taken, and only the send can fail.
        wait_sleeping(sb_pid);
        {
            let inst = lock(&shared);
            let sb = &inst.standbys["sb"];
            assert!(sb.spec == s && sb.extra_args.is_empty());
        }
        // An fd-store entry after the connection: the order must survive the fallback.
        let mut fds = moved_fds(&s);
        fds.push(PreservedFd {
            name: "extra".into(),
            fd: fresh_fds(&s).unwrap().remove(0).fd,
        });
        let info = admit(&shared, "sb", &s, fds, &[], true).unwrap();
        assert_ne!(info.pid, sb_pid, "a new copy runs the workload");
        assert!(
            !std::path::Path::new(&format!("/proc/{sb_pid}")).exists(),
            "the standby copy was killed and reaped"
        );
        let mut inst = lock(&shared);
        let w = inst.workloads.get_mut("sb").unwrap();
        assert_eq!(w.pid, info.pid);
        assert!(w.alive());
        wait_sleeping(w.pid);
        // The new copy was started with the connection the standby never got, in its
        // place (the fd names are in its environment, in order), and owns it from then on.
        let environ = std::fs::read(format!("/proc/{}/environ", w.pid)).unwrap();
        let var = format!("{}=", state_serializers::fdenv::ENV_VAR);
        let env = environ
            .split(|b| *b == 0)
            .map(String::from_utf8_lossy)
            .find(|v| v.starts_with(&var))
            .unwrap_or_else(|| panic!("no {var} in the new copy's environment"))
            .into_owned();
        let at = |n: &str| env.find(n).unwrap_or_else(|| panic!("no {n} in {env}"));
        assert!(
            at("data") < at("connection-1") && at("connection-1") < at("extra"),
            "{env}"
        );
        let names: Vec<&str> = w.fds.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["data", "extra"]);
        if let Some(p) = w.process.as_mut() {
            p.kill_and_reap();
        }
    }

    const FD_LIMIT_CHILD_ENV: &str = "MK_TEST_FD_LIMIT_CHILD";

    /// The body of [`a_standby_copy_is_killed_when_its_descriptors_cannot_be_duplicated`],
    /// which runs it alone in a process of its own (the descriptor limit is process-wide)
    /// with `--ignored`.
    #[test]
    #[ignore = "the child process of a_standby_copy_is_killed_when_its_descriptors_cannot_be_duplicated"]
    fn fd_limit_child() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let Some(dir) = std::env::var_os(FD_LIMIT_CHILD_ENV) else {
            return;
        };
        let (shared, s, sb_pid) = waiting_standby(std::path::Path::new(&dir), false);
        let fds = moved_fds(&s);
        // From here no descriptor can be created: the lowest free number is the limit.
        let lowest_free =
            std::os::fd::AsRawFd::as_raw_fd(&std::fs::File::open("/dev/null").unwrap());
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(
            Resource::RLIMIT_NOFILE,
            u64::try_from(lowest_free).unwrap(),
            hard,
        )
        .unwrap();
        let got = admit(&shared, "sb", &s, fds, &[], true);
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
        let gone = !std::path::Path::new(&format!("/proc/{sb_pid}")).exists();
        let inst = lock(&shared);
        println!(
            "RESULT error={} standby_gone={gone} standbys={} workloads={}",
            got.as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default(),
            inst.standbys.len(),
            inst.workloads.len()
        );
    }

    /// Duplicating the descriptors for a standby copy fails (here: the process is at its
    /// descriptor limit, so starting a copy the usual way fails too): the standby copy is
    /// killed and reaped, not left running beside whatever the move does next.
    #[test]
    fn a_standby_copy_is_killed_when_its_descriptors_cannot_be_duplicated() {
        let dir = tempfile::tempdir().unwrap();
        let line = mk_test_support::run_alone(
            "host::supervisor::tests::fd_limit_child",
            FD_LIMIT_CHILD_ENV,
            dir.path(),
            "RESULT",
        );
        assert!(line.contains("standby_gone=true"), "{line}");
        assert!(line.contains("standbys=0 workloads=0"), "{line}");
        assert!(
            line.contains("error=") && !line.contains("error= "),
            "admit failed (no descriptor for a new copy either): {line}"
        );
    }
}
