//! The state machine on the fake platform: every transition, every failure point, and
//! recovery from each, without a process, a socket or a kernel.

use std::cell::Cell;
use std::path::Path;
use std::time::{Duration, Instant};

use kho_proto::keys::NodeKey;

use super::*;
use crate::platform::fake::FakePlatform;
use crate::record::{MoveStatus, Outcome, Phase, UpgradeKind};
use crate::workload::{WorkloadFile, WorkloadSpec};

/// A clock that advances 1 ms per reading, ids from a counter, task state from the
/// state-serializers fixture tree (whose process holds listening sockets, 127.0.0.1:8080 at
/// fd 4 and /run/app.sock at fd 5: kept only as `sockets` says; the fake workloads hold none).
struct FakeEnv {
    t0: Instant,
    ticks: Cell<u64>,
    ids: Cell<u8>,
    sockets: Sockets,
    boot_id: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Sockets {
    None,
    All,
    TcpOnly,
}

impl FakeEnv {
    fn new() -> Self {
        FakeEnv {
            t0: Instant::now(),
            ticks: Cell::new(0),
            ids: Cell::new(0),
            sockets: Sockets::None,
            boot_id: None,
        }
    }
}

impl Env for FakeEnv {
    fn wall_ms(&self) -> u64 {
        1_800_000_000_000 + self.ticks.get()
    }
    fn now(&self) -> Instant {
        self.ticks.set(self.ticks.get() + 1);
        self.t0 + Duration::from_millis(self.ticks.get())
    }
    fn random_id(&self) -> [u8; 16] {
        self.ids.set(self.ids.get() + 1);
        [self.ids.get(); 16]
    }
    fn boot_id(&self) -> Option<String> {
        self.boot_id.clone()
    }
    fn capture_task(
        &self,
        _pid: i32,
    ) -> Result<state_serializers::task::TaskState, state_serializers::StateError> {
        let root =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../state-serializers/tests/fixtures/root");
        let mut t = state_serializers::task::capture_tasks(
            &root,
            &[4242],
            &state_serializers::task::CaptureOptions::default(),
        )?;
        for task in &mut t.tasks {
            task.fds.retain(|f| match &f.kind {
                state_serializers::task::FdKind::ListeningSocket { proto, .. } => {
                    match self.sockets {
                        Sockets::None => false,
                        Sockets::All => true,
                        Sockets::TcpOnly => {
                            matches!(proto, state_serializers::task::SocketProto::Tcp)
                        }
                    }
                }
                _ => true,
            });
        }
        Ok(t)
    }
}

fn specs() -> WorkloadFile {
    let text = r#"
[[workload]]
name = "kv-1"
exec = "/bin/true"
[[workload.memfd]]
name = "data"
size = 0

[[workload]]
name = "kv-2"
exec = "/bin/true"
[[workload.memfd]]
name = "data"
size = 0
"#;
    WorkloadFile::parse(text, Path::new("w.toml")).unwrap()
}

struct World {
    dir: tempfile::TempDir,
    key: NodeKey,
    env: FakeEnv,
    specs: WorkloadFile,
}

impl World {
    fn new() -> Self {
        World {
            dir: tempfile::tempdir().unwrap(),
            key: NodeKey::generate().unwrap(),
            env: FakeEnv::new(),
            specs: specs(),
        }
    }

    fn platform(&self, replace: bool) -> FakePlatform {
        let ws: Vec<WorkloadSpec> = self.specs.workloads.clone();
        FakePlatform::new(replace, vec![0, 1, 2, 3], "7.2.13-mkA", &ws)
    }

    fn setup(&self) -> Setup<'_> {
        Setup {
            journal: rollback::Journal::open(self.dir.path()).unwrap(),
            specs: self.specs.clone(),
            node_key: NodeKey::load(&self.key_path()).unwrap(),
            faults: Faults::NONE,
            observer: &Quiet,
            env: &self.env,
            promotion: None,
            events: Some(crate::events::EventLog::new(self.dir.path())),
            metrics: Some(crate::metrics::Metrics::new(self.dir.path())),
        }
    }

    fn key_path(&self) -> std::path::PathBuf {
        let p = self.dir.path().join("node.key");
        if !p.exists() {
            self.key.save(self.dir.path(), "node").unwrap();
        }
        p
    }

    fn in_flight(&self) -> Option<UpgradeRecord> {
        rollback::Journal::<UpgradeRecord>::open(self.dir.path())
            .unwrap()
            .current()
            .unwrap()
    }

    fn history(&self) -> Vec<UpgradeRecord> {
        rollback::Journal::<UpgradeRecord>::open(self.dir.path())
            .unwrap()
            .history()
            .unwrap()
    }
}

fn kernel_memfd() -> std::os::fd::OwnedFd {
    crate::handover::sealed_memfd("k", b"kernel B").unwrap()
}

fn upgrade(
    w: &World,
    p: &mut FakePlatform,
) -> Result<(UpgradeRecord, Result<(), UpgradeError>), UpgradeError> {
    upgrade_with(p, w.setup())
}

/// An upgrade to kernel B with `setup`: the finished record and how the run ended.
fn upgrade_with(
    p: &mut FakePlatform,
    setup: Setup<'_>,
) -> Result<(UpgradeRecord, Result<(), UpgradeError>), UpgradeError> {
    let fd = kernel_memfd();
    let kernel = LoadableKernel {
        image: std::os::fd::AsFd::as_fd(&fd),
        release: "7.2.13-mkB".into(),
        sha256: [7; 32],
        initrd: None,
        cmdline: "",
    };
    let mut o = Orchestrator::begin(p, setup, UpgradeKind::Apply, "7.2.13-mkB", [7; 32])?;
    let r = o.run(&kernel);
    Ok((o.record.clone(), r))
}

