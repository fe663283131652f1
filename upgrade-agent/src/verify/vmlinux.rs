//! Extracting the ELF `vmlinux` from an x86 bzImage.
//!
//! The multikernel kernel's `kexec_file_load` with `KEXEC_MULTIKERNEL` loads an ELF `vmlinux`,
//! not a bzImage. A bzImage carries that ELF compressed: the real-mode setup sectors, then the
//! protected-mode code, which is the kernel's own decompressor followed by the compressed
//! payload (`vmlinux.bin`, i.e. `objcopy -R .comment -S vmlinux`, with the relocation table
//! `vmlinux.relocs` of a relocatable kernel appended after the ELF). [`extract`] does what the
//! kernel's `scripts/extract-vmlinux` does, but locates the payload by reading the boot setup
//! header (`Documentation/arch/x86/boot.rst`) instead of scanning the image for magic bytes:
//!
//! - `setup_sects` (u8 at 0x1F1; 0 means 4) gives the start of the protected-mode code,
//!   `(setup_sects + 1) * 512`;
//! - the `HdrS` magic at 0x202 and the boot protocol at 0x206 must be at least 2.08, the
//!   version that added `payload_offset` (u32 at 0x248) and `payload_length` (u32 at 0x24C),
//!   both relative to the start of the protected-mode code;
//! - the payload's first bytes name the compression ([`Compression::detect`]);
//! - its last 4 bytes are the decompressed size modulo 2^32, little-endian: the gzip trailer's
//!   `ISIZE`, or the `size_append` the kernel's build adds after every other compressor's
//!   stream (`mkpiggy` reads the same 4 bytes). The decoders stop at the end of their stream,
//!   so they ignore those bytes; the extractor checks the decompressed length against them.
//!
//! The output is byte for byte what `scripts/extract-vmlinux` prints: the ELF followed by the
//! relocation table, which an ELF loader ignores (it reads only what the program headers
//! point at). An input that already is an x86-64 ELF is returned unchanged.
//!
//! Decoded: gzip (flate2), xz including the BCJ x86 filter `scripts/xz_wrap.sh` adds
//! (lzma-rust2), zstd (ruzstd), the kernel's legacy lz4 frame (parsed here, blocks decoded by
//! lz4_flex), legacy lzma (lzma-rust2). Refused with [`VmlinuxError::Unsupported`]: bzip2 (the
//! pure-Rust decoder, libbz2-rs-sys, is under the `bzip2-1.0.6` license, which `deny.toml` does
//! not allow) and lzo (the `lzop` container; no well-kept Rust decoder). gzip (CRC-32), xz (the
//! kernel writes CRC-32) and zstd (content checksum, when the frame has one) verify what they
//! decode; lz4 and lzma carry no checksum, so a corrupted payload could decode to wrong bytes of
//! the right length. None of that is what makes the result trustworthy: the signature over the
//! bzImage is (below).
//!
//! # Bounds
//!
//! Nothing here panics on any input, and every header field is checked against the input's
//! length before use. The decompressed output never grows past [`MAX_VMLINUX_BYTES`] (1 GiB;
//! real x86-64 vmlinux files are tens of MiB): the output buffer's capacity is capped by it,
//! and decoding stops with [`VmlinuxError::TooLarge`] at the first byte past it. A decoder's
//! own window or dictionary is capped by [`MAX_DECODER_WINDOW`] (128 MiB, the most the kernel's
//! compressors use), so a forged header cannot make it allocate more. The size trailer is a
//! hint for the initial allocation only when it is under the cap.
//!
//! # What extraction means for signature checking
//!
//! The verified object is the signed bzImage: [`super::verify_kernel_image`] checks the
//! sha256 and the ed25519 signature over the bzImage's bytes. The extracted vmlinux is derived
//! from those verified bytes in memory (the caller hands [`extract`] the sealed, verified
//! mapping; nothing is re-read from disk), so it is exactly as trustworthy as the bzImage it
//! came from, and decompression is deterministic. It is, however, a different byte string from
//! the one that was signed: a bzImage's PE/Authenticode signature (and the project's manifest
//! signature) covers the bzImage, not the ELF inside it. A kernel that enforces kexec
//! signatures (`CONFIG_KEXEC_SIG_FORCE`, or lockdown under Secure Boot) will therefore refuse
//! the extracted vmlinux unless it is signed again in a form that kernel accepts (IMA
//! appraisal with an `imasig` on the file, or a kernel-accepted signature appended to it).

use std::fmt;
use std::io::{self, Read};

use super::bzimage::{OFF_HEADER, OFF_SETUP_SECTS, OFF_VERSION};

/// Largest decompressed vmlinux accepted (1 GiB). Real x86-64 vmlinux files (with the
/// relocation table) are tens of MiB; decompression stops at the first byte past this.
pub const MAX_VMLINUX_BYTES: u64 = 1 << 30;

/// Largest dictionary or window a decoder may allocate (128 MiB): what the kernel's own
/// compressors use at most (`xz_wrap.sh` uses `dict=128MiB`, `zstd -22 --ultra` a 2^27 window,
/// `lzma -9` 64 MiB). A payload whose header asks for more is refused before allocating.
pub const MAX_DECODER_WINDOW: u64 = 128 << 20;

/// Offset of `payload_offset` (u32, boot protocol 2.08+).
pub const OFF_PAYLOAD_OFFSET: usize = 0x248;
/// Offset of `payload_length` (u32, boot protocol 2.08+).
pub const OFF_PAYLOAD_LENGTH: usize = 0x24C;
/// Bytes of setup header read: up to the end of `payload_length`.
pub const HEADER_LEN: usize = 0x250;
/// Oldest boot protocol with `payload_offset` and `payload_length`.
pub const MIN_PAYLOAD_PROTOCOL: u16 = 0x0208;
/// The smallest payload considered: a format magic and the 4-byte size trailer.
const MIN_PAYLOAD_LEN: u32 = 8;

/// Memory limit handed to the lzma-rust2 decoders, in KiB: the window cap plus room for the
/// probability tables (6 MiB at the format's largest `lc + lp`) and buffers.
const LZMA_MEM_LIMIT_KB: u32 = ((MAX_DECODER_WINDOW >> 10) + 8 * 1024) as u32;

