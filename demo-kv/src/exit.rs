//! Exit codes of `mk-demo-kv`: the subset of the mk-upgrade table (`docs/cli.md`) that the
//! workload uses, with the same numbers, so a supervisor reads them the same way.

use std::process::ExitCode;

/// The exit codes `mk-demo-kv` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success (SIGTERM or SIGINT also end with 0).
    Ok = 0,
    /// An internal error (a bug): the message says what failed.
    Internal = 1,
    /// Bad flags, or bad `MK_STATE_FDS` descriptors.
    Usage = 2,
    /// The handed-over memfd is corrupt.
    Corrupt = 4,
    /// The system refused an operation (bind, memfd, mmap, accept).
    Platform = 12,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_mk_upgrade_table() {
        let codes = [
            Exit::Ok,
            Exit::Internal,
            Exit::Usage,
            Exit::Corrupt,
            Exit::Platform,
        ]
        .map(Exit::code);
        assert_eq!(codes, [0, 1, 2, 4, 12]);
    }
}
