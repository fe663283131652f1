//! Logging set-up shared by the binaries: `tracing` to stderr, filtered by `RUST_LOG`
//! (default `warn`).

/// Installs the stderr subscriber (a second call is a no-op).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
