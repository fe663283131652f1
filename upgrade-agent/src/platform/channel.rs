//! The sending side of the inter-instance channel, shared by the side-by-side platforms
//! (the emulator's `chan.sock`, and multikernel's vsock): one negotiated kho-proto
//! [`Channel`] per target instance, and the move conversation on it (docs/protocol.md
//! part 3): `PrepareMigration`, `RegionOffer` → `RegionVerified` + `HealthReport`,
//! `Commit` + a heartbeat round trip, `Abort`, and `ReleaseResources` + `Shutdown` at the
//! end.
//!
//! The channel is asynchronous (tokio); the orchestrator is not: this type owns a
//! current-thread runtime and blocks on it, so the I/O stays on the platform's side of the
//! [`Platform`](super::Platform) trait.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use kho_proto::channel::{
    Abort, AgentState, Channel, Commit, Heartbeat, Message, PeerInfo, PrepareMigration,
    RegionStage, ReleaseResources, Role, Shutdown, StagedOffer, Transport, UpgradeId, Verification,
};

use super::{Delivered, InstanceId, PlatformError, Resources};
use crate::handover::Outgoing;
use crate::host::receiver::agent_version;
use crate::workload::WorkloadSpec;

/// How long one reply on the channel may take (verification of a large memfd included).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

type Chan = Channel<Box<dyn Transport>>;

/// Opens a transport to an instance's agent (which was told to expect `UpgradeId`).
pub type Connector<'a> =
    dyn FnMut(InstanceId, UpgradeId) -> Result<Box<dyn Transport>, PlatformError> + 'a;

/// The channels of one upgrade, one per target instance, opened on first use.
pub struct ChannelLink {
    rt: tokio::runtime::Runtime,
    channels: BTreeMap<InstanceId, Chan>,
    /// Per target, the image it verified from a `RegionStage` (workload, SHA-256).
    staged: BTreeMap<InstanceId, (String, [u8; 32])>,
    upgrade_id: Option<UpgradeId>,
    local: PeerInfo,
    started: Instant,
}

impl std::fmt::Debug for ChannelLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelLink")
            .field("open", &self.channels.keys().collect::<Vec<_>>())
            .field("upgrade_id", &self.upgrade_id)
            .finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn chan_err(id: InstanceId, what: impl Into<String>) -> PlatformError {
    PlatformError::Channel {
        id,
        what: what.into(),
    }
}

