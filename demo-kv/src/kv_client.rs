//! A blocking client for the `mk-demo-kv` line protocol, used by the load generator, the
//! tests and the orchestrator's health check.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::protocol::MAX_LINE;

/// Requests sent back to back before reading their responses in [`KvClient::get_many`].
pub const PIPELINE_DEPTH: usize = 64;

/// A failed client operation.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{op} {addr}: {source}")]
    Io {
        op: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("{addr} closed the connection before answering")]
    Closed { addr: SocketAddr },
    #[error("{addr} answered ERR {reason}")]
    Server { addr: SocketAddr, reason: String },
    #[error("{addr} answered {line:?}, expected {expected}")]
    Unexpected {
        addr: SocketAddr,
        line: String,
        expected: &'static str,
    },
}

impl ClientError {
    /// Whether the connection is unusable after this error (reconnect to continue).
    pub fn is_connection_error(&self) -> bool {
        !matches!(self, Self::Server { .. })
    }
}

/// One connection to a server.
#[derive(Debug)]
pub struct KvClient {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    line: Vec<u8>,
}

impl KvClient {
    /// Connects; `timeout` bounds the connect and then every read and write.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, ClientError> {
        let io = |op| move |source| ClientError::Io { op, addr, source };
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(io("connect to"))?;
        stream.set_nodelay(true).map_err(io("setsockopt on"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io("setsockopt on"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io("setsockopt on"))?;
        let reader = BufReader::new(stream.try_clone().map_err(io("dup socket of"))?);
        Ok(Self {
            addr,
            reader,
            writer: stream,
            line: Vec::new(),
        })
    }

    /// The server address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.writer
            .write_all(bytes)
            .map_err(|source| ClientError::Io {
                op: "send to",
                addr: self.addr,
                source,
            })
    }

    /// Reads one response line (without `\n`), bounded in length.
    fn recv(&mut self) -> Result<String, ClientError> {
        self.line.clear();
        let limit = MAX_LINE as u64 + 16;
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut self.line)
            .map_err(|source| ClientError::Io {
                op: "receive from",
                addr: self.addr,
                source,
            })?;
        if n == 0 || self.line.last() != Some(&b'\n') {
            if n as u64 >= limit {
                return Err(self.unexpected("a response line within the length limit"));
            }
            return Err(ClientError::Closed { addr: self.addr });
        }
        self.line.pop();
        let line = String::from_utf8_lossy(&self.line).into_owned();
        if let Some(reason) = line.strip_prefix("ERR ") {
            return Err(ClientError::Server {
                addr: self.addr,
                reason: reason.to_owned(),
            });
        }
        Ok(line)
    }

    fn unexpected(&self, expected: &'static str) -> ClientError {
        ClientError::Unexpected {
            addr: self.addr,
            line: String::from_utf8_lossy(&self.line[..self.line.len().min(200)]).into_owned(),
            expected,
        }
    }

    /// Sends one raw request line (a `\n` is appended) and returns the response line.
    /// `ERR` responses are returned as [`ClientError::Server`].
    pub fn request(&mut self, line: &str) -> Result<String, ClientError> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.send(&buf)?;
        self.recv()
    }

    /// `SET key value`; returns the sequence number the server acknowledged.
    pub fn set(&mut self, key: &str, value: &str) -> Result<u64, ClientError> {
        let resp = self.request(&format!("SET {key} {value}"))?;
        resp.strip_prefix("OK ")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.unexpected("OK <seq>"))
    }

    fn parse_get(&self, resp: &str) -> Result<Option<String>, ClientError> {
        if resp == "NOTFOUND" {
            return Ok(None);
        }
        resp.strip_prefix("VALUE ")
            .map(|v| Some(v.to_owned()))
            .ok_or_else(|| self.unexpected("VALUE <value> or NOTFOUND"))
    }

    /// `GET key`.
    pub fn get(&mut self, key: &str) -> Result<Option<String>, ClientError> {
        let resp = self.request(&format!("GET {key}"))?;
        self.parse_get(&resp)
    }

    /// `GET` of many keys, pipelined [`PIPELINE_DEPTH`] at a time; results in key order.
    pub fn get_many(&mut self, keys: &[String]) -> Result<Vec<Option<String>>, ClientError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(PIPELINE_DEPTH) {
            let mut buf = Vec::new();
            for k in chunk {
                buf.extend_from_slice(b"GET ");
                buf.extend_from_slice(k.as_bytes());
                buf.push(b'\n');
            }
            self.send(&buf)?;
            for _ in chunk {
                let resp = self.recv()?;
                out.push(self.parse_get(&resp)?);
            }
        }
        Ok(out)
    }

    /// `PING`, expecting `PONG`.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        let resp = self.request("PING")?;
        if resp == "PONG" {
            Ok(())
        } else {
            Err(self.unexpected("PONG"))
        }
    }

    /// `STATS`; returns the `key=value` pairs.
    pub fn stats(&mut self) -> Result<Vec<(String, u64)>, ClientError> {
        let resp = self.request("STATS")?;
        let Some(rest) = resp.strip_prefix("STATS ") else {
            return Err(self.unexpected("STATS key=value ..."));
        };
        rest.split(' ')
            .map(|kv| {
                kv.split_once('=')
                    .and_then(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.unexpected("STATS key=value ..."))
    }
}

/// The health check: connect and `PING` within `timeout`.
pub fn health_check(addr: SocketAddr, timeout: Duration) -> Result<(), ClientError> {
    KvClient::connect(addr, timeout)?.ping()
}

/// The HTTP health check: `GET /health HTTP/1.0`; returns the status code.
pub fn http_health(addr: SocketAddr, timeout: Duration) -> Result<u16, ClientError> {
    let mut c = KvClient::connect(addr, timeout)?;
    c.send(b"GET /health HTTP/1.0\r\n\r\n")?;
    let status = c.recv()?;
    status
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.get(2..5))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| c.unexpected("HTTP/1.x <status>"))
}
