//! Channel messages: the typed payloads carried by frames.
//!
//! Each frame carries exactly one message. The message *type* travels in the frame header
//! (a stable `u16`, see [`MessageType`]); the payload is the postcard encoding of the
//! message's struct (not of the [`Message`] enum), so the type number is never duplicated
//! inside the payload. Field order in every struct below is part of the wire format
//! (`docs/protocol.md, Part 2` lists it byte for byte): never reorder, only append in a new
//! protocol version.

use serde::{Deserialize, Serialize};

/// Stable numbers of the message types, as carried at header offset 6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageType {
    /// [`Hello`]: version offer and identity of the initiator.
    Hello = 0x0001,
    /// [`HelloAck`]: chosen version and identity of the responder.
    HelloAck = 0x0002,
    /// [`HelloReject`]: no common version (or an invalid hello); the channel closes.
    HelloReject = 0x0003,
    /// [`Heartbeat`]: liveness and coarse state.
    Heartbeat = 0x0010,
    /// [`PrepareMigration`]: announce a workload and its serialized spec.
    PrepareMigration = 0x0020,
    /// [`RegionOffer`]: the handover image and state fds of one workload (carries fds).
    RegionOffer = 0x0021,
    /// [`RegionVerified`]: the receiver's verdict on a [`RegionOffer`].
    RegionVerified = 0x0022,
    /// [`HealthReport`]: health of a migrated workload on the new instance.
    HealthReport = 0x0023,
    /// [`Commit`]: the workload now belongs to the new instance.
    Commit = 0x0024,
    /// [`Abort`]: give up one workload or the whole upgrade.
    Abort = 0x0025,
    /// [`RegionStage`] (version 2): the handover image of one workload, sent before the
    /// workload is frozen so that it is verified outside the blackout (carries one fd).
    RegionStage = 0x0026,
    /// [`StagedOffer`] (version 2): the state fds of one workload whose image was staged
    /// (carries fds).
    StagedOffer = 0x0027,
    /// [`ReleaseResources`]: CPUs and memory handed to the peer.
    ReleaseResources = 0x0030,
    /// [`Shutdown`]: the sender is about to halt; no further frames follow.
    Shutdown = 0x0031,
}

impl MessageType {
    /// Every message type, in number order.
    pub const ALL: [MessageType; 14] = [
        MessageType::Hello,
        MessageType::HelloAck,
        MessageType::HelloReject,
        MessageType::Heartbeat,
        MessageType::PrepareMigration,
        MessageType::RegionOffer,
        MessageType::RegionVerified,
        MessageType::HealthReport,
        MessageType::Commit,
        MessageType::Abort,
        MessageType::RegionStage,
        MessageType::StagedOffer,
        MessageType::ReleaseResources,
        MessageType::Shutdown,
    ];

    /// The wire number.
    pub const fn as_u16(self) -> u16 {
        self as u16
    }

    /// The type with this wire number, if any.
    pub fn from_u16(value: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_u16() == value)
    }

    /// Whether frames of this type may carry SCM_RIGHTS fds ([`RegionOffer`],
    /// [`RegionStage`], [`StagedOffer`]).
    pub const fn carries_fds(self) -> bool {
        matches!(
            self,
            MessageType::RegionOffer | MessageType::RegionStage | MessageType::StagedOffer
        )
    }

    /// The protocol version that introduced this type: a frame of an older version never
    /// carries it (encoders refuse, decoders report
    /// [`FrameError::TypeNotInVersion`](super::FrameError::TypeNotInVersion)).
    pub const fn since_version(self) -> u16 {
        match self {
            MessageType::RegionStage | MessageType::StagedOffer => 2,
            _ => 1,
        }
    }

    /// Hello, HelloAck and HelloReject: always framed with header version
    /// [`HELLO_VERSION`](super::HELLO_VERSION), before any version is negotiated.
    pub const fn is_handshake(self) -> bool {
        matches!(
            self,
            MessageType::Hello | MessageType::HelloAck | MessageType::HelloReject
        )
    }

    /// Human-readable name (the Rust variant name).
    pub const fn name(self) -> &'static str {
        match self {
            MessageType::Hello => "Hello",
            MessageType::HelloAck => "HelloAck",
            MessageType::HelloReject => "HelloReject",
            MessageType::Heartbeat => "Heartbeat",
            MessageType::PrepareMigration => "PrepareMigration",
            MessageType::RegionOffer => "RegionOffer",
            MessageType::RegionVerified => "RegionVerified",
            MessageType::HealthReport => "HealthReport",
            MessageType::Commit => "Commit",
            MessageType::Abort => "Abort",
            MessageType::RegionStage => "RegionStage",
            MessageType::StagedOffer => "StagedOffer",
            MessageType::ReleaseResources => "ReleaseResources",
            MessageType::Shutdown => "Shutdown",
        }
    }
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (0x{:04x})", self.name(), self.as_u16())
    }
}

