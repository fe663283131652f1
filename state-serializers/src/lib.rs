//! Capture and restore of the state a workload needs to come up unchanged in the next kernel.
//!
//! * [`task`]: managed processes (tree, exe, args, env, cwd, credentials, rlimits,
//!   affinity, scheduling, cgroup and limits, open descriptors) read from `/proc`;
//! * [`memory`]: preserved memfd regions with CRC32 + SHA-256 digests ([`digest`]),
//!   hugepage pools and vm sysctls;
//! * [`device`]: network interfaces, addresses and routes (netlink), PCI devices and
//!   drivers (sysfs), block devices, the mount table;
//! * [`codec`]: versioned postcard encoding for handover regions, JSON for operators,
//!   and the migration from schema version 1;
//! * [`restore`]: re-spawning a task with its preserved descriptors ([`fdenv`] contract);
//! * [`diff`]: what changed between two captures.
//!
//! Every reader takes a `root` path under which `proc/` and `sys/` are found (`/` in
//! production, a fixture tree in tests). Schemas are documented in `docs/state.md`.
//!
//! All `unsafe` code lives in [`sys`], each block with its `// SAFETY:` argument behind a
//! safe function; the rest of the crate may not use it.

#![deny(unsafe_code)]

pub mod codec;
pub mod device;
pub mod diff;
pub mod digest;
pub mod error;
pub mod fdenv;
pub mod memory;
pub mod procfs;
pub mod restore;
#[allow(unsafe_code)]
pub mod sys;
pub mod task;

pub use codec::{Capture, StateKind, decode, encode};
pub use digest::{
    PageSample, RegionDigest, SampleError, crc32_parallel, digest_fd, digest_many, verify_fd,
};
pub use error::{Result, StateError};

use serde::{Deserialize, Serialize};

/// The schema version this crate writes. It reads this version and the one before.
pub const SCHEMA_VERSION: u16 = 2;
/// The oldest schema version this crate reads.
pub const MIN_SCHEMA_VERSION: u16 = 1;

/// What a restore does with an item it cannot apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Policy {
    /// Any item not applied fails the restore with [`StateError::NotApplied`].
    Strict,
    /// Items not applied are returned as warnings in the [`Report`].
    BestEffort,
}

/// An item a restore did not apply, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    pub item: String,
    pub reason: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.item, self.reason)
    }
}

/// What a restore applied and what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub applied: Vec<String>,
    pub not_applied: Vec<Warning>,
}

impl Report {
    /// Records an applied item.
    pub fn applied(&mut self, item: impl Into<String>) {
        self.applied.push(item.into());
    }

    /// Records an item that could not be applied.
    pub fn not_applied(&mut self, item: impl Into<String>, reason: impl Into<String>) {
        let w = Warning {
            item: item.into(),
            reason: reason.into(),
        };
        tracing::warn!(item = %w.item, reason = %w.reason, "restore item not applied");
        self.not_applied.push(w);
    }

    /// Applies `policy`: under [`Policy::Strict`] any not-applied item is an error.
    pub fn finish(self, policy: Policy) -> Result<Report> {
        if policy == Policy::Strict && !self.not_applied.is_empty() {
            return Err(StateError::NotApplied {
                not_applied: self.not_applied,
            });
        }
        Ok(self)
    }

    /// Appends another report.
    pub fn merge(&mut self, other: Report) {
        self.applied.extend(other.applied);
        self.not_applied.extend(other.not_applied);
    }
}
