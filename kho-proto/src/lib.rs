//! `kho-proto`: the bytes mk-upgrade hands from one kernel to the next.
//!
//! Two formats live here, both specified byte for byte in `docs/protocol.md`:
//!
//! * [`image`]: the *handover image* written into KHO-preserved memory (a LUO memfd on
//!   mainline, a shared region on multikernel): header, region table, payloads, manifest
//!   digest and optional ed25519 signature.
//! * [`channel`]: the framed agent-to-agent protocol spoken between the old and the new
//!   kernel instance, with Unix-stream (fd passing) and AF_VSOCK transports.
//!
//! * [`keys`]: ed25519 node keys and the trusted-keys directory.
//!
//! Every decoder here treats its input as hostile: no panics, no allocation beyond what
//! the input justifies, typed errors that name the field and offset.
//!
//! All `unsafe` code lives in one module, `channel/sys.rs`, each block with its `// SAFETY:`
//! argument behind a safe function; the rest of the crate may not use it.

#![deny(unsafe_code)]

pub mod channel;
pub mod image;
pub mod keys;
