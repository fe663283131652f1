//! Blackout benchmark (a bench binary, not a timed test): how long one workload is frozen
//! when it moves to a new (EMULATED) kernel instance, by state size and handover mode,
//! measured in one run against a copy-based baseline; and one apply of 100 workloads.
//!
//! `cargo build --release -p mk-demo-kv && cargo bench -p upgrade-agent --bench blackout`
//! (release build; the workload binary belongs to another package). Environment:
//! `MK_BENCH_SIZES_MIB` (default `1,64,1024`), `MK_BENCH_MOVES` (moves per configuration,
//! default 100), `MK_BENCH_MODES` (default
//! `share+identity,standby,share+digest,copy+digest,checkpoint`; `standby` is share + identity
//! with the new copy started before the freeze),
//! `MK_BENCH_MANY` (workload counts of the many-workload applies, default `100,250,500`,
//! `0` skips; peak RSS is `VmHWM`, this process's own).
//! Checkpoint mode (CRIU dumps and restores the same mk-demo-kv, which then creates its own
//! memfd and binds its own port) runs when `criu check` passes here; otherwise it prints
//! `SKIP` with the reason. Prints a Markdown table (copied into docs/performance.md) and
//! writes the report `target/bench/blackout.json` (`configs`, `many` (one entry per count),
//! `cgroup_favordynmods`).
//!
//! Beside each row, two baselines of the machine itself: the wake-up floor (8 round trips of
//! one byte through a `cat` child, sampled once after every move: a tail this has, every
//! hand-over has) and the share of CPU time the hypervisor stole during the row (`steal` of
//! `/proc/stat`). For each many-workload apply, the agents' CPU time during it
//! (`apply_agent_cpu_ms_per_workload`) and over 2 s of idleness after it
//! (`idle_agent_cpu_ms_per_s`: what supervising that many workloads costs), counted in a
//! cgroup of the bench's own ([`CpuScope`]; `null` without cgroup v2).

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use upgrade_agent::fault::Faults;
use upgrade_agent::orchestrator::{Quiet, SystemEnv, ops};
use upgrade_agent::platform::LoadableKernel;
use upgrade_agent::platform::emulated::{EmulatedPlatform, machine};
use upgrade_agent::record::{Outcome, UpgradeKind};
use upgrade_agent::statedir::StateDir;
use upgrade_agent::verify::bzimage::minimal_bzimage;
use upgrade_agent::workload::{
    HealthCheck, Integrity, ListenSpec, MemfdSpec, Transfer, WorkloadFile, WorkloadSpec,
};

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn free_ports(n: usize) -> Vec<SocketAddr> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    held.iter().map(|l| l.local_addr().expect("addr")).collect()
}

