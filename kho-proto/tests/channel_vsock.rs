//! AF_VSOCK transport. What runs everywhere: the multikernel option is refused with a
//! typed error on stock kernels, connect failures name the address, a listener binds.
//! The end-to-end round trip needs vsock loopback (CID 1, `vsock_loopback` module); where
//! it is unavailable that test reports `SKIP <name>: <reason>` and counts as ignored.
//!
//! Own harness (`harness = false`, libtest-mimic) so that a test whose requirement this host
//! lacks ends as "ignored" in cargo's summary, never as "passed".

use std::time::Duration;

use libtest_mimic::{Arguments, Trial};

use kho_proto::channel::{
    AgentState, FdDescriptor, FdKind, Frame, Heartbeat, Message, RegionOffer, Transport,
    TransportError, UpgradeId, VMADDR_CID_ANY, VsockAcceptor, VsockOptions, VsockTransport,
};

const LOOPBACK_CID: u32 = 1;

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        skippable(
            "multikernel_option_is_refused_by_stock_kernels",
            multikernel_option_is_refused_by_stock_kernels,
        ),
        Trial::test("connect_without_listener_fails_naming_the_address", || {
            block_on(connect_without_listener_fails_naming_the_address());
            Ok(())
        }),
        skippable(
            "loopback_round_trip_and_fd_refusal",
            loopback_round_trip_and_fd_refusal,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

/// How a test that needs something from the host ended.
enum Run {
    /// Every check ran.
    Done,
    /// The host lacks what the test needs: reported as `SKIP <name>: <reason>` and counted
    /// as ignored, never as passed.
    Skip(String),
}

fn skippable<F>(name: &'static str, test: fn() -> F) -> Trial
where
    F: Future<Output = Run> + 'static,
{
    mk_test_support::skippable(name, move || match block_on(test()) {
        Run::Done => Ok(()),
        Run::Skip(reason) => Err(reason),
    })
}

/// What `#[tokio::test]` did: a current-thread runtime per test.
fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn multikernel_host() -> bool {
    std::path::Path::new("/sys/fs/multikernel").exists()
}

/// A port unlikely to clash between concurrently running test binaries.
fn port(offset: u32) -> u32 {
    40_000 + (std::process::id() % 10_000) * 3 + offset
}

fn hb() -> Frame {
    Frame {
        version: 1,
        sequence: 0,
        upgrade_id: UpgradeId([3; 16]),
        message: Message::Heartbeat(Heartbeat {
            monotonic_ms: 1,
            state: AgentState::Ready,
        }),
    }
}

async fn multikernel_option_is_refused_by_stock_kernels() -> Run {
    if multikernel_host() {
        return Run::Skip(
            "multikernel host: the option is supported here, nothing to refuse".into(),
        );
    }
    let opts = VsockOptions { multikernel: true };
    let e = VsockAcceptor::bind(VMADDR_CID_ANY, port(0), opts).unwrap_err();
    match &e {
        TransportError::MultikernelTransportUnavailable { source } => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOPROTOOPT), "{source}");
        }
        // No AF_VSOCK at all: socket() itself fails before the option is tried.
        TransportError::Io { op, source, .. }
            if source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            assert!(op.contains("socket"), "{op}");
        }
        other => panic!("unexpected error: {other:?}"),
    }
    if matches!(e, TransportError::MultikernelTransportUnavailable { .. }) {
        assert!(e.to_string().contains("SO_VM_SOCKETS_TRANSPORT=9"), "{e}");
        let e = VsockTransport::connect(LOOPBACK_CID, port(0), opts)
            .await
            .unwrap_err();
        assert!(
            matches!(e, TransportError::MultikernelTransportUnavailable { .. }),
            "{e:?}"
        );
    }
    Run::Done
}

async fn connect_without_listener_fails_naming_the_address() {
    let p = port(1);
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        VsockTransport::connect(LOOPBACK_CID, p, VsockOptions::default()),
    )
    .await
    .expect("the kernel's vsock connect timeout is 2 s");
    let e = r.unwrap_err();
    assert!(
        matches!(
            &e,
            TransportError::Io {
                transport: "vsock",
                ..
            }
        ),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.contains(&format!("cid 1 port {p}")) || text.contains("socket(AF_VSOCK"),
        "{text}"
    );
}

async fn loopback_round_trip_and_fd_refusal() -> Run {
    let p = port(2);
    let acceptor = match VsockAcceptor::bind(VMADDR_CID_ANY, p, VsockOptions::default()) {
        Ok(a) => a,
        Err(e) => {
            return Run::Skip(format!(
                "AF_VSOCK unavailable on this host ({e}); round trip not run"
            ));
        }
    };
    assert_eq!(acceptor.local_addr().unwrap().1, p);
    let acceptor = std::sync::Arc::new(acceptor);
    let accept = tokio::spawn({
        let acceptor = acceptor.clone();
        async move { acceptor.accept().await }
    });
    let c = tokio::time::timeout(
        Duration::from_secs(20),
        VsockTransport::connect(LOOPBACK_CID, p, VsockOptions::default()),
    )
    .await;
    let mut client = match c.expect("connect timed out") {
        Ok(c) => c,
        Err(e) => {
            accept.abort();
            return Run::Skip(format!(
                "vsock loopback (CID 1) unavailable on this host ({e}); round trip not run"
            ));
        }
    };
    let (mut server, peer_cid) = tokio::time::timeout(Duration::from_secs(20), accept)
        .await
        .expect("accept timed out")
        .unwrap()
        .unwrap();
    assert_eq!(peer_cid, LOOPBACK_CID);
    assert_eq!(client.peer_addr().unwrap(), (LOOPBACK_CID, p));
    client.send(&hb(), &[]).await.unwrap();
    assert_eq!(server.recv().await.unwrap().0, hb());

    let offer = Frame {
        message: Message::RegionOffer(RegionOffer {
            workload_id: "w".into(),
            image_len: 0,
            image_sha256: [0; 32],
            fds: vec![FdDescriptor {
                name: "x".into(),
                kind: FdKind::Memfd,
                length: 0,
                crc32: 0,
                sha256: [0; 32],
            }],
        }),
        ..hb()
    };
    let mem = nix::sys::memfd::memfd_create("x", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let e = client
        .send(&offer, &[std::os::fd::AsFd::as_fd(&mem)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::FdsUnsupported {
                transport: "vsock",
                ..
            }
        ),
        "{e:?}"
    );
    Run::Done
}
