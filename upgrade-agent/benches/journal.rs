//! Journal benchmark (a bench binary, not a timed test): what one journaled step costs as the
//! upgrade record grows, with the journal's log (`journal.log`: each step appends what it
//! changed) against the baseline measured in the same run, the same steps written whole
//! (`journal.json` rewritten and fsynced at every step, which is what the journal did before
//! it had a log).
//!
//! `cargo bench -p upgrade-agent --bench journal`. Environment: `MK_BENCH_JOURNAL` (workload
//! counts, default `10,100,500,2000`). Each count replays a whole apply's journal writes: for
//! every workload in turn, the three steps of its move (freezing, committing, committed), each
//! with its event, as the orchestrator writes them. The state directory is a temporary
//! directory under `TMPDIR` (this machine: the root file system, ext4 on a virtio disk);
//! `fdatasync`/`fsync` costs are that device's. Prints a Markdown table (copied into
//! docs/performance.md) and writes `target/bench/journal.json`.

use std::time::Instant;

use rollback::{Journal, Record};
use serde::{Deserialize, Serialize};
use upgrade_agent::model::{PlatformKind, Resources};
use upgrade_agent::record::{Event, MoveStatus, Phase, UpgradeKind, UpgradeRecord, WorkloadMove};
use upgrade_agent::workload::Mode;

/// The same record, always written whole: the baseline.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
struct Whole(UpgradeRecord);

impl Record for Whole {
    type Delta = ();
    fn delta_from(&self, _prev: &Self) -> Option<()> {
        None
    }
    fn apply(&mut self, _delta: ()) -> Result<(), String> {
        Err("written whole".into())
    }
}

fn record(n: usize) -> UpgradeRecord {
    UpgradeRecord {
        upgrade_id: "5f".repeat(16),
        kind: UpgradeKind::Apply,
        platform: PlatformKind::Emulated,
        started_at: 1_796_000_000,
        kernel_before: "7.2.13-mkA".into(),
        kernel_after: "7.2.14-mkB".into(),
        image_sha256: "c3".repeat(32),
        old_instance: 1,
        old_resources: Resources {
            cpus: vec![0, 1],
            memory_bytes: 1 << 30,
        },
        new_instance: Some(2),
        phase: Phase::Migrating,
        workloads: (0..n)
            .map(|i| WorkloadMove::pending(format!("kv-{i:04}"), Mode::Handover))
            .collect(),
        events: Vec::new(),
        outcome: None,
        error: None,
        recovered: false,
        version_floor: None,
        boot_id: None,
    }
}

/// The three journaled steps of moving workload `i`, as the orchestrator makes them.
fn step(r: &mut UpgradeRecord, i: usize, k: usize) {
    let name = r.workloads[i].name.clone();
    let (status, what) = match k {
        0 => (
            MoveStatus::Freezing,
            format!("freeze {name} on instance 1 (handover)"),
        ),
        1 => (
            MoveStatus::Committing,
            format!("commit {name} on instance 2"),
        ),
        _ => (
            MoveStatus::Committed,
            format!("{name} healthy on instance 2"),
        ),
    };
    let w = &mut r.workloads[i];
    w.status = status;
    if k == 2 {
        w.blackout_us = Some(1234);
        w.handover_us = Some(456);
        w.detail = Some("moved with 1 fd (1 MiB, identity)".into());
    }
    let t_ms = r.events.len() as u64 * 3;
    r.events.push(Event {
        t_ms,
        what,
        journaled: Some(Phase::Migrating),
    });
}

struct Run {
    per_step_us: Vec<f64>,
    total_ms: f64,
    disk_bytes: u64,
}

/// Replays an apply of `n` workloads into a fresh journal of `R`; `wrap` makes an `R`.
fn run<R: Record>(n: usize, wrap: impl Fn(&UpgradeRecord) -> R) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut j = Journal::<R>::open(dir.path()).expect("open");
    let mut r = record(n);
    j.write(&wrap(&r)).expect("first write");
    let mut per_step_us = Vec::with_capacity(3 * n);
    let start = Instant::now();
    for i in 0..n {
        for k in 0..3 {
            step(&mut r, i, k);
            // The copy `wrap` makes is not the journal's cost: made before the clock starts.
            let w = wrap(&r);
            let t = Instant::now();
            j.write(&w).expect("write");
            per_step_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let total_ms = start.elapsed().as_secs_f64() * 1e3;
    let disk_bytes = ["journal.json", "journal.log"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.path().join(f)).ok())
        .map(|m| m.len())
        .sum();
    Run {
        per_step_us,
        total_ms,
        disk_bytes,
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(run: &Run) -> serde_json::Value {
    let mut s = run.per_step_us.clone();
    s.sort_by(f64::total_cmp);
    let mean = s.iter().sum::<f64>() / s.len() as f64;
    serde_json::json!({
        "steps": s.len(),
        "step_us": {"mean": mean, "p50": pct(&s, 0.5), "p99": pct(&s, 0.99), "max": s[s.len() - 1]},
        "total_ms": run.total_ms,
        "bytes_on_disk_at_end": run.disk_bytes,
    })
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it small.
    let quick = !std::env::args().any(|a| a == "--bench");
    let counts: Vec<usize> = if quick {
        vec![3]
    } else {
        std::env::var("MK_BENCH_JOURNAL")
            .unwrap_or_else(|_| "10,100,500,2000".into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    };
    println!("# journal: one journaled step (3 per workload move), log vs whole record");
    println!();
    println!(
        "| workloads | steps | log: mean / p50 / p99 µs | whole: mean / p50 / p99 µs | whole / log (mean) | on disk at the end: log / whole |"
    );
    println!("|---|---|---|---|---|---|");
    let mut report = Vec::new();
    for n in counts {
        // Interleaved, baseline first: both see the same state of the machine.
        let whole = summary(&run(n, |r| Whole(r.clone())));
        let log = summary(&run(n, UpgradeRecord::clone));
        let f = |v: &serde_json::Value, k: &str| v["step_us"][k].as_f64().unwrap_or(0.0);
        println!(
            "| {n} | {} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {:.2}x | {} / {} bytes |",
            log["steps"],
            f(&log, "mean"),
            f(&log, "p50"),
            f(&log, "p99"),
            f(&whole, "mean"),
            f(&whole, "p50"),
            f(&whole, "p99"),
            f(&whole, "mean") / f(&log, "mean"),
            log["bytes_on_disk_at_end"],
            whole["bytes_on_disk_at_end"],
        );
        report.push(serde_json::json!({"workloads": n, "log": log, "whole": whole}));
    }
    if !quick {
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
        if std::fs::create_dir_all(&out).is_ok() {
            let path = out.join("journal.json");
            let doc = serde_json::json!({"tmpdir": std::env::temp_dir(), "counts": report});
            match std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap_or_default()) {
                Ok(()) => println!("\nreport: {}", path.display()),
                Err(e) => println!("\ncannot write {}: {e}", path.display()),
            }
        }
    }
}
