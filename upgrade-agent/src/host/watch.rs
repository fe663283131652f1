//! What an instance does for its workloads between requests: it listens on their notify
//! socket (systemd's protocol: `READY=1`, `STATUS=`, the fd store) and supervises their
//! processes (one that exits is detected, shown by `status` and restarted per its
//! `restart` policy with a back-off).
//!
//! Supervision is driven by events, not by polling every process: each workload process's
//! pidfd sits in one epoll set, so the loop sleeps until a process exits or a restart falls
//! due, then looks at that process only. An idle instance therefore costs nothing per
//! workload (a 50 ms pass over 500 workloads was 10,000 `waitid` calls a second under the
//! instance lock), and an apply that stops N old processes does not pay N whole passes.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::host::notify::{Message, NotifySocket, Received};
use crate::host::supervisor::{CONNECTION_FDNAME, Instance, Running, Shared, is_connection, lock};
use crate::model::PreservedFd;
use crate::sys::spawn::Process;
use crate::workload::{MAX_FDS, valid_name};

/// The longest the supervision loop sleeps without an event: a safety net that also
/// collects a process which exited while its workload was in a move (the pass leaves those
/// alone, and the exit's one edge-triggered event is then spent), and how soon the loop
/// notices that its instance halts.
pub const SUPERVISE_AT_LEAST_EVERY: Duration = Duration::from_secs(1);

/// Puts `process`'s pidfd in the instance's supervision set (once the loop runs), so its
/// exit wakes the loop. Edge-triggered: one event per exit, even while the pass leaves the
/// process alone. The entry goes away by itself when the pidfd is closed.
pub fn watch_exit(inst: &Instance, process: &Process) {
    let Some(exits) = &inst.exits else {
        return;
    };
    let pid = u64::from(process.id());
    let event = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, pid);
    if let Err(e) = exits.add(process.pidfd(), event) {
        // Still supervised: the periodic pass finds the exit, only later.
        tracing::warn!(pid = process.id(), error = %e, "cannot watch the process's pidfd; its exit is noticed by the periodic pass");
    }
}

/// How long the loop may sleep: until the earliest restart falls due or the next whole
/// pass (at most [`SUPERVISE_AT_LEAST_EVERY`] after the last one, `last_full`).
fn sleep_for(inst: &Instance, now: Instant, last_full: Instant) -> Duration {
    let next_full = (last_full + SUPERVISE_AT_LEAST_EVERY).saturating_duration_since(now);
    inst.workloads
        .values()
        .filter_map(|w| w.restart_at)
        .map(|at| at.saturating_duration_since(now))
        .fold(next_full, Duration::min)
}

/// Binds the instance's notify socket (`notify.sock` in its private directory) and starts
/// the notify listener and the supervision loop, each on its own thread.
pub fn start_background(shared: &Shared) -> std::io::Result<()> {
    let path = lock(shared).dir.join("notify.sock");
    let socket = NotifySocket::bind(&path)?;
    lock(shared).notify_path = Some(path);
    let sh = Arc::clone(shared);
    std::thread::Builder::new()
        .name("notify".into())
        .spawn(move || {
            loop {
                match socket.recv(None) {
                    Ok(Some(Received::Message(m))) => on_message(&sh, m),
                    Ok(Some(Received::Refused { pid, reason })) => {
                        tracing::warn!(?pid, %reason, "notify message refused");
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "notify socket failed; READY=1 and the fd store are no longer served");
                        return;
                    }
                }
            }
        })?;
    let exits = Arc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
    {
        let mut inst = lock(shared);
        inst.exits = Some(Arc::clone(&exits));
        // Processes started (or adopted) before the loop existed.
        for w in inst.workloads.values() {
            if let Some(p) = &w.process {
                watch_exit(&inst, p);
            }
        }
    }
    let sh = Arc::clone(shared);
    std::thread::Builder::new()
        .name("supervise".into())
        .spawn(move || {
            let mut events = [EpollEvent::empty(); 64];
            let mut last_full = Instant::now();
            let mut sleep = sleep_for(&lock(&sh), last_full, last_full);
            loop {
                // Rounded up, so a restart is never run a millisecond early and waited for
                // again.
                let ms = sleep.as_micros().div_ceil(1000);
                let timeout = EpollTimeout::try_from(ms).unwrap_or(EpollTimeout::MAX);
                let woken = match exits.wait(&mut events, timeout) {
                    Ok(n) => n,
                    Err(nix::errno::Errno::EINTR) => 0,
                    Err(e) => {
                        tracing::error!(error = %e, "waiting for workload exits failed; supervising by a periodic pass");
                        std::thread::sleep(SUPERVISE_AT_LEAST_EVERY);
                        0
                    }
                };
                let mut inst = lock(&sh);
                if inst.halting {
                    return;
                }
                let now = Instant::now();
                if now.saturating_duration_since(last_full) >= SUPERVISE_AT_LEAST_EVERY {
                    supervise(&mut inst, now);
                    last_full = now;
                } else {
                    let exited: Vec<i32> = events[..woken]
                        .iter()
                        .filter_map(|e| i32::try_from(e.data()).ok())
                        .collect();
                    supervise_where(&mut inst, now, |w| {
                        exited.contains(&w.pid) || w.restart_at.is_some_and(|at| at <= now)
                    });
                }
                // Under the same lock: a restart the pass scheduled counts.
                sleep = sleep_for(&inst, Instant::now(), last_full);
            }
        })?;
    Ok(())
}

