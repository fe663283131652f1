//! Test-only fault injection: each fault forces one failure path, so that tests and
//! `mk-upgrade demo --inject` can prove the rollback works.
//!
//! Faults exist only in builds with the cargo feature `fault-injection` (the test suites
//! and the VM suite enable it; `cargo build --release` never does). In a build without it,
//! [`Faults::any`] is always false: asking for a fault is refused by the binaries
//! ([`ENABLED`] says which build this is), the agent ignores faults named in a request, and
//! the receiver never honours [`HEALTH_FAIL_ENV`].

use serde::{Deserialize, Serialize};

/// Whether this build carries fault injection.
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// The receiving side starts the workload with this extra argument, which a workload with
/// strict argument parsing refuses, so its health check fails.
pub const HEALTH_FAIL_ARG: &str = "--mk-injected-health-fault";

/// Environment variable a moved spec carries to request [`HEALTH_FAIL_ARG`].
pub const HEALTH_FAIL_ENV: &str = "MK_INJECT_HEALTH_FAIL";

/// Environment variable naming the journal write after which an apply kills itself with
/// SIGKILL (crash-consistency tests).
pub const CRASH_AFTER_WRITE_ENV: &str = "MK_FAULT_CRASH_AFTER_WRITE";

/// Environment variable of the LUO host agent naming a file it waits for (at most
/// [`KEXEC_GATE_WAIT`]) after recording the trial boot and before the kexec: the VM suite
/// copies the state directory out at that point (its VM has no disk), then opens the gate.
pub const KEXEC_GATE_ENV: &str = "MK_FAULT_KEXEC_GATE";

/// How long the agent waits at the [`KEXEC_GATE_ENV`] gate.
pub const KEXEC_GATE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Test-only (fault-injection builds, with [`KEXEC_GATE_ENV`] set): waits for the gate file.
pub fn wait_at_kexec_gate() {
    if !ENABLED {
        return;
    }
    let Some(gate) = std::env::var_os(KEXEC_GATE_ENV) else {
        return;
    };
    let deadline = std::time::Instant::now() + KEXEC_GATE_WAIT;
    while !std::path::Path::new(&gate).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The faults of one upgrade.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Faults {
    /// Corrupt a region of the first workload's handover image after its CRC was computed.
    #[serde(default)]
    pub corrupt_region: bool,
    /// Make the first workload fail its health check on the new instance or kernel.
    #[serde(default)]
    pub health_fail: bool,
    /// Kill the orchestrating process (SIGKILL) right after the N-th journal write.
    #[serde(default)]
    pub crash_after_write: Option<u32>,
}

impl Faults {
    /// No fault.
    pub const NONE: Faults = Faults {
        corrupt_region: false,
        health_fail: false,
        crash_after_write: None,
    };

    /// `self` if this build carries fault injection, else no fault.
    pub fn effective(self) -> Faults {
        if ENABLED { self } else { Faults::NONE }
    }

    /// Whether any fault is asked for.
    pub fn any(&self) -> bool {
        *self != Faults::NONE
    }

    /// The crash point named by [`CRASH_AFTER_WRITE_ENV`] (fault-injection builds only).
    pub fn crash_point_from_env() -> Option<u32> {
        if !ENABLED {
            return None;
        }
        std::env::var(CRASH_AFTER_WRITE_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
    }
}

/// Whether a received spec asks for the health fault (honoured in fault-injection builds
/// only).
pub fn wants_health_fail(env: &std::collections::BTreeMap<String, String>) -> bool {
    ENABLED && env.contains_key(HEALTH_FAIL_ENV)
}

/// The arguments appended to a received copy's command line: [`HEALTH_FAIL_ARG`] when its
/// move asked for the health fault ([`wants_health_fail`]), else none.
pub fn health_fail_args(wanted: bool) -> Vec<String> {
    if wanted {
        vec![HEALTH_FAIL_ARG.to_owned()]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_take_effect_only_in_fault_injection_builds() {
        let f = Faults {
            health_fail: true,
            ..Faults::NONE
        };
        assert_eq!(f.effective().any(), ENABLED);
        let mut env = std::collections::BTreeMap::new();
        env.insert(HEALTH_FAIL_ENV.to_owned(), "1".to_owned());
        assert_eq!(wants_health_fail(&env), ENABLED);
    }
}
