//! The operator's side of a LUO upgrade: `mk-upgrade check|apply|rollback --platform luo`.
//!
//! `apply` takes the lock, runs the pre-flight checks (the kernel's LUO readiness among
//! them), verifies the image exactly as on the emulated platform, journals the record
//! (phase `Verified`), and hands the sealed verified image (and the initramfs) to the host
//! agent with a `LuoUpgrade` request. On success the machine kexecs and this process dies
//! with it; the next kernel's agent prints the result. An answer means the agent refused
//! or unwound.

use std::os::fd::{AsFd, BorrowedFd};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use crate::cli::app::{CliError, Global};
use crate::cli::upgrade::{
    ApplyArgs, CheckArgs, CheckResult, Inject, RollbackArgs, lock, refuse_failed_checks,
};
use crate::exit::Exit;
use crate::orchestrator::record::{MoveStatus, Phase, UpgradeKind, UpgradeRecord, WorkloadMove};
use crate::platform::emulated::ctl::{self, LuoFaults, Request, Response};
use crate::platform::{PlatformKind, Resources, WorkloadInfo};
use crate::sys::kconfig;

/// How long the CLI waits for the agent's answer (preserving, digesting and loading take
/// seconds; a kexec that happens ends this process first).
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(600);

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
    let dev = std::path::Path::new(crate::sys::luo::DEV_PATH).exists();
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

/// Pre-flight for the luo platform: the common checks (without the multikernel-only
/// spare-cpu check) plus the kernel's readiness.
pub fn preflight(g: &Global, need_keys: bool, lock_held: bool) -> Vec<CheckResult> {
    let mut out: Vec<CheckResult> = crate::cli::upgrade::preflight(g, need_keys, lock_held)
        .into_iter()
        .filter(|c| c.name != "spare-cpus")
        .collect();
    out.extend(kernel_checks());
    out
}

/// `mk-upgrade check --platform luo`.
pub fn check(g: &Global, a: &CheckArgs) -> Result<ExitCode, CliError> {
    let checks = preflight(g, !a.insecure_allow_unsigned, false);
    let ready = checks.iter().all(|c| c.ok);
    if a.json {
        println!("{}", json!({ "ready": ready, "checks": checks }));
    } else {
        println!("pre-flight checks (luo):");
        for c in &checks {
            let mark = if c.ok { "ok  " } else { "FAIL" };
            println!("  [{mark}] {:<13} {}", c.name, c.detail);
            if let Some(f) = &c.fix {
                println!("         {:<13} fix: {f}", "");
            }
        }
        println!("{}", if ready { "ready" } else { "NOT ready" });
    }
    Ok(if ready {
        Exit::Ok
    } else {
        Exit::PreflightFailed
    }
    .into())
}

/// Asks the host agent who runs.
pub fn ping(g: &Global) -> Result<(String, Vec<u32>, String, Vec<WorkloadInfo>), CliError> {
    let socket = super::ctl_socket(&g.state_dir);
    match ctl::call(0, &socket, &Request::Ping) {
        Ok((
            Response::Pong {
                kernel_release,
                cpus,
                freezer,
                workloads,
                ..
            },
            _,
        )) => Ok((kernel_release, cpus, freezer, workloads)),
        Ok((other, _)) => Err(CliError::new(
            Exit::Platform,
            format!("unexpected answer from the host agent: {other:?}"),
        )),
        Err(e) => Err(CliError::new(
            Exit::Platform,
            format!(
                "the host agent does not answer at {} ({e}); start it with `mk-agentd serve \
                 --state-dir {}`",
                socket.display(),
                g.state_dir.display()
            ),
        )),
    }
}

