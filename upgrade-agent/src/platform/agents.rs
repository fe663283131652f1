//! Reaching the agent of an instance: its control socket (`ctl.sock`: start, freeze, thaw,
//! health, fds, stop, halt) and its channel receiver (`chan.sock`), both Unix sockets in
//! the instance's directory. Shared by the emulated platform (supervisor processes) and
//! the multikernel platform on its SIMULATED kernel (agents started by the simulated
//! kernel). A real multikernel kernel's agent is reached over AF_VSOCK instead, which
//! cannot carry descriptors: see `docs/kernel.md`.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kho_proto::channel::{Transport, UnixTransport, UpgradeId};

use super::channel::{ChannelLink, Connector};
use crate::host::ctl::{self, Request, Response};
use crate::platform::{InstanceId, PlatformError, PreservedFd, Resources, WorkloadInfo};
use crate::workload::WorkloadSpec;

/// Creates (truncating) an instance's log file, mode 0600 whatever the umask (it may name
/// workloads' arguments); returns it twice, for stdout and stderr.
pub fn private_log(path: &std::path::Path) -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let log = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    let log2 = log.try_clone()?;
    Ok((log, log2))
}

/// One instance's agent, by the directory holding its sockets.
#[derive(Debug, Clone)]
pub struct Agent {
    pub id: InstanceId,
    pub dir: PathBuf,
    /// A control connection kept across requests (else one connection per request).
    kept: Option<Arc<Mutex<ctl::Kept>>>,
}

fn unexpected(id: InstanceId, r: &Response) -> PlatformError {
    PlatformError::Instance {
        id,
        what: format!("unexpected control response {r:?}"),
    }
}

/// The answer of a supervisor older than the request it was sent: the caller falls back to
/// the requests that supervisor knows.
fn older_supervisor(e: &PlatformError) -> bool {
    matches!(e, PlatformError::Instance { what, .. } if what.starts_with(ctl::MALFORMED_REQUEST))
}

impl Agent {
    /// The agent of instance `id` whose sockets are in `dir`.
    pub fn new(id: InstanceId, dir: impl Into<PathBuf>) -> Self {
        Self {
            id,
            dir: dir.into(),
            kept: None,
        }
    }

    /// The same agent, its requests sent over `kept` ([`ctl::call_kept`]).
    pub fn keeping(mut self, kept: Arc<Mutex<ctl::Kept>>) -> Self {
        self.kept = Some(kept);
        self
    }

    /// One control request.
    pub fn call(&self, req: &Request) -> Result<(Response, Vec<OwnedFd>), PlatformError> {
        let socket = self.dir.join("ctl.sock");
        match &self.kept {
            Some(k) => {
                let mut kept = k.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                ctl::call_kept(self.id, &socket, &mut kept, req)
            }
            None => ctl::call(self.id, &socket, req),
        }
    }

    /// A request answered with `Done`.
    pub fn expect_done(&self, req: &Request) -> Result<(), PlatformError> {
        match self.call(req)?.0 {
            Response::Done => Ok(()),
            other => Err(unexpected(self.id, &other)),
        }
    }

    /// Whether it answers a ping now, and what runs on it.
    pub fn workloads(&self) -> Option<Vec<WorkloadInfo>> {
        match self.call(&Request::Ping) {
            Ok((Response::Pong { workloads, .. }, _)) => Some(workloads),
            _ => None,
        }
    }

    /// One workload's info (a supervisor that does not know `Workload` is pinged).
    pub fn workload(&self, name: &str) -> Result<WorkloadInfo, PlatformError> {
        let missing = || PlatformError::NoSuchWorkload {
            instance: self.id,
            workload: name.to_owned(),
        };
        match self.call(&Request::Workload {
            name: name.to_owned(),
        }) {
            Ok((Response::Workload(info), _)) => Ok(info),
            Ok((other, _)) => Err(unexpected(self.id, &other)),
            Err(e) if older_supervisor(&e) => self
                .workloads()
                .and_then(|ws| ws.into_iter().find(|w| w.name == name))
                .ok_or_else(missing),
            Err(PlatformError::Instance { what, .. })
                if what.contains("does not run on this instance") =>
            {
                Err(missing())
            }
            Err(e) => Err(e),
        }
    }

