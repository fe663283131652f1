//! The x86 boot setup header of a bzImage (Linux `Documentation/arch/x86/boot.rst`).
//!
//! [`parse`] accepts exactly what `kexec_file_load(2)` on x86-64 accepts (the kernel's
//! `bzImage64_probe`): boot flag `0xAA55`, the `HdrS` magic, boot protocol 2.12 or newer,
//! `LOADED_HIGH`, `XLF_KERNEL_64` and `XLF_CAN_BE_LOADED_ABOVE_4G` (set only by
//! `CONFIG_RELOCATABLE=y` kernels). It also reads the `kernel_version` string, whose first word
//! is the release `uname -r` reports once that kernel runs. Every offset and length is checked
//! against the input before use; untrusted bytes never panic.

use rollback::Release;

/// Offset of `setup_sects` (u8).
pub const OFF_SETUP_SECTS: usize = 0x1F1;
/// Offset of `syssize` (u32, 16-byte paragraphs of protected-mode code).
pub const OFF_SYSSIZE: usize = 0x1F4;
/// Offset of `boot_flag` (u16, 0xAA55).
pub const OFF_BOOT_FLAG: usize = 0x1FE;
/// Offset of the `HdrS` magic.
pub const OFF_HEADER: usize = 0x202;
/// Offset of `version` (u16, boot protocol major << 8 | minor).
pub const OFF_VERSION: usize = 0x206;
/// Offset of `kernel_version` (u16 pointer; the string is at pointer + 0x200).
pub const OFF_KERNEL_VERSION: usize = 0x20E;
/// Offset of `loadflags` (u8).
pub const OFF_LOADFLAGS: usize = 0x211;
/// Offset of `relocatable_kernel` (u8, protocol 2.05+).
pub const OFF_RELOCATABLE: usize = 0x234;
/// Offset of `xloadflags` (u16, protocol 2.12+).
pub const OFF_XLOADFLAGS: usize = 0x236;
/// Bytes the parser needs to read every field it checks.
pub const MIN_HEADER_LEN: usize = 0x240;

/// `loadflags` bit: protected-mode code loads at 0x100000 (a bzImage, not a zImage).
pub const LOADED_HIGH: u8 = 0x01;
/// `xloadflags` bit: the kernel has a 64-bit entry point at 0x200.
pub const XLF_KERNEL_64: u16 = 0x01;
/// `xloadflags` bit: the kernel may be loaded above 4 GiB (`CONFIG_RELOCATABLE=y`).
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 0x02;
/// Oldest boot protocol `kexec_file_load` accepts for a 64-bit bzImage.
pub const MIN_PROTOCOL: u16 = 0x020C;
/// Longest `kernel_version` string read.
pub const MAX_VERSION_STRING: usize = 256;

/// The file is not a kernel this agent can boot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct NotAKernel {
    /// What is wrong, naming the offset or field.
    pub reason: String,
}

fn refuse(reason: impl Into<String>) -> NotAKernel {
    NotAKernel {
        reason: reason.into(),
    }
}

/// What the setup header says about a kernel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KernelInfo {
    /// The release (`uname -r` once booted): first word of `version_string`.
    pub release: String,
    /// The whole `kernel_version` string (release, builder, build number, date).
    pub version_string: String,
    /// Boot protocol (major, minor).
    pub boot_protocol: (u8, u8),
    /// Setup sectors (512 bytes each) after the boot sector (0 in the header means 4).
    pub setup_sects: u8,
    /// Bytes of real-mode setup, boot sector included: `(setup_sects + 1) * 512`.
    pub setup_len: u64,
    /// Bytes of protected-mode code the header declares (`syssize * 16`).
    pub payload_len: u64,
    /// Raw `loadflags`.
    pub loadflags: u8,
    /// Raw `xloadflags`.
    pub xloadflags: u16,
    /// `relocatable_kernel` byte is non-zero.
    pub relocatable: bool,
    /// `XLF_KERNEL_64`.
    pub kernel_64: bool,
    /// `XLF_CAN_BE_LOADED_ABOVE_4G`.
    pub can_load_above_4g: bool,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Parses and checks the setup header of `image`.
