//! Every byte of every state file is covered by its checksum: for each kind of file, every
//! single bit of a valid file is flipped in turn, and the damaged file must never be accepted
//! (least of all as a different valid record), never be deleted or overwritten, and always be
//! reported as a typed "corrupt" error.

use std::fs;
use std::path::{Path, PathBuf};

use rollback::{
    HolderError, Journal, JournalError, Lock, LockError, Slot, SlotError, Slots, TrialBoots,
    TrialError,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Rec {
    id: String,
    phase: String,
    frozen: Vec<String>,
}

impl rollback::journal::Record for Rec {
    type Delta = Rec;
    fn delta_from(&self, _prev: &Self) -> Option<Rec> {
        Some(self.clone())
    }
    fn apply(&mut self, delta: Rec) -> Result<(), String> {
        *self = delta;
        Ok(())
    }
}

fn rec(id: &str) -> Rec {
    Rec {
        id: id.into(),
        phase: "moving".into(),
        frozen: vec!["kv-1".into()],
    }
}

/// Every single-bit variant of `good`.
fn flips(good: &[u8]) -> impl Iterator<Item = (usize, Vec<u8>)> + '_ {
    (0..good.len() * 8).map(move |bit| {
        let mut bad = good.to_vec();
        bad[bit / 8] ^= 1 << (bit % 8);
        (bit, bad)
    })
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn copy_tree(from: &Path, to: &Path) {
    for f in files_under(from) {
        let dest = to.join(f.strip_prefix(from).unwrap());
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::copy(&f, &dest).unwrap();
    }
}

/// A state directory with 8 finished upgrades and upgrade 9 in flight (the audit's case: a
/// bit flip turned its `seq` 9 into 1 and the record was deleted as "already finished").
fn journal_template() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::<Rec>::open(dir.path()).unwrap();
    for i in 0..8 {
        j.finish(&rec(&format!("old-{i}"))).unwrap();
    }
    assert_eq!(j.write(&rec("u9")).unwrap(), 9);
    dir
}

/// Every bit of the journal's log (`journal.log`, the steps after `journal.json`): a flip
/// is damage, quarantined with journal.json, except in the last frame's final newline (or one
/// that makes a NUL in the last frame, which no single-bit flip of this log does), which
/// makes it a frame a crash cut short: the record is then the step before, never another one.
#[test]
fn every_flipped_bit_of_the_journal_log_is_quarantined_or_drops_only_the_last_step() {
    let template = journal_template();
    let mut j = Journal::<Rec>::open(template.path()).unwrap();
    let mut step10 = rec("u9");
    step10.phase = "committing".into();
    let mut step11 = step10.clone();
    step11.frozen.clear();
    assert_eq!(j.write(&step10).unwrap(), 10);
    assert_eq!(j.write(&step11).unwrap(), 11);
    let good = fs::read(template.path().join("journal.log")).unwrap();
    assert_eq!(String::from_utf8_lossy(&good).lines().count(), 2);
    let base = fs::read(template.path().join("journal.json")).unwrap();
    for (bit, bad) in flips(&good) {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(template.path(), dir.path());
        fs::write(dir.path().join("journal.log"), &bad).unwrap();
        let j = Journal::<Rec>::open(dir.path()).unwrap();
        match j.current() {
            Err(JournalError::Corrupt { quarantined, .. }) => {
                assert_eq!(quarantined.len(), 1, "bit {bit}");
                assert_eq!(fs::read(&quarantined[0]).unwrap(), base, "bit {bit}");
                let mut log = quarantined[0].clone().into_os_string();
                log.push(".log");
                assert_eq!(fs::read(log).unwrap(), bad, "bit {bit}: the log kept as is");
            }
            Ok(Some(r)) if bit / 8 == good.len() - 1 => {
                assert_eq!(r, step10, "bit {bit}");
                assert_eq!(j.seq(), 10, "bit {bit}");
            }
            other => panic!("bit {bit}: {other:?}"),
        }
    }
}

#[test]
fn every_flipped_bit_of_the_journal_is_quarantined_never_deleted() {
    let template = journal_template();
    let good = fs::read(template.path().join("journal.json")).unwrap();
    let history = Journal::<Rec>::open(template.path())
        .unwrap()
        .history()
        .unwrap();
    for (bit, bad) in flips(&good) {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(template.path(), dir.path());
        fs::write(dir.path().join("journal.json"), &bad).unwrap();

        let mut j = Journal::<Rec>::open(dir.path()).unwrap();
        match j.current() {
            Err(JournalError::Corrupt { quarantined, .. }) => {
                assert_eq!(quarantined.len(), 1, "bit {bit}");
                assert_eq!(
                    fs::read(&quarantined[0]).unwrap(),
                    bad,
                    "bit {bit}: kept as is"
                );
            }
            other => panic!("bit {bit}: {other:?}"),
        }
        assert!(!dir.path().join("journal.json").exists(), "bit {bit}");
        // Stays refused: reading again, writing, finishing, a new process.
        assert!(j.current().unwrap_err().is_corrupt(), "bit {bit}");
        assert!(j.write(&rec("next")).unwrap_err().is_corrupt(), "bit {bit}");
        assert!(
            j.finish(&rec("next")).unwrap_err().is_corrupt(),
            "bit {bit}"
        );
        let j = Journal::<Rec>::open(dir.path()).unwrap();
        assert!(j.current().unwrap_err().is_corrupt(), "bit {bit}");
        assert_eq!(j.history().unwrap(), history, "bit {bit}");
    }
}

