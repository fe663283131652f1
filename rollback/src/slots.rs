//! Kernel image slots and the anti-downgrade version floor.
//!
//! Layout under `STATE_DIR/slots/`:
//! * `images/SHA256.bzImage` — stored kernel images, content-addressed and never modified;
//! * `slots.json` — which image fills which [`Slot`] (current, previous, candidate);
//! * `floor.json` — the version floor: releases numerically below it are refused, and
//!   [`Slots::read`] never hands out an image below it for booting (so a rollback cannot go
//!   below the floor either).
//!
//! Both tables are sealed (`crate::seal`): a CRC-32 over every byte of the file, so a
//! damaged table is [`SlotError::Corrupt`], never a different valid table. Tables of the
//! previous, unsealed formats ([`SLOTS_FORMAT_V1`], [`FLOOR_FORMAT_V1`]) are still read and
//! are rewritten sealed by the next write.
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

use crate::atomic::{
    StateFile, atomic_write, ensure_dir, fsync_dir, read_state, remove_stale_temps,
};
use crate::release::{Release, ReleaseError};
use crate::seal::{self, Read as SealRead, Refusal};
use crate::{IoError, time};

/// Format tag of `slots.json` (sealed).
pub const SLOTS_FORMAT: &str = "mk-upgrade-slots/2";
/// The previous, unsealed format of `slots.json`; still read, never written.
pub const SLOTS_FORMAT_V1: &str = "mk-upgrade-slots/1";
/// Format tag of `floor.json` (sealed).
pub const FLOOR_FORMAT: &str = "mk-upgrade-floor/2";
/// The previous, unsealed format of `floor.json`; still read, never written.
pub const FLOOR_FORMAT_V1: &str = "mk-upgrade-floor/1";
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
    /// `slots.json` or `floor.json` is damaged (kept as is; the message says what to do).
    #[error("{}", corrupt_message(.path, .reason))]
    Corrupt { path: PathBuf, reason: String },
    /// The image asked for is below the version floor: it is not handed out for booting.
    #[error(
        "the {role} kernel {release} is below the version floor {floor}: refusing to boot it \
         (the floor is never bypassed); to go back, apply a signed kernel at or above {floor}"
    )]
    BelowFloor {
        role: Slot,
        release: String,
        floor: String,
    },
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

impl SlotError {
    /// Whether this is damaged state: a damaged table ([`SlotError::Corrupt`]) or a damaged
    /// stored image ([`SlotError::ImageCorrupt`]).
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            SlotError::Corrupt { .. } | SlotError::ImageCorrupt { .. }
        )
    }
}

