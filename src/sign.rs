//! DKIM signatures on relayed mail, and the `Authentication-Results` the
//! node vouches for.
//!
//! A real MX that subscribes to a network cannot list every node's address;
//! it can check a DKIM signature instead. Each node signs the mail it
//! accepts for the network's domains with `d=` the network's signing domain
//! (`[sign] domain`) and `s=` its own selector (`[sign] selector`, default
//! the node name) with the key type appended (`n1-ed25519`, `n1-rsa`: one
//! record per name), once with Ed25519 and once with RSA-2048 (RFC 8463
//! dual signing: not every verifier knows Ed25519).
//!
//! Data enters at acceptance: [`Signer::seal`] takes the client's message
//! and the node's `Received:` header just before the spool stores them, so
//! the signature covers that `Received:` and is made once, however many
//! times the relay retries. It
//! 1. removes the `Authentication-Results` headers that carry the network's
//!    authserv-id ([`strip_auth_results`]): a client may forge them, and
//!    the real MX trusts them because they name the network;
//! 2. verifies the client's DKIM signatures and the SPF of its MAIL FROM
//!    through the node's resolver, bounded by a few DNS timeouts and
//!    failing open (`temperror`), and adds its own `Authentication-Results`;
//! 3. signs the usual header set plus every `Received:` (the node's on top)
//!    with each key, off the async runtime.
//!
//! Keys are files under `data_dir/dkim/` ([`key_path`]): PEM, PKCS#8 for
//! Ed25519 and PKCS#1 for RSA, mode 0600, made on first start or by
//! `magicmx sign init` ([`load_or_create`]); their contents are never logged.
//! [`records`] and [`zone_text`] give the selector TXT records to publish
//! (`magicmx zone --dkim`); `crate::zone::check_dkim` compares what the DNS
//! says with them.

use std::borrow::Cow;
use std::fmt;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use mail_auth::{AuthenticatedMessage, AuthenticationResults, MessageAuthenticator};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use tracing::{info, warn};

use crate::config::{SignAlgorithm, Signing};

/// Folder of the key files, under `node.data_dir`.
pub const KEY_DIR: &str = "dkim";
/// Bits of the RSA keys the node makes.
pub const RSA_BITS: usize = 2048;

/// Headers signed when present (RFC 6376 5.4.1's list, trimmed to what
/// mail carries), and signed as absent when missing, so that a header added
/// in transit breaks the signature. Every `Received:` is signed too.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-ID",
    "Content-Description",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Received",
];

/// A message with more `DKIM-Signature` headers than this is not verified
/// (`dkim=permerror`): each may cost a body hash and a DNS lookup.
pub const MAX_VERIFIED_SIGNATURES: usize = 8;

/// Why keys cannot be loaded or made. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a usable {what} private key: {message}", path.display())]
    BadKey {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("{} is missing (make it with `magicmx sign init`)", path.display())]
    Missing { path: PathBuf },
    #[error("cannot make a {what} key: {message}")]
    Generate { what: &'static str, message: String },
}

/// The key file of `algorithm` for `selector`: `data_dir/dkim/<selector>.<k>.pem`.
pub fn key_path(data_dir: &Path, selector: &str, algorithm: SignAlgorithm) -> PathBuf {
    data_dir
        .join(KEY_DIR)
        .join(format!("{selector}.{}.pem", algorithm.key_type()))
}

/// One loaded private key, ready to sign for the configured domain and
/// selector, with its public half.
pub struct Key {
    algorithm: SignAlgorithm,
    public: Vec<u8>,
    signer: KeySigner,
}

