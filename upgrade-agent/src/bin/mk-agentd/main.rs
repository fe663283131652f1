//! `mk-agentd`: the mk-upgrade agent daemon (see the `agentd` module and docs/cli.md).

mod agentd;

fn main() -> std::process::ExitCode {
    agentd::main()
}