/// Which side of the upgrade an instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// The running (old) kernel instance, which hands workloads over. Wire value 0.
    Old,
    /// The new kernel instance, which receives workloads. Wire value 1.
    New,
}

/// Identity of one end of the channel, sent in [`Hello`] and [`HelloAck`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Multikernel instance id (0 = host kernel, 1..=511 spawned); on the kexec (LUO) path
    /// and the emulated platform, the value the agent was configured with.
    pub instance_id: u16,
    /// Old or new side. Two ends with the same role refuse each other.
    pub role: Role,
    /// `uname -r` of the sender's kernel.
    pub kernel_release: String,
    /// Version string of the sending agent (e.g. `mk-agentd 0.1.0`).
    pub agent_version: String,
}

/// Version offer of the initiator. Always framed with header version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Lowest protocol version the sender speaks.
    pub min_version: u16,
    /// Highest protocol version the sender speaks (`>= min_version`).
    pub max_version: u16,
    /// Who is speaking.
    pub peer: PeerInfo,
}

/// Positive answer to [`Hello`]. Always framed with header version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// The chosen version: the highest version both ends speak. Every later frame, in
    /// both directions, carries it in its header.
    pub version: u16,
    /// Who is answering.
    pub peer: PeerInfo,
}

/// Negative answer to [`Hello`]; the responder closes the channel after sending it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReject {
    /// Lowest version the responder speaks.
    pub min_version: u16,
    /// Highest version the responder speaks.
    pub max_version: u16,
    /// Why, for the operator (e.g. "no common protocol version: offered 2..=3, supported 1..=1").
    pub reason: String,
}

/// Coarse state of an agent, reported in [`Heartbeat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AgentState {
    /// Booting, not ready for workloads. Wire value 0.
    Starting,
    /// Ready to accept or hand over workloads. Wire value 1.
    Ready,
    /// A migration is in progress. Wire value 2.
    Migrating,
    /// All workloads committed. Wire value 3.
    Committed,
    /// Rolling back after an abort. Wire value 4.
    RollingBack,
    /// Shutting down. Wire value 5.
    ShuttingDown,
}

/// Liveness signal, sent periodically by both ends after negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Sender's `CLOCK_MONOTONIC` in milliseconds (only meaningful to the sender's clock;
    /// receivers use it to detect a stuck sender, not to compare clocks).
    pub monotonic_ms: u64,
    /// Sender's coarse state.
    pub state: AgentState,
}

/// Announce one workload about to move, with its serialized spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareMigration {
    /// Stable workload identifier (unique within the upgrade).
    pub workload_id: String,
    /// The workload's spec, opaque to the channel (the agent sends the JSON of its
    /// `WorkloadSpec`; see docs/protocol.md).
    #[serde(with = "wire::bytes")]
    pub spec: Vec<u8>,
}

