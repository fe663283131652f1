//! Fuzz the channel frame decoder (`kho_proto::channel::decode_frame`).
//!
//! Two passes per input:
//! 1. the raw bytes as a stream of back-to-back frames (header checks, CRCs, streaming);
//! 2. the bytes as `[type lo, type hi, fd_count, payload...]` wrapped in a header with
//!    correct CRCs, so the fuzzer reaches the postcard payload decoders past the CRCs.
//!
//! Invariants: never panic; whatever decodes re-encodes to a frame that decodes to the
//! same value and length.
#![no_main]

use kho_proto::channel::{Frame, FrameError, MessageType, decode_frame, encode_frame};
use libfuzzer_sys::fuzz_target;

fn check_round_trip(frame: &Frame) {
    let bytes = encode_frame(frame).expect("a decoded frame re-encodes");
    let (again, used) = decode_frame(&bytes).expect("a re-encoded frame decodes");
    assert_eq!(&again, frame);
    assert_eq!(used, bytes.len());
}

fn with_valid_crcs(version: u16, ty: u16, fd_count: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + payload.len());
    out.extend_from_slice(b"MKCH");
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&fd_count.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&[0u8; 16]);
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fuzz_target!(|data: &[u8]| {
    // Pass 1: raw stream.
    let mut rest = data;
    loop {
        match decode_frame(rest) {
            Ok((frame, used)) => {
                assert!(used > 0 && used <= rest.len());
                check_round_trip(&frame);
                rest = &rest[used..];
            }
            Err(FrameError::Incomplete { needed }) => {
                assert!(needed > 0);
                break;
            }
            Err(_) => break,
        }
    }
    // Pass 2: payload decoders behind valid CRCs.
    if data.len() >= 3 {
        let all = MessageType::ALL;
        let ty = all[usize::from(data[0]) % all.len()];
        let fd_count = u16::from(data[1] % 4);
        // The first version that has the type (the handshake's is always 1).
        let bytes = with_valid_crcs(ty.since_version(), ty.as_u16(), fd_count, &data[2..]);
        if let Ok((frame, used)) = decode_frame(&bytes) {
            assert_eq!(used, bytes.len());
            assert_eq!(frame.fd_count(), usize::from(fd_count));
            check_round_trip(&frame);
        }
    }
});