impl ChannelLink {
    /// A link speaking as instance `local_id` (kernel `release`), with no channel open.
    pub fn new(local_id: InstanceId, release: String) -> Result<Self, PlatformError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PlatformError::io("starting the channel runtime", e))?;
        Ok(ChannelLink {
            rt,
            channels: BTreeMap::new(),
            staged: BTreeMap::new(),
            upgrade_id: None,
            local: PeerInfo {
                instance_id: local_id,
                role: Role::Old,
                kernel_release: release,
                agent_version: agent_version(),
            },
            started: Instant::now(),
        })
    }

    /// The upgrade whose frames are sent from now on (channels of another upgrade close).
    pub fn set_upgrade(&mut self, id: UpgradeId) {
        if self.upgrade_id != Some(id) {
            self.channels.clear();
            self.staged.clear();
        }
        self.upgrade_id = Some(id);
    }

    /// Speaks as instance `id` from now on (a rollback moves from the new instance).
    pub fn set_local(&mut self, id: InstanceId, release: String) {
        self.local.instance_id = id;
        self.local.kernel_release = release;
    }

    /// The negotiated channel to `id`, opened with `connect` on first use.
    fn channel(
        &mut self,
        id: InstanceId,
        connect: &mut Connector<'_>,
    ) -> Result<&mut Chan, PlatformError> {
        if !self.channels.contains_key(&id) {
            let upgrade = self
                .upgrade_id
                .ok_or_else(|| chan_err(id, "no upgrade id was set"))?;
            // Transports register with the runtime's reactor when they are made.
            let _enter = self.rt.enter();
            let transport = connect(id, upgrade)?;
            let mut chan = Channel::new(transport, upgrade, self.local.clone());
            let negotiated = self
                .rt
                .block_on(async {
                    tokio::time::timeout(REPLY_TIMEOUT, chan.negotiate_as_initiator()).await
                })
                .map_err(|_| chan_err(id, "no Hello answer"))?
                .map_err(|e| chan_err(id, format!("negotiation: {e}")))?;
            tracing::info!(instance = id, version = negotiated.version, peer = ?negotiated.peer, "channel up");
            self.channels.insert(id, chan);
        }
        self.channels
            .get_mut(&id)
            .ok_or_else(|| chan_err(id, "channel vanished"))
    }

    fn send(
        &mut self,
        id: InstanceId,
        m: Message,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), PlatformError> {
        let rt = &self.rt;
        let chan = self
            .channels
            .get_mut(&id)
            .ok_or_else(|| chan_err(id, "no channel"))?;
        rt.block_on(chan.send(m, fds))
            .map(drop)
            .map_err(|e| chan_err(id, format!("send: {e}")))
    }

    fn recv(&mut self, id: InstanceId) -> Result<Message, PlatformError> {
        self.recv_within(id, REPLY_TIMEOUT)
    }

    fn recv_within(&mut self, id: InstanceId, wait: Duration) -> Result<Message, PlatformError> {
        let rt = &self.rt;
        let chan = self
            .channels
            .get_mut(&id)
            .ok_or_else(|| chan_err(id, "no channel"))?;
        let (frame, _fds) = rt
            .block_on(async { tokio::time::timeout(wait, chan.recv()).await })
            .map_err(|_| chan_err(id, format!("no reply within {wait:?}")))?
            .map_err(|e| chan_err(id, format!("receive: {e}")))?;
        Ok(frame.message)
    }

    /// This side's heartbeat: its time since the upgrade's channels opened, migrating.
    fn heartbeat_message(&self) -> Message {
        Message::Heartbeat(Heartbeat {
            monotonic_ms: ms(self.started.elapsed()),
            state: AgentState::Migrating,
        })
    }

    /// A heartbeat round trip: the peer's agent is alive and answering.
    pub fn heartbeat(
        &mut self,
        id: InstanceId,
        connect: &mut Connector<'_>,
    ) -> Result<(), PlatformError> {
        self.channel(id, connect)?;
        let hb = self.heartbeat_message();
        self.send(id, hb, &[])?;
        match self.recv(id)? {
            Message::Heartbeat(_) => Ok(()),
            other => Err(chan_err(
                id,
                format!("expected a heartbeat, got {}", other.message_type()),
            )),
        }
    }

    /// `PrepareMigration` for `spec` (sent before the freeze).
    pub fn prepare(
        &mut self,
        to: InstanceId,
        spec: &WorkloadSpec,
        connect: &mut Connector<'_>,
    ) -> Result<(), PlatformError> {
        self.channel(to, connect)?;
        let spec_json = serde_json::to_vec(spec)
            .map_err(|e| chan_err(to, format!("encoding the spec: {e}")))?;
        self.send(
            to,
            Message::PrepareMigration(PrepareMigration {
                workload_id: spec.name.clone(),
                spec: spec_json,
            }),
            &[],
        )?;
        if spec.standby {
            // The receiver starts the standby copy while handling PrepareMigration; its
            // answer to this heartbeat means the copy is ready (or given up), before the
            // freeze.
            self.heartbeat(to, connect)?;
        }
        Ok(())
    }

    /// Protocol version 2, before the freeze: `RegionStage` with the image of `out`
    /// attached, and its verdict. `Ok(true)`: the target verified the image and keeps it, so
    /// [`Self::offer`] sends only the state fds (`StagedOffer`) if it offers this very image.
    /// `Ok(false)`: the channel speaks version 1; the offer carries the image as before.
    /// Only for transports that carry fds (the caller knows: the emulated platform's). [`PlatformError::Refused`]: the target refused the image.
    pub fn stage(
        &mut self,
        to: InstanceId,
        name: &str,
        out: &Outgoing,
        connect: &mut Connector<'_>,
    ) -> Result<bool, PlatformError> {
        let chan = self.channel(to, connect)?;
        if chan.version().unwrap_or(1) < 2 {
            return Ok(false);
        }
        self.staged.remove(&to);
        let stage = Message::RegionStage(RegionStage {
            workload_id: name.to_owned(),
            image_len: out.offer.image_len,
            image_sha256: out.offer.image_sha256,
        });
        self.send(to, stage, &[out.image.as_fd()])?;
        match self.recv(to)? {
            Message::RegionVerified(v) if v.workload_id == name => match v.result {
                Verification::Ok => {
                    self.staged
                        .insert(to, (name.to_owned(), out.offer.image_sha256));
                    Ok(true)
                }
                Verification::Failed { check, detail } => Err(PlatformError::Refused {
                    workload: name.to_owned(),
                    instance: to,
                    check,
                    detail,
                }),
            },
            other => Err(chan_err(
                to,
                format!(
                    "{name}: expected RegionVerified for the staged image, got {}",
                    other.message_type()
                ),
            )),
        }
    }

    /// `RegionOffer` with the image and fds attached (or, when [`Self::stage`] delivered
    /// this very image, `StagedOffer` with the state fds only); waits for `RegionVerified`
    /// and `HealthReport`, both before `deadline`.
    pub fn offer(
        &mut self,
        to: InstanceId,
        name: &str,
        out: Outgoing,
        deadline: Instant,
        connect: &mut Connector<'_>,
    ) -> Result<Delivered, PlatformError> {
        let left = |what: &str| {
            let now = Instant::now();
            if now >= deadline {
                Err(chan_err(
                    to,
                    format!("{name}: the move's deadline passed before {what}"),
                ))
            } else {
                Ok(deadline - now)
            }
        };
        let t0 = Instant::now();
        self.channel(to, connect)?;
        let staged = self.staged.remove(&to);
        let frame_fds = out.frame_fds();
        if staged.is_some_and(|(w, sha)| w == name && sha == out.offer.image_sha256) {
            let offer = StagedOffer {
                workload_id: out.offer.workload_id.clone(),
                image_sha256: out.offer.image_sha256,
                fds: out.offer.fds.get(1..).unwrap_or_default().to_vec(),
            };
            let state_fds = frame_fds.get(1..).unwrap_or_default();
            self.send(to, Message::StagedOffer(offer), state_fds)?;
        } else {
            self.send(to, Message::RegionOffer(out.offer.clone()), &frame_fds)?;
        }
        drop(frame_fds);
        drop(out);
        let verified_us;
        let wait = left("RegionVerified")?;
        match self.recv_within(to, wait)? {
            Message::RegionVerified(v) if v.workload_id == name => match v.result {
                Verification::Ok => {
                    verified_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                }
                Verification::Failed { check, detail } => {
                    return Err(PlatformError::Refused {
                        workload: name.to_owned(),
                        instance: to,
                        check,
                        detail,
                    });
                }
            },
            other => {
                return Err(chan_err(
                    to,
                    format!(
                        "{name}: expected RegionVerified, got {}",
                        other.message_type()
                    ),
                ));
            }
        }
        let wait = left("HealthReport")?;
        match self.recv_within(to, wait)? {
            Message::HealthReport(h) if h.workload_id == name => {
                if h.healthy {
                    Ok(Delivered::Healthy { verified_us })
                } else {
                    Err(PlatformError::Unhealthy {
                        workload: name.to_owned(),
                        instance: to,
                        detail: h.detail,
                    })
                }
            }
            other => Err(chan_err(
                to,
                format!(
                    "{name}: expected HealthReport, got {}",
                    other.message_type()
                ),
            )),
        }
    }

    /// `Commit`, then a heartbeat round trip proving the commit was processed.
    pub fn commit(
        &mut self,
        to: InstanceId,
        name: &str,
        connect: &mut Connector<'_>,
    ) -> Result<(), PlatformError> {
        self.send(
            to,
            Message::Commit(Commit {
                workload_id: name.to_owned(),
            }),
            &[],
        )?;
        self.heartbeat(to, connect)
    }

    /// `Abort`, then a heartbeat round trip proving the copy was stopped (best effort: the
    /// receiver also stops an uncommitted copy at EOF).
    pub fn abort(&mut self, to: InstanceId, name: &str, reason: &str) {
        let abort = Message::Abort(Abort {
            workload_id: Some(name.to_owned()),
            reason: reason.to_owned(),
        });
        self.staged.remove(&to);
        if !self.channels.contains_key(&to) || self.send(to, abort, &[]).is_err() {
            return;
        }
        // The receiver handles messages in order: its answer to a heartbeat sent after the
        // abort means the copy is stopped (the old copy, thawed next, must not resume
        // beside it: with a connection hand-over both would read the same connections).
        // A late answer to an earlier message (a health report past its deadline) is skipped.
        let hb = self.heartbeat_message();
        if self.send(to, hb, &[]).is_err() {
            return;
        }
        let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.recv_within(to, left) {
                Ok(Message::Heartbeat(_)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Tells every peer the upgrade is over (`ReleaseResources` when `release` is given,
    /// then `Shutdown`) and closes every channel.
    pub fn close_all(&mut self, release: Option<&Resources>) {
        let ids: Vec<InstanceId> = self.channels.keys().copied().collect();
        if let Some(r) = release {
            for id in ids {
                let _ = self.send(
                    id,
                    Message::ReleaseResources(ReleaseResources {
                        cpus: r.cpus.clone(),
                        memory_bytes: r.memory_bytes,
                    }),
                    &[],
                );
                let _ = self.send(
                    id,
                    Message::Shutdown(Shutdown {
                        reason: "upgrade complete".into(),
                    }),
                    &[],
                );
            }
        }
        self.channels.clear();
        self.staged.clear();
    }

    /// Closes the channel to `id` (its receiver stops every uncommitted copy).
    pub fn close(&mut self, id: InstanceId) {
        self.channels.remove(&id);
        self.staged.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kho_proto::channel::{MAX_VERSION, MIN_VERSION, MessageType, UnixTransport};

    /// A target instance's agent on `b`, speaking `versions`, on its own thread: it
    /// negotiates, then `serve` has the channel.
    fn target<T, F>(
        b: std::os::unix::net::UnixStream,
        versions: (u16, u16),
        serve: impl FnOnce(Channel<UnixTransport>) -> F + Send + 'static,
    ) -> std::thread::JoinHandle<T>
    where
        T: Send + 'static,
        F: Future<Output = T>,
    {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let t = UnixTransport::from_std(b).unwrap();
                let local = PeerInfo {
                    instance_id: 2,
                    role: Role::New,
                    kernel_release: "B".into(),
                    agent_version: "test".into(),
                };
                let mut chan = Channel::new(t, UPGRADE, local)
                    .with_version_range(versions.0, versions.1)
                    .unwrap();
                chan.negotiate_as_responder().await.unwrap();
                serve(chan).await
            })
        })
    }

    const UPGRADE: UpgradeId = UpgradeId([9; 16]);

    /// A link of instance 1 whose one connection (to instance 2) is `a`.
    fn link_over(a: std::os::unix::net::UnixStream) -> (ChannelLink, Box<Connector<'static>>) {
        let mut link = ChannelLink::new(1, "A".into()).unwrap();
        link.set_upgrade(UPGRADE);
        let mut a = Some(a);
        let connect = Box::new(move |_: InstanceId, _: UpgradeId| {
            let s = a.take().expect("one connection");
            let t = UnixTransport::from_std(s).map_err(|e| chan_err(2, e.to_string()))?;
            Ok(Box::new(t) as Box<dyn Transport>)
        });
        (link, connect)
    }

    /// A target that negotiates, then never answers an offer: the delivery fails when the
    /// move's deadline passes, not after the generic reply timeout.
    #[test]
    fn an_offer_fails_at_the_moves_deadline() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = target(b, (MIN_VERSION, MAX_VERSION), |mut chan| async move {
            // Read the offer, answer nothing, keep the connection open.
            let _ = chan.recv().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let (mut link, mut connect) = link_over(a);
        let image = crate::handover::sealed_memfd("img", b"image").unwrap();
        let out = Outgoing {
            image,
            offer: kho_proto::channel::RegionOffer {
                workload_id: "kv".into(),
                image_len: 5,
                image_sha256: [0; 32],
                fds: Vec::new(),
            },
            fds: Vec::new(),
        };
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_millis(300);
        let e = link
            .offer(2, "kv", out, deadline, &mut connect)
            .unwrap_err();
        let took = t0.elapsed();
        assert!(matches!(e, PlatformError::Channel { id: 2, .. }), "{e}");
        assert!(took < Duration::from_secs(3), "waited {took:?}");
        drop(link);
        peer.join().unwrap();
    }

    /// What a fake target saw of one move: the types and fd counts of the frames after the
    /// handshake.
    fn staged_move(peer_versions: (u16, u16)) -> (bool, Vec<(MessageType, usize)>) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = target(b, peer_versions, |mut chan| async move {
            let mut seen = Vec::new();
            while let Ok((frame, fds)) = chan.recv().await {
                seen.push((frame.message_type(), fds.len()));
                let ok = |w: &str| {
                    Message::RegionVerified(kho_proto::channel::RegionVerified {
                        workload_id: w.to_owned(),
                        result: Verification::Ok,
                    })
                };
                match frame.message {
                    Message::RegionStage(s) => {
                        chan.send(ok(&s.workload_id), &[]).await.unwrap();
                    }
                    Message::RegionOffer(kho_proto::channel::RegionOffer {
                        workload_id: w,
                        ..
                    })
                    | Message::StagedOffer(StagedOffer { workload_id: w, .. }) => {
                        chan.send(ok(&w), &[]).await.unwrap();
                        let report = Message::HealthReport(kho_proto::channel::HealthReport {
                            workload_id: w,
                            healthy: true,
                            detail: String::new(),
                            elapsed_ms: 0,
                        });
                        chan.send(report, &[]).await.unwrap();
                    }
                    _ => {}
                }
            }
            seen
        });
        let (mut link, mut connect) = link_over(a);
        let out = || {
            let image = crate::handover::sealed_memfd("img", b"image").unwrap();
            let data = crate::handover::sealed_memfd("data", b"data").unwrap();
            let desc = |name: &str| kho_proto::channel::FdDescriptor {
                name: name.into(),
                kind: kho_proto::channel::FdKind::Memfd,
                length: 0,
                crc32: 0,
                sha256: [0; 32],
            };
            Outgoing {
                image,
                offer: kho_proto::channel::RegionOffer {
                    workload_id: "kv".into(),
                    image_len: 5,
                    image_sha256: [1; 32],
                    fds: vec![desc("image"), desc("data")],
                },
                fds: vec![crate::model::PreservedFd {
                    name: "data".into(),
                    fd: data,
                }],
            }
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = out();
        let staged = link.stage(2, "kv", &first, &mut connect).unwrap();
        link.offer(2, "kv", first, deadline, &mut connect).unwrap();
        // Staged, but another image is offered (rebuilt after the freeze): it travels whole.
        let second = out();
        if staged {
            assert!(link.stage(2, "kv", &second, &mut connect).unwrap());
        }
        let mut other = out();
        other.offer.image_sha256 = [2; 32];
        link.offer(2, "kv", other, deadline, &mut connect).unwrap();
        drop(link);
        (staged, peer.join().unwrap())
    }

    /// Version 2: the image goes ahead with `RegionStage` (one fd), the offer after the
    /// freeze carries the state fds only; an offer of another image carries everything.
    /// A version 1 target gets the version 1 conversation.
    #[test]
    fn a_staged_image_is_not_sent_again_and_version_1_targets_get_whole_offers() {
        use MessageType::{RegionOffer, RegionStage, StagedOffer};
        let (staged, seen) = staged_move((1, 2));
        assert!(staged);
        assert_eq!(
            seen,
            [
                (RegionStage, 1),
                (StagedOffer, 1),
                (RegionStage, 1),
                (RegionOffer, 2)
            ]
        );
        let (staged, seen) = staged_move((1, 1));
        assert!(!staged);
        assert_eq!(seen, [(RegionOffer, 2), (RegionOffer, 2)]);
    }
}