pub fn parse(image: &[u8]) -> Result<KernelInfo, NotAKernel> {
    if image.is_empty() {
        return Err(refuse("the file is empty"));
    }
    if image.len() < MIN_HEADER_LEN {
        return Err(refuse(format!(
            "the file is {} bytes, too short for an x86 boot setup header ({MIN_HEADER_LEN:#x} \
             bytes)",
            image.len()
        )));
    }
    let flag = u16_at(image, OFF_BOOT_FLAG);
    if flag != 0xAA55 {
        return Err(refuse(format!(
            "no boot flag 0xAA55 at offset {OFF_BOOT_FLAG:#x} (found {flag:#06x}): not an x86 \
             kernel image"
        )));
    }
    if &image[OFF_HEADER..OFF_HEADER + 4] != b"HdrS" {
        return Err(refuse(format!(
            "no \"HdrS\" magic at offset {OFF_HEADER:#x}: not an x86 bzImage (or a kernel older \
             than boot protocol 2.00)"
        )));
    }
    let version = u16_at(image, OFF_VERSION);
    let boot_protocol = ((version >> 8) as u8, version as u8);
    if version < MIN_PROTOCOL {
        return Err(refuse(format!(
            "boot protocol {}.{:02} (offset {OFF_VERSION:#x}) is older than 2.12, the oldest \
             kexec_file_load accepts for a 64-bit kernel",
            boot_protocol.0, boot_protocol.1
        )));
    }
    let loadflags = image[OFF_LOADFLAGS];
    if loadflags & LOADED_HIGH == 0 {
        return Err(refuse(format!(
            "loadflags (offset {OFF_LOADFLAGS:#x}) lacks LOADED_HIGH: a zImage, not a bzImage"
        )));
    }
    let raw_sects = image[OFF_SETUP_SECTS];
    let setup_sects = if raw_sects == 0 { 4 } else { raw_sects };
    let setup_len = (u64::from(setup_sects) + 1) * 512;
    let payload_len = u64::from(u32_at(image, OFF_SYSSIZE)) * 16;
    let len = image.len() as u64;
    if setup_len + payload_len > len {
        return Err(refuse(format!(
            "truncated: the header declares {setup_len} bytes of setup and {payload_len} bytes \
             of kernel (setup_sects at {OFF_SETUP_SECTS:#x}, syssize at {OFF_SYSSIZE:#x}), the \
             file has {len}"
        )));
    }
    if payload_len == 0 {
        return Err(refuse(format!(
            "syssize (offset {OFF_SYSSIZE:#x}) is 0: the image has no kernel code"
        )));
    }
    let version_string = kernel_version(image, setup_len)?;
    let release = version_string
        .split_ascii_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    Release::parse(&release).map_err(|e| {
        refuse(format!(
            "the kernel_version string {version_string:?} does not start with a kernel release: {e}"
        ))
    })?;
    let xloadflags = u16_at(image, OFF_XLOADFLAGS);
    let kernel_64 = xloadflags & XLF_KERNEL_64 != 0;
    let can_load_above_4g = xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G != 0;
    if !kernel_64 {
        return Err(refuse(format!(
            "xloadflags (offset {OFF_XLOADFLAGS:#x}) lacks XLF_KERNEL_64: not a 64-bit kernel, \
             and kexec_file_load on x86-64 boots only 64-bit bzImages"
        )));
    }
    if !can_load_above_4g {
        return Err(refuse(format!(
            "kernel lacks CONFIG_RELOCATABLE (xloadflags at offset {OFF_XLOADFLAGS:#x} lacks \
             XLF_CAN_BE_LOADED_ABOVE_4G), so kexec_file_load would fail with ENOEXEC; rebuild it \
             with CONFIG_RELOCATABLE=y"
        )));
    }
    Ok(KernelInfo {
        release,
        version_string,
        boot_protocol,
        setup_sects,
        setup_len,
        payload_len,
        loadflags,
        xloadflags,
        relocatable: image[OFF_RELOCATABLE] != 0,
        kernel_64,
        can_load_above_4g,
    })
}

