//! Trial boots: our own boot counter, because kexec skips the boot loader's.
//!
//! Before booting kernel B the agent records "booting B, attempt N" ([`TrialBoots::begin`]).
//! Once B is up and healthy the agent on B confirms it ([`TrialBoots::confirm`]). If B panics
//! or hangs instead, the watchdog or `panic=` reboots the machine into its default kernel A;
//! the agent on A runs [`TrialBoots::check_on_boot`] at start, finds the unconfirmed attempt
//! for a release that is not the running one, marks B bad and reports it. A bad release is
//! refused by [`TrialBoots::begin`] until [`TrialBoots::clear_bad`] ("until told otherwise").
//!
//! State is `STATE_DIR/trial.json`, written atomically and sealed (`crate::seal`: a CRC-32
//! over every byte, so a damaged file is [`TrialError::Corrupt`], never a different valid
//! record). A file of the previous, unsealed format ([`TRIAL_FORMAT_V1`]) is still read and
//! is rewritten sealed by the next write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic::{StateFile, atomic_write, ensure_dir, read_state};
use crate::seal::{self, Read as SealRead, Refusal};
use crate::{IoError, time};

/// Format tag of `trial.json` (sealed).
pub const TRIAL_FORMAT: &str = "mk-upgrade-trial/2";
/// The previous, unsealed format; still read, never written.
pub const TRIAL_FORMAT_V1: &str = "mk-upgrade-trial/1";
const MAX_FILE: u64 = 1 << 20;

/// Why a trial-boot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(
        "the trial-boot record {} is damaged ({reason}); it is kept as is, and trial boots are \
         refused until it is resolved. Inspect it: `jq . {}` (`cat -v` if jq cannot parse \
         it). Resolve: restore it from a backup, or move it aside (`mv {} {}.damaged`), which \
         forgets the pending boot attempt and the kernels marked bad (mark them again)",
        path.display(), path.display(), path.display(), path.display()
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "kernel {release} is marked bad since {} ({reason}); refusing to boot it until the mark \
         is cleared (`mk-upgrade` trial clear-bad, after fixing the cause)",
        time::fmt_utc(*.marked_at)
    )]
    MarkedBad {
        release: String,
        reason: String,
        marked_at: u64,
    },
    #[error(
        "an unconfirmed boot attempt of {pending} is recorded; run boot recovery (mk-agentd \
         start) before trying {requested}"
    )]
    OtherPending { pending: String, requested: String },
    #[error("no boot attempt of {release} is pending, so there is nothing to confirm")]
    NotPending { release: String },
}

impl TrialError {
    /// Whether this is damaged state ([`TrialError::Corrupt`]).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, TrialError::Corrupt { .. })
    }
}

/// A recorded, not yet confirmed, boot of a new kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrialAttempt {
    /// The release being tried.
    pub release: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When the attempt was recorded (Unix seconds).
    pub started_at: u64,
}

/// Why and when a release was marked bad.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadMark {
    /// Human-readable reason.
    pub reason: String,
    /// When it was marked (Unix seconds).
    pub marked_at: u64,
}

/// What [`TrialBoots::check_on_boot`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootVerdict {
    /// No trial boot was in flight.
    NoTrial,
    /// The running kernel is the one under trial and not yet confirmed: health-check it,
    /// then [`TrialBoots::confirm`] (or roll back).
    TrialRunning(TrialAttempt),
    /// A trial of another kernel was recorded after this boot began: nothing was booted
    /// (the agent stopped between recording it and the kexec, and started again). The
    /// attempt is cancelled; the kernel is not judged.
    NotBooted(TrialAttempt),
    /// A trial of another kernel never confirmed and we run `running` again: that kernel
    /// did not come up (panic, hang and watchdog, or power loss before confirmation). It is
    /// now marked bad with `reason`.
    TrialFailed {
        attempt: TrialAttempt,
        running: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    format: String,
    pending: Option<TrialAttempt>,
    bad: BTreeMap<String, BadMark>,
    last_confirmed: Option<TrialAttempt>,
}

/// Trial-boot records of one state directory. Single-writer: hold the [`crate::Lock`].
#[derive(Debug)]
pub struct TrialBoots {
    path: PathBuf,
}

impl TrialBoots {
    /// Opens `STATE_DIR/trial.json` (created on first write).
    pub fn open(state_dir: &Path) -> Result<Self, TrialError> {
        ensure_dir(state_dir)?;
        Ok(TrialBoots {
            path: state_dir.join("trial.json"),
        })
    }

    fn load(&self) -> Result<State, TrialError> {
        let corrupt = |reason: String| TrialError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let bytes = match read_state(&self.path, MAX_FILE)? {
            StateFile::Missing => {
                return Ok(State {
                    format: TRIAL_FORMAT.to_owned(),
                    pending: None,
                    bad: BTreeMap::new(),
                    last_confirmed: None,
                });
            }
            StateFile::TooLarge { limit } => {
                return Err(corrupt(format!("larger than the {limit}-byte limit")));
            }
            StateFile::Contents(b) => b,
        };
        match seal::read::<State, State>(&bytes, TRIAL_FORMAT, TRIAL_FORMAT_V1) {
            Ok(SealRead::Current(s) | SealRead::Legacy(s)) => Ok(s),
            Err(Refusal::Corrupt(reason)) => Err(corrupt(reason)),
            Err(Refusal::Foreign(found)) => Err(corrupt(format!(
                "format {found:?} is not {TRIAL_FORMAT:?} (written by another mk-upgrade \
                 version?)"
            ))),
        }
    }

