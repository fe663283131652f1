//! `mk-agentd`: the mk-upgrade agent daemon.
//!
//! * `mk-agentd [--state-dir D]`: start-up duty of the agent on every boot: finish or undo
//!   an upgrade that was interrupted (journal recovery), then exit. Run it from a unit
//!   ordered before the workloads (see `nix/` and `docs/architecture.md`).
//! * `mk-agentd --instance ID --state-dir D`: the supervisor of one EMULATED kernel
//!   instance (started by the emulated platform, never by hand).

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
    #[arg(long, env = "MK_STATE_DIR", default_value = upgrade_agent::cli::app::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Run as the supervisor of emulated instance ID.
    #[arg(long)]
    instance: Option<u16>,
    /// Print the recovery result as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    upgrade_agent::cli::app::init_tracing();
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
