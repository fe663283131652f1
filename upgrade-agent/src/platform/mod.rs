//! The `Platform` trait: everything the orchestrator needs from "the kernel side".
//!
//! The orchestrator ([`crate::orchestrator`]) is written only against this trait, so the
//! same state machine drives:
//!
//! * [`emulated`]: an **emulation** of the multikernel interface that runs on any Linux
//!   machine (instances are supervisor processes pinned to their cpus), side by side;
//! * [`luo`]: mainline LUO, where "booting the new instance" replaces the running kernel
//!   (the platform lives in the host agent; the CLI talks to it through
//!   [`luo::client`]);
//! * [`multikernel`]: the multikernel patch set's interface (sysfs overlays,
//!   `kexec_file_load` with `KEXEC_MULTIKERNEL`, the multikernel `reboot` commands), proven
//!   against its simulated kernel ([`multikernel::sim`]) and its blobs against kerf;
//! * a fake for the orchestrator's unit tests (`fake`, test builds only).
//!
//! The trait: instance lifecycle (`create_instance`, `load`, `boot`, `halt`,
//! `transfer_resources`, `destroy`), workload control on an instance (`freeze`, `thaw`,
//! `stop_workload`, `preserved_fds`), and moves (`prepare`, `deliver` with a deadline,
//! `commit`, `abort`, `disconnect`; on replace platforms `claim`, `return_to_previous`,
//! `handed_over`, `confirm`). See `docs/architecture.md` for the diagram and the state
//! machine built on top.

pub mod agents;
pub mod channel;
pub mod emulated;
#[cfg(test)]
pub mod fake;
pub mod luo;
pub mod multikernel;

use std::os::fd::BorrowedFd;

use kho_proto::channel::UpgradeId;
use serde::{Deserialize, Serialize};

pub use crate::model::{
    InstanceId, InstanceInfo, InstanceState, MAX_INSTANCE_ID, PlatformError, PlatformKind,
    PreservedFd, Resources, WorkloadInfo,
};

use crate::handover::Outgoing;
use crate::record::UpgradeRecord;
use crate::workload::WorkloadSpec;

/// What a platform can do on this host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capabilities {
    pub kind: PlatformKind,
    /// Whether the platform is an emulation (labelled as such in every output).
    pub emulated: bool,
    /// Whether a new kernel boots beside the old one (multikernel) rather than replacing it
    /// (LUO kexec).
    pub side_by_side: bool,
    /// Whether fds travel with channel frames (SCM_RIGHTS) rather than by preservation tokens.
    pub fds_over_channel: bool,
    /// All cpus of the machine.
    pub cpus: Vec<u32>,
    /// Cpus no instance owns ("spare cores").
    pub spare_cpus: Vec<u32>,
    /// Memory not owned by any instance.
    pub spare_memory_bytes: u64,
    /// How workloads are frozen ("cgroup.freeze" or "SIGSTOP").
    pub freezer: String,
    /// Human-readable remarks (what is emulated, what is missing).
    pub notes: Vec<String>,
}

/// A kernel image ready to be loaded: the sealed memfd that was verified, and what it is.
#[derive(Debug)]
pub struct LoadableKernel<'a> {
    pub image: BorrowedFd<'a>,
    pub release: String,
    pub sha256: [u8; 32],
    pub initrd: Option<BorrowedFd<'a>>,
    pub cmdline: &'a str,
}

/// What [`Platform::deliver`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Side by side: verified (after `verified_us` from the delivery's start), started, and
    /// healthy on the target.
    Healthy { verified_us: u64 },
    /// Replace: preserved for the next kernel; nothing runs yet.
    Staged,
}

/// What [`Platform::claim`] did with a staged workload.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Claimed {
    /// From the freeze in the previous kernel to healthy here, across the kexec.
    pub blackout_us: u64,
    /// From the freeze in the previous kernel to the restored process started here.
    pub handover_us: u64,
    /// The two figures above are lower bounds: the previous kernel's monotonic time from
    /// the freeze to its kexec call plus this kernel's boot clock (the kexec in between is
    /// not on either clock). False: a difference of the two kernels' wall clocks.
    pub blackout_lower_bound: bool,
    /// Bytes of state verified.
    pub bytes: u64,
    /// Verification, start and health-check times, for the event log.
    pub verify_ms: f64,
    pub start_ms: f64,
    pub health_ms: f64,
    /// Claimed by a previous run of the agent, which then stopped; its copy was adopted
    /// after the restart and is healthy. The numbers above went with that run (zero here).
    pub adopted: bool,
}

