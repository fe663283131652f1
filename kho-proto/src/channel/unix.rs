//! Frames over a Unix stream socket, with fds passed as SCM_RIGHTS.
//!
//! This is the transport of the emulated platform (both "instances" are processes on one
//! kernel), and the only one that moves memfds and listening sockets.
//!
//! Fd-passing rules (`docs/protocol.md, Part 2`, "Fd passing"):
//! * the sender attaches all fds of a frame, in order, to the `sendmsg` that writes the
//!   frame's first byte; later partial writes carry no control data;
//! * the receiver reads with `MSG_CMSG_CLOEXEC` and a control buffer for the kernel's
//!   maximum (253 fds), so control data never truncates; a batch of fds belongs to the
//!   frame that starts inside the bytes returned by the same `recvmsg` and declares fds;
//! * more fds than the receiver's cap, fds no frame claims, or a frame whose fds did not
//!   arrive with its first byte are errors; unclaimed fds are closed.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use tokio::io::Interest;
use tokio::net::UnixStream;

use super::MAX_FDS_PER_FRAME;
use super::frame::{Frame, FrameError, decode_frame, encode_frame};
use super::sys;
use super::transport::{BoxFuture, READ_CHUNK, Transport, TransportError};

const NAME: &str = "unix";

/// One batch of fds delivered by one `recvmsg`, with the stream range of the data bytes
/// that call returned.
#[derive(Debug)]
struct FdBatch {
    start: u64,
    end: u64,
    fds: Vec<OwnedFd>,
}

/// Frame transport over a connected `AF_UNIX` `SOCK_STREAM` socket with SCM_RIGHTS.
#[derive(Debug)]
pub struct UnixTransport {
    stream: UnixStream,
    /// Received, undecoded bytes; `rbuf[0]` is at stream offset `consumed`.
    rbuf: Vec<u8>,
    consumed: u64,
    pending: VecDeque<FdBatch>,
    max_fds: usize,
    scratch: Box<[u8]>,
    cmsg: Vec<u8>,
}

impl UnixTransport {
    /// Wrap a connected tokio Unix stream. Must be called inside a tokio runtime (as for
    /// any tokio socket).
    pub fn from_tokio(stream: UnixStream) -> Self {
        Self {
            stream,
            rbuf: Vec::new(),
            consumed: 0,
            pending: VecDeque::new(),
            max_fds: usize::from(MAX_FDS_PER_FRAME),
            scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
            cmsg: sys::recv_cmsg_buffer(),
        }
    }

    /// Wrap a connected std Unix stream (e.g. inherited from a parent process). Switches
    /// it to non-blocking mode. Must be called inside a tokio runtime.
    pub fn from_std(stream: std::os::unix::net::UnixStream) -> Result<Self, TransportError> {
        stream
            .set_nonblocking(true)
            .map_err(|e| TransportError::io(NAME, "set_nonblocking", e))?;
        let stream = UnixStream::from_std(stream)
            .map_err(|e| TransportError::io(NAME, "register with tokio", e))?;
        Ok(Self::from_tokio(stream))
    }

