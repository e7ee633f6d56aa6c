//! Owners per block: the sans-IO core of gossip at internet scale (issue 15,
//! "Gossip at internet scale" in `DESIGN.md`). Not wired into the live node
//! yet; `bench/gossip_sim.rs` runs it over 1,000 and 10,000 simulated nodes.
//!
//! Today every count change travels to every node, so a node's bandwidth
//! grows with the whole network's activity. Here:
//!
//! * **Owners.** Each block has `r` owner nodes (default 3), the members
//!   with the highest rendezvous weight `weight(member, block)`
//!   ([`owners`]). Every node computes the same owners from the same
//!   membership; a join or a leave moves only the blocks whose top `r`
//!   changed (about r/N of them).
//! * **Increments go to owners.** A node keeps its own changes in an
//!   [`Outbox`] (fed by changes (block, epoch), not by snapshots) and sends
//!   them, batched every interval, to the block's owners, each count signed
//!   by its origin's network-certificate key over (network, origin, block,
//!   epoch, counts) ([`increment_message`]), so neither a relay nor an owner
//!   can forge another origin's counts.
//! * **Owners sum.** An [`OwnerTable`] keeps per (origin, block, epoch) the
//!   largest signed count (an idempotent, commutative, associative merge:
//!   [`merge_order`]) and so knows the network-wide window sum, each origin
//!   capped at the peer share as in the throttle.
//! * **Hot set.** When a block's sum reaches `hot_fraction` (default 0.5)
//!   of any limit ([`is_hot`]), its owners broadcast it epidemically to every
//!   node in signed [`Report`]s; cold blocks are never broadcast.
//! * **One liar cannot throttle.** A node keeps, per hot block, each owner's
//!   latest report ([`HotView`]) and uses their field-wise median
//!   ([`median`]; with r = 3 the second-highest, a missing report counting
//!   as zero), so one owner reporting 100 times the truth moves nothing. It
//!   decides on max(own view, the median, what it sent the owners)
//!   ([`decide`]), and counts that are not its own may refuse a block only
//!   when at least `min_origins_to_refuse` distinct origins contributed
//!   ([`DEFAULT_MIN_ORIGINS_TO_REFUSE`] = 3, see there why).
//! * **Membership change.** When a block's owners change, the new owner
//!   learns the block's counts from its origins (each re-sends its signed
//!   counts of the block) and from the surviving old owners (a
//!   [`Handoff`](super::wire::proto::Handoff) of their table), both
//!   self-authenticating; meanwhile the other owners still count, and the
//!   median of three needs only two of them.
//!
//! Everything here is a pure function over values: no sockets, no clock
//! (epochs and sequence numbers are passed in). Signing uses `ring` (the
//! crypto provider of rustls and quinn already in the build).

use std::collections::HashMap;
use std::hash::Hash;

use ipnet::IpNet;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};

use super::wire::{block_from_wire, block_to_wire, proto};
use crate::throttle::{Block, Counts};

/// Owners per block (`gossip.owners`).
pub const DEFAULT_OWNERS: usize = 3;
/// Fraction of any limit at which owners start broadcasting a block
/// (`gossip.hot_fraction`).
pub const DEFAULT_HOT_FRACTION: f64 = 0.5;
/// Distinct origins that must have contributed to a block's network-wide
/// count before counts that are not this node's own may refuse it
/// (`gossip.min_origins_to_refuse`).
///
/// 3, because each peer origin's contribution is capped at the peer share
/// (0.5 × limit by default): one certified peer alone reaches at most half
/// a limit, but two colluding (or compromised) peers at the cap reach a
/// limit together; with 3 they cannot refuse a block without a third
/// origin, i.e. without real traffic seen elsewhere. The price: a flood that
/// lands on only two nodes is refused by each on its own counts (a node's
/// own counts always refuse), so it can pass up to twice the limit; a flood
/// spread over 3 or more nodes (the case gossip is for) is unaffected.
/// 2 would stop the single liar only; 1 would let one certified peer
/// throttle any block by claiming it saw a flood.
pub const DEFAULT_MIN_ORIGINS_TO_REFUSE: u32 = 3;

// ---------------------------------------------------------------------------
// Rendezvous hashing
// ---------------------------------------------------------------------------

/// splitmix64's finaliser: stable across builds and platforms (every node
/// must compute the same owners).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The rendezvous key of a member: a stable 64-bit hash of its node name
/// (FNV-1a, then mixed).
pub fn member_key(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// The rendezvous key of a block (its network address and prefix).
pub fn block_key(block: &Block) -> u64 {
    match block.0 {
        IpNet::V4(n) => mix(u32::from(n.network()) as u64 | ((n.prefix_len() as u64) << 32)),
        IpNet::V6(n) => {
            let a = u128::from(n.network());
            mix(mix((a >> 64) as u64 ^ 0x6) ^ (a as u64) ^ ((n.prefix_len() as u64) << 56))
        }
    }
}

/// The weight of `member` for `block`: the `r` members with the highest
/// weights own the block.
pub fn weight(member: u64, block: u64) -> u64 {
    mix(mix(member) ^ block)
}

/// The `r` owners of `block` among `members` (each given as its rendezvous
/// key and a value returned for it), highest weight first, with their
/// weights. Ties (equal weights) go to the larger member key, so every node
/// agrees. Cost: one hash per member.
pub fn owners_ranked<T: Copy>(
    block: u64,
    members: impl IntoIterator<Item = (u64, T)>,
    r: usize,
) -> Vec<(u64, u64, T)> {
    let mut top: Vec<(u64, u64, T)> = Vec::with_capacity(r + 1);
    if r == 0 {
        return top;
    }
    for (key, v) in members {
        let w = weight(key, block);
        if top.len() == r {
            let last = &top[r - 1];
            if (w, key) <= (last.0, last.1) {
                continue;
            }
        }
        let i = top
            .iter()
            .position(|e| (w, key) > (e.0, e.1))
            .unwrap_or(top.len());
        top.insert(i, (w, key, v));
        top.truncate(r);
    }
    top
}

/// The `r` owners of `block` among `members`, highest weight first.
pub fn owners<T: Copy>(
    block: u64,
    members: impl IntoIterator<Item = (u64, T)>,
    r: usize,
) -> Vec<T> {
    owners_ranked(block, members, r)
        .into_iter()
        .map(|(_, _, v)| v)
        .collect()
}

// ---------------------------------------------------------------------------
// Counts: order, median, hot set, decision
// ---------------------------------------------------------------------------

/// The total order used to merge two values of one (origin, block, epoch).
/// An honest origin's counts only grow, so of two of its values the later
/// dominates field-wise and comes first here (larger sum); two values that
/// do not dominate each other (only a misbehaving origin signs those) are
/// still ordered, by sum and then field by field, so that the merge stays a
/// semilattice whatever arrives.
pub fn merge_order(c: &Counts) -> (u64, u32, u32, u32) {
    (
        c.connections as u64 + c.messages as u64 + c.recipients as u64,
        c.connections,
        c.messages,
        c.recipients,
    )
}

/// A block's network-wide count as an owner sees it: the window sum (each
/// origin capped at the peer share) and the number of distinct origins
/// that contributed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub counts: Counts,
    pub origins: u32,
}

