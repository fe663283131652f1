//! The channel protocol: framed agent-to-agent messages between kernel instances.
//!
//! The old and the new kernel instance each run an agent; the agents talk over this
//! channel to move workloads (prepare, offer regions and fds, verify, health-check,
//! commit or abort) and hand resources back. The wire format is specified byte for byte
//! in `docs/protocol.md, Part 2`.
//!
//! Layers:
//! * [`frame`]: 48-byte little-endian header (magic `MKCH`, version, message type, flags,
//!   fd count, payload length, sequence, 128-bit upgrade id, payload CRC32, header CRC32)
//!   and a postcard payload; [`encode_frame`] / [`decode_frame`] (streaming, never panics,
//!   never allocates beyond the input).
//! * [`message`]: the typed messages and their stable type numbers.
//! * [`Transport`]: async frame carriers. [`UnixTransport`] (AF_UNIX stream, fds passed
//!   with SCM_RIGHTS: the emulated platform) and [`VsockTransport`] (AF_VSOCK, optionally
//!   on the multikernel IPI transport; no fds).
//! * [`Channel`]: upgrade id, sequence numbers, version handshake.

pub mod frame;
pub mod message;
mod peer;
// The crate's only `unsafe` code (socket syscalls, fd ownership, reactor registration),
// each block with its SAFETY argument behind a safe function.
#[allow(unsafe_code)]
mod sys;
mod transport;
mod unix;
mod vsock;

pub use frame::{
    EncodeError, Frame, FrameError, FrameHeader, HEADER_LEN, MAGIC, ParseUpgradeIdError, UpgradeId,
    decode_frame, decode_header, encode_frame,
};
pub use message::{
    Abort, AgentState, Commit, FdDescriptor, FdKind, HealthReport, Heartbeat, Hello, HelloAck,
    HelloReject, Message, MessageType, PeerInfo, PrepareMigration, RegionOffer, RegionStage,
    RegionVerified, ReleaseResources, Role, Shutdown, StagedOffer, Verification,
};
pub use peer::{Channel, ChannelError, Negotiated, negotiate_version};
pub use sys::{
    SO_VM_SOCKETS_TRANSPORT, SOL_VSOCK, VSOCK_TRANSPORT_MULTIKERNEL,
    set_vsock_multikernel_transport,
};
pub use transport::{BoxFuture, StreamTransport, Transport, TransportError};
pub use unix::UnixTransport;
pub use vsock::{
    MULTIKERNEL_HOST_CID, VMADDR_CID_ANY, VsockAcceptor, VsockOptions, VsockTransport,
};

/// Lowest protocol version this build speaks.
pub const MIN_VERSION: u16 = 1;
/// Highest protocol version this build speaks (2: [`RegionStage`] and [`StagedOffer`]).
pub const MAX_VERSION: u16 = 2;
/// Header version of Hello, HelloAck and HelloReject frames, whatever is negotiated.
pub const HELLO_VERSION: u16 = 1;
/// Largest payload accepted or produced (16 MiB). Checked before any allocation.
pub const MAX_PAYLOAD_LEN: u32 = 16 * 1024 * 1024;
/// Largest number of fds one frame may carry.
pub const MAX_FDS_PER_FRAME: u16 = 64;
