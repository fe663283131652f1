//! `mk-upgrade demo`: the main job on a built-in default.
//!
//! On an EMULATED multikernel machine in a fresh temporary state directory: boot instance 1
//! with kernel A, start three `mk-demo-kv` workloads, put them under load, sign kernel B
//! with a fresh release key, and apply it, moving every workload instance by instance.
//! Then stop the load, read back every acknowledged write, and report.
//!
//! `--inject` forces one failure path; the demo then passes when the upgrade ends the way
//! that fault demands (refused or rolled back) with nothing lost.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kho_proto::keys::NodeKey;
use mk_demo_kv::loadgen::{LoadGen, LoadOptions, LoadReport};
use serde_json::json;

use crate::app::{CliError, Global, PlatformChoice};
use crate::upgrade::{CliObserver, execute, record_json};
use upgrade_agent::exit::Exit;
use upgrade_agent::fault::Faults;
use upgrade_agent::orchestrator::{self, Observer, SystemEnv, ops};
use upgrade_agent::platform::LoadableKernel;
use upgrade_agent::record::{MoveStatus, Outcome, UpgradeKind, UpgradeRecord};
use upgrade_agent::workload::{
    HealthCheck, ListenSpec, MemfdSpec, StopSignal, WorkloadFile, WorkloadSpec,
};

/// A failure path to force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoFault {
    /// A handover region is corrupted: the new instance's CRC check refuses it, rollback.
    CorruptRegion,
    /// The first moved workload fails its health check on the new instance, rollback.
    HealthFail,
    /// The image is signed by a key that is not trusted: refused before anything changes.
    BadSignature,
    /// The agent is killed (SIGKILL) mid-migration; recovery rolls everything back.
    CrashAgent,
}

/// `mk-upgrade demo` arguments.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Print one JSON document at the end.
    #[arg(long)]
    pub json: bool,
    /// Force a failure path.
    #[arg(long, value_enum)]
    pub inject: Option<DemoFault>,
    /// The kernel to upgrade to (default: a minimal bzImage header file, release 7.2.13-mkB).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// The kernel the machine starts on (default: a minimal bzImage header file).
    #[arg(long)]
    pub from_kernel: Option<PathBuf>,
    /// Number of demo workloads.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub count: u16,
    /// MiB of data each workload holds before the upgrade.
    #[arg(long, default_value_t = 4)]
    pub state_mib: u32,
    /// Keep the temporary state directory (and print its path).
    #[arg(long)]
    pub keep: bool,
}

/// `n` distinct free loopback ports (all held until every one is chosen, so the kernel
/// cannot hand out the same port twice).
fn free_ports(n: usize) -> Result<Vec<SocketAddr>, CliError> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CliError::new(Exit::Io, format!("finding free ports: {e}")))?;
    held.iter()
        .map(TcpListener::local_addr)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CliError::new(Exit::Io, e.to_string()))
}

fn sibling(name: &str) -> Result<PathBuf, CliError> {
    let exe = std::env::current_exe().map_err(|e| CliError::new(Exit::Io, e.to_string()))?;
    // Beside the executable, or one level up for test binaries in target/*/deps.
    let dir = exe.parent();
    for d in [dir, dir.and_then(Path::parent)].into_iter().flatten() {
        if d.join(name).is_file() {
            return Ok(d.join(name));
        }
    }
    Err(CliError::new(
        Exit::Io,
        format!("cannot find {name} beside {}", exe.display()),
    ))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    std::fs::write(path, bytes)
        .map_err(|e| CliError::new(Exit::Io, format!("{}: {e}", path.display())))
}

fn kernel_file(
    dir: &Path,
    given: Option<&PathBuf>,
    default_release: &str,
    notes: &mut Vec<String>,
) -> Result<(PathBuf, String), CliError> {
    if let Some(p) = given {
        let bytes = std::fs::read(p)
            .map_err(|e| CliError::new(Exit::Io, format!("{}: {e}", p.display())))?;
        let info = upgrade_agent::verify::bzimage::parse(&bytes)
            .map_err(|e| CliError::new(Exit::NotAKernel, format!("{}: {e}", p.display())))?;
        let copy = dir.join(format!("bzImage-{}", info.release));
        write_file(&copy, &bytes)?;
        return Ok((copy, info.release));
    }
    let path = dir.join(format!("bzImage-{default_release}"));
    write_file(
        &path,
        &upgrade_agent::verify::bzimage::minimal_bzimage(default_release),
    )?;
    notes.push(format!(
        "no kernel given for {default_release}: wrote a minimal valid bzImage header file ({}), \
         not bootable; the emulated platform only reads its header",
        path.display()
    ));
    Ok((path, default_release.to_owned()))
}

