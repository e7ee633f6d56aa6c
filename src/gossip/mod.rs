//! Gossip: sharing per-block counts with the other nodes of the network.
//!
//! Data enters from two sides. From this node's throttle: every `interval`
//! the push task takes a [`Throttle::snapshot`], records what grew in the
//! [`ledger::Ledger`] (own counts and counts learned from peers alike) and
//! pushes the hot entries to `fanout` random live peers; each change is
//! pushed for about log2(N) + 1 rounds, so forwarding is epidemic. Counts
//! not pushed yet since they changed also go out at quarter intervals, so
//! news does not wait a whole interval at every hop. From
//! peers: count batches are checked (network id, version, sender name
//! against the connection's certificate, origin, block prefix, epoch
//! length) and merged with [`Throttle::merge`] (field-wise maximum, so
//! duplicates and reordering are harmless; the throttle caps each peer
//! origin at `max_origin_share` of the limit and ignores epochs outside the
//! window). Every `anti_entropy_interval`, and as soon as a peer comes up,
//! a push-pull digest exchange with one peer repairs lost messages,
//! restarts and healed partitions.
//!
//! Membership is SWIM (foca, [`membership`]) over QUIC datagrams of the same
//! mutual-TLS connections ([`transport`], [`tls`]); a node starts knowing
//! only its seeds' addresses, learns each seed's name from its certificate
//! and announces itself to it.
//!
//! **Counts stamped with this node's own name.** A restarted node has lost
//! its own counts while its peers still hold them. For a short *relearn*
//! period after start (3 anti-entropy intervals plus the failure timeout)
//! counts carrying this node's name are merged back into its own origin
//! (origin 0, field-wise maximum), so it resumes from where it was instead
//! of granting the same block a fresh allowance. Counts made between the
//! restart and the relearn within the same epoch may be under-counted by
//! at most what the node counted before relearning (max, not sum). After
//! that period this node is the only authority on its counts and copies
//! arriving from peers are ignored (a peer cannot inflate them).
//!
//! Known limit: counts of an origin are accepted from any peer that
//! forwards them (epidemic), for origins that are members or the sender
//! itself; a certified but malicious member could forge another member's
//! counts. Signed per-origin batches would close that.

pub mod ca;
mod hot;
pub mod ledger;
pub mod membership;
pub mod owners;
pub mod tls;
pub mod transport;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::{IndexedRandom, SliceRandom};
use serde::Serialize;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::netkeys::Fingerprint;
use crate::suspect::SuspectState;
use crate::throttle::{now_ms, Block, Origin, Throttle, SELF_ORIGIN};
use crate::verify::{self, Verifier};
use ledger::{decode_batch, rounds_for, Key, Ledger, OriginId, MAX_BATCH_ENTRIES};
use membership::{Members, NodeId, Output};
use transport::{dropped, read_frame, write_frame, Event, Peer, SendError, Transport};
use wire::{proto, Body};

/// A gossip problem at start or in `magicmx ca`.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error("{key}: {message}")]
    Config { key: &'static str, message: String },
    #[error("gossip.listen: cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Ca { path: PathBuf, message: String },
}

/// One peer as shown in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub name: String,
    pub gossip_addr: SocketAddr,
    pub smtp_addrs: Vec<SocketAddr>,
    /// `alive`, `suspect` or `down`.
    pub state: &'static str,
    /// Seconds since this node last heard from the peer directly.
    pub last_heard_secs: Option<f64>,
}

/// One owner's report of a hot block, as `/explain` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HotReportStatus {
    pub owner: String,
    pub counts: crate::throttle::Counts,
    pub origins: u32,
}

/// Down peers stay in `/status` this long.
const SHOW_DOWN_FOR: Duration = Duration::from_secs(600);
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Anti-entropy exchanges answered at once.
const MAX_ANSWERS: usize = 8;
/// Quick owners rounds: hot and bursting blocks to their owners, and the
/// owners' reports, at most this much later.
const OWNERS_TICK: Duration = Duration::from_millis(50);
/// Pushes per interval: one full round and the rest for fresh counts.
const FRESH_PUSHES: u32 = 4;
/// Most suspect states in one batch (each is at most a few hundred bytes).
const MAX_SUSPECTS: usize = 512;
/// Longest a peer's suspect signal may live from now (a peer cannot make
/// one eternal; a listing lives at most `[dnsbl] max_ttl`, a test failure
/// `[suspect] reason_ttl`).
const MAX_SUSPECT_LIFE_MS: u64 = 24 * 3_600 * 1_000;
/// Most greylist entries (and pools) in one batch (each is about 30 bytes).
const MAX_GREYLIST: usize = 4_096;
/// Greylist times from a peer may be this far ahead of this node's clock.
const MAX_GREYLIST_SKEW_MS: u64 = 60_000;
/// The SWIM leave at shutdown is retried until acknowledged, for at most
/// half the failure timeout (later, it saves the peers little) and at
/// most this long.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two tries of the leave to one peer.
const LEAVE_RETRY: Duration = Duration::from_millis(50);
/// After shutdown, messages in flight get this long to finish.
const IN_FLIGHT_DRAIN: Duration = Duration::from_secs(2);
/// Most recipient verdicts (and accept-all marks) in one batch (each is
/// about 30 bytes).
const MAX_VERIFY: usize = 4_096;

/// The running gossip of this node. All its tasks end when the shutdown
/// token given to [`Gossip::start`] is cancelled.
pub struct Gossip {
    core: Arc<Core>,
    local_addr: SocketAddr,
    /// The long-lived loops, taken by [`Gossip::run`].
    loops: Mutex<Option<tokio::task::JoinSet<()>>>,
}

struct LedgerState {
    ledger: Ledger,
    /// Throttle origin index -> ledger origin id.
    ids: Vec<Option<OriginId>>,
}

