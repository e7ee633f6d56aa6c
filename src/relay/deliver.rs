//! One delivery attempt of one message to one domain's recipients.
//!
//! Input: the ordered MX hosts from route planning, the recipients of one
//! domain, the envelope and the stored body. Output: one [`RcptOutcome`] per
//! recipient, as data (a typed [`Reply`]: code, enhanced status, text):
//! delivery failures are never errors here.
//!
//! The SMTP client is the node's own ([`client`] for the I/O, [`reply`] for
//! the sans-IO reply parser), so that every remote reply is bounded
//! (`relay.max_reply_line_length`, `relay.max_reply_size`) and every stage
//! has its own timeout, like Postfix: greeting, EHLO and STARTTLS
//! (`greeting_timeout`), MAIL/RCPT/RSET (`command_timeout`), DATA up to the
//! `354` (`data_timeout`), each write of the message data
//! (`data_block_timeout`) and the reply after the final `.`
//! (`data_done_timeout`). An MX that never greets, stalls or streams a
//! reply without end costs one attempt of its own destination for at most
//! one stage's timeout, and a bounded buffer.
//!
//! For each host, each address is tried in turn, one stage helper after the
//! other ([`open`]: connect, greeting, EHLO, opportunistic STARTTLS without
//! certificate checks like Postfix's `may`, presenting the node's network
//! certificate to a server that asks for one, and one reconnect in plain text
//! if the TLS handshake fails; then [`transaction`]: MAIL FROM with
//! BODY=8BITMIME and SMTPUTF8 when the envelope has them, one RCPT per
//! recipient, pipelined when the server offers PIPELINING; DATA only if a
//! recipient was accepted; the data). The next address or host is tried
//! only while no reply settled the remaining recipients: on a connection
//! error, a refused greeting or a `421`. Once the end of data has been
//! sent, a lost reply is a temporary failure, never a retry elsewhere (the
//! message may have been delivered).
//!
//! Sessions are reused ([`Sessions`]): after a clean transaction the
//! session goes to a small cache keyed by MX address and TLS policy; the
//! next delivery to that address sends `RSET` and its own transaction
//! instead of a new connection, greeting, EHLO and STARTTLS. A session
//! serves at most `relay.connection_reuse_limit` transactions and idles in
//! the cache at most `relay.connection_cache_time`; one that saw an error,
//! a timeout, a `421` or bytes nobody asked for is never reused. A reused
//! session that turns out dead before any recipient was settled is replaced
//! by a fresh connection to the same address, so reuse never costs an
//! attempt.
//!
//! Each session runs in its own task, so that even a panic in the client on
//! a malformed server reply only fails that session.

mod client;
mod reply;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, instrument, warn, Instrument};

use crate::config::{Config, RelayTls};
use crate::dns::{Dns, DnsError};

pub use client::forbidden_in_data;
use client::{ClientError, Conn};
use reply::{Limits, RawReply};

pub use crate::reply::{Reply, Status};

/// Why a recipient ended as it did: a remote server's reply, or the node's
/// own reason (an enhanced status and text, no reply code). Shown as
/// `550 5.1.1 text` or `4.4.1 text`; the DSN takes the status and the kind
/// from here, never from the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Diagnostic {
    Remote(Reply),
    Local { status: Status, text: String },
}

/// Longest reply text kept (stored in the spool, put into a DSN line).
const MAX_TEXT: usize = 800;

impl Diagnostic {
    /// The node's own reason.
    pub fn local(status: Status, text: impl Into<String>) -> Diagnostic {
        Diagnostic::Local {
            status,
            text: bounded(text.into()),
        }
    }

    /// A remote reply of one line: `code` and the text after it.
    pub fn remote_line(code: u16, text: &str) -> Diagnostic {
        Diagnostic::remote(&RawReply {
            code,
            lines: vec![text.to_string()],
        })
    }

    /// A remote reply: the enhanced status is taken from the first line if
    /// it has one of the same class as the code (RFC 2034); repeated on the
    /// following lines, it is dropped there.
    fn remote(raw: &RawReply) -> Diagnostic {
        let class = u8::try_from(raw.code / 100).unwrap_or(0);
        let split = |line: &str| -> (Option<Status>, String) {
            let (first, rest) = line.split_once(' ').unwrap_or((line, ""));
            match Status::parse(first) {
                Some(s) if s.class == class => (Some(s), rest.trim().to_string()),
                _ => (None, line.to_string()),
            }
        };
        let mut status = None;
        let mut parts: Vec<String> = Vec::with_capacity(raw.lines.len());
        for (i, line) in raw.lines.iter().enumerate() {
            let (s, text) = split(line);
            if i == 0 {
                status = s;
                parts.push(text);
            } else if s.is_some() && s == status {
                parts.push(text);
            } else {
                parts.push(line.clone());
            }
        }
        let text = parts
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Diagnostic::Remote(Reply {
            code: raw.code,
            status,
            text: bounded(text).into(),
        })
    }

    /// The enhanced status, or the reply code's class (`4.0.0`, `5.0.0`,
    /// `2.0.0`) when the reply had none.
    pub fn status(&self) -> Status {
        match self {
            Diagnostic::Remote(r) => r.status_or_default(),
            Diagnostic::Local { status, .. } => *status,
        }
    }

    /// True if a remote server gave this reply.
    pub fn is_remote(&self) -> bool {
        matches!(self, Diagnostic::Remote(_))
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Diagnostic::Remote(r) => write!(f, "{r}"),
            Diagnostic::Local { status, text } if text.is_empty() => write!(f, "{status}"),
            Diagnostic::Local { status, text } => write!(f, "{status} {text}"),
        }
    }
}

/// Tests write replies as they read: `"550 5.1.1 text"`, `"4.4.1 text"`.
#[cfg(test)]
impl From<&str> for Diagnostic {
    fn from(s: &str) -> Diagnostic {
        let (code, text) = s.split_once(' ').unwrap_or((s, ""));
        match code.parse::<u16>() {
            Ok(code) => Diagnostic::remote_line(code, text),
            Err(_) => Diagnostic::local(Status::parse(code).expect("a status"), text),
        }
    }
}

fn bounded(s: String) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string();
    if out.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// The result for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The remote server took responsibility (its reply to the end of data).
    Delivered(Diagnostic),
    /// Try again later (4xx, network error, timeout).
    TempFail(Diagnostic),
    /// Give up and report (5xx, or an address that cannot be sent).
    PermFail(Diagnostic),
}

impl RcptOutcome {
    pub fn reply(&self) -> &Diagnostic {
        match self {
            RcptOutcome::Delivered(r) | RcptOutcome::TempFail(r) | RcptOutcome::PermFail(r) => r,
        }
    }

    /// A remote reply to a command, sorted by its code.
    fn of_negative(raw: &RawReply) -> RcptOutcome {
        let reply = Diagnostic::remote(raw);
        if raw.code >= 500 {
            RcptOutcome::PermFail(reply)
        } else {
            RcptOutcome::TempFail(reply)
        }
    }
}

