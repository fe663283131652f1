//! The on-memfd format of `mk-demo-kv`: a fixed header followed by an append-only log.
//!
//! Pure encode/decode functions over byte slices, with no I/O and no allocation on the
//! decode path, because a successor decodes a memfd written by another process (its
//! contents are untrusted).
//!
//! ```text
//! header (64 bytes, little-endian)
//!   0..8    magic            "MKDKVLOG"
//!   8..12   format version   u32 (1)
//!   12..16  header length    u32 (64)
//!   16..20  header CRC32     u32, over bytes 0..16 (the immutable fields)
//!   20..24  reserved         zero
//!   24..32  capacity         u64, size of the memfd after the last grow (advisory)
//!   32..40  committed        u64, bytes of log after the header that are committed
//!   40..64  reserved         zero
//! log (from byte 64): records, back to back
//!   key_len u16 | value_len u32 | key | value | CRC32 u32 over the preceding bytes
//! ```
//!
//! `committed` is the only commit point: a writer writes the record bytes, then advances
//! `committed` with a compare-and-swap (release ordering); a reader loads `committed`
//! (acquire) and never reads beyond it. The mutable fields are outside the header CRC because a writer can be
//! frozen (SIGSTOP, `cgroup.freeze`) at any instruction: a CRC over `committed` could be
//! torn, while `committed` itself is a single aligned 8-byte store. `capacity` can lag the
//! real memfd size (the writer was frozen between `ftruncate` and the header update), so
//! the memfd size from `fstat` is authoritative and `capacity` is only checked not to
//! exceed it.
//!
//! Keys are 1..=[`MAX_KEY_LEN`] and values 1..=[`MAX_VALUE_LEN`] bytes of printable,
//! non-space ASCII (`0x21..=0x7e`), the same limits the text protocol enforces.

use std::fmt;

/// First 8 bytes of a formatted memfd.
pub const MAGIC: [u8; 8] = *b"MKDKVLOG";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Length of the header, in bytes; the log starts right after it.
pub const HEADER_LEN: usize = 64;
/// Offset of the header CRC field.
pub const OFF_HEADER_CRC: usize = 16;
/// Offset of the `capacity` field.
pub const OFF_CAPACITY: usize = 24;
/// Offset of the `committed` field (8-byte aligned: it is accessed atomically).
pub const OFF_COMMITTED: usize = 32;
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 250;
/// Longest value, in bytes.
pub const MAX_VALUE_LEN: usize = 65_536;
/// Bytes of a record besides its key and value (lengths and CRC).
pub const RECORD_OVERHEAD: usize = 2 + 4 + 4;

/// Whether a byte may appear in a key or value (printable, non-space ASCII).
pub fn valid_byte(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// Index of the first byte of `bytes` outside `0x21..=0x7e`, if any. Checks 64-byte
/// chunks without branches first (this runs over every stored byte when a successor
/// adopts a memfd).
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
    /// Memfd size recorded at the last grow (advisory, never above the real size).
    pub capacity: u64,
    /// Committed log bytes after the header.
    pub committed: u64,
}

/// Encodes a fresh header (nothing committed).
pub fn encode_header(capacity: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    let crc = crc32fast::hash(&h[0..OFF_HEADER_CRC]);
    h[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    h[OFF_CAPACITY..OFF_CAPACITY + 8].copy_from_slice(&capacity.to_le_bytes());
    h
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
    if version != FORMAT_VERSION {
        return Err(LogError::UnsupportedVersion { found: version });
    }
    let header_len = u32_at(bytes, 12);
    if header_len as usize != HEADER_LEN {
        return Err(LogError::BadHeaderLen { found: header_len });
    }
    let stored = u32_at(bytes, OFF_HEADER_CRC);
    let computed = crc32fast::hash(&bytes[0..OFF_HEADER_CRC]);
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
    Ok(Header {
        capacity,
        committed,
    })
}

/// Size of the record holding `key` and `value`.
pub fn record_len(key_len: usize, value_len: usize) -> usize {
    RECORD_OVERHEAD + key_len + value_len
}

/// Encodes a record into `out` (appended). The caller checked the key and value.
pub fn encode_record(key: &[u8], value: &[u8], out: &mut Vec<u8>) {
    debug_assert!(key.len() <= MAX_KEY_LEN && value.len() <= MAX_VALUE_LEN);
    let start = out.len();
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// A record borrowed from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    /// Offset of the value within the slice given to [`decode_record`].
    pub value_offset: usize,
}

/// What is wrong with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFault {
    /// The record extends past the committed length.
    Truncated { need: usize, have: usize },
    /// A length field is zero or above its limit.
    BadLength {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// A key or value byte outside `0x21..=0x7e`.
    BadByte { field: &'static str, at: usize },
    /// The record CRC does not match.
    Crc { stored: u32, computed: u32 },
}

impl fmt::Display for RecordFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { need, have } => write!(
                f,
                "record needs {need} bytes but only {have} remain before the committed length"
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
        }
    }
}

