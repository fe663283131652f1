//! The `mk-upgrade` command line: global options, subcommands, dispatch.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kho_proto::keys::{NodeKey, TrustedKeys};

use crate::exit::Exit;
use crate::orchestrator::record::UpgradeRecord;
use crate::platform::Platform;
use crate::platform::emulated::EmulatedPlatform;
use crate::workload::WorkloadFile;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mk-upgrade";

/// mk-upgrade: zero-downtime kernel upgrades (verify, hand over, health-gate, roll back).
#[derive(Debug, Parser)]
#[command(name = "mk-upgrade", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand shares.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// State directory: journal, kernel slots, node keys, emulator state.
    #[arg(long, global = true, env = "MK_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Platform: `emulated` (multikernel emulation), `luo` (mainline /dev/liveupdate), or
    /// `auto` (luo when /dev/liveupdate exists, else emulated).
    #[arg(long, global = true, env = "MK_PLATFORM", value_enum, default_value_t = PlatformChoice::Auto)]
    pub platform: PlatformChoice,
    /// Workload file (default: STATE_DIR/workloads.toml).
    #[arg(long, global = true, env = "MK_WORKLOADS")]
    pub workloads: Option<PathBuf>,
    /// Directory of trusted release-signing public keys (default: STATE_DIR/trusted-keys).
    #[arg(long, global = true, env = "MK_TRUSTED_KEYS")]
    pub trusted_keys: Option<PathBuf>,
}

/// Which platform to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlatformChoice {
    Auto,
    Emulated,
    Luo,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pre-flight checks: is this host ready for an upgrade?
    Check(super::upgrade::CheckArgs),
    /// Verify a kernel image and upgrade to it, moving every workload.
    Apply(super::upgrade::ApplyArgs),
    /// What runs now, which kernels are kept, whether an upgrade is in flight.
    Status(super::upgrade::JsonArgs),
    /// Past upgrades.
    History(super::upgrade::JsonArgs),
    /// Go back to the previous (known-good) kernel, moving every workload back.
    Rollback(super::upgrade::RollbackArgs),
    /// Finish or undo an interrupted upgrade (what mk-agentd does at start).
    Recover(super::upgrade::JsonArgs),
    /// The emulated machine: boot its first instance, list or stop instances.
    Emu(super::emu::EmuArgs),
    /// The main demonstration: three workloads under load, upgraded live (emulated).
    Demo(super::demo::DemoArgs),
    /// Load-generate against mk-demo-kv workloads, then verify every acknowledged write.
    Load(super::load::LoadArgs),
    /// Decode and verify a handover image file.
    Inspect(super::inspect::InspectArgs),
    /// Capture or compare the state a handover would carry.
    State(super::state::StateArgs),
    /// Release-signing keys.
    Keys(super::keys::KeysArgs),
    /// Sign a kernel image (writes IMAGE.sig).
    Sign(super::sign::SignArgs),
}

/// A command failure: the message for stderr and the documented exit code.
#[derive(Debug)]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
}

impl CliError {
    /// An error with `exit` and `message`.
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        CliError {
            exit,
            message: message.into(),
        }
    }
}

impl Global {
    /// The workload file path.
    pub fn workloads_path(&self) -> PathBuf {
        self.workloads
            .clone()
            .unwrap_or_else(|| self.state_dir.join("workloads.toml"))
    }

    /// The trusted release keys directory.
    pub fn trusted_keys_dir(&self) -> PathBuf {
        self.trusted_keys
            .clone()
            .unwrap_or_else(|| self.state_dir.join("trusted-keys"))
    }

    /// Loads the workload file (a missing default file is an empty list).
    pub fn load_workloads(&self) -> Result<WorkloadFile, CliError> {
        let path = self.workloads_path();
        if self.workloads.is_none() && !path.exists() {
            return Ok(WorkloadFile::default());
        }
        WorkloadFile::load(&path).map_err(|e| {
            let exit = match e {
                crate::workload::WorkloadError::Io { .. } => Exit::Io,
                _ => Exit::Usage,
            };
            CliError::new(exit, e.to_string())
        })
    }

    /// Creates the state directory.
    pub fn ensure_state_dir(&self) -> Result<(), CliError> {
        std::fs::create_dir_all(&self.state_dir).map_err(|e| {
            CliError::new(
                Exit::Io,
                format!(
                    "cannot create state directory {}: {e} (run as root or pass --state-dir)",
                    self.state_dir.display()
                ),
            )
        })
    }

