//! The multikernel patch set's user-space interface: every path, flag and magic number of
//! it in this one module (the interface still moves between releases: a change is one
//! edit here), behind the [`MultikernelSys`] trait so the platform above it runs unchanged
//! against a real kernel ([`RealMultikernel`]) or the simulated one
//! (`crate::platform::multikernel::sim`, labelled SIMULATED everywhere).
//!
//! The calls (the out-of-tree tree `multikernel/linux`, its `Documentation/multikernel/`
//! and kerf 0.4.0; see `docs/kernel.md` for what was verified against what):
//!
//! | what | call |
//! |---|---|
//! | pool baseline | write a DTB to `<root>/device_tree` |
//! | create / resize / remove an instance | write a DTBO to `<root>/overlays/new`; read `<root>/overlays/tx_<N>/status` (`applied`, `failed`, `removed`, `pending`) |
//! | instance state | `<root>/instances/<name>/{id,status}`: `empty`, `ready`, `loaded`, `active`, `failed` (`status` is not health: the kernel never sets `failed`) |
//! | load a kernel | `kexec_file_load(kernel, initrd, cmdline, KEXEC_MULTIKERNEL \| id << 5 [\| KEXEC_FILE_NO_INITRAMFS])`, an ELF vmlinux only |
//! | unload | `kexec_file_load(-1, -1, 0, NULL, KEXEC_FILE_UNLOAD \| KEXEC_MULTIKERNEL \| id << 5)` |
//! | start / halt / force halt | `reboot(LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, 0x4D4B4C49 / 0x4D4B4C48 / 0x4D4B4C46, &id)` |
//! | channel | AF_VSOCK, `SO_VM_SOCKETS_TRANSPORT = VSOCK_TRANSPORT_MULTIKERNEL`, CID = instance id (host 0): `kho_proto::channel::vsock` |

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::kexec::{KexecError, KexecFlags};

/// Where the multikernel filesystem is mounted (`mount -t multikernel none <this>`).
pub const DEFAULT_ROOT: &str = "/sys/fs/multikernel";
/// The filesystem type in `/proc/mounts`.
pub const FS_TYPE: &str = "multikernel";
/// The pool baseline (write a DTB; reading gives the live pool).
pub const DEVICE_TREE: &str = "device_tree";
/// The overlay directory.
pub const OVERLAYS: &str = "overlays";
/// Write a DTBO here to apply it as one transaction.
pub const OVERLAY_NEW: &str = "overlays/new";
/// Per-instance directories (`<name>/id`, `<name>/status`).
pub const INSTANCES: &str = "instances";
/// Prefix of a transaction directory under [`OVERLAYS`] (`tx_<N>`).
pub const TX_PREFIX: &str = "tx_";

/// Memory moves between instances in whole memory blocks (x86-64: 128 MiB).
pub const MEMORY_BLOCK_BYTES: u64 = 128 << 20;
/// Highest id of a spawned instance (0 is the host kernel).
pub const MAX_INSTANCE_ID: u16 = KexecFlags::MULTIKERNEL_MAX_ID;
/// The kernel option of the patch set (its kexec flag, filesystem and reboot commands).
pub const KCONFIG_OPTION: &str = "CONFIG_MULTIKERNEL";
/// The vsock CID of the host kernel.
pub const HOST_CID: u32 = 0;

/// `LINUX_REBOOT_MAGIC1`.
const REBOOT_MAGIC1: u32 = 0xfee1_dead;
/// `LINUX_REBOOT_MAGIC2`.
const REBOOT_MAGIC2: u32 = 672_274_793;

/// The multikernel `reboot(2)` commands; the argument is a pointer to the instance id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RebootCmd {
    /// `0x4D4B4C49` ("MKLI"): start a `loaded` instance; it becomes `active`.
    Start,
    /// `0x4D4B4C48` ("MKLH"): halt an `active` instance gracefully; it returns to `loaded`.
    Halt,
    /// `0x4D4B4C46` ("MKLF"): halt it without waiting for it.
    ForceHalt,
}