/// One pass of supervision: records processes that exited, schedules restarts per policy,
/// runs the restarts that are due. Workloads in a move (frozen, stopped, not committed) are
/// left alone: the move decides their fate.
pub fn supervise(inst: &mut Instance, now: Instant) {
    supervise_where(inst, now, |_| true);
}

/// A pass over the workloads `pick` chooses only: those whose process an exit event named,
/// and those whose restart is due. Choosing costs no system call.
fn supervise_where(inst: &mut Instance, now: Instant, pick: impl Fn(&Running) -> bool) {
    let names: Vec<String> = inst
        .workloads
        .iter()
        .filter(|(_, w)| pick(w))
        .map(|(n, _)| n.clone())
        .collect();
    for name in names {
        let Some(mut w) = inst.workloads.remove(&name) else {
            continue;
        };
        if !w.frozen && !w.pending_commit {
            supervise_one(inst, &mut w, now);
        }
        inst.workloads.insert(name, w);
    }
}

fn supervise_one(inst: &Instance, w: &mut Running, now: Instant) {
    if w.process.is_some() {
        // Reaps an exited process and schedules its restart per policy.
        w.alive();
        return;
    }
    if w.restart_at.is_some_and(|at| at <= now) {
        match crate::host::supervisor::relaunch(inst, w) {
            Ok(()) => {
                w.restarts = w.restarts.saturating_add(1);
                tracing::info!(workload = %w.spec.name, restarts = w.restarts, pid = w.pid, "workload restarted");
            }
            Err(e) => {
                tracing::error!(workload = %w.spec.name, error = %e, "restart failed; trying again after the back-off");
                w.retry_later(now);
            }
        }
    }
}

/// The workload a notify message comes from: the sender is its main process, or (with
/// cgroups) any process of its group.
fn sender_of(inst: &Instance, pid: i32) -> Option<String> {
    if let Some((n, _)) = inst
        .workloads
        .iter()
        .find(|(_, w)| w.process.is_some() && w.pid == pid)
    {
        return Some(n.clone());
    }
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    inst.workloads.keys().find_map(|n| {
        let (_, group) = inst.freezer.hierarchy_path(n)?;
        (path == group || path.starts_with(&format!("{group}/"))).then(|| n.clone())
    })
}

fn on_message(shared: &Shared, m: Message) {
    let mut inst = lock(shared);
    let Some(name) = sender_of(&inst, m.pid) else {
        tracing::warn!(
            pid = m.pid,
            "notify message from a process of no workload: ignored"
        );
        return;
    };
    let Some(w) = inst.workloads.get_mut(&name) else {
        return;
    };
    if let Some(s) = &m.text.status {
        w.status_text = Some(s.clone());
    }
    if m.text.fdstore_remove {
        let fdname = m.text.fdname.clone().unwrap_or_else(|| "stored".to_owned());
        let before = w.fds.len();
        // Only the store's entries: a declared descriptor is never dropped.
        let spec = &w.spec;
        w.fds.retain(|p| p.name != fdname || spec.declares(&p.name));
        tracing::info!(workload = %name, fdname, removed = before - w.fds.len(), "fd store: FDSTOREREMOVE");
    }
    if m.text.fdstore {
        if let Err(why) = store(w, &m) {
            tracing::warn!(workload = %name, %why, "fd store: refused");
        }
    }
    if m.text.ready {
        w.readiness.set();
    }
    if m.text.handoff {
        match &w.handoff {
            Some(done) => done.set(),
            None => {
                tracing::warn!(workload = %name, "MK_HANDOFF=1 but no hand-over was asked: ignored");
            }
        }
    }
}

