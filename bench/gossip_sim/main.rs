//! Gossip simulation: the old design (every count change to every node,
//! `old.rs`, the real `gossip::ledger`) and the new one (owners per block,
//! signed increments, a broadcast hot set, `new.rs`, the real
//! `gossip::owners`), over a simulated network: virtual time, 5-50 ms
//! latency, 1 % message loss, no sockets; every byte counted is an encoded
//! protobuf envelope (v1 for the old design, v2 for the new).
//!
//! Run: `cargo bench --bench gossip_sim` (writes the `## Gossip simulation`
//! section of `bench/RESULTS.md`); `-- --quick` runs small N and only
//! prints. One run: `-- --new=N,BLOCKS,RATE[,key=value...]` (keys: fanout,
//! relay_ms, interval_ms, refresh_ms, report_step, again, again_ms, hot_rmax, handoff_min, churn, verify_every,
//! zipf, duration_ms, floods, resend=origins, cold_budget, cold_max,
//! quick_ms, full_on_change, resend_all, burst, recent_first) or `-- --old=N,BLOCKS,RATE,FRESH`.
//!
//! Load of the new design's runs (issue 15): N nodes, 1,000,000 active
//! blocks whose 1 h window starts at Poisson(36) past connections each
//! (= 10,000/s x 3600 s / 1M: the steady state of the background), kept by
//! their owners; background 10,000 connection attempts/s network-wide
//! (Poisson), each from a uniformly random block (the `zipf` key gives a
//! Zipf skew instead) at a uniformly random running node; 20 floods of 20
//! connections/s for 10 s from new blocks, each connection at a random
//! node, limit 120 connections per window (the default); 10 % of the nodes
//! fail during the run (at random times, detected by everyone 2 s later)
//! and as many new nodes join (seen at once); one owner of a victim block
//! (true window 80 plus one connection every 2 s, under the limit) reports
//! 100 times its count and 100 times its origins in every report. 30 s of
//! virtual time.
//!
//! The protocol as simulated (the sans-IO core decides what, this decides
//! when): each node notes every own count change in its `Outbox` and, every
//! `interval` (1 s), signs each changed (block, epoch) count with its
//! Ed25519 key and sends one `IncrementBatch` per owner (rendezvous top 3
//! of the live members); a change of a block the node knows is hot is sent
//! after `relay_ms` (25 ms; 50 ms measured too) instead. An owner merges verified counts in its
//! `OwnerTable`; when a block it owns is hot (window >= 0.5 x limit) and
//! its count passed the next step of 0.1 x limit (`report_step`) or the
//! limit itself, it signs a `HotReport` of those blocks after `relay_ms`
//! (reporting on every change cost 67 KB/s per node of hot traffic at
//! N = 100); the report of a block that passed the limit is sent twice
//! more, 200 ms apart (`again`: one push epidemic misses about e^-fanout of
//! the nodes, and a node needs 2 of the 3 owners); every owner re-reports
//! all its hot blocks every 20 s. Reports
//! spread epidemically: a node that gets a report with something new keeps
//! it in its `HotView` and forwards the report unchanged, after `relay_ms`
//! (all new reports in one `HotRelay`), to `fanout` (4) random members. A
//! node decides with `decide(own, sent, median of the owners' reports,
//! limits, min_origins_to_refuse = 3)`. When owners change, the best
//! surviving old owner (on a failure) or the displaced owner (on a join)
//! sends a `Handoff` of its table of each block whose window is at least
//! `handoff_min` (0.5 = the hot fraction: only hot blocks) x limit to the new
//! owner. A cold block (window under half the limit) is not handed off: its
//! new owner counts from zero, and the median of its three owners is still
//! the true count while the other two are intact; only a cold block that
//! changes two owners within one window and then floods is under-counted,
//! by less than half the limit (handing off every block with a window of
//! 0.25 x limit or more cost 53 KB/s per node at N = 1,000 with this churn).
//!
//! `resend=origins` models the live node's policy instead (`src/gossip/
//! hot.rs`, `Hot::round`, `State::members_moved`): no handoff; when a
//! block's owners change, each origin re-sends what it sent of it (its
//! counts of the whole window, those of before the run attributed to the
//! initial members by a fixed hash and sized with placeholder signatures),
//! to all r owners: blocks hot in its view or reported by it at once, cold
//! ones through a queue (`cold_max` 65,536) of which `cold_budget` (256)
//! go per full round, a membership change making the next round a full
//! one (`full_on_change`). Rounds on a 50 ms grid (`quick_ms`) send hot
//! blocks and bursts (`burst`: grown by 2 since the last send) and the
//! owners' reports; reports are forwarded at once to 3 peers, no repeats
//! (`again` 0), a refresh every 10 s. Variations: `resend_all=0` (re-sent
//! counts to the new owners only), `full_on_change=0`, `recent_first=1`
//! (moved blocks with counts of this or the last epoch at once).
//!
//! A finding about `HotView` (not changed here): with `r_max` = r (3),
//! the simulation's first runs ended in a message storm (24 GB, then
//! `--new=100,10000,100,duration_ms=20000,hot_rmax=3` exhausts a 2 GB cap,
//! where 6 finishes in 2 s). When a block's owners change, a 4th owner's
//! report evicts the report with the oldest epoch, possibly a current
//! owner's; that evicted report, arriving again from another peer, is
//! "new" again, so `merge` is not monotone and "forward what is new" never
//! ends. The simulation keeps 2r reports per block; the live wiring needs
//! the same, or eviction of non-owners' reports only, or a seen-set.

