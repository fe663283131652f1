//! [`Channel`]: one end of an upgrade's agent-to-agent channel on top of a [`Transport`].
//!
//! It stamps outgoing frames with the upgrade id, the negotiated version and increasing
//! sequence numbers, and refuses incoming frames of another upgrade, out of sequence, or
//! with another version. The handshake (Hello → HelloAck | HelloReject) picks the highest
//! version both ends speak.

use std::ops::RangeInclusive;
use std::os::fd::{BorrowedFd, OwnedFd};

use super::frame::{Frame, UpgradeId};
use super::message::{Hello, HelloAck, HelloReject, Message, MessageType, PeerInfo, Role};
use super::transport::{Transport, TransportError};
use super::{HELLO_VERSION, MAX_VERSION, MIN_VERSION};

/// The highest version in both ranges, or `None` when they do not overlap (or a range is
/// empty).
pub fn negotiate_version(ours: RangeInclusive<u16>, theirs: RangeInclusive<u16>) -> Option<u16> {
    let low = (*ours.start()).max(*theirs.start());
    let high = (*ours.end()).min(*theirs.end());
    (low <= high).then_some(high)
}

/// Why the channel refused a frame or the handshake failed. After any error the channel
/// should be dropped (the peer sees the connection close).
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The transport failed or received an invalid frame.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The frame belongs to another upgrade.
    #[error(
        "{message_type} frame (sequence {sequence}) belongs to upgrade {found}, but this channel \
         serves upgrade {expected}: the peer runs a different upgrade; stop it or use its id"
    )]
    WrongUpgrade {
        /// This channel's upgrade id.
        expected: UpgradeId,
        /// The frame's upgrade id.
        found: UpgradeId,
        /// Message type.
        message_type: MessageType,
        /// The frame's sequence number.
        sequence: u64,
    },
    /// The frame's sequence number is not the next one expected.
    #[error(
        "{message_type} frame has sequence {found}, expected {expected}: frames were lost, \
         duplicated or replayed"
    )]
    Sequence {
        /// Expected sequence number.
        expected: u64,
        /// Found.
        found: u64,
        /// Message type.
        message_type: MessageType,
    },
    /// The frame's header version is not the negotiated one.
    #[error(
        "{message_type} frame carries version {found}, but version {negotiated} was negotiated"
    )]
    VersionMismatch {
        /// Negotiated version.
        negotiated: u16,
        /// Version in the frame.
        found: u16,
        /// Message type.
        message_type: MessageType,
    },
    /// The version ranges do not overlap.
    #[error(
        "no common protocol version: this agent speaks {ours_min}..={ours_max}, the peer \
         {theirs_min}..={theirs_max}; upgrade the older agent"
    )]
    NoCommonVersion {
        /// Our lowest.
        ours_min: u16,
        /// Our highest.
        ours_max: u16,
        /// Peer's lowest.
        theirs_min: u16,
        /// Peer's highest.
        theirs_max: u16,
    },
    /// The peer refused our Hello.
    #[error("peer refused the handshake (it speaks {min_version}..={max_version}): {reason}")]
    Rejected {
        /// Peer's lowest version.
        min_version: u16,
        /// Peer's highest version.
        max_version: u16,
        /// Peer's reason.
        reason: String,
    },
    /// A Hello with an empty version range.
    #[error("peer's Hello offers an empty version range {min_version}..={max_version}")]
    InvalidHello {
        /// Offered lowest.
        min_version: u16,
        /// Offered highest.
        max_version: u16,
    },
    /// The HelloAck chose a version we did not offer.
    #[error(
        "peer's HelloAck chose version {chosen}, outside the offered {min_version}..={max_version}"
    )]
    BadAck {
        /// Chosen version.
        chosen: u16,
        /// Offered lowest.
        min_version: u16,
        /// Offered highest.
        max_version: u16,
    },
    /// Both ends claim the same role.
    #[error(
        "both ends claim role {role:?} (peer instance {peer_instance}): one end must be the old \
         instance and the other the new one"
    )]
    RoleConflict {
        /// The shared role.
        role: Role,
        /// Peer's instance id.
        peer_instance: u16,
    },
    /// A message arrived that the protocol does not allow here.
    #[error("unexpected {found} {context}")]
    UnexpectedMessage {
        /// What arrived.
        found: MessageType,
        /// Where (e.g. "while waiting for Hello").
        context: &'static str,
    },
    /// `send`/`recv` before the handshake completed.
    #[error("cannot {op} {message_type:?} before the Hello/HelloAck handshake completed")]
    NotNegotiated {
        /// `send` or `recv`.
        op: &'static str,
        /// Message type involved, if known.
        message_type: Option<MessageType>,
    },
    /// Handshake messages are sent only by the negotiation methods.
    #[error(
        "{message_type} is a handshake message: use negotiate_as_initiator/negotiate_as_responder"
    )]
    HandshakeMessage {
        /// Message type.
        message_type: MessageType,
    },
    /// The requested local version range is not within what this build speaks.
    #[error(
        "version range {min_version}..={max_version} is not a non-empty subrange of the \
         supported {supported_min}..={supported_max}"
    )]
    InvalidVersionRange {
        /// Requested lowest.
        min_version: u16,
        /// Requested highest.
        max_version: u16,
        /// Supported lowest.
        supported_min: u16,
        /// Supported highest.
        supported_max: u16,
    },
}

