//! Task state: what a managed workload's processes look like, read from `/proc`.
//!
//! A record is taken consistently or not at all: `/proc/PID/stat`'s start time is read
//! before and after everything else; a process that exits yields
//! [`StateError::ProcessVanished`], one whose pid was reused or whose descriptors changed
//! under us yields [`StateError::ProcessChanged`]. No partial record is ever returned.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::fd::AsFd;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::SCHEMA_VERSION;
use crate::error::{Result, StateError};
use crate::procfs::{self, under};

/// All captured tasks of a handover (schema version [`SCHEMA_VERSION`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskState {
    pub schema_version: u16,
    /// Parents before children.
    pub tasks: Vec<TaskRecord>,
}

impl TaskState {
    /// No task at this schema version: the state of a workload whose process is gone (or
    /// not captured), whose descriptors still move.
    pub fn empty() -> Self {
        TaskState {
            schema_version: SCHEMA_VERSION,
            tasks: Vec::new(),
        }
    }
}

/// One process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub pid: i32,
    pub ppid: i32,
    /// Start time in clock ticks after boot (`/proc/PID/stat` field 22); with `pid` it
    /// identifies the process across pid reuse.
    pub starttime: u64,
    /// `comm` (the 15-byte task name).
    pub comm: String,
    /// Path of the executable (`/proc/PID/exe`).
    pub exe: String,
    /// Arguments including argv\[0\].
    pub cmdline: Vec<String>,
    /// Environment entries exactly as found (`KEY=VALUE`), in order.
    pub environ: Vec<String>,
    pub cwd: String,
    pub creds: Credentials,
    pub rlimits: Vec<Rlimit>,
    /// CPUs the process may run on (`Cpus_allowed_list`).
    pub affinity: Vec<u32>,
    pub sched: Sched,
    pub cgroup: CgroupInfo,
    pub fds: Vec<FdRecord>,
}

/// Real and effective ids and supplementary groups (`/proc/PID/status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    pub groups: Vec<u32>,
}

/// One resource limit (`/proc/PID/limits`); `None` is unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// Short name: `cpu`, `fsize`, `data`, `stack`, `core`, `rss`, `nproc`, `nofile`,
    /// `memlock`, `as`, `locks`, `sigpending`, `msgqueue`, `nice`, `rtprio`, `rttime`.
    pub resource: String,
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// Scheduling class and priorities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sched {
    pub policy: SchedPolicy,
    /// Real-time priority (0 for non-RT policies).
    pub rt_priority: u32,
    pub nice: i32,
}

/// Linux scheduling policies (`SCHED_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchedPolicy {
    Other,
    Fifo,
    RoundRobin,
    Batch,
    Idle,
    Deadline,
    Unknown(u32),
}

impl SchedPolicy {
    /// From the numeric policy of `/proc/PID/stat` field 41.
    pub fn from_raw(v: u32) -> Self {
        match v {
            0 => Self::Other,
            1 => Self::Fifo,
            2 => Self::RoundRobin,
            3 => Self::Batch,
            5 => Self::Idle,
            6 => Self::Deadline,
            n => Self::Unknown(n),
        }
    }

    /// The numeric policy.
    pub fn raw(self) -> u32 {
        match self {
            Self::Other => 0,
            Self::Fifo => 1,
            Self::RoundRobin => 2,
            Self::Batch => 3,
            Self::Idle => 5,
            Self::Deadline => 6,
            Self::Unknown(n) => n,
        }
    }
}

/// The process's cgroup v2 membership and the limits of that cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupInfo {
    /// Path inside the cgroup v2 hierarchy (`0::PATH` of `/proc/PID/cgroup`); empty when
    /// the process has no v2 membership line.
    pub path: String,
    /// `cpu.max` (`"max 100000"`, `"50000 100000"`), `None` when the file is absent
    /// (controller not enabled) or no cgroup2 hierarchy is mounted.
    pub cpu_max: Option<String>,
    /// `memory.max` (`"max"` or bytes).
    pub memory_max: Option<String>,
    /// `cpuset.cpus` (a CPU list; empty means inherited).
    pub cpuset_cpus: Option<String>,
}

/// One open descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdRecord {
    pub fd: i32,
    /// `readlink /proc/PID/fd/N`.
    pub target: String,
    /// Open flags from fdinfo (octal in the kernel's text; `O_*` bits).
    pub flags: u32,
    pub kind: FdKind,
}

/// What a descriptor refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// A memfd: its name (without the `memfd:` prefix), size and `F_SEAL_*` bits
    /// (`None` when not inspected, see [`CaptureOptions::inspect_memfds`]).
    Memfd {
        name: String,
        size: Option<u64>,
        seals: Option<u32>,
    },
    /// A file system object (regular file, directory, device node) and the file offset.
    File {
        path: String,
        offset: u64,
        deleted: bool,
    },
    /// A listening TCP socket, a bound UDP socket or a listening Unix socket.
    ListeningSocket {
        proto: SocketProto,
        address: String,
    },
    /// Any other socket (connected, or not found in the process's socket tables).
    Socket {
        inode: u64,
    },
    Pipe {
        inode: u64,
    },
    /// Anything else (eventfd, epoll, timerfd, ...): see `target`.
    Other,
}

/// Socket families recognised in `/proc/PID/net/*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SocketProto {
    Tcp,
    Tcp6,
    Udp,
    Udp6,
    Unix,
}

