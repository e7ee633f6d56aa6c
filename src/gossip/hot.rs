//! The live side of owners per block (`gossip.counts = "owners"`, the
//! default): [`owners`](super::owners) is the sans-IO core, this is its
//! state in a running node. No sockets here either: each step returns the
//! messages to send, and [`super::Core`] sends them.
//!
//! * Every interval a node takes its own count changes from the throttle
//!   ([`Throttle::take_own_changes`]: (block, epoch) pairs, not snapshots),
//!   signs each with the key of its network certificate and sends them to
//!   the block's `gossip.owners` owners (rendezvous hashing over the live
//!   members, this node included). Changes of blocks known to be hot go
//!   out at every quarter interval.
//! * An owner merges the signed counts it gets for the blocks it owns (per
//!   origin, block and epoch, the largest) and so knows the network-wide
//!   window. A block at `gossip.hot_fraction` of any of its limits is
//!   reported: a signed report goes to `fanout` peers, and each node
//!   forwards a report the first time it sees it (epidemic, every node
//!   once). A hot block is reported again at each further tenth of its
//!   limit and when it passes the limit, not at every change. Cold blocks
//!   are never broadcast; a block that cools is reported once more with its
//!   lower count, and every hot block again every `anti_entropy_interval`.
//! * Reports carry no certificate: a node checks a report with the owner's
//!   key, learnt from the mutual-TLS connections it has with the owner
//!   (SWIM, increments), or, for an owner it never talked to, from a
//!   connection it opens to the owner for the purpose.
//! * A node keeps each owner's latest report per block and hands the
//!   median of the current owners' reports to the throttle
//!   ([`Throttle::set_hot`]), which decides on max(own, median) once that
//!   many origins counted the block (`gossip.min_origins_to_refuse`): one
//!   lying owner cannot move the median of three.
//! * When the members change, only the blocks whose owners changed move
//!   (a member that left owned them, or one that joined outweighs their
//!   last owner: about r/N of them). Each node signs again what it sent of
//!   a moved block and sends it to its new owners only: at once for a
//!   block that is hot or that it counted in this or the last epoch, the
//!   others 64 blocks per interval (the two owners that stayed still count
//!   them). Owners forget the blocks they no longer own. A report of a
//!   block that passed its limit is repeated twice, 200 ms apart (one push
//!   misses a few nodes). These follow `bench/gossip_sim --new=...,
//!   resend=origins` (see bench/RESULTS.md).
//!
//! * A restarted node gets its own signed counts back from the owners that
//!   kept them (a v2 `Handoff` when it comes up, checked with its own key,
//!   taken during its relearn period).
//!
//! Known limit: the owners' sums are per (origin, epoch) maxima, so counts
//! a restarted node makes in the epoch of its restart, before the handoff
//! arrives, are under-counted by at most what it had counted before.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

use rustls_pki_types::CertificateDer;

use super::owners::{
    self, block_key, decode_increments, decode_report, encode_increments, encode_report,
    increment_message, is_hot, member_key, public_key_of_cert, report_message, HotView, KeyAlg,
    Merge, Outbox, OwnerTable, Report, Signature, Signer, Window,
};
use super::transport::dropped;
use super::wire::proto;
use crate::throttle::{Block, Counts, Throttle};

/// Signed counts an owner keeps (all the blocks it owns, every origin and
/// epoch of the window).
const MAX_TABLE: usize = 1 << 20;
/// Own changes waiting for the next send.
const MAX_OUTBOX: usize = 1 << 20;
/// Hot blocks a node keeps reports of.
const MAX_HOT: usize = 1 << 16;
/// Most counts in one increment batch, and blocks in one report.
const MAX_BATCH: usize = 4_096;
/// Most reports in one relay message.
const MAX_REPORTS: usize = 64;
/// Member names (and owner certificates) kept.
const MAX_NAMES: usize = 1 << 16;
/// Cached owner lists (cleared when members change or when full).
const MAX_OWNER_CACHE: usize = 1 << 18;
/// Cold blocks whose owners changed, sent again to their new owners per
/// interval (a bound on the cost of churn), and most waiting.
const COLD_RESEND_PER_INTERVAL: usize = 64;
const MAX_COLD_MOVED: usize = 1 << 16;
/// Reports already seen, to skip duplicates before their signature check.
const MAX_SEEN: usize = 1 << 16;

