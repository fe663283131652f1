//! The journal record of one upgrade: everything recovery needs to finish it or undo it.
//!
//! It is journaled durably (see the `rollback` crate: what changed is appended to the
//! journal's log, [`RecordDelta`]) *before* each step that changes the machine, so after a
//! crash at any point the record names the last step that may have happened, and every step
//! is idempotent or checkable against the platform.

use serde::{Deserialize, Serialize};

use crate::model::{InstanceId, PlatformKind, Resources};

/// Why the upgrade runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpgradeKind {
    /// `mk-upgrade apply`: to a new kernel.
    Apply,
    /// `mk-upgrade rollback`: back to the previous (known-good) kernel.
    Rollback,
}

/// How far the upgrade got. Ordered: later phases compare greater.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The image verified; nothing changed on the machine yet.
    Verified,
    /// The running instance gave up cpus so that spare cores exist.
    ShrunkOld,
    /// The new instance exists (`ready`) on spare resources.
    InstanceCreated,
    /// The verified image is loaded into it (`loaded`).
    KernelLoaded,
    /// It booted (`active`).
    Booted,
    /// Workloads are moving, one at a time.
    Migrating,
    /// Every workload moved; the old instance halts and hands its resources over.
    HandingOver,
    /// Undoing: moved workloads go back, the new instance halts.
    RollingBack,
    /// Finished (see `outcome`).
    Done,
}

/// Where one workload is in its move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoveStatus {
    /// Not touched yet.
    Pending,
    /// Being frozen on the old instance (may be frozen).
    Freezing,
    /// Its regions are offered to the new instance (a copy may run there, uncommitted).
    Offered,
    /// Commit sent to the new instance (the new copy may own it; the old copy is frozen).
    Committing,
    /// Runs on the new instance; the old copy is stopped.
    Committed,
    /// The move failed; the workload runs (thawed) on the old instance.
    Aborted,
    /// It had moved and was moved back to the old instance by a rollback.
    MovedBack,
}

/// One workload's move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadMove {
    pub name: String,
    pub status: MoveStatus,
    /// Freeze on the old instance to healthy on the new one, in microseconds.
    pub blackout_us: Option<u64>,
    /// Freeze on the old instance to "verified and started" on the new one (the agent's
    /// share of the blackout; the rest is the workload's own start-up), in microseconds.
    #[serde(default)]
    pub handover_us: Option<u64>,
    pub detail: Option<String>,
    /// How it moved (`handover`, `socket-activation`, `restart`).
    #[serde(default)]
    pub mode: crate::workload::Mode,
    /// Restart mode: from the old copy's exit (its ports closed) to the new copy passing its
    /// health check, in microseconds: connections in this window are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_us: Option<u64>,
    /// Restart mode: from the stop signal to the old copy's exit, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_us: Option<u64>,
    /// Established connections the old copy handed over with the move (`handoff_signal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
    /// `blackout_us` and `handover_us` span a kexec and are lower bounds (the kexec itself
    /// is on no clock: [`crate::platform::Claimed::blackout_lower_bound`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub blackout_lower_bound: bool,
}

impl WorkloadMove {
    /// The move of `name` before anything happened to it.
    pub fn pending(name: String, mode: crate::workload::Mode) -> WorkloadMove {
        WorkloadMove {
            name,
            status: MoveStatus::Pending,
            blackout_us: None,
            handover_us: None,
            detail: None,
            mode,
            closed_us: None,
            stop_us: None,
            connections: None,
            blackout_lower_bound: false,
        }
    }
}

/// How an upgrade ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every workload runs on the new kernel.
    Upgraded,
    /// Every workload runs on the old kernel again.
    RolledBack,
    /// Refused before anything changed.
    Refused,
    /// Could not converge: the detail says what needs an operator.
    Failed,
}

/// One journaled step, for `history` and the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the upgrade started.
    pub t_ms: u64,
    pub what: String,
    /// For an event that was a journal write: the phase journaled with it (so the list of
    /// journal writes of an upgrade can be read back from its record). `None` for events
    /// written along with the next step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journaled: Option<Phase>,
}

