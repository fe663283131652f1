//! Flattened device tree (DTB/DTBO) encoding and a bounded decoder.
//!
//! **Encoder.** The multikernel blobs must be byte-identical to kerf's, which builds them
//! with libfdt's sequential writer (`FdtSw`) and then packs them (`fdt_pack`). [`Writer`]
//! reproduces that exactly:
//!
//! * header (40 bytes, big-endian): magic `0xd00dfeed`, totalsize, off_dt_struct,
//!   off_dt_strings, off_mem_rsvmap, version 17, last_comp_version 16, boot_cpuid_phys 0,
//!   size_dt_strings, size_dt_struct;
//! * packed layout: memory reservation map at 40 (only its terminating 16 zero bytes), the
//!   structure block right after it (56), the strings block right after that, nothing
//!   after the strings (totalsize = end of strings);
//! * structure tokens: `BEGIN_NODE` (1) + NUL-terminated name padded to 4, `PROP` (3) +
//!   length + name offset + value padded to 4, `END_NODE` (2), `END` (9);
//! * strings: `FdtSw` allocates each new name *below* the previous ones and looks names up
//!   (suffixes included: `"name"` matches the tail of `"instance-name"`) in the table as it
//!   stands, so the final table lists names newest first, and a name already present, even
//!   as the tail of a longer one, is not added again.
//!
//! **Decoder.** [`parse`] reads untrusted blobs (the simulated kernel parses what the
//! platform writes; `mk-upgrade multikernel overlay` output can be read back) and never
//! panics: every offset and length is checked against the input, which may not exceed
//! [`MAX_BLOB_BYTES`], nesting is capped at [`MAX_DEPTH`] and the node and property counts at
//! [`MAX_ITEMS`].

use std::fmt;

/// `FDT_MAGIC`.
pub const MAGIC: u32 = 0xd00d_feed;
const VERSION: u32 = 17;
const LAST_COMP_VERSION: u32 = 16;
const HEADER_LEN: usize = 40;
const RSVMAP_OFF: usize = 40;
const RSV_ENTRY_LEN: usize = 16;

const TOKEN_BEGIN_NODE: u32 = 1;
const TOKEN_END_NODE: u32 = 2;
const TOKEN_PROP: u32 = 3;
const TOKEN_NOP: u32 = 4;
const TOKEN_END: u32 = 9;

/// Largest blob the decoder accepts (a multikernel overlay is a few hundred bytes; the
/// pool read back for a large machine a few KiB).
pub const MAX_BLOB_BYTES: usize = 1 << 20;
/// Deepest node nesting the decoder accepts.
pub const MAX_DEPTH: usize = 16;
/// Longest property name the decoder accepts (names are copied per property: with this
/// cap, [`MAX_ITEMS`] properties copy at most 4 MiB of names).
pub const MAX_NAME_BYTES: usize = 256;
/// Most nodes plus properties the decoder accepts.
pub const MAX_ITEMS: usize = 16 * 1024;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Builds one blob the way libfdt's `FdtSw` followed by `fdt_pack` does.
#[derive(Debug, Default)]
pub struct Writer {
    structure: Vec<u8>,
    /// Strings, newest first (as `FdtSw` leaves them).
    strings: Vec<u8>,
    /// Per property: (position of its nameoff field in `structure`, distance of its name
    /// from the end of the strings table), fixed up in [`Writer::finish`].
    name_refs: Vec<(usize, usize)>,
    depth: usize,
}

impl Writer {
    /// An empty tree (no reservation entries).
    pub fn new() -> Self {
        Self::default()
    }

    fn token(&mut self, t: u32) {
        self.structure.extend_from_slice(&t.to_be_bytes());
    }

    fn pad(&mut self) {
        while self.structure.len() % 4 != 0 {
            self.structure.push(0);
        }
    }

