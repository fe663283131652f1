//! The multikernel blobs the platform writes, built exactly as kerf 0.4.0 builds them (its
//! `dtc/extractor.py` and `dtc/overlay.py`, libfdt `FdtSw` + `fdt_pack`, see [`super::fdt`])
//! so that for the same request the bytes are identical; `tests/multikernel/kerf-compat.sh`
//! checks that against kerf itself. `mk-upgrade multikernel overlay …` writes these same
//! blobs to files, through this code, for operators to audit.
//!
//! | blob | shape |
//! |---|---|
//! | baseline (`device_tree`) | `/ { compatible = "linux,multikernel-host"; resources { cpus = <u64…>; memory@I { size = <u64>; [numa-node-id = <u32>;] }; }; }` |
//! | create | `fragment@0 { target-path = "/instances"; __overlay__ { instance-create { instance-name; [id = <u32>;] resources { cpus = <u64…>; memory-bytes = <u64>; cpu-affinity = "compact"; }; }; }; }` and, with devices, `fragment@1 { target-path = "/instances/NAME"; __overlay__ { device-add { pci@I { pci-id = "DDDD:BB:SS.F"; }; }; }; }` |
//! | update | `fragment@0 { target-path = "/instances/NAME"; __overlay__ { memory-remove { memory@I { reg = <base size>; } } memory-add { memory@0 { reg = <base size>; } } cpu-remove { cpu@N { reg = <u64>; } } cpu-add { … } device-remove { pci@I … } device-add { … } }; }` |
//! | delete | `fragment@0 { target-path = "/instances"; __overlay__ { instance-remove { instance-name; }; }; }` |
//!
//! Every overlay root carries `compatible = "linux,multikernel-overlay"`. The resource move
//! of a blue/green upgrade ([`transfer`]) is the platform's own shape: two update fragments
//! in one transaction (`/instances/OLD` gives up, then `/instances/NEW` takes the same cpus
//! and ranges), which the kernel applies in fragment order; kerf has no such command, so
//! its bytes are checked against kerf's fragment layout only.

use super::fdt::Writer;

/// `compatible` of the baseline.
pub const HOST_COMPATIBLE: &str = "linux,multikernel-host";
/// `compatible` of every overlay.
pub const OVERLAY_COMPATIBLE: &str = "linux,multikernel-overlay";
/// kerf's default cpu placement policy, written into every `instance-create`.
pub const CPU_AFFINITY_COMPACT: &str = "compact";
/// The page size memory sizes must be a multiple of.
pub const PAGE_SIZE: u64 = 4096;
/// Longest instance name accepted (the kernel names a kernfs directory after it).
pub const MAX_NAME_LEN: usize = 64;
/// Most cpus one request may name.
pub const MAX_CPUS: usize = 4096;
/// Highest cpu (APIC) id accepted.
pub const MAX_CPU_ID: u32 = 1 << 20;

/// A request that cannot become a blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("invalid cpu specification {spec:?}: {why} (use ids and ranges: \"2-3,5\")")]
    Cpus { spec: String, why: String },
    #[error(
        "invalid memory size {spec:?}: {why} (use bytes or KB/MB/GB/TB as kerf does, where \
         256MB = 256 MiB, or KiB/MiB/GiB/TiB)"
    )]
    Size { spec: String, why: String },
    #[error(
        "invalid instance name {name:?}: {why} (1-{MAX_NAME_LEN} characters of [A-Za-z0-9._-])"
    )]
    Name { name: String, why: &'static str },
    #[error("invalid instance id {0}: spawned instances use 1..=511")]
    Id(u32),
    #[error("invalid PCI address {0:?}: expected DDDD:BB:SS.F (e.g. 0000:65:00.0)")]
    Pci(String),
}

/// Parses a cpu list as kerf does (`"4"`, `"4-7"`, `"4-7,10,12-13"`): ids sorted and
/// deduplicated, at least one.
pub fn parse_cpus(spec: &str) -> Result<Vec<u32>, SpecError> {
    let err = |why: String| SpecError::Cpus {
        spec: spec.to_owned(),
        why,
    };
    let mut cpus = std::collections::BTreeSet::new();
    for part in spec.trim().split(',').map(str::trim) {
        let id = |s: &str| -> Result<u32, SpecError> {
            let v: u32 = s
                .trim()
                .parse()
                .map_err(|_| err(format!("{s:?} is not a cpu id")))?;
            if v > MAX_CPU_ID {
                return Err(err(format!("cpu id {v} is above {MAX_CPU_ID}")));
            }
            Ok(v)
        };
        if let Some((a, b)) = part.split_once('-') {
            let (a, b) = (id(a)?, id(b)?);
            if a > b {
                return Err(err(format!("range {a}-{b} runs backwards")));
            }
            if (b - a) as usize >= MAX_CPUS {
                return Err(err(format!("more than {MAX_CPUS} cpus")));
            }
            cpus.extend(a..=b);
        } else {
            cpus.insert(id(part)?);
        }
        if cpus.len() > MAX_CPUS {
            return Err(err(format!("more than {MAX_CPUS} cpus")));
        }
    }
    if cpus.is_empty() {
        return Err(err("no cpu".into()));
    }
    Ok(cpus.into_iter().collect())
}