/// The operations the orchestrator needs. See the module documentation.
pub trait Platform {
    /// Probes what the platform can do here.
    fn probe(&mut self) -> Result<Capabilities, PlatformError>;

    /// Lists the instances with their resources, kernels and workloads.
    fn instances(&mut self) -> Result<Vec<InstanceInfo>, PlatformError>;

    /// One workload of instance `id` and that instance's kernel release: what a move reads
    /// before its freeze; [`PlatformError::NoSuchWorkload`] when the instance or the
    /// workload is not there. The default asks for every instance ([`Platform::instances`]);
    /// a platform that can ask for one workload keeps a move's cost from growing with the
    /// number of workloads.
    fn workload_info(
        &mut self,
        id: InstanceId,
        workload: &str,
    ) -> Result<(Option<String>, WorkloadInfo), PlatformError> {
        self.instances()?
            .into_iter()
            .find(|i| i.id == id)
            .and_then(|i| {
                let release = i.kernel_release;
                i.workloads
                    .into_iter()
                    .find(|w| w.name == workload)
                    .map(|w| (release, w))
            })
            .ok_or_else(|| PlatformError::NoSuchWorkload {
                instance: id,
                workload: workload.to_owned(),
            })
    }

    /// Reserves spare resources for a new instance (state `ready`).
    fn create_instance(&mut self, resources: &Resources) -> Result<InstanceId, PlatformError>;

