//! The benchmarks of issue 11 (the suspect pipeline), on the network of
//! `magicmx demo` (`magicmx::demo::start_nodes`: real nodes with gossip
//! over QUIC, the in-process DNS and the in-process real MX):
//!
//! - `tarpit`: one node holds `SESSIONS` (default 5,000) tarpitted sessions
//!   from as many listed 127.x blocks (or from `BLOCKS` blocks, several
//!   sessions in each, to leave per-block state out of the per-session
//!   figure); the node's RSS per session and CPU
//!   are measured, and how fast a clean block still gets its banner. The
//!   clients live in a child process (this bench run again), so the RSS
//!   measured is the node's (plus the in-process DNS and MX, measured
//!   before the sessions open).
//! - `botnet`: `BOTS` (default 2,000) bot blocks, each sending `BOT_MSGS`
//!   (3) messages without retrying, 60 % listed in the DNSBL, 30 %
//!   pregreeting, 30 % pipelining without being offered it; `HAM` (50)
//!   person-to-person senders behaving like Postfix (EHLO, one message,
//!   QUIT, a temporary failure retried later). Three nodes. Run twice:
//!   the throttle alone, then with the suspect pipeline.
//!
//! `cargo bench --bench suspects [-- tarpit|botnet]` (both by default).
//! Figures: bench/RESULTS.md.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use magicmx::demo::dns::{DnsServer, Rec};
use magicmx::demo::sink::Sink;
use magicmx::demo::{reply, start_nodes, Extra, TempDir};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

const DOMAIN: &str = "demo.test";
/// The demo's hold (`throttle.hold`).
const HOLD: Duration = Duration::from_secs(3);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Raises the soft limit of open files to the hard limit.
fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 0;
        }
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        l.rlim_cur
    }
}

/// This process's resident set, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time used by this process (user + system).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 after ')'.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// The name a DNSBL query for `ip` asks in `zone`.
fn reversed(ip: Ipv4Addr, zone: &str) -> &'static str {
    let o = ip.octets();
    Box::leak(format!("{}.{}.{}.{}.{zone}", o[3], o[2], o[1], o[0]).into_boxed_str())
}

async fn connect_from(ip: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    socket.connect(to).await
}

fn summary(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "n/a".into();
    }
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "min {:.1} ms, median {:.1} ms, max {:.1} ms (n = {})",
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1]),
        v.len()
    )
}

// ------------------------------------------------------------ tarpit

/// The address of tarpitted client `i` of `blocks` /24s (250 /24s per
/// /16): client `i` is in block `i % blocks`, host `10 + i / blocks`.
fn tarpit_ip(i: usize, blocks: usize) -> Ipv4Addr {
    let b = i % blocks;
    Ipv4Addr::new(
        127,
        20 + (b / 250) as u8,
        (b % 250) as u8,
        (10 + i / blocks) as u8,
    )
}

/// The child: opens `n` sessions to `to`, prints `ready`, holds them until
/// stdin closes. It reads nothing (the tarpit writes a byte a second).
async fn tarpit_clients(to: SocketAddr, n: usize, blocks: usize) {
    raise_nofile();
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    for i in 0..n {
        match connect_from(tarpit_ip(i, blocks), to).await {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
    }
    println!("ready {} {failed}", held.len());
    let mut line = String::new();
    let _ = BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await;
    drop(held);
}

async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let Ok(mut s) = TcpStream::connect(admin).await else {
        return -1.0;
    };
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return -1.0;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body).await;
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