impl RebootCmd {
    /// The command value passed to `reboot(2)`.
    pub const fn value(self) -> u32 {
        match self {
            RebootCmd::Start => 0x4D4B_4C49,
            RebootCmd::Halt => 0x4D4B_4C48,
            RebootCmd::ForceHalt => 0x4D4B_4C46,
        }
    }

    /// For messages.
    pub const fn name(self) -> &'static str {
        match self {
            RebootCmd::Start => "start",
            RebootCmd::Halt => "halt",
            RebootCmd::ForceHalt => "force halt",
        }
    }
}

/// The state of an instance, as `instances/<name>/status` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceStatus {
    Empty,
    Ready,
    /// Spelled `loading` by older trees; both parse to this.
    Loaded,
    Active,
    Failed,
}

impl InstanceStatus {
    /// Parses a `status` file (surrounding whitespace ignored); `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim() {
            "empty" => Self::Empty,
            "ready" => Self::Ready,
            "loaded" | "loading" => Self::Loaded,
            "active" => Self::Active,
            "failed" => Self::Failed,
            _ => return None,
        })
    }

    /// The spelling in the `status` file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Ready => "ready",
            Self::Loaded => "loaded",
            Self::Active => "active",
            Self::Failed => "failed",
        }
    }
}

/// The calls the multikernel platform makes, and nothing else. Paths are relative to the
/// multikernel filesystem root.
pub trait MultikernelSys: std::fmt::Debug + Send {
    /// The filesystem root (for messages).
    fn root(&self) -> &Path;

    /// Writes `bytes` to `rel` in one `write(2)` (sysfs takes a blob in one call).
    fn write_blob(&mut self, rel: &str, bytes: &[u8]) -> io::Result<()>;

    /// Reads the whole file `rel`.
    fn read(&mut self, rel: &str) -> io::Result<Vec<u8>>;

    /// Names of the entries of directory `rel`, sorted.
    fn list(&mut self, rel: &str) -> io::Result<Vec<String>>;

    /// `rmdir` of `rel` (rolls an overlay transaction back).
    fn rmdir(&mut self, rel: &str) -> io::Result<()>;

    /// `/proc/iomem`: the pool's chunks (`Multikernel Memory Pool`) and each instance's
    /// regions (`mk-instance-<id>-<name>-region-<n>`), which memory moves name.
    fn iomem(&mut self) -> io::Result<String>;

    /// `kexec_file_load` of `kernel` (an ELF vmlinux) into instance `id`.
    fn kexec_load(
        &mut self,
        id: u16,
        kernel: BorrowedFd<'_>,
        initrd: Option<BorrowedFd<'_>>,
        cmdline: &str,
    ) -> Result<(), KexecError>;

    /// Unloads instance `id`'s image.
    fn kexec_unload(&mut self, id: u16) -> Result<(), KexecError>;

    /// The multikernel `reboot(2)` command `cmd` on instance `id`.
    fn reboot(&mut self, cmd: RebootCmd, id: u16) -> Result<(), Errno>;
}

/// The real kernel interface, rooted at `root` (normally [`DEFAULT_ROOT`]).
#[derive(Debug, Clone)]
pub struct RealMultikernel {
    root: PathBuf,
}

impl RealMultikernel {
    /// The interface under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

impl MultikernelSys for RealMultikernel {
    fn root(&self) -> &Path {
        &self.root
    }

    fn write_blob(&mut self, rel: &str, bytes: &[u8]) -> io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).open(self.path(rel))?;
        let n = f.write(bytes)?;
        if n != bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "the kernel took {n} of {} bytes in one write; a blob must be written whole",
                    bytes.len()
                ),
            ));
        }
        Ok(())
    }

    fn read(&mut self, rel: &str) -> io::Result<Vec<u8>> {
        fs::read(self.path(rel))
    }

    fn list(&mut self, rel: &str) -> io::Result<Vec<String>> {
        let mut names = fs::read_dir(self.path(rel))?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect::<Vec<_>>();
        names.sort();
        Ok(names)
    }

    fn rmdir(&mut self, rel: &str) -> io::Result<()> {
        fs::remove_dir(self.path(rel))
    }

    fn iomem(&mut self) -> io::Result<String> {
        fs::read_to_string("/proc/iomem")
    }

    fn kexec_load(
        &mut self,
        id: u16,
        kernel: BorrowedFd<'_>,
        initrd: Option<BorrowedFd<'_>>,
        cmdline: &str,
    ) -> Result<(), KexecError> {
        super::kexec::kexec_file_load(kernel, initrd, cmdline, KexecFlags::multikernel(id)?)
    }

    fn kexec_unload(&mut self, id: u16) -> Result<(), KexecError> {
        super::kexec::kexec_file_unload(KexecFlags::multikernel(id)?)
    }

    fn reboot(&mut self, cmd: RebootCmd, id: u16) -> Result<(), Errno> {
        reboot_instance(cmd, id)
    }
}

