//! The new design (issue 15): owners per block, signed increments, a
//! broadcast hot set. Runs the real `magicmx::gossip::owners` code
//! (`owners_ranked` / `weight` for the rendezvous owners, `Outbox`,
//! `increment_message` + `Signer` + `decode_increments` for signed
//! increments, `OwnerTable`, `is_hot`, `report_message` + `encode_report` +
//! `decode_report`, `HotView` and its median, `decide`), with the v2
//! protobuf envelope for every byte count, over a simulated network
//! (virtual time, 5-50 ms latency, 1 % loss). The model is in `main.rs`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use ipnet::{IpNet, Ipv4Net};
use magicmx::gossip::owners::{
    self, block_key, decide, decode_increments, decode_report, encode_increments, encode_report,
    increment_message, is_hot, member_key, report_message, seal, weight, KeyAlg, Outbox,
    OwnerTable, Report, Signature, Signer, Window,
};
use magicmx::gossip::wire::{block_from_wire, block_to_wire, proto};
use magicmx::throttle::{Block, Counts};
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;

const NET: &str = "magicmx";
const EPOCH_MS: u64 = 60_000;
const WINDOW_EPOCHS: u64 = 60;
/// Virtual start: an epoch boundary plus 30 s (epochs change mid-run).
const T0: u64 = 1_800_000_000_000 + 30_000;
/// Ranked candidates kept per block (the owners are the first `r`).
const K: usize = 6;
/// Origin ids at and above this stand for the many past origins of a
/// block's starting window (see `Sim::new`).
const PSEUDO: u32 = 1 << 30;
/// A report level meaning "report again whatever the level".
const FORCED: u32 = u32::MAX - 1;
/// Origin ids at and above this (below `PSEUDO`) are the counts of before
/// the run that origin `id - HIST` re-sent (origins mode).
const HIST: u32 = 1 << 29;

#[derive(Clone, Debug)]
pub struct Params {
    pub nodes: usize,
    pub blocks: usize,
    /// Background connection attempts per second, network-wide.
    pub rate: f64,
    /// Zipf exponent of the background's block choice (0 = uniform).
    pub zipf: f64,
    pub floods: usize,
    pub flood_rate: u64,
    pub flood_secs: u64,
    pub limit: u32,
    pub owners: usize,
    pub hot_fraction: f64,
    pub min_origins: u32,
    /// Outbox batching of cold blocks.
    pub interval_ms: u64,
    /// Delay before an origin flushes an increment of a block it knows is
    /// hot, before an owner reports a hot block whose count changed, and
    /// before a node forwards new reports (one batch per delay).
    pub relay_ms: u64,
    pub fanout: usize,
    /// Owners re-report all their hot blocks this often (joiners, losses).
    pub refresh_ms: u64,
    /// An owner reports a hot block when its window passes the next step
    /// of `report_step` x limit, and when it passes the limit (0 = on every
    /// change).
    pub report_step: f64,
    /// An owner re-sends the report of a block that passed the limit this
    /// many more times, `again_ms` apart (one push epidemic misses about
    /// e^-fanout of the nodes).
    pub again: u32,
    pub again_ms: u64,
    /// Reports kept per block in a `HotView` (2r: see `main.rs`).
    pub hot_rmax: usize,
    /// Fraction of nodes leaving, and as many joining, during the run.
    pub churn: f64,
    /// SWIM's failure detection delay (a leave is seen this much later).
    pub detect_ms: u64,
    /// Blocks handed off on an owner change: window >= this x limit.
    pub handoff_min: f64,
    /// Who tells a block's new owners: the old owners (`Handoff`, above)
    /// or the origins (the live node's policy, `src/gossip/hot.rs`).
    pub resend: Resend,
    /// Origins: cold moved blocks re-sent per full round, and most queued.
    pub cold_budget: usize,
    pub cold_max: usize,
    /// Origins: the quick round (hot and bursting blocks, reports).
    pub quick_ms: u64,
    /// Origins: a membership change makes the next quick round a full one
    /// (`full || changed` in `Gossip::owners_round`).
    pub full_on_change: bool,
    /// Origins: re-sent counts go to all r owners (live) or only to the
    /// owners that are new.
    pub resend_all: bool,
    /// Origins: a block's count grown by this much since its last send is
    /// sent at the next quick round (a burst).
    pub burst: u32,
    /// Origins (a variation, not the live node): a moved cold block with
    /// own counts sent in this epoch or the last is re-sent at once too,
    /// only older ones wait in the budgeted queue.
    pub recent_first: bool,
    /// Verify the signatures of 1 increment batch in this many.
    pub verify_every: u64,
    pub latency_ms: (u64, u64),
    pub loss: f64,
    pub duration_ms: u64,
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resend {
    Handoff,
    Origins,
}

impl Params {
    /// The live node's policy (`src/gossip/hot.rs`): no handoff, origins
    /// re-send on an owner change, quick rounds of 50 ms, reports forwarded
    /// at once to 3 peers, no repeats, a refresh every 10 s.
    pub fn live(&mut self) {
        self.resend = Resend::Origins;
        self.fanout = 3;
        self.relay_ms = 0;
        self.again = 0;
        self.refresh_ms = 10_000;
        self.handoff_min = f64::INFINITY;
    }

