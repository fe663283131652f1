//! `kexec_file_load(2)` and `reboot(LINUX_REBOOT_CMD_KEXEC)`.
//!
//! Only the in-kernel loader (`kexec_file_load`) carries KHO/LUO state into the next kernel;
//! the user-space `kexec_load(2)` path does not, so it is not wrapped here. A bzImage loaded
//! this way must be built with `CONFIG_RELOCATABLE=y`, else the load fails with `ENOEXEC`.
//!
//! Flag values are from `include/uapi/linux/kexec.h` (Linux 7.3). The multikernel flags are
//! from the out-of-tree multikernel patch set and **reuse bits mainline gives other meanings**
//! (see [`KexecFlags::MULTIKERNEL`]); they are only meaningful on a multikernel kernel.

use std::ffi::CString;
use std::fmt;
use std::ops::BitOr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

/// Flags of `kexec_file_load(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct KexecFlags(u64);

impl KexecFlags {
    /// No flag.
    pub const NONE: Self = Self(0);
    /// `KEXEC_FILE_UNLOAD`: unload the loaded image.
    pub const UNLOAD: Self = Self(0x1);
    /// `KEXEC_FILE_ON_CRASH`: the load/unload is for the crash (kdump) image.
    pub const ON_CRASH: Self = Self(0x2);
    /// `KEXEC_FILE_NO_INITRAMFS`: no initrd; the initrd fd is ignored.
    pub const NO_INITRAMFS: Self = Self(0x4);
    /// `KEXEC_FILE_DEBUG`: the kernel logs the loader's decisions.
    pub const DEBUG: Self = Self(0x8);
    /// `KEXEC_FILE_NO_CMA` (mainline): do not place the image in CMA memory.
    pub const NO_CMA: Self = Self(0x10);
    /// `KEXEC_FILE_FORCE_DTB` (mainline): carry the current boot's DTB over.
    pub const FORCE_DTB: Self = Self(0x20);
    /// `KEXEC_MULTIKERNEL` (out-of-tree multikernel patch set only): load the image as a new
    /// kernel instance on spare cores instead of replacing this kernel. **Same bit as mainline's
    /// [`Self::NO_CMA`]**: on a mainline kernel this flag means "no CMA", not "multikernel".
    pub const MULTIKERNEL: Self = Self(0x10);
    /// Shift of the multikernel instance id inside the flags (`id << 5`, masked by
    /// [`Self::MULTIKERNEL_ID_MASK`]). Bit 5 is mainline's [`Self::FORCE_DTB`].
    pub const MULTIKERNEL_ID_SHIFT: u32 = 5;
    /// Mask of the multikernel instance id bits (`0xFFE0`: ids 0..=2047; instances use 1..=511).
    pub const MULTIKERNEL_ID_MASK: u64 = 0xFFE0;
    /// Highest instance id the multikernel patch set hands to a spawned kernel.
    pub const MULTIKERNEL_MAX_ID: u16 = 511;

    /// The raw flag bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Flags from raw bits (no validation: the kernel validates).
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// Whether every bit of `other` is set in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// `KEXEC_MULTIKERNEL | (id << 5) & 0xFFE0` for multikernel instance `id` (1..=511).
    /// Multikernel kernels only; see [`Self::MULTIKERNEL`].
    pub fn multikernel(id: u16) -> Result<Self, KexecError> {
        if id == 0 || id > Self::MULTIKERNEL_MAX_ID {
            return Err(KexecError::InvalidMultikernelId { id });
        }
        Ok(Self(
            Self::MULTIKERNEL.0
                | ((u64::from(id) << Self::MULTIKERNEL_ID_SHIFT) & Self::MULTIKERNEL_ID_MASK),
        ))
    }
}

