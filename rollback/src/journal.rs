//! The upgrade journal: the in-flight upgrade record plus a bounded history.
//!
//! Layout under the state directory:
//! * `journal.json` — the in-flight record, present only while an upgrade is unfinished;
//! * `journal.json.corrupt-TIME` — a damaged in-flight record, quarantined (never deleted);
//!   while one exists (and is not renamed to `….resolved`), the journal refuses to report
//!   "no upgrade in flight" and refuses every write;
//! * `journal.log` — the steps written since `journal.json` (one sealed JSON line each, what
//!   changed: [`Record::delta_from`]); present only beside `journal.json`;
//! * `history/SEQ.json` — one file per finished upgrade (`SEQ` zero-padded to 20 digits), the
//!   newest [`HISTORY_LIMIT`] kept.
//!
//! The in-flight record is `journal.json` with the frames of `journal.log` applied in order.
//! A step appends one frame and fdatasyncs it: its cost does not grow with the record (a
//! record lists every workload and every event so far). Once the log would outgrow both
//! [`LOG_FLOOR`] bytes and `journal.json`, the step writes the whole record instead (a new
//! `journal.json`, the log removed): amortized, a step writes O(its own change). A frame a
//! crash cut short (a last line without its newline, or with a NUL in it) was never
//! acknowledged and is ignored
//! (and cut off by the next [`Journal::open`]); a whole line that fails its checksum is
//! damage, and quarantines the journal like a damaged `journal.json`.
//!
//! Each file is a sealed envelope (see `crate::seal`): `{"format", "seq", "written_at",
//! "body", "crc32"}` where `body` is the caller's record and `crc32` covers every byte of the
//! file before it, so a torn or garbled file — including one flipped bit of `seq` — is
//! reported as [`JournalError::Corrupt`] instead of being trusted. `seq` increases with every
//! write across both places, which is what recovery uses to tell a finished upgrade from an
//! unfinished one (see [`Journal::open`]). Files of the previous format
//! ([`JOURNAL_FORMAT_V1`], whose checksum covered only the body) are still read.

use std::fs;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::atomic::{
    FILE_MODE, StateFile, atomic_write, ensure_dir, fsync_dir, read_state, remove_stale_temps,
};
use crate::seal::{self, Read, Refusal};
use crate::{IoError, time};

/// Format tag of history files, and of in-flight records of earlier versions (sealed: the
/// checksum covers the whole file): a whole record.
pub const JOURNAL_FORMAT: &str = "mk-upgrade-journal/2";
/// Format tag of the in-flight record (`journal.json`) this version writes: as
/// [`JOURNAL_FORMAT`], and the steps after it may be in `journal.log`. A version that does
/// not know the log refuses it ("written by another mk-upgrade version") rather than take
/// the record without its last steps.
pub const IN_FLIGHT_FORMAT: &str = "mk-upgrade-journal/3";
/// The previous format (the checksum covers only `body`); still read, never written.
pub const JOURNAL_FORMAT_V1: &str = "mk-upgrade-journal/1";
/// How many finished upgrades the history keeps.
pub const HISTORY_LIMIT: usize = 100;
/// Suffix that marks a quarantined journal as resolved by the operator (it then no longer
/// blocks upgrades, and is kept for the record).
pub const RESOLVED_SUFFIX: &str = ".resolved";
/// Largest journal or history file read (a record is a few KiB; more is corruption).
const MAX_FILE: u64 = 4 << 20;
/// Format tag of each `journal.log` frame.
pub const LOG_FORMAT: &str = "mk-upgrade-journal-log/1";
/// The log is folded into `journal.json` (a whole write) once it would grow past both this
/// many bytes and the size of `journal.json`: the log never exceeds `max(LOG_FLOOR, size of
/// journal.json)`, itself at most the 4 MiB read limit.
pub const LOG_FLOOR: u64 = 64 << 10;
const CURRENT: &str = "journal.json";
const LOG: &str = "journal.log";
/// Suffix of a quarantined log, beside its quarantined `journal.json`.
const LOG_SUFFIX: &str = ".log";
const QUARANTINE_PREFIX: &str = "journal.json.corrupt-";
const HISTORY: &str = "history";

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Io(#[from] IoError),
    /// A damaged journal file. For the in-flight record, `quarantined` lists where the
    /// damaged file(s) were moved (kept, never deleted); until the operator resolves them
    /// the journal refuses to report "no upgrade in flight" and refuses writes.
    #[error("{}", corrupt_message(.path, .reason, .quarantined))]
    Corrupt {
        path: PathBuf,
        name: String,
        reason: String,
        quarantined: Vec<PathBuf>,
    },
    #[error(
        "{path}: journal format {found:?} is neither {IN_FLIGHT_FORMAT:?} nor {JOURNAL_FORMAT:?}: \
         it was written by another \
         mk-upgrade version; finish or recover with that version, or move the file aside"
    )]
    UnsupportedFormat { path: PathBuf, found: String },
    #[error("cannot serialize the journal record: {0}")]
    Serialize(#[source] serde_json::Error),
}

impl JournalError {
    /// Whether this is damaged state ([`JournalError::Corrupt`]), as opposed to an I/O
    /// failure or a file of another version.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, JournalError::Corrupt { .. })
    }
}

fn corrupt_message(path: &Path, reason: &str, quarantined: &[PathBuf]) -> String {
    let is_current = path.file_name().is_some_and(|n| n == CURRENT);
    let unfinished = "It may describe an upgrade that did not finish (a workload may still be \
                      frozen, or running in two instances): upgrades and recovery are refused \
                      until you resolve it.";
    let settle = "compare it with what runs (`mk-upgrade status`, `uname -r`) and finish or undo \
                  that upgrade by hand (thaw frozen workloads, stop duplicate copies)";
    match quarantined {
        [] if is_current => {
            let log = path.with_file_name(LOG);
            let steps = steps_in(&log);
            let move_log = if log.exists() {
                format!(
                    " and `mv {l} {p}{RESOLVED_SUFFIX}{LOG_SUFFIX}`",
                    l = log.display(),
                    p = path.display()
                )
            } else {
                String::new()
            };
            format!(
                "the upgrade journal {p} is damaged ({reason}); it is kept as is. {unfinished} \
                 Inspect it: `jq . {p}` (the record is its \"body\"; `cat -v {p}` if jq cannot \
                 parse it){steps}. Resolve: {settle}, then move it aside: \
                 `mv {p} {p}{RESOLVED_SUFFIX}`{move_log}",
                p = path.display()
            )
        }
        [] => format!(
            "the upgrade history entry {p} is damaged ({reason}); it is kept as is. Inspect it: \
             `jq . {p}` (`cat -v {p}` if jq cannot parse it); to list the history without it, \
             move it out of {dir}",
            p = path.display(),
            dir = path.parent().unwrap_or(Path::new(".")).display()
        ),
        [q, rest @ ..] => {
            let more = if rest.is_empty() {
                String::new()
            } else {
                format!(
                    " (and earlier: {}; resolve each)",
                    rest.iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let steps = steps_in(&with_suffix(q, LOG_SUFFIX));
            format!(
                "the upgrade journal {p} is damaged ({reason}) and was quarantined, not deleted: \
                 {q}{more}. {unfinished} Inspect it: `jq . {q}` (the record is its \"body\"; \
                 `cat -v {q}` if jq cannot parse it){steps}. Resolve: {settle}, then mark it \
                 resolved: `mv {q} {q}{RESOLVED_SUFFIX}`",
                p = path.display(),
                q = q.display()
            )
        }
    }
}

/// Where the steps after a damaged `journal.json` are, for its error message: `log` if it
/// exists.
fn steps_in(log: &Path) -> String {
    if log.exists() {
        format!(
            "; the steps written after it are in {l} (`jq -c . {l}`)",
            l = log.display()
        )
    } else {
        String::new()
    }
}

/// A journal record that can be written as what changed since the previous one.
///
/// The journal appends `self.delta_from(prev)` as a frame of `journal.log` and rebuilds the
/// record by applying the frames to `journal.json` in order. `apply(prev, delta_from(prev))`
/// must give `self` back (property-test it): in debug builds the journal checks it after
/// every append and panics if not; in release builds it checks that `apply` succeeds, and
/// otherwise writes the record whole, never leaving a frame on disk that does not rebuild.
pub trait Record: Serialize + DeserializeOwned + Clone + PartialEq {
    /// What changed between two records.
    type Delta: Serialize + DeserializeOwned;
    /// What turns `prev` into `self`; `None` when only the whole record can say it (the
    /// journal then writes the whole record).
    fn delta_from(&self, prev: &Self) -> Option<Self::Delta>;
    /// Applies `delta` (read back from disk: it may be one that does not fit this record,
    /// which is an `Err` saying why, never a panic).
    fn apply(&mut self, delta: Self::Delta) -> Result<(), String>;
}

/// A frame of `journal.log` as written.
#[derive(Serialize)]
struct FrameOut<'a, D> {
    format: &'static str,
    seq: u64,
    /// The sequence number of the `journal.json` it applies to,
    base: u64,
    /// and the CRC-32 of that file's bytes (a `journal.json` written later with the same
    /// number, after a quarantine, is another one).
    base_crc32: u32,
    written_at: u64,
    delta: &'a D,
}

/// A frame as read (its `crc32` is checked by `seal::check_line`).
#[derive(Deserialize)]
struct Frame<D> {
    format: String,
    seq: u64,
    base: u64,
    base_crc32: u32,
    delta: D,
}

/// Which `journal.json` a log's frames apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Base {
    seq: u64,
    crc32: u32,
}

impl Base {
    fn of(seq: u64, bytes: &[u8]) -> Base {
        Base {
            seq,
            crc32: crc32fast::hash(bytes),
        }
    }
}

/// What replaying `journal.log` onto its base gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Replayed {
    /// The sequence number of the last frame applied (the base's when none was).
    seq: u64,
    /// Bytes of the log that were applied (a prefix of whole lines).
    applied: u64,
    /// Bytes of the log after them, ignored: a torn last frame, or frames of an older base.
    ignored: u64,
}