    fn save(&self, state: &State) -> Result<(), TrialError> {
        let mut state = state.clone();
        // A legacy record read earlier is written in the current format.
        TRIAL_FORMAT.clone_into(&mut state.format);
        let bytes = seal::seal(&state).expect("trial state serializes");
        atomic_write(&self.path, &bytes)?;
        Ok(())
    }

    /// Records "booting `release`, attempt `attempt`" — call it durably *before* the kexec.
    /// Refused for a release marked bad, and while an attempt of another release is pending.
    pub fn begin(&mut self, release: &str, attempt: u32) -> Result<TrialAttempt, TrialError> {
        let mut state = self.load()?;
        if let Some(mark) = state.bad.get(release) {
            return Err(TrialError::MarkedBad {
                release: release.to_owned(),
                reason: mark.reason.clone(),
                marked_at: mark.marked_at,
            });
        }
        if let Some(p) = &state.pending {
            if p.release != release {
                return Err(TrialError::OtherPending {
                    pending: p.release.clone(),
                    requested: release.to_owned(),
                });
            }
        }
        let a = TrialAttempt {
            release: release.to_owned(),
            attempt,
            started_at: time::now_unix(),
        };
        state.pending = Some(a.clone());
        self.save(&state)?;
        Ok(a)
    }

    /// The pending attempt, if any.
    pub fn pending(&self) -> Result<Option<TrialAttempt>, TrialError> {
        Ok(self.load()?.pending)
    }

    /// The new kernel `release` came up healthy: the pending attempt is settled.
    pub fn confirm(&mut self, release: &str) -> Result<TrialAttempt, TrialError> {
        let mut state = self.load()?;
        match state.pending.take() {
            Some(p) if p.release == release => {
                state.last_confirmed = Some(p.clone());
                self.save(&state)?;
                Ok(p)
            }
            _ => Err(TrialError::NotPending {
                release: release.to_owned(),
            }),
        }
    }

    /// Abandons the pending attempt without judging the kernel (the upgrade was rolled back
    /// before the kexec happened). Returns it, if there was one.
    pub fn cancel(&mut self) -> Result<Option<TrialAttempt>, TrialError> {
        let mut state = self.load()?;
        let p = state.pending.take();
        if p.is_some() {
            self.save(&state)?;
        }
        Ok(p)
    }

    /// Boot-time check, run by the agent at start with the running release (`uname -r`)
    /// and when this boot began (Unix seconds, `btime` of `/proc/stat`; `None` if unknown).
    ///
    /// Rules: no pending attempt → [`BootVerdict::NoTrial`]; a pending attempt of the running
    /// release → [`BootVerdict::TrialRunning`] (still pending); a pending attempt of another
    /// release recorded at or after `booted_at` → cancelled, [`BootVerdict::NotBooted`] (no
    /// boot happened since); otherwise that release is marked bad, the attempt is cleared,
    /// and [`BootVerdict::TrialFailed`] says what happened.
    pub fn check_on_boot(
        &mut self,
        running_release: &str,
        booted_at: Option<u64>,
    ) -> Result<BootVerdict, TrialError> {
        let mut state = self.load()?;
        let Some(p) = state.pending.clone() else {
            return Ok(BootVerdict::NoTrial);
        };
        if p.release == running_release {
            return Ok(BootVerdict::TrialRunning(p));
        }
        if booted_at.is_some_and(|b| p.started_at >= b) {
            state.pending = None;
            self.save(&state)?;
            return Ok(BootVerdict::NotBooted(p));
        }
        let reason = format!(
            "boot attempt {} of {} (started {}) never confirmed; the machine came back up \
             running {running_release}: the new kernel panicked, hung until a watchdog or \
             panic= reboot, or lost power before its health check",
            p.attempt,
            p.release,
            time::fmt_utc(p.started_at)
        );
        state.bad.insert(
            p.release.clone(),
            BadMark {
                reason: reason.clone(),
                marked_at: time::now_unix(),
            },
        );
        state.pending = None;
        self.save(&state)?;
        Ok(BootVerdict::TrialFailed {
            attempt: p,
            running: running_release.to_owned(),
            reason,
        })
    }

    /// Marks `release` bad (refused by [`TrialBoots::begin`]); replaces an existing mark.
    pub fn mark_bad(&mut self, release: &str, reason: &str) -> Result<(), TrialError> {
        let mut state = self.load()?;
        state.bad.insert(
            release.to_owned(),
            BadMark {
                reason: reason.to_owned(),
                marked_at: time::now_unix(),
            },
        );
        self.save(&state)
    }

