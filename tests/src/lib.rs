//! Helpers for the end-to-end tests: drive the real `mk-upgrade` binary on a fresh emulated
//! machine in a temporary directory, as an operator would.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use kho_proto::keys::NodeKey;
use upgrade_agent::verify::bzimage::minimal_bzimage;

/// Path of a workspace binary (built by `cargo test --workspace`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: run the tests with `cargo test --workspace` (it builds the binaries)",
        p.display()
    );
    p
}

/// Fails, saying why, when the `mk-upgrade` under test was built without fault injection
/// (the tests that force failure paths need it; `cargo test --workspace` builds the agent
/// with the feature, a plain `cargo build` of the agent overwrites it without).
pub fn require_fault_injection() {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *OK.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let o = Command::new(bin("mk-upgrade"))
            .arg("--state-dir")
            .arg(dir.path())
            .args([
                "apply",
                "--kernel",
                "/nonexistent",
                "--inject",
                "health-fail",
            ])
            .output()
            .expect("running mk-upgrade");
        !String::from_utf8_lossy(&o.stderr).contains("needs a build with fault injection")
    });
    assert!(
        ok,
        "{} was built without the fault-injection feature: run the tests with `cargo test \
         --workspace` (a plain `cargo build -p upgrade-agent` after it rebuilds the agent \
         without the feature)",
        bin("mk-upgrade").display()
    );
}

/// A fresh emulated machine: state dir, a trusted release key, kernels A and B.
#[derive(Debug)]
pub struct Machine {
    pub dir: tempfile::TempDir,
    pub key: NodeKey,
    pub addrs: Vec<SocketAddr>,
    /// `--platform` of every command (`emulated`, or `multikernel` on the simulated kernel).
    pub platform: &'static str,
}

/// Result of one command.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// The stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): stdout {:?} stderr {:?}",
                self.stdout, self.stderr
            )
        })
    }
}

/// `n` free loopback ports, never one handed out before in this process: the machines of
/// tests running in parallel reserve ports, close them, and bind them later, so without
/// this two machines could be given the same port (a flaky EADDRINUSE at `emu init`).
fn free_ports(n: usize) -> Vec<SocketAddr> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut held = Vec::new();
    while held.len() < n {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        if given.insert(l.local_addr().unwrap().port()) {
            held.push(l);
        }
    }
    held.iter().map(|l| l.local_addr().unwrap()).collect()
}

