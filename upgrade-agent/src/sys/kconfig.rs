//! Does the running kernel have what a LUO live update needs? Reads the kernel configuration
//! (`/boot/config-$(uname -r)` or `/proc/config.gz`) and `/proc/cmdline`, and names every
//! missing option and boot flag, so `mk-upgrade check` can say exactly what to change.
//!
//! The option list is the one `kernel-patches/configs/kho-luo.config` builds test kernels with.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One kernel option the LUO path needs built in (`=y`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequiredOption {
    /// Full option name, `CONFIG_...`.
    pub name: &'static str,
    /// Why the agent needs it.
    pub why: &'static str,
}

/// Options that must be `=y` for a LUO live update (boot flags are checked separately).
pub const LUO_REQUIRED: &[RequiredOption] = &[
    RequiredOption {
        name: "CONFIG_KEXEC_FILE",
        why: "kexec_file_load(2), the only loader that carries KHO state",
    },
    RequiredOption {
        name: "CONFIG_RELOCATABLE",
        why: "kexec_file_load of a bzImage needs a relocatable kernel (else ENOEXEC)",
    },
    RequiredOption {
        name: "CONFIG_KEXEC_HANDOVER",
        why: "KHO: hands preserved memory to the next kernel",
    },
    RequiredOption {
        name: "CONFIG_LIVEUPDATE",
        why: "LUO: /dev/liveupdate sessions",
    },
    RequiredOption {
        name: "CONFIG_LIVEUPDATE_MEMFD",
        why: "preserving memfds (the state regions) in LUO sessions",
    },
    RequiredOption {
        name: "CONFIG_MEMFD_CREATE",
        why: "memfd_create(2) for the state regions",
    },
    RequiredOption {
        name: "CONFIG_SHMEM",
        why: "memfds are shmem files",
    },
    RequiredOption {
        name: "CONFIG_TMPFS",
        why: "memfd sealing and shmem-backed files",
    },
    RequiredOption {
        name: "CONFIG_BLK_DEV_INITRD",
        why: "the next kernel boots with an initramfs",
    },
];

/// Option that turns KHO on without `kho=on`.
pub const KHO_ENABLE_DEFAULT: &str = "CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT";
/// Optional debug interface (`/sys/kernel/debug/kho/`).
pub const KHO_DEBUGFS: &str = "CONFIG_KEXEC_HANDOVER_DEBUGFS";

/// Largest decompressed `/proc/config.gz` accepted, in bytes (16 MiB). A real kernel
/// configuration is 200-300 KiB of text; the cap only keeps a corrupt or hostile file (a
/// "gzip bomb": a few KiB that inflate to gigabytes) from filling memory.
pub const MAX_CONFIG_TEXT: u64 = 16 << 20;

/// Errors reading the running kernel's configuration.
#[derive(Debug, thiserror::Error)]
pub enum KconfigError {
    /// Neither config source exists.
    #[error(
        "cannot find the running kernel's configuration: tried {tried}; install the kernel's \
         config file under /boot or boot a kernel with CONFIG_IKCONFIG_PROC=y"
    )]
    NotFound {
        /// The paths tried, comma separated.
        tried: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `/proc/config.gz` could not be decompressed (not gzip, corrupt, or unreadable).
    #[error("cannot decompress {path}: {source}")]
    Decompress {
        /// The path.
        path: PathBuf,
        /// The decoder's (or the read's) error.
        #[source]
        source: std::io::Error,
    },
    /// `/proc/config.gz` decompresses to more than [`MAX_CONFIG_TEXT`] bytes.
    #[error(
        "{path} decompresses to more than {limit} bytes (a kernel configuration is a few hundred \
         KiB): refusing it"
    )]
    TooLarge {
        /// The path.
        path: PathBuf,
        /// The cap, [`MAX_CONFIG_TEXT`].
        limit: u64,
    },
}

/// A parsed kernel `.config`: option name → value (`y`, `m`, `n` for "is not set", or the
/// literal right-hand side for strings and numbers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelConfig {
    values: BTreeMap<String, String>,
}

impl KernelConfig {
    /// Parse `.config` text. Unknown lines are ignored; never fails.
    pub fn parse(text: &str) -> Self {
        let mut values = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# ") {
                if let Some(name) = rest.strip_suffix(" is not set") {
                    if name.starts_with("CONFIG_") && !name.contains(char::is_whitespace) {
                        values.insert(name.to_owned(), "n".to_owned());
                    }
                }
            } else if let Some((name, value)) = line.split_once('=') {
                if name.starts_with("CONFIG_") && !name.contains(char::is_whitespace) {
                    values.insert(name.to_owned(), value.to_owned());
                }
            }
        }
        Self { values }
    }

    /// The value of `name` (`CONFIG_...`), `None` if the config does not mention it.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// Whether `name` is built in (`=y`).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.value(name) == Some("y")
    }

    /// Number of options parsed.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether nothing was parsed.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// The kernel's `kstrtobool`: `1 y Y t T on` → true, `0 n N f F off` → false (first one or
