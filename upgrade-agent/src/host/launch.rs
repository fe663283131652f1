//! Starting a workload's process: always from its declared spec (`exec`, `args`, `env` of the
//! workload file), never from what `/proc/PID/cmdline` or `environ` say (a process may
//! rewrite them: redis, nginx, postgres and php-fpm rewrite their titles), with its
//! preserved descriptors at 3, 4, ... named the way its mode asks:
//!
//! | mode | variables |
//! | --- | --- |
//! | `handover` | `MK_STATE_FDS=name:3,...`; also `LISTEN_*` (below) when its fd store holds anything |
//! | `socket-activation`, `restart` | `LISTEN_FDS=n`, `LISTEN_FDNAMES=a:b`, `LISTEN_PID=<its own pid>` (systemd's `sd_listen_fds`) |
//!
//! In `socket-activation` mode the listening sockets come first, then memfds, then the fd
//! store, as systemd orders socket units' fds before stored ones. Every workload also gets
//! `NOTIFY_SOCKET` (systemd's notify protocol: `READY=1`, `FDSTORE=1`). Variables of these
//! names inherited by the supervisor (say, from its own socket activation) are stripped, so
//! a workload never sees stale ones.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use crate::model::PreservedFd;
use crate::sys::spawn::{self, Process, SpawnRequest};
use crate::workload::{Mode, WorkloadSpec};

/// Variables the supervisor sets itself (stripped from what it inherited).
pub const MANAGED_ENV: &[&str] = &[
    state_serializers::fdenv::ENV_VAR,
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PID",
    "NOTIFY_SOCKET",
    STANDBY_ENV,
];

/// The variable naming a standby copy's socket (docs/state.md, "Standby start").
pub const STANDBY_ENV: &str = "MK_STANDBY_FD";

/// The order in which a workload's descriptors are placed at 3, 4, ...: indexes into `fds`
/// (socket-activation puts the spec's listeners first).
fn placement(spec: &WorkloadSpec, fds: &[PreservedFd]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..fds.len()).collect();
    if spec.mode == Mode::SocketActivation {
        let is_listener = |i: &usize| spec.listeners.iter().any(|l| l.name == fds[*i].name);
        order.sort_by_key(|i| !is_listener(i));
    }
    order
}

/// The complete environment of a workload's process (without `LISTEN_PID`, which the
/// spawner writes in the child) and whether `LISTEN_PID` is to be set.
pub fn environment(
    spec: &WorkloadSpec,
    fds: &[PreservedFd],
    stored: usize,
    notify: Option<&Path>,
) -> Result<(Vec<(String, String)>, bool), String> {
    let mut env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| !MANAGED_ENV.contains(&k.as_str()) && !spec.env.contains_key(k))
        .collect();
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let order = placement(spec, fds);
    let names: Vec<&str> = order.iter().map(|i| fds[*i].name.as_str()).collect();
    if spec.mode == Mode::Handover {
        let named: Vec<state_serializers::fdenv::NamedFd> = names
            .iter()
            .zip(3..)
            .map(|(n, fd)| state_serializers::fdenv::NamedFd {
                name: (*n).to_owned(),
                fd,
            })
            .collect();
        let value = state_serializers::fdenv::format(&named).map_err(|e| e.to_string())?;
        env.push((state_serializers::fdenv::ENV_VAR.to_owned(), value));
    }
    let listen = !fds.is_empty() && (spec.mode != Mode::Handover || stored > 0);
    if listen {
        env.push(("LISTEN_FDS".to_owned(), fds.len().to_string()));
        env.push(("LISTEN_FDNAMES".to_owned(), names.join(":")));
    }
    // Not in checkpoint mode: a restored process would keep a path of the old instance.
    if let Some(p) = notify.filter(|_| spec.mode != Mode::Checkpoint) {
        env.push(("NOTIFY_SOCKET".to_owned(), p.display().to_string()));
    }
    Ok((env, listen))
}

/// The environment of a standby copy: as a first start (no descriptors named), plus
/// `MK_STANDBY_FD=3`.
fn standby_environment(
    spec: &WorkloadSpec,
    notify: Option<&Path>,
) -> (Vec<(String, String)>, bool) {
    let (mut env, _) = environment(spec, &[], 0, notify).unwrap_or_default();
    env.retain(|(k, _)| k != state_serializers::fdenv::ENV_VAR);
    env.push((STANDBY_ENV.to_owned(), "3".to_owned()));
    (env, false)
}

/// Where and how to start a workload.
#[derive(Debug)]
pub struct Launch<'a> {
    pub spec: &'a WorkloadSpec,
    /// Its descriptors; for a standby copy, exactly one: its standby socket.
    pub fds: &'a [PreservedFd],
    /// A standby copy (`standby = true`): `fds` is its socket, named to it only by
    /// `MK_STANDBY_FD` (no `MK_STATE_FDS`, no `LISTEN_*`: its descriptors come later).
    pub standby: bool,
    /// How many of `fds` (at the end) came from the workload's fd store.
    pub stored: usize,
    pub cpus: &'a [u32],
    /// The workload's cgroup v2 directory, when the instance has one for it.
    pub cgroup_dir: Option<BorrowedFd<'a>>,
    pub notify: Option<&'a Path>,
    /// Appended to the spec's arguments (fault injection only).
    pub extra_args: &'a [String],
}

