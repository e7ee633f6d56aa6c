//! Postfix SMTPD access policy delegation server for a domain's real MX.
//!
//! The real MX must take direct connections only from trusted senders and
//! from magic nodes; everyone else is expected to follow the published MX
//! records and reach a magic node first. Postfix asks this service at each
//! `RCPT TO` (`check_policy_service inet:HOST:PORT` in
//! `smtpd_recipient_restrictions`) and applies the action it answers.
//!
//! The protocol (<https://www.postfix.org/SMTPD_POLICY_README.html>): Postfix
//! sends `name=value` lines ending with an empty line; the server answers
//! `action=...` and an empty line. A connection carries many requests, one
//! after the other. Postfix itself times out, closes idle connections and,
//! when the service fails, retries once and then applies
//! `smtpd_policy_service_default_action` (a temporary error by default).
//!
//! Data enters as bytes, is cut into requests by the sans-IO [`Decoder`], and
//! [`PolicyServer::decide`] turns each request into an [`Action`] (pure
//! except for the per-block refusal counters):
//!
//! * trusted networks (`[trust] networks`) and magic nodes
//!   (`[policy] magic_nodes`, plus the addresses of gossip peers when the
//!   service runs inside a node) get `DUNNO`: the rest of Postfix's
//!   restrictions decide;
//! * so does a client whose TLS certificate's public key belongs to the
//!   network (`ccert_pubkey_fingerprint`, sent by Postfix with
//!   `smtpd_tls_ask_ccert = yes`): a key pinned in `[policy] network_keys`
//!   (see [`crate::netkeys`]), or, inside a node, the key of a live gossip
//!   member's certificate. A node relays with that certificate, so a real
//!   MX needs no list of the network's addresses;
//! * any other client, at `protocol_state=RCPT`: the first
//!   `polite_refusals` requests of its network block within `polite_period`
//!   get `DEFER_IF_PERMIT 4.7.1` (a sender that bypassed the magic MX by
//!   mistake sees a temporary error and can fix its routing before mail is
//!   lost), later ones `REJECT 5.7.1`;
//! * other protocol states get `DUNNO`;
//! * a malformed request gets `DEFER_IF_PERMIT 4.3.5` (a temporary error, as
//!   Postfix itself gives when the service fails). If the framing itself is
//!   lost (a line or request over the size bounds) the answer is sent and the
//!   connection is closed; Postfix reconnects for its next request.
//!
//! Everything is bounded: line length, request size, attributes per request,
//! simultaneous connections, idle time, and the table of per-block counters
//! (expired entries are evicted first, then the oldest).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::listener::{Admission, Bounds};
use crate::netkeys::{self, Fingerprint, NetworkKeys};
use crate::slots::KeyedSlots;
use crate::smtp::canonical_ip;
use crate::throttle::{block_of, Block};

/// Longest attribute line, in octets, newline included. Postfix attributes
/// are short; the longest in practice are certificate subjects and SASL
/// names, well under this.
pub const MAX_LINE: usize = 4_096;
/// Largest request (all its lines), in octets.
pub const MAX_REQUEST: usize = 64 * 1_024;
/// Most attributes in one request (Postfix 3.x sends about 35).
pub const MAX_ATTRIBUTES: usize = 200;
/// Networks blocks whose refusals are remembered.
pub const MAX_TRACKED_BLOCKS: usize = 100_000;

/// Text of the polite temporary refusal.
const DEFER_TEXT: &str = "Direct delivery is not accepted from your network; \
                          please deliver through the domain's published MX hosts \
                          (the most preferred MX record)";
/// Text of the final refusal.
const REJECT_TEXT: &str = "Direct delivery refused: your network keeps bypassing the \
                           domain's published MX hosts; deliver through the most \
                           preferred MX record";

/// What the service needs to decide, taken from the configuration.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    /// Always `DUNNO` (`[trust] networks`).
    pub trusted: Vec<IpNet>,
    /// Always `DUNNO` (`[policy] magic_nodes`).
    pub magic_nodes: Vec<IpNet>,
    /// Requests of a block answered `DEFER_IF_PERMIT` before `REJECT`.
    pub polite_refusals: u32,
    /// The polite count starts again after this long.
    pub polite_period: Duration,
    /// Block prefix lengths (`[throttle] ipv4_prefix` / `ipv6_prefix`).
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Bound of the per-block counter table.
    pub max_tracked_blocks: usize,
    /// Simultaneous connections (`[policy] max_connections`).
    pub max_connections: usize,
    /// Simultaneous connections from one client address
    /// (`[policy] max_connections_per_client`).
    pub max_connections_per_client: usize,
    /// A request must be complete this long after its first byte (or after
    /// the connection opened, for the first request): Postfix writes a
    /// request at once, so a slow one is not Postfix (`[policy] request_timeout`).
    pub request_timeout: Duration,
    /// A connection idle between requests is closed after this long.
    /// Postfix closes its idle policy connections after
    /// `smtpd_policy_service_max_idle` (300s), so normally Postfix closes
    /// first (`[policy] idle_timeout`, 330s).
    pub idle_timeout: Duration,
}