/// Where each workload runs, and in which state: (instance, frozen, pending).
fn placement(p: &FakePlatform, name: &str) -> Vec<(u16, bool, bool)> {
    p.instances
        .iter()
        .filter(|(_, i)| i.state == InstanceState::Active)
        .filter_map(|(id, i)| {
            i.workloads
                .get(name)
                .map(|w| (*id, w.frozen, w.pending_commit))
        })
        .collect()
}

/// Every workload runs exactly once, thawed and committed, on the single active instance
/// that runs `release`.
fn assert_settled(p: &FakePlatform, release: &str, ctx: &str) {
    let active = p.active();
    assert_eq!(active.len(), 1, "{ctx}: active instances {active:?}");
    let inst = &p.instances[&active[0]];
    assert_eq!(inst.release.as_deref(), Some(release), "{ctx}");
    for name in ["kv-1", "kv-2"] {
        assert_eq!(
            placement(p, name),
            vec![(active[0], false, false)],
            "{ctx}: {name}"
        );
    }
}

#[test]
fn side_by_side_upgrade_moves_every_workload_and_hands_over() {
    let w = World::new();
    let mut p = w.platform(false);
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    r.unwrap();
    assert_eq!(rec.outcome, Some(Outcome::Upgraded));
    assert_eq!(rec.phase, Phase::Done);
    assert!(
        rec.workloads
            .iter()
            .all(|m| m.status == MoveStatus::Committed)
    );
    assert!(rec.workloads.iter().all(|m| m.blackout_us.is_some()));
    assert_settled(&p, "7.2.13-mkB", "after the upgrade");
    // The new instance took every cpu of the old one.
    assert_eq!(p.instances[&2].resources.cpus, vec![0, 1, 2, 3]);
    assert!(!p.instances.contains_key(&1));
    // Each move: prepare before freeze, freeze before deliver, commit before the old
    // copy is stopped.
    let pos = |c: &str| {
        p.calls
            .iter()
            .position(|x| x == c)
            .unwrap_or_else(|| panic!("no call {c:?} in {:?}", p.calls))
    };
    for name in ["kv-1", "kv-2"] {
        assert!(pos(&format!("prepare 2 {name}")) < pos(&format!("freeze 1 {name}")));
        assert!(pos(&format!("freeze 1 {name}")) < pos(&format!("deliver 2 {name}")));
        assert!(pos(&format!("commit 2 {name}")) < pos(&format!("stop 1 {name}")));
    }
    assert!(w.in_flight().is_none());
    assert_eq!(w.history().len(), 1);
}

#[test]
fn every_journal_step_move_and_result_reaches_the_event_log() {
    let w = World::new();
    let mut p = w.platform(false);
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    r.unwrap();
    let events = crate::events::EventLog::new(w.dir.path()).read(0).unwrap();
    assert!(events.iter().all(|e| e.upgrade_id == rec.upgrade_id));
    // One "phase" line per journaled step, in the record's order.
    let journaled: Vec<String> = rec
        .events
        .iter()
        .filter_map(|e| e.journaled.map(|p| kebab(&p)))
        .collect();
    let phases: Vec<String> = events
        .iter()
        .filter(|e| e.kind == "phase")
        .filter_map(|e| e.phase.clone())
        .collect();
    assert_eq!(phases, journaled);
    for m in &rec.workloads {
        assert!(
            events.iter().any(|e| e.kind == "workload"
                && e.workload.as_deref() == Some(m.name.as_str())
                && e.status.as_deref() == Some("committed")),
            "{} committed: {events:?}",
            m.name
        );
    }
    let last = events.last().unwrap();
    assert_eq!(
        (last.kind.as_str(), last.result.as_deref()),
        ("result", Some("upgraded"))
    );
}

#[test]
fn no_event_line_is_written_while_a_workload_is_frozen() {
    let w = World::new();
    let mut p = w.platform(false);
    let path = w.dir.path().join(crate::events::EVENTS_FILE);
    p.watch_at_deliver = Some(path.clone());
    let (_, r) = upgrade(&w, &mut p).unwrap();
    r.unwrap();
    let events = crate::events::EventLog::new(w.dir.path()).read(0).unwrap();
    for (name, lines) in &p.lines_at_deliver {
        // Everything up to the freeze step was written; what came after it ("offered",
        // the offer note) was held until the move ended.
        let upto_freeze = events
            .iter()
            .position(|e| e.what == format!("{name}: freeze on instance 1"))
            .unwrap();
        assert_eq!(*lines, upto_freeze + 1, "{name}: lines at deliver");
        let offered = events
            .iter()
            .position(|e| {
                e.workload.as_deref() == Some(name.as_str())
                    && e.status.as_deref() == Some("offered")
            })
            .unwrap();
        assert!(
            offered > upto_freeze,
            "{name}: offered is written, after the freeze"
        );
    }
    assert_eq!(p.lines_at_deliver.len(), 2);
}