/// two characters decide), anything else (or no value) → `None`, which the kernel ignores.
pub fn kstrtobool(s: &str) -> Option<bool> {
    let b = s.as_bytes();
    match b.first()? {
        b'y' | b'Y' | b't' | b'T' | b'1' => Some(true),
        b'n' | b'N' | b'f' | b'F' | b'0' => Some(false),
        b'o' | b'O' => match b.get(1)? {
            b'n' | b'N' => Some(true),
            b'f' | b'F' => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// The boolean value of `key=` on a kernel command line, as the kernel's early_param would
/// see it: the last valid occurrence wins; `None` if absent or never a valid boolean.
pub fn cmdline_bool(cmdline: &str, key: &str) -> Option<bool> {
    let mut result = None;
    for word in cmdline.split_whitespace() {
        // Parameters after a bare `--` go to init, not to the kernel.
        if word == "--" {
            break;
        }
        if let Some(value) = word.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
            if let Some(v) = kstrtobool(value.trim_matches('"')) {
                result = Some(v);
            }
        }
    }
    result
}

/// A required option that is not `=y`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingOption {
    /// `CONFIG_...`.
    pub name: &'static str,
    /// What the config has instead (`n`, `m`, ...), `None` if it does not mention the option.
    pub found: Option<String>,
    /// Why the agent needs it.
    pub why: &'static str,
}

impl fmt::Display for MissingOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.found {
            Some(v) => write!(f, "{}={} (need =y: {})", self.name, v, self.why),
            None => write!(f, "{} is absent (need =y: {})", self.name, self.why),
        }
    }
}

/// Whether the kernel can do a LUO live update, and if not, every reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuoReadiness {
    /// Required options that are not built in.
    pub missing: Vec<MissingOption>,
    /// `liveupdate=on` (or another true value) is on the command line.
    pub liveupdate_on: bool,
    /// KHO is enabled: `kho=` on the command line if present, else
    /// `CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT`.
    pub kho_enabled: bool,
    /// `CONFIG_KEXEC_HANDOVER_DEBUGFS=y` (optional).
    pub kho_debugfs: bool,
}

impl LuoReadiness {
    /// True when nothing is missing.
    pub fn is_ready(&self) -> bool {
        self.missing.is_empty() && self.liveupdate_on && self.kho_enabled
    }

    /// One line per problem, each naming the option or boot flag and the fix.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .missing
            .iter()
            .map(|m| format!("kernel option {m}"))
            .collect();
        if !self.kho_enabled {
            out.push(format!(
                "KHO is disabled: boot with `kho=on` or build with {KHO_ENABLE_DEFAULT}=y \
                 (LUO turns itself off without KHO)"
            ));
        }
        if !self.liveupdate_on {
            out.push(
                "boot flag `liveupdate=on` is missing from /proc/cmdline: LUO is off by default \
                 and /dev/liveupdate does not exist without it; add it to the kernel command line"
                    .to_owned(),
            );
        }
        out
    }
}

/// Check a kernel configuration and command line for the LUO path.
pub fn check(config: &KernelConfig, cmdline: &str) -> LuoReadiness {
    let missing = LUO_REQUIRED
        .iter()
        .filter(|opt| !config.is_builtin(opt.name))
        .map(|opt| MissingOption {
            name: opt.name,
            found: config.value(opt.name).map(str::to_owned),
            why: opt.why,
        })
        .collect();
    LuoReadiness {
        missing,
        liveupdate_on: cmdline_bool(cmdline, "liveupdate") == Some(true),
        kho_enabled: cmdline_bool(cmdline, "kho").unwrap_or(config.is_builtin(KHO_ENABLE_DEFAULT)),
        kho_debugfs: config.is_builtin(KHO_DEBUGFS),
    }
}

/// Read the running kernel's configuration: `/boot/config-<release>` if present, else
/// `/proc/config.gz` (decompressed in-process, at most [`MAX_CONFIG_TEXT`] bytes). Returns
/// the configuration and the path it came from.
pub fn load_running_config() -> Result<(KernelConfig, PathBuf), KconfigError> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    load_config_from(
        &Path::new("/boot").join(format!("config-{release}")),
        Path::new("/proc/config.gz"),
    )
}

