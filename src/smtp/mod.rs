//! Inbound ESMTP server.
//!
//! Sockets live here; the protocol lives in [`session`] (a sans-IO state
//! machine) and [`data`] (strict DATA framing). A connection gets a permit
//! from a bounded pool (over the limit it is told `421` at once, never left
//! waiting in the accept queue), then its session is driven by [`drive`]:
//! read with a timeout, feed the session, act on its events (check a
//! recipient, store a message in the spool, start TLS), write the replies.
//! Accepted mail goes to the spool and the relay is woken. On shutdown every
//! session that is waiting for input answers `421` and closes; a message that
//! is being stored finishes first, so nothing acknowledged is lost.

pub mod budget;
pub mod data;
pub mod screen;
pub mod session;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use crate::addr::canonical_ip;
use crate::config::Config;
use crate::dns::{Dns, MxAnswer};
use crate::listener::{Admission, Bounds};
use crate::slots::{KeyedSlots, Slot};
use crate::spool::{Envelope, Origin, RcptState, Recipient, Spool};
use crate::throttle::{block_of, Block, Decision, Penalised, Reason, Throttle};
use session::{Event, Message, Session, SessionConfig, Verdict};

/// Which door a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The magic MX: mail for accepted domains from anyone, throttled and held.
    Inbound,
    /// The smarthost of trusted senders (`[outbound] clients`): mail for any
    /// domain, delivered straight to the non-magic MX, no throttle, no hold.
    Outbound,
}

impl Mode {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Inbound => "inbound",
            Mode::Outbound => "outbound",
        }
    }
}

/// Everything a connection needs, shared by all of them.
pub struct Context {
    pub mode: Mode,
    pub config: Arc<Config>,
    pub session: SessionConfig,
    pub spool: Spool,
    pub dns: Dns,
    /// Woken after a message is stored.
    pub relay_wake: Arc<Notify>,
    pub tls: Option<TlsAcceptor>,
    pub throttle: Arc<Throttle>,
    /// Recipient verification with the real MX (None: off).
    pub verifier: Option<Arc<crate::verify::Verifier>>,
    /// The node's clock: throttle windows, penalties and greylisting are
    /// read from it (tests advance a manual one).
    pub clock: crate::clock::Clock,
    /// `[dnsbl]` lookups at connect (None: no sites).
    pub dnsbl: Option<crate::dnsbl::Dnsbl>,
    /// Bounds of the tarpit (shared by both doors; only inbound tarpits).
    pub tarpits: Arc<screen::Tarpits>,
    /// SPF checks for greylisting pools (None: `greylist.spf_pool` off).
    pub spf: Option<Arc<mail_auth::MessageAuthenticator>>,
    /// DKIM signing of inbound mail (None: `[sign]` off, or the outbound door).
    pub signer: Option<Arc<crate::sign::Signer>>,
}