impl BitOr for KexecFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Display for KexecFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Errors from the kexec wrappers; each names the call, the errno and what to do.
#[derive(Debug, thiserror::Error)]
pub enum KexecError {
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte at offset {offset}; remove it")]
    CmdlineNul {
        /// Byte offset of the first NUL.
        offset: usize,
    },
    /// Multikernel instance id out of range.
    #[error("multikernel instance id {id} is out of range: spawned instances use 1..=511")]
    InvalidMultikernelId {
        /// The id given.
        id: u16,
    },
    /// `kexec_file_load` failed.
    #[error("kexec_file_load(flags {flags}) failed: {errno}: {hint}")]
    Load {
        /// The flags passed.
        flags: KexecFlags,
        /// The errno.
        errno: Errno,
        /// What it most likely means.
        hint: &'static str,
    },
    /// `reboot(LINUX_REBOOT_CMD_KEXEC)` returned.
    #[error("reboot(LINUX_REBOOT_CMD_KEXEC) failed: {errno}: {hint}")]
    Reboot {
        /// The errno.
        errno: Errno,
        /// What it most likely means.
        hint: &'static str,
    },
}

/// What an errno of `kexec_file_load(2)` most likely means.
pub fn load_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::ENOSYS => "the kernel lacks CONFIG_KEXEC_FILE=y",
        Errno::EPERM => {
            "needs CAP_SYS_BOOT (run as root), and kexec must not be disabled \
             (/proc/sys/kernel/kexec_load_disabled = 1 or lockdown)"
        }
        Errno::ENOEXEC => {
            "the file is not a loadable kernel image: not an x86 bzImage, or built without \
             CONFIG_RELOCATABLE=y (XLF_CAN_BE_LOADED_ABOVE_4G not set)"
        }
        Errno::EKEYREJECTED | Errno::EBADMSG | Errno::ENOKEY | Errno::ENODATA => {
            "the kernel enforces kexec image signatures and this image is unsigned or signed by \
             a key the kernel does not trust"
        }
        Errno::EBUSY => "another kexec load or unload is in progress",
        Errno::ENOMEM => {
            "not enough contiguous memory for the image (on KHO kernels also check kho_scratch=)"
        }
        Errno::EINVAL => "invalid flags or command line (too long?) for this kernel",
        Errno::EBADF => "the kernel or initrd fd is not open for reading",
        _ => "unexpected errno from kexec_file_load",
    }
}

/// Load `kernel` (a bzImage, opened read-only) as the kernel the next
/// `reboot(LINUX_REBOOT_CMD_KEXEC)` starts, with `cmdline` and an optional `initrd`.
///
/// `KEXEC_FILE_NO_INITRAMFS` is added when `initrd` is `None`. The length passed to the kernel
/// includes the terminating NUL, as the syscall requires.
pub fn kexec_file_load(
    kernel: BorrowedFd<'_>,
    initrd: Option<BorrowedFd<'_>>,
    cmdline: &str,
    flags: KexecFlags,
) -> Result<(), KexecError> {
    let c_cmdline = CString::new(cmdline).map_err(|e| KexecError::CmdlineNul {
        offset: e.nul_position(),
    })?;
    let flags = if initrd.is_none() {
        flags | KexecFlags::NO_INITRAMFS
    } else {
        flags
    };
    let initrd_fd = initrd.map_or(-1, |fd| fd.as_raw_fd());
    let cmdline_len = c_cmdline.as_bytes_with_nul().len();
    raw_kexec_file_load(
        kernel.as_raw_fd(),
        initrd_fd,
        cmdline_len,
        c_cmdline.as_ptr(),
        flags,
    )
}

/// Unload the loaded kexec image (`KEXEC_FILE_UNLOAD`); a no-op if none is loaded.
pub fn kexec_unload() -> Result<(), KexecError> {
    raw_kexec_file_load(-1, -1, 0, std::ptr::null(), KexecFlags::UNLOAD)
}

/// Unload with explicit flags (`KEXEC_FILE_UNLOAD` is added): a multikernel instance's
/// image is unloaded with `UNLOAD | KEXEC_MULTIKERNEL | id << 5`.
pub fn kexec_file_unload(flags: KexecFlags) -> Result<(), KexecError> {
    raw_kexec_file_load(-1, -1, 0, std::ptr::null(), KexecFlags::UNLOAD | flags)
}

