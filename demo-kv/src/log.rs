//! The on-memfd format of `mk-demo-kv`: a fixed header followed by an append-only log, and
//! (format version 2) an index of the keys kept inside that log.
//!
//! Pure encode/decode functions over byte slices, with no I/O and no allocation on the
//! decode path, because a successor decodes a memfd written by another process (its
//! contents are untrusted).
//!
//! ```text
//! header (64 bytes, little-endian)
//!   0..8    magic            "MKDKVLOG"
//!   8..12   format version   u32 (2; 1 from earlier releases is still read and written)
//!   12..16  header length    u32 (64)
//!   16..20  header CRC32     u32: version 1 over bytes 0..16; version 2 over bytes 0..16
//!                            followed by bytes 40..56 (the immutable fields)
//!   20..24  reserved         zero
//!   24..32  capacity         u64, size of the memfd after the last grow (advisory)
//!   32..40  committed        u64, bytes of log after the header that are committed
//!   40..56  hash key         2 x u64, SipHash-2-4 key of the index (version 2; v1: zero)
//!   56..64  index root       u64, memfd offset of the current index region (version 2;
//!                            0 = none; v1: zero)
//! log (from byte 64): entries, back to back
//!   version 1 data record: key_len u16 | value_len u32 | key | value | CRC32 u32
//!   version 2 data record: key_len u16 | value_len u32 | key | value | seq u64 | keys u64
//!                          | CRC32 u32 (over all preceding bytes of the record)
//!   version 2 index region (key_len 0 marks it):
//!     0..2   0u16 | 2..4 kind u16 (1) | 4..8 bits u32 (table of 2^bits slots)
//!     8..12  CRC32 over 0..8
//!     zero padding up to the next multiple of 64 (memfd offset) = table header T
//!     T+0    last indexed u64 (memfd offset of the last data record in the table, 0 none)
//!     T+8    reserved (56 bytes, zero)
//!     T+64   2^bits slots of 16 bytes: hash u64 | loc u64 (see crate::index)
//! ```
//!
//! `committed` is the only commit point: a writer writes the entry bytes, then advances
//! `committed` with a compare-and-swap (release ordering); a reader loads `committed`
//! (acquire) and never reads beyond it. The mutable fields are outside the header CRC because a writer can be
//! frozen (SIGSTOP, `cgroup.freeze`) at any instruction: a CRC over `committed` could be
//! torn, while `committed` itself is a single aligned 8-byte store. `capacity` can lag the
//! real memfd size (the writer was frozen between `ftruncate` and the header update), so
//! the memfd size from `fstat` is authoritative and `capacity` is only checked not to
//! exceed it.
//!
//! Version 2 data records carry `seq` (their 1-based position among data records) and
//! `keys` (distinct keys once the record is applied), so a successor knows both counters
//! from one record instead of a scan. An index region is committed like a record (its
//! descriptor is immutable and CRC'd); its table header and slots are then updated in
//! place with single 8-byte atomic operations, never through a CRC (see `crate::index` and
//! `crate::store` for the protocol). A scan of the log skips index regions.
//!
//! Keys are 1..=[`MAX_KEY_LEN`] and values 1..=[`MAX_VALUE_LEN`] bytes of printable,
//! non-space ASCII (`0x21..=0x7e`), the same limits the text protocol enforces.

use std::fmt;

/// First 8 bytes of a formatted memfd.
pub const MAGIC: [u8; 8] = *b"MKDKVLOG";
/// The format version this build writes into a memfd it formats.
pub const FORMAT_VERSION: u32 = 2;
/// The previous format (no index, records without counters): still read, and still
/// written into a memfd formatted by an earlier release, so that release can take the
/// memfd back (an aborted upgrade thaws it).
pub const FORMAT_V1: u32 = 1;
/// Length of the header, in bytes; the log starts right after it.
pub const HEADER_LEN: usize = 64;
/// Offset of the header CRC field.
pub const OFF_HEADER_CRC: usize = 16;
/// Offset of the `capacity` field.
pub const OFF_CAPACITY: usize = 24;
/// Offset of the `committed` field (8-byte aligned: it is accessed atomically).
pub const OFF_COMMITTED: usize = 32;
/// Offset of the hash key (version 2; two u64, immutable, covered by the header CRC).
pub const OFF_HASH_KEY: usize = 40;
/// Offset of the index root (version 2; 8-byte aligned: it is accessed atomically).
pub const OFF_INDEX_ROOT: usize = 56;
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 250;
/// Longest value, in bytes.
pub const MAX_VALUE_LEN: usize = 65_536;
/// Bytes of a version-1 record besides its key and value (lengths and CRC).
pub const RECORD_OVERHEAD_V1: usize = 2 + 4 + 4;
/// Bytes of a version-2 record besides its key and value (lengths, `seq`, `keys`, CRC).
pub const RECORD_OVERHEAD: usize = 2 + 4 + 8 + 8 + 4;
/// Length of an index region's descriptor (before its padding).
pub const REGION_DESCRIPTOR_LEN: usize = 12;
/// Length of an index table's header (the `last indexed` word and reserved bytes).
pub const TABLE_HEADER_LEN: usize = 64;
/// Bytes of one index slot (hash u64, loc u64).
pub const SLOT_LEN: usize = 16;
/// Kind of an index region holding an open-addressing hash table.
pub const REGION_KIND_TABLE: u16 = 1;
/// Smallest index table: 2^6 slots.
pub const INDEX_MIN_BITS: u32 = 6;
/// Largest index table: 2^40 slots (far beyond what a mapping can hold; bounds the
/// arithmetic on an untrusted `bits`).
pub const INDEX_MAX_BITS: u32 = 40;
/// Record offsets in index slots are below 2^40: a format-2 memfd is at most 1 TiB.
pub const MAX_OFFSET: u64 = 1 << 40;

