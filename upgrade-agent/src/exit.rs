//! Exit codes of `mk-upgrade` and `mk-agentd`: one table, documented in `docs/cli.md`.
//!
//! Scripts and fleet engines branch on these, so a value never changes meaning once
//! released. Every command maps its errors onto this table; "the system is still on its
//! known-good kernel" holds for every code except 0 (and 10, where it holds by rollback).

use std::process::ExitCode;

/// The documented exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[repr(u8)]
pub enum Exit {
    /// Success (for `apply`: upgraded; for `inspect`: the image verified).
    Ok = 0,
    /// An internal error (a bug): the message says what failed.
    Internal = 1,
    /// Bad command line (clap's own usage errors also exit 2).
    Usage = 2,
    /// An input file is missing or unreadable (path and OS error in the message).
    Io = 3,
    /// A handover image or region is malformed or corrupt (magic, CRC, digest, bounds).
    Corrupt = 4,
    /// Trust refused: unsigned, bad signature, or signed by a key that is not trusted.
    Untrusted = 5,
    /// Compatibility refused: newer format major, unknown required region, downgrade.
    Incompatible = 6,
    /// The file given as a kernel is not a bootable x86 bzImage.
    NotAKernel = 7,
    /// A pre-flight check failed (`check`, and `apply` before it changes anything).
    PreflightFailed = 8,
    /// Another upgrade holds the lock.
    Busy = 9,
    /// The upgrade was rolled back: the old kernel runs every workload, nothing was lost.
    RolledBack = 10,
    /// Capturing workload, memory or device state failed.
    CaptureFailed = 11,
    /// The platform (kernel interface or emulator) refused or failed an operation.
    Platform = 12,
    /// `state diff`: the two captures differ (like diff(1), 0 means identical).
    Differs = 13,
    /// Nothing to do (`rollback` with no previous kernel, `apply` of the running kernel).
    NothingToDo = 14,
}

impl Exit {
    /// The numeric code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e.code())
    }
}
