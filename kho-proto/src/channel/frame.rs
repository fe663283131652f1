//! Frame header layout, encoder and streaming decoder.
//!
//! Layout (all integers little-endian, see `docs/protocol.md, Part 2`):
//!
//! | off | size | field          |
//! |-----|------|----------------|
//! | 0   | 4    | magic `MKCH`   |
//! | 4   | 2    | version        |
//! | 6   | 2    | message type   |
//! | 8   | 2    | flags (0)      |
//! | 10  | 2    | fd count       |
//! | 12  | 4    | payload length |
//! | 16  | 8    | sequence       |
//! | 24  | 16   | upgrade id     |
//! | 40  | 4    | payload CRC32  |
//! | 44  | 4    | header CRC32 (bytes 0..44) |
//!
//! followed by `payload length` bytes of postcard payload.

use std::fmt;
use std::str::FromStr;

use super::message::{Message, MessageType};
use super::{MAX_FDS_PER_FRAME, MAX_PAYLOAD_LEN, MAX_VERSION, MIN_VERSION};

/// The four magic bytes opening every frame.
pub const MAGIC: [u8; 4] = *b"MKCH";
/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 48;

/// Header field offsets (bytes from the start of the frame).
pub mod offset {
    /// `magic`, 4 bytes.
    pub const MAGIC: usize = 0;
    /// `version`, u16.
    pub const VERSION: usize = 4;
    /// `message_type`, u16.
    pub const MESSAGE_TYPE: usize = 6;
    /// `flags`, u16.
    pub const FLAGS: usize = 8;
    /// `fd_count`, u16.
    pub const FD_COUNT: usize = 10;
    /// `payload_len`, u32.
    pub const PAYLOAD_LEN: usize = 12;
    /// `sequence`, u64.
    pub const SEQUENCE: usize = 16;
    /// `upgrade_id`, 16 bytes.
    pub const UPGRADE_ID: usize = 24;
    /// `payload_crc32`, u32.
    pub const PAYLOAD_CRC: usize = 40;
    /// `header_crc32`, u32 (CRC32 of bytes 0..44).
    pub const HEADER_CRC: usize = 44;
    /// First payload byte.
    pub const PAYLOAD: usize = super::HEADER_LEN;
}

/// The 128-bit identifier of one upgrade. Every frame carries it; a channel refuses frames
/// of another upgrade. Text form: 32 lowercase hex digits ([`Display`](fmt::Display),
/// [`FromStr`]); serde form: the 16 bytes.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize, serde::Deserialize,
)]
pub struct UpgradeId(pub [u8; 16]);

impl From<[u8; 16]> for UpgradeId {
    fn from(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }
}

impl From<UpgradeId> for [u8; 16] {
    fn from(id: UpgradeId) -> Self {
        id.0
    }
}

impl UpgradeId {
    /// Wrap raw bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for UpgradeId {
    /// 32 lowercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for UpgradeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UpgradeId({self})")
    }
}

/// Error parsing an [`UpgradeId`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid upgrade id {input:?}: expected exactly 32 hex digits (16 bytes)")]
pub struct ParseUpgradeIdError {
    /// The rejected text.
    pub input: String,
}

impl FromStr for UpgradeId {
    type Err = ParseUpgradeIdError;

    /// Parse 32 hex digits (either case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseUpgradeIdError {
            input: s.chars().take(64).collect(),
        })?;
        Ok(Self(out))
    }
}

/// One decoded (or to-be-encoded) frame.
///
/// The message type, fd count, payload length and both CRCs are derived from `message`
/// when encoding and verified when decoding; the flags field is reserved (always 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Protocol version of this frame (header offset 4). Handshake frames always carry
    /// [`HELLO_VERSION`](super::HELLO_VERSION); every later frame the negotiated version.
    pub version: u16,
    /// Sender's sequence number (offset 16): 0 for the sender's first frame, then +1 per
    /// frame.
    pub sequence: u64,
    /// Upgrade this frame belongs to (offset 24).
    pub upgrade_id: UpgradeId,
    /// The message.
    pub message: Message,
}

impl Frame {
    /// The header type number of the message.
    pub fn message_type(&self) -> MessageType {
        self.message.message_type()
    }

    /// Number of SCM_RIGHTS fds that must travel with this frame.
    pub fn fd_count(&self) -> usize {
        self.message.fd_count()
    }
}