/// Applies the frames of `log` (the bytes of `journal.log`) to `record`, the `journal.json`
/// `base`. The log's frames must be `base.seq + 1, + 2, …` of that base; a log whose first
/// frame belongs to another base not newer than it is stale (left by a crash after a whole
/// write, or beside a journal.json quarantined before) and ignored whole; a last line without
/// its newline, or with a NUL in it, is a write a crash cut short, ignored. Anything else
/// wrong (a whole line that fails its checksum, wherever it is) is damage: `Err` says what
/// and where.
fn replay<R: Record>(record: &mut R, base: Base, log: &[u8]) -> Result<Replayed, String> {
    let mut seq = base.seq;
    let mut pos = 0usize;
    let mut frame_no = 0u64;
    while pos < log.len() {
        frame_no += 1;
        let (line, next) = match log[pos..].iter().position(|&b| b == b'\n') {
            Some(i) => (&log[pos..=pos + i], pos + i + 1),
            None => (&log[pos..], log.len()),
        };
        // Cut short: no newline yet; or, the last line only, a NUL inside it (JSON escapes
        // every control character, so the line was never whole: after a power cut the page
        // with the newline may reach the disk before an earlier one, which reads as zeros).
        let torn = !line.ends_with(b"\n") || (next == log.len() && line.contains(&0));
        let at = |what: String| format!("{LOG} frame {frame_no} (byte {pos}): {what}");
        let frame = match decode_frame::<R::Delta>(line) {
            Ok(f) => f,
            Err(_) if torn => {
                return Ok(Replayed {
                    seq,
                    applied: pos as u64,
                    ignored: (log.len() - pos) as u64,
                });
            }
            Err(reason) => return Err(at(reason)),
        };
        let ours = frame.base == base.seq && frame.base_crc32 == base.crc32;
        if frame_no == 1 && !ours && frame.base <= base.seq {
            return Ok(Replayed {
                seq,
                applied: 0,
                ignored: log.len() as u64,
            });
        }
        if !ours {
            return Err(at(format!(
                "it applies to journal.json number {} (CRC-32 {:08x}), the journal.json there \
                 is number {} (CRC-32 {:08x})",
                frame.base, frame.base_crc32, base.seq, base.crc32
            )));
        }
        if Some(frame.seq) != seq.checked_add(1) {
            return Err(at(format!(
                "its sequence number is {}, the next one is {}",
                frame.seq,
                seq.saturating_add(1)
            )));
        }
        record
            .apply(frame.delta)
            .map_err(|e| at(format!("it does not apply to the record: {e}")))?;
        seq = frame.seq;
        pos = next;
    }
    Ok(Replayed {
        seq,
        applied: pos as u64,
        ignored: 0,
    })
}

/// Decodes one line of `journal.log` (with its newline).
fn decode_frame<D: DeserializeOwned>(line: &[u8]) -> Result<Frame<D>, String> {
    match seal::check_line(line) {
        seal::Seal::Valid => {}
        seal::Seal::Missing => return Err("no intact checksum (cut short?)".into()),
        seal::Seal::Mismatch { stored, computed } => {
            return Err(format!(
                "the CRC-32 of its content is {computed:08x}, its checksum says {stored:08x}"
            ));
        }
    }
    let frame: Frame<D> = serde_json::from_slice(line)
        .map_err(|e| format!("checksum intact but content invalid: {e}"))?;
    if frame.format != LOG_FORMAT {
        return Err(format!(
            "format {:?} is not {LOG_FORMAT:?}",
            frame.format.chars().take(80).collect::<String>()
        ));
    }
    Ok(frame)
}

/// The envelope as written.
#[derive(Serialize)]
struct EnvelopeOut<'a, R> {
    format: &'static str,
    seq: u64,
    written_at: u64,
    body: &'a R,
}

/// The envelope as read (`format` and `crc32` are checked by `seal::read`).
#[derive(Deserialize)]
struct Envelope<B> {
    seq: u64,
    body: B,
}

/// The previous format: the CRC-32 (a number) covers only `body`, a JSON string.
#[derive(Deserialize)]
struct EnvelopeV1 {
    seq: u64,
    crc32: u32,
    body: String,
}

impl Decoded<serde_json::Value> {
    /// The record as `R`: a body that is JSON but not an `R` is damage (why, as a reason).
    fn typed<R: DeserializeOwned>(self) -> Result<Decoded<R>, String> {
        let Decoded {
            seq,
            record,
            legacy,
            logged,
        } = self;
        serde_json::from_value(record)
            .map(|record| Decoded {
                seq,
                record,
                legacy,
                logged,
            })
            .map_err(|e| format!("checksum intact but content invalid: {e}"))
    }
}

/// A decoded journal or history file.
struct Decoded<R> {
    seq: u64,
    record: R,
    /// Read from the previous format, whose `seq` was not covered by the checksum.
    legacy: bool,
    /// Of [`IN_FLIGHT_FORMAT`]: written by a version that keeps a log beside it.
    logged: bool,
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn corrupt(path: &Path, reason: impl Into<String>) -> JournalError {
    JournalError::Corrupt {
        path: path.to_owned(),
        name: file_name(path),
        reason: reason.into(),
        quarantined: Vec::new(),
    }
}

fn encode<R: Serialize>(
    format: &'static str,
    seq: u64,
    record: &R,
) -> Result<Vec<u8>, JournalError> {
    seal::seal(&EnvelopeOut {
        format,
        seq,
        written_at: time::now_unix(),
        body: record,
    })
    .map_err(JournalError::Serialize)
}

fn decode<R: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<Decoded<R>, JournalError> {
    let read = |format| seal::read::<Envelope<R>, EnvelopeV1>(bytes, format, JOURNAL_FORMAT_V1);
    let (read, logged) = match read(IN_FLIGHT_FORMAT) {
        Err(Refusal::Foreign(f)) if f == JOURNAL_FORMAT => (read(JOURNAL_FORMAT), false),
        r => (r, true),
    };
    match read {
        Ok(Read::Current(env)) => Ok(Decoded {
            seq: env.seq,
            record: env.body,
            legacy: false,
            logged,
        }),
        Ok(Read::Legacy(env)) => {
            let crc = crc32fast::hash(env.body.as_bytes());
            if crc != env.crc32 {
                return Err(corrupt(
                    path,
                    format!(
                        "body CRC-32 is {crc:#010x}, the envelope says {:#010x}",
                        env.crc32
                    ),
                ));
            }
            let record = serde_json::from_str(&env.body)
                .map_err(|e| corrupt(path, format!("body is not a valid record: {e}")))?;
            Ok(Decoded {
                seq: env.seq,
                record,
                legacy: true,
                logged: false,
            })
        }
        Err(Refusal::Corrupt(reason)) => Err(corrupt(path, reason)),
        Err(Refusal::Foreign(found)) if found.starts_with("mk-upgrade-journal/") => {
            Err(JournalError::UnsupportedFormat {
                path: path.to_owned(),
                found,
            })
        }
        Err(Refusal::Foreign(found)) => Err(corrupt(
            path,
            format!("format {found:?} is not a journal format"),
        )),
    }
}

/// Decodes history entry `path`, whose name says it has sequence number `seq`.
fn decode_history<R: DeserializeOwned>(
    path: &Path,
    seq: u64,
    bytes: &[u8],
) -> Result<R, JournalError> {
    let d = decode::<R>(path, bytes)?;
    if d.seq != seq {
        return Err(corrupt(
            path,
            format!(
                "its sequence number {} does not match its name ({seq})",
                d.seq
            ),
        ));
    }
    Ok(d.record)
}

/// Sequence number encoded in a history file name, if it is one.
fn history_seq(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".json")?;
    if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
        stem.parse().ok()
    } else {
        None
    }
}

/// Whether `name` is a quarantined journal that still blocks upgrades (its quarantined log,
/// `….log`, goes with it).
fn is_pending_quarantine(name: &str) -> bool {
    name.starts_with(QUARANTINE_PREFIX)
        && !name.ends_with(RESOLVED_SUFFIX)
        && !name.ends_with(LOG_SUFFIX)
}

/// `r`, with "no such file" counted as done (what was to be moved or removed is not there).
fn absent_ok(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(suffix);
    path.with_file_name(name)
}

/// The journal of one state directory; `R` is the caller's upgrade record.
///
/// Single-writer: hold the [`crate::Lock`] of the same directory while it is open.
#[derive(Debug)]
pub struct Journal<R> {
    dir: PathBuf,
    seq: u64,
    /// The current file is of another format: writes are refused while it is there.
    current_blocked: bool,
    /// Opened by [`Journal::open_read_only`]: nothing is written, moved or removed.
    read_only: bool,
    /// Read-only: the current file is the leftover of an upgrade already in history.
    stale_current: bool,
    /// Read-only: why the current file cannot be trusted although it decodes.
    distrusted: Option<String>,
    /// Writer: the record as on disk (`journal.json` plus the log), what the next step's
    /// delta is taken from; `None` when the next write must be whole.
    last: Option<R>,
    /// Writer: which `journal.json` is there, and its size.
    base: Base,
    base_len: u64,
    /// Writer: bytes of whole frames in `journal.log`.
    log_len: u64,
    /// `journal.json` was moved aside (quarantined) since `last` was taken: the next write
    /// is whole whatever `last` says.
    moved_aside: std::cell::Cell<bool>,
}

