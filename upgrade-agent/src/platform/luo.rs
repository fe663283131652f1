//! The mainline LUO platform as the CLI's `check` and `status` see it: the running kernel
//! is the single active instance (id 0), described by the host agent (`mk-agentd serve`,
//! [`crate::luo::agent`]) over its control socket. A new kernel does not boot beside it but
//! replaces it by kexec, so the instance lifecycle of the multikernel model does not apply:
//! those methods return [`PlatformError::Unsupported`]; upgrades go through
//! [`crate::luo::client`].

use std::path::{Path, PathBuf};

use kho_proto::channel::{Transport, UpgradeId};

use super::{
    Capabilities, InstanceId, InstanceInfo, InstanceState, LoadableKernel, Platform, PlatformError,
    PlatformKind, PreservedFd, Resources, WorkloadInfo,
};
use crate::platform::emulated::ctl::{self, Request, Response};
use crate::workload::WorkloadSpec;

const LIFECYCLE: &str = "instance lifecycle on the luo platform (a new kernel replaces the \
     running one by kexec: use `mk-upgrade apply --platform luo`)";

/// The luo platform of one state directory.
#[derive(Debug)]
pub struct LuoPlatform {
    state_dir: PathBuf,
}

impl LuoPlatform {
    /// The platform whose host agent serves `STATE_DIR/luo/ctl.sock`.
    pub fn new(state_dir: &Path) -> Self {
        LuoPlatform {
            state_dir: state_dir.to_owned(),
        }
    }

    fn pong(&self) -> Result<(String, Vec<u32>, String, Vec<WorkloadInfo>), PlatformError> {
        let socket = crate::luo::ctl_socket(&self.state_dir);
        let answer =
            ctl::call(0, &socket, &Request::Ping).map_err(|e| PlatformError::Instance {
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
            ) => Ok((kernel_release, cpus, freezer, workloads)),
            (other, _) => Err(PlatformError::Instance {
                id: 0,
                what: format!("unexpected answer to Ping: {other:?}"),
            }),
        }
    }
}

impl Platform for LuoPlatform {
    fn probe(&mut self) -> Result<Capabilities, PlatformError> {
        let (release, cpus, freezer, _) = self.pong()?;
        Ok(Capabilities {
            kind: PlatformKind::Luo,
            emulated: false,
            side_by_side: false,
            fds_over_channel: false,
            cpus,
            spare_cpus: Vec::new(),
            spare_memory_bytes: 0,
            freezer,
            notes: vec![format!(
                "mainline LUO on {release}: the new kernel replaces this one by kexec; \
                 workloads' memfds survive in /dev/liveupdate sessions, listeners are re-bound"
            )],
        })
    }

    fn instances(&mut self) -> Result<Vec<InstanceInfo>, PlatformError> {
        let (release, cpus, _, workloads) = self.pong()?;
        Ok(vec![InstanceInfo {
            id: 0,
            state: InstanceState::Active,
            resources: Resources {
                cpus,
                memory_bytes: 0,
            },
            kernel_release: Some(release),
            workloads,
        }])
    }