/// Loads the STARTTLS certificate and key (PEM) with the ring provider.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    use anyhow::Context as _;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("smtp.tls_cert: cannot read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("smtp.tls_cert: bad PEM in {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("smtp.tls_cert: no certificate in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "smtp.tls_key: cannot read a private key from {}",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("smtp.tls_key: does not match smtp.tls_cert")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl Context {
    pub fn new(
        config: Arc<Config>,
        spool: Spool,
        dns: Dns,
        relay_wake: Arc<Notify>,
        throttle: Arc<Throttle>,
        dnsbl: Option<crate::dnsbl::Dnsbl>,
    ) -> anyhow::Result<Context> {
        let tls = match (&config.smtp.tls_cert, &config.smtp.tls_key) {
            (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
            _ => None,
        };
        let session = SessionConfig {
            hostname: config.node.hostname.clone(),
            max_line_length: config.smtp.max_line_length,
            max_message_size: config.smtp.max_message_size,
            max_recipients: config.smtp.max_recipients,
            max_errors: config.smtp.max_errors,
            junk_command_limit: config.smtp.junk_command_limit,
            max_received_headers: config.relay.max_received_headers,
            tls_available: tls.is_some(),
            data_memory: budget::MemoryBudget::new(config.smtp.data_memory),
        };
        let tarpits = Arc::new(screen::Tarpits::new(
            config.suspect.max_tarpitted,
            config.suspect.max_tarpitted_per_block,
        ));
        let spf = (config.greylist.enabled && config.greylist.spf_pool)
            .then(|| Arc::new(mail_auth::MessageAuthenticator(dns.resolver())));
        Ok(Context {
            spf,
            mode: Mode::Inbound,
            config,
            session,
            spool,
            dns,
            relay_wake,
            tls,
            throttle,
            verifier: None,
            clock: crate::clock::Clock::system(),
            dnsbl,
            tarpits,
            signer: None,
        })
    }

    /// Signs accepted inbound mail with `signer` (`[sign]`).
    pub fn with_signer(mut self, signer: Option<Arc<crate::sign::Signer>>) -> Context {
        self.signer = signer;
        self
    }

    /// Reads time from `clock` (the node's).
    pub fn with_clock(mut self, clock: crate::clock::Clock) -> Context {
        self.clock = clock;
        self
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Verifies recipients with the real MX (when `verify.enabled`).
    pub fn with_verifier(mut self, verifier: Arc<crate::verify::Verifier>) -> Context {
        if self.config.verify.enabled {
            self.verifier = Some(verifier);
        }
        self
    }

    /// The same node's outbound door: same spool and relay, other rules.
    pub fn outbound(&self) -> Context {
        Context {
            mode: Mode::Outbound,
            config: self.config.clone(),
            session: self.session.clone(),
            spool: self.spool.clone(),
            dns: self.dns.clone(),
            relay_wake: self.relay_wake.clone(),
            tls: self.tls.clone(),
            throttle: self.throttle.clone(),
            // Trusted senders' mail for any domain: not verified.
            verifier: None,
            clock: self.clock.clone(),
            dnsbl: self.dnsbl.clone(),
            tarpits: self.tarpits.clone(),
            // Outbound clients are never greylisted.
            spf: None,
            // Trusted senders' own mail: they sign it themselves, and the
            // network's signature vouches only for mail it relays to the
            // domains it serves.
            signer: None,
        }
    }

    /// Asks the throttle, unless it is disabled; counts and logs refusals.
    fn throttle(
        &self,
        stage: &'static str,
        peer: IpAddr,
        ask: impl FnOnce(&Throttle) -> Decision,
    ) -> Decision {
        if !self.config.throttle.enabled || self.mode == Mode::Outbound {
            return Decision::Accept;
        }
        let d = ask(&self.throttle);
        match &d {
            Decision::Accept => {}
            Decision::Refuse { reason, penalty } => {
                metrics::counter!("magicmx_throttle_refusals_total", "stage" => stage, "reason" => reason.as_str()).increment(1);
                crate::telemetry::history()
                    .record(crate::telemetry::Tally::Refused, self.now_ms() / 1000);
                let left = penalty.map(|p| p.left.as_secs());
                info!(client = %peer, block = %self.throttle.block_of(peer), stage, %reason, penalty_left_secs = ?left, "throttled");
            }
            Decision::Drop { reason } => {
                metrics::counter!("magicmx_throttle_drops_total", "stage" => stage, "reason" => reason.as_str()).increment(1);
                debug!(client = %peer, block = %self.throttle.block_of(peer), stage, %reason, "dropped without banner");
            }
        }
        d
    }

    /// Is the node willing to take mail for this recipient? Never an open relay:
    /// only listed domains, or domains that delegate to the magic MX.
    pub async fn check_recipient(&self, peer: IpAddr, address: &str, domain: &str) -> Verdict {
        if self.mode == Mode::Outbound {
            return if self.config.is_outbound_client(peer) {
                Verdict::Accept
            } else {
                Verdict::Refuse(format!(
                    "550 5.7.1 <{address}>: Relay access denied: {peer} is not an outbound client"
                ))
            };
        }
        match self.check_domain(address, domain).await {
            Verdict::Accept => {}
            refuse => return refuse,
        }
        match self.throttle("rcpt", peer, |t| t.on_rcpt(peer, self.now_ms())) {
            Decision::Accept => {}
            Decision::Refuse { reason, penalty } => {
                return Verdict::Refuse(throttle_reply(Stage::Transaction, reason, penalty))
            }
            Decision::Drop { reason } => {
                return Verdict::Refuse(format!(
                    "450 4.7.1 Too much mail from your network ({reason})"
                ))
            }
        }
        self.verify_recipient(peer, address, domain).await
    }

    /// Greylisting of an otherwise accepted recipient (`[greylist]`). A
    /// `451` here is no invalid recipient: the session scores 5xx only.
    /// `spf_cache` holds the session's last SPF answer (sender, domain), so
    /// a message to many recipients is checked once.
    async fn greylist(
        &self,
        peer: IpAddr,
        sender: &str,
        helo: &str,
        rcpt: &str,
        spf_cache: &mut Option<(String, Option<String>)>,
    ) -> Verdict {
        use crate::greylist::Check;
        let g = self.throttle.greylist();
        if !g.is_enabled() {
            return Verdict::Accept;
        }
        let now = self.now_ms();
        let score = self.throttle.suspect_verdict(peer, now).score;
        if g.config().mode == crate::config::GreylistMode::Suspects && score <= 0 {
            // Not a suspect: not greylisted whatever the pool, no SPF lookup.
            return Verdict::Accept;
        }
        let block = self.throttle.block_of(peer);
        // A big sender retries from another address of its pool: with SPF,
        // the pool is every address its domain authorises.
        let domain = match spf_cache {
            Some((s, d)) if s == sender => d.clone(),
            _ => {
                let d = self.spf_domain(peer, sender, helo).await;
                *spf_cache = Some((sender.to_string(), d.clone()));
                d
            }
        };
        let pool = match domain {
            Some(domain) => format!("spf:{domain}"),
            None => block.to_string(),
        };
        let retry = |ms: u64| ms.div_ceil(1000).max(1);
        match g.check(&pool, score, sender, helo, rcpt, now) {
            Check::Accept => Verdict::Accept,
            Check::Greylisted { retry_in_ms } => {
                metrics::counter!("magicmx_greylist_greylisted_total").increment(1);
                info!(client = %peer, %block, %pool, rcpt, score, "greylisted");
                Verdict::Refuse(format!(
                    "451 4.7.1 <{rcpt}>: Recipient address rejected: Greylisted, please try again in {} seconds",
                    retry(retry_in_ms)
                ))
            }
            Check::TooEarly { retry_in_ms } => {
                metrics::counter!("magicmx_greylist_too_early_total").increment(1);
                info!(client = %peer, %block, rcpt, "greylisted: retry too early");
                Verdict::Refuse(format!(
                    "451 4.7.1 <{rcpt}>: Recipient address rejected: Greylisted, retried too early, please try again in {} seconds",
                    retry(retry_in_ms)
                ))
            }
            Check::Passed { waited_ms } => {
                metrics::counter!("magicmx_greylist_passed_total").increment(1);
                let signal = crate::suspect::Signal::new(
                    g.config().pass_weight,
                    now.saturating_add(
                        u64::try_from(self.config.suspect.reason_ttl.0.as_millis())
                            .unwrap_or(u64::MAX),
                    ),
                    format!("retried after {}s", waited_ms / 1000),
                );
                let v = self.throttle.add_signals(
                    peer,
                    vec![(crate::suspect::Kind::GreylistPass, signal)],
                    now,
                );
                info!(client = %peer, %block, %pool, rcpt, waited_ms, score = v.score, "greylisting passed");
                Verdict::Accept
            }
        }
    }

    /// The MAIL FROM domain if SPF passes for `peer` (through the node's
    /// resolver, within a few DNS timeouts); None otherwise or on error.
    async fn spf_domain(&self, peer: IpAddr, sender: &str, helo: &str) -> Option<String> {
        let spf = self.spf.as_ref()?;
        if !sender.contains('@') {
            return None;
        }
        let params = mail_auth::spf::verify::SpfParameters::verify_mail_from(
            peer,
            helo,
            &self.config.node.hostname,
            sender,
        );
        // Bounded: the RCPT reply waits for it.
        let budget = self.config.dns.timeout.0.saturating_mul(2);
        let out = tokio::time::timeout(budget, spf.verify_spf(params))
            .await
            .ok()?;
        let pass = out.result() == mail_auth::SpfResult::Pass;
        metrics::counter!("magicmx_greylist_spf_total", "result" => if pass { "pass" } else { "other" }).increment(1);
        pass.then(|| out.domain().trim_end_matches('.').to_ascii_lowercase())
    }

    /// Asks the real MX (or the verification cache) about the recipient.
    async fn verify_recipient(&self, peer: IpAddr, address: &str, domain: &str) -> Verdict {
        let Some(v) = &self.verifier else {
            return Verdict::Accept;
        };
        match v.check(address, domain).await {
            crate::verify::Check::Valid => Verdict::Accept,
            crate::verify::Check::UnknownUser(reply) => {
                self.unknown_recipient(peer, address);
                Verdict::Refuse(reply)
            }
            crate::verify::Check::Refuse(reply) => Verdict::Refuse(reply),
        }
    }

    /// The real MX does not know `address`, asked by `peer`. The refusal
    /// (a 5xx) also counts as an invalid recipient of the block, where the
    /// session scores every refused recipient (`screen.recipient`).
    fn unknown_recipient(&self, peer: IpAddr, address: &str) {
        metrics::counter!("magicmx_smtp_unknown_recipients_total").increment(1);
        info!(client = %peer, block = %self.throttle.block_of(peer), rcpt = %address, reason = "unknown_user", "unknown recipient");
    }

    async fn check_domain(&self, address: &str, domain: &str) -> Verdict {
        if sender_routed(address) {
            // `user%remote@served.domain` (or `!`, or a quoted `@`) asks the
            // served domain's MX to route the mail onwards: an open relay by
            // another name. Postfix refuses it too (allow_untrusted_routing).
            return Verdict::Refuse(format!(
                "550 5.7.1 <{address}>: Relay access denied: sender-specified routing"
            ));
        }
        if self.config.is_accepted_domain(domain) {
            return Verdict::Accept;
        }
        // An address literal has no MX to delegate with.
        if self.config.accept.mx_delegation && !domain.starts_with('[') {
            match self.dns.mx(domain).await {
                Ok(MxAnswer::Hosts(hosts))
                    if hosts.iter().any(|h| self.config.is_magic_host(&h.host)) =>
                {
                    return Verdict::Accept;
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(rcpt = address, error = %e, "MX lookup failed");
                    return Verdict::Refuse(format!(
                        "451 4.4.3 <{address}>: Recipient address rejected: temporary DNS failure"
                    ));
                }
            }
        }
        Verdict::Refuse(format!(
            "550 5.7.1 <{address}>: Relay access denied: relaying denied"
        ))
    }

    /// Stores an accepted message with its `Received:` header; returns the queue id.
    pub async fn store(&self, mut m: Message) -> Result<String, String> {
        let d = self.throttle("data", m.peer, |t| t.on_message(m.peer, self.now_ms()));
        if let Decision::Refuse { reason, penalty } = d {
            return Err(throttle_reply(Stage::Transaction, reason, penalty));
        }
        let now = unix_now();
        let received = received_header(&self.config.node.hostname, &m, now);
        let body = match &self.signer {
            // Signed once here, before the spool, so the signature covers
            // the node's `Received:` and survives every retry unchanged.
            Some(signer) => signer
                .seal(
                    received,
                    std::mem::take(&mut m.body),
                    m.peer,
                    m.helo.clone(),
                    m.sender.clone(),
                )
                .await
                .map_err(|_| "451 4.3.0 Error: local error in processing".to_string())?,
            None => {
                let mut body = received.into_bytes();
                body.extend_from_slice(&m.body);
                body
            }
        };
        let envelope = Envelope {
            sender: m.sender.clone(),
            recipients: m
                .recipients
                .iter()
                .map(|a| Recipient {
                    address: a.clone(),
                    state: RcptState::Pending,
                })
                .collect(),
            client_ip: m.peer,
            helo: m.helo.clone(),
            received_at: now,
            smtputf8: m.smtputf8,
            eight_bit: m.eight_bit,
            origin: match self.mode {
                Mode::Inbound => Origin::Inbound,
                Mode::Outbound => Origin::Outbound,
            },
        };
        let size = body.len();
        let release = match self.mode {
            Mode::Inbound => release_after(self.config.throttle.hold.0),
            Mode::Outbound => now,
        };
        match self.spool.store(envelope, body, release).await {
            Ok(entry) => {
                metrics::counter!("magicmx_smtp_messages_total", "mode" => self.mode.label())
                    .increment(1);
                crate::telemetry::history().record(crate::telemetry::Tally::Received, now);
                info!(
                    queue_id = %entry.id,
                    mode = ?self.mode,
                    from = %m.sender,
                    to = ?m.recipients,
                    size,
                    client = %m.peer,
                    "received"
                );
                if self.mode == Mode::Inbound && !self.throttle.is_trusted(m.peer) {
                    // A delivery: its pool is known to greylisting.
                    let pool = self.throttle.block_of(m.peer).to_string();
                    self.throttle.greylist().delivered(&pool, self.now_ms());
                }
                self.relay_wake.notify_one();
                Ok(entry.id)
            }
            Err(e) => {
                warn!(error = %e, client = %m.peer, "spool write failed");
                Err("451 4.3.0 Error: queue file write error".to_string())
            }
        }
    }
}

/// The Unix second at which a message held for `hold` from now may leave.
/// Rounded up: `next_attempt` is in whole seconds and the runner releases a
/// message once `unix_now() >= next_attempt`, so the hold is never shorter
/// than configured (at most a second longer).
fn release_after(hold: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    if hold.is_zero() {
        return now.as_secs();
    }
    let end = now + hold;
    end.as_secs() + u64::from(end.subsec_nanos() > 0)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The trace header this node adds (RFC 5321 4.4), with the protocol name
/// of RFC 3848 / RFC 6531.
pub fn received_header(hostname: &str, m: &Message, now: u64) -> String {
    let proto = match (m.smtputf8, m.esmtp, m.tls) {
        (true, _, false) => "UTF8SMTP",
        (true, _, true) => "UTF8SMTPS",
        (false, true, true) => "ESMTPS",
        (false, true, false) => "ESMTP",
        (false, false, _) => "SMTP",
    };
    let date = chrono::DateTime::from_timestamp(now as i64, 0)
        .unwrap_or_default()
        .to_rfc2822();
    let ip = match m.peer {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPv6:{v6}"),
    };
    let helo = if m.helo.is_empty() {
        "unknown"
    } else {
        m.helo.as_str()
    };
    let mut h = format!("Received: from {helo} ([{ip}])\r\n\tby {hostname} (magicmx) with {proto}");
    if let [one] = m.recipients.as_slice() {
        h.push_str(&format!("\r\n\tfor <{one}>"));
    }
    h.push_str(&format!("; {date}\r\n"));
    h
}

/// Binds every address of `key` (`smtp.listen` or `outbound.listen`).
pub async fn bind(addrs: &[SocketAddr], key: &'static str) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for addr in addrs {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("{key}: cannot bind {addr}: {e}"))?;
        match key {
            "smtp.listen" => info!(addr = %l.local_addr()?, "smtp listening"),
            _ => info!(addr = %l.local_addr()?, "outbound listening"),
        }
        listeners.push(l);
    }
    Ok(listeners)
}

/// Block family for the fair share of `max_connections`: IPv4 /16, IPv6 /32.
pub const FAMILY_IPV4_PREFIX: u8 = 16;
pub const FAMILY_IPV6_PREFIX: u8 = 32;

/// What an admitted SMTP connection holds besides its total permit: its
/// block's slot and its block family's slot (none for exempt clients).
type SmtpSlots = Option<(Slot<Block>, Slot<Block>)>;

/// Accepts connections until shutdown; returns when every session has ended.
///
/// Bounds, in order: `max_connections` in total (`421 4.3.2`), then, except
/// for trusted networks and outbound clients, `max_connections_per_block`
/// per source block and `max_connections_per_family` per block family
/// (IPv4 /16, IPv6 /32), so that slow sessions from a few networks cannot
/// take every slot (`421 4.7.0`).
pub async fn serve(listeners: Vec<TcpListener>, ctx: Arc<Context>, shutdown: CancellationToken) {
    let smtp = &ctx.config.smtp;
    let per_block = KeyedSlots::new(smtp.max_connections_per_block);
    let per_family = KeyedSlots::new(smtp.max_connections_per_family);
    let bounds = Bounds {
        name: match ctx.mode {
            Mode::Inbound => "smtp",
            Mode::Outbound => "outbound",
        },
        max_connections: smtp.max_connections,
        busy: Some(b"421 4.3.2 Too many connections, try again later\r\n"),
    };
    let admit = {
        let ctx = ctx.clone();
        move |peer: SocketAddr| -> Admission<SmtpSlots> {
            // Trusted networks and outbound clients are not bounded per block.
            let ip = canonical_ip(peer.ip());
            let exempt = match ctx.mode {
                Mode::Inbound => ctx.throttle.is_trusted(ip),
                Mode::Outbound => ctx.config.is_outbound_client(ip),
            };
            if exempt {
                return Admission::Accept(None);
            }
            const REFUSED: &[u8] =
                b"421 4.7.0 Too many connections from your network, try again later\r\n";
            let block = ctx.throttle.block_of(ip);
            let Some(block_slot) = per_block.try_take(block) else {
                metrics::counter!("magicmx_smtp_refusals_total", "reason" => "connections_per_block").increment(1);
                info!(client = %peer, %block, "too many connections from the block");
                return Admission::Refuse {
                    reason: "connections_per_block",
                    reply: Some(REFUSED),
                };
            };
            let family = block_of(ip, FAMILY_IPV4_PREFIX, FAMILY_IPV6_PREFIX);
            let Some(family_slot) = per_family.try_take(family) else {
                metrics::counter!("magicmx_smtp_refusals_total", "reason" => "connections_per_family").increment(1);
                info!(client = %peer, %family, "too many connections from the block family");
                return Admission::Refuse {
                    reason: "connections_per_family",
                    reply: Some(REFUSED),
                };
            };
            Admission::Accept(Some((block_slot, family_slot)))
        }
    };
    let stop = shutdown.clone();
    let handle = move |stream: TcpStream, peer: SocketAddr| {
        connection(stream, peer, ctx.clone(), stop.clone())
    };
    crate::listener::serve(listeners, bounds, admit, handle, shutdown).await;
}

/// Where a throttle refusal is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Instead of the banner: `421`, and the session ends.
    Connect,
    /// At RCPT or the end of DATA: `450`, the session goes on.
    Transaction,
}