async fn tarpit() {
    let n = env_usize("SESSIONS", 5_000);
    // BLOCKS < SESSIONS puts several sessions in each /24, so that the
    // per-session figure leaves out the per-block state (throttle entry,
    // suspect state): several per block.
    // (At most 90 per block: the demo's throttle.max_connections is 100,
    // kept whole for suspects by limit_factor = 1 in that case.)
    let blocks = env_usize("BLOCKS", n).clamp(n.div_ceil(90).max(1), n.max(1));
    let limit = raise_nofile();
    println!("== tarpit: {n} tarpitted sessions from {blocks} /24s (RLIMIT_NOFILE now {limit})");
    let mut recs = vec![Rec::A("2.0.0.127.bl.test", "127.0.0.2")];
    for i in 0..n {
        // 127.0.0.4 weighs 3: a suspect (tarpitted), not refused.
        recs.push(Rec::A(
            reversed(tarpit_ip(i, blocks), "bl.test"),
            "127.0.0.4",
        ));
    }
    let dns = DnsServer::start(&recs);
    let stop = CancellationToken::new();
    let (tx, _rx) = mpsc::unbounded_channel();
    let mx = Sink::builder()
        .max_message(1 << 20)
        .events(tx)
        .start("127.0.0.1", 0)
        .unwrap();
    let dir = TempDir::new().unwrap();
    let extra = Extra {
        smtp: format!(
            "max_connections = {}\nmax_connections_per_family = {}\nmax_connections_per_block = {}\n",
            n + 100,
            n + 100,
            n + 100
        ),
        throttle: String::new(),
        tables: format!(
            "[dnsbl]\nsites = [\"bl.test=127.0.0.[2..11]*3\"]\ntimeout = \"2s\"\n\
             [suspect]\ntarpit_time = \"60s\"\nmax_tarpitted = {}\nmax_tarpitted_per_block = {}\n{}",
            n + 100,
            n.div_ceil(blocks) + 1,
            if blocks < n { "limit_factor = 1.0\n" } else { "" }
        ),
    };
    let nodes = start_nodes(dir.path(), 1, mx.addr.port(), dns.addr, &extra, &stop)
        .await
        .unwrap();
    let smtp = nodes[0].smtp_addrs[0];
    let admin = nodes[0].admin_addr.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let clean = Ipv4Addr::new(127, 250, 0, 1);
    let mut before = Vec::new();
    for _ in 0..10 {
        before.push(banner_latency(clean, smtp).await);
    }
    let rss0 = rss_kib();
    let cpu0 = cpu_time();

    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "tarpit-clients",
            &smtp.to_string(),
            &n.to_string(),
            &blocks.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let opened = Instant::now();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut ready = String::new();
    out.read_line(&mut ready).await.unwrap();
    println!(
        "clients: {} (connected in {:.1}s)",
        ready.trim(),
        opened.elapsed().as_secs_f64()
    );
    // Every session past its DNSBL look-up and into the tarpit.
    let wait = Instant::now();
    let mut tarpitted = 0.0;
    while wait.elapsed() < Duration::from_secs(30) {
        tarpitted = metric(admin, "magicmx_suspect_tarpitted_total").await;
        if tarpitted >= n as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let full = metric(admin, "magicmx_suspect_refusals_total").await;
    println!("tarpitted: {tarpitted}, suspect refusals: {full}");
    let rss1 = rss_kib();
    let cpu1 = cpu_time();
    let window = Instant::now();
    let mut during = Vec::new();
    for _ in 0..20 {
        during.push(banner_latency(clean, smtp).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cpu2 = cpu_time();
    let wall = window.elapsed();
    let rss2 = rss_kib();
    println!(
        "RSS: {rss0} KiB before, {rss1} KiB with the sessions open, {rss2} KiB {:.0}s later",
        wall.as_secs_f64()
    );
    println!(
        "RSS per tarpitted session: {:.1} KiB",
        (rss2.max(rss1) - rss0) as f64 / n as f64
    );
    println!(
        "CPU: {:.2}s to accept and screen the {n} sessions; then {:.1} % of one core while they are held ({:.2}s in {:.1}s)",
        (cpu1 - cpu0).as_secs_f64(),
        100.0 * (cpu2 - cpu1).as_secs_f64() / wall.as_secs_f64(),
        (cpu2 - cpu1).as_secs_f64(),
        wall.as_secs_f64()
    );
    println!("clean banner, idle node:      {}", summary(before));
    println!("clean banner, {n} tarpitted: {}", summary(during));
    drop(child.stdin.take());
    let _ = child.wait().await;
    stop.cancel();
    for node in nodes {
        let _ = node.wait().await;
    }
}

/// Connect to the whole first line of the banner.
async fn banner_latency(from: Ipv4Addr, to: SocketAddr) -> Duration {
    let start = Instant::now();
    let Ok(s) = connect_from(from, to).await else {
        return Duration::MAX;
    };
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), r.read_line(&mut line)).await;
    let took = start.elapsed();
    let mut s = r.into_inner();
    let _ = s.write_all(b"QUIT\r\n").await;
    assert!(line.starts_with("220"), "clean banner: {line:?}");
    took
}

// ------------------------------------------------------------ botnet

#[derive(Clone, Copy)]
struct Bot {
    ip: Ipv4Addr,
    listed: Option<&'static str>,
    pregreet: bool,
    pipelines: bool,
}

fn bots(n: usize) -> Vec<Bot> {
    (0..n)
        .map(|i| {
            // Spread (not correlated with each other).
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
            Bot {
                ip: Ipv4Addr::new(127, 30 + (i / 250) as u8, (i % 250) as u8, 10),
                // 60 % listed: 40 % with a refusing code, 20 % a suspect one.
                listed: match i % 5 {
                    0 | 1 => Some("127.0.0.2"),
                    2 => Some("127.0.0.4"),
                    _ => None,
                },
                pregreet: h % 10 < 3,
                pipelines: (h / 10) % 10 < 3,
            }
        })
        .collect()
}

fn ham_ip(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 200, j as u8, 10)
}

