//! Key files are trusted only when nobody but root or the running user can change them
//! (sshd `StrictModes`): each refusal is built here in a temporary directory, and checked
//! for its typed error and for a message naming the path and the fix.
//!
//! The "owned by another user" cases `chown` to uid 65534 (nobody), which needs root; run
//! as another user they report `SKIP <name>: <reason>` and count as ignored, never as
//! passed (own harness, `harness = false`, libtest-mimic).

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Trial};

use kho_proto::keys::{Insecure, KeyError, MAX_TRUSTED_KEYS, NodeKey, TrustedKeys};

const NOBODY: u32 = 65534;

fn main() {
    let args = Arguments::from_args();
    let plain: [(&'static str, fn()); 8] = [
        ("a_safe_store_loads", a_safe_store_loads),
        (
            "world_writable_key_file_is_refused",
            world_writable_key_file_is_refused,
        ),
        (
            "group_writable_key_file_is_refused",
            group_writable_key_file_is_refused,
        ),
        (
            "symlinked_key_file_is_refused",
            symlinked_key_file_is_refused,
        ),
        (
            "group_or_world_writable_directory_is_refused",
            group_or_world_writable_directory_is_refused,
        ),
        (
            "a_single_key_file_is_checked_the_same_way",
            a_single_key_file_is_checked_the_same_way,
        ),
        (
            "fifos_are_refused_without_blocking",
            fifos_are_refused_without_blocking,
        ),
        (
            "too_many_key_files_are_refused",
            too_many_key_files_are_refused,
        ),
    ];
    let as_root: [(&'static str, fn()); 3] = [
        (
            "key_file_owned_by_another_user_is_refused",
            key_file_owned_by_another_user_is_refused,
        ),
        (
            "directory_owned_by_another_user_is_refused",
            directory_owned_by_another_user_is_refused,
        ),
        (
            "a_single_key_file_owned_by_another_user_is_refused",
            a_single_key_file_owned_by_another_user_is_refused,
        ),
    ];
    let mut trials: Vec<Trial> = plain
        .into_iter()
        .map(|(name, test)| mk_test_support::plain(name, test))
        .collect();
    trials.extend(as_root.into_iter().map(|(name, test)| {
        mk_test_support::skippable(name, move || {
            if !is_root() {
                return Err("needs root to chown".into());
            }
            test();
            Ok(())
        })
    }));
    libtest_mimic::run(&args, trials).exit();
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), None).unwrap();
}

/// A trust store `DIR/keys` (mode 0755) holding `release.pub` (mode 0644), both owned by
/// the running user; the test then breaks one rule.
fn store() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o755);
    let key = NodeKey::from_seed([3; 32]);
    let (secret, public) = key.save(&dir, "release").unwrap();
    fs::remove_file(secret).unwrap();
    chmod(&public, 0o644);
    (tmp, dir, public)
}

fn file_refusal(dir: &Path) -> (PathBuf, Insecure, String, String) {
    match TrustedKeys::load_dir(dir) {
        Err(e @ KeyError::InsecureKeyFile { .. }) => {
            let msg = e.to_string();
            let KeyError::InsecureKeyFile { path, problem, fix } = e else {
                unreachable!()
            };
            (path, problem, fix, msg)
        }
        other => panic!("expected InsecureKeyFile, got {other:?}"),
    }
}

fn dir_refusal(dir: &Path) -> (PathBuf, Insecure, String, String) {
    match TrustedKeys::load_dir(dir) {
        Err(e @ KeyError::InsecureKeyDir { .. }) => {
            let msg = e.to_string();
            let KeyError::InsecureKeyDir { dir, problem, fix } = e else {
                unreachable!()
            };
            (dir, problem, fix, msg)
        }
        other => panic!("expected InsecureKeyDir, got {other:?}"),
    }
}