    /// Whether `release` is marked bad, and why.
    pub fn is_bad(&self, release: &str) -> Result<Option<BadMark>, TrialError> {
        Ok(self.load()?.bad.remove(release))
    }

    /// All bad marks, by release.
    pub fn bad_releases(&self) -> Result<BTreeMap<String, BadMark>, TrialError> {
        Ok(self.load()?.bad)
    }

    /// Clears the bad mark of `release` ("told otherwise"). Returns whether there was one.
    pub fn clear_bad(&mut self, release: &str) -> Result<bool, TrialError> {
        let mut state = self.load()?;
        let had = state.bad.remove(release).is_some();
        if had {
            self.save(&state)?;
        }
        Ok(had)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmed_trial() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = TrialBoots::open(dir.path()).unwrap();
        assert_eq!(
            t.check_on_boot("7.2.13-mkA", None).unwrap(),
            BootVerdict::NoTrial
        );
        t.begin("7.2.13-mkB", 1).unwrap();
        // The agent on B (a fresh process) sees its own trial still pending.
        let mut t = TrialBoots::open(dir.path()).unwrap();
        match t.check_on_boot("7.2.13-mkB", None).unwrap() {
            BootVerdict::TrialRunning(a) => {
                assert_eq!((a.release.as_str(), a.attempt), ("7.2.13-mkB", 1));
            }
            v => panic!("{v:?}"),
        }
        t.confirm("7.2.13-mkB").unwrap();
        assert_eq!(
            t.check_on_boot("7.2.13-mkB", None).unwrap(),
            BootVerdict::NoTrial
        );
        assert!(t.is_bad("7.2.13-mkB").unwrap().is_none());
        assert!(matches!(
            t.confirm("7.2.13-mkB"),
            Err(TrialError::NotPending { .. })
        ));
    }

    #[test]
    fn failed_trial_marks_bad_and_refuses_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = TrialBoots::open(dir.path()).unwrap();
        t.begin("7.2.13-mkB", 1).unwrap();
        // B panicked; the machine cold-booted A.
        let mut t = TrialBoots::open(dir.path()).unwrap();
        let v = t.check_on_boot("7.2.13-mkA", None).unwrap();
        let BootVerdict::TrialFailed {
            attempt,
            running,
            reason,
        } = v
        else {
            panic!("{v:?}")
        };
        assert_eq!(attempt.release, "7.2.13-mkB");
        assert_eq!(running, "7.2.13-mkA");
        assert!(reason.contains("never confirmed"), "{reason}");
        assert_eq!(t.is_bad("7.2.13-mkB").unwrap().unwrap().reason, reason);
        // Reported once: the attempt is settled.
        assert_eq!(
            t.check_on_boot("7.2.13-mkA", None).unwrap(),
            BootVerdict::NoTrial
        );
        let e = t.begin("7.2.13-mkB", 2).unwrap_err();
        assert!(matches!(e, TrialError::MarkedBad { .. }));
        assert!(e.to_string().contains("7.2.13-mkB"), "{e}");
        assert!(t.clear_bad("7.2.13-mkB").unwrap());
        assert!(!t.clear_bad("7.2.13-mkB").unwrap());
        assert_eq!(t.begin("7.2.13-mkB", 2).unwrap().attempt, 2);
    }

    #[test]
    fn other_pending_and_manual_marks() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = TrialBoots::open(dir.path()).unwrap();
        t.begin("7.2.13-mkB", 1).unwrap();
        assert!(matches!(
            t.begin("7.3.0", 1),
            Err(TrialError::OtherPending { .. })
        ));
        assert_eq!(t.begin("7.2.13-mkB", 2).unwrap().attempt, 2);
        assert_eq!(t.cancel().unwrap().unwrap().attempt, 2);
        assert_eq!(t.pending().unwrap(), None);
        t.mark_bad("7.3.0", "health check failed: kv store lost keys")
            .unwrap();
        assert_eq!(t.bad_releases().unwrap().len(), 1);
        assert!(t.begin("7.3.0", 1).is_err());
    }

    #[test]
    fn corrupt_state_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("trial.json"), b"[1,2").unwrap();
        let mut t = TrialBoots::open(dir.path()).unwrap();
        let e = t.check_on_boot("7.2.13", None).unwrap_err();
        assert!(e.to_string().contains("trial.json"), "{e}");
    }

    #[test]
    fn an_attempt_recorded_in_this_boot_is_cancelled_not_judged() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = TrialBoots::open(dir.path()).unwrap();
        let a = t.begin("7.2.13-mkB", 1).unwrap();
        // This boot began before the attempt: nothing was booted since.
        let v = t.check_on_boot("7.2.13-mkA", Some(a.started_at)).unwrap();
        assert_eq!(v, BootVerdict::NotBooted(a.clone()));
        assert_eq!(t.pending().unwrap(), None);
        let b = t.begin("7.2.13-mkB", 1).expect("B is not marked bad");
        // A boot that began after the attempt: B did not come up.
        let later = b.started_at + 1;
        assert!(matches!(
            t.check_on_boot("7.2.13-mkA", Some(later)).unwrap(),
            BootVerdict::TrialFailed { .. }
        ));
    }
}
