//! Termination requests (SIGINT, SIGTERM) observed as a flag, for long-running commands that
//! must stop starting work and report what they did (`mk-upgrade rollout`). Handlers reset
//! to the default at `exec`, so children are not affected.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_termination(_: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Installs the handlers; afterwards SIGINT and SIGTERM only set the flag.
pub fn catch_termination() -> std::io::Result<()> {
    let act = SigAction::new(
        SigHandler::Handler(on_termination),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to a static atomic, which is async-signal-safe;
        // it touches no lock, allocation or thread-local. SA_RESTART keeps interrupted
        // system calls of the other threads going.
        unsafe { sigaction(sig, &act) }.map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived since [`catch_termination`].
pub fn termination_requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