/// Options of [`capture_tasks`].
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Also capture every descendant of the given pids (the process tree).
    pub descendants: bool,
    /// Read memfd sizes and seals through `/proc/PID/fd/N` (requires access to the
    /// process; fixture trees cannot provide it).
    pub inspect_memfds: bool,
    /// How many times to re-capture a process that changed while being captured (for
    /// instance a program still opening files right after `exec`) before returning
    /// [`StateError::ProcessChanged`]. A vanished process is never retried.
    pub retries_on_change: u32,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        Self {
            descendants: true,
            inspect_memfds: true,
            retries_on_change: 3,
        }
    }
}

/// Maps a `/proc/PID/limits` row title onto the short resource name.
const LIMIT_NAMES: [(&str, &str); 16] = [
    ("Max cpu time", "cpu"),
    ("Max file size", "fsize"),
    ("Max data size", "data"),
    ("Max stack size", "stack"),
    ("Max core file size", "core"),
    ("Max resident set", "rss"),
    ("Max processes", "nproc"),
    ("Max open files", "nofile"),
    ("Max locked memory", "memlock"),
    ("Max address space", "as"),
    ("Max file locks", "locks"),
    ("Max pending signals", "sigpending"),
    ("Max msgqueue size", "msgqueue"),
    ("Max nice priority", "nice"),
    ("Max realtime priority", "rtprio"),
    ("Max realtime timeout", "rttime"),
];

/// The `RLIMIT_*` number of a short resource name.
#[allow(clippy::unnecessary_cast)] // the libc type differs between C libraries
pub fn rlimit_resource(name: &str) -> Option<u32> {
    Some(match name {
        "cpu" => libc::RLIMIT_CPU,
        "fsize" => libc::RLIMIT_FSIZE,
        "data" => libc::RLIMIT_DATA,
        "stack" => libc::RLIMIT_STACK,
        "core" => libc::RLIMIT_CORE,
        "rss" => libc::RLIMIT_RSS,
        "nproc" => libc::RLIMIT_NPROC,
        "nofile" => libc::RLIMIT_NOFILE,
        "memlock" => libc::RLIMIT_MEMLOCK,
        "as" => libc::RLIMIT_AS,
        "locks" => libc::RLIMIT_LOCKS,
        "sigpending" => libc::RLIMIT_SIGPENDING,
        "msgqueue" => libc::RLIMIT_MSGQUEUE,
        "nice" => libc::RLIMIT_NICE,
        "rtprio" => libc::RLIMIT_RTPRIO,
        "rttime" => libc::RLIMIT_RTTIME,
        _ => return None,
    } as u32)
}

/// The fields of `/proc/PID/stat` this crate uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub nice: i32,
    pub starttime: u64,
    pub rt_priority: u32,
    pub policy: u32,
}

/// Parses `/proc/PID/stat` (the `comm` field may contain spaces and parentheses).
pub fn parse_stat(path: &Path, text: &str) -> Result<Stat> {
    let open = text
        .find('(')
        .ok_or_else(|| StateError::malformed(path, "no '(' before comm"))?;
    let close = text
        .rfind(')')
        .ok_or_else(|| StateError::malformed(path, "no ')' after comm"))?;
    if close < open {
        return Err(StateError::malformed(path, "')' before '('"));
    }
    let comm = text[open + 1..close].to_owned();
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // rest[i] is field i + 3 of proc(5).
    if rest.len() < 39 {
        return Err(StateError::malformed(
            path,
            format!("{} fields after comm, expected at least 39", rest.len()),
        ));
    }
    let state = rest[0]
        .chars()
        .next()
        .ok_or_else(|| StateError::malformed(path, "empty state field"))?;
    Ok(Stat {
        comm,
        state,
        ppid: procfs::parse_num(path, "ppid (field 4)", rest[1])?,
        nice: procfs::parse_num(path, "nice (field 19)", rest[16])?,
        starttime: procfs::parse_num(path, "starttime (field 22)", rest[19])?,
        rt_priority: procfs::parse_num(path, "rt_priority (field 40)", rest[37])?,
        policy: procfs::parse_num(path, "policy (field 41)", rest[38])?,
    })
}

/// Parses `/proc/PID/limits`.
pub fn parse_limits(path: &Path, text: &str) -> Result<Vec<Rlimit>> {
    let mut lines = text.lines();
    match lines.next() {
        Some(h) if h.starts_with("Limit") => {}
        _ => return Err(StateError::malformed(path, "missing 'Limit' header line")),
    }
    let mut out = Vec::new();
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let Some((title, short)) = LIMIT_NAMES.iter().find(|(t, _)| line.starts_with(t)) else {
            // A limit a newer kernel added: keep it under its row title, restore skips it.
            let title = line.get(..26).unwrap_or(line).trim();
            tracing::debug!(path = %path.display(), title, "unknown limit row");
            continue;
        };
        let vals: Vec<&str> = line[title.len()..].split_whitespace().collect();
        if vals.len() < 2 {
            return Err(StateError::malformed(
                path,
                format!("line {}: {title:?} has no soft/hard values", n + 2),
            ));
        }
        let parse = |s: &str| -> Result<Option<u64>> {
            if s == "unlimited" {
                Ok(None)
            } else {
                procfs::parse_num(path, title, s).map(Some)
            }
        };
        out.push(Rlimit {
            resource: (*short).to_owned(),
            soft: parse(vals[0])?,
            hard: parse(vals[1])?,
        });
    }
    if out.is_empty() {
        return Err(StateError::malformed(path, "no limits listed"));
    }
    Ok(out)
}

/// Fields of `/proc/PID/status` this crate uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub creds: Credentials,
    pub affinity: Vec<u32>,
}