/// The journal record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    pub upgrade_id: String,
    pub kind: UpgradeKind,
    pub platform: PlatformKind,
    /// Unix seconds.
    pub started_at: u64,
    pub kernel_before: String,
    pub kernel_after: String,
    pub image_sha256: String,
    pub old_instance: InstanceId,
    /// The old instance's resources before any shrink (restored on rollback).
    pub old_resources: Resources,
    pub new_instance: Option<InstanceId>,
    pub phase: Phase,
    pub workloads: Vec<WorkloadMove>,
    pub events: Vec<Event>,
    pub outcome: Option<Outcome>,
    pub error: Option<String>,
    /// Recovery ran on this record (the agent died mid-upgrade).
    #[serde(default)]
    pub recovered: bool,
    /// The version floor the verified image's manifest sets, raised when the upgrade ends
    /// upgraded (kept in the record so that the process or kernel that finishes it, after a
    /// crash or a kexec, raises it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_floor: Option<String>,
    /// The boot the upgrade started in (`/proc/sys/kernel/random/boot_id`): recovery on a
    /// replace platform that finds itself in the same boot knows the kexec never happened
    /// and everything still runs on the old kernel (its agent restarted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

impl UpgradeRecord {
    /// The move of `name`.
    pub fn workload_mut(&mut self, name: &str) -> Option<&mut WorkloadMove> {
        self.workloads.iter_mut().find(|w| w.name == name)
    }
}

/// What one journaled step changed: a frame of the journal's log (`journal.log`, see
/// `rollback::journal` and docs/rollback.md), so that a step writes what it changed rather
/// than every workload and event of the upgrade again.
#[derive(Debug, Serialize, Deserialize)]
pub struct RecordDelta {
    /// Every field but the two lists, which are empty here.
    head: UpgradeRecord,
    /// The workload moves that changed, by their index in `workloads`.
    workloads: Vec<(u32, WorkloadMove)>,
    /// How many events the record had before the step; `events` follow them.
    events_from: u32,
    events: Vec<Event>,
}

impl UpgradeRecord {
    /// This record without its lists.
    fn head(&self) -> UpgradeRecord {
        // Every field named: a new field must be decided on here.
        let UpgradeRecord {
            upgrade_id,
            kind,
            platform,
            started_at,
            kernel_before,
            kernel_after,
            image_sha256,
            old_instance,
            old_resources,
            new_instance,
            phase,
            workloads: _,
            events: _,
            outcome,
            error,
            recovered,
            version_floor,
            boot_id,
        } = self;
        UpgradeRecord {
            upgrade_id: upgrade_id.clone(),
            kind: *kind,
            platform: *platform,
            started_at: *started_at,
            kernel_before: kernel_before.clone(),
            kernel_after: kernel_after.clone(),
            image_sha256: image_sha256.clone(),
            old_instance: *old_instance,
            old_resources: old_resources.clone(),
            new_instance: *new_instance,
            phase: *phase,
            workloads: Vec::new(),
            events: Vec::new(),
            outcome: *outcome,
            error: error.clone(),
            recovered: *recovered,
            version_floor: version_floor.clone(),
            boot_id: boot_id.clone(),
        }
    }
}

impl rollback::Record for UpgradeRecord {
    type Delta = RecordDelta;

    /// The list of workloads keeps its length during an upgrade and events are only ever
    /// appended (the orchestrator pushes them); a change of another shape is written whole.
    /// Comparing both lists costs microseconds at 500 workloads; writing them whole costs
    /// the fsync of the whole record.
    fn delta_from(&self, prev: &Self) -> Option<RecordDelta> {
        let from = prev.events.len();
        if self.workloads.len() != prev.workloads.len()
            || self.events.get(..from) != Some(&prev.events[..])
        {
            return None;
        }
        let workloads = (self.workloads.iter().zip(&prev.workloads).enumerate())
            .filter(|(_, (now, before))| now != before)
            .map(|(i, (now, _))| Some((u32::try_from(i).ok()?, now.clone())))
            .collect::<Option<Vec<_>>>()?;
        Some(RecordDelta {
            head: self.head(),
            workloads,
            events_from: u32::try_from(from).ok()?,
            events: self.events[from..].to_vec(),
        })
    }

