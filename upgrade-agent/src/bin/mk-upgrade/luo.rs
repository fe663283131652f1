//! The operator's side of a LUO upgrade: `mk-upgrade check|apply|rollback --platform luo`.
//!
//! `apply` takes the lock, runs the pre-flight checks (the kernel's LUO readiness among
//! them), verifies the image exactly as on the emulated platform, and hands the sealed
//! verified image (and the initramfs) to the host agent, which runs the orchestrator (it
//! journals, stages every workload, kexecs). On success the machine kexecs and this
//! process dies with it; the next kernel's agent prints the result. An answer means the
//! upgrade ended in this kernel (refused, rolled back, failed): it is reported like any.

use std::os::fd::AsFd;
use std::process::ExitCode;

use serde_json::json;

use crate::app::{CliError, Global, upgrade_exit};
use crate::upgrade::{ApplyArgs, CheckResult, JsonArgs, RollbackArgs, lock, refuse_failed_checks};
use upgrade_agent::exit::Exit;
use upgrade_agent::orchestrator::ops;
use upgrade_agent::platform::luo::client::{AgentClient, AgentStatus, Handed};
use upgrade_agent::platform::{Capabilities, InstanceInfo, InstanceState, PlatformKind, Resources};
use upgrade_agent::record::UpgradeKind;
use upgrade_agent::sys::kconfig;

/// The running kernel's LUO readiness as pre-flight checks.
pub fn kernel_checks() -> Vec<CheckResult> {
    let mut out = Vec::new();
    match kconfig::check_running() {
        Ok((r, source)) => {
            if r.is_ready() {
                out.push(CheckResult {
                    name: "luo-kernel",
                    ok: true,
                    detail: format!(
                        "KHO/LUO options built in ({}), liveupdate=on",
                        source.display()
                    ),
                    fix: None,
                });
            } else {
                out.push(CheckResult {
                    name: "luo-kernel",
                    ok: false,
                    detail: r.problems().join("; "),
                    fix: Some(
                        "boot a kernel built with the options named (see docs/kernel.md) and \
                         `liveupdate=on` on its command line"
                            .into(),
                    ),
                });
            }
        }
        Err(e) => out.push(CheckResult {
            name: "luo-kernel",
            ok: false,
            detail: e.to_string(),
            fix: Some("enable CONFIG_IKCONFIG_PROC or install /boot/config-$(uname -r)".into()),
        }),
    }
    let dev = std::path::Path::new(upgrade_agent::sys::luo::DEV_PATH).exists();
    out.push(CheckResult {
        name: "liveupdate",
        ok: dev,
        detail: if dev {
            "/dev/liveupdate exists".into()
        } else {
            "/dev/liveupdate does not exist".into()
        },
        fix: (!dev).then(|| {
            "CONFIG_LIVEUPDATE=y and `liveupdate=on` on the kernel command line".to_owned()
        }),
    });
    out
}

/// Pre-flight for the luo platform: the common checks plus the kernel's readiness.
pub fn preflight(g: &Global, need_keys: bool, lock_held: bool) -> Vec<CheckResult> {
    let mut out = crate::upgrade::preflight(g, need_keys, lock_held);
    out.extend(kernel_checks());
    out
}

/// The platform and instance checks of the luo platform: the host agent answers and runs
/// only declared workloads.
pub fn platform_checks(g: &Global, out: &mut Vec<CheckResult>) {
    let check = |name, ok: bool, detail: String, fix: Option<String>| CheckResult {
        name,
        ok,
        detail,
        fix,
    };
    match agent_status(g) {
        Ok(st) => {
            out.push(check(
                "platform",
                true,
                format!("luo; freezer {}; cpus {:?}", st.freezer, st.cpus),
                None,
            ));
            out.push(check(
                "instance",
                true,
                format!(
                    "kernel {} runs {} workloads",
                    st.release,
                    st.workloads.len()
                ),
                None,
            ));
            crate::upgrade::workload_checks(g, 0, &st.workloads, out);
        }
        Err(e) => out.push(check(
            "platform",
            false,
            e.message,
            Some(format!(
                "start the host agent: mk-agentd serve --state-dir {}",
                g.state_dir.display()
            )),
        )),
    }
}

