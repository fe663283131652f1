//! The operator's side of the LUO platform: the host agent (`mk-agentd serve`) owns
//! `/dev/liveupdate` and runs the orchestrator; the CLI talks to it over its control
//! socket (`STATE_DIR/luo/ctl.sock`) to ask what runs and to hand it an upgrade.

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fault::Faults;
use crate::host::ctl::{self, Request, Response};
use crate::model::{PlatformError, WorkloadInfo};
use crate::record::{UpgradeKind, UpgradeRecord};

/// How long an upgrade may take before the agent either kexecs or answers.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(600);

/// What the host agent reports about the running kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    pub release: String,
    pub cpus: Vec<u32>,
    pub freezer: String,
    pub workloads: Vec<WorkloadInfo>,
}

/// How an upgrade handed to the agent ended, as far as this kernel saw it.
#[derive(Debug)]
pub enum Handed {
    /// The control socket closed without an answer: the agent stopped (killed or crashed)
    /// mid-upgrade. (A kexec never gets here: it ends this process with the old kernel, with
    /// the agent still in the `reboot` call.) Its restart settles the upgrade.
    AgentStopped,
    /// Nothing to do (a rollback with no previous kernel kept); nothing changed.
    NothingToDo(String),
    /// Refused: the kernel is below the version floor; nothing changed.
    BelowFloor(String),
    /// The upgrade ended in this kernel (refused, rolled back before the kexec, failed).
    Finished {
        record: Box<UpgradeRecord>,
        error: Option<String>,
    },
}

/// A client of the host agent of one state directory.
#[derive(Debug, Clone)]
pub struct AgentClient {
    state_dir: PathBuf,
}

impl AgentClient {
    /// The client of the agent serving `STATE_DIR/luo/ctl.sock`.
    pub fn new(state_dir: &Path) -> Self {
        AgentClient {
            state_dir: state_dir.to_owned(),
        }
    }

    fn socket(&self) -> PathBuf {
        super::ctl_socket(&self.state_dir)
    }

    /// Who runs, on which kernel.
    pub fn status(&self) -> Result<AgentStatus, PlatformError> {
        let answer =
            ctl::call(0, &self.socket(), &Request::Ping).map_err(|e| PlatformError::Instance {
                id: 0,
                what: format!(
                    "the luo host agent does not answer ({e}); start it with `mk-agentd serve \
                     --state-dir {}` (it owns /dev/liveupdate and runs the workloads)",
                    self.state_dir.display()
                ),
            })?;
        match answer {
            (
                Response::Pong {
                    kernel_release,
                    cpus,
                    freezer,
                    workloads,
                    ..
                },
                _,
            ) => Ok(AgentStatus {
                release: kernel_release,
                cpus,
                freezer,
                workloads,
            }),
            (other, _) => Err(PlatformError::Instance {
                id: 0,
                what: format!("unexpected answer to Ping: {other:?}"),
            }),
        }
    }

    /// Hands an upgrade to the agent: `kernel` (verified, sealed) to `release`, or the
    /// agent's previous kernel when `kernel` is `None` (rollback).
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        kind: UpgradeKind,
        release: &str,
        sha256: &[u8; 32],
        cmdline: &str,
        faults: Faults,
        kernel: Option<BorrowedFd<'_>>,
        initrd: Option<BorrowedFd<'_>>,
        floor: Option<String>,
    ) -> Result<Handed, PlatformError> {
        let req = Request::LuoApply {
            kind,
            release: release.to_owned(),
            sha256: hex::encode(sha256),
            cmdline: cmdline.to_owned(),
            faults,
            kernel_attached: kernel.is_some(),
            initrd_attached: initrd.is_some(),
            floor,
        };
        let fds: Vec<BorrowedFd<'_>> = kernel.into_iter().chain(initrd).collect();
        match ctl::call_with_fds(0, &self.socket(), &req, &fds, UPGRADE_TIMEOUT) {
            Ok((Response::Finished { record, error }, _)) => Ok(Handed::Finished { record, error }),
            Ok((Response::NothingToDo { message }, _)) => Ok(Handed::NothingToDo(message)),
            Ok((Response::BelowFloor { message }, _)) => Ok(Handed::BelowFloor(message)),
            Ok((other, _)) => Err(PlatformError::Instance {
                id: 0,
                what: format!("unexpected answer to LuoApply: {other:?}"),
            }),
            Err(e) if e.to_string().contains("closed the control socket") => {
                Ok(Handed::AgentStopped)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_agent_the_client_says_how_to_start_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = AgentClient::new(dir.path())
            .status()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ctl.sock") && e.contains("mk-agentd serve"),
            "{e}"
        );
    }

    #[test]
    fn an_agent_that_dies_mid_upgrade_is_reported_as_stopped_not_as_a_kexec() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(super::super::agent_dir(dir.path())).unwrap();
        let listener =
            std::os::unix::net::UnixListener::bind(super::super::ctl_socket(dir.path())).unwrap();
        // The "agent": reads the request, then dies without answering.
        let agent = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let _ = crate::sys::fdpass::recv(&stream);
        });
        let handed = AgentClient::new(dir.path())
            .apply(
                UpgradeKind::Apply,
                "7.3.4-mkB",
                &[0; 32],
                "",
                Faults::NONE,
                None,
                None,
                None,
            )
            .unwrap();
        agent.join().unwrap();
        assert!(matches!(handed, Handed::AgentStopped), "{handed:?}");
    }
}
