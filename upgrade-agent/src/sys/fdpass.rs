//! Length-prefixed messages with file descriptors (SCM_RIGHTS) over a blocking Unix stream.
//!
//! Used by the emulated platform's control socket. A message is a little-endian `u32`
//! length followed by that many bytes; the descriptors ride on the first byte (one
//! `sendmsg`), and the receiver takes them with `MSG_CMSG_CLOEXEC` so none leaks into a
//! child by accident.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Largest message body accepted.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Most descriptors accepted with one message.
pub const MAX_FDS: usize = 128;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
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
    let mut fds = Vec::new();
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
    let got = loop {
        let mut iov = [IoSliceMut::new(&mut len)];
        match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
            Ok(msg) => {
                let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel just installed `fd` in our table for this
                            // message (SCM_RIGHTS); nothing else owns it yet.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                if truncated {
                    return Err(invalid(format!("more than {MAX_FDS} fds sent")));
                }
                break msg.bytes;
            }
        }
    };
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

/// Borrows a list of owned descriptors for [`send`].
pub fn borrow_all<T: AsFd>(fds: &[T]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(AsFd::as_fd).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
