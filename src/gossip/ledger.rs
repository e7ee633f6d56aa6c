//! The sans-IO core of count gossip: what this node knows of every
//! (origin, block, epoch) count, which changes it still has to push, and the
//! digests that let two nodes find and repair their differences.
//!
//! * **Merge** is the field-wise maximum per (origin, block, epoch), like
//!   [`crate::throttle::Throttle::merge`]: idempotent, commutative and
//!   associative, so duplicates, reordering and re-sends are harmless.
//! * **Delta selection**: a key whose value grows (a count of this node, or
//!   one learned from a peer) becomes *hot* for `rounds` push rounds
//!   (about log2(N) + 1); [`Ledger::take_round`] hands out the hot keys with
//!   their current value, so forwarding is epidemic and state-based.
//!   [`Ledger::take_fresh`] hands out only the keys not pushed since they
//!   last changed (their first round): the live node calls it several times
//!   per interval, so news crosses each hop in a fraction of an interval
//!   while the later rounds keep the interval's pace.
//! * **Digests**: every (origin, epoch) group has an order-independent hash
//!   (wrapping sum of a 64-bit hash per (block, counts)) and an entry count,
//!   kept up to date on every change. Anti-entropy compares, over an epoch
//!   range chosen by the initiator, first one summary per origin, then the
//!   groups of the origins that differ, then exchanges the counts of the
//!   groups that differ (four legs: summary, epoch digest, repair, reply).
//!   The first leg costs one entry per origin, so repair traffic stays small
//!   when almost everything agrees.
//! * Expired epochs are pruned and never travel or come back.
//!
//! Everything here is a pure function over values and the prost message
//! types; the live node and the simulation in `bench/gossip_sim.rs` run the
//! same code.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Bound::{Excluded, Included, Unbounded};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::wire::{block_from_wire, block_to_wire, proto};
use crate::throttle::{Block, Counts};

/// Index of an origin name in one [`Ledger`] (not shared between nodes).
pub type OriginId = u32;

/// Most entries in one batch: keeps an encoded batch well under
/// [`super::wire::MAX_MESSAGE`] even with IPv6 blocks and large numbers.
pub const MAX_BATCH_ENTRIES: usize = 60_000;
/// Most origins or groups accepted in one digest.
const MAX_DIGEST_ITEMS: usize = 1_000_000;
/// Widest epoch range accepted in a digest.
const MAX_EPOCH_RANGE: u64 = 100_000;

/// The key of one count. Ordered by origin, then epoch, then block, so that
/// an (origin, epoch) group is a contiguous range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub origin: OriginId,
    pub epoch: u64,
    pub block: Block,
}

/// Hash and size of a group of counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupHash {
    pub entries: u32,
    pub hash: u64,
}

impl GroupHash {
    fn add(&mut self, h: u64) {
        self.entries = self.entries.wrapping_add(1);
        self.hash = self.hash.wrapping_add(h);
    }

    fn remove(&mut self, h: u64) {
        self.entries = self.entries.wrapping_sub(1);
        self.hash = self.hash.wrapping_sub(h);
    }

    fn to_wire(self) -> proto::GroupHash {
        proto::GroupHash {
            entries: self.entries,
            hash: self.hash,
        }
    }

    fn from_wire(g: Option<&proto::GroupHash>) -> GroupHash {
        g.map(|g| GroupHash {
            entries: g.entries,
            hash: g.hash,
        })
        .unwrap_or_default()
    }
}

/// One count decoded from a batch; `origin` indexes the batch's origin table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Update {
    pub origin: usize,
    pub block: Block,
    pub epoch: u64,
    pub counts: Counts,
}

/// Why a whole message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchError {
    /// The sender numbers epochs with another epoch length.
    EpochLength,
    /// Inconsistent tables, out-of-range indexes, oversized lists.
    Malformed,
}

impl BatchError {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchError::EpochLength => "epoch_length",
            BatchError::Malformed => "malformed",
        }
    }
}

/// Number of push rounds a change stays hot in a network of `members`
/// nodes: ceil(log2(members)) + 1.
pub fn rounds_for(members: usize) -> u8 {
    let log = if members <= 1 {
        0
    } else {
        (members - 1).ilog2() + 1
    };
    (log + 1).min(u8::MAX as u32) as u8
}

/// splitmix64's finaliser: a fast, well-mixed, platform-independent hash step.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hash of one (block, counts) inside a group. Stable across builds and
/// platforms (no `std` hasher), since nodes compare them.
pub fn entry_hash(block: &Block, c: &Counts) -> u64 {
    let mut h = match block.0 {
        IpNet::V4(n) => mix(u32::from(n.network()) as u64 ^ ((n.prefix_len() as u64) << 32)),
        IpNet::V6(n) => {
            let a = u128::from(n.network());
            mix(mix((a >> 64) as u64) ^ (a as u64) ^ ((n.prefix_len() as u64) << 56) ^ 1)
        }
    };
    h = mix(h ^ c.connections as u64);
    h = mix(h ^ (((c.messages as u64) << 32) | c.recipients as u64));
    h
}

/// Hash contribution of one (epoch, group) to an origin's summary.
fn epoch_hash(epoch: u64, g: GroupHash) -> u64 {
    mix(g.hash ^ mix(epoch ^ ((g.entries as u64) << 40)))
}

const LOWEST_BLOCK: Block = Block(IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0)));
const HIGHEST_BLOCK: Block = Block(IpNet::V6(Ipv6Net::new_assert(
    Ipv6Addr::new(
        0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff,
    ),
    128,
)));

/// What this node knows and still has to tell. See the module docs.
#[derive(Debug, Clone)]
pub struct Ledger {
    names: Vec<String>,
    ids: HashMap<String, OriginId>,
    counts: BTreeMap<Key, Counts>,
    groups: BTreeMap<(OriginId, u64), GroupHash>,
    /// Keys to push, with the rounds left.
    hot: BTreeMap<Key, u8>,
    /// Hot keys not pushed since their last change.
    fresh: BTreeSet<Key>,
    /// Where the previous round stopped when it hit its size cap.
    cursor: Option<Key>,
    rounds: u8,
    /// Epochs below this were pruned and are ignored from now on.
    first_epoch: u64,
}