fn new_record(
    kind: UpgradeKind,
    before: &str,
    after: &str,
    sha256: &str,
    workloads: &[WorkloadInfo],
) -> UpgradeRecord {
    let mut id = [0u8; 16];
    if getrandom::fill(&mut id).is_err() {
        id[..8].copy_from_slice(&super::realtime_ns().to_le_bytes());
    }
    UpgradeRecord {
        upgrade_id: hex::encode(id),
        kind,
        platform: PlatformKind::Luo,
        started_at: rollback::time::now_unix(),
        kernel_before: before.to_owned(),
        kernel_after: after.to_owned(),
        image_sha256: sha256.to_owned(),
        old_instance: 0,
        old_resources: Resources::default(),
        new_instance: None,
        phase: Phase::Verified,
        workloads: workloads
            .iter()
            .map(|w| WorkloadMove {
                name: w.name.clone(),
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
    }
}

/// Journals `record` and hands the upgrade to the agent; returns when the agent answered
/// (it refused or unwound), or never (the machine kexecs).
fn hand_over(
    g: &Global,
    record: &UpgradeRecord,
    cmdline: &str,
    faults: LuoFaults,
    kernel: Option<BorrowedFd<'_>>,
    initrd: Option<BorrowedFd<'_>>,
) -> Result<ExitCode, CliError> {
    let mut journal = g.journal()?;
    journal
        .write(record)
        .map_err(|e| CliError::new(Exit::Io, e.to_string()))?;
    let req = Request::LuoUpgrade {
        upgrade_id: record.upgrade_id.clone(),
        record_json: serde_json::to_string(record)
            .map_err(|e| CliError::new(Exit::Internal, e.to_string()))?,
        cmdline: cmdline.to_owned(),
        faults,
        kernel_attached: kernel.is_some(),
        initrd_attached: initrd.is_some(),
    };
    let fds: Vec<BorrowedFd<'_>> = kernel.into_iter().chain(initrd).collect();
    eprintln!(
        "mk-upgrade: upgrade {} journaled; the host agent preserves {} workload(s) in LUO \
         sessions and kexecs {} -> {} (the result is printed by the agent of the kernel that \
         ends up running, as `MK-UPGRADE-RESULT ...`)",
        record.upgrade_id,
        record.workloads.len(),
        record.kernel_before,
        record.kernel_after
    );
    match ctl::call_with_fds(
        0,
        &super::ctl_socket(&g.state_dir),
        &req,
        &fds,
        UPGRADE_TIMEOUT,
    ) {
        Ok(_) => Err(CliError::new(
            Exit::Internal,
            "the host agent answered a LuoUpgrade without kexecing".to_owned(),
        )),
        Err(e) => {
            let msg = e.to_string();
            if msg.contains("closed the control socket") {
                Ok(Exit::Ok.into())
            } else {
                Err(CliError::new(
                    Exit::RolledBack,
                    format!("the upgrade did not happen and was unwound: {msg}"),
                ))
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
    let (running, _, _, workloads) = ping(g)?;
    let image = match crate::cli::upgrade::verify_for_apply(g, a, &running) {
        Ok(i) => i,
        Err(refusal) => return refusal,
    };
    if a.dry_run {
        println!(
            "{}",
            json!({"result": "dry-run", "platform": "luo", "kernel_before": running,
                "kernel_after": image.info.release, "image_sha256": hex::encode(image.sha256),
                "workloads": workloads.iter().map(|w| &w.name).collect::<Vec<_>>()})
        );
        return Ok(Exit::Ok.into());
    }
    let initrd = a
        .initrd
        .as_ref()
        .map(std::fs::File::open)
        .transpose()
        .map_err(|e| CliError::new(Exit::Io, format!("initrd: {e}")))?;
    let record = new_record(
        UpgradeKind::Apply,
        &running,
        &image.info.release,
        &hex::encode(image.sha256),
        &workloads,
    );
    let faults = LuoFaults {
        corrupt_region: a.inject == Some(Inject::CorruptRegion),
        health_fail: a.inject == Some(Inject::HealthFail),
    };
    hand_over(
        g,
        &record,
        &a.cmdline,
        faults,
        Some(image.memfd.as_fd()),
        initrd.as_ref().map(AsFd::as_fd),
    )
}

/// `mk-upgrade rollback --platform luo`: back to the kernel the agent came from.
pub fn rollback(g: &Global, a: &RollbackArgs) -> Result<ExitCode, CliError> {
    let _guard = lock(g)?;
    let checks = preflight(g, false, true);
    if let Some(refusal) = refuse_failed_checks(a.json, &checks) {
        return refusal;
    }
    let (running, _, _, workloads) = ping(g)?;
    let record = new_record(UpgradeKind::Rollback, &running, "previous", "", &workloads);
    hand_over(g, &record, "", LuoFaults::default(), None, None)
}

/// `mk-upgrade recover --platform luo` (and `mk-agentd` without a subcommand): an upgrade
/// journaled but not running any more never reached its kexec (one that did is resumed by
/// the next kernel's agent); it is finished as rolled back. The host agent does the same at
/// every normal boot.
pub fn recover(g: &Global, a: &crate::cli::upgrade::JsonArgs) -> Result<ExitCode, CliError> {
    let _guard = lock(g)?;
    let release = super::running_release();
    match super::agent::finish_interrupted(&g.state_dir, &release) {
        None => {
            if a.json {
                println!("{}", json!({ "result": "nothing-to-recover" }));
            } else {
                println!("no interrupted upgrade");
            }
        }
        Some(doc) => {
            if !a.json {
                println!(
                    "finished an interrupted upgrade as rolled back: {}",
                    doc["error"].as_str().unwrap_or_default()
                );
            }
        }
    }
    Ok(Exit::Ok.into())
}