    /// Tells it to accept channel frames of `upgrade_id`.
    pub fn expect_upgrade(&self, upgrade_id: UpgradeId) -> Result<(), PlatformError> {
        self.expect_done(&Request::Expect {
            upgrade_id: upgrade_id.to_string(),
        })
    }

    /// Opens the channel to its receiver, told first to expect `upgrade_id`.
    pub fn connect(&self, upgrade_id: UpgradeId) -> Result<Box<dyn Transport>, PlatformError> {
        self.expect_upgrade(upgrade_id)?;
        let path = self.dir.join("chan.sock");
        let stream = std::os::unix::net::UnixStream::connect(&path)
            .map_err(|e| PlatformError::io(format!("connecting to {}", path.display()), e))?;
        let t = UnixTransport::from_std(stream).map_err(|e| PlatformError::Instance {
            id: self.id,
            what: format!("channel transport: {e}"),
        })?;
        Ok(Box::new(t))
    }

    pub fn start_workload(&self, spec: &WorkloadSpec) -> Result<WorkloadInfo, PlatformError> {
        match self
            .call(&Request::Start {
                spec: Box::new(spec.clone()),
            })?
            .0
        {
            Response::Started(info) => Ok(info),
            other => Err(unexpected(self.id, &other)),
        }
    }

    pub fn freeze(&self, workload: &str) -> Result<(), PlatformError> {
        self.expect_done(&Request::Freeze {
            name: workload.to_owned(),
        })
    }

    pub fn thaw(&self, workload: &str) -> Result<(), PlatformError> {
        self.expect_done(&Request::Thaw {
            name: workload.to_owned(),
        })
    }

    pub fn health(&self, workload: &str) -> Result<(bool, String), PlatformError> {
        match self
            .call(&Request::Health {
                name: workload.to_owned(),
            })?
            .0
        {
            Response::Health { healthy, detail } => Ok((healthy, detail)),
            other => Err(unexpected(self.id, &other)),
        }
    }

    pub fn preserved_fds(&self, workload: &str) -> Result<Vec<PreservedFd>, PlatformError> {
        let (resp, fds) = self.call(&Request::Fds {
            name: workload.to_owned(),
        })?;
        self.named_fds(resp, fds)
    }

    /// Freezes the workload and takes its preserved fds in one round trip (`FreezeFds`);
    /// an agent from before that request (it answers "malformed control request", having
    /// done nothing) gets `Freeze` and `Fds`, the second undone by a thaw if it fails.
    pub fn freeze_for_move(&self, workload: &str) -> Result<Vec<PreservedFd>, PlatformError> {
        match self.call(&Request::FreezeFds {
            name: workload.to_owned(),
        }) {
            Ok((resp, fds)) => self.named_fds(resp, fds),
            Err(e) if older_supervisor(&e) => {
                self.freeze(workload)?;
                self.preserved_fds(workload).inspect_err(|_| {
                    let _ = self.thaw(workload);
                })
            }
            Err(e) => Err(e),
        }
    }

    fn named_fds(
        &self,
        resp: Response,
        fds: Vec<OwnedFd>,
    ) -> Result<Vec<PreservedFd>, PlatformError> {
        let Response::Fds { names } = resp else {
            return Err(unexpected(self.id, &resp));
        };
        if names.len() != fds.len() {
            return Err(PlatformError::Instance {
                id: self.id,
                what: format!("{} fd names but {} fds received", names.len(), fds.len()),
            });
        }
        Ok(names
            .into_iter()
            .zip(fds)
            .map(|(name, fd)| PreservedFd { name, fd })
            .collect())
    }

    pub fn stop_workload(&self, workload: &str) -> Result<(), PlatformError> {
        self.expect_done(&Request::Stop {
            name: workload.to_owned(),
        })
    }

