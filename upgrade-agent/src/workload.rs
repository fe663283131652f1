//! The workload file: which workloads mk-upgrade manages and how it checks their health.
//!
//! A TOML file (default `STATE_DIR/workloads.toml`, `--workloads FILE`), one
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
//! mode = "handover"                   # handover | socket-activation | restart | checkpoint
//! restart = "on-failure"              # on-failure | no
//! stop_signal = "SIGTERM"
//! stop_timeout_ms = 10000
//!
//! [[workload.memfd]]                  # state the kernel preserves (LUO memfd / handed over)
//! name = "kv-data"
//! size = 0                            # initial size in bytes; the workload may grow it
//!
//! [[workload.listen]]                 # listening sockets handed over (queued connections survive)
//! name = "listen"
//! addr = "127.0.0.1:7001"
//!
//! [workload.health]                   # http | exec | notify | tcp | none
//! kind = "http"
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
/// Largest workload file read (it is read whole).
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Longest health-check timeout: a move waits for the check, with the workload frozen
/// until the check passes or fails, so this bounds the blackout of a failing move.
pub const MAX_HEALTH_TIMEOUT_MS: u64 = 600_000;
/// Largest initial size of a declared memfd (1 TiB).
pub const MAX_MEMFD_BYTES: u64 = 1 << 40;
/// Most arguments and environment variables of one workload.
pub const MAX_ARGS: usize = 1024;
/// Longest single argument, environment key or value, health command word (bytes).
pub const MAX_STRING_BYTES: usize = 64 * 1024;
/// Environment variables the agent sets itself (a workload file may not set them).
pub const RESERVED_ENV: &[&str] = &[
    "MK_STATE_FDS",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PID",
    "NOTIFY_SOCKET",
    "MK_STANDBY_FD",
];

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
    /// How the workload moves to the new instance (see [`Mode`]). Fields at their default
    /// are not serialized, so a spec that uses none of them reads the same to an older agent.
    #[serde(default, skip_serializing_if = "is_default")]
    pub mode: Mode,
    /// What the supervisor does when the workload exits on its own.
    #[serde(default, skip_serializing_if = "is_default")]
    pub restart: RestartPolicy,
    /// The signal that asks the workload to stop (restart mode's move, and every stop).
    #[serde(default, skip_serializing_if = "is_default")]
    pub stop_signal: StopSignal,
    /// How long the workload has to exit after `stop_signal` before it is killed.
    #[serde(
        default = "default_stop_timeout",
        skip_serializing_if = "is_default_stop_timeout"
    )]
    pub stop_timeout_ms: u64,
    /// Connection hand-over (modes `handover` and `socket-activation`, emulated platform):
    /// before the freeze the agent sends this signal, and the workload hands its established
    /// connections to the new copy through its fd store (`FDSTORE=1`, `FDNAME=connection`,
    /// then `MK_HANDOFF=1`; docs/workloads.md). Absent: its connections end with the old copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_signal: Option<StopSignal>,
    /// How long the agent waits for `MK_HANDOFF=1` before it freezes the workload anyway.
    #[serde(
        default = "default_handoff_timeout",
        skip_serializing_if = "is_default_handoff_timeout"
    )]
    pub handoff_timeout_ms: u64,
    /// Standby start (mode `handover`, emulated platform): the new copy is started before
    /// the old one is frozen and waits for its descriptors on `MK_STANDBY_FD`
    /// (docs/state.md), so its start-up is not part of the blackout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standby: bool,
    /// LUO: the memfds are preserved in the workload's LUO session when the move is
    /// announced, before the freeze, so the kernel's preservation (pinning every folio,
    /// which can take hundreds of milliseconds) is not part of the blackout. From then on
    /// until the move ends the memfds' sizes are fixed: growing or shrinking one fails with
    /// EPERM, as under `F_SEAL_GROW`, which the workload must tolerate (retry). Modes
    /// `handover` and `socket-activation` with `transfer = "share"`; ignored on the other
    /// platforms.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preserve_before_freeze: bool,
}

/// Default `handoff_timeout_ms`.
pub const DEFAULT_HANDOFF_TIMEOUT_MS: u64 = 1_000;
/// Longest `handoff_timeout_ms` (the workload serves no connection while it hands over).
pub const MAX_HANDOFF_TIMEOUT_MS: u64 = 60_000;

