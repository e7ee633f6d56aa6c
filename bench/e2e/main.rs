//! End-to-end benchmarks of a magicmx node, against Postfix in the same run.
//!
//! Run with `bench/run.sh` (it checks for or installs Postfix, raises the
//! open-file limit, then runs `cargo bench --bench e2e`). Everything runs on
//! loopback: a DNS server and an SMTP sink (the domain's "real MX") inside
//! this process, `magicmx run` and a private Postfix as child processes.
//! Sections (choose with `E2E_SECTIONS=throughput,connections,effectiveness,profile`):
//!
//! - throughput: `smtp-source` and the harness's own load generator send M
//!   messages of 1 KB over 20 concurrent sessions to magicmx and to Postfix
//!   relaying the same domain to the same sink, alternating, for a few
//!   rounds; plus magicmx with its throttle on and mail from 1,000 blocks.
//! - connections: memory and CPU of a node holding 10,000 idle, then slow,
//!   sessions, and the time a normal session takes meanwhile.
//! - effectiveness: five nodes with gossip, a flood from B blocks spread
//!   over the nodes, admitted mail against the limit over time, and a
//!   person-to-person sender that must never be refused.
//! - profile: where magicmx's CPU time goes (perf), and how many messages
//!   one fsync covers.
//!
//! Figures go to stdout and to `bench/RESULTS.md` (one `## ` section per
//! part, replaced in place; other sections are left alone), plots to
//! `bench/*.png`. Sizes: `E2E_MESSAGES` (5000), `E2E_ROUNDS` (3),
//! `E2E_CONNECTIONS` (10000); `E2E_OUT=DIR` writes RESULTS.md and the plots
//! there instead (for trial runs). `E2E_MAGICMX_BIN_B=path` adds another
//! build as "build B"; `E2E_SIGN_B=1` makes build B sign with DKIM (`[sign]`).

/// The test suite's in-process DNS server (hickory-server), shared as is.
#[allow(dead_code)]
#[path = "../../tests/common/dns.rs"]
mod dns;
mod effect;
mod load;
mod node;
mod plot;
mod postfix;
mod procs;
mod sink;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use node::MagicNode;
use postfix::Postfix;
use sink::Sink;

pub const DOMAIN: &str = "bench.test";
/// The domain's MX host, at 127.0.0.1 (the sink's port comes from config).
const MX_HOST: &str = "mx.bench.test";

/// The domain's DNS: `DOMAIN MX 10 MX_HOST`, `MX_HOST A 127.0.0.1`.
pub fn domain_dns() -> dns::DnsServer {
    dns::DnsServer::start(&[
        dns::Rec::Mx(DOMAIN, 10, MX_HOST),
        dns::Rec::A(MX_HOST, "127.0.0.1"),
    ])
}
pub const RCPT: &str = "rcpt@bench.test";

pub struct Opts {
    pub messages: usize,
    pub rounds: usize,
    pub concurrency: usize,
    pub size: usize,
    pub connections: usize,
    pub sections: Vec<String>,
    pub bench_dir: PathBuf,
}

impl Opts {
    fn from_env() -> Opts {
        let n = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        Opts {
            messages: n("E2E_MESSAGES", 5000),
            rounds: n("E2E_ROUNDS", 3),
            concurrency: n("E2E_CONCURRENCY", 20),
            size: n("E2E_SIZE", 1024),
            connections: n("E2E_CONNECTIONS", 10_000),
            sections: std::env::var("E2E_SECTIONS")
                .unwrap_or_else(|_| "throughput,profile,connections,effectiveness".into())
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            bench_dir: std::env::var("E2E_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench")),
        }
    }

    fn wants(&self, s: &str) -> bool {
        self.sections.iter().any(|x| x == s)
    }

    pub fn results(&self) -> PathBuf {
        self.bench_dir.join("RESULTS.md")
    }
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async_main(opts))
}