fn kernel_version(image: &[u8], setup_len: u64) -> Result<String, NotAKernel> {
    let ptr = u16_at(image, OFF_KERNEL_VERSION);
    if ptr == 0 {
        return Err(refuse(format!(
            "kernel_version (offset {OFF_KERNEL_VERSION:#x}) is 0: the image does not say which \
             kernel it is"
        )));
    }
    let start = usize::from(ptr) + 0x200;
    // The string lives in the real-mode setup code, which the file must contain.
    let end_limit = (setup_len.min(image.len() as u64) as usize).min(start + MAX_VERSION_STRING);
    if start >= end_limit {
        return Err(refuse(format!(
            "kernel_version points to offset {start:#x}, outside the {setup_len}-byte setup code"
        )));
    }
    let window = &image[start..end_limit];
    let Some(nul) = window.iter().position(|&b| b == 0) else {
        return Err(refuse(format!(
            "the kernel_version string at offset {start:#x} is not NUL-terminated within {} bytes",
            window.len()
        )));
    };
    let s = &window[..nul];
    if s.is_empty() || !s.iter().all(|&b| b.is_ascii_graphic() || b == b' ') {
        return Err(refuse(format!(
            "the kernel_version string at offset {start:#x} is empty or not printable ASCII"
        )));
    }
    Ok(String::from_utf8_lossy(s).into_owned())
}

/// Marker filling the "kernel" part of a [`minimal_bzimage`].
pub const MINIMAL_PAYLOAD_MARKER: &[u8] =
    b"MK-UPGRADE MINIMAL BZIMAGE: HEADER ONLY, NOT BOOTABLE\n";

/// Writes a minimal file with a valid x86 setup header for `release` (protocol 2.15,
/// 64-bit, relocatable) followed by 4 KiB of marker text instead of kernel code.
///
/// **Not bootable**: it passes [`parse`] and the agent's verification, so the emulated
/// platform and tests can run without a real kernel, but `kexec_file_load` or a boot loader
/// would fail on it. `release` should be a valid release (no whitespace); longer than 200
/// bytes is cut.
pub fn minimal_bzimage(release: &str) -> Vec<u8> {
    const SETUP_SECTS: u8 = 4;
    const SETUP_LEN: usize = (SETUP_SECTS as usize + 1) * 512;
    const PAYLOAD_LEN: usize = 4096;
    const VERSION_PTR: u16 = 0x300;
    let mut img = vec![0u8; SETUP_LEN + PAYLOAD_LEN];
    img[OFF_SETUP_SECTS] = SETUP_SECTS;
    img[OFF_SYSSIZE..OFF_SYSSIZE + 4].copy_from_slice(&((PAYLOAD_LEN / 16) as u32).to_le_bytes());
    img[OFF_BOOT_FLAG..OFF_BOOT_FLAG + 2].copy_from_slice(&0xAA55u16.to_le_bytes());
    img[0x200] = 0xEB; // jmp short, as in real kernels
    img[0x201] = 0x66;
    img[OFF_HEADER..OFF_HEADER + 4].copy_from_slice(b"HdrS");
    img[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&0x020Fu16.to_le_bytes());
    img[OFF_KERNEL_VERSION..OFF_KERNEL_VERSION + 2].copy_from_slice(&VERSION_PTR.to_le_bytes());
    img[OFF_LOADFLAGS] = LOADED_HIGH;
    img[OFF_RELOCATABLE] = 1;
    img[OFF_XLOADFLAGS..OFF_XLOADFLAGS + 2]
        .copy_from_slice(&(XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G).to_le_bytes());
    let rel: String = release.chars().take(200).collect();
    let text = format!("{rel} (mk-upgrade minimal header, not bootable)");
    let start = usize::from(VERSION_PTR) + 0x200;
    let n = text.len().min(MAX_VERSION_STRING - 1);
    img[start..start + n].copy_from_slice(&text.as_bytes()[..n]);
    for (i, b) in img[SETUP_LEN..].iter_mut().enumerate() {
        *b = MINIMAL_PAYLOAD_MARKER[i % MINIMAL_PAYLOAD_MARKER.len()];
    }
    img
}