/// Asks the host agent who runs.
pub fn agent_status(g: &Global) -> Result<AgentStatus, CliError> {
    AgentClient::new(&g.state_dir)
        .status()
        .map_err(|e| CliError::new(Exit::Platform, e.to_string()))
}

/// The luo platform as `status` shows it: the running kernel is the one active instance.
pub fn caps_and_instances(g: &Global) -> Result<(Capabilities, Vec<InstanceInfo>), CliError> {
    let st = agent_status(g)?;
    let caps = Capabilities {
        kind: PlatformKind::Luo,
        emulated: false,
        side_by_side: false,
        fds_over_channel: false,
        cpus: st.cpus.clone(),
        spare_cpus: Vec::new(),
        spare_memory_bytes: 0,
        freezer: st.freezer.clone(),
        notes: vec![format!(
            "mainline LUO on {}: the new kernel replaces this one by kexec; workloads' memfds \
             survive in /dev/liveupdate sessions, listeners are re-bound",
            st.release
        )],
    };
    let inst = InstanceInfo {
        id: 0,
        state: InstanceState::Active,
        resources: Resources {
            cpus: st.cpus,
            memory_bytes: 0,
        },
        kernel_release: Some(st.release),
        workloads: st.workloads,
    };
    Ok((caps, vec![inst]))
}

/// Reports what the agent answered.
fn report(handed: Handed, json_out: bool, kernel_after: &str) -> ExitCode {
    match handed {
        Handed::AgentStopped => {
            let msg = format!(
                "the host agent stopped without an answer (killed or crashed) during the \
                 upgrade to {kernel_after}; no kexec happened. Restart it (mk-agentd serve): at \
                 start it adopts the running workloads, settles the upgrade and prints the \
                 result (then see `mk-upgrade history`)"
            );
            if json_out {
                println!(
                    "{}",
                    json!({"result": "interrupted", "kernel_after": kernel_after, "error": msg})
                );
            } else {
                eprintln!("mk-upgrade: {msg}");
            }
            Exit::Platform.into()
        }
        Handed::BelowFloor(message) => {
            if json_out {
                println!("{}", json!({"result": "refused", "error": message}));
            } else {
                eprintln!("mk-upgrade: {message}");
            }
            Exit::Incompatible.into()
        }
        Handed::NothingToDo(message) => {
            if json_out {
                println!("{}", json!({"result": "nothing-to-do", "error": message}));
            } else {
                eprintln!("mk-upgrade: {message}");
            }
            Exit::NothingToDo.into()
        }
        Handed::Finished { record, error } => {
            if json_out {
                println!("{}", record.report_json());
            } else {
                crate::upgrade::print_record(&record);
            }
            match (record.outcome, error) {
                (Some(upgrade_agent::record::Outcome::Upgraded), _) => Exit::Ok.into(),
                (Some(upgrade_agent::record::Outcome::Refused), e) => {
                    if let Some(e) = e.filter(|_| !json_out) {
                        eprintln!("mk-upgrade: {e}");
                    }
                    Exit::PreflightFailed.into()
                }
                (Some(upgrade_agent::record::Outcome::RolledBack), e) => {
                    if let Some(e) = e.filter(|_| !json_out) {
                        eprintln!("mk-upgrade: upgrade rolled back: {e}");
                    }
                    Exit::RolledBack.into()
                }
                (_, e) => {
                    if let Some(e) = e.filter(|_| !json_out) {
                        eprintln!("mk-upgrade: {e}");
                    }
                    upgrade_exit(&upgrade_agent::orchestrator::UpgradeError::Failed(
                        String::new(),
                    ))
                    .into()
                }
            }
        }
    }
}

