//! The `mk-upgrade` command line: global options, subcommands, dispatch.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kho_proto::keys::{KeyError, TrustedKeys};

use upgrade_agent::exit::Exit;
use upgrade_agent::orchestrator::UpgradeError;
use upgrade_agent::orchestrator::ops::OpError;
use upgrade_agent::platform::Platform;
use upgrade_agent::platform::emulated::EmulatedPlatform;
use upgrade_agent::platform::multikernel::MultikernelPlatform;
use upgrade_agent::statedir::{DEFAULT_STATE_DIR, StateDir, StateDirError};
use upgrade_agent::verify::{SigFileError, VerifyError};
use upgrade_agent::workload::WorkloadFile;

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
    /// Platform: `emulated` (multikernel emulation), `luo` (mainline /dev/liveupdate),
    /// `multikernel` (the multikernel patch set's interface; with MK_MULTIKERNEL_SIM=DIR its
    /// simulated kernel), or `auto` (luo when /dev/liveupdate exists, else emulated).
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
    /// The multikernel patch set's interface (`MK_MULTIKERNEL_SIM=DIR`: its SIMULATED
    /// kernel).
    Multikernel,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pre-flight checks: is this host ready for an upgrade?
    Check(crate::upgrade::CheckArgs),
    /// Verify a kernel image and upgrade to it, moving every workload.
    Apply(crate::upgrade::ApplyArgs),
    /// What runs now, which kernels are kept, whether an upgrade is in flight.
    Status(crate::upgrade::JsonArgs),
    /// Past upgrades.
    History(crate::upgrade::JsonArgs),
    /// The event log: every journal step, workload move and result, in order.
    Events(crate::events::EventsArgs),
    /// Roll a kernel out to a fleet in waves (canary, bake, gates, rollback on abort).
    Rollout(crate::rollout::RolloutArgs),
    /// Go back to the previous (known-good) kernel, moving every workload back.
    Rollback(crate::upgrade::RollbackArgs),
    /// Finish or undo an interrupted upgrade (what mk-agentd does at start).
    Recover(crate::upgrade::JsonArgs),
    /// The emulated machine: boot its first instance, list or stop instances.
    Emu(crate::emu::EmuArgs),
    /// The main demonstration: three workloads under load, upgraded live (emulated).
    Demo(crate::demo::DemoArgs),
    /// Load-generate against mk-demo-kv workloads, then verify every acknowledged write.
    Load(crate::load::LoadArgs),
    /// Decode and verify a handover image file.
    Inspect(crate::inspect::InspectArgs),
    /// Capture or compare the state a handover would carry.
    State(crate::state::StateArgs),
    /// Release-signing keys.
    Keys(crate::keys::KeysArgs),
    /// Sign a kernel image (writes IMAGE.sig).
    Sign(crate::sign::SignArgs),
    /// The multikernel platform: write its overlays for audit, boot its first instance.
    Multikernel(crate::multikernel::MultikernelArgs),
    /// Validate a workload file (no state directory, platform or root needed).
    Workloads(crate::workloads::WorkloadsArgs),
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

impl CliError {
    /// A state-directory failure: a bad workload file is a usage error, a damaged journal
    /// or slot table is corrupt state, anything else is I/O.
    pub fn state(e: &StateDirError) -> Self {
        let exit = match e {
            StateDirError::Workloads(upgrade_agent::workload::WorkloadError::Io { .. }) => Exit::Io,
            StateDirError::Workloads(_) => Exit::Usage,
            StateDirError::Trusted(_) => Exit::Untrusted,
            s if s.is_corrupt_state() => Exit::Corrupt,
            _ => Exit::Io,
        };
        CliError::new(exit, e.to_string())
    }

    /// An upgrade that did not end upgraded, with its documented exit code.
    pub fn upgrade(e: &UpgradeError) -> Self {
        CliError::new(upgrade_exit(e), e.to_string())
    }
}

/// The documented exit code of an upgrade that did not end upgraded.
pub fn upgrade_exit(e: &UpgradeError) -> Exit {
    match e {
        UpgradeError::RolledBack { .. } => Exit::RolledBack,
        UpgradeError::Failed(_) | UpgradeError::Platform(_) => Exit::Platform,
        UpgradeError::Journal(j) if j.is_corrupt() => Exit::Corrupt,
        UpgradeError::Slots(s) if s.is_corrupt() => Exit::Corrupt,
        UpgradeError::Journal(_) | UpgradeError::Slots(_) => Exit::Internal,
        UpgradeError::Refused(_) => Exit::PreflightFailed,
    }
}

