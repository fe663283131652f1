//! `mk-upgrade emu`: the emulated machine (EMULATION of the multikernel interface).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::app::{CliError, Global};
use upgrade_agent::exit::Exit;
use upgrade_agent::platform::Platform;
use upgrade_agent::platform::emulated::machine::{self, InitError};

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
    match machine::init(&g.state(), kernel, cpus) {
        Ok(b) => Ok(serde_json::to_value(&b).unwrap_or_default()),
        Err(e) => Err(init_error(&e)),
    }
}

/// The documented exit code and message of a machine that could not be booted.
pub fn init_error(e: &InitError) -> CliError {
    match e {
        InitError::AlreadyUp => CliError::new(Exit::PreflightFailed, e.to_string()),
        InitError::Io { .. } | InitError::Workloads(_) => CliError::new(Exit::Io, e.to_string()),
        InitError::NotAKernel { .. } => CliError::new(Exit::NotAKernel, e.to_string()),
        InitError::Platform(_) => perr(e),
        InitError::State(s) => CliError::state(s),
    }
}

/// Halts and removes every instance.
pub fn down(platform: &mut dyn Platform) -> Result<usize, CliError> {
    machine::down(platform).map_err(perr)
}

/// Runs an `emu` subcommand.
pub fn run(g: &Global, a: EmuArgs) -> Result<ExitCode, CliError> {
    match a.command {
        EmuCommand::Init { kernel, cpus, json } => {
            // Every verb that changes the machine takes the upgrade lock (or refuses,
            // naming the holder): an upgrade in flight is never pulled from under it.
            let _guard = crate::upgrade::lock(g)?;
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
            let mut p = g.open_emulated()?;
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
            let _guard = crate::upgrade::lock(g)?;
            let mut p = g.open_emulated()?;
            let n = down(&mut p)?;
            println!("{n} instance(s) halted and removed");
        }
    }
    Ok(Exit::Ok.into())
}
