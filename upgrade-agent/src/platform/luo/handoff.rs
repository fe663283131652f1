//! The agent's own record across a kexec (token 0 of the `mk-agent` session): the journal
//! record, which way the kexec goes, and for every workload its session, its spec and the
//! content references of its memfds as the sending kernel computed them (which check each
//! one gets is the workload's effective `integrity`: docs/protocol.md, "LUO handoff record").

use serde::{Deserialize, Serialize};

use crate::record::UpgradeRecord;
use crate::workload::{Integrity, WorkloadSpec};

/// Format tag.
/// 3: each memfd names its content check (`check`), its seals, and for `sampled` its page
/// sample; each workload carries `staged_us` (its share of the agent's work in the sending
/// kernel). A record of another format is refused whole (no partial reading).
pub const HANDOFF_FORMAT: &str = "mk-luo-handoff/3";
/// Most workloads one record may name (LUO allows 744 sessions).
pub const MAX_WORKLOADS: usize = 1024;
/// Most memfds one workload may carry (LUO allows 128 files per session).
pub const MAX_MEMFDS: usize = 128;
/// Largest memfd length accepted (64 TiB).
pub const MAX_MEMFD_LEN: u64 = 1 << 46;
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

/// One memfd's expected contents: its size and seals always, and what `check` names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemfdDigest {
    pub name: String,
    pub len: u64,
    /// The content check the sending kernel prepared (never `auto`): `digest` (CRC32 +
    /// SHA-256 of every byte), `crc32` (CRC32 of every byte), `sampled` (`sample`),
    /// `identity` (size and seals only).
    pub check: Integrity,
    /// `F_GET_SEALS` in the sending kernel.
    pub seals: u32,
    /// `digest` and `crc32`: CRC32 of every byte (0 otherwise).
    pub crc32: u32,
    /// `digest`: hex SHA-256 (64 digits); empty otherwise.
    pub sha256: String,
    /// `sampled`: the page sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<state_serializers::PageSample>,
}

impl MemfdDigest {
    /// From a computed full digest (check `digest`).
    pub fn new(name: &str, d: &state_serializers::RegionDigest) -> Self {
        MemfdDigest {
            name: name.to_owned(),
            len: d.len,
            check: Integrity::Digest,
            seals: 0,
            crc32: d.crc32,
            sha256: hex::encode(d.sha256),
            sample: None,
        }
    }