impl<R: Record> Journal<R> {
    /// Opens (creating if needed, mode 0700) the journal in `dir` and performs crash recovery
    /// of the files themselves:
    /// * leftover `.*.tmp` files (a write that never became visible) are removed;
    /// * if `journal.json` has a sequence number not above the newest history entry, the
    ///   crash hit [`Journal::finish`] between writing history and removing the current
    ///   record: the upgrade did finish, and the stale current file is removed. (Only for the
    ///   sealed format, whose checksum covers `seq`: a [`JOURNAL_FORMAT_V1`] record that looks
    ///   stale is quarantined instead, since its `seq` may be a damaged one.)
    /// * a damaged `journal.json` is quarantined: renamed to `journal.json.corrupt-TIME`,
    ///   never deleted. [`Journal::current`] then reports it (a [`JournalError::Corrupt`]
    ///   naming the quarantined file) and [`Journal::write`] refuses, until the operator
    ///   resolves it ([`Journal::resolve_quarantined`], or renaming it to `….resolved`); a
    ///   damaged `journal.log` quarantines both (the log as `journal.json.corrupt-TIME.log`);
    /// * the log's last frame, if a crash cut it short, is cut off; frames of another
    ///   `journal.json` (stale) are dropped; a log without `journal.json` is removed (left by
    ///   a crash in `finish`) or, after a quarantine a crash interrupted, moved beside it.
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        let history = dir.join(HISTORY);
        ensure_dir(&history)?;
        for d in [dir, history.as_path()] {
            for p in remove_stale_temps(d)? {
                tracing::warn!(path = %p.display(), "removed an interrupted journal write");
            }
        }
        let (mut journal, newest_history) = Self::at(dir, false)?;
        let current_path = journal.current_path();
        let bytes = match read_state(&current_path, MAX_FILE)? {
            StateFile::Missing => {
                journal.settle_orphan_log()?;
                return Ok(journal);
            }
            StateFile::TooLarge { limit } => {
                journal.quarantine_damaged(format!("larger than the {limit}-byte limit"));
                return Ok(journal);
            }
            StateFile::Contents(b) => b,
        };
        match decode::<serde_json::Value>(&current_path, &bytes) {
            Ok(d) if d.seq <= newest_history && !d.legacy => {
                tracing::warn!(
                    path = %current_path.display(),
                    "removing the record of an upgrade that already reached history"
                );
                fs::remove_file(&current_path)
                    .map_err(|e| IoError::new("remove", &current_path, e))?;
                fsync_dir(dir)?;
                journal.remove_log();
            }
            Ok(d) if d.seq <= newest_history => {
                journal.quarantine_damaged(legacy_stale_reason(d.seq, newest_history));
            }
            Ok(d) => journal.resume(d, &bytes)?,
            Err(JournalError::Corrupt { reason, .. }) => {
                journal.quarantine_damaged(reason);
            }
            Err(JournalError::UnsupportedFormat { .. }) => journal.current_blocked = true,
            Err(e) => return Err(e),
        }
        Ok(journal)
    }

    /// Takes up the in-flight record (`journal.json`, decoded `d` from `bytes`, and its log)
    /// for writing: a log frame a crash cut short is cut off, a damaged record or log is
    /// quarantined.
    fn resume(&mut self, d: Decoded<serde_json::Value>, bytes: &[u8]) -> Result<(), JournalError> {
        let base_seq = d.seq;
        self.seq = base_seq;
        let (mut record, whole_next) = match d.typed::<R>() {
            Ok(d) => (d.record, !d.logged),
            Err(reason) => {
                self.quarantine_damaged(reason);
                return Ok(());
            }
        };
        let base = Base::of(base_seq, bytes);
        let replayed = match self.rebuild(&mut record, base)? {
            Ok(r) => r,
            Err(reason) => {
                self.quarantine_damaged(reason);
                return Ok(());
            }
        };
        if replayed.ignored > 0 {
            let log = self.log_path();
            tracing::warn!(
                path = %log.display(),
                bytes = replayed.ignored,
                "cutting off the end of the journal log a crash interrupted"
            );
            fs::OpenOptions::new()
                .write(true)
                .open(&log)
                .and_then(|f| {
                    f.set_len(replayed.applied)?;
                    f.sync_all()
                })
                .map_err(|e| IoError::new("truncate", &log, e))?;
        }
        if replayed.applied > 0 {
            // The log's directory entry, made durable by whoever appended its first frame,
            // unless that process died just before: made durable here, before any append.
            fsync_dir(&self.dir)?;
        }
        self.seq = replayed.seq;
        self.base = base;
        self.base_len = bytes.len() as u64;
        self.log_len = replayed.applied;
        // A record of an earlier format is rewritten whole (in this one) by the next write:
        // the version that wrote it would ignore a log.
        self.last = (!whole_next).then_some(record);
        Ok(())
    }

    /// Applies the frames of `journal.log` to `record`, `journal.json` of number `base_seq`.
    /// `Ok(Err(reason))`: the log is damaged.
    fn rebuild(&self, record: &mut R, base: Base) -> Result<Result<Replayed, String>, IoError> {
        let path = self.log_path();
        Ok(match read_state(&path, MAX_FILE)? {
            StateFile::Missing => Ok(Replayed {
                seq: base.seq,
                applied: 0,
                ignored: 0,
            }),
            StateFile::TooLarge { limit } => {
                Err(format!("{LOG} is larger than the {limit}-byte limit"))
            }
            StateFile::Contents(log) => replay(record, base, &log),
        })
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(LOG)
    }

    /// Removes `journal.log` when its frames belong to no `journal.json` any more. Best
    /// effort: a leftover is recognized as stale by readers, and the next append starts it
    /// over.
    fn remove_log(&mut self) {
        self.log_len = 0;
        let path = self.log_path();
        if let Err(e) = absent_ok(fs::remove_file(&path)) {
            tracing::warn!(path = %path.display(), "cannot remove a stale journal log: {e}");
        }
    }

    /// The journal of `dir` before its current file is looked at: its sequence number
    /// that of the newest history entry, which is also returned.
    fn at(dir: &Path, read_only: bool) -> Result<(Self, u64), JournalError> {
        let mut journal = Journal {
            dir: dir.to_owned(),
            seq: 0,
            current_blocked: false,
            read_only,
            stale_current: false,
            distrusted: None,
            last: None,
            base: Base { seq: 0, crc32: 0 },
            base_len: 0,
            log_len: 0,
            moved_aside: std::cell::Cell::new(false),
        };
        let newest_history = journal.history_seqs()?.last().copied().unwrap_or(0);
        journal.seq = newest_history;
        Ok((journal, newest_history))
    }

    /// Opens the journal in `dir` for reading only (`status`, `history`, `check`, the
    /// journal gate of a command before it takes the lock): without the lock, and without
    /// [`Journal::open`]'s recovery of the files, which a concurrent writer would suffer (its
    /// temporary file removed before its rename). Nothing is created, moved or removed: a
    /// damaged current file is reported as [`JournalError::Corrupt`] ("kept as is"), the
    /// leftover of an upgrade already in history reads as no upgrade in flight, and every
    /// write is refused.
    pub fn open_read_only(dir: &Path) -> Result<Self, JournalError> {
        let (mut journal, newest_history) = Self::at(dir, true)?;
        let current_path = journal.current_path();
        if let StateFile::Contents(bytes) = read_state(&current_path, MAX_FILE)? {
            match decode::<serde_json::Value>(&current_path, &bytes) {
                Ok(d) if d.seq <= newest_history && !d.legacy => journal.stale_current = true,
                Ok(d) if d.seq <= newest_history => {
                    journal.distrusted = Some(legacy_stale_reason(d.seq, newest_history));
                }
                Ok(d) => {
                    journal.seq = d.seq;
                    // With the log's steps (a damaged log is reported by `current`).
                    if let Ok(b) = d.typed::<R>()
                        && let Ok(Ok(r)) =
                            journal.rebuild(&mut { b.record }, Base::of(b.seq, &bytes))
                    {
                        journal.seq = r.seq;
                    }
                }
                Err(JournalError::UnsupportedFormat { .. }) => journal.current_blocked = true,
                // Reported by `current`.
                Err(_) => {}
            }
        }
        Ok(journal)
    }

    /// A damaged current file: quarantined, or (read-only) reported as it is.
    fn damaged(&self, reason: String) -> JournalError {
        if self.read_only {
            corrupt(&self.current_path(), reason)
        } else {
            self.quarantine_damaged(reason)
        }
    }

    fn refuse_read_only(&self, what: &'static str) -> Result<(), JournalError> {
        if self.read_only {
            return Err(IoError::new(
                what,
                &self.dir,
                std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the journal was opened read-only",
                ),
            )
            .into());
        }
        Ok(())
    }

    /// Path of the in-flight record.
    pub fn current_path(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    /// The sequence number of the last write.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The in-flight upgrade record, if an upgrade is unfinished. A damaged file is
    /// quarantined and reported ([`JournalError::Corrupt`], naming the quarantined file and
    /// what to do), never silently ignored; so is a quarantined journal the operator has not
    /// resolved yet: `Ok(None)` means that no upgrade is in flight.
    pub fn current(&self) -> Result<Option<R>, JournalError> {
        let path = self.current_path();
        if let Some(reason) = &self.distrusted {
            return Err(corrupt(&path, reason.clone()));
        }
        let mut attempt = 0;
        let decoded = loop {
            attempt += 1;
            break match read_state(&path, MAX_FILE)? {
                StateFile::Missing => None,
                StateFile::TooLarge { limit } => {
                    return Err(self.damaged(format!("larger than the {limit}-byte limit")));
                }
                StateFile::Contents(_) if self.stale_current => None,
                StateFile::Contents(bytes) => match decode::<R>(&path, &bytes) {
                    Ok(d) => {
                        let mut record = d.record;
                        if let Err(reason) = self.rebuild(&mut record, Base::of(d.seq, &bytes))? {
                            // Read-only beside a writer, journal.json may have been replaced
                            // (a whole write, then a new log) between the two reads: read
                            // both again.
                            if self.read_only
                                && attempt < 3
                                && !matches!(
                                    read_state(&path, MAX_FILE)?,
                                    StateFile::Contents(now) if now == bytes
                                )
                            {
                                continue;
                            }
                            return Err(self.damaged(reason));
                        }
                        Some(record)
                    }
                    Err(JournalError::Corrupt { reason, .. }) => {
                        return Err(self.damaged(reason));
                    }
                    Err(e) => return Err(e),
                },
            };
        };
        self.refuse_if_quarantined()?;
        Ok(decoded)
    }

    /// Records `record` as the in-flight upgrade, durably, before returning: a frame
    /// appended to the log with what changed since the previous write, or (the first write,
    /// a change only the whole record can say, or a log grown past its bound) the whole record
    /// written atomically. Returns the sequence number written. Refused while a damaged or
    /// quarantined journal is unresolved, or the current file is of another format.
    pub fn write(&mut self, record: &R) -> Result<u64, JournalError> {
        self.check_writable()?;
        let seq = self.next_seq()?;
        if !self.append(seq, record)? {
            self.write_whole(seq, record)?;
        }
        Ok(seq)
    }

    /// The sequence number of the next write (a damaged file could claim the largest one).
    fn next_seq(&self) -> Result<u64, JournalError> {
        self.seq.checked_add(1).ok_or_else(|| {
            corrupt(
                &self.current_path(),
                format!("its sequence number {} cannot grow", self.seq),
            )
        })
    }

    /// Writes step `seq` as a frame of the log; `false` when it must be written whole.
    fn append(&mut self, seq: u64, record: &R) -> Result<bool, JournalError> {
        if self.moved_aside.replace(false) {
            self.last = None;
        }
        let Some(mut last) = self.last.take() else {
            return Ok(false);
        };
        let Some(delta) = record.delta_from(&last) else {
            return Ok(false);
        };
        let frame = seal::seal_line(&FrameOut {
            format: LOG_FORMAT,
            seq,
            base: self.base.seq,
            base_crc32: self.base.crc32,
            written_at: time::now_unix(),
            delta: &delta,
        })
        .map_err(JournalError::Serialize)?;
        if self.log_len + frame.len() as u64 > LOG_FLOOR.max(self.base_len) {
            return Ok(false);
        }
        // The delta is applied to the record as on disk before the frame is written: one
        // that does not rebuild the record (a bug of the record type) never reaches the disk.
        match last.apply(delta) {
            // The comparison is O(record): release builds trust the record type's tested
            // contract.
            Ok(()) if !cfg!(debug_assertions) || last == *record => {}
            outcome => {
                debug_assert!(false, "a journal delta does not rebuild its record");
                tracing::error!(
                    ?outcome,
                    "a journal delta does not rebuild its record: writing it whole"
                );
                return Ok(false);
            }
        }
        // On failure `last` stays `None`: the frame may be partly on disk, and the next write
        // is whole (which drops the log).
        let path = self.log_path();
        append_durably(&path, &frame, self.log_len == 0)?;
        if self.log_len == 0 {
            fsync_dir(&self.dir)?;
        }
        self.log_len += frame.len() as u64;
        self.seq = seq;
        self.last = Some(last);
        Ok(true)
    }

    /// Writes step `seq` as the whole record: a new `journal.json`, the log dropped.
    fn write_whole(&mut self, seq: u64, record: &R) -> Result<(), JournalError> {
        let bytes = encode(IN_FLIGHT_FORMAT, seq, record)?;
        self.last = None;
        atomic_write(&self.current_path(), &bytes)?;
        self.seq = seq;
        self.base = Base::of(seq, &bytes);
        self.base_len = bytes.len() as u64;
        // Its frames apply to the previous journal.json: readers ignore them now.
        self.remove_log();
        self.last = Some(record.clone());
        Ok(())
    }

    /// Moves the final `record` of an upgrade into history and clears the in-flight record.
    /// Keeps the newest [`HISTORY_LIMIT`] history entries. Returns the sequence number.
    /// Refused like [`Journal::write`].
    ///
    /// Crash-safe: history is written first (atomically), then the current file is removed.
    /// A crash in between leaves a current file whose sequence number is not above the
    /// history entry, which [`Journal::open`] recognizes and removes.
    pub fn finish(&mut self, record: &R) -> Result<u64, JournalError> {
        self.check_writable()?;
        let seq = self.next_seq()?;
        let history = self.dir.join(HISTORY);
        atomic_write(
            &history.join(format!("{seq:020}.json")),
            &encode(JOURNAL_FORMAT, seq, record)?,
        )?;
        self.seq = seq;
        let current = self.current_path();
        self.last = None;
        match fs::remove_file(&current) {
            Ok(()) => fsync_dir(&self.dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(IoError::new("remove", &current, e).into()),
        }
        self.remove_log();
        let seqs = self.history_seqs()?;
        if seqs.len() > HISTORY_LIMIT {
            for old in &seqs[..seqs.len() - HISTORY_LIMIT] {
                let p = history.join(format!("{old:020}.json"));
                fs::remove_file(&p).map_err(|e| IoError::new("remove old history entry", &p, e))?;
            }
            fsync_dir(&history)?;
        }
        Ok(seq)
    }

    /// Finished upgrades, oldest first. A damaged history entry is a
    /// [`JournalError::Corrupt`] naming its file (which is kept as is).
    pub fn history(&self) -> Result<Vec<R>, JournalError> {
        let history = self.dir.join(HISTORY);
        let mut out = Vec::new();
        for seq in self.history_seqs()? {
            let path = history.join(format!("{seq:020}.json"));
            match read_state(&path, MAX_FILE)? {
                StateFile::Missing => {}
                StateFile::TooLarge { limit } => {
                    return Err(corrupt(
                        &path,
                        format!("larger than the {limit}-byte limit"),
                    ));
                }
                StateFile::Contents(bytes) => out.push(decode_history(&path, seq, &bytes)?),
            }
        }
        Ok(out)
    }

    /// Moves `journal.json` (damaged or not) aside to `journal.json.corrupt-UNIXTIME`, keeping
    /// it for inspection. Returns the new path, or `None` when there was no current record.
    /// The quarantined file blocks upgrades until it is resolved
    /// ([`Journal::resolve_quarantined`]).
    pub fn quarantine_current(&mut self) -> Result<Option<PathBuf>, JournalError> {
        self.refuse_read_only("quarantine the journal in")?;
        let moved = self.move_aside()?;
        self.current_blocked = false;
        Ok(moved)
    }

    /// Quarantined journals not resolved yet (oldest first): while there is one, upgrades are
    /// refused.
    pub fn quarantined(&self) -> Result<Vec<PathBuf>, IoError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| IoError::new("list", &self.dir, e))? {
            let entry = entry.map_err(|e| IoError::new("list", &self.dir, e))?;
            if entry
                .file_name()
                .to_str()
                .is_some_and(is_pending_quarantine)
            {
                out.push(entry.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// The operator settled what a quarantined journal described: it is renamed to
    /// `NAME.resolved` (kept for the record) and no longer blocks upgrades. Returns the new
    /// path.
    pub fn resolve_quarantined(&mut self, path: &Path) -> Result<PathBuf, JournalError> {
        self.refuse_read_only("resolve a quarantined journal in")?;
        let pending = self.quarantined()?;
        let Some(q) = pending
            .iter()
            .find(|q| q.file_name() == path.file_name() && path.file_name().is_some())
        else {
            return Err(IoError::new(
                "resolve",
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a quarantined journal of this state directory",
                ),
            )
            .into());
        };
        let dest = with_suffix(q, RESOLVED_SUFFIX);
        let log = with_suffix(q, LOG_SUFFIX);
        absent_ok(fs::rename(&log, with_suffix(&dest, LOG_SUFFIX)))
            .map_err(|e| IoError::new("rename", &log, e))?;
        fs::rename(q, &dest).map_err(|e| IoError::new("rename", q, e))?;
        fsync_dir(&self.dir)?;
        Ok(dest)
    }

    /// Refuses writes while the current file is of another format or a quarantined journal
    /// is unresolved.
    fn check_writable(&mut self) -> Result<(), JournalError> {
        self.refuse_read_only("write the journal in")?;
        if self.current_blocked {
            // Re-check: the operator may have moved the file aside by hand.
            let path = self.current_path();
            match read_state(&path, MAX_FILE)? {
                StateFile::Missing => {}
                StateFile::TooLarge { limit } => {
                    return Err(
                        self.quarantine_damaged(format!("larger than the {limit}-byte limit"))
                    );
                }
                StateFile::Contents(bytes) => match decode::<serde_json::Value>(&path, &bytes) {
                    Ok(_) => {}
                    Err(JournalError::Corrupt { reason, .. }) => {
                        return Err(self.quarantine_damaged(reason));
                    }
                    Err(e) => return Err(e),
                },
            }
            self.current_blocked = false;
        }
        self.refuse_if_quarantined()
    }

    /// `Err` naming the quarantined journals while any is unresolved.
    fn refuse_if_quarantined(&self) -> Result<(), JournalError> {
        let pending = self.quarantined()?;
        let Some(first) = pending.first() else {
            return Ok(());
        };
        let path = self.current_path();
        Err(JournalError::Corrupt {
            name: file_name(&path),
            reason: self.diagnose(first),
            path,
            quarantined: pending,
        })
    }

    /// Why quarantined file `q` was refused (decoded again: the reason is not stored).
    fn diagnose(&self, q: &Path) -> String {
        match read_state(q, MAX_FILE) {
            Err(e) => format!("quarantined earlier; it cannot be read now: {e}"),
            Ok(StateFile::Missing) => "quarantined earlier; it is gone now".into(),
            Ok(StateFile::TooLarge { limit }) => format!("larger than the {limit}-byte limit"),
            Ok(StateFile::Contents(bytes)) => match decode::<serde_json::Value>(q, &bytes) {
                Err(JournalError::Corrupt { reason, .. }) => reason,
                Err(e) => e.to_string(),
                Ok(d) if d.legacy => {
                    let newest = self
                        .history_seqs()
                        .ok()
                        .and_then(|s| s.last().copied())
                        .unwrap_or(0);
                    legacy_stale_reason(d.seq, newest)
                }
                Ok(d) => {
                    let log = with_suffix(q, LOG_SUFFIX);
                    let damage = match (read_state(&log, MAX_FILE), d.typed::<R>()) {
                        (Ok(StateFile::TooLarge { limit }), _) => {
                            Some(format!("{LOG} is larger than the {limit}-byte limit"))
                        }
                        (Ok(StateFile::Contents(l)), Ok(b)) => {
                            replay(&mut { b.record }, Base::of(b.seq, &bytes), &l).err()
                        }
                        _ => None,
                    };
                    damage.unwrap_or_else(|| {
                        "quarantined earlier; it reads as an intact record now".into()
                    })
                }
            },
        }
    }

    /// Quarantines the damaged `journal.json` and returns the error that reports it. A
    /// failure to move it aside is reported in the same error (the file then stays where it
    /// is, and still blocks upgrades).
    fn quarantine_damaged(&self, reason: String) -> JournalError {
        let path = self.current_path();
        match self.move_aside() {
            Ok(dest) => {
                if let Some(dest) = &dest {
                    tracing::error!(
                        path = %path.display(),
                        quarantined = %dest.display(),
                        %reason,
                        "the upgrade journal is damaged: quarantined"
                    );
                }
                match self.quarantined() {
                    Ok(q) if !q.is_empty() => JournalError::Corrupt {
                        name: file_name(&path),
                        path,
                        reason,
                        quarantined: q,
                    },
                    Ok(_) => corrupt(&path, reason),
                    Err(e) => e.into(),
                }
            }
            Err(e) => corrupt(&path, format!("{reason}; moving it aside failed: {e}")),
        }
    }

    /// Moves `journal.json` to a fresh `journal.json.corrupt-UNIXTIME[-N]`, never replacing
    /// an existing file, and its log beside it (`….log`). `None` when there was no
    /// `journal.json` (or another process moved it first).
    ///
    /// A hard link to the new name first, then the log renamed beside it, then the old name
    /// unlinked: a crash at any point leaves the quarantined name (which blocks everything
    /// until resolved) and never loses either file. Without hard links, journal.json is
    /// renamed first; a crash before the log follows leaves the log without journal.json,
    /// which [`Journal::open`] then moves beside the quarantined file.
    fn move_aside(&self) -> Result<Option<PathBuf>, IoError> {
        let src = self.current_path();
        let log = self.log_path();
        let stem = format!("{QUARANTINE_PREFIX}{}", time::now_unix());
        for n in 0..10_000u32 {
            let dest = if n == 0 {
                self.dir.join(&stem)
            } else {
                self.dir.join(format!("{stem}-{n}"))
            };
            let dest_log = with_suffix(&dest, LOG_SUFFIX);
            // A name whose log an earlier quarantine left (resolved by hand) is not free.
            if dest_log.exists() {
                continue;
            }
            let linked = match fs::hard_link(&src, &dest) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                // No hard links on this file system: rename to a name checked to be free.
                Err(_) if !dest.exists() => {
                    match fs::rename(&src, &dest) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                        Err(e) => return Err(IoError::new("quarantine", &src, e)),
                    }
                    fsync_dir(&self.dir)?;
                    false
                }
                Err(_) => continue,
            };
            self.moved_aside.set(true);
            absent_ok(fs::rename(&log, &dest_log))
                .map_err(|e| IoError::new("quarantine", &log, e))?;
            if linked {
                absent_ok(fs::remove_file(&src))
                    .map_err(|e| IoError::new("quarantine", &src, e))?;
            }
            fsync_dir(&self.dir)?;
            return Ok(Some(dest));
        }
        Err(IoError::new(
            "quarantine",
            &src,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "no free journal.json.corrupt-* name",
            ),
        ))
    }

    /// A `journal.log` without `journal.json`: left by a crash inside `finish` (stale: it is
    /// removed), or inside a quarantine that had to rename (it goes beside the newest
    /// quarantined file that has no log yet, kept).
    fn settle_orphan_log(&mut self) -> Result<(), IoError> {
        let log = self.log_path();
        if !log.exists() {
            return Ok(());
        }
        let lonely = self
            .quarantined()?
            .into_iter()
            .rev()
            .find(|q| !with_suffix(q, LOG_SUFFIX).exists());
        let Some(q) = lonely else {
            self.remove_log();
            return Ok(());
        };
        let dest = with_suffix(&q, LOG_SUFFIX);
        tracing::warn!(
            log = %log.display(),
            quarantined = %dest.display(),
            "moving the journal log of an interrupted quarantine beside it"
        );
        fs::rename(&log, &dest).map_err(|e| IoError::new("quarantine", &log, e))?;
        fsync_dir(&self.dir)
    }

    fn history_seqs(&self) -> Result<Vec<u64>, IoError> {
        let history = self.dir.join(HISTORY);
        let mut seqs = Vec::new();
        let entries = match fs::read_dir(&history) {
            Ok(e) => e,
            // Read-only on a state directory no upgrade has used yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.read_only => {
                return Ok(seqs);
            }
            Err(e) => return Err(IoError::new("list", &history, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| IoError::new("list", &history, e))?;
            if let Some(seq) = entry.file_name().to_str().and_then(history_seq) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        Ok(seqs)
    }
}

