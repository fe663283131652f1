//! `mk-upgrade inspect FILE [--json] [--trusted-keys DIR] [--external TOKEN=FILE]...`:
//! decode and fully verify a handover image file.
//!
//! Checks, in order, stopping at the first failure: header (magic, major, CRC32, fields,
//! lengths), region table bounds, every inline region's CRC32 and SHA-256, zero padding,
//! the manifest digest, the signature block CRC32 (format 1.1), the signature, the
//! compatibility rule, then the contents of each external region given with `--external`.
//! Prints a summary (or JSON with `--json`) on success; on failure prints one line,
//! `mk-upgrade inspect: REASON`, on stderr and exits:
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | the image verified: every byte of it checked (a signature without `--trusted-keys` is intact by its CRC32 but not verified, and says so) |
//! | 2 | bad command line (e.g. `--external` not `TOKEN=FILE`, or a token the image does not reference) |
//! | 3 | the image, an external file or the trusted-keys directory cannot be read, or is refused unread: not a regular file (FIFO, device, directory), or larger than its cap |
//! | 4 | corrupt: magic, CRC32, SHA-256, manifest digest, signature block CRC32, bounds, field values, external contents or length |
//! | 5 | untrusted: unsigned (with `--trusted-keys` or `--require-signature`), bad or untrusted signature, unsafe or malformed trust store; also a signed format 1.0 image without `--trusted-keys`, whose signature block nothing could check (the report is printed, with `ok: false`) |
//! | 6 | incompatible: higher format major, unknown required region |
//!
//! `--trusted-keys DIR` implies `--require-signature`: naming a trust store means an
//! unsigned image is not acceptable.
//!
//! Every input is bounded and read only if it is a regular file (opened with `O_NONBLOCK`,
//! so a FIFO is refused, not waited on): the image at most [`MAX_IMAGE_BYTES`], each
//! external file at most [`MAX_EXTERNAL_BYTES`] and exactly its region's length (compared
//! with the file's size before a byte is read), each key file 128 bytes and at most
//! [`kho_proto::keys::MAX_TRUSTED_KEYS`] of them.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kho_proto::image::{
    ExternalRef, FailureClass, ImageError, ImageView, RegionData, SignatureStatus, VerifyOptions,
};
use kho_proto::keys::{KeyError, TrustedKeys};

use upgrade_agent::exit::Exit;

/// Largest handover image `inspect` reads: 64 MiB (the agent itself refuses a preserved
/// image over 16 MiB; inline payloads are small by design, workload memory is external).
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;
/// Largest external region file `inspect --external` streams: 64 GiB.
pub const MAX_EXTERNAL_BYTES: u64 = 64 << 30;

/// `mk-upgrade inspect ...`
#[derive(clap::Args, Debug, Clone)]
pub struct InspectArgs {
    /// The handover image file.
    pub file: PathBuf,
    /// Print the report as JSON on stdout (also on failure: `{"ok":false,...}`).
    #[arg(long)]
    pub json: bool,
    /// Directory of trusted `NAME.pub` keys; the image must be signed by one of them.
    #[arg(long, value_name = "DIR")]
    pub trusted_keys: Option<PathBuf>,
    /// Contents of an external region's memfd, saved as a file, to verify against the
    /// table (token in hex with 0x, or decimal). Repeatable.
    #[arg(long = "external", value_name = "TOKEN=FILE")]
    pub external: Vec<String>,
    /// Refuse unsigned images (and signed ones when no --trusted-keys is given).
    #[arg(long)]
    pub require_signature: bool,
}

/// Why `inspect` failed: the exit code and a one-line reason.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct InspectError {
    /// The exit code.
    pub exit: Exit,
    /// One line: what failed, where, and what to do.
    pub reason: String,
}

impl InspectError {
    fn new(exit: Exit, reason: impl Into<String>) -> Self {
        InspectError {
            exit,
            reason: reason.into().replace('\n', " "),
        }
    }
}

