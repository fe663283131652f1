//! The key-value store of `mk-demo-kv`: an append-only log in a shared memfd, plus an
//! in-memory index rebuilt from the log.
//!
//! Every operation first catches up with the log: if `committed` advanced beyond what this
//! process indexed (another process appended while this one was frozen, for example an
//! aborted upgrade whose new instance served writes before it was killed), the new records
//! are verified and indexed, so any process holding the memfd sees every acknowledged
//! write. A commit is a compare-and-swap of `committed` from the length this process
//! indexed: a process thawed after its successor appended (an aborted upgrade) cannot
//! commit over the successor's records; it catches up and appends after them.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;

use super::log::{self, HEADER_LEN, ItemError, LogError, MAX_KEY_LEN, MAX_VALUE_LEN, OFF_CAPACITY};
use super::shm::{self, Shm, ShmError};

/// Smallest accepted capacity, in bytes.
pub const MIN_CAPACITY: u64 = 4096;

/// Why the store refused an operation or could not open.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Corrupt(#[from] LogError),
    #[error(transparent)]
    Shm(#[from] ShmError),
    #[error(transparent)]
    Item(#[from] ItemError),
    #[error(
        "log full: the record needs {need} bytes, {used} of the maximum {max_capacity} are used (raise --max-capacity)"
    )]
    Full {
        need: u64,
        used: u64,
        max_capacity: u64,
    },
    #[error(
        "capacity {capacity} is invalid: it must be at least {MIN_CAPACITY} and at most max capacity {max_capacity}"
    )]
    BadCapacity { capacity: u64, max_capacity: u64 },
    #[error(
        "another process keeps committing to the kv-data memfd: only one instance may write it at a time (freeze the other)"
    )]
    Contended,
}

/// Where a value lives in the memfd.
#[derive(Debug, Clone, Copy)]
struct ValueLoc {
    off: u64,
    len: u32,
}

/// A written, not yet committed, record.
#[derive(Debug)]
struct Pending {
    start: u64,
    need: u64,
    key: Box<[u8]>,
    value_len: u32,
}

/// Counters reported by `STATS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Distinct keys.
    pub keys: u64,
    /// Records in the log (a key written twice counts twice).
    pub records: u64,
    /// Bytes in use, header included.
    pub used_bytes: u64,
    /// Current memfd size.
    pub capacity: u64,
    /// Largest size the memfd may grow to.
    pub max_capacity: u64,
}

/// How the store was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A new memfd, or an adopted empty one, was formatted.
    Fresh,
    /// An adopted memfd was verified and indexed.
    Adopted { records: u64 },
}

/// The store. Not `Sync`: callers serialise access (single writer).
#[derive(Debug)]
pub struct Store {
    shm: Shm,
    index: HashMap<Box<[u8]>, ValueLoc>,
    /// Log bytes (after the header) already indexed.
    indexed: u64,
    records: u64,
    max_capacity: u64,
    origin: Origin,
    scratch: Vec<u8>,
}

impl Store {
    /// Creates a fresh memfd of `capacity` bytes and formats it.
    pub fn create(capacity: u64, max_capacity: u64) -> Result<Self, StoreError> {
        check_capacity(capacity, max_capacity)?;
        let file = shm::create_memfd(capacity)?;
        Self::format(file, max_capacity)
    }

    /// Adopts an inherited memfd: an empty one is grown to `capacity` and formatted; any
    /// other must hold a valid header and log, verified record by record.
    pub fn adopt(fd: OwnedFd, capacity: u64, max_capacity: u64) -> Result<Self, StoreError> {
        check_capacity(capacity, max_capacity)?;
        let file = shm::adopt_memfd(fd)?;
        let len = shm::file_len(&file)?;
        if len == 0 {
            nix_grow(&file, capacity)?;
            return Self::format(file, max_capacity);
        }
        let mut store = Self {
            shm: Shm::map(file)?,
            index: HashMap::new(),
            indexed: 0,
            records: 0,
            max_capacity: max_capacity.max(len),
            origin: Origin::Adopted { records: 0 },
            scratch: Vec::new(),
        };
        log::decode_header(store.shm.slice(0, HEADER_LEN.min(len as usize)), len)?;
        store.catch_up()?;
        store.origin = Origin::Adopted {
            records: store.records,
        };
        Ok(store)
    }