struct Core {
    name: String,
    network: String,
    config: Arc<Config>,
    throttle: Arc<Throttle>,
    /// Recipient verdicts shared with the peers (`[verify]`).
    verifier: Option<Arc<Verifier>>,
    transport: Arc<Transport>,
    members: Mutex<Members>,
    /// The key of each member's certificate, from the connection its own
    /// SWIM packets arrived on (vouched, like its identity), and this
    /// node's own: the real-MX policy lets these keys in.
    member_keys: Mutex<HashMap<String, Fingerprint>>,
    own_key: Option<Fingerprint>,
    members_changed: Notify,
    /// Owners per block (`gossip.counts = "owners"`); None: every count to
    /// every node through the ledger.
    hot: Option<hot::Hot>,
    /// When the owners last re-reported all their hot blocks.
    last_refresh: Mutex<Instant>,
    /// Connections made at once to learn an owner's key.
    key_fetches: Arc<Semaphore>,
    ledger: Mutex<LedgerState>,
    epoch_ms: u64,
    window_epochs: u64,
    relearn_until: Instant,
    smtp: Vec<SocketAddr>,
    exchange_now: mpsc::Sender<SocketAddr>,
    answers: Semaphore,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

fn config_err(key: &'static str, message: impl Into<String>) -> GossipError {
    GossipError::Config {
        key,
        message: message.into(),
    }
}

impl Gossip {
    /// Binds the QUIC endpoint, joins through the seeds, starts
    /// dissemination, anti-entropy and membership tasks; all end when
    /// `shutdown` is cancelled. `verifier`'s cache is shared with the peers.
    pub async fn start(
        config: Arc<Config>,
        throttle: Arc<Throttle>,
        verifier: Option<Arc<Verifier>>,
        shutdown: CancellationToken,
    ) -> Result<Gossip, GossipError> {
        let g = &config.gossip;
        let path = |key: &'static str, p: &Option<PathBuf>| {
            p.clone()
                .ok_or_else(|| config_err(key, "is required when gossip is on"))
        };
        let material = tls::Material::load(
            &path("gossip.ca", &g.ca)?,
            &path("gossip.cert", &g.cert)?,
            &path("gossip.key", &g.key)?,
        )?;
        material.check(&config.node.name)?;
        if g.listen.ip().is_unspecified() {
            return Err(config_err(
                "gossip.listen",
                "must be a specific address (peers dial the address this node announces), not 0.0.0.0 or ::",
            ));
        }
        let transport_config = tls::transport_config(g.failure_timeout.0);
        let server = material.server_config(transport_config.clone())?;
        let client = material.client_config(transport_config)?;
        let tasks = TaskTracker::new();
        let (events_tx, events_rx) = mpsc::channel(1024);
        let transport = Transport::bind(
            g.listen,
            server,
            client,
            events_tx,
            shutdown.clone(),
            tasks.clone(),
        )
        .map_err(|source| GossipError::Bind {
            addr: g.listen,
            source,
        })?;
        let local_addr = transport.local_addr().map_err(|source| GossipError::Bind {
            addr: g.listen,
            source,
        })?;
        info!(addr = %local_addr, node = %config.node.name, network = %g.network, "gossip listening");

        // SMTP addresses as peers should see them: a wildcard listener is
        // announced with the gossip address's IP.
        let smtp: Vec<SocketAddr> = config
            .smtp
            .listen
            .iter()
            .map(|a| match a.ip().is_unspecified() {
                true => SocketAddr::new(local_addr.ip(), a.port()),
                false => *a,
            })
            .collect();
        let me = NodeId {
            name: config.node.name.clone(),
            gossip: local_addr,
            smtp: smtp.clone(),
            bump: now_ms(),
        };
        let epoch_ms = (config.throttle.epoch.0.as_millis() as u64).max(1);
        let window_epochs = ((config.throttle.window.0.as_millis() as u64) / epoch_ms).max(1);
        let (exchange_tx, exchange_rx) = mpsc::channel(64);
        let hot = match g.counts {
            crate::config::GossipCounts::All => None,
            crate::config::GossipCounts::Owners => Some(
                hot::Hot::new(
                    &config.node.name,
                    &g.network,
                    g.owners,
                    g.hot_fraction,
                    epoch_ms,
                    window_epochs,
                    g.interval.0.as_millis() as u64,
                    material.key.secret_der(),
                    &material.chain[0],
                    material.ca.clone(),
                )
                .map_err(|m| config_err("gossip.key", m))?,
            ),
        };
        let core = Arc::new(Core {
            name: config.node.name.clone(),
            network: g.network.clone(),
            members: Mutex::new(Members::new(me, g, rand::random())),
            member_keys: Mutex::new(HashMap::new()),
            own_key: crate::netkeys::of_cert(&material.chain[0]),
            members_changed: Notify::new(),
            hot,
            last_refresh: Mutex::new(Instant::now()),
            key_fetches: Arc::new(Semaphore::new(16)),
            ledger: Mutex::new(LedgerState {
                ledger: Ledger::new(1),
                ids: Vec::new(),
            }),
            epoch_ms,
            window_epochs,
            relearn_until: Instant::now() + g.anti_entropy_interval.0 * 3 + g.failure_timeout.0,
            smtp,
            exchange_now: exchange_tx,
            answers: Semaphore::new(MAX_ANSWERS),
            throttle,
            verifier,
            transport,
            shutdown,
            tasks: tasks.clone(),
            config,
        });
        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(core.clone().dispatch(events_rx));
        loops.spawn(core.clone().membership_loop());
        loops.spawn(core.clone().push_loop());
        if core.hot.is_some() {
            loops.spawn(core.clone().owners_loop());
        }
        loops.spawn(core.clone().anti_entropy_loop(exchange_rx));
        loops.spawn(core.clone().seed_loop());
        tasks.close();
        Ok(Gossip {
            core,
            local_addr,
            loops: Mutex::new(Some(loops)),
        })
    }

