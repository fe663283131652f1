//! What one workload's move puts on the wire: the kho-proto handover image and the fds that
//! travel with it, built on the sending side and verified on the receiving side.
//!
//! Image contents (region kind, id, schema; all `required`):
//!
//! | region                 | kind            | id   | schema | payload                                  |
//! |------------------------|-----------------|------|--------|------------------------------------------|
//! | workload spec          | `AgentManifest` | 0    | 1      | JSON of [`WorkloadSpec`]                  |
//! | task state             | `TaskState`     | 0    | (state-serializers) | postcard `TaskState`        |
//! | preserved memfd *i*    | `WorkloadBlob`  | *i*  | 1      | external: token *i* = fd index in offer  |
//! | memfd identities       | `MemoryState`   | 1    | 1      | postcard `Vec<FdIdentity>` (`integrity = "identity"` only) |
//!
//! With `integrity = "digest"` (default) every memfd has an external region carrying its
//! length, CRC32 and SHA-256; with `integrity = "identity"` it has an [`FdIdentity`] entry
//! instead, and the receiver checks it holds the very object that was offered.
//!
//! The `RegionOffer` frame carries the sealed image memfd as fd 0, then the workload's
//! preserved fds in `MK_STATE_FDS` order (fd *i* ↔ token *i*). See `docs/architecture.md`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use kho_proto::channel::{FdDescriptor, FdKind, RegionOffer, RegionStage, StagedOffer};
use kho_proto::image::{ExternalRef, ImageBuilder, ImageView, RegionKind, VerifyOptions};
use kho_proto::keys::{NodeKey, TrustedKeys};
use sha2::{Digest, Sha256};
use state_serializers::RegionDigest;

use crate::model::PreservedFd;
use crate::workload::WorkloadSpec;

/// Schema of the spec region.
pub const SPEC_SCHEMA: u16 = 1;
/// Schema of an external memfd region.
pub const BLOB_SCHEMA: u16 = 1;
/// Schema of the identity region.
pub const IDENTITY_SCHEMA: u16 = 1;

/// Which memory object a handed-over memfd is (`integrity = "identity"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FdIdentity {
    pub token: u64,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub seals: u32,
}

pub(crate) fn identity_of(token: u64, fd: BorrowedFd<'_>) -> std::io::Result<FdIdentity> {
    let st = nix::sys::stat::fstat(fd).map_err(std::io::Error::from)?;
    Ok(FdIdentity {
        token,
        dev: st.st_dev,
        ino: st.st_ino,
        size: u64::try_from(st.st_size).unwrap_or(0),
        seals: state_serializers::sys::get_seals(fd)?,
    })
}

/// A failed check on the receiving side: which check, and what was seen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{check}: {detail}")]
pub struct CheckFailed {
    pub check: String,
    pub detail: String,
}

fn fail(check: impl Into<String>, detail: impl Into<String>) -> CheckFailed {
    CheckFailed {
        check: check.into(),
        detail: detail.into(),
    }
}

/// A built, sealed handover ready to be offered.
#[derive(Debug)]
pub struct Outgoing {
    pub image: OwnedFd,
    pub offer: RegionOffer,
    /// The fds to attach after the image, in offer order.
    pub fds: Vec<PreservedFd>,
}

impl Outgoing {
    /// All fds of the frame, image first.
    pub fn frame_fds(&self) -> Vec<BorrowedFd<'_>> {
        std::iter::once(self.image.as_fd())
            .chain(self.fds.iter().map(|p| p.fd.as_fd()))
            .collect()
    }
}

fn is_memfd(fd: BorrowedFd<'_>) -> bool {
    state_serializers::sys::get_seals(fd).is_ok()
}