impl PolicySettings {
    /// The settings of `[policy]`, `[trust]` and `[throttle]`.
    pub fn from_config(config: &Config) -> PolicySettings {
        PolicySettings {
            trusted: config.trust.networks.clone(),
            magic_nodes: config.policy.magic_nodes.clone(),
            polite_refusals: config.policy.polite_refusals,
            polite_period: config.policy.polite_period.0,
            ipv4_prefix: config.throttle.ipv4_prefix,
            ipv6_prefix: config.throttle.ipv6_prefix,
            max_tracked_blocks: MAX_TRACKED_BLOCKS,
            max_connections: config.policy.max_connections,
            max_connections_per_client: config.policy.max_connections_per_client,
            request_timeout: config.policy.request_timeout.0,
            idle_timeout: config.policy.idle_timeout.0,
        }
    }
}

/// Addresses of magic nodes learned at run time (gossip membership).
pub type PeerAddrs = Arc<dyn Fn() -> Vec<IpAddr> + Send + Sync>;

/// The live member (this node included) whose certificate's public key
/// has this fingerprint, by name: learned at run time (gossip membership).
/// Asked once per request with a client certificate, so a lookup, not a
/// list of every member.
pub type MemberKeys = Arc<dyn Fn(&Fingerprint) -> Option<String> + Send + Sync>;

/// One policy request: its attributes, names lower-case as Postfix sends them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub attrs: BTreeMap<String, String>,
}

impl Request {
    /// A request from `name=value` pairs (for tests and tools).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Request {
        Request {
            attrs: pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs.get(name).map(String::as_str)
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// No opinion: Postfix's other restrictions decide.
    Dunno,
    /// `DEFER_IF_PERMIT text`: temporary refusal unless something later rejects.
    DeferIfPermit(String),
    /// `REJECT text`: permanent refusal.
    Reject(String),
    /// The request was malformed (why): a temporary error,
    /// `DEFER_IF_PERMIT 4.3.5`, as Postfix gives when the service fails.
    Malformed(String),
}

impl Action {
    /// The `action=` value.
    pub fn value(&self) -> String {
        match self {
            Action::Dunno => "DUNNO".to_string(),
            Action::DeferIfPermit(text) => format!("DEFER_IF_PERMIT {text}"),
            Action::Reject(text) => format!("REJECT {text}"),
            Action::Malformed(why) => {
                format!("DEFER_IF_PERMIT 4.3.5 policy request malformed: {why}")
            }
        }
    }

    /// The bytes sent back: `action=...` and the empty line.
    pub fn response(&self) -> String {
        format!("action={}\n\n", self.value())
    }

    /// Metric and log label.
    pub fn label(&self) -> &'static str {
        match self {
            Action::Dunno => "dunno",
            Action::DeferIfPermit(_) => "defer_if_permit",
            Action::Reject(_) => "reject",
            Action::Malformed(_) => "malformed",
        }
    }

    /// The answer to a malformed request.
    pub fn malformed(why: &str) -> Action {
        Action::Malformed(why.to_string())
    }
}

/// Why bytes from the client are not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// A line without `=`, or with an empty name.
    #[error("bad attribute line")]
    BadLine,
    #[error("too many attributes")]
    TooManyAttributes,
    /// Framing lost: the connection must be closed after the answer.
    #[error("line longer than {MAX_LINE} octets")]
    LineTooLong,
    /// Framing lost: the connection must be closed after the answer.
    #[error("request larger than {MAX_REQUEST} octets")]
    TooLarge,
}

impl Malformed {
    /// True if the end of the bad request cannot be found: close after answering.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Malformed::LineTooLong | Malformed::TooLarge)
    }
}

/// Cuts a byte stream into requests (sans-IO). Feed bytes with
/// [`Decoder::extend`], then take requests with [`Decoder::next_request`]
/// until it returns `None`.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Attributes of the request being read.
    current: Request,
    /// Octets of the request being read.
    size: usize,
    /// The request being read is bad; the rest of it is skipped.
    bad: Option<Malformed>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Octets received but not consumed yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete request (or why it is malformed), if one is complete.
    /// After a fatal [`Malformed`] the decoder must not be used any more.
    pub fn next_request(&mut self) -> Option<Result<Request, Malformed>> {
        loop {
            let Some(nl) = self.buf.iter().position(|&b| b == b'\n') else {
                if self.buf.len() >= MAX_LINE {
                    return Some(Err(Malformed::LineTooLong));
                }
                if self.size + self.buf.len() > MAX_REQUEST {
                    return Some(Err(Malformed::TooLarge));
                }
                return None;
            };
            if nl + 1 > MAX_LINE {
                return Some(Err(Malformed::LineTooLong));
            }
            self.size += nl + 1;
            if self.size > MAX_REQUEST {
                return Some(Err(Malformed::TooLarge));
            }
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = &line[..nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                let request = std::mem::take(&mut self.current);
                self.size = 0;
                return Some(match self.bad.take() {
                    Some(why) => Err(why),
                    None => Ok(request),
                });
            }
            if self.bad.is_some() {
                continue;
            }
            match line.iter().position(|&b| b == b'=') {
                Some(0) | None => self.bad = Some(Malformed::BadLine),
                Some(eq) => {
                    if self.current.attrs.len() >= MAX_ATTRIBUTES {
                        self.bad = Some(Malformed::TooManyAttributes);
                        continue;
                    }
                    let name = String::from_utf8_lossy(&line[..eq]).to_ascii_lowercase();
                    let value = String::from_utf8_lossy(&line[eq + 1..]).into_owned();
                    self.current.attrs.insert(name, value);
                }
            }
        }
    }
}