    /// Runs until shutdown, as one of the node's essential tasks: if a
    /// gossip loop ends or panics before shutdown, this returns (or panics)
    /// at once, and the node stops rather than run on with a dead gossip.
    /// After shutdown it waits for the loops, so the SWIM leave goes out
    /// before the process exits, then (bounded) for the messages in flight.
    pub async fn run(&self) {
        let taken = self.loops.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut loops) = taken else { return };
        while let Some(r) = loops.join_next().await {
            if let Err(e) = r {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
            if !self.core.shutdown.is_cancelled() {
                return;
            }
        }
        let _ = tokio::time::timeout(IN_FLIGHT_DRAIN, self.core.tasks.wait()).await;
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Live peers for /status: name, gossip addr, smtp addrs, state
    /// (alive/suspect/down), last heard. Down peers are listed for ten
    /// minutes.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let m = self.core.members.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<PeerStatus> = m
            .peers
            .values()
            .filter(|p| p.down_since.is_none_or(|t| t.elapsed() < SHOW_DOWN_FOR))
            .map(|p| PeerStatus {
                name: p.id.name.clone(),
                gossip_addr: p.id.gossip,
                smtp_addrs: p.id.smtp.clone(),
                state: match p.state {
                    foca::State::Alive => "alive",
                    foca::State::Suspect => "suspect",
                    foca::State::Down => "down",
                },
                last_heard_secs: p.last_heard.map(|t| t.elapsed().as_secs_f64()),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// SMTP addresses of every live member, this node included (for the
    /// real-MX policy service).
    pub fn member_smtp_addrs(&self) -> Vec<SocketAddr> {
        let m = self.core.members.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<SocketAddr> = self.core.smtp.clone();
        for id in m.vouched_live() {
            out.extend(id.smtp.iter().copied());
        }
        out.sort();
        out.dedup();
        out
    }

    /// The live member that vouched for itself (this node included) whose
    /// certificate key is `key`, by name (for the real-MX policy service).
    /// The owners of `block` in this node's view (`gossip.counts =
    /// "owners"`; None with `all`).
    pub fn owners_of(&self, block: &Block) -> Option<Vec<String>> {
        self.core.hot.as_ref().map(|h| h.owner_names(block))
    }

    /// The owners' latest reports of a hot `block`: (owner, connections,
    /// messages, recipients, origins).
    pub fn hot_reports(&self, block: &Block) -> Vec<HotReportStatus> {
        let Some(h) = &self.core.hot else {
            return Vec::new();
        };
        h.reports_of(block)
            .into_iter()
            .map(|(owner, w)| HotReportStatus {
                owner,
                counts: w.counts,
                origins: w.origins,
            })
            .collect()
    }

    /// With `gossip.counts = "owners"`: (hot blocks this node has reports
    /// of, signed counts it keeps as an owner).
    pub fn owners_sizes(&self) -> Option<(usize, usize)> {
        self.core.hot.as_ref().map(|h| h.sizes())
    }

    pub fn member_with_key(&self, key: &Fingerprint) -> Option<String> {
        if self.core.own_key.as_ref() == Some(key) {
            return Some(self.core.name.clone());
        }
        let name = {
            let keys = self.core.lock_member_keys();
            keys.iter()
                .find(|(_, k)| *k == key)
                .map(|(n, _)| n.clone())?
        };
        let live = self.core.members().vouched_live().any(|id| id.name == name);
        live.then_some(name)
    }
}

impl Core {
    fn lock_member_keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, Fingerprint>> {
        self.member_keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers the key `peer`'s certificate carries as its member's key;
    /// names no longer in the peer table are forgotten when the table
    /// doubles, so it stays bounded by the membership.
    fn vouch_key(&self, peer: &Peer) {
        let mut keys = self.lock_member_keys();
        if keys.get(&peer.name) == Some(&peer.key) {
            return;
        }
        keys.insert(peer.name.clone(), peer.key);
        // The same certificate's key checks the member's hot reports.
        if let (Some(hot), Some(cert)) = (&self.hot, tls::peer_cert(&peer.conn)) {
            hot.learn_key(&peer.name, &cert);
        }
        if keys.len() > 64 {
            let m = self.members();
            if keys.len() > 2 * m.peers.len() + 64 {
                keys.retain(|name, _| m.peers.contains_key(name));
            }
        }
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live_peers(&self) -> Vec<NodeId> {
        self.members().live().cloned().collect()
    }

    fn first_epoch(&self, now: u64) -> u64 {
        self.throttle
            .epoch_of(now)
            .saturating_sub(self.window_epochs - 1)
    }

    fn seal(&self, body: Body) -> Vec<u8> {
        wire::encode(&wire::seal(&self.network, &self.name, body))
    }

    /// Checks an envelope from `peer`; returns its body if acceptable.
    fn open(&self, peer: &Peer, bytes: &[u8]) -> Option<Body> {
        match wire::open(bytes, &self.network) {
            Err(r) => {
                dropped(r.as_str());
                debug!(peer = %peer.name, reason = r.as_str(), "gossip message dropped");
                None
            }
            Ok((sender, body)) => {
                if !peer.accepts(&sender) {
                    dropped("sender");
                    warn!(peer = %peer.name, claimed = %sender, reason = "sender does not match the certificate", "gossip message dropped");
                    return None;
                }
                metrics::counter!("magicmx_gossip_messages_total", "direction" => "in", "kind" => wire::kind(&body)).increment(1);
                Some(body)
            }
        }
    }

    async fn dispatch(self: Arc<Self>, mut events: mpsc::Receiver<Event>) {
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                e = events.recv() => match e { Some(e) => e, None => return },
            };
            match event {
                Event::Datagram(peer, bytes) => self.on_message(peer, &bytes),
                Event::Uni(peer, bytes, _queued) => self.on_message(peer, &bytes),
                Event::Bi(peer, send, recv) => {
                    if self.transport.drop_from(&peer.addr()) {
                        continue;
                    }
                    let me = self.clone();
                    self.tasks.spawn(async move {
                        let Ok(_permit) = me.answers.try_acquire() else {
                            dropped("overload");
                            return;
                        };
                        let name = peer.name.clone();
                        match tokio::time::timeout(EXCHANGE_TIMEOUT, me.answer_exchange(peer, send, recv)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => debug!(peer = %name, reason = %e, "anti-entropy answer failed"),
                            Err(_) => debug!(peer = %name, reason = "timeout", "anti-entropy answer failed"),
                        }
                    });
                }
            }
        }
    }

    fn on_message(self: &Arc<Self>, peer: Peer, bytes: &[u8]) {
        if self.transport.drop_from(&peer.addr()) {
            return;
        }
        if let Some(hot) = &self.hot {
            if let Ok((sender, body)) = owners::open(bytes, &self.network) {
                return self.on_v2(hot, &peer, &sender, body);
            }
        }
        let Some(body) = self.open(&peer, bytes) else {
            return;
        };
        match body {
            Body::Swim(packet) => self.on_swim(&peer, &packet),
            Body::Delta(batch) => {
                let n = self.merge_counts(&peer, &batch);
                debug!(peer = %peer.name, entries = batch.entries.len(), merged = n, "gossip delta");
            }
            other => {
                dropped("unexpected");
                debug!(peer = %peer.name, kind = wire::kind(&other), reason = "outside an exchange", "gossip message dropped");
            }
        }
    }

    /// A v2 message (owners per block): signed increments for blocks this
    /// node owns, or hot reports to keep and forward.
    fn on_v2(
        self: &Arc<Self>,
        hot: &hot::Hot,
        peer: &Peer,
        sender: &str,
        body: proto::envelope_v2::Body,
    ) {
        use proto::envelope_v2::Body as V2;
        if !peer.accepts(sender) {
            dropped("sender");
            warn!(peer = %peer.name, claimed = %sender, reason = "sender does not match the certificate", "gossip message dropped");
            return;
        }
        // No membership check: every v2 message is self-authenticating
        // (counts signed by their origin, the certificate's name; reports
        // signed by an owner, which must be a member to count), and a node
        // that just (re)joined gets increments before SWIM tells it who the
        // sender is.
        let now = now_ms();
        match body {
            V2::Increments(batch) => {
                metrics::counter!("magicmx_gossip_messages_total", "direction" => "in", "kind" => "increments").increment(1);
                let Some(cert) = tls::peer_cert(&peer.conn) else {
                    dropped("certificate");
                    return;
                };
                match hot.on_increments(&self.throttle, &peer.name, &cert, &batch, now) {
                    Ok(n) => {
                        debug!(peer = %peer.name, counts = batch.counts.len(), merged = n, "gossip increments")
                    }
                    Err(reason) => {
                        dropped(reason);
                        debug!(peer = %peer.name, reason, "gossip increments dropped");
                    }
                }
            }
            V2::Hot(relay) => {
                metrics::counter!("magicmx_gossip_messages_total", "direction" => "in", "kind" => "hot").increment(1);
                self.take_reports(hot, &peer.name, relay, true);
            }
            V2::Handoff(handoff) => {
                metrics::counter!("magicmx_gossip_messages_total", "direction" => "in", "kind" => "handoff").increment(1);
                if Instant::now() >= self.relearn_until {
                    dropped("late");
                    return;
                }
                let n = hot.on_handoff(&self.throttle, &handoff, now);
                debug!(peer = %peer.name, merged = n, "own counts relearned from an owner");
            }
            V2::Swim(_) => {
                dropped("unexpected");
                debug!(peer = %peer.name, kind = "swim", reason = "not in a v2 envelope", "gossip message dropped");
            }
        }
    }

    /// Keeps the new reports of a relay from `from` and forwards them; for
    /// owners whose key is not known yet, connects to the owner (mutual
    /// TLS vouches for its certificate), learns it, and takes those
    /// reports again (`fetch`: once).
    fn take_reports(
        self: &Arc<Self>,
        hot: &hot::Hot,
        from: &str,
        relay: proto::HotRelay,
        fetch: bool,
    ) {
        let (fresh, unknown) = hot.on_reports(&self.throttle, relay, now_ms());
        if !fresh.is_empty() {
            debug!(peer = %from, reports = fresh.len(), "hot reports forwarded");
            let bytes = Arc::new(hot.relay_bytes(fresh));
            let mut targets: Vec<NodeId> = self
                .live_peers()
                .into_iter()
                .filter(|p| p.name != from)
                .collect();
            targets.shuffle(&mut rand::rng());
            targets.truncate(self.config.gossip.fanout);
            for id in targets {
                self.send_later(id.gossip, bytes.clone(), "hot");
            }
        }
        if unknown.is_empty() {
            return;
        }
        if !fetch {
            dropped("owner_key");
            return;
        }
        let mut by_owner: HashMap<String, Vec<proto::HotReport>> = HashMap::new();
        for r in unknown {
            by_owner.entry(r.owner.clone()).or_default().push(r);
        }
        for (owner, reports) in by_owner {
            let Some(addr) = hot.member_addr(&owner) else {
                dropped("owner_key");
                continue;
            };
            let Ok(permit) = self.key_fetches.clone().try_acquire_owned() else {
                dropped("overload");
                continue;
            };
            let (me, from) = (self.clone(), from.to_string());
            self.tasks.spawn(async move {
                let _permit = permit;
                let peer = match tokio::time::timeout(EXCHANGE_TIMEOUT, me.transport.connect(addr))
                    .await
                {
                    Ok(Ok(p)) if p.name == owner => p,
                    _ => {
                        dropped("owner_key");
                        debug!(owner = %owner, "owner's key not learnt");
                        return;
                    }
                };
                let (Some(hot), Some(cert)) = (me.hot.as_ref(), tls::peer_cert(&peer.conn)) else {
                    return;
                };
                if hot.learn_key(&owner, &cert).is_some() {
                    me.take_reports(hot, &from, proto::HotRelay { reports }, false);
                }
            });
        }
    }

    /// Sends `bytes` to `addr` on a stream of its own, in a task.
    ///
    /// Signed counts (increments, handoffs) are sent only when something
    /// changed, so a send that fails (a dial in its backoff just after a
    /// partition healed, a peer restarting) is tried again a few times;
    /// they merge idempotently, so a copy that did arrive costs nothing.
    fn send_later(&self, addr: SocketAddr, bytes: Arc<Vec<u8>>, kind: &'static str) {
        let t = self.transport.clone();
        let shutdown = self.shutdown.clone();
        let retries: &[u64] = match kind {
            "increments" | "handoff" => &[300, 900, 2_000],
            _ => &[],
        };
        self.tasks.spawn(async move {
            let mut wait = retries.iter();
            loop {
                let Err(e) = t.send_uni(addr, &bytes, kind).await else {
                    return;
                };
                let Some(ms) = wait.next() else {
                    debug!(peer = %addr, reason = %e, kind, "gossip message not sent");
                    return;
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(*ms)) => {}
                }
            }
        });
    }

    /// One owners round (see [`hot`]): after the members changed, with
    /// everything on a full round, and all hot blocks again every
    /// `anti_entropy_interval`.
    fn owners_round(self: &Arc<Self>, hot: &hot::Hot, full: bool) {
        let live = self.live_peers();
        let changed = hot.set_members(live.iter().map(|id| (id.name.as_str(), id.gossip)));
        let refresh = full && {
            let mut last = self.last_refresh.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.elapsed() >= self.config.gossip.anti_entropy_interval.0;
            if due {
                *last = Instant::now();
            }
            due
        };
        let mut peers: Vec<SocketAddr> = live.iter().map(|id| id.gossip).collect();
        peers.shuffle(&mut rand::rng());
        peers.truncate(self.config.gossip.fanout);
        let (out, stats) = hot.round(&self.throttle, now_ms(), full, refresh, &peers);
        if stats.counts_sent > 0 || stats.hot_reported > 0 || stats.moved > 0 || stats.resent > 0 {
            debug!(
                counts = stats.counts_sent,
                hot = stats.hot_reported,
                moved = stats.moved,
                members_changed = changed,
                resent = stats.resent,
                messages = out.len(),
                "owners round"
            );
        }
        for (addr, bytes, kind) in out {
            self.send_later(addr, Arc::new(bytes), kind);
        }
    }

    fn on_swim(self: &Arc<Self>, peer: &Peer, packet: &[u8]) {
        let src = match membership::packet_source(packet) {
            Some(src) if peer.accepts(&src.name) => src,
            claimed => {
                dropped("sender");
                warn!(peer = %peer.name, claimed = ?claimed.map(|s| s.name), reason = "SWIM source does not match the certificate", "gossip message dropped");
                return;
            }
        };
        self.vouch_key(peer);
        let out = self.members().handle_packet(src, packet, Instant::now());
        match out {
            Ok(out) => self.after_members(out),
            Err(e) => {
                dropped("swim");
                debug!(peer = %peer.name, reason = %e, "SWIM packet refused");
            }
        }
        self.members_changed.notify_one();
    }

    /// Sends foca's packets and reacts to membership changes.
    fn after_members(self: &Arc<Self>, out: Output) {
        for (addr, _, data) in out.send {
            let bytes = self.seal(Body::Swim(data));
            let t = self.transport.clone();
            self.tasks.spawn(async move {
                if let Err(e) = t.send_datagram(addr, bytes, "swim").await {
                    debug!(peer = %addr, reason = %e, "SWIM packet not sent");
                }
            });
        }
        // A peer that (re)appeared, or this node that just joined: exchange
        // digests at once rather than at the next anti-entropy tick.
        for id in out.up {
            let _ = self.exchange_now.try_send(id.gossip);
            self.send_suspect_snapshot(&id);
            // A node that restarted relearns its own counts from the
            // owners that kept them.
            if let Some(bytes) = self
                .hot
                .as_ref()
                .and_then(|h| h.counts_of_origin(&id.name, now_ms()))
            {
                self.send_later(id.gossip, Arc::new(bytes), "handoff");
            }
        }
        if out.joined {
            if let Some(p) = self.live_peers().choose(&mut rand::rng()) {
                let _ = self.exchange_now.try_send(p.gossip);
            }
        }
        metrics::gauge!("magicmx_gossip_peers").set(self.members().live_count() as f64);
    }

    async fn membership_loop(self: Arc<Self>) {
        loop {
            let deadline = self
                .members()
                .next_deadline()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = self.members_changed.notified() => continue,
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
            let out = self.members().handle_timers(Instant::now());
            self.after_members(out);
        }
        // Tell the others we leave (acknowledged, all at once, bounded),
        // then close the endpoint. A try that fails (a dial in its backoff,
        // a stream or an acknowledgement late on a loaded machine) is made
        // again: one lost leave costs that peer the whole failure timeout.
        let out = self.members().leave(Instant::now());
        let budget = (self.config.gossip.failure_timeout.0 / 2).min(LEAVE_TIMEOUT);
        let deadline = tokio::time::Instant::now() + budget;
        let mut sends = tokio::task::JoinSet::new();
        for (addr, _, data) in out.send {
            let bytes = self.seal(Body::Swim(data));
            let t = self.transport.clone();
            sends.spawn(async move {
                loop {
                    let sent = t.send_acknowledged(addr, &bytes, "swim");
                    let e = match tokio::time::timeout_at(deadline, sent).await {
                        Ok(Ok(())) => return,
                        Ok(Err(e)) => e,
                        Err(_) => SendError::Timeout,
                    };
                    let last = tokio::time::Instant::now() + LEAVE_RETRY >= deadline;
                    if last || matches!(e, SendError::Blocked) {
                        debug!(peer = %addr, reason = %e, "leave not sent");
                        return;
                    }
                    tokio::time::sleep(LEAVE_RETRY).await;
                }
            });
        }
        while sends.join_next().await.is_some() {}
        self.transport.close().await;
        info!("gossip stopped");
    }

    /// Announces this node to its seeds until it has joined, then keeps
    /// announcing to any seed that is not a live member (healed partitions,
    /// restarted seeds).
    async fn seed_loop(self: Arc<Self>) {
        let g = &self.config.gossip;
        let local = self.transport.local_addr().ok();
        loop {
            let joined = self.members().live_count() > 0;
            for seed in g.seeds.iter().copied().filter(|s| Some(*s) != local) {
                let me = self.clone();
                self.tasks.spawn(async move { me.announce_to(seed).await });
            }
            let wait = if joined {
                g.anti_entropy_interval.0
            } else {
                g.interval.0.max(Duration::from_millis(200))
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn announce_to(self: Arc<Self>, seed: SocketAddr) {
        let peer = match self.transport.connect(seed).await {
            Ok(p) => p,
            Err(e) => {
                debug!(peer = %seed, reason = %e, "seed unreachable");
                return;
            }
        };
        if peer.name == self.name || self.live_peers().iter().any(|id| id.name == peer.name) {
            return;
        }
        let placeholder = NodeId {
            name: peer.name.clone(),
            gossip: seed,
            smtp: Vec::new(),
            bump: 0,
        };
        debug!(peer = %peer.name, addr = %seed, "announcing to seed");
        let out = self.members().announce(placeholder, Instant::now());
        match out {
            Ok(out) => self.after_members(out),
            Err(e) => debug!(peer = %seed, reason = %e, "announce failed"),
        }
        self.members_changed.notify_one();
    }

    /// Records what grew in the throttle since the last round. Only counts
    /// of this node and of members travel: a certified peer that is not a
    /// member (it never joined) influences the nodes it talks to directly,
    /// capped, and goes no further.
    fn observe_throttle(&self, state: &mut LedgerState, now: u64) {
        if self.hot.is_some() {
            // Owners per block: counts travel to their owners, not through
            // the ledger to everyone.
            return;
        }
        state.ledger.prune(self.first_epoch(now));
        let members: HashSet<String> = self.members().peers.keys().cloned().collect();
        let mut travels: Vec<Option<bool>> = Vec::new();
        for (origin, block, epoch, counts) in self.throttle.snapshot(now) {
            let i = origin as usize;
            if travels.len() <= i {
                travels.resize(i + 1, None);
            }
            let ok = *travels[i].get_or_insert_with(|| {
                origin == SELF_ORIGIN
                    || self
                        .throttle
                        .origin_name(origin)
                        .is_some_and(|n| members.contains(&n))
            });
            if !ok {
                continue;
            }
            let Some(id) = self.ledger_id(state, origin) else {
                continue;
            };
            state.ledger.observe(
                Key {
                    origin: id,
                    epoch,
                    block,
                },
                counts,
            );
        }
    }

    fn ledger_id(&self, state: &mut LedgerState, origin: Origin) -> Option<OriginId> {
        let i = origin as usize;
        if let Some(Some(id)) = state.ids.get(i) {
            return Some(*id);
        }
        let name = self.throttle.origin_name(origin)?;
        let id = state.ledger.intern(&name);
        if state.ids.len() <= i {
            state.ids.resize(i + 1, None);
        }
        state.ids[i] = Some(id);
        Some(id)
    }

    /// Every `interval`, a full round; [`FRESH_PUSHES`] - 1 times in
    /// between, a round of the counts that changed since they were last
    /// pushed (their first push), so that news crosses a hop in a fraction
    /// of the interval (see `bench/gossip_sim.rs`: this divides the time
    /// for a flood to be seen everywhere by about three, for a few percent
    /// more bytes).
    /// Owners rounds (`gossip.counts = "owners"`): a quick one every
    /// [`OWNERS_TICK`] (hot and bursting blocks, reports of the hot blocks
    /// that changed level), a full one every `interval`.
    async fn owners_loop(self: Arc<Self>) {
        let Some(hot) = &self.hot else { return };
        let interval = self.config.gossip.interval.0;
        let quick = OWNERS_TICK
            .min(interval / FRESH_PUSHES)
            .max(Duration::from_millis(1));
        let mut tick = tokio::time::interval(quick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_full = Instant::now();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let full = last_full.elapsed() >= interval;
            if full {
                last_full = Instant::now();
            }
            self.owners_round(hot, full);
        }
    }

    async fn push_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.gossip.interval.0 / FRESH_PUSHES);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut n: u32 = 0;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => self.push_round(n % FRESH_PUSHES == 0),
            }
            n = n.wrapping_add(1);
        }
    }

    /// One dissemination round to `fanout` random live peers: every hot
    /// count (`full`), or only the fresh ones.
    fn push_round(self: &Arc<Self>, full: bool) {
        let live = self.live_peers();
        let bytes = {
            let mut state = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
            self.observe_throttle(&mut state, now_ms());
            state.ledger.set_rounds(rounds_for(live.len() + 1));
            if live.is_empty() {
                return;
            }
            let entries = if full {
                state.ledger.take_round(MAX_BATCH_ENTRIES)
            } else {
                state.ledger.take_fresh(MAX_BATCH_ENTRIES)
            };
            // Suspect states that changed go with every round, fresh or
            // full, so that a failed test crosses a hop in a fraction of
            // the interval.
            let suspects = self.throttle.take_suspect_changes(MAX_SUSPECTS);
            // Greylist entries too: a retry may land on a peer a minute later.
            let (grey, pools) = self.throttle.greylist().take_changes(MAX_GREYLIST);
            // And recipient verdicts: one node's probe serves the network.
            let (verdicts, domains) = match &self.verifier {
                Some(v) => v.take_changes(MAX_VERIFY),
                None => Default::default(),
            };
            if entries.is_empty()
                && suspects.is_empty()
                && grey.is_empty()
                && pools.is_empty()
                && verdicts.is_empty()
                && domains.is_empty()
            {
                return;
            }
            let mut batch = state.ledger.encode_batch(&entries, self.epoch_ms);
            batch.suspects = self.suspects_to_wire(&suspects);
            batch.greylist = grey
                .iter()
                .map(|(k, e)| proto::GreylistEntry {
                    key: k.to_vec(),
                    first_ms: e.first_ms,
                    passed_ms: e.passed_ms,
                })
                .collect();
            batch.greylist_pools = pools
                .iter()
                .map(|(k, t)| proto::GreylistPool {
                    key: k.to_vec(),
                    passed_ms: *t,
                })
                .collect();
            let verdict = |(k, e): &(verify::Key, verify::Entry)| proto::VerifyEntry {
                key: k.to_vec(),
                valid: e.valid,
                at_ms: e.at_ms,
            };
            batch.verify = verdicts.iter().map(verdict).collect();
            batch.verify_domains = domains.iter().map(verdict).collect();
            self.seal(Body::Delta(batch))
        };
        let mut targets = live;
        targets.shuffle(&mut rand::rng());
        targets.truncate(self.config.gossip.fanout);
        let bytes = Arc::new(bytes);
        for id in targets {
            let (t, bytes) = (self.transport.clone(), bytes.clone());
            self.tasks.spawn(async move {
                if let Err(e) = t.send_uni(id.gossip, &bytes, "delta").await {
                    debug!(peer = %id.name, reason = %e, "delta not sent");
                }
            });
        }
    }

    fn suspects_to_wire(&self, states: &[(Block, SuspectState)]) -> Vec<proto::SuspectEntry> {
        states
            .iter()
            .map(|(block, st)| {
                wire::suspect_to_wire(block, st, |o| match o {
                    SELF_ORIGIN => Some(self.name.clone()),
                    o => self.throttle.origin_name(o),
                })
            })
            .collect()
    }

    /// Tells a peer that came up (joined, rejoined, restarted) the blocks
    /// that are suspects now: their changes were pushed for a few rounds
    /// only, maybe before it was there. Counts it relearns by anti-entropy.
    ///
    /// Every member sees the same peer come up, so each one tells it with
    /// probability `fanout / live members`: about `fanout` snapshots reach
    /// a joiner whatever the network's size, not one from every member (and
    /// not a scan of the block table at every node per join).
    fn send_suspect_snapshot(self: &Arc<Self>, to: &NodeId) {
        let live = self.members().live_count().max(1);
        let fanout = self.config.gossip.fanout.max(1);
        if live > fanout && rand::random_range(0..live) >= fanout {
            return;
        }
        let states = self.throttle.suspect_snapshot(MAX_SUSPECTS, now_ms());
        if states.is_empty() {
            return;
        }
        let mut batch = {
            let state = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
            state.ledger.encode_batch(&[], self.epoch_ms)
        };
        batch.suspects = self.suspects_to_wire(&states);
        let bytes = self.seal(Body::Delta(batch));
        let (t, addr, name) = (self.transport.clone(), to.gossip, to.name.clone());
        self.tasks.spawn(async move {
            if let Err(e) = t.send_uni(addr, &bytes, "delta").await {
                debug!(peer = %name, reason = %e, "suspect snapshot not sent");
            }
        });
    }

    fn prefix_ok(&self, block: &Block) -> bool {
        match block.0 {
            ipnet::IpNet::V4(n) => n.prefix_len() == self.config.throttle.ipv4_prefix,
            ipnet::IpNet::V6(n) => n.prefix_len() == self.config.throttle.ipv6_prefix,
        }
    }

    /// Merges the suspect states of a batch from `from` into the throttle.
    /// States that taught this node something are forwarded in turn
    /// (the throttle marks them changed). Returns the number merged.
    fn merge_suspects(&self, from: &Peer, batch: &proto::CountBatch) -> usize {
        if batch.suspects.is_empty() {
            return 0;
        }
        if batch.suspects.len() > MAX_SUSPECTS {
            dropped("malformed");
            return 0;
        }
        if !self.is_known_sender(from) {
            dropped("unknown_origin");
            return 0;
        }
        let now = now_ms();
        let bounds = self.throttle.policy().bounds();
        let mut merged = 0;
        for e in &batch.suspects {
            let Some((block, st)) = wire::suspect_from_wire(
                e,
                bounds,
                now.saturating_add(MAX_SUSPECT_LIFE_MS),
                |name| match name == self.name {
                    true => Some(SELF_ORIGIN),
                    false => Some(self.throttle.origin(name)),
                },
            ) else {
                dropped("entry");
                continue;
            };
            if !self.prefix_ok(&block) {
                dropped("prefix");
                continue;
            }
            if self.throttle.merge_suspect(block, &st, now) {
                merged += 1;
            }
        }
        if merged > 0 {
            debug!(peer = %from.name, merged, "suspect states merged");
        }
        merged
    }

    /// Is `from` a member this node knows (vouched for, or live)? Only
    /// members' suspect states and greylist entries are merged.
    fn is_known_sender(&self, from: &Peer) -> bool {
        let members = self.members();
        members.is_vouched_member(&from.name) || members.live().any(|m| m.name == from.name)
    }

    /// Merges the greylist entries and pools of a batch from `from`
    /// (min of first-seen, max of passed). Entries that taught this node
    /// something are forwarded in turn. Returns the number merged.
    fn merge_greylist(&self, from: &Peer, batch: &proto::CountBatch) -> usize {
        if batch.greylist.is_empty() && batch.greylist_pools.is_empty() {
            return 0;
        }
        if batch.greylist.len() > MAX_GREYLIST || batch.greylist_pools.len() > MAX_GREYLIST {
            dropped("malformed");
            return 0;
        }
        if !self.is_known_sender(from) {
            dropped("unknown_origin");
            return 0;
        }
        let g = self.throttle.greylist();
        let now = now_ms();
        let future = now.saturating_add(MAX_GREYLIST_SKEW_MS);
        let mut merged = 0;
        for e in &batch.greylist {
            let Ok(key) = <[u8; 16]>::try_from(e.key.as_slice()) else {
                dropped("entry");
                continue;
            };
            // A first-seen of 0 or in the future, or a pass before the
            // first attempt, is no entry any node writes.
            if e.first_ms == 0
                || e.first_ms > future
                || e.passed_ms > future
                || (e.passed_ms != 0 && e.passed_ms < e.first_ms)
            {
                dropped("entry");
                continue;
            }
            let entry = crate::greylist::Entry {
                first_ms: e.first_ms,
                passed_ms: e.passed_ms,
            };
            merged += usize::from(g.merge_entry(key, entry, now));
        }
        for p in &batch.greylist_pools {
            let Ok(key) = <[u8; 16]>::try_from(p.key.as_slice()) else {
                dropped("entry");
                continue;
            };
            if p.passed_ms > future {
                dropped("entry");
                continue;
            }
            merged += usize::from(g.merge_pool(key, p.passed_ms, now));
        }
        if merged > 0 {
            debug!(peer = %from.name, merged, "greylist entries merged");
        }
        merged
    }

    /// Merges the recipient verdicts and accept-all marks of a batch from
    /// `from` (the newest wins). Those that taught this node something are
    /// forwarded in turn. Returns the number merged.
    fn merge_verdicts(&self, from: &Peer, batch: &proto::CountBatch) -> usize {
        if batch.verify.is_empty() && batch.verify_domains.is_empty() {
            return 0;
        }
        if batch.verify.len() > MAX_VERIFY || batch.verify_domains.len() > MAX_VERIFY {
            dropped("malformed");
            return 0;
        }
        if !self.is_known_sender(from) {
            dropped("unknown_origin");
            return 0;
        }
        let Some(v) = &self.verifier else { return 0 };
        let mut merged = 0;
        let entries = (batch.verify.iter().map(|e| (false, e)))
            .chain(batch.verify_domains.iter().map(|e| (true, e)));
        for (domain, e) in entries {
            let Ok(key) = <verify::Key>::try_from(e.key.as_slice()) else {
                dropped("entry");
                continue;
            };
            let entry = verify::Entry {
                valid: e.valid,
                at_ms: e.at_ms,
            };
            merged += usize::from(v.merge(domain, key, entry));
        }
        if merged > 0 {
            debug!(peer = %from.name, merged, "recipient verdicts merged");
        }
        merged
    }

    /// Merges a batch of counts from `from` into the throttle. Returns the
    /// number of counts merged.
    fn merge_counts(&self, from: &Peer, batch: &proto::CountBatch) -> usize {
        self.merge_suspects(from, batch);
        self.merge_greylist(from, batch);
        self.merge_verdicts(from, batch);
        if self.hot.is_some() {
            // Owners per block: counts come as signed increments, never as
            // a peer's unsigned copy (a node with `gossip.counts = "all"`
            // shares membership and signals with this one, not counts).
            if !batch.entries.is_empty() {
                metrics::counter!("magicmx_gossip_dropped_total", "reason" => "counts_mode")
                    .increment(batch.entries.len() as u64);
            }
            return 0;
        }
        let (updates, invalid) = match decode_batch(batch, self.epoch_ms) {
            Ok(x) => x,
            Err(e) => {
                dropped(e.as_str());
                debug!(peer = %from.name, reason = e.as_str(), "gossip counts dropped");
                return 0;
            }
        };
        if invalid > 0 {
            metrics::counter!("magicmx_gossip_dropped_total", "reason" => "entry")
                .increment(invalid as u64);
        }
        let relearn = Instant::now() < self.relearn_until;
        // One look at the members for the batch's few origin names (not a
        // copy of every member's name per message).
        let members = self.members();
        let from_member = members.is_vouched_member(&from.name);
        let origins: Vec<Option<Origin>> = batch
            .origins
            .iter()
            .map(|name| {
                if *name == self.name {
                    // Our own counts from before a restart, only from a
                    // member (never from a peer that did not join).
                    (relearn && from_member).then_some(SELF_ORIGIN)
                } else if *name == from.name || members.is_vouched_member(name) {
                    Some(self.throttle.origin(name))
                } else {
                    dropped("unknown_origin");
                    debug!(peer = %from.name, origin = %name, reason = "unknown origin", "gossip counts dropped");
                    None
                }
            })
            .collect();
        drop(members);
        let now = now_ms();
        let mut merged = 0;
        for u in updates {
            let Some(origin) = origins[u.origin] else {
                continue;
            };
            if !self.prefix_ok(&u.block) {
                dropped("prefix");
                continue;
            }
            // Relearned own counts come second-hand: capped like a peer's.
            let counts = match origin {
                SELF_ORIGIN => u.counts.min(self.throttle.peer_cap()),
                _ => u.counts,
            };
            self.throttle.merge(origin, u.block, u.epoch, counts, now);
            merged += 1;
        }
        merged
    }

    async fn anti_entropy_loop(self: Arc<Self>, mut now_rx: mpsc::Receiver<SocketAddr>) {
        let mut tick = tokio::time::interval(self.config.gossip.anti_entropy_interval.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let addr = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => match self.live_peers().choose(&mut rand::rng()) {
                    Some(p) => p.gossip,
                    None => continue,
                },
                a = now_rx.recv() => match a { Some(a) => a, None => return },
            };
            let me = self.clone();
            self.tasks.spawn(async move {
                match tokio::time::timeout(EXCHANGE_TIMEOUT, me.exchange(addr)).await {
                    Ok(Ok((sent, received))) => {
                        debug!(peer = %addr, sent, received, "anti-entropy done")
                    }
                    Ok(Err(e)) => debug!(peer = %addr, reason = %e, "anti-entropy failed"),
                    Err(_) => debug!(peer = %addr, reason = "timeout", "anti-entropy failed"),
                }
            });
        }
    }

