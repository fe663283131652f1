//! Logging set-up shared by the binaries: `tracing` to stderr, filtered by `RUST_LOG`.
//!
//! Default level: `warn` on a terminal or in a pipe; `info` when stderr is the systemd journal
//! (`JOURNAL_STREAM` names the `DEV:INODE` of stderr, as systemd's convention asks to check:
//! the variable alone is inherited by children whose stderr is something else), so that every journal
//! step, workload move and result of an upgrade reaches `journalctl` (the same events as
//! `STATE_DIR/events.jsonl`), without colours or timestamps (the journal adds its own).

/// The default filter: `info` under the journal, else `warn`.
pub fn default_filter(under_journal: bool) -> &'static str {
    if under_journal { "info" } else { "warn" }
}

/// Whether `journal_stream` (the value of `JOURNAL_STREAM`, `DEV:INODE`) names the file
/// `stderr_dev_ino` (fstat of fd 2).
pub fn is_journal(journal_stream: Option<&str>, stderr_dev_ino: Option<(u64, u64)>) -> bool {
    let (Some(v), Some((dev, ino))) = (journal_stream, stderr_dev_ino) else {
        return false;
    };
    v.split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        == Some((dev, ino))
}

/// Installs the stderr subscriber (a second call is a no-op).
pub fn init_tracing() {
    let stderr = nix::sys::stat::fstat(std::io::stderr())
        .ok()
        .map(|st| (st.st_dev, st.st_ino));
    let journal = is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref(), stderr);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter(journal)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!journal);
    let _ = if journal {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_journal_gets_every_step_a_terminal_only_warnings() {
        assert_eq!(super::default_filter(true), "info");
        assert_eq!(super::default_filter(false), "warn");
        assert!(super::is_journal(Some("8:1234"), Some((8, 1234))));
        assert!(!super::is_journal(Some("8:1234"), Some((8, 99))));
        assert!(!super::is_journal(Some("garbage"), Some((8, 1234))));
        assert!(!super::is_journal(None, Some((8, 1234))));
    }
}

/// Tells the service manager that start-up is done (`READY=1`, systemd's `sd_notify`
/// protocol for `Type=notify` units): one datagram to `$NOTIFY_SOCKET` (a path, or an
/// abstract name written `@name`). Returns whether a manager was told; without
/// `NOTIFY_SOCKET` nothing is sent. `status` goes along as `STATUS=`.
pub fn notify_ready(status: &str) -> std::io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    notify_to(&target, &format!("READY=1\nSTATUS={status}\n")).map(|()| true)
}

fn notify_to(target: &std::ffi::OsStr, msg: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = target.as_bytes();
    let addr = match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
        Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(target))?,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is neither an absolute path nor an @abstract name",
            ));
        }
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(msg.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod notify_tests {
    use super::notify_to;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn ready_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1\nSTATUS=x\n").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x\n");
    }

    #[test]
    fn ready_reaches_an_abstract_socket_and_bad_names_are_refused() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("mk-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(std::ffi::OsStr::new(&format!("@{name}")), "READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
        assert!(notify_to(std::ffi::OsStr::new("relative"), "READY=1\n").is_err());
    }
}
