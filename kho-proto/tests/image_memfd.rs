//! Reading images zero-copy from an mmap of a sealed memfd, the way the incoming agent
//! reads a preserved image (and the memfd of an external region).

use std::fs::File;
use std::io::Write;

use kho_proto::image::{
    ExternalRef, ImageBuilder, ImageError, ImageView, RegionKind, VerifyOptions, verify_external,
};
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

fn new_memfd(name: &str) -> File {
    File::from(memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap())
}

/// Seals `file` (no write, grow or shrink) and maps it read-only.
fn seal_and_map(file: &File) -> memmap2::Mmap {
    let seals = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW;
    fcntl(file, FcntlArg::F_ADD_SEALS(seals)).unwrap();
    // SAFETY: the memfd is sealed against writes, shrinking and growing, so the mapped
    // bytes cannot change or disappear while the map lives (no SIGBUS, no data race).
    unsafe { memmap2::Mmap::map(file) }.unwrap()
}

#[test]
fn parse_and_verify_over_a_sealed_memfd_mapping() {
    let memory: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i * 7 % 251) as u8).collect();
    let mut mem_file = new_memfd("workload-memory");
    mem_file.write_all(&memory).unwrap();
    let mem_map = seal_and_map(&mem_file);
    let reference = ExternalRef::of(0xabc, &mem_map);

    let mut b = ImageBuilder::new("6.12.0-mk", [3; 16], 9).unwrap();
    b.region(RegionKind::TaskState, 0, 1, true, &b"tasks"[..])
        .unwrap()
        .external(RegionKind::MemoryState, 0, 1, true, reference)
        .unwrap();
    // Stream the image straight into its memfd, as the outgoing agent does.
    let mut image_file = new_memfd("image");
    let n = b.write_to(&mut image_file, None).unwrap();
    assert_eq!(image_file.metadata().unwrap().len(), n);
    let img_map = seal_and_map(&image_file);

    // The view borrows the mapping: payload slices point into it.
    let view = ImageView::parse(&img_map).unwrap();
    view.verify(&VerifyOptions::default()).unwrap();
    let tasks = view.regions()[0].payload().unwrap();
    let range = img_map.as_ptr_range();
    assert!(range.contains(&tasks.as_ptr()));
    assert_eq!(tasks, b"tasks");

    let ext = view.regions()[1].external().unwrap();
    verify_external(&ext, &mem_map).unwrap();
    assert!(matches!(
        verify_external(&ext, &mem_map[1..]),
        Err(ImageError::ExternalLength { .. })
    ));
}
