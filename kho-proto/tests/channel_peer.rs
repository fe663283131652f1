//! Channel: handshake (highest common version, refusals), upgrade-id and sequence
//! enforcement, dyn transports, and the fd-less stream transport.

#![allow(clippy::many_single_char_names)] // short names for peers/frames in tests

use std::os::fd::AsFd;

use kho_proto::channel::{
    AgentState, Channel, ChannelError, Commit, FdDescriptor, FdKind, Frame, Heartbeat, Hello,
    HelloAck, HelloReject, MAX_VERSION, MIN_VERSION, Message, MessageType, PeerInfo, RegionOffer,
    Role, StreamTransport, Transport, TransportError, UnixTransport, UpgradeId, negotiate_version,
};
use nix::sys::memfd::{MFdFlags, memfd_create};
use proptest::prelude::*;

const UID: UpgradeId = UpgradeId([0x11; 16]);
const OTHER: UpgradeId = UpgradeId([0x22; 16]);

fn info(role: Role, id: u16) -> PeerInfo {
    PeerInfo {
        instance_id: id,
        role,
        kernel_release: format!("kernel-{id}"),
        agent_version: "mk-agentd test".into(),
    }
}

fn hb(ms: u64) -> Message {
    Message::Heartbeat(Heartbeat {
        monotonic_ms: ms,
        state: AgentState::Ready,
    })
}

fn raw(message: Message, sequence: u64, upgrade_id: UpgradeId) -> Frame {
    Frame {
        version: 1,
        sequence,
        upgrade_id,
        message,
    }
}

fn pair() -> (Channel<UnixTransport>, Channel<UnixTransport>) {
    let (a, b) = UnixTransport::pair().unwrap();
    (
        Channel::new(a, UID, info(Role::Old, 0)),
        Channel::new(b, UID, info(Role::New, 1)),
    )
}

#[test]
fn highest_common_version() {
    assert_eq!(negotiate_version(1..=3, 2..=5), Some(3));
    assert_eq!(negotiate_version(2..=5, 1..=3), Some(3));
    assert_eq!(negotiate_version(1..=1, 1..=1), Some(1));
    assert_eq!(negotiate_version(1..=9, 4..=4), Some(4));
    assert_eq!(negotiate_version(1..=2, 3..=4), None);
    assert_eq!(negotiate_version(3..=4, 1..=2), None);
    #[allow(clippy::reversed_empty_ranges)]
    let empty = 3..=1;
    assert_eq!(negotiate_version(empty, 1..=5), None);
}

proptest! {
    #[test]
    fn prop_negotiated_version_is_the_highest_common(a in 0u16..20, b in 0u16..20, c in 0u16..20, d in 0u16..20) {
        let got = negotiate_version(a..=b, c..=d);
        let best = (0u16..20).filter(|v| (a..=b).contains(v) && (c..=d).contains(v)).max();
        prop_assert_eq!(got, best);
    }
}