/// Why a frame could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The payload exceeds [`MAX_PAYLOAD_LEN`].
    #[error(
        "{message_type} payload is {len} bytes, above the channel limit of {max} bytes: \
         move bulk data through an fd (memfd) instead of the frame payload"
    )]
    PayloadTooLarge {
        /// Message type.
        message_type: MessageType,
        /// Encoded payload length.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// The message describes more fds than [`MAX_FDS_PER_FRAME`].
    #[error(
        "{message_type} describes {count} fds, above the limit of {max} per frame: \
         split the offer"
    )]
    TooManyFds {
        /// Message type.
        message_type: MessageType,
        /// Number of fd descriptors.
        count: usize,
        /// The limit.
        max: u16,
    },
    /// The frame's version is outside what this build speaks.
    #[error("cannot encode a version {version} frame: this build speaks versions {min}..={max}")]
    UnsupportedVersion {
        /// Requested version.
        version: u16,
        /// Lowest supported.
        min: u16,
        /// Highest supported.
        max: u16,
    },
    /// The message type was introduced by a later protocol version than the frame's.
    #[error(
        "{message_type} exists since protocol version {since}: it cannot be sent in a \
         version {version} frame"
    )]
    TypeNotInVersion {
        /// Message type.
        message_type: MessageType,
        /// The frame's version.
        version: u16,
        /// The version that introduced the type.
        since: u16,
    },
    /// postcard failed (cannot happen for the message types defined here).
    #[error("postcard encoding of {message_type} failed: {source}")]
    Payload {
        /// Message type.
        message_type: MessageType,
        /// Underlying error.
        source: postcard::Error,
    },
}

/// Why bytes could not be decoded as a frame. Every variant except `Incomplete` means the
/// stream is corrupt or hostile and the channel must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More bytes are needed; `needed` is how many more at least (not an error on a stream).
    #[error("incomplete frame: at least {needed} more bytes needed")]
    Incomplete {
        /// Additional bytes needed at minimum.
        needed: usize,
    },
    /// Offset 0 does not hold `MKCH`.
    #[error(
        "bad magic at offset 0: found {found:02x?}, expected \"MKCH\" (4d 4b 43 48): \
         the peer is not speaking the mk-upgrade channel protocol, or the stream lost sync"
    )]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The header CRC32 (offset 44) does not match bytes 0..44.
    #[error(
        "header CRC32 mismatch at offset 44: stored {stored:#010x}, computed {computed:#010x} \
         over bytes 0..44: the header is corrupt"
    )]
    HeaderCrc {
        /// CRC stored in the frame.
        stored: u32,
        /// CRC computed over the header bytes.
        computed: u32,
    },
    /// The version (offset 4) is outside what this build speaks.
    #[error(
        "unsupported protocol version {version} at offset 4: this build speaks {min}..={max}; \
         upgrade the older agent"
    )]
    UnsupportedVersion {
        /// Version found.
        version: u16,
        /// Lowest supported.
        min: u16,
        /// Highest supported.
        max: u16,
    },
    /// Handshake frames must carry version 1.
    #[error(
        "{message_type} frame carries version {version} at offset 4: handshake frames always \
         use version {expected}"
    )]
    HandshakeVersion {
        /// Message type.
        message_type: MessageType,
        /// Version found.
        version: u16,
        /// The only version allowed.
        expected: u16,
    },
    /// The message type (offset 6) is not defined.
    #[error(
        "unknown message type {value:#06x} at offset 6: the peer speaks a newer protocol or the frame is corrupt"
    )]
    UnknownMessageType {
        /// The number found.
        value: u16,
    },
    /// Reserved flags (offset 8) are set.
    #[error("reserved flags {flags:#06x} set at offset 8: must be 0 in this protocol version")]
    ReservedFlags {
        /// The flags found.
        flags: u16,
    },
    /// The message type (offset 6) was introduced by a later protocol version than the
    /// frame's (offset 4).
    #[error(
        "{message_type} at offset 6 exists since protocol version {since}, but the frame \
         carries version {version} at offset 4"
    )]
    TypeNotInVersion {
        /// Message type.
        message_type: MessageType,
        /// The frame's version.
        version: u16,
        /// The version that introduced the type.
        since: u16,
    },
    /// The fd count (offset 10) is above [`MAX_FDS_PER_FRAME`].
    #[error("fd count {count} at offset 10 exceeds the limit of {max} fds per frame")]
    TooManyFds {
        /// Count found.
        count: u16,
        /// The limit.
        max: u16,
    },
    /// The fd count (offset 10) does not match the message.
    #[error(
        "fd count {header} at offset 10 does not match the {message_type} payload, which \
         describes {described} fds (RegionOffer and StagedOffer carry one per descriptor, \
         RegionStage exactly one, every other type none)"
    )]
    FdCountMismatch {
        /// Message type.
        message_type: MessageType,
        /// Count in the header.
        header: u16,
        /// Count implied by the payload.
        described: usize,
    },
    /// The payload length (offset 12) is above [`MAX_PAYLOAD_LEN`]. Checked before any
    /// payload byte is read or buffer allocated.
    #[error("payload length {len} at offset 12 exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// Length found.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The payload CRC32 (offset 40) does not match the payload.
    #[error(
        "payload CRC32 mismatch (stored at offset 40): stored {stored:#010x}, computed \
         {computed:#010x} over {len} payload bytes at offset 48: the payload is corrupt"
    )]
    PayloadCrc {
        /// CRC stored in the header.
        stored: u32,
        /// CRC computed over the payload.
        computed: u32,
        /// Payload length.
        len: u32,
    },
    /// The payload is not a valid postcard encoding of the message type.
    #[error("{message_type} payload at offset 48 does not decode: {source}")]
    Payload {
        /// Message type.
        message_type: MessageType,
        /// postcard's error.
        source: postcard::Error,
    },
    /// The payload decodes but leaves bytes unused.
    #[error(
        "{message_type} payload at offset 48 has {unused} trailing bytes after the message: \
         the frame is corrupt or from an incompatible encoder"
    )]
    TrailingPayload {
        /// Message type.
        message_type: MessageType,
        /// Bytes left over.
        unused: usize,
    },
}

