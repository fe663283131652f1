//! Who may talk to an instance's sockets (`ctl.sock`, `chan.sock`, the LUO agent's
//! `ctl.sock`), and how many at once.
//!
//! The socket files are created 0600 in 0700 directories, but a file mode is a weak guard
//! (a loose umask, a copied directory): every connection's peer is also checked with
//! `SO_PEERCRED` before a byte of it is read. Allowed: root, and the user the agent itself
//! runs as (an unprivileged emulated machine). Everyone else is disconnected and logged.
//!
//! Each listener also caps its concurrent connections ([`Gate`]): a connection beyond the
//! cap is closed at once, so a flood of idle connections cannot grow the process (each one
//! holds a thread and up to one frame of buffer: 1 MiB on the control socket, 16 MiB on the
//! channel).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// Most concurrent connections to a control socket.
pub const MAX_CONTROL_CONNECTIONS: usize = 16;
/// Most concurrent connections to a channel socket (one per upgrade is what is used).
pub const MAX_CHANNEL_CONNECTIONS: usize = 4;

/// Why a peer was turned away.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot read the peer's credentials (SO_PEERCRED): {0}")]
    Credentials(#[source] nix::errno::Errno),
    #[error(
        "peer uid {uid} (pid {pid}) is neither root nor the agent's user {own}: connection refused"
    )]
    NotAllowed { uid: u32, pid: i32, own: u32 },
    #[error("{active} connections are open, the most this socket serves: connection refused")]
    TooMany { active: usize },
}

/// Checks the peer of `stream` (before anything is read from it).
pub fn authorize(stream: &UnixStream) -> Result<(), PeerError> {
    let cred = getsockopt(stream, PeerCredentials).map_err(PeerError::Credentials)?;
    let own = nix::unistd::geteuid().as_raw();
    let uid = cred.uid();
    if uid == 0 || uid == own {
        Ok(())
    } else {
        Err(PeerError::NotAllowed {
            uid,
            pid: cred.pid(),
            own,
        })
    }
}

/// A cap on a listener's concurrent connections.
#[derive(Debug, Clone)]
pub struct Gate {
    active: Arc<AtomicUsize>,
    max: usize,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    /// A gate admitting at most `max` connections at once.
    pub fn new(max: usize) -> Self {
        Gate {
            active: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// Admits one more connection, or refuses it when `max` are open.
    pub fn enter(&self) -> Result<Ticket, PeerError> {
        let prev = self.active.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return Err(PeerError::TooMany { active: prev });
        }
        Ok(Ticket(Arc::clone(&self.active)))
    }
}

/// Admits `conn` (allowed peer, a free place) or logs why not; the ticket lives as long as
/// the connection is served.
pub fn admit(gate: &Gate, conn: &UnixStream, what: &str) -> Option<Ticket> {
    match authorize(conn).and_then(|()| gate.enter()) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(socket = what, error = %e, "connection refused");
            None
        }
    }
}

/// Binds a listening socket at `path` that only its owner may use: its directory is made
/// 0700 (created if missing), a stale socket file is removed, and the socket file is made
/// 0600.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_admits_up_to_its_cap_and_frees_places() {
        let g = Gate::new(2);
        let a = g.enter().unwrap();
        let _b = g.enter().unwrap();
        assert!(matches!(g.enter(), Err(PeerError::TooMany { active: 2 })));
        drop(a);
        assert!(g.enter().is_ok());
    }

    #[test]
    fn the_agents_own_user_is_allowed() {
        let (a, _b) = UnixStream::pair().unwrap();
        authorize(&a).unwrap();
    }

    #[test]
    fn a_private_socket_is_0600_in_a_0700_directory() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/ctl.sock");
        let first = bind_private(&p).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(p.parent().unwrap()), 0o700);
        // A stale file from an earlier run is replaced.
        drop(first);
        let _second = bind_private(&p).unwrap();
    }
}
