//! A load generator for `mk-demo-kv` that proves (or disproves) that an upgrade lost
//! nothing.
//!
//! Each target gets `connections_per_target` worker threads. A worker loops: `SET` of a
//! fresh key (`<prefix>-<run>-t<target>-c<conn>-<n>`) with a value derived from the key,
//! then `gets_per_set` `GET`s of keys it already had acknowledged, checking their values.
//! On a connection error the request counts as failed, the worker reconnects with
//! exponential backoff (5 ms to 200 ms) and re-sends an unacknowledged `SET` with the same
//! key and value (idempotent); it gives up after `reconnect_budget` without a connection.
//!
//! [`LoadHandle::stop`] stops the workers and then reads back EVERY acknowledged write
//! from its target (by then possibly a new process on the same listening socket): a key
//! that is missing or holds another value is a lost write.
//!
//! Everything is bounded: run time (`max_duration`), requests per connection, the time
//! of each request (`request_timeout`), reconnection and verification time. Traffic goes
//! only to the given addresses, which must be loopback addresses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::kv_client::KvClient;

/// Load generator settings.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Worker connections per target (1..=64).
    pub connections_per_target: usize,
    /// Key prefix, 1..=64 bytes of `[A-Za-z0-9._-]`; a per-run id is appended.
    pub key_prefix: String,
    /// Bytes per value (1..=1024).
    pub value_len: usize,
    /// `GET`s of acknowledged keys after each `SET`.
    pub gets_per_set: u32,
    /// Pause after each request on a connection (zero: as fast as possible).
    pub request_interval: Duration,
    /// The workers stop by themselves after this long.
    pub max_duration: Duration,
    /// The workers stop by themselves after this many requests each.
    pub max_requests_per_connection: u64,
    /// Bound on connect, and on each request's send and receive.
    pub request_timeout: Duration,
    /// A worker gives up after this long without a working connection.
    pub reconnect_budget: Duration,
    /// Bound on the read-back verification of each target in [`LoadHandle::stop`].
    pub verify_budget: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            connections_per_target: 4,
            key_prefix: "lg".into(),
            value_len: 32,
            gets_per_set: 1,
            request_interval: Duration::from_millis(1),
            max_duration: Duration::from_secs(600),
            max_requests_per_connection: 1_000_000,
            request_timeout: Duration::from_secs(10),
            reconnect_budget: Duration::from_secs(30),
            verify_budget: Duration::from_secs(120),
        }
    }
}

/// Why a load run could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("no targets given")]
    NoTargets,
    #[error(
        "target {name:?} address {addr} is not a loopback address; the load generator only talks to loopback"
    )]
    NotLoopback { name: String, addr: SocketAddr },
    #[error("invalid load option {field}: {reason}")]
    BadOption { field: &'static str, reason: String },
}

/// Counters of one target, in progress.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetProgress {
    pub name: String,
    pub requests: u64,
    pub failed_requests: u64,
    pub acked_writes: u64,
}

/// The result for one target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetReport {
    /// Workload name given to [`LoadGen::start`].
    pub name: String,
    /// Target address.
    pub addr: String,
    /// Requests sent (including retries).
    pub requests: u64,
    /// Requests whose response never came, or was an `ERR`.
    pub failed_requests: u64,
    /// `SET`s acknowledged with `OK`.
    pub acked_writes: u64,
    /// Acknowledged writes missing or different at read-back.
    pub lost_writes: u64,
    /// Acknowledged writes that could not be read back within `verify_budget`.
    pub unverified_writes: u64,
    /// `GET`s during the run that returned a missing or different value.
    pub read_mismatches: u64,
    /// Reconnections after a connection error.
    pub reconnects: u64,
    /// Workers that gave up (no connection for `reconnect_budget`).
    pub gave_up_connections: u64,
    /// The longest time one connection went without a successful response, in ms
    /// (what one client saw; includes the time from the last success to the end).
    pub longest_stall_ms: u64,
    /// Up to 10 lost keys, for diagnosis.
    pub lost_examples: Vec<String>,
}

/// Sums over all targets.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LoadTotals {
    pub requests: u64,
    pub failed_requests: u64,
    pub acked_writes: u64,
    pub lost_writes: u64,
    pub unverified_writes: u64,
    pub read_mismatches: u64,
    /// The maximum over targets.
    pub longest_stall_ms: u64,
}

