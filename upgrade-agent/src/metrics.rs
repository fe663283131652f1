//! Prometheus metrics in the text exposition format, written after every finished apply,
//! rollback and recovery to `STATE_DIR/metrics/mk-upgrade.prom` (temporary file + rename,
//! so node_exporter's textfile collector never reads half a file; point its
//! `--collector.textfile.directory` at `STATE_DIR/metrics`). Counters survive the journal's
//! bounded history: they are kept in `STATE_DIR/metrics/counters.json`, updated once per
//! finished upgrade (by id).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `mk_upgrade_last_result` | gauge (1) | `kind` (apply, rollback), `result`, `upgrade_id`, `platform` |
//! | `mk_upgrade_last_result_timestamp_seconds` | gauge | |
//! | `mk_upgrade_running_kernel_info` | gauge (1) | `release` |
//! | `mk_upgrade_upgrades_total` | counter | `result` (upgraded, rolled-back, refused, failed) |
//! | `mk_upgrade_rollbacks_total` | counter | `result` (manual rollbacks) |
//! | `mk_upgrade_recoveries_total` | counter | `result` (upgrades finished by recovery) |
//! | `mk_upgrade_workload_blackout_seconds` | histogram | `workload` |
//! | `mk_upgrade_workload_moves_total` | counter | `workload`, `status` (committed, aborted, moved-back, …) |
//!
//! Label values are escaped as the format requires; at most [`MAX_WORKLOADS`] workloads get
//! series (workloads first seen after that are counted in no per-workload series).
//!
//! `STATE_DIR` is private (0700): node_exporter must run as root to read the file there, or
//! the file must be copied or linked where it can read it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::record::{Outcome, UpgradeKind, UpgradeRecord};

/// Directory under the state directory.
pub const METRICS_DIR: &str = "metrics";
/// The file node_exporter reads.
pub const PROM_FILE: &str = "mk-upgrade.prom";
const COUNTERS_FILE: &str = "counters.json";
/// Histogram bucket bounds, seconds.
pub const BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Most workloads with their own series.
pub const MAX_WORKLOADS: usize = 256;
/// Upgrade ids remembered so that one upgrade is counted once.
const REMEMBERED_IDS: usize = 256;

/// One workload's blackout histogram.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Non-cumulative counts per bucket of [`BUCKETS`], then one for +Inf.
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        if self.counts.len() != BUCKETS.len() + 1 {
            self.counts = vec![0; BUCKETS.len() + 1];
        }
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += secs;
        self.count += 1;
    }
}

/// What the metrics file is rendered from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub upgrades: BTreeMap<String, u64>,
    pub rollbacks: BTreeMap<String, u64>,
    pub recoveries: BTreeMap<String, u64>,
    pub blackout: BTreeMap<String, Histogram>,
    pub moves: BTreeMap<String, BTreeMap<String, u64>>,
    /// Ids already counted, newest last.
    pub counted: Vec<String>,
    pub last: Option<Last>,
}

/// The last finished upgrade.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Last {
    pub kind: String,
    pub result: String,
    pub upgrade_id: String,
    pub platform: String,
    pub timestamp: u64,
    pub running_kernel: String,
}

/// The metrics of one state directory.
#[derive(Debug, Clone)]
pub struct Metrics {
    dir: PathBuf,
}

