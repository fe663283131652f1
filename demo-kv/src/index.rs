//! The index kept inside the memfd (format version 2): an open-addressing hash table with
//! linear probing, whose slots another process may have written (untrusted) and a writer
//! may have left half-updated when it was frozen.
//!
//! ```text
//! slot (16 bytes, two u64 words, each accessed only with 8-byte atomic operations)
//!   hash  0 (free), or in bits 0..48 the key's hash h (SipHash-2-4 of the key under the
//!         header's hash key, low 48 bits, 0 mapped to 1) and in bits 48..64 a 16-bit
//!         check of h alone
//!   loc   0 (no record yet), or the memfd offset of the key's latest data record in bits
//!         0..40 and a 24-bit check of (h, offset) in bits 40..64
//! home slot of a key: h mod 2^bits; probing goes to the next slot, wrapping around
//! ```
//!
//! Every word only ever moves forward, each by one compare-and-swap: `hash` from 0 to its
//! final value (a slot is claimed for a hash once and for all), `loc` from 0 to an offset
//! and then only to larger offsets (a key's newer record is later in the log). Slots are
//! never freed or moved inside a table; growing the table builds a new one in a new
//! region. Hence a writer thawed after another process changed the table cannot undo
//! anything: its compare-and-swap fails when the word moved, and re-examining the slot
//! shows the newer state. Nor can a key end up in two slots: a key goes to the first slot
//! of its probe sequence that is free or claimed for its hash, and that prefix only fills.
//!
//! States of a slot: free (`hash` 0, `loc` 0); claimed (`hash` set, `loc` 0: a writer was
//! frozen between its two operations; a lookup steps over it, an insert of the same hash
//! completes it); entry (both set). `loc` set without `hash`, or a check that does not
//! match, is corruption: [`IndexFault`], and so is an entry naming an offset outside the
//! committed log (entries are only published for committed records). A damaged hash word
//! goes unnoticed only if both its checks pass (about 2^-40 for random damage), a damaged
//! loc word if its check passes (2^-24) and the offset it then names is a record of the
//! same key (an older one) or of a key with the same hash. The table never decides
//! alone that a record belongs to a key: the caller checks the key (and, for reads, the
//! record's CRC) of every candidate.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::log::MAX_OFFSET;

/// Bits of a key's hash kept in its slot (and of a record offset).
const LOW48: u64 = (1 << 48) - 1;

/// The 48-bit hash of `key` under the memfd's hash key (never 0).
pub fn key_hash(hash_key: [u64; 2], key: &[u8]) -> u64 {
    match siphash24(hash_key[0], hash_key[1], key) & LOW48 {
        0 => 1,
        h => h,
    }
}

/// SipHash-2-4 (Aumasson and Bernstein) of `data` under the key `(k0, k1)`.
pub fn siphash24(k0: u64, k1: u64, data: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let round = |v: &mut [u64; 4]| {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    };
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let m = u64::from_le_bytes(w);
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
    }
    let mut last = (data.len() as u64) << 56;
    for (i, b) in chunks.remainder().iter().enumerate() {
        last |= u64::from(*b) << (8 * i);
    }
    v[3] ^= last;
    round(&mut v);
    round(&mut v);
    v[0] ^= last;
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// murmur3's 64-bit finaliser.
fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Bits of a record offset in a slot's `loc`.
const OFF_MASK: u64 = MAX_OFFSET - 1;

/// The 24-bit check of a slot's `loc` holding `off` for hash `hash`: top 24 bits of
/// `fmix64(hash ^ off * 0x9e3779b97f4a7c15)`.
pub fn check24(hash: u64, off: u64) -> u64 {
    fmix64(hash ^ off.wrapping_mul(0x9e37_79b9_7f4a_7c15)) >> 40
}

/// The 16-bit check of a slot's `hash` word: top 16 bits of
/// `fmix64(hash ^ 0x6b65_7968_6173_6821)`.
pub fn hash_check16(hash: u64) -> u64 {
    fmix64(hash ^ 0x6b65_7968_6173_6821) >> 48
}