#[test]
fn replace_upgrade_stages_boots_and_claims() {
    let w = World::new();
    let mut p = w.platform(true);
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    r.unwrap();
    assert_eq!(rec.outcome, Some(Outcome::Upgraded));
    assert!(p.confirmed, "the boot was not confirmed");
    assert_settled(&p, "7.2.13-mkB", "after the kexec");
    // The kernel was loaded before the first freeze (outside every blackout), every
    // workload staged before the boot.
    let pos = |c: &str| p.calls.iter().position(|x| x == c).unwrap();
    assert!(pos("load 2") < pos("freeze 1 kv-1"), "{:?}", p.calls);
    assert!(pos("deliver 2 kv-2") < pos("boot 2"));
    assert!(pos("boot 2") < pos("claim 2 kv-1"));
    // The record the boot carried names the kexec step.
    assert_eq!(
        p.calls.iter().filter(|c| c.starts_with("commit")).count(),
        0
    );
    // A blackout across the kexec is reported as the lower bound the claim measured.
    let report = rec.report_json();
    for w in report["workloads"].as_array().unwrap() {
        assert_eq!(w["blackout_ms"], 1.0, "{w}");
        assert_eq!(w["blackout_lower_bound"], true, "{w}");
    }
}

#[test]
fn a_side_by_side_blackout_is_on_one_clock_not_a_lower_bound() {
    let w = World::new();
    let mut p = w.platform(false);
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    r.unwrap();
    for m in &rec.workloads {
        assert!(m.blackout_us.is_some(), "{m:?}");
        assert!(!m.blackout_lower_bound, "{m:?}");
    }
    assert_eq!(
        rec.report_json()["workloads"][0]["blackout_lower_bound"],
        false
    );
}

#[test]
fn an_unhealthy_copy_rolls_back_everything_side_by_side() {
    let w = World::new();
    let mut p = w.platform(false);
    p.unhealthy.insert("kv-2".into());
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    assert!(matches!(r, Err(UpgradeError::RolledBack { .. })), "{r:?}");
    assert_eq!(rec.outcome, Some(Outcome::RolledBack));
    assert_settled(&p, "7.2.13-mkA", "after the rollback");
    let st: Vec<MoveStatus> = rec.workloads.iter().map(|m| m.status).collect();
    assert_eq!(st, vec![MoveStatus::MovedBack, MoveStatus::Aborted]);
    assert_eq!(p.instances[&1].resources.cpus, vec![0, 1, 2, 3]);
}

#[test]
fn a_refused_handover_rolls_back_before_anything_moved() {
    let w = World::new();
    let mut p = w.platform(false);
    p.refused.insert("kv-1".into());
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    assert!(matches!(r, Err(UpgradeError::RolledBack { .. })), "{r:?}");
    assert!(
        rec.error
            .as_deref()
            .unwrap_or("")
            .contains("refused by the test")
    );
    assert_settled(&p, "7.2.13-mkA", "after the rollback");
}

#[test]
fn replace_failure_that_persists_on_the_way_back_needs_an_operator() {
    let w = World::new();
    let mut p = w.platform(true);
    // kv-2 is unhealthy in both kernels: the upgrade returns to A, kv-1 serves there, and
    // the record says kv-2 needs an operator (never "rolled back").
    p.unhealthy.insert("kv-2".into());
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    assert!(matches!(r, Err(UpgradeError::Failed(_))), "{r:?}");
    assert_eq!(rec.outcome, Some(Outcome::Failed));
    assert_eq!(p.count("return"), 1, "{:?}", p.calls);
    assert!(!p.confirmed);
    assert_eq!(p.active(), vec![1]);
    assert_eq!(placement(&p, "kv-1"), vec![(1, false, false)]);
    let kv2 = rec.workloads.iter().find(|m| m.name == "kv-2").unwrap();
    assert_eq!(kv2.status, MoveStatus::Aborted);
    assert!(
        rec.error
            .as_deref()
            .unwrap_or("")
            .contains("restart failed")
    );
}

#[test]
fn replace_return_restarts_every_workload_on_the_previous_kernel() {
    let w = World::new();
    let mut p = w.platform(true);
    // kv-2 fails verification in the new kernel only: the fake refuses it at claim time by
    // failing the second claim call.
    p.fail_op = Some(("claim", 2));
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    assert!(matches!(r, Err(UpgradeError::RolledBack { .. })), "{r:?}");
    assert_eq!(rec.outcome, Some(Outcome::RolledBack));
    assert_settled(&p, "7.2.13-mkA", "after the way back");
    assert!(
        rec.workloads
            .iter()
            .all(|m| m.status == MoveStatus::MovedBack)
    );
}

#[test]
fn replace_staging_failure_unwinds_without_booting() {
    let w = World::new();
    let mut p = w.platform(true);
    p.refused.insert("kv-2".into());
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    assert!(matches!(r, Err(UpgradeError::RolledBack { .. })), "{r:?}");
    assert_eq!(p.count("boot"), 0);
    // Loaded before the first freeze; the unwinding removes it with the new instance.
    assert_eq!(p.count("load"), 1);
    assert_eq!(p.count("destroy"), 1, "{:?}", p.calls);
    assert!(!p.instances.contains_key(&2), "the loaded instance is left");
    assert!(p.staged.is_empty(), "staged state left: {:?}", p.staged);
    assert_settled(&p, "7.2.13-mkA", "after unwinding");
    assert_eq!(rec.outcome, Some(Outcome::RolledBack));
}

#[test]
fn a_failed_journal_write_at_the_freeze_step_undoes_what_was_prepared() {
    let w = World::new();
    let mut p = w.platform(false);
    // The journal appends its steps to `journal.log`: a directory there fails the write
    // of the step that would freeze kv-1, after `prepare` announced the move.
    p.block_at_prepare = Some(w.dir.path().join("journal.log"));
    let r = upgrade(&w, &mut p).map(|(_, r)| r);
    assert!(matches!(r, Err(_) | Ok(Err(_))), "{r:?}");
    let pos = |c: &str| p.calls.iter().position(|x| x.starts_with(c));
    let prepared = pos("prepare").expect("prepared");
    let aborted = pos("abort").unwrap_or_else(|| panic!("not aborted: {:?}", p.calls));
    assert!(prepared < aborted, "{:?}", p.calls);
    assert_eq!(p.count("freeze"), 0, "nothing was frozen: {:?}", p.calls);
    assert_eq!(p.count("deliver"), 0, "{:?}", p.calls);
}

