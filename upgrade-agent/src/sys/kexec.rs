//! `kexec_file_load(2)` and `reboot(LINUX_REBOOT_CMD_KEXEC)`.
