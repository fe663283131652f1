//! The receiving side of a move: what the agent of the *target* instance does with a
//! channel connection.
//!
//! 1. Answer `Hello` (version negotiation) for the upgrade it was told to expect.
//! 2. On `PrepareMigration`, note the workload; on `RegionOffer` (image memfd + state fds
//!    attached), verify everything ([`crate::handover::verify`]), start the workload with its
//!    preserved fds, and answer `RegionVerified`; then run its health check and answer
//!    `HealthReport`. Protocol version 2 splits the offer around the freeze: `RegionStage`
//!    (the image alone, verified and kept: [`crate::handover::stage`], answered with
//!    `RegionVerified`), then `StagedOffer` (the state fds, checked against the staged image:
//!    [`crate::handover::verify_staged`]), answered like a `RegionOffer`.
//! 3. `Commit` makes the workload this instance's; `Abort` stops it and drops its fds.
//! 4. If the channel drops (the orchestrator died), every workload received but not
//!    committed is stopped at once: a copy nobody committed must never run beside the
//!    original, which recovery will thaw.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use kho_proto::channel::{
    AgentState, Channel, HealthReport, Heartbeat, Message, PeerInfo, RegionVerified, Role,
    UnixTransport, Verification,
};

use crate::host::supervisor::{self, Shared, lock};

/// The agent version string sent in `Hello`/`HelloAck`.
pub fn agent_version() -> String {
    format!("mk-agentd {}", env!("CARGO_PKG_VERSION"))
}

/// How long a standby copy has to get ready (say `READY` on its socket) before the move
/// goes on without it.
pub const STANDBY_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves one channel connection until it closes.
pub fn serve(shared: &Shared, conn: UnixStream) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the channel runtime");
            return;
        }
    };
    let received = rt.block_on(serve_async(shared, conn));
    // Whatever ended the conversation, uncommitted copies must not survive it, nor copies
    // still waiting as standbys.
    supervisor::drop_all_standbys(&mut lock(shared));
    for name in received {
        supervisor::stop_uncommitted(shared, &name, "channel closed before commit");
    }
}

