//! The `mk-demo-kv` server: start-up contract, accept loop and connection handling.
//!
//! Start-up (see [`Server::from_env`]): descriptors named in `MK_STATE_FDS` are adopted,
//! `kv-data` (the memfd holding every byte of data) and `listen` (a listening TCP
//! socket, whose queued connections are then served by this process). Without `kv-data`
//! a fresh memfd is created; without `listen` the `--listen` address is bound. On real
//! LUO only the memfd survives the kexec, so the new instance binds the address again.
//!
//! Threads: one per connection (at most [`ServerConfig::max_connections`]; beyond that a
//! client gets `ERR busy` and is closed), all sharing the store behind one mutex (the
//! single-writer discipline of the log).

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{SockType, getsockopt, sockopt};

use super::handoff::{Handoff, Wake, is_connection};
use super::protocol::{MAX_LINE, Request, parse_line};
use super::shm::{self, ShmError};
use super::store::{OpenReport, Origin, Store, StoreError};
use crate::exit::Exit;
use crate::sys::{self, TakeError};

/// `MK_STATE_FDS` name of the memfd holding the data.
pub const FD_NAME_DATA: &str = "kv-data";
/// `MK_STATE_FDS` name of the listening socket.
pub const FD_NAME_LISTEN: &str = "listen";
/// Bytes of each value written by `--preload-mib`.
pub const PRELOAD_VALUE_LEN: usize = 1000;

/// Server settings (the `mk-demo-kv` flags).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind when no listening socket is handed over.
    pub listen: SocketAddr,
    /// Size of a fresh memfd, in bytes.
    pub capacity: u64,
    /// Largest size the memfd may grow to, in bytes.
    pub max_capacity: u64,
    /// MiB of data to write at a fresh start (`preload-<n>` keys).
    pub preload_mib: u64,
    /// Concurrent connections served; more are refused with `ERR busy`.
    pub max_connections: usize,
    /// At a start without data (no memfd, or an empty one handed over): fill the memfd
    /// with this image (a file or a block device, [`crate::persist`]) and open it as a
    /// handed-over store. `None`: start empty (and `preload_mib`).
    pub load_from: Option<std::path::PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            capacity: 64 << 20,
            max_capacity: 1 << 30,
            preload_mib: 0,
            max_connections: 256,
            load_from: None,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    FdEnv(#[from] TakeError),
    #[error("refusing to start: {0}")]
    Store(#[from] StoreError),
    #[error("{FD_NAME_LISTEN} fd {fd} from MK_STATE_FDS is not a listening TCP socket: {reason}")]
    Listener { fd: RawFd, reason: String },
    #[error("cannot listen on {addr}: {source} (choose another --listen address)")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("--preload-mib {mib}: {source}")]
    Preload { mib: u64, source: StoreError },
    #[error("--load-from: {0}")]
    Load(#[from] crate::persist::PersistError),
    #[error("standby start: {0}")]
    Standby(String),
    #[error("standby copy not used: the supervisor closed its socket (the move was cancelled)")]
    StandbyCancelled,
}

impl ServerError {
    /// The documented exit code for this error.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Store(StoreError::Corrupt(_)) => Exit::Corrupt,
            Self::FdEnv(_)
            | Self::Listener { .. }
            | Self::Store(
                StoreError::BadCapacity { .. }
                | StoreError::Shm(ShmError::NotMemfd { .. } | ShmError::WriteSealed { .. }),
            )
            | Self::Preload { .. }
            | Self::Load(
                crate::persist::PersistError::Empty { .. }
                | crate::persist::PersistError::NotEmpty { .. }
                | crate::persist::PersistError::TooLarge { .. },
            )
            | Self::Standby(_) => Exit::Usage,
            Self::Store(_) | Self::Bind { .. } | Self::Load(_) => Exit::Platform,
            Self::StandbyCancelled => Exit::Ok,
        }
    }
}

/// A started server (store open, socket listening), not yet accepting.
#[derive(Debug)]
pub struct Server {
    store: Arc<Mutex<Store>>,
    listener: TcpListener,
    listener_adopted: bool,
    origin: Origin,
    memfd: RawFd,
    max_connections: usize,
    /// Connections handed over by the previous copy (`connection-N`), served first.
    connections: Vec<TcpStream>,
    handoff: Arc<Handoff>,
}

