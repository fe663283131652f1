//! Versioned encoding: round trips, the committed schema-version-1 fixtures and their
//! migration, and hostile input.

use std::path::{Path, PathBuf};

use state_serializers::codec::{self, Capture, CaptureV1, v1};
use state_serializers::device::{BlockDevice, DeviceState, IpPrefix, PciDevice};
use state_serializers::memory::{HugepagePool, MemoryState};
use state_serializers::procfs::MountEntry;
use state_serializers::task::{FdKind, Rlimit, Sched, SchedPolicy, TaskState};
use state_serializers::{RegionDigest, SCHEMA_VERSION, StateError, decode, encode};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn v1_task() -> v1::TaskStateV1 {
    v1::TaskStateV1 {
        schema_version: 1,
        tasks: vec![v1::TaskRecordV1 {
            pid: 4242,
            ppid: 1,
            starttime: 123456,
            comm: "kv".into(),
            exe: "/usr/bin/mk-demo-kv".into(),
            cmdline: vec![
                "mk-demo-kv".into(),
                "--listen".into(),
                "127.0.0.1:7000".into(),
            ],
            environ: vec!["HOME=/var/lib/kv".into(), "RUST_LOG=info".into()],
            cwd: "/var/lib/kv".into(),
            uid: 1000,
            gid: 1000,
            rlimits: vec![Rlimit {
                resource: "nofile".into(),
                soft: Some(1024),
                hard: Some(4096),
            }],
            affinity: vec![0, 1],
            sched: Sched {
                policy: SchedPolicy::Other,
                rt_priority: 0,
                nice: 0,
            },
            cgroup: "/mk.slice/kv".into(),
            fds: vec![
                v1::FdRecordV1 {
                    fd: 0,
                    target: "/dev/null".into(),
                },
                v1::FdRecordV1 {
                    fd: 3,
                    target: "/memfd:kv-data (deleted)".into(),
                },
                v1::FdRecordV1 {
                    fd: 4,
                    target: "socket:[98765]".into(),
                },
                v1::FdRecordV1 {
                    fd: 5,
                    target: "pipe:[111]".into(),
                },
            ],
        }],
    }
}

fn v1_memory() -> v1::MemoryStateV1 {
    v1::MemoryStateV1 {
        schema_version: 1,
        regions: vec![v1::MemoryRegionV1 {
            token: "kv-data".into(),
            digest: RegionDigest::of_bytes(b"kv contents"),
        }],
        hugepages: vec![HugepagePool {
            page_size_kb: 2048,
            nr_hugepages: 8,
        }],
        vm: v1::VmSysctlsV1 {
            overcommit_memory: Some(1),
            swappiness: Some(10),
        },
    }
}

fn v1_device() -> v1::DeviceStateV1 {
    v1::DeviceStateV1 {
        schema_version: 1,
        interfaces: vec![v1::InterfaceV1 {
            index: 2,
            name: "eth0".into(),
            mac: Some("02:fc:00:00:00:01".into()),
            mtu: Some(1500),
            up: true,
            addresses: vec![IpPrefix {
                address: "10.0.0.2".parse().unwrap(),
                prefix_len: 24,
            }],
        }],
        pci: vec![PciDevice {
            address: "0000:00:03.0".into(),
            vendor: "0x1af4".into(),
            device: "0x1000".into(),
            class: "0x020000".into(),
            driver: Some("virtio-pci".into()),
        }],
        block: vec![BlockDevice {
            name: "vda".into(),
            dev: "254:0".into(),
            size_bytes: 1 << 30,
            removable: false,
            read_only: false,
        }],
        mounts: vec![MountEntry {
            mount_id: 27,
            parent_id: 1,
            dev: "254:0".into(),
            root: "/".into(),
            mount_point: "/".into(),
            mount_options: "rw,relatime".into(),
            optional: vec!["shared:1".into()],
            fstype: "ext4".into(),
            source: "/dev/vda".into(),
            super_options: "rw".into(),
        }],
    }
}

