//! End-to-end tests of `mk-demo-kv` (the real binary) and of the load generator: the
//! handover of the memfd and the listening socket to a new process, with a connection
//! queued while the old process is frozen, and the failure modes a user can hit.

#![deny(unsafe_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mk_demo_kv::kv_client::{self, ClientError, KvClient};
use mk_demo_kv::loadgen::{LoadGen, LoadOptions};
use mk_demo_kv::log::{FORMAT_VERSION, HEADER_LEN, MAX_KEY_LEN, OFF_INDEX_ROOT};
use mk_demo_kv::server::{PRELOAD_VALUE_LEN, preload_value};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_mk-demo-kv");
const T: Duration = Duration::from_secs(10);

/// A running server; killed when dropped.
struct Kv {
    child: Child,
    addr: SocketAddr,
    memfd: RawFd,
}

impl Kv {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn client(&self) -> KvClient {
        KvClient::connect(self.addr, T).unwrap()
    }

    fn kill(&mut self) {
        let _ = kill(self.pid(), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Kv {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A command for the binary that inherits `fds` under their names in MK_STATE_FDS.
fn command(args: &[&str], fds: &[(&str, RawFd)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !fds.is_empty() {
        let value = fds
            .iter()
            .map(|(n, fd)| format!("{n}:{fd}"))
            .collect::<Vec<_>>()
            .join(",");
        cmd.env("MK_STATE_FDS", value);
        // Cleared FD_CLOEXEC in the child only, so the fds survive its exec.
        mk_demo_kv::sys::inherit_fds(&mut cmd, fds.iter().map(|(_, fd)| *fd).collect());
    }
    cmd
}

/// Starts the server and waits for its `LISTENING <addr> MEMFD <fd>` line.
fn spawn(args: &[&str], fds: &[(&str, RawFd)]) -> Kv {
    let mut child = command(args, fds).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    // Drain stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut BufReader::new(stderr), &mut std::io::sink());
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let parts: Vec<&str> = line.split_whitespace().collect();
    let ["LISTENING", addr, "MEMFD", fd] = parts[..] else {
        let _ = child.kill();
        panic!("unexpected first line {line:?}");
    };
    let kv = Kv {
        child,
        addr: addr.parse().unwrap(),
        memfd: fd.parse().unwrap(),
    };
    assert!(kv.memfd >= 3);
    kv
}

/// Runs the server expecting it to refuse to start (bounded: a server that starts after
/// all is killed and the test fails); returns its status and stderr.
fn spawn_failing(args: &[&str], fds: &[(&str, RawFd)]) -> (ExitStatus, String) {
    run_failing(command(args, fds))
}

fn run_failing(mut cmd: Command) -> (ExitStatus, String) {
    let mut child = cmd.spawn().unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mk-demo-kv started instead of refusing: {}",
                out.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out.join().unwrap();
    assert!(stdout.is_empty(), "printed {stdout:?}");
    (status, err.join().unwrap())
}

fn test_memfd() -> File {
    File::from(
        memfd_create(
            "demo-kv-test",
            MFdFlags::MFD_ALLOW_SEALING | MFdFlags::MFD_CLOEXEC,
        )
        .unwrap(),
    )
}

/// Waits until every thread of `pid` is stopped (SIGSTOP is delivered asynchronously).
fn wait_stopped(pid: Pid) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        let all_stopped = tasks.flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .map(|(_, s)| s.trim_start().chars().next());
            matches!(state, Some(Some('T' | 't')))
        });
        if all_stopped {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn set_get_ping_stats_and_http_health() {
    let kv = spawn(&[], &[]);
    let mut c = kv.client();
    assert_eq!(c.set("alpha", "1").unwrap(), 1);
    assert_eq!(c.set("beta", "2").unwrap(), 2);
    assert_eq!(c.set("alpha", "3").unwrap(), 3);
    assert_eq!(c.get("alpha").unwrap().as_deref(), Some("3"));
    assert_eq!(c.get("nope").unwrap(), None);
    c.ping().unwrap();
    let stats = c.stats().unwrap();
    let stat = |k: &str| stats.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    assert_eq!(stat("keys"), Some(2));
    assert_eq!(stat("records"), Some(3));
    assert_eq!(stat("capacity"), Some(64 << 20));
    kv_client::health_check(kv.addr, T).unwrap();
    assert_eq!(kv_client::http_health(kv.addr, T).unwrap(), 200);
    // Other HTTP paths are not found.
    let mut s = TcpStream::connect(kv.addr).unwrap();
    s.write_all(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.0 404 Not Found\r\n"), "{resp}");
}

#[test]
fn sigterm_exits_zero() {
    let mut kv = spawn(&[], &[]);
    kill(kv.pid(), Signal::SIGTERM).unwrap();
    let status = kv.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn handover_keeps_every_write_and_the_queued_connection() {
    let memfd = test_memfd();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fds = [
        ("kv-data", memfd.as_raw_fd()),
        ("listen", listener.as_raw_fd()),
    ];

    let mut old = spawn(&[], &fds);
    assert_eq!(
        old.addr, addr,
        "the old instance must serve the handed-over listener"
    );
    let count = 300;
    let mut client = old.client();
    for i in 0..count {
        assert_eq!(
            client.set(&format!("key{i}"), &format!("v{i}")).unwrap(),
            i + 1
        );
    }
    // An overwrite: the successor must see the latest value.
    client.set("key0", "latest").unwrap();
    drop(client);

    kill(old.pid(), Signal::SIGSTOP).unwrap();
    wait_stopped(old.pid());
    // The kernel completes the handshake from the backlog while the old one is frozen.
    let mut queued = TcpStream::connect(addr).unwrap();
    queued.set_read_timeout(Some(T)).unwrap();
    queued.write_all(b"GET key0\nPING\n").unwrap();

    let new = spawn(&[], &fds);
    assert_eq!(new.addr, addr);
    old.kill();

    let mut reader = BufReader::new(queued);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "VALUE latest\n");
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "PONG\n");

    let mut client = new.client();
    for i in 1..count {
        assert_eq!(
            client.get(&format!("key{i}")).unwrap(),
            Some(format!("v{i}")),
            "key{i}"
        );
    }
    // The log continues where the old instance stopped.
    assert_eq!(client.set("after", "x").unwrap(), count + 2);
    let stats = client.stats().unwrap();
    assert!(stats.contains(&("keys".into(), count + 1)), "{stats:?}");
}

#[test]
fn aborted_handover_thawed_instance_serves_the_successors_writes() {
    let memfd = test_memfd();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fds = [
        ("kv-data", memfd.as_raw_fd()),
        ("listen", listener.as_raw_fd()),
    ];
    let old = spawn(&[], &fds);
    let mut client = old.client();
    client.set("before", "1").unwrap();
    kill(old.pid(), Signal::SIGSTOP).unwrap();
    wait_stopped(old.pid());
    let mut new = spawn(&[], &fds);
    // The successor acknowledges writes, then the move is aborted.
    let mut to_new = new.client();
    assert_eq!(to_new.set("during", "2").unwrap(), 2);
    new.kill();
    kill(old.pid(), Signal::SIGCONT).unwrap();
    // The thawed instance sees them on its existing connection and continues the log.
    assert_eq!(client.get("during").unwrap().as_deref(), Some("2"));
    assert_eq!(client.set("after", "3").unwrap(), 3);
    assert_eq!(client.get("before").unwrap().as_deref(), Some("1"));
}

#[test]
fn non_blocking_handed_listener_is_served() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let kv = spawn(&[], &[("listen", listener.as_raw_fd())]);
    for _ in 0..3 {
        kv_client::health_check(kv.addr, T).unwrap();
    }
}

#[test]
fn corrupt_record_refuses_to_start() {
    let memfd = test_memfd();
    let fds = [("kv-data", memfd.as_raw_fd())];
    let mut a = spawn(&[], &fds);
    a.client().set("key", "value").unwrap();
    a.kill();
    // Flip the first value byte of the first record (after key_len u16, value_len u32, key).
    let off = (HEADER_LEN + 6 + 3) as i64;
    nix::sys::uio::pwrite(&memfd, b"V", off).unwrap();
    let (status, stderr) = spawn_failing(&[], &fds);
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("record #0 at byte offset 64") && stderr.contains("CRC32"),
        "{stderr}"
    );
}

fn stat(kv: &Kv, name: &str) -> u64 {
    let stats = kv.client().stats().unwrap();
    stats.iter().find(|(n, _)| n == name).unwrap().1
}

/// Every preloaded key answers its value.
fn check_preload(kv: &Kv, keys: u64) {
    let mut c = kv.client();
    let names: Vec<String> = (0..keys).map(|n| format!("preload-{n}")).collect();
    let got = c.get_many(&names).unwrap();
    let mut want = vec![0u8; PRELOAD_VALUE_LEN];
    for (n, v) in got.iter().enumerate() {
        preload_value(n as u64, &mut want);
        assert_eq!(
            v.as_deref().map(str::as_bytes),
            Some(&want[..]),
            "preload-{n}"
        );
    }
}

#[test]
fn the_index_in_the_memfd_moves_with_it() {
    let memfd = test_memfd();
    let fds = [("kv-data", memfd.as_raw_fd())];
    let mut a = spawn(&["--preload-mib", "1"], &fds);
    let keys = stat(&a, "keys");
    assert!(keys > 900, "{keys}");
    a.client().set("preload-3", "rewritten").unwrap();
    a.kill();
    // Format 2 with an index region named by the root.
    let mut header = [0u8; HEADER_LEN];
    nix::sys::uio::pread(&memfd, &mut header, 0).unwrap();
    assert_eq!(header[8..12], FORMAT_VERSION.to_le_bytes());
    let root = u64::from_le_bytes(
        header[OFF_INDEX_ROOT..OFF_INDEX_ROOT + 8]
            .try_into()
            .unwrap(),
    );
    assert!(root > HEADER_LEN as u64);
    let mut b = spawn(&[], &fds);
    assert_eq!(stat(&b, "keys"), keys);
    assert_eq!(
        b.client().get("preload-3").unwrap().as_deref(),
        Some("rewritten")
    );
    check_preload(&b, 3);
    b.kill();
    // An index root that names nothing: the successor rebuilds the index from the log and
    // serves every key.
    nix::sys::uio::pwrite(&memfd, &7u64.to_le_bytes(), OFF_INDEX_ROOT as i64).unwrap();
    let c = spawn(&[], &fds);
    assert_eq!(stat(&c, "keys"), keys);
    check_preload(&c, 3);
    let mut cl = c.client();
    for n in 4..keys {
        assert!(
            cl.get(&format!("preload-{n}")).unwrap().is_some(),
            "preload-{n}"
        );
    }
}

#[test]
fn bad_handover_descriptors_are_refused() {
    // Not a memfd.
    let tmp = tempfile::tempfile().unwrap();
    let (status, stderr) = spawn_failing(&[], &[("kv-data", tmp.as_raw_fd())]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a memfd"), "{stderr}");
    // A memfd holding something else.
    let junk = test_memfd();
    nix::unistd::ftruncate(&junk, 8192).unwrap();
    let (status, stderr) = spawn_failing(&[], &[("kv-data", junk.as_raw_fd())]);
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("magic"), "{stderr}");
    // A listener that is not listening.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let conn = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (status, stderr) = spawn_failing(&[], &[("listen", conn.as_raw_fd())]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not listening"), "{stderr}");
    // Descriptor numbers that are not open in the server.
    for (name, what) in [("kv-data", "not a memfd"), ("listen", "not a listening")] {
        let mut cmd = command(&[], &[]);
        cmd.env("MK_STATE_FDS", format!("{name}:900"));
        let (status, stderr) = run_failing(cmd);
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("not an open descriptor") && stderr.contains(what),
            "{stderr}"
        );
    }
    // A malformed MK_STATE_FDS.
    let mut cmd = command(&[], &[]);
    cmd.env("MK_STATE_FDS", "kv-data:2");
    let (status, stderr) = run_failing(cmd);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("MK_STATE_FDS"), "{stderr}");
    // Bad sizes.
    let (status, stderr) = spawn_failing(&["--capacity", "2MiB", "--max-capacity", "1MiB"], &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("capacity"), "{stderr}");
}

