//! `mk-upgrade keys generate`: create an ed25519 signing key pair.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kho_proto::keys::{KeyError, KeyId, NodeKey};

use upgrade_agent::exit::Exit;

/// `mk-upgrade keys ...`
#[derive(clap::Args, Debug)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// Key subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum KeysCommand {
    /// Generate a signing key pair: NAME.key (secret, mode 0600; keep it off the upgraded
    /// hosts) and NAME.pub (copy it into the hosts' trusted-keys directory).
    Generate {
        /// Directory to write the two files to.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Base name of the files.
        #[arg(long, default_value = "mk-upgrade-signing")]
        name: String,
    },
}

/// Runs `mk-upgrade keys`.
pub fn run(args: KeysArgs) -> ExitCode {
    match args.command {
        KeysCommand::Generate { dir, name } => match generate(&dir, &name) {
            Ok(_) => Exit::Ok.into(),
            Err((exit, msg)) => {
                eprintln!("mk-upgrade keys generate: {msg}");
                exit.into()
            }
        },
    }
}

/// The output directory must exist and be a directory (checked first, so that the message
/// names the directory rather than a key file that could not be created in it).
fn check_dir(dir: &Path) -> Result<(), (Exit, String)> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err((
            Exit::Io,
            format!("--dir {}: not a directory", dir.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err((
            Exit::Io,
            format!(
                "--dir {}: the directory does not exist; create it first (mkdir -m 700 {})",
                dir.display(),
                dir.display()
            ),
        )),
        Err(e) => Err((Exit::Io, format!("--dir {}: {e}", dir.display()))),
    }
}

/// Generates and saves a key pair; returns its id and the secret and public key paths, or
/// the exit code and message of the failure.
pub fn generate(dir: &Path, name: &str) -> Result<(KeyId, PathBuf, PathBuf), (Exit, String)> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err((
            Exit::Usage,
            format!("--name {name:?} must be a plain file name (no '/', not starting with '.')"),
        ));
    }
    check_dir(dir)?;
    let key = NodeKey::generate().map_err(|e| (Exit::Internal, e.to_string()))?;
    let (secret, public) = key.save(dir, name).map_err(|e| {
        let exit = match e {
            KeyError::Random(_) => Exit::Internal,
            _ => Exit::Io,
        };
        (exit, e.to_string())
    })?;
    println!("key id:     {}", key.key_id());
    println!(
        "secret key: {} (signs images; keep it off the upgraded hosts)",
        secret.display()
    );
    println!(
        "public key: {} (copy it into each host's trusted-keys directory)",
        public.display()
    );
    Ok((key.key_id(), secret, public))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_directory_is_named_as_such() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nonexistent");
        let (exit, msg) = generate(&missing, "k").unwrap_err();
        assert_eq!(exit, Exit::Io);
        assert!(
            msg.contains("does not exist") && msg.contains(missing.to_str().unwrap()),
            "{msg}"
        );
        assert!(!msg.contains("k.key"), "{msg}");
        std::fs::write(&missing, b"a file").unwrap();
        let (_, msg) = generate(&missing, "k").unwrap_err();
        assert!(msg.contains("not a directory"), "{msg}");
        generate(tmp.path(), "k").unwrap();
        assert!(tmp.path().join("k.key").exists());
    }
}
