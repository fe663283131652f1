//! Checksummed ("sealed") JSON state files: the checksum covers every byte of the file.
//!
//! A sealed file is a pretty-printed JSON object whose last member is the checksum:
//!
//! ```text
//! {
//!   "format": "mk-upgrade-slots/2",
//!   ...,
//!   "crc32": "1a2b3c4d"
//! }
//! ```
//!
//! `crc32` is 8 lowercase hex digits of the CRC-32 (IEEE) of every byte *before* the fixed
//! trailer `,\n  "crc32": "`, and the trailer itself (`,\n  "crc32": "`, the digits,
//! `"\n}\n`) must match exactly. A change to any byte (a member, whitespace, a digit of the
//! checksum or the trailer) is therefore detected: CRC-32 catches every error burst of up to
//! 32 bits, in particular every single flipped bit and every changed byte. The file stays
//! plain JSON, so `jq` reads it.
//!
//! Files of the previous, unsealed formats (`.../1`) are still read (see [`read`]): they are
//! rewritten sealed by the next write.

use serde::Serialize;
use serde::de::DeserializeOwned;

const TRAILER_HEAD: &[u8] = b",\n  \"crc32\": \"";
const TRAILER_TAIL: &[u8] = b"\"\n}\n";
const DIGITS: usize = 8;

/// Serializes `value` (a struct, serialized as a non-empty JSON object) as a sealed file.
pub(crate) fn seal<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = serde_json::to_vec_pretty(value)?;
    // A non-empty object pretty-prints as "{\n  ...\n}": drop the closing "\n}".
    if out.len() < 4 || !out.starts_with(b"{\n") || !out.ends_with(b"\n}") {
        return Err(serde::ser::Error::custom(
            "a sealed state file must be a non-empty JSON object",
        ));
    }
    out.truncate(out.len() - 2);
    Ok(with_trailer(out, TRAILER_HEAD, TRAILER_TAIL))
}

/// `content` followed by the trailer `head`, the 8 hex digits of its CRC-32, `tail`.
fn with_trailer(mut content: Vec<u8>, head: &[u8], tail: &[u8]) -> Vec<u8> {
    let crc = crc32fast::hash(&content);
    content.reserve(head.len() + DIGITS + tail.len());
    content.extend_from_slice(head);
    content.extend_from_slice(format!("{crc:08x}").as_bytes());
    content.extend_from_slice(tail);
    content
}

/// The one-line form of a sealed object (a line of an append log): compact JSON whose last
/// member is `"crc32":"…"`, 8 lowercase hex digits of the CRC-32 of every byte before the
/// fixed trailer `,"crc32":"`, then `"}` and a newline. JSON escapes every newline inside a
/// string, so the line holds exactly one `\n`, its last byte.
const LINE_HEAD: &[u8] = b",\"crc32\":\"";
const LINE_TAIL: &[u8] = b"\"}\n";

/// Serializes `value` (a struct: a non-empty JSON object) as one sealed line.
pub(crate) fn seal_line<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = serde_json::to_vec(value)?;
    if out.len() < 3 || out.first() != Some(&b'{') || out.last() != Some(&b'}') {
        return Err(serde::ser::Error::custom(
            "a sealed line must be a non-empty JSON object",
        ));
    }
    out.pop();
    Ok(with_trailer(out, LINE_HEAD, LINE_TAIL))
}

/// Checks the seal of one line (with its final newline) written by [`seal_line`].
pub(crate) fn check_line(line: &[u8]) -> Seal {
    check_trailer(line, LINE_HEAD, LINE_TAIL)
}

/// The outcome of checking a file's seal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seal {
    /// The trailer is intact and the CRC-32 matches: the bytes are the ones written.
    Valid,
    /// There is no intact trailer (an unsealed legacy file, or a damaged trailer).
    Missing,
    /// The trailer is intact but the CRC-32 of the content differs.
    Mismatch { stored: u32, computed: u32 },
}

/// Checks the seal of `bytes`.
pub(crate) fn check(bytes: &[u8]) -> Seal {
    check_trailer(bytes, TRAILER_HEAD, TRAILER_TAIL)
}

/// Checks a trailer `head`, 8 hex digits, `tail` at the end of `bytes` (after at least one
/// byte of content) and the CRC-32 of the content before it.
fn check_trailer(bytes: &[u8], trailer_head: &[u8], trailer_tail: &[u8]) -> Seal {
    let trailer_len = trailer_head.len() + DIGITS + trailer_tail.len();
    if bytes.len() < trailer_len + 1 {
        return Seal::Missing;
    }
    let (content, trailer) = bytes.split_at(bytes.len() - trailer_len);
    let (head, rest) = trailer.split_at(trailer_head.len());
    let (digits, tail) = rest.split_at(DIGITS);
    if head != trailer_head
        || tail != trailer_tail
        || !digits
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    {
        return Seal::Missing;
    }
    let Some(stored) = std::str::from_utf8(digits)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
    else {
        return Seal::Missing;
    };
    let computed = crc32fast::hash(content);
    if computed == stored {
        Seal::Valid
    } else {
        Seal::Mismatch { stored, computed }
    }
}

/// Why a state file was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Damaged: what is wrong with it.
    Corrupt(String),
    /// Intact (or unsealed) but of another format: the format string found.
    Foreign(String),
}

/// A state file's content, by format generation.
#[derive(Debug)]
pub(crate) enum Read<T, L> {
    /// The current, sealed format.
    Current(T),
    /// The previous, unsealed format (`.../1`), read as before.
    Legacy(L),
}

#[derive(serde::Deserialize)]
struct Head {
    format: String,
}