fn kebab<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Escapes a label value (backslash, double quote, newline).
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// The metrics of `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Metrics {
            dir: state_dir.join(METRICS_DIR),
        }
    }

    /// The `.prom` file.
    pub fn prom_path(&self) -> PathBuf {
        self.dir.join(PROM_FILE)
    }

    fn read(&self) -> Counters {
        fs::read(self.dir.join(COUNTERS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Counts a finished record (once per upgrade id) and rewrites the `.prom` file.
    pub fn observe(&self, rec: &UpgradeRecord) -> std::io::Result<()> {
        let mut c = self.read();
        let result = rec.report_json()["result"]
            .as_str()
            .unwrap_or("unknown")
            .to_owned();
        if !c.counted.contains(&rec.upgrade_id) {
            let table = if rec.recovered {
                &mut c.recoveries
            } else if rec.kind == UpgradeKind::Rollback {
                &mut c.rollbacks
            } else {
                &mut c.upgrades
            };
            *table.entry(result.clone()).or_default() += 1;
            for w in &rec.workloads {
                if c.moves.len() >= MAX_WORKLOADS && !c.moves.contains_key(&w.name) {
                    continue;
                }
                if let Some(us) = w.blackout_us {
                    c.blackout
                        .entry(w.name.clone())
                        .or_default()
                        .observe(us as f64 / 1e6);
                }
                *c.moves
                    .entry(w.name.clone())
                    .or_default()
                    .entry(kebab(&w.status))
                    .or_default() += 1;
            }
            c.counted.push(rec.upgrade_id.clone());
            if c.counted.len() > REMEMBERED_IDS {
                c.counted.remove(0);
            }
        }
        let running = match rec.outcome {
            Some(Outcome::Upgraded) => rec.kernel_after.clone(),
            _ => rec.kernel_before.clone(),
        };
        c.last = Some(Last {
            kind: kebab(&rec.kind),
            result,
            upgrade_id: rec.upgrade_id.clone(),
            platform: kebab(&rec.platform),
            timestamp: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            running_kernel: running,
        });
        rollback::ensure_private_dir(&self.dir).map_err(|e| e.source)?;
        let json = serde_json::to_vec_pretty(&c).map_err(std::io::Error::other)?;
        rollback::atomic_write(&self.dir.join(COUNTERS_FILE), &json)
            .map_err(std::io::Error::other)?;
        // Mode 0644: node_exporter may run as another user; the file names no secret.
        rollback::atomic_write_with_mode(&self.prom_path(), render(&c).as_bytes(), 0o644)
            .map_err(std::io::Error::other)
    }

    /// [`Metrics::observe`], logging a failure: metrics never fail an upgrade.
    pub fn record(&self, rec: &UpgradeRecord) {
        if let Err(e) = self.observe(rec) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write the metrics");
        }
    }
}

fn counter(out: &mut String, name: &str, help: &str, table: &BTreeMap<String, u64>) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    for (result, n) in table {
        let _ = writeln!(out, "{name}{{result=\"{}\"}} {n}", escape(result));
    }
}