/// The `hash` word for the 48-bit hash `hash`.
pub fn hash_word(hash: u64) -> u64 {
    debug_assert!(hash > 0 && hash <= LOW48);
    hash | (hash_check16(hash) << 48)
}

/// The `loc` word for the record at memfd offset `off` (`0 < off < 2^40`).
pub fn loc_word(hash: u64, off: u64) -> u64 {
    debug_assert!(off > 0 && off < MAX_OFFSET);
    off | (check24(hash, off) << 40)
}

/// A slot that cannot be what the protocol leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IndexFault {
    #[error("index slot {slot} has a record offset but no hash")]
    LocWithoutHash { slot: usize },
    #[error("index slot {slot} fails its check (hash {hash:#018x}, loc {loc:#018x})")]
    Check { slot: usize, hash: u64, loc: u64 },
    #[error("index slot {slot} has a hash word that fails its check ({hash:#018x})")]
    HashCheck { slot: usize, hash: u64 },
    #[error("index slot {slot} names memfd offset {off}, outside the committed log")]
    OutsideLog { slot: usize, off: u64 },
    #[error("index table of {slots} slots has no free slot left")]
    Full { slots: usize },
    #[error("index slot {slot} keeps changing under this process")]
    Unstable { slot: usize },
    #[error(
        "index probing went past its limit of {limit} slots (a legitimate table at its load factor never gets near it)"
    )]
    ProbeLimit { limit: usize },
}

/// Most slots one lookup or insert examines ([`Table::new`]). At the load factor the
/// writer keeps (at most 3/4), a run of occupied slots this long has a probability far
/// below 2^-100 with a random hash key, so reaching it means the table is corrupt (or was
/// built to be slow): the caller rebuilds the index instead of walking it.
pub const MAX_PROBES: usize = 4096;

/// Why a table operation stopped: the table is corrupt, or the caller's key check failed.
#[derive(Debug)]
pub enum TableError<E> {
    Index(IndexFault),
    Key(E),
}

impl<E> From<IndexFault> for TableError<E> {
    fn from(f: IndexFault) -> Self {
        Self::Index(f)
    }
}

/// One slot as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Free,
    Claimed { hash: u64 },
    Entry { hash: u64, off: u64 },
}

/// What [`Table::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The key had no slot.
    New,
    /// The key's slot pointed to an older record, now to this one.
    Replaced { old: u64 },
    /// The key's slot already points to this record or a newer one (left alone).
    Kept { current: u64 },
}

/// A table over its slot words (`2 * 2^bits` of them, slot `i` at `2i` and `2i + 1`), with
/// a budget of slot examinations shared by all operations through this value.
#[derive(Debug, Clone)]
pub struct Table<'a> {
    words: &'a [AtomicU64],
    mask: usize,
    probes: Cell<usize>,
    limit: usize,
    /// Entries must name offsets in `lo..hi` (the committed log).
    lo: u64,
    hi: u64,
}

impl<'a> Table<'a> {
    /// The table over `words` (their count must be twice a power of two), for one
    /// operation: at most [`MAX_PROBES`] slots examined.
    pub fn new(words: &'a [AtomicU64]) -> Self {
        let slots = words.len() / 2;
        assert!(
            slots.is_power_of_two() && words.len() == 2 * slots,
            "slot words"
        );
        Self {
            words,
            mask: slots - 1,
            probes: Cell::new(0),
            limit: MAX_PROBES,
            lo: 1,
            hi: MAX_OFFSET,
        }
    }

    /// The same table whose entries must name memfd offsets in `lo..hi`: the committed
    /// log. An entry outside is a fault: entries are only published for committed records,
    /// so one past `committed` is damage, never something to read.
    pub fn within(mut self, lo: u64, hi: u64) -> Self {
        self.lo = lo;
        self.hi = hi;
        self
    }

    /// The same table with a budget of `limit` slot examinations in all (for a batch of
    /// operations).
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Slots examined so far.
    pub fn probes(&self) -> usize {
        self.probes.get()
    }

    fn probe(&self, i: usize) -> Result<Slot, IndexFault> {
        let n = self.probes.get() + 1;
        if n > self.limit {
            return Err(IndexFault::ProbeLimit { limit: self.limit });
        }
        self.probes.set(n);
        self.slot(i)
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.mask + 1
    }