/// Builds a [`proto::CountBatch`] with its origin table.
struct BatchBuilder<'a> {
    ledger: &'a Ledger,
    batch: proto::CountBatch,
    index: HashMap<OriginId, u32>,
    by_name: HashMap<String, u32>,
}

impl<'a> BatchBuilder<'a> {
    fn new(ledger: &'a Ledger, epoch_ms: u64, base_epoch: u64) -> Self {
        BatchBuilder {
            ledger,
            batch: proto::CountBatch {
                epoch_ms,
                base_epoch,
                origins: Vec::new(),
                entries: Vec::new(),
                suspects: Vec::new(),
                greylist: Vec::new(),
                greylist_pools: Vec::new(),
                verify: Vec::new(),
                verify_domains: Vec::new(),
            },
            index: HashMap::new(),
            by_name: HashMap::new(),
        }
    }

    fn origin_index_by_name(&mut self, name: &str) -> u32 {
        if let Some(i) = self.by_name.get(name) {
            return *i;
        }
        let i = self.batch.origins.len() as u32;
        self.batch.origins.push(name.to_string());
        self.by_name.insert(name.to_string(), i);
        i
    }

    fn origin_index(&mut self, origin: OriginId) -> u32 {
        if let Some(i) = self.index.get(&origin) {
            return *i;
        }
        let name = self
            .ledger
            .origin_name(origin)
            .unwrap_or_default()
            .to_string();
        let i = self.origin_index_by_name(&name);
        self.index.insert(origin, i);
        i
    }

    fn push(&mut self, key: &Key, c: &Counts) {
        let origin = self.origin_index(key.origin);
        let (block, prefix_len) = block_to_wire(&key.block);
        self.batch.entries.push(proto::CountEntry {
            origin,
            block,
            prefix_len,
            epoch_offset: key.epoch - self.batch.base_epoch,
            connections: c.connections,
            messages: c.messages,
            recipients: c.recipients,
        });
    }

    fn full(&self) -> bool {
        self.batch.entries.len() >= MAX_BATCH_ENTRIES
    }
}

/// Decodes the counts of a batch. Entries with a bad block, origin index or
/// epoch are skipped and counted (second value); a batch with another epoch
/// length or too many entries is refused as a whole.
pub fn decode_batch(
    batch: &proto::CountBatch,
    epoch_ms: u64,
) -> Result<(Vec<Update>, usize), BatchError> {
    if batch.epoch_ms != epoch_ms {
        return Err(BatchError::EpochLength);
    }
    if batch.entries.len() > MAX_BATCH_ENTRIES || batch.origins.len() > MAX_DIGEST_ITEMS {
        return Err(BatchError::Malformed);
    }
    let mut out = Vec::with_capacity(batch.entries.len());
    let mut invalid = 0;
    for e in &batch.entries {
        let origin = e.origin as usize;
        let block = block_from_wire(&e.block, e.prefix_len);
        let epoch = batch.base_epoch.checked_add(e.epoch_offset);
        match (origin < batch.origins.len(), block, epoch) {
            (true, Some(block), Some(epoch)) => out.push(Update {
                origin,
                block,
                epoch,
                counts: Counts {
                    connections: e.connections,
                    messages: e.messages,
                    recipients: e.recipients,
                },
            }),
            _ => invalid += 1,
        }
    }
    Ok((out, invalid))
}

fn check_range(first: u64, last: u64) -> Result<(), BatchError> {
    if last < first || last - first > MAX_EPOCH_RANGE {
        return Err(BatchError::Malformed);
    }
    Ok(())
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger::new(1)
    }
}

impl Ledger {
    /// An empty ledger whose changes stay hot for `rounds` push rounds.
    pub fn new(rounds: u8) -> Ledger {
        Ledger {
            names: Vec::new(),
            ids: HashMap::new(),
            counts: BTreeMap::new(),
            groups: BTreeMap::new(),
            hot: BTreeMap::new(),
            fresh: BTreeSet::new(),
            cursor: None,
            rounds: rounds.max(1),
            first_epoch: 0,
        }
    }

    pub fn set_rounds(&mut self, rounds: u8) {
        self.rounds = rounds.max(1);
    }

    pub fn rounds(&self) -> u8 {
        self.rounds
    }

    /// The id of an origin name, registering it if new.
    pub fn intern(&mut self, name: &str) -> OriginId {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = self.names.len() as OriginId;
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        id
    }

    pub fn origin_id(&self, name: &str) -> Option<OriginId> {
        self.ids.get(name).copied()
    }

    pub fn origin_name(&self, id: OriginId) -> Option<&str> {
        self.names.get(id as usize).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Keys still to be pushed.
    pub fn hot_len(&self) -> usize {
        self.hot.len()
    }

    pub fn get(&self, key: &Key) -> Option<Counts> {
        self.counts.get(key).copied()
    }

    /// Every count, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (Key, Counts)> + '_ {
        self.counts.iter().map(|(k, c)| (*k, *c))
    }

    /// Merges one observation (field-wise maximum). If the stored value
    /// grew, the key becomes hot for `rounds` rounds and the previous value
    /// (zero if none) is returned; otherwise None. Zero counts and pruned
    /// epochs are ignored.
    pub fn observe(&mut self, key: Key, counts: Counts) -> Option<Counts> {
        if key.epoch < self.first_epoch || counts.is_zero() {
            return None;
        }
        let old = self.counts.get(&key).copied();
        let new = old.unwrap_or_default().max(counts);
        if old == Some(new) {
            return None;
        }
        let g = self.groups.entry((key.origin, key.epoch)).or_default();
        if let Some(o) = old {
            g.remove(entry_hash(&key.block, &o));
        }
        g.add(entry_hash(&key.block, &new));
        self.counts.insert(key, new);
        self.hot.insert(key, self.rounds);
        self.fresh.insert(key);
        Some(old.unwrap_or_default())
    }