/// `FDSTORE=1` with `FDNAME=connection` during a connection hand-over: keeps each attached
/// descriptor (1..=16 a message), every one a connected stream socket, as `connection-N`
/// for the next copy (then dropped from the store: see `supervisor::launch`). The whole
/// message is refused (its descriptors closed here; the workload's own copies stay open)
/// if any of them is not a connection or the store would exceed [`MAX_FDS`].
fn store_connections(w: &mut Running, m: &Message) -> Result<(), String> {
    if w.handoff.is_none() {
        return Err(format!(
            "FDNAME={CONNECTION_FDNAME} outside a hand-over (connections are taken only \
             between the handoff_signal and the freeze)"
        ));
    }
    if m.fds.is_empty() {
        return Err(format!("FDNAME={CONNECTION_FDNAME} without descriptors"));
    }
    for (i, fd) in m.fds.iter().enumerate() {
        if !crate::model::is_connected_stream(fd.as_fd()) {
            return Err(format!(
                "FDNAME={CONNECTION_FDNAME}: descriptor {i} of the message is not a connected \
                 stream socket"
            ));
        }
    }
    if w.fds.len() + m.fds.len() > MAX_FDS {
        return Err(format!(
            "{} more connections would exceed the {MAX_FDS} descriptors a workload moves",
            m.fds.len()
        ));
    }
    let mut next = crate::model::connections_in(&w.fds);
    for fd in &m.fds {
        next += 1;
        w.fds.push(PreservedFd {
            name: format!("{CONNECTION_FDNAME}-{next}"),
            fd: fd.try_clone().map_err(|e| format!("dup: {e}"))?,
        });
    }
    tracing::debug!(workload = %w.spec.name, added = m.fds.len(), total = next, "fd store: connections handed over");
    Ok(())
}