/// A recipient's outcome and the MX host that gave it (None: decided locally).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptResult {
    pub outcome: RcptOutcome,
    pub mx: Option<String>,
}

/// What a delivery attempt needs to know about the message.
#[derive(Debug, Clone)]
pub struct Message {
    pub queue_id: String,
    /// Envelope sender, "" for the null sender.
    pub sender: String,
    pub smtputf8: bool,
    pub eight_bit: bool,
    /// The body as stored: CRLF line endings, ends with CRLF unless empty.
    pub body: Arc<[u8]>,
}

/// Most connections one attempt makes (over all hosts and addresses).
const MAX_CONNECTIONS: usize = 6;
/// QUIT is a courtesy: do not wait long for its reply.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// RSET before reusing a cached session (Postfix's `smtp_rset_timeout`),
/// at most `command_timeout`.
const RSET_TIMEOUT: Duration = Duration::from_secs(20);

const fn st(class: u8, subject: u16, detail: u16) -> Status {
    Status::new(class, subject, detail)
}

/// Delivers `msg` to `recipients` (all of one domain) through `hosts`, in
/// order, reusing cached sessions from `sessions`. Returns one result per
/// recipient, in the same order.
#[instrument(name = "deliver", skip_all, fields(queue_id = %msg.queue_id, domain = %domain))]
pub async fn deliver(
    config: &Config,
    dns: &Dns,
    sessions: &Sessions,
    msg: &Message,
    domain: &str,
    hosts: &[String],
    recipients: &[String],
) -> Vec<RcptResult> {
    let mut results: Vec<Option<RcptResult>> = vec![None; recipients.len()];
    let local = |o: RcptOutcome| RcptResult {
        outcome: o,
        mx: None,
    };

    if let Err(e) = check_address(&msg.sender, true) {
        let reply = Diagnostic::local(
            st(5, 1, 7),
            format!("bad sender address syntax <{}>: {e}", msg.sender),
        );
        return vec![local(RcptOutcome::PermFail(reply)); recipients.len()];
    }
    if let Some(why) = forbidden_in_data(&msg.body) {
        // The SMTP side never stores such a body; never send one either.
        tracing::error!("{why}: not sent");
        let reply = Diagnostic::local(st(5, 6, 0), format!("{why} and cannot be sent"));
        return vec![local(RcptOutcome::PermFail(reply)); recipients.len()];
    }
    let mut pending: Vec<(usize, String)> = Vec::new();
    for (i, rcpt) in recipients.iter().enumerate() {
        match check_address(rcpt, false) {
            Ok(()) => pending.push((i, rcpt.clone())),
            Err(e) => {
                results[i] = Some(local(RcptOutcome::PermFail(Diagnostic::local(
                    st(5, 1, 3),
                    format!("bad recipient address syntax <{rcpt}>: {e}"),
                ))))
            }
        }
    }

    let params = Arc::new(Params::new(config, msg));
    let mut last_error = Diagnostic::local(
        st(4, 4, 4),
        format!("no MX host of {domain} could be tried"),
    );
    let mut connections = 0;
    'hosts: for host in hosts {
        if pending.is_empty() {
            break;
        }
        let ips = match dns.addresses(host).await {
            Ok(ips) if !ips.is_empty() => ips,
            Ok(_) => {
                last_error =
                    Diagnostic::local(st(4, 4, 4), format!("MX host {host} has no address"));
                debug!(mx = %host, "no address");
                continue;
            }
            Err(DnsError::NoDomain(_)) => {
                last_error =
                    Diagnostic::local(st(4, 4, 4), format!("MX host {host} does not exist"));
                debug!(mx = %host, "no such host");
                continue;
            }
            Err(e) => {
                last_error = Diagnostic::local(
                    st(4, 4, 3),
                    format!("address lookup of MX host {host} failed: {e}"),
                );
                debug!(mx = %host, error = %e, "address lookup failed");
                continue;
            }
        };
        for ip in ips {
            if connections >= MAX_CONNECTIONS || pending.is_empty() {
                break 'hosts;
            }
            if config.relay.is_denied(ip) {
                warn!(mx = %host, %ip, "MX address is in relay.deny_networks; not contacted");
                last_error = Diagnostic::local(
                    st(4, 4, 4),
                    format!("MX host {host} has address {ip}, in relay.deny_networks"),
                );
                continue;
            }
            connections += 1;
            let rcpts = std::mem::take(&mut pending);
            let task = tokio::spawn(
                session(
                    params.clone(),
                    sessions.clone(),
                    host.clone(),
                    ip,
                    rcpts.clone(),
                )
                .in_current_span(),
            );
            let end = match task.await {
                Ok(end) => end,
                Err(e) => {
                    warn!(mx = %host, %ip, error = %e, "SMTP session task failed");
                    SessionEnd::retry(
                        rcpts,
                        Diagnostic::local(
                            st(4, 4, 2),
                            format!("SMTP session with {host}[{ip}] failed: {e}"),
                        ),
                    )
                }
            };
            for (i, outcome) in end.settled {
                results[i] = Some(RcptResult {
                    outcome,
                    mx: Some(host.clone()),
                });
            }
            pending = end.unsettled;
            if !pending.is_empty() {
                info!(mx = %host, %ip, reason = %end.reason, "trying next MX address");
                last_error = end.reason;
            }
        }
    }
    // Whatever no reply settled (all addresses failed, or too many tried).
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| local(RcptOutcome::TempFail(last_error.clone()))))
        .collect()
}

/// True if `body` has a CR not followed by LF or an LF not preceded by CR.
pub fn has_bare_cr_or_lf(body: &[u8]) -> bool {
    let mut prev_cr = false;
    for &b in body {
        match b {
            b'\n' if !prev_cr => return true,
            _ if prev_cr && b != b'\n' => return true,
            _ => {}
        }
        prev_cr = b == b'\r';
    }
    prev_cr
}

/// An address the client can put in `MAIL FROM:<>` / `RCPT TO:<>`:
/// `local@domain`, local part a dot-atom or a quoted string of at most 64
/// octets, domain a host name (UTF-8 allowed) or an address literal, no
/// control character, space, `<` or `>` outside quotes. The SMTP server
/// refuses at MAIL and RCPT what this refuses, so the two never disagree.
pub(crate) fn check_address(addr: &str, null_ok: bool) -> Result<(), &'static str> {
    if addr.is_empty() {
        return if null_ok {
            Ok(())
        } else {
            Err("empty address")
        };
    }
    if addr.len() > 254 {
        return Err("address longer than 254 octets");
    }
    let Some((local, domain)) = addr.rsplit_once('@') else {
        return Err("no @");
    };
    if local.is_empty() || local.len() > 64 {
        return Err("local part empty or longer than 64 octets");
    }
    if local.len() >= 2 && local.starts_with('"') && local.ends_with('"') {
        let inner = &local[1..local.len() - 1];
        if inner.chars().any(|c| c.is_control()) {
            return Err("control character in the local part");
        }
    } else {
        let atext = |c: char| {
            c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
        };
        if local
            .split('.')
            .any(|atom| atom.is_empty() || !atom.chars().all(atext))
        {
            return Err("invalid local part");
        }
    }
    if domain.starts_with('[') {
        return match crate::dns::ip_literal(domain) {
            Some(_) => Ok(()),
            None => Err("invalid address literal"),
        };
    }
    if domain.is_empty() || domain.len() > 253 {
        return Err("domain empty or too long");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
    };
    if !domain.split('.').all(label_ok) {
        return Err("invalid domain");
    }
    Ok(())
}

