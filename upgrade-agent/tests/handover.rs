//! The receiving side refuses every way a handover can be wrong, naming the failed check.

use std::io::Write;
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};

use kho_proto::keys::{NodeKey, TrustedKeys};
use upgrade_agent::handover::{self, SendFaults};
use upgrade_agent::platform::PreservedFd;
use upgrade_agent::workload::{Integrity, ListenSpec, MemfdSpec, WorkloadSpec};

const UPGRADE: [u8; 16] = [7; 16];

fn spec(integrity: Integrity) -> WorkloadSpec {
    WorkloadSpec {
        memfds: vec![MemfdSpec {
            name: "kv-data".into(),
            size: 0,
        }],
        listeners: vec![ListenSpec {
            name: "listen".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
        }],
        integrity,
        ..WorkloadSpec::new("kv-1", "/bin/true")
    }
}

fn fds() -> (OwnedFd, Vec<PreservedFd>) {
    let m = upgrade_agent::sys::memfd::create_sealable("kv-data").unwrap();
    std::fs::File::from(m.try_clone().unwrap())
        .write_all(&vec![0xab; 100_000])
        .unwrap();
    let l = OwnedFd::from(TcpListener::bind("127.0.0.1:0").unwrap());
    (
        m.try_clone().unwrap(),
        vec![
            PreservedFd {
                name: "kv-data".into(),
                fd: m,
            },
            PreservedFd {
                name: "listen".into(),
                fd: l,
            },
        ],
    )
}

fn task() -> state_serializers::task::TaskState {
    state_serializers::task::TaskState {
        schema_version: state_serializers::SCHEMA_VERSION,
        tasks: vec![],
    }
}

fn trusted(key: &NodeKey) -> TrustedKeys {
    let mut t = TrustedKeys::default();
    t.add(key.public(), "test".into()).unwrap();
    t
}

/// Builds an offer and returns it with the fds a receiver would get.
fn offer(
    integrity: Integrity,
    faults: SendFaults,
    key: &NodeKey,
) -> (kho_proto::channel::RegionOffer, Vec<OwnedFd>, OwnedFd) {
    let (memfd, preserved) = fds();
    let out = handover::build(
        &spec(integrity),
        &task(),
        preserved,
        "7.2.13-mkA",
        UPGRADE,
        1,
        key,
        faults,
    )
    .unwrap();
    let received = out
        .frame_fds()
        .iter()
        .map(|fd| fd.try_clone_to_owned().unwrap())
        .collect();
    (out.offer.clone(), received, memfd)
}

#[test]
fn a_good_offer_verifies_in_both_integrity_modes() {
    let key = NodeKey::from_seed([1; 32]);
    for mode in [Integrity::Digest, Integrity::Identity] {
        let (o, received, _) = offer(mode, SendFaults::default(), &key);
        assert_eq!(o.fds.len(), 3, "image, memfd, listener");
        let inc = handover::verify(&o, received, &trusted(&key), UPGRADE).unwrap();
        assert_eq!(inc.spec.name, "kv-1");
        assert_eq!(
            inc.fds.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
            ["kv-data", "listen"]
        );
    }
}

#[test]
fn every_wrong_offer_is_refused_by_name() {
    let key = NodeKey::from_seed([1; 32]);
    let check = |o, fds, t: &TrustedKeys, id| match handover::verify(&o, fds, t, id) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };

    // A region corrupted after its CRC was written.
    let (o, fds, _) = offer(
        Integrity::Digest,
        SendFaults {
            corrupt_region: true,
        },
        &key,
    );
    let e = check(o, fds, &trusted(&key), UPGRADE);
    assert_eq!(e.check, "image");
    assert!(e.detail.contains("CRC32"), "{e}");

    // Another upgrade's image.
    let (o, fds, _) = offer(Integrity::Digest, SendFaults::default(), &key);
    assert_eq!(check(o, fds, &trusted(&key), [8; 16]).check, "upgrade_id");

    // Signed by a node key the receiver does not trust.
    let (o, fds, _) = offer(Integrity::Digest, SendFaults::default(), &key);
    let e = check(o, fds, &trusted(&NodeKey::from_seed([2; 32])), UPGRADE);
    assert_eq!(e.check, "image");
    assert!(e.detail.contains("not among the trusted keys"), "{e}");

    // The offer's image digest does not match the image.
    let (mut o, fds, _) = offer(Integrity::Digest, SendFaults::default(), &key);
    o.image_sha256[0] ^= 1;
    assert_eq!(check(o, fds, &trusted(&key), UPGRADE).check, "image_sha256");

    // A missing fd.
    let (o, mut fds, _) = offer(Integrity::Digest, SendFaults::default(), &key);
    fds.pop();
    assert_eq!(check(o, fds, &trusted(&key), UPGRADE).check, "fd_count");

    // The memfd changed after its digest was taken.
    let (o, fds, memfd) = offer(Integrity::Digest, SendFaults::default(), &key);
    std::fs::File::from(memfd).write_all(b"changed").unwrap();
    let e = check(o, fds, &trusted(&key), UPGRADE);
    assert_eq!(e.check, "fd[1].digest", "{e}");

    // Identity mode: another object in place of the offered memfd.
    let (o, mut fds, _) = offer(Integrity::Identity, SendFaults::default(), &key);
    let other = upgrade_agent::sys::memfd::create_sealable("other").unwrap();
    fds[1] = other;
    assert_eq!(
        check(o, fds, &trusted(&key), UPGRADE).check,
        "fd[1].identity"
    );

    // Something that is not a listening socket where one was offered.
    let (o, mut fds, _) = offer(Integrity::Digest, SendFaults::default(), &key);
    fds[2] = upgrade_agent::sys::memfd::create_sealable("not-a-socket").unwrap();
    assert_eq!(check(o, fds, &trusted(&key), UPGRADE).check, "fd[2]");
}

