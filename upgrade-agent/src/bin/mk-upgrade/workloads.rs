//! `mk-upgrade workloads check [FILE] [--json]`: validate a workload file without a state
//! directory, a platform or root — what a build-time check (the NixOS module's
//! `system.checks`) or an editor hook runs.

use std::path::PathBuf;
use std::process::ExitCode;

use upgrade_agent::exit::Exit;
use upgrade_agent::statedir::DEFAULT_STATE_DIR;
use upgrade_agent::workload::{WorkloadError, WorkloadFile};

use crate::app::{CliError, Global};

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
    /// checks): exit 0 valid, 2 invalid, 3 unreadable.
    Check {
        /// The file (default: --workloads, else STATE_DIR/workloads.toml).
        file: Option<PathBuf>,
        /// One JSON document: {"file", "valid", "workloads" | "error"}.
        #[arg(long)]
        json: bool,
    },
}

impl WorkloadsArgs {
    /// Whether one JSON document was asked for.
    pub fn json(&self) -> bool {
        match &self.command {
            WorkloadsCommand::Check { json, .. } => *json,
        }
    }
}

/// Runs `mk-upgrade workloads`.
pub fn run(g: &Global, a: WorkloadsArgs) -> Result<ExitCode, CliError> {
    let WorkloadsCommand::Check { file, json } = a.command;
    let path = file.or_else(|| g.workloads.clone()).unwrap_or_else(|| {
        let dir = if g.state_dir.as_os_str().is_empty() {
            PathBuf::from(DEFAULT_STATE_DIR)
        } else {
            g.state_dir.clone()
        };
        dir.join("workloads.toml")
    });
    match WorkloadFile::load(&path) {
        Ok(f) => {
            let names: Vec<&str> = f.workloads.iter().map(|w| w.name.as_str()).collect();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"file": path, "valid": true, "workloads": names})
                );
            } else {
                println!(
                    "{}: valid, {} workload(s){}{}",
                    path.display(),
                    names.len(),
                    if names.is_empty() { "" } else { ": " },
                    names.join(", ")
                );
            }
            Ok(Exit::Ok.into())
        }
        Err(e) => {
            let exit = match e {
                WorkloadError::Io { .. } => Exit::Io,
                _ => Exit::Usage,
            };
            Err(CliError::new(exit, e.to_string()))
        }
    }
}