/// The kernel's legacy lz4 frame magic (`lz4 -l`), little-endian on disk: 02 21 4C 18.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Decompressed bytes per legacy lz4 chunk, at most (the kernel's
/// `LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE`).
const LZ4_LEGACY_CHUNK: usize = 8 << 20;

/// Bytes read from a decoder at a time.
const READ_CHUNK: usize = 256 << 10;

/// `e_machine` of x86-64.
const EM_X86_64: u16 = 62;
/// Size of an ELF64 file header.
const ELF64_HEADER_LEN: usize = 64;

/// How a bzImage's payload is compressed (or `None`: the input already was a vmlinux).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Compression {
    /// gzip, magic `1f 8b` (`CONFIG_KERNEL_GZIP`).
    Gzip,
    /// xz, magic `fd 37 7a 58 5a 00` (`CONFIG_KERNEL_XZ`), normally with the BCJ x86 filter.
    Xz,
    /// zstd, magic `28 b5 2f fd` (`CONFIG_KERNEL_ZSTD`).
    Zstd,
    /// lz4 legacy frame, magic `02 21 4c 18` (`CONFIG_KERNEL_LZ4`).
    Lz4,
    /// bzip2, magic `42 5a 68` (`CONFIG_KERNEL_BZIP2`). Not decoded.
    Bzip2,
    /// legacy .lzma, magic `5d 00 00` (`CONFIG_KERNEL_LZMA`).
    Lzma,
    /// lzop, magic `89 4c 5a` (`CONFIG_KERNEL_LZO`). Not decoded.
    Lzo,
    /// Not compressed: the input was already an ELF vmlinux.
    None,
}

impl Compression {
    /// The compression whose magic `payload` starts with, if any.
    pub fn detect(payload: &[u8]) -> Option<Self> {
        const MAGICS: [(&[u8], Compression); 7] = [
            (b"\xfd7zXZ\x00", Compression::Xz),
            (b"\x28\xb5\x2f\xfd", Compression::Zstd),
            (b"\x02\x21\x4c\x18", Compression::Lz4),
            (b"\x1f\x8b", Compression::Gzip),
            (b"BZh", Compression::Bzip2),
            (b"\x5d\x00\x00", Compression::Lzma),
            (b"\x89LZ", Compression::Lzo),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map(|&(_, c)| c)
    }

    /// Lower-case name, as the kernel's `CONFIG_KERNEL_*` options spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::Lz4 => "lz4",
            Self::Bzip2 => "bzip2",
            Self::Lzma => "lzma",
            Self::Lzo => "lzo",
            Self::None => "none",
        }
    }

    /// Whether [`extract`] decodes this compression.
    pub fn is_supported(self) -> bool {
        !matches!(self, Self::Bzip2 | Self::Lzo)
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why no x86-64 ELF vmlinux could be extracted. Each message names what was wrong and what to
/// do about it.
#[derive(Debug, thiserror::Error)]
pub enum VmlinuxError {
    /// Too short to hold the setup header fields read.
    #[error(
        "image is {len} bytes, shorter than the {need}-byte x86 boot setup header that locates \
         the compressed kernel: not a bzImage; pass the kernel's arch/x86/boot/bzImage or its \
         x86-64 ELF vmlinux"
    )]
    Truncated {
        /// Input length.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// No `HdrS` at 0x202 (and not an ELF either).
    #[error(
        "no \"HdrS\" setup header magic at offset 0x202 (found {found:02x?}) and no ELF magic: \
         not an x86 bzImage nor a vmlinux; pass the kernel's arch/x86/boot/bzImage or its \
         x86-64 ELF vmlinux"
    )]
    BadMagic {
        /// The four bytes found at 0x202.
        found: [u8; 4],
    },
    /// An ELF, but not a 64-bit little-endian x86-64 one.
    #[error(
        "input is an ELF but not an x86-64 vmlinux ({what}): pass the x86-64 kernel's bzImage \
         or its 64-bit little-endian EM_X86_64 vmlinux"
    )]
    ForeignElf {
        /// What the ELF identification says.
        what: String,
    },
    /// Boot protocol older than 2.08: no `payload_offset` / `payload_length`.
    #[error(
        "boot protocol {major}.{minor:02} predates 2.08, which added payload_offset and \
         payload_length: the kernel is too old to extract by its setup header; use a newer \
         kernel or the kernel's scripts/extract-vmlinux"
    )]
    OldProtocol {
        /// Major version.
        major: u8,
        /// Minor version.
        minor: u8,
    },
    /// The payload the header declares does not lie within the input.
    #[error(
        "the setup header puts the payload at {start} (setup {setup_len} + payload_offset \
         {payload_offset}) with payload_length {payload_length}, ending at {end}, past the \
         image's {len} bytes: the bzImage is truncated or corrupt; copy it again"
    )]
    PayloadOutOfBounds {
        /// Bytes of real-mode setup, `(setup_sects + 1) * 512`.
        setup_len: u64,
        /// `payload_offset` from the header.
        payload_offset: u32,
        /// `payload_length` from the header.
        payload_length: u32,
        /// Where the payload would start.
        start: u64,
        /// Where it would end.
        end: u64,
        /// Input length.
        len: usize,
    },
    /// The payload is too short to be a compressed kernel.
    #[error(
        "payload_length is {payload_length} bytes, too short for a compressed kernel (a format \
         magic and a 4-byte size trailer): the bzImage is corrupt; copy it again"
    )]
    PayloadTooShort {
        /// `payload_length` from the header.
        payload_length: u32,
    },
    /// The payload starts with no known compression magic.
    #[error(
        "payload starts with bytes {magic}, the magic of no compression the kernel uses (gzip, \
         xz, zstd, lz4, bzip2, lzma, lzo): the setup header's payload_offset is wrong or the \
         image is corrupt; copy it again"
    )]
    UnknownCompression {
        /// The payload's first bytes, in hex.
        magic: String,
    },
    /// A compression the kernel supports but this extractor does not decode.
    #[error(
        "payload is {compression}-compressed, which this extractor does not decode ({why}): \
         rebuild the kernel with CONFIG_KERNEL_XZ, CONFIG_KERNEL_ZSTD, CONFIG_KERNEL_GZIP or \
         CONFIG_KERNEL_LZ4, or extract it offline with the kernel's scripts/extract-vmlinux"
    )]
    Unsupported {
        /// The compression.
        compression: Compression,
        /// Why it is not decoded.
        why: &'static str,
    },
    /// The size trailer alone says the result would exceed the cap.
    #[error(
        "the {compression} payload's size trailer records {recorded} decompressed bytes, over \
         the {cap}-byte cap (MAX_VMLINUX_BYTES): refused before decompressing; the image is \
         corrupt or not a kernel"
    )]
    TrailerTooLarge {
        /// The compression.
        compression: Compression,
        /// The size the trailer records.
        recorded: u32,
        /// The cap in force.
        cap: u64,
    },
    /// Decompression produced more than the cap.
    #[error(
        "the {compression} payload decompresses to more than {cap} bytes, the cap \
         (MAX_VMLINUX_BYTES): stopped there; the image is corrupt or not a kernel"
    )]
    TooLarge {
        /// The compression (`None`: an ELF input over the cap).
        compression: Compression,
        /// The cap in force.
        cap: u64,
    },
    /// The decoder rejected the stream.
    #[error(
        "the {compression} payload failed to decompress: {source}; the bzImage is corrupt \
         (check its sha256 against the signed manifest) or its header asks for more than \
         this decoder allows"
    )]
    Decompress {
        /// The compression.
        compression: Compression,
        /// The decoder's error.
        source: io::Error,
    },
    /// Decompressed, but not to the length the payload's trailer records.
    #[error(
        "the {compression} payload decompressed to {actual} bytes but its size trailer records \
         {recorded} (modulo 2^32): the payload is truncated or corrupt; copy the bzImage again"
    )]
    SizeMismatch {
        /// The compression.
        compression: Compression,
        /// Bytes decompressed.
        actual: u64,
        /// The size the trailer records.
        recorded: u32,
    },
    /// Decompressed, but the result is no x86-64 ELF.
    #[error(
        "payload decompressed but is not an x86-64 ELF ({compression}, {len} bytes, starting \
         {head}): the image is not an x86-64 kernel or is corrupt; pass an x86-64 bzImage"
    )]
    NotElf {
        /// The compression.
        compression: Compression,
        /// Bytes decompressed.
        len: usize,
        /// The first bytes, in hex.
        head: String,
    },
}

