//! `mk-upgrade`: the operator's command line. See `docs/cli.md`.

fn main() -> std::process::ExitCode {
    upgrade_agent::cli::app::main()
}
