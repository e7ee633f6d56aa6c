//! Per-block throttling: who may connect and send, and why not.
//!
//! A source is keyed by its network block (IPv4 /24, IPv6 /48 by default;
//! IPv4-mapped IPv6 counts as IPv4). Each block has counters of connections,
//! messages and recipients per *origin* (the node that saw them) per aligned
//! *epoch* (wall-clock time divided by the epoch length, so that every node
//! numbers epochs alike). This node is origin 0; peers' counts arrive through
//! [`Throttle::merge`], which keeps the field-wise maximum per
//! (origin, block, epoch): merging is idempotent, commutative and associative,
//! so duplicated, reordered or re-sent counts are harmless. The network-wide
//! count of a block is the sum over origins of the epochs inside the window.
//!
//! Decisions are made at connect, RCPT and end of DATA. A block that passes a
//! limit goes to the penalty box for `penalty` (doubling for repeat offenders,
//! up to `max_penalty`); its first `polite_refusals` connections then get a
//! full `421`, later ones are closed without a banner. Trusted networks are
//! never counted and never refused.
//!
//! The map is bounded by `max_tracked_blocks`: idle blocks (nothing in the
//! window, no penalty) are swept every epoch. Blocks this node sees itself
//! come first: a block created by a peer's counts (and not yet seen here) is
//! second-hand, and each peer origin may create at most `peer_block_share` of
//! the table. When the table is full, a new local block evicts the oldest
//! peer-created block that is under every limit and not penalised, so a peer
//! flooding the table with blocks can never make this node's own blocks
//! uncounted. Blocks over a limit or in the penalty box are never evicted, so
//! a full table still refuses them (fail closed). Only when local blocks and
//! blocks over a limit fill the table is a new block let through uncounted
//! (fail open, so legitimate mail is never refused because of memory
//! pressure) and `magicmx_throttle_untracked_total` incremented.
//!
//! Each block also carries its suspicion state ([`SuspectState`]: DNSBL
//! listings, failed protocol tests, invalid recipients), added to by the
//! sessions ([`Throttle::add_signals`], [`Throttle::on_invalid_recipient`])
//! and merged from peers ([`Throttle::merge_suspect`]). A suspect's limits
//! are the normal ones times `[suspect] limit_factor`: every decision below
//! uses the block's effective limits. Blocks whose state changed are marked
//! for gossip ([`Throttle::take_suspect_changes`]); a block with live
//! signals is not swept.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use dashmap::DashMap;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

use crate::config::{ThrottleConfig, TrustConfig};
use crate::suspect::{Kind, Policy, Signal, SuspectState, Verdict};

/// Gossip rounds a changed suspect state is pushed for (each receiver that
/// learns something new forwards it in turn).
pub const SUSPECT_ROUNDS: u8 = 3;

/// A source network block: the key of every count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Block(pub IpNet);

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Block {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The block of `ip` for the given prefix lengths.
pub fn block_of(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> Block {
    let ip = crate::addr::canonical_ip(ip);
    let net = match ip {
        IpAddr::V4(a) => IpNet::V4(
            Ipv4Net::new(a, v4_prefix.min(32))
                .expect("prefix <= 32")
                .trunc(),
        ),
        IpAddr::V6(a) => IpNet::V6(
            Ipv6Net::new(a, v6_prefix.min(128))
                .expect("prefix <= 128")
                .trunc(),
        ),
    };
    Block(net)
}

/// Counts of one (origin, block, epoch), or sums of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub connections: u32,
    pub messages: u32,
    pub recipients: u32,
}

impl Counts {
    /// Field-wise maximum: the merge of two observations of the same
    /// (origin, block, epoch). Each field only grows on its origin, so the
    /// maximum is the latest.
    pub fn max(self, o: Counts) -> Counts {
        Counts {
            connections: self.connections.max(o.connections),
            messages: self.messages.max(o.messages),
            recipients: self.recipients.max(o.recipients),
        }
    }

    pub fn saturating_add(self, o: Counts) -> Counts {
        Counts {
            connections: self.connections.saturating_add(o.connections),
            messages: self.messages.saturating_add(o.messages),
            recipients: self.recipients.saturating_add(o.recipients),
        }
    }

    pub fn min(self, o: Counts) -> Counts {
        Counts {
            connections: self.connections.min(o.connections),
            messages: self.messages.min(o.messages),
            recipients: self.recipients.min(o.recipients),
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == Counts::default()
    }
}

/// Index of an origin node; 0 is this node.
pub type Origin = u16;
pub const SELF_ORIGIN: Origin = 0;
/// Shared by every origin name past the table's capacity.
pub const OVERFLOW_ORIGIN: Origin = Origin::MAX;

/// One origin's counts for one epoch of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    origin: Origin,
    epoch: u64,
    counts: Counts,
}

#[derive(Debug, Clone, Default)]
struct Penalty {
    /// Unix ms; the block is refused until then.
    until: u64,
    /// Times the block went over a limit (drives the doubling).
    offenses: u32,
    /// Refusals during the current penalty (drives the polite count).
    refusals: u32,
    reason: Option<Reason>,
}

#[derive(Debug, Clone, Default)]
struct BlockState {
    slots: Vec<Slot>,
    penalty: Penalty,
    /// The peer whose counts created this block, while this node has not
    /// seen the block itself (None: a local block).
    creator: Option<Origin>,
    suspect: SuspectState,
    /// The network-wide window of a hot block, as its owners report it
    /// (`gossip.counts = "owners"`; see [`Throttle::set_hot`]).
    hot: Option<Hot>,
}

/// A hot block's network-wide window: the median of its owners' reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hot {
    counts: Counts,
    origins: u32,
    /// Unix ms; not used from then on.
    until: u64,
}

/// Own changes kept for gossip between two takes (`Throttle::take_own_changes`);
/// past this, the next take scans the table instead.
const MAX_OWN_CHANGES: usize = 1 << 20;

/// This node's own (block, epoch) counts that changed since gossip last took
/// them.
#[derive(Debug, Default)]
struct OwnChanges {
    changed: std::collections::HashSet<(Block, u64)>,
    overflow: bool,
}

/// Blocks created by peers' counts: how many per origin, and in creation
/// order, the candidates a new local block may evict when the table is full.
#[derive(Debug, Default)]
struct PeerBlocks {
    per_origin: HashMap<Origin, usize>,
    /// (block, creator); entries whose block was swept or became local are
    /// stale and skipped.
    order: VecDeque<(Block, Origin)>,
}

impl PeerBlocks {
    fn release(&mut self, origin: Origin) {
        if let Some(n) = self.per_origin.get_mut(&origin) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_origin.remove(&origin);
            }
        }
    }
}

/// Most stale or protected entries a new local block looks at to find a
/// peer block to evict (keeps the cost of one insertion bounded).
const EVICTION_SCAN: usize = 64;

/// Why a decision refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    TooManyConnections,
    TooManyMessages,
    TooManyRecipients,
    PenaltyBox,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TooManyConnections => "too_many_connections",
            Reason::TooManyMessages => "too_many_messages",
            Reason::TooManyRecipients => "too_many_recipients",
            Reason::PenaltyBox => "penalty_box",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A throttle decision: what and why, never the words of a reply (the SMTP
/// side writes those, `smtp::throttle_reply`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Accept,
    /// Refuse: the limit the block passed (or [`Reason::PenaltyBox`]), and,
    /// when it is refused at connect for sitting in the penalty box, what put
    /// it there and how long is left.
    Refuse {
        reason: Reason,
        penalty: Option<Penalised>,
    },
    /// Close at once, without a banner: the block has had its polite refusals.
    Drop {
        reason: Reason,
    },
}