fn default_handoff_timeout() -> u64 {
    DEFAULT_HANDOFF_TIMEOUT_MS
}
#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_default_handoff_timeout(v: &u64) -> bool {
    *v == DEFAULT_HANDOFF_TIMEOUT_MS
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Default `stop_timeout_ms` (systemd's `TimeoutStopSec` default is 90 s; a move waits for
/// it, so the default here is shorter).
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 10_000;
/// Longest `stop_timeout_ms`.
pub const MAX_STOP_TIMEOUT_MS: u64 = 600_000;

fn default_stop_timeout() -> u64 {
    DEFAULT_STOP_TIMEOUT_MS
}
#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_default_stop_timeout(v: &u64) -> bool {
    *v == DEFAULT_STOP_TIMEOUT_MS
}

/// How a workload moves to the new instance; what survives each is tabled in
/// `docs/workloads.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Frozen; its memfds and listening sockets are handed to a new copy started on the new
    /// instance, named in `MK_STATE_FDS`.
    #[default]
    Handover,
    /// As `handover`, but the descriptors are passed the systemd way (`LISTEN_FDS`,
    /// `LISTEN_FDNAMES`, `LISTEN_PID`), so socket-activatable services need no change.
    SocketActivation,
    /// The service binds its own ports and keeps its state on disk: the old copy is stopped
    /// (`stop_signal`, then `SIGKILL` after `stop_timeout_ms`), then a new copy is started
    /// on the new instance. Its ports are closed in between (measured per move).
    Restart,
    /// The process tree is checkpointed with CRIU while frozen and restored on the other
    /// side (memory, sockets, established TCP connections): see `host::checkpoint`.
    Checkpoint,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Handover => "handover",
            Mode::SocketActivation => "socket-activation",
            Mode::Restart => "restart",
            Mode::Checkpoint => "checkpoint",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the supervisor does when a workload exits on its own (systemd's `Restart=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restarted (from the declared spec, with its preserved descriptors) when it exits
    /// with a non-zero status or is killed by a signal, after a back-off that doubles from
    /// [`RESTART_BACKOFF_MIN_MS`] up to [`RESTART_BACKOFF_MAX_MS`].
    #[default]
    OnFailure,
    /// Left exited; `status` shows it.
    No,
}

/// First restart delay after a failure.
pub const RESTART_BACKOFF_MIN_MS: u64 = 100;
/// Longest restart delay (the back-off resets after a run of [`RESTART_RESET_MS`]).
pub const RESTART_BACKOFF_MAX_MS: u64 = 30_000;
/// A run at least this long resets the back-off.
pub const RESTART_RESET_MS: u64 = 60_000;

/// A stop signal, written as a name (`"SIGTERM"`, `"TERM"`) or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSignal(pub i32);

impl Default for StopSignal {
    fn default() -> Self {
        StopSignal(libc::SIGTERM)
    }
}

/// Signals a workload may name as its stop signal.
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("TERM", libc::SIGTERM),
    ("WINCH", libc::SIGWINCH),
];

impl StopSignal {
    pub fn name(self) -> String {
        SIGNALS
            .iter()
            .find(|(_, n)| *n == self.0)
            .map_or_else(|| self.0.to_string(), |(s, _)| format!("SIG{s}"))
    }

    fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let bare = t.strip_prefix("SIG").unwrap_or(t);
        if let Some((_, n)) = SIGNALS.iter().find(|(s, _)| *s == bare) {
            return Ok(StopSignal(*n));
        }
        match t.parse::<i32>() {
            Ok(n) if (1..=64).contains(&n) && n != libc::SIGSTOP => Ok(StopSignal(n)),
            _ => Err(format!(
                "signal {text:?} must be one of {} (with or without SIG) or a number 1..=64 \
                 other than SIGSTOP",
                SIGNALS
                    .iter()
                    .map(|(s, _)| *s)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

impl Serialize for StopSignal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for StopSignal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Number(i64),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Name(s) => s,
            Raw::Number(n) => n.to_string(),
        };
        StopSignal::parse(&text).map_err(serde::de::Error::custom)
    }
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

/// How the receiving instance checks a workload's memfds (docs/workloads.md, "transfer and
/// integrity"; the decision for LUO and its measured costs: docs/performance.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Integrity {
    /// The platform's default ([`Integrity::effective`]): `digest` on the emulated and
    /// multikernel platforms, `sampled` on LUO.
    #[default]
    Auto,
    /// CRC32 and SHA-256 of the whole contents, computed while the workload is frozen and
    /// checked by the receiver (cost grows with the size; two sequential passes).
    Digest,
    /// Only that the received fd is the very object that was offered (device, inode, size,
    /// seals): constant cost, meaningful only where the object itself is handed over (the
    /// emulated platform's SCM_RIGHTS). On LUO: size and seals of the preserved memfd, no
    /// look at its contents.
    Identity,
    /// LUO: CRC32 of every byte, computed in parallel chunks on every CPU (combined CRC32s)
    /// in the old kernel while frozen and again in the new one before the workload starts;
    /// plus size and seals. The full-content check without SHA-256. Elsewhere: as
    /// `identity` (the object itself moves).
    Crc32,
    /// LUO: size and seals, plus the CRC32 of a fixed sample of pages (1024 pages of 4 KiB,
    /// one in each 1/1024 of the memfd, first and last included, positions drawn per move):
    /// constant cost. Elsewhere: as `identity`.
    Sampled,
}

/// The default a platform chose for [`Integrity::Auto`] in this process (set once by the
/// platform that runs the orchestrator here: LUO's host agent).
static PLATFORM_INTEGRITY: std::sync::OnceLock<Integrity> = std::sync::OnceLock::new();

impl Integrity {
    /// Sets what `auto` means in this process (the first call wins; `Auto` is ignored).
    pub fn set_platform_default(default: Integrity) {
        if default != Integrity::Auto {
            let _ = PLATFORM_INTEGRITY.set(default);
        }
    }

    /// This setting with `auto` resolved: the platform's default, else `digest`.
    pub fn effective(self) -> Integrity {
        match self {
            Integrity::Auto => PLATFORM_INTEGRITY
                .get()
                .copied()
                .unwrap_or(Integrity::Digest),
            other => other,
        }
    }

    /// Whether the handover image carries a CRC32 + SHA-256 of each memfd (else an
    /// identity entry: size, seals, and where the object moves, device and inode).
    pub fn digest_in_image(self) -> bool {
        self.effective() == Integrity::Digest
    }

    /// The name as written in a workload file.
    pub fn as_str(self) -> &'static str {
        match self {
            Integrity::Auto => "auto",
            Integrity::Digest => "digest",
            Integrity::Identity => "identity",
            Integrity::Crc32 => "crc32",
            Integrity::Sampled => "sampled",
        }
    }
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
    /// The workload sends `READY=1` to `$NOTIFY_SOCKET` (systemd's `Type=notify`) within
    /// `timeout_ms` of its start.
    Notify {
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
            HealthCheck::Notify { .. } => f.write_str("READY=1 on the notify socket"),
        }
    }
}

impl WorkloadSpec {
    /// A workload running `exec` with every other setting at the workload file's default
    /// (no arguments, descriptors or limits; health `none`; mode `handover`).
    pub fn new(name: impl Into<String>, exec: impl Into<PathBuf>) -> Self {
        WorkloadSpec {
            name: name.into(),
            exec: exec.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            cpu_max: None,
            memory_max: None,
            memfds: Vec::new(),
            listeners: Vec::new(),
            health: HealthCheck::default(),
            transfer: Transfer::default(),
            integrity: Integrity::default(),
            mode: Mode::default(),
            restart: RestartPolicy::default(),
            stop_signal: StopSignal::default(),
            stop_timeout_ms: DEFAULT_STOP_TIMEOUT_MS,
            handoff_signal: None,
            handoff_timeout_ms: DEFAULT_HANDOFF_TIMEOUT_MS,
            standby: false,
            preserve_before_freeze: false,
        }
    }

    /// The names of its declared descriptors: memfds, then listeners (the order in which
    /// they are placed at 3, 4, ...).
    pub fn declared_fds(&self) -> impl Iterator<Item = &str> {
        self.memfds
            .iter()
            .map(|m| m.name.as_str())
            .chain(self.listeners.iter().map(|l| l.name.as_str()))
    }

