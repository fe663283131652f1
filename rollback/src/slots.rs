//! Kernel image slots and the anti-downgrade version floor.
//!
//! Layout under `STATE_DIR/slots/`:
//! * `images/SHA256.bzImage` — stored kernel images, content-addressed and never modified;
//! * `slots.json` — which image fills which [`Slot`] (current, previous, candidate);
//! * `floor.json` — the version floor: releases numerically below it are refused.
//!
//! Storing writes the image first and then the table, each atomically; promotion and
//! rollback only rewrite the table. A crash therefore leaves either the old or the new table,
//! plus at worst an unreferenced image, which is removed the next time the table is written.
//! Every [`Slots::get`] re-hashes the image, so a damaged known-good kernel is reported as
//! [`SlotError::ImageCorrupt`] before anything boots it.

use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::atomic::{atomic_write, ensure_dir, fsync_dir, read_optional, remove_stale_temps};
use crate::release::{Release, ReleaseError};
use crate::{IoError, time};

/// Format tag of `slots.json`.
pub const SLOTS_FORMAT: &str = "mk-upgrade-slots/1";
/// Format tag of `floor.json`.
pub const FLOOR_FORMAT: &str = "mk-upgrade-floor/1";
/// Largest kernel image a slot accepts (bzImages are tens of MiB).
pub const MAX_IMAGE: u64 = 1 << 30;
const MAX_TABLE: u64 = 64 << 10;

/// Opens a slot's image; a missing file is [`SlotError::ImageMissing`].
fn open_image(role: Slot, info: &SlotInfo) -> Result<fs::File, SlotError> {
    fs::File::open(&info.path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            SlotError::ImageMissing {
                role,
                path: info.path.clone(),
            }
        } else {
            IoError::new("open", &info.path, e).into()
        }
    })
}

/// Checks a recomputed SHA-256 against the slot's record.
fn expect_digest(role: Slot, info: &SlotInfo, actual: [u8; 32]) -> Result<(), SlotError> {
    if actual == info.sha256 {
        return Ok(());
    }
    Err(SlotError::ImageCorrupt {
        role,
        path: info.path.clone(),
        expected: hex::encode(info.sha256),
        actual: hex::encode(actual),
    })
}

/// A kernel slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// The kernel the host runs (or runs after the upgrade in progress).
    Current,
    /// The known-good kernel kept for rollback.
    Previous,
    /// A verified image waiting to be booted.
    Candidate,
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::Current => "current",
            Slot::Previous => "previous",
            Slot::Candidate => "candidate",
        })
    }
}

/// Why a slot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{path}: unreadable slot state ({reason}); move it aside and store the kernels again")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "the {role} kernel image {path} has SHA-256 {actual}, but {expected} was stored: the \
         stored kernel is damaged and must not be booted; store it again from a verified image"
    )]
    ImageCorrupt {
        role: Slot,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("the {role} kernel image {path} is missing; store it again from a verified image")]
    ImageMissing { role: Slot, path: PathBuf },
    #[error("refusing to store: the image has SHA-256 {actual}, the caller verified {expected}")]
    DigestMismatch { expected: String, actual: String },
    #[error("the image is {len} bytes, more than the {MAX_IMAGE}-byte limit for a kernel")]
    TooLarge { len: u64 },
    #[error("no {role} kernel is stored")]
    Empty { role: Slot },
    #[error(transparent)]
    Release(#[from] ReleaseError),
}

/// One filled slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// Kernel release (`uname -r` once booted).
    pub release: String,
    /// SHA-256 of the image.
    #[serde(with = "crate::hex32")]
    pub sha256: [u8; 32],
    /// The stored image.
    pub path: PathBuf,
    /// When it was stored (Unix seconds).
    pub stored_at: u64,
    /// Image size in bytes.
    pub len: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    release: String,
    #[serde(with = "crate::hex32")]
    sha256: [u8; 32],
    stored_at: u64,
    len: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Table {
    format: String,
    current: Option<Entry>,
    previous: Option<Entry>,
    candidate: Option<Entry>,
}

