//! The agent's own record across a kexec (token 0 of the `mk-agent` session): the journal
//! record, which way the kexec goes, and for every workload its session, its spec and the
//! digests of its memfds as the sending kernel computed them.

use serde::{Deserialize, Serialize};

use crate::record::UpgradeRecord;
use crate::workload::WorkloadSpec;

/// Format tag.
pub const HANDOFF_FORMAT: &str = "mk-luo-handoff/2";
/// Largest handoff record read (a few KiB per workload; more is not ours).
pub const MAX_HANDOFF: u64 = 4 << 20;

/// Which way a kexec goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// An upgrade (or a manual rollback): the next kernel verifies the signed handover
    /// images, restores, health-checks, and kexecs back on any failure.
    Forward,
    /// Coming back after a failure in the new kernel: the known-good kernel checks every
    /// memfd against the digests below, restarts the workloads and reports; it does not
    /// bounce again.
    Return,
}

/// One memfd's expected contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemfdDigest {
    pub name: String,
    pub len: u64,
    pub crc32: u32,
    /// Hex SHA-256.
    pub sha256: String,
}

impl MemfdDigest {
    /// From a computed digest.
    pub fn new(name: &str, d: &state_serializers::RegionDigest) -> Self {
        MemfdDigest {
            name: name.to_owned(),
            len: d.len,
            crc32: d.crc32,
            sha256: hex::encode(d.sha256),
        }
    }

    /// As a region digest (an undecodable hash yields zeroes, which never match).
    pub fn region(&self) -> state_serializers::RegionDigest {
        let mut sha256 = [0u8; 32];
        let _ = hex::decode_to_slice(&self.sha256, &mut sha256);
        state_serializers::RegionDigest {
            len: self.len,
            crc32: self.crc32,
            sha256,
        }
    }
}

/// One workload in the handoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffWorkload {
    pub name: String,
    pub session: String,
    /// The spec as the workload file has it (without test-only fault markers).
    pub spec: WorkloadSpec,
    /// Its memfds at tokens 1, 2, ... of its session.
    pub memfds: Vec<MemfdDigest>,
    /// CLOCK_REALTIME (ns) when it was frozen in the first kernel of this upgrade.
    pub frozen_at_ns: u64,
}

/// The handoff record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    pub format: String,
    pub direction: Direction,
    /// The journal record as of the kexec (phase `Booted` forward, `RollingBack` on return).
    pub record: UpgradeRecord,
    /// Release of the kernel that wrote this.
    pub source_release: String,
    /// Its command line (used to kexec back into it).
    pub source_cmdline: String,
    /// Whether the `mk-agent` session holds its initramfs (token 4).
    pub source_initrd: bool,
    /// Release of the kernel this is for.
    pub target_release: String,
    /// The command line it was booted with.
    pub target_cmdline: String,
    /// Whether the `mk-agent` session holds its initramfs (token 3).
    pub target_initrd: bool,
    pub workloads: Vec<HandoffWorkload>,
}

/// Why the preserved handoff record cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// Not JSON, or not the fields of a handoff record.
    #[error("the preserved handoff record does not parse: {0}")]
    Parse(#[source] serde_json::Error),
    /// Written by an agent with another record format.
    #[error(
        "the preserved handoff record has format {found:?}, this agent reads {HANDOFF_FORMAT:?}"
    )]
    Format { found: String },
    /// The envelope is not signed by a trusted node key (or the bytes changed).
    #[error("the preserved handoff record is not signed by a trusted node key: {0}")]
    Signature(#[source] kho_proto::keys::KeyError),
    /// The envelope's key or signature is not hex of the right length.
    #[error("the preserved handoff record's signature envelope is malformed: {0}")]
    Envelope(String),
}

/// Format tag of the signed envelope around a handoff record.
pub const ENVELOPE_FORMAT: &str = "mk-luo-handoff-signed/1";

/// What token 0 of the `mk-agent` session holds: the handoff record's bytes and an ed25519
/// signature over exactly those bytes by the node key (both directions of a kexec are
/// signed; the receiving kernel checks it against `STATE_DIR/node-keys/` before it acts on
/// anything the record says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Envelope {
    format: String,
    /// The handoff record, JSON text.
    handoff: String,
    /// Hex of the signer's public key.
    public: String,
    /// Hex of the signature over `handoff`'s bytes.
    signature: String,
}

/// Signs `h` with `key` into the bytes preserved at token 0.
pub fn seal(h: &Handoff, key: &kho_proto::keys::NodeKey) -> Result<Vec<u8>, HandoffError> {
    let text = serde_json::to_string(h).map_err(HandoffError::Parse)?;
    let sig = key.sign(text.as_bytes());
    serde_json::to_vec(&Envelope {
        format: ENVELOPE_FORMAT.to_owned(),
        public: hex::encode(key.public()),
        signature: hex::encode(sig),
        handoff: text,
    })
    .map_err(HandoffError::Parse)
}

