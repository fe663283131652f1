//! Frame codec: round trips, every rejection path, streaming behaviour, bit flips.

#![allow(clippy::many_single_char_names)] // short names for peers/frames in tests

use kho_proto::channel::{
    Abort, AgentState, Commit, EncodeError, FdDescriptor, FdKind, Frame, FrameError, HEADER_LEN,
    HealthReport, Heartbeat, Hello, HelloAck, HelloReject, MAX_FDS_PER_FRAME, MAX_PAYLOAD_LEN,
    Message, MessageType, PeerInfo, PrepareMigration, RegionOffer, RegionStage, RegionVerified,
    ReleaseResources, Role, Shutdown, StagedOffer, UpgradeId, Verification, decode_frame,
    decode_header, encode_frame,
};
use proptest::prelude::*;

const UID: UpgradeId = UpgradeId([
    0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10,
]);

fn peer(role: Role) -> PeerInfo {
    PeerInfo {
        instance_id: 3,
        role,
        kernel_release: "6.18.44-mk".into(),
        agent_version: "mk-agentd 0.1.0".into(),
    }
}

fn fd_desc(name: &str, kind: FdKind) -> FdDescriptor {
    FdDescriptor {
        name: name.into(),
        kind,
        length: 4096,
        crc32: 0xdead_beef,
        sha256: [7; 32],
    }
}

/// One message of every type.
fn samples() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            min_version: 1,
            max_version: 1,
            peer: peer(Role::Old),
        }),
        Message::HelloAck(HelloAck {
            version: 1,
            peer: peer(Role::New),
        }),
        Message::HelloReject(HelloReject {
            min_version: 1,
            max_version: 1,
            reason: "no common version".into(),
        }),
        Message::Heartbeat(Heartbeat {
            monotonic_ms: 123_456_789,
            state: AgentState::Migrating,
        }),
        Message::PrepareMigration(PrepareMigration {
            workload_id: "kv-1".into(),
            spec: vec![1, 2, 3, 0, 255],
        }),
        Message::RegionOffer(RegionOffer {
            workload_id: "kv-1".into(),
            image_len: 1 << 20,
            image_sha256: [0xaa; 32],
            fds: vec![
                fd_desc("image", FdKind::Memfd),
                fd_desc("listen", FdKind::ListenSocket),
            ],
        }),
        Message::RegionVerified(RegionVerified {
            workload_id: "kv-1".into(),
            result: Verification::Failed {
                check: "fd[1].crc32".into(),
                detail: "expected 0xdeadbeef, found 0x00000000".into(),
            },
        }),
        Message::RegionVerified(RegionVerified {
            workload_id: "kv-1".into(),
            result: Verification::Ok,
        }),
        Message::HealthReport(HealthReport {
            workload_id: "kv-1".into(),
            healthy: true,
            detail: "GET /health 200".into(),
            elapsed_ms: 42,
        }),
        Message::Commit(Commit {
            workload_id: "kv-1".into(),
        }),
        Message::Abort(Abort {
            workload_id: None,
            reason: "operator cancelled".into(),
        }),
        Message::Abort(Abort {
            workload_id: Some("kv-1".into()),
            reason: "health check failed".into(),
        }),
        Message::RegionStage(RegionStage {
            workload_id: "kv-1".into(),
            image_len: 4096,
            image_sha256: [0xbb; 32],
        }),
        Message::StagedOffer(StagedOffer {
            workload_id: "kv-1".into(),
            image_sha256: [0xbb; 32],
            fds: vec![
                fd_desc("data", FdKind::Memfd),
                fd_desc("listen", FdKind::ListenSocket),
            ],
        }),
        Message::ReleaseResources(ReleaseResources {
            cpus: vec![2, 3, 7],
            memory_bytes: 256 << 20,
        }),
        Message::Shutdown(Shutdown {
            reason: "upgrade committed".into(),
        }),
    ]
}

/// A frame of the first version that has the message's type.
fn frame(message: Message, sequence: u64) -> Frame {
    Frame {
        version: message.message_type().since_version(),
        sequence,
        upgrade_id: UID,
        message,
    }
}