/// Field-wise median of the owners' reports of one block, as used by a
/// node: `reports` are the values of the block's current owners (at most
/// `r`; a missing report counts as zero), sorted descending per field, and
/// the value at index `r / 2` is taken (with r = 3 the second-highest). So
/// `r / 2` owners reporting too much, or `(r - 1) / 2` reporting nothing,
/// cannot move the result past the honest owners' values.
pub fn median(reports: &[Window], r: usize) -> Window {
    let r = r.max(1);
    let pick = |f: &dyn Fn(&Window) -> u32| -> u32 {
        let mut v: Vec<u32> = reports.iter().take(r).map(f).collect();
        v.resize(r, 0);
        v.sort_unstable_by(|a, b| b.cmp(a));
        v[r / 2]
    };
    Window {
        counts: Counts {
            connections: pick(&|w| w.counts.connections),
            messages: pick(&|w| w.counts.messages),
            recipients: pick(&|w| w.counts.recipients),
        },
        origins: pick(&|w| w.origins),
    }
}

/// The threshold of one limit at `fraction` (at least 1).
fn threshold(limit: u32, fraction: f64) -> u32 {
    ((limit as f64 * fraction).ceil() as u32).max(1)
}

/// Whether a block whose network-wide count is `c` is in the hot set: any
/// field at `fraction` of its limit.
pub fn is_hot(c: &Counts, limits: &Counts, fraction: f64) -> bool {
    c.connections >= threshold(limits.connections, fraction)
        || c.messages >= threshold(limits.messages, fraction)
        || c.recipients >= threshold(limits.recipients, fraction)
}

/// Which limit a count passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Connections,
    Messages,
    Recipients,
}

fn over(c: &Counts, limits: &Counts) -> Option<Over> {
    if c.connections > limits.connections {
        Some(Over::Connections)
    } else if c.messages > limits.messages {
        Some(Over::Messages)
    } else if c.recipients > limits.recipients {
        Some(Over::Recipients)
    } else {
        None
    }
}

/// Why a node refuses a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub over: Over,
    /// True when the node's own counts passed the limit by themselves.
    pub own: bool,
}

/// A node's decision for one block: refuse when its own window counts (or
/// what it sent the owners) pass a limit, or when max(own, sent, the median
/// of the owners' hot reports) does and the median counts at least
/// `min_origins` distinct origins. Counts strictly over the limit refuse,
/// as in the throttle.
pub fn decide(
    own: Counts,
    sent: Counts,
    hot: Option<Window>,
    limits: &Counts,
    min_origins: u32,
) -> Option<Refusal> {
    let mine = own.max(sent);
    if let Some(o) = over(&mine, limits) {
        return Some(Refusal { over: o, own: true });
    }
    let hot = hot?;
    if hot.origins < min_origins {
        return None;
    }
    over(&mine.max(hot.counts), limits).map(|o| Refusal {
        over: o,
        own: false,
    })
}

// ---------------------------------------------------------------------------
// Owner table
// ---------------------------------------------------------------------------

/// One origin's count of one block in one epoch, with its signature (or
/// any tag the caller keeps: the simulation keeps none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot<O, S> {
    pub origin: O,
    pub epoch: u64,
    pub counts: Counts,
    pub sig: S,
}

/// What [`OwnerTable::merge`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// A new (origin, block, epoch).
    New,
    /// A larger value replaced the one kept.
    Grew,
    /// Not larger than the value kept (duplicate, stale or reordered).
    Unchanged,
    /// The table is at `max_entries`: a new count was dropped (counted by
    /// the caller; existing counts still grow).
    Full,
}

/// An owner's table of the blocks it owns: per (origin, block, epoch) the
/// largest value in [`merge_order`]. Bounded by `max_entries` slots.
#[derive(Debug, Clone)]
pub struct OwnerTable<B, O, S> {
    blocks: HashMap<B, Vec<Slot<O, S>>>,
    entries: usize,
    max_entries: usize,
}

impl<B: Copy + Eq + Hash, O: Copy + Eq + Ord, S: Clone + Ord> OwnerTable<B, O, S> {
    pub fn new(max_entries: usize) -> Self {
        OwnerTable {
            blocks: HashMap::new(),
            entries: 0,
            max_entries,
        }
    }

    /// Merges one signed count (the caller verified the signature).
    pub fn merge(&mut self, block: B, origin: O, epoch: u64, counts: Counts, sig: S) -> Merge {
        let at_capacity = self.entries >= self.max_entries;
        let slots = match self.blocks.get_mut(&block) {
            Some(s) => s,
            None if at_capacity => return Merge::Full,
            None => self.blocks.entry(block).or_default(),
        };
        if let Some(s) = slots
            .iter_mut()
            .find(|s| s.origin == origin && s.epoch == epoch)
        {
            let new = (merge_order(&counts), &sig);
            if new > (merge_order(&s.counts), &s.sig) {
                s.counts = counts;
                s.sig = sig;
                return Merge::Grew;
            }
            return Merge::Unchanged;
        }
        if at_capacity {
            return Merge::Full;
        }
        slots.push(Slot {
            origin,
            epoch,
            counts,
            sig,
        });
        self.entries += 1;
        Merge::New
    }

    /// The block's window sum over epochs `>= first_epoch`, each origin
    /// capped at `cap` (the peer share of each limit), and its number of
    /// contributing origins.
    pub fn window(&self, block: &B, first_epoch: u64, cap: &Counts) -> Window {
        let Some(slots) = self.blocks.get(block) else {
            return Window::default();
        };
        let mut per: Vec<(O, Counts)> = Vec::with_capacity(slots.len());
        for s in slots.iter().filter(|s| s.epoch >= first_epoch) {
            match per.iter_mut().find(|p| p.0 == s.origin) {
                Some(p) => p.1 = p.1.saturating_add(s.counts),
                None => per.push((s.origin, s.counts)),
            }
        }
        let mut w = Window::default();
        for (_, c) in per {
            if c != Counts::default() {
                w.origins += 1;
                w.counts = w.counts.saturating_add(c.min(*cap));
            }
        }
        w
    }