impl From<ImageError> for InspectError {
    fn from(e: ImageError) -> Self {
        let exit = match e.class() {
            FailureClass::Io => Exit::Io,
            FailureClass::Corrupt => Exit::Corrupt,
            FailureClass::Untrusted => Exit::Untrusted,
            FailureClass::Incompatible => Exit::Incompatible,
        };
        InspectError::new(exit, e.to_string())
    }
}

/// One region in the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RegionReport {
    pub index: usize,
    pub kind: String,
    pub kind_raw: u16,
    pub region_id: u32,
    pub schema_version: u16,
    pub required: bool,
    pub external: bool,
    /// Payload offset in the image (inline) or 0 (external).
    pub offset: u64,
    pub length: u64,
    pub crc32: String,
    pub sha256: String,
    /// Memfd token (external regions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// `verified`, `skipped-unknown-optional`, `external-verified`, `external-not-checked`.
    pub status: &'static str,
}

/// What `inspect` established about a verified image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InspectReport {
    /// Whether everything verified. False only for a signed format 1.0 image inspected
    /// without trusted keys: its signature block could be neither verified nor
    /// integrity-checked (`exit` and `reason` say so).
    pub ok: bool,
    /// The exit code when not `ok` (5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<u8>,
    /// Why not `ok`: the check that was not possible.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The exit status (0 when `ok`).
    #[serde(skip)]
    pub outcome: Exit,
    pub file: PathBuf,
    pub format: String,
    pub producer_release: String,
    pub upgrade_id: String,
    pub generation: u64,
    pub total_len: u64,
    pub header_crc32: String,
    pub manifest_digest: String,
    pub signature: SignatureStatus,
    /// The signature block's CRC32 (signed images of format 1.1 and later), verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature_block_crc32: Option<String>,
    pub inline_bytes_verified: u64,
    pub regions: Vec<RegionReport>,
}

fn parse_external(spec: &str) -> Result<(u64, PathBuf), InspectError> {
    let usage = || {
        InspectError::new(
            Exit::Usage,
            format!("--external {spec:?}: expected TOKEN=FILE, TOKEN in decimal or 0x-hex"),
        )
    };
    let (token, file) = spec.split_once('=').ok_or_else(usage)?;
    let token = match token
        .strip_prefix("0x")
        .or_else(|| token.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => token.parse(),
    }
    .map_err(|_| usage())?;
    if file.is_empty() {
        return Err(usage());
    }
    Ok((token, PathBuf::from(file)))
}

fn load_keys(dir: &Path) -> Result<TrustedKeys, InspectError> {
    TrustedKeys::load_dir(dir).map_err(|e| {
        let exit = if matches!(e, KeyError::Io { .. }) {
            Exit::Io
        } else {
            Exit::Untrusted
        };
        InspectError::new(exit, format!("trusted keys: {e}"))
    })
}

/// Opens `path` (the `what` of the command line) and accepts only a regular file, without
/// reading it. Anything else is refused by `stat` before it is opened (opening a device
/// can have effects of its own); the type is checked again with `fstat` on the opened
/// descriptor, in case the path was replaced in between, and `O_NONBLOCK` makes opening a
/// FIFO that slipped in return at once instead of waiting for a writer (it has no effect
/// on reads of a regular file). Returns the file and its size.
fn open_regular(path: &Path, what: &str) -> Result<(File, u64), InspectError> {
    use upgrade_agent::verify::OpenRefusal;
    // Sizes are checked by the caller against each input's own cap.
    upgrade_agent::verify::open_regular(path, u64::MAX).map_err(|e| match e {
        OpenRefusal::Io(e) => {
            InspectError::new(Exit::Io, format!("cannot read {}: {e}", path.display()))
        }
        OpenRefusal::Kind(kind) => InspectError::new(
            Exit::Io,
            format!(
                "{}: the {what} is {kind}, not a regular file; inspect reads only regular files (save the contents to a file first)",
                path.display()
            ),
        ),
        OpenRefusal::TooLarge { len } => too_large(path, what, len, u64::MAX),
    })
}