/// The result of a load run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoadReport {
    /// The id embedded in this run's keys.
    pub run_id: String,
    /// From start to the end of verification.
    pub duration_ms: u64,
    pub per_target: Vec<TargetReport>,
    pub totals: LoadTotals,
}

impl LoadReport {
    /// Every acknowledged write was read back intact, and no read saw a wrong value.
    pub fn lossless(&self) -> bool {
        self.totals.lost_writes == 0
            && self.totals.unverified_writes == 0
            && self.totals.read_mismatches == 0
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    failed: AtomicU64,
    acked: AtomicU64,
    read_mismatches: AtomicU64,
    reconnects: AtomicU64,
}

#[derive(Debug)]
struct Target {
    name: String,
    addr: SocketAddr,
    counters: Counters,
}

#[derive(Debug)]
struct WorkerResult {
    target: usize,
    conn: usize,
    acked: Vec<u64>,
    longest_stall: Duration,
    gave_up: bool,
}

/// Entry point of the load generator.
#[derive(Debug)]
pub struct LoadGen;

/// A running load; [`LoadHandle::stop`] ends it and returns the report.
#[derive(Debug)]
pub struct LoadHandle {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<WorkerResult>>,
    targets: Arc<Vec<Target>>,
    started: Instant,
    opts: LoadOptions,
    run_id: String,
}

fn valid_prefix(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 64
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn bad(field: &'static str, reason: &str) -> LoadError {
    LoadError::BadOption {
        field,
        reason: reason.to_owned(),
    }
}

impl LoadGen {
    /// Starts the workers against `targets` (workload name, loopback address).
    pub fn start(
        targets: Vec<(String, SocketAddr)>,
        opts: LoadOptions,
    ) -> Result<LoadHandle, LoadError> {
        if targets.is_empty() {
            return Err(LoadError::NoTargets);
        }
        if let Some((name, addr)) = targets.iter().find(|(_, a)| !a.ip().is_loopback()) {
            return Err(LoadError::NotLoopback {
                name: name.clone(),
                addr: *addr,
            });
        }
        if !(1..=64).contains(&opts.connections_per_target) {
            return Err(bad("connections_per_target", "must be 1..=64"));
        }
        if !valid_prefix(&opts.key_prefix) {
            return Err(bad(
                "key_prefix",
                "must be 1..=64 bytes of A-Z a-z 0-9 . _ -",
            ));
        }
        if !(1..=1024).contains(&opts.value_len) {
            return Err(bad("value_len", "must be 1..=1024"));
        }
        if opts.request_timeout.is_zero() {
            return Err(bad("request_timeout", "must be above zero"));
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let run_id = format!("{:x}{:08x}", std::process::id(), nanos);
        let targets: Arc<Vec<Target>> = Arc::new(
            targets
                .into_iter()
                .map(|(name, addr)| Target {
                    name,
                    addr,
                    counters: Counters::default(),
                })
                .collect(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut workers = Vec::new();
        for t in 0..targets.len() {
            for c in 0..opts.connections_per_target {
                let w = Worker {
                    target: t,
                    conn: c,
                    targets: Arc::clone(&targets),
                    stop: Arc::clone(&stop),
                    opts: opts.clone(),
                    key_base: format!("{}-{run_id}-t{t}-c{c}", opts.key_prefix),
                    deadline: started + opts.max_duration,
                };
                workers.push(
                    std::thread::Builder::new()
                        .name(format!("loadgen-{t}-{c}"))
                        .spawn(move || w.run())
                        .expect("spawn a load generator thread"),
                );
            }
        }
        Ok(LoadHandle {
            stop,
            workers,
            targets,
            started,
            opts,
            run_id,
        })
    }
}

/// The value written for `key`: a CRC of the key in hex, repeated to `len` bytes.
pub fn value_for(key: &str, len: usize) -> String {
    let h = format!("{:08x}", crc32fast::hash(key.as_bytes()));
    h.chars().cycle().take(len).collect()
}

struct Worker {
    target: usize,
    conn: usize,
    targets: Arc<Vec<Target>>,
    stop: Arc<AtomicBool>,
    opts: LoadOptions,
    key_base: String,
    deadline: Instant,
}

impl Worker {
    fn key(&self, n: u64) -> String {
        format!("{}-{n}", self.key_base)
    }

    /// Sleeps up to `d`, waking early when asked to stop.
    fn pause(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= end {
                break;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(20)));
        }
    }

    fn run(self) -> WorkerResult {
        let target = &self.targets[self.target];
        let ctr = &target.counters;
        let opts = &self.opts;
        let mut conn: Option<KvClient> = None;
        let mut acked: Vec<u64> = Vec::new();
        let mut next_n = 0u64;
        let mut retry: Option<u64> = None;
        let mut last_ok = Instant::now();
        let mut longest = Duration::ZERO;
        let mut down_since: Option<Instant> = None;
        let mut backoff = Duration::from_millis(5);
        let mut requests = 0u64;
        let mut step = 0u64;
        let mut gave_up = false;
        // xorshift64 for picking keys to read back; seeded per worker.
        let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ ((self.target as u64) << 32 | self.conn as u64);
        while !self.stop.load(Ordering::Relaxed)
            && Instant::now() < self.deadline
            && requests < opts.max_requests_per_connection
        {
            if conn.is_none() {
                if let Ok(client) = KvClient::connect(target.addr, opts.request_timeout) {
                    if down_since.take().is_some() {
                        ctr.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    backoff = Duration::from_millis(5);
                    conn = Some(client);
                } else {
                    let since = *down_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > opts.reconnect_budget {
                        gave_up = true;
                        break;
                    }
                    self.pause(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                    continue;
                }
            }
            let client = conn.as_mut().expect("connected above");
            let cycle = u64::from(opts.gets_per_set) + 1;
            let do_get = retry.is_none() && !acked.is_empty() && step % cycle != 0;
            step += 1;
            requests += 1;
            ctr.requests.fetch_add(1, Ordering::Relaxed);
            let outcome = if do_get {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let n = acked[(rng % acked.len() as u64) as usize];
                let key = self.key(n);
                client.get(&key).map(|v| {
                    if v.as_deref() != Some(value_for(&key, opts.value_len).as_str()) {
                        ctr.read_mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                })
            } else {
                let n = retry.take().unwrap_or_else(|| {
                    next_n += 1;
                    next_n - 1
                });
                let key = self.key(n);
                let r = client.set(&key, &value_for(&key, opts.value_len));
                match &r {
                    Ok(_) => {
                        acked.push(n);
                        ctr.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.is_connection_error() => retry = Some(n),
                    Err(_) => {}
                }
                r.map(drop)
            };
            match outcome {
                Ok(()) => {
                    let now = Instant::now();
                    longest = longest.max(now - last_ok);
                    last_ok = now;
                }
                Err(e) => {
                    ctr.failed.fetch_add(1, Ordering::Relaxed);
                    if e.is_connection_error() {
                        conn = None;
                        down_since = Some(Instant::now());
                    }
                }
            }
            if !opts.request_interval.is_zero() {
                self.pause(opts.request_interval);
            }
        }
        longest = longest.max(last_ok.elapsed());
        WorkerResult {
            target: self.target,
            conn: self.conn,
            acked,
            longest_stall: longest,
            gave_up,
        }
    }
}

impl LoadHandle {
    /// Counters so far, per target.
    pub fn progress(&self) -> Vec<TargetProgress> {
        self.targets
            .iter()
            .map(|t| TargetProgress {
                name: t.name.clone(),
                requests: t.counters.requests.load(Ordering::Relaxed),
                failed_requests: t.counters.failed.load(Ordering::Relaxed),
                acked_writes: t.counters.acked.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// The id embedded in this run's keys.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Stops the workers, reads back every acknowledged write, and reports.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let results: Vec<WorkerResult> = self
            .workers
            .into_iter()
            .map(|w| w.join().expect("load generator worker panicked"))
            .collect();
        let mut per_target = Vec::new();
        let mut totals = LoadTotals::default();
        for (ti, t) in self.targets.iter().enumerate() {
            let mut keys = Vec::new();
            let mut longest = Duration::ZERO;
            let mut gave_up = 0;
            for r in results.iter().filter(|r| r.target == ti) {
                longest = longest.max(r.longest_stall);
                gave_up += u64::from(r.gave_up);
                let base = format!("{}-{}-t{ti}-c{}", self.opts.key_prefix, self.run_id, r.conn);
                keys.extend(r.acked.iter().map(|n| format!("{base}-{n}")));
            }
            let v = verify(t.addr, &keys, &self.opts);
            let c = &t.counters;
            let rep = TargetReport {
                name: t.name.clone(),
                addr: t.addr.to_string(),
                requests: c.requests.load(Ordering::Relaxed),
                failed_requests: c.failed.load(Ordering::Relaxed),
                acked_writes: keys.len() as u64,
                lost_writes: v.lost,
                unverified_writes: v.unverified,
                read_mismatches: c.read_mismatches.load(Ordering::Relaxed),
                reconnects: c.reconnects.load(Ordering::Relaxed),
                gave_up_connections: gave_up,
                longest_stall_ms: u64::try_from(longest.as_millis()).unwrap_or(u64::MAX),
                lost_examples: v.examples,
            };
            totals.requests += rep.requests;
            totals.failed_requests += rep.failed_requests;
            totals.acked_writes += rep.acked_writes;
            totals.lost_writes += rep.lost_writes;
            totals.unverified_writes += rep.unverified_writes;
            totals.read_mismatches += rep.read_mismatches;
            totals.longest_stall_ms = totals.longest_stall_ms.max(rep.longest_stall_ms);
            per_target.push(rep);
        }
        LoadReport {
            run_id: self.run_id,
            duration_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            per_target,
            totals,
        }
    }
}

struct Verified {
    lost: u64,
    unverified: u64,
    examples: Vec<String>,
}

/// Reads every key back, reconnecting as needed within `verify_budget`.
fn verify(addr: SocketAddr, keys: &[String], o: &LoadOptions) -> Verified {
    const CHUNK: usize = 512;
    let deadline = Instant::now() + o.verify_budget;
    let mut out = Verified {
        lost: 0,
        unverified: 0,
        examples: Vec::new(),
    };
    let mut conn: Option<KvClient> = None;
    let mut i = 0;
    while i < keys.len() {
        if Instant::now() >= deadline {
            out.unverified = (keys.len() - i) as u64;
            break;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match KvClient::connect(addr, o.request_timeout) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    tracing::debug!(error = %e, "verification connect failed, retrying");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            },
        };
        let chunk = &keys[i..keys.len().min(i + CHUNK)];
        match c.get_many(chunk) {
            Ok(values) => {
                for (k, v) in chunk.iter().zip(values) {
                    if v.as_deref() != Some(value_for(k, o.value_len).as_str()) {
                        out.lost += 1;
                        if out.examples.len() < 10 {
                            out.examples.push(k.clone());
                        }
                    }
                }
                i += chunk.len();
            }
            Err(e) => {
                tracing::debug!(error = %e, "verification read failed, reconnecting");
                conn = None;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_starts() {
        let lo: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(
            LoadGen::start(vec![], LoadOptions::default()).unwrap_err(),
            LoadError::NoTargets
        );
        let far: SocketAddr = "192.0.2.1:80".parse().unwrap();
        assert!(matches!(
            LoadGen::start(vec![("w".into(), far)], LoadOptions::default()),
            Err(LoadError::NotLoopback { .. })
        ));
        let o = LoadOptions {
            key_prefix: "has space".into(),
            ..LoadOptions::default()
        };
        assert!(matches!(
            LoadGen::start(vec![("w".into(), lo)], o),
            Err(LoadError::BadOption {
                field: "key_prefix",
                ..
            })
        ));
        let o = LoadOptions {
            connections_per_target: 0,
            ..LoadOptions::default()
        };
        assert!(matches!(
            LoadGen::start(vec![("w".into(), lo)], o),
            Err(LoadError::BadOption { .. })
        ));
    }

    #[test]
    fn values_depend_on_key_and_length() {
        assert_eq!(value_for("a", 20).len(), 20);
        assert_ne!(value_for("a", 8), value_for("b", 8));
        assert!(value_for("a", 3).bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn unreachable_target_gives_up_within_budget() {
        // Bind then drop a listener to get a loopback port with nobody listening.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let o = LoadOptions {
            connections_per_target: 1,
            reconnect_budget: Duration::from_millis(100),
            verify_budget: Duration::from_millis(100),
            request_timeout: Duration::from_millis(200),
            ..LoadOptions::default()
        };
        let h = LoadGen::start(vec![("gone".into(), addr)], o).unwrap();
        // The worker gives up by itself; stop then returns a report with no acked writes.
        while h.workers.iter().any(|w| !w.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let r = h.stop();
        assert_eq!(r.per_target[0].gave_up_connections, 1);
        assert_eq!(r.totals.acked_writes, 0);
        assert!(r.lossless());
    }
}
