//! `mk-upgrade multikernel`: the multikernel platform's own verbs.
//!
//! * `overlay baseline|create|update|delete … -o FILE`: write the exact blob the platform
//!   would write (the same code path, `upgrade_agent::platform::multikernel::overlay`), so
//!   operators can audit it (`--print` shows it decoded). Byte-identical to kerf 0.4.0's for
//!   the same request (`tests/multikernel/kerf-compat.sh`).
//! * `init --kernel K [--cpus SPEC]`: boot the first instance on the pool and start the
//!   declared workloads (like `emu init`); `down`: halt and remove every instance.
//!
//! Every line says which kernel it drove: the real interface or the SIMULATED kernel
//! (`MK_MULTIKERNEL_SIM=DIR`).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::app::{CliError, Global};
use crate::upgrade::CheckResult;
use upgrade_agent::exit::Exit;
use upgrade_agent::platform::multikernel::{
    KernelKind, MultikernelPlatform, SIM_ENV, fdt, overlay,
};
use upgrade_agent::sys::multikernel as mk;

/// `mk-upgrade multikernel ...`.
#[derive(Debug, clap::Args)]
pub struct MultikernelArgs {
    #[command(subcommand)]
    pub command: MkCommand,
}

impl MultikernelArgs {
    /// Whether one JSON document was asked for.
    pub fn json(&self) -> bool {
        matches!(self.command, MkCommand::Init { json: true, .. })
    }
}

/// `mk-upgrade multikernel` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum MkCommand {
    /// Write a multikernel blob to a file (nothing is applied).
    Overlay {
        #[command(subcommand)]
        blob: OverlayCommand,
    },
    /// Boot the first instance with KERNEL on the pool and start the declared workloads.
    Init {
        /// The kernel the first instance runs (a bzImage; its vmlinux is loaded).
        #[arg(long)]
        kernel: PathBuf,
        /// Cpus of the first instance (default: the first pool cpu), e.g. "0" or "0-1".
        #[arg(long)]
        cpus: Option<String>,
        /// Write a pool baseline with these cpus first, when the kernel has no pool.
        #[arg(long, requires = "pool_memory")]
        pool_cpus: Option<String>,
        /// Memory of that baseline (kerf's spellings or MiB/GiB).
        #[arg(long, requires = "pool_cpus")]
        pool_memory: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Halt and remove every instance (stops their workloads).
    Down,
}

/// Where a blob goes and whether to show it.
#[derive(Debug, Clone, clap::Args)]
pub struct Output {
    /// The file to write.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Also print the blob decoded (DTS-like) on stdout.
    #[arg(long)]
    pub print: bool,
}

/// The blobs.
#[derive(Debug, clap::Subcommand)]
pub enum OverlayCommand {
    /// The pool baseline DTB (written to /sys/fs/multikernel/device_tree).
    Baseline {
        /// Pool cpus (APIC ids), e.g. "1-3".
        #[arg(long)]
        cpus: String,
        /// Pool memory: kerf's spellings (256MB = 256 MiB, 2GB) or MiB/GiB, on the NUMA
        /// node of the first cpu; or per node, "1GB@1,512MB@0".
        #[arg(long)]
        memory: String,
        #[command(flatten)]
        out: Output,
    },
    /// An instance-create overlay.
    Create {
        name: String,
        /// The instance id (omitted: the kernel assigns one).
        #[arg(long)]
        id: Option<u16>,
        #[arg(long)]
        cpus: String,
        #[arg(long)]
        memory: String,
        /// A PCI device handed to the instance (DDDD:BB:SS.F); repeatable.
        #[arg(long = "device")]
        devices: Vec<String>,
        #[command(flatten)]
        out: Output,
    },
    /// A resize overlay of one instance.
    Update {
        name: String,
        /// Cpus to give the instance.
        #[arg(long)]
        cpu_add: Option<String>,
        /// Cpus to take back.
        #[arg(long)]
        cpu_remove: Option<String>,
        /// A free pool range to give, BASE+SIZE (e.g. 0x140000000+128MiB); repeatable.
        #[arg(long)]
        memory_add: Vec<String>,
        /// A whole region of the instance to take back, BASE+SIZE; repeatable.
        #[arg(long)]
        memory_remove: Vec<String>,
        #[arg(long)]
        device_add: Vec<String>,
        #[arg(long)]
        device_remove: Vec<String>,
        #[command(flatten)]
        out: Output,
    },
    /// An instance-remove overlay.
    Delete {
        name: String,
        #[command(flatten)]
        out: Output,
    },
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::new(Exit::Usage, e.to_string())
}

