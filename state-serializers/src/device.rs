//! Device state: network interfaces, addresses and routes (over rtnetlink), PCI devices
//! and their drivers, block devices (sysfs) and the mount table.
//!
//! Netlink talks to the network namespace of the calling thread; nothing here sends
//! packets. Restore changes only the items of the given state (link up/down, MTU,
//! missing addresses, missing routes) and reports what it could not apply.

use std::fs;
use std::net::IpAddr;
use std::path::Path;

use futures_util::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StateError};
use crate::procfs::{self, MountEntry, under};
use crate::{Policy, Report, SCHEMA_VERSION};

/// Device state of a host (schema version [`SCHEMA_VERSION`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub schema_version: u16,
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub pci: Vec<PciDevice>,
    pub block: Vec<BlockDevice>,
    pub mounts: Vec<MountEntry>,
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    /// Link-layer address as `aa:bb:..`, `None` for links without one.
    pub mac: Option<String>,
    pub mtu: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Link kind (`veth`, `bridge`, ...), `None` for physical devices.
    pub kind: Option<String>,
    /// IPv4 and IPv6 addresses.
    pub addresses: Vec<IpPrefix>,
}

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IpPrefix {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl std::fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

/// A unicast route of the main or another table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination prefix; `None` for the default route. `ipv6` tells the family.
    pub destination: Option<IpPrefix>,
    pub ipv6: bool,
    pub gateway: Option<IpAddr>,
    /// Output interface name.
    pub interface: Option<String>,
    pub table: u32,
    /// `RTPROT_*` (2 = kernel, 3 = boot, 4 = static, ...).
    pub protocol: u8,
    /// `RT_SCOPE_*` (0 = universe, 253 = link, 254 = host).
    pub scope: u8,
    pub priority: Option<u32>,
}

/// A PCI device and the driver bound to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDevice {
    /// `domain:bus:dev.fn`.
    pub address: String,
    pub vendor: String,
    pub device: String,
    pub class: String,
    /// Bound driver name, `None` when unbound.
    pub driver: Option<String>,
}

/// A block device of `/sys/block`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDevice {
    pub name: String,
    /// `major:minor`.
    pub dev: String,
    /// Size in bytes (`size` is in 512-byte sectors).
    pub size_bytes: u64,
    pub removable: bool,
    pub read_only: bool,
}

fn nl_err(what: impl Into<String>, e: impl std::fmt::Display) -> StateError {
    StateError::Netlink {
        what: what.into(),
        detail: e.to_string(),
    }
}

/// Runs `f` with a fresh rtnetlink connection on a current-thread runtime (in the
/// calling thread's network namespace).
pub fn with_netlink<T>(f: impl AsyncFnOnce(&Handle) -> Result<T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| StateError::Sys {
            call: "tokio runtime",
            source: e,
        })?;
    rt.block_on(async {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| nl_err("open NETLINK_ROUTE socket", e))?;
        let task = tokio::spawn(conn);
        let r = f(&handle).await;
        task.abort();
        r
    })
}

fn mac_string(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn link_to_interface(m: &LinkMessage) -> Interface {
    let mut i = Interface {
        index: m.header.index,
        name: String::new(),
        mac: None,
        mtu: None,
        up: m.header.flags.contains(LinkFlags::Up),
        kind: None,
        addresses: Vec::new(),
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => i.name.clone_from(n),
            LinkAttribute::Address(b) if !b.is_empty() => i.mac = Some(mac_string(b)),
            LinkAttribute::Mtu(v) => i.mtu = Some(*v),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        i.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    i
}

fn address_of(m: &AddressMessage) -> Option<IpPrefix> {
    let mut addr = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => {
                return Some(IpPrefix {
                    address: *ip,
                    prefix_len: m.header.prefix_len,
                });
            }
            AddressAttribute::Address(ip) => addr = Some(*ip),
            _ => {}
        }
    }
    addr.map(|address| IpPrefix {
        address,
        prefix_len: m.header.prefix_len,
    })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some((*v).into()),
        RouteAddress::Inet6(v) => Some((*v).into()),
        _ => None,
    }
}

