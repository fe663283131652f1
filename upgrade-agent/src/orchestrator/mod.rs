//! The orchestrator: the one journaled state machine over [`Platform`], for every platform.
//!
//! Side by side (emulated multikernel, multikernel): the new kernel boots beside the old
//! one and workloads move one at a time over the channel.
//!
//! ```text
//!  Verified ─▶ (ShrunkOld) ─▶ InstanceCreated ─▶ KernelLoaded ─▶ Booted ─▶ Migrating ─▶ HandingOver ─▶ Done
//!                                                                   │  per workload:           (upgraded)
//!                                                                   │  Freezing ▶ Offered ▶ Committing ▶ Committed
//!                                                                   ▼  any check/health failure
//!                                                              RollingBack ─▶ Done (rolled back)
//! ```
//!
//! Replace (LUO): the kernel is loaded first (before any freeze: loading is slow and
//! belongs to no workload), then every workload is frozen and staged (preserved), then
//! the kernel is booted, which replaces this one (the `KernelLoaded` step is journaled
//! after the staging, as before); the record travels with the preserved state
//! and the next kernel's agent carries on from it ([`recover`] → [`plan::Plan::ClaimForward`]):
//!
//! ```text
//!  Verified ─▶ InstanceCreated ─▶ Migrating (stage each: Freezing ▶ Offered) ─▶ KernelLoaded ─▶ Booted ══ kexec ══▶
//!      ══▶ claim each (Committed) ─▶ HandingOver ─▶ Done (upgraded)
//!      ══▶ a claim fails ─▶ RollingBack ══ kexec back ══▶ claim each (MovedBack) ─▶ Done (rolled back)
//! ```
//!
//! Every transition is written to the journal *before* the step it names, so a crash at any
//! point leaves a record from which [`recover`] converges (decided by the pure
//! [`plan`](plan::plan)): to fully new if every workload had moved, else to fully old.
//! Ownership rule that makes this safe side by side: a workload's old copy is stopped only
//! after the new instance accepted `Commit`, and a received copy that was never committed
//! is stopped by the receiver as soon as its channel drops, so two live copies never serve.
//!
//! The state machine does no I/O of its own but the journal: the platform does the kernel
//! side, [`Env`] gives the clock, randomness and task-state capture.

pub mod ops;
pub mod plan;
mod recovery;
mod replace;

pub use recovery::{abandon, recover};

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kho_proto::channel::UpgradeId;
use kho_proto::keys::NodeKey;
use rollback::Journal;

use crate::fault::Faults;
use crate::handover::{self, SendFaults};
use crate::platform::{
    Delivered, InstanceId, InstanceInfo, InstanceState, LoadableKernel, Platform, PlatformError,
    PreservedFd, Resources,
};
use crate::record::{Event, MoveStatus, Outcome, Phase, UpgradeKind, UpgradeRecord, WorkloadMove};
use crate::workload::{Transfer, WorkloadFile};

/// What the state machine needs from the outside world besides the platform: time,
/// randomness and the capture of a process's task state. Injected so that the state
/// machine runs in unit tests without processes.
pub trait Env {
    /// Milliseconds since the epoch (the record's `started_at`, and the time base of a
    /// record that crossed a process or a kexec).
    fn wall_ms(&self) -> u64;
    /// A monotonic instant.
    fn now(&self) -> Instant;
    /// A fresh random upgrade id.
    fn random_id(&self) -> [u8; 16];
    /// This boot's id (`/proc/sys/kernel/random/boot_id`), if it can be read.
    fn boot_id(&self) -> Option<String> {
        None
    }
    /// The task state of process `pid` (read from `/proc`).
    fn capture_task(
        &self,
        pid: i32,
    ) -> Result<state_serializers::task::TaskState, state_serializers::StateError>;
}

/// The real environment: system clock, the OS random source, `/proc` under `proc_root`.
#[derive(Debug, Clone)]
pub struct SystemEnv {
    /// The root under which `proc/` is read (`/` on a live system).
    pub proc_root: PathBuf,
}

impl Default for SystemEnv {
    fn default() -> Self {
        SystemEnv {
            proc_root: PathBuf::from("/"),
        }
    }
}

impl Env for SystemEnv {
    fn wall_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn random_id(&self) -> [u8; 16] {
        let mut id = [0u8; 16];
        // A failure of the OS random source leaves zeroes only in a sandbox without
        // getrandom; ids then still differ by time.
        if getrandom::fill(&mut id).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            id = t.to_le_bytes();
        }
        id
    }

    fn boot_id(&self) -> Option<String> {
        crate::sys::boot_id_at(&self.proc_root)
    }

    fn capture_task(
        &self,
        pid: i32,
    ) -> Result<state_serializers::task::TaskState, state_serializers::StateError> {
        state_serializers::task::capture_tasks(
            &self.proc_root,
            &[pid],
            &state_serializers::task::CaptureOptions::default(),
        )
    }
}

/// Progress notifications (the CLI draws them; tests ignore them).
pub trait Observer {
    /// A phase or step began.
    fn step(&self, _phase: Phase, _what: &str) {}
    /// A workload changed status.
    fn workload(&self, _name: &str, _status: MoveStatus, _detail: Option<&str>) {}
}

/// The kebab-case name of a phase or move status (as in the journal).
fn kebab<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;
impl Observer for Quiet {}

/// Why an upgrade did not end upgraded.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Rolled back: the old kernel serves everything.
    #[error("upgrade rolled back: {reason}")]
    RolledBack { reason: String },
    /// Neither fully old nor fully new could be reached by itself.
    #[error("upgrade failed and needs an operator: {0}")]
    Failed(String),
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("journal: {0}")]
    Journal(#[from] rollback::JournalError),
    /// Refused before anything changed.
    #[error("{0}")]
    Refused(String),
    #[error("kernel slots: {0}")]
    Slots(#[from] rollback::SlotError),
}

/// Which instance of a side-by-side upgrade died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Death {
    /// The old instance; the new one runs.
    Old { new: InstanceId },
    /// The new instance (it had been booted); the old one runs.
    New { new: InstanceId },
    /// The old instance, and no new one runs.
    Only,
}

/// Kernel slots to update when the upgrade ends upgraded (a journaled step): the candidate
/// becomes current (apply) or current and previous swap (rollback), and the image's version
/// floor is raised.
#[derive(Debug)]
pub struct Promotion {
    pub slots: rollback::Slots,
    /// The verified manifest's version floor, raised on success.
    pub floor: Option<String>,
}

/// What an upgrade needs besides the platform.
pub struct Setup<'a> {
    pub journal: Journal<UpgradeRecord>,
    pub specs: WorkloadFile,
    pub node_key: NodeKey,
    pub faults: Faults,
    pub observer: &'a dyn Observer,
    pub env: &'a dyn Env,
    /// Slots to promote on success (none: the platform keeps its kernels itself).
    pub promotion: Option<Promotion>,
    /// The event log every step, move and result is appended to (none: not kept).
    pub events: Option<crate::events::EventLog>,
    /// The Prometheus metrics rewritten at every result (none: not kept).
    pub metrics: Option<crate::metrics::Metrics>,
}

