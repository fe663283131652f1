//! Thin wrappers over the syscalls and ioctls the agent uses: one small module each, every
//! `unsafe` block justified with a `// SAFETY:` comment. Nothing above this module calls
//! `libc` directly.

pub mod cgroup;
pub mod fdpass;
pub mod kconfig;
pub mod kexec;
pub mod luo;
pub mod memfd;
pub mod spawn;