/// `reboot(MAGIC1, MAGIC2, cmd, &id)`: the multikernel instance commands.
pub fn reboot_instance(cmd: RebootCmd, id: u16) -> Result<(), Errno> {
    let id = libc::c_int::from(id);
    // SAFETY: reboot(2) takes two magic numbers, a command and, for the multikernel
    // commands, a pointer to an int holding the instance id; `id` lives on this stack frame
    // for the whole call and the kernel only reads it (copy_from_user). A kernel without
    // the patch set rejects the unknown command with EINVAL and reads nothing.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_reboot,
            libc::c_long::from(REBOOT_MAGIC1 as i32),
            libc::c_long::from(REBOOT_MAGIC2 as i32),
            libc::c_long::from(cmd.value()),
            std::ptr::from_ref(&id),
        )
    };
    if rc == -1 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Name of a pool chunk in `/proc/iomem`.
pub const IOMEM_POOL_NAME: &str = "Multikernel Memory Pool";

/// Parses `/proc/iomem` for instance `id` named `name`: its regions `(base, size)`, oldest
/// first (the kernel numbers them `mk-instance-<id>-<name>-region-<n>` in the order they
/// were added). Lines that do not parse are skipped; at most 4096 regions are returned.
pub fn instance_regions(iomem: &str, id: u16, name: &str) -> Vec<(u64, u64)> {
    let prefix = format!("mk-instance-{id}-{name}-region-");
    let mut found: Vec<(u64, u64, u64)> = iomem
        .lines()
        .filter_map(|l| {
            let (range, label) = l.trim().split_once(':')?;
            let n: u64 = label.trim().strip_prefix(&prefix)?.parse().ok()?;
            let (a, b) = range.trim().split_once('-')?;
            let base = u64::from_str_radix(a.trim(), 16).ok()?;
            let end = u64::from_str_radix(b.trim(), 16).ok()?;
            let size = end.checked_sub(base)?.checked_add(1)?;
            Some((n, base, size))
        })
        .take(4096)
        .collect();
    found.sort_unstable();
    found.into_iter().map(|(_, b, s)| (b, s)).collect()
}

/// What a reboot errno most likely means.
pub fn reboot_hint(cmd: RebootCmd, errno: Errno) -> &'static str {
    match (cmd, errno) {
        (_, Errno::EPERM) => "needs CAP_SYS_BOOT (run as root)",
        (_, Errno::EINVAL) => {
            "the kernel does not know the multikernel reboot commands (no multikernel patch \
             set) or the instance id is invalid"
        }
        (RebootCmd::Start, Errno::ENOENT) => "no kernel is loaded into that instance",
        (_, Errno::EBUSY) => "the instance is busy (another start or halt is in progress)",
        _ => "unexpected errno from reboot(2)",
    }
}

/// What a host without the patch set lacks, one finding per missing piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// Short name (`multikernel-fs`, `kexec-flag`, `vsock-transport`, ...).
    pub what: &'static str,
    /// What was seen.
    pub detail: String,
    /// What to do.
    pub fix: &'static str,
}

