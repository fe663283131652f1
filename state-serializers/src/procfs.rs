//! Small readers of /proc and /sys text formats shared by the capture modules.
//!
//! Every reader takes a `root` under which `proc/` and `sys/` are looked up, so tests can
//! point them at fixture trees; production passes `/`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Result, StateError};

/// `root` joined with an absolute-looking path such as `/proc/1/stat`.
pub fn under(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

/// Reads a whole file as bytes, mapping errors onto [`StateError`].
pub fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| StateError::io(path, e))
}

/// Reads a whole file as UTF-8 text.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = read_bytes(path)?;
    String::from_utf8(bytes).map_err(|_| StateError::malformed(path, "content is not UTF-8"))
}

/// Reads a file if it exists: `Ok(None)` for a missing file, other errors are errors.
pub fn read_text_opt(path: &Path) -> Result<Option<String>> {
    match fs::read(path) {
        Ok(b) => String::from_utf8(b)
            .map(Some)
            .map_err(|_| StateError::malformed(path, "content is not UTF-8")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError::io(path, e)),
    }
}

/// The entries of a directory; a missing directory has none, other errors are errors.
pub fn dir_entries(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(rd) => rd
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| StateError::io(dir, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StateError::io(dir, e)),
    }
}

/// Reads a symlink target as UTF-8 text.
pub fn read_link(path: &Path) -> Result<String> {
    let target = fs::read_link(path).map_err(|e| StateError::io(path, e))?;
    target
        .into_os_string()
        .into_string()
        .map_err(|_| StateError::NotUtf8 {
            path: path.to_path_buf(),
            field: "link target",
        })
}

/// Parses one decimal/hex integer field, naming it on failure.
pub fn parse_num<T: std::str::FromStr>(path: &Path, field: &str, s: &str) -> Result<T> {
    s.trim()
        .parse::<T>()
        .map_err(|_| StateError::malformed(path, format!("{field}: {s:?} is not a number")))
}

/// Parses a kernel CPU list such as `0-3,8,10-11` into sorted CPU numbers.
pub fn parse_cpu_list(path: &Path, s: &str) -> Result<Vec<u32>> {
    let s = s.trim();
    let mut out = Vec::new();
    if s.is_empty() {
        return Ok(out);
    }
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: u32 = parse_num(path, "cpu list", a)?;
        let b: u32 = parse_num(path, "cpu list", b)?;
        if b < a || b - a > 65_536 || b >= 1 << 20 {
            return Err(StateError::malformed(
                path,
                format!("cpu list: range {part:?} is reversed or absurdly large"),
            ));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Formats CPU numbers as a kernel CPU list (`0-3,8`).
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            end += 1;
            i += 1;
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

/// Decodes the octal escapes (`\040` for space, `\011`, `\012`, `\134`) of mountinfo fields.
pub fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (u32::from(b[i + 1] - b'0') << 6)
                | (u32::from(b[i + 2] - b'0') << 3)
                | u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of `/proc/PID/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    /// `major:minor` of the filesystem's device.
    pub dev: String,
    /// Root of the mount within the filesystem.
    pub root: String,
    pub mount_point: String,
    pub mount_options: String,
    /// Optional fields such as `shared:1`, `master:2`.
    pub optional: Vec<String>,
    pub fstype: String,
    pub source: String,
    pub super_options: String,
}

/// Parses `/proc/PID/mountinfo` text (see proc(5)).
pub fn parse_mountinfo(path: &Path, text: &str) -> Result<Vec<MountEntry>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| StateError::malformed(path, format!("line {}: {what}", n + 1));
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields
            .iter()
            .position(|f| *f == "-")
            .ok_or_else(|| bad("no ' - ' separator"))?;
        if sep < 6 || fields.len() < sep + 4 {
            return Err(bad("too few fields"));
        }
        out.push(MountEntry {
            mount_id: parse_num(path, "mount id", fields[0])?,
            parent_id: parse_num(path, "parent id", fields[1])?,
            dev: fields[2].to_owned(),
            root: unescape_octal(fields[3]),
            mount_point: unescape_octal(fields[4]),
            mount_options: fields[5].to_owned(),
            optional: fields[6..sep].iter().map(|s| (*s).to_owned()).collect(),
            fstype: fields[sep + 1].to_owned(),
            source: unescape_octal(fields[sep + 2]),
            super_options: fields[sep + 3..].join(" "),
        });
    }
    Ok(out)
}

/// Reads and parses `<root>/proc/self/mountinfo`.
pub fn read_mountinfo(root: &Path) -> Result<Vec<MountEntry>> {
    let path = under(root, "/proc/self/mountinfo");
    let text = read_text(&path)?;
    parse_mountinfo(&path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_round_trip() {
        let p = Path::new("x");
        assert_eq!(
            parse_cpu_list(p, "0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(parse_cpu_list(p, "").unwrap(), Vec::<u32>::new());
        assert!(parse_cpu_list(p, "3-1").is_err());
        assert!(parse_cpu_list(p, "0-4000000000").is_err());
        assert!(parse_cpu_list(p, "a").is_err());
    }

    #[test]
    fn mountinfo_parses_and_unescapes() {
        let text = "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n\
                    41 31 0:38 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        let m = parse_mountinfo(Path::new("mi"), text).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].optional, vec!["shared:1"]);
        assert_eq!(m[0].fstype, "ext4");
        assert_eq!(m[1].mount_point, "/mnt/with space");
        assert!(parse_mountinfo(Path::new("mi"), "1 2 3\n").is_err());
        assert!(parse_mountinfo(Path::new("mi"), "x 1 0:1 / / rw - a b c\n").is_err());
    }
}
