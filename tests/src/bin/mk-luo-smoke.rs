//! `mk-luo-smoke`: proves the LUO and kexec wrappers on a real kernel (the tests/vm runner
//! runs it inside QEMU; it is statically linked into the test initramfs).
//!
//! * `mk-luo-smoke preserve --size-mib 64 --kernel B.bzImage --initrd initrd --cmdline "..."`
//!   (kernel A): creates LUO session `mk-smoke`, fills a sealed memfd with a deterministic
//!   pattern and preserves it (token 1), preserves a second memfd holding the manifest (size,
//!   SHA-256, seed, source kernel; token 2), `kexec_file_load`s B and reboots into it.
//! * `mk-luo-smoke retrieve` (kernel B): retrieves the session and both memfds, checks size,
//!   seals, file position and every byte (pattern and SHA-256), FINISHes the session, and
//!   prints `MK-SMOKE-OK <bytes> <ms>` (ms = retrieve + verify + finish in B) or
//!   `MK-SMOKE-FAIL <reason>`.
//! * `mk-luo-smoke check`: the running kernel's LUO readiness (config options, `liveupdate=on`).
//!
//! Exit codes follow `upgrade_agent::exit::Exit`.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::uio::{pread, pwrite};
use nix::unistd::{Whence, ftruncate, lseek};
use sha2::{Digest, Sha256};
use upgrade_agent::exit::Exit;
use upgrade_agent::sys::kconfig;
use upgrade_agent::sys::kexec::{self, KexecFlags};
use upgrade_agent::sys::luo::{LiveUpdate, LuoError, Session};

/// LUO session name used by the smoke test.
const SESSION: &str = "mk-smoke";
/// Token of the data memfd.
const TOKEN_DATA: u64 = 1;
/// Token of the manifest memfd.
const TOKEN_MANIFEST: u64 = 2;
/// Seed of the deterministic pattern.
const SEED: u64 = 0x6d6b_2d73_6d6f_6b65; // "mk-smoke"
/// File position set on the data memfd before preservation (LUO preserves `f_pos`).
const DATA_POS: i64 = 12_345;
/// Chunk size for filling and verifying.
const CHUNK: usize = 1 << 20;
/// Manifest format tag.
const MANIFEST_TAG: &str = "mk-luo-smoke-manifest v1";

#[derive(Debug, Parser)]
#[command(
    version,
    about = "LUO + kexec smoke test for a real kernel (runs in the test VM)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Kernel A: preserve a patterned memfd in LUO session `mk-smoke`, then kexec into B.
    Preserve {
        /// Size of the data memfd in MiB.
        #[arg(long, default_value_t = 64)]
        size_mib: u64,
        /// The kernel to kexec into (bzImage).
        #[arg(long)]
        kernel: std::path::PathBuf,
        /// Initramfs for the next kernel (none: KEXEC_FILE_NO_INITRAMFS).
        #[arg(long)]
        initrd: Option<std::path::PathBuf>,
        /// Command line of the next kernel.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Load B but do not reboot (for debugging).
        #[arg(long)]
        no_reboot: bool,
    },
    /// Kernel B: retrieve, verify every byte, FINISH.
    Retrieve,
    /// Report whether the running kernel has what LUO needs.
    Check,
}