/// What kind of object an fd attached to a [`RegionOffer`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FdKind {
    /// A memfd (normally sealed: `F_SEAL_WRITE|F_SEAL_GROW|F_SEAL_SHRINK|F_SEAL_SEAL`),
    /// e.g. the handover image. Wire value 0.
    Memfd,
    /// A listening socket handed over so no connection is refused. Wire value 1.
    ListenSocket,
    /// A connected socket. Wire value 2.
    ConnectedSocket,
    /// Anything else (pipe, eventfd, regular file...). Wire value 3.
    Other,
}

/// Description of one fd attached to a [`RegionOffer`]; the i-th descriptor describes the
/// i-th fd of the SCM_RIGHTS array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdDescriptor {
    /// Name under which the receiver exposes the fd to the workload (the `name` part of
    /// `MK_STATE_FDS=name:fd,...`).
    pub name: String,
    /// Kind of object.
    pub kind: FdKind,
    /// Content length in bytes for memfds; 0 for sockets.
    pub length: u64,
    /// CRC32 (crc32fast / IEEE) of the content for memfds; 0 for sockets.
    pub crc32: u32,
    /// SHA-256 of the content for memfds; all zeroes for sockets.
    pub sha256: [u8; 32],
}

/// The handover image and state fds of one workload. The only message that carries fds:
/// exactly `fds.len()` fds ride with the frame (SCM_RIGHTS), in the same order. By
/// convention the first fd is the sealed memfd holding the kho-proto handover image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionOffer {
    /// Workload the regions belong to (as in [`PrepareMigration`]).
    pub workload_id: String,
    /// Length in bytes of the handover image.
    pub image_len: u64,
    /// SHA-256 of the handover image.
    pub image_sha256: [u8; 32],
    /// One descriptor per attached fd, in SCM_RIGHTS order.
    #[serde(with = "wire::seq")]
    pub fds: Vec<FdDescriptor>,
}

/// Version 2: the handover image of one workload, sent *before* the workload is frozen.
/// Exactly one fd rides with the frame: the sealed memfd holding the image. The receiver
/// runs every check of the image (length, SHA-256, parse, upgrade id, verify with a
/// trusted key, spec, task state) while the workload still runs on the sender, keeps the
/// result for `workload_id` (replacing any earlier one) and answers [`RegionVerified`].
/// The [`StagedOffer`] that follows the freeze then carries only the state fds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionStage {
    /// Workload the image belongs to (as in [`PrepareMigration`]).
    pub workload_id: String,
    /// Length in bytes of the handover image.
    pub image_len: u64,
    /// SHA-256 of the handover image.
    pub image_sha256: [u8; 32],
}

/// Version 2: the state fds of one workload whose image a [`RegionStage`] delivered,
/// sent once the workload is frozen. Exactly `fds.len()` fds ride with the frame, in the
/// same order (the image's tokens 1, 2, ...; no image fd). `image_sha256` names the staged
/// image the fds belong to: the receiver refuses the offer unless it staged exactly that
/// image for `workload_id`. Answered like a [`RegionOffer`]: [`RegionVerified`], then
/// [`HealthReport`] after `Ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedOffer {
    /// Workload the fds belong to.
    pub workload_id: String,
    /// SHA-256 of the staged image the fds complete.
    pub image_sha256: [u8; 32],
    /// One descriptor per attached fd, in SCM_RIGHTS order.
    #[serde(with = "wire::seq")]
    pub fds: Vec<FdDescriptor>,
}

/// Verdict on a [`RegionOffer`] (or, version 2, a [`RegionStage`] or [`StagedOffer`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verification {
    /// Every check passed. Wire value 0.
    Ok,
    /// A check failed. Wire value 1.
    Failed {
        /// Name of the failing check (e.g. `image_sha256`, `fd[2].crc32`, `manifest`).
        check: String,
        /// What was expected and what was found.
        detail: String,
    },
}

/// The receiver's verdict on the regions of one workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionVerified {
    /// Workload the verdict is about.
    pub workload_id: String,
    /// Ok, or the failing check.
    pub result: Verification,
}