/// Whether a byte may appear in a key or value (printable, non-space ASCII).
pub fn valid_byte(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// Index of the first byte of `bytes` outside `0x21..=0x7e`, if any. Checks 64-byte
/// chunks without branches first (this runs over every stored byte when a successor
/// scans a log).
pub fn first_invalid_byte(bytes: &[u8]) -> Option<usize> {
    let mut base = 0;
    for chunk in bytes.chunks(64) {
        if !chunk.iter().fold(true, |ok, b| ok & valid_byte(*b)) {
            return chunk.iter().position(|b| !valid_byte(*b)).map(|i| base + i);
        }
        base += chunk.len();
    }
    None
}

/// Why a key or value is refused; shared by the store and the protocol.
pub fn check_item(what: &'static str, bytes: &[u8], max: usize) -> Result<(), ItemError> {
    if bytes.is_empty() {
        return Err(ItemError::Empty { what });
    }
    if bytes.len() > max {
        return Err(ItemError::TooLong {
            what,
            len: bytes.len(),
            max,
        });
    }
    if let Some(at) = first_invalid_byte(bytes) {
        return Err(ItemError::BadByte {
            what,
            at,
            byte: bytes[at],
        });
    }
    Ok(())
}

/// A key or value that cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes, the limit is {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} has byte 0x{byte:02x} at index {at} (allowed: printable ASCII without space)")]
    BadByte {
        what: &'static str,
        at: usize,
        byte: u8,
    },
}

/// The decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version (1 or 2).
    pub version: u32,
    /// Memfd size recorded at the last grow (advisory, never above the real size).
    pub capacity: u64,
    /// Committed log bytes after the header.
    pub committed: u64,
    /// The index's hash key (version 2; zero for version 1).
    pub hash_key: [u64; 2],
    /// Memfd offset of the current index region (version 2; 0 = none). Not validated here:
    /// the store checks the region it names before using it.
    pub index_root: u64,
}

fn header_crc(h: &[u8], version: u32) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&h[0..OFF_HEADER_CRC]);
    if version >= FORMAT_VERSION {
        c.update(&h[OFF_HASH_KEY..OFF_INDEX_ROOT]);
    }
    c.finalize()
}