/// Everything one session needs, from the config and the message.
struct Params {
    port: u16,
    hello: String,
    tls: RelayTls,
    /// STARTTLS: with the node's certificate when it has one.
    tls_config: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    greeting_timeout: Duration,
    command_timeout: Duration,
    data_timeout: Duration,
    data_block_timeout: Duration,
    data_done_timeout: Duration,
    limits: Limits,
    sender: String,
    smtputf8: bool,
    eight_bit: bool,
    body: Arc<[u8]>,
}

impl Params {
    fn new(config: &Config, msg: &Message) -> Params {
        let r = &config.relay;
        Params {
            port: r.port,
            hello: config.node.hostname.clone(),
            tls: r.tls,
            tls_config: client::tls_config(client_cert(config)),
            connect_timeout: r.connect_timeout.0,
            greeting_timeout: r.greeting_timeout.0,
            command_timeout: r.command_timeout.0,
            data_timeout: r.data_timeout.0,
            data_block_timeout: r.data_block_timeout.0,
            data_done_timeout: r.data_done_timeout.0,
            limits: Limits {
                max_line: r.max_reply_line_length,
                max_reply: r.max_reply_size,
            },
            sender: msg.sender.clone(),
            smtputf8: msg.smtputf8,
            eight_bit: msg.eight_bit,
            body: msg.body.clone(),
        }
    }
}

/// The certificate the relay presents at STARTTLS: the node's own
/// (`[gossip] cert` and `key`), when both are set.
fn client_cert(config: &Config) -> Option<client::ClientCert<'_>> {
    let g = &config.gossip;
    Some((g.cert.as_deref()?, g.key.as_deref()?))
}

/// How one SMTP session ended.
struct SessionEnd {
    /// Recipients whose fate a reply decided.
    settled: Vec<(usize, RcptOutcome)>,
    /// Recipients still open: another address may take them.
    unsettled: Vec<(usize, String)>,
    /// Why the session could not settle them.
    reason: Diagnostic,
}

impl SessionEnd {
    fn retry(rcpts: Vec<(usize, String)>, reason: Diagnostic) -> SessionEnd {
        SessionEnd {
            settled: Vec::new(),
            unsettled: rcpts,
            reason,
        }
    }
}

/// What the server said it supports in its EHLO reply.
#[derive(Debug, Clone, Copy, Default)]
struct Extensions {
    starttls: bool,
    pipelining: bool,
    eight_bit_mime: bool,
    smtputf8: bool,
}

impl Extensions {
    fn of(reply: &RawReply) -> Extensions {
        let mut ext = Extensions::default();
        for line in reply.lines.iter().skip(1) {
            let keyword = line.split_whitespace().next().unwrap_or("");
            match keyword.to_ascii_uppercase().as_str() {
                "STARTTLS" => ext.starttls = true,
                "PIPELINING" => ext.pipelining = true,
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                _ => {}
            }
        }
        ext
    }
}

/// An open session, after EHLO (and STARTTLS if it was done).
struct Session {
    conn: Conn,
    ext: Extensions,
    /// Transactions run on it so far.
    uses: u32,
}

/// Key of the session cache: the MX address and the TLS policy the session
/// was opened under.
type Key = (SocketAddr, RelayTls);

/// The session cache: idle, clean sessions to real MX addresses, for the
/// next delivery to the same address. Cheap to clone (one shared cache).
#[derive(Clone)]
pub struct Sessions(Arc<CacheShared>);

struct CacheShared {
    state: Mutex<CacheState>,
    /// Transactions per session at most (`relay.connection_reuse_limit`, 0 = no reuse).
    reuse_limit: u32,
    /// Longest idle time in the cache (`relay.connection_cache_time`).
    idle: Duration,
    /// Idle sessions held at most, over all addresses (`relay.concurrency`).
    max_idle: usize,
}

#[derive(Default)]
struct CacheState {
    idle: HashMap<Key, Vec<(Session, Instant)>>,
    count: usize,
    sweeping: bool,
}

impl Sessions {
    pub fn new(relay: &crate::config::RelayConfig) -> Sessions {
        Sessions(Arc::new(CacheShared {
            state: Mutex::new(CacheState::default()),
            reuse_limit: relay.connection_reuse_limit,
            idle: relay.connection_cache_time.0,
            max_idle: relay.concurrency.max(1),
        }))
    }

