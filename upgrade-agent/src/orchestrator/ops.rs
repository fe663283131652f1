//! The operations the binaries run: one upgrade (apply or rollback) and start-up recovery,
//! with everything they need opened from the [`StateDir`]. Nothing here prints: the
//! binaries report the returned record.

use crate::fault::Faults;
use crate::platform::{LoadableKernel, Platform};
use crate::record::{UpgradeKind, UpgradeRecord};
use crate::statedir::{StateDir, StateDirError};

use super::{Env, Observer, Orchestrator, Promotion, Setup, UpgradeError};

/// Why an operation could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    State(#[from] StateDirError),
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
}

/// How to run one upgrade.
#[derive(Debug)]
pub struct Request<'k> {
    pub kind: UpgradeKind,
    pub kernel: LoadableKernel<'k>,
    pub faults: Faults,
    /// Slots to update on success (see [`Promotion`]).
    pub promotion: Option<Promotion>,
}

fn setup<'a>(
    state: &StateDir,
    faults: Faults,
    promotion: Option<Promotion>,
    observer: &'a dyn Observer,
    env: &'a dyn Env,
) -> Result<Setup<'a>, StateDirError> {
    Ok(Setup {
        journal: state.journal()?,
        specs: state.load_workloads()?,
        node_key: state.node_key()?,
        faults,
        observer,
        env,
        promotion,
        events: Some(crate::events::EventLog::new(state.root())),
        metrics: Some(crate::metrics::Metrics::new(state.root())),
    })
}

/// Runs one upgrade to its end on `platform`; returns the finished record and why it did
/// not end upgraded. `Err` when it could not even start (nothing changed then).
pub fn execute(
    state: &StateDir,
    platform: &mut dyn Platform,
    req: Request<'_>,
    observer: &dyn Observer,
    env: &dyn Env,
) -> Result<(UpgradeRecord, Option<UpgradeError>), OpError> {
    let setup = setup(state, req.faults, req.promotion, observer, env)?;
    let mut o = Orchestrator::begin(
        platform,
        setup,
        req.kind,
        &req.kernel.release,
        req.kernel.sha256,
    )?;
    let result = o.run(&req.kernel);
    Ok((o.record.clone(), result.err()))
}

/// Start-up recovery: finishes or undoes an interrupted upgrade (or, on a replace platform,
/// carries on with what a kexec carried over). `None` when nothing was in flight. Of
/// `faults`, only `crash_after_write` applies (counting recovery's own journal writes; the
/// LUO agent's crash matrix), and only in fault-injection builds.
pub fn recover(
    state: &StateDir,
    platform: &mut dyn Platform,
    promotion: Option<Promotion>,
    observer: &dyn Observer,
    env: &dyn Env,
    faults: Faults,
) -> Result<Option<UpgradeRecord>, OpError> {
    let faults = Faults {
        crash_after_write: faults.crash_after_write,
        ..Faults::NONE
    };
    let setup = setup(state, faults, promotion, observer, env)?;
    Ok(super::recover(platform, setup)?)
}

/// What [`recover_journal_only`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalOnly {
    /// No upgrade in flight.
    Nothing,
    /// The upgrade never reached its kexec: finished as the planner decided.
    Finished(UpgradeRecord),
    /// The upgrade reached its kexec, or began in this very boot: only the host agent can
    /// tell whether the new kernel carried it over (it resumes it) or the machine
    /// cold-booted (its trial-boot check finishes it), and only it can adopt and check the
    /// workloads still running after its own restart; it is left to the agent
    /// (`mk-agentd serve`).
    LeftToAgent(UpgradeRecord),
}