/// Encodes a fresh version-2 header (nothing committed, no index).
pub fn encode_header(capacity: u64, hash_key: [u64; 2]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    h[OFF_HASH_KEY..OFF_HASH_KEY + 8].copy_from_slice(&hash_key[0].to_le_bytes());
    h[OFF_HASH_KEY + 8..OFF_INDEX_ROOT].copy_from_slice(&hash_key[1].to_le_bytes());
    let crc = header_crc(&h, FORMAT_VERSION);
    h[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    h[OFF_CAPACITY..OFF_CAPACITY + 8].copy_from_slice(&capacity.to_le_bytes());
    h
}

/// Encodes a fresh version-1 header, as earlier releases wrote it (tests and tools that
/// must produce the previous format).
pub fn encode_header_v1(capacity: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_V1.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    let crc = header_crc(&h, FORMAT_V1);
    h[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    h[OFF_CAPACITY..OFF_CAPACITY + 8].copy_from_slice(&capacity.to_le_bytes());
    h
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Decodes and checks a header read from a memfd of `file_len` bytes.
pub fn decode_header(bytes: &[u8], file_len: u64) -> Result<Header, LogError> {
    if bytes.len() < HEADER_LEN || file_len < HEADER_LEN as u64 {
        return Err(LogError::TooSmall {
            len: file_len.min(bytes.len() as u64),
        });
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&bytes[0..8]);
    if magic != MAGIC {
        return Err(LogError::BadMagic { found: magic });
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_V1 && version != FORMAT_VERSION {
        return Err(LogError::UnsupportedVersion { found: version });
    }
    let header_len = u32_at(bytes, 12);
    if header_len as usize != HEADER_LEN {
        return Err(LogError::BadHeaderLen { found: header_len });
    }
    let stored = u32_at(bytes, OFF_HEADER_CRC);
    let computed = header_crc(bytes, version);
    if stored != computed {
        return Err(LogError::HeaderCrc { stored, computed });
    }
    let capacity = u64_at(bytes, OFF_CAPACITY);
    if capacity > file_len {
        return Err(LogError::CapacityBeyondEnd { capacity, file_len });
    }
    let committed = u64_at(bytes, OFF_COMMITTED);
    let available = file_len - HEADER_LEN as u64;
    if committed > available {
        return Err(LogError::CommittedBeyondEnd {
            committed,
            available,
        });
    }
    let (hash_key, index_root) = if version == FORMAT_V1 {
        ([0, 0], 0)
    } else {
        (
            [u64_at(bytes, OFF_HASH_KEY), u64_at(bytes, OFF_HASH_KEY + 8)],
            u64_at(bytes, OFF_INDEX_ROOT),
        )
    };
    Ok(Header {
        version,
        capacity,
        committed,
        hash_key,
        index_root,
    })
}

/// Size of the record holding `key` and `value` in the current format (version 2).
pub fn record_len(key_len: usize, value_len: usize) -> usize {
    RECORD_OVERHEAD + key_len + value_len
}

/// Size of the record holding `key` and `value` in format `version`.
pub fn record_len_for(version: u32, key_len: usize, value_len: usize) -> usize {
    if version == FORMAT_V1 {
        RECORD_OVERHEAD_V1 + key_len + value_len
    } else {
        record_len(key_len, value_len)
    }
}

/// Encodes a version-2 record into `out` (appended): `seq` is its 1-based position among
/// the data records of the log, `keys` the number of distinct keys once it is applied.
/// The caller checked the key and value.
pub fn encode_record(key: &[u8], value: &[u8], seq: u64, keys: u64, out: &mut Vec<u8>) {
    let mut counters = [0u8; 16];
    counters[..8].copy_from_slice(&seq.to_le_bytes());
    counters[8..].copy_from_slice(&keys.to_le_bytes());
    encode_with(key, value, &counters, out);
}

/// Encodes a version-1 record into `out` (appended), as earlier releases wrote it.
pub fn encode_record_v1(key: &[u8], value: &[u8], out: &mut Vec<u8>) {
    encode_with(key, value, &[], out);
}

/// The record layout of both versions: lengths, key, value, `extra` (version 2: the
/// counters), CRC32 over all of it.
fn encode_with(key: &[u8], value: &[u8], extra: &[u8], out: &mut Vec<u8>) {
    debug_assert!(key.len() <= MAX_KEY_LEN && value.len() <= MAX_VALUE_LEN);
    let start = out.len();
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    out.extend_from_slice(extra);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Where an index region starting at log offset `start` keeps its table: the table header
/// at `table` (a multiple of 64: the log starts at memfd offset 64, so log and memfd
/// offsets agree modulo 64), the slots at `table + 64`, the region ending at `end` (all log
/// offsets). `None` when the arithmetic overflows or `bits` is outside the accepted range.
pub fn region_layout(start: u64, bits: u32) -> Option<RegionLayout> {
    if !(INDEX_MIN_BITS..=INDEX_MAX_BITS).contains(&bits) {
        return None;
    }
    let table = start
        .checked_add(REGION_DESCRIPTOR_LEN as u64)?
        .checked_next_multiple_of(64)?;
    let slots = table.checked_add(TABLE_HEADER_LEN as u64)?;
    let end = slots.checked_add((SLOT_LEN as u64).checked_shl(bits)?)?;
    Some(RegionLayout {
        start,
        bits,
        table,
        slots,
        end,
    })
}

/// Encodes an index region's descriptor (the caller writes zeros up to `layout.end`).
pub fn encode_region_descriptor(bits: u32) -> [u8; REGION_DESCRIPTOR_LEN] {
    let mut d = [0u8; REGION_DESCRIPTOR_LEN];
    d[2..4].copy_from_slice(&REGION_KIND_TABLE.to_le_bytes());
    d[4..8].copy_from_slice(&bits.to_le_bytes());
    let crc = crc32fast::hash(&d[0..8]);
    d[8..12].copy_from_slice(&crc.to_le_bytes());
    d
}

/// Where an index region lies, in log offsets (see [`region_layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionLayout {
    /// The descriptor.
    pub start: u64,
    /// log2 of the slot count.
    pub bits: u32,
    /// The table header (its first word is `last indexed`).
    pub table: u64,
    /// Slot 0.
    pub slots: u64,
    /// First byte after the region.
    pub end: u64,
}

/// A record borrowed from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    /// Offset of the value within the slice given to [`decode_entry`].
    pub value_offset: usize,
    /// Position among the data records, from 1 (version 2; 0 in version 1).
    pub seq: u64,
    /// Distinct keys once this record is applied (version 2; 0 in version 1).
    pub keys: u64,
}

/// One entry of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    /// A key-value record.
    Data(RecordRef<'a>),
    /// An index region (version 2): skipped by scans, used through the index root.
    Index(RegionLayout),
}

/// What is wrong with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFault {
    /// The entry extends past the committed length.
    Truncated { need: u64, have: u64 },
    /// A length field is zero or above its limit.
    BadLength {
        field: &'static str,
        len: u64,
        max: u64,
    },
    /// A key or value byte outside `0x21..=0x7e`.
    BadByte { field: &'static str, at: usize },
    /// The record (or index region descriptor) CRC does not match.
    Crc { stored: u32, computed: u32 },
    /// A version-2 record whose `seq` is not the previous one plus one.
    Sequence { expected: u64, found: u64 },
    /// An index region descriptor of an unknown kind.
    RegionKind { kind: u16 },
    /// An index slot names an index region, not a data record.
    NotData,
}

impl fmt::Display for RecordFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { need, have } => write!(
                f,
                "entry needs {need} bytes but only {have} remain before the committed length"
            ),
            Self::BadLength { field, len, max } => {
                write!(f, "{field} length {len} is outside 1..={max}")
            }
            Self::BadByte { field, at } => {
                write!(f, "{field} byte {at} is not printable non-space ASCII")
            }
            Self::Crc { stored, computed } => write!(
                f,
                "record CRC32 mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            Self::Sequence { expected, found } => {
                write!(f, "record sequence number {found}, expected {expected}")
            }
            Self::RegionKind { kind } => write!(f, "index region of unknown kind {kind}"),
            Self::NotData => write!(f, "an index region where a data record was expected"),
        }
    }
}

