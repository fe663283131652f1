//! Unix-socket transport: frames, SCM_RIGHTS fd passing (memfds, listening sockets),
//! large payloads, fd caps and every fd-passing rule violation.

#![allow(clippy::many_single_char_names)] // short names for peers/frames in tests

use std::io::{IoSlice, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;

use kho_proto::channel::{
    AgentState, Commit, FdDescriptor, FdKind, Frame, FrameError, Heartbeat, Message, MessageType,
    PrepareMigration, RegionOffer, Transport, TransportError, UnixTransport, UpgradeId,
    encode_frame,
};
use nix::fcntl::{FcntlArg, FdFlag, OFlag, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};

const UID: UpgradeId = UpgradeId([9; 16]);

fn frame(message: Message, sequence: u64) -> Frame {
    Frame {
        version: 1,
        sequence,
        upgrade_id: UID,
        message,
    }
}

fn heartbeat(seq: u64) -> Frame {
    frame(
        Message::Heartbeat(Heartbeat {
            monotonic_ms: seq * 10,
            state: AgentState::Ready,
        }),
        seq,
    )
}

/// A sealed memfd holding `content`.
fn sealed_memfd(name: &str, content: &[u8]) -> OwnedFd {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
    let mut f = std::fs::File::from(fd);
    f.write_all(content).unwrap();
    let fd = OwnedFd::from(f);
    let seals = SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_SEAL;
    fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).unwrap();
    fd
}

fn read_all(fd: OwnedFd) -> Vec<u8> {
    let mut f = std::fs::File::from(fd);
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut out = Vec::new();
    f.read_to_end(&mut out).unwrap();
    out
}

fn memfd_desc(name: &str, content: &[u8]) -> FdDescriptor {
    FdDescriptor {
        name: name.into(),
        kind: FdKind::Memfd,
        length: content.len() as u64,
        crc32: crc32fast::hash(content),
        sha256: [0; 32],
    }
}

fn offer(descs: Vec<FdDescriptor>, seq: u64) -> Frame {
    frame(
        Message::RegionOffer(RegionOffer {
            workload_id: "kv".into(),
            image_len: descs.first().map_or(0, |d| d.length),
            image_sha256: [1; 32],
            fds: descs,
        }),
        seq,
    )
}

fn is_cloexec(fd: &OwnedFd) -> bool {
    let flags = fcntl(fd, FcntlArg::F_GETFD).unwrap();
    FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC)
}

/// Send raw bytes with optional SCM_RIGHTS from a std socket (a misbehaving peer).
fn raw_send(sock: &StdUnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert_eq!(n, bytes.len());
}

/// A transport whose peer is a raw std socket.
fn raw_peer() -> (UnixTransport, StdUnixStream) {
    let (a, b) = StdUnixStream::pair().unwrap();
    (UnixTransport::from_std(a).unwrap(), b)
}

#[tokio::test]
async fn frames_round_trip_in_order() {
    let (mut a, mut b) = UnixTransport::pair().unwrap();
    for i in 0..10 {
        a.send(&heartbeat(i), &[]).await.unwrap();
    }
    for i in 0..10 {
        let (f, fds) = b.recv().await.unwrap();
        assert_eq!(f, heartbeat(i));
        assert!(fds.is_empty());
    }
    // And the other direction.
    b.send(&heartbeat(0), &[]).await.unwrap();
    assert_eq!(a.recv().await.unwrap().0, heartbeat(0));
}

#[tokio::test]
async fn passes_sealed_memfds_in_order() {
    let (mut a, mut b) = UnixTransport::pair().unwrap();
    let image = b"KHO image bytes".repeat(100);
    let state = b"state".to_vec();
    let m1 = sealed_memfd("image", &image);
    let m2 = sealed_memfd("state", &state);
    let f = offer(
        vec![memfd_desc("image", &image), memfd_desc("state", &state)],
        0,
    );
    a.send(&f, &[m1.as_fd(), m2.as_fd()]).await.unwrap();
    drop((m1, m2));
    let (got, fds) = b.recv().await.unwrap();
    assert_eq!(got, f);
    assert_eq!(fds.len(), 2);
    assert!(
        fds.iter().all(is_cloexec),
        "received fds must be close-on-exec"
    );
    let seals = fcntl(&fds[0], FcntlArg::F_GET_SEALS).unwrap();
    assert!(SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_WRITE));
    let mut it = fds.into_iter();
    let r1 = read_all(it.next().unwrap());
    let r2 = read_all(it.next().unwrap());
    assert_eq!(r1, image);
    assert_eq!(r2, state);
    let Message::RegionOffer(o) = got.message else {
        unreachable!()
    };
    assert_eq!(o.fds[0].crc32, crc32fast::hash(&r1));
}

