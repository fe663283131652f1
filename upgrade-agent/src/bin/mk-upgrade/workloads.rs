//! `mk-upgrade workloads check [FILE] [--json]`: validate a workload file without a state
//! directory, a platform or root — what a build-time check (the NixOS module's
//! `system.checks`) or an editor hook runs.

use std::path::PathBuf;
use std::process::ExitCode;

use upgrade_agent::exit::Exit;
use upgrade_agent::statedir::{DEFAULT_STATE_DIR, StateDir, StateDirError};
use upgrade_agent::workload::WorkloadError;

use crate::app::Global;

/// `mk-upgrade workloads ...`
#[derive(clap::Args, Debug)]
pub struct WorkloadsArgs {
    #[command(subcommand)]
    pub command: WorkloadsCommand,
}

/// Workload-file subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum WorkloadsCommand {
    /// Parse and validate a workload file (unknown keys, names, modes, limits, health
    /// checks): exit 0 valid, 2 invalid (also: not a regular file), 3 unreadable.
    Check {
        /// The file (default: --workloads, else STATE_DIR/workloads.toml).
        file: Option<PathBuf>,
        /// One JSON document: {"file", "valid": true, "workloads"} or {"file", "valid":
        /// false, "error", "exit"}.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `mk-upgrade workloads`. It prints its own JSON document on every path (also for an
/// invalid or unreadable file).
pub fn run(g: &Global, a: WorkloadsArgs) -> ExitCode {
    let WorkloadsCommand::Check { file, json } = a.command;
    let root = if g.state_dir.as_os_str().is_empty() {
        PathBuf::from(DEFAULT_STATE_DIR)
    } else {
        g.state_dir.clone()
    };
    // Read as every other command reads it (a missing default file declares no workload).
    let state = StateDir::new(root).with_workloads(file.or_else(|| g.workloads.clone()));
    let shown = state.workloads_path().display().to_string();
    let loaded = state.load_workloads().map_err(|e| match e {
        StateDirError::Workloads(w) => w,
        other => WorkloadError::Io {
            path: state.workloads_path(),
            source: std::io::Error::other(other.to_string()),
        },
    });
    match loaded {
        Ok(f) => {
            let names: Vec<&str> = f.workloads.iter().map(|w| w.name.as_str()).collect();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"file": shown, "valid": true, "workloads": names})
                );
            } else {
                println!(
                    "{shown}: valid, {} workload(s){}{}",
                    names.len(),
                    if names.is_empty() { "" } else { ": " },
                    names.join(", ")
                );
            }
            Exit::Ok.into()
        }
        Err(e) => {
            let exit = match e {
                WorkloadError::Io { .. } => Exit::Io,
                _ => Exit::Usage,
            };
            eprintln!("mk-upgrade: {e}");
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "file": shown, "valid": false, "error": e.to_string(), "exit": exit as u8
                    })
                );
            }
            exit.into()
        }
    }
}
