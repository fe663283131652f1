//! `mk-agentd`: the mk-upgrade agent daemon.
//!
//! * `mk-agentd [--state-dir D]`: start-up duty of the agent on every boot: finish or undo
//!   an upgrade that was interrupted (journal recovery), then exit. Run it from a unit
//!   ordered before the workloads (see `nix/` and `docs/architecture.md`).
//! * `mk-agentd --instance ID --state-dir D`: the supervisor of one EMULATED kernel
//!   instance (started by the emulated platform, never by hand).
//! * `mk-agentd serve --state-dir D [--workloads F] [--kernel-image K]`: the host agent of a
//!   real kernel with LUO (`/dev/liveupdate`): runs the workloads, performs `mk-upgrade
//!   apply --platform luo` (preserve + kexec) and, in the next kernel, verifies, restores,
//!   health-checks and commits or kexecs back. See `upgrade_agent::luo`.
//!
//! This module is the whole daemon: the `mk-agentd` binary runs it, and so does the
//! `mk-upgrade` binary when it is invoked by the name `mk-agentd` (a link to it: one binary
//! for an initramfs, docs/cli.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
mod serve;

use upgrade_agent::exit::Exit;
use upgrade_agent::orchestrator::{Promotion, Quiet, SystemEnv, ops};
use upgrade_agent::statedir::{DEFAULT_STATE_DIR, StateDir};

#[derive(Debug, Parser)]
#[command(
    name = "mk-agentd",
    version,
    about = "mk-upgrade agent: start-up recovery; emulated instance supervisor"
)]
struct Args {
    /// State directory (journal, slots, emulator state).
    #[arg(long, global = true, env = "MK_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Run as the supervisor of emulated instance ID.
    #[arg(long)]
    instance: Option<u16>,
    /// Print the recovery result as JSON.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// The host agent of a LUO kernel (runs until killed).
    Serve {
        /// Workload file started at a normal boot (after a kexec the workloads come from
        /// the preserved sessions).
        #[arg(long)]
        workloads: Option<PathBuf>,
        /// Image of the running kernel, kept so that a failed upgrade can come back to it.
        #[arg(long)]
        kernel_image: Option<PathBuf>,
        /// The initramfs the running kernel booted with (a kexec back boots it again).
        #[arg(long)]
        initrd: Option<PathBuf>,
    },
    /// The agent of one instance of the SIMULATED multikernel kernel (started by the
    /// simulated kernel when the instance starts, never by hand).
    SimInstance {
        /// The simulated kernel's directory.
        #[arg(long)]
        sim_dir: PathBuf,
        /// The instance id.
        #[arg(long)]
        id: u16,
    },
}

/// The daemon's entry point: parses its command line and runs.
pub fn main() -> ExitCode {
    let args = Args::parse();
    upgrade_agent::telemetry::init_tracing();
    if let Some(Cmd::Serve {
        workloads,
        kernel_image,
        initrd,
    }) = args.cmd
    {
        let opts = serve::ServeOptions {
            state_dir: args.state_dir,
            workloads,
            kernel_image,
            initrd,
        };
        return match serve::serve(&opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mk-agentd serve: {e}");
                Exit::Platform.into()
            }
        };
    }
    if let Some(Cmd::SimInstance { sim_dir, id }) = &args.cmd {
        return match sim_instance(&args.state_dir, sim_dir, *id) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mk-agentd: SIMULATED multikernel instance {id}: {e}");
                Exit::Platform.into()
            }
        };
    }
    if let Some(id) = args.instance {
        return match upgrade_agent::platform::emulated::instance::run(&args.state_dir, id) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mk-agentd: instance {id}: {e}");
                Exit::Platform.into()
            }
        };
    }
    recover(&args.state_dir, args.json)
}