#[test]
fn every_flipped_bit_of_a_legacy_journal_is_caught_or_harmless() {
    // A journal of the previous format, whose `seq` was outside the checksum.
    let template = journal_template();
    let body = serde_json::to_string(&rec("u9")).unwrap();
    let mut good = serde_json::to_vec_pretty(&serde_json::json!({
        "format": "mk-upgrade-journal/1",
        "seq": 9,
        "written_at": 1_795_438_560u64,
        "crc32": crc32fast::hash(body.as_bytes()),
        "body": body,
    }))
    .unwrap();
    good.push(b'\n');
    for (bit, bad) in flips(&good) {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(template.path(), dir.path());
        fs::write(dir.path().join("journal.json"), &bad).unwrap();
        let j = Journal::<Rec>::open(dir.path()).unwrap();
        let result = j.current();
        // Never deleted: the damaged bytes are still journal.json or quarantined.
        let kept = files_under(dir.path())
            .iter()
            .any(|f| fs::read(f).unwrap() == bad);
        assert!(kept, "bit {bit}: the file is gone");
        match result {
            Ok(Some(r)) => assert_eq!(r, rec("u9"), "bit {bit}: a different record"),
            Ok(None) => panic!("bit {bit}: reported as no upgrade in flight"),
            Err(e @ (JournalError::Corrupt { .. } | JournalError::UnsupportedFormat { .. })) => {
                assert!(e.to_string().contains("journal.json"), "bit {bit}: {e}");
            }
            Err(e) => panic!("bit {bit}: {e:?}"),
        }
    }
}

#[test]
fn every_flipped_bit_of_a_history_entry_is_reported() {
    let template = journal_template();
    let entry = template.path().join("history/00000000000000000008.json");
    let good = fs::read(&entry).unwrap();
    let dir = tempfile::tempdir().unwrap();
    copy_tree(template.path(), dir.path());
    let path = dir.path().join("history/00000000000000000008.json");
    for (bit, bad) in flips(&good) {
        fs::write(&path, &bad).unwrap();
        let j = Journal::<Rec>::open(dir.path()).unwrap();
        let e = j.history().unwrap_err();
        assert!(
            matches!(&e, JournalError::Corrupt { path: p, .. } if *p == path),
            "bit {bit}: {e:?}"
        );
        assert!(e.to_string().contains("00000000000000000008.json"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), bad, "bit {bit}");
        // The in-flight record is not affected.
        assert_eq!(j.current().unwrap(), Some(rec("u9")), "bit {bit}");
    }
}

fn image(tag: u8) -> (Vec<u8>, [u8; 32]) {
    let v: Vec<u8> = (0..512u32).map(|i| (i as u8) ^ tag).collect();
    let d = Sha256::digest(&v).into();
    (v, d)
}

/// Slots with a current and a previous kernel and a floor.
fn slots_template() -> (tempfile::TempDir, Slots) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Slots::open(dir.path()).unwrap();
    let (a, da) = image(1);
    let (b, db) = image(2);
    s.store(Slot::Current, &a, "7.2.13-mkA", &da).unwrap();
    s.store(Slot::Candidate, &b, "7.2.13-mkB", &db).unwrap();
    s.promote_candidate().unwrap();
    s.raise_floor("7.2.10").unwrap();
    (dir, s)
}

fn assert_slot_corrupt(r: Result<impl std::fmt::Debug, SlotError>, what: &str) {
    match r {
        Err(e @ SlotError::Corrupt { .. }) => assert!(e.is_corrupt()),
        other => panic!("{what}: {other:?}"),
    }
}

#[test]
fn every_flipped_bit_of_the_slot_table_is_reported() {
    let (dir, mut s) = slots_template();
    let path = dir.path().join("slots/slots.json");
    let good = fs::read(&path).unwrap();
    let images = files_under(&dir.path().join("slots/images"));
    assert_eq!(images.len(), 2);
    let (c, dc) = image(3);
    for (bit, bad) in flips(&good) {
        fs::write(&path, &bad).unwrap();
        let what = format!("bit {bit}");
        for role in [Slot::Current, Slot::Previous, Slot::Candidate] {
            assert_slot_corrupt(s.peek(role), &what);
            assert_slot_corrupt(s.get(role), &what);
            assert_slot_corrupt(s.read(role), &what);
        }
        assert_slot_corrupt(s.store(Slot::Candidate, &c, "7.3.0", &dc), &what);
        assert_slot_corrupt(s.swap_for_rollback(), &what);
        assert_slot_corrupt(s.promote_candidate(), &what);
        assert_slot_corrupt(s.clear(Slot::Previous), &what);
        assert_eq!(fs::read(&path).unwrap(), bad, "{what}: overwritten");
        assert_eq!(
            files_under(&dir.path().join("slots/images")),
            images,
            "{what}"
        );
    }
    fs::write(&path, &good).unwrap();
    assert_eq!(
        s.peek(Slot::Previous).unwrap().unwrap().release,
        "7.2.13-mkA"
    );
}