#[test]
fn full_log_answers_err_and_keeps_serving() {
    let kv = spawn(&["--capacity", "4096", "--max-capacity", "8192"], &[]);
    let mut c = kv.client();
    let value = "v".repeat(1000);
    let mut acked = 0;
    let err = loop {
        match c.set(&format!("k{acked}"), &value) {
            Ok(_) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 100, "the log never filled");
    };
    match &err {
        ClientError::Server { reason, .. } => assert!(reason.contains("log full"), "{reason}"),
        other => panic!("expected ERR, got {other}"),
    }
    assert!(acked >= 7, "only {acked} writes fit in 8192 bytes");
    for i in 0..acked {
        assert_eq!(
            c.get(&format!("k{i}")).unwrap().as_deref(),
            Some(value.as_str())
        );
    }
    c.ping().unwrap();
    assert!(c.stats().unwrap().contains(&("capacity".into(), 8192)));
}

#[test]
fn malformed_requests_get_err() {
    let kv = spawn(&[], &[]);
    let mut c = kv.client();
    for (line, needle) in [
        ("", "empty command"),
        ("FLY away", "unknown command"),
        ("SET onlykey", "SET takes <key> <value>"),
        ("SET a b c", "SET takes"),
        ("GET", "GET takes <key>"),
        ("PING now", "PING takes no arguments"),
        ("SET k\u{7f} v", "byte 0x7f"),
    ] {
        match c.request(line) {
            Err(ClientError::Server { reason, .. }) => {
                assert!(reason.contains(needle), "{line:?} -> {reason}");
            }
            other => panic!("{line:?} -> {other:?}"),
        }
    }
    let long_key = "k".repeat(MAX_KEY_LEN + 1);
    assert!(matches!(
        c.set(&long_key, "v"),
        Err(ClientError::Server { .. })
    ));
    // The connection survives all of that.
    c.ping().unwrap();
    // A line beyond the limit is refused and the connection closed.
    let mut s = TcpStream::connect(kv.addr).unwrap();
    let huge = vec![b'x'; 70_000];
    let _ = s.write_all(&huge);
    let mut resp = String::new();
    let _ = BufReader::new(&s).read_line(&mut resp);
    assert!(resp.starts_with("ERR line too long"), "{resp}");
}

