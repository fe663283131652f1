//! The upgrade journal: the in-flight upgrade record plus a bounded history.
//!
//! Layout under the state directory:
//! * `journal.json` — the in-flight record, present only while an upgrade is unfinished;
//! * `journal.json.corrupt-TIME` — a damaged in-flight record, quarantined (never deleted);
//!   while one exists (and is not renamed to `….resolved`), the journal refuses to report
//!   "no upgrade in flight" and refuses every write;
//! * `history/SEQ.json` — one file per finished upgrade (`SEQ` zero-padded to 20 digits), the
//!   newest [`HISTORY_LIMIT`] kept.
//!
//! Each file is a sealed envelope (see `crate::seal`): `{"format", "seq", "written_at",
//! "body", "crc32"}` where `body` is the caller's record and `crc32` covers every byte of the
//! file before it, so a torn or garbled file — including one flipped bit of `seq` — is
//! reported as [`JournalError::Corrupt`] instead of being trusted. `seq` increases with every
//! write across both places, which is what recovery uses to tell a finished upgrade from an
//! unfinished one (see [`Journal::open`]). Files of the previous format
//! ([`JOURNAL_FORMAT_V1`], whose checksum covered only the body) are still read.

use std::fs;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::atomic::{
    StateFile, atomic_write, ensure_dir, fsync_dir, read_state, remove_stale_temps,
};
use crate::seal::{self, Read, Refusal};
use crate::{IoError, time};

/// Format tag of journal and history files (sealed: the checksum covers the whole file).
pub const JOURNAL_FORMAT: &str = "mk-upgrade-journal/2";
/// The previous format (the checksum covers only `body`); still read, never written.
pub const JOURNAL_FORMAT_V1: &str = "mk-upgrade-journal/1";
/// How many finished upgrades the history keeps.
pub const HISTORY_LIMIT: usize = 100;
/// Suffix that marks a quarantined journal as resolved by the operator (it then no longer
/// blocks upgrades, and is kept for the record).
pub const RESOLVED_SUFFIX: &str = ".resolved";
/// Largest journal or history file read (a record is a few KiB; more is corruption).
const MAX_FILE: u64 = 4 << 20;
const CURRENT: &str = "journal.json";
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
        "{path}: journal format {found:?} is not {JOURNAL_FORMAT:?}: it was written by another \
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
        [] if is_current => format!(
            "the upgrade journal {p} is damaged ({reason}); it is kept as is. {unfinished} \
             Inspect it: `jq . {p}` (the record is its \"body\"; `cat -v {p}` if jq cannot \
             parse it). Resolve: {settle}, then move it aside: `mv {p} {p}{RESOLVED_SUFFIX}`",
            p = path.display()
        ),
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
            format!(
                "the upgrade journal {p} is damaged ({reason}) and was quarantined, not deleted: \
                 {q}{more}. {unfinished} Inspect it: `jq . {q}` (the record is its \"body\"; \
                 `cat -v {q}` if jq cannot parse it). Resolve: {settle}, then mark it resolved: \
                 `mv {q} {q}{RESOLVED_SUFFIX}`",
                p = path.display(),
                q = q.display()
            )
        }
    }
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

