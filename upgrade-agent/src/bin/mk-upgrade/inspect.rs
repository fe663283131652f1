//! `mk-upgrade inspect FILE [--json] [--trusted-keys DIR] [--external TOKEN=FILE]...`:
//! decode and fully verify a handover image file.
//!
//! Checks, in order, stopping at the first failure: header (magic, major, CRC32, fields,
//! lengths), region table bounds, every inline region's CRC32 and SHA-256, zero padding,
//! the manifest digest, the signature, the compatibility rule, then the contents of each
//! external region given with `--external`. Prints a summary (or JSON with `--json`) on
//! success; on failure prints one line, `mk-upgrade inspect: REASON`, on stderr and exits:
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | the image verified |
//! | 2 | bad command line (e.g. `--external` not `TOKEN=FILE`, or a token the image does not reference) |
//! | 3 | the image, an external file or the trusted-keys directory cannot be read |
//! | 4 | corrupt: magic, CRC32, SHA-256, manifest digest, bounds, field values, external contents |
//! | 5 | untrusted: unsigned (with `--trusted-keys` or `--require-signature`), bad or untrusted signature, malformed trust store |
//! | 6 | incompatible: higher format major, unknown required region |
//!
//! `--trusted-keys DIR` implies `--require-signature`: naming a trust store means an
//! unsigned image is not acceptable.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kho_proto::image::{
    FailureClass, ImageError, ImageView, RegionData, SignatureStatus, VerifyOptions,
};
use kho_proto::keys::{KeyError, TrustedKeys};

use upgrade_agent::exit::Exit;

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
    pub ok: bool,
    pub file: PathBuf,
    pub format: String,
    pub producer_release: String,
    pub upgrade_id: String,
    pub generation: u64,
    pub total_len: u64,
    pub header_crc32: String,
    pub manifest_digest: String,
    pub signature: SignatureStatus,
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

/// Decodes and verifies `args.file` (and the `--external` files); the report on success.
pub fn inspect_file(args: &InspectArgs) -> Result<InspectReport, InspectError> {
    let externals = args
        .external
        .iter()
        .map(|s| parse_external(s))
        .collect::<Result<Vec<_>, _>>()?;
    let keys = args.trusted_keys.as_deref().map(load_keys).transpose()?;
    // Images are read whole: inline payloads are small by design (workload memory is in
    // external regions, streamed below), and the file's size bounds the allocation.
    let bytes = std::fs::read(&args.file).map_err(|e| {
        InspectError::new(
            Exit::Io,
            format!("cannot read {}: {e}", args.file.display()),
        )
    })?;
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
        let file = File::open(path).map_err(|e| {
            InspectError::new(Exit::Io, format!("cannot read {}: {e}", path.display()))
        })?;
        reference
            .verify_reader(std::io::BufReader::new(file))
            .map_err(|e| {
                let mut err = InspectError::from(e);
                err.reason = format!(
                    "region {} ({}), file {}: {}",
                    region.index,
                    region.kind,
                    path.display(),
                    err.reason
                );
                err
            })?;
        checked.push(*token);
    }

    let h = view.header();
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
        ok: true,
        file: args.file.clone(),
        format: format!("{}.{}", h.major, h.minor),
        producer_release: h.producer_release.to_owned(),
        upgrade_id: hex::encode(h.upgrade_id),
        generation: h.generation,
        total_len: h.total_len,
        header_crc32: format!("{:#010x}", h.header_crc32),
        manifest_digest: hex::encode(verified.manifest_digest),
        signature: verified.signature,
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
        SignatureStatus::NotChecked { key_id } => {
            format!("present, key {key_id}, NOT checked (no --trusted-keys)")
        }
    };
    let _ = writeln!(
        s,
        "{}: handover image format {}, verified",
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
            Exit::Ok.into()
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

    #[test]
    fn verifies_golden_images() {
        let mut a = args("v1.0-signed-3-regions.bin");
        a.trusted_keys = Some(vectors());
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
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_of(&args("does-not-exist.bin")), Exit::Io);
        assert_eq!(exit_of(&args("README.md")), Exit::Corrupt);
        assert_eq!(
            exit_of(&args("v1.0-unknown-required.bin")),
            Exit::Incompatible
        );

        let mut a = args("v1.0-unsigned-minimal.bin");
        a.trusted_keys = Some(vectors());
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