#[test]
fn replace_load_failure_rolls_back_before_any_freeze() {
    let w = World::new();
    let mut p = w.platform(true);
    p.fail_op = Some(("load", 1));
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    assert!(matches!(r, Err(UpgradeError::RolledBack { .. })), "{r:?}");
    assert!(
        rec.error.as_deref().unwrap_or("").contains("loading"),
        "{:?}",
        rec.error
    );
    assert_eq!(p.count("freeze"), 0, "{:?}", p.calls);
    assert_eq!(p.count("deliver"), 0);
    assert_eq!(p.count("boot"), 0);
    assert!(
        rec.workloads
            .iter()
            .all(|m| m.status == MoveStatus::Pending),
        "{:?}",
        rec.workloads
    );
    assert_settled(&p, "7.2.13-mkA", "after a failed load");
}

#[test]
fn slot_promotion_is_a_journaled_step_of_the_upgrade() {
    let w = World::new();
    let mut p = w.platform(false);
    let mut slots = rollback::Slots::open(w.dir.path()).unwrap();
    let sha = |b: &[u8]| -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(b).into()
    };
    slots
        .store(rollback::Slot::Current, b"A", "7.2.13-mkA", &sha(b"A"))
        .unwrap();
    slots
        .store(rollback::Slot::Candidate, b"B", "7.2.13-mkB", &sha(b"B"))
        .unwrap();
    let mut setup = w.setup();
    setup.promotion = Some(Promotion {
        slots,
        floor: Some("7.2.13".into()),
    });
    let (rec, r) = upgrade_with(&mut p, setup).unwrap();
    r.unwrap();
    assert!(
        rec.events
            .iter()
            .any(|e| e.what.contains("kernel slots: 7.2.13-mkB becomes current")),
        "{:?}",
        rec.events
    );
    let slots = rollback::Slots::open(w.dir.path()).unwrap();
    assert_eq!(
        slots
            .peek(rollback::Slot::Current)
            .unwrap()
            .unwrap()
            .release,
        "7.2.13-mkB"
    );
    assert_eq!(
        slots
            .peek(rollback::Slot::Previous)
            .unwrap()
            .unwrap()
            .release,
        "7.2.13-mkA"
    );
    assert_eq!(slots.floor().unwrap().as_deref(), Some("7.2.13"));
    // The floor travels in the record, so whoever finishes the upgrade raises it.
    assert_eq!(w.history()[0].version_floor.as_deref(), Some("7.2.13"));
}

#[test]
fn the_kernel_that_finishes_a_replace_upgrade_raises_the_floor() {
    let w = World::new();
    let mut p = w.platform(true);
    let mut setup = w.setup();
    setup.promotion = Some(Promotion {
        slots: rollback::Slots::open(w.dir.path()).unwrap(),
        floor: Some("7.2.13".into()),
    });
    let (rec, r) = upgrade_with(&mut p, setup).unwrap();
    r.unwrap();
    assert!(
        rec.events
            .iter()
            .any(|e| e.what.contains("version floor raised to 7.2.13")),
        "{:?}",
        rec.events
    );
    let slots = rollback::Slots::open(w.dir.path()).unwrap();
    assert_eq!(slots.floor().unwrap().as_deref(), Some("7.2.13"));
}

#[test]
fn a_workload_not_in_the_file_is_refused_before_anything_is_journaled() {
    let mut w = World::new();
    let mut p = w.platform(false);
    w.specs.workloads.remove(1);
    let e = upgrade(&w, &mut p).unwrap_err();
    assert!(matches!(e, UpgradeError::Refused(_)), "{e}");
    assert!(w.in_flight().is_none());
    assert!(w.history().is_empty());
    assert_settled(&p, "7.2.13-mkA", "nothing changed");
}

#[test]
fn the_old_instance_dying_mid_move_converges_on_the_new_one() {
    let w = World::new();
    let mut p = w.platform(false);
    // kv-1 has moved; instance 1 dies as kv-2 is frozen.
    p.crash_on = Some(("freeze", 2, 1));
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    assert!(matches!(r, Err(UpgradeError::Failed(_))), "{r:?}");
    assert_eq!(rec.outcome, Some(Outcome::Failed));
    // Nothing frozen, nothing twice, everything on instance 2, instance 1 gone.
    assert_eq!(p.active(), vec![2]);
    assert!(!p.instances.contains_key(&1));
    for name in ["kv-1", "kv-2"] {
        assert_eq!(placement(&p, name), vec![(2, false, false)], "{name}");
    }
    let kv1 = rec.workloads.iter().find(|m| m.name == "kv-1").unwrap();
    assert_eq!(kv1.status, MoveStatus::Committed);
    let kv2 = rec.workloads.iter().find(|m| m.name == "kv-2").unwrap();
    assert!(
        kv2.detail
            .as_deref()
            .unwrap_or("")
            .contains("lost when that instance died"),
        "{kv2:?}"
    );
    assert!(w.in_flight().is_none());
}