/// Parses `/proc/PID/status`.
pub fn parse_status(path: &Path, text: &str) -> Result<Status> {
    let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':') {
            fields.insert(k, v.trim());
        }
    }
    let get = |k: &str| {
        fields
            .get(k)
            .copied()
            .ok_or_else(|| StateError::malformed(path, format!("no {k}: line")))
    };
    let ids = |k: &str| -> Result<Vec<u32>> {
        let v: Vec<u32> = get(k)?
            .split_whitespace()
            .map(|s| procfs::parse_num(path, k, s))
            .collect::<Result<_>>()?;
        if v.len() < 2 {
            return Err(StateError::malformed(path, format!("{k}: expected 4 ids")));
        }
        Ok(v)
    };
    let uid = ids("Uid")?;
    let gid = ids("Gid")?;
    let groups = get("Groups")?
        .split_whitespace()
        .map(|s| procfs::parse_num(path, "Groups", s))
        .collect::<Result<Vec<u32>>>()?;
    let affinity = procfs::parse_cpu_list(path, get("Cpus_allowed_list")?)?;
    Ok(Status {
        creds: Credentials {
            uid: uid[0],
            euid: uid[1],
            gid: gid[0],
            egid: gid[1],
            groups,
        },
        affinity,
    })
}

/// Parses `/proc/PID/cgroup` and returns the cgroup v2 path (`0::PATH`), empty if none.
pub fn parse_cgroup(path: &Path, text: &str) -> Result<String> {
    for (n, line) in text.lines().enumerate() {
        let mut it = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(p)) = (it.next(), it.next(), it.next()) else {
            return Err(StateError::malformed(
                path,
                format!("line {}: not hierarchy:controllers:path", n + 1),
            ));
        };
        if id == "0" && ctrl.is_empty() {
            return Ok(p.to_owned());
        }
    }
    Ok(String::new())
}

/// fdinfo fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdInfo {
    pub pos: u64,
    pub flags: u32,
    /// Inode number (`ino:`, Linux 5.14+).
    pub ino: Option<u64>,
}

/// Parses `/proc/PID/fdinfo/N`.
pub fn parse_fdinfo(path: &Path, text: &str) -> Result<FdInfo> {
    let mut pos = None;
    let mut flags = None;
    let mut ino = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("ino:") {
            ino = Some(procfs::parse_num(path, "ino", v)?);
        }
        if let Some(v) = line.strip_prefix("pos:") {
            pos = Some(procfs::parse_num(path, "pos", v)?);
        } else if let Some(v) = line.strip_prefix("flags:") {
            flags = Some(u32::from_str_radix(v.trim(), 8).map_err(|_| {
                StateError::malformed(path, format!("flags: {:?} is not octal", v.trim()))
            })?);
        }
    }
    match (pos, flags) {
        (Some(pos), Some(flags)) => Ok(FdInfo { pos, flags, ino }),
        _ => Err(StateError::malformed(path, "missing pos: or flags: line")),
    }
}

/// A listening/bound socket found in the process's network tables, by inode.
type SocketTable = BTreeMap<u64, (SocketProto, String)>;

fn hex_ip(path: &Path, s: &str) -> Result<std::net::IpAddr> {
    let bad = || StateError::malformed(path, format!("address {s:?} is not hex"));
    match s.len() {
        8 => {
            let v = u32::from_str_radix(s, 16).map_err(|_| bad())?;
            Ok(std::net::Ipv4Addr::from(v.to_ne_bytes()).into())
        }
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&s[i * 8..i * 8 + 8], 16).map_err(|_| bad())?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Ok(std::net::Ipv6Addr::from(b).into())
        }
        _ => Err(bad()),
    }
}

/// Parses `/proc/PID/net/{tcp,tcp6,udp,udp6}` and keeps listening (TCP state `0A`) or
/// bound-unconnected (UDP state `07`) sockets.
pub fn parse_inet_table(
    path: &Path,
    text: &str,
    proto: SocketProto,
    out: &mut SocketTable,
) -> Result<()> {
    let want = if matches!(proto, SocketProto::Tcp | SocketProto::Tcp6) {
        "0A"
    } else {
        "07"
    };
    for (n, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        if f.len() < 10 {
            return Err(StateError::malformed(
                path,
                format!("line {}: too few fields", n + 1),
            ));
        }
        if f[3] != want {
            continue;
        }
        let (ip, port) = f[1].split_once(':').ok_or_else(|| {
            StateError::malformed(path, format!("line {}: bad local address", n + 1))
        })?;
        let ip = hex_ip(path, ip)?;
        let port = u16::from_str_radix(port, 16)
            .map_err(|_| StateError::malformed(path, format!("line {}: bad port", n + 1)))?;
        let inode: u64 = procfs::parse_num(path, "inode", f[9])?;
        out.insert(
            inode,
            (proto, std::net::SocketAddr::new(ip, port).to_string()),
        );
    }
    Ok(())
}

/// Parses `/proc/PID/net/unix` and keeps listening sockets (`__SO_ACCEPTCON`).
pub fn parse_unix_table(path: &Path, text: &str, out: &mut SocketTable) -> Result<()> {
    for (n, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        if f.len() < 7 {
            return Err(StateError::malformed(
                path,
                format!("line {}: too few fields", n + 1),
            ));
        }
        let flags = u32::from_str_radix(f[3], 16)
            .map_err(|_| StateError::malformed(path, format!("line {}: bad flags", n + 1)))?;
        if flags & 0x0001_0000 == 0 {
            continue;
        }
        let inode: u64 = procfs::parse_num(path, "inode", f[6])?;
        let addr = f.get(7).map_or(String::new(), |s| (*s).to_owned());
        out.insert(inode, (SocketProto::Unix, addr));
    }
    Ok(())
}

