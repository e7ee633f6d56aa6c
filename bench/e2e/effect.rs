//! Effectiveness of network-wide throttling: five nodes on loopback, a
//! flood from B blocks at A messages/s each, spread round-robin over the
//! nodes (so every node sees a fifth of each block), and, in the same run, a
//! person-to-person sender from a fresh block sending a few messages per
//! "hour". Time is scaled down: the throttle window is 60 s (the "hour"),
//! epochs 1 s.
//!
//! Runs ([`SCENARIOS`]): gossip off (the control: each node counts alone,
//! so the network admits up to 5 × the limit), gossip on with the same
//! flood, and gossip on with a faster flood from fewer blocks (where the
//! gossip delay τ matters most). The design's target is at most
//! `limit + A × τ` per block, τ ≤ 2 s. The gossip runs need `magicmx ca`
//! and gossip wired into the node; without them they are reported as not
//! run.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::load::{self, Outcome};
use crate::node::{bin, MagicNode};
use crate::sink::Sink;
use crate::{median, percentile, plot, replace_section, Opts, DOMAIN, RCPT};

const NODES: usize = 5;

/// One flood: `blocks` blocks, each sending `rate` messages/s
/// (network-wide) for `secs` seconds.
#[derive(Clone, Copy)]
struct Scenario {
    blocks: usize,
    rate: f64,
    secs: f64,
    gossip: bool,
}

impl Scenario {
    fn bound(&self) -> f64 {
        LIMIT as f64 + self.rate * 2.0
    }

    fn flood(&self) -> String {
        format!("{} blocks × {:.0} msgs/s", self.blocks, self.rate)
    }
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        blocks: 10,
        rate: 10.0,
        secs: 30.0,
        gossip: false,
    },
    Scenario {
        blocks: 10,
        rate: 10.0,
        secs: 30.0,
        gossip: true,
    },
    Scenario {
        blocks: 4,
        rate: 40.0,
        secs: 15.0,
        gossip: true,
    },
];

/// Limit of messages per block and window.
const LIMIT: u32 = 50;
const WINDOW: &str = "60s";
const EPOCH: &str = "1s";
const HOLD_SECS: f64 = 3.0;
/// The person-to-person sender: one message every P2P_EVERY seconds.
const P2P_EVERY: f64 = 5.0;

#[derive(Clone)]
struct Sent {
    /// Block index, or None for the person-to-person sender.
    block: Option<usize>,
    seq: u64,
    /// Seconds from the start of the flood.
    at: f64,
    outcome: Outcome,
}

struct RunResult {
    sc: Scenario,
    sent: Vec<Sent>,
    /// seq → arrival, seconds from the start.
    arrivals: HashMap<u64, f64>,
    quarantined: usize,
    peers: Vec<usize>,
    start_note: String,
}

fn node_toml(
    i: usize,
    sink: u16,
    dns: SocketAddr,
    gossip: Option<(&std::path::Path, Option<SocketAddr>)>,
) -> String {
    let gossip_section = match gossip {
        None => String::new(),
        Some((ca, seed)) => format!(
            r#"
[gossip]
enabled = true
listen = "127.0.0.1:0"
network = "bench"
seeds = [{}]
ca = "{ca}/ca.pem"
cert = "{ca}/node{i}.pem"
key = "{ca}/node{i}.key"
"#,
            seed.map(|s| format!("\"{s}\"")).unwrap_or_default(),
            ca = ca.display()
        ),
    };
    format!(
        r#"
[node]
name = "node{i}"
hostname = "mx{i}.magic.bench.test"
data_dir = "@DATA@"
magic_suffixes = [".magic.bench.test"]

[smtp]
listen = ["127.0.0.1:0"]
max_connections = 2000

[accept]
domains = ["{DOMAIN}"]

[relay]
port = {sink}
# The real MX is on loopback.
deny_networks = []
concurrency = 20
retry_initial = "1s"
retry_max = "5s"
tls = "none"

[dns]
nameservers = ["{dns}"]

[admin]
listen = "127.0.0.1:0"

[throttle]
enabled = true
window = "{WINDOW}"
epoch = "{EPOCH}"
max_messages = {LIMIT}
max_connections = 1000000
max_recipients = 1000000
penalty = "120s"
max_penalty = "240s"
hold = "{hold_ms}ms"

[trust]
networks = ["127.0.0.1/32"]
{gossip_section}"#,
        hold_ms = (HOLD_SECS * 1000.0) as u64
    )
}

