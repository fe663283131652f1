//! The supervisor's end of systemd's notify protocol (`sd_notify(3)`, `Type=notify`).
//!
//! A workload finds `NOTIFY_SOCKET=<path>` ([`NotifySocket::env_value`]) in its environment
//! and sends datagrams of newline-separated `KEY=VALUE` assignments to it: `READY=1`,
//! `STATUS=...`, `STOPPING=1`, `RELOADING=1`, `WATCHDOG=1`, `ERRNO=...`, `MAINPID=...`,
//! `FDSTORE=1` with `FDNAME=name` and descriptors attached (SCM_RIGHTS),
//! `FDSTOREREMOVE=1` with `FDNAME=name`, `FDPOLL=0`, and this project's `MK_HANDOFF=1`
//! (connection hand-over, `host::watch`). Unmodified systemd clients
//! (`sd_notify`, `systemd-notify`, the language bindings) work against [`NotifySocket`].
//!
//! What arrives, and what this module checks:
//!
//! * Every message carries the sender's pid, uid and gid as the kernel checked them
//!   (SO_PASSCRED → SCM_CREDENTIALS): an unprivileged workload cannot claim to be another
//!   process. (A sender with CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID may name other ids, as
//!   `systemd-notify` run as root names its parent.) Which pids may speak for a workload
//!   (systemd's `NotifyAccess=`), and whether a `MAINPID=` names one of the workload's own
//!   processes, is the caller's decision: this module reports, it does not authorise.
//! * A message is at most [`MAX_DATAGRAM`] bytes of UTF-8 text and carries at most
//!   [`MAX_FDS_PER_MESSAGE`] descriptors, only together with `FDSTORE=1`. Anything else is
//!   [`Received::Refused`] with the reason (for the caller to log), and every descriptor that
//!   came with it is closed: a refused message leaves nothing behind in this process.
//! * `BARRIER=1` with one descriptor (`sd_notify_barrier`, which `systemd-notify` calls
//!   after every message unless `--no-block`) is answered here, as systemd's manager does:
//!   the descriptor is closed, which tells the sender that every earlier message was
//!   taken, and [`NotifySocket::recv`] goes on waiting. It is correct because the caller
//!   handles each message before it calls `recv` again.
//! * [`parse`] is the text part alone (no socket), with the rules listed on it.
//!
//! Received descriptors are close-on-exec (MSG_CMSG_CLOEXEC) and owned ([`OwnedFd`]) from
//! the moment `recvmsg` returns ([`fdpass::recv_datagram`], one system call per datagram).
//!
//! [`send`] is a minimal `sd_pid_notify_with_fds` for tests and test services.

use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, sendmsg, setsockopt,
    socket, sockopt,
};
use nix::sys::stat::{Mode, fchmod};

use crate::sys::fdpass::{self, Creds, Datagram};

/// Largest datagram accepted (bytes); longer ones are truncated by the kernel -> refused (MSG_TRUNC).
pub const MAX_DATAGRAM: usize = 4096;
/// Most fds accepted in one message (more -> all of them closed, message refused).
pub const MAX_FDS_PER_MESSAGE: usize = 16;
/// Longest socket path (bytes): `sun_path` is 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;
/// Longest `FDNAME=` value (systemd's `FDNAME_MAX`).
pub const MAX_FDNAME: usize = 255;

/// The mode of the socket file: only the supervisor's user may send to it.
const SOCKET_MODE: u32 = 0o600;

/// The supervisor's notify socket: a non-blocking datagram socket bound at a path,
/// SO_PASSCRED on.
///
/// The socket file stays when this is dropped (a later [`bind`](Self::bind) at the same
/// path replaces it).
#[derive(Debug)]
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    /// `path` as text (checked at bind): the value of `NOTIFY_SOCKET`.
    text: String,
}

/// One datagram taken from the socket.
#[derive(Debug)]
pub enum Received {
    /// A well-formed notification.
    Message(Message),
    /// A datagram that broke the rules; its descriptors, if any, are already closed.
    /// `pid` is the kernel-verified sender when the credentials arrived.
    Refused { pid: Option<i32>, reason: String },
}

/// A well-formed notification and who sent it.
#[derive(Debug)]
pub struct Message {
    /// Sender, from SCM_CREDENTIALS (kernel-verified, in this process's namespaces).
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// What it says (`BARRIER=1` never reaches here: [`NotifySocket::recv`] answers it).
    pub text: Parsed,
    /// The descriptors (only with `FDSTORE=1`; at most [`MAX_FDS_PER_MESSAGE`]),
    /// close-on-exec.
    pub fds: Vec<OwnedFd>,
}

