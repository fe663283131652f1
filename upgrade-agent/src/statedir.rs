//! The state directory: where the journal, the kernel slots, the trial-boot record, the
//! node keys, the trusted release keys and the workload file live. One value of this type
//! is what every operation gets instead of command-line options.

use std::path::{Path, PathBuf};

use kho_proto::keys::{KeyError, NodeKey, TrustedKeys};

use crate::record::UpgradeRecord;
use crate::workload::{WorkloadError, WorkloadFile};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mk-upgrade";

/// Why something of the state directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("cannot create state directory {}: {source} (run as root or pass --state-dir)", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Workloads(#[from] WorkloadError),
    #[error(transparent)]
    Journal(#[from] rollback::JournalError),
    #[error(transparent)]
    Slots(#[from] rollback::SlotError),
    #[error(transparent)]
    Trial(#[from] rollback::TrialError),
    #[error("node key in {}: {source}", dir.display())]
    NodeKey {
        dir: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error("trusted keys: {0}")]
    Trusted(#[source] KeyError),
}

/// A state directory and the files it names (some of which may be placed elsewhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
    workloads: Option<PathBuf>,
    trusted_keys: Option<PathBuf>,
}

impl StateDirError {
    /// Whether this is damaged state (a damaged journal, slot table, floor, stored image or
    /// trial-boot record): the commands report it with exit code 4 (`Exit::Corrupt`).
    pub fn is_corrupt_state(&self) -> bool {
        match self {
            StateDirError::Journal(e) => e.is_corrupt(),
            StateDirError::Slots(e) => e.is_corrupt(),
            StateDirError::Trial(e) => e.is_corrupt(),
            _ => false,
        }
    }
}

impl StateDir {
    /// The state directory at `root`, with the workload file and trusted keys inside it.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir {
            root: root.into(),
            workloads: None,
            trusted_keys: None,
        }
    }

    /// The workload file at `path` instead of `ROOT/workloads.toml` (then it must exist).
    pub fn with_workloads(mut self, path: Option<PathBuf>) -> Self {
        self.workloads = path;
        self
    }

    /// The trusted release keys in `dir` instead of `ROOT/trusted-keys`.
    pub fn with_trusted_keys(mut self, dir: Option<PathBuf>) -> Self {
        self.trusted_keys = dir;
        self
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The workload file path.
    pub fn workloads_path(&self) -> PathBuf {
        self.workloads
            .clone()
            .unwrap_or_else(|| self.root.join("workloads.toml"))
    }

    /// The trusted release keys directory.
    pub fn trusted_keys_dir(&self) -> PathBuf {
        self.trusted_keys
            .clone()
            .unwrap_or_else(|| self.root.join("trusted-keys"))
    }

    /// Where this machine's node key and the node keys it trusts live.
    pub fn node_keys_dir(&self) -> PathBuf {
        self.root.join("node-keys")
    }

    /// Creates the directory (and missing parents) with mode 0700, set explicitly whatever
    /// the umask: it holds the workload file (with its environment values), the journal and
    /// the kernel images. An existing directory is left as it is.
    pub fn ensure(&self) -> Result<(), StateDirError> {
        rollback::ensure_private_dir(&self.root).map_err(|e| StateDirError::Create {
            path: self.root.clone(),
            source: e.source,
        })
    }

    /// Loads the workload file (a missing default file is an empty list).
    pub fn load_workloads(&self) -> Result<WorkloadFile, StateDirError> {
        let path = self.workloads_path();
        if self.workloads.is_none() && !path.exists() {
            return Ok(WorkloadFile::default());
        }
        Ok(WorkloadFile::load(&path)?)
    }

    /// The upgrade journal.
    pub fn journal(&self) -> Result<rollback::Journal<UpgradeRecord>, StateDirError> {
        self.ensure()?;
        Ok(rollback::Journal::open(&self.root)?)
    }

    /// The upgrade journal for a command that holds no lock (`status`, `history`, `check`,
    /// a command's journal gate). With no writer about (a shared hold of the lock file is
    /// granted, and kept while the journal is), it is opened as usual, tidying interrupted
    /// writes and quarantining a damaged record; while an upgrade holds the lock it is opened
    /// read-only ([`rollback::Journal::open_read_only`]): the writer's files are not touched
    /// (its temporary file, removed by a reader before its rename, used to fail the upgrade).
    pub fn journal_for_reading(&self) -> Result<ReadJournal, StateDirError> {
        self.ensure()?;
        let shared =
            rollback::lock::Lock::try_shared(&self.root).map_err(rollback::JournalError::from)?;
        let journal = if shared.is_some() {
            rollback::Journal::open(&self.root)?
        } else {
            rollback::Journal::open_read_only(&self.root)?
        };
        Ok(ReadJournal {
            journal,
            _shared: shared,
        })
    }

    /// The kernel slots and the version floor.
    pub fn slots(&self) -> Result<rollback::Slots, StateDirError> {
        Ok(rollback::Slots::open(&self.root)?)
    }

    /// The trial-boot record.
    pub fn trials(&self) -> Result<rollback::TrialBoots, StateDirError> {
        Ok(rollback::TrialBoots::open(&self.root)?)
    }

    /// This machine's node key (signs handover images), created on first use, with its
    /// public half in `ROOT/node-keys/` where receiving instances trust it.
    pub fn node_key(&self) -> Result<NodeKey, StateDirError> {
        let dir = self.node_keys_dir();
        let key = dir.join("node.key");
        let err = |source| StateDirError::NodeKey {
            dir: dir.clone(),
            source,
        };
        if !key.exists() {
            rollback::ensure_private_dir(&dir).map_err(|e| {
                err(KeyError::Io {
                    path: e.path,
                    source: e.source,
                })
            })?;
            let k = NodeKey::generate().map_err(err)?;
            match k.save(&dir, "node") {
                Ok(_) | Err(KeyError::Exists { .. }) => {}
                Err(e) => return Err(err(e)),
            }
        }
        NodeKey::load(&key).map_err(err)
    }

    /// The node keys trusted to sign handover images of this machine.
    pub fn trusted_node_keys(&self) -> Result<TrustedKeys, StateDirError> {
        TrustedKeys::load_dir(&self.node_keys_dir()).map_err(StateDirError::Trusted)
    }

    /// The trusted release keys.
    pub fn trusted_release_keys(&self) -> Result<TrustedKeys, StateDirError> {
        TrustedKeys::load_dir(&self.trusted_keys_dir()).map_err(StateDirError::Trusted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ensure_creates_a_private_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("var/lib/mk-upgrade"));
        state.ensure().unwrap();
        for d in ["var", "var/lib", "var/lib/mk-upgrade"] {
            let mode = std::fs::metadata(tmp.path().join(d))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700, "{d}");
        }
        state.node_key().unwrap();
        let mode = std::fs::metadata(state.node_keys_dir())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn damaged_state_is_told_apart_from_other_failures() {
        let corrupt = StateDirError::Slots(rollback::SlotError::Corrupt {
            path: "slots.json".into(),
            reason: "x".into(),
        });
        assert!(corrupt.is_corrupt_state());
        let missing = StateDirError::Slots(rollback::SlotError::Empty {
            role: rollback::Slot::Previous,
        });
        assert!(!missing.is_corrupt_state());
    }
}

/// A journal opened by [`StateDir::journal_for_reading`] (with the shared hold of the lock
/// file that made its tidying safe, if any).
#[derive(Debug)]
pub struct ReadJournal {
    journal: rollback::Journal<UpgradeRecord>,
    _shared: Option<rollback::lock::SharedGuard>,
}

impl std::ops::Deref for ReadJournal {
    type Target = rollback::Journal<UpgradeRecord>;
    fn deref(&self) -> &Self::Target {
        &self.journal
    }
}
