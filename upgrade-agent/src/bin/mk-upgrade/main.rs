//! `mk-upgrade`: the operator's command line. See `docs/cli.md`. One module per
//! subcommand; everything they do is in the `upgrade_agent` library, this binary parses,
//! reports and maps outcomes to the documented exit codes.
//!
//! Invoked by the name `mk-agentd` (a link to this binary), it is the agent daemon: an
//! initramfs or a small image needs one copy of the code both share, not two (docs/cli.md).

mod app;
mod demo;
mod emu;
mod events;
mod inspect;
mod keys;
mod load;
mod luo;
mod multikernel;
mod rollout;
mod sign;
mod state;
mod upgrade;
mod workloads;

#[path = "../mk-agentd/agentd/mod.rs"]
mod agentd;

/// Whether argv\[0\] names the daemon: `mk-agentd`, or a path ending in `/mk-agentd`.
fn invoked_as_agentd(argv0: Option<&std::ffi::OsStr>) -> bool {
    argv0
        .map(std::path::Path::new)
        .and_then(std::path::Path::file_name)
        .is_some_and(|n| n == "mk-agentd")
}

fn main() -> std::process::ExitCode {
    if invoked_as_agentd(std::env::args_os().next().as_deref()) {
        return agentd::main();
    }
    app::main()
}

#[cfg(test)]
mod tests {
    use super::invoked_as_agentd;
    use std::ffi::OsStr;

    #[test]
    fn argv0_names_the_daemon() {
        assert!(invoked_as_agentd(Some(OsStr::new("mk-agentd"))));
        assert!(invoked_as_agentd(Some(OsStr::new("/usr/bin/mk-agentd"))));
        assert!(!invoked_as_agentd(Some(OsStr::new("mk-upgrade"))));
        assert!(!invoked_as_agentd(Some(OsStr::new("/bin/mk-agentd.old"))));
        assert!(!invoked_as_agentd(None));
    }
}
