//! The upgrade journal: the in-flight upgrade record plus a bounded history.
//!
//! Layout under the state directory:
//! * `journal.json` — the in-flight record, present only while an upgrade is unfinished;
//! * `history/SEQ.json` — one file per finished upgrade (`SEQ` zero-padded to 20 digits), the
//!   newest [`HISTORY_LIMIT`] kept.
//!
//! Each file is an envelope `{"format", "seq", "written_at", "crc32", "body"}` where `body`
//! is the caller's record serialized as a JSON string and `crc32` is the CRC-32 (IEEE) of
//! exactly those UTF-8 bytes. The CRC is checked against the stored string, never against a
//! re-serialization, so a torn or garbled file is reported as [`JournalError::Corrupt`]
//! instead of being trusted. `seq` increases with every write across both places, which is
//! what recovery uses to tell a finished upgrade from an unfinished one (see [`Journal::open`]).

use std::fs;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::atomic::{atomic_write, ensure_dir, fsync_dir, read_optional, remove_stale_temps};
use crate::{IoError, time};

/// Format tag of journal and history files.
pub const JOURNAL_FORMAT: &str = "mk-upgrade-journal/1";
/// How many finished upgrades the history keeps.
pub const HISTORY_LIMIT: usize = 100;
/// Largest journal or history file read (a record is a few KiB; more is corruption).
const MAX_FILE: u64 = 4 << 20;
const CURRENT: &str = "journal.json";
const HISTORY: &str = "history";

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(
        "{path}: the upgrade journal is unreadable ({reason}). It may describe an upgrade that \
         did not finish: check the running kernel (`uname -r`) and `mk-upgrade status`, keep a \
         copy of the file, then move it aside (it is renamed to {name}.corrupt-TIME by \
         journal quarantine) so that upgrades can proceed"
    )]
    Corrupt {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error(
        "{path}: journal format {found:?} is not {JOURNAL_FORMAT:?}: it was written by another \
         mk-upgrade version; finish or recover with that version, or move the file aside"
    )]
    UnsupportedFormat { path: PathBuf, found: String },
    #[error("cannot serialize the journal record: {0}")]
    Serialize(#[source] serde_json::Error),
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: String,
    seq: u64,
    written_at: u64,
    crc32: u32,
    body: String,
}

/// A decoded journal or history file.
struct Decoded<R> {
    seq: u64,
    record: R,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> JournalError {
    JournalError::Corrupt {
        path: path.to_owned(),
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        reason: reason.into(),
    }
}

fn encode<R: Serialize>(seq: u64, record: &R) -> Result<Vec<u8>, JournalError> {
    let body = serde_json::to_string(record).map_err(JournalError::Serialize)?;
    let env = Envelope {
        format: JOURNAL_FORMAT.to_owned(),
        seq,
        written_at: time::now_unix(),
        crc32: crc32fast::hash(body.as_bytes()),
        body,
    };
    let mut out = serde_json::to_vec_pretty(&env).map_err(JournalError::Serialize)?;
    out.push(b'\n');
    Ok(out)
}

fn decode<R: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<Decoded<R>, JournalError> {
    if bytes.is_empty() {
        return Err(corrupt(path, "the file is empty"));
    }
    let env: Envelope = serde_json::from_slice(bytes)
        .map_err(|e| corrupt(path, format!("not a journal envelope: {e}")))?;
    if env.format != JOURNAL_FORMAT {
        return Err(JournalError::UnsupportedFormat {
            path: path.to_owned(),
            found: env.format.chars().take(80).collect(),
        });
    }
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
    })
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

/// The journal of one state directory; `R` is the caller's upgrade record.
///
/// Single-writer: hold the [`crate::Lock`] of the same directory while it is open.
#[derive(Debug)]
pub struct Journal<R> {
    dir: PathBuf,
    seq: u64,
    /// The current file failed to decode at open; writes are refused until it is quarantined.
    current_corrupt: bool,
    _record: PhantomData<fn() -> R>,
}