#[test]
fn the_new_instance_dying_mid_upgrade_converges_on_the_old_one() {
    let w = World::new();
    let mut p = w.platform(false);
    // kv-1 moved to instance 2; instance 2 dies as kv-2 is delivered.
    p.crash_on = Some(("deliver", 2, 2));
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    assert!(matches!(r, Err(UpgradeError::Failed(_))), "{r:?}");
    assert_eq!(rec.outcome, Some(Outcome::Failed));
    assert_eq!(p.active(), vec![1]);
    assert!(!p.instances.contains_key(&2));
    for name in ["kv-1", "kv-2"] {
        assert_eq!(placement(&p, name), vec![(1, false, false)], "{name}");
    }
    // kv-1's only copy was on instance 2: restarted, and the record says its state is lost.
    let kv1 = rec.workloads.iter().find(|m| m.name == "kv-1").unwrap();
    assert!(
        kv1.detail
            .as_deref()
            .unwrap_or("")
            .contains("lost when that instance died"),
        "{kv1:?}"
    );
    assert_eq!(p.instances[&1].resources.cpus, vec![0, 1, 2, 3]);
}

#[test]
fn the_new_instance_dying_before_anything_moved_rolls_back() {
    let w = World::new();
    let mut p = w.platform(false);
    p.crash_on = Some(("deliver", 1, 2));
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    assert!(matches!(r, Err(UpgradeError::RolledBack { .. })), "{r:?}");
    assert_eq!(rec.outcome, Some(Outcome::RolledBack));
    assert_settled(&p, "7.2.13-mkA", "after the new instance died");
}

#[test]
fn the_old_instance_dying_after_every_move_still_ends_upgraded() {
    let w = World::new();
    let mut p = w.platform(false);
    // Both workloads committed on instance 2; instance 1 dies as its last copy is stopped.
    p.crash_on = Some(("stop", 2, 1));
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    r.unwrap();
    assert_eq!(rec.outcome, Some(Outcome::Upgraded));
    assert_settled(&p, "7.2.13-mkB", "after the old instance died");
}

#[test]
fn recovery_finds_the_old_instance_dead_and_converges_forward() {
    // The orchestrator and instance 1 both died mid-upgrade: the journal says kv-1 moved
    // and kv-2 was being frozen; instance 1 shows failed with nothing on it, instance 2
    // runs kv-1.
    let w = World::new();
    let mut p = w.platform(false);
    let mut rec: UpgradeRecord = serde_json::from_value(serde_json::json!({
        "upgrade_id": "07".repeat(16), "kind": "apply", "platform": "emulated",
        "started_at": 0, "kernel_before": "7.2.13-mkA", "kernel_after": "7.2.13-mkB",
        "image_sha256": "", "old_instance": 1,
        "old_resources": {"cpus": [0, 1, 2, 3], "memory_bytes": 1073741824},
        "new_instance": 2, "phase": "migrating",
        "workloads": [
            {"name": "kv-1", "status": "committed", "blackout_us": 5, "detail": null},
            {"name": "kv-2", "status": "freezing", "blackout_us": null, "detail": null}
        ],
        "events": [], "outcome": null, "error": null
    }))
    .unwrap();
    rec.events.push(crate::record::Event {
        t_ms: 1,
        what: "kv-2: freeze on instance 1".into(),
        journaled: Some(Phase::Migrating),
    });
    rollback::Journal::<UpgradeRecord>::open(w.dir.path())
        .unwrap()
        .write(&rec)
        .unwrap();
    let i1 = p.instances.get_mut(&1).unwrap();
    i1.state = InstanceState::Failed;
    i1.workloads.clear();
    i1.resources.cpus = vec![0, 1];
    let id = p
        .create_instance(&Resources {
            cpus: vec![2, 3],
            memory_bytes: 0,
        })
        .unwrap();
    assert_eq!(id, 2);
    p.instances.get_mut(&2).unwrap().state = InstanceState::Active;
    p.start_workload(2, &w.specs.workloads[0]).unwrap();
    p.calls.clear();

    let done = recover(&mut p, w.setup()).unwrap().expect("a record");
    assert!(w.in_flight().is_none());
    assert_eq!(done.outcome, Some(Outcome::Failed), "{:?}", done.error);
    assert!(done.recovered);
    assert!(
        done.error.as_deref().unwrap_or("").contains("kv-2"),
        "{:?}",
        done.error
    );
    // Converged: instance 1 removed, its cpus given to 2, both workloads serve there.
    assert_eq!(p.active(), vec![2], "{:?}", p.calls);
    assert!(!p.instances.contains_key(&1));
    assert_eq!(p.instances[&2].resources.cpus, vec![0, 1, 2, 3]);
    for name in ["kv-1", "kv-2"] {
        assert_eq!(placement(&p, name), vec![(2, false, false)], "{name}");
    }
}

/// A replace (LUO) upgrade whose agent died before the kexec, as its restarted agent finds
/// it: the journal's record (begun in boot `boot`), the workloads still on instance 1 (the
/// agent adopted and thawed them before recovery).
fn replace_record_of_a_dead_agent(w: &World, boot: &str) {
    let rec: UpgradeRecord = serde_json::from_value(serde_json::json!({
        "upgrade_id": "09".repeat(16), "kind": "apply", "platform": "luo",
        "started_at": 0, "kernel_before": "7.2.13-mkA", "kernel_after": "7.2.13-mkB",
        "image_sha256": "", "old_instance": 1,
        "old_resources": {"cpus": [0, 1, 2, 3], "memory_bytes": 0},
        "new_instance": 2, "phase": "booted",
        "workloads": [
            {"name": "kv-1", "status": "offered", "blackout_us": null, "detail": null},
            {"name": "kv-2", "status": "offered", "blackout_us": null, "detail": null}
        ],
        "events": [{"t_ms": 1, "what": "booting 7.2.13-mkB (kexec)", "journaled": "booted"}],
        "outcome": null, "error": null, "boot_id": boot
    }))
    .unwrap();
    rollback::Journal::<UpgradeRecord>::open(w.dir.path())
        .unwrap()
        .write(&rec)
        .unwrap();
}

