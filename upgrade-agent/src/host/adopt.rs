//! Adopting the running copies of workloads after the supervisor itself restarted.
//!
//! The LUO host agent (`mk-agentd serve`) is the parent of its workloads and holds their
//! preserved descriptors. When it is killed or crashes, the workloads go on running (they
//! are re-parented; a frozen one stays frozen) and hold their own copies of those
//! descriptors. A restarted agent must neither lose them (their memfds hold their state)
//! nor start second copies beside them: it adopts them.
//!
//! For that, every start of a workload's process leaves a record in the supervisor's
//! records directory (`STATE_DIR/luo/running/NAME.json`, 0600 in a 0700 directory; written
//! with a rename, not synced: it only matters within one boot; a first line carries the
//! CRC32 of the rest, [`write_checked`]): the boot id, the pid, the
//! process's start time (field 22 of `/proc/PID/stat`, so a recycled pid is never taken for
//! it) and the identity (`st_dev`, `st_ino`) of every descriptor handed to it. Adoption
//! reads the record
//! (a regular file of at most [`MAX_RECORD_BYTES`]), opens a pidfd for the pid and checks
//! the start time, finds each descriptor among the process's own (`/proc/PID/fd`, by
//! identity, wherever the process moved it) and duplicates it with `pidfd_getfd(2)`, then
//! thaws the workload if a move had frozen it. The adopted process is supervised like a
//! started one, except that its exit status is unknown (it is not the agent's child): an
//! exit is treated as a failure by `restart = "on-failure"`.
//!
//! What cannot be adopted: a declared descriptor the process no longer holds (closed) fails
//! the adoption ([`AdoptError::Missing`]); entries of the workload's fd store (`FDSTORE=1`)
//! were held by the agent alone and are lost unless the process still holds them (each loss
//! is logged). A process whose readiness (`READY=1`) was seen by the previous agent is taken
//! as ready.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::supervisor::{Instance, Running};
use crate::model::PreservedFd;
use crate::sys::spawn::{self, Process};
use crate::workload::WorkloadSpec;

/// The largest record read (a record names at most 64 + the declared descriptors).
pub const MAX_RECORD_BYTES: u64 = 64 * 1024;

/// The most descriptors a record may name.
pub const MAX_RECORD_FDS: usize = 256;

/// The identity of one descriptor handed to a workload's process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdIdentity {
    pub name: String,
    pub dev: u64,
    pub ino: u64,
}

