//! `mk-upgrade rollout --plan PLAN.toml [--dry-run] [--json] [--junit FILE]
//! [--summary-md FILE]`: a kernel rolled out to a fleet in waves — canary first, a bake after
//! each wave with every host of it re-checked, gates, a failure budget, a per-host timeout,
//! rollback of every upgraded host on abort (newest first), a lock, resume. See
//! `docs/fleet.md` for the plan and `docs/cli.md` for the exit codes.
//!
//! Hosts are `local:STATE_DIR` (this machine's `mk-upgrade --state-dir STATE_DIR`: one
//! machine, and the tests) or `ssh://[user@]host[:port]` (`ssh -o BatchMode=yes -o
//! ConnectTimeout=… -o ServerAliveInterval=… -o ServerAliveCountMax=…`; the kernel and its
//! signature are copied to `remote_dir` first). On a replace platform (luo) a successful
//! apply ends in a kexec that takes the apply client with it: the outcome is then read back
//! from the host once it answers again (`status --json` until no upgrade is in flight,
//! then the newest `history --json` record that was not there before), within the host
//! timeout.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::app::{CliError, Global};
use upgrade_agent::exit::Exit;

/// `mk-upgrade rollout`.
#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    /// The plan (TOML; see docs/fleet.md).
    #[arg(long)]
    pub plan: PathBuf,
    /// Print the wave plan and exit: nothing is touched.
    #[arg(long)]
    pub dry_run: bool,
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
    /// Write a JUnit XML report (one testcase per host and per gate evaluation).
    #[arg(long)]
    pub junit: Option<PathBuf>,
    /// Write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY).
    #[arg(long)]
    pub summary_md: Option<PathBuf>,
}

/// A wave size: a count or a percentage of all hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WaveSize {
    Count(usize),
    Percent(String),
}

/// A host: its address and extra environment for its commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HostEntry {
    Url(String),
    Full {
        url: String,
        #[serde(default)]
        env: std::collections::BTreeMap<String, String>,
    },
}

/// A gate, evaluated after each wave's bake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Gate {
    /// A command (argv); exit 0 passes. It gets MK_ROLLOUT_WAVE and MK_ROLLOUT_HOSTS.
    Exec {
        #[serde(default)]
        name: Option<String>,
        command: Vec<String>,
        #[serde(default)]
        timeout: Option<String>,
    },
    /// A PromQL instant query against Prometheus' HTTP API (http:// only); every sample
    /// must be `<=` (or `compare`) the threshold; no sample fails unless `allow_empty`.
    Prometheus {
        #[serde(default)]
        name: Option<String>,
        url: String,
        query: String,
        threshold: f64,
        #[serde(default)]
        compare: Option<String>,
        #[serde(default)]
        allow_empty: bool,
    },
}

impl Gate {
    fn name(&self, i: usize) -> String {
        match self {
            Gate::Exec { name, command, .. } => name
                .clone()
                .unwrap_or_else(|| format!("gate {i}: {}", command.join(" "))),
            Gate::Prometheus { name, query, .. } => {
                name.clone().unwrap_or_else(|| format!("gate {i}: {query}"))
            }
        }
    }
}

/// The plan file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub hosts: Vec<HostEntry>,
    pub kernel: PathBuf,
    #[serde(default)]
    pub signature: Option<PathBuf>,
    #[serde(default = "default_canary")]
    pub canary: usize,
    #[serde(default)]
    pub waves: Vec<WaveSize>,
    #[serde(default)]
    pub bake: Option<String>,
    #[serde(default, rename = "gate")]
    pub gates: Vec<Gate>,
    #[serde(default)]
    pub max_failures: usize,
    #[serde(default)]
    pub host_timeout: Option<String>,
    #[serde(default = "default_true")]
    pub rollback_on_abort: bool,
    /// The lock file (default: the plan's path + ".lock").
    #[serde(default)]
    pub lock: Option<PathBuf>,
    /// Where ssh hosts receive the kernel (default /var/lib/mk-upgrade/incoming).
    #[serde(default)]
    pub remote_dir: Option<String>,
    /// mk-upgrade on ssh hosts (default `mk-upgrade`).
    #[serde(default)]
    pub mk_upgrade: Option<String>,
    /// The ssh client (default `ssh`).
    #[serde(default)]
    pub ssh: Option<String>,
    /// `--platform` for every host command (default: the hosts' own `auto`).
    #[serde(default)]
    pub platform: Option<String>,
    /// Extra `apply` arguments.
    #[serde(default)]
    pub apply_args: Vec<String>,
}

fn default_canary() -> usize {
    1
}
fn default_true() -> bool {
    true
}

/// The longest duration a plan may give (bake, host timeout, gate timeout).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 86_400);

/// Parses `90s`, `15m`, `2h`, `500ms` or plain seconds (at most [`MAX_DURATION`]).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("invalid duration {s:?} (use 500ms, 90s, 15m, 2h)");
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(bad()),
    };
    if d > MAX_DURATION {
        return Err(format!(
            "duration {s:?} is longer than the 7 days a plan may ask for"
        ));
    }
    Ok(d)
}

/// Splits `hosts` into waves: `canary` first, then each size (a count, or a percentage of
/// all hosts, at least 1), then whatever remains as one last wave.
pub fn waves(
    n: usize,
    canary: usize,
    sizes: &[WaveSize],
) -> Result<Vec<std::ops::Range<usize>>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut take = |k: usize, out: &mut Vec<std::ops::Range<usize>>| {
        let k = k.min(n - at);
        if k > 0 {
            out.push(at..at + k);
            at += k;
        }
    };
    take(canary.max(1), &mut out);
    for s in sizes {
        let k = match s {
            WaveSize::Count(c) => *c,
            WaveSize::Percent(p) => {
                let v: f64 = p
                    .trim()
                    .strip_suffix('%')
                    .and_then(|v| v.trim().parse().ok())
                    .filter(|v: &f64| *v > 0.0 && *v <= 100.0)
                    .ok_or_else(|| {
                        format!("invalid wave size {p:?}: a count or \"N%\" (0 < N <= 100)")
                    })?;
                ((n as f64 * v / 100.0).ceil() as usize).max(1)
            }
        };
        if k == 0 {
            return Err("a wave of 0 hosts".into());
        }
        take(k, &mut out);
    }
    take(usize::MAX, &mut out);
    Ok(out)
}