/// A block in the penalty box, as a refusal says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Penalised {
    /// The limit that put it there (none if unknown).
    pub cause: Option<Reason>,
    /// Time left, rounded up to whole seconds.
    pub left: std::time::Duration,
}

/// What `/status` and `magicmx explain` show about a block.
#[derive(Debug, Clone, Serialize)]
pub struct BlockStatus {
    pub block: Block,
    /// Network-wide, each peer capped at its share.
    pub counts: Counts,
    pub limits: Counts,
    /// Origins (nodes, this one included) that counted the block in the
    /// window; with fewer than `gossip.min_origins_to_refuse`, only this
    /// node's own counts refuse.
    pub origins: u32,
    pub over: Option<Reason>,
    /// Seconds left in the penalty box (0 = not in it).
    pub penalty_left_secs: u64,
    pub offenses: u32,
    /// Score, level and live reasons of the block's suspicion state.
    pub suspect: Verdict,
}

pub fn now_ms() -> u64 {
    crate::clock::system_ms()
}

/// The throttle of one node.
pub struct Throttle {
    cfg: ThrottleConfig,
    trust: Vec<IpNet>,
    blocks: DashMap<Block, BlockState>,
    /// Origin names; index = [`Origin`]. Index 0 is this node.
    origins: RwLock<Vec<String>>,
    epoch_ms: u64,
    window_epochs: u64,
    /// Most one peer origin may add to a block's count (see `with_peer_share`).
    peer_cap: Counts,
    /// Distinct origins a block's counts must come from before peers'
    /// counts may refuse it (see `with_min_origins`).
    min_origins: u32,
    /// Most blocks one peer origin may create (`peer_block_share` of the table).
    peer_blocks_max: usize,
    peer_blocks: Mutex<PeerBlocks>,
    policy: Policy,
    /// Blocks whose suspect state changed, with the gossip rounds left.
    suspect_changed: Mutex<HashMap<Block, u8>>,
    /// `[greylist]`, keyed by the block as its pool (gossiped with the counts).
    greylist: Arc<crate::greylist::Greylist>,
    /// Own count changes, for gossip to its block owners (off unless
    /// [`Throttle::with_change_feed`]).
    own_changes: Mutex<OwnChanges>,
    feed: std::sync::atomic::AtomicBool,
}

