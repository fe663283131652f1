//! Hostile region bytes must not make the decoder allocate by a claimed length: a few
//! bytes claiming billions of elements allocate next to nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use state_serializers::decode;
use state_serializers::device::DeviceState;
use state_serializers::memory::MemoryState;
use state_serializers::task::TaskState;

struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged, only recording the request size.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn claimed_lengths_do_not_drive_allocation() {
    // schema_version 2, then a sequence length of 2^35 - 1 (postcard varint), then EOF.
    let huge = [0x02u8, 0xff, 0xff, 0xff, 0xff, 0x7f];
    // Also nested: one task whose cmdline claims a huge length.
    let mut nested = vec![0x02u8, 0x01];
    nested.extend([0x02, 0x02, 0x03]); // pid, ppid, starttime
    nested.extend([0x00, 0x00]); // comm "", exe ""
    nested.extend([0xff, 0xff, 0xff, 0xff, 0x7f]); // cmdline length
    LARGEST.store(0, Ordering::Relaxed);
    for input in [&huge[..], &nested[..]] {
        assert!(decode::<TaskState>(2, input).is_err());
        assert!(decode::<MemoryState>(2, input).is_err());
        assert!(decode::<DeviceState>(2, input).is_err());
        assert!(decode::<TaskState>(1, input).is_err());
    }
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < 4096,
        "largest single allocation {largest} bytes for a few input bytes"
    );
}
