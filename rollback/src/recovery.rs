//! Start-up recovery: what `mk-agentd` does first, so that the host ends fully on the old
//! kernel or fully on the new one.
//!
//! [`Recovery::start`] takes the lock, opens the journal (which cleans up interrupted file
//! writes), settles the trial-boot record against the running release and reads the
//! in-flight upgrade record. [`Recovery::action`] then states which rule applies; the
//! orchestrator carries it out, because only it knows how to undo or finish its own steps:
//!
//! | in-flight record | trial verdict | action |
//! | --- | --- | --- |
//! | none | none | [`RecoveryAction::Clean`] |
//! | any | running kernel is the unconfirmed trial | [`RecoveryAction::ResumeTrial`]: health-check, then confirm (and promote) or roll back |
//! | any | trial of another kernel never confirmed | [`RecoveryAction::TrialFailed`]: the machine fell back to the old kernel, the new one is now marked bad; finish the record as rolled back and report what could not be recovered |
//! | some | none | [`RecoveryAction::RollBack`]: the agent stopped before booting the new kernel; undo the recorded steps on the old kernel |

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{
    BootVerdict, Journal, JournalError, Lock, LockError, LockGuard, SlotError, Slots, TrialAttempt,
    TrialBoots, TrialError,
};

/// Why start-up recovery could not run.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Slots(#[from] SlotError),
    #[error(transparent)]
    Trial(#[from] TrialError),
}

/// What the orchestrator must do after a restart.
#[derive(Debug, Clone, PartialEq)]
pub enum RecoveryAction<R> {
    /// Nothing was in flight.
    Clean,
    /// We run the kernel under trial and it is not confirmed yet.
    ResumeTrial {
        attempt: TrialAttempt,
        record: Option<R>,
    },
    /// A trial boot failed and the machine is back on `running`; the tried kernel is marked
    /// bad (with `reason`).
    TrialFailed {
        attempt: TrialAttempt,
        running: String,
        reason: String,
        record: Option<R>,
    },
    /// An upgrade stopped before its kexec: roll it back on the running (old) kernel.
    RollBack { record: R },
}

/// The opened state directory after start-up recovery; holds the lock.
#[derive(Debug)]
pub struct Recovery<R> {
    /// The held lock (dropping it releases the state directory).
    pub guard: LockGuard,
    /// The journal.
    pub journal: Journal<R>,
    /// Kernel slots and the version floor.
    pub slots: Slots,
    /// Trial-boot records.
    pub trials: TrialBoots,
    /// What the trial-boot check found (already persisted: a failed trial is marked bad).
    pub verdict: BootVerdict,
    /// The in-flight upgrade record.
    pub interrupted: Option<R>,
}

impl<R: Serialize + DeserializeOwned + Clone> Recovery<R> {
    /// Runs the start-up steps on `state_dir` for the running kernel `running_release`.
    /// A corrupt journal is returned as an error (after the trial check has been
    /// persisted), never ignored.
    pub fn start(state_dir: &Path, running_release: &str) -> Result<Self, RecoveryError> {
        let guard = Lock::acquire(state_dir)?;
        let journal = Journal::open(state_dir)?;
        let slots = Slots::open(state_dir)?;
        let mut trials = TrialBoots::open(state_dir)?;
        let verdict = trials.check_on_boot(running_release)?;
        let interrupted = journal.current()?;
        Ok(Recovery {
            guard,
            journal,
            slots,
            trials,
            verdict,
            interrupted,
        })
    }

    /// The rule that applies (see the module documentation).
    pub fn action(&self) -> RecoveryAction<R> {
        let record = self.interrupted.clone();
        match (&self.verdict, record) {
            (BootVerdict::TrialRunning(attempt), record) => RecoveryAction::ResumeTrial {
                attempt: attempt.clone(),
                record,
            },
            (
                BootVerdict::TrialFailed {
                    attempt,
                    running,
                    reason,
                },
                record,
            ) => RecoveryAction::TrialFailed {
                attempt: attempt.clone(),
                running: running.clone(),
                reason: reason.clone(),
                record,
            },
            (BootVerdict::NoTrial, Some(record)) => RecoveryAction::RollBack { record },
            (BootVerdict::NoTrial, None) => RecoveryAction::Clean,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Rec {
        id: String,
        step: String,
    }

    fn rec(step: &str) -> Rec {
        Rec {
            id: "u1".into(),
            step: step.into(),
        }
    }

    #[test]
    fn clean_start() {
        let dir = tempfile::tempdir().unwrap();
        let r = Recovery::<Rec>::start(dir.path(), "7.2.13-mkA").unwrap();
        assert_eq!(r.action(), RecoveryAction::Clean);
        // The lock is held while recovering.
        assert!(matches!(
            Lock::acquire(dir.path()),
            Err(LockError::Busy { .. })
        ));
    }

    #[test]
    fn crash_before_kexec_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut r = Recovery::<Rec>::start(dir.path(), "7.2.13-mkA").unwrap();
            r.journal.write(&rec("frozen")).unwrap();
        }
        let r = Recovery::<Rec>::start(dir.path(), "7.2.13-mkA").unwrap();
        assert_eq!(
            r.action(),
            RecoveryAction::RollBack {
                record: rec("frozen")
            }
        );
    }

    #[test]
    fn trial_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut r = Recovery::<Rec>::start(dir.path(), "7.2.13-mkA").unwrap();
            r.journal.write(&rec("booting")).unwrap();
            r.trials.begin("7.2.13-mkB", 1).unwrap();
        }
        // B came up: resume there.
        {
            let r = Recovery::<Rec>::start(dir.path(), "7.2.13-mkB").unwrap();
            assert!(matches!(
                r.action(),
                RecoveryAction::ResumeTrial { record: Some(_), ref attempt } if attempt.release == "7.2.13-mkB"
            ));
        }
        // B then hung before confirming; the machine cold-booted A.
        let r = Recovery::<Rec>::start(dir.path(), "7.2.13-mkA").unwrap();
        match r.action() {
            RecoveryAction::TrialFailed {
                attempt, record, ..
            } => {
                assert_eq!(attempt.release, "7.2.13-mkB");
                assert_eq!(record, Some(rec("booting")));
            }
            a => panic!("{a:?}"),
        }
        assert!(r.trials.is_bad("7.2.13-mkB").unwrap().is_some());
    }

    #[test]
    fn corrupt_journal_stops_recovery_after_settling_trials() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut r = Recovery::<Rec>::start(dir.path(), "7.2.13-mkA").unwrap();
            r.journal.write(&rec("booting")).unwrap();
            r.trials.begin("7.2.13-mkB", 1).unwrap();
        }
        std::fs::write(dir.path().join("journal.json"), b"{\"format\"").unwrap();
        let e = Recovery::<Rec>::start(dir.path(), "7.2.13-mkA").unwrap_err();
        assert!(matches!(
            e,
            RecoveryError::Journal(JournalError::Corrupt { .. })
        ));
        let t = TrialBoots::open(dir.path()).unwrap();
        assert!(t.is_bad("7.2.13-mkB").unwrap().is_some());
        // The lock was released with the failed attempt.
        Lock::acquire(dir.path()).unwrap();
    }
}