enum KeySigner {
    Ed25519(DkimSigner<Ed25519Key, Done>),
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key itself.
        f.debug_struct("Key")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Key {
    pub fn algorithm(&self) -> SignAlgorithm {
        self.algorithm
    }

    /// The `p=` value of the key record: the raw 32-octet key for Ed25519
    /// (RFC 8463), a SubjectPublicKeyInfo for RSA (what verifiers expect).
    pub fn public_key(&self) -> &[u8] {
        &self.public
    }

    /// The `DKIM-Signature` header of `message`.
    fn sign(&self, message: &[u8]) -> Result<String, mail_auth::Error> {
        Ok(match &self.signer {
            KeySigner::Ed25519(s) => s.sign(message)?.to_header(),
            KeySigner::Rsa(s) => s.sign(message)?.to_header(),
        })
    }

    fn load(path: &Path, algorithm: SignAlgorithm, signing: &Signing) -> Result<Key, SignError> {
        let what = algorithm.key_type();
        let bad = |message: String| SignError::BadKey {
            path: path.to_path_buf(),
            what,
            message,
        };
        let text = std::fs::read(path).map_err(|source| SignError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // The PEM parser's errors name no key material.
        let der = PrivateKeyDer::from_pem_slice(&text).map_err(|e| bad(e.to_string()))?;
        let headers = SIGNED_HEADERS.iter().copied();
        let (public, signer) = match algorithm {
            SignAlgorithm::Ed25519 => {
                let PrivateKeyDer::Pkcs8(k) = der else {
                    return Err(bad("expected a PKCS#8 \"PRIVATE KEY\"".into()));
                };
                // Version 1 (openssl genpkey) or 2 (ring) PKCS#8.
                let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(k.secret_pkcs8_der())
                    .map_err(|e| bad(e.to_string()))?;
                let public = key.public_key();
                let s = DkimSigner::from_key(key)
                    .domain(&signing.domain)
                    .selector(key_selector(signing, algorithm))
                    .headers(headers);
                (public, KeySigner::Ed25519(s))
            }
            SignAlgorithm::Rsa => {
                let key = RsaKey::<Sha256>::from_key_der(der).map_err(|e| bad(e.to_string()))?;
                let public = rsa_spki(&key.public_key());
                let s = DkimSigner::from_key(key)
                    .domain(&signing.domain)
                    .selector(key_selector(signing, algorithm))
                    .headers(headers);
                (public, KeySigner::Rsa(s))
            }
        };
        Ok(Key {
            algorithm,
            public,
            signer,
        })
    }

    /// A new key as PEM text.
    fn generate(algorithm: SignAlgorithm) -> Result<String, SignError> {
        let what = algorithm.key_type();
        let fail = |message: String| SignError::Generate { what, message };
        match algorithm {
            SignAlgorithm::Ed25519 => {
                let der = Ed25519Key::generate_pkcs8().map_err(|e| fail(e.to_string()))?;
                Ok(pem("PRIVATE KEY", &der))
            }
            SignAlgorithm::Rsa => {
                let pair = mail_auth::dkim::generate::DkimKeyPair::generate_rsa(RSA_BITS)
                    .map_err(|e| fail(e.to_string()))?;
                Ok(pem("RSA PRIVATE KEY", pair.private_key()))
            }
        }
    }
}

/// The node's signing keys, one per configured algorithm, in that order.
#[derive(Debug)]
pub struct Keys {
    pub keys: Vec<Key>,
}

/// Loads the keys `signing` names from `data_dir`; with `create`, makes
/// the missing ones first (0600, in a 0700 folder). Returns the keys and the
/// files it made.
pub fn load_or_create(
    signing: &Signing,
    data_dir: &Path,
    create: bool,
) -> Result<(Keys, Vec<PathBuf>), SignError> {
    let mut keys = Vec::new();
    let mut made = Vec::new();
    for &alg in &signing.algorithms {
        let path = key_path(data_dir, &signing.selector, alg);
        if !path.exists() {
            if !create {
                return Err(SignError::Missing { path });
            }
            write_new_key(&path, &Key::generate(alg)?)?;
            info!(path = %path.display(), algorithm = alg.key_type(), "made a DKIM key");
            made.push(path.clone());
        }
        keys.push(Key::load(&path, alg, signing)?);
    }
    Ok((Keys { keys }, made))
}

/// Writes a key file that did not exist: to a temporary name (0600),
/// fsynced, then renamed, so a crash leaves no half key under the real name.
fn write_new_key(path: &Path, pem: &str) -> Result<(), SignError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| SignError::Io { path: p, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    let tmp = path.with_extension("pem.tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
    f.write_all(pem.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// One selector TXT record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// `<selector>-<k>._domainkey.<domain>.`
    pub name: String,
    pub algorithm: SignAlgorithm,
    /// `v=DKIM1; k=...; p=...`
    pub value: String,
}

/// The selector of one key: `<selector>-<k>` (`n1-ed25519`, `n1-rsa`).
/// One name per key, because a verifier that finds several key records at
/// one name may try only the first (RFC 6376 3.6.2.2; dkimpy does).
pub fn key_selector(signing: &Signing, algorithm: SignAlgorithm) -> String {
    format!("{}-{}", signing.selector, algorithm.key_type())
}

/// The name of one key's record: `<selector>-<k>._domainkey.<domain>.`
pub fn record_name(signing: &Signing, algorithm: SignAlgorithm) -> String {
    format!(
        "{}._domainkey.{}.",
        key_selector(signing, algorithm),
        signing.domain
    )
}

/// The TXT records that publish `keys` (pure).
pub fn records(signing: &Signing, keys: &Keys) -> Vec<KeyRecord> {
    keys.keys
        .iter()
        .map(|k| KeyRecord {
            name: record_name(signing, k.algorithm()),
            algorithm: k.algorithm(),
            value: format!(
                "v=DKIM1; k={}; p={}",
                k.algorithm().key_type(),
                base64(k.public_key())
            ),
        })
        .collect()
}

/// The value split into TXT character-strings of at most 255 octets.
pub fn txt_strings(value: &str) -> Vec<String> {
    value
        .as_bytes()
        .chunks(255)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect()
}

/// The records in zone-file syntax, one line each (a long value is several
/// quoted strings on that line, which a resolver joins).
pub fn zone_text(records: &[KeyRecord], ttl: u32) -> String {
    let mut out = String::new();
    for r in records {
        let strings: Vec<String> = txt_strings(&r.value)
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect();
        out += &format!("{}\t{ttl}\tIN\tTXT\t{}\n", r.name, strings.join(" "));
    }
    out
}

/// The `k=` and `p=` tags of a key record (`p` without whitespace).
/// `k` defaults to `rsa` (RFC 6376 3.6.1).
pub fn parse_record(value: &str) -> (String, Option<String>) {
    let mut k = "rsa".to_string();
    let mut p = None;
    for tag in value.split(';') {
        let Some((name, v)) = tag.split_once('=') else {
            continue;
        };
        match name.trim() {
            "k" => k = v.trim().to_ascii_lowercase(),
            "p" => p = Some(v.chars().filter(|c| !c.is_whitespace()).collect()),
            _ => {}
        }
    }
    (k, p)
}

/// SubjectPublicKeyInfo (rsaEncryption) around a PKCS#1 RSAPublicKey.
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    const ALGORITHM: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    let mut inner = ALGORITHM.to_vec();
    inner.extend(der(0x03, &bits));
    der(0x30, &inner)
}

/// One DER tag-length-value.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let len = n.to_be_bytes();
        let skip = len.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (len.len() - skip) as u8);
        out.extend_from_slice(&len[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// Standard base64 with padding (the `base64` crate, already in the build
/// through `pem` and mail-auth).
pub fn base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// PEM text of `der` under `label`, LF line endings.
fn pem(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der), config)
}

/// The byte ranges of the header fields of `message` (folded lines
/// included), and where the header section ends.
fn header_fields(message: &[u8]) -> (Vec<(usize, usize)>, usize) {
    let mut fields: Vec<(usize, usize)> = Vec::new();
    let mut pos = 0;
    while pos < message.len() {
        let end = match message[pos..].windows(2).position(|w| w == b"\r\n") {
            Some(i) => pos + i + 2,
            None => message.len(),
        };
        let line = &message[pos..end];
        if line == b"\r\n" {
            return (fields, pos);
        }
        match (line.first(), fields.last_mut()) {
            (Some(b' ' | b'\t'), Some(last)) => last.1 = end,
            _ => fields.push((pos, end)),
        }
        pos = end;
    }
    (fields, pos)
}

/// The authserv-id of an `Authentication-Results` value (RFC 8601 2.2):
/// the first word after comments and whitespace.
fn authserv_id(value: &[u8]) -> &[u8] {
    let mut i = 0;
    let mut depth = 0usize;
    while i < value.len() {
        match value[i] {
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b'\\' if depth > 0 => i += 1,
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ if depth > 0 => {}
            _ => break,
        }
        i += 1;
    }
    let start = i.min(value.len());
    let end = value[start..]
        .iter()
        .position(|b| matches!(b, b';' | b'(' | b' ' | b'\t' | b'\r' | b'\n'))
        .map_or(value.len(), |n| start + n);
    &value[start..end]
}

/// `message` without its `Authentication-Results` header fields whose
/// authserv-id is `id` (case-insensitive), and how many were removed.
/// The body and every other header are kept byte for byte; with nothing to
/// remove (the usual case), the message itself, not a copy.
pub fn strip_auth_results<'m>(message: &'m [u8], id: &str) -> (Cow<'m, [u8]>, usize) {
    let (fields, _) = header_fields(message);
    let mut out = Vec::new();
    let mut removed = 0;
    let mut last = 0;
    for (start, end) in fields {
        let field = &message[start..end];
        let Some(colon) = field.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = field[..colon].trim_ascii_end();
        if name.eq_ignore_ascii_case(b"Authentication-Results")
            && authserv_id(&field[colon + 1..]).eq_ignore_ascii_case(id.as_bytes())
        {
            if removed == 0 {
                out.reserve(message.len());
            }
            out.extend_from_slice(&message[last..start]);
            last = end;
            removed += 1;
        }
    }
    if removed == 0 {
        return (Cow::Borrowed(message), 0);
    }
    out.extend_from_slice(&message[last..]);
    (Cow::Owned(out), removed)
}

/// Signs accepted mail (see the module docs). Cheap to share.
pub struct Signer {
    signing: Signing,
    keys: Arc<Keys>,
    auth: MessageAuthenticator,
    /// The node's host name (SPF's receiving host).
    hostname: String,
    /// Bound on the SPF and DKIM checks together.
    budget: Duration,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("signing", &self.signing)
            .finish_non_exhaustive()
    }
}

