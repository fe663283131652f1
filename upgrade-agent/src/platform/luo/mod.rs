//! The mainline LUO platform: a kernel upgrade that **replaces** the running kernel by
//! `kexec`, with the workloads' memfds kept across it in `/dev/liveupdate` sessions.
//!
//! * [`host`]: [`host::LuoPlatform`], the [`Platform`](crate::platform::Platform) the
//!   orchestrator drives inside the host agent: staging a workload preserves its signed
//!   hand-over image and memfds in a session, booting kexecs with the journal record in
//!   the agent session, claiming (in the next kernel) verifies, restores and
//!   health-checks, and the way back re-preserves and kexecs the previous kernel.
//! * the host agent (`mk-agentd serve`, in the `mk-agentd` binary). It owns
//!   `/dev/liveupdate` (exclusive), runs the workloads as its children (the instance host's
//!   supervisor), serves `STATE_DIR/luo/ctl.sock`, runs the orchestrator on `LuoApply`, and
//!   at start runs the orchestrator's recovery, which carries on with whatever a kexec
//!   carried over.
//! * [`client`]: what the CLI asks the agent.
//! * [`handoff`]: the agent's own record that travels in the `mk-agent` session.
//!
//! Session layout across one kexec:
//!
//! | session       | token | what                                                           |
//! |---------------|-------|----------------------------------------------------------------|
//! | `mk-agent`    | 0     | sealed memfd: [`handoff::Handoff`] (JSON: journal record, workloads, digests) |
//! |               | 1     | the kernel being left (to come back to)                        |
//! |               | 2     | the kernel being booted (what the next kernel runs)            |
//! |               | 3     | the initramfs of the kernel being booted (when it has one)     |
//! |               | 4     | the initramfs of the kernel being left (when it has one)       |
//! | `mk-w-<name>` | 0     | forward: the workload's signed kho-proto handover image        |
//! |               | 1..   | the workload's memfds, in workload-file order                  |
//!
//! The handover images are signed with the node key under `STATE_DIR/node-keys/`; both
//! kernels must see the same directory (on a disk-backed host it is on disk; in the test VM
//! it is baked into the initramfs both kernels boot). Listening sockets are not preservable
//! by LUO: the next kernel binds each listener afresh from the workload's spec (connections
//! queued in the old kernel are lost, unlike on the emulated platform).

pub mod client;
pub mod handoff;
pub mod host;
pub mod store;

use std::path::{Path, PathBuf};

/// Name of the agent's own LUO session.
pub const AGENT_SESSION: &str = "mk-agent";
/// Prefix of a workload's LUO session name.
pub const WORKLOAD_SESSION_PREFIX: &str = "mk-w-";
/// Token of the handoff record in the agent session.
pub const TOKEN_HANDOFF: u64 = 0;
/// Token of the kernel being left.
pub const TOKEN_SOURCE_KERNEL: u64 = 1;
/// Token of the kernel being booted.
pub const TOKEN_TARGET_KERNEL: u64 = 2;
/// Token of the initramfs of the kernel being booted.
pub const TOKEN_INITRD: u64 = 3;
/// Token of the initramfs of the kernel being left.
pub const TOKEN_SOURCE_INITRD: u64 = 4;
/// Token of a workload's handover image in its session.
pub const TOKEN_IMAGE: u64 = 0;

/// What `integrity = "auto"` means on this platform (docs/performance.md, "Live update (LUO)
/// in QEMU", and docs/workloads.md): the kernel preserved the very folios, so the check is
/// their identity (session, token, size, seals) plus a constant-cost page sample; the
/// full-content checks (`crc32`, `digest`) are a workload-file setting away.
pub const DEFAULT_INTEGRITY: crate::workload::Integrity = crate::workload::Integrity::Sampled;
/// Page size of a `sampled` check.
pub const SAMPLE_PAGE: u32 = 4096;
/// Pages of a `sampled` check (4 MiB read; one per 1/1024 of the memfd, so every 2 MiB
/// folio of a memfd up to 2 GiB holds a sampled page).
pub const SAMPLE_COUNT: u32 = 1024;