    async fn read_body(
        &self,
        peer: &Peer,
        recv: &mut quinn::RecvStream,
    ) -> Result<Body, SendError> {
        let bytes = read_frame(recv).await?;
        self.open(peer, &bytes)
            .ok_or_else(|| SendError::Stream("refused message".into()))
    }

    /// Anti-entropy as the initiator: summary, epoch digest, repair, reply.
    /// Returns the numbers of counts sent and received.
    async fn exchange(self: &Arc<Self>, addr: SocketAddr) -> Result<(usize, usize), SendError> {
        let (peer, mut send, mut recv) = self.transport.open_bi(addr).await?;
        let now = now_ms();
        let summary = {
            let mut state = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
            self.observe_throttle(&mut state, now);
            state.ledger.summary(
                self.first_epoch(now),
                self.throttle.epoch_of(now) + 1,
                self.epoch_ms,
            )
        };
        write_frame(&mut send, &self.seal(Body::Summary(summary)), "summary").await?;
        let Body::EpochDigest(digest) = self.read_body(&peer, &mut recv).await? else {
            return Err(SendError::Stream("expected an epoch digest".into()));
        };
        let repair = {
            let state = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
            state.ledger.answer_epoch_digest(&digest, self.epoch_ms)
        }
        .map_err(|e| SendError::Stream(e.as_str().into()))?;
        let sent = repair.counts.as_ref().map_or(0, |c| c.entries.len());
        let want = repair.want.len();
        write_frame(&mut send, &self.seal(Body::Repair(repair)), "repair").await?;
        let _ = send.finish();
        if want == 0 {
            return Ok((sent, 0));
        }
        let Body::RepairReply(reply) = self.read_body(&peer, &mut recv).await? else {
            return Err(SendError::Stream("expected a repair reply".into()));
        };
        let received = self.merge_counts(&peer, &reply);
        Ok((sent, received))
    }

