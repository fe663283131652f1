//! `/dev/liveupdate` (LUO, the Live Update Orchestrator, mainline since Linux 6.19) ioctls.
//!
//! LUO is the user-space door to KHO (Kexec HandOver): named *sessions* hold file descriptors
//! (today: memfds) that survive one `kexec_file_load` + `reboot(LINUX_REBOOT_CMD_KEXEC)`.
//! The uAPI is `include/uapi/linux/liveupdate.h`: ioctl type `0xBA`, every request is
//! `_IO(0xBA, nr)` (no size/direction bits), and every argument struct starts with
//! `u32 size = sizeof(struct)`.
//!
//! Lifecycle the agent follows:
//! 1. [`LiveUpdate::open`] — the device is exclusive: a second opener gets `EBUSY`
//!    ([`LuoError::DeviceBusy`]). One long-lived agent owns it.
//! 2. [`LiveUpdate::create_session`], then [`Session::preserve_fd`] for each memfd. Every
//!    [`Session`] must stay alive (its fd open) until `reboot(LINUX_REBOOT_CMD_KEXEC)`:
//!    closing it drops the preservation.
//! 3. In the new kernel: [`LiveUpdate::retrieve_session`] by name, [`Session::retrieve_fd`] by
//!    token, then [`Session::finish`].
//!
//! Requires `CONFIG_LIVEUPDATE=y` and the boot flag `liveupdate=on` (LUO is off by default and
//! `/dev/liveupdate` does not exist without it).

use std::fmt;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

/// Path of the LUO character device.
pub const DEV_PATH: &str = "/dev/liveupdate";
/// `LIVEUPDATE_IOCTL_TYPE`.
pub const IOCTL_TYPE: u8 = 0xBA;
/// `LIVEUPDATE_SESSION_NAME_LENGTH`: the name buffer, NUL terminator included.
pub const SESSION_NAME_LENGTH: usize = 64;
/// Longest session name in bytes (the buffer minus its NUL terminator).
pub const MAX_SESSION_NAME_BYTES: usize = SESSION_NAME_LENGTH - 1;

/// The six LUO ioctls. The first two act on `/dev/liveupdate`, the rest on a session fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LuoIoctl {
    /// `LIVEUPDATE_IOCTL_CREATE_SESSION` (nr 0x00).
    CreateSession,
    /// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION` (nr 0x01).
    RetrieveSession,
    /// `LIVEUPDATE_SESSION_PRESERVE_FD` (nr 0x40).
    PreserveFd,
    /// `LIVEUPDATE_SESSION_RETRIEVE_FD` (nr 0x41).
    RetrieveFd,
    /// `LIVEUPDATE_SESSION_FINISH` (nr 0x42).
    Finish,
    /// `LIVEUPDATE_SESSION_GET_NAME` (nr 0x43).
    GetName,
}

impl LuoIoctl {
    /// The command number (`LIVEUPDATE_CMD_*`).
    pub const fn nr(self) -> u8 {
        match self {
            Self::CreateSession => 0x00,
            Self::RetrieveSession => 0x01,
            Self::PreserveFd => 0x40,
            Self::RetrieveFd => 0x41,
            Self::Finish => 0x42,
            Self::GetName => 0x43,
        }
    }

    /// The ioctl request number: `_IO(0xBA, nr)`.
    pub const fn request(self) -> nix::sys::ioctl::ioctl_num_type {
        nix::request_code_none!(IOCTL_TYPE, self.nr())
    }

    /// The kernel's name for the ioctl, as used in error messages.
    pub const fn name(self) -> &'static str {
        match self {
            Self::CreateSession => "LIVEUPDATE_IOCTL_CREATE_SESSION",
            Self::RetrieveSession => "LIVEUPDATE_IOCTL_RETRIEVE_SESSION",
            Self::PreserveFd => "LIVEUPDATE_SESSION_PRESERVE_FD",
            Self::RetrieveFd => "LIVEUPDATE_SESSION_RETRIEVE_FD",
            Self::Finish => "LIVEUPDATE_SESSION_FINISH",
            Self::GetName => "LIVEUPDATE_SESSION_GET_NAME",
        }
    }
}