mod new;
mod old;

use std::fmt::Write as _;

const KB: f64 = 1000.0;

/// The text under the table in `bench/RESULTS.md`.
const MODEL: &str = "Both designs over the same simulated network (virtual time, 5-50 ms latency, 1 % loss, no sockets), every byte an encoded protobuf envelope of the real codec (v1 `Envelope` for the old design, v2 `EnvelopeV2` for the new). Floods: 20 new blocks, each 20 connections/s for 10 s at random nodes, limit 120 connections per window: the leak target is 1.05 + 20 x 1 s / 120 = 1.22. *Crossing to every node refusing*: from the attempt that truly passed the limit network-wide to the moment the last node (running from before the crossing to the end) would refuse the block; p99 over the 20 floods (= the worst). *Leak*: connections admitted / limit per flood block. KB = 1000 bytes, sent per node per second of its running time (nodes running at least 5 s), p50 / p99 over nodes.\n\n\
**Old design** (`old.rs`: real `gossip::ledger`): every change to every node, fanout 3, ceil(log2 N) + 1 rounds, 4 pushes per interval, anti-entropy every 10 s, no churn, no liar. At the issue's load (10,000 attempts/s) it is simulated at N = 100 with 100,000 blocks (about 10 minutes: every node merges every change; N = 1,000 or 1M blocks would not fit in time or memory: each node holds every (origin, block, epoch) of the network), and at N = 1,000 only with the old light load (one connection per block every 5 min over 10,000 blocks). Its cost at the issue's load for N = 1,000 and 10,000 is **extrapolated** (notes below): delta bytes per node per distinct changed count (measured) x 10,000 changed counts/s (at 1M blocks nearly every attempt is a new (origin, block, epoch)) x the growth of the rounds.\n\n\
**New design** (`new.rs`: real `gossip::owners`): load and protocol as in the header of `bench/gossip_sim/main.rs`: 1M blocks whose window starts at Poisson(36) past connections each (kept by their owners under pseudo-origins, handoffs sized as one signed count per past connection), 10,000 attempts/s uniformly over the blocks (uniform: with any Zipf skew at this rate the top blocks would be far over the limit, i.e. refused anyway and part of the hot set), 10 % of the nodes failing (detected 2 s later) and as many joining during the 30 s, one owner of a victim block reporting 100 x its count and origins. Increments signed with Ed25519 keys (`ring`; the certificate keys are ECDSA P-256 today, same 64-octet signatures), 1 batch in 10 verified with `decode_increments` (all would cost ~45 s of CPU per run; every sampled one verified), every distinct hot report verified once with `decode_report` (every node receives the same bytes). Owners from the real rendezvous code (`owners_ranked`, `weight`), cached per block and checked against `owners()` over the live view after every membership change. SWIM itself is not simulated (membership is known to all at once, leaves 2 s late); handoffs are sized with the real `Handoff` codec but delivered as values (owners.rs has no handoff decoder), and origins do not re-send on an owner change (the handoff from one old owner covers it).";