    /// Anti-entropy as the peer.
    async fn answer_exchange(
        self: &Arc<Self>,
        peer: Peer,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), SendError> {
        let Body::Summary(summary) = self.read_body(&peer, &mut recv).await? else {
            return Err(SendError::Stream("expected a summary".into()));
        };
        let digest = {
            let mut state = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
            self.observe_throttle(&mut state, now_ms());
            state.ledger.answer_summary(&summary, self.epoch_ms)
        };
        let digest = digest.map_err(|e| {
            dropped(e.as_str());
            SendError::Stream(e.as_str().into())
        })?;
        write_frame(
            &mut send,
            &self.seal(Body::EpochDigest(digest)),
            "epoch_digest",
        )
        .await?;
        let Body::Repair(repair) = self.read_body(&peer, &mut recv).await? else {
            return Err(SendError::Stream("expected a repair".into()));
        };
        if let Some(counts) = &repair.counts {
            self.merge_counts(&peer, counts);
        }
        if repair.want.is_empty() {
            return Ok(());
        }
        let reply = {
            let state = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
            state.ledger.answer_repair(&repair, self.epoch_ms)
        }
        .map_err(|e| SendError::Stream(e.as_str().into()))?;
        write_frame(
            &mut send,
            &self.seal(Body::RepairReply(reply)),
            "repair_reply",
        )
        .await?;
        let _ = send.finish();
        Ok(())
    }
}
