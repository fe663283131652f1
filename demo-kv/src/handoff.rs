//! Connection hand-over: how `mk-demo-kv` gives its established client connections to the
//! next copy of itself, so that a move loses no request (mk-upgrade's `handoff_signal`,
//! `docs/workloads.md`).
//!
//! When the supervisor sends the hand-over signal (the demo uses `SIGUSR2`):
//!
//! 1. the accept loop stops accepting (queued connections wait in the listening socket's
//!    backlog, which the next copy inherits);
//! 2. every connection thread, at its next request boundary (every request it read is
//!    answered and flushed, nothing is buffered in this process), sends its socket to
//!    `NOTIFY_SOCKET` as `FDSTORE=1` + `FDNAME=connection` and parks: bytes the client
//!    sends from then on wait in the kernel's receive queue for the next copy;
//! 3. once all of them are parked, `MK_HANDOFF=1` tells the supervisor, which freezes this
//!    copy and starts the next one with the connections (`MK_STATE_FDS` names them
//!    `connection-1`, `connection-2`, ...).
//!
//! If the move is cancelled, the supervisor thaws this copy and sends `SIGCONT`: it kept
//! its own descriptors, so it serves the same connections and accepts again. Otherwise it
//! is stopped, and the connections live on in the next copy.

use std::io::{self, IoSlice};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, sendmsg, socket,
};

/// `FDNAME` of a handed-over connection (mk-upgrade's fd store key).
pub const CONNECTION_FDNAME: &str = "connection";

/// Whether an `MK_STATE_FDS` name is a handed-over connection (`connection-N`).
pub fn is_connection(name: &str) -> bool {
    name.strip_prefix(CONNECTION_FDNAME)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[derive(Debug, Default)]
struct State {
    /// Between the hand-over signal and `SIGCONT`.
    handing: bool,
    /// Connection threads alive.
    active: usize,
    /// Connection threads parked (their socket handed over).
    parked: usize,
    /// The accept loop is parked.
    acceptor_parked: bool,
}

/// What the accept loop and the connection threads share for a hand-over.
#[derive(Debug)]
pub struct Handoff {
    state: Mutex<State>,
    changed: Condvar,
    /// Readable while a hand-over is asked: wakes threads blocked in `poll`.
    wake_r: OwnedFd,
    wake_w: OwnedFd,
    /// `NOTIFY_SOCKET` (a path); without it there is nobody to hand anything to.
    notify: Option<PathBuf>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What [`Handoff::wait_readable`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// The socket has something to read (or hung up).
    Readable,
    /// The connection was handed over and the hand-over cancelled: serve it again.
    Resumed,
}

impl Handoff {
    /// `notify`: the `NOTIFY_SOCKET` path (`None`: hand-over requests are ignored).
    pub fn new(notify: Option<PathBuf>) -> io::Result<Self> {
        let (wake_r, wake_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok(Self {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            wake_r,
            wake_w,
            notify,
        })
    }

    /// From the environment: `NOTIFY_SOCKET` when it is a path (not an abstract socket).
    pub fn from_env() -> io::Result<Self> {
        let notify = std::env::var_os("NOTIFY_SOCKET")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute());
        Self::new(notify)
    }

    /// Whether a hand-over is under way.
    pub fn handing(&self) -> bool {
        lock(&self.state).handing
    }

    /// A connection thread starts (call before spawning it; [`Handoff::conn_ended`] when it
    /// ends, whatever the reason).
    pub fn conn_started(&self) {
        lock(&self.state).active += 1;
    }

    pub fn conn_ended(&self) {
        let mut s = lock(&self.state);
        s.active = s.active.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Waits until `fd` is readable; a hand-over asked meanwhile is served first: the
    /// socket `stream` is handed over and the thread parks until the hand-over is
    /// cancelled ([`Wake::Resumed`]) or the process ends. Call it only at a request
    /// boundary (nothing read and unanswered).
    pub fn wait_readable(&self, stream: &TcpStream) -> io::Result<Wake> {
        loop {
            if self.handing() {
                self.hand_over_and_park(stream);
                return Ok(Wake::Resumed);
            }
            let mut fds = [
                PollFd::new(stream.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.wake_r.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ready = fds[0].revents().is_some_and(|r| !r.is_empty());
            if ready && !self.handing() {
                return Ok(Wake::Readable);
            }
            if !self.handing() {
                // The wake-up of a hand-over already cancelled: not yet drained.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// The accept loop: waits until `listener` is readable, parking while a hand-over is
    /// under way.
    pub fn wait_acceptable(&self, listener: BorrowedFd<'_>) -> io::Result<()> {
        loop {
            {
                let mut s = lock(&self.state);
                if s.handing {
                    s.acceptor_parked = true;
                    self.changed.notify_all();
                    while s.handing {
                        s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
                    }
                    s.acceptor_parked = false;
                }
            }
            let mut fds = [
                PollFd::new(listener, PollFlags::POLLIN),
                PollFd::new(self.wake_r.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            if fds[0].revents().is_some_and(|r| !r.is_empty()) && !self.handing() {
                return Ok(());
            }
            if !self.handing() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn hand_over_and_park(&self, stream: &TcpStream) {
        if let Err(e) = self.send(
            &format!("FDSTORE=1\nFDNAME={CONNECTION_FDNAME}\n"),
            &[stream.as_fd()],
        ) {
            // Parked all the same: the connection stays with this copy (and ends with it
            // if the move goes ahead).
            tracing::warn!(error = %e, "handing a connection over failed");
        }
        let mut s = lock(&self.state);
        s.parked += 1;
        self.changed.notify_all();
        while s.handing {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.parked -= 1;
    }

    /// The hand-over signal: asks every thread to hand over, waits (up to `budget`) until
    /// they all parked, then says `MK_HANDOFF=1`. Returns how many connections were
    /// handed over, or `None` without a notify socket (nothing done).
    pub fn begin(&self, budget: Duration) -> Option<usize> {
        self.notify.as_ref()?;
        let deadline = Instant::now() + budget;
        let mut s = lock(&self.state);
        if !s.handing {
            s.handing = true;
            // A full pipe is still readable: the wake-up is not lost.
            let _ = nix::unistd::write(&self.wake_w, &[1]);
        }
        while !(s.acceptor_parked && s.parked >= s.active) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    active = s.active,
                    parked = s.parked,
                    "hand-over: not every connection reached a request boundary in time"
                );
                break;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let handed = s.parked;
        drop(s);
        if let Err(e) = self.send("MK_HANDOFF=1\n", &[]) {
            tracing::warn!(error = %e, "sending MK_HANDOFF=1 failed");
        }
        Some(handed)
    }

    /// `SIGCONT` (the hand-over was cancelled): serve the connections again and accept.
    pub fn resume(&self) {
        let mut s = lock(&self.state);
        if !s.handing {
            return;
        }
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(&self.wake_r, &mut buf), Ok(n) if n > 0) {}
        s.handing = false;
        self.changed.notify_all();
    }

    /// One notify datagram with `fds` attached.
    fn send(&self, text: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let Some(path) = &self.notify else {
            return Ok(());
        };
        let sock = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = UnixAddr::new(path.as_path())?;
        let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let iov = [IoSlice::new(text.as_bytes())];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        sendmsg(
            sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::empty(),
            Some(&addr),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_names() {
        assert!(is_connection("connection-1"));
        assert!(is_connection("connection-42"));
        for n in [
            "connection",
            "connection-",
            "connection-x",
            "kv-data",
            "connection1",
        ] {
            assert!(!is_connection(n), "{n}");
        }
    }
}