#[derive(Debug, thiserror::Error)]
enum SmokeError {
    #[error(transparent)]
    Luo(#[from] LuoError),
    #[error(transparent)]
    Kexec(#[from] kexec::KexecError),
    #[error(transparent)]
    Kconfig(#[from] kconfig::KconfigError),
    #[error("{what}: {errno}")]
    Sys {
        what: String,
        errno: nix::errno::Errno,
    },
    #[error("cannot open {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("verification failed: {0}")]
    Mismatch(String),
}

impl SmokeError {
    fn exit(&self) -> Exit {
        match self {
            Self::Mismatch(_) => Exit::Corrupt,
            Self::Open { .. } => Exit::Io,
            Self::Kconfig(_) => Exit::PreflightFailed,
            Self::Luo(LuoError::DeviceBusy { .. }) => Exit::Busy,
            _ => Exit::Platform,
        }
    }
}

fn sys<T>(what: impl Into<String>, r: nix::Result<T>) -> Result<T, SmokeError> {
    r.map_err(|errno| SmokeError::Sys {
        what: what.into(),
        errno,
    })
}

/// splitmix64: the deterministic pattern, one 64-bit word per 8-byte offset.
fn pattern_word(index: u64) -> u64 {
    let mut z = SEED.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fill `buf` with the pattern bytes at file offset `offset` (a multiple of 8).
fn fill_pattern(buf: &mut [u8], offset: u64) {
    debug_assert_eq!(offset % 8, 0);
    for (i, word) in buf.chunks_mut(8).enumerate() {
        let bytes = pattern_word(offset / 8 + i as u64).to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
}

fn release() -> String {
    nix::sys::utsname::uname().map_or_else(
        |_| "unknown".into(),
        |u| u.release().to_string_lossy().into_owned(),
    )
}

fn write_all_at(
    fd: BorrowedFd<'_>,
    mut data: &[u8],
    mut off: i64,
    what: &str,
) -> Result<(), SmokeError> {
    while !data.is_empty() {
        let n = sys(format!("pwrite {what} at {off}"), pwrite(fd, data, off))?;
        if n == 0 {
            return Err(SmokeError::Mismatch(format!(
                "pwrite {what} wrote 0 bytes at {off}"
            )));
        }
        data = &data[n..];
        off += n as i64;
    }
    Ok(())
}

fn read_exact_at(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    off: i64,
    what: &str,
) -> Result<(), SmokeError> {
    let mut done = 0;
    while done < buf.len() {
        let n = sys(
            format!("pread {what} at {}", off + done as i64),
            pread(fd, &mut buf[done..], off + done as i64),
        )?;
        if n == 0 {
            return Err(SmokeError::Mismatch(format!(
                "{what}: unexpected end of file at offset {}",
                off + done as i64
            )));
        }
        done += n;
    }
    Ok(())
}

fn preserve(
    size_mib: u64,
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
    cmdline: &str,
    no_reboot: bool,
) -> Result<(), SmokeError> {
    let size = size_mib * 1024 * 1024;
    let dev = LiveUpdate::open()?;
    // The device is exclusive: a second open must fail with EBUSY, as a typed error.
    match LiveUpdate::open() {
        Err(e @ LuoError::DeviceBusy { .. }) => println!("MK-SMOKE-INFO exclusive-open-ok: {e}"),
        Ok(_) => {
            return Err(SmokeError::Mismatch(
                "/dev/liveupdate opened twice: it must be exclusive".into(),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let session = dev.create_session(SESSION)?;
    let name = session.get_name()?;
    if name != SESSION {
        return Err(SmokeError::Mismatch(format!(
            "GET_NAME returned {name:?}, expected {SESSION:?}"
        )));
    }

    let t0 = Instant::now();
    let data = sys(
        "memfd_create mk-smoke-data",
        memfd_create(
            "mk-smoke-data",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        ),
    )?;
    sys("ftruncate data memfd", ftruncate(&data, size as i64))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = CHUNK.min((size - off) as usize);
        fill_pattern(&mut buf[..n], off);
        hasher.update(&buf[..n]);
        write_all_at(data.as_fd(), &buf[..n], off as i64, "data memfd")?;
        off += n as u64;
    }
    let digest = hex::encode(hasher.finalize());
    let seals = SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_SEAL;
    sys(
        "F_ADD_SEALS on data memfd",
        fcntl(&data, FcntlArg::F_ADD_SEALS(seals)),
    )?;
    sys("lseek data memfd", lseek(&data, DATA_POS, Whence::SeekSet))?;
    let fill_ms = t0.elapsed().as_millis();

    let manifest_text = format!(
        "{MANIFEST_TAG}\nsize={size}\nsha256={digest}\nseed={SEED}\nseals={}\npos={DATA_POS}\nsource={}\n",
        seals.bits(),
        release()
    );
    let manifest = sys(
        "memfd_create mk-smoke-manifest",
        memfd_create("mk-smoke-manifest", MFdFlags::MFD_CLOEXEC),
    )?;
    write_all_at(
        manifest.as_fd(),
        manifest_text.as_bytes(),
        0,
        "manifest memfd",
    )?;

    let t1 = Instant::now();
    session.preserve_fd(data.as_fd(), TOKEN_DATA)?;
    session.preserve_fd(manifest.as_fd(), TOKEN_MANIFEST)?;
    // Preserving the same token twice must fail (EEXIST) without breaking the session.
    match session.preserve_fd(manifest.as_fd(), TOKEN_MANIFEST) {
        Err(e) if e.errno() == Some(nix::errno::Errno::EEXIST) => {
            println!("MK-SMOKE-INFO duplicate-token-refused: {e}");
        }
        other => {
            return Err(SmokeError::Mismatch(format!(
                "preserving token {TOKEN_MANIFEST} twice gave {other:?}, expected EEXIST"
            )));
        }
    }
    let preserve_ms = t1.elapsed().as_millis();
    println!(
        "MK-SMOKE-PRESERVED {size} sha256={digest} fill_ms={fill_ms} preserve_ms={preserve_ms} source={}",
        release()
    );

    let kfile = File::open(kernel).map_err(|source| SmokeError::Open {
        path: kernel.to_owned(),
        source,
    })?;
    let ifile = initrd
        .map(|p| {
            File::open(p).map_err(|source| SmokeError::Open {
                path: p.to_owned(),
                source,
            })
        })
        .transpose()?;
    let t2 = Instant::now();
    kexec::kexec_file_load(
        kfile.as_fd(),
        ifile.as_ref().map(AsFd::as_fd),
        cmdline,
        KexecFlags::NONE,
    )?;
    let p = kexec::probe();
    println!(
        "MK-SMOKE-LOADED kernel={} load_ms={} kexec_loaded={:?}",
        kernel.display(),
        t2.elapsed().as_millis(),
        p.kexec_loaded
    );
    if no_reboot {
        kexec::kexec_unload()?;
        println!("MK-SMOKE-INFO --no-reboot: unloaded again; the session is dropped on exit");
        return Ok(());
    }
    println!("MK-SMOKE-KEXEC now");
    // `dev`, `session`, `data` and `manifest` stay open across this call: closing them would
    // drop the preservation. The call returns only on failure.
    let err = kexec::reboot_kexec().unwrap_err();
    drop((session, data, manifest, dev));
    Err(err.into())
}

fn parse_manifest(text: &str) -> Result<(u64, String, u64, i64), SmokeError> {
    let mut lines = text.lines();
    if lines.next() != Some(MANIFEST_TAG) {
        return Err(SmokeError::Mismatch(format!(
            "manifest does not start with {MANIFEST_TAG:?}"
        )));
    }
    let (mut size, mut sha, mut seals, mut pos) = (None, None, None, None);
    for line in lines {
        match line.split_once('=') {
            Some(("size", v)) => size = v.parse::<u64>().ok(),
            Some(("sha256", v)) => sha = Some(v.to_owned()),
            Some(("seals", v)) => seals = v.parse::<u64>().ok(),
            Some(("pos", v)) => pos = v.parse::<i64>().ok(),
            Some(("source", v)) => println!("MK-SMOKE-INFO preserved-by={v}"),
            _ => {}
        }
    }
    match (size, sha, seals, pos) {
        (Some(a), Some(b), Some(c), Some(d)) => Ok((a, b, c, d)),
        _ => Err(SmokeError::Mismatch(
            "manifest lacks size, sha256, seals or pos".into(),
        )),
    }
}

fn read_whole(fd: &OwnedFd, what: &str, limit: u64) -> Result<Vec<u8>, SmokeError> {
    let st = sys(format!("fstat {what}"), nix::sys::stat::fstat(fd))?;
    let len = st.st_size as u64;
    if len > limit {
        return Err(SmokeError::Mismatch(format!(
            "{what} is {len} bytes, more than {limit}"
        )));
    }
    let mut buf = vec![0u8; len as usize];
    read_exact_at(fd.as_fd(), &mut buf, 0, what)?;
    Ok(buf)
}

fn retrieve() -> Result<(), SmokeError> {
    let t0 = Instant::now();
    let dev = LiveUpdate::open()?;
    // A name that was never preserved must give ENOENT, as a typed error.
    match dev.retrieve_session("mk-smoke-absent") {
        Err(e) if e.errno() == Some(nix::errno::Errno::ENOENT) => {
            println!("MK-SMOKE-INFO absent-session: {e}");
        }
        other => {
            return Err(SmokeError::Mismatch(format!(
                "retrieving a session never created gave {other:?}, expected ENOENT"
            )));
        }
    }
    let session: Session = dev.retrieve_session(SESSION)?;
    let name = session.get_name()?;
    if name != SESSION {
        return Err(SmokeError::Mismatch(format!("GET_NAME returned {name:?}")));
    }
    let manifest = session.retrieve_fd(TOKEN_MANIFEST)?;
    let text = read_whole(&manifest, "manifest memfd", 4096)?;
    let (size, want_sha, want_seals, want_pos) = parse_manifest(&String::from_utf8_lossy(&text))?;
    let data = session.retrieve_fd(TOKEN_DATA)?;

    let st = sys("fstat data memfd", nix::sys::stat::fstat(&data))?;
    if st.st_size as u64 != size {
        return Err(SmokeError::Mismatch(format!(
            "data memfd is {} bytes, manifest says {size}",
            st.st_size
        )));
    }
    let seals = sys(
        "F_GET_SEALS data memfd",
        fcntl(&data, FcntlArg::F_GET_SEALS),
    )?;
    if seals as u64 != want_seals {
        return Err(SmokeError::Mismatch(format!(
            "seals {seals:#x}, expected {want_seals:#x}"
        )));
    }
    let pos = sys("lseek data memfd", lseek(&data, 0, Whence::SeekCur))?;
    if pos != want_pos {
        return Err(SmokeError::Mismatch(format!(
            "file position {pos}, expected {want_pos}"
        )));
    }

    let mut hasher = Sha256::new();
    let mut got = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = CHUNK.min((size - off) as usize);
        read_exact_at(data.as_fd(), &mut got[..n], off as i64, "data memfd")?;
        fill_pattern(&mut want[..n], off);
        if got[..n] != want[..n] {
            let i = got[..n]
                .iter()
                .zip(&want[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(SmokeError::Mismatch(format!(
                "byte at offset {} is {:#04x}, expected {:#04x}",
                off + i as u64,
                got[i],
                want[i]
            )));
        }
        hasher.update(&got[..n]);
        off += n as u64;
    }
    let sha = hex::encode(hasher.finalize());
    if sha != want_sha {
        return Err(SmokeError::Mismatch(format!(
            "sha256 {sha}, manifest says {want_sha}"
        )));
    }
    session.finish()?;
    println!(
        "MK-SMOKE-INFO finished session {SESSION}; kernel {}",
        release()
    );
    println!("MK-SMOKE-OK {size} {}", t0.elapsed().as_millis());
    Ok(())
}

fn check() -> Result<bool, SmokeError> {
    let (r, source) = kconfig::check_running()?;
    println!(
        "MK-CHECK-INFO config from {} on {}",
        source.display(),
        release()
    );
    for p in r.problems() {
        println!("MK-CHECK-MISSING {p}");
    }
    let probe = kexec::probe();
    println!("MK-CHECK-INFO probe {probe:?}");
    if r.is_ready() {
        println!("MK-CHECK-OK");
    }
    Ok(r.is_ready())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::Preserve {
            size_mib,
            kernel,
            initrd,
            cmdline,
            no_reboot,
        } => preserve(*size_mib, kernel, initrd.as_deref(), cmdline, *no_reboot),
        Cmd::Retrieve => retrieve(),
        Cmd::Check => match check() {
            Ok(true) => Ok(()),
            Ok(false) => return Exit::PreflightFailed.into(),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            println!("MK-SMOKE-FAIL {e}");
            e.exit().into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_offset_aligned() {
        let mut a = vec![0u8; 64];
        let mut b = vec![0u8; 32];
        fill_pattern(&mut a, 0);
        fill_pattern(&mut b, 32);
        assert_eq!(&a[32..], &b[..]);
        assert_ne!(&a[..8], &a[8..16]);
    }

    #[test]
    fn manifest_round_trip_and_rejects() {
        let ok = format!("{MANIFEST_TAG}\nsize=10\nsha256=ab\nseed=1\nseals=15\npos=3\nsource=x\n");
        assert_eq!(parse_manifest(&ok).unwrap(), (10, "ab".into(), 15, 3));
        assert!(parse_manifest("other\nsize=10\n").is_err());
        assert!(
            parse_manifest(&format!(
                "{MANIFEST_TAG}\nsize=x\nsha256=ab\nseals=1\npos=0\n"
            ))
            .is_err()
        );
    }
}
