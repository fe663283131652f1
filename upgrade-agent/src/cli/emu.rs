//! `mk-upgrade emu`: the emulated machine (EMULATION of the multikernel interface).

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;
use sha2::{Digest, Sha256};

use super::app::{CliError, Global};
use crate::exit::Exit;
use crate::platform::{InstanceState, LoadableKernel, Platform, Resources};

/// `mk-upgrade emu ...`.
#[derive(Debug, clap::Args)]
pub struct EmuArgs {
    #[command(subcommand)]
    pub command: EmuCommand,
}

/// Emulator subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum EmuCommand {
    /// Boot the first (running) instance with KERNEL and start the declared workloads.
    Init {
        /// The kernel the machine "runs" (its release is read from the bzImage header).
        #[arg(long)]
        kernel: PathBuf,
        /// Cpus of the first instance (default: the first cpu).
        #[arg(long, value_delimiter = ',')]
        cpus: Vec<u32>,
        #[arg(long)]
        json: bool,
    },
    /// List instances.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Halt and remove every instance (stops their workloads).
    Down,
}

fn perr(e: impl std::fmt::Display) -> CliError {
    CliError::new(Exit::Platform, e.to_string())
}

/// Boots the first instance with `kernel` and starts every workload of the workload file.
pub fn init(
    g: &Global,
    kernel: &std::path::Path,
    cpus: &[u32],
) -> Result<serde_json::Value, CliError> {
    let mut platform = g.open_platform()?;
    if !platform.instances().map_err(perr)?.is_empty() {
        return Err(CliError::new(
            Exit::PreflightFailed,
            "the emulated machine already has instances; `mk-upgrade emu down` first",
        ));
    }
    let bytes = std::fs::read(kernel)
        .map_err(|e| CliError::new(Exit::Io, format!("{}: {e}", kernel.display())))?;
    let info = crate::verify::bzimage::parse(&bytes)
        .map_err(|e| CliError::new(Exit::NotAKernel, format!("{}: {e}", kernel.display())))?;
    let sha: [u8; 32] = Sha256::digest(&bytes).into();
    let caps = platform.probe().map_err(perr)?;
    let cpus = if cpus.is_empty() {
        caps.cpus.iter().take(1).copied().collect()
    } else {
        cpus.to_vec()
    };
    let res = Resources {
        cpus,
        memory_bytes: caps.spare_memory_bytes / 2,
    };
    let memfd = crate::handover::sealed_memfd("mk-initial-kernel", &bytes)
        .map_err(|e| CliError::new(Exit::Io, e.to_string()))?;
    let id = platform.create_instance(&res).map_err(perr)?;
    let lk = LoadableKernel {
        image: memfd.as_fd(),
        release: info.release.clone(),
        sha256: sha,
        initrd: None,
        cmdline: "",
    };
    platform.load(id, &lk).map_err(perr)?;
    platform.boot(id).map_err(perr)?;
    let mut slots =
        rollback::Slots::open(&g.state_dir).map_err(|e| CliError::new(Exit::Io, e.to_string()))?;
    slots
        .store(rollback::Slot::Current, &bytes, &info.release, &sha)
        .map_err(|e| CliError::new(Exit::Io, e.to_string()))?;
    let specs = g.load_workloads()?;
    // Keep the workload file where later commands look for it.
    let default = g.state_dir.join("workloads.toml");
    if g.workloads_path() != default {
        let text =
            toml::to_string(&specs).map_err(|e| CliError::new(Exit::Internal, e.to_string()))?;
        rollback::atomic_write(&default, text.as_bytes())
            .map_err(|e| CliError::new(Exit::Io, e.to_string()))?;
    }
    let mut started = Vec::new();
    for spec in &specs.workloads {
        started.push(platform.start_workload(id, spec).map_err(perr)?);
    }
    Ok(json!({
        "instance": id,
        "kernel_release": info.release,
        "cpus": res.cpus,
        "workloads": started,
        "emulated": true,
    }))
}

/// Halts and removes every instance.
pub fn down(platform: &mut dyn Platform) -> Result<usize, CliError> {
    let insts = platform.instances().map_err(perr)?;
    for i in &insts {
        if matches!(i.state, InstanceState::Active | InstanceState::Failed) {
            platform.halt(i.id).map_err(perr)?;
        }
        platform.destroy(i.id).map_err(perr)?;
    }
    Ok(insts.len())
}

/// Runs an `emu` subcommand.
pub fn run(g: &Global, a: EmuArgs) -> Result<ExitCode, CliError> {
    match a.command {
        EmuCommand::Init { kernel, cpus, json } => {
            let doc = init(g, &kernel, &cpus)?;
            if json {
                println!("{doc}");
            } else {
                println!(
                    "EMULATED instance {} booted with kernel {} on cpus {}; {} workload(s) started",
                    doc["instance"],
                    doc["kernel_release"],
                    doc["cpus"],
                    doc["workloads"].as_array().map_or(0, Vec::len)
                );
            }
        }
        EmuCommand::Ls { json } => {
            let mut p = g.open_platform()?;
            let insts = p.instances().map_err(perr)?;
            if json {
                println!("{}", serde_json::to_value(&insts).unwrap_or_default());
            } else {
                for i in insts {
                    println!(
                        "instance {} [{}] kernel {} cpus {:?} workloads {}",
                        i.id,
                        i.state,
                        i.kernel_release.as_deref().unwrap_or("-"),
                        i.resources.cpus,
                        i.workloads.len()
                    );
                }
            }
        }
        EmuCommand::Down => {
            let mut p = g.open_platform()?;
            let n = down(p.as_mut())?;
            println!("{n} instance(s) halted and removed");
        }
    }
    Ok(Exit::Ok.into())
}
