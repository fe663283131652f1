//! The event log: every journal transition, every workload move and every result of an
//! upgrade, one JSON object per line in `STATE_DIR/events.jsonl` (mode 0600 whatever the
//! umask), rotated by size to `events.jsonl.1` … `.N`. Every line is written at once (a
//! reader, `--follow`, sees it; a crash of the process loses nothing written); the file is
//! fsynced with each `phase` and `result` line, which marks a journaled step or the end, so
//! what a power loss can take is the few `note` and `workload` lines since the last journal
//! write, whose authority is the journal anyway. A sync per line was 8.2 of the 11.3
//! fdatasyncs per workload that an apply made on this log and the journal (measured at 100
//! workloads, docs/performance.md). Unlike the
//! journal's history (the last records only) it keeps what happened in order, across
//! upgrades, for `mk-upgrade events` and for log shippers. Lines produced while a workload
//! is frozen (from its freeze to the end of its move: healthy on the new instance, or thawed
//! on the old one) are kept in memory and written when the move ends, in order and with their
//! own timestamps: an fsync inside the blackout would lengthen it (a crash in that window
//! loses those lines; the journal is the authority). This helps side by side; on a replace
//! platform (luo) a staged workload stays frozen until the kexec, so the lines written after
//! its staging are inside its blackout anyway.
//!
//! A line (`docs/state.md` "events.jsonl"):
//!
//! ```json
//! {"ts":"2026-11-30T16:25:06.123Z","ts_ms":1796055906123,"upgrade_id":"a40e…","kind":"phase",
//!  "phase":"migrating","what":"kv-1: committed on instance 2 (blackout 812 us)"}
//! ```
//!
//! `kind` is `phase` (a journaled step; `phase` set), `note` (an unjournaled step),
//! `workload` (a workload's move status changed; `workload`, `status`, maybe `detail`) or
//! `result` (the upgrade finished; `result`, maybe `detail`). Readers skip lines they cannot
//! parse and lines longer than [`MAX_LINE_BYTES`].

use std::fs;
use std::io::{self, BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file name under the state directory.
pub const EVENTS_FILE: &str = "events.jsonl";
/// The log rotates when it would grow past this size.
pub const ROTATE_BYTES: u64 = 4 << 20;
/// Rotated files kept (`events.jsonl.1` newest … `.3` oldest).
pub const KEEP_ROTATED: usize = 3;
/// Longest line a reader accepts (a line is a few hundred bytes).
pub const MAX_LINE_BYTES: usize = 64 << 10;
/// Most events one read returns (the newest ones).
pub const MAX_READ_EVENTS: usize = 200_000;

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLine {
    /// UTC, RFC 3339 with milliseconds.
    pub ts: String,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub upgrade_id: String,
    /// `phase`, `note`, `workload` or `result`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub what: String,
}

impl EventLine {
    /// An event of `kind` now.
    pub fn now(upgrade_id: &str, kind: &str, what: impl Into<String>) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let ts_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        EventLine {
            ts: rfc3339_ms(ts_ms),
            ts_ms,
            upgrade_id: upgrade_id.to_owned(),
            kind: kind.to_owned(),
            phase: None,
            workload: None,
            status: None,
            result: None,
            what: what.into(),
        }
    }
}

/// Whether appending `e` fsyncs the log: a `phase` line (a journaled step, durable in the
/// journal too) or a `result` (the end of an upgrade); the lines between them become
/// durable with the next one.
pub fn syncs(e: &EventLine) -> bool {
    matches!(e.kind.as_str(), "phase" | "result")
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of Unix milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = rollback::time::fmt_utc(ms / 1000);
    let base = secs.strip_suffix('Z').unwrap_or(&secs);
    format!("{base}.{:03}Z", ms % 1000)
}

/// The log of one state directory.
#[derive(Debug, Clone)]
pub struct EventLog {
    path: PathBuf,
}

impl EventLog {
    /// The log in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        EventLog {
            path: state_dir.join(EVENTS_FILE),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    /// Appends one line (rotating first when the file would pass [`ROTATE_BYTES`]); fsyncs
    /// the file when the line [`is a sync point`](syncs).
    pub fn append(&self, e: &EventLine) -> io::Result<()> {
        let mut line = serde_json::to_vec(e).map_err(io::Error::other)?;
        line.push(b'\n');
        let len = fs::metadata(&self.path).map_or(0, |m| m.len());
        if len > 0 && len + line.len() as u64 > ROTATE_BYTES {
            for n in (1..KEEP_ROTATED).rev() {
                let _ = fs::rename(self.rotated(n), self.rotated(n + 1));
            }
            fs::rename(&self.path, self.rotated(1))?;
        }
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        f.write_all(&line)?;
        if syncs(e) { f.sync_data() } else { Ok(()) }
    }

    /// Appends, logging (not returning) a failure: the event log never fails an upgrade.
    pub fn record(&self, e: &EventLine) {
        if let Err(err) = self.append(e) {
            tracing::warn!(path = %self.path.display(), error = %err, "cannot append to the event log");
        }
    }

