//! Shared helpers for the integration tests.
//!
//! - `dns`: a real DNS server in-process (hickory-server) for the test zones;
//! - `sink`: an SMTP server standing in for the real MX, recording and scriptable;
//! - `node`: runs the `magicmx` binary with a generated config and its logs;
//! - `client`: a raw SMTP client (exact bytes, multi-line replies, deadlines);
//! - `tls`: rcgen certificates and rustls configurations.
//!
//! Every integration test file does `mod common;` and uses part of it.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod dns;
pub mod inproc;
pub mod io;
pub mod node;
pub mod sink;
pub mod tls;

use std::time::{Duration, Instant};

pub use client::{send_mail, simple_message, Client, Next, Reply};
pub use dns::{DnsServer, Rec};
pub use node::{Node, NodeConf};
pub use sink::{Sink, Txn};

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Splits delivered data into the first header field (which must be the
/// `Received:` the node added, folded lines included) and the rest.
pub fn split_first_header(data: &[u8]) -> (&[u8], &[u8]) {
    let mut end = 0;
    loop {
        let Some(pos) = data[end..].windows(2).position(|w| w == b"\r\n") else {
            return (data, &[]);
        };
        end += pos + 2;
        match data.get(end) {
            Some(b' ') | Some(b'\t') => continue,
            _ => return data.split_at(end),
        }
    }
}

/// Number of header lines (in the header section only) named `name`.
pub fn count_header(data: &[u8], name: &str) -> usize {
    let text = String::from_utf8_lossy(data);
    let header = text.split("\r\n\r\n").next().unwrap_or("");
    let prefix = format!("{}:", name.to_ascii_lowercase());
    header
        .split("\r\n")
        .filter(|l| l.to_ascii_lowercase().starts_with(&prefix))
        .count()
}

/// Offsets of bare CR or bare LF bytes (not part of a CRLF pair).
pub fn bare_cr_lf(data: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, &b) in data.iter().enumerate() {
        let bare = match b {
            b'\r' => data.get(i + 1) != Some(&b'\n'),
            b'\n' => i == 0 || data[i - 1] != b'\r',
            _ => false,
        };
        if bare {
            out.push(i);
        }
    }
    out
}