    /// Checks the bounds and that the fields `check` needs are there (a record from
    /// untrusted bytes; nothing is acted on before this passes).
    pub fn validate(&self) -> Result<(), String> {
        if self.len > MAX_MEMFD_LEN {
            return Err(format!(
                "memfd {}: length {} is more than {MAX_MEMFD_LEN}",
                self.name, self.len
            ));
        }
        let digest_hex =
            self.sha256.len() == 64 && self.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        match self.check {
            Integrity::Auto => Err(format!(
                "memfd {}: check \"auto\" is not a check",
                self.name
            )),
            Integrity::Digest if !digest_hex => Err(format!(
                "memfd {}: check \"digest\" without a 64-digit hex sha256",
                self.name
            )),
            Integrity::Sampled => match &self.sample {
                None => Err(format!(
                    "memfd {}: check \"sampled\" without a sample",
                    self.name
                )),
                Some(s) => s
                    .validate()
                    .map_err(|e| format!("memfd {}: {e}", self.name)),
            },
            _ => Ok(()),
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
    /// Microseconds from the freeze to its session being staged in the sending kernel
    /// (hand-over image, content references, LUO preservation): the sending kernel's share
    /// of the agent's work for this workload.
    pub staged_us: u64,
    /// Microseconds on the sending kernel's CLOCK_MONOTONIC from the freeze to this record
    /// being sealed, just before the kexec call (on a return, plus the returning kernel's
    /// CLOCK_BOOTTIME then). With the receiving kernel's CLOCK_BOOTTIME it gives a lower
    /// bound of the blackout that no two kernels' wall clocks have to agree on. 0: not
    /// known (a sender before this field; the receiver then falls back to CLOCK_REALTIME).
    #[serde(default)]
    pub frozen_before_kexec_us: u64,
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
    /// A field out of bounds or missing for its check (see [`MemfdDigest::validate`]).
    #[error("the preserved handoff record is invalid: {0}")]
    Invalid(String),
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
        h.validate()?;
        Ok(h)
    }

    /// Bounds and per-memfd fields (see [`MemfdDigest::validate`]).
    pub fn validate(&self) -> Result<(), HandoffError> {
        if self.workloads.len() > MAX_WORKLOADS {
            return Err(HandoffError::Invalid(format!(
                "{} workloads, more than {MAX_WORKLOADS}",
                self.workloads.len()
            )));
        }
        for w in &self.workloads {
            if w.memfds.len() > MAX_MEMFDS {
                return Err(HandoffError::Invalid(format!(
                    "workload {}: {} memfds, more than {MAX_MEMFDS}",
                    w.name,
                    w.memfds.len()
                )));
            }
            for m in &w.memfds {
                m.validate()
                    .map_err(|e| HandoffError::Invalid(format!("workload {}: {e}", w.name)))?;
            }
        }
        Ok(())
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
        m.validate().unwrap();
        let bad = MemfdDigest {
            sha256: "zz".into(),
            ..m
        };
        assert_ne!(bad.region(), d);
        assert!(bad.validate().unwrap_err().contains("64-digit"));
    }

    fn memfd(check: Integrity) -> MemfdDigest {
        MemfdDigest {
            name: "kv-data".into(),
            len: 1 << 20,
            check,
            seals: 0,
            crc32: 0,
            sha256: String::new(),
            sample: (check == Integrity::Sampled).then_some(state_serializers::PageSample {
                page: 4096,
                count: 1024,
                seed: 9,
                crc32: 1,
            }),
        }
    }

    fn with(memfds: Vec<MemfdDigest>) -> Handoff {
        let mut h = record();
        h.workloads.push(HandoffWorkload {
            name: "kv".into(),
            session: "mk-w-kv".into(),
            spec: WorkloadSpec::new("kv", "/bin/true"),
            memfds,
            frozen_at_ns: 1,
            staged_us: 2,
            frozen_before_kexec_us: 3,
        });
        h
    }

    #[test]
    fn a_workload_without_the_monotonic_part_parses_as_not_known() {
        // A sender from before `frozen_before_kexec_us`: the receiver falls back to the
        // wall clocks (0), it does not refuse the handoff.
        let h = with(vec![memfd(Integrity::Crc32)]);
        let mut v = serde_json::to_value(&h).unwrap();
        let w = v["workloads"][0].as_object_mut().unwrap();
        assert_eq!(w.remove("frozen_before_kexec_us"), Some(3.into()));
        let back = Handoff::parse(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(back.workloads[0].frozen_before_kexec_us, 0);
        assert_eq!(back.workloads[0].staged_us, 2);
    }

    #[test]
    fn the_boot_clock_runs_and_micros_saturates() {
        let a = super::super::boottime_us();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::super::boottime_us();
        assert!(a > 0 && b >= a + 2000, "{a} {b}");
        assert_eq!(
            super::super::micros(std::time::Duration::from_millis(3)),
            3000
        );
        assert_eq!(super::super::micros(std::time::Duration::MAX), u64::MAX);
    }

    #[test]
    fn every_check_round_trips_and_is_bounded() {
        for c in [Integrity::Crc32, Integrity::Sampled, Integrity::Identity] {
            let h = with(vec![memfd(c)]);
            let text = serde_json::to_vec(&h).unwrap();
            assert_eq!(Handoff::parse(&text).unwrap(), h);
        }
        let bad = |h: Handoff, want: &str| {
            let text = serde_json::to_vec(&h).unwrap();
            let e = Handoff::parse(&text).unwrap_err();
            assert!(matches!(e, HandoffError::Invalid(_)), "{e}");
            assert!(e.to_string().contains(want), "{e} (want {want})");
        };
        bad(
            with(vec![memfd(Integrity::Auto)]),
            "\"auto\" is not a check",
        );
        bad(
            with(vec![memfd(Integrity::Digest)]),
            "without a 64-digit hex sha256",
        );
        let mut m = memfd(Integrity::Sampled);
        m.sample = None;
        bad(with(vec![m]), "without a sample");
        for (page, count, want) in [
            (4095, 8, "page size"),
            (4096, 0, "count"),
            (4096, 5000, "count"),
        ] {
            let mut m = memfd(Integrity::Sampled);
            m.sample = Some(state_serializers::PageSample {
                page,
                count,
                seed: 0,
                crc32: 0,
            });
            bad(with(vec![m]), want);
        }
        let mut m = memfd(Integrity::Crc32);
        m.len = MAX_MEMFD_LEN + 1;
        bad(with(vec![m]), "length");
        bad(
            with(vec![memfd(Integrity::Crc32); MAX_MEMFDS + 1]),
            "memfds, more than",
        );
        let mut h = record();
        h.workloads = vec![with(vec![]).workloads[0].clone(); MAX_WORKLOADS + 1];
        bad(h, "workloads, more than");
    }

    #[test]
    fn malformed_memfd_entries_are_parse_errors_not_panics() {
        let h = with(vec![memfd(Integrity::Sampled)]);
        let v = serde_json::to_value(&h).unwrap();
        let mutate = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = v.clone();
            f(&mut v["workloads"][0]["memfds"][0]);
            serde_json::to_vec(&v).unwrap()
        };
        for bytes in [
            mutate(&|m| m["check"] = "md5".into()),
            mutate(&|m| m["seals"] = (-1).into()),
            mutate(&|m| m["sample"]["page"] = "4096".into()),
            mutate(&|m| m["extra"] = 1.into()),
            mutate(&|m| {
                m.as_object_mut().unwrap().remove("check");
            }),
        ] {
            assert!(matches!(
                Handoff::parse(&bytes),
                Err(HandoffError::Parse(_))
            ));
        }
        // The previous format is refused whole.
        let mut old = v.clone();
        old["format"] = "mk-luo-handoff/2".into();
        let e = Handoff::parse(&serde_json::to_vec(&old).unwrap()).unwrap_err();
        assert!(matches!(e, HandoffError::Format { .. }), "{e}");
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