/// Outcome of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The version every later frame carries.
    pub version: u16,
    /// The peer's identity.
    pub peer: PeerInfo,
}

/// One end of the channel of one upgrade.
///
/// `send` and `recv` take `&mut self`. To send heartbeats while waiting for the peer,
/// `tokio::select!` between `recv()` and a timer: `recv` is cancellation-safe, so a timer
/// tick that wins the race loses no bytes, and the next `recv()` resumes the frame. Wrap
/// `recv()` in `tokio::time::timeout` to detect a silent peer. After any error, drop the
/// channel.
#[derive(Debug)]
pub struct Channel<T> {
    transport: T,
    upgrade_id: UpgradeId,
    local: PeerInfo,
    min_version: u16,
    max_version: u16,
    negotiated: Option<Negotiated>,
    next_send: u64,
    next_recv: u64,
}

impl<T: Transport> Channel<T> {
    /// A channel for `upgrade_id`, speaking every version this build supports
    /// ([`MIN_VERSION`]..=[`MAX_VERSION`]), introducing itself as `local`.
    pub fn new(transport: T, upgrade_id: UpgradeId, local: PeerInfo) -> Self {
        Self {
            transport,
            upgrade_id,
            local,
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            negotiated: None,
            next_send: 0,
            next_recv: 0,
        }
    }

    /// Restrict the versions offered/accepted (e.g. pin an older version during a staged
    /// roll-out). Must be a non-empty subrange of [`MIN_VERSION`]..=[`MAX_VERSION`].
    pub fn with_version_range(
        mut self,
        min_version: u16,
        max_version: u16,
    ) -> Result<Self, ChannelError> {
        if min_version > max_version || min_version < MIN_VERSION || max_version > MAX_VERSION {
            return Err(ChannelError::InvalidVersionRange {
                min_version,
                max_version,
                supported_min: MIN_VERSION,
                supported_max: MAX_VERSION,
            });
        }
        self.min_version = min_version;
        self.max_version = max_version;
        Ok(self)
    }

    /// The upgrade this channel serves.
    pub fn upgrade_id(&self) -> UpgradeId {
        self.upgrade_id
    }

    /// This end's identity.
    pub fn local(&self) -> &PeerInfo {
        &self.local
    }

    /// The handshake outcome, once negotiated.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// The negotiated version, once negotiated.
    pub fn version(&self) -> Option<u16> {
        self.negotiated.as_ref().map(|n| n.version)
    }

    /// The sequence number the next sent frame will carry.
    pub fn next_send_sequence(&self) -> u64 {
        self.next_send
    }

    /// The transport.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Give back the transport.
    pub fn into_transport(self) -> T {
        self.transport
    }

    fn hello(&self) -> Hello {
        Hello {
            min_version: self.min_version,
            max_version: self.max_version,
            peer: self.local.clone(),
        }
    }