impl Server {
    /// Starts from this process's `MK_STATE_FDS` (absent: a first start), taking
    /// ownership of the descriptors named `kv-data` and `listen` (other names are left
    /// alone). Call it at the start of `main`: see [`sys::take_state_fds`].
    pub fn from_env(cfg: &ServerConfig) -> Result<Self, ServerError> {
        let mut data = None;
        let mut listen = None;
        let mut connections = Vec::new();
        let wanted = |n: &str| n == FD_NAME_DATA || n == FD_NAME_LISTEN || is_connection(n);
        let named = match sys::take_standby_fd().map_err(ServerError::Standby)? {
            Some(sock) => match wait_as_standby(&sock)? {
                Some(fds) => fds.into_iter().filter(|s| wanted(&s.name)).collect(),
                None => return Err(ServerError::StandbyCancelled),
            },
            None => sys::take_state_fds(wanted)?,
        };
        for s in named {
            if is_connection(&s.name) {
                match s.fd.map(adopt_connection) {
                    Some(Ok(c)) => connections.push(c),
                    // A connection that ended meanwhile, or not one: nothing to serve.
                    Some(Err(reason)) => {
                        tracing::warn!(name = %s.name, %reason, "handed-over connection dropped");
                    }
                    None => tracing::warn!(name = %s.name, "handed-over connection is not open"),
                }
            } else if s.name == FD_NAME_DATA {
                data = Some(s.fd.ok_or_else(|| StoreError::from(shm::not_open(s.raw)))?);
            } else {
                listen = Some(s.fd.ok_or_else(|| ServerError::Listener {
                    fd: s.raw,
                    reason: "not an open descriptor".into(),
                })?);
            }
        }
        let mut server = Self::with_fds(cfg, data, listen)?;
        server.connections = connections;
        server.handoff = Arc::new(Handoff::from_env().map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?);
        Ok(server)
    }

    /// Starts with the given handed-over descriptors: `data` the `kv-data` memfd, `listen`
    /// the listening socket (each absent: created here).
    pub fn with_fds(
        cfg: &ServerConfig,
        data: Option<OwnedFd>,
        listen: Option<OwnedFd>,
    ) -> Result<Self, ServerError> {
        let data = match (&cfg.load_from, data) {
            (Some(path), d) => Some(load_image(path, d)?),
            (None, d) => d,
        };
        let store = match data {
            Some(d) => Store::adopt(d, cfg.capacity, cfg.max_capacity)?,
            None => Store::create(cfg.capacity, cfg.max_capacity)?,
        };
        let (listener, listener_adopted) = match listen {
            Some(l) => (adopt_listener(l)?, true),
            None => (
                TcpListener::bind(cfg.listen).map_err(|source| ServerError::Bind {
                    addr: cfg.listen,
                    source,
                })?,
                false,
            ),
        };
        let origin = store.origin();
        let memfd = store.memfd_raw();
        let mut store = store;
        if origin == Origin::Fresh && cfg.preload_mib > 0 {
            preload(&mut store, cfg.preload_mib).map_err(|source| ServerError::Preload {
                mib: cfg.preload_mib,
                source,
            })?;
        }
        Ok(Self {
            store: Arc::new(Mutex::new(store)),
            listener,
            listener_adopted,
            origin,
            memfd,
            max_connections: cfg.max_connections.max(1),
            connections: Vec::new(),
            handoff: Arc::new(Handoff::new(None).map_err(|source| ServerError::Bind {
                addr: cfg.listen,
                source,
            })?),
        })
    }

    /// The hand-over state, for the signal thread ([`Handoff::begin`], [`Handoff::resume`]).
    pub fn handoff(&self) -> Arc<Handoff> {
        Arc::clone(&self.handoff)
    }

    /// How many connections the previous copy handed over.
    pub fn adopted_connections(&self) -> usize {
        self.connections.len()
    }

