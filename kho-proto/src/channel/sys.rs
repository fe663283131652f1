//! The crate's system-level code, in one place: `sendmsg`/`recvmsg` with SCM_RIGHTS, the
//! multikernel AF_VSOCK transport option, and handing sockets to the tokio reactor.
//!
//! This is the only module of `kho-proto` allowed to use `unsafe` (the crate root has
//! `#![deny(unsafe_code)]`, lifted for this module alone; `tests/unsafe_confined.rs` checks
//! it). Every `unsafe` block carries its reason in a `// SAFETY:` comment and sits behind a
//! safe function whose signature makes the reason hold for any caller.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, sendmsg};
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

/// `AF_VSOCK`, used as the socket option *level* for vsock options.
pub const SOL_VSOCK: libc::c_int = 40;
/// `SO_VM_SOCKETS_TRANSPORT` (multikernel patch set): choose the vsock transport.
pub const SO_VM_SOCKETS_TRANSPORT: libc::c_int = 9;
/// `VSOCK_TRANSPORT_MULTIKERNEL`: the IPI-ring transport between kernel instances.
pub const VSOCK_TRANSPORT_MULTIKERNEL: libc::c_int = 1;

/// The kernel's per-message limit of SCM_RIGHTS fds (`SCM_MAX_FD`). Receive buffers are
/// sized for this many so a hostile sender can never make control data truncate (which
/// would leave installed fds we could not see, hence not close).
pub const SCM_MAX_FD: usize = 253;

/// A zeroed control buffer able to receive [`SCM_MAX_FD`] fds.
pub fn recv_cmsg_buffer() -> Vec<u8> {
    nix::cmsg_space!([RawFd; SCM_MAX_FD])
}

/// Result of one `recvmsg`.
#[derive(Debug)]
pub struct Received {
    /// Data bytes read (0 = orderly end of stream).
    pub bytes: usize,
    /// Fds received with the data, already owned (closed on drop), close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// The kernel truncated the control data (`MSG_CTRUNC`).
    pub ctrunc: bool,
}

/// `sendmsg(fd, data, SCM_RIGHTS(fds), MSG_NOSIGNAL | MSG_DONTWAIT)`. With an empty `fds`
/// no control message is sent. Returns the bytes written (maybe fewer than `data.len()`;
/// the fds, if any, went with the first of them).
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let iov = [IoSlice::new(data)];
    sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        None,
    )
    .map_err(io::Error::from)
}

