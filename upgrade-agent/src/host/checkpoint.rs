//! `mode = "checkpoint"`: the workload's whole process tree is checkpointed with CRIU
//! (<https://criu.org>, version 4.2 or later) while it is stopped, and restored on the other
//! side: its memory, its own descriptors and sockets, and its established TCP connections
//! (`--tcp-established`: the sockets are dumped in `TCP_REPAIR` mode behind an nftables
//! network lock, so the peers see a pause, not a reset).
//!
//! * **Start.** The workload's first process is started as pid 1 of its own PID namespace
//!   (`clone3(CLONE_NEWPID)`), as a session leader, with stdin, stdout and stderr on
//!   `/dev/null` and no other descriptor: CRIU can restore exactly that (the pids inside the
//!   namespace are free again on the other side; nothing points outside the tree).
//! * **Dump** (the move's freeze): `criu dump -t PID --tcp-established --network-lock
//!   nftables --manage-cgroups=ignore` into a private directory; CRIU stops the tree, dumps
//!   it and kills it. The image files are then packed into one sealed memfd, the workload's
//!   preserved descriptor [`IMAGES`], which moves like any memfd (digested into an external
//!   region of the signed handover image; on LUO preserved in the workload's session). On
//!   failure CRIU resumes the tree and nothing changed.
//! * **Restore** (the start of the moved copy, or of the old one again when the move is
//!   rolled back): the images are unpacked into a private directory and `criu restore
//!   --restore-detached` is started inside the workload's cgroup (`CLONE_INTO_CGROUP`, with
//!   `--manage-cgroups=ignore` the restored tree stays in it). The restored process is not
//!   the agent's child: it is adopted (pidfd, unknown exit status).
//!
//! The packed images are untrusted bytes on the receiving side until the handover image's
//! digests and signature checked out, and are parsed defensively even then: at most
//! [`MAX_FILES`] files, flat names of `[A-Za-z0-9._-]` (no leading dot), every length within
//! the memfd.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sys::spawn::{self, Process, SpawnRequest};

/// The name of the preserved descriptor that carries a checkpoint (the packed images).
pub const IMAGES: &str = "criu-images";

/// The oldest CRIU that works here (4.1 cannot dump a TCP socket on Linux 6.18).
pub const MIN_VERSION: (u32, u32) = (4, 2);

/// The most files a packed checkpoint may hold.
pub const MAX_FILES: usize = 4096;

/// The longest file name in a packed checkpoint.
pub const MAX_NAME: usize = 255;

const MAGIC: &[u8; 8] = b"MKCRIU1\n";

/// How long a dump or a restore may take.
pub const CRIU_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a checkpoint or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "CRIU (>= {}.{}) is not installed: install it (deploy/install-criu.sh builds it), or set \
         MK_CRIU to its path",
        MIN_VERSION.0,
        MIN_VERSION.1
    )]
    NoCriu,
    #[error("criu {what} failed ({status}): {log}")]
    Criu {
        what: &'static str,
        status: String,
        /// The last error lines of CRIU's log.
        log: String,
    },
    #[error("the packed checkpoint is malformed: {0}")]
    Malformed(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CheckpointError {
    let what = what.into();
    move |source| CheckpointError::Io { what, source }
}

/// The CRIU binary: `MK_CRIU`, else `criu` on `PATH`, else `/usr/local/sbin/criu`,
/// `/usr/sbin/criu`.
pub fn criu_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MK_CRIU").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("criu"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([
            PathBuf::from("/usr/local/sbin/criu"),
            PathBuf::from("/usr/sbin/criu"),
        ])
        .find(|p| p.is_file())
}

/// `criu --version`: (major, minor), if it runs.
pub fn criu_version(criu: &Path) -> Option<(u32, u32)> {
    let out = std::process::Command::new(criu)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))?
        .trim()
        .to_owned();
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
}

