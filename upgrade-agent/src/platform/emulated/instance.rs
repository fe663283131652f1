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

/// Runs the supervisor of instance `id` until it is halted. Never returns on success.
pub fn run(state_dir: &Path, id: InstanceId) -> Result<(), InstanceError> {
    let platform = EmulatedPlatform::new(state_dir)?;
    let entry = platform.store().read().and_then(|p| p.get(id).cloned())?;
    let dir = instance_dir(platform.store().dir(), id);
    let kernel_release = entry
        .kernel_release
        .clone()
        .ok_or(InstanceError::NoKernel(id))?;
    pin_self(&entry.resources.cpus).map_err(|source| InstanceError::Pin {
        cpus: entry.resources.cpus.clone(),
        source,
    })?;
    let tag = format!(
        "mk-upgrade-emulated/{}/instance-{id}",
        super::state_tag(state_dir)
    );
    let freezer = Freezer::detect(&tag);
    let mut instance = Instance::new(
        id,
        kernel_release,
        entry.resources.cpus.clone(),
        freezer,
        dir.clone(),
        state_dir.to_owned(),
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
    tracing::info!(id, cpus = ?entry.resources.cpus, "instance active (emulated)");
    let handler: Arc<CtlHandler> = Arc::new(emulated_handler);
    serve_ctl_listener(&shared, &ctl, &handler);
    Ok(())
}