/// [`minimal_bzimage`] whose payload is a gzip-compressed minimal x86-64 ELF carrying the
/// banner `Linux version <release> ` (payload_offset/payload_length set, as the multikernel
/// loader needs): what [`crate::verify::vmlinux::extract`] turns into a "vmlinux" for the
/// simulated multikernel kernel. **Not bootable** either.
pub fn minimal_bzimage_elf(release: &str) -> Vec<u8> {
    use std::io::Write;
    const SETUP_LEN: usize = 5 * 512;
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // ELFCLASS64
    elf[5] = 1; // little-endian
    elf[6] = 1; // EV_CURRENT
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    let rel: String = release.chars().take(200).collect();
    elf.extend_from_slice(
        format!("Linux version {rel} (mk-upgrade test vmlinux, not bootable)\0").as_bytes(),
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = gz.write_all(&elf);
    let mut payload = gz.finish().unwrap_or_default();
    payload.extend_from_slice(&u32::try_from(elf.len()).unwrap_or(0).to_le_bytes());
    let mut img = minimal_bzimage(release);
    img.truncate(SETUP_LEN);
    img.extend_from_slice(&payload);
    img.resize(SETUP_LEN + payload.len().div_ceil(16) * 16, 0);
    let sys = u32::try_from((img.len() - SETUP_LEN) / 16).unwrap_or(0);
    img[OFF_SYSSIZE..OFF_SYSSIZE + 4].copy_from_slice(&sys.to_le_bytes());
    img[0x248..0x24C].copy_from_slice(&0u32.to_le_bytes());
    img[0x24C..0x250].copy_from_slice(&u32::try_from(payload.len()).unwrap_or(0).to_le_bytes());
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_elf_image_parses_and_extracts() {
        let img = minimal_bzimage_elf("7.4.1-mkB");
        assert_eq!(parse(&img).unwrap().release, "7.4.1-mkB");
        let x = crate::verify::vmlinux::extract(&img).unwrap();
        assert!(crate::verify::vmlinux::is_elf(&x.elf));
        assert!(x.elf.windows(24).any(|w| w == b"Linux version 7.4.1-mkB "));
    }

    fn reason(img: &[u8]) -> String {
        parse(img).unwrap_err().reason
    }

    #[test]
    fn minimal_image_parses() {
        let img = minimal_bzimage("7.2.13-mkB");
        let info = parse(&img).unwrap();
        assert_eq!(info.release, "7.2.13-mkB");
        assert!(info.version_string.contains("not bootable"));
        assert_eq!(info.boot_protocol, (2, 15));
        assert!(info.kernel_64 && info.can_load_above_4g && info.relocatable);
        assert_eq!(info.setup_len + info.payload_len, img.len() as u64);
    }

    #[test]
    fn every_check_refuses_with_its_reason() {
        let good = minimal_bzimage("7.2.13");
        assert!(reason(&[]).contains("empty"));
        assert!(reason(&good[..0x100]).contains("too short"));
        let mut b = good.clone();
        b[OFF_BOOT_FLAG] = 0;
        assert!(reason(&b).contains("0xAA55"));
        let mut b = good.clone();
        b[OFF_HEADER..OFF_HEADER + 4].copy_from_slice(b"HdrX");
        assert!(reason(&b).contains("HdrS"));
        let mut b = good.clone();
        b[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        assert!(reason(&b).contains("2.06"), "{}", reason(&b));
        let mut b = good.clone();
        b[OFF_LOADFLAGS] = 0;
        assert!(reason(&b).contains("zImage"));
        assert!(reason(&good[..good.len() - 1]).contains("truncated"));
        let mut b = good.clone();
        b[OFF_SYSSIZE..OFF_SYSSIZE + 4].copy_from_slice(&0u32.to_le_bytes());
        assert!(reason(&b).contains("no kernel code"));
        let mut b = good.clone();
        b[OFF_KERNEL_VERSION..OFF_KERNEL_VERSION + 2].copy_from_slice(&0u16.to_le_bytes());
        assert!(reason(&b).contains("kernel_version"));
        let mut b = good.clone();
        b[OFF_KERNEL_VERSION..OFF_KERNEL_VERSION + 2].copy_from_slice(&0xFFFFu16.to_le_bytes());
        assert!(reason(&b).contains("outside"));
        let mut b = good.clone();
        b[0x500..0x500 + MAX_VERSION_STRING].fill(b'x');
        assert!(reason(&b).contains("NUL"));
        let mut b = good.clone();
        b[0x500] = 0x01;
        assert!(reason(&b).contains("printable"));
        let mut b = good.clone();
        b[0x500..0x505].copy_from_slice(b"Linux");
        assert!(reason(&b).contains("release"));
        let mut b = good.clone();
        b[OFF_XLOADFLAGS..OFF_XLOADFLAGS + 2]
            .copy_from_slice(&XLF_CAN_BE_LOADED_ABOVE_4G.to_le_bytes());
        assert!(reason(&b).contains("XLF_KERNEL_64"));
        let mut b = good;
        b[OFF_XLOADFLAGS..OFF_XLOADFLAGS + 2].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        assert!(reason(&b).contains("CONFIG_RELOCATABLE"));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn corrupted_header_never_panics(pos in 0x1F0usize..0x240, val: u8) {
            let mut img = minimal_bzimage("7.2.13");
            img[pos] = val;
            let _ = parse(&img);
        }
    }
}
