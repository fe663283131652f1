//! Fuzz the channel frame decoder: arbitrary bytes must never panic, and whatever decodes
//! must re-encode to a frame that decodes to the same value (canonical encoding).
#![no_main]

use kho_proto::channel::{FrameError, decode_frame, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // Decode back-to-back frames the way a transport does.
    loop {
        match decode_frame(rest) {
            Ok((frame, used)) => {
                assert!(used > 0 && used <= rest.len());
                let bytes = encode_frame(&frame).expect("a decoded frame re-encodes");
                let (again, used_again) = decode_frame(&bytes).expect("re-encoded frame decodes");
                assert_eq!(again, frame);
                assert_eq!(used_again, bytes.len());
                rest = &rest[used..];
            }
            Err(FrameError::Incomplete { needed }) => {
                assert!(needed > 0);
                break;
            }
            Err(_) => break,
        }
    }
});