fn short_load() -> LoadOptions {
    LoadOptions {
        connections_per_target: 4,
        key_prefix: "t".into(),
        max_duration: Duration::from_secs(60),
        request_timeout: Duration::from_secs(10),
        reconnect_budget: Duration::from_secs(10),
        verify_budget: Duration::from_secs(30),
        ..LoadOptions::default()
    }
}

/// Waits (bounded) until the run has at least `min` acknowledged writes in total.
fn wait_acked(h: &mk_demo_kv::loadgen::LoadHandle, min: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let acked: u64 = h.progress().iter().map(|p| p.acked_writes).sum();
        if acked >= min {
            return acked;
        }
        assert!(
            Instant::now() < deadline,
            "only {acked} writes acknowledged"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn loadgen_against_one_server_loses_nothing() {
    let kv = spawn(&[], &[]);
    let h = LoadGen::start(vec![("kv".into(), kv.addr)], short_load()).unwrap();
    wait_acked(&h, 200);
    let r = h.stop();
    let t = &r.per_target[0];
    assert_eq!(t.name, "kv");
    assert!(t.acked_writes >= 200);
    assert_eq!(t.failed_requests, 0);
    assert_eq!(t.lost_writes, 0);
    assert_eq!(t.read_mismatches, 0);
    assert!(t.requests > t.acked_writes, "GETs were issued too");
    assert!(r.lossless());
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["per_target"][0]["lost_writes"], 0);
    assert_eq!(json["totals"]["acked_writes"], t.acked_writes);
    // The keys are really on the server.
    let stats = kv.client().stats().unwrap();
    assert!(
        stats.contains(&("keys".into(), t.acked_writes)),
        "{stats:?}"
    );
}

#[test]
fn loadgen_through_a_handover_loses_nothing() {
    let memfd = test_memfd();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fds = [
        ("kv-data", memfd.as_raw_fd()),
        ("listen", listener.as_raw_fd()),
    ];
    let mut a = spawn(&[], &fds);
    let h = LoadGen::start(vec![("kv".into(), addr)], short_load()).unwrap();
    let before = wait_acked(&h, 100);
    kill(a.pid(), Signal::SIGSTOP).unwrap();
    wait_stopped(a.pid());
    let _b = spawn(&[], &fds);
    a.kill();
    // The new process serves the clients.
    wait_acked(&h, before + 100);
    let r = h.stop();
    let t = &r.per_target[0];
    assert_eq!(t.lost_writes, 0, "{r:?}");
    assert_eq!(t.unverified_writes, 0, "{r:?}");
    assert_eq!(t.read_mismatches, 0, "{r:?}");
    assert_eq!(t.gave_up_connections, 0, "{r:?}");
    assert!(r.lossless());
}

#[test]
fn loadgen_detects_lost_writes_when_the_data_is_not_handed_over() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let memfd = test_memfd();
    let mut a = spawn(
        &[],
        &[
            ("kv-data", memfd.as_raw_fd()),
            ("listen", listener.as_raw_fd()),
        ],
    );
    let h = LoadGen::start(vec![("kv".into(), addr)], short_load()).unwrap();
    wait_acked(&h, 100);
    a.kill();
    // Every write acknowledged so far was acknowledged by A.
    let acked_by_a: u64 = h.progress().iter().map(|p| p.acked_writes).sum();
    // B gets the listener but a fresh, empty store.
    let _b = spawn(&[], &[("listen", listener.as_raw_fd())]);
    wait_acked(&h, acked_by_a + 50);
    let r = h.stop();
    let t = &r.per_target[0];
    // A response already in a socket buffer at the kill may be counted after the snapshot:
    // at least the snapshot is lost, and the writes B acknowledged are not.
    assert!(t.lost_writes >= acked_by_a, "{r:?}");
    assert!(t.lost_writes < t.acked_writes, "{r:?}");
    assert_eq!(t.lost_examples.len(), 10);
    assert!(!r.lossless());
    assert_eq!(r.totals.lost_writes, t.lost_writes);
}

