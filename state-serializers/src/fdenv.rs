//! The environment contract that hands preserved file descriptors to a restarted workload.
//!
//! In the style of systemd's `LISTEN_FDS`, a workload started by mk-upgrade finds its
//! preserved descriptors (memfds holding its state, listening sockets) already open, and
//! learns their names from one variable:
//!
//! ```text
//! MK_STATE_FDS=kv-data:3,listen:4
//! ```
//!
//! * entries are `name:fd`, separated by `,`; order is not significant;
//! * a name is 1..=63 bytes of `[A-Za-z0-9._-]` (the LUO session-name limit), unique;
//! * an fd is a decimal integer ≥ 3 (0..=2 are stdio), unique.
//!
//! The fds are inherited without `FD_CLOEXEC`. A workload that does not find the variable
//! starts fresh (first boot). `docs/state.md` documents the contract for workload authors.

use std::collections::BTreeSet;
use std::os::fd::RawFd;

/// Name of the environment variable that carries the contract.
pub const ENV_VAR: &str = "MK_STATE_FDS";

/// Longest accepted name, in bytes (matches the LUO session-name limit of 63 bytes).
pub const MAX_NAME_LEN: usize = 63;

/// Why a `MK_STATE_FDS` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FdEnvError {
    #[error("{ENV_VAR}: entry {index} ({entry:?}) is not of the form name:fd")]
    Malformed { index: usize, entry: String },
    #[error(
        "{ENV_VAR}: entry {index} has an invalid name {name:?} (1..=63 bytes of A-Z a-z 0-9 . _ -)"
    )]
    BadName { index: usize, name: String },
    #[error("{ENV_VAR}: entry {index} has an invalid fd {fd:?} (a decimal integer >= 3)")]
    BadFd { index: usize, fd: String },
    #[error("{ENV_VAR}: name {0:?} appears twice")]
    DuplicateName(String),
    #[error("{ENV_VAR}: fd {0} appears twice")]
    DuplicateFd(RawFd),
}

/// One named descriptor of the contract.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NamedFd {
    pub name: String,
    pub fd: RawFd,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses a `MK_STATE_FDS` value. An empty string is an empty list.
pub fn parse(value: &str) -> Result<Vec<NamedFd>, FdEnvError> {
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    let mut fds = BTreeSet::new();
    if value.is_empty() {
        return Ok(out);
    }
    for (index, entry) in value.split(',').enumerate() {
        let Some((name, fd)) = entry.split_once(':') else {
            return Err(FdEnvError::Malformed {
                index,
                entry: entry.to_owned(),
            });
        };
        if !valid_name(name) {
            return Err(FdEnvError::BadName {
                index,
                name: name.to_owned(),
            });
        }
        // Canonical decimal only: no sign, no leading zero, fits a RawFd, >= 3.
        let Some(fd_num) = fd
            .parse::<RawFd>()
            .ok()
            .filter(|n| *n >= 3 && n.to_string() == fd)
        else {
            return Err(FdEnvError::BadFd {
                index,
                fd: fd.to_owned(),
            });
        };
        if !names.insert(name.to_owned()) {
            return Err(FdEnvError::DuplicateName(name.to_owned()));
        }
        if !fds.insert(fd_num) {
            return Err(FdEnvError::DuplicateFd(fd_num));
        }
        out.push(NamedFd {
            name: name.to_owned(),
            fd: fd_num,
        });
    }
    Ok(out)
}

/// Formats a list into a `MK_STATE_FDS` value; refuses what [`parse`] would refuse.
pub fn format(fds: &[NamedFd]) -> Result<String, FdEnvError> {
    let value = fds
        .iter()
        .map(|f| format!("{}:{}", f.name, f.fd))
        .collect::<Vec<_>>()
        .join(",");
    parse(&value)?;
    Ok(value)
}

/// Reads the contract from this process's environment. `Ok(None)` when the variable is
/// absent (a first start, nothing was handed over).
pub fn from_env() -> Result<Option<Vec<NamedFd>>, FdEnvError> {
    match std::env::var(ENV_VAR) {
        Ok(v) => parse(&v).map(Some),
        Err(_) => Ok(None),
    }
}

/// Looks a descriptor up by name.
pub fn find<'a>(fds: &'a [NamedFd], name: &str) -> Option<&'a NamedFd> {
    fds.iter().find(|f| f.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let fds = vec![
            NamedFd {
                name: "kv-data".into(),
                fd: 3,
            },
            NamedFd {
                name: "listen".into(),
                fd: 4,
            },
        ];
        let s = format(&fds).unwrap();
        assert_eq!(s, "kv-data:3,listen:4");
        assert_eq!(parse(&s).unwrap(), fds);
        assert_eq!(find(&fds, "listen").unwrap().fd, 4);
        assert!(find(&fds, "nope").is_none());
    }

    #[test]
    fn empty_is_empty() {
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn refusals_name_the_problem() {
        assert!(matches!(
            parse("kv"),
            Err(FdEnvError::Malformed { index: 0, .. })
        ));
        assert!(matches!(
            parse("a:3,:4"),
            Err(FdEnvError::BadName { index: 1, .. })
        ));
        assert!(matches!(parse("a b:3"), Err(FdEnvError::BadName { .. })));
        assert!(matches!(
            parse(&format!("{}:3", "x".repeat(64))),
            Err(FdEnvError::BadName { .. })
        ));
        assert!(matches!(parse("a:2"), Err(FdEnvError::BadFd { .. })));
        assert!(matches!(parse("a:-5"), Err(FdEnvError::BadFd { .. })));
        assert!(matches!(parse("a:+5"), Err(FdEnvError::BadFd { .. })));
        assert!(matches!(parse("a:05"), Err(FdEnvError::BadFd { .. })));
        assert!(matches!(
            parse("a:99999999999"),
            Err(FdEnvError::BadFd { .. })
        ));
        assert_eq!(parse("a:3,a:4"), Err(FdEnvError::DuplicateName("a".into())));
        assert_eq!(parse("a:3,b:3"), Err(FdEnvError::DuplicateFd(3)));
        let msg = parse("a:2").unwrap_err().to_string();
        assert!(
            msg.contains("MK_STATE_FDS") && msg.contains(">= 3"),
            "{msg}"
        );
    }
}