/// Parses `BASE+SIZE` (base in hex with 0x or decimal; size as [`overlay::parse_size`]).
fn parse_range(s: &str) -> Result<(u64, u64), CliError> {
    let (b, z) = s.split_once('+').ok_or_else(|| {
        usage(format!(
            "invalid range {s:?}: expected BASE+SIZE, e.g. 0x140000000+128MiB"
        ))
    })?;
    let b = b.trim();
    let base = match b.strip_prefix("0x").or_else(|| b.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => b.parse(),
    }
    .map_err(|_| usage(format!("invalid base {b:?} in {s:?}")))?;
    if base % overlay::PAGE_SIZE != 0 {
        return Err(usage(format!(
            "base {base:#x} in {s:?} is not page aligned"
        )));
    }
    Ok((base, overlay::parse_size(z).map_err(usage)?))
}

/// Builds the blob a command asks for: (blob, output).
pub fn build(cmd: &OverlayCommand) -> Result<(Vec<u8>, &Output), CliError> {
    Ok(match cmd {
        OverlayCommand::Baseline { cpus, memory, out } => {
            let cpus = overlay::parse_cpus(cpus).map_err(usage)?;
            let node = overlay::numa_node_of_cpu(std::path::Path::new("/"), cpus[0]);
            let mem = overlay::parse_pool_memory(memory, node).map_err(usage)?;
            (overlay::baseline(&cpus, &mem), out)
        }
        OverlayCommand::Create {
            name,
            id,
            cpus,
            memory,
            devices,
            out,
        } => {
            let req = overlay::CreateRequest {
                name: name.clone(),
                id: *id,
                cpus: overlay::parse_cpus(cpus).map_err(usage)?,
                memory_bytes: overlay::parse_size(memory).map_err(usage)?,
                devices: devices.clone(),
            };
            req.validate().map_err(usage)?;
            (overlay::create(&req), out)
        }
        OverlayCommand::Update {
            name,
            cpu_add,
            cpu_remove,
            memory_add,
            memory_remove,
            device_add,
            device_remove,
            out,
        } => {
            overlay::check_name(name).map_err(usage)?;
            let cpus = |s: &Option<String>| -> Result<Vec<u32>, CliError> {
                s.as_deref()
                    .map_or(Ok(Vec::new()), |s| overlay::parse_cpus(s).map_err(usage))
            };
            for d in device_add.iter().chain(device_remove) {
                overlay::check_pci(d).map_err(usage)?;
            }
            let ops = overlay::UpdateOps {
                memory_remove: memory_remove
                    .iter()
                    .map(|r| parse_range(r))
                    .collect::<Result<_, _>>()?,
                memory_add: memory_add
                    .iter()
                    .map(|r| parse_range(r))
                    .collect::<Result<_, _>>()?,
                cpu_remove: cpus(cpu_remove)?,
                cpu_add: cpus(cpu_add)?,
                device_remove: device_remove.clone(),
                device_add: device_add.clone(),
            };
            if ops.is_empty() {
                return Err(usage(
                    "nothing to update: pass --cpu-add, --cpu-remove, --memory-add, \
                     --memory-remove, --device-add or --device-remove",
                ));
            }
            (overlay::update(name, &ops), out)
        }
        OverlayCommand::Delete { name, out } => {
            overlay::check_name(name).map_err(usage)?;
            (overlay::delete(name), out)
        }
    })
}

/// The label of a multikernel upgrade record in this process's environment.
pub fn record_label() -> &'static str {
    if std::env::var_os(SIM_ENV).is_some() {
        " [multikernel: SIMULATED kernel]"
    } else {
        " [multikernel: real kernel interface]"
    }
}