    /// The listening address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The memfd's descriptor number in this process.
    pub fn memfd_raw(&self) -> RawFd {
        self.memfd
    }

    /// Whether the data came from a handed-over memfd.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// How the store's index was opened (for an adopted memfd: from its index or a scan).
    pub fn open_report(&self) -> OpenReport {
        lock(&self.store).open_report().clone()
    }

    /// Writes the store's memfd to `path` (`--save-to`); returns its bytes and records.
    pub fn save_to(
        &self,
        path: &std::path::Path,
    ) -> Result<(u64, u64), crate::persist::PersistError> {
        let store = lock(&self.store);
        let bytes = crate::persist::save(store.memfd(), path)?;
        Ok((bytes, store.stats().records))
    }

    /// Whether the listening socket was handed over.
    pub fn listener_adopted(&self) -> bool {
        self.listener_adopted
    }

    /// The line a supervisor reads from stdout: `LISTENING <addr> MEMFD <fd>`.
    pub fn ready_line(&self) -> io::Result<String> {
        Ok(format!(
            "LISTENING {} MEMFD {}",
            self.local_addr()?,
            self.memfd
        ))
    }

    /// Accepts connections until the listener fails for good.
    pub fn serve(mut self) -> io::Result<()> {
        let open = Arc::new(AtomicUsize::new(0));
        for stream in std::mem::take(&mut self.connections) {
            let peer = stream.peer_addr().ok();
            self.spawn_conn(stream, peer, &open);
        }
        loop {
            self.handoff.wait_acceptable(self.listener.as_fd())?;
            let (stream, peer) = match self.listener.accept() {
                Ok(s) => s,
                // A handed-over listener may be non-blocking (O_NONBLOCK belongs to the
                // open file description, shared with the supervisor's copy, so it is left
                // alone): wait for a connection instead.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_readable(&self.listener)?;
                    continue;
                }
                Err(e) if transient_accept_error(&e) => {
                    tracing::warn!(error = %e, "accept failed, retrying");
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if open.load(Ordering::Acquire) >= self.max_connections {
                let mut s = stream;
                let _ = writeln!(s, "ERR busy: {} connections open", self.max_connections);
                continue;
            }
            self.spawn_conn(stream, Some(peer), &open);
        }
    }

    fn spawn_conn(&self, stream: TcpStream, peer: Option<SocketAddr>, open: &Arc<AtomicUsize>) {
        open.fetch_add(1, Ordering::AcqRel);
        self.handoff.conn_started();
        let store = Arc::clone(&self.store);
        let open2 = Arc::clone(open);
        let handoff = Arc::clone(&self.handoff);
        let spawned = std::thread::Builder::new()
            .name("kv-conn".into())
            .spawn(move || {
                if let Err(e) = handle(stream, &store, &handoff) {
                    tracing::debug!(?peer, error = %e, "connection ended");
                }
                open2.fetch_sub(1, Ordering::AcqRel);
                handoff.conn_ended();
            });
        if let Err(e) = spawned {
            open.fetch_sub(1, Ordering::AcqRel);
            self.handoff.conn_ended();
            tracing::warn!(error = %e, "cannot spawn a connection thread");
        }
    }
}

/// A standby start (mk-upgrade's `standby = true`, docs/state.md): says `READY` on the
/// socket, then waits for one packet: the descriptors' names, comma-separated, with the
/// descriptors attached in that order. `None`: the socket closed first (not used).
fn wait_as_standby(sock: &OwnedFd) -> Result<Option<Vec<sys::StateFd>>, ServerError> {
    let bad = |e: String| ServerError::Standby(e);
    let ready = nix::sys::socket::send(
        sock.as_raw_fd(),
        b"READY",
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
    );
    if let Err(e) = ready {
        return Err(bad(format!("saying READY: {e}")));
    }
    tracing::info!("standby: waiting for the descriptors");
    let mut buf = vec![0u8; 64 << 10];
    let (n, fds) = sys::recv_with_fds(sock.as_fd(), &mut buf).map_err(|e| bad(e.to_string()))?;
    if n == 0 {
        return Ok(None);
    }
    let text = std::str::from_utf8(&buf[..n]).map_err(|e| bad(format!("names: {e}")))?;
    let names: Vec<&str> = if text.is_empty() {
        Vec::new()
    } else {
        text.split(',').collect()
    };
    if names.len() != fds.len() {
        return Err(bad(format!(
            "{} names for {} descriptors",
            names.len(),
            fds.len()
        )));
    }
    Ok(Some(
        names
            .into_iter()
            .zip(fds)
            .map(|(name, fd)| sys::StateFd {
                name: name.to_owned(),
                raw: fd.as_raw_fd(),
                fd: Some(fd),
            })
            .collect(),
    ))
}

/// Takes a handed-over connection: a connected stream socket.
fn adopt_connection(owned: OwnedFd) -> Result<TcpStream, String> {
    match getsockopt(&owned, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(t) => return Err(format!("socket type {t:?}, expected a stream socket")),
        Err(e) => return Err(format!("not a socket ({e})")),
    }
    if getsockopt(&owned, sockopt::AcceptConn).unwrap_or(true) {
        return Err("a listening socket, not a connection".into());
    }
    let stream = TcpStream::from(owned);
    stream
        .peer_addr()
        .map_err(|e| format!("not connected ({e})"))?;
    Ok(stream)
}

fn wait_readable(listener: &TcpListener) -> io::Result<()> {
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::NONE) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EINTR
                | libc::EPROTO
                | libc::EPERM
        )
    )
}

