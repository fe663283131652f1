//! The instance supervisor, `mk-agentd --instance ID`: one **emulated** kernel instance.
//!
//! What it stands for on a real multikernel host, and how it emulates it:
//!
//! | real instance                         | emulation                                         |
//! |---------------------------------------|---------------------------------------------------|
//! | a kernel booted on its own cpus       | this process, pinned with `sched_setaffinity`      |
//! | its `uname -r`                        | the release parsed from the loaded bzImage header |
//! | processes of that kernel              | children, pinned to the same cpus                 |
//! | its cgroup freezer                    | one cgroup v2 group per workload (SIGSTOP if none) |
//! | KHO/LUO-preserved memfds              | fds this process holds for each workload          |
//! | the IPI/vsock channel                 | `chan.sock`, kho-proto frames + SCM_RIGHTS        |
//!
//! It serves two sockets in its instance directory: `ctl.sock` (local control, see
//! [`super::ctl`]) and `chan.sock` (the inter-instance channel, see [`crate::host::receiver`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::host::ctl::{Request, Response};
use crate::model::{InstanceId, PreservedFd, WorkloadInfo};
use crate::sys::cgroup::Freezer;
use crate::sys::fdpass;
use crate::workload::WorkloadSpec;

/// Why the supervisor could not do what was asked of it.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A workload of that name runs here already.
    #[error("workload {0} already runs on this instance")]
    AlreadyRunning(String),
    /// No workload of that name runs here.
    #[error("workload {0:?} does not run on this instance")]
    NotRunning(String),
    /// A received task state without any process in it.
    #[error("the task state holds no process")]
    EmptyTaskState,
    /// Duplicating the preserved fds for the restored process failed.
    #[error("duplicating preserved fds: {0}")]
    DupFds(#[source] io::Error),
    /// Duplicating one preserved fd (to hand it to a client) failed.
    #[error("duplicating {name}: {source}")]
    DupFd {
        name: String,
        #[source]
        source: io::Error,
    },
    /// state-serializers could not restore the captured process.
    #[error("restoring {name}: {source}")]
    Restore {
        name: String,
        #[source]
        source: state_serializers::StateError,
    },
    /// Creating a fresh workload's memfds or listening sockets failed.
    #[error("preparing fds: {0}")]
    PrepareFds(#[source] io::Error),
    /// Starting the workload's executable failed.
    #[error("starting {}: {source}", .exec.display())]
    Start {
        exec: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Freezing, thawing or killing the workload (cgroup or signal) failed.
    #[error("{op} {name}: {source}")]
    Freezer {
        /// `freezing`, `thawing` or `killing`.
        op: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    /// Pinning this instance to new cpus failed.
    #[error("pinning to {cpus:?}: {source}")]
    Pin {
        cpus: Vec<u32>,
        #[source]
        source: io::Error,
    },
    /// An `Expect` request with a malformed upgrade id.
    #[error("bad upgrade id: {0}")]
    BadUpgradeId(#[source] kho_proto::channel::ParseUpgradeIdError),
    /// A request only the LUO host agent serves.
    #[error(
        "LuoApply is served only by the host agent of a LUO kernel (`mk-agentd serve`), not by \
         an emulated instance"
    )]
    NotServedHere,
}

/// A workload running on this instance.
#[derive(Debug)]
pub struct Running {
    pub spec: WorkloadSpec,
    pub child: Child,
    /// The preserved descriptors, in `MK_STATE_FDS` order.
    pub fds: Vec<PreservedFd>,
    pub frozen: bool,
    /// Received over the channel and not yet committed: killed if the channel drops.
    pub pending_commit: bool,
}

impl Running {
    fn info(&self) -> WorkloadInfo {
        WorkloadInfo {
            name: self.spec.name.clone(),
            pid: i32::try_from(self.child.id()).unwrap_or(-1),
            frozen: self.frozen,
            pending_commit: self.pending_commit,
        }
    }
}

/// The state of this instance.
#[derive(Debug)]
pub struct Instance {
    pub id: InstanceId,
    pub kernel_release: String,
    pub cpus: Vec<u32>,
    pub freezer: Freezer,
    pub workloads: BTreeMap<String, Running>,
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub halting: bool,
    /// The upgrade whose channel frames this instance accepts.
    pub expected_upgrade: Option<kho_proto::channel::UpgradeId>,
}

/// Shared handle to the instance.
pub type Shared = Arc<Mutex<Instance>>;

/// Locks the instance, recovering from a poisoned lock (a panicked handler thread must not
/// take the instance down with it).
pub fn lock(shared: &Shared) -> MutexGuard<'_, Instance> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn pin_self(cpus: &[u32]) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for c in cpus {
        set.set(*c as usize).map_err(io::Error::from)?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(io::Error::from)
}

fn pin_pid(pid: u32, cpus: &[u32]) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for c in cpus {
        set.set(*c as usize).map_err(io::Error::from)?;
    }
    let pid = i32::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(pid), &set).map_err(io::Error::from)
}