impl Throttle {
    pub fn new(cfg: &ThrottleConfig, trust: &TrustConfig, node_name: &str) -> Throttle {
        let epoch_ms = (cfg.epoch.0.as_millis() as u64).max(1);
        let window_epochs = ((cfg.window.0.as_millis() as u64) / epoch_ms).max(1);
        Throttle {
            cfg: cfg.clone(),
            trust: trust.networks.clone(),
            blocks: DashMap::new(),
            origins: RwLock::new(vec![node_name.to_string()]),
            epoch_ms,
            window_epochs,
            peer_cap: Counts {
                connections: u32::MAX,
                messages: u32::MAX,
                recipients: u32::MAX,
            },
            min_origins: 1,
            peer_blocks_max: ((cfg.max_tracked_blocks as f64 * cfg.peer_block_share).floor()
                as usize)
                .max(1),
            peer_blocks: Mutex::new(PeerBlocks::default()),
            policy: Policy::new(
                &crate::config::SuspectConfig::default(),
                epoch_ms,
                window_epochs,
            ),
            suspect_changed: Mutex::new(HashMap::new()),
            greylist: Arc::new(crate::greylist::Greylist::new(
                &crate::config::GreylistConfig::default(),
            )),
            own_changes: Mutex::new(OwnChanges::default()),
            feed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Records which of this node's own (block, epoch) counts change, for
    /// [`Throttle::take_own_changes`] (gossip to block owners).
    pub fn with_change_feed(self) -> Throttle {
        self.feed.store(true, std::sync::atomic::Ordering::Relaxed);
        self
    }

    fn lock_changes(&self) -> std::sync::MutexGuard<'_, OwnChanges> {
        self.own_changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Greylists with `greylist` (`[greylist]`).
    pub fn with_greylist(mut self, greylist: crate::greylist::Greylist) -> Throttle {
        self.greylist = Arc::new(greylist);
        self
    }

    pub fn greylist(&self) -> &crate::greylist::Greylist {
        &self.greylist
    }

    /// Uses `policy` (`[suspect]`) for the blocks' suspicion states.
    pub fn with_suspect(mut self, policy: Policy) -> Throttle {
        self.policy = policy;
        self
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Caps each peer origin's contribution to a block's count at `share`
    /// of the limits, so that one peer cannot throttle a block by itself.
    /// This node's own counts are never capped.
    pub fn with_peer_share(mut self, share: f64) -> Throttle {
        let cap = |limit: u32| ((limit as f64 * share).floor() as u32).max(1);
        self.peer_cap = Counts {
            connections: cap(self.cfg.max_connections),
            messages: cap(self.cfg.max_messages),
            recipients: cap(self.cfg.max_recipients),
        };
        self
    }

    /// Counts that are not this node's own refuse a block only when at
    /// least `n` distinct origins (this node included) contributed to its
    /// window: with each peer capped at its share, `n` colluding or lying
    /// certified peers minus one cannot refuse a block without real traffic
    /// seen elsewhere. This node's own counts always refuse.
    pub fn with_min_origins(mut self, n: u32) -> Throttle {
        self.min_origins = n.max(1);
        self
    }

    pub fn limits(&self) -> Counts {
        Counts {
            connections: self.cfg.max_connections,
            messages: self.cfg.max_messages,
            recipients: self.cfg.max_recipients,
        }
    }

    /// The most one peer origin adds to a block's count.
    pub fn peer_cap(&self) -> Counts {
        self.peer_cap
    }

    pub fn block_of(&self, ip: IpAddr) -> Block {
        block_of(ip, self.cfg.ipv4_prefix, self.cfg.ipv6_prefix)
    }

    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = crate::addr::canonical_ip(ip);
        self.trust.iter().any(|n| n.contains(&ip))
    }

    pub fn epoch_of(&self, ms: u64) -> u64 {
        ms / self.epoch_ms
    }

    /// Epochs `e` with `first <= e <= current` are inside the window.
    fn window_start(&self, now_ms: u64) -> u64 {
        self.epoch_of(now_ms).saturating_sub(self.window_epochs - 1)
    }

    pub fn tracked(&self) -> usize {
        self.blocks.len()
    }

    /// The index of an origin, registering it if new.
    pub fn origin(&self, name: &str) -> Origin {
        if let Some(i) = self
            .origins
            .read()
            .expect("origins")
            .iter()
            .position(|n| n == name)
        {
            return i as Origin;
        }
        let mut w = self.origins.write().expect("origins");
        if let Some(i) = w.iter().position(|n| n == name) {
            return i as Origin;
        }
        if w.len() >= OVERFLOW_ORIGIN as usize {
            // Never wrap into another origin (least of all this node's own):
            // every further name shares one capped origin.
            return OVERFLOW_ORIGIN;
        }
        w.push(name.to_string());
        (w.len() - 1) as Origin
    }

    pub fn origin_name(&self, origin: Origin) -> Option<String> {
        self.origins
            .read()
            .expect("origins")
            .get(origin as usize)
            .cloned()
    }

    /// The counts of a block that decide at `now_ms`: network-wide (each
    /// peer capped) when enough origins contributed, else this node's own.
    fn totals_of(&self, state: &BlockState, now_ms: u64) -> Counts {
        let s = self.sums_of(state, now_ms);
        match s.origins >= self.min_origins {
            true => s.all,
            false => s.own,
        }
    }

    fn sums_of(&self, state: &BlockState, now_ms: u64) -> Sums {
        let mut s = capped_window_sum(
            &state.slots,
            self.window_start(now_ms),
            self.epoch_of(now_ms),
            self.peer_cap,
        );
        // A hot block's owners report the network-wide window (this node's
        // own counts included, each origin capped at the peer share).
        if let Some(h) = state.hot.filter(|h| h.until > now_ms) {
            s.all = s.all.max(h.counts);
            s.origins = s.origins.max(h.origins);
        }
        s
    }

    /// The limits of `block` now (lower for a suspect).
    pub fn limits_for(&self, block: &Block, now_ms: u64) -> Counts {
        match self.blocks.get(block) {
            Some(s) => self.limits_of(&s, now_ms),
            None => self.limits(),
        }
    }

    /// The limits of a block: the normal ones, lower for a suspect.
    fn limits_of(&self, state: &BlockState, now_ms: u64) -> Counts {
        if state.suspect.is_empty() {
            return self.limits();
        }
        let v = self.policy.verdict(&state.suspect, now_ms);
        let [connections, messages, recipients] = v.effective_limits([
            self.cfg.max_connections,
            self.cfg.max_messages,
            self.cfg.max_recipients,
        ]);
        Counts {
            connections,
            messages,
            recipients,
        }
    }

    fn over(&self, c: Counts, l: Counts) -> Option<Reason> {
        if c.connections > l.connections {
            Some(Reason::TooManyConnections)
        } else if c.messages > l.messages {
            Some(Reason::TooManyMessages)
        } else if c.recipients > l.recipients {
            Some(Reason::TooManyRecipients)
        } else {
            None
        }
    }

    /// Puts a block in the penalty box, doubling for repeat offenders.
    fn penalise(&self, state: &mut BlockState, reason: Reason, now_ms: u64) {
        let p = &mut state.penalty;
        p.offenses = p.offenses.saturating_add(1);
        let base = self.cfg.penalty.0.as_millis() as u64;
        let max = self.cfg.max_penalty.0.as_millis() as u64;
        let len = base
            .saturating_mul(1u64 << (p.offenses - 1).min(20))
            .min(max);
        p.until = now_ms.saturating_add(len);
        p.refusals = 0;
        p.reason = Some(reason);
        metrics::counter!("magicmx_throttle_penalties_total", "reason" => reason.as_str())
            .increment(1);
    }

    /// Applies `f` to a local block's state, creating it if there is room
    /// (evicting a peer-created block under its limits if need be). Returns
    /// None when the table is full of blocks that may not be evicted and the
    /// block is new (fail open).
    fn with_block<R>(
        &self,
        block: Block,
        now_ms: u64,
        f: impl FnOnce(&mut BlockState) -> R,
    ) -> Option<R> {
        // Lock order: `peer_blocks` before a map shard, never the reverse, so
        // the share is released after the shard's guard is dropped.
        let (r, creator) = match self.blocks.get_mut(&block) {
            Some(mut s) => {
                // Seen here now: no longer counted against the peer's share.
                let creator = s.creator.take();
                (f(&mut s), creator)
            }
            None => {
                if self.blocks.len() >= self.cfg.max_tracked_blocks
                    && !self.evict_peer_block(now_ms)
                {
                    metrics::counter!("magicmx_throttle_untracked_total", "source" => "local")
                        .increment(1);
                    return None;
                }
                let mut s = self.blocks.entry(block).or_default();
                // A peer may have created it in the meantime.
                let creator = s.creator.take();
                (f(&mut s), creator)
            }
        };
        if let Some(origin) = creator {
            self.peer_blocks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .release(origin);
        }
        Some(r)
    }

    /// Forgets the oldest peer-created block that is under every limit and
    /// not penalised. False if none was found within [`EVICTION_SCAN`].
    fn evict_peer_block(&self, now: u64) -> bool {
        let mut peers = self.peer_blocks.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..EVICTION_SCAN {
            let Some((block, origin)) = peers.order.pop_front() else {
                return false;
            };
            let mut protected = false;
            let removed = self.blocks.remove_if(&block, |_, s| {
                if s.creator != Some(origin) {
                    return false;
                }
                // Over a limit or penalised: keep it, so it is still refused.
                protected = s.penalty.until > now
                    || self
                        .over(self.totals_of(s, now), self.limits_of(s, now))
                        .is_some();
                !protected
            });
            if removed.is_some() {
                peers.release(origin);
                metrics::counter!("magicmx_throttle_peer_blocks_evicted_total").increment(1);
                return true;
            }
            if protected {
                peers.order.push_back((block, origin));
            }
        }
        false
    }

    fn add_own(&self, block: Block, state: &mut BlockState, now_ms: u64, add: Counts) {
        let epoch = self.epoch_of(now_ms);
        if self.feed.load(std::sync::atomic::Ordering::Relaxed) {
            let mut ch = self.lock_changes();
            if !ch.overflow {
                if ch.changed.len() < MAX_OWN_CHANGES {
                    ch.changed.insert((block, epoch));
                } else {
                    ch.overflow = true;
                }
            }
        }
        match state
            .slots
            .iter_mut()
            .find(|s| s.origin == SELF_ORIGIN && s.epoch == epoch)
        {
            Some(s) => s.counts = s.counts.saturating_add(add),
            None => {
                // Drop epochs that left the window while we are here.
                let first = self.window_start(now_ms);
                state.slots.retain(|s| s.epoch >= first);
                state.slots.push(Slot {
                    origin: SELF_ORIGIN,
                    epoch,
                    counts: add,
                });
            }
        }
    }

    /// A refusal for a block in the penalty box: polite first, then silent.
    fn refuse_penalised(&self, state: &mut BlockState, now_ms: u64) -> Decision {
        let p = &mut state.penalty;
        p.refusals = p.refusals.saturating_add(1);
        let reason = Reason::PenaltyBox;
        if p.refusals > self.cfg.polite_refusals {
            return Decision::Drop { reason };
        }
        let left = p.until.saturating_sub(now_ms).div_ceil(1000);
        Decision::Refuse {
            reason,
            penalty: Some(Penalised {
                cause: p.reason,
                left: std::time::Duration::from_secs(left),
            }),
        }
    }

    /// At connect: count the connection, refuse a block over its limit or in
    /// the penalty box.
    pub fn on_connect(&self, ip: IpAddr, now_ms: u64) -> Decision {
        if self.is_trusted(ip) {
            return Decision::Accept;
        }
        let block = self.block_of(ip);
        let decision = self.with_block(block, now_ms, |state| {
            if state.penalty.until > now_ms {
                return self.refuse_penalised(state, now_ms);
            }
            self.add_own(
                block,
                state,
                now_ms,
                Counts {
                    connections: 1,
                    ..Counts::default()
                },
            );
            let totals = self.totals_of(state, now_ms);
            match self.over(totals, self.limits_of(state, now_ms)) {
                None => Decision::Accept,
                Some(reason) => {
                    self.penalise(state, reason, now_ms);
                    self.refuse_penalised(state, now_ms);
                    Decision::Refuse {
                        reason,
                        penalty: None,
                    }
                }
            }
        });
        decision.unwrap_or(Decision::Accept)
    }

    /// At RCPT: a recipient that would pass the limit is refused with `450`.
    pub fn on_rcpt(&self, ip: IpAddr, now_ms: u64) -> Decision {
        self.count_one(ip, now_ms, Reason::TooManyRecipients, |c| &mut c.recipients)
    }

    /// At the end of DATA: a message that would pass the limit is refused with `450`.
    pub fn on_message(&self, ip: IpAddr, now_ms: u64) -> Decision {
        self.count_one(ip, now_ms, Reason::TooManyMessages, |c| &mut c.messages)
    }

    fn count_one(
        &self,
        ip: IpAddr,
        now_ms: u64,
        reason: Reason,
        field: fn(&mut Counts) -> &mut u32,
    ) -> Decision {
        if self.is_trusted(ip) {
            return Decision::Accept;
        }
        let block = self.block_of(ip);
        let decision = self.with_block(block, now_ms, |state| {
            let mut totals = self.totals_of(state, now_ms);
            let mut limits = self.limits_of(state, now_ms);
            let (have, limit) = (*field(&mut totals), *field(&mut limits));
            if state.penalty.until > now_ms || have >= limit {
                if state.penalty.until <= now_ms {
                    self.penalise(state, reason, now_ms);
                }
                let reason = if have >= limit {
                    reason
                } else {
                    Reason::PenaltyBox
                };
                return Decision::Refuse {
                    reason,
                    penalty: None,
                };
            }
            let mut add = Counts::default();
            *field(&mut add) = 1;
            self.add_own(block, state, now_ms, add);
            Decision::Accept
        });
        decision.unwrap_or(Decision::Accept)
    }

    /// Merges an origin's counts for one (block, epoch): field-wise maximum.
    /// Epochs outside the window (or too far in the future) are ignored.
    pub fn merge(&self, origin: Origin, block: Block, epoch: u64, counts: Counts, now_ms: u64) {
        let current = self.epoch_of(now_ms);
        if epoch < self.window_start(now_ms) || epoch > current + 1 {
            return;
        }
        let update = |state: &mut BlockState| match state
            .slots
            .iter_mut()
            .find(|s| s.origin == origin && s.epoch == epoch)
        {
            Some(s) => s.counts = s.counts.max(counts),
            None => state.slots.push(Slot {
                origin,
                epoch,
                counts,
            }),
        };
        if let Some(mut s) = self.blocks.get_mut(&block) {
            update(&mut s);
            return;
        }
        // A new block from a peer: within that peer's share of the table, and
        // never by evicting anything (local blocks evict peers', not the
        // other way round).
        let mut peers = self.peer_blocks.lock().unwrap_or_else(|e| e.into_inner());
        let mine = peers.per_origin.get(&origin).copied().unwrap_or(0);
        if mine >= self.peer_blocks_max || self.blocks.len() >= self.cfg.max_tracked_blocks {
            metrics::counter!("magicmx_throttle_untracked_total", "source" => "peer").increment(1);
            return;
        }
        let mut s = self.blocks.entry(block).or_default();
        if s.slots.is_empty() && s.creator.is_none() && s.penalty.until == 0 {
            s.creator = Some(origin);
            *peers.per_origin.entry(origin).or_default() += 1;
            peers.order.push_back((block, origin));
        }
        update(&mut s);
    }

    /// True (with the reason) if the block of `ip` is over a limit
    /// network-wide or in the penalty box: held mail is quarantined then.
    pub fn over_limit(&self, ip: IpAddr, now_ms: u64) -> Option<Reason> {
        if self.is_trusted(ip) {
            return None;
        }
        let state = self.blocks.get(&self.block_of(ip))?;
        if state.penalty.until > now_ms {
            return Some(state.penalty.reason.unwrap_or(Reason::PenaltyBox));
        }
        self.over(
            self.totals_of(&state, now_ms),
            self.limits_of(&state, now_ms),
        )
    }

    pub fn status(&self, block: Block, now_ms: u64) -> BlockStatus {
        let (sums, deciding, limits, penalty, suspect) = match self.blocks.get(&block) {
            Some(s) => (
                self.sums_of(&s, now_ms),
                self.totals_of(&s, now_ms),
                self.limits_of(&s, now_ms),
                s.penalty.clone(),
                self.policy.verdict(&s.suspect, now_ms),
            ),
            None => (
                Sums::default(),
                Counts::default(),
                self.limits(),
                Penalty::default(),
                self.policy.verdict(&SuspectState::new(), now_ms),
            ),
        };
        BlockStatus {
            block,
            counts: sums.all,
            limits,
            origins: sums.origins,
            over: self.over(deciding, limits),
            penalty_left_secs: penalty.until.saturating_sub(now_ms).div_ceil(1000),
            offenses: penalty.offenses,
            suspect,
        }
    }

    /// The verdict on the block of `ip` (clean for trusted networks and
    /// untracked blocks).
    pub fn suspect_verdict(&self, ip: IpAddr, now_ms: u64) -> Verdict {
        self.suspect_verdict_with(ip, &[], now_ms)
    }

    /// The verdict on the block of `ip` with `extra` signals of this
    /// connection alone (an allowlisting of one address, which must not
    /// allowlist its neighbours), not stored.
    pub fn suspect_verdict_with(
        &self,
        ip: IpAddr,
        extra: &[(Kind, Signal)],
        now_ms: u64,
    ) -> Verdict {
        let mut st = match self.is_trusted(ip) {
            true => SuspectState::new(),
            false => self
                .blocks
                .get(&self.block_of(ip))
                .map(|s| s.suspect.clone())
                .unwrap_or_default(),
        };
        for (k, s) in extra {
            st.add(k.clone(), s.clone(), self.policy.bounds());
        }
        self.policy.verdict(&st, now_ms)
    }

    /// Adds signals seen by this node to the block of `ip`; returns the
    /// block's verdict afterwards. Trusted networks get none.
    pub fn add_signals(&self, ip: IpAddr, signals: Vec<(Kind, Signal)>, now_ms: u64) -> Verdict {
        if self.is_trusted(ip) || signals.is_empty() {
            return self.suspect_verdict(ip, now_ms);
        }
        let block = self.block_of(ip);
        let bounds = self.policy.bounds();
        let v = self.with_block(block, now_ms, |state| {
            let before = state.suspect.clone();
            for (k, s) in signals {
                state.suspect.add(k, s, bounds);
            }
            (
                state.suspect != before,
                self.policy.verdict(&state.suspect, now_ms),
            )
        });
        match v {
            Some((changed, verdict)) => {
                if changed {
                    self.mark_suspect_changed(block);
                }
                verdict
            }
            None => self.suspect_verdict(ip, now_ms),
        }
    }

    /// Counts an invalid recipient (refused by the recipient check) of the
    /// block of `ip`, seen by this node; a trap address adds its signal.
    pub fn on_invalid_recipient(&self, ip: IpAddr, rcpt: &str, now_ms: u64) -> Verdict {
        if self.is_trusted(ip) {
            return self.suspect_verdict(ip, now_ms);
        }
        let block = self.block_of(ip);
        let v = self.with_block(block, now_ms, |state| {
            self.policy
                .on_invalid_recipient(&mut state.suspect, SELF_ORIGIN, rcpt, now_ms)
        });
        match v {
            Some(verdict) => {
                self.mark_suspect_changed(block);
                verdict
            }
            None => self.suspect_verdict(ip, now_ms),
        }
    }

    /// Merges a peer's suspect state of `block` (idempotent, commutative).
    /// Returns true if this node learnt something (then it forwards it).
    pub fn merge_suspect(&self, block: Block, other: &SuspectState, now_ms: u64) -> bool {
        let _ = now_ms;
        if other.is_empty() {
            return false;
        }
        let room = self.cfg.max_tracked_blocks - self.cfg.max_tracked_blocks / 10;
        let bounds = self.policy.bounds();
        let merge = |state: &mut BlockState| {
            let before = state.suspect.clone();
            state.suspect.merge(other, bounds);
            state.suspect != before
        };
        // A peer's news never evicts anything, and creates a block only
        // while the table has room for this node's own (like its counts).
        let changed = match self.blocks.get_mut(&block) {
            Some(mut s) => merge(&mut s),
            None if self.blocks.len() < room => merge(&mut self.blocks.entry(block).or_default()),
            None => {
                metrics::counter!("magicmx_throttle_untracked_total", "source" => "peer")
                    .increment(1);
                false
            }
        };
        if changed {
            self.mark_suspect_changed(block);
        }
        changed
    }

    fn mark_suspect_changed(&self, block: Block) {
        let mut m = self
            .suspect_changed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Bounded like the table: past it, the oldest news waits for the next change.
        if m.len() < self.cfg.max_tracked_blocks || m.contains_key(&block) {
            m.insert(block, SUSPECT_ROUNDS);
        }
    }

    /// Up to `max` blocks whose suspect state changed and has gossip rounds
    /// left, with their states; each call uses one round of each.
    pub fn take_suspect_changes(&self, max: usize) -> Vec<(Block, SuspectState)> {
        let keys: Vec<Block> = {
            let mut m = self
                .suspect_changed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let keys: Vec<Block> = m.keys().take(max).copied().collect();
            for k in &keys {
                if let Some(r) = m.get_mut(k) {
                    *r = r.saturating_sub(1);
                    if *r == 0 {
                        m.remove(k);
                    }
                }
            }
            keys
        };
        keys.into_iter()
            .filter_map(|b| {
                let s = self.blocks.get(&b)?;
                (!s.suspect.is_empty()).then(|| (b, s.suspect.clone()))
            })
            .collect()
    }

    /// Up to `max` blocks with a live positive suspect score and their
    /// states, highest score first: what a peer that just came up is told
    /// (the changes were pushed for a few rounds only, before it was there).
    pub fn suspect_snapshot(&self, max: usize, now_ms: u64) -> Vec<(Block, SuspectState)> {
        let mut all: Vec<(i32, Block, SuspectState)> = self
            .blocks
            .iter()
            .filter(|e| !e.suspect.is_empty())
            .map(|e| {
                let score = self.policy.verdict(&e.suspect, now_ms).score;
                (score, *e.key(), e.suspect.clone())
            })
            .filter(|(score, _, _)| *score > 0)
            .collect();
        all.sort_by_key(|(score, block, _)| (std::cmp::Reverse(*score), *block));
        all.truncate(max);
        all.into_iter().map(|(_, b, s)| (b, s)).collect()
    }

    /// Blocks that are suspects (or refused) now.
    pub fn suspects(&self, now_ms: u64) -> usize {
        self.blocks
            .iter()
            .filter(|e| !e.suspect.is_empty() && self.policy.is_suspect(&e.suspect, now_ms))
            .count()
    }

    /// The `n` blocks with the highest suspect score.
    pub fn top_suspects(&self, n: usize, now_ms: u64) -> Vec<BlockStatus> {
        let mut all: Vec<(i32, Block)> = self
            .blocks
            .iter()
            .filter(|e| !e.suspect.is_empty())
            .map(|e| (self.policy.verdict(&e.suspect, now_ms).score, *e.key()))
            .filter(|(score, _)| *score > 0)
            .collect();
        all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        all.truncate(n);
        all.into_iter()
            .map(|(_, b)| self.status(b, now_ms))
            .collect()
    }

    /// The `n` blocks with the most activity, relative to their limits.
    pub fn hottest(&self, n: usize, now_ms: u64) -> Vec<BlockStatus> {
        let l = self.limits();
        let heat = |c: &Counts| {
            let f = |v: u32, m: u32| v as f64 / m.max(1) as f64;
            f(c.connections, l.connections)
                .max(f(c.messages, l.messages))
                .max(f(c.recipients, l.recipients))
        };
        let mut all: Vec<BlockStatus> = self
            .blocks
            .iter()
            .map(|e| self.status(*e.key(), now_ms))
            .collect();
        all.sort_by(|a, b| {
            (b.penalty_left_secs > 0)
                .cmp(&(a.penalty_left_secs > 0))
                .then(heat(&b.counts).total_cmp(&heat(&a.counts)))
        });
        all.truncate(n);
        all
    }

    /// Blocks currently in the penalty box.
    pub fn penalised(&self, now_ms: u64) -> usize {
        self.blocks
            .iter()
            .filter(|e| e.penalty.until > now_ms)
            .count()
    }

    /// Drops expired epochs and forgets idle blocks (nothing in the window,
    /// no penalty running). Returns the number of blocks forgotten.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let first = self.window_start(now_ms);
        let before = self.blocks.len();
        let suspect_first = self
            .policy
            .epoch_of(now_ms)
            .saturating_sub(self.policy.bounds().window_epochs.saturating_sub(1));
        let mut released = Vec::new();
        self.blocks.retain(|_, s| {
            s.slots.retain(|sl| sl.epoch >= first);
            s.suspect.prune(now_ms, suspect_first);
            if s.hot.is_some_and(|h| h.until <= now_ms) {
                s.hot = None;
            }
            let keep = !s.slots.is_empty()
                || s.penalty.until > now_ms
                || !s.suspect.is_empty()
                || s.hot.is_some();
            if let (false, Some(origin)) = (keep, s.creator) {
                released.push(origin);
            }
            keep
        });
        // Give the shares back and drop stale eviction candidates, so the
        // queue stays as small as the peer blocks themselves.
        let mut peers = self.peer_blocks.lock().unwrap_or_else(|e| e.into_inner());
        for origin in released {
            peers.release(origin);
        }
        peers
            .order
            .retain(|(b, o)| self.blocks.get(b).is_some_and(|s| s.creator == Some(*o)));
        // Sessions add blocks while the sweep runs: the map may have grown.
        before.saturating_sub(self.blocks.len())
    }

    /// This node's own (block, epoch) counts that changed since the last
    /// take (all of them inside the window after an overflow), with their
    /// current values: what gossip sends the blocks' owners.
    pub fn take_own_changes(&self, now_ms: u64) -> Vec<(Block, u64, Counts)> {
        let (changed, overflow) = {
            let mut ch = self.lock_changes();
            let overflow = std::mem::take(&mut ch.overflow);
            (std::mem::take(&mut ch.changed), overflow)
        };
        if overflow {
            return self.own_counts(now_ms);
        }
        let first = self.window_start(now_ms);
        let mut out = Vec::with_capacity(changed.len());
        for (block, epoch) in changed {
            if epoch < first {
                continue;
            }
            let Some(st) = self.blocks.get(&block) else {
                continue;
            };
            if let Some(sl) = st
                .slots
                .iter()
                .find(|sl| sl.origin == SELF_ORIGIN && sl.epoch == epoch)
            {
                out.push((block, epoch, sl.counts));
            }
        }
        out
    }

    /// Every own (block, epoch) count inside the window (what a take after
    /// an overflow of the change record returns).
    fn own_counts(&self, now_ms: u64) -> Vec<(Block, u64, Counts)> {
        let first = self.window_start(now_ms);
        let mut out = Vec::new();
        for e in self.blocks.iter() {
            for sl in e.slots.iter().filter(|sl| sl.origin == SELF_ORIGIN) {
                if sl.epoch >= first {
                    out.push((*e.key(), sl.epoch, sl.counts));
                }
            }
        }
        out
    }

    /// Sets (or with `None` clears) the network-wide window of a hot block
    /// as its owners report it, used until `until_ms`. It refuses the block
    /// only with at least `gossip.min_origins_to_refuse` origins, like any
    /// count that is not this node's own. A block new to this node is added
    /// only while the table has room (peers' blocks never evict).
    pub fn set_hot(&self, block: Block, hot: Option<(Counts, u32)>, until_ms: u64) {
        let value = hot.map(|(counts, origins)| Hot {
            counts,
            origins,
            until: until_ms,
        });
        if let Some(mut s) = self.blocks.get_mut(&block) {
            s.hot = value;
            return;
        }
        if value.is_none() {
            return;
        }
        if self.blocks.len() >= self.cfg.max_tracked_blocks {
            metrics::counter!("magicmx_throttle_untracked_total", "source" => "peer").increment(1);
            return;
        }
        self.blocks.entry(block).or_default().hot = value;
    }

    /// Every (origin, block, epoch) count inside the window: what gossip sends.
    pub fn snapshot(&self, now_ms: u64) -> Vec<(Origin, Block, u64, Counts)> {
        let first = self.window_start(now_ms);
        let mut out = Vec::new();
        for e in self.blocks.iter() {
            for s in &e.slots {
                if s.epoch >= first {
                    out.push((s.origin, *e.key(), s.epoch, s.counts));
                }
            }
        }
        out
    }
}

/// Sum of the slots with `first <= epoch <= current`. Epochs outside the
/// window never count.
fn window_sum(slots: &[Slot], first: u64, current: u64) -> Counts {
    slots
        .iter()
        .filter(|s| s.epoch >= first && s.epoch <= current + 1)
        .fold(Counts::default(), |acc, s| acc.saturating_add(s.counts))
}

/// A block's window counts as [`capped_window_sum`] sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sums {
    /// Every origin, each peer capped.
    all: Counts,
    /// This node's own.
    own: Counts,
    /// Origins with a count in the window, this node included.
    origins: u32,
}