/// The text of a notification, parsed ([`parse`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// `READY=1`.
    pub ready: bool,
    /// `STOPPING=1`.
    pub stopping: bool,
    /// `RELOADING=1`.
    pub reloading: bool,
    /// `WATCHDOG=1` (a keep-alive ping).
    pub watchdog: bool,
    /// `STATUS=` (free text, may be empty).
    pub status: Option<String>,
    /// `ERRNO=` (non-negative).
    pub errno: Option<i32>,
    /// `MAINPID=` (positive; the caller checks it names one of the workload's processes).
    pub mainpid: Option<i32>,
    /// `FDSTORE=1`: keep the message's fds (under [`fdname`](Self::fdname)).
    pub fdstore: bool,
    /// `FDSTOREREMOVE=1`: drop the stored fds named [`fdname`](Self::fdname) (always set then).
    pub fdstore_remove: bool,
    /// `FDNAME=` (1..=255 printable ASCII characters, no `:`).
    pub fdname: Option<String>,
    /// `FDPOLL=0`: do not watch these stored fds for POLLHUP/POLLERR to drop them.
    pub fdpoll_disabled: bool,
    /// `BARRIER=1` (answered inside [`NotifySocket::recv`]).
    pub barrier: bool,
    /// `MK_HANDOFF=1`: the workload has handed its connections over (this project's key,
    /// answering its `handoff_signal`; see `host::watch`).
    pub handoff: bool,
    /// Assignments not understood, as sent (systemd ignores them; kept for logging, which
    /// should escape them: they are the workload's text).
    pub unknown: Vec<String>,
}

fn with_path(path: &Path, what: &str, e: impl Into<io::Error>) -> io::Error {
    let e = e.into();
    io::Error::new(
        e.kind(),
        format!("notify socket {}: {what}: {e}", path.display()),
    )
}

impl NotifySocket {
    /// Binds a datagram socket at `path`, mode 0600 whatever the umask, SO_PASSCRED on.
    ///
    /// `path` must be absolute (workloads resolve `NOTIFY_SOCKET` from their own working
    /// directory), UTF-8 (it goes into the environment) and at most [`MAX_SOCKET_PATH`]
    /// bytes. A socket file left at `path` by a supervisor that is gone is removed first;
    /// a socket someone still listens on, or anything that is not a socket (a regular
    /// file, a symlink, a directory), is never replaced.
    ///
    /// The mode is set on the socket before `bind` (Linux creates the file with the
    /// socket's mode minus the umask, so it is never wider than 0600 at any moment) and
    /// again on the path after it (exactly 0600 even if the umask removed owner bits).
    /// The stale-file check and its removal are two steps: the directory must be private
    /// to the supervisor (the caller's is 0700) so nobody else can swap the file between.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let Some(text) = path.to_str() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "notify socket path {} is not UTF-8 (NOTIFY_SOCKET is text)",
                    path.display()
                ),
            ));
        };
        if !path.is_absolute() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "notify socket path {text} is relative; NOTIFY_SOCKET must be an absolute path"
                ),
            ));
        }
        if text.len() > MAX_SOCKET_PATH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "notify socket path {text} is {} bytes; a unix socket path holds at most \
                     {MAX_SOCKET_PATH} (sun_path is 108 bytes with the terminating NUL)",
                    text.len()
                ),
            ));
        }
        remove_stale(path)?;
        // Non-blocking: `recv` waits in poll, and a datagram another thread took in between
        // must not leave it stuck in recvmsg.
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| with_path(path, "socket", e))?;
        // Before bind: credentials are attached to a datagram when it is sent, if the
        // receiving socket asks for them then.
        setsockopt(&fd, sockopt::PassCred, &true).map_err(|e| with_path(path, "SO_PASSCRED", e))?;
        bind_with_mode(&fd, path)?;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        {
            let _ = std::fs::remove_file(path);
            return Err(with_path(path, "chmod 0600", e));
        }
        Ok(Self {
            sock: UnixDatagram::from(fd),
            path: path.to_owned(),
            text: text.to_owned(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The value to put in NOTIFY_SOCKET.
    pub fn env_value(&self) -> String {
        self.text.clone()
    }

    /// Waits up to `timeout` (`None`: forever) for one datagram. `Ok(None)` when the time
    /// ran out; a datagram that breaks the rules is `Ok(Some(Received::Refused { .. }))`
    /// (log it and go on); only a failing socket is `Err`.
    pub fn recv(&self, timeout: Option<Duration>) -> io::Result<Option<Received>> {
        // A timeout too large to add is as good as none.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let wait = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Rounded up: poll must not come back before the deadline and spin.
                    let ms = i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, wait) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(with_path(&self.path, "poll", e)),
                Ok(0) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(None);
                    }
                    continue;
                }
                Ok(_) => {}
            }
            if let Some(r) = self.try_recv()? {
                return Ok(Some(r));
            }
            // A barrier answered, or readable and then gone (another thread took it): wait
            // again.
        }
    }

    /// One `recvmsg` on the non-blocking socket; `Ok(None)` if nothing is queued or the
    /// datagram was a barrier (answered).
    fn try_recv(&self) -> io::Result<Option<Received>> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        match fdpass::recv_datagram(self.sock.as_fd(), &mut buf, MAX_FDS_PER_MESSAGE) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(with_path(&self.path, "recvmsg", e)),
            Ok(d) => Ok(judge(&buf[..d.len], d)),
        }
    }
}