/// Checks a host for the multikernel interface without changing anything: the filesystem
/// (mounted, with its control files), the kexec flag (the kernel's config), the vsock
/// transport (a socket with the multikernel transport option). `proc_root` is normally
/// `/` (tests use a scratch tree); `vsock_probe` opens a socket and sets the option.
pub fn probe_host(
    root: &Path,
    proc_root: &Path,
    vsock_probe: impl FnOnce() -> Result<(), String>,
) -> Vec<Missing> {
    let mut out = Vec::new();
    let mounts = fs::read_to_string(proc_root.join("proc/mounts")).unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, ty) = (f.next(), f.next(), f.next());
        dir == Some(&*root.to_string_lossy()) && ty == Some(FS_TYPE)
    });
    if root.is_dir() {
        if !mounted {
            out.push(Missing {
                what: "multikernel-fs",
                detail: format!(
                    "no filesystem of type {FS_TYPE} is mounted on {} (see /proc/mounts)",
                    root.display()
                ),
                fix: "mount -t multikernel none /sys/fs/multikernel",
            });
        }
        for f in [DEVICE_TREE, OVERLAY_NEW, INSTANCES] {
            if !root.join(f).exists() {
                out.push(Missing {
                    what: "multikernel-fs",
                    detail: format!("{} is missing", root.join(f).display()),
                    fix: "use a multikernel kernel whose interface has overlays (2026 or later)",
                });
            }
        }
    } else {
        out.push(Missing {
            what: "multikernel-fs",
            detail: format!(
                "{} does not exist: this kernel lacks the multikernel patch set",
                root.display()
            ),
            fix: "boot a kernel built with the multikernel patch set (multikernel/linux)",
        });
    }
    match kexec_flag_in_config(proc_root) {
        Some(true) => {}
        Some(false) => out.push(Missing {
            what: "kexec-flag",
            detail: "the running kernel's config has no CONFIG_MULTIKERNEL=y: \
                     kexec_file_load does not know KEXEC_MULTIKERNEL (0x10 means \
                     KEXEC_FILE_NO_CMA on mainline)"
                .into(),
            fix: "boot a kernel built with CONFIG_MULTIKERNEL=y",
        }),
        None => out.push(Missing {
            what: "kexec-flag",
            detail: "cannot read the running kernel's config (/boot/config-$(uname -r) or \
                     /proc/config.gz) to confirm CONFIG_MULTIKERNEL=y"
                .into(),
            fix: "install the kernel's config or build it with CONFIG_IKCONFIG_PROC=y",
        }),
    }
    if let Err(e) = vsock_probe() {
        out.push(Missing {
            what: "vsock-transport",
            detail: e,
            fix: "boot a multikernel kernel with its vsock transport (CONFIG_VSOCKETS and the \
                  multikernel transport) built in",
        });
    }
    out
}

/// Whether the running kernel's config sets `CONFIG_MULTIKERNEL=y` (`None`: no config).
fn kexec_flag_in_config(proc_root: &Path) -> Option<bool> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let (config, _) = super::kconfig::load_config_from(
        &proc_root.join(format!("boot/config-{release}")),
        &proc_root.join("proc/config.gz"),
    )
    .ok()?;
    Some(config.is_builtin(KCONFIG_OPTION))
}

