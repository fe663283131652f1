//! The process of one **emulated** kernel instance, `mk-agentd --instance ID`: it pins
//! itself to the instance's cpus, then serves the generic instance host
//! ([`crate::host::supervisor`]: `ctl.sock`) and the channel receiver
//! ([`crate::host::receiver`]: `chan.sock`). See [`crate::host::supervisor`] for what it
//! stands for on a real multikernel host.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{EmulatedPlatform, instance_dir};
use crate::host::supervisor::{
    CtlHandler, Instance, Shared, emulated_handler, pin_self, serve_ctl_listener,
};
use crate::platform::{InstanceId, PlatformError};
use crate::sys::cgroup::Freezer;

/// Why an emulated instance could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The emulator's state (its pool of instances) could not be read.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// The instance exists but no kernel was loaded into it.
    #[error("instance {0} has no kernel loaded")]
    NoKernel(InstanceId),
    /// Pinning this process to the instance's cpus failed.
    #[error("pinning to cpus {cpus:?}: {source}")]
    Pin {
        cpus: Vec<u32>,
        #[source]
        source: io::Error,
    },
    /// Binding `ctl.sock` or `chan.sock` failed.
    #[error("binding {}: {source}", .path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What one instance agent serves: which instance, on which cpus, its kernel's release,
/// where its sockets go and which cgroup holds its workloads.
#[derive(Debug, Clone)]
pub struct AgentParams {
    pub id: InstanceId,
    pub kernel_release: String,
    pub cpus: Vec<u32>,
    /// Where `ctl.sock`, `chan.sock` and `notify.sock` are bound.
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    /// The instance's cgroup, relative to the cgroup2 mount.
    pub cgroup_tag: String,
    /// For its log line (`emulated`, `SIMULATED multikernel`).
    pub label: &'static str,
}

/// Runs the supervisor of emulated instance `id` until it is halted. Never returns on
/// success.
pub fn run(state_dir: &Path, id: InstanceId) -> Result<(), InstanceError> {
    let platform = EmulatedPlatform::new(state_dir)?;
    let entry = platform.store().read().and_then(|p| p.get(id).cloned())?;
    let kernel_release = entry
        .kernel_release
        .clone()
        .ok_or(InstanceError::NoKernel(id))?;
    serve(&AgentParams {
        id,
        kernel_release,
        cpus: entry.resources.cpus.clone(),
        dir: instance_dir(platform.store().dir(), id),
        state_dir: state_dir.to_owned(),
        cgroup_tag: format!(
            "mk-upgrade-emulated/{}/instance-{id}",
            super::state_tag(state_dir)
        ),
        label: "emulated",
    })
}

/// Serves one instance agent (`ctl.sock`, `chan.sock`) until it is halted.
pub fn serve(p: &AgentParams) -> Result<(), InstanceError> {
    let (id, dir) = (p.id, &p.dir);
    pin_self(&p.cpus).map_err(|source| InstanceError::Pin {
        cpus: p.cpus.clone(),
        source,
    })?;
    let freezer = Freezer::detect(&p.cgroup_tag);
    let mut instance = Instance::new(
        id,
        p.kernel_release.clone(),
        p.cpus.clone(),
        freezer,
        dir.clone(),
        p.state_dir.clone(),
    );
    // The new copy starts beside the old one: established connections can be handed over.
    instance.connection_handoff = true;
    let shared: Shared = Arc::new(Mutex::new(instance));
    crate::host::watch::start_background(&shared).map_err(|source| InstanceError::Bind {
        path: dir.join("notify.sock"),
        source,
    })?;
    let bind = |name: &str| -> Result<UnixListener, InstanceError> {
        let path = dir.join(name);
        crate::host::peer::bind_private(&path)
            .map_err(|source| InstanceError::Bind { path, source })
    };
    let chan = bind("chan.sock")?;
    let ctl = bind("ctl.sock")?;
    {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            let gate = crate::host::peer::Gate::new(crate::host::peer::MAX_CHANNEL_CONNECTIONS);
            for conn in chan.incoming().flatten() {
                let Some(ticket) = crate::host::peer::admit(&gate, &conn, "chan.sock") else {
                    continue;
                };
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    crate::host::receiver::serve(&shared, conn);
                    drop(ticket);
                });
            }
        });
    }
    // Before the instance reports active, so outside any workload's blackout.
    crate::handover::warm_up();
    tracing::info!(id, cpus = ?p.cpus, label = p.label, "instance active");
    let handler: Arc<CtlHandler> = Arc::new(emulated_handler);
    serve_ctl_listener(&shared, &ctl, &handler);
    Ok(())
}