#[test]
fn recovery_in_the_same_boot_verifies_the_adopted_workloads_before_rolled_back() {
    let boot = "0f8e3c2a-5b7d-4e1f-9a6c-3d2b1e0f4a5b";
    // Same boot, everything healthy: rolled back (the kexec step was journaled, but the
    // kexec never happened).
    let mut w = World::new();
    w.env.boot_id = Some(boot.into());
    let mut p = w.platform(true);
    replace_record_of_a_dead_agent(&w, boot);
    let done = recover(&mut p, w.setup()).unwrap().expect("a record");
    assert_eq!(done.outcome, Some(Outcome::RolledBack), "{:?}", done.error);
    assert!(done.recovered);
    assert!(
        done.error
            .as_deref()
            .unwrap_or("")
            .contains("no kexec happened"),
        "{:?}",
        done.error
    );
    assert!(w.in_flight().is_none());
    // Same boot, one workload not running (it died with the agent's restart): not
    // "rolled back".
    let mut w = World::new();
    w.env.boot_id = Some(boot.into());
    let mut p = w.platform(true);
    p.exited.insert("kv-2".into());
    replace_record_of_a_dead_agent(&w, boot);
    let done = recover(&mut p, w.setup()).unwrap().expect("a record");
    assert_eq!(done.outcome, Some(Outcome::Failed), "{:?}", done.error);
    assert!(
        done.error.as_deref().unwrap_or("").contains("kv-2"),
        "{:?}",
        done.error
    );
    // Another boot (a cold boot after the kexec step): failed, as before.
    let mut w = World::new();
    w.env.boot_id = Some("another-boot".into());
    let mut p = w.platform(true);
    replace_record_of_a_dead_agent(&w, boot);
    let done = recover(&mut p, w.setup()).unwrap().expect("a record");
    assert_eq!(done.outcome, Some(Outcome::Failed), "{:?}", done.error);
    assert!(
        done.error
            .as_deref()
            .unwrap_or("")
            .contains("did not come up"),
        "{:?}",
        done.error
    );
}

#[test]
fn recovery_boots_the_new_kernel_again_when_it_died_while_handing_over() {
    // Every workload had moved, the old instance was halted and gave its cpus away, then
    // the orchestrator and the new instance both died.
    let w = World::new();
    let mut p = w.platform(false);
    let mut rec: UpgradeRecord = serde_json::from_value(serde_json::json!({
        "upgrade_id": "08".repeat(16), "kind": "apply", "platform": "emulated",
        "started_at": 0, "kernel_before": "7.2.13-mkA", "kernel_after": "7.2.13-mkB",
        "image_sha256": "", "old_instance": 1,
        "old_resources": {"cpus": [0, 1, 2, 3], "memory_bytes": 1073741824},
        "new_instance": 2, "phase": "handing-over",
        "workloads": [
            {"name": "kv-1", "status": "committed", "blackout_us": 5, "detail": null},
            {"name": "kv-2", "status": "committed", "blackout_us": 5, "detail": null}
        ],
        "events": [], "outcome": null, "error": null
    }))
    .unwrap();
    rec.events.push(crate::record::Event {
        t_ms: 1,
        what: "every workload moved".into(),
        journaled: Some(Phase::HandingOver),
    });
    rollback::Journal::<UpgradeRecord>::open(w.dir.path())
        .unwrap()
        .write(&rec)
        .unwrap();
    let i1 = p.instances.get_mut(&1).unwrap();
    i1.state = InstanceState::Loaded;
    i1.workloads.clear();
    i1.resources.cpus.clear();
    p.create_instance(&Resources {
        cpus: vec![0, 1, 2, 3],
        memory_bytes: 0,
    })
    .unwrap();
    let i2 = p.instances.get_mut(&2).unwrap();
    i2.state = InstanceState::Failed;
    i2.release = Some("7.2.13-mkB".into());

    let done = recover(&mut p, w.setup()).unwrap().expect("a record");
    assert_eq!(done.outcome, Some(Outcome::Failed), "{:?}", done.error);
    assert!(w.in_flight().is_none());
    assert_eq!(p.active(), vec![2], "{:?}", p.calls);
    assert!(!p.instances.contains_key(&1));
    assert_eq!(p.instances[&2].resources.cpus, vec![0, 1, 2, 3]);
    for name in ["kv-1", "kv-2"] {
        assert_eq!(placement(&p, name), vec![(2, false, false)], "{name}");
    }
}

/// Fails every call of a whole upgrade in turn (the N-th platform call of the run), then
/// runs recovery on the same machine: the end state is always fully old or fully new, with
/// every workload running once, thawed and committed, and nothing left in flight.
fn every_failure_point(replace: bool) {
    let w = World::new();
    let mut p = w.platform(replace);
    upgrade(&w, &mut p).unwrap().1.unwrap();
    let total = p.calls.len();
    assert!(total > 20, "a whole upgrade made only {total} calls");
    for n in 1..=total {
        let w = World::new();
        let mut p = w.platform(replace);
        p.fail_call = Some(n);
        let ctx = format!("replace={replace} failing call {n}");
        let outcome = match upgrade(&w, &mut p) {
            Ok((rec, _)) => rec.outcome,
            Err(_) => None,
        };
        p.fail_call = None;
        // Recovery, as mk-agentd runs it at start (on replace platforms, a kexec that
        // happened is carried on by the next kernel, which the fake does in-process).
        let rec = recover(&mut p, w.setup()).unwrap_or_else(|e| panic!("{ctx}: recovery: {e}"));
        assert!(w.in_flight().is_none(), "{ctx}: still in flight");
        let last = rec.or_else(|| w.history().pop());
        let final_outcome = last.as_ref().and_then(|r| r.outcome).or(outcome);
        match final_outcome {
            Some(Outcome::Upgraded) => assert_settled(&p, "7.2.13-mkB", &ctx),
            Some(Outcome::RolledBack | Outcome::Refused) | None => {
                assert_settled(&p, "7.2.13-mkA", &ctx);
            }
            Some(Outcome::Failed) => {
                // Needs an operator: nothing may be left frozen or running twice.
                for name in ["kv-1", "kv-2"] {
                    let at = placement(&p, name);
                    assert!(at.len() <= 1, "{ctx}: {name} runs twice: {at:?}");
                    assert!(at.iter().all(|(_, f, _)| !f), "{ctx}: {name} left frozen");
                }
            }
        }
    }
}