async fn async_main(opts: Opts) -> anyhow::Result<()> {
    println!(
        "magicmx e2e bench: sections {:?}, {} messages x {} rounds, {} sessions, {} B; binary {}",
        opts.sections,
        opts.messages,
        opts.rounds,
        opts.concurrency,
        opts.size,
        node::bin()
    );
    let t0 = Instant::now();
    if opts.wants("throughput") || opts.wants("profile") {
        throughput(&opts).await?;
    }
    if opts.wants("connections") {
        connections(&opts).await?;
    }
    if opts.wants("effectiveness") {
        effect::effectiveness(&opts).await?;
    }
    println!("done in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

// ------------------------------------------------------------ shared bits

/// Replaces (or appends) the section of `path` that starts with `heading`
/// (up to the next `## `), leaving every other section alone.
pub fn replace_section(path: &Path, heading: &str, section: &str) {
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmark results\n\n".into());
    let section = format!("{}\n", section.trim_end());
    let new = match old.find(&format!("{heading}\n")) {
        Some(start) => {
            let rest = &old[start + heading.len()..];
            let end = rest
                .find("\n## ")
                .map(|i| start + heading.len() + i + 1)
                .unwrap_or(old.len());
            let tail = &old[end..];
            let sep = if tail.is_empty() { "" } else { "\n" };
            format!("{}{}{}{}", &old[..start], section, sep, tail)
        }
        None => format!("{}\n\n{}", old.trim_end(), section),
    };
    if let Err(e) = std::fs::write(path, new) {
        eprintln!("cannot write {}: {e}", path.display());
    }
}

/// The p-th percentile (0..=1) of unsorted values.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

pub fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

/// Machine facts for the notes under each table.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let pf = std::process::Command::new("postconf")
        .arg("-d")
        .arg("mail_version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let fs = std::process::Command::new("sh")
        .args(["-c", "df -T /tmp | tail -1 | awk '{print $2}'"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), queues on {fs} in /tmp, Postfix {pf}")
}

fn fmt_ms(x: f64) -> String {
    if x.is_nan() {
        "—".into()
    } else if x < 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

// ------------------------------------------------------------ throughput

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum System {
    Magicmx,
    /// Another build of magicmx (`E2E_MAGICMX_BIN_B`), e.g. with a proposed fix.
    MagicmxB,
    Postfix,
    /// magicmx, throttle on, mail from 1,000 untrusted blocks.
    MagicmxBlocks,
}

fn label_b() -> &'static str {
    static L: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    L.get_or_init(|| {
        std::env::var("E2E_MAGICMX_LABEL_B").unwrap_or_else(|_| "magicmx (build B)".into())
    })
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::Magicmx => "magicmx",
            System::MagicmxB => label_b(),
            System::Postfix => "Postfix",
            System::MagicmxBlocks => "magicmx, throttle, 1,000 blocks",
        }
    }

    const ALL: [System; 4] = [
        System::Magicmx,
        System::MagicmxB,
        System::Postfix,
        System::MagicmxBlocks,
    ];
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Tool {
    SmtpSource,
    Harness,
    /// The harness client at a fixed rate, below every relay's capacity.
    Paced,
}

/// Messages per second of the paced runs, and how many.
const PACED_RATE: f64 = 200.0;
const PACED_MESSAGES: usize = 1000;

impl Tool {
    fn label(self) -> &'static str {
        match self {
            Tool::SmtpSource => "smtp-source",
            Tool::Harness => "harness client",
            Tool::Paced => "harness client, 200 msgs/s",
        }
    }
}

#[derive(Clone, Debug)]
struct Measure {
    system: System,
    tool: Tool,
    round: usize,
    sent: usize,
    acked: usize,
    arrived: usize,
    refused: usize,
    /// Seconds from the first connection to the last 250.
    ack_secs: f64,
    /// Seconds from the first connection to the last arrival at the sink.
    arrive_secs: f64,
    /// Milliseconds from the 250 to the arrival at the sink (harness client only).
    lat_p50: f64,
    lat_p99: f64,
    latencies: Vec<f64>,
    /// CPU seconds of the relay (all its processes) during the run.
    cpu: f64,
    /// CPU seconds of the whole machine during the run.
    machine_cpu: f64,
    load: f64,
    /// Median milliseconds from the sink's 354 to the final `.`.
    dot_gap: f64,
}

impl Measure {
    fn ack_rate(&self) -> f64 {
        self.acked as f64 / self.ack_secs
    }
    fn arrive_rate(&self) -> f64 {
        self.arrived as f64 / self.arrive_secs
    }
    fn cpu_ms_per_msg(&self) -> f64 {
        1000.0 * self.cpu / self.arrived.max(1) as f64
    }
}

struct Bed {
    sink: Sink,
    _dns: dns::DnsServer,
    node: MagicNode,
    node_b: Option<MagicNode>,
    postfix: Option<Postfix>,
    seq: u64,
}

impl Bed {
    fn relay_cpu(&self, system: System) -> f64 {
        match system {
            System::Postfix => self
                .postfix
                .as_ref()
                .map_or(0.0, |p| procs::tree_cpu_secs(p.master_pid)),
            System::MagicmxB => self.node_b.as_ref().map_or(0.0, |n| procs::cpu_secs(n.pid)),
            _ => procs::cpu_secs(self.node.pid),
        }
    }

    fn target(&self, system: System) -> std::net::SocketAddr {
        match system {
            System::Postfix => self.postfix.as_ref().expect("postfix").smtpd,
            System::MagicmxB => self.node_b.as_ref().expect("build B").smtp,
            _ => self.node.smtp,
        }
    }
}

pub fn throughput_node_toml(
    sink_port: u16,
    dns: std::net::SocketAddr,
    max_connections: usize,
) -> String {
    let per_block = max_connections.div_ceil(500).max(20);
    format!(
        r#"
[node]
name = "bench1"
hostname = "mx1.magic.bench.test"
data_dir = "@DATA@"
magic_suffixes = [".magic.bench.test"]

[smtp]
listen = ["127.0.0.1:0"]
max_connections = {max_connections}
# Sessions from one block at once: the default, or more if E2E_CONNECTIONS
# asks for more than 20 sessions in each of the 500 blocks.
max_connections_per_block = {per_block}

[accept]
domains = ["{DOMAIN}"]

[relay]
port = {sink_port}
# The real MX is on loopback.
deny_networks = []
# concurrency and destination_concurrency: the defaults, Postfix's (100 in
# all, 20 per destination).
retry_initial = "1s"
retry_max = "5s"
tls = "none"

[dns]
nameservers = ["{dns}"]

[throttle]
enabled = true
hold = "0s"

[trust]
networks = ["127.0.0.1/32"]
"#
    )
}

async fn throughput(opts: &Opts) -> anyhow::Result<()> {
    let postfix_ok = postfix::available();
    if let Err(e) = &postfix_ok {
        println!("Postfix comparison skipped: {e}");
    }
    let sink = Sink::start().await;
    let dns = domain_dns();
    let node = MagicNode::start(
        "throughput",
        &throughput_node_toml(sink.addr.port(), dns.addr, 2000),
    )?;
    // `E2E_SIGN_B=1`: build B (the same binary unless E2E_MAGICMX_BIN_B
    // says otherwise) signs every message with DKIM (`[sign]`, Ed25519 and
    // RSA-2048; keys made at its start), to compare signing on and off.
    let sign_b = std::env::var("E2E_SIGN_B").is_ok_and(|v| v == "1");
    let toml_b = if sign_b {
        format!(
            "{}\n[sign]\ndomain = \"sign.{DOMAIN}\"\n",
            throughput_node_toml(sink.addr.port(), dns.addr, 2000)
        )
    } else {
        throughput_node_toml(sink.addr.port(), dns.addr, 2000)
    };
    let node_b = match std::env::var("E2E_MAGICMX_BIN_B") {
        Ok(b) => Some(MagicNode::start_bin(&b, "throughput-b", &toml_b)?),
        Err(_) if sign_b => Some(MagicNode::start_bin(&node::bin(), "throughput-b", &toml_b)?),
        Err(_) => None,
    };
    let postfix = match postfix_ok {
        Ok(()) => Some(Postfix::start(DOMAIN, sink.addr)?),
        Err(_) => None,
    };
    println!(
        "sink {}, DNS {}, magicmx {} (pid {}){}",
        sink.addr,
        dns.addr,
        node.smtp,
        node.pid,
        postfix
            .as_ref()
            .map(|p| format!(", Postfix {} (master pid {})", p.smtpd, p.master_pid))
            .unwrap_or_default()
    );
    let mut bed = Bed {
        sink,
        _dns: dns,
        node,
        node_b,
        postfix,
        seq: 1_000_000,
    };
    // Warm up: first connections, DNS cache, Postfix's daemons.
    let mut systems = vec![System::Magicmx];
    if bed.node_b.is_some() {
        systems.push(System::MagicmxB);
    }
    if bed.postfix.is_some() {
        systems.push(System::Postfix);
    }
    for &s in &systems {
        run_harness(
            &mut bed,
            s,
            0,
            300.min(opts.messages),
            opts,
            Vec::new(),
            None,
        )
        .await?;
    }

    let mut all: Vec<Measure> = Vec::new();
    if opts.wants("throughput") {
        let blocks = load::blocks(100, 1000);
        for round in 1..=opts.rounds {
            // Alternate which system goes first.
            let mut order = systems.clone();
            if round % 2 == 0 {
                order.reverse();
            }
            for tool in [Tool::SmtpSource, Tool::Harness, Tool::Paced] {
                for &s in &order {
                    let m = match tool {
                        Tool::SmtpSource => run_smtp_source(&mut bed, s, round, opts).await?,
                        Tool::Harness => {
                            run_harness(&mut bed, s, round, opts.messages, opts, Vec::new(), None)
                                .await?
                        }
                        Tool::Paced => {
                            run_harness(
                                &mut bed,
                                s,
                                round,
                                PACED_MESSAGES,
                                opts,
                                Vec::new(),
                                Some(PACED_RATE),
                            )
                            .await?
                        }
                    };
                    print_measure(&m);
                    all.push(m);
                }
            }
            let mut m = run_harness(
                &mut bed,
                System::MagicmxBlocks,
                round,
                opts.messages,
                opts,
                blocks.clone(),
                None,
            )
            .await?;
            m.system = System::MagicmxBlocks;
            print_measure(&m);
            all.push(m);
        }
        report_throughput(opts, &all, bed.postfix.as_ref())?;
    }
    if opts.wants("profile") {
        profile(&mut bed, opts, &all).await?;
    }
    Ok(())
}

fn print_measure(m: &Measure) {
    println!(
        "  round {} {:<32} {:<14} acked {:>6} ({:>7.0}/s)  arrived {:>6} ({:>7.0}/s)  refused {:>4}  p50 {:>6} ms  p99 {:>6} ms  cpu {:.3} ms/msg  DATA phase {} ms  load {:.1}",
        m.round,
        m.system.label(),
        m.tool.label(),
        m.acked,
        m.ack_rate(),
        m.arrived,
        m.arrive_rate(),
        m.refused,
        fmt_ms(m.lat_p50),
        fmt_ms(m.lat_p99),
        m.cpu_ms_per_msg(),
        fmt_ms(m.dot_gap),
        m.load
    );
}

/// Waits until `count()` reaches `want` or stops moving for `stall`;
/// returns when it last moved.
async fn wait_count(
    mut count: impl FnMut() -> usize,
    want: usize,
    stall: Duration,
) -> (usize, Instant) {
    let mut last = count();
    let mut moved = Instant::now();
    loop {
        if last >= want {
            return (last, moved);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        let n = count();
        if n != last {
            last = n;
            moved = Instant::now();
        } else if moved.elapsed() > stall {
            return (last, moved);
        }
    }
}

async fn run_harness(
    bed: &mut Bed,
    system: System,
    round: usize,
    messages: usize,
    opts: &Opts,
    sources: Vec<std::net::IpAddr>,
    paced: Option<f64>,
) -> anyhow::Result<Measure> {
    let first = bed.seq;
    bed.seq += messages as u64 + 1000;
    let target = bed.target(system);
    let (cpu0, mcpu0) = (bed.relay_cpu(system), procs::machine_busy_secs());
    let run = match paced {
        Some(rate) => load::open_loop(target, rate, messages, first, opts.size, RCPT).await,
        None => {
            load::closed_loop(load::Spec {
                target,
                messages,
                concurrency: opts.concurrency,
                sources,
                size: opts.size,
                first_seq: first,
                rcpt: RCPT.into(),
            })
            .await
        }
    };
    let acked = run.acks.len();
    let state = bed.sink.state.clone();
    let range = first..first + messages as u64;
    let (arrived, _) = wait_count(
        || state.count_in(range.clone()),
        acked,
        Duration::from_secs(30),
    )
    .await;
    let (cpu1, mcpu1) = (bed.relay_cpu(system), procs::machine_busy_secs());
    let arrivals = state.arrivals_in(range);
    let last_arrival = arrivals
        .iter()
        .map(|(_, t)| *t)
        .max()
        .unwrap_or(run.finished);
    let last_ack = run
        .acks
        .iter()
        .map(|(_, t)| *t)
        .max()
        .unwrap_or(run.finished);
    let latencies: Vec<f64> = run
        .acks
        .iter()
        .filter_map(|(s, t)| {
            let a = state.arrival(*s)?;
            Some(if a >= *t {
                a.duration_since(*t).as_secs_f64() * 1000.0
            } else {
                -(t.duration_since(a).as_secs_f64() * 1000.0)
            })
        })
        .collect();
    if run.failed > 0 {
        eprintln!(
            "  {} session failures to {}; first: {}",
            run.failed,
            system.label(),
            run.first_failure.as_deref().unwrap_or("")
        );
    }
    if !run.refused.is_empty() {
        eprintln!("  refusals by {}: {:?}", system.label(), run.refused);
    }
    Ok(Measure {
        system,
        tool: if paced.is_some() {
            Tool::Paced
        } else {
            Tool::Harness
        },
        round,
        sent: messages,
        acked,
        arrived,
        refused: run.refused.values().sum::<usize>() + run.failed,
        ack_secs: last_ack.duration_since(run.started).as_secs_f64(),
        arrive_secs: last_arrival.duration_since(run.started).as_secs_f64(),
        lat_p50: percentile(&latencies, 0.5),
        lat_p99: percentile(&latencies, 0.99),
        latencies,
        cpu: cpu1 - cpu0,
        machine_cpu: mcpu1 - mcpu0,
        load: procs::loadavg(),
        dot_gap: median(&state.dot_gaps_since(run.started)),
    })
}

pub fn smtp_source_args(opts: &Opts, target: std::net::SocketAddr) -> Vec<String> {
    vec![
        "-s".into(),
        opts.concurrency.to_string(),
        "-m".into(),
        opts.messages.to_string(),
        "-l".into(),
        opts.size.to_string(),
        "-M".into(),
        "client.test".into(),
        "-f".into(),
        "bench@client.test".into(),
        "-t".into(),
        RCPT.into(),
        format!("{}:{}", target.ip(), target.port()),
    ]
}

async fn run_smtp_source(
    bed: &mut Bed,
    system: System,
    round: usize,
    opts: &Opts,
) -> anyhow::Result<Measure> {
    let target = bed.target(system);
    let state = bed.sink.state.clone();
    let before = state.unlabelled.load(std::sync::atomic::Ordering::Relaxed) as usize;
    let (cpu0, mcpu0) = (bed.relay_cpu(system), procs::machine_busy_secs());
    let started = Instant::now();
    let out = tokio::process::Command::new("smtp-source")
        .args(smtp_source_args(opts, target))
        .output()
        .await?;
    let acked_at = Instant::now();
    let ok = out.status.success();
    if !ok {
        eprintln!(
            "  smtp-source to {} failed: {}{}",
            system.label(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (arrived, last) = wait_count(
        || state.unlabelled.load(std::sync::atomic::Ordering::Relaxed) as usize - before,
        opts.messages,
        Duration::from_secs(30),
    )
    .await;
    let (cpu1, mcpu1) = (bed.relay_cpu(system), procs::machine_busy_secs());
    Ok(Measure {
        system,
        tool: Tool::SmtpSource,
        round,
        sent: opts.messages,
        acked: if ok { opts.messages } else { arrived },
        arrived,
        refused: if ok { 0 } else { opts.messages - arrived },
        ack_secs: acked_at.duration_since(started).as_secs_f64(),
        arrive_secs: last.duration_since(started).as_secs_f64(),
        lat_p50: f64::NAN,
        lat_p99: f64::NAN,
        latencies: Vec::new(),
        cpu: cpu1 - cpu0,
        machine_cpu: mcpu1 - mcpu0,
        load: procs::loadavg(),
        dot_gap: median(&state.dot_gaps_since(started)),
    })
}

fn report_throughput(
    opts: &Opts,
    all: &[Measure],
    postfix: Option<&Postfix>,
) -> anyhow::Result<()> {
    // Medians per (system, tool).
    let mut groups: BTreeMap<(Tool, System), Vec<&Measure>> = BTreeMap::new();
    for m in all {
        groups.entry((m.tool, m.system)).or_default().push(m);
    }
    let med = |v: &[&Measure], f: &dyn Fn(&Measure) -> f64| {
        median(&v.iter().map(|m| f(m)).collect::<Vec<_>>())
    };
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| client | relay | msgs/s acknowledged | msgs/s arrived at the sink | 250 → sink p50 (ms) | p99 (ms) | CPU ms per message | DATA phase at the sink, 354 → final `.` (ms, median) | refused or failed |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|---|---|");
    for ((tool, system), v) in &groups {
        let _ = writeln!(
            table,
            "| {} | {} | {:.0} | {:.0} | {} | {} | {:.3} | {} | {} |",
            tool.label(),
            system.label(),
            med(v, &|m| m.ack_rate()),
            med(v, &|m| m.arrive_rate()),
            fmt_ms(med(v, &|m| m.lat_p50)),
            fmt_ms(med(v, &|m| m.lat_p99)),
            med(v, &|m| m.cpu_ms_per_msg()),
            fmt_ms(med(v, &|m| m.dot_gap)),
            v.iter().map(|m| m.refused).sum::<usize>(),
        );
    }
    // Ratios magicmx / Postfix, per tool, from the medians.
    let mut ratios = String::new();
    for (sys, tool) in [System::Magicmx, System::MagicmxB]
        .into_iter()
        .flat_map(|s| [(s, Tool::SmtpSource), (s, Tool::Harness), (s, Tool::Paced)])
    {
        let (Some(m), Some(p)) = (
            groups.get(&(tool, sys)),
            groups.get(&(tool, System::Postfix)),
        ) else {
            continue;
        };
        let r = |f: &dyn Fn(&Measure) -> f64| med(m, f) / med(p, f);
        let _ = writeln!(
            ratios,
            "| {} | {} | {:.2} | {:.2} | {} | {} | {:.2} |",
            sys.label(),
            tool.label(),
            r(&|m| m.ack_rate()),
            r(&|m| m.arrive_rate()),
            if tool != Tool::SmtpSource {
                format!("{:.2}", r(&|m| m.lat_p50))
            } else {
                "—".into()
            },
            if tool != Tool::SmtpSource {
                format!("{:.2}", r(&|m| m.lat_p99))
            } else {
                "—".into()
            },
            r(&|m| m.cpu_ms_per_msg()),
        );
    }
    // Per-run table.
    let mut runs = String::new();
    let _ = writeln!(runs, "| round | client | relay | acked | msgs/s acked | msgs/s arrived | p50 ms | p99 ms | relay CPU s | machine CPU s | load |");
    let _ = writeln!(runs, "|---|---|---|---|---|---|---|---|---|---|---|");
    for m in all {
        let _ = writeln!(
            runs,
            "| {} | {} | {} | {}/{} | {:.0} | {:.0} | {} | {} | {:.2} | {:.2} | {:.1} |",
            m.round,
            m.tool.label(),
            m.system.label(),
            m.acked,
            m.sent,
            m.ack_rate(),
            m.arrive_rate(),
            fmt_ms(m.lat_p50),
            fmt_ms(m.lat_p99),
            m.cpu,
            m.machine_cpu,
            m.load
        );
    }
    println!("\n{table}");
    if !ratios.is_empty() {
        println!("magicmx / Postfix (medians):\n| relay | client | msgs/s acked | msgs/s arrived | p50 | p99 | CPU per msg |\n{ratios}");
    }

    // Plots: median rates, latency distribution of the median round.
    let png_rates = opts.bench_dir.join("throughput.png");
    let present: Vec<System> = System::ALL
        .into_iter()
        .filter(|s| groups.keys().any(|k| k.1 == *s))
        .collect();
    let series_names: Vec<&str> = present.iter().map(|s| s.label()).collect();
    let mut bar_groups: Vec<(String, Vec<f64>)> = Vec::new();
    for tool in [Tool::SmtpSource, Tool::Harness] {
        for (what, f) in [
            ("acked", Measure::ack_rate as fn(&Measure) -> f64),
            ("arrived", Measure::arrive_rate),
        ] {
            let vals: Vec<f64> = present
                .iter()
                .map(|s| groups.get(&(tool, *s)).map_or(0.0, |v| med(v, &|m| f(m))))
                .collect();
            if vals.iter().any(|v| *v > 0.0) {
                bar_groups.push((format!("{} {what}", tool.label()), vals));
            }
        }
    }
    plot::bars(
        &png_rates,
        &format!(
            "Relay throughput, {} x 1 KB, {} sessions (median of {} rounds)",
            opts.messages, opts.concurrency, opts.rounds
        ),
        "messages per second",
        &series_names,
        &bar_groups,
    )?;
    let png_lat = opts.bench_dir.join("latency.png");
    let png_lat_sat = opts.bench_dir.join("latency-saturated.png");
    for (tool, png, title) in [
        (
            Tool::Paced,
            &png_lat,
            format!(
                "From the relay's 250 to arrival at the real MX, {PACED_RATE:.0} msgs/s offered"
            ),
        ),
        (
            Tool::Harness,
            &png_lat_sat,
            format!(
                "From the relay's 250 to arrival at the real MX, {} sessions flat out",
                opts.concurrency
            ),
        ),
    ] {
        let mut lat_series = Vec::new();
        for s in present.iter().copied() {
            let Some(v) = groups.get(&(tool, s)) else {
                continue;
            };
            // The round with the median p50.
            let mut v: Vec<&&Measure> = v.iter().collect();
            v.sort_by(|a, b| a.lat_p50.total_cmp(&b.lat_p50));
            let m = v[v.len() / 2];
            let mut l = m.latencies.clone();
            l.sort_by(|a, b| a.total_cmp(b));
            let n = l.len().max(1) as f64;
            let step = (l.len() / 400).max(1);
            let points: Vec<(f64, f64)> = l
                .iter()
                .enumerate()
                .filter(|(i, _)| i % step == 0 || *i == l.len() - 1)
                .map(|(i, x)| (x.max(0.0), 100.0 * (i + 1) as f64 / n))
                .collect();
            lat_series.push(plot::Series {
                name: format!("{} (round {})", s.label(), m.round),
                points,
                thin: false,
            });
        }
        if !lat_series.is_empty() {
            plot::lines(
                png,
                &title,
                "milliseconds",
                "% of messages (cumulative)",
                &lat_series,
            )?;
        }
    }

    let mut md = String::new();
    let _ = writeln!(md, "## End-to-end throughput: magicmx vs Postfix\n");
    let _ = writeln!(
        md,
        "Command: `bench/run.sh` (= `cargo bench --bench e2e`, section `throughput`), {} rounds, alternating which relay goes first. Each run: {} messages of {} bytes, {} concurrent sessions, one message per session, from 127.0.0.1 (trusted by magicmx; in Postfix's `mynetworks`), one recipient `{RCPT}`. Both relays deliver to the same in-harness SMTP sink (the \"real MX\", which timestamps each message on arrival). magicmx: `hold = \"0s\"`, throttle on (trusted source), `[relay]` concurrency at its defaults (100 in all, 20 per destination, as Postfix), MX found through an in-harness DNS server; its spool fsyncs before `250` (redb, group commit). Postfix: private instance, default durability (cleanup fsyncs each queue file before `250`), `relayhost = [127.0.0.1]:SINK` (no DNS), default concurrency (20 per destination).\n",
        opts.rounds, opts.messages, opts.size, opts.concurrency
    );
    let _ = writeln!(
        md,
        "Clients: `smtp-source {}` (Postfix's load generator, which cannot tell when each message was acknowledged) and the harness's own client (same pattern, a sequence number in each message, so that the time from the relay's `250` to arrival at the sink is known per message). \"magicmx, throttle, 1,000 blocks\": the harness client binding 127.B.C.1 in 1,000 different /24 blocks, untrusted, default limits (never reached: 5 messages per block). \"harness client, {PACED_RATE:.0} msgs/s\": the same client starting {PACED_MESSAGES} sessions at a fixed {PACED_RATE:.0} per second, below every relay's capacity, so that the latency is the relay's own; flat out, a message also waits behind the backlog of those acknowledged before it.\n",
        smtp_source_args(opts, "127.0.0.1:25".parse().unwrap()).join(" ").replace("127.0.0.1:25", "127.0.0.1:PORT")
    );
    let _ = writeln!(md, "Medians over the rounds:\n\n{table}");
    if !ratios.is_empty() {
        let _ = writeln!(
            md,
            "**Ratio magicmx / Postfix** (medians, same run; > 1 means magicmx is higher — for latency and CPU lower is better):\n\n| relay | client | msgs/s acked | msgs/s arrived | 250 → sink p50 | p99 | CPU per message |\n|---|---|---|---|---|---|---|\n{ratios}"
        );
    }
    // The paced runs: what the latency is made of.
    let paced = |sys: System, f: fn(&Measure) -> f64| {
        groups.get(&(Tool::Paced, sys)).map(|v| med(v, &|m| f(m)))
    };
    if let (Some(pf), Some(mm)) = (
        paced(System::Postfix, |m| m.lat_p50),
        paced(System::Magicmx, |m| m.lat_p50),
    ) {
        let gap = paced(System::Magicmx, |m| m.dot_gap).unwrap_or(f64::NAN);
        let best = paced(System::MagicmxB, |m| m.lat_p50)
            .filter(|_| paced(System::MagicmxB, |m| m.dot_gap).unwrap_or(99.0) < 5.0)
            .map(|b| {
                (
                    b,
                    paced(System::MagicmxB, |m| m.lat_p99).unwrap_or(f64::NAN),
                )
            });
        let _ = write!(
            md,
            "At {PACED_RATE:.0} msgs/s (no backlog), Postfix relays a message {} ms after its `250` (median); magicmx takes {} ms",
            fmt_ms(pf),
            fmt_ms(mm)
        );
        if gap > 20.0 {
            let _ = write!(
                md,
                ", {} ms of which are the Nagle stall of the DATA phase (see the profile section)",
                fmt_ms(gap)
            );
        }
        if let Some((b, b99)) = best {
            let _ = write!(
                md,
                "; {} takes {} ms (p99 {} ms)",
                System::MagicmxB.label(),
                fmt_ms(b),
                fmt_ms(b99)
            );
        }
        let _ = writeln!(md, ".\n");
    }
    let _ = writeln!(
        md,
        "CPU is utime + stime from /proc of the relay's processes (magicmx: its one process; Postfix: master, its live daemons and its reaped ones), divided by the messages that arrived; it leaves out the kernel's journal thread (fsync) and the clients and sink, which share the 2 cores (the machine CPU column in the per-run table shows all of it).\n"
    );
    let _ = writeln!(
        md,
        "![throughput](throughput.png)\n\n![latency at {PACED_RATE:.0} msgs/s](latency.png)\n\n![latency flat out](latency-saturated.png)\n\n<details><summary>Every run</summary>\n\n{runs}\n</details>\n"
    );
    let _ = writeln!(
        md,
        "Machine: {}. Other engineers were building and testing on the same 2 cores during the run (the load column is the 1-minute load average at the end of each run), so single runs are noisy: compare medians, and the ratios, which come from alternating runs.{}\n",
        machine(),
        postfix.map(|_| "").unwrap_or(" Postfix was not available: no comparison.")
    );
    if let Some(pf) = postfix {
        let _ = writeln!(
            md,
            "<details><summary>Postfix's main.cf (master.cf: Debian's services, chroot off, smtpd on 127.0.0.1:PORT)</summary>\n\n```\n{}\n```\n</details>\n",
            pf.main_cf.join("\n")
        );
    }
    replace_section(
        &opts.results(),
        "## End-to-end throughput: magicmx vs Postfix",
        &md,
    );
    println!(
        "wrote {}, {}, {}, {}",
        opts.results().display(),
        png_rates.display(),
        png_lat.display(),
        png_lat_sat.display()
    );
    Ok(())
}

// ------------------------------------------------------------ profile

/// One closed-loop run of `system` under `perf trace -s` (fsync-family
/// calls only, cheap): per thread, calls and milliseconds inside them; and
/// the spool writer's CPU.
struct Traced {
    m: Measure,
    /// (thread, syscall) → (calls, total ms).
    calls: BTreeMap<(String, String), (f64, f64)>,
    writer_cpu: f64,
}

impl Traced {
    fn sum(&self, thread: &str, calls: &[&str]) -> (f64, f64) {
        self.calls
            .iter()
            .filter(|((t, c), _)| t.starts_with(thread) && calls.contains(&c.as_str()))
            .fold((0.0, 0.0), |a, (_, v)| (a.0 + v.0, a.1 + v.1))
    }

    /// Share of the run's wall time the spool writer was busy: in
    /// fdatasync/fsync/pwrite or on the CPU.
    fn writer_busy(&self) -> f64 {
        let (_, ms) = self.sum("spool-writer", &["fdatasync", "fsync", "pwrite64"]);
        (ms / 1000.0 + self.writer_cpu) / self.m.arrive_secs
    }

    fn paragraph(&self, who: &str) -> String {
        let m = &self.m;
        let n = m.arrived.max(1) as f64;
        let (fs, fs_ms) = self.sum("spool-writer", &["fdatasync", "fsync"]);
        format!(
            "{who}: {:.0} acked / {:.0} relayed msgs/s; {:.2} fsync calls per message ({:.1} messages per fsync, {:.0}/s, {:.2} ms each on average); the spool writer was busy {:.0} % of the time ({:.0} % in fdatasync, {:.0} % on the CPU); the process used {:.2} ms of CPU per message; the DATA phase at the sink took {:.1} ms (median).",
            m.ack_rate(),
            m.arrive_rate(),
            fs / n,
            n / fs.max(1.0),
            fs / m.arrive_secs,
            fs_ms / fs.max(1.0),
            100.0 * self.writer_busy(),
            100.0 * fs_ms / 1000.0 / m.arrive_secs,
            100.0 * self.writer_cpu / m.arrive_secs,
            m.cpu_ms_per_msg(),
            m.dot_gap,
        )
    }
}

async fn traced_run(bed: &mut Bed, system: System, opts: &Opts) -> anyhow::Result<Traced> {
    let pid = match system {
        System::MagicmxB => bed.node_b.as_ref().map(|n| n.pid).unwrap_or(0),
        _ => bed.node.pid,
    };
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("trace.txt");
    let mut trace = tokio::process::Command::new("perf")
        .args([
            "trace",
            "-s",
            "-e",
            "fdatasync,fsync,pwrite64",
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let w0 = procs::thread_cpu_secs(pid, "spool-writer");
    let m = run_harness(bed, system, 0, opts.messages, opts, Vec::new(), None).await?;
    let writer_cpu = procs::thread_cpu_secs(pid, "spool-writer") - w0;
    let _ = std::process::Command::new("kill")
        .args(["-INT", &trace.id().unwrap_or(0).to_string()])
        .status();
    let _ = trace.wait().await;
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let mut calls = BTreeMap::new();
    let mut thread = String::new();
    for l in text.lines() {
        let t = l.trim();
        if t.contains(" events,") {
            thread = t.split(" (").next().unwrap_or("").to_string();
            continue;
        }
        let f: Vec<&str> = t.split_whitespace().collect();
        if f.len() >= 4 && matches!(f[0], "fdatasync" | "fsync" | "pwrite64") {
            if let (Ok(c), Ok(ms)) = (f[1].parse::<f64>(), f[3].parse::<f64>()) {
                let e = calls
                    .entry((thread.clone(), f[0].to_string()))
                    .or_insert((0.0, 0.0));
                e.0 += c;
                e.1 += ms;
            }
        }
    }
    Ok(Traced {
        m,
        calls,
        writer_cpu,
    })
}

/// perf on magicmx while the harness client loads it; fsyncs and other
/// system calls counted with tracepoints; and what the numbers say.
async fn profile(bed: &mut Bed, opts: &Opts, all: &[Measure]) -> anyhow::Result<()> {
    let have_perf = std::process::Command::new("perf")
        .args(["stat", "-e", "task-clock", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_perf {
        println!("profile skipped: perf is not available");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("perf.data");
    let messages = opts.messages;
    let pid = bed.node.pid.to_string();
    // 1. System calls and fsyncs, without sampling.
    let stat_out = dir.path().join("stat.txt");
    let mut stat = tokio::process::Command::new("perf")
        .args([
            "stat",
            "-e",
            "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync,syscalls:sys_enter_pwrite64,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,context-switches,task-clock",
            "-p",
            &pid,
            "-o",
        ])
        .arg(&stat_out)
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = run_harness(bed, System::Magicmx, 0, messages, opts, Vec::new(), None).await?;
    let _ = std::process::Command::new("kill")
        .args(["-INT", &stat.id().unwrap_or(0).to_string()])
        .status();
    let _ = stat.wait().await;
    let stat_text = std::fs::read_to_string(&stat_out).unwrap_or_default();
    let count = |ev: &str| -> f64 {
        stat_text
            .lines()
            .find(|l| l.contains(ev))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.replace(',', "").parse().ok())
            .unwrap_or(0.0)
    };
    let n = m.arrived.max(1) as f64;
    let fsyncs = count("sys_enter_fsync") + count("sys_enter_fdatasync");
    let per_msg = |ev: &str| count(ev) / n;

    // 2. Sampled profile (flat: the release build has no frame pointers).
    let mut rec = tokio::process::Command::new("perf")
        .args(["record", "-F", "999", "-p", &pid, "-o"])
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m2 = run_harness(bed, System::Magicmx, 0, messages, opts, Vec::new(), None).await?;
    let _ = std::process::Command::new("kill")
        .args(["-INT", &rec.id().unwrap_or(0).to_string()])
        .status();
    let _ = rec.wait().await;
    let report = |sort: &str, limit: &str| -> String {
        let out = std::process::Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                sort,
                "--percent-limit",
                limit,
                "-i",
            ])
            .arg(&data)
            .output();
        out.map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .map(|l| l.trim_end().trim_end_matches(['-', ' ']).to_string())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
    };
    let by_thread = report("comm,dso", "1");
    let by_symbol = report("comm,dso,symbol", "0.7");

    // 3. Time inside fsync, per thread; the same for build B if any.
    let traced = traced_run(bed, System::Magicmx, opts).await?;
    let traced_b = match bed.node_b.is_some() {
        true => Some(traced_run(bed, System::MagicmxB, opts).await?),
        false => None,
    };

    // 4. What limits it.
    let med_of = |sys: System, f: fn(&Measure) -> f64| -> Option<f64> {
        let v: Vec<f64> = all
            .iter()
            .filter(|x| x.system == sys && x.tool == Tool::Harness)
            .map(f)
            .collect();
        (!v.is_empty()).then(|| median(&v))
    };
    let pf_gap = med_of(System::Postfix, |x| x.dot_gap);
    let pf_rate = med_of(System::Postfix, |x| x.arrive_rate());
    let mut why = String::new();
    let slots = 20.0;
    if m.dot_gap > 20.0 {
        let _ = writeln!(
            why,
            "**What limits magicmx: the outbound SMTP session, not the spool or the CPU.** magicmx acknowledges {:.0} msgs/s but relays {:.0} msgs/s. At the real MX, the DATA phase of each message relayed by magicmx (from the `354` reply to the final `.`, 1 KB on loopback) takes **{:.0} ms** (median){}. That is Nagle's algorithm meeting delayed ACKs: lettre's `message()` writes the body and then `\\r\\n.\\r\\n` in a second `write()`; the relay's socket does not set `TCP_NODELAY`, so the kernel holds those 5 bytes until the real MX acknowledges the body, and the real MX delays that ACK (about 40 ms on Linux) because it has nothing to send yet. With `[relay] concurrency = {slots}` delivery slots, {slots} / ({:.0} ms + the rest of the session) ≈ {:.0} msgs/s, whatever the CPU or the disk. The spool is not what holds it back: with the fix, the same spool takes several times more (below); its writer thread (one redb transaction per batch, two `fdatasync` per commit) is busy {:.0} % of the time here only because, with deliveries trickling in, each commit carries just a few operations. The process used {:.2} CPU cores ({:.2} ms per message).\n",
            m.ack_rate(),
            m.arrive_rate(),
            m.dot_gap,
            pf_gap.map(|g| format!(" (Postfix: {g:.1} ms — it sends the end of data in the same write)")).unwrap_or_default(),
            m.dot_gap,
            slots * 1000.0 / (m.dot_gap + 10.0),
            100.0 * traced.writer_busy(),
            count("task-clock") / 1000.0 / m.arrive_secs.max(1e-9),
            count("task-clock") / n,
        );
        let _ = writeln!(
            why,
            "**Proposed fix** (src/relay/deliver.rs, `connect`): open the socket with `tokio::net::TcpStream::connect` (inside the connect timeout), call `set_nodelay(true)`, and hand it to `AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &hello)` instead of `connect_tokio1` (STARTTLS still works: lettre wraps it as the same `Tokio1Tcp` stream). Run the harness with `E2E_MAGICMX_BIN_B=path/to/patched/magicmx` to compare both builds in the same run.\n"
        );
    } else {
        let cores = count("task-clock") / 1000.0 / m.arrive_secs.max(1e-9);
        let _ = writeln!(
            why,
            "magicmx acknowledged {:.0} msgs/s and relayed {:.0} msgs/s{} under perf stat; the DATA phase at the sink took {:.1} ms (median; no Nagle stall). It used {:.2} CPU cores on average ({:.2} ms per message), {:.1} fsync calls per message ({:.0}/s, {:.1} messages per fsync). On this 2-core machine shared with the load generator, the sink and other engineers' builds, {}.\n",
            m.ack_rate(),
            m.arrive_rate(),
            pf_rate.map(|r| format!(" (Postfix, median: {r:.0} relayed/s)")).unwrap_or_default(),
            m.dot_gap,
            cores,
            count("task-clock") / n,
            fsyncs / n,
            fsyncs / m.arrive_secs,
            n / fsyncs.max(1.0),
            if cores > 0.8 { "CPU is the next limit: see the hottest symbols below" } else { "neither CPU nor fsync is saturated: the limit is latency (round trips per delivery × delivery slots)" }
        );
    }

    let _ = writeln!(
        why,
        "Measured with `perf trace -s` (fsync-family calls) and /proc:\n\n- {}",
        traced.paragraph("magicmx")
    );
    if let Some(tb) = &traced_b {
        let _ = writeln!(why, "- {}", tb.paragraph(System::MagicmxB.label()));
        let busy = tb.writer_busy();
        let cores = tb.m.cpu / tb.m.arrive_secs.max(1e-9);
        let next = if busy > 0.8 {
            {
                let (fs, fs_ms) = tb.sum("spool-writer", &["fdatasync", "fsync"]);
                let secs = tb.m.arrive_secs.max(1e-9);
                format!(
                    "the spool writer, busy {:.0} % of the time: one redb write transaction at a time, {:.0} % of the time in `fdatasync` (two per commit: redb's SingleWriter mode always commits in two phases) and {:.0} % in redb's own CPU work per commit; {:.1} messages per fsync. Next gains: fewer write transactions per message (each message costs three — store, update after delivery, remove; the relay's update and remove could be one, or be batched across deliveries) and cheaper commits",
                    100.0 * busy,
                    100.0 * fs_ms / 1000.0 / secs,
                    100.0 * tb.writer_cpu / secs,
                    tb.m.arrived as f64 / fs.max(1.0)
                )
            }
        } else if cores > 0.8 {
            format!("CPU: the node used {cores:.2} cores of the 2 it shares with the load generator and the sink")
        } else {
            format!("neither the spool writer (busy {:.0} %) nor the CPU ({cores:.2} cores): the per-delivery round trips (a new connection, EHLO, MAIL, RCPT, DATA, QUIT per message) times the 20 delivery slots, and the machine's load", 100.0 * busy)
        };
        let _ = writeln!(why, "\nWith the fix, what limits magicmx next is {next}.");
    }

    let mut md = String::new();
    let _ = writeln!(md, "## Where magicmx's time goes (profile)\n");
    let _ = writeln!(
        md,
        "Command: `bench/run.sh` (section `profile`, after the throughput rounds, same node): the harness client sends {messages} messages to magicmx as in the throughput section, once under `perf stat` (syscall tracepoints), once under `perf record -F 999` (cpu-clock sampling: this VM has no hardware counters; flat profile: the release build has no frame pointers), once under `perf trace -s` (time inside fdatasync, per thread){}. Rates: {:.0} acked / {:.0} relayed msgs/s under perf stat, {:.0} / {:.0} under perf record.\n",
        if bed.node_b.is_some() { format!(", and the last once more on {}", System::MagicmxB.label()) } else { String::new() },
        m.ack_rate(),
        m.arrive_rate(),
        m2.ack_rate(),
        m2.arrive_rate()
    );
    let _ = writeln!(md, "{why}");
    let _ = writeln!(
        md,
        "Per message (accepted and relayed): {:.2} fsync/fdatasync ({:.1} messages per fsync), {:.1} pwrite64, {:.1} write/writev/sendto, {:.1} read/recvfrom, {:.1} epoll_wait, {:.1} futex, {:.1} context switches, {:.2} ms of CPU.\n",
        fsyncs / n,
        n / fsyncs.max(1.0),
        per_msg("sys_enter_pwrite64"),
        per_msg("sys_enter_write") + per_msg("sys_enter_writev") + per_msg("sys_enter_sendto"),
        per_msg("sys_enter_read") + per_msg("sys_enter_recvfrom"),
        per_msg("sys_enter_epoll_wait"),
        per_msg("sys_enter_futex"),
        per_msg("context-switches"),
        count("task-clock") / n,
    );
    let _ = writeln!(
        md,
        "CPU samples by thread and library (kernel = system calls, TCP, fsync):\n\n```\n{by_thread}\n```\n\n<details><summary>Hottest symbols (≥ 0.7 % of samples)</summary>\n\n```\n{by_symbol}\n```\n</details>\n"
    );
    println!("{md}");
    replace_section(
        &opts.results(),
        "## Where magicmx's time goes (profile)",
        &md,
    );
    Ok(())
}

// ------------------------------------------------------------ connections

async fn connections(opts: &Opts) -> anyhow::Result<()> {
    let n = opts.connections;
    let limit = open_files_limit();
    let n = if limit > 0 && n + 500 > limit as usize {
        println!(
            "open-file limit {limit}: holding {} connections instead of {n} (raise `ulimit -n`)",
            limit as usize - 500
        );
        limit as usize - 500
    } else {
        n
    };
    let sink = Sink::start().await;
    let dns = domain_dns();
    let node = MagicNode::start(
        "connections",
        &throughput_node_toml(sink.addr.port(), dns.addr, n + 1000),
    )?;
    let pid = node.pid;
    let mut seq = 5_000_000u64;
    // Warm up, then baseline.
    let _ = load::closed_loop(load::Spec {
        target: node.smtp,
        messages: 200,
        concurrency: 10,
        sources: Vec::new(),
        size: 1024,
        first_seq: seq,
        rcpt: RCPT.into(),
    })
    .await;
    seq += 1000;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = procs::rss_kb(pid);
    let threads0 = procs::threads(pid);
    let normal0 = normal_sessions(node.smtp, 30, &mut seq).await;

    // Open n idle sessions from 500 untrusted blocks (20 each: the default
    // smtp.max_connections_per_block, and under the throttle's 120
    // connections per block and window).
    let sources = load::blocks(60, 500);
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(200));
    let mut samples = vec![(0.0, rss0 as f64 / 1024.0)];
    let mut held: Vec<tokio::net::TcpStream> = Vec::with_capacity(n);
    let open_start = Instant::now();
    let mut refused = 0usize;
    let step = (n / 10).max(1);
    let mut opened_tasks = Vec::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let target = node.smtp;
        let src = sources[i % sources.len()];
        opened_tasks.push(tokio::spawn(async move {
            let _p = permit;
            idle_session(target, src).await
        }));
        if (i + 1) % step == 0 {
            // Collect what is open so far, then sample memory.
            for t in opened_tasks.drain(..) {
                match t.await {
                    Ok(Ok(s)) => held.push(s),
                    _ => refused += 1,
                }
            }
            samples.push((held.len() as f64, procs::rss_kb(pid) as f64 / 1024.0));
        }
    }
    for t in opened_tasks.drain(..) {
        match t.await {
            Ok(Ok(s)) => held.push(s),
            _ => refused += 1,
        }
    }
    let open_secs = open_start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = procs::rss_kb(pid);
    samples.push((held.len() as f64, rss1 as f64 / 1024.0));
    let threads1 = procs::threads(pid);

    // Idle: 10 s of holding.
    let hold = Duration::from_secs(10);
    let c0 = procs::cpu_secs(pid);
    tokio::time::sleep(hold).await;
    let idle_cpu = procs::cpu_secs(pid) - c0;
    // A normal session meanwhile.
    let normal1 = normal_sessions(node.smtp, 30, &mut seq).await;

    // Slow (tarpit-style) clients: every held session sends a NOOP at a
    // random moment of each 10 s, one byte at a time 50 ms apart, and reads
    // the reply.
    let slow_secs = 10.0;
    let c1 = procs::cpu_secs(pid);
    let slow_start = Instant::now();
    let mut tasks = Vec::with_capacity(held.len());
    for (i, mut s) in held.drain(..).enumerate() {
        let offset = Duration::from_millis((i as u64 * 7919) % 9_000);
        tasks.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            tokio::time::sleep(offset).await;
            for b in b"NOOP\r\n" {
                if s.write_all(&[*b]).await.is_err() {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                Ok(Ok(k)) if k > 0 && buf.starts_with(b"250") => Some(s),
                _ => None,
            }
        }));
    }
    // Normal sessions while the slow ones drip.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let normal2 = normal_sessions(node.smtp, 30, &mut seq).await;
    let mut alive = 0usize;
    let mut still: Vec<tokio::net::TcpStream> = Vec::new();
    for t in tasks {
        if let Ok(Some(s)) = t.await {
            alive += 1;
            still.push(s);
        }
    }
    let slow_elapsed = slow_start.elapsed().as_secs_f64().max(slow_secs);
    let slow_cpu = procs::cpu_secs(pid) - c1;
    let rss2 = procs::rss_kb(pid);
    drop(still);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss3 = procs::rss_kb(pid);

    // Postfix for scale: one smtpd process per session, at most
    // default_process_limit (100) of them.
    let pf_line = match postfix::available() {
        Ok(()) => match postfix_sessions(sink.addr).await {
            Ok(s) => s,
            Err(e) => format!("Postfix measurement failed: {e}"),
        },
        Err(e) => format!("Postfix not measured: {e}"),
    };

    let held_n = samples.last().map(|s| s.0 as usize).unwrap_or(0);
    let per_conn = (rss1 as f64 - rss0 as f64) * 1024.0 / held_n.max(1) as f64;
    let q = |v: &[f64]| (median(v), percentile(v, 0.99));
    let (n0, n0p) = q(&normal0);
    let (n1, n1p) = q(&normal1);
    let (n2, n2p) = q(&normal2);
    let mut md = String::new();
    let _ = writeln!(md, "## Holding 10,000 sessions\n");
    let _ = writeln!(
        md,
        "Command: `bench/run.sh` (section `connections`). One magicmx node (`[smtp] max_connections = {}`); the harness opens {n} sessions from 500 untrusted /24 blocks (127.60–61.x.1, 20 per block: the default `max_connections_per_block`, and under the throttle's 120 connections per block and window), each reads the banner, says EHLO and then stays idle. A \"normal session\" is one full message from 127.0.0.1 (connect, EHLO, MAIL, RCPT, DATA, 250, QUIT), 30 in a row.\n",
        n + 1000
    );
    let _ = writeln!(md, "| measure | value |\n|---|---|");
    let _ = writeln!(md, "| sessions held | {held_n} of {n} ({refused} failed to open; {:.1} s to open them all, 200 at a time) |", open_secs);
    let _ = writeln!(
        md,
        "| RSS before / holding / after closing | {:.1} MiB / **{:.1} MiB** / {:.1} MiB |",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        rss3 as f64 / 1024.0
    );
    let _ = writeln!(
        md,
        "| memory per idle session | **{:.1} KiB** (RSS growth / sessions) |",
        per_conn / 1024.0
    );
    let _ = writeln!(md, "| threads before / holding | {threads0} / {threads1} |");
    let _ = writeln!(
        md,
        "| CPU while {held_n} sessions idle | {:.3} s per 10 s ({:.2} % of one core) |",
        idle_cpu,
        idle_cpu * 10.0
    );
    let _ = writeln!(
        md,
        "| CPU while each session drips a NOOP every 10 s, one byte per 50 ms ({:.0} commands/s) | {:.2} s in {:.1} s ({:.1} % of one core); RSS {:.1} MiB; {alive} sessions still answered |",
        held_n as f64 / 10.0,
        slow_cpu,
        slow_elapsed,
        100.0 * slow_cpu / slow_elapsed,
        rss2 as f64 / 1024.0
    );
    let _ = writeln!(
        md,
        "| normal session, node otherwise idle | p50 {} ms, p99 {} ms |",
        fmt_ms(n0),
        fmt_ms(n0p)
    );
    let _ = writeln!(
        md,
        "| normal session while {held_n} sessions idle | p50 {} ms, p99 {} ms |",
        fmt_ms(n1),
        fmt_ms(n1p)
    );
    let _ = writeln!(
        md,
        "| normal session while {held_n} sessions drip | p50 {} ms, p99 {} ms |",
        fmt_ms(n2),
        fmt_ms(n2p)
    );
    let _ = writeln!(md, "\n{pf_line}\n");
    let _ = writeln!(md, "![memory](connections.png)\n");
    let _ = writeln!(
        md,
        "Machine: {}; load average {:.1} at the end (other engineers' builds share the cores).\n",
        machine(),
        procs::loadavg()
    );
    let png = opts.bench_dir.join("connections.png");
    plot::lines(
        &png,
        &format!("magicmx resident memory while opening {n} idle sessions"),
        "sessions open",
        "RSS (MiB)",
        &[plot::Series {
            name: "magicmx RSS".into(),
            points: samples.clone(),
            thin: false,
        }],
    )?;
    println!("{md}");
    replace_section(&opts.results(), "## Holding 10,000 sessions", &md);
    drop(node);
    drop(dns);
    Ok(())
}

fn open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))?
                .split_whitespace()
                .nth(3)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Reads one (possibly multi-line) reply; returns its code.
async fn read_reply(s: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    loop {
        let k = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timeout"))??;
        if k == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed",
            ));
        }
        got.extend_from_slice(&buf[..k]);
        // Complete when the last line has a space after the code.
        if got.ends_with(b"\r\n") {
            let text = String::from_utf8_lossy(&got);
            let last = text.trim_end().lines().last().unwrap_or("").to_string();
            if last.len() >= 4 && last.as_bytes()[3] == b' ' {
                return Ok(last[..3].to_string());
            }
        }
    }
}

