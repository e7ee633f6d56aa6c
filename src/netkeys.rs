//! The network's keys: SHA-256 fingerprints of the public keys of node
//! certificates, as the real MX's policy service compares them.
//!
//! A node relays with its network certificate (the one `magicmx ca issue`
//! made for gossip); a real MX running Postfix with
//! `smtpd_tls_ask_ccert = yes` hands the policy service
//! `ccert_pubkey_fingerprint`: the digest (`smtpd_tls_fingerprint_digest`,
//! sha256 by default since Postfix 3.6) of the DER SubjectPublicKeyInfo of
//! the client's certificate, as colon-separated upper-case hex pairs. The
//! TLS handshake proved the client holds the matching private key, so a
//! fingerprint in the network's set identifies a node whatever the
//! certificate's chain (Postfix computes it for unverified certificates
//! too).
//!
//! The set comes from a pinned file (`[policy] network_keys`, appended by
//! `magicmx ca issue`: one `FINGERPRINT NAME` per line, `#` comments) that
//! [`NetworkKeys`] reloads when it changes, and, inside a node, from the
//! live gossip members' certificates. Leaf module: nothing from the crate.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::CertificateDer;

/// SHA-256 of a DER SubjectPublicKeyInfo.
pub type Fingerprint = [u8; 32];

/// Largest pinned file read, in octets (about 100 octets a line).
pub const MAX_FILE: u64 = 4 << 20;
/// Most keys kept from the pinned file.
pub const MAX_KEYS: usize = 100_000;
/// Longest node name kept from a line of the pinned file.
const MAX_NAME: usize = 253;
/// The pinned file is looked at (one `stat`) at most this often.
pub const RECHECK: Duration = Duration::from_secs(1);

/// The fingerprint of the public key of `cert` (DER), as Postfix's
/// `ccert_pubkey_fingerprint` with sha256. `None` if it does not parse.
pub fn of_cert(cert: &[u8]) -> Option<Fingerprint> {
    let der = CertificateDer::from(cert);
    let ee = webpki::EndEntityCert::try_from(&der).ok()?;
    let spki = ee.subject_public_key_info();
    let digest = ring::digest::digest(&ring::digest::SHA256, spki.as_ref());
    digest.as_ref().try_into().ok()
}

/// Postfix's format: `AB:CD:...`, 32 upper-case hex pairs.
pub fn format(fp: &Fingerprint) -> String {
    let mut s = String::with_capacity(95);
    for (i, b) in fp.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push_str(&std::format!("{b:02X}"));
    }
    s
}

/// Why a fingerprint text is not a SHA-256 fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Not hex digits (and colons).
    NotHex,
    /// Hex of another length: 16 octets is MD5, 20 SHA-1 (Postfix's
    /// `smtpd_tls_fingerprint_digest` is not sha256).
    Length(usize),
}

/// A fingerprint from hex, case-insensitive, colons ignored.
pub fn parse(text: &str) -> Result<Fingerprint, ParseError> {
    let mut out = [0u8; 32];
    let mut n = 0usize;
    let mut high: Option<u8> = None;
    for c in text.trim().bytes() {
        if c == b':' {
            continue;
        }
        let v = (c as char).to_digit(16).ok_or(ParseError::NotHex)? as u8;
        match high.take() {
            None => high = Some(v),
            Some(h) => {
                if n < out.len() {
                    out[n] = (h << 4) | v;
                }
                n += 1;
            }
        }
    }
    if high.is_some() {
        return Err(ParseError::NotHex);
    }
    if n != out.len() {
        return Err(ParseError::Length(n));
    }
    Ok(out)
}