/// The reply line (no CRLF) for a throttle refusal (`Decision::Refuse`'s
/// fields) at `stage`.
fn throttle_reply(stage: Stage, reason: Reason, penalty: Option<Penalised>) -> String {
    match (stage, penalty) {
        (Stage::Connect, Some(p)) => format!(
            "421 4.7.0 Too much mail from your network ({}); try again in {} seconds",
            p.cause.map_or("over limit", |r| r.as_str()),
            p.left.as_secs()
        ),
        (Stage::Connect, None) => {
            format!("421 4.7.0 Too much mail from your network ({reason}); try again later")
        }
        (Stage::Transaction, _) => {
            format!("450 4.7.1 Too much mail from your network ({reason}); try again later")
        }
    }
}

/// How a driven stream ended.
enum Ended {
    Closed,
    StartTls(Box<Session>),
}

#[tracing::instrument(name = "smtp", skip_all, fields(client = %peer))]
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let ip = canonical_ip(peer.ip());
    let mut stream = stream;
    // Who is sending: trusted networks and outbound clients are never screened.
    let exempt = ctx.mode == Mode::Outbound || ctx.throttle.is_trusted(ip);
    let screen = match exempt {
        true => screen::Screen::default(),
        false => match screen::at_connect(&ctx, ip).await {
            screen::Connect::Go(s) => s,
            screen::Connect::Refuse(reply) => {
                let line = format!("{reply}\r\n");
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), stream.write_all(line.as_bytes()))
                        .await;
                let _ = stream.shutdown().await;
                return;
            }
        },
    };
    match ctx.throttle("connect", ip, |t| t.on_connect(ip, ctx.now_ms())) {
        Decision::Accept => {}
        Decision::Refuse { reason, penalty } => {
            let line = format!("{}\r\n", throttle_reply(Stage::Connect, reason, penalty));
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(line.as_bytes()))
                .await;
            let _ = stream.shutdown().await;
            return;
        }
        Decision::Drop { .. } => return,
    }
    let mut session = Session::new(ctx.session.clone(), ip, false);
    let hostname = &ctx.config.node.hostname;
    let early = tokio::time::timeout(
        ctx.config.smtp.command_timeout.0,
        screen::pregreet(&mut stream, &screen, hostname),
    )
    .await;
    match early {
        Ok(Some(early)) if !early.is_empty() => {
            let v = screen.failed(&ctx, ip, session::ProtocolTest::Pregreet);
            if let Some(r) = v.as_ref().and_then(|v| v.refusal()) {
                let line = format!("550 5.7.1 {r}\r\n");
                let _ = screen.write(&mut stream, line.as_bytes()).await;
                let _ = stream.shutdown().await;
                return;
            }
            session.receive(&early);
        }
        Ok(Some(_)) => {}
        Ok(None) if screen.pregreet_wait.is_none() => {}
        Ok(None) | Err(_) => return,
    }
    session.greeting();
    debug!("connected");
    // One deadline for the whole session, TLS or not.
    let deadline = tokio::time::Instant::now() + ctx.config.smtp.session_deadline.0;
    let session = match drive(&mut stream, ip, session, &ctx, &screen, &shutdown, deadline).await {
        Ended::Closed => return,
        Ended::StartTls(s) => *s,
    };
    // After STARTTLS: boxed, so that the TLS stream and its session's
    // future are allocated only by sessions that use TLS.
    Box::pin(after_starttls(
        stream, ip, session, ctx, screen, shutdown, deadline,
    ))
    .await;
}

