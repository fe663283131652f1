//! The mk-upgrade agent library: the layers under the binaries `mk-upgrade` (operator CLI)
//! and `mk-agentd` (daemon: start-up recovery, LUO host agent, emulated instance).
//!
//! Layers point one way (each may use the ones above it in this list, never one below;
//! `tests/layers.rs` enforces it):
//!
//! 1. [`sys`]: every system call that needs `unsafe` (memfd seals, SCM_RIGHTS, kexec,
//!    the LUO ioctls, cgroups), each with a `// SAFETY:` comment.
//! 2. core: the workload file ([`workload`]), kernel image verification ([`verify`]),
//!    hand-over images ([`handover`]), health checks ([`health`]), the shared vocabulary
//!    ([`model`]), the journal record ([`record`]), the state directory ([`statedir`]) and
//!    test-only fault injection ([`fault`]).
//! 3. [`host`]: what runs inside an instance or a kernel: the workload supervisor, its
//!    control protocol, the channel receiver.
//! 4. [`platform`]: the `Platform` trait and its implementations (emulated multikernel,
//!    LUO, a fake for tests).
//! 5. [`orchestrator`]: the one journaled state machine over `Platform`, its recovery
//!    planner, and the operations (apply, rollback, recover) the binaries call.
//!
//! The command line itself lives in the binaries (`src/bin/`): no library module knows it.

#![deny(unsafe_code)]

pub mod events;
pub mod exit;
pub mod fault;
pub mod handover;
pub mod health;
pub mod host;
pub mod metrics;
pub mod model;
pub mod orchestrator;
pub mod platform;
pub mod record;
pub mod statedir;
#[allow(unsafe_code)]
pub mod sys;
pub mod telemetry;
pub mod verify;
pub mod workload;