fn too_large(path: &Path, what: &str, size: u64, cap: u64) -> InspectError {
    let unit = if cap >= 1 << 30 {
        format!("{} GiB", cap >> 30)
    } else {
        format!("{} MiB", cap >> 20)
    };
    InspectError::new(
        Exit::Io,
        format!(
            "{}: the {what} is {size} bytes, more than the {cap} bytes ({unit}) inspect reads (docs/cli.md); refused unread",
            path.display(),
        ),
    )
}

/// Reads the image file whole, refusing anything but a regular file of at most
/// [`MAX_IMAGE_BYTES`] (also if it grows while being read).
fn read_image(path: &Path) -> Result<Vec<u8>, InspectError> {
    const WHAT: &str = "handover image";
    let (file, size) = open_regular(path, WHAT)?;
    if size > MAX_IMAGE_BYTES {
        return Err(too_large(path, WHAT, size, MAX_IMAGE_BYTES));
    }
    // Sized from the file, which is at most the cap: never from a declared length.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_IMAGE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| InspectError::new(Exit::Io, format!("cannot read {}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_IMAGE_BYTES {
        return Err(too_large(path, WHAT, bytes.len() as u64, MAX_IMAGE_BYTES));
    }
    Ok(bytes)
}

/// Checks the external file `path` against `reference`: a regular file whose size is the
/// region's length (compared before reading: a region claiming 2^64-1 bytes against a
/// short file fails at once), at most [`MAX_EXTERNAL_BYTES`], streamed through CRC32 and
/// SHA-256.
fn check_external(path: &Path, reference: &ExternalRef) -> Result<(), InspectError> {
    const WHAT: &str = "external region file";
    let (file, size) = open_regular(path, WHAT)?;
    if size != reference.length {
        return Err(ImageError::ExternalLength {
            token: reference.token,
            expected: reference.length,
            found: size,
        }
        .into());
    }
    if size > MAX_EXTERNAL_BYTES {
        return Err(too_large(path, WHAT, size, MAX_EXTERNAL_BYTES));
    }
    reference
        .verify_reader(std::io::BufReader::new(file))
        .map_err(InspectError::from)
}