/// Writes the version-1 fixtures. Run once when version 1 was current; kept to show how
/// the committed bytes were made: `cargo test -p state-serializers --test codec -- --ignored`.
#[test]
#[ignore = "regenerates committed fixtures"]
fn generate_v1_fixtures() {
    let d = fixtures();
    std::fs::write(
        d.join("task-v1.postcard"),
        postcard::to_stdvec(&v1_task()).unwrap(),
    )
    .unwrap();
    std::fs::write(
        d.join("memory-v1.postcard"),
        postcard::to_stdvec(&v1_memory()).unwrap(),
    )
    .unwrap();
    std::fs::write(
        d.join("device-v1.postcard"),
        postcard::to_stdvec(&v1_device()).unwrap(),
    )
    .unwrap();
    let c = CaptureV1 {
        schema_version: 1,
        tasks: Some(v1_task()),
        memory: Some(v1_memory()),
        device: Some(v1_device()),
    };
    std::fs::write(
        d.join("capture-v1.json"),
        serde_json::to_string_pretty(&c).unwrap() + "\n",
    )
    .unwrap();
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap()
}

#[test]
fn v1_layout_is_frozen() {
    // The version-1 types must keep encoding exactly as the committed bytes.
    assert_eq!(
        postcard::to_stdvec(&v1_task()).unwrap(),
        read("task-v1.postcard")
    );
    assert_eq!(
        postcard::to_stdvec(&v1_memory()).unwrap(),
        read("memory-v1.postcard")
    );
    assert_eq!(
        postcard::to_stdvec(&v1_device()).unwrap(),
        read("device-v1.postcard")
    );
}

#[test]
fn v1_task_fixture_migrates() {
    let t: TaskState = decode(1, &read("task-v1.postcard")).unwrap();
    assert_eq!(t.schema_version, SCHEMA_VERSION);
    let r = &t.tasks[0];
    assert_eq!((r.pid, r.ppid, r.starttime), (4242, 1, 123456));
    assert_eq!(r.cmdline, vec!["mk-demo-kv", "--listen", "127.0.0.1:7000"]);
    assert_eq!(
        (r.creds.uid, r.creds.euid, r.creds.gid, r.creds.egid),
        (1000, 1000, 1000, 1000)
    );
    assert!(r.creds.groups.is_empty());
    assert_eq!(r.cgroup.path, "/mk.slice/kv");
    assert_eq!(
        (
            r.cgroup.cpu_max.clone(),
            r.cgroup.memory_max.clone(),
            r.cgroup.cpuset_cpus.clone()
        ),
        (None, None, None)
    );
    let kinds: Vec<&FdKind> = r.fds.iter().map(|f| &f.kind).collect();
    assert_eq!(
        kinds,
        vec![
            &FdKind::Other,
            &FdKind::Other,
            &FdKind::Socket { inode: 98765 },
            &FdKind::Pipe { inode: 111 }
        ]
    );
    assert_eq!(r.fds[1].target, "/memfd:kv-data (deleted)");
    // And re-encodes as the current version.
    let (v, bytes) = encode(&t).unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    assert_eq!(decode::<TaskState>(v, &bytes).unwrap(), t);
}

#[test]
fn v1_memory_and_device_fixtures_migrate() {
    let m: MemoryState = decode(1, &read("memory-v1.postcard")).unwrap();
    assert_eq!(m.regions[0].token, "kv-data");
    assert_eq!(m.regions[0].digest, RegionDigest::of_bytes(b"kv contents"));
    assert_eq!((m.regions[0].seals, m.regions[0].name.as_str()), (0, ""));
    assert_eq!(
        (m.vm.overcommit_memory, m.vm.swappiness),
        (Some(1), Some(10))
    );
    assert_eq!((m.vm.overcommit_ratio, m.vm.max_map_count), (None, None));
    let d: DeviceState = decode(1, &read("device-v1.postcard")).unwrap();
    assert_eq!(d.interfaces[0].name, "eth0");
    assert_eq!(d.interfaces[0].kind, None);
    assert!(d.routes.is_empty());
    assert_eq!(d.pci[0].driver.as_deref(), Some("virtio-pci"));
    assert_eq!(d.mounts[0].fstype, "ext4");
}

