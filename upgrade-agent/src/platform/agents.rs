//! Reaching the agent of an instance: its control socket (`ctl.sock`: start, freeze, thaw,
//! health, fds, stop, halt) and its channel receiver (`chan.sock`), both Unix sockets in
//! the instance's directory. Shared by the emulated platform (supervisor processes) and
//! the multikernel platform on its SIMULATED kernel (agents started by the simulated
//! kernel). A real multikernel kernel's agent is reached over AF_VSOCK instead, which
//! cannot carry descriptors: see `docs/kernel.md`.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

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
}

fn unexpected(id: InstanceId, r: &Response) -> PlatformError {
    PlatformError::Instance {
        id,
        what: format!("unexpected control response {r:?}"),
    }
}

impl Agent {
    /// The agent of instance `id` whose sockets are in `dir`.
    pub fn new(id: InstanceId, dir: impl Into<PathBuf>) -> Self {
        Self {
            id,
            dir: dir.into(),
        }
    }

    /// One control request.
    pub fn call(&self, req: &Request) -> Result<(Response, Vec<OwnedFd>), PlatformError> {
        ctl::call(self.id, &self.dir.join("ctl.sock"), req)
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