impl Signer {
    pub fn new(
        signing: Signing,
        keys: Keys,
        dns: &crate::dns::Dns,
        hostname: &str,
        dns_timeout: Duration,
    ) -> Signer {
        Signer {
            signing,
            keys: Arc::new(keys),
            auth: MessageAuthenticator(dns.resolver()),
            hostname: hostname.to_string(),
            budget: dns_timeout.saturating_mul(2),
        }
    }

    pub fn signing(&self) -> &Signing {
        &self.signing
    }

    /// The message to store: signatures, the node's
    /// `Authentication-Results`, `received` (the node's trace header), then
    /// `message` without forged `Authentication-Results`.
    ///
    /// Runs on the blocking pool: parsing and hashing a large message
    /// (the client's signatures, then the node's) must not stall the
    /// runtime; its DNS lookups are driven from there. Err only if that task
    /// died (the session answers a temporary failure).
    pub async fn seal(
        self: &Arc<Self>,
        received: String,
        message: Vec<u8>,
        peer: IpAddr,
        helo: String,
        sender: String,
    ) -> Result<Vec<u8>, String> {
        let this = self.clone();
        let handle = tokio::runtime::Handle::current();
        let task = tokio::task::spawn_blocking(move || {
            handle.block_on(this.seal_here(&received, &message, peer, &helo, &sender))
        });
        task.await.map_err(|e| {
            metrics::counter!("magicmx_sign_errors_total").increment(1);
            warn!(error = %e, "DKIM signing task failed");
            e.to_string()
        })
    }