/// Whether checkpoint mode can work on this host: `Ok(what was found)`, or `Err((what is
/// missing, how to fix it))`. Runs `criu --version` and `criu check` (which names each
/// kernel feature it misses: `CONFIG_CHECKPOINT_RESTORE`, the namespaces, the socket diag
/// modules, nf_tables for the network lock, ...; `docs/workloads.md`).
pub fn readiness() -> Result<String, (String, String)> {
    // The kernel first: each missing option is named with its reason.
    let kernel_note = match crate::sys::kconfig::load_running_config() {
        Ok((config, path)) => {
            let gaps = kernel_gaps(&config);
            let required: Vec<&KernelOption> = gaps.iter().filter(|o| !o.optional).collect();
            if !required.is_empty() {
                return Err((
                    format!(
                        "the running kernel ({}) lacks what checkpoint mode needs: {}",
                        path.display(),
                        required
                            .iter()
                            .map(|o| format!("{} ({})", o.name, o.why))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                    "boot a kernel with the options of kernel-patches/configs/criu.config (each \
                     one is explained there)"
                        .into(),
                ));
            }
            let optional: Vec<&str> = gaps.iter().map(|o| o.name.as_str()).collect();
            if optional.is_empty() {
                format!(
                    "; kernel options of criu.config all set ({})",
                    path.display()
                )
            } else {
                format!(
                    "; kernel options set, except optional {} (pre-dump, lazy restore: not used yet)",
                    optional.join(", ")
                )
            }
        }
        Err(e) => format!("; kernel options not checked ({e})"),
    };
    readiness_of_criu().map(|ok| ok + &kernel_note)
}

/// The fragment `kernel-patches/configs/criu.config`, the list of what checkpoint mode needs.
const CRIU_FRAGMENT: &str = include_str!("../../../kernel-patches/configs/criu.config");

/// Options of the fragment for features the agent does not use yet (pre-dump, lazy restore).
const OPTIONAL_OPTIONS: &[&str] = &["CONFIG_MEM_SOFT_DIRTY", "CONFIG_USERFAULTFD"];

/// One option of `criu.config` and why CRIU needs it (the comment above it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelOption {
    pub name: String,
    pub why: String,
    /// For a feature the agent does not use yet.
    pub optional: bool,
}

/// The options of a config fragment with the comment that explains each (the comment lines
/// just above it, or above the run of options it belongs to).
pub fn fragment_options(fragment: &str) -> Vec<KernelOption> {
    let mut out = Vec::new();
    let mut comment: Vec<&str> = Vec::new();
    let mut in_comment = false;
    for line in fragment.lines() {
        let line = line.trim();
        if let Some(c) = line.strip_prefix('#') {
            let c = c.trim();
            if c.starts_with("---") {
                continue;
            }
            if !in_comment {
                comment.clear();
                in_comment = true;
            }
            comment.push(c);
        } else if let Some((name, _)) = line.split_once('=') {
            in_comment = false;
            if name.starts_with("CONFIG_") {
                out.push(KernelOption {
                    name: name.to_owned(),
                    why: comment.join(" "),
                    optional: OPTIONAL_OPTIONS.contains(&name),
                });
            }
        } else {
            in_comment = false;
        }
    }
    out
}

/// The options of `criu.config` that `config` does not set (built in or as a module).
pub fn kernel_gaps(config: &crate::sys::kconfig::KernelConfig) -> Vec<KernelOption> {
    fragment_options(CRIU_FRAGMENT)
        .into_iter()
        .filter(|o| !matches!(config.value(&o.name), Some("y" | "m")))
        .collect()
}

/// CRIU itself: installed, recent enough, and `criu check` passes.
fn readiness_of_criu() -> Result<String, (String, String)> {
    let install = "run `bash deploy/install-criu.sh` as root (builds CRIU from Debian's source \
                   package), or set MK_CRIU to a CRIU >= 4.2";
    let Some(criu) = criu_path() else {
        return Err(("CRIU is not installed".into(), install.into()));
    };
    let Some(v) = criu_version(&criu) else {
        return Err((
            format!("{} --version does not run", criu.display()),
            install.into(),
        ));
    };
    if v < MIN_VERSION {
        return Err((
            format!(
                "{} is version {}.{}; checkpoint mode needs {}.{} or later (4.1 cannot dump a TCP \
                 socket on Linux 6.18)",
                criu.display(),
                v.0,
                v.1,
                MIN_VERSION.0,
                MIN_VERSION.1
            ),
            install.into(),
        ));
    }
    let out = std::process::Command::new(&criu)
        .arg("check")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            (
                format!("running {} check: {e}", criu.display()),
                install.to_owned(),
            )
        })?;
    if out.status.success() {
        return Ok(format!(
            "{} {}.{}: `criu check` passes",
            criu.display(),
            v.0,
            v.1
        ));
    }
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("CONFIG_") || l.contains("Warn"))
        .take(6)
        .collect();
    Err((
        format!(
            "`{} check` fails on this kernel: {}",
            criu.display(),
            if missing.is_empty() {
                text.trim().to_owned()
            } else {
                missing.join(" | ")
            }
        ),
        "boot a kernel with the options of kernel-patches/configs/criu.config (each one is \
         explained there)"
            .into(),
    ))
}