    /// Opens a node (the root is `""`).
    pub fn begin_node(&mut self, name: &str) -> &mut Self {
        self.token(TOKEN_BEGIN_NODE);
        self.structure.extend_from_slice(name.as_bytes());
        self.structure.push(0);
        self.pad();
        self.depth += 1;
        self
    }

    /// Closes the innermost open node.
    pub fn end_node(&mut self) -> &mut Self {
        self.token(TOKEN_END_NODE);
        self.depth = self.depth.saturating_sub(1);
        self
    }

    /// The distance from the end of the strings table of `name`, added if absent.
    fn string(&mut self, name: &str) -> usize {
        let mut s = name.as_bytes().to_vec();
        s.push(0);
        if let Some(pos) = self
            .strings
            .windows(s.len())
            .position(|w| w == s.as_slice())
        {
            return self.strings.len() - pos;
        }
        let mut new = s;
        new.extend_from_slice(&self.strings);
        self.strings = new;
        self.strings.len()
    }

    /// A property with raw bytes.
    pub fn property(&mut self, name: &str, value: &[u8]) -> &mut Self {
        let from_end = self.string(name);
        self.token(TOKEN_PROP);
        let len = u32::try_from(value.len()).unwrap_or(u32::MAX);
        self.structure.extend_from_slice(&len.to_be_bytes());
        self.name_refs.push((self.structure.len(), from_end));
        self.structure.extend_from_slice(&0u32.to_be_bytes());
        self.structure.extend_from_slice(value);
        self.pad();
        self
    }

    /// A NUL-terminated string property.
    pub fn property_string(&mut self, name: &str, value: &str) -> &mut Self {
        let mut v = value.as_bytes().to_vec();
        v.push(0);
        self.property(name, &v)
    }

    /// A big-endian u32 property.
    pub fn property_u32(&mut self, name: &str, value: u32) -> &mut Self {
        self.property(name, &value.to_be_bytes())
    }

    /// A big-endian u64 property (two cells).
    pub fn property_u64(&mut self, name: &str, value: u64) -> &mut Self {
        self.property(name, &value.to_be_bytes())
    }

    /// The packed blob. Nodes left open are closed first.
    pub fn finish(mut self) -> Vec<u8> {
        while self.depth > 0 {
            self.end_node();
        }
        self.token(TOKEN_END);
        let total_strings = self.strings.len();
        for (pos, from_end) in std::mem::take(&mut self.name_refs) {
            let off = u32::try_from(total_strings - from_end).unwrap_or(0);
            self.structure[pos..pos + 4].copy_from_slice(&off.to_be_bytes());
        }
        let struct_off = RSVMAP_OFF + RSV_ENTRY_LEN;
        let strings_off = struct_off + self.structure.len();
        let total = strings_off + total_strings;
        let mut out = Vec::with_capacity(total);
        let be = |v: usize| u32::try_from(v).unwrap_or(u32::MAX).to_be_bytes();
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&be(total));
        out.extend_from_slice(&be(struct_off));
        out.extend_from_slice(&be(strings_off));
        out.extend_from_slice(&be(RSVMAP_OFF));
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&LAST_COMP_VERSION.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&be(total_strings));
        out.extend_from_slice(&be(self.structure.len()));
        out.resize(struct_off, 0);
        out.extend_from_slice(&self.structure);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// One decoded node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    pub name: String,
    pub props: Vec<(String, Vec<u8>)>,
    pub children: Vec<Node>,
}