/// Refusals of one block in its current period.
#[derive(Debug, Clone, Copy)]
struct Refusals {
    since: Instant,
    count: u32,
}

/// The policy service: settings, learned peers and per-block counters.
pub struct PolicyServer {
    settings: PolicySettings,
    peers: Option<PeerAddrs>,
    /// `[policy] network_keys`.
    network_keys: Option<NetworkKeys>,
    member_keys: Option<MemberKeys>,
    /// A fingerprint of another digest than sha256 was seen (logged once).
    wrong_digest_logged: std::sync::atomic::AtomicBool,
    refusals: Mutex<HashMap<Block, Refusals>>,
}

impl std::fmt::Debug for PolicyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyServer")
            .field("settings", &self.settings)
            .field("peers", &self.peers.is_some())
            .field("network_keys", &self.network_keys)
            .field("member_keys", &self.member_keys.is_some())
            .finish()
    }
}

impl PolicyServer {
    /// `peers`, when given, is asked for the addresses of the network's
    /// nodes at each request that is not trusted otherwise.
    pub fn new(settings: PolicySettings, peers: Option<PeerAddrs>) -> PolicyServer {
        PolicyServer {
            settings,
            peers,
            network_keys: None,
            member_keys: None,
            wrong_digest_logged: std::sync::atomic::AtomicBool::new(false),
            refusals: Mutex::new(HashMap::new()),
        }
    }

    /// Also lets in clients whose certificate key is pinned in `keys`.
    pub fn with_network_keys(mut self, keys: NetworkKeys) -> PolicyServer {
        self.network_keys = Some(keys);
        self
    }

    /// Also lets in clients whose certificate key is one of `keys()` (asked
    /// at each request that is not let in otherwise).
    pub fn with_member_keys(mut self, keys: MemberKeys) -> PolicyServer {
        self.member_keys = Some(keys);
        self
    }

    pub fn settings(&self) -> &PolicySettings {
        &self.settings
    }

    /// Blocks whose refusals are remembered now.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Block, Refusals>> {
        self.refusals.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True if `ip` is trusted or a magic node.
    pub fn is_allowed(&self, ip: IpAddr) -> bool {
        let ip = crate::addr::canonical_ip(ip);
        let s = &self.settings;
        if s.trusted
            .iter()
            .chain(&s.magic_nodes)
            .any(|n| n.contains(&ip))
        {
            return true;
        }
        self.peers.as_ref().is_some_and(|peers| {
            peers()
                .into_iter()
                .any(|p| crate::addr::canonical_ip(p) == ip)
        })
    }

    /// The network node whose key is the client certificate's of `request`
    /// (`ccert_pubkey_fingerprint`), if any: its pinned name (may be empty)
    /// or its name as a live member.
    pub fn network_node(&self, request: &Request, now: Instant) -> Option<String> {
        if self.network_keys.is_none() && self.member_keys.is_none() {
            return None;
        }
        let text = request.get("ccert_pubkey_fingerprint")?.trim();
        if text.is_empty() {
            return None;
        }
        let fp = match netkeys::parse(text) {
            Ok(fp) => fp,
            Err(e) => {
                use std::sync::atomic::Ordering;
                if !self.wrong_digest_logged.swap(true, Ordering::Relaxed) {
                    warn!(fingerprint = %text.chars().take(200).collect::<String>(), error = ?e, "policy: ccert_pubkey_fingerprint is not a SHA-256 fingerprint; set smtpd_tls_fingerprint_digest = sha256 in Postfix's main.cf");
                }
                return None;
            }
        };
        if let Some(name) = self.network_keys.as_ref().and_then(|k| k.lookup(&fp, now)) {
            metrics::counter!("magicmx_policy_network_key_matches_total", "source" => "pinned")
                .increment(1);
            return Some(name);
        }
        let member = self.member_keys.as_ref().and_then(|keys| keys(&fp))?;
        metrics::counter!("magicmx_policy_network_key_matches_total", "source" => "member")
            .increment(1);
        Some(member)
    }

    /// The action for one request at `now` (counts a refusal when it refuses).
    pub fn decide(&self, request: &Request, now: Instant) -> Action {
        if request.get("request") != Some("smtpd_access_policy") {
            return Action::malformed("request=smtpd_access_policy missing");
        }
        let Some(state) = request.get("protocol_state") else {
            return Action::malformed("protocol_state missing");
        };
        let Some(client) = request.get("client_address") else {
            return Action::malformed("client_address missing");
        };
        let Ok(ip) = client.trim().parse::<IpAddr>() else {
            return Action::malformed("client_address is not an IP address");
        };
        if !state.eq_ignore_ascii_case("RCPT") || self.is_allowed(ip) {
            return Action::Dunno;
        }
        if let Some(node) = self.network_node(request, now) {
            debug!(client, node = %node, "policy: the client certificate's key belongs to the network");
            return Action::Dunno;
        }
        let s = &self.settings;
        let block = block_of(ip, s.ipv4_prefix, s.ipv6_prefix);
        let count = self.count_refusal(block, now);
        if count <= s.polite_refusals {
            Action::DeferIfPermit(format!("4.7.1 {DEFER_TEXT}"))
        } else {
            Action::Reject(format!("5.7.1 {REJECT_TEXT}"))
        }
    }