/// An extracted vmlinux. Its `Debug` shows the ELF's length, not its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Extracted {
    /// The x86-64 ELF vmlinux (followed by the relocation table of a relocatable kernel,
    /// exactly as `scripts/extract-vmlinux` prints it).
    pub elf: Vec<u8>,
    /// How the payload was compressed ([`Compression::None`]: the input was the ELF).
    pub compression: Compression,
    /// The compressed payload's length (`payload_length`, size trailer included); for an ELF
    /// input, the input's length.
    pub payload_len: u64,
}

impl fmt::Debug for Extracted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extracted")
            .field("elf", &format_args!("<{} bytes>", self.elf.len()))
            .field("compression", &self.compression)
            .field("payload_len", &self.payload_len)
            .finish()
    }
}

/// True if `bytes` start with an ELF64 header for little-endian x86-64: the `\x7fELF` magic,
/// `ELFCLASS64`, `ELFDATA2LSB` and `e_machine == EM_X86_64`.
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.len() >= ELF64_HEADER_LEN
        && bytes.starts_with(b"\x7fELF")
        && bytes[4] == 2
        && bytes[5] == 1
        && u16::from_le_bytes([bytes[18], bytes[19]]) == EM_X86_64
}

/// Extracts the ELF vmlinux from an x86 bzImage (or returns an x86-64 ELF input unchanged),
/// decompressing at most [`MAX_VMLINUX_BYTES`].
pub fn extract(bzimage: &[u8]) -> Result<Extracted, VmlinuxError> {
    extract_with_cap(bzimage, MAX_VMLINUX_BYTES)
}

/// [`extract`] with another cap on the decompressed size (tests use a small one).
pub(crate) fn extract_with_cap(bytes: &[u8], cap: u64) -> Result<Extracted, VmlinuxError> {
    if is_elf(bytes) {
        if bytes.len() as u64 > cap {
            return Err(VmlinuxError::TooLarge {
                compression: Compression::None,
                cap,
            });
        }
        return Ok(Extracted {
            elf: bytes.to_vec(),
            compression: Compression::None,
            payload_len: bytes.len() as u64,
        });
    }
    if bytes.starts_with(b"\x7fELF") {
        return Err(VmlinuxError::ForeignElf {
            what: describe_elf(bytes),
        });
    }
    let payload = locate_payload(bytes)?;
    let Some(compression) = Compression::detect(payload) else {
        return Err(VmlinuxError::UnknownCompression {
            magic: hex_head(payload, 6),
        });
    };
    let (stream, trailer) = payload.split_at(payload.len() - 4);
    let recorded = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    if u64::from(recorded) > cap {
        return Err(VmlinuxError::TrailerTooLarge {
            compression,
            recorded,
            cap,
        });
    }
    let elf = decompress(compression, payload, stream, cap, recorded)?;
    let actual = elf.len() as u64;
    if actual & 0xFFFF_FFFF != u64::from(recorded) {
        return Err(VmlinuxError::SizeMismatch {
            compression,
            actual,
            recorded,
        });
    }
    if !is_elf(&elf) {
        return Err(VmlinuxError::NotElf {
            compression,
            len: elf.len(),
            head: hex_head(&elf, 8),
        });
    }
    Ok(Extracted {
        elf,
        compression,
        payload_len: payload.len() as u64,
    })
}