fn raw_kexec_file_load(
    kernel_fd: i32,
    initrd_fd: i32,
    cmdline_len: usize,
    cmdline: *const libc::c_char,
    flags: KexecFlags,
) -> Result<(), KexecError> {
    // SAFETY: kexec_file_load takes two fds (the kernel checks them; -1 with UNLOAD or
    // NO_INITRAMFS is allowed), a length and a pointer to `cmdline_len` readable bytes (a
    // NUL-terminated CString owned by the caller for the whole call, or NULL with length 0),
    // and flags. The kernel copies the command line and keeps no user pointer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            libc::c_long::from(kernel_fd),
            libc::c_long::from(initrd_fd),
            cmdline_len as libc::c_ulong,
            cmdline,
            flags.bits() as libc::c_ulong,
        )
    };
    if rc == -1 {
        let errno = Errno::last();
        return Err(KexecError::Load {
            flags,
            errno,
            hint: load_hint(errno),
        });
    }
    Ok(())
}

/// `sync()`, then `reboot(LINUX_REBOOT_CMD_KEXEC)`: start the loaded kernel. Returns only on
/// failure. On a LUO kernel the preserved files are frozen inside this call; if one cannot be
/// frozen the call fails, this kernel keeps running, and the upgrade must abort cleanly.
pub fn reboot_kexec() -> Result<std::convert::Infallible, KexecError> {
    nix::unistd::sync();
    nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_KEXEC).map_err(|errno| {
        KexecError::Reboot {
            errno,
            hint: match errno {
                Errno::EPERM => "needs CAP_SYS_BOOT (run as root)",
                Errno::EINVAL => "no kexec image is loaded (kexec_file_load first)",
                Errno::EBUSY | Errno::EAGAIN | Errno::EIO | Errno::ENOMEM => {
                    "the kernel could not freeze a preserved LUO file or device for the \
                     handover; nothing was lost, this kernel keeps running: abort the upgrade"
                }
                _ => "the kexec reboot was refused; this kernel keeps running",
            },
        }
    })
}

/// What this host exposes of kexec/KHO/LUO, read from procfs/sysfs/devtmpfs. `None` means the
/// file does not exist (the feature is compiled out or the filesystem is not mounted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KexecProbe {
    /// `/sys/kernel/kexec_loaded`: a kexec image is loaded (exists with `CONFIG_KEXEC_CORE`).
    pub kexec_loaded: Option<bool>,
    /// `/sys/kernel/kexec_crash_loaded`: a crash (kdump) image is loaded.
    pub kexec_crash_loaded: Option<bool>,
    /// `/proc/sys/kernel/kexec_load_disabled`: 1 = kexec permanently disabled until reboot.
    pub kexec_load_disabled: Option<bool>,
    /// `/dev/liveupdate` exists (LUO built in and `liveupdate=on`).
    pub liveupdate_device: bool,
    /// `/sys/kernel/debug/kho` exists (`CONFIG_KEXEC_HANDOVER_DEBUGFS`, debugfs mounted).
    pub kho_debugfs: bool,
}

impl KexecProbe {
    /// Whether this host can do a LUO live update right now (as far as files tell).
    pub fn luo_ready(&self) -> bool {
        self.kexec_loaded.is_some()
            && self.kexec_load_disabled != Some(true)
            && self.liveupdate_device
    }
}

/// Probe the running host (paths under `/`).
pub fn probe() -> KexecProbe {
    probe_at(Path::new("/"))
}