/// Build raw frame bytes with arbitrary header fields and correct CRCs.
#[allow(clippy::too_many_arguments)]
fn raw(
    version: u16,
    ty: u16,
    flags: u16,
    fd_count: u16,
    payload_len: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"MKCH");
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&fd_count.to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&9u64.to_le_bytes());
    out.extend_from_slice(&UID.0);
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn raw_ok(ty: MessageType, fd_count: u16, payload: &[u8]) -> Vec<u8> {
    raw(
        ty.since_version(),
        ty.as_u16(),
        0,
        fd_count,
        payload.len() as u32,
        payload,
    )
}

#[test]
fn every_message_type_round_trips() {
    let samples = samples();
    let mut seen: Vec<MessageType> = samples.iter().map(Message::message_type).collect();
    seen.dedup();
    assert_eq!(
        seen,
        MessageType::ALL.to_vec(),
        "samples cover every type in order"
    );
    for (i, m) in samples.into_iter().enumerate() {
        let f = frame(m, i as u64);
        let bytes = encode_frame(&f).unwrap();
        let (back, used) = decode_frame(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, f);
        let h = decode_header(&bytes).unwrap();
        assert_eq!(h.message_type, f.message_type());
        assert_eq!(usize::from(h.fd_count), f.fd_count());
        assert_eq!(h.frame_len(), bytes.len());
    }
}

#[test]
fn message_type_numbers_are_stable() {
    let expected = [
        (MessageType::Hello, 0x0001),
        (MessageType::HelloAck, 0x0002),
        (MessageType::HelloReject, 0x0003),
        (MessageType::Heartbeat, 0x0010),
        (MessageType::PrepareMigration, 0x0020),
        (MessageType::RegionOffer, 0x0021),
        (MessageType::RegionVerified, 0x0022),
        (MessageType::HealthReport, 0x0023),
        (MessageType::Commit, 0x0024),
        (MessageType::Abort, 0x0025),
        (MessageType::RegionStage, 0x0026),
        (MessageType::StagedOffer, 0x0027),
        (MessageType::ReleaseResources, 0x0030),
        (MessageType::Shutdown, 0x0031),
    ];
    for (t, n) in expected {
        assert_eq!(t.as_u16(), n, "{t}");
        assert_eq!(MessageType::from_u16(n), Some(t));
    }
    let known: Vec<u16> = expected.iter().map(|(_, n)| *n).collect();
    for n in 0..=u16::MAX {
        if !known.contains(&n) {
            assert_eq!(MessageType::from_u16(n), None, "{n:#x}");
        }
    }
}