#[tokio::test]
async fn handshake_then_messages_and_fds() {
    let (mut old, mut new) = pair();
    let (a, b) = tokio::join!(old.negotiate_as_initiator(), new.negotiate_as_responder());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.version, MAX_VERSION);
    assert_eq!(b.version, MAX_VERSION);
    assert_eq!(a.peer, info(Role::New, 1));
    assert_eq!(b.peer, info(Role::Old, 0));
    assert_eq!(old.version(), Some(MAX_VERSION));
    assert_eq!(new.negotiated(), Some(&b));
    // Hello was sequence 0 on each side.
    assert_eq!(old.next_send_sequence(), 1);
    assert_eq!(old.send(hb(5), &[]).await.unwrap(), 1);
    let (f, fds) = new.recv().await.unwrap();
    assert_eq!((f.sequence, f.version, f.upgrade_id), (1, MAX_VERSION, UID));
    assert_eq!(f.message, hb(5));
    assert!(fds.is_empty());

    let mem = memfd_create("img", MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::write(&mem, b"image").unwrap();
    let offer = Message::RegionOffer(RegionOffer {
        workload_id: "kv".into(),
        image_len: 5,
        image_sha256: [0; 32],
        fds: vec![FdDescriptor {
            name: "image".into(),
            kind: FdKind::Memfd,
            length: 5,
            crc32: crc32fast::hash(b"image"),
            sha256: [0; 32],
        }],
    });
    assert_eq!(old.send(offer.clone(), &[mem.as_fd()]).await.unwrap(), 2);
    let (f, fds) = new.recv().await.unwrap();
    assert_eq!(f.message, offer);
    assert_eq!(fds.len(), 1);
    let mut buf = [0u8; 5];
    assert_eq!(nix::sys::uio::pread(&fds[0], &mut buf, 0).unwrap(), 5);
    assert_eq!(&buf, b"image");

    new.send(
        Message::Commit(Commit {
            workload_id: "kv".into(),
        }),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(old.recv().await.unwrap().0.sequence, 1);
}

#[tokio::test]
async fn works_over_boxed_dyn_transports() {
    let (a, b) = UnixTransport::pair().unwrap();
    let a: Box<dyn Transport> = Box::new(a);
    let b: Box<dyn Transport> = Box::new(b);
    let mut old = Channel::new(a, UID, info(Role::Old, 0));
    let mut new = Channel::new(b, UID, info(Role::New, 1));
    let (x, y) = tokio::join!(old.negotiate_as_initiator(), new.negotiate_as_responder());
    x.unwrap();
    y.unwrap();
    old.send(hb(1), &[]).await.unwrap();
    assert_eq!(new.recv().await.unwrap().0.message, hb(1));
    assert_eq!(old.transport_mut().name(), "unix");
}

#[tokio::test]
async fn another_upgrade_is_refused_on_both_sides() {
    let (a, b) = UnixTransport::pair().unwrap();
    let mut old = Channel::new(a, UID, info(Role::Old, 0));
    let mut new = Channel::new(b, OTHER, info(Role::New, 1));
    let (x, y) = tokio::join!(old.negotiate_as_initiator(), new.negotiate_as_responder());
    let y = y.unwrap_err();
    assert!(
        matches!(y, ChannelError::WrongUpgrade { expected, found, message_type: MessageType::Hello, sequence: 0 } if expected == OTHER && found == UID),
        "{y:?}"
    );
    // The responder's HelloReject carries its own upgrade id, which the initiator refuses.
    let x = x.unwrap_err();
    assert!(
        matches!(x, ChannelError::WrongUpgrade { expected, found, message_type: MessageType::HelloReject, .. } if expected == UID && found == OTHER),
        "{x:?}"
    );
    assert!(x.to_string().contains(&UID.to_string()) && x.to_string().contains(&OTHER.to_string()));
}

#[tokio::test]
async fn frames_of_another_upgrade_are_refused_after_the_handshake() {
    let (t, mut peer) = UnixTransport::pair().unwrap();
    let mut ch = Channel::new(t, UID, info(Role::New, 1));
    let hello = Message::Hello(Hello {
        min_version: 1,
        max_version: 1,
        peer: info(Role::Old, 0),
    });
    peer.send(&raw(hello, 0, UID), &[]).await.unwrap();
    ch.negotiate_as_responder().await.unwrap();
    assert!(matches!(
        peer.recv().await.unwrap().0.message,
        Message::HelloAck(_)
    ));
    peer.send(&raw(hb(1), 1, OTHER), &[]).await.unwrap();
    let e = ch.recv().await.unwrap_err();
    assert!(matches!(e, ChannelError::WrongUpgrade { .. }), "{e:?}");
}

/// Drive `ch` as responder against a raw peer that sent `hello`; return the error and
/// what the peer received.
async fn respond_to(hello: Hello, local_role: Role) -> (ChannelError, Message) {
    let (t, mut peer) = UnixTransport::pair().unwrap();
    let mut ch = Channel::new(t, UID, info(local_role, 1));
    peer.send(&raw(Message::Hello(hello), 0, UID), &[])
        .await
        .unwrap();
    let e = ch.negotiate_as_responder().await.unwrap_err();
    let (reply, _) = peer.recv().await.unwrap();
    (e, reply.message)
}

#[tokio::test]
async fn no_common_version_is_refused_with_hello_reject() {
    let hello = Hello {
        min_version: 3,
        max_version: 4,
        peer: info(Role::Old, 0),
    };
    let (e, reply) = respond_to(hello, Role::New).await;
    assert!(
        matches!(
            e,
            ChannelError::NoCommonVersion {
                ours_min: 1,
                ours_max: 2,
                theirs_min: 3,
                theirs_max: 4
            }
        ),
        "{e:?}"
    );
    let Message::HelloReject(r) = reply else {
        panic!("expected HelloReject, got {reply:?}")
    };
    assert_eq!((r.min_version, r.max_version), (MIN_VERSION, MAX_VERSION));
    assert!(
        r.reason.contains("no common protocol version"),
        "{}",
        r.reason
    );
}

#[tokio::test]
async fn invalid_range_and_role_conflict_are_refused() {
    let (e, reply) = respond_to(
        Hello {
            min_version: 3,
            max_version: 1,
            peer: info(Role::Old, 0),
        },
        Role::New,
    )
    .await;
    assert!(
        matches!(
            e,
            ChannelError::InvalidHello {
                min_version: 3,
                max_version: 1
            }
        ),
        "{e:?}"
    );
    assert!(matches!(reply, Message::HelloReject(_)));

    let (e, reply) = respond_to(
        Hello {
            min_version: 1,
            max_version: 1,
            peer: info(Role::New, 0),
        },
        Role::New,
    )
    .await;
    assert!(
        matches!(
            e,
            ChannelError::RoleConflict {
                role: Role::New,
                peer_instance: 0
            }
        ),
        "{e:?}"
    );
    assert!(matches!(reply, Message::HelloReject(_)));
}

#[tokio::test]
async fn responder_refuses_anything_but_hello_first() {
    let (t, mut peer) = UnixTransport::pair().unwrap();
    let mut ch = Channel::new(t, UID, info(Role::New, 1));
    peer.send(&raw(hb(0), 0, UID), &[]).await.unwrap();
    let e = ch.negotiate_as_responder().await.unwrap_err();
    assert!(
        matches!(
            e,
            ChannelError::UnexpectedMessage {
                found: MessageType::Heartbeat,
                ..
            }
        ),
        "{e:?}"
    );
}

/// Drive `ch` as initiator against a raw peer answering `reply`.
async fn initiate_against(reply: Message) -> ChannelError {
    let (t, mut peer) = UnixTransport::pair().unwrap();
    let mut ch = Channel::new(t, UID, info(Role::Old, 0));
    let peer_task = async {
        let (hello, _) = peer.recv().await.unwrap();
        assert!(matches!(
            hello.message,
            Message::Hello(Hello {
                min_version: MIN_VERSION,
                max_version: MAX_VERSION,
                ..
            })
        ));
        assert_eq!(hello.sequence, 0);
        peer.send(&raw(reply, 0, UID), &[]).await.unwrap();
    };
    let (r, ()) = tokio::join!(ch.negotiate_as_initiator(), peer_task);
    r.unwrap_err()
}

#[tokio::test]
async fn initiator_reports_rejection_bad_ack_and_role_conflict() {
    let e = initiate_against(Message::HelloReject(HelloReject {
        min_version: 4,
        max_version: 6,
        reason: "too old".into(),
    }))
    .await;
    assert!(
        matches!(&e, ChannelError::Rejected { min_version: 4, max_version: 6, reason } if reason == "too old"),
        "{e:?}"
    );
    let e = initiate_against(Message::HelloAck(HelloAck {
        version: 7,
        peer: info(Role::New, 1),
    }))
    .await;
    assert!(matches!(e, ChannelError::BadAck { chosen: 7, .. }), "{e:?}");
    let e = initiate_against(Message::HelloAck(HelloAck {
        version: 1,
        peer: info(Role::Old, 1),
    }))
    .await;
    assert!(
        matches!(
            e,
            ChannelError::RoleConflict {
                role: Role::Old,
                ..
            }
        ),
        "{e:?}"
    );
    let e = initiate_against(hb(0)).await;
    assert!(
        matches!(
            e,
            ChannelError::UnexpectedMessage {
                found: MessageType::Heartbeat,
                ..
            }
        ),
        "{e:?}"
    );
}

async fn negotiated_with_raw_peer() -> (Channel<UnixTransport>, UnixTransport) {
    let (t, mut peer) = UnixTransport::pair().unwrap();
    let mut ch = Channel::new(t, UID, info(Role::New, 1));
    let hello = Message::Hello(Hello {
        min_version: 1,
        max_version: 1,
        peer: info(Role::Old, 0),
    });
    peer.send(&raw(hello, 0, UID), &[]).await.unwrap();
    ch.negotiate_as_responder().await.unwrap();
    peer.recv().await.unwrap();
    (ch, peer)
}

#[tokio::test]
async fn sequence_gaps_and_replays_are_refused() {
    let (mut ch, mut peer) = negotiated_with_raw_peer().await;
    peer.send(&raw(hb(1), 5, UID), &[]).await.unwrap();
    let e = ch.recv().await.unwrap_err();
    assert!(
        matches!(
            e,
            ChannelError::Sequence {
                expected: 1,
                found: 5,
                ..
            }
        ),
        "{e:?}"
    );

    let (mut ch, mut peer) = negotiated_with_raw_peer().await;
    peer.send(&raw(hb(1), 1, UID), &[]).await.unwrap();
    peer.send(&raw(hb(2), 1, UID), &[]).await.unwrap();
    assert_eq!(ch.recv().await.unwrap().0.message, hb(1));
    let e = ch.recv().await.unwrap_err();
    assert!(
        matches!(
            e,
            ChannelError::Sequence {
                expected: 2,
                found: 1,
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn handshake_messages_after_the_handshake_are_refused() {
    let (mut ch, mut peer) = negotiated_with_raw_peer().await;
    let again = Message::Hello(Hello {
        min_version: 1,
        max_version: 1,
        peer: info(Role::Old, 0),
    });
    peer.send(&raw(again, 1, UID), &[]).await.unwrap();
    let e = ch.recv().await.unwrap_err();
    assert!(
        matches!(
            e,
            ChannelError::UnexpectedMessage {
                found: MessageType::Hello,
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn send_and_recv_need_the_handshake() {
    let (mut old, _new) = pair();
    let e = old.send(hb(0), &[]).await.unwrap_err();
    assert!(
        matches!(e, ChannelError::NotNegotiated { op: "send", .. }),
        "{e:?}"
    );
    let e = old.recv().await.unwrap_err();
    assert!(
        matches!(e, ChannelError::NotNegotiated { op: "recv", .. }),
        "{e:?}"
    );
    let e = old
        .send(
            Message::HelloReject(HelloReject {
                min_version: 1,
                max_version: 1,
                reason: String::new(),
            }),
            &[],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ChannelError::HandshakeMessage { .. }), "{e:?}");
}

#[tokio::test]
async fn version_range_must_be_supported() {
    let (a, _b) = UnixTransport::pair().unwrap();
    let e = Channel::new(a, UID, info(Role::Old, 0))
        .with_version_range(1, MAX_VERSION + 1)
        .unwrap_err();
    assert!(
        matches!(e, ChannelError::InvalidVersionRange { .. }),
        "{e:?}"
    );
    let (a, _b) = UnixTransport::pair().unwrap();
    assert!(
        Channel::new(a, UID, info(Role::Old, 0))
            .with_version_range(1, 1)
            .is_ok()
    );
}

/// A version 2 agent meets a version 1 agent (pinned here with `with_version_range`):
/// they agree on version 1, and the version 2 messages cannot be sent on that channel,
/// so a staged hand-over falls back to `RegionOffer`.
#[tokio::test]
async fn a_version_1_peer_gets_no_version_2_message() {
    let (a, b) = UnixTransport::pair().unwrap();
    let mut old = Channel::new(a, UID, info(Role::Old, 0));
    let mut new = Channel::new(b, UID, info(Role::New, 1))
        .with_version_range(1, 1)
        .unwrap();
    let (x, y) = tokio::join!(old.negotiate_as_initiator(), new.negotiate_as_responder());
    assert_eq!((x.unwrap().version, y.unwrap().version), (1, 1));
    let mem = memfd_create("img", MFdFlags::MFD_CLOEXEC).unwrap();
    let stage = Message::RegionStage(kho_proto::channel::RegionStage {
        workload_id: "kv".into(),
        image_len: 0,
        image_sha256: [0; 32],
    });
    let e = old.send(stage, &[mem.as_fd()]).await.unwrap_err();
    assert!(e.to_string().contains("since protocol version 2"), "{e}");
    // A version 1 message still goes through.
    old.send(hb(1), &[]).await.unwrap();
    assert_eq!(new.recv().await.unwrap().0.version, 1);
}

#[tokio::test]
async fn stream_transport_carries_frames_but_not_fds() {
    let (left, right) = tokio::io::duplex(1024); // small buffer: partial reads and writes
    let mut a = StreamTransport::new(left, "test-stream");
    let mut b = StreamTransport::new(right, "test-stream");
    let big = Message::PrepareMigration(kho_proto::channel::PrepareMigration {
        workload_id: "w".into(),
        spec: vec![0x5a; 100_000],
    });
    let f = raw(big, 0, UID);
    let (s, r) = tokio::join!(a.send(&f, &[]), b.recv());
    s.unwrap();
    assert_eq!(r.unwrap().0, f);

    let mem = memfd_create("x", MFdFlags::MFD_CLOEXEC).unwrap();
    let offer = raw(
        Message::RegionOffer(RegionOffer {
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
        1,
        UID,
    );
    let e = a.send(&offer, &[mem.as_fd()]).await.unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::FdsUnsupported {
                transport: "test-stream",
                count: 1,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("Unix-socket transport"), "{e}");

    // A peer that declares fds on an fd-less stream is refused.
    let bytes = kho_proto::channel::encode_frame(&offer).unwrap();
    tokio::io::AsyncWriteExt::write_all(a.get_mut(), &bytes)
        .await
        .unwrap();
    let e = b.recv().await.unwrap_err();
    assert!(matches!(e, TransportError::FdsUnsupported { .. }), "{e:?}");
}
