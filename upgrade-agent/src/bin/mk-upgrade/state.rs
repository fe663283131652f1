//! `mk-upgrade state`: see what would be handed over, and what changed between captures.
//!
//! * `state capture [--pid PID ...] [--device] [--memory] [--json]` captures the given
//!   processes (with their descendants), memory state (vm sysctls, hugepage pools and a
//!   digest of every memfd the processes hold) and device state (interfaces, routes, PCI,
//!   block devices, mounts) of this host. Without `--pid`, `--device` or `--memory`, it
//!   captures device and memory state.
//! * `state diff A.json B.json [--json]` compares two `--json` captures (schema version 1
//!   captures are migrated first); exit code 13 when they differ.
//!
//! Exit codes (`upgrade_agent::exit::Exit`): 0 ok/identical, 3 unreadable file (also one
//! refused unread: not a regular file, or larger than [`MAX_CAPTURE_BYTES`]), 4 malformed
//! capture file, 11 capture failed, 13 captures differ.
//!
//! `state diff` reads only regular files of at most [`MAX_CAPTURE_BYTES`]: the type and size
//! are checked before the file is opened (a FIFO is never opened, so nothing waits for a
//! writer; `/dev/zero` is never read), and again on the open descriptor, and the read
//! itself stops one byte past the cap. `state capture` reads no file given to it (only
//! `/proc`, `/sys` and netlink).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use state_serializers::codec::{self, Capture};
use state_serializers::device::DeviceState;
use state_serializers::diff;
use state_serializers::memory::{self, MemoryState};
use state_serializers::task::{self, CaptureOptions, FdKind, TaskState};
use state_serializers::{SCHEMA_VERSION, StateError};

use upgrade_agent::exit::Exit;

/// Largest capture file `state diff` reads: 64 MiB. A `state capture --json` of a few
/// processes with device and memory state weighs about 60 KB (4-9 KB per task, ~200 bytes per
/// fd, ~500 per memfd region, ~160 per route, ~210 per mount), so this is three orders of
/// magnitude of headroom (about 400 000 routes, or thousands of tasks), and it bounds what
/// one input costs in memory (the text, then its parse).
pub const MAX_CAPTURE_BYTES: u64 = 64 << 20;

/// Arguments of `mk-upgrade state`.
#[derive(Debug, clap::Args)]
pub struct StateArgs {
    #[command(subcommand)]
    pub command: StateCommand,
}