/// Like [`window_sum`], but each origin other than this node contributes at
/// most `cap`.
fn capped_window_sum(slots: &[Slot], first: u64, current: u64, cap: Counts) -> Sums {
    // Per-peer sums without allocating in the common case (few origins).
    let mut total = Counts::default();
    let mut peers = [(SELF_ORIGIN, Counts::default()); 8];
    let mut n = 0;
    let mut more: Vec<(Origin, Counts)> = Vec::new();
    for s in slots
        .iter()
        .filter(|s| s.epoch >= first && s.epoch <= current + 1)
    {
        if s.origin == SELF_ORIGIN {
            total = total.saturating_add(s.counts);
            continue;
        }
        if let Some(p) = peers[..n].iter_mut().find(|p| p.0 == s.origin) {
            p.1 = p.1.saturating_add(s.counts);
        } else if n < peers.len() {
            peers[n] = (s.origin, s.counts);
            n += 1;
        } else if let Some(p) = more.iter_mut().find(|p| p.0 == s.origin) {
            p.1 = p.1.saturating_add(s.counts);
        } else {
            more.push((s.origin, s.counts));
        }
    }
    let own = total;
    let mut origins = u32::from(own != Counts::default());
    for (_, c) in peers[..n].iter().chain(more.iter()) {
        total = total.saturating_add(c.min(cap));
        origins += u32::from(*c != Counts::default());
    }
    Sums {
        all: total,
        own,
        origins,
    }
}