    fn format(file: File, max_capacity: u64) -> Result<Self, StoreError> {
        let mut shm = Shm::map(file)?;
        let header = log::encode_header(shm.len());
        shm.write(0, &header);
        Ok(Self {
            shm,
            index: HashMap::new(),
            indexed: 0,
            records: 0,
            max_capacity,
            origin: Origin::Fresh,
            scratch: Vec::new(),
        })
    }

    /// How the store was opened.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The memfd.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.shm.fd()
    }

    /// The memfd's descriptor number in this process.
    pub fn memfd_raw(&self) -> RawFd {
        self.shm.raw_fd()
    }

    /// Indexes records another process committed since the last call.
    fn catch_up(&mut self) -> Result<(), StoreError> {
        let committed = self.shm.committed().load(Ordering::Acquire);
        if committed == self.indexed {
            return Ok(());
        }
        if committed < self.indexed {
            return Err(LogError::WentBackwards {
                indexed: self.indexed,
                committed,
            }
            .into());
        }
        let mapped = self.shm.refresh()?;
        let available = mapped - HEADER_LEN as u64;
        if committed > available {
            return Err(LogError::CommittedBeyondEnd {
                committed,
                available,
            }
            .into());
        }
        let log = self.shm.slice(HEADER_LEN as u64, committed as usize);
        let index = &mut self.index;
        let n = log::scan(log, self.indexed as usize, HEADER_LEN as u64, |_, rec| {
            let loc = ValueLoc {
                off: (HEADER_LEN + rec.value_offset) as u64,
                len: rec.value.len() as u32,
            };
            index.insert(rec.key.into(), loc);
        })?;
        self.records += n;
        self.indexed = committed;
        Ok(())
    }

    /// Appends `key = value`; returns the record's sequence number (1-based position in
    /// the log). The write is committed when this returns.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Result<u64, StoreError> {
        log::check_item("key", key, MAX_KEY_LEN)?;
        log::check_item("value", value, MAX_VALUE_LEN)?;
        // Another holder committing between our catch-up and our commit is only possible
        // when this process was frozen in between (see `commit`); retry a few times.
        for _ in 0..4 {
            self.catch_up()?;
            let pending = self.write_record(key, value)?;
            if let Some(seq) = self.commit(pending) {
                return Ok(seq);
            }
        }
        Err(StoreError::Contended)
    }

    /// Writes the record after the committed end (growing the memfd if needed), without
    /// committing it.
    fn write_record(&mut self, key: &[u8], value: &[u8]) -> Result<Pending, StoreError> {
        let need = log::record_len(key.len(), value.len()) as u64;
        let start = HEADER_LEN as u64 + self.indexed;
        let end = start + need;
        if end > self.shm.len() {
            // Another holder may have grown the memfd already: never ftruncate below it.
            self.shm.refresh()?;
        }
        if end > self.shm.len() {
            if end > self.max_capacity {
                return Err(StoreError::Full {
                    need,
                    used: start,
                    max_capacity: self.max_capacity,
                });
            }
            let new_len = self
                .shm
                .len()
                .saturating_mul(2)
                .clamp(end, self.max_capacity);
            self.shm.grow(new_len)?;
            self.shm.write(OFF_CAPACITY as u64, &new_len.to_le_bytes());
        }
        let mut rec = std::mem::take(&mut self.scratch);
        rec.clear();
        log::encode_record(key, value, &mut rec);
        self.shm.write(start, &rec);
        self.scratch = rec;
        Ok(Pending {
            start,
            need,
            key: key.into(),
            value_len: value.len() as u32,
        })
    }

    /// The commit point: publishes the written record by advancing `committed` with a
    /// compare-and-swap (release: the record bytes become visible before the new length).
    /// Fails (returns `None`, nothing acknowledged) when another holder committed since our
    /// catch-up, which happens when this process was frozen during an upgrade, the new
    /// instance appended, and the upgrade was aborted and this process thawed. Our record
    /// bytes were then overwritten by the other holder's records (or, if we were frozen in
    /// the middle of copying them, damaged its records: the record CRC reports that at the
    /// next catch-up instead of serving wrong data).
    fn commit(&mut self, p: Pending) -> Option<u64> {
        let old = self.indexed;
        let new = old + p.need;
        self.shm
            .committed()
            .compare_exchange(old, new, Ordering::Release, Ordering::Acquire)
            .ok()?;
        self.indexed = new;
        self.records += 1;
        self.index.insert(
            p.key,
            ValueLoc {
                off: p.start + p.need - 4 - u64::from(p.value_len),
                len: p.value_len,
            },
        );
        Some(self.records)
    }

    /// The value of `key`, if any.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.catch_up()?;
        Ok(self
            .index
            .get(key)
            .map(|loc| self.shm.slice(loc.off, loc.len as usize).to_vec()))
    }

    /// Checks the log is consistent (catches up); used by health checks.
    pub fn check(&mut self) -> Result<(), StoreError> {
        self.catch_up()
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        Stats {
            keys: self.index.len() as u64,
            records: self.records,
            used_bytes: HEADER_LEN as u64 + self.indexed,
            capacity: self.shm.len(),
            max_capacity: self.max_capacity,
        }
    }
}