    /// Idle sessions in the cache now.
    pub fn idle_count(&self) -> usize {
        self.lock().count
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle session to `key`, if one is fresh.
    fn take(&self, key: &Key) -> Option<Session> {
        let mut state = self.lock();
        let list = state.idle.get_mut(key)?;
        let mut found = None;
        let mut stale = Vec::new();
        while let Some((s, since)) = list.pop() {
            if since.elapsed() < self.0.idle {
                found = Some(s);
                break;
            }
            stale.push(s);
        }
        if list.is_empty() {
            state.idle.remove(key);
        }
        state.count -= stale.len() + usize::from(found.is_some());
        drop(state);
        close_all(stale);
        found
    }

    /// Keeps `s` for the next delivery to `key`, or closes it.
    fn put(&self, key: Key, s: Session) {
        let reusable = s.conn.is_sound()
            && !s.conn.has_unread()
            && s.uses < self.0.reuse_limit
            && !self.0.idle.is_zero();
        let mut state = self.lock();
        if !reusable || state.count >= self.0.max_idle {
            drop(state);
            close_all(vec![s]);
            return;
        }
        state.idle.entry(key).or_default().push((s, Instant::now()));
        state.count += 1;
        if !state.sweeping {
            state.sweeping = true;
            tokio::spawn(sweep(Arc::downgrade(&self.0)));
        }
    }
}

/// Closes idle sessions once they pass `connection_cache_time`; ends when
/// the cache is empty (no task while nothing is cached) or dropped.
async fn sweep(cache: Weak<CacheShared>) {
    loop {
        let period = match cache.upgrade() {
            Some(c) => c.idle,
            None => return,
        };
        tokio::time::sleep(period).await;
        let Some(c) = cache.upgrade() else { return };
        let mut stale = Vec::new();
        {
            let mut state = c.state.lock().unwrap_or_else(|e| e.into_inner());
            for list in state.idle.values_mut() {
                let (keep, old): (Vec<_>, Vec<_>) = list
                    .drain(..)
                    .partition(|(_, since)| since.elapsed() < c.idle);
                *list = keep;
                stale.extend(old.into_iter().map(|(s, _)| s));
            }
            state.idle.retain(|_, l| !l.is_empty());
            state.count -= stale.len();
            if state.count == 0 {
                state.sweeping = false;
                drop(state);
                close_all(stale);
                return;
            }
        }
        close_all(stale);
    }
}

fn close_all(sessions: Vec<Session>) {
    for s in sessions {
        tokio::spawn(s.conn.quit(QUIT_TIMEOUT));
    }
}

/// One address: a cached session or a new one, one transaction, then the
/// session back to the cache if it is clean.
async fn session(
    p: Arc<Params>,
    sessions: Sessions,
    host: String,
    ip: IpAddr,
    rcpts: Vec<(usize, String)>,
) -> SessionEnd {
    let addr = SocketAddr::new(ip, p.port);
    let key = (addr, p.tls);
    let peer = format!("{host}[{ip}]:{}", p.port);

    while let Some(mut s) = sessions.take(&key) {
        // Reused: RSET first. A session that died while idle costs nothing
        // but this round trip: nothing was settled, a fresh one follows.
        if rset(&mut s, &p).await.is_err() {
            debug!(mx = %host, %ip, "cached session is gone; opening a new one");
            continue;
        }
        metrics::counter!("magicmx_relay_sessions_total", "kind" => "reused").increment(1);
        s.uses += 1;
        let (end, stage) = transaction(&p, &peer, &mut s, rcpts.clone()).await;
        if stage == Stage::BeforeAnything {
            debug!(mx = %host, %ip, "reused session failed before MAIL; opening a new one");
            continue;
        }
        finish(&sessions, key, s, stage);
        return end;
    }

    let mut s = match open(&p, &host, addr, &peer).await {
        Ok(s) => s,
        Err(reason) => return SessionEnd::retry(rcpts, reason),
    };
    debug!(mx = %host, %ip, tls = s.conn.is_tls(), "session open");
    metrics::counter!("magicmx_relay_sessions_total", "kind" => "new").increment(1);
    s.uses = 1;
    let (end, stage) = transaction(&p, &peer, &mut s, rcpts).await;
    finish(&sessions, key, s, stage);
    end
}

fn finish(sessions: &Sessions, key: Key, mut s: Session, stage: Stage) {
    if stage != Stage::Clean {
        s.conn.poison();
    }
    sessions.put(key, s);
}

/// Connect, greeting, EHLO, STARTTLS (with one plain-text reconnect if the
/// TLS handshake fails).
async fn open(p: &Params, host: &str, addr: SocketAddr, peer: &str) -> Result<Session, Diagnostic> {
    let s = greet_and_ehlo(p, addr, peer).await?;
    if p.tls != RelayTls::Opportunistic || !s.ext.starttls {
        return Ok(s);
    }
    match starttls(p, host, s).await {
        Ok(s) => {
            debug!(mx = %host, %addr, "STARTTLS done");
            Ok(s)
        }
        Err(e) => {
            warn!(mx = %host, %addr, error = %e, "STARTTLS failed, reconnecting without TLS");
            metrics::counter!("magicmx_relay_session_errors_total", "reason" => "starttls")
                .increment(1);
            let mut s = greet_and_ehlo(p, addr, peer).await?;
            s.ext.starttls = false;
            Ok(s)
        }
    }
}

async fn greet_and_ehlo(p: &Params, addr: SocketAddr, peer: &str) -> Result<Session, Diagnostic> {
    let mut conn = Conn::connect(addr, p.connect_timeout, p.limits)
        .await
        .map_err(|e| {
            count_error(&e);
            Diagnostic::local(st(4, 4, 1), format!("connect to {peer}: {e}"))
        })?;
    greeting(p, &mut conn, peer).await?;
    let ext = ehlo(p, &mut conn, peer).await?;
    Ok(Session { conn, ext, uses: 0 })
}

/// The server's `220`; anything else is "try the next address".
async fn greeting(p: &Params, conn: &mut Conn, peer: &str) -> Result<(), Diagnostic> {
    match conn.read_reply("the greeting", p.greeting_timeout).await {
        Ok(r) if r.code == 220 => Ok(()),
        Ok(r) => Err(Diagnostic::local(
            st(4, 4, 1),
            format!("{peer} refused to talk: {}", Diagnostic::remote(&r)),
        )),
        Err(e) => {
            count_error(&e);
            Err(Diagnostic::local(
                st(4, 4, 1),
                format!("connect to {peer}: {e}"),
            ))
        }
    }
}

/// EHLO, or HELO if the server does not know EHLO.
async fn ehlo(p: &Params, conn: &mut Conn, peer: &str) -> Result<Extensions, Diagnostic> {
    let broken = |e: ClientError| {
        count_error(&e);
        Diagnostic::local(
            st(4, 4, 2),
            format!("lost connection with {peer} at EHLO: {e}"),
        )
    };
    let r = conn
        .command(
            format!("EHLO {}", p.hello),
            "the reply to EHLO",
            p.greeting_timeout,
        )
        .await
        .map_err(broken)?;
    if r.code == 250 {
        return Ok(Extensions::of(&r));
    }
    if (500..=504).contains(&r.code) {
        let r = conn
            .command(
                format!("HELO {}", p.hello),
                "the reply to HELO",
                p.greeting_timeout,
            )
            .await
            .map_err(broken)?;
        if r.code == 250 {
            return Ok(Extensions::default());
        }
    }
    conn.poison();
    Err(Diagnostic::local(
        st(4, 4, 1),
        format!("{peer} refused to talk: {}", Diagnostic::remote(&r)),
    ))
}

/// STARTTLS, the handshake, and EHLO again inside TLS.
async fn starttls(p: &Params, host: &str, mut s: Session) -> Result<Session, String> {
    let r = s
        .conn
        .command(
            "STARTTLS".into(),
            "the reply to STARTTLS",
            p.greeting_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
    if r.code != 220 {
        return Err(format!("STARTTLS refused: {}", Diagnostic::remote(&r)));
    }
    // rustls wants a DNS name or an IP address, not `[192.0.2.1]`.
    let name = crate::dns::ip_literal(host).map_or_else(|| host.to_string(), |ip| ip.to_string());
    let mut conn = s
        .conn
        .upgrade(&name, p.tls_config.clone(), p.greeting_timeout)
        .await
        .map_err(|e| e.to_string())?;
    let r = conn
        .command(
            format!("EHLO {}", p.hello),
            "the reply to EHLO",
            p.greeting_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
    if r.code != 250 {
        return Err(format!(
            "EHLO after STARTTLS refused: {}",
            Diagnostic::remote(&r)
        ));
    }
    Ok(Session {
        conn,
        ext: Extensions::of(&r),
        uses: 0,
    })
}

/// RSET on a reused session; Err if the session cannot be used.
async fn rset(s: &mut Session, p: &Params) -> Result<(), ()> {
    let t = RSET_TIMEOUT.min(p.command_timeout);
    match s.conn.command("RSET".into(), "the reply to RSET", t).await {
        Ok(r) if r.code == 250 => Ok(()),
        _ => {
            s.conn.poison();
            Err(())
        }
    }
}

/// How far a transaction got, for the session cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The session broke before any reply to MAIL: nothing was settled.
    BeforeAnything,
    /// Ended cleanly (every reply read, no `421`): the session may be reused.
    Clean,
    /// Broken, closed by the server, or in doubt.
    Broken,
}

/// MAIL, RCPT, DATA, the data, on an open session: one helper per stage.
async fn transaction(
    p: &Params,
    peer: &str,
    s: &mut Session,
    rcpts: Vec<(usize, String)>,
) -> (SessionEnd, Stage) {
    let mut mail_params = Vec::new();
    if p.smtputf8 {
        let needs_utf8 = !p.sender.is_ascii() || rcpts.iter().any(|(_, a)| !a.is_ascii());
        if s.ext.smtputf8 {
            mail_params.push("SMTPUTF8");
        } else if needs_utf8 {
            let reply = Diagnostic::local(
                st(5, 6, 7),
                format!("{peer} does not support SMTPUTF8, needed for this message"),
            );
            return (
                settle_all(Vec::new(), rcpts, RcptOutcome::PermFail(reply)),
                Stage::Clean,
            );
        }
    }
    if p.eight_bit && s.ext.eight_bit_mime {
        // Without 8BITMIME the body goes as is, like Postfix does by default.
        mail_params.push("BODY=8BITMIME");
    }
    let mail = std::iter::once(format!("MAIL FROM:<{}>", p.sender))
        .chain(mail_params.iter().map(|m| m.to_string()))
        .collect::<Vec<_>>()
        .join(" ");

    let (mail_reply, rcpt_replies) = match mail_and_rcpts(p, s, mail, &rcpts).await {
        Ok(r) => r,
        Err((e, got_mail_reply)) => {
            let stage = if got_mail_reply {
                Stage::Broken
            } else {
                Stage::BeforeAnything
            };
            let reason = Diagnostic::local(
                st(4, 4, 2),
                format!("lost connection with {peer} while sending MAIL FROM and RCPT TO: {e}"),
            );
            return (SessionEnd::retry(rcpts, reason), stage);
        }
    };
    if mail_reply.code == 421 {
        let reason = Diagnostic::local(
            st(4, 4, 2),
            format!(
                "{peer} closed the session: {}",
                Diagnostic::remote(&mail_reply)
            ),
        );
        return (SessionEnd::retry(rcpts, reason), Stage::Broken);
    }
    if !mail_reply.is_positive() {
        let o = RcptOutcome::of_negative(&mail_reply);
        return (settle_all(Vec::new(), rcpts, o), Stage::Clean);
    }

    let mut settled = Vec::new();
    let mut accepted: Vec<(usize, String)> = Vec::new();
    let mut rest = rcpts.into_iter().zip(rcpt_replies);
    while let Some(((i, addr), r)) = rest.next() {
        if r.code == 421 {
            let mut unsettled = accepted;
            unsettled.push((i, addr));
            unsettled.extend(rest.map(|(a, _)| a));
            let reason = Diagnostic::local(
                st(4, 4, 2),
                format!("{peer} closed the session: {}", Diagnostic::remote(&r)),
            );
            return (
                SessionEnd {
                    settled,
                    unsettled,
                    reason,
                },
                Stage::Broken,
            );
        }
        if r.is_positive() {
            accepted.push((i, addr));
        } else {
            settled.push((i, RcptOutcome::of_negative(&r)));
        }
    }
    if accepted.is_empty() {
        return (settle_all(settled, Vec::new(), unused()), Stage::Clean);
    }

    match data(p, s).await {
        Ok(r) if r.code == 354 => {}
        Ok(r) if r.code == 421 => {
            let reason = Diagnostic::local(
                st(4, 4, 2),
                format!("{peer} closed the session: {}", Diagnostic::remote(&r)),
            );
            return (
                SessionEnd {
                    settled,
                    unsettled: accepted,
                    reason,
                },
                Stage::Broken,
            );
        }
        Ok(r) => {
            let o = if r.is_positive() {
                // A 2xx to DATA is not the 354 that asks for the data.
                s.conn.poison();
                RcptOutcome::TempFail(Diagnostic::local(
                    st(4, 5, 0),
                    format!("{peer} answered DATA with {}", Diagnostic::remote(&r)),
                ))
            } else {
                RcptOutcome::of_negative(&r)
            };
            let stage = if s.conn.is_sound() {
                Stage::Clean
            } else {
                Stage::Broken
            };
            return (settle_all(settled, accepted, o), stage);
        }
        Err(e) => {
            let reason = Diagnostic::local(
                st(4, 4, 2),
                format!("lost connection with {peer} while sending DATA: {e}"),
            );
            return (
                SessionEnd {
                    settled,
                    unsettled: accepted,
                    reason,
                },
                Stage::Broken,
            );
        }
    }

    // From here on the server may have the message: whatever happens, the
    // accepted recipients are settled by this session.
    let (o, stage) = match body(p, s).await {
        Ok(r) if r.is_positive() => (RcptOutcome::Delivered(Diagnostic::remote(&r)), Stage::Clean),
        Ok(r) if r.code == 421 => (RcptOutcome::of_negative(&r), Stage::Broken),
        Ok(r) => (RcptOutcome::of_negative(&r), Stage::Clean),
        Err(e) => (
            RcptOutcome::TempFail(Diagnostic::local(
                st(4, 4, 2),
                format!("lost connection with {peer} after sending the message: {e}"),
            )),
            Stage::Broken,
        ),
    };
    (settle_all(settled, accepted, o), stage)
}

/// Placeholder outcome for `settle_all` with no recipients.
fn unused() -> RcptOutcome {
    RcptOutcome::TempFail(Diagnostic::local(st(4, 0, 0), ""))
}

fn settle_all(
    mut settled: Vec<(usize, RcptOutcome)>,
    rcpts: Vec<(usize, String)>,
    o: RcptOutcome,
) -> SessionEnd {
    settled.extend(rcpts.into_iter().map(|(i, _)| (i, o.clone())));
    SessionEnd {
        settled,
        unsettled: Vec::new(),
        reason: o.reply().clone(),
    }
}

/// MAIL FROM and one RCPT TO per recipient: in one write when the server
/// offers PIPELINING (RFC 2920), else one by one. Returns MAIL's reply and
/// one reply per RCPT (RCPTs after a refused MAIL are not sent: their
/// replies are MAIL's). Err carries whether MAIL's reply was read.
async fn mail_and_rcpts(
    p: &Params,
    s: &mut Session,
    mail: String,
    rcpts: &[(usize, String)],
) -> Result<(RawReply, Vec<RawReply>), (ClientError, bool)> {
    let t = p.command_timeout;
    let rcpt_lines: Vec<String> = rcpts
        .iter()
        .map(|(_, a)| format!("RCPT TO:<{a}>"))
        .collect();
    let mut replies = Vec::with_capacity(rcpts.len());
    if s.ext.pipelining {
        let mut lines = Vec::with_capacity(rcpts.len() + 1);
        lines.push(mail);
        lines.extend(rcpt_lines);
        s.conn
            .send_commands(&lines, t)
            .await
            .map_err(|e| (e, false))?;
        let mail_reply = s
            .conn
            .read_reply("the reply to MAIL FROM", t)
            .await
            .map_err(|e| (e, false))?;
        for _ in rcpts {
            let r = s
                .conn
                .read_reply("the reply to RCPT TO", t)
                .await
                .map_err(|e| (e, true))?;
            replies.push(r);
        }
        if !mail_reply.is_positive() {
            replies = vec![mail_reply.clone(); rcpts.len()];
        }
        return Ok((mail_reply, replies));
    }
    let mail_reply = s
        .conn
        .command(mail, "the reply to MAIL FROM", t)
        .await
        .map_err(|e| (e, false))?;
    if !mail_reply.is_positive() {
        return Ok((mail_reply.clone(), vec![mail_reply; rcpts.len()]));
    }
    for line in rcpt_lines {
        let r = s
            .conn
            .command(line, "the reply to RCPT TO", t)
            .await
            .map_err(|e| (e, true))?;
        let closing = r.code == 421;
        replies.push(r);
        if closing {
            break;
        }
    }
    // After a 421 the rest get the same reply (they are left unsettled).
    while replies.len() < rcpts.len() {
        let last = replies.last().cloned().expect("at least one reply");
        replies.push(last);
    }
    Ok((mail_reply, replies))
}

/// DATA, within `data_timeout`.
async fn data(p: &Params, s: &mut Session) -> Result<RawReply, ClientError> {
    s.conn
        .command("DATA".into(), "the reply to DATA", p.data_timeout)
        .await
}

/// The message data and the reply after the final `.`.
async fn body(p: &Params, s: &mut Session) -> Result<RawReply, ClientError> {
    s.conn.send_data(&p.body, p.data_block_timeout).await?;
    s.conn
        .read_reply("the reply after the message data", p.data_done_timeout)
        .await
}

fn count_error(e: &ClientError) {
    let reason = match e {
        ClientError::Timeout(..) => "timeout",
        ClientError::Io(_) | ClientError::Closed => "connection",
        ClientError::Reply(
            reply::ParseError::LineTooLong(_) | reply::ParseError::ReplyTooLong(_),
        ) => "reply_too_long",
        ClientError::Reply(_) => "malformed_reply",
        ClientError::Refused(_) => "refused_to_send",
        ClientError::Tls(_) => "tls",
    };
    metrics::counter!("magicmx_relay_session_errors_total", "reason" => reason).increment(1);
}

/// A recipient verification session with a domain's real MX (a callout,
/// like Postfix's `reject_unverified_recipient`): the relay's own client,
/// timeouts, reply bounds, TLS policy and `relay.deny_networks`, through
/// the hosts of the relay's MX plan. [`Probe::open`] connects, greets,
/// sends EHLO (STARTTLS if offered) and `MAIL FROM:<>`; each
/// [`Probe::rcpt`] asks about one address; [`Probe::close`] sends `RSET`
/// and `QUIT`. Nothing is ever sent after RCPT: no DATA, so no mail.
pub struct Probe {
    s: Session,
    p: Params,
    peer: String,
    /// RCPTs asked on this session so far.
    pub rcpts: u32,
}

/// The real MX's answer to one probe RCPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// 2xx: the address exists (or the domain accepts everything).
    Valid,
    /// 5xx: the address does not exist; the MX's reply.
    Invalid(Diagnostic),
    /// 4xx or `421`: no answer now; the MX's reply.
    TempFail(Diagnostic),
}

impl Probe {
    /// The first host and address of `hosts` that greets and takes
    /// `MAIL FROM:<>`. Err: why none did: a temporary failure, or the real
    /// MX's own `5xx` to `MAIL FROM:<>` (it refuses verification).
    pub async fn open(config: &Config, dns: &Dns, hosts: &[String]) -> Result<Probe, Diagnostic> {
        let msg = Message {
            queue_id: String::new(),
            sender: String::new(),
            smtputf8: false,
            eight_bit: false,
            body: Arc::from(&b""[..]),
        };
        let p = Params::new(config, &msg);
        let mut last = Diagnostic::local(st(4, 4, 4), "no MX host could be probed");
        let mut connections = 0;
        for host in hosts {
            let ips = match dns.addresses(host).await {
                Ok(ips) => ips,
                Err(e) => {
                    last = Diagnostic::local(st(4, 4, 3), format!("MX host {host}: {e}"));
                    continue;
                }
            };
            for ip in ips {
                if connections >= MAX_CONNECTIONS {
                    return Err(last);
                }
                if config.relay.is_denied(ip) {
                    last = Diagnostic::local(
                        st(4, 4, 4),
                        format!("MX host {host} has address {ip}, in relay.deny_networks"),
                    );
                    continue;
                }
                connections += 1;
                let addr = SocketAddr::new(ip, p.port);
                let peer = format!("{host}[{ip}]:{}", p.port);
                let mut s = match open(&p, host, addr, &peer).await {
                    Ok(s) => s,
                    Err(e) => {
                        last = e;
                        continue;
                    }
                };
                match s
                    .conn
                    .command(
                        "MAIL FROM:<>".into(),
                        "the reply to MAIL FROM",
                        p.command_timeout,
                    )
                    .await
                {
                    Ok(r) if r.is_positive() => {
                        metrics::counter!("magicmx_verify_sessions_total").increment(1);
                        return Ok(Probe {
                            s,
                            p,
                            peer,
                            rcpts: 0,
                        });
                    }
                    Ok(r) if r.code >= 500 && r.code != 521 => {
                        // The real MX refuses verification itself (null
                        // sender refused): its reply, a permanent one.
                        tokio::spawn(s.conn.quit(QUIT_TIMEOUT));
                        return Err(Diagnostic::remote(&r));
                    }
                    Ok(r) => {
                        last = Diagnostic::local(
                            st(4, 4, 1),
                            format!("{peer} refused MAIL FROM:<>: {}", Diagnostic::remote(&r)),
                        );
                        tokio::spawn(s.conn.quit(QUIT_TIMEOUT));
                    }
                    Err(e) => {
                        count_error(&e);
                        last = Diagnostic::local(
                            st(4, 4, 2),
                            format!("lost connection with {peer} at MAIL FROM: {e}"),
                        );
                    }
                }
            }
        }
        Err(last)
    }