#[test]
fn header_layout_is_little_endian_at_documented_offsets() {
    let f = Frame {
        version: 1,
        sequence: 0x0102_0304_0506_0708,
        upgrade_id: UID,
        message: Message::Commit(Commit {
            workload_id: "ab".into(),
        }),
    };
    let b = encode_frame(&f).unwrap();
    assert_eq!(&b[0..4], b"MKCH");
    assert_eq!(&b[4..6], &[1, 0]);
    assert_eq!(&b[6..8], &[0x24, 0x00]);
    assert_eq!(&b[8..10], &[0, 0]);
    assert_eq!(&b[10..12], &[0, 0]);
    // payload: postcard String "ab" = varint 2, 'a', 'b'
    assert_eq!(&b[12..16], &[3, 0, 0, 0]);
    assert_eq!(&b[16..24], &[8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(&b[24..40], &UID.0);
    assert_eq!(&b[40..44], &crc32fast::hash(&[2, b'a', b'b']).to_le_bytes());
    assert_eq!(&b[44..48], &crc32fast::hash(&b[..44]).to_le_bytes());
    assert_eq!(&b[48..], &[2, b'a', b'b']);
    assert_eq!(b.len(), HEADER_LEN + 3);
}

#[test]
fn truncation_at_every_length_is_incomplete_with_exact_need() {
    for m in samples() {
        let bytes = encode_frame(&frame(m, 1)).unwrap();
        for cut in 0..bytes.len() {
            let want = if cut < HEADER_LEN {
                HEADER_LEN - cut
            } else {
                bytes.len() - cut
            };
            assert_eq!(
                decode_frame(&bytes[..cut]),
                Err(FrameError::Incomplete { needed: want }),
                "cut at {cut}"
            );
        }
    }
}

#[test]
fn trailing_bytes_after_a_frame_are_left_alone() {
    let a = encode_frame(&frame(samples()[3].clone(), 0)).unwrap();
    let b = encode_frame(&frame(samples()[4].clone(), 1)).unwrap();
    let mut both = a.clone();
    both.extend_from_slice(&b);
    let (f1, used) = decode_frame(&both).unwrap();
    assert_eq!(used, a.len());
    assert_eq!(f1.sequence, 0);
    let (f2, used2) = decode_frame(&both[used..]).unwrap();
    assert_eq!(used2, b.len());
    assert_eq!(f2.sequence, 1);
}

#[test]
fn every_single_bit_flip_of_every_sample_is_rejected() {
    for m in samples() {
        let bytes = encode_frame(&frame(m, 5)).unwrap();
        for bit in 0..bytes.len() * 8 {
            let mut c = bytes.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            let r = decode_frame(&c);
            assert!(
                matches!(
                    r,
                    Err(FrameError::BadMagic { .. }
                        | FrameError::HeaderCrc { .. }
                        | FrameError::PayloadCrc { .. })
                ),
                "bit {bit}: {r:?}"
            );
        }
    }
}

#[test]
fn bad_magic_is_reported_even_before_a_full_header() {
    assert_eq!(
        decode_frame(b"MKX"),
        Err(FrameError::BadMagic {
            found: [b'M', b'K', b'X', 0]
        })
    );
    let mut b = encode_frame(&frame(samples()[3].clone(), 0)).unwrap();
    b[0] = b'X';
    let e = decode_frame(&b).unwrap_err();
    assert!(matches!(e, FrameError::BadMagic { found } if found == *b"XKCH"));
    assert!(e.to_string().contains("offset 0"), "{e}");
}

#[test]
fn header_crc_mismatch_names_offset_44() {
    let mut b = encode_frame(&frame(samples()[3].clone(), 0)).unwrap();
    b[17] ^= 0x80; // sequence byte
    let e = decode_frame(&b).unwrap_err();
    assert!(matches!(e, FrameError::HeaderCrc { .. }), "{e:?}");
    assert!(e.to_string().contains("offset 44"), "{e}");
}

#[test]
fn unsupported_version_is_refused() {
    let payload = postcard::to_stdvec(&Commit {
        workload_id: "w".into(),
    })
    .unwrap();
    for v in [0u16, 3, 0xffff] {
        let b = raw(
            v,
            MessageType::Commit.as_u16(),
            0,
            0,
            payload.len() as u32,
            &payload,
        );
        let e = decode_frame(&b).unwrap_err();
        assert_eq!(
            e,
            FrameError::UnsupportedVersion {
                version: v,
                min: 1,
                max: 2
            }
        );
        assert!(e.to_string().contains("offset 4"));
    }
}

#[test]
fn unknown_message_type_is_refused() {
    let b = raw(1, 0x0099, 0, 0, 0, &[]);
    let e = decode_frame(&b).unwrap_err();
    assert_eq!(e, FrameError::UnknownMessageType { value: 0x0099 });
    assert!(e.to_string().contains("offset 6"));
}

#[test]
fn reserved_flags_are_refused() {
    let b = raw(1, MessageType::Shutdown.as_u16(), 0x0001, 0, 1, &[0]);
    assert_eq!(
        decode_frame(&b),
        Err(FrameError::ReservedFlags { flags: 1 })
    );
}

#[test]
fn fd_count_rules() {
    // Above the per-frame cap.
    let b = raw(
        1,
        MessageType::RegionOffer.as_u16(),
        0,
        MAX_FDS_PER_FRAME + 1,
        0,
        &[],
    );
    assert_eq!(
        decode_frame(&b),
        Err(FrameError::TooManyFds {
            count: MAX_FDS_PER_FRAME + 1,
            max: MAX_FDS_PER_FRAME
        })
    );
    // A message type that never carries fds.
    let hb = postcard::to_stdvec(&Heartbeat {
        monotonic_ms: 1,
        state: AgentState::Ready,
    })
    .unwrap();
    let b = raw_ok(MessageType::Heartbeat, 1, &hb);
    assert_eq!(
        decode_frame(&b),
        Err(FrameError::FdCountMismatch {
            message_type: MessageType::Heartbeat,
            header: 1,
            described: 0
        })
    );
    // The fd-carrying types with a header count other than their payload's: RegionOffer
    // and StagedOffer carry one fd per descriptor (two in the samples), RegionStage
    // exactly one, the image.
    let carriers = [
        (MessageType::RegionOffer, 2),
        (MessageType::RegionStage, 1),
        (MessageType::StagedOffer, 2),
    ];
    for (ty, described) in carriers {
        let m = samples()
            .into_iter()
            .find(|m| m.message_type() == ty)
            .unwrap();
        let p = encode_frame(&frame(m, 0)).unwrap()[HEADER_LEN..].to_vec();
        for count in 0u16..=3 {
            let got = decode_frame(&raw_ok(ty, count, &p));
            if usize::from(count) == described {
                assert!(got.is_ok(), "{ty} with {count} fds: {got:?}");
            } else {
                assert_eq!(
                    got,
                    Err(FrameError::FdCountMismatch {
                        message_type: ty,
                        header: count,
                        described
                    }),
                    "{ty} with {count} fds"
                );
            }
        }
    }
}

#[test]
fn oversize_length_is_refused_from_the_header_alone() {
    for len in [MAX_PAYLOAD_LEN + 1, u32::MAX] {
        // Only the 48 header bytes are present: the decoder must refuse, not ask for more.
        let b = raw(1, MessageType::PrepareMigration.as_u16(), 0, 0, len, &[]);
        assert_eq!(b.len(), HEADER_LEN);
        let e = decode_frame(&b).unwrap_err();
        assert_eq!(
            e,
            FrameError::PayloadTooLarge {
                len,
                max: MAX_PAYLOAD_LEN
            }
        );
        assert!(e.to_string().contains("offset 12"));
    }
    // Exactly the limit is accepted as a length (and asks for the payload).
    let b = raw(
        1,
        MessageType::PrepareMigration.as_u16(),
        0,
        0,
        MAX_PAYLOAD_LEN,
        &[],
    );
    assert_eq!(
        decode_frame(&b),
        Err(FrameError::Incomplete {
            needed: MAX_PAYLOAD_LEN as usize
        })
    );
}

#[test]
fn payload_errors_are_typed() {
    // Garbage payload with valid CRCs: Heartbeat with agent state 9 (no such variant).
    let b = raw_ok(MessageType::Heartbeat, 0, &[1, 9]);
    let e = decode_frame(&b).unwrap_err();
    assert!(
        matches!(
            e,
            FrameError::Payload {
                message_type: MessageType::Heartbeat,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("offset 48"));
    // Truncated payload (string claims 10 bytes, 1 present).
    let b = raw_ok(MessageType::Commit, 0, &[10, b'a']);
    assert!(matches!(decode_frame(&b), Err(FrameError::Payload { .. })));
    // Invalid UTF-8 in a string.
    let b = raw_ok(MessageType::Shutdown, 0, &[2, 0xff, 0xfe]);
    assert!(matches!(decode_frame(&b), Err(FrameError::Payload { .. })));
    // Valid message followed by junk.
    let b = raw_ok(MessageType::Commit, 0, &[1, b'a', 0]);
    assert_eq!(
        decode_frame(&b),
        Err(FrameError::TrailingPayload {
            message_type: MessageType::Commit,
            unused: 1
        })
    );
    // Payload CRC mismatch.
    let mut b = raw_ok(MessageType::Commit, 0, &[1, b'a']);
    let last = b.len() - 1;
    b[last] = b'b';
    let e = decode_frame(&b).unwrap_err();
    assert!(matches!(e, FrameError::PayloadCrc { len: 2, .. }), "{e:?}");
}

#[test]
fn encode_refuses_what_decode_would_refuse() {
    let big = frame(
        Message::PrepareMigration(PrepareMigration {
            workload_id: "w".into(),
            spec: vec![0; MAX_PAYLOAD_LEN as usize],
        }),
        0,
    );
    assert!(matches!(
        encode_frame(&big),
        Err(EncodeError::PayloadTooLarge {
            message_type: MessageType::PrepareMigration,
            ..
        })
    ));
    let many = frame(
        Message::RegionOffer(RegionOffer {
            workload_id: "w".into(),
            image_len: 0,
            image_sha256: [0; 32],
            fds: vec![fd_desc("x", FdKind::Other); usize::from(MAX_FDS_PER_FRAME) + 1],
        }),
        0,
    );
    assert!(matches!(
        encode_frame(&many),
        Err(EncodeError::TooManyFds { count: 65, .. })
    ));
    let mut v3 = frame(samples()[3].clone(), 0);
    v3.version = 3;
    assert!(matches!(
        encode_frame(&v3),
        Err(EncodeError::UnsupportedVersion { version: 3, .. })
    ));
}

/// RegionStage and StagedOffer exist since version 2: a version 1 frame never carries
/// them (neither encoded nor decoded), while the version 1 types travel in version 2
/// frames unchanged.
#[test]
fn version_2_types_need_a_version_2_frame() {
    for m in samples() {
        let ty = m.message_type();
        let mut f = frame(m, 0);
        if ty.since_version() == 2 {
            f.version = 1;
            let e = encode_frame(&f).unwrap_err();
            assert!(
                matches!(e, EncodeError::TypeNotInVersion { message_type, version: 1, since: 2 } if message_type == ty),
                "{e}"
            );
            let p = f.message.clone();
            let mut good = encode_frame(&frame(p, 0)).unwrap();
            // The same frame, its header relabelled version 1 (CRC fixed): refused from
            // the header alone.
            good[4] = 1;
            let crc = crc32fast::hash(&good[..44]);
            good[44..48].copy_from_slice(&crc.to_le_bytes());
            let e = decode_frame(&good).unwrap_err();
            assert_eq!(
                e,
                FrameError::TypeNotInVersion {
                    message_type: ty,
                    version: 1,
                    since: 2
                }
            );
            assert!(e.to_string().contains("since protocol version 2"), "{e}");
        } else if !ty.is_handshake() {
            f.version = 2;
            let bytes = encode_frame(&f).unwrap();
            assert_eq!(decode_frame(&bytes).unwrap(), (f, bytes.len()));
        }
    }
}

#[test]
fn upgrade_id_text_form() {
    assert_eq!(UID.to_string(), "0123456789abcdeffedcba9876543210");
    assert_eq!(
        "0123456789ABCDEFFEDCBA9876543210"
            .parse::<UpgradeId>()
            .unwrap(),
        UID
    );
    for bad in [
        "",
        "0123",
        "0123456789abcdeffedcba98765432100",
        "zz23456789abcdeffedcba9876543210",
    ] {
        let e = bad.parse::<UpgradeId>().unwrap_err();
        assert!(e.to_string().contains("32 hex digits"));
    }
}

fn arb_string() -> impl Strategy<Value = String> {
    ".{0,24}"
}

fn arb_peer() -> impl Strategy<Value = PeerInfo> {
    (any::<u16>(), any::<bool>(), arb_string(), arb_string()).prop_map(|(id, old, k, a)| PeerInfo {
        instance_id: id,
        role: if old { Role::Old } else { Role::New },
        kernel_release: k,
        agent_version: a,
    })
}

fn arb_state() -> impl Strategy<Value = AgentState> {
    prop_oneof![
        Just(AgentState::Starting),
        Just(AgentState::Ready),
        Just(AgentState::Migrating),
        Just(AgentState::Committed),
        Just(AgentState::RollingBack),
        Just(AgentState::ShuttingDown),
    ]
}

fn arb_desc() -> impl Strategy<Value = FdDescriptor> {
    (
        arb_string(),
        0u8..4,
        any::<u64>(),
        any::<u32>(),
        any::<[u8; 32]>(),
    )
        .prop_map(|(name, k, length, crc32, sha256)| FdDescriptor {
            name,
            kind: [
                FdKind::Memfd,
                FdKind::ListenSocket,
                FdKind::ConnectedSocket,
                FdKind::Other,
            ][usize::from(k)],
            length,
            crc32,
            sha256,
        })
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), arb_peer()).prop_map(|(min_version, max_version, peer)| {
            Message::Hello(Hello {
                min_version,
                max_version,
                peer,
            })
        }),
        (any::<u16>(), arb_peer())
            .prop_map(|(version, peer)| Message::HelloAck(HelloAck { version, peer })),
        (any::<u16>(), any::<u16>(), arb_string()).prop_map(
            |(min_version, max_version, reason)| {
                Message::HelloReject(HelloReject {
                    min_version,
                    max_version,
                    reason,
                })
            }
        ),
        (any::<u64>(), arb_state()).prop_map(|(monotonic_ms, state)| Message::Heartbeat(
            Heartbeat {
                monotonic_ms,
                state
            }
        )),
        (arb_string(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(
            |(workload_id, spec)| Message::PrepareMigration(PrepareMigration { workload_id, spec })
        ),
        (
            arb_string(),
            any::<u64>(),
            any::<[u8; 32]>(),
            proptest::collection::vec(arb_desc(), 0..5)
        )
            .prop_map(
                |(workload_id, image_len, image_sha256, fds)| Message::RegionOffer(RegionOffer {
                    workload_id,
                    image_len,
                    image_sha256,
                    fds
                })
            ),
        (
            arb_string(),
            proptest::option::of((arb_string(), arb_string()))
        )
            .prop_map(|(workload_id, failed)| {
                Message::RegionVerified(RegionVerified {
                    workload_id,
                    result: match failed {
                        None => Verification::Ok,
                        Some((check, detail)) => Verification::Failed { check, detail },
                    },
                })
            }),
        (arb_string(), any::<bool>(), arb_string(), any::<u64>()).prop_map(
            |(workload_id, healthy, detail, elapsed_ms)| {
                Message::HealthReport(HealthReport {
                    workload_id,
                    healthy,
                    detail,
                    elapsed_ms,
                })
            }
        ),
        arb_string().prop_map(|workload_id| Message::Commit(Commit { workload_id })),
        (proptest::option::of(arb_string()), arb_string()).prop_map(|(workload_id, reason)| {
            Message::Abort(Abort {
                workload_id,
                reason,
            })
        }),
        (arb_string(), any::<u64>(), any::<[u8; 32]>()).prop_map(
            |(workload_id, image_len, image_sha256)| Message::RegionStage(RegionStage {
                workload_id,
                image_len,
                image_sha256
            })
        ),
        (
            arb_string(),
            any::<[u8; 32]>(),
            proptest::collection::vec(arb_desc(), 0..5)
        )
            .prop_map(|(workload_id, image_sha256, fds)| Message::StagedOffer(
                StagedOffer {
                    workload_id,
                    image_sha256,
                    fds
                }
            )),
        (proptest::collection::vec(any::<u32>(), 0..40), any::<u64>()).prop_map(
            |(cpus, memory_bytes)| Message::ReleaseResources(ReleaseResources {
                cpus,
                memory_bytes
            })
        ),
        arb_string().prop_map(|reason| Message::Shutdown(Shutdown { reason })),
    ]
}

proptest! {
    #[test]
    fn prop_round_trip(m in arb_message(), seq in any::<u64>(), uid in any::<[u8; 16]>()) {
        let f = Frame { version: m.message_type().since_version(), sequence: seq, upgrade_id: UpgradeId(uid), message: m };
        let bytes = encode_frame(&f).unwrap();
        let (back, used) = decode_frame(&bytes).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, f);
    }

    #[test]
    fn prop_single_bit_flip_is_rejected(m in arb_message(), seq in any::<u64>(), bit in any::<usize>()) {
        let bytes = encode_frame(&frame(m, seq)).unwrap();
        let bit = bit % (bytes.len() * 8);
        let mut c = bytes.clone();
        c[bit / 8] ^= 1 << (bit % 8);
        let r = decode_frame(&c);
        prop_assert!(r.is_err(), "bit {} accepted", bit);
        prop_assert!(!matches!(r, Err(FrameError::Incomplete { .. })), "bit {}: {:?}", bit, r);
    }

    #[test]
    fn prop_arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_frame(&data);
    }

    #[test]
    fn prop_arbitrary_payload_with_valid_crcs_never_panics(
        ty in prop::sample::select(MessageType::ALL.to_vec()),
        fd_count in 0u16..4,
        payload in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let b = raw_ok(ty, fd_count, &payload);
        if let Ok((f, used)) = decode_frame(&b) {
            prop_assert_eq!(used, b.len());
            prop_assert_eq!(f.fd_count(), usize::from(fd_count));
            // Whatever decodes re-encodes to the same bytes (canonical encoding).
            let again = encode_frame(&f).unwrap();
            let (f2, _) = decode_frame(&again).unwrap();
            prop_assert_eq!(f2, f);
        }
    }
}

/// The worked example in docs/protocol.md, Part 2, byte for byte.
#[test]
fn documented_example_frame() {
    let f = Frame {
        version: 1,
        sequence: 1,
        upgrade_id: UpgradeId([0x11; 16]),
        message: Message::Commit(Commit {
            workload_id: "kv".into(),
        }),
    };
    let hex = "4d4b4348010024000000000003000000010000000000000011111111111111111111111111111111\
               196baac36ec1dc5a026b76";
    assert_eq!(hex::encode(encode_frame(&f).unwrap()), hex);
    let bytes = hex::decode(hex).unwrap();
    assert_eq!(decode_frame(&bytes).unwrap(), (f, 51));
}

/// Postcard encodings of the field types, as documented.
#[test]
fn documented_payload_encodings() {
    // Heartbeat { monotonic_ms: 300 (varint ac 02), state: Migrating (2) }
    let hb = postcard::to_stdvec(&Heartbeat {
        monotonic_ms: 300,
        state: AgentState::Migrating,
    })
    .unwrap();
    assert_eq!(hb, [0xac, 0x02, 0x02]);
    // Abort { workload_id: Some("a"), reason: "" }
    let ab = postcard::to_stdvec(&Abort {
        workload_id: Some("a".into()),
        reason: String::new(),
    })
    .unwrap();
    assert_eq!(ab, [0x01, 0x01, b'a', 0x00]);
    // RegionVerified { "w", Failed { "c", "d" } }
    let rv = postcard::to_stdvec(&RegionVerified {
        workload_id: "w".into(),
        result: Verification::Failed {
            check: "c".into(),
            detail: "d".into(),
        },
    })
    .unwrap();
    assert_eq!(rv, [1, b'w', 1, 1, b'c', 1, b'd']);
    // ReleaseResources { cpus: [1, 200], memory_bytes: 0 }
    let rr = postcard::to_stdvec(&ReleaseResources {
        cpus: vec![1, 200],
        memory_bytes: 0,
    })
    .unwrap();
    assert_eq!(rr, [2, 1, 0xc8, 0x01, 0]);
    // PrepareMigration spec is a length-prefixed byte string.
    let pm = postcard::to_stdvec(&PrepareMigration {
        workload_id: String::new(),
        spec: vec![9, 8],
    })
    .unwrap();
    assert_eq!(pm, [0, 2, 9, 8]);
    // Role: Old = 0, New = 1; FdKind ListenSocket = 1.
    assert_eq!(postcard::to_stdvec(&Role::New).unwrap(), [1]);
    assert_eq!(postcard::to_stdvec(&FdKind::ListenSocket).unwrap(), [1]);
}