/// Runs the receiving side's checks once on a throwaway image (its own key, a sealed
/// memfd by identity), so that a freshly booted instance has their code and tables in
/// memory before its first real offer: the first verification in a new process costs a few
/// hundred microseconds more, which would otherwise fall inside a workload's blackout.
/// Best effort: a failure only means nothing was warmed.
pub fn warm_up() {
    let Ok(key) = NodeKey::generate() else {
        return;
    };
    let mut trusted = kho_proto::keys::TrustedKeys::default();
    if trusted.add(key.public(), "warm-up".into()).is_err() {
        return;
    }
    let Ok(memfd) = sealed_memfd("mk-warm-up", b"warm") else {
        return;
    };
    let mut spec = WorkloadSpec::new("mk-warm-up", "/nonexistent");
    spec.integrity = crate::workload::Integrity::Identity;
    spec.memfds = vec![crate::workload::MemfdSpec {
        name: "data".into(),
        size: 0,
    }];
    let task = state_serializers::task::TaskState::empty();
    let fds = vec![PreservedFd {
        name: "data".into(),
        fd: memfd,
    }];
    let Ok(out) = build(
        &spec,
        &task,
        fds,
        "warm-up",
        [0; 16],
        1,
        &key,
        SendFaults::default(),
    ) else {
        return;
    };
    let received: Vec<OwnedFd> = out
        .frame_fds()
        .iter()
        .filter_map(|fd| fd.try_clone_to_owned().ok())
        .collect();
    let _ = verify(&out.offer, received, &trusted, [0; 16]);
}

/// Test-only fault injection for the sending side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SendFaults {
    /// Flip one byte of the task-state payload after the region table was written, as if
    /// preserved memory had been corrupted: the receiver's CRC check must catch it.
    pub corrupt_region: bool,
}

/// Writes `bytes` into a new memfd and seals it against every change.
pub fn sealed_memfd(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    use crate::sys::memfd;
    let fd = memfd::create_sealable(name)?;
    memfd::write_all(fd.as_fd(), bytes)?;
    memfd::seal(fd.as_fd(), memfd::IMAGE_SEALS)?;
    Ok(fd)
}

/// Copies a memfd's contents into a fresh sealable memfd (`transfer = "copy"`), reading
/// from offset 0 without moving the source's shared file position.
pub fn copy_memfd(name: &str, src: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::FileExt;
    let from = std::fs::File::from(src.try_clone_to_owned()?);
    let to = std::fs::File::from(crate::sys::memfd::create_sealable(&format!(
        "mk-copy:{name}"
    ))?);
    let len = from.metadata()?.len();
    to.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = from.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        to.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(OwnedFd::from(to))
}