/// `check --platform multikernel`: on the real interface, names each missing piece of the
/// patch set (false: the platform cannot be probed); on the simulated kernel, says so.
pub fn host_checks(_g: &Global, out: &mut Vec<CheckResult>) -> bool {
    if let Some(dir) = std::env::var_os(SIM_ENV) {
        out.push(CheckResult {
            name: "multikernel",
            ok: true,
            detail: format!(
                "SIMULATED multikernel kernel in {} ({SIM_ENV}): no multikernel kernel runs here",
                PathBuf::from(dir).display()
            ),
            fix: None,
        });
        return true;
    }
    let missing = mk::probe_host(
        std::path::Path::new(mk::DEFAULT_ROOT),
        std::path::Path::new("/"),
        mk::vsock_transport_probe,
    );
    if missing.is_empty() {
        out.push(CheckResult {
            name: "multikernel",
            ok: true,
            detail: format!(
                "real multikernel interface: {} mounted, CONFIG_MULTIKERNEL=y, vsock transport",
                mk::DEFAULT_ROOT
            ),
            fix: None,
        });
        return true;
    }
    for m in missing {
        out.push(CheckResult {
            name: m.what,
            ok: false,
            detail: m.detail,
            fix: Some(m.fix.into()),
        });
    }
    false
}

fn perr(e: impl std::fmt::Display) -> CliError {
    CliError::new(Exit::Platform, e.to_string())
}

/// Runs a `multikernel` subcommand.
pub fn run(g: &Global, a: MultikernelArgs) -> Result<ExitCode, CliError> {
    match a.command {
        MkCommand::Overlay { blob } => {
            let (bytes, out) = build(&blob)?;
            std::fs::write(&out.output, &bytes).map_err(|e| {
                CliError::new(Exit::Io, format!("writing {}: {e}", out.output.display()))
            })?;
            use sha2::Digest;
            eprintln!(
                "wrote {} bytes (sha256 {}) to {}: the blob the multikernel platform writes \
                 for this request (nothing was applied)",
                bytes.len(),
                hex::encode(sha2::Sha256::digest(&bytes)),
                out.output.display()
            );
            if out.print {
                match fdt::parse(&bytes) {
                    Ok(tree) => print!("{tree}"),
                    Err(e) => return Err(perr(format!("decoding what was written: {e}"))),
                }
            }
        }
        MkCommand::Init {
            kernel,
            cpus,
            pool_cpus,
            pool_memory,
            json,
        } => {
            let _guard = crate::upgrade::lock(g)?;
            let cpus = match cpus {
                Some(s) => overlay::parse_cpus(&s).map_err(usage)?,
                None => Vec::new(),
            };
            g.ensure_state_dir()?;
            let mut p = MultikernelPlatform::open(&g.state_dir).map_err(perr)?;
            if let (Some(c), Some(m)) = (pool_cpus, pool_memory) {
                let c = overlay::parse_cpus(&c).map_err(usage)?;
                let m = overlay::parse_size(&m).map_err(usage)?;
                if p.ensure_pool(&c, m).map_err(perr)? {
                    eprintln!(
                        "{}: pool baseline written (cpus {c:?}, {} MiB)",
                        p.kind().label(),
                        m >> 20
                    );
                }
            }
            let label = p.kind().label();
            let booted = upgrade_agent::platform::emulated::machine::init_on(
                &g.state(),
                &mut p,
                &kernel,
                &cpus,
            )
            .map_err(|e| crate::emu::init_error(&e))?;
            if json {
                let mut doc = serde_json::to_value(&booted).unwrap_or_default();
                doc["emulated"] = false.into();
                doc["platform"] = label.into();
                doc["simulated"] = matches!(p.kind(), KernelKind::Simulated(_)).into();
                println!("{doc}");
            } else {
                println!(
                    "{label}: instance {} booted with kernel {} on cpus {:?}; {} workload(s) started",
                    booted.instance,
                    booted.kernel_release,
                    booted.cpus,
                    booted.workloads.len()
                );
            }
        }
        MkCommand::Down => {
            let _guard = crate::upgrade::lock(g)?;
            let mut p = MultikernelPlatform::open(&g.state_dir).map_err(perr)?;
            let n = crate::emu::down(&mut p)?;
            println!("{}: {n} instance(s) halted and removed", p.kind().label());
        }
    }
    Ok(Exit::Ok.into())
}