fn check_capacity(capacity: u64, max_capacity: u64) -> Result<(), StoreError> {
    if capacity < MIN_CAPACITY || capacity > max_capacity {
        return Err(StoreError::BadCapacity {
            capacity,
            max_capacity,
        });
    }
    Ok(())
}

fn nix_grow(file: &File, len: u64) -> Result<(), StoreError> {
    let off = libc::off_t::try_from(len).map_err(|_| ShmError::TooLarge { len })?;
    nix::unistd::ftruncate(file, off).map_err(|source| {
        use std::os::fd::AsRawFd;
        ShmError::Sys {
            fd: file.as_raw_fd(),
            op: "ftruncate",
            source,
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dup(store: &Store) -> OwnedFd {
        nix::unistd::dup(store.memfd()).unwrap()
    }

    #[test]
    fn set_get_overwrite_and_stats() {
        let mut s = Store::create(MIN_CAPACITY, 1 << 20).unwrap();
        assert_eq!(s.set(b"a", b"1").unwrap(), 1);
        assert_eq!(s.set(b"b", b"2").unwrap(), 2);
        assert_eq!(s.set(b"a", b"3").unwrap(), 3);
        assert_eq!(s.get(b"a").unwrap().as_deref(), Some(&b"3"[..]));
        assert_eq!(s.get(b"zz").unwrap(), None);
        let st = s.stats();
        assert_eq!((st.keys, st.records), (2, 3));
        assert_eq!(
            st.used_bytes,
            HEADER_LEN as u64 + 3 * log::record_len(1, 1) as u64
        );
        assert!(matches!(s.set(b"a b", b"1"), Err(StoreError::Item(_))));
        assert!(matches!(s.set(b"a", b""), Err(StoreError::Item(_))));
    }

    #[test]
    fn grows_then_refuses_beyond_max() {
        let mut s = Store::create(MIN_CAPACITY, 3 * MIN_CAPACITY).unwrap();
        let v = vec![b'v'; 1000];
        let mut n = 0u32;
        let err = loop {
            match s.set(format!("k{n}").as_bytes(), &v) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, StoreError::Full { .. }), "{err}");
        assert!(err.to_string().contains("--max-capacity"));
        assert_eq!(s.stats().capacity, 3 * MIN_CAPACITY);
        assert!(n >= 11, "only {n} records fit");
        for i in 0..n {
            assert_eq!(s.get(format!("k{i}").as_bytes()).unwrap().unwrap(), v);
        }
    }

    #[test]
    fn second_holder_sees_writes_and_catches_up() {
        let mut a = Store::create(MIN_CAPACITY, 1 << 20).unwrap();
        a.set(b"x", b"1").unwrap();
        let mut b = Store::adopt(dup(&a), MIN_CAPACITY, 1 << 20).unwrap();
        assert_eq!(b.origin(), Origin::Adopted { records: 1 });
        assert_eq!(b.get(b"x").unwrap().as_deref(), Some(&b"1"[..]));
        // b writes enough to grow the memfd; a (thawed after b stopped) catches up.
        let v = vec![b'w'; 2000];
        for i in 0..5 {
            b.set(format!("g{i}").as_bytes(), &v).unwrap();
        }
        assert!(b.stats().capacity > MIN_CAPACITY);
        assert_eq!(a.get(b"g4").unwrap().unwrap(), v);
        assert_eq!(a.set(b"y", b"2").unwrap(), 7);
        assert_eq!(b.get(b"y").unwrap().as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn a_thawed_writer_does_not_clobber_the_successor() {
        let mut a = Store::create(MIN_CAPACITY, 1 << 20).unwrap();
        a.set(b"x", b"1").unwrap();
        // a is frozen after writing a record but before committing it...
        let pending = a.write_record(b"lost", b"never-acked").unwrap();
        let mut b = Store::adopt(dup(&a), MIN_CAPACITY, 1 << 20).unwrap();
        // ...the successor appends over those bytes, then the move is aborted: b is killed
        // and a thawed. Its commit must fail rather than cut b's record in two.
        assert_eq!(b.set(b"y", b"from-b").unwrap(), 2);
        drop(b);
        assert_eq!(a.commit(pending), None);
        assert_eq!(a.get(b"y").unwrap().as_deref(), Some(&b"from-b"[..]));
        assert_eq!(a.get(b"lost").unwrap(), None);
        assert_eq!(a.set(b"z", b"3").unwrap(), 3);
        let mut c = Store::adopt(dup(&a), MIN_CAPACITY, 1 << 20).unwrap();
        assert_eq!(c.origin(), Origin::Adopted { records: 3 });
        assert_eq!(c.get(b"z").unwrap().as_deref(), Some(&b"3"[..]));
    }

    #[test]
    fn adopt_refuses_corrupt_and_foreign() {
        let mut a = Store::create(MIN_CAPACITY, 1 << 20).unwrap();
        a.set(b"key", b"value").unwrap();
        let fd = dup(&a);
        // Flip one value byte of the first record.
        let off = (HEADER_LEN + 6 + 3) as i64;
        nix::sys::uio::pwrite(a.memfd(), b"V", off).unwrap();
        let err = Store::adopt(fd, MIN_CAPACITY, 1 << 20).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("record #0 at byte offset 64") && msg.contains("CRC32"),
            "{msg}"
        );

        // A regular file is not a memfd.
        let tmp = tempfile::tempfile().unwrap();
        let err = Store::adopt(OwnedFd::from(tmp), MIN_CAPACITY, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("not a memfd"), "{err}");

        // A memfd with junk is refused by its magic.
        let junk = shm::create_memfd(MIN_CAPACITY).unwrap();
        let err = Store::adopt(OwnedFd::from(junk), MIN_CAPACITY, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
    }

    #[test]
    fn capacity_is_checked() {
        assert!(matches!(
            Store::create(100, 1 << 20),
            Err(StoreError::BadCapacity { .. })
        ));
        assert!(matches!(
            Store::create(1 << 21, 1 << 20),
            Err(StoreError::BadCapacity { .. })
        ));
    }
}
