//! Device state over netlink. Reading is tested on this host (read only). Restoring is
//! tested only inside a private network namespace with a veth pair, created by the test
//! when running as root; the host's interfaces are never touched and no packet is sent.
//! Without root, or where the namespace or veth pair cannot be made, the restore test checks
//! only the policy logic and reports `SKIP <name>: <reason>`, counted as ignored.
//!
//! Own harness (`harness = false`, libtest-mimic) so that a test whose requirement this host
//! lacks ends as "ignored" in cargo's summary, never as "passed".

use std::net::IpAddr;

use libtest_mimic::{Arguments, Trial};
use rtnetlink::LinkVeth;
use state_serializers::device::{self, DeviceState, Interface, IpPrefix, Route};
use state_serializers::{Policy, SCHEMA_VERSION, StateError};

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        mk_test_support::plain("reads_this_hosts_interfaces", reads_this_hosts_interfaces),
        skippable("restore_in_private_namespace", restore_in_private_namespace),
    ];
    libtest_mimic::run(&args, trials).exit();
}

/// How a test that needs something from the host ended.
enum Run {
    /// Every check ran.
    Done,
    /// The host lacks what the test needs: reported as `SKIP <name>: <reason>` and counted
    /// as ignored, never as passed.
    Skip(String),
}

fn skippable(name: &'static str, test: fn() -> Run) -> Trial {
    mk_test_support::skippable(name, move || match test() {
        Run::Done => Ok(()),
        Run::Skip(reason) => Err(reason),
    })
}

fn reads_this_hosts_interfaces() {
    let (links, routes) = device::capture_network().unwrap();
    let lo = links.iter().find(|l| l.name == "lo").expect("loopback");
    assert_eq!(lo.index, 1);
    assert!(lo.up);
    assert!(
        lo.addresses.contains(&IpPrefix {
            address: "127.0.0.1".parse().unwrap(),
            prefix_len: 8
        }),
        "{lo:?}"
    );
    let mut sys: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    sys.sort();
    let mut nl: Vec<String> = links.iter().map(|l| l.name.clone()).collect();
    nl.sort();
    assert_eq!(nl, sys);
    for l in &links {
        let mtu: u32 = std::fs::read_to_string(format!("/sys/class/net/{}/mtu", l.name))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(l.mtu, Some(mtu), "{}", l.name);
    }
    // Every route's interface is one of the links.
    for r in &routes {
        if let Some(i) = &r.interface {
            assert!(links.iter().any(|l| &l.name == i), "{r:?}");
        }
    }
    let d = device::capture_device(std::path::Path::new("/"), true).unwrap();
    assert_eq!(d.interfaces.len(), links.len());
    assert!(d.mounts.iter().any(|m| m.mount_point == "/"));
}

fn want_state() -> DeviceState {
    let p = |a: &str, l: u8| IpPrefix {
        address: a.parse::<IpAddr>().unwrap(),
        prefix_len: l,
    };
    DeviceState {
        schema_version: SCHEMA_VERSION,
        interfaces: vec![
            Interface {
                index: 0,
                name: "lo".into(),
                mac: None,
                mtu: None,
                up: true,
                kind: None,
                addresses: vec![],
            },
            Interface {
                index: 0,
                name: "mk0".into(),
                mac: None,
                mtu: Some(1400),
                up: true,
                kind: Some("veth".into()),
                addresses: vec![p("10.77.0.1", 24), p("fd00:77::1", 64), p("fe80::dead", 64)],
            },
            Interface {
                index: 0,
                name: "mk1".into(),
                mac: None,
                mtu: None,
                up: true,
                kind: None,
                addresses: vec![],
            },
        ],
        routes: vec![Route {
            destination: Some(p("10.78.0.0", 24)),
            ipv6: false,
            gateway: Some("10.77.0.2".parse().unwrap()),
            interface: Some("mk0".into()),
            table: 254,
            protocol: 4,
            scope: 0,
            priority: None,
        }],
        pci: vec![],
        block: vec![],
        mounts: vec![],
    }
}