/// Decides what one received datagram (its text `bytes`) is (`None`: a barrier, answered).
/// Every descriptor in `d.fds` is either handed over in the [`Message`] or closed.
fn judge(bytes: &[u8], d: Datagram) -> Option<Received> {
    let Datagram {
        truncated,
        ctrunc,
        creds,
        fds,
        ..
    } = d;
    let pid = creds.map(|c| c.pid);
    let refuse = |reason: String| Some(Received::Refused { pid, reason });
    let n_fds = fds.len();
    if truncated {
        return refuse(format!(
            "datagram longer than {MAX_DATAGRAM} bytes (truncated by the kernel)"
        ));
    }
    if ctrunc {
        return refuse(format!(
            "control data truncated: more than {MAX_FDS_PER_MESSAGE} fds attached \
             (the {n_fds} received were closed)"
        ));
    }
    if n_fds > MAX_FDS_PER_MESSAGE {
        return refuse(format!(
            "{n_fds} fds attached, more than {MAX_FDS_PER_MESSAGE} (closed)"
        ));
    }
    let Some(creds) = creds else {
        return refuse("no sender credentials (SCM_CREDENTIALS)".into());
    };
    if creds.pid <= 0 {
        return refuse(format!(
            "sender pid {} is not visible in this pid namespace",
            creds.pid
        ));
    }
    let parsed = match parse(bytes) {
        Ok(p) => p,
        Err(reason) => return refuse(reason),
    };
    if parsed.barrier {
        // As systemd's manager: a barrier message is nothing else, and closing its one fd
        // (the write end of the sender's pipe) is the answer.
        if n_fds != 1 {
            return refuse(format!(
                "BARRIER=1 needs exactly one fd, got {n_fds} (closed)"
            ));
        }
        drop(fds);
        tracing::debug!(pid = creds.pid, "notify barrier answered");
        return None;
    }
    if n_fds > 0 && !parsed.fdstore {
        return refuse(format!("{n_fds} fds sent without FDSTORE=1 (closed)"));
    }
    Some(Received::Message(Message::new(parsed, creds, fds)))
}

impl Message {
    fn new(text: Parsed, creds: Creds, fds: Vec<OwnedFd>) -> Self {
        Self {
            pid: creds.pid,
            uid: creds.uid,
            gid: creds.gid,
            text,
            fds,
        }
    }
}

/// Removes a socket file nobody listens on any more; refuses anything else at `path`.
fn remove_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(with_path(path, "stat", e)),
    };
    let ft = meta.file_type();
    if !ft.is_socket() {
        let kind = if ft.is_symlink() {
            "a symlink"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_file() {
            "a regular file"
        } else {
            "not a socket"
        };
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "notify socket {}: refusing to replace it: it is {kind}, not a socket",
                path.display()
            ),
        ));
    }
    // Stale or live? A datagram connect reaches a bound datagram socket, is refused by a
    // file nobody is bound to, and meets a wrong-type error from a live stream socket.
    let probe = UnixDatagram::unbound().map_err(|e| with_path(path, "probe socket", e))?;
    match probe.connect(path) {
        Ok(()) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "notify socket {}: a live socket is bound there; refusing to replace it",
                path.display()
            ),
        )),
        Err(e) if e.raw_os_error() == Some(Errno::EPROTOTYPE as i32) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "notify socket {}: a live socket of another type is bound there; \
                 refusing to replace it",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|e| with_path(path, "removing the stale socket", e))
        }
        Err(e) => Err(with_path(path, "probing the existing socket", e)),
    }
}

/// `fchmod(fd, 0600)` then `bind(fd, path)`: the file is created with the socket's mode
/// minus the umask, so it is never wider than 0600 (no window in which others may connect).
fn bind_with_mode(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    fchmod(fd, Mode::from_bits_truncate(SOCKET_MODE))
        .map_err(|e| with_path(path, "fchmod 0600 before bind", e))?;
    let addr = UnixAddr::new(path).map_err(|e| with_path(path, "address", e))?;
    nix::sys::socket::bind(fd.as_raw_fd(), &addr).map_err(|e| with_path(path, "bind", e))
}

/// `line` for a refusal reason: escaped, and cut after 64 bytes.
fn quote(line: &str) -> String {
    let mut end = line.len().min(64);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    if end < line.len() {
        format!("{:?}...", &line[..end])
    } else {
        format!("{line:?}")
    }
}

