//! `check`, `apply`, `status`, `history`, `rollback`, `recover`.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;

use crate::app::{CliError, Global, op_error, upgrade_exit, verify_exit};
use upgrade_agent::exit::Exit;
use upgrade_agent::fault::Faults;
use upgrade_agent::orchestrator::{self, Observer, Promotion, SystemEnv, UpgradeError, ops};
use upgrade_agent::platform::{LoadableKernel, Platform};
use upgrade_agent::record::{MoveStatus, Outcome, Phase, UpgradeKind, UpgradeRecord};

/// `--json` only.
#[derive(Debug, Clone, clap::Args)]
pub struct JsonArgs {
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `mk-upgrade check`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    #[arg(long)]
    pub json: bool,
    /// Do not require trusted keys (for hosts that run `apply --insecure-allow-unsigned`).
    #[arg(long)]
    pub insecure_allow_unsigned: bool,
}

/// Test-only fault injection (also used by `mk-upgrade demo --inject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Inject {
    /// Corrupt a region of the first workload's handover image.
    CorruptRegion,
    /// Make the first workload fail its health check on the new instance.
    HealthFail,
}

/// Verifies `apply`'s image against the running release, the version floor and the
/// bad-kernel marks (every platform). `Err` holds what `apply` returns: the refusal, already
/// reported (JSON document or message).
pub fn verify_for_apply(
    g: &Global,
    a: &ApplyArgs,
    running: &str,
) -> Result<upgrade_agent::verify::VerifiedImage, Result<ExitCode, CliError>> {
    let io = |e: String| Err(Err(CliError::new(Exit::Io, e)));
    let slots = match rollback::Slots::open(&g.state_dir) {
        Ok(s) => s,
        Err(e) => return io(e.to_string()),
    };
    let floor = match slots.floor() {
        Ok(f) => f,
        Err(e) => return io(e.to_string()),
    };
    let policy = upgrade_agent::verify::VerifyPolicy {
        trusted_keys_dir: g.trusted_keys_dir(),
        allow_unsigned_insecure: a.insecure_allow_unsigned,
        running_release: running.to_owned(),
        floor,
        allow_downgrade: a.allow_downgrade,
    };
    let image = match upgrade_agent::verify::verify_kernel_image(
        &a.kernel,
        a.signature.as_deref(),
        &policy,
    ) {
        Ok(i) => i,
        Err(e) => return Err(refuse(a.json, verify_exit(&e), e.to_string(), None)),
    };
    let mark = match rollback::TrialBoots::open(&g.state_dir)
        .and_then(|t| t.is_bad(&image.info.release))
    {
        Ok(m) => m,
        Err(e) => return io(e.to_string()),
    };
    if let Some(mark) = mark {
        return Err(refuse(
            a.json,
            Exit::Incompatible,
            format!(
                "kernel {} is marked bad ({}); clear the mark only after fixing it",
                image.info.release, mark.reason
            ),
            None,
        ));
    }
    if image.info.release == running && !a.allow_downgrade {
        return Err(refuse(
            a.json,
            Exit::NothingToDo,
            format!("{} is already running", image.info.release),
            None,
        ));
    }
    for w in &image.warnings {
        eprintln!("mk-upgrade: warning: {w}");
    }
    Ok(image)
}

/// The refusal for failed pre-flight checks (naming them), or `None` when all passed.
pub(crate) fn refuse_failed_checks(
    json_out: bool,
    checks: &[CheckResult],
) -> Option<Result<ExitCode, CliError>> {
    let failed: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
    (!failed.is_empty()).then(|| {
        refuse(
            json_out,
            Exit::PreflightFailed,
            format!("pre-flight failed: {}", failed.join(", ")),
            Some(checks),
        )
    })
}

/// `mk-upgrade apply`.
#[derive(Debug, Clone, clap::Args)]
pub struct ApplyArgs {
    /// The new kernel (x86 bzImage).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk for the new kernel.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for the new kernel.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Signature file (default: KERNEL.sig).
    #[arg(long)]
    pub signature: Option<PathBuf>,
    /// Accept an image without signature (test hosts only).
    #[arg(long)]
    pub insecure_allow_unsigned: bool,
    /// Accept a release below the running one (never below the version floor).
    #[arg(long)]
    pub allow_downgrade: bool,
    /// Verify and plan, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
    /// Test-only: force a failure path.
    #[arg(long, value_enum, hide = true)]
    pub inject: Option<Inject>,
}