/// Prefix of the one console/stdout line the agent prints when an upgrade ended in this
/// kernel: `MK-UPGRADE-RESULT <record JSON>`.
pub const RESULT_PREFIX: &str = "MK-UPGRADE-RESULT";

/// The host agent's directory under the state directory (`ctl.sock`, `boot.json`).
pub fn agent_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("luo")
}

/// The host agent's control socket.
pub fn ctl_socket(state_dir: &Path) -> PathBuf {
    agent_dir(state_dir).join("ctl.sock")
}

/// A workload name that does not fit in a LUO session name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "workload name {name:?} is too long for a LUO session name ({session:?} is {} bytes, the \
     limit is {}): use a name of at most {} bytes",
    .session.len(),
    crate::sys::luo::MAX_SESSION_NAME_BYTES,
    crate::sys::luo::MAX_SESSION_NAME_BYTES - WORKLOAD_SESSION_PREFIX.len()
)]
pub struct SessionNameTooLong {
    /// The workload name.
    pub name: String,
    /// The session name it would need (`mk-w-<name>`).
    pub session: String,
}

/// The LUO session name of workload `name` (`mk-w-<name>`, at most 63 bytes).
pub fn workload_session(name: &str) -> Result<String, SessionNameTooLong> {
    let session = format!("{WORKLOAD_SESSION_PREFIX}{name}");
    if session.len() > crate::sys::luo::MAX_SESSION_NAME_BYTES {
        return Err(SessionNameTooLong {
            name: name.to_owned(),
            session,
        });
    }
    Ok(session)
}

/// Returns `cmdline` with `liveupdate=on` appended unless it already sets `liveupdate=`.
pub fn with_liveupdate(cmdline: &str) -> String {
    if cmdline
        .split_whitespace()
        .any(|w| w.starts_with("liveupdate="))
    {
        cmdline.trim().to_owned()
    } else if cmdline.trim().is_empty() {
        "liveupdate=on".to_owned()
    } else {
        format!("{} liveupdate=on", cmdline.trim())
    }
}

/// CLOCK_REALTIME in nanoseconds since the epoch (shared by both kernels through the RTC;
/// see `docs/kernel.md` for what that makes of a blackout measured across a kexec).
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// CLOCK_BOOTTIME in microseconds: this kernel's time since its clock started at boot
/// (suspend included), which a kexec starts again from zero.
pub fn boottime_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        u64::try_from(t.tv_sec())
            .unwrap_or(0)
            .saturating_mul(1_000_000)
            .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0) / 1000)
    })
}

/// `d` in whole microseconds (saturating).
pub fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The running kernel's release (`uname -r`).
pub fn running_release() -> String {
    nix::sys::utsname::uname().map_or_else(
        |_| "unknown".into(),
        |u| u.release().to_string_lossy().into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveupdate_is_added_once() {
        assert_eq!(with_liveupdate(""), "liveupdate=on");
        assert_eq!(
            with_liveupdate("console=ttyS0"),
            "console=ttyS0 liveupdate=on"
        );
        assert_eq!(
            with_liveupdate("console=ttyS0 liveupdate=on"),
            "console=ttyS0 liveupdate=on"
        );
        assert_eq!(with_liveupdate("liveupdate=1 x"), "liveupdate=1 x");
    }

    #[test]
    fn session_names_are_bounded() {
        assert_eq!(workload_session("kv-1").unwrap(), "mk-w-kv-1");
        assert!(workload_session(&"a".repeat(58)).is_ok());
        let e = workload_session(&"a".repeat(59)).unwrap_err();
        assert_eq!(e.name, "a".repeat(59));
        let text = e.to_string();
        assert!(
            text.contains("is too long for a LUO session name")
                && text.contains("at most 58 bytes"),
            "{text}"
        );
    }
}