/// Starts `spec` as a child of this instance with `fds` at 3, 4, ... and `MK_STATE_FDS`
/// naming them, pinned to `cpus`, inside the workload's group when the freezer has one.
pub fn spawn_workload(
    spec: &WorkloadSpec,
    fds: &[PreservedFd],
    cpus: &[u32],
    freezer: &Freezer,
    extra_args: &[String],
) -> io::Result<Child> {
    use state_serializers::{fdenv, sys};
    let named: Vec<fdenv::NamedFd> = fds
        .iter()
        .zip(3..)
        .map(|(f, fd)| fdenv::NamedFd {
            name: f.name.clone(),
            fd,
        })
        .collect();
    let env_value = fdenv::format(&named).map_err(io::Error::other)?;
    // Move every source above the target range first, so no dup2 clobbers a later source.
    let floor = 3 + i32::try_from(fds.len()).unwrap_or(i32::MAX - 3) + 16;
    let sources: Vec<OwnedFd> = fds
        .iter()
        .map(|f| sys::dup_at_least(f.fd.as_fd(), floor))
        .collect::<io::Result<_>>()?;
    let raw_sources: Vec<i32> = sources.iter().map(AsRawFd::as_raw_fd).collect();
    let set = sys::cpu_set(cpus)?;
    let procs: Option<File> = match freezer.prepare(&spec.name)? {
        Some(p) => Some(File::options().write(true).open(p)?),
        None => None,
    };
    let procs_fd = procs.as_ref().map(AsRawFd::as_raw_fd);

    let mut cmd = Command::new(&spec.exec);
    cmd.args(&spec.args)
        .args(extra_args)
        .envs(&spec.env)
        .env(fdenv::ENV_VAR, env_value)
        .stdin(Stdio::null());
    crate::sys::spawn::place_before_exec(&mut cmd, procs_fd, set, raw_sources);
    let child = cmd.spawn();
    drop(sources);
    let child = child?;
    Ok(child)
}

/// Restarts a received workload from its captured task record (state-serializers'
/// restore): the same executable, arguments, environment, working directory, credentials,
/// rlimits and scheduling as on the old instance; pinned to this instance's cpus; in this
/// instance's group for it; its preserved fds at 3, 4, ... named in `MK_STATE_FDS`. What
/// could not be re-applied is logged (best-effort policy).
pub fn restore_workload(
    inst: &Instance,
    name: &str,
    task: &state_serializers::task::TaskState,
    fds: &[PreservedFd],
    extra_args: &[String],
) -> Result<Child, SupervisorError> {
    use state_serializers::restore::{self, SpawnOptions};
    let mut rec = task
        .tasks
        .first()
        .cloned()
        .ok_or(SupervisorError::EmptyTaskState)?;
    rec.affinity.clone_from(&inst.cpus);
    rec.cmdline.extend(extra_args.iter().cloned());
    let cgroup_root = match inst.freezer.hierarchy_path(name) {
        Some((mount, path)) => {
            rec.cgroup.path = path;
            Some(mount)
        }
        None => None,
    };
    // The old instance's cpuset does not describe this one.
    rec.cgroup.cpuset_cpus = None;
    let dup = fds
        .iter()
        .map(|p| p.fd.try_clone().map(|fd| (p.name.clone(), fd)))
        .collect::<io::Result<Vec<_>>>()
        .map_err(SupervisorError::DupFds)?;
    let spawned = restore::spawn(
        &rec,
        dup,
        SpawnOptions {
            cgroup_root,
            ..SpawnOptions::default()
        },
    )
    .map_err(|source| SupervisorError::Restore {
        name: name.to_owned(),
        source,
    })?;
    for w in &spawned.report.not_applied {
        tracing::warn!(workload = name, item = %w.item, reason = %w.reason, "not re-applied");
    }
    Ok(spawned.child)
}

