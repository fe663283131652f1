//! The journal record of one upgrade: everything recovery needs to finish it or undo it.
//!
//! It is rewritten (atomically, see the `rollback` crate) *before* each step that changes
//! the machine, so after a crash at any point the record names the last step that may have
//! happened, and every step is idempotent or checkable against the platform.

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