impl fmt::Display for LuoIoctl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors from the LUO wrappers. Each names the device or ioctl, the errno, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LuoError {
    /// The device node does not exist.
    #[error(
        "{path} does not exist: the running kernel lacks LUO (CONFIG_LIVEUPDATE=y) or was booted \
         without `liveupdate=on` on its command line; run `mk-upgrade check` to see which"
    )]
    DeviceMissing {
        /// The path that was opened.
        path: PathBuf,
    },
    /// Another process holds the exclusive device.
    #[error(
        "{path} is busy (EBUSY): another process, usually another running mk-agentd, holds it \
         open and LUO allows only one owner; stop that agent or talk to it instead"
    )]
    DeviceBusy {
        /// The path that was opened.
        path: PathBuf,
    },
    /// Any other failure to open the device.
    #[error("cannot open {path}: {source} (the agent must run as root)")]
    Open {
        /// The path that was opened.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A session name the kernel would reject or truncate.
    #[error("invalid LUO session name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// An ioctl failed.
    #[error("{ioctl} on {target} failed: {errno}: {hint}")]
    Ioctl {
        /// Which ioctl.
        ioctl: LuoIoctl,
        /// What it was issued on, e.g. `/dev/liveupdate` or `session "mk-smoke"`.
        target: String,
        /// The errno the kernel returned.
        errno: Errno,
        /// What the errno means for this ioctl and what to do.
        hint: &'static str,
    },
}

impl LuoError {
    /// The errno of an [`LuoError::Ioctl`], if that is what this is.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Ioctl { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// What an errno means for a given LUO ioctl (from `include/uapi/linux/liveupdate.h` and
/// `kernel/liveupdate/`).
pub fn hint(ioctl: LuoIoctl, errno: Errno) -> &'static str {
    use LuoIoctl as I;
    match (ioctl, errno) {
        (_, Errno::ENOTTY) => {
            "the kernel does not implement this ioctl on this fd: it lacks LUO \
             (CONFIG_LIVEUPDATE=y, booted with `liveupdate=on`) or the fd is not a LUO device/session"
        }
        (I::RetrieveSession, Errno::ENOENT) => {
            "no preserved session has this name: none was created before the kexec, the previous \
             kernel dropped it (its fd was closed), or this boot was not a live update"
        }
        (I::RetrieveSession, Errno::EINVAL) => "the session was already retrieved in this boot",
        (I::CreateSession, Errno::EEXIST) => "a session with this name already exists",
        (I::CreateSession | I::RetrieveSession, Errno::ENOSPC) => {
            "the kernel's session table is full (744 sessions)"
        }
        (I::PreserveFd, Errno::ENOENT) => {
            "no LUO handler can preserve this file type (only non-hugetlb memfds are supported)"
        }
        (I::PreserveFd, Errno::EEXIST) => "this token is already used in the session",
        (I::PreserveFd, Errno::EBUSY) => "the file is already preserved by another session",
        (I::PreserveFd, Errno::EBADF) => "the fd to preserve is not open",
        (I::PreserveFd, Errno::ENOSPC) => "the session is full (128 files per session)",
        (I::RetrieveFd, Errno::ENOENT) => {
            "no preserved file has this token in the session (or it was already retrieved)"
        }
        (I::Finish, Errno::EBUSY) => {
            "a preserved file is not ready to finish: retrieve every token before FINISH"
        }
        (_, Errno::EBUSY) => "busy: a live update is in progress or the object is in use",
        (_, Errno::E2BIG) => {
            "the kernel rejected non-zero bytes it does not understand in the argument struct"
        }
        (_, Errno::EOPNOTSUPP) => "the kernel does not support a value in the argument struct",
        (_, Errno::EINVAL) => {
            "the kernel rejected the arguments or the call is not valid in the current LUO state"
        }
        (_, Errno::EIO) => "the kernel failed to deserialize the state handed over by KHO",
        (_, Errno::ENOMEM) => "the kernel is out of memory",
        _ => "unexpected errno for this ioctl",
    }
}

/// `struct liveupdate_ioctl_create_session` and `struct liveupdate_ioctl_retrieve_session`
/// (same layout).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SessionArg {
    /// Input: `size_of::<Self>()`.
    pub size: u32,
    /// Output: the session fd.
    pub fd: i32,
    /// Input: NUL-terminated session name.
    pub name: [u8; SESSION_NAME_LENGTH],
}

/// `struct liveupdate_session_preserve_fd` and `struct liveupdate_session_retrieve_fd`
/// (same layout: `u32 size; s32 fd; __aligned_u64 token`).
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy)]
pub struct FdArg {
    /// Input: `size_of::<Self>()`.
    pub size: u32,
    /// Input (preserve) or output (retrieve): the file descriptor.
    pub fd: i32,
    /// Input: the caller's token for the file.
    pub token: u64,
}