/// A non-empty run of ASCII digits as a non-negative `i32`.
fn digits(value: &str) -> Option<i32> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// systemd's rule for a stored fd's name, minus the empty name: 1..=255 printable ASCII
/// characters (space included), no `:` (the separator of `LISTEN_FDNAMES`).
pub fn fdname_is_valid(name: &str) -> bool {
    (1..=MAX_FDNAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

/// Parses the text of a notification.
///
/// * At most [`MAX_DATAGRAM`] bytes of UTF-8 without NUL bytes.
/// * Lines separated by `\n`; empty lines are ignored; every other line is `KEY=VALUE`
///   with a non-empty key (else the message is refused).
/// * `READY`, `STOPPING`, `RELOADING`, `WATCHDOG`, `FDSTORE`, `FDSTOREREMOVE`, `BARRIER`
///   and this project's `MK_HANDOFF` count only
///   with the value exactly `1`, `FDPOLL` only with `0`; other values are ignored as
///   systemd does, and listed in `unknown`.
/// * `ERRNO` is a non-negative integer, `MAINPID` a positive one, `FDNAME` passes
///   [`fdname_is_valid`]; otherwise the message is refused. `STATUS` is any text.
/// * For these valued keys the first assignment counts, as in systemd; a repeated one is
///   listed in `unknown` unchecked.
/// * `FDSTOREREMOVE=1` needs an `FDNAME` (there is no other way to say what to remove).
/// * Keys not understood are listed in `unknown` (not an error: systemd ignores them).
pub fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(format!(
            "message of {} bytes, more than {MAX_DATAGRAM}",
            bytes.len()
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| format!("message is not UTF-8: {e}"))?;
    if text.contains('\0') {
        return Err("message contains a NUL byte".into());
    }
    let mut p = Parsed::default();
    for (i, line) in text.split('\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let n = i + 1;
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {n} is not KEY=VALUE: {}", quote(line)));
        };
        if key.is_empty() {
            return Err(format!("line {n} has an empty key: {}", quote(line)));
        }
        let flag = match key {
            "READY" => Some((&mut p.ready, "1")),
            "STOPPING" => Some((&mut p.stopping, "1")),
            "RELOADING" => Some((&mut p.reloading, "1")),
            "WATCHDOG" => Some((&mut p.watchdog, "1")),
            "FDSTORE" => Some((&mut p.fdstore, "1")),
            "FDSTOREREMOVE" => Some((&mut p.fdstore_remove, "1")),
            "FDPOLL" => Some((&mut p.fdpoll_disabled, "0")),
            "BARRIER" => Some((&mut p.barrier, "1")),
            "MK_HANDOFF" => Some((&mut p.handoff, "1")),
            _ => None,
        };
        if let Some((field, wanted)) = flag {
            if value == wanted {
                *field = true;
            } else {
                p.unknown.push(line.to_owned());
            }
            continue;
        }
        match key {
            "STATUS" if p.status.is_none() => p.status = Some(value.to_owned()),
            "ERRNO" if p.errno.is_none() => {
                let Some(v) = digits(value) else {
                    return Err(format!(
                        "line {n}: ERRNO is not a non-negative integer: {}",
                        quote(value)
                    ));
                };
                p.errno = Some(v);
            }
            "MAINPID" if p.mainpid.is_none() => match digits(value) {
                Some(v) if v > 0 => p.mainpid = Some(v),
                _ => {
                    return Err(format!(
                        "line {n}: MAINPID is not a positive pid: {}",
                        quote(value)
                    ));
                }
            },
            "FDNAME" if p.fdname.is_none() => {
                if !fdname_is_valid(value) {
                    return Err(format!(
                        "line {n}: FDNAME must be 1..={MAX_FDNAME} printable ASCII characters \
                         without ':': {}",
                        quote(value)
                    ));
                }
                p.fdname = Some(value.to_owned());
            }
            _ => p.unknown.push(line.to_owned()),
        }
    }
    if p.fdstore_remove && p.fdname.is_none() {
        return Err("FDSTOREREMOVE=1 without FDNAME".into());
    }
    Ok(p)
}

impl fmt::Display for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Received::Message(m) => write!(f, "notification from pid {}", m.pid),
            Received::Refused {
                pid: Some(pid),
                reason,
            } => {
                write!(f, "notification from pid {pid} refused: {reason}")
            }
            Received::Refused { pid: None, reason } => {
                write!(f, "notification refused: {reason}")
            }
        }
    }
}

/// Sends `text` to the notify socket at `socket_path` with `fds` attached (SCM_RIGHTS), as
/// `sd_pid_notify_with_fds` does. One datagram from a fresh unbound socket; the kernel adds
/// this process's credentials. Blocks while the receiver's queue is full. Does not police
/// the protocol (tests send what the receiver must refuse).
pub fn send(socket_path: &Path, text: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    send_bytes(socket_path, text.as_bytes(), fds)
}

