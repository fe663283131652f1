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
const TRAILER_LEN: usize = TRAILER_HEAD.len() + DIGITS + TRAILER_TAIL.len();

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
    let crc = crc32fast::hash(&out);
    out.reserve(TRAILER_LEN);
    out.extend_from_slice(TRAILER_HEAD);
    out.extend_from_slice(format!("{crc:08x}").as_bytes());
    out.extend_from_slice(TRAILER_TAIL);
    Ok(out)
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
    if bytes.len() < TRAILER_LEN + 1 {
        return Seal::Missing;
    }
    let (content, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
    let (head, rest) = trailer.split_at(TRAILER_HEAD.len());
    let (digits, tail) = rest.split_at(DIGITS);
    if head != TRAILER_HEAD
        || tail != TRAILER_TAIL
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
