//! The frame decoder never allocates more than its input justifies, whatever lengths the
//! input claims. Measured with a counting global allocator (this test binary only).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use kho_proto::channel::{FrameError, MAX_PAYLOAD_LEN, MessageType, UpgradeId, decode_frame};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static SERIAL: Mutex<()> = Mutex::new(());

thread_local! {
    /// Only the measuring thread's allocations count: the test harness's own threads
    /// (other tests, output capture) allocate concurrently and made the test flaky.
    static MEASURING: Cell<bool> = const { Cell::new(false) };
}

fn record(size: usize) {
    if MEASURING.with(Cell::get) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call unchanged to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn raw(ty: MessageType, fd_count: u16, payload_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"MKCH");
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&ty.as_u16().to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&fd_count.to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&UpgradeId::default().0);
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// postcard varint of `v`.
fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// Largest single allocation made while decoding `bytes`.
fn largest_alloc_decoding(bytes: &[u8]) -> (usize, Result<(), FrameError>) {
    let _guard = SERIAL.lock().unwrap();
    LARGEST.store(0, Ordering::SeqCst);
    MEASURING.with(|m| m.set(true));
    let r = decode_frame(bytes).map(|_| ());
    MEASURING.with(|m| m.set(false));
    (LARGEST.load(Ordering::SeqCst), r)
}

#[test]
fn claimed_lengths_do_not_drive_allocation() {
    // Each payload claims a huge element count / byte length but carries a few bytes.
    let huge = varint(u64::from(u32::MAX));
    let mut cases: Vec<(MessageType, u16, Vec<u8>)> = Vec::new();
    // PrepareMigration: workload "w", spec claims 4 GiB.
    let mut p = vec![1, b'w'];
    p.extend_from_slice(&huge);
    p.extend_from_slice(&[0; 8]);
    cases.push((MessageType::PrepareMigration, 0, p));
    // ReleaseResources: cpus claims 4 G elements.
    let mut p = huge.clone();
    p.extend_from_slice(&[1, 2, 3]);
    cases.push((MessageType::ReleaseResources, 0, p));
    // RegionOffer: fds claims 4 G descriptors (header says 0 fds).
    let mut p = vec![1, b'w', 0];
    p.extend_from_slice(&[0; 32]);
    p.extend_from_slice(&huge);
    cases.push((MessageType::RegionOffer, 0, p));
    // Shutdown: reason string claims 4 GiB.
    let mut p = huge.clone();
    p.push(b'x');
    cases.push((MessageType::Shutdown, 0, p));

    for (ty, fds, payload) in cases {
        let bytes = raw(ty, fds, payload.len() as u32, &payload);
        let (largest, r) = largest_alloc_decoding(&bytes);
        assert!(matches!(r, Err(FrameError::Payload { .. })), "{ty}: {r:?}");
        assert!(
            largest <= 4096,
            "{ty}: decoding {} bytes allocated {largest} bytes at once",
            bytes.len()
        );
    }
}

#[test]
fn element_counts_backed_by_bytes_do_not_multiply_allocation() {
    // RegionOffer whose descriptor count equals the number of payload bytes that follow:
    // a decoder trusting the count would reserve count * size_of::<FdDescriptor>() (about
    // 80x the input) before failing.
    let n = 20_000usize;
    let mut p = vec![1, b'w', 0];
    p.extend_from_slice(&[0; 32]);
    p.extend_from_slice(&varint(n as u64));
    p.extend(std::iter::repeat_n(0xffu8, n));
    let bytes = raw(MessageType::RegionOffer, 0, p.len() as u32, &p);
    let (largest, r) = largest_alloc_decoding(&bytes);
    assert!(matches!(r, Err(FrameError::Payload { .. })), "{r:?}");
    assert!(
        largest <= 4 * bytes.len(),
        "decoding {} bytes allocated {largest} bytes at once",
        bytes.len()
    );
}

#[test]
fn oversize_header_allocates_nothing_large() {
    let bytes = raw(MessageType::PrepareMigration, 0, MAX_PAYLOAD_LEN + 1, &[]);
    let (largest, r) = largest_alloc_decoding(&bytes);
    assert!(matches!(r, Err(FrameError::PayloadTooLarge { .. })));
    assert!(largest <= 4096, "allocated {largest} bytes");
    let bytes = raw(MessageType::PrepareMigration, 0, MAX_PAYLOAD_LEN, &[]);
    let (largest, r) = largest_alloc_decoding(&bytes);
    assert!(matches!(r, Err(FrameError::Incomplete { .. })));
    assert!(largest <= 4096, "allocated {largest} bytes");
}