    fn home(&self, hash: u64) -> usize {
        (hash as usize) & self.mask
    }

    fn hash_word(&self, i: usize) -> &AtomicU64 {
        &self.words[2 * i]
    }

    fn loc_word(&self, i: usize) -> &AtomicU64 {
        &self.words[2 * i + 1]
    }

    /// Reads slot `i` (checked, including the offset bounds).
    pub fn slot(&self, i: usize) -> Result<Slot, IndexFault> {
        let hash = self.hash_word(i).load(Ordering::Acquire);
        let loc = self.loc_word(i).load(Ordering::Acquire);
        let slot = decode_slot(i, hash, loc)?;
        if let Slot::Entry { off, .. } = slot {
            if off < self.lo || off >= self.hi {
                return Err(IndexFault::OutsideLog { slot: i, off });
            }
        }
        Ok(slot)
    }

    /// The slot of the key whose hash is `hash`: `is_key(off)` tells whether the record at
    /// memfd offset `off` holds the key (it is asked only about entries with that hash).
    /// Returns the slot and the record offset. At most one pass over the table.
    pub fn find<E>(
        &self,
        hash: u64,
        mut is_key: impl FnMut(u64) -> Result<bool, E>,
    ) -> Result<Option<(usize, u64)>, TableError<E>> {
        let mut i = self.home(hash);
        for _ in 0..self.slots() {
            match self.probe(i)? {
                Slot::Free => return Ok(None),
                Slot::Entry { hash: h, off } if h == hash => {
                    if is_key(off).map_err(TableError::Key)? {
                        return Ok(Some((i, off)));
                    }
                }
                Slot::Claimed { .. } | Slot::Entry { .. } => {}
            }
            i = (i + 1) & self.mask;
        }
        Err(IndexFault::Full {
            slots: self.slots(),
        }
        .into())
    }

