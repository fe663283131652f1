//! `mk-upgrade load`: the demo load generator against running mk-demo-kv workloads, for an
//! operator who wants to watch an upgrade of their own under load.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use mk_demo_kv::loadgen::{LoadGen, LoadOptions};

use crate::app::CliError;
use upgrade_agent::exit::Exit;

/// `mk-upgrade load` arguments.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// A target, `NAME=ADDR` (loopback only), repeatable.
    #[arg(long = "target", value_name = "NAME=ADDR", required = true, value_parser = parse_target)]
    pub targets: Vec<(String, SocketAddr)>,
    /// How long to run before stopping and verifying every acknowledged write.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Connections per target.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub connections: u16,
    #[arg(long)]
    pub json: bool,
}

fn parse_target(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=ADDR"))?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not an address: {e}"))?;
    if name.is_empty() {
        return Err(format!("{s:?} has an empty name"));
    }
    Ok((name.to_owned(), addr))
}

/// Runs the load for `seconds`, then verifies; exit 0 only if nothing acknowledged was lost.
pub fn run(a: LoadArgs) -> Result<ExitCode, CliError> {
    let handle = LoadGen::start(
        a.targets,
        LoadOptions {
            connections_per_target: usize::from(a.connections),
            max_duration: Duration::from_secs(a.seconds + 60),
            ..LoadOptions::default()
        },
    )
    .map_err(|e| CliError::new(Exit::Usage, e.to_string()))?;
    std::thread::sleep(Duration::from_secs(a.seconds));
    let report = handle.stop();
    let t = &report.totals;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&report)
                .map_err(|e| CliError::new(Exit::Internal, e.to_string()))?
        );
    } else {
        for r in &report.per_target {
            println!(
                "{:<16} {} requests, {} acked writes, {} failed, {} lost, longest stall {} ms",
                r.name,
                r.requests,
                r.acked_writes,
                r.failed_requests,
                r.lost_writes,
                r.longest_stall_ms
            );
        }
        println!(
            "total: {} requests, {} acked writes, {} failed requests, {} lost writes, longest stall {} ms",
            t.requests, t.acked_writes, t.failed_requests, t.lost_writes, t.longest_stall_ms
        );
    }
    Ok(if report.lossless() {
        Exit::Ok
    } else {
        Exit::Internal
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::parse_target;

    #[test]
    fn targets_parse_and_refuse() {
        let (n, a) = parse_target("kv-1=127.0.0.1:7001").unwrap();
        assert_eq!((n.as_str(), a.port()), ("kv-1", 7001));
        assert!(
            parse_target("127.0.0.1:7001")
                .unwrap_err()
                .contains("NAME=ADDR")
        );
        assert!(
            parse_target("=127.0.0.1:1")
                .unwrap_err()
                .contains("empty name")
        );
        assert!(
            parse_target("kv=localhost")
                .unwrap_err()
                .contains("not an address")
        );
    }
}