    /// `RCPT TO:<address>`. Err: the session broke (nothing learnt).
    pub async fn rcpt(&mut self, address: &str) -> Result<ProbeAnswer, Diagnostic> {
        if let Err(e) = check_address(address, false) {
            return Ok(ProbeAnswer::Invalid(Diagnostic::local(
                st(5, 1, 3),
                format!("bad recipient address syntax <{address}>: {e}"),
            )));
        }
        self.rcpts += 1;
        let r = self
            .s
            .conn
            .command(
                format!("RCPT TO:<{address}>"),
                "the reply to RCPT TO",
                self.p.command_timeout,
            )
            .await
            .map_err(|e| {
                count_error(&e);
                Diagnostic::local(
                    st(4, 4, 2),
                    format!("lost connection with {} at RCPT TO: {e}", self.peer),
                )
            })?;
        Ok(if r.code == 421 {
            self.s.conn.poison();
            ProbeAnswer::TempFail(Diagnostic::remote(&r))
        } else if r.is_positive() {
            ProbeAnswer::Valid
        } else if r.code >= 500 {
            ProbeAnswer::Invalid(Diagnostic::remote(&r))
        } else {
            ProbeAnswer::TempFail(Diagnostic::remote(&r))
        })
    }

    /// Still usable for another RCPT.
    pub fn is_sound(&self) -> bool {
        self.s.conn.is_sound() && !self.s.conn.has_unread()
    }