fn send_bytes(socket_path: &Path, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let addr = UnixAddr::new(socket_path).map_err(|e| with_path(socket_path, "address", e))?;
    let sock = UnixDatagram::unbound()?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let iov = [IoSlice::new(bytes)];
    loop {
        match sendmsg(
            sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            Some(&addr),
        ) {
            Err(Errno::EINTR) => {}
            Err(e) => return Err(with_path(socket_path, "sendmsg", e)),
            Ok(_) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::memfd::testing::{open_copies, unique_memfd};
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use nix::sys::stat::fstat;
    use std::os::unix::fs::MetadataExt;

    fn ok(text: &str) -> Parsed {
        parse(text.as_bytes()).unwrap_or_else(|e| panic!("{text:?} refused: {e}"))
    }

    fn refused(bytes: &[u8]) -> String {
        match parse(bytes) {
            Ok(p) => panic!("{:?} accepted: {p:?}", String::from_utf8_lossy(bytes)),
            Err(e) => e,
        }
    }

    #[test]
    fn parse_reads_every_protocol_key() {
        let p = ok(
            "READY=1\nSTATUS=serving 3 clients\nSTOPPING=1\nRELOADING=1\nWATCHDOG=1\n\
             ERRNO=5\nMAINPID=4242\nFDSTORE=1\nFDNAME=listen sock~1\nFDPOLL=0\n\
             MK_HANDOFF=1\nMONOTONIC_USEC=123\nX-CUSTOM=a=b\n",
        );
        assert_eq!(
            p,
            Parsed {
                ready: true,
                stopping: true,
                reloading: true,
                watchdog: true,
                status: Some("serving 3 clients".into()),
                errno: Some(5),
                mainpid: Some(4242),
                fdstore: true,
                fdstore_remove: false,
                fdname: Some("listen sock~1".into()),
                fdpoll_disabled: true,
                barrier: false,
                handoff: true,
                unknown: vec!["MONOTONIC_USEC=123".into(), "X-CUSTOM=a=b".into()],
            }
        );
        let p = ok("FDSTOREREMOVE=1\nFDNAME=db");
        assert!(p.fdstore_remove && !p.fdstore);
        assert_eq!(p.fdname.as_deref(), Some("db"));
        // Empty lines, no trailing newline, empty STATUS, ERRNO=0.
        let p = ok("\n\nSTATUS=\n\nERRNO=0");
        assert_eq!(p.status.as_deref(), Some(""));
        assert_eq!(p.errno, Some(0));
        assert!(ok("BARRIER=1").barrier);
        assert_eq!(ok(""), Parsed::default());
        assert_eq!(ok("\n\n\n"), Parsed::default());
    }

    #[test]
    fn flags_count_only_with_their_exact_value() {
        let p = ok(
            "READY=0\nREADY=true\nREADY=1 \nREADY= 1\nSTOPPING=yes\nWATCHDOG=trigger\n\
             FDSTORE=2\nFDPOLL=1\nRELOADING=",
        );
        assert_eq!(
            p,
            Parsed {
                unknown: [
                    "READY=0",
                    "READY=true",
                    "READY=1 ",
                    "READY= 1",
                    "STOPPING=yes",
                    "WATCHDOG=trigger",
                    "FDSTORE=2",
                    "FDPOLL=1",
                    "RELOADING="
                ]
                .map(String::from)
                .to_vec(),
                ..Parsed::default()
            }
        );
        // Any exact line counts, wherever it is.
        assert!(ok("READY=2\nREADY=1").ready);
        // Keys are case-sensitive, as in systemd.
        assert!(!ok("ready=1").ready);
    }

    #[test]
    fn first_valued_assignment_counts() {
        let p = ok(
            "STATUS=one\nSTATUS=two\nMAINPID=7\nMAINPID=x\nFDNAME=a\nFDNAME=b:c\nERRNO=1\nERRNO=2",
        );
        assert_eq!(p.status.as_deref(), Some("one"));
        assert_eq!(p.mainpid, Some(7));
        assert_eq!(p.fdname.as_deref(), Some("a"));
        assert_eq!(p.errno, Some(1));
        assert_eq!(
            p.unknown,
            ["STATUS=two", "MAINPID=x", "FDNAME=b:c", "ERRNO=2"].map(String::from)
        );
    }

    #[test]
    fn parse_refuses_what_breaks_the_rules() {
        let cases: &[(&[u8], &str)] = &[
            (b"READY=1\n\xff\xfe", "not UTF-8"),
            (b"STATUS=a\0b", "NUL"),
            (b"READY=1\nREADY", "line 2 is not KEY=VALUE"),
            (b"hello world", "not KEY=VALUE"),
            (b"=1", "empty key"),
            (b"ERRNO=-1", "ERRNO"),
            (b"ERRNO=abc", "ERRNO"),
            (b"ERRNO=", "ERRNO"),
            (b"ERRNO=+5", "ERRNO"),
            (b"ERRNO=99999999999", "ERRNO"),
            (b"MAINPID=0", "MAINPID"),
            (b"MAINPID=-3", "MAINPID"),
            (b"MAINPID= 12", "MAINPID"),
            (b"MAINPID=4294967297", "MAINPID"),
            (b"FDSTORE=1\nFDNAME=", "FDNAME"),
            (b"FDNAME=a:b", "FDNAME"),
            (b"FDNAME=tab\there", "FDNAME"),
            (b"FDNAME=caf\xc3\xa9", "FDNAME"),
            (b"FDNAME=del\x7f", "FDNAME"),
            (b"FDSTOREREMOVE=1", "FDSTOREREMOVE=1 without FDNAME"),
        ];
        for (bytes, want) in cases {
            let e = refused(bytes);
            assert!(
                e.contains(want),
                "{:?}: {e}",
                String::from_utf8_lossy(bytes)
            );
        }
        let e = refused(format!("FDNAME={}", "n".repeat(256)).as_bytes());
        assert!(e.contains("1..=255"), "{e}");
        assert_eq!(
            ok(&format!("FDNAME={}", "n".repeat(255)))
                .fdname
                .unwrap()
                .len(),
            255
        );
        let e = refused(&vec![b'\n'; MAX_DATAGRAM + 1]);
        assert!(e.contains("more than 4096"), "{e}");
        // A long refused line is quoted short.
        let e = refused(format!("{}\n", "x".repeat(3000)).as_bytes());
        assert!(e.len() < 200, "{e}");
    }

    /// Total bytes of text a parse result holds.
    fn content_len(p: &Parsed) -> usize {
        p.status.as_ref().map_or(0, String::len)
            + p.fdname.as_ref().map_or(0, String::len)
            + p.unknown.iter().map(String::len).sum::<usize>()
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_nor_grow(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..6000)
        ) {
            if let Ok(p) = parse(&bytes) {
                proptest::prop_assert!(bytes.len() <= MAX_DATAGRAM);
                proptest::prop_assert!(content_len(&p) <= bytes.len());
            }
        }

        #[test]
        fn generated_messages_parse_consistently(
            lines in proptest::collection::vec(
                (
                    proptest::prop_oneof![
                        proptest::strategy::Just("READY".to_string()),
                        proptest::strategy::Just("STATUS".to_string()),
                        proptest::strategy::Just("ERRNO".to_string()),
                        proptest::strategy::Just("MAINPID".to_string()),
                        proptest::strategy::Just("FDSTORE".to_string()),
                        proptest::strategy::Just("FDNAME".to_string()),
                        proptest::strategy::Just("WATCHDOG".to_string()),
                        "[A-Z_]{0,12}",
                    ],
                    proptest::prop_oneof!["1", "0", "[0-9]{1,12}", "[ -~]{0,40}", "\\PC{0,20}"],
                ),
                0..60,
            )
        ) {
            let mut text = String::new();
            for (k, v) in &lines {
                text.push_str(k);
                text.push('=');
                text.push_str(v);
                text.push('\n');
            }
            match parse(text.as_bytes()) {
                Ok(p) => {
                    proptest::prop_assert!(text.len() <= MAX_DATAGRAM);
                    proptest::prop_assert!(content_len(&p) <= text.len());
                    let has_ready = lines.iter().any(|(k, v)| k == "READY" && v == "1");
                    proptest::prop_assert_eq!(p.ready, has_ready);
                    if let Some(name) = &p.fdname {
                        proptest::prop_assert!(fdname_is_valid(name));
                    }
                    proptest::prop_assert!(p.mainpid.is_none_or(|v| v > 0));
                    proptest::prop_assert!(p.errno.is_none_or(|v| v >= 0));
                }
                Err(e) => proptest::prop_assert!(!e.is_empty()),
            }
        }
    }

    fn socket_in(dir: &tempfile::TempDir) -> NotifySocket {
        NotifySocket::bind(&dir.path().join("notify.sock")).unwrap()
    }

    fn recv(s: &NotifySocket) -> Received {
        s.recv(Some(Duration::from_secs(10)))
            .unwrap()
            .expect("nothing arrived within 10 s")
    }

    fn message(s: &NotifySocket) -> Message {
        match recv(s) {
            Received::Message(m) => m,
            r @ Received::Refused { .. } => panic!("{r}"),
        }
    }

    fn refusal(s: &NotifySocket) -> (Option<i32>, String) {
        match recv(s) {
            Received::Refused { pid, reason } => (pid, reason),
            Received::Message(m) => panic!("accepted: {m:?}"),
        }
    }

    fn own_pid() -> i32 {
        std::process::id() as i32
    }

    #[test]
    fn ready_and_status_arrive_with_the_kernels_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let s = socket_in(&dir);
        assert_eq!(
            s.env_value(),
            dir.path().join("notify.sock").to_str().unwrap()
        );
        assert_eq!(s.path(), dir.path().join("notify.sock"));
        send(s.path(), "READY=1\nSTATUS=up and running", &[]).unwrap();
        let m = message(&s);
        assert_eq!(m.pid, own_pid());
        assert_eq!(m.uid, nix::unistd::getuid().as_raw());
        assert_eq!(m.gid, nix::unistd::getgid().as_raw());
        assert!(m.text.ready && !m.text.stopping && !m.text.fdstore);
        assert_eq!(m.text.status.as_deref(), Some("up and running"));
        assert!(m.fds.is_empty() && m.text.unknown.is_empty());
        // From another thread: still this process's pid (the thread group id).
        let path = s.path().to_owned();
        std::thread::spawn(move || send(&path, "WATCHDOG=1", &[]).unwrap())
            .join()
            .unwrap();
        let m = message(&s);
        assert!(m.text.watchdog);
        assert_eq!(m.pid, own_pid());
    }

    #[test]
    fn fdstore_hands_over_the_same_file_close_on_exec() {
        let dir = tempfile::tempdir().unwrap();
        let s = socket_in(&dir);
        let (memfd, name) = unique_memfd("notify-store");
        crate::sys::memfd::write_all(memfd.as_fd(), b"kept state").unwrap();
        send(s.path(), "FDSTORE=1\nFDNAME=x", &[memfd.as_fd()]).unwrap();
        let m = message(&s);
        assert!(m.text.fdstore);
        assert_eq!(m.text.fdname.as_deref(), Some("x"));
        assert_eq!(m.fds.len(), 1);
        let (a, b) = (fstat(&memfd).unwrap(), fstat(&m.fds[0]).unwrap());
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
        assert_eq!(crate::sys::memfd::size(m.fds[0].as_fd()).unwrap(), 10);
        let flags = FdFlag::from_bits_truncate(fcntl(&m.fds[0], FcntlArg::F_GETFD).unwrap());
        assert!(flags.contains(FdFlag::FD_CLOEXEC));
        // Exactly one extra descriptor: the one received, owned by the message.
        assert_eq!(open_copies(&name), 2);
        drop(m);
        assert_eq!(open_copies(&name), 1);
    }

    #[test]
    fn sixteen_fds_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let s = socket_in(&dir);
        let (memfd, name) = unique_memfd("notify-sixteen");
        let fds = vec![memfd.as_fd(); MAX_FDS_PER_MESSAGE];
        send(s.path(), "FDSTORE=1\nFDNAME=many", &fds).unwrap();
        let m = message(&s);
        assert_eq!(m.fds.len(), MAX_FDS_PER_MESSAGE);
        assert_eq!(open_copies(&name), 1 + MAX_FDS_PER_MESSAGE);
        drop(m);
        assert_eq!(open_copies(&name), 1);
    }

    #[test]
    fn fds_without_fdstore_are_refused_and_closed() {
        let dir = tempfile::tempdir().unwrap();
        let s = socket_in(&dir);
        let (memfd, name) = unique_memfd("notify-nostore");
        send(s.path(), "READY=1", &[memfd.as_fd(), memfd.as_fd()]).unwrap();
        let (pid, reason) = refusal(&s);
        assert_eq!(pid, Some(own_pid()));
        assert!(reason.contains("fds sent without FDSTORE=1"), "{reason}");
        assert_eq!(open_copies(&name), 1);
        // FDSTOREREMOVE=1 is no FDSTORE=1 either.
        send(s.path(), "FDSTOREREMOVE=1\nFDNAME=a", &[memfd.as_fd()]).unwrap();
        assert!(refusal(&s).1.contains("without FDSTORE=1"));
        assert_eq!(open_copies(&name), 1);
    }

    #[test]
    fn seventeen_fds_are_refused_and_none_leaks() {
        let dir = tempfile::tempdir().unwrap();
        let s = socket_in(&dir);
        let (memfd, name) = unique_memfd("notify-seventeen");
        assert_eq!(open_copies(&name), 1);
        let fds = vec![memfd.as_fd(); MAX_FDS_PER_MESSAGE + 1];
        send(s.path(), "FDSTORE=1\nFDNAME=many", &fds).unwrap();
        let (pid, reason) = refusal(&s);
        // The credentials are read from the truncated control data too.
        assert_eq!(pid, Some(own_pid()));
        assert!(reason.contains("more than 16 fds"), "{reason}");
        assert!(reason.contains("the 16 received were closed"), "{reason}");
        assert_eq!(open_copies(&name), 1);
        // The socket goes on working.
        send(s.path(), "READY=1", &[]).unwrap();
        assert!(message(&s).text.ready);
    }

    #[test]
    fn datagram_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let s = socket_in(&dir);
        let (memfd, name) = unique_memfd("notify-oversize");
        let big = format!("STATUS={}", "x".repeat(5000 - 7));
        send(s.path(), &big, &[]).unwrap();
        let (pid, reason) = refusal(&s);
        assert_eq!(pid, Some(own_pid()));
        assert!(reason.contains("longer than 4096"), "{reason}");
        // Oversized with fds: refused, fds closed.
        send(s.path(), &format!("FDSTORE=1\n{big}"), &[memfd.as_fd()]).unwrap();
        assert!(refusal(&s).1.contains("longer than 4096"));
        assert_eq!(open_copies(&name), 1);
        // Exactly the limit is fine.
        let max = format!("STATUS={}", "y".repeat(MAX_DATAGRAM - 7));
        send(s.path(), &max, &[]).unwrap();
        assert_eq!(message(&s).text.status.unwrap().len(), MAX_DATAGRAM - 7);
    }

    #[test]
    fn malformed_text_is_refused_with_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let s = socket_in(&dir);
        send_bytes(s.path(), b"READY=1\n\xc3\x28", &[]).unwrap();
        let (pid, reason) = refusal(&s);
        assert_eq!(pid, Some(own_pid()));
        assert!(reason.contains("not UTF-8"), "{reason}");
        send(s.path(), "READY=1\nnonsense", &[]).unwrap();
        assert!(refusal(&s).1.contains("not KEY=VALUE"));
        send(s.path(), "FDSTORE=1\nFDNAME=a:b", &[]).unwrap();
        assert!(refusal(&s).1.contains("FDNAME"));
    }

    #[test]
    fn barrier_is_answered_by_closing_its_fd() {
        let dir = tempfile::tempdir().unwrap();
        let s = socket_in(&dir);
        let (rd, wr) = nix::unistd::pipe().unwrap();
        send(s.path(), "READY=1", &[]).unwrap();
        send(s.path(), "BARRIER=1", &[wr.as_fd()]).unwrap();
        drop(wr);
        // The earlier message comes out; the barrier is not handed to the caller.
        assert!(message(&s).text.ready);
        let mut fds = [PollFd::new(rd.as_fd(), PollFlags::POLLIN)];
        assert_eq!(
            poll(&mut fds, PollTimeout::ZERO).unwrap(),
            0,
            "answered too early"
        );
        assert!(s.recv(Some(Duration::from_millis(100))).unwrap().is_none());
        // Every write end is closed: the sender's wait ends.
        let mut byte = [0u8; 1];
        assert_eq!(nix::unistd::read(&rd, &mut byte).unwrap(), 0);
        // A message after a barrier is still delivered by the same recv.
        let (_rd2, wr2) = nix::unistd::pipe().unwrap();
        send(s.path(), "BARRIER=1", &[wr2.as_fd()]).unwrap();
        send(s.path(), "STATUS=after", &[]).unwrap();
        assert_eq!(message(&s).text.status.as_deref(), Some("after"));
        // Without exactly one fd it is refused (and closed).
        send(s.path(), "BARRIER=1", &[]).unwrap();
        assert!(
            refusal(&s)
                .1
                .contains("BARRIER=1 needs exactly one fd, got 0")
        );
        let (memfd, name) = unique_memfd("notify-barrier");
        send(s.path(), "BARRIER=1", &[memfd.as_fd(), memfd.as_fd()]).unwrap();
        assert!(refusal(&s).1.contains("got 2"));
        assert_eq!(open_copies(&name), 1);
    }

    #[test]
    fn timeout_returns_none_promptly() {
        let dir = tempfile::tempdir().unwrap();
        let s = socket_in(&dir);
        let t = Instant::now();
        assert!(s.recv(Some(Duration::from_millis(100))).unwrap().is_none());
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        let t = Instant::now();
        assert!(s.recv(Some(Duration::ZERO)).unwrap().is_none());
        assert!(t.elapsed() < Duration::from_secs(1));
        // Sub-millisecond timeouts do not spin forever either.
        assert!(s.recv(Some(Duration::from_micros(300))).unwrap().is_none());
    }

    #[test]
    fn recv_waits_for_a_late_message() {
        let dir = tempfile::tempdir().unwrap();
        let s = socket_in(&dir);
        let path = s.path().to_owned();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            send(&path, "STOPPING=1", &[]).unwrap();
        });
        let got = s.recv(None).unwrap().unwrap();
        assert!(
            matches!(got, Received::Message(ref m) if m.text.stopping),
            "{got}"
        );
        sender.join().unwrap();
    }

    #[test]
    fn bind_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        drop(UnixDatagram::bind(&path).unwrap());
        assert!(path.exists());
        let s = NotifySocket::bind(&path).unwrap();
        send(&path, "READY=1", &[]).unwrap();
        assert!(message(&s).text.ready);
        // A stale stream socket too.
        drop(s);
        std::fs::remove_file(&path).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        NotifySocket::bind(&path).unwrap();
    }

    #[test]
    fn bind_refuses_to_replace_what_is_not_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        std::fs::write(&path, b"precious").unwrap();
        let e = NotifySocket::bind(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(
            e.to_string().contains("a regular file, not a socket"),
            "{e}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");

        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = NotifySocket::bind(&link).unwrap_err();
        assert!(e.to_string().contains("a symlink"), "{e}");

        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(
            NotifySocket::bind(&sub)
                .unwrap_err()
                .to_string()
                .contains("a directory")
        );

        // A socket someone is bound to (datagram or stream) is live, not stale.
        let live = dir.path().join("live.sock");
        let first = NotifySocket::bind(&live).unwrap();
        let e = NotifySocket::bind(&live).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        send(&live, "READY=1", &[]).unwrap();
        assert!(message(&first).text.ready);
        let stream = dir.path().join("stream.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&stream).unwrap();
        assert_eq!(
            NotifySocket::bind(&stream).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
    }

    #[test]
    fn bind_path_limits() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap().len() + 1;
        assert!(base < 90, "temp dir path too long for this test");
        let exact = dir.path().join("s".repeat(MAX_SOCKET_PATH - base));
        assert_eq!(exact.as_os_str().len(), MAX_SOCKET_PATH);
        let s = NotifySocket::bind(&exact).unwrap();
        send(&exact, "READY=1", &[]).unwrap();
        assert!(message(&s).text.ready);

        let long = dir.path().join("s".repeat(MAX_SOCKET_PATH + 1 - base));
        let e = NotifySocket::bind(&long).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let msg = e.to_string();
        assert!(msg.contains("at most 107"), "{msg}");
        assert!(msg.contains("is 108 bytes"), "{msg}");
        assert!(msg.contains(long.to_str().unwrap()), "{msg}");
        assert!(!long.exists());

        let e = NotifySocket::bind(Path::new("relative/notify.sock")).unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
    }

    #[test]
    fn socket_file_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let s = socket_in(&dir);
        let meta = std::fs::symlink_metadata(s.path()).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o7777, 0o600);
    }

    const UMASK_CHILD_ENV: &str = "MK_NOTIFY_UMASK_CHILD_DIR";

    /// Not a test on its own: the child body of `socket_file_is_0600_under_umask_0`, which
    /// runs it alone in a process of its own (the umask is process-wide) with `--ignored`.
    #[test]
    #[ignore = "the child process of socket_file_is_0600_under_umask_0"]
    fn umask_0_child() {
        let Some(dir) = std::env::var_os(UMASK_CHILD_ENV) else {
            return;
        };
        let dir = Path::new(&dir);
        nix::sys::stat::umask(Mode::empty());
        // The mode set before bind alone already gives 0600 at creation: no window.
        let raw = dir.join("raw.sock");
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind_with_mode(&fd, &raw).unwrap();
        let raw_mode = std::fs::symlink_metadata(&raw).unwrap().mode() & 0o7777;
        // And the whole bind.
        let s = NotifySocket::bind(&dir.join("notify.sock")).unwrap();
        let mode = std::fs::symlink_metadata(s.path()).unwrap().mode() & 0o7777;
        println!("MODES {raw_mode:o} {mode:o}");
    }

    #[test]
    fn socket_file_is_0600_under_umask_0() {
        let dir = tempfile::tempdir().unwrap();
        let modes = mk_test_support::run_alone(
            "host::notify::tests::umask_0_child",
            UMASK_CHILD_ENV,
            dir.path(),
            "MODES",
        );
        assert_eq!(modes, "600 600");
    }
}
