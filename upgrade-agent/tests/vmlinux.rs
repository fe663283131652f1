//! Extracting the ELF vmlinux from the kernels this project builds (`verify::vmlinux`).
//!
//! Kernels: `MK_TEST_KERNEL_A` (one bzImage, any path), else every
//! `<cache>/*/bzImage-*` in the local kernel cache (`MK_KERNEL_CACHE`, default
//! `/var/cache/mk-upgrade/kernels`; those are `CONFIG_KERNEL_XZ=y`). Without any, the test
//! reports `SKIP extract_real_kernels: no built kernel (set MK_TEST_KERNEL_A)` and counts as
//! ignored (own harness: `harness = false`, libtest-mimic), never as passed.
//!
//! Each kernel's extraction is timed and printed. Where the kernel source the project built
//! from is unpacked (`/var/tmp/mk-upgrade/kbuild/*/scripts/extract-vmlinux`, or
//! `.../kbuild/*/linux-source-*/scripts/extract-vmlinux`), its `scripts/extract-vmlinux` runs on
//! the same image and the two outputs must be identical; without it, or when the script cannot
//! run (it needs `unxz` and `readelf`), the comparison is skipped with a printed note.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use libtest_mimic::{Arguments, Completion, Failed, Trial};
use upgrade_agent::verify::vmlinux::{self, Compression};

const SKIP_REASON: &str = "no built kernel (set MK_TEST_KERNEL_A)";
const KBUILD: &str = "/var/tmp/mk-upgrade/kbuild";

fn main() {
    let args = Arguments::from_args();
    let trials = vec![Trial::ignorable_test("extract_real_kernels", || {
        let kernels = kernels()?;
        if kernels.is_empty() {
            return Ok(mk_test_support::skip("extract_real_kernels", SKIP_REASON));
        }
        extract_real_kernels(&kernels)?;
        Ok(Completion::Completed)
    })];
    libtest_mimic::run(&args, trials).exit();
}

/// The bzImages to extract; empty when none is built. A set but unreadable
/// `MK_TEST_KERNEL_A` fails: the configuration names a kernel that is not there.
fn kernels() -> Result<Vec<PathBuf>, Failed> {
    if let Some(a) = std::env::var_os("MK_TEST_KERNEL_A").filter(|a| !a.is_empty()) {
        let a = PathBuf::from(a);
        if !a.is_file() {
            return Err(format!("MK_TEST_KERNEL_A={} is not a file", a.display()).into());
        }
        return Ok(vec![a]);
    }
    let cache = std::env::var_os("MK_KERNEL_CACHE")
        .filter(|c| !c.is_empty())
        .map_or_else(
            || PathBuf::from("/var/cache/mk-upgrade/kernels"),
            PathBuf::from,
        );
    let mut found = Vec::new();
    for dir in subdirs(&cache) {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_bzimage = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("bzImage-"));
            if is_bzimage && path.is_file() {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The directories directly under `dir`, sorted; none if it cannot be read.
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// The kernel's own `scripts/extract-vmlinux`, if some unpacked kernel source has it.
fn extract_vmlinux_script() -> Option<PathBuf> {
    for dir in subdirs(Path::new(KBUILD)) {
        let direct = dir.join("scripts/extract-vmlinux");
        if direct.is_file() {
            return Some(direct);
        }
        for sub in subdirs(&dir) {
            let is_source = sub
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-source-"));
            let nested = sub.join("scripts/extract-vmlinux");
            if is_source && nested.is_file() {
                return Some(nested);
            }
        }
    }
    None
}

fn extract_real_kernels(kernels: &[PathBuf]) -> Result<(), Failed> {
    let script = extract_vmlinux_script();
    if script.is_none() {
        println!(
            "note: no scripts/extract-vmlinux under {KBUILD}/*/ (nor */linux-source-*/): \
             comparison with the kernel's own extractor skipped"
        );
    }
    for path in kernels {
        let image = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let start = Instant::now();
        let out = vmlinux::extract(&image).map_err(|e| format!("{}: {e}", path.display()))?;
        let took = start.elapsed();
        let elf = &out.elf;
        println!(
            "{}: {} payload {} bytes -> ELF {} bytes in {:.1} ms ({:.0} MB/s out)",
            path.display(),
            out.compression,
            out.payload_len,
            elf.len(),
            took.as_secs_f64() * 1e3,
            elf.len() as f64 / took.as_secs_f64().max(1e-9) / 1e6,
        );
        if !vmlinux::is_elf(elf) {
            return Err(format!("{}: output is not an x86-64 ELF", path.display()).into());
        }
        if out.compression == Compression::None {
            return Err(
                format!("{}: a bzImage, not a vmlinux, was expected", path.display()).into(),
            );
        }
        // Plausible: bigger than what it was compressed to, an executable with program headers.
        if elf.len() as u64 <= out.payload_len {
            return Err(format!(
                "{}: ELF of {} bytes is not bigger than its {}-byte compressed payload",
                path.display(),
                elf.len(),
                out.payload_len
            )
            .into());
        }
        let e_type = u16::from_le_bytes([elf[16], elf[17]]);
        let e_phnum = u16::from_le_bytes([elf[56], elf[57]]);
        if e_type != 2 || e_phnum == 0 {
            return Err(format!(
                "{}: e_type {e_type}, e_phnum {e_phnum}: not an executable vmlinux",
                path.display()
            )
            .into());
        }
        if let Some(script) = &script {
            compare_with_script(script, path, elf)?;
        }
    }
    Ok(())
}

/// Runs the kernel's `scripts/extract-vmlinux` on `image` and requires the same bytes.
fn compare_with_script(script: &Path, image: &Path, ours: &[u8]) -> Result<(), Failed> {
    let start = Instant::now();
    let run = Command::new("sh").arg(script).arg(image).output();
    let took = start.elapsed();
    let output = match run {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            println!(
                "note: {} failed on {} ({}; {}): comparison skipped",
                script.display(),
                image.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return Ok(());
        }
        Err(e) => {
            println!(
                "note: cannot run sh {}: {e}: comparison skipped",
                script.display()
            );
            return Ok(());
        }
    };
    if output.stdout != ours {
        return Err(format!(
            "{}: differs from {} ({} bytes vs ours {})",
            image.display(),
            script.display(),
            output.stdout.len(),
            ours.len()
        )
        .into());
    }
    println!(
        "  identical to scripts/extract-vmlinux's output ({:.1} ms for the script)",
        took.as_secs_f64() * 1e3
    );
    Ok(())
}