/// Recovery where the platform is not driven from this process (on LUO the host agent owns
/// `/dev/liveupdate` and carries on with whatever a kexec carried over): an upgrade still
/// journaled here that never reached its kexec and began in another boot is finished as the
/// planner decides for a record that nothing but the journal kept (`running` names the
/// running kernel); one that reached it, or began in this boot (its workloads may still run,
/// frozen, waiting for the agent to adopt them), is left to the host agent.
pub fn recover_journal_only(state: &StateDir, running: &str) -> Result<JournalOnly, OpError> {
    let mut journal = state.journal()?;
    let Some(mut record) = journal.current().map_err(UpgradeError::from)? else {
        return Ok(JournalOnly::Nothing);
    };
    let this_boot = record.boot_id.is_some() && record.boot_id == crate::sys::boot_id();
    if (record.kexec_journaled() || this_boot) && record.phase != crate::record::Phase::Done {
        return Ok(JournalOnly::LeftToAgent(record));
    }
    let seen = super::plan::Observed {
        replace: true,
        carried_over: false,
        running_release: running.to_owned(),
        // Journal-only: whether the workloads still run is not seen from here.
        same_boot: false,
    };
    match super::plan::plan(Some(&record), &seen) {
        super::plan::Plan::Abandon { outcome, reason } => {
            super::abandon(&mut record);
            record.events.push(crate::record::Event {
                t_ms: record.events.last().map_or(0, |e| e.t_ms),
                what: format!("recovered: {reason}"),
                journaled: None,
            });
            record.phase = crate::record::Phase::Done;
            record.outcome = Some(outcome);
            record.error = Some(reason);
        }
        super::plan::Plan::Finish(outcome) => {
            record.outcome = Some(outcome);
        }
        other => {
            return Err(UpgradeError::Failed(format!(
                "recovery of upgrade {} needs the platform ({other:?})",
                record.upgrade_id
            ))
            .into());
        }
    }
    journal.finish(&record).map_err(UpgradeError::from)?;
    let result = record.report_json()["result"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    let mut e = crate::events::EventLine::now(
        &record.upgrade_id,
        "result",
        record.error.clone().unwrap_or_default(),
    );
    e.result = Some(result);
    crate::events::EventLog::new(state.root()).record(&e);
    crate::metrics::Metrics::new(state.root()).record(&record);
    Ok(JournalOnly::Finished(record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Event, Outcome, Phase};

    fn journaled(dir: &std::path::Path, boot_id: Option<String>, kexec: bool) -> StateDir {
        let mut rec: UpgradeRecord = serde_json::from_value(serde_json::json!({
            "upgrade_id": "0a".repeat(16), "kind": "apply", "platform": "luo",
            "started_at": 0, "kernel_before": "A", "kernel_after": "B",
            "image_sha256": "", "old_instance": 0,
            "old_resources": {"cpus": [0], "memory_bytes": 0},
            "new_instance": 1, "phase": "migrating",
            "workloads": [{"name": "kv", "status": "freezing", "blackout_us": null, "detail": null}],
            "events": [], "outcome": null, "error": null
        }))
        .unwrap();
        rec.boot_id = boot_id;
        if kexec {
            rec.events.push(Event {
                t_ms: 1,
                what: "booting B (kexec)".into(),
                journaled: Some(Phase::Booted),
            });
        }
        let state = StateDir::new(dir);
        state.journal().unwrap().write(&rec).unwrap();
        state
    }

    #[test]
    fn journal_only_recovery_leaves_this_boots_and_kexeced_upgrades_to_the_agent() {
        // Begun in this boot: the workloads may still run frozen; only the agent can adopt
        // and check them.
        let dir = tempfile::tempdir().unwrap();
        let state = journaled(dir.path(), crate::sys::boot_id(), false);
        assert!(
            crate::sys::boot_id().is_some(),
            "no boot id on this machine"
        );
        assert!(matches!(
            recover_journal_only(&state, "A").unwrap(),
            JournalOnly::LeftToAgent(_)
        ));
        assert!(state.journal().unwrap().current().unwrap().is_some());
        // Past the kexec step, whatever the boot.
        let dir = tempfile::tempdir().unwrap();
        let state = journaled(dir.path(), Some("another".into()), true);
        assert!(matches!(
            recover_journal_only(&state, "A").unwrap(),
            JournalOnly::LeftToAgent(_)
        ));
        // Another boot, before the kexec step: nothing but the journal survived.
        let dir = tempfile::tempdir().unwrap();
        let state = journaled(dir.path(), Some("another".into()), false);
        match recover_journal_only(&state, "A").unwrap() {
            JournalOnly::Finished(rec) => assert_eq!(rec.outcome, Some(Outcome::RolledBack)),
            other => panic!("{other:?}"),
        }
        assert!(state.journal().unwrap().current().unwrap().is_none());
    }
}