    /// The signed counts kept for a block (what a handoff carries).
    pub fn slots(&self, block: &B) -> &[Slot<O, S>] {
        self.blocks.get(block).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn blocks(&self) -> impl Iterator<Item = &B> {
        self.blocks.keys()
    }

    /// Forgets a block (no longer owned, after the handoff).
    pub fn remove(&mut self, block: &B) {
        if let Some(s) = self.blocks.remove(block) {
            self.entries -= s.len();
        }
    }

    /// Drops epochs before `first_epoch` (out of the window).
    pub fn prune(&mut self, first_epoch: u64) {
        let mut removed = 0;
        self.blocks.retain(|_, slots| {
            let before = slots.len();
            slots.retain(|s| s.epoch >= first_epoch);
            removed += before - slots.len();
            !slots.is_empty()
        });
        self.entries -= removed;
    }

    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
}

// ---------------------------------------------------------------------------
// A node's outbox and its view of the hot set
// ---------------------------------------------------------------------------

/// This node's own counts that changed since they were last sent to the
/// owners, fed by changes (block, epoch, counts) from the throttle, and
/// what was sent (the "sent" input of [`decide`]). Bounded by
/// `max_pending` (a change past the bound replaces nothing and is sent at
/// the next full re-send).
#[derive(Debug, Clone)]
pub struct Outbox<B> {
    pending: HashMap<(B, u64), Counts>,
    sent: HashMap<(B, u64), Counts>,
    max_pending: usize,
}

impl<B: Copy + Eq + Hash> Outbox<B> {
    pub fn new(max_pending: usize) -> Self {
        Outbox {
            pending: HashMap::new(),
            sent: HashMap::new(),
            max_pending,
        }
    }

    /// The throttle's own count of (block, epoch) is now `counts`.
    pub fn note(&mut self, block: B, epoch: u64, counts: Counts) -> bool {
        if let Some(c) = self.pending.get_mut(&(block, epoch)) {
            *c = c.max(counts);
            return true;
        }
        if self.pending.len() >= self.max_pending {
            return false;
        }
        self.pending.insert((block, epoch), counts);
        true
    }

    /// The changes to send this interval; they count as sent.
    pub fn take(&mut self) -> Vec<(B, u64, Counts)> {
        self.take_where(|_, _, _| true)
    }

    /// The changes that `pick` chooses, given (block, its pending count,
    /// what was sent of it): hot or busy blocks, sent sooner than the
    /// interval. They count as sent.
    pub fn take_where(
        &mut self,
        mut pick: impl FnMut(&B, &Counts, &Counts) -> bool,
    ) -> Vec<(B, u64, Counts)> {
        let none = Counts::default();
        let keys: Vec<(B, u64)> = self
            .pending
            .iter()
            .filter(|(k, c)| pick(&k.0, c, self.sent.get(k).unwrap_or(&none)))
            .map(|(k, _)| *k)
            .collect();
        let out: Vec<(B, u64, Counts)> = keys
            .into_iter()
            .filter_map(|k| self.pending.remove(&k).map(|c| (k.0, k.1, c)))
            .collect();
        for (b, e, c) in &out {
            let s = self.sent.entry((*b, *e)).or_default();
            *s = s.max(*c);
        }
        out
    }

    /// Everything sent of the blocks `pick` chooses, as (block, epoch,
    /// counts).
    pub fn sent_where(&self, mut pick: impl FnMut(&B) -> bool) -> Vec<(B, u64, Counts)> {
        self.sent
            .iter()
            .filter(|(k, _)| pick(&k.0))
            .map(|(k, c)| (k.0, k.1, *c))
            .collect()
    }

    /// Whether a count of `block` in `epoch` was sent.
    pub fn has_sent(&self, block: B, epoch: u64) -> bool {
        self.sent.contains_key(&(block, epoch))
    }

    /// What this node sent the owners for `block` over epochs
    /// `>= first_epoch`.
    pub fn sent(&self, block: B, first_epoch: u64, last_epoch: u64) -> Counts {
        (first_epoch..=last_epoch)
            .filter_map(|e| self.sent.get(&(block, e)))
            .fold(Counts::default(), |a, c| a.saturating_add(*c))
    }

    /// Forgets sent epochs before `first_epoch`.
    pub fn prune(&mut self, first_epoch: u64) {
        self.sent.retain(|(_, e), _| *e >= first_epoch);
        self.pending.retain(|(_, e), _| *e >= first_epoch);
    }
}

/// One owner's report of one hot block, as a node keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report<O> {
    pub owner: O,
    /// The owner's report sequence number (newer reports replace older).
    pub seq: u64,
    /// The owner's epoch when it reported (reports expire).
    pub epoch: u64,
    pub window: Window,
}

/// A node's view of the hot set: per block, the latest report of each
/// owner (at most `r_max` owners per block, `max_blocks` blocks).
#[derive(Debug, Clone)]
pub struct HotView<B, O> {
    blocks: HashMap<B, Vec<Report<O>>>,
    max_blocks: usize,
    r_max: usize,
}

impl<B: Copy + Eq + Hash, O: Copy + Eq> HotView<B, O> {
    /// `r_max` must leave room beyond the `r` owners (2 × r is what
    /// `bench/gossip_sim` uses): with exactly `r`, an owner change makes the
    /// reports of the old and the new owner push each other out, each
    /// coming back as "new", and a broadcast that forwards new reports
    /// never ends (found by the simulation: `--new=100,10000,100,
    /// duration_ms=20000,hot_rmax=3`).
    pub fn new(max_blocks: usize, r_max: usize) -> Self {
        HotView {
            blocks: HashMap::new(),
            max_blocks,
            r_max,
        }
    }

    /// Keeps `report` if it is newer than the one kept for (block, owner).
    /// Returns true when it was new (the caller forwards new reports only).
    /// The caller checked that the sender owns the block in its view and
    /// verified the signature.
    pub fn merge(&mut self, block: B, report: Report<O>) -> bool {
        let full = self.blocks.len() >= self.max_blocks;
        let reports = match self.blocks.get_mut(&block) {
            Some(r) => r,
            None if full => return false,
            None => self.blocks.entry(block).or_default(),
        };
        if let Some(r) = reports.iter_mut().find(|r| r.owner == report.owner) {
            if r.seq >= report.seq {
                return false;
            }
            *r = report;
            return true;
        }
        if reports.len() < self.r_max {
            reports.push(report);
            return true;
        }
        // Keep the newest reports (an owner that left stops reporting; its
        // report ages out first).
        let Some(oldest) = reports.iter_mut().min_by_key(|r| r.epoch) else {
            return false;
        };
        if oldest.epoch > report.epoch {
            return false;
        }
        *oldest = report;
        true
    }

    /// The median of the reports of `owners` (the block's current owners
    /// in this node's membership view) made at `first_epoch` or later.
    pub fn value(&self, block: &B, owners: &[O], first_epoch: u64) -> Option<Window> {
        let reports = self.blocks.get(block)?;
        let vals: Vec<Window> = reports
            .iter()
            .filter(|r| r.epoch >= first_epoch && owners.contains(&r.owner))
            .map(|r| r.window)
            .collect();
        if vals.is_empty() {
            return None;
        }
        Some(median(&vals, owners.len()))
    }