fn socket_table(root: &Path, pid: i32) -> Result<SocketTable> {
    let mut out = SocketTable::new();
    for (file, proto) in [
        ("tcp", SocketProto::Tcp),
        ("tcp6", SocketProto::Tcp6),
        ("udp", SocketProto::Udp),
        ("udp6", SocketProto::Udp6),
    ] {
        let path = under(root, &format!("/proc/{pid}/net/{file}"));
        if let Some(text) = procfs::read_text_opt(&path)? {
            parse_inet_table(&path, &text, proto, &mut out)?;
        }
    }
    let path = under(root, &format!("/proc/{pid}/net/unix"));
    if let Some(text) = procfs::read_text_opt(&path)? {
        parse_unix_table(&path, &text, &mut out)?;
    }
    Ok(out)
}

/// Classifies socket `fd` of the process `pidfd` refers to from the socket itself
/// (`pidfd_getfd`, then its options and names): the cost is per socket, where the network
/// tables of [`socket_table`] cost the whole namespace's sockets at every capture (with
/// hundreds of workloads in one namespace that made a whole apply quadratic). The result
/// is what the tables would say: `Some(Live::Listening)` a listening TCP/Unix or
/// bound-unconnected UDP socket, `Some(Live::Other)` any other socket; `None` when it
/// cannot be looked at here (no ptrace access, the fd was replaced: the caller falls back
/// to the tables).
fn live_socket(pidfd: std::os::fd::BorrowedFd<'_>, fd: i32, inode: u64) -> Option<Live> {
    use nix::sys::socket::{SockaddrStorage, UnixAddr, getpeername, getsockname};
    use std::os::fd::AsRawFd;
    let s = crate::sys::pidfd_getfd(pidfd, fd).ok()?;
    let st = nix::sys::stat::fstat(s.as_fd()).ok()?;
    if st.st_ino != inode {
        return None;
    }
    let opt = |name| crate::sys::getsockopt_int(s.as_fd(), libc::SOL_SOCKET, name).ok();
    let (domain, ty, proto) = (
        opt(libc::SO_DOMAIN)?,
        opt(libc::SO_TYPE)?,
        opt(libc::SO_PROTOCOL)?,
    );
    match domain {
        libc::AF_INET | libc::AF_INET6 => {
            let addr: SockaddrStorage = getsockname(s.as_raw_fd()).ok()?;
            let sa = if let Some(a) = addr.as_sockaddr_in() {
                std::net::SocketAddr::new(a.ip().into(), a.port())
            } else {
                let a = addr.as_sockaddr_in6()?;
                std::net::SocketAddr::new(a.ip().into(), a.port())
            };
            let v6 = domain == libc::AF_INET6;
            if ty == libc::SOCK_STREAM && proto == libc::IPPROTO_TCP {
                let listening = opt(libc::SO_ACCEPTCONN)? == 1;
                let p = if v6 {
                    SocketProto::Tcp6
                } else {
                    SocketProto::Tcp
                };
                Some(Live::listening(listening.then(|| (p, sa.to_string()))))
            } else if ty == libc::SOCK_DGRAM && proto == libc::IPPROTO_UDP {
                let connected = getpeername::<SockaddrStorage>(s.as_raw_fd()).is_ok();
                let p = if v6 {
                    SocketProto::Udp6
                } else {
                    SocketProto::Udp
                };
                Some(Live::listening(
                    (sa.port() != 0 && !connected).then(|| (p, sa.to_string())),
                ))
            } else {
                Some(Live::Other)
            }
        }
        libc::AF_UNIX => {
            if opt(libc::SO_ACCEPTCONN)? != 1 {
                return Some(Live::Other);
            }
            let addr: UnixAddr = getsockname(s.as_raw_fd()).ok()?;
            let name = if let Some(p) = addr.path() {
                p.to_string_lossy().into_owned()
            } else if let Some(a) = addr.as_abstract() {
                // As /proc/net/unix prints it: '@', NULs as '@'.
                format!("@{}", String::from_utf8_lossy(a).replace('\0', "@"))
            } else {
                String::new()
            };
            Some(Live::Listening(SocketProto::Unix, name))
        }
        _ => Some(Live::Other),
    }
}

/// Whether a cgroup v1 `net_cls` or `net_prio` hierarchy is mounted (read once): the kernel
/// gives a socket received through `pidfd_getfd` the receiver's classid and priority index
/// (`__receive_sock`), which would change how such hosts shape or filter the workload.
fn net_cls_or_prio_v1() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        fs::read_to_string("/proc/self/mounts").map_or(true, |m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(2) == Some(&"cgroup")
                    && f.get(3)
                        .is_some_and(|o| o.split(',').any(|x| x == "net_cls" || x == "net_prio"))
            })
        })
    })
}

/// What [`live_socket`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Live {
    Listening(SocketProto, String),
    Other,
}

impl Live {
    fn listening(found: Option<(SocketProto, String)>) -> Self {
        found.map_or(Live::Other, |(p, a)| Live::Listening(p, a))
    }

    #[cfg(test)]
    fn as_table_entry(&self) -> Option<(SocketProto, String)> {
        match self {
            Live::Listening(p, a) => Some((*p, a.clone())),
            Live::Other => None,
        }
    }
}

fn bracket_inode(target: &str, prefix: &str) -> Option<u64> {
    target
        .strip_prefix(prefix)?
        .strip_prefix('[')?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn nul_list(path: &Path, bytes: &[u8], field: &'static str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    if bytes.is_empty() {
        return Ok(out);
    }
    let body = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    for item in body.split(|b| *b == 0) {
        out.push(
            String::from_utf8(item.to_vec()).map_err(|_| StateError::NotUtf8 {
                path: path.to_path_buf(),
                field,
            })?,
        );
    }
    Ok(out)
}

