//! Descriptors passed over Unix sockets (SCM_RIGHTS), taken as [`OwnedFd`]s.
//!
//! * [`recv_datagram`]: one `recvmsg` with everything that came with it — the byte count,
//!   the truncation flags, the sender's credentials (SCM_CREDENTIALS) and the descriptors,
//!   owned from the moment the call returns. Used by the notify socket (`host::notify`).
//! * [`send`] / [`recv`]: length-prefixed messages with descriptors over a blocking Unix
//!   stream, used by the emulated platform's control socket. A message is a little-endian
//!   `u32` length followed by that many bytes; the descriptors ride on the first byte (one
//!   `sendmsg`).
//!
//! Descriptors are always received with `MSG_CMSG_CLOEXEC`, so none leaks into a child by
//! accident, and each is wrapped in an `OwnedFd` before anything else is decided, so none
//! leaks on any path (a refused or truncated message closes them when dropped).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, MsgFlags, recvmsg, sendmsg};

/// Largest message body accepted.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Most descriptors accepted with one message.
pub const MAX_FDS: usize = 128;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A sender's pid, uid and gid as the kernel checked them (SCM_CREDENTIALS), in the
/// receiver's namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creds {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// What one [`recv_datagram`] took from a socket.
#[derive(Debug)]
pub struct Datagram {
    /// Bytes placed in the caller's buffer.
    pub len: usize,
    /// MSG_TRUNC: the datagram was longer than the buffer; the rest is discarded.
    pub truncated: bool,
    /// MSG_CTRUNC: the control data did not fit (more descriptors than there was room for);
    /// the kernel closed those it could not install, and [`fds`](Self::fds) holds the rest.
    pub ctrunc: bool,
    /// SCM_CREDENTIALS, present when the receiving socket has SO_PASSCRED on.
    pub creds: Option<Creds>,
    /// SCM_RIGHTS descriptors, in order, close-on-exec.
    pub fds: Vec<OwnedFd>,
}

/// Size of a `cmsghdr` rounded up to the control data alignment (`CMSG_LEN(0)`; glibc,
/// musl and the kernel all align to `size_t`/`long`).
const CMSG_HDR: usize = std::mem::size_of::<libc::cmsghdr>().next_multiple_of(WORD);
const WORD: usize = std::mem::size_of::<usize>();

/// `CMSG_SPACE(len)`.
const fn cmsg_space(len: usize) -> usize {
    CMSG_HDR + len.next_multiple_of(WORD)
}

/// Receives one message (one `recvmsg`, retried on EINTR) into `buf`, with room for the
/// sender's credentials and up to `max_fds` descriptors. Blocks unless `sock` is
/// non-blocking (then an empty queue is [`io::ErrorKind::WouldBlock`]).
///
/// Every descriptor the kernel installed for this call is in [`Datagram::fds`], whatever
/// the flags say; the caller decides what the message is worth and drops what it refuses.
/// The room for descriptors is rounded up to the control data alignment, so an odd
/// `max_fds` may let one more arrive without MSG_CTRUNC: callers that enforce a limit
/// check `fds.len()` too. On a stream socket `truncated` is never set and `len` is 0 at
/// the end of the stream.
pub fn recv_datagram(sock: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> io::Result<Datagram> {
    let space = cmsg_space(std::mem::size_of::<libc::ucred>())
        + cmsg_space(max_fds.saturating_mul(std::mem::size_of::<RawFd>()));
    // Zeroed, so that the end of what the kernel wrote reads as a header of length 0.
    // `recvmsg` hands the kernel the Vec's capacity: going through a boxed slice makes it
    // exactly the length walked below.
    let mut cmsg = vec![0u8; space].into_boxed_slice().into_vec();
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
            Ok(msg) => {
                let len = msg.bytes;
                let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
                let ctrunc = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                let (creds, fds) = walk_control(&cmsg);
                return Ok(Datagram {
                    len,
                    truncated,
                    ctrunc,
                    creds,
                    fds,
                });
            }
        }
    }
}

/// Reads the control data one `recvmsg` wrote into the zeroed buffer `cmsg`: the
/// credentials, and the descriptors, adopted as they are found. Plain byte parsing (no
/// alignment assumed), so it also reads what nix will not iterate after MSG_CTRUNC: the
/// kernel writes a truncated message with a `cmsg_len` that covers only what it wrote, and
/// the zeroes after the last header end the walk.
fn walk_control(cmsg: &[u8]) -> (Option<Creds>, Vec<OwnedFd>) {
    let int = |b: &[u8]| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    let mut creds = None;
    let mut fds = Vec::new();
    let mut off = 0;
    while off + CMSG_HDR <= cmsg.len() {
        let mut len_bytes = [0u8; WORD];
        len_bytes.copy_from_slice(&cmsg[off..off + WORD]);
        let len = usize::from_ne_bytes(len_bytes);
        if len < CMSG_HDR {
            break;
        }
        let end = off.saturating_add(len).min(cmsg.len());
        let level = int(&cmsg[off + WORD..]);
        let kind = int(&cmsg[off + WORD + 4..]);
        let data = &cmsg[off + CMSG_HDR..end];
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            for fd in data.chunks_exact(4).map(int).filter(|&fd| fd >= 0) {
                // SAFETY: SCM_RIGHTS data written by the kernel for the `recvmsg` that just
                // returned: each number is a descriptor it installed in this process's table
                // for this message alone. Nothing else knows the number, so nothing else
                // owns or will close it; it is wrapped exactly once, here.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        } else if level == libc::SOL_SOCKET && kind == libc::SCM_CREDENTIALS && data.len() >= 12 {
            creds = Some(Creds {
                pid: int(&data[0..]),
                uid: int(&data[4..]) as u32,
                gid: int(&data[8..]) as u32,
            });
        }
        match len
            .checked_next_multiple_of(WORD)
            .and_then(|step| off.checked_add(step))
        {
            Some(next) => off = next,
            None => break,
        }
    }
    (creds, fds)
}