#[test]
fn copying_a_memfd_keeps_its_contents_and_not_its_position() {
    let m = upgrade_agent::sys::memfd::create_sealable("src").unwrap();
    let mut f = std::fs::File::from(m.try_clone().unwrap());
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    f.write_all(&data).unwrap();
    let copy = handover::copy_memfd("src", m.as_fd()).unwrap();
    let got = std::fs::read(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&copy)
    ))
    .unwrap();
    assert_eq!(got, data);
    use std::io::Seek;
    assert_eq!(
        f.stream_position().unwrap(),
        data.len() as u64,
        "source position untouched"
    );
}

#[test]
fn handed_over_connections_travel_as_connected_sockets() {
    let key = NodeKey::from_seed([1; 32]);
    let build = |conn: PreservedFd| {
        let (_, mut preserved) = fds();
        preserved.push(conn);
        let out = handover::build(
            &spec(Integrity::Digest),
            &task(),
            preserved,
            "7.2.13-mkA",
            UPGRADE,
            1,
            &key,
            SendFaults::default(),
        )
        .unwrap();
        let received: Vec<OwnedFd> = out
            .frame_fds()
            .iter()
            .map(|fd| fd.try_clone_to_owned().unwrap())
            .collect();
        (out.offer.clone(), received)
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let _client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server_side, _) = l.accept().unwrap();
    let conn = || PreservedFd {
        name: "connection-1".into(),
        fd: OwnedFd::from(server_side.try_clone().unwrap()),
    };
    let (o, received) = build(conn());
    assert_eq!(
        o.fds[3].kind,
        kho_proto::channel::FdKind::ConnectedSocket,
        "{:?}",
        o.fds
    );
    let inc = handover::verify(&o, received, &trusted(&key), UPGRADE).unwrap();
    assert_eq!(
        inc.fds.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        ["kv-data", "listen", "connection-1"]
    );
    // Something else in the connection's place, or a connection under another name.
    let (o, mut received) = build(conn());
    received[3] = OwnedFd::from(TcpListener::bind("127.0.0.1:0").unwrap());
    let e = handover::verify(&o, received, &trusted(&key), UPGRADE).unwrap_err();
    assert_eq!(e.check, "fd[3]", "{e}");
    assert!(e.detail.contains("not a handed-over connection"), "{e}");
    let (mut o, received) = build(conn());
    o.fds[3].name = "sneaky".into();
    let e = handover::verify(&o, received, &trusted(&key), UPGRADE).unwrap_err();
    assert_eq!(e.check, "fd[3]", "{e}");
}

/// The parts of an offer split as protocol version 2 sends them: the `RegionStage` (with
/// its one fd, the image) before the freeze, and the `StagedOffer` (with the state fds)
/// after it.
fn staged_parts(
    o: &kho_proto::channel::RegionOffer,
    mut received: Vec<OwnedFd>,
) -> (
    kho_proto::channel::RegionStage,
    Vec<OwnedFd>,
    kho_proto::channel::StagedOffer,
    Vec<OwnedFd>,
) {
    let state = received.split_off(1);
    (
        kho_proto::channel::RegionStage {
            workload_id: o.workload_id.clone(),
            image_len: o.image_len,
            image_sha256: o.image_sha256,
        },
        received,
        kho_proto::channel::StagedOffer {
            workload_id: o.workload_id.clone(),
            image_sha256: o.image_sha256,
            fds: o.fds[1..].to_vec(),
        },
        state,
    )
}