/// Decodes and verifies `args.file` (and the `--external` files); the report on success.
/// A signed format 1.0 image without trusted keys is reported with `ok: false` (exit 5):
/// nothing could check its signature block.
pub fn inspect_file(args: &InspectArgs) -> Result<InspectReport, InspectError> {
    let externals = args
        .external
        .iter()
        .map(|s| parse_external(s))
        .collect::<Result<Vec<_>, _>>()?;
    let keys = args.trusted_keys.as_deref().map(load_keys).transpose()?;
    // Images are read whole: inline payloads are small by design (workload memory is in
    // external regions, streamed below); the size is capped (MAX_IMAGE_BYTES).
    let bytes = read_image(&args.file)?;
    let view = ImageView::parse(&bytes)?;
    let verified = view.verify(&VerifyOptions {
        trusted_keys: keys.as_ref(),
        require_signature: args.require_signature || keys.is_some(),
    })?;

    let mut checked = Vec::new();
    for (token, path) in &externals {
        let region = view
            .regions()
            .iter()
            .find(|r| r.external().is_some_and(|e| e.token == *token))
            .ok_or_else(|| {
                InspectError::new(
                    Exit::Usage,
                    format!(
                        "--external {token:#x}: the image has no external region with this token"
                    ),
                )
            })?;
        let reference = region.external().expect("found by external()");
        check_external(path, &reference).map_err(|mut err| {
            err.reason = if err.reason.contains(&path.display().to_string()) {
                // The refusal already names the file.
                format!("region {} ({}): {}", region.index, region.kind, err.reason)
            } else {
                format!(
                    "region {} ({}), file {}: {}",
                    region.index,
                    region.kind,
                    path.display(),
                    err.reason
                )
            };
            err
        })?;
        checked.push(*token);
    }

    let h = view.header();
    // Integrity of every byte was checked above, except, in a signed 1.0 image read without
    // keys, the 96-byte signature block: 1.0 has no checksum over it. Not "verified".
    let unchecked = match verified.signature {
        SignatureStatus::NotCheckedNoChecksum { key_id } => {
            let at = h.manifest_offset + 32;
            Some(format!(
                "signature block of this format {}.{} image (key {key_id}, bytes [{at}, {})) NOT checked: without --trusted-keys its signature could not be verified, and format 1.0 has no CRC32 over the signature block, so its integrity could not be checked either; pass --trusted-keys DIR",
                h.major,
                h.minor,
                at + 96
            ))
        }
        _ => None,
    };
    let regions = view
        .regions()
        .iter()
        .map(|r| {
            let (external, token, status) = match r.data {
                RegionData::Inline(_) if verified.skipped_unknown.contains(&r.index) => {
                    (false, None, "skipped-unknown-optional")
                }
                RegionData::Inline(_) => (false, None, "verified"),
                RegionData::External(e) => (
                    true,
                    Some(format!("{:#x}", e.token)),
                    if checked.contains(&e.token) {
                        "external-verified"
                    } else {
                        "external-not-checked"
                    },
                ),
            };
            RegionReport {
                index: r.index,
                kind: r.kind.name(),
                kind_raw: r.kind.raw(),
                region_id: r.region_id,
                schema_version: r.schema_version,
                required: r.flags.required(),
                external,
                offset: r.offset,
                length: r.length,
                crc32: format!("{:#010x}", r.crc32),
                sha256: hex::encode(r.sha256),
                token,
                status,
            }
        })
        .collect();
    Ok(InspectReport {
        ok: unchecked.is_none(),
        exit: unchecked.as_ref().map(|_| Exit::Untrusted.code()),
        outcome: if unchecked.is_some() {
            Exit::Untrusted
        } else {
            Exit::Ok
        },
        reason: unchecked,
        file: args.file.clone(),
        format: format!("{}.{}", h.major, h.minor),
        producer_release: h.producer_release.to_owned(),
        upgrade_id: hex::encode(h.upgrade_id),
        generation: h.generation,
        total_len: h.total_len,
        header_crc32: format!("{:#010x}", h.header_crc32),
        manifest_digest: hex::encode(verified.manifest_digest),
        signature: verified.signature,
        signature_block_crc32: h.signature_block_crc32.map(|c| format!("{c:#010x}")),
        inline_bytes_verified: verified.inline_bytes,
        regions,
    })
}

fn human(r: &InspectReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let signature = match r.signature {
        SignatureStatus::Unsigned => "none".to_owned(),
        SignatureStatus::Verified { key_id } => format!("verified, key {key_id}"),
        SignatureStatus::NotChecked { key_id } => format!(
            "present, key {key_id}, intact (block CRC32 verified), NOT checked (no --trusted-keys)"
        ),
        SignatureStatus::NotCheckedNoChecksum { key_id } => format!(
            "present, key {key_id}, NOT checked (no --trusted-keys), and its integrity NOT checked either (format 1.0 has no signature block CRC32)"
        ),
    };
    let verdict = if r.ok {
        "verified"
    } else {
        "NOT verified: the signature block is unchecked"
    };
    let _ = writeln!(
        s,
        "{}: handover image format {}, {verdict}",
        r.file.display(),
        r.format
    );
    let _ = writeln!(s, "  producer release  {}", r.producer_release);
    let _ = writeln!(s, "  upgrade id        {}", r.upgrade_id);
    let _ = writeln!(s, "  generation        {}", r.generation);
    let _ = writeln!(s, "  total length      {} bytes", r.total_len);
    let _ = writeln!(s, "  header CRC32      {}", r.header_crc32);
    let _ = writeln!(s, "  manifest SHA-256  {}", r.manifest_digest);
    let _ = writeln!(s, "  signature         {signature}");
    if let Some(crc) = &r.signature_block_crc32 {
        let _ = writeln!(s, "  signature CRC32   {crc}");
    }
    let _ = writeln!(s, "  regions           {}", r.regions.len());
    for g in &r.regions {
        let place = match &g.token {
            Some(t) => format!("memfd token {t}"),
            None => format!("@{}", g.offset),
        };
        let _ = writeln!(
            s,
            "  [{}] {} id {} schema {} {} {} {} bytes crc32 {} sha256 {}.. {}",
            g.index,
            g.kind,
            g.region_id,
            g.schema_version,
            if g.required { "required" } else { "optional" },
            place,
            g.length,
            g.crc32,
            &g.sha256[..16],
            g.status
        );
    }
    s
}

