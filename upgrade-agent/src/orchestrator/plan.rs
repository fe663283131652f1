//! The recovery planner: a pure decision table from what the journal says and what the
//! platform shows to what recovery must do. No I/O here: [`plan`] and [`reconcile`] are
//! table-tested below, and the orchestrator carries their answers out.
//!
//! | journal record | this boot | plan |
//! | --- | --- | --- |
//! | none | — | [`Plan::Nothing`] |
//! | phase `Done` | — | [`Plan::Finish`]: write the finished record to history |
//! | replace platform, carried over by a kexec, phase `Booted` | the new kernel | [`Plan::ClaimForward`]: verify, restore, health-check every staged workload; commit, or return to the previous kernel |
//! | replace platform, carried over by a kexec, phase `RollingBack` | the previous kernel again | [`Plan::ClaimReturn`]: restore every returned workload; rolled back |
//! | replace platform, not carried over, same boot as the upgrade started in | the old kernel (its agent restarted; no kexec happened) | [`Plan::Settle`] as rolled back: the running copies were adopted and thawed; every workload must be running and healthy |
//! | replace platform, not carried over, another boot, phase `HandingOver` (the commit) | the new kernel (its agent restarted after the commit) | [`Plan::Settle`] as upgraded: the committed copies were adopted; confirm the kernel once every workload is running and healthy |
//! | replace platform, not carried over, another boot, the kexec step (`Booted`) never journaled | the old kernel (cold boot) | [`Plan::Abandon`] as rolled back: nothing but the journal survived |
//! | replace platform, not carried over, another boot, the kexec step journaled | the old kernel (cold boot), or the new one after its agent restarted | [`Plan::Abandon`] as failed: the new kernel did not take over or its agent stopped; what lived only in memory is lost |
//! | side by side, phase `HandingOver` | — | [`Plan::ConvergeForward`]: every workload moved; halt the old instance, give its resources to the new one |
//! | side by side, any other phase | — | [`Plan::Reconcile`]: settle each workload with [`reconcile`], then roll back |

use crate::model::WorkloadInfo;
use crate::record::{MoveStatus, Outcome, Phase, UpgradeRecord};

/// What recovery does with an interrupted upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No upgrade in flight.
    Nothing,
    /// The record is finished already: file it with this outcome.
    Finish(Outcome),
    /// Side by side, every workload had moved: finish forward.
    ConvergeForward,
    /// Side by side, interrupted: settle each workload, then roll back.
    Reconcile,
    /// Replace, in the kernel the upgrade booted: claim the staged workloads.
    ClaimForward,
    /// Replace, back in the previous kernel after a failure: claim the returned workloads.
    ClaimReturn,
    /// Replace, nothing was carried over: finish the record with this outcome and reason;
    /// the workloads start from the workload file.
    Abandon { outcome: Outcome, reason: String },
    /// Replace, the agent restarted in a kernel whose workloads still run (adopted): finish
    /// with this outcome once every workload is seen running and healthy on it (else
    /// failed); an upgraded one also confirms the kernel.
    Settle { outcome: Outcome, reason: String },
}

/// What the platform shows at recovery time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Whether the platform replaces the kernel (LUO) rather than booting beside it.
    pub replace: bool,
    /// Replace platforms: whether this boot received the record from the previous kernel.
    pub carried_over: bool,
    /// The release of the running kernel.
    pub running_release: String,
    /// Replace platforms: this is the boot the upgrade started in (the record's `boot_id`),
    /// so no kexec happened: the agent itself restarted.
    pub same_boot: bool,
}