/// The rest of a session after `STARTTLS`: the handshake (bounded by the
/// command timeout and the session deadline), then the session over TLS.
async fn after_starttls(
    stream: TcpStream,
    ip: IpAddr,
    session: Session,
    ctx: Arc<Context>,
    screen: screen::Screen,
    shutdown: CancellationToken,
    deadline: tokio::time::Instant,
) {
    let Some(acceptor) = ctx.tls.clone() else {
        return;
    };
    let timeout = ctx
        .config
        .smtp
        .command_timeout
        .0
        .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
    let mut tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            info!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            info!("TLS handshake timed out");
            return;
        }
    };
    let mut session = session;
    session.tls_started();
    if let Ended::StartTls(_) =
        drive(&mut tls, ip, session, &ctx, &screen, &shutdown, deadline).await
    {
        // The session refuses a second STARTTLS itself; nothing to do.
    }
    let _ = tls.shutdown().await;
}

/// Does the local part carry a route of its own (`user%host`, `host!user`,
/// a quoted `"user@host"`)? Such mail would be forwarded by the domain's
/// real MX to wherever the sender chose.
fn sender_routed(address: &str) -> bool {
    let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
    local.contains(['%', '!', '@'])
}

async fn write_out<S: AsyncWrite + Unpin>(
    stream: &mut S,
    session: &mut Session,
    screen: &screen::Screen,
    timeout: Duration,
) -> bool {
    if !session.has_output() {
        return true;
    }
    let out = session.take_output();
    // A tarpitted reply takes longer than a normal one: the tarpit's own
    // time is bounded by `[suspect] tarpit_time` (at most 60s).
    let timeout = match screen.tarpitting() {
        true => timeout + screen::MAX_TARPIT,
        false => timeout,
    };
    matches!(
        tokio::time::timeout(timeout, screen.write(stream, &out)).await,
        Ok(true)
    )
}