/// Runs CRIU with `args`, at most [`CRIU_TIMEOUT`]; `Err` with the tail of its log on
/// failure.
fn run_criu(
    criu: &Path,
    what: &'static str,
    args: &[String],
    log: &Path,
    cgroup_dir: Option<BorrowedFd<'_>>,
) -> Result<(), CheckpointError> {
    let devnull = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(io_err("opening /dev/null"))?;
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k == "PATH" || k == "LANG")
        .collect();
    let mut p = spawn::spawn(&SpawnRequest {
        exec: criu,
        args,
        env: &env,
        listen_pid: false,
        fds: &[],
        cgroup_dir,
        cpus: None,
        new_session: true,
        stdio: spawn::Stdio::Null,
        output: Some(devnull.as_fd()),
        new_pid_namespace: false,
    })
    .map_err(io_err(format!("starting {}", criu.display())))?;
    let Some(status) = p
        .wait_timeout(CRIU_TIMEOUT)
        .map_err(io_err("waiting for criu"))?
    else {
        p.kill_and_reap();
        return Err(CheckpointError::Criu {
            what,
            status: format!("no answer in {} s: killed", CRIU_TIMEOUT.as_secs()),
            log: log_tail(log),
        });
    };
    if status.success() {
        Ok(())
    } else {
        Err(CheckpointError::Criu {
            what,
            status: status.to_string(),
            log: log_tail(log),
        })
    }
}