/// `FDSTORE=1`: keeps the attached memfd under `FDNAME` (default `stored`), replacing an
/// earlier entry of that name. Only memfds (LUO preserves nothing else across a kexec), one
/// per message, a name that is not one of the declared descriptors', at most
/// [`MAX_FDS`] descriptors in all. `FDNAME=connection` is the connection hand-over
/// ([`store_connections`]).
fn store(w: &mut Running, m: &Message) -> Result<(), String> {
    let name = m.text.fdname.clone().unwrap_or_else(|| "stored".to_owned());
    if name == CONNECTION_FDNAME {
        return store_connections(w, m);
    }
    if is_connection(&name) {
        return Err(format!(
            "FDNAME={name}: names {CONNECTION_FDNAME}-N are the agent's (send FDNAME={CONNECTION_FDNAME})"
        ));
    }
    if !valid_name(&name) {
        return Err(format!(
            "FDNAME={name:?}: the fd store takes names of 1..=63 bytes of A-Z a-z 0-9 . _ -"
        ));
    }
    if w.spec.declares(&name) {
        return Err(format!("FDNAME={name} is a declared descriptor's name"));
    }
    let [fd] = m.fds.as_slice() else {
        return Err(format!(
            "{} fds attached; the fd store takes one per message",
            m.fds.len()
        ));
    };
    if state_serializers::sys::get_seals(fd.as_fd()).is_err() {
        return Err(format!(
            "FDNAME={name}: not a memfd (only memfds survive a kexec)"
        ));
    }
    let fd = fd.try_clone().map_err(|e| format!("dup: {e}"))?;
    if let Some(p) = w.fds.iter_mut().find(|p| p.name == name) {
        p.fd = fd;
    } else {
        if w.fds.len() >= MAX_FDS {
            return Err(format!(
                "the workload holds {MAX_FDS} descriptors already (the most that move)"
            ));
        }
        w.fds.push(PreservedFd {
            name: name.clone(),
            fd,
        });
    }
    tracing::info!(workload = %w.spec.name, fdname = %name, "fd store: kept");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::notify::Parsed;
    use crate::host::supervisor::Readiness;
    use std::os::fd::OwnedFd;

    fn running(declared: &[&str]) -> Running {
        let text = "[[workload]]\nname = \"w\"\nexec = \"/bin/true\"\n";
        let mut spec = crate::workload::WorkloadFile::parse(text, std::path::Path::new("t"))
            .unwrap()
            .workloads
            .remove(0);
        spec.memfds = declared
            .iter()
            .map(|n| crate::workload::MemfdSpec {
                name: (*n).to_owned(),
                size: 0,
            })
            .collect();
        Running {
            spec,
            process: None,
            pid: -1,
            fds: declared
                .iter()
                .map(|n| PreservedFd {
                    name: (*n).to_owned(),
                    fd: memfd(),
                })
                .collect(),
            frozen: false,
            pending_commit: false,
            exit: None,
            restarts: 0,
            started: Instant::now(),
            restart_at: None,
            backoff: Duration::from_millis(100),
            readiness: Arc::new(Readiness::default()),
            status_text: None,
            extra_args: Vec::new(),
            handoff: None,
        }
    }

    fn memfd() -> OwnedFd {
        crate::sys::memfd::create_sealable("t").unwrap()
    }

    fn message(name: Option<&str>, fds: Vec<OwnedFd>) -> Message {
        Message {
            pid: 1,
            uid: 0,
            gid: 0,
            text: Parsed {
                fdstore: true,
                fdname: name.map(str::to_owned),
                ..Parsed::default()
            },
            fds,
        }
    }

    #[test]
    fn the_fd_store_keeps_memfds_by_name_and_refuses_the_rest() {
        let mut w = running(&["data"]);
        store(&mut w, &message(Some("cache"), vec![memfd()])).unwrap();
        assert_eq!((w.fds.len(), w.stored()), (2, 1));
        // Same name: replaced, not added.
        store(&mut w, &message(Some("cache"), vec![memfd()])).unwrap();
        assert_eq!((w.fds.len(), w.stored()), (2, 1));
        // Default name.
        store(&mut w, &message(None, vec![memfd()])).unwrap();
        assert_eq!(w.fds[2].name, "stored");
        let refusals = [
            (message(Some("data"), vec![memfd()]), "declared"),
            (message(Some("bad name"), vec![memfd()]), "FDNAME"),
            (
                message(Some("two"), vec![memfd(), memfd()]),
                "one per message",
            ),
            (
                message(
                    Some("file"),
                    vec![std::fs::File::open("/dev/null").unwrap().into()],
                ),
                "not a memfd",
            ),
        ];
        for (m, want) in refusals {
            let e = store(&mut w, &m).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        assert_eq!((w.fds.len(), w.stored()), (3, 2));
        for i in 0..MAX_FDS {
            let _ = store(&mut w, &message(Some(&format!("s{i}")), vec![memfd()]));
        }
        assert_eq!(w.fds.len(), MAX_FDS, "capped");
        let e = store(&mut w, &message(Some("more"), vec![memfd()])).unwrap_err();
        assert!(e.contains("descriptors already"), "{e}");
    }

    /// A connected TCP pair on loopback: (client, server side).
    fn connection() -> (std::net::TcpStream, OwnedFd) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s.into())
    }

    #[test]
    fn connections_are_taken_only_during_a_hand_over_and_only_connected() {
        let mut w = running(&["data"]);
        let (_c1, s1) = connection();
        let e = store(&mut w, &message(Some(CONNECTION_FDNAME), vec![s1])).unwrap_err();
        assert!(e.contains("outside a hand-over"), "{e}");
        assert_eq!(w.fds.len(), 1);

        w.handoff = Some(Arc::new(Readiness::default()));
        let (_c1, s1) = connection();
        let (_c2, s2) = connection();
        let (_c3, s3) = connection();
        store(&mut w, &message(Some(CONNECTION_FDNAME), vec![s1, s2])).unwrap();
        store(&mut w, &message(Some(CONNECTION_FDNAME), vec![s3])).unwrap();
        let names: Vec<&str> = w.fds.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["data", "connection-1", "connection-2", "connection-3"]
        );
        // A listener, a memfd, or a connection among them that is not one: the whole
        // message is refused.
        let listener: OwnedFd = std::net::TcpListener::bind("127.0.0.1:0").unwrap().into();
        let (_c4, s4) = connection();
        for (fds, want) in [
            (vec![listener], "not a connected stream socket"),
            (vec![s4, memfd()], "descriptor 1 of the message"),
            (vec![], "without descriptors"),
        ] {
            let e = store(&mut w, &message(Some(CONNECTION_FDNAME), fds)).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        assert_eq!(w.fds.len(), 4);
        // The agent's names are not the workload's to use.
        let (_c5, s5) = connection();
        let e = store(&mut w, &message(Some("connection-9"), vec![s5])).unwrap_err();
        assert!(e.contains("are the agent's"), "{e}");
        // Capped with everything else the workload moves.
        let mut kept = Vec::new();
        loop {
            let (c, s) = connection();
            kept.push(c);
            if let Err(e) = store(&mut w, &message(Some(CONNECTION_FDNAME), vec![s])) {
                assert!(e.contains("would exceed"), "{e}");
                break;
            }
        }
        assert_eq!(w.fds.len(), MAX_FDS);
    }

    #[test]
    fn readiness_wakes_a_waiter_without_polling() {
        let r = Arc::new(Readiness::default());
        assert!(!r.wait(Duration::from_millis(5)));
        let r2 = Arc::clone(&r);
        let t = std::thread::spawn(move || r2.wait(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        let t0 = Instant::now();
        r.set();
        assert!(t.join().unwrap());
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert!(r.is_set());
    }

    #[test]
    fn readiness_wakes_an_async_waiter_from_another_thread() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = Arc::new(Readiness::default());
        // Not set: the wait ends at its timeout with false.
        assert!(!rt.block_on(r.wait_async(Duration::from_millis(5))));
        // Set by a thread while the task waits (the notify listener's case).
        let r2 = Arc::clone(&r);
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            r2.set();
        });
        let t0 = Instant::now();
        assert!(rt.block_on(r.wait_async(Duration::from_secs(10))));
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "woken, not timed out"
        );
        setter.join().unwrap();
        // Set before the wait: true at once.
        assert!(rt.block_on(r.wait_async(Duration::ZERO)));
    }

    fn instance_with_exits(dir: &std::path::Path) -> Instance {
        let mut inst = Instance::new(
            0,
            "test".into(),
            vec![0],
            crate::sys::cgroup::Freezer::Signal,
            dir.to_owned(),
            dir.to_owned(),
        );
        inst.exits = Some(Arc::new(
            Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap(),
        ));
        inst
    }

    #[test]
    fn an_exit_wakes_the_supervision_set_once() {
        let dir = tempfile::tempdir().unwrap();
        let inst = instance_with_exits(dir.path());
        let args = ["-c".to_owned(), "exit 3".to_owned()];
        let mut p = crate::sys::spawn::spawn(&crate::sys::spawn::SpawnRequest {
            exec: std::path::Path::new("/bin/sh"),
            args: &args,
            env: &[],
            listen_pid: false,
            fds: &[],
            cgroup_dir: None,
            cpus: None,
            new_session: false,
            stdio: crate::sys::spawn::Stdio::Null,
            output: None,
            new_pid_namespace: false,
        })
        .unwrap();
        watch_exit(&inst, &p);
        let exits = inst.exits.as_ref().unwrap();
        let mut events = [EpollEvent::empty(); 4];
        // Woken by the exit itself (the timeout is only there so a broken watch fails
        // instead of hanging).
        assert_eq!(exits.wait(&mut events, 30_000u16).unwrap(), 1);
        // The event names the process, so the loop looks at its workload only.
        assert_eq!(events[0].data(), u64::from(p.id()));
        // Edge-triggered: the exit is reported once, though the process is not reaped yet
        // (why the loop keeps a pass at least every second for exits inside a move).
        assert_eq!(exits.wait(&mut events, EpollTimeout::ZERO).unwrap(), 0);
        let ended = p.try_wait().unwrap().expect("exited");
        assert_eq!(
            crate::host::supervisor::describe_exit(ended),
            "exit status 3"
        );
    }

    #[test]
    fn the_loop_sleeps_until_the_next_restart_and_at_most_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let mut inst = instance_with_exits(dir.path());
        let now = Instant::now();
        assert_eq!(sleep_for(&inst, now, now), SUPERVISE_AT_LEAST_EVERY);
        // The whole pass is due a second after the last one.
        assert_eq!(
            sleep_for(&inst, now + Duration::from_millis(400), now),
            Duration::from_millis(600)
        );
        let mut later = running(&[]);
        later.restart_at = Some(now + Duration::from_secs(5));
        inst.workloads.insert("later".into(), later);
        assert_eq!(sleep_for(&inst, now, now), SUPERVISE_AT_LEAST_EVERY);
        let mut soon = running(&[]);
        soon.restart_at = Some(now + Duration::from_millis(200));
        inst.workloads.insert("soon".into(), soon);
        assert_eq!(sleep_for(&inst, now, now), Duration::from_millis(200));
        assert_eq!(
            sleep_for(&inst, now + Duration::from_millis(300), now),
            Duration::ZERO
        );
    }
}