/// Decodes a state file of format `format` (sealed) or `legacy` (unsealed).
///
/// * sealed and intact: its `format` must be `format` (another one is
///   [`Refusal::Foreign`]), and the content must decode as `T`;
/// * a broken seal (intact trailer, wrong CRC) is [`Refusal::Corrupt`];
/// * no intact trailer: a file whose `format` is `legacy` is decoded as `L`; one that says
///   `format` lost its checksum ([`Refusal::Corrupt`]); anything else is foreign or
///   corrupt.
pub(crate) fn read<T: DeserializeOwned, L: DeserializeOwned>(
    bytes: &[u8],
    format: &str,
    legacy: &str,
) -> Result<Read<T, L>, Refusal> {
    if bytes.is_empty() {
        return Err(Refusal::Corrupt("the file is empty".into()));
    }
    match check(bytes) {
        Seal::Mismatch { stored, computed } => Err(Refusal::Corrupt(format!(
            "the CRC-32 of its content is {computed:08x}, its checksum says {stored:08x}"
        ))),
        Seal::Valid => {
            let head: Head = serde_json::from_slice(bytes).map_err(|e| {
                Refusal::Corrupt(format!("checksum intact but no format member: {e}"))
            })?;
            if head.format != format {
                return Err(Refusal::Foreign(head.format.chars().take(80).collect()));
            }
            serde_json::from_slice(bytes)
                .map(Read::Current)
                .map_err(|e| Refusal::Corrupt(format!("checksum intact but content invalid: {e}")))
        }
        Seal::Missing => {
            let head: Head = serde_json::from_slice(bytes).map_err(|e| {
                Refusal::Corrupt(format!("no intact checksum trailer, and not JSON: {e}"))
            })?;
            if head.format == format {
                Err(Refusal::Corrupt(
                    "its checksum trailer (the last member, \"crc32\") is missing or damaged"
                        .into(),
                ))
            } else if head.format == legacy {
                serde_json::from_slice(bytes)
                    .map(Read::Legacy)
                    .map_err(|e| Refusal::Corrupt(format!("not a valid {legacy} file: {e}")))
            } else {
                Err(Refusal::Foreign(head.format.chars().take(80).collect()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct T {
        format: String,
        n: u64,
        s: String,
    }

    fn t() -> T {
        T {
            format: "x/2".into(),
            n: 7,
            s: "hello \"world\"\n".into(),
        }
    }

    #[test]
    fn sealed_file_is_json_and_round_trips() {
        let bytes = seal(&t()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["n"], 7);
        assert_eq!(v["crc32"].as_str().unwrap().len(), 8);
        assert_eq!(check(&bytes), Seal::Valid);
        match read::<T, T>(&bytes, "x/2", "x/1").unwrap() {
            Read::Current(got) => assert_eq!(got, t()),
            Read::Legacy(_) => panic!("legacy"),
        }
    }

    #[test]
    fn every_changed_byte_is_refused_as_corrupt() {
        let good = seal(&t()).unwrap();
        for pos in 0..good.len() {
            for v in 0..=255u8 {
                if v == good[pos] {
                    continue;
                }
                let mut bad = good.clone();
                bad[pos] = v;
                assert!(
                    matches!(read::<T, T>(&bad, "x/2", "x/1"), Err(Refusal::Corrupt(_))),
                    "byte {pos} set to {v:#04x} was not refused as corrupt"
                );
            }
        }
        // Truncated at any length, or extended.
        for len in 0..good.len() {
            assert!(read::<T, T>(&good[..len], "x/2", "x/1").is_err(), "{len}");
        }
        let mut longer = good.clone();
        longer.push(b'\n');
        assert!(read::<T, T>(&longer, "x/2", "x/1").is_err());
    }

    #[test]
    fn a_sealed_line_is_one_json_line_and_every_changed_byte_breaks_it() {
        let line = seal_line(&t()).unwrap();
        assert_eq!(line.iter().position(|&b| b == b'\n'), Some(line.len() - 1));
        assert_eq!(line.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["s"], "hello \"world\"\n");
        assert_eq!(check_line(&line), Seal::Valid);
        for pos in 0..line.len() {
            for v in [0u8, b'\n', b'0', b'a', line[pos] ^ 1, line[pos] ^ 0x80] {
                if v == line[pos] {
                    continue;
                }
                let mut bad = line.clone();
                bad[pos] = v;
                assert_ne!(check_line(&bad), Seal::Valid, "byte {pos} set to {v:#04x}");
            }
        }
        for len in 0..line.len() {
            assert_ne!(check_line(&line[..len]), Seal::Valid, "{len}");
        }
        // The multi-line trailer is not a line's, nor the other way round.
        assert_eq!(check(&line), Seal::Missing);
        assert_eq!(check_line(&seal(&t()).unwrap()), Seal::Missing);
    }

    #[test]
    fn legacy_and_foreign_formats() {
        let legacy = br#"{"format":"x/1","n":1,"s":""}"#;
        assert!(matches!(
            read::<T, T>(legacy, "x/2", "x/1"),
            Ok(Read::Legacy(_))
        ));
        let foreign = seal(&T {
            format: "x/9".into(),
            ..t()
        })
        .unwrap();
        assert_eq!(
            read::<T, T>(&foreign, "x/2", "x/1").unwrap_err(),
            Refusal::Foreign("x/9".into())
        );
        // A current-format file without its trailer lost its checksum.
        let unsealed = serde_json::to_vec(&t()).unwrap();
        assert!(matches!(
            read::<T, T>(&unsealed, "x/2", "x/1"),
            Err(Refusal::Corrupt(_))
        ));
    }
}