impl Node {
    /// The property `name`.
    pub fn prop(&self, name: &str) -> Option<&[u8]> {
        self.props
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The child `name`.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// A string property (without its NUL).
    pub fn prop_str(&self, name: &str) -> Option<&str> {
        let v = self.prop(name)?;
        let v = v.strip_suffix(&[0]).unwrap_or(v);
        std::str::from_utf8(v).ok()
    }

    /// A one-cell (u32) or two-cell (u64) integer property.
    pub fn prop_uint(&self, name: &str) -> Option<u64> {
        let v = self.prop(name)?;
        match v.len() {
            4 => Some(u64::from(u32::from_be_bytes(v.try_into().ok()?))),
            8 => Some(u64::from_be_bytes(v.try_into().ok()?)),
            _ => None,
        }
    }

    /// A property of 64-bit cells (cpu lists).
    pub fn prop_u64s(&self, name: &str) -> Option<Vec<u64>> {
        let v = self.prop(name)?;
        if v.len() % 8 != 0 {
            return None;
        }
        Some(
            v.chunks_exact(8)
                .filter_map(|c| c.try_into().ok().map(u64::from_be_bytes))
                .collect(),
        )
    }
}

/// Why a blob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FdtError {
    #[error("blob of {len} bytes exceeds the {max}-byte cap")]
    TooLarge { len: usize, max: usize },
    #[error("blob truncated: {what}")]
    Truncated { what: &'static str },
    #[error("bad magic {0:#010x} (a device tree blob starts with 0xd00dfeed)")]
    BadMagic(u32),
    #[error("unsupported device tree version {version} (last compatible {last_comp})")]
    Version { version: u32, last_comp: u32 },
    #[error("{what} out of bounds")]
    OutOfBounds { what: &'static str },
    #[error("unexpected structure token {token:#x} at offset {offset}")]
    BadToken { token: u32, offset: usize },
    #[error("nesting deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("more than {MAX_ITEMS} nodes and properties")]
    TooManyItems,
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("structure block does not hold exactly one root node")]
    NoRoot,
}

fn be32(b: &[u8], off: usize, what: &'static str) -> Result<u32, FdtError> {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or(FdtError::Truncated { what })
}

fn as_usize(v: u32) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Decodes a blob into its root node. See the module documentation for the bounds.
pub fn parse(blob: &[u8]) -> Result<Node, FdtError> {
    if blob.len() > MAX_BLOB_BYTES {
        return Err(FdtError::TooLarge {
            len: blob.len(),
            max: MAX_BLOB_BYTES,
        });
    }
    if blob.len() < HEADER_LEN {
        return Err(FdtError::Truncated { what: "header" });
    }
    let magic = be32(blob, 0, "magic")?;
    if magic != MAGIC {
        return Err(FdtError::BadMagic(magic));
    }
    let total = as_usize(be32(blob, 4, "totalsize")?);
    let off_struct = as_usize(be32(blob, 8, "off_dt_struct")?);
    let off_strings = as_usize(be32(blob, 12, "off_dt_strings")?);
    let version = be32(blob, 20, "version")?;
    let last_comp = be32(blob, 24, "last_comp_version")?;
    let size_strings = as_usize(be32(blob, 32, "size_dt_strings")?);
    let size_struct = as_usize(be32(blob, 36, "size_dt_struct")?);
    if version < 17 || last_comp > 17 {
        return Err(FdtError::Version { version, last_comp });
    }
    if total > blob.len() {
        return Err(FdtError::Truncated { what: "totalsize" });
    }
    let structure = off_struct
        .checked_add(size_struct)
        .filter(|end| *end <= total)
        .and_then(|end| blob.get(off_struct..end))
        .ok_or(FdtError::OutOfBounds {
            what: "structure block",
        })?;
    let strings = off_strings
        .checked_add(size_strings)
        .filter(|end| *end <= total)
        .and_then(|end| blob.get(off_strings..end))
        .ok_or(FdtError::OutOfBounds {
            what: "strings block",
        })?;
    let mut pos = 0usize;
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    let mut items = 0usize;
    loop {
        let token = be32(structure, pos, "structure token")?;
        let at = pos;
        pos += 4;
        match token {
            TOKEN_BEGIN_NODE => {
                if root.is_some() {
                    return Err(FdtError::NoRoot);
                }
                let rest = structure.get(pos..).unwrap_or_default();
                let nul = rest
                    .iter()
                    .take(MAX_NAME_BYTES + 1)
                    .position(|b| *b == 0)
                    .ok_or(FdtError::Truncated {
                        what: "node name (or longer than 256 bytes)",
                    })?;
                let name = std::str::from_utf8(&rest[..nul])
                    .map_err(|_| FdtError::NotUtf8("node name"))?;
                pos = align4(pos + nul + 1);
                if stack.len() >= MAX_DEPTH {
                    return Err(FdtError::TooDeep);
                }
                items += 1;
                if items > MAX_ITEMS {
                    return Err(FdtError::TooManyItems);
                }
                stack.push(Node {
                    name: name.to_owned(),
                    ..Node::default()
                });
            }
            TOKEN_END_NODE => {
                let node = stack
                    .pop()
                    .ok_or(FdtError::BadToken { token, offset: at })?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => root = Some(node),
                }
            }
            TOKEN_PROP => {
                let len = as_usize(be32(structure, pos, "property length")?);
                let nameoff = as_usize(be32(structure, pos + 4, "property name offset")?);
                pos += 8;
                let value = pos
                    .checked_add(len)
                    .and_then(|end| structure.get(pos..end))
                    .ok_or(FdtError::OutOfBounds {
                        what: "property value",
                    })?;
                pos = align4(pos + len);
                let name_bytes = strings.get(nameoff..).ok_or(FdtError::OutOfBounds {
                    what: "property name offset",
                })?;
                let nul = name_bytes
                    .iter()
                    .take(MAX_NAME_BYTES + 1)
                    .position(|b| *b == 0)
                    .ok_or(FdtError::Truncated {
                        what: "property name (or longer than 256 bytes)",
                    })?;
                let name = std::str::from_utf8(&name_bytes[..nul])
                    .map_err(|_| FdtError::NotUtf8("property name"))?;
                items += 1;
                if items > MAX_ITEMS {
                    return Err(FdtError::TooManyItems);
                }
                let node = stack
                    .last_mut()
                    .ok_or(FdtError::BadToken { token, offset: at })?;
                node.props.push((name.to_owned(), value.to_vec()));
            }
            TOKEN_NOP => {}
            TOKEN_END => {
                if !stack.is_empty() {
                    return Err(FdtError::BadToken { token, offset: at });
                }
                return root.ok_or(FdtError::NoRoot);
            }
            _ => return Err(FdtError::BadToken { token, offset: at }),
        }
    }
}