    fn apply(&mut self, d: RecordDelta) -> Result<(), String> {
        if d.events_from as usize != self.events.len() {
            return Err(format!(
                "it adds events after the first {}, the record has {}",
                d.events_from,
                self.events.len()
            ));
        }
        if !d.head.workloads.is_empty() || !d.head.events.is_empty() {
            return Err("its head carries lists".into());
        }
        if let Some((i, _)) = d
            .workloads
            .iter()
            .find(|(i, _)| *i as usize >= self.workloads.len())
        {
            return Err(format!(
                "it changes workload {i}, the record has {}",
                self.workloads.len()
            ));
        }
        let workloads = std::mem::take(&mut self.workloads);
        let events = std::mem::take(&mut self.events);
        *self = d.head;
        self.workloads = workloads;
        self.events = events;
        for (i, w) in d.workloads {
            self.workloads[i as usize] = w;
        }
        self.events.extend(d.events);
        Ok(())
    }
}

impl UpgradeRecord {
    /// Whether the step that boots the new kernel by replacing this one (the kexec, phase
    /// `Booted`) was journaled: from then on only the next kernel, or a cold boot, can
    /// tell how the upgrade went.
    pub fn kexec_journaled(&self) -> bool {
        self.events
            .iter()
            .any(|e| e.journaled == Some(Phase::Booted))
    }