/// Where the cgroup v2 hierarchy is mounted, from `<root>/proc/self/mountinfo`.
pub fn cgroup2_mount(root: &Path) -> Result<Option<String>> {
    let path = under(root, "/proc/self/mountinfo");
    let Some(text) = procfs::read_text_opt(&path)? else {
        return Ok(None);
    };
    Ok(procfs::parse_mountinfo(&path, &text)?
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.mount_point))
}

fn read_cgroup_file(
    root: &Path,
    mount: Option<&str>,
    cg: &str,
    file: &str,
) -> Result<Option<String>> {
    let Some(mount) = mount else { return Ok(None) };
    if cg.is_empty() {
        return Ok(None);
    }
    let path = under(root, mount)
        .join(cg.trim_start_matches('/'))
        .join(file);
    Ok(procfs::read_text_opt(&path)?.map(|s| s.trim().to_owned()))
}

/// Captures one process. See the module doc for the consistency guarantee.
pub fn capture_task(root: &Path, pid: i32, opts: &CaptureOptions) -> Result<TaskRecord> {
    let cg_mount = cgroup2_mount(root)?;
    capture_with_retries(root, pid, opts, cg_mount.as_deref())
}

fn capture_with_retries(
    root: &Path,
    pid: i32,
    opts: &CaptureOptions,
    cg_mount: Option<&str>,
) -> Result<TaskRecord> {
    let mut attempt = 0;
    loop {
        match capture_task_inner(root, pid, opts, cg_mount, &mut || {}) {
            Err(StateError::ProcessChanged { what, .. }) if attempt < opts.retries_on_change => {
                attempt += 1;
                tracing::debug!(
                    pid,
                    attempt,
                    what,
                    "process changed during capture; retrying"
                );
                std::thread::sleep(std::time::Duration::from_millis(20 << attempt.min(5)));
            }
            r => return r,
        }
    }
}

/// Reads and parses `/proc/PID/stat`, ENOENT/ESRCH meaning the process is gone.
fn read_stat(root: &Path, pid: i32) -> Result<Stat> {
    let path = under(root, &format!("/proc/{pid}/stat"));
    match procfs::read_text(&path) {
        Ok(t) => parse_stat(&path, &t),
        Err(e) if e.is_not_found() => Err(StateError::ProcessVanished { pid }),
        Err(e) => Err(e),
    }
}

/// Turns a read error into Vanished/Changed when the process is gone or replaced.
fn classify(root: &Path, pid: i32, starttime: u64, err: StateError) -> StateError {
    if !err.is_not_found() {
        return err;
    }
    match read_stat(root, pid) {
        Err(StateError::ProcessVanished { .. }) => StateError::ProcessVanished { pid },
        Ok(s) if s.starttime != starttime => StateError::ProcessChanged {
            pid,
            what: "pid reused by a new process".into(),
        },
        // A zombie keeps its stat but has lost exe, cwd, fds...: it has exited.
        Ok(s) if matches!(s.state, 'Z' | 'X') => StateError::ProcessVanished { pid },
        _ => err,
    }
}

pub(crate) fn capture_task_inner(
    root: &Path,
    pid: i32,
    opts: &CaptureOptions,
    cg_mount: Option<&str>,
    between: &mut dyn FnMut(),
) -> Result<TaskRecord> {
    let before = read_stat(root, pid)?;
    let st = before.starttime;
    let p = |rel: &str| under(root, &format!("/proc/{pid}/{rel}"));
    let body = || -> Result<TaskRecord> {
        let exe = procfs::read_link(&p("exe"))?;
        let cmdline_path = p("cmdline");
        let cmdline = nul_list(
            &cmdline_path,
            &procfs::read_bytes(&cmdline_path)?,
            "cmdline",
        )?;
        let environ_path = p("environ");
        let environ = nul_list(
            &environ_path,
            &procfs::read_bytes(&environ_path)?,
            "environ",
        )?;
        let cwd = procfs::read_link(&p("cwd"))?;
        let status_path = p("status");
        let status = parse_status(&status_path, &procfs::read_text(&status_path)?)?;
        let limits_path = p("limits");
        let rlimits = parse_limits(&limits_path, &procfs::read_text(&limits_path)?)?;
        let cgroup_path = p("cgroup");
        let cg = parse_cgroup(&cgroup_path, &procfs::read_text(&cgroup_path)?)?;
        let cgroup = CgroupInfo {
            cpu_max: read_cgroup_file(root, cg_mount, &cg, "cpu.max")?,
            memory_max: read_cgroup_file(root, cg_mount, &cg, "memory.max")?,
            cpuset_cpus: read_cgroup_file(root, cg_mount, &cg, "cpuset.cpus")?,
            path: cg,
        };
        let fds = capture_fds(root, pid, opts)?;
        Ok(TaskRecord {
            pid,
            ppid: before.ppid,
            starttime: st,
            comm: before.comm.clone(),
            exe,
            cmdline,
            environ,
            cwd,
            creds: status.creds,
            rlimits,
            affinity: status.affinity,
            sched: Sched {
                policy: SchedPolicy::from_raw(before.policy),
                rt_priority: before.rt_priority,
                nice: before.nice,
            },
            cgroup,
            fds,
        })
    };
    between();
    let rec = body().map_err(|e| classify(root, pid, st, e))?;
    let after = read_stat(root, pid)?;
    if after.starttime != st {
        return Err(StateError::ProcessChanged {
            pid,
            what: "pid reused by a new process".into(),
        });
    }
    if after.state == 'Z' || after.state == 'X' {
        return Err(StateError::ProcessVanished { pid });
    }
    if after.ppid != before.ppid || after.nice != before.nice || after.policy != before.policy {
        return Err(StateError::ProcessChanged {
            pid,
            what: "parent or scheduling changed during capture".into(),
        });
    }
    Ok(rec)
}

