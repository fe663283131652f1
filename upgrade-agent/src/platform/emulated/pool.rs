//! The emulated machine's instance table: which instance owns which cpus and memory, in
//! which state, with which kernel. **Emulation**: on a real multikernel host this is what
//! `/sys/fs/multikernel/device_tree` and `instances/<name>/status` report.
//!
//! Persisted as `pool.json` in the emulator directory (atomic writes), changed only under an
//! exclusive `flock` on `pool.lock`, so CLI invocations, the daemon and supervisors agree.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::platform::{InstanceId, InstanceState, MAX_INSTANCE_ID, PlatformError, Resources};

/// One instance of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceEntry {
    pub id: InstanceId,
    pub state: InstanceState,
    pub resources: Resources,
    pub kernel_release: Option<String>,
    #[serde(default)]
    pub kernel_sha256: Option<String>,
    /// Pid of the instance supervisor (`mk-agentd --instance`), when active.
    #[serde(default)]
    pub supervisor_pid: Option<i32>,
}

/// The whole table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Every cpu of the emulated machine.
    pub cpus: Vec<u32>,
    /// Memory of the emulated machine.
    pub memory_bytes: u64,
    pub instances: Vec<InstanceEntry>,
}

impl Pool {
    /// A fresh pool spanning the cpus this process may run on and the machine's memory.
    pub fn discover() -> Pool {
        let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).map_or_else(
            |_| vec![0],
            |set| {
                (0..nix::sched::CpuSet::count())
                    .filter(|c| set.is_set(*c).unwrap_or(false))
                    .filter_map(|c| u32::try_from(c).ok())
                    .collect::<Vec<_>>()
            },
        );
        let memory_bytes = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(1 << 30, |kb| kb * 1024);
        Pool {
            cpus,
            memory_bytes,
            instances: Vec::new(),
        }
    }

    /// Cpus no instance owns.
    pub fn spare_cpus(&self) -> Vec<u32> {
        self.cpus
            .iter()
            .copied()
            .filter(|c| !self.instances.iter().any(|i| i.resources.cpus.contains(c)))
            .collect()
    }

    /// Memory no instance owns.
    pub fn spare_memory(&self) -> u64 {
        let used: u64 = self
            .instances
            .iter()
            .map(|i| i.resources.memory_bytes)
            .sum();
        self.memory_bytes.saturating_sub(used)
    }

    /// The lowest free id in 1..=511.
    pub fn free_id(&self) -> Result<InstanceId, PlatformError> {
        (1..=MAX_INSTANCE_ID)
            .find(|id| !self.instances.iter().any(|i| i.id == *id))
            .ok_or_else(|| PlatformError::NoResources("all 511 instance ids are in use".into()))
    }

    /// An instance by id.
    pub fn get(&self, id: InstanceId) -> Result<&InstanceEntry, PlatformError> {
        self.instances
            .iter()
            .find(|i| i.id == id)
            .ok_or(PlatformError::NoSuchInstance(id))
    }

    /// An instance by id, mutably.
    pub fn get_mut(&mut self, id: InstanceId) -> Result<&mut InstanceEntry, PlatformError> {
        self.instances
            .iter_mut()
            .find(|i| i.id == id)
            .ok_or(PlatformError::NoSuchInstance(id))
    }

    /// Checks that `id` is in `want` state for `op`.
    pub fn expect(
        &self,
        id: InstanceId,
        op: &'static str,
        want: &[InstanceState],
        needed: &'static str,
    ) -> Result<&InstanceEntry, PlatformError> {
        let e = self.get(id)?;
        if want.contains(&e.state) {
            Ok(e)
        } else {
            Err(PlatformError::WrongState {
                id,
                op,
                state: e.state,
                needed,
            })
        }
    }
}

/// The on-disk table with its lock.
#[derive(Debug, Clone)]
pub struct PoolStore {
    dir: PathBuf,
}

impl PoolStore {
    /// The store in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<Self, PlatformError> {
        fs::create_dir_all(dir)
            .map_err(|e| PlatformError::io(format!("creating {}", dir.display()), e))?;
        Ok(PoolStore {
            dir: dir.to_owned(),
        })
    }

    /// The emulator directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self) -> PathBuf {
        self.dir.join("pool.json")
    }

    /// Reads the table (a fresh one when none exists yet).
    pub fn read(&self) -> Result<Pool, PlatformError> {
        match fs::read(self.path()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| PlatformError::Instance {
                id: 0,
                what: format!(
                    "emulator table {} is unreadable ({e}); remove the emulator directory to start over",
                    self.path().display()
                ),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Pool::discover()),
            Err(e) => Err(PlatformError::io(format!("reading {}", self.path().display()), e)),
        }
    }

    /// Runs `f` on the table under the exclusive lock and saves the result if `f` succeeds.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut Pool) -> Result<T, PlatformError>,
    ) -> Result<T, PlatformError> {
        let lock_path = self.dir.join("pool.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| PlatformError::io(format!("opening {}", lock_path.display()), e))?;
        let _guard = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| {
            PlatformError::io(format!("locking {}", lock_path.display()), e.into())
        })?;
        let mut pool = self.read()?;
        let out = f(&mut pool)?;
        let bytes = serde_json::to_vec_pretty(&pool).map_err(|e| PlatformError::Instance {
            id: 0,
            what: format!("encoding emulator table: {e}"),
        })?;
        rollback::atomic_write(&self.path(), &bytes).map_err(|e| PlatformError::Instance {
            id: 0,
            what: e.to_string(),
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spare_cpus_and_ids() {
        let mut p = Pool {
            cpus: vec![0, 1],
            memory_bytes: 1000,
            instances: vec![],
        };
        assert_eq!(p.spare_cpus(), vec![0, 1]);
        assert_eq!(p.free_id().unwrap(), 1);
        p.instances.push(InstanceEntry {
            id: 1,
            state: InstanceState::Active,
            resources: Resources {
                cpus: vec![0],
                memory_bytes: 400,
            },
            kernel_release: None,
            kernel_sha256: None,
            supervisor_pid: None,
        });
        assert_eq!(p.spare_cpus(), vec![1]);
        assert_eq!(p.spare_memory(), 600);
        assert_eq!(p.free_id().unwrap(), 2);
        assert!(matches!(
            p.expect(1, "load", &[InstanceState::Ready], "ready"),
            Err(PlatformError::WrongState { .. })
        ));
        assert!(matches!(p.get(9), Err(PlatformError::NoSuchInstance(9))));
    }

    #[test]
    fn store_round_trip_under_lock() {
        let dir = tempfile::tempdir().unwrap();
        let s = PoolStore::open(dir.path()).unwrap();
        let fresh = s.read().unwrap();
        assert!(!fresh.cpus.is_empty());
        s.update(|p| {
            p.memory_bytes = 42;
            Ok(())
        })
        .unwrap();
        assert_eq!(s.read().unwrap().memory_bytes, 42);
        // A failing update saves nothing.
        let r: Result<(), _> = s.update(|p| {
            p.memory_bytes = 7;
            Err(PlatformError::Unsupported("test"))
        });
        assert!(r.is_err());
        assert_eq!(s.read().unwrap().memory_bytes, 42);
        fs::write(dir.path().join("pool.json"), "{").unwrap();
        assert!(s.read().unwrap_err().to_string().contains("unreadable"));
    }
}
