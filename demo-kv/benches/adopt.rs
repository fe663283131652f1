//! Adoption time of a `kv-data` memfd by data size (a bench binary, not a timed test):
//! what a successor spends in `Store::adopt` plus its first `GET` before it can answer, the
//! part of mk-demo-kv's start-up that grew with its data before the index moved into the
//! memfd.
//!
//! `CARGO_TARGET_DIR=/tmp/tgt-kv cargo bench -p mk-demo-kv --bench adopt`. Environment:
//! `MK_ADOPT_SIZES_MIB` (default `1,64,1024`), `MK_ADOPT_RUNS` (adoptions per memfd, default
//! 7; the median is reported). For each size, two memfds holding `preload-<n>` keys with
//! 1000-byte values until that many MiB are used (as `--preload-mib`):
//!
//! * `current`: written through `Store::set`, in the format this build writes;
//! * `format 1`: the same records in the previous release's format (no index), encoded
//!   here, which this build adopts by verifying every record (the previous behaviour).
//!
//! Prints one line per memfd with the median adoption time, its ratio to the 1 MiB memfd of
//! the same kind in the same run, the mean of 20 000 random `GET`s after it, and the time
//! the writes took. Only public API and hand-encoded format-1 records are used, so the
//! file also builds against an earlier release of the crate (for a before/after run).

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use mk_demo_kv::server::{PRELOAD_VALUE_LEN, preload_value};
use mk_demo_kv::store::{MIN_CAPACITY, Store};

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn dup(s: &Store) -> OwnedFd {
    nix::unistd::dup(s.memfd()).expect("dup")
}

/// A memfd of `mib` MiB of preload records written through the store.
fn current(mib: u64) -> (Store, u64, Duration) {
    let size = mib << 20;
    let mut s = Store::create(MIN_CAPACITY.max(size / 4), size + (256 << 20)).expect("create");
    let mut value = vec![0u8; PRELOAD_VALUE_LEN];
    let mut n = 0u64;
    let t = Instant::now();
    while s.stats().used_bytes < size {
        preload_value(n, &mut value);
        s.set(format!("preload-{n}").as_bytes(), &value)
            .expect("set");
        n += 1;
    }
    (s, n, t.elapsed())
}

/// The same records in format 1: header (magic, version 1, length 64, CRC32 of bytes 0..16,
/// capacity, committed), then `key_len u16 | value_len u32 | key | value | CRC32`.
fn format1(mib: u64) -> (OwnedFd, u64, Duration) {
    let size = mib << 20;
    let t = Instant::now();
    let mut img = vec![0u8; 64];
    img[0..8].copy_from_slice(b"MKDKVLOG");
    img[8..12].copy_from_slice(&1u32.to_le_bytes());
    img[12..16].copy_from_slice(&64u32.to_le_bytes());
    let crc = crc32fast::hash(&img[0..16]);
    img[16..20].copy_from_slice(&crc.to_le_bytes());
    let mut value = vec![0u8; PRELOAD_VALUE_LEN];
    let mut n = 0u64;
    while (img.len() as u64) < size {
        preload_value(n, &mut value);
        let key = format!("preload-{n}");
        let start = img.len();
        img.extend_from_slice(&(key.len() as u16).to_le_bytes());
        img.extend_from_slice(&(value.len() as u32).to_le_bytes());
        img.extend_from_slice(key.as_bytes());
        img.extend_from_slice(&value);
        let crc = crc32fast::hash(&img[start..]);
        img.extend_from_slice(&crc.to_le_bytes());
        n += 1;
    }
    let committed = img.len() as u64 - 64;
    img.resize(img.len().next_multiple_of(4096), 0);
    let len = img.len() as u64;
    img[24..32].copy_from_slice(&len.to_le_bytes());
    img[32..40].copy_from_slice(&committed.to_le_bytes());
    let fd = nix::sys::memfd::memfd_create(
        "mk-demo-kv-bench",
        nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    )
    .expect("memfd");
    let mut off = 0;
    while off < img.len() {
        off += nix::sys::uio::pwrite(&fd, &img[off..], off as i64).expect("pwrite");
    }
    (fd, n, t.elapsed())
}

/// Median time of `runs` adoptions of `fd` (each followed by one GET), and the mean time of
/// 20 000 GETs of random keys on the last adopted store.
fn measure(fd: &OwnedFd, keys: u64, runs: usize) -> (Duration, Duration) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let copy = fd.try_clone().expect("dup");
        let t = Instant::now();
        let mut s = Store::adopt(copy, MIN_CAPACITY, 1 << 40).expect("adopt");
        let v = s.get(b"preload-0").expect("get");
        times.push(t.elapsed());
        assert!(v.is_some());
        last = Some(s);
    }
    times.sort();
    let mut s = last.expect("at least one run");
    let mut x = 0x9e37_79b9_u64;
    let gets = 20_000u32;
    let t = Instant::now();
    for _ in 0..gets {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = format!("preload-{}", x % keys);
        assert!(s.get(k.as_bytes()).expect("get").is_some());
    }
    (times[times.len() / 2], t.elapsed() / gets)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then tiny sizes.
    let quick = !std::env::args().any(|a| a == "--bench");
    let sizes = if quick {
        vec![1, 2]
    } else {
        env_list("MK_ADOPT_SIZES_MIB", "1,64,1024")
    };
    let runs = if quick {
        1
    } else {
        env_list("MK_ADOPT_RUNS", "7")
            .first()
            .copied()
            .unwrap_or(7)
            .max(1) as usize
    };
    println!(
        "| memfd | MiB | keys | adopt + first GET, median ms | vs 1st size | GET µs | writing s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for kind in ["current", "format 1"] {
        let mut base = None;
        for &mib in &sizes {
            let (fd, keys, wrote, keep) = if kind == "current" {
                let (s, keys, wrote) = current(mib);
                (dup(&s), keys, wrote, Some(s))
            } else {
                let (fd, keys, wrote) = format1(mib);
                (fd, keys, wrote, None)
            };
            let (adopt, get) = measure(&fd, keys, runs);
            let base = *base.get_or_insert(adopt);
            println!(
                "| {kind} | {mib} | {keys} | {:.3} | {:.1}x | {:.2} | {:.2} |",
                ms(adopt),
                adopt.as_secs_f64() / base.as_secs_f64(),
                get.as_secs_f64() * 1e6,
                wrote.as_secs_f64(),
            );
            drop(keep);
        }
    }
}