    fn create_instance(&mut self, _: &Resources) -> Result<InstanceId, PlatformError> {
        Err(PlatformError::Unsupported(LIFECYCLE))
    }
    fn load(&mut self, _: InstanceId, _: &LoadableKernel<'_>) -> Result<(), PlatformError> {
        Err(PlatformError::Unsupported(LIFECYCLE))
    }
    fn boot(&mut self, _: InstanceId) -> Result<(), PlatformError> {
        Err(PlatformError::Unsupported(LIFECYCLE))
    }
    fn connect(
        &mut self,
        _: InstanceId,
        _: UpgradeId,
    ) -> Result<Box<dyn Transport>, PlatformError> {
        Err(PlatformError::Unsupported(LIFECYCLE))
    }
    fn resize(&mut self, _: InstanceId, _: &Resources) -> Result<(), PlatformError> {
        Err(PlatformError::Unsupported(LIFECYCLE))
    }
    fn start_workload(
        &mut self,
        _: InstanceId,
        spec: &WorkloadSpec,
    ) -> Result<WorkloadInfo, PlatformError> {
        let socket = crate::luo::ctl_socket(&self.state_dir);
        match ctl::call(
            0,
            &socket,
            &Request::Start {
                spec: Box::new(spec.clone()),
            },
        )? {
            (Response::Started(info), _) => Ok(info),
            (other, _) => Err(PlatformError::Instance {
                id: 0,
                what: format!("unexpected answer to Start: {other:?}"),
            }),
        }
    }
    fn freeze(&mut self, _: InstanceId, _: &str) -> Result<(), PlatformError> {
        Err(PlatformError::Unsupported(LIFECYCLE))
    }
    fn thaw(&mut self, _: InstanceId, _: &str) -> Result<(), PlatformError> {
        Err(PlatformError::Unsupported(LIFECYCLE))
    }
    fn preserved_fds(&mut self, _: InstanceId, _: &str) -> Result<Vec<PreservedFd>, PlatformError> {
        Err(PlatformError::Unsupported(LIFECYCLE))
    }
    fn stop_workload(&mut self, _: InstanceId, _: &str) -> Result<(), PlatformError> {
        Err(PlatformError::Unsupported(LIFECYCLE))
    }
    fn halt(&mut self, _: InstanceId) -> Result<(), PlatformError> {
        Err(PlatformError::Unsupported(LIFECYCLE))
    }
    fn transfer_resources(
        &mut self,
        _: InstanceId,
        _: InstanceId,
    ) -> Result<Resources, PlatformError> {
        Err(PlatformError::Unsupported(LIFECYCLE))
    }
    fn destroy(&mut self, _: InstanceId) -> Result<(), PlatformError> {
        Err(PlatformError::Unsupported(LIFECYCLE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn without_an_agent_the_platform_says_how_to_start_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = LuoPlatform::new(dir.path());
        let e = p.probe().unwrap_err().to_string();
        assert!(
            e.contains("ctl.sock") && e.contains("mk-agentd serve"),
            "{e}"
        );
        assert!(matches!(
            p.create_instance(&Resources::default()),
            Err(PlatformError::Unsupported(_))
        ));
        assert!(matches!(p.halt(0), Err(PlatformError::Unsupported(_))));
    }

    /// The host agent on a kernel without /dev/liveupdate: it serves the instance protocol
    /// (the running kernel is instance 0) and refuses an upgrade, naming what is missing.
    #[test]
    fn host_agent_serves_ping_and_refuses_upgrades_without_liveupdate() {
        if Path::new(crate::sys::luo::DEV_PATH).exists() {
            return; // a LUO host: the agent would take the exclusive device
        }
        let dir = tempfile::tempdir().unwrap();
        let opts = crate::luo::agent::ServeOptions {
            state_dir: dir.path().to_owned(),
            workloads: None,
            kernel_image: None,
        };
        std::thread::spawn(move || crate::luo::agent::serve(&opts));
        let sock = crate::luo::ctl_socket(dir.path());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "the agent never bound {sock:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut p = LuoPlatform::new(dir.path());
        let caps = p.probe().unwrap();
        assert_eq!(caps.kind, PlatformKind::Luo);
        assert!(!caps.emulated && !caps.side_by_side);
        let inst = p.instances().unwrap();
        assert_eq!(inst.len(), 1);
        assert_eq!(inst[0].state, InstanceState::Active);
        assert_eq!(
            inst[0].kernel_release.as_deref(),
            Some(crate::luo::running_release().as_str())
        );
        assert!(inst[0].workloads.is_empty());
        let boot =
            std::fs::read_to_string(crate::luo::agent_dir(dir.path()).join("boot.json")).unwrap();
        assert!(boot.contains("\"resumed\":false"), "{boot}");
        let req = Request::LuoUpgrade {
            upgrade_id: "00".repeat(16),
            record_json: "{}".into(),
            cmdline: String::new(),
            faults: ctl::LuoFaults::default(),
            kernel_attached: false,
            initrd_attached: false,
        };
        let e = ctl::call(0, &sock, &req).unwrap_err().to_string();
        assert!(
            e.contains("/dev/liveupdate") && e.contains("liveupdate=on"),
            "{e}"
        );
    }
}