/// How to reach one host.
#[derive(Debug, Clone)]
pub enum Target {
    Local {
        state_dir: PathBuf,
    },
    Ssh {
        user: Option<String>,
        host: String,
        port: Option<u16>,
    },
}

/// Parses a host address.
pub fn parse_host(url: &str) -> Result<Target, String> {
    if let Some(dir) = url.strip_prefix("local:") {
        if dir.is_empty() {
            return Err(format!("host {url:?}: local: needs a state directory"));
        }
        return Ok(Target::Local {
            state_dir: PathBuf::from(dir),
        });
    }
    if let Some(rest) = url.strip_prefix("ssh://") {
        let (user, hostport) = match rest.split_once('@') {
            Some((u, h)) => (Some(u.to_owned()), h),
            None => (None, rest),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.contains(']') || h.ends_with(']') => (
                h.to_owned(),
                Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("host {url:?}: bad port {p:?}"))?,
                ),
            ),
            _ => (hostport.to_owned(), None),
        };
        let ok = |s: &str| {
            !s.starts_with('-')
                && !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b))
        };
        if !ok(&host) || user.as_deref().is_some_and(|u| !ok(u)) {
            return Err(format!("host {url:?}: invalid user or host name"));
        }
        return Ok(Target::Ssh { user, host, port });
    }
    Err(format!(
        "host {url:?}: use local:STATE_DIR or ssh://[user@]host[:port]"
    ))
}

/// One command's result.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    timed_out: bool,
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A host of the running rollout.
#[derive(Debug, Clone)]
struct Host {
    url: String,
    target: Target,
    env: std::collections::BTreeMap<String, String>,
}

/// Rollout-wide settings the host commands need.
#[derive(Debug, Clone)]
struct Ctx {
    exe: PathBuf,
    ssh: String,
    mk_upgrade: String,
    platform: Option<String>,
    timeout: Duration,
}

const SSH_OPTS: [&str; 8] = [
    "-o",
    "BatchMode=yes",
    "-o",
    "ConnectTimeout=10",
    "-o",
    "ServerAliveInterval=5",
    "-o",
    "ServerAliveCountMax=3",
];

/// Runs `c` (its own process group), killed with the group after `timeout`; output capped.
fn run_bounded(mut c: Command, timeout: Duration, stdin: Option<&Path>) -> Ran {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    match stdin.map(std::fs::File::open) {
        Some(Ok(f)) => {
            c.stdin(f);
        }
        Some(Err(e)) => {
            return Ran {
                code: None,
                stdout: String::new(),
                stderr: e.to_string(),
                timed_out: false,
            };
        }
        None => {
            c.stdin(Stdio::null());
        }
    }
    // Its own process group: a timeout kills ssh and whatever it started locally.
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    let mut child = match c.spawn() {
        Ok(ch) => ch,
        Err(e) => {
            return Ran {
                code: None,
                stdout: String::new(),
                stderr: format!("cannot start: {e}"),
                timed_out: false,
            };
        }
    };
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    // Readers on threads that report through channels: a descendant that keeps a pipe open
    // after the command ends cannot hold the rollout (see the bounded receive below).
    let reader = |pipe: Option<Box<dyn Read + Send>>, cap: u64| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(p) = pipe {
                let mut p = p.take(cap);
                let _ = p.read_to_string(&mut s);
                // Drain the rest so the writer never blocks on a full pipe.
                let _ = std::io::copy(&mut p.into_inner(), &mut std::io::sink());
            }
            let _ = tx.send(s);
        });
        rx
    };
    let t_out = reader(
        out.take().map(|o| Box::new(o) as Box<dyn Read + Send>),
        16 << 20,
    );
    let t_err = reader(
        err.take().map(|e| Box::new(e) as Box<dyn Read + Send>),
        1 << 20,
    );
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                if let Ok(pid) = i32::try_from(child.id()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    Ran {
        code: status.and_then(|s| s.code()),
        stdout: t_out
            .recv_timeout(Duration::from_secs(2))
            .unwrap_or_default(),
        stderr: t_err
            .recv_timeout(Duration::from_secs(2))
            .unwrap_or_default(),
        timed_out,
    }
}

impl Host {
    /// `ssh OPTIONS [-p PORT] [USER@]HOST --` (ssh hosts only).
    fn ssh(&self, ctx: &Ctx) -> Command {
        let mut c = Command::new(&ctx.ssh);
        c.args(SSH_OPTS);
        if let Target::Ssh { user, host, port } = &self.target {
            if let Some(p) = port {
                c.args(["-p", &p.to_string()]);
            }
            c.arg(match user {
                Some(u) => format!("{u}@{host}"),
                None => host.clone(),
            });
        }
        c.arg("--");
        c
    }

    /// Copies `local` to `dst` on an ssh host (through a temporary name, then `mv`).
    fn push(&self, ctx: &Ctx, local: &Path, dir: &str, dst: &str) -> Result<(), String> {
        let (q, d) = (shell_quote(dst), shell_quote(dir));
        let mut c = self.ssh(ctx);
        c.arg(format!("mkdir -p {d} && cat > {q}.tmp && mv {q}.tmp {q}"));
        let r = run_bounded(c, ctx.timeout, Some(local));
        if r.code == Some(0) {
            Ok(())
        } else if r.timed_out {
            Err(format!(
                "copying {} to {dst}: no answer within the host timeout ({:?})",
                local.display(),
                ctx.timeout
            ))
        } else {
            Err(format!(
                "copying {} to {dst} failed (exit {:?}): {}",
                local.display(),
                r.code,
                r.stderr.lines().last().unwrap_or("")
            ))
        }
    }