/// Everything the demo reports.
struct DemoRun {
    record: Option<UpgradeRecord>,
    refused: Option<String>,
    load: LoadReport,
}

/// Runs the demo.
pub fn run(_g: &Global, a: DemoArgs) -> Result<ExitCode, CliError> {
    // bad-signature is an operator's mistake any build refuses; the others are test-only
    // faults, refused up front by a build without them (before anything is set up).
    if a.inject.is_some_and(|f| f != DemoFault::BadSignature) && !upgrade_agent::fault::ENABLED {
        return Err(CliError::new(
            Exit::Usage,
            "--inject corrupt-region|health-fail|crash-agent needs a build with fault \
             injection (cargo build --features upgrade-agent/fault-injection); release \
             builds never carry it",
        ));
    }
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("mk-upgrade-demo.")
        .tempdir()
        .map_err(|e| CliError::new(Exit::Io, format!("creating a temporary directory: {e}")))?;
    let root = tmp.path().to_owned();
    let mut notes = vec![
        "platform: EMULATED multikernel (instances are supervisor processes pinned to their cpus; no kernel boots)".to_owned(),
    ];
    let (kernel_b, release_b) = kernel_file(&root, a.kernel.as_ref(), "7.2.13-mkB", &mut notes)?;
    let default_a = if a.kernel.is_some() {
        let r = rollback::Release::parse(&release_b)
            .map_err(|e| CliError::new(Exit::NotAKernel, e.to_string()))?;
        let (x, y, z) = r.numeric();
        format!("{x}.{y}.{z}-demo-old")
    } else {
        "7.2.13-mkA".to_owned()
    };
    let (kernel_a, _release_a) =
        kernel_file(&root, a.from_kernel.as_ref(), &default_a, &mut notes)?;

    // Release key, trusted by the host; and the signature of B.
    let g = Global {
        state_dir: root.join("state"),
        platform: PlatformChoice::Emulated,
        workloads: Some(root.join("workloads.toml")),
        trusted_keys: Some(root.join("trusted-keys")),
    };
    std::fs::create_dir_all(root.join("trusted-keys"))
        .map_err(|e| CliError::new(Exit::Io, e.to_string()))?;
    let release_key =
        NodeKey::generate().map_err(|e| CliError::new(Exit::Internal, e.to_string()))?;
    release_key
        .save(&root.join("trusted-keys"), "release")
        .map_err(|e| CliError::new(Exit::Io, e.to_string()))?;
    let signer = if a.inject == Some(DemoFault::BadSignature) {
        notes.push("inject bad-signature: kernel B is signed by a key that is not trusted".into());
        NodeKey::generate().map_err(|e| CliError::new(Exit::Internal, e.to_string()))?
    } else {
        release_key
    };
    let b_bytes = std::fs::read(&kernel_b).map_err(|e| CliError::new(Exit::Io, e.to_string()))?;
    let sig =
        upgrade_agent::verify::sign_image(&b_bytes, &signer, None, rollback::time::now_unix())
            .map_err(|e| CliError::new(Exit::NotAKernel, e.to_string()))?;
    write_file(
        &upgrade_agent::verify::default_sig_path(&kernel_b),
        &sig.to_json(),
    )?;

    // Workloads.
    let kv = sibling("mk-demo-kv")?;
    let mut specs = Vec::new();
    let mut targets = Vec::new();
    for (i, addr) in (1..=a.count).zip(free_ports(usize::from(a.count))?) {
        let name = format!("kv-{i}");
        specs.push(WorkloadSpec {
            args: vec![
                "--capacity".into(),
                format!("{}MiB", a.state_mib + 8),
                "--preload-mib".into(),
                a.state_mib.to_string(),
            ],
            memfds: vec![MemfdSpec {
                name: "kv-data".into(),
                size: 0,
            }],
            listeners: vec![ListenSpec {
                name: "listen".into(),
                addr,
            }],
            health: HealthCheck::Http {
                addr,
                path: "/health".into(),
                expect_status: 200,
                timeout_ms: 3000,
            },
            // mk-demo-kv hands its established connections to the next copy on SIGUSR2
            // (mk_demo_kv::handoff): no request is in flight on a connection that dies.
            handoff_signal: Some(StopSignal(libc::SIGUSR2)),
            // The new copy starts before the freeze and waits for its descriptors.
            standby: true,
            ..WorkloadSpec::new(name.clone(), kv.clone())
        });
        targets.push((name, addr));
    }
    let file = WorkloadFile { workloads: specs };
    let text = toml::to_string(&file).map_err(|e| CliError::new(Exit::Internal, e.to_string()))?;
    write_file(&root.join("workloads.toml"), text.as_bytes())?;

    let observer = CliObserver::new(a.json);
    let result = (|| -> Result<(serde_json::Value, DemoRun), CliError> {
        let init = crate::emu::init(&g, &kernel_a, &[])?;
        // Wait until every workload answers, then put them under load.
        for (_, addr) in &targets {
            let h = upgrade_agent::health::run(&HealthCheck::Http {
                addr: *addr,
                path: "/health".into(),
                expect_status: 200,
                timeout_ms: 10_000,
            });
            if !h.healthy {
                return Err(CliError::new(
                    Exit::Internal,
                    format!("demo workload at {addr} did not start: {}", h.detail),
                ));
            }
        }
        let load = LoadGen::start(
            targets.clone(),
            LoadOptions {
                connections_per_target: 2,
                max_duration: Duration::from_secs(300),
                ..LoadOptions::default()
            },
        )
        .map_err(|e| CliError::new(Exit::Internal, e.to_string()))?;
        std::thread::sleep(Duration::from_millis(300));
        let (record, refused) = upgrade(&g, &kernel_b, a.inject, &observer)?;
        std::thread::sleep(Duration::from_millis(300));
        Ok((
            init,
            DemoRun {
                record,
                refused,
                load: load.stop(),
            },
        ))
    })();
    observer.done();
    // Tear the emulated machine down whatever happened.
    if !a.keep
        && let Ok(mut p) = g.open_emulated()
    {
        let _ = crate::emu::down(&mut p);
    }
    let (init, out) = result?;
    Ok(report(&a, &notes, &init, &out, started, &root, tmp))
}