fn capture_fds(root: &Path, pid: i32, opts: &CaptureOptions) -> Result<Vec<FdRecord>> {
    let dir = under(root, &format!("/proc/{pid}/fd"));
    let mut fds: Vec<i32> = Vec::new();
    for ent in fs::read_dir(&dir).map_err(|e| StateError::io(&dir, e))? {
        let ent = ent.map_err(|e| StateError::io(&dir, e))?;
        let name = ent.file_name();
        let name = name.to_string_lossy();
        fds.push(name.parse().map_err(|_| {
            StateError::malformed(&dir, format!("entry {name:?} is not an fd number"))
        })?);
    }
    fds.sort_unstable();
    let mut sockets: Option<SocketTable> = None;
    // On the live system, sockets are looked at one by one (see `live_socket`), unless a
    // cgroup v1 net_cls or net_prio hierarchy is mounted: taking a socket with
    // pidfd_getfd re-tags it with the taker's classid and priority index.
    let pidfd = (root == Path::new("/") && !net_cls_or_prio_v1())
        .then(|| crate::sys::pidfd_open(pid).ok())
        .flatten();
    let mut out = Vec::with_capacity(fds.len());
    for fd in fds {
        let link = dir.join(fd.to_string());
        let gone = |e: StateError| {
            if e.is_not_found() {
                StateError::ProcessChanged {
                    pid,
                    what: format!("fd {fd} closed during capture"),
                }
            } else {
                e
            }
        };
        let target = procfs::read_link(&link).map_err(gone)?;
        let info_path = under(root, &format!("/proc/{pid}/fdinfo/{fd}"));
        let info = parse_fdinfo(&info_path, &procfs::read_text(&info_path).map_err(gone)?)?;
        let kind = if let Some(rest) = target.strip_prefix("/memfd:") {
            let name = rest.strip_suffix(" (deleted)").unwrap_or(rest).to_owned();
            if opts.inspect_memfds {
                let f = fs::File::open(&link).map_err(|e| gone(StateError::io(&link, e)))?;
                let meta = f.metadata().map_err(|e| StateError::io(&link, e))?;
                if info
                    .ino
                    .is_some_and(|ino| ino != std::os::unix::fs::MetadataExt::ino(&meta))
                {
                    return Err(StateError::ProcessChanged {
                        pid,
                        what: format!("fd {fd} was replaced during capture"),
                    });
                }
                let size = meta.len();
                let seals = crate::sys::get_seals(f.as_fd()).map_err(|e| StateError::Sys {
                    call: "fcntl(F_GET_SEALS)",
                    source: e,
                })?;
                FdKind::Memfd {
                    name,
                    size: Some(size),
                    seals: Some(seals),
                }
            } else {
                FdKind::Memfd {
                    name,
                    size: None,
                    seals: None,
                }
            }
        } else if let Some(path) = target.strip_prefix('/') {
            let path = format!("/{path}");
            let (path, deleted) = match path.strip_suffix(" (deleted)") {
                Some(p) => (p.to_owned(), true),
                None => (path, false),
            };
            FdKind::File {
                path,
                offset: info.pos,
                deleted,
            }
        } else if let Some(inode) = bracket_inode(&target, "socket:") {
            let live = pidfd
                .as_ref()
                .and_then(|p| live_socket(p.as_fd(), fd, inode));
            if let Some(found) = live {
                match found {
                    Live::Listening(proto, address) => FdKind::ListeningSocket { proto, address },
                    Live::Other => FdKind::Socket { inode },
                }
            } else {
                if sockets.is_none() {
                    sockets = Some(socket_table(root, pid)?);
                }
                match sockets.as_ref().and_then(|t| t.get(&inode)) {
                    Some((proto, address)) => FdKind::ListeningSocket {
                        proto: *proto,
                        address: address.clone(),
                    },
                    None => FdKind::Socket { inode },
                }
            }
        } else if let Some(inode) = bracket_inode(&target, "pipe:") {
            FdKind::Pipe { inode }
        } else {
            FdKind::Other
        };
        out.push(FdRecord {
            fd,
            target,
            flags: info.flags,
            kind,
        });
    }
    Ok(out)
}