    /// Tells it which cpus its instance owns now.
    pub fn set_cpus(&self, cpus: &[u32]) -> Result<(), PlatformError> {
        self.expect_done(&Request::Cpus {
            cpus: cpus.to_vec(),
        })
    }
}

/// The channel side of an upgrade: one [`ChannelLink`], speaking as the old instance,
/// opened on first use and kept across calls.
#[derive(Debug, Default)]
pub struct Links {
    link: Option<ChannelLink>,
    upgrade: Option<UpgradeId>,
}

impl Links {
    /// Runs `f` with the link (created speaking as `speaker()`: `(id, release)`) and a
    /// connector that reaches instance `id` through `agent(id)`.
    pub fn with<T>(
        &mut self,
        speaker: impl FnOnce() -> Result<(InstanceId, String), PlatformError>,
        agent: &dyn Fn(InstanceId) -> Result<Agent, PlatformError>,
        f: impl FnOnce(&mut ChannelLink, &mut Connector<'_>) -> Result<T, PlatformError>,
    ) -> Result<T, PlatformError> {
        let mut link = if let Some(l) = self.link.take() {
            l
        } else {
            let (id, release) = speaker()?;
            let mut l = ChannelLink::new(id, release)?;
            if let Some(u) = self.upgrade {
                l.set_upgrade(u);
            }
            l
        };
        let mut connect = |id: InstanceId, upgrade: UpgradeId| agent(id)?.connect(upgrade);
        let r = f(&mut link, &mut connect);
        self.link = Some(link);
        r
    }

    pub fn set_upgrade(&mut self, upgrade_id: UpgradeId) {
        self.upgrade = Some(upgrade_id);
        if let Some(l) = self.link.as_mut() {
            l.set_upgrade(upgrade_id);
        }
    }

    pub fn abort(&mut self, to: InstanceId, workload: &str, reason: &str) {
        if let Some(l) = self.link.as_mut() {
            l.abort(to, workload, reason);
        }
    }

    pub fn disconnect(&mut self, release: Option<&Resources>) {
        if let Some(l) = self.link.as_mut() {
            l.close_all(release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fdpass;
    use std::os::unix::net::UnixListener;

    /// A control socket in `dir` that answers each request with `answer(request kind)`;
    /// returns the kinds of the requests it saw.
    fn server(
        dir: &std::path::Path,
        answer: fn(&str) -> (Response, bool),
    ) -> std::thread::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(dir.join("ctl.sock")).unwrap();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            // One connection per request (`ctl::call`); stop at the first idle second.
            listener.set_nonblocking(true).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while std::time::Instant::now() < deadline {
                let Ok((conn, _)) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                let (body, _) = fdpass::recv(&conn).unwrap().unwrap();
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let kind = match &v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Object(m) => m.keys().next().unwrap().clone(),
                    _ => panic!("request {v}"),
                };
                let (resp, with_fd) = answer(&kind);
                let memfd = crate::handover::sealed_memfd("data", b"state").unwrap();
                let fds: Vec<std::os::fd::BorrowedFd<'_>> = if with_fd {
                    vec![std::os::fd::AsFd::as_fd(&memfd)]
                } else {
                    vec![]
                };
                fdpass::send(&conn, &serde_json::to_vec(&resp).unwrap(), &fds).unwrap();
                seen.push(kind);
            }
            seen
        })
    }

    /// What a supervisor that does not know a request answers.
    fn malformed(why: &str) -> (Response, bool) {
        (
            Response::Error {
                message: format!("{}: {why}", crate::host::ctl::MALFORMED_REQUEST),
            },
            false,
        )
    }

    fn fds_answer() -> (Response, bool) {
        (
            Response::Fds {
                names: vec!["data".into()],
            },
            true,
        )
    }

    fn info(name: &str, pid: i32) -> WorkloadInfo {
        WorkloadInfo {
            name: name.into(),
            pid,
            ..WorkloadInfo::default()
        }
    }

    #[test]
    fn one_workload_is_one_request_and_an_older_agent_is_pinged() {
        let dir = tempfile::tempdir().unwrap();
        let seen = server(dir.path(), |kind| match kind {
            "Workload" => (Response::Workload(info("kv", 7)), false),
            _ => (Response::Done, false),
        });
        assert_eq!(Agent::new(1, dir.path()).workload("kv").unwrap().pid, 7);
        assert_eq!(seen.join().unwrap(), vec!["Workload"]);

        let dir = tempfile::tempdir().unwrap();
        let seen = server(dir.path(), |kind| match kind {
            "Workload" => malformed("unknown variant `Workload`"),
            "Ping" => (
                Response::Pong {
                    id: 1,
                    kernel_release: "7.2.13-mkA".into(),
                    cpus: vec![0],
                    freezer: "cgroup.freeze".into(),
                    workloads: vec![info("other", 5), info("kv", 9)],
                },
                false,
            ),
            _ => (Response::Done, false),
        });
        let a = Agent::new(1, dir.path());
        assert_eq!(a.workload("kv").unwrap().pid, 9);
        let e = a.workload("gone").unwrap_err();
        assert!(matches!(e, PlatformError::NoSuchWorkload { .. }), "{e}");
        assert_eq!(
            seen.join().unwrap(),
            vec!["Workload", "Ping", "Workload", "Ping"]
        );
    }

    #[test]
    fn an_unknown_workload_is_no_such_workload() {
        let dir = tempfile::tempdir().unwrap();
        let _seen = server(dir.path(), |_| {
            (
                Response::Error {
                    message: "workload \"kv\" does not run on this instance".into(),
                },
                false,
            )
        });
        let e = Agent::new(1, dir.path()).workload("kv").unwrap_err();
        assert!(matches!(e, PlatformError::NoSuchWorkload { .. }), "{e}");
    }

    #[test]
    fn freeze_for_move_is_one_request() {
        let dir = tempfile::tempdir().unwrap();
        let seen = server(dir.path(), |kind| match kind {
            "FreezeFds" => fds_answer(),
            _ => (Response::Done, false),
        });
        let fds = Agent::new(1, dir.path()).freeze_for_move("kv").unwrap();
        assert_eq!(fds.len(), 1);
        assert_eq!(fds[0].name, "data");
        assert_eq!(seen.join().unwrap(), vec!["FreezeFds"]);
    }

    #[test]
    fn an_agent_without_freeze_fds_gets_freeze_then_fds() {
        let dir = tempfile::tempdir().unwrap();
        let seen = server(dir.path(), |kind| match kind {
            "FreezeFds" => malformed("unknown variant `FreezeFds`"),
            "Fds" => fds_answer(),
            _ => (Response::Done, false),
        });
        let fds = Agent::new(1, dir.path()).freeze_for_move("kv").unwrap();
        assert_eq!(fds.len(), 1);
        assert_eq!(seen.join().unwrap(), vec!["FreezeFds", "Freeze", "Fds"]);
    }

    #[test]
    fn the_fallback_thaws_when_the_fds_cannot_be_taken() {
        let dir = tempfile::tempdir().unwrap();
        let seen = server(dir.path(), |kind| match kind {
            "FreezeFds" => malformed("?"),
            "Fds" => (
                Response::Error {
                    message: "duplicating data: EMFILE".into(),
                },
                false,
            ),
            _ => (Response::Done, false),
        });
        let e = Agent::new(1, dir.path()).freeze_for_move("kv").unwrap_err();
        assert!(e.to_string().contains("EMFILE"), "{e}");
        assert_eq!(
            seen.join().unwrap(),
            vec!["FreezeFds", "Freeze", "Fds", "Thaw"]
        );
    }

    #[test]
    fn any_other_error_of_freeze_fds_is_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let seen = server(dir.path(), |_| {
            (
                Response::Error {
                    message: "workload kv is not running here".into(),
                },
                false,
            )
        });
        let e = Agent::new(1, dir.path()).freeze_for_move("kv").unwrap_err();
        assert!(e.to_string().contains("not running"), "{e}");
        assert_eq!(seen.join().unwrap(), vec!["FreezeFds"]);
    }
}