    /// Forgets every epoch below `first_epoch` (they left the window).
    pub fn prune(&mut self, first_epoch: u64) {
        if first_epoch <= self.first_epoch {
            return;
        }
        self.first_epoch = first_epoch;
        self.counts.retain(|k, _| k.epoch >= first_epoch);
        self.groups.retain(|(_, e), _| *e >= first_epoch);
        self.hot.retain(|k, _| k.epoch >= first_epoch);
        self.fresh.retain(|k| k.epoch >= first_epoch);
        if self.cursor.is_some_and(|c| c.epoch < first_epoch) {
            self.cursor = None;
        }
    }

    /// The counts to push this round: at most `max` hot keys with their
    /// current value; each one's rounds left goes down by one. When the cap
    /// cuts a round short, the next round continues after the last key.
    pub fn take_round(&mut self, max: usize) -> Vec<(Key, Counts)> {
        let keys: Vec<Key> = match self.cursor {
            Some(c) => self
                .hot
                .range((Excluded(c), Unbounded))
                .chain(self.hot.range((Unbounded, Included(c))))
                .map(|(k, _)| *k)
                .take(max)
                .collect(),
            None => self.hot.keys().take(max).copied().collect(),
        };
        self.cursor = if keys.len() == max {
            keys.last().copied()
        } else {
            None
        };
        self.hand_out(keys)
    }

    /// The hot keys not pushed since they last changed (at most `max`),
    /// with their current value; this is their first round.
    pub fn take_fresh(&mut self, max: usize) -> Vec<(Key, Counts)> {
        let keys: Vec<Key> = self.fresh.iter().take(max).copied().collect();
        self.hand_out(keys)
    }

    /// Keys still waiting for their first push.
    pub fn fresh_len(&self) -> usize {
        self.fresh.len()
    }