/// How one bot session ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Outcome {
    Accepted,
    /// The refusal, cut to its codes and first words.
    Refused(String),
    Failed,
}

fn refused(line: &str) -> Outcome {
    // The recipient's address varies, its reason does not.
    let words: Vec<&str> = line
        .split_whitespace()
        .map(|w| match w.starts_with('<') {
            true => "<rcpt>",
            false => w,
        })
        .take(9)
        .collect();
    Outcome::Refused(words.join(" "))
}

/// One bot message, one connection, no retry; gives up after 10s of
/// silence (a bot does not wait out a tarpit).
async fn bot_send(bot: Bot, to: SocketAddr, n: usize) -> Outcome {
    let talk = async {
        let s = connect_from(bot.ip, to).await?;
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let ehlo = "EHLO bot.example\r\n";
        if bot.pregreet {
            w.write_all(ehlo.as_bytes()).await?;
        }
        let banner = reply(&mut r).await?;
        if !banner.starts_with("220") {
            return Ok(refused(&banner));
        }
        let body = format!("From: <win@prizes.test>\r\nSubject: spam {n}\r\n\r\nYou won.\r\n.\r\n");
        let steps = [
            "MAIL FROM:<win@prizes.test>\r\n".to_string(),
            format!("RCPT TO:<user{n}@{DOMAIN}>\r\n"),
            "DATA\r\n".to_string(),
            body,
        ];
        if !bot.pregreet {
            w.write_all(ehlo.as_bytes()).await?;
        }
        if bot.pipelines {
            // Everything at once, without waiting for the EHLO reply.
            w.write_all(steps.concat().as_bytes()).await?;
            for _ in 0..5 {
                let line = reply(&mut r).await?;
                if line.starts_with('4') || line.starts_with('5') {
                    return Ok(refused(&line));
                }
            }
            return Ok(Outcome::Accepted);
        }
        let e = reply(&mut r).await?;
        if !e.starts_with('2') {
            return Ok(refused(&e));
        }
        for step in steps {
            w.write_all(step.as_bytes()).await?;
            let line = reply(&mut r).await?;
            if line.starts_with('4') || line.starts_with('5') {
                return Ok(refused(&line));
            }
        }
        let _ = w.write_all(b"QUIT\r\n").await;
        Ok::<_, std::io::Error>(Outcome::Accepted)
    };
    match tokio::time::timeout(Duration::from_secs(10), talk).await {
        Ok(Ok(o)) => o,
        _ => Outcome::Failed,
    }
}

/// A person's message the way Postfix sends it: banner, EHLO, MAIL,
/// RCPT, DATA, QUIT, one step at a time; a temporary failure is retried
/// `RETRY` later (Postfix waits 5 minutes at first; scaled down).
async fn ham_send(j: usize, nodes: &[SocketAddr]) -> (u32, bool) {
    const RETRY: Duration = Duration::from_secs(5);
    for attempt in 0..6u32 {
        let to = nodes[(j + attempt as usize) % nodes.len()];
        let talk = async {
            let s = connect_from(ham_ip(j), to).await?;
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut last = reply(&mut r).await?;
            let steps = [
                "EHLO mail.person.test\r\n".to_string(),
                format!("MAIL FROM:<person{j}@person.test>\r\n"),
                format!("RCPT TO:<friend{j}@{DOMAIN}>\r\n"),
                "DATA\r\n".to_string(),
                format!(
                    "From: <person{j}@person.test>\r\nTo: <friend{j}@{DOMAIN}>\r\nSubject: ham {j}\r\n\r\nSee you on Friday.\r\n.\r\n"
                ),
            ];
            for step in steps {
                if !last.starts_with('2') && !last.starts_with('3') {
                    break;
                }
                w.write_all(step.as_bytes()).await?;
                last = reply(&mut r).await?;
            }
            let _ = w.write_all(b"QUIT\r\n").await;
            Ok::<_, std::io::Error>(last)
        };
        match tokio::time::timeout(Duration::from_secs(300), talk).await {
            Ok(Ok(last)) if last.starts_with("250") => return (attempt + 1, true),
            Ok(Ok(last)) if last.starts_with('5') => {
                eprintln!("ham {j}: refused: {last}");
                return (attempt + 1, false);
            }
            _ => tokio::time::sleep(RETRY).await,
        }
    }
    (6, false)
}