/// The documented exit code of a refused kernel image (`docs/cli.md`): unreadable input 3,
/// not a kernel 7, trust refused 5, compatibility refused 6, memfd failure 12.
pub fn verify_exit(e: &VerifyError) -> Exit {
    match e {
        VerifyError::Io { .. }
        | VerifyError::SignatureFile(
            SigFileError::Io { .. } | SigFileError::NotARegularFile { .. },
        )
        | VerifyError::TrustStore {
            source: KeyError::Io { .. },
            ..
        } => Exit::Io,
        VerifyError::NotAKernel { .. } => Exit::NotAKernel,
        VerifyError::Memfd { .. }
        | VerifyError::MemfdMap(_)
        | VerifyError::MemfdUnsealed { .. } => Exit::Platform,
        VerifyError::Unsigned { .. }
        | VerifyError::SignatureFile(SigFileError::Malformed { .. })
        | VerifyError::TrustStore { .. }
        | VerifyError::UntrustedKey { .. }
        | VerifyError::BadSignature { .. }
        | VerifyError::Tampered { .. }
        | VerifyError::ReleaseMismatch { .. } => Exit::Untrusted,
        VerifyError::BadRelease { .. }
        | VerifyError::Downgrade { .. }
        | VerifyError::BelowFloor { .. } => Exit::Incompatible,
    }
}

/// An operation that could not start.
pub fn op_error(e: &OpError) -> CliError {
    match e {
        OpError::State(s) => CliError::state(s),
        OpError::Upgrade(u) => CliError::upgrade(u),
    }
}

impl Global {
    /// The state directory these options name.
    pub fn state(&self) -> StateDir {
        StateDir::new(&self.state_dir)
            .with_workloads(self.workloads.clone())
            .with_trusted_keys(self.trusted_keys.clone())
    }

    /// The workload file path.
    pub fn workloads_path(&self) -> PathBuf {
        self.state().workloads_path()
    }

    /// The trusted release keys directory.
    pub fn trusted_keys_dir(&self) -> PathBuf {
        self.state().trusted_keys_dir()
    }

    /// Loads the workload file (a missing default file is an empty list).
    pub fn load_workloads(&self) -> Result<WorkloadFile, CliError> {
        self.state()
            .load_workloads()
            .map_err(|e| CliError::state(&e))
    }

    /// Creates the state directory.
    pub fn ensure_state_dir(&self) -> Result<(), CliError> {
        self.state().ensure().map_err(|e| CliError::state(&e))
    }

    /// The platform `--platform` resolves to (`auto`: luo when /dev/liveupdate exists).
    pub fn resolved_platform(&self) -> PlatformChoice {
        match self.platform {
            PlatformChoice::Auto if Path::new("/dev/liveupdate").exists() => PlatformChoice::Luo,
            PlatformChoice::Auto => PlatformChoice::Emulated,
            other => other,
        }
    }

    /// The emulated platform (the luo platform is driven by its host agent, see
    /// `crate::luo`).
    pub fn open_emulated(&self) -> Result<EmulatedPlatform, CliError> {
        self.ensure_state_dir()?;
        EmulatedPlatform::new(&self.state_dir)
            .map_err(|e| CliError::new(Exit::Platform, e.to_string()))
    }

    /// The side-by-side platform `--platform` names: multikernel, else emulated.
    pub fn open_side_by_side(&self) -> Result<Box<dyn Platform>, CliError> {
        if self.resolved_platform() == PlatformChoice::Multikernel {
            self.ensure_state_dir()?;
            return MultikernelPlatform::open(&self.state_dir)
                .map(|p| Box::new(p) as Box<dyn Platform>)
                .map_err(|e| CliError::new(Exit::Platform, e.to_string()));
        }
        Ok(Box::new(self.open_emulated()?))
    }

    /// The upgrade journal for the commands that read it without the lock (`status`,
    /// `history`, `check`, the journal gate): an upgrade may be writing it
    /// ([`upgrade_agent::statedir::StateDir::journal_for_reading`]).
    pub fn journal(&self) -> Result<upgrade_agent::statedir::ReadJournal, CliError> {
        self.state()
            .journal_for_reading()
            .map_err(|e| CliError::state(&e))
    }