fn a_safe_store_loads() {
    let (_tmp, dir, public) = store();
    assert_eq!(TrustedKeys::load_dir(&dir).unwrap().len(), 1);
    // Readable by everyone is fine for a public key; so is a private 0600 file, and a
    // directory that is not readable by others.
    chmod(&public, 0o600);
    chmod(&dir, 0o700);
    assert_eq!(TrustedKeys::load_dir(&dir).unwrap().len(), 1);
    // The directory itself may be reached through a symbolic link (a configuration
    // pointing at the real store): its target is what is checked.
    let link = dir.parent().unwrap().join("keys-link");
    symlink(&dir, &link).unwrap();
    assert_eq!(TrustedKeys::load_dir(&link).unwrap().len(), 1);
}

fn world_writable_key_file_is_refused() {
    let (_tmp, dir, public) = store();
    chmod(&public, 0o666);
    let (path, problem, fix, msg) = file_refusal(&dir);
    assert_eq!(path, public);
    assert_eq!(problem, Insecure::WorldWritable { mode: 0o666 });
    assert_eq!(fix, format!("chmod go-w {}", public.display()));
    assert!(msg.contains(&public.display().to_string()), "{msg}");
    assert!(msg.contains("writable by everyone"), "{msg}");
    assert!(msg.contains("chmod go-w"), "{msg}");
    // Fixed as the message says, it loads.
    chmod(&public, 0o644);
    TrustedKeys::load_dir(&dir).unwrap();
}

fn group_writable_key_file_is_refused() {
    let (_tmp, dir, public) = store();
    chmod(&public, 0o664);
    let (path, problem, _, msg) = file_refusal(&dir);
    assert_eq!(path, public);
    assert_eq!(problem, Insecure::GroupWritable { mode: 0o664 });
    assert!(msg.contains("writable by its group (mode 0664)"), "{msg}");
    assert!(msg.contains("chmod go-w"), "{msg}");
}

/// Needs root (see `main`).
fn key_file_owned_by_another_user_is_refused() {
    let (_tmp, dir, public) = store();
    chown(&public, NOBODY);
    let (path, problem, fix, msg) = file_refusal(&dir);
    assert_eq!(path, public);
    assert_eq!(
        problem,
        Insecure::Owner {
            uid: NOBODY,
            euid: 0
        }
    );
    assert_eq!(fix, format!("chown root {}", public.display()));
    assert!(msg.contains("owned by uid 65534"), "{msg}");
    assert!(msg.contains("chown root"), "{msg}");
}

fn symlinked_key_file_is_refused() {
    let (tmp, dir, public) = store();
    // The target itself is a perfectly good key file, elsewhere.
    let elsewhere = tmp.path().join("elsewhere.pub");
    fs::rename(&public, &elsewhere).unwrap();
    symlink(&elsewhere, &public).unwrap();
    let (path, problem, fix, msg) = file_refusal(&dir);
    assert_eq!(path, public);
    assert_eq!(problem, Insecure::Symlink);
    assert!(fix.contains("cp --remove-destination"), "{fix}");
    assert!(msg.contains("is a symbolic link"), "{msg}");
    assert!(msg.contains(&public.display().to_string()), "{msg}");
}

fn group_or_world_writable_directory_is_refused() {
    for (mode, problem, words) in [
        (
            0o775,
            Insecure::GroupWritable { mode: 0o775 },
            "writable by its group",
        ),
        (
            0o757,
            Insecure::WorldWritable { mode: 0o757 },
            "writable by everyone",
        ),
        // Even with the sticky bit (like /tmp): anyone could add a key file.
        (
            0o1777,
            Insecure::WorldWritable { mode: 0o1777 },
            "writable by everyone",
        ),
    ] {
        let (_tmp, dir, _) = store();
        chmod(&dir, mode);
        let (path, got, fix, msg) = dir_refusal(&dir);
        assert_eq!(path, dir);
        assert_eq!(got, problem);
        assert_eq!(fix, format!("chmod go-w {}", dir.display()));
        assert!(msg.contains(words), "{msg}");
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
    }
}