async fn serve_async(shared: &Shared, conn: UnixStream) -> Vec<String> {
    let mut received = Vec::new();
    let (upgrade_id, local, state_dir) = {
        let inst = lock(shared);
        let Some(id) = inst.expected_upgrade else {
            tracing::warn!("channel connection without an expected upgrade: refused");
            return received;
        };
        (
            id,
            PeerInfo {
                instance_id: inst.id,
                role: Role::New,
                kernel_release: inst.kernel_release.clone(),
                agent_version: agent_version(),
            },
            inst.state_dir.clone(),
        )
    };
    let transport = match UnixTransport::from_std(conn) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "channel transport");
            return received;
        }
    };
    let mut chan = Channel::new(transport, upgrade_id, local);
    if let Err(e) = chan.negotiate_as_responder().await {
        tracing::warn!(error = %e, "channel negotiation failed");
        return received;
    }
    let trusted = crate::statedir::StateDir::new(&state_dir)
        .trusted_node_keys()
        .map_err(|e| e.to_string());
    let started = Instant::now();
    let mut inject_health_fail = false;
    // Version 2: the image a RegionStage delivered, for the StagedOffer after the freeze.
    let mut staged: Option<crate::handover::Staged> = None;
    loop {
        let (frame, fds) = match chan.recv().await {
            Ok(x) => x,
            Err(e) => {
                tracing::info!(error = %e, "channel closed");
                return received;
            }
        };
        // An offer (whole, or of a staged image) is checked, then started and health-checked
        // the same way.
        let t_offer = Instant::now();
        let incoming = match frame.message {
            Message::RegionOffer(offer) => {
                staged = None;
                let result = trusted
                    .as_ref()
                    .map_err(|e| untrusted(e))
                    .and_then(|t| crate::handover::verify(&offer, fds, t, upgrade_id.0));
                let offered = (offer.workload_id, result, t_offer);
                Incoming::Offer(offered)
            }
            Message::StagedOffer(offer) => {
                let result = crate::handover::verify_staged(staged.take(), &offer, fds);
                let offered = (offer.workload_id, result, t_offer);
                Incoming::Offer(offered)
            }
            other => Incoming::Other(other, fds),
        };
        let reply = match incoming {
            Incoming::Offer(offered) => {
                let restored = restore(
                    shared,
                    &mut chan,
                    &mut received,
                    offered,
                    inject_health_fail,
                )
                .await;
                let Some(report) = restored else {
                    return received;
                };
                report
            }
            Incoming::Other(Message::Heartbeat(_), _) => Some(Message::Heartbeat(Heartbeat {
                monotonic_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                state: AgentState::Ready,
            })),
            Incoming::Other(Message::PrepareMigration(p), _) => {
                let spec = serde_json::from_slice::<crate::workload::WorkloadSpec>(&p.spec).ok();
                inject_health_fail = spec
                    .as_ref()
                    .is_some_and(|s| crate::fault::wants_health_fail(&s.env));
                // A standby copy starts now, while the old copy still serves; the peer's
                // next heartbeat waits for it (messages are handled in order). It is used
                // only if the spec in the signed offer is the same (supervisor::admit).
                if let Some(spec) = spec.filter(|s| {
                    s.standby && s.name == p.workload_id && crate::workload::valid_name(&s.name)
                }) {
                    let extra = crate::fault::health_fail_args(inject_health_fail);
                    let sh = Arc::clone(shared);
                    let t0 = Instant::now();
                    let started = tokio::task::spawn_blocking(move || {
                        supervisor::start_standby(&sh, &spec, &extra, STANDBY_READY_TIMEOUT)
                    })
                    .await;
                    match started {
                        Ok(Ok(())) => {
                            tracing::debug!(us = t0.elapsed().as_micros(), workload = %p.workload_id, "standby copy ready");
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(workload = %p.workload_id, error = %e, "standby copy failed; the move will start the copy after the freeze");
                        }
                        Err(e) => tracing::warn!(error = %e, "standby start panicked"),
                    }
                }
                // Get ready while the workload still runs on the old instance: creating
                // its group is the slowest part of starting it here. The name comes from
                // the peer: it must be a valid name before it becomes a path.
                if !crate::workload::valid_name(&p.workload_id) {
                    tracing::warn!(workload = %p.workload_id, "invalid workload name in PrepareMigration ignored");
                } else if let Err(e) = lock(shared).freezer.prepare(&p.workload_id) {
                    tracing::warn!(workload = %p.workload_id, error = %e, "cannot pre-create the workload's group");
                }
                None
            }
            Incoming::Other(Message::RegionStage(stage), fds) => {
                // Version 2, before the freeze: the image is checked now, while the
                // workload still runs on the sender. One staged image at a time: a new one
                // replaces it.
                let result = trusted
                    .as_ref()
                    .map_err(|e| untrusted(e))
                    .and_then(|t| crate::handover::stage(&stage, fds, t, upgrade_id.0));
                let verdict = match result {
                    Ok(s) => {
                        staged = Some(s);
                        Verification::Ok
                    }
                    Err(e) => {
                        staged = None;
                        tracing::warn!(workload = %stage.workload_id, error = %e, "staged image refused");
                        Verification::Failed {
                            check: e.check,
                            detail: e.detail,
                        }
                    }
                };
                Some(Message::RegionVerified(RegionVerified {
                    workload_id: stage.workload_id,
                    result: verdict,
                }))
            }
            Incoming::Other(Message::Commit(c), _) => {
                let mut inst = lock(shared);
                if let Some(w) = inst.workloads.get_mut(&c.workload_id) {
                    w.pending_commit = false;
                }
                None
            }
            Incoming::Other(Message::Abort(a), _) => {
                staged = None;
                let names: Vec<String> = match &a.workload_id {
                    Some(n) => vec![n.clone()],
                    None => received.clone(),
                };
                // A connection hand-over back to the old copy waits for the workload.
                let sh = Arc::clone(shared);
                let _ = tokio::task::spawn_blocking(move || {
                    for n in names {
                        supervisor::stop_uncommitted(
                            &sh,
                            &n,
                            &format!("move aborted: {}", a.reason),
                        );
                    }
                })
                .await;
                None
            }
            Incoming::Other(Message::ReleaseResources(r), _) => {
                tracing::info!(cpus = ?r.cpus, memory = r.memory_bytes, "peer releases resources");
                None
            }
            Incoming::Other(Message::Shutdown(s), _) => {
                tracing::info!(reason = %s.reason, "peer shut the channel down");
                return received;
            }
            Incoming::Other(other, _) => {
                tracing::warn!(message = ?other.message_type(), "unexpected message ignored");
                None
            }
        };
        if let Some(m) = reply
            && let Err(e) = chan.send(m, &[]).await
        {
            tracing::info!(error = %e, "channel closed while replying");
            return received;
        }
    }
}