#[test]
fn v1_json_capture_migrates_and_equals_postcard_migration() {
    let text = std::fs::read_to_string(fixtures().join("capture-v1.json")).unwrap();
    let c = codec::from_json(&text).unwrap();
    assert_eq!(c.schema_version, SCHEMA_VERSION);
    assert_eq!(
        c.tasks.unwrap(),
        decode::<TaskState>(1, &read("task-v1.postcard")).unwrap()
    );
    assert_eq!(
        c.memory.unwrap(),
        decode::<MemoryState>(1, &read("memory-v1.postcard")).unwrap()
    );
    assert_eq!(
        c.device.unwrap(),
        decode::<DeviceState>(1, &read("device-v1.postcard")).unwrap()
    );
}

#[test]
fn current_json_round_trip() {
    let text = std::fs::read_to_string(fixtures().join("capture-v1.json")).unwrap();
    let c = codec::from_json(&text).unwrap();
    let again = codec::from_json(&codec::to_json(&c).unwrap()).unwrap();
    assert_eq!(again, c);
}

#[test]
fn refusals_are_typed() {
    let t: TaskState = decode(1, &read("task-v1.postcard")).unwrap();
    let (_, bytes) = encode(&t).unwrap();
    let e = decode::<TaskState>(3, &bytes).unwrap_err();
    assert!(
        matches!(
            e,
            StateError::UnsupportedVersion {
                found: 3,
                min: 1,
                max: 2,
                ..
            }
        ),
        "{e}"
    );
    let e = decode::<TaskState>(0, &bytes).unwrap_err();
    assert!(
        matches!(e, StateError::UnsupportedVersion { found: 0, .. }),
        "{e}"
    );
    let mut long = bytes.clone();
    long.push(0);
    let e = decode::<TaskState>(2, &long).unwrap_err();
    assert!(e.to_string().contains("1 trailing byte"), "{e}");
    for cut in 0..bytes.len() {
        assert!(decode::<TaskState>(2, &bytes[..cut]).is_err(), "cut {cut}");
    }
    // A v1 body claiming another version inside.
    let mut odd = v1_task();
    odd.schema_version = 2;
    let e = decode::<TaskState>(1, &postcard::to_stdvec(&odd).unwrap()).unwrap_err();
    assert!(e.to_string().contains("records schema version 2"), "{e}");
    // A v2 body claiming another version inside.
    let mut wrong = t.clone();
    wrong.schema_version = 7;
    assert!(matches!(encode(&wrong), Err(StateError::Encode { .. })));
    let e = codec::from_json("{\"schema_version\": 9}").unwrap_err();
    assert!(
        matches!(e, StateError::UnsupportedVersion { found: 9, .. }),
        "{e}"
    );
    let e = codec::from_json("not json").unwrap_err();
    assert!(matches!(e, StateError::Decode { .. }), "{e}");
    let e = codec::from_json("{\"schema_version\": 2, \"tasks\": {\"schema_version\": 1, \"tasks\": []}, \"memory\": null, \"device\": null}").unwrap_err();
    assert!(e.to_string().contains("tasks.schema_version is 1"), "{e}");
    let e = decode::<TaskState>(2, &vec![0u8; codec::MAX_ENCODED_LEN + 1]).unwrap_err();
    assert!(e.to_string().contains("limit"), "{e}");
}

#[test]
fn capture_type_round_trips_through_json() {
    let c = Capture {
        schema_version: SCHEMA_VERSION,
        tasks: None,
        memory: None,
        device: None,
    };
    assert_eq!(codec::from_json(&codec::to_json(&c).unwrap()).unwrap(), c);
}

proptest::proptest! {
    #[test]
    fn hostile_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512), v in 0u16..4) {
        let _ = decode::<TaskState>(v, &bytes);
        let _ = decode::<MemoryState>(v, &bytes);
        let _ = decode::<DeviceState>(v, &bytes);
    }

    #[test]
    fn bit_flips_never_panic(pos in 0usize..4096, bit in 0u8..8) {
        let mut b = read("task-v1.postcard");
        let i = pos % b.len();
        b[i] ^= 1 << bit;
        let _ = decode::<TaskState>(1, &b);
    }
}
