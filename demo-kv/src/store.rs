//! The key-value store of `mk-demo-kv`: an append-only log in a shared memfd, and an index
//! of its keys, kept in the memfd itself (format version 2) so that a successor adopting
//! the memfd starts in time independent of the data size.
//!
//! Every operation first catches up with the log: if `committed` advanced beyond what this
//! process indexed (another process appended while this one was frozen, for example an
//! aborted upgrade whose new instance served writes before it was killed), the new records
//! are verified and indexed, so any process holding the memfd sees every acknowledged
//! write. A commit is a compare-and-swap of `committed` from the length this process
//! indexed: a process thawed after its successor appended (an aborted upgrade) cannot
//! commit over the successor's records; it catches up and appends after them.
//!
//! # The index
//!
//! Three ways to index, chosen per memfd:
//!
//! * format version 1 (written by earlier releases): an in-heap map rebuilt by verifying
//!   the whole log at adoption, as before; the memfd stays version 1 (version-1 records, no
//!   index) so the earlier release, thawed after an aborted upgrade, can still use it;
//! * version 2 below [`INDEX_MIN_LOG`] committed bytes: the same in-heap map (a table
//!   costs more than a scan of so little);
//! * version 2 above: a hash table in an index region of the log ([`crate::index`]),
//!   named by the header's `index root`. Its table header's `last indexed` word names the
//!   last data record the table holds: every data record up to it is in the table.
//!
//! A write: append the record (its `seq` and `keys` counters included), commit it (the
//! `committed` compare-and-swap, the only commit point), point the key's slot at it, then
//! advance `last indexed` with a compare-and-swap. A writer frozen anywhere leaves records
//! past `last indexed` that the next holder indexes itself (the tail); an entry is never
//! published before its record is committed.
//!
//! Adoption (and catching up in table mode) is: check the header; check the root names a
//! committed index region (descriptor CRC, kind, size); check `last indexed` names a data
//! record that decodes with a valid CRC and possible counters (its `seq` and `keys` are
//! the store's); verify and index the tail from there to `committed` (counters in
//! sequence); publish the new `last indexed`. That is O(1) plus the tail (normally empty or
//! one record). A lookup checks every slot it passes (its checks, its offset inside
//! `committed`: entries are only published for committed records, so one past it is
//! damage) and decodes the record a slot of the same hash lands on (CRC, key equal) before
//! returning a value. When anything about the index does not verify (root, region, `last
//! indexed`, a slot, a probe limit), the store does not trust the index and
//! rebuilds it from the log: a full verified scan (as version 1 does, so a corrupt log is
//! refused with the same error as before), then a new table in a new region, published by
//! a compare-and-swap of the root. Rebuilding rather than refusing: the index is derived
//! data, and the log it is derived from is intact or the scan says where it is not.
//!
//! A table grows (load over 3/4) into a new region twice as large, filled from the old one
//! before the root is switched; old regions stay in the log as dead space, never reused, so
//! a thawed writer's late update of an old table is harmless.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;

use super::index::{self, IndexFault, Table, TableError};
use super::log::{
    self, Entry, FORMAT_V1, FORMAT_VERSION, HEADER_LEN, ItemError, LogError, MAX_KEY_LEN,
    MAX_OFFSET, MAX_VALUE_LEN, OFF_CAPACITY, RecordFault, RegionLayout,
};
use super::shm::{self, Shm, ShmError};

/// Smallest accepted capacity, in bytes.
pub const MIN_CAPACITY: u64 = 4096;

/// Committed log bytes from which a version-2 memfd keeps its index in the memfd (below,
/// the index lives in the heap and adoption scans the log: at most about 50 µs).
pub const INDEX_MIN_LOG: u64 = 64 << 10;

/// Largest memfd this build grows, formats or adopts (record offsets in index slots have
/// 40 bits: 1 TiB).
pub const MAX_MEMFD: u64 = MAX_OFFSET - 1;

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
    #[error("kv-data memfd index is corrupt even after a rebuild from the log: {0}")]
    Index(IndexFault),
}

/// Where a value lives in the memfd (in-heap index).
#[derive(Debug, Clone, Copy)]
struct ValueLoc {
    /// Memfd offset of the record.
    rec: u64,
    /// Memfd offset of the value.
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
    hash: u64,
    new_key: bool,
}

/// The index table in use, in memfd offsets.
#[derive(Debug, Clone, Copy)]
struct TableRef {
    /// The region (the value of `index root` naming it).
    region: u64,
    /// The table header, whose first word is `last indexed`.
    header: u64,
    /// Slot 0.
    slots: u64,
    bits: u32,
    /// `last indexed` as this process last read or wrote it.
    last: u64,
}

impl TableRef {
    fn new(l: RegionLayout) -> Self {
        let abs = HEADER_LEN as u64;
        Self {
            region: abs + l.start,
            header: abs + l.table,
            slots: abs + l.slots,
            bits: l.bits,
            last: 0,
        }
    }

    /// The table, for one operation, its entries checked against `committed` log bytes.
    fn table<'a>(&self, shm: &'a Shm, committed: u64) -> Table<'a> {
        let hdr = HEADER_LEN as u64;
        Table::new(shm.words(self.slots, 2 << self.bits)).within(hdr, hdr + committed)
    }
}

#[derive(Debug)]
enum Index {
    /// In this process's heap (format 1, small logs, or no room for a table).
    Heap(HashMap<Box<[u8]>, ValueLoc>),
    /// In the memfd.
    Table(TableRef),
}

/// Counters reported by `STATS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Distinct keys.
    pub keys: u64,
    /// Records in the log (a key written twice counts twice).
    pub records: u64,
    /// Bytes in use, header and index regions included.
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

/// How an adopted memfd was indexed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpenReport {
    /// Format version of the memfd.
    pub format_version: u32,
    /// Whether the index kept in the memfd was used (no full scan).
    pub index_in_memfd: bool,
    /// Log bytes decoded and verified while opening: the whole log, or only the data
    /// records of the tail past the index's `last indexed` record.
    pub scanned_bytes: u64,
    /// Why the memfd's index was not used although it had one (it was rebuilt).
    pub rebuilt: Option<String>,
}

/// The store. Not `Sync`: callers serialise access (single writer).
#[derive(Debug)]
pub struct Store {
    shm: Shm,
    /// Format version of the memfd (records are written in it).
    version: u32,
    /// The index's SipHash key (format 2).
    hash_key: [u64; 2],
    index: Index,
    /// Log bytes (after the header) already indexed: `committed` as last seen.
    indexed: u64,
    /// `index root` as last seen (format 2).
    root: u64,
    records: u64,
    keys: u64,
    /// Memfd offset of the last data record (0: none).
    last_record: u64,
    max_capacity: u64,
    /// Committed bytes from which format 2 keeps its index in the memfd.
    index_min_log: u64,
    /// Set when a slot failed its check: the next catch-up rebuilds the index.
    needs_rebuild: Option<String>,
    /// A rebuild found the log corrupt: every operation fails with it.
    poisoned: Option<LogError>,
    origin: Origin,
    report: OpenReport,
    scratch: Vec<u8>,
}

static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// A random SipHash key for a new memfd (from std's randomly keyed hasher: no `unsafe`,
/// no dependency), so that clients cannot choose keys that collide in the table.
fn random_hash_key() -> [u64; 2] {
    use std::hash::{BuildHasher, RandomState};
    let s = RandomState::new();
    [
        s.hash_one(0x6d6b_2d64_656d_6f31_u64),
        s.hash_one((std::process::id(), std::time::SystemTime::now())),
    ]
}

/// Decodes the entry at log offset `off` of `shm`, with `committed` log bytes, borrowing
/// only that entry (a record, or an index region's descriptor: never a table's words).
fn entry_at(
    shm: &Shm,
    version: u32,
    off: u64,
    committed: u64,
) -> Result<(Entry<'_>, u64), RecordFault> {
    let avail = committed.saturating_sub(off);
    let abs = HEADER_LEN as u64 + off;
    let head = shm.slice(abs, avail.min(8) as usize);
    let want = log::decode_len(head, version).unwrap_or(avail).min(avail);
    let bytes = shm.slice(abs, want as usize);
    log::decode_at(bytes, off, avail, version)
}