fn corrupt_message(path: &Path, reason: &str) -> String {
    let p = path.display();
    if path.file_name().is_some_and(|n| n == "floor.json") {
        format!(
            "the version floor {p} is damaged ({reason}); it is kept as is, and no kernel is \
             accepted or rolled back to while the floor is unknown. Inspect it: `jq . {p}` \
             (`cat -v {p}` if jq cannot parse it). Resolve: restore it from a backup or, knowing \
             the floor your signed images carry, move it aside (`mv {p} {p}.damaged`): the next \
             applied image that carries a floor raises it again"
        )
    } else {
        format!(
            "the kernel slot table {p} is damaged ({reason}); it is kept as is, and nothing \
             that needs the kernel slots (apply, rollback) proceeds until it is resolved. \
             Inspect it: `jq . {p}` (`cat -v {p}` if jq cannot parse it). Resolve: restore it \
             from a backup, or move it aside (`mv {p} {p}.damaged`): the next apply starts a new \
             table, with no previous kernel to roll back to until the upgrade after it"
        )
    }
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

    /// Opens `STATE_DIR/slots` for reading only (`status`), without the lock: nothing is
    /// created or removed, so a writer holding the lock (an upgrade promoting a slot) never
    /// loses its temporary file to a reader. Only the reading methods may be used.
    pub fn open_read_only(state_dir: &Path) -> Self {
        Slots {
            dir: state_dir.join("slots"),
        }
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
        let bytes = match read_state(&path, MAX_TABLE)? {
            StateFile::Missing => {
                return Ok(Table {
                    format: SLOTS_FORMAT.to_owned(),
                    current: None,
                    previous: None,
                    candidate: None,
                });
            }
            StateFile::TooLarge { limit } => {
                return Err(SlotError::Corrupt {
                    path,
                    reason: format!("larger than the {limit}-byte limit"),
                });
            }
            StateFile::Contents(b) => b,
        };
        let table = match seal::read::<Table, Table>(&bytes, SLOTS_FORMAT, SLOTS_FORMAT_V1) {
            Ok(SealRead::Current(t) | SealRead::Legacy(t)) => t,
            Err(r) => return Err(refused(&path, r, SLOTS_FORMAT)),
        };
        for e in [&table.current, &table.previous, &table.candidate]
            .into_iter()
            .flatten()
        {
            Release::parse(&e.release).map_err(|e| SlotError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(table)
    }

    fn write_table(&self, table: &Table) -> Result<(), SlotError> {
        let mut table = table.clone();
        // A legacy table read earlier is written in the current format.
        SLOTS_FORMAT.clone_into(&mut table.format);
        let bytes = seal::seal(&table).expect("slot table serializes");
        atomic_write(&self.table_path(), &bytes)?;
        self.collect_garbage(&table)
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
        // The table first: a damaged one refuses the store before anything is written.
        let mut table = self.read_table()?;
        atomic_write(&self.image_path(sha256), image)?;
        let entry = Entry {
            release: release.to_owned(),
            sha256: *sha256,
            stored_at: time::now_unix(),
            len: image.len() as u64,
        };
        let info = self.info(&entry);
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

    /// Reads the slot's image for booting it: once, checking the SHA-256 of exactly the bytes
    /// returned, so the caller boots what was verified (use this, not [`Slots::get`]
    /// followed by a second read of [`SlotInfo::path`]). An image below the version floor is
    /// [`SlotError::BelowFloor`]: the slots never hand out a kernel below the floor, so a
    /// rollback to the previous kernel cannot bypass it; an unreadable floor is an error too.
    pub fn read(&self, role: Slot) -> Result<Option<(SlotInfo, Vec<u8>)>, SlotError> {
        let Some(info) = self.peek(role)? else {
            return Ok(None);
        };
        if let Some(floor) = self.floor()? {
            if Release::parse(&info.release)?.is_below(&Release::parse(&floor)?) {
                return Err(SlotError::BelowFloor {
                    role,
                    release: info.release,
                    floor,
                });
            }
        }
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
    ///
    /// This records a rollback that happened (a journaled step of it, repeated by recovery),
    /// so it does not judge the floor: the floor is enforced before the rollback starts, by
    /// [`Slots::read`] handing out the previous kernel's image.
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

    /// The version floor, if one was raised. A damaged floor is [`SlotError::Corrupt`].
    pub fn floor(&self) -> Result<Option<String>, SlotError> {
        let path = self.dir.join("floor.json");
        let bytes = match read_state(&path, MAX_TABLE)? {
            StateFile::Missing => return Ok(None),
            StateFile::TooLarge { limit } => {
                return Err(SlotError::Corrupt {
                    path,
                    reason: format!("larger than the {limit}-byte limit"),
                });
            }
            StateFile::Contents(b) => b,
        };
        let floor = match seal::read::<Floor, Floor>(&bytes, FLOOR_FORMAT, FLOOR_FORMAT_V1) {
            Ok(SealRead::Current(f) | SealRead::Legacy(f)) => f,
            Err(r) => return Err(refused(&path, r, FLOOR_FORMAT)),
        };
        Release::parse(&floor.release).map_err(|e| SlotError::Corrupt {
            path,
            reason: e.to_string(),
        })?;
        Ok(Some(floor.release))
    }

    /// Raises the floor to `release`; never lowers it. Returns whether it changed (a release
    /// numerically equal to the floor does not change it). Refused while the floor is
    /// damaged.
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
        let bytes = seal::seal(&floor).expect("floor serializes");
        atomic_write(&self.dir.join("floor.json"), &bytes)?;
        Ok(true)
    }
}

/// The error for a table `seal::read` refused.
fn refused(path: &Path, r: Refusal, format: &str) -> SlotError {
    SlotError::Corrupt {
        path: path.to_owned(),
        reason: match r {
            Refusal::Corrupt(reason) => reason,
            Refusal::Foreign(found) => format!(
                "format {found:?} is not {format:?} (written by another mk-upgrade version?)"
            ),
        },
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
    fn no_kernel_below_the_floor_is_handed_out_for_booting() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Slots::open(dir.path()).unwrap();
        let (a, da) = img(b'a');
        let (b, db) = img(b'b');
        s.store(Slot::Current, &a, "7.2.14", &da).unwrap();
        s.store(Slot::Candidate, &b, "7.2.17-mk", &db).unwrap();
        s.promote_candidate().unwrap();
        // The previous kernel is a fine rollback target until the floor rises past it.
        assert_eq!(s.read(Slot::Previous).unwrap().unwrap().0.release, "7.2.14");
        assert!(s.raise_floor("7.2.17").unwrap());
        let e = s.read(Slot::Previous).unwrap_err();
        assert!(
            matches!(&e, SlotError::BelowFloor { role: Slot::Previous, release, floor }
                if release == "7.2.14" && floor == "7.2.17"),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("below the version floor 7.2.17"),
            "{e}"
        );
        // Nothing changed.
        assert_eq!(s.peek(Slot::Previous).unwrap().unwrap().release, "7.2.14");
        assert_eq!(s.peek(Slot::Current).unwrap().unwrap().release, "7.2.17-mk");
        assert_eq!(s.read(Slot::Current).unwrap().unwrap().1, b);
        // A damaged floor hands out nothing.
        fs::write(dir.path().join("slots/floor.json"), b"{}").unwrap();
        assert!(matches!(
            s.read(Slot::Current),
            Err(SlotError::Corrupt { .. })
        ));
    }

    #[test]
    fn legacy_tables_are_read_and_rewritten_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Slots::open(dir.path()).unwrap();
        let (a, da) = img(b'a');
        s.store(Slot::Current, &a, "7.2.13-mkA", &da).unwrap();
        // As the previous version wrote them.
        let legacy = format!(
            "{{\"format\":\"{SLOTS_FORMAT_V1}\",\"current\":{{\"release\":\"7.2.13-mkA\",\
             \"sha256\":\"{}\",\"stored_at\":1,\"len\":4096}},\"previous\":null,\
             \"candidate\":null}}",
            hex::encode(da)
        );
        fs::write(s.table_path(), legacy).unwrap();
        fs::write(
            dir.path().join("slots/floor.json"),
            format!("{{\"format\":\"{FLOOR_FORMAT_V1}\",\"release\":\"7.2.10\",\"raised_at\":1}}"),
        )
        .unwrap();
        assert_eq!(s.get(Slot::Current).unwrap().unwrap().release, "7.2.13-mkA");
        assert_eq!(s.floor().unwrap().as_deref(), Some("7.2.10"));
        s.clear(Slot::Candidate).unwrap();
        s.clear(Slot::Current).unwrap();
        s.raise_floor("7.3").unwrap();
        for f in ["slots.json", "floor.json"] {
            let v: serde_json::Value =
                serde_json::from_slice(&fs::read(dir.path().join("slots").join(f)).unwrap())
                    .unwrap();
            assert!(v["format"].as_str().unwrap().ends_with("/2"), "{f}: {v}");
            assert_eq!(v["crc32"].as_str().unwrap().len(), 8, "{f}: {v}");
        }
    }

    #[test]
    fn corrupt_tables_say_how_to_inspect_and_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Slots::open(dir.path()).unwrap();
        s.raise_floor("7.2.10").unwrap();
        let floor = dir.path().join("slots/floor.json");
        let mut bytes = fs::read(&floor).unwrap();
        let i = bytes.iter().position(|&b| b == b'1').unwrap();
        bytes[i] = b'0';
        fs::write(&floor, &bytes).unwrap();
        let e = s.floor().unwrap_err();
        assert!(e.is_corrupt());
        let msg = e.to_string();
        assert!(
            msg.contains("jq .") && msg.contains("version floor"),
            "{msg}"
        );
        // Never overwritten while damaged.
        assert!(s.raise_floor("7.3").is_err());
        assert_eq!(fs::read(&floor).unwrap(), bytes);
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