    /// [`Signer::seal`] on the current thread.
    pub async fn seal_here(
        &self,
        received: &str,
        message: &[u8],
        peer: IpAddr,
        helo: &str,
        sender: &str,
    ) -> Vec<u8> {
        let (message, removed) = strip_auth_results(message, &self.signing.authserv_id);
        if removed > 0 {
            metrics::counter!("magicmx_sign_forged_auth_results_total").increment(removed as u64);
            info!(client = %peer, removed, "removed Authentication-Results carrying the network's authserv-id");
        }
        let results = self.auth_results(&message, peer, helo, sender).await;
        let mut out = Vec::with_capacity(message.len() + received.len() + results.len() + 1200);
        out.extend_from_slice(results.as_bytes());
        out.extend_from_slice(received.as_bytes());
        out.extend_from_slice(&message);
        match sign(&self.keys, &out) {
            Ok(sigs) => {
                metrics::counter!("magicmx_sign_signed_total").increment(1);
                // In place: `out` has room for the signatures (reserved above).
                out.splice(0..0, sigs.into_bytes());
                out
            }
            Err(e) => {
                metrics::counter!("magicmx_sign_errors_total").increment(1);
                warn!(error = %e, "DKIM signing failed; relaying unsigned");
                out
            }
        }
    }