fn le_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Encode a frame: 48-byte header followed by the postcard payload.
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, EncodeError> {
    let message_type = frame.message_type();
    if !(MIN_VERSION..=MAX_VERSION).contains(&frame.version) {
        return Err(EncodeError::UnsupportedVersion {
            version: frame.version,
            min: MIN_VERSION,
            max: MAX_VERSION,
        });
    }
    if message_type.since_version() > frame.version {
        return Err(EncodeError::TypeNotInVersion {
            message_type,
            version: frame.version,
            since: message_type.since_version(),
        });
    }
    let fd_count = frame.fd_count();
    let fd_count_u16 = u16::try_from(fd_count)
        .ok()
        .filter(|c| *c <= MAX_FDS_PER_FRAME)
        .ok_or(EncodeError::TooManyFds {
            message_type,
            count: fd_count,
            max: MAX_FDS_PER_FRAME,
        })?;
    let payload = frame
        .message
        .encode_payload()
        .map_err(|source| EncodeError::Payload {
            message_type,
            source,
        })?;
    let payload_len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD_LEN)
        .ok_or(EncodeError::PayloadTooLarge {
            message_type,
            len: payload.len(),
            max: MAX_PAYLOAD_LEN,
        })?;

    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&frame.version.to_le_bytes());
    out.extend_from_slice(&message_type.as_u16().to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&fd_count_u16.to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&frame.sequence.to_le_bytes());
    out.extend_from_slice(&frame.upgrade_id.0);
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let header_crc = crc32fast::hash(&out[..offset::HEADER_CRC]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    debug_assert_eq!(out.len(), HEADER_LEN);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Validated header fields, before the payload is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version.
    pub version: u16,
    /// Message type.
    pub message_type: MessageType,
    /// Number of fds attached.
    pub fd_count: u16,
    /// Payload length in bytes.
    pub payload_len: u32,
    /// Sequence number.
    pub sequence: u64,
    /// Upgrade id.
    pub upgrade_id: UpgradeId,
    /// Payload CRC32.
    pub payload_crc32: u32,
}