/// Runs `mk-upgrade inspect`.
pub fn run(args: InspectArgs) -> ExitCode {
    match inspect_file(&args) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("mk-upgrade inspect: cannot encode the report as JSON: {e}");
                        return Exit::Internal.into();
                    }
                }
            } else {
                print!("{}", human(&report));
            }
            if let Some(reason) = &report.reason {
                eprintln!("mk-upgrade inspect: {reason}");
            }
            report.outcome.into()
        }
        Err(e) => {
            eprintln!("mk-upgrade inspect: {}", e.reason);
            if args.json {
                let j = serde_json::json!({
                    "ok": false,
                    "exit": e.exit.code(),
                    "reason": e.reason,
                });
                println!("{j}");
            }
            e.exit.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../kho-proto/tests/vectors")
    }

    fn args(file: &str) -> InspectArgs {
        InspectArgs {
            file: vectors().join(file),
            json: false,
            trusted_keys: None,
            external: Vec::new(),
            require_signature: false,
        }
    }

    fn exit_of(a: &InspectArgs) -> Exit {
        inspect_file(a).unwrap_err().exit
    }

    /// A private trusted-keys directory holding the vectors' `golden.pub` (the checkout's
    /// own directory need not pass the trust store's owner and mode checks).
    fn trust_store() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("golden.pub");
        std::fs::copy(vectors().join("golden.pub"), &p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        dir
    }

    #[test]
    fn verifies_golden_images() {
        let store = trust_store();
        let mut a = args("v1.0-signed-3-regions.bin");
        a.trusted_keys = Some(store.path().to_owned());
        a.external = vec![format!(
            "0x12345678={}",
            vectors()
                .join("v1.0-signed-3-regions.external-0x12345678.bin")
                .display()
        )];
        let r = inspect_file(&a).unwrap();
        assert_eq!(r.format, "1.0");
        assert_eq!(r.generation, 42);
        assert!(matches!(r.signature, SignatureStatus::Verified { .. }));
        assert_eq!(r.regions.len(), 3);
        assert_eq!(r.regions[2].status, "external-verified");
        assert_eq!(r.regions[0].kind, "agent-manifest");
        let text = human(&r);
        assert!(text.contains("signature         verified, key"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["signature"]["status"], "verified");
        assert_eq!(json["regions"][2]["token"], "0x12345678");

        // Without the external file, the region is reported as not checked.
        a.external.clear();
        assert_eq!(
            inspect_file(&a).unwrap().regions[2].status,
            "external-not-checked"
        );

        let r = inspect_file(&args("v1.0-unknown-optional.bin")).unwrap();
        assert_eq!(r.regions[1].status, "skipped-unknown-optional");

        // Format 1.1, signed, with keys: verified, and the block CRC32 reported.
        let mut a = args("v1.1-signed-3-regions.bin");
        a.trusted_keys = Some(store.path().to_owned());
        let r = inspect_file(&a).unwrap();
        assert!(r.ok);
        assert_eq!(r.outcome, Exit::Ok);
        assert_eq!(r.format, "1.1");
        assert!(matches!(r.signature, SignatureStatus::Verified { .. }));
        assert!(r.signature_block_crc32.is_some());
    }

    /// Without trusted keys: a signed 1.1 image is verified (its block intact by CRC32,
    /// the signature said to be unchecked); a signed 1.0 image is NOT reported verified.
    #[test]
    fn signature_without_keys() {
        let r = inspect_file(&args("v1.1-signed-3-regions.bin")).unwrap();
        assert!(r.ok);
        assert_eq!(r.outcome, Exit::Ok);
        assert!(matches!(r.signature, SignatureStatus::NotChecked { .. }));
        let text = human(&r);
        assert!(text.contains("format 1.1, verified"), "{text}");
        assert!(
            text.contains("intact (block CRC32 verified), NOT checked"),
            "{text}"
        );

        let r = inspect_file(&args("v1.0-signed-3-regions.bin")).unwrap();
        assert!(!r.ok);
        assert_eq!(r.outcome, Exit::Untrusted);
        assert_eq!(r.exit, Some(5));
        assert!(matches!(
            r.signature,
            SignatureStatus::NotCheckedNoChecksum { .. }
        ));
        let reason = r.reason.clone().unwrap();
        assert!(reason.contains("NOT checked"), "{reason}");
        assert!(
            reason.contains("no CRC32 over the signature block"),
            "{reason}"
        );
        assert!(!reason.contains('\n'));
        let text = human(&r);
        assert!(text.contains("format 1.0, NOT verified"), "{text}");
        assert!(!text.contains(", verified\n"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["exit"], 5);
        assert_eq!(json["signature"]["status"], "not-checked-no-checksum");

        // Unsigned images need no keys: every byte is covered.
        let r = inspect_file(&args("v1.0-unsigned-minimal.bin")).unwrap();
        assert!(r.ok && r.outcome == Exit::Ok && r.exit.is_none());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_of(&args("does-not-exist.bin")), Exit::Io);
        assert_eq!(exit_of(&args("README.md")), Exit::Corrupt);
        assert_eq!(
            exit_of(&args("v1.0-unknown-required.bin")),
            Exit::Incompatible
        );

        let store = trust_store();
        let mut a = args("v1.0-unsigned-minimal.bin");
        a.trusted_keys = Some(store.path().to_owned());
        assert_eq!(exit_of(&a), Exit::Untrusted);
        let mut a = args("v1.0-signed-3-regions.bin");
        a.require_signature = true;
        assert_eq!(exit_of(&a), Exit::Untrusted);
        a.trusted_keys = Some(vectors().join("missing-dir"));
        assert_eq!(exit_of(&a), Exit::Io);

        let dir = tempfile::tempdir().unwrap();
        let other = kho_proto::keys::NodeKey::from_seed([1; 32]);
        other.save(dir.path(), "other").unwrap();
        a.trusted_keys = Some(dir.path().to_owned());
        let e = inspect_file(&a).unwrap_err();
        assert_eq!(e.exit, Exit::Untrusted);
        assert!(
            e.reason.contains("not among the trusted keys"),
            "{}",
            e.reason
        );

        let bad_ext = dir.path().join("ext.bin");
        std::fs::write(&bad_ext, b"wrong contents").unwrap();
        let mut a = args("v1.0-signed-3-regions.bin");
        a.external = vec![format!("305419896={}", bad_ext.display())];
        let e = inspect_file(&a).unwrap_err();
        assert_eq!(e.exit, Exit::Corrupt);
        assert!(e.reason.contains("region 2 (memory-state)"), "{}", e.reason);
        a.external = vec![format!("0x1234567={}", bad_ext.display())];
        assert_eq!(exit_of(&a), Exit::Usage);
        a.external = vec!["0x12345678".into()];
        assert_eq!(exit_of(&a), Exit::Usage);
        a.external = vec![format!("0x12345678={}", dir.path().join("nope").display())];
        assert_eq!(exit_of(&a), Exit::Io);
    }

    #[test]
    fn corrupt_image_reason_is_one_line_with_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = std::fs::read(vectors().join("v1.0-unsigned-minimal.bin")).unwrap();
        bytes[0xd0] ^= 1; // first payload byte
        let p = dir.path().join("bad.img");
        std::fs::write(&p, &bytes).unwrap();
        let mut a = args("x");
        a.file = p;
        let e = inspect_file(&a).unwrap_err();
        assert_eq!(e.exit, Exit::Corrupt);
        assert!(!e.reason.contains('\n'));
        assert!(
            e.reason.contains("region 0") && e.reason.contains("offset 208"),
            "{}",
            e.reason
        );
    }
}
