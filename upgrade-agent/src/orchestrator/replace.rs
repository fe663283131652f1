//! The replace flow (LUO): load the new kernel, stage every workload, boot the kernel, which
//! replaces this one; in the booted kernel claim every staged workload, or return to the
//! previous kernel and claim them there. See the module documentation of
//! [`crate::orchestrator`] for the diagram.

use super::{Orchestrator, UpgradeError};
use crate::platform::{LoadableKernel, Resources};
use crate::record::{MoveStatus, Outcome, Phase};

impl Orchestrator<'_> {
    pub(super) fn run_replace(&mut self, kernel: &LoadableKernel<'_>) -> Result<(), UpgradeError> {
        let old = self.record.old_instance;
        let new = match self.platform.create_instance(&Resources::default()) {
            Ok(id) => id,
            // Nothing changed yet.
            Err(e) => return self.refuse(e.to_string()),
        };
        self.record.new_instance = Some(new);
        self.step(
            Phase::InstanceCreated,
            format!(
                "kernel {} will replace {}",
                kernel.release, self.record.kernel_before
            ),
        )?;
        // Loaded before any workload is frozen: loading (reading the kernel and initramfs,
        // hashing the segments for purgatory) took most of a second in the TCG guest, all of
        // it blackout when it came after the staging. The kernel does not care about the
        // order (the handover state is serialized at the kexec call); the journal's phases
        // stay in their order, and a rollback or a recovery unloads it.
        if let Err(e) = self.platform.load(new, kernel) {
            return self.roll_back(format!("loading {}: {e}", kernel.release));
        }
        for name in self.names() {
            match self.move_workload(old, new, &name, Phase::Migrating) {
                Ok(_) => {}
                Err(e) => {
                    self.set_status(&name, MoveStatus::Aborted, Some(e.to_string()));
                    self.step(Phase::Migrating, format!("{name}: staging failed: {e}"))?;
                    return self.roll_back(e.to_string());
                }
            }
        }
        let staged = self.record.workloads.len();
        self.step(
            Phase::KernelLoaded,
            format!(
                "{staged} workload(s) staged; kernel {} loaded",
                kernel.release
            ),
        )?;
        self.step(Phase::Booted, format!("booting {} (kexec)", kernel.release))?;
        let record = self.record.clone();
        match self.platform.boot(new, Some(&record)) {
            // A platform whose boot returns (the fake platform) carries on here as the next
            // kernel's agent would.
            Ok(()) => self.claim_forward(),
            Err(e) => self.roll_back(format!("booting {}: {e}", kernel.release)),
        }
    }

    /// In the booted kernel: claims every staged workload; commits, or returns to the
    /// previous kernel.
    pub(super) fn claim_forward(&mut self) -> Result<(), UpgradeError> {
        let new = self.record.new_instance.unwrap_or(self.record.old_instance);
        let release = self.record.kernel_after.clone();
        self.step(
            Phase::Migrating,
            format!(
                "{release} up: claiming {} workload(s)",
                self.record.workloads.len()
            ),
        )?;
        let mut failure = None;
        for name in self.names() {
            match self.platform.claim(&name) {
                Ok(c) if c.adopted => {
                    // Claimed by the agent's previous run; its numbers went with it.
                    self.set_status(&name, MoveStatus::Committed, None);
                    self.note(format!(
                        "{name}: claimed before the agent restarted; its adopted copy is healthy"
                    ));
                }
                Ok(c) => {
                    if let Some(w) = self.record.workload_mut(&name) {
                        w.handover_us = Some(c.handover_us);
                        w.blackout_lower_bound = c.blackout_lower_bound;
                        if w.mode == crate::workload::Mode::Restart {
                            // The claim counts from the old copy's exit (the staged freeze
                            // returned then): that is the port-closed window; the blackout
                            // starts at the stop signal, as on every platform.
                            w.closed_us = Some(c.blackout_us);
                            w.blackout_us =
                                Some(c.blackout_us.saturating_add(w.stop_us.unwrap_or(0)));
                        } else {
                            w.blackout_us = Some(c.blackout_us);
                        }
                    }
                    self.set_status(&name, MoveStatus::Committed, None);
                    self.note(format!(
                        "{name}: {} bytes verified in {:.1} ms, started in {:.1} ms, healthy after {:.1} ms",
                        c.bytes, c.verify_ms, c.start_ms, c.health_ms
                    ));
                }
                Err(e) => {
                    self.set_status(&name, MoveStatus::Aborted, Some(e.to_string()));
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        if failure.is_none() {
            // Every workload again, now that all are claimed: one may have died or stopped
            // serving after its own claim passed. Still reversible: the previous kernel is
            // kept loaded for the way back.
            let sick = self.unhealthy(new);
            if !sick.is_empty() {
                failure = Some(format!("final check in {release}: {}", sick.join("; ")));
            }
        }
        if let Some(reason) = failure {
            self.record.error = Some(reason.clone());
            self.step(
                Phase::RollingBack,
                format!(
                    "failed in {release}: {reason}; returning to {}",
                    self.record.kernel_before
                ),
            )?;
            let record = self.record.clone();
            let back = self.platform.return_to_previous(&record);
            // Only reached when the way back failed (or on a platform whose boot returns).
            return match back {
                Ok(()) => self.claim_return(),
                Err(e) => {
                    let msg = format!("{reason}; coming back failed too: {e}");
                    self.finish(Outcome::Failed, Some(msg.clone()))?;
                    Err(UpgradeError::Failed(msg))
                }
            };
        }
        self.step(
            Phase::HandingOver,
            format!("every workload verified, restored and healthy on instance {new}: committed"),
        )?;
        self.platform.confirm()?;
        self.end_verified(new, Outcome::Upgraded, None)
    }

    /// Back in the previous kernel after a failure: claims every returned workload.
    pub(super) fn claim_return(&mut self) -> Result<(), UpgradeError> {
        let reason = self
            .record
            .error
            .clone()
            .unwrap_or_else(|| "the new kernel failed".into());
        let mut stuck = Vec::new();
        for name in self.names() {
            match self.platform.claim(&name) {
                Ok(c) => {
                    if let Some(w) = self.record.workload_mut(&name).filter(|_| !c.adopted) {
                        w.blackout_us = Some(c.blackout_us);
                        w.blackout_lower_bound = c.blackout_lower_bound;
                    }
                    self.set_status(&name, MoveStatus::MovedBack, None);
                }
                Err(e) => {
                    self.set_status(&name, MoveStatus::Aborted, Some(e.to_string()));
                    stuck.push(e.to_string());
                }
            }
        }
        if stuck.is_empty() {
            self.note("back on the previous kernel: every workload restarted and healthy".into());
            let old = self.record.old_instance;
            self.end_verified(old, Outcome::RolledBack, Some(reason.clone()))?;
            Err(UpgradeError::RolledBack { reason })
        } else {
            let msg = format!(
                "{reason}; back on {}, but the restart failed: {}",
                self.record.kernel_before,
                stuck.join("; ")
            );
            self.finish(Outcome::Failed, Some(msg.clone()))?;
            Err(UpgradeError::Failed(msg))
        }
    }
}