    fn command(&self, ctx: &Ctx, args: &[String]) -> Command {
        match &self.target {
            Target::Local { state_dir } => {
                let mut c = Command::new(&ctx.exe);
                c.arg("--state-dir").arg(state_dir);
                if let Some(p) = &ctx.platform {
                    c.args(["--platform", p]);
                }
                c.args(args);
                c.envs(&self.env);
                c
            }
            Target::Ssh { .. } => {
                let mut c = self.ssh(ctx);
                let mut remote: Vec<String> = self
                    .env
                    .iter()
                    .map(|(k, v)| format!("{k}={}", shell_quote(v)))
                    .collect();
                remote.push(shell_quote(&ctx.mk_upgrade));
                if let Some(p) = &ctx.platform {
                    remote.push(format!("--platform {}", shell_quote(p)));
                }
                remote.extend(args.iter().map(|a| shell_quote(a)));
                c.arg(remote.join(" "));
                c
            }
        }
    }

    /// Runs `mk-upgrade ARGS` on the host, killed after `timeout`.
    fn run(&self, ctx: &Ctx, args: &[String], timeout: Duration, stdin: Option<&Path>) -> Ran {
        run_bounded(self.command(ctx, args), timeout, stdin)
    }

    fn json(&self, ctx: &Ctx, args: &[&str], timeout: Duration) -> Result<Value, String> {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let r = self.run(ctx, &args, timeout, None);
        if r.timed_out {
            return Err(format!("`{}` timed out after {timeout:?}", args.join(" ")));
        }
        serde_json::from_str(r.stdout.trim()).map_err(|_| {
            format!(
                "`{}` gave no JSON (exit {:?}): {}",
                args.join(" "),
                r.code,
                r.stderr.lines().last().unwrap_or("")
            )
        })
    }
}

/// What became of one host.
#[derive(Debug, Clone, Serialize)]
pub struct HostResult {
    pub host: String,
    pub wave: usize,
    /// upgraded, current, rolled-back, refused, failed, timeout, unreachable, not-started,
    /// skipped, reverted (rolled back after an abort), revert-failed.
    pub outcome: String,
    pub upgrade_id: Option<String>,
    pub kernel_before: Option<String>,
    pub kernel_after: Option<String>,
    pub detail: String,
    pub seconds: f64,
    /// The apply client died with the kexec; the outcome was read back from the host.
    pub reconnected: bool,
}

impl HostResult {
    fn new(host: &str, wave: usize, outcome: &str, detail: String) -> Self {
        HostResult {
            host: host.to_owned(),
            wave,
            outcome: outcome.to_owned(),
            upgrade_id: None,
            kernel_before: None,
            kernel_after: None,
            detail,
            seconds: 0.0,
            reconnected: false,
        }
    }
}

/// Copies the kernel and its signature to an ssh host; returns the kernel's remote path.
fn push_kernel(
    h: &Host,
    ctx: &Ctx,
    kernel: &Path,
    sig: &Path,
    dir: &str,
) -> Result<String, String> {
    let name = kernel
        .file_name()
        .map_or("bzImage".into(), |n| n.to_string_lossy().into_owned());
    let remote = format!("{dir}/{name}");
    h.push(ctx, kernel, dir, &remote)?;
    h.push(ctx, sig, dir, &format!("{remote}.sig"))?;
    Ok(remote)
}

/// One gate evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct GateResult {
    pub name: String,
    pub wave: usize,
    pub passed: bool,
    pub detail: String,
    pub seconds: f64,
}

fn interrupted() -> bool {
    upgrade_agent::sys::signals::termination_requested()
}

fn release_of(path: &Path) -> Result<String, CliError> {
    let bytes = std::fs::read(path)
        .map_err(|e| CliError::new(Exit::Io, format!("{}: {e}", path.display())))?;
    upgrade_agent::verify::bzimage::parse(&bytes)
        .map(|i| i.release)
        .map_err(|e| CliError::new(Exit::NotAKernel, format!("{}: {e}", path.display())))
}

/// The running kernel of a `status --json` document (the single active instance).
fn running_release(status: &Value) -> Option<String> {
    let active: Vec<&Value> = status["instances"]
        .as_array()?
        .iter()
        .filter(|i| i["state"] == "active")
        .collect();
    (active.len() == 1).then(|| active[0]["kernel_release"].as_str().map(str::to_owned))?
}

/// Whether a host is settled and healthy on `release`: one active instance running it, no
/// upgrade in flight, every workload running and not frozen.
fn healthy_on(status: &Value, release: &str) -> Result<(), String> {
    if !status["upgrade_in_flight"].is_null() {
        return Err("an upgrade is in flight".into());
    }
    match running_release(status) {
        Some(r) if r == release => {}
        Some(r) => return Err(format!("runs {r}, not {release}")),
        None => return Err("no single active instance".into()),
    }
    for i in status["instances"].as_array().into_iter().flatten() {
        for w in i["workloads"].as_array().into_iter().flatten() {
            if w["state"] != "running" || w["frozen"] == true {
                return Err(format!(
                    "workload {} is {}{}",
                    w["name"].as_str().unwrap_or("?"),
                    w["state"].as_str().unwrap_or("?"),
                    if w["frozen"] == true { " (frozen)" } else { "" }
                ));
            }
        }
    }
    Ok(())
}

fn history_ids(doc: &Value) -> BTreeSet<String> {
    doc.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["upgrade_id"].as_str().map(str::to_owned))
        .collect()
}