/// `mk-upgrade apply --platform luo`.
pub fn apply(g: &Global, a: &ApplyArgs) -> Result<ExitCode, CliError> {
    let _guard = lock(g)?;
    let checks = preflight(g, !a.insecure_allow_unsigned, true);
    if let Some(refusal) = refuse_failed_checks(a.json, &checks) {
        return refusal;
    }
    let st = agent_status(g)?;
    let image = match crate::upgrade::verify_for_apply(g, a, &st.release) {
        Ok(i) => i,
        Err(refusal) => return refusal,
    };
    if a.dry_run {
        println!(
            "{}",
            json!({"result": "dry-run", "platform": "luo", "kernel_before": st.release,
                "kernel_after": image.info.release, "image_sha256": hex::encode(image.sha256),
                "workloads": st.workloads.iter().map(|w| &w.name).collect::<Vec<_>>()})
        );
        return Ok(Exit::Ok.into());
    }
    let initrd = a
        .initrd
        .as_ref()
        .map(std::fs::File::open)
        .transpose()
        .map_err(|e| CliError::new(Exit::Io, format!("initrd: {e}")))?;
    let faults = crate::upgrade::faults(a.inject)?;
    eprintln!(
        "mk-upgrade: handing the upgrade {} -> {} to the host agent: it stages {} workload(s) \
         in LUO sessions and kexecs (the result is printed by the agent of the kernel that \
         ends up running, as `MK-UPGRADE-RESULT ...`)",
        st.release,
        image.info.release,
        st.workloads.len()
    );
    let handed = AgentClient::new(&g.state_dir)
        .apply(
            UpgradeKind::Apply,
            &image.info.release,
            &image.sha256,
            &a.cmdline,
            faults,
            Some(image.memfd.as_fd()),
            initrd.as_ref().map(AsFd::as_fd),
            image
                .manifest
                .as_ref()
                .and_then(|m| m.version_floor.clone()),
        )
        .map_err(|e| CliError::new(Exit::Platform, e.to_string()))?;
    Ok(report(handed, a.json, &image.info.release))
}

/// `mk-upgrade rollback --platform luo`: back to the kernel the agent came from (with its
/// own initramfs and command line).
pub fn rollback(g: &Global, a: &RollbackArgs) -> Result<ExitCode, CliError> {
    let _guard = lock(g)?;
    let checks = preflight(g, false, true);
    if let Some(refusal) = refuse_failed_checks(a.json, &checks) {
        return refusal;
    }
    let handed = AgentClient::new(&g.state_dir)
        .apply(
            UpgradeKind::Rollback,
            "",
            &[0; 32],
            "",
            upgrade_agent::fault::Faults::NONE,
            None,
            None,
            None,
        )
        .map_err(|e| CliError::new(Exit::Platform, e.to_string()))?;
    Ok(report(handed, a.json, "the previous kernel"))
}

/// `mk-upgrade recover --platform luo` (and `mk-agentd` without a subcommand): an upgrade
/// still journaled here never reached its kexec (one that did is carried on by the next
/// kernel's agent); it is finished as the recovery planner decides.
pub fn recover(g: &Global, a: &JsonArgs) -> Result<ExitCode, CliError> {
    let _guard = lock(g)?;
    let release = upgrade_agent::platform::luo::running_release();
    match ops::recover_journal_only(&g.state(), &release) {
        Ok(ops::JournalOnly::Nothing) => {
            if a.json {
                println!("{}", json!({ "result": "nothing-to-recover" }));
            } else {
                println!("no interrupted upgrade");
            }
            Ok(Exit::Ok.into())
        }
        Ok(ops::JournalOnly::Finished(rec)) => {
            if a.json {
                println!("{}", rec.report_json());
            } else {
                println!(
                    "finished an interrupted upgrade: {}",
                    rec.error.as_deref().unwrap_or_default()
                );
            }
            Ok(Exit::Ok.into())
        }
        Ok(ops::JournalOnly::LeftToAgent(rec)) => {
            if a.json {
                println!("{}", rec.report_json());
            } else {
                println!(
                    "upgrade {} reached its kexec (phase {:?}): the host agent (mk-agentd \
                     serve) finishes it",
                    rec.upgrade_id, rec.phase
                );
            }
            Ok(Exit::Ok.into())
        }
        Err(e) => Err(crate::app::op_error(&e)),
    }
}