/// `magicmx ca init` + `issue node1..node5`; Err if the CLI has no `ca`.
fn make_ca(dir: &std::path::Path) -> Result<(), String> {
    let run = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new(bin())
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`magicmx {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
            ))
        }
    };
    let d = dir.to_str().unwrap();
    run(&["ca", "init", "--dir", d])?;
    for i in 1..=NODES {
        run(&["ca", "issue", &format!("node{i}"), "--dir", d])?;
    }
    Ok(())
}

/// GET on the admin listener; the body.
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    Some(
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or(text),
    )
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
}

async fn run_once(
    sc: Scenario,
    sink: &Sink,
    dns: SocketAddr,
    seq0: u64,
) -> anyhow::Result<Result<RunResult, String>> {
    let gossip = sc.gossip;
    let tmp = tempfile::Builder::new()
        .prefix("magicmx-bench-effect-")
        .tempdir()?;
    let ca = tmp.path().join("ca");
    if gossip {
        if let Err(e) = make_ca(&ca) {
            return Ok(Err(e));
        }
    }
    let mut nodes: Vec<MagicNode> = Vec::new();
    let mut admins = Vec::new();
    let mut seed = None;
    for i in 1..=NODES {
        let dir = tmp.path().join(format!("node{i}"));
        std::fs::create_dir_all(&dir)?;
        let toml = node_toml(
            i,
            sink.addr.port(),
            dns,
            gossip.then_some((ca.as_path(), seed)),
        );
        let mut node = MagicNode::start_in(&dir, &toml)?;
        admins.push(node.addr("admin listening", Duration::from_secs(10))?);
        if gossip {
            match node.addr("gossip listening", Duration::from_secs(5)) {
                Ok(a) => {
                    if seed.is_none() {
                        seed = Some(a);
                    }
                }
                Err(_) => {
                    return Ok(Err(
                        "the node does not start gossip (no `gossip listening` line): gossip is not wired into Node::start yet".into(),
                    ))
                }
            }
        }
        nodes.push(node);
    }
    // Membership: wait until every node sees the four others.
    let mut start_note = String::new();
    let mut peers = vec![0usize; NODES];
    if gossip {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (i, a) in admins.iter().enumerate() {
                let m = http_get(*a, "/metrics").await.unwrap_or_default();
                peers[i] = metric(&m, "magicmx_gossip_peers").unwrap_or(0.0) as usize;
            }
            if peers.iter().all(|&p| p >= NODES - 1) {
                break;
            }
            if Instant::now() > deadline {
                start_note = format!("membership had not converged after 30 s (peers seen: {peers:?}); flood started anyway");
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let targets: Vec<SocketAddr> = nodes.iter().map(|n| n.smtp).collect();

    // Flood + person-to-person, open loop.
    let b = sc.blocks;
    let flood_sources: Vec<IpAddr> = (0..b)
        .map(|k| IpAddr::from([127, 40, k as u8 + 1, 1]))
        .collect();
    let p2p_source: IpAddr = IpAddr::from([127, 41, 7, 1]);
    let sent = Arc::new(Mutex::new(Vec::<Sent>::new()));
    let sem = Arc::new(tokio::sync::Semaphore::new(400));
    let start = Instant::now();
    let total_rate = sc.rate * b as f64;
    let flood_n = (sc.secs * total_rate) as usize;
    let p2p_n = ((sc.secs + 5.0) / P2P_EVERY) as usize;
    // (time, block) schedule merged with the p2p schedule.
    let mut schedule: Vec<(f64, Option<usize>, usize)> = (0..flood_n)
        .map(|i| (i as f64 / total_rate, Some(i % b), (i / b) % NODES))
        .collect();
    schedule.extend((0..p2p_n).map(|k| (1.0 + k as f64 * P2P_EVERY, None, k % NODES)));
    schedule.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut tasks = Vec::new();
    for (n, (at, block, node)) in schedule.into_iter().enumerate() {
        let when = start + Duration::from_secs_f64(at);
        tokio::time::sleep_until(when.into()).await;
        let permit = sem.clone().acquire_owned().await.unwrap();
        let seq = seq0 + n as u64;
        let source = match block {
            Some(b) => flood_sources[b],
            None => p2p_source,
        };
        let target = targets[node];
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let _p = permit;
            let body = load::message(seq, RCPT, 1024);
            let outcome = load::send_one(target, Some(source), RCPT, &body).await;
            sent.lock().unwrap().push(Sent {
                block,
                seq,
                at: match &outcome {
                    Outcome::Acked(t) => t.duration_since(start).as_secs_f64(),
                    _ => at,
                },
                outcome,
            });
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    // Let held mail be released (or quarantined).
    tokio::time::sleep(Duration::from_secs_f64(HOLD_SECS + 4.0)).await;
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let arrivals: HashMap<u64, f64> = sink
        .state
        .arrivals_in(seq0..seq0 + 1_000_000)
        .into_iter()
        .map(|(s, t)| (s, t.saturating_duration_since(start).as_secs_f64()))
        .collect();
    let mut quarantined = 0;
    for a in &admins {
        if let Some(body) = http_get(*a, "/status").await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                quarantined += v["queue"]["quarantined"].as_u64().unwrap_or(0) as usize;
            }
        }
    }
    drop(nodes);
    Ok(Ok(RunResult {
        sc,
        sent,
        arrivals,
        quarantined,
        peers,
        start_note,
    }))
}

struct Summary {
    per_block_acked: Vec<f64>,
    per_block_relayed: Vec<f64>,
    attempts_per_block: f64,
    p2p_sent: usize,
    p2p_refused: usize,
    p2p_failed: usize,
    p2p_delay: Vec<f64>,
    refusals: HashMap<String, usize>,
}

fn summarize(r: &RunResult) -> Summary {
    let b = r.sc.blocks;
    let mut acked = vec![0.0; b];
    let mut relayed = vec![0.0; b];
    let mut attempts = vec![0.0; b];
    let mut s = Summary {
        per_block_acked: Vec::new(),
        per_block_relayed: Vec::new(),
        attempts_per_block: 0.0,
        p2p_sent: 0,
        p2p_refused: 0,
        p2p_failed: 0,
        p2p_delay: Vec::new(),
        refusals: HashMap::new(),
    };
    for m in &r.sent {
        match m.block {
            Some(b) => {
                attempts[b] += 1.0;
                match &m.outcome {
                    Outcome::Acked(_) => {
                        acked[b] += 1.0;
                        if r.arrivals.contains_key(&m.seq) {
                            relayed[b] += 1.0;
                        }
                    }
                    Outcome::Refused("connect", 0) => {
                        *s.refusals
                            .entry("closed at connect, no banner".into())
                            .or_insert(0) += 1
                    }
                    Outcome::Refused(stage, code) => {
                        *s.refusals.entry(format!("{code} at {stage}")).or_insert(0) += 1
                    }
                    Outcome::Failed(_) => {
                        *s.refusals.entry("closed without reply".into()).or_insert(0) += 1
                    }
                }
            }
            None => {
                s.p2p_sent += 1;
                match &m.outcome {
                    Outcome::Acked(_) => {
                        if let Some(a) = r.arrivals.get(&m.seq) {
                            s.p2p_delay.push(a - m.at);
                        }
                    }
                    Outcome::Refused(..) => s.p2p_refused += 1,
                    Outcome::Failed(_) => s.p2p_failed += 1,
                }
            }
        }
    }
    s.per_block_acked = acked;
    s.per_block_relayed = relayed;
    s.attempts_per_block = attempts.iter().sum::<f64>() / b as f64;
    s
}

/// Mean over the blocks of what was accepted (or relayed) by time t.
fn series(r: &RunResult, relayed: bool, until: f64) -> Vec<(f64, f64)> {
    let mut times: Vec<f64> = r
        .sent
        .iter()
        .filter(|m| m.block.is_some() && matches!(m.outcome, Outcome::Acked(_)))
        .filter_map(|m| {
            if relayed {
                r.arrivals.get(&m.seq).copied()
            } else {
                Some(m.at)
            }
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let mut out = Vec::new();
    let mut k = 0;
    let mut t = 0.0;
    while t <= until {
        while k < times.len() && times[k] <= t {
            k += 1;
        }
        out.push((t, k as f64 / r.sc.blocks as f64));
        t += 0.25;
    }
    out
}

pub async fn effectiveness(opts: &Opts) -> anyhow::Result<()> {
    let sink = Sink::start().await;
    let dns = crate::domain_dns();
    let mut results: Vec<RunResult> = Vec::new();
    let mut not_run = None;
    for (k, sc) in SCENARIOS.into_iter().enumerate() {
        if sc.gossip && not_run.is_some() {
            continue;
        }
        println!(
            "effectiveness: 5 nodes, gossip {}, flood {}",
            if sc.gossip { "on" } else { "off" },
            sc.flood()
        );
        match run_once(sc, &sink, dns.addr, 20_000_000 + k as u64 * 1_000_000).await? {
            Ok(r) => results.push(r),
            Err(e) => {
                println!("  gossip run not possible: {e}");
                not_run = Some(e);
            }
        }
    }
    let mut md = String::new();
    let _ = writeln!(md, "## Network throttling effectiveness\n");
    let _ = writeln!(
        md,
        "Command: `bench/run.sh` (section `effectiveness`). {NODES} magicmx nodes on loopback; time scaled down: window {WINDOW} (stands for the hour), epoch {EPOCH}, limit **{LIMIT} messages per block per window**, hold {HOLD_SECS} s, penalty 120 s, connection and recipient limits out of the way. Flood: B blocks (127.40.b.1), each sending A messages/s network-wide, one message per session, each block's messages spread round-robin over the {NODES} nodes (every node sees a fifth of each block). Person-to-person sender, in the same run: a fresh block (127.41.7.1), one message every {P2P_EVERY} s (a few per \"hour\": {:.0} per window, against a limit of {LIMIT}), also rotating over the nodes. Gossip (when on): the product's defaults (push every 1 s, fanout 3, anti-entropy 10 s, peer share cap 0.5), a CA made with `magicmx ca`, node 1 as everyone's seed. The design's target: at most `limit + A × τ` accepted per block network-wide, τ ≤ 2 s.\n",
        60.0 / P2P_EVERY
    );
    let _ = writeln!(
        md,
        "| gossip | flood (B × A, duration) | attempts per block | accepted per block (min / median / max) | **leak ratio** accepted ÷ limit (median / max) | design bound ÷ limit | relayed to the real MX per block (median / max) | quarantined (all nodes) | flood refusals |\n|---|---|---|---|---|---|---|---|---|"
    );
    let mut time_table: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut plots: Vec<(Scenario, Vec<plot::Series>)> = Vec::new();
    let mut p2p_rows = String::new();
    for r in &results {
        let s = summarize(r);
        let a = &s.per_block_acked;
        let rl = &s.per_block_relayed;
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let min = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
        let mut refusals: Vec<String> = s
            .refusals
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        refusals.sort();
        let label = if r.sc.gossip { "on" } else { "off (control)" };
        let flood = format!("{}, {:.0} s", r.sc.flood(), r.sc.secs);
        let _ = writeln!(
            md,
            "| {label} | {flood} | {:.0} | {:.0} / {:.0} / {:.0} | **{:.2}** / {:.2} | {:.2} | {:.0} / {:.0} | {} | {} |",
            s.attempts_per_block,
            min(a),
            median(a),
            max(a),
            median(a) / LIMIT as f64,
            max(a) / LIMIT as f64,
            r.sc.bound() / LIMIT as f64,
            median(rl),
            max(rl),
            r.quarantined,
            refusals.join(", ")
        );
        let delays = &s.p2p_delay;
        let _ = writeln!(
            p2p_rows,
            "| {label} | {flood} | {} | **{}** | {} | {} | {:.2} s / {:.2} s |",
            s.p2p_sent,
            s.p2p_refused + s.p2p_failed,
            delays.len(),
            s.p2p_sent - s.p2p_refused - s.p2p_failed - delays.len(),
            if delays.is_empty() {
                f64::NAN
            } else {
                median(delays)
            },
            if delays.is_empty() {
                f64::NAN
            } else {
                percentile(delays, 1.0)
            },
        );
        let until = r.sc.secs + HOLD_SECS + 3.0;
        let acc = series(r, false, until);
        let rel = series(r, true, until);
        time_table.push((
            format!("accepted, gossip {label}, {}", r.sc.flood()),
            acc.clone(),
        ));
        time_table.push((
            format!("relayed, gossip {label}, {}", r.sc.flood()),
            rel.clone(),
        ));
        let entry = match plots
            .iter_mut()
            .find(|(sc, _)| sc.blocks == r.sc.blocks && sc.rate == r.sc.rate)
        {
            Some(e) => e,
            None => {
                plots.push((r.sc, Vec::new()));
                plots.last_mut().unwrap()
            }
        };
        entry.1.push(plot::Series {
            name: format!("accepted per block, gossip {label}"),
            points: acc,
            thin: false,
        });
        entry.1.push(plot::Series {
            name: format!("relayed per block, gossip {label}"),
            points: rel,
            thin: false,
        });
        if !r.start_note.is_empty() {
            let _ = writeln!(md, "\nNote (gossip {label}): {}\n", r.start_note);
        }
    }
    if let Some(e) = &not_run {
        let _ = writeln!(
            md,
            "| on | — | **not run**: {e}. The harness runs it as soon as `magicmx ca` and gossip in `Node::start` land. | | | | | | |"
        );
    }
    for r in results.iter().filter(|r| r.sc.gossip) {
        let _ = writeln!(
            md,
            "\nPeers seen by each node before the flood ({}): {:?}",
            r.sc.flood(),
            r.peers
        );
    }
    let _ = writeln!(
        md,
        "\nPerson-to-person sender (must see zero refusals, and only the hold as added delay):\n\n| gossip | flood meanwhile | messages | refused or failed | relayed | not relayed | delay from 250 to the real MX (median / max; hold = {HOLD_SECS} s) |\n|---|---|---|---|---|---|---|\n{p2p_rows}"
    );
    let _ = writeln!(
        md,
        "Notes. *Relayed* is below *accepted* even within the limit: mail still in its hold when its block goes over the limit or into the penalty box is quarantined at release (by design: the node cannot tell the flood's first messages from its last), so a fast flood is relayed not at all. The release time is rounded up to the next whole second (`next_attempt` is a Unix second), so the person-to-person delay is between the hold and the hold + 1 s, plus the relay itself.\n"
    );
    let _ = writeln!(md, "Accepted (and relayed) messages per block over time, mean over the flood's blocks (limit {LIMIT}):\n");
    let marks = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0];
    let _ = write!(md, "| series |");
    for t in marks {
        let _ = write!(md, " t = {t:.0} s |");
    }
    let _ = write!(md, "\n|---|");
    for _ in marks {
        let _ = write!(md, "---|");
    }
    let _ = writeln!(md);
    for (name, pts) in &time_table {
        let _ = write!(md, "| {name} |");
        let last = pts.last().map(|p| p.0).unwrap_or(0.0);
        for t in marks {
            if t > last + 0.01 {
                let _ = write!(md, " |");
                continue;
            }
            let v = pts
                .iter()
                .rev()
                .find(|(x, _)| *x <= t)
                .map(|p| p.1)
                .unwrap_or(0.0);
            let _ = write!(md, " {v:.1} |");
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md);
    for (i, (sc, mut series)) in plots.into_iter().enumerate() {
        let until = sc.secs + HOLD_SECS + 3.0;
        series.push(plot::Series {
            name: format!("limit ({LIMIT})"),
            points: vec![(0.0, LIMIT as f64), (until, LIMIT as f64)],
            thin: true,
        });
        series.push(plot::Series {
            name: format!("design bound: limit + A x 2 s ({:.0})", sc.bound()),
            points: vec![(0.0, sc.bound()), (until, sc.bound())],
            thin: true,
        });
        let name = if i == 0 {
            "effectiveness.png".to_string()
        } else {
            format!("effectiveness-{}.png", i + 1)
        };
        let png = opts.bench_dir.join(&name);
        plot::lines(
            &png,
            &format!(
                "Flood of {} over {NODES} nodes: accepted per block vs the limit",
                sc.flood()
            ),
            "seconds since the flood started",
            "messages per block (mean)",
            &series,
        )?;
        let _ = writeln!(md, "![effectiveness, {}]({name})\n", sc.flood());
    }
    let _ = writeln!(
        md,
        "Load average {:.1} at the end (shared machine).\n",
        crate::procs::loadavg()
    );
    println!("{md}");
    replace_section(&opts.results(), "## Network throttling effectiveness", &md);
    Ok(())
}