#[test]
fn every_failure_point_side_by_side_converges() {
    every_failure_point(false);
}

#[test]
fn every_failure_point_replace_converges() {
    every_failure_point(true);
}

#[test]
fn an_undeclared_listening_socket_is_refused_before_anything_changes() {
    let mut w = World::new();
    w.env.sockets = Sockets::TcpOnly;
    for replace in [false, true] {
        let mut p = w.platform(replace);
        let e = upgrade(&w, &mut p).unwrap_err();
        let UpgradeError::Refused(msg) = &e else {
            panic!("{e:?}");
        };
        assert!(
            msg.contains("kv-1") && msg.contains("127.0.0.1:8080"),
            "{msg}"
        );
        assert!(msg.contains("[[workload.listen]]"), "{msg}");
        assert_eq!(p.active(), vec![1], "nothing changed");
        assert!(
            !p.calls.iter().any(|c| c.starts_with("freeze")),
            "{:?}",
            p.calls
        );
        assert!(w.in_flight().is_none());
    }
    // A Unix socket cannot be handed over at all.
    let mut w = World::new();
    w.env.sockets = Sockets::All;
    w.specs.workloads[0]
        .listeners
        .push(crate::workload::ListenSpec {
            name: "http".into(),
            addr: "127.0.0.1:8080".parse().unwrap(),
        });
    let mut p = w.platform(false);
    let e = upgrade(&w, &mut p).unwrap_err();
    assert!(e.to_string().contains("/run/app.sock"), "{e}");
    // Declared, it moves.
    let mut w = World::new();
    w.env.sockets = Sockets::TcpOnly;
    w.specs.workloads[0]
        .listeners
        .push(crate::workload::ListenSpec {
            name: "http".into(),
            addr: "127.0.0.1:8080".parse().unwrap(),
        });
    w.specs.workloads[1].mode = crate::workload::Mode::Restart;
    let mut p = w.platform(false);
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    r.unwrap();
    assert_eq!(rec.outcome, Some(Outcome::Upgraded));
    assert!(rec.workloads[1].closed_us.is_some(), "{rec:?}");
    assert!(rec.workloads[0].closed_us.is_none(), "{rec:?}");
}

#[test]
fn a_workload_that_is_not_running_is_refused() {
    let w = World::new();
    let mut p = w.platform(false);
    p.exited.insert("kv-2".into());
    let e = upgrade(&w, &mut p).unwrap_err();
    let UpgradeError::Refused(msg) = &e else {
        panic!("{e:?}");
    };
    assert!(msg.contains("kv-2 is exited"), "{msg}");
}

#[test]
fn a_workload_sick_in_the_final_check_rolls_back_side_by_side() {
    let w = World::new();
    let mut p = w.platform(false);
    p.sick.insert("kv-1".into());
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    assert!(matches!(r, Err(UpgradeError::RolledBack { .. })), "{r:?}");
    assert_eq!(rec.outcome, Some(Outcome::RolledBack));
    assert!(
        rec.error.as_deref().unwrap_or("").contains("final check"),
        "{rec:?}"
    );
    p.sick.clear();
    assert_settled(&p, "7.2.13-mkA", "after the rollback");
}

#[test]
fn a_workload_sick_in_the_final_check_returns_a_replace_upgrade() {
    let w = World::new();
    let mut p = w.platform(true);
    p.sick.insert("kv-2".into());
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    assert!(matches!(r, Err(UpgradeError::RolledBack { .. })), "{r:?}");
    assert_eq!(rec.outcome, Some(Outcome::RolledBack));
    assert!(!p.confirmed, "the new kernel was not confirmed");
    assert!(
        rec.error.as_deref().unwrap_or("").contains("final check"),
        "{rec:?}"
    );
}

#[test]
fn a_restart_mode_move_reports_its_closed_window_on_both_flows() {
    for replace in [false, true] {
        let mut w = World::new();
        w.specs.workloads[1].mode = crate::workload::Mode::Restart;
        let mut p = w.platform(replace);
        let (rec, r) = upgrade(&w, &mut p).unwrap();
        r.unwrap();
        let m = &rec.workloads[1];
        assert_eq!(m.mode, crate::workload::Mode::Restart);
        let (closed, stop, blackout) = (
            m.closed_us.expect("closed"),
            m.stop_us.expect("stop"),
            m.blackout_us.expect("blackout"),
        );
        assert!(blackout >= closed + stop, "replace={replace}: {m:?}");
        assert!(
            rec.workloads[0].closed_us.is_none(),
            "{:?}",
            rec.workloads[0]
        );
        let doc = rec.report_json();
        assert!(doc["workloads"][1]["closed_ms"].is_number(), "{doc}");
        assert_eq!(doc["workloads"][1]["mode"], "restart");
    }
}