impl std::fmt::Debug for Setup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup")
            .field("faults", &self.faults)
            .field("promotion", &self.promotion)
            .finish_non_exhaustive()
    }
}

/// One running upgrade.
pub struct Orchestrator<'a> {
    platform: &'a mut dyn Platform,
    setup: Setup<'a>,
    /// The journal record (public for reports).
    pub record: UpgradeRecord,
    started: Instant,
    /// Event time (ms since the upgrade started) at `started`: a resumed record's events go
    /// on from where the previous process or kernel left them.
    t_base_ms: u64,
    writes: u32,
    upgrade_id: UpgradeId,
    faults_left: Faults,
    /// Event-log lines produced while a workload is frozen: written (an fsync at each `phase`
    /// line among them, `events::syncs`) when its move has ended, not inside the blackout.
    /// `None`: written at once.
    held_events: Option<Vec<crate::events::EventLine>>,
}

impl std::fmt::Debug for Orchestrator<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// The single active instance and its info (the "running kernel").
pub fn current_instance(platform: &mut dyn Platform) -> Result<InstanceInfo, UpgradeError> {
    let active: Vec<InstanceInfo> = platform
        .instances()?
        .into_iter()
        .filter(|i| i.state == InstanceState::Active)
        .collect();
    match active.len() {
        1 => Ok(active.into_iter().next().expect("one element")),
        0 => Err(UpgradeError::Refused(
            "no active instance: nothing runs yet (emulated platform: `mk-upgrade emu init`)"
                .into(),
        )),
        n => Err(UpgradeError::Refused(format!(
            "{n} active instances: an upgrade is in progress or was interrupted; run `mk-upgrade recover`"
        ))),
    }
}

/// Why a workload cannot move as declared (the upgrade is refused before anything changes): one whose
/// process is not running (a dead service cannot be "upgraded"), or one in a mode that
/// hands listening sockets over (handover, socket-activation) holding a listening or
/// bound socket the workload file does not declare (its new copy could not bind that
/// address while the frozen old copy holds it; declare it in `[[workload.listen]]` or use
/// mode "restart").
pub fn unmovable(
    specs: &crate::workload::WorkloadFile,
    env: &dyn Env,
    on: InstanceId,
    w: &crate::model::WorkloadInfo,
) -> Option<String> {
    use crate::model::WorkloadState;
    use crate::workload::Mode;
    if w.state != WorkloadState::Running {
        return Some(format!(
            "workload {} is {} on instance {on}{}: only running, healthy workloads are moved; \
             see `mk-upgrade status`, fix it and let it restart (restart = \"on-failure\") \
             before upgrading",
            w.name,
            w.state.as_str(),
            w.exit
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        ));
    }
    let spec = specs.get(&w.name)?;
    if !matches!(spec.mode, Mode::Handover | Mode::SocketActivation) {
        return None;
    }
    let task = match capture_retrying(env, w.pid, 5) {
        Ok(t) => t,
        Err(e) => {
            return Some(format!(
                "workload {}: capturing its process (pid {}) to check its sockets: {e}",
                w.name, w.pid
            ));
        }
    };
    let declared: Vec<String> = spec.listeners.iter().map(|l| l.addr.to_string()).collect();
    for t in &task.tasks {
        for f in &t.fds {
            if let state_serializers::task::FdKind::ListeningSocket { proto, address } = &f.kind
                && !declared.contains(address)
            {
                return Some(format!(
                    "workload {} (mode \"{}\") holds a listening socket it was not given: {proto:?} \
                     {address} (pid {}, fd {}); its new copy could not bind it while the frozen old \
                     copy holds it. Declare it in [[workload.listen]] so it is handed over, or \
                     use mode = \"restart\"",
                    w.name, spec.mode, t.pid, f.fd
                ));
            }
        }
    }
    None
}

/// Captures the task state of `pid`, up to `attempts` times: a busy service opens and closes
/// descriptors all the time (one per connection), and a capture that saw one change fails.
fn capture_retrying(
    env: &dyn Env,
    pid: i32,
    attempts: u32,
) -> Result<state_serializers::task::TaskState, state_serializers::StateError> {
    let mut result = env.capture_task(pid);
    for _ in 1..attempts {
        if result.is_ok() {
            break;
        }
        result = env.capture_task(pid);
    }
    result
}

/// How long a target may take to verify a delivered workload and start it (digests of a
/// large state included).
pub const MOVE_VERIFY_ALLOWANCE: Duration = Duration::from_secs(120);

/// The deadline of one move, from its delivery: verification and start, plus the
/// workload's own health-check timeout. Past it the move is aborted and the workload thawed
/// on the old instance (its blackout is bounded by this).
pub fn move_deadline(spec: &crate::workload::WorkloadSpec) -> Duration {
    MOVE_VERIFY_ALLOWANCE + Duration::from_millis(spec.health.timeout_ms().unwrap_or(0))
}

/// A handover image built before the freeze ([`Orchestrator::prebuild`]), with the
/// journal generation it names and the state of the descriptors it describes.
struct Prebuilt {
    out: handover::Outgoing,
    generation: u64,
    states: FdStates,
    /// The target verified the image before the freeze ([`Platform::stage`]).
    staged: bool,
}

/// What an image built by identity records of a move's descriptors, per fd: its name,
/// device, inode and size, a memfd's seals, whether a socket is connected. Two snapshots
/// are equal when the descriptors are the very objects, in the same order and state, as
/// far as such an image can tell. `None` when an fd cannot be examined.
type FdStates = Vec<(String, u64, u64, i64, Option<u32>, bool)>;