    /// The blocks with at least one report.
    pub fn blocks(&self) -> impl Iterator<Item = &B> {
        self.blocks.keys()
    }

    pub fn contains(&self, block: &B) -> bool {
        self.blocks.contains_key(block)
    }

    /// The reports kept for `block`.
    pub fn reports(&self, block: &B) -> &[Report<O>] {
        self.blocks.get(block).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Drops reports made before `first_epoch`.
    pub fn prune(&mut self, first_epoch: u64) {
        self.blocks.retain(|_, r| {
            r.retain(|x| x.epoch >= first_epoch);
            !r.is_empty()
        });
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

// ---------------------------------------------------------------------------
// Signatures
// ---------------------------------------------------------------------------

/// A signature: 64 octets (ECDSA P-256 with fixed-length r||s, or Ed25519).
pub type Signature = [u8; 64];

/// The key algorithm of a node's network certificate. `rcgen` (the
/// `magicmx ca` command) issues ECDSA P-256 keys today; Ed25519 is accepted
/// too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    EcdsaP256,
    Ed25519,
}

/// A signature that does not verify, or a key that does not load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("bad signature")]
    Bad,
    #[error("bad key")]
    Key,
}

/// Domain separation: an increment signature never verifies as a report's.
const INCREMENT_TAG: &[u8] = b"magicmx/gossip/v2/increment\0";
const REPORT_TAG: &[u8] = b"magicmx/gossip/v2/hot-report\0";

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_block(out: &mut Vec<u8>, block: &Block) {
    let (octets, prefix) = block_to_wire(block);
    out.push(octets.len() as u8);
    out.extend_from_slice(&octets);
    out.push(prefix as u8);
}

fn put_counts(out: &mut Vec<u8>, c: &Counts) {
    out.extend_from_slice(&c.connections.to_be_bytes());
    out.extend_from_slice(&c.messages.to_be_bytes());
    out.extend_from_slice(&c.recipients.to_be_bytes());
}

/// The bytes an origin signs for one count: a fixed, unambiguous encoding
/// of (network, origin, block, epoch, counts) (not the protobuf encoding,
/// which is not canonical).
pub fn increment_message(
    network: &str,
    origin: &str,
    block: &Block,
    epoch: u64,
    counts: &Counts,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(96);
    m.extend_from_slice(INCREMENT_TAG);
    put_str(&mut m, network);
    put_str(&mut m, origin);
    put_block(&mut m, block);
    m.extend_from_slice(&epoch.to_be_bytes());
    put_counts(&mut m, counts);
    m
}

/// The bytes an owner signs for one report of its hot blocks.
pub fn report_message(
    network: &str,
    owner: &str,
    epoch: u64,
    seq: u64,
    blocks: &[(Block, Window)],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + blocks.len() * 36);
    m.extend_from_slice(REPORT_TAG);
    put_str(&mut m, network);
    put_str(&mut m, owner);
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&(blocks.len() as u32).to_be_bytes());
    for (b, w) in blocks {
        put_block(&mut m, b);
        put_counts(&mut m, &w.counts);
        m.extend_from_slice(&w.origins.to_be_bytes());
    }
    m
}

enum Pair {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// A node's signing key: the private key of its network certificate.
pub struct Signer {
    pair: Pair,
    rng: SystemRandom,
}

impl Signer {
    /// Loads a PKCS#8 (DER) private key, as in the node's key file.
    pub fn from_pkcs8(alg: KeyAlg, der: &[u8]) -> Result<Signer, SignatureError> {
        let rng = SystemRandom::new();
        let pair = match alg {
            KeyAlg::EcdsaP256 => Pair::Ecdsa(
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
                    .map_err(|_| SignatureError::Key)?,
            ),
            KeyAlg::Ed25519 => Pair::Ed25519(
                Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|_| SignatureError::Key)?,
            ),
        };
        Ok(Signer { pair, rng })
    }

    /// The public key (as in the certificate's SubjectPublicKeyInfo: the
    /// uncompressed point for P-256, 32 octets for Ed25519).
    pub fn public_key(&self) -> &[u8] {
        match &self.pair {
            Pair::Ecdsa(k) => k.public_key().as_ref(),
            Pair::Ed25519(k) => k.public_key().as_ref(),
        }
    }

    pub fn alg(&self) -> KeyAlg {
        match self.pair {
            Pair::Ecdsa(_) => KeyAlg::EcdsaP256,
            Pair::Ed25519(_) => KeyAlg::Ed25519,
        }
    }

    pub fn sign(&self, msg: &[u8]) -> Result<Signature, SignatureError> {
        let sig = match &self.pair {
            Pair::Ecdsa(k) => k.sign(&self.rng, msg).map_err(|_| SignatureError::Key)?,
            Pair::Ed25519(k) => k.sign(msg),
        };
        sig.as_ref().try_into().map_err(|_| SignatureError::Key)
    }
}

/// SubjectPublicKeyInfo prefixes of the two key kinds a network certificate
/// may carry; the raw key follows.
const P256_SPKI: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const ED25519_SPKI: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The algorithm and raw public key of a certificate (DER), as
/// [`verify`] takes them; None for other key kinds or a certificate that
/// does not parse.
pub fn public_key_of_cert(cert: &[u8]) -> Option<(KeyAlg, Vec<u8>)> {
    let der = rustls_pki_types::CertificateDer::from(cert);
    let ee = webpki::EndEntityCert::try_from(&der).ok()?;
    let spki = ee.subject_public_key_info();
    let spki: &[u8] = spki.as_ref();
    // webpki gives the SPKI without its outer SEQUENCE header on some
    // versions: accept both shapes.
    for (alg, prefix, len) in [
        (KeyAlg::EcdsaP256, P256_SPKI, 65),
        (KeyAlg::Ed25519, ED25519_SPKI, 32),
    ] {
        for p in [prefix, &prefix[2..]] {
            if spki.len() == p.len() + len && spki.starts_with(p) {
                return Some((alg, spki[p.len()..].to_vec()));
            }
        }
    }
    None
}

/// Verifies `sig` over `msg` with a member's public key.
pub fn verify(
    alg: KeyAlg,
    public_key: &[u8],
    msg: &[u8],
    sig: &[u8],
) -> Result<(), SignatureError> {
    let alg: &dyn signature::VerificationAlgorithm = match alg {
        KeyAlg::EcdsaP256 => &signature::ECDSA_P256_SHA256_FIXED,
        KeyAlg::Ed25519 => &signature::ED25519,
    };
    signature::UnparsedPublicKey::new(alg, public_key)
        .verify(msg, sig)
        .map_err(|_| SignatureError::Bad)
}

// ---------------------------------------------------------------------------
// Wire
// ---------------------------------------------------------------------------

/// Major protocol version of [`proto::EnvelopeV2`].
pub const VERSION: u32 = 2;
/// Most counts in one increment batch or handoff, and blocks in one report.
pub const MAX_ITEMS: usize = 60_000;