/// The keys of a pinned file's text, and the numbers of its bad lines.
/// A line is `FINGERPRINT [NAME]`; blank lines and `#` comments are
/// skipped; at most [`MAX_KEYS`] keys are kept.
pub fn parse_file(text: &str) -> (HashMap<Fingerprint, String>, Vec<usize>) {
    let mut keys = HashMap::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let fp = words.next().map(parse);
        let name: String = words.next().unwrap_or("").chars().take(MAX_NAME).collect();
        match fp {
            Some(Ok(fp)) if keys.len() < MAX_KEYS || keys.contains_key(&fp) => {
                keys.insert(fp, name);
            }
            Some(Ok(_)) => {
                bad.push(i + 1);
            }
            _ => bad.push(i + 1),
        }
    }
    (keys, bad)
}

/// The line `magicmx ca issue` appends for a node.
pub fn line(fp: &Fingerprint, name: &str) -> String {
    std::format!("{} {name}\n", format(fp))
}

/// Appends `line(fp, name)` to `path` (created with mode 0644 if missing),
/// fsynced.
pub fn append(path: &Path, fp: &Fingerprint, name: &str) -> std::io::Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o644);
    }
    let mut f = o.open(path)?;
    // One write: a reader sees the whole line or none of it.
    f.write_all(line(fp, name).as_bytes())?;
    f.sync_all()
}

/// What identifies a version of the file: modification time, length and
/// inode (a file replaced by a rename is a new version even within one
/// tick of the file system's clock).
type Stamp = (Option<SystemTime>, u64, u64);

/// The stamp of a file that could not be looked at.
const GONE: Stamp = (None, u64::MAX, u64::MAX);

struct State {
    keys: HashMap<Fingerprint, String>,
    stamp: Stamp,
    checked: Instant,
}

/// The pinned file of network keys, reloaded when it changes: at most one
/// `stat` per [`RECHECK`], a new read when its modification time or length
/// changed. A file that becomes unreadable, too large or empty of keys is
/// logged and the last good set is kept (a half-copied file does not lock
/// the nodes out).
pub struct NetworkKeys {
    path: PathBuf,
    state: Mutex<State>,
}

impl std::fmt::Debug for NetworkKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkKeys")
            .field("path", &self.path)
            .field("keys", &self.len())
            .finish()
    }
}

fn stamp_of(meta: &std::fs::Metadata) -> Stamp {
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(meta);
    #[cfg(not(unix))]
    let ino = 0;
    (meta.modified().ok(), meta.len(), ino)
}