    /// Loads a verified kernel into a `ready` instance (state `loaded`).
    fn load(&mut self, id: InstanceId, kernel: &LoadableKernel<'_>) -> Result<(), PlatformError>;

    /// Boots a `loaded` instance. Side by side: the instance becomes `active` and its agent
    /// answers on the channel (`record` is not needed: the first instance of a machine boots
    /// without one). Replace (LUO): the running kernel is replaced, and `record` (already
    /// journaled) travels with the preserved state to the next kernel, whose agent resumes
    /// the upgrade from it; on success this call does not return.
    fn boot(&mut self, id: InstanceId, record: Option<&UpgradeRecord>)
    -> Result<(), PlatformError>;

    /// Names the upgrade whose hand-overs the platform carries from now on (the new
    /// instance's agent accepts channel frames of that id only).
    fn set_upgrade(&mut self, upgrade_id: UpgradeId);

    /// A liveness round trip to the agent of `id` (a channel heartbeat).
    fn ping(&mut self, id: InstanceId) -> Result<(), PlatformError>;

    /// Announces a move of `spec` to `to` before the freeze, so that the target prepares
    /// (creates the workload's group) outside the blackout.
    fn prepare(&mut self, to: InstanceId, spec: &WorkloadSpec) -> Result<(), PlatformError>;

    /// Hands the image of a hand-over built before the freeze to `to`, to be verified while
    /// the workload still runs (channel protocol version 2, `RegionStage`): a
    /// [`Platform::deliver`] of the same image after the freeze then carries only the
    /// descriptors, and the target checks only those. `Ok(true)`: staged; `Ok(false)`: this
    /// platform or its target cannot stage (the delivery carries everything, as before);
    /// [`PlatformError::Refused`]: the target refused the image (nothing is frozen yet).
    fn stage(
        &mut self,
        to: InstanceId,
        workload: &str,
        out: &Outgoing,
    ) -> Result<bool, PlatformError> {
        let _ = (to, workload, out);
        Ok(false)
    }

    /// Hands one built hand-over (sealed image + descriptors) to `to`.
    ///
    /// Side by side, the target verifies it, starts the workload from it and health-checks
    /// it: `Ok(Delivered::Healthy)`, or [`PlatformError::Refused`] /
    /// [`PlatformError::Unhealthy`]. Replace, it is preserved for the next kernel:
    /// `Ok(Delivered::Staged)`; [`Platform::claim`] finishes it there.
    ///
    /// `deadline` bounds the whole delivery (verification, start and health check): past
    /// it the delivery fails with [`PlatformError::Channel`], so a frozen workload is never
    /// left waiting on a target that does not answer.
    fn deliver(
        &mut self,
        to: InstanceId,
        workload: &str,
        out: Outgoing,
        deadline: std::time::Instant,
    ) -> Result<Delivered, PlatformError>;

    /// Makes a delivered copy the target's own (side by side: `Commit`, then a round trip
    /// proving it was processed). After this the old copy may be stopped.
    fn commit(&mut self, to: InstanceId, workload: &str) -> Result<(), PlatformError>;

    /// Drops whatever was delivered or staged for `workload` on `to` (best effort: a
    /// receiver also stops an uncommitted copy when its channel drops).
    fn abort(&mut self, to: InstanceId, workload: &str, reason: &str);

    /// Closes every channel (the receivers stop every copy that was not committed).
    /// `release` names the resources the old instance is about to hand over, when the
    /// upgrade completed.
    fn disconnect(&mut self, release: Option<&Resources>);

    /// Replace platforms, in the kernel that was booted: verifies, restores and
    /// health-checks what was staged for `workload` before the kexec.
    fn claim(&mut self, workload: &str) -> Result<Claimed, PlatformError> {
        let _ = workload;
        Err(PlatformError::Unsupported("claiming staged workloads"))
    }

    /// Replace platforms, in the kernel that was booted, after a failure: stops every copy
    /// started here, hands every workload's state back to the previous kernel (`record`,
    /// phase `RollingBack`, travels with it) and boots it. Does not return on success.
    fn return_to_previous(&mut self, record: &UpgradeRecord) -> Result<(), PlatformError> {
        let _ = record;
        Err(PlatformError::Unsupported("booting the previous kernel"))
    }

    /// Replace platforms: what the running kernel received from the previous one (the
    /// journal record it carried), if this boot is the second half of a kexec.
    fn handed_over(&mut self) -> Option<UpgradeRecord> {
        None
    }

    /// Replace platforms, in the kernel that was booted: every workload is committed; the
    /// boot is confirmed (trial-boot record) and the preserved state released.
    fn confirm(&mut self) -> Result<(), PlatformError> {
        Ok(())
    }

    /// Changes the resources of an `active` instance (cpu-add/cpu-remove, memory-add/remove
    /// overlays on multikernel). Cpus taken away become spare.
    fn resize(&mut self, id: InstanceId, resources: &Resources) -> Result<(), PlatformError>;

    /// Starts a workload on an instance (first start: fresh preserved fds).
    fn start_workload(
        &mut self,
        id: InstanceId,
        spec: &WorkloadSpec,
    ) -> Result<WorkloadInfo, PlatformError>;

    /// Freezes a workload (no instruction of it runs until `thaw`).
    fn freeze(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError>;

    /// Thaws a frozen workload.
    fn thaw(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError>;

    /// Runs the workload's health check on instance `id` now, and checks that its process
    /// is alive: whether it is healthy, and what was seen (the final check of an upgrade).
    fn health(&mut self, id: InstanceId, workload: &str) -> Result<(bool, String), PlatformError>;

    /// Duplicates of the workload's preserved descriptors (memfds, listening sockets).
    fn preserved_fds(
        &mut self,
        id: InstanceId,
        workload: &str,
    ) -> Result<Vec<PreservedFd>, PlatformError>;

    /// Freezes a workload for its move and returns duplicates of its preserved
    /// descriptors, taken once it is frozen: [`Platform::freeze`] then
    /// [`Platform::preserved_fds`], as one step. Either the workload is frozen and its
    /// descriptors are returned, or the error says why and the workload is not left frozen
    /// by this call (descriptors that cannot be taken undo the freeze). A platform that can
    /// do both in one round trip to the instance overrides it: it is inside the blackout.
    fn freeze_for_move(
        &mut self,
        id: InstanceId,
        workload: &str,
    ) -> Result<Vec<PreservedFd>, PlatformError> {
        self.freeze(id, workload)?;
        self.preserved_fds(id, workload).inspect_err(|_| {
            // Best effort: a thaw that fails too leaves the error of the fds to report.
            let _ = self.thaw(id, workload);
        })
    }

    /// Stops a workload for good (its preserved fds are released by that instance).
    fn stop_workload(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError>;

    /// Halts an instance; it goes back to `loaded`.
    fn halt(&mut self, id: InstanceId) -> Result<(), PlatformError>;

    /// Gives a halted instance's cpus and memory to another instance; returns what moved.
    fn transfer_resources(
        &mut self,
        from: InstanceId,
        to: InstanceId,
    ) -> Result<Resources, PlatformError>;

    /// Removes a halted instance (its image is unloaded).
    fn destroy(&mut self, id: InstanceId) -> Result<(), PlatformError>;
}
