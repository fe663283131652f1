//! The workload file: which workloads mk-upgrade manages and how it checks their health.
//!
//! A TOML file (default `/etc/mk-upgrade/workloads.toml`, `--workloads FILE`), one
//! `[[workload]]` table each; documented in `docs/workloads.md`:
//!
//! ```toml
//! [[workload]]
//! name = "kv-1"                       # 1..=63 of [A-Za-z0-9._-], unique
//! exec = "/usr/bin/mk-demo-kv"        # absolute path
//! args = ["--capacity", "67108864"]
//! env = { RUST_LOG = "info" }         # optional
//! cpu_max = "50000 100000"            # optional cgroup v2 cpu.max
//! memory_max = 268435456              # optional cgroup v2 memory.max, bytes
//!
//! [[workload.memfd]]                  # state the kernel preserves (LUO memfd / handed over)
//! name = "kv-data"
//! size = 0                            # initial size in bytes; the workload may grow it
//!
//! [[workload.listen]]                 # listening sockets handed over (queued connections survive)
//! name = "listen"
//! addr = "127.0.0.1:7001"
//!
//! [workload.health]                   # tcp | http | exec | none
//! kind = "tcp"
//! addr = "127.0.0.1:7001"
//! timeout_ms = 2000
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest workload name (it becomes a LUO session name, which is limited to 63 bytes).
pub const MAX_NAME_LEN: usize = 63;
/// Most workloads one file may declare (LUO allows 744 sessions; keep well below).
pub const MAX_WORKLOADS: usize = 512;
/// Most preserved descriptors per workload (LUO preserves at most 128 files a session).
pub const MAX_FDS: usize = 64;

/// The whole workload file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadFile {
    #[serde(default, rename = "workload")]
    pub workloads: Vec<WorkloadSpec>,
}

/// One managed workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: String,
    pub exec: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cpu_max: Option<String>,
    #[serde(default)]
    pub memory_max: Option<u64>,
    #[serde(default, rename = "memfd")]
    pub memfds: Vec<MemfdSpec>,
    #[serde(default, rename = "listen")]
    pub listeners: Vec<ListenSpec>,
    #[serde(default)]
    pub health: HealthCheck,
    /// How its memfds travel to the new instance.
    #[serde(default)]
    pub transfer: Transfer,
    /// How the new instance checks them before the workload may touch them.
    #[serde(default)]
    pub integrity: Integrity,
}

/// How a workload's memfds travel to the new instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Transfer {
    /// The same memory object is handed over (LUO preservation / SCM_RIGHTS): no copy.
    #[default]
    Share,
    /// The contents are copied into a fresh memfd while the workload is frozen (the
    /// copy-based baseline, as a checkpoint/restore tool would do).
    Copy,
}

/// How the receiving instance checks a workload's memfds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Integrity {
    /// CRC32 and SHA-256 of the whole contents, computed while the workload is frozen and
    /// checked by the receiver (cost grows with the size).
    #[default]
    Digest,
    /// Only that the received fd is the very object that was offered (device, inode, size,
    /// seals): constant cost, meaningful only where the object itself is handed over (the
    /// emulated platform's SCM_RIGHTS), not across a kexec.
    Identity,
}

/// A memfd the workload keeps its state in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemfdSpec {
    pub name: String,
    #[serde(default)]
    pub size: u64,
}

/// A listening TCP socket handed to the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSpec {
    pub name: String,
    pub addr: SocketAddr,
}

/// How the new instance decides a moved workload is healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum HealthCheck {
    /// No check: healthy once started.
    #[default]
    None,
    /// A TCP connect to `addr` succeeds.
    Tcp {
        addr: SocketAddr,
        #[serde(default = "default_timeout")]
        timeout_ms: u64,
    },
    /// `GET path` on `addr` answers with `expect_status`.
    Http {
        addr: SocketAddr,
        #[serde(default = "default_path")]
        path: String,
        #[serde(default = "default_status")]
        expect_status: u16,
        #[serde(default = "default_timeout")]
        timeout_ms: u64,
    },
    /// `command` (argv) exits 0.
    Exec {
        command: Vec<String>,
        #[serde(default = "default_timeout")]
        timeout_ms: u64,
    },
}

fn default_timeout() -> u64 {
    2000
}
fn default_path() -> String {
    "/health".to_owned()
}
fn default_status() -> u16 {
    200
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthCheck::None => f.write_str("none"),
            HealthCheck::Tcp { addr, .. } => write!(f, "tcp connect {addr}"),
            HealthCheck::Http {
                addr,
                path,
                expect_status,
                ..
            } => write!(f, "http GET {addr}{path} expecting {expect_status}"),
            HealthCheck::Exec { command, .. } => write!(f, "exec {}", command.join(" ")),
        }
    }
}

/// Why a workload file was refused.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot read workload file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workload file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("workload file {path}: workload {index} ({name:?}): {problem}")]
    Invalid {
        path: PathBuf,
        index: usize,
        name: String,
        problem: String,
    },
}

/// Whether `name` is a valid workload (or descriptor) name: 1..=63 bytes of
/// `[A-Za-z0-9._-]`, not only dots (names become path components: cgroups, sessions).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.bytes().all(|b| b == b'.')
}