/// Formats cpus back as ranges (`2-3,5`).
pub fn format_cpus(cpus: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// Parses a size: kerf's spellings (`2GB`, `2048MB`, `512KB`, `1TB` in powers of 1024,
/// case-insensitive, decimals allowed as in `1.5GB`, or plain bytes) and `KiB`/`MiB`/`GiB`/
/// `TiB`. Non-zero and a multiple of the page size (kerf refuses the same).
pub fn parse_size(spec: &str) -> Result<u64, SpecError> {
    let err = |why: &str| SpecError::Size {
        spec: spec.to_owned(),
        why: why.to_owned(),
    };
    let s = spec.trim().to_ascii_uppercase();
    let units: [(&str, u64); 8] = [
        ("KIB", 1 << 10),
        ("MIB", 1 << 20),
        ("GIB", 1 << 30),
        ("TIB", 1 << 40),
        ("KB", 1 << 10),
        ("MB", 1 << 20),
        ("GB", 1 << 30),
        ("TB", 1 << 40),
    ];
    let bytes = match units.iter().find(|(u, _)| s.ends_with(u)) {
        Some((u, mult)) => {
            let num = s[..s.len() - u.len()].trim();
            if let Ok(v) = num.parse::<u64>() {
                v.checked_mul(*mult).ok_or_else(|| err("too large"))?
            } else {
                // kerf: int(float(value) * multiplier).
                let v: f64 = num
                    .parse()
                    .map_err(|_| err("expected a number before the unit"))?;
                if !v.is_finite() || v < 0.0 || v * (*mult as f64) >= u64::MAX as f64 {
                    return Err(err("out of range"));
                }
                (v * (*mult as f64)) as u64
            }
        }
        None => s
            .parse::<u64>()
            .map_err(|_| err("expected bytes or a unit"))?,
    };
    if bytes == 0 {
        return Err(err("must be greater than zero"));
    }
    if bytes % PAGE_SIZE != 0 {
        return Err(err("must be a multiple of 4096 bytes"));
    }
    Ok(bytes)
}

/// Parses a pool memory request as `kerf init --memory` does: `SIZE` (on `default_node`,
/// the NUMA node of the pool's first cpu, as kerf resolves it) or `SIZE@N,SIZE@M` per node
/// (the forms are not mixed; a node appears once), in the order given.
pub fn parse_pool_memory(
    spec: &str,
    default_node: u32,
) -> Result<Vec<(u64, Option<u32>)>, SpecError> {
    let err = |why: &str| SpecError::Size {
        spec: spec.to_owned(),
        why: why.to_owned(),
    };
    let parts: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() {
        return Err(err("empty memory specification"));
    }
    let pinned = parts.iter().filter(|p| p.contains('@')).count();
    if pinned != 0 && pinned != parts.len() {
        return Err(err("SIZE and SIZE@NODE cannot be mixed"));
    }
    let mut out: Vec<(u64, Option<u32>)> = Vec::new();
    for p in parts {
        let (size, node) = match p.split_once('@') {
            Some((s, n)) => (
                s,
                n.trim()
                    .parse::<u32>()
                    .map_err(|_| err("invalid NUMA node after @"))?,
            ),
            None => (p, default_node),
        };
        if out.iter().any(|(_, n)| *n == Some(node)) {
            return Err(err("a NUMA node is named twice"));
        }
        out.push((parse_size(size)?, Some(node)));
    }
    if out.len() > 1 && pinned == 0 {
        return Err(err("several sizes need a node each (SIZE@N)"));
    }
    Ok(out)
}

/// The NUMA node of `cpu` (`<root>/sys/devices/system/cpu/cpuN/nodeM`), 0 when unknown.
pub fn numa_node_of_cpu(root: &std::path::Path, cpu: u32) -> u32 {
    std::fs::read_dir(root.join(format!("sys/devices/system/cpu/cpu{cpu}")))
        .ok()
        .and_then(|d| {
            d.flatten().find_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("node")?
                    .parse::<u32>()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// Checks an instance name (a kernfs directory: no `/`, no NUL, printable).
pub fn check_name(name: &str) -> Result<(), SpecError> {
    let bad = |why| SpecError::Name {
        name: name.to_owned(),
        why,
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(bad("wrong length"));
    }
    if name == "." || name == ".." {
        return Err(bad("reserved"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(bad("only letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

/// Checks a PCI address `DDDD:BB:SS.F` (hex digits).
pub fn check_pci(addr: &str) -> Result<(), SpecError> {
    let b = addr.as_bytes();
    let ok = b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit());
    if ok {
        Ok(())
    } else {
        Err(SpecError::Pci(addr.to_owned()))
    }
}

fn cells64(cpus: &[u32]) -> Vec<u8> {
    cpus.iter()
        .flat_map(|c| u64::from(*c).to_be_bytes())
        .collect()
}

fn reg(base: u64, size: u64) -> Vec<u8> {
    let mut v = base.to_be_bytes().to_vec();
    v.extend_from_slice(&size.to_be_bytes());
    v
}

/// The baseline DTB: the pool's cpus and one `memory@I` request per size (optionally on a
/// NUMA node), as `kerf init` writes it without devices.
pub fn baseline(cpus: &[u32], memory: &[(u64, Option<u32>)]) -> Vec<u8> {
    let mut w = Writer::new();
    w.begin_node("")
        .property_string("compatible", HOST_COMPATIBLE)
        .begin_node("resources")
        .property("cpus", &cells64(cpus));
    for (i, (size, node)) in memory.iter().enumerate() {
        w.begin_node(&format!("memory@{i}"))
            .property_u64("size", *size);
        if let Some(n) = node {
            w.property_u32("numa-node-id", *n);
        }
        w.end_node();
    }
    w.end_node().end_node();
    w.finish()
}

/// What one `instance-create` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRequest {
    pub name: String,
    /// `None`: the kernel assigns one (the property is omitted).
    pub id: Option<u16>,
    pub cpus: Vec<u32>,
    pub memory_bytes: u64,
    /// PCI addresses handed to the instance in a second fragment.
    pub devices: Vec<String>,
}

impl CreateRequest {
    /// Checks the name, id and devices.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_name(&self.name)?;
        if let Some(id) = self.id
            && !(1..=crate::sys::multikernel::MAX_INSTANCE_ID).contains(&id)
        {
            return Err(SpecError::Id(u32::from(id)));
        }
        self.devices.iter().try_for_each(|d| check_pci(d))
    }
}

fn overlay_root(w: &mut Writer) {
    w.begin_node("")
        .property_string("compatible", OVERLAY_COMPATIBLE);
}

fn fragment_begin(w: &mut Writer, index: usize, target: &str) {
    w.begin_node(&format!("fragment@{index:x}"))
        .property_string("target-path", target)
        .begin_node("__overlay__");
}

fn device_op(w: &mut Writer, op: &str, pci: &[String]) {
    if pci.is_empty() {
        return;
    }
    w.begin_node(op);
    for (i, p) in pci.iter().enumerate() {
        w.begin_node(&format!("pci@{i}"))
            .property_string("pci-id", p)
            .end_node();
    }
    w.end_node();
}

fn cpu_op(w: &mut Writer, op: &str, cpus: &[u32]) {
    if cpus.is_empty() {
        return;
    }
    w.begin_node(op);
    for c in cpus {
        w.begin_node(&format!("cpu@{c}"))
            .property("reg", &u64::from(*c).to_be_bytes())
            .end_node();
    }
    w.end_node();
}

fn memory_op(w: &mut Writer, op: &str, regions: &[(u64, u64)]) {
    if regions.is_empty() {
        return;
    }
    w.begin_node(op);
    for (i, (base, size)) in regions.iter().enumerate() {
        w.begin_node(&format!("memory@{i}"))
            .property("reg", &reg(*base, *size))
            .end_node();
    }
    w.end_node();
}

/// The `instance-create` overlay (`kerf create NAME [--id N] --cpus SPEC --memory SIZE
/// [--devices …]`).
pub fn create(req: &CreateRequest) -> Vec<u8> {
    let mut w = Writer::new();
    overlay_root(&mut w);
    fragment_begin(&mut w, 0, "/instances");
    w.begin_node("instance-create")
        .property_string("instance-name", &req.name);
    if let Some(id) = req.id {
        w.property_u32("id", u32::from(id));
    }
    w.begin_node("resources")
        .property("cpus", &cells64(&req.cpus))
        .property_u64("memory-bytes", req.memory_bytes)
        .property_string("cpu-affinity", CPU_AFFINITY_COMPACT)
        .end_node()
        .end_node()
        .end_node()
        .end_node();
    if !req.devices.is_empty() {
        fragment_begin(&mut w, 1, &format!("/instances/{}", req.name));
        device_op(&mut w, "device-add", &req.devices);
        w.end_node().end_node();
    }
    w.end_node();
    w.finish()
}

/// What one instance update changes (the order of operations is kerf's).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpdateOps {
    /// Whole regions `(base, size)` taken back, as `memory@I { reg }` items.
    pub memory_remove: Vec<(u64, u64)>,
    /// Free pool ranges given to the instance (kerf gives one; a transfer gives several).
    pub memory_add: Vec<(u64, u64)>,
    pub cpu_remove: Vec<u32>,
    pub cpu_add: Vec<u32>,
    pub device_remove: Vec<String>,
    pub device_add: Vec<String>,
}

impl UpdateOps {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

fn update_fragment(w: &mut Writer, index: usize, name: &str, ops: &UpdateOps) {
    fragment_begin(w, index, &format!("/instances/{name}"));
    memory_op(w, "memory-remove", &ops.memory_remove);
    memory_op(w, "memory-add", &ops.memory_add);
    let mut rm = ops.cpu_remove.clone();
    rm.sort_unstable();
    let mut add = ops.cpu_add.clone();
    add.sort_unstable();
    cpu_op(w, "cpu-remove", &rm);
    cpu_op(w, "cpu-add", &add);
    let mut drm = ops.device_remove.clone();
    drm.sort();
    let mut dadd = ops.device_add.clone();
    dadd.sort();
    device_op(w, "device-remove", &drm);
    device_op(w, "device-add", &dadd);
    w.end_node().end_node();
}

/// The resize overlay of one instance (`kerf update NAME …`).
pub fn update(name: &str, ops: &UpdateOps) -> Vec<u8> {
    let mut w = Writer::new();
    overlay_root(&mut w);
    update_fragment(&mut w, 0, name, ops);
    w.end_node();
    w.finish()
}

/// The blue/green resource move: `from` gives up `cpus` and the memory `regions`, then `to`
/// takes them, in one transaction (two fragments, applied in order).
pub fn transfer(from: &str, to: &str, cpus: &[u32], regions: &[(u64, u64)]) -> Vec<u8> {
    let mut w = Writer::new();
    overlay_root(&mut w);
    update_fragment(
        &mut w,
        0,
        from,
        &UpdateOps {
            memory_remove: regions.to_vec(),
            cpu_remove: cpus.to_vec(),
            ..UpdateOps::default()
        },
    );
    update_fragment(
        &mut w,
        1,
        to,
        &UpdateOps {
            memory_add: regions.to_vec(),
            cpu_add: cpus.to_vec(),
            ..UpdateOps::default()
        },
    );
    w.end_node();
    w.finish()
}

/// The `instance-remove` overlay (`kerf delete NAME`).
pub fn delete(name: &str) -> Vec<u8> {
    let mut w = Writer::new();
    overlay_root(&mut w);
    fragment_begin(&mut w, 0, "/instances");
    w.begin_node("instance-remove")
        .property_string("instance-name", name)
        .end_node()
        .end_node()
        .end_node()
        .end_node();
    w.finish()
}

/// Splits regions into memory-block-aligned chunks of at most `block` bytes (the unit the
/// spawned kernel hot-plugs); a region that is not block-aligned stays whole.
pub fn block_chunks(regions: &[(u64, u64)], block: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(base, size) in regions {
        if block == 0 || base % block != 0 || size % block != 0 {
            out.push((base, size));
            continue;
        }
        let mut off = 0;
        while off < size {
            out.push((base + off, block));
            off += block;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fdt;
    use super::*;

    #[test]
    fn cpu_specs_parse_like_kerf() {
        assert_eq!(parse_cpus("4").unwrap(), [4]);
        assert_eq!(parse_cpus("4-7").unwrap(), [4, 5, 6, 7]);
        assert_eq!(parse_cpus(" 7, 4-5,5 ").unwrap(), [4, 5, 7]);
        for bad in ["", "a", "3-1", "1-", "-1", "1,,2", "99999999"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
        assert_eq!(format_cpus(&[1, 2, 3, 5, 7, 8]), "1-3,5,7-8");
    }

    #[test]
    fn sizes_parse_like_kerf_and_in_binary_units() {
        assert_eq!(parse_size("256MB").unwrap(), 256 << 20);
        assert_eq!(parse_size("256mb").unwrap(), 256 << 20);
        assert_eq!(parse_size("2GB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5GB").unwrap(), 3 << 29);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("8KB").unwrap(), 8192);
        for bad in ["", "0", "0MB", "100", "MB", "-1GB", "1e400GB", "1XB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pool_memory_parses_like_kerf_init() {
        assert_eq!(parse_pool_memory("2GB", 0).unwrap(), [(2 << 30, Some(0))]);
        assert_eq!(
            parse_pool_memory("1GB@1,512MB@0", 0).unwrap(),
            [(1 << 30, Some(1)), (512 << 20, Some(0))]
        );
        for bad in ["", "1GB,2GB@1", "1GB@1,1GB@1", "1GB@x", "1GB,2GB"] {
            assert!(parse_pool_memory(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_ids_and_pci_addresses_are_checked() {
        assert!(check_name("web-1.v2_a").is_ok());
        for bad in ["", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_pci("0000:65:00.0").is_ok());
        for bad in ["0000:65:00", "0000-65-00.0", "000g:65:00.0"] {
            assert!(check_pci(bad).is_err(), "{bad}");
        }
        let mut r = CreateRequest {
            name: "w".into(),
            id: Some(512),
            cpus: vec![1],
            memory_bytes: 4096,
            devices: vec![],
        };
        assert_eq!(r.validate(), Err(SpecError::Id(512)));
        r.id = Some(0);
        assert!(r.validate().is_err());
        r.id = Some(511);
        assert!(r.validate().is_ok());
    }

    #[test]
    fn every_blob_decodes_to_the_documented_shape() {
        let b = fdt::parse(&baseline(&[1, 2, 3], &[(2 << 30, None)])).unwrap();
        assert_eq!(b.prop_str("compatible"), Some(HOST_COMPATIBLE));
        let r = b.child("resources").unwrap();
        assert_eq!(r.prop_u64s("cpus").unwrap(), [1, 2, 3]);
        assert_eq!(
            r.child("memory@0").unwrap().prop_uint("size"),
            Some(2 << 30)
        );

        let c = fdt::parse(&create(&CreateRequest {
            name: "web".into(),
            id: None,
            cpus: vec![2, 3],
            memory_bytes: 512 << 20,
            devices: vec!["0000:65:00.0".into()],
        }))
        .unwrap();
        let f0 = c.child("fragment@0").unwrap();
        let ic = f0
            .child("__overlay__")
            .unwrap()
            .child("instance-create")
            .unwrap();
        assert_eq!(ic.prop("id"), None);
        assert_eq!(
            ic.child("resources").unwrap().prop_str("cpu-affinity"),
            Some("compact")
        );
        let f1 = c.child("fragment@1").unwrap();
        assert_eq!(f1.prop_str("target-path"), Some("/instances/web"));

        let t = fdt::parse(&transfer("old", "new", &[3, 2], &[(1 << 32, 128 << 20)])).unwrap();
        let rm = t.child("fragment@0").unwrap().child("__overlay__").unwrap();
        assert!(rm.child("memory-remove").is_some());
        assert_eq!(
            rm.child("cpu-remove")
                .unwrap()
                .children
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["cpu@2", "cpu@3"]
        );
        let add = t.child("fragment@1").unwrap().child("__overlay__").unwrap();
        let m = add.child("memory-add").unwrap().child("memory@0").unwrap();
        assert_eq!(m.prop("reg").unwrap(), reg(1 << 32, 128 << 20).as_slice());

        let d = fdt::parse(&delete("old")).unwrap();
        assert_eq!(
            d.child("fragment@0")
                .unwrap()
                .child("__overlay__")
                .unwrap()
                .child("instance-remove")
                .unwrap()
                .prop_str("instance-name"),
            Some("old")
        );
    }

    #[test]
    fn memory_moves_in_whole_blocks() {
        let b = 128 << 20;
        assert_eq!(
            block_chunks(&[(1 << 32, 3 * b)], b),
            [(1 << 32, b), ((1 << 32) + b, b), ((1 << 32) + 2 * b, b)]
        );
        assert_eq!(block_chunks(&[(4096, b)], b), [(4096, b)]);
    }
}