/// Probe with every path under `root` (tests use a temporary tree).
pub fn probe_at(root: &Path) -> KexecProbe {
    let p = |rel: &str| -> PathBuf { root.join(rel) };
    let flag = |rel: &str| -> Option<bool> {
        std::fs::read_to_string(p(rel))
            .ok()
            .map(|s| s.trim().parse::<u64>().is_ok_and(|v| v != 0))
    };
    KexecProbe {
        kexec_loaded: flag("sys/kernel/kexec_loaded"),
        kexec_crash_loaded: flag("sys/kernel/kexec_crash_loaded"),
        kexec_load_disabled: flag("proc/sys/kernel/kexec_load_disabled"),
        liveupdate_device: p("dev/liveupdate").exists(),
        kho_debugfs: p("sys/kernel/debug/kho").exists(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_match_uapi() {
        assert_eq!(KexecFlags::UNLOAD.bits(), 1);
        assert_eq!(KexecFlags::ON_CRASH.bits(), 2);
        assert_eq!(KexecFlags::NO_INITRAMFS.bits(), 4);
        assert_eq!(KexecFlags::DEBUG.bits(), 8);
        assert_eq!(KexecFlags::NO_CMA.bits(), 0x10);
        assert_eq!(KexecFlags::FORCE_DTB.bits(), 0x20);
        assert_eq!(KexecFlags::MULTIKERNEL.bits(), 0x10);
    }

    #[test]
    fn multikernel_flags_encode_the_id() {
        let f = KexecFlags::multikernel(1).unwrap();
        assert_eq!(f.bits(), 0x10 | (1 << 5));
        let f = KexecFlags::multikernel(511).unwrap();
        assert_eq!(f.bits(), 0x10 | (511 << 5));
        assert_eq!(f.bits() & !0xFFF0, 0, "id stays inside 0xFFE0");
        assert!(f.contains(KexecFlags::MULTIKERNEL));
        let unload = KexecFlags::UNLOAD | KexecFlags::multikernel(3).unwrap();
        assert_eq!(unload.bits(), 0x1 | 0x10 | (3 << 5));
    }

    #[test]
    fn multikernel_id_out_of_range_is_refused() {
        for id in [0, 512, u16::MAX] {
            let err = KexecFlags::multikernel(id).unwrap_err();
            assert!(err.to_string().contains("1..=511"), "{err}");
        }
    }

    #[test]
    fn cmdline_with_nul_is_refused_before_the_syscall() {
        let f = tempfile::tempfile().unwrap();
        use std::os::fd::AsFd;
        let err =
            kexec_file_load(f.as_fd(), None, "console=ttyS0\0x", KexecFlags::NONE).unwrap_err();
        assert!(
            matches!(err, KexecError::CmdlineNul { offset: 13 }),
            "{err:?}"
        );
    }

    #[test]
    fn load_of_a_non_kernel_fails_with_a_named_errno() {
        // Unprivileged: EPERM; root on a kexec kernel: ENOEXEC (not a bzImage); kernel without
        // KEXEC_FILE: ENOSYS. Never success for an empty file.
        let f = tempfile::tempfile().unwrap();
        use std::os::fd::AsFd;
        let err = kexec_file_load(f.as_fd(), None, "", KexecFlags::NONE).unwrap_err();
        let KexecError::Load { errno, flags, hint } = err else {
            panic!("unexpected {err:?}");
        };
        assert!(
            flags.contains(KexecFlags::NO_INITRAMFS),
            "NO_INITRAMFS added without initrd"
        );
        assert!(
            matches!(
                errno,
                Errno::EPERM | Errno::ENOEXEC | Errno::ENOSYS | Errno::EINVAL
            ),
            "{errno}"
        );
        assert_ne!(hint, load_hint(Errno::EHWPOISON));
    }

    #[test]
    fn hints_name_relocatable_and_root() {
        assert!(load_hint(Errno::ENOEXEC).contains("CONFIG_RELOCATABLE"));
        assert!(load_hint(Errno::EPERM).contains("root"));
        assert!(load_hint(Errno::ENOSYS).contains("CONFIG_KEXEC_FILE"));
    }

    #[test]
    fn probe_reads_a_fake_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(
            probe_at(root),
            KexecProbe {
                kexec_loaded: None,
                kexec_crash_loaded: None,
                kexec_load_disabled: None,
                liveupdate_device: false,
                kho_debugfs: false,
            }
        );
        std::fs::create_dir_all(root.join("sys/kernel/debug/kho")).unwrap();
        std::fs::create_dir_all(root.join("proc/sys/kernel")).unwrap();
        std::fs::create_dir_all(root.join("dev")).unwrap();
        std::fs::write(root.join("sys/kernel/kexec_loaded"), "1\n").unwrap();
        std::fs::write(root.join("sys/kernel/kexec_crash_loaded"), "0\n").unwrap();
        std::fs::write(root.join("proc/sys/kernel/kexec_load_disabled"), "0\n").unwrap();
        std::fs::write(root.join("dev/liveupdate"), "").unwrap();
        let p = probe_at(root);
        assert_eq!(p.kexec_loaded, Some(true));
        assert_eq!(p.kexec_crash_loaded, Some(false));
        assert_eq!(p.kexec_load_disabled, Some(false));
        assert!(p.liveupdate_device && p.kho_debugfs && p.luo_ready());
        std::fs::write(root.join("proc/sys/kernel/kexec_load_disabled"), "1\n").unwrap();
        assert!(!probe_at(root).luo_ready());
    }
}
