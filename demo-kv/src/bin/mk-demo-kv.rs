//! `mk-demo-kv`: the demonstration key-value workload.
//!
//! Serves a line protocol over TCP (see `mk_demo_kv::protocol`) and keeps every
//! byte of data in a memfd, so that mk-upgrade can hand the memfd and the listening
//! socket to a new instance (`MK_STATE_FDS=kv-data:<fd>,listen:<fd>`) without losing a
//! write or a queued connection. Prints `LISTENING <addr> MEMFD <fd>` on stdout once it
//! accepts connections. SIGTERM or SIGINT exit 0 (nothing to flush: the data lives in the
//! memfd). SIGUSR2 hands the established connections over to the supervisor for the next
//! copy (`mk_demo_kv::handoff`, with `NOTIFY_SOCKET`); SIGCONT takes them back. Exit codes follow the mk-upgrade table: 2 bad flags or bad `MK_STATE_FDS`
//! descriptors, 4 the handed-over memfd is corrupt, 12 the system refused an operation
//! (bind, memfd, mmap).

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use mk_demo_kv::exit::Exit;
use mk_demo_kv::server::{Server, ServerConfig, parse_size};
use mk_demo_kv::store::Origin;
use nix::sys::signal::{SigSet, Signal};

/// How long a hand-over waits for every connection to reach a request boundary.
const HANDOFF_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

/// The mk-upgrade demonstration key-value server (data in a memfd).
#[derive(Debug, Parser)]
#[command(name = "mk-demo-kv", version)]
struct Cli {
    /// Address to listen on when no `listen` socket is handed over in MK_STATE_FDS.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Size of a fresh memfd (bytes, or with K/M/G/KiB/MiB/GiB).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    capacity: u64,
    /// Largest size the memfd may grow to; beyond it SET answers ERR log full.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    max_capacity: u64,
    /// At a fresh start, write this many MiB of `preload-<n>` keys (1000-byte values).
    #[arg(long, default_value_t = 0)]
    preload_mib: u64,
    /// Concurrent connections served; more are refused with `ERR busy`.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// At a start without data (no kv-data memfd handed over, or an empty one): fill the
    /// memfd with this store image (a file or a block device, as written by --save-to)
    /// and open it like a handed-over store, instead of starting empty.
    #[arg(long, value_name = "PATH")]
    load_from: Option<std::path::PathBuf>,
    /// Write the store (after --preload-mib or --load-from) to this file, print
    /// `SAVED <bytes> RECORDS <n>` on stdout and exit without serving.
    #[arg(long, value_name = "PATH")]
    save_to: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    // Block the exit signals before any thread starts, so that every thread inherits the
    // mask and only the waiter below receives them.
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR2,
        Signal::SIGCONT,
    ] {
        signals.add(s);
    }
    if let Err(e) = signals.thread_block() {
        eprintln!("mk-demo-kv: cannot block SIGTERM/SIGINT/SIGUSR2/SIGCONT: {e}");
        return Exit::Internal.into();
    }
    let cfg = ServerConfig {
        listen: cli.listen,
        capacity: cli.capacity,
        max_capacity: cli.max_capacity,
        preload_mib: cli.preload_mib,
        max_connections: cli.max_connections,
        load_from: cli.load_from.clone(),
    };
    // At the start of main: the descriptors MK_STATE_FDS names were inherited for this
    // process and nothing else in it has taken ownership of them (mk_demo_kv::sys).
    let server = match Server::from_env(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mk-demo-kv: {e}");
            return e.exit().into();
        }
    };
    if let Some(path) = &cli.save_to {
        return match server.save_to(path) {
            Ok((bytes, records)) => {
                println!("SAVED {bytes} RECORDS {records}");
                Exit::Ok.into()
            }
            Err(e) => {
                eprintln!("mk-demo-kv: --save-to: {e}");
                Exit::Platform.into()
            }
        };
    }
    match server.origin() {
        Origin::Fresh => tracing::info!("fresh start: new empty store"),
        Origin::Adopted { records } => {
            let r = server.open_report();
            if r.index_in_memfd {
                tracing::info!(
                    records,
                    format = r.format_version,
                    tail_bytes = r.scanned_bytes,
                    "adopted the kv-data memfd: its index checked, records verified when read"
                );
            } else {
                tracing::info!(
                    records,
                    format = r.format_version,
                    rebuilt = r.rebuilt.as_deref().unwrap_or("-"),
                    "adopted the kv-data memfd: all records verified"
                );
            }
        }
    }
    if server.listener_adopted() {
        tracing::info!("adopted the listening socket (queued connections are served here)");
    }
    if server.adopted_connections() > 0 {
        tracing::info!(
            connections = server.adopted_connections(),
            "adopted connections handed over by the previous copy"
        );
    }
    let handoff = server.handoff();
    std::thread::spawn(move || {
        loop {
            match signals.wait() {
                Ok(Signal::SIGUSR2) => {
                    if let Some(n) = handoff.begin(HANDOFF_BUDGET) {
                        tracing::info!(connections = n, "connections handed over");
                    } else {
                        tracing::warn!("SIGUSR2 without NOTIFY_SOCKET: nothing handed over");
                    }
                }
                Ok(Signal::SIGCONT) => handoff.resume(),
                Ok(sig) => {
                    tracing::info!(signal = %sig, "exiting");
                    break;
                }
                Err(_) => break,
            }
        }
        std::process::exit(0);
    });
    let line = match server.ready_line() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mk-demo-kv: listening socket has no address: {e}");
            return Exit::Platform.into();
        }
    };
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        // Nobody reads stdout: keep serving, the supervisor may find us otherwise.
        tracing::warn!("cannot write the LISTENING line to stdout");
    }
    drop(out);
    match server.serve() {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            eprintln!("mk-demo-kv: accept failed: {e}");
            Exit::Platform.into()
        }
    }
}