/// Reads the file if it is not too large.
fn read(path: &Path) -> Result<(String, Stamp), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_FILE {
        return Err(std::format!(
            "{} octets, more than the {MAX_FILE} allowed",
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(std::format!("more than {MAX_FILE} octets"));
    }
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    Ok((text, stamp_of(&meta)))
}

impl NetworkKeys {
    /// Loads `path` now: Err (why, for `policy.network_keys`) if it cannot
    /// be read or is too large. An empty file is fine (no node issued yet).
    pub fn open(path: &Path, now: Instant) -> Result<NetworkKeys, String> {
        let (text, stamp) = read(path).map_err(|e| std::format!("{}: {e}", path.display()))?;
        let (keys, bad) = parse_file(&text);
        if !bad.is_empty() {
            tracing::warn!(file = %path.display(), lines = ?bad, "network_keys: lines skipped (not a SHA-256 fingerprint)");
        }
        tracing::info!(file = %path.display(), keys = keys.len(), "network keys loaded");
        Ok(NetworkKeys {
            path: path.to_path_buf(),
            state: Mutex::new(State {
                keys,
                stamp,
                checked: now,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keys in the set now.
    pub fn len(&self) -> usize {
        self.lock().keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The node name pinned for `fp`, after reloading the file if it
    /// changed (checked at most once per [`RECHECK`] up to `now`).
    pub fn lookup(&self, fp: &Fingerprint, now: Instant) -> Option<String> {
        let mut state = self.lock();
        if now.saturating_duration_since(state.checked) >= RECHECK {
            state.checked = now;
            self.refresh(&mut state);
        }
        state.keys.get(fp).cloned()
    }

    fn refresh(&self, state: &mut State) {
        let stamp = match std::fs::metadata(&self.path) {
            Ok(meta) => stamp_of(&meta),
            Err(e) => {
                if state.stamp != GONE {
                    tracing::warn!(file = %self.path.display(), error = %e, "network_keys: cannot read the file; keeping the keys loaded before");
                    state.stamp = GONE;
                }
                return;
            }
        };
        if stamp == state.stamp {
            return;
        }
        state.stamp = stamp;
        match read(&self.path) {
            Ok((text, stamp)) => {
                state.stamp = stamp;
                let (keys, bad) = parse_file(&text);
                if !bad.is_empty() {
                    tracing::warn!(file = %self.path.display(), lines = ?bad, "network_keys: lines skipped (not a SHA-256 fingerprint)");
                }
                if keys.is_empty() && !state.keys.is_empty() {
                    tracing::warn!(file = %self.path.display(), "network_keys: the file has no key now; keeping the keys loaded before");
                    return;
                }
                tracing::info!(file = %self.path.display(), keys = keys.len(), "network keys reloaded");
                metrics::counter!("magicmx_policy_network_keys_reloads_total").increment(1);
                state.keys = keys;
            }
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "network_keys: cannot read the file; keeping the keys loaded before");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POSTFIX_STYLE: &str =
        "7A:0B:1C:2D:3E:4F:50:61:72:83:94:A5:B6:C7:D8:E9:FA:0B:1C:2D:3E:4F:50:61:72:83:94:A5:B6:C7:D8:E9";

    #[test]
    fn parse_and_format_round_trip() {
        let fp = parse(POSTFIX_STYLE).unwrap();
        assert_eq!(fp[0], 0x7a);
        assert_eq!(fp[31], 0xe9);
        assert_eq!(format(&fp), POSTFIX_STYLE);
        // Case and colons do not matter.
        assert_eq!(parse(&POSTFIX_STYLE.to_lowercase()), Ok(fp));
        assert_eq!(parse(&POSTFIX_STYLE.replace(':', "")), Ok(fp));
        assert_eq!(parse(&std::format!("  {POSTFIX_STYLE}\n")), Ok(fp));
    }

    #[test]
    fn parse_refuses_what_is_not_sha256() {
        assert_eq!(parse(""), Err(ParseError::Length(0)));
        // MD5 and SHA-1 fingerprints (another smtpd_tls_fingerprint_digest).
        assert_eq!(
            parse(&("AB:".repeat(15) + "AB")),
            Err(ParseError::Length(16))
        );
        assert_eq!(parse(&"ab".repeat(20)), Err(ParseError::Length(20)));
        assert_eq!(parse(&"ab".repeat(33)), Err(ParseError::Length(33)));
        assert_eq!(
            parse(&POSTFIX_STYLE.replace('7', "g")),
            Err(ParseError::NotHex)
        );
        assert_eq!(parse(&POSTFIX_STYLE[1..]), Err(ParseError::NotHex));
        assert_eq!(parse("é"), Err(ParseError::NotHex));
        assert_eq!(parse(&"a".repeat(100_000)), Err(ParseError::Length(50_000)));
    }

    #[test]
    fn file_lines() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let text = std::format!(
            "# network keys\n\n{}{} # renewed\n{}\nnot-hex node3\nAB:CD node4\n",
            line(&a, "node1"),
            format(&b).to_lowercase() + " node2",
            format(&[3u8; 32]),
        );
        let (keys, bad) = parse_file(&text);
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[&a], "node1");
        assert_eq!(keys[&b], "node2");
        assert_eq!(keys[&[3u8; 32]], "");
        assert_eq!(bad, vec![6, 7]);
    }

    #[test]
    fn file_is_bounded() {
        let mut text = String::new();
        for i in 0..(MAX_KEYS + 10) as u32 {
            let mut fp = [0u8; 32];
            fp[..4].copy_from_slice(&i.to_be_bytes());
            text.push_str(&line(&fp, "n"));
        }
        let (keys, bad) = parse_file(&text);
        assert_eq!(keys.len(), MAX_KEYS);
        assert_eq!(bad.len(), 10);
    }

    #[test]
    fn fingerprint_of_a_certificate_is_of_its_public_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let a = rcgen::CertificateParams::new(vec!["a.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let b = rcgen::CertificateParams::new(vec!["b.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let fa = of_cert(a.der()).unwrap();
        // Same key, another certificate: same fingerprint.
        assert_eq!(of_cert(b.der()), Some(fa));
        use rcgen::PublicKeyData;
        let want = ring::digest::digest(&ring::digest::SHA256, &key.subject_public_key_info());
        assert_eq!(&fa[..], want.as_ref());
        let other = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
        assert_ne!(of_cert(other.cert.der()), Some(fa));
        assert_eq!(of_cert(b"not a certificate"), None);
    }

    #[test]
    fn pinned_file_reloads_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("network_keys");
        assert!(NetworkKeys::open(&path, Instant::now()).is_err(), "missing");
        std::fs::write(&path, "").unwrap();
        let t0 = Instant::now();
        let keys = NetworkKeys::open(&path, t0).unwrap();
        assert!(keys.is_empty());
        let (a, b) = ([0xaa; 32], [0xbb; 32]);
        append(&path, &a, "node1").unwrap();
        // Not looked at again before RECHECK.
        assert_eq!(keys.lookup(&a, t0), None);
        let t1 = t0 + RECHECK;
        assert_eq!(keys.lookup(&a, t1).as_deref(), Some("node1"));
        append(&path, &b, "node2").unwrap();
        let t2 = t1 + RECHECK;
        assert_eq!(keys.lookup(&b, t2).as_deref(), Some("node2"));
        assert_eq!(keys.len(), 2);
        // Replaced by a file without node1.
        std::fs::write(&path, line(&b, "node2")).unwrap();
        let t3 = t2 + RECHECK;
        assert_eq!(keys.lookup(&a, t3), None);
        assert_eq!(keys.len(), 1);
        // Gone, too large, or empty: the last good set stays.
        std::fs::remove_file(&path).unwrap();
        let t4 = t3 + RECHECK;
        assert_eq!(keys.lookup(&b, t4).as_deref(), Some("node2"));
        std::fs::write(&path, vec![b'#'; MAX_FILE as usize + 1]).unwrap();
        let t5 = t4 + RECHECK;
        assert_eq!(keys.lookup(&b, t5).as_deref(), Some("node2"));
        std::fs::write(&path, "# nothing\n").unwrap();
        let t6 = t5 + RECHECK;
        assert_eq!(keys.lookup(&b, t6).as_deref(), Some("node2"));
        // And back.
        std::fs::write(&path, line(&a, "node1")).unwrap();
        let t7 = t6 + RECHECK;
        assert_eq!(keys.lookup(&a, t7).as_deref(), Some("node1"));
        assert_eq!(keys.lookup(&b, t7), None);
        // Too large at start: refused with a reason.
        std::fs::write(&path, vec![b'#'; MAX_FILE as usize + 1]).unwrap();
        let e = NetworkKeys::open(&path, t7).unwrap_err();
        assert!(e.contains("octets"), "{e}");
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_fingerprint_round_trips(fp in any::<[u8; 32]>(), lower in any::<bool>(), colons in any::<bool>()) {
            let mut text = format(&fp);
            if lower {
                text = text.to_lowercase();
            }
            if !colons {
                text = text.replace(':', "");
            }
            prop_assert_eq!(parse(&text), Ok(fp));
        }

        #[test]
        fn any_text_parses_or_not_without_panic(text in ".{0,200}") {
            let _ = parse(&text);
            let (keys, _) = parse_file(&text);
            prop_assert!(keys.len() <= 1 + text.lines().count());
        }
    }
}