/// Takes an inherited listening socket and checks it.
fn adopt_listener(owned: OwnedFd) -> Result<TcpListener, ServerError> {
    let fd = owned.as_raw_fd();
    let bad = |reason: String| ServerError::Listener { fd, reason };
    match getsockopt(&owned, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(t) => return Err(bad(format!("socket type {t:?}, expected a stream socket"))),
        Err(e) => return Err(bad(format!("not a socket ({e})"))),
    }
    match getsockopt(&owned, sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => {
            return Err(bad(
                "the socket is not listening (call listen(2) first)".into()
            ));
        }
        Err(e) => return Err(bad(format!("SO_ACCEPTCONN: {e}"))),
    }
    let listener = TcpListener::from(owned);
    match listener.local_addr() {
        Ok(_) => Ok(listener),
        Err(e) => Err(bad(format!("not an IPv4/IPv6 socket ({e})"))),
    }
}

/// `--load-from`: the image's bytes in `data` (an empty handed-over memfd) or in a new
/// memfd. A handed-over memfd that already holds data is refused (the image would
/// overwrite a store that moved here).
fn load_image(path: &std::path::Path, data: Option<OwnedFd>) -> Result<OwnedFd, ServerError> {
    let file = match data {
        Some(d) => std::fs::File::from(d),
        None => shm::create_memfd(0).map_err(StoreError::from)?,
    };
    let t0 = std::time::Instant::now();
    let bytes = crate::persist::load_into(path, &file)?;
    tracing::info!(
        path = %path.display(),
        bytes,
        ms = t0.elapsed().as_secs_f64() * 1000.0,
        "loaded the store image"
    );
    Ok(OwnedFd::from(file))
}

/// Writes `preload-<n>` keys until `mib` MiB of log are used.
fn preload(store: &mut Store, mib: u64) -> Result<(), StoreError> {
    let target = mib << 20;
    let mut n = 0u64;
    let mut value = vec![0u8; PRELOAD_VALUE_LEN];
    while store.stats().used_bytes < target {
        let key = format!("preload-{n}");
        preload_value(n, &mut value);
        store.set(key.as_bytes(), &value)?;
        n += 1;
    }
    tracing::info!(keys = n, mib, "preloaded");
    Ok(())
}

/// The value `--preload-mib` writes for key `preload-<n>` (deterministic, so a benchmark
/// can verify it).
pub fn preload_value(n: u64, out: &mut [u8]) {
    let pattern = format!("{n:016x}.");
    for (i, b) in out.iter_mut().enumerate() {
        *b = pattern.as_bytes()[i % pattern.len()];
    }
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // A panic while holding the lock cannot leave the memfd half-committed (the commit
    // point is one store), so the data is still usable.
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

enum Line {
    Complete,
    Eof,
    TooLong,
}

fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> io::Result<Line> {
    line.clear();
    let n = reader.take(max as u64 + 1).read_until(b'\n', line)?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(Line::Complete);
    }
    if line.len() > max {
        return Ok(Line::TooLong);
    }
    // End of stream in the middle of a line: the client went away.
    Ok(Line::Eof)
}

