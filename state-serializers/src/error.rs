//! The one error type of this crate.

use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong while capturing, encoding, decoding or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The process exited (or never existed) while it was being captured.
    #[error(
        "process {pid} vanished while being captured (it exited); capture it again or drop it from the handover"
    )]
    ProcessVanished { pid: i32 },
    /// The pid now names a different process (pid reuse) or the process changed under us.
    #[error(
        "process {pid} changed while being captured ({what}); capture it again once it is quiescent"
    )]
    ProcessChanged { pid: i32, what: String },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The kernel refused access to a file.
    #[error("{}: permission denied; run as root or as the owner of the process", path.display())]
    PermissionDenied { path: PathBuf },
    /// A kernel file did not have the expected format.
    #[error("{}: malformed content: {detail}", path.display())]
    Malformed { path: PathBuf, detail: String },
    /// A field holds bytes that are not UTF-8; the schema stores text only.
    #[error("{}: {field} is not valid UTF-8; such processes cannot be captured by this schema", path.display())]
    NotUtf8 { path: PathBuf, field: &'static str },
    /// A memory region's contents do not match the digests recorded at capture time.
    #[error(
        "region {token:?}: digest mismatch (expected len {expected_len} crc32 {expected_crc32:08x} sha256 {expected_sha256}, found len {found_len} crc32 {found_crc32:08x} sha256 {found_sha256}); the handover must be rolled back"
    )]
    DigestMismatch {
        token: String,
        expected_len: u64,
        expected_crc32: u32,
        expected_sha256: String,
        found_len: u64,
        found_crc32: u32,
        found_sha256: String,
    },
    /// A handed-over memfd lacks seals it had at capture time (so it is not the same memfd).
    #[error(
        "region {token:?}: seals {found:#x} lack captured seals {expected:#x}; the handover must be rolled back"
    )]
    SealsMismatch {
        token: String,
        expected: u32,
        found: u32,
    },
    /// A region recorded at capture time was not handed over.
    #[error("region {token:?} was captured but not handed over; the handover must be rolled back")]
    RegionMissing { token: String },
    /// A serialized state carries a schema version this reader does not know.
    #[error(
        "{kind} state: schema version {found} is not supported (this reader reads {min}..={max}); upgrade the reading agent"
    )]
    UnsupportedVersion {
        kind: &'static str,
        found: u16,
        min: u16,
        max: u16,
    },
    /// A serialized state is corrupt.
    #[error("{kind} state (schema version {version}): cannot decode: {detail}")]
    Decode {
        kind: &'static str,
        version: u16,
        detail: String,
    },
    /// Encoding failed (a bug: every state is encodable).
    #[error("{kind} state: cannot encode: {detail}")]
    Encode { kind: &'static str, detail: String },
    /// A netlink request failed.
    #[error("netlink: {what}: {detail}")]
    Netlink { what: String, detail: String },
    /// A restore under [`crate::Policy::Strict`] could not apply everything.
    #[error("restore refused under the strict policy: {} item(s) not applied: {}", .not_applied.len(), .not_applied.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    NotApplied { not_applied: Vec<crate::Warning> },
    /// A system call failed.
    #[error("{call}: {source}")]
    Sys {
        call: &'static str,
        source: io::Error,
    },
    /// The caller passed something unusable.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl StateError {
    /// Maps an I/O error on `path`, turning `EACCES`/`EPERM` into [`StateError::PermissionDenied`].
    pub fn io(path: &Path, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) => StateError::PermissionDenied {
                path: path.to_path_buf(),
            },
            _ => StateError::Io {
                path: path.to_path_buf(),
                source,
            },
        }
    }

    /// A malformed-content error.
    pub fn malformed(path: &Path, detail: impl Into<String>) -> Self {
        StateError::Malformed {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }

    /// True when the error means "the file is not there" (a vanished process looks like this).
    pub fn is_not_found(&self) -> bool {
        match self {
            StateError::Io { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
                    || source.raw_os_error() == Some(libc::ESRCH)
            }
            _ => false,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = StateError> = std::result::Result<T, E>;
