//! Recovery: what [`recover`] does with an interrupted upgrade, as the pure planner
//! ([`super::plan`]) decides.

use super::plan::{self, Action, Observed, Plan};
use super::{Orchestrator, Setup, UpgradeError, current_instance};
use crate::platform::{InstanceId, InstanceState, Platform};
use crate::record::{MoveStatus, Outcome, Phase, UpgradeRecord};

/// Brings an interrupted upgrade to an end: fully new if every workload had moved, else
/// fully old; on a replace platform, carries on with what the kexec carried over. Returns
/// the finished record, or `None` when no upgrade was in flight.
pub fn recover<'a>(
    platform: &'a mut dyn Platform,
    setup: Setup<'a>,
) -> Result<Option<UpgradeRecord>, UpgradeError> {
    let caps = platform.probe()?;
    let carried = if caps.side_by_side {
        None
    } else {
        platform.handed_over()
    };
    let journaled = setup.journal.current()?;
    // The record a kexec carried is newer than anything this kernel's journal holds, unless
    // this kernel's agent journaled that same upgrade further before it restarted.
    let record = match (carried.clone(), journaled) {
        (Some(c), Some(j)) if j.upgrade_id == c.upgrade_id && j.events.len() > c.events.len() => {
            // The agent restarted mid-claim: say so in the record.
            Some(UpgradeRecord {
                recovered: true,
                ..j
            })
        }
        (c, j) => c.or(j),
    };
    let running = current_instance(platform)
        .ok()
        .and_then(|i| i.kernel_release)
        .unwrap_or_default();
    let same_boot = !caps.side_by_side
        && carried.is_none()
        && record
            .as_ref()
            .and_then(|r| r.boot_id.as_ref())
            .is_some_and(|b| Some(b) == setup.env.boot_id().as_ref());
    let seen = Observed {
        replace: !caps.side_by_side,
        carried_over: carried.is_some(),
        running_release: running,
        same_boot,
    };
    let decision = plan::plan(record.as_ref(), &seen);
    let Some(mut record) = record else {
        return Ok(None);
    };
    if decision != Plan::ClaimForward && decision != Plan::ClaimReturn {
        record.recovered = true;
    }
    let mut o = Orchestrator::with_record(platform, setup, record)?;
    let phase = o.record.phase;
    let result = match decision {
        Plan::Nothing => return Ok(None),
        Plan::Finish(outcome) => {
            let error = o.record.error.clone();
            o.finish(outcome, error)
        }
        Plan::ConvergeForward => {
            o.step(phase, format!("recovery: resuming from phase {phase:?}"))?;
            let (old, new) = (
                o.record.old_instance,
                o.record
                    .new_instance
                    .expect("planned only with a new instance"),
            );
            let new_active = o
                .platform
                .instances()?
                .iter()
                .any(|i| i.id == new && i.state == InstanceState::Active);
            if new_active {
                o.converge_forward(old, new)
                    .and_then(|()| o.end_verified(new, Outcome::Upgraded, None))
            } else if let Some(super::Death::New { new: n }) = o.who_died()? {
                // Every workload had moved, and the new instance died: back to the old one.
                o.survive_new_crash(n, "found dead at recovery")
            } else {
                // The old instance was halted already: boot the new kernel again.
                o.reboot(new, "the new instance was found dead at recovery")
            }
        }
        Plan::Reconcile => {
            o.step(phase, format!("recovery: resuming from phase {phase:?}"))?;
            o.reconcile()
        }
        Plan::ClaimForward => o.claim_forward(),
        Plan::ClaimReturn => o.claim_return(),
        Plan::Settle { outcome, reason } => {
            // The workloads run here (adopted after the agent's restart): the outcome holds
            // only once every one of them is seen running and healthy.
            o.note(format!("recovered after an agent restart: {reason}"));
            let on = current_instance(o.platform)?.id;
            if outcome == Outcome::Upgraded {
                o.platform.confirm()?;
                o.end_verified(on, outcome, None)
            } else {
                abandon(&mut o.record);
                // A next kernel the stopped run loaded stays loaded otherwise.
                if let Some(new) = o.record.new_instance.filter(|n| *n != on)
                    && let Err(e) = o.platform.destroy(new)
                {
                    o.note(format!("undoing instance {new}: {e}"));
                }
                o.end_verified(on, outcome, Some(reason))
            }
        }
        Plan::Abandon { outcome, reason } => {
            abandon(&mut o.record);
            o.note(format!("recovered at boot: {reason}"));
            o.finish(outcome, Some(reason))
        }
    };
    match result {
        Ok(()) | Err(UpgradeError::RolledBack { .. }) => Ok(Some(o.record)),
        Err(UpgradeError::Failed(_)) if o.record.phase == Phase::Done => Ok(Some(o.record)),
        Err(e) => Err(e),
    }
}

/// Marks every workload of an abandoned record (replace platforms: nothing but the journal
/// survived) as aborted; they start again from the workload file.
pub fn abandon(record: &mut UpgradeRecord) {
    record.recovered = true;
    for w in &mut record.workloads {
        w.status = MoveStatus::Aborted;
    }
}

impl Orchestrator<'_> {
    /// Side by side after a crash: settles each workload ([`plan::reconcile`]), then rolls
    /// back.
    fn reconcile(&mut self) -> Result<(), UpgradeError> {
        let old = self.record.old_instance;
        if let Some(death) = self.who_died()? {
            return self.survive(death, "found dead at recovery");
        }
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
        let on = |id: Option<InstanceId>, name: &str| -> Option<crate::model::WorkloadInfo> {
            insts
                .iter()
                .find(|i| Some(i.id) == id && i.state == InstanceState::Active)
                .and_then(|i| i.workloads.iter().find(|w| w.name == name).cloned())
        };
        let new = self.record.new_instance;
        let back = self.record.phase == Phase::RollingBack;
        for w in self.record.workloads.clone() {
            let on_old = on(Some(old), &w.name);
            let on_new = on(new, &w.name);
            for action in plan::reconcile(w.status, on_old.as_ref(), on_new.as_ref(), back) {
                match action {
                    Action::StopNew => {
                        if let Some(n) = new {
                            self.platform.stop_workload(n, &w.name)?;
                        }
                    }
                    Action::StopOld => self.platform.stop_workload(old, &w.name)?,
                    Action::ThawOld => self.platform.thaw(old, &w.name)?,
                    Action::ThawNew => {
                        if let Some(n) = new {
                            self.platform.thaw(n, &w.name)?;
                        }
                    }
                    Action::Status(MoveStatus::Aborted) => self.set_status(
                        &w.name,
                        MoveStatus::Aborted,
                        Some("recovered on the old instance".into()),
                    ),
                    Action::Status(s) => self.set_status(&w.name, s, None),
                    Action::Lost => {
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
        }
        self.step(Phase::RollingBack, "recovery: state reconciled".into())?;
        self.roll_back("the agent stopped mid-upgrade; recovery rolled back".into())
    }
}