/// The check that fails when the trusted keys could not be read.
fn untrusted(error: &str) -> crate::handover::CheckFailed {
    crate::handover::CheckFailed {
        check: "trusted_keys".into(),
        detail: error.to_owned(),
    }
}

/// A frame as the receiver's loop handles it: an offer whose checks ran (a whole
/// `RegionOffer` or a version 2 `StagedOffer`), or any other message with its fds.
/// It lives for one turn of the loop, on the stack: boxing the larger variant would add an
/// allocation to every offer, inside the blackout.
#[allow(clippy::large_enum_variant)]
enum Incoming {
    Offer(Offered),
    Other(Message, Vec<std::os::fd::OwnedFd>),
}

/// An offer whose checks ran: the workload, the outcome, when it arrived.
type Offered = (
    String,
    Result<crate::handover::Incoming, crate::handover::CheckFailed>,
    Instant,
);

/// The rest of an offer once its checks ran: answers `RegionVerified`; if every check
/// passed, starts the workload from what was verified (noting it in `received`: it runs
/// here, uncommitted) and health-checks it. The `HealthReport` to send, if any; `None`
/// when the channel closed.
async fn restore(
    shared: &Shared,
    chan: &mut Channel<UnixTransport>,
    received: &mut Vec<String>,
    (name, result, t_offer): Offered,
    inject_health_fail: bool,
) -> Option<Option<Message>> {
    let incoming = match result {
        Err(e) => {
            tracing::warn!(workload = %name, error = %e, "offer refused");
            let refused = Message::RegionVerified(RegionVerified {
                workload_id: name,
                result: Verification::Failed {
                    check: e.check,
                    detail: e.detail,
                },
            });
            return chan.send(refused, &[]).await.ok().map(|_| None);
        }
        Ok(incoming) => incoming,
    };
    tracing::debug!(us = t_offer.elapsed().as_micros(), workload = %name, "offer verified");
    let t0 = Instant::now();
    let extra = crate::fault::health_fail_args(inject_health_fail);
    let spec = incoming.spec;
    let start = supervisor::admit(shared, &name, &spec, incoming.fds, &extra, true);
    tracing::debug!(us = t_offer.elapsed().as_micros(), workload = %name, "workload restored");
    let verdict = match &start {
        Ok(_) => Verification::Ok,
        Err(e) => Verification::Failed {
            check: "restore".into(),
            detail: e.to_string(),
        },
    };
    if start.is_ok() {
        received.push(name.clone());
    }
    let answer = Message::RegionVerified(RegionVerified {
        workload_id: name.clone(),
        result: verdict,
    });
    chan.send(answer, &[]).await.ok()?;
    if start.is_err() {
        return Some(None);
    }
    let (healthy, detail) = supervisor::check_health_async(shared, &name, spec).await;
    tracing::debug!(us = t_offer.elapsed().as_micros(), workload = %name, healthy, "health checked");
    Some(Some(Message::HealthReport(HealthReport {
        workload_id: name,
        healthy,
        detail,
        elapsed_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
    })))
}
