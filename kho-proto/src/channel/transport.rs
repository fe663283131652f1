//! The [`Transport`] trait and the fd-less byte-stream transport used for AF_VSOCK.

use std::future::Future;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::frame::{EncodeError, Frame, FrameError, decode_frame};
use super::message::MessageType;

/// A boxed, `Send` future: what [`Transport`] methods return, so the trait stays
/// dyn-compatible (`Box<dyn Transport>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Size of one socket read.
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// Why a transport could not send or receive a frame.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The received bytes are not a valid frame; the stream is out of sync, close it.
    #[error("received an invalid frame: {0}")]
    Frame(#[from] FrameError),
    /// The frame could not be encoded.
    #[error("cannot encode frame: {0}")]
    Encode(#[from] EncodeError),
    /// Socket I/O failed.
    #[error("{transport} transport: {op} failed: {source}")]
    Io {
        /// `unix` or `vsock`.
        transport: &'static str,
        /// The operation (`sendmsg`, `recvmsg`, `connect ...`, ...).
        op: String,
        /// The OS error.
        source: io::Error,
    },
    /// The peer closed the stream at a frame boundary.
    #[error("{transport} transport: peer closed the connection")]
    Closed {
        /// `unix` or `vsock`.
        transport: &'static str,
    },
    /// The peer closed the stream in the middle of a frame.
    #[error(
        "{transport} transport: peer closed the connection in the middle of a frame \
         ({buffered} bytes buffered)"
    )]
    ClosedMidFrame {
        /// `unix` or `vsock`.
        transport: &'static str,
        /// Bytes of the unfinished frame already received.
        buffered: usize,
    },
    /// `send` was given a number of fds different from what the message describes.
    #[error(
        "{message_type} describes {expected} fds but {given} were passed to send: pass one \
         fd per descriptor, in order"
    )]
    FdCountMismatch {
        /// Message type.
        message_type: MessageType,
        /// Count the message describes.
        expected: usize,
        /// Count passed.
        given: usize,
    },
    /// The transport cannot carry fds (AF_VSOCK, or any non-Unix stream).
    #[error(
        "the {transport} transport cannot carry file descriptors ({message_type} wants {count}): \
         fd passing needs the Unix-socket transport (emulated platform)"
    )]
    FdsUnsupported {
        /// Transport name.
        transport: &'static str,
        /// Message type.
        message_type: MessageType,
        /// Number of fds.
        count: usize,
    },
    /// More fds arrived with one message than the receiver accepts; all were closed.
    #[error(
        "received {count} fds in one message, above this receiver's cap of {max}; all were closed"
    )]
    TooManyFds {
        /// Fds received.
        count: usize,
        /// The cap.
        max: usize,
    },
    /// The kernel truncated the control data (fds were dropped, e.g. RLIMIT_NOFILE).
    #[error(
        "control data truncated on receive (MSG_CTRUNC): the kernel dropped passed fds, \
         most likely because this process hit RLIMIT_NOFILE"
    )]
    FdsTruncated,
    /// Fds arrived that no frame claims (they did not ride with the first byte of a frame
    /// that declares fds); they were closed.
    #[error(
        "{count} fds arrived at stream offset {offset} that no frame declares; they were \
         closed (the peer violated the fd-passing rules)"
    )]
    UnexpectedFds {
        /// Number of fds.
        count: usize,
        /// Stream offset of the read that delivered them.
        offset: u64,
    },
    /// A frame declares fds that did not arrive with its first byte.
    #[error(
        "{message_type} frame at stream offset {offset} declares {expected} fds but {received} \
         arrived with its first byte"
    )]
    MissingFds {
        /// Message type.
        message_type: MessageType,
        /// Stream offset of the frame.
        offset: u64,
        /// Fds declared in the header.
        expected: usize,
        /// Fds received.
        received: usize,
    },
    /// The multikernel vsock transport option was refused by the kernel.
    #[error(
        "setsockopt(AF_VSOCK, SO_VM_SOCKETS_TRANSPORT=9, VSOCK_TRANSPORT_MULTIKERNEL=1) \
         failed: {source}; this kernel lacks the multikernel vsock transport (stock kernels \
         answer ENOPROTOOPT): run on a multikernel host or disable the multikernel option"
    )]
    MultikernelTransportUnavailable {
        /// The OS error.
        source: io::Error,
    },
}

impl TransportError {
    pub(crate) fn io(transport: &'static str, op: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            transport,
            op: op.into(),
            source,
        }
    }
}

