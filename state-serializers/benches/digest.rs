//! Region digests: throughput of `digest_fd` against a plain `pread` of the same bytes
//! (the I/O floor), and `digest_many` (rayon) against digesting the same memfds one after
//! the other. Read the ratios, not the absolute numbers:
//!
//! `cargo bench -p state-serializers --bench digest`

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use nix::sys::memfd::{MFdFlags, memfd_create};
use state_serializers::{digest_fd, digest_many};

const REGION: usize = 16 << 20;
const REGIONS: usize = 4;

fn memfd(seed: u8) -> OwnedFd {
    let fd = memfd_create(c"bench", MFdFlags::MFD_CLOEXEC).unwrap();
    let mut f = std::fs::File::from(fd);
    let data: Vec<u8> = (0..REGION)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    f.write_all(&data).unwrap();
    OwnedFd::from(f)
}

fn pread_all(fd: BorrowedFd<'_>) -> u64 {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = nix::sys::uio::pread(fd, &mut buf, off as libc::off_t).unwrap();
        if n == 0 {
            return off;
        }
        off += n as u64;
    }
}

fn bench(c: &mut Criterion) {
    let fds: Vec<OwnedFd> = (0..REGIONS).map(|i| memfd(i as u8)).collect();
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();

    let mut g = c.benchmark_group("one region (16 MiB)");
    g.throughput(Throughput::Bytes(REGION as u64));
    g.bench_function("baseline: pread only", |b| {
        b.iter(|| pread_all(borrowed[0]));
    });
    g.bench_function("digest_fd (crc32 + sha256)", |b| {
        b.iter(|| digest_fd(borrowed[0]).unwrap());
    });
    g.finish();

    let mut g = c.benchmark_group("regions (4 x 16 MiB)");
    g.throughput(Throughput::Bytes((REGION * REGIONS) as u64));
    g.bench_with_input(
        BenchmarkId::new("baseline: sequential", REGIONS),
        &borrowed,
        |b, fds| {
            b.iter(|| {
                fds.iter()
                    .map(|fd| digest_fd(*fd).unwrap())
                    .collect::<Vec<_>>()
            });
        },
    );
    g.bench_with_input(
        BenchmarkId::new("digest_many (rayon)", REGIONS),
        &borrowed,
        |b, fds| {
            b.iter(|| digest_many(fds));
        },
    );
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench
}
criterion_main!(benches);