/// Subcommands of `mk-upgrade state`.
#[derive(Debug, clap::Subcommand)]
pub enum StateCommand {
    /// Capture the state that would be handed over for these processes on this host.
    Capture {
        /// A workload process to capture (with its descendants); repeatable.
        #[arg(long = "pid", value_name = "PID")]
        pid: Vec<i32>,
        /// Capture device state: interfaces, addresses, routes, PCI, block, mounts.
        #[arg(long)]
        device: bool,
        /// Capture memory state: vm sysctls, hugepage pools, memfd digests of the processes.
        #[arg(long)]
        memory: bool,
        /// Print JSON (the input format of `state diff`) instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Show what changed between two JSON captures.
    Diff {
        /// The earlier capture (`state capture --json` output).
        a: PathBuf,
        /// The later capture.
        b: PathBuf,
        /// Print the differences as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `mk-upgrade state`.
pub fn run(args: StateArgs) -> ExitCode {
    match args.command {
        StateCommand::Capture {
            pid,
            device,
            memory,
            json,
        } => capture(&pid, device, memory, json),
        StateCommand::Diff { a, b, json } => diff_files(&a, &b, json),
    }
    .into()
}

fn fail(what: &str, e: &StateError, code: Exit) -> Exit {
    eprintln!("mk-upgrade state: {what}: {e}");
    code
}

/// Captures what was asked for under `root`.
pub fn capture_at(
    root: &Path,
    pids: &[i32],
    device: bool,
    memory: bool,
) -> Result<Capture, StateError> {
    let (device, memory) = if pids.is_empty() && !device && !memory {
        (true, true)
    } else {
        (device, memory)
    };
    let tasks = if pids.is_empty() {
        None
    } else {
        Some(task::capture_tasks(root, pids, &CaptureOptions::default())?)
    };
    let memory = if memory {
        let mut m = memory::capture_memory(root, &[])?;
        if let Some(t) = &tasks {
            m.regions = memory::regions_of_tasks(root, t)?;
        }
        Some(m)
    } else {
        None
    };
    let device = if device {
        Some(state_serializers::device::capture_device(root, true)?)
    } else {
        None
    };
    Ok(Capture {
        schema_version: SCHEMA_VERSION,
        tasks,
        memory,
        device,
    })
}

fn capture(pids: &[i32], device: bool, memory: bool, json: bool) -> Exit {
    let c = match capture_at(Path::new("/"), pids, device, memory) {
        Ok(c) => c,
        Err(e) => return fail("capture failed", &e, Exit::CaptureFailed),
    };
    if json {
        match codec::to_json(&c) {
            Ok(s) => println!("{s}"),
            Err(e) => return fail("cannot serialize", &e, Exit::Internal),
        }
    } else {
        print!("{}", render(&c));
    }
    Exit::Ok
}

/// Human-readable summary of a capture.
pub fn render(c: &Capture) -> String {
    let mut s = format!("schema version {}\n", c.schema_version);
    if let Some(t) = &c.tasks {
        render_tasks(&mut s, t);
    }
    if let Some(m) = &c.memory {
        render_memory(&mut s, m);
    }
    if let Some(d) = &c.device {
        render_device(&mut s, d);
    }
    s
}

fn render_tasks(s: &mut String, t: &TaskState) {
    use std::fmt::Write as _;
    let _ = writeln!(s, "tasks: {}", t.tasks.len());
    for r in &t.tasks {
        let _ = writeln!(
            s,
            "  pid {} (ppid {}) {} {:?}",
            r.pid, r.ppid, r.exe, r.cmdline
        );
        let _ = writeln!(
            s,
            "    cwd {}  uid {} gid {} groups {:?}  env {} vars",
            r.cwd,
            r.creds.uid,
            r.creds.gid,
            r.creds.groups,
            r.environ.len()
        );
        let _ = writeln!(
            s,
            "    cpus {}  sched {:?} nice {}  cgroup {:?} cpu.max {:?} memory.max {:?} cpuset.cpus {:?}",
            state_serializers::procfs::format_cpu_list(&r.affinity),
            r.sched.policy,
            r.sched.nice,
            r.cgroup.path,
            r.cgroup.cpu_max,
            r.cgroup.memory_max,
            r.cgroup.cpuset_cpus
        );
        let limits: Vec<String> = r
            .rlimits
            .iter()
            .map(|l| {
                let f =
                    |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |v| v.to_string());
                format!("{}={}/{}", l.resource, f(l.soft), f(l.hard))
            })
            .collect();
        let _ = writeln!(s, "    rlimits {}", limits.join(" "));
        for f in &r.fds {
            let what = match &f.kind {
                FdKind::Memfd { name, size, seals } => format!(
                    "memfd {name:?} size {} seals {}",
                    size.map_or_else(|| "?".into(), |s| s.to_string()),
                    seals.map_or_else(|| "?".into(), |s| format!("{s:#x}"))
                ),
                FdKind::File {
                    path,
                    offset,
                    deleted,
                } => format!(
                    "file {path} offset {offset}{}",
                    if *deleted { " (deleted)" } else { "" }
                ),
                FdKind::ListeningSocket { proto, address } => {
                    format!("listening {proto:?} {address}")
                }
                FdKind::Socket { inode } => format!("socket inode {inode}"),
                FdKind::Pipe { inode } => format!("pipe inode {inode}"),
                FdKind::Other => format!("other {}", f.target),
            };
            let _ = writeln!(s, "    fd {:>3} flags {:o} {what}", f.fd, f.flags);
        }
    }
}

fn render_memory(s: &mut String, m: &MemoryState) {
    use std::fmt::Write as _;
    let _ = writeln!(s, "memory:");
    let _ = writeln!(
        s,
        "  vm: overcommit_memory {:?} overcommit_ratio {:?} swappiness {:?} max_map_count {:?}",
        m.vm.overcommit_memory, m.vm.overcommit_ratio, m.vm.swappiness, m.vm.max_map_count
    );
    for p in &m.hugepages {
        let _ = writeln!(s, "  hugepages {} kB: {}", p.page_size_kb, p.nr_hugepages);
    }
    for r in &m.regions {
        let _ = writeln!(
            s,
            "  region {} ({:?}): {} bytes seals {:#x} crc32 {:08x} sha256 {}",
            r.token,
            r.name,
            r.digest.len,
            r.seals,
            r.digest.crc32,
            hex::encode(r.digest.sha256)
        );
    }
}

fn render_device(s: &mut String, d: &DeviceState) {
    use std::fmt::Write as _;
    let _ = writeln!(s, "interfaces: {}", d.interfaces.len());
    for i in &d.interfaces {
        let addrs: Vec<String> = i.addresses.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            s,
            "  {} (#{}) {} mtu {} mac {} kind {} {}",
            i.name,
            i.index,
            if i.up { "up" } else { "down" },
            i.mtu.map_or_else(|| "-".into(), |m| m.to_string()),
            i.mac.as_deref().unwrap_or("-"),
            i.kind.as_deref().unwrap_or("-"),
            addrs.join(" ")
        );
    }
    let _ = writeln!(s, "routes: {}", d.routes.len());
    for r in &d.routes {
        let _ = writeln!(
            s,
            "  {} via {} dev {} table {} proto {}",
            r.destination
                .map_or_else(|| "default".into(), |p| p.to_string()),
            r.gateway.map_or_else(|| "-".into(), |g| g.to_string()),
            r.interface.as_deref().unwrap_or("-"),
            r.table,
            r.protocol
        );
    }
    let _ = writeln!(s, "pci devices: {}", d.pci.len());
    for p in &d.pci {
        let _ = writeln!(
            s,
            "  {} {}:{} class {} driver {}",
            p.address,
            p.vendor,
            p.device,
            p.class,
            p.driver.as_deref().unwrap_or("-")
        );
    }
    let _ = writeln!(s, "block devices: {}", d.block.len());
    for b in &d.block {
        let _ = writeln!(
            s,
            "  {} ({}) {} bytes{}",
            b.name,
            b.dev,
            b.size_bytes,
            if b.read_only { " ro" } else { "" }
        );
    }
    let _ = writeln!(s, "mounts: {}", d.mounts.len());
    for m in &d.mounts {
        let _ = writeln!(
            s,
            "  {} on {} type {} ({})",
            m.source, m.mount_point, m.fstype, m.mount_options
        );
    }
}

/// Why a capture file was not read.
#[derive(Debug)]
enum ReadRefusal {
    /// Missing, unreadable, or the read failed.
    Io(std::io::Error),
    /// A FIFO, device, socket or directory: refused before it is opened.
    NotRegular(&'static str),
    /// Larger than [`MAX_CAPTURE_BYTES`] (`len` bytes, or more).
    TooLarge(u64),
}

impl std::fmt::Display for ReadRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadRefusal::Io(e) => write!(f, "{e}"),
            ReadRefusal::NotRegular(kind) => write!(
                f,
                "{kind}, not a regular file; state diff reads only regular files (save the capture to a file first)"
            ),
            ReadRefusal::TooLarge(len) => write!(
                f,
                "{len} bytes, more than the {MAX_CAPTURE_BYTES} bytes ({} MiB) state diff reads (docs/cli.md); refused unread",
                MAX_CAPTURE_BYTES >> 20
            ),
        }
    }
}