/// Health of a migrated workload, measured on the new instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Workload the report is about.
    pub workload_id: String,
    /// Whether every health check passed.
    pub healthy: bool,
    /// Human-readable detail (failing probe, last output...).
    pub detail: String,
    /// Milliseconds from workload start on the new instance to this report.
    pub elapsed_ms: u64,
}

/// The workload now belongs to the new instance; the old one may free its copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// Workload being committed.
    pub workload_id: String,
}

/// Give up one workload (`Some`) or the whole upgrade (`None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    /// The workload to abort, or `None` for the whole upgrade.
    pub workload_id: Option<String>,
    /// Why, for the operator.
    pub reason: String,
}

/// Resources the sender hands to the peer (the old instance shrinking).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseResources {
    /// Logical CPU numbers released (multikernel: physical APIC ids).
    #[serde(with = "wire::seq")]
    pub cpus: Vec<u32>,
    /// Bytes of memory released (a multiple of the memory block size on multikernel).
    pub memory_bytes: u64,
}

/// The sender is about to halt; no further frame follows from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown {
    /// Why, for the operator.
    pub reason: String,
}

/// One channel message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloAck`].
    HelloAck(HelloAck),
    /// See [`HelloReject`].
    HelloReject(HelloReject),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`PrepareMigration`].
    PrepareMigration(PrepareMigration),
    /// See [`RegionOffer`].
    RegionOffer(RegionOffer),
    /// See [`RegionVerified`].
    RegionVerified(RegionVerified),
    /// See [`HealthReport`].
    HealthReport(HealthReport),
    /// See [`Commit`].
    Commit(Commit),
    /// See [`Abort`].
    Abort(Abort),
    /// See [`RegionStage`].
    RegionStage(RegionStage),
    /// See [`StagedOffer`].
    StagedOffer(StagedOffer),
    /// See [`ReleaseResources`].
    ReleaseResources(ReleaseResources),
    /// See [`Shutdown`].
    Shutdown(Shutdown),
}

impl Message {
    /// The header type number of this message.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::HelloAck(_) => MessageType::HelloAck,
            Message::HelloReject(_) => MessageType::HelloReject,
            Message::Heartbeat(_) => MessageType::Heartbeat,
            Message::PrepareMigration(_) => MessageType::PrepareMigration,
            Message::RegionOffer(_) => MessageType::RegionOffer,
            Message::RegionVerified(_) => MessageType::RegionVerified,
            Message::HealthReport(_) => MessageType::HealthReport,
            Message::Commit(_) => MessageType::Commit,
            Message::Abort(_) => MessageType::Abort,
            Message::RegionStage(_) => MessageType::RegionStage,
            Message::StagedOffer(_) => MessageType::StagedOffer,
            Message::ReleaseResources(_) => MessageType::ReleaseResources,
            Message::Shutdown(_) => MessageType::Shutdown,
        }
    }

    /// Number of SCM_RIGHTS fds a frame with this message must carry: `fds.len()` for a
    /// [`RegionOffer`] or a [`StagedOffer`], 1 (the image) for a [`RegionStage`], 0
    /// otherwise.
    pub fn fd_count(&self) -> usize {
        match self {
            Message::RegionOffer(offer) => offer.fds.len(),
            Message::StagedOffer(offer) => offer.fds.len(),
            Message::RegionStage(_) => 1,
            _ => 0,
        }
    }

    /// Postcard encoding of the inner struct (the frame payload).
    pub(crate) fn encode_payload(&self) -> Result<Vec<u8>, postcard::Error> {
        match self {
            Message::Hello(m) => postcard::to_stdvec(m),
            Message::HelloAck(m) => postcard::to_stdvec(m),
            Message::HelloReject(m) => postcard::to_stdvec(m),
            Message::Heartbeat(m) => postcard::to_stdvec(m),
            Message::PrepareMigration(m) => postcard::to_stdvec(m),
            Message::RegionOffer(m) => postcard::to_stdvec(m),
            Message::RegionVerified(m) => postcard::to_stdvec(m),
            Message::HealthReport(m) => postcard::to_stdvec(m),
            Message::Commit(m) => postcard::to_stdvec(m),
            Message::Abort(m) => postcard::to_stdvec(m),
            Message::RegionStage(m) => postcard::to_stdvec(m),
            Message::StagedOffer(m) => postcard::to_stdvec(m),
            Message::ReleaseResources(m) => postcard::to_stdvec(m),
            Message::Shutdown(m) => postcard::to_stdvec(m),
        }
    }

    /// Decode a payload of type `ty`. Returns the message and the number of payload
    /// bytes left unused (the caller refuses frames with unused bytes).
    pub(crate) fn decode_payload(
        ty: MessageType,
        payload: &[u8],
    ) -> Result<(Message, usize), postcard::Error> {
        fn take<'a, T: Deserialize<'a>>(
            payload: &'a [u8],
            wrap: fn(T) -> Message,
        ) -> Result<(Message, usize), postcard::Error> {
            let (value, rest) = postcard::take_from_bytes::<T>(payload)?;
            Ok((wrap(value), rest.len()))
        }
        match ty {
            MessageType::Hello => take(payload, Message::Hello),
            MessageType::HelloAck => take(payload, Message::HelloAck),
            MessageType::HelloReject => take(payload, Message::HelloReject),
            MessageType::Heartbeat => take(payload, Message::Heartbeat),
            MessageType::PrepareMigration => take(payload, Message::PrepareMigration),
            MessageType::RegionOffer => take(payload, Message::RegionOffer),
            MessageType::RegionVerified => take(payload, Message::RegionVerified),
            MessageType::HealthReport => take(payload, Message::HealthReport),
            MessageType::Commit => take(payload, Message::Commit),
            MessageType::Abort => take(payload, Message::Abort),
            MessageType::RegionStage => take(payload, Message::RegionStage),
            MessageType::StagedOffer => take(payload, Message::StagedOffer),
            MessageType::ReleaseResources => take(payload, Message::ReleaseResources),
            MessageType::Shutdown => take(payload, Message::Shutdown),
        }
    }
}