    /// The trusted release keys, if the directory has any.
    pub fn trusted(&self) -> Result<TrustedKeys, CliError> {
        self.state()
            .trusted_release_keys()
            .map_err(|e| CliError::state(&e))
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    upgrade_agent::telemetry::init_tracing();
    let g = cli.global;
    let json = wants_json(&cli.command);
    let result: Result<ExitCode, CliError> = match cli.command {
        Command::Check(a) => Ok(crate::upgrade::check(&g, &a)),
        Command::Apply(a) => crate::upgrade::apply(&g, &a),
        Command::Status(a) => crate::upgrade::status(&g, &a),
        Command::History(a) => crate::upgrade::history(&g, &a),
        Command::Events(a) => crate::events::run(&g, &a),
        Command::Rollout(a) => crate::rollout::run(&g, &a),
        Command::Rollback(a) => crate::upgrade::rollback(&g, &a),
        Command::Recover(a) => crate::upgrade::recover(&g, &a),
        Command::Emu(a) => crate::emu::run(&g, a),
        Command::Demo(a) => crate::demo::run(&g, a),
        Command::Load(a) => crate::load::run(a),
        Command::Inspect(a) => Ok(crate::inspect::run(a)),
        Command::State(a) => Ok(crate::state::run(a)),
        Command::Keys(a) => Ok(crate::keys::run(a)),
        Command::Sign(a) => Ok(crate::sign::run(a)),
        Command::Multikernel(a) => crate::multikernel::run(&g, a),
        Command::Workloads(a) => Ok(crate::workloads::run(&g, a)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mk-upgrade: {}", e.message);
            if json {
                // With --json every path prints one JSON document on stdout.
                println!(
                    "{}",
                    serde_json::json!({
                        // A pre-flight refusal changed nothing, like every "refused".
                        "result": if e.exit == Exit::PreflightFailed { "refused" } else { "error" },
                        "error": e.message,
                        "exit": e.exit as u8,
                    })
                );
            }
            e.exit.into()
        }
    }
}

/// Whether the command was asked for one JSON document (`--json`).
fn wants_json(c: &Command) -> bool {
    use crate::emu::EmuCommand;
    match c {
        Command::Check(a) => a.json,
        Command::Apply(a) => a.json,
        Command::Status(a) | Command::History(a) | Command::Recover(a) => a.json,
        Command::Rollout(a) => a.json,
        Command::Rollback(a) => a.json,
        Command::Emu(a) => match &a.command {
            EmuCommand::Init { json, .. } | EmuCommand::Ls { json } => *json,
            EmuCommand::Down => false,
        },
        Command::Demo(a) => a.json,
        Command::Load(a) => a.json,
        // These report every outcome themselves (exit codes and documents of their own).
        Command::Multikernel(a) => a.json(),
        // Events: one JSON object per line; an error goes to stderr only. Workloads prints
        // its own document on every path.
        Command::Workloads(_)
        | Command::Inspect(_)
        | Command::State(_)
        | Command::Keys(_)
        | Command::Sign(_)
        | Command::Events(_) => false,
    }
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
    fn verify_refusals_map_onto_the_documented_exit_codes() {
        use kho_proto::keys::KeyId;
        use std::io;
        use upgrade_agent::verify::{MalformedSig, NotAKernelReason};
        let p = || PathBuf::from("/k");
        let io_err = || io::Error::from(io::ErrorKind::NotFound);
        let key_id = KeyId([1; 8]);
        let cases = [
            (
                VerifyError::Io {
                    path: p(),
                    source: io_err(),
                },
                Exit::Io,
            ),
            (
                VerifyError::SignatureFile(SigFileError::Io {
                    path: p(),
                    source: io_err(),
                }),
                Exit::Io,
            ),
            (
                VerifyError::TrustStore {
                    dir: p(),
                    source: KeyError::Io {
                        path: p(),
                        source: io_err(),
                    },
                },
                Exit::Io,
            ),
            (
                VerifyError::NotAKernel {
                    path: p(),
                    reason: NotAKernelReason::Empty,
                },
                Exit::NotAKernel,
            ),
            (
                VerifyError::Memfd {
                    op: "memfd_create",
                    source: io_err(),
                },
                Exit::Platform,
            ),
            (
                VerifyError::Unsigned {
                    image: p(),
                    sig: p(),
                },
                Exit::Untrusted,
            ),
            (
                VerifyError::SignatureFile(SigFileError::Malformed {
                    path: p(),
                    reason: MalformedSig::TooLarge,
                }),
                Exit::Untrusted,
            ),
            (
                VerifyError::TrustStore {
                    dir: p(),
                    source: KeyError::NoTrustedKeys { dir: p() },
                },
                Exit::Untrusted,
            ),
            (
                VerifyError::UntrustedKey {
                    sig: p(),
                    key_id,
                    dir: p(),
                },
                Exit::Untrusted,
            ),
            (
                VerifyError::BadSignature { sig: p(), key_id },
                Exit::Untrusted,
            ),
            (
                VerifyError::Tampered {
                    image: p(),
                    expected: "a".into(),
                    actual: "b".into(),
                },
                Exit::Untrusted,
            ),
            (
                VerifyError::ReleaseMismatch {
                    signed: "7.2".into(),
                    header: "7.3".into(),
                },
                Exit::Untrusted,
            ),
            (
                VerifyError::Downgrade {
                    candidate: "7.1".into(),
                    running: "7.2".into(),
                },
                Exit::Incompatible,
            ),
            (
                VerifyError::BelowFloor {
                    candidate: "7.1".into(),
                    floor: "7.2".into(),
                },
                Exit::Incompatible,
            ),
        ];
        for (e, want) in &cases {
            assert_eq!(verify_exit(e), *want, "{e}");
        }
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