/// The text exposition of `c`.
pub fn render(c: &Counters) -> String {
    let mut out = String::new();
    if let Some(l) = &c.last {
        let _ = writeln!(
            out,
            "# HELP mk_upgrade_last_result The last finished upgrade, rollback or recovery (1 for its result).\n\
             # TYPE mk_upgrade_last_result gauge\n\
             mk_upgrade_last_result{{kind=\"{}\",result=\"{}\",upgrade_id=\"{}\",platform=\"{}\"}} 1",
            escape(&l.kind),
            escape(&l.result),
            escape(&l.upgrade_id),
            escape(&l.platform)
        );
        let _ = writeln!(
            out,
            "# HELP mk_upgrade_last_result_timestamp_seconds When the last result was written.\n\
             # TYPE mk_upgrade_last_result_timestamp_seconds gauge\n\
             mk_upgrade_last_result_timestamp_seconds {}",
            l.timestamp
        );
        let _ = writeln!(
            out,
            "# HELP mk_upgrade_running_kernel_info The kernel release serving the workloads after the last result.\n\
             # TYPE mk_upgrade_running_kernel_info gauge\n\
             mk_upgrade_running_kernel_info{{release=\"{}\"}} 1",
            escape(&l.running_kernel)
        );
    }
    counter(
        &mut out,
        "mk_upgrade_upgrades_total",
        "Finished upgrades (apply) by result.",
        &c.upgrades,
    );
    counter(
        &mut out,
        "mk_upgrade_rollbacks_total",
        "Finished manual rollbacks by result.",
        &c.rollbacks,
    );
    counter(
        &mut out,
        "mk_upgrade_recoveries_total",
        "Interrupted upgrades finished by recovery, by result.",
        &c.recoveries,
    );
    let _ = writeln!(
        out,
        "# HELP mk_upgrade_workload_blackout_seconds From a workload's freeze to healthy on the new kernel.\n\
         # TYPE mk_upgrade_workload_blackout_seconds histogram"
    );
    for (w, h) in &c.blackout {
        let w = escape(w);
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += h.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "mk_upgrade_workload_blackout_seconds_bucket{{workload=\"{w}\",le=\"{b}\"}} {cum}"
            );
        }
        let _ = writeln!(
            out,
            "mk_upgrade_workload_blackout_seconds_bucket{{workload=\"{w}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(
            out,
            "mk_upgrade_workload_blackout_seconds_sum{{workload=\"{w}\"}} {}",
            h.sum
        );
        let _ = writeln!(
            out,
            "mk_upgrade_workload_blackout_seconds_count{{workload=\"{w}\"}} {}",
            h.count
        );
    }
    let _ = writeln!(
        out,
        "# HELP mk_upgrade_workload_moves_total Workload moves by how they ended (committed, aborted, moved-back, ...).\n\
         # TYPE mk_upgrade_workload_moves_total counter"
    );
    for (w, by) in &c.moves {
        for (status, n) in by {
            let _ = writeln!(
                out,
                "mk_upgrade_workload_moves_total{{workload=\"{}\",status=\"{}\"}} {n}",
                escape(w),
                escape(status)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, kind: &str, outcome: &str, blackout_us: u64) -> UpgradeRecord {
        serde_json::from_value(serde_json::json!({
            "upgrade_id": id, "kind": kind, "platform": "emulated",
            "started_at": 0, "kernel_before": "A", "kernel_after": "B",
            "image_sha256": "", "old_instance": 1,
            "old_resources": {"cpus": [0], "memory_bytes": 0},
            "new_instance": 2, "phase": "done",
            "workloads": [{"name": "kv\"1", "status": "committed", "blackout_us": blackout_us, "detail": null}],
            "events": [], "outcome": outcome, "error": null
        }))
        .unwrap()
    }

    #[test]
    fn counts_once_per_upgrade_and_renders_the_exposition_format() {
        let d = tempfile::tempdir().unwrap();
        let m = Metrics::new(d.path());
        m.observe(&rec("u1", "apply", "upgraded", 1500)).unwrap();
        m.observe(&rec("u1", "apply", "upgraded", 1500)).unwrap();
        m.observe(&rec("u2", "apply", "rolled-back", 40_000_000))
            .unwrap();
        m.observe(&rec("u3", "rollback", "upgraded", 700)).unwrap();
        let text = fs::read_to_string(m.prom_path()).unwrap();
        assert!(
            text.contains("mk_upgrade_upgrades_total{result=\"upgraded\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("mk_upgrade_upgrades_total{result=\"rolled-back\"} 1\n"));
        assert!(text.contains("mk_upgrade_rollbacks_total{result=\"upgraded\"} 1\n"));
        assert!(text.contains("mk_upgrade_running_kernel_info{release=\"B\"} 1\n"));
        // The label value is escaped; buckets are cumulative; 40 s lands in +Inf only.
        assert!(text.contains(
            "mk_upgrade_workload_blackout_seconds_bucket{workload=\"kv\\\"1\",le=\"0.002\"} 2\n"
        ));
        assert!(text.contains(
            "mk_upgrade_workload_blackout_seconds_bucket{workload=\"kv\\\"1\",le=\"0.001\"} 1\n"
        ));
        assert!(text.contains(
            "mk_upgrade_workload_blackout_seconds_bucket{workload=\"kv\\\"1\",le=\"30\"} 2\n"
        ));
        assert!(text.contains(
            "mk_upgrade_workload_blackout_seconds_bucket{workload=\"kv\\\"1\",le=\"+Inf\"} 3\n"
        ));
        assert!(
            text.contains("mk_upgrade_workload_blackout_seconds_count{workload=\"kv\\\"1\"} 3\n")
        );
        // Every sample line is NAME{labels} VALUE or NAME VALUE; every metric has a TYPE.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = l.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{l}");
            let base = name.split('{').next().unwrap();
            let family = base
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} has a TYPE line"
            );
        }
    }
}