    /// Counts one refusal of `block`; returns its number in the current period.
    fn count_refusal(&self, block: Block, now: Instant) -> u32 {
        let period = self.settings.polite_period;
        let mut map = self.lock();
        if !map.contains_key(&block) && map.len() >= self.settings.max_tracked_blocks {
            evict(&mut map, now, period, self.settings.max_tracked_blocks);
        }
        let entry = map.entry(block).or_insert(Refusals {
            since: now,
            count: 0,
        });
        if now.saturating_duration_since(entry.since) >= period {
            *entry = Refusals {
                since: now,
                count: 0,
            };
        }
        entry.count = entry.count.saturating_add(1);
        entry.count
    }

    /// Serves Postfix on `listener` until `shutdown`; returns when every
    /// connection has ended. Over `max_connections` in total or
    /// `max_connections_per_client` from one address, a connection is
    /// closed at once (Postfix takes that as a temporary failure).
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "policy listening");
        }
        let this = Arc::new(self);
        let per_client = KeyedSlots::new(this.settings.max_connections_per_client);
        let bounds = Bounds {
            name: "policy",
            max_connections: this.settings.max_connections,
            busy: None,
        };
        let admit = move |peer: SocketAddr| match per_client.try_take(canonical_ip(peer.ip())) {
            Some(slot) => Admission::Accept(slot),
            None => {
                warn!(%peer, "policy: too many connections from the client");
                Admission::Refuse {
                    reason: "connections_per_client",
                    reply: None,
                }
            }
        };
        let stop = shutdown.clone();
        let handle = move |stream: TcpStream, peer: SocketAddr| {
            let (this, shutdown) = (this.clone(), stop.clone());
            async move { this.connection(stream, peer, shutdown).await }
        };
        crate::listener::serve(vec![listener], bounds, admit, handle, shutdown).await;
    }

    #[tracing::instrument(name = "policy", skip_all, fields(peer = %peer))]
    async fn connection(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let _ = stream.set_nodelay(true);
        debug!("policy connection");
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; 4_096];
        // The first request is due from the connection's start: Postfix
        // connects when it has a question.
        let mut request_due = Some(TokioInstant::now() + self.settings.request_timeout);
        loop {
            while let Some(next) = decoder.next_request() {
                let (action, fatal) = match next {
                    Ok(request) => (self.answer(&request), false),
                    Err(why) => {
                        let action = Action::malformed(&why.to_string());
                        metrics::counter!("magicmx_policy_decisions_total", "action" => action.label())
                            .increment(1);
                        warn!(reason = %why, fatal = why.is_fatal(), "malformed policy request");
                        (action, why.is_fatal())
                    }
                };
                request_due = None;
                let response = action.response();
                let write = stream.write_all(response.as_bytes());
                match tokio::time::timeout(self.settings.idle_timeout, write).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
                if fatal {
                    close_after_error(&mut stream, &mut buf).await;
                    return;
                }
            }
            if decoder.pending() > 0 {
                request_due
                    .get_or_insert_with(|| TokioInstant::now() + self.settings.request_timeout);
            }
            let wait = match request_due {
                Some(due) => due.saturating_duration_since(TokioInstant::now()),
                None => self.settings.idle_timeout,
            };
            let read = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(wait, stream.read(&mut buf)) => r,
            };
            match read {
                Err(_) if request_due.is_some() => {
                    metrics::counter!("magicmx_policy_timeouts_total", "stage" => "request")
                        .increment(1);
                    info!(
                        pending = decoder.pending(),
                        "policy request not complete in time, closing"
                    );
                    return;
                }
                Err(_) => {
                    debug!("policy connection idle, closing");
                    return;
                }
                Ok(Ok(0)) | Ok(Err(_)) => {
                    if decoder.pending() > 0 {
                        debug!(
                            pending = decoder.pending(),
                            "policy connection closed mid-request"
                        );
                    }
                    return;
                }
                Ok(Ok(n)) => decoder.extend(&buf[..n]),
            }
        }
    }

    /// Decides, logs and counts one well-formed request.
    fn answer(&self, request: &Request) -> Action {
        let action = self.decide(request, Instant::now());
        metrics::counter!("magicmx_policy_decisions_total", "action" => action.label())
            .increment(1);
        let client = request.get("client_address").unwrap_or("");
        let block = client
            .parse::<IpAddr>()
            .map(|ip| {
                block_of(ip, self.settings.ipv4_prefix, self.settings.ipv6_prefix).to_string()
            })
            .unwrap_or_default();
        let state = request.get("protocol_state").unwrap_or("");
        let rcpt = request.get("recipient").unwrap_or("");
        // The client certificate's key, if it showed one (`-` if none).
        let ccert: String = match request.get("ccert_pubkey_fingerprint").map(str::trim) {
            None | Some("") => "-".to_string(),
            Some(fp) => fp.chars().take(100).collect(),
        };
        match &action {
            Action::Dunno => {
                debug!(
                    client,
                    block,
                    state,
                    ccert_key = %ccert,
                    action = action.label(),
                    "policy decision"
                )
            }
            Action::Malformed(why) => {
                warn!(client, block, state, action = action.label(), reason = %why, "malformed policy request")
            }
            _ => info!(
                client,
                block,
                state,
                recipient = rcpt,
                ccert_key = %ccert,
                action = action.label(),
                "policy decision"
            ),
        }
        action
    }
}