/// Lists `(pid, ppid)` of every process under `<root>/proc`, skipping ones that exit
/// while being listed.
pub fn list_processes(root: &Path) -> Result<Vec<(i32, i32)>> {
    let dir = under(root, "/proc");
    let mut out = Vec::new();
    for ent in fs::read_dir(&dir).map_err(|e| StateError::io(&dir, e))? {
        let ent = ent.map_err(|e| StateError::io(&dir, e))?;
        let Ok(pid) = ent.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        match read_stat(root, pid) {
            Ok(s) => out.push((pid, s.ppid)),
            Err(StateError::ProcessVanished { .. }) => {}
            // An unreadable process elsewhere on the host must not stop the capture of
            // the ones asked for; if it is one of them, its own capture reports it.
            Err(e) => tracing::warn!(pid, error = %e, "skipping process in tree scan"),
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Most processes one tree walk visits through `children` files.
const MAX_TREE: usize = 65_536;

/// The direct children of `pid`, from `/proc/PID/task/*/children` (one file per thread;
/// Linux with `CONFIG_PROC_CHILDREN`). `None` when the process has no readable task list or
/// none of its threads has the file (the caller then scans every process).
pub fn children_of(root: &Path, pid: i32) -> Option<Vec<i32>> {
    let dir = under(root, &format!("/proc/{pid}/task"));
    let mut out = Vec::new();
    let mut found = false;
    for ent in fs::read_dir(&dir).ok()?.flatten() {
        if let Ok(text) = fs::read_to_string(ent.path().join("children")) {
            found = true;
            out.extend(
                text.split_whitespace()
                    .filter_map(|t| t.parse::<i32>().ok()),
            );
        }
    }
    found.then_some(out)
}

/// The parent → children map of the trees rooted at `pids`, walked through
/// [`children_of`]; `None` as soon as one process cannot be walked that way.
fn trees_from_children_files(root: &Path, pids: &[i32]) -> Option<BTreeMap<i32, Vec<i32>>> {
    let mut m: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    let mut queue: std::collections::VecDeque<i32> = pids.iter().copied().collect();
    let mut visited = 0usize;
    while let Some(p) = queue.pop_front() {
        if m.contains_key(&p) {
            continue;
        }
        visited += 1;
        if visited > MAX_TREE {
            return None;
        }
        let c = children_of(root, p)?;
        queue.extend(c.iter().copied());
        m.insert(p, c);
    }
    Some(m)
}

/// Captures the given processes (and, with `opts.descendants`, their process trees).
/// Parents come before children; a pid named twice is captured once.
pub fn capture_tasks(root: &Path, pids: &[i32], opts: &CaptureOptions) -> Result<TaskState> {
    let mut order: Vec<i32> = Vec::new();
    let mut seen = BTreeSet::new();
    // The trees from each process's own `children` files when the kernel has them (a
    // lookup per process of the tree); otherwise from one scan of every process on the
    // host, which grows with the host's process count.
    let children: BTreeMap<i32, Vec<i32>> = if !opts.descendants {
        BTreeMap::new()
    } else if let Some(m) = trees_from_children_files(root, pids) {
        m
    } else {
        let mut m: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
        for (pid, ppid) in list_processes(root)? {
            m.entry(ppid).or_default().push(pid);
        }
        m
    };
    for &pid in pids {
        let mut queue = std::collections::VecDeque::from([pid]);
        while let Some(p) = queue.pop_front() {
            if !seen.insert(p) {
                continue;
            }
            order.push(p);
            if let Some(c) = children.get(&p) {
                queue.extend(c.iter().copied());
            }
        }
    }
    let cg_mount = cgroup2_mount(root)?;
    let tasks = order
        .into_iter()
        .map(|pid| capture_with_retries(root, pid, opts, cg_mount.as_deref()))
        .collect::<Result<Vec<_>>>()?;
    Ok(TaskState {
        schema_version: SCHEMA_VERSION,
        tasks,
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn process_trees_come_from_the_children_files() {
        let dir = tempfile::tempdir().unwrap();
        let put = |pid: i32, tid: i32, children: Option<&str>| {
            let t = dir.path().join(format!("proc/{pid}/task/{tid}"));
            std::fs::create_dir_all(&t).unwrap();
            if let Some(c) = children {
                std::fs::write(t.join("children"), c).unwrap();
            }
        };
        // 10 has two threads: their children files together list 11, 12, 13.
        put(10, 10, Some("11 12 "));
        put(10, 15, Some("13"));
        put(11, 11, Some(""));
        put(12, 12, Some(""));
        put(13, 13, Some("14\n"));
        put(14, 14, Some(""));
        assert_eq!(children_of(dir.path(), 10), Some(vec![11, 12, 13]));
        let m = trees_from_children_files(dir.path(), &[10]).unwrap();
        assert_eq!(m.keys().copied().collect::<Vec<_>>(), [10, 11, 12, 13, 14]);
        assert_eq!(m[&13], [14]);
        // No children file (a kernel without CONFIG_PROC_CHILDREN), or no such process:
        // the caller falls back to scanning every process.
        put(20, 20, None);
        assert_eq!(children_of(dir.path(), 20), None);
        assert_eq!(children_of(dir.path(), 99), None);
        put(11, 11, Some("20"));
        assert_eq!(trees_from_children_files(dir.path(), &[10]), None);
    }

    #[test]
    fn the_real_children_file_lists_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let listed = children_of(Path::new("/"), me);
        let _ = child.kill();
        let _ = child.wait();
        // Every kernel this project targets has CONFIG_PROC_CHILDREN (it comes with
        // CHECKPOINT_RESTORE, which checkpoint mode needs); report if not.
        let listed = listed.expect("/proc/self/task/*/children (CONFIG_PROC_CHILDREN)");
        assert!(listed.contains(&pid), "{listed:?} lacks {pid}");
    }

    use super::*;
    use std::path::PathBuf;

    /// The live classification (`pidfd_getfd`, per socket) says what the namespace-wide
    /// tables say, for every kind of socket this process holds.
    #[test]
    fn live_socket_classification_matches_the_network_tables() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let tcp4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp6 = std::net::TcpListener::bind("[::1]:0").ok();
        let client = std::net::TcpStream::connect(tcp4.local_addr().unwrap()).unwrap();
        let (served, _) = tcp4.accept().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_conn = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp_conn.connect(udp.local_addr().unwrap()).unwrap();
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("l.sock")).unwrap();
        let (ua, ub) = std::os::unix::net::UnixStream::pair().unwrap();
        let pid = i32::try_from(std::process::id()).unwrap();
        let pidfd = crate::sys::pidfd_open(pid).unwrap();
        let table = socket_table(Path::new("/"), pid).unwrap();
        let mut fds = vec![
            tcp4.as_raw_fd(),
            client.as_raw_fd(),
            served.as_raw_fd(),
            udp.as_raw_fd(),
            udp_conn.as_raw_fd(),
            unix.as_raw_fd(),
            ua.as_raw_fd(),
            ub.as_raw_fd(),
        ];
        fds.extend(tcp6.as_ref().map(AsRawFd::as_raw_fd));
        let mut listening = 0;
        for fd in fds {
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
            let inode = bracket_inode(&link.to_string_lossy(), "socket:").unwrap();
            let live =
                live_socket(pidfd.as_fd(), fd, inode).expect("root may look at its own sockets");
            assert_eq!(
                live.as_table_entry().as_ref(),
                table.get(&inode),
                "fd {fd} ({link:?})"
            );
            listening += usize::from(live != Live::Other);
        }
        // tcp4, udp, unix (and tcp6 where IPv6 exists).
        assert_eq!(listening, 3 + usize::from(tcp6.is_some()));
        // A replaced fd (another inode) is not looked at.
        assert_eq!(live_socket(pidfd.as_fd(), tcp4.as_raw_fd(), 1), None);
    }

    fn fixture_copy() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/root");
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(tmp.path())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let root = tmp.path().join("root");
        (tmp, root)
    }

    fn opts() -> CaptureOptions {
        CaptureOptions {
            descendants: false,
            inspect_memfds: false,
            retries_on_change: 0,
        }
    }

    #[test]
    fn process_exiting_mid_capture_is_vanished() {
        let (_t, root) = fixture_copy();
        let dir = root.join("proc/4242");
        let e = capture_task_inner(&root, 4242, &opts(), Some("/sys/fs/cgroup"), &mut || {
            fs::remove_dir_all(&dir).unwrap();
        })
        .unwrap_err();
        assert!(
            matches!(e, StateError::ProcessVanished { pid: 4242 }),
            "{e}"
        );
    }

    #[test]
    fn pid_reused_mid_capture_is_changed() {
        let (_t, root) = fixture_copy();
        let stat = root.join("proc/4242/stat");
        let e = capture_task_inner(&root, 4242, &opts(), None, &mut || {
            let s = fs::read_to_string(&stat)
                .unwrap()
                .replacen(" 1000 ", " 2000 ", 1);
            fs::write(&stat, s).unwrap();
        })
        .unwrap_err();
        assert!(
            matches!(e, StateError::ProcessChanged { pid: 4242, ref what } if what.contains("reused")),
            "{e}"
        );
    }

    #[test]
    fn pid_reused_and_files_gone_mid_capture_is_changed() {
        let (_t, root) = fixture_copy();
        let stat = root.join("proc/4242/stat");
        let exe = root.join("proc/4242/exe");
        let e = capture_task_inner(&root, 4242, &opts(), None, &mut || {
            let s = fs::read_to_string(&stat)
                .unwrap()
                .replacen(" 1000 ", " 2000 ", 1);
            fs::write(&stat, s).unwrap();
            fs::remove_file(&exe).unwrap();
        })
        .unwrap_err();
        assert!(
            matches!(e, StateError::ProcessChanged { pid: 4242, .. }),
            "{e}"
        );
    }

    #[test]
    fn fd_closed_mid_capture_is_changed() {
        let (_t, root) = fixture_copy();
        let info = root.join("proc/4242/fdinfo/3");
        let e = capture_task_inner(&root, 4242, &opts(), None, &mut || {
            fs::remove_file(&info).unwrap();
        })
        .unwrap_err();
        assert!(
            matches!(e, StateError::ProcessChanged { pid: 4242, ref what } if what.contains("fd 3")),
            "{e}"
        );
    }

    #[test]
    fn parsers_never_panic_on_garbage() {
        let p = Path::new("x");
        for s in [
            "",
            ")",
            "(",
            "1 ) (",
            "1 (a) S",
            "\u{0}\u{ff}",
            "1 (a) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 x",
        ] {
            assert!(parse_stat(p, s).is_err(), "{s:?}");
        }
        for s in [
            "",
            "Limit\nMax open files",
            "Limit\nMax open files 1",
            "nothing",
        ] {
            assert!(parse_limits(p, s).is_err(), "{s:?}");
        }
        assert!(parse_status(p, "Uid: 1\nGid: 1 1\nGroups:\nCpus_allowed_list: 0").is_err());
        assert!(parse_cgroup(p, "garbage").is_err());
        assert_eq!(parse_cgroup(p, "").unwrap(), "");
        assert!(parse_fdinfo(p, "pos: x\nflags: 0").is_err());
        let mut t = SocketTable::new();
        assert!(
            parse_inet_table(
                p,
                "h\n 0: 0100007F:ZZZZ 0:0 0A a b c d e 1\n",
                SocketProto::Tcp,
                &mut t
            )
            .is_err()
        );
        assert!(
            parse_inet_table(
                p,
                "h\n 0: 01007F:0050 0:0 0A a b c d e 1\n",
                SocketProto::Tcp,
                &mut t
            )
            .is_err()
        );
        assert!(parse_unix_table(p, "h\n0: 1 0 zz 1 1 5\n", &mut t).is_err());
    }

    proptest::proptest! {
        #[test]
        fn stat_parser_total(s in ".{0,300}") {
            let _ = parse_stat(Path::new("x"), &s);
            let _ = parse_limits(Path::new("x"), &s);
            let _ = parse_status(Path::new("x"), &s);
            let _ = parse_fdinfo(Path::new("x"), &s);
            let _ = crate::procfs::parse_mountinfo(Path::new("x"), &s);
        }
    }
}