/// Sends `body` with `fds` attached.
pub fn send(stream: &UnixStream, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if body.len() > MAX_MESSAGE {
        return Err(invalid(format!(
            "message of {} bytes exceeds {MAX_MESSAGE}",
            body.len()
        )));
    }
    if fds.len() > MAX_FDS {
        return Err(invalid(format!("{} fds exceed {MAX_FDS}", fds.len())));
    }
    let len = u32::try_from(body.len())
        .map_err(|_| invalid("message too long".into()))?
        .to_le_bytes();
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [IoSlice::new(&len), IoSlice::new(body)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let sent = loop {
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(nix::errno::Errno::EINTR) => {}
            other => break other.map_err(io::Error::from)?,
        }
    };
    // The descriptors went with the first byte; finish the rest with plain writes.
    let total = len.len() + body.len();
    if sent < total {
        let mut rest = Vec::with_capacity(total - sent);
        rest.extend_from_slice(&len);
        rest.extend_from_slice(body);
        (&*stream).write_all(&rest[sent..])?;
    }
    Ok(())
}

/// Receives one message and the descriptors that came with it. `Ok(None)` on a clean EOF
/// before any byte.
pub fn recv(stream: &UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut len = [0u8; 4];
    let first = recv_datagram(stream.as_fd(), &mut len, MAX_FDS)?;
    if first.ctrunc || first.fds.len() > MAX_FDS {
        // `first.fds` is dropped: the ones that did arrive are closed.
        return Err(invalid(format!("more than {MAX_FDS} fds sent")));
    }
    let (got, fds) = (first.len, first.fds);
    if got == 0 {
        return Ok(None);
    }
    if got < len.len() {
        (&*stream).read_exact(&mut len[got..])?;
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_MESSAGE {
        return Err(invalid(format!(
            "peer announced {n} bytes, more than {MAX_MESSAGE}"
        )));
    }
    let mut body = vec![0u8; n];
    (&*stream).read_exact(&mut body)?;
    Ok(Some((body, fds)))
}

/// Sends one packet (`body` with `fds` attached) on a `SOCK_SEQPACKET` or datagram socket:
/// one `sendmsg`, the whole message or an error.
pub fn send_packet(sock: BorrowedFd<'_>, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(invalid(format!("{} fds exceed {MAX_FDS}", fds.len())));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [IoSlice::new(body)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::errno::Errno::EINTR) => {}
            Ok(n) if n == body.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "sent {n} of {} bytes in one packet",
                    body.len()
                )));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Borrows a list of owned descriptors for [`send`].