#[test]
fn a_staged_image_then_its_fds_verify_in_both_integrity_modes() {
    let key = NodeKey::from_seed([1; 32]);
    for mode in [Integrity::Digest, Integrity::Identity] {
        let (o, received, _) = offer(mode, SendFaults::default(), &key);
        let (stage, image, staged_offer, state) = staged_parts(&o, received);
        let staged = handover::stage(&stage, image, &trusted(&key), UPGRADE).unwrap();
        assert_eq!(staged.workload(), "kv-1");
        let inc = handover::verify_staged(Some(staged), &staged_offer, state).unwrap();
        assert_eq!(inc.spec.name, "kv-1");
        assert_eq!(
            inc.fds.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
            ["kv-data", "listen"]
        );
    }
}

/// Every image check runs at the stage (nothing is frozen yet); the fd checks run on the
/// offer after the freeze, against the staged image, and an offer that does not name the
/// staged image is refused.
#[test]
fn every_wrong_stage_or_staged_offer_is_refused_by_name() {
    let key = NodeKey::from_seed([1; 32]);
    let other_key = NodeKey::from_seed([2; 32]);
    let parts = |mode| {
        let (o, received, memfd) = offer(mode, SendFaults::default(), &key);
        let (stage, image, staged_offer, state) = staged_parts(&o, received);
        (stage, image, staged_offer, state, memfd)
    };

    // The stage: untrusted key, another upgrade, a wrong hash, a wrong length, fd count.
    let (stage, image, ..) = parts(Integrity::Digest);
    let e = handover::stage(&stage, image, &trusted(&other_key), UPGRADE).unwrap_err();
    assert_eq!(e.check, "image", "{e}");
    let (stage, image, ..) = parts(Integrity::Digest);
    let e = handover::stage(&stage, image, &trusted(&key), [8; 16]).unwrap_err();
    assert_eq!(e.check, "upgrade_id", "{e}");
    let (mut stage, image, ..) = parts(Integrity::Digest);
    stage.image_sha256[0] ^= 1;
    let e = handover::stage(&stage, image, &trusted(&key), UPGRADE).unwrap_err();
    assert_eq!(e.check, "image_sha256", "{e}");
    let (mut stage, image, ..) = parts(Integrity::Digest);
    stage.image_len += 1;
    let e = handover::stage(&stage, image, &trusted(&key), UPGRADE).unwrap_err();
    assert_eq!(e.check, "image_len", "{e}");
    let (stage, mut image, _, state, _) = parts(Integrity::Digest);
    image.extend(state);
    let e = handover::stage(&stage, image, &trusted(&key), UPGRADE).unwrap_err();
    assert_eq!(e.check, "fd_count", "{e}");
    assert!(e.detail.contains("3 fds received"), "{e}");
    let (stage, ..) = parts(Integrity::Digest);
    let e = handover::stage(&stage, Vec::new(), &trusted(&key), UPGRADE).unwrap_err();
    assert_eq!(e.check, "fd_count", "{e}");

    // The offer after the freeze: nothing staged, another image, a missing fd.
    let (_, _, staged_offer, state, _) = parts(Integrity::Digest);
    let e = handover::verify_staged(None, &staged_offer, state).unwrap_err();
    assert_eq!(e.check, "staged_image", "{e}");
    assert!(e.detail.contains("no image was staged for kv-1"), "{e}");
    let (stage, image, mut staged_offer, state, _) = parts(Integrity::Digest);
    let staged = handover::stage(&stage, image, &trusted(&key), UPGRADE).unwrap();
    staged_offer.image_sha256[31] ^= 1;
    let e = handover::verify_staged(Some(staged), &staged_offer, state).unwrap_err();
    assert_eq!(e.check, "staged_image", "{e}");
    let (stage, image, staged_offer, mut state, _) = parts(Integrity::Digest);
    let staged = handover::stage(&stage, image, &trusted(&key), UPGRADE).unwrap();
    state.pop();
    let e = handover::verify_staged(Some(staged), &staged_offer, state).unwrap_err();
    assert_eq!(e.check, "fd_count", "{e}");

    // The memfd changed between the stage and the freeze: its digest (`digest`) or its
    // identity (`identity`: another object in its place) no longer matches the image.
    let (stage, image, staged_offer, state, memfd) = parts(Integrity::Digest);
    let staged = handover::stage(&stage, image, &trusted(&key), UPGRADE).unwrap();
    std::fs::File::from(memfd).write_all(b"changed").unwrap();
    let e = handover::verify_staged(Some(staged), &staged_offer, state).unwrap_err();
    assert_eq!(e.check, "fd[1].digest", "{e}");
    let (stage, image, staged_offer, mut state, _) = parts(Integrity::Identity);
    let staged = handover::stage(&stage, image, &trusted(&key), UPGRADE).unwrap();
    let twin = upgrade_agent::sys::memfd::create_sealable("kv-data").unwrap();
    std::fs::File::from(twin.try_clone().unwrap())
        .write_all(&vec![0xab; 100_000])
        .unwrap();
    state[0] = twin;
    let e = handover::verify_staged(Some(staged), &staged_offer, state).unwrap_err();
    assert_eq!(e.check, "fd[1].identity", "{e}");
}