/// Decides what recovery does with `record`.
pub fn plan(record: Option<&UpgradeRecord>, seen: &Observed) -> Plan {
    let Some(r) = record else {
        return Plan::Nothing;
    };
    if r.phase == Phase::Done {
        return Plan::Finish(r.outcome.unwrap_or(Outcome::Failed));
    }
    if !seen.replace {
        return if r.phase == Phase::HandingOver && r.new_instance.is_some() {
            Plan::ConvergeForward
        } else {
            Plan::Reconcile
        };
    }
    if seen.carried_over {
        return if r.phase == Phase::RollingBack {
            Plan::ClaimReturn
        } else {
            Plan::ClaimForward
        };
    }
    if seen.same_boot {
        Plan::Settle {
            outcome: Outcome::RolledBack,
            reason: format!(
                "the agent stopped mid-upgrade (phase {:?}) and restarted; no kexec happened: \
                 {} still runs, and the workloads' running copies were adopted and thawed",
                r.phase, seen.running_release
            ),
        }
    } else if r.phase == Phase::HandingOver && seen.running_release == r.kernel_after {
        Plan::Settle {
            outcome: Outcome::Upgraded,
            reason: format!(
                "the agent of {} stopped after the commit and restarted: the committed \
                 workloads' running copies were adopted",
                r.kernel_after
            ),
        }
    } else if r.kexec_journaled() {
        Plan::Abandon {
            outcome: Outcome::Failed,
            reason: format!(
                "kernel {} did not come up, or its agent stopped before finishing (phase \
                 {:?}); the machine runs {}. Workloads not running any more restart from the \
                 workload file; state they kept only in memory is lost",
                r.kernel_after, r.phase, seen.running_release
            ),
        }
    } else {
        Plan::Abandon {
            outcome: Outcome::RolledBack,
            reason: format!(
                "interrupted before the kexec (phase {:?}): the machine restarted on {}; the \
                 workloads restart from the workload file",
                r.phase, seen.running_release
            ),
        }
    }
}

/// One step of settling a workload after a side-by-side crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Stop the copy on the new instance.
    StopNew,
    /// Stop the copy on the old instance.
    StopOld,
    /// Thaw the copy on the old instance.
    ThawOld,
    /// Thaw the copy on the new instance.
    ThawNew,
    /// Record this status (and, for `Aborted`, that it was recovered on the old instance).
    Status(MoveStatus),
    /// It runs nowhere: the upgrade fails and needs an operator.
    Lost,
}