    /// Every event at or after `since_ms` (Unix milliseconds), oldest first, across the
    /// rotated files; at most [`MAX_READ_EVENTS`] (the newest).
    pub fn read(&self, since_ms: u64) -> io::Result<Vec<EventLine>> {
        let mut out = Vec::new();
        for n in (1..=KEEP_ROTATED).rev() {
            read_file(&self.rotated(n), since_ms, &mut out)?;
        }
        read_file(&self.path, since_ms, &mut out)?;
        if out.len() > MAX_READ_EVENTS {
            out.drain(..out.len() - MAX_READ_EVENTS);
        }
        Ok(out)
    }
}

/// Reads the events of one file from byte `offset`; returns the offset after the last
/// complete line (for `--follow`).
pub fn read_from(
    path: &Path,
    offset: u64,
    since_ms: u64,
    out: &mut Vec<EventLine>,
) -> io::Result<u64> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len < offset {
        // Rotated under us: start over on the new file.
        return read_from(path, 0, since_ms, out);
    }
    let mut r = io::BufReader::new(f);
    io::Seek::seek(&mut r, io::SeekFrom::Start(offset))?;
    let mut pos = offset;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = io::Read::take(&mut r, MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut buf)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            if n > MAX_LINE_BYTES {
                // An over-long line: skip to its end without keeping it.
                pos += n as u64;
                let m = r.skip_until(b'\n')?;
                pos += m as u64;
                if m == 0 {
                    return Ok(pos);
                }
                continue;
            }
            return Ok(pos);
        }
        pos += n as u64;
        if let Ok(e) = serde_json::from_slice::<EventLine>(&buf)
            && e.ts_ms >= since_ms
        {
            out.push(e);
            if out.len() > MAX_READ_EVENTS {
                out.remove(0);
            }
        }
    }
}

fn read_file(path: &Path, since_ms: u64, out: &mut Vec<EventLine>) -> io::Result<()> {
    read_from(path, 0, since_ms, out).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn lines_append_private_and_read_back_in_order() {
        let d = tempfile::tempdir().unwrap();
        let log = EventLog::new(d.path());
        let mut a = EventLine::now("u1", "phase", "verified");
        a.phase = Some("verified".into());
        log.append(&a).unwrap();
        let b = EventLine::now("u1", "result", "finished");
        log.append(&b).unwrap();
        let mode = fs::metadata(log.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(log.read(0).unwrap(), [a.clone(), b.clone()]);
        assert_eq!(log.read(b.ts_ms + 1).unwrap(), []);
    }

    #[test]
    fn unsynced_lines_are_readable_at_once_and_only_steps_and_results_sync() {
        let d = tempfile::tempdir().unwrap();
        let log = EventLog::new(d.path());
        let note = EventLine::now("u1", "note", "staged");
        let mut moved = EventLine::now("u1", "workload", "");
        moved.workload = Some("kv".into());
        moved.status = Some("committed".into());
        for e in [&note, &moved] {
            assert!(!syncs(e), "{}", e.kind);
            log.append(e).unwrap();
        }
        // Written, not held: a reader (`events --follow`) sees them before the next sync.
        assert_eq!(log.read(0).unwrap(), [note.clone(), moved.clone()]);
        let mut step = EventLine::now("u1", "phase", "migrating");
        step.phase = Some("migrating".into());
        assert!(syncs(&step));
        assert!(syncs(&EventLine::now("u1", "result", "upgraded")));
    }

    #[test]
    fn rotation_keeps_the_newest_files_and_reading_spans_them() {
        let d = tempfile::tempdir().unwrap();
        let log = EventLog::new(d.path());
        let big = "x".repeat(60_000);
        let n = (ROTATE_BYTES as usize / 60_000) * (KEEP_ROTATED + 2);
        for i in 0..n {
            log.append(&EventLine::now(&format!("u{i}"), "note", big.clone()))
                .unwrap();
        }
        assert!(log.rotated(KEEP_ROTATED).exists());
        assert!(!log.rotated(KEEP_ROTATED + 1).exists());
        let all = log.read(0).unwrap();
        assert_eq!(all.last().unwrap().upgrade_id, format!("u{}", n - 1));
        // Oldest first, no duplicates.
        let ids: Vec<usize> = all
            .iter()
            .map(|e| e.upgrade_id[1..].parse().unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    }

    #[test]
    fn garbage_and_over_long_lines_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let log = EventLog::new(d.path());
        let good = EventLine::now("u", "note", "ok");
        let mut text = b"not json\n".to_vec();
        text.extend(vec![b'a'; MAX_LINE_BYTES * 2]);
        text.push(b'\n');
        text.extend(serde_json::to_vec(&good).unwrap());
        text.extend(b"\n{\"truncated");
        fs::write(log.path(), text).unwrap();
        assert_eq!(log.read(0).unwrap(), [good]);
    }

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_796_055_906_123), "2026-11-30T16:25:06.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