/// Opens an AF_VSOCK socket and asks for the multikernel transport; the error as text.
pub fn vsock_transport_probe() -> Result<(), String> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket(AF_VSOCK) failed: {e}: this kernel has no vsock"))?;
    kho_proto::channel::set_vsock_multikernel_transport(fd.as_fd()).map_err(|e| {
        format!(
            "setsockopt(SO_VM_SOCKETS_TRANSPORT = 9, VSOCK_TRANSPORT_MULTIKERNEL = 1) failed: \
             {e}: no multikernel vsock transport"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iomem_regions_are_read_oldest_first() {
        let iomem = "100000000-17fffffff : Multikernel Memory Pool\n  \
                     108000000-10fffffff : mk-instance-2-web-region-1\n  \
                     100000000-107ffffff : mk-instance-2-web-region-0\n  \
                     110000000-117ffffff : mk-instance-3-web-region-0\n  \
                     zzz-1 : mk-instance-2-web-region-2\n";
        assert_eq!(
            instance_regions(iomem, 2, "web"),
            [(0x1_0000_0000, 128 << 20), (0x1_0800_0000, 128 << 20)]
        );
        assert_eq!(instance_regions(iomem, 2, "we"), []);
    }

    #[test]
    fn reboot_commands_match_the_patch_set() {
        assert_eq!(RebootCmd::Start.value(), 0x4D4B_4C49);
        assert_eq!(RebootCmd::Halt.value(), 0x4D4B_4C48);
        assert_eq!(RebootCmd::ForceHalt.value(), 0x4D4B_4C46);
        assert_eq!(REBOOT_MAGIC1, 0xfee1_dead);
        assert_eq!(REBOOT_MAGIC2, 0x2812_1969);
    }

    #[test]
    fn statuses_parse_both_spellings_and_refuse_the_rest() {
        assert_eq!(
            InstanceStatus::parse("ready\n"),
            Some(InstanceStatus::Ready)
        );
        assert_eq!(
            InstanceStatus::parse("loading"),
            Some(InstanceStatus::Loaded)
        );
        assert_eq!(
            InstanceStatus::parse("loaded"),
            Some(InstanceStatus::Loaded)
        );
        assert_eq!(
            InstanceStatus::parse("active"),
            Some(InstanceStatus::Active)
        );
        assert_eq!(InstanceStatus::parse("bogus"), None);
        for s in [
            InstanceStatus::Empty,
            InstanceStatus::Ready,
            InstanceStatus::Loaded,
            InstanceStatus::Active,
            InstanceStatus::Failed,
        ] {
            assert_eq!(InstanceStatus::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn a_stock_kernel_refuses_the_multikernel_reboot_commands_without_harm() {
        // Unprivileged: EPERM; root on a stock kernel: EINVAL (unknown command). Either
        // way the call returns (a kernel that took it would start instance 511).
        assert!(
            !std::path::Path::new(DEFAULT_ROOT).exists(),
            "this test must not run on a multikernel host (it would start instance 511)"
        );
        let e = reboot_instance(RebootCmd::Start, 511).unwrap_err();
        assert!(matches!(e, Errno::EINVAL | Errno::EPERM), "{e}");
        assert!(!reboot_hint(RebootCmd::Start, e).is_empty());
    }

    #[test]
    fn probe_names_every_missing_piece_on_a_host_without_the_patch_set() {
        let t = tempfile::tempdir().unwrap();
        let missing = probe_host(&t.path().join("none"), t.path(), || {
            Err("no transport".into())
        });
        let whats: Vec<_> = missing.iter().map(|m| m.what).collect();
        assert_eq!(whats, ["multikernel-fs", "kexec-flag", "vsock-transport"]);
        // A mounted tree with every file and a config: nothing missing.
        let root = t.path().join("mk");
        fs::create_dir_all(root.join("overlays")).unwrap();
        fs::create_dir_all(root.join("instances")).unwrap();
        fs::write(root.join("device_tree"), b"").unwrap();
        fs::write(root.join("overlays/new"), b"").unwrap();
        fs::create_dir_all(t.path().join("proc")).unwrap();
        fs::write(
            t.path().join("proc/mounts"),
            format!("none {} multikernel rw 0 0\n", root.display()),
        )
        .unwrap();
        let release = nix::sys::utsname::uname()
            .unwrap()
            .release()
            .to_string_lossy()
            .into_owned();
        fs::create_dir_all(t.path().join("boot")).unwrap();
        fs::write(
            t.path().join(format!("boot/config-{release}")),
            "CONFIG_MULTIKERNEL=y\n",
        )
        .unwrap();
        assert_eq!(probe_host(&root, t.path(), || Ok(())), []);
        // Not mounted, the overlay file missing, the option off.
        fs::write(t.path().join("proc/mounts"), "").unwrap();
        fs::remove_file(root.join("overlays/new")).unwrap();
        fs::write(
            t.path().join(format!("boot/config-{release}")),
            "# CONFIG_MULTIKERNEL is not set\n",
        )
        .unwrap();
        let m = probe_host(&root, t.path(), || Ok(()));
        assert_eq!(m.len(), 3, "{m:?}");
        assert!(m[0].detail.contains("no filesystem of type multikernel"));
        assert!(m[1].detail.contains("overlays/new is missing"));
        assert!(m[2].detail.contains("CONFIG_MULTIKERNEL=y"));
    }
}
