//! `mk_demo_kv`: the demonstration workload `mk-demo-kv` and its load generator.
//!
//! `mk-demo-kv` is a small TCP key-value server that keeps ALL its data in a memfd mapped
//! `MAP_SHARED`, so a successor handed the same memfd (over SCM_RIGHTS on the emulated
//! platform, or preserved across kexec by LUO) sees every acknowledged write at once, with
//! no copy. The successor also adopts the listening socket when it is handed over, so
//! connections queued in its backlog while the old instance was frozen are served by the
//! new one. [`loadgen`] drives traffic during an upgrade and reads back every
//! acknowledged write afterwards to prove nothing was lost.
//!
//! What is handed over: the data (the memfd), the listening socket with its backlog, and,
//! when the supervisor asks for it with its hand-over signal ([`handoff`]), the
//! established client connections, each at a request boundary, so that no request is in
//! flight on a connection that dies. Without a hand-over, connections the old instance had
//! accepted are reset when it is killed: a request in flight on one of them gets no
//! response (the load generator counts it as failed and re-sends it on a new connection,
//! where the new instance answers). No acknowledged write is lost either way.
//!
//! * [`log`]: the on-memfd format (header, append-only records with CRC32, index regions);
//! * [`index`]: the hash table of keys kept in the memfd (slots, hashing, probing);
//! * [`store`]: the store over the memfd and its index (in the memfd, or in the heap);
//! * [`protocol`]: the line protocol (and the HTTP `/health` check);
//! * [`handoff`]: handing established connections to the next copy;
//! * [`persist`]: saving the store to a file and loading it from one (or a block device);
//! * [`server`]: start-up contract (`MK_STATE_FDS`) and connection handling;
//! * [`kv_client`]: a blocking client and health checks;
//! * [`loadgen`]: the load generator and its loss report;
//! * [`exit`]: the workload's exit codes (numbers from the mk-upgrade table);
//! * [`sys`]: every `unsafe` of the crate (descriptor ownership, the shared mapping).
//!
//! The crate depends on nothing of mk-upgrade: it is a workload, and speaks only the
//! `MK_STATE_FDS` contract (`docs/state.md`).

#![deny(unsafe_code)]

pub mod exit;
pub mod handoff;
pub mod index;
pub mod kv_client;
pub mod loadgen;
pub mod log;
pub mod persist;
pub mod protocol;
pub mod server;
mod shm;
pub mod store;
#[allow(unsafe_code)]
pub mod sys;

pub use shm::ShmError;