    /// The node's `Authentication-Results` header for what it saw: the
    /// client's DKIM signatures and the SPF of its MAIL FROM. Fails open:
    /// a check that does not finish within the budget is `temperror`.
    pub async fn auth_results(
        &self,
        message: &[u8],
        peer: IpAddr,
        helo: &str,
        sender: &str,
    ) -> String {
        let helo_name = if helo.is_empty() { "unknown" } else { helo };
        let id = self.signing.authserv_id.as_str();
        // mail-auth writes `<id>; result...`; the results alone, to join.
        let results = |r: AuthenticationResults| r.to_string()[id.len()..].to_string();
        let dkim = async {
            // Each signature may ask for its own body hash (`l=`) and lookup.
            let (fields, _) = header_fields(message);
            let signatures = fields
                .iter()
                .filter(|(a, b)| {
                    let f = &message[*a..*b];
                    f.len() > 15 && f[..15].eq_ignore_ascii_case(b"DKIM-Signature:")
                })
                .count();
            if signatures > MAX_VERIFIED_SIGNATURES {
                return ";\r\n\tdkim=permerror (too many signatures)".to_string();
            }
            let Some(parsed) = AuthenticatedMessage::parse(message) else {
                return ";\r\n\tdkim=permerror (unparsable message)".to_string();
            };
            let verify = self.auth.verify_dkim(&parsed);
            match tokio::time::timeout(self.budget, verify).await {
                Err(_) => ";\r\n\tdkim=temperror (timed out)".to_string(),
                Ok(out) if out.is_empty() => ";\r\n\tdkim=none".to_string(),
                Ok(out) => {
                    results(AuthenticationResults::new(id).with_dkim_results(&out, parsed.from()))
                }
            }
        };
        let spf = async {
            let params = mail_auth::spf::verify::SpfParameters::verify_mail_from(
                peer,
                helo_name,
                &self.hostname,
                sender,
            );
            match tokio::time::timeout(self.budget, self.auth.verify_spf(params)).await {
                Err(_) => {
                    let from = if sender.is_empty() { "<>" } else { sender };
                    format!(";\r\n\tspf=temperror (timed out) smtp.mailfrom={from}")
                }
                Ok(out) => results(
                    AuthenticationResults::new(id)
                        .with_spf_mailfrom_result(&out, peer, sender, helo_name),
                ),
            }
        };
        let (dkim, spf) = tokio::join!(dkim, spf);
        format!("Authentication-Results: {id}{dkim}{spf}\r\n")
    }
}