impl FrameHeader {
    /// Total frame length (header + payload).
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// Parse and validate the 48-byte header at the start of `bytes`.
///
/// Checks, in order: length (`Incomplete`), magic, header CRC, version, message type,
/// handshake version, the type's first version, flags, fd count, payload length. Nothing
/// is allocated.
pub fn decode_header(bytes: &[u8]) -> Result<FrameHeader, FrameError> {
    if bytes.len() < HEADER_LEN {
        // Report bad magic as early as possible so a desynchronised stream fails fast.
        let have = bytes.len().min(MAGIC.len());
        if bytes[..have] != MAGIC[..have] {
            let mut found = [0u8; 4];
            found[..have].copy_from_slice(&bytes[..have]);
            return Err(FrameError::BadMagic { found });
        }
        return Err(FrameError::Incomplete {
            needed: HEADER_LEN - bytes.len(),
        });
    }
    let h = &bytes[..HEADER_LEN];
    if h[offset::MAGIC..offset::MAGIC + 4] != MAGIC {
        let mut found = [0u8; 4];
        found.copy_from_slice(&h[offset::MAGIC..offset::MAGIC + 4]);
        return Err(FrameError::BadMagic { found });
    }
    let stored = le_u32(h, offset::HEADER_CRC);
    let computed = crc32fast::hash(&h[..offset::HEADER_CRC]);
    if stored != computed {
        return Err(FrameError::HeaderCrc { stored, computed });
    }
    let version = le_u16(h, offset::VERSION);
    if !(MIN_VERSION..=MAX_VERSION).contains(&version) {
        return Err(FrameError::UnsupportedVersion {
            version,
            min: MIN_VERSION,
            max: MAX_VERSION,
        });
    }
    let raw_type = le_u16(h, offset::MESSAGE_TYPE);
    let message_type = MessageType::from_u16(raw_type)
        .ok_or(FrameError::UnknownMessageType { value: raw_type })?;
    if message_type.is_handshake() && version != super::HELLO_VERSION {
        return Err(FrameError::HandshakeVersion {
            message_type,
            version,
            expected: super::HELLO_VERSION,
        });
    }
    if message_type.since_version() > version {
        return Err(FrameError::TypeNotInVersion {
            message_type,
            version,
            since: message_type.since_version(),
        });
    }
    let flags = le_u16(h, offset::FLAGS);
    if flags != 0 {
        return Err(FrameError::ReservedFlags { flags });
    }
    let fd_count = le_u16(h, offset::FD_COUNT);
    if fd_count > MAX_FDS_PER_FRAME {
        return Err(FrameError::TooManyFds {
            count: fd_count,
            max: MAX_FDS_PER_FRAME,
        });
    }
    if fd_count != 0 && !message_type.carries_fds() {
        return Err(FrameError::FdCountMismatch {
            message_type,
            header: fd_count,
            described: 0,
        });
    }
    let payload_len = le_u32(h, offset::PAYLOAD_LEN);
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(FrameError::PayloadTooLarge {
            len: payload_len,
            max: MAX_PAYLOAD_LEN,
        });
    }
    let mut upgrade_id = [0u8; 16];
    upgrade_id.copy_from_slice(&h[offset::UPGRADE_ID..offset::UPGRADE_ID + 16]);
    Ok(FrameHeader {
        version,
        message_type,
        fd_count,
        payload_len,
        sequence: le_u64(h, offset::SEQUENCE),
        upgrade_id: UpgradeId(upgrade_id),
        payload_crc32: le_u32(h, offset::PAYLOAD_CRC),
    })
}

/// Decode one frame from the start of `bytes` (a streaming decoder).
///
/// On success returns the frame and the number of bytes it occupied; bytes after it are
/// not looked at. Returns [`FrameError::Incomplete`] when `bytes` is a valid prefix that
/// is too short (keep reading and call again with more bytes), any other error when the
/// bytes can never become a valid frame. Never panics; never allocates more than the
/// payload bytes actually present (the length limit is checked before anything else
/// depends on it).
///
/// The upgrade id and the sequence number are returned, not judged: [`Channel`] checks
/// them against the channel state.
///
/// [`Channel`]: super::Channel
pub fn decode_frame(bytes: &[u8]) -> Result<(Frame, usize), FrameError> {
    let header = decode_header(bytes)?;
    let total = header.frame_len();
    if bytes.len() < total {
        return Err(FrameError::Incomplete {
            needed: total - bytes.len(),
        });
    }
    let payload = &bytes[HEADER_LEN..total];
    let computed = crc32fast::hash(payload);
    if computed != header.payload_crc32 {
        return Err(FrameError::PayloadCrc {
            stored: header.payload_crc32,
            computed,
            len: header.payload_len,
        });
    }
    let message_type = header.message_type;
    let (message, unused) =
        Message::decode_payload(message_type, payload).map_err(|source| FrameError::Payload {
            message_type,
            source,
        })?;
    if unused != 0 {
        return Err(FrameError::TrailingPayload {
            message_type,
            unused,
        });
    }
    let described = message.fd_count();
    if described != usize::from(header.fd_count) {
        return Err(FrameError::FdCountMismatch {
            message_type,
            header: header.fd_count,
            described,
        });
    }
    Ok((
        Frame {
            version: header.version,
            sequence: header.sequence,
            upgrade_id: header.upgrade_id,
            message,
        },
        total,
    ))
}
