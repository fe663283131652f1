//! A fake platform for unit tests (**test-only**, compiled only for tests): instances and
//! workloads are entries in memory, every call is recorded, and any call can be made to
//! fail, so the orchestrator's every transition and every failure point is tested without a
//! process, a socket or a kernel.
//!
//! It plays both flows: side by side (a delivered copy appears on the target, pending
//! commit, and is healthy unless told otherwise) and replace (delivery stages, `boot`
//! "kexecs" by making the new instance the running one and carrying the record, `claim`
//! starts the staged copy there, `return_to_previous` goes back).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;

use kho_proto::channel::UpgradeId;

use super::{
    Capabilities, Claimed, Delivered, InstanceId, InstanceInfo, InstanceState, LoadableKernel,
    Platform, PlatformError, PlatformKind, PreservedFd, Resources, WorkloadInfo,
};
use crate::handover::Outgoing;
use crate::record::UpgradeRecord;
use crate::workload::WorkloadSpec;

/// One workload on a fake instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeWorkload {
    pub pid: i32,
    pub frozen: bool,
    pub pending_commit: bool,
}

/// One fake instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeInstance {
    pub state: InstanceState,
    pub resources: Resources,
    pub release: Option<String>,
    pub workloads: BTreeMap<String, FakeWorkload>,
}