/// `recvmsg(fd, buf, cmsg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT)`; takes ownership of every
/// received fd immediately.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> io::Result<Received> {
    cmsg.fill(0);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let bytes = msg.bytes;
    let mut fds = Vec::new();
    let mut ctrunc = false;
    if let Ok(iter) = msg.cmsgs() {
        for c in iter {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` in our table for this
                    // SCM_RIGHTS message; nothing else knows it, so we are its sole
                    // owner and wrap it exactly once.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
    } else {
        // nix refuses to iterate truncated control data (MSG_CTRUNC). The buffer holds
        // SCM_MAX_FD fds, so this only happens when the kernel itself dropped fds (e.g.
        // RLIMIT_NOFILE reached on our side). The fds it did install are recorded in the
        // first control header: take them so they get closed instead of leaking.
        ctrunc = true;
        fds = installed_before_truncation(cmsg);
    }
    Ok(Received { bytes, fds, ctrunc })
}

/// Parse the single SCM_RIGHTS header the kernel writes at the start of the control
/// buffer (`scm_detach_fds`) and own the fds it lists. Plain byte parsing: the buffer was
/// zeroed before `recvmsg`, so a header the kernel did not write reads as empty.
fn installed_before_truncation(cmsg: &[u8]) -> Vec<OwnedFd> {
    const LEN: usize = std::mem::size_of::<usize>();
    let int = std::mem::size_of::<libc::c_int>();
    // CMSG_LEN(0): the header rounded up to the alignment of size_t.
    let data_off = std::mem::size_of::<libc::cmsghdr>().next_multiple_of(LEN);
    if cmsg.len() < data_off {
        return Vec::new();
    }
    let mut len_bytes = [0u8; LEN];
    len_bytes.copy_from_slice(&cmsg[..LEN]);
    let cmsg_len = usize::from_ne_bytes(len_bytes).min(cmsg.len());
    let level =
        libc::c_int::from_ne_bytes([cmsg[LEN], cmsg[LEN + 1], cmsg[LEN + 2], cmsg[LEN + 3]]);
    let kind =
        libc::c_int::from_ne_bytes([cmsg[LEN + 4], cmsg[LEN + 5], cmsg[LEN + 6], cmsg[LEN + 7]]);
    if level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS || cmsg_len < data_off {
        return Vec::new();
    }
    cmsg[data_off..cmsg_len]
        .chunks_exact(int)
        .map(|c| {
            let fd = RawFd::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            // SAFETY: the kernel installed `fd` in our table for this SCM_RIGHTS message
            // and recorded it in this header before truncating the rest; nothing else
            // knows it, so we are its sole owner and wrap it exactly once.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect()
}

/// `setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_TRANSPORT, VSOCK_TRANSPORT_MULTIKERNEL)`: bind a
/// fresh (unconnected, unbound) vsock socket to the multikernel IPI transport. Stock
/// kernels answer `ENOPROTOOPT`.
pub fn set_vsock_multikernel_transport(sock: BorrowedFd<'_>) -> io::Result<()> {
    let value: libc::c_int = VSOCK_TRANSPORT_MULTIKERNEL;
    // SAFETY: `sock` is a valid open fd for the duration of the call (borrowed); the
    // option value pointer refers to a live c_int on our stack and the length passed is
    // exactly its size; the kernel only reads from it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            SOL_VSOCK,
            SO_VM_SOCKETS_TRANSPORT,
            std::ptr::from_ref(&value).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An object that owns exactly one open descriptor, returns it from every `as_raw_fd` call
/// and cannot close or replace it through a shared reference: what the tokio reactor asks
/// of what it watches ([`AsyncFd::register`]). Implemented only for types known to be so.
pub trait SoleFdOwner: AsRawFd {}

/// `OwnedFd`: open by its type's invariant, one descriptor, immutable through `&`.
impl SoleFdOwner for OwnedFd {}

/// `vsock::VsockListener`: a struct around one private `OwnedFd`; no method swaps it.
impl SoleFdOwner for vsock::VsockListener {}

/// A socket registered with the current tokio runtime's reactor, for readiness waits.
///
/// Unlike a bare [`AsyncFd`] it gives no `&mut` access to the socket (which could swap the
/// descriptor under the reactor): only shared references, readiness guards and
/// [`into_inner`](Self::into_inner), which deregisters first.
#[derive(Debug)]
pub struct Registered<T: SoleFdOwner>(AsyncFd<T>);

impl<T: SoleFdOwner> Registered<T> {
    /// Registers `inner` for read and write readiness. Must be called inside a tokio
    /// runtime. On failure `inner` is dropped (closed).
    pub fn new(inner: T) -> io::Result<Self> {
        // SAFETY: `T: SoleFdOwner` owns one open descriptor, returned by every
        // `as_raw_fd`, which stays open and the same for as long as `inner` lives. From here
        // on `inner` is only reachable through `Registered`, which hands out shared
        // references (no `get_mut`, no `*_mut` readiness) and gives it back only through
        // `AsyncFd::into_inner` (deregisters first) or drops it after deregistering: the
        // descriptor cannot be closed or replaced while the reactor watches it.
        let afd = unsafe { AsyncFd::register(inner) }?;
        Ok(Self(afd))
    }

    /// The socket.
    pub fn get_ref(&self) -> &T {
        self.0.get_ref()
    }

    /// Waits until the socket is readable ([`AsyncFd::readable`]).
    pub async fn readable(&self) -> io::Result<AsyncFdReadyGuard<'_, T>> {
        self.0.readable().await
    }

    /// Waits until the socket is writable ([`AsyncFd::writable`]).
    pub async fn writable(&self) -> io::Result<AsyncFdReadyGuard<'_, T>> {
        self.0.writable().await
    }

    /// Deregisters the socket and gives it back.
    pub fn into_inner(self) -> T {
        self.0.into_inner()
    }
}