impl Table {
    fn slot(&mut self, role: Slot) -> &mut Option<Entry> {
        match role {
            Slot::Current => &mut self.current,
            Slot::Previous => &mut self.previous,
            Slot::Candidate => &mut self.candidate,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Floor {
    format: String,
    release: String,
    raised_at: u64,
}

/// The slot store of one state directory. Single-writer: hold the [`crate::Lock`].
#[derive(Debug)]
pub struct Slots {
    dir: PathBuf,
}

impl Slots {
    /// Opens (creating if needed) `STATE_DIR/slots`, removing interrupted writes.
    pub fn open(state_dir: &Path) -> Result<Self, SlotError> {
        let dir = state_dir.join("slots");
        ensure_dir(&dir.join("images"))?;
        remove_stale_temps(&dir)?;
        remove_stale_temps(&dir.join("images"))?;
        Ok(Slots { dir })
    }

    fn table_path(&self) -> PathBuf {
        self.dir.join("slots.json")
    }

    fn image_path(&self, sha256: &[u8; 32]) -> PathBuf {
        self.dir
            .join("images")
            .join(format!("{}.bzImage", hex::encode(sha256)))
    }

    fn read_table(&self) -> Result<Table, SlotError> {
        let path = self.table_path();
        let Some(bytes) = read_optional(&path, MAX_TABLE)? else {
            return Ok(Table {
                format: SLOTS_FORMAT.to_owned(),
                current: None,
                previous: None,
                candidate: None,
            });
        };
        let table: Table = serde_json::from_slice(&bytes).map_err(|e| SlotError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if table.format != SLOTS_FORMAT {
            return Err(SlotError::Corrupt {
                path,
                reason: format!("format {:?} is not {SLOTS_FORMAT:?}", table.format),
            });
        }
        Ok(table)
    }

    fn write_table(&self, table: &Table) -> Result<(), SlotError> {
        let mut bytes = serde_json::to_vec_pretty(table).expect("slot table serializes");
        bytes.push(b'\n');
        atomic_write(&self.table_path(), &bytes)?;
        self.collect_garbage(table)
    }

    /// Removes images no slot refers to (left by a crash or by promotion).
    fn collect_garbage(&self, table: &Table) -> Result<(), SlotError> {
        let keep: Vec<PathBuf> = [&table.current, &table.previous, &table.candidate]
            .into_iter()
            .flatten()
            .map(|e| self.image_path(&e.sha256))
            .collect();
        let images = self.dir.join("images");
        let mut removed = false;
        for entry in fs::read_dir(&images).map_err(|e| IoError::new("list", &images, e))? {
            let p = entry.map_err(|e| IoError::new("list", &images, e))?.path();
            if p.extension().is_some_and(|x| x == "bzImage") && !keep.contains(&p) {
                fs::remove_file(&p).map_err(|e| IoError::new("remove unused image", &p, e))?;
                removed = true;
            }
        }
        if removed {
            fsync_dir(&images)?;
        }
        Ok(())
    }

    fn info(&self, e: &Entry) -> SlotInfo {
        SlotInfo {
            release: e.release.clone(),
            sha256: e.sha256,
            path: self.image_path(&e.sha256),
            stored_at: e.stored_at,
            len: e.len,
        }
    }

    /// Stores `image` (whose SHA-256 the caller verified as `sha256`) in slot `role`,
    /// replacing what was there. The digest is recomputed and must match.
    pub fn store(
        &mut self,
        role: Slot,
        image: &[u8],
        release: &str,
        sha256: &[u8; 32],
    ) -> Result<SlotInfo, SlotError> {
        Release::parse(release)?;
        if image.len() as u64 > MAX_IMAGE {
            return Err(SlotError::TooLarge {
                len: image.len() as u64,
            });
        }
        let actual: [u8; 32] = Sha256::digest(image).into();
        if actual != *sha256 {
            return Err(SlotError::DigestMismatch {
                expected: hex::encode(sha256),
                actual: hex::encode(actual),
            });
        }
        atomic_write(&self.image_path(sha256), image)?;
        let entry = Entry {
            release: release.to_owned(),
            sha256: *sha256,
            stored_at: time::now_unix(),
            len: image.len() as u64,
        };
        let info = self.info(&entry);
        let mut table = self.read_table()?;
        *table.slot(role) = Some(entry);
        self.write_table(&table)?;
        Ok(info)
    }

    /// Like [`Slots::store`], reading the image from `path`.
    pub fn store_file(
        &mut self,
        role: Slot,
        path: &Path,
        release: &str,
        sha256: &[u8; 32],
    ) -> Result<SlotInfo, SlotError> {
        let f = fs::File::open(path).map_err(|e| IoError::new("open", path, e))?;
        let mut image = Vec::new();
        f.take(MAX_IMAGE + 1)
            .read_to_end(&mut image)
            .map_err(|e| IoError::new("read", path, e))?;
        self.store(role, &image, release, sha256)
    }

    /// The slot's metadata without re-hashing the image (for status displays).
    pub fn peek(&self, role: Slot) -> Result<Option<SlotInfo>, SlotError> {
        Ok(self.read_table()?.slot(role).as_ref().map(|e| self.info(e)))
    }

    /// The slot, after re-hashing its image: a damaged or missing image is an error.
    pub fn get(&self, role: Slot) -> Result<Option<SlotInfo>, SlotError> {
        let Some(info) = self.peek(role)? else {
            return Ok(None);
        };
        let mut hasher = Sha256::new();
        let mut f = open_image(role, &info)?.take(MAX_IMAGE + 1);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| IoError::new("read", &info.path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        expect_digest(role, &info, hasher.finalize().into())?;
        Ok(Some(info))
    }

    /// Reads the slot's image once and checks the SHA-256 of exactly the bytes returned, so
    /// the caller boots what was verified (use this, not [`Slots::get`] followed by a
    /// second read of [`SlotInfo::path`]).
    pub fn read(&self, role: Slot) -> Result<Option<(SlotInfo, Vec<u8>)>, SlotError> {
        let Some(info) = self.peek(role)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        open_image(role, &info)?
            .take(info.len.min(MAX_IMAGE) + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| IoError::new("read", &info.path, e))?;
        expect_digest(role, &info, Sha256::digest(&bytes).into())?;
        Ok(Some((info, bytes)))
    }

    /// Empties a slot.
    pub fn clear(&mut self, role: Slot) -> Result<(), SlotError> {
        let mut table = self.read_table()?;
        if table.slot(role).take().is_some() {
            self.write_table(&table)?;
        }
        Ok(())
    }

    /// After a successful upgrade: candidate becomes current, current becomes previous (the
    /// known-good kernel for rollback); the old previous is dropped. Returns the new current.
    pub fn promote_candidate(&mut self) -> Result<SlotInfo, SlotError> {
        let mut table = self.read_table()?;
        let candidate = table.candidate.take().ok_or(SlotError::Empty {
            role: Slot::Candidate,
        })?;
        table.previous = table.current.take();
        let info = self.info(&candidate);
        table.current = Some(candidate);
        self.write_table(&table)?;
        Ok(info)
    }

    /// For a rollback: previous and current trade places, so the known-good kernel is
    /// current again and the abandoned one is kept as previous (a later rollback of the
    /// rollback can return to it). Returns the new current.
    pub fn swap_for_rollback(&mut self) -> Result<SlotInfo, SlotError> {
        let mut table = self.read_table()?;
        let previous = table.previous.take().ok_or(SlotError::Empty {
            role: Slot::Previous,
        })?;
        table.previous = table.current.take();
        let info = self.info(&previous);
        table.current = Some(previous);
        self.write_table(&table)?;
        Ok(info)
    }

    /// The version floor, if one was raised.
    pub fn floor(&self) -> Result<Option<String>, SlotError> {
        let path = self.dir.join("floor.json");
        let Some(bytes) = read_optional(&path, MAX_TABLE)? else {
            return Ok(None);
        };
        let floor: Floor = serde_json::from_slice(&bytes).map_err(|e| SlotError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if floor.format != FLOOR_FORMAT {
            return Err(SlotError::Corrupt {
                path,
                reason: format!("format {:?} is not {FLOOR_FORMAT:?}", floor.format),
            });
        }
        Release::parse(&floor.release).map_err(|e| SlotError::Corrupt {
            path,
            reason: e.to_string(),
        })?;
        Ok(Some(floor.release))
    }

    /// Raises the floor to `release`; never lowers it. Returns whether it changed (a release
    /// numerically equal to the floor does not change it).
    pub fn raise_floor(&mut self, release: &str) -> Result<bool, SlotError> {
        let new = Release::parse(release)?;
        if let Some(old) = self.floor()? {
            if !Release::parse(&old)?.is_below(&new) {
                return Ok(false);
            }
        }
        let floor = Floor {
            format: FLOOR_FORMAT.to_owned(),
            release: release.to_owned(),
            raised_at: time::now_unix(),
        };
        let mut bytes = serde_json::to_vec_pretty(&floor).expect("floor serializes");
        bytes.push(b'\n');
        atomic_write(&self.dir.join("floor.json"), &bytes)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(tag: u8) -> (Vec<u8>, [u8; 32]) {
        let v = vec![tag; 4096];
        let d = Sha256::digest(&v).into();
        (v, d)
    }

    #[test]
    fn store_get_promote_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Slots::open(dir.path()).unwrap();
        let (a, da) = img(b'a');
        let (b, db) = img(b'b');
        s.store(Slot::Current, &a, "7.2.13-mkA", &da).unwrap();
        s.store(Slot::Candidate, &b, "7.2.13-mkB", &db).unwrap();
        assert_eq!(
            s.get(Slot::Candidate).unwrap().unwrap().release,
            "7.2.13-mkB"
        );
        assert_eq!(s.promote_candidate().unwrap().release, "7.2.13-mkB");
        assert!(s.get(Slot::Candidate).unwrap().is_none());
        let prev = s.get(Slot::Previous).unwrap().unwrap();
        assert_eq!(prev.release, "7.2.13-mkA");
        assert_eq!(fs::read(&prev.path).unwrap(), a);
        let (info, bytes) = s.read(Slot::Previous).unwrap().unwrap();
        assert_eq!((info, bytes), (prev, a.clone()));
        // Reopen: state persisted.
        let mut s = Slots::open(dir.path()).unwrap();
        assert_eq!(s.swap_for_rollback().unwrap().release, "7.2.13-mkA");
        assert_eq!(
            s.get(Slot::Previous).unwrap().unwrap().release,
            "7.2.13-mkB"
        );
        assert!(matches!(
            s.promote_candidate(),
            Err(SlotError::Empty {
                role: Slot::Candidate
            })
        ));
    }

    #[test]
    fn unreferenced_images_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let mut slots = Slots::open(dir.path()).unwrap();
        let first = img(1);
        slots
            .store(Slot::Current, &first.0, "7.0.0", &first.1)
            .unwrap();
        for (tag, release) in [(2, "7.0.1"), (3, "7.0.2")] {
            let next = img(tag);
            slots
                .store(Slot::Candidate, &next.0, release, &next.1)
                .unwrap();
            slots.promote_candidate().unwrap();
        }
        // The first image fell out of every slot.
        let n = fs::read_dir(dir.path().join("slots/images"))
            .unwrap()
            .count();
        assert_eq!(n, 2);
        assert!(!slots.image_path(&first.1).exists());
    }

    #[test]
    fn damaged_or_missing_image_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Slots::open(dir.path()).unwrap();
        let (a, da) = img(b'a');
        let info = s.store(Slot::Previous, &a, "7.2.13-mkA", &da).unwrap();
        let mut bytes = fs::read(&info.path).unwrap();
        bytes[100] ^= 1;
        fs::write(&info.path, &bytes).unwrap();
        let e = s.get(Slot::Previous).unwrap_err();
        assert!(
            matches!(
                e,
                SlotError::ImageCorrupt {
                    role: Slot::Previous,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(&hex::encode(da)));
        // peek does not hash.
        assert!(s.peek(Slot::Previous).unwrap().is_some());
        assert!(matches!(
            s.read(Slot::Previous),
            Err(SlotError::ImageCorrupt { .. })
        ));
        // Appended bytes are caught too.
        bytes[100] ^= 1;
        bytes.push(0);
        fs::write(&info.path, &bytes).unwrap();
        assert!(matches!(
            s.read(Slot::Previous),
            Err(SlotError::ImageCorrupt { .. })
        ));
        fs::remove_file(&info.path).unwrap();
        assert!(matches!(
            s.get(Slot::Previous),
            Err(SlotError::ImageMissing { .. })
        ));
        assert!(matches!(
            s.read(Slot::Previous),
            Err(SlotError::ImageMissing { .. })
        ));
    }

    #[test]
    fn store_refuses_wrong_digest_and_bad_release() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Slots::open(dir.path()).unwrap();
        let (a, _) = img(b'a');
        let (_, db) = img(b'b');
        assert!(matches!(
            s.store(Slot::Candidate, &a, "7.2.13", &db),
            Err(SlotError::DigestMismatch { .. })
        ));
        let (_, da) = img(b'a');
        assert!(matches!(
            s.store(Slot::Candidate, &a, "not a release", &da),
            Err(SlotError::Release(_))
        ));
        assert!(s.peek(Slot::Candidate).unwrap().is_none());
    }

    #[test]
    fn corrupt_table_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = Slots::open(dir.path()).unwrap();
        fs::write(s.table_path(), b"{\"format\":").unwrap();
        let e = s.peek(Slot::Current).unwrap_err();
        assert!(e.to_string().contains("slots.json"), "{e}");
    }

    #[test]
    fn floor_only_rises() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Slots::open(dir.path()).unwrap();
        assert_eq!(s.floor().unwrap(), None);
        assert!(s.raise_floor("7.2.10").unwrap());
        assert!(!s.raise_floor("7.2.9").unwrap());
        assert!(!s.raise_floor("7.2.10-other").unwrap());
        assert_eq!(s.floor().unwrap().as_deref(), Some("7.2.10"));
        assert!(s.raise_floor("7.3").unwrap());
        let s = Slots::open(dir.path()).unwrap();
        assert_eq!(s.floor().unwrap().as_deref(), Some("7.3"));
        let mut s = s;
        assert!(matches!(s.raise_floor("seven"), Err(SlotError::Release(_))));
    }
}