/// Why [`build`] could not produce a handover.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// More preserved fds than tokens or region ids can number.
    #[error("too many preserved fds: {0}")]
    TooManyFds(#[source] std::num::TryFromIntError),
    /// `fstat` or `F_GET_SEALS` of a memfd failed (`integrity = "identity"`).
    #[error("identifying memfd {name}: {source}")]
    Identify {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading a memfd to digest it failed.
    #[error("digesting memfd {name}: {source}")]
    Digest {
        name: String,
        #[source]
        source: state_serializers::StateError,
    },
    /// Fewer digests than memfds (a bug).
    #[error("digest count mismatch")]
    DigestCount,
    /// The workload spec does not serialize (a bug).
    #[error("encoding the workload spec: {0}")]
    Spec(#[source] serde_json::Error),
    /// The captured task state does not encode.
    #[error("encoding task state: {0}")]
    TaskState(#[source] state_serializers::StateError),
    /// The image builder refused (producer release, regions, signing).
    #[error(transparent)]
    Image(#[from] kho_proto::image::BuildError),
    /// Test-only fault injection could not re-read the image it had just built.
    #[error("re-reading the built image to corrupt it: {0}")]
    Reparse(#[source] kho_proto::image::ImageError),
    /// Test-only fault injection found no task region to corrupt.
    #[error("no task region to corrupt")]
    NoTaskRegion,
    /// A region offset does not fit in memory.
    #[error("region offset {offset} does not fit in memory: {source}")]
    Offset {
        offset: u64,
        #[source]
        source: std::num::TryFromIntError,
    },
    /// Creating or sealing the image memfd failed.
    #[error("sealing the handover image: {0}")]
    Seal(#[source] std::io::Error),
}

/// Builds the handover image for one workload and wraps it in a sealed memfd.
#[allow(clippy::too_many_arguments)]
pub fn build(
    spec: &WorkloadSpec,
    task: &state_serializers::task::TaskState,
    fds: Vec<PreservedFd>,
    producer_release: &str,
    upgrade_id: [u8; 16],
    generation: u64,
    key: &NodeKey,
    faults: SendFaults,
) -> Result<Outgoing, BuildError> {
    // Digest every memfd (in parallel) while the workload is frozen.
    let by_identity = !spec.integrity.digest_in_image();
    let memfd_fds: Vec<BorrowedFd<'_>> = fds
        .iter()
        .map(|p| p.fd.as_fd())
        .filter(|fd| is_memfd(*fd) && !by_identity)
        .collect();
    let mut digests = state_serializers::digest_many(&memfd_fds).into_iter();
    let mut descriptors = Vec::with_capacity(fds.len());
    let mut externals = Vec::new();
    let mut identities = Vec::new();
    for (i, p) in fds.iter().enumerate() {
        let token = u64::try_from(i + 1).map_err(BuildError::TooManyFds)?;
        if is_memfd(p.fd.as_fd()) && by_identity {
            let id = identity_of(token, p.fd.as_fd()).map_err(|source| BuildError::Identify {
                name: p.name.clone(),
                source,
            })?;
            descriptors.push(FdDescriptor {
                name: p.name.clone(),
                kind: FdKind::Memfd,
                length: id.size,
                crc32: 0,
                sha256: [0; 32],
            });
            identities.push(id);
        } else if is_memfd(p.fd.as_fd()) {
            let d = digests
                .next()
                .ok_or(BuildError::DigestCount)?
                .map_err(|source| BuildError::Digest {
                    name: p.name.clone(),
                    source,
                })?;
            descriptors.push(FdDescriptor {
                name: p.name.clone(),
                kind: FdKind::Memfd,
                length: d.len,
                crc32: d.crc32,
                sha256: d.sha256,
            });
            externals.push(ExternalRef {
                token,
                length: d.len,
                crc32: d.crc32,
                sha256: d.sha256,
            });
        } else {
            // A handed-over connection (host::watch) is connected; every other socket moved
            // is a listener. The receiver checks each against its kind.
            let kind = if crate::model::is_connected_stream(p.fd.as_fd()) {
                FdKind::ConnectedSocket
            } else {
                FdKind::ListenSocket
            };
            descriptors.push(FdDescriptor {
                name: p.name.clone(),
                kind,
                length: 0,
                crc32: 0,
                sha256: [0; 32],
            });
        }
    }
    let spec_json = serde_json::to_vec(spec).map_err(BuildError::Spec)?;
    let (task_schema, task_bytes) =
        state_serializers::encode(task).map_err(BuildError::TaskState)?;
    let mut b = ImageBuilder::new(producer_release, upgrade_id, generation)?;
    b.region(RegionKind::AgentManifest, 0, SPEC_SCHEMA, true, spec_json)
        .and_then(|b| b.region(RegionKind::TaskState, 0, task_schema, true, task_bytes))?;
    for (i, e) in externals.into_iter().enumerate() {
        let id = u32::try_from(i + 1).map_err(BuildError::TooManyFds)?;
        b.external(RegionKind::WorkloadBlob, id, BLOB_SCHEMA, true, e)?;
    }
    if !identities.is_empty() {
        b.structured(
            RegionKind::MemoryState,
            1,
            IDENTITY_SCHEMA,
            true,
            &identities,
        )?;
    }
    let mut bytes = b.build_signed(key)?;
    if faults.corrupt_region {
        let view = ImageView::parse(&bytes).map_err(BuildError::Reparse)?;
        let r = view
            .find(RegionKind::TaskState, 0)
            .ok_or(BuildError::NoTaskRegion)?;
        let at = usize::try_from(r.offset).map_err(|source| BuildError::Offset {
            offset: r.offset,
            source,
        })?;
        bytes[at] ^= 0x40;
    }
    let image_sha256: [u8; 32] = Sha256::digest(&bytes).into();
    let image_len = bytes.len() as u64;
    let image = sealed_memfd("mk-handover-image", &bytes).map_err(BuildError::Seal)?;
    let mut all = vec![FdDescriptor {
        name: "mk-handover-image".into(),
        kind: FdKind::Memfd,
        length: image_len,
        crc32: crc32fast::hash(&bytes),
        sha256: image_sha256,
    }];
    all.extend(descriptors);
    Ok(Outgoing {
        image,
        offer: RegionOffer {
            workload_id: spec.name.clone(),
            image_len,
            image_sha256,
            fds: all,
        },
        fds,
    })
}

/// What the receiving side established.
#[derive(Debug)]
pub struct Incoming {
    pub spec: WorkloadSpec,
    pub task: state_serializers::task::TaskState,
    pub fds: Vec<PreservedFd>,
}

/// The identity entries of an image (`integrity = "identity"` and the checks that move the
/// object itself); none when it has no identity region.
pub(crate) fn image_identities(view: &ImageView<'_>) -> Result<Vec<FdIdentity>, CheckFailed> {
    match view.find(RegionKind::MemoryState, 1) {
        Some(r) => view
            .decode(r)
            .map_err(|e| fail("identities", e.to_string())),
        None => Ok(Vec::new()),
    }
}

/// The `len` bytes of the image memfd `fd` (its size must be `len`).
pub(crate) fn read_all(fd: BorrowedFd<'_>, len: u64) -> Result<Vec<u8>, CheckFailed> {
    let f = std::fs::File::from(
        fd.try_clone_to_owned()
            .map_err(|e| fail("image", format!("dup: {e}")))?,
    );
    let size = f
        .metadata()
        .map_err(|e| fail("image", format!("fstat: {e}")))?
        .len();
    if size != len {
        return Err(fail(
            "image_len",
            format!("offer says {len} bytes, the memfd holds {size}"),
        ));
    }
    let mut out = vec![0u8; usize::try_from(len).map_err(|e| fail("image_len", e.to_string()))?];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut out, 0)
        .map_err(|e| fail("image", format!("read: {e}")))?;
    Ok(out)
}

/// An image that passed every check of Part 1 of the protocol, with its decoded spec and
/// task state.
struct Checked<'a> {
    view: ImageView<'a>,
    spec: WorkloadSpec,
    task: state_serializers::task::TaskState,
}

/// The checks every received image gets, in order: kho-proto parse, the upgrade id, kho-proto
/// verify (every CRC and digest, a signature by a trusted node key), the spec (and that it
/// names `workload`, which the `source` — offer or session — announced), the task state.
fn check_image<'a>(
    bytes: &'a [u8],
    workload: &str,
    source: &str,
    trusted: &TrustedKeys,
    expect_upgrade: [u8; 16],
) -> Result<Checked<'a>, CheckFailed> {
    let view = ImageView::parse(bytes).map_err(|e| fail("image", e.to_string()))?;
    if view.header().upgrade_id != expect_upgrade {
        return Err(fail("upgrade_id", "the image belongs to another upgrade"));
    }
    view.verify(&VerifyOptions {
        trusted_keys: Some(trusted),
        require_signature: true,
    })
    .map_err(|e| fail("image", e.to_string()))?;
    let spec_region = view
        .find(RegionKind::AgentManifest, 0)
        .ok_or_else(|| fail("spec", "no workload spec region"))?;
    let spec: WorkloadSpec = serde_json::from_slice(spec_region.payload().unwrap_or_default())
        .map_err(|e| fail("spec", e.to_string()))?;
    if spec.name != workload {
        return Err(fail(
            "spec",
            format!("image is for {}, {source} for {workload}", spec.name),
        ));
    }
    let task_region = view
        .find(RegionKind::TaskState, 0)
        .ok_or_else(|| fail("task_state", "no task state region"))?;
    let task = state_serializers::decode(
        task_region.schema_version,
        task_region.payload().unwrap_or_default(),
    )
    .map_err(|e| fail("task_state", e.to_string()))?;
    Ok(Checked { view, spec, task })
}

/// An offer whose descriptors and attached fds differ in number.
fn fd_count_mismatch(described: usize, received: usize) -> CheckFailed {
    fail(
        "fd_count",
        format!("{described} descriptors described, {received} fds received"),
    )
}

/// What the state fds of a verified image must be, token by token: an external region
/// (length, CRC32, SHA-256 of the content) or an identity entry.
#[derive(Debug)]
struct FdExpectations {
    digests: Vec<(u64, RegionDigest)>,
    identities: Vec<FdIdentity>,
}

impl FdExpectations {
    fn of(view: &ImageView<'_>) -> Result<Self, CheckFailed> {
        let digests = view
            .regions()
            .iter()
            .filter_map(kho_proto::image::RegionView::external)
            .map(|e| {
                (
                    e.token,
                    RegionDigest {
                        len: e.length,
                        crc32: e.crc32,
                        sha256: e.sha256,
                    },
                )
            })
            .collect();
        Ok(FdExpectations {
            digests,
            identities: image_identities(view)?,
        })
    }

    fn digest(&self, token: u64) -> Option<RegionDigest> {
        self.digests
            .iter()
            .find(|(t, _)| *t == token)
            .map(|(_, d)| *d)
    }
}

/// A received handover image that passed every check of Part 1 of the protocol (length,
/// SHA-256, parse, upgrade id, every CRC and digest, a trusted signature, spec, task
/// state), waiting for the state fds it describes. Protocol version 2 verifies it from a
/// `RegionStage`, before the workload is frozen ([`stage`]); [`verify_staged`] checks the
/// fds of the `StagedOffer` that follows the freeze against it.
#[derive(Debug)]
pub struct Staged {
    workload: String,
    image_sha256: [u8; 32],
    spec: WorkloadSpec,
    task: state_serializers::task::TaskState,
    expect: FdExpectations,
}

impl Staged {
    /// The workload the image is for.
    pub fn workload(&self) -> &str {
        &self.workload
    }
}

/// Reads the image memfd and runs every check of the image (not of the state fds).
fn check_received(
    workload: &str,
    image_len: u64,
    image_sha256: [u8; 32],
    image: BorrowedFd<'_>,
    trusted: &TrustedKeys,
    expect_upgrade: [u8; 16],
) -> Result<Staged, CheckFailed> {
    let bytes = read_all(image, image_len)?;
    let sha: [u8; 32] = Sha256::digest(&bytes).into();
    if sha != image_sha256 {
        return Err(fail(
            "image_sha256",
            format!(
                "offer says {}, image hashes to {}",
                hex::encode(image_sha256),
                hex::encode(sha)
            ),
        ));
    }
    let checked = check_image(&bytes, workload, "offer", trusted, expect_upgrade)?;
    let expect = FdExpectations::of(&checked.view)?;
    Ok(Staged {
        workload: workload.to_owned(),
        image_sha256,
        spec: checked.spec,
        task: checked.task,
        expect,
    })
}

/// Verifies an offer on the receiving side: the image (length, SHA-256, kho-proto header,
/// every CRC and digest, signature by a trusted key), then every memfd against its external
/// region, then decodes the spec and task state. Nothing is started here.
pub fn verify(
    offer: &RegionOffer,
    mut fds: Vec<OwnedFd>,
    trusted: &TrustedKeys,
    expect_upgrade: [u8; 16],
) -> Result<Incoming, CheckFailed> {
    if fds.len() != offer.fds.len() || fds.is_empty() {
        return Err(fd_count_mismatch(offer.fds.len(), fds.len()));
    }
    let rest = fds.split_off(1);
    let image_fd = fds.pop().ok_or_else(|| fail("fd_count", "no image fd"))?;
    let staged = check_received(
        &offer.workload_id,
        offer.image_len,
        offer.image_sha256,
        image_fd.as_fd(),
        trusted,
        expect_upgrade,
    )?;
    check_fds(staged, &offer.fds[1..], rest)
}

/// Protocol version 2, before the freeze: every check of the image a `RegionStage`
/// carries (its one fd), kept for the `StagedOffer` that follows.
pub fn stage(
    stage: &RegionStage,
    mut fds: Vec<OwnedFd>,
    trusted: &TrustedKeys,
    expect_upgrade: [u8; 16],
) -> Result<Staged, CheckFailed> {
    let image = match (fds.pop(), fds.is_empty()) {
        (Some(image), true) => image,
        (image, _) => {
            return Err(fail(
                "fd_count",
                format!(
                    "a RegionStage carries the image only: {} fds received",
                    fds.len() + usize::from(image.is_some())
                ),
            ));
        }
    };
    check_received(
        &stage.workload_id,
        stage.image_len,
        stage.image_sha256,
        image.as_fd(),
        trusted,
        expect_upgrade,
    )
}

/// Protocol version 2, after the freeze: the state fds of a `StagedOffer` against the
/// image staged for it (`None`: nothing was staged). The offer must name the staged
/// image: same workload, same SHA-256.
pub fn verify_staged(
    staged: Option<Staged>,
    offer: &StagedOffer,
    fds: Vec<OwnedFd>,
) -> Result<Incoming, CheckFailed> {
    let staged = staged.ok_or_else(|| {
        fail(
            "staged_image",
            format!("no image was staged for {}", offer.workload_id),
        )
    })?;
    if staged.workload != offer.workload_id || staged.image_sha256 != offer.image_sha256 {
        return Err(fail(
            "staged_image",
            format!(
                "the offer for {} names image {}, the staged image is {}'s {}",
                offer.workload_id,
                hex::encode(offer.image_sha256),
                staged.workload,
                hex::encode(staged.image_sha256)
            ),
        ));
    }
    if fds.len() != offer.fds.len() {
        return Err(fd_count_mismatch(offer.fds.len(), fds.len()));
    }
    check_fds(staged, &offer.fds, fds)
}

/// The state fds (tokens 1, 2, ... in order) against what the verified image says of them.
fn check_fds(
    staged: Staged,
    descs: &[FdDescriptor],
    fds: Vec<OwnedFd>,
) -> Result<Incoming, CheckFailed> {
    let Staged {
        spec, task, expect, ..
    } = staged;
    let mut out = Vec::with_capacity(fds.len());
    for (i, (fd, desc)) in fds.into_iter().zip(descs).enumerate() {
        let token = u64::try_from(i + 1).map_err(|e| fail("token", e.to_string()))?;
        match desc.kind {
            FdKind::Memfd => {
                let Some(expected) = expect.digest(token) else {
                    let want = expect
                        .identities
                        .iter()
                        .find(|id| id.token == token)
                        .ok_or_else(|| {
                            fail(
                                format!("fd[{}]", i + 1),
                                "neither an external region nor an identity for this memfd",
                            )
                        })?;
                    let got = identity_of(token, fd.as_fd())
                        .map_err(|err| fail(format!("fd[{}].identity", i + 1), err.to_string()))?;
                    if got != *want {
                        return Err(fail(
                            format!("fd[{}].identity", i + 1),
                            format!("{}: offered {want:?}, received {got:?}", desc.name),
                        ));
                    }
                    out.push(PreservedFd {
                        name: desc.name.clone(),
                        fd,
                    });
                    continue;
                };
                state_serializers::verify_fd(&desc.name, fd.as_fd(), &expected)
                    .map_err(|err| fail(format!("fd[{}].digest", i + 1), err.to_string()))?;
            }
            FdKind::ListenSocket => {
                let listening =
                    nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn)
                        .unwrap_or(false);
                if !listening {
                    return Err(fail(
                        format!("fd[{}]", i + 1),
                        format!("{} is not a listening socket", desc.name),
                    ));
                }
            }
            FdKind::ConnectedSocket => {
                if !crate::model::is_connection(&desc.name)
                    || !crate::model::is_connected_stream(fd.as_fd())
                {
                    return Err(fail(
                        format!("fd[{}]", i + 1),
                        format!(
                            "{} is not a handed-over connection (a connected stream socket \
                             named connection-N)",
                            desc.name
                        ),
                    ));
                }
            }
            FdKind::Other => {
                return Err(fail(
                    format!("fd[{}]", i + 1),
                    format!("unexpected descriptor kind {:?}", FdKind::Other),
                ));
            }
        }
        out.push(PreservedFd {
            name: desc.name.clone(),
            fd,
        });
    }
    Ok(Incoming {
        spec,
        task,
        fds: out,
    })
}

/// Largest handover image read back from a LUO-preserved memfd (an image holds a spec, a
/// task record and a region table: a few KiB; more is not ours).
pub const MAX_PRESERVED_IMAGE: u64 = 16 << 20;

/// Verifies one workload's handover after a kexec, from the fds LUO handed back instead of
/// a channel frame: `image` is the sealed image memfd (session token 0), `memfds` the
/// workload's memfds in token order (tokens 1, 2, ...). Checks the image (kho-proto header,
/// every CRC and digest, signature by a trusted key, upgrade id, workload name), decodes the
/// spec and the task state, and checks every memfd against its external region (length,
/// CRC32, SHA-256: `integrity = "digest"`) or its identity entry (size and seals: any other
/// integrity; the caller then checks the content reference its handoff carries). Listening
/// sockets are not preservable by LUO: the caller binds them
/// afresh from the spec. Nothing is started here.
pub fn verify_preserved(
    workload: &str,
    image: &OwnedFd,
    names: &[String],
    memfds: Vec<OwnedFd>,
    trusted: &TrustedKeys,
    expect_upgrade: [u8; 16],
) -> Result<Incoming, CheckFailed> {
    let size = crate::sys::memfd::size(image.as_fd())
        .map_err(|e| fail("image", format!("fstat of the preserved image: {e}")))?;
    if size > MAX_PRESERVED_IMAGE {
        return Err(fail(
            "image_len",
            format!("the preserved image is {size} bytes, more than {MAX_PRESERVED_IMAGE}"),
        ));
    }
    let bytes = read_all(image.as_fd(), size)?;
    let checked = check_image(&bytes, workload, "session", trusted, expect_upgrade)?;
    let (view, spec, task) = (checked.view, checked.spec, checked.task);
    // The declared memfds first, in the spec's order; then the workload's fd store.
    let declared = spec.memfds.iter().map(|m| &m.name);
    if memfds.len() != names.len()
        || names.len() < spec.memfds.len()
        || names.len() > crate::workload::MAX_FDS
        || !declared.eq(names.iter().take(spec.memfds.len()))
    {
        return Err(fail(
            "fd_count",
            format!(
                "the spec declares memfds {:?} and the hand-off names {names:?}; the session \
                 holds {}",
                spec.memfds.iter().map(|m| &m.name).collect::<Vec<_>>(),
                memfds.len()
            ),
        ));
    }
    // `integrity = "digest"`: an external region per memfd; any other check: an identity
    // entry (size and seals are compared; device and inode are another kernel's).
    let expect = FdExpectations::of(&view)?;
    let mut out = Vec::with_capacity(memfds.len());
    for (i, (fd, name)) in memfds.into_iter().zip(names).enumerate() {
        let token = u64::try_from(i + 1).map_err(|e| fail("token", e.to_string()))?;
        if let Some(expected) = expect.digest(token) {
            state_serializers::verify_fd(name, fd.as_fd(), &expected)
                .map_err(|err| fail(format!("token[{token}].digest"), err.to_string()))?;
        } else {
            let want = expect
                .identities
                .iter()
                .find(|id| id.token == token)
                .ok_or_else(|| {
                    fail(
                        format!("token[{token}]"),
                        format!(
                            "neither an external region nor an identity describes memfd {name}"
                        ),
                    )
                })?;
            let got = identity_of(token, fd.as_fd())
                .map_err(|err| fail(format!("token[{token}].identity"), err.to_string()))?;
            if (got.size, got.seals) != (want.size, want.seals) {
                return Err(fail(
                    format!("token[{token}].identity"),
                    format!(
                        "memfd {name}: size {} seals {:#x}, the sending kernel had size {} seals {:#x}",
                        got.size, got.seals, want.size, want.seals
                    ),
                ));
            }
        }
        out.push(PreservedFd {
            name: name.clone(),
            fd,
        });
    }
    Ok(Incoming {
        spec,
        task,
        fds: out,
    })
}

#[cfg(test)]
mod preserved_tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn spec() -> WorkloadSpec {
        let text = r#"
[[workload]]
name = "kv"
exec = "/bin/true"
[[workload.memfd]]
name = "kv-data"
size = 0
"#;
        crate::workload::WorkloadFile::parse(text, Path::new("w.toml"))
            .unwrap()
            .workloads
            .remove(0)
    }

    fn memfd(bytes: &[u8]) -> OwnedFd {
        let fd = crate::sys::memfd::create_sealable("test").unwrap();
        crate::sys::memfd::write_all(fd.as_fd(), bytes).unwrap();
        fd
    }

    /// The captured task state of a short-lived `sleep`.
    fn task() -> state_serializers::task::TaskState {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let task = state_serializers::task::capture_tasks(
            Path::new("/"),
            &[i32::try_from(child.id()).unwrap()],
            &state_serializers::task::CaptureOptions::default(),
        );
        let _ = child.kill();
        let _ = child.wait();
        task.unwrap()
    }

    fn setup(faults: SendFaults) -> (Outgoing, TrustedKeys, OwnedFd) {
        let key = NodeKey::generate().unwrap();
        let mut trusted = TrustedKeys::default();
        trusted
            .add(key.public(), PathBuf::from("node.pub"))
            .unwrap();
        let task = task();
        let data = memfd(b"hello preserved world");
        let keep = data.try_clone().unwrap();
        let out = build(
            &spec(),
            &task,
            vec![PreservedFd {
                name: "kv-data".into(),
                fd: data,
            }],
            "6.19.0-test",
            [7; 16],
            0,
            &key,
            faults,
        )
        .unwrap();
        (out, trusted, keep)
    }

    #[test]
    fn build_failures_are_typed() {
        let key = NodeKey::generate().unwrap();
        let e = build(
            &spec(),
            &task(),
            vec![],
            "",
            [7; 16],
            0,
            &key,
            SendFaults::default(),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                BuildError::Image(kho_proto::image::BuildError::ProducerRelease { .. })
            ),
            "{e}"
        );
        assert!(e.to_string().contains("producer release"), "{e}");
    }

    #[test]
    fn preserved_identity_checks_size_and_seals_not_contents() {
        // Any integrity but `digest` (here `sampled`): the image carries an identity entry;
        // across a kexec device and inode differ, size and seals must not.
        let key = NodeKey::generate().unwrap();
        let mut trusted = TrustedKeys::default();
        trusted
            .add(key.public(), PathBuf::from("node.pub"))
            .unwrap();
        let mut sp = spec();
        sp.integrity = crate::workload::Integrity::Sampled;
        let data = memfd(b"hello preserved world");
        let out = build(
            &sp,
            &task(),
            vec![PreservedFd {
                name: "kv-data".into(),
                fd: data.try_clone().unwrap(),
            }],
            "6.19.0-test",
            [7; 16],
            0,
            &key,
            SendFaults::default(),
        )
        .unwrap();
        assert_eq!(out.offer.fds[1].sha256, [0; 32], "no digest was taken");
        // Another memfd (other inode) of the same size and seals passes: the content
        // reference is the LUO handoff's, checked by the platform.
        let twin = memfd(b"hello preserved worlD");
        let inc =
            verify_preserved("kv", &out.image, &kv_names(), vec![twin], &trusted, [7; 16]).unwrap();
        assert_eq!(inc.spec.integrity, crate::workload::Integrity::Sampled);
        let refused = |fd| {
            verify_preserved("kv", &out.image, &kv_names(), vec![fd], &trusted, [7; 16])
                .unwrap_err()
        };
        let e = refused(memfd(b"hello"));
        assert_eq!(e.check, "token[1].identity", "{e}");
        assert!(e.detail.contains("size 5"), "{e}");
        let sealed = memfd(b"hello preserved world");
        nix::fcntl::fcntl(
            &sealed,
            nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_GROW),
        )
        .unwrap();
        let e = refused(sealed);
        assert_eq!(e.check, "token[1].identity", "{e}");
        assert!(e.detail.contains("seals"), "{e}");
    }

    fn kv_names() -> Vec<String> {
        vec!["kv-data".to_owned()]
    }

    #[test]
    fn preserved_handover_verifies_and_names_the_memfds() {
        let (out, trusted, data) = setup(SendFaults::default());
        let inc =
            verify_preserved("kv", &out.image, &kv_names(), vec![data], &trusted, [7; 16]).unwrap();
        assert_eq!(inc.spec.name, "kv");
        assert_eq!(inc.fds.len(), 1);
        assert_eq!(inc.fds[0].name, "kv-data");
    }

    #[test]
    fn preserved_handover_refuses_corruption_and_mismatches() {
        let (out, trusted, data) = setup(SendFaults {
            corrupt_region: true,
        });
        let e = verify_preserved("kv", &out.image, &kv_names(), vec![data], &trusted, [7; 16])
            .unwrap_err();
        assert_eq!(e.check, "image", "{e}");

        let (out, trusted, data) = setup(SendFaults::default());
        let e = verify_preserved(
            "kv",
            &out.image,
            &kv_names(),
            vec![data.try_clone().unwrap()],
            &trusted,
            [8; 16],
        )
        .unwrap_err();
        assert_eq!(e.check, "upgrade_id");
        let e = verify_preserved(
            "other",
            &out.image,
            &kv_names(),
            vec![data.try_clone().unwrap()],
            &trusted,
            [7; 16],
        )
        .unwrap_err();
        assert_eq!(e.check, "spec");
        let e =
            verify_preserved("kv", &out.image, &kv_names(), vec![], &trusted, [7; 16]).unwrap_err();
        assert_eq!(e.check, "fd_count");
        let changed = memfd(b"hello preserved worlD");
        let e = verify_preserved(
            "kv",
            &out.image,
            &kv_names(),
            vec![changed],
            &trusted,
            [7; 16],
        )
        .unwrap_err();
        assert_eq!(e.check, "token[1].digest", "{e}");
        let stranger = NodeKey::generate().unwrap();
        let mut other = TrustedKeys::default();
        other
            .add(stranger.public(), PathBuf::from("x.pub"))
            .unwrap();
        let e = verify_preserved("kv", &out.image, &kv_names(), vec![data], &other, [7; 16])
            .unwrap_err();
        assert_eq!(e.check, "image", "{e}");
    }
}