/// The last error lines of a CRIU log (at most 600 bytes).
fn log_tail(log: &Path) -> String {
    let text = std::fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
        .collect();
    let picked = if errors.is_empty() {
        text.lines().rev().take(3).collect::<Vec<_>>()
    } else {
        errors.into_iter().rev().take(3).collect::<Vec<_>>()
    };
    let mut s = picked.into_iter().rev().collect::<Vec<_>>().join(" | ");
    if s.len() > 600 {
        let mut cut = 600;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    if s.is_empty() {
        format!("see {}", log.display())
    } else {
        format!("{s} (log {})", log.display())
    }
}

/// A fresh private (0700) working directory `dir/<what>` (emptied if it exists).
fn workdir(dir: &Path, what: &str) -> Result<PathBuf, CheckpointError> {
    let d = dir.join(what);
    if d.exists() {
        std::fs::remove_dir_all(&d).map_err(io_err(format!("clearing {}", d.display())))?;
    }
    rollback::ensure_private_dir(&d).map_err(|e| CheckpointError::Io {
        what: format!("creating {}", d.display()),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(d)
}

fn common_args() -> Vec<String> {
    [
        "--tcp-established",
        "--network-lock",
        "nftables",
        "--manage-cgroups=ignore",
        "-v2",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Checkpoints the process tree rooted at `pid` (CRIU stops and dumps it, then kills it);
/// returns the packed images as a sealed memfd. `dir` is a private scratch directory of the
/// workload (its images are removed once packed; the log stays).
pub fn dump(criu: &Path, pid: i32, dir: &Path, name: &str) -> Result<OwnedFd, CheckpointError> {
    let images = workdir(dir, "dump")?;
    let log = dir.join("dump.log");
    let mut args = vec![
        "dump".to_owned(),
        "-t".to_owned(),
        pid.to_string(),
        "-D".to_owned(),
        images.display().to_string(),
        "-o".to_owned(),
        log.display().to_string(),
    ];
    args.extend(common_args());
    run_criu(criu, "dump", &args, &log, None)?;
    let packed = pack(&images)?;
    let _ = std::fs::remove_dir_all(&images);
    crate::handover::sealed_memfd(&format!("mk:{name}:{IMAGES}"), &packed)
        .map_err(io_err("sealing the packed checkpoint"))
}

/// Restores the packed checkpoint `images` inside the cgroup `cgroup_dir` (the restored
/// tree stays there); returns the restored root process, adopted.
pub fn restore(
    criu: &Path,
    images: BorrowedFd<'_>,
    dir: &Path,
    cgroup_dir: Option<BorrowedFd<'_>>,
) -> Result<Process, CheckpointError> {
    let target = workdir(dir, "restore")?;
    let bytes = read_fd(images)?;
    unpack(&bytes, &target)?;
    let log = dir.join("restore.log");
    let pidfile = dir.join("restore.pid");
    let _ = std::fs::remove_file(&pidfile);
    let mut args = vec![
        "restore".to_owned(),
        "-D".to_owned(),
        target.display().to_string(),
        "-o".to_owned(),
        log.display().to_string(),
        "--restore-detached".to_owned(),
        "--pidfile".to_owned(),
        pidfile.display().to_string(),
    ];
    args.extend(common_args());
    let result = run_criu(criu, "restore", &args, &log, cgroup_dir);
    let _ = std::fs::remove_dir_all(&target);
    result?;
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .map_err(io_err(format!("reading {}", pidfile.display())))?
        .trim()
        .parse()
        .map_err(|e| CheckpointError::Malformed(format!("criu's pid file: {e}")))?;
    let start = spawn::start_time(pid).map_err(io_err(format!("the restored process {pid}")))?;
    Process::adopt(pid, start).map_err(io_err(format!("adopting the restored process {pid}")))
}

fn read_fd(fd: BorrowedFd<'_>) -> Result<Vec<u8>, CheckpointError> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::from(fd.try_clone_to_owned().map_err(io_err("dup"))?);
    let len = f.metadata().map_err(io_err("fstat"))?.len();
    let len = usize::try_from(len).map_err(|_| CheckpointError::Malformed("too large".into()))?;
    let mut out = vec![0u8; len];
    // From offset 0, whatever the memfd's shared file position is.
    f.read_exact_at(&mut out, 0)
        .map_err(io_err("reading the packed checkpoint"))?;
    Ok(out)
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Packs the regular files of `dir` (flat) into one buffer: `MKCRIU1\n`, the file count
/// (u32 LE), then per file its name length (u16 LE), name, length (u64 LE) and bytes.
pub fn pack(dir: &Path) -> Result<Vec<u8>, CheckpointError> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))? {
        let e = e.map_err(io_err("listing the images"))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let ft = e.file_type().map_err(io_err("listing the images"))?;
        if !ft.is_file() || !valid_name(&name) {
            return Err(CheckpointError::Malformed(format!(
                "unexpected entry {name:?} in the image directory"
            )));
        }
        names.push(name);
    }
    if names.len() > MAX_FILES {
        return Err(CheckpointError::Malformed(format!(
            "{} image files, more than {MAX_FILES}",
            names.len()
        )));
    }
    names.sort();
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&u32::try_from(names.len()).unwrap_or(u32::MAX).to_le_bytes());
    for n in names {
        let data = std::fs::read(dir.join(&n)).map_err(io_err(format!("reading {n}")))?;
        out.extend_from_slice(&u16::try_from(n.len()).unwrap_or(u16::MAX).to_le_bytes());
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(&data);
    }
    Ok(out)
}

/// Unpacks [`pack`]'s format into the empty directory `dir` (files 0600). Every bound is
/// checked before anything is allocated or written.
pub fn unpack(bytes: &[u8], dir: &Path) -> Result<(), CheckpointError> {
    let bad = |w: &str| CheckpointError::Malformed(w.to_owned());
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], CheckpointError> {
        let end = at
            .checked_add(n)
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| bad("truncated"))?;
        let s = &bytes[at..end];
        at = end;
        Ok(s)
    };
    if take(MAGIC.len())? != MAGIC {
        return Err(bad("not a packed checkpoint (magic)"));
    }
    let count = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad("count"))?) as usize;
    if count > MAX_FILES {
        return Err(CheckpointError::Malformed(format!(
            "{count} files, more than {MAX_FILES}"
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..count {
        let nlen =
            u16::from_le_bytes(take(2)?.try_into().map_err(|_| bad("name length"))?) as usize;
        if nlen > MAX_NAME {
            return Err(bad("name too long"));
        }
        let name = std::str::from_utf8(take(nlen)?).map_err(|_| bad("name not UTF-8"))?;
        if !valid_name(name) || !seen.insert(name.to_owned()) {
            return Err(CheckpointError::Malformed(format!(
                "bad or repeated name {name:?}"
            )));
        }
        let len = u64::from_le_bytes(take(8)?.try_into().map_err(|_| bad("length"))?);
        let len = usize::try_from(len).map_err(|_| bad("length"))?;
        let data = take(len)?;
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(format!("creating {}", path.display())))?;
        f.write_all(data)
            .map_err(io_err(format!("writing {}", path.display())))?;
    }
    if at != bytes.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::kconfig::KernelConfig;

    #[test]
    fn every_option_of_the_fragment_is_explained() {
        let opts = fragment_options(CRIU_FRAGMENT);
        assert!(opts.len() >= 30, "{opts:?}");
        for o in &opts {
            assert!(o.why.len() > 20, "{} has no explanation: {o:?}", o.name);
        }
        let optional: Vec<&str> = opts
            .iter()
            .filter(|o| o.optional)
            .map(|o| o.name.as_str())
            .collect();
        assert_eq!(
            optional, OPTIONAL_OPTIONS,
            "both optional options are in the fragment"
        );
        let lock = opts.iter().find(|o| o.name == "CONFIG_NF_TABLES").unwrap();
        assert!(
            lock.why.contains("network lock") || lock.why.contains("nftables"),
            "{lock:?}"
        );
    }

    #[test]
    fn kernel_gaps_name_what_a_config_lacks() {
        let all = fragment_options(CRIU_FRAGMENT)
            .iter()
            .map(|o| format!("{}=y", o.name))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        assert!(kernel_gaps(&KernelConfig::parse(&all)).is_empty());
        // A module counts; "not set" and absent do not.
        let text = all
            .replace("CONFIG_UNIX_DIAG=y", "CONFIG_UNIX_DIAG=m")
            .replace("CONFIG_NF_TABLES=y", "# CONFIG_NF_TABLES is not set")
            .replace("CONFIG_CHECKPOINT_RESTORE=y\n", "")
            .replace("CONFIG_MEM_SOFT_DIRTY=y\n", "");
        let gaps = kernel_gaps(&KernelConfig::parse(&text));
        let names: Vec<(&str, bool)> = gaps.iter().map(|o| (o.name.as_str(), o.optional)).collect();
        assert_eq!(
            names,
            [
                ("CONFIG_CHECKPOINT_RESTORE", false),
                ("CONFIG_NF_TABLES", false),
                ("CONFIG_MEM_SOFT_DIRTY", true)
            ]
        );
    }

    #[test]
    fn pack_and_unpack_round_trip() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("core-1.img"), b"core").unwrap();
        std::fs::write(src.path().join("pages-1.img"), vec![7u8; 10_000]).unwrap();
        std::fs::write(src.path().join("inventory.img"), b"").unwrap();
        let packed = pack(src.path()).unwrap();
        let dst = tempfile::tempdir().unwrap();
        unpack(&packed, dst.path()).unwrap();
        for n in ["core-1.img", "pages-1.img", "inventory.img"] {
            assert_eq!(
                std::fs::read(dst.path().join(n)).unwrap(),
                std::fs::read(src.path().join(n)).unwrap(),
                "{n}"
            );
        }
    }

    #[test]
    fn unpack_refuses_hostile_archives() {
        let good = {
            let src = tempfile::tempdir().unwrap();
            std::fs::write(src.path().join("a.img"), b"abc").unwrap();
            pack(src.path()).unwrap()
        };
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        cases.push((b"NOTCRIU\n".to_vec(), "magic"));
        cases.push((good[..good.len() - 1].to_vec(), "truncated"));
        let mut extra = good.clone();
        extra.push(0);
        cases.push((extra, "trailing"));
        let mut many = MAGIC.to_vec();
        many.extend_from_slice(&u32::MAX.to_le_bytes());
        cases.push((many, "more than"));
        for name in ["../x", "a/b", ".hidden", ""] {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(&(name.len() as u16).to_le_bytes());
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&0u64.to_le_bytes());
            cases.push((b, "bad or repeated name"));
        }
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&1u32.to_le_bytes());
        huge.extend_from_slice(&1u16.to_le_bytes());
        huge.push(b'a');
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        cases.push((huge, ""));
        for (bytes, want) in cases {
            // The destination inside a private directory: what a "../x" would create there
            // is this test's alone (a shared /tmp may hold an unrelated x).
            let outer = tempfile::tempdir().unwrap();
            let dst = outer.path().join("dst");
            std::fs::create_dir(&dst).unwrap();
            let e = unpack(&bytes, &dst).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (want {want})");
            // Nothing escaped the directory.
            assert!(!outer.path().join("x").exists());
        }
    }
}