/// Starts a received workload on this instance: restored from its task state when one
/// arrived (same exe, args, env, limits, with its preserved fds), else started from its spec;
/// `pending_commit` marks a copy that is stopped unless a commit follows.
pub fn admit(
    shared: &Shared,
    name: &str,
    spec: &WorkloadSpec,
    task: Option<&state_serializers::task::TaskState>,
    fds: Vec<PreservedFd>,
    extra_args: &[String],
    pending_commit: bool,
) -> Result<(), SupervisorError> {
    let mut inst = lock(shared);
    if inst.workloads.contains_key(name) {
        return Err(SupervisorError::AlreadyRunning(name.to_owned()));
    }
    let child =
        match task {
            Some(task) => restore_workload(&inst, name, task, &fds, extra_args)?,
            None => spawn_workload(spec, &fds, &inst.cpus, &inst.freezer, extra_args).map_err(
                |source| SupervisorError::Start {
                    exec: spec.exec.clone(),
                    source,
                },
            )?,
        };
    inst.workloads.insert(
        name.to_owned(),
        Running {
            spec: spec.clone(),
            child,
            fds,
            frozen: false,
            pending_commit,
        },
    );
    Ok(())
}

/// Runs `spec`'s health check against workload `name` and checks that its process is still
/// alive afterwards (a process that died after passing the check is not healthy). Returns
/// whether it is healthy and what was seen.
pub fn check_health(shared: &Shared, name: &str, spec: &WorkloadSpec) -> (bool, String) {
    let outcome = crate::health::run(&spec.health);
    let alive = lock(shared)
        .workloads
        .get_mut(name)
        .is_some_and(|w| matches!(w.child.try_wait(), Ok(None)));
    if !alive {
        (
            false,
            format!("the restored process exited ({})", outcome.detail),
        )
    } else if outcome.healthy {
        (true, outcome.detail)
    } else {
        (false, format!("health check failed: {}", outcome.detail))
    }
}

/// Creates the preserved descriptors a workload's first start needs: its memfds (sized,
/// sealable) and its bound listening sockets.
pub fn fresh_fds(spec: &WorkloadSpec) -> io::Result<Vec<PreservedFd>> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let mut out = Vec::new();
    for m in &spec.memfds {
        let fd = memfd_create(
            format!("mk:{}:{}", spec.name, m.name).as_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(io::Error::from)?;
        nix::unistd::ftruncate(&fd, i64::try_from(m.size).unwrap_or(i64::MAX))
            .map_err(io::Error::from)?;
        out.push(PreservedFd {
            name: m.name.clone(),
            fd,
        });
    }
    for l in &spec.listeners {
        let listener = std::net::TcpListener::bind(l.addr).map_err(|e| {
            io::Error::new(e.kind(), format!("binding {} for {}: {e}", l.addr, l.name))
        })?;
        out.push(PreservedFd {
            name: l.name.clone(),
            fd: OwnedFd::from(listener),
        });
    }
    Ok(out)
}