fn pctf(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 * q) as usize).min(v.len() - 1);
    v[i]
}

fn pct_ms(v: &[u64], q: f64) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let i = ((v.len() as f64 * q) as usize).min(v.len() - 1);
    format!("{:.2}", v[i] as f64 / 1000.0)
}

const HEADER: &str = "| design | nodes | active blocks | attempts/s (network) | churn | KB/s per node p50 / p99 | mean KB/s: increments or deltas / hot or anti-entropy / handoff | crossing to a node refusing p50 / p99 (s) | crossing to every node refusing p50 / p99 (s) | floods never refused everywhere | leak max (mean) | victim refused | sim time |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

fn leak(v: &[f64]) -> String {
    let max = v.iter().copied().fold(0.0, f64::max);
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    format!("{max:.3} ({mean:.3})")
}

fn new_row(o: &new::Outcome) -> String {
    let n = o.p.nodes as f64;
    let secs = o.p.duration_ms as f64 / 1000.0;
    let mean = |b: u64| b as f64 / n / secs / KB;
    let mut every: Vec<u64> = o.every.iter().flatten().copied().collect();
    every.sort_unstable();
    let never = o.every.iter().filter(|e| e.is_none()).count();
    let design = match o.p.resend {
        new::Resend::Handoff => format!(
            "new (owners, r = {}, fanout {}, relay {} ms)",
            o.p.owners, o.p.fanout, o.p.relay_ms
        ),
        new::Resend::Origins => format!(
            "new, live policy (origins re-send, {}cold {} per full round{}, {}, quick {} ms, fanout {}, forwarded at once{})",
            if o.p.recent_first {
                "blocks with counts of this or the last epoch at once, other "
            } else {
                ""
            },
            o.p.cold_budget,
            if o.p.full_on_change {
                " = every interval and every membership change"
            } else {
                " = every interval only"
            },
            if o.p.resend_all {
                "to all r owners"
            } else {
                "to the new owners only"
            },
            o.p.quick_ms,
            o.p.fanout,
            if o.p.again > 0 {
                format!(", over-limit report repeated {} x {} ms later", o.p.again, o.p.again_ms)
            } else {
                String::new()
            }
        ),
    };
    format!(
        "| {} | {} | {} | {:.0} | {:.0} % | {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {} / {} | {} / {} | {} of {} | {} | {} of {} checks | {:.0} s |",
        design,
        o.p.nodes,
        o.p.blocks,
        o.p.rate + (o.p.floods as f64 * (o.p.flood_rate * o.p.flood_secs) as f64 / (o.p.duration_ms as f64 / 1000.0)),
        o.p.churn * 100.0,
        pctf(&o.bps, 0.5) / KB,
        pctf(&o.bps, 0.99) / KB,
        mean(o.bytes.increments),
        mean(o.bytes.hot),
        mean(o.bytes.handoff),
        pct_ms(&o.per_node, 0.5),
        pct_ms(&o.per_node, 0.99),
        pct_ms(&every, 0.5),
        pct_ms(&every, 0.99),
        never,
        o.every.len(),
        leak(&o.leaks),
        o.victim_refusals,
        o.victim_checks,
        o.wall,
    )
}

fn new_detail(o: &new::Outcome) -> String {
    if o.p.resend == new::Resend::Origins {
        return format!(
            "  - new, live policy, N = {}, cold budget {}{}: {} signatures made, {} verified; {} owner changes; {} counts of the run and {} of the window before it re-sent (\"handoff\" column: their bytes), longest cold queue {}, {} cold blocks dropped from a full queue, {} full rounds; hot blocks in a node's view at the end: {}; victim's true window {} (limit {}); {} owner samples checked; setup {:.0} s.",
            o.p.nodes,
            o.p.cold_budget,
            if o.p.full_on_change { "" } else { " (every interval only)" },
            o.signed,
            o.verified,
            o.owner_changes,
            o.resent,
            o.resent_past,
            o.cold_peak,
            o.cold_dropped,
            o.full_rounds,
            o.hot_blocks,
            o.victim_true,
            o.p.limit,
            o.owner_checks,
            o.setup,
        );
    }
    format!(
        "  - new, N = {}: {} signatures made, {} verified (1 increment batch in {} checked with `decode_increments`, every distinct hot report once with `decode_report`); {} owner changes, {} blocks handed off; hot blocks in a node's view at the end: {}; victim's true window {} (limit {}); {} samples of the cached owners equal to `owners()` over the live view; setup {:.0} s.",
        o.p.nodes,
        o.signed,
        o.verified,
        o.p.verify_every,
        o.owner_changes,
        o.handed_off,
        o.hot_blocks,
        o.victim_true,
        o.p.limit,
        o.owner_checks,
        o.setup,
    )
}