/// Checks the signature of preserved bytes against `trusted` and parses the record.
pub fn open(bytes: &[u8], trusted: &kho_proto::keys::TrustedKeys) -> Result<Handoff, HandoffError> {
    let env: Envelope = serde_json::from_slice(bytes).map_err(HandoffError::Parse)?;
    if env.format != ENVELOPE_FORMAT {
        return Err(HandoffError::Format { found: env.format });
    }
    let mut public = [0u8; kho_proto::keys::PUBLIC_KEY_LEN];
    hex::decode_to_slice(&env.public, &mut public)
        .map_err(|e| HandoffError::Envelope(format!("public key: {e}")))?;
    let mut signature = [0u8; kho_proto::keys::SIGNATURE_LEN];
    hex::decode_to_slice(&env.signature, &mut signature)
        .map_err(|e| HandoffError::Envelope(format!("signature: {e}")))?;
    trusted
        .verify(&public, env.handoff.as_bytes(), &signature)
        .map_err(HandoffError::Signature)?;
    Handoff::parse(env.handoff.as_bytes())
}

impl Handoff {
    /// Parses and checks the format tag.
    pub fn parse(bytes: &[u8]) -> Result<Self, HandoffError> {
        let h: Handoff = serde_json::from_slice(bytes).map_err(HandoffError::Parse)?;
        if h.format != HANDOFF_FORMAT {
            return Err(HandoffError::Format { found: h.format });
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Handoff {
        let rec: crate::record::UpgradeRecord = serde_json::from_value(serde_json::json!({
            "upgrade_id": "00", "kind": "apply", "platform": "luo", "started_at": 0,
            "kernel_before": "A", "kernel_after": "B", "image_sha256": "", "old_instance": 0,
            "old_resources": {"cpus": [], "memory_bytes": 0}, "new_instance": 1,
            "phase": "booted", "workloads": [], "events": [], "outcome": null, "error": null
        }))
        .unwrap();
        Handoff {
            format: HANDOFF_FORMAT.to_owned(),
            direction: Direction::Return,
            record: rec,
            source_release: "B".into(),
            source_cmdline: String::new(),
            source_initrd: false,
            target_release: "A".into(),
            target_cmdline: String::new(),
            target_initrd: false,
            workloads: Vec::new(),
        }
    }

    #[test]
    fn a_signed_handoff_opens_only_with_the_trusted_key_and_unchanged() {
        let key = kho_proto::keys::NodeKey::from_seed([5; 32]);
        let other = kho_proto::keys::NodeKey::from_seed([6; 32]);
        let mut trusted = kho_proto::keys::TrustedKeys::default();
        trusted
            .add(key.public(), std::path::PathBuf::from("node.pub"))
            .unwrap();
        let bytes = seal(&record(), &key).unwrap();
        assert_eq!(open(&bytes, &trusted).unwrap(), record());
        // Signed by a key the receiving kernel does not trust.
        let foreign = seal(&record(), &other).unwrap();
        assert!(matches!(
            open(&foreign, &trusted),
            Err(HandoffError::Signature(_))
        ));
        // One changed byte of the record (the target kernel) is refused.
        let text = String::from_utf8(bytes).unwrap();
        let forged = text.replacen(
            "\\\"target_release\\\":\\\"A\\\"",
            "\\\"target_release\\\":\\\"Z\\\"",
            1,
        );
        assert_ne!(forged, text, "the test did not change the record");
        assert!(matches!(
            open(forged.as_bytes(), &trusted),
            Err(HandoffError::Signature(_))
        ));
        // An unsigned record (the old format) is refused.
        let plain = serde_json::to_vec(&record()).unwrap();
        assert!(open(&plain, &trusted).is_err());
    }

    #[test]
    fn digest_round_trips_and_bad_hex_never_matches() {
        let d = state_serializers::RegionDigest {
            len: 5,
            crc32: 7,
            sha256: [3; 32],
        };
        let m = MemfdDigest::new("kv", &d);
        assert_eq!(m.region(), d);
        let bad = MemfdDigest {
            sha256: "zz".into(),
            ..m
        };
        assert_ne!(bad.region(), d);
    }

    #[test]
    fn parse_rejects_other_formats_and_garbage() {
        let e = Handoff::parse(b"not json").unwrap_err();
        assert!(matches!(e, HandoffError::Parse(_)), "{e}");
        assert!(e.to_string().contains("does not parse"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        assert!(matches!(Handoff::parse(b"{}"), Err(HandoffError::Parse(_))));
    }
}
