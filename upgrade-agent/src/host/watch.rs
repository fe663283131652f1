//! What an instance does for its workloads between requests: it listens on their notify
//! socket (systemd's protocol: `READY=1`, `STATUS=`, the fd store) and supervises their
//! processes (one that exits is detected, shown by `status` and restarted per its
//! `restart` policy with a back-off).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::host::notify::{Message, NotifySocket, Received};
use crate::host::supervisor::{Instance, Running, Shared, lock};
use crate::model::PreservedFd;
use crate::workload::{MAX_FDS, valid_name};

/// How often exited processes are looked for.
pub const SUPERVISE_EVERY: Duration = Duration::from_millis(50);

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
    let sh = Arc::clone(shared);
    std::thread::Builder::new()
        .name("supervise".into())
        .spawn(move || {
            loop {
                std::thread::sleep(SUPERVISE_EVERY);
                let mut inst = lock(&sh);
                if inst.halting {
                    return;
                }
                supervise(&mut inst, Instant::now());
            }
        })?;
    Ok(())
}

/// One pass of supervision: records processes that exited, schedules restarts per policy,
/// runs the restarts that are due. Workloads in a move (frozen, stopped, not committed) are
/// left alone: the move decides their fate.
pub fn supervise(inst: &mut Instance, now: Instant) {
    let names: Vec<String> = inst.workloads.keys().cloned().collect();
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
}

/// `FDSTORE=1`: keeps the attached memfd under `FDNAME` (default `stored`), replacing an
/// earlier entry of that name. Only memfds (LUO preserves nothing else across a kexec), one
/// per message, a name that is not one of the declared descriptors', at most
/// [`MAX_FDS`] descriptors in all.
fn store(w: &mut Running, m: &Message) -> Result<(), String> {
    let name = m.text.fdname.clone().unwrap_or_else(|| "stored".to_owned());
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
}