/// The `DKIM-Signature` headers of `message` (already carrying the node's
/// `Received:`), one per key, ready to prepend.
pub fn sign(keys: &Keys, message: &[u8]) -> Result<String, mail_auth::Error> {
    let mut out = String::new();
    for key in &keys.keys {
        out.push_str(&key.sign(message)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn der_lengths_use_the_long_form_past_127() {
        assert_eq!(der(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = der(0x04, &[0; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(long.len(), 304);
    }

    #[test]
    fn forged_auth_results_of_the_network_are_removed_others_kept() {
        let msg = b"Authentication-Results: net.test; spf=pass\r\n\
            X-A: 1\r\n\
            authentication-results : (comment) NET.TEST 1;\r\n\tdkim=pass header.d=x\r\n\
            Authentication-Results: other.test; dkim=pass\r\n\
            Authentication-Results: net.testing; dkim=pass\r\n\
            Subject: s\r\n\
            \r\n\
            Authentication-Results: net.test; in the body\r\n";
        let (out, n) = strip_auth_results(msg, "net.test");
        let out = out.into_owned();
        assert_eq!(n, 2);
        assert_eq!(
            out,
            b"X-A: 1\r\n\
            Authentication-Results: other.test; dkim=pass\r\n\
            Authentication-Results: net.testing; dkim=pass\r\n\
            Subject: s\r\n\
            \r\n\
            Authentication-Results: net.test; in the body\r\n"
                .to_vec()
        );
        // Nothing to remove: the same bytes.
        let (same, n) = strip_auth_results(&out, "net.test");
        assert!(
            matches!(same, Cow::Borrowed(_)),
            "copied with nothing to remove"
        );
        assert_eq!((same.into_owned(), n), (out.clone(), 0));
        // A message with no body separator, and an empty one.
        assert_eq!(
            owned(strip_auth_results(
                b"Authentication-Results: net.test",
                "net.test"
            )),
            (Vec::new(), 1)
        );
        assert_eq!(owned(strip_auth_results(b"", "net.test")), (Vec::new(), 0));
    }

    fn owned((m, n): (Cow<'_, [u8]>, usize)) -> (Vec<u8>, usize) {
        (m.into_owned(), n)
    }

    #[test]
    fn authserv_id_skips_comments_and_stops_at_the_version_or_semicolon() {
        assert_eq!(authserv_id(b" a.test; x"), b"a.test");
        assert_eq!(authserv_id(b" (c (nested) \\) ) a.test 1; x"), b"a.test");
        assert_eq!(authserv_id(b"a.test(c); x"), b"a.test");
        assert_eq!(authserv_id(b"   "), b"");
        assert_eq!(authserv_id(b"(unclosed"), b"");
    }

    #[test]
    fn strip_never_panics_on_any_split_of_a_message() {
        let msg = b"Authentication-Results: n; a\r\n\tb\r\nX: y\r\n\r\nbody\r\n";
        for cut in 0..=msg.len() {
            let (out, _) = strip_auth_results(&msg[..cut], "n");
            assert!(out.len() <= cut);
        }
    }

    fn signing(dir: &Path) -> (Signing, Keys) {
        let s = Signing {
            domain: "net.test".into(),
            selector: "n1".into(),
            authserv_id: "net.test".into(),
            algorithms: vec![SignAlgorithm::Ed25519, SignAlgorithm::Rsa],
        };
        let (keys, made) = load_or_create(&s, dir, true).unwrap();
        assert_eq!(made.len(), 2);
        (s, keys)
    }

    #[test]
    fn keys_are_made_once_private_and_reloaded_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (s, keys) = signing(dir.path());
        let first = records(&s, &keys);
        #[cfg(unix)]
        for alg in [SignAlgorithm::Ed25519, SignAlgorithm::Rsa] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key_path(dir.path(), "n1", alg))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (again, made) = load_or_create(&s, dir.path(), false).unwrap();
        assert!(made.is_empty());
        assert_eq!(records(&s, &again), first);
        assert_eq!(first[0].name, "n1-ed25519._domainkey.net.test.");
        assert_eq!(first[1].name, "n1-rsa._domainkey.net.test.");
        assert!(first[0].value.starts_with("v=DKIM1; k=ed25519; p="));
        assert!(first[1]
            .value
            .starts_with("v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A"));
        // A missing key without `create` names the file.
        let other = Signing {
            selector: "n2".into(),
            ..s.clone()
        };
        let e = load_or_create(&other, dir.path(), false).unwrap_err();
        assert!(e.to_string().contains("n2.ed25519.pem"), "{e}");
        // A damaged key names the file and not its contents.
        let p = key_path(dir.path(), "n1", SignAlgorithm::Rsa);
        std::fs::write(
            &p,
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = load_or_create(&s, dir.path(), false).unwrap_err();
        assert!(e.to_string().contains("n1.rsa.pem"), "{e}");
        assert!(!e.to_string().contains("AAAA"), "{e}");
    }

    #[test]
    fn zone_text_splits_long_values_into_255_octet_strings() {
        let dir = tempfile::tempdir().unwrap();
        let (s, keys) = signing(dir.path());
        let recs = records(&s, &keys);
        let text = zone_text(&recs, 300);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with(
            "n1-ed25519._domainkey.net.test.\t300\tIN\tTXT\t\"v=DKIM1; k=ed25519; p="
        ));
        let rsa_strings = txt_strings(&recs[1].value);
        assert!(rsa_strings.len() >= 2 && rsa_strings.iter().all(|s| s.len() <= 255));
        assert_eq!(rsa_strings.concat(), recs[1].value);
        let (k, p) = parse_record(&rsa_strings.concat());
        assert_eq!(k, "rsa");
        assert_eq!(p.unwrap(), base64(keys.keys[1].public_key()));
    }

    /// A DNS server that never answers: every check must end within the
    /// budget, as `temperror`, and the message is still signed.
    #[tokio::test]
    async fn checks_fail_open_within_the_budget_when_dns_is_silent() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let cfg = crate::config::DnsConfig {
            nameservers: vec![silent.local_addr().unwrap()],
            timeout: crate::config::Dur(Duration::from_millis(200)),
        };
        let dns = crate::dns::Dns::new(&cfg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (s, keys) = signing(dir.path());
        let signer = Arc::new(Signer::new(
            s,
            keys,
            &dns,
            "node1.magic.test",
            Duration::from_millis(200),
        ));
        // A signature whose body hash matches, so that only its key lookup
        // remains (and never answers).
        let bh = base64(ring::digest::digest(&ring::digest::SHA256, b"body\r\n").as_ref());
        let msg = format!(
            "DKIM-Signature: v=1; a=ed25519-sha256; d=sender.test; s=s1; h=From; bh={bh}; b=AAAA\r\n\
             From: a@sender.test\r\nSubject: x\r\n\r\nbody\r\n"
        )
        .into_bytes();
        let start = std::time::Instant::now();
        let out = signer
            .seal(
                "Received: from h ([127.0.0.1])\r\n\tby node1.magic.test; now\r\n".into(),
                msg,
                "127.0.0.1".parse().unwrap(),
                "h".into(),
                "a@sender.test".into(),
            )
            .await
            .unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("dkim=temperror"), "{text}");
        assert!(text.contains("spf=temperror"), "{text}");
        assert_eq!(text.matches("DKIM-Signature: v=1; a=").count(), 3, "{text}");
        assert!(text.ends_with("\r\n\r\nbody\r\n"), "{text}");
        drop(silent);
    }

    #[tokio::test]
    async fn too_many_client_signatures_are_not_verified() {
        let cfg = crate::config::DnsConfig {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            timeout: crate::config::Dur(Duration::from_millis(200)),
        };
        let dns = crate::dns::Dns::new(&cfg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (s, keys) = signing(dir.path());
        let signer = Signer::new(s, keys, &dns, "n", Duration::from_millis(200));
        let mut msg = Vec::new();
        for i in 0..=MAX_VERIFIED_SIGNATURES {
            msg.extend_from_slice(
                format!("DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=s; l={i}; h=From; bh=AA; b=AA\r\n")
                    .as_bytes(),
            );
        }
        msg.extend_from_slice(b"From: a@x.test\r\n\r\nbody\r\n");
        let ar = signer
            .auth_results(&msg, "127.0.0.1".parse().unwrap(), "h", "")
            .await;
        assert!(
            ar.starts_with(
                "Authentication-Results: net.test;\r\n\tdkim=permerror (too many signatures)"
            ),
            "{ar}"
        );
        assert!(ar.contains("smtp.mailfrom=<>"), "{ar}");
    }
}
