//! The old design (today's live node): every count change to every node.
//! The real delta selection, digest and merge code of
//! `magicmx::gossip::ledger`, and the real wire codec, run over a simulated
//! network (virtual time, latency, loss; no sockets).
//!
//! Model, per run:
//! - every node starts with the same converged state: each active block has
//!   counts from one random origin in one random epoch of the window
//!   (1 h window of 1 min epochs, as the defaults);
//! - background: `rate` connections per second network-wide (by default
//!   one per active block every 5 minutes), each from a uniformly random
//!   active block at a random node;
//! - floods: 10 new blocks (20 in the combined table) each start at a
//!   random time, sending 20
//!   connections/s for 10 s, each connection to a uniformly random node
//!   (the worst case: the counts are spread as thin as possible); the limit
//!   is 120 connections (the default `max_connections`);
//! - each node pushes its hot counts every `interval` (1 s, the default;
//!   random phase) to `fanout` = 3 random nodes, each change for
//!   ceil(log2 N) + 1 rounds, and, like the live node, pushes the counts
//!   not pushed since they changed 3 more times per interval ("fresh
//!   pushes"; the runs with 1 fresh push per interval show the plain
//!   interval-paced epidemic); it runs the four-leg anti-entropy exchange
//!   with one random node every 10 s;
//! - every message takes 5-50 ms (uniform) and is lost with probability 1%.
//!
//! Measured: for each (flood, node), the delay between the moment the flood
//! truly passed the limit (network-wide) and the moment that node's view of
//! it did; per flood, the delay until *every* node saw it; bytes sent per
//! node per second (encoded envelopes: deltas and anti-entropy; SWIM
//! membership traffic is not simulated, it is a few hundred bytes per probe
//! period).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use magicmx::gossip::ledger::{decode_batch, rounds_for, Key, Ledger, OriginId, MAX_BATCH_ENTRIES};
use magicmx::gossip::wire::{self, proto, Body};
use magicmx::throttle::{block_of, Block, Counts};
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const EPOCH_MS: u64 = 60_000;
const WINDOW_EPOCHS: u64 = 60;
/// Virtual start: an epoch boundary plus 30 s (epochs change mid-run).
const T0: u64 = 1_800_000_000_000 + 30_000;

#[derive(Clone, Debug)]
pub struct Params {
    pub nodes: usize,
    pub active_blocks: usize,
    /// Background connections per second, network-wide.
    pub rate: f64,
    pub floods: usize,
    flood_rate: u64,
    flood_secs: u64,
    pub limit: u32,
    pub interval_ms: u64,
    /// Pushes of fresh counts per interval (1 = only the interval's round).
    pub fresh_ticks: u64,
    fanout: usize,
    ae_interval_ms: u64,
    latency_ms: (u64, u64),
    loss: f64,
    pub duration_ms: u64,
    seed: u64,
}

impl Params {
    pub fn new(nodes: usize, active_blocks: usize, interval_ms: u64, fresh_ticks: u64) -> Params {
        Params {
            nodes,
            active_blocks,
            rate: active_blocks as f64 / 300.0,
            floods: 10,
            flood_rate: 20,
            flood_secs: 10,
            limit: 120,
            interval_ms,
            fresh_ticks,
            fanout: 3,
            ae_interval_ms: 10_000,
            latency_ms: (5, 50),
            loss: 0.01,
            duration_ms: 25_000,
            seed: 42,
        }
    }
}

enum Ev {
    Tick(usize, u64),
    AntiEntropy(usize),
    Flood {
        node: usize,
        flood: usize,
    },
    Background {
        node: usize,
        block: Block,
    },
    Delta {
        to: usize,
        batch: Arc<proto::CountBatch>,
    },
    Summary {
        to: usize,
        from: usize,
        s: proto::Summary,
    },
    EpochDigest {
        to: usize,
        from: usize,
        d: proto::EpochDigest,
    },
    Repair {
        to: usize,
        from: usize,
        r: proto::Repair,
    },
    Reply {
        to: usize,
        b: proto::CountBatch,
    },
}

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

struct SimNode {
    ledger: Ledger,
    me: OriginId,
    /// Network-wide connections of each flood block, as this node sees them.
    views: Vec<u64>,
    detected: Vec<Option<u64>>,
    delta_bytes: u64,
    ae_bytes: u64,
}

