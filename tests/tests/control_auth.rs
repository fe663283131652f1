//! The instance's control and channel sockets answer only root or the agent's own user,
//! whatever the file modes say: a loose umask (simulated here by opening every directory
//! and socket to everyone) must not let another user start a process as root or freeze a
//! workload. The peer is checked with SO_PEERCRED before a byte is read.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use libtest_mimic::Arguments;
use mk_integration_tests::{Machine, active};

/// Own harness (`harness = false`, libtest-mimic): a test whose requirement this host lacks
/// ends as "ignored" in cargo's summary (after `SKIP <name>: <reason>`), never as "passed".
fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        mk_test_support::skippable("control_and_channel_sockets_refuse_other_users", || {
            if !nix::unistd::geteuid().is_root() {
                return Err("needs root (to run a client as another user)".into());
            }
            if Command::new("python3").arg("-V").output().is_err() {
                return Err("needs python3 (the other user's client)".into());
            }
            control_and_channel_sockets_refuse_other_users();
            Ok(())
        }),
        mk_test_support::plain(
            "a_state_directory_open_to_others_fails_the_check",
            a_state_directory_open_to_others_fails_the_check,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

/// An attacker's request: start /bin/sh as root.
const EVIL: &str =
    r#"{"Start":{"spec":{"name":"evil","exec":"/bin/sh","args":["-c","touch /tmp/mk-pwned"]}}}"#;

/// A client in another process, as `uid`: sends one framed control request `body` and
/// prints what came back: `EOF` when the server closed without answering, else the answer.
fn poke(sock: &Path, uid: u32, body: &str) -> String {
    let script = r"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
body = sys.argv[2].encode()
try:
    s.sendall(struct.pack('<I', len(body)) + body)
    got = s.recv(65536)
except (ConnectionResetError, BrokenPipeError):
    got = b''
print('EOF' if not got else got[4:].decode(errors='replace'))
";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(sock)
        .arg(body)
        .uid(uid)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn open_up(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn control_and_channel_sockets_refuse_other_users() {
    let m = Machine::new(1);
    m.init();
    let inst = m.path("state/emulated/instance-1");
    // The socket files and directories are private by default.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&inst.join("ctl.sock")), 0o600);
    assert_eq!(mode(&inst.join("chan.sock")), 0o600);
    assert_eq!(mode(&inst), 0o700);
    // Open everything up, as a careless umask or a copied tree would.
    let mut p = inst.clone();
    while p != *m.dir.path() {
        open_up(&p, 0o755);
        p.pop();
    }
    open_up(m.dir.path(), 0o755);
    open_up(&inst.join("ctl.sock"), 0o777);
    open_up(&inst.join("chan.sock"), 0o777);
    let _ = std::fs::remove_file("/tmp/mk-pwned");

    // Another user is disconnected before anything is read.
    assert_eq!(poke(&inst.join("ctl.sock"), 65534, EVIL), "EOF");
    assert_eq!(poke(&inst.join("chan.sock"), 65534, EVIL), "EOF");
    assert!(
        !Path::new("/tmp/mk-pwned").exists(),
        "the request was served"
    );
    let (_, _, names) = active(&m.status());
    assert_eq!(names.len(), 1, "{names:?}");

    // Root, through the same opened-up path, is answered.
    let answer = poke(&inst.join("ctl.sock"), 0, r#""Ping""#);
    assert!(answer.contains("Pong"), "{answer}");
}

fn a_state_directory_open_to_others_fails_the_check() {
    let m = Machine::new(1);
    m.init();
    let state = m.path("state");
    // (The test harness made the directory; the agent does not change an existing one.)
    open_up(&state, 0o700);
    assert_eq!(m.run(&["check"]).code, 0);
    // Readable by others: reported, not a failure.
    open_up(&state, 0o755);
    let c = m.run(&["check", "--json"]);
    assert_eq!(c.code, 0, "{c:?}");
    assert!(c.stdout.contains("chmod 700"), "{c:?}");
    // Writable by others: the check fails.
    open_up(&state, 0o777);
    let c = m.run(&["check", "--json"]);
    assert_eq!(c.code, 8, "{c:?}");
    let checks = c.json()["checks"].clone();
    let sd = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "state-dir")
        .unwrap()
        .clone();
    assert_eq!(sd["ok"], false, "{sd}");
    assert!(sd["detail"].as_str().unwrap().contains("0777"), "{sd}");
    assert!(sd["fix"].as_str().unwrap().contains("chmod 700"), "{sd}");
    // Reported, not changed behind the operator's back.
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o777
    );
    open_up(&state, 0o700);
}