/// Connect, banner, EHLO; the stream stays open.
async fn idle_session(
    target: std::net::SocketAddr,
    src: std::net::IpAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut s = load::connect(target, Some(src)).await?;
    let code = read_reply(&mut s).await?;
    if code != "220" {
        return Err(std::io::Error::other(format!("banner {code}")));
    }
    s.write_all(b"EHLO idle.client.test\r\n").await?;
    let code = read_reply(&mut s).await?;
    if code != "250" {
        return Err(std::io::Error::other(format!("EHLO {code}")));
    }
    Ok(s)
}

/// Milliseconds of `count` full sessions, one after the other.
async fn normal_sessions(target: std::net::SocketAddr, count: usize, seq: &mut u64) -> Vec<f64> {
    let mut v = Vec::new();
    for _ in 0..count {
        *seq += 1;
        let body = load::message(*seq, RCPT, 1024);
        let t = Instant::now();
        if let load::Outcome::Acked(_) = load::send_one(target, None, RCPT, &body).await {
            v.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    v
}

/// Memory of Postfix holding idle sessions: one smtpd each.
async fn postfix_sessions(sink: std::net::SocketAddr) -> anyhow::Result<String> {
    let pf = Postfix::start(DOMAIN, sink)?;
    let smtpd_pids = || -> Vec<u32> {
        procs::children(pf.master_pid)
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "smtpd")
            })
            .collect()
    };
    let sum = |pids: &[u32], f: fn(u32) -> u64| pids.iter().map(|p| f(*p)).sum::<u64>();
    let k = 90;
    let mut held = Vec::new();
    for _ in 0..k {
        if let Ok(s) = idle_session(pf.smtpd, "127.0.0.1".parse().unwrap()).await {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pids = smtpd_pids();
    let pss = sum(&pids, procs::pss_kb) as f64 / pids.len().max(1) as f64;
    let rss = sum(&pids, procs::rss_kb) as f64 / pids.len().max(1) as f64;
    drop(held);
    Ok(format!(
        "For scale, Postfix: {} idle sessions held by {} smtpd processes (one per session; `default_process_limit` is 100, so 10,000 sessions would need 10,000 processes): **{:.0} KiB PSS** ({:.0} KiB RSS) per session.",
        k,
        pids.len(),
        pss,
        rss
    ))
}
