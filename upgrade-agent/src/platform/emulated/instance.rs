//! The process of one **emulated** kernel instance, `mk-agentd --instance ID`: it pins
//! itself to the instance's cpus, then serves the generic instance host
//! ([`crate::host::supervisor`]: `ctl.sock`) and the channel receiver
//! ([`crate::host::receiver`]: `chan.sock`). See [`crate::host::supervisor`] for what it
//! stands for on a real multikernel host.

use std::collections::BTreeMap;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{EmulatedPlatform, instance_dir};
use crate::host::supervisor::{
    CtlHandler, Instance, Shared, emulated_handler, pin_self, serve_ctl_listener,
};
use crate::platform::InstanceId;
use crate::sys::cgroup::Freezer;

/// Runs the supervisor of instance `id` until it is halted. Never returns on success.
pub fn run(state_dir: &Path, id: InstanceId) -> Result<(), String> {
    let platform = EmulatedPlatform::new(state_dir).map_err(|e| e.to_string())?;
    let entry = platform
        .store()
        .read()
        .and_then(|p| p.get(id).cloned())
        .map_err(|e| e.to_string())?;
    let dir = instance_dir(platform.store().dir(), id);
    let kernel_release = entry
        .kernel_release
        .clone()
        .ok_or_else(|| format!("instance {id} has no kernel loaded"))?;
    pin_self(&entry.resources.cpus)
        .map_err(|e| format!("pinning to cpus {:?}: {e}", entry.resources.cpus))?;
    let tag = format!(
        "mk-upgrade-emulated/{}/instance-{id}",
        super::state_tag(state_dir)
    );
    let freezer = Freezer::detect(&tag);
    let shared: Shared = Arc::new(Mutex::new(Instance {
        id,
        kernel_release,
        cpus: entry.resources.cpus.clone(),
        freezer,
        workloads: BTreeMap::new(),
        dir: dir.clone(),
        state_dir: state_dir.to_owned(),
        halting: false,
        expected_upgrade: None,
    }));
    let bind = |name: &str| -> Result<UnixListener, String> {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        UnixListener::bind(&path).map_err(|e| format!("binding {}: {e}", path.display()))
    };
    let chan = bind("chan.sock")?;
    let ctl = bind("ctl.sock")?;
    {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            for conn in chan.incoming().flatten() {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || crate::host::receiver::serve(&shared, conn));
            }
        });
    }
    tracing::info!(id, cpus = ?entry.resources.cpus, "instance active (emulated)");
    let handler: Arc<CtlHandler> = Arc::new(emulated_handler);
    serve_ctl_listener(&shared, &ctl, &handler);
    Ok(())
}