/// A plain, ordered counter state: the model of what the network agrees on.
/// Used by property tests and the gossip simulation; the live [`Throttle`]
/// merges the same way slot by slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterState(pub BTreeMap<(Origin, Block, u64), Counts>);

impl CounterState {
    pub fn merge(&mut self, other: &CounterState) {
        for (k, v) in &other.0 {
            let e = self.0.entry(*k).or_default();
            *e = e.max(*v);
        }
    }

    /// Network-wide counts of `block` for epochs in `first..=current`.
    pub fn window_sum(&self, block: Block, first: u64, current: u64) -> Counts {
        let slots: Vec<Slot> = self
            .0
            .iter()
            .filter(|((_, b, _), _)| *b == block)
            .map(|((origin, _, epoch), counts)| Slot {
                origin: *origin,
                epoch: *epoch,
                counts: *counts,
            })
            .collect();
        window_sum(&slots, first, current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;
    use proptest::prelude::*;

    fn cfg() -> ThrottleConfig {
        ThrottleConfig {
            max_connections: 3,
            max_messages: 2,
            max_recipients: 4,
            window: Dur::secs(60),
            epoch: Dur::secs(10),
            penalty: Dur::secs(30),
            max_penalty: Dur::secs(100),
            polite_refusals: 2,
            ..ThrottleConfig::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const T0: u64 = 1_000_000_000;

    #[test]
    fn blocks() {
        let t = Throttle::new(&ThrottleConfig::default(), &TrustConfig::default(), "n");
        assert_eq!(t.block_of(ip("192.0.2.77")).to_string(), "192.0.2.0/24");
        assert_eq!(
            t.block_of(ip("::ffff:192.0.2.77")).to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            t.block_of(ip("2001:db8:1:2::5")).to_string(),
            "2001:db8:1::/48"
        );
    }

    #[test]
    fn connections_over_limit_go_to_the_penalty_box() {
        let t = Throttle::new(&cfg(), &TrustConfig::default(), "n");
        for i in 0..3 {
            assert_eq!(
                t.on_connect(ip(&format!("10.1.1.{i}")), T0),
                Decision::Accept
            );
        }
        // Another block is not affected.
        assert_eq!(t.on_connect(ip("10.2.2.1"), T0), Decision::Accept);
        let d = t.on_connect(ip("10.1.1.9"), T0);
        assert!(
            matches!(
                d,
                Decision::Refuse {
                    reason: Reason::TooManyConnections,
                    penalty: None
                }
            ),
            "{d:?}"
        );
        // One more polite refusal, saying what put it in the box and how
        // long is left (30 s, the first penalty), then silence.
        assert_eq!(
            t.on_connect(ip("10.1.1.9"), T0 + 1),
            Decision::Refuse {
                reason: Reason::PenaltyBox,
                penalty: Some(Penalised {
                    cause: Some(Reason::TooManyConnections),
                    left: std::time::Duration::from_secs(30),
                }),
            }
        );
        assert_eq!(
            t.on_connect(ip("10.1.1.9"), T0 + 2),
            Decision::Drop {
                reason: Reason::PenaltyBox
            }
        );
        // After the penalty and the window, accepted again.
        assert_eq!(t.on_connect(ip("10.1.1.9"), T0 + 61_000), Decision::Accept);
        assert_eq!(t.over_limit(ip("10.1.1.9"), T0 + 61_000), None);
    }

    #[test]
    fn repeat_offenders_wait_longer() {
        let t = Throttle::new(&cfg(), &TrustConfig::default(), "n");
        let mut now = T0;
        let mut lengths = Vec::new();
        for _ in 0..4 {
            while t.on_connect(ip("10.1.1.1"), now) == Decision::Accept {}
            let s = t.status(t.block_of(ip("10.1.1.1")), now);
            lengths.push(s.penalty_left_secs);
            now += s.penalty_left_secs * 1000 + 61_000;
        }
        assert_eq!(lengths, vec![30, 60, 100, 100]);
    }

    #[test]
    fn recipients_and_messages() {
        let t = Throttle::new(&cfg(), &TrustConfig::default(), "n");
        for _ in 0..4 {
            assert_eq!(t.on_rcpt(ip("10.1.1.1"), T0), Decision::Accept);
        }
        let d = t.on_rcpt(ip("10.1.1.1"), T0);
        assert!(
            matches!(
                d,
                Decision::Refuse {
                    reason: Reason::TooManyRecipients,
                    penalty: None
                }
            ),
            "{d:?}"
        );
        assert_eq!(t.on_message(ip("10.3.3.3"), T0), Decision::Accept);
        assert_eq!(t.on_message(ip("10.3.3.3"), T0), Decision::Accept);
        assert!(matches!(
            t.on_message(ip("10.3.3.3"), T0),
            Decision::Refuse {
                reason: Reason::TooManyMessages,
                ..
            }
        ));
    }

    #[test]
    fn trusted_networks_are_never_counted_or_refused() {
        let trust = TrustConfig {
            networks: vec!["10.9.0.0/16".parse().unwrap()],
        };
        let t = Throttle::new(&cfg(), &trust, "n");
        for _ in 0..100 {
            assert_eq!(t.on_connect(ip("10.9.1.1"), T0), Decision::Accept);
            assert_eq!(t.on_rcpt(ip("10.9.1.1"), T0), Decision::Accept);
        }
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn merged_peer_counts_throttle_and_are_idempotent() {
        let t = Throttle::new(&cfg(), &TrustConfig::default(), "n");
        let b = t.block_of(ip("10.1.1.1"));
        let peer = t.origin("peer");
        let c = Counts {
            connections: 0,
            messages: 0,
            recipients: 4,
        };
        for _ in 0..3 {
            t.merge(peer, b, t.epoch_of(T0), c, T0);
        }
        assert_eq!(t.status(b, T0).counts.recipients, 4);
        assert!(matches!(
            t.on_rcpt(ip("10.1.1.2"), T0),
            Decision::Refuse { .. }
        ));
        assert_eq!(
            t.over_limit(ip("10.1.1.3"), T0),
            Some(Reason::TooManyRecipients)
        );
    }

    #[test]
    fn one_peer_cannot_throttle_a_block_alone() {
        let t = Throttle::new(&cfg(), &TrustConfig::default(), "n").with_peer_share(0.5);
        let b = t.block_of(ip("10.1.1.1"));
        let liar = t.origin("liar");
        let huge = Counts {
            connections: 1_000_000,
            messages: 1_000_000,
            recipients: 1_000_000,
        };
        t.merge(liar, b, t.epoch_of(T0), huge, T0);
        // Capped at half of each limit (3 -> 1, 2 -> 1, 4 -> 2).
        assert_eq!(
            t.status(b, T0).counts,
            Counts {
                connections: 1,
                messages: 1,
                recipients: 2
            }
        );
        assert_eq!(t.over_limit(ip("10.1.1.1"), T0), None);
        assert_eq!(t.on_connect(ip("10.1.1.1"), T0), Decision::Accept);
        // Enough peers agreeing can.
        for name in ["other", "third"] {
            let o = t.origin(name);
            t.merge(o, b, t.epoch_of(T0), huge, T0);
        }
        assert!(t.over_limit(ip("10.1.1.1"), T0).is_some());
    }

    #[test]
    fn two_colluding_peers_cannot_refuse_without_a_third_origin() {
        let t = Throttle::new(&cfg(), &TrustConfig::default(), "n")
            .with_peer_share(0.5)
            .with_min_origins(3);
        let b = t.block_of(ip("10.1.1.1"));
        let huge = Counts {
            connections: 1_000_000,
            messages: 1_000_000,
            recipients: 1_000_000,
        };
        // Two certified peers at their cap reach every limit together ...
        for name in ["liar", "accomplice"] {
            let o = t.origin(name);
            t.merge(o, b, t.epoch_of(T0), huge, T0);
        }
        let st = t.status(b, T0);
        assert_eq!((st.counts.connections, st.origins), (2, 2));
        // ... but two origins refuse nothing: the block is served.
        assert_eq!(st.over, None);
        assert_eq!(t.over_limit(ip("10.1.1.1"), T0), None);
        assert_eq!(t.on_connect(ip("10.1.1.1"), T0), Decision::Accept);
        // That connection is this node's own count: a third origin, and the
        // network-wide count (1 + 1 + 1 = 3, limit 3) now decides.
        assert_eq!(t.status(b, T0).origins, 3);
        assert!(matches!(
            t.on_connect(ip("10.1.1.2"), T0),
            Decision::Refuse { .. }
        ));
        // A node's own counts always refuse, whatever the origins.
        let lone = Throttle::new(&cfg(), &TrustConfig::default(), "n").with_min_origins(3);
        for _ in 0..3 {
            assert_eq!(lone.on_connect(ip("10.9.1.1"), T0), Decision::Accept);
        }
        assert!(matches!(
            lone.on_connect(ip("10.9.1.1"), T0),
            Decision::Refuse { .. }
        ));
    }

    #[test]
    fn full_map_fails_open_and_sweep_forgets_idle_blocks() {
        let c = ThrottleConfig {
            max_tracked_blocks: 2,
            ..cfg()
        };
        let t = Throttle::new(&c, &TrustConfig::default(), "n");
        t.on_connect(ip("10.1.1.1"), T0);
        t.on_connect(ip("10.2.1.1"), T0);
        for _ in 0..10 {
            assert_eq!(t.on_connect(ip("10.3.1.1"), T0), Decision::Accept);
        }
        assert_eq!(t.tracked(), 2);
        assert_eq!(t.sweep(T0 + 61_000), 2);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn peers_cannot_fill_the_whole_table() {
        let c = ThrottleConfig {
            max_tracked_blocks: 10,
            peer_block_share: 0.3,
            ..cfg()
        };
        let t = Throttle::new(&c, &TrustConfig::default(), "n").with_peer_share(0.5);
        let epoch = t.epoch_of(T0);
        let counts = Counts {
            connections: 1,
            messages: 1,
            recipients: 1,
        };
        for (i, name) in ["peer", "other", "third", "fourth"].iter().enumerate() {
            let peer = t.origin(name);
            for b in 0..50u8 {
                let block = block_of(IpAddr::from([10 + i as u8, b, 0, 1]), 24, 48);
                t.merge(peer, block, epoch, counts, T0);
            }
        }
        // Each peer creates at most its share (3 of 10); together they fill
        // the table.
        assert_eq!(t.tracked(), 10);
        // This node's own blocks still find room, and are counted: each
        // evicts a peer block, never another local one.
        for i in 1..=10u8 {
            t.on_connect(IpAddr::from([192, 0, i, 1]), T0);
            assert_eq!(
                t.status(t.block_of(IpAddr::from([192, 0, i, 1])), T0)
                    .counts
                    .connections,
                1,
                "local block {i} uncounted"
            );
        }
        assert_eq!(t.tracked(), 10);
        // A full table of local blocks still counts a peer's counts for them.
        let peer = t.origin("peer");
        t.merge(peer, t.block_of(ip("192.0.1.1")), epoch, counts, T0);
        assert_eq!(
            t.status(t.block_of(ip("192.0.1.1")), T0).counts.connections,
            2
        );
    }

    #[test]
    fn full_table_keeps_blocks_over_a_limit() {
        let c = ThrottleConfig {
            max_tracked_blocks: 2,
            peer_block_share: 1.0,
            ..cfg()
        };
        let t = Throttle::new(&c, &TrustConfig::default(), "n").with_peer_share(1.0);
        let epoch = t.epoch_of(T0);
        let flood = Counts {
            connections: 100,
            messages: 100,
            recipients: 100,
        };
        let peer = t.origin("peer");
        let hot = t.block_of(ip("10.9.9.9"));
        // One peer is capped at the limit; two agreeing put it over.
        t.merge(peer, hot, epoch, flood, T0);
        t.merge(t.origin("other"), hot, epoch, flood, T0);
        t.merge(
            peer,
            t.block_of(ip("10.8.8.8")),
            epoch,
            Counts::default(),
            T0,
        );
        assert_eq!(t.tracked(), 2);
        // Two new local blocks: the quiet peer block makes room, the hot one
        // is never evicted and stays refused.
        t.on_connect(ip("192.0.2.1"), T0);
        assert!(t.over_limit(ip("10.9.9.9"), T0).is_some());
        assert_eq!(t.on_connect(ip("192.0.3.1"), T0), Decision::Accept);
        assert_eq!(t.tracked(), 2);
        assert!(matches!(
            t.on_connect(ip("10.9.9.9"), T0),
            Decision::Refuse { .. }
        ));
    }

    #[test]
    fn sweep_gives_peer_shares_back() {
        let c = ThrottleConfig {
            max_tracked_blocks: 10,
            peer_block_share: 0.2,
            ..cfg()
        };
        let t = Throttle::new(&c, &TrustConfig::default(), "n");
        let peer = t.origin("peer");
        let one = Counts {
            connections: 1,
            ..Counts::default()
        };
        for b in 0..5u8 {
            let block = block_of(IpAddr::from([10, b, 0, 1]), 24, 48);
            t.merge(peer, block, t.epoch_of(T0), one, T0);
        }
        assert_eq!(t.tracked(), 2);
        let later = T0 + 61_000;
        assert_eq!(t.sweep(later), 2);
        for b in 0..5u8 {
            let block = block_of(IpAddr::from([10, b, 0, 1]), 24, 48);
            t.merge(peer, block, t.epoch_of(later), one, later);
        }
        assert_eq!(t.tracked(), 2);
    }

    fn arb_state() -> impl Strategy<Value = CounterState> {
        let key = (0u16..3, 0u8..3, 0u64..6);
        let counts = (0u32..50, 0u32..50, 0u32..50).prop_map(|(a, b, c)| Counts {
            connections: a,
            messages: b,
            recipients: c,
        });
        proptest::collection::btree_map(key, counts, 0..20).prop_map(|m| {
            CounterState(
                m.into_iter()
                    .map(|((o, b, e), c)| {
                        let block = block_of(IpAddr::from([10, b, 0, 1]), 24, 48);
                        ((o, block, e), c)
                    })
                    .collect(),
            )
        })
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in arb_state(), b in arb_state()) {
            let mut ab = a.clone(); ab.merge(&b);
            let mut ba = b.clone(); ba.merge(&a);
            prop_assert_eq!(ab, ba);
        }

        #[test]
        fn merge_is_associative(a in arb_state(), b in arb_state(), c in arb_state()) {
            let mut l = a.clone(); l.merge(&b); l.merge(&c);
            let mut bc = b.clone(); bc.merge(&c);
            let mut r = a.clone(); r.merge(&bc);
            prop_assert_eq!(l, r);
        }

        #[test]
        fn merge_is_idempotent(a in arb_state(), b in arb_state()) {
            let mut once = a.clone(); once.merge(&b);
            let mut twice = once.clone(); twice.merge(&b);
            prop_assert_eq!(&once, &twice);
            let mut self_merge = a.clone(); self_merge.merge(&a);
            prop_assert_eq!(self_merge, a);
        }

        /// The live throttle and the model agree, and no epoch outside the
        /// window is ever counted.
        #[test]
        fn window_sum_never_counts_expired_epochs(a in arb_state(), now_epoch in 0u64..8) {
            let c = ThrottleConfig { window: Dur::secs(30), epoch: Dur::secs(10), ..ThrottleConfig::default() };
            let t = Throttle::new(&c, &TrustConfig::default(), "self");
            for o in 1..3u16 { t.origin(&format!("o{o}")); }
            let now = now_epoch * 10_000 + 5_000;
            // Merge everything with a clock that accepts every epoch, then look at `now`.
            for ((o, b, e), counts) in &a.0 {
                t.merge(*o, *b, *e, *counts, (*e) * 10_000 + 1);
            }
            let first = now_epoch.saturating_sub(2);
            for b in 0u8..3 {
                let block = block_of(IpAddr::from([10, b, 0, 1]), 24, 48);
                let expected = a.0.iter()
                    .filter(|((_, bb, e), _)| *bb == block && *e >= first && *e <= now_epoch + 1)
                    .fold(Counts::default(), |acc, (_, c)| acc.saturating_add(*c));
                prop_assert_eq!(t.status(block, now).counts, expected);
                prop_assert_eq!(a.window_sum(block, first, now_epoch), expected);
            }
        }
    }

    #[test]
    fn own_changes_are_fed_once_each_with_their_value_now() {
        let t = Throttle::new(&cfg(), &TrustConfig::default(), "n").with_change_feed();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let now = 10_000_000;
        assert_eq!(t.on_connect(ip, now), Decision::Accept);
        assert_eq!(t.on_connect(ip, now), Decision::Accept);
        let ch = t.take_own_changes(now);
        assert_eq!(ch.len(), 1);
        assert_eq!((ch[0].0, ch[0].2.connections), (t.block_of(ip), 2));
        // Taken: nothing again until the block counts again.
        assert!(t.take_own_changes(now).is_empty());
        t.on_connect(ip, now);
        assert_eq!(t.take_own_changes(now)[0].2.connections, 3);
        // A peer's counts are not own changes; without the feed nothing is kept.
        t.merge(
            t.origin("p"),
            t.block_of(ip),
            t.epoch_of(now),
            Counts::default(),
            now,
        );
        assert!(t.take_own_changes(now).is_empty());
        let off = Throttle::new(&cfg(), &TrustConfig::default(), "n");
        off.on_connect(ip, now);
        assert!(off.take_own_changes(now).is_empty());
    }
}