/// `mk-upgrade rollback`.
#[derive(Debug, Clone, clap::Args)]
pub struct RollbackArgs {
    #[arg(long)]
    pub json: bool,
}

/// One pre-flight check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// What to do when it failed.
    pub fix: Option<String>,
}

fn ok(name: &'static str, detail: impl Into<String>) -> CheckResult {
    CheckResult {
        name,
        ok: true,
        detail: detail.into(),
        fix: None,
    }
}

fn bad(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> CheckResult {
    CheckResult {
        name,
        ok: false,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// The state directory holds the journal, node keys and workload environment. One that
/// other users can write to fails the check; one they can read is reported (the files in it
/// are 0600 whatever the umask, but their names and the sockets' paths show). An existing
/// directory is reported, never changed.
fn state_dir_mode(dir: &std::path::Path) -> CheckResult {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = |m: &std::fs::Metadata| m.permissions().mode() & 0o7777;
    match std::fs::metadata(dir) {
        Ok(m) if mode(&m) & 0o022 != 0 => bad(
            "state-dir",
            format!(
                "{} is mode {:04o}: other users can change the journal, the node keys and the \
                 workload file",
                dir.display(),
                mode(&m)
            ),
            format!("chmod 700 {}", dir.display()),
        ),
        Ok(m) if mode(&m) & 0o077 != 0 => ok(
            "state-dir",
            format!(
                "{} is mode {:04o}: other users can list it (advice: chmod 700 {})",
                dir.display(),
                mode(&m),
                dir.display()
            ),
        ),
        Ok(m) if m.uid() != 0 && m.uid() != nix::unistd::geteuid().as_raw() => bad(
            "state-dir",
            format!(
                "{} is owned by uid {}, not by root or this user",
                dir.display(),
                m.uid()
            ),
            format!("chown root {}", dir.display()),
        ),
        Ok(m) => ok(
            "state-dir",
            format!(
                "{} ({:04o})",
                dir.display(),
                m.permissions().mode() & 0o7777
            ),
        ),
        Err(e) => bad(
            "state-dir",
            format!("{}: {e}", dir.display()),
            "run as root",
        ),
    }
}

/// Runs every pre-flight check (they do not change anything).
pub fn preflight(g: &Global, need_keys: bool, lock_held: bool) -> Vec<CheckResult> {
    let mut out = Vec::new();
    match g.ensure_state_dir() {
        Ok(()) => out.push(state_dir_mode(&g.state_dir)),
        Err(e) => out.push(bad(
            "state-dir",
            e.message,
            "run as root or pass --state-dir DIR",
        )),
    }
    if g.resolved_platform() == crate::app::PlatformChoice::Luo {
        crate::luo::platform_checks(g, &mut out);
        return common_checks(g, need_keys, lock_held, out);
    }
    if g.resolved_platform() == crate::app::PlatformChoice::Multikernel
        && !crate::multikernel::host_checks(g, &mut out)
    {
        return common_checks(g, need_keys, lock_held, out);
    }
    let mut platform = match g.open_side_by_side() {
        Ok(p) => Some(p),
        Err(e) => {
            out.push(bad("platform", e.message, "pass --platform emulated"));
            None
        }
    };
    if let Some(p) = platform.as_mut() {
        match p.probe() {
            Ok(c) => {
                let label = if c.emulated { " (EMULATED)" } else { "" };
                out.push(ok(
                    "platform",
                    format!(
                        "{}{label}; freezer {}; cpus {:?}",
                        c.kind, c.freezer, c.cpus
                    ),
                ));
                // Advisory: not a failure, but the biggest fixed cost of every move.
                match upgrade_agent::sys::cgroup::favordynmods() {
                    Some(true) => {
                        out.push(ok("cgroup-tuning", "cgroup2 mounted with favordynmods"));
                    }
                    Some(false) => out.push(ok(
                        "cgroup-tuning",
                        "cgroup2 without favordynmods: each move waits ~10 ms for an RCU grace \
                         period when the workload joins its cgroup (advice: mount -o \
                         remount,favordynmods on the cgroup2 mount)",
                    )),
                    None => {}
                }
                match orchestrator::current_instance(p.as_mut()) {
                    Ok(cur) => {
                        let spare = &c.spare_cpus;
                        if spare.is_empty() && cur.resources.cpus.len() < 2 {
                            out.push(bad(
                                "spare-cpus",
                                "no spare cpu and the running instance owns only one",
                                "free a cpu (the new kernel boots on spare cores)",
                            ));
                        } else {
                            out.push(ok(
                                "spare-cpus",
                                if spare.is_empty() {
                                    format!(
                                        "none spare; instance {} will release half of {:?}",
                                        cur.id, cur.resources.cpus
                                    )
                                } else {
                                    format!("{spare:?}")
                                },
                            ));
                        }
                        out.push(ok(
                            "instance",
                            format!(
                                "instance {} runs {} with {} workloads",
                                cur.id,
                                cur.kernel_release.as_deref().unwrap_or("?"),
                                cur.workloads.len()
                            ),
                        ));
                        workload_checks(g, cur.id, &cur.workloads, &mut out);
                    }
                    Err(e) => out.push(bad(
                        "instance",
                        e.to_string(),
                        "boot the first instance (`mk-upgrade emu init --kernel IMAGE`) or run `mk-upgrade recover`",
                    )),
                }
            }
            Err(e) => out.push(bad(
                "platform",
                e.to_string(),
                "check the platform state directory",
            )),
        }
    }
    common_checks(g, need_keys, lock_held, out)
}

/// Whether every running workload is declared in the workload file.
pub fn workload_checks(
    g: &Global,
    instance: upgrade_agent::platform::InstanceId,
    running: &[upgrade_agent::platform::WorkloadInfo],
    out: &mut Vec<CheckResult>,
) {
    match g.load_workloads() {
        Ok(f) => {
            let missing: Vec<&str> = running
                .iter()
                .filter(|w| f.get(&w.name).is_none())
                .map(|w| w.name.as_str())
                .collect();
            if missing.is_empty() {
                out.push(ok(
                    "workloads",
                    format!(
                        "{} declared in {}",
                        f.workloads.len(),
                        g.workloads_path().display()
                    ),
                ));
                let env = SystemEnv::default();
                let problems: Vec<String> = running
                    .iter()
                    .filter_map(|w| orchestrator::unmovable(&f, &env, instance, w))
                    .collect();
                if problems.is_empty() {
                    out.push(ok(
                        "movable",
                        format!(
                            "every workload runs and holds only the sockets it was given \
                             ({} running)",
                            running.len()
                        ),
                    ));
                } else {
                    out.push(bad(
                        "movable",
                        problems.join("; "),
                        "see each workload's message (docs/workloads.md, \"Modes\")",
                    ));
                }
            } else {
                out.push(bad(
                    "workloads",
                    format!("running but not declared: {}", missing.join(", ")),
                    format!("declare them in {}", g.workloads_path().display()),
                ));
            }
        }
        Err(e) => out.push(bad("workloads", e.message, "fix the workload file")),
    }
    if let Ok(f) = g.load_workloads()
        && let Some(w) = f
            .workloads
            .iter()
            .find(|w| w.mode == upgrade_agent::workload::Mode::Checkpoint)
    {
        out.push(match upgrade_agent::host::checkpoint::readiness() {
            Ok(detail) => ok(
                "criu",
                format!("{detail} (workload {} is in mode checkpoint)", w.name),
            ),
            Err((problem, fix)) => bad(
                "criu",
                format!("workload {} is in mode \"checkpoint\": {problem}", w.name),
                fix,
            ),
        });
    }
}

/// The checks of every platform: trusted keys, journal, lock.
fn common_checks(
    g: &Global,
    need_keys: bool,
    lock_held: bool,
    mut out: Vec<CheckResult>,
) -> Vec<CheckResult> {
    if need_keys {
        match g.trusted() {
            Ok(k) => out.push(ok(
                "trusted-keys",
                format!("{} key(s) in {}", k.len(), g.trusted_keys_dir().display()),
            )),
            Err(e) => {
                // No key at all: say where one goes. A refused key (modes, owner, symlink)
                // names its own fix in the message.
                let fix = if e.message.contains("no trusted keys") {
                    format!(
                        "put the release signer's NAME.pub in {} (`mk-upgrade keys generate`)",
                        g.trusted_keys_dir().display()
                    )
                } else {
                    "fix what the message names; only root may be able to change a trusted \
                     key or its directory"
                        .to_owned()
                };
                out.push(bad("trusted-keys", e.message, fix));
            }
        }
    }
    match g.journal().map(|j| j.current()) {
        Ok(Ok(None)) => out.push(ok("journal", "no upgrade in flight")),
        Ok(Ok(Some(r))) => out.push(bad(
            "journal",
            format!(
                "upgrade {} is in flight (phase {:?})",
                r.upgrade_id, r.phase
            ),
            "run `mk-upgrade recover` (mk-agentd does it at start)",
        )),
        Ok(Err(e)) => out.push(bad("journal", e.to_string(), "see the message")),
        Err(e) => out.push(bad("journal", e.message, "check the state directory")),
    }
    if !lock_held {
        match rollback::Lock::acquire(&g.state_dir) {
            Ok(guard) => {
                drop(guard);
                out.push(ok("lock", "free"));
            }
            Err(e) => out.push(bad("lock", e.to_string(), "wait for the other upgrade")),
        }
    }
    out
}

fn print_checks(checks: &[CheckResult]) {
    for c in checks {
        let mark = if c.ok { "ok  " } else { "FAIL" };
        println!("  [{mark}] {:<13} {}", c.name, c.detail);
        if let Some(f) = &c.fix {
            println!("         {:<13} fix: {f}", "");
        }
    }
}

/// `mk-upgrade check`.
pub fn check(g: &Global, a: &CheckArgs) -> ExitCode {
    let checks = if g.resolved_platform() == crate::app::PlatformChoice::Luo {
        crate::luo::preflight(g, !a.insecure_allow_unsigned, false)
    } else {
        preflight(g, !a.insecure_allow_unsigned, false)
    };
    let ready = checks.iter().all(|c| c.ok);
    if a.json {
        println!("{}", json!({ "ready": ready, "checks": checks }));
    } else {
        println!("pre-flight checks:");
        print_checks(&checks);
        println!("{}", if ready { "ready" } else { "NOT ready" });
    }
    if ready {
        Exit::Ok
    } else {
        Exit::PreflightFailed
    }
    .into()
}

/// Progress on stderr: a spinner on a terminal, plain lines otherwise, nothing with --json.
#[derive(Debug)]
pub struct CliObserver {
    start: Instant,
    bar: Option<ProgressBar>,
}

impl CliObserver {
    /// An observer; `quiet` for --json.
    pub fn new(quiet: bool) -> Self {
        let bar = (!quiet).then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(Duration::from_millis(100));
            b
        });
        CliObserver {
            start: Instant::now(),
            bar,
        }
    }

    fn line(&self, s: String) {
        let Some(b) = &self.bar else { return };
        let s = format!(
            "[{:>7.1} ms] {s}",
            self.start.elapsed().as_secs_f64() * 1000.0
        );
        if b.is_hidden() {
            eprintln!("{s}");
        } else {
            b.println(s);
        }
    }

    /// Clears the spinner.
    pub fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Observer for CliObserver {
    fn step(&self, phase: Phase, what: &str) {
        if let Some(b) = &self.bar {
            b.set_message(format!("{phase:?}: {what}"));
        }
        self.line(format!("{phase:?}: {what}"));
    }
    fn workload(&self, name: &str, status: MoveStatus, detail: Option<&str>) {
        if let Some(d) = detail {
            self.line(format!("  {name}: {status:?} ({d})"));
        }
    }
}

/// The JSON document of an upgrade record.
pub fn record_json(rec: &UpgradeRecord) -> serde_json::Value {
    rec.report_json()
}

/// Prints a finished record for humans.
pub fn print_record(rec: &UpgradeRecord) {
    let label = match rec.platform {
        upgrade_agent::platform::PlatformKind::Emulated => " [EMULATED multikernel]",
        upgrade_agent::platform::PlatformKind::Multikernel => crate::multikernel::record_label(),
        upgrade_agent::platform::PlatformKind::Luo => "",
    };
    println!(
        "upgrade {} ({:?}){label}: {} -> {}: {}",
        rec.upgrade_id,
        rec.kind,
        rec.kernel_before,
        rec.kernel_after,
        record_json(rec)["result"].as_str().unwrap_or("?")
    );
    for w in &rec.workloads {
        let blackout = w
            .blackout_us
            .map(|u| format!("blackout {:.3} ms", u as f64 / 1000.0))
            .unwrap_or_default();
        let closed = match (w.closed_us, w.stop_us) {
            (Some(c), Some(s)) => format!(
                " (restart: stopped in {:.1} ms, port closed {:.1} ms)",
                s as f64 / 1000.0,
                c as f64 / 1000.0
            ),
            _ => String::new(),
        };
        let closed = match w.connections {
            Some(n) => format!("{closed} ({n} connections handed over)"),
            None => closed,
        };
        println!(
            "  {:<16} {:<11} {blackout}{closed} {}",
            w.name,
            format!("{:?}", w.status),
            w.detail.as_deref().unwrap_or("")
        );
    }
    if let Some(e) = &rec.error {
        println!("  reason: {e}");
    }
}

/// Faults requested by `--inject` and `MK_FAULT_CRASH_AFTER_WRITE` (fault-injection builds
/// only: other builds refuse `--inject`).
pub fn faults(inject: Option<Inject>) -> Result<Faults, CliError> {
    if inject.is_some() && !upgrade_agent::fault::ENABLED {
        return Err(CliError::new(
            Exit::Usage,
            "--inject needs a build with fault injection (cargo build --features \
             upgrade-agent/fault-injection); release builds never carry it",
        ));
    }
    Ok(Faults {
        corrupt_region: inject == Some(Inject::CorruptRegion),
        health_fail: inject == Some(Inject::HealthFail),
        crash_after_write: Faults::crash_point_from_env(),
    })
}

/// Runs one upgrade to its end on `platform`; returns the finished record and its error.
pub fn execute(
    g: &Global,
    platform: &mut dyn Platform,
    req: ops::Request<'_>,
    observer: &dyn Observer,
) -> Result<(UpgradeRecord, Option<UpgradeError>), CliError> {
    ops::execute(&g.state(), platform, req, observer, &SystemEnv::default())
        .map_err(|e| op_error(&e))
}

fn finish_report(rec: &UpgradeRecord, err: Option<&UpgradeError>, json_out: bool) -> ExitCode {
    if json_out {
        println!("{}", record_json(rec));
    } else {
        print_record(rec);
    }
    match err {
        None => Exit::Ok.into(),
        Some(e) => {
            if !json_out {
                eprintln!("mk-upgrade: {e}");
            }
            upgrade_exit(e).into()
        }
    }
}

/// Takes the apply lock (exit 9 when another upgrade holds it).
pub(crate) fn lock(g: &Global) -> Result<rollback::LockGuard, CliError> {
    g.ensure_state_dir()?;
    rollback::Lock::acquire(&g.state_dir).map_err(|e| match e {
        rollback::LockError::Busy { .. } => CliError::new(Exit::Busy, e.to_string()),
        other @ rollback::LockError::Io(_) => CliError::new(Exit::Io, other.to_string()),
    })
}

/// Reports a refusal: one JSON document with `--json` (and the exit code), else the failed
/// checks on stderr and the message as the error.
pub(crate) fn refuse(
    json_out: bool,
    exit: Exit,
    message: String,
    checks: Option<&[CheckResult]>,
) -> Result<ExitCode, CliError> {
    if json_out {
        println!(
            "{}",
            json!({ "result": "refused", "error": message, "checks": checks })
        );
        return Ok(exit.into());
    }
    for c in checks.unwrap_or_default().iter().filter(|c| !c.ok) {
        eprintln!("  [FAIL] {:<13} {}", c.name, c.detail);
        if let Some(f) = &c.fix {
            eprintln!("         {:<13} fix: {f}", "");
        }
    }
    Err(CliError::new(exit, message))
}

/// `mk-upgrade apply`.
pub fn apply(g: &Global, a: &ApplyArgs) -> Result<ExitCode, CliError> {
    // A fault this build does not carry is refused before anything is checked or stored.
    faults(a.inject)?;
    if g.resolved_platform() == crate::app::PlatformChoice::Luo {
        return crate::luo::apply(g, a);
    }
    let _guard = lock(g)?;
    let checks = preflight(g, !a.insecure_allow_unsigned, true);
    if let Some(refusal) = refuse_failed_checks(a.json, &checks) {
        return refusal;
    }
    let mut platform = g.open_side_by_side()?;
    let current =
        orchestrator::current_instance(platform.as_mut()).map_err(|e| CliError::upgrade(&e))?;
    let running = current.kernel_release.clone().unwrap_or_default();
    let image = match verify_for_apply(g, a, &running) {
        Ok(i) => i,
        Err(refusal) => return refusal,
    };
    if a.dry_run {
        let plan = json!({
            "result": "dry-run",
            "kernel_before": running,
            "kernel_after": image.info.release,
            "image_sha256": hex::encode(image.sha256),
            "signer": image.signer.map(|k| k.to_string()),
            "workloads": current.workloads.iter().map(|w| &w.name).collect::<Vec<_>>(),
            "checks": checks,
        });
        if a.json {
            println!("{plan}");
        } else {
            println!(
                "dry run: would upgrade {} -> {} (sha256 {}), moving {} workload(s); nothing changed",
                running,
                image.info.release,
                hex::encode(image.sha256),
                current.workloads.len()
            );
        }
        return Ok(Exit::Ok.into());
    }
    let map = image
        .map()
        .map_err(|e| CliError::new(Exit::Io, format!("mapping the verified image: {e}")))?;
    let mut slots =
        rollback::Slots::open(&g.state_dir).map_err(|e| CliError::new(Exit::Io, e.to_string()))?;
    slots
        .store(
            rollback::Slot::Candidate,
            &map,
            &image.info.release,
            &image.sha256,
        )
        .map_err(|e| CliError::new(Exit::Io, e.to_string()))?;
    drop(map);
    let initrd = a
        .initrd
        .as_ref()
        .map(std::fs::File::open)
        .transpose()
        .map_err(|e| CliError::new(Exit::Io, format!("initrd: {e}")))?;
    let kernel = LoadableKernel {
        image: image.memfd.as_fd(),
        release: image.info.release.clone(),
        sha256: image.sha256,
        initrd: initrd.as_ref().map(AsFd::as_fd),
        cmdline: &a.cmdline,
    };
    let observer = CliObserver::new(a.json);
    let req = ops::Request {
        kind: UpgradeKind::Apply,
        kernel,
        faults: faults(a.inject)?,
        // Promotion of the candidate and the version floor are journaled steps of the
        // upgrade itself.
        promotion: Some(Promotion {
            slots,
            floor: image
                .manifest
                .as_ref()
                .and_then(|m| m.version_floor.clone()),
        }),
    };
    let (rec, err) = execute(g, platform.as_mut(), req, &observer)?;
    observer.done();
    if rec.outcome != Some(Outcome::Upgraded)
        && let Ok(mut s) = g.state().slots()
    {
        let _ = s.clear(rollback::Slot::Candidate);
    }
    Ok(finish_report(&rec, err.as_ref(), a.json))
}

/// `mk-upgrade rollback`.
pub fn rollback(g: &Global, a: &RollbackArgs) -> Result<ExitCode, CliError> {
    if g.resolved_platform() == crate::app::PlatformChoice::Luo {
        return crate::luo::rollback(g, a);
    }
    let _guard = lock(g)?;
    let checks = preflight(g, false, true);
    if let Some(refusal) = refuse_failed_checks(a.json, &checks) {
        return refusal;
    }
    // Read-only: an upgrade may be writing the slot table (no temporary file removed).
    let slots = rollback::Slots::open_read_only(&g.state_dir);
    // The slots never hand out a kernel below the version floor (refused with the exit code
    // of `apply`'s floor refusal, 6, before anything changed).
    let previous = match slots.read(rollback::Slot::Previous) {
        Ok(p) => p,
        Err(e) => return refuse(a.json, slot_exit(&e), e.to_string(), None),
    };
    let Some((prev, bytes)) = previous else {
        return refuse(
            a.json,
            Exit::NothingToDo,
            "no previous kernel is kept: nothing to roll back to".into(),
            None,
        );
    };
    let memfd = upgrade_agent::handover::sealed_memfd("mk-rollback-kernel", &bytes)
        .map_err(|e| CliError::new(Exit::Io, e.to_string()))?;
    let kernel = LoadableKernel {
        image: memfd.as_fd(),
        release: prev.release.clone(),
        sha256: prev.sha256,
        initrd: None,
        cmdline: "",
    };
    let mut platform = g.open_side_by_side()?;
    let observer = CliObserver::new(a.json);
    let req = ops::Request {
        kind: UpgradeKind::Rollback,
        kernel,
        faults: Faults::NONE,
        promotion: Some(Promotion { slots, floor: None }),
    };
    let (rec, err) = execute(g, platform.as_mut(), req, &observer)?;
    observer.done();
    Ok(finish_report(&rec, err.as_ref(), a.json))
}

/// `mk-upgrade recover` (and mk-agentd at start).
pub fn recover(g: &Global, a: &JsonArgs) -> Result<ExitCode, CliError> {
    if g.resolved_platform() == crate::app::PlatformChoice::Luo {
        {
            let _guard = lock(g)?;
            if let Some(refusal) = journal_gate(g, a.json) {
                return refusal;
            }
        }
        return crate::luo::recover(g, a);
    }
    let _guard = lock(g)?;
    // A damaged (quarantined) journal is reported, never taken for "nothing to recover".
    if let Some(refusal) = journal_gate(g, a.json) {
        return refusal;
    }
    let mut platform = g.open_side_by_side()?;
    let observer = CliObserver::new(a.json);
    let slots = g.state().slots().map_err(|e| CliError::state(&e))?;
    let result = ops::recover(
        &g.state(),
        platform.as_mut(),
        Some(Promotion { slots, floor: None }),
        &observer,
        &SystemEnv::default(),
        upgrade_agent::fault::Faults::NONE,
    );
    observer.done();
    match result {
        Ok(None) => {
            if a.json {
                println!("{}", json!({ "result": "nothing-to-recover" }));
            } else {
                println!("no interrupted upgrade");
            }
            Ok(Exit::Ok.into())
        }
        Ok(Some(rec)) => {
            let failed = rec.outcome == Some(Outcome::Failed);
            if a.json {
                println!("{}", record_json(&rec));
            } else {
                print_record(&rec);
            }
            Ok(if failed { Exit::Platform } else { Exit::Ok }.into())
        }
        Err(e) => Err(op_failure(&e)),
    }
}

/// The documented exit code of a journal failure: damaged (or quarantined) 4, another
/// version's format 6, anything else 3.
fn journal_exit(e: &rollback::JournalError) -> Exit {
    match e {
        rollback::JournalError::Corrupt { .. } => Exit::Corrupt,
        rollback::JournalError::UnsupportedFormat { .. } => Exit::Incompatible,
        rollback::JournalError::Io(_) | rollback::JournalError::Serialize(_) => Exit::Io,
    }
}

/// The documented exit code of a kernel-slot failure: damaged table, floor or image 4, a
/// kernel below the version floor 6 (as `apply`), no such kernel 14, I/O 3.
fn slot_exit(e: &rollback::SlotError) -> Exit {
    use rollback::SlotError as E;
    match e {
        E::Corrupt { .. } | E::ImageCorrupt { .. } | E::ImageMissing { .. } | E::Release(_) => {
            Exit::Corrupt
        }
        E::BelowFloor { .. } => Exit::Incompatible,
        E::Empty { .. } => Exit::NothingToDo,
        E::Io(_) => Exit::Io,
        E::DigestMismatch { .. } | E::TooLarge { .. } => Exit::Internal,
    }
}

/// `op_error`, except that damaged state met by the operation is exit 4 (not 1).
fn op_failure(e: &ops::OpError) -> CliError {
    match e {
        ops::OpError::State(s) if s.is_corrupt_state() => {
            CliError::new(Exit::Corrupt, e.to_string())
        }
        ops::OpError::Upgrade(UpgradeError::Journal(j)) => {
            CliError::new(journal_exit(j), e.to_string())
        }
        ops::OpError::Upgrade(UpgradeError::Slots(s)) if s.is_corrupt() => {
            CliError::new(Exit::Corrupt, e.to_string())
        }
        _ => op_error(e),
    }
}

/// The refusal while the journal is damaged, or a quarantined journal is unresolved
/// (exit 4; 6 for another version's journal); `None` when it is readable.
fn journal_gate(g: &Global, json_out: bool) -> Option<Result<ExitCode, CliError>> {
    let journal = match g.journal() {
        Ok(j) => j,
        Err(e) => return Some(Err(e)),
    };
    let e = journal.current().err()?;
    Some(refuse(json_out, journal_exit(&e), e.to_string(), None))
}

/// `mk-upgrade status`.
pub fn status(g: &Global, a: &JsonArgs) -> Result<ExitCode, CliError> {
    let (caps, instances) = if g.resolved_platform() == crate::app::PlatformChoice::Luo {
        crate::luo::caps_and_instances(g)?
    } else {
        let mut platform = g.open_side_by_side()?;
        let caps = platform
            .probe()
            .map_err(|e| CliError::new(Exit::Platform, e.to_string()))?;
        let instances = platform
            .instances()
            .map_err(|e| CliError::new(Exit::Platform, e.to_string()))?;
        (caps, instances)
    };
    // Damaged state files are reported (and make the exit code), never shown as empty.
    let mut damaged: Vec<(Exit, String)> = Vec::new();
    let journal = g.journal()?;
    let in_flight = match journal.current() {
        Ok(r) => r,
        Err(e) => {
            damaged.push((journal_exit(&e), e.to_string()));
            None
        }
    };
    let journal_ok = damaged.is_empty();
    // Read-only: an upgrade may be writing the slot table (no temporary file removed).
    let slots = rollback::Slots::open_read_only(&g.state_dir);
    let mut slot = |s| match slots.peek(s) {
        Ok(i) => i.map(|i| json!({"release": i.release, "sha256": hex::encode(i.sha256)})),
        Err(e) => {
            let msg = e.to_string();
            // The same table fails for every slot: report it once.
            if !damaged.iter().any(|(_, m)| *m == msg) {
                damaged.push((slot_exit(&e), msg));
            }
            None
        }
    };
    let slot_docs = json!({
        "current": slot(rollback::Slot::Current),
        "previous": slot(rollback::Slot::Previous),
    });
    let floor = match slots.floor() {
        Ok(f) => f,
        Err(e) => {
            damaged.push((slot_exit(&e), e.to_string()));
            None
        }
    };
    let doc = json!({
        "platform": caps.kind,
        "emulated": caps.emulated,
        "notes": caps.notes,
        "spare_cpus": caps.spare_cpus,
        "instances": instances,
        "upgrade_in_flight": in_flight.as_ref().map(record_json),
        // false: the journal is damaged or quarantined, so whether an upgrade is in flight is
        // unknown (see "errors").
        "journal_ok": journal_ok,
        "slots": slot_docs,
        "version_floor": floor,
        "errors": damaged.iter().map(|(_, m)| m).collect::<Vec<_>>(),
    });
    if a.json {
        println!("{doc}");
    } else {
        println!("platform: {}", caps.kind);
        for i in &instances {
            println!(
                "instance {} [{}] kernel {} cpus {:?}",
                i.id,
                i.state,
                i.kernel_release.as_deref().unwrap_or("-"),
                i.resources.cpus
            );
            for w in &i.workloads {
                println!(
                    "  {:<16} {:<10} pid {:<7} restarts {}{}{}",
                    w.name,
                    w.state.as_str(),
                    w.pid,
                    w.restarts,
                    w.exit
                        .as_ref()
                        .map(|e| format!(" (last exit: {e})"))
                        .unwrap_or_default(),
                    w.status_text
                        .as_ref()
                        .map(|t| format!(" status: {t}"))
                        .unwrap_or_default()
                );
            }
        }
        match &in_flight {
            Some(r) => println!(
                "upgrade in flight: {} phase {:?} (run `mk-upgrade recover`)",
                r.upgrade_id, r.phase
            ),
            None if !journal_ok => {
                println!("upgrade in flight: UNKNOWN: the journal is damaged (see below)");
            }
            None => println!("no upgrade in flight"),
        }
        println!(
            "kernel slots: current {} / previous {}",
            doc["slots"]["current"]["release"], doc["slots"]["previous"]["release"]
        );
        for (_, m) in &damaged {
            eprintln!("mk-upgrade: {m}");
        }
    }
    // Damaged state first: it is what the operator must act on.
    let exit = damaged
        .iter()
        .map(|(e, _)| *e)
        .find(|e| *e == Exit::Corrupt)
        .or_else(|| damaged.first().map(|(e, _)| *e))
        .unwrap_or(Exit::Ok);
    Ok(exit.into())
}

/// `mk-upgrade history`.
pub fn history(g: &Global, a: &JsonArgs) -> Result<ExitCode, CliError> {
    let journal = g.journal()?;
    let recs = journal
        .history()
        .map_err(|e| CliError::new(Exit::Corrupt, e.to_string()))?;
    if a.json {
        println!(
            "{}",
            serde_json::Value::Array(recs.iter().map(record_json).collect())
        );
    } else if recs.is_empty() {
        println!("no upgrades yet");
    } else {
        for r in &recs {
            println!(
                "{}  {}  {:<8} {} -> {}  {}",
                rollback::time::fmt_utc(r.started_at),
                r.upgrade_id,
                format!("{:?}", r.kind),
                r.kernel_before,
                r.kernel_after,
                record_json(r)["result"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(Exit::Ok.into())
}
