//! Test helpers shared by every crate's test binaries (a dev-dependency only; never part of
//! a shipped binary).
//!
//! A test that needs what the machine lacks (root, a kernel image, CRIU, vsock, a cgroup2
//! mount) does not pass: it prints `SKIP <name>: <reason>` and is counted as ignored by its
//! libtest-mimic harness (`harness = false`), so `cargo test`'s summary and
//! `tests/run-all.sh` show it as skipped.

use libtest_mimic::{Completion, Trial};

/// Reports test `name` as skipped for `reason`: prints `SKIP <name>: <reason>` to stderr in
/// one write (lines of tests running in parallel must not interleave) and returns the
/// completion that counts it as ignored.
pub fn skip(name: &str, reason: impl Into<String>) -> Completion {
    skip_to(&mut std::io::stderr(), name, reason.into())
}

fn skip_to(out: &mut impl std::io::Write, name: &str, reason: String) -> Completion {
    let line = format!("SKIP {name}: {reason}\n");
    let _ = out.write_all(line.as_bytes());
    Completion::ignored_with(reason)
}

/// A trial that runs `test`: `Ok(())` is a pass, `Err(reason)` a [`skip`]. A failure
/// panics inside `test`, as in any test.
pub fn skippable<F>(name: &'static str, test: F) -> Trial
where
    F: FnOnce() -> Result<(), String> + Send + 'static,
{
    Trial::ignorable_test(name, move || {
        Ok(match test() {
            Ok(()) => Completion::Completed,
            Err(reason) => skip(name, reason),
        })
    })
}

/// A trial that runs a plain test (it passes unless it panics).
pub fn plain(name: &'static str, test: fn()) -> Trial {
    Trial::test(name, move || {
        test();
        Ok(())
    })
}

/// Runs test `name` (its full path, e.g. `host::notify::tests::umask_0_child`) of the
/// calling test binary alone in a child process, for a body that changes what is
/// process-wide (the umask, a resource limit): `--exact --ignored --test-threads=1`, with
/// `env` set to `dir`. Its stdout and stderr go to files in `dir`, not pipes, so that a
/// process it leaves behind cannot make the caller wait. Panics unless the child succeeds
/// and printed `<tag> <rest>` (anywhere in a line: libtest prints the test's name before
/// its output); returns the first such `rest`.
pub fn run_alone(name: &str, env: &str, dir: &std::path::Path, tag: &str) -> String {
    let (out, err) = (dir.join("child.out"), dir.join("child.err"));
    let file = |p: &std::path::Path| std::fs::File::create(p).expect("a child output file");
    let status = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(env, dir)
        .stdout(file(&out))
        .stderr(file(&err))
        .status()
        .expect("the child test process");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    assert!(
        status.success(),
        "{name} failed: {status:?}: {}",
        read(&err)
    );
    let text = read(&out);
    let tag = format!("{tag} ");
    text.lines()
        .find_map(|l| l.split_once(&tag).map(|(_, rest)| rest.to_owned()))
        .unwrap_or_else(|| panic!("{name} printed no `{tag}` line: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_prints_one_line_and_counts_as_ignored_with_its_reason() {
        let mut out = Vec::new();
        let done = skip_to(&mut out, "t", "needs root".into());
        assert_eq!(out, b"SKIP t: needs root\n");
        assert!(matches!(
            done,
            Completion::Ignored { reason: Some(r) } if r == "needs root"
        ));
    }
}