impl Machine {
    /// A machine with `workloads` mk-demo-kv workloads declared (not started).
    pub fn new(workloads: usize) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mk-e2e.")
            .tempdir()
            .unwrap();
        let key = NodeKey::from_seed([42; 32]);
        std::fs::create_dir_all(dir.path().join("state/trusted-keys")).unwrap();
        std::fs::write(
            dir.path().join("state/trusted-keys/release.pub"),
            format!("{}\n", hex(&key.public())),
        )
        .unwrap();
        let addrs = free_ports(workloads);
        let kv = bin("mk-demo-kv");
        let mut toml = String::new();
        for (i, a) in addrs.iter().enumerate() {
            let _ = write!(
                toml,
                "[[workload]]\nname = \"kv-{n}\"\nexec = \"{kv}\"\nargs = [\"--capacity\", \"2MiB\"]\n\
                 [[workload.memfd]]\nname = \"kv-data\"\n[[workload.listen]]\nname = \"listen\"\naddr = \"{a}\"\n\
                 [workload.health]\nkind = \"http\"\naddr = \"{a}\"\ntimeout_ms = 5000\n\n",
                n = i + 1,
                kv = kv.display()
            );
        }
        std::fs::write(dir.path().join("state/workloads.toml"), toml).unwrap();
        let m = Machine {
            dir,
            key,
            addrs,
            platform: "emulated",
        };
        m.kernel("7.2.13-mkA");
        m.kernel("7.2.13-mkB");
        m
    }

    /// A machine on the SIMULATED multikernel kernel (`MK_MULTIKERNEL_SIM` = its `mksim`
    /// directory), with kernels whose payload is a (minimal, not bootable) ELF vmlinux.
    pub fn multikernel_sim(workloads: usize) -> Self {
        let mut m = Machine::new(workloads);
        m.platform = "multikernel";
        for r in ["7.2.13-mkA", "7.2.13-mkB"] {
            std::fs::write(
                m.path(&format!("bzImage-{r}")),
                upgrade_agent::verify::bzimage::minimal_bzimage_elf(r),
            )
            .unwrap();
        }
        m
    }

    /// The simulated multikernel kernel's directory.
    pub fn sim_dir(&self) -> PathBuf {
        self.path("mksim")
    }

    /// Path of a file in the machine's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a minimal kernel image with `release` (unsigned); returns its path.
    pub fn kernel(&self, release: &str) -> PathBuf {
        let p = self.path(&format!("bzImage-{release}"));
        std::fs::write(&p, minimal_bzimage(release)).unwrap();
        p
    }

    /// Signs `image` with `key` (writes IMAGE.sig).
    pub fn sign_with(&self, image: &Path, key: &NodeKey) {
        let bytes = std::fs::read(image).unwrap();
        let sig = upgrade_agent::verify::sign_image(&bytes, key, None, 1_800_000_000).unwrap();
        std::fs::write(
            upgrade_agent::verify::default_sig_path(image),
            sig.to_json(),
        )
        .unwrap();
    }

    /// Signs `image` with the trusted release key.
    pub fn sign(&self, image: &Path) {
        self.sign_with(image, &self.key);
    }

    /// Runs `mk-upgrade` with this machine's state dir.
    pub fn run(&self, args: &[&str]) -> Run {
        self.run_env(args, &[])
    }

    /// Runs `mk-upgrade` with extra environment variables.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        if args.contains(&"--inject") || env.iter().any(|(k, _)| k.starts_with("MK_FAULT_")) {
            require_fault_injection();
        }
        let mut c = Command::new(bin("mk-upgrade"));
        c.arg("--state-dir")
            .arg(self.path("state"))
            .arg("--platform")
            .arg(self.platform)
            .args(args)
            .env("MK_AGENTD", bin("mk-agentd"))
            .env_remove("MK_STATE_DIR")
            .env_remove("RUST_LOG");
        if self.platform == "multikernel" {
            c.env("MK_MULTIKERNEL_SIM", self.sim_dir());
        } else {
            c.env_remove("MK_MULTIKERNEL_SIM");
        }
        for (k, v) in env {
            c.env(k, v);
        }
        Run::from(c.output().unwrap())
    }

    /// Boots instance 1 with kernel A and the workloads; waits until they serve.
    pub fn init(&self) {
        let kernel = self.path("bzImage-7.2.13-mkA");
        let kernel = kernel.to_str().unwrap();
        let r = if self.platform == "multikernel" {
            // A pool of the first two cpus and 1 GiB: the first instance gets cpu 0.
            self.run(&[
                "multikernel",
                "init",
                "--kernel",
                kernel,
                "--pool-cpus",
                "0-1",
                "--pool-memory",
                "1GiB",
            ])
        } else {
            self.run(&["emu", "init", "--kernel", kernel])
        };
        assert_eq!(r.code, 0, "init: {r:?}");
        for a in &self.addrs {
            kv(*a, "PING").unwrap();
        }
    }

    /// `status --json`.
    pub fn status(&self) -> serde_json::Value {
        let r = self.run(&["status", "--json"]);
        assert_eq!(r.code, 0, "status: {r:?}");
        r.json()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.platform == "multikernel" {
            let _ = self.run(&["multikernel", "down"]);
        } else {
            let _ = self.run(&["emu", "down"]);
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// Sends one request line to a demo kv server and returns its reply line (retrying the
/// connection for a few seconds while a workload moves).
pub fn kv(addr: SocketAddr, line: &str) -> std::io::Result<String> {
    let mut last = None;
    for _ in 0..100 {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                writeln!(s, "{line}")?;
                let mut reply = String::new();
                BufReader::new(&s).read_line(&mut reply)?;
                return Ok(reply.trim_end().to_owned());
            }
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no attempt")))
}

/// The single active instance of a `status --json` document: (id, kernel, workload names).
pub fn active(status: &serde_json::Value) -> (u64, String, Vec<String>) {
    let active: Vec<&serde_json::Value> = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "active")
        .collect();
    assert_eq!(active.len(), 1, "exactly one active instance: {status}");
    let i = active[0];
    let names = i["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            assert_eq!(w["frozen"], false, "no workload stays frozen: {status}");
            w["name"].as_str().unwrap().to_owned()
        })
        .collect();
    (
        i["id"].as_u64().unwrap(),
        i["kernel_release"].as_str().unwrap().to_owned(),
        names,
    )
}