    /// Connect to a listening Unix socket at `path`.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, TransportError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| TransportError::io(NAME, format!("connect {}", path.display()), e))?;
        Ok(Self::from_tokio(stream))
    }

    /// A connected pair (`socketpair(AF_UNIX, SOCK_STREAM)`), for tests and for a parent
    /// handing one end to a child. Must be called inside a tokio runtime.
    pub fn pair() -> Result<(Self, Self), TransportError> {
        let (a, b) = UnixStream::pair().map_err(|e| TransportError::io(NAME, "socketpair", e))?;
        Ok((Self::from_tokio(a), Self::from_tokio(b)))
    }

    /// Cap the number of fds accepted with one frame (default and maximum:
    /// [`MAX_FDS_PER_FRAME`]). A message bringing more fails with
    /// [`TransportError::TooManyFds`] and all its fds are closed.
    pub fn with_max_fds(mut self, max: usize) -> Self {
        self.max_fds = max.min(usize::from(MAX_FDS_PER_FRAME));
        self
    }

    /// The cap set by [`with_max_fds`](Self::with_max_fds).
    pub fn max_fds(&self) -> usize {
        self.max_fds
    }

    /// The underlying socket.
    pub fn get_ref(&self) -> &UnixStream {
        &self.stream
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
        let bytes = encode_frame(frame)?;
        let mut written = 0usize;
        while written < bytes.len() {
            // The fds ride with the first byte of the frame only.
            let attach: &[BorrowedFd<'_>] = if written == 0 { fds } else { &[] };
            let sock = self.stream.as_fd();
            let n = self
                .stream
                .async_io(Interest::WRITABLE, || {
                    sys::send_with_fds(sock, &bytes[written..], attach)
                })
                .await
                .map_err(|e| TransportError::io(NAME, "sendmsg", e))?;
            if n == 0 {
                return Err(TransportError::io(
                    NAME,
                    "sendmsg",
                    std::io::Error::new(std::io::ErrorKind::WriteZero, "socket accepted 0 bytes"),
                ));
            }
            written += n;
        }
        Ok(())
    }

    /// One `recvmsg` into the buffer; returns the number of data bytes (0 = EOF).
    async fn fill(&mut self) -> Result<usize, TransportError> {
        let sock = self.stream.as_fd();
        let scratch = &mut self.scratch;
        let cmsg = &mut self.cmsg;
        let received = self
            .stream
            .async_io(Interest::READABLE, || {
                sys::recv_with_fds(sock, scratch, cmsg)
            })
            .await
            .map_err(|e| TransportError::io(NAME, "recvmsg", e))?;
        if received.ctrunc {
            return Err(TransportError::FdsTruncated);
        }
        let start = self.consumed + self.rbuf.len() as u64;
        self.rbuf.extend_from_slice(&self.scratch[..received.bytes]);
        if !received.fds.is_empty() {
            if received.fds.len() > self.max_fds {
                // Dropping `received.fds` closes them all.
                return Err(TransportError::TooManyFds {
                    count: received.fds.len(),
                    max: self.max_fds,
                });
            }
            self.pending.push_back(FdBatch {
                start,
                end: start + received.bytes as u64,
                fds: received.fds,
            });
        }
        Ok(received.bytes)
    }

    /// Pair a decoded frame at stream offset `at` with its fds.
    fn claim_fds(
        &mut self,
        frame: &Frame,
        at: u64,
        len: u64,
    ) -> Result<Vec<OwnedFd>, TransportError> {
        let expected = frame.fd_count();
        // A batch is orphaned when no frame that could still claim it remains: it ended
        // before this frame, or this frame declares no fds and the batch's bytes end within
        // this frame (no later frame starts inside its range).
        if let Some(b) = self.pending.pop_front() {
            let before = b.end <= at;
            let within_fdless = expected == 0 && b.start <= at && b.end <= at + len;
            if before || within_fdless {
                return Err(TransportError::UnexpectedFds {
                    count: b.fds.len(),
                    offset: b.start,
                });
            }
            self.pending.push_front(b);
        }
        if expected == 0 {
            return Ok(Vec::new());
        }
        let claimable = self
            .pending
            .front()
            .is_some_and(|b| b.start <= at && at < b.end);
        let Some(b) = self.pending.pop_front().filter(|_| claimable) else {
            return Err(TransportError::MissingFds {
                message_type: frame.message_type(),
                offset: at,
                expected,
                received: 0,
            });
        };
        if b.fds.len() != expected {
            return Err(TransportError::MissingFds {
                message_type: frame.message_type(),
                offset: at,
                expected,
                received: b.fds.len(),
            });
        }
        Ok(b.fds)
    }

    async fn recv_frame(&mut self) -> Result<(Frame, Vec<OwnedFd>), TransportError> {
        loop {
            match decode_frame(&self.rbuf) {
                Ok((frame, used)) => {
                    let at = self.consumed;
                    self.rbuf.drain(..used);
                    self.consumed += used as u64;
                    if self.rbuf.is_empty() && self.rbuf.capacity() > 4 * READ_CHUNK {
                        self.rbuf = Vec::new();
                    }
                    let fds = self.claim_fds(&frame, at, used as u64)?;
                    return Ok((frame, fds));
                }
                Err(FrameError::Incomplete { .. }) => {
                    let before = self.rbuf.len();
                    if self.fill().await? == 0 {
                        return Err(if before == 0 {
                            TransportError::Closed { transport: NAME }
                        } else {
                            TransportError::ClosedMidFrame {
                                transport: NAME,
                                buffered: before,
                            }
                        });
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Transport for UnixTransport {
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
        NAME
    }
}