impl fmt::Display for Node {
    /// A DTS-like rendering (for `mk-upgrade multikernel overlay --print` and test messages).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn go(n: &Node, depth: usize, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let ind = "    ".repeat(depth);
            let name = if n.name.is_empty() { "/" } else { &n.name };
            writeln!(f, "{ind}{name} {{")?;
            for (k, v) in &n.props {
                let printable = v.last() == Some(&0)
                    && v.len() > 1
                    && v[..v.len() - 1]
                        .iter()
                        .all(|b| b.is_ascii_graphic() || *b == b' ');
                if printable {
                    let s = String::from_utf8_lossy(&v[..v.len() - 1]);
                    writeln!(f, "{ind}    {k} = \"{s}\";")?;
                } else if v.len() % 4 == 0 && !v.is_empty() {
                    let cells: Vec<String> = v
                        .chunks_exact(4)
                        .map(|c| format!("{:#x}", u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
                        .collect();
                    writeln!(f, "{ind}    {k} = <{}>;", cells.join(" "))?;
                } else if v.is_empty() {
                    writeln!(f, "{ind}    {k};")?;
                } else {
                    writeln!(f, "{ind}    {k} = [{}];", hex::encode(v))?;
                }
            }
            for c in &n.children {
                go(c, depth + 1, f)?;
            }
            writeln!(f, "{ind}}};")
        }
        go(self, 0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new();
        w.begin_node("")
            .property_string("compatible", "linux,multikernel-overlay")
            .begin_node("fragment@0")
            .property_string("target-path", "/instances")
            .begin_node("__overlay__")
            .begin_node("instance-create")
            .property_string("instance-name", "web")
            .property_u32("id", 3)
            .begin_node("resources")
            .property("cpus", &[0, 0, 0, 0, 0, 0, 0, 2])
            .property_u64("memory-bytes", 256 << 20)
            .end_node()
            .end_node()
            .end_node()
            .end_node()
            .end_node();
        w.finish()
    }

    #[test]
    fn round_trip() {
        let b = sample();
        let root = parse(&b).unwrap();
        let f = root.child("fragment@0").unwrap();
        assert_eq!(f.prop_str("target-path"), Some("/instances"));
        let ic = f
            .child("__overlay__")
            .and_then(|o| o.child("instance-create"))
            .unwrap();
        assert_eq!(ic.prop_str("instance-name"), Some("web"));
        assert_eq!(ic.prop_uint("id"), Some(3));
        let r = ic.child("resources").unwrap();
        assert_eq!(r.prop_u64s("cpus"), Some(vec![2]));
        assert_eq!(r.prop_uint("memory-bytes"), Some(256 << 20));
    }

    #[test]
    fn strings_are_newest_first_and_suffixes_are_shared() {
        let mut w = Writer::new();
        w.begin_node("")
            .property_string("instance-name", "a")
            .property_u32("name", 1)
            .property_u32("id", 2)
            .end_node();
        let b = w.finish();
        let off = u32::from_be_bytes(b[12..16].try_into().unwrap()) as usize;
        // "name" is the tail of "instance-name": not added; "id" is new, so first.
        assert_eq!(&b[off..], b"id\0instance-name\0");
        let root = parse(&b).unwrap();
        assert_eq!(root.prop_uint("name"), Some(1));
        assert_eq!(root.prop_str("instance-name"), Some("a"));
    }

    #[test]
    fn header_is_packed_like_fdt_pack() {
        let b = sample();
        let h = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
        assert_eq!(h(0), MAGIC);
        assert_eq!(h(4) as usize, b.len());
        assert_eq!(h(8), 56);
        assert_eq!(h(16), 40);
        assert_eq!((h(20), h(24), h(28)), (17, 16, 0));
        assert_eq!(h(12) + h(32), h(4));
        assert_eq!(h(8) + h(36), h(12));
        assert!(b[40..56].iter().all(|x| *x == 0));
    }

    #[test]
    fn malformed_blobs_are_refused_with_a_reason() {
        let b = sample();
        assert!(matches!(parse(&b[..20]), Err(FdtError::Truncated { .. })));
        let mut bad = b.clone();
        bad[0] = 0;
        assert!(matches!(parse(&bad), Err(FdtError::BadMagic(_))));
        let mut bad = b.clone();
        bad[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse(&bad).is_err());
        let mut bad = b.clone();
        bad[36..40].copy_from_slice(&4000u32.to_be_bytes());
        assert!(matches!(parse(&bad), Err(FdtError::OutOfBounds { .. })));
        assert!(matches!(
            parse(&vec![0u8; MAX_BLOB_BYTES + 1]),
            Err(FdtError::TooLarge { .. })
        ));
        // Nesting beyond the cap.
        let mut w = Writer::new();
        for i in 0..=MAX_DEPTH {
            w.begin_node(&format!("n{i}"));
        }
        assert_eq!(parse(&w.finish()), Err(FdtError::TooDeep));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&b);
        }

        #[test]
        fn mutated_blobs_never_panic(pos in 0usize..400, val in any::<u8>(), cut in 0usize..400) {
            let mut b = sample();
            let p = pos % b.len();
            b[p] = val;
            let _ = parse(&b);
            b.truncate(cut.min(b.len()));
            let _ = parse(&b);
        }
    }
}