/// A message for a peer: its gossip address, the sealed bytes, the metric
/// kind.
pub(super) type Out = (SocketAddr, Vec<u8>, &'static str);

/// A node's owners state (one per node).
pub(super) struct Hot {
    name: String,
    network: String,
    r: usize,
    hot_fraction: f64,
    epoch_ms: u64,
    window_epochs: u64,
    /// How long a value handed to the throttle is used (3 intervals).
    hold_ms: u64,
    signer: Signer,
    ca: CertificateDer<'static>,
    state: Mutex<State>,
}

/// A member as owners are computed over it: rendezvous key, name id and
/// gossip address (None: this node).
type Member = (u64, u32, Option<SocketAddr>);

#[derive(Default)]
struct Names {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl Names {
    fn id(&mut self, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.get(name) {
            return Some(*id);
        }
        if self.names.len() >= MAX_NAMES {
            return None;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        Some(id)
    }
}

struct State {
    names: Names,
    me: u32,
    members: Vec<Member>,
    /// Per block, its owners ranked (weight, member key, id); kept across
    /// membership changes that do not move the block.
    owners_cache: HashMap<Block, Vec<(u64, u64, u32)>>,
    /// Blocks whose owners changed since the last round, with their owners
    /// before.
    moved: HashMap<Block, Vec<u32>>,
    /// Cold blocks that moved, whose counts are still to be sent again to
    /// their new owners.
    cold_moved: std::collections::VecDeque<(Block, Vec<u32>)>,
    /// Blocks that passed a limit, whose report is repeated: (block, when,
    /// repeats left).
    again: Vec<(Block, u64, u8)>,
    outbox: Outbox<Block>,
    table: OwnerTable<Block, u32, Signature>,
    view: HotView<Block, u32>,
    /// Owned blocks whose count changed since they were last looked at.
    dirty: HashSet<Block>,
    /// Owned blocks last reported hot, with the level reported (see
    /// [`level`]).
    reported: HashMap<Block, u32>,
    /// Owner certificates checked: name -> (certificate, key).
    keys: HashMap<String, (Vec<u8>, KeyAlg, Vec<u8>)>,
    seen: HashSet<(String, u64)>,
    seq: u64,
}

impl State {
    fn owners_of(&mut self, block: &Block, r: usize) -> Vec<u32> {
        if let Some(o) = self.owners_cache.get(block) {
            return o.iter().map(|x| x.2).collect();
        }
        let o = owners::owners_ranked(block_key(block), self.members.iter().map(|m| (m.0, m.1)), r);
        if self.owners_cache.len() >= MAX_OWNER_CACHE {
            self.owners_cache.clear();
        }
        let ids = o.iter().map(|x| x.2).collect();
        self.owners_cache.insert(*block, o);
        ids
    }

    /// After the members changed from `old` to `self.members`: forgets the
    /// cached owners of the blocks that moved (a member that left owned
    /// them, or one that joined outweighs their last owner) and notes them
    /// in `moved`. One weight per cached block and joined member.
    fn members_moved(&mut self, old: &[Member], r: usize) {
        let now: HashSet<u32> = self.members.iter().map(|m| m.1).collect();
        let before: HashSet<u32> = old.iter().map(|m| m.1).collect();
        let left: HashSet<u32> = before.difference(&now).copied().collect();
        let joined: Vec<u64> = self
            .members
            .iter()
            .filter(|m| !before.contains(&m.1))
            .map(|m| m.0)
            .collect();
        let mut moved = Vec::new();
        for (b, ranked) in &self.owners_cache {
            let gone = ranked.iter().any(|o| left.contains(&o.2));
            let outweighed = || {
                let bk = block_key(b);
                joined.iter().any(|k| match ranked.last() {
                    Some(last) if ranked.len() >= r => {
                        (owners::weight(*k, bk), *k) > (last.0, last.1)
                    }
                    _ => true,
                })
            };
            if gone || outweighed() {
                moved.push(*b);
            }
        }
        for b in moved {
            if let Some(ranked) = self.owners_cache.remove(&b) {
                self.moved
                    .entry(b)
                    .or_insert_with(|| ranked.iter().map(|o| o.2).collect());
            }
        }
    }

    fn addr_of(&self, id: u32) -> Option<SocketAddr> {
        self.members.iter().find(|m| m.1 == id).and_then(|m| m.2)
    }
}

/// What one round did, for the debug log.
#[derive(Debug, Default)]
pub(super) struct RoundStats {
    pub counts_sent: usize,
    pub hot_reported: usize,
    /// Blocks whose owners changed, and own counts sent again for them.
    pub moved: usize,
    pub resent: usize,
}

impl Hot {
    /// `key` is the node's private key (PKCS#8 DER) and `certificate` its
    /// network certificate.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        network: &str,
        r: usize,
        hot_fraction: f64,
        epoch_ms: u64,
        window_epochs: u64,
        interval_ms: u64,
        key: &[u8],
        certificate: &[u8],
        ca: CertificateDer<'static>,
    ) -> Result<Hot, String> {
        let (alg, _) = public_key_of_cert(certificate)
            .ok_or("the certificate's key is neither ECDSA P-256 nor Ed25519")?;
        let signer = Signer::from_pkcs8(alg, key).map_err(|e| format!("gossip.key: {e}"))?;
        let mut names = Names::default();
        let me = names.id(name).unwrap_or(0);
        Ok(Hot {
            name: name.to_string(),
            network: network.to_string(),
            r: r.max(1),
            hot_fraction,
            epoch_ms,
            window_epochs,
            hold_ms: interval_ms.saturating_mul(3).max(1),
            signer,
            ca,
            state: Mutex::new(State {
                names,
                me,
                members: vec![(member_key(name), me, None)],
                owners_cache: HashMap::new(),
                moved: HashMap::new(),
                cold_moved: Default::default(),
                again: Vec::new(),
                outbox: Outbox::new(MAX_OUTBOX),
                table: OwnerTable::new(MAX_TABLE),
                view: HotView::new(MAX_HOT, 2 * r.max(1)),
                dirty: HashSet::new(),
                reported: HashMap::new(),
                keys: HashMap::new(),
                seen: HashSet::new(),
                seq: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn epoch(&self, now_ms: u64) -> u64 {
        now_ms / self.epoch_ms
    }

    fn first_epoch(&self, now_ms: u64) -> u64 {
        self.epoch(now_ms)
            .saturating_sub(self.window_epochs.saturating_sub(1))
    }

    fn seal(&self, body: proto::envelope_v2::Body) -> Vec<u8> {
        use prost::Message as _;
        owners::seal(&self.network, &self.name, body).encode_to_vec()
    }

    /// Sets the live members (besides this node). True if they changed.
    pub fn set_members<'a>(&self, live: impl Iterator<Item = (&'a str, SocketAddr)>) -> bool {
        let mut st = self.lock();
        let mut members: Vec<Member> = vec![(member_key(&self.name), st.me, None)];
        for (name, addr) in live {
            if name == self.name {
                continue;
            }
            let Some(id) = st.names.id(name) else {
                continue;
            };
            members.push((member_key(name), id, Some(addr)));
        }
        members.sort_unstable();
        members.dedup_by_key(|m| m.1);
        if members == st.members {
            return false;
        }
        let old = std::mem::replace(&mut st.members, members);
        st.members_moved(&old, self.r);
        true
    }

    /// The owners of `block` in this node's view, by name (`/explain`).
    pub fn owner_names(&self, block: &Block) -> Vec<String> {
        let mut st = self.lock();
        let o = st.owners_of(block, self.r);
        o.iter()
            .filter_map(|id| st.names.names.get(*id as usize).cloned())
            .collect()
    }

    /// The owners' latest reports of `block` (`/explain`): who, and the
    /// window they reported.
    pub fn reports_of(&self, block: &Block) -> Vec<(String, Window)> {
        let st = self.lock();
        st.view
            .reports(block)
            .iter()
            .filter_map(|r| {
                let name = st.names.names.get(r.owner as usize)?;
                Some((name.clone(), r.window))
            })
            .collect()
    }

    /// Sizes for `/status`: (hot blocks known, signed counts kept as owner).
    pub fn sizes(&self) -> (usize, usize) {
        let st = self.lock();
        (st.view.len(), st.table.len())
    }

    /// One round: send this node's count changes to their owners (all of
    /// them on a full round, the hot blocks' otherwise), report hot blocks
    /// it owns (every hot block when `refresh`), and after a membership
    /// change re-send its window to the new owners. `peers` are where this
    /// node's own reports go.
    pub fn round(
        &self,
        throttle: &Throttle,
        now_ms: u64,
        full: bool,
        refresh: bool,
        peers: &[SocketAddr],
    ) -> (Vec<Out>, RoundStats) {
        let mut stats = RoundStats::default();
        let first = self.first_epoch(now_ms);
        let mut st = self.lock();
        let st = &mut *st;
        let mut out = Vec::new();
        for (b, e, c) in throttle.take_own_changes(now_ms) {
            if !st.outbox.note(b, e, c) {
                dropped("outbox");
            }
        }
        if !st.moved.is_empty() {
            // Blocks whose owners changed. Their new owners (only those)
            // learn them from this node, from what it sent of them: at once
            // for blocks that are hot or that it counted in this or the last
            // epoch (a flood that moved while still cold), the others
            // [`COLD_RESEND_PER_INTERVAL`] per interval (the two owners that
            // stayed still count them, and the median needs only two).
            // What this node no longer owns it forgets.
            let moved = std::mem::take(&mut st.moved);
            stats.moved = moved.len();
            let epoch = self.epoch(now_ms);
            let mut urgent: HashMap<Block, Vec<u32>> = HashMap::new();
            for (b, old) in moved {
                let now_hot = st.view.contains(&b)
                    || st.reported.contains_key(&b)
                    || st.outbox.has_sent(b, epoch)
                    || st.outbox.has_sent(b, epoch.saturating_sub(1));
                if !st.owners_of(&b, self.r).contains(&st.me) {
                    st.table.remove(&b);
                    st.reported.remove(&b);
                    st.dirty.remove(&b);
                }
                if now_hot {
                    urgent.insert(b, old);
                } else if st.cold_moved.len() < MAX_COLD_MOVED {
                    st.cold_moved.push_back((b, old));
                }
            }
            out.extend(self.resend(st, &urgent, &mut stats));
        }
        if full && !st.cold_moved.is_empty() {
            let n = st.cold_moved.len().min(COLD_RESEND_PER_INTERVAL);
            let some: HashMap<Block, Vec<u32>> = st.cold_moved.drain(..n).collect();
            out.extend(self.resend(st, &some, &mut stats));
        }
        if full {
            st.outbox.prune(first);
            st.table.prune(first);
            st.view.prune(first);
            metrics::gauge!("magicmx_gossip_hot_blocks").set(st.view.len() as f64);
            metrics::gauge!("magicmx_gossip_owned_counts").set(st.table.len() as f64);
        }
        let entries = match full {
            true => st.outbox.take(),
            false => {
                let view = &st.view;
                let reported = &st.reported;
                // Hot blocks, and blocks with a burst here (two or more
                // since the last send: a flood, not the background's one
                // attempt per block).
                st.outbox.take_where(|b, c, sent| {
                    view.contains(b) || reported.contains_key(b) || grew_by(c, sent) >= BURST
                })
            }
        };
        let items: Vec<(Block, u64, Counts, Vec<u32>)> = entries
            .into_iter()
            .map(|(b, e, c)| (b, e, c, st.owners_of(&b, self.r)))
            .collect();
        let (sent, signed) = self.send_to(st, items);
        stats.counts_sent += signed;
        out.extend(sent);
        let reports = self.report(st, throttle, now_ms, refresh);
        stats.hot_reported = reports.iter().map(|r| r.blocks.len()).sum();
        if full {
            self.apply_view(st, throttle, now_ms, None);
        }
        for chunk in reports.chunks(MAX_REPORTS) {
            let body = proto::envelope_v2::Body::Hot(proto::HotRelay {
                reports: chunk.to_vec(),
            });
            let bytes = self.seal(body);
            for p in peers {
                out.push((*p, bytes.clone(), "hot"));
            }
        }
        (out, stats)
    }

    /// What this node sent of `blocks`, signed again and sent to their
    /// owners that were not owners before (the values: the old owners).
    fn resend(
        &self,
        st: &mut State,
        blocks: &HashMap<Block, Vec<u32>>,
        stats: &mut RoundStats,
    ) -> Vec<Out> {
        if blocks.is_empty() {
            return Vec::new();
        }
        let items: Vec<(Block, u64, Counts, Vec<u32>)> = st
            .outbox
            .sent_where(|b| blocks.contains_key(b))
            .into_iter()
            .filter_map(|(b, e, c)| {
                let old = &blocks[&b];
                let new: Vec<u32> = st
                    .owners_of(&b, self.r)
                    .into_iter()
                    .filter(|o| !old.contains(o))
                    .collect();
                (!new.is_empty()).then_some((b, e, c, new))
            })
            .collect();
        let (out, signed) = self.send_to(st, items);
        stats.resent += signed;
        out
    }

    /// Signs each (block, epoch, counts) and sends it to its `targets`
    /// (merged into this node's own table when it is one of them). Returns
    /// the messages and how many counts were signed.
    fn send_to(
        &self,
        st: &mut State,
        items: Vec<(Block, u64, Counts, Vec<u32>)>,
    ) -> (Vec<Out>, usize) {
        let mut signed = 0;
        let mut per_owner: HashMap<u32, Vec<(Block, u64, Counts, Signature)>> = HashMap::new();
        for (b, e, c, targets) in items {
            let msg = increment_message(&self.network, &self.name, &b, e, &c);
            let Ok(sig) = self.signer.sign(&msg) else {
                dropped("sign");
                continue;
            };
            signed += 1;
            for o in targets {
                if o != st.me {
                    per_owner.entry(o).or_default().push((b, e, c, sig));
                } else if matches!(
                    st.table.merge(b, st.me, e, c, sig),
                    Merge::New | Merge::Grew
                ) {
                    st.dirty.insert(b);
                }
            }
        }
        (self.increments_out(st, per_owner), signed)
    }

    /// Increment batches for each owner.
    fn increments_out(
        &self,
        st: &State,
        per_owner: HashMap<u32, Vec<(Block, u64, Counts, Signature)>>,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        for (o, list) in per_owner {
            let Some(addr) = st.addr_of(o) else { continue };
            for chunk in list.chunks(MAX_BATCH) {
                let body =
                    proto::envelope_v2::Body::Increments(encode_increments(self.epoch_ms, chunk));
                out.push((addr, self.seal(body), "increments"));
            }
        }
        out
    }

    /// This node's reports of the owned blocks that changed (all hot ones
    /// when `refresh`), already merged into its own view.
    fn report(
        &self,
        st: &mut State,
        throttle: &Throttle,
        now_ms: u64,
        refresh: bool,
    ) -> Vec<proto::HotReport> {
        let first = self.first_epoch(now_ms);
        let cap = throttle.peer_cap();
        let mut candidates: Vec<Block> = match refresh {
            true => {
                st.dirty.clear();
                st.table.blocks().copied().collect()
            }
            false => st.dirty.drain().collect(),
        };
        // Repeats of a crossing report that are due (one push with fanout
        // 3 misses a few nodes; a node needs two owners' crossing reports).
        let mut forced: HashSet<Block> = HashSet::new();
        st.again.retain_mut(|(b, at, left)| {
            if *at > now_ms {
                return true;
            }
            forced.insert(*b);
            *left -= 1;
            *at = now_ms + AGAIN_MS;
            *left > 0
        });
        candidates.extend(forced.iter().filter(|b| !st.dirty.contains(*b)).copied());
        candidates.sort_unstable();
        candidates.dedup();
        let mut blocks: Vec<(Block, Window)> = Vec::new();
        for b in candidates {
            let w = st.table.window(&b, first, &cap);
            self.apply_view(st, throttle, now_ms, Some(b));
            if let Some(f) = lie_factor() {
                if w.origins > 0 {
                    st.reported.insert(b, u32::MAX);
                    blocks.push((b, lie(w, f)));
                }
                continue;
            }
            let limits = throttle.limits_for(&b, now_ms);
            if is_hot(&w.counts, &limits, self.hot_fraction) {
                // Reported again only at the next step towards the limit,
                // and when it passes the limit (every change of a block in
                // a flood would be a broadcast to every node).
                let l = level(&w.counts, &limits);
                let last = st.reported.insert(b, l);
                if l == u32::MAX && last != Some(u32::MAX) && st.again.len() < MAX_HOT {
                    st.again.push((b, now_ms + AGAIN_MS, AGAIN));
                }
                if last != Some(l) || refresh || forced.contains(&b) {
                    blocks.push((b, w));
                }
            } else if st.reported.remove(&b).is_some() {
                // Cooled: once more with its count now.
                blocks.push((b, w));
            }
        }
        if blocks.is_empty() {
            return Vec::new();
        }
        blocks.sort_unstable_by_key(|(b, _)| *b);
        let epoch = self.epoch(now_ms);
        let mut reports = Vec::new();
        for chunk in blocks.chunks(MAX_BATCH) {
            // Sequence numbers from the clock, so that a restarted owner's
            // reports are newer than those it made before.
            st.seq = (st.seq + 1).max(now_ms.saturating_mul(1_000));
            let msg = report_message(&self.network, &self.name, epoch, st.seq, chunk);
            let Ok(sig) = self.signer.sign(&msg) else {
                dropped("sign");
                continue;
            };
            // Without the certificate (most of a small report's bytes): a
            // node that does not know this owner's key yet connects to it.
            let rep = encode_report(&self.name, self.epoch_ms, epoch, st.seq, chunk, &sig);
            for (b, w) in chunk {
                let report = Report {
                    owner: st.me,
                    seq: st.seq,
                    epoch,
                    window: *w,
                };
                if st.view.merge(*b, report) {
                    self.apply_view(st, throttle, now_ms, Some(*b));
                }
            }
            st.seen.insert((self.name.clone(), st.seq));
            reports.push(rep);
        }
        reports
    }

    /// What this node knows of `block` network-wide: the median of its
    /// current owners' reports and, for a block it owns, its own sum of the
    /// signed counts (field-wise maximum of the two).
    fn value_of(
        &self,
        st: &mut State,
        throttle: &Throttle,
        block: &Block,
        now_ms: u64,
    ) -> Option<Window> {
        let first = self.first_epoch(now_ms);
        let owners = st.owners_of(block, self.r);
        let median = st.view.value(block, &owners, first);
        let owned = owners
            .contains(&st.me)
            .then(|| st.table.window(block, first, &throttle.peer_cap()))
            .filter(|w| w.origins > 0);
        match (median, owned) {
            (Some(a), Some(b)) => Some(Window {
                counts: a.counts.max(b.counts),
                origins: a.origins.max(b.origins),
            }),
            (a, b) => a.or(b),
        }
    }

    /// Hands [`Hot::value_of`] to the throttle: for `only` or, on `None`,
    /// for every block of the view and every block owned.
    fn apply_view(&self, st: &mut State, throttle: &Throttle, now_ms: u64, only: Option<Block>) {
        let blocks: Vec<Block> = match only {
            Some(b) => vec![b],
            None => {
                let mut v: Vec<Block> = st.view.blocks().copied().collect();
                v.extend(st.table.blocks().copied());
                v.sort_unstable();
                v.dedup();
                v
            }
        };
        // Used for a few intervals; every full round recomputes it.
        let until = now_ms.saturating_add(self.hold_ms);
        for b in blocks {
            let value = self.value_of(st, throttle, &b, now_ms);
            throttle.set_hot(b, value.map(|w| (w.counts, w.origins)), until);
        }
    }

    /// The signed counts this node keeps of `origin`'s own (as one of their
    /// blocks' owners), for `origin` to relearn after a restart (a v2
    /// handoff; None if there are none).
    pub fn counts_of_origin(&self, origin: &str, now_ms: u64) -> Option<Vec<u8>> {
        let first = self.first_epoch(now_ms);
        let st = self.lock();
        let id = *st.names.ids.get(origin)?;
        let mut counts = Vec::new();
        for b in st.table.blocks() {
            for slot in st.table.slots(b) {
                if slot.origin == id && slot.epoch >= first {
                    counts.push((*b, slot.epoch, slot.counts, slot.sig));
                }
            }
        }
        if counts.is_empty() {
            return None;
        }
        counts.truncate(MAX_BATCH);
        let batch = encode_increments(self.epoch_ms, &counts);
        let handoff = proto::Handoff {
            epoch_ms: batch.epoch_ms,
            base_epoch: batch.base_epoch,
            origins: vec![proto::OriginCounts {
                origin: origin.to_string(),
                counts: batch.counts,
            }],
        };
        Some(self.seal(proto::envelope_v2::Body::Handoff(handoff)))
    }

    /// A handoff from an owner: this node's own signed counts of before a
    /// restart (checked with its own key), merged into its own counts.
    /// Others' counts in it are ignored. Returns how many were merged.
    pub fn on_handoff(&self, throttle: &Throttle, handoff: &proto::Handoff, now_ms: u64) -> usize {
        let mut merged = 0;
        for oc in handoff.origins.iter().filter(|o| o.origin == self.name) {
            let batch = proto::IncrementBatch {
                epoch_ms: handoff.epoch_ms,
                base_epoch: handoff.base_epoch,
                counts: oc.counts.clone(),
            };
            let Ok(counts) = decode_increments(
                &batch,
                self.epoch_ms,
                &self.network,
                &self.name,
                self.signer.alg(),
                self.signer.public_key(),
            ) else {
                dropped("signature");
                continue;
            };
            let mut st = self.lock();
            let st = &mut *st;
            for (b, e, c, sig) in counts {
                throttle.merge(crate::throttle::SELF_ORIGIN, b, e, c, now_ms);
                // As an owner of the block, this node's sum has them too.
                if st.owners_of(&b, self.r).contains(&st.me)
                    && matches!(
                        st.table.merge(b, st.me, e, c, sig),
                        Merge::New | Merge::Grew
                    )
                {
                    st.dirty.insert(b);
                }
                merged += 1;
            }
        }
        merged
    }

    /// Signed counts from `origin` (the peer whose certificate `cert` is):
    /// merged for the blocks this node owns. Returns how many were new.
    pub fn on_increments(
        &self,
        throttle: &Throttle,
        origin: &str,
        cert: &[u8],
        batch: &proto::IncrementBatch,
        now_ms: u64,
    ) -> Result<usize, &'static str> {
        let (alg, key) = self.learn_key(origin, cert).ok_or("key")?;
        let counts = decode_increments(batch, self.epoch_ms, &self.network, origin, alg, &key)
            .map_err(decode_reason)?;
        let first = self.first_epoch(now_ms);
        let current = self.epoch(now_ms);
        let mut st = self.lock();
        let st = &mut *st;
        let id = st.names.id(origin).ok_or("names")?;
        let mut merged = 0;
        for (b, e, c, sig) in counts {
            if e < first || e > current + 1 || !throttle_prefix_ok(throttle, &b) {
                dropped("entry");
                continue;
            }
            if !st.owners_of(&b, self.r).contains(&st.me) {
                // Not ours in this view (members differ for a moment).
                continue;
            }
            match st.table.merge(b, id, e, c, sig) {
                Merge::New | Merge::Grew => {
                    st.dirty.insert(b);
                    merged += 1;
                }
                Merge::Unchanged => {}
                Merge::Full => dropped("table_full"),
            }
        }
        Ok(merged)
    }

    /// Reports relayed by a peer: those of current owners are checked
    /// (signature, with the owner's key) and kept. Returns the reports new
    /// to this node, to forward, and those of owners whose key this node
    /// does not know yet (the caller learns it from a connection to the
    /// owner, [`Hot::learn_key`], and hands them back).
    pub fn on_reports(
        &self,
        throttle: &Throttle,
        relay: proto::HotRelay,
        now_ms: u64,
    ) -> (Vec<proto::HotReport>, Vec<proto::HotReport>) {
        if relay.reports.len() > MAX_REPORTS {
            dropped("malformed");
            return Default::default();
        }
        let first = self.first_epoch(now_ms);
        let current = self.epoch(now_ms);
        let (mut fresh, mut unknown) = (Vec::new(), Vec::new());
        for rep in relay.reports {
            if rep.owner == self.name {
                continue;
            }
            if rep.epoch < first || rep.epoch > current + 1 {
                dropped("stale");
                continue;
            }
            let seen_key = (rep.owner.clone(), rep.seq);
            if self.lock().seen.contains(&seen_key) {
                continue;
            }
            let (alg, key) = match self.owner_key(&rep.owner, &rep.certificate) {
                Ok(k) => k,
                Err(KeyError::Unknown) => {
                    unknown.push(rep);
                    continue;
                }
                Err(KeyError::Bad) => {
                    dropped("certificate");
                    continue;
                }
            };
            let blocks = match decode_report(&rep, self.epoch_ms, &self.network, alg, &key) {
                Ok(b) => b,
                Err(e) => {
                    dropped(decode_reason(e));
                    continue;
                }
            };
            let mut st = self.lock();
            let st = &mut *st;
            if st.seen.len() >= MAX_SEEN {
                st.seen.clear();
            }
            st.seen.insert(seen_key);
            let Some(owner) = st.names.id(&rep.owner) else {
                continue;
            };
            let mut new = false;
            for (b, w) in blocks {
                if !throttle_prefix_ok(throttle, &b) || !st.owners_of(&b, self.r).contains(&owner) {
                    continue;
                }
                let report = Report {
                    owner,
                    seq: rep.seq,
                    epoch: rep.epoch,
                    window: w,
                };
                if st.view.merge(b, report) {
                    new = true;
                    self.apply_view(st, throttle, now_ms, Some(b));
                }
            }
            if new {
                fresh.push(rep);
            }
        }
        (fresh, unknown)
    }

    /// The key of `owner`: from the certificate a report carries (checked
    /// against the network CA and the name, once per certificate), else the
    /// one learnt from a connection to the owner.
    fn owner_key(&self, owner: &str, cert: &[u8]) -> Result<(KeyAlg, Vec<u8>), KeyError> {
        if let Some((c, alg, key)) = self.lock().keys.get(owner) {
            if cert.is_empty() || c.as_slice() == cert {
                return Ok((*alg, key.clone()));
            }
        }
        if cert.is_empty() {
            return Err(KeyError::Unknown);
        }
        let der = CertificateDer::from(cert);
        super::tls::verify_chain(&self.ca, &der, &[]).map_err(|_| KeyError::Bad)?;
        if super::tls::node_name_of(&der).as_deref() != Some(owner) {
            return Err(KeyError::Bad);
        }
        self.learn_key(owner, cert).ok_or(KeyError::Bad)
    }

    /// Keeps the key of `member`'s certificate, which a connection with
    /// mutual TLS (network CA, exact name) has just vouched for.
    pub fn learn_key(&self, member: &str, cert: &[u8]) -> Option<(KeyAlg, Vec<u8>)> {
        let (alg, key) = public_key_of_cert(cert)?;
        let mut st = self.lock();
        if st
            .keys
            .get(member)
            .is_some_and(|(c, _, _)| c.as_slice() == cert)
        {
            return Some((alg, key));
        }
        if st.keys.len() >= MAX_NAMES {
            st.keys.clear();
        }
        st.keys
            .insert(member.to_string(), (cert.to_vec(), alg, key.clone()));
        Some((alg, key))
    }

    /// The gossip address of a live member (None: not one, or this node).
    pub fn member_addr(&self, name: &str) -> Option<SocketAddr> {
        let st = self.lock();
        let id = *st.names.ids.get(name)?;
        st.addr_of(id)
    }

    /// A relay message of `reports` (forwarding).
    pub fn relay_bytes(&self, reports: Vec<proto::HotReport>) -> Vec<u8> {
        self.seal(proto::envelope_v2::Body::Hot(proto::HotRelay { reports }))
    }
}

/// A test-only fault: in a build with the `fault-hooks` feature,
/// `MAGICMX_TEST_LIE_FACTOR=N` makes this node an owner that lies, reporting
/// every block it owns as N times what it counted, from N times the origins
/// (tests check that the median of the owners outvotes it). A build without
/// the feature (every build for use) does not read the variable.
fn lie_factor() -> Option<u32> {
    #[cfg(feature = "fault-hooks")]
    {
        static FACTOR: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
        *FACTOR.get_or_init(|| {
            std::env::var("MAGICMX_TEST_LIE_FACTOR")
                .ok()
                .and_then(|v| v.parse().ok())
        })
    }
    #[cfg(not(feature = "fault-hooks"))]
    None
}

fn lie(w: Window, f: u32) -> Window {
    let m = |n: u32| n.saturating_mul(f);
    Window {
        counts: Counts {
            connections: m(w.counts.connections),
            messages: m(w.counts.messages),
            recipients: m(w.counts.recipients),
        },
        origins: m(w.origins),
    }
}

/// A block whose own count grew by this much since it was last sent goes
/// to its owners at the next quick round rather than the interval.
const BURST: u32 = 2;

fn grew_by(c: &Counts, sent: &Counts) -> u32 {
    (c.connections.saturating_sub(sent.connections))
        .max(c.messages.saturating_sub(sent.messages))
        .max(c.recipients.saturating_sub(sent.recipients))
}

/// A report of a block that passed its limit is sent this many more times,
/// this far apart.
const AGAIN: u8 = 2;
const AGAIN_MS: u64 = 200;

/// Steps between reports of a hot block, as a fraction of its limit.
const REPORT_STEP: f64 = 0.1;

/// The report level of a window: which step of [`REPORT_STEP`] × limit its
/// highest field reached, and a level of its own once over a limit.
fn level(c: &Counts, limits: &Counts) -> u32 {
    let fields = [
        (c.connections, limits.connections),
        (c.messages, limits.messages),
        (c.recipients, limits.recipients),
    ];
    if fields.iter().any(|(n, l)| n > l) {
        return u32::MAX;
    }
    let ratio = fields
        .iter()
        .map(|(n, l)| *n as f64 / (*l).max(1) as f64)
        .fold(0.0, f64::max);
    (ratio / REPORT_STEP) as u32
}

/// Why a report's key is missing.
enum KeyError {
    /// No certificate in the report and none learnt yet.
    Unknown,
    /// A certificate that is not the network's or not the owner's.
    Bad,
}

fn throttle_prefix_ok(throttle: &Throttle, b: &Block) -> bool {
    // The throttle's own block of the network address: same prefix.
    throttle.block_of(b.0.network()) == *b
}

fn decode_reason(e: owners::DecodeError) -> &'static str {
    match e {
        owners::DecodeError::EpochLength => "epoch_ms",
        owners::DecodeError::Malformed => "malformed",
        owners::DecodeError::Signature => "signature",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ThrottleConfig, TrustConfig};

    fn node(dir: &std::path::Path, name: &str) -> (Hot, Vec<u8>) {
        super::super::ca::issue(name, dir).unwrap();
        let m = super::super::tls::Material::load(
            &dir.join("ca.pem"),
            &dir.join(format!("{name}.pem")),
            &dir.join(format!("{name}.key")),
        )
        .unwrap();
        let hot = Hot::new(
            name,
            "net",
            3,
            0.5,
            // The throttle's default epoch (1 min) and window (1 h).
            60_000,
            60,
            1_000,
            m.key.secret_der(),
            &m.chain[0],
            m.ca.clone(),
        )
        .unwrap();
        (hot, m.chain[0].to_vec())
    }

    fn throttle(name: &str) -> Throttle {
        let cfg = ThrottleConfig {
            max_connections: 10,
            ..ThrottleConfig::default()
        };
        Throttle::new(&cfg, &TrustConfig::default(), name).with_change_feed()
    }

    fn hot_relay(out: &[Out]) -> proto::HotRelay {
        let (_, bytes, _) = out.iter().find(|o| o.2 == "hot").expect("a hot report");
        match owners::open(bytes, "net").unwrap().1 {
            proto::envelope_v2::Body::Hot(r) => r,
            _ => panic!("not a hot relay"),
        }
    }

    fn increments_to(out: &[Out], to: SocketAddr) -> Vec<proto::IncrementBatch> {
        out.iter()
            .filter(|o| o.0 == to && o.2 == "increments")
            .map(|o| match owners::open(&o.1, "net").unwrap().1 {
                proto::envelope_v2::Body::Increments(b) => b,
                _ => panic!("not increments"),
            })
            .collect()
    }

    /// Three owners of every block (three members, r = 3): a cold block is
    /// never reported; a hot one is, by each owner; a report of an owner
    /// this node never talked to waits for its key (learnt from a
    /// connection), then counts; the median needs two owners' reports; a
    /// report under another key is refused.
    #[test]
    fn reports_wait_for_owner_keys_and_cold_blocks_stay_quiet() {
        let dir = tempfile::tempdir().unwrap();
        super::super::ca::init(dir.path()).unwrap();
        let (n1, cert1) = node(dir.path(), "n1");
        let (n2, _) = node(dir.path(), "n2");
        let (n3, cert3) = node(dir.path(), "n3");
        let a: Vec<SocketAddr> = (1..=3)
            .map(|i| format!("127.0.0.1:700{i}").parse().unwrap())
            .collect();
        assert!(n1.set_members([("n2", a[1]), ("n3", a[2])].into_iter()));
        assert!(n2.set_members([("n1", a[0]), ("n3", a[2])].into_iter()));
        assert!(n3.set_members([("n1", a[0]), ("n2", a[1])].into_iter()));
        let (t1, t2, t3) = (throttle("n1"), throttle("n2"), throttle("n3"));
        let now = 1_000_000_000;
        let ip: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let block = t1.block_of(ip);
        assert_eq!(n2.owner_names(&block).len(), 3);

        // Cold (4 of 10 at n1): increments to the other owners, no report.
        for _ in 0..4 {
            t1.on_connect(ip, now);
        }
        let (out, stats) = n1.round(&t1, now, true, false, &[a[1]]);
        assert_eq!(stats.hot_reported, 0);
        assert!(out.iter().all(|o| o.2 == "increments"));
        for b in increments_to(&out, a[2]) {
            assert_eq!(n3.on_increments(&t3, "n1", &cert1, &b, now), Ok(1));
        }
        let (out3, stats) = n3.round(&t3, now, false, false, &[a[1]]);
        assert_eq!((stats.hot_reported, out3.len()), (0, 0));

        // Hot (6 of 10): a burst goes out at a quick round; both n1 and n3
        // report it.
        for _ in 0..2 {
            t1.on_connect(ip, now);
        }
        let (out, stats) = n1.round(&t1, now, false, false, &[a[1]]);
        assert_eq!(stats.hot_reported, 1);
        let from1 = hot_relay(&out);
        for b in increments_to(&out, a[2]) {
            n3.on_increments(&t3, "n1", &cert1, &b, now).unwrap();
        }
        let (out3, stats) = n3.round(&t3, now, false, false, &[a[1]]);
        assert_eq!(stats.hot_reported, 1);
        let from3 = hot_relay(&out3);

        // n2 knows neither key yet: both wait, nothing counts.
        let (fresh, unknown) = n2.on_reports(&t2, from1.clone(), now);
        assert_eq!((fresh.len(), unknown.len()), (0, 1));
        let (_, unknown3) = n2.on_reports(&t2, from3.clone(), now);
        assert_eq!(t2.status(block, now).counts.connections, 0);

        // One owner's key: its report alone is not the median of three.
        assert!(n2.learn_key("n1", &cert1).is_some());
        let (fresh, _) = n2.on_reports(&t2, from1.clone(), now);
        assert_eq!(fresh.len(), 1);
        assert_eq!(t2.status(block, now).counts.connections, 0);
        // The second owner's: the median is the true count.
        assert!(n2.learn_key("n3", &cert3).is_some());
        let (fresh, _) = n2.on_reports(&t2, proto::HotRelay { reports: unknown3 }, now);
        assert_eq!(fresh.len(), 1);
        let st = t2.status(block, now);
        assert_eq!((st.counts.connections, st.origins), (6, 1));
        assert_eq!(n2.reports_of(&block).len(), 2);
        // The same report again is not news.
        let (fresh, _) = n2.on_reports(&t2, from1.clone(), now);
        assert!(fresh.is_empty());

        // A node holding another key under n1's name refuses n1's report.
        let (n4, _) = node(dir.path(), "n4");
        assert!(n4.set_members([("n1", a[0]), ("n3", a[2])].into_iter()));
        n4.learn_key("n1", &cert3);
        let (fresh, unknown) = n4.on_reports(&throttle("n4"), from1, now);
        assert!(
            fresh.is_empty() && unknown.is_empty(),
            "a report checked with another key was taken"
        );
    }

    /// After a leave and after a join, exactly the blocks whose owners
    /// changed are marked moved (about r/N of them), and every cached
    /// owner list equals one computed from scratch.
    #[test]
    fn only_the_blocks_whose_owners_changed_move() {
        let dir = tempfile::tempdir().unwrap();
        super::super::ca::init(dir.path()).unwrap();
        let (n0, _) = node(dir.path(), "n0");
        let names: Vec<String> = (1..20).map(|i| format!("n{i}")).collect();
        let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let blocks: Vec<Block> = (0..2_000u32)
            .map(|i| Block(format!("10.{}.{}.0/24", i >> 8, i & 255).parse().unwrap()))
            .collect();
        let owners_now = |live: &[String]| -> Vec<Vec<String>> {
            n0.set_members(live.iter().map(|n| (n.as_str(), addr)));
            blocks.iter().map(|b| n0.owner_names(b)).collect()
        };
        owners_now(&names);
        n0.lock().moved.clear();
        for live in [names[1..].to_vec(), names.clone()] {
            let last = blocks.iter().map(|b| n0.owner_names(b)).collect::<Vec<_>>();
            n0.set_members(live.iter().map(|n| (n.as_str(), addr)));
            let moved: HashSet<Block> = std::mem::take(&mut n0.lock().moved).into_keys().collect();
            let now: Vec<Vec<String>> = blocks.iter().map(|b| n0.owner_names(b)).collect();
            let changed: HashSet<Block> = blocks
                .iter()
                .zip(last.iter().zip(&now))
                .filter(|(_, (a, b))| a != b)
                .map(|(b, _)| *b)
                .collect();
            assert_eq!(moved, changed);
            assert!(
                (100..=500).contains(&moved.len()),
                "{} of 2000 moved with r = 3, N = 20",
                moved.len()
            );
            // From scratch: a fresh node with the same members agrees.
            let (fresh, _) = node(dir.path(), &format!("x{}", live.len()));
            let mut with_n0 = live.clone();
            with_n0.push("n0".into());
            fresh.set_members(with_n0.iter().map(|n| (n.as_str(), addr)));
            let scratch: Vec<Vec<String>> = blocks.iter().map(|b| fresh.owner_names(b)).collect();
            let strip = |v: &Vec<Vec<String>>| -> Vec<Vec<String>> {
                v.iter()
                    .map(|o| o.iter().filter(|n| !n.starts_with('x')).cloned().collect())
                    .collect()
            };
            // `fresh` is a member too: compare the blocks it does not own.
            for (i, (a, b)) in now.iter().zip(strip(&scratch)).enumerate() {
                if scratch[i].iter().all(|n| !n.starts_with('x')) {
                    assert_eq!(*a, b, "block {i}");
                }
            }
        }
    }
}