/// For a writer: whether the slot of the same 64-bit hash pointing at memfd offset `abs`
/// is `key`'s. A record that decodes answers by its key; one that does not (damaged) is
/// taken to be `key`'s, as the hash says, so that writing the key again replaces it rather
/// than adding a second slot behind it; an offset past `committed` or an index region is
/// not.
fn key_at(shm: &Shm, version: u32, abs: u64, committed: u64, key: &[u8]) -> bool {
    let Some(off) = abs.checked_sub(HEADER_LEN as u64) else {
        return false;
    };
    if off >= committed {
        return false;
    }
    match entry_at(shm, version, off, committed) {
        Ok((Entry::Data(r), _)) => r.key == key,
        Ok((Entry::Index(_), _)) => false,
        Err(_) => true,
    }
}

impl Store {
    /// Creates a fresh memfd of `capacity` bytes and formats it (format version 2).
    pub fn create(capacity: u64, max_capacity: u64) -> Result<Self, StoreError> {
        check_capacity(capacity, max_capacity)?;
        let file = shm::create_memfd(capacity)?;
        Self::format(file, max_capacity)
    }

    /// Adopts an inherited memfd: an empty one is grown to `capacity` and formatted; any
    /// other must hold a valid header, and is indexed from the index it keeps (format 2,
    /// checked as described in the module docs) or by verifying every record (format 1, or
    /// an index that does not verify).
    pub fn adopt(fd: OwnedFd, capacity: u64, max_capacity: u64) -> Result<Self, StoreError> {
        check_capacity(capacity, max_capacity)?;
        let file = shm::adopt_memfd(fd)?;
        let len = shm::file_len(&file)?;
        if len > MAX_MEMFD {
            return Err(ShmError::TooLarge { len }.into());
        }
        if len == 0 {
            nix_grow(&file, capacity)?;
            return Self::format(file, max_capacity);
        }
        let shm = Shm::map(file)?;
        let header = log::decode_header(shm.slice(0, HEADER_LEN.min(len as usize)), len)?;
        let mut store = Self::new(
            shm,
            header.version,
            header.hash_key,
            max_capacity.max(len),
            Origin::Adopted { records: 0 },
        );
        store.report.format_version = header.version;
        let committed = store.load_committed()?;
        if header.version == FORMAT_V1 {
            store.scan_heap(committed)?;
            store.report.scanned_bytes = committed;
        } else {
            store.open_v2(committed)?;
        }
        store.origin = Origin::Adopted {
            records: store.records,
        };
        Ok(store)
    }

    fn new(shm: Shm, version: u32, hash_key: [u64; 2], max_capacity: u64, origin: Origin) -> Self {
        Self {
            shm,
            version,
            hash_key,
            index: Index::Heap(HashMap::new()),
            indexed: 0,
            root: 0,
            records: 0,
            keys: 0,
            last_record: 0,
            max_capacity: max_capacity.min(MAX_MEMFD),
            index_min_log: INDEX_MIN_LOG,
            needs_rebuild: None,
            poisoned: None,
            origin,
            report: OpenReport::default(),
            scratch: Vec::new(),
        }
    }

    fn format(file: File, max_capacity: u64) -> Result<Self, StoreError> {
        Self::format_with_key(file, max_capacity, random_hash_key())
    }

    fn format_with_key(
        file: File,
        max_capacity: u64,
        hash_key: [u64; 2],
    ) -> Result<Self, StoreError> {
        let mut shm = Shm::map(file)?;
        shm.write(0, &log::encode_header(shm.len(), hash_key));
        let mut store = Self::new(shm, FORMAT_VERSION, hash_key, max_capacity, Origin::Fresh);
        store.report.format_version = FORMAT_VERSION;
        Ok(store)
    }

    /// How the store was opened.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// How the index was opened (at adoption) or last rebuilt.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// Format version of the memfd.
    pub fn format_version(&self) -> u32 {
        self.version
    }

    /// Whether the index lives in the memfd (else in this process's heap).
    pub fn index_in_memfd(&self) -> bool {
        matches!(self.index, Index::Table(_))
    }

    /// Sets the committed size from which a format-2 memfd gets an index table (tests and
    /// benchmarks; default [`INDEX_MIN_LOG`]).
    #[doc(hidden)]
    pub fn set_index_min_log(&mut self, bytes: u64) {
        self.index_min_log = bytes;
    }