/// A bidirectional, ordered, reliable carrier of frames (and, for Unix sockets, fds).
///
/// Methods return boxed futures so the trait is dyn-compatible: both
/// `Channel<UnixTransport>` and `Channel<Box<dyn Transport>>` work.
///
/// * `send` writes the whole frame; `fds.len()` must equal `frame.fd_count()`. It is not
///   cancellation-safe: dropping the future mid-way leaves a partial frame on the wire,
///   after which the transport must be dropped.
/// * `recv` returns the next complete frame and the fds that rode with it (in SCM_RIGHTS
///   order, close-on-exec). It is cancellation-safe: bytes already read stay buffered.
///   After any error other than `Io` with `WouldBlock`-like transient causes the stream
///   is unusable and should be dropped.
pub trait Transport: Send + std::fmt::Debug {
    /// Send one frame with its fds.
    fn send<'a>(
        &'a mut self,
        frame: &'a Frame,
        fds: &'a [BorrowedFd<'a>],
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Receive the next frame and its fds.
    fn recv(&mut self) -> BoxFuture<'_, Result<(Frame, Vec<OwnedFd>), TransportError>>;

    /// Short name for messages and logs (`unix`, `vsock`, ...).
    fn name(&self) -> &'static str;
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn send<'a>(
        &'a mut self,
        frame: &'a Frame,
        fds: &'a [BorrowedFd<'a>],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        (**self).send(frame, fds)
    }

    fn recv(&mut self) -> BoxFuture<'_, Result<(Frame, Vec<OwnedFd>), TransportError>> {
        (**self).recv()
    }

    fn name(&self) -> &'static str {
        (**self).name()
    }
}

/// Frames over any ordered byte stream that cannot carry fds: AF_VSOCK (see
/// [`VsockTransport`](super::VsockTransport)), or an in-memory duplex in tests.
///
/// Sending a frame that needs fds fails with [`TransportError::FdsUnsupported`]; a
/// received frame that declares fds fails the same way.
#[derive(Debug)]
pub struct StreamTransport<S> {
    stream: S,
    name: &'static str,
    rbuf: Vec<u8>,
}

impl<S> StreamTransport<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug,
{
    /// Wrap a connected stream; `name` appears in errors (e.g. `"vsock"`).
    pub fn new(stream: S, name: &'static str) -> Self {
        Self {
            stream,
            name,
            rbuf: Vec::new(),
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The underlying stream, mutably (writing to it directly desynchronises the framing;
    /// meant for tests and shutdown).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Give back the stream (buffered, unread bytes are lost).
    pub fn into_inner(self) -> S {
        self.stream
    }

    async fn send_frame(
        &mut self,
        frame: &Frame,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        let expected = frame.fd_count();
        if fds.len() != expected {
            return Err(TransportError::FdCountMismatch {
                message_type: frame.message_type(),
                expected,
                given: fds.len(),
            });
        }
        if expected != 0 {
            return Err(TransportError::FdsUnsupported {
                transport: self.name,
                message_type: frame.message_type(),
                count: expected,
            });
        }
        let bytes = super::frame::encode_frame(frame)?;
        self.stream
            .write_all(&bytes)
            .await
            .map_err(|e| TransportError::io(self.name, "write", e))?;
        self.stream
            .flush()
            .await
            .map_err(|e| TransportError::io(self.name, "flush", e))
    }

    async fn recv_frame(&mut self) -> Result<(Frame, Vec<OwnedFd>), TransportError> {
        loop {
            match decode_frame(&self.rbuf) {
                Ok((frame, used)) => {
                    self.rbuf.drain(..used);
                    if frame.fd_count() != 0 {
                        return Err(TransportError::FdsUnsupported {
                            transport: self.name,
                            message_type: frame.message_type(),
                            count: frame.fd_count(),
                        });
                    }
                    return Ok((frame, Vec::new()));
                }
                Err(FrameError::Incomplete { needed }) => {
                    let want = needed.clamp(1, READ_CHUNK);
                    let old = self.rbuf.len();
                    // `read_buf` appends into spare capacity: cancellation-safe, and the
                    // buffer only grows by what actually arrived (plus at most one chunk).
                    self.rbuf.reserve_exact(want);
                    let n = self
                        .stream
                        .read_buf(&mut self.rbuf)
                        .await
                        .map_err(|e| TransportError::io(self.name, "read", e))?;
                    if n == 0 {
                        return Err(if old == 0 {
                            TransportError::Closed {
                                transport: self.name,
                            }
                        } else {
                            TransportError::ClosedMidFrame {
                                transport: self.name,
                                buffered: old,
                            }
                        });
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl<S> Transport for StreamTransport<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug,
{
    fn send<'a>(
        &'a mut self,
        frame: &'a Frame,
        fds: &'a [BorrowedFd<'a>],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(self.send_frame(frame, fds))
    }

    fn recv(&mut self) -> BoxFuture<'_, Result<(Frame, Vec<OwnedFd>), TransportError>> {
        Box::pin(self.recv_frame())
    }

    fn name(&self) -> &'static str {
        self.name
    }
}
