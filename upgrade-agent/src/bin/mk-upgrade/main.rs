//! `mk-upgrade`: the operator's command line. See `docs/cli.md`. One module per
//! subcommand; everything they do is in the `upgrade_agent` library, this binary parses,
//! reports and maps outcomes to the documented exit codes.

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

fn main() -> std::process::ExitCode {
    app::main()
}
