//! The host agent of a LUO kernel (a daemon: it sits above the orchestrator): `mk-agentd serve --state-dir D [--workloads F]
//! [--kernel-image K] [--initrd I]`.
//!
//! At start it opens `/dev/liveupdate` (exclusive; the fd is kept for the agent's life) and
//! the [`LuoPlatform`] over it, which retrieves whatever a kexec carried over. Then it runs
//! the orchestrator's recovery (`upgrade_agent::orchestrator::recover`): after a kexec that claims
//! every staged workload (verify, restore, health-check) and commits, or returns to the
//! previous kernel; at a normal boot it settles an upgrade that never reached its kexec, and
//! the trial-boot record (a kernel that never confirmed is marked bad). At a normal boot it
//! then starts every workload of the workload file. Then it serves `D/luo/ctl.sock` with the
//! instance host's protocol plus `LuoApply`, which runs the orchestrator on this platform.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use upgrade_agent::fault::Faults;
use upgrade_agent::handover;
use upgrade_agent::host::adopt;
use upgrade_agent::host::ctl::{Request, Response};
use upgrade_agent::host::supervisor::{self, CtlHandler, Instance, Shared, lock};
use upgrade_agent::orchestrator::ops::{self, OpError};
use upgrade_agent::orchestrator::{Promotion, Quiet, SystemEnv};
use upgrade_agent::platform::LoadableKernel;
use upgrade_agent::platform::luo::RESULT_PREFIX;
use upgrade_agent::platform::luo::host::{KernelRef, LuoPlatform};
use upgrade_agent::platform::luo::{agent_dir, ctl_socket, running_release};
use upgrade_agent::record::{UpgradeKind, UpgradeRecord};
use upgrade_agent::statedir::StateDir;
use upgrade_agent::sys::luo::{LiveUpdate, LuoError};

/// Names the journal write of the start-up recovery after which the agent kills itself
/// (fault-injection builds only; the VM suite's crash matrix).
pub const RECOVERY_CRASH_ENV: &str = "MK_FAULT_RECOVERY_CRASH_AFTER_WRITE";

/// Options of `mk-agentd serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub state_dir: PathBuf,
    /// Workloads started at a normal boot.
    pub workloads: Option<PathBuf>,
    /// The image of the kernel this agent runs on (needed to come back to it after a
    /// failed upgrade; after a kexec the previous kernel hands it over in the session).
    pub kernel_image: Option<PathBuf>,
    /// The initramfs the running kernel booted with (kexec back boots it with this one).
    pub initrd: Option<PathBuf>,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening /dev/liveupdate: {0}")]
    LiveUpdate(#[source] LuoError),
    #[error(transparent)]
    Platform(#[from] upgrade_agent::platform::PlatformError),
}

/// What the boot did, written to `D/luo/boot.json` before the control socket opens.
#[derive(Debug, serde::Serialize)]
struct BootReport {
    release: String,
    luo: bool,
    resumed: bool,
    result: Option<serde_json::Value>,
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn print_result(rec: &UpgradeRecord) -> serde_json::Value {
    let doc = rec.report_json();
    say(&format!("{RESULT_PREFIX} {doc}"));
    doc
}

fn online_cpus() -> Vec<u32> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return vec![0];
    };
    (0..nix::sched::CpuSet::count())
        .filter(|c| set.is_set(*c).unwrap_or(false))
        .filter_map(|c| u32::try_from(c).ok())
        .collect()
}