    pub fn new(nodes: usize, blocks: usize, rate: f64) -> Params {
        Params {
            nodes,
            blocks,
            rate,
            zipf: 0.0,
            floods: 20,
            flood_rate: 20,
            flood_secs: 10,
            limit: 120,
            owners: owners::DEFAULT_OWNERS,
            hot_fraction: owners::DEFAULT_HOT_FRACTION,
            min_origins: owners::DEFAULT_MIN_ORIGINS_TO_REFUSE,
            interval_ms: 1000,
            relay_ms: 25,
            fanout: 4,
            refresh_ms: 20_000,
            report_step: 0.1,
            again: 2,
            again_ms: 200,
            hot_rmax: 2 * owners::DEFAULT_OWNERS,
            churn: 0.1,
            detect_ms: 2_000,
            // Only hot blocks: see "Handoff" in main.rs.
            handoff_min: owners::DEFAULT_HOT_FRACTION,
            resend: Resend::Handoff,
            cold_budget: 256,
            cold_max: 1 << 16,
            quick_ms: 50,
            full_on_change: true,
            resend_all: true,
            burst: 2,
            recent_first: false,
            verify_every: 10,
            latency_ms: (5, 50),
            loss: 0.01,
            duration_ms: 30_000,
            seed: 42,
        }
    }
}

enum Ev {
    Attempt,
    Flood(usize),
    Victim,
    Tick(u32),
    Flush(u32),
    /// Origins mode: a quick round of the node (on its 50 ms grid).
    Round(u32),
    Report(u32),
    Again(u32, u32, u32),
    Refresh(u32),
    Relay(u32),
    Leave(u32),
    Detected(u32),
    Join(u32),
    Increments {
        to: u32,
        from: u32,
        batch: Arc<proto::IncrementBatch>,
        verify: bool,
        /// The last `past` counts are re-sent counts of the window before
        /// the run (see `Sim::past`).
        past: usize,
    },
    Hot {
        to: u32,
        relay: Arc<proto::HotRelay>,
    },
    Handoff {
        to: u32,
        slots: Arc<Vec<(u32, Slot)>>,
    },
}

type Sig = Option<Box<Signature>>;
type Slot = owners::Slot<u32, Sig>;

struct Item {
    t: u64,
    seq: u64,
    ev: Ev,
}
impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        (self.t, self.seq) == (o.t, o.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> Ordering {
        (o.t, o.seq).cmp(&(self.t, self.seq))
    }
}

#[derive(Default, Clone, Copy)]
pub struct Bytes {
    pub increments: u64,
    pub hot: u64,
    pub handoff: u64,
}

impl Bytes {
    pub fn total(&self) -> u64 {
        self.increments + self.hot + self.handoff
    }
}

struct Node {
    alive: bool,
    joined: u64,
    left: Option<u64>,
    signer: Signer,
    own: HashMap<(u32, u64), u32>,
    outbox: Outbox<u32>,
    table: OwnerTable<u32, u32, Sig>,
    hot: HotView,
    dirty: HashSet<u32>,
    /// Per owned hot block, the level last reported (see `level`).
    levels: HashMap<u32, u32>,
    report_at: bool,
    flush_at: bool,
    relay_buf: Vec<proto::HotReport>,
    relay_at: bool,
    seq: u64,
    bytes: Bytes,
    /// Origins mode: the phase of the node's quick rounds, a round queued,
    /// members changed since the last full round, blocks whose owners
    /// changed (not yet looked at), cold ones to re-send.
    phase: u64,
    round_at: bool,
    changed: bool,
    moved: HashSet<u32>,
    cold: VecDeque<u32>,
}

type HotView = owners::HotView<u32, u32>;

pub struct Outcome {
    pub p: Params,
    /// Bytes sent per node per second, sorted.
    pub bps: Vec<f64>,
    pub bytes: Bytes,
    /// Per flood: the delay from the true crossing to every node refusing
    /// (None: some node never refused).
    pub every: Vec<Option<u64>>,
    /// Per (flood, node): the delay to that node refusing.
    pub per_node: Vec<u64>,
    pub leaks: Vec<f64>,
    pub victim_refusals: u64,
    pub victim_checks: u64,
    pub victim_true: u32,
    pub hot_blocks: usize,
    pub verified: u64,
    pub signed: u64,
    pub owner_changes: u64,
    pub handed_off: u64,
    pub owner_checks: u64,
    /// Origins mode: counts re-sent (of the run, of the window before it),
    /// cold blocks dropped from a full queue, the longest queue.
    pub resent: u64,
    pub resent_past: u64,
    pub cold_dropped: u64,
    pub cold_peak: usize,
    pub full_rounds: u64,
    pub wall: f64,
    pub setup: f64,
}

struct Sim {
    p: Params,
    rng: StdRng,
    queue: BinaryHeap<Item>,
    seq: u64,
    nodes: Vec<Node>,
    names: Vec<String>,
    mkeys: Vec<u64>,
    public: Vec<Vec<u8>>,
    /// Members in everyone's view (SWIM is not simulated: a join is seen at
    /// once, a leave `detect_ms` later, by every node).
    view: Vec<u32>,
    in_view: Vec<bool>,
    alive: Vec<u32>,
    /// Per block: the top-K candidates (weight, member key, member).
    ranked: Vec<Vec<(u64, u64, u32)>>,
    bkeys: Vec<u64>,
    /// Member -> blocks whose candidates list it (may be stale).
    index: Vec<Vec<u32>>,
    limits: Counts,
    cap: Counts,
    flood_ids: Vec<u32>,
    flood_of: HashMap<u32, usize>,
    truth: Vec<u32>,
    crossed: Vec<Option<u64>>,
    admitted: Vec<u32>,
    refused_at: Vec<HashMap<u32, u64>>,
    victim: u32,
    liar: u32,
    victim_refusals: u64,
    victim_checks: u64,
    victim_true: u32,
    verified_reports: HashSet<(u32, u64)>,
    verified: u64,
    signed: u64,
    owner_changes: u64,
    handed_off: u64,
    owner_checks: u64,
    /// Origins mode: per background block, its window before the run as
    /// chunks (age in epochs, connections), the connections from origins
    /// given by `past_origin` (initial members), so that each origin can
    /// re-send its share when the block's owners change.
    past: Vec<Vec<(u8, u8)>>,
    /// Origins mode: per block, the nodes that sent counts of it in the run.
    senders: HashMap<u32, Vec<u32>>,
    /// Origins mode: per block, its owners before its last owner change.
    prev_owners: HashMap<u32, Vec<u32>>,
    resent: u64,
    resent_past: u64,
    cold_dropped: u64,
    cold_peak: usize,
    full_rounds: u64,
    zipf_cdf: Vec<f64>,
    /// Time of the next background attempt, ms after T0.
    next_attempt: f64,
}

fn epoch(t: u64) -> u64 {
    t / EPOCH_MS
}

fn first_epoch(t: u64) -> u64 {
    epoch(t) - (WINDOW_EPOCHS - 1)
}

/// Block id -> block: background ids are /24s from 10.0.0.0, floods from
/// 172.16.0.0.
fn block_of_id(id: u32, blocks: usize) -> Block {
    let (base, i) = if (id as usize) < blocks {
        (u32::from(Ipv4Addr::new(10, 0, 0, 0)), id)
    } else {
        (u32::from(Ipv4Addr::new(172, 16, 0, 0)), id - blocks as u32)
    };
    let net = Ipv4Net::new(Ipv4Addr::from(base + (i << 8)), 24).expect("prefix 24");
    Block(IpNet::V4(net))
}

fn id_of_block(b: &Block, blocks: usize) -> Option<u32> {
    let IpNet::V4(n) = b.0 else { return None };
    let a = u32::from(n.network());
    let ten = u32::from(Ipv4Addr::new(10, 0, 0, 0));
    let f = u32::from(Ipv4Addr::new(172, 16, 0, 0));
    if a >= f && a < f + (1 << 20) {
        Some(blocks as u32 + ((a - f) >> 8))
    } else if a >= ten && a < ten + (1 << 24) {
        Some((a - ten) >> 8)
    } else {
        None
    }
}

fn conn(n: u32) -> Counts {
    Counts {
        connections: n,
        messages: 0,
        recipients: 0,
    }
}

fn poisson(rng: &mut StdRng, lambda: f64) -> u32 {
    let l = (-lambda).exp();
    let mut k = 0;
    let mut p = 1.0;
    loop {
        p *= rng.random::<f64>();
        if p <= l {
            return k;
        }
        k += 1;
    }
}

fn new_signer() -> Signer {
    let der = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
    Signer::from_pkcs8(KeyAlg::Ed25519, der.as_ref()).expect("key")
}

/// The real rendezvous owners of every block over `members`, K candidates
/// each (two threads).
fn rank_all(bkeys: &[u64], members: &[(u64, u32)]) -> Vec<Vec<(u64, u64, u32)>> {
    let half = bkeys.len() / 2;
    let (a, b) = bkeys.split_at(half);
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            a.iter()
                .map(|k| owners::owners_ranked(*k, members.iter().copied(), K))
                .collect::<Vec<_>>()
        });
        let mut rest: Vec<_> = b
            .iter()
            .map(|k| owners::owners_ranked(*k, members.iter().copied(), K))
            .collect();
        let mut v = h.join().expect("ranking thread");
        v.append(&mut rest);
        v
    })
}