/// A notify socket the test listens on (the supervisor's end), in its own directory.
struct Notify {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    sock: std::os::unix::net::UnixDatagram,
}

impl Notify {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(T)).unwrap();
        Self {
            _dir: dir,
            path,
            sock,
        }
    }

    /// One datagram: its text and the descriptors attached (left open in this process:
    /// the test hands them on by number).
    fn recv(&self) -> (String, Vec<RawFd>) {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 16]);
        let msg = recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(r) = c {
                fds.extend(r);
            }
        }
        let n = msg.bytes;
        (String::from_utf8_lossy(&buf[..n]).into_owned(), fds)
    }
}

/// Starts a server with NOTIFY_SOCKET (the hand-over needs it) and the given descriptors.
fn spawn_notified(notify: &Notify, fds: &[(&str, RawFd)]) -> Kv {
    let mut cmd = command(&[], fds);
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut BufReader::new(stderr), &mut std::io::sink());
    });
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let parts: Vec<&str> = line.split_whitespace().collect();
    let ["LISTENING", addr, "MEMFD", fd] = parts[..] else {
        let _ = child.kill();
        panic!("unexpected first line {line:?}");
    };
    Kv {
        child,
        addr: addr.parse().unwrap(),
        memfd: fd.parse().unwrap(),
    }
}

