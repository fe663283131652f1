//! Memory state: preserved memfd regions with their digests, hugepage pools, vm sysctls.

use std::fs;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::digest::{RegionDigest, digest_fd, verify_fd};
use crate::error::{Result, StateError};
use crate::procfs::{self, under};
use crate::task::{FdKind, TaskState};
use crate::{Policy, Report, SCHEMA_VERSION};

/// Memory handed over (schema version [`SCHEMA_VERSION`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryState {
    pub schema_version: u16,
    pub regions: Vec<MemoryRegion>,
    pub hugepages: Vec<HugepagePool>,
    pub vm: VmSysctls,
}

/// One preserved memfd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Handover token: the name under which the memfd is handed to the new kernel.
    pub token: String,
    /// The memfd's own name (`memfd_create` name), informational.
    pub name: String,
    /// `F_SEAL_*` bits at capture time.
    pub seals: u32,
    /// Length and digests of the contents at capture time.
    pub digest: RegionDigest,
}

/// A hugepage pool (`/sys/kernel/mm/hugepages/hugepages-<size>kB/nr_hugepages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugepagePool {
    pub page_size_kb: u64,
    pub nr_hugepages: u64,
}

/// The vm sysctls workloads depend on; `None` when the kernel does not have the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSysctls {
    pub overcommit_memory: Option<u64>,
    pub overcommit_ratio: Option<u64>,
    pub swappiness: Option<u64>,
    pub max_map_count: Option<u64>,
}

const SYSCTLS: [&str; 4] = [
    "overcommit_memory",
    "overcommit_ratio",
    "swappiness",
    "max_map_count",
];

impl VmSysctls {
    fn get(&self, name: &str) -> Option<u64> {
        match name {
            "overcommit_memory" => self.overcommit_memory,
            "overcommit_ratio" => self.overcommit_ratio,
            "swappiness" => self.swappiness,
            "max_map_count" => self.max_map_count,
            _ => None,
        }
    }

    fn set(&mut self, name: &str, v: Option<u64>) {
        match name {
            "overcommit_memory" => self.overcommit_memory = v,
            "overcommit_ratio" => self.overcommit_ratio = v,
            "swappiness" => self.swappiness = v,
            "max_map_count" => self.max_map_count = v,
            _ => {}
        }
    }
}

/// A memfd to preserve: handover token, memfd name, descriptor.
#[derive(Debug, Clone, Copy)]
pub struct RegionSource<'a> {
    pub token: &'a str,
    pub name: &'a str,
    pub fd: BorrowedFd<'a>,
}

/// Reads the vm sysctls under `<root>/proc/sys/vm`.
pub fn capture_vm_sysctls(root: &Path) -> Result<VmSysctls> {
    let mut vm = VmSysctls::default();
    for name in SYSCTLS {
        let path = under(root, &format!("/proc/sys/vm/{name}"));
        let v = match procfs::read_text_opt(&path)? {
            Some(t) => Some(procfs::parse_num(&path, name, &t)?),
            None => None,
        };
        vm.set(name, v);
    }
    Ok(vm)
}

/// Reads every hugepage pool under `<root>/sys/kernel/mm/hugepages`, smallest page first.
/// A kernel without hugetlbfs (no directory) has no pools.
pub fn capture_hugepages(root: &Path) -> Result<Vec<HugepagePool>> {
    let dir = under(root, "/sys/kernel/mm/hugepages");
    let mut out = Vec::new();
    for ent in procfs::dir_entries(&dir)? {
        let name = ent.file_name().to_string_lossy().into_owned();
        let size = name
            .strip_prefix("hugepages-")
            .and_then(|s| s.strip_suffix("kB"))
            .ok_or_else(|| StateError::malformed(&dir, format!("unexpected entry {name:?}")))?;
        let page_size_kb = procfs::parse_num(&dir, "hugepage size", size)?;
        let path = ent.path().join("nr_hugepages");
        let nr_hugepages = procfs::parse_num(&path, "nr_hugepages", &procfs::read_text(&path)?)?;
        out.push(HugepagePool {
            page_size_kb,
            nr_hugepages,
        });
    }
    out.sort_by_key(|p| p.page_size_kb);
    Ok(out)
}