/// How many bytes of the entry whose first bytes are `head` [`decode_at`] needs in its
/// `bytes`: a whole record (from its length fields, unchecked: the caller clamps to what is
/// committed), or an index region's descriptor. `None` when `head` is under 6 bytes.
pub fn decode_len(head: &[u8], version: u32) -> Option<u64> {
    if head.len() < 6 {
        return None;
    }
    let key_len = u16_at(head, 0);
    if key_len == 0 && version >= FORMAT_VERSION {
        return Some(REGION_DESCRIPTOR_LEN as u64);
    }
    let overhead = if version == FORMAT_V1 {
        RECORD_OVERHEAD_V1
    } else {
        RECORD_OVERHEAD
    };
    Some(overhead as u64 + u64::from(key_len) + u64::from(u32_at(head, 2)))
}

fn check_lengths(key_len: usize, value_len: usize) -> Result<(), RecordFault> {
    if key_len == 0 || key_len > MAX_KEY_LEN {
        return Err(RecordFault::BadLength {
            field: "key",
            len: key_len as u64,
            max: MAX_KEY_LEN as u64,
        });
    }
    if value_len == 0 || value_len > MAX_VALUE_LEN {
        return Err(RecordFault::BadLength {
            field: "value",
            len: value_len as u64,
            max: MAX_VALUE_LEN as u64,
        });
    }
    Ok(())
}

/// Decodes the entry at `offset` of `log` (committed log bytes; `log[0]` is log offset
/// `base`, which places an index region's table). Returns the entry and the offset (in
/// `log`) of the next one; `value_offset` is relative to `log`. Never panics and never
/// allocates. An index region is checked by its descriptor (CRC, kind, bits) and must lie
/// wholly inside `log` (it is committed); its table is not looked at.
pub fn decode_entry(
    log: &[u8],
    offset: usize,
    base: u64,
    version: u32,
) -> Result<(Entry<'_>, usize), RecordFault> {
    let rest = log.get(offset..).unwrap_or(&[]);
    let (entry, len) = decode_at(rest, base + offset as u64, rest.len() as u64, version)?;
    let entry = match entry {
        Entry::Data(mut r) => {
            r.value_offset += offset;
            Entry::Data(r)
        }
        index @ Entry::Index(_) => index,
    };
    Ok((entry, offset + len as usize))
}

/// Decodes the entry at the start of `bytes`, at log offset `log_offset`, with `available`
/// committed log bytes from there (`bytes.len() <= available`). A data record must lie
/// wholly in `bytes`; for an index region only its descriptor must (the rest is checked
/// against `available`), so a caller can borrow one entry of a shared mapping without
/// borrowing the table another part of the process updates atomically. Returns the entry
/// (`value_offset` relative to `bytes`) and its length. Never panics, never allocates.
pub fn decode_at(
    bytes: &[u8],
    log_offset: u64,
    available: u64,
    version: u32,
) -> Result<(Entry<'_>, u64), RecordFault> {
    let have = bytes.len() as u64;
    let overhead = if version == FORMAT_V1 {
        RECORD_OVERHEAD_V1
    } else {
        RECORD_OVERHEAD
    };
    if bytes.len() >= 2 && u16_at(bytes, 0) == 0 && version >= FORMAT_VERSION {
        let l = decode_region(bytes, log_offset, available)?;
        return Ok((Entry::Index(l), l.end - l.start));
    }
    if bytes.len() < overhead {
        return Err(RecordFault::Truncated {
            need: overhead as u64,
            have,
        });
    }
    let key_len = usize::from(u16_at(bytes, 0));
    let value_len = u32_at(bytes, 2) as usize;
    check_lengths(key_len, value_len)?;
    let total = overhead + key_len + value_len;
    if bytes.len() < total {
        return Err(RecordFault::Truncated {
            need: total as u64,
            have,
        });
    }
    let body = &bytes[..total - 4];
    let stored = u32_at(bytes, total - 4);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(RecordFault::Crc { stored, computed });
    }
    let key = &body[6..6 + key_len];
    let value = &body[6 + key_len..6 + key_len + value_len];
    if let Some(at) = first_invalid_byte(key) {
        return Err(RecordFault::BadByte { field: "key", at });
    }
    if let Some(at) = first_invalid_byte(value) {
        return Err(RecordFault::BadByte { field: "value", at });
    }
    let (seq, keys) = if version == FORMAT_V1 {
        (0, 0)
    } else {
        let t = 6 + key_len + value_len;
        (u64_at(body, t), u64_at(body, t + 8))
    };
    Ok((
        Entry::Data(RecordRef {
            key,
            value,
            value_offset: 6 + key_len,
            seq,
            keys,
        }),
        total as u64,
    ))
}