/// A client connection that sends one line and reads one answer.
fn ask(r: &mut BufReader<TcpStream>, line: &str) -> String {
    r.get_mut().write_all(line.as_bytes()).unwrap();
    let mut answer = String::new();
    r.read_line(&mut answer).unwrap();
    answer
}

/// SIGUSR2: both established connections (one mid-conversation, one idle) are handed over
/// at a request boundary, then MK_HANDOFF=1. A request sent after that waits in the
/// kernel for the next copy, which answers it on the same connection.
#[test]
fn sigusr2_hands_established_connections_to_the_next_copy() {
    let notify = Notify::new();
    let memfd = test_memfd();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fds = [
        ("kv-data", memfd.as_raw_fd()),
        ("listen", listener.as_raw_fd()),
    ];
    let mut old = spawn_notified(&notify, &fds);
    let mut busy = BufReader::new(TcpStream::connect(old.addr).unwrap());
    busy.get_ref().set_read_timeout(Some(T)).unwrap();
    assert_eq!(ask(&mut busy, "SET a 1\n"), "OK 1\n");
    let idle = TcpStream::connect(old.addr).unwrap();
    // The idle connection is accepted before the hand-over asks for it.
    let mut probe = BufReader::new(idle.try_clone().unwrap());
    probe.get_ref().set_read_timeout(Some(T)).unwrap();
    assert_eq!(ask(&mut probe, "PING\n"), "PONG\n");

    kill(old.pid(), Signal::SIGUSR2).unwrap();
    let mut handed = Vec::new();
    loop {
        let (text, fds) = notify.recv();
        if text == "MK_HANDOFF=1\n" {
            assert!(fds.is_empty());
            break;
        }
        assert_eq!(text, "FDSTORE=1\nFDNAME=connection\n");
        assert_eq!(fds.len(), 1, "one connection per message");
        handed.extend(fds);
    }
    assert_eq!(handed.len(), 2, "both connections handed over");

    // The old copy reads nothing more: the request waits in the socket.
    busy.get_mut().write_all(b"GET a\n").unwrap();
    busy.get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut answer = String::new();
    assert!(busy.read_line(&mut answer).is_err(), "answered: {answer:?}");
    busy.get_ref().set_read_timeout(Some(T)).unwrap();

    // As the supervisor does: freeze the old copy, start the next with the connections.
    kill(old.pid(), Signal::SIGSTOP).unwrap();
    wait_stopped(old.pid());
    let names: Vec<String> = (1..=handed.len())
        .map(|i| format!("connection-{i}"))
        .collect();
    let mut next_fds: Vec<(&str, RawFd)> = fds.to_vec();
    next_fds.extend(names.iter().map(String::as_str).zip(handed.iter().copied()));
    let new = spawn_notified(&notify, &next_fds);
    old.kill();
    // The waiting request is answered by the new copy, on the same connection.
    let mut answer = String::new();
    busy.read_line(&mut answer).unwrap();
    assert_eq!(answer, "VALUE 1\n");
    assert_eq!(ask(&mut busy, "SET b 2\n"), "OK 2\n");
    assert_eq!(ask(&mut probe, "GET b\n"), "VALUE 2\n");
    drop(new);
}