/// Starts the workload's process as [`Launch`] says.
pub fn start(l: &Launch<'_>) -> std::io::Result<Process> {
    let (env, listen_pid) = if l.standby {
        standby_environment(l.spec, l.notify)
    } else {
        environment(l.spec, l.fds, l.stored, l.notify)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?
    };
    let order = placement(l.spec, l.fds);
    let fds: Vec<BorrowedFd<'_>> = order.iter().map(|i| l.fds[*i].fd.as_fd()).collect();
    let set = state_serializers::sys::cpu_set(l.cpus)?;
    let args: Vec<String> = l
        .spec
        .args
        .iter()
        .chain(l.extra_args.iter())
        .cloned()
        .collect();
    // Checkpoint mode: pid 1 of its own PID namespace, nothing but /dev/null on 0, 1, 2 and
    // no other descriptor (host::checkpoint: what CRIU can restore anywhere).
    let checkpoint = l.spec.mode == Mode::Checkpoint;
    let devnull = if checkpoint {
        Some(
            std::fs::File::options()
                .read(true)
                .write(true)
                .open("/dev/null")?,
        )
    } else {
        None
    };
    let fds = if checkpoint { Vec::new() } else { fds };
    spawn::spawn(&SpawnRequest {
        exec: &l.spec.exec,
        args: &args,
        env: &env,
        listen_pid,
        fds: &fds,
        cgroup_dir: l.cgroup_dir,
        cpus: (!l.cpus.is_empty()).then_some(&set),
        new_session: true,
        stdio: spawn::Stdio::Null,
        output: devnull.as_ref().map(AsFd::as_fd),
        new_pid_namespace: checkpoint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{ListenSpec, MemfdSpec};

    fn spec(mode: Mode) -> WorkloadSpec {
        let text = "[[workload]]\nname = \"w\"\nexec = \"/bin/true\"\n";
        let mut s = crate::workload::WorkloadFile::parse(text, Path::new("t"))
            .unwrap()
            .workloads
            .remove(0);
        s.mode = mode;
        s.memfds.push(MemfdSpec {
            name: "data".into(),
            size: 0,
        });
        s.listeners.push(ListenSpec {
            name: "http".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
        });
        s.env.insert("A".into(), "1".into());
        s
    }

    fn fds(names: &[&str]) -> Vec<PreservedFd> {
        names
            .iter()
            .map(|n| PreservedFd {
                name: (*n).to_owned(),
                fd: std::fs::File::open("/dev/null").unwrap().into(),
            })
            .collect()
    }

    fn get<'a>(env: &'a [(String, String)], k: &str) -> Option<&'a str> {
        env.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn handover_names_fds_in_mk_state_fds_only() {
        let f = fds(&["data", "http"]);
        let (env, listen) = environment(&spec(Mode::Handover), &f, 0, None).unwrap();
        assert_eq!(get(&env, "MK_STATE_FDS"), Some("data:3,http:4"));
        assert_eq!(get(&env, "LISTEN_FDS"), None);
        assert!(!listen);
        assert_eq!(get(&env, "A"), Some("1"));
    }

    #[test]
    fn handover_with_a_stored_fd_also_speaks_listen_fds() {
        let f = fds(&["data", "http", "cache"]);
        let (env, listen) =
            environment(&spec(Mode::Handover), &f, 1, Some(Path::new("/n.sock"))).unwrap();
        assert_eq!(get(&env, "MK_STATE_FDS"), Some("data:3,http:4,cache:5"));
        assert_eq!(get(&env, "LISTEN_FDS"), Some("3"));
        assert_eq!(get(&env, "LISTEN_FDNAMES"), Some("data:http:cache"));
        assert_eq!(get(&env, "NOTIFY_SOCKET"), Some("/n.sock"));
        assert!(listen);
    }

    #[test]
    fn socket_activation_puts_listeners_first() {
        let f = fds(&["data", "http", "cache"]);
        let s = spec(Mode::SocketActivation);
        let (env, listen) = environment(&s, &f, 1, None).unwrap();
        assert_eq!(get(&env, "MK_STATE_FDS"), None);
        assert_eq!(get(&env, "LISTEN_FDS"), Some("3"));
        assert_eq!(get(&env, "LISTEN_FDNAMES"), Some("http:data:cache"));
        assert!(listen);
        assert_eq!(placement(&s, &f), vec![1, 0, 2]);
    }

    #[test]
    fn a_standby_copy_gets_its_socket_and_no_descriptor_names() {
        let (env, listen) = standby_environment(&spec(Mode::Handover), Some(Path::new("/n")));
        assert_eq!(get(&env, STANDBY_ENV), Some("3"));
        assert_eq!(get(&env, "MK_STATE_FDS"), None);
        assert_eq!(get(&env, "LISTEN_FDS"), None);
        assert_eq!(get(&env, "NOTIFY_SOCKET"), Some("/n"));
        assert!(!listen);
    }

    #[test]
    fn inherited_managed_variables_are_stripped() {
        // The test process may itself carry any of these; none may leak through.
        let (env, _) = environment(&spec(Mode::Restart), &[], 0, None).unwrap();
        for k in MANAGED_ENV {
            assert_eq!(get(&env, k), None, "{k}");
        }
        assert_eq!(env.iter().filter(|(k, _)| k == "A").count(), 1);
    }
}