/// The payload the setup header declares, bounds-checked.
fn locate_payload(bytes: &[u8]) -> Result<&[u8], VmlinuxError> {
    if bytes.len() < HEADER_LEN {
        return Err(VmlinuxError::Truncated {
            len: bytes.len(),
            need: HEADER_LEN,
        });
    }
    let u16_at = |off: usize| u16::from_le_bytes([bytes[off], bytes[off + 1]]);
    let u32_at = |off: usize| {
        u32::from_le_bytes([bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]])
    };
    if &bytes[OFF_HEADER..OFF_HEADER + 4] != b"HdrS" {
        return Err(VmlinuxError::BadMagic {
            found: [
                bytes[OFF_HEADER],
                bytes[OFF_HEADER + 1],
                bytes[OFF_HEADER + 2],
                bytes[OFF_HEADER + 3],
            ],
        });
    }
    let version = u16_at(OFF_VERSION);
    if version < MIN_PAYLOAD_PROTOCOL {
        return Err(VmlinuxError::OldProtocol {
            major: (version >> 8) as u8,
            minor: (version & 0xFF) as u8,
        });
    }
    let setup_sects = match bytes[OFF_SETUP_SECTS] {
        0 => 4,
        n => u64::from(n),
    };
    let setup_len = (setup_sects + 1) * 512;
    let payload_offset = u32_at(OFF_PAYLOAD_OFFSET);
    let payload_length = u32_at(OFF_PAYLOAD_LENGTH);
    // All u64: at most 128 KiB + 4 GiB + 4 GiB, no overflow.
    let start = setup_len + u64::from(payload_offset);
    let end = start + u64::from(payload_length);
    let out_of_bounds = || VmlinuxError::PayloadOutOfBounds {
        setup_len,
        payload_offset,
        payload_length,
        start,
        end,
        len: bytes.len(),
    };
    if end > bytes.len() as u64 {
        return Err(out_of_bounds());
    }
    if payload_length < MIN_PAYLOAD_LEN {
        return Err(VmlinuxError::PayloadTooShort { payload_length });
    }
    let start = usize::try_from(start).map_err(|_| out_of_bounds())?;
    let end = usize::try_from(end).map_err(|_| out_of_bounds())?;
    bytes.get(start..end).ok_or_else(out_of_bounds)
}

/// Decompresses `payload` (whole, trailer included) or, for lz4, `stream` (trailer removed).
fn decompress(
    compression: Compression,
    payload: &[u8],
    stream: &[u8],
    cap: u64,
    size_hint: u32,
) -> Result<Vec<u8>, VmlinuxError> {
    let corrupt = |source: io::Error| VmlinuxError::Decompress {
        compression,
        source,
    };
    let hint = u64::from(size_hint);
    match compression {
        Compression::Gzip => read_bounded(
            flate2::bufread::GzDecoder::new(payload),
            compression,
            cap,
            hint,
        ),
        Compression::Xz => read_bounded(
            lzma_rust2::XzReader::new_mem_limit(payload, false, LZMA_MEM_LIMIT_KB),
            compression,
            cap,
            hint,
        ),
        Compression::Lzma => {
            let reader = lzma_rust2::LzmaReader::new_mem_limit(payload, LZMA_MEM_LIMIT_KB, None)
                .map_err(corrupt)?;
            read_bounded(reader, compression, cap, hint)
        }
        Compression::Zstd => {
            let mut reader = ruzstd::decoding::StreamingDecoder::new_with_max_window_size(
                payload,
                MAX_DECODER_WINDOW,
            )
            .map_err(|e| corrupt(io::Error::new(io::ErrorKind::InvalidData, e.to_string())))?;
            let out = read_bounded(&mut reader, compression, cap, hint)?;
            // The decoder reads the frame's content checksum but leaves comparing it to us.
            let frame = &reader.decoder;
            if let Some(stored) = frame.get_checksum_from_data()
                && frame.get_calculated_checksum() != Some(stored)
            {
                return Err(corrupt(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "content checksum {stored:08x} does not match the decompressed data's {:08x}",
                        frame.get_calculated_checksum().unwrap_or(0)
                    ),
                )));
            }
            Ok(out)
        }
        Compression::Lz4 => lz4_legacy(stream, cap, hint),
        Compression::Bzip2 => Err(VmlinuxError::Unsupported {
            compression,
            why: "its only pure-Rust decoder, libbz2-rs-sys, is under the bzip2-1.0.6 license, \
                  which deny.toml does not allow",
        }),
        Compression::Lzo => Err(VmlinuxError::Unsupported {
            compression,
            why: "no well-kept Rust decoder for the lzop container",
        }),
        // `detect` never yields `None`.
        Compression::None => Err(VmlinuxError::UnknownCompression {
            magic: hex_head(payload, 6),
        }),
    }
}

/// `usize` view of a cap (saturating: a cap past the address space is no cap on allocation).
fn cap_usize(cap: u64) -> usize {
    usize::try_from(cap).unwrap_or(usize::MAX)
}

/// Makes room for `additional` more bytes in `out` without its capacity passing `cap`
/// (doubling, as `Vec` does, but clamped). The caller has checked `len + additional <= cap`.
fn reserve_capped(out: &mut Vec<u8>, additional: usize, cap: usize) {
    let needed = out.len() + additional;
    if out.capacity() >= needed {
        return;
    }
    let target = out.capacity().saturating_mul(2).max(needed).min(cap);
    out.reserve_exact(target - out.len());
}

/// Reads `reader` to its end into a buffer that never exceeds `cap` bytes.
fn read_bounded(
    mut reader: impl Read,
    compression: Compression,
    cap: u64,
    size_hint: u64,
) -> Result<Vec<u8>, VmlinuxError> {
    let cap = cap_usize(cap);
    let mut out = Vec::with_capacity(cap_usize(size_hint).min(cap));
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(VmlinuxError::Decompress {
                    compression,
                    source,
                });
            }
        };
        if n > cap - out.len() {
            return Err(VmlinuxError::TooLarge {
                compression,
                cap: cap as u64,
            });
        }
        reserve_capped(&mut out, n, cap);
        out.extend_from_slice(&buf[..n]);
    }
}