/// Applies kernel B as the fault demands; returns the finished record or the refusal.
fn upgrade(
    g: &Global,
    kernel_b: &Path,
    inject: Option<DemoFault>,
    observer: &CliObserver,
) -> Result<(Option<UpgradeRecord>, Option<String>), CliError> {
    if inject == Some(DemoFault::CrashAgent) {
        return crash_and_recover(g, kernel_b, observer);
    }
    let mut platform = g.open_emulated()?;
    let current =
        orchestrator::current_instance(&mut platform).map_err(|e| CliError::upgrade(&e))?;
    let policy = upgrade_agent::verify::VerifyPolicy {
        trusted_keys_dir: g.trusted_keys_dir(),
        allow_unsigned_insecure: false,
        running_release: current.kernel_release.clone().unwrap_or_default(),
        floor: None,
        allow_downgrade: false,
    };
    let image = match upgrade_agent::verify::verify_kernel_image(kernel_b, None, &policy) {
        Ok(i) => i,
        Err(e) => return Ok((None, Some(e.to_string()))),
    };
    let kernel = LoadableKernel {
        image: image.memfd.as_fd(),
        release: image.info.release.clone(),
        sha256: image.sha256,
        initrd: None,
        cmdline: "",
    };
    let faults = Faults {
        corrupt_region: inject == Some(DemoFault::CorruptRegion),
        health_fail: inject == Some(DemoFault::HealthFail),
        crash_after_write: None,
    };
    let req = ops::Request {
        kind: UpgradeKind::Apply,
        kernel,
        faults,
        promotion: None,
    };
    let (rec, _err) = execute(g, &mut platform, req, observer)?;
    Ok((Some(rec), None))
}

/// Runs `mk-upgrade apply` as a child that is killed (SIGKILL) mid-migration, then runs
/// start-up recovery as mk-agentd would.
fn crash_and_recover(
    g: &Global,
    kernel_b: &Path,
    observer: &CliObserver,
) -> Result<(Option<UpgradeRecord>, Option<String>), CliError> {
    let exe = std::env::current_exe().map_err(|e| CliError::new(Exit::Io, e.to_string()))?;
    // Journal writes: 1 verified, 2 created, 3 loaded, 4 booted, then three per workload
    // (freeze, commit, committed): after write 9 the first workload has moved and the
    // second is frozen, verified and running uncommitted on the new instance.
    let status = std::process::Command::new(exe)
        .arg("--state-dir")
        .arg(&g.state_dir)
        .arg("--platform")
        .arg("emulated")
        .arg("--workloads")
        .arg(g.workloads_path())
        .arg("--trusted-keys")
        .arg(g.trusted_keys_dir())
        .arg("apply")
        .arg("--kernel")
        .arg(kernel_b)
        .arg("--json")
        .env(upgrade_agent::fault::CRASH_AFTER_WRITE_ENV, "9")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| CliError::new(Exit::Io, e.to_string()))?;
    use std::os::unix::process::ExitStatusExt;
    if status.signal() != Some(libc::SIGKILL) {
        return Err(CliError::new(
            Exit::Internal,
            format!("the apply child was expected to die by SIGKILL, it ended with {status}"),
        ));
    }
    observer.step(
        upgrade_agent::record::Phase::Migrating,
        "agent killed (SIGKILL) mid-migration; running start-up recovery",
    );
    let mut platform = g.open_emulated()?;
    let rec = ops::recover(
        &g.state(),
        &mut platform,
        None,
        observer,
        &SystemEnv::default(),
        upgrade_agent::fault::Faults::NONE,
    )
    .map_err(|e| crate::app::op_error(&e))?;
    Ok((rec, None))
}

