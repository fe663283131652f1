//! The mk-upgrade agent library: orchestrator, platforms and CLI plumbing.
//!
//! The binaries `mk-upgrade` (operator CLI) and `mk-agentd` (daemon and, on the emulated
//! platform, instance supervisor) are thin shells over this library.

pub mod cli;
pub mod exit;
pub mod handover;
pub mod health;
pub mod luo;
pub mod orchestrator;
pub mod platform;
pub mod receiver;
pub mod sys;
pub mod verify;
pub mod workload;