/// Appends `bytes` to `path` (created with mode [`FILE_MODE`]; with `fresh`, whatever was
/// there is dropped first) and fdatasyncs it.
fn append_durably(path: &Path, bytes: &[u8], fresh: bool) -> Result<(), IoError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|e| IoError::new("open", path, e))?;
    if fresh {
        // Frames of an older journal.json (their removal failed), and the mode set whatever
        // the umask.
        f.set_len(0)
            .map_err(|e| IoError::new("truncate", path, e))?;
        f.set_permissions(fs::Permissions::from_mode(FILE_MODE))
            .map_err(|e| IoError::new("set the mode of", path, e))?;
    }
    f.write_all(bytes)
        .map_err(|e| IoError::new("append to", path, e))?;
    f.sync_data()
        .map_err(|e| IoError::new("fdatasync", path, e))
}

fn legacy_stale_reason(seq: u64, newest_history: u64) -> String {
    format!(
        "a {JOURNAL_FORMAT_V1} record (whose sequence number is not covered by its checksum) \
         with sequence number {seq}, not above the newest history entry {newest_history}: it \
         either finished or its sequence number is damaged"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Rec {
        id: String,
        step: u32,
    }

    /// The whole record as its own delta (the log's mechanics, not a record's delta, are
    /// what these tests are about; `Items` below has a partial one).
    impl Record for Rec {
        type Delta = Rec;
        fn delta_from(&self, _prev: &Self) -> Option<Rec> {
            Some(self.clone())
        }
        fn apply(&mut self, delta: Rec) -> Result<(), String> {
            *self = delta;
            Ok(())
        }
    }

    fn rec(id: &str, step: u32) -> Rec {
        Rec {
            id: id.into(),
            step,
        }
    }

    #[test]
    fn a_read_only_open_never_touches_a_writers_files() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing there yet: no upgrade, no history, nothing created.
        let ro = Journal::<Rec>::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.current().unwrap(), None);
        assert!(ro.history().unwrap().is_empty());
        assert!(!dir.path().join(HISTORY).exists());
        // A writer in the middle of a write (its temporary file not renamed yet): status,
        // history and check open the journal meanwhile; the temporary file must survive.
        let mut w = Journal::<Rec>::open(dir.path()).unwrap();
        w.write(&rec("u", 1)).unwrap();
        let tmp = dir.path().join(".journal.json.tmp");
        fs::write(&tmp, b"being written").unwrap();
        let mut ro = Journal::<Rec>::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.current().unwrap(), Some(rec("u", 1)));
        assert!(
            tmp.exists(),
            "a read-only open removed a writer's temporary file"
        );
        // Writes are refused.
        assert!(ro.write(&rec("u", 2)).is_err());
        assert!(ro.finish(&rec("u", 2)).is_err());
        assert!(ro.quarantine_current().is_err());
        fs::remove_file(&tmp).unwrap();
        // A damaged current file is reported and kept where it is (the writer's recovery
        // quarantines it, under the lock).
        fs::write(w.current_path(), b"{garbage").unwrap();
        let ro = Journal::<Rec>::open_read_only(dir.path()).unwrap();
        let e = ro.current().unwrap_err();
        assert!(e.is_corrupt(), "{e}");
        assert!(w.current_path().exists());
        assert!(Journal::<Rec>::quarantined(&ro).unwrap().is_empty());
        // The leftover of a finished upgrade reads as nothing in flight, and stays.
        let dir = tempfile::tempdir().unwrap();
        let mut w = Journal::<Rec>::open(dir.path()).unwrap();
        w.write(&rec("v", 1)).unwrap();
        let leftover = fs::read(w.current_path()).unwrap();
        w.finish(&rec("v", 2)).unwrap();
        fs::write(w.current_path(), &leftover).unwrap();
        let ro = Journal::<Rec>::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.current().unwrap(), None);
        assert!(w.current_path().exists());
        assert_eq!(ro.history().unwrap().last(), Some(&rec("v", 2)));
    }

    /// A file of the previous format, as that version wrote it.
    fn legacy_v1(seq: u64, record: &Rec) -> Vec<u8> {
        let body = serde_json::to_string(record).unwrap();
        let env = serde_json::json!({
            "format": JOURNAL_FORMAT_V1,
            "seq": seq,
            "written_at": 1_795_438_560u64,
            "crc32": crc32fast::hash(body.as_bytes()),
            "body": body,
        });
        let mut out = serde_json::to_vec_pretty(&env).unwrap();
        out.push(b'\n');
        out
    }

    #[test]
    fn write_read_finish_history() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        assert_eq!(j.current().unwrap(), None);
        assert_eq!(j.write(&rec("u1", 1)).unwrap(), 1);
        assert_eq!(j.write(&rec("u1", 2)).unwrap(), 2);
        assert_eq!(j.current().unwrap(), Some(rec("u1", 2)));
        // A reopened journal continues from the stored state.
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        assert_eq!(j.seq(), 2);
        assert_eq!(j.current().unwrap(), Some(rec("u1", 2)));
        assert_eq!(j.finish(&rec("u1", 3)).unwrap(), 3);
        assert_eq!(j.current().unwrap(), None);
        assert!(!j.current_path().exists());
        j.write(&rec("u2", 1)).unwrap();
        j.finish(&rec("u2", 9)).unwrap();
        let j = Journal::<Rec>::open(dir.path()).unwrap();
        assert_eq!(j.history().unwrap(), vec![rec("u1", 3), rec("u2", 9)]);
        assert_eq!(j.seq(), 5);
    }

    #[test]
    fn leftover_temp_is_ignored_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        j.write(&rec("u1", 1)).unwrap();
        // A crash after creating the temp file but before the rename.
        let tmp = dir.path().join(".journal.json.tmp");
        fs::write(&tmp, b"{\"format\":\"mk-upgrade-jour").unwrap();
        let htmp = dir.path().join("history/.00000000000000000002.json.tmp");
        fs::write(&htmp, b"").unwrap();
        let j = Journal::<Rec>::open(dir.path()).unwrap();
        assert!(!tmp.exists() && !htmp.exists());
        assert_eq!(j.current().unwrap(), Some(rec("u1", 1)));
        assert!(j.history().unwrap().is_empty());
    }

    #[test]
    fn truncated_journal_is_quarantined_and_blocks_until_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        j.write(&rec("u1", 1)).unwrap();
        let path = j.current_path();
        let bytes = fs::read(&path).unwrap();
        let torn = &bytes[..bytes.len() / 2];
        fs::write(&path, torn).unwrap();

        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        // Moved aside, not deleted.
        assert!(!path.exists());
        let q = j.quarantined().unwrap();
        assert_eq!(q.len(), 1);
        assert_eq!(fs::read(&q[0]).unwrap(), torn);
        assert!(
            q[0].file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("journal.json.corrupt-")
        );
        // Reported on every look, never "no upgrade in flight".
        for _ in 0..2 {
            let e = j.current().unwrap_err();
            assert!(e.is_corrupt());
            assert!(
                matches!(&e, JournalError::Corrupt { path: p, quarantined, .. }
                    if *p == path && *quarantined == q),
                "{e:?}"
            );
            let msg = e.to_string();
            for want in [
                q[0].to_str().unwrap(),
                "quarantined",
                "jq .",
                "uname -r",
                "mk-upgrade status",
                ".resolved",
            ] {
                assert!(msg.contains(want), "{want:?} missing: {msg}");
            }
        }
        // Writing (or finishing) would bury the evidence: refused.
        assert!(matches!(
            j.write(&rec("u2", 1)),
            Err(JournalError::Corrupt { .. })
        ));
        assert!(matches!(
            j.finish(&rec("u2", 1)),
            Err(JournalError::Corrupt { .. })
        ));
        // A new process sees the same.
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        assert!(j.current().unwrap_err().is_corrupt());
        // Resolved by the operator: kept, and upgrades proceed.
        let resolved = j.resolve_quarantined(&q[0]).unwrap();
        assert_eq!(fs::read(&resolved).unwrap(), torn);
        assert!(resolved.to_str().unwrap().ends_with(".resolved"));
        assert_eq!(j.current().unwrap(), None);
        j.write(&rec("u2", 1)).unwrap();
        assert_eq!(j.current().unwrap(), Some(rec("u2", 1)));
    }

    #[test]
    fn damage_found_after_open_is_quarantined_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        j.write(&rec("u1", 1)).unwrap();
        fs::write(j.current_path(), b"{\"format\":").unwrap();
        assert!(j.current().unwrap_err().is_corrupt());
        assert_eq!(j.quarantined().unwrap().len(), 1);
        assert!(j.write(&rec("u1", 2)).is_err());
        // Two damaged journals: both kept, both named.
        let q = j.quarantined().unwrap();
        fs::write(j.current_path(), b"").unwrap();
        let e = j.current().unwrap_err();
        let JournalError::Corrupt { quarantined, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(quarantined.len(), 2);
        assert!(quarantined.contains(&q[0]));
        assert!(e.to_string().contains(q[0].to_str().unwrap()), "{e}");
    }

    #[test]
    fn garbled_body_fails_the_crc() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        j.write(&rec("upgrade-7", 1)).unwrap();
        let path = j.current_path();
        let text = fs::read_to_string(&path).unwrap();
        // Still valid JSON, but not what was checksummed.
        let garbled = text.replace("upgrade-7", "upgrade-8");
        assert_ne!(text, garbled);
        fs::write(&path, garbled).unwrap();
        let e = j.current().unwrap_err();
        assert!(e.to_string().contains("CRC-32"), "{e}");
    }

    /// The audit's case: one flipped bit turned `seq` 9 into 1, below the history, and the
    /// record was deleted as "already finished". `seq` is covered by the checksum now.
    #[test]
    fn a_flipped_sequence_number_is_quarantined_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        for i in 0..8 {
            j.finish(&rec("old", i)).unwrap();
        }
        assert_eq!(j.write(&rec("u9", 1)).unwrap(), 9);
        let path = j.current_path();
        let text = fs::read_to_string(&path).unwrap();
        let flipped = text.replacen("\"seq\": 9", "\"seq\": 1", 1);
        assert_ne!(text, flipped);
        fs::write(&path, &flipped).unwrap();
        let j = Journal::<Rec>::open(dir.path()).unwrap();
        let e = j.current().unwrap_err();
        assert!(e.is_corrupt(), "{e}");
        let q = j.quarantined().unwrap();
        assert_eq!(fs::read_to_string(&q[0]).unwrap(), flipped);
        assert_eq!(j.history().unwrap().len(), 8);
    }

    /// The same flip in a file of the previous format (seq outside its checksum): not
    /// deleted either, but quarantined.
    #[test]
    fn legacy_records_are_read_and_a_stale_looking_one_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        for i in 0..8 {
            j.finish(&rec("old", i)).unwrap();
        }
        let v1 = |seq: u64| legacy_v1(seq, &rec("u9", 1));
        fs::write(j.current_path(), v1(9)).unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        assert_eq!(j.current().unwrap(), Some(rec("u9", 1)));
        assert_eq!(j.seq(), 9);
        // The next write replaces it in the sealed format.
        j.write(&rec("u9", 2)).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(j.current_path()).unwrap()).unwrap();
        assert_eq!(v["format"], IN_FLIGHT_FORMAT);
        assert_eq!(v["body"]["step"], 2);

        fs::write(j.current_path(), v1(1)).unwrap();
        let j = Journal::<Rec>::open(dir.path()).unwrap();
        let e = j.current().unwrap_err();
        assert!(e.to_string().contains("sequence number 1"), "{e}");
        assert_eq!(fs::read(&j.quarantined().unwrap()[0]).unwrap(), v1(1));
    }

    #[test]
    fn empty_and_foreign_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        fs::write(j.current_path(), b"").unwrap();
        assert!(matches!(j.current(), Err(JournalError::Corrupt { .. })));
        let q = j.quarantined().unwrap();
        j.resolve_quarantined(&q[0]).unwrap();
        let body = r#"{"id":"x","step":1}"#;
        let other = format!(
            r#"{{"format":"mk-upgrade-journal/9","seq":1,"written_at":0,"crc32":{},"body":{}}}"#,
            crc32fast::hash(body.as_bytes()),
            serde_json::to_string(body).unwrap()
        );
        fs::write(j.current_path(), &other).unwrap();
        assert!(matches!(
            j.current(),
            Err(JournalError::UnsupportedFormat { .. })
        ));
        // Another version's record is neither quarantined nor overwritten.
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        assert!(matches!(
            j.write(&rec("y", 1)),
            Err(JournalError::UnsupportedFormat { .. })
        ));
        assert_eq!(fs::read_to_string(j.current_path()).unwrap(), other);
        // Valid envelopes, bodies of the wrong shape.
        let body = r#"{"nope":true}"#;
        let wrong = format!(
            r#"{{"format":"{JOURNAL_FORMAT_V1}","seq":1,"written_at":0,"crc32":{},"body":{}}}"#,
            crc32fast::hash(body.as_bytes()),
            serde_json::to_string(body).unwrap()
        );
        fs::write(j.current_path(), wrong).unwrap();
        let e = j.current().unwrap_err();
        assert!(e.to_string().contains("not a valid record"), "{e}");
        let sealed = encode(IN_FLIGHT_FORMAT, 1, &serde_json::json!({"nope": true})).unwrap();
        fs::write(j.current_path(), sealed).unwrap();
        let e = j.current().unwrap_err();
        assert!(e.to_string().contains("content invalid"), "{e}");
    }

    #[test]
    fn crash_inside_finish_is_recovered_as_finished() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        j.write(&rec("u1", 1)).unwrap();
        let stale = fs::read(j.current_path()).unwrap();
        j.finish(&rec("u1", 2)).unwrap();
        // Simulate the crash: history written, current not yet removed.
        fs::write(j.current_path(), &stale).unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        assert_eq!(j.current().unwrap(), None);
        assert_eq!(j.history().unwrap(), vec![rec("u1", 2)]);
        // A new upgrade after that gets a higher sequence and is current.
        assert_eq!(j.write(&rec("u2", 1)).unwrap(), 3);
        let j = Journal::<Rec>::open(dir.path()).unwrap();
        assert_eq!(j.current().unwrap(), Some(rec("u2", 1)));
    }

    #[test]
    fn history_is_bounded_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        for i in 0..(HISTORY_LIMIT as u32 + 5) {
            j.finish(&rec("u", i)).unwrap();
        }
        let h = j.history().unwrap();
        assert_eq!(h.len(), HISTORY_LIMIT);
        assert_eq!(h[0].step, 5);
        assert_eq!(h.last().unwrap().step, HISTORY_LIMIT as u32 + 4);
        assert_eq!(
            fs::read_dir(dir.path().join("history")).unwrap().count(),
            HISTORY_LIMIT
        );
    }

    #[test]
    fn corrupt_history_entry_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        j.finish(&rec("u1", 1)).unwrap();
        let p = dir.path().join("history/00000000000000000001.json");
        fs::write(&p, b"{").unwrap();
        let e = j.history().unwrap_err();
        assert!(e.to_string().contains("00000000000000000001.json"), "{e}");
    }

    /// A record with a partial delta: `head` and the items appended since.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Items {
        head: u32,
        items: Vec<u32>,
    }

    #[derive(Serialize, Deserialize)]
    struct ItemsDelta {
        head: u32,
        from: usize,
        push: Vec<u32>,
    }

    impl Record for Items {
        type Delta = ItemsDelta;
        fn delta_from(&self, prev: &Self) -> Option<ItemsDelta> {
            let from = prev.items.len();
            (self.items.len() >= from && self.items[..from] == prev.items[..]).then(|| ItemsDelta {
                head: self.head,
                from,
                push: self.items[from..].to_vec(),
            })
        }
        fn apply(&mut self, d: ItemsDelta) -> Result<(), String> {
            if d.from != self.items.len() {
                return Err(format!("from {} of {}", d.from, self.items.len()));
            }
            self.head = d.head;
            self.items.extend(d.push);
            Ok(())
        }
    }

    fn items(head: u32, n: u32) -> Items {
        Items {
            head,
            items: (0..n).collect(),
        }
    }

    fn log_of(dir: &Path) -> PathBuf {
        dir.join(LOG)
    }

    fn lines(path: &Path) -> Vec<Vec<u8>> {
        fs::read(path)
            .unwrap_or_default()
            .split_inclusive(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect()
    }

    #[test]
    fn steps_are_appended_to_the_log_and_rebuild_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Items>::open(dir.path()).unwrap();
        assert_eq!(j.write(&items(1, 3)).unwrap(), 1);
        let base = fs::read(j.current_path()).unwrap();
        for step in 2..=6u32 {
            assert_eq!(j.write(&items(step, step + 2)).unwrap(), u64::from(step));
        }
        // journal.json is the first write; the log holds five frames of one item each.
        assert_eq!(fs::read(j.current_path()).unwrap(), base);
        let frames = lines(&log_of(dir.path()));
        assert_eq!(frames.len(), 5);
        let f: serde_json::Value = serde_json::from_slice(&frames[4]).unwrap();
        assert_eq!(f["format"], LOG_FORMAT);
        assert_eq!((f["seq"].as_u64(), f["base"].as_u64()), (Some(6), Some(1)));
        assert_eq!(f["delta"]["push"], serde_json::json!([7]));
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(log_of(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(j.current().unwrap(), Some(items(6, 8)));
        let ro = Journal::<Items>::open_read_only(dir.path()).unwrap();
        assert_eq!((ro.current().unwrap(), ro.seq()), (Some(items(6, 8)), 6));
        // A new writer (recovery) goes on appending after the last frame.
        let mut j = Journal::<Items>::open(dir.path()).unwrap();
        assert_eq!(j.seq(), 6);
        assert_eq!(j.write(&items(7, 9)).unwrap(), 7);
        assert_eq!(lines(&log_of(dir.path())).len(), 6);
        assert_eq!(j.current().unwrap(), Some(items(7, 9)));
        // A change the delta cannot say is written whole, and drops the log.
        assert_eq!(j.write(&items(8, 2)).unwrap(), 8);
        assert!(!log_of(dir.path()).exists());
        assert_eq!(j.current().unwrap(), Some(items(8, 2)));
        j.write(&items(9, 3)).unwrap();
        j.finish(&items(10, 3)).unwrap();
        assert!(!j.current_path().exists() && !log_of(dir.path()).exists());
        assert_eq!(j.history().unwrap(), vec![items(10, 3)]);
    }

    #[test]
    fn the_log_is_folded_into_journal_json_once_it_outgrows_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Items>::open(dir.path()).unwrap();
        // A large record (about 100 KiB): the log grows up to its size, then starts over.
        let mut r = items(0, 20_000);
        j.write(&r).unwrap();
        let mut wholes = 0;
        for step in 1..=3000u32 {
            r.head = step;
            r.items.push(step);
            let before = fs::metadata(j.current_path()).unwrap().modified().unwrap();
            let base_len = fs::metadata(j.current_path()).unwrap().len();
            j.write(&r).unwrap();
            let log_len = fs::metadata(log_of(dir.path())).map_or(0, |m| m.len());
            assert!(log_len <= LOG_FLOOR.max(base_len), "{log_len} > {base_len}");
            if log_len == 0 {
                wholes += 1;
                assert_ne!(
                    fs::metadata(j.current_path()).unwrap().modified().unwrap(),
                    before
                );
            }
        }
        assert!(
            (1..=3).contains(&wholes),
            "{wholes} whole writes in 3000 steps"
        );
        assert_eq!(j.current().unwrap(), Some(r.clone()));
        assert_eq!(
            Journal::<Items>::open(dir.path())
                .unwrap()
                .current()
                .unwrap(),
            Some(r)
        );
    }

    #[test]
    fn a_frame_cut_short_by_a_crash_is_ignored_and_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Items>::open(dir.path()).unwrap();
        for step in 1..=4 {
            j.write(&items(step, step)).unwrap();
        }
        let log = log_of(dir.path());
        let whole = fs::read(&log).unwrap();
        let last = lines(&log).pop().unwrap();
        for cut in [1, last.len() / 2, last.len() - 1] {
            let torn = &whole[..whole.len() - cut];
            fs::write(&log, torn).unwrap();
            // Readers see the record before the interrupted step.
            let ro = Journal::<Items>::open_read_only(dir.path()).unwrap();
            assert_eq!(ro.current().unwrap(), Some(items(3, 3)), "cut {cut}");
            assert_eq!(fs::read(&log).unwrap(), torn, "read-only left it as is");
        }
        // After a power cut the page holding the newline may reach the disk before the one
        // before it (zeros): a last line with a NUL in it was never whole either.
        let mut zeroed = whole.clone();
        let start = whole.len() - last.len();
        zeroed[start + 5..start + 30].fill(0);
        fs::write(&log, &zeroed).unwrap();
        let ro = Journal::<Items>::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.current().unwrap(), Some(items(3, 3)), "zeroed last line");
        // Not in an earlier line: that step was acknowledged, its loss is damage.
        let mut zeroed = whole.clone();
        zeroed[5..30].fill(0);
        fs::write(&log, &zeroed).unwrap();
        let ro = Journal::<Items>::open_read_only(dir.path()).unwrap();
        assert!(ro.current().unwrap_err().is_corrupt());
        fs::write(&log, &whole[..whole.len() - 3]).unwrap();
        // A writer cuts it off, and the next step follows step 3.
        let mut j = Journal::<Items>::open(dir.path()).unwrap();
        assert_eq!(fs::read(&log).unwrap(), &whole[..whole.len() - last.len()]);
        assert_eq!(j.seq(), 3);
        assert_eq!(j.write(&items(4, 5)).unwrap(), 4);
        assert_eq!(j.current().unwrap(), Some(items(4, 5)));
        assert!(j.quarantined().unwrap().is_empty());
    }

    #[test]
    fn a_damaged_frame_quarantines_the_journal_with_its_log() {
        for (frame, what) in [(0, "first"), (2, "last")] {
            let dir = tempfile::tempdir().unwrap();
            let mut j = Journal::<Items>::open(dir.path()).unwrap();
            for step in 1..=4 {
                j.write(&items(step, step)).unwrap();
            }
            let log = log_of(dir.path());
            let frames = lines(&log);
            let at = frames[..frame].iter().map(Vec::len).sum::<usize>() + 20;
            let mut bad = fs::read(&log).unwrap();
            bad[at] ^= 0x04;
            fs::write(&log, &bad).unwrap();
            let base = fs::read(j.current_path()).unwrap();

            let mut j = Journal::<Items>::open(dir.path()).unwrap();
            let e = j.current().unwrap_err();
            let JournalError::Corrupt { quarantined, .. } = &e else {
                panic!("{what}: {e}")
            };
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("journal.log frame {}", frame + 1)),
                "{msg}"
            );
            assert!(msg.contains("CRC-32"), "{msg}");
            // Both kept as they were, side by side; nothing left in place.
            assert_eq!(fs::read(&quarantined[0]).unwrap(), base, "{what}");
            assert_eq!(
                fs::read(with_suffix(&quarantined[0], LOG_SUFFIX)).unwrap(),
                bad
            );
            assert_eq!(quarantined.len(), 1, "the log is not a second quarantine");
            assert!(!j.current_path().exists() && !log.exists());
            assert!(j.write(&items(9, 9)).unwrap_err().is_corrupt());
            // A read-only look says the same, from the files quarantined.
            let ro = Journal::<Items>::open_read_only(dir.path()).unwrap();
            assert!(
                ro.current()
                    .unwrap_err()
                    .to_string()
                    .contains("journal.log frame")
            );
            // Resolved: the next upgrade starts a new journal.json (not a frame of the old).
            let resolved = j.resolve_quarantined(&quarantined[0]).unwrap();
            assert_eq!(
                fs::read(with_suffix(&resolved, LOG_SUFFIX)).unwrap(),
                bad,
                "{what}"
            );
            assert_eq!(j.write(&items(9, 9)).unwrap(), 2);
            assert!(!log.exists());
            assert_eq!(j.current().unwrap(), Some(items(9, 9)));
        }
    }

    #[test]
    fn frames_of_an_older_journal_json_are_stale_and_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_of(dir.path());
        let mut j = Journal::<Items>::open(dir.path()).unwrap();
        for step in 1..=3 {
            j.write(&items(step, step)).unwrap();
        }
        let old_frames = fs::read(&log).unwrap();
        // A whole write (shrinking the list), and a crash before it removed the log.
        j.write(&items(4, 1)).unwrap();
        fs::write(&log, &old_frames).unwrap();
        let ro = Journal::<Items>::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.current().unwrap(), Some(items(4, 1)));
        // Beside another journal.json of the same number (one written after the first was
        // quarantined without its log): stale too, by its CRC-32.
        let other = tempfile::tempdir().unwrap();
        let mut o = Journal::<Items>::open(other.path()).unwrap();
        o.write(&items(7, 0)).unwrap();
        fs::write(log_of(other.path()), &old_frames).unwrap();
        assert_eq!(o.current().unwrap(), Some(items(7, 0)));
        let mut j = Journal::<Items>::open(dir.path()).unwrap();
        assert_eq!(fs::read(&log).unwrap(), b"", "the stale frames are cut off");
        assert_eq!(j.write(&items(5, 2)).unwrap(), 5);
        assert_eq!(j.current().unwrap(), Some(items(5, 2)));
        // A crash in `finish` after it removed journal.json: the log is removed at open.
        let frames = fs::read(&log).unwrap();
        j.finish(&items(6, 2)).unwrap();
        fs::write(&log, frames).unwrap();
        assert_eq!(
            Journal::<Items>::open_read_only(dir.path())
                .unwrap()
                .current()
                .unwrap(),
            None
        );
        let j = Journal::<Items>::open(dir.path()).unwrap();
        assert!(!log.exists());
        assert_eq!(j.current().unwrap(), None);
    }

    #[test]
    fn frames_out_of_order_or_that_do_not_fit_are_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Items>::open(dir.path()).unwrap();
        for step in 1..=3 {
            j.write(&items(step, step)).unwrap();
        }
        let log = log_of(dir.path());
        let f = lines(&log);
        let base = Base::of(1, &fs::read(j.current_path()).unwrap());
        let frame = |seq: u64, seq_of_base: u64, from: usize| {
            seal::seal_line(&FrameOut {
                format: LOG_FORMAT,
                seq,
                base: seq_of_base,
                base_crc32: base.crc32,
                written_at: 0,
                delta: &ItemsDelta {
                    head: 9,
                    from,
                    push: vec![9],
                },
            })
            .unwrap()
        };
        let cases: [(Vec<u8>, &str); 4] = [
            (
                [f[1].clone(), f[0].clone()].concat(),
                "sequence number is 3, the next one is 2",
            ),
            (
                [f[0].clone(), frame(3, 2, 2)].concat(),
                "applies to journal.json number 2",
            ),
            (
                [f[0].clone(), f[1].clone(), frame(4, 1, 7)].concat(),
                "does not apply",
            ),
            (
                [f[0].clone(), f[0].clone()].concat(),
                "sequence number is 2, the next one is 3",
            ),
        ];
        for (bytes, want) in cases {
            let mut rec = items(1, 1);
            let e = replay(&mut rec, base, &bytes).unwrap_err();
            assert!(e.contains(want), "{e} lacks {want:?}");
        }
        // The real journal refuses such a log too (quarantined).
        fs::write(&log, [f[1].clone(), f[0].clone()].concat()).unwrap();
        assert!(j.current().unwrap_err().is_corrupt());
    }

    #[test]
    fn a_quarantine_never_loses_the_log_nor_reuses_a_name_with_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Items>::open(dir.path()).unwrap();
        j.write(&items(1, 1)).unwrap();
        j.write(&items(2, 2)).unwrap();
        let log = log_of(dir.path());
        let frames = fs::read(&log).unwrap();
        // Interrupted where a file system without hard links leaves it: journal.json renamed
        // to its quarantined name, the log not yet beside it. Open keeps the log there.
        let q = dir.path().join(format!("{QUARANTINE_PREFIX}1000"));
        fs::rename(j.current_path(), &q).unwrap();
        let j = Journal::<Items>::open(dir.path()).unwrap();
        assert!(!log.exists());
        assert_eq!(fs::read(with_suffix(&q, LOG_SUFFIX)).unwrap(), frames);
        assert_eq!(j.quarantined().unwrap(), vec![q.clone()]);
        // Resolved by hand (`mv`): its log stays under the old name, which is then not free
        // for the next quarantine.
        fs::rename(&q, with_suffix(&q, RESOLVED_SUFFIX)).unwrap();
        let mut j = Journal::<Items>::open(dir.path()).unwrap();
        j.write(&items(3, 3)).unwrap();
        j.write(&items(4, 4)).unwrap();
        let now = time::now_unix();
        let taken: Vec<PathBuf> = (now..now + 3)
            .map(|t| dir.path().join(format!("{QUARANTINE_PREFIX}{t}")))
            .collect();
        for t in &taken {
            fs::write(with_suffix(t, LOG_SUFFIX), b"an old log").unwrap();
        }
        let dest = j.quarantine_current().unwrap().unwrap();
        assert!(!taken.contains(&dest), "{}", dest.display());
        assert!(
            fs::read(with_suffix(&dest, LOG_SUFFIX))
                .unwrap()
                .ends_with(b"\n")
        );
        for t in &taken {
            assert_eq!(fs::read(with_suffix(t, LOG_SUFFIX)).unwrap(), b"an old log");
        }
    }

    #[test]
    fn a_sequence_number_that_cannot_grow_is_refused_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::<Items>::open(dir.path()).unwrap();
        fs::write(
            j.current_path(),
            encode(IN_FLIGHT_FORMAT, u64::MAX, &items(1, 1)).unwrap(),
        )
        .unwrap();
        let mut j2 = Journal::<Items>::open(dir.path()).unwrap();
        assert_eq!(j2.current().unwrap(), Some(items(1, 1)));
        assert!(j2.write(&items(2, 2)).unwrap_err().is_corrupt());
        assert!(j2.finish(&items(2, 2)).unwrap_err().is_corrupt());
        let _ = j.current();
    }

    #[test]
    fn the_in_flight_record_says_it_has_a_log_and_history_stays_readable_by_older_versions() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Items>::open(dir.path()).unwrap();
        j.write(&items(1, 1)).unwrap();
        j.write(&items(2, 2)).unwrap();
        let format = |p: &Path| {
            serde_json::from_slice::<serde_json::Value>(&fs::read(p).unwrap()).unwrap()["format"]
                .clone()
        };
        assert_eq!(format(&j.current_path()), IN_FLIGHT_FORMAT);
        // What a version without the log does with it (it reads the previous format only):
        // refused as another version's, not taken without its last step.
        let old = seal::read::<Envelope<Items>, EnvelopeV1>(
            &fs::read(j.current_path()).unwrap(),
            JOURNAL_FORMAT,
            JOURNAL_FORMAT_V1,
        );
        assert!(matches!(old, Err(Refusal::Foreign(f)) if f == IN_FLIGHT_FORMAT));
        j.finish(&items(3, 3)).unwrap();
        let entry = dir
            .path()
            .join(HISTORY)
            .join(format!("{:020}.json", j.seq()));
        assert_eq!(format(&entry), JOURNAL_FORMAT);
        // An in-flight record of the previous format (an earlier version's) is read, and
        // the next write rewrites it whole in this format rather than log beside it.
        fs::write(
            j.current_path(),
            encode(JOURNAL_FORMAT, 9, &items(4, 4)).unwrap(),
        )
        .unwrap();
        let mut j = Journal::<Items>::open(dir.path()).unwrap();
        assert_eq!(j.current().unwrap(), Some(items(4, 4)));
        j.write(&items(5, 5)).unwrap();
        assert!(!log_of(dir.path()).exists());
        assert_eq!(format(&j.current_path()), IN_FLIGHT_FORMAT);
        j.write(&items(6, 6)).unwrap();
        assert!(log_of(dir.path()).exists());
        assert_eq!(j.current().unwrap(), Some(items(6, 6)));
    }

    #[test]
    fn a_failed_append_makes_the_next_write_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Items>::open(dir.path()).unwrap();
        j.write(&items(1, 1)).unwrap();
        j.write(&items(2, 2)).unwrap();
        let log = log_of(dir.path());
        fs::remove_file(&log).unwrap();
        fs::create_dir(&log).unwrap();
        assert!(j.write(&items(3, 3)).is_err());
        fs::remove_dir(&log).unwrap();
        // Whole: journal.json now holds step 3 (its log was lost with the directory).
        assert_eq!(j.write(&items(3, 3)).unwrap(), 3);
        assert!(!log.exists());
        assert_eq!(j.current().unwrap(), Some(items(3, 3)));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_log_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let base = Base { seq: 1, crc32: 7 };
            let _ = replay(&mut items(1, 1), base, &bytes);
            let mut lines = br#"{"format":"mk-upgrade-journal-log/1","seq":2,"base":1,"delta":"#.to_vec();
            lines.extend_from_slice(&bytes);
            let _ = replay(&mut items(1, 1), base, &lines);
        }

        /// A changed byte anywhere in the log is refused, except the last frame's newline
        /// or a NUL in the last frame, which make it a frame a crash cut short: the record
        /// is then the one before that step, never another one.
        #[test]
        fn any_changed_byte_of_the_log_is_damage_or_drops_only_the_last_step(pos in 0usize..4096, value in 0u8..=255) {
            let mut r = items(1, 1);
            let mut log = Vec::new();
            let mut prev = r.clone();
            for step in 2..=4u64 {
                let next = items(step as u32, step as u32);
                log.extend(seal::seal_line(&FrameOut {
                    format: LOG_FORMAT, seq: step, base: 1, base_crc32: 7, written_at: 7,
                    delta: &next.delta_from(&prev).unwrap(),
                }).unwrap());
                prev = next;
            }
            let pos = pos % log.len();
            proptest::prop_assume!(log[pos] != value);
            let mut bad = log.clone();
            bad[pos] = value;
            match replay(&mut r, Base { seq: 1, crc32: 7 }, &bad) {
                Err(_) => {}
                Ok(got) => {
                    // The last frame's newline, or a NUL put inside the last frame.
                    let last_start = log[..log.len() - 1].iter().rposition(|&b| b == b'\n').unwrap() + 1;
                    proptest::prop_assert!(pos == log.len() - 1 || (value == 0 && pos >= last_start));
                    proptest::prop_assert_eq!(got.seq, 3);
                    proptest::prop_assert_eq!(r, items(3, 3));
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode::<Rec>(Path::new("journal.json"), &bytes);
        }

        #[test]
        fn any_single_byte_change_is_detected(pos in 0usize..4096, value in 0u8..=255) {
            let good = encode(IN_FLIGHT_FORMAT, 3, &rec("upgrade-1234", 7)).unwrap();
            let pos = pos % good.len();
            let mut bad = good.clone();
            proptest::prop_assume!(bad[pos] != value);
            bad[pos] = value;
            // Every byte is covered, `seq` and whitespace included: always refused.
            let r = decode::<Rec>(Path::new("journal.json"), &bad);
            let corrupt = matches!(r, Err(JournalError::Corrupt { .. }));
            proptest::prop_assert!(corrupt, "byte {} set to {} was not refused", pos, value);
        }
    }
}
