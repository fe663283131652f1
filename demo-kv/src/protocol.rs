//! The line protocol of `mk-demo-kv`.
//!
//! One request per line (`\n`, an optional `\r` before it is ignored), fields separated
//! by single or repeated spaces; one response line per request, in order (pipelining is
//! allowed):
//!
//! | request               | response                                    |
//! |-----------------------|---------------------------------------------|
//! | `SET <key> <value>`   | `OK <seq>` (seq: the record's position in the log) |
//! | `GET <key>`           | `VALUE <value>` or `NOTFOUND`               |
//! | `PING`                | `PONG`                                      |
//! | `STATS`               | `STATS keys=<n> records=<n> used_bytes=<n> capacity=<n> max_capacity=<n>` |
//! | anything else         | `ERR <reason>`                              |
//!
//! Keys are 1..=250 and values 1..=65536 bytes of printable ASCII without space
//! (`0x21..=0x7e`); a line is at most [`MAX_LINE`] bytes (a longer one gets
//! `ERR line too long` and the connection is closed, since the stream cannot be resynced).
//!
//! HTTP health check: a first line `GET /health HTTP/1.x` is answered with
//! `HTTP/1.0 200 OK` and body `ok` (or `503 Service Unavailable` when the store is
//! inconsistent) after the request headers are read, then the connection is closed; any
//! other `GET <path> HTTP/1.x` gets `404 Not Found`.

use super::log::{ItemError, MAX_KEY_LEN, MAX_VALUE_LEN, check_item};

/// Longest request line, terminator included.
pub const MAX_LINE: usize = 4 + 1 + MAX_KEY_LEN + 1 + MAX_VALUE_LEN + 2;

/// A parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Set {
        key: &'a [u8],
        value: &'a [u8],
    },
    Get {
        key: &'a [u8],
    },
    Ping,
    Stats,
    /// An HTTP/1.x `GET` request line.
    HttpGet {
        path: &'a [u8],
    },
}

/// Why a line was refused (sent as `ERR <reason>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("empty command")]
    Empty,
    #[error("unknown command {0:?} (expected SET, GET, PING or STATS)")]
    Unknown(String),
    #[error("{cmd} takes {expected}, got {got} argument(s)")]
    Arity {
        cmd: &'static str,
        expected: &'static str,
        got: usize,
    },
    #[error(transparent)]
    Item(#[from] ItemError),
}

/// Parses one request line (without its `\n`).
pub fn parse_line(line: &[u8]) -> Result<Request<'_>, ProtoError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|b| *b == b' ').filter(|p| !p.is_empty());
    let Some(cmd) = parts.next() else {
        return Err(ProtoError::Empty);
    };
    let args: Vec<&[u8]> = parts.take(4).collect();
    match cmd {
        b"SET" => match args[..] {
            [key, value] => {
                check_item("key", key, MAX_KEY_LEN)?;
                check_item("value", value, MAX_VALUE_LEN)?;
                Ok(Request::Set { key, value })
            }
            _ => Err(arity("SET", "<key> <value>", args.len())),
        },
        b"GET" => match args[..] {
            [key] => {
                check_item("key", key, MAX_KEY_LEN)?;
                Ok(Request::Get { key })
            }
            [path, version] if version.starts_with(b"HTTP/1.") => Ok(Request::HttpGet { path }),
            _ => Err(arity("GET", "<key>", args.len())),
        },
        b"PING" if args.is_empty() => Ok(Request::Ping),
        b"PING" => Err(arity("PING", "no arguments", args.len())),
        b"STATS" if args.is_empty() => Ok(Request::Stats),
        b"STATS" => Err(arity("STATS", "no arguments", args.len())),
        other => Err(ProtoError::Unknown(
            String::from_utf8_lossy(&other[..other.len().min(32)]).into_owned(),
        )),
    }
}

fn arity(cmd: &'static str, expected: &'static str, got: usize) -> ProtoError {
    ProtoError::Arity { cmd, expected, got }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse_line(b"SET k v").unwrap(),
            Request::Set {
                key: b"k",
                value: b"v"
            }
        );
        assert_eq!(parse_line(b"GET  k\r").unwrap(), Request::Get { key: b"k" });
        assert_eq!(parse_line(b"PING").unwrap(), Request::Ping);
        assert_eq!(parse_line(b"STATS").unwrap(), Request::Stats);
        assert_eq!(
            parse_line(b"GET /health HTTP/1.1\r").unwrap(),
            Request::HttpGet { path: b"/health" }
        );
    }

    #[test]
    fn refuses_malformed() {
        assert_eq!(parse_line(b""), Err(ProtoError::Empty));
        assert_eq!(parse_line(b"   "), Err(ProtoError::Empty));
        assert!(matches!(
            parse_line(b"set k v"),
            Err(ProtoError::Unknown(_))
        ));
        assert!(matches!(
            parse_line(b"SET k"),
            Err(ProtoError::Arity { got: 1, .. })
        ));
        assert!(matches!(
            parse_line(b"SET k v w"),
            Err(ProtoError::Arity { got: 3, .. })
        ));
        assert!(matches!(parse_line(b"GET"), Err(ProtoError::Arity { .. })));
        assert!(matches!(
            parse_line(b"GET a b"),
            Err(ProtoError::Arity { .. })
        ));
        assert!(matches!(
            parse_line(b"PING x"),
            Err(ProtoError::Arity { .. })
        ));
        assert!(matches!(
            parse_line(b"SET k\tx v"),
            Err(ProtoError::Item(_))
        ));
        let long = format!("SET {} v", "k".repeat(MAX_KEY_LEN + 1));
        let err = parse_line(long.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("key is 251 bytes"), "{err}");
        assert!(matches!(
            parse_line(b"SET k \xff"),
            Err(ProtoError::Item(_))
        ));
    }
}