/// Decodes the index region descriptor at the start of `bytes` (log offset `at`); the
/// region must fit in the `available` committed bytes from `at`.
fn decode_region(bytes: &[u8], at: u64, available: u64) -> Result<RegionLayout, RecordFault> {
    if bytes.len() < REGION_DESCRIPTOR_LEN {
        return Err(RecordFault::Truncated {
            need: REGION_DESCRIPTOR_LEN as u64,
            have: bytes.len() as u64,
        });
    }
    let stored = u32_at(bytes, 8);
    let computed = crc32fast::hash(&bytes[0..8]);
    if stored != computed {
        return Err(RecordFault::Crc { stored, computed });
    }
    let kind = u16_at(bytes, 2);
    if kind != REGION_KIND_TABLE {
        return Err(RecordFault::RegionKind { kind });
    }
    let bits = u32_at(bytes, 4);
    let layout = region_layout(at, bits).ok_or(RecordFault::BadLength {
        field: "index bits",
        len: u64::from(bits),
        max: u64::from(INDEX_MAX_BITS),
    })?;
    let need = layout.end - at;
    if need > available {
        return Err(RecordFault::Truncated {
            need,
            have: available,
        });
    }
    Ok(layout)
}

/// Decodes every entry of `log` from `offset` to its end, calling `f(entry_offset, entry)`
/// for each. `log[0]` is at memfd offset `base` (added to offsets in errors; `base -
/// HEADER_LEN` is its log offset). Version-2 data records must be numbered
/// `first_seq`, `first_seq + 1`, ... Returns the number of data records.
pub fn scan<'a>(
    log: &'a [u8],
    mut offset: usize,
    base: u64,
    version: u32,
    first_seq: u64,
    mut f: impl FnMut(usize, Entry<'a>),
) -> Result<u64, LogError> {
    let mut count = 0u64;
    let log_base = base.saturating_sub(HEADER_LEN as u64);
    while offset < log.len() {
        let fault = match decode_entry(log, offset, log_base, version) {
            Ok((Entry::Data(rec), _))
                if version >= FORMAT_VERSION && rec.seq != first_seq + count =>
            {
                RecordFault::Sequence {
                    expected: first_seq + count,
                    found: rec.seq,
                }
            }
            Ok((entry, next)) => {
                f(offset, entry);
                offset = next;
                if matches!(entry, Entry::Data(_)) {
                    count += 1;
                }
                continue;
            }
            Err(fault) => fault,
        };
        return Err(LogError::Record {
            offset: base + offset as u64,
            index: count,
            fault,
        });
    }
    Ok(count)
}