/// Closes a connection whose framing is lost, cleanly: FIN after the
/// answer, then whatever the client still sends is read and dropped for a
/// moment, because closing with unread input would reset the connection and
/// the client could lose the answer.
async fn close_after_error(stream: &mut TcpStream, buf: &mut [u8]) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut total = 0usize;
        while let Ok(n) = stream.read(buf).await {
            total += n;
            if n == 0 || total > 4 * MAX_REQUEST {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// Makes room in a full counter table: drops expired entries, then, if it
/// is still full, the oldest eighth (so eviction cost is amortised).
fn evict(map: &mut HashMap<Block, Refusals>, now: Instant, period: Duration, max: usize) {
    map.retain(|_, r| now.saturating_duration_since(r.since) < period);
    if map.len() < max || map.is_empty() {
        return;
    }
    let mut ages: Vec<Instant> = map.values().map(|r| r.since).collect();
    let k = (ages.len() / 8).max(1).min(ages.len() - 1);
    let (_, cut, _) = ages.select_nth_unstable(k);
    let cut = *cut;
    map.retain(|_, r| r.since > cut);
    // Equal ages at the cut may leave the table full: drop any one entry.
    if map.len() >= max {
        if let Some(b) = map.keys().next().copied() {
            map.remove(&b);
        }
    }
    metrics::counter!("magicmx_policy_evictions_total").increment(1);
}

/// Binds `[policy] listen`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("policy.listen: cannot bind {addr}: {e}"))
}

/// The pinned keys of `[policy] network_keys`, if set; Err if the file
/// cannot be read at start.
pub fn open_network_keys(config: &Config) -> anyhow::Result<Option<NetworkKeys>> {
    let Some(path) = &config.policy.network_keys else {
        return Ok(None);
    };
    NetworkKeys::open(path, Instant::now())
        .map(Some)
        .map_err(|e| anyhow::anyhow!("policy.network_keys: {e}"))
}

/// `magicmx policy`: the policy service alone, until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr = config.policy.listen.ok_or_else(|| {
        anyhow::anyhow!(
            "policy.listen: not set; it is the address for Postfix's check_policy_service"
        )
    })?;
    crate::telemetry::prometheus();
    let listener = bind(addr).await?;
    let mut server = PolicyServer::new(PolicySettings::from_config(&config), None);
    if let Some(keys) = open_network_keys(&config)? {
        server = server.with_network_keys(keys);
    }
    server.serve(listener, shutdown).await;
    info!("policy service stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PolicySettings {
        PolicySettings {
            trusted: vec!["10.1.0.0/16".parse().unwrap()],
            magic_nodes: vec![
                "192.0.2.10/32".parse().unwrap(),
                "2001:db8::10/128".parse().unwrap(),
            ],
            polite_refusals: 3,
            polite_period: Duration::from_secs(3_600),
            ipv4_prefix: 24,
            ipv6_prefix: 48,
            max_tracked_blocks: 1_000,
            max_connections: 10,
            max_connections_per_client: 10,
            request_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
        }
    }

    fn rcpt(client: &str) -> Request {
        Request::from_pairs([
            ("request", "smtpd_access_policy"),
            ("protocol_state", "RCPT"),
            ("protocol_name", "ESMTP"),
            ("client_address", client),
            ("recipient", "bob@example.org"),
        ])
    }

    const POSTFIX_REQUEST: &str = "request=smtpd_access_policy\nprotocol_state=RCPT\n\
        protocol_name=SMTP\nhelo_name=some.domain.tld\nqueue_id=8045F2AB23\n\
        sender=foo@bar.tld\nrecipient=bar@foo.tld\nrecipient_count=0\nclient_address=1.2.3.4\n\
        client_name=another.domain.tld\nreverse_client_name=another.domain.tld\ninstance=123.456.7\n\
        sasl_method=\nccert_subject=\nsize=12345\npolicy_context=\n\n";

    #[test]
    fn polite_then_reject_per_block() {
        let p = PolicyServer::new(settings(), None);
        let t0 = Instant::now();
        for i in 0..3 {
            let a = p.decide(&rcpt(&format!("198.51.100.{}", i + 1)), t0);
            assert!(
                matches!(&a, Action::DeferIfPermit(t) if t.starts_with("4.7.1 ")),
                "{a:?}"
            );
            assert!(a.value().contains("MX"), "{a:?}");
        }
        let a = p.decide(&rcpt("198.51.100.200"), t0);
        assert!(
            matches!(&a, Action::Reject(t) if t.starts_with("5.7.1 ")),
            "{a:?}"
        );
        // Another block starts polite.
        assert_eq!(
            p.decide(&rcpt("198.51.101.1"), t0).label(),
            "defer_if_permit"
        );
        // After the period the block is polite again.
        let later = t0 + Duration::from_secs(3_600);
        assert_eq!(
            p.decide(&rcpt("198.51.100.1"), later).label(),
            "defer_if_permit"
        );
    }

    #[test]
    fn trusted_and_magic_are_dunno() {
        let peers: PeerAddrs = Arc::new(|| vec!["203.0.113.5".parse().unwrap()]);
        let p = PolicyServer::new(settings(), Some(peers));
        let now = Instant::now();
        for ip in [
            "10.1.2.3",
            "192.0.2.10",
            "::ffff:192.0.2.10",
            "2001:db8::10",
            "203.0.113.5",
        ] {
            for _ in 0..10 {
                assert_eq!(p.decide(&rcpt(ip), now), Action::Dunno, "{ip}");
            }
        }
        assert_eq!(
            p.decide(&rcpt("192.0.2.11"), now).label(),
            "defer_if_permit"
        );
        assert_eq!(
            p.decide(&rcpt("203.0.113.6"), now).label(),
            "defer_if_permit"
        );
        assert_eq!(p.tracked(), 2);
    }

    fn rcpt_with_key(client: &str, key: &str) -> Request {
        let mut r = rcpt(client);
        r.attrs
            .insert("ccert_pubkey_fingerprint".into(), key.to_string());
        r.attrs
            .insert("ccert_fingerprint".into(), "00:11".to_string());
        r
    }

    #[test]
    fn network_keys_let_clients_in_by_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("network_keys");
        let (pinned, member, later, stranger) =
            ([0x11u8; 32], [0x22u8; 32], [0x33u8; 32], [0x44u8; 32]);
        std::fs::write(&path, netkeys::line(&pinned, "node1")).unwrap();
        let t0 = Instant::now();
        let members: MemberKeys =
            Arc::new(move |fp: &Fingerprint| (*fp == member).then(|| "node2".to_string()));
        let p = PolicyServer::new(settings(), None)
            .with_network_keys(NetworkKeys::open(&path, t0).unwrap())
            .with_member_keys(members);
        // Postfix's format, and any case, with or without colons.
        for key in [
            netkeys::format(&pinned),
            netkeys::format(&pinned).to_lowercase(),
            netkeys::format(&pinned).replace(':', ""),
            netkeys::format(&member),
        ] {
            for _ in 0..10 {
                let r = rcpt_with_key("198.51.100.7", &key);
                assert_eq!(p.decide(&r, t0), Action::Dunno, "{key}");
            }
        }
        assert_eq!(
            p.network_node(
                &rcpt_with_key("198.51.100.7", &netkeys::format(&member)),
                t0
            )
            .as_deref(),
            Some("node2")
        );
        assert_eq!(p.tracked(), 0);
        // Strangers: a key not in the set, no certificate (empty), a
        // malformed fingerprint: polite refusals for the block, then
        // REJECT, as for any stranger (settings: 3 polite refusals).
        for key in [netkeys::format(&stranger), String::new(), "zz".to_string()] {
            let a = p.decide(&rcpt_with_key("198.51.101.7", &key), t0);
            assert_eq!(a.label(), "defer_if_permit", "{key}");
        }
        // A fingerprint of another digest (MD5), and no ccert attribute at all.
        let md5 = "AB:".repeat(15) + "AB";
        assert_eq!(
            p.decide(&rcpt_with_key("198.51.101.8", &md5), t0).label(),
            "reject"
        );
        assert_eq!(p.decide(&rcpt("198.51.101.9"), t0).label(), "reject");
        // A key appended to the file is let in once the file is looked at
        // again.
        netkeys::append(&path, &later, "node3").unwrap();
        let r = rcpt_with_key("198.51.102.7", &netkeys::format(&later));
        assert_eq!(p.decide(&r, t0).label(), "defer_if_permit");
        assert_eq!(p.decide(&r, t0 + netkeys::RECHECK), Action::Dunno);
        // Other protocol states are DUNNO anyway, and not counted.
        let mut r = rcpt_with_key("198.51.103.7", &netkeys::format(&stranger));
        r.attrs.insert("protocol_state".into(), "DATA".into());
        assert_eq!(p.decide(&r, t0), Action::Dunno);
    }

    #[test]
    fn without_network_keys_a_certificate_is_nothing() {
        let p = PolicyServer::new(settings(), None);
        let r = rcpt_with_key("198.51.100.7", &netkeys::format(&[0x11; 32]));
        assert_eq!(p.decide(&r, Instant::now()).label(), "defer_if_permit");
        // Magic nodes by address keep working whatever the certificate.
        let r = rcpt_with_key("192.0.2.10", &netkeys::format(&[0x11; 32]));
        assert_eq!(p.decide(&r, Instant::now()), Action::Dunno);
    }

    #[test]
    fn other_states_are_dunno_and_not_counted() {
        let p = PolicyServer::new(settings(), None);
        let now = Instant::now();
        for state in ["CONNECT", "EHLO", "MAIL", "DATA", "END-OF-MESSAGE", "VRFY"] {
            let mut r = rcpt("198.51.100.1");
            r.attrs.insert("protocol_state".into(), state.into());
            assert_eq!(p.decide(&r, now), Action::Dunno, "{state}");
        }
        assert_eq!(p.tracked(), 0);
        let mut r = rcpt("198.51.100.1");
        r.attrs.insert("protocol_state".into(), "rcpt".into());
        assert_eq!(p.decide(&r, now).label(), "defer_if_permit");
    }

    #[test]
    fn zero_polite_refusals_rejects_at_once() {
        let mut s = settings();
        s.polite_refusals = 0;
        let p = PolicyServer::new(s, None);
        assert_eq!(
            p.decide(&rcpt("198.51.100.1"), Instant::now()).label(),
            "reject"
        );
    }

    #[test]
    fn ipv6_blocks() {
        let p = PolicyServer::new(settings(), None);
        let now = Instant::now();
        for i in 0..3 {
            let a = p.decide(&rcpt(&format!("2001:db8:1:{i}::1")), now);
            assert_eq!(a.label(), "defer_if_permit");
        }
        assert_eq!(p.decide(&rcpt("2001:db8:1:ffff::9"), now).label(), "reject");
        assert_eq!(
            p.decide(&rcpt("2001:db8:2::1"), now).label(),
            "defer_if_permit"
        );
    }

    #[test]
    fn malformed_requests() {
        let p = PolicyServer::new(settings(), None);
        let now = Instant::now();
        let mut r = rcpt("198.51.100.1");
        r.attrs.remove("request");
        assert!(p
            .decide(&r, now)
            .value()
            .starts_with("DEFER_IF_PERMIT 4.3.5 "));
        let mut r = rcpt("198.51.100.1");
        r.attrs.insert("request".into(), "junk".into());
        assert!(p
            .decide(&r, now)
            .value()
            .starts_with("DEFER_IF_PERMIT 4.3.5 "));
        let mut r = rcpt("198.51.100.1");
        r.attrs.remove("client_address");
        assert!(p.decide(&r, now).value().contains("client_address"));
        assert!(p
            .decide(&rcpt("unknown"), now)
            .value()
            .contains("client_address"));
        let mut r = rcpt("198.51.100.1");
        r.attrs.remove("protocol_state");
        assert!(p.decide(&r, now).value().contains("protocol_state"));
        assert_eq!(p.tracked(), 0);
    }

    #[test]
    fn counter_table_is_bounded() {
        let mut s = settings();
        s.max_tracked_blocks = 64;
        s.polite_refusals = 1;
        let p = PolicyServer::new(s, None);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let ip = IpAddr::from((0x0a00_0000u32 + (i << 8) + 0x0200_0000).to_be_bytes());
            p.decide(
                &rcpt(&ip.to_string()),
                t0 + Duration::from_millis(u64::from(i)),
            );
            assert!(p.tracked() <= 64);
        }
        // The newest block is still remembered.
        let last = IpAddr::from((0x0a00_0000u32 + (9_999 << 8) + 0x0200_0000).to_be_bytes());
        assert_eq!(
            p.decide(&rcpt(&last.to_string()), t0 + Duration::from_secs(10))
                .label(),
            "reject"
        );
    }

    #[test]
    fn decoder_postfix_request_split_at_every_byte() {
        let bytes = format!("{POSTFIX_REQUEST}{POSTFIX_REQUEST}");
        let bytes = bytes.as_bytes();
        for split in 0..=bytes.len() {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for part in [&bytes[..split], &bytes[split..]] {
                d.extend(part);
                while let Some(r) = d.next_request() {
                    got.push(r.expect("well-formed"));
                }
            }
            assert_eq!(got.len(), 2, "split at {split}");
            assert_eq!(got[0], got[1]);
            assert_eq!(got[0].get("client_address"), Some("1.2.3.4"));
            assert_eq!(got[0].get("sasl_method"), Some(""));
            assert_eq!(got[0].get("protocol_state"), Some("RCPT"));
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn decoder_crlf_and_values_with_equals() {
        let mut d = Decoder::new();
        d.extend(b"request=smtpd_access_policy\r\nccert_subject=CN=a=b\r\n\r\n");
        let r = d.next_request().unwrap().unwrap();
        assert_eq!(r.get("ccert_subject"), Some("CN=a=b"));
        assert!(d.next_request().is_none());
    }

    #[test]
    fn decoder_bad_line_skips_to_end_of_request() {
        let mut d = Decoder::new();
        d.extend(b"request=smtpd_access_policy\nno equals sign\nclient_address=1.2.3.4\n\n");
        d.extend(b"=empty name\n\nrequest=smtpd_access_policy\n\n");
        assert_eq!(d.next_request(), Some(Err(Malformed::BadLine)));
        assert_eq!(d.next_request(), Some(Err(Malformed::BadLine)));
        let r = d.next_request().unwrap().unwrap();
        assert_eq!(r.attrs.len(), 1);
        assert!(d.next_request().is_none());
    }

    #[test]
    fn decoder_bounds() {
        let mut d = Decoder::new();
        d.extend(&vec![b'a'; MAX_LINE]);
        assert_eq!(d.next_request(), Some(Err(Malformed::LineTooLong)));
        assert!(Malformed::LineTooLong.is_fatal());

        let mut d = Decoder::new();
        d.extend(format!("x={}\n", "a".repeat(MAX_LINE)).as_bytes());
        assert_eq!(d.next_request(), Some(Err(Malformed::LineTooLong)));

        let mut d = Decoder::new();
        let line = format!("x={}\n", "a".repeat(1_000));
        let mut got = None;
        for _ in 0..(MAX_REQUEST / line.len() + 2) {
            d.extend(line.as_bytes());
            if let Some(r) = d.next_request() {
                got = Some(r);
                break;
            }
        }
        assert_eq!(got, Some(Err(Malformed::TooLarge)));

        let mut d = Decoder::new();
        for i in 0..MAX_ATTRIBUTES + 5 {
            d.extend(format!("a{i}=1\n").as_bytes());
        }
        d.extend(b"\n");
        assert_eq!(d.next_request(), Some(Err(Malformed::TooManyAttributes)));
        assert!(!Malformed::TooManyAttributes.is_fatal());
    }

    #[test]
    fn responses() {
        assert_eq!(Action::Dunno.response(), "action=DUNNO\n\n");
        assert_eq!(
            Action::Reject("5.7.1 no".into()).response(),
            "action=REJECT 5.7.1 no\n\n"
        );
    }

    // Property tests: whatever a client sends, the decoder stays bounded and
    // split-independent, and every request gets a one-line answer.

    use proptest::prelude::*;

    fn arb_policy_input() -> impl Strategy<Value = Vec<u8>> {
        let name = proptest::sample::select(vec![
            "request",
            "protocol_state",
            "client_address",
            "recipient",
            "REQUEST",
            "x",
            "",
        ]);
        let value = prop_oneof![
            proptest::sample::select(vec![
                "smtpd_access_policy",
                "RCPT",
                "rcpt",
                "DATA",
                "198.51.100.7",
                " 10.1.2.3 ",
                "::ffff:192.0.2.10",
                "2001:db8::1",
                "1.2.3.4%eth0",
                "=",
                "",
            ])
            .prop_map(str::to_string),
            ".*",
        ];
        let client = prop_oneof![
            Just("198.51.100.7".to_string()),
            Just("2001:db8::1".to_string()),
            "[0-9a-f.:]{0,20}",
        ];
        let line = prop_oneof![
            2 => client.prop_map(|c| {
                format!("request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={c}\n\n")
                    .into_bytes()
            }),
            6 => (name, value).prop_map(|(n, v)| format!("{n}={v}\n").into_bytes()),
            2 => Just(b"\n".to_vec()),
            1 => Just(b"\r\n".to_vec()),
            1 => Just(b"no equals sign\n".to_vec()),
            1 => proptest::collection::vec(any::<u8>(), 0..30),
            1 => (any::<u8>(), 0usize..6000).prop_map(|(b, n)| vec![b; n]),
            1 => (0usize..250).prop_map(|n| {
                (0..n).flat_map(|i| format!("a{i}=1\n").into_bytes()).collect()
            }),
        ];
        proptest::collection::vec(line, 0..40).prop_map(|l| l.concat())
    }

    /// Decodes `chunks` as the connection does: requests until none is
    /// complete, then the next chunk; stops after a fatal error. Errors
    /// are kept as "fatal or not" (where a lost framing is noticed first
    /// may depend on the split).
    fn decode(chunks: &[&[u8]]) -> Vec<Result<Request, bool>> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for chunk in chunks {
            d.extend(chunk);
            while let Some(next) = d.next_request() {
                match next {
                    Ok(r) => {
                        assert!(r.attrs.len() <= MAX_ATTRIBUTES);
                        out.push(Ok(r));
                    }
                    Err(e) if e.is_fatal() => {
                        out.push(Err(true));
                        return out;
                    }
                    Err(_) => out.push(Err(false)),
                }
            }
            assert!(d.pending() < MAX_LINE, "{} octets pending", d.pending());
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_input_is_decoded_and_answered(
            input in prop_oneof![
                arb_policy_input(),
                proptest::collection::vec(any::<u8>(), 0..2000),
            ],
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..10),
        ) {
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
            at.push(0);
            at.push(input.len());
            at.sort_unstable();
            let chunks: Vec<&[u8]> = at.windows(2).map(|w| &input[w[0]..w[1]]).collect();
            let whole = decode(&[&input]);
            prop_assert_eq!(&decode(&chunks), &whole);
            let p = PolicyServer::new(settings(), None);
            for r in &whole {
                let action = match r {
                    Ok(request) => p.answer(request),
                    Err(_) => Action::malformed(&Malformed::BadLine.to_string()),
                };
                let response = action.response();
                prop_assert!(response.starts_with("action="));
                prop_assert!(response.ends_with("\n\n"));
                prop_assert!(!response[..response.len() - 2].contains(['\n', '\r']));
            }
        }
    }
}