/// Decodes the kernel's legacy lz4 frame (`lz4 -l`, as `lib/decompress_unlz4.c` reads it): the
/// magic, then chunks of a u32 little-endian compressed length and an lz4 block of at most
/// 8 MiB decompressed. A repeated magic (concatenated frames) is skipped; a zero length or the
/// end of `stream` (the payload less its size trailer) ends it.
fn lz4_legacy(stream: &[u8], cap: u64, size_hint: u64) -> Result<Vec<u8>, VmlinuxError> {
    let corrupt = |what: String| VmlinuxError::Decompress {
        compression: Compression::Lz4,
        source: io::Error::new(io::ErrorKind::InvalidData, what),
    };
    let cap = cap_usize(cap);
    let max_block = lz4_block_bound(LZ4_LEGACY_CHUNK);
    let mut out = Vec::with_capacity(cap_usize(size_hint).min(cap));
    let mut rest = stream;
    let mut magic_seen = false;
    loop {
        if rest.is_empty() {
            break;
        }
        let Some((len_bytes, tail)) = rest.split_first_chunk::<4>() else {
            return Err(corrupt(format!(
                "{} stray bytes where a chunk length belongs",
                rest.len()
            )));
        };
        rest = tail;
        let len = u32::from_le_bytes(*len_bytes);
        if len == LZ4_LEGACY_MAGIC {
            magic_seen = true;
            continue;
        }
        if !magic_seen {
            return Err(corrupt("no legacy lz4 magic".to_owned()));
        }
        if len == 0 {
            break;
        }
        let len = len as usize;
        if len > rest.len() || len > max_block {
            return Err(corrupt(format!(
                "chunk of {len} compressed bytes, but {} remain and a chunk holds at most {max_block}",
                rest.len()
            )));
        }
        let (block, tail) = rest.split_at(len);
        rest = tail;
        let start = out.len();
        let room = LZ4_LEGACY_CHUNK.min(cap - start);
        if room == 0 {
            return Err(VmlinuxError::TooLarge {
                compression: Compression::Lz4,
                cap: cap as u64,
            });
        }
        reserve_capped(&mut out, room, cap);
        out.resize(start + room, 0);
        match lz4_flex::block::decompress_into(block, &mut out[start..]) {
            Ok(n) => out.truncate(start + n),
            Err(lz4_flex::block::DecompressError::OutputTooSmall { .. })
                if room < LZ4_LEGACY_CHUNK =>
            {
                return Err(VmlinuxError::TooLarge {
                    compression: Compression::Lz4,
                    cap: cap as u64,
                });
            }
            Err(e) => return Err(corrupt(format!("lz4 block at chunk offset {start}: {e}"))),
        }
    }
    Ok(out)
}

/// The largest compressed size of an lz4 block of `n` bytes (`LZ4_compressBound`).
fn lz4_block_bound(n: usize) -> usize {
    n + n / 255 + 16
}

/// What an ELF's identification and `e_machine` say, for [`VmlinuxError::ForeignElf`].
fn describe_elf(bytes: &[u8]) -> String {
    if bytes.len() < 20 {
        return format!("a truncated ELF header of {} bytes", bytes.len());
    }
    let class = match bytes[4] {
        1 => "32-bit".to_owned(),
        2 => "64-bit".to_owned(),
        c => format!("class {c}"),
    };
    let (data, machine) = match bytes[5] {
        1 => ("little-endian", u16::from_le_bytes([bytes[18], bytes[19]])),
        2 => ("big-endian", u16::from_be_bytes([bytes[18], bytes[19]])),
        _ => (
            "unknown byte order",
            u16::from_le_bytes([bytes[18], bytes[19]]),
        ),
    };
    let short = if bytes.len() < ELF64_HEADER_LEN {
        format!(", only {} bytes", bytes.len())
    } else {
        String::new()
    };
    format!("{class} {data}, e_machine {machine}{short}")
}