/// Needs root (see `main`).
fn directory_owned_by_another_user_is_refused() {
    let (_tmp, dir, _) = store();
    chown(&dir, NOBODY);
    let (path, problem, fix, msg) = dir_refusal(&dir);
    assert_eq!(path, dir);
    assert_eq!(
        problem,
        Insecure::Owner {
            uid: NOBODY,
            euid: 0
        }
    );
    assert_eq!(fix, format!("chown root {}", dir.display()));
    assert!(msg.contains("owned by uid 65534"), "{msg}");
}

fn a_single_key_file_is_checked_the_same_way() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("signing");
    fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o700);
    let key = NodeKey::from_seed([4; 32]);
    let (secret, _) = key.save(&dir, "release").unwrap();
    assert_eq!(NodeKey::load(&secret).unwrap().public(), key.public());

    chmod(&secret, 0o620);
    let e = NodeKey::load(&secret).unwrap_err();
    assert!(
        matches!(&e, KeyError::InsecureKeyFile { path, problem: Insecure::GroupWritable { .. }, .. } if *path == secret),
        "{e}"
    );
    chmod(&secret, 0o600);

    let link = tmp.path().join("link.key");
    symlink(&secret, &link).unwrap();
    let e = NodeKey::load(&link).unwrap_err();
    assert!(
        matches!(&e, KeyError::InsecureKeyFile { path, problem: Insecure::Symlink, .. } if *path == link),
        "{e}"
    );

    chmod(&dir, 0o777);
    let e = NodeKey::load(&secret).unwrap_err();
    assert!(
        matches!(&e, KeyError::InsecureKeyDir { dir: d, problem: Insecure::WorldWritable { .. }, .. } if *d == dir),
        "{e}"
    );
    chmod(&dir, 0o700);
}

/// Needs root (see `main`).
fn a_single_key_file_owned_by_another_user_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("signing");
    fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o700);
    let (secret, _) = NodeKey::from_seed([4; 32]).save(&dir, "release").unwrap();
    chown(&secret, NOBODY);
    let e = NodeKey::load(&secret).unwrap_err();
    assert!(
        matches!(&e, KeyError::InsecureKeyFile { path, problem: Insecure::Owner { uid: NOBODY, euid: 0 }, .. } if *path == secret),
        "{e}"
    );
    assert!(e.to_string().contains("chown root"), "{e}");
}

/// A FIFO named like a key (or given as the directory) is refused at once, never read:
/// opening it does not wait for a writer.
fn fifos_are_refused_without_blocking() {
    let (tmp, dir, _) = store();
    let fifo = dir.join("fifo.pub");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let fifo_dir = tmp.path().join("fifo-dir");
    nix::unistd::mkfifo(&fifo_dir, nix::sys::stat::Mode::from_bits_truncate(0o755)).unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    let (d, f) = (dir.clone(), fifo_dir.clone());
    std::thread::spawn(move || {
        let a = TrustedKeys::load_dir(&d).map(|k| k.len());
        let b = TrustedKeys::load_dir(&f).map(|k| k.len());
        let _ = tx.send((a, b));
    });
    let started = Instant::now();
    let (a, b) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("loading a store with a FIFO blocked");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        matches!(&a, Err(KeyError::Malformed { path }) if *path == fifo),
        "{a:?}"
    );
    assert!(matches!(&b, Err(KeyError::Io { .. })), "{b:?}");
}

fn too_many_key_files_are_refused() {
    let (_tmp, dir, public) = store();
    for i in 0..MAX_TRUSTED_KEYS {
        fs::copy(&public, dir.join(format!("k{i:04}.pub"))).unwrap();
    }
    assert!(matches!(
        TrustedKeys::load_dir(&dir),
        Err(KeyError::TooManyKeys { max, .. }) if max == MAX_TRUSTED_KEYS
    ));
    fs::remove_file(dir.join("k0000.pub")).unwrap();
    // Exactly the limit: the same key many times is one trusted key.
    assert_eq!(TrustedKeys::load_dir(&dir).unwrap().len(), 1);
}