/// A world whose workloads move by identity (the image can be built before the freeze).
fn by_identity() -> World {
    let mut w = World::new();
    for s in &mut w.specs.workloads {
        s.integrity = crate::workload::Integrity::Identity;
    }
    w
}

#[test]
fn an_image_built_before_the_freeze_is_used_only_for_the_same_objects() {
    // New memfds at every call (the descriptors taken at the freeze are other objects than
    // those the early image describes), the same ones, and the same ones grown just before
    // the freeze: each move must offer an image describing the fds it sends (the fake
    // target refuses any other, as a real one does), so each upgrade ends upgraded.
    for (stable, grow) in [(false, false), (true, false), (true, true)] {
        let w = by_identity();
        let mut p = w.platform(false);
        p.stable_fds = stable;
        p.grow_at_freeze = grow;
        let (rec, r) = upgrade(&w, &mut p).unwrap();
        r.unwrap_or_else(|e| panic!("stable {stable} grow {grow}: {e}"));
        assert_eq!(
            rec.outcome,
            Some(Outcome::Upgraded),
            "stable {stable} grow {grow}"
        );
        // The early image's fds were taken before the freeze, the move's after it.
        for name in ["kv-1", "kv-2"] {
            let at = |c: &str| -> Vec<usize> {
                p.calls
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| *x == c)
                    .map(|(i, _)| i)
                    .collect()
            };
            let (fds, freeze) = (
                at(&format!("fds 1 {name}")),
                at(&format!("freeze 1 {name}")),
            );
            assert_eq!(fds.len(), 2, "{name}: {:?}", p.calls);
            assert!(
                fds[0] < freeze[0] && freeze[0] < fds[1],
                "{name}: {:?}",
                p.calls
            );
        }
    }
}

/// Side by side, an image built before the freeze is staged on the target before the
/// freeze; a staged image the target refuses fails the move before anything is frozen,
/// and the upgrade rolls back with every workload running on the old instance.
#[test]
fn a_staged_image_goes_ahead_of_the_freeze_and_its_refusal_freezes_nothing() {
    let w = by_identity();
    let mut p = w.platform(false);
    p.stable_fds = true;
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    r.unwrap();
    assert_eq!(rec.outcome, Some(Outcome::Upgraded));
    for name in ["kv-1", "kv-2"] {
        let at = |c: String| p.calls.iter().position(|x| *x == c);
        let (stage, freeze) = (
            at(format!("stage 2 {name}")),
            at(format!("freeze 1 {name}")),
        );
        assert!(
            stage.is_some() && stage < freeze,
            "{name}: staged before its freeze: {:?}",
            p.calls
        );
    }

    let mut p = w.platform(false);
    p.stable_fds = true;
    p.refused_stage.insert("kv-2".into());
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    let e = r.unwrap_err();
    assert!(e.to_string().contains("untrusted key"), "{e}");
    assert_eq!(rec.outcome, Some(Outcome::RolledBack));
    assert!(
        !p.calls.iter().any(|c| c == "freeze 1 kv-2"),
        "kv-2 was never frozen: {:?}",
        p.calls
    );
    assert!(
        p.calls.iter().any(|c| c == "abort 2 kv-2"),
        "what was prepared for kv-2 went: {:?}",
        p.calls
    );
    assert_eq!(
        p.instances[&1].workloads.len(),
        2,
        "both run on instance 1: {:?}",
        p.calls
    );
}

#[test]
fn moves_by_digest_build_their_image_only_once_frozen() {
    let w = World::new();
    let mut p = w.platform(false);
    let (rec, r) = upgrade(&w, &mut p).unwrap();
    r.unwrap();
    assert_eq!(rec.outcome, Some(Outcome::Upgraded));
    for name in ["kv-1", "kv-2"] {
        let c = format!("fds 1 {name}");
        assert_eq!(
            p.calls.iter().filter(|x| **x == c).count(),
            1,
            "{:?}",
            p.calls
        );
    }
}

#[test]
fn fd_states_tell_objects_names_order_and_sizes_apart() {
    let fd = |n: &str, data: &[u8]| PreservedFd {
        name: n.into(),
        fd: crate::handover::sealed_memfd(n, data).unwrap(),
    };
    let dup = |p: &PreservedFd| PreservedFd {
        name: p.name.clone(),
        fd: p.fd.try_clone().unwrap(),
    };
    let (a, b) = (fd("a", b"one"), fd("b", b"two"));
    let then = fd_states(&[dup(&a), dup(&b)]).unwrap();
    assert_eq!(fd_states(&[dup(&a), dup(&b)]).unwrap(), then, "duplicates");
    assert_ne!(fd_states(&[dup(&b), dup(&a)]).unwrap(), then, "order");
    assert_ne!(fd_states(&[dup(&a)]).unwrap(), then, "count");
    assert_ne!(
        fd_states(&[dup(&a), fd("b", b"two")]).unwrap(),
        then,
        "another object"
    );
    let renamed = PreservedFd {
        name: "c".into(),
        fd: b.fd.try_clone().unwrap(),
    };
    assert_ne!(fd_states(&[dup(&a), renamed]).unwrap(), then, "name");
    // The same object, grown after it was examined.
    let m = PreservedFd {
        name: "m".into(),
        fd: nix::sys::memfd::memfd_create("m", nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING)
            .unwrap(),
    };
    let before = fd_states(&[dup(&m)]).unwrap();
    nix::unistd::ftruncate(&m.fd, 4096).unwrap();
    assert_ne!(fd_states(&[dup(&m)]).unwrap(), before, "size");
}
