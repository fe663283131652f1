//! Unmodified services survive an upgrade: real Debian packages (lighttpd, redis-server,
//! python3's http.server) and one small standard-library service using the fd store
//! (`tests/services/notify-counter.py`), each run under `mk-upgrade` on a fresh emulated
//! machine and upgraded from kernel A to kernel B while a load generator (threads of this
//! process) talks to it. Each test prints its counts (requests ok / failed / refused
//! connections / acknowledged writes lost) and asserts the outcome the workload's `mode`
//! promises (`docs/workloads.md`):
//!
//! * `socket-activation` (lighttpd; notify-counter with `notify` health and the fd store):
//!   upgraded, no connection refused, no request failed, state kept;
//! * `restart` (python http.server; redis with an append-only file): upgraded, the port is
//!   closed for a while (refused connections counted, the closed window reported by the
//!   record), nothing acknowledged is lost, the new copy started from the declared spec;
//! * refused at pre-flight (exit 8), nothing changed, the old copy serving: redis in
//!   `handover` mode with a listening socket it did not declare; a `tcp` health check in
//!   `handover` mode;
//! * supervision after the move: `restart = "on-failure"` restarts a killed workload,
//!   `restart = "no"` leaves it exited.
//!
//! Needs root, cgroup v2 and the packages (`bash tests/services/install.sh`, run by
//! `.ci/run`); a test that lacks any prints `SKIP <test>: <reason>` and is counted as ignored.
//! The tests run one at a time (unless `--test-threads` says otherwise): their counts are
//! load measurements on a small machine.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Completion, Trial};
use mk_integration_tests::{Machine, Run, active};
use serde_json::Value;

/// What a test needs from this host besides the workspace binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Lighttpd,
    Redis,
    Python,
    /// CRIU >= 4.2 that passes `criu check` on this kernel (deploy/install-criu.sh).
    Criu,
}

const LIGHTTPD: &str = "/usr/sbin/lighttpd";
const REDIS_SERVER: &str = "/usr/bin/redis-server";
const REDIS_CLI: &str = "/usr/bin/redis-cli";
const PYTHON: &str = "/usr/bin/python3";

/// Generous: a health check retries until then (the workload's start-up included).
const HEALTH_TIMEOUT_MS: u64 = 5000;
/// Load threads of the socket-activation HTTP test (each has at most one request in flight).
const HTTP_LOAD_THREADS: usize = 2;
/// Longest wait for anything the tests poll for.
const WAIT: Duration = Duration::from_secs(10);

type TestFn = fn();

