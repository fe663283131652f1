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
        match ctl::call(0, &socket, &Request::Ping)? {
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