fn restore_in_private_namespace() -> Run {
    if state_serializers::sys::euid() != 0 {
        // Still check the policy logic that needs no namespace: a strict restore of an
        // absent interface is refused before anything is changed.
        let mut w = want_state();
        w.interfaces = vec![Interface {
            index: 0,
            name: "mk-absent-9".into(),
            mac: None,
            mtu: Some(1),
            up: false,
            kind: None,
            addresses: vec![],
        }];
        w.routes.clear();
        let e = device::restore_network(&w, Policy::Strict).unwrap_err();
        assert!(matches!(e, StateError::NotApplied { .. }), "{e}");
        return Run::Skip(
            "needs root to create a network namespace (checked only that a strict restore of \
             an absent interface is refused)"
                .into(),
        );
    }
    std::thread::spawn(|| {
        // unshare(CLONE_NEWNET) moves only this thread into a new, empty namespace.
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            return Run::Skip(format!("unshare(CLONE_NEWNET): {e}"));
        }
        let created = device::with_netlink(async |h| {
            h.link()
                .add(LinkVeth::new("mk0", "mk1").build())
                .execute()
                .await
                .map_err(|e| StateError::Netlink {
                    what: "add veth".into(),
                    detail: e.to_string(),
                })
        });
        if let Err(e) = created {
            return Run::Skip(format!("cannot create a veth pair: {e}"));
        }
        let (before, _) = device::capture_network().unwrap();
        let mk0 = before.iter().find(|l| l.name == "mk0").unwrap();
        assert!(!mk0.up);
        assert_eq!(mk0.kind.as_deref(), Some("veth"));

        let mut want = want_state();
        want.interfaces.push(Interface {
            index: 0,
            name: "absent0".into(),
            mac: None,
            mtu: Some(9000),
            up: true,
            kind: None,
            addresses: vec![],
        });
        // Strict: refused before anything changes.
        let e = device::restore_network(&want, Policy::Strict).unwrap_err();
        let StateError::NotApplied { not_applied } = e else {
            panic!("{e}")
        };
        assert_eq!(not_applied.len(), 1);
        assert_eq!(not_applied[0].item, "interface absent0");
        let (unchanged, _) = device::capture_network().unwrap();
        assert_eq!(unchanged, before);

        // Best effort: everything else applied, the absent device reported.
        let rep = device::restore_network(&want, Policy::BestEffort).unwrap();
        let items: Vec<&str> = rep.not_applied.iter().map(|w| w.item.as_str()).collect();
        assert_eq!(items, vec!["interface absent0"], "{rep:?}");
        for a in [
            "mk0 mtu 1400",
            "mk0 address 10.77.0.1/24",
            "mk0 address fd00:77::1/64",
            "mk0 up",
            "lo up",
            "mk1 up",
        ] {
            assert!(
                rep.applied.iter().any(|x| x == a),
                "{a} not in {:?}",
                rep.applied
            );
        }
        let (links, routes) = device::capture_network().unwrap();
        let mk0 = links.iter().find(|l| l.name == "mk0").unwrap();
        assert_eq!(mk0.mtu, Some(1400));
        assert!(mk0.up);
        for a in &want.interfaces[1].addresses[..2] {
            assert!(mk0.addresses.contains(a), "{a} missing from {mk0:?}");
        }
        // Link-local addresses are the kernel's to derive, never added.
        assert!(
            !rep.applied.iter().any(|x| x.contains("fe80")),
            "{:?}",
            rep.applied
        );
        assert!(!mk0.addresses.contains(&want.interfaces[1].addresses[2]));
        assert!(links.iter().find(|l| l.name == "lo").unwrap().up);
        assert!(
            routes
                .iter()
                .any(|r| r.destination == want.routes[0].destination
                    && r.gateway == want.routes[0].gateway
                    && r.interface.as_deref() == Some("mk0")),
            "{routes:?}"
        );

        // Idempotent: a second restore changes nothing and applies nothing new.
        want.interfaces.pop();
        let rep = device::restore_network(&want, Policy::Strict).unwrap();
        assert!(rep.not_applied.is_empty());
        assert_eq!(
            rep.applied,
            vec!["route 10.78.0.0/24 via 10.77.0.2 dev mk0 table 254"]
        );

        // A route over an interface the kernel lacks is reported, not panicked on.
        let mut bad = want.clone();
        bad.interfaces.clear();
        bad.routes[0].interface = Some("gone0".into());
        let rep = device::restore_network(&bad, Policy::BestEffort).unwrap();
        assert!(rep.not_applied[0].reason.contains("gone0"), "{rep:?}");
        Run::Done
    })
    .join()
    .unwrap()
}