#[tokio::test]
async fn passes_a_listening_tcp_socket() {
    let (mut a, mut b) = UnixTransport::pair().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let desc = FdDescriptor {
        name: "http".into(),
        kind: FdKind::ListenSocket,
        length: 0,
        crc32: 0,
        sha256: [0; 32],
    };
    a.send(&offer(vec![desc], 0), &[listener.as_fd()])
        .await
        .unwrap();
    drop(listener); // the only remaining copy is the one in flight
    let (_f, mut fds) = b.recv().await.unwrap();
    let received = TcpListener::from(fds.remove(0));
    assert_eq!(received.local_addr().unwrap(), addr);
    let mut client = TcpStream::connect(addr).unwrap();
    client.write_all(b"ping").unwrap();
    let (mut conn, _) = received.accept().unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn large_payloads_survive_partial_writes_and_reads() {
    let (mut a, mut b) = UnixTransport::pair().unwrap();
    let spec: Vec<u8> = (0..(1usize << 20) + 12345)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let big = frame(
        Message::PrepareMigration(PrepareMigration {
            workload_id: "big".into(),
            spec: spec.clone(),
        }),
        0,
    );
    let mem = sealed_memfd("img", b"abc");
    let with_fd = offer(vec![memfd_desc("img", b"abc")], 2);
    // The socket buffer is far smaller than 1 MiB: send and receive concurrently.
    let sender = async {
        a.send(&big, &[]).await.unwrap();
        a.send(&heartbeat(1), &[]).await.unwrap();
        a.send(&with_fd, &[mem.as_fd()]).await.unwrap();
        a.send(&big, &[]).await.unwrap();
    };
    let receiver = async {
        let mut out = Vec::new();
        for _ in 0..4 {
            out.push(b.recv().await.unwrap());
        }
        out
    };
    let ((), got) = tokio::join!(sender, receiver);
    assert_eq!(got[0].0, big);
    assert_eq!(got[1].0, heartbeat(1));
    assert_eq!(got[2].0, with_fd);
    assert_eq!(got[2].1.len(), 1);
    assert_eq!(got[3].0, big);
    assert!(got[0].1.is_empty() && got[1].1.is_empty() && got[3].1.is_empty());
}

#[tokio::test]
async fn many_queued_frames_keep_fds_with_their_frame() {
    let (mut a, mut b) = UnixTransport::pair().unwrap();
    // Everything is queued before the receiver reads, so one recvmsg may return the
    // tail of one frame and the start of the next.
    let mut expected = Vec::new();
    for i in 0..30u64 {
        if i % 3 == 1 {
            let content = format!("memfd number {i}").into_bytes();
            let m = sealed_memfd("n", &content);
            let f = offer(vec![memfd_desc("n", &content)], i);
            a.send(&f, &[m.as_fd()]).await.unwrap();
            expected.push((f, Some(content)));
        } else {
            a.send(&heartbeat(i), &[]).await.unwrap();
            expected.push((heartbeat(i), None));
        }
    }
    for (f, content) in expected {
        let (got, fds) = b.recv().await.unwrap();
        assert_eq!(got, f);
        match content {
            None => assert!(fds.is_empty()),
            Some(c) => {
                assert_eq!(fds.len(), 1);
                assert_eq!(read_all(fds.into_iter().next().unwrap()), c);
            }
        }
    }
}

#[tokio::test]
async fn send_refuses_wrong_fd_count_and_writes_nothing() {
    let (mut a, mut b) = UnixTransport::pair().unwrap();
    let m = sealed_memfd("x", b"x");
    let f = offer(vec![memfd_desc("x", b"x")], 0);
    let e = a.send(&f, &[]).await.unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::FdCountMismatch {
                expected: 1,
                given: 0,
                ..
            }
        ),
        "{e:?}"
    );
    let e = a.send(&heartbeat(0), &[m.as_fd()]).await.unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::FdCountMismatch {
                expected: 0,
                given: 1,
                ..
            }
        ),
        "{e:?}"
    );
    // Nothing reached the wire: the next frame is the first one the peer sees.
    a.send(&heartbeat(7), &[]).await.unwrap();
    assert_eq!(b.recv().await.unwrap().0, heartbeat(7));
}

/// Write end of a non-blocking pipe plus a probe telling whether every copy of the write
/// end has been closed.
fn pipe_probe() -> (OwnedFd, impl Fn() -> bool) {
    let (r, w) = nix::unistd::pipe().unwrap();
    let fl = fcntl(&r, FcntlArg::F_GETFL).unwrap();
    fcntl(
        &r,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK),
    )
    .unwrap();
    let probe = move || {
        let mut buf = [0u8; 1];
        matches!(nix::unistd::read(&r, &mut buf), Ok(0))
    };
    (w, probe)
}

#[tokio::test]
async fn fd_cap_is_enforced_and_extra_fds_are_closed() {
    let (a, b) = UnixTransport::pair().unwrap();
    let (mut a, mut b) = (a, b.with_max_fds(1));
    assert_eq!(b.max_fds(), 1);
    let (w1, closed1) = pipe_probe();
    let (w2, closed2) = pipe_probe();
    let other = |n: &str| FdDescriptor {
        name: n.into(),
        kind: FdKind::Other,
        length: 0,
        crc32: 0,
        sha256: [0; 32],
    };
    a.send(
        &offer(vec![other("p1"), other("p2")], 0),
        &[w1.as_fd(), w2.as_fd()],
    )
    .await
    .unwrap();
    drop((w1, w2));
    assert!(
        !closed1() && !closed2(),
        "in-flight copies keep the pipes open"
    );
    let e = b.recv().await.unwrap_err();
    assert!(
        matches!(e, TransportError::TooManyFds { count: 2, max: 1 }),
        "{e:?}"
    );
    assert!(closed1() && closed2(), "refused fds must be closed");
}

