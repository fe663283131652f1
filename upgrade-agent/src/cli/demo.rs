//! `mk-upgrade demo`.

/// `mk-upgrade demo` arguments.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    #[arg(long)]
    pub json: bool,
}

/// Runs the demo.
pub fn run(
    _g: &super::app::Global,
    _a: DemoArgs,
) -> Result<std::process::ExitCode, super::app::CliError> {
    Err(super::app::CliError::new(
        crate::exit::Exit::Internal,
        "demo: in progress",
    ))
}