struct Sim {
    p: Params,
    rng: StdRng,
    queue: BinaryHeap<Item>,
    seq: u64,
    nodes: Vec<SimNode>,
    names: Vec<String>,
    flood_blocks: HashMap<Block, usize>,
    truth: Vec<u64>,
    crossed: Vec<Option<u64>>,
    /// Flood connections accepted (the node's view was not over the limit).
    admitted: Vec<u64>,
    /// Every (origin, block, epoch) count that a connection changed: what
    /// the network has to spread, whatever the protocol.
    changed: std::collections::HashSet<Key>,
}

fn epoch(t: u64) -> u64 {
    t / EPOCH_MS
}

fn envelope_len(sender: &str, body: Body) -> (usize, Body) {
    let e = wire::seal("magicmx", sender, body);
    let n = e.encoded_len();
    (n, e.body.expect("sealed with a body"))
}

impl Sim {
    fn new(p: Params) -> Sim {
        let mut rng = StdRng::seed_from_u64(p.seed);
        let names: Vec<String> = (0..p.nodes).map(|i| format!("n{i}")).collect();
        // The converged starting state, shared by every node.
        let mut base = Ledger::new(1);
        for n in &names {
            base.intern(n);
        }
        let now_epoch = epoch(T0);
        for b in 0..p.active_blocks {
            let block = block_of(
                IpAddr::V4(Ipv4Addr::new(
                    10 + (b >> 16) as u8,
                    (b >> 8) as u8,
                    b as u8,
                    1,
                )),
                24,
                48,
            );
            let key = Key {
                origin: rng.random_range(0..p.nodes) as OriginId,
                epoch: now_epoch - rng.random_range(0..WINDOW_EPOCHS),
                block,
            };
            let n = rng.random_range(1..5);
            base.observe(
                key,
                Counts {
                    connections: n,
                    messages: n,
                    recipients: n * 2,
                },
            );
        }
        base.take_round(usize::MAX);
        base.set_rounds(rounds_for(p.nodes));
        let nodes = (0..p.nodes)
            .map(|i| SimNode {
                ledger: base.clone(),
                me: i as OriginId,
                views: vec![0; p.floods],
                detected: vec![None; p.floods],
                delta_bytes: 0,
                ae_bytes: 0,
            })
            .collect();
        let flood_blocks = (0..p.floods)
            .map(|f| {
                (
                    block_of(IpAddr::V4(Ipv4Addr::new(172, 16, f as u8, 1)), 24, 48),
                    f,
                )
            })
            .collect();
        let mut sim = Sim {
            rng,
            queue: BinaryHeap::new(),
            seq: 0,
            nodes,
            names,
            flood_blocks,
            truth: vec![0; p.floods],
            crossed: vec![None; p.floods],
            admitted: vec![0; p.floods],
            changed: std::collections::HashSet::new(),
            p,
        };
        sim.schedule_workload();
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

    fn schedule_workload(&mut self) {
        let p = self.p.clone();
        for i in 0..p.nodes {
            let phase = self.rng.random_range(0..p.interval_ms);
            self.at(T0 + phase, Ev::Tick(i, 0));
            let phase = self.rng.random_range(0..p.ae_interval_ms);
            self.at(T0 + phase, Ev::AntiEntropy(i));
        }
        for f in 0..p.floods {
            let start = self.rng.random_range(
                2_000
                    ..p.duration_ms
                        .saturating_sub(p.flood_secs * 1000 + 3_000)
                        .max(2_001),
            );
            for k in 0..p.flood_rate * p.flood_secs {
                let node = self.rng.random_range(0..p.nodes);
                self.at(
                    T0 + start + k * 1000 / p.flood_rate,
                    Ev::Flood { node, flood: f },
                );
            }
        }
        // Background: `rate` connections per second.
        let rate_per_ms = p.rate / 1000.0;
        let mut t = 0.0;
        loop {
            let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
            t += -u.ln() / rate_per_ms;
            if t as u64 >= p.duration_ms {
                break;
            }
            let b = self.rng.random_range(0..p.active_blocks);
            let block = block_of(
                IpAddr::V4(Ipv4Addr::new(
                    10 + (b >> 16) as u8,
                    (b >> 8) as u8,
                    b as u8,
                    1,
                )),
                24,
                48,
            );
            let node = self.rng.random_range(0..p.nodes);
            self.at(T0 + t as u64, Ev::Background { node, block });
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

    /// Merges an observation into node `n`, updating its flood views.
    fn observe(&mut self, n: usize, key: Key, counts: Counts, t: u64) {
        let node = &mut self.nodes[n];
        if let Some(prev) = node.ledger.observe(key, counts) {
            if let Some(&f) = self.flood_blocks.get(&key.block) {
                let now = node.ledger.get(&key).unwrap_or_default();
                node.views[f] += (now.connections - prev.connections) as u64;
                if node.detected[f].is_none() && node.views[f] > self.p.limit as u64 {
                    node.detected[f] = Some(t);
                }
            }
        }
    }

    fn merge(&mut self, n: usize, batch: &proto::CountBatch, t: u64) {
        let Ok((updates, _)) = decode_batch(batch, EPOCH_MS) else {
            panic!("the simulation produced a bad batch");
        };
        let ids: Vec<OriginId> = batch
            .origins
            .iter()
            .map(|o| self.nodes[n].ledger.intern(o))
            .collect();
        for u in updates {
            let key = Key {
                origin: ids[u.origin],
                epoch: u.epoch,
                block: u.block,
            };
            self.observe(n, key, u.counts, t);
        }
    }

    fn count_own(&mut self, n: usize, block: Block, t: u64) {
        let key = Key {
            origin: self.nodes[n].me,
            epoch: epoch(t),
            block,
        };
        self.changed.insert(key);
        let c = self.nodes[n].ledger.get(&key).unwrap_or_default();
        let next = Counts {
            connections: c.connections + 1,
            ..c
        };
        self.observe(n, key, next, t);
    }

    fn peer_of(&mut self, n: usize) -> usize {
        let mut p = self.rng.random_range(0..self.p.nodes - 1);
        if p >= n {
            p += 1;
        }
        p
    }

    fn run(&mut self) {
        let end = T0 + self.p.duration_ms;
        while let Some(Item { t, ev, .. }) = self.queue.pop() {
            if t > end {
                break;
            }
            match ev {
                Ev::Tick(n, k) => {
                    self.push_round(n, t, k % self.p.fresh_ticks == 0);
                    self.at(
                        t + self.p.interval_ms / self.p.fresh_ticks,
                        Ev::Tick(n, k + 1),
                    );
                }
                Ev::AntiEntropy(n) => {
                    let to = self.peer_of(n);
                    let first = epoch(t) - (WINDOW_EPOCHS - 1);
                    let s = self.nodes[n].ledger.summary(first, epoch(t) + 1, EPOCH_MS);
                    let (len, body) = envelope_len(&self.names[n], Body::Summary(s));
                    self.nodes[n].ae_bytes += len as u64;
                    let Body::Summary(s) = body else {
                        unreachable!()
                    };
                    if let Some(d) = self.latency() {
                        self.at(t + d, Ev::Summary { to, from: n, s });
                    }
                    self.at(t + self.p.ae_interval_ms, Ev::AntiEntropy(n));
                }
                Ev::Flood { node, flood } => {
                    self.truth[flood] += 1;
                    if self.truth[flood] == self.p.limit as u64 + 1 {
                        self.crossed[flood] = Some(t);
                    }
                    if self.nodes[node].views[flood] <= self.p.limit as u64 {
                        self.admitted[flood] += 1;
                    }
                    let block =
                        block_of(IpAddr::V4(Ipv4Addr::new(172, 16, flood as u8, 1)), 24, 48);
                    self.count_own(node, block, t);
                }
                Ev::Background { node, block } => self.count_own(node, block, t),
                Ev::Delta { to, batch } => self.merge(to, &batch, t),
                Ev::Summary { to, from, s } => {
                    let d = self.nodes[to]
                        .ledger
                        .answer_summary(&s, EPOCH_MS)
                        .expect("valid summary");
                    let (len, body) = envelope_len(&self.names[to], Body::EpochDigest(d));
                    self.nodes[to].ae_bytes += len as u64;
                    let Body::EpochDigest(d) = body else {
                        unreachable!()
                    };
                    if let Some(l) = self.latency() {
                        self.at(
                            t + l,
                            Ev::EpochDigest {
                                to: from,
                                from: to,
                                d,
                            },
                        );
                    }
                }
                Ev::EpochDigest { to, from, d } => {
                    let r = self.nodes[to]
                        .ledger
                        .answer_epoch_digest(&d, EPOCH_MS)
                        .expect("valid digest");
                    let (len, body) = envelope_len(&self.names[to], Body::Repair(r));
                    self.nodes[to].ae_bytes += len as u64;
                    let Body::Repair(r) = body else {
                        unreachable!()
                    };
                    if let Some(l) = self.latency() {
                        self.at(
                            t + l,
                            Ev::Repair {
                                to: from,
                                from: to,
                                r,
                            },
                        );
                    }
                }
                Ev::Repair { to, from, r } => {
                    if let Some(c) = &r.counts {
                        self.merge(to, c, t);
                    }
                    if !r.want.is_empty() {
                        let b = self.nodes[to]
                            .ledger
                            .answer_repair(&r, EPOCH_MS)
                            .expect("valid repair");
                        let (len, body) = envelope_len(&self.names[to], Body::RepairReply(b));
                        self.nodes[to].ae_bytes += len as u64;
                        let Body::RepairReply(b) = body else {
                            unreachable!()
                        };
                        if let Some(l) = self.latency() {
                            self.at(t + l, Ev::Reply { to: from, b });
                        }
                    }
                }
                Ev::Reply { to, b } => self.merge(to, &b, t),
            }
        }
    }

    /// A full round (every hot count) or a fresh one (counts not pushed
    /// since they changed), as the live node's push task does.
    fn push_round(&mut self, n: usize, t: u64, full: bool) {
        let node = &mut self.nodes[n];
        node.ledger.prune(epoch(t) - (WINDOW_EPOCHS - 1));
        let entries = if full {
            node.ledger.take_round(MAX_BATCH_ENTRIES)
        } else {
            node.ledger.take_fresh(MAX_BATCH_ENTRIES)
        };
        if entries.is_empty() {
            return;
        }
        let batch = node.ledger.encode_batch(&entries, EPOCH_MS);
        // Through the real codec once; the same bytes go to every target.
        let bytes = wire::encode(&wire::seal("magicmx", &self.names[n], Body::Delta(batch)));
        let (_, body) = wire::open(&bytes, "magicmx").expect("own envelope");
        let Body::Delta(batch) = body else {
            unreachable!()
        };
        let batch = Arc::new(batch);
        let mut targets: Vec<usize> = Vec::with_capacity(self.p.fanout);
        while targets.len() < self.p.fanout.min(self.p.nodes - 1) {
            let p = self.peer_of(n);
            if !targets.contains(&p) {
                targets.push(p);
            }
        }
        for to in targets {
            self.nodes[n].delta_bytes += bytes.len() as u64;
            if let Some(l) = self.latency() {
                self.at(
                    t + l,
                    Ev::Delta {
                        to,
                        batch: batch.clone(),
                    },
                );
            }
        }
    }
}

pub struct Outcome {
    pub p: Params,
    pub per_node: Vec<u64>,
    pub all_nodes: Vec<u64>,
    pub undetected: usize,
    pub delta_bps: f64,
    pub ae_bps: f64,
    /// Bytes sent per node per second, sorted.
    pub bps: Vec<f64>,
    pub leaks: Vec<f64>,
    /// Distinct counts changed per second, network-wide.
    pub changed_per_sec: f64,
    pub wall: f64,
}

pub fn simulate(p: Params) -> Outcome {
    let start = Instant::now();
    let mut sim = Sim::new(p.clone());
    sim.run();
    let mut per_node = Vec::new();
    let mut all_nodes = Vec::new();
    let mut undetected = 0;
    for f in 0..p.floods {
        let Some(crossed) = sim.crossed[f] else {
            continue;
        };
        let mut worst = Some(0);
        for n in &sim.nodes {
            match n.detected[f] {
                Some(d) => {
                    let delay = d.saturating_sub(crossed);
                    per_node.push(delay);
                    worst = worst.map(|w: u64| w.max(delay));
                }
                None => {
                    undetected += 1;
                    worst = None;
                }
            }
        }
        if let Some(w) = worst {
            all_nodes.push(w);
        }
    }
    per_node.sort_unstable();
    all_nodes.sort_unstable();
    let secs = p.duration_ms as f64 / 1000.0;
    let n = p.nodes as f64;
    let delta_bps = sim.nodes.iter().map(|x| x.delta_bytes).sum::<u64>() as f64 / n / secs;
    let ae_bps = sim.nodes.iter().map(|x| x.ae_bytes).sum::<u64>() as f64 / n / secs;
    let mut bps: Vec<f64> = sim
        .nodes
        .iter()
        .map(|x| (x.delta_bytes + x.ae_bytes) as f64 / secs)
        .collect();
    bps.sort_by(f64::total_cmp);
    let leaks = sim
        .admitted
        .iter()
        .map(|a| *a as f64 / p.limit as f64)
        .collect();
    Outcome {
        bps,
        leaks,
        p,
        per_node,
        all_nodes,
        undetected,
        delta_bps,
        ae_bps,
        changed_per_sec: sim.changed.len() as f64 / secs,
        wall: start.elapsed().as_secs_f64(),
    }
}