    /// `RSET`, then `QUIT`, in the background (a courtesy; nothing waits).
    pub fn close(mut self) {
        tokio::spawn(async move {
            if self.s.conn.is_sound() {
                let _ = rset(&mut self.s, &self.p).await;
            }
            self.s.conn.quit(QUIT_TIMEOUT).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::sink::{Session, Sink};
    use crate::relay::testutil::{real_mx, tls_server, tls_server_asking};

    #[test]
    fn bare_cr_and_lf_are_found() {
        assert!(!has_bare_cr_or_lf(b"a\r\nb\r\n"));
        assert!(!has_bare_cr_or_lf(b""));
        assert!(has_bare_cr_or_lf(b"a\nb\r\n"));
        assert!(has_bare_cr_or_lf(b"a\rb\r\n"));
        assert!(has_bare_cr_or_lf(b"a\r\n\r"));
        assert!(has_bare_cr_or_lf(b"\n"));
    }

    fn config(port: u16) -> Config {
        config_tls(port, "none")
    }

    fn config_tls(port: u16, tls: &str) -> Config {
        let c = Config::parse(&format!(
            "[node]\nname = \"n1\"\nhostname = \"mx1.magic.test\"\n[relay]\nport = {port}\ndeny_networks = []\nconnect_timeout = \"2s\"\ncommand_timeout = \"5s\"\nconnection_cache_time = \"0s\"\ntls = \"{tls}\"\n[dns]\nnameservers = [\"127.0.0.1:9\"]\ntimeout = \"1s\"\n"
        ))
        .unwrap();
        c.validate().unwrap();
        c
    }

    fn message(sender: &str, body: &[u8]) -> Message {
        Message {
            queue_id: "Q1".into(),
            sender: sender.into(),
            smtputf8: false,
            eight_bit: true,
            body: Arc::from(body),
        }
    }

    #[tokio::test]
    async fn per_recipient_outcomes_and_exact_body() {
        let sink = real_mx().start("127.0.0.1", 0).unwrap();
        let port = sink.addr.port();
        let c = config(port);
        let dns = Dns::new(&c.dns).unwrap();
        let body = b"Subject: t\r\n\r\n.leading dot\r\nlast line\r\n";
        let rcpts: Vec<String> = [
            "ok@example.org",
            "bad@example.org",
            "later@example.org",
            "not an address",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = deliver(
            &c,
            &dns,
            &Sessions::new(&c.relay),
            &message("alice@example.com", body),
            "example.org",
            &["127.0.0.1".to_string()],
            &rcpts,
        )
        .await;
        assert_eq!(out.len(), 4);
        assert!(matches!(&out[0].outcome, RcptOutcome::Delivered(_)));
        assert_eq!(out[0].outcome.reply().to_string(), "250 2.0.0 queued as X1");
        assert_eq!(out[0].mx.as_deref(), Some("127.0.0.1"));
        assert!(matches!(&out[1].outcome, RcptOutcome::PermFail(_)));
        assert_eq!(out[1].outcome.reply().to_string(), "550 5.1.1 no such user");
        assert_eq!(out[1].outcome.reply().status(), Status::new(5, 1, 1));
        assert!(out[1].outcome.reply().is_remote());
        assert!(matches!(&out[2].outcome, RcptOutcome::TempFail(_)));
        assert_eq!(out[2].outcome.reply().to_string(), "450 4.2.0 try later");
        assert!(
            matches!(&out[3].outcome, RcptOutcome::PermFail(r) if r.to_string().starts_with("5.1.3 "))
        );
        assert_eq!(out[3].mx, None);

        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = sink.sessions();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].commands[0], "EHLO mx1.magic.test");
        assert_eq!(
            s[0].commands[1],
            "MAIL FROM:<alice@example.com> BODY=8BITMIME"
        );
        // Dot-stuffed on the wire, trailing CRLF not doubled.
        assert_eq!(
            sink.transactions()[0].wire_data,
            b"Subject: t\r\n\r\n..leading dot\r\nlast line\r\n"
        );
        assert!(s[0].commands.iter().any(|c| c == "QUIT"));
    }

    #[tokio::test]
    async fn null_sender_and_no_data_without_accepted_rcpt() {
        let sink = real_mx().start("127.0.0.1", 0).unwrap();
        let port = sink.addr.port();
        let c = config(port);
        let dns = Dns::new(&c.dns).unwrap();
        let out = deliver(
            &c,
            &dns,
            &Sessions::new(&c.relay),
            &message("", b"x\r\n"),
            "example.org",
            &["127.0.0.1".to_string()],
            &["bad@example.org".to_string()],
        )
        .await;
        assert!(matches!(&out[0].outcome, RcptOutcome::PermFail(_)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = sink.sessions();
        assert_eq!(s[0].commands[1], "MAIL FROM:<> BODY=8BITMIME");
        assert!(!s[0].commands.iter().any(|c| c == "DATA"));
    }

    #[tokio::test]
    async fn refused_greeting_and_dead_hosts_are_temporary() {
        let sink = real_mx()
            .refuse_greeting("421 4.3.2 not now")
            .start("127.0.0.1", 0)
            .unwrap();
        let port = sink.addr.port();
        let c = config(port);
        let dns = Dns::new(&c.dns).unwrap();
        // 127.0.0.3: nothing listens there, the connection is refused.
        let out = deliver(
            &c,
            &dns,
            &Sessions::new(&c.relay),
            &message("a@example.com", b"x\r\n"),
            "example.org",
            &["127.0.0.1".to_string(), "127.0.0.3".to_string()],
            &["ok@example.org".to_string()],
        )
        .await;
        match &out[0].outcome {
            RcptOutcome::TempFail(r) => {
                assert!(
                    r.to_string().starts_with("4.4.1 connect to 127.0.0.3"),
                    "{r}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(out[0].mx, None);
    }

    #[tokio::test]
    async fn next_host_after_a_refused_greeting_or_connection() {
        let sink = real_mx().start("127.0.0.1", 0).unwrap();
        let port = sink.addr.port();
        let refused = real_mx()
            .refuse_greeting("421 4.3.2 not now")
            .start("127.0.0.2", port)
            .unwrap();
        let c = config(port);
        let dns = Dns::new(&c.dns).unwrap();
        let out = deliver(
            &c,
            &dns,
            &Sessions::new(&c.relay),
            &message("a@example.com", b"x\r\n"),
            "example.org",
            &["127.0.0.3".into(), "127.0.0.2".into(), "127.0.0.1".into()],
            &["ok@example.org".to_string()],
        )
        .await;
        assert!(
            matches!(&out[0].outcome, RcptOutcome::Delivered(_)),
            "{out:?}"
        );
        assert_eq!(out[0].mx.as_deref(), Some("127.0.0.1"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(sink.sessions().len(), 1);
        assert_eq!(refused.sessions().len(), 1);
    }

    #[tokio::test]
    async fn opportunistic_starttls_without_verification() {
        let sink = real_mx().tls(tls_server()).start("127.0.0.1", 0).unwrap();
        let port = sink.addr.port();
        let c = config_tls(port, "opportunistic");
        let dns = Dns::new(&c.dns).unwrap();
        // The certificate is self-signed and for "localhost": accepted anyway.
        let out = deliver(
            &c,
            &dns,
            &Sessions::new(&c.relay),
            &message("a@example.com", b"S: t\r\n\r\nbody\r\n"),
            "example.org",
            &["127.0.0.1".into()],
            &["ok@example.org".to_string()],
        )
        .await;
        assert!(
            matches!(&out[0].outcome, RcptOutcome::Delivered(_)),
            "{out:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = sink.sessions();
        assert_eq!(s.len(), 1);
        assert!(s[0].tls);
        assert_eq!(
            s[0].commands
                .iter()
                .filter(|c| c.starts_with("EHLO"))
                .count(),
            2
        );
        assert_eq!(sink.transactions()[0].wire_data, b"S: t\r\n\r\nbody\r\n");
    }

    /// The session the sink recorded, once it ended.
    async fn one_session(sink: &Sink) -> Session {
        for _ in 0..500 {
            if let Some(s) = sink.sessions().first() {
                return s.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the sink saw no session");
    }

    #[tokio::test]
    async fn starttls_presents_the_node_certificate_when_asked() {
        let ca_dir = tempfile::tempdir().unwrap();
        crate::gossip::ca::init(ca_dir.path()).unwrap();
        crate::gossip::ca::issue("n1", ca_dir.path()).unwrap();
        let pem = |name: &str| {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_file(ca_dir.path().join(name))
                .unwrap()
                .to_vec()
        };
        let (ca, leaf) = (pem("ca.pem"), pem("n1.pem"));
        let send = |c: Config| async move {
            let dns = Dns::new(&c.dns).unwrap();
            deliver(
                &c,
                &dns,
                &Sessions::new(&c.relay),
                &message("a@example.com", b"S: t\r\n\r\nbody\r\n"),
                "example.org",
                &["127.0.0.1".into()],
                &["ok@example.org".to_string()],
            )
            .await
        };
        let with_cert = |port: u16| {
            let mut c = config_tls(port, "opportunistic");
            c.gossip.cert = Some(ca_dir.path().join("n1.pem"));
            c.gossip.key = Some(ca_dir.path().join("n1.key"));
            c
        };

        // A server that asks (and checks the chain against the network CA)
        // gets the node's certificate.
        let sink = real_mx()
            .tls(tls_server_asking(&ca))
            .start("127.0.0.1", 0)
            .unwrap();
        let port = sink.addr.port();
        let out = send(with_cert(port)).await;
        assert!(
            matches!(&out[0].outcome, RcptOutcome::Delivered(_)),
            "{out:?}"
        );
        let s = one_session(&sink).await;
        assert!(s.tls);
        assert_eq!(s.client_cert.as_deref(), Some(&leaf[..]));

        // A node without a certificate relays as before, without one.
        let sink = real_mx()
            .tls(tls_server_asking(&ca))
            .start("127.0.0.1", 0)
            .unwrap();
        let port = sink.addr.port();
        let out = send(config_tls(port, "opportunistic")).await;
        assert!(
            matches!(&out[0].outcome, RcptOutcome::Delivered(_)),
            "{out:?}"
        );
        let s = one_session(&sink).await;
        assert!(s.tls);
        assert_eq!(s.client_cert, None);

        // A server that does not ask sees none (and the mail goes as before).
        let sink = real_mx().tls(tls_server()).start("127.0.0.1", 0).unwrap();
        let port = sink.addr.port();
        let out = send(with_cert(port)).await;
        assert!(
            matches!(&out[0].outcome, RcptOutcome::Delivered(_)),
            "{out:?}"
        );
        let s = one_session(&sink).await;
        assert!(s.tls);
        assert_eq!(s.client_cert, None);

        // A certificate that cannot be read: logged, and relayed without one.
        let sink = real_mx()
            .tls(tls_server_asking(&ca))
            .start("127.0.0.1", 0)
            .unwrap();
        let port = sink.addr.port();
        let mut c = config_tls(port, "opportunistic");
        c.gossip.cert = Some(ca_dir.path().join("missing.pem"));
        c.gossip.key = Some(ca_dir.path().join("n1.key"));
        let out = send(c).await;
        assert!(
            matches!(&out[0].outcome, RcptOutcome::Delivered(_)),
            "{out:?}"
        );
        let s = one_session(&sink).await;
        assert!(s.tls);
        assert_eq!(s.client_cert, None);
    }

    #[tokio::test]
    async fn failed_tls_handshake_falls_back_to_plain_text() {
        let sink = real_mx().starttls_hangs_up().start("127.0.0.1", 0).unwrap();
        let port = sink.addr.port();
        let c = config_tls(port, "opportunistic");
        let dns = Dns::new(&c.dns).unwrap();
        let out = deliver(
            &c,
            &dns,
            &Sessions::new(&c.relay),
            &message("a@example.com", b"x\r\n"),
            "example.org",
            &["127.0.0.1".into()],
            &["ok@example.org".to_string()],
        )
        .await;
        assert!(
            matches!(&out[0].outcome, RcptOutcome::Delivered(_)),
            "{out:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = sink.sessions();
        assert_eq!(s.len(), 2, "{s:?}");
        let plain = s
            .iter()
            .find(|x| x.commands.iter().any(|c| c == "DATA"))
            .unwrap();
        assert!(!plain.tls);
        assert!(!plain.commands.iter().any(|c| c == "STARTTLS"));
    }

    #[tokio::test]
    async fn tls_none_never_starts_tls() {
        let sink = real_mx().tls(tls_server()).start("127.0.0.1", 0).unwrap();
        let port = sink.addr.port();
        let c = config_tls(port, "none");
        let dns = Dns::new(&c.dns).unwrap();
        let out = deliver(
            &c,
            &dns,
            &Sessions::new(&c.relay),
            &message("a@example.com", b"x\r\n"),
            "example.org",
            &["127.0.0.1".into()],
            &["ok@example.org".to_string()],
        )
        .await;
        assert!(
            matches!(&out[0].outcome, RcptOutcome::Delivered(_)),
            "{out:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = sink.sessions();
        assert!(!s[0].tls);
        assert!(!s[0].commands.iter().any(|c| c == "STARTTLS"));
    }
}