/// Runs `apply` (or `rollback`) on a host and classifies the outcome; when the client dies
/// without a result (a kexec took it), reads the result back from the host.
fn run_upgrade(
    host: &Host,
    ctx: &Ctx,
    args: &[String],
    target_release: Option<&str>,
) -> HostResult {
    let start = Instant::now();
    let mut res = HostResult::new(&host.url, 0, "", String::new());
    let quick = ctx.timeout.min(Duration::from_secs(60));
    let before = host
        .json(ctx, &["history", "--json"], quick)
        .map(|h| history_ids(&h));
    let before = match before {
        Ok(b) => b,
        Err(e) => {
            res.outcome = "unreachable".into();
            res.detail = e;
            return res;
        }
    };
    let r = host.run(ctx, args, ctx.timeout, None);
    let doc: Option<Value> = serde_json::from_str(r.stdout.trim()).ok();
    let finish = |res: &mut HostResult, doc: &Value| {
        res.upgrade_id = doc["upgrade_id"].as_str().map(str::to_owned);
        res.kernel_before = doc["kernel_before"].as_str().map(str::to_owned);
        res.kernel_after = doc["kernel_after"].as_str().map(str::to_owned);
        let result = doc["result"].as_str().unwrap_or("failed");
        result.clone_into(&mut res.outcome);
        doc["error"]
            .as_str()
            .unwrap_or("")
            .clone_into(&mut res.detail);
    };
    match (&doc, r.code) {
        (_, Some(14)) => {
            res.outcome = "current".into();
            res.detail = "the target kernel already runs".into();
        }
        (Some(d), _) if d.get("result").is_some() && d.get("upgrade_id").is_some() => {
            finish(&mut res, d);
        }
        (Some(d), _) if d.get("result").is_some() => {
            d["result"]
                .as_str()
                .unwrap_or("failed")
                .clone_into(&mut res.outcome);
            d["error"]
                .as_str()
                .unwrap_or("")
                .clone_into(&mut res.detail);
        }
        _ if r.timed_out => {
            res.outcome = "timeout".into();
            res.detail = format!("no result within the host timeout ({:?})", ctx.timeout);
        }
        _ => {
            // The client died (ssh 255, killed) without a result: a kexec may have taken
            // it. Reconnect within the host timeout and read the outcome back.
            res.reconnected = true;
            let deadline = start + ctx.timeout;
            let mut last = format!(
                "the apply client ended without a result (exit {:?}: {})",
                r.code,
                r.stderr.lines().last().unwrap_or("")
            );
            loop {
                if Instant::now() >= deadline {
                    res.outcome = "timeout".into();
                    res.detail = format!(
                        "{last}; the host did not report an outcome within {:?}",
                        ctx.timeout
                    );
                    break;
                }
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .min(quick);
                match host.json(ctx, &["status", "--json"], left) {
                    Ok(st) if st["upgrade_in_flight"].is_null() => {
                        match host.json(ctx, &["history", "--json"], left) {
                            Ok(h) => {
                                let new = h.as_array().into_iter().flatten().find(|r| {
                                    r["upgrade_id"]
                                        .as_str()
                                        .is_some_and(|id| !before.contains(id))
                                        && target_release.is_none_or(|t| r["kernel_after"] == t)
                                });
                                if let Some(rec) = new {
                                    finish(&mut res, rec);
                                    break;
                                }
                                last = "the host answers but has no record of the upgrade".into();
                                res.outcome = "failed".into();
                                res.detail.clone_from(&last);
                                break;
                            }
                            Err(e) => last = e,
                        }
                    }
                    Ok(_) => last = "an upgrade is still in flight".into(),
                    Err(e) => last = e,
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    if res.detail.is_empty() && res.outcome != "upgraded" && res.outcome != "current" {
        r.stderr
            .lines()
            .last()
            .unwrap_or("")
            .clone_into(&mut res.detail);
    }
    res.seconds = start.elapsed().as_secs_f64();
    res
}

fn http_get(url: &str, timeout: Duration) -> Result<String, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("{url}: only http:// is supported (use an exec gate with curl for https)")
    })?;
    let (hostport, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    })
    .map_err(|e| format!("{hostport}: {e}"))?
    .next()
    .ok_or_else(|| format!("{hostport}: no address"))?;
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {hostport}\r\nAccept: application/json\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.take(8 << 20)
        .read_to_string(&mut body)
        .map_err(|e| e.to_string())?;
    let (head, body) = body
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1) != Some("200") {
        return Err(format!("HTTP {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_owned())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Checks a gate before anything is touched (a mistake found after the canary would cost
/// an upgrade and a rollback).
fn validate_gate(gate: &Gate) -> Result<(), String> {
    match gate {
        Gate::Exec {
            command, timeout, ..
        } => {
            if command.first().is_none_or(String::is_empty) {
                return Err("an exec gate needs a command (argv list)".into());
            }
            timeout.as_deref().map(parse_duration).transpose()?;
        }
        Gate::Prometheus {
            url,
            threshold,
            compare,
            ..
        } => {
            if !url.starts_with("http://") {
                return Err(format!(
                    "url {url:?}: only http:// is supported (use an exec gate with curl for https)"
                ));
            }
            if !threshold.is_finite() {
                return Err("threshold must be a finite number".into());
            }
            if let Some(c) = compare
                && !["<=", "<", ">=", ">", "=="].contains(&c.as_str())
            {
                return Err(format!("compare {c:?}: use <=, <, >=, > or =="));
            }
        }
    }
    Ok(())
}

fn eval_gate(gate: &Gate, wave: usize, hosts: &[String], base: &Path) -> Result<String, String> {
    match gate {
        Gate::Exec {
            command, timeout, ..
        } => {
            let timeout = timeout
                .as_deref()
                .map(parse_duration)
                .transpose()?
                .unwrap_or(Duration::from_secs(300));
            let (prog, args) = command
                .split_first()
                .ok_or("an exec gate needs a command")?;
            let mut c = Command::new(prog);
            c.args(args)
                .current_dir(base)
                .env("MK_ROLLOUT_WAVE", wave.to_string())
                .env("MK_ROLLOUT_HOSTS", hosts.join(" "));
            let r = run_bounded(c, timeout, None);
            match (r.code, r.timed_out) {
                (_, true) => Err(format!("timed out after {timeout:?}")),
                (Some(0), _) => Ok("exit 0".into()),
                (code, _) => Err(format!(
                    "exit {}: {}",
                    code.map_or_else(|| "by a signal".to_owned(), |c| c.to_string()),
                    r.stderr.lines().last().unwrap_or("")
                )),
            }
        }
        Gate::Prometheus {
            url,
            query,
            threshold,
            compare,
            allow_empty,
            ..
        } => {
            let full = format!(
                "{}/api/v1/query?query={}",
                url.trim_end_matches('/'),
                urlencode(query)
            );
            let body = http_get(&full, Duration::from_secs(30))?;
            let doc: Value = serde_json::from_str(&body).map_err(|e| format!("not JSON: {e}"))?;
            if doc["status"] != "success" {
                return Err(format!(
                    "query failed: {}",
                    doc["error"].as_str().unwrap_or("?")
                ));
            }
            let mut values = Vec::new();
            match doc["data"]["resultType"].as_str() {
                Some("vector") => {
                    for s in doc["data"]["result"].as_array().into_iter().flatten() {
                        values.push(
                            s["value"][1]
                                .as_str()
                                .and_then(|v| v.parse::<f64>().ok())
                                .ok_or("a sample without a value")?,
                        );
                    }
                }
                Some("scalar") => values.push(
                    doc["data"]["result"][1]
                        .as_str()
                        .and_then(|v| v.parse().ok())
                        .ok_or("a scalar without a value")?,
                ),
                other => return Err(format!("unsupported result type {other:?}")),
            }
            if values.is_empty() {
                return if *allow_empty {
                    Ok("no samples (allowed)".into())
                } else {
                    Err("the query returned no samples".into())
                };
            }
            let op = compare.as_deref().unwrap_or("<=");
            let ok = |v: f64| match op {
                "<=" => v <= *threshold,
                "<" => v < *threshold,
                ">=" => v >= *threshold,
                ">" => v > *threshold,
                "==" => (v - threshold).abs() < f64::EPSILON,
                _ => false,
            };
            if !["<=", "<", ">=", ">", "=="].contains(&op) {
                return Err(format!("invalid compare {op:?}"));
            }
            match values.iter().find(|v| !ok(**v)) {
                None => Ok(format!("{} sample(s) {op} {threshold}", values.len())),
                Some(v) => Err(format!("sample {v} is not {op} {threshold}")),
            }
        }
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ok_outcome(o: &str) -> bool {
    o == "upgraded" || o == "current"
}

/// The JUnit report.
pub fn junit(hosts: &[HostResult], gates: &[GateResult], release: &str) -> String {
    let cases = hosts.len() + gates.len();
    let failures = hosts
        .iter()
        .filter(|h| !ok_outcome(&h.outcome) && h.outcome != "not-started")
        .count()
        + gates.iter().filter(|g| !g.passed).count();
    let skipped = hosts.iter().filter(|h| h.outcome == "not-started").count();
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n<testsuite name=\"mk-upgrade rollout {}\" tests=\"{cases}\" failures=\"{failures}\" skipped=\"{skipped}\">\n",
        xml(release)
    );
    for h in hosts {
        let _ = write!(
            out,
            "  <testcase classname=\"wave-{}\" name=\"{}\" time=\"{:.3}\">",
            h.wave,
            xml(&h.host),
            h.seconds
        );
        if h.outcome == "not-started" {
            out.push_str(
                "<skipped message=\"not started: the rollout stopped before this wave\"/>",
            );
        } else if !ok_outcome(&h.outcome) {
            let _ = write!(
                out,
                "<failure message=\"{}\">{}</failure>",
                xml(&h.outcome),
                xml(&h.detail)
            );
        }
        out.push_str("</testcase>\n");
    }
    for g in gates {
        let _ = write!(
            out,
            "  <testcase classname=\"gate.wave-{}\" name=\"{}\" time=\"{:.3}\">",
            g.wave,
            xml(&g.name),
            g.seconds
        );
        if !g.passed {
            let _ = write!(
                out,
                "<failure message=\"gate failed\">{}</failure>",
                xml(&g.detail)
            );
        }
        out.push_str("</testcase>\n");
    }
    out.push_str("</testsuite>\n</testsuites>\n");
    out
}

fn markdown(doc: &Value) -> String {
    let mut s = format!(
        "## mk-upgrade rollout to `{}`: **{}**\n\n",
        doc["kernel_release"].as_str().unwrap_or("?"),
        doc["result"].as_str().unwrap_or("?")
    );
    if let Some(r) = doc["reason"].as_str() {
        let _ = write!(s, "{r}\n\n");
    }
    s.push_str("| host | wave | outcome | before | after | seconds | detail |\n|---|---|---|---|---|---|---|\n");
    for h in doc["hosts"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {} | {} | {:.1} | {} |",
            h["host"].as_str().unwrap_or(""),
            h["wave"],
            h["outcome"].as_str().unwrap_or(""),
            h["kernel_before"].as_str().unwrap_or("-"),
            h["kernel_after"].as_str().unwrap_or("-"),
            h["seconds"].as_f64().unwrap_or(0.0),
            h["detail"].as_str().unwrap_or("").replace('|', "\\|")
        );
    }
    if let Some(gs) = doc["gates"].as_array().filter(|g| !g.is_empty()) {
        s.push_str("\n| gate | wave | passed | detail |\n|---|---|---|---|\n");
        for g in gs {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                g["name"].as_str().unwrap_or("").replace('|', "\\|"),
                g["wave"],
                if g["passed"] == true { "yes" } else { "**no**" },
                g["detail"].as_str().unwrap_or("").replace('|', "\\|")
            );
        }
    }
    s
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::new(Exit::Usage, e.to_string())
}

/// Runs `mk-upgrade rollout`.
pub fn run(_g: &Global, a: &RolloutArgs) -> Result<ExitCode, CliError> {
    let text = std::fs::read_to_string(&a.plan)
        .map_err(|e| CliError::new(Exit::Io, format!("{}: {e}", a.plan.display())))?;
    let plan: Plan =
        toml::from_str(&text).map_err(|e| usage(format!("{}: {e}", a.plan.display())))?;
    let base = a.plan.parent().unwrap_or(Path::new("."));
    let rel = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };
    let kernel = rel(&plan.kernel);
    let sig = plan
        .signature
        .as_deref()
        .map_or_else(|| upgrade_agent::verify::default_sig_path(&kernel), rel);
    let release = release_of(&kernel)?;
    let mut hosts = Vec::new();
    for h in &plan.hosts {
        let (url, env) = match h {
            HostEntry::Url(u) => (u.clone(), std::collections::BTreeMap::default()),
            HostEntry::Full { url, env } => (url.clone(), env.clone()),
        };
        let target = match parse_host(&url).map_err(usage)? {
            // A relative state directory is relative to the plan, like every path in it.
            Target::Local { state_dir } if state_dir.is_relative() => Target::Local {
                state_dir: base.join(state_dir),
            },
            t => t,
        };
        if let Some(k) = env.keys().find(|k| {
            k.is_empty()
                || k.starts_with(|c: char| c.is_ascii_digit())
                || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        }) {
            return Err(usage(format!(
                "host {url}: environment name {k:?} is not [A-Za-z_][A-Za-z0-9_]*"
            )));
        }
        if hosts.iter().any(|x: &Host| x.url == url) {
            return Err(usage(format!("host {url} is listed twice")));
        }
        hosts.push(Host { url, target, env });
    }
    if hosts.is_empty() {
        return Err(usage("the plan lists no hosts"));
    }
    for (i, g) in plan.gates.iter().enumerate() {
        validate_gate(g).map_err(|e| usage(format!("{}: {e}", g.name(i + 1))))?;
    }
    let ranges = waves(hosts.len(), plan.canary, &plan.waves).map_err(usage)?;
    let bake = plan
        .bake
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(usage)?
        .unwrap_or_default();
    let timeout = plan
        .host_timeout
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(usage)?
        .unwrap_or(Duration::from_secs(1800));
    if a.dry_run {
        let doc = json!({
            "dry_run": true,
            "kernel": kernel, "kernel_release": release,
            "waves": ranges.iter().enumerate().map(|(i, r)| json!({
                "wave": i + 1, "canary": i == 0,
                "hosts": hosts[r.clone()].iter().map(|h| h.url.clone()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "bake_seconds": bake.as_secs_f64(),
            "gates": plan.gates.iter().enumerate().map(|(i, g)| g.name(i + 1)).collect::<Vec<_>>(),
            "max_failures": plan.max_failures,
            "host_timeout_seconds": timeout.as_secs_f64(),
            "rollback_on_abort": plan.rollback_on_abort,
        });
        if a.json {
            println!("{doc}");
        } else {
            println!(
                "rollout of {} ({release}) to {} host(s), dry run:",
                kernel.display(),
                hosts.len()
            );
            for (i, r) in ranges.iter().enumerate() {
                let names: Vec<&str> = hosts[r.clone()].iter().map(|h| h.url.as_str()).collect();
                println!(
                    "  wave {}{}: {}",
                    i + 1,
                    if i == 0 { " (canary)" } else { "" },
                    names.join(", ")
                );
            }
            println!(
                "  bake {bake:?} then {} gate(s) after each wave; max_failures {}; host timeout {timeout:?}; rollback on abort: {}",
                plan.gates.len(),
                plan.max_failures,
                plan.rollback_on_abort
            );
        }
        return Ok(Exit::Ok.into());
    }
    if !sig.is_file() {
        return Err(CliError::new(
            Exit::Io,
            format!(
                "{}: the kernel's signature is missing (sign it: `mk-upgrade sign`)",
                sig.display()
            ),
        ));
    }
    // The rollout lock: two pipelines never drive the same fleet at once.
    let lock_path = plan.lock.as_deref().map_or_else(
        || {
            let mut p = a.plan.clone().into_os_string();
            p.push(".lock");
            PathBuf::from(p)
        },
        rel,
    );
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| CliError::new(Exit::Io, format!("{}: {e}", lock_path.display())))?;
    let mut lock =
        match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, e)) if e != nix::errno::Errno::EWOULDBLOCK => {
                return Err(CliError::new(
                    Exit::Io,
                    format!("cannot lock {}: {e}", lock_path.display()),
                ));
            }
            Err((mut f, _)) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                return Err(CliError::new(
                    Exit::Busy,
                    format!(
                        "another rollout holds {} ({}); wait for it or stop it",
                        lock_path.display(),
                        holder.trim()
                    ),
                ));
            }
        };
    let _ = lock.set_len(0);
    let _ = writeln!(
        lock,
        "pid {} since {}",
        std::process::id(),
        upgrade_agent::events::rfc3339_ms(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        )
    );
    // SIGINT/SIGTERM: stop starting hosts, let the running ones finish, report.
    upgrade_agent::sys::signals::catch_termination()
        .map_err(|e| CliError::new(Exit::Internal, format!("installing signal handlers: {e}")))?;
    let ctx = Ctx {
        exe: std::env::current_exe().map_err(|e| CliError::new(Exit::Internal, e.to_string()))?,
        ssh: plan.ssh.clone().unwrap_or_else(|| "ssh".into()),
        mk_upgrade: plan
            .mk_upgrade
            .clone()
            .unwrap_or_else(|| "mk-upgrade".into()),
        platform: plan.platform.clone(),
        timeout,
    };
    let remote_dir = plan
        .remote_dir
        .clone()
        .unwrap_or_else(|| "/var/lib/mk-upgrade/incoming".into());
    let started = Instant::now();
    let mut results: Vec<HostResult> = Vec::new();
    let mut gate_results: Vec<GateResult> = Vec::new();
    let mut failures = 0usize;
    let mut abort: Option<String> = None;
    let mut upgraded_order: Vec<usize> = Vec::new();
    let say = |s: String| {
        if !a.json {
            eprintln!("[{:>7.1} s] {s}", started.elapsed().as_secs_f64());
        }
    };
    for (wi, range) in ranges.iter().enumerate() {
        let wave = wi + 1;
        if abort.is_some() || interrupted() {
            for i in range.clone() {
                results.push(HostResult::new(
                    &hosts[i].url,
                    wave,
                    "not-started",
                    String::new(),
                ));
            }
            continue;
        }
        say(format!(
            "wave {wave}{}: {} host(s)",
            if wave == 1 { " (canary)" } else { "" },
            range.len()
        ));
        let wave_results: Vec<(usize, HostResult)> = std::thread::scope(|sc| {
            let handles: Vec<_> = range
                .clone()
                .map(|i| {
                    let h = hosts[i].clone();
                    let ctx = ctx.clone();
                    let kernel = kernel.clone();
                    let sig = sig.clone();
                    let remote_dir = remote_dir.clone();
                    let release = release.clone();
                    let apply_args = plan.apply_args.clone();
                    sc.spawn(move || {
                        let kpath = match &h.target {
                            Target::Local { .. } => kernel.display().to_string(),
                            Target::Ssh { .. } => {
                                match push_kernel(&h, &ctx, &kernel, &sig, &remote_dir) {
                                    Ok(remote) => remote,
                                    Err(e) => {
                                        return (
                                            i,
                                            HostResult::new(&h.url, wave, "unreachable", e),
                                        );
                                    }
                                }
                            }
                        };
                        let mut args = vec![
                            "apply".to_owned(),
                            "--kernel".to_owned(),
                            kpath,
                            "--json".to_owned(),
                        ];
                        args.extend(apply_args);
                        let mut r = run_upgrade(&h, &ctx, &args, Some(&release));
                        r.wave = wave;
                        (i, r)
                    })
                })
                .collect();
            handles
                .into_iter()
                .zip(range.clone())
                .map(|(h, i)| {
                    h.join().unwrap_or_else(|_| {
                        (
                            i,
                            HostResult::new(
                                &hosts[i].url,
                                wave,
                                "failed",
                                "the rollout's worker for this host failed (a bug: report it); \
                                 check the host by hand"
                                    .into(),
                            ),
                        )
                    })
                })
                .collect()
        });
        let mut wave_failed = false;
        for (i, r) in wave_results {
            say(format!(
                "  {}: {}{}",
                r.host,
                r.outcome,
                if r.detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.detail)
                }
            ));
            if r.outcome == "upgraded" {
                upgraded_order.push(i);
            }
            if !ok_outcome(&r.outcome) {
                failures += 1;
                wave_failed = true;
            }
            results.push(r);
        }
        if failures > plan.max_failures {
            abort = Some(format!(
                "{failures} host(s) failed, more than max_failures = {}",
                plan.max_failures
            ));
            continue;
        }
        if interrupted() {
            abort = Some("interrupted: hosts already upgraded stay upgraded; run the same plan again to resume".into());
            continue;
        }
        // Bake, then re-check every host of the wave, then the gates.
        if !bake.is_zero() {
            say(format!("  baking {bake:?}"));
            let until = Instant::now() + bake;
            while Instant::now() < until && !interrupted() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if interrupted() {
            abort = Some(
                "interrupted: hosts already upgraded stay upgraded; run the same plan again to resume"
                    .into(),
            );
            continue;
        }
        for i in range.clone() {
            let Some(r) = results
                .iter_mut()
                .find(|r| r.host == hosts[i].url && r.wave == wave)
            else {
                continue;
            };
            if !ok_outcome(&r.outcome) {
                continue;
            }
            let check = hosts[i]
                .json(
                    &ctx,
                    &["status", "--json"],
                    ctx.timeout.min(Duration::from_secs(60)),
                )
                .and_then(|st| healthy_on(&st, &release));
            if let Err(e) = check {
                say(format!("  {}: re-check after the bake failed: {e}", r.host));
                r.outcome = "failed".into();
                r.detail = format!("re-check after the bake: {e}");
                failures += 1;
                wave_failed = true;
            }
        }
        let wave_hosts: Vec<String> = hosts[range.clone()].iter().map(|h| h.url.clone()).collect();
        for (gi, gate) in plan.gates.iter().enumerate() {
            let t = Instant::now();
            let r = eval_gate(gate, wave, &wave_hosts, base);
            let g = GateResult {
                name: gate.name(gi + 1),
                wave,
                passed: r.is_ok(),
                detail: r.unwrap_or_else(|e| e),
                seconds: t.elapsed().as_secs_f64(),
            };
            say(format!(
                "  gate {}: {} ({})",
                g.name,
                if g.passed { "passed" } else { "FAILED" },
                g.detail
            ));
            if !g.passed {
                abort = Some(format!(
                    "gate {:?} failed after wave {wave}: {}",
                    g.name, g.detail
                ));
            }
            gate_results.push(g);
        }
        if abort.is_none() && failures > plan.max_failures {
            abort = Some(format!(
                "{failures} host(s) failed, more than max_failures = {}",
                plan.max_failures
            ));
        }
        let _ = wave_failed;
    }
    // Abort: roll back every host this rollout upgraded, newest first.
    let mut reverted_all = true;
    if abort
        .as_deref()
        .is_some_and(|r| !r.starts_with("interrupted"))
        && plan.rollback_on_abort
    {
        for &i in upgraded_order.iter().rev() {
            say(format!("rolling back {}", hosts[i].url));
            let r = run_upgrade(
                &hosts[i],
                &ctx,
                &["rollback".to_owned(), "--json".to_owned()],
                None,
            );
            let Some(res) = results.iter_mut().find(|x| x.host == hosts[i].url) else {
                continue;
            };
            if r.outcome == "upgraded" {
                res.outcome = "reverted".into();
                res.detail = format!(
                    "rolled back after the abort (upgrade {})",
                    r.upgrade_id.unwrap_or_default()
                );
            } else {
                reverted_all = false;
                res.outcome = "revert-failed".into();
                res.detail = format!("rollback after the abort: {} {}", r.outcome, r.detail);
            }
        }
    }
    // Interrupted only when the interruption stopped the rollout (not when it came during
    // the rollback of an abort: that is still an abort).
    let by_interrupt = abort
        .as_deref()
        .is_some_and(|r| r.starts_with("interrupted"));
    let result = match (&abort, by_interrupt) {
        (None, _) => "complete",
        (Some(_), true) => "interrupted",
        // "Rolled back" only when every host touched is known to run the old kernel.
        (Some(_), _)
            if plan.rollback_on_abort
                && reverted_all
                && results.iter().all(|r| {
                    matches!(
                        r.outcome.as_str(),
                        "reverted" | "rolled-back" | "refused" | "not-started"
                    )
                }) =>
        {
            "aborted-rolled-back"
        }
        (Some(_), _) => "aborted",
    };
    let doc = json!({
        "result": result,
        "reason": abort,
        "kernel": kernel, "kernel_release": release,
        "hosts": results,
        "gates": gate_results,
        "failures": failures,
        "seconds": started.elapsed().as_secs_f64(),
    });
    if a.json {
        println!("{doc}");
    } else {
        for h in &results {
            println!(
                "{:<40} wave {:<2} {:<14} {}",
                h.host, h.wave, h.outcome, h.detail
            );
        }
        for g in &gate_results {
            println!(
                "gate {:<35} wave {:<2} {:<14} {}",
                g.name,
                g.wave,
                if g.passed { "passed" } else { "FAILED" },
                g.detail
            );
        }
        println!(
            "ROLLOUT {}{}",
            result.to_uppercase(),
            abort.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
        );
    }
    // The reports come after the result is printed: one that cannot be written is a
    // warning, never a change of the fleet's outcome or exit code.
    if let Some(p) = &a.junit
        && let Err(e) = std::fs::write(p, junit(&results, &gate_results, &release))
    {
        eprintln!(
            "mk-upgrade: warning: cannot write the JUnit report {}: {e}",
            p.display()
        );
    }
    if let Some(p) = &a.summary_md {
        let w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .and_then(|mut f| f.write_all(markdown(&doc).as_bytes()));
        if let Err(e) = w {
            eprintln!(
                "mk-upgrade: warning: cannot write the Markdown summary {}: {e}",
                p.display()
            );
        }
    }
    Ok(match result {
        "complete" => Exit::Ok,
        "aborted-rolled-back" => Exit::RolledBack,
        "interrupted" => Exit::Busy,
        _ => Exit::Platform,
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_take_the_canary_then_counts_and_percentages_then_the_rest() {
        let w = |n, c, s: &[WaveSize]| waves(n, c, s).unwrap();
        assert_eq!(w(5, 1, &[]), [0..1, 1..5]);
        assert_eq!(
            w(
                10,
                1,
                &[WaveSize::Count(2), WaveSize::Percent("50%".into())]
            ),
            [0..1, 1..3, 3..8, 8..10]
        );
        assert_eq!(w(1, 3, &[WaveSize::Count(2)]), vec![0..1]);
        assert!(waves(5, 1, &[WaveSize::Percent("0%".into())]).is_err());
        assert!(waves(5, 1, &[WaveSize::Count(0)]).is_err());
    }

    #[test]
    fn hosts_parse_and_bad_ones_are_named() {
        assert!(matches!(
            parse_host("local:/s").unwrap(),
            Target::Local { .. }
        ));
        match parse_host("ssh://root@db1.example:2222").unwrap() {
            Target::Ssh { user, host, port } => assert_eq!(
                (user.as_deref(), host.as_str(), port),
                (Some("root"), "db1.example", Some(2222))
            ),
            t @ Target::Local { .. } => panic!("{t:?}"),
        }
        for bad in [
            "db1",
            "local:",
            "ssh://a b",
            "ssh://h:99999",
            "ssh://-oProxyCommand=x",
        ] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plan_mistakes_are_refused_before_anything_runs() {
        let exec = |command: &[&str], timeout: Option<&str>| Gate::Exec {
            name: None,
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            timeout: timeout.map(str::to_owned),
        };
        assert!(validate_gate(&exec(&["true"], Some("5m"))).is_ok());
        assert!(validate_gate(&exec(&[], None)).is_err());
        assert!(validate_gate(&exec(&[""], None)).is_err());
        assert!(validate_gate(&exec(&["true"], Some("5 parsecs"))).is_err());
        let prom = |url: &str, threshold: f64, compare: Option<&str>| Gate::Prometheus {
            name: None,
            url: url.into(),
            query: "up".into(),
            threshold,
            compare: compare.map(str::to_owned),
            allow_empty: false,
        };
        assert!(validate_gate(&prom("http://p:9090", 0.1, Some(">="))).is_ok());
        assert!(validate_gate(&prom("https://p", 0.1, None)).is_err());
        assert!(validate_gate(&prom("http://p", f64::NAN, None)).is_err());
        assert!(validate_gate(&prom("http://p", 0.1, Some("=<"))).is_err());
        // Durations beyond a week (which would overflow deadlines) are refused.
        assert!(parse_duration("8d").is_err());
        assert!(parse_duration("9300000000000000000").is_err());
        assert!(parse_duration("168h").is_ok());
    }

    #[test]
    fn durations_and_quoting() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("x").is_err());
        assert_eq!(shell_quote("a b'c"), "'a b'\\''c'");
        assert_eq!(shell_quote("/v/k.sig"), "/v/k.sig");
    }

    #[test]
    fn junit_marks_failures_and_skips() {
        let h = |host: &str, outcome: &str| HostResult {
            host: host.into(),
            wave: 1,
            outcome: outcome.into(),
            upgrade_id: None,
            kernel_before: None,
            kernel_after: None,
            detail: "d<".into(),
            seconds: 1.0,
            reconnected: false,
        };
        let x = junit(
            &[
                h("a", "upgraded"),
                h("b", "rolled-back"),
                h("c", "not-started"),
            ],
            &[GateResult {
                name: "g".into(),
                wave: 1,
                passed: false,
                detail: "x".into(),
                seconds: 0.1,
            }],
            "7.2",
        );
        assert!(
            x.contains("tests=\"4\" failures=\"2\" skipped=\"1\""),
            "{x}"
        );
        assert!(x.contains("<failure message=\"rolled-back\">d&lt;</failure>"));
    }
}