impl Sim {
    fn new(p: Params) -> Sim {
        let mut rng = StdRng::seed_from_u64(p.seed);
        let total = p.nodes + (p.nodes as f64 * p.churn).round() as usize;
        let names: Vec<String> = (0..total).map(|i| format!("n{i}")).collect();
        let mkeys: Vec<u64> = names.iter().map(|n| member_key(n)).collect();
        let signers: Vec<Signer> = (0..total).map(|_| new_signer()).collect();
        let public = signers.iter().map(|s| s.public_key().to_vec()).collect();
        let nblocks = p.blocks + p.floods;
        let bkeys: Vec<u64> = (0..nblocks as u32)
            .map(|i| block_key(&block_of_id(i, p.blocks)))
            .collect();
        let members: Vec<(u64, u32)> = (0..p.nodes as u32)
            .map(|i| (mkeys[i as usize], i))
            .collect();
        let ranked = rank_all(&bkeys, &members);
        let mut index = vec![Vec::new(); total];
        for (b, r) in ranked.iter().enumerate() {
            for e in r {
                index[e.2 as usize].push(b as u32);
            }
        }
        let lim = p.limit;
        let limits = Counts {
            connections: lim,
            messages: 1_000_000,
            recipients: 1_000_000,
        };
        let cap = Counts {
            connections: lim / 2,
            messages: 500_000,
            recipients: 500_000,
        };
        let mut nodes: Vec<Node> = signers
            .into_iter()
            .enumerate()
            .map(|(i, signer)| Node {
                alive: i < p.nodes,
                joined: if i < p.nodes { 0 } else { u64::MAX },
                left: None,
                signer,
                own: HashMap::new(),
                outbox: Outbox::new(100_000),
                table: OwnerTable::new(usize::MAX),
                // Room for the reports of owners that were replaced (see
                // the note on `HotView::merge` in main.rs: with exactly r,
                // an owner change makes reports evict each other).
                hot: HotView::new(100_000, p.hot_rmax),
                dirty: HashSet::new(),
                levels: HashMap::new(),
                report_at: false,
                flush_at: false,
                relay_buf: Vec::new(),
                relay_at: false,
                seq: 0,
                bytes: Bytes::default(),
                phase: 0,
                round_at: false,
                changed: false,
                moved: HashSet::new(),
                cold: VecDeque::new(),
            })
            .collect();
        // The starting window: each background block has Poisson(rate x
        // window / blocks) past connections (36 at 10,000/s over 1M
        // blocks), kept by each of its owners in chunks of at most 12 under
        // pseudo-origins (standing for the distinct past origins; a handoff
        // is sized as one signed count per past connection).
        let lambda = p.rate * (WINDOW_EPOCHS * EPOCH_MS) as f64 / 1000.0 / p.blocks as f64;
        let now = epoch(T0);
        let victim = rng.random_range(0..p.blocks as u32);
        let origins = p.resend == Resend::Origins;
        let mut past = vec![Vec::new(); if origins { p.blocks } else { 0 }];
        for b in 0..p.blocks as u32 {
            let n = if b == victim {
                80
            } else {
                poisson(&mut rng, lambda)
            };
            let mut left = n;
            let mut k = 0;
            while left > 0 {
                let c = left.min(12);
                left -= c;
                let e = now - rng.random_range(0..WINDOW_EPOCHS);
                if origins {
                    past[b as usize].push(((now - e) as u8, c as u8));
                }
                for o in ranked[b as usize].iter().take(p.owners) {
                    nodes[o.2 as usize]
                        .table
                        .merge(b, PSEUDO + k, e, conn(c), None);
                }
                k += 1;
            }
        }
        // The liar: the victim's first owner (it stays for the whole run).
        let liar = ranked[victim as usize][0].2;
        let flood_ids: Vec<u32> = (0..p.floods as u32).map(|f| p.blocks as u32 + f).collect();
        let flood_of = flood_ids.iter().enumerate().map(|(f, b)| (*b, f)).collect();
        let zipf_cdf = if p.zipf > 0.0 {
            let mut acc = 0.0;
            let mut v: Vec<f64> = (1..=p.blocks)
                .map(|k| {
                    acc += 1.0 / (k as f64).powf(p.zipf);
                    acc
                })
                .collect();
            for x in &mut v {
                *x /= acc;
            }
            v
        } else {
            Vec::new()
        };
        let mut sim = Sim {
            rng,
            queue: BinaryHeap::new(),
            seq: 0,
            nodes,
            names,
            mkeys,
            public,
            view: (0..p.nodes as u32).collect(),
            in_view: (0..total).map(|i| i < p.nodes).collect(),
            alive: (0..p.nodes as u32).collect(),
            ranked,
            bkeys,
            index,
            limits,
            cap,
            flood_ids,
            flood_of,
            truth: vec![0; p.floods],
            crossed: vec![None; p.floods],
            admitted: vec![0; p.floods],
            refused_at: vec![HashMap::new(); p.floods],
            victim,
            liar,
            victim_refusals: 0,
            victim_checks: 0,
            victim_true: 80,
            verified_reports: HashSet::new(),
            verified: 0,
            signed: 0,
            owner_changes: 0,
            handed_off: 0,
            owner_checks: 0,
            past,
            senders: HashMap::new(),
            prev_owners: HashMap::new(),
            resent: 0,
            resent_past: 0,
            cold_dropped: 0,
            cold_peak: 0,
            full_rounds: 0,
            zipf_cdf,
            next_attempt: 0.0,
            p,
        };
        sim.schedule();
        sim
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Item {
            t,
            seq: self.seq,
            ev,
        });
    }

    fn schedule(&mut self) {
        let p = self.p.clone();
        for i in 0..p.nodes as u32 {
            if p.resend == Resend::Origins {
                self.nodes[i as usize].phase = self.rng.random_range(0..p.quick_ms);
            }
            let ph = self.rng.random_range(0..p.interval_ms);
            self.at(T0 + ph, Ev::Tick(i));
            let ph = self.rng.random_range(0..p.refresh_ms);
            self.at(T0 + ph, Ev::Refresh(i));
        }
        self.at(T0, Ev::Attempt);
        self.at(T0 + 1000, Ev::Victim);
        for f in 0..p.floods {
            let start = self
                .rng
                .random_range(2_000..p.duration_ms - p.flood_secs * 1000 - 2_000);
            for k in 0..p.flood_rate * p.flood_secs {
                self.at(T0 + start + k * 1000 / p.flood_rate, Ev::Flood(f));
            }
        }
        let churn = (p.nodes as f64 * p.churn).round() as u32;
        let span = 1_000..p.duration_ms - 5_000;
        let mut leavers = HashSet::new();
        while (leavers.len() as u32) < churn {
            let n = self.rng.random_range(0..p.nodes as u32);
            if n != self.liar {
                leavers.insert(n);
            }
        }
        let mut leavers: Vec<u32> = leavers.into_iter().collect();
        leavers.sort_unstable();
        for n in leavers {
            let t = self.rng.random_range(span.clone());
            self.at(T0 + t, Ev::Leave(n));
        }
        for j in 0..churn {
            let t = self.rng.random_range(span.clone());
            self.at(T0 + t, Ev::Join(p.nodes as u32 + j));
        }
    }

    fn latency(&mut self) -> Option<u64> {
        if self.rng.random_bool(self.p.loss) {
            return None;
        }
        Some(
            self.rng
                .random_range(self.p.latency_ms.0..=self.p.latency_ms.1),
        )
    }

    fn owners_of(&self, b: u32) -> Vec<u32> {
        self.ranked[b as usize]
            .iter()
            .take(self.p.owners)
            .map(|e| e.2)
            .collect()
    }

    fn peer(&mut self, n: u32) -> u32 {
        loop {
            let p = self.view[self.rng.random_range(0..self.view.len())];
            if p != n {
                return p;
            }
        }
    }

    fn peers(&mut self, n: u32) -> Vec<u32> {
        let want = self.p.fanout.min(self.view.len() - 1);
        let mut v = Vec::with_capacity(want);
        while v.len() < want {
            let p = self.peer(n);
            if !v.contains(&p) {
                v.push(p);
            }
        }
        v
    }

    /// Sends `len` bytes from `from` to `to`: counted, then lost, or
    /// delivered if `to` is still running.
    fn send(&mut self, t: u64, from: u32, len: usize, kind: u8, ev: Ev) {
        let b = &mut self.nodes[from as usize].bytes;
        match kind {
            0 => b.increments += len as u64,
            1 => b.hot += len as u64,
            _ => b.handoff += len as u64,
        }
        if let Some(l) = self.latency() {
            self.at(t + l, ev);
        }
    }

    fn own_window(&self, n: u32, b: u32, t: u64) -> Counts {
        let node = &self.nodes[n as usize];
        let c: u32 = (first_epoch(t)..=epoch(t))
            .filter_map(|e| node.own.get(&(b, e)))
            .sum();
        conn(c)
    }

    fn hot_value(&self, n: u32, b: u32, t: u64) -> Option<Window> {
        let owners = self.owners_of(b);
        self.nodes[n as usize]
            .hot
            .value(&b, &owners, epoch(t).saturating_sub(1))
    }

    fn refuses(&self, n: u32, b: u32, t: u64) -> bool {
        let own = self.own_window(n, b, t);
        let sent = self.nodes[n as usize]
            .outbox
            .sent(b, first_epoch(t), epoch(t));
        let hot = self.hot_value(n, b, t);
        decide(own, sent, hot, &self.limits, self.p.min_origins).is_some()
    }

    /// After node `n`'s view of block `b` changed.
    fn check(&mut self, n: u32, b: u32, t: u64) {
        if let Some(&f) = self.flood_of.get(&b) {
            if !self.refused_at[f].contains_key(&n) && self.refuses(n, b, t) {
                self.refused_at[f].insert(n, t);
            }
        } else if b == self.victim {
            self.victim_checks += 1;
            if self.refuses(n, b, t) {
                self.victim_refusals += 1;
            }
        }
    }

    /// A connection attempt from block `b` at node `n`: decided, then
    /// counted (refused connections count too, as in the throttle).
    fn attempt(&mut self, n: u32, b: u32, t: u64) -> bool {
        let refused = self.refuses(n, b, t);
        let e = epoch(t);
        let node = &mut self.nodes[n as usize];
        let c = node.own.entry((b, e)).or_default();
        *c += 1;
        let c = *c;
        node.outbox.note(b, e, conn(c));
        if self.p.resend == Resend::Origins {
            // The live quick round: hot blocks, and bursts (two or more
            // since the last send).
            let sent = node.outbox.sent(b, e, e).connections;
            let hot = node.hot.contains(&b) || node.levels.contains_key(&b);
            let who = self.senders.entry(b).or_default();
            if !who.contains(&n) {
                who.push(n);
            }
            if hot || c.saturating_sub(sent) >= self.p.burst {
                self.wake(n, t);
            }
            return !refused;
        }
        if self.hot_value(n, b, t).is_some() && !self.nodes[n as usize].flush_at {
            self.nodes[n as usize].flush_at = true;
            self.at(t + self.p.relay_ms, Ev::Flush(n));
        }
        !refused
    }

    fn random_node(&mut self) -> u32 {
        self.alive[self.rng.random_range(0..self.alive.len())]
    }

    fn random_block(&mut self) -> u32 {
        if self.zipf_cdf.is_empty() {
            return self.rng.random_range(0..self.p.blocks as u32);
        }
        let u: f64 = self.rng.random();
        let i = self.zipf_cdf.partition_point(|x| *x < u);
        // Scatter the ranks over the ids (rank 1 is not block 0).
        ((i as u64).wrapping_mul(2_654_435_761) % self.p.blocks as u64) as u32
    }

    /// Sends the outbox: one signed increment batch per owner.
    fn flush(&mut self, n: u32, t: u64) {
        let node = &mut self.nodes[n as usize];
        node.outbox.prune(first_epoch(t));
        node.own.retain(|(_, e), _| *e >= first_epoch(t));
        let changes = node.outbox.take();
        if changes.is_empty() {
            return;
        }
        let mut per: HashMap<u32, Vec<(Block, u64, Counts, Signature)>> = HashMap::new();
        for (b, e, c) in changes {
            let block = block_of_id(b, self.p.blocks);
            let msg = increment_message(NET, &self.names[n as usize], &block, e, &c);
            let sig = self.nodes[n as usize].signer.sign(&msg).expect("sign");
            self.signed += 1;
            for o in self.owners_of(b) {
                if o != n {
                    per.entry(o).or_default().push((block, e, c, sig));
                } else {
                    let sig = Some(Box::new(sig));
                    self.merge_local(n, b, n, e, c, sig, t);
                }
            }
        }
        let mut per: Vec<_> = per.into_iter().collect();
        per.sort_unstable_by_key(|x| x.0);
        for (o, entries) in per {
            let batch = encode_increments(EPOCH_MS, &entries);
            let env = seal(
                NET,
                &self.names[n as usize],
                proto::envelope_v2::Body::Increments(batch),
            );
            let bytes = env.encode_to_vec();
            let back = proto::EnvelopeV2::decode(bytes.as_slice()).expect("own envelope");
            let Some(proto::envelope_v2::Body::Increments(batch)) = back.body else {
                unreachable!()
            };
            let verify = self.rng.random_range(0..self.p.verify_every) == 0;
            self.send(
                t,
                n,
                bytes.len(),
                0,
                Ev::Increments {
                    to: o,
                    from: n,
                    batch: Arc::new(batch),
                    verify,
                    past: 0,
                },
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn merge_local(&mut self, n: u32, b: u32, origin: u32, e: u64, c: Counts, sig: Sig, t: u64) {
        let node = &mut self.nodes[n as usize];
        node.table.merge(b, origin, e, c, sig);
        let w = node.table.window(&b, first_epoch(t), &self.cap);
        let liar = n == self.liar && b == self.victim;
        if is_hot(&w.counts, &self.limits, self.p.hot_fraction) || liar {
            node.dirty.insert(b);
            if self.p.resend == Resend::Origins {
                self.wake(n, t);
            } else if !node.report_at {
                node.report_at = true;
                self.at(t + self.p.relay_ms, Ev::Report(n));
            }
        }
    }

    fn on_increments(
        &mut self,
        to: u32,
        from: u32,
        batch: &proto::IncrementBatch,
        verify: bool,
        past: usize,
        t: u64,
    ) {
        let mut entries: Vec<(Block, u64, Counts, Signature)> = if verify {
            self.verified += batch.counts.len() as u64;
            decode_increments(
                batch,
                EPOCH_MS,
                NET,
                &self.names[from as usize],
                KeyAlg::Ed25519,
                &self.public[from as usize],
            )
            .expect("honest increments verify")
        } else {
            // The same decoding without the signature check.
            batch
                .counts
                .iter()
                .map(|s| {
                    let b = block_from_wire(&s.block, s.prefix_len).expect("block");
                    let c = Counts {
                        connections: s.connections,
                        messages: s.messages,
                        recipients: s.recipients,
                    };
                    let sig: Signature = s.signature.as_slice().try_into().expect("64 octets");
                    (b, batch.base_epoch + s.epoch_offset, c, sig)
                })
                .collect()
        };
        let old = entries.split_off(entries.len() - past);
        for (block, e, c, _) in old {
            if let Some(b) = id_of_block(&block, self.p.blocks) {
                self.merge_past(to, from, b, e, c, t);
            }
        }
        for (block, e, c, sig) in entries {
            let Some(b) = id_of_block(&block, self.p.blocks) else {
                continue;
            };
            // Only for blocks this node owns in its view.
            if !self.owners_of(b).contains(&to) {
                continue;
            }
            self.merge_local(to, b, from, e, c, Some(Box::new(sig)), t);
        }
    }

    /// The report level of a window: which step of `report_step` x limit
    /// it reached, and a level of its own once over the limit.
    fn level(&self, w: &Window) -> u32 {
        let c = w.counts.connections;
        if c > self.p.limit {
            return u32::MAX;
        }
        if self.p.report_step <= 0.0 {
            return c;
        }
        (c as f64 / (self.p.report_step * self.p.limit as f64)) as u32
    }

    /// An owner reports its dirty hot blocks whose level changed (all its
    /// hot blocks on a refresh).
    fn report(&mut self, n: u32, t: u64, all: bool) {
        let node = &mut self.nodes[n as usize];
        node.report_at = false;
        node.table.prune(first_epoch(t));
        let mut ids: Vec<u32> = if all {
            node.table
                .blocks()
                .copied()
                .filter(|b| {
                    is_hot(
                        &node.table.window(b, first_epoch(t), &self.cap).counts,
                        &self.limits,
                        self.p.hot_fraction,
                    )
                })
                .collect()
        } else {
            node.dirty.drain().collect()
        };
        node.dirty.clear();
        if n == self.liar && !ids.contains(&self.victim) {
            ids.push(self.victim);
        }
        ids.sort_unstable();
        let mut blocks: Vec<(Block, Window)> = Vec::with_capacity(ids.len());
        for b in ids {
            if !self.owners_of(b).contains(&n) {
                continue;
            }
            let mut w = self.nodes[n as usize]
                .table
                .window(&b, first_epoch(t), &self.cap);
            if n == self.liar && b == self.victim {
                w.counts.connections = w.counts.connections.saturating_mul(100);
                w.origins = w.origins.saturating_mul(100);
            } else {
                let l = self.level(&w);
                let last = self.nodes[n as usize].levels.insert(b, l);
                if !all && last == Some(l) {
                    continue;
                }
                // FORCED: a repeat (Ev::Again), which schedules no more.
                if l == u32::MAX
                    && last.is_some_and(|x| x != u32::MAX && x != FORCED)
                    && self.p.again > 0
                {
                    self.at(t + self.p.again_ms, Ev::Again(n, b, self.p.again));
                }
            }
            blocks.push((block_of_id(b, self.p.blocks), w));
        }
        if blocks.is_empty() {
            return;
        }
        let node = &mut self.nodes[n as usize];
        node.seq += 1;
        let seq = node.seq;
        let msg = report_message(NET, &self.names[n as usize], epoch(t), seq, &blocks);
        let sig = node.signer.sign(&msg).expect("sign");
        self.signed += 1;
        let rep = encode_report(
            &self.names[n as usize],
            EPOCH_MS,
            epoch(t),
            seq,
            &blocks,
            &sig,
        );
        self.on_reports(n, vec![rep], t);
    }

    /// Node `n` has reports (its own or received): keeps what is new and
    /// forwards it (after `relay_ms`, batched).
    fn on_reports(&mut self, n: u32, reports: Vec<proto::HotReport>, t: u64) {
        for rep in reports {
            let Some(owner) = rep
                .owner
                .strip_prefix('n')
                .and_then(|s| s.parse::<u32>().ok())
                .filter(|o| (*o as usize) < self.names.len())
            else {
                continue;
            };
            let blocks = if self.verified_reports.contains(&(owner, rep.seq)) {
                // Verified once per distinct report (every node gets the
                // same bytes); decoded again here.
                decode_report_unverified(&rep)
            } else {
                self.verified += 1;
                let b = decode_report(
                    &rep,
                    EPOCH_MS,
                    NET,
                    KeyAlg::Ed25519,
                    &self.public[owner as usize],
                )
                .expect("owners' reports verify");
                self.verified_reports.insert((owner, rep.seq));
                b
            };
            let mut new = false;
            for (block, w) in blocks {
                let Some(b) = id_of_block(&block, self.p.blocks) else {
                    continue;
                };
                if !self.owners_of(b).contains(&owner) {
                    continue;
                }
                let r = Report {
                    owner,
                    seq: rep.seq,
                    epoch: rep.epoch,
                    window: w,
                };
                if self.nodes[n as usize].hot.merge(b, r) {
                    new = true;
                    self.check(n, b, t);
                }
            }
            if new {
                let node = &mut self.nodes[n as usize];
                node.relay_buf.push(rep);
                if !node.relay_at {
                    node.relay_at = true;
                    self.at(t + self.p.relay_ms, Ev::Relay(n));
                }
            }
        }
    }

    fn relay(&mut self, n: u32, t: u64) {
        let node = &mut self.nodes[n as usize];
        node.relay_at = false;
        let reports = std::mem::take(&mut node.relay_buf);
        if reports.is_empty() {
            return;
        }
        let env = seal(
            NET,
            &self.names[n as usize],
            proto::envelope_v2::Body::Hot(proto::HotRelay { reports }),
        );
        let bytes = env.encode_to_vec();
        let back = proto::EnvelopeV2::decode(bytes.as_slice()).expect("own envelope");
        let Some(proto::envelope_v2::Body::Hot(relay)) = back.body else {
            unreachable!()
        };
        let relay = Arc::new(relay);
        for to in self.peers(n) {
            self.send(
                t,
                n,
                bytes.len(),
                1,
                Ev::Hot {
                    to,
                    relay: relay.clone(),
                },
            );
        }
    }

    /// `from` hands its table of `blocks` to `to` (one Handoff message).
    fn handoff(&mut self, from: u32, to: u32, blocks: &[u32], t: u64) {
        let mut slots: Vec<(u32, Slot)> = Vec::new();
        let node = &self.nodes[from as usize];
        for &b in blocks {
            let w = node.table.window(&b, first_epoch(t), &self.cap);
            if (w.counts.connections as f64) < self.p.handoff_min * self.p.limit as f64 {
                continue;
            }
            self.handed_off += 1;
            for s in node.table.slots(&b) {
                slots.push((b, s.clone()));
            }
        }
        if slots.is_empty() {
            return;
        }
        // Sized with the real codec: one SignedCount per slot, a
        // pseudo-origin chunk of k past connections as k signed counts of
        // distinct origins (64 zero octets where no signature is kept).
        let base_epoch = slots.iter().map(|s| s.1.epoch).min().unwrap_or(0);
        let mut per: HashMap<String, Vec<proto::SignedCount>> = HashMap::new();
        for (b, s) in &slots {
            let (block, prefix_len) = block_to_wire(&block_of_id(*b, self.p.blocks));
            let sc = |c: u32, sig: Vec<u8>| proto::SignedCount {
                block: block.clone(),
                prefix_len,
                epoch_offset: s.epoch - base_epoch,
                connections: c,
                messages: 0,
                recipients: 0,
                signature: sig,
            };
            if s.origin >= PSEUDO {
                for k in 0..s.counts.connections {
                    let name = format!(
                        "n{}",
                        (b.wrapping_mul(31).wrapping_add(k)) as usize % self.names.len()
                    );
                    per.entry(name).or_default().push(sc(1, vec![0; 64]));
                }
            } else {
                let sig = s.sig.as_ref().map(|x| x.to_vec()).unwrap_or(vec![0; 64]);
                per.entry(self.names[s.origin as usize].clone())
                    .or_default()
                    .push(sc(s.counts.connections, sig));
            }
        }
        let h = proto::Handoff {
            epoch_ms: EPOCH_MS,
            base_epoch,
            origins: per
                .into_iter()
                .map(|(origin, counts)| proto::OriginCounts { origin, counts })
                .collect(),
        };
        let len = seal(
            NET,
            &self.names[from as usize],
            proto::envelope_v2::Body::Handoff(h),
        )
        .encoded_len();
        self.send(
            t,
            from,
            len,
            2,
            Ev::Handoff {
                to,
                slots: Arc::new(slots),
            },
        );
    }

    fn on_handoff(&mut self, to: u32, slots: &[(u32, Slot)], t: u64) {
        for (b, s) in slots {
            if self.owners_of(*b).contains(&to) {
                self.merge_local(to, *b, s.origin, s.epoch, s.counts, s.sig.clone(), t);
            }
        }
    }

    /// Origins mode: the initial member that made connection `k` of chunk
    /// `j` of block `b`'s window before the run (a fixed hash).
    fn past_origin(&self, b: u32, j: usize, k: u8) -> u32 {
        let mut x =
            ((b as u64) << 32 | (j as u64) << 8 | k as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        (x % self.p.nodes as u64) as u32
    }

    /// Origins mode: node `n`'s own counts of block `b` from before the
    /// run, (epoch, connections), epochs still in the window at `t`.
    fn past_of(&self, n: u32, b: u32, t: u64) -> Vec<(u64, u32)> {
        let mut v: Vec<(u64, u32)> = Vec::new();
        let Some(chunks) = self.past.get(b as usize) else {
            return v;
        };
        if n as usize >= self.p.nodes {
            return v;
        }
        let now = epoch(T0);
        for (j, &(age, c)) in chunks.iter().enumerate() {
            let e = now - age as u64;
            if e < first_epoch(t) {
                continue;
            }
            for k in 0..c {
                if self.past_origin(b, j, k) == n {
                    match v.iter_mut().find(|x| x.0 == e) {
                        Some(x) => x.1 += 1,
                        None => v.push((e, 1)),
                    }
                }
            }
        }
        v
    }

    /// Origins mode: a quick round of `n` at its next 50 ms tick.
    fn wake(&mut self, n: u32, t: u64) {
        let q = self.p.quick_ms.max(1);
        let node = &mut self.nodes[n as usize];
        if node.round_at || !node.alive {
            return;
        }
        node.round_at = true;
        let base = T0 + node.phase;
        let next = base + (t.saturating_sub(base) / q + 1) * q;
        self.at(next, Ev::Round(n));
    }

    /// Origins mode (`State::members_moved`): the owners of `blocks` (with
    /// their owners before) changed; every node that has one in its owner
    /// cache (its origins, of the run or before it, and its owners) notes
    /// it, and every node's next quick round is a full one.
    fn owners_moved(&mut self, blocks: &[(u32, Vec<u32>)], t: u64) {
        let mut holders: Vec<u32> = Vec::new();
        for (b, old) in blocks {
            let b = *b;
            holders.clear();
            if let Some(chunks) = self.past.get(b as usize) {
                for (j, &(_, c)) in chunks.iter().enumerate() {
                    for k in 0..c {
                        holders.push(self.past_origin(b, j, k));
                    }
                }
            }
            if let Some(s) = self.senders.get(&b) {
                holders.extend(s);
            }
            holders.extend(self.owners_of(b));
            for &h in &holders {
                let node = &mut self.nodes[h as usize];
                if node.alive {
                    node.moved.insert(b);
                }
            }
            self.prev_owners.insert(b, old.clone());
        }
        for n in self.alive.clone() {
            if self.p.full_on_change {
                self.nodes[n as usize].changed = true;
                self.wake(n, t);
            } else if !self.nodes[n as usize].moved.is_empty() {
                self.wake(n, t);
            }
        }
    }

    /// Origins mode: an owner gets an origin's count of before the run.
    /// Owners that keep the block's window under pseudo-origins have it
    /// already (max-merge is idempotent); others keep it under the origin.
    fn merge_past(&mut self, to: u32, from: u32, b: u32, e: u64, c: Counts, t: u64) {
        if !self.owners_of(b).contains(&to) {
            return;
        }
        let table = &self.nodes[to as usize].table;
        if table.slots(&b).iter().any(|s| s.origin >= PSEUDO) {
            return;
        }
        self.merge_local(to, b, HIST + from, e, c, None, t);
    }

    /// Origins mode: one round of node `n` as `Hot::round` (a full one
    /// every interval and after a membership change).
    fn round(&mut self, n: u32, t: u64, full: bool) {
        let first = first_epoch(t);
        let cold_max = self.p.cold_max;
        let node = &mut self.nodes[n as usize];
        let full = full || node.changed;
        if full {
            node.changed = false;
            self.full_rounds += 1;
        }
        // Moved blocks: hot ones (in the view, or reported by this node)
        // again at once, cold ones queued.
        let moved: Vec<u32> = node.moved.drain().collect();
        let mut again: Vec<u32> = Vec::new();
        let cur = epoch(t);
        for b in moved {
            let recent = self.p.recent_first
                && node.outbox.sent(b, cur.saturating_sub(1), cur).connections > 0;
            if recent || node.hot.contains(&b) || node.levels.contains_key(&b) {
                again.push(b);
            } else if node.cold.len() < cold_max {
                node.cold.push_back(b);
            } else {
                self.cold_dropped += 1;
            }
        }
        self.cold_peak = self.cold_peak.max(node.cold.len());
        if full {
            let k = node.cold.len().min(self.p.cold_budget);
            again.extend(node.cold.drain(..k));
        }
        let changes = if full {
            node.outbox.prune(first);
            node.own.retain(|(_, e), _| *e >= first);
            node.outbox.take()
        } else {
            let view = &node.hot;
            let levels = &node.levels;
            let burst = self.p.burst;
            node.outbox.take_where(|b, c, sent| {
                view.contains(b)
                    || levels.contains_key(b)
                    || c.connections.saturating_sub(sent.connections) >= burst
            })
        };
        // What this node sent of the moved blocks (in the run, and before
        // it), not already going out with a newer count.
        let going: HashSet<(u32, u64)> = changes.iter().map(|c| (c.0, c.1)).collect();
        let mut res: Vec<(u32, u64, Counts)> = Vec::new();
        let mut past: Vec<(u32, u64, Counts)> = Vec::new();
        for &b in &again {
            let node = &self.nodes[n as usize];
            for e in first.max(epoch(T0))..=epoch(t) {
                let c = node.outbox.sent(b, e, e);
                if c.connections > 0 && !going.contains(&(b, e)) {
                    res.push((b, e, c));
                }
            }
            for (e, c) in self.past_of(n, b, t) {
                past.push((b, e, conn(c)));
            }
        }
        self.resent += res.len() as u64;
        self.resent_past += past.len() as u64;
        if !changes.is_empty() || !res.is_empty() || !past.is_empty() {
            self.send_counts(n, t, changes, res, past);
        }
        if !self.nodes[n as usize].dirty.is_empty() {
            self.report(n, t, false);
        }
    }

    /// Origins mode: node `n`'s changes (signed now), re-sent counts of the
    /// run and re-sent counts of before it (sized with 64-octet
    /// placeholder signatures: signing them all would take hours), one
    /// increment batch per owner.
    fn send_counts(
        &mut self,
        n: u32,
        t: u64,
        changes: Vec<(u32, u64, Counts)>,
        res: Vec<(u32, u64, Counts)>,
        past: Vec<(u32, u64, Counts)>,
    ) {
        type Entry = (Block, u64, Counts, Signature);
        /// Per owner: fresh counts, re-sent counts of the run, of before.
        type Lists = (Vec<Entry>, Vec<Entry>, Vec<Entry>);
        let mut per: HashMap<u32, Lists> = HashMap::new();
        for (b, e, c) in changes {
            let block = block_of_id(b, self.p.blocks);
            let msg = increment_message(NET, &self.names[n as usize], &block, e, &c);
            let sig = self.nodes[n as usize].signer.sign(&msg).expect("sign");
            self.signed += 1;
            for o in self.owners_of(b) {
                if o != n {
                    per.entry(o).or_default().0.push((block, e, c, sig));
                } else {
                    let sig = Some(Box::new(sig));
                    self.merge_local(n, b, n, e, c, sig, t);
                }
            }
        }
        let placeholder: Signature = [0; 64];
        for (k, list) in [(1, res), (2, past)] {
            for (b, e, c) in list {
                let block = block_of_id(b, self.p.blocks);
                let mut to = self.owners_of(b);
                if !self.p.resend_all {
                    if let Some(old) = self.prev_owners.get(&b) {
                        to.retain(|o| !old.contains(o));
                    }
                }
                for o in to {
                    if o == n {
                        if k == 2 {
                            self.merge_past(n, n, b, e, c, t);
                        }
                        continue;
                    }
                    let v = per.entry(o).or_default();
                    let v = if k == 1 { &mut v.1 } else { &mut v.2 };
                    v.push((block, e, c, placeholder));
                }
            }
        }
        let mut per: Vec<_> = per.into_iter().collect();
        per.sort_unstable_by_key(|x| x.0);
        for (o, (mut entries, res, past)) in per {
            let fresh = entries.len();
            let npast = past.len();
            entries.extend(res);
            entries.extend(past);
            let total = entries.len();
            let batch = encode_increments(EPOCH_MS, &entries);
            let env = seal(
                NET,
                &self.names[n as usize],
                proto::envelope_v2::Body::Increments(batch),
            );
            let bytes = env.encode_to_vec();
            let back = proto::EnvelopeV2::decode(bytes.as_slice()).expect("own envelope");
            let Some(proto::envelope_v2::Body::Increments(batch)) = back.body else {
                unreachable!()
            };
            // Only batches of fresh, really signed counts are checked.
            let verify = fresh == total && self.rng.random_range(0..self.p.verify_every) == 0;
            // Bytes of re-sent counts count as "handoff".
            let resent = (bytes.len() * (total - fresh) / total) as u64;
            self.nodes[n as usize].bytes.handoff += resent;
            self.send(
                t,
                n,
                bytes.len() - resent as usize,
                0,
                Ev::Increments {
                    to: o,
                    from: n,
                    batch: Arc::new(batch),
                    verify,
                    past: npast,
                },
            );
        }
    }

    /// Membership: `m` leaves everyone's view.
    fn remove_member(&mut self, m: u32, t: u64) {
        self.in_view[m as usize] = false;
        self.view.retain(|x| *x != m);
        let r = self.p.owners;
        let blocks = std::mem::take(&mut self.index[m as usize]);
        let mut moves: HashMap<(u32, u32), Vec<u32>> = HashMap::new();
        let mut moved = Vec::new();
        for b in blocks {
            let list = &mut self.ranked[b as usize];
            let Some(i) = list.iter().position(|e| e.2 == m) else {
                continue;
            };
            list.remove(i);
            if list.len() < r {
                let members: Vec<(u64, u32)> = self
                    .view
                    .iter()
                    .map(|&x| (self.mkeys[x as usize], x))
                    .collect();
                *list = owners::owners_ranked(self.bkeys[b as usize], members, K);
                for e in list.iter() {
                    self.index[e.2 as usize].push(b);
                }
            }
            let list = &self.ranked[b as usize];
            if i < r && list.len() >= r {
                self.owner_changes += 1;
                let mut old: Vec<u32> = list.iter().take(r - 1).map(|e| e.2).collect();
                old.push(m);
                moved.push((b, old));
                // The new r-th owner learns from the best surviving owner.
                moves.entry((list[0].2, list[r - 1].2)).or_default().push(b);
            }
        }
        let mut moves: Vec<_> = moves.into_iter().collect();
        moves.sort_unstable();
        if self.p.resend == Resend::Origins {
            self.owners_moved(&moved, t);
            return;
        }
        for ((from, to), blocks) in moves {
            if from != to {
                self.handoff(from, to, &blocks, t);
            }
        }
    }

    /// Membership: `m` joins everyone's view.
    fn add_member(&mut self, m: u32, t: u64) {
        self.in_view[m as usize] = true;
        self.view.push(m);
        let key = self.mkeys[m as usize];
        let r = self.p.owners;
        let mut moves: HashMap<u32, Vec<u32>> = HashMap::new();
        for b in 0..self.ranked.len() {
            let w = weight(key, self.bkeys[b]);
            let list = &mut self.ranked[b];
            // The list is a prefix of the true ranking: a joiner below all
            // of it may still be below members that are not listed.
            let Some(i) = list.iter().position(|e| (w, key) > (e.0, e.1)) else {
                continue;
            };
            list.insert(i, (w, key, m));
            list.truncate(K);
            self.index[m as usize].push(b as u32);
            if i < r && list.len() > r {
                // The displaced owner hands the block over and drops it.
                self.owner_changes += 1;
                let displaced = list[r].2;
                moves.entry(displaced).or_default().push(b as u32);
            }
        }
        let mut moves: Vec<_> = moves.into_iter().collect();
        moves.sort_unstable();
        let origins = self.p.resend == Resend::Origins;
        if origins {
            let moved: Vec<(u32, Vec<u32>)> = moves
                .iter()
                .flat_map(|m| m.1.iter().copied())
                .map(|b| {
                    let old = self.ranked[b as usize]
                        .iter()
                        .take(r + 1)
                        .map(|e| e.2)
                        .filter(|x| *x != m)
                        .collect();
                    (b, old)
                })
                .collect();
            self.owners_moved(&moved, t);
        }
        for (from, blocks) in moves {
            if self.nodes[from as usize].alive && !origins {
                self.handoff(from, m, &blocks, t);
            }
            for b in blocks {
                self.nodes[from as usize].table.remove(&b);
            }
        }
    }

    /// The cached candidates agree with the real `owners()` over the
    /// current view (a sample of blocks).
    fn check_owners(&mut self) {
        let members: Vec<(u64, u32)> = self
            .view
            .iter()
            .map(|&x| (self.mkeys[x as usize], x))
            .collect();
        for _ in 0..200 {
            let b = self.rng.random_range(0..self.ranked.len());
            let real = owners::owners(self.bkeys[b], members.iter().copied(), self.p.owners);
            assert_eq!(real, self.owners_of(b as u32), "owners of block {b}");
            self.owner_checks += 1;
        }
    }

    fn run(&mut self) {
        let end = T0 + self.p.duration_ms;
        while let Some(Item { t, ev, .. }) = self.queue.pop() {
            if t > end {
                break;
            }
            assert!(
                self.queue.len() < 20_000_000,
                "event queue past 20M at t = {} ms: a message storm",
                t - T0
            );
            match ev {
                Ev::Attempt => {
                    let n = self.random_node();
                    let b = self.random_block();
                    if b == self.victim {
                        self.victim_true += 1;
                    }
                    self.attempt(n, b, t);
                    // A Poisson process at `rate` per second (exact
                    // times kept in f64, events rounded to the ms).
                    let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
                    self.next_attempt += -u.ln() / self.p.rate * 1000.0;
                    self.at(T0 + self.next_attempt as u64, Ev::Attempt);
                }
                Ev::Victim => {
                    // The victim's own real traffic: one connection every
                    // 2 s, true window stays under the limit.
                    let n = self.random_node();
                    let v = self.victim;
                    self.victim_true += 1;
                    self.victim_checks += 1;
                    if !self.attempt(n, v, t) {
                        self.victim_refusals += 1;
                    }
                    self.at(t + 2000, Ev::Victim);
                }
                Ev::Flood(f) => {
                    self.truth[f] += 1;
                    if self.truth[f] == self.p.limit + 1 {
                        self.crossed[f] = Some(t);
                    }
                    let n = self.random_node();
                    let b = self.flood_ids[f];
                    if self.attempt(n, b, t) {
                        self.admitted[f] += 1;
                    }
                    self.check(n, b, t);
                }
                Ev::Tick(n) => {
                    if self.nodes[n as usize].alive {
                        match self.p.resend {
                            Resend::Origins => self.round(n, t, true),
                            Resend::Handoff => self.flush(n, t),
                        }
                        self.at(t + self.p.interval_ms, Ev::Tick(n));
                    }
                }
                Ev::Flush(n) => {
                    self.nodes[n as usize].flush_at = false;
                    if self.nodes[n as usize].alive {
                        self.flush(n, t);
                    }
                }
                Ev::Round(n) => {
                    self.nodes[n as usize].round_at = false;
                    if self.nodes[n as usize].alive {
                        self.round(n, t, false);
                    }
                }
                Ev::Report(n) => {
                    if self.nodes[n as usize].alive {
                        self.report(n, t, false);
                    }
                }
                Ev::Again(n, b, k) => {
                    if self.nodes[n as usize].alive {
                        let node = &mut self.nodes[n as usize];
                        node.levels.insert(b, FORCED);
                        node.dirty.insert(b);
                        self.report(n, t, false);
                        if k > 1 {
                            self.at(t + self.p.again_ms, Ev::Again(n, b, k - 1));
                        }
                    }
                }
                Ev::Refresh(n) => {
                    if self.nodes[n as usize].alive {
                        self.report(n, t, true);
                        self.at(t + self.p.refresh_ms, Ev::Refresh(n));
                    }
                }
                Ev::Relay(n) => {
                    if self.nodes[n as usize].alive {
                        self.relay(n, t);
                    }
                }
                Ev::Leave(n) => {
                    let node = &mut self.nodes[n as usize];
                    node.alive = false;
                    node.left = Some(t);
                    self.alive.retain(|x| *x != n);
                    self.at(t + self.p.detect_ms, Ev::Detected(n));
                }
                Ev::Detected(n) => {
                    self.remove_member(n, t);
                    self.check_owners();
                }
                Ev::Join(n) => {
                    let node = &mut self.nodes[n as usize];
                    node.alive = true;
                    node.joined = t;
                    self.alive.push(n);
                    self.add_member(n, t);
                    self.check_owners();
                    if self.p.resend == Resend::Origins {
                        self.nodes[n as usize].phase = self.rng.random_range(0..self.p.quick_ms);
                    }
                    let ph = self.rng.random_range(0..self.p.interval_ms);
                    self.at(t + ph, Ev::Tick(n));
                    let ph = self.rng.random_range(0..self.p.refresh_ms);
                    self.at(t + ph, Ev::Refresh(n));
                }
                Ev::Increments {
                    to,
                    from,
                    batch,
                    verify,
                    past,
                } => {
                    if self.nodes[to as usize].alive {
                        self.on_increments(to, from, &batch, verify, past, t);
                    }
                }
                Ev::Hot { to, relay } => {
                    if self.nodes[to as usize].alive {
                        self.on_reports(to, relay.reports.clone(), t);
                    }
                }
                Ev::Handoff { to, slots } => {
                    if self.nodes[to as usize].alive {
                        self.on_handoff(to, &slots, t);
                    }
                }
            }
        }
    }
}

fn decode_report_unverified(rep: &proto::HotReport) -> Vec<(Block, Window)> {
    rep.blocks
        .iter()
        .filter_map(owners::hot_block_from_wire)
        .collect()
}

pub fn simulate(p: Params) -> Outcome {
    let start = Instant::now();
    let mut sim = Sim::new(p.clone());
    let setup = start.elapsed().as_secs_f64();
    sim.run();
    let end = T0 + p.duration_ms;
    // Every running node, at the end: is the victim refused there?
    for n in sim.alive.clone() {
        sim.victim_checks += 1;
        if sim.refuses(n, sim.victim, end) {
            sim.victim_refusals += 1;
        }
    }
    // Bytes per node per second of its own running time (nodes that ran
    // at least 5 s).
    let mut bps = Vec::new();
    let mut bytes = Bytes::default();
    for n in &sim.nodes {
        if n.joined == u64::MAX {
            continue;
        }
        let from = if n.joined == 0 { T0 } else { n.joined };
        let to = n.left.unwrap_or(end);
        bytes.increments += n.bytes.increments;
        bytes.hot += n.bytes.hot;
        bytes.handoff += n.bytes.handoff;
        if to > from + 5_000 {
            bps.push(n.bytes.total() as f64 * 1000.0 / (to - from) as f64);
        }
    }
    bps.sort_by(f64::total_cmp);
    let mut every = Vec::new();
    let mut per_node = Vec::new();
    let mut leaks = Vec::new();
    for f in 0..p.floods {
        leaks.push(sim.admitted[f] as f64 / p.limit as f64);
        let Some(c) = sim.crossed[f] else { continue };
        let mut worst = Some(0u64);
        for (i, n) in sim.nodes.iter().enumerate() {
            // Nodes running from before the crossing to the end.
            let running =
                n.joined != u64::MAX && (n.joined == 0 || n.joined < c) && n.left.is_none();
            if !running {
                continue;
            }
            match sim.refused_at[f].get(&(i as u32)) {
                Some(&r) => {
                    let d = r.saturating_sub(c);
                    per_node.push(d);
                    worst = worst.map(|w| w.max(d));
                }
                None => worst = None,
            }
        }
        every.push(worst);
    }
    per_node.sort_unstable();
    let hot_blocks = sim
        .nodes
        .iter()
        .filter(|n| n.alive)
        .map(|n| n.hot.len())
        .max()
        .unwrap_or(0);
    Outcome {
        bps,
        bytes,
        every,
        per_node,
        leaks,
        victim_refusals: sim.victim_refusals,
        victim_checks: sim.victim_checks,
        victim_true: sim.victim_true,
        hot_blocks,
        verified: sim.verified,
        signed: sim.signed,
        owner_changes: sim.owner_changes,
        handed_off: sim.handed_off,
        owner_checks: sim.owner_checks,
        resent: sim.resent,
        resent_past: sim.resent_past,
        cold_dropped: sim.cold_dropped,
        cold_peak: sim.cold_peak,
        full_rounds: sim.full_rounds,
        wall: start.elapsed().as_secs_f64(),
        setup,
        p,
    }
}