/// [`load_running_config`] with explicit paths (tests).
pub fn load_config_from(
    boot_config: &Path,
    proc_config_gz: &Path,
) -> Result<(KernelConfig, PathBuf), KconfigError> {
    if boot_config.is_file() {
        let text = std::fs::read_to_string(boot_config).map_err(|source| KconfigError::Read {
            path: boot_config.to_owned(),
            source,
        })?;
        return Ok((KernelConfig::parse(&text), boot_config.to_owned()));
    }
    if proc_config_gz.exists() {
        let text = read_gzip_text(proc_config_gz, MAX_CONFIG_TEXT)?;
        return Ok((KernelConfig::parse(&text), proc_config_gz.to_owned()));
    }
    Err(KconfigError::NotFound {
        tried: format!("{}, {}", boot_config.display(), proc_config_gz.display()),
    })
}

/// Decompresses the gzip file `path` (every member, like `gzip -dc`), refusing more than
/// `limit` bytes of output; invalid UTF-8 is replaced (a config is ASCII).
fn read_gzip_text(path: &Path, limit: u64) -> Result<String, KconfigError> {
    let file = std::fs::File::open(path).map_err(|source| KconfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file))
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|source| KconfigError::Decompress {
            path: path.to_owned(),
            source,
        })?;
    if out.len() as u64 > limit {
        return Err(KconfigError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Check the running kernel: its configuration and `/proc/cmdline`.
pub fn check_running() -> Result<(LuoReadiness, PathBuf), KconfigError> {
    let (config, source) = load_running_config()?;
    let cmdline_path = Path::new("/proc/cmdline");
    let cmdline = std::fs::read_to_string(cmdline_path).map_err(|source| KconfigError::Read {
        path: cmdline_path.to_owned(),
        source,
    })?;
    Ok((check(&config, &cmdline), source))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "\
CONFIG_KEXEC_FILE=y
CONFIG_RELOCATABLE=y
CONFIG_KEXEC_HANDOVER=y
CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT=y
CONFIG_KEXEC_HANDOVER_DEBUGFS=y
CONFIG_LIVEUPDATE=y
CONFIG_LIVEUPDATE_MEMFD=y
CONFIG_MEMFD_CREATE=y
CONFIG_SHMEM=y
CONFIG_TMPFS=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_LOCALVERSION=\"-mkA\"
";

    #[test]
    fn parse_reads_values_and_not_set_lines() {
        let c = KernelConfig::parse(
            "#\n# Automatically generated\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\n\
             CONFIG_S=\"x=y\"\ngarbage\n=y\n# comment is not set\n",
        );
        assert_eq!(c.value("CONFIG_A"), Some("y"));
        assert_eq!(c.value("CONFIG_B"), Some("n"));
        assert_eq!(c.value("CONFIG_C"), Some("m"));
        assert_eq!(c.value("CONFIG_S"), Some("\"x=y\""));
        assert_eq!(c.len(), 4);
        assert!(!c.is_builtin("CONFIG_C"));
    }

    #[test]
    fn a_complete_config_with_liveupdate_on_is_ready() {
        let r = check(&KernelConfig::parse(FULL), "console=ttyS0 liveupdate=on");
        assert!(r.is_ready(), "{:?}", r.problems());
        assert!(r.problems().is_empty());
        assert!(r.kho_debugfs);
    }

    #[test]
    fn a_distribution_kernel_names_every_missing_option_and_the_flag() {
        // Debian 7.2's own config: KHO and LUO off.
        let cfg = KernelConfig::parse(
            "CONFIG_KEXEC_FILE=y\nCONFIG_RELOCATABLE=y\n# CONFIG_KEXEC_HANDOVER is not set\n\
             CONFIG_MEMFD_CREATE=y\nCONFIG_SHMEM=y\nCONFIG_TMPFS=y\nCONFIG_BLK_DEV_INITRD=y\n",
        );
        let r = check(&cfg, "BOOT_IMAGE=/vmlinuz root=/dev/vda1 ro quiet");
        let names: Vec<_> = r.missing.iter().map(|m| m.name).collect();
        assert_eq!(
            names,
            [
                "CONFIG_KEXEC_HANDOVER",
                "CONFIG_LIVEUPDATE",
                "CONFIG_LIVEUPDATE_MEMFD"
            ]
        );
        assert_eq!(r.missing[0].found.as_deref(), Some("n"));
        assert_eq!(r.missing[1].found, None);
        assert!(!r.is_ready());
        let text = r.problems().join("\n");
        assert!(text.contains("CONFIG_KEXEC_HANDOVER=n"), "{text}");
        assert!(text.contains("CONFIG_LIVEUPDATE is absent"), "{text}");
        assert!(text.contains("liveupdate=on"), "{text}");
        assert!(text.contains("kho=on"), "{text}");
    }

    #[test]
    fn only_the_flag_missing_is_reported_alone() {
        let r = check(&KernelConfig::parse(FULL), "console=ttyS0");
        assert!(r.missing.is_empty());
        assert_eq!(r.problems().len(), 1);
        assert!(r.problems()[0].contains("liveupdate=on"));
    }

    #[test]
    fn modules_do_not_count_as_built_in() {
        let cfg = FULL.replace("CONFIG_LIVEUPDATE=y", "CONFIG_LIVEUPDATE=m");
        let r = check(&KernelConfig::parse(&cfg), "liveupdate=on");
        assert_eq!(r.missing.len(), 1);
        assert_eq!(r.missing[0].found.as_deref(), Some("m"));
    }

    #[test]
    fn kho_off_on_the_cmdline_overrides_the_default() {
        let r = check(&KernelConfig::parse(FULL), "liveupdate=on kho=off");
        assert!(!r.kho_enabled && !r.is_ready());
        let no_default = FULL.replace("CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT=y\n", "");
        let r = check(&KernelConfig::parse(&no_default), "liveupdate=on");
        assert!(!r.kho_enabled);
        let r = check(&KernelConfig::parse(&no_default), "kho=on liveupdate=on");
        assert!(r.is_ready());
    }

    #[test]
    fn cmdline_parsing_follows_the_kernel() {
        assert_eq!(cmdline_bool("liveupdate=on", "liveupdate"), Some(true));
        assert_eq!(cmdline_bool("liveupdate=1", "liveupdate"), Some(true));
        assert_eq!(cmdline_bool("liveupdate=Y", "liveupdate"), Some(true));
        assert_eq!(cmdline_bool("liveupdate=off", "liveupdate"), Some(false));
        assert_eq!(
            cmdline_bool("liveupdate=on liveupdate=0", "liveupdate"),
            Some(false)
        );
        assert_eq!(cmdline_bool("liveupdate", "liveupdate"), None);
        assert_eq!(cmdline_bool("liveupdate=", "liveupdate"), None);
        assert_eq!(cmdline_bool("liveupdate=maybe", "liveupdate"), None);
        assert_eq!(
            cmdline_bool("liveupdate=on liveupdate=x", "liveupdate"),
            Some(true)
        );
        assert_eq!(cmdline_bool("noliveupdate=on", "liveupdate"), None);
        assert_eq!(cmdline_bool("liveupdatex=on", "liveupdate"), None);
        assert_eq!(cmdline_bool("ro -- liveupdate=on", "liveupdate"), None);
        assert_eq!(kstrtobool("o"), None);
        assert_eq!(kstrtobool(""), None);
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn a_gzip_bomb_beyond_the_cap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("config.gz");
        // A valid config followed by zeros: one byte past the cap once inflated.
        let mut text = FULL.as_bytes().to_vec();
        text.resize(usize::try_from(MAX_CONFIG_TEXT).unwrap() + 1, 0);
        let bomb = gzip(&text);
        assert!(bomb.len() < 1 << 20, "{} bytes compressed", bomb.len());
        std::fs::write(&gz, bomb).unwrap();
        let err = load_config_from(&dir.path().join("config-none"), &gz).unwrap_err();
        assert!(
            matches!(&err, KconfigError::TooLarge { limit, .. } if *limit == MAX_CONFIG_TEXT),
            "{err}"
        );
        // Exactly at the cap is still read.
        text.truncate(usize::try_from(MAX_CONFIG_TEXT).unwrap());
        std::fs::write(&gz, gzip(&text)).unwrap();
        let (cfg, _) = load_config_from(&dir.path().join("config-none"), &gz).unwrap();
        assert!(cfg.is_builtin("CONFIG_LIVEUPDATE"));
    }

    #[test]
    fn load_prefers_boot_config_and_reads_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("config-test");
        let gz = dir.path().join("config.gz");
        let err = load_config_from(&boot, &gz).unwrap_err();
        assert!(matches!(err, KconfigError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("config-test"), "{err}");

        // /proc/config.gz path, decompressed in-process.
        std::fs::write(&gz, gzip(FULL.as_bytes())).unwrap();
        let (cfg, src) = load_config_from(&boot, &gz).unwrap();
        assert_eq!(src, gz);
        assert!(cfg.is_builtin("CONFIG_LIVEUPDATE"));

        std::fs::write(&gz, b"not gzip").unwrap();
        let err = load_config_from(&boot, &gz).unwrap_err();
        assert!(matches!(err, KconfigError::Decompress { .. }), "{err}");
        assert!(std::error::Error::source(&err).is_some(), "{err}");

        std::fs::write(&boot, "CONFIG_LIVEUPDATE=n\n").unwrap();
        let (cfg, src) = load_config_from(&boot, &gz).unwrap();
        assert_eq!(src, boot);
        assert_eq!(cfg.value("CONFIG_LIVEUPDATE"), Some("n"));
    }
}