struct Run {
    spam_sent: usize,
    spam_outcomes: HashMap<Outcome, usize>,
    spam_relayed: usize,
    ham_relayed: usize,
    ham_tries: Vec<u32>,
    ham_delay: Vec<Duration>,
    took: Duration,
}

/// What defends the network in one botnet run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Defence {
    ThrottleAlone,
    Suspects,
    /// The suspect pipeline plus greylisting of never-seen blocks
    /// (`[greylist] mode = "unknown"`, delay 2 s: the ham retries after 5 s).
    SuspectsAndGreylist,
}

impl Defence {
    fn label(self) -> &'static str {
        match self {
            Defence::ThrottleAlone => "throttle alone",
            Defence::Suspects => "throttle + suspect pipeline",
            Defence::SuspectsAndGreylist => {
                "throttle + suspect pipeline + greylisting (mode unknown)"
            }
        }
    }
}

async fn botnet_run(defence: Defence, n_bots: usize, n_ham: usize, msgs: usize) -> Run {
    let bots = bots(n_bots);
    let mut recs = vec![
        Rec::Mx(DOMAIN, 10, "mx.demo.test"),
        Rec::A("mx.demo.test", "127.0.0.1"),
    ];
    recs.push(Rec::A("2.0.0.127.bl.test", "127.0.0.2"));
    for b in &bots {
        if let Some(code) = b.listed {
            recs.push(Rec::A(reversed(b.ip, "bl.test"), code));
        }
    }
    let dns = DnsServer::start(&recs);
    let stop = CancellationToken::new();
    let (tx, mut arrived) = mpsc::unbounded_channel();
    let mx = Sink::builder()
        .max_message(1 << 20)
        .events(tx)
        .start("127.0.0.1", 0)
        .unwrap();
    let dir = TempDir::new().unwrap();
    const DNSBL: &str = "[dnsbl]\nsites = [\"bl.test=127.0.0.[2..3]*5\", \"bl.test=127.0.0.[4..11]*3\"]\ntimeout = \"1500ms\"\n";
    let tables = match defence {
        Defence::ThrottleAlone => "[suspect]\nprotocol_tests = false\n".to_string(),
        Defence::Suspects => DNSBL.to_string(),
        Defence::SuspectsAndGreylist => {
            format!("{DNSBL}[greylist]\nenabled = true\nmode = \"unknown\"\ndelay = \"2s\"\n")
        }
    };
    let extra = Extra {
        smtp: "max_connections = 2000\nmax_connections_per_family = 2000\n".into(),
        throttle: String::new(),
        tables,
    };
    let nodes = start_nodes(dir.path(), 3, mx.addr.port(), dns.addr, &extra, &stop)
        .await
        .unwrap();
    let smtp: Vec<SocketAddr> = nodes.iter().map(|n| n.smtp_addrs[0]).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let start = Instant::now();
    // What the real MX receives, and when, while it happens.
    let collecting = CancellationToken::new();
    let collector = {
        let collecting = collecting.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                tokio::select! {
                    Some(a) = arrived.recv() => got.push((a, Instant::now())),
                    _ = collecting.cancelled() => return got,
                }
            }
        })
    };
    // Ham: one sender every 0.4s.
    let mut ham = Vec::new();
    for j in 0..n_ham {
        let smtp = smtp.clone();
        ham.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400) * j as u32).await;
            let t0 = Instant::now();
            let (tries, ok) = ham_send(j, &smtp).await;
            (j, t0, tries, ok)
        }));
    }
    // Bots: at most 300 sessions at once, each bot's messages in turn,
    // round robin over the nodes.
    let gate = Arc::new(Semaphore::new(300));
    let mut spam = Vec::new();
    for (i, bot) in bots.iter().copied().enumerate() {
        let (smtp, gate) = (smtp.clone(), gate.clone());
        spam.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for k in 0..msgs {
                let _permit = gate.acquire().await.unwrap();
                out.push(bot_send(bot, smtp[(i + k) % smtp.len()], i * msgs + k).await);
            }
            out
        }));
    }
    let mut outcomes: HashMap<Outcome, usize> = HashMap::new();
    for s in spam {
        for o in s.await.unwrap() {
            *outcomes.entry(o).or_default() += 1;
        }
    }
    let mut sent_at = HashMap::new();
    let mut ham_tries = Vec::new();
    for h in ham {
        let (j, t0, tries, ok) = h.await.unwrap();
        ham_tries.push(tries);
        if ok {
            sent_at.insert(format!("ham {j}"), t0);
        }
    }
    // The last relays: what was accepted is held, then relayed (retried
    // after a second if the real MX was busy).
    tokio::time::sleep(HOLD * 4).await;
    let took = start.elapsed();
    collecting.cancel();
    stop.cancel();
    let (mut spam_relayed, mut ham_delay) = (0, Vec::new());
    for (a, at) in collector.await.unwrap_or_default() {
        if a.mail_from.starts_with("person") {
            if let Some(t0) = sent_at.get(&a.subject()) {
                ham_delay.push(at.duration_since(*t0));
            }
        } else {
            spam_relayed += 1;
        }
    }
    for node in nodes {
        let _ = node.wait().await;
    }
    Run {
        spam_sent: n_bots * msgs,
        spam_outcomes: outcomes,
        spam_relayed,
        ham_relayed: ham_delay.len(),
        ham_tries,
        ham_delay,
        took,
    }
}