fn main() {
    let mut args = Arguments::from_args();
    // Load measurements: one machine at a time unless asked otherwise.
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let tests: Vec<(&'static str, &'static [Need], TestFn)> = vec![
        (
            "lighttpd_socket_activation_refuses_no_connection",
            &[Need::Lighttpd],
            lighttpd_socket_activation_refuses_no_connection,
        ),
        (
            "python_http_server_restart_mode_reports_its_closed_window",
            &[Need::Python],
            python_http_server_restart_mode_reports_its_closed_window,
        ),
        (
            "redis_restart_mode_loses_no_acknowledged_write",
            &[Need::Redis],
            redis_restart_mode_loses_no_acknowledged_write,
        ),
        (
            "regression_redis_rewritten_title_restarts_from_the_spec",
            &[Need::Redis],
            regression_redis_rewritten_title_restarts_from_the_spec,
        ),
        (
            "regression_redis_undeclared_listener_in_handover_mode_is_refused",
            &[Need::Redis],
            regression_redis_undeclared_listener_in_handover_mode_is_refused,
        ),
        (
            "regression_redis_tcp_health_in_handover_mode_is_refused",
            &[Need::Redis],
            regression_redis_tcp_health_in_handover_mode_is_refused,
        ),
        (
            "notify_counter_keeps_its_memfd_in_the_fd_store",
            &[Need::Python],
            notify_counter_keeps_its_memfd_in_the_fd_store,
        ),
        (
            "redis_checkpoint_mode_keeps_its_memory_and_a_held_connection",
            &[Need::Redis, Need::Criu],
            redis_checkpoint_mode_keeps_its_memory_and_a_held_connection,
        ),
        (
            "redis_checkpoint_mode_a_failed_restore_rolls_back_to_the_checkpoint",
            &[Need::Redis, Need::Criu],
            redis_checkpoint_mode_a_failed_restore_rolls_back_to_the_checkpoint,
        ),
        (
            "redis_checkpoint_mode_a_failed_dump_leaves_the_old_copy_serving",
            &[Need::Redis],
            redis_checkpoint_mode_a_failed_dump_leaves_the_old_copy_serving,
        ),
        (
            "supervision_restarts_on_failure_and_leaves_restart_no_exited",
            &[Need::Python],
            supervision_restarts_on_failure_and_leaves_restart_no_exited,
        ),
    ];
    // Each skip is printed after the run ("SKIP <test>: <reason>"): printed from inside the
    // trial it would split libtest's own "test <name> ... ignored (<reason>)" line, which
    // tests/run-all.sh lists in its summary.
    let skipped: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let trials = tests
        .into_iter()
        .map(|(name, needs, f)| {
            let skipped = skipped.clone();
            Trial::ignorable_test(name, move || {
                if let Some(reason) = missing(needs) {
                    skipped
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(format!("SKIP {name}: {reason}"));
                    return Ok(Completion::ignored_with(reason));
                }
                f();
                Ok(Completion::Completed)
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    for line in skipped
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        println!("{line}");
    }
    conclusion.exit();
}

/// Why this host cannot run a test that needs `needs`, or `None`.
fn missing(needs: &[Need]) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (cgroup v2 freezing of the emulated instances)".into());
    }
    if upgrade_agent::sys::cgroup::cgroup2_mount().is_none() {
        return Some("needs a cgroup v2 hierarchy (none is mounted)".into());
    }
    let install = "run `bash tests/services/install.sh` as root";
    for need in needs {
        let files: &[&str] = match need {
            Need::Lighttpd => &[LIGHTTPD],
            Need::Redis => &[REDIS_SERVER, REDIS_CLI],
            Need::Python => &[PYTHON],
            Need::Criu => {
                use upgrade_agent::host::checkpoint;
                let Some(criu) = checkpoint::criu_path() else {
                    return Some(
                        "CRIU is not installed (run `bash deploy/install-criu.sh` as root)".into(),
                    );
                };
                match checkpoint::criu_version(&criu) {
                    Some(v) if v >= checkpoint::MIN_VERSION => {}
                    v => {
                        return Some(format!(
                            "{} is version {v:?}, older than {:?} (run `bash deploy/install-criu.sh`)",
                            criu.display(),
                            checkpoint::MIN_VERSION
                        ));
                    }
                }
                let ok = std::process::Command::new(&criu)
                    .arg("check")
                    .output()
                    .is_ok_and(|o| o.status.success());
                if !ok {
                    return Some(format!("`{} check` fails on this kernel", criu.display()));
                }
                continue;
            }
        };
        for f in files {
            if !Path::new(f).is_file() {
                return Some(format!("{f} is not installed ({install})"));
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// The machine

/// A TOML basic string (JSON's string syntax is a subset of it).
fn q(s: impl AsRef<str>) -> String {
    serde_json::to_string(s.as_ref()).unwrap()
}

fn q_path(p: &Path) -> String {
    q(p.to_str().expect("UTF-8 path"))
}

/// A TOML array of strings.
fn q_list<S: AsRef<str>>(items: &[S]) -> String {
    let v: Vec<String> = items.iter().map(q).collect();
    format!("[{}]", v.join(", "))
}

/// A fresh emulated machine (trusted key, kernels A and B) with `ports` free loopback ports
/// reserved for it and the workload file `toml(&machine)` written (not booted).
fn machine(ports: usize, toml: impl FnOnce(&Machine) -> String) -> Machine {
    let m = Machine::new(ports);
    let text = toml(&m);
    println!("--- workloads.toml\n{text}---");
    std::fs::write(m.path("state/workloads.toml"), text).unwrap();
    m
}

/// `emu init` with kernel A and more environment (which its instance inherits).
fn boot_env(m: &Machine, env: &[(&str, &str)]) {
    let r = m.run_env(
        &[
            "emu",
            "init",
            "--kernel",
            m.path("bzImage-7.2.13-mkA").to_str().unwrap(),
        ],
        env,
    );
    assert_eq!(r.code, 0, "emu init: {r:?}");
}

/// `emu init` with kernel A.
fn boot(m: &Machine) {
    boot_env(m, &[]);
}

/// `apply --kernel B --json` (signed); prints and returns the run and its record.
fn apply(m: &Machine) -> (Run, Value) {
    apply_env(m, &[])
}

/// [`apply`] with more environment (which the instance it creates inherits).
fn apply_env(m: &Machine, env: &[(&str, &str)]) -> (Run, Value) {
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    let t = Instant::now();
    let r = m.run_env(&["apply", "--kernel", b.to_str().unwrap(), "--json"], env);
    println!(
        "apply: exit {} after {:.2} s\n{}",
        r.code,
        t.elapsed().as_secs_f64(),
        r.stdout.trim()
    );
    if !r.stderr.trim().is_empty() {
        println!("apply stderr: {}", r.stderr.trim());
    }
    let doc = r.json();
    (r, doc)
}

/// Asserts that `apply` ended "upgraded" with exit 0.
fn assert_upgraded(r: &Run, doc: &Value) {
    assert_eq!(doc["result"], "upgraded", "apply: {r:?}");
    assert_eq!(r.code, 0, "apply: {r:?}");
    assert_eq!(doc["kernel_after"], "7.2.13-mkB", "{doc}");
}

/// Asserts that `apply` was refused at pre-flight (exit 8) and returns the failed checks'
/// names and details as one text.
fn assert_refused_at_preflight(r: &Run, doc: &Value) -> String {
    assert_eq!(r.code, 8, "apply must be refused at pre-flight: {r:?}");
    assert_eq!(doc["result"], "refused", "{r:?}");
    let error = doc["error"].as_str().unwrap_or_default();
    assert!(error.contains("pre-flight"), "{r:?}");
    let failed: Vec<String> = doc["checks"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter(|c| c["ok"] == false)
                .map(|c| format!("{}: {} (fix: {})", c["name"], c["detail"], c["fix"]))
                .collect()
        })
        .unwrap_or_default();
    assert!(!failed.is_empty(), "a failed check is named: {r:?}");
    format!("{error}; {}", failed.join("; "))
}

/// The workload `name` in the record's `workloads[]`.
fn record_workload<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["workloads"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["name"] == name))
        .unwrap_or_else(|| panic!("workload {name} is not in the record: {doc}"))
}

/// The workload `name` of the single active instance in `status --json`, asserting that
/// instance runs `kernel` and the workload is not frozen and in state "running"; its pid.
fn running_on_active(m: &Machine, name: &str, kernel: &str) -> i32 {
    let st = m.status();
    let (_, release, names) = active(&st);
    assert_eq!(release, kernel, "the active instance: {st}");
    assert!(names.iter().any(|n| n == name), "{name} runs there: {st}");
    let w = status_workload(&st, name);
    assert_eq!(w["state"], "running", "{name}: {w}");
    let pid = w["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("pid of {name}: {w}"));
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "{name}'s pid {pid} is alive"
    );
    pid as i32
}

/// The entry of workload `name` on the active instance of a `status --json` document.
fn status_workload(st: &Value, name: &str) -> Value {
    st["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "active")
        .flat_map(|i| i["workloads"].as_array().cloned().unwrap_or_default())
        .find(|w| w["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not on the active instance: {st}"))
}

/// Polls `f` every 50 ms until it gives `Some`, at most `WAIT`; panics naming `what`.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The executable of `pid`, resolved.
fn exe_of(pid: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

fn cmdline_of(pid: i32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
        .trim()
        .to_owned()
}

/// Asserts that `pid` runs `exec` (both resolved).
fn assert_runs(pid: i32, exec: &str) {
    assert_eq!(
        exe_of(pid),
        std::fs::canonicalize(exec).unwrap(),
        "pid {pid} ({})",
        cmdline_of(pid)
    );
}

/// The window during which a restart-mode workload's port was closed, in milliseconds, as
/// the upgrade record reports it for one workload (`closed_ms` in `apply --json` and
/// `history --json`: from the old copy's exit to the new copy passing its health check).
fn closed_window_ms(w: &Value) -> Option<f64> {
    w["closed_ms"].as_f64()
}

/// Asserts that the record reports a plausible closed window for the restart-mode workload
/// `w` (more than 0, less than 10 s) and that every refused connection the load saw falls
/// within one window of that length (50 ms of slack for the measurement); returns it.
fn assert_closed_window(w: &Value, counts: &Counts) -> f64 {
    let closed =
        closed_window_ms(w).unwrap_or_else(|| panic!("the record reports the closed window: {w}"));
    let measured = counts
        .refused_span
        .map_or(0.0, |(a, b)| b.saturating_sub(a).as_secs_f64() * 1000.0);
    println!(
        "reported closed window: {closed:.1} ms; refused connections measured: {} over {measured:.1} ms",
        counts.refused
    );
    assert!(
        closed > 0.0 && closed < 10_000.0,
        "closed window {closed} ms is plausible: {w}"
    );
    assert!(
        measured <= closed + 50.0,
        "connections were refused over {measured:.1} ms, longer than the reported closed window \
         ({closed:.1} ms): {w}"
    );
    closed
}

// ---------------------------------------------------------------------------------------
// Load

/// What a load generator saw.
#[derive(Debug, Default, Clone)]
struct Counts {
    /// Requests answered as expected.
    ok: u64,
    /// Requests on an accepted connection that failed (reset, timeout, bad answer).
    failed: u64,
    /// Connections refused (the port was closed).
    refused: u64,
    /// First and last refusal, since the load started.
    refused_span: Option<(Duration, Duration)>,
    /// The first failures, for the log.
    failures: Vec<String>,
}

impl Counts {
    fn merge(&mut self, o: Counts) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.refused += o.refused;
        self.refused_span = match (self.refused_span, o.refused_span) {
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            (x, y) => x.or(y),
        };
        for f in o.failures {
            if self.failures.len() < 5 {
                self.failures.push(f);
            }
        }
    }

    fn refused_at(&mut self, t: Duration) {
        self.refused += 1;
        self.refused_span = Some(match self.refused_span {
            Some((a, _)) => (a, t),
            None => (t, t),
        });
    }

    /// A failed request at `t` since the load started.
    fn failed(&mut self, t: Duration, why: String) {
        self.failed += 1;
        if self.failures.len() < 5 {
            self.failures
                .push(format!("at {:.3} s of the load: {why}", t.as_secs_f64()));
        }
    }

    fn print(&self, what: &str) {
        let span = self.refused_span.map_or_else(String::new, |(a, b)| {
            format!(
                " (refusals from {:.3} s to {:.3} s of the load: {:.0} ms)",
                a.as_secs_f64(),
                b.as_secs_f64(),
                b.saturating_sub(a).as_secs_f64() * 1000.0
            )
        });
        println!(
            "{what}: {} requests ok, {} failed, {} refused connections{span}",
            self.ok, self.failed, self.refused
        );
        for f in &self.failures {
            println!("  failure: {f}");
        }
    }
}

/// Background load threads; stopped (and joined) by `finish`, stopped on drop.
struct Load<T: Send + 'static> {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<T>>,
    /// When it started (the origin of the times its counts report).
    start: Instant,
}

/// No load thread runs longer than this, whatever happens to the test.
const LOAD_LIMIT: Duration = Duration::from_secs(60);

impl<T: Send + 'static> Load<T> {
    fn start(
        n: usize,
        f: impl Fn(usize, &AtomicBool, Instant) -> T + Send + Sync + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let f = Arc::new(f);
        let start = Instant::now();
        let threads = (0..n)
            .map(|i| {
                let stop = stop.clone();
                let f = f.clone();
                std::thread::spawn(move || f(i, &stop, start))
            })
            .collect();
        Load {
            stop,
            threads,
            start,
        }
    }

    fn finish(mut self) -> Vec<T> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .drain(..)
            .map(|t| t.join().expect("load thread"))
            .collect()
    }
}