/// An increment batch of `entries` (block, epoch, counts, signature).
pub fn encode_increments(
    epoch_ms: u64,
    entries: &[(Block, u64, Counts, Signature)],
) -> proto::IncrementBatch {
    let base_epoch = entries.iter().map(|e| e.1).min().unwrap_or(0);
    proto::IncrementBatch {
        epoch_ms,
        base_epoch,
        counts: entries
            .iter()
            .map(|(b, e, c, s)| signed_count(b, *e - base_epoch, c, s))
            .collect(),
    }
}

fn signed_count(b: &Block, offset: u64, c: &Counts, s: &Signature) -> proto::SignedCount {
    let (block, prefix_len) = block_to_wire(b);
    proto::SignedCount {
        block,
        prefix_len,
        epoch_offset: offset,
        connections: c.connections,
        messages: c.messages,
        recipients: c.recipients,
        signature: s.to_vec(),
    }
}

/// Why a v2 message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    EpochLength,
    Malformed,
    Signature,
}

/// Decodes an increment batch from `origin` and verifies every count with
/// the origin's key; one bad count refuses the whole batch (a certified
/// peer that sends bad signatures is misbehaving).
pub fn decode_increments(
    batch: &proto::IncrementBatch,
    epoch_ms: u64,
    network: &str,
    origin: &str,
    alg: KeyAlg,
    public_key: &[u8],
) -> Result<Vec<(Block, u64, Counts, Signature)>, DecodeError> {
    if batch.epoch_ms != epoch_ms {
        return Err(DecodeError::EpochLength);
    }
    if batch.counts.len() > MAX_ITEMS {
        return Err(DecodeError::Malformed);
    }
    batch
        .counts
        .iter()
        .map(|s| {
            let block = block_from_wire(&s.block, s.prefix_len).ok_or(DecodeError::Malformed)?;
            let epoch = batch
                .base_epoch
                .checked_add(s.epoch_offset)
                .ok_or(DecodeError::Malformed)?;
            let counts = Counts {
                connections: s.connections,
                messages: s.messages,
                recipients: s.recipients,
            };
            let sig: Signature = s
                .signature
                .as_slice()
                .try_into()
                .map_err(|_| DecodeError::Malformed)?;
            let msg = increment_message(network, origin, &block, epoch, &counts);
            verify(alg, public_key, &msg, &sig).map_err(|_| DecodeError::Signature)?;
            Ok((block, epoch, counts, sig))
        })
        .collect()
}

/// A signed report of an owner's hot blocks.
pub fn encode_report(
    owner: &str,
    epoch_ms: u64,
    epoch: u64,
    seq: u64,
    blocks: &[(Block, Window)],
    sig: &Signature,
) -> proto::HotReport {
    proto::HotReport {
        owner: owner.to_string(),
        epoch_ms,
        epoch,
        seq,
        blocks: blocks
            .iter()
            .map(|(b, w)| {
                let (block, prefix_len) = block_to_wire(b);
                proto::HotCount {
                    block,
                    prefix_len,
                    connections: w.counts.connections,
                    messages: w.counts.messages,
                    recipients: w.counts.recipients,
                    origins: w.origins,
                }
            })
            .collect(),
        signature: sig.to_vec(),
        certificate: Vec::new(),
    }
}

/// One hot block of a report as (block, window); None if the block is
/// malformed. The signature is not checked here (see [`decode_report`]).
pub fn hot_block_from_wire(h: &proto::HotCount) -> Option<(Block, Window)> {
    Some((
        block_from_wire(&h.block, h.prefix_len)?,
        Window {
            counts: Counts {
                connections: h.connections,
                messages: h.messages,
                recipients: h.recipients,
            },
            origins: h.origins,
        },
    ))
}

/// Decodes a hot report and verifies it with its owner's key (looked up by
/// the caller from `report.owner`'s certificate).
pub fn decode_report(
    report: &proto::HotReport,
    epoch_ms: u64,
    network: &str,
    alg: KeyAlg,
    public_key: &[u8],
) -> Result<Vec<(Block, Window)>, DecodeError> {
    if report.epoch_ms != epoch_ms {
        return Err(DecodeError::EpochLength);
    }
    if report.blocks.len() > MAX_ITEMS {
        return Err(DecodeError::Malformed);
    }
    let blocks = report
        .blocks
        .iter()
        .map(|h| hot_block_from_wire(h).ok_or(DecodeError::Malformed))
        .collect::<Result<Vec<_>, DecodeError>>()?;
    let msg = report_message(network, &report.owner, report.epoch, report.seq, &blocks);
    verify(alg, public_key, &msg, &report.signature).map_err(|_| DecodeError::Signature)?;
    Ok(blocks)
}

/// Decodes and checks a v2 envelope as [`super::wire::open`] does a v1
/// one: returns the claimed sender and the body.
pub fn open(
    bytes: &[u8],
    network: &str,
) -> Result<(String, proto::envelope_v2::Body), super::wire::Reject> {
    use super::wire::Reject;
    use prost::Message as _;
    let e = proto::EnvelopeV2::decode(bytes).map_err(|_| Reject::Decode)?;
    super::wire::check_envelope(e.network == network, e.version, VERSION, e.sender, e.body)
}