async fn botnet() {
    let limit = raise_nofile();
    let n_bots = env_usize("BOTS", 2_000);
    let n_ham = env_usize("HAM", 50);
    let msgs = env_usize("BOT_MSGS", 3);
    let b = bots(n_bots);
    println!(
        "== botnet: {n_bots} bot blocks x {msgs} messages ({} listed, {} pregreet, {} pipeline), {n_ham} ham senders, 3 nodes, hold {HOLD:?} (RLIMIT_NOFILE {limit})",
        b.iter().filter(|b| b.listed.is_some()).count(),
        b.iter().filter(|b| b.pregreet).count(),
        b.iter().filter(|b| b.pipelines).count(),
    );
    let defences: Vec<Defence> = match std::env::var("DEFENCES").as_deref() {
        Ok("greylist") => vec![Defence::SuspectsAndGreylist],
        _ => vec![
            Defence::ThrottleAlone,
            Defence::Suspects,
            Defence::SuspectsAndGreylist,
        ],
    };
    for defence in defences {
        let r = botnet_run(defence, n_bots, n_ham, msgs).await;
        let pct = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
        println!("-- {} ({:.0}s)", defence.label(), r.took.as_secs_f64());
        println!(
            "spam: {} sent, accepted {}, refused {}, bot gave up {}; relayed to the real MX {} ({:.1} %), never relayed {:.1} %",
            r.spam_sent,
            r.spam_outcomes.get(&Outcome::Accepted).unwrap_or(&0),
            r.spam_outcomes
                .iter()
                .filter(|(o, _)| matches!(o, Outcome::Refused(_)))
                .map(|(_, n)| n)
                .sum::<usize>(),
            r.spam_outcomes.get(&Outcome::Failed).unwrap_or(&0),
            r.spam_relayed,
            pct(r.spam_relayed, r.spam_sent),
            100.0 - pct(r.spam_relayed, r.spam_sent),
        );
        let mut why: Vec<_> = r
            .spam_outcomes
            .iter()
            .filter_map(|(o, n)| match o {
                Outcome::Refused(line) => Some((n, line)),
                _ => None,
            })
            .collect();
        why.sort_by(|a, b| b.0.cmp(a.0));
        for (n, line) in why.iter().take(8) {
            println!("   {n:5} × {line}");
        }
        println!(
            "ham: {} sent, relayed {} ({:.1} %), retried {}; delay first attempt to real MX: {}",
            n_ham,
            r.ham_relayed,
            pct(r.ham_relayed, n_ham),
            r.ham_tries.iter().filter(|t| **t > 1).count(),
            summary(r.ham_delay)
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    match args.first().map(String::as_str) {
        Some("tarpit-clients") => {
            let to = args[1].parse().unwrap();
            let n = args[2].parse().unwrap();
            let blocks = args[3].parse().unwrap();
            rt.block_on(tarpit_clients(to, n, blocks));
        }
        Some("tarpit") => rt.block_on(tarpit()),
        Some("botnet") => rt.block_on(botnet()),
        _ => {
            rt.block_on(tarpit());
            rt.block_on(botnet());
        }
    }
}