/// Drives `session` on `stream` until it ends, the client goes, or a
/// limit of time passes: `command_timeout` for a whole command line,
/// `data_timeout` for each DATA chunk, `data_deadline` for a whole DATA
/// phase and `deadline` (from `session_deadline`) for the session. Past
/// any of them the client gets `421 4.4.2` and the connection closes; a
/// message not yet complete is dropped, never acknowledged.
/// The read buffer of a session that only sends commands.
const READ_BUF_MIN: usize = 1024;
/// The read buffer once the session sends a message (or bulk commands).
const READ_BUF_MAX: usize = 64 * 1024;

async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: IpAddr,
    mut session: Session,
    ctx: &Context,
    screen: &screen::Screen,
    shutdown: &CancellationToken,
    deadline: tokio::time::Instant,
) -> Ended {
    use tokio::time::Instant;
    let cfg = &ctx.config.smtp;
    let hostname = &ctx.config.node.hostname;
    // The read buffer starts small: most sessions (and every tarpitted
    // one, idle for seconds between stuttered bytes) only ever read
    // command lines, and 5,000 tarpitted sessions must cost a few KiB each
    // (issue 11). It grows to `READ_BUF_MAX` for DATA or once a read fills it.
    let mut buf = vec![0u8; READ_BUF_MIN];
    // When the partial command line now buffered began: a whole command
    // line must arrive within `command_timeout`, not each of its bytes
    // (a client dripping one byte per timeout would hold its slot forever).
    let mut line_started: Option<Instant> = None;
    // The DATA phase being timed (its number) and when it must end.
    let mut data_due: Option<(u64, Instant)> = None;
    // The last SPF answer for greylisting: (sender, authorised domain).
    let mut spf_cache: Option<(String, Option<String>)> = None;
    // A reply write may take `command_timeout`, never past the session's deadline.
    let write_budget = || {
        cfg.command_timeout
            .0
            .min(deadline.saturating_duration_since(Instant::now()))
    };
    loop {
        match session.next_event() {
            Event::NeedInput => {
                if !write_out(stream, &mut session, screen, write_budget()).await {
                    return Ended::Closed;
                }
                // A partial command line is buffered: its clock keeps running.
                if session.in_data() || !session.has_buffered_input() {
                    line_started = None;
                } else {
                    line_started.get_or_insert_with(tokio::time::Instant::now);
                }
                if !session.in_data() {
                    data_due = None;
                } else if data_due.is_none_or(|(n, _)| n != session.data_phases()) {
                    data_due = Some((session.data_phases(), Instant::now() + cfg.data_deadline.0));
                }
                let timeout = match line_started {
                    _ if session.in_data() => cfg.data_timeout.0,
                    Some(t) => cfg.command_timeout.0.saturating_sub(t.elapsed()),
                    None => cfg.command_timeout.0,
                };
                let due = data_due.map_or(deadline, |(_, d)| d.min(deadline));
                let timeout = timeout.min(due.saturating_duration_since(Instant::now()));
                if session.in_data() && buf.len() < READ_BUF_MAX {
                    buf.resize(READ_BUF_MAX, 0);
                }
                let read = tokio::select! {
                    r = tokio::time::timeout(timeout, stream.read(&mut buf)) => r,
                    _ = shutdown.cancelled() => {
                        let line = format!("421 4.3.2 {hostname} Service shutting down\r\n");
                        let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(line.as_bytes())).await;
                        return Ended::Closed;
                    }
                };
                match read {
                    Ok(Ok(0)) => {
                        debug!("client closed");
                        return Ended::Closed;
                    }
                    Ok(Ok(n)) => {
                        session.receive(&buf[..n]);
                        // A full small buffer: the client sends in bulk (a
                        // pipelined batch), read the rest in larger chunks.
                        if n == buf.len() && buf.len() < READ_BUF_MAX {
                            buf.resize(READ_BUF_MAX, 0);
                        }
                    }
                    Ok(Err(e)) => {
                        debug!(error = %e, "read failed");
                        return Ended::Closed;
                    }
                    Err(_) => {
                        let kind = if Instant::now() >= deadline {
                            "session_deadline"
                        } else if data_due.is_some_and(|(_, d)| Instant::now() >= d) {
                            "data_deadline"
                        } else if session.in_data() {
                            "data_timeout"
                        } else {
                            "command_timeout"
                        };
                        metrics::counter!("magicmx_smtp_timeouts_total", "kind" => kind)
                            .increment(1);
                        info!(in_data = session.in_data(), kind, "timeout");
                        let line = format!("421 4.4.2 {hostname} Error: timeout exceeded\r\n");
                        let _ = tokio::time::timeout(
                            Duration::from_secs(5),
                            stream.write_all(line.as_bytes()),
                        )
                        .await;
                        return Ended::Closed;
                    }
                }
            }
            Event::Close => {
                write_out(stream, &mut session, screen, write_budget()).await;
                let _ = stream.shutdown().await;
                return Ended::Closed;
            }
            Event::StartTls => {
                if !write_out(stream, &mut session, screen, write_budget()).await {
                    return Ended::Closed;
                }
                return Ended::StartTls(Box::new(session));
            }
            Event::Recipient { address, domain } => {
                let trap = screen.scored && ctx.throttle.policy().is_trap(&address);
                let verdict = match trap {
                    // Nobody writes to a trap: never delivered.
                    true => Verdict::Refuse(format!(
                        "550 5.1.1 <{address}>: Recipient address rejected: User unknown"
                    )),
                    // Boxed, like the greylist check: their futures (DNS,
                    // a verification probe, SPF) are kilobytes, and every
                    // session, a tarpitted one too, would carry that size.
                    false => Box::pin(ctx.check_recipient(peer, &address, &domain)).await,
                };
                // Greylisting comes last: only a recipient the node would
                // take is worth a retry.
                let verdict = match verdict {
                    Verdict::Accept if screen.scored && ctx.mode == Mode::Inbound => {
                        let sender = session.sender().unwrap_or_default().to_string();
                        let helo = session.helo().unwrap_or_default().to_string();
                        Box::pin(ctx.greylist(peer, &sender, &helo, &address, &mut spf_cache)).await
                    }
                    v => v,
                };
                if let Verdict::Refuse(reply) = &verdict {
                    info!(rcpt = %address, reply = %reply, "recipient refused");
                    screen.recipient(ctx, peer, &address, reply.starts_with('5'));
                }
                session.recipient_verdict(verdict);
            }
            Event::ProtocolTest(test) => {
                let v = screen.failed(ctx, peer, test);
                let refusal = v.as_ref().and_then(|v| v.refusal()).map(|r| r.to_string());
                let ends = test == session::ProtocolTest::NonSmtp || session.in_data();
                if let (Some(r), false) = (refusal, ends) {
                    // Refused now: what was answered goes out, then the refusal.
                    let _ = write_out(stream, &mut session, screen, cfg.command_timeout.0).await;
                    let line = format!("550 5.7.1 {r}\r\n");
                    let _ = tokio::time::timeout(
                        cfg.command_timeout.0,
                        screen.write(stream, line.as_bytes()),
                    )
                    .await;
                    let _ = stream.shutdown().await;
                    return Ended::Closed;
                }
            }
            Event::Message(m) => {
                let result = ctx.store(*m).await;
                session.message_stored(result.as_deref().map_err(|e| e.as_str()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{sender_routed, throttle_reply, Stage};

    #[test]
    fn sender_specified_routing_is_recognised() {
        assert!(sender_routed("victim%elsewhere.test@example.test"));
        assert!(sender_routed("elsewhere.test!victim@example.test"));
        assert!(sender_routed("\"victim@elsewhere.test\"@example.test"));
        assert!(!sender_routed("bob@example.test"));
        assert!(!sender_routed("bob.smith+tag@example.test"));
    }

    #[test]
    fn throttle_refusals_are_worded_by_stage() {
        use crate::throttle::{Penalised, Reason};
        use std::time::Duration;
        let over = (Reason::TooManyConnections, None);
        assert_eq!(
            throttle_reply(Stage::Connect, over.0, over.1),
            "421 4.7.0 Too much mail from your network (too_many_connections); try again later"
        );
        assert_eq!(
            throttle_reply(Stage::Transaction, over.0, over.1),
            "450 4.7.1 Too much mail from your network (too_many_connections); try again later"
        );
        let boxed = Some(Penalised {
            cause: Some(Reason::TooManyMessages),
            left: Duration::from_secs(42),
        });
        assert_eq!(
            throttle_reply(Stage::Connect, Reason::PenaltyBox, boxed),
            "421 4.7.0 Too much mail from your network (too_many_messages); try again in 42 seconds"
        );
    }
}
