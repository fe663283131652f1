//! `mk-upgrade sign IMAGE --key K`: write the signed manifest `IMAGE.sig`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kho_proto::keys::NodeKey;

use upgrade_agent::exit::Exit;
use upgrade_agent::verify::{self, MAX_KERNEL_IMAGE, SignError};

/// `mk-upgrade sign ...`
#[derive(clap::Args, Debug)]
pub struct SignArgs {
    /// The kernel image (x86-64 bzImage) to sign.
    pub image: PathBuf,
    /// Secret key file (NAME.key from `mk-upgrade keys generate`).
    #[arg(long)]
    pub key: PathBuf,
    /// Version floor to record: hosts that accept this image refuse any kernel below it
    /// afterwards (anti-rollback). Must not be above the image's own release.
    #[arg(long, value_name = "VERSION")]
    pub floor: Option<String>,
    /// Where to write the signature (default: IMAGE.sig).
    #[arg(long, value_name = "SIG")]
    pub out: Option<PathBuf>,
}

/// Runs `mk-upgrade sign`.
pub fn run(args: SignArgs) -> ExitCode {
    match sign(&args) {
        Ok(_) => Exit::Ok.into(),
        Err((exit, msg)) => {
            eprintln!("mk-upgrade sign: {msg}");
            exit.into()
        }
    }
}

fn read_image(path: &Path) -> Result<Vec<u8>, (Exit, String)> {
    use upgrade_agent::verify::{OpenRefusal, open_regular};
    // Only a regular file of at most the kernel-image cap is read (a FIFO would block,
    // /dev/zero would never end).
    let (f, _) = open_regular(path, MAX_KERNEL_IMAGE).map_err(|e| match e {
        OpenRefusal::Io(e) => (Exit::Io, format!("cannot read {}: {e}", path.display())),
        OpenRefusal::Kind(k) => (
            Exit::Io,
            format!("{} is {k}, not a regular file: sign the image file itself", path.display()),
        ),
        OpenRefusal::TooLarge { len } => (
            Exit::NotAKernel,
            format!(
                "{} is {len} bytes, larger than the {MAX_KERNEL_IMAGE}-byte limit for a kernel image",
                path.display()
            ),
        ),
    })?;
    let mut buf = Vec::new();
    f.take(MAX_KERNEL_IMAGE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| (Exit::Io, format!("cannot read {}: {e}", path.display())))?;
    if buf.len() as u64 > MAX_KERNEL_IMAGE {
        return Err((
            Exit::NotAKernel,
            format!(
                "{} is larger than the {MAX_KERNEL_IMAGE}-byte limit for a kernel image",
                path.display()
            ),
        ));
    }
    Ok(buf)
}

/// Signs `args.image`; returns the signature file path, or the exit code and message.
pub fn sign(args: &SignArgs) -> Result<PathBuf, (Exit, String)> {
    let key = NodeKey::load(&args.key).map_err(|e| (Exit::Io, e.to_string()))?;
    let image = read_image(&args.image)?;
    let sig = verify::sign_image(&image, &key, args.floor.clone(), rollback::time::now_unix())
        .map_err(|e| {
            let exit = match e {
                SignError::NotAKernel(_) => Exit::NotAKernel,
                SignError::BadFloor(_) | SignError::FloorAboveRelease { .. } => Exit::Usage,
            };
            (exit, format!("{}: {e}", args.image.display()))
        })?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| verify::default_sig_path(&args.image));
    rollback::atomic_write(&out, &sig.to_json()).map_err(|e| (Exit::Io, e.to_string()))?;
    println!("signed:  {}", args.image.display());
    println!("release: {}", sig.manifest.kernel_release);
    println!("sha256:  {}", hex::encode(sig.manifest.image_sha256));
    if let Some(f) = &sig.manifest.version_floor {
        println!("floor:   {f}");
    }
    println!("key id:  {}", sig.signer());
    println!("wrote:   {}", out.display());
    Ok(out)
}