#[tokio::test]
async fn fds_on_a_frame_that_declares_none_are_refused_and_closed() {
    let (mut t, peer) = raw_peer();
    let (w, closed) = pipe_probe();
    raw_send(&peer, &encode_frame(&heartbeat(0)).unwrap(), &[w.as_fd()]);
    drop(w);
    let e = t.recv().await.unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::UnexpectedFds {
                count: 1,
                offset: 0
            }
        ),
        "{e:?}"
    );
    assert!(closed());
}

#[tokio::test]
async fn fds_arriving_mid_frame_are_refused() {
    let (mut t, peer) = raw_peer();
    let m = sealed_memfd("x", b"x");
    let bytes = encode_frame(&offer(vec![memfd_desc("x", b"x")], 0)).unwrap();
    // First byte without fds, the rest with them: the fds did not ride with byte 0.
    raw_send(&peer, &bytes[..1], &[]);
    // Let the receiver consume that byte alone: recv is cancellation-safe, so the byte
    // stays buffered when the timeout drops the future.
    let pending = tokio::time::timeout(std::time::Duration::from_millis(50), t.recv()).await;
    assert!(pending.is_err(), "a 1-byte prefix cannot complete a frame");
    raw_send(&peer, &bytes[1..], &[m.as_fd()]);
    let e = t.recv().await.unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::MissingFds {
                message_type: MessageType::RegionOffer,
                expected: 1,
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_frame_whose_fds_never_came_is_refused() {
    let (mut t, peer) = raw_peer();
    let bytes = encode_frame(&offer(vec![memfd_desc("x", b"x")], 0)).unwrap();
    raw_send(&peer, &bytes, &[]);
    let e = t.recv().await.unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::MissingFds {
                expected: 1,
                received: 0,
                offset: 0,
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn wrong_number_of_fds_with_a_frame_is_refused() {
    let (mut t, peer) = raw_peer();
    let m1 = sealed_memfd("x", b"x");
    let m2 = sealed_memfd("y", b"y");
    let bytes = encode_frame(&offer(vec![memfd_desc("x", b"x")], 0)).unwrap();
    raw_send(&peer, &bytes, &[m1.as_fd(), m2.as_fd()]);
    let e = t.recv().await.unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::MissingFds {
                expected: 1,
                received: 2,
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn garbage_and_closed_streams_are_typed_errors() {
    let (mut t, peer) = raw_peer();
    raw_send(&peer, b"GET / HTTP/1.1\r\n\r\n", &[]);
    let e = t.recv().await.unwrap_err();
    assert!(
        matches!(e, TransportError::Frame(FrameError::BadMagic { found }) if &found == b"GET "),
        "{e:?}"
    );

    let (mut t, peer) = raw_peer();
    let bytes = encode_frame(&heartbeat(0)).unwrap();
    raw_send(&peer, &bytes[..20], &[]);
    drop(peer);
    let e = t.recv().await.unwrap_err();
    assert!(
        matches!(e, TransportError::ClosedMidFrame { buffered: 20, .. }),
        "{e:?}"
    );

    let (mut a, b) = UnixTransport::pair().unwrap();
    a.send(&heartbeat(0), &[]).await.unwrap();
    drop(a);
    let mut b = b;
    assert_eq!(b.recv().await.unwrap().0, heartbeat(0));
    let e = b.recv().await.unwrap_err();
    assert!(matches!(e, TransportError::Closed { .. }), "{e:?}");
}

#[tokio::test]
async fn send_to_a_closed_peer_fails_without_sigpipe() {
    let (mut a, b) = UnixTransport::pair().unwrap();
    drop(b);
    let e = a.send(&heartbeat(0), &[]).await.unwrap_err();
    assert!(
        matches!(&e, TransportError::Io { op, source, .. } if op == "sendmsg" && source.kind() == std::io::ErrorKind::BrokenPipe),
        "{e:?}"
    );
}

#[tokio::test]
async fn connect_by_path_and_commit_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chan.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let accept = async { UnixTransport::from_tokio(listener.accept().await.unwrap().0) };
    let (client, server) = tokio::join!(UnixTransport::connect(&path), accept);
    let (mut client, mut server) = (client.unwrap(), server);
    let c = frame(
        Message::Commit(Commit {
            workload_id: "kv".into(),
        }),
        0,
    );
    client.send(&c, &[]).await.unwrap();
    assert_eq!(server.recv().await.unwrap().0, c);
    let e = UnixTransport::connect(dir.path().join("missing.sock"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("missing.sock"), "{e}");
}