/// A decoded journal or history file.
struct Decoded<R> {
    seq: u64,
    record: R,
    /// Read from the previous format, whose `seq` was not covered by the checksum.
    legacy: bool,
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

fn encode<R: Serialize>(seq: u64, record: &R) -> Result<Vec<u8>, JournalError> {
    seal::seal(&EnvelopeOut {
        format: JOURNAL_FORMAT,
        seq,
        written_at: time::now_unix(),
        body: record,
    })
    .map_err(JournalError::Serialize)
}

fn decode<R: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<Decoded<R>, JournalError> {
    match seal::read::<Envelope<R>, EnvelopeV1>(bytes, JOURNAL_FORMAT, JOURNAL_FORMAT_V1) {
        Ok(Read::Current(env)) => Ok(Decoded {
            seq: env.seq,
            record: env.body,
            legacy: false,
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

/// Whether `name` is a quarantined journal that still blocks upgrades.
fn is_pending_quarantine(name: &str) -> bool {
    name.starts_with(QUARANTINE_PREFIX) && !name.ends_with(RESOLVED_SUFFIX)
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
    _record: PhantomData<fn() -> R>,
}

impl<R: Serialize + DeserializeOwned> Journal<R> {
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
    ///   resolves it ([`Journal::resolve_quarantined`], or renaming it to `….resolved`).
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
            StateFile::Missing => return Ok(journal),
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
            }
            Ok(d) if d.seq <= newest_history => {
                journal.quarantine_damaged(legacy_stale_reason(d.seq, newest_history));
            }
            Ok(d) => journal.seq = d.seq,
            Err(JournalError::Corrupt { reason, .. }) => {
                journal.quarantine_damaged(reason);
            }
            Err(JournalError::UnsupportedFormat { .. }) => journal.current_blocked = true,
            Err(e) => return Err(e),
        }
        Ok(journal)
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
            _record: PhantomData,
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
                Ok(d) => journal.seq = d.seq,
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
        let decoded = match read_state(&path, MAX_FILE)? {
            StateFile::Missing => None,
            StateFile::TooLarge { limit } => {
                return Err(self.damaged(format!("larger than the {limit}-byte limit")));
            }
            StateFile::Contents(_) if self.stale_current => None,
            StateFile::Contents(bytes) => match decode::<R>(&path, &bytes) {
                Ok(d) => Some(d.record),
                Err(JournalError::Corrupt { reason, .. }) => {
                    return Err(self.damaged(reason));
                }
                Err(e) => return Err(e),
            },
        };
        self.refuse_if_quarantined()?;
        Ok(decoded)
    }

    /// Records `record` as the in-flight upgrade (atomically replacing the previous record).
    /// Returns the sequence number written. Refused while a damaged or quarantined journal
    /// is unresolved, or the current file is of another format.
    pub fn write(&mut self, record: &R) -> Result<u64, JournalError> {
        self.check_writable()?;
        let seq = self.seq + 1;
        atomic_write(&self.current_path(), &encode(seq, record)?)?;
        self.seq = seq;
        Ok(seq)
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
        let seq = self.seq + 1;
        let history = self.dir.join(HISTORY);
        atomic_write(
            &history.join(format!("{seq:020}.json")),
            &encode(seq, record)?,
        )?;
        self.seq = seq;
        let current = self.current_path();
        match fs::remove_file(&current) {
            Ok(()) => fsync_dir(&self.dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(IoError::new("remove", &current, e).into()),
        }
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
        let mut name = q.file_name().unwrap_or_default().to_owned();
        name.push(RESOLVED_SUFFIX);
        let dest = q.with_file_name(name);
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
                Ok(_) => "quarantined earlier; it reads as an intact record now".into(),
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
    /// an existing file. `None` when there was no `journal.json` (or another process moved it
    /// first).
    fn move_aside(&self) -> Result<Option<PathBuf>, IoError> {
        let src = self.current_path();
        let base = format!("{QUARANTINE_PREFIX}{}", time::now_unix());
        for n in 0..10_000u32 {
            let dest = if n == 0 {
                self.dir.join(&base)
            } else {
                self.dir.join(format!("{base}-{n}"))
            };
            // A hard link, then the unlink: an existing quarantined file is never replaced
            // (rename(2) would), and a crash in between leaves both names, never none.
            match fs::hard_link(&src, &dest) {
                Ok(()) => {}
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
                    return Ok(Some(dest));
                }
                Err(_) => continue,
            }
            match fs::remove_file(&src) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(IoError::new("quarantine", &src, e)),
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
        assert_eq!(v["format"], JOURNAL_FORMAT);
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
        let sealed = encode(1, &serde_json::json!({"nope": true})).unwrap();
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

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode::<Rec>(Path::new("journal.json"), &bytes);
        }

        #[test]
        fn any_single_byte_change_is_detected(pos in 0usize..4096, value in 0u8..=255) {
            let good = encode(3, &rec("upgrade-1234", 7)).unwrap();
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