/// `struct liveupdate_session_finish`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FinishArg {
    /// Input: `size_of::<Self>()`.
    pub size: u32,
    /// Must be zero.
    pub reserved: u32,
}

/// `struct liveupdate_session_get_name`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GetNameArg {
    /// Input: `size_of::<Self>()`.
    pub size: u32,
    /// Must be zero.
    pub reserved: u32,
    /// Output: NUL-terminated session name.
    pub name: [u8; SESSION_NAME_LENGTH],
}

// The kernel checks `size` and these layouts; a mismatch would be E2BIG/EINVAL at run time.
const _: () = assert!(size_of::<SessionArg>() == 72);
const _: () = assert!(size_of::<FdArg>() == 16);
const _: () = assert!(align_of::<FdArg>() == 8);
const _: () = assert!(size_of::<FinishArg>() == 8);
const _: () = assert!(size_of::<GetNameArg>() == 72);

const fn struct_size<T>() -> u32 {
    size_of::<T>() as u32
}

/// Check a session name and encode it as the kernel's NUL-terminated 64-byte buffer.
///
/// Rejects empty names, names longer than [`MAX_SESSION_NAME_BYTES`] bytes (the kernel would
/// not see the rest) and names containing NUL (the kernel would stop reading there).
pub fn encode_session_name(name: &str) -> Result<[u8; SESSION_NAME_LENGTH], LuoError> {
    let invalid = |reason| LuoError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("the name is empty"));
    }
    if name.len() > MAX_SESSION_NAME_BYTES {
        return Err(invalid(
            "longer than 63 bytes (the kernel's buffer is 64 bytes with the NUL)",
        ));
    }
    if name.as_bytes().contains(&0) {
        return Err(invalid("contains a NUL byte"));
    }
    let mut buf = [0u8; SESSION_NAME_LENGTH];
    buf[..name.len()].copy_from_slice(name.as_bytes());
    Ok(buf)
}

/// Decode a NUL-terminated name buffer returned by the kernel (lossy on invalid UTF-8).
pub fn decode_session_name(buf: &[u8; SESSION_NAME_LENGTH]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Issue one LUO ioctl whose argument is `*arg`.
fn luo_ioctl<T>(fd: BorrowedFd<'_>, op: LuoIoctl, arg: &mut T) -> Result<(), Errno> {
    // SAFETY: `fd` is a live descriptor for the duration of the borrow; `arg` is an exclusive
    // reference to a `#[repr(C)]` struct whose layout (asserted above) is the one the kernel
    // expects for `op`, with `size` set by the caller, so the kernel reads and writes only
    // within it. The kernel keeps no pointer to it after returning.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), op.request(), std::ptr::from_mut(arg)) };
    Errno::result(rc).map(drop)
}

/// Take ownership of an fd the kernel just installed in our table for us.
fn owned_from_kernel(fd: i32) -> OwnedFd {
    assert!(fd >= 0, "kernel reported success with a negative fd {fd}");
    // SAFETY: on success the ioctl installed `fd` in this process's fd table and handed it to
    // us; nothing else in the process knows it, so taking sole ownership is sound.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The open `/dev/liveupdate` device. Exclusive: keep one per host, in the agent.
#[derive(Debug)]
pub struct LiveUpdate {
    fd: OwnedFd,
    path: PathBuf,
}

impl LiveUpdate {
    /// Open [`DEV_PATH`] read-write (close-on-exec).
    pub fn open() -> Result<Self, LuoError> {
        Self::open_path(Path::new(DEV_PATH))
    }

    /// Open a LUO device at `path` (tests, or a device node in another location).
    pub fn open_path(path: &Path) -> Result<Self, LuoError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| match source.raw_os_error().map(Errno::from_raw) {
                Some(Errno::ENOENT) => LuoError::DeviceMissing {
                    path: path.to_owned(),
                },
                Some(Errno::EBUSY) => LuoError::DeviceBusy {
                    path: path.to_owned(),
                },
                _ => LuoError::Open {
                    path: path.to_owned(),
                    source,
                },
            })?;
        Ok(Self {
            fd: file.into(),
            path: path.to_owned(),
        })
    }

    fn session_ioctl(&self, op: LuoIoctl, name: &str) -> Result<Session, LuoError> {
        let mut arg = SessionArg {
            size: struct_size::<SessionArg>(),
            fd: -1,
            name: encode_session_name(name)?,
        };
        luo_ioctl(self.fd.as_fd(), op, &mut arg).map_err(|errno| LuoError::Ioctl {
            ioctl: op,
            target: format!("{} (session {name:?})", self.path.display()),
            errno,
            hint: hint(op, errno),
        })?;
        Ok(Session {
            fd: owned_from_kernel(arg.fd),
            name: name.to_owned(),
        })
    }

    /// `LIVEUPDATE_IOCTL_CREATE_SESSION`: a new, empty session to preserve files in.
    pub fn create_session(&self, name: &str) -> Result<Session, LuoError> {
        self.session_ioctl(LuoIoctl::CreateSession, name)
    }

    /// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION`: after a live update, the session the previous
    /// kernel preserved under `name` (`ENOENT` if there is none).
    pub fn retrieve_session(&self, name: &str) -> Result<Session, LuoError> {
        self.session_ioctl(LuoIoctl::RetrieveSession, name)
    }
}