fn handle(stream: TcpStream, store: &Mutex<Store>, handoff: &Handoff) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::with_capacity(64 << 10, stream.try_clone()?);
    let mut writer = BufWriter::with_capacity(64 << 10, stream.try_clone()?);
    let mut line = Vec::with_capacity(256);
    loop {
        // A request boundary when nothing received is buffered here (every request read
        // is answered and flushed): the one place a connection may be handed over.
        while reader.buffer().is_empty() {
            if handoff.wait_readable(&stream)? == Wake::Readable {
                break;
            }
        }
        match read_line(&mut reader, &mut line, MAX_LINE)? {
            Line::Eof => return writer.flush(),
            Line::TooLong => {
                writeln!(writer, "ERR line too long (limit {MAX_LINE} bytes)")?;
                return writer.flush();
            }
            Line::Complete => {}
        }
        match parse_line(&line) {
            Ok(Request::HttpGet { path }) => {
                let healthy = path == b"/health";
                return http_reply(&mut reader, writer, healthy, store);
            }
            Ok(req) => respond(&mut writer, req, store)?,
            Err(e) => writeln!(writer, "ERR {e}")?,
        }
        // Flush once the pipelined requests already received are answered.
        if reader.buffer().is_empty() {
            writer.flush()?;
        }
    }
}

fn respond(w: &mut impl Write, req: Request<'_>, store: &Mutex<Store>) -> io::Result<()> {
    match req {
        Request::Set { key, value } => match lock(store).set(key, value) {
            Ok(seq) => writeln!(w, "OK {seq}"),
            Err(e) => {
                tracing::warn!(error = %e, "SET refused");
                writeln!(w, "ERR {e}")
            }
        },
        Request::Get { key } => match lock(store).get(key) {
            Ok(Some(v)) => {
                w.write_all(b"VALUE ")?;
                w.write_all(&v)?;
                w.write_all(b"\n")
            }
            Ok(None) => w.write_all(b"NOTFOUND\n"),
            Err(e) => writeln!(w, "ERR {e}"),
        },
        Request::Ping => w.write_all(b"PONG\n"),
        Request::Stats => {
            let s = lock(store).stats();
            writeln!(
                w,
                "STATS keys={} records={} used_bytes={} capacity={} max_capacity={}",
                s.keys, s.records, s.used_bytes, s.capacity, s.max_capacity
            )
        }
        Request::HttpGet { .. } => unreachable!("handled by the caller"),
    }
}