/// `mk-demo-kv` in the target directory (the bench binary lives in its `deps/`).
fn demo_kv_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("bench executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join("mk-demo-kv");
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --release -p mk-demo-kv` first",
        p.display()
    );
    p
}

/// The same mk-demo-kv in `mode = "checkpoint"`: no declared memfd or listener (it creates
/// its own memfd and binds its own port); CRIU moves the process.
fn checkpoint_spec(name: &str, addr: SocketAddr, mib: u64) -> WorkloadSpec {
    let mut s = spec(name, addr, mib, Transfer::Share, Integrity::Digest);
    s.memfds.clear();
    s.listeners.clear();
    s.args.extend(["--listen".to_owned(), addr.to_string()]);
    s.mode = upgrade_agent::workload::Mode::Checkpoint;
    s
}

fn spec(
    name: &str,
    addr: SocketAddr,
    mib: u64,
    transfer: Transfer,
    integrity: Integrity,
) -> WorkloadSpec {
    WorkloadSpec {
        args: vec![
            "--capacity".into(),
            format!("{}MiB", mib + 2),
            "--max-capacity".into(),
            format!("{}MiB", mib + 64),
            "--preload-mib".into(),
            mib.to_string(),
        ],
        memfds: vec![MemfdSpec {
            name: "kv-data".into(),
            size: 0,
        }],
        listeners: vec![ListenSpec {
            name: "listen".into(),
            addr,
        }],
        health: HealthCheck::Http {
            addr,
            path: "/health".into(),
            expect_status: 200,
            timeout_ms: 120_000,
        },
        transfer,
        integrity,
        ..WorkloadSpec::new(name, demo_kv_bin())
    }
}

struct Machine {
    _dir: tempfile::TempDir,
    state: StateDir,
    kernels: [(PathBuf, String); 2],
}

impl Machine {
    fn new(specs: Vec<WorkloadSpec>) -> Machine {
        let dir = tempfile::Builder::new()
            .prefix("mk-bench.")
            .tempdir()
            .expect("tempdir");
        let root = dir.path();
        let kernels = ["7.2.13-mkA", "7.2.13-mkB"].map(|r| {
            let p = root.join(format!("bzImage-{r}"));
            std::fs::write(&p, minimal_bzimage(r)).expect("kernel");
            (p, r.to_owned())
        });
        let file = WorkloadFile { workloads: specs };
        std::fs::write(
            root.join("workloads.toml"),
            toml::to_string(&file).expect("toml"),
        )
        .expect("workloads");
        let state =
            StateDir::new(root.join("state")).with_workloads(Some(root.join("workloads.toml")));
        let m = Machine {
            _dir: dir,
            state,
            kernels,
        };
        machine::init(&m.state, &m.kernels[0].0, &[]).unwrap_or_else(|e| panic!("emu init: {e}"));
        for w in &file.workloads {
            let h = upgrade_agent::health::run(&w.health);
            assert!(h.healthy, "{} did not start: {}", w.name, h.detail);
        }
        m
    }

    /// One upgrade to kernel `to` (0 = A, 1 = B); returns (handover_us, blackout_us) per
    /// workload and the total time.
    fn upgrade(&self, to: usize) -> (Vec<(u64, u64)>, Duration) {
        let (path, release) = &self.kernels[to];
        let bytes = std::fs::read(path).expect("kernel");
        let memfd = upgrade_agent::handover::sealed_memfd("bench-kernel", &bytes).expect("memfd");
        let kernel = LoadableKernel {
            image: memfd.as_fd(),
            release: release.clone(),
            sha256: sha(&bytes),
            initrd: None,
            cmdline: "",
        };
        let mut p = EmulatedPlatform::new(self.state.root()).expect("platform");
        let t = Instant::now();
        let req = ops::Request {
            kind: UpgradeKind::Apply,
            kernel,
            faults: Faults::NONE,
            promotion: None,
        };
        let (rec, err) = ops::execute(&self.state, &mut p, req, &Quiet, &SystemEnv::default())
            .unwrap_or_else(|e| panic!("upgrade: {e}"));
        let took = t.elapsed();
        assert_eq!(rec.outcome, Some(Outcome::Upgraded), "{err:?}");
        (
            rec.workloads
                .iter()
                .map(|w| (w.handover_us.unwrap_or(0), w.blackout_us.unwrap_or(0)))
                .collect(),
            took,
        )
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Ok(mut p) = EmulatedPlatform::new(self.state.root()) {
            let _ = machine::down(&mut p);
        }
    }
}

fn sha(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

/// p50, p99 and max of microsecond samples, in milliseconds. The p99 of fewer than 100
/// samples is their maximum (nearest rank), and says so by equalling it.
fn stats_ms(v: &mut [u64]) -> serde_json::Value {
    v.sort_unstable();
    let rank = |p: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        // Nearest rank: the smallest sample with at least p of them at or below it.
        let k = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[k - 1] as f64 / 1000.0
    };
    serde_json::json!({ "p50": rank(0.5), "p99": rank(0.99), "max": rank(1.0) })
}

fn memcpy_gbps(mib: u64) -> f64 {
    let n = usize::try_from(mib << 20).unwrap_or(usize::MAX);
    let src = vec![0x5au8; n];
    let mut dst = vec![0u8; n];
    dst.copy_from_slice(&src); // fault the pages in first
    let reps = (4096 / mib.max(1)).max(1);
    let t = Instant::now();
    for _ in 0..reps {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
    }
    (n as f64 * reps as f64) / t.elapsed().as_secs_f64() / 1e9
}

/// This process's peak resident set (`VmHWM` of `/proc/self/status`), in MiB. Not
/// `getrusage`'s `ru_maxrss`: the kernel carries that across `execve` from the address space
/// the process had before (here cargo's, which forked it), so it reports cargo's peak.
fn max_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// CPU time the hypervisor took from this machine so far (the `steal` column of
/// `/proc/stat`, summed over every cpu), in milliseconds; 0 where it is not reported.
fn steal_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .and_then(|l| l.split_whitespace().nth(7))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks * 1000.0 / hz
}

/// The machine's own wake-up latency, measured beside the moves: 8 round trips of one byte
/// through a `cat` child over pipes (16 cross-process wake-ups, about as many as a standby
/// hand-over makes between the orchestrator, both agents and the workload). Whatever tail
/// this has, a hand-over has at least.
struct WakeupFloor {
    child: std::process::Child,
    /// `None` only while dropping (closing it ends `cat`).
    tx: Option<std::process::ChildStdin>,
    rx: std::process::ChildStdout,
}

impl WakeupFloor {
    fn new() -> WakeupFloor {
        let mut child = std::process::Command::new("cat")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cat for the wake-up baseline");
        let tx = child.stdin.take();
        let rx = child.stdout.take().expect("cat's stdout pipe");
        WakeupFloor { child, tx, rx }
    }

    /// One sample, in microseconds.
    fn sample(&mut self) -> u64 {
        use std::io::{Read, Write};
        let tx = self.tx.as_mut().expect("cat's stdin pipe");
        let mut b = [0u8; 1];
        let t = Instant::now();
        for _ in 0..8 {
            tx.write_all(b"x").expect("write to cat");
            self.rx.read_exact(&mut b).expect("read from cat");
        }
        u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

impl Drop for WakeupFloor {
    fn drop(&mut self) {
        drop(self.tx.take());
        let _ = self.child.wait();
    }
}

/// Where the agents' CPU time is counted: a cgroup v2 group of this bench's own
/// (`mk-bench-<pid>` under the mount), which this process joins first. The agents it starts
/// stay in their starter's group (their workloads go to the instances' groups), so the
/// group's `cpu.stat` `usage_usec` minus this process's own time is the agents' CPU,
/// counting the processes that already exited (an old instance halted by the apply). Also
/// in the group: the `cat` of the wake-up floor, idle then. Without cgroup v2 (or root)
/// there is no such count: the figures are reported as `null`.
struct CpuScope {
    group: Option<PathBuf>,
    /// The group this process came from, to go back to when done.
    home: Option<PathBuf>,
}

impl CpuScope {
    fn join() -> CpuScope {
        let none = CpuScope {
            group: None,
            home: None,
        };
        let Some(mount) = upgrade_agent::sys::cgroup::cgroup2_mount() else {
            return none;
        };
        let home = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .map(|p| mount.join(p.trim_start_matches('/')))
            });
        let group = mount.join(format!("mk-bench-{}", std::process::id()));
        let joined = std::fs::create_dir(&group).and_then(|()| {
            std::fs::write(group.join("cgroup.procs"), std::process::id().to_string())
        });
        if let Err(e) = joined {
            println!(
                "the agents' CPU is not counted: cannot join {}: {e}",
                group.display()
            );
            let _ = std::fs::remove_dir(&group);
            return none;
        }
        CpuScope {
            group: Some(group),
            home,
        }
    }

    /// CPU time the agents have used so far, in milliseconds.
    fn agents_ms(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(self.group.as_ref()?.join("cpu.stat")).ok()?;
        let group_us = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))?
            .trim()
            .parse::<f64>()
            .ok()?;
        let own = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).ok()?;
        let us = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e6 + t.tv_usec() as f64;
        Some((group_us - us(own.user_time()) - us(own.system_time())) / 1000.0)
    }
}

impl Drop for CpuScope {
    fn drop(&mut self) {
        let (Some(group), Some(home)) = (&self.group, &self.home) else {
            return;
        };
        let _ = std::fs::write(home.join("cgroup.procs"), std::process::id().to_string());
        // Children still exiting keep the group busy for a moment: `remove_tree` waits
        // for them (on EBUSY) up to the deadline.
        let deadline = Instant::now() + upgrade_agent::sys::cgroup::REMOVE_PATIENCE;
        if !upgrade_agent::sys::cgroup::remove_tree(group, deadline) {
            println!("{} left behind (still busy)", group.display());
        }
    }
}

/// A mode a run may measure: its `MK_BENCH_MODES` name, its label, and how its memfds
/// move (`None`: checkpoint mode).
type BenchMode = (&'static str, &'static str, Option<(Transfer, Integrity)>);

/// The modes a run may measure.
const MODES: &[BenchMode] = &[
    (
        "share+identity",
        "share + identity (zero-copy)",
        Some((Transfer::Share, Integrity::Identity)),
    ),
    (
        "share+digest",
        "share + digest (default)",
        Some((Transfer::Share, Integrity::Digest)),
    ),
    (
        "copy+digest",
        "copy + digest (copy baseline)",
        Some((Transfer::Copy, Integrity::Digest)),
    ),
    (
        "standby",
        "share + identity + standby copy",
        Some((Transfer::Share, Integrity::Identity)),
    ),
    ("checkpoint", "checkpoint (CRIU dump + restore)", None),
];

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: both run it
    // with tiny sizes under test so the binary stays exercised.
    let quick = !std::env::args().any(|a| a == "--bench");
    let first = |name: &str, default: u64| {
        env_list(name, &default.to_string())
            .first()
            .copied()
            .unwrap_or(default)
    };
    let sizes = if quick {
        vec![1]
    } else {
        env_list("MK_BENCH_SIZES_MIB", "1,64,1024")
    };
    let moves = if quick {
        2
    } else {
        first("MK_BENCH_MOVES", 100)
    };
    let many = if quick {
        vec![3]
    } else {
        env_list("MK_BENCH_MANY", "100,250,500")
    };
    let wanted = std::env::var("MK_BENCH_MODES")
        .unwrap_or_else(|_| "share+identity,standby,share+digest,copy+digest,checkpoint".into());
    let wanted: Vec<&str> = wanted.split(',').map(str::trim).collect();
    if let Some(bad) = wanted.iter().find(|w| !MODES.iter().any(|m| m.0 == **w)) {
        panic!(
            "MK_BENCH_MODES: unknown mode {bad:?}; the modes are {}",
            MODES.iter().map(|m| m.0).collect::<Vec<_>>().join(", ")
        );
    }
    let scope = CpuScope::join();
    let criu = upgrade_agent::host::checkpoint::readiness();
    let mut modes = Vec::new();
    for m in MODES.iter().filter(|m| wanted.contains(&m.0)) {
        match (&criu, m.2) {
            (_, Some(_)) => modes.push(*m),
            (Ok(_), None) if !quick => modes.push(*m),
            (Ok(_), None) => {}
            (Err((why, _)), None) => println!("SKIP checkpoint rows: {why}"),
        }
    }
    let favordynmods = upgrade_agent::sys::cgroup::favordynmods();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    println!(
        "EMULATED multikernel platform; {} cpus; cgroup2 {}; memcpy baseline measured per size",
        cpus,
        match favordynmods {
            Some(true) => "mounted with favordynmods",
            Some(false) => "stock mount (no favordynmods)",
            None => "not found (SIGSTOP freezer)",
        }
    );
    // The many-workload applies run first, so the agent's peak RSS is not the memcpy
    // baseline's buffers; smallest first, so each peak is that count's.
    let mut many_rows = Vec::new();
    let mut counts: Vec<u64> = many.into_iter().filter(|n| *n > 0).collect();
    counts.sort_unstable();
    for n in counts {
        let n = usize::try_from(n).unwrap_or(100);
        let addrs = free_ports(n);
        let specs = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let mut s = spec(&format!("w-{i}"), *a, 0, Transfer::Share, Integrity::Digest);
                s.args = vec!["--capacity".into(), "1MiB".into()];
                s
            })
            .collect();
        let rss_before = max_rss_mib();
        let m = Machine::new(specs);
        let apply_cpu0 = scope.agents_ms();
        let (w, took) = m.upgrade(1);
        let apply_cpu_ms = scope.agents_ms().zip(apply_cpu0).map(|(b, a)| b - a);
        // What the agents cost while nothing happens: their supervision of n workloads.
        let idle = Duration::from_secs(2);
        let cpu0 = scope.agents_ms();
        std::thread::sleep(idle);
        let idle_cpu_ms_per_s = scope
            .agents_ms()
            .zip(cpu0)
            .map(|(b, a)| (b - a) / idle.as_secs_f64());
        drop(m);
        let mut black: Vec<u64> = w.iter().map(|x| x.1).collect();
        let b = stats_ms(&mut black);
        let row = serde_json::json!({
            "workloads": n,
            "total_ms": took.as_secs_f64() * 1000.0,
            "per_workload_ms": took.as_secs_f64() * 1000.0 / n as f64,
            "rss_mib": max_rss_mib(),
            "rss_mib_before": rss_before,
            "blackout_ms": { "p50": b["p50"], "p99": b["p99"] },
            "idle_agent_cpu_ms_per_s": idle_cpu_ms_per_s,
            "apply_agent_cpu_ms_per_workload": apply_cpu_ms.map(|c| c / n as f64),
        });
        println!(
            "{n} workloads in one apply: {:.0} ms total ({:.1} ms per workload), blackout p50 {} ms / p99 {} ms per workload, agent peak RSS {:.1} MiB ({rss_before:.1} MiB before the apply); the agents' CPU {} ms per workload during the apply, {} ms per second idle afterwards",
            row["total_ms"].as_f64().unwrap_or(0.0),
            row["per_workload_ms"].as_f64().unwrap_or(0.0),
            b["p50"],
            b["p99"],
            max_rss_mib(),
            apply_cpu_ms.map_or("(not counted)".into(), |c| format!("{:.2}", c / n as f64)),
            idle_cpu_ms_per_s.map_or("(not counted)".into(), |c| format!("{c:.1}")),
        );
        many_rows.push(row);
    }
    let mut configs = Vec::new();
    println!(
        "\n| state | mode | moves | handover p50 / p99 / max ms | blackout p50 / p99 / max ms | memcpy of the state ms | wake-up floor p50 / p99 ms | steal % |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut floor = WakeupFloor::new();
    for &mib in &sizes {
        let gbps = memcpy_gbps(mib.min(1024));
        let memcpy_ms = (mib << 20) as f64 / (gbps * 1e9) * 1000.0;
        for &(key, label, how) in &modes {
            let addr = free_ports(1)[0];
            let mut s = match how {
                Some((transfer, integrity)) => spec("kv-1", addr, mib, transfer, integrity),
                None => checkpoint_spec("kv-1", addr, mib),
            };
            s.standby = key == "standby";
            let m = Machine::new(vec![s]);
            let mut hand = Vec::new();
            let mut black = Vec::new();
            let mut wake = Vec::new();
            let (t0, steal0) = (Instant::now(), steal_ms());
            for i in 0..moves {
                let (w, _) = m.upgrade(usize::from(i % 2 == 0));
                hand.push(w[0].0);
                black.push(w[0].1);
                // One floor sample per move, under the same conditions.
                wake.push(floor.sample());
            }
            let steal_pct =
                (steal_ms() - steal0) / (t0.elapsed().as_secs_f64() * 1000.0 * cpus as f64) * 100.0;
            let (h, b, f) = (
                stats_ms(&mut hand),
                stats_ms(&mut black),
                stats_ms(&mut wake),
            );
            println!(
                "| {mib} MiB | {label} | {moves} | {} / {} / {} | {} / {} / {} | {memcpy_ms:.3} | {} / {} | {steal_pct:.1} |",
                h["p50"], h["p99"], h["max"], b["p50"], b["p99"], b["max"], f["p50"], f["p99"]
            );
            configs.push(serde_json::json!({
                "size_mib": mib, "mode": key, "label": label, "moves": moves,
                "handover_ms": h, "blackout_ms": b,
                "baseline_memcpy_ms": memcpy_ms, "memcpy_gbps": gbps,
                "wakeup_floor_ms": f, "steal_pct": steal_pct,
            }));
        }
    }
    let out = serde_json::json!({
        "quick": quick,
        "platform": "emulated",
        "cpus": cpus,
        "cgroup_favordynmods": favordynmods,
        "configs": configs,
        "many": many_rows,
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let path = dir.join("blackout.json");
    match std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, serde_json::to_vec_pretty(&out).unwrap_or_default()))
    {
        Ok(()) => println!("\nreport: {}", path.display()),
        Err(e) => println!("\nreport not written to {}: {e}", path.display()),
    }
}
