//! A receiver out of fd slots (RLIMIT_NOFILE) gets a typed error, and the fds the kernel
//! did install before truncating are closed, not leaked. Its own test binary: lowering
//! RLIMIT_NOFILE affects the whole process.

use std::os::fd::AsFd;

use kho_proto::channel::{
    FdDescriptor, FdKind, Frame, Message, RegionOffer, Transport, TransportError, UnixTransport,
    UpgradeId,
};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "current_thread")]
async fn truncated_fds_are_reported_and_closed() {
    let (mut a, mut b) = UnixTransport::pair().unwrap();
    let memfds: Vec<_> = (0..3)
        .map(|i| memfd_create(format!("m{i}").as_str(), MFdFlags::MFD_CLOEXEC).unwrap())
        .collect();
    let desc = |i: usize| FdDescriptor {
        name: format!("m{i}"),
        kind: FdKind::Memfd,
        length: 0,
        crc32: 0,
        sha256: [0; 32],
    };
    let frame = Frame {
        version: 1,
        sequence: 0,
        upgrade_id: UpgradeId([1; 16]),
        message: Message::RegionOffer(RegionOffer {
            workload_id: "w".into(),
            image_len: 0,
            image_sha256: [0; 32],
            fds: (0..3).map(desc).collect(),
        }),
    };
    let fds: Vec<_> = memfds.iter().map(AsFd::as_fd).collect();
    a.send(&frame, &fds).await.unwrap();
    drop(memfds);

    let baseline = open_fd_count();
    // Room for exactly one more fd: the lowest free slot is the next number to be used.
    let probe = std::fs::File::open("/dev/null").unwrap();
    let lowest_free = std::os::fd::AsRawFd::as_raw_fd(&probe) as u64;
    drop(probe);
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, lowest_free + 1, hard).unwrap();
    let r = b.recv().await;
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();

    let e = r.unwrap_err();
    assert!(matches!(e, TransportError::FdsTruncated), "{e:?}");
    assert!(e.to_string().contains("RLIMIT_NOFILE"), "{e}");
    assert_eq!(
        open_fd_count(),
        baseline,
        "the one installed fd must have been closed"
    );
}