    /// The report of this record: one JSON document (`mk-upgrade apply --json`, `history
    /// --json`, the LUO agent's `MK-UPGRADE-RESULT` line). docs/cli.md documents its fields.
    pub fn report_json(&self) -> serde_json::Value {
        let result = match self.outcome {
            Some(Outcome::Upgraded) => "upgraded",
            Some(Outcome::RolledBack) => "rolled-back",
            Some(Outcome::Refused) => "refused",
            Some(Outcome::Failed) => "failed",
            None => "in-flight",
        };
        serde_json::json!({
            "result": result,
            "upgrade_id": self.upgrade_id,
            "kind": self.kind,
            "platform": self.platform,
            "emulated": self.platform == PlatformKind::Emulated,
            "kernel_before": self.kernel_before,
            "kernel_after": self.kernel_after,
            "image_sha256": self.image_sha256,
            "old_instance": self.old_instance,
            "new_instance": self.new_instance,
            "started_at": rollback::time::fmt_utc(self.started_at),
            "recovered": self.recovered,
            "workloads": self.workloads.iter().map(|w| serde_json::json!({
                "name": w.name,
                "moved": w.status == MoveStatus::Committed,
                "status": w.status,
                "blackout_ms": w.blackout_us.map(|u| u as f64 / 1000.0),
                "blackout_lower_bound": w.blackout_lower_bound,
                "mode": w.mode,
                "closed_ms": w.closed_us.map(|u| u as f64 / 1000.0),
                "stop_ms": w.stop_us.map(|u| u as f64 / 1000.0),
                "connections": w.connections,
                "detail": w.detail,
            })).collect::<Vec<_>>(),
            "events": self.events,
            "error": self.error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollback::Record;

    fn record(n: usize) -> UpgradeRecord {
        UpgradeRecord {
            upgrade_id: "ab".repeat(16),
            kind: UpgradeKind::Apply,
            platform: PlatformKind::Emulated,
            started_at: 1_796_000_000,
            kernel_before: "7.2.13-mkA".into(),
            kernel_after: "7.2.14-mkB".into(),
            image_sha256: "cd".repeat(32),
            old_instance: 1,
            old_resources: Resources {
                cpus: vec![0, 1],
                memory_bytes: 1 << 30,
            },
            new_instance: None,
            phase: Phase::Verified,
            workloads: (0..n)
                .map(|i| WorkloadMove::pending(format!("kv-{i}"), crate::workload::Mode::Handover))
                .collect(),
            events: Vec::new(),
            outcome: None,
            error: None,
            recovered: false,
            version_floor: None,
            boot_id: None,
        }
    }

    /// One change an upgrade makes to its record between two journal writes.
    fn mutate(r: &mut UpgradeRecord, op: u8, x: u16) {
        let n = r.workloads.len();
        match op % 8 {
            0 => r.phase = Phase::Migrating,
            1 if n > 0 => r.workloads[x as usize % n].status = MoveStatus::Committed,
            2 if n > 0 => {
                let w = &mut r.workloads[x as usize % n];
                w.blackout_us = Some(u64::from(x));
                w.detail = Some(format!("moved {x}"));
            }
            3 => r.events.push(Event {
                t_ms: u64::from(x),
                what: format!("step {x}"),
                journaled: Some(Phase::Migrating),
            }),
            4 => r.new_instance = Some(x),
            5 => r.error = Some(format!("error {x}")),
            6 => r.outcome = Some(Outcome::RolledBack),
            _ => r.recovered = !r.recovered,
        }
    }

    proptest::proptest! {
        /// What `delta_from` says, read back as the journal reads it (JSON), rebuilds the
        /// record exactly, whatever the upgrade changed between two writes.
        #[test]
        fn a_delta_read_back_rebuilds_the_record(
            n in 0usize..20,
            steps in proptest::collection::vec(
                proptest::collection::vec((0u8..8, 0u16..1000), 0..6), 1..12),
        ) {
            let mut on_disk = record(n);
            let mut now = on_disk.clone();
            for changes in steps {
                for (op, x) in changes {
                    mutate(&mut now, op, x);
                }
                let delta = now.delta_from(&on_disk).expect("same workloads, events added");
                let bytes = serde_json::to_vec(&delta).unwrap();
                let changed = now.workloads.iter().zip(&on_disk.workloads).filter(|(a, b)| a != b).count();
                proptest::prop_assert_eq!(delta.workloads.len(), changed);
                on_disk.apply(serde_json::from_slice(&bytes).unwrap()).unwrap();
                proptest::prop_assert_eq!(&on_disk, &now);
            }
        }
    }

    #[test]
    fn a_step_writes_only_what_changed() {
        let before = record(500);
        let mut after = before.clone();
        after.phase = Phase::Migrating;
        after.workloads[321].status = MoveStatus::Freezing;
        mutate(&mut after, 3, 1);
        let d = after.delta_from(&before).unwrap();
        let len = serde_json::to_vec(&d).unwrap().len();
        assert_eq!(d.workloads.len(), 1);
        assert!(len < 1024, "{len} bytes for one workload and one event");
        // Whole when a list changes otherwise.
        let mut fewer = before.clone();
        fewer.workloads.pop();
        assert!(fewer.delta_from(&before).is_none());
        let mut rewritten = after.clone();
        rewritten.events[0].what = "edited".into();
        assert!(rewritten.delta_from(&after).is_none());
    }

    #[test]
    fn a_delta_that_does_not_fit_is_refused_not_applied_wrongly() {
        let r = record(3);
        let mut grown = record(3);
        mutate(&mut grown, 3, 5);
        let d = |v: serde_json::Value| serde_json::from_value::<RecordDelta>(v).unwrap();
        let mut head = serde_json::to_value(r.head()).unwrap();
        let bad = [
            serde_json::json!({"head": head, "workloads": [[3, r.workloads[0]]], "events_from": 0, "events": []}),
            serde_json::json!({"head": head, "workloads": [], "events_from": 1, "events": []}),
            serde_json::json!({"head": head, "workloads": [[4294967295u32, r.workloads[0]]], "events_from": 0, "events": []}),
        ];
        for v in bad {
            let e = r.clone().apply(d(v.clone())).unwrap_err();
            assert!(e.contains("workload") || e.contains("events"), "{v}: {e}");
        }
        head["workloads"] = serde_json::to_value(&r.workloads).unwrap();
        let e = r
            .clone()
            .apply(d(
                serde_json::json!({"head": head, "workloads": [], "events_from": 0, "events": []}),
            ))
            .unwrap_err();
        assert!(e.contains("lists"), "{e}");
    }
}