/// A v2 envelope from `sender` on `network`.
pub fn seal(network: &str, sender: &str, body: proto::envelope_v2::Body) -> proto::EnvelopeV2 {
    proto::EnvelopeV2 {
        network: network.to_string(),
        version: VERSION,
        minor: 0,
        sender: sender.to_string(),
        body: Some(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::wire;
    use proptest::prelude::*;
    use prost::Message as _;

    fn c(connections: u32, messages: u32, recipients: u32) -> Counts {
        Counts {
            connections,
            messages,
            recipients,
        }
    }

    fn w(n: u32, origins: u32) -> Window {
        Window {
            counts: c(n, n, n),
            origins,
        }
    }

    const LIMITS: Counts = Counts {
        connections: 120,
        messages: 120,
        recipients: 120,
    };

    fn block(i: u32) -> Block {
        Block(
            format!("10.{}.{}.0/24", (i >> 8) & 255, i & 255)
                .parse()
                .unwrap(),
        )
    }

    #[test]
    fn owners_are_stable_and_move_little() {
        let names: Vec<String> = (0..50).map(|i| format!("node-{i}")).collect();
        let members: Vec<(u64, usize)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (member_key(n), i))
            .collect();
        let b = block_key(&block(7));
        let o = owners(b, members.iter().copied(), 3);
        assert_eq!(o.len(), 3);
        // Any order of the member list gives the same owners.
        let rev = owners(b, members.iter().rev().copied(), 3);
        assert_eq!(o, rev);
        // Removing a non-owner changes nothing; removing an owner keeps
        // the other two and adds the fourth-ranked.
        let ranked = owners(b, members.iter().copied(), 4);
        let without: Vec<_> = members.iter().copied().filter(|m| m.1 != o[1]).collect();
        let o2 = owners(b, without.iter().copied(), 3);
        assert_eq!(o2, vec![o[0], o[2], ranked[3]]);
        let non_owner = (0..50).find(|i| !o.contains(i)).unwrap();
        let without: Vec<_> = members
            .iter()
            .copied()
            .filter(|m| m.1 != non_owner)
            .collect();
        assert_eq!(owners(b, without.iter().copied(), 3), o);
        // Fewer members than r: all of them.
        assert_eq!(owners(b, members[..2].iter().copied(), 3).len(), 2);
    }

    #[test]
    fn owners_spread_evenly() {
        let members: Vec<(u64, usize)> =
            (0..20).map(|i| (member_key(&format!("n{i}")), i)).collect();
        let mut load = [0usize; 20];
        for i in 0..6000 {
            for o in owners(block_key(&block(i)), members.iter().copied(), 3) {
                load[o] += 1;
            }
        }
        // 18,000 ownerships over 20 nodes: 900 each on average.
        for l in load {
            assert!((700..1100).contains(&l), "load {l}");
        }
    }

    #[test]
    fn median_ignores_one_liar_and_one_silent_owner() {
        assert_eq!(median(&[w(1200, 9), w(50, 3), w(48, 3)], 3), w(50, 3));
        assert_eq!(median(&[w(1200, 9), w(50, 3)], 3), w(50, 3));
        // One liar alone: the two silent owners count as zero.
        assert_eq!(median(&[w(1200, 9)], 3), w(0, 0));
        // An under-reporting liar: the two honest values still decide.
        assert_eq!(median(&[w(0, 0), w(130, 5), w(128, 5)], 3), w(128, 5));
        assert_eq!(median(&[], 3), w(0, 0));
        assert_eq!(median(&[w(5, 1)], 1), w(5, 1));
    }

    #[test]
    fn hot_at_the_fraction_of_any_limit() {
        assert!(!is_hot(&c(59, 0, 0), &LIMITS, 0.5));
        assert!(is_hot(&c(60, 0, 0), &LIMITS, 0.5));
        assert!(is_hot(&c(0, 0, 60), &LIMITS, 0.5));
        assert!(is_hot(&c(1, 0, 0), &c(1, 1, 1), 0.0));
    }

    #[test]
    fn decide_uses_own_sent_and_the_median_with_enough_origins() {
        // Own counts refuse by themselves.
        let r = decide(c(121, 0, 0), c(0, 0, 0), None, &LIMITS, 3).unwrap();
        assert_eq!((r.over, r.own), (Over::Connections, true));
        // What was sent counts as own.
        assert!(decide(c(0, 0, 0), c(0, 121, 0), None, &LIMITS, 3).is_some());
        // The median passes the limit with enough origins: refused.
        let r = decide(c(3, 0, 0), c(3, 0, 0), Some(w(121, 4)), &LIMITS, 3).unwrap();
        assert!(!r.own);
        // Too few origins: remote counts do not refuse.
        assert_eq!(
            decide(c(3, 0, 0), c(3, 0, 0), Some(w(121, 2)), &LIMITS, 3),
            None
        );
        // At the limit is not over it.
        assert_eq!(
            decide(c(0, 0, 0), c(0, 0, 0), Some(w(120, 9)), &LIMITS, 3),
            None
        );
        // A stale median below own: own decides (max).
        assert_eq!(
            decide(c(100, 0, 0), c(0, 0, 0), Some(w(40, 9)), &LIMITS, 3),
            None
        );
        // Own + a lagging median: max, never sum (own is in the median).
        assert_eq!(
            decide(c(100, 0, 0), c(0, 0, 0), Some(w(110, 9)), &LIMITS, 3),
            None
        );
    }

    #[test]
    fn one_liar_cannot_throttle_a_victim_anywhere() {
        // 1,000 nodes in one membership; a victim block with a true count
        // of 10 (from 5 origins); one of its owners reports 100 times that.
        let members: Vec<(u64, u32)> = (0..1000u32)
            .map(|i| (member_key(&format!("n{i}")), i))
            .collect();
        let victim = block(99);
        let own = owners(block_key(&victim), members.iter().copied(), 3);
        let liar = own[0];
        let mut view: HotView<Block, u32> = HotView::new(1000, 3);
        view.merge(
            victim,
            Report {
                owner: liar,
                seq: 1,
                epoch: 10,
                window: w(1000, 5),
            },
        );
        // The honest owners do not even broadcast (not hot), or do.
        for (k, honest_broadcasts) in [false, true].into_iter().enumerate() {
            if honest_broadcasts {
                for o in &own[1..] {
                    view.merge(
                        victim,
                        Report {
                            owner: *o,
                            seq: 1 + k as u64,
                            epoch: 10,
                            window: w(10, 5),
                        },
                    );
                }
            }
            let hot = view.value(&victim, &own, 0);
            for n in 0..1000u32 {
                let mine = if own.contains(&n) {
                    c(2, 2, 2)
                } else {
                    c(0, 0, 0)
                };
                assert_eq!(decide(mine, mine, hot, &LIMITS, 3), None, "node {n}");
            }
        }
        // A non-owner's report is ignored, however high.
        view.merge(
            victim,
            Report {
                owner: 999_999,
                seq: 1,
                epoch: 10,
                window: w(5000, 50),
            },
        );
        assert!(view.value(&victim, &own, 0).unwrap().counts.connections <= 10);
    }

    #[test]
    fn table_merges_by_max_and_caps_each_origin() {
        let mut t: OwnerTable<u32, u32, ()> = OwnerTable::new(10);
        assert_eq!(t.merge(1, 7, 100, c(3, 1, 1), ()), Merge::New);
        assert_eq!(t.merge(1, 7, 100, c(2, 1, 1), ()), Merge::Unchanged);
        assert_eq!(t.merge(1, 7, 100, c(5, 2, 2), ()), Merge::Grew);
        assert_eq!(t.merge(1, 7, 100, c(5, 2, 2), ()), Merge::Unchanged);
        t.merge(1, 8, 100, c(100, 0, 0), ());
        t.merge(1, 7, 99, c(1, 0, 0), ());
        let cap = c(60, 60, 60);
        assert_eq!(
            t.window(&1, 99, &cap),
            Window {
                counts: c(66, 2, 2),
                origins: 2
            }
        );
        assert_eq!(t.window(&1, 100, &cap).counts.connections, 65);
        t.prune(100);
        assert_eq!(t.len(), 2);
        assert_eq!(t.window(&2, 0, &cap), Window::default());
        // Bounded: new counts past max_entries are dropped, old ones grow.
        for o in 0..20 {
            t.merge(3, o, 100, c(1, 1, 1), ());
        }
        assert_eq!(t.len(), 10);
        assert_eq!(t.merge(4, 1, 100, c(1, 1, 1), ()), Merge::Full);
        assert_eq!(t.merge(1, 8, 100, c(101, 0, 0), ()), Merge::Grew);
        t.remove(&3);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn outbox_sends_changes_once_and_remembers_them() {
        let mut o: Outbox<u32> = Outbox::new(2);
        assert!(o.note(1, 10, c(1, 0, 0)));
        assert!(o.note(1, 10, c(2, 0, 0)));
        assert!(o.note(2, 10, c(1, 0, 0)));
        assert!(!o.note(3, 10, c(1, 0, 0)));
        let mut sent = o.take();
        sent.sort_by_key(|s| s.0);
        assert_eq!(sent, vec![(1, 10, c(2, 0, 0)), (2, 10, c(1, 0, 0))]);
        assert!(o.take().is_empty());
        o.note(1, 11, c(4, 0, 0));
        o.take();
        assert_eq!(o.sent(1, 10, 11), c(6, 0, 0));
        o.prune(11);
        assert_eq!(o.sent(1, 10, 11), c(4, 0, 0));
    }

    #[test]
    fn hot_view_keeps_the_newest_report_per_owner() {
        let mut v: HotView<u32, u32> = HotView::new(1, 3);
        let r = |owner, seq, epoch, n| Report {
            owner,
            seq,
            epoch,
            window: w(n, 3),
        };
        assert!(v.merge(1, r(1, 2, 10, 70)));
        assert!(!v.merge(1, r(1, 1, 10, 90)));
        assert!(!v.merge(1, r(1, 2, 10, 90)));
        assert!(v.merge(1, r(1, 3, 10, 80)));
        assert!(v.merge(1, r(2, 1, 10, 80)));
        assert!(v.merge(1, r(3, 1, 10, 80)));
        // A fourth owner (membership changed) replaces the oldest report.
        assert!(v.merge(1, r(4, 1, 11, 85)));
        assert_eq!(v.value(&1, &[2, 3, 4], 0).unwrap().counts.connections, 80);
        assert_eq!(v.value(&1, &[2, 3, 4], 11).unwrap().counts.connections, 0);
        // Bounded number of blocks.
        assert!(!v.merge(2, r(1, 1, 10, 80)));
        v.prune(11);
        assert_eq!(v.len(), 1);
        v.prune(12);
        assert!(v.is_empty());
    }

    fn ecdsa() -> Signer {
        let rng = SystemRandom::new();
        let der = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        Signer::from_pkcs8(KeyAlg::EcdsaP256, der.as_ref()).unwrap()
    }

    fn ed25519() -> Signer {
        let der = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Signer::from_pkcs8(KeyAlg::Ed25519, der.as_ref()).unwrap()
    }

    #[test]
    fn a_relay_cannot_forge_an_origins_counts() {
        for signer in [ecdsa(), ed25519()] {
            let b = block(3);
            let counts = c(7, 2, 4);
            let msg = increment_message("net", "origin-a", &b, 500, &counts);
            let sig = signer.sign(&msg).unwrap();
            let pk = signer.public_key().to_vec();
            assert_eq!(verify(signer.alg(), &pk, &msg, &sig), Ok(()));
            // Any change of what was signed fails: counts, block, epoch,
            // origin (a relay claiming the counts under another name),
            // network.
            for bad in [
                increment_message("net", "origin-a", &b, 500, &c(70, 2, 4)),
                increment_message("net", "origin-a", &block(4), 500, &counts),
                increment_message("net", "origin-a", &b, 501, &counts),
                increment_message("net", "origin-b", &b, 500, &counts),
                increment_message("other", "origin-a", &b, 500, &counts),
            ] {
                assert_eq!(
                    verify(signer.alg(), &pk, &bad, &sig),
                    Err(SignatureError::Bad)
                );
            }
            // Another node's key does not verify it.
            let other = ed25519();
            assert!(verify(other.alg(), other.public_key(), &msg, &sig).is_err());
            // An increment signature is not a report signature.
            let rep = report_message("net", "origin-a", 500, 1, &[]);
            assert!(verify(signer.alg(), &pk, &rep, &sig).is_err());
        }
        assert_eq!(
            Signer::from_pkcs8(KeyAlg::EcdsaP256, b"junk").err(),
            Some(SignatureError::Key)
        );
    }

    #[test]
    fn increments_and_reports_roundtrip_through_the_v2_envelope() {
        let signer = ecdsa();
        let pk = signer.public_key().to_vec();
        let entries: Vec<(Block, u64, Counts, Signature)> = (0..5)
            .map(|i| {
                let b = block(i);
                let cnt = c(i + 1, 1, 2);
                let sig = signer
                    .sign(&increment_message("net", "a", &b, 100 + i as u64, &cnt))
                    .unwrap();
                (b, 100 + i as u64, cnt, sig)
            })
            .collect();
        let batch = encode_increments(60_000, &entries);
        let env = seal(
            "net",
            "a",
            proto::envelope_v2::Body::Increments(batch.clone()),
        );
        let bytes = env.encode_to_vec();
        let back = proto::EnvelopeV2::decode(bytes.as_slice()).unwrap();
        let Some(proto::envelope_v2::Body::Increments(b2)) = back.body else {
            panic!("not increments")
        };
        let got = decode_increments(&b2, 60_000, "net", "a", signer.alg(), &pk).unwrap();
        assert_eq!(got, entries);
        // Under another origin's name: refused.
        assert_eq!(
            decode_increments(&b2, 60_000, "net", "b", signer.alg(), &pk),
            Err(DecodeError::Signature)
        );
        assert_eq!(
            decode_increments(&b2, 1000, "net", "a", signer.alg(), &pk),
            Err(DecodeError::EpochLength)
        );
        // A tampered count: refused.
        let mut bad = b2.clone();
        bad.counts[2].connections += 100;
        assert_eq!(
            decode_increments(&bad, 60_000, "net", "a", signer.alg(), &pk),
            Err(DecodeError::Signature)
        );

        let blocks = vec![(block(1), w(70, 4)), (block(2), w(130, 9))];
        let sig = signer
            .sign(&report_message("net", "a", 100, 7, &blocks))
            .unwrap();
        let rep = encode_report("a", 60_000, 100, 7, &blocks, &sig);
        assert_eq!(
            decode_report(&rep, 60_000, "net", signer.alg(), &pk).unwrap(),
            blocks
        );
        let mut lie = rep.clone();
        lie.blocks[0].connections = 7000;
        assert_eq!(
            decode_report(&lie, 60_000, "net", signer.alg(), &pk),
            Err(DecodeError::Signature)
        );
    }

    #[test]
    fn versions_refuse_each_other_cleanly() {
        // A v2 packet read by a v1 node: header decodes, version 2, dropped.
        let v2 = seal("net", "a", proto::envelope_v2::Body::Swim(vec![1, 2]));
        assert_eq!(
            wire::open(&v2.encode_to_vec(), "net"),
            Err(wire::Reject::Version)
        );
        // A v1 packet read by a v2 node: version 1 in the same header.
        let v1 = wire::encode(&wire::seal("net", "a", wire::Body::Swim(vec![1, 2])));
        let e = proto::EnvelopeV2::decode(v1.as_slice()).unwrap();
        assert_eq!((e.network.as_str(), e.version), ("net", 1));
        assert_ne!(e.version, VERSION);
    }

    fn counts() -> impl Strategy<Value = Counts> {
        (0u32..50, 0u32..50, 0u32..50).prop_map(|(a, b, x)| c(a, b, x))
    }

    type Op = (u8, u8, u8, Counts);

    fn apply(ops: &[Op]) -> OwnerTable<u8, u8, ()> {
        let mut t = OwnerTable::new(usize::MAX);
        for (b, o, e, cnt) in ops {
            t.merge(*b, *o, *e as u64, *cnt, ());
        }
        t
    }

    type Flat = (u8, u8, u64, (u64, u32, u32, u32));

    fn state(t: &OwnerTable<u8, u8, ()>) -> Vec<Flat> {
        let mut v: Vec<_> = t
            .blocks()
            .flat_map(|b| {
                t.slots(b)
                    .iter()
                    .map(move |s| (*b, s.origin, s.epoch, merge_order(&s.counts)))
            })
            .collect();
        v.sort_unstable();
        v
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec((0u8..3, 0u8..4, 0u8..3, counts()), 0..40)
    }

    proptest! {
        /// The table's merge is a semilattice: the state after any order of
        /// the same messages, with duplicates, is the same.
        #[test]
        fn merge_is_commutative_associative_idempotent(a in ops(), b in ops(), seed in any::<u64>()) {
            let mut ab = a.clone();
            ab.extend(b.iter().cloned());
            let mut ba = b.clone();
            ba.extend(a.iter().cloned());
            prop_assert_eq!(state(&apply(&ab)), state(&apply(&ba)));
            // Duplicated and shuffled.
            let mut dup = ab.clone();
            dup.extend(ab.iter().cloned());
            let n = dup.len();
            if n > 1 {
                let mut s = seed;
                for i in (1..n).rev() {
                    s = mix(s);
                    dup.swap(i, (s % (i as u64 + 1)) as usize);
                }
            }
            prop_assert_eq!(state(&apply(&dup)), state(&apply(&ab)));
            // Merging a table into itself changes nothing.
            let t = apply(&ab);
            let mut t2 = t.clone();
            for blk in t.blocks() {
                for s in t.slots(blk) {
                    prop_assert_eq!(t2.merge(*blk, s.origin, s.epoch, s.counts, ()), Merge::Unchanged);
                }
            }
        }

        /// The window sum never exceeds the number of origins times the cap
        /// and only grows with merges of honest values (an origin's counts
        /// grow in every field together).
        #[test]
        fn window_is_monotone_and_capped(a in ops(), more in ops()) {
            let honest = |v: Vec<Op>| -> Vec<Op> {
                v.into_iter().map(|(b, o, e, x)| (b, o, e, c(x.connections, x.connections / 2, x.connections * 2))).collect()
            };
            let (a, more) = (honest(a), honest(more));
            let cap = c(20, 20, 20);
            let t = apply(&a);
            let mut all = a.clone();
            all.extend(more);
            let t2 = apply(&all);
            for blk in 0u8..3 {
                let w1 = t.window(&blk, 0, &cap);
                let w2 = t2.window(&blk, 0, &cap);
                prop_assert!(w2.counts.connections >= w1.counts.connections);
                prop_assert!(w2.origins >= w1.origins);
                prop_assert!(w2.counts.connections <= w2.origins * 20);
            }
        }

        /// One liar cannot throttle: whatever one owner reports (here up to
        /// 100 times the truth, or nothing), if the honest owners' values
        /// are under the limit, the median is too, and no node refuses a
        /// block whose own counts are under the limit.
        #[test]
        fn one_lying_owner_never_makes_the_median_cross(
            truth in 0u32..=120,
            lag in proptest::collection::vec(0u32..=10, 2),
            factor in 1u32..=100,
            silent in any::<bool>(),
            liar_pos in 0usize..3,
            own in 0u32..=120,
            origins in 0u32..20,
        ) {
            // Honest owners report the truth or a little less (they lag).
            let mut reports: Vec<Window> = lag
                .iter()
                .map(|l| w(truth.saturating_sub(*l), origins))
                .collect();
            if !silent {
                reports.insert(liar_pos.min(reports.len()), w(truth.saturating_mul(factor).max(121 * factor), 1000));
            }
            let m = median(&reports, 3);
            prop_assert!(m.counts.connections <= truth);
            prop_assert!(m.origins <= origins);
            let mine = c(own.min(truth), 0, 0);
            prop_assert_eq!(decide(mine, mine, Some(m), &LIMITS, 1), None);
        }

        /// And a real flood is still seen: two honest owners at the truth,
        /// whatever the liar says (including zero).
        #[test]
        fn one_liar_cannot_hide_a_flood(truth in 121u32..2000, liar in 0u32..5000, pos in 0usize..3) {
            let mut reports = vec![w(truth, 10), w(truth, 10)];
            reports.insert(pos, w(liar, 0));
            let m = median(&reports, 3);
            prop_assert_eq!(m, w(truth, 10));
            prop_assert!(decide(c(0, 0, 0), c(0, 0, 0), Some(m), &LIMITS, 3).is_some());
        }

        /// Owners depend only on the member set, not on its order.
        #[test]
        fn owners_ignore_member_order(n in 1usize..60, blk in any::<u32>(), rot in 0usize..60) {
            let members: Vec<(u64, usize)> = (0..n).map(|i| (member_key(&format!("m{i}")), i)).collect();
            let mut rotated = members.clone();
            rotated.rotate_left(rot % n);
            let b = block_key(&block(blk));
            prop_assert_eq!(owners(b, members, 3), owners(b, rotated, 3));
        }
    }

    #[test]
    fn a_certificates_key_is_the_key_its_signer_signs_with() {
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ED25519] {
            let kp = rcgen::KeyPair::generate_for(alg).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["n1".to_string()])
                .unwrap()
                .self_signed(&kp)
                .unwrap();
            let (kind, key) = public_key_of_cert(cert.der()).expect("a key");
            let signer = Signer::from_pkcs8(kind, &kp.serialize_der()).unwrap();
            assert_eq!(key, signer.public_key());
            let sig = signer.sign(b"m").unwrap();
            assert!(verify(kind, &key, b"m", &sig).is_ok());
            assert!(verify(kind, &key, b"n", &sig).is_err());
        }
        assert!(public_key_of_cert(b"not a certificate").is_none());
    }
}