impl<T: Send + 'static> Drop for Load<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn keep_going(stop: &AtomicBool, start: Instant) -> bool {
    !stop.load(Ordering::SeqCst) && start.elapsed() < LOAD_LIMIT
}

/// How one HTTP request ended.
#[derive(Debug)]
enum HttpError {
    Refused,
    Failed(String),
}

/// `GET path` on a fresh connection (HTTP/1.0: the server closes it); the status and body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), HttpError> {
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Err(HttpError::Refused),
        Err(e) => return Err(HttpError::Failed(format!("connect: {e}"))),
    };
    let fail = |what: &str, e: std::io::Error| HttpError::Failed(format!("{what}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| fail("timeout", e))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| fail("write", e))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| fail("read", e))?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| HttpError::Failed(format!("not an HTTP answer: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// HTTP GET load on fresh connections from `threads` threads, expecting 200 and (if given)
/// a body equal to `expect_body`.
fn http_load(
    addr: SocketAddr,
    path: &'static str,
    expect_body: Option<&'static str>,
    threads: usize,
) -> Load<Counts> {
    Load::start(threads, move |_, stop, start| {
        let mut c = Counts::default();
        while keep_going(stop, start) {
            let sent = start.elapsed().as_secs_f64();
            match http_get(addr, path) {
                Ok((200, body)) if expect_body.is_none_or(|b| body == b) => c.ok += 1,
                Ok((status, body)) => c.failed(
                    start.elapsed(),
                    format!("status {status}, body {body:?} (sent at {sent:.3} s)"),
                ),
                Err(HttpError::Refused) => c.refused_at(start.elapsed()),
                Err(HttpError::Failed(why)) => {
                    c.failed(start.elapsed(), format!("{why} (sent at {sent:.3} s)"));
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        c
    })
}

fn merged(parts: Vec<Counts>) -> Counts {
    let mut all = Counts::default();
    for p in parts {
        all.merge(p);
    }
    all
}

/// Runs `apply` while `load` runs (it ran 300 ms before; it runs 300 ms after).
fn apply_under_load<T: Send + 'static>(m: &Machine, load: Load<T>) -> (Run, Value, Vec<T>) {
    std::thread::sleep(Duration::from_millis(300));
    let from = load.start.elapsed();
    let (r, doc) = apply(m);
    println!(
        "apply ran from {:.3} s to {:.3} s of the load (its events' t_ms count from the first)",
        from.as_secs_f64(),
        load.start.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_millis(300));
    (r, doc, load.finish())
}

/// Waits until `GET path` on `addr` answers 200.
fn wait_http(addr: SocketAddr, path: &str) {
    wait_for(&format!("http://{addr}{path} to answer 200"), || {
        matches!(http_get(addr, path), Ok((200, _))).then_some(())
    });
}

// ---------------------------------------------------------------------------------------
// A minimal RESP (redis) client

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

struct Resp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Resp {
    fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.set_nodelay(true)?;
        Ok(Resp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    fn cmd(&mut self, args: &[&str]) -> std::io::Result<Reply> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&out)?;
        self.read_reply()
    }

    fn read_line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "closed"));
        }
        Ok(line.trim_end_matches("\r\n").to_owned())
    }

    fn read_reply(&mut self) -> std::io::Result<Reply> {
        let line = self.read_line()?;
        let bad = || std::io::Error::new(ErrorKind::InvalidData, format!("RESP: {line:?}"));
        let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
        Ok(match kind {
            "+" => Reply::Simple(rest.to_owned()),
            "-" => Reply::Error(rest.to_owned()),
            ":" => Reply::Int(rest.parse().map_err(|_| bad())?),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut b = vec![0; n as usize + 2];
                    self.r.read_exact(&mut b)?;
                    b.truncate(n as usize);
                    Reply::Bulk(Some(b))
                }
            }
            "*" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                let mut v = Vec::new();
                for _ in 0..n.max(0) {
                    v.push(self.read_reply()?);
                }
                Reply::Array(v)
            }
            _ => return Err(bad()),
        })
    }
}