/// Serves one control request of the common protocol (every request but `LuoApply`,
/// which only the host agent of a LUO kernel serves, see [`crate::platform::luo`]).
pub fn handle_ctl(shared: &Shared, req: Request) -> (Response, Vec<OwnedFd>) {
    let mut inst = lock(shared);
    let result: Result<(Response, Vec<OwnedFd>), SupervisorError> = (|| {
        match req {
            Request::Ping => {
                reap(&mut inst);
                Ok((
                    Response::Pong {
                        id: inst.id,
                        kernel_release: inst.kernel_release.clone(),
                        cpus: inst.cpus.clone(),
                        freezer: inst.freezer.describe().to_owned(),
                        workloads: inst.workloads.values().map(Running::info).collect(),
                    },
                    vec![],
                ))
            }
            Request::Start { spec } => {
                if inst.workloads.contains_key(&spec.name) {
                    return Err(SupervisorError::AlreadyRunning(spec.name.clone()));
                }
                let fds = fresh_fds(&spec).map_err(SupervisorError::PrepareFds)?;
                let child = spawn_workload(&spec, &fds, &inst.cpus, &inst.freezer, &[]).map_err(
                    |source| SupervisorError::Start {
                        exec: spec.exec.clone(),
                        source,
                    },
                )?;
                let running = Running {
                    spec: *spec,
                    child,
                    fds,
                    frozen: false,
                    pending_commit: false,
                };
                let info = running.info();
                inst.workloads.insert(info.name.clone(), running);
                Ok((Response::Started(info), vec![]))
            }
            Request::Freeze { name } => {
                let inst = &mut *inst;
                let w = get(&mut inst.workloads, &name)?;
                inst.freezer.freeze(&name, w.info().pid).map_err(|source| {
                    SupervisorError::Freezer {
                        op: "freezing",
                        name: name.clone(),
                        source,
                    }
                })?;
                w.frozen = true;
                Ok((Response::Done, vec![]))
            }
            Request::Thaw { name } => {
                let inst = &mut *inst;
                let w = get(&mut inst.workloads, &name)?;
                inst.freezer.thaw(&name, w.info().pid).map_err(|source| {
                    SupervisorError::Freezer {
                        op: "thawing",
                        name: name.clone(),
                        source,
                    }
                })?;
                w.frozen = false;
                Ok((Response::Done, vec![]))
            }
            Request::Fds { name } => {
                let w = get(&mut inst.workloads, &name)?;
                let mut names = Vec::new();
                let mut fds = Vec::new();
                for p in &w.fds {
                    names.push(p.name.clone());
                    fds.push(p.fd.try_clone().map_err(|source| SupervisorError::DupFd {
                        name: p.name.clone(),
                        source,
                    })?);
                }
                Ok((Response::Fds { names }, fds))
            }
            Request::Stop { name } => {
                stop(&mut inst, &name)?;
                Ok((Response::Done, vec![]))
            }
            Request::Cpus { cpus } => {
                pin_self(&cpus).map_err(|source| SupervisorError::Pin {
                    cpus: cpus.clone(),
                    source,
                })?;
                for w in inst.workloads.values() {
                    // A workload may have exited; the next ping reports that.
                    let _ = pin_pid(w.child.id(), &cpus);
                }
                inst.cpus = cpus;
                Ok((Response::Done, vec![]))
            }
            Request::Expect { upgrade_id } => {
                inst.expected_upgrade =
                    Some(upgrade_id.parse().map_err(SupervisorError::BadUpgradeId)?);
                Ok((Response::Done, vec![]))
            }
            Request::Halt => {
                let names: Vec<String> = inst.workloads.keys().cloned().collect();
                for n in names {
                    stop(&mut inst, &n)?;
                }
                inst.halting = true;
                Ok((Response::Done, vec![]))
            }
            Request::LuoApply { .. } => Err(SupervisorError::NotServedHere),
        }
    })();
    result.unwrap_or_else(|e| {
        (
            Response::Error {
                message: e.to_string(),
            },
            vec![],
        )
    })
}