/// The fake platform. Public fields are the knobs and the observations.
#[derive(Debug)]
pub struct FakePlatform {
    /// Replace (LUO-like) instead of side by side.
    pub replace: bool,
    pub cpus: Vec<u32>,
    pub instances: BTreeMap<InstanceId, FakeInstance>,
    /// Every call, in order, as `"op id [workload]"`.
    pub calls: Vec<String>,
    /// Fail the call whose 1-based index in `calls` is this.
    pub fail_call: Option<usize>,
    /// Fail the N-th (1-based) call of the named operation.
    pub fail_op: Option<(&'static str, usize)>,
    /// On the N-th call of the named operation, instance `id` crashes (its agent dies: it
    /// shows as failed and its workloads are gone) and the call fails.
    pub crash_on: Option<(&'static str, usize, InstanceId)>,
    /// Workloads whose delivered or claimed copy is unhealthy.
    pub unhealthy: BTreeSet<String>,
    /// Workloads that fail the final health check after the hand-over (they died later) on
    /// any instance but the original one (1).
    pub sick: BTreeSet<String>,
    /// Workloads whose process exited (shown as `exited`).
    pub exited: BTreeSet<String>,
    /// Workloads whose hand-over the target refuses (a failed check).
    pub refused: BTreeSet<String>,
    /// Workloads whose image, sent ahead of the freeze (`stage`), the target refuses.
    pub refused_stage: BTreeSet<String>,
    /// Replace: what was staged for the next kernel.
    pub staged: BTreeSet<String>,
    /// Replace: the record the last boot carried, until taken by `handed_over`.
    pub carried: Option<UpgradeRecord>,
    /// The upgrade the platform was told to carry (`set_upgrade`).
    pub upgrade_id: Option<UpgradeId>,
    /// Specs of the workloads, for `preserved_fds`.
    pub specs: BTreeMap<String, WorkloadSpec>,
    /// Whether `confirm` was called.
    pub confirmed: bool,
    /// A file whose lines are counted at every `deliver` (into `lines_at_deliver`): what
    /// the event log held while the workload was frozen.
    pub watch_at_deliver: Option<std::path::PathBuf>,
    /// `(workload, lines of watch_at_deliver)` at each `deliver`.
    pub lines_at_deliver: Vec<(String, usize)>,
    /// A directory put at this path by the first `prepare`, in place of the file there
    /// (moved to `PATH.blocked`): a test makes the next journal write fail by putting it
    /// where the journal appends its steps.
    pub block_at_prepare: Option<std::path::PathBuf>,
    /// `preserved_fds` hands out duplicates of one memfd per workload and name, as a
    /// real instance does (else a new memfd at every call).
    pub stable_fds: bool,
    /// With `stable_fds`: every `freeze` grows the workload's memfds by one page first
    /// (the workload wrote just before it was frozen).
    pub grow_at_freeze: bool,
    memfds: BTreeMap<(String, String), std::os::fd::OwnedFd>,
    next_pid: i32,
}

impl FakePlatform {
    /// A machine with instance 1 active on `cpus` running kernel `release` with
    /// `workloads`.
    pub fn new(replace: bool, cpus: Vec<u32>, release: &str, workloads: &[WorkloadSpec]) -> Self {
        let mut p = FakePlatform {
            replace,
            cpus: cpus.clone(),
            instances: BTreeMap::new(),
            calls: Vec::new(),
            fail_call: None,
            fail_op: None,
            crash_on: None,
            unhealthy: BTreeSet::new(),
            sick: BTreeSet::new(),
            exited: BTreeSet::new(),
            refused: BTreeSet::new(),
            refused_stage: BTreeSet::new(),
            staged: BTreeSet::new(),
            carried: None,
            upgrade_id: None,
            specs: workloads
                .iter()
                .map(|w| (w.name.clone(), w.clone()))
                .collect(),
            confirmed: false,
            watch_at_deliver: None,
            block_at_prepare: None,
            lines_at_deliver: Vec::new(),
            stable_fds: false,
            grow_at_freeze: false,
            memfds: BTreeMap::new(),
            next_pid: 100,
        };
        let mut ws = BTreeMap::new();
        for w in workloads {
            ws.insert(w.name.clone(), p.fresh());
        }
        p.instances.insert(
            1,
            FakeInstance {
                state: InstanceState::Active,
                resources: Resources {
                    cpus: if replace { Vec::new() } else { cpus },
                    memory_bytes: if replace { 0 } else { 1 << 30 },
                },
                release: Some(release.to_owned()),
                workloads: ws,
            },
        );
        p
    }

    fn fresh(&mut self) -> FakeWorkload {
        self.next_pid += 1;
        FakeWorkload {
            pid: self.next_pid,
            frozen: false,
            pending_commit: false,
        }
    }

    /// How many calls of `op` were made.
    pub fn count(&self, op: &str) -> usize {
        self.calls
            .iter()
            .filter(|c| c.split(' ').next() == Some(op))
            .count()
    }

    fn call(&mut self, op: &'static str, id: InstanceId, w: &str) -> Result<(), PlatformError> {
        self.calls
            .push(format!("{op} {id} {w}").trim_end().to_owned());
        let n = self.calls.len();
        let nth = self.count(op);
        if self.fail_call == Some(n) || self.fail_op == Some((op, nth)) {
            return Err(PlatformError::Injected(format!("{op} #{nth} (call {n})")));
        }
        if let Some((cop, cn, victim)) = self.crash_on
            && cop == op
            && cn == nth
        {
            if let Some(i) = self.instances.get_mut(&victim) {
                i.state = InstanceState::Failed;
                i.workloads.clear();
            }
            return Err(PlatformError::Instance {
                id: victim,
                what: "its agent died".into(),
            });
        }
        Ok(())
    }

    fn inst(&mut self, id: InstanceId) -> Result<&mut FakeInstance, PlatformError> {
        self.instances
            .get_mut(&id)
            .ok_or(PlatformError::NoSuchInstance(id))
    }

    fn workload(&mut self, id: InstanceId, w: &str) -> Result<&mut FakeWorkload, PlatformError> {
        self.inst(id)?
            .workloads
            .get_mut(w)
            .ok_or_else(|| PlatformError::NoSuchWorkload {
                instance: id,
                workload: w.to_owned(),
            })
    }

    fn used_cpus(&self) -> BTreeSet<u32> {
        self.instances
            .values()
            .flat_map(|i| i.resources.cpus.iter().copied())
            .collect()
    }

    /// The active instances.
    pub fn active(&self) -> Vec<InstanceId> {
        self.instances
            .iter()
            .filter(|(_, i)| i.state == InstanceState::Active)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Where `w` runs (active instances only).
    pub fn runs_on(&self, w: &str) -> Vec<InstanceId> {
        self.instances
            .iter()
            .filter(|(_, i)| i.state == InstanceState::Active && i.workloads.contains_key(w))
            .map(|(id, _)| *id)
            .collect()
    }
}

impl Platform for FakePlatform {
    fn probe(&mut self) -> Result<Capabilities, PlatformError> {
        self.call("probe", 0, "")?;
        let used = self.used_cpus();
        Ok(Capabilities {
            kind: if self.replace {
                PlatformKind::Luo
            } else {
                PlatformKind::Emulated
            },
            emulated: true,
            side_by_side: !self.replace,
            fds_over_channel: !self.replace,
            cpus: self.cpus.clone(),
            spare_cpus: if self.replace {
                Vec::new()
            } else {
                self.cpus
                    .iter()
                    .copied()
                    .filter(|c| !used.contains(c))
                    .collect()
            },
            spare_memory_bytes: 1 << 30,
            freezer: "fake".into(),
            notes: vec!["FAKE platform (unit tests)".into()],
        })
    }

    fn instances(&mut self) -> Result<Vec<InstanceInfo>, PlatformError> {
        self.call("instances", 0, "")?;
        Ok(self
            .instances
            .iter()
            .map(|(id, i)| InstanceInfo {
                id: *id,
                state: i.state,
                resources: i.resources.clone(),
                kernel_release: i.release.clone(),
                workloads: i
                    .workloads
                    .iter()
                    .map(|(n, w)| WorkloadInfo {
                        name: n.clone(),
                        pid: w.pid,
                        frozen: w.frozen,
                        pending_commit: w.pending_commit,
                        state: if self.exited.contains(n) {
                            crate::model::WorkloadState::Exited
                        } else if w.frozen {
                            crate::model::WorkloadState::Frozen
                        } else {
                            crate::model::WorkloadState::Running
                        },
                        ..WorkloadInfo::default()
                    })
                    .collect(),
            })
            .collect())
    }

    fn create_instance(&mut self, resources: &Resources) -> Result<InstanceId, PlatformError> {
        self.call("create", 0, "")?;
        let id = (1..=crate::platform::MAX_INSTANCE_ID)
            .find(|i| !self.instances.contains_key(i))
            .ok_or_else(|| PlatformError::NoResources("no free id".into()))?;
        self.instances.insert(
            id,
            FakeInstance {
                state: InstanceState::Ready,
                resources: resources.clone(),
                release: None,
                workloads: BTreeMap::new(),
            },
        );
        Ok(id)
    }

    fn load(&mut self, id: InstanceId, kernel: &LoadableKernel<'_>) -> Result<(), PlatformError> {
        self.call("load", id, "")?;
        let i = self.inst(id)?;
        i.state = InstanceState::Loaded;
        i.release = Some(kernel.release.clone());
        Ok(())
    }

    fn boot(
        &mut self,
        id: InstanceId,
        record: Option<&UpgradeRecord>,
    ) -> Result<(), PlatformError> {
        self.call("boot", id, "")?;
        if self.replace {
            let record = record.ok_or(PlatformError::Unsupported("boot without a record"))?;
            // "kexec": the old kernel and everything on it is gone; the record and the
            // staged state come along.
            let old = record.old_instance;
            self.instances.remove(&old);
            self.inst(id)?.state = InstanceState::Active;
            self.carried = Some(record.clone());
        } else {
            self.inst(id)?.state = InstanceState::Active;
        }
        Ok(())
    }

    fn set_upgrade(&mut self, upgrade_id: UpgradeId) {
        self.upgrade_id = Some(upgrade_id);
    }

    fn ping(&mut self, id: InstanceId) -> Result<(), PlatformError> {
        self.call("ping", id, "")?;
        match self.inst(id)?.state {
            InstanceState::Active => Ok(()),
            s => Err(PlatformError::Channel {
                id,
                what: format!("instance is {s}"),
            }),
        }
    }

    fn prepare(&mut self, to: InstanceId, spec: &WorkloadSpec) -> Result<(), PlatformError> {
        self.call("prepare", to, &spec.name)?;
        if let Some(p) = self.block_at_prepare.take() {
            let blocked = p.with_extension("blocked");
            match std::fs::rename(&p, blocked) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(PlatformError::io("blocking the journal", e));
                }
                _ => {}
            }
            std::fs::create_dir(&p).map_err(|e| PlatformError::io("blocking the journal", e))?;
        }
        Ok(())
    }

    /// Side by side, like the emulated platform's channel: the image is staged (it must
    /// be non-empty), unless the test refuses it. Replace: nothing to stage.
    fn stage(
        &mut self,
        to: InstanceId,
        workload: &str,
        out: &Outgoing,
    ) -> Result<bool, PlatformError> {
        if self.replace {
            return Ok(false);
        }
        self.call("stage", to, workload)?;
        let len = crate::sys::memfd::size(out.image.as_fd()).map_err(|e| {
            PlatformError::io("fake: sizing the staged image", std::io::Error::from(e))
        })?;
        assert!(len > 0, "an empty handover image was staged");
        if self.refused_stage.contains(workload) {
            return Err(PlatformError::Refused {
                workload: workload.to_owned(),
                instance: to,
                check: "image".into(),
                detail: "signature by an untrusted key".into(),
            });
        }
        Ok(true)
    }

    fn deliver(
        &mut self,
        to: InstanceId,
        workload: &str,
        out: Outgoing,
        deadline: std::time::Instant,
    ) -> Result<Delivered, PlatformError> {
        self.call("deliver", to, workload)?;
        if let Some(path) = &self.watch_at_deliver {
            let lines = std::fs::read_to_string(path).map_or(0, |t| t.lines().count());
            self.lines_at_deliver.push((workload.to_owned(), lines));
        }
        if std::time::Instant::now() > deadline {
            return Err(PlatformError::Channel {
                id: to,
                what: "the move's deadline passed".into(),
            });
        }
        // The image is real: it must parse.
        let len = crate::sys::memfd::size(out.image.as_fd()).map_err(|e| {
            PlatformError::io("fake: sizing the delivered image", std::io::Error::from(e))
        })?;
        assert!(len > 0, "an empty handover image was delivered");
        // By identity, the image must describe the very memfds that go with it.
        if let Some(stale) = stale_identity(&out) {
            return Err(PlatformError::Refused {
                workload: workload.to_owned(),
                instance: to,
                check: "identity".into(),
                detail: stale,
            });
        }
        if self.refused.contains(workload) {
            return Err(PlatformError::Refused {
                workload: workload.to_owned(),
                instance: to,
                check: "fake".into(),
                detail: "refused by the test".into(),
            });
        }
        if self.replace {
            self.staged.insert(workload.to_owned());
            return Ok(Delivered::Staged);
        }
        let mut w = self.fresh();
        w.pending_commit = true;
        self.inst(to)?.workloads.insert(workload.to_owned(), w);
        if self.unhealthy.contains(workload) {
            return Err(PlatformError::Unhealthy {
                workload: workload.to_owned(),
                instance: to,
                detail: "unhealthy by the test".into(),
            });
        }
        Ok(Delivered::Healthy { verified_us: 5 })
    }

    fn commit(&mut self, to: InstanceId, workload: &str) -> Result<(), PlatformError> {
        self.call("commit", to, workload)?;
        self.workload(to, workload)?.pending_commit = false;
        Ok(())
    }

    fn abort(&mut self, to: InstanceId, workload: &str, _reason: &str) {
        self.calls.push(format!("abort {to} {workload}"));
        self.staged.remove(workload);
        if let Some(i) = self.instances.get_mut(&to)
            && i.workloads.get(workload).is_some_and(|w| w.pending_commit)
        {
            i.workloads.remove(workload);
        }
    }

    fn disconnect(&mut self, _release: Option<&Resources>) {
        self.calls.push("disconnect".into());
        // The receivers stop every uncommitted copy.
        for i in self.instances.values_mut() {
            i.workloads.retain(|_, w| !w.pending_commit);
        }
    }

    fn resize(&mut self, id: InstanceId, resources: &Resources) -> Result<(), PlatformError> {
        self.call("resize", id, "")?;
        self.inst(id)?.resources = resources.clone();
        Ok(())
    }

    fn start_workload(
        &mut self,
        id: InstanceId,
        spec: &WorkloadSpec,
    ) -> Result<WorkloadInfo, PlatformError> {
        self.call("start", id, &spec.name)?;
        let w = self.fresh();
        let info = WorkloadInfo {
            name: spec.name.clone(),
            pid: w.pid,
            frozen: false,
            pending_commit: false,
            ..WorkloadInfo::default()
        };
        self.inst(id)?.workloads.insert(spec.name.clone(), w);
        Ok(info)
    }

    fn freeze(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError> {
        self.call("freeze", id, workload)?;
        if self.grow_at_freeze {
            for ((w, _), fd) in &self.memfds {
                if w == workload {
                    let size = nix::sys::stat::fstat(fd.as_fd())
                        .map_err(|e| PlatformError::io("fake memfd", e.into()))?
                        .st_size;
                    nix::unistd::ftruncate(fd, size + 4096)
                        .map_err(|e| PlatformError::io("fake memfd", e.into()))?;
                }
            }
        }
        self.workload(id, workload)?.frozen = true;
        Ok(())
    }

    fn thaw(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError> {
        self.call("thaw", id, workload)?;
        self.workload(id, workload)?.frozen = false;
        Ok(())
    }

    fn health(&mut self, id: InstanceId, workload: &str) -> Result<(bool, String), PlatformError> {
        self.call("health", id, workload)?;
        self.workload(id, workload)?;
        Ok(if id != 1 && self.sick.contains(workload) {
            (false, "health check failed: injected".to_owned())
        } else {
            (true, "healthy".to_owned())
        })
    }

    fn preserved_fds(
        &mut self,
        id: InstanceId,
        workload: &str,
    ) -> Result<Vec<PreservedFd>, PlatformError> {
        self.call("fds", id, workload)?;
        self.workload(id, workload)?;
        let spec =
            self.specs
                .get(workload)
                .cloned()
                .ok_or_else(|| PlatformError::NoSuchWorkload {
                    instance: id,
                    workload: workload.to_owned(),
                })?;
        spec.memfds
            .iter()
            .map(|m| {
                let fd = if self.stable_fds {
                    let key = (workload.to_owned(), m.name.clone());
                    if !self.memfds.contains_key(&key) {
                        let fd = nix::sys::memfd::memfd_create(
                            m.name.as_str(),
                            nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
                        )
                        .map_err(|e| PlatformError::io("fake memfd", e.into()))?;
                        self.memfds.insert(key.clone(), fd);
                    }
                    self.memfds[&key].try_clone()
                } else {
                    crate::handover::sealed_memfd(&m.name, b"fake state")
                }
                .map_err(|e| PlatformError::io("fake memfd", e))?;
                Ok(PreservedFd {
                    name: m.name.clone(),
                    fd,
                })
            })
            .collect()
    }

    fn stop_workload(&mut self, id: InstanceId, workload: &str) -> Result<(), PlatformError> {
        self.call("stop", id, workload)?;
        self.inst(id)?.workloads.remove(workload);
        Ok(())
    }

    fn halt(&mut self, id: InstanceId) -> Result<(), PlatformError> {
        self.call("halt", id, "")?;
        // (A crashed instance is halted too: what it left is gone.)
        let i = self.inst(id)?;
        i.workloads.clear();
        i.state = InstanceState::Loaded;
        Ok(())
    }

    fn transfer_resources(
        &mut self,
        from: InstanceId,
        to: InstanceId,
    ) -> Result<Resources, PlatformError> {
        self.call("transfer", from, "")?;
        let moved = std::mem::take(&mut self.inst(from)?.resources);
        let t = self.inst(to)?;
        t.resources.cpus.extend(&moved.cpus);
        t.resources.cpus.sort_unstable();
        t.resources.memory_bytes += moved.memory_bytes;
        Ok(moved)
    }

    fn destroy(&mut self, id: InstanceId) -> Result<(), PlatformError> {
        self.call("destroy", id, "")?;
        self.instances.remove(&id);
        Ok(())
    }

    fn claim(&mut self, workload: &str) -> Result<Claimed, PlatformError> {
        let here = self.active().first().copied().unwrap_or(0);
        self.call("claim", here, workload)?;
        if !self.staged.remove(workload) {
            return Err(PlatformError::NoSuchWorkload {
                instance: here,
                workload: workload.to_owned(),
            });
        }
        let w = self.fresh();
        self.inst(here)?.workloads.insert(workload.to_owned(), w);
        if self.unhealthy.contains(workload) {
            return Err(PlatformError::Unhealthy {
                workload: workload.to_owned(),
                instance: here,
                detail: "unhealthy by the test".into(),
            });
        }
        Ok(Claimed {
            blackout_us: 1000,
            handover_us: 500,
            bytes: 10,
            verify_ms: 0.1,
            start_ms: 0.1,
            health_ms: 0.1,
            // As a kexec claim's are.
            blackout_lower_bound: true,
            adopted: false,
        })
    }

    fn return_to_previous(&mut self, record: &UpgradeRecord) -> Result<(), PlatformError> {
        let here = self.active().first().copied().unwrap_or(0);
        self.call("return", here, "")?;
        // Everything started here stops; every workload's state goes back.
        self.instances.remove(&here);
        self.staged = record.workloads.iter().map(|w| w.name.clone()).collect();
        self.instances.insert(
            record.old_instance,
            FakeInstance {
                state: InstanceState::Active,
                resources: Resources::default(),
                release: Some(record.kernel_before.clone()),
                workloads: BTreeMap::new(),
            },
        );
        self.carried = Some(record.clone());
        Ok(())
    }

    fn handed_over(&mut self) -> Option<UpgradeRecord> {
        self.carried.take()
    }

    fn confirm(&mut self) -> Result<(), PlatformError> {
        self.call("confirm", 0, "")?;
        self.confirmed = true;
        Ok(())
    }
}

/// What a receiver checking by identity would refuse in `out`: an identity entry of the
/// image that does not describe the memfd sent with that token (device, inode, size,
/// seals). `None` when the image has no identities or all match.
fn stale_identity(out: &Outgoing) -> Option<String> {
    let bytes = match crate::handover::read_all(out.image.as_fd(), out.offer.image_len) {
        Ok(b) => b,
        Err(e) => return Some(format!("reading the image: {e}")),
    };
    let view = match kho_proto::image::ImageView::parse(&bytes) {
        Ok(v) => v,
        Err(e) => return Some(format!("the image does not parse: {e}")),
    };
    let ids = match crate::handover::image_identities(&view) {
        Ok(ids) => ids,
        Err(e) => return Some(e.to_string()),
    };
    for id in ids {
        let Some(p) = usize::try_from(id.token)
            .ok()
            .and_then(|t| t.checked_sub(1))
            .and_then(|i| out.fds.get(i))
        else {
            return Some(format!("token {} names no fd", id.token));
        };
        if crate::handover::identity_of(id.token, p.fd.as_fd()).ok()? != id {
            return Some(format!("{}: the image describes another object", p.name));
        }
    }
    None
}
