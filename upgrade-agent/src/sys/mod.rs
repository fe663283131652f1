//! Thin wrappers over the syscalls and ioctls the agent uses: one small module each, every
//! `unsafe` block justified with a `// SAFETY:` comment. Nothing above this module calls
//! `libc` directly.

pub mod cgroup;
pub mod fdpass;
pub mod kconfig;
pub mod kexec;
pub mod luo;
pub mod memfd;
pub mod multikernel;
pub mod signals;
pub mod spawn;

/// The id of this boot (`<root>/proc/sys/kernel/random/boot_id`, a UUID the kernel draws at
/// every boot, kexec included), if it can be read.
pub fn boot_id_at(root: &std::path::Path) -> Option<String> {
    let id = std::fs::read_to_string(root.join("proc/sys/kernel/random/boot_id")).ok()?;
    let id = id.trim();
    (id.len() == 36).then(|| id.to_owned())
}

/// The id of this boot ([`boot_id_at`] `/`).
pub fn boot_id() -> Option<String> {
    boot_id_at(std::path::Path::new("/"))
}