fn old_row(o: &old::Outcome) -> String {
    let mut all = o.all_nodes.clone();
    all.sort_unstable();
    format!(
        "| old (every change to every node, 4 pushes per interval) | {} | {} | {:.0} | 0 % | {:.2} / {:.2} | {:.2} / {:.2} / - | {} / {} | {} / {} | {} nodes x floods | {} | - | {:.0} s |",
        o.p.nodes,
        o.p.active_blocks,
        o.p.rate + (o.p.floods as f64 * 200.0 / (o.p.duration_ms as f64 / 1000.0)),
        pctf(&o.bps, 0.5) / KB,
        pctf(&o.bps, 0.99) / KB,
        o.delta_bps / KB,
        o.ae_bps / KB,
        pct_ms(&o.per_node, 0.5),
        pct_ms(&o.per_node, 0.99),
        pct_ms(&all, 0.5),
        pct_ms(&all, 0.99),
        o.undetected,
        leak(&o.leaks),
        o.wall,
    )
}

/// The old design at the load, extrapolated from a measured run:
/// its delta bytes per node per distinct changed count, times the distinct
/// counts that 10,000 attempts/s over 1M blocks change (each attempt a new
/// (origin, block, epoch) count, nearly always), times the growth of the
/// rounds (ceil(log2 N) + 1) to the target N.
fn old_extrapolation(o: &old::Outcome) -> String {
    let per_count = o.delta_bps / o.changed_per_sec.max(1e-9);
    let rounds = |n: usize| (n as f64).log2().ceil() + 1.0;
    let mut s = format!(
        "  - old, N = {} measured: {:.0} distinct counts changed per s network-wide, {:.0} delta bytes per node per changed count",
        o.p.nodes, o.changed_per_sec, per_count
    );
    for n in [1000usize, 10_000] {
        if n < o.p.nodes {
            continue;
        }
        let _ = write!(
            s,
            "; **extrapolated** to N = {n} at 10,000 changed counts/s: {:.0} KB/s per node",
            per_count * 10_000.0 * rounds(n) / rounds(o.p.nodes) / KB
        );
    }
    s.push('.');
    s
}

fn new_params(spec: &str) -> new::Params {
    let mut it = spec.split(',');
    let mut num = || -> f64 {
        it.next()
            .and_then(|x| x.parse().ok())
            .expect("--new=N,BLOCKS,RATE[,key=value...]")
    };
    let mut p = new::Params::new(num() as usize, num() as usize, num());
    // `resend=origins` first: it sets the live policy's defaults, which
    // the other keys may change.
    for kv in spec.split(',').skip(3) {
        match kv {
            "resend=origins" => p.live(),
            "resend=handoff" => {}
            _ => continue,
        }
    }
    for kv in spec.split(',').skip(3) {
        let (k, v) = kv.split_once('=').expect("key=value");
        if k == "resend" {
            assert!(v == "origins" || v == "handoff", "resend=origins|handoff");
            continue;
        }
        let f: f64 = v.parse().expect("a number");
        match k {
            "fanout" => p.fanout = f as usize,
            "relay_ms" => p.relay_ms = f as u64,
            "interval_ms" => p.interval_ms = f as u64,
            "refresh_ms" => p.refresh_ms = f as u64,
            "report_step" => p.report_step = f,
            "again" => p.again = f as u32,
            "again_ms" => p.again_ms = f as u64,
            "hot_rmax" => p.hot_rmax = f as usize,
            "handoff_min" => p.handoff_min = f,
            "churn" => p.churn = f,
            "verify_every" => p.verify_every = f as u64,
            "zipf" => p.zipf = f,
            "duration_ms" => p.duration_ms = f as u64,
            "floods" => p.floods = f as usize,
            "min_origins" => p.min_origins = f as u32,
            "cold_budget" => p.cold_budget = f as usize,
            "cold_max" => p.cold_max = f as usize,
            "quick_ms" => p.quick_ms = f as u64,
            "full_on_change" => p.full_on_change = f != 0.0,
            "resend_all" => p.resend_all = f != 0.0,
            "burst" => p.burst = f as u32,
            "recent_first" => p.recent_first = f != 0.0,
            _ => panic!("unknown key {k}"),
        }
    }
    p
}

