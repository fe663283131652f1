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