impl<R: Serialize + DeserializeOwned> Journal<R> {
    /// Opens (creating if needed) the journal in `dir` and performs crash recovery of the
    /// files themselves:
    /// * leftover `.*.tmp` files (a write that never became visible) are removed;
    /// * if `journal.json` has a sequence number not above the newest history entry, the
    ///   crash hit [`Journal::finish`] between writing history and removing the current
    ///   record: the upgrade did finish, and the stale current file is removed;
    /// * a corrupt `journal.json` is left in place; [`Journal::current`] reports it and
    ///   [`Journal::write`] refuses until [`Journal::quarantine_current`] moves it aside.
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        let history = dir.join(HISTORY);
        ensure_dir(&history)?;
        for d in [dir, history.as_path()] {
            for p in remove_stale_temps(d)? {
                tracing::warn!(path = %p.display(), "removed an interrupted journal write");
            }
        }
        let mut journal = Journal {
            dir: dir.to_owned(),
            seq: 0,
            current_corrupt: false,
            _record: PhantomData,
        };
        let newest_history = journal.history_seqs()?.last().copied().unwrap_or(0);
        journal.seq = newest_history;
        let current_path = journal.current_path();
        if let Some(bytes) = read_optional(&current_path, MAX_FILE)? {
            match decode::<serde_json::Value>(&current_path, &bytes) {
                Ok(d) if d.seq <= newest_history => {
                    tracing::warn!(
                        path = %current_path.display(),
                        "removing the record of an upgrade that already reached history"
                    );
                    fs::remove_file(&current_path)
                        .map_err(|e| IoError::new("remove", &current_path, e))?;
                    fsync_dir(dir)?;
                }
                Ok(d) => journal.seq = d.seq,
                Err(_) => journal.current_corrupt = true,
            }
        }
        Ok(journal)
    }

    /// Path of the in-flight record.
    pub fn current_path(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    /// The sequence number of the last write.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The in-flight upgrade record, if an upgrade is unfinished. A torn or garbled file is
    /// an error naming the file and what to do, never a silently ignored record.
    pub fn current(&self) -> Result<Option<R>, JournalError> {
        let path = self.current_path();
        match read_optional(&path, MAX_FILE)? {
            None => Ok(None),
            Some(bytes) => decode(&path, &bytes).map(|d| Some(d.record)),
        }
    }

    /// Records `record` as the in-flight upgrade (atomically replacing the previous record).
    /// Returns the sequence number written.
    pub fn write(&mut self, record: &R) -> Result<u64, JournalError> {
        let path = self.current_path();
        if self.current_corrupt {
            // Re-check: the operator may have moved the file aside by hand.
            match read_optional(&path, MAX_FILE)? {
                None => self.current_corrupt = false,
                Some(bytes) => {
                    decode::<serde_json::Value>(&path, &bytes)?;
                    self.current_corrupt = false;
                }
            }
        }
        let seq = self.seq + 1;
        atomic_write(&path, &encode(seq, record)?)?;
        self.seq = seq;
        Ok(seq)
    }

    /// Moves the final `record` of an upgrade into history and clears the in-flight record.
    /// Keeps the newest [`HISTORY_LIMIT`] history entries. Returns the sequence number.
    ///
    /// Crash-safe: history is written first (atomically), then the current file is removed.
    /// A crash in between leaves a current file whose sequence number is not above the
    /// history entry, which [`Journal::open`] recognizes and removes.
    pub fn finish(&mut self, record: &R) -> Result<u64, JournalError> {
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
        self.current_corrupt = false;
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

    /// Finished upgrades, oldest first. A corrupt history entry is an error naming its file.
    pub fn history(&self) -> Result<Vec<R>, JournalError> {
        let history = self.dir.join(HISTORY);
        let mut out = Vec::new();
        for seq in self.history_seqs()? {
            let path = history.join(format!("{seq:020}.json"));
            if let Some(bytes) = read_optional(&path, MAX_FILE)? {
                out.push(decode(&path, &bytes)?.record);
            }
        }
        Ok(out)
    }

    /// Renames a corrupt (or any) `journal.json` to `journal.json.corrupt-UNIXTIME` so that
    /// upgrades can proceed, keeping it for inspection. Returns the new path, or `None` when
    /// there was no current record.
    pub fn quarantine_current(&mut self) -> Result<Option<PathBuf>, JournalError> {
        let path = self.current_path();
        if !path.exists() {
            self.current_corrupt = false;
            return Ok(None);
        }
        let dest = self
            .dir
            .join(format!("{CURRENT}.corrupt-{}", time::now_unix()));
        fs::rename(&path, &dest).map_err(|e| IoError::new("move aside", &path, e))?;
        fsync_dir(&self.dir)?;
        self.current_corrupt = false;
        Ok(Some(dest))
    }

    fn history_seqs(&self) -> Result<Vec<u64>, IoError> {
        let history = self.dir.join(HISTORY);
        let mut seqs = Vec::new();
        for entry in fs::read_dir(&history).map_err(|e| IoError::new("list", &history, e))? {
            let entry = entry.map_err(|e| IoError::new("list", &history, e))?;
            if let Some(seq) = entry.file_name().to_str().and_then(history_seq) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        Ok(seqs)
    }
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
    fn truncated_journal_is_a_corrupt_error_and_blocks_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        j.write(&rec("u1", 1)).unwrap();
        let path = j.current_path();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();

        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        let e = j.current().unwrap_err();
        assert!(matches!(&e, JournalError::Corrupt { path: p, .. } if *p == path));
        let msg = e.to_string();
        assert!(
            msg.contains("journal.json") && msg.contains("uname -r"),
            "{msg}"
        );
        // Writing would destroy the evidence: refused.
        assert!(matches!(
            j.write(&rec("u2", 1)),
            Err(JournalError::Corrupt { .. })
        ));
        let moved = j.quarantine_current().unwrap().unwrap();
        assert_eq!(fs::read(&moved).unwrap(), &bytes[..bytes.len() / 2]);
        j.write(&rec("u2", 1)).unwrap();
        assert_eq!(j.current().unwrap(), Some(rec("u2", 1)));
    }

    #[test]
    fn garbled_body_fails_the_crc() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        j.write(&rec("upgrade-7", 1)).unwrap();
        let path = j.current_path();
        let text = fs::read_to_string(&path).unwrap();
        // Still valid JSON, but the body differs from what was checksummed.
        let garbled = text.replace("upgrade-7", "upgrade-8");
        assert_ne!(text, garbled);
        fs::write(&path, garbled).unwrap();
        let e = j.current().unwrap_err();
        assert!(e.to_string().contains("CRC-32"), "{e}");
    }

    #[test]
    fn empty_and_foreign_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::<Rec>::open(dir.path()).unwrap();
        fs::write(j.current_path(), b"").unwrap();
        assert!(matches!(j.current(), Err(JournalError::Corrupt { .. })));
        let body = r#"{"id":"x","step":1}"#;
        let other = format!(
            r#"{{"format":"mk-upgrade-journal/9","seq":1,"written_at":0,"crc32":{},"body":{}}}"#,
            crc32fast::hash(body.as_bytes()),
            serde_json::to_string(body).unwrap()
        );
        fs::write(j.current_path(), other).unwrap();
        assert!(matches!(
            j.current(),
            Err(JournalError::UnsupportedFormat { .. })
        ));
        // Valid envelope, body of the wrong shape.
        let body = r#"{"nope":true}"#;
        let wrong = format!(
            r#"{{"format":"{JOURNAL_FORMAT}","seq":1,"written_at":0,"crc32":{},"body":{}}}"#,
            crc32fast::hash(body.as_bytes()),
            serde_json::to_string(body).unwrap()
        );
        fs::write(j.current_path(), wrong).unwrap();
        let e = j.current().unwrap_err();
        assert!(e.to_string().contains("not a valid record"), "{e}");
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
        fn any_single_byte_change_is_detected(pos in 0usize..4096, bit in 0u8..8) {
            let good = encode(3, &rec("upgrade-1234", 7)).unwrap();
            let pos = pos % good.len();
            let mut bad = good.clone();
            bad[pos] ^= 1 << bit;
            // Either refused, or the change hit envelope metadata (seq, written_at,
            // whitespace) and the record itself is unchanged.
            if let Ok(d) = decode::<Rec>(Path::new("journal.json"), &bad) {
                proptest::prop_assert_eq!(d.record, rec("upgrade-1234", 7));
            }
        }
    }
}
