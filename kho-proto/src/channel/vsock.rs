//! Frames over AF_VSOCK: the multikernel inter-instance transport (CID = instance id,
//! host kernel = 0). AF_VSOCK cannot carry fds; frames that need fds fail with
//! [`TransportError::FdsUnsupported`].
//!
//! On a multikernel host the socket must be bound to the multikernel IPI transport with
//! `setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_TRANSPORT=9, VSOCK_TRANSPORT_MULTIKERNEL=1)`
//! before `connect`/`bind`; [`VsockOptions::multikernel`] turns that on. Stock kernels
//! refuse the option (`ENOPROTOOPT`), reported as
//! [`TransportError::MultikernelTransportUnavailable`].

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, VsockAddr, bind, connect, getsockopt, listen,
    socket, sockopt,
};

use super::sys;
use super::transport::{StreamTransport, TransportError};

const NAME: &str = "vsock";

/// `VMADDR_CID_ANY`: bind on every local CID.
pub const VMADDR_CID_ANY: u32 = u32::MAX;
/// The host kernel's CID on multikernel (instance id 0).
pub const MULTIKERNEL_HOST_CID: u32 = 0;

/// Socket options for vsock endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockOptions {
    /// Select the multikernel IPI transport (`SO_VM_SOCKETS_TRANSPORT` =
    /// `VSOCK_TRANSPORT_MULTIKERNEL`). Required on multikernel hosts; stock kernels
    /// refuse it.
    pub multikernel: bool,
}

/// Frame transport over a connected AF_VSOCK stream (no fd passing).
pub type VsockTransport = StreamTransport<tokio_vsock::VsockStream>;

fn new_socket(options: VsockOptions) -> Result<OwnedFd, TransportError> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| TransportError::io(NAME, "socket(AF_VSOCK, SOCK_STREAM)", e.into()))?;
    if options.multikernel {
        sys::set_vsock_multikernel_transport(fd.as_fd())
            .map_err(|source| TransportError::MultikernelTransportUnavailable { source })?;
    }
    Ok(fd)
}

fn wrap_stream(fd: OwnedFd) -> Result<VsockTransport, TransportError> {
    let stream = tokio_vsock::VsockStream::new(vsock::VsockStream::from(fd))
        .map_err(|e| TransportError::io(NAME, "register with tokio", e))?;
    Ok(StreamTransport::new(stream, NAME))
}

impl StreamTransport<tokio_vsock::VsockStream> {
    /// Connect to `cid:port` (multikernel: `cid` = the peer's instance id). Must be
    /// called inside a tokio runtime.
    pub async fn connect(
        cid: u32,
        port: u32,
        options: VsockOptions,
    ) -> Result<Self, TransportError> {
        let op = || format!("connect vsock cid {cid} port {port}");
        let fd = new_socket(options)?;
        match connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)) {
            Ok(()) | Err(Errno::EINPROGRESS) => {}
            Err(e) => return Err(TransportError::io(NAME, op(), e.into())),
        }
        let afd = sys::Registered::new(fd)
            .map_err(|e| TransportError::io(NAME, "register with tokio", e))?;
        loop {
            let mut guard = afd
                .writable()
                .await
                .map_err(|e| TransportError::io(NAME, op(), e))?;
            match getsockopt(afd.get_ref(), sockopt::SocketError) {
                Ok(0) => break,
                Ok(code) if code == Errno::EINPROGRESS as i32 || code == Errno::EAGAIN as i32 => {
                    guard.clear_ready();
                }
                Ok(code) => {
                    return Err(TransportError::io(
                        NAME,
                        op(),
                        std::io::Error::from_raw_os_error(code),
                    ));
                }
                Err(e) => return Err(TransportError::io(NAME, op(), e.into())),
            }
        }
        wrap_stream(afd.into_inner())
    }

    /// Wrap an already connected tokio-vsock stream.
    pub fn from_vsock(stream: tokio_vsock::VsockStream) -> Self {
        StreamTransport::new(stream, NAME)
    }

    /// The peer's `(cid, port)`.
    pub fn peer_addr(&self) -> Result<(u32, u32), TransportError> {
        let a = self
            .get_ref()
            .peer_addr()
            .map_err(|e| TransportError::io(NAME, "getpeername", e))?;
        Ok((a.cid(), a.port()))
    }
}

/// A listening AF_VSOCK socket that accepts [`VsockTransport`]s.
#[derive(Debug)]
pub struct VsockAcceptor {
    inner: sys::Registered<vsock::VsockListener>,
}

impl VsockAcceptor {
    /// Bind and listen on `cid:port` (usually [`VMADDR_CID_ANY`]). Must be called inside a
    /// tokio runtime.
    pub fn bind(cid: u32, port: u32, options: VsockOptions) -> Result<Self, TransportError> {
        let fd = new_socket(options)?;
        bind(fd.as_raw_fd(), &VsockAddr::new(cid, port)).map_err(|e| {
            TransportError::io(NAME, format!("bind vsock cid {cid} port {port}"), e.into())
        })?;
        listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| TransportError::io(NAME, format!("listen vsock port {port}"), e.into()))?;
        let inner = sys::Registered::new(vsock::VsockListener::from(fd))
            .map_err(|e| TransportError::io(NAME, "register with tokio", e))?;
        Ok(Self { inner })
    }

    /// The bound `(cid, port)`.
    pub fn local_addr(&self) -> Result<(u32, u32), TransportError> {
        let a = self
            .inner
            .get_ref()
            .local_addr()
            .map_err(|e| TransportError::io(NAME, "getsockname", e))?;
        Ok((a.cid(), a.port()))
    }

    /// Accept one connection; returns the transport and the peer's CID (= instance id on
    /// multikernel).
    pub async fn accept(&self) -> Result<(VsockTransport, u32), TransportError> {
        loop {
            let mut guard = self
                .inner
                .readable()
                .await
                .map_err(|e| TransportError::io(NAME, "accept", e))?;
            match guard.try_io(|l| l.get_ref().accept()) {
                Ok(Ok((stream, addr))) => {
                    let transport = wrap_stream(OwnedFd::from(stream))?;
                    return Ok((transport, addr.cid()));
                }
                Ok(Err(e)) => return Err(TransportError::io(NAME, "accept", e)),
                Err(_would_block) => {}
            }
        }
    }
}