/// Settles one workload after a side-by-side crash, from its journaled status and the copies
/// the instances show. `rolling_back` is whether the crash happened during a rollback
/// (moves then commit on the old instance). Applied in order.
pub fn reconcile(
    w_status: MoveStatus,
    on_old: Option<&WorkloadInfo>,
    on_new: Option<&WorkloadInfo>,
    rolling_back: bool,
) -> Vec<Action> {
    let mut actions = Vec::new();
    // A received copy nobody committed never serves: stop it first.
    let on_new = match on_new {
        Some(n) if n.pending_commit => {
            actions.push(Action::StopNew);
            None
        }
        other => other,
    };
    match (on_old, on_new) {
        (Some(o), Some(_)) => {
            // Both copies exist: a commit reached its target. Forward moves commit on the
            // new instance; during rollback, moves commit on the old one.
            if rolling_back && w_status != MoveStatus::Committed {
                actions.push(Action::StopNew);
                actions.push(Action::Status(MoveStatus::MovedBack));
            } else {
                if o.frozen || w_status == MoveStatus::Committing {
                    actions.push(Action::StopOld);
                }
                actions.push(Action::Status(MoveStatus::Committed));
            }
        }
        (Some(o), None) => {
            if o.frozen {
                actions.push(Action::ThawOld);
            }
            if w_status != MoveStatus::MovedBack && w_status != MoveStatus::Pending {
                actions.push(Action::Status(MoveStatus::Aborted));
            }
        }
        (None, Some(n)) => {
            if n.frozen {
                actions.push(Action::ThawNew);
            }
            actions.push(Action::Status(MoveStatus::Committed));
        }
        (None, None) => actions.push(Action::Lost),
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PlatformKind, Resources};
    use crate::record::{UpgradeKind, WorkloadMove};

    fn record(phase: Phase, new: Option<u16>) -> UpgradeRecord {
        UpgradeRecord {
            upgrade_id: "00".repeat(16),
            kind: UpgradeKind::Apply,
            platform: PlatformKind::Emulated,
            started_at: 0,
            kernel_before: "A".into(),
            kernel_after: "B".into(),
            image_sha256: String::new(),
            old_instance: 1,
            old_resources: Resources::default(),
            new_instance: new,
            phase,
            workloads: vec![WorkloadMove::pending(
                "w".into(),
                crate::workload::Mode::Handover,
            )],
            events: Vec::new(),
            outcome: None,
            error: None,
            recovered: false,
            version_floor: None,
            boot_id: None,
        }
    }

    fn seen(replace: bool, carried_over: bool, running: &str) -> Observed {
        Observed {
            replace,
            carried_over,
            running_release: running.into(),
            same_boot: false,
        }
    }

    const ALL_PHASES: [Phase; 9] = [
        Phase::Verified,
        Phase::ShrunkOld,
        Phase::InstanceCreated,
        Phase::KernelLoaded,
        Phase::Booted,
        Phase::Migrating,
        Phase::HandingOver,
        Phase::RollingBack,
        Phase::Done,
    ];

    #[test]
    fn no_record_means_nothing_to_do() {
        assert_eq!(plan(None, &seen(false, false, "A")), Plan::Nothing);
        assert_eq!(plan(None, &seen(true, true, "B")), Plan::Nothing);
    }

    #[test]
    fn a_finished_record_is_filed_with_its_outcome() {
        let mut r = record(Phase::Done, Some(2));
        r.outcome = Some(Outcome::Upgraded);
        assert_eq!(
            plan(Some(&r), &seen(false, false, "B")),
            Plan::Finish(Outcome::Upgraded)
        );
        r.outcome = None;
        assert_eq!(
            plan(Some(&r), &seen(true, false, "A")),
            Plan::Finish(Outcome::Failed)
        );
    }

    #[test]
    fn side_by_side_converges_forward_only_from_handing_over() {
        for phase in ALL_PHASES {
            let r = record(phase, Some(2));
            let p = plan(Some(&r), &seen(false, false, "A"));
            let want = match phase {
                Phase::Done => Plan::Finish(Outcome::Failed),
                Phase::HandingOver => Plan::ConvergeForward,
                _ => Plan::Reconcile,
            };
            assert_eq!(p, want, "phase {phase:?}");
        }
        // Handing over without a journaled new instance cannot go forward.
        let r = record(Phase::HandingOver, None);
        assert_eq!(plan(Some(&r), &seen(false, false, "A")), Plan::Reconcile);
    }

    #[test]
    fn replace_claims_what_a_kexec_carried_over() {
        let r = record(Phase::Booted, Some(2));
        assert_eq!(plan(Some(&r), &seen(true, true, "B")), Plan::ClaimForward);
        let r = record(Phase::RollingBack, Some(2));
        assert_eq!(plan(Some(&r), &seen(true, true, "A")), Plan::ClaimReturn);
    }

    #[test]
    fn replace_without_a_carried_record_abandons_the_upgrade() {
        // Whatever the phase (staging journals `migrating`, an unwinding rollback
        // `rolling-back`), what decides is whether the kexec step was journaled.
        for phase in ALL_PHASES {
            if phase == Phase::Done {
                continue;
            }
            for kexec in [false, true] {
                let mut r = record(phase, Some(2));
                if kexec {
                    r.events.push(crate::record::Event {
                        t_ms: 1,
                        what: "booting B (kexec)".into(),
                        journaled: Some(Phase::Booted),
                    });
                }
                match plan(Some(&r), &seen(true, false, "A")) {
                    Plan::Abandon { outcome, reason } => {
                        if kexec {
                            assert_eq!(outcome, Outcome::Failed, "phase {phase:?}");
                            assert!(reason.contains("did not come up"), "{reason}");
                        } else {
                            assert_eq!(outcome, Outcome::RolledBack, "phase {phase:?}");
                            assert!(reason.contains("before the kexec"), "{reason}");
                        }
                    }
                    other => panic!("phase {phase:?} kexec {kexec}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn replace_in_the_same_boot_settles_as_rolled_back_whatever_the_phase() {
        // The agent restarted and no kexec happened, even with the kexec step journaled:
        // the running copies are adopted and must be verified.
        for phase in ALL_PHASES {
            if phase == Phase::Done {
                continue;
            }
            let r = record(phase, Some(2));
            let mut s = seen(true, false, "A");
            s.same_boot = true;
            match plan(Some(&r), &s) {
                Plan::Settle { outcome, reason } => {
                    assert_eq!(outcome, Outcome::RolledBack, "phase {phase:?}");
                    assert!(reason.contains("no kexec happened"), "{reason}");
                }
                other => panic!("phase {phase:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn replace_after_the_commit_settles_as_upgraded_only_in_the_new_kernel() {
        let mut r = record(Phase::HandingOver, Some(2));
        r.events.push(crate::record::Event {
            t_ms: 1,
            what: "booting B (kexec)".into(),
            journaled: Some(Phase::Booted),
        });
        match plan(Some(&r), &seen(true, false, "B")) {
            Plan::Settle { outcome, reason } => {
                assert_eq!(outcome, Outcome::Upgraded);
                assert!(reason.contains("after the commit"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // A cold boot back to A after the commit: B's copies are gone.
        assert!(matches!(
            plan(Some(&r), &seen(true, false, "A")),
            Plan::Abandon {
                outcome: Outcome::Failed,
                ..
            }
        ));
        // Before the commit (still claiming): what was not claimed is lost.
        r.phase = Phase::Migrating;
        assert!(matches!(
            plan(Some(&r), &seen(true, false, "B")),
            Plan::Abandon {
                outcome: Outcome::Failed,
                ..
            }
        ));
    }

    fn info(frozen: bool, pending: bool) -> WorkloadInfo {
        WorkloadInfo {
            name: "w".into(),
            pid: 1,
            frozen,
            pending_commit: pending,
            ..WorkloadInfo::default()
        }
    }

    #[test]
    fn reconcile_table() {
        use Action::*;
        use MoveStatus::*;
        let thawed = info(false, false);
        let frozen = info(true, false);
        let pending = info(false, true);
        type Case<'a> = (
            MoveStatus,
            Option<&'a WorkloadInfo>,
            Option<&'a WorkloadInfo>,
            bool,
            Vec<Action>,
        );
        let cases: Vec<Case<'_>> = vec![
            // Never touched: runs on old, nothing to do.
            (Pending, Some(&thawed), None, false, vec![]),
            // Frozen on old, nothing on new: thaw, aborted.
            (
                Freezing,
                Some(&frozen),
                None,
                false,
                vec![ThawOld, Status(Aborted)],
            ),
            // Offered, copy on new not committed: stop it, thaw old.
            (
                Offered,
                Some(&frozen),
                Some(&pending),
                false,
                vec![StopNew, ThawOld, Status(Aborted)],
            ),
            // Commit reached new, old still frozen: stop old, committed.
            (
                Committing,
                Some(&frozen),
                Some(&thawed),
                false,
                vec![StopOld, Status(Committed)],
            ),
            // Committed and old already gone.
            (
                Committed,
                None,
                Some(&thawed),
                false,
                vec![Status(Committed)],
            ),
            // Committed, new copy left frozen by a crashed move back: thaw it.
            (
                Committed,
                None,
                Some(&frozen),
                true,
                vec![ThawNew, Status(Committed)],
            ),
            // Rolling back: the move back committed on old: stop the new copy.
            (
                Offered,
                Some(&thawed),
                Some(&thawed),
                true,
                vec![StopNew, Status(MovedBack)],
            ),
            // Moved back already.
            (MovedBack, Some(&thawed), None, true, vec![]),
            // Nowhere.
            (Committed, None, None, false, vec![Lost]),
            (Offered, None, Some(&pending), false, vec![StopNew, Lost]),
        ];
        for (status, old, new, back, want) in cases {
            assert_eq!(
                reconcile(status, old, new, back),
                want,
                "{status:?} old={old:?} new={new:?} rolling_back={back}"
            );
        }
    }
}