fn memfd_of(path: &PathBuf, name: &str) -> Result<OwnedFd, AgentError> {
    let io = |source| AgentError::Io {
        what: format!("{}", path.display()),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    handover::copy_memfd(name, f.as_fd()).map_err(io)
}

/// Runs the host agent. Returns only on a set-up error.
pub fn serve(opts: &ServeOptions) -> Result<(), AgentError> {
    let dir = agent_dir(&opts.state_dir);
    let records = dir.join("running");
    rollback::ensure_private_dir(&records).map_err(|e| AgentError::Io {
        what: format!("creating {}", records.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    let state = StateDir::new(&opts.state_dir).with_workloads(opts.workloads.clone());
    let release = running_release();
    let dev = match LiveUpdate::open() {
        Ok(d) => Some(d),
        Err(e @ LuoError::DeviceMissing { .. }) => {
            tracing::warn!(error = %e, "no /dev/liveupdate: upgrades are refused on this boot");
            None
        }
        Err(e) => return Err(AgentError::LiveUpdate(e)),
    };
    let luo = dev.is_some();
    let running = match &opts.kernel_image {
        Some(p) if p.exists() => Some(KernelRef {
            image: memfd_of(p, "running-kernel")?,
            release: release.clone(),
            initrd: opts
                .initrd
                .as_ref()
                .map(|i| memfd_of(i, "running-initrd"))
                .transpose()?,
            cmdline: std::fs::read_to_string("/proc/cmdline")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }),
        _ => None,
    };
    let mut instance = Instance::new(
        0,
        release.clone(),
        online_cpus(),
        upgrade_agent::sys::cgroup::Freezer::detect("mk-upgrade-luo"),
        dir.clone(),
        opts.state_dir.clone(),
    );
    instance.records = Some(records);
    let shared: Shared = Arc::new(Mutex::new(instance));
    upgrade_agent::host::watch::start_background(&shared).map_err(|source| AgentError::Io {
        what: format!("binding {}", dir.join("notify.sock").display()),
        source,
    })?;
    let mut platform = LuoPlatform::open(state.clone(), dev, Arc::clone(&shared), running)?;
    let resumed = platform.resumed();
    if resumed {
        // After a kexec nothing runs yet, unless this agent restarted mid-claim: the copies
        // it had claimed are adopted; the claims start the others.
        start_workloads(&shared, &state, false);
    } else {
        trial_check(&state, &release);
        // Before recovery: after a restart of this agent (same boot) its workloads still
        // run, and recovery checks that they do; at a cold boot they start afresh.
        start_workloads(&shared, &state, true);
    }
    let env = SystemEnv::default();
    let promotion = state
        .slots()
        .ok()
        .map(|slots| Promotion { slots, floor: None });
    // Test-only (fault-injection builds): the crash matrix kills this agent after the
    // N-th journal write of its recovery.
    let faults = Faults {
        crash_after_write: std::env::var(RECOVERY_CRASH_ENV)
            .ok()
            .and_then(|v| v.parse().ok()),
        ..Faults::NONE
    }
    .effective();
    let result = match ops::recover(&state, &mut platform, promotion, &Quiet, &env, faults) {
        Ok(Some(rec)) => Some(print_result(&rec)),
        Ok(None) => None,
        Err(e) => {
            let doc = serde_json::json!({"result": "failed", "kernel_after": release,
                "error": format!("recovery: {e}")});
            say(&format!("{RESULT_PREFIX} {doc}"));
            Some(doc)
        }
    };
    let report = BootReport {
        release,
        luo,
        resumed,
        result,
    };
    let _ = std::fs::write(
        dir.join("boot.json"),
        serde_json::to_vec(&report).unwrap_or_default(),
    );
    let path = ctl_socket(&opts.state_dir);
    let ctl = upgrade_agent::host::peer::bind_private(&path).map_err(|source| AgentError::Io {
        what: format!("binding {}", path.display()),
        source,
    })?;
    let workloads = lock(&shared).workloads.len();
    say(&format!(
        "MK-AGENT-READY release={} luo={} resumed={} workloads={workloads}",
        report.release, report.luo, report.resumed,
    ));
    // Type=notify: the control socket is bound and the workloads run.
    if let Err(e) = upgrade_agent::telemetry::notify_ready(&format!(
        "serving {workloads} workload(s) on {}",
        report.release
    )) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
    let platform = Arc::new(Mutex::new(platform));
    let handler: Arc<CtlHandler> = Arc::new(move |sh, req, fds| match req {
        Request::LuoApply {
            kind,
            release,
            sha256,
            cmdline,
            faults,
            kernel_attached,
            initrd_attached,
            floor,
        } => {
            let ask = Ask {
                kind,
                release,
                sha256,
                cmdline,
                faults,
                kernel_attached,
                initrd_attached,
                floor,
            };
            let mut p = platform
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (apply(&state, &mut p, ask, fds), vec![])
        }
        other => supervisor::handle_ctl(sh, other),
    });
    supervisor::serve_ctl_listener(&shared, &ctl, &handler);
    Ok(())
}

/// A normal boot: a kernel that was booted for a trial and never confirmed did not come up;
/// the trial record marks it bad (the orchestrator's recovery then finishes its record). An
/// attempt recorded in this very boot never booted anything (this agent stopped between
/// recording it and the kexec, and was started again): it is cancelled, not held against the
/// kernel (`check_on_boot` with the boot time).
fn trial_check(state: &StateDir, release: &str) {
    match state.trials().map_err(|e| e.to_string()).and_then(|mut t| {
        t.check_on_boot(release, boot_time())
            .map_err(|e| e.to_string())
    }) {
        Ok(rollback::BootVerdict::TrialFailed {
            attempt,
            running,
            reason,
        }) => say(&format!(
            "MK-AGENT-TRIAL-FAILED release={} attempt={} running={running}: {reason}",
            attempt.release, attempt.attempt
        )),
        Ok(rollback::BootVerdict::NotBooted(p)) => say(&format!(
            "MK-AGENT-TRIAL-CANCELLED release={} attempt={}: recorded in this boot, no kexec \
             happened (the agent restarted)",
            p.release, p.attempt
        )),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "trial-boot check"),
    }
}

/// When this boot began (Unix seconds): `btime` of `/proc/stat`.
fn boot_time() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// A normal boot, or a restart of this agent: every workload of the workload file; a copy
/// still running from before the restart is adopted (`upgrade_agent::host::adopt`), the
/// others start with fresh fds.
fn start_workloads(shared: &Shared, state: &StateDir, start_fresh: bool) {
    if !state.workloads_path().exists() {
        return;
    }
    let file = match state.load_workloads() {
        Ok(f) => f,
        Err(e) => {
            say(&format!("MK-AGENT-WORKLOADS-FAILED {e}"));
            return;
        }
    };
    for spec in &file.workloads {
        match adopt::adopt_into(shared, spec) {
            Ok(adopt::Adoption::Adopted { pid, fds }) => {
                say(&format!(
                    "MK-AGENT-ADOPTED {} pid={pid} fds={fds}: its running copy is managed again",
                    spec.name
                ));
                continue;
            }
            Ok(adopt::Adoption::Nothing { killed_leftovers }) => {
                if killed_leftovers {
                    say(&format!(
                        "MK-AGENT-LEFTOVERS-KILLED {}: processes without a record in its group",
                        spec.name
                    ));
                }
                if !start_fresh {
                    continue;
                }
            }
            Err(e) => {
                say(&format!(
                    "MK-AGENT-WORKLOAD-FAILED {}: its running copy cannot be adopted ({e}); it \
                     is left running, unmanaged: stop it, then restart the agent",
                    spec.name
                ));
                continue;
            }
        }
        let (resp, _) = supervisor::handle_ctl(
            shared,
            Request::Start {
                spec: Box::new(spec.clone()),
            },
        );
        if let Response::Error { message } = resp {
            say(&format!(
                "MK-AGENT-WORKLOAD-FAILED {}: {message}",
                spec.name
            ));
        }
    }
}

/// A `LuoApply` request.
#[derive(Debug)]
struct Ask {
    kind: UpgradeKind,
    release: String,
    sha256: String,
    cmdline: String,
    faults: Faults,
    kernel_attached: bool,
    initrd_attached: bool,
    floor: Option<String>,
}

/// Runs one upgrade on this kernel with the orchestrator. Returns only when it ended here
/// (refused, rolled back before the kexec, failed); on success the machine kexecs.
fn apply(state: &StateDir, platform: &mut LuoPlatform, ask: Ask, fds: Vec<OwnedFd>) -> Response {
    let error = |message: String| Response::Error { message };
    let mut fds = fds.into_iter();
    let attached_kernel = if ask.kernel_attached {
        match fds.next() {
            Some(fd) => Some(fd),
            None => return error("the request names a kernel but none is attached".into()),
        }
    } else {
        None
    };
    let attached_initrd = if ask.initrd_attached {
        match fds.next() {
            Some(fd) => Some(fd),
            None => return error("the request names an initrd but none is attached".into()),
        }
    } else {
        None
    };
    let mut sha256 = [0u8; 32];
    // A rollback boots the agent's previous kernel with its own initramfs and command line.
    let previous;
    let kernel = if let Some(k) = attached_kernel.as_ref() {
        if hex::decode_to_slice(&ask.sha256, &mut sha256).is_err() {
            return error(format!("bad image digest {:?} in the request", ask.sha256));
        }
        LoadableKernel {
            image: k.as_fd(),
            release: ask.release.clone(),
            sha256,
            initrd: attached_initrd.as_ref().map(AsFd::as_fd),
            cmdline: &ask.cmdline,
        }
    } else {
        let Some(p) = platform.previous() else {
            return Response::NothingToDo {
                message: "no previous kernel is kept by this agent: nothing to roll back to".into(),
            };
        };
        // The floor is never bypassed, not by a rollback either (docs/signing.md).
        match state.slots().and_then(|s| Ok(s.floor()?)) {
            Ok(Some(floor))
                if rollback::Release::parse(&p.release)
                    .ok()
                    .zip(rollback::Release::parse(&floor).ok())
                    .is_none_or(|(r, f)| r.is_below(&f)) =>
            {
                return Response::BelowFloor {
                    message: format!(
                        "the previous kernel {} is below the version floor {floor} (the \
                         floor is never bypassed); to go back, apply a signed kernel at or \
                         above {floor}",
                        p.release
                    ),
                };
            }
            Ok(_) => {}
            Err(e) => return error(format!("the version floor: {e}")),
        }
        previous = (
            p.image.as_fd().try_clone_to_owned(),
            p.initrd.as_ref().map(|i| i.as_fd().try_clone_to_owned()),
            p.release.clone(),
            p.cmdline.clone(),
        );
        let (Ok(image), initrd) = (&previous.0, &previous.1) else {
            return error("duplicating the previous kernel's image".into());
        };
        let initrd = match initrd {
            Some(Ok(i)) => Some(i.as_fd()),
            Some(Err(e)) => return error(format!("duplicating the previous initramfs: {e}")),
            None => None,
        };
        // The record names the image it boots, as for an apply.
        match state_serializers::digest_fd(image.as_fd()) {
            Ok(d) => sha256 = d.sha256,
            Err(e) => return error(format!("digesting the previous kernel's image: {e}")),
        }
        LoadableKernel {
            image: image.as_fd(),
            release: previous.2.clone(),
            sha256,
            initrd,
            cmdline: &previous.3,
        }
    };
    let slots = match state.slots() {
        Ok(s) => s,
        Err(e) => return error(format!("kernel slots: {e}")),
    };
    let req = ops::Request {
        kind: ask.kind,
        kernel,
        faults: ask.faults,
        // LUO keeps its kernels in the agent (not in slots); the version floor is raised
        // by whichever kernel finishes the upgrade.
        promotion: Some(Promotion {
            slots,
            floor: ask.floor,
        }),
    };
    let env = SystemEnv::default();
    match ops::execute(state, platform, req, &Quiet, &env) {
        Ok((record, err)) => Response::Finished {
            record: Box::new(record),
            error: err.map(|e| e.to_string()),
        },
        Err(OpError::Upgrade(e)) => error(e.to_string()),
        Err(OpError::State(e)) => error(e.to_string()),
    }
}