fn http_reply(
    reader: &mut impl BufRead,
    mut w: BufWriter<TcpStream>,
    health_path: bool,
    store: &Mutex<Store>,
) -> io::Result<()> {
    // Read the request headers (bounded in count, size and time) so that closing does not
    // reset the connection.
    w.get_ref().set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = Vec::new();
    for _ in 0..100 {
        match read_line(reader, &mut line, 8192) {
            Ok(Line::Complete) if line.is_empty() || line == b"\r" => break,
            Ok(Line::Complete) => {}
            Ok(Line::Eof | Line::TooLong) | Err(_) => break,
        }
    }
    let (status, body) = if health_path {
        match lock(store).check() {
            Ok(()) => ("200 OK", "ok\n".to_owned()),
            Err(e) => ("503 Service Unavailable", format!("{e}\n")),
        }
    } else {
        ("404 Not Found", "not found\n".to_owned())
    };
    write!(
        w,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()?;
    let stream = w.into_inner().map_err(io::IntoInnerError::into_error)?;
    stream.shutdown(Shutdown::Write)?;
    // Drain what the client may still send, briefly, then close.
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let _ = (&stream).read(&mut [0u8; 512]);
    Ok(())
}

/// Parses a size: a number of bytes with an optional `K`, `M`, `G` (or `KiB`, `MiB`,
/// `GiB`) binary suffix, e.g. `64MiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64MiB, 1GiB)"))?;
    let shift = match suffix {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => {
            return Err(format!(
                "{s:?}: unknown size suffix {suffix:?} (use K, M, G, KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("12XB").unwrap_err().contains("suffix"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn preload_values_are_deterministic_and_valid() {
        let mut a = vec![0u8; PRELOAD_VALUE_LEN];
        let mut b = vec![0u8; PRELOAD_VALUE_LEN];
        preload_value(7, &mut a);
        preload_value(8, &mut b);
        assert_ne!(a, b);
        assert!(super::super::log::check_item("value", &a, PRELOAD_VALUE_LEN).is_ok());
    }

    #[test]
    fn preload_fills_the_requested_size() {
        let mut s = Store::create(1 << 20, 4 << 20).unwrap();
        preload(&mut s, 2).unwrap();
        let st = s.stats();
        assert!(st.used_bytes >= 2 << 20 && st.capacity >= 2 << 20);
        let mut v = vec![0u8; PRELOAD_VALUE_LEN];
        preload_value(0, &mut v);
        assert_eq!(s.get(b"preload-0").unwrap().unwrap(), v);
        let mut tiny = Store::create(4096, 8192).unwrap();
        assert!(matches!(
            preload(&mut tiny, 1),
            Err(StoreError::Full { .. })
        ));
    }

    #[test]
    fn save_then_load_from_serves_the_same_records() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("kv.img");
        let cfg = ServerConfig {
            capacity: 3 << 20,
            preload_mib: 2,
            ..ServerConfig::default()
        };
        let a = Server::with_fds(&cfg, None, None).unwrap();
        let (bytes, records) = a.save_to(&img).unwrap();
        assert_eq!(bytes, 3 << 20);
        assert!(records > 0);
        drop(a);
        // Into a fresh memfd, and into an empty handed-over one (the agent's `size = 0`).
        let load = ServerConfig {
            load_from: Some(img.clone()),
            ..ServerConfig::default()
        };
        let empty = OwnedFd::from(shm::create_memfd(0).unwrap());
        for data in [None, Some(empty)] {
            let b = Server::with_fds(&load, data, None).unwrap();
            assert_eq!(b.origin(), Origin::Adopted { records });
            let mut st = lock(&b.store);
            let mut v = vec![0u8; PRELOAD_VALUE_LEN];
            preload_value(records - 1, &mut v);
            let key = format!("preload-{}", records - 1);
            assert_eq!(st.get(key.as_bytes()).unwrap().unwrap(), v);
            assert_eq!(st.stats().records, records);
        }
        // A handed-over memfd with data is not overwritten by the image.
        let full = shm::create_memfd(4096).unwrap();
        let e = Server::with_fds(&load, Some(OwnedFd::from(full)), None).unwrap_err();
        assert!(
            matches!(
                e,
                ServerError::Load(crate::persist::PersistError::NotEmpty { .. })
            ),
            "{e}"
        );
        assert_eq!(e.exit(), Exit::Usage);
        // A missing image is a platform error.
        let gone = ServerConfig {
            load_from: Some(dir.path().join("missing.img")),
            ..ServerConfig::default()
        };
        let e = Server::with_fds(&gone, None, None).unwrap_err();
        assert_eq!(e.exit(), Exit::Platform, "{e}");
        // A corrupt image is refused like a corrupt handed-over memfd.
        std::fs::write(&img, vec![0xA5u8; 1 << 20]).unwrap();
        let e = Server::with_fds(&load, None, None).unwrap_err();
        assert_eq!(e.exit(), Exit::Corrupt, "{e}");
    }

    #[test]
    fn listener_checks() {
        // A UDP socket is refused.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = adopt_listener(OwnedFd::from(udp)).unwrap_err();
        assert!(err.to_string().contains("stream socket"), "{err}");
        // A connected (non-listening) TCP socket is refused.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let err = adopt_listener(OwnedFd::from(c)).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
        assert_eq!(err.exit(), Exit::Usage);
    }
}