fn report(
    a: &DemoArgs,
    notes: &[String],
    init: &serde_json::Value,
    out: &DemoRun,
    started: Instant,
    root: &Path,
    tmp: tempfile::TempDir,
) -> ExitCode {
    let result = match (&out.record, &out.refused) {
        (_, Some(_)) => "refused",
        (Some(r), None) => match r.outcome {
            Some(Outcome::Upgraded) => "upgraded",
            Some(Outcome::RolledBack) => "rolled-back",
            Some(Outcome::Refused) => "refused",
            _ => "failed",
        },
        (None, None) => "failed",
    };
    let expected = match a.inject {
        None => "upgraded",
        Some(DemoFault::BadSignature) => "refused",
        Some(_) => "rolled-back",
    };
    let totals = &out.load.totals;
    let all_moved = out.record.as_ref().is_some_and(|r| {
        r.workloads
            .iter()
            .all(|w| w.status == MoveStatus::Committed)
    });
    let none_moved = out.record.as_ref().is_none_or(|r| {
        r.workloads
            .iter()
            .all(|w| w.status != MoveStatus::Committed)
    });
    let moved_ok = if expected == "upgraded" {
        all_moved
    } else {
        none_moved
    };
    // Every request answered: established connections are handed to the copy that goes on
    // serving (the new one, or the old one after a rollback), each at a request boundary.
    let passed =
        result == expected && moved_ok && out.load.lossless() && totals.failed_requests == 0;
    let rec_json = out.record.as_ref().map(record_json);
    let kernel_before = init["kernel_release"].clone();
    let kernel_after = match result {
        "upgraded" => rec_json
            .as_ref()
            .map_or(json!(null), |r| r["kernel_after"].clone()),
        _ => kernel_before.clone(),
    };
    let workloads: Vec<serde_json::Value> = out.record.as_ref().map_or_else(Vec::new, |r| {
        r.workloads
            .iter()
            .map(|w| {
                json!({
                    "name": w.name,
                    "moved": w.status == MoveStatus::Committed,
                    "status": w.status,
                    "blackout_ms": w.blackout_us.map(|u| u as f64 / 1000.0),
                    "connections": w.connections,
                    "detail": w.detail,
                })
            })
            .collect()
    });
    let kept = if a.keep {
        let p = tmp.keep();
        Some(p)
    } else {
        drop(tmp);
        None
    };
    let doc = json!({
        "result": result,
        "expected": expected,
        "passed": passed,
        "inject": a.inject.map(|f| format!("{f:?}")),
        "emulated": true,
        "notes": notes,
        "kernel_before": kernel_before,
        "kernel_after": kernel_after,
        "workloads": workloads,
        "failed_requests": totals.failed_requests,
        "lost_writes": totals.lost_writes,
        "acked_writes": totals.acked_writes,
        "requests": totals.requests,
        "longest_stall_ms": totals.longest_stall_ms,
        "refused": out.refused,
        "upgrade": rec_json,
        "load": out.load,
        "elapsed_ms": started.elapsed().as_millis() as u64,
        "state_dir": kept.as_ref().map(|_| root.display().to_string()),
    });
    if a.json {
        println!("{doc}");
    } else {
        for n in notes {
            println!("note: {n}");
        }
        if let Some(r) = &out.record {
            println!("timeline:");
            for e in &r.events {
                println!("  {:>7} ms  {}", e.t_ms, e.what);
            }
            crate::upgrade::print_record(r);
        }
        if let Some(reason) = &out.refused {
            println!("refused: {reason}");
        }
        println!(
            "load: {} requests, {} acknowledged writes, {} failed requests, {} lost writes, longest stall {} ms",
            totals.requests,
            totals.acked_writes,
            totals.failed_requests,
            totals.lost_writes,
            totals.longest_stall_ms
        );
        if let Some(p) = &kept {
            println!("state kept in {}", p.display());
        }
        println!(
            "demo {}: result {result}, expected {expected}",
            if passed { "PASSED" } else { "FAILED" }
        );
    }
    if passed { Exit::Ok } else { Exit::Internal }.into()
}