#[test]
fn every_flipped_bit_of_the_floor_is_reported() {
    let (dir, mut s) = slots_template();
    let path = dir.path().join("slots/floor.json");
    let good = fs::read(&path).unwrap();
    for (bit, bad) in flips(&good) {
        fs::write(&path, &bad).unwrap();
        let what = format!("bit {bit}");
        assert_slot_corrupt(s.floor(), &what);
        // No kernel is handed out for booting while the floor is unknown.
        assert_slot_corrupt(s.read(Slot::Previous), &what);
        assert_slot_corrupt(s.raise_floor("7.2.12"), &what);
        assert_eq!(fs::read(&path).unwrap(), bad, "{what}: overwritten");
    }
    fs::write(&path, &good).unwrap();
    assert_eq!(s.floor().unwrap().as_deref(), Some("7.2.10"));
}

#[test]
fn every_flipped_bit_of_a_stored_image_is_reported() {
    let (_dir, s) = slots_template();
    let info = s.peek(Slot::Previous).unwrap().unwrap();
    let good = fs::read(&info.path).unwrap();
    for (bit, bad) in flips(&good) {
        fs::write(&info.path, &bad).unwrap();
        assert!(
            matches!(s.get(Slot::Previous), Err(SlotError::ImageCorrupt { .. })),
            "bit {bit}"
        );
        assert!(
            matches!(s.read(Slot::Previous), Err(e) if e.is_corrupt()),
            "bit {bit}"
        );
        assert_eq!(fs::read(&info.path).unwrap(), bad);
    }
}

#[test]
fn every_flipped_bit_of_the_trial_record_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = TrialBoots::open(dir.path()).unwrap();
    t.mark_bad("7.2.9", "panicked at boot").unwrap();
    t.begin("7.2.13-mkB", 1).unwrap();
    let path = dir.path().join("trial.json");
    let good = fs::read(&path).unwrap();
    let corrupt = |r: Result<(), TrialError>, what: &str| match r {
        Err(e @ TrialError::Corrupt { .. }) => assert!(e.is_corrupt()),
        other => panic!("{what}: {other:?}"),
    };
    for (bit, bad) in flips(&good) {
        fs::write(&path, &bad).unwrap();
        let what = format!("bit {bit}");
        corrupt(t.pending().map(drop), &what);
        corrupt(t.is_bad("7.2.9").map(drop), &what);
        corrupt(t.bad_releases().map(drop), &what);
        corrupt(t.check_on_boot("7.2.13-mkA", None).map(drop), &what);
        corrupt(t.begin("7.2.13-mkB", 2).map(drop), &what);
        corrupt(t.confirm("7.2.13-mkB").map(drop), &what);
        corrupt(t.clear_bad("7.2.9").map(drop), &what);
        corrupt(t.mark_bad("7.2.8", "x"), &what);
        assert_eq!(fs::read(&path).unwrap(), bad, "{what}: overwritten");
    }
    fs::write(&path, &good).unwrap();
    assert_eq!(t.pending().unwrap().unwrap().release, "7.2.13-mkB");
}

#[test]
fn every_flipped_bit_of_the_lock_holder_record_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let guard = Lock::acquire(dir.path()).unwrap();
    let path = dir.path().join("lock");
    let good = fs::read(&path).unwrap();
    let me = Lock::holder(dir.path()).unwrap().unwrap();
    assert_eq!(me.pid, std::process::id());
    for (bit, bad) in flips(&good) {
        fs::write(&path, &bad).unwrap();
        match Lock::holder(dir.path()) {
            Err(e @ HolderError::Corrupt { .. }) => assert!(e.is_corrupt()),
            other => panic!("bit {bit}: {other:?}"),
        }
        // The refusal says the record is damaged instead of naming a wrong pid.
        match Lock::acquire(dir.path()) {
            Err(
                e @ LockError::Busy {
                    pid: None,
                    damaged: Some(_),
                    ..
                },
            ) => {
                assert!(e.to_string().contains("damaged"), "{e}");
            }
            other => panic!("bit {bit}: {other:?}"),
        }
        assert_eq!(fs::read(&path).unwrap(), bad, "bit {bit}");
    }
    drop(guard);
    assert!(path.exists(), "the lock file is never deleted");
}