/// Digests the given memfds in parallel and records their seals.
pub fn capture_regions(sources: &[RegionSource<'_>]) -> Result<Vec<MemoryRegion>> {
    sources
        .par_iter()
        .map(|s| {
            let seals = crate::sys::get_seals(s.fd).map_err(|e| StateError::Sys {
                call: "fcntl(F_GET_SEALS) (is the region a memfd?)",
                source: e,
            })?;
            Ok(MemoryRegion {
                token: s.token.to_owned(),
                name: s.name.to_owned(),
                seals,
                digest: digest_fd(s.fd)?,
            })
        })
        .collect()
}

/// Handover token given to a memfd found in a captured task: `pid<PID>-fd<FD>`.
pub fn task_region_token(pid: i32, fd: i32) -> String {
    format!("pid{pid}-fd{fd}")
}

/// Opens every memfd of the captured tasks through `<root>/proc/PID/fd/N` and digests
/// them (tokens from [`task_region_token`]).
pub fn regions_of_tasks(root: &Path, tasks: &TaskState) -> Result<Vec<MemoryRegion>> {
    let mut files = Vec::new();
    for t in &tasks.tasks {
        for f in &t.fds {
            if let FdKind::Memfd { name, .. } = &f.kind {
                let path = under(root, &format!("/proc/{}/fd/{}", t.pid, f.fd));
                let file = fs::File::open(&path).map_err(|e| match StateError::io(&path, e) {
                    e if e.is_not_found() => StateError::ProcessChanged {
                        pid: t.pid,
                        what: format!("memfd fd {} closed after capture", f.fd),
                    },
                    e => e,
                })?;
                files.push((task_region_token(t.pid, f.fd), name.clone(), file));
            }
        }
    }
    let sources: Vec<RegionSource<'_>> = files
        .iter()
        .map(|(token, name, file)| RegionSource {
            token,
            name,
            fd: file.as_fd(),
        })
        .collect();
    capture_regions(&sources)
}

/// Captures sysctls, hugepage pools and the given regions.
pub fn capture_memory(root: &Path, regions: &[RegionSource<'_>]) -> Result<MemoryState> {
    Ok(MemoryState {
        schema_version: SCHEMA_VERSION,
        regions: capture_regions(regions)?,
        hugepages: capture_hugepages(root)?,
        vm: capture_vm_sysctls(root)?,
    })
}

/// Verifies every captured region against the descriptors handed over, in parallel:
/// each token must be present, carry at least the captured seals and have identical
/// length, CRC32 and SHA-256. Any failure is an error the agent turns into a rollback.
pub fn verify_regions(state: &MemoryState, handed: &[(&str, BorrowedFd<'_>)]) -> Result<()> {
    state
        .regions
        .par_iter()
        .map(|r| {
            let (_, fd) = handed.iter().find(|(t, _)| *t == r.token).ok_or_else(|| {
                StateError::RegionMissing {
                    token: r.token.clone(),
                }
            })?;
            let seals = crate::sys::get_seals(*fd).map_err(|e| StateError::Sys {
                call: "fcntl(F_GET_SEALS)",
                source: e,
            })?;
            if seals & r.seals != r.seals {
                return Err(StateError::SealsMismatch {
                    token: r.token.clone(),
                    expected: r.seals,
                    found: seals,
                });
            }
            verify_fd(&r.token, *fd, &r.digest)
        })
        .collect::<Result<Vec<()>>>()
        .map(|_| ())
}

fn write_value(path: &Path, value: u64) -> std::io::Result<()> {
    fs::write(path, format!("{value}\n"))
}

/// Re-applies vm sysctls and hugepage pool sizes under `root`. Values already in place
/// are left alone (and reported as applied). A hugepage pool the kernel could only
/// partly allocate, a missing pool size or a refused write is a not-applied item.
pub fn restore_memory(root: &Path, state: &MemoryState, policy: Policy) -> Result<Report> {
    let mut report = Report::default();
    for name in SYSCTLS {
        let Some(want) = state.vm.get(name) else {
            continue;
        };
        let item = format!("vm.{name}={want}");
        let path = under(root, &format!("/proc/sys/vm/{name}"));
        let current = procfs::read_text_opt(&path)?;
        match current.as_deref().map(str::trim) {
            None => report.not_applied(item, "the new kernel has no such sysctl"),
            Some(c) if c == want.to_string() => report.applied(item),
            Some(_) => match write_value(&path, want) {
                Ok(()) => report.applied(item),
                Err(e) => report.not_applied(item, format!("{}: {e}", path.display())),
            },
        }
    }
    for pool in &state.hugepages {
        let item = format!("hugepages-{}kB={}", pool.page_size_kb, pool.nr_hugepages);
        let path = under(
            root,
            &format!(
                "/sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages",
                pool.page_size_kb
            ),
        );
        let Some(cur) = procfs::read_text_opt(&path)? else {
            report.not_applied(item, "the new kernel has no pool of this page size");
            continue;
        };
        if cur.trim() == pool.nr_hugepages.to_string() {
            report.applied(item);
            continue;
        }
        if let Err(e) = write_value(&path, pool.nr_hugepages) {
            report.not_applied(item, format!("{}: {e}", path.display()));
            continue;
        }
        let got: u64 = procfs::parse_num(&path, "nr_hugepages", &procfs::read_text(&path)?)?;
        if got == pool.nr_hugepages {
            report.applied(item);
        } else {
            report.not_applied(item, format!("the kernel allocated only {got} pages"));
        }
    }
    report.finish(policy)
}