fn get<'a>(
    workloads: &'a mut BTreeMap<String, Running>,
    name: &str,
) -> Result<&'a mut Running, SupervisorError> {
    workloads
        .get_mut(name)
        .ok_or_else(|| SupervisorError::NotRunning(name.to_owned()))
}

/// Stops a workload: kills its processes, reaps it, drops its preserved fds and group.
pub fn stop(inst: &mut Instance, name: &str) -> Result<(), SupervisorError> {
    let mut w = inst
        .workloads
        .remove(name)
        .ok_or_else(|| SupervisorError::NotRunning(name.to_owned()))?;
    let pid = w.info().pid;
    inst.freezer
        .kill(name, pid)
        .map_err(|source| SupervisorError::Freezer {
            op: "killing",
            name: name.to_owned(),
            source,
        })?;
    // A frozen group dies on cgroup.kill; a SIGSTOPped process dies on SIGKILL.
    let _ = w.child.kill();
    let _ = w.child.wait();
    inst.freezer.remove(name);
    Ok(())
}

/// Forgets workloads whose process exited on its own.
fn reap(inst: &mut Instance) {
    let dead: Vec<String> = inst
        .workloads
        .iter_mut()
        .filter_map(|(n, w)| matches!(w.child.try_wait(), Ok(Some(_))).then(|| n.clone()))
        .collect();
    for n in dead {
        tracing::warn!(workload = %n, "workload exited on its own");
        let _ = stop(inst, &n);
    }
}

/// A control-request handler: the request, the fds attached to it; the response and the
/// fds to attach to it.
pub type CtlHandler =
    dyn Fn(&Shared, Request, Vec<OwnedFd>) -> (Response, Vec<OwnedFd>) + Send + Sync;

/// The handler of an emulated instance: [`handle_ctl`]; attached fds are ignored.
pub fn emulated_handler(
    shared: &Shared,
    req: Request,
    _fds: Vec<OwnedFd>,
) -> (Response, Vec<OwnedFd>) {
    handle_ctl(shared, req)
}

fn serve_ctl(shared: &Shared, stream: &UnixStream, handler: &CtlHandler) {
    while let Ok(Some((body, in_fds))) = fdpass::recv(stream) {
        let (resp, fds) = match serde_json::from_slice::<Request>(&body) {
            Ok(req) => handler(shared, req, in_fds),
            Err(e) => (
                Response::Error {
                    message: format!("malformed control request: {e}"),
                },
                vec![],
            ),
        };
        let body = serde_json::to_vec(&resp).unwrap_or_default();
        if fdpass::send(stream, &body, &fdpass::borrow_all(&fds)).is_err() {
            return;
        }
        if lock(shared).halting {
            halt_now(shared);
        }
    }
}

fn halt_now(shared: &Shared) -> ! {
    let inst = lock(shared);
    let _ = std::fs::remove_file(inst.dir.join("ctl.sock"));
    let _ = std::fs::remove_file(inst.dir.join("chan.sock"));
    inst.freezer.remove_base();
    tracing::info!(id = inst.id, "instance halted");
    std::process::exit(0);
}

/// Serves control connections on `ctl` (one thread each) with `handler`, until the
/// listener fails; a `Halt` ends the process (see [`handle_ctl`]).
pub fn serve_ctl_listener(shared: &Shared, ctl: &UnixListener, handler: &Arc<CtlHandler>) {
    let gate = super::peer::Gate::new(super::peer::MAX_CONTROL_CONNECTIONS);
    for conn in ctl.incoming().flatten() {
        // Only root or the agent's own user, and at most a few at once (host::peer).
        let Some(ticket) = super::peer::admit(&gate, &conn, "ctl.sock") else {
            continue;
        };
        let shared = Arc::clone(shared);
        let handler = Arc::clone(handler);
        std::thread::spawn(move || {
            serve_ctl(&shared, &conn, handler.as_ref());
            drop(ticket);
        });
    }
}