impl WorkloadFile {
    /// Reads and validates a workload file.
    pub fn load(path: &Path) -> Result<Self, WorkloadError> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates workload-file text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, WorkloadError> {
        let file: WorkloadFile = toml::from_str(text).map_err(|e| WorkloadError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        file.validate(path)?;
        Ok(file)
    }

    /// Checks names, counts, paths and health-check arguments.
    pub fn validate(&self, path: &Path) -> Result<(), WorkloadError> {
        if self.workloads.len() > MAX_WORKLOADS {
            return Err(WorkloadError::Parse {
                path: path.to_owned(),
                message: format!(
                    "{} workloads declared; at most {MAX_WORKLOADS} are supported",
                    self.workloads.len()
                ),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for (index, w) in self.workloads.iter().enumerate() {
            let bad = |problem: String| WorkloadError::Invalid {
                path: path.to_owned(),
                index,
                name: w.name.clone(),
                problem,
            };
            if !valid_name(&w.name) {
                return Err(bad(
                    "name must be 1..=63 bytes of A-Z a-z 0-9 . _ -".to_owned()
                ));
            }
            if !seen.insert(w.name.clone()) {
                return Err(bad("name is used by an earlier workload".to_owned()));
            }
            if !w.exec.is_absolute() {
                return Err(bad(format!(
                    "exec {} must be an absolute path",
                    w.exec.display()
                )));
            }
            let fd_count = w.memfds.len() + w.listeners.len();
            if fd_count > MAX_FDS {
                return Err(bad(format!(
                    "{fd_count} preserved descriptors; at most {MAX_FDS}"
                )));
            }
            let mut fd_names = std::collections::BTreeSet::new();
            for n in w
                .memfds
                .iter()
                .map(|m| &m.name)
                .chain(w.listeners.iter().map(|l| &l.name))
            {
                if !valid_name(n) {
                    return Err(bad(format!(
                        "descriptor name {n:?} must be 1..=63 bytes of A-Z a-z 0-9 . _ -"
                    )));
                }
                if !fd_names.insert(n) {
                    return Err(bad(format!("descriptor name {n:?} is used twice")));
                }
            }
            if let HealthCheck::Exec { command, .. } = &w.health
                && command.is_empty()
            {
                return Err(bad("health check kind \"exec\" needs a command".to_owned()));
            }
            if let HealthCheck::Http { path: p, .. } = &w.health
                && (!p.starts_with('/') || p.bytes().any(|b| b.is_ascii_whitespace()))
            {
                return Err(bad(format!(
                    "http health path {p:?} must start with / and hold no whitespace"
                )));
            }
        }
        Ok(())
    }

    /// Looks a workload up by name.
    pub fn get(&self, name: &str) -> Option<&WorkloadSpec> {
        self.workloads.iter().find(|w| w.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[workload]]
name = "kv-1"
exec = "/usr/bin/mk-demo-kv"
args = ["--capacity", "1048576"]
[[workload.memfd]]
name = "kv-data"
[[workload.listen]]
name = "listen"
addr = "127.0.0.1:7001"
[workload.health]
kind = "http"
addr = "127.0.0.1:7001"

[[workload]]
name = "batch"
exec = "/bin/sleep"
args = ["1000"]
[workload.health]
kind = "exec"
command = ["/bin/true"]
"#;

    fn parse(text: &str) -> Result<WorkloadFile, WorkloadError> {
        WorkloadFile::parse(text, Path::new("w.toml"))
    }

    #[test]
    fn parses_a_full_file() {
        let f = parse(GOOD).unwrap();
        assert_eq!(f.workloads.len(), 2);
        let kv = f.get("kv-1").unwrap();
        assert_eq!(kv.memfds[0].name, "kv-data");
        assert_eq!(kv.listeners[0].addr, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(
            kv.health,
            HealthCheck::Http {
                addr: "127.0.0.1:7001".parse().unwrap(),
                path: "/health".into(),
                expect_status: 200,
                timeout_ms: 2000
            }
        );
        assert_eq!(f.get("batch").unwrap().memfds.len(), 0);
        assert!(f.get("nope").is_none());
    }

    #[test]
    fn refusals_name_workload_and_problem() {
        let cases = [
            (GOOD.replace("kv-1", "kv 1"), "name must be"),
            (GOOD.replace("\"kv-1\"", "\"..\""), "name must be"),
            (GOOD.replace("\"batch\"", "\"kv-1\""), "used by an earlier"),
            (GOOD.replace("/bin/sleep", "sleep"), "absolute path"),
            (GOOD.replace("\"listen\"", "\"kv-data\""), "used twice"),
            (GOOD.replace("[\"/bin/true\"]", "[]"), "needs a command"),
            (
                GOOD.replace("kind = \"http\"", "kind = \"http\"\npath = \"health\""),
                "must start with /",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should contain {want}");
            assert!(e.contains("w.toml"), "{e}");
        }
    }

    #[test]
    fn syntax_and_unknown_fields_are_refused() {
        assert!(matches!(
            parse("[[workload]"),
            Err(WorkloadError::Parse { .. })
        ));
        let e = parse(&GOOD.replace("args = [\"1000\"]", "argz = [\"1000\"]")).unwrap_err();
        assert!(e.to_string().contains("argz"), "{e}");
        let e = parse(&GOOD.replace("kind = \"exec\"", "kind = \"ping\"")).unwrap_err();
        assert!(matches!(e, WorkloadError::Parse { .. }));
        assert!(matches!(
            WorkloadFile::load(Path::new("/nonexistent/w.toml")),
            Err(WorkloadError::Io { .. })
        ));
    }

    #[test]
    fn empty_file_has_no_workloads() {
        assert!(parse("").unwrap().workloads.is_empty());
    }
}