    async fn send_raw(
        &mut self,
        version: u16,
        message: Message,
        fds: &[BorrowedFd<'_>],
    ) -> Result<u64, ChannelError> {
        let frame = Frame {
            version,
            sequence: self.next_send,
            upgrade_id: self.upgrade_id,
            message,
        };
        self.transport.send(&frame, fds).await?;
        let seq = self.next_send;
        self.next_send += 1;
        Ok(seq)
    }

    /// Receive a frame and check upgrade id and sequence (not the version).
    async fn recv_raw(&mut self) -> Result<(Frame, Vec<OwnedFd>), ChannelError> {
        let (frame, fds) = self.transport.recv().await?;
        if frame.upgrade_id != self.upgrade_id {
            return Err(ChannelError::WrongUpgrade {
                expected: self.upgrade_id,
                found: frame.upgrade_id,
                message_type: frame.message_type(),
                sequence: frame.sequence,
            });
        }
        if frame.sequence != self.next_recv {
            return Err(ChannelError::Sequence {
                expected: self.next_recv,
                found: frame.sequence,
                message_type: frame.message_type(),
            });
        }
        self.next_recv += 1;
        Ok((frame, fds))
    }

    fn check_role(&self, peer: &PeerInfo) -> Result<(), ChannelError> {
        if peer.role == self.local.role {
            return Err(ChannelError::RoleConflict {
                role: peer.role,
                peer_instance: peer.instance_id,
            });
        }
        Ok(())
    }

    /// Send Hello and wait for HelloAck (or HelloReject).
    pub async fn negotiate_as_initiator(&mut self) -> Result<Negotiated, ChannelError> {
        let hello = Message::Hello(self.hello());
        self.send_raw(HELLO_VERSION, hello, &[]).await?;
        let (frame, _fds) = self.recv_raw().await?;
        match frame.message {
            Message::HelloAck(HelloAck { version, peer }) => {
                if !(self.min_version..=self.max_version).contains(&version) {
                    return Err(ChannelError::BadAck {
                        chosen: version,
                        min_version: self.min_version,
                        max_version: self.max_version,
                    });
                }
                self.check_role(&peer)?;
                let n = Negotiated { version, peer };
                self.negotiated = Some(n.clone());
                tracing::debug!(version, peer = ?n.peer, "channel negotiated as initiator");
                Ok(n)
            }
            Message::HelloReject(r) => Err(ChannelError::Rejected {
                min_version: r.min_version,
                max_version: r.max_version,
                reason: r.reason,
            }),
            other => Err(ChannelError::UnexpectedMessage {
                found: other.message_type(),
                context: "while waiting for HelloAck",
            }),
        }
    }

    async fn reject(&mut self, reason: String) {
        let msg = Message::HelloReject(HelloReject {
            min_version: self.min_version,
            max_version: self.max_version,
            reason,
        });
        // Best effort: the handshake already failed; the caller reports the real error.
        if let Err(e) = self.send_raw(HELLO_VERSION, msg, &[]).await {
            tracing::debug!(error = %e, "could not send HelloReject");
        }
    }

    /// Wait for Hello, answer HelloAck with the highest common version, or HelloReject
    /// (and return the error) when there is none, the Hello is invalid, both ends claim the
    /// same role, or the Hello belongs to another upgrade.
    pub async fn negotiate_as_responder(&mut self) -> Result<Negotiated, ChannelError> {
        let frame = match self.recv_raw().await {
            Ok((frame, _fds)) => frame,
            Err(e @ ChannelError::WrongUpgrade { .. }) => {
                self.reject(e.to_string()).await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let hello = match frame.message {
            Message::Hello(h) => h,
            other => {
                let e = ChannelError::UnexpectedMessage {
                    found: other.message_type(),
                    context: "while waiting for Hello",
                };
                self.reject(e.to_string()).await;
                return Err(e);
            }
        };
        if hello.min_version > hello.max_version {
            let e = ChannelError::InvalidHello {
                min_version: hello.min_version,
                max_version: hello.max_version,
            };
            self.reject(e.to_string()).await;
            return Err(e);
        }
        if let Err(e) = self.check_role(&hello.peer) {
            self.reject(e.to_string()).await;
            return Err(e);
        }
        let Some(version) = negotiate_version(
            self.min_version..=self.max_version,
            hello.min_version..=hello.max_version,
        ) else {
            let e = ChannelError::NoCommonVersion {
                ours_min: self.min_version,
                ours_max: self.max_version,
                theirs_min: hello.min_version,
                theirs_max: hello.max_version,
            };
            self.reject(e.to_string()).await;
            return Err(e);
        };
        let ack = Message::HelloAck(HelloAck {
            version,
            peer: self.local.clone(),
        });
        self.send_raw(HELLO_VERSION, ack, &[]).await?;
        let n = Negotiated {
            version,
            peer: hello.peer,
        };
        self.negotiated = Some(n.clone());
        tracing::debug!(version, peer = ?n.peer, "channel negotiated as responder");
        Ok(n)
    }

    /// Send one message (not a handshake message) with its fds (`fds.len()` must equal
    /// `message.fd_count()`). Returns the sequence number used.
    pub async fn send(
        &mut self,
        message: Message,
        fds: &[BorrowedFd<'_>],
    ) -> Result<u64, ChannelError> {
        let message_type = message.message_type();
        if message_type.is_handshake() {
            return Err(ChannelError::HandshakeMessage { message_type });
        }
        let Some(version) = self.version() else {
            return Err(ChannelError::NotNegotiated {
                op: "send",
                message_type: Some(message_type),
            });
        };
        self.send_raw(version, message, fds).await
    }

    /// Receive the next message and its fds (close-on-exec, in descriptor order).
    /// Refuses frames of another upgrade, out of sequence, with a version other than the
    /// negotiated one, and handshake messages after the handshake.
    pub async fn recv(&mut self) -> Result<(Frame, Vec<OwnedFd>), ChannelError> {
        let Some(negotiated) = self.version() else {
            return Err(ChannelError::NotNegotiated {
                op: "recv",
                message_type: None,
            });
        };
        let (frame, fds) = self.recv_raw().await?;
        let message_type = frame.message_type();
        if message_type.is_handshake() {
            return Err(ChannelError::UnexpectedMessage {
                found: message_type,
                context: "after the handshake completed",
            });
        }
        if frame.version != negotiated {
            return Err(ChannelError::VersionMismatch {
                negotiated,
                found: frame.version,
                message_type,
            });
        }
        Ok((frame, fds))
    }
}
