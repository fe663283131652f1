//! The orchestrator: a journaled state machine over [`Platform`].
//!
//! ```text
//!  Verified ─▶ (ShrunkOld) ─▶ InstanceCreated ─▶ KernelLoaded ─▶ Booted ─▶ Migrating ─▶ HandingOver ─▶ Done
//!                                                                   │  per workload:           (upgraded)
//!                                                                   │  Freezing ▶ Offered ▶ Committing ▶ Committed
//!                                                                   ▼  any check/health failure
//!                                                              RollingBack ─▶ Done (rolled back)
//! ```
//!
//! Every transition is written to the journal *before* the step it names, so a crash at any
//! point leaves a record from which [`recover`] converges: to fully new if every workload
//! had moved (phase `HandingOver`), else to fully old (moved workloads move back).
//! Ownership rule that makes this safe: a workload's old copy is stopped only after the new
//! instance accepted `Commit`, and a received copy that was never committed is stopped by
//! the receiver as soon as its channel drops, so two live copies never serve at once.

pub mod record;

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use kho_proto::channel::{
    AgentState, Channel, Commit, Heartbeat, Message, PeerInfo, PrepareMigration, ReleaseResources,
    Role, Shutdown, Transport, UpgradeId, Verification,
};
use kho_proto::keys::NodeKey;
use rollback::Journal;

use self::record::{Event, MoveStatus, Outcome, Phase, UpgradeKind, UpgradeRecord, WorkloadMove};
use crate::exit::Exit;
use crate::handover::{self, SendFaults};
use crate::platform::{
    InstanceId, InstanceInfo, InstanceState, LoadableKernel, Platform, PlatformError, Resources,
};
use crate::workload::WorkloadFile;

/// How long one reply on the channel may take (verification of a large memfd included).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Test-only faults, each forcing one failure path (`mk-upgrade demo --inject`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Corrupt a region of the first workload's handover image.
    pub corrupt_region: bool,
    /// Make the first workload's health check fail on the new instance.
    pub health_fail: bool,
    /// Kill this process (SIGKILL) right after the N-th journal write (1-based).
    pub crash_after_write: Option<u32>,
}

/// Progress notifications (the CLI draws them; tests ignore them).
pub trait Observer {
    /// A phase or step began.
    fn step(&self, _phase: Phase, _what: &str) {}
    /// A workload changed status.
    fn workload(&self, _name: &str, _status: MoveStatus, _detail: Option<&str>) {}
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;
impl Observer for Quiet {}

/// Why an upgrade did not end upgraded.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("upgrade rolled back: {reason}")]
    RolledBack { reason: String },
    #[error("upgrade failed and needs an operator: {0}")]
    Failed(String),
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("journal: {0}")]
    Journal(#[from] rollback::JournalError),
    #[error("{0}")]
    Refused(String),
}

impl UpgradeError {
    /// The documented exit code.
    pub fn exit(&self) -> Exit {
        match self {
            UpgradeError::RolledBack { .. } => Exit::RolledBack,
            UpgradeError::Failed(_) | UpgradeError::Platform(_) => Exit::Platform,
            UpgradeError::Journal(_) => Exit::Internal,
            UpgradeError::Refused(_) => Exit::PreflightFailed,
        }
    }
}

/// Why one move failed.
#[derive(Debug, thiserror::Error)]
enum MoveError {
    #[error("{workload}: check {check} failed on instance {instance}: {detail}")]
    Check {
        workload: String,
        instance: InstanceId,
        check: String,
        detail: String,
    },
    #[error("{workload}: unhealthy on instance {instance}: {detail}")]
    Unhealthy {
        workload: String,
        instance: InstanceId,
        detail: String,
    },
    #[error("{0}")]
    Other(String),
    #[error(transparent)]
    Platform(#[from] PlatformError),
}

type Chan = Channel<Box<dyn Transport>>;

/// What an apply needs besides the platform.
pub struct Setup<'a> {
    pub journal: Journal<UpgradeRecord>,
    pub specs: WorkloadFile,
    pub node_key: NodeKey,
    pub faults: Faults,
    pub observer: &'a dyn Observer,
}

impl std::fmt::Debug for Setup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup")
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