/// A memfd whose header or log cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("kv-data memfd is {len} bytes, smaller than the {HEADER_LEN}-byte header")]
    TooSmall { len: u64 },
    #[error(
        "kv-data memfd has magic {found:02x?}, expected \"MKDKVLOG\": it was not written by mk-demo-kv"
    )]
    BadMagic { found: [u8; 8] },
    #[error(
        "kv-data memfd has format version {found}; this build reads versions {FORMAT_V1} and {FORMAT_VERSION}"
    )]
    UnsupportedVersion { found: u32 },
    #[error("kv-data memfd header length is {found}, expected {HEADER_LEN}")]
    BadHeaderLen { found: u32 },
    #[error(
        "kv-data memfd header CRC32 mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("kv-data memfd header claims capacity {capacity} but the memfd is {file_len} bytes")]
    CapacityBeyondEnd { capacity: u64, file_len: u64 },
    #[error(
        "kv-data memfd header claims {committed} committed log bytes but only {available} exist after the header"
    )]
    CommittedBeyondEnd { committed: u64, available: u64 },
    /// `index` counts the data records before the faulty entry.
    #[error("kv-data memfd record #{index} at byte offset {offset} is corrupt: {fault}")]
    Record {
        offset: u64,
        index: u64,
        fault: RecordFault,
    },
    /// A record reached through the index (its position among records is not known).
    #[error("kv-data memfd record at byte offset {offset} is corrupt: {fault}")]
    RecordAt { offset: u64, fault: RecordFault },
    #[error(
        "kv-data memfd committed length went backwards from {indexed} to {committed}: another process rewrote the log"
    )]
    WentBackwards { indexed: u64, committed: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(k: &[u8], v: &[u8], seq: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(k, v, seq, seq, &mut out);
        out
    }

    fn rec1(k: &[u8], v: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record_v1(k, v, &mut out);
        out
    }

    fn data(e: Entry<'_>) -> RecordRef<'_> {
        match e {
            Entry::Data(r) => r,
            Entry::Index(l) => panic!("index region {l:?}"),
        }
    }

    fn dec(b: &[u8], off: usize, version: u32) -> Result<(RecordRef<'_>, usize), RecordFault> {
        decode_entry(b, off, 0, version).map(|(e, n)| (data(e), n))
    }

    /// A log holding a record, an index region of 2^6 slots, and another record.
    fn log_with_region() -> (Vec<u8>, RegionLayout) {
        let mut log = rec(b"alpha", b"1", 1);
        let layout = region_layout(log.len() as u64, INDEX_MIN_BITS).unwrap();
        log.extend_from_slice(&encode_region_descriptor(INDEX_MIN_BITS));
        log.resize(layout.end as usize, 0);
        // Table contents are not checked by the decoder.
        log[layout.slots as usize + 3] = 0xaa;
        log.extend(rec(b"beta", b"two", 2));
        (log, layout)
    }

    #[test]
    fn record_round_trip_and_scan() {
        let mut log = rec(b"alpha", b"1", 1);
        log.extend(rec(b"beta", b"two", 2));
        let (r, next) = dec(&log, 0, FORMAT_VERSION).unwrap();
        assert_eq!(
            (r.key, r.value, r.seq, r.keys),
            (&b"alpha"[..], &b"1"[..], 1, 1)
        );
        assert_eq!(next, record_len(5, 1));
        assert_eq!(log[r.value_offset], b'1');
        let mut seen = Vec::new();
        let n = scan(&log, 0, 64, FORMAT_VERSION, 1, |off, e| {
            seen.push((off, data(e).key.to_vec()));
        })
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(seen, vec![(0, b"alpha".to_vec()), (next, b"beta".to_vec())]);
        // Numbering must be contiguous from `first_seq`.
        let err = scan(&log, 0, 64, FORMAT_VERSION, 2, |_, _| {}).unwrap_err();
        assert!(
            matches!(
                err,
                LogError::Record {
                    offset: 64,
                    index: 0,
                    fault: RecordFault::Sequence {
                        expected: 2,
                        found: 1
                    }
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn version_1_records_still_decode() {
        let mut log = rec1(b"alpha", b"1");
        log.extend(rec1(b"beta", b"two"));
        let (r, next) = dec(&log, 0, FORMAT_V1).unwrap();
        assert_eq!((r.key, r.value, r.seq), (&b"alpha"[..], &b"1"[..], 0));
        assert_eq!(next, record_len_for(FORMAT_V1, 5, 1));
        assert_eq!(scan(&log, 0, 64, FORMAT_V1, 1, |_, _| {}).unwrap(), 2);
        // A version-2 record is not a version-1 one, and the other way round.
        assert!(dec(&rec(b"k", b"v", 1), 0, FORMAT_V1).is_err());
        assert!(dec(&log, 0, FORMAT_VERSION).is_err());
        // Key length 0 is an error in version 1 (an index region only exists in 2).
        let (l2, _) = log_with_region();
        let off = record_len(5, 1);
        assert!(matches!(
            decode_entry(&l2, off, 0, FORMAT_V1),
            Err(RecordFault::BadLength { field: "key", .. })
        ));
    }

    #[test]
    fn index_regions_are_skipped_by_scans() {
        let (log, layout) = log_with_region();
        assert_eq!(layout.table % 64, 0);
        assert_eq!(layout.slots, layout.table + 64);
        assert_eq!(layout.end, layout.slots + 16 * 64);
        let (e, next) = decode_entry(&log, layout.start as usize, 0, FORMAT_VERSION).unwrap();
        assert_eq!(e, Entry::Index(layout));
        assert_eq!(next as u64, layout.end);
        let mut kinds = Vec::new();
        let n = scan(&log, 0, 64, FORMAT_VERSION, 1, |off, e| {
            kinds.push((off, matches!(e, Entry::Data(_))));
        })
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            kinds,
            vec![
                (0, true),
                (layout.start as usize, false),
                (layout.end as usize, true)
            ]
        );
        // The alignment follows the log offset: the same region one byte later pads less.
        let later = region_layout(layout.start + 1, INDEX_MIN_BITS).unwrap();
        assert_eq!(later.table, layout.table);
        // decode_at needs only the descriptor when told what is committed.
        let at = layout.start as usize;
        let (e, len) = decode_at(
            &log[at..at + REGION_DESCRIPTOR_LEN],
            layout.start,
            (log.len() - at) as u64,
            FORMAT_VERSION,
        )
        .unwrap();
        assert_eq!((e, len), (Entry::Index(layout), layout.end - layout.start));
        assert_eq!(
            decode_len(&log[at..at + 6], FORMAT_VERSION),
            Some(REGION_DESCRIPTOR_LEN as u64)
        );
        assert_eq!(
            decode_len(&log[..6], FORMAT_VERSION),
            Some(record_len(5, 1) as u64)
        );
        assert_eq!(decode_len(&log[..5], FORMAT_VERSION), None);
    }

    #[test]
    fn bad_index_regions_are_named() {
        let (log, layout) = log_with_region();
        let at = layout.start as usize;
        // Truncated: the region extends past the committed end.
        assert!(matches!(
            decode_entry(&log[..layout.end as usize - 1], at, 0, FORMAT_VERSION),
            Err(RecordFault::Truncated { .. })
        ));
        for (i, fault) in [(2, "kind"), (4, "bits"), (8, "crc"), (11, "crc")] {
            let mut bad = log.clone();
            bad[at + i] ^= 0x01;
            let err = decode_entry(&bad, at, 0, FORMAT_VERSION).unwrap_err();
            assert!(matches!(err, RecordFault::Crc { .. }), "{fault}: {err}");
        }
        // A valid CRC over a bad kind or size.
        let mut d = encode_region_descriptor(INDEX_MIN_BITS);
        d[2] = 9;
        let crc = crc32fast::hash(&d[0..8]);
        d[8..12].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_at(&d, 0, 1 << 20, FORMAT_VERSION).unwrap_err(),
            RecordFault::RegionKind { kind: 9 }
        );
        for bits in [0, INDEX_MIN_BITS - 1, INDEX_MAX_BITS + 1, u32::MAX] {
            let mut d = encode_region_descriptor(INDEX_MIN_BITS);
            d[4..8].copy_from_slice(&bits.to_le_bytes());
            let crc = crc32fast::hash(&d[0..8]);
            d[8..12].copy_from_slice(&crc.to_le_bytes());
            assert!(
                matches!(
                    decode_at(&d, 0, u64::MAX, FORMAT_VERSION),
                    Err(RecordFault::BadLength {
                        field: "index bits",
                        ..
                    })
                ),
                "bits {bits}"
            );
        }
        // The largest accepted table is only accepted when committed.
        let d = encode_region_descriptor(INDEX_MAX_BITS);
        assert!(matches!(
            decode_at(&d, 0, 1 << 30, FORMAT_VERSION),
            Err(RecordFault::Truncated { .. })
        ));
        assert!(region_layout(u64::MAX - 10, INDEX_MIN_BITS).is_none());
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        for good in [rec(b"key", b"value", 7), rec1(b"key", b"value")] {
            let version = if good.len() == record_len(3, 5) {
                FORMAT_VERSION
            } else {
                FORMAT_V1
            };
            assert!(dec(&good, 0, version).is_ok());
            for i in 0..good.len() {
                let mut bad = good.clone();
                bad[i] ^= 0x40;
                assert!(dec(&bad, 0, version).is_err(), "flip at {i} not detected");
            }
        }
    }

    #[test]
    fn faults_are_named() {
        let good = rec(b"key", b"value", 1);
        assert!(matches!(
            dec(&good[..good.len() - 1], 0, FORMAT_VERSION),
            Err(RecordFault::Truncated { .. })
        ));
        let mut bad = good.clone();
        bad[0] = 0;
        bad[1] = 1;
        assert!(matches!(
            dec(&bad, 0, FORMAT_VERSION),
            Err(RecordFault::BadLength { field: "key", .. })
        ));
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            dec(&bad, 0, FORMAT_VERSION),
            Err(RecordFault::Crc { .. })
        ));
        // A space in the value with a valid CRC is still refused.
        let bad = rec(b"key", b"va ue", 1);
        assert!(matches!(
            dec(&bad, 0, FORMAT_VERSION),
            Err(RecordFault::BadByte {
                field: "value",
                at: 2
            })
        ));
        let err = scan(&bad, 0, 64, FORMAT_VERSION, 1, |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("byte offset 64"), "{err}");
    }

    #[test]
    fn header_checks() {
        let key = [0x1234, 0x5678];
        let h = encode_header(4096, key);
        assert_eq!(
            decode_header(&h, 4096).unwrap(),
            Header {
                version: FORMAT_VERSION,
                capacity: 4096,
                committed: 0,
                hash_key: key,
                index_root: 0,
            }
        );
        let h1 = encode_header_v1(4096);
        assert_eq!(
            decode_header(&h1, 4096).unwrap(),
            Header {
                version: FORMAT_V1,
                capacity: 4096,
                committed: 0,
                hash_key: [0, 0],
                index_root: 0,
            }
        );
        assert!(matches!(
            decode_header(&h[..10], 4096),
            Err(LogError::TooSmall { .. })
        ));
        assert!(matches!(
            decode_header(&h, 2048),
            Err(LogError::CapacityBeyondEnd { .. })
        ));
        let mut b = h;
        b[0] = b'X';
        assert!(matches!(
            decode_header(&b, 4096),
            Err(LogError::BadMagic { .. })
        ));
        let mut b = h;
        b[8] = 3;
        assert!(matches!(
            decode_header(&b, 4096),
            Err(LogError::UnsupportedVersion { found: 3 })
        ));
        let mut b = h;
        b[12] = 65;
        assert!(matches!(
            decode_header(&b, 4096),
            Err(LogError::BadHeaderLen { found: 65 })
        ));
        let mut b = h;
        b[OFF_HEADER_CRC] ^= 1;
        assert!(matches!(
            decode_header(&b, 4096),
            Err(LogError::HeaderCrc { .. })
        ));
        // The hash key is covered by the CRC in version 2; the root is not (it changes).
        let mut b = h;
        b[OFF_HASH_KEY + 3] ^= 1;
        assert!(matches!(
            decode_header(&b, 4096),
            Err(LogError::HeaderCrc { .. })
        ));
        let mut b = h;
        b[OFF_INDEX_ROOT..OFF_INDEX_ROOT + 8].copy_from_slice(&640u64.to_le_bytes());
        assert_eq!(decode_header(&b, 4096).unwrap().index_root, 640);
        // A version-1 header ignores those bytes (reserved then).
        let mut b = h1;
        b[OFF_HASH_KEY + 3] ^= 1;
        b[OFF_INDEX_ROOT] = 1;
        let d = decode_header(&b, 4096).unwrap();
        assert_eq!((d.hash_key, d.index_root), ([0, 0], 0));
        let mut b = h;
        b[OFF_COMMITTED..OFF_COMMITTED + 8].copy_from_slice(&5000u64.to_le_bytes());
        assert!(matches!(
            decode_header(&b, 4096),
            Err(LogError::CommittedBeyondEnd {
                committed: 5000,
                available: 4032
            })
        ));
    }

    #[test]
    fn first_invalid_byte_finds_the_first() {
        let mut v = vec![b'a'; 300];
        assert_eq!(first_invalid_byte(&v), None);
        v[200] = b' ';
        v[250] = 0;
        assert_eq!(first_invalid_byte(&v), Some(200));
        v[63] = 0x7f;
        assert_eq!(first_invalid_byte(&v), Some(63));
        assert_eq!(first_invalid_byte(&[]), None);
    }

    #[test]
    fn item_checks() {
        assert!(check_item("key", b"ok", 4).is_ok());
        assert_eq!(
            check_item("key", b"", 4),
            Err(ItemError::Empty { what: "key" })
        );
        assert!(matches!(
            check_item("key", b"12345", 4),
            Err(ItemError::TooLong { .. })
        ));
        assert!(matches!(
            check_item("value", b"a\tb", 4),
            Err(ItemError::BadByte { at: 1, byte: 9, .. })
        ));
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            offset in 0usize..4096,
            base in any::<u64>(),
            v2 in any::<bool>(),
        ) {
            let version = if v2 { FORMAT_VERSION } else { FORMAT_V1 };
            // Either an error or an entry that lies inside the input.
            if let Ok((e, next)) = decode_entry(&bytes, offset, base % (1 << 50), version) {
                prop_assert!(next <= bytes.len());
                if let Entry::Data(r) = e {
                    prop_assert!(r.value_offset + r.value.len() <= bytes.len());
                }
            }
            let _ = decode_len(&bytes, version);
            let _ = decode_at(&bytes, base, base, version);
            let _ = scan(&bytes, 0, 0, version, 1, |_, _| {});
            let _ = decode_header(&bytes, bytes.len() as u64);
        }

        #[test]
        fn round_trip_any_valid_record(
            key in proptest::collection::vec(0x21u8..=0x7e, 1..=MAX_KEY_LEN),
            value in proptest::collection::vec(0x21u8..=0x7e, 1..512),
            seq in any::<u64>(),
            keys in any::<u64>(),
        ) {
            let mut bytes = Vec::new();
            encode_record(&key, &value, seq, keys, &mut bytes);
            let (r, next) = dec(&bytes, 0, FORMAT_VERSION).unwrap();
            prop_assert_eq!(r.key, &key[..]);
            prop_assert_eq!(r.value, &value[..]);
            prop_assert_eq!((r.seq, r.keys), (seq, keys));
            prop_assert_eq!(next, bytes.len());
            prop_assert_eq!(decode_len(&bytes, FORMAT_VERSION), Some(bytes.len() as u64));
            let v1 = rec1(&key, &value);
            let (r, next) = dec(&v1, 0, FORMAT_V1).unwrap();
            prop_assert_eq!((r.key, r.value, next), (&key[..], &value[..], v1.len()));
        }

        #[test]
        fn corrupted_length_fields_stay_in_bounds(
            key_len in any::<u16>(), value_len in any::<u32>(),
            tail in proptest::collection::vec(any::<u8>(), 0..300),
            v2 in any::<bool>(),
        ) {
            let version = if v2 { FORMAT_VERSION } else { FORMAT_V1 };
            let mut bytes = key_len.to_le_bytes().to_vec();
            bytes.extend_from_slice(&value_len.to_le_bytes());
            bytes.extend(tail);
            if let Ok((_, next)) = decode_entry(&bytes, 0, 0, version) {
                prop_assert!(next <= bytes.len());
            }
        }
    }
}