/// One redis command on a fresh connection.
fn redis(addr: SocketAddr, args: &[&str]) -> std::io::Result<Reply> {
    Resp::connect(addr)?.cmd(args)
}

fn redis_ping(addr: SocketAddr) -> bool {
    matches!(redis(addr, &["PING"]), Ok(Reply::Simple(p)) if p == "PONG")
}

/// `SET pre<i> v<i>` for i in 0..n, each acknowledged.
fn redis_fill(addr: SocketAddr, prefix: &str, n: usize) -> Vec<(String, String)> {
    let mut c = Resp::connect(addr).unwrap();
    (0..n)
        .map(|i| {
            let (k, v) = (format!("{prefix}{i}"), format!("v{i}-{prefix}"));
            assert_eq!(c.cmd(&["SET", &k, &v]).unwrap(), Reply::Simple("OK".into()));
            (k, v)
        })
        .collect()
}

/// How many of the acknowledged `(key, value)` pairs redis at `addr` does not return.
fn redis_lost(addr: SocketAddr, acked: &[(String, String)]) -> (u64, Vec<String>) {
    let mut c = Resp::connect(addr).unwrap();
    let mut lost = 0;
    let mut examples = Vec::new();
    for (k, v) in acked {
        let got = c.cmd(&["GET", k]).unwrap();
        if got != Reply::Bulk(Some(v.clone().into_bytes())) {
            lost += 1;
            if examples.len() < 5 {
                examples.push(format!("{k}: {got:?}"));
            }
        }
    }
    (lost, examples)
}

/// What a redis writer saw: its counts and the pairs redis acknowledged.
#[derive(Debug, Default)]
struct Writes {
    counts: Counts,
    acked: Vec<(String, String)>,
}

/// One thread per `threads` doing `SET w<t>-<i> v<i>` on a persistent connection,
/// reconnecting when it breaks (a refused reconnect counts as a refused connection, a write
/// whose answer did not come as a failed request: not acknowledged, so not checked).
fn redis_writers(addr: SocketAddr, threads: usize) -> Load<Writes> {
    Load::start(threads, move |t, stop, start| {
        let mut w = Writes::default();
        let mut conn: Option<Resp> = None;
        let mut i = 0u64;
        while keep_going(stop, start) {
            std::thread::sleep(Duration::from_millis(1));
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match Resp::connect(addr) {
                    Ok(c) => conn.insert(c),
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        w.counts.refused_at(start.elapsed());
                        continue;
                    }
                    Err(e) => {
                        w.counts.failed(start.elapsed(), format!("connect: {e}"));
                        continue;
                    }
                },
            };
            let (k, v) = (format!("w{t}-{i}"), format!("v{i}-w{t}"));
            i += 1;
            match c.cmd(&["SET", &k, &v]) {
                Ok(Reply::Simple(ok)) if ok == "OK" => {
                    w.counts.ok += 1;
                    w.acked.push((k, v));
                }
                Ok(other) => w
                    .counts
                    .failed(start.elapsed(), format!("SET {k}: {other:?}")),
                Err(e) => {
                    w.counts.failed(start.elapsed(), format!("SET {k}: {e}"));
                    conn = None;
                }
            }
        }
        w
    })
}

fn merged_writes(parts: Vec<Writes>) -> Writes {
    let mut all = Writes::default();
    for p in parts {
        all.counts.merge(p.counts);
        all.acked.extend(p.acked);
    }
    all
}

/// The arguments of a redis with an fsynced append-only file in `dir`, on `port`.
fn redis_args(dir: &Path, port: u16, extra: &[&str]) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let mut a: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--dir",
        dir.to_str().unwrap(),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--daemonize",
        "no",
        "--logfile",
        dir.join("redis.log").to_str().unwrap(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    a.extend(extra.iter().map(|s| (*s).to_owned()));
    a
}