    fn hand_out(&mut self, keys: Vec<Key>) -> Vec<(Key, Counts)> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            self.fresh.remove(&k);
            if let Some(left) = self.hot.get_mut(&k) {
                *left -= 1;
                if *left == 0 {
                    self.hot.remove(&k);
                }
            }
            if let Some(c) = self.get(&k) {
                out.push((k, c));
            }
        }
        out
    }

    /// A batch of the given counts (the base epoch is their lowest).
    pub fn encode_batch(&self, entries: &[(Key, Counts)], epoch_ms: u64) -> proto::CountBatch {
        let base = entries.iter().map(|(k, _)| k.epoch).min().unwrap_or(0);
        let mut b = BatchBuilder::new(self, epoch_ms, base);
        for (k, c) in entries {
            b.push(k, c);
        }
        b.batch
    }

    /// Merges a batch (interning its origins). Returns the number of keys
    /// that grew, or the reason the batch was refused.
    pub fn merge_batch(
        &mut self,
        batch: &proto::CountBatch,
        epoch_ms: u64,
    ) -> Result<usize, BatchError> {
        let (updates, _) = decode_batch(batch, epoch_ms)?;
        let ids: Vec<OriginId> = batch.origins.iter().map(|n| self.intern(n)).collect();
        let mut grown = 0;
        for u in updates {
            let key = Key {
                origin: ids[u.origin],
                epoch: u.epoch,
                block: u.block,
            };
            if self.observe(key, u.counts).is_some() {
                grown += 1;
            }
        }
        Ok(grown)
    }

    fn group_entries(
        &self,
        origin: OriginId,
        epoch: u64,
    ) -> impl Iterator<Item = (Key, Counts)> + '_ {
        let lo = Key {
            origin,
            epoch,
            block: LOWEST_BLOCK,
        };
        let hi = Key {
            origin,
            epoch,
            block: HIGHEST_BLOCK,
        };
        self.counts
            .range((Included(lo), Included(hi)))
            .map(|(k, c)| (*k, *c))
    }

    fn groups_of(
        &self,
        origin: OriginId,
        first: u64,
        last: u64,
    ) -> impl Iterator<Item = (u64, GroupHash)> + '_ {
        self.groups
            .range((Included((origin, first)), Included((origin, last))))
            .filter(|(_, g)| g.entries > 0)
            .map(|((_, e), g)| (*e, *g))
    }

    /// Per origin, the combined hash of its groups with `first <= epoch <= last`.
    fn origin_summaries(&self, first: u64, last: u64) -> BTreeMap<OriginId, GroupHash> {
        let mut out: BTreeMap<OriginId, GroupHash> = BTreeMap::new();
        for ((o, e), g) in &self.groups {
            let g = *g;
            if *e < first || *e > last || g.entries == 0 {
                continue;
            }
            let s = out.entry(*o).or_default();
            s.entries = s.entries.wrapping_add(g.entries);
            s.hash = s.hash.wrapping_add(epoch_hash(*e, g));
        }
        out
    }

    /// Anti-entropy leg 1: one summary per origin over `first..=last`.
    pub fn summary(&self, first: u64, last: u64, epoch_ms: u64) -> proto::Summary {
        let mut s = proto::Summary {
            epoch_ms,
            first_epoch: first,
            last_epoch: last,
            origins: Vec::new(),
            hashes: Vec::new(),
        };
        for (o, g) in self.origin_summaries(first, last) {
            s.origins
                .push(self.origin_name(o).unwrap_or_default().to_string());
            s.hashes.push(g.to_wire());
        }
        s
    }

    /// Anti-entropy leg 2: the origins whose summary differs from ours, with
    /// our hash of each of their non-empty epochs in the range.
    pub fn answer_summary(
        &self,
        s: &proto::Summary,
        epoch_ms: u64,
    ) -> Result<proto::EpochDigest, BatchError> {
        if s.epoch_ms != epoch_ms {
            return Err(BatchError::EpochLength);
        }
        check_range(s.first_epoch, s.last_epoch)?;
        if s.origins.len() != s.hashes.len() || s.origins.len() > MAX_DIGEST_ITEMS {
            return Err(BatchError::Malformed);
        }
        let (first, last) = (s.first_epoch, s.last_epoch);
        let local = self.origin_summaries(first, last);
        let mut remote: HashMap<&str, GroupHash> = HashMap::new();
        for (name, h) in s.origins.iter().zip(&s.hashes) {
            remote.insert(name.as_str(), GroupHash::from_wire(Some(h)));
        }
        let mut differing: BTreeSet<&str> = BTreeSet::new();
        for (name, rh) in &remote {
            let lh = self
                .origin_id(name)
                .and_then(|id| local.get(&id).copied())
                .unwrap_or_default();
            if lh != *rh {
                differing.insert(name);
            }
        }
        for id in local.keys() {
            let name = self.origin_name(*id).unwrap_or_default();
            if !remote.contains_key(name) {
                differing.insert(name);
            }
        }
        let mut d = proto::EpochDigest {
            first_epoch: first,
            last_epoch: last,
            origins: Vec::new(),
            groups: Vec::new(),
        };
        for name in differing {
            let idx = d.origins.len() as u32;
            d.origins.push(name.to_string());
            if let Some(id) = self.origin_id(name) {
                for (e, g) in self.groups_of(id, first, last) {
                    d.groups.push(proto::EpochGroup {
                        origin: idx,
                        epoch_offset: e - first,
                        hash: Some(g.to_wire()),
                    });
                }
            }
        }
        Ok(d)
    }

    /// The (origin name, epoch) groups where our counts differ from the
    /// peer's epoch digest, each with whether we / the peer have any counts.
    pub fn differing_groups(
        &self,
        d: &proto::EpochDigest,
    ) -> Result<Vec<(String, u64, bool, bool)>, BatchError> {
        check_range(d.first_epoch, d.last_epoch)?;
        if d.origins.len() > MAX_DIGEST_ITEMS || d.groups.len() > MAX_DIGEST_ITEMS {
            return Err(BatchError::Malformed);
        }
        let (first, last) = (d.first_epoch, d.last_epoch);
        let mut remote: BTreeMap<(usize, u64), GroupHash> = BTreeMap::new();
        for g in &d.groups {
            let o = g.origin as usize;
            if o >= d.origins.len() || g.epoch_offset > last - first {
                return Err(BatchError::Malformed);
            }
            remote.insert(
                (o, first + g.epoch_offset),
                GroupHash::from_wire(g.hash.as_ref()),
            );
        }
        let mut out = Vec::new();
        for (i, name) in d.origins.iter().enumerate() {
            let mut local: BTreeMap<u64, GroupHash> = BTreeMap::new();
            if let Some(id) = self.origin_id(name) {
                local.extend(self.groups_of(id, first, last));
            }
            let theirs: BTreeMap<u64, GroupHash> = remote
                .range((i, first)..=(i, last))
                .map(|((_, e), g)| (*e, *g))
                .collect();
            let epochs: BTreeSet<u64> = local.keys().chain(theirs.keys()).copied().collect();
            for e in epochs {
                let l = local.get(&e).copied().unwrap_or_default();
                let r = theirs.get(&e).copied().unwrap_or_default();
                if l != r {
                    out.push((name.clone(), e, l.entries > 0, r.entries > 0));
                }
            }
        }
        Ok(out)
    }

    /// Anti-entropy leg 3: our counts for the groups that differ from the
    /// peer's epoch digest, and the groups we want from the peer.
    pub fn answer_epoch_digest(
        &self,
        d: &proto::EpochDigest,
        epoch_ms: u64,
    ) -> Result<proto::Repair, BatchError> {
        let diff = self.differing_groups(d)?;
        let mut b = BatchBuilder::new(self, epoch_ms, d.first_epoch);
        let mut want = Vec::new();
        for (name, epoch, ours, theirs) in diff {
            let idx = b.origin_index_by_name(&name);
            if theirs {
                want.push(proto::GroupKey {
                    origin: idx,
                    epoch_offset: epoch - d.first_epoch,
                });
            }
            if let (true, Some(id)) = (ours, self.origin_id(&name)) {
                for (k, c) in self.group_entries(id, epoch) {
                    if b.full() {
                        break;
                    }
                    b.push(&k, &c);
                }
            }
        }
        Ok(proto::Repair {
            counts: Some(b.batch),
            want,
        })
    }

    /// Anti-entropy leg 4: our counts for the groups the initiator wants.
    pub fn answer_repair(
        &self,
        r: &proto::Repair,
        epoch_ms: u64,
    ) -> Result<proto::CountBatch, BatchError> {
        let counts = r.counts.as_ref().ok_or(BatchError::Malformed)?;
        if counts.epoch_ms != epoch_ms {
            return Err(BatchError::EpochLength);
        }
        if r.want.len() > MAX_DIGEST_ITEMS {
            return Err(BatchError::Malformed);
        }
        let base = counts.base_epoch;
        let mut b = BatchBuilder::new(self, epoch_ms, base);
        for w in &r.want {
            let name = counts
                .origins
                .get(w.origin as usize)
                .ok_or(BatchError::Malformed)?;
            let epoch = base
                .checked_add(w.epoch_offset)
                .ok_or(BatchError::Malformed)?;
            let Some(id) = self.origin_id(name) else {
                continue;
            };
            for (k, c) in self.group_entries(id, epoch) {
                if b.full() {
                    return Ok(b.batch);
                }
                b.push(&k, &c);
            }
        }
        Ok(b.batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message as _;
    use std::net::IpAddr;

    const EPOCH_MS: u64 = 60_000;

    fn block(i: u8) -> Block {
        crate::throttle::block_of(IpAddr::from([10, i, 0, 1]), 24, 48)
    }

    fn c(n: u32) -> Counts {
        Counts {
            connections: n,
            messages: n / 2,
            recipients: n * 2,
        }
    }

    /// The counts of a ledger by origin name (ids differ between ledgers).
    fn by_name(l: &Ledger, first: u64, last: u64) -> BTreeMap<(String, u64, Block), Counts> {
        l.iter()
            .filter(|(k, _)| k.epoch >= first && k.epoch <= last)
            .map(|(k, c)| {
                (
                    (
                        l.origin_name(k.origin).unwrap().to_string(),
                        k.epoch,
                        k.block,
                    ),
                    c,
                )
            })
            .collect()
    }

    fn ledger_from(entries: &[(u8, u64, u8, Counts)]) -> Ledger {
        let mut l = Ledger::new(3);
        for (o, e, b, counts) in entries {
            let origin = l.intern(&format!("n{o}"));
            l.observe(
                Key {
                    origin,
                    epoch: *e,
                    block: block(*b),
                },
                *counts,
            );
        }
        l
    }

    /// Runs the four anti-entropy legs between `a` (initiator) and `b`,
    /// through encoded bytes, as the live node does.
    fn anti_entropy(a: &mut Ledger, b: &mut Ledger, first: u64, last: u64) -> usize {
        fn wire<M: prost::Message + Default>(m: &M) -> (M, usize) {
            let bytes = m.encode_to_vec();
            (M::decode(bytes.as_slice()).unwrap(), bytes.len())
        }
        let (s, n1) = wire(&a.summary(first, last, EPOCH_MS));
        let (d, n2) = wire(&b.answer_summary(&s, EPOCH_MS).unwrap());
        let (r, n3) = wire(&a.answer_epoch_digest(&d, EPOCH_MS).unwrap());
        b.merge_batch(r.counts.as_ref().unwrap(), EPOCH_MS).unwrap();
        let (reply, n4) = wire(&b.answer_repair(&r, EPOCH_MS).unwrap());
        a.merge_batch(&reply, EPOCH_MS).unwrap();
        n1 + n2 + n3 + n4
    }

    #[test]
    fn rounds_grow_with_log2() {
        assert_eq!(rounds_for(1), 1);
        assert_eq!(rounds_for(2), 2);
        assert_eq!(rounds_for(3), 3);
        assert_eq!(rounds_for(4), 3);
        assert_eq!(rounds_for(1000), 11);
    }

    #[test]
    fn observe_keeps_the_maximum_and_marks_changes_hot() {
        let mut l = Ledger::new(2);
        let o = l.intern("a");
        let k = Key {
            origin: o,
            epoch: 5,
            block: block(1),
        };
        assert_eq!(l.observe(k, c(3)), Some(Counts::default()));
        assert_eq!(l.observe(k, c(2)), None, "smaller: no change");
        assert_eq!(l.observe(k, c(3)), None, "same: no change");
        assert_eq!(l.get(&k), Some(c(3)));
        // Pushed for exactly two rounds, then no more.
        assert_eq!(l.take_round(10), vec![(k, c(3))]);
        assert_eq!(l.take_round(10), vec![(k, c(3))]);
        assert!(l.take_round(10).is_empty());
        // A new value is hot again, with its current value.
        l.observe(k, c(9));
        assert_eq!(l.take_round(10), vec![(k, c(9))]);
        // Zero counts are never stored.
        let z = Key { epoch: 6, ..k };
        assert_eq!(l.observe(z, Counts::default()), None);
        assert_eq!(l.get(&z), None);
    }

    #[test]
    fn fresh_keys_are_handed_out_once_then_take_the_normal_rounds() {
        let mut l = Ledger::new(3);
        let o = l.intern("a");
        let k = Key {
            origin: o,
            epoch: 1,
            block: block(1),
        };
        l.observe(k, c(1));
        assert_eq!(l.fresh_len(), 1);
        assert_eq!(l.take_fresh(10), vec![(k, c(1))]);
        assert!(l.take_fresh(10).is_empty(), "fresh only once");
        assert_eq!(l.take_round(10).len(), 1);
        assert_eq!(l.take_round(10).len(), 1);
        assert!(l.take_round(10).is_empty(), "three rounds in all");
        // A round also counts as the first push.
        l.observe(k, c(2));
        assert_eq!(l.take_round(10), vec![(k, c(2))]);
        assert!(l.take_fresh(10).is_empty());
    }

    #[test]
    fn capped_rounds_rotate_over_every_hot_key() {
        let mut l = Ledger::new(1);
        let o = l.intern("a");
        for b in 0..5 {
            l.observe(
                Key {
                    origin: o,
                    epoch: 1,
                    block: block(b),
                },
                c(1),
            );
        }
        let mut seen = BTreeSet::new();
        for _ in 0..3 {
            for (k, _) in l.take_round(2) {
                assert!(seen.insert(k), "each key once");
            }
        }
        assert_eq!(seen.len(), 5);
        assert_eq!(l.hot_len(), 0);
    }

    #[test]
    fn pruned_epochs_never_come_back() {
        let mut l = ledger_from(&[(1, 3, 1, c(1)), (1, 4, 1, c(1)), (2, 5, 2, c(1))]);
        l.prune(4);
        assert_eq!(l.len(), 2);
        let o = l.intern("n1");
        let old = Key {
            origin: o,
            epoch: 3,
            block: block(1),
        };
        assert_eq!(l.observe(old, c(5)), None);
        assert!(l.take_round(100).iter().all(|(k, _)| k.epoch >= 4));
        assert!(
            l.summary(0, 10, EPOCH_MS)
                .hashes
                .iter()
                .map(|h| h.entries)
                .sum::<u32>()
                == 2
        );
    }

    #[test]
    fn batch_codec_roundtrip() {
        let a = ledger_from(&[(1, 7, 1, c(4)), (2, 8, 2, c(9)), (1, 9, 3, c(1))]);
        let entries: Vec<(Key, Counts)> = a.iter().collect();
        let batch = a.encode_batch(&entries, EPOCH_MS);
        let bytes = batch.encode_to_vec();
        let decoded = proto::CountBatch::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded, batch);
        let (updates, invalid) = decode_batch(&decoded, EPOCH_MS).unwrap();
        assert_eq!(invalid, 0);
        let back: Vec<(String, u64, Block, Counts)> = updates
            .iter()
            .map(|u| {
                (
                    decoded.origins[u.origin].clone(),
                    u.epoch,
                    u.block,
                    u.counts,
                )
            })
            .collect();
        let orig: Vec<(String, u64, Block, Counts)> = entries
            .iter()
            .map(|(k, c)| {
                (
                    a.origin_name(k.origin).unwrap().to_string(),
                    k.epoch,
                    k.block,
                    *c,
                )
            })
            .collect();
        assert_eq!(back, orig);
        let mut b = Ledger::new(1);
        b.merge_batch(&decoded, EPOCH_MS).unwrap();
        assert_eq!(by_name(&a, 0, 100), by_name(&b, 0, 100));
        // Another epoch length: refused as a whole.
        assert_eq!(decode_batch(&decoded, 1000), Err(BatchError::EpochLength));
        // Bad entries are skipped and counted.
        let mut bad = decoded.clone();
        bad.entries[0].origin = 99;
        bad.entries[1].block = vec![1, 2, 3];
        assert_eq!(decode_batch(&bad, EPOCH_MS).unwrap().1, 2);
    }

    #[test]
    fn digest_finds_one_changed_count() {
        let entries: Vec<(u8, u64, u8, Counts)> = (0..50)
            .map(|i| (i % 5, 10 + (i as u64 % 3), i, c(i as u32 + 1)))
            .collect();
        let mut a = ledger_from(&entries);
        let mut b = ledger_from(&entries);
        let o = b.origin_id("n2").unwrap();
        b.observe(
            Key {
                origin: o,
                epoch: 11,
                block: block(7),
            },
            c(100),
        );
        let s = a.summary(10, 12, EPOCH_MS);
        let d = b.answer_summary(&s, EPOCH_MS).unwrap();
        assert_eq!(d.origins, vec!["n2".to_string()]);
        let diff = a.differing_groups(&d).unwrap();
        assert_eq!(diff, vec![("n2".to_string(), 11, true, true)]);
        anti_entropy(&mut a, &mut b, 10, 12);
        assert_eq!(by_name(&a, 10, 12), by_name(&b, 10, 12));
        // In sync: the next exchange finds nothing.
        let d = b
            .answer_summary(&a.summary(10, 12, EPOCH_MS), EPOCH_MS)
            .unwrap();
        assert!(d.origins.is_empty() && d.groups.is_empty());
    }

    #[test]
    fn malformed_digests_are_refused() {
        let a = ledger_from(&[(1, 7, 1, c(4))]);
        let mut s = a.summary(0, 10, EPOCH_MS);
        s.hashes.pop();
        assert_eq!(a.answer_summary(&s, EPOCH_MS), Err(BatchError::Malformed));
        let s = a.summary(10, 0, EPOCH_MS);
        assert_eq!(a.answer_summary(&s, EPOCH_MS), Err(BatchError::Malformed));
        let s = a.summary(0, 10, 1);
        assert_eq!(a.answer_summary(&s, EPOCH_MS), Err(BatchError::EpochLength));
        let d = proto::EpochDigest {
            first_epoch: 0,
            last_epoch: 10,
            origins: vec!["n1".into()],
            groups: vec![proto::EpochGroup {
                origin: 5,
                epoch_offset: 0,
                hash: None,
            }],
        };
        assert_eq!(a.differing_groups(&d), Err(BatchError::Malformed));
        let r = proto::Repair {
            counts: Some(a.encode_batch(&[], EPOCH_MS)),
            want: vec![proto::GroupKey {
                origin: 3,
                epoch_offset: 0,
            }],
        };
        assert_eq!(a.answer_repair(&r, EPOCH_MS), Err(BatchError::Malformed));
    }

    fn arb_entries() -> impl Strategy<Value = Vec<(u8, u64, u8, Counts)>> {
        let counts = (0u32..40, 0u32..40, 0u32..40).prop_map(|(a, b, c)| Counts {
            connections: a,
            messages: b,
            recipients: c,
        });
        proptest::collection::vec((0u8..4, 0u64..6, 0u8..6, counts), 0..40)
    }

    /// The field-wise maximum of every entry, by name: the merge model.
    fn model(
        all: &[&[(u8, u64, u8, Counts)]],
        first: u64,
        last: u64,
    ) -> BTreeMap<(String, u64, Block), Counts> {
        let mut m: BTreeMap<(String, u64, Block), Counts> = BTreeMap::new();
        for entries in all {
            for (o, e, b, counts) in entries.iter() {
                if *e < first || *e > last || counts.is_zero() {
                    continue;
                }
                let v = m.entry((format!("n{o}"), *e, block(*b))).or_default();
                *v = v.max(*counts);
            }
        }
        m
    }

    proptest! {
        /// Observing in any order, with duplicates, gives the same ledger and
        /// the same digests: merge is commutative and idempotent.
        #[test]
        fn observe_order_and_duplicates_do_not_matter(a in arb_entries(), b in arb_entries()) {
            let mut ab: Vec<_> = a.iter().chain(b.iter()).copied().collect();
            let l1 = ledger_from(&ab);
            ab.reverse();
            ab.extend(a.iter().copied());
            let l2 = ledger_from(&ab);
            prop_assert_eq!(by_name(&l1, 0, 10), by_name(&l2, 0, 10));
            prop_assert_eq!(by_name(&l1, 0, 10), model(&[&a, &b], 0, 10));
            let d = l2.answer_summary(&l1.summary(0, 10, EPOCH_MS), EPOCH_MS).unwrap();
            prop_assert!(d.origins.is_empty(), "equal states have equal digests");
        }

        /// Merging batches is associative: (a+b)+c == a+(b+c).
        #[test]
        fn batch_merge_is_associative(a in arb_entries(), b in arb_entries(), c in arb_entries()) {
            let (la, lb, lc) = (ledger_from(&a), ledger_from(&b), ledger_from(&c));
            let all = |l: &Ledger| l.encode_batch(&l.iter().collect::<Vec<_>>(), EPOCH_MS);
            let mut left = la.clone();
            left.merge_batch(&all(&lb), EPOCH_MS).unwrap();
            left.merge_batch(&all(&lc), EPOCH_MS).unwrap();
            let mut bc = lb.clone();
            bc.merge_batch(&all(&lc), EPOCH_MS).unwrap();
            let mut right = la.clone();
            right.merge_batch(&all(&bc), EPOCH_MS).unwrap();
            prop_assert_eq!(by_name(&left, 0, 10), by_name(&right, 0, 10));
        }

        /// The digest exchange finds exactly the (origin, epoch) groups whose
        /// counts differ, no more, no less.
        #[test]
        fn digest_difference_is_exactly_the_differing_groups(a in arb_entries(), b in arb_entries(), first in 0u64..3, width in 0u64..4) {
            let last = first + width;
            let (la, lb) = (ledger_from(&a), ledger_from(&b));
            let d = lb.answer_summary(&la.summary(first, last, EPOCH_MS), EPOCH_MS).unwrap();
            let found: BTreeSet<(String, u64)> = la.differing_groups(&d).unwrap().into_iter().map(|(n, e, _, _)| (n, e)).collect();
            let (ma, mb) = (by_name(&la, first, last), by_name(&lb, first, last));
            let group = |m: &BTreeMap<(String, u64, Block), Counts>, n: &str, e: u64| -> Vec<(Block, Counts)> {
                m.iter().filter(|((o, ep, _), _)| o == n && *ep == e).map(|((_, _, b), c)| (*b, *c)).collect()
            };
            let keys: BTreeSet<(String, u64)> = ma.keys().chain(mb.keys()).map(|(n, e, _)| (n.clone(), *e)).collect();
            let expected: BTreeSet<(String, u64)> = keys.into_iter().filter(|(n, e)| group(&ma, n, *e) != group(&mb, n, *e)).collect();
            prop_assert_eq!(found, expected);
        }

        /// After one push-pull exchange both sides hold the merge of both
        /// states (over the exchanged range), whatever they started with.
        #[test]
        fn anti_entropy_converges_to_the_merge(a in arb_entries(), b in arb_entries()) {
            let (mut la, mut lb) = (ledger_from(&a), ledger_from(&b));
            anti_entropy(&mut la, &mut lb, 0, 10);
            let expected = model(&[&a, &b], 0, 10);
            prop_assert_eq!(by_name(&la, 0, 10), expected.clone());
            prop_assert_eq!(by_name(&lb, 0, 10), expected);
        }

        /// Every change is pushed in exactly `rounds` rounds, with its latest value.
        #[test]
        fn every_change_is_pushed_rounds_times(a in arb_entries(), rounds in 1u8..5) {
            let mut l = Ledger::new(rounds);
            let l0 = ledger_from(&a);
            for (k, v) in l0.iter() {
                let o = l.intern(l0.origin_name(k.origin).unwrap());
                l.observe(Key { origin: o, ..k }, v);
            }
            let mut sent: BTreeMap<Key, usize> = BTreeMap::new();
            for _ in 0..(rounds as usize + 2) {
                for (k, v) in l.take_round(7) {
                    prop_assert_eq!(Some(v), l.get(&k));
                    *sent.entry(k).or_default() += 1;
                }
            }
            // With a cap of 7 per round some keys need more rounds; finish them.
            while l.hot_len() > 0 {
                for (k, _) in l.take_round(7) { *sent.entry(k).or_default() += 1; }
            }
            prop_assert_eq!(sent.len(), l.len());
            prop_assert!(sent.values().all(|n| *n == rounds as usize));
        }
    }

    use super::super::wire::Body;

    // Hostile peers: arbitrary (and mutated) messages of every anti-entropy
    // leg, run through the same calls as the live node. Each is refused or
    // answered, never a panic, and what this node sends back is always a
    // valid batch.

    fn arb_u64() -> impl Strategy<Value = u64> {
        prop_oneof![
            4 => 0u64..8,
            1 => Just(u64::MAX),
            1 => Just(u64::MAX - 1),
            1 => Just(MAX_EPOCH_RANGE),
            1 => any::<u64>(),
        ]
    }

    fn arb_u32() -> impl Strategy<Value = u32> {
        prop_oneof![4 => 0u32..8, 1 => Just(u32::MAX), 1 => any::<u32>()]
    }

    /// An origin index or epoch offset: mostly valid, sometimes not.
    fn arb_index() -> impl Strategy<Value = u32> {
        prop_oneof![8 => 0u32..3, 1 => Just(u32::MAX), 1 => any::<u32>()]
    }

    fn arb_offset() -> impl Strategy<Value = u64> {
        prop_oneof![8 => 0u64..6, 1 => Just(u64::MAX), 1 => any::<u64>()]
    }

    fn arb_names() -> impl Strategy<Value = Vec<String>> {
        let name = prop_oneof![
            8 => (0u8..5).prop_map(|o| format!("n{o}")),
            1 => Just(String::new()),
            1 => ".{0,8}",
        ];
        proptest::collection::vec(name, 0..6)
    }

    fn arb_hash() -> impl Strategy<Value = Option<proto::GroupHash>> {
        proptest::option::of(
            (arb_u32(), any::<u64>())
                .prop_map(|(entries, hash)| proto::GroupHash { entries, hash }),
        )
    }

    fn arb_batch() -> impl Strategy<Value = proto::CountBatch> {
        let block = prop_oneof![
            (0u8..6).prop_map(|b| vec![10, b, 0, 0]),
            proptest::collection::vec(any::<u8>(), 16),
            proptest::collection::vec(any::<u8>(), 0..20),
        ];
        let prefix = prop_oneof![Just(24u32), Just(48), 0u32..130, any::<u32>()];
        let entry = (
            arb_index(),
            block,
            prefix,
            arb_offset(),
            arb_u32(),
            arb_u32(),
            arb_u32(),
        )
            .prop_map(|(origin, block, prefix_len, epoch_offset, c, m, r)| {
                proto::CountEntry {
                    origin,
                    block,
                    prefix_len,
                    epoch_offset,
                    connections: c,
                    messages: m,
                    recipients: r,
                }
            });
        (
            prop_oneof![4 => Just(EPOCH_MS), 1 => any::<u64>()],
            arb_u64(),
            arb_names(),
            proptest::collection::vec(entry, 0..20),
        )
            .prop_map(
                |(epoch_ms, base_epoch, origins, entries)| proto::CountBatch {
                    epoch_ms,
                    base_epoch,
                    origins,
                    entries,
                    suspects: Vec::new(),
                    greylist: Vec::new(),
                    greylist_pools: Vec::new(),
                    verify: Vec::new(),
                    verify_domains: Vec::new(),
                },
            )
    }

    fn arb_range() -> impl Strategy<Value = (u64, u64)> {
        let width = prop_oneof![
            4 => 0u64..8,
            1 => Just(MAX_EPOCH_RANGE),
            1 => Just(MAX_EPOCH_RANGE + 1),
            1 => any::<u64>(),
        ];
        (arb_u64(), width).prop_map(|(first, w)| (first, first.wrapping_add(w)))
    }

    fn arb_body() -> impl Strategy<Value = Body> {
        let summary = (
            prop_oneof![4 => Just(EPOCH_MS), 1 => any::<u64>()],
            arb_range(),
            arb_names(),
            proptest::collection::vec(arb_hash(), 0..6),
        )
            .prop_map(|(epoch_ms, (first, last), origins, hashes)| {
                Body::Summary(proto::Summary {
                    epoch_ms,
                    first_epoch: first,
                    last_epoch: last,
                    origins,
                    hashes: hashes.into_iter().flatten().collect(),
                })
            });
        let group =
            (arb_index(), arb_offset(), arb_hash()).prop_map(|(origin, epoch_offset, hash)| {
                proto::EpochGroup {
                    origin,
                    epoch_offset,
                    hash,
                }
            });
        let digest = (
            arb_range(),
            arb_names(),
            proptest::collection::vec(group, 0..4),
        )
            .prop_map(|((first, last), origins, groups)| {
                Body::EpochDigest(proto::EpochDigest {
                    first_epoch: first,
                    last_epoch: last,
                    origins,
                    groups,
                })
            });
        let want = (arb_index(), arb_offset()).prop_map(|(origin, epoch_offset)| proto::GroupKey {
            origin,
            epoch_offset,
        });
        let repair = (
            proptest::option::of(arb_batch()),
            proptest::collection::vec(want, 0..4),
        )
            .prop_map(|(counts, want)| Body::Repair(proto::Repair { counts, want }));
        prop_oneof![
            arb_batch().prop_map(Body::Delta),
            arb_batch().prop_map(Body::RepairReply),
            summary,
            digest,
            repair,
        ]
    }

    /// A batch this node sends: every entry decodes.
    fn check_sent(batch: &proto::CountBatch) {
        assert!(batch.entries.len() <= MAX_BATCH_ENTRIES);
        let (_, invalid) = decode_batch(batch, EPOCH_MS).expect("own batch decodes");
        assert_eq!(invalid, 0, "own batch has invalid entries: {batch:?}");
    }

    /// What the live node does with a message from a peer.
    fn receive(l: &Ledger, body: Body) {
        let throttle = crate::throttle::Throttle::new(
            &crate::config::ThrottleConfig::default(),
            &crate::config::TrustConfig::default(),
            "me",
        );
        let merge = |batch: &proto::CountBatch| {
            if let Ok((updates, _)) = decode_batch(batch, EPOCH_MS) {
                for u in updates {
                    assert!(u.origin < batch.origins.len());
                    throttle.merge(1, u.block, u.epoch, u.counts, 3 * EPOCH_MS);
                }
            }
            let _ = l.clone().merge_batch(batch, EPOCH_MS);
        };
        match body {
            Body::Delta(b) | Body::RepairReply(b) => merge(&b),
            Body::Summary(s) => {
                if let Ok(d) = l.answer_summary(&s, EPOCH_MS) {
                    // Our digest is one the peer (and we) accept.
                    l.differing_groups(&d).expect("own digest is valid");
                }
            }
            Body::EpochDigest(d) => {
                if let Ok(r) = l.answer_epoch_digest(&d, EPOCH_MS) {
                    check_sent(r.counts.as_ref().expect("repair has counts"));
                }
            }
            Body::Repair(r) => {
                if let Some(counts) = &r.counts {
                    merge(counts);
                }
                if let Ok(reply) = l.answer_repair(&r, EPOCH_MS) {
                    check_sent(&reply);
                }
            }
            Body::Swim(packet) => {
                let _ = crate::gossip::membership::packet_source(&packet);
            }
        }
    }

    /// `body` sealed, then bytes overwritten and the end cut off.
    fn mutated(
        body: Body,
        edits: &[(proptest::sample::Index, u8)],
        cut: Option<proptest::sample::Index>,
    ) -> Vec<u8> {
        use super::super::wire;
        let mut bytes = wire::encode(&wire::seal("net", "peer", body));
        for (i, b) in edits {
            let i = i.index(bytes.len().max(1));
            if let Some(x) = bytes.get_mut(i) {
                *x = *b;
            }
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len() + 1));
        }
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Structurally valid messages with hostile values.
        #[test]
        fn hostile_messages_are_refused_or_answered(a in arb_entries(), body in arb_body()) {
            receive(&ledger_from(&a), body);
        }

        /// The same, sealed, with bytes overwritten or cut off, through
        /// [`super::super::wire::open`].
        #[test]
        fn mutated_envelopes_are_refused_or_answered(
            a in arb_entries(),
            body in arb_body(),
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..6),
            cut in proptest::option::of(any::<proptest::sample::Index>()),
        ) {
            let bytes = mutated(body, &edits, cut);
            if let Ok((_, body)) = super::super::wire::open(&bytes, "net") {
                receive(&ledger_from(&a), body);
            }
        }

        /// The messages of a genuine exchange, corrupted on the way, each
        /// received by the side that expects it.
        #[test]
        fn corrupted_exchanges_are_refused_or_answered(
            a in arb_entries(),
            b in arb_entries(),
            first in 0u64..3,
            width in 0u64..6,
            leg in 0usize..4,
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..4),
            cut in proptest::option::of(any::<proptest::sample::Index>()),
        ) {
            let (la, lb) = (ledger_from(&a), ledger_from(&b));
            let s = la.summary(first, first + width, EPOCH_MS);
            let d = lb.answer_summary(&s, EPOCH_MS).unwrap();
            let r = la.answer_epoch_digest(&d, EPOCH_MS).unwrap();
            let reply = lb.answer_repair(&r, EPOCH_MS).unwrap();
            let (body, at) = match leg {
                0 => (Body::Summary(s), &lb),
                1 => (Body::EpochDigest(d), &la),
                2 => (Body::Repair(r), &lb),
                _ => (Body::RepairReply(reply), &la),
            };
            let bytes = mutated(body, &edits, cut);
            if let Ok((_, body)) = super::super::wire::open(&bytes, "net") {
                receive(at, body);
            }
        }
    }
}