/// Serves the agent of instance `id` of the simulated multikernel kernel in `sim_dir`.
fn sim_instance(
    state_dir: &std::path::Path,
    sim_dir: &std::path::Path,
    id: u16,
) -> Result<(), String> {
    use upgrade_agent::platform::emulated::instance::{AgentParams, serve};
    use upgrade_agent::platform::multikernel::sim::{SimKernel, agent_cgroup_tag};
    let k = SimKernel::open(sim_dir, None).map_err(|e| e.to_string())?;
    let st = k.state().map_err(|e| e.to_string())?;
    let inst = st
        .instances
        .iter()
        .find(|i| i.id == id)
        .ok_or_else(|| format!("no instance {id} in {}", sim_dir.display()))?;
    serve(&AgentParams {
        id,
        kernel_release: inst.release.clone().unwrap_or_else(|| "unknown".into()),
        cpus: inst.cpus.clone(),
        dir: SimKernel::agent_dir(sim_dir, id),
        state_dir: state_dir.to_owned(),
        cgroup_tag: agent_cgroup_tag(state_dir, id),
        label: "SIMULATED multikernel",
    })
    .map_err(|e| e.to_string())
}

/// Start-up recovery: finish or undo an interrupted upgrade, print the result, exit.
fn recover(state_dir: &std::path::Path, json: bool) -> ExitCode {
    let state = StateDir::new(state_dir);
    let _guard = match rollback::Lock::acquire(state_dir) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("mk-agentd: {e}");
            return Exit::Busy.into();
        }
    };
    let result = if std::path::Path::new(upgrade_agent::sys::luo::DEV_PATH).exists() {
        // The LUO host agent (mk-agentd serve) carries on with what a kexec carried over;
        // what is still journaled here never reached its kexec.
        let release = upgrade_agent::platform::luo::running_release();
        ops::recover_journal_only(&state, &release).map(|r| match r {
            ops::JournalOnly::Finished(rec) => Some(rec),
            ops::JournalOnly::Nothing => None,
            ops::JournalOnly::LeftToAgent(rec) => {
                eprintln!(
                    "mk-agentd: upgrade {} reached its kexec (phase {:?}): left to the host \
                     agent (mk-agentd serve)",
                    rec.upgrade_id, rec.phase
                );
                None
            }
        })
    } else {
        let mut platform = match upgrade_agent::platform::emulated::EmulatedPlatform::new(state_dir)
        {
            Ok(p) => p,
            Err(e) => {
                eprintln!("mk-agentd: {e}");
                return Exit::Platform.into();
            }
        };
        let promotion = state
            .slots()
            .ok()
            .map(|slots| Promotion { slots, floor: None });
        ops::recover(
            &state,
            &mut platform,
            promotion,
            &Quiet,
            &SystemEnv::default(),
            upgrade_agent::fault::Faults::NONE,
        )
    };
    match result {
        Ok(None) => {
            if json {
                println!("{}", serde_json::json!({ "result": "nothing-to-recover" }));
            } else {
                println!("no interrupted upgrade");
            }
            ExitCode::SUCCESS
        }
        Ok(Some(rec)) => {
            if json {
                println!("{}", rec.report_json());
            } else {
                println!(
                    "recovered upgrade {}: {}",
                    rec.upgrade_id,
                    rec.report_json()["result"].as_str().unwrap_or("?")
                );
            }
            if rec.outcome == Some(upgrade_agent::record::Outcome::Failed) {
                Exit::Platform.into()
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("mk-agentd: {e}");
            // The same codes as `mk-upgrade recover` (docs/cli.md): a damaged or quarantined
            // journal is corrupt state, not an internal error.
            use upgrade_agent::orchestrator::UpgradeError;
            let exit = match &e {
                ops::OpError::State(s) if s.is_corrupt_state() => Exit::Corrupt,
                ops::OpError::State(upgrade_agent::statedir::StateDirError::Journal(
                    rollback::JournalError::UnsupportedFormat { .. },
                ))
                | ops::OpError::Upgrade(UpgradeError::Journal(
                    rollback::JournalError::UnsupportedFormat { .. },
                )) => Exit::Incompatible,
                ops::OpError::Upgrade(UpgradeError::Journal(j)) if j.is_corrupt() => Exit::Corrupt,
                ops::OpError::Upgrade(UpgradeError::Slots(s)) if s.is_corrupt() => Exit::Corrupt,
                _ => Exit::Internal,
            };
            exit.into()
        }
    }
}