impl AsFd for LiveUpdate {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A LUO session. Its files stay preserved only while this fd is open up to the kexec.
#[derive(Debug)]
pub struct Session {
    fd: OwnedFd,
    name: String,
}

impl Session {
    /// The name the session was created or retrieved with.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn err(&self, op: LuoIoctl, errno: Errno) -> LuoError {
        LuoError::Ioctl {
            ioctl: op,
            target: format!("session {:?}", self.name),
            errno,
            hint: hint(op, errno),
        }
    }

    /// `LIVEUPDATE_SESSION_PRESERVE_FD`: preserve `fd` across the next kexec under `token`
    /// (unique within the session). The kernel takes its own reference to the file.
    pub fn preserve_fd(&self, fd: BorrowedFd<'_>, token: u64) -> Result<(), LuoError> {
        let mut arg = FdArg {
            size: struct_size::<FdArg>(),
            fd: fd.as_raw_fd(),
            token,
        };
        luo_ioctl(self.fd.as_fd(), LuoIoctl::PreserveFd, &mut arg)
            .map_err(|e| self.err(LuoIoctl::PreserveFd, e))
    }

    /// `LIVEUPDATE_SESSION_RETRIEVE_FD`: after a live update, the file preserved under
    /// `token`. A failed retrieve fails the same way again.
    pub fn retrieve_fd(&self, token: u64) -> Result<OwnedFd, LuoError> {
        let mut arg = FdArg {
            size: struct_size::<FdArg>(),
            fd: -1,
            token,
        };
        luo_ioctl(self.fd.as_fd(), LuoIoctl::RetrieveFd, &mut arg)
            .map_err(|e| self.err(LuoIoctl::RetrieveFd, e))?;
        Ok(owned_from_kernel(arg.fd))
    }

    /// `LIVEUPDATE_SESSION_FINISH`: every file is retrieved and restored; the kernel releases
    /// its hold on the preserved resources. May be retried on failure.
    pub fn finish(&self) -> Result<(), LuoError> {
        let mut arg = FinishArg {
            size: struct_size::<FinishArg>(),
            reserved: 0,
        };
        luo_ioctl(self.fd.as_fd(), LuoIoctl::Finish, &mut arg)
            .map_err(|e| self.err(LuoIoctl::Finish, e))
    }

    /// `LIVEUPDATE_SESSION_GET_NAME`: the session's full name as the kernel knows it.
    pub fn get_name(&self) -> Result<String, LuoError> {
        let mut arg = GetNameArg {
            size: struct_size::<GetNameArg>(),
            reserved: 0,
            name: [0; SESSION_NAME_LENGTH],
        };
        luo_ioctl(self.fd.as_fd(), LuoIoctl::GetName, &mut arg)
            .map_err(|e| self.err(LuoIoctl::GetName, e))?;
        Ok(decode_session_name(&arg.name))
    }
}

impl AsFd for Session {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn request_numbers_are_io_0xba() {
        // _IO(type, nr) = (type << 8) | nr: no size, no direction bits.
        assert_eq!(LuoIoctl::CreateSession.request(), 0xBA00);
        assert_eq!(LuoIoctl::RetrieveSession.request(), 0xBA01);
        assert_eq!(LuoIoctl::PreserveFd.request(), 0xBA40);
        assert_eq!(LuoIoctl::RetrieveFd.request(), 0xBA41);
        assert_eq!(LuoIoctl::Finish.request(), 0xBA42);
        assert_eq!(LuoIoctl::GetName.request(), 0xBA43);
    }