/// The first `n` bytes of `bytes` in hex, space-separated.
fn hex_head(bytes: &[u8], n: usize) -> String {
    let head: Vec<String> = bytes.iter().take(n).map(|b| format!("{b:02x}")).collect();
    if head.is_empty() {
        "(none)".to_owned()
    } else {
        head.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use proptest::prelude::*;

    use super::*;

    /// An x86-64 ELF64 header followed by a body with x86 call/jump opcodes (so the xz BCJ
    /// filter has something to convert) and some text.
    fn minimal_elf() -> Vec<u8> {
        let mut elf = vec![0u8; ELF64_HEADER_LEN];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // ELFCLASS64
        elf[5] = 1; // ELFDATA2LSB
        elf[6] = 1; // EV_CURRENT
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        elf[20..24].copy_from_slice(&1u32.to_le_bytes()); // e_version
        elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        for i in 0..2000u32 {
            elf.push(if i % 2 == 0 { 0xE8 } else { 0xE9 });
            elf.extend_from_slice(&(i * 37).to_le_bytes());
            elf.extend_from_slice(b"\x48\x89\xe5\x90");
        }
        elf.extend_from_slice(&b"Linux version 7.3.4-mkA (test) ".repeat(40));
        elf
    }

    fn size_append(mut stream: Vec<u8>, size: usize) -> Vec<u8> {
        stream.extend_from_slice(&(size as u32).to_le_bytes());
        stream
    }

    /// The kernel's legacy lz4 frame with chunks of `chunk` input bytes.
    fn lz4_legacy_frame(data: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for piece in data.chunks(chunk) {
            let block = lz4_flex::block::compress(piece);
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            out.extend_from_slice(&block);
        }
        out
    }

    /// `data` compressed as the kernel's build does it (size trailer included).
    fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
        match c {
            Compression::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap() // gzip's own ISIZE trailer
            }
            Compression::Xz => {
                let mut opts = lzma_rust2::XzOptions::with_preset(1);
                opts.set_check_sum_type(lzma_rust2::CheckType::Crc32);
                opts.prepend_pre_filter(lzma_rust2::FilterType::BcjX86, 0);
                let mut w = lzma_rust2::XzWriter::new(Vec::new(), opts).unwrap();
                w.write_all(data).unwrap();
                size_append(w.finish().unwrap(), data.len())
            }
            Compression::Zstd => size_append(
                ruzstd::encoding::compress_to_vec(
                    data,
                    ruzstd::encoding::CompressionLevel::Fastest,
                ),
                data.len(),
            ),
            Compression::Lz4 => size_append(lz4_legacy_frame(data, LZ4_LEGACY_CHUNK), data.len()),
            Compression::Lzma => {
                let opts = lzma_rust2::LzmaOptions::with_preset(1);
                // Unknown size and an end marker, as `lzma -9` writes to a pipe.
                let mut w =
                    lzma_rust2::LzmaWriter::new_use_header(Vec::new(), &opts, None).unwrap();
                w.write_all(data).unwrap();
                size_append(w.finish().unwrap(), data.len())
            }
            Compression::Bzip2 | Compression::Lzo | Compression::None => unreachable!(),
        }
    }

    const SUPPORTED: [Compression; 5] = [
        Compression::Gzip,
        Compression::Xz,
        Compression::Zstd,
        Compression::Lz4,
        Compression::Lzma,
    ];

    /// Offset of the payload inside the protected-mode code in the synthetic images.
    const PM_OFFSET: u32 = 0x1234;

    /// A bzImage with `setup_sects` setup sectors, boot protocol `version` and `payload` at
    /// [`PM_OFFSET`] into the protected-mode code, followed by some padding.
    fn bzimage(payload: &[u8], setup_sects: u8, version: u16) -> Vec<u8> {
        let sects = if setup_sects == 0 { 4 } else { setup_sects };
        let setup_len = (usize::from(sects) + 1) * 512;
        let start = setup_len + PM_OFFSET as usize;
        let mut img = vec![0u8; start + payload.len() + 100];
        img[OFF_SETUP_SECTS] = setup_sects;
        img[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
        img[OFF_HEADER..OFF_HEADER + 4].copy_from_slice(b"HdrS");
        img[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&version.to_le_bytes());
        img[OFF_PAYLOAD_OFFSET..OFF_PAYLOAD_OFFSET + 4].copy_from_slice(&PM_OFFSET.to_le_bytes());
        img[OFF_PAYLOAD_LENGTH..OFF_PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img[start..start + payload.len()].copy_from_slice(payload);
        // The decompressor code before the payload: x86 bytes, not zeros.
        for b in &mut img[setup_len..start] {
            *b = 0xCC;
        }
        img
    }

    fn image(c: Compression) -> Vec<u8> {
        bzimage(&compress(c, &minimal_elf()), 0x1F, 0x020F)
    }

    #[test]
    fn every_supported_compression_round_trips() {
        let elf = minimal_elf();
        for c in SUPPORTED {
            let payload = compress(c, &elf);
            assert_eq!(Compression::detect(&payload), Some(c), "{c}");
            let out =
                extract(&bzimage(&payload, 0x1F, 0x020F)).unwrap_or_else(|e| panic!("{c}: {e}"));
            assert_eq!(out.compression, c);
            assert_eq!(out.payload_len, payload.len() as u64);
            assert!(out.elf == elf, "{c}: output differs from the input ELF");
            assert!(c.is_supported());
        }
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let payload = compress(Compression::Gzip, &minimal_elf());
        let out = extract(&bzimage(&payload, 0, 0x0208)).unwrap();
        assert_eq!(out.elf, minimal_elf());
    }

    #[test]
    fn lz4_multiple_chunks_and_concatenated_frames() {
        let elf = minimal_elf();
        // Small chunks (the kernel's decoder takes any chunk up to 8 MiB), then a second frame.
        let half = elf.len() / 2;
        let mut stream = lz4_legacy_frame(&elf[..half], 1000);
        stream.extend_from_slice(&lz4_legacy_frame(&elf[half..], 777));
        let out = extract(&bzimage(&size_append(stream, elf.len()), 0x1F, 0x020F)).unwrap();
        assert_eq!(out.elf, elf);
    }

    #[test]
    fn elf_input_is_returned_unchanged() {
        let elf = minimal_elf();
        let out = extract(&elf).unwrap();
        assert_eq!(out.compression, Compression::None);
        assert_eq!(out.elf, elf);
        assert_eq!(out.payload_len, elf.len() as u64);
        assert!(matches!(
            extract_with_cap(&elf, 100),
            Err(VmlinuxError::TooLarge {
                compression: Compression::None,
                ..
            })
        ));
    }

    #[test]
    fn is_elf_checks_class_order_and_machine() {
        let elf = minimal_elf();
        assert!(is_elf(&elf));
        assert!(!is_elf(&elf[..63]));
        for (off, value) in [(0, 0x7E), (4, 1), (5, 2), (18, 183)] {
            let mut bad = elf.clone();
            bad[off] = value;
            assert!(!is_elf(&bad), "byte {off} = {value}");
        }
    }

    #[test]
    fn foreign_elf_is_named() {
        let mut arm = minimal_elf();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
        let err = extract(&arm).unwrap_err();
        assert!(matches!(err, VmlinuxError::ForeignElf { .. }), "{err}");
        assert!(err.to_string().contains("e_machine 183"), "{err}");
        assert!(matches!(
            extract(b"\x7fELF\x02"),
            Err(VmlinuxError::ForeignElf { .. })
        ));
    }

    #[test]
    fn truncated_header() {
        for len in [0, 1, 0x200, HEADER_LEN - 1] {
            let img = image(Compression::Gzip);
            let err = extract(&img[..len]).unwrap_err();
            assert!(
                matches!(err, VmlinuxError::Truncated { len: l, need: HEADER_LEN } if l == len),
                "{len}: {err}"
            );
        }
    }

    #[test]
    fn bad_magic() {
        let mut img = image(Compression::Gzip);
        img[OFF_HEADER] = b'X';
        let err = extract(&img).unwrap_err();
        assert!(
            matches!(err, VmlinuxError::BadMagic { found } if &found == b"XdrS"),
            "{err}"
        );
        assert!(matches!(
            extract(&[0u8; 4096]),
            Err(VmlinuxError::BadMagic { .. })
        ));
    }

    #[test]
    fn old_protocol() {
        let payload = compress(Compression::Gzip, &minimal_elf());
        let err = extract(&bzimage(&payload, 0x1F, 0x0207)).unwrap_err();
        assert!(
            matches!(err, VmlinuxError::OldProtocol { major: 2, minor: 7 }),
            "{err}"
        );
        assert!(err.to_string().contains("2.07"), "{err}");
    }

    #[test]
    fn payload_out_of_bounds() {
        let img = image(Compression::Gzip);
        // Length one past the end.
        let mut bad = img.clone();
        let room = img.len() - (0x20 * 512 + PM_OFFSET as usize);
        bad[OFF_PAYLOAD_LENGTH..OFF_PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(room as u32 + 1).to_le_bytes());
        assert!(matches!(
            extract(&bad),
            Err(VmlinuxError::PayloadOutOfBounds { .. })
        ));
        // Exactly to the end is fine as far as bounds go (the padding is no gzip member end).
        bad[OFF_PAYLOAD_LENGTH..OFF_PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(room as u32).to_le_bytes());
        assert!(!matches!(
            extract(&bad),
            Err(VmlinuxError::PayloadOutOfBounds { .. })
        ));
        // Huge offset and length: no overflow.
        for (off, len) in [(u32::MAX, u32::MAX), (u32::MAX, 8), (0, u32::MAX)] {
            let mut bad = img.clone();
            bad[OFF_PAYLOAD_OFFSET..OFF_PAYLOAD_OFFSET + 4].copy_from_slice(&off.to_le_bytes());
            bad[OFF_PAYLOAD_LENGTH..OFF_PAYLOAD_LENGTH + 4].copy_from_slice(&len.to_le_bytes());
            let err = extract(&bad).unwrap_err();
            assert!(
                matches!(err, VmlinuxError::PayloadOutOfBounds { .. }),
                "{err}"
            );
        }
        // Setup sectors past the end of a short image.
        let mut short = img[..0x400].to_vec();
        short[OFF_SETUP_SECTS] = 0xFF;
        assert!(matches!(
            extract(&short),
            Err(VmlinuxError::PayloadOutOfBounds { .. })
        ));
        // Too short to be a payload.
        let mut tiny = img;
        tiny[OFF_PAYLOAD_LENGTH..OFF_PAYLOAD_LENGTH + 4].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            extract(&tiny),
            Err(VmlinuxError::PayloadTooShort { payload_length: 3 })
        ));
    }

    #[test]
    fn unknown_and_unsupported_compression() {
        let err = extract(&bzimage(b"hello, world!", 0x1F, 0x020F)).unwrap_err();
        assert!(
            matches!(err, VmlinuxError::UnknownCompression { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("68 65 6c 6c 6f 2c"), "{err}");
        for (payload, c) in [
            (&b"BZh91AY&SY\x00\x00\x00\x00"[..], Compression::Bzip2),
            (&b"\x89LZO\x00\r\n\x1a\n\x00\x00\x00"[..], Compression::Lzo),
        ] {
            let err = extract(&bzimage(payload, 0x1F, 0x020F)).unwrap_err();
            assert!(
                matches!(err, VmlinuxError::Unsupported { compression, .. } if compression == c),
                "{err}"
            );
            assert!(!c.is_supported());
        }
    }

    #[test]
    fn decompressed_non_elf_is_refused() {
        let text = b"not an ELF at all, just text ".repeat(10);
        for c in SUPPORTED {
            let err = extract(&bzimage(&compress(c, &text), 0x1F, 0x020F)).unwrap_err();
            assert!(matches!(err, VmlinuxError::NotElf { .. }), "{c}: {err}");
            assert!(
                err.to_string()
                    .contains("payload decompressed but is not an x86-64 ELF"),
                "{err}"
            );
        }
    }

    #[test]
    fn wrong_size_trailer_is_refused() {
        let elf = minimal_elf();
        for c in SUPPORTED {
            let mut payload = compress(c, &elf);
            let n = payload.len();
            payload[n - 4..].copy_from_slice(&(elf.len() as u32 - 1).to_le_bytes());
            let err = extract(&bzimage(&payload, 0x1F, 0x020F)).unwrap_err();
            // gzip checks its own ISIZE first.
            assert!(
                matches!(
                    err,
                    VmlinuxError::SizeMismatch { .. } | VmlinuxError::Decompress { .. }
                ),
                "{c}: {err}"
            );
        }
    }

    #[test]
    fn corrupt_stream_is_refused_where_the_format_has_a_checksum() {
        let elf = minimal_elf();
        for c in SUPPORTED {
            let mut payload = compress(c, &elf);
            let mid = payload.len() / 2;
            for b in &mut payload[mid..mid + 16] {
                *b ^= 0x5A;
            }
            match extract(&bzimage(&payload, 0x1F, 0x020F)) {
                Err(
                    VmlinuxError::Decompress { .. }
                    | VmlinuxError::SizeMismatch { .. }
                    | VmlinuxError::NotElf { .. },
                ) => {}
                Err(other) => panic!("{c}: unexpected error {other}"),
                // lz4 and lzma have no checksum: wrong bytes may come out, never the right ones.
                Ok(out) => {
                    assert!(
                        matches!(c, Compression::Lz4 | Compression::Lzma),
                        "{c}: corruption went unnoticed"
                    );
                    assert!(
                        out.elf != elf,
                        "{c}: corrupt payload decoded to the original"
                    );
                }
            }
        }
    }

    #[test]
    fn zstd_checksum_is_verified() {
        let elf = minimal_elf();
        let mut payload = compress(Compression::Zstd, &elf);
        // The frame's content checksum: the 4 bytes before the size trailer.
        let n = payload.len();
        payload[n - 8] ^= 0xFF;
        let err = extract(&bzimage(&payload, 0x1F, 0x020F)).unwrap_err();
        assert!(
            matches!(err, VmlinuxError::Decompress { .. }) && err.to_string().contains("checksum"),
            "{err}"
        );
    }

    #[test]
    fn truncated_stream_is_refused() {
        let elf = minimal_elf();
        for c in SUPPORTED {
            let payload = compress(c, &elf);
            // Cut the stream in half, keep the (correct) trailer.
            let mut cut = payload[..payload.len() / 2].to_vec();
            cut.extend_from_slice(&payload[payload.len() - 4..]);
            assert!(extract(&bzimage(&cut, 0x1F, 0x020F)).is_err(), "{c}");
        }
    }

    #[test]
    fn size_cap() {
        let cap = 64 << 10;
        // A small stream of zeros that produces 4 times the cap.
        let zeros = vec![0u8; 4 * cap];
        for c in SUPPORTED {
            let mut payload = compress(c, &zeros);
            assert!(payload.len() < cap / 4, "{c}: {} bytes", payload.len());
            let img = bzimage(&payload, 0x1F, 0x020F);
            // The trailer says 256 KiB: refused before decompressing.
            let err = extract_with_cap(&img, cap as u64).unwrap_err();
            assert!(
                matches!(err, VmlinuxError::TrailerTooLarge { recorded, .. } if recorded as usize == zeros.len()),
                "{c}: {err}"
            );
            // The trailer lies (100 bytes): decoding stops at the cap.
            // (For gzip that is its own ISIZE, checked only at the end it never reaches.)
            let n = payload.len();
            payload[n - 4..].copy_from_slice(&100u32.to_le_bytes());
            let err = extract_with_cap(&bzimage(&payload, 0x1F, 0x020F), cap as u64).unwrap_err();
            assert!(
                matches!(err, VmlinuxError::TooLarge { compression, cap: k } if compression == c && k == cap as u64),
                "{c}: {err}"
            );
        }
        // Exactly at the cap is fine, one byte under it is not.
        let elf = minimal_elf();
        for c in SUPPORTED {
            let img = image(c);
            let exact = extract_with_cap(&img, elf.len() as u64).unwrap();
            assert_eq!(exact.elf, elf, "{c}");
            let err = extract_with_cap(&img, elf.len() as u64 - 1).unwrap_err();
            assert!(
                matches!(err, VmlinuxError::TrailerTooLarge { .. }),
                "{c}: {err}"
            );
        }
    }

    #[test]
    fn lz4_cap_with_lying_trailer_inside_one_chunk() {
        // One chunk that decompresses past the cap: the slot is cut to the cap and the
        // decoder's "output too small" becomes TooLarge.
        let zeros = vec![0u8; 300_000];
        let mut payload = lz4_legacy_frame(&zeros, LZ4_LEGACY_CHUNK);
        payload.extend_from_slice(&10u32.to_le_bytes());
        let err = extract_with_cap(&bzimage(&payload, 0x1F, 0x020F), 100_000).unwrap_err();
        assert!(
            matches!(
                err,
                VmlinuxError::TooLarge {
                    compression: Compression::Lz4,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn messages_name_the_problem_and_the_remedy() {
        let err = extract(&[0u8; 10]).unwrap_err().to_string();
        assert!(
            err.contains("not a bzImage") && err.contains("pass"),
            "{err}"
        );
        let mut big = image(Compression::Zstd);
        let pos = big.len() - 100 - 4;
        big[pos..pos + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = extract(&big).unwrap_err().to_string();
        assert!(err.contains("MAX_VMLINUX_BYTES"), "{err}");
    }

    /// Valid images of every supported compression, built once.
    fn valid_images() -> &'static [Vec<u8>] {
        static IMAGES: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
        IMAGES.get_or_init(|| SUPPORTED.iter().map(|&c| image(c)).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = extract_with_cap(&bytes, 1 << 20);
        }

        #[test]
        fn random_payload_behind_a_valid_header_never_panics(
            setup_sects in any::<u8>(),
            version in 0x0200u16..0x0210,
            payload_offset in 0u32..0x3000,
            payload_length in 0u32..0x3000,
            body in proptest::collection::vec(any::<u8>(), 0..0x8000),
            magic in 0usize..8,
        ) {
            let mut img = vec![0u8; HEADER_LEN];
            img.extend_from_slice(&body);
            img[OFF_SETUP_SECTS] = setup_sects;
            img[OFF_HEADER..OFF_HEADER + 4].copy_from_slice(b"HdrS");
            img[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&version.to_le_bytes());
            img[OFF_PAYLOAD_OFFSET..OFF_PAYLOAD_OFFSET + 4]
                .copy_from_slice(&payload_offset.to_le_bytes());
            img[OFF_PAYLOAD_LENGTH..OFF_PAYLOAD_LENGTH + 4]
                .copy_from_slice(&payload_length.to_le_bytes());
            // Put a real magic at the payload start now and then, to reach the decoders.
            let magics: [&[u8]; 8] = [
                b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"\x02\x21\x4c\x18", b"\x1f\x8b\x08",
                b"BZh", b"\x5d\x00\x00", b"\x89LZ", b"",
            ];
            let sects = if setup_sects == 0 { 4 } else { usize::from(setup_sects) };
            let start = (sects + 1) * 512 + payload_offset as usize;
            let m = magics[magic];
            if start + m.len() <= img.len() && start >= HEADER_LEN {
                img[start..start + m.len()].copy_from_slice(m);
            }
            let _ = extract_with_cap(&img, 1 << 20);
        }

        #[test]
        fn mutated_valid_images_never_panic(
            which in 0usize..SUPPORTED.len(),
            mutations in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let mut img = valid_images()[which].clone();
            // Mutate the payload region mostly, where the decoders run.
            let payload_start = 0x20 * 512 + PM_OFFSET as usize;
            for (at, byte) in mutations {
                let i = payload_start + at.index(img.len() - payload_start);
                img[i] = byte;
            }
            if let Some(cut) = cut {
                img.truncate(cut.index(img.len() + 1));
            }
            match extract_with_cap(&img, 1 << 20) {
                Ok(out) => prop_assert!(is_elf(&out.elf)),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn mutated_headers_never_panic(
            which in 0usize..SUPPORTED.len(),
            mutations in proptest::collection::vec((0x1F0usize..HEADER_LEN, any::<u8>()), 1..6),
        ) {
            let mut img = valid_images()[which].clone();
            for (i, byte) in mutations {
                img[i] = byte;
            }
            let _ = extract_with_cap(&img, 1 << 20);
        }
    }
}
