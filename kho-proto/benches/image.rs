//! Handover image verification throughput vs a plain memcpy of the same bytes.
//!
//! Builds an image with 1 GiB of inline region payload (16 regions x 64 MiB) and measures,
//! in the same run and over the same bytes:
//!
//! * `memcpy`: copying the payload area into a pre-faulted buffer (the baseline),
//! * `crc32/1-thread`: `crc32fast` over the payload area,
//! * `sha256/1-thread`: `sha2` SHA-256 over the payload area,
//! * `crc32+sha256/1-thread`: the one-pass chunked digest the reader uses per region,
//! * `verify/parallel`: `ImageView::parse` + `verify` (all regions, rayon across regions),
//! * `verify/1-thread`: the same inside a one-thread rayon pool (the parallel speed-up),
//! * `build/parallel`: `ImageBuilder::build` from 16 borrowed 64 MiB slices.
//!
//! Run: `cargo bench -p kho-proto --bench image`. Results and ratios: docs/performance.md.
//! `KHO_BENCH_MIB` overrides the payload size (MiB) for a quick run.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kho_proto::image::{ImageBuilder, ImageView, RegionKind, VerifyOptions, digest_payload};
use sha2::{Digest, Sha256};

const REGIONS: usize = 16;

fn payload_mib() -> usize {
    std::env::var("KHO_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

/// Deterministic, incompressible-looking bytes (xorshift64).
fn fill(buf: &mut [u8]) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn bench(c: &mut Criterion) {
    let total = payload_mib() << 20;
    let per_region = total / REGIONS;
    let mut source = vec![0u8; total];
    fill(&mut source);

    let build = || {
        let mut b = ImageBuilder::new("bench", [7; 16], 1).unwrap();
        for (i, chunk) in source.chunks(per_region).enumerate() {
            b.region(RegionKind::WorkloadBlob, i as u32, 1, true, chunk)
                .unwrap();
        }
        b.build().unwrap()
    };
    let image = build();
    let view = ImageView::parse(&image).unwrap();
    let start = view.regions()[0].offset as usize;
    let end = start + total; // 64 MiB regions are 8-aligned: contiguous payload area
    let area = &image[start..end];
    let mut dst = vec![1u8; total]; // pre-faulted

    eprintln!(
        "payload {} MiB in {REGIONS} regions; rayon threads {}; sha_ni in /proc/cpuinfo: {}",
        payload_mib(),
        rayon::current_num_threads(),
        std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|s| s.contains(" sha_ni"))
    );

    let mut g = c.benchmark_group(format!("image-{}MiB", payload_mib()));
    g.throughput(Throughput::Bytes(total as u64));
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(8));

    g.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(area));
            black_box(&dst);
        });
    });
    g.bench_function("crc32/1-thread", |b| {
        b.iter(|| black_box(crc32fast::hash(black_box(area))));
    });
    g.bench_function("sha256/1-thread", |b| {
        b.iter(|| black_box(Sha256::digest(black_box(area))));
    });
    g.bench_function("crc32+sha256/1-thread", |b| {
        b.iter(|| black_box(digest_payload(black_box(area))));
    });
    g.bench_function("verify/parallel", |b| {
        b.iter(|| {
            let v = ImageView::parse(black_box(&image)).unwrap();
            black_box(v.verify(&VerifyOptions::default()).unwrap());
        });
    });
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    g.bench_function("verify/1-thread", |b| {
        b.iter(|| {
            one_thread.install(|| {
                let v = ImageView::parse(black_box(&image)).unwrap();
                black_box(v.verify(&VerifyOptions::default()).unwrap());
            });
        });
    });
    g.bench_function("build/parallel", |b| {
        b.iter(|| black_box(build().len()));
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