    #[test]
    fn struct_layouts_match_the_kernel() {
        assert_eq!(offset_of!(SessionArg, size), 0);
        assert_eq!(offset_of!(SessionArg, fd), 4);
        assert_eq!(offset_of!(SessionArg, name), 8);
        assert_eq!(size_of::<SessionArg>(), 72);

        assert_eq!(offset_of!(FdArg, size), 0);
        assert_eq!(offset_of!(FdArg, fd), 4);
        assert_eq!(offset_of!(FdArg, token), 8);
        assert_eq!(size_of::<FdArg>(), 16);
        assert_eq!(align_of::<FdArg>(), 8);

        assert_eq!(offset_of!(FinishArg, reserved), 4);
        assert_eq!(size_of::<FinishArg>(), 8);

        assert_eq!(offset_of!(GetNameArg, reserved), 4);
        assert_eq!(offset_of!(GetNameArg, name), 8);
        assert_eq!(size_of::<GetNameArg>(), 72);
    }

    #[test]
    fn names_up_to_63_bytes_encode_with_a_nul() {
        let name = "a".repeat(63);
        let buf = encode_session_name(&name).unwrap();
        assert_eq!(&buf[..63], name.as_bytes());
        assert_eq!(buf[63], 0);
        assert_eq!(decode_session_name(&buf), name);

        let buf = encode_session_name("mk-smoke").unwrap();
        assert!(buf[8..].iter().all(|&b| b == 0));
        assert_eq!(decode_session_name(&buf), "mk-smoke");
    }

    #[test]
    fn a_64_byte_name_is_rejected() {
        let err = encode_session_name(&"a".repeat(64)).unwrap_err();
        assert!(matches!(err, LuoError::InvalidName { .. }), "{err}");
        assert!(err.to_string().contains("63 bytes"), "{err}");
    }

    #[test]
    fn multibyte_names_are_counted_in_bytes() {
        // 21 three-byte characters = 63 bytes: fits; 22 = 66 bytes: does not.
        assert!(encode_session_name(&"€".repeat(21)).is_ok());
        assert!(encode_session_name(&"€".repeat(22)).is_err());
    }

    #[test]
    fn names_with_nul_or_empty_are_rejected() {
        let err = encode_session_name("mk\0smoke").unwrap_err();
        assert!(err.to_string().contains("NUL"), "{err}");
        let err = encode_session_name("").unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn decode_stops_at_nul_and_tolerates_a_full_buffer() {
        let mut buf = [b'x'; SESSION_NAME_LENGTH];
        assert_eq!(decode_session_name(&buf).len(), 64);
        buf[3] = 0;
        assert_eq!(decode_session_name(&buf), "xxx");
        buf[0] = 0xff;
        assert_eq!(decode_session_name(&buf), "\u{fffd}xx");
    }

    #[test]
    fn missing_device_is_a_typed_error_naming_liveupdate_on() {
        let dir = tempfile::tempdir().unwrap();
        let err = LiveUpdate::open_path(&dir.path().join("liveupdate")).unwrap_err();
        assert!(matches!(err, LuoError::DeviceMissing { .. }), "{err:?}");
        assert!(err.to_string().contains("liveupdate=on"), "{err}");
    }

    #[test]
    fn a_non_luo_file_gives_enotty_with_a_hint() {
        // A regular file answers every ioctl with ENOTTY: the path a kernel without LUO takes.
        let file = tempfile::NamedTempFile::new().unwrap();
        let dev = LiveUpdate::open_path(file.path()).unwrap();
        let err = dev.create_session("mk-test").unwrap_err();
        assert_eq!(err.errno(), Some(Errno::ENOTTY), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("LIVEUPDATE_IOCTL_CREATE_SESSION"), "{msg}");
        assert!(msg.contains("liveupdate=on"), "{msg}");
    }

    #[test]
    fn invalid_name_is_rejected_before_any_ioctl() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let dev = LiveUpdate::open_path(file.path()).unwrap();
        let err = dev.retrieve_session(&"n".repeat(64)).unwrap_err();
        assert!(matches!(err, LuoError::InvalidName { .. }), "{err:?}");
    }

    #[test]
    fn hints_name_the_likely_cause() {
        assert!(hint(LuoIoctl::RetrieveSession, Errno::ENOENT).contains("no preserved session"));
        assert!(hint(LuoIoctl::PreserveFd, Errno::ENOENT).contains("memfd"));
        assert!(hint(LuoIoctl::Finish, Errno::EBUSY).contains("retrieve every token"));
        assert!(hint(LuoIoctl::GetName, Errno::ENOTTY).contains("CONFIG_LIVEUPDATE"));
    }
}