    /// Points the key whose hash is `hash` at its record at memfd offset `off`, unless its
    /// slot already points to that record or a newer one. `is_key` as for [`Table::find`].
    /// Every change is one compare-and-swap of a word from the value this call read.
    pub fn insert<E>(
        &self,
        hash: u64,
        off: u64,
        mut is_key: impl FnMut(u64) -> Result<bool, E>,
    ) -> Result<Inserted, TableError<E>> {
        debug_assert!(hash != 0 && off > 0 && off < MAX_OFFSET);
        let new_loc = loc_word(hash, off);
        let mut i = self.home(hash);
        for _ in 0..self.slots() {
            // Re-examine the slot after a failed compare-and-swap: it moved forward. A few
            // rounds at most (one process runs at a time); more is corruption.
            let mut done = false;
            for _ in 0..4 {
                match self.probe(i)? {
                    Slot::Free => {
                        // Claim it for this hash (or see who did).
                        let _ = self.hash_word(i).compare_exchange(
                            0,
                            hash_word(hash),
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                    }
                    Slot::Claimed { hash: h } if h == hash => {
                        if self
                            .loc_word(i)
                            .compare_exchange(0, new_loc, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                        {
                            return Ok(Inserted::New);
                        }
                    }
                    Slot::Entry { hash: h, off: old } if h == hash => {
                        if !is_key(old).map_err(TableError::Key)? {
                            done = true;
                        } else if old >= off {
                            return Ok(Inserted::Kept { current: old });
                        } else if self
                            .loc_word(i)
                            .compare_exchange(
                                loc_word(hash, old),
                                new_loc,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            )
                            .is_ok()
                        {
                            return Ok(Inserted::Replaced { old });
                        }
                    }
                    Slot::Claimed { .. } | Slot::Entry { .. } => done = true,
                }
                if done {
                    break;
                }
            }
            if !done {
                return Err(IndexFault::Unstable { slot: i }.into());
            }
            i = (i + 1) & self.mask;
        }
        Err(IndexFault::Full {
            slots: self.slots(),
        }
        .into())
    }

    /// Puts an entry into the first free slot of its probe sequence, without looking for
    /// the key: for filling a table nobody else sees yet, from distinct keys.
    pub fn insert_new(&self, hash: u64, off: u64) -> Result<(), IndexFault> {
        let mut i = self.home(hash);
        for _ in 0..self.slots() {
            if self.slot(i)? == Slot::Free {
                self.hash_word(i).store(hash_word(hash), Ordering::Relaxed);
                self.loc_word(i)
                    .store(loc_word(hash, off), Ordering::Release);
                return Ok(());
            }
            i = (i + 1) & self.mask;
        }
        Err(IndexFault::Full {
            slots: self.slots(),
        })
    }

    /// Every entry (hash, record offset), in slot order; claimed slots are skipped.
    pub fn entries(&self) -> impl Iterator<Item = Result<(u64, u64), IndexFault>> + '_ {
        (0..self.slots()).filter_map(move |i| match self.slot(i) {
            Ok(Slot::Entry { hash, off }) => Some(Ok((hash, off))),
            Ok(Slot::Free | Slot::Claimed { .. }) => None,
            Err(e) => Some(Err(e)),
        })
    }
}

/// Decodes slot `i` from its two words (hashes in [`Slot`] are the 48-bit hashes).
pub fn decode_slot(i: usize, hash_w: u64, loc: u64) -> Result<Slot, IndexFault> {
    if hash_w == 0 {
        return if loc == 0 {
            Ok(Slot::Free)
        } else {
            Err(IndexFault::LocWithoutHash { slot: i })
        };
    }
    let hash = hash_w & LOW48;
    if hash == 0 || hash_w >> 48 != hash_check16(hash) {
        return Err(IndexFault::HashCheck {
            slot: i,
            hash: hash_w,
        });
    }
    if loc == 0 {
        return Ok(Slot::Claimed { hash });
    }
    let off = loc & OFF_MASK;
    if off == 0 || loc >> 40 != check24(hash, off) {
        return Err(IndexFault::Check {
            slot: i,
            hash: hash_w,
            loc,
        });
    }
    Ok(Slot::Entry { hash, off })
}

/// Most keys a table of 2^`bits` slots takes before it is replaced by a larger one (load
/// factor 3/4).
pub fn max_keys(bits: u32) -> u64 {
    (1u64 << bits) / 4 * 3
}

/// Slot-count exponent of a new table for `keys` keys: load at most 1/2, at least 2^6
/// (above 2^63 slots: 64, which no region accepts).
pub fn bits_for(keys: u64) -> u32 {
    keys.saturating_mul(2)
        .max(1)
        .checked_next_power_of_two()
        .map_or(64, u64::trailing_zeros)
        .max(crate::log::INDEX_MIN_BITS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn words(bits: u32) -> Vec<AtomicU64> {
        (0..2usize << bits).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    #[allow(deprecated)]
    fn siphash_matches_the_reference() {
        // The reference vector of the SipHash paper (key 00..0f, message 00..0e).
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let msg: Vec<u8> = (0..15).collect();
        assert_eq!(siphash24(k0, k1, &msg), 0xa129_ca61_49be_45e5);
        // And std's SipHash-2-4 for every length up to 40.
        for n in 0..40u8 {
            let data: Vec<u8> = (0..n).map(|b| b.wrapping_mul(37)).collect();
            let mut h = std::hash::SipHasher::new_with_keys(k0, k1);
            std::hash::Hasher::write(&mut h, &data);
            assert_eq!(
                siphash24(k0, k1, &data),
                std::hash::Hasher::finish(&h),
                "len {n}"
            );
        }
        assert_ne!(key_hash([1, 2], b"a"), key_hash([1, 3], b"a"));
    }

    #[test]
    fn slot_states_and_checks() {
        let h7 = hash_word(7);
        assert_eq!(decode_slot(0, 0, 0), Ok(Slot::Free));
        assert_eq!(decode_slot(0, h7, 0), Ok(Slot::Claimed { hash: 7 }));
        assert_eq!(
            decode_slot(0, h7, loc_word(7, 100)),
            Ok(Slot::Entry { hash: 7, off: 100 })
        );
        assert!(matches!(
            decode_slot(3, 0, 5),
            Err(IndexFault::LocWithoutHash { slot: 3 })
        ));
        // The other key's loc, a flipped offset bit, a hash without its check.
        assert!(matches!(
            decode_slot(0, hash_word(8), loc_word(7, 100)),
            Err(IndexFault::Check { .. })
        ));
        assert!(matches!(
            decode_slot(0, h7, loc_word(7, 100) ^ 1),
            Err(IndexFault::Check { .. })
        ));
        assert!(matches!(
            decode_slot(0, 7, 0),
            Err(IndexFault::HashCheck { .. })
        ));
        assert!(matches!(
            decode_slot(0, h7 ^ (1 << 20), loc_word(7, 100)),
            Err(IndexFault::HashCheck { .. })
        ));
        assert!(decode_slot(0, h7 & !LOW48, 0).is_err());
        // A check word with offset 0 is not an entry.
        assert!(decode_slot(0, h7, check24(7, 0) << 40).is_err());
        // Offsets outside the committed log are faults.
        let w = words(6);
        let t = Table::new(&w).within(64, 1000);
        t.insert_new(7, 500).unwrap();
        t.insert_new(9, 1000).unwrap();
        assert_eq!(t.slot(7), Ok(Slot::Entry { hash: 7, off: 500 }));
        assert_eq!(
            t.slot(9),
            Err(IndexFault::OutsideLog { slot: 9, off: 1000 })
        );
        assert!(key_hash([1, 2], b"k") <= LOW48);
        assert_eq!(bits_for(0), 6);
        assert_eq!(bits_for(32), 6);
        assert_eq!(bits_for(33), 7);
        assert_eq!(bits_for(u64::MAX), 64);
        assert_eq!(bits_for(1 << 62), 63);
        assert_eq!(max_keys(6), 48);
    }

    /// Keys are small integers; "record" offsets map to keys through `recs`.
    fn is_key(recs: &HashMap<u64, u64>, key: u64) -> impl Fn(u64) -> Result<bool, ()> + '_ {
        move |off| Ok(recs.get(&off) == Some(&key))
    }

    #[test]
    fn insert_find_update_and_collisions() {
        let w = words(6);
        let t = Table::new(&w).with_limit(usize::MAX);
        let mut recs = HashMap::new();
        // Three keys with the same hash (collisions) and one other.
        for (off, key, hash) in [(100, 1, 5), (200, 2, 5), (300, 3, 5), (400, 4, 9)] {
            recs.insert(off, key);
            assert_eq!(
                t.insert(hash, off, is_key(&recs, key)).unwrap(),
                Inserted::New
            );
        }
        assert_eq!(t.find(5, is_key(&recs, 2)).unwrap(), Some((6, 200)));
        assert_eq!(t.find(5, is_key(&recs, 9)).unwrap(), None);
        recs.insert(500, 2);
        assert_eq!(
            t.insert(5, 500, is_key(&recs, 2)).unwrap(),
            Inserted::Replaced { old: 200 }
        );
        // An older record does not replace a newer one.
        assert_eq!(
            t.insert(5, 200, is_key(&recs, 2)).unwrap(),
            Inserted::Kept { current: 500 }
        );
        assert_eq!(t.find(5, is_key(&recs, 2)).unwrap(), Some((6, 500)));
        let all: Vec<_> = t.entries().map(Result::unwrap).collect();
        assert_eq!(all, vec![(5, 100), (5, 500), (5, 300), (9, 400)]);
        // A claimed slot (frozen writer) is stepped over by lookups and completed by an
        // insert of the same hash.
        w[2 * 20].store(hash_word(20), Ordering::SeqCst);
        assert_eq!(t.find(20, is_key(&recs, 7)).unwrap(), None);
        recs.insert(600, 7);
        assert_eq!(t.insert(20, 600, is_key(&recs, 7)).unwrap(), Inserted::New);
        assert_eq!(t.slot(20).unwrap(), Slot::Entry { hash: 20, off: 600 });
    }

    #[test]
    fn a_full_or_corrupt_table_is_reported() {
        let w = words(6);
        let t = Table::new(&w).with_limit(usize::MAX);
        for i in 0..64u64 {
            t.insert_new(i + 1, 100 + i).unwrap();
        }
        let recs = HashMap::new();
        assert!(matches!(
            t.find(1000, is_key(&recs, 1)),
            Err(TableError::Index(IndexFault::Full { slots: 64 }))
        ));
        assert!(t.insert_new(99, 1).is_err());
        w[1].fetch_xor(1 << 50, Ordering::SeqCst);
        assert!(matches!(
            t.find(64, is_key(&recs, 1)),
            Err(TableError::Index(IndexFault::Check { slot: 0, .. }))
        ));
        assert!(t.entries().any(|e| e.is_err()));
    }

    #[test]
    fn probing_is_bounded() {
        // Every slot claimed (a writer frozen 2^13 times, or a table built to be slow).
        let w = words(13);
        for i in 0..(1 << 13) {
            w[2 * i].store(hash_word(77), Ordering::SeqCst);
        }
        let t = Table::new(&w);
        assert!(matches!(
            t.find(5, |_| Ok::<bool, ()>(false)),
            Err(TableError::Index(IndexFault::ProbeLimit {
                limit: MAX_PROBES
            }))
        ));
        assert_eq!(t.probes(), MAX_PROBES);
        // A batch budget is shared by its operations.
        let w = words(8);
        let t = Table::new(&w).with_limit(10);
        let recs = HashMap::new();
        // Same hash, different keys: 2, 3, then 4 probes (each claims a slot, reads it
        // again, fills it).
        for n in 0..3u64 {
            t.insert(1, 100 + n, is_key(&recs, 9)).unwrap();
        }
        assert_eq!(t.probes(), 9);
        assert!(matches!(
            t.insert(1, 200, is_key(&recs, 9)),
            Err(TableError::Index(IndexFault::ProbeLimit { limit: 10 }))
        ));
    }

    proptest! {
        /// Against a model: after any sequence of writes (offsets increasing, as in the
        /// log), each key's slot points to its latest record, no key has two slots, and
        /// re-inserting an old record (a thawed writer) changes nothing.
        #[test]
        fn table_matches_a_model(
            ops in proptest::collection::vec(0u64..40, 1..120),
            spread in 1u64..8,
            replay in proptest::collection::vec(0usize..120, 0..20),
        ) {
            let w = words(7);
            let t = Table::new(&w).with_limit(usize::MAX);
            let mut recs = HashMap::new();
            let mut latest = HashMap::new();
            let mut log = Vec::new();
            for (n, key) in ops.iter().enumerate() {
                // Few distinct hashes: many collisions (and full-hash collisions).
                let hash = key % spread + 1;
                let off = 64 + n as u64 * 10;
                recs.insert(off, *key);
                t.insert(hash, off, is_key(&recs, *key)).unwrap();
                latest.insert(*key, (hash, off));
                log.push((*key, hash, off));
            }
            for r in replay {
                if let Some((key, hash, off)) = log.get(r) {
                    t.insert(*hash, *off, is_key(&recs, *key)).unwrap();
                }
            }
            for (key, (hash, off)) in &latest {
                prop_assert_eq!(t.find(*hash, is_key(&recs, *key)).unwrap().map(|f| f.1), Some(*off));
            }
            let entries: Vec<_> = t.entries().map(Result::unwrap).collect();
            prop_assert_eq!(entries.len(), latest.len());
        }

        /// Arbitrary slot words never make a lookup or insert panic or loop.
        #[test]
        fn arbitrary_slots_never_panic(
            raw in proptest::collection::vec(any::<u64>(), 128),
            sparse in any::<bool>(),
            hash in 1u64..=LOW48,
            off in 64u64..1 << 40,
        ) {
            let w: Vec<AtomicU64> = raw
                .iter()
                .enumerate()
                .map(|(i, x)| AtomicU64::new(if sparse && i % 3 != 0 { 0 } else { *x }))
                .collect();
            let t = Table::new(&w).with_limit(usize::MAX);
            let _ = t.find(hash, |_| Ok::<bool, ()>(false));
            let _ = t.insert(hash, off, |o| Ok::<bool, ()>(o == off));
            let _ = t.entries().count();
        }
    }
}