/// Serde helpers that keep decoding allocation bounded by the input.
///
/// serde's default `Vec<T>` visitor pre-allocates up to 1 MiB from the *claimed* length;
/// these helpers never pre-allocate more than a few elements, so memory only grows as
/// elements are actually decoded from input bytes. The wire format is unchanged: postcard
/// encodes a byte string and a `Vec<u8>` identically (varint length, then the bytes).
mod wire {
    pub(super) mod bytes {
        use serde::de::{Deserializer, Error, SeqAccess, Visitor};
        use serde::ser::Serializer;
        use std::fmt;

        #[allow(clippy::ptr_arg)] // signature fixed by serde(with)
        pub(crate) fn serialize<S: Serializer>(v: &Vec<u8>, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Vec<u8>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a byte string")
                }
                fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                    Ok(v.to_vec())
                }
                fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                    Ok(v)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                    let mut out = Vec::new();
                    while let Some(b) = seq.next_element()? {
                        out.push(b);
                    }
                    Ok(out)
                }
            }
            d.deserialize_byte_buf(V)
        }
    }

    pub(super) mod seq {
        use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};
        use serde::ser::{Serialize, Serializer};
        use std::fmt;
        use std::marker::PhantomData;

        /// At most this many elements are reserved up front, whatever the claimed length.
        const PREALLOC: usize = 16;

        #[allow(clippy::ptr_arg)] // signature fixed by serde(with)
        pub(crate) fn serialize<T: Serialize, S: Serializer>(
            v: &Vec<T>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            v.serialize(s)
        }

        pub(crate) fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<T>, D::Error> {
            struct V<T>(PhantomData<T>);
            impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
                type Value = Vec<T>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a sequence")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(PREALLOC));
                    while let Some(v) = seq.next_element()? {
                        out.push(v);
                    }
                    Ok(out)
                }
            }
            d.deserialize_seq(V(PhantomData))
        }
    }
}
