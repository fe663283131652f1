//! The EMULATED machine as a whole: boot its first instance with a kernel image and start
//! the declared workloads on it (`mk-upgrade emu init`), or halt and remove every instance
//! (`mk-upgrade emu down`).

use std::os::fd::AsFd;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::EmulatedPlatform;
use crate::platform::{
    InstanceId, InstanceState, LoadableKernel, Platform, PlatformError, Resources, WorkloadInfo,
};
use crate::statedir::{StateDir, StateDirError};

/// Why the machine could not be booted.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "the machine already has instances; `mk-upgrade emu down` (emulated) or `mk-upgrade multikernel down` first"
    )]
    AlreadyUp,
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    NotAKernel {
        path: String,
        #[source]
        source: crate::verify::bzimage::NotAKernel,
    },
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error(transparent)]
    State(#[from] StateDirError),
    #[error("writing the workload file: {0}")]
    Workloads(String),
}

/// What booted.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Booted {
    pub instance: InstanceId,
    pub kernel_release: String,
    pub cpus: Vec<u32>,
    pub workloads: Vec<WorkloadInfo>,
    pub emulated: bool,
}

/// Boots the first instance with `kernel` on `cpus` (default: the first cpu), records the
/// kernel as the current slot, and starts every workload of the workload file.
pub fn init(state: &StateDir, kernel: &Path, cpus: &[u32]) -> Result<Booted, InitError> {
    state.ensure()?;
    let mut platform = EmulatedPlatform::new(state.root())?;
    init_on(state, &mut platform, kernel, cpus)
}

/// [`init`] on any side-by-side platform (the multikernel platform's `multikernel init`).
pub fn init_on(
    state: &StateDir,
    platform: &mut dyn Platform,
    kernel: &Path,
    cpus: &[u32],
) -> Result<Booted, InitError> {
    state.ensure()?;
    let emulated = platform.probe()?.emulated;
    if !platform.instances()?.is_empty() {
        return Err(InitError::AlreadyUp);
    }
    let path = kernel.display().to_string();
    let bytes = std::fs::read(kernel).map_err(|source| InitError::Io {
        path: path.clone(),
        source,
    })?;
    let info = crate::verify::bzimage::parse(&bytes).map_err(|source| InitError::NotAKernel {
        path: path.clone(),
        source,
    })?;
    let sha: [u8; 32] = Sha256::digest(&bytes).into();
    let caps = platform.probe()?;
    let cpus = if cpus.is_empty() {
        caps.cpus.iter().take(1).copied().collect()
    } else {
        cpus.to_vec()
    };
    let res = Resources {
        cpus,
        memory_bytes: caps.spare_memory_bytes / 2,
    };
    let memfd = crate::handover::sealed_memfd("mk-initial-kernel", &bytes).map_err(|source| {
        InitError::Io {
            path: "a memfd for the kernel".into(),
            source,
        }
    })?;
    let id = platform.create_instance(&res)?;
    let lk = LoadableKernel {
        image: memfd.as_fd(),
        release: info.release.clone(),
        sha256: sha,
        initrd: None,
        cmdline: "",
    };
    platform.load(id, &lk)?;
    platform.boot(id, None)?;
    let mut slots = state.slots()?;
    slots
        .store(rollback::Slot::Current, &bytes, &info.release, &sha)
        .map_err(|e| InitError::State(StateDirError::Slots(e)))?;
    let specs = state.load_workloads()?;
    // Keep the workload file where later commands look for it.
    let default = state.root().join("workloads.toml");
    if state.workloads_path() != default {
        let text = toml::to_string(&specs).map_err(|e| InitError::Workloads(e.to_string()))?;
        rollback::atomic_write(&default, text.as_bytes())
            .map_err(|e| InitError::Workloads(e.to_string()))?;
    }
    let mut started = Vec::new();
    for spec in &specs.workloads {
        started.push(platform.start_workload(id, spec)?);
    }
    Ok(Booted {
        instance: id,
        kernel_release: info.release,
        cpus: res.cpus,
        workloads: started,
        emulated,
    })
}

/// Halts and removes every instance; returns how many there were.
pub fn down(platform: &mut dyn Platform) -> Result<usize, PlatformError> {
    let insts = platform.instances()?;
    for i in &insts {
        if matches!(i.state, InstanceState::Active | InstanceState::Failed) {
            platform.halt(i.id)?;
        }
        platform.destroy(i.id)?;
    }
    Ok(insts.len())
}