/// What one start of a workload's process left for a restarted supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The boot the process started in (`/proc/sys/kernel/random/boot_id`): a record of
    /// another boot names no live process, whatever its pid.
    pub boot_id: String,
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat` at the start.
    pub start_time: u64,
    pub fds: Vec<FdIdentity>,
}

/// Why a running copy could not be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("its record {}: {what}", .path.display())]
    Record { path: PathBuf, what: String },
    #[error("its process {pid} no longer holds its descriptor {name:?}")]
    Missing { pid: i32, name: String },
    #[error("taking descriptor {name:?} from process {pid}: {source}")]
    Take {
        pid: i32,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("thawing it: {0}")]
    Thaw(#[source] io::Error),
    #[error("killing the processes left in its group: {0}")]
    Leftovers(#[source] io::Error),
}

/// The record file of workload `name` in `dir`.
pub fn record_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// Writes the record of workload `w`'s current process (see the module documentation).
pub fn write_record(dir: &Path, w: &Running) -> io::Result<()> {
    write_record_of(dir, &w.spec.name, w.pid, &w.fds)
}

/// Writes the record of workload `name`'s process `pid`, which holds `fds` (handed-over
/// connections among them are left out: they are never handed to another start).
pub fn write_record_of(dir: &Path, name: &str, pid: i32, fds: &[PreservedFd]) -> io::Result<()> {
    let mut ids = Vec::with_capacity(fds.len());
    for p in fds.iter().filter(|p| !crate::model::is_connection(&p.name)) {
        let st = nix::sys::stat::fstat(p.fd.as_fd()).map_err(io::Error::from)?;
        ids.push(FdIdentity {
            name: p.name.clone(),
            dev: st.st_dev,
            ino: st.st_ino,
        });
    }
    let record = Record {
        boot_id: crate::sys::boot_id()
            .ok_or_else(|| io::Error::other("no boot id in /proc/sys/kernel/random/boot_id"))?,
        pid,
        start_time: spawn::start_time(pid)?,
        fds: ids,
    };
    let bytes = serde_json::to_vec(&record).map_err(io::Error::other)?;
    write_checked(&record_path(dir, name), &bytes)
}

/// The first line of a checked file: this tag, a space, the CRC32 of the rest (8 hex
/// digits), a newline.
const CHECKED_TAG: &str = "mk-checked-1";

/// Writes `body` to `path` behind a first line carrying its CRC32 (see [`read_checked`]),
/// with [`write_private`]: every byte of the file is covered.
pub fn write_checked(path: &Path, body: &[u8]) -> io::Result<()> {
    let mut bytes = format!("{CHECKED_TAG} {:08x}\n", crc32fast::hash(body)).into_bytes();
    bytes.extend_from_slice(body);
    write_private(path, &bytes)
}

/// Reads a file [`write_checked`] wrote: a regular file (not followed through a symbolic
/// link) of at most `cap` bytes whose first line's CRC32 matches the rest; returns the rest.
/// `Ok(None)` if there is no file.
pub fn read_checked(path: &Path, cap: u64) -> Result<Option<Vec<u8>>, String> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > cap {
        return Err(format!("{} bytes, over the cap of {cap}", meta.len()));
    }
    let mut bytes = Vec::new();
    f.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no header line (damaged)")?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header not UTF-8 (damaged)")?;
    let want = header
        .strip_prefix(CHECKED_TAG)
        .and_then(|h| h.strip_prefix(' '))
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| format!("header {header:?} is not \"{CHECKED_TAG} <crc32>\" (damaged)"))?;
    let body = bytes.split_off(nl + 1);
    let got = crc32fast::hash(&body);
    if got != want {
        return Err(format!(
            "checksum mismatch (CRC32 {got:08x}, header says {want:08x}): the file is damaged"
        ));
    }
    Ok(Some(body))
}

/// Writes `bytes` to `path` (mode 0600, whatever the umask) through a temporary file and a
/// rename, without syncing: for files that matter only within one boot.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other(format!("{}: no file name", path.display())))?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        // A temporary file left by an earlier run keeps its mode: set it.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        io::Write::write_all(&mut f, bytes)?;
    }
    std::fs::rename(&tmp, path)
}

/// Removes workload `name`'s record (a missing one is fine).
pub fn remove_record(dir: &Path, name: &str) {
    let _ = std::fs::remove_file(record_path(dir, name));
}

/// Reads a record: a regular file (not followed through a symbolic link) of at most
/// [`MAX_RECORD_BYTES`], naming at most [`MAX_RECORD_FDS`] descriptors. `None` if there is
/// none.
pub fn read_record(path: &Path) -> Result<Option<Record>, AdoptError> {
    let bad = |what: String| AdoptError::Record {
        path: path.to_owned(),
        what,
    };
    let Some(bytes) = read_checked(path, MAX_RECORD_BYTES).map_err(bad)? else {
        return Ok(None);
    };
    let record: Record = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if record.fds.len() > MAX_RECORD_FDS {
        return Err(bad(format!(
            "{} descriptors, over the cap of {MAX_RECORD_FDS}",
            record.fds.len()
        )));
    }
    Ok(Some(record))
}

/// The process's descriptors by identity: (`st_dev`, `st_ino`) to its lowest fd number.
fn fds_of(pid: i32) -> io::Result<BTreeMap<(u64, u64), RawFd>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // stat follows the magic link to the open file (a memfd, a socket, ...).
        if let Ok(m) = std::fs::metadata(entry.path()) {
            out.entry((m.dev(), m.ino())).or_insert(fd);
        }
    }
    Ok(out)
}

/// Adopts workload `spec`'s running copy, if its record in `dir` names a live process:
/// `Ok(None)` when there is nothing to adopt (no record, or its process is gone). The copy
/// is thawed. The caller inserts the returned workload into the instance.
pub fn adopt(
    inst: &Instance,
    dir: &Path,
    spec: &WorkloadSpec,
) -> Result<Option<Running>, AdoptError> {
    let path = record_path(dir, &spec.name);
    let Some(record) = read_record(&path)? else {
        return Ok(None);
    };
    if Some(&record.boot_id) != crate::sys::boot_id().as_ref() {
        tracing::info!(workload = %spec.name, "record of another boot: nothing to adopt");
        remove_record(dir, &spec.name);
        return Ok(None);
    }
    let process = match Process::adopt(record.pid, record.start_time) {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(workload = %spec.name, pid = record.pid, error = %e, "recorded process is gone: nothing to adopt");
            remove_record(dir, &spec.name);
            return Ok(None);
        }
    };
    let held = fds_of(record.pid).map_err(|e| AdoptError::Record {
        path: path.clone(),
        what: format!("listing /proc/{}/fd: {e}", record.pid),
    })?;
    let mut fds = Vec::new();
    for id in &record.fds {
        let Some(&fd) = held.get(&(id.dev, id.ino)) else {
            if spec.declares(&id.name) {
                return Err(AdoptError::Missing {
                    pid: record.pid,
                    name: id.name.clone(),
                });
            }
            tracing::warn!(workload = %spec.name, entry = %id.name, "fd store entry was held by the previous agent alone: lost");
            continue;
        };
        let take = |source| AdoptError::Take {
            pid: record.pid,
            name: id.name.clone(),
            source,
        };
        let owned = process.take_fd(fd).map_err(take)?;
        let st = nix::sys::stat::fstat(owned.as_fd()).map_err(|e| take(io::Error::from(e)))?;
        if (st.st_dev, st.st_ino) != (id.dev, id.ino) {
            return Err(take(io::Error::other(format!(
                "fd {fd} changed while it was taken (now {}:{})",
                st.st_dev, st.st_ino
            ))));
        }
        tracing::debug!(workload = %spec.name, name = %id.name, fd, taken = owned.as_raw_fd(), "descriptor adopted");
        fds.push(PreservedFd {
            name: id.name.clone(),
            fd: owned,
        });
    }
    inst.freezer
        .thaw(&spec.name, record.pid)
        .map_err(AdoptError::Thaw)?;
    let mut w = Running::new(spec.clone(), fds, false);
    super::watch::watch_exit(inst, &process);
    w.process = Some(process);
    w.pid = record.pid;
    w.readiness.set();
    Ok(Some(w))
}

/// What [`adopt_into`] did with one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// Its running copy (this pid) is now managed here, thawed.
    Adopted { pid: i32, fds: usize },
    /// Nothing ran to adopt (processes left in its group without a valid record were
    /// killed: nothing of theirs could be held).
    Nothing { killed_leftovers: bool },
}

/// Adopts workload `spec`'s running copy into the instance (see [`adopt`]); the instance's
/// `records` directory must be set. A workload already managed here is left alone.
pub fn adopt_into(
    shared: &super::supervisor::Shared,
    spec: &WorkloadSpec,
) -> Result<Adoption, AdoptError> {
    let mut inst = super::supervisor::lock(shared);
    if inst.workloads.contains_key(&spec.name) {
        return Ok(Adoption::Nothing {
            killed_leftovers: false,
        });
    }
    let Some(dir) = inst.records.clone() else {
        return Ok(Adoption::Nothing {
            killed_leftovers: false,
        });
    };
    if let Some(w) = adopt(&inst, &dir, spec)? {
        let (pid, fds) = (w.pid, w.fds.len());
        inst.workloads.insert(spec.name.clone(), w);
        return Ok(Adoption::Adopted { pid, fds });
    }
    let killed_leftovers = match inst.freezer.group(&spec.name) {
        Some(g) => super::supervisor::empty_group(&g, Duration::from_secs(5))
            .map_err(AdoptError::Leftovers)?,
        None => false,
    };
    if killed_leftovers {
        tracing::warn!(workload = %spec.name, "processes without a valid record were left in its group: killed");
    }
    Ok(Adoption::Nothing { killed_leftovers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::supervisor;
    use crate::workload::{ListenSpec, MemfdSpec};
    use std::os::unix::fs::{FileExt, PermissionsExt};

    fn spec() -> WorkloadSpec {
        let mut s = WorkloadSpec::new("w", "/bin/sleep");
        s.args = vec!["1000".into()];
        s.memfds = vec![MemfdSpec {
            name: "data".into(),
            size: 4096,
        }];
        s.listeners = vec![ListenSpec {
            name: "http".into(),
            addr: "127.0.0.1:0".parse().unwrap(),
        }];
        s
    }

    /// Starts the workload on a first "agent" (instance), writes into its memfd and
    /// forgets the instance, as a killed agent would; returns the pid.
    fn start_and_forget(records: &Path, s: &WorkloadSpec) -> i32 {
        let first = supervisor::test_instance(records);
        let fds = supervisor::fresh_fds(s).unwrap();
        supervisor::admit(&first, &s.name, s, fds, &[], false).unwrap();
        let mut inst = supervisor::lock(&first);
        let w = inst.workloads.remove(&s.name).unwrap();
        let f = std::fs::File::from(w.fds[0].fd.try_clone().unwrap());
        f.write_all_at(b"acknowledged", 0).unwrap();
        let pid = w.pid;
        // The agent is gone: its process handle and descriptors with it; the workload
        // still runs (and holds its own copies).
        drop(w);
        pid
    }

    fn kill(pid: i32) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    }

    #[test]
    fn a_restarted_supervisor_adopts_the_running_copy_with_its_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec();
        let pid = start_and_forget(dir.path(), &s);
        // The record is private and names both descriptors.
        let path = record_path(dir.path(), "w");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let rec = read_record(&path).unwrap().unwrap();
        assert_eq!(rec.pid, pid);
        assert_eq!(rec.fds.len(), 2);
        // Frozen mid-move when the agent died: adoption thaws it.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
        let second = supervisor::test_instance(dir.path());
        let got = adopt_into(&second, &s).unwrap();
        assert_eq!(got, Adoption::Adopted { pid, fds: 2 });
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let state = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .next()
            .unwrap();
        assert_ne!(state, "T", "still stopped: {stat}");
        {
            let mut inst = supervisor::lock(&second);
            let w = inst.workloads.get_mut("w").unwrap();
            assert!(w.alive());
            assert!(w.process.as_ref().unwrap().adopted());
            // The memfd is the workload's own: the acknowledged bytes are there.
            let f = std::fs::File::from(w.fds[0].fd.try_clone().unwrap());
            let mut buf = [0u8; 12];
            f.read_exact_at(&mut buf, 0).unwrap();
            assert_eq!(&buf, b"acknowledged");
            // The listener is a listening socket.
            let l = std::net::TcpListener::from(w.fds[1].fd.try_clone().unwrap());
            assert!(l.local_addr().unwrap().port() > 0);
        }
        // Its exit is seen through the pidfd, with an unknown status: an adopted process
        // is not the agent's child (here it is the test's, but adoption never waits on it).
        kill(pid);
        let mut inst = supervisor::lock(&second);
        let w = inst.workloads.get_mut("w").unwrap();
        assert!(!w.alive());
        assert!(
            w.exit.as_deref().unwrap().contains("status unknown"),
            "{:?}",
            w.exit
        );
    }

    #[test]
    fn a_stale_or_foreign_record_adopts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec();
        // No record: nothing.
        let second = supervisor::test_instance(dir.path());
        assert_eq!(
            adopt_into(&second, &s).unwrap(),
            Adoption::Nothing {
                killed_leftovers: false
            }
        );
        // The recorded process is gone: nothing, and the record is removed.
        let pid = start_and_forget(dir.path(), &s);
        kill(pid);
        assert_eq!(
            adopt_into(&second, &s).unwrap(),
            Adoption::Nothing {
                killed_leftovers: false
            }
        );
        assert!(!record_path(dir.path(), "w").exists());
        // A live pid whose start time differs (a recycled pid): refused.
        let pid = start_and_forget(dir.path(), &s);
        let path = record_path(dir.path(), "w");
        let mut rec = read_record(&path).unwrap().unwrap();
        rec.start_time += 1;
        write_checked(&path, &serde_json::to_vec(&rec).unwrap()).unwrap();
        assert_eq!(
            adopt_into(&second, &s).unwrap(),
            Adoption::Nothing {
                killed_leftovers: false
            }
        );
        kill(pid);
        // A record of another boot, whatever its pid and start time: nothing, and removed.
        let pid = start_and_forget(dir.path(), &s);
        let mut rec = read_record(&path).unwrap().unwrap();
        rec.boot_id = "00000000-0000-0000-0000-000000000000".into();
        write_checked(&path, &serde_json::to_vec(&rec).unwrap()).unwrap();
        assert_eq!(
            adopt_into(&second, &s).unwrap(),
            Adoption::Nothing {
                killed_leftovers: false
            }
        );
        assert!(!path.exists());
        kill(pid);
    }

    #[test]
    fn a_declared_descriptor_the_process_no_longer_holds_fails_the_adoption() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec();
        let pid = start_and_forget(dir.path(), &s);
        let path = record_path(dir.path(), "w");
        let mut rec = read_record(&path).unwrap().unwrap();
        rec.fds[0].ino = u64::MAX;
        // An fd store entry it does not hold is only logged as lost.
        rec.fds.push(FdIdentity {
            name: "stored".into(),
            dev: 1,
            ino: u64::MAX,
        });
        write_checked(&path, &serde_json::to_vec(&rec).unwrap()).unwrap();
        let e = adopt_into(&supervisor::test_instance(dir.path()), &s).unwrap_err();
        assert!(
            matches!(&e, AdoptError::Missing { name, .. } if name == "data"),
            "{e}"
        );
        rec.fds.remove(0);
        write_checked(&path, &serde_json::to_vec(&rec).unwrap()).unwrap();
        let mut s1 = s.clone();
        s1.memfds.clear();
        let second = supervisor::test_instance(dir.path());
        assert_eq!(
            adopt_into(&second, &s1).unwrap(),
            Adoption::Adopted { pid, fds: 1 }
        );
        kill(pid);
    }

    #[test]
    fn records_are_bounded_and_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "w");
        std::fs::write(
            &path,
            vec![b' '; usize::try_from(MAX_RECORD_BYTES).unwrap() + 1],
        )
        .unwrap();
        let e = read_record(&path).unwrap_err().to_string();
        assert!(e.contains("over the cap"), "{e}");
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &path).unwrap();
        assert!(read_record(&path).is_err());
        std::fs::remove_file(&path).unwrap();
        let many = Record {
            boot_id: String::new(),
            pid: 1,
            start_time: 1,
            fds: (0..=MAX_RECORD_FDS)
                .map(|i| FdIdentity {
                    name: i.to_string(),
                    dev: 0,
                    ino: 0,
                })
                .collect(),
        };
        write_checked(&path, &serde_json::to_vec(&many).unwrap()).unwrap();
        let e = read_record(&path).unwrap_err().to_string();
        assert!(e.contains("descriptors, over the cap"), "{e}");
        write_checked(&path, b"{\"pid\": 1}").unwrap();
        assert!(read_record(&path).is_err());
        // Every byte is covered: a record with one flipped bit is refused as damaged, and
        // adoption then fails (the copy is left running) instead of finding nothing.
        let good = Record {
            boot_id: "b".into(),
            pid: 1,
            start_time: 12345,
            fds: Vec::new(),
        };
        write_checked(&path, &serde_json::to_vec(&good).unwrap()).unwrap();
        assert_eq!(read_record(&path).unwrap().unwrap(), good);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let e = read_record(&path).unwrap_err().to_string();
        assert!(e.contains("damaged"), "{e}");
        std::fs::write(&path, b"{}").unwrap();
        assert!(
            read_record(&path)
                .unwrap_err()
                .to_string()
                .contains("damaged")
        );
    }
}
