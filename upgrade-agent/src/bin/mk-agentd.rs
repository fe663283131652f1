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

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use upgrade_agent::exit::Exit;

#[derive(Debug, Parser)]
#[command(
    name = "mk-agentd",
    version,
    about = "mk-upgrade agent: start-up recovery; emulated instance supervisor"
)]
struct Args {
    /// State directory (journal, slots, emulator state).
    #[arg(long, global = true, env = "MK_STATE_DIR", default_value = upgrade_agent::cli::app::DEFAULT_STATE_DIR)]
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
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    upgrade_agent::cli::app::init_tracing();
    if let Some(Cmd::Serve {
        workloads,
        kernel_image,
    }) = args.cmd
    {
        let opts = upgrade_agent::luo::agent::ServeOptions {
            state_dir: args.state_dir,
            workloads,
            kernel_image,
        };
        return match upgrade_agent::luo::agent::serve(&opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mk-agentd serve: {e}");
                Exit::Platform.into()
            }
        };
    }
    if let Some(id) = args.instance {
        return match upgrade_agent::platform::emulated::supervisor::run(&args.state_dir, id) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mk-agentd: instance {id}: {e}");
                Exit::Platform.into()
            }
        };
    }
    let g = upgrade_agent::cli::app::Global {
        state_dir: args.state_dir,
        platform: upgrade_agent::cli::app::PlatformChoice::Auto,
        workloads: None,
        trusted_keys: None,
    };
    match upgrade_agent::cli::upgrade::recover(
        &g,
        &upgrade_agent::cli::upgrade::JsonArgs { json: args.json },
    ) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mk-agentd: {}", e.message);
            e.exit.into()
        }
    }
}