/// Reads a capture file: a regular file of at most [`MAX_CAPTURE_BYTES`], checked before it
/// is opened and again on the open descriptor (`upgrade_agent::verify::open_regular`: a
/// FIFO or a device is never read); the read stops one byte past the cap (a file growing
/// meanwhile).
fn read_capture(path: &Path) -> Result<String, ReadRefusal> {
    use upgrade_agent::verify::{OpenRefusal, open_regular};
    let (file, len) = open_regular(path, MAX_CAPTURE_BYTES).map_err(|e| match e {
        OpenRefusal::Io(e) => ReadRefusal::Io(e),
        OpenRefusal::Kind(kind) => ReadRefusal::NotRegular(kind),
        OpenRefusal::TooLarge { len } => ReadRefusal::TooLarge(len),
    })?;
    // Sized from the file, which is at most the cap.
    let mut text = String::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(MAX_CAPTURE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(ReadRefusal::Io)?;
    if text.len() as u64 > MAX_CAPTURE_BYTES {
        return Err(ReadRefusal::TooLarge(text.len() as u64));
    }
    Ok(text)
}

fn load(path: &Path) -> Result<Capture, Exit> {
    let text = read_capture(path).map_err(|e| {
        eprintln!("mk-upgrade state diff: {}: {e}", path.display());
        Exit::Io
    })?;
    codec::from_json(&text).map_err(|e| {
        eprintln!("mk-upgrade state diff: {}: {e}", path.display());
        Exit::Corrupt
    })
}

fn diff_files(a: &Path, b: &Path, json: bool) -> Exit {
    let (ca, cb) = match (load(a), load(b)) {
        (Ok(ca), Ok(cb)) => (ca, cb),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let changes = match diff::diff_captures(&ca, &cb) {
        Ok(c) => c,
        Err(e) => return fail("diff failed", &e, Exit::Internal),
    };
    if json {
        match serde_json::to_string_pretty(&changes) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("mk-upgrade state diff: cannot serialize: {e}");
                return Exit::Internal;
            }
        }
    } else if changes.is_empty() {
        println!("no differences");
    } else {
        for c in &changes {
            println!("{c}");
        }
        println!("{} difference(s)", changes.len());
    }
    if changes.is_empty() {
        Exit::Ok
    } else {
        Exit::Differs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../state-serializers/tests/fixtures/root")
    }

    #[test]
    fn capture_of_fixture_tree_renders_every_part() {
        let c = capture_at(&fixture_root(), &[], false, true).unwrap();
        assert!(c.tasks.is_none() && c.device.is_none());
        let text = render(&c);
        assert!(text.contains("swappiness Some(60)"), "{text}");
        assert!(text.contains("hugepages 2048 kB: 16"), "{text}");
        let e = capture_at(&fixture_root(), &[4249], false, false).unwrap_err();
        assert!(
            matches!(e, StateError::ProcessVanished { pid: 4249 }),
            "{e}"
        );
    }

    #[test]
    fn capture_of_a_real_child_and_diff_exit_codes() {
        let mut child = std::process::Command::new("/usr/bin/sleep")
            .arg("1000")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let c = capture_at(Path::new("/"), &[pid], false, true);
        let _ = child.kill();
        let _ = child.wait();
        let c = c.unwrap();
        let text = render(&c);
        assert!(text.contains(&format!("pid {pid} ")), "{text}");
        assert!(text.contains("/usr/bin/sleep"), "{text}");

        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.json");
        let b = dir.path().join("b.json");
        std::fs::write(&a, codec::to_json(&c).unwrap()).unwrap();
        assert_eq!(diff_files(&a, &a, false), Exit::Ok);
        let mut c2 = c.clone();
        c2.tasks.as_mut().unwrap().tasks[0].cwd = "/elsewhere".into();
        std::fs::write(&b, codec::to_json(&c2).unwrap()).unwrap();
        assert_eq!(diff_files(&a, &b, true), Exit::Differs);
        assert_eq!(
            diff_files(&a, &dir.path().join("missing.json"), false),
            Exit::Io
        );
        std::fs::write(&b, "{\"schema_version\": 2, \"tasks\": 5}").unwrap();
        assert_eq!(diff_files(&a, &b, false), Exit::Corrupt);
        let v1 = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../state-serializers/tests/fixtures/capture-v1.json");
        assert_eq!(diff_files(&v1, &v1, false), Exit::Ok);
    }

    /// Runs `diff_files(a, b)` on another thread; `None` if it did not end within 10 s
    /// (then `unblock` is called, so a thread stuck on a FIFO ends, and the test fails
    /// instead of hanging).
    fn diff_within(a: &Path, b: &Path, unblock: impl FnOnce()) -> Option<Exit> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (a2, b2) = (a.to_owned(), b.to_owned());
        std::thread::spawn(move || {
            let _ = tx.send(diff_files(&a2, &b2, false));
        });
        let r = rx.recv_timeout(std::time::Duration::from_secs(10)).ok();
        if r.is_none() {
            unblock();
        }
        r
    }

    /// Opens `fifo` for writing without blocking and closes it: a reader blocked in its
    /// open (or read) then sees end of file.
    fn release_fifo(fifo: &Path) {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo);
    }

    #[test]
    fn diff_refuses_fifos_devices_directories_and_oversized_files_unread() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("a.json");
        let c = capture_at(&fixture_root(), &[], false, true).unwrap();
        std::fs::write(&good, codec::to_json(&c).unwrap()).unwrap();
        assert_eq!(diff_files(&good, &good, false), Exit::Ok);

        // A FIFO with no writer: refused at once (it used to wait for a writer forever).
        let fifo = dir.path().join("b.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let started = std::time::Instant::now();
        let r = diff_within(&good, &fifo, || release_fifo(&fifo));
        assert_eq!(r, Some(Exit::Io), "a FIFO is refused, not waited on");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let r = diff_within(&fifo, &good, || release_fifo(&fifo));
        assert_eq!(r, Some(Exit::Io), "as either input");
        let e = read_capture(&fifo).unwrap_err();
        assert!(matches!(e, ReadRefusal::NotRegular("a FIFO")), "{e}");
        assert!(e.to_string().contains("not a regular file"), "{e}");

        // A device that never ends: refused without reading a byte (it used to grow
        // without bound: 11 GB of RSS for `state diff a.json /dev/zero`).
        let zero = Path::new("/dev/zero");
        assert_eq!(diff_within(&good, zero, || ()), Some(Exit::Io));
        let e = read_capture(zero).unwrap_err();
        assert!(
            matches!(e, ReadRefusal::NotRegular("a character device")),
            "{e}"
        );
        // A directory.
        assert_eq!(diff_files(&good, dir.path(), false), Exit::Io);
        assert!(matches!(
            read_capture(dir.path()),
            Err(ReadRefusal::NotRegular("a directory"))
        ));

        // A (sparse) file one byte over the cap: refused by its size, unread; it would
        // otherwise be read and then refused as malformed (exit 4).
        let big = dir.path().join("big.json");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_CAPTURE_BYTES + 1)
            .unwrap();
        assert_eq!(diff_files(&good, &big, false), Exit::Io);
        let e = read_capture(&big).unwrap_err();
        assert!(
            matches!(e, ReadRefusal::TooLarge(n) if n == MAX_CAPTURE_BYTES + 1),
            "{e}"
        );
        assert!(e.to_string().contains("64 MiB"), "{e}");

        // A symbolic link to a regular capture is read (the check follows it).
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert_eq!(diff_files(&good, &link, false), Exit::Ok);
    }
}