    /// Whether `name` is one of its declared descriptors.
    pub fn declares(&self, name: &str) -> bool {
        self.declared_fds().any(|n| n == name)
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
    /// Reads and validates a workload file: a regular file of at most
    /// [`MAX_FILE_BYTES`] (a FIFO or a device is refused, never read).
    pub fn load(path: &Path) -> Result<Self, WorkloadError> {
        use std::io::Read;
        let io = |source| WorkloadError::Io {
            path: path.to_owned(),
            source,
        };
        // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map_err(io)?
        };
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(WorkloadError::Parse {
                path: path.to_owned(),
                message: "not a regular file".to_owned(),
            });
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(WorkloadError::Parse {
                path: path.to_owned(),
                message: format!("{} bytes, more than {MAX_FILE_BYTES}", meta.len()),
            });
        }
        let mut text = String::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
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
        let mut addrs: BTreeMap<SocketAddr, String> = BTreeMap::new();
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
            for n in w.declared_fds() {
                if !valid_name(n) {
                    return Err(bad(format!(
                        "descriptor name {n:?} must be 1..=63 bytes of A-Z a-z 0-9 . _ -"
                    )));
                }
                if !fd_names.insert(n) {
                    return Err(bad(format!("descriptor name {n:?} is used twice")));
                }
            }
            for l in &w.listeners {
                if let Some(other) = addrs.insert(l.addr, w.name.clone()) {
                    return Err(bad(format!(
                        "listen address {} is also declared by workload {other:?}",
                        l.addr
                    )));
                }
            }
            check_strings(w).map_err(bad)?;
            for m in &w.memfds {
                if m.size > MAX_MEMFD_BYTES {
                    return Err(bad(format!(
                        "memfd {:?} size {} is more than {MAX_MEMFD_BYTES}",
                        m.name, m.size
                    )));
                }
            }
            if let Some(c) = &w.cpu_max {
                check_cpu_max(c).map_err(bad)?;
            }
            if let Some(t) = w.health.timeout_ms()
                && !(1..=MAX_HEALTH_TIMEOUT_MS).contains(&t)
            {
                return Err(bad(format!(
                    "health timeout_ms {t} must be 1..={MAX_HEALTH_TIMEOUT_MS}"
                )));
            }
            check_mode(w).map_err(bad)?;
            check_handoff(w).map_err(bad)?;
            check_standby(w).map_err(bad)?;
            check_preserve_before_freeze(w).map_err(bad)?;
            if !(1..=MAX_STOP_TIMEOUT_MS).contains(&w.stop_timeout_ms) {
                return Err(bad(format!(
                    "stop_timeout_ms {} must be 1..={MAX_STOP_TIMEOUT_MS}",
                    w.stop_timeout_ms
                )));
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

impl HealthCheck {
    /// The check's timeout, if it has one.
    pub fn timeout_ms(&self) -> Option<u64> {
        match self {
            HealthCheck::None => None,
            HealthCheck::Tcp { timeout_ms, .. }
            | HealthCheck::Http { timeout_ms, .. }
            | HealthCheck::Exec { timeout_ms, .. }
            | HealthCheck::Notify { timeout_ms } => Some(*timeout_ms),
        }
    }
}

/// The mode's rules: what it can move, and which health checks prove that the NEW copy
/// serves (docs/workloads.md, "Which health check proves what").
fn check_mode(w: &WorkloadSpec) -> Result<(), String> {
    match w.mode {
        Mode::Checkpoint => {
            if !w.listeners.is_empty() || !w.memfds.is_empty() {
                return Err(
                    "mode \"checkpoint\" moves the whole process (its memory, its own sockets and \
                     connections) with CRIU: declare no [[workload.listen]] or \
                     [[workload.memfd]] (the process binds and allocates its own)"
                        .to_owned(),
                );
            }
            if matches!(w.health, HealthCheck::None | HealthCheck::Notify { .. }) {
                return Err(
                    "mode \"checkpoint\" needs a health check that asks the restored process \
                     (kind = \"tcp\", \"http\" or \"exec\"): a restored process does not send \
                     READY=1 again, and \"none\" would only see it alive"
                        .to_owned(),
                );
            }
        }
        Mode::Restart => {
            if !w.listeners.is_empty() {
                return Err(
                    "mode \"restart\" starts a copy that binds its own ports: declare no \
                     [[workload.listen]] (use \"socket-activation\" to have them passed)"
                        .to_owned(),
                );
            }
            if !w.memfds.is_empty() {
                return Err(
                    "mode \"restart\" keeps state on disk: declare no [[workload.memfd]] (use \
                     \"handover\" or \"socket-activation\" to hand memfds over, or push them to \
                     the fd store with FDSTORE=1)"
                        .to_owned(),
                );
            }
            if w.health == HealthCheck::None {
                return Err(
                    "mode \"restart\" needs a health check that proves the new copy serves \
                     (kind = \"tcp\", \"http\", \"exec\" or \"notify\"): with none, a copy \
                     that failed to bind its port would count as moved"
                        .to_owned(),
                );
            }
        }
        Mode::Handover | Mode::SocketActivation => {
            if let HealthCheck::Tcp { .. } = w.health {
                return Err(format!(
                    "health kind \"tcp\" cannot prove that the new copy serves in mode \"{}\": \
                     the old copy stays frozen while the check runs, and the kernel completes a \
                     TCP handshake into any listening socket's backlog, whoever holds it; use \
                     \"http\", \"exec\" or \"notify\" (tcp is accepted in mode \"restart\", where the \
                     old copy is gone before the new one starts)",
                    w.mode
                ));
            }
            if w.health == HealthCheck::None && !w.listeners.is_empty() {
                return Err(format!(
                    "health kind \"none\" cannot prove that the new copy serves its listening \
                     sockets in mode \"{}\": use \"http\", \"exec\" or \"notify\" (\"none\" is for \
                     workloads that serve nothing: alive is all it checks)",
                    w.mode
                ));
            }
        }
    }
    Ok(())
}

/// Standby start: only in mode `handover` (the descriptors come by `MK_STANDBY_FD` in place
/// of `MK_STATE_FDS`).
fn check_standby(w: &WorkloadSpec) -> Result<(), String> {
    if w.standby && w.mode != Mode::Handover {
        return Err(format!(
            "standby = true works in mode \"handover\" only (the waiting copy receives its \
             descriptors the MK_STATE_FDS way, through MK_STANDBY_FD); mode \"{}\" starts \
             its copy {}",
            w.mode,
            match w.mode {
                Mode::SocketActivation => "with LISTEN_FDS, which cannot arrive later",
                Mode::Restart => "after the old one stopped",
                _ => "from a CRIU checkpoint",
            }
        ));
    }
    Ok(())
}

/// Preservation before the freeze: only where the very memfds the workload runs with move
/// (a `copy` transfer preserves a copy made once it is frozen; `restart` and `checkpoint`
/// hand nothing over).
fn check_preserve_before_freeze(w: &WorkloadSpec) -> Result<(), String> {
    if !w.preserve_before_freeze {
        return Ok(());
    }
    if !matches!(w.mode, Mode::Handover | Mode::SocketActivation) {
        return Err(format!(
            "preserve_before_freeze = true works in modes \"handover\" and              \"socket-activation\" only; mode \"{}\" hands no memfd over",
            w.mode
        ));
    }
    if w.transfer != Transfer::Share {
        return Err(
            "preserve_before_freeze = true needs transfer = \"share\": a copy is made              once the workload is frozen, so there is nothing to preserve before"
                .to_owned(),
        );
    }
    Ok(())
}

/// Connection hand-over: only where the old copy is frozen beside the new one, with a
/// signal the workload can catch that is not its stop signal.
fn check_handoff(w: &WorkloadSpec) -> Result<(), String> {
    let Some(sig) = w.handoff_signal else {
        return Ok(());
    };
    if !matches!(w.mode, Mode::Handover | Mode::SocketActivation) {
        return Err(format!(
            "handoff_signal works in mode \"handover\" or \"socket-activation\" (the old copy \
             hands its connections to a new copy beside it); mode \"{}\" {}",
            w.mode,
            if w.mode == Mode::Checkpoint {
                "keeps established connections through CRIU already"
            } else {
                "stops the old copy first"
            }
        ));
    }
    if sig.0 == libc::SIGKILL {
        return Err("handoff_signal cannot be SIGKILL (it must be caught)".to_owned());
    }
    if sig == w.stop_signal {
        return Err(format!(
            "handoff_signal {} is also the stop_signal: use another (SIGUSR2 is usual)",
            sig.name()
        ));
    }
    if !(1..=MAX_HANDOFF_TIMEOUT_MS).contains(&w.handoff_timeout_ms) {
        return Err(format!(
            "handoff_timeout_ms {} must be 1..={MAX_HANDOFF_TIMEOUT_MS}",
            w.handoff_timeout_ms
        ));
    }
    Ok(())
}

/// Arguments, environment and health command: bounded counts and lengths, no NUL byte (it
/// cannot reach `execve`), environment keys without `=` and not reserved by the agent.
fn check_strings(w: &WorkloadSpec) -> Result<(), String> {
    let word = |what: &str, s: &str| -> Result<(), String> {
        if s.len() > MAX_STRING_BYTES {
            return Err(format!(
                "{what} is {} bytes; at most {MAX_STRING_BYTES}",
                s.len()
            ));
        }
        if s.contains('\0') {
            return Err(format!("{what} {s:?} holds a NUL byte"));
        }
        Ok(())
    };
    if w.args.len() > MAX_ARGS || w.env.len() > MAX_ARGS {
        return Err(format!(
            "{} arguments and {} environment variables; at most {MAX_ARGS} each",
            w.args.len(),
            w.env.len()
        ));
    }
    for a in &w.args {
        word("argument", a)?;
    }
    for (k, v) in &w.env {
        word("environment key", k)?;
        word("environment value", v)?;
        if k.is_empty() || k.contains('=') {
            return Err(format!(
                "environment key {k:?} must be non-empty and hold no '='"
            ));
        }
        if RESERVED_ENV.contains(&k.as_str()) {
            return Err(format!("environment key {k} is set by the agent itself"));
        }
    }
    if let HealthCheck::Exec { command, .. } = &w.health {
        for c in command {
            word("health command word", c)?;
        }
    }
    Ok(())
}

/// cgroup v2 `cpu.max`: `max` or a quota in microseconds, optionally followed by one space
/// and a period of 1000..=1000000 microseconds (the kernel's limits).
fn check_cpu_max(c: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "cpu_max {c:?} must be \"max\" or \"QUOTA\" or \"QUOTA PERIOD\" (microseconds, \
             period 1000..=1000000)"
        )
    };
    let mut parts = c.split(' ');
    let quota = parts.next().ok_or_else(bad)?;
    if quota != "max" && !quota.parse::<u64>().is_ok_and(|q| q >= 1000) {
        return Err(bad());
    }
    if let Some(period) = parts.next()
        && !period
            .parse::<u64>()
            .is_ok_and(|p| (1000..=1_000_000).contains(&p))
    {
        return Err(bad());
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(())
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
    fn every_number_and_string_is_bounded() {
        let batch_env = |env: &str| {
            GOOD.replace(
                "args = [\"1000\"]",
                &format!("args = [\"1000\"]\nenv = {{ {env} }}"),
            )
        };
        let cases = [
            (
                GOOD.replace(
                    "kind = \"exec\"",
                    "kind = \"exec\"\ntimeout_ms = 18446744073709551615",
                ),
                "timeout_ms",
            ),
            (
                GOOD.replace("kind = \"exec\"", "kind = \"exec\"\ntimeout_ms = 0"),
                "timeout_ms",
            ),
            (
                GOOD.replace(
                    "name = \"kv-data\"",
                    "name = \"kv-data\"\nsize = 18446744073709551615",
                ),
                "size",
            ),
            (batch_env("\"A=B\" = \"1\""), "no '='"),
            (batch_env("\"\" = \"1\""), "non-empty"),
            (batch_env("MK_STATE_FDS = \"x\""), "set by the agent"),
            (batch_env("A = \"x\\u0000y\""), "NUL"),
            (
                GOOD.replace(
                    "args = [\"1000\"]",
                    "args = [\"1000\"]\ncpu_max = \"max\\nfoo\"",
                ),
                "cpu_max",
            ),
            (
                GOOD.replace(
                    "args = [\"1000\"]",
                    "args = [\"1000\"]\ncpu_max = \"50000 10\"",
                ),
                "cpu_max",
            ),
            (
                format!(
                    "{GOOD}\n[[workload]]\nname = \"dup\"\nexec = \"/bin/true\"\n[[workload.listen]]\nname = \"l\"\naddr = \"127.0.0.1:7001\"\n"
                ),
                "also declared by workload \"kv-1\"",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should contain {want}");
        }
        for ok in ["max", "50000", "50000 100000", "max 100000"] {
            assert!(check_cpu_max(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn only_bounded_regular_files_are_read() {
        assert!(matches!(
            WorkloadFile::load(Path::new("/dev/zero")),
            Err(WorkloadError::Parse { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(
            &big,
            vec![b'#'; usize::try_from(MAX_FILE_BYTES).unwrap() + 1],
        )
        .unwrap();
        let e = WorkloadFile::load(&big).unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = WorkloadFile::load(&fifo).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    const ONE: &str = "[[workload]]\nname = \"w\"\nexec = \"/usr/bin/redis-server\"\n";

    #[test]
    fn modes_and_their_defaults() {
        let w = parse(ONE).unwrap().workloads.remove(0);
        assert_eq!(w.mode, Mode::Handover);
        assert_eq!(w.restart, RestartPolicy::OnFailure);
        assert_eq!(w.stop_signal, StopSignal(libc::SIGTERM));
        assert_eq!(w.stop_timeout_ms, DEFAULT_STOP_TIMEOUT_MS);
        // Defaults are not serialized: a spec that uses none reads the same to an older agent.
        let json = serde_json::to_string(&w).unwrap();
        for k in ["mode", "restart", "stop_signal", "stop_timeout_ms"] {
            assert!(!json.contains(k), "{json}");
        }
        let text = format!(
            "{ONE}mode = \"restart\"\nrestart = \"no\"\nstop_signal = \"SIGINT\"\n\
             stop_timeout_ms = 500\n[workload.health]\nkind = \"tcp\"\naddr = \"127.0.0.1:6379\"\n"
        );
        let w = parse(&text).unwrap().workloads.remove(0);
        assert_eq!(w.mode, Mode::Restart);
        assert_eq!(w.restart, RestartPolicy::No);
        assert_eq!(w.stop_signal, StopSignal(libc::SIGINT));
        assert_eq!(w.stop_timeout_ms, 500);
        let back: WorkloadSpec = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
        assert_eq!(back, w);
        for (sig, n) in [
            ("TERM", libc::SIGTERM),
            ("\"SIGHUP\"", libc::SIGHUP),
            ("3", 3),
        ] {
            let v = if sig.starts_with('"') || sig.parse::<i32>().is_ok() {
                sig.to_owned()
            } else {
                format!("\"{sig}\"")
            };
            let w = parse(&format!("{ONE}stop_signal = {v}\n")).unwrap();
            assert_eq!(w.workloads[0].stop_signal, StopSignal(n), "{sig}");
        }
        let notify = format!("{ONE}[workload.health]\nkind = \"notify\"\ntimeout_ms = 3000\n");
        assert_eq!(
            parse(&notify).unwrap().workloads[0].health,
            HealthCheck::Notify { timeout_ms: 3000 }
        );
    }

    #[test]
    fn modes_refuse_what_they_cannot_honour_or_prove() {
        let listen = "[[workload.listen]]\nname = \"l\"\naddr = \"127.0.0.1:6379\"\n";
        let tcp = "[workload.health]\nkind = \"tcp\"\naddr = \"127.0.0.1:6379\"\n";
        let http = "[workload.health]\nkind = \"http\"\naddr = \"127.0.0.1:6379\"\n";
        let cases = [
            (
                format!("{ONE}mode = \"checkpoint\"\n{listen}{http}"),
                "declare no [[workload.listen]]",
            ),
            (
                format!("{ONE}mode = \"checkpoint\"\n[[workload.memfd]]\nname = \"m\"\n{http}"),
                "declare no [[workload.listen]]",
            ),
            (
                format!("{ONE}mode = \"checkpoint\"\n"),
                "asks the restored process",
            ),
            (
                format!(
                    "{ONE}mode = \"checkpoint\"\n[workload.health]\nkind = \"notify\"\ntimeout_ms = 1\n"
                ),
                "READY=1 again",
            ),
            (
                format!("{ONE}mode = \"restart\"\n{listen}{tcp}"),
                "binds its own ports",
            ),
            (
                format!("{ONE}mode = \"restart\"\n[[workload.memfd]]\nname = \"m\"\n{tcp}"),
                "keeps state on disk",
            ),
            (format!("{ONE}mode = \"restart\"\n"), "needs a health check"),
            (
                format!("{ONE}{listen}{tcp}"),
                "kernel completes a TCP handshake",
            ),
            (format!("{ONE}{tcp}"), "cannot prove"),
            (
                format!("{ONE}mode = \"socket-activation\"\n{listen}{tcp}"),
                "cannot prove",
            ),
            (format!("{ONE}{listen}"), "kind \"none\" cannot prove"),
            (format!("{ONE}stop_timeout_ms = 0\n"), "stop_timeout_ms"),
            (
                format!("{ONE}stop_timeout_ms = 600001\n"),
                "stop_timeout_ms",
            ),
            (format!("{ONE}stop_signal = \"STOP\"\n"), "stop_signal"),
            (format!("{ONE}stop_signal = 19\n"), "stop_signal"),
            (format!("{ONE}stop_signal = 0\n"), "stop_signal"),
            (format!("{ONE}mode = \"sideways\"\n"), "mode"),
            (
                format!("{ONE}mode = \"restart\"\nstandby = true\n{tcp}"),
                "after the old one stopped",
            ),
            (
                format!("{ONE}mode = \"socket-activation\"\nstandby = true\n{listen}{http}"),
                "cannot arrive later",
            ),
            (
                format!("{ONE}mode = \"restart\"\npreserve_before_freeze = true\n{tcp}"),
                "hands no memfd over",
            ),
            (
                format!("{ONE}transfer = \"copy\"\npreserve_before_freeze = true\n"),
                "needs transfer = \"share\"",
            ),
            (
                format!("{ONE}env = {{ MK_STANDBY_FD = \"3\" }}\n"),
                "set by the agent",
            ),
            (
                format!("{ONE}mode = \"restart\"\nhandoff_signal = \"USR2\"\n{tcp}"),
                "stops the old copy first",
            ),
            (
                format!("{ONE}mode = \"checkpoint\"\nhandoff_signal = \"USR2\"\n{tcp}"),
                "through CRIU already",
            ),
            (
                format!("{ONE}handoff_signal = \"KILL\"\n"),
                "must be caught",
            ),
            (
                format!("{ONE}handoff_signal = \"TERM\"\n"),
                "also the stop_signal",
            ),
            (
                format!("{ONE}handoff_signal = \"STOP\"\n"),
                "signal \"STOP\"",
            ),
            (
                format!("{ONE}handoff_signal = \"USR2\"\nhandoff_timeout_ms = 0\n"),
                "handoff_timeout_ms 0",
            ),
            (
                format!("{ONE}handoff_signal = \"USR2\"\nhandoff_timeout_ms = 60001\n"),
                "handoff_timeout_ms 60001",
            ),
            (format!("{ONE}restart = \"always\"\n"), "restart"),
            (
                format!("{ONE}env = {{ LISTEN_FDS = \"1\" }}\n"),
                "set by the agent",
            ),
            (
                format!("{ONE}env = {{ NOTIFY_SOCKET = \"/x\" }}\n"),
                "set by the agent",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}\n=> {e}\nshould contain {want}");
        }
        // What each mode accepts.
        for ok in [
            format!("{ONE}mode = \"restart\"\n{tcp}"),
            format!("{ONE}mode = \"checkpoint\"\n{tcp}"),
            format!("{ONE}mode = \"socket-activation\"\n{listen}{http}"),
            format!(
                "{ONE}mode = \"socket-activation\"\n{listen}[workload.health]\nkind = \"notify\"\n"
            ),
            format!("{ONE}handoff_signal = \"SIGUSR2\"\nhandoff_timeout_ms = 250\n"),
            format!("{ONE}standby = true\n{listen}{http}"),
            format!("{ONE}preserve_before_freeze = true\n"),
            format!(
                "{ONE}mode = \"socket-activation\"\npreserve_before_freeze = true\n{listen}{http}"
            ),
            format!("{ONE}mode = \"socket-activation\"\nhandoff_signal = 10\n{listen}{http}"),
            ONE.to_owned(),
        ] {
            parse(&ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn empty_file_has_no_workloads() {
        assert!(parse("").unwrap().workloads.is_empty());
    }

    #[test]
    fn integrity_names_parse_and_auto_is_the_default() {
        for (text, want) in [
            ("auto", Integrity::Auto),
            ("digest", Integrity::Digest),
            ("identity", Integrity::Identity),
            ("crc32", Integrity::Crc32),
            ("sampled", Integrity::Sampled),
        ] {
            let toml = format!(
                "[[workload]]\nname = \"w\"\nexec = \"/bin/true\"\nintegrity = \"{text}\"\n"
            );
            let f = WorkloadFile::parse(&toml, Path::new("w.toml")).unwrap();
            assert_eq!(f.workloads[0].integrity, want);
            assert_eq!(want.as_str(), text);
        }
        let f = WorkloadFile::parse(
            "[[workload]]\nname = \"w\"\nexec = \"/bin/true\"\n",
            Path::new("w.toml"),
        )
        .unwrap();
        assert_eq!(f.workloads[0].integrity, Integrity::Auto);
        let e = WorkloadFile::parse(
            "[[workload]]\nname = \"w\"\nexec = \"/bin/true\"\nintegrity = \"md5\"\n",
            Path::new("w.toml"),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("md5") || e.to_string().contains("unknown variant"),
            "{e}"
        );
        // Explicit settings are what they say; only `auto` follows the platform.
        assert_eq!(Integrity::Crc32.effective(), Integrity::Crc32);
        assert!(Integrity::Digest.digest_in_image());
        assert!(!Integrity::Sampled.digest_in_image());
        assert!(!Integrity::Identity.digest_in_image());
    }
}