/// SIGCONT after a hand-over (the move was cancelled): the old copy serves its
/// connections again, the request that waited meanwhile included, and accepts again.
#[test]
fn sigcont_takes_the_connections_back() {
    let notify = Notify::new();
    let old = spawn_notified(&notify, &[]);
    let mut c = BufReader::new(TcpStream::connect(old.addr).unwrap());
    c.get_ref().set_read_timeout(Some(T)).unwrap();
    assert_eq!(ask(&mut c, "SET k v\n"), "OK 1\n");
    kill(old.pid(), Signal::SIGUSR2).unwrap();
    let (text, fds) = notify.recv();
    assert_eq!(
        (text.as_str(), fds.len()),
        ("FDSTORE=1\nFDNAME=connection\n", 1)
    );
    assert_eq!(notify.recv().0, "MK_HANDOFF=1\n");
    c.get_mut().write_all(b"GET k\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    kill(old.pid(), Signal::SIGCONT).unwrap();
    let mut answer = String::new();
    c.read_line(&mut answer).unwrap();
    assert_eq!(answer, "VALUE v\n");
    // New connections are accepted again.
    assert_eq!(old.client().get("k").unwrap().as_deref(), Some("v"));
}

/// Standby start: with MK_STANDBY_FD the server says READY, waits for its descriptors in
/// one packet (names, comma-separated, fds attached), then serves the handed-over data and
/// listener; a socket closed first ends it with status 0.
#[test]
fn standby_start_waits_for_its_descriptors() {
    use nix::sys::socket::{
        AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, recv, sendmsg, socketpair,
    };
    let start = || {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let mut cmd = command(&[], &[]);
        cmd.env("MK_STANDBY_FD", theirs.as_raw_fd().to_string());
        mk_demo_kv::sys::inherit_fds(&mut cmd, vec![theirs.as_raw_fd()]);
        let child = cmd.spawn().unwrap();
        drop(theirs);
        let mut buf = [0u8; 16];
        let n = recv(ours.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        assert_eq!(&buf[..n], b"READY");
        (child, ours)
    };

    // Data written by a first server, handed to the standby with the listener.
    let memfd = test_memfd();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fds = [
        ("kv-data", memfd.as_raw_fd()),
        ("listen", listener.as_raw_fd()),
    ];
    let mut first = spawn(&[], &fds);
    first.client().set("kept", "yes").unwrap();
    first.kill();

    let (mut child, ours) = start();
    // A client that connects now waits in the backlog: the standby has no listener yet.
    let mut c = KvClient::connect(addr, T).unwrap();
    let raw = [memfd.as_raw_fd(), listener.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [std::io::IoSlice::new(b"kv-data,listen")];
    sendmsg::<()>(ours.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
    assert_eq!(c.get("kept").unwrap().as_deref(), Some("yes"));
    assert_eq!(c.set("after", "1").unwrap(), 2);
    let _ = child.kill();
    let _ = child.wait();

    // Cancelled: the socket closes before any descriptor came.
    let (mut child, ours) = start();
    drop(ours);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status}");

    // Names that do not match the descriptors: refused (exit 2).
    let (mut child, ours) = start();
    let iov = [std::io::IoSlice::new(b"kv-data,listen")];
    let raw = [memfd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    sendmsg::<()>(ours.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "{status}");
}