fn fd_states(fds: &[PreservedFd]) -> Option<FdStates> {
    use std::os::fd::AsFd;
    fds.iter()
        .map(|p| {
            let fd = p.fd.as_fd();
            let st = nix::sys::stat::fstat(fd).ok()?;
            Some((
                p.name.clone(),
                st.st_dev,
                st.st_ino,
                st.st_size,
                state_serializers::sys::get_seals(fd).ok(),
                crate::model::is_connected_stream(fd),
            ))
        })
        .collect()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl<'a> Orchestrator<'a> {
    /// Starts an upgrade record (phase `Verified`) for moving every workload of the current
    /// instance to `kernel_after`.
    pub fn begin(
        platform: &'a mut dyn Platform,
        setup: Setup<'a>,
        kind: UpgradeKind,
        kernel_after: &str,
        image_sha256: [u8; 32],
    ) -> Result<Self, UpgradeError> {
        let caps = platform.probe()?;
        let current = current_instance(platform)?;
        let mut names = Vec::new();
        for w in &current.workloads {
            if setup.specs.get(&w.name).is_none() {
                return Err(UpgradeError::Refused(format!(
                    "workload {} runs on instance {} but is not in the workload file; add it or stop it",
                    w.name, current.id
                )));
            }
            if let Some(why) = unmovable(&setup.specs, setup.env, current.id, w) {
                return Err(UpgradeError::Refused(why));
            }
            names.push(w.name.clone());
        }
        // Move in workload-file order, so operators can put the least critical first.
        names.sort_by_key(|n| setup.specs.workloads.iter().position(|s| &s.name == n));
        let id = setup.env.random_id();
        let record = UpgradeRecord {
            upgrade_id: hex::encode(id),
            kind,
            platform: caps.kind,
            started_at: setup.env.wall_ms() / 1000,
            kernel_before: current.kernel_release.clone().unwrap_or_default(),
            kernel_after: kernel_after.to_owned(),
            image_sha256: hex::encode(image_sha256),
            old_instance: current.id,
            old_resources: current.resources.clone(),
            new_instance: None,
            phase: Phase::Verified,
            workloads: names
                .into_iter()
                .map(|name| {
                    let mode = setup.specs.get(&name).map(|s| s.mode).unwrap_or_default();
                    WorkloadMove::pending(name, mode)
                })
                .collect(),
            events: Vec::new(),
            outcome: None,
            error: None,
            recovered: false,
            version_floor: setup.promotion.as_ref().and_then(|p| p.floor.clone()),
            boot_id: setup.env.boot_id(),
        };
        let mut o = Self::with_record(platform, setup, record)?;
        o.t_base_ms = 0;
        o.step(
            Phase::Verified,
            "image verified; upgrade journaled".to_owned(),
        )?;
        Ok(o)
    }

    /// An orchestrator over an existing record (recovery, or a kexec's second half).
    fn with_record(
        platform: &'a mut dyn Platform,
        setup: Setup<'a>,
        record: UpgradeRecord,
    ) -> Result<Self, UpgradeError> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(&record.upgrade_id, &mut id).map_err(|_| {
            UpgradeError::Failed(format!(
                "journal has a bad upgrade id {:?}",
                record.upgrade_id
            ))
        })?;
        let upgrade_id = UpgradeId(id);
        platform.set_upgrade(upgrade_id);
        let started = setup.env.now();
        let last = record.events.last().map_or(0, |e| e.t_ms);
        let wall = setup
            .env
            .wall_ms()
            .saturating_sub(record.started_at.saturating_mul(1000));
        let t_base_ms = last.max(wall);
        let faults_left = setup.faults.effective();
        Ok(Orchestrator {
            platform,
            setup,
            record,
            started,
            t_base_ms,
            writes: 0,
            upgrade_id,
            faults_left,
            held_events: None,
        })
    }

    /// How many journal writes this orchestrator made.
    pub fn journal_writes(&self) -> u32 {
        self.writes
    }

    /// Event time: ms since the upgrade started.
    fn elapsed_ms(&self) -> u64 {
        self.t_base_ms.saturating_add(ms(self
            .setup
            .env
            .now()
            .saturating_duration_since(self.started)))
    }

    /// Journals `what` as a step of `phase` (before doing it).
    /// Appends to the event log, if one is kept.
    fn event(&mut self, kind: &str, what: &str, fill: impl FnOnce(&mut crate::events::EventLine)) {
        if let Some(log) = &self.setup.events {
            let mut e = crate::events::EventLine::now(&self.record.upgrade_id, kind, what);
            fill(&mut e);
            match &mut self.held_events {
                Some(held) => held.push(e),
                None => log.record(&e),
            }
        }
    }

    /// From now on, event-log lines wait in memory (a workload is about to be frozen: an
    /// fsync per line inside its blackout would lengthen it).
    fn hold_events(&mut self) {
        self.held_events.get_or_insert_with(Vec::new);
    }

    /// Writes the lines held since [`Self::hold_events`], in order, and writes new ones at
    /// once again.
    fn release_events(&mut self) {
        if let (Some(held), Some(log)) = (self.held_events.take(), &self.setup.events) {
            for e in &held {
                log.record(e);
            }
        }
    }

    fn step(&mut self, phase: Phase, what: String) -> Result<(), UpgradeError> {
        self.record.phase = phase;
        let t_ms = self.elapsed_ms();
        tracing::info!(upgrade = %self.record.upgrade_id, ?phase, "{what}");
        self.setup.observer.step(phase, &what);
        self.event("phase", &what, |e| e.phase = Some(kebab(&phase)));
        self.record.events.push(Event {
            t_ms,
            what,
            journaled: Some(phase),
        });
        self.setup.journal.write(&self.record)?;
        self.writes += 1;
        if self.faults_left.crash_after_write == Some(self.writes) {
            // Test-only (fault-injection builds): die exactly here, as kill -9 would.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        Ok(())
    }

    /// Records an event without a journal write (it is written with the next step).
    fn note(&mut self, what: String) {
        let t_ms = self.elapsed_ms();
        self.setup.observer.step(self.record.phase, &what);
        let phase = self.record.phase;
        self.event("note", &what, |e| e.phase = Some(kebab(&phase)));
        self.record.events.push(Event {
            t_ms,
            what,
            journaled: None,
        });
    }

    fn set_status(&mut self, name: &str, status: MoveStatus, detail: Option<String>) {
        self.setup
            .observer
            .workload(name, status, detail.as_deref());
        tracing::info!(
            upgrade = %self.record.upgrade_id,
            workload = name,
            status = %kebab(&status),
            "{}",
            detail.as_deref().unwrap_or("")
        );
        self.event("workload", detail.as_deref().unwrap_or(""), |e| {
            e.workload = Some(name.to_owned());
            e.status = Some(kebab(&status));
        });
        if let Some(w) = self.record.workload_mut(name) {
            w.status = status;
            if detail.is_some() {
                w.detail = detail;
            }
        }
    }

    fn finish(&mut self, outcome: Outcome, error: Option<String>) -> Result<(), UpgradeError> {
        self.record.outcome = Some(outcome);
        self.record.error = error;
        self.record.phase = Phase::Done;
        let t_ms = self.elapsed_ms();
        let what = format!("finished: {outcome:?}");
        self.setup.observer.step(Phase::Done, &what);
        let result = self.record.report_json()["result"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        let detail = self.record.error.clone().unwrap_or_default();
        tracing::info!(upgrade = %self.record.upgrade_id, result = %result, "finished: {detail}");
        self.event("result", &detail, |e| e.result = Some(result));
        self.record.events.push(Event {
            t_ms,
            what,
            journaled: None,
        });
        self.setup.journal.finish(&self.record)?;
        if let Some(m) = &self.setup.metrics {
            m.record(&self.record);
        }
        Ok(())
    }

    fn names(&self) -> Vec<String> {
        self.record
            .workloads
            .iter()
            .map(|w| w.name.clone())
            .collect()
    }

    /// Moves one workload from `from` to `to`: capture, freeze, build the hand-over and
    /// deliver it. Side by side, the copy on `to` is healthy and committed when this
    /// returns `Ok(Some(blackout_us))`; replace, it is staged (`Ok(None)`) and the old copy
    /// stays frozen. On failure the workload runs (thawed) on `from` again and nothing of it
    /// remains on `to`.
    fn move_workload(
        &mut self,
        from: InstanceId,
        to: InstanceId,
        name: &str,
        phase: Phase,
    ) -> Result<Option<u64>, PlatformError> {
        let mut spec =
            self.setup
                .specs
                .get(name)
                .cloned()
                .ok_or_else(|| PlatformError::NoSuchWorkload {
                    instance: from,
                    workload: name.to_owned(),
                })?;
        // Task state is captured before the freeze, outside the blackout: it describes the
        // process (exe, args, env, limits, fds) for inspection and `state diff`; the new copy
        // is started from the spec. The capture itself refuses a process that changed while
        // it was read. A workload whose process is gone (it died on the new instance and a
        // rollback moves it back) has no task state: its descriptors still move.
        // The producer release named in the handover image, read now: asking again after the
        // freeze would cost a round trip inside the blackout. One workload's info, not every
        // instance's list: a move's cost does not grow with the number of workloads.
        let (release, info) = self.platform.workload_info(from, name)?;
        let release = release.unwrap_or_else(|| "unknown".to_owned());
        let has_process = matches!(
            info.state,
            crate::model::WorkloadState::Running | crate::model::WorkloadState::Frozen
        );
        // A capture that keeps seeing a busy process change is taken again once it is frozen.
        let task = if has_process {
            capture_retrying(self.setup.env, info.pid, 2).ok()
        } else {
            Some(state_serializers::task::TaskState::empty())
        };
        if std::mem::take(&mut self.faults_left.health_fail) {
            spec.env
                .insert(crate::fault::HEALTH_FAIL_ENV.to_owned(), "1".to_owned());
        }
        // Announced before the freeze, so the receiver prepares (creates the workload's
        // cgroup, which can take milliseconds) outside the blackout.
        self.platform.prepare(to, &spec)?;
        self.set_status(name, MoveStatus::Freezing, None);
        if let Err(e) = self.step(phase, format!("{name}: freeze on instance {from}")) {
            // Nothing was frozen: what was prepared on `to` goes.
            let e = PlatformError::Instance {
                id: from,
                what: e.to_string(),
            };
            self.platform.abort(to, name, &e.to_string());
            return Err(e);
        }
        let mut prebuilt = self.prebuild(from, name, &spec, task.as_ref(), &release);
        // The prebuilt image goes ahead and is verified by the target now, while the
        // workload still serves: the offer after the freeze then carries only the fds.
        if let Some(p) = &mut prebuilt {
            match self.platform.stage(to, name, &p.out) {
                Ok(staged) => p.staged = staged,
                Err(e) => {
                    // Nothing is frozen: what was prepared on `to` goes.
                    self.platform.abort(to, name, &e.to_string());
                    return Err(e);
                }
            }
        }
        self.hold_events();
        let t0 = self.setup.env.now();
        // Frozen, and its descriptors taken, in one step (one round trip to the instance
        // where the platform can): the blackout starts here.
        let fds = match self.platform.freeze_for_move(from, name) {
            Ok(fds) => fds,
            Err(e) => {
                // Not frozen by this call: the copy prepared on `to` (a standby) goes.
                self.platform.abort(to, name, &e.to_string());
                self.release_events();
                return Err(e);
            }
        };
        // Restart mode: the freeze returned once the old copy exited (its ports closed).
        let t_stopped = self.setup.env.now();
        if spec.mode == crate::workload::Mode::Restart
            && let Some(w) = self.record.workload_mut(name)
        {
            w.stop_us = Some(us(t_stopped.saturating_duration_since(t0)));
        }
        let task = match task {
            Some(t) => Ok(t),
            // Frozen now (or, restart and checkpoint modes, gone: then there is nothing left
            // to describe).
            None if matches!(
                spec.mode,
                crate::workload::Mode::Restart | crate::workload::Mode::Checkpoint
            ) =>
            {
                Ok(state_serializers::task::TaskState::empty())
            }
            None => self
                .setup
                .env
                .capture_task(info.pid)
                .map_err(|e| PlatformError::Instance {
                    id: from,
                    what: format!("{name}: capturing task state: {e}"),
                }),
        };
        let attempt = task.and_then(|task| {
            self.offer(
                from, to, name, &spec, &task, fds, prebuilt, &release, t0, t_stopped,
            )
        });
        match attempt {
            Ok(b) => {
                self.release_events();
                Ok(b)
            }
            Err(e) => {
                // Thawed first: the held lines are written after the blackout ended.
                self.platform.abort(to, name, &e.to_string());
                let thawed = self.platform.thaw(from, name);
                self.release_events();
                thawed?;
                Err(e)
            }
        }
    }

    /// The handover image of a move built before its freeze, where nothing it records can
    /// change by the freeze: the memfds move by identity (no digest of their contents,
    /// which only a frozen workload keeps still), the task state was captured, no fault is
    /// pending. [`Self::offer`] uses it only if the descriptors taken once the workload is
    /// frozen are the very objects it describes, in the state it recorded ([`fd_states`]:
    /// equal before the build, after it and after the freeze); otherwise
    /// (a connection handed over at the freeze, a memfd resized, ...) it builds the image
    /// again, inside the blackout as before. Best effort: `None` builds it there too.
    fn prebuild(
        &mut self,
        from: InstanceId,
        name: &str,
        spec: &crate::workload::WorkloadSpec,
        task: Option<&state_serializers::task::TaskState>,
        release: &str,
    ) -> Option<Prebuilt> {
        let task = task?;
        if spec.integrity != crate::workload::Integrity::Identity
            || spec.transfer != Transfer::Share
            || !matches!(
                spec.mode,
                crate::workload::Mode::Handover | crate::workload::Mode::SocketActivation
            )
            || self.faults_left.corrupt_region
        {
            return None;
        }
        let fds = self.platform.preserved_fds(from, name).ok()?;
        let states = fd_states(&fds)?;
        let generation = u64::from(self.writes);
        let out = self
            .build_image(spec, task, fds, release, generation, SendFaults::default())
            .ok()?;
        // The workload still runs: what the image recorded must be what was examined.
        (fd_states(&out.fds)? == states).then_some(Prebuilt {
            out,
            generation,
            states,
            staged: false,
        })
    }

    /// This upgrade's signed handover image of one workload (`handover::build`).
    fn build_image(
        &self,
        spec: &crate::workload::WorkloadSpec,
        task: &state_serializers::task::TaskState,
        fds: Vec<PreservedFd>,
        release: &str,
        generation: u64,
        faults: SendFaults,
    ) -> Result<handover::Outgoing, handover::BuildError> {
        handover::build(
            spec,
            task,
            fds,
            release,
            self.upgrade_id.0,
            generation,
            &self.setup.node_key,
            faults,
        )
    }

    #[allow(clippy::too_many_arguments)] // the move's parts, its descriptors and its two instants
    fn offer(
        &mut self,
        from: InstanceId,
        to: InstanceId,
        name: &str,
        spec: &crate::workload::WorkloadSpec,
        task: &state_serializers::task::TaskState,
        mut fds: Vec<PreservedFd>,
        prebuilt: Option<Prebuilt>,
        release: &str,
        t0: Instant,
        t_stopped: Instant,
    ) -> Result<Option<u64>, PlatformError> {
        let io = |what: String| PlatformError::Instance { id: from, what };
        let connections = crate::model::connections_in(&fds);
        if connections > 0
            && let Some(w) = self.record.workload_mut(name)
        {
            w.connections = u32::try_from(connections).ok();
        }
        if spec.transfer == Transfer::Copy {
            for p in &mut fds {
                if state_serializers::sys::get_seals(std::os::fd::AsFd::as_fd(&p.fd)).is_ok() {
                    p.fd = handover::copy_memfd(&p.name, std::os::fd::AsFd::as_fd(&p.fd))
                        .map_err(|e| io(format!("{name}: copying {}: {e}", p.name)))?;
                }
            }
        }
        let faults = SendFaults {
            corrupt_region: std::mem::take(&mut self.faults_left.corrupt_region),
        };
        let generation = u64::from(self.writes);
        let (out, staged) = match prebuilt {
            // The image built before the freeze describes these very objects: the
            // descriptors taken before the freeze are dropped, their duplicates go.
            Some(p)
                if p.generation == generation
                    && !faults.corrupt_region
                    && fd_states(&fds).is_some_and(|now| now == p.states) =>
            {
                drop(fds);
                (p.out, p.staged)
            }
            _ => (
                self.build_image(spec, task, fds, release, generation, faults)
                    .map_err(|e| io(format!("{name}: building the handover image: {e}")))?,
                false,
            ),
        };
        // Not journaled (an fsync inside the blackout buys nothing): recovery finds an
        // offered copy by asking the instances, and the receiver stops uncommitted copies.
        self.set_status(name, MoveStatus::Offered, None);
        let state_fds = out.offer.fds.len().saturating_sub(1);
        self.note(if staged {
            format!(
                "{name}: offer {state_fds} fds to instance {to} (its {}-byte image was \
                 verified there before the freeze)",
                out.offer.image_len
            )
        } else {
            format!(
                "{name}: offer {} bytes of image and {state_fds} fds to instance {to}",
                out.offer.image_len
            )
        });
        let t_deliver = self.setup.env.now();
        let deadline = std::time::Instant::now() + move_deadline(spec);
        match self.platform.deliver(to, name, out, deadline)? {
            Delivered::Staged => Ok(None),
            Delivered::Healthy { verified_us } => {
                let handover =
                    us(t_deliver.saturating_duration_since(t0)).saturating_add(verified_us);
                let healthy_at = self.setup.env.now();
                let blackout = us(healthy_at.saturating_duration_since(t0));
                let closed = us(healthy_at.saturating_duration_since(t_stopped));
                if let Some(w) = self.record.workload_mut(name) {
                    w.handover_us = Some(handover.min(blackout));
                    w.blackout_us = Some(blackout);
                    if spec.mode == crate::workload::Mode::Restart {
                        w.closed_us = Some(closed);
                    }
                }
                self.set_status(name, MoveStatus::Committing, None);
                self.step(
                    self.record.phase,
                    format!("{name}: healthy on instance {to} after {blackout} us; commit"),
                )
                .map_err(|e| io(e.to_string()))?;
                self.platform.commit(to, name)?;
                // The new instance owns it now: the old copy goes away.
                self.platform.stop_workload(from, name)?;
                Ok(Some(blackout))
            }
        }
    }

    /// Runs the upgrade to the end. On any workload failure, rolls back and returns
    /// [`UpgradeError::RolledBack`]. On a replace platform whose boot does not return (a
    /// real kexec), the next kernel's agent finishes it ([`recover`]).
    pub fn run(&mut self, kernel: &LoadableKernel<'_>) -> Result<(), UpgradeError> {
        let caps = self.platform.probe()?;
        if caps.side_by_side {
            self.run_side_by_side(kernel)
        } else {
            self.run_replace(kernel)
        }
    }

    fn run_side_by_side(&mut self, kernel: &LoadableKernel<'_>) -> Result<(), UpgradeError> {
        let old = self.record.old_instance;
        let mut caps = self.platform.probe()?;
        if caps.spare_cpus.is_empty() {
            let mut keep = self.record.old_resources.clone();
            let give = keep.cpus.len() / 2;
            if give == 0 {
                return self.refuse(
                    "no spare cpu: the running instance owns a single cpu and no cpu is free"
                        .into(),
                );
            }
            let released: Vec<u32> = keep.cpus.split_off(keep.cpus.len() - give);
            keep.memory_bytes /= 2;
            self.step(
                Phase::ShrunkOld,
                format!(
                    "instance {old} releases cpus {released:?} so the new kernel has spare cores"
                ),
            )?;
            self.platform.resize(old, &keep)?;
            caps = self.platform.probe()?;
        }
        let res = Resources {
            cpus: caps.spare_cpus.clone(),
            memory_bytes: caps.spare_memory_bytes,
        };
        let new = match self.platform.create_instance(&res) {
            Ok(id) => id,
            Err(e) => return self.roll_back(format!("creating the new instance: {e}")),
        };
        self.record.new_instance = Some(new);
        self.step(
            Phase::InstanceCreated,
            format!("instance {new} created on spare cpus {:?}", res.cpus),
        )?;
        if let Err(e) = self.boot_beside(new, kernel) {
            return self.roll_back(e.to_string());
        }
        for name in self.names() {
            match self.move_workload(old, new, &name, Phase::Migrating) {
                Ok(blackout) => {
                    self.set_status(&name, MoveStatus::Committed, None);
                    self.step(
                        Phase::Migrating,
                        format!(
                            "{name}: committed on instance {new} (blackout {} us)",
                            blackout.unwrap_or(0)
                        ),
                    )?;
                }
                Err(e) => {
                    self.set_status(&name, MoveStatus::Aborted, Some(e.to_string()));
                    self.step(Phase::Migrating, format!("{name}: move aborted: {e}"))?;
                    return self.roll_back(e.to_string());
                }
            }
        }
        // Every workload again, now that all moved: one may have died or stopped serving
        // after its own move passed. Still reversible here: the old instance runs.
        let sick = self.unhealthy(new);
        if !sick.is_empty() {
            let reason = format!("final check on instance {new}: {}", sick.join("; "));
            self.step(Phase::Migrating, reason.clone())?;
            return self.roll_back(reason);
        }
        self.hand_over(old, new)
    }

    fn refuse(&mut self, reason: String) -> Result<(), UpgradeError> {
        self.finish(Outcome::Refused, Some(reason.clone()))?;
        Err(UpgradeError::Refused(reason))
    }

    fn boot_beside(
        &mut self,
        new: InstanceId,
        kernel: &LoadableKernel<'_>,
    ) -> Result<(), UpgradeError> {
        self.platform.load(new, kernel)?;
        self.step(
            Phase::KernelLoaded,
            format!("kernel {} loaded into instance {new}", kernel.release),
        )?;
        self.step(Phase::Booted, format!("instance {new} booted"))?;
        let record = self.record.clone();
        self.platform.boot(new, Some(&record))?;
        self.platform.ping(new)?;
        Ok(())
    }

    fn hand_over(&mut self, old: InstanceId, new: InstanceId) -> Result<(), UpgradeError> {
        self.step(
            Phase::HandingOver,
            format!("every workload moved; instance {old} halts and hands its resources to {new}"),
        )?;
        let old_res = self
            .platform
            .instances()?
            .into_iter()
            .find(|i| i.id == old)
            .map(|i| i.resources)
            .unwrap_or_default();
        // Tell the new instance's agent, then do it (best effort message: the platform
        // operation is what counts).
        self.platform.disconnect(Some(&old_res));
        self.converge_forward(old, new)?;
        self.end_verified(new, Outcome::Upgraded, None)
    }

    /// Finishes the record with `outcome` only if it is true: instance `on` is active and
    /// runs every workload of the upgrade, thawed and committed. Otherwise the record
    /// finishes as failed, naming what was found, and that is the error. An upgrade that
    /// ends upgraded promotes the kernel slots and raises the floor only after this check.
    fn end_verified(
        &mut self,
        on: InstanceId,
        outcome: Outcome,
        error: Option<String>,
    ) -> Result<(), UpgradeError> {
        let seen = self.platform.instances();
        let problem = match &seen {
            Err(e) => Some(format!("the final check could not list the instances: {e}")),
            Ok(insts) => match insts
                .iter()
                .find(|i| i.id == on && i.state == InstanceState::Active)
            {
                None => Some(format!("instance {on} is not active")),
                Some(inst) => {
                    let bad: Vec<String> = self
                        .record
                        .workloads
                        .iter()
                        .filter_map(|w| match inst.workloads.iter().find(|x| x.name == w.name) {
                            None => Some(format!("{} does not run there", w.name)),
                            Some(x) if x.frozen => Some(format!("{} is frozen", w.name)),
                            Some(x) if x.pending_commit => {
                                Some(format!("{} is not committed", w.name))
                            }
                            Some(x) if x.state != crate::model::WorkloadState::Running => {
                                Some(format!(
                                    "{} is {}{}",
                                    w.name,
                                    x.state.as_str(),
                                    x.exit
                                        .as_ref()
                                        .map(|e| format!(" ({e})"))
                                        .unwrap_or_default()
                                ))
                            }
                            Some(_) => None,
                        })
                        .collect();
                    if bad.is_empty() {
                        let sick = self.unhealthy(on);
                        (!sick.is_empty()).then(|| sick.join(", "))
                    } else {
                        Some(bad.join(", "))
                    }
                }
            },
        };
        match problem {
            None => {
                if outcome == Outcome::Upgraded {
                    self.promote()?;
                }
                self.finish(outcome, error)
            }
            Some(p) => {
                let msg = format!(
                    "the upgrade would have ended {outcome:?}, but the final check on instance \
                     {on} found: {p}{}",
                    error.map(|e| format!(" (after: {e})")).unwrap_or_default()
                );
                self.finish(Outcome::Failed, Some(msg.clone()))?;
                Err(UpgradeError::Failed(msg))
            }
        }
    }

    /// Runs every workload's health check on instance `on` again (the final check: each
    /// must be alive and healthy after the whole hand-over, not only right after its own
    /// move); what failed, one entry per workload.
    fn unhealthy(&mut self, on: InstanceId) -> Vec<String> {
        let mut sick = Vec::new();
        for name in self.names() {
            match self.platform.health(on, &name) {
                Ok((true, _)) => {}
                Ok((false, detail)) => sick.push(format!("{name} is unhealthy: {detail}")),
                Err(e) => sick.push(format!("{name}: the health check could not run: {e}")),
            }
        }
        sick
    }

    /// Halts `old` (if still active), gives its resources to `new`, removes it.
    fn converge_forward(&mut self, old: InstanceId, new: InstanceId) -> Result<(), UpgradeError> {
        let insts = self.platform.instances()?;
        if let Some(o) = insts.iter().find(|i| i.id == old) {
            if matches!(o.state, InstanceState::Active | InstanceState::Failed) {
                self.platform.halt(old)?;
            }
            self.platform.transfer_resources(old, new)?;
            self.platform.destroy(old)?;
        }
        Ok(())
    }

    /// The kernel slots, after every workload runs on the new kernel (idempotent, so that
    /// recovery may repeat it): the candidate becomes current (apply), or current and
    /// previous swap (rollback); the version floor is raised.
    fn promote(&mut self) -> Result<(), UpgradeError> {
        let Some(p) = self.setup.promotion.as_mut() else {
            return Ok(());
        };
        let after = self.record.kernel_after.clone();
        let current = p.slots.peek(rollback::Slot::Current)?.map(|i| i.release);
        let swap = current.as_deref() != Some(after.as_str())
            && match self.record.kind {
                UpgradeKind::Apply => {
                    p.slots.peek(rollback::Slot::Candidate)?.map(|i| i.release)
                        == Some(after.clone())
                }
                UpgradeKind::Rollback => {
                    p.slots.peek(rollback::Slot::Previous)?.map(|i| i.release)
                        == Some(after.clone())
                }
            };
        let floor = self.record.version_floor.clone();
        // The floor only ever rises (rollback::Slots::raise_floor).
        let raise = match (&floor, p.slots.floor()?) {
            (Some(_), None) => true,
            (Some(f), Some(old)) => rollback::Release::parse(&old)
                .ok()
                .zip(rollback::Release::parse(f).ok())
                .is_some_and(|(old, new)| old.is_below(&new)),
            (None, _) => false,
        };
        if !swap && !raise {
            return Ok(());
        }
        let mut what = Vec::new();
        if swap {
            what.push(match self.record.kind {
                UpgradeKind::Apply => format!("kernel slots: {after} becomes current"),
                UpgradeKind::Rollback => format!("kernel slots: back to {after}"),
            });
        }
        if let Some(f) = &floor
            && raise
        {
            what.push(format!("version floor raised to {f}"));
        }
        self.step(Phase::HandingOver, what.join("; "))?;
        let p = self
            .setup
            .promotion
            .as_mut()
            .expect("checked above: promotion is set");
        if swap {
            match self.record.kind {
                UpgradeKind::Apply => {
                    p.slots.promote_candidate()?;
                }
                UpgradeKind::Rollback => {
                    p.slots.swap_for_rollback()?;
                }
            }
        }
        if let Some(f) = floor
            && raise
        {
            p.slots.raise_floor(&f)?;
        }
        Ok(())
    }

    /// Moves every committed workload back to the old instance (reverse order), removes the
    /// new instance and gives the old one its resources back (side by side); thaws every
    /// staged workload and drops what was staged (replace, before the boot).
    fn roll_back(&mut self, reason: String) -> Result<(), UpgradeError> {
        let old = self.record.old_instance;
        if let Some(death) = self.who_died()? {
            return self.survive(death, &reason);
        }
        self.step(Phase::RollingBack, format!("rolling back: {reason}"))?;
        let mut stuck = Vec::new();
        if let Some(new) = self.record.new_instance {
            // The channel to the new instance is not needed any more: closing it makes the
            // receiver stop any uncommitted copy.
            self.platform.disconnect(None);
            let moved: Vec<String> = self
                .record
                .workloads
                .iter()
                .rev()
                .filter(|w| w.status == MoveStatus::Committed)
                .map(|w| w.name.clone())
                .collect();
            for name in moved {
                match self.move_workload(new, old, &name, Phase::RollingBack) {
                    Ok(blackout) => {
                        self.set_status(&name, MoveStatus::MovedBack, None);
                        if let Some(w) = self.record.workload_mut(&name) {
                            w.blackout_us =
                                Some(w.blackout_us.unwrap_or(0) + blackout.unwrap_or(0));
                        }
                        self.step(
                            Phase::RollingBack,
                            format!("{name}: moved back to instance {old}"),
                        )?;
                    }
                    Err(e) => {
                        self.set_status(
                            &name,
                            MoveStatus::Committed,
                            Some(format!("could not move back: {e}")),
                        );
                        self.step(
                            Phase::RollingBack,
                            format!("{name}: could not move back: {e}"),
                        )?;
                        stuck.push(format!("{name} ({e})"));
                    }
                }
            }
            // Staged (replace) or offered copies: drop them, thaw the originals.
            let staged: Vec<String> = self
                .record
                .workloads
                .iter()
                .filter(|w| matches!(w.status, MoveStatus::Offered | MoveStatus::Freezing))
                .map(|w| w.name.clone())
                .collect();
            for name in staged {
                self.platform.abort(new, &name, &reason);
                self.platform.thaw(old, &name)?;
                self.set_status(&name, MoveStatus::Aborted, None);
            }
            self.platform.disconnect(None);
            if stuck.is_empty() {
                self.remove_new(new)?;
            }
        }
        if !stuck.is_empty() {
            let msg = format!(
                "rollback incomplete: {} still run on instance {:?}, which was kept: {}",
                stuck.len(),
                self.record.new_instance,
                stuck.join("; ")
            );
            self.finish(Outcome::Failed, Some(msg.clone()))?;
            return Err(UpgradeError::Failed(msg));
        }
        self.restore_old_resources()?;
        self.end_verified(old, Outcome::RolledBack, Some(reason.clone()))?;
        Err(UpgradeError::RolledBack { reason })
    }

    fn remove_new(&mut self, new: InstanceId) -> Result<(), UpgradeError> {
        let insts = self.platform.instances()?;
        if let Some(n) = insts.iter().find(|i| i.id == new) {
            if matches!(n.state, InstanceState::Active | InstanceState::Failed) {
                self.platform.halt(new)?;
            }
            self.platform.destroy(new)?;
        }
        Ok(())
    }

    /// Starts `name` afresh from its spec on `on` (its state was lost), recording `detail`
    /// (and the restart's failure, if any) in its move. Returns how it is named in the
    /// record's error.
    fn restart_from_spec(&mut self, on: InstanceId, name: &str, detail: &str) -> String {
        let started = match self.setup.specs.get(name).cloned() {
            Some(spec) => self.platform.start_workload(on, &spec).map(drop),
            None => Err(PlatformError::NoSuchWorkload {
                instance: on,
                workload: name.to_owned(),
            }),
        };
        match started {
            Ok(()) => {
                self.set_status(name, MoveStatus::Aborted, Some(detail.to_owned()));
                name.to_owned()
            }
            Err(e) => {
                self.set_status(
                    name,
                    MoveStatus::Aborted,
                    Some(format!("{detail}; the restart failed: {e}")),
                );
                format!("{name} (restart failed: {e})")
            }
        }
    }

    /// The instance that must serve (`id`) crashed and no other instance runs: the machine
    /// boots its kernel again (as a watchdog would), and every workload restarts from its
    /// spec there (its state died with the instance; the record says so). Any other
    /// instance of the upgrade is removed. Ends failed: state was lost.
    fn reboot(&mut self, id: InstanceId, reason: &str) -> Result<(), UpgradeError> {
        let old = id;
        self.step(
            Phase::RollingBack,
            format!(
                "instance {id} is gone ({reason}) and no other instance runs: booting it again"
            ),
        )?;
        self.platform.disconnect(None);
        for other in [Some(self.record.old_instance), self.record.new_instance]
            .into_iter()
            .flatten()
            .filter(|o| *o != id)
        {
            if let Some(i) = self
                .platform
                .instances()?
                .into_iter()
                .find(|i| i.id == other)
            {
                if matches!(i.state, InstanceState::Active | InstanceState::Failed) {
                    self.platform.halt(other)?;
                }
                // Removing it frees its cpus (the instance booted again takes them below).
                self.platform.destroy(other)?;
            }
        }
        if self
            .platform
            .instances()?
            .iter()
            .any(|i| i.id == id && matches!(i.state, InstanceState::Active | InstanceState::Failed))
        {
            self.platform.halt(id)?;
        }
        self.platform.boot(id, None)?;
        if id == self.record.old_instance {
            self.restore_old_resources()?;
        } else {
            // The new kernel serves alone: it takes every spare cpu and the spare memory
            // (what the removed old instance held).
            let caps = self.platform.probe()?;
            let mut all = self
                .platform
                .instances()?
                .into_iter()
                .find(|i| i.id == id)
                .map(|i| i.resources)
                .unwrap_or_default();
            if !caps.spare_cpus.is_empty() {
                all.cpus.extend(caps.spare_cpus.iter().copied());
                all.cpus.sort_unstable();
                all.cpus.dedup();
                all.memory_bytes += caps.spare_memory_bytes;
                self.platform.resize(id, &all)?;
            }
        }
        let mut restarted = Vec::new();
        for name in self.names() {
            let detail = format!(
                "restarted from its spec when instance {old} was booted again: its state was \
                 lost when that instance died"
            );
            restarted.push(self.restart_from_spec(old, &name, &detail));
        }
        let msg = format!(
            "instance {old} died mid-upgrade ({reason}) with no other instance running; it \
             was booted again and every workload restarted from its spec, losing its state: {}",
            restarted.join(", ")
        );
        self.end_verified(old, Outcome::Failed, Some(msg.clone()))?;
        Err(UpgradeError::Failed(msg))
    }

    /// Side by side: which instance of the upgrade died (its agent is gone), read from one
    /// look at the instances. `None` when both that should run do (or on a replace
    /// platform, where a kernel does not die beside another).
    fn who_died(&mut self) -> Result<Option<Death>, UpgradeError> {
        if !self.platform.probe()?.side_by_side {
            return Ok(None);
        }
        let insts = self.platform.instances()?;
        let state = |id| insts.iter().find(|i| i.id == id).map(|i| i.state);
        let old = state(self.record.old_instance);
        let new = self.record.new_instance.map(|n| (n, state(n)));
        Ok(match new {
            // The old one is gone while the new one runs: nothing can move back.
            Some((n, Some(InstanceState::Active))) if old != Some(InstanceState::Active) => {
                Some(Death::Old { new: n })
            }
            // The new one was booted and died while the old one runs.
            Some((n, Some(InstanceState::Failed))) if old == Some(InstanceState::Active) => {
                Some(Death::New { new: n })
            }
            // The old one crashed and no new one runs: nothing is left to serve.
            _ if old == Some(InstanceState::Failed) => Some(Death::Only),
            _ => None,
        })
    }

    /// Converges after `death` (see [`Orchestrator::who_died`]).
    fn survive(&mut self, death: Death, reason: &str) -> Result<(), UpgradeError> {
        match death {
            Death::Old { new } => self.survive_old_crash(new, reason),
            Death::New { new } => self.survive_new_crash(new, reason),
            Death::Only => {
                let old = self.record.old_instance;
                self.reboot(old, reason)
            }
        }
    }

    /// The new instance died mid-upgrade: every workload converges on the old one. Copies
    /// still there are thawed; a workload whose only copy was on the new instance is
    /// restarted from its spec (its state died with that instance, and the record says
    /// so). The dead instance is halted (what it left running is killed) and removed, and
    /// the old one gets its resources back. Ends rolled back only if nothing was restarted.
    fn survive_new_crash(&mut self, new: InstanceId, reason: &str) -> Result<(), UpgradeError> {
        let old = self.record.old_instance;
        self.step(
            Phase::RollingBack,
            format!(
                "instance {new} is gone ({reason}): every workload converges on instance {old}"
            ),
        )?;
        self.platform.disconnect(None);
        self.platform.halt(new)?;
        let on_old: Vec<crate::model::WorkloadInfo> = self
            .platform
            .instances()?
            .into_iter()
            .find(|i| i.id == old)
            .map(|i| i.workloads)
            .unwrap_or_default();
        let mut restarted = Vec::new();
        for name in self.names() {
            if let Some(w) = on_old.iter().find(|w| w.name == name) {
                if w.frozen {
                    self.platform.thaw(old, &name)?;
                }
                if self
                    .record
                    .workloads
                    .iter()
                    .any(|m| m.name == name && m.status != MoveStatus::Pending)
                {
                    self.set_status(&name, MoveStatus::MovedBack, None);
                }
                continue;
            }
            let detail = format!(
                "restarted from its spec on instance {old}: its state on instance {new} was \
                 lost when that instance died"
            );
            restarted.push(self.restart_from_spec(old, &name, &detail));
        }
        self.platform.destroy(new)?;
        self.restore_old_resources()?;
        if restarted.is_empty() {
            let r = format!("instance {new} died: {reason}");
            self.end_verified(old, Outcome::RolledBack, Some(r.clone()))?;
            return Err(UpgradeError::RolledBack { reason: r });
        }
        let msg = format!(
            "instance {new} died mid-upgrade ({reason}); every workload now runs on instance \
             {old}, but {} had to be restarted from its spec and lost its state: {}",
            restarted.len(),
            restarted.join(", ")
        );
        self.end_verified(old, Outcome::Failed, Some(msg.clone()))?;
        Err(UpgradeError::Failed(msg))
    }

    /// The old instance died mid-upgrade: every workload converges on the new one. A copy
    /// received but not committed is the only one left: it is committed. A workload with no
    /// copy there is restarted from its spec (its state died with the old instance, and the
    /// record says so). The dead instance is then halted (what it left running is killed),
    /// its resources go to the new one, and it is removed. Ends upgraded only if nothing
    /// was restarted.
    fn survive_old_crash(&mut self, new: InstanceId, reason: &str) -> Result<(), UpgradeError> {
        let old = self.record.old_instance;
        self.step(
            Phase::RollingBack,
            format!(
                "instance {old} is gone ({reason}): nothing can move back; every workload \
                 converges on instance {new}"
            ),
        )?;
        let on_new: Vec<crate::model::WorkloadInfo> = self
            .platform
            .instances()?
            .into_iter()
            .find(|i| i.id == new)
            .map(|i| i.workloads)
            .unwrap_or_default();
        for w in on_new.iter().filter(|w| w.pending_commit) {
            if self.platform.commit(new, &w.name).is_ok() {
                self.set_status(&w.name, MoveStatus::Committed, None);
            }
        }
        self.platform.disconnect(None);
        // Halting the dead instance kills whatever its workloads left running (an orphan
        // would keep its ports and a second copy of its state) before anything restarts.
        if self.platform.instances()?.iter().any(|i| {
            i.id == old && matches!(i.state, InstanceState::Active | InstanceState::Failed)
        }) {
            self.platform.halt(old)?;
        }
        let running: Vec<String> = self
            .platform
            .instances()?
            .into_iter()
            .find(|i| i.id == new)
            .map(|i| i.workloads.into_iter().map(|w| w.name).collect())
            .unwrap_or_default();
        let mut restarted = Vec::new();
        for name in self.names() {
            if running.contains(&name) {
                self.set_status(&name, MoveStatus::Committed, None);
                continue;
            }
            let detail = format!(
                "restarted from its spec on instance {new}: its state on instance {old} was \
                 lost when that instance died"
            );
            restarted.push(self.restart_from_spec(new, &name, &detail));
        }
        self.converge_forward(old, new)?;
        if restarted.is_empty() {
            return self.end_verified(new, Outcome::Upgraded, None);
        }
        let msg = format!(
            "instance {old} died mid-upgrade ({reason}); every workload now runs on instance \
             {new}, but {} had to be restarted from its spec and lost its state: {}",
            restarted.len(),
            restarted.join(", ")
        );
        self.end_verified(new, Outcome::Failed, Some(msg.clone()))?;
        Err(UpgradeError::Failed(msg))
    }

    fn restore_old_resources(&mut self) -> Result<(), UpgradeError> {
        let old = self.record.old_instance;
        let want = self.record.old_resources.clone();
        if want.cpus.is_empty() {
            // Replace platforms own no resources per instance.
            return Ok(());
        }
        let now = self
            .platform
            .instances()?
            .into_iter()
            .find(|i| i.id == old)
            .map(|i| i.resources);
        if now.as_ref().is_some_and(|r| *r != want) {
            self.platform.resize(old, &want)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