    /// The platform `--platform` resolves to (`auto`: luo when /dev/liveupdate exists).
    pub fn resolved_platform(&self) -> PlatformChoice {
        match self.platform {
            PlatformChoice::Auto if Path::new("/dev/liveupdate").exists() => PlatformChoice::Luo,
            PlatformChoice::Auto => PlatformChoice::Emulated,
            other => other,
        }
    }

    /// The platform to drive.
    pub fn open_platform(&self) -> Result<Box<dyn Platform>, CliError> {
        if self.resolved_platform() == PlatformChoice::Luo {
            self.ensure_state_dir()?;
            return Ok(Box::new(crate::platform::luo::LuoPlatform::new(
                &self.state_dir,
            )));
        }
        self.ensure_state_dir()?;
        EmulatedPlatform::new(&self.state_dir)
            .map(|p| Box::new(p) as Box<dyn Platform>)
            .map_err(|e| CliError::new(Exit::Platform, e.to_string()))
    }

    /// The upgrade journal.
    pub fn journal(&self) -> Result<rollback::Journal<UpgradeRecord>, CliError> {
        self.ensure_state_dir()?;
        rollback::Journal::open(&self.state_dir).map_err(|e| CliError::new(Exit::Io, e.to_string()))
    }

    /// This machine's node key (signs handover images), created on first use, with its
    /// public half in `STATE_DIR/node-keys/` where receiving instances trust it.
    pub fn node_key(&self) -> Result<NodeKey, CliError> {
        let dir = self.state_dir.join("node-keys");
        let key = dir.join("node.key");
        let io = |e: String| CliError::new(Exit::Io, e);
        if !key.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| io(format!("{}: {e}", dir.display())))?;
            let k = NodeKey::generate().map_err(|e| io(e.to_string()))?;
            match k.save(&dir, "node") {
                Ok(_) | Err(kho_proto::keys::KeyError::Exists { .. }) => {}
                Err(e) => return Err(io(e.to_string())),
            }
        }
        NodeKey::load(&key).map_err(|e| io(e.to_string()))
    }

    /// The trusted release keys, if the directory has any.
    pub fn trusted(&self) -> Result<TrustedKeys, CliError> {
        TrustedKeys::load_dir(&self.trusted_keys_dir())
            .map_err(|e| CliError::new(Exit::Untrusted, e.to_string()))
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let g = cli.global;
    let result: Result<ExitCode, CliError> = match cli.command {
        Command::Check(a) => super::upgrade::check(&g, &a),
        Command::Apply(a) => super::upgrade::apply(&g, &a),
        Command::Status(a) => super::upgrade::status(&g, &a),
        Command::History(a) => super::upgrade::history(&g, &a),
        Command::Rollback(a) => super::upgrade::rollback(&g, &a),
        Command::Recover(a) => super::upgrade::recover(&g, &a),
        Command::Emu(a) => super::emu::run(&g, a),
        Command::Demo(a) => super::demo::run(&g, a),
        Command::Load(a) => super::load::run(a),
        Command::Inspect(a) => Ok(super::inspect::run(a)),
        Command::State(a) => Ok(super::state::run(a)),
        Command::Keys(a) => Ok(super::keys::run(a)),
        Command::Sign(a) => Ok(super::sign::run(a)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mk-upgrade: {}", e.message);
            e.exit.into()
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default: warnings).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_parse_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "mk-upgrade",
            "apply",
            "--kernel",
            "/k",
            "--state-dir",
            "/s",
            "--platform",
            "emulated",
        ])
        .unwrap();
        assert_eq!(cli.global.state_dir, PathBuf::from("/s"));
        assert_eq!(cli.global.platform, PlatformChoice::Emulated);
        assert_eq!(
            cli.global.workloads_path(),
            PathBuf::from("/s/workloads.toml")
        );
        assert_eq!(
            cli.global.trusted_keys_dir(),
            PathBuf::from("/s/trusted-keys")
        );
        assert!(Cli::try_parse_from(["mk-upgrade", "apply"]).is_err());
        assert!(Cli::try_parse_from(["mk-upgrade", "--platform", "xen", "status"]).is_err());
    }
}