fn route_of(m: &RouteMessage, names: &[(u32, String)]) -> Option<Route> {
    let ipv6 = match m.header.address_family {
        netlink_packet_route::AddressFamily::Inet => false,
        netlink_packet_route::AddressFamily::Inet6 => true,
        _ => return None,
    };
    // Unicast routes only; local/broadcast/multicast ones are derived by the kernel.
    if u8::from(m.header.kind) != 1 {
        return None;
    }
    let mut r = Route {
        destination: None,
        ipv6,
        gateway: None,
        interface: None,
        table: u32::from(m.header.table),
        protocol: u8::from(m.header.protocol),
        scope: u8::from(m.header.scope),
        priority: None,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => {
                r.destination = route_ip(d).map(|address| IpPrefix {
                    address,
                    prefix_len: m.header.destination_prefix_length,
                });
            }
            RouteAttribute::Gateway(g) => r.gateway = route_ip(g),
            RouteAttribute::Oif(i) => {
                r.interface = names.iter().find(|(x, _)| x == i).map(|(_, n)| n.clone());
            }
            RouteAttribute::Priority(p) => r.priority = Some(*p),
            RouteAttribute::Table(t) => r.table = *t,
            _ => {}
        }
    }
    Some(r)
}

async fn get_links(h: &Handle) -> Result<Vec<Interface>> {
    let mut links: Vec<Interface> = h
        .link()
        .get()
        .execute()
        .map_ok(|m| link_to_interface(&m))
        .try_collect()
        .await
        .map_err(|e| nl_err("dump links", e))?;
    let addrs: Vec<AddressMessage> = h
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_err("dump addresses", e))?;
    for a in &addrs {
        if let (Some(p), Some(l)) = (
            address_of(a),
            links.iter_mut().find(|l| l.index == a.header.index),
        ) {
            l.addresses.push(p);
        }
    }
    for l in &mut links {
        l.addresses.sort();
    }
    links.sort_by_key(|l| l.index);
    Ok(links)
}

async fn get_routes(h: &Handle, links: &[Interface]) -> Result<Vec<Route>> {
    let names: Vec<(u32, String)> = links.iter().map(|l| (l.index, l.name.clone())).collect();
    let mut out = Vec::new();
    for msg in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let mut req = h.route().get(msg);
        // Dump every table, not only main.
        req.message_mut().header.table = 0;
        let msgs: Vec<RouteMessage> = req
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("dump routes", e))?;
        out.extend(msgs.iter().filter_map(|m| route_of(m, &names)));
    }
    Ok(out)
}

/// Reads interfaces (with addresses) and routes over netlink.
pub fn capture_network() -> Result<(Vec<Interface>, Vec<Route>)> {
    with_netlink(async |h: &Handle| {
        let links = get_links(h).await?;
        let routes = get_routes(h, &links).await?;
        Ok((links, routes))
    })
}

fn sysfs_attr(path: &Path) -> Result<String> {
    Ok(procfs::read_text(path)?.trim().to_owned())
}

