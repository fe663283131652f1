//! `mk-upgrade rollout` over several EMULATED hosts on this machine (`local:` and, through a
//! stand-in ssh client, `ssh://`), each with its own mk-demo-kv workload: a complete
//! rollout, a failing gate after the canary (abort, canary rolled back), a hung host (host
//! timeout), an interruption then a resume, and a host whose apply client dies as a kexec
//! would take it (the outcome is read back from the host).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mk_integration_tests::{Machine, active, bin, kv};

struct Fleet {
    hosts: Vec<Machine>,
    dir: tempfile::TempDir,
}

impl Fleet {
    fn new(n: usize) -> Self {
        let hosts: Vec<Machine> = (0..n).map(|_| Machine::new(1)).collect();
        for h in &hosts {
            h.init();
            assert!(
                kv(h.addrs[0], "SET fleet-key v1")
                    .unwrap()
                    .starts_with("OK")
            );
            // Every host gets the same signed kernel B.
            h.sign(&h.path("bzImage-7.2.13-mkB"));
        }
        Fleet {
            hosts,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn kernel(&self) -> PathBuf {
        self.hosts[0].path("bzImage-7.2.13-mkB")
    }

    fn local(&self, i: usize) -> String {
        format!("local:{}", self.hosts[i].path("state").display())
    }

    /// Writes a plan with `hosts` and the extra TOML `rest`; returns its path.
    fn plan(&self, hosts: &[String], rest: &str) -> PathBuf {
        let p = self.dir.path().join("plan.toml");
        let hosts: Vec<String> = hosts.iter().map(|h| format!("{h:?}")).collect();
        std::fs::write(
            &p,
            format!(
                "hosts = [{}]\nkernel = {:?}\nplatform = \"emulated\"\n{rest}\n",
                hosts.join(", "),
                self.kernel().display().to_string()
            ),
        )
        .unwrap();
        p
    }

    fn rollout(&self, plan: &Path, extra: &[&str]) -> (i32, serde_json::Value, String) {
        let junit = self.dir.path().join("junit.xml");
        let out = Command::new(bin("mk-upgrade"))
            .arg("rollout")
            .arg("--plan")
            .arg(plan)
            .arg("--json")
            .arg("--junit")
            .arg(&junit)
            .args(extra)
            .env("MK_AGENTD", bin("mk-agentd"))
            .env_remove("MK_STATE_DIR")
            .output()
            .unwrap();
        let doc = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} / {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let junit = std::fs::read_to_string(junit).unwrap_or_default();
        (out.status.code().unwrap_or(-1), doc, junit)
    }

    fn kernel_of(&self, i: usize) -> String {
        active(&self.hosts[i].status()).1
    }

    fn data_intact(&self) {
        for h in &self.hosts {
            assert_eq!(kv(h.addrs[0], "GET fleet-key").unwrap(), "VALUE v1");
        }
    }
}

fn outcomes(doc: &serde_json::Value) -> Vec<(String, String)> {
    doc["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_owned(),
                h["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_complete_rollout_upgrades_every_host_after_the_canary_and_gates() {
    let f = Fleet::new(3);
    let hosts: Vec<String> = (0..3).map(|i| f.local(i)).collect();
    let plan = f.plan(
        &hosts,
        "canary = 1\nwaves = [\"100%\"]\nbake = \"1s\"\n[[gate]]\nkind = \"exec\"\nname = \"smoke\"\ncommand = [\"sh\", \"-c\", \"test -n \\\"$MK_ROLLOUT_HOSTS\\\"\"]\n",
    );
    // The dry run names the waves and touches nothing.
    let out = Command::new(bin("mk-upgrade"))
        .args(["rollout", "--dry-run", "--json", "--plan"])
        .arg(&plan)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let dry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dry["waves"].as_array().unwrap().len(), 2, "{dry}");
    assert_eq!(dry["waves"][0]["hosts"], serde_json::json!([hosts[0]]));
    assert_eq!(f.kernel_of(0), "7.2.13-mkA");

    let (code, doc, junit) = f.rollout(&plan, &[]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["result"], "complete");
    for (h, o) in outcomes(&doc) {
        assert_eq!(o, "upgraded", "{h}: {doc}");
    }
    for i in 0..3 {
        assert_eq!(f.kernel_of(i), "7.2.13-mkB");
    }
    f.data_intact();
    // 3 hosts + the gate after each of the 2 waves, no failure.
    assert!(junit.contains("tests=\"5\" failures=\"0\""), "{junit}");
    // Each host wrote its metrics and event log.
    let prom = std::fs::read_to_string(f.hosts[1].path("state/metrics/mk-upgrade.prom")).unwrap();
    assert!(
        prom.contains("mk_upgrade_upgrades_total{result=\"upgraded\"} 1"),
        "{prom}"
    );
    let ev = f.hosts[1].run(&["events", "--json"]);
    assert!(ev.stdout.contains("\"kind\":\"result\""), "{ev:?}");
    // Resume: running the same plan again finds every host current.
    let (code, doc, _) = f.rollout(&plan, &[]);
    assert_eq!(code, 0, "{doc}");
    assert!(outcomes(&doc).iter().all(|(_, o)| o == "current"), "{doc}");
}

#[test]
fn a_failing_gate_after_the_canary_aborts_and_rolls_the_canary_back() {
    let f = Fleet::new(3);
    let hosts: Vec<String> = (0..3).map(|i| f.local(i)).collect();
    let plan = f.plan(
        &hosts,
        "canary = 1\n[[gate]]\nkind = \"exec\"\nname = \"error-rate\"\ncommand = [\"sh\", \"-c\", \"echo error rate 7% >&2; exit 1\"]\n",
    );
    let (code, doc, junit) = f.rollout(&plan, &[]);
    assert_eq!(code, 10, "aborted and rolled back: {doc}");
    assert_eq!(doc["result"], "aborted-rolled-back");
    assert!(
        doc["reason"].as_str().unwrap().contains("error-rate"),
        "{doc}"
    );
    let o = outcomes(&doc);
    assert_eq!(o[0].1, "reverted", "{doc}");
    assert_eq!(
        (o[1].1.as_str(), o[2].1.as_str()),
        ("not-started", "not-started")
    );
    for i in 0..3 {
        assert_eq!(f.kernel_of(i), "7.2.13-mkA", "host {i} on the old kernel");
    }
    f.data_intact();
    assert!(
        junit.contains("<failure message=\"gate failed\">"),
        "{junit}"
    );
    assert!(junit.contains("error rate 7%"), "{junit}");
}

/// A stand-in ssh client: records its arguments, then runs the remote command locally
/// (after the `--`) with `sh -c`; for host "hung" it never answers; for host "kexec" an
/// `apply` runs detached and the connection drops at once (exit 255), as a kexec does.
fn fake_ssh(dir: &Path) -> PathBuf {
    let p = dir.join("fake-ssh");
    let log = dir.join("ssh-args.log");
    std::fs::write(
        &p,
        format!(
            r#"#!/bin/sh
echo "$@" >> {log}
host=
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-p) shift 2 ;;
    --) shift; break ;;
    *) host=${{1#*@}}; shift ;;
  esac
done
case "$host" in
  hung) exec sleep 3600 ;;
  kexec)
    case "$*" in
      *" apply "*) setsid sh -c "$*" >/dev/null 2>&1 < /dev/null & sleep 0.2; echo "Connection to kexec closed by remote host." >&2; exit 255 ;;
    esac ;;
esac
exec sh -c "$*"
"#,
            log = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn a_hung_host_times_out_and_stops_the_rollout() {
    let f = Fleet::new(1);
    let ssh = fake_ssh(f.dir.path());
    let plan = f.plan(
        &["ssh://root@hung".to_owned(), f.local(0)],
        &format!(
            "canary = 1\nhost_timeout = \"3s\"\nssh = {:?}\nmk_upgrade = {:?}\n",
            ssh.display().to_string(),
            bin("mk-upgrade").display().to_string()
        ),
    );
    let t = Instant::now();
    let (code, doc, junit) = f.rollout(&plan, &[]);
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "bounded by the host timeout"
    );
    assert_ne!(code, 0, "{doc}");
    let o = outcomes(&doc);
    assert!(
        matches!(o[0].1.as_str(), "unreachable" | "timeout"),
        "{doc}"
    );
    assert_eq!(o[1].1, "not-started");
    assert_eq!(f.kernel_of(0), "7.2.13-mkA");
    assert!(junit.contains("failures=\"1\""), "{junit}");
    // ssh ran with the options that keep a dead host from blocking forever.
    let args = std::fs::read_to_string(f.dir.path().join("ssh-args.log")).unwrap();
    for opt in [
        "BatchMode=yes",
        "ConnectTimeout=10",
        "ServerAliveInterval=5",
        "ServerAliveCountMax=3",
    ] {
        assert!(args.contains(opt), "{opt}: {args}");
    }
}

#[test]
fn an_apply_client_killed_by_a_kexec_is_followed_by_reading_the_outcome_back() {
    let f = Fleet::new(1);
    let ssh = fake_ssh(f.dir.path());
    // The "remote" mk-upgrade is this machine's, on host 0's state directory.
    let wrapper = f.dir.path().join("remote-mk-upgrade");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec env MK_AGENTD={} {} --state-dir {} \"$@\"\n",
            bin("mk-agentd").display(),
            bin("mk-upgrade").display(),
            f.hosts[0].path("state").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let remote_dir = f.dir.path().join("incoming");
    let plan = f.plan(
        &["ssh://root@kexec:2222".to_owned()],
        &format!(
            "host_timeout = \"60s\"\nssh = {:?}\nmk_upgrade = {:?}\nremote_dir = {:?}\n",
            ssh.display().to_string(),
            wrapper.display().to_string(),
            remote_dir.display().to_string()
        ),
    );
    let (code, doc, _) = f.rollout(&plan, &[]);
    assert_eq!(code, 0, "{doc}");
    let h = &doc["hosts"][0];
    assert_eq!(h["outcome"], "upgraded", "{doc}");
    assert_eq!(h["reconnected"], true, "{doc}");
    assert!(
        h["upgrade_id"].as_str().is_some_and(|s| s.len() == 32),
        "{doc}"
    );
    assert_eq!(f.kernel_of(0), "7.2.13-mkB");
    // The kernel and its signature were copied there first.
    assert!(remote_dir.join("bzImage-7.2.13-mkB").is_file());
    assert!(remote_dir.join("bzImage-7.2.13-mkB.sig").is_file());
    let args = std::fs::read_to_string(f.dir.path().join("ssh-args.log")).unwrap();
    assert!(args.contains("-p 2222 root@kexec --"), "{args}");
    f.data_intact();
}

#[test]
fn an_interrupted_rollout_resumes_where_it_stopped() {
    let f = Fleet::new(3);
    let hosts: Vec<String> = (0..3).map(|i| f.local(i)).collect();
    // Waves of one host; the bake after the canary gives time to interrupt.
    let plan = f.plan(&hosts, "canary = 1\nwaves = [1, 1]\nbake = \"20s\"\n");
    let stderr_path = f.dir.path().join("rollout-1.stderr");
    let mut child = Command::new(bin("mk-upgrade"))
        .args(["rollout", "--json", "--plan"])
        .arg(&plan)
        .env("MK_AGENTD", bin("mk-agentd"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let settled_on_b = |h: &Machine| {
        let st = h.run(&["status", "--json"]).json();
        st["upgrade_in_flight"].is_null()
            && st["instances"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["state"] == "active" && i["kernel_release"] == "7.2.13-mkB")
    };
    while !settled_on_b(&f.hosts[0]) {
        assert!(
            Instant::now() < deadline,
            "the canary never upgraded; rollout exit {:?}; its report: {}; its status: {}; rollout stderr: {}",
            child.try_wait(),
            {
                let mut out = String::new();
                if let Some(mut o) = child.stdout.take() {
                    use std::io::Read;
                    let _ = o.read_to_string(&mut out);
                }
                out
            },
            f.hosts[0].run(&["status", "--json"]).json(),
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A second pipeline is refused while this one holds the lock.
    let second = Command::new(bin("mk-upgrade"))
        .args(["rollout", "--json", "--plan"])
        .arg(&plan)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(9), "lock held: {second:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(9), "interrupted: {doc}");
    assert_eq!(doc["result"], "interrupted");
    let o = outcomes(&doc);
    assert_eq!(o[0].1, "upgraded");
    assert_eq!(
        (o[1].1.as_str(), o[2].1.as_str()),
        ("not-started", "not-started")
    );
    assert_eq!(f.kernel_of(1), "7.2.13-mkA");
    // Resume with no bake: the canary is current, the rest upgrade.
    let plan = f.plan(&hosts, "canary = 1\nwaves = [1, 1]\n");
    let (code, doc, _) = f.rollout(&plan, &[]);
    assert_eq!(code, 0, "{doc}");
    let o = outcomes(&doc);
    assert_eq!(
        o.iter().map(|(_, o)| o.as_str()).collect::<Vec<_>>(),
        ["current", "upgraded", "upgraded"],
        "{doc}"
    );
    f.data_intact();
}

#[test]
fn the_retired_canary_script_is_a_thin_wrapper_over_rollout() {
    let f = Fleet::new(2);
    let prefix = f.dir.path().join("hosts");
    std::fs::create_dir_all(&prefix).unwrap();
    for (i, h) in f.hosts.iter().enumerate() {
        std::os::unix::fs::symlink(h.path("state"), prefix.join(format!("h{i}"))).unwrap();
    }
    let list = f.dir.path().join("hosts.txt");
    std::fs::write(&list, "# fleet\nh0\n\nh1 extra words\n").unwrap();
    let summary = f.dir.path().join("summary.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/canary.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--hosts")
        .arg(&list)
        .arg("--kernel")
        .arg(f.kernel())
        .arg("--batch")
        .arg("1")
        .arg("--local-state-dir-prefix")
        .arg(&prefix)
        .arg("--summary-json")
        .arg(&summary)
        .env("MK_BIN_DIR", bin("mk-upgrade").parent().unwrap())
        .env("MK_AGENTD", bin("mk-agentd"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(doc["result"], "complete", "{doc}");
    assert_eq!(f.kernel_of(0), "7.2.13-mkB");
    assert_eq!(f.kernel_of(1), "7.2.13-mkB");
    // A retired option is refused with a pointer to the plan.
    let out = Command::new("bash")
        .arg(&script)
        .args(["--hosts", "/dev/null", "--kernel", "k", "--ssh", "ssh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mk-upgrade rollout"));
}

/// A one-shot-per-connection stand-in for Prometheus' HTTP API answering every instant
/// query with `value`; returns its URL and the request lines it saw.
fn fake_prometheus(value: &'static str) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let mut line = String::new();
            let mut r = BufReader::new(c.try_clone().unwrap());
            let _ = r.read_line(&mut line);
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) <= 2 {
                    break;
                }
            }
            seen2.lock().unwrap().push(line.trim().to_owned());
            let body = format!(
                "{{\"status\":\"success\",\"data\":{{\"resultType\":\"vector\",\"result\":[{{\"metric\":{{}},\"value\":[1796055906.1,\"{value}\"]}}]}}}}"
            );
            let _ = write!(
                c,
                "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, seen)
}

#[test]
fn a_prometheus_gate_passes_under_its_threshold_and_aborts_above_it() {
    let f = Fleet::new(2);
    let hosts: Vec<String> = (0..2).map(|i| f.local(i)).collect();
    let query = r#"sum(rate(errors_total{job="kv"}[5m]))"#;
    let plan_with = |url: &str| {
        f.plan(
            &hosts,
            &format!(
                "canary = 1\n[[gate]]\nkind = \"prometheus\"\nname = \"errors\"\nurl = {url:?}\nquery = {query:?}\nthreshold = 0.01\n"
            ),
        )
    };
    // Above the threshold after the canary: abort, canary rolled back.
    let (url, seen) = fake_prometheus("0.05");
    let md = f.dir.path().join("summary.md");
    let (code, doc, junit) = f.rollout(&plan_with(&url), &["--summary-md", md.to_str().unwrap()]);
    assert_eq!(code, 10, "{doc}");
    assert!(
        doc["reason"]
            .as_str()
            .unwrap()
            .contains("0.05 is not <= 0.01"),
        "{doc}"
    );
    assert_eq!(f.kernel_of(0), "7.2.13-mkA");
    assert!(junit.contains("0.05 is not &lt;= 0.01"), "{junit}");
    let req = seen.lock().unwrap().clone();
    assert_eq!(req.len(), 1, "{req:?}");
    assert!(
        req[0].starts_with("GET /api/v1/query?query=sum%28rate%28errors_total%7Bjob%3D%22kv%22%7D%5B5m%5D%29%29 HTTP/1."),
        "{req:?}"
    );
    let text = std::fs::read_to_string(&md).unwrap();
    assert!(
        text.contains("**aborted-rolled-back**") && text.contains("| errors | 1 | **no** |"),
        "{text}"
    );
    // Under it: complete.
    let (url, _) = fake_prometheus("0.002");
    let (code, doc, _) = f.rollout(&plan_with(&url), &[]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(f.kernel_of(0), "7.2.13-mkB");
    assert_eq!(f.kernel_of(1), "7.2.13-mkB");
    f.data_intact();
}

#[test]
fn a_bad_plan_is_refused_before_any_host_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("bzImage");
    std::fs::write(
        &kernel,
        upgrade_agent::verify::bzimage::minimal_bzimage("7.2.13-mkB"),
    )
    .unwrap();
    let cases = [
        (
            "hosts = [{ url = \"local:/nonexistent\", env = { \"A;reboot;B\" = \"x\" } }]",
            "environment name",
        ),
        (
            "hosts = [\"ssh://-oProxyCommand=x\"]",
            "invalid user or host",
        ),
        (
            "hosts = [\"local:/nonexistent\"]\n[[gate]]\nkind = \"prometheus\"\nurl = \"https://p\"\nquery = \"up\"\nthreshold = 1.0",
            "only http://",
        ),
        (
            "hosts = [\"local:/nonexistent\"]\nbake = \"200h\"",
            "7 days",
        ),
        (
            "hosts = [\"local:/nonexistent\"]\nwaves = [\"0%\"]",
            "wave size",
        ),
        (
            "hosts = [\"local:/nonexistent\"]\nsurprise = 1",
            "unknown field",
        ),
    ];
    for (toml, want) in cases {
        let plan = dir.path().join("plan.toml");
        std::fs::write(
            &plan,
            format!("kernel = {:?}\n{toml}\n", kernel.display().to_string()),
        )
        .unwrap();
        let out = Command::new(bin("mk-upgrade"))
            .args(["rollout", "--plan"])
            .arg(&plan)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{toml}: {err}");
        assert!(err.contains(want), "{toml}: {err}");
    }
}