/// Decodes the record at `offset` of `log` (the committed log bytes). Returns the record
/// and the offset of the next one. Never panics and never allocates.
pub fn decode_record(log: &[u8], offset: usize) -> Result<(RecordRef<'_>, usize), RecordFault> {
    let rest = log.get(offset..).unwrap_or(&[]);
    if rest.len() < RECORD_OVERHEAD {
        return Err(RecordFault::Truncated {
            need: RECORD_OVERHEAD,
            have: rest.len(),
        });
    }
    let key_len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
    let value_len = u32::from_le_bytes([rest[2], rest[3], rest[4], rest[5]]) as usize;
    if key_len == 0 || key_len > MAX_KEY_LEN {
        return Err(RecordFault::BadLength {
            field: "key",
            len: key_len,
            max: MAX_KEY_LEN,
        });
    }
    if value_len == 0 || value_len > MAX_VALUE_LEN {
        return Err(RecordFault::BadLength {
            field: "value",
            len: value_len,
            max: MAX_VALUE_LEN,
        });
    }
    let total = record_len(key_len, value_len);
    if rest.len() < total {
        return Err(RecordFault::Truncated {
            need: total,
            have: rest.len(),
        });
    }
    let body = &rest[..total - 4];
    let stored = u32_at(rest, total - 4);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(RecordFault::Crc { stored, computed });
    }
    let key = &body[6..6 + key_len];
    let value = &body[6 + key_len..];
    if let Some(at) = first_invalid_byte(key) {
        return Err(RecordFault::BadByte { field: "key", at });
    }
    if let Some(at) = first_invalid_byte(value) {
        return Err(RecordFault::BadByte { field: "value", at });
    }
    Ok((
        RecordRef {
            key,
            value,
            value_offset: offset + 6 + key_len,
        },
        offset + total,
    ))
}

/// Decodes every record of `log` from `offset` to its end, calling `f(record_offset,
/// record)` for each. Returns the number of records. `base` is added to offsets in errors
/// (the absolute memfd offset of `log[0]`).
pub fn scan<'a>(
    log: &'a [u8],
    mut offset: usize,
    base: u64,
    mut f: impl FnMut(usize, RecordRef<'a>),
) -> Result<u64, LogError> {
    let mut count = 0u64;
    while offset < log.len() {
        match decode_record(log, offset) {
            Ok((rec, next)) => {
                f(offset, rec);
                offset = next;
                count += 1;
            }
            Err(fault) => {
                return Err(LogError::Record {
                    offset: base + offset as u64,
                    index: count,
                    fault,
                });
            }
        }
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
        "kv-data memfd has format version {found}; this build reads version {FORMAT_VERSION} only"
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
    #[error("kv-data memfd record #{index} at byte offset {offset} is corrupt: {fault}")]
    Record {
        offset: u64,
        index: u64,
        fault: RecordFault,
    },
    #[error(
        "kv-data memfd committed length went backwards from {indexed} to {committed}: another process rewrote the log"
    )]
    WentBackwards { indexed: u64, committed: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(k: &[u8], v: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(k, v, &mut out);
        out
    }

    #[test]
    fn record_round_trip_and_scan() {
        let mut log = rec(b"alpha", b"1");
        log.extend(rec(b"beta", b"two"));
        let (r, next) = decode_record(&log, 0).unwrap();
        assert_eq!((r.key, r.value), (&b"alpha"[..], &b"1"[..]));
        assert_eq!(next, record_len(5, 1));
        assert_eq!(log[r.value_offset], b'1');
        let mut seen = Vec::new();
        let n = scan(&log, 0, 64, |off, r| seen.push((off, r.key.to_vec()))).unwrap();
        assert_eq!(n, 2);
        assert_eq!(seen, vec![(0, b"alpha".to_vec()), (next, b"beta".to_vec())]);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let good = rec(b"key", b"value");
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(decode_record(&bad, 0).is_err(), "flip at {i} not detected");
        }
    }

    #[test]
    fn faults_are_named() {
        let good = rec(b"key", b"value");
        assert!(matches!(
            decode_record(&good[..good.len() - 1], 0),
            Err(RecordFault::Truncated { .. })
        ));
        let mut bad = good.clone();
        bad[0] = 0;
        bad[1] = 0;
        assert!(matches!(
            decode_record(&bad, 0),
            Err(RecordFault::BadLength { field: "key", .. })
        ));
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            decode_record(&bad, 0),
            Err(RecordFault::Crc { .. })
        ));
        // A space in the value with a valid CRC is still refused.
        let bad = rec(b"key", b"va ue");
        assert!(matches!(
            decode_record(&bad, 0),
            Err(RecordFault::BadByte {
                field: "value",
                at: 2
            })
        ));
        let err = scan(&bad, 0, 64, |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("byte offset 64"), "{err}");
    }

    #[test]
    fn header_checks() {
        let h = encode_header(4096);
        assert_eq!(
            decode_header(&h, 4096).unwrap(),
            Header {
                capacity: 4096,
                committed: 0
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
        b[8] = 2;
        assert!(matches!(
            decode_header(&b, 4096),
            Err(LogError::UnsupportedVersion { found: 2 })
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
        ) {
            // Either an error or a record that lies inside the input.
            if let Ok((r, next)) = decode_record(&bytes, offset) {
                prop_assert!(next <= bytes.len());
                prop_assert!(r.value_offset + r.value.len() <= bytes.len());
            }
            let _ = scan(&bytes, 0, 0, |_, _| {});
            let _ = decode_header(&bytes, bytes.len() as u64);
        }

        #[test]
        fn round_trip_any_valid_record(
            key in proptest::collection::vec(0x21u8..=0x7e, 1..=MAX_KEY_LEN),
            value in proptest::collection::vec(0x21u8..=0x7e, 1..512),
        ) {
            let bytes = rec(&key, &value);
            let (r, next) = decode_record(&bytes, 0).unwrap();
            prop_assert_eq!(r.key, &key[..]);
            prop_assert_eq!(r.value, &value[..]);
            prop_assert_eq!(next, bytes.len());
        }

        #[test]
        fn corrupted_length_fields_stay_in_bounds(
            key_len in any::<u16>(), value_len in any::<u32>(),
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = key_len.to_le_bytes().to_vec();
            bytes.extend_from_slice(&value_len.to_le_bytes());
            bytes.extend(tail);
            if let Ok((_, next)) = decode_record(&bytes, 0) {
                prop_assert!(next <= bytes.len());
            }
        }
    }
}
