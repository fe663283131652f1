//! Crash-safe upgrade bookkeeping for mk-upgrade: the journal, the apply lock, kernel image
//! slots (with the anti-downgrade version floor) and trial-boot records.
//!
//! Everything lives under one state directory (by default `/var/lib/mk-upgrade`); the layout,
//! file formats and the crash-safety argument are in `docs/rollback.md`. Every file is JSON
//! (auditable with `jq`) whose last member is a CRC-32 over every byte before it, so any
//! damaged byte is detected (the journal's log: every line). Every file but the journal's
//! log is written through [`atomic_write`]: write a temporary file (mode 0600) in the same
//! directory, fsync it, rename it over the target, fsync the directory; a reader therefore
//! sees either the old or the new content of a file, never a mix. The log is only appended
//! to, a line and an fdatasync per journaled step ([`journal`]). Directories are created with
//! mode 0700.
//!
//! The journal, slots and trial-boot records are single-writer: hold a [`LockGuard`] (from
//! [`Lock::acquire`]) while changing them.

mod atomic;
pub mod journal;
pub mod lock;
pub mod release;
mod seal;
pub mod slots;
pub mod time;
pub mod trial;

pub use atomic::{
    DIR_MODE, FILE_MODE, TMP_SUFFIX, atomic_write, atomic_write_with_mode, ensure_private_dir,
    fsync_dir, remove_stale_temps,
};
pub use journal::{HISTORY_LIMIT, Journal, JournalError, Record};
pub use lock::{Holder, HolderError, Lock, LockError, LockGuard};
pub use release::{Release, ReleaseError};
pub use slots::{Slot, SlotError, SlotInfo, Slots};
pub use trial::{BadMark, BootVerdict, TrialAttempt, TrialBoots, TrialError};

use std::path::PathBuf;

/// An I/O failure on a named path; shared by the error types of this crate.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {path}: {source}")]
pub struct IoError {
    /// What was being done ("write", "rename", "fsync", ...).
    pub op: &'static str,
    /// The path it was done to.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    pub(crate) fn new(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IoError {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Serde for 32-byte digests as 64 lowercase hex digits.
pub(crate) mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.as_bytes(), &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}