fn old_params(spec: &str) -> old::Params {
    let v: Vec<f64> = spec
        .split(',')
        .map(|x| x.parse().expect("--old=N,BLOCKS,RATE,FRESH"))
        .collect();
    let mut p = old::Params::new(v[0] as usize, v[1] as usize, 1000, v[3] as u64);
    p.rate = v[2];
    p.floods = 20;
    p.duration_ms = 30_000;
    p
}

fn write_results(table: &str, notes: &str, command: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/RESULTS.md");
    let old =
        std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmark results\n".to_string());
    let mut section = String::new();
    let _ = writeln!(section, "## Gossip simulation\n");
    let _ = writeln!(
        section,
        "Command: `{command}` (source: `bench/gossip_sim/`, model in the header of `main.rs`, `old.rs` and `new.rs`).\n"
    );
    let _ = writeln!(section, "{MODEL}\n");
    let _ = writeln!(section, "{HEADER}");
    section.push_str(table);
    section.push('\n');
    section.push_str(notes);
    section.push('\n');
    let new = match old.find("## Gossip simulation") {
        Some(start) => {
            let after = &old[start + 1..];
            match after.find("\n## ") {
                Some(i) => format!("{}{}\n{}", &old[..start], section, &after[i + 1..]),
                None => format!("{}{}", &old[..start], section),
            }
        }
        None => format!("{}\n\n{}", old.trim_end(), section),
    };
    std::fs::write(&path, new).expect("write bench/RESULTS.md");
    println!("wrote {}", path.display());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    if let Some(spec) = args.iter().find_map(|a| a.strip_prefix("--new=")) {
        let o = new::simulate(new_params(spec));
        println!("{HEADER}\n{}\n{}", new_row(&o), new_detail(&o));
        return;
    }
    if let Some(spec) = args.iter().find_map(|a| a.strip_prefix("--old=")) {
        let o = old::simulate(old_params(spec));
        println!("{HEADER}\n{}\n{}", old_row(&o), old_extrapolation(&o));
        return;
    }
    let (news, olds): (Vec<new::Params>, Vec<old::Params>) = if quick {
        (
            vec![new_params("100,100000,1000"), new_params("300,100000,1000")],
            vec![old_params("100,10000,33.3,4")],
        )
    } else {
        (
            vec![
                new_params("1000,1000000,10000"),
                new_params("10000,1000000,10000"),
            ],
            vec![
                old_params("100,100000,10000,4"),
                old_params("1000,10000,33.3,4"),
            ],
        )
    };
    println!("{HEADER}");
    let mut table = String::new();
    let mut notes = String::new();
    for p in olds {
        let o = old::simulate(p);
        let r = old_row(&o);
        println!("{r}");
        table.push_str(&r);
        table.push('\n');
        let d = old_extrapolation(&o);
        println!("{d}");
        notes.push_str(&d);
        notes.push('\n');
    }
    for p in news {
        let o = new::simulate(p);
        let r = new_row(&o);
        println!("{r}");
        table.push_str(&r);
        table.push('\n');
        let d = new_detail(&o);
        println!("{d}");
        notes.push_str(&d);
        notes.push('\n');
    }
    if quick {
        println!("(--quick: printed only, bench/RESULTS.md left alone)");
        return;
    }
    write_results(&table, &notes, "cargo bench --bench gossip_sim");
}