/// Reads `<root>/sys/bus/pci/devices`. A host without PCI has none.
pub fn capture_pci(root: &Path) -> Result<Vec<PciDevice>> {
    let dir = under(root, "/sys/bus/pci/devices");
    let mut out = Vec::new();
    for ent in procfs::dir_entries(&dir)? {
        let p = ent.path();
        let driver = match fs::read_link(p.join("driver")) {
            Ok(t) => t.file_name().map(|n| n.to_string_lossy().into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(StateError::io(&p.join("driver"), e)),
        };
        out.push(PciDevice {
            address: ent.file_name().to_string_lossy().into_owned(),
            vendor: sysfs_attr(&p.join("vendor"))?,
            device: sysfs_attr(&p.join("device"))?,
            class: sysfs_attr(&p.join("class"))?,
            driver,
        });
    }
    out.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(out)
}

/// Reads `<root>/sys/block`.
pub fn capture_block(root: &Path) -> Result<Vec<BlockDevice>> {
    let dir = under(root, "/sys/block");
    let mut out = Vec::new();
    for ent in procfs::dir_entries(&dir)? {
        let p = ent.path();
        let flag = |f: &str| -> Result<bool> {
            let path = p.join(f);
            Ok(procfs::parse_num::<u8>(&path, f, &sysfs_attr(&path)?)? != 0)
        };
        let size_path = p.join("size");
        let sectors: u64 = procfs::parse_num(&size_path, "size", &sysfs_attr(&size_path)?)?;
        out.push(BlockDevice {
            name: ent.file_name().to_string_lossy().into_owned(),
            dev: sysfs_attr(&p.join("dev"))?,
            size_bytes: sectors
                .checked_mul(512)
                .ok_or_else(|| StateError::malformed(&size_path, "size overflows u64 bytes"))?,
            removable: flag("removable")?,
            read_only: flag("ro")?,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Captures sysfs/procfs device state under `root`; interfaces and routes come from
/// netlink when `network` is true (they belong to the caller's network namespace, not to
/// `root`).
pub fn capture_device(root: &Path, network: bool) -> Result<DeviceState> {
    let (interfaces, routes) = if network {
        capture_network()?
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(DeviceState {
        schema_version: SCHEMA_VERSION,
        interfaces,
        routes,
        pci: capture_pci(root)?,
        block: capture_block(root)?,
        mounts: procfs::read_mountinfo(root)?,
    })
}

/// IPv6 link-local addresses (`fe80::/10`): the kernel derives them from the link.
fn is_kernel_address(a: &IpPrefix) -> bool {
    matches!(a.address, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// Routes the kernel creates by itself (from addresses, link-local, ...): not re-added.
fn is_kernel_route(r: &Route) -> bool {
    r.protocol == u8::from(RouteProtocol::Kernel) || r.table == 255
}

/// Applies the interface configuration and routes of `want` in the caller's network
/// namespace: link up/down, MTU, addresses absent from the link, routes absent from the
/// table (routes the kernel derives are skipped). Interfaces are matched by name.
/// Absent interfaces and refused requests are reported per `policy`.
pub fn restore_network(want: &DeviceState, policy: Policy) -> Result<Report> {
    let report = with_netlink(async |h: &Handle| {
        let mut report = Report::default();
        let have = get_links(h).await?;
        if policy == Policy::Strict {
            // Refuse before changing anything when an interface is absent.
            let absent: Vec<crate::Warning> = want
                .interfaces
                .iter()
                .filter(|w| !have.iter().any(|c| c.name == w.name))
                .map(|w| crate::Warning {
                    item: format!("interface {}", w.name),
                    reason: "no such interface in this kernel".into(),
                })
                .collect();
            if !absent.is_empty() {
                return Err(StateError::NotApplied {
                    not_applied: absent,
                });
            }
        }
        for w in &want.interfaces {
            let Some(cur) = have.iter().find(|c| c.name == w.name) else {
                report.not_applied(
                    format!("interface {}", w.name),
                    "no such interface in this kernel",
                );
                continue;
            };
            if let Some(mtu) = w.mtu.filter(|m| Some(*m) != cur.mtu) {
                let item = format!("{} mtu {mtu}", w.name);
                match h
                    .link()
                    .set(LinkUnspec::new_with_index(cur.index).mtu(mtu).build())
                    .execute()
                    .await
                {
                    Ok(()) => report.applied(item),
                    Err(e) => report.not_applied(item, e.to_string()),
                }
            }
            for a in w
                .addresses
                .iter()
                .filter(|a| !cur.addresses.contains(a) && !is_kernel_address(a))
            {
                let item = format!("{} address {a}", w.name);
                match h
                    .address()
                    .add(cur.index, a.address, a.prefix_len)
                    .execute()
                    .await
                {
                    Ok(()) => report.applied(item),
                    Err(e) => report.not_applied(item, e.to_string()),
                }
            }
            if w.up != cur.up {
                let item = format!("{} {}", w.name, if w.up { "up" } else { "down" });
                let b = LinkUnspec::new_with_index(cur.index);
                let b = if w.up { b.up() } else { b.down() };
                match h.link().set(b.build()).execute().await {
                    Ok(()) => report.applied(item),
                    Err(e) => report.not_applied(item, e.to_string()),
                }
            }
        }
        let links = get_links(h).await?;
        let have_routes = get_routes(h, &links).await?;
        for r in want.routes.iter().filter(|r| !is_kernel_route(r)) {
            let item = format!(
                "route {} via {} dev {} table {}",
                r.destination
                    .map_or_else(|| "default".to_owned(), |d| d.to_string()),
                r.gateway.map_or_else(|| "-".to_owned(), |g| g.to_string()),
                r.interface.as_deref().unwrap_or("-"),
                r.table
            );
            if have_routes.iter().any(|h| {
                h.destination == r.destination
                    && h.gateway == r.gateway
                    && h.interface == r.interface
                    && h.table == r.table
                    && h.ipv6 == r.ipv6
            }) {
                report.applied(item);
                continue;
            }
            match build_route(r, &links) {
                Ok(msg) => match h.route().add(msg).execute().await {
                    Ok(()) => report.applied(item),
                    Err(e) => report.not_applied(item, e.to_string()),
                },
                Err(reason) => report.not_applied(item, reason.to_string()),
            }
        }
        Ok(report)
    })?;
    report.finish(policy)
}

/// Why a captured route cannot be expressed as a netlink route message here.
#[derive(Debug, thiserror::Error)]
enum RouteBuildError {
    /// rtnetlink refused the destination or gateway (its error type is not exported by
    /// name, hence the box).
    #[error("{0}")]
    Invalid(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The route's output interface does not exist in this kernel.
    #[error("output interface {0} is absent in this kernel")]
    NoInterface(String),
}

fn invalid_route(e: impl std::error::Error + Send + Sync + 'static) -> RouteBuildError {
    RouteBuildError::Invalid(Box::new(e))
}

fn build_route(
    r: &Route,
    links: &[Interface],
) -> std::result::Result<RouteMessage, RouteBuildError> {
    let unspecified: IpAddr = if r.ipv6 {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    let dst = r.destination.unwrap_or(IpPrefix {
        address: unspecified,
        prefix_len: 0,
    });
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.address, dst.prefix_len)
        .map_err(invalid_route)?
        .table_id(r.table)
        .protocol(RouteProtocol::from(r.protocol))
        .scope(netlink_packet_route::route::RouteScope::from(r.scope));
    if let Some(g) = r.gateway {
        b = b.gateway(g).map_err(invalid_route)?;
    }
    if let Some(name) = &r.interface {
        let idx = links
            .iter()
            .find(|l| &l.name == name)
            .ok_or_else(|| RouteBuildError::NoInterface(name.clone()))?
            .index;
        b = b.output_interface(idx);
    }
    if let Some(p) = r.priority {
        b = b.priority(p);
    }
    Ok(b.build())
}

#[cfg(test)]
mod route_tests {
    use super::*;

    fn route() -> Route {
        Route {
            destination: Some(IpPrefix {
                address: "10.1.0.0".parse().unwrap(),
                prefix_len: 16,
            }),
            ipv6: false,
            gateway: None,
            interface: None,
            table: 254,
            protocol: 4,
            scope: 0,
            priority: None,
        }
    }

    #[test]
    fn unbuildable_routes_say_why_with_a_typed_error() {
        assert!(build_route(&route(), &[]).is_ok());
        let mut r = route();
        r.interface = Some("veth-gone".into());
        let e = build_route(&r, &[]).unwrap_err();
        assert!(matches!(&e, RouteBuildError::NoInterface(n) if n == "veth-gone"));
        assert!(e.to_string().contains("absent in this kernel"), "{e}");
        // An IPv4 prefix longer than 32 bits: rtnetlink's refusal is kept as the source.
        let mut r = route();
        r.destination = Some(IpPrefix {
            address: "10.1.0.0".parse().unwrap(),
            prefix_len: 40,
        });
        let e = build_route(&r, &[]).unwrap_err();
        assert!(matches!(e, RouteBuildError::Invalid(_)), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