    /// The memfd.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.shm.fd()
    }

    /// The memfd's descriptor number in this process.
    pub fn memfd_raw(&self) -> RawFd {
        self.shm.raw_fd()
    }

    /// `committed`, checked against the memfd size (remapping when it grew).
    fn load_committed(&mut self) -> Result<u64, StoreError> {
        let committed = self.shm.committed().load(Ordering::Acquire);
        let mapped = self.shm.refresh()?;
        let available = mapped - HEADER_LEN as u64;
        if committed > available {
            return Err(LogError::CommittedBeyondEnd {
                committed,
                available,
            }
            .into());
        }
        Ok(committed)
    }

    fn root_now(&self) -> u64 {
        if self.version == FORMAT_V1 {
            0
        } else {
            self.shm.index_root().load(Ordering::Acquire)
        }
    }

    /// Indexes what another process committed since the last call (or rebuilds the index
    /// when a check failed).
    fn catch_up(&mut self) -> Result<(), StoreError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone().into());
        }
        if let Some(why) = self.needs_rebuild.take() {
            let committed = self.load_committed()?;
            return self.rebuild(committed, Some(why));
        }
        let committed = self.shm.committed().load(Ordering::Acquire);
        let root = self.root_now();
        if committed == self.indexed && root == self.root {
            return Ok(());
        }
        if committed < self.indexed {
            return Err(LogError::WentBackwards {
                indexed: self.indexed,
                committed,
            }
            .into());
        }
        let committed = self.load_committed()?;
        if matches!(self.index, Index::Heap(_)) && root == self.root {
            self.scan_heap_from(self.indexed, committed)
        } else {
            self.open_v2(committed)
        }
    }

    /// Opens the index of a format-2 memfd from the shared state: the table the root names
    /// if it verifies, else a rebuild from the log.
    fn open_v2(&mut self, committed: u64) -> Result<(), StoreError> {
        let root = self.root_now();
        if root == 0 {
            self.rebuild(committed, None)?;
            return Ok(());
        }
        match self.open_table(committed, root) {
            Ok(tail) => {
                self.report.index_in_memfd = true;
                self.report.scanned_bytes = tail;
                Ok(())
            }
            Err(why) => self.rebuild(committed, Some(why)),
        }
    }

    /// Uses the table of the region at `root`: checks it, reads the counters from its last
    /// indexed record, indexes the tail. Returns the bytes of the tail's data records (index
    /// regions in the tail are skipped by their descriptor); an error says why the table
    /// cannot be trusted.
    fn open_table(&mut self, committed: u64, root: u64) -> Result<u64, String> {
        let hdr = HEADER_LEN as u64;
        if root < hdr || root - hdr >= committed {
            return Err(format!(
                "index root {root} is outside the committed log (64..{})",
                hdr + committed
            ));
        }
        let layout = match entry_at(&self.shm, self.version, root - hdr, committed) {
            Ok((Entry::Index(l), _)) => l,
            Ok((Entry::Data(_), _)) => {
                return Err(format!("index root {root} names a data record"));
            }
            Err(f) => return Err(format!("index region at byte offset {root}: {f}")),
        };
        let mut t = TableRef::new(layout);
        let last = self.shm.words(t.header, 1)[0].load(Ordering::Acquire);
        let (records, keys, start) = if last == 0 {
            (0, 0, 0)
        } else {
            let bad = |what: String| format!("last indexed record at byte offset {last}: {what}");
            if last < hdr || last - hdr >= committed {
                return Err(bad("outside the committed log".into()));
            }
            match entry_at(&self.shm, self.version, last - hdr, committed) {
                // At most one record per RECORD_OVERHEAD + 2 bytes, at most one key per
                // record: counters beyond are not a writer's.
                Ok((Entry::Data(r), _))
                    if r.seq == 0
                        || r.seq > committed / (log::RECORD_OVERHEAD as u64 + 2)
                        || r.keys == 0
                        || r.keys > r.seq =>
                {
                    return Err(bad(format!(
                        "impossible counters (seq {}, keys {})",
                        r.seq, r.keys
                    )));
                }
                Ok((Entry::Data(r), len)) => (r.seq, r.keys, last - hdr + len),
                Ok((Entry::Index(_), _)) => return Err(bad("an index region".into())),
                Err(f) => return Err(bad(f.to_string())),
            }
        };
        t.last = last;
        self.index = Index::Table(t);
        self.root = root;
        self.records = records;
        self.keys = keys;
        self.last_record = last;
        self.indexed = committed;
        // The tail: records committed after `last indexed` (a writer frozen before it
        // indexed them, or a release that did not index).
        let mut off = start;
        let mut tail = 0;
        // Probing is bounded per insert (MAX_PROBES) and in all, linearly in the tail, so a
        // table built to be slow costs no more than a rebuild.
        let (mut probes, mut inserted) = (0usize, 0usize);
        while off < committed {
            let (entry, len) = entry_at(&self.shm, self.version, off, committed)
                .map_err(|f| format!("entry at byte offset {}: {f}", hdr + off))?;
            if let Entry::Data(r) = entry {
                tail += len;
                // Numbered in sequence; one new key at most per record.
                if r.seq != self.records + 1 || r.keys < self.keys || r.keys > self.keys + 1 {
                    return Err(format!(
                        "record at byte offset {} has counters (seq {}, keys {}) that do not follow (seq {}, keys {})",
                        hdr + off,
                        r.seq,
                        r.keys,
                        self.records,
                        self.keys
                    ));
                }
                let (seq, keys) = (r.seq, r.keys);
                let key: Box<[u8]> = r.key.into();
                let hash = index::key_hash(self.hash_key, &key);
                probes += self
                    .table_insert(&key, hash, hdr + off)
                    .map_err(|f| f.to_string())?;
                inserted += 1;
                if probes > index::MAX_PROBES + 32 * inserted {
                    return Err(format!(
                        "indexing the {inserted} records of the tail examined {probes} slots"
                    ));
                }
                self.records = seq;
                self.keys = keys;
                self.last_record = hdr + off;
            }
            off += len;
        }
        self.publish_last();
        Ok(tail)
    }

    /// Rebuilds the index from the log: verifies every record into the heap, then (format
    /// 2, enough data) moves the index into a new table of the memfd. A corrupt log is an
    /// error (and poisons the store: every later operation fails with it).
    fn rebuild(&mut self, committed: u64, why: Option<String>) -> Result<(), StoreError> {
        if let Some(why) = &why {
            tracing::warn!(reason = %why, "kv-data index not usable: rebuilding it from the log");
        }
        self.report.rebuilt = why;
        self.root = self.root_now();
        if let Err(e) = self.scan_heap(committed) {
            if let StoreError::Corrupt(c) = &e {
                self.poisoned = Some(c.clone());
            }
            return Err(e);
        }
        self.report.index_in_memfd = false;
        self.report.scanned_bytes = committed;
        if self.version >= FORMAT_VERSION && committed >= self.index_min_log {
            match self.migrate() {
                Ok(_) | Err(StoreError::Full { .. }) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not move the kv-data index into the memfd");
                }
            }
        }
        Ok(())
    }

    /// Indexes the whole log into a new in-heap map.
    fn scan_heap(&mut self, committed: u64) -> Result<(), StoreError> {
        self.index = Index::Heap(HashMap::new());
        self.records = 0;
        self.keys = 0;
        self.last_record = 0;
        self.indexed = 0;
        self.scan_heap_from(0, committed)
    }

    /// Verifies and indexes (in the heap map) the entries from log offset `from` to
    /// `committed`.
    fn scan_heap_from(&mut self, from: u64, committed: u64) -> Result<(), StoreError> {
        let hdr = HEADER_LEN as u64;
        let Index::Heap(map) = &mut self.index else {
            unreachable!("scan_heap_from in table mode");
        };
        let mut off = from;
        while off < committed {
            let fault = match entry_at(&self.shm, self.version, off, committed) {
                Ok((Entry::Data(r), _))
                    if self.version >= FORMAT_VERSION && r.seq != self.records + 1 =>
                {
                    RecordFault::Sequence {
                        expected: self.records + 1,
                        found: r.seq,
                    }
                }
                Ok((entry, len)) => {
                    if let Entry::Data(r) = entry {
                        let loc = ValueLoc {
                            rec: hdr + off,
                            off: hdr + off + r.value_offset as u64,
                            len: r.value.len() as u32,
                        };
                        map.insert(r.key.into(), loc);
                        self.records += 1;
                        self.last_record = hdr + off;
                    }
                    off += len;
                    continue;
                }
                Err(f) => f,
            };
            self.indexed = off;
            self.keys = map.len() as u64;
            return Err(LogError::Record {
                offset: hdr + off,
                index: self.records,
                fault,
            }
            .into());
        }
        self.keys = map.len() as u64;
        self.indexed = committed;
        Ok(())
    }

    /// Points `key`'s slot at its record at memfd offset `abs` (committed). Returns the
    /// slots examined.
    fn table_insert(&self, key: &[u8], hash: u64, abs: u64) -> Result<usize, IndexFault> {
        let Index::Table(t) = &self.index else {
            unreachable!("table_insert in heap mode");
        };
        // The shared `committed`, not this process's view: a writer thawed after another
        // holder appended finds that holder's entries valid (and its own key among them).
        let (shm, version) = (&self.shm, self.version);
        let committed = shm.committed().load(Ordering::Acquire);
        let table = t.table(shm, committed);
        match table.insert(hash, abs, |cand| {
            Ok::<_, ()>(key_at(shm, version, cand, committed, key))
        }) {
            Ok(_) => Ok(table.probes()),
            Err(TableError::Index(f)) => Err(f),
            Err(TableError::Key(())) => unreachable!("key_at does not fail"),
        }
    }

    /// Advances the table's `last indexed` to the last data record (all are indexed), only
    /// forward, by compare-and-swap.
    fn publish_last(&mut self) {
        let target = self.last_record;
        let Index::Table(t) = &mut self.index else {
            return;
        };
        let word = &self.shm.words(t.header, 1)[0];
        let mut seen = t.last;
        for _ in 0..4 {
            if seen >= target {
                break;
            }
            match word.compare_exchange(seen, target, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    seen = target;
                    break;
                }
                Err(actual) => seen = actual,
            }
        }
        t.last = seen;
    }

    /// Appends an index region of 2^`bits` slots (zeroed) and commits it. `None`: another
    /// holder committed first (nothing was committed).
    fn append_region(&mut self, bits: u32) -> Result<Option<RegionLayout>, StoreError> {
        let start = self.indexed;
        let layout = log::region_layout(start, bits).ok_or(StoreError::Full {
            need: u64::MAX,
            used: HEADER_LEN as u64 + start,
            max_capacity: self.max_capacity,
        })?;
        let abs = self.reserve(layout.end - start)?;
        self.shm.write(abs, &log::encode_region_descriptor(bits));
        let mut at = abs + log::REGION_DESCRIPTOR_LEN as u64;
        let end = HEADER_LEN as u64 + layout.end;
        while at < end {
            let n = (end - at).min(ZEROS.len() as u64);
            self.shm.write(at, &ZEROS[..n as usize]);
            at += n;
        }
        if self
            .shm
            .committed()
            .compare_exchange(start, layout.end, Ordering::Release, Ordering::Acquire)
            .is_err()
        {
            self.lost_race();
            return Ok(None);
        }
        self.indexed = layout.end;
        Ok(Some(layout))
    }

    /// Moves the in-heap index into a new table of the memfd and publishes it. `false`:
    /// another holder got in first (stays in the heap; the next catch-up sees its state).
    fn migrate(&mut self) -> Result<bool, StoreError> {
        let Index::Heap(map) = &self.index else {
            return Ok(true);
        };
        let bits = index::bits_for(map.len() as u64 + 1);
        let Some(layout) = self.append_region(bits)? else {
            return Ok(false);
        };
        let mut t = TableRef::new(layout);
        let Index::Heap(map) = &self.index else {
            unreachable!("still in heap mode");
        };
        let table = t.table(&self.shm, self.indexed);
        for (key, loc) in map {
            let hash = index::key_hash(self.hash_key, key);
            table.insert_new(hash, loc.rec).map_err(StoreError::Index)?;
        }
        Ok(self.publish_table(&mut t))
    }

    /// Replaces the table by one twice as large (or large enough), in a new region.
    fn grow(&mut self) -> Result<bool, StoreError> {
        let Index::Table(old) = self.index else {
            return Ok(true);
        };
        let bits = (old.bits + 1).max(index::bits_for(self.keys + 1));
        let Some(layout) = self.append_region(bits)? else {
            return Ok(false);
        };
        let mut t = TableRef::new(layout);
        let (from, to) = (
            old.table(&self.shm, self.indexed),
            t.table(&self.shm, self.indexed),
        );
        for e in from.entries() {
            let copied = e.and_then(|(hash, off)| to.insert_new(hash, off));
            if let Err(f) = copied {
                self.needs_rebuild = Some(f.to_string());
                return Ok(false);
            }
        }
        Ok(self.publish_table(&mut t))
    }

    /// Sets the new table's `last indexed` (it holds every record up to the last one) and
    /// switches the root to it with a compare-and-swap.
    fn publish_table(&mut self, t: &mut TableRef) -> bool {
        t.last = self.last_record;
        self.shm.words(t.header, 1)[0].store(t.last, Ordering::Release);
        if self
            .shm
            .index_root()
            .compare_exchange(self.root, t.region, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        self.root = t.region;
        self.index = Index::Table(*t);
        true
    }

    /// Makes room in the index for one more key: moves a large enough in-heap index into
    /// the memfd, grows a table past its load factor. `false`: retry after a catch-up.
    fn ensure_index_room(&mut self) -> Result<bool, StoreError> {
        if self.version == FORMAT_V1 {
            return Ok(true);
        }
        match self.index {
            Index::Heap(_) if self.indexed >= self.index_min_log => match self.migrate() {
                // The record may still fit: the index stays in the heap for now.
                Err(StoreError::Full { .. }) => Ok(true),
                other => other,
            },
            Index::Table(t) if self.keys >= index::max_keys(t.bits) => match self.grow() {
                // No room for a larger table under --max-capacity: the current one takes
                // keys up to 7/8 full (probing is capped), so records still fit.
                Err(StoreError::Full { .. }) if self.keys < (1u64 << t.bits) / 8 * 7 => Ok(true),
                other => other,
            },
            Index::Heap(_) | Index::Table(_) => Ok(true),
        }
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
            if !self.ensure_index_room()? {
                continue;
            }
            let pending = self.write_record(key, value)?;
            if let Some(seq) = self.commit(pending) {
                return Ok(seq);
            }
        }
        Err(StoreError::Contended)
    }

    /// Makes sure `len` bytes after the committed end exist (growing the memfd if needed);
    /// returns their memfd offset.
    fn reserve(&mut self, need: u64) -> Result<u64, StoreError> {
        let start = HEADER_LEN as u64 + self.indexed;
        let end = start.saturating_add(need);
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
        Ok(start)
    }

    /// Whether `key` has a record, and its hash; rebuilds the index once when a slot fails
    /// its check.
    fn key_present(&mut self, key: &[u8]) -> Result<(bool, u64), StoreError> {
        let hash = index::key_hash(self.hash_key, key);
        for _ in 0..2 {
            let found = match &self.index {
                Index::Heap(map) => return Ok((map.contains_key(key), hash)),
                Index::Table(t) => {
                    let (shm, version, committed) = (&self.shm, self.version, self.indexed);
                    t.table(shm, committed).find(hash, |cand| {
                        Ok::<_, ()>(key_at(shm, version, cand, committed, key))
                    })
                }
            };
            match found {
                Ok(f) => return Ok((f.is_some(), hash)),
                Err(TableError::Key(())) => unreachable!("key_at does not fail"),
                Err(TableError::Index(f)) => {
                    self.needs_rebuild = Some(f.to_string());
                    self.catch_up()?;
                }
            }
        }
        Err(StoreError::Contended)
    }

    /// Writes the record after the committed end (growing the memfd if needed), without
    /// committing it.
    fn write_record(&mut self, key: &[u8], value: &[u8]) -> Result<Pending, StoreError> {
        let (present, hash) = self.key_present(key)?;
        let new_key = !present;
        let need = log::record_len_for(self.version, key.len(), value.len()) as u64;
        let start = self.reserve(need)?;
        let mut rec = std::mem::take(&mut self.scratch);
        rec.clear();
        if self.version == FORMAT_V1 {
            log::encode_record_v1(key, value, &mut rec);
        } else {
            let keys = self.keys + u64::from(new_key);
            log::encode_record(key, value, self.records + 1, keys, &mut rec);
        }
        self.shm.write(start, &rec);
        self.scratch = rec;
        Ok(Pending {
            start,
            need,
            key: key.into(),
            value_len: value.len() as u32,
            hash,
            new_key,
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
    ///
    /// Once committed, the record is indexed: its slot, then `last indexed` (a failure
    /// there only makes the next catch-up rebuild the index; the write stands).
    fn commit(&mut self, p: Pending) -> Option<u64> {
        let seq = self.commit_only(&p)?;
        self.index_committed(p);
        Some(seq)
    }

    /// The commit itself (the compare-and-swap), without indexing the record.
    fn commit_only(&mut self, p: &Pending) -> Option<u64> {
        let old = self.indexed;
        let new = old + p.need;
        if self
            .shm
            .committed()
            .compare_exchange(old, new, Ordering::Release, Ordering::Acquire)
            .is_err()
        {
            self.lost_race();
            return None;
        }
        self.indexed = new;
        self.records += 1;
        self.last_record = p.start;
        if p.new_key {
            self.keys += 1;
        }
        Some(self.records)
    }

    /// A commit compare-and-swap failed after this process wrote bytes past its view of
    /// the committed end: another holder appended meanwhile (this process was frozen, the
    /// successor wrote, the upgrade was aborted and this process thawed), so those bytes may
    /// have landed on the other holder's committed records. The tail check of the table
    /// would not look there: the next catch-up verifies the whole log instead (a damaged
    /// record then stops the store loudly, as format 1 did). Not caught: a record of ours
    /// that replaced one of the same length exactly (its CRC and sequence number are valid);
    /// a workload that hands its connections over at a request boundary before the freeze
    /// (`handoff_signal`) is never frozen inside a write, which is what closes that window.
    fn lost_race(&mut self) {
        self.needs_rebuild =
            Some("a commit lost its race with another holder: checking the whole log".to_owned());
    }

    /// Indexes a record this process committed.
    fn index_committed(&mut self, p: Pending) {
        let value_off = p.start + p.need - (trailer_len(self.version) + u64::from(p.value_len));
        if let Index::Heap(map) = &mut self.index {
            let loc = ValueLoc {
                rec: p.start,
                off: value_off,
                len: p.value_len,
            };
            map.insert(p.key, loc);
            self.keys = map.len() as u64;
        } else {
            match self.table_insert(&p.key, p.hash, p.start) {
                Ok(_) => self.publish_last(),
                Err(f) => self.needs_rebuild = Some(f.to_string()),
            }
        }
    }

    /// The value of `key`, if any. A value reached through the index is returned only
    /// after its record verified (inside `committed`, CRC, the same key).
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.catch_up()?;
        for _ in 0..2 {
            let t = match &self.index {
                Index::Heap(map) => {
                    return Ok(map
                        .get(key)
                        .map(|loc| self.shm.slice(loc.off, loc.len as usize).to_vec()));
                }
                Index::Table(t) => *t,
            };
            let hash = index::key_hash(self.hash_key, key);
            let (shm, version, committed) = (&self.shm, self.version, self.indexed);
            let hdr = HEADER_LEN as u64;
            let mut value = None;
            let found = t.table(shm, committed).find(hash, |abs| {
                if abs < hdr || abs - hdr >= committed {
                    // Past `committed` (the table's bounds already refuse it).
                    return Ok(false);
                }
                // The 64-bit hash matched: decode the whole record (CRC included) before
                // comparing keys, so that a damaged key is an error, not a "not found".
                match entry_at(shm, version, abs - hdr, committed) {
                    Ok((Entry::Data(r), _)) if r.key == key => {
                        value = Some(r.value.to_vec());
                        Ok(true)
                    }
                    Ok((Entry::Data(_), _)) => Ok(false),
                    Ok((Entry::Index(_), _)) => Err(LogError::RecordAt {
                        offset: abs,
                        fault: RecordFault::NotData,
                    }),
                    Err(fault) => Err(LogError::RecordAt { offset: abs, fault }),
                }
            });
            match found {
                Ok(_) => return Ok(value),
                Err(TableError::Key(e)) => return Err(e.into()),
                Err(TableError::Index(f)) => {
                    self.needs_rebuild = Some(f.to_string());
                    self.catch_up()?;
                }
            }
        }
        Err(StoreError::Contended)
    }

    /// Checks the log is consistent (catches up); used by health checks.
    pub fn check(&mut self) -> Result<(), StoreError> {
        self.catch_up()
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        Stats {
            keys: self.keys,
            records: self.records,
            used_bytes: HEADER_LEN as u64 + self.indexed,
            capacity: self.shm.len(),
            max_capacity: self.max_capacity,
        }
    }
}

/// Bytes of a record after its value (CRC, and format 2's counters).
fn trailer_len(version: u32) -> u64 {
    if version == FORMAT_V1 { 4 } else { 4 + 16 }
}

fn check_capacity(capacity: u64, max_capacity: u64) -> Result<(), StoreError> {
    if capacity < MIN_CAPACITY || capacity > max_capacity || capacity > MAX_MEMFD {
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
    use crate::index::{Slot, decode_slot};
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn dup(store: &Store) -> OwnedFd {
        nix::unistd::dup(store.memfd()).unwrap()
    }

    /// A fresh store that keeps its index in the memfd from the first record.
    fn table_store(max_capacity: u64) -> Store {
        let mut s = Store::create(MIN_CAPACITY, max_capacity).unwrap();
        s.set_index_min_log(0);
        s
    }

    /// Same contents (the max capacity is each holder's own setting).
    fn same(a: &Store, b: &Store) -> bool {
        let (x, y) = (a.stats(), b.stats());
        (x.keys, x.records, x.used_bytes, x.capacity)
            == (y.keys, y.records, y.used_bytes, y.capacity)
    }

    fn adopt(s: &Store) -> Store {
        Store::adopt(dup(s), MIN_CAPACITY, 1 << 24).unwrap()
    }

    /// The memfd's bytes.
    fn snapshot(s: &Store) -> Vec<u8> {
        let mut buf = vec![0u8; s.stats().capacity as usize];
        let n = nix::sys::uio::pread(s.memfd(), &mut buf, 0).unwrap();
        assert_eq!(n, buf.len());
        buf
    }

    /// A new memfd holding `bytes`.
    fn memfd_from(bytes: &[u8]) -> OwnedFd {
        let f = shm::create_memfd(bytes.len() as u64).unwrap();
        nix::sys::uio::pwrite(&f, bytes, 0).unwrap();
        OwnedFd::from(f)
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Where the index of a memfd image keeps `key`: (memfd offset of its `loc` word,
    /// record offset), and the root region's table header offset.
    fn slot_of(img: &[u8], key: &[u8]) -> (usize, u64, usize) {
        let h = log::decode_header(img, img.len() as u64).unwrap();
        let log_bytes = &img[HEADER_LEN..HEADER_LEN + h.committed as usize];
        let root = h.index_root as usize - HEADER_LEN;
        let Ok((Entry::Index(l), _)) = log::decode_entry(log_bytes, root, 0, h.version) else {
            panic!("no index region at the root");
        };
        let hash = index::key_hash(h.hash_key, key);
        let slots = HEADER_LEN + l.slots as usize;
        let mask = (1usize << l.bits) - 1;
        let mut i = (hash as usize) & mask;
        loop {
            let at = slots + 16 * i;
            match decode_slot(i, u64_at(img, at), u64_at(img, at + 8)).unwrap() {
                Slot::Entry { hash: hh, off } if hh == hash => {
                    let rec = &img[off as usize..];
                    let kl = usize::from(u16::from_le_bytes([rec[0], rec[1]]));
                    if &rec[6..6 + kl] == key {
                        return (at + 8, off, HEADER_LEN + l.table as usize);
                    }
                }
                Slot::Free => panic!("{key:?} not in the index"),
                _ => {}
            }
            i = (i + 1) & mask;
        }
    }

    #[test]
    fn the_index_lives_in_the_memfd_and_adoption_does_not_scan() {
        let mut a = table_store(1 << 24);
        let mut model = HashMap::new();
        for i in 0..3000u32 {
            let (k, v) = (format!("k{}", i % 1000), format!("v{i}"));
            a.set(k.as_bytes(), v.as_bytes()).unwrap();
            model.insert(k, v);
        }
        assert!(a.index_in_memfd());
        assert_eq!((a.stats().keys, a.stats().records), (1000, 3000));
        for (k, v) in &model {
            assert_eq!(a.get(k.as_bytes()).unwrap().unwrap(), v.as_bytes());
        }
        let mut b = adopt(&a);
        assert_eq!(
            *b.open_report(),
            OpenReport {
                format_version: FORMAT_VERSION,
                index_in_memfd: true,
                scanned_bytes: 0,
                rebuilt: None,
            }
        );
        assert_eq!(b.origin(), Origin::Adopted { records: 3000 });
        assert!(same(&a, &b));
        for (k, v) in &model {
            assert_eq!(b.get(k.as_bytes()).unwrap().unwrap(), v.as_bytes());
        }
        assert_eq!(b.get(b"k1000").unwrap(), None);
        // The successor writes (into the same table); the first holder catches up.
        assert_eq!(b.set(b"k1", b"new").unwrap(), 3001);
        assert_eq!(b.set(b"fresh", b"key").unwrap(), 3002);
        assert_eq!(a.get(b"k1").unwrap().as_deref(), Some(&b"new"[..]));
        assert!(same(&a, &b));
        assert_eq!(a.stats().keys, 1001);
    }

    #[test]
    fn a_thawed_writer_that_wrote_over_the_successors_records_stops_loudly() {
        // A catches up, is "frozen" before writing; B appends a committed record; A is
        // thawed and writes its record where it believes the end is: over B's record. A's
        // commit fails; its next operation must verify the whole log and refuse the damage,
        // not go on with an index whose tail check never looks there.
        let mut a = table_store(1 << 20);
        a.set(b"x", b"1").unwrap();
        let mut b = adopt(&a);
        a.catch_up().unwrap();
        b.set(b"acked", b"by-the-successor").unwrap();
        // More records after it: the table's tail check starts at the last one, far from
        // the damage.
        for i in 0..8 {
            b.set(format!("later-{i}").as_bytes(), b"v").unwrap();
        }
        // What write_record does after its checks, from A's stale view (the plain copy a
        // frozen writer resumes with; write_record itself may notice B's slots and catch
        // up first, depending on where the key hashes).
        let value = [b'q'; 40];
        let need = log::record_len_for(a.version, 1, value.len()) as u64;
        let start = a.reserve(need).unwrap();
        let mut rec = Vec::new();
        log::encode_record(b"z", &value, a.records + 1, a.keys + 1, &mut rec);
        a.shm.write(start, &rec);
        let p = Pending {
            start,
            need,
            key: (&b"z"[..]).into(),
            value_len: value.len() as u32,
            hash: index::key_hash(a.hash_key, b"z"),
            new_key: true,
        };
        assert!(a.commit(p).is_none(), "the stale commit must lose its race");
        let e = a.set(b"y", b"2").unwrap_err();
        assert!(matches!(e, StoreError::Corrupt(_)), "got {e:?}");
        assert!(a.get(b"acked").is_err(), "the damaged store stays refused");
    }

    #[test]
    fn holders_take_turns_in_table_mode() {
        // second_holder_sees_writes_and_catches_up, with the index in the memfd.
        let mut a = table_store(1 << 20);
        a.set(b"x", b"1").unwrap();
        let mut b = adopt(&a);
        assert!(b.open_report().index_in_memfd);
        assert_eq!(b.get(b"x").unwrap().as_deref(), Some(&b"1"[..]));
        let v = vec![b'w'; 2000];
        for i in 0..200 {
            b.set(format!("g{i}").as_bytes(), &v).unwrap();
        }
        // b grew the memfd and the table (a new region, a new root).
        assert!(b.stats().capacity > MIN_CAPACITY);
        assert_eq!(a.get(b"g199").unwrap().unwrap(), v);
        assert_eq!(a.set(b"y", b"2").unwrap(), 202);
        assert_eq!(b.get(b"y").unwrap().as_deref(), Some(&b"2"[..]));
        assert!(same(&a, &b));
    }

    #[test]
    fn a_thawed_writer_does_not_clobber_the_successor_in_table_mode() {
        let mut a = table_store(1 << 20);
        a.set(b"x", b"1").unwrap();
        let pending = a.write_record(b"lost", b"never-acked").unwrap();
        let mut b = adopt(&a);
        assert_eq!(b.set(b"y", b"from-b").unwrap(), 2);
        drop(b);
        assert_eq!(a.commit(pending), None);
        assert_eq!(a.get(b"y").unwrap().as_deref(), Some(&b"from-b"[..]));
        assert_eq!(a.get(b"lost").unwrap(), None);
        assert_eq!(a.set(b"z", b"3").unwrap(), 3);
        let mut c = adopt(&a);
        assert_eq!(c.origin(), Origin::Adopted { records: 3 });
        assert!(c.open_report().index_in_memfd);
        assert_eq!(c.get(b"z").unwrap().as_deref(), Some(&b"3"[..]));
        assert_eq!(c.stats().keys, 3);
    }

    #[test]
    fn a_writer_frozen_between_commit_and_index() {
        let mut a = table_store(1 << 20);
        a.set(b"x", b"1").unwrap();
        a.set(b"k", b"old0").unwrap();
        // Committed, then frozen before its slot and `last indexed` are written.
        let p = a.write_record(b"k", b"old1").unwrap();
        assert_eq!(a.commit_only(&p), Some(3));
        let mut b = adopt(&a);
        // The successor indexes the tail (that one record) itself.
        assert!(b.open_report().index_in_memfd);
        assert_eq!(b.open_report().scanned_bytes, log::record_len(1, 4) as u64);
        assert_eq!(b.get(b"k").unwrap().as_deref(), Some(&b"old1"[..]));
        assert_eq!((b.stats().records, b.stats().keys), (3, 2));
        b.set(b"k", b"new").unwrap();
        drop(b);
        // Thawed, the first writer finishes indexing its (older) record: it must not
        // point the key back at it.
        a.index_committed(p);
        let mut c = adopt(&a);
        assert_eq!(c.open_report().scanned_bytes, 0);
        assert_eq!(c.get(b"k").unwrap().as_deref(), Some(&b"new"[..]));
        assert_eq!(a.get(b"k").unwrap().as_deref(), Some(&b"new"[..]));
        assert!(same(&a, &c));
    }

    #[test]
    fn a_writer_frozen_while_growing_its_table() {
        let mut a = table_store(1 << 20);
        for i in 0..10 {
            a.set(format!("k{i}").as_bytes(), b"v").unwrap();
        }
        let Index::Table(t) = a.index else {
            panic!("heap mode")
        };
        // The new region is committed, the root not switched yet.
        let l = a.append_region(t.bits + 1).unwrap().unwrap();
        let mut b = adopt(&a);
        assert!(b.open_report().index_in_memfd);
        // The tail is that region: skipped by its descriptor, not scanned.
        assert_eq!(b.open_report().scanned_bytes, 0);
        assert!(l.end - l.start > 1000);
        for i in 0..10 {
            assert_eq!(b.get(format!("k{i}").as_bytes()).unwrap().unwrap(), b"v");
        }
        for i in 10..100 {
            b.set(format!("k{i}").as_bytes(), b"w").unwrap();
        }
        drop(b);
        for i in 0..100 {
            let want: &[u8] = if i < 10 { b"v" } else { b"w" };
            assert_eq!(a.get(format!("k{i}").as_bytes()).unwrap().unwrap(), want);
        }
        assert_eq!(a.stats().keys, 100);
    }

    /// 200 keys of 500-byte values (more than INDEX_MIN_LOG), each written twice.
    /// Keys and their latest values.
    type Model = Vec<(Vec<u8>, Vec<u8>)>;

    fn big_store() -> (Store, Model) {
        let mut s = Store::create(MIN_CAPACITY, 1 << 22).unwrap();
        let mut model = Vec::new();
        for round in 0..2u8 {
            for i in 0..200 {
                let k = format!("key-{i}").into_bytes();
                let v = vec![b'a' + round + (i % 20) as u8; 500];
                s.set(&k, &v).unwrap();
                if round == 1 {
                    model.push((k, v));
                }
            }
        }
        assert!(s.index_in_memfd());
        (s, model)
    }

    fn assert_model(s: &mut Store, model: &[(Vec<u8>, Vec<u8>)]) {
        for (k, v) in model {
            assert_eq!(s.get(k).unwrap().as_ref(), Some(v), "{k:?}");
        }
        assert_eq!(s.stats().keys, model.len() as u64);
    }

    #[test]
    fn an_index_that_does_not_verify_is_rebuilt_from_the_log() {
        let (s, model) = big_store();
        let img = snapshot(&s);
        let (loc_at, rec, table) = slot_of(&img, b"key-7");
        type Damage = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Damage)> = vec![
            (
                "root outside the log",
                Box::new(|b| b[56..64].copy_from_slice(&(1u64 << 40).to_le_bytes())),
            ),
            (
                "root on a record",
                Box::new(move |b| b[56..64].copy_from_slice(&rec.to_le_bytes())),
            ),
            (
                "last indexed in a record",
                Box::new(move |b| b[table..table + 8].copy_from_slice(&(rec + 3).to_le_bytes())),
            ),
            (
                "last indexed past committed",
                Box::new(move |b| b[table..table + 8].copy_from_slice(&(1u64 << 30).to_le_bytes())),
            ),
        ];
        for (what, damage) in cases {
            let mut bad = img.clone();
            damage(&mut bad);
            let mut t = Store::adopt(memfd_from(&bad), MIN_CAPACITY, 1 << 22).unwrap();
            let r = t.open_report().clone();
            assert!(r.rebuilt.is_some(), "{what}: {r:?}");
            assert_eq!(
                r.scanned_bytes,
                s.stats().used_bytes - HEADER_LEN as u64,
                "{what}"
            );
            // Rebuilt into a new table, published: the next adopter uses it.
            assert!(t.index_in_memfd(), "{what}");
            assert_model(&mut t, &model);
            let mut u = adopt(&t);
            assert_eq!(u.open_report().rebuilt, None, "{what}");
            assert_eq!(u.open_report().scanned_bytes, 0, "{what}");
            assert_model(&mut u, &model);
        }
        // A slot that fails its check is only seen by a lookup that reaches it: that
        // lookup rebuilds the index and still answers right.
        let mut bad = img.clone();
        bad[loc_at] ^= 0x10;
        let mut t = Store::adopt(memfd_from(&bad), MIN_CAPACITY, 1 << 22).unwrap();
        assert_eq!(t.open_report().rebuilt, None);
        assert_eq!(t.get(b"key-7").unwrap().as_deref(), Some(&model[7].1[..]));
        let why = t.open_report().rebuilt.clone().unwrap();
        assert!(why.contains("check"), "{why}");
        assert_model(&mut t, &model);
    }

    #[test]
    fn a_corrupt_record_found_through_the_index_fails_its_lookup_only() {
        let (s, model) = big_store();
        let mut img = snapshot(&s);
        let (_, rec, _) = slot_of(&img, b"key-9");
        // A value byte of key-9's latest record (not the last record of the log).
        img[rec as usize + 6 + 5 + 10] ^= 0x01;
        let mut t = Store::adopt(memfd_from(&img), MIN_CAPACITY, 1 << 22).unwrap();
        assert!(t.open_report().index_in_memfd);
        let err = t.get(b"key-9").unwrap_err().to_string();
        assert!(
            err.contains(&format!("record at byte offset {rec}")) && err.contains("CRC32"),
            "{err}"
        );
        assert_eq!(t.get(b"key-10").unwrap().as_deref(), Some(&model[10].1[..]));
        t.check().unwrap();
        // Overwriting the key makes it readable again.
        t.set(b"key-9", b"again").unwrap();
        assert_eq!(t.get(b"key-9").unwrap().as_deref(), Some(&b"again"[..]));
    }

    #[test]
    fn impossible_counters_are_not_trusted() {
        let (s, model) = big_store();
        let img = snapshot(&s);
        let (_, _, table) = slot_of(&img, b"key-1");
        let last = u64_at(&img, table) as usize;
        let kl = usize::from(u16::from_le_bytes([img[last], img[last + 1]]));
        let vl = u32::from_le_bytes(img[last + 2..last + 6].try_into().unwrap()) as usize;
        let t = last + 6 + kl + vl;
        for (seq, keys) in [(u64::MAX, 1), (400, u64::MAX), (400, 401), (400, 0), (0, 0)] {
            // A record with those counters and a valid CRC (as a buggy writer would leave).
            let mut bad = img.clone();
            bad[t..t + 8].copy_from_slice(&seq.to_le_bytes());
            bad[t + 8..t + 16].copy_from_slice(&keys.to_le_bytes());
            let crc = crc32fast::hash(&bad[last..t + 16]);
            bad[t + 16..t + 20].copy_from_slice(&crc.to_le_bytes());
            match Store::adopt(memfd_from(&bad), MIN_CAPACITY, 1 << 22) {
                // The rebuild's scan finds the sequence broken (when seq is wrong) ...
                Err(e) => assert!(e.to_string().contains("sequence"), "{e}"),
                // ... or recounts the keys itself.
                Ok(mut u) => {
                    assert!(u.open_report().rebuilt.is_some());
                    assert_model(&mut u, &model);
                    u.set(b"one-more", b"x").unwrap();
                }
            }
        }
    }

    #[test]
    fn a_record_with_a_damaged_key_is_an_error_until_rewritten() {
        let (s, model) = big_store();
        let mut img = snapshot(&s);
        let (_, rec, _) = slot_of(&img, b"key-9");
        // The last key byte of key-9's latest record: "key-9" would read "key-8".
        img[rec as usize + 6 + 4] ^= 0x01;
        let mut t = Store::adopt(memfd_from(&img), MIN_CAPACITY, 1 << 22).unwrap();
        let err = t.get(b"key-9").unwrap_err().to_string();
        assert!(err.contains("CRC32"), "{err}");
        assert_eq!(t.get(b"key-8").unwrap().as_deref(), Some(&model[8].1[..]));
        // Writing the key again replaces the damaged record's slot (no second slot).
        t.set(b"key-9", b"again").unwrap();
        assert_eq!(t.get(b"key-9").unwrap().as_deref(), Some(&b"again"[..]));
        assert_eq!(t.stats().keys, 200);
        let mut u = adopt(&t);
        assert_eq!(u.get(b"key-9").unwrap().as_deref(), Some(&b"again"[..]));
    }

    /// Entries are only published for committed records, so one past `committed` is
    /// damage: never read, and the index is rebuilt.
    #[test]
    fn a_slot_past_committed_is_not_used() {
        let (s, model) = big_store();
        let mut img = snapshot(&s);
        let (loc_at, _, _) = slot_of(&img, b"key-3");
        let h = log::decode_header(&img, img.len() as u64).unwrap();
        let hash = index::key_hash(h.hash_key, b"key-3");
        let beyond = HEADER_LEN as u64 + h.committed + 100;
        img[loc_at..loc_at + 8].copy_from_slice(&index::loc_word(hash, beyond).to_le_bytes());
        let mut t = Store::adopt(memfd_from(&img), MIN_CAPACITY, 1 << 22).unwrap();
        assert_eq!(t.get(b"key-3").unwrap().as_deref(), Some(&model[3].1[..]));
        let why = t.open_report().rebuilt.clone().unwrap();
        assert!(why.contains("outside the committed log"), "{why}");
        assert_model(&mut t, &model);
    }

    #[test]
    fn a_corrupt_index_region_descriptor_is_a_corrupt_log() {
        let (s, _) = big_store();
        let mut img = snapshot(&s);
        let root = u64_at(&img, 56) as usize;
        img[root + 5] ^= 0x01;
        let err = Store::adopt(memfd_from(&img), MIN_CAPACITY, 1 << 22)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("at byte offset {root}")) && err.contains("CRC32"),
            "{err}"
        );
    }

    /// A version-1 memfd, as the previous release wrote it.
    fn v1_memfd(records: &[(Vec<u8>, Vec<u8>)]) -> OwnedFd {
        let mut img = log::encode_header_v1(1 << 20).to_vec();
        for (k, v) in records {
            log::encode_record_v1(k, v, &mut img);
        }
        let committed = (img.len() - HEADER_LEN) as u64;
        img[32..40].copy_from_slice(&committed.to_le_bytes());
        img.resize(1 << 20, 0);
        memfd_from(&img)
    }

    #[test]
    fn version_1_memfds_are_scanned_and_stay_version_1() {
        let model: Vec<_> = (0..200)
            .map(|i| (format!("key-{i}").into_bytes(), vec![b'x'; 500]))
            .collect();
        let mut a = Store::adopt(v1_memfd(&model), MIN_CAPACITY, 1 << 22).unwrap();
        let r = a.open_report().clone();
        assert_eq!((r.format_version, r.index_in_memfd), (FORMAT_V1, false));
        assert_eq!(r.scanned_bytes, a.stats().used_bytes - HEADER_LEN as u64);
        assert_eq!(a.origin(), Origin::Adopted { records: 200 });
        assert_model(&mut a, &model);
        a.set(b"key-0", b"new").unwrap();
        a.set(b"more", b"data").unwrap();
        // Still version 1, no index root, version-1 records: the previous release can take
        // the memfd back.
        let img = snapshot(&a);
        let h = log::decode_header(&img, img.len() as u64).unwrap();
        assert_eq!((h.version, h.index_root), (FORMAT_V1, 0));
        let log_bytes = &img[HEADER_LEN..HEADER_LEN + h.committed as usize];
        assert_eq!(
            log::scan(log_bytes, 0, 64, FORMAT_V1, 1, |_, _| {}).unwrap(),
            202
        );
        let mut b = adopt(&a);
        assert_eq!(b.format_version(), FORMAT_V1);
        assert_eq!(b.get(b"key-0").unwrap().as_deref(), Some(&b"new"[..]));
        assert_eq!(b.get(b"more").unwrap().as_deref(), Some(&b"data"[..]));
        assert_eq!(b.stats().keys, 201);
        // A corrupt version-1 record still refuses the adoption, naming it.
        let mut img = snapshot(&a);
        img[HEADER_LEN + 6 + 5 + 3] ^= 1;
        let err = Store::adopt(memfd_from(&img), MIN_CAPACITY, 1 << 22)
            .unwrap_err()
            .to_string();
        assert!(err.contains("record #0 at byte offset 64"), "{err}");
    }

    #[test]
    fn a_small_log_has_no_table_until_it_grows() {
        let mut s = Store::create(MIN_CAPACITY, 1 << 22).unwrap();
        s.set(b"a", b"1").unwrap();
        assert!(!s.index_in_memfd());
        let mut b = adopt(&s);
        assert!(!b.open_report().index_in_memfd);
        let v = vec![b'v'; 1000];
        let mut i = 0;
        while b.stats().used_bytes < INDEX_MIN_LOG + 2000 {
            b.set(format!("k{i}").as_bytes(), &v).unwrap();
            i += 1;
        }
        assert!(b.index_in_memfd());
        // The first holder, thawed, switches to the table it finds.
        assert_eq!(s.get(b"k0").unwrap().unwrap(), v);
        assert!(s.index_in_memfd());
        assert!(same(&s, &b));
        let mut c = adopt(&s);
        assert!(c.open_report().index_in_memfd);
        assert_eq!(c.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    }

    /// Every value a key had, the latest last.
    type History = HashMap<Vec<u8>, Vec<Vec<u8>>>;

    /// A table-mode memfd image and what it holds, for one of four fixed hash keys
    /// (reproducible, several slot layouts; each built once for the fuzz tests).
    fn fuzz_image(which: usize) -> &'static (Vec<u8>, History) {
        static IMAGES: [OnceLock<(Vec<u8>, History)>; 4] = [
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
        ];
        IMAGES[which].get_or_init(|| {
            let file = shm::create_memfd(MIN_CAPACITY).unwrap();
            let key = [[7, 11], [1, 2], [0xdead_beef, 3], [u64::MAX, 1 << 40]][which];
            let mut s = Store::format_with_key(file, 1 << 20, key).unwrap();
            s.set_index_min_log(0);
            let mut model = History::new();
            for i in 0..150u32 {
                let k = format!("f{}", i % 60).into_bytes();
                let v = format!("{i:04}{}", "z".repeat((i % 7) as usize * 5)).into_bytes();
                s.set(&k, &v).unwrap();
                model.entry(k).or_default().push(v);
            }
            let mut img = snapshot(&s);
            let len = s.stats().used_bytes.next_multiple_of(4096);
            img.truncate(len as usize);
            img[OFF_CAPACITY..OFF_CAPACITY + 8].copy_from_slice(&len.to_le_bytes());
            (img, model)
        })
    }

    proptest! {
        /// A memfd with a few bytes changed anywhere in its used part: adoption never
        /// panics; a lookup answers the latest value or an error, never another value, and
        /// "not found" for a stored key or an earlier value only when `committed` itself
        /// was changed (the commit point is trusted, as in format 1: a smaller one that
        /// falls on a record boundary is a shorter log).
        #[test]
        fn mutated_memfds_never_panic_or_answer_wrong_values(
            muts in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6),
            which in 0usize..4,
        ) {
            let (img, model) = fuzz_image(which);
            let mut bad = img.clone();
            let used = bad.len();
            let mut committed_changed = false;
            for (at, x) in &muts {
                let at = at.index(used);
                bad[at] ^= x;
                committed_changed |= (32..40).contains(&at);
            }
            if let Ok(mut s) = Store::adopt(memfd_from(&bad), MIN_CAPACITY, 1 << 22) {
                for (k, values) in model {
                    match s.get(k) {
                        Ok(Some(got)) if committed_changed => prop_assert!(values.contains(&got)),
                        Ok(Some(got)) => prop_assert_eq!(Some(&got), values.last()),
                        Ok(None) => prop_assert!(committed_changed, "{:?} not found", k),
                        Err(_) => {}
                    }
                }
                prop_assert!(!matches!(s.get(b"never-written"), Ok(Some(_))));
                if s.set(b"after", b"mutation").is_ok() {
                    let got = s.get(b"after").ok().flatten();
                    prop_assert_eq!(got.as_deref(), Some(&b"mutation"[..]));
                }
                let _ = s.check();
                let _ = s.stats();
            }
        }

        /// Valid records followed by an index region whose table (slots and `last indexed`)
        /// is arbitrary: adoption, lookups and writes never panic and never answer a value
        /// that was not stored for the key (a table that looks valid but lacks entries can
        /// answer "not found": only a full scan could tell, see docs/demo-kv.md).
        #[test]
        fn garbage_tables_never_panic_or_answer_wrong_values(
            recs in proptest::collection::vec((0u8..6, 1usize..40), 1..20),
            table in proptest::collection::vec(any::<u64>(), 2 * 64 + 8),
            zero_every in 1usize..5,
            last_pick in any::<prop::sample::Index>(),
            last_random in proptest::option::of(any::<u64>()),
            trailing in proptest::collection::vec(any::<u8>(), 0..40),
            trailing_committed in prop::bool::weighted(0.2),
        ) {
            let mut logb = Vec::new();
            let mut starts = Vec::new();
            let mut model: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
            for (n, (k, vlen)) in recs.iter().enumerate() {
                let key = format!("key{k}").into_bytes();
                let value = vec![b'a' + (n % 26) as u8; *vlen];
                model.insert(key.clone(), value.clone());
                starts.push(HEADER_LEN as u64 + logb.len() as u64);
                log::encode_record(&key, &value, n as u64 + 1, model.len() as u64, &mut logb);
            }
            let l = log::region_layout(logb.len() as u64, log::INDEX_MIN_BITS).unwrap();
            logb.extend_from_slice(&log::encode_region_descriptor(log::INDEX_MIN_BITS));
            logb.resize(l.table as usize, 0);
            let last = last_random.unwrap_or(starts[last_pick.index(starts.len())]);
            logb.extend_from_slice(&last.to_le_bytes());
            logb.resize(l.slots as usize, 0);
            for (i, w) in table.iter().take(128).enumerate() {
                // Free slots here and there, so probes can end.
                let w = if (i / 2) % zero_every == 0 { 0 } else { *w };
                logb.extend_from_slice(&w.to_le_bytes());
            }
            let mut committed = logb.len() as u64;
            logb.extend_from_slice(&trailing);
            if trailing_committed {
                committed = logb.len() as u64;
            }
            let mut img = log::encode_header(0, [1, 2]).to_vec();
            img.extend_from_slice(&logb);
            let len = img.len().next_multiple_of(4096);
            img.resize(len, 0);
            img[OFF_CAPACITY..OFF_CAPACITY + 8].copy_from_slice(&(len as u64).to_le_bytes());
            img[32..40].copy_from_slice(&committed.to_le_bytes());
            img[56..64].copy_from_slice(&(HEADER_LEN as u64 + l.start).to_le_bytes());
            if let Ok(mut s) = Store::adopt(memfd_from(&img), MIN_CAPACITY, 1 << 20) {
                for (k, v) in &model {
                    if let Ok(Some(got)) = s.get(k) {
                        prop_assert_eq!(&got, v);
                    }
                }
                prop_assert!(!matches!(s.get(b"key9"), Ok(Some(_))));
                if s.set(b"key0", b"new").is_ok() {
                    let got = s.get(b"key0").ok().flatten();
                    prop_assert_eq!(got.as_deref(), Some(&b"new"[..]));
                }
                let _ = s.check();
            }
        }

        /// A valid version-2 header over arbitrary contents (with, sometimes, a valid index
        /// region descriptor where the root points and an arbitrary `last indexed`).
        #[test]
        fn arbitrary_memfds_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..6000),
            committed in any::<prop::sample::Index>(),
            region in proptest::option::of((any::<prop::sample::Index>(), any::<u64>())),
            key in any::<[u64; 2]>(),
        ) {
            let mut img = log::encode_header(0, key).to_vec();
            img.extend_from_slice(&body);
            let len = img.len().next_multiple_of(4096).max(4096);
            img.resize(len, 0);
            let committed = committed.index(body.len() + 1) as u64;
            img[32..40].copy_from_slice(&committed.to_le_bytes());
            if let Some((at, last)) = region {
                let at = at.index(body.len().max(1));
                if at + 12 <= body.len() {
                    let d = log::encode_region_descriptor(log::INDEX_MIN_BITS);
                    img[HEADER_LEN + at..HEADER_LEN + at + 12].copy_from_slice(&d);
                    img[56..64].copy_from_slice(&((HEADER_LEN + at) as u64).to_le_bytes());
                    if let Some(l) = log::region_layout(at as u64, log::INDEX_MIN_BITS) {
                        let t = HEADER_LEN + l.table as usize;
                        if t + 8 <= img.len() {
                            let last = HEADER_LEN as u64 + last % (committed + 1);
                            img[t..t + 8].copy_from_slice(&last.to_le_bytes());
                        }
                    }
                }
            }
            if let Ok(mut s) = Store::adopt(memfd_from(&img), MIN_CAPACITY, 1 << 20) {
                let _ = s.get(b"a");
                let _ = s.set(b"a", b"b");
                let _ = s.get(b"a");
                let _ = s.check();
            }
        }
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