/// An exec health check that passes only when redis answers PONG (redis-cli exits 0 for
/// some error replies).
fn redis_pong_check(port: u16) -> String {
    q_list(&[
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        format!("{REDIS_CLI} -p {port} ping | grep -qx PONG"),
    ])
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// The tests

/// lighttpd (unmodified, `server.systemd-socket-activation`) in socket-activation mode:
/// the listening socket stays open across the move, so not one connection is refused and
/// not one request fails.
fn lighttpd_socket_activation_refuses_no_connection() {
    let m = machine(1, |m| {
        let a = m.addrs[0];
        let www = m.path("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("health"), "ok\n").unwrap();
        std::fs::write(www.join("index.html"), "hello from lighttpd\n").unwrap();
        let conf = m.path("lighttpd.conf");
        std::fs::write(
            &conf,
            format!(
                "server.document-root = {root}\n\
                 server.bind = \"127.0.0.1\"\n\
                 server.port = {port}\n\
                 server.systemd-socket-activation = \"enable\"\n\
                 server.errorlog = {log}\n\
                 index-file.names = ( \"index.html\" )\n\
                 mimetype.assign = ( \".html\" => \"text/html\", \"\" => \"text/plain\" )\n",
                root = q_path(&www),
                port = a.port(),
                log = q_path(&m.path("lighttpd-error.log")),
            ),
        )
        .unwrap();
        format!(
            "[[workload]]\nname = \"lighttpd\"\nexec = {LIGHTTPD:?}\nargs = [\"-D\", \"-f\", {conf}]\n\
             mode = \"socket-activation\"\n\
             [[workload.listen]]\nname = \"http\"\naddr = \"{a}\"\n\
             [workload.health]\nkind = \"http\"\naddr = \"{a}\"\npath = \"/health\"\ntimeout_ms = {HEALTH_TIMEOUT_MS}\n",
            conf = q_path(&conf)
        )
    });
    let a = m.addrs[0];
    boot(&m);
    wait_http(a, "/index.html");
    let before = running_on_active(&m, "lighttpd", "7.2.13-mkA");
    assert_runs(before, LIGHTTPD);

    let load = http_load(
        a,
        "/index.html",
        Some("hello from lighttpd\n"),
        HTTP_LOAD_THREADS,
    );
    let (r, doc, counts) = apply_under_load(&m, load);
    let counts = merged(counts);
    counts.print("lighttpd, socket-activation, GET on fresh connections");
    println!(
        "lighttpd error log:\n{}",
        tail(&m.path("lighttpd-error.log"))
    );
    assert_upgraded(&r, &doc);
    println!("record: {}", record_workload(&doc, "lighttpd"));

    let after = running_on_active(&m, "lighttpd", "7.2.13-mkB");
    assert_runs(after, LIGHTTPD);
    assert_ne!(after, before, "a new copy runs on the new instance");
    assert!(
        !Path::new(&format!("/proc/{before}")).exists()
            || std::fs::read_to_string(format!("/proc/{before}/status"))
                .is_ok_and(|s| s.contains("State:\tZ")),
        "the old copy is gone"
    );
    assert_eq!(
        http_get(a, "/index.html").map(|(s, _)| s).ok(),
        Some(200),
        "serves after the move"
    );
    assert!(counts.ok > 0, "the load ran");
    assert_eq!(counts.refused, 0, "no connection refused during the move");
    // Requests the old copy had already accepted when it was frozen die with it (measured:
    // 0 in most moves, 1 in about one of twenty; established connections need checkpoint
    // mode, reserved): at most one per load thread, each sent at the freeze. Anything more
    // would be a connection lost in the backlog, which socket activation must not do.
    assert!(
        counts.failed <= HTTP_LOAD_THREADS as u64,
        "at most the requests in flight at the freeze failed: {} failed",
        counts.failed
    );
}

/// python3 -m http.server (binds its own port) in restart mode: stopped on the old
/// instance, started from the spec on the new one; the port is closed meanwhile and the
/// record says for how long.
fn python_http_server_restart_mode_reports_its_closed_window() {
    let m = machine(1, |m| {
        let a = m.addrs[0];
        let www = m.path("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("health"), "ok\n").unwrap();
        std::fs::write(www.join("hello.txt"), "hello from python\n").unwrap();
        let args = [
            "-m".to_owned(),
            "http.server".to_owned(),
            "--bind".to_owned(),
            "127.0.0.1".to_owned(),
            a.port().to_string(),
            "--directory".to_owned(),
            www.to_str().unwrap().to_owned(),
        ];
        format!(
            "[[workload]]\nname = \"pyhttp\"\nexec = {PYTHON:?}\nargs = {args}\n\
             mode = \"restart\"\nstop_signal = \"SIGTERM\"\nstop_timeout_ms = 5000\n\
             [workload.health]\nkind = \"http\"\naddr = \"{a}\"\npath = \"/health\"\ntimeout_ms = {HEALTH_TIMEOUT_MS}\n",
            args = q_list(&args)
        )
    });
    let a = m.addrs[0];
    boot(&m);
    wait_http(a, "/hello.txt");
    let before = running_on_active(&m, "pyhttp", "7.2.13-mkA");

    let load = http_load(a, "/hello.txt", Some("hello from python\n"), 2);
    let (r, doc, counts) = apply_under_load(&m, load);
    let counts = merged(counts);
    counts.print("python http.server, restart mode, GET on fresh connections");
    assert_upgraded(&r, &doc);
    let w = record_workload(&doc, "pyhttp");
    println!("record: {w}");

    let after = running_on_active(&m, "pyhttp", "7.2.13-mkB");
    assert_ne!(after, before, "a new copy was started");
    assert_runs(after, PYTHON);
    assert!(
        cmdline_of(after).contains(&format!("http.server --bind 127.0.0.1 {}", a.port())),
        "started from the declared spec: {}",
        cmdline_of(after)
    );
    assert_eq!(
        http_get(a, "/hello.txt").map(|(s, _)| s).ok(),
        Some(200),
        "serves after the move"
    );
    assert!(counts.ok > 0, "the load ran");
    let closed = assert_closed_window(w, &counts);
    // The same record is kept in the history.
    let h = m.run(&["history", "--json"]).json();
    let last = h
        .as_array()
        .and_then(|h| h.last())
        .cloned()
        .unwrap_or_default();
    let hw = record_workload(&last, "pyhttp");
    assert_eq!(closed_window_ms(hw), Some(closed), "history: {hw}");
}

/// redis-server with an fsynced append-only file, restart mode: a writer keeps writing
/// through the move; every write redis acknowledged is there afterwards.
fn redis_restart_mode_loses_no_acknowledged_write() {
    let m = machine(1, |m| {
        let p = m.addrs[0].port();
        let args = redis_args(&m.path("redis"), p, &[]);
        format!(
            "[[workload]]\nname = \"redis\"\nexec = {REDIS_SERVER:?}\nargs = {args}\n\
             mode = \"restart\"\nstop_signal = \"SIGTERM\"\nstop_timeout_ms = 10000\n\
             [workload.health]\nkind = \"exec\"\ncommand = {check}\ntimeout_ms = {HEALTH_TIMEOUT_MS}\n",
            args = q_list(&args),
            check = redis_pong_check(p)
        )
    });
    let a = m.addrs[0];
    boot(&m);
    wait_for("redis to answer PING", || redis_ping(a).then_some(()));
    let before = running_on_active(&m, "redis", "7.2.13-mkA");
    let mut acked = redis_fill(a, "pre", 200);

    let (r, doc, writes) = apply_under_load(&m, redis_writers(a, 2));
    let writes = merged_writes(writes);
    writes
        .counts
        .print("redis, restart mode, SET on persistent connections");
    println!("redis log:\n{}", tail(&m.path("redis/redis.log")));
    assert_upgraded(&r, &doc);
    let w = record_workload(&doc, "redis");
    println!("record: {w}");

    let after = running_on_active(&m, "redis", "7.2.13-mkB");
    assert_ne!(after, before, "a new copy was started");
    assert_runs(after, REDIS_SERVER);
    acked.extend(writes.acked);
    let (lost, examples) = redis_lost(a, &acked);
    println!(
        "acknowledged writes: {} ({} during the move), lost: {lost} {examples:?}",
        acked.len(),
        writes.counts.ok
    );
    assert!(writes.counts.ok > 0, "the writers ran");
    assert_eq!(lost, 0, "no acknowledged write is lost: {examples:?}");
    assert_closed_window(w, &writes.counts);
}

/// The arguments of a redis that keeps its data in memory only, on `port`.
fn redis_memory_args(port: u16) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn redis_checkpoint_toml(port: u16) -> String {
    format!(
        "[[workload]]\nname = \"redis\"\nexec = {REDIS_SERVER:?}\nargs = {args}\n\
         mode = \"checkpoint\"\n\
         [workload.health]\nkind = \"exec\"\ncommand = {check}\ntimeout_ms = {HEALTH_TIMEOUT_MS}\n",
        args = q_list(&redis_memory_args(port)),
        check = redis_pong_check(port)
    )
}

/// redis-server with its data in memory only (no RDB, no AOF), unmodified, in checkpoint
/// mode: CRIU moves the process itself. Every key is there afterwards, served by a process
/// on the new instance, and a client connection opened before the move still answers after
/// it (`--tcp-established`).
fn redis_checkpoint_mode_keeps_its_memory_and_a_held_connection() {
    let m = machine(1, |m| redis_checkpoint_toml(m.addrs[0].port()));
    let a = m.addrs[0];
    boot(&m);
    wait_for("redis to answer PING", || redis_ping(a).then_some(()));
    let before = running_on_active(&m, "redis", "7.2.13-mkA");
    let acked = redis_fill(a, "mem", 2000);
    let mut held = Resp::connect(a).unwrap();
    assert_eq!(
        held.cmd(&["SET", "held", "before"]).unwrap(),
        Reply::Simple("OK".into())
    );

    let (r, doc) = apply(&m);
    assert_upgraded(&r, &doc);
    let w = record_workload(&doc, "redis");
    println!("record: {w}");
    assert_eq!(w["mode"], "checkpoint", "{w}");
    let after = running_on_active(&m, "redis", "7.2.13-mkB");
    assert_runs(after, REDIS_SERVER);
    println!("redis pid {before} on instance 1, {after} on instance 2 (restored by CRIU)");
    // The same connection, on the restored process.
    let got = held.cmd(&["GET", "held"]);
    assert!(
        matches!(got, Ok(Reply::Bulk(Some(ref v))) if v == b"before"),
        "the connection opened before the move: {got:?}"
    );
    let (lost, examples) = redis_lost(a, &acked);
    println!(
        "keys written before the move: {}, lost: {lost} {examples:?}",
        acked.len()
    );
    assert_eq!(
        lost, 0,
        "memory-only keys survive the checkpoint: {examples:?}"
    );
}

/// Checkpoint mode when the restore on the new instance fails (a wrapper around the real
/// CRIU, through MK_CRIU, fails the first `restore`): the upgrade rolls back, and the old
/// instance restores the same checkpoint: every key and the held connection are back there.
fn redis_checkpoint_mode_a_failed_restore_rolls_back_to_the_checkpoint() {
    let m = machine(1, |m| redis_checkpoint_toml(m.addrs[0].port()));
    let real = upgrade_agent::host::checkpoint::criu_path().expect("CRIU (checked by Need::Criu)");
    let flag = m.path("restore-failed-once");
    let wrapper = m.path("criu-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = restore ] && [ ! -e {flag} ]; then touch {flag}; exit 1; fi\nexec {real} \"$@\"\n",
            flag = flag.display(),
            real = real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let env = [("MK_CRIU", wrapper.to_str().unwrap())];
    let a = m.addrs[0];
    boot_env(&m, &env);
    wait_for("redis to answer PING", || redis_ping(a).then_some(()));
    let acked = redis_fill(a, "mem", 1000);
    let mut held = Resp::connect(a).unwrap();
    assert_eq!(
        held.cmd(&["SET", "held", "before"]).unwrap(),
        Reply::Simple("OK".into())
    );
    let (r, doc) = apply_env(&m, &env);
    assert_eq!(r.code, 10, "rolled back: {doc}");
    assert_eq!(doc["result"], "rolled-back", "{doc}");
    assert!(flag.exists(), "the failing restore ran");
    let error = doc["error"].as_str().unwrap_or_default();
    assert!(error.contains("criu restore failed"), "{error}");
    let back = running_on_active(&m, "redis", "7.2.13-mkA");
    assert_runs(back, REDIS_SERVER);
    let got = held.cmd(&["GET", "held"]);
    assert!(
        matches!(got, Ok(Reply::Bulk(Some(ref v))) if v == b"before"),
        "the connection opened before the move, after the rollback: {got:?}"
    );
    let (lost, examples) = redis_lost(a, &acked);
    assert_eq!(lost, 0, "{examples:?}");
}

/// Checkpoint mode when CRIU fails to dump (a stand-in `criu` that exits 1, through
/// MK_CRIU): the upgrade does not go on; the old copy keeps serving its memory.
fn redis_checkpoint_mode_a_failed_dump_leaves_the_old_copy_serving() {
    let m = machine(1, |m| redis_checkpoint_toml(m.addrs[0].port()));
    let fake = m.path("fake-criu");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"Error (fake): no dump today\" >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let a = m.addrs[0];
    boot_env(&m, &[("MK_CRIU", fake.to_str().unwrap())]);
    wait_for("redis to answer PING", || redis_ping(a).then_some(()));
    let before = running_on_active(&m, "redis", "7.2.13-mkA");
    let acked = redis_fill(a, "mem", 500);
    // `check` names what checkpoint mode lacks: no CRIU at all, then one that does not run.
    for (criu, want) in [
        ("/nonexistent/criu", "CRIU is not installed"),
        (fake.to_str().unwrap(), "--version does not run"),
    ] {
        let r = m.run_env(&["check"], &[("MK_CRIU", criu)]);
        let out = format!("{}{}", r.stdout, r.stderr);
        assert_eq!(r.code, 8, "check with MK_CRIU={criu}: {out}");
        assert!(
            out.contains("criu") && out.contains(want) && out.contains("deploy/install-criu.sh"),
            "{out}"
        );
    }
    // The real CRIU: its check passes here, and the kernel's options were looked at.
    let real = upgrade_agent::host::checkpoint::criu_path().expect("CRIU (checked by Need::Criu)");
    let r = m.run_env(&["check"], &[("MK_CRIU", real.to_str().unwrap())]);
    let out = format!("{}{}", r.stdout, r.stderr);
    let line = out
        .lines()
        .find(|l| l.contains("] criu"))
        .unwrap_or_default();
    assert!(
        line.contains("[ok") && line.contains("kernel options"),
        "{out}"
    );
    let (r, doc) = apply(&m);
    println!("apply: {r:?}\n{doc}");
    assert_ne!(r.code, 0, "a failed dump cannot end upgraded: {doc}");
    assert!(
        doc["result"] == "rolled-back" || doc["result"] == "refused",
        "{doc}"
    );
    let error = doc["error"].as_str().unwrap_or_default();
    assert!(error.contains("criu dump failed"), "{error}");
    assert_eq!(
        running_on_active(&m, "redis", "7.2.13-mkA"),
        before,
        "the same process serves"
    );
    let (lost, examples) = redis_lost(a, &acked);
    assert_eq!(lost, 0, "{examples:?}");
}

/// Regression: redis rewrites its process title ("redis-server 127.0.0.1:PORT"), so a copy
/// restarted from /proc/PID/cmdline would lose its arguments (port, dir, append-only
/// file). In restart mode with the plain `redis-cli ping` check the new copy must come from
/// the declared spec: upgraded, alive, data intact.
fn regression_redis_rewritten_title_restarts_from_the_spec() {
    let m = machine(1, |m| {
        let p = m.addrs[0].port();
        let args = redis_args(&m.path("redis"), p, &[]);
        let check = q_list(&[REDIS_CLI, "-p", &p.to_string(), "ping"]);
        format!(
            "[[workload]]\nname = \"redis\"\nexec = {REDIS_SERVER:?}\nargs = {args}\n\
             mode = \"restart\"\n\
             [workload.health]\nkind = \"exec\"\ncommand = {check}\ntimeout_ms = {HEALTH_TIMEOUT_MS}\n",
            args = q_list(&args)
        )
    });
    let a = m.addrs[0];
    boot(&m);
    wait_for("redis to answer PING", || redis_ping(a).then_some(()));
    let before = running_on_active(&m, "redis", "7.2.13-mkA");
    let title = cmdline_of(before);
    println!("old copy's /proc/{before}/cmdline: {title:?}");
    assert!(
        !title.contains("--appendonly"),
        "redis rewrote its title (the premise of this regression): {title:?}"
    );
    let acked = redis_fill(a, "k", 300);

    let (r, doc) = apply(&m);
    assert_upgraded(&r, &doc);
    let after = running_on_active(&m, "redis", "7.2.13-mkB");
    assert_ne!(after, before, "a new copy was started");
    assert_runs(after, REDIS_SERVER);
    let title = cmdline_of(after);
    println!("new copy's /proc/{after}/cmdline: {title:?}");
    assert!(
        title.contains(&format!("127.0.0.1:{}", a.port())),
        "the new copy listens where the spec says: {title:?}"
    );
    let (lost, examples) = redis_lost(a, &acked);
    println!("acknowledged writes: {}, lost: {lost}", acked.len());
    assert_eq!(lost, 0, "data intact: {examples:?}");
    // It really is the append-only file of the spec's --dir that was loaded.
    assert!(
        m.path("redis/appendonlydir").is_dir(),
        "the spec's --dir holds the append-only file"
    );
}

/// Shared by the two refusals: redis, declared by `files(port, dir)` (the file it boots
/// with, and the file as the operator edited it before the apply, if it differs), is
/// refused at pre-flight; the old copy keeps serving, not frozen, with its data and with
/// every write made during the refused apply. Returns the failed checks' text.
fn redis_refused(files: impl FnOnce(u16, &Path) -> (String, Option<String>)) -> String {
    let mut edited = None;
    let m = machine(1, |m| {
        let (boot, edit) = files(m.addrs[0].port(), &m.path("redis"));
        edited = edit;
        boot
    });
    let a = m.addrs[0];
    boot(&m);
    wait_for("redis to answer PING", || redis_ping(a).then_some(()));
    let before = running_on_active(&m, "redis", "7.2.13-mkA");
    let mut acked = redis_fill(a, "k", 200);
    if let Some(text) = edited {
        println!("--- workloads.toml, edited before the apply\n{text}---");
        std::fs::write(m.path("state/workloads.toml"), text).unwrap();
    }

    let (r, doc, writes) = apply_under_load(&m, redis_writers(a, 1));
    let writes = merged_writes(writes);
    writes.counts.print("redis during the refused apply");
    let why = assert_refused_at_preflight(&r, &doc);
    println!("refused: {why}");

    // Nothing changed: the same copy on the same instance, not frozen, answering at once.
    let st = m.status();
    let (id, release, _) = active(&st);
    assert_eq!((id, release.as_str()), (1, "7.2.13-mkA"), "{st}");
    assert_eq!(
        st["instances"].as_array().map(Vec::len),
        Some(1),
        "no new instance: {st}"
    );
    let w = status_workload(&st, "redis");
    assert_eq!(w["pid"].as_i64(), Some(i64::from(before)), "{w}");
    assert_eq!(w["frozen"], false, "{w}");
    assert_eq!(w["state"], "running", "{w}");
    let status = std::fs::read_to_string(format!("/proc/{before}/status")).unwrap();
    assert!(!status.contains("State:\tT"), "not stopped: {status}");
    let t = Instant::now();
    assert!(redis_ping(a), "the old copy answers");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "and at once ({:?})",
        t.elapsed()
    );
    acked.extend(writes.acked);
    let (lost, examples) = redis_lost(a, &acked);
    println!("acknowledged writes: {}, lost: {lost}", acked.len());
    assert_eq!(lost, 0, "data intact: {examples:?}");
    assert_eq!(writes.counts.refused, 0, "the port never closed");
    assert_eq!(writes.counts.failed, 0, "no write failed");
    why
}

/// Regression: redis in handover mode (the default) binds its own port, which is not
/// declared in `[[workload.listen]]`: a handover would freeze it and start a copy that
/// cannot bind, so the apply is refused at pre-flight, nothing frozen, nothing changed.
fn regression_redis_undeclared_listener_in_handover_mode_is_refused() {
    let mut port = 0;
    let why = redis_refused(|p, dir| {
        port = p;
        let args = redis_args(dir, p, &["--set-proc-title", "no"]);
        let file = format!(
            "[[workload]]\nname = \"redis\"\nexec = {REDIS_SERVER:?}\nargs = {args}\n\
             mode = \"handover\"\n\
             [workload.health]\nkind = \"exec\"\ncommand = {check}\ntimeout_ms = {HEALTH_TIMEOUT_MS}\n",
            args = q_list(&args),
            check = redis_pong_check(p)
        );
        (file, None)
    });
    assert!(
        why.contains(&port.to_string()),
        "the refusal names the undeclared listening socket (port {port}): {why}"
    );
}

/// Regression: a `tcp` health check in handover mode passes on the frozen old copy's
/// backlog, so it proves nothing. The workload file refuses it (so `emu init` would not
/// start it): redis boots with an exec check, then the operator switches it to `tcp` and
/// applies: refused at pre-flight (exit 8) with the old copy serving.
fn regression_redis_tcp_health_in_handover_mode_is_refused() {
    let why = redis_refused(|p, dir| {
        let args = q_list(&redis_args(dir, p, &[]));
        let head =
            format!("[[workload]]\nname = \"redis\"\nexec = {REDIS_SERVER:?}\nargs = {args}\n");
        let boot = format!(
            "{head}[workload.health]\nkind = \"exec\"\ncommand = {check}\ntimeout_ms = {HEALTH_TIMEOUT_MS}\n",
            check = redis_pong_check(p)
        );
        let edited = format!(
            "{head}[workload.health]\nkind = \"tcp\"\naddr = \"127.0.0.1:{p}\"\ntimeout_ms = {HEALTH_TIMEOUT_MS}\n"
        );
        (boot, Some(edited))
    });
    assert!(
        why.to_lowercase().contains("tcp"),
        "the refusal names the tcp health check: {why}"
    );
}

/// notify-counter.py in socket-activation mode with `notify` health: its counter lives in a
/// memfd it pushed to the fd store (FDSTORE=1, FDNAME=counter); the new copy gets it back
/// (LISTEN_FDS/LISTEN_FDNAMES) and counts on from where the old one was.
fn notify_counter_keeps_its_memfd_in_the_fd_store() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("services/notify-counter.py");
    assert!(script.is_file(), "{}", script.display());
    let m = machine(1, |m| {
        let a = m.addrs[0];
        format!(
            "[[workload]]\nname = \"counter\"\nexec = {PYTHON:?}\nargs = [{script}]\n\
             mode = \"socket-activation\"\n\
             [[workload.listen]]\nname = \"http\"\naddr = \"{a}\"\n\
             [workload.health]\nkind = \"notify\"\ntimeout_ms = {HEALTH_TIMEOUT_MS}\n",
            script = q_path(&script)
        )
    });
    let a = m.addrs[0];
    boot(&m);
    wait_http(a, "/get");
    let before = running_on_active(&m, "counter", "7.2.13-mkA");
    const N: u64 = 50;
    for i in 1..=N {
        let (s, body) = http_get(a, "/incr").unwrap_or_else(|e| panic!("incr {i}: {e:?}"));
        assert_eq!((s, body.trim()), (200, i.to_string().as_str()), "incr {i}");
    }

    let load = Load::start(2, move |_, stop, start| {
        let mut c = Counts::default();
        while keep_going(stop, start) {
            let sent = start.elapsed().as_secs_f64();
            match http_get(a, "/incr") {
                Ok((200, b)) if b.trim().parse::<u64>().is_ok() => c.ok += 1,
                Ok((s, b)) => c.failed(
                    start.elapsed(),
                    format!("status {s}, body {b:?} (sent at {sent:.3} s)"),
                ),
                Err(HttpError::Refused) => c.refused_at(start.elapsed()),
                Err(HttpError::Failed(why)) => {
                    c.failed(start.elapsed(), format!("{why} (sent at {sent:.3} s)"));
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        c
    });
    let (r, doc, counts) = apply_under_load(&m, load);
    let counts = merged(counts);
    counts.print("notify-counter, socket-activation, GET /incr on fresh connections");
    assert_upgraded(&r, &doc);
    println!("record: {}", record_workload(&doc, "counter"));

    let after = running_on_active(&m, "counter", "7.2.13-mkB");
    assert_ne!(after, before, "a new copy runs on the new instance");
    let (s, body) = http_get(a, "/get").unwrap_or_else(|e| panic!("get: {e:?}"));
    assert_eq!(s, 200);
    let value: u64 = body.trim().parse().unwrap();
    let low = N + counts.ok;
    println!(
        "counter after the move: {value} (before the move {N}, acknowledged increments during it {}, failed {})",
        counts.ok, counts.failed
    );
    assert!(counts.ok > 0, "the load ran");
    assert!(
        value >= low && value <= low + counts.failed,
        "the counter continued from {N}: {value}, expected {low}..={}",
        low + counts.failed
    );
    assert_eq!(counts.refused, 0, "no connection refused during the move");
    // Not asserted here: failed requests. A request the old copy had accepted (off the shared
    // listening socket) just before it was frozen dies with it when it is killed after the
    // commit: sent at the freeze, failed at the commit (measured: 1 or 2 such requests in
    // about one move out of six; reset, or "200" headers without the body; the increment
    // may or may not have been made). The lighttpd test asserts none; this one counts them
    // and checks the counter against them above.
    // The new copy got the stored memfd back: the same counter, not a fresh one.
    let environ = std::fs::read(format!("/proc/{after}/environ")).unwrap_or_default();
    let environ = String::from_utf8_lossy(&environ);
    let names = environ
        .split('\0')
        .find_map(|e| e.strip_prefix("LISTEN_FDNAMES="))
        .unwrap_or_default()
        .to_owned();
    println!("new copy's LISTEN_FDNAMES={names}");
    assert!(
        names.split(':').any(|n| n == "counter") && names.split(':').any(|n| n == "http"),
        "the stored memfd and the listener were handed back: {names:?}"
    );
}

/// Supervision after the move: a workload killed with SIGKILL is restarted when it says
/// `restart = "on-failure"` (status shows restarts >= 1) and left exited with
/// `restart = "no"`.
fn supervision_restarts_on_failure_and_leaves_restart_no_exited() {
    let m = machine(2, |m| {
        let mut toml = String::new();
        for (i, (name, restart)) in [("again", "on-failure"), ("once", "no")].iter().enumerate() {
            let a = m.addrs[i];
            let www = m.path(&format!("www-{name}"));
            std::fs::create_dir_all(&www).unwrap();
            std::fs::write(www.join("health"), "ok\n").unwrap();
            let args = [
                "-m".to_owned(),
                "http.server".to_owned(),
                "--bind".to_owned(),
                "127.0.0.1".to_owned(),
                a.port().to_string(),
                "--directory".to_owned(),
                www.to_str().unwrap().to_owned(),
            ];
            let _ = write!(
                toml,
                "[[workload]]\nname = \"{name}\"\nexec = {PYTHON:?}\nargs = {args}\n\
                 mode = \"restart\"\nrestart = \"{restart}\"\n\
                 [workload.health]\nkind = \"http\"\naddr = \"{a}\"\npath = \"/health\"\ntimeout_ms = {HEALTH_TIMEOUT_MS}\n\n",
                args = q_list(&args)
            );
        }
        toml
    });
    let (again, once) = (m.addrs[0], m.addrs[1]);
    boot(&m);
    wait_http(again, "/health");
    wait_http(once, "/health");
    let (r, doc) = apply(&m);
    assert_upgraded(&r, &doc);
    let pid_again = running_on_active(&m, "again", "7.2.13-mkB");
    let pid_once = running_on_active(&m, "once", "7.2.13-mkB");
    let restarts = |w: &Value| w["restarts"].as_u64();

    // on-failure: killed, restarted (a new pid, serving, counted).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid_again),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = Instant::now();
    let w = wait_for("the killed on-failure workload to be restarted", || {
        let w = status_workload(&m.status(), "again");
        (w["state"] == "running"
            && w["pid"].as_i64().is_some_and(|p| p != i64::from(pid_again))
            && restarts(&w).is_some_and(|n| n >= 1))
        .then_some(w)
    });
    wait_http(again, "/health");
    println!(
        "on-failure: restarted in {:.2} s: {w}",
        t.elapsed().as_secs_f64()
    );
    let pid = running_on_active(&m, "again", "7.2.13-mkB");
    assert_runs(pid, PYTHON);

    // no: killed, shown exited, not restarted.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid_once),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let w = wait_for("the killed restart=no workload to be shown exited", || {
        let w = status_workload(&m.status(), "once");
        (w["state"] == "exited").then_some(w)
    });
    println!("restart = \"no\": {w}");
    // Still exited a while later: nobody restarted it.
    std::thread::sleep(Duration::from_secs(2));
    let w = status_workload(&m.status(), "once");
    assert_eq!(w["state"], "exited", "{w}");
    assert_eq!(restarts(&w).unwrap_or(0), 0, "{w}");
    assert!(
        matches!(http_get(once, "/health"), Err(HttpError::Refused)),
        "its port stays closed"
    );
    // The other one is unaffected.
    assert_eq!(
        running_on_active(&m, "again", "7.2.13-mkB"),
        pid,
        "the on-failure workload kept running"
    );
}