/// One running upgrade.
pub struct Orchestrator<'a> {
    platform: &'a mut dyn Platform,
    setup: Setup<'a>,
    /// The journal record (public for reports).
    pub record: UpgradeRecord,
    rt: tokio::runtime::Runtime,
    channels: BTreeMap<InstanceId, Chan>,
    started: Instant,
    writes: u32,
    upgrade_id: UpgradeId,
    faults_left: Faults,
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

fn new_upgrade_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // A failure of the OS random source leaves zeroes only in a test sandbox without
    // getrandom; ids then still differ by time below.
    if getrandom::fill(&mut id).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        id = t.to_le_bytes();
    }
    id
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
            names.push(w.name.clone());
        }
        // Move in workload-file order, so operators can put the least critical first.
        names.sort_by_key(|n| setup.specs.workloads.iter().position(|s| &s.name == n));
        let id = new_upgrade_id();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| UpgradeError::Failed(format!("starting the channel runtime: {e}")))?;
        let record = UpgradeRecord {
            upgrade_id: hex::encode(id),
            kind,
            platform: caps.kind,
            started_at: rollback::time::now_unix(),
            kernel_before: current.kernel_release.clone().unwrap_or_default(),
            kernel_after: kernel_after.to_owned(),
            image_sha256: hex::encode(image_sha256),
            old_instance: current.id,
            old_resources: current.resources.clone(),
            new_instance: None,
            phase: Phase::Verified,
            workloads: names
                .into_iter()
                .map(|name| WorkloadMove {
                    name,
                    status: MoveStatus::Pending,
                    blackout_us: None,
                    handover_us: None,
                    detail: None,
                })
                .collect(),
            events: Vec::new(),
            outcome: None,
            error: None,
            recovered: false,
        };
        let faults_left = setup.faults;
        let mut o = Orchestrator {
            platform,
            setup,
            record,
            rt,
            channels: BTreeMap::new(),
            started: Instant::now(),
            writes: 0,
            upgrade_id: UpgradeId(id),
            faults_left,
        };
        o.step(
            Phase::Verified,
            "image verified; upgrade journaled".to_owned(),
        )?;
        Ok(o)
    }

    /// Resumes a journaled record (recovery).
    fn resume(
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| UpgradeError::Failed(format!("starting the channel runtime: {e}")))?;
        Ok(Orchestrator {
            platform,
            setup,
            record,
            rt,
            channels: BTreeMap::new(),
            started: Instant::now(),
            writes: 0,
            upgrade_id: UpgradeId(id),
            faults_left: Faults::default(),
        })
    }

    /// Journals `what` as a step of `phase` (before doing it).
    fn step(&mut self, phase: Phase, what: String) -> Result<(), UpgradeError> {
        self.record.phase = phase;
        let t_ms = ms(self.started.elapsed());
        tracing::info!(upgrade = %self.record.upgrade_id, ?phase, "{what}");
        self.setup.observer.step(phase, &what);
        self.record.events.push(Event { t_ms, what });
        self.setup.journal.write(&self.record)?;
        self.writes += 1;
        if self.faults_left.crash_after_write == Some(self.writes) {
            // Test-only: die exactly here, as kill -9 would.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        Ok(())
    }

    /// Records an event without a journal write (it is written with the next step).
    fn note(&mut self, what: String) {
        let t_ms = ms(self.started.elapsed());
        self.setup.observer.step(self.record.phase, &what);
        self.record.events.push(Event { t_ms, what });
    }

    fn set_status(&mut self, name: &str, status: MoveStatus, detail: Option<String>) {
        self.setup
            .observer
            .workload(name, status, detail.as_deref());
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
        let t_ms = ms(self.started.elapsed());
        let what = format!("finished: {outcome:?}");
        self.setup.observer.step(Phase::Done, &what);
        self.record.events.push(Event { t_ms, what });
        self.setup.journal.finish(&self.record)?;
        Ok(())
    }

    fn local_peer(&self) -> PeerInfo {
        PeerInfo {
            instance_id: self.record.old_instance,
            role: Role::Old,
            kernel_release: self.record.kernel_before.clone(),
            agent_version: crate::receiver::agent_version(),
        }
    }

    /// The negotiated channel to `id` (opened on first use).
    fn channel(&mut self, id: InstanceId) -> Result<&mut Chan, MoveError> {
        if !self.channels.contains_key(&id) {
            // Transports register with the runtime's reactor when they are made.
            let _enter = self.rt.enter();
            let transport = self.platform.connect(id, self.upgrade_id)?;
            let mut chan = Channel::new(transport, self.upgrade_id, self.local_peer());
            let negotiated = self
                .rt
                .block_on(async {
                    tokio::time::timeout(REPLY_TIMEOUT, chan.negotiate_as_initiator()).await
                })
                .map_err(|_| MoveError::Other(format!("instance {id}: no Hello answer")))?
                .map_err(|e| MoveError::Other(format!("instance {id}: negotiation: {e}")))?;
            tracing::info!(instance = id, version = negotiated.version, peer = ?negotiated.peer, "channel up");
            self.channels.insert(id, chan);
        }
        self.channels
            .get_mut(&id)
            .ok_or_else(|| MoveError::Other("channel vanished".into()))
    }

    fn send(
        &mut self,
        id: InstanceId,
        m: Message,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), MoveError> {
        let rt = &self.rt;
        let chan = self
            .channels
            .get_mut(&id)
            .ok_or_else(|| MoveError::Other(format!("no channel to instance {id}")))?;
        rt.block_on(chan.send(m, fds))
            .map(drop)
            .map_err(|e| MoveError::Other(format!("instance {id}: send: {e}")))
    }

    fn recv(&mut self, id: InstanceId) -> Result<Message, MoveError> {
        let rt = &self.rt;
        let chan = self
            .channels
            .get_mut(&id)
            .ok_or_else(|| MoveError::Other(format!("no channel to instance {id}")))?;
        let (frame, _fds) = rt
            .block_on(async { tokio::time::timeout(REPLY_TIMEOUT, chan.recv()).await })
            .map_err(|_| {
                MoveError::Other(format!("instance {id}: no reply within {REPLY_TIMEOUT:?}"))
            })?
            .map_err(|e| MoveError::Other(format!("instance {id}: receive: {e}")))?;
        Ok(frame.message)
    }

    /// A heartbeat round trip: the peer's agent is alive and answering.
    fn heartbeat(&mut self, id: InstanceId) -> Result<(), MoveError> {
        self.channel(id)?;
        let hb = Message::Heartbeat(Heartbeat {
            monotonic_ms: ms(self.started.elapsed()),
            state: AgentState::Migrating,
        });
        self.send(id, hb, &[])?;
        match self.recv(id)? {
            Message::Heartbeat(_) => Ok(()),
            other => Err(MoveError::Other(format!(
                "instance {id}: expected a heartbeat, got {}",
                other.message_type()
            ))),
        }
    }

    fn release_of(&mut self, id: InstanceId) -> String {
        self.platform
            .instances()
            .ok()
            .and_then(|v| v.into_iter().find(|i| i.id == id))
            .and_then(|i| i.kernel_release)
            .unwrap_or_else(|| "unknown".to_owned())
    }

    /// Moves one workload from `from` to `to`. On failure the workload runs (thawed) on
    /// `from` again and nothing of it remains on `to`.
    fn move_workload(
        &mut self,
        from: InstanceId,
        to: InstanceId,
        name: &str,
        phase: Phase,
    ) -> Result<u64, MoveError> {
        let mut spec = self
            .setup
            .specs
            .get(name)
            .cloned()
            .ok_or_else(|| MoveError::Other(format!("{name} is not in the workload file")))?;
        self.channel(to)?;
        // Task state is captured before the freeze, outside the blackout: it describes the
        // process (exe, args, env, limits, fds), which a handover does not change; the
        // capture itself refuses a process that changed while it was read.
        let pid = self
            .platform
            .instances()?
            .into_iter()
            .find(|i| i.id == from)
            .and_then(|i| i.workloads.into_iter().find(|w| w.name == name))
            .map(|w| w.pid)
            .ok_or_else(|| MoveError::Other(format!("{name} does not run on instance {from}")))?;
        let task = state_serializers::task::capture_tasks(
            Path::new("/"),
            &[pid],
            &state_serializers::task::CaptureOptions::default(),
        )
        .map_err(|e| MoveError::Other(format!("{name}: capturing task state: {e}")))?;
        if std::mem::take(&mut self.faults_left.health_fail) {
            spec.env
                .insert(crate::receiver::HEALTH_FAIL_ENV.to_owned(), "1".to_owned());
        }
        // Announced before the freeze, so the receiver prepares (creates the workload's
        // cgroup, which can take milliseconds) outside the blackout.
        let spec_json = serde_json::to_vec(&spec).map_err(|e| MoveError::Other(e.to_string()))?;
        self.send(
            to,
            Message::PrepareMigration(PrepareMigration {
                workload_id: name.to_owned(),
                spec: spec_json,
            }),
            &[],
        )?;
        self.set_status(name, MoveStatus::Freezing, None);
        self.step(phase, format!("{name}: freeze on instance {from}"))
            .map_err(|e| MoveError::Other(e.to_string()))?;
        let t0 = Instant::now();
        self.platform.freeze(from, name)?;
        tracing::debug!(us = us(t0.elapsed()), "{name}: frozen");
        let attempt = self.offer(from, to, name, &mut spec, &task, t0);
        match attempt {
            Ok(blackout) => Ok(blackout),
            Err(e) => {
                // Best effort: the receiver also stops an uncommitted copy on Abort or EOF.
                let abort = Message::Abort(kho_proto::channel::Abort {
                    workload_id: Some(name.to_owned()),
                    reason: e.to_string(),
                });
                let _ = self.send(to, abort, &[]);
                self.platform.thaw(from, name)?;
                Err(e)
            }
        }
    }

    fn offer(
        &mut self,
        from: InstanceId,
        to: InstanceId,
        name: &str,
        spec: &mut crate::workload::WorkloadSpec,
        task: &state_serializers::task::TaskState,
        t0: Instant,
    ) -> Result<u64, MoveError> {
        let mut fds = self.platform.preserved_fds(from, name)?;
        if spec.transfer == crate::workload::Transfer::Copy {
            for p in &mut fds {
                if state_serializers::sys::get_seals(p.fd.as_fd()).is_ok() {
                    p.fd = handover::copy_memfd(&p.name, p.fd.as_fd()).map_err(|e| {
                        MoveError::Other(format!("{name}: copying {}: {e}", p.name))
                    })?;
                }
            }
        }
        let faults = SendFaults {
            corrupt_region: std::mem::take(&mut self.faults_left.corrupt_region),
        };
        let release = self.release_of(from);
        let generation = u64::from(self.writes);
        let out = handover::build(
            spec,
            task,
            fds,
            &release,
            self.upgrade_id.0,
            generation,
            &self.setup.node_key,
            faults,
        )
        .map_err(|e| MoveError::Other(format!("{name}: building the handover image: {e}")))?;
        tracing::debug!(us = us(t0.elapsed()), "{name}: handover image built");
        // Not journaled (an fsync inside the blackout buys nothing): recovery finds an
        // offered copy by asking the instances, and the receiver stops uncommitted copies.
        self.set_status(name, MoveStatus::Offered, None);
        self.note(format!(
            "{name}: offer {} bytes of image and {} fds to instance {to}",
            out.offer.image_len,
            out.offer.fds.len()
        ));
        let frame_fds = out.frame_fds();
        self.send(to, Message::RegionOffer(out.offer.clone()), &frame_fds)?;
        drop(frame_fds);
        drop(out);
        match self.recv(to)? {
            Message::RegionVerified(v) if v.workload_id == name => match v.result {
                Verification::Ok => {
                    let handover = us(t0.elapsed());
                    if let Some(w) = self.record.workload_mut(name) {
                        w.handover_us = Some(handover);
                    }
                }
                Verification::Failed { check, detail } => {
                    return Err(MoveError::Check {
                        workload: name.to_owned(),
                        instance: to,
                        check,
                        detail,
                    });
                }
            },
            other => {
                return Err(MoveError::Other(format!(
                    "{name}: expected RegionVerified, got {}",
                    other.message_type()
                )));
            }
        }
        match self.recv(to)? {
            Message::HealthReport(h) if h.workload_id == name => {
                if !h.healthy {
                    return Err(MoveError::Unhealthy {
                        workload: name.to_owned(),
                        instance: to,
                        detail: h.detail,
                    });
                }
            }
            other => {
                return Err(MoveError::Other(format!(
                    "{name}: expected HealthReport, got {}",
                    other.message_type()
                )));
            }
        }
        let blackout = us(t0.elapsed());
        self.set_status(name, MoveStatus::Committing, None);
        if let Some(w) = self.record.workload_mut(name) {
            w.blackout_us = Some(blackout);
        }
        self.step(
            self.record.phase,
            format!("{name}: healthy on instance {to} after {blackout} us; commit"),
        )
        .map_err(|e| MoveError::Other(e.to_string()))?;
        self.send(
            to,
            Message::Commit(Commit {
                workload_id: name.to_owned(),
            }),
            &[],
        )?;
        // The new instance owns it now; a round trip proves the commit was processed
        // before the old copy goes away.
        self.heartbeat(to)?;
        self.platform.stop_workload(from, name)?;
        Ok(blackout)
    }

    /// Runs the upgrade to the end. On any workload failure, rolls back and returns
    /// [`UpgradeError::RolledBack`].
    pub fn run(&mut self, kernel: &LoadableKernel<'_>) -> Result<(), UpgradeError> {
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
        let new = self.platform.create_instance(&res)?;
        self.record.new_instance = Some(new);
        self.step(
            Phase::InstanceCreated,
            format!("instance {new} created on spare cpus {:?}", res.cpus),
        )?;
        if let Err(e) = self.boot_new(new, kernel) {
            return self.roll_back(e);
        }
        for name in self
            .record
            .workloads
            .iter()
            .map(|w| w.name.clone())
            .collect::<Vec<_>>()
        {
            match self.move_workload(old, new, &name, Phase::Migrating) {
                Ok(blackout) => {
                    self.set_status(&name, MoveStatus::Committed, None);
                    self.step(
                        Phase::Migrating,
                        format!("{name}: committed on instance {new} (blackout {blackout} us)"),
                    )?;
                }
                Err(e) => {
                    self.set_status(&name, MoveStatus::Aborted, Some(e.to_string()));
                    self.step(Phase::Migrating, format!("{name}: move aborted: {e}"))?;
                    return self.roll_back(e.to_string());
                }
            }
        }
        self.hand_over(old, new)?;
        self.finish(Outcome::Upgraded, None)
    }

    fn refuse(&mut self, reason: String) -> Result<(), UpgradeError> {
        self.finish(Outcome::Refused, Some(reason.clone()))?;
        Err(UpgradeError::Refused(reason))
    }

    fn boot_new(&mut self, new: InstanceId, kernel: &LoadableKernel<'_>) -> Result<(), String> {
        self.platform.load(new, kernel).map_err(|e| e.to_string())?;
        self.step(
            Phase::KernelLoaded,
            format!("kernel {} loaded into instance {new}", kernel.release),
        )
        .map_err(|e| e.to_string())?;
        self.platform.boot(new).map_err(|e| e.to_string())?;
        self.step(Phase::Booted, format!("instance {new} booted"))
            .map_err(|e| e.to_string())?;
        self.heartbeat(new).map_err(|e| e.to_string())?;
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
        if self.channels.contains_key(&new) {
            let _ = self.send(
                new,
                Message::ReleaseResources(ReleaseResources {
                    cpus: old_res.cpus.clone(),
                    memory_bytes: old_res.memory_bytes,
                }),
                &[],
            );
            let _ = self.send(
                new,
                Message::Shutdown(Shutdown {
                    reason: "upgrade complete".into(),
                }),
                &[],
            );
        }
        self.channels.clear();
        self.converge_forward(old, new)
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

    /// Moves every committed workload back to the old instance (reverse order), removes the
    /// new instance and gives the old one its resources back.
    fn roll_back(&mut self, reason: String) -> Result<(), UpgradeError> {
        let old = self.record.old_instance;
        self.step(Phase::RollingBack, format!("rolling back: {reason}"))?;
        let mut stuck = Vec::new();
        if let Some(new) = self.record.new_instance {
            let moved: Vec<String> = self
                .record
                .workloads
                .iter()
                .rev()
                .filter(|w| w.status == MoveStatus::Committed)
                .map(|w| w.name.clone())
                .collect();
            // The channel to the new instance is not needed any more: closing it makes the
            // receiver stop any uncommitted copy.
            self.channels.remove(&new);
            for name in moved {
                match self.move_workload(new, old, &name, Phase::RollingBack) {
                    Ok(blackout) => {
                        self.set_status(&name, MoveStatus::MovedBack, None);
                        if let Some(w) = self.record.workload_mut(&name) {
                            w.blackout_us = Some(w.blackout_us.unwrap_or(0) + blackout);
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
            self.channels.clear();
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
        self.finish(Outcome::RolledBack, Some(reason.clone()))?;
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

    fn restore_old_resources(&mut self) -> Result<(), UpgradeError> {
        let old = self.record.old_instance;
        let want = self.record.old_resources.clone();
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

/// Brings an interrupted upgrade to an end: fully new if every workload had moved, else
/// fully old. Returns the finished record, or `None` when no upgrade was in flight.
pub fn recover<'a>(
    platform: &'a mut dyn Platform,
    setup: Setup<'a>,
) -> Result<Option<UpgradeRecord>, UpgradeError> {
    let Some(mut record) = setup.journal.current()? else {
        return Ok(None);
    };
    record.recovered = true;
    let mut o = Orchestrator::resume(platform, setup, record)?;
    let phase = o.record.phase;
    o.step(phase, format!("recovery: resuming from phase {phase:?}"))?;
    let old = o.record.old_instance;
    let result = match (phase, o.record.new_instance) {
        (Phase::Done, _) => {
            let outcome = o.record.outcome.unwrap_or(Outcome::Failed);
            o.finish(outcome, o.record.error.clone())
        }
        (Phase::HandingOver, Some(new)) => o
            .converge_forward(old, new)
            .and_then(|()| o.finish(Outcome::Upgraded, None)),
        _ => o.recover_backward(),
    };
    match result {
        Ok(()) | Err(UpgradeError::RolledBack { .. }) => Ok(Some(o.record)),
        Err(e) => Err(e),
    }
}

impl Orchestrator<'_> {
    fn recover_backward(&mut self) -> Result<(), UpgradeError> {
        let old = self.record.old_instance;
        let insts = self.platform.instances()?;
        // Instances this upgrade created but never journaled (crash between create and
        // journal write) are removed; so is anything not old and not the journaled new one.
        for i in &insts {
            if i.id != old && Some(i.id) != self.record.new_instance {
                if i.state == InstanceState::Active {
                    self.platform.halt(i.id)?;
                }
                self.platform.destroy(i.id)?;
            }
        }
        let on = |id: Option<InstanceId>, name: &str| -> Option<crate::platform::WorkloadInfo> {
            insts
                .iter()
                .find(|i| Some(i.id) == id && i.state == InstanceState::Active)
                .and_then(|i| i.workloads.iter().find(|w| w.name == name).cloned())
        };
        let new = self.record.new_instance;
        let back_in_progress = self.record.phase == Phase::RollingBack;
        for w in self.record.workloads.clone() {
            let on_old = on(Some(old), &w.name);
            let mut on_new = on(new, &w.name);
            if let (Some(n), Some(nw)) = (new, &on_new)
                && nw.pending_commit
            {
                self.platform.stop_workload(n, &w.name)?;
                on_new = None;
            }
            match (on_old, on_new) {
                (Some(o), Some(_)) => {
                    // Both copies exist: a commit reached its target. Forward moves commit
                    // on the new instance; during rollback, moves commit on the old one.
                    if back_in_progress && w.status != MoveStatus::Committed {
                        self.platform.stop_workload(new.unwrap_or(old), &w.name)?;
                        self.set_status(&w.name, MoveStatus::MovedBack, None);
                    } else {
                        if o.frozen || w.status == MoveStatus::Committing {
                            self.platform.stop_workload(old, &w.name)?;
                        }
                        self.set_status(&w.name, MoveStatus::Committed, None);
                    }
                }
                (Some(o), None) => {
                    if o.frozen {
                        self.platform.thaw(old, &w.name)?;
                    }
                    if w.status != MoveStatus::MovedBack && w.status != MoveStatus::Pending {
                        self.set_status(
                            &w.name,
                            MoveStatus::Aborted,
                            Some("recovered on the old instance".into()),
                        );
                    }
                }
                (None, Some(nw)) => {
                    if nw.frozen
                        && let Some(n) = new
                    {
                        self.platform.thaw(n, &w.name)?;
                    }
                    self.set_status(&w.name, MoveStatus::Committed, None);
                }
                (None, None) => {
                    let msg = format!(
                        "{} runs on no instance after the crash; its preserved state may be lost: restart it by hand",
                        w.name
                    );
                    self.set_status(&w.name, MoveStatus::Aborted, Some(msg.clone()));
                    self.finish(Outcome::Failed, Some(msg.clone()))?;
                    return Err(UpgradeError::Failed(msg));
                }
            }
        }
        self.step(Phase::RollingBack, "recovery: state reconciled".into())?;
        self.roll_back("the agent stopped mid-upgrade; recovery rolled back".into())
    }
}