pub fn borrow_all<T: AsFd>(fds: &[T]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(AsFd::as_fd).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::memfd::testing::{open_copies, unique_memfd};
    use std::io::Seek;

    #[test]
    fn body_and_fds_arrive_together() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"preserved").unwrap();
        send(&a, b"hello", &[f.as_fd()]).unwrap();
        // Larger than a socket buffer: the writer must block until the reader drains it.
        let writer = std::thread::spawn(move || {
            send(&a, &vec![7u8; 300_000], &[]).unwrap();
            a
        });
        let (body, fds) = recv(&b).unwrap().unwrap();
        assert_eq!(body, b"hello");
        assert_eq!(fds.len(), 1);
        let mut g = std::fs::File::from(fds.into_iter().next().unwrap());
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "preserved");
        let (body, fds) = recv(&b).unwrap().unwrap();
        assert_eq!(body.len(), 300_000);
        assert!(fds.is_empty());
        drop(writer.join().unwrap());
        assert!(recv(&b).unwrap().is_none());
    }

    #[test]
    fn oversize_announcement_is_refused_without_allocating() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&u32::MAX.to_le_bytes()).unwrap();
        let e = recv(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("more than"), "{e}");
        assert!(send(&a, &vec![0; MAX_MESSAGE + 1], &[]).is_err());
    }

    #[test]
    fn truncated_body_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&10u32.to_le_bytes()).unwrap();
        (&a).write_all(b"abc").unwrap();
        drop(a);
        assert_eq!(recv(&b).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use nix::sys::socket::{setsockopt, sockopt};
    use std::os::unix::net::UnixDatagram;

    fn send_dgram(sock: &UnixDatagram, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        let sent = sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(sent, bytes.len());
    }

    /// A datagram pair whose receiving end has SO_PASSCRED on.
    fn passcred_pair() -> (UnixDatagram, UnixDatagram) {
        let (tx, rx) = UnixDatagram::pair().unwrap();
        setsockopt(&rx, sockopt::PassCred, &true).unwrap();
        (tx, rx)
    }

    fn own_creds() -> Creds {
        Creds {
            pid: std::process::id() as i32,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        }
    }

    #[test]
    fn datagram_brings_credentials_and_owned_close_on_exec_fds() {
        let (tx, rx) = passcred_pair();
        let (memfd, name) = unique_memfd("fdpass-dgram");
        crate::sys::memfd::write_all(memfd.as_fd(), b"abc").unwrap();
        let (pipe_rd, _pipe_wr) = nix::unistd::pipe().unwrap();
        send_dgram(&tx, b"READY=1", &[memfd.as_fd(), pipe_rd.as_fd()]);
        let mut buf = [0u8; 64];
        let d = recv_datagram(rx.as_fd(), &mut buf, 4).unwrap();
        assert_eq!(&buf[..d.len], b"READY=1");
        assert!(!d.truncated && !d.ctrunc);
        assert_eq!(d.creds, Some(own_creds()));
        assert_eq!(d.fds.len(), 2);
        for fd in &d.fds {
            let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).unwrap());
            assert!(flags.contains(FdFlag::FD_CLOEXEC));
        }
        // In order, and the same open files.
        assert_eq!(crate::sys::memfd::size(d.fds[0].as_fd()).unwrap(), 3);
        let (a, b) = (
            nix::sys::stat::fstat(&pipe_rd).unwrap(),
            nix::sys::stat::fstat(&d.fds[1]).unwrap(),
        );
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
        // Exactly one new descriptor per fd sent, closed with the Datagram.
        assert_eq!(open_copies(&name), 2);
        drop(d);
        assert_eq!(open_copies(&name), 1);

        // Without SO_PASSCRED there are no credentials; without fds, no fds.
        let (tx, rx) = UnixDatagram::pair().unwrap();
        send_dgram(&tx, b"x", &[]);
        let d = recv_datagram(rx.as_fd(), &mut buf, 4).unwrap();
        assert_eq!((d.len, d.creds, d.fds.len()), (1, None, 0));
    }

    #[test]
    fn datagram_truncation_is_reported_and_nothing_leaks() {
        let (tx, rx) = passcred_pair();
        let (memfd, name) = unique_memfd("fdpass-trunc");
        // Body longer than the buffer: MSG_TRUNC, the fds still arrive.
        send_dgram(&tx, b"0123456789", &[memfd.as_fd()]);
        let mut small = [0u8; 4];
        let d = recv_datagram(rx.as_fd(), &mut small, 4).unwrap();
        assert_eq!((d.len, d.truncated, d.ctrunc), (4, true, false));
        assert_eq!(&small, b"0123");
        assert_eq!(d.fds.len(), 1);
        assert_eq!(d.creds, Some(own_creds()));
        drop(d);
        assert_eq!(open_copies(&name), 1);

        // More fds than room: MSG_CTRUNC; the credentials and the fds that fitted are
        // still read (and owned), the kernel closed the rest.
        send_dgram(&tx, b"many", &[memfd.as_fd(); 5]);
        let mut buf = [0u8; 64];
        let d = recv_datagram(rx.as_fd(), &mut buf, 2).unwrap();
        assert_eq!((d.len, d.truncated, d.ctrunc), (4, false, true));
        assert_eq!(d.creds, Some(own_creds()));
        assert_eq!(d.fds.len(), 2);
        assert_eq!(open_copies(&name), 3);
        drop(d);
        assert_eq!(open_copies(&name), 1);

        // No room for fds at all.
        send_dgram(&tx, b"one", &[memfd.as_fd()]);
        let d = recv_datagram(rx.as_fd(), &mut buf, 0).unwrap();
        assert!(d.ctrunc && d.fds.is_empty());
        assert_eq!(d.creds, Some(own_creds()));
        assert_eq!(open_copies(&name), 1);

        // A non-blocking socket with nothing queued.
        rx.set_nonblocking(true).unwrap();
        let e = recv_datagram(rx.as_fd(), &mut buf, 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn stream_recv_refuses_too_many_fds_and_closes_them() {
        let (a, b) = UnixStream::pair().unwrap();
        let (memfd, name) = unique_memfd("fdpass-stream");
        let fds = vec![memfd.as_fd(); MAX_FDS + 1];
        // Past `send`'s own check: straight sendmsg of a 4-byte zero length.
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&0u32.to_le_bytes())],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let e = recv(&b).unwrap_err();
        assert!(e.to_string().contains("more than 128 fds"), "{e}");
        assert_eq!(open_copies(&name), 1);
    }
}
