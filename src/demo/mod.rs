//! `magicmx demo`: a whole magic MX network in one process, on loopback.
//!
//! Three nodes share counts over real gossip (QUIC with certificates made
//! on the fly by the network CA code), an in-process DNS server publishes
//! the recipient domain's real MX, and an in-process SMTP server plays that
//! real MX. Then a person writes a few messages, one through each node,
//! while a flood from two bot blocks hits all three nodes and a scanner
//! speaks HTTP to port 25 (its block becomes a suspect at every node, so its
//! neighbour is refused at another one); the demo prints
//! what happens as it happens (accepted and held, relayed, throttled,
//! quarantined) and the dashboard address of each node. It ends when the
//! story is told and `seconds` have passed since the start, or on Ctrl-C;
//! it fails (non-zero) if the story did not happen: the person's mail not
//! relayed, or the flood not throttled and quarantined.
//!
//! Everything lives in a temporary directory removed at the end.

pub mod dns;
pub mod sink;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The recipient domain of the demo, and its people.
const DOMAIN: &str = "demo.test";
const NODES: usize = 3;
/// Held this long before relay (the node's `throttle.hold`).
const HOLD: &str = "3s";
/// Messages per block per window, network-wide.
const MAX_MESSAGES: u32 = 8;
/// The person's messages, one through each node.
const HAM: usize = 3;
/// Bot messages per block (two blocks), spread over the nodes.
const FLOOD: usize = 30;
const PERSON: &str = "127.0.0.1";
const BOTS: [&str; 2] = ["127.0.2.", "127.0.3."];
/// A scanner speaking HTTP to port 25, then its neighbour at another node.
const SCANNER: &str = "127.0.4.9";
const NEIGHBOUR: &str = "127.0.4.10";

/// How long the demo runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// End this long after the start (once the story is told), at most.
    pub seconds: u64,
}

/// What the demo saw, for its summary and exit status.
#[derive(Debug, Default)]
pub struct Report {
    pub ham_sent: usize,
    pub ham_relayed: usize,
    pub flood_accepted: usize,
    pub flood_refused: usize,
    pub flood_relayed: usize,
    pub quarantined: usize,
    /// The scanner's block refused at another node (the suspect state
    /// travelled over gossip).
    pub scanner_refused_elsewhere: bool,
}

impl Report {
    /// The person's mail all relayed, the flood throttled and quarantined.
    pub fn told(&self) -> bool {
        self.ham_relayed == HAM
            && self.flood_refused > 0
            && self.quarantined > 0
            && self.scanner_refused_elsewhere
    }
}

/// Prints one line of the story with the time since the start.
struct Story(Instant);

impl Story {
    fn say(&self, what: impl std::fmt::Display) {
        println!("[{:5.1}s] {what}", self.0.elapsed().as_secs_f64());
    }
}

/// Runs the demo until it is told and `opts.seconds` have passed, or
/// `shutdown` is cancelled. Ok(report) either way; the caller checks
/// [`Report::told`].
pub async fn run(opts: Options, shutdown: CancellationToken) -> anyhow::Result<Report> {
    let story = Story(Instant::now());
    let deadline = story.0 + Duration::from_secs(opts.seconds.max(10));
    let dir = TempDir::new()?;
    let stop = shutdown.child_token();

    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let mx = sink::Sink::builder()
        .hostname("mx.demo.test")
        .max_message(1 << 20)
        .events(arrived_tx)
        .start("127.0.0.1", 0)?;
    let dns = dns::DnsServer::start(&[
        dns::Rec::Mx(DOMAIN, 10, "mx.demo.test"),
        dns::Rec::A("mx.demo.test", "127.0.0.1"),
    ]);
    story.say(format!(
        "real MX of {DOMAIN} at {} (DNS at {})",
        mx.addr, dns.addr
    ));

    let nodes = start_nodes(
        dir.path(),
        NODES,
        mx.addr.port(),
        dns.addr,
        &Extra::default(),
        &stop,
    )
    .await?;
    for (i, node) in nodes.iter().enumerate() {
        story.say(format!(
            "node demo{}: SMTP {}, dashboard http://{}/",
            i + 1,
            node.smtp_addrs[0],
            node.admin_addr.map(|a| a.to_string()).unwrap_or_default()
        ));
    }
    let smtp: Vec<SocketAddr> = nodes.iter().map(|n| n.smtp_addrs[0]).collect();
    let spools: Vec<crate::spool::Spool> = nodes.iter().map(|n| n.spool.clone()).collect();
    let dashboards: Vec<String> = nodes
        .iter()
        .filter_map(|n| n.admin_addr)
        .map(|a| format!("http://{a}/"))
        .collect();
    // Let the nodes find each other before the mail starts.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut report = Report::default();
    let (result_tx, mut results) = mpsc::unbounded_channel::<(Who, String)>();
    // The person: one message through each node, a second apart.
    {
        let (smtp, tx) = (smtp.clone(), result_tx.clone());
        tokio::spawn(async move {
            for (i, server) in smtp.iter().enumerate().take(HAM) {
                let subject = format!("Lunch on Friday? ({})", i + 1);
                let r = send(
                    PERSON,
                    *server,
                    "ann@people.test",
                    &format!("bob@{DOMAIN}"),
                    &subject,
                )
                .await;
                let _ = tx.send((Who::Person(i + 1), r));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    // The flood: each bot block sends FLOOD messages, one per connection,
    // round robin over the nodes, as fast as it can.
    for prefix in BOTS {
        let (smtp, tx) = (smtp.clone(), result_tx.clone());
        tokio::spawn(async move {
            for n in 0..FLOOD {
                let ip = format!("{prefix}{}", 1 + n % 50);
                let server = smtp[n % smtp.len()];
                let r = send(
                    &ip,
                    server,
                    "winner@prizes.test",
                    &format!("user{n}@{DOMAIN}"),
                    "You won",
                )
                .await;
                let _ = tx.send((Who::Bot(ip), r));
            }
        });
    }
    // The scanner: HTTP to node 1; a second later its neighbour tries node 3.
    {
        let (smtp, tx) = (smtp.clone(), result_tx.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let r = speak(SCANNER, smtp[0], "GET / HTTP/1.1\r\nHost: demo\r\n\r\n").await;
            let _ = tx.send((Who::Scanner(SCANNER), r));
            tokio::time::sleep(Duration::from_secs(1)).await;
            let r = speak(NEIGHBOUR, smtp[smtp.len() - 1], "EHLO neighbour.demo\r\n").await;
            let _ = tx.send((Who::Scanner(NEIGHBOUR), r));
        });
    }
    drop(result_tx);

    let mut quarantined_seen = 0;
    let mut told_at = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                story.say("stopped (Ctrl-C)");
                break;
            }
            Some((who, reply)) = results.recv() => {
                let accepted = reply.starts_with("250");
                match &who {
                    Who::Person(i) => {
                        report.ham_sent += 1;
                        if accepted {
                            story.say(format!("person, message {i}: {reply}, held {HOLD} before relay"));
                        } else {
                            story.say(format!("person, message {i}: NOT accepted: {reply}"));
                        }
                    }
                    Who::Scanner(ip) if *ip == SCANNER => {
                        story.say(format!("scanner {ip} sent `GET / HTTP/1.1` to demo1: {reply}; its block is now a suspect"));
                    }
                    Who::Scanner(ip) => {
                        report.scanner_refused_elsewhere = reply.starts_with("550 5.7.1");
                        story.say(format!("scanner's neighbour {ip} at demo{NODES}: {reply} (learnt over gossip)"));
                    }
                    Who::Bot(ip) => {
                        if accepted {
                            report.flood_accepted += 1;
                            story.say(format!("bot {ip}: {reply}, held {HOLD} before relay"));
                        } else {
                            report.flood_refused += 1;
                            if report.flood_refused <= 5 || report.flood_refused % 10 == 0 {
                                story.say(format!("bot {ip}: throttled: {reply} ({} refused so far)", report.flood_refused));
                            }
                        }
                    }
                }
            }
            Some(a) = arrived.recv() => {
                if a.mail_from.starts_with("ann@") {
                    report.ham_relayed += 1;
                    story.say(format!("real MX received {:?} for {} (person, relayed)", a.subject(), a.rcpts.join(", ")));
                } else {
                    report.flood_relayed += 1;
                    story.say(format!("real MX received {:?} from a bot (relayed)", a.subject()));
                }
            }
            _ = tick.tick() => {
                let now = crate::clock::system_ms() / 1000;
                let q: usize = spools.iter().map(|s| s.stats(now).quarantined).sum();
                if q > quarantined_seen {
                    story.say(format!("quarantined: {q} bot message(s) held back network-wide (the block went over its limit)"));
                    quarantined_seen = q;
                }
                report.quarantined = q;
                if told_at.is_none() && report.told() {
                    told_at = Some(Instant::now());
                    story.say(format!(
                        "done: the person's {HAM} messages were relayed; the flood got {} refusals and {} messages quarantined, {} relayed; the scanner's block is refused network-wide",
                        report.flood_refused, report.quarantined, report.flood_relayed
                    ));
                    for d in &dashboards {
                        story.say(format!("dashboard: {d}"));
                    }
                }
                if Instant::now() >= deadline {
                    break;
                }
            }
        }
    }
    stop.cancel();
    let mut failed = None;
    for node in nodes {
        if let Err(e) = node.wait().await {
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        return Err(e.context("a demo node failed"));
    }
    drop(dns);
    Ok(report)
}

/// Config added to the demo's nodes (the benches in `bench/suspects.rs`
/// start the demo's network with their own `[dnsbl]` and `[suspect]`).
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// Lines added to `[smtp]`.
    pub smtp: String,
    /// Lines added to `[throttle]`.
    pub throttle: String,
    /// Whole tables the demo config does not have, appended.
    pub tables: String,
}

/// Starts `n` nodes `demo1`.. in `dir` (one CA, certificates issued on the
/// fly, each config written to disk and loaded), joined over gossip on
/// loopback, relaying to the real MX on 127.0.0.1:`mx_port`, resolving
/// through `dns`.
pub async fn start_nodes(
    dir: &Path,
    n: usize,
    mx_port: u16,
    dns: SocketAddr,
    extra: &Extra,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<crate::Node>> {
    let ca = dir.join("ca");
    crate::gossip::ca::init(&ca)?;
    let mut gossip_addrs = Vec::new();
    for i in 1..=n {
        crate::gossip::ca::issue(&format!("demo{i}"), &ca)?;
        gossip_addrs.push(free_udp_port()?);
    }
    let mut nodes = Vec::new();
    for i in 1..=n {
        let path = dir.join(format!("demo{i}.toml"));
        let seeds = if i == 1 {
            vec![]
        } else {
            vec![gossip_addrs[0]]
        };
        std::fs::write(
            &path,
            node_config(i, dir, mx_port, dns, gossip_addrs[i - 1], &seeds, extra),
        )?;
        let config = Config::load(&path).with_context(|| format!("{}", path.display()))?;
        nodes.push(crate::Node::start(config, stop.clone()).await?);
    }
    Ok(nodes)
}

enum Who {
    Person(usize),
    Bot(String),
    Scanner(&'static str),
}

fn node_config(
    i: usize,
    dir: &Path,
    mx_port: u16,
    dns: SocketAddr,
    gossip: SocketAddr,
    seeds: &[SocketAddr],
    extra: &Extra,
) -> String {
    let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
    let ca = dir.join("ca");
    format!(
        r#"# magicmx demo node {i}: loopback only.
[node]
name = "demo{i}"
hostname = "demo{i}.magic.demo.test"
data_dir = "{data}"
magic_suffixes = [".magic.demo.test"]

[smtp]
listen = ["127.0.0.1:0"]
{smtp_extra}

[admin]
listen = "127.0.0.1:0"

[accept]
domains = ["{DOMAIN}"]

[relay]
port = {mx_port}
tls = "none"
retry_initial = "1s"
# The demo's real MX is on loopback.
deny_networks = []

[dns]
nameservers = ["{dns}"]
timeout = "2s"

[throttle]
hold = "{HOLD}"
max_messages = {MAX_MESSAGES}
max_recipients = 50
max_connections = 100
penalty = "30s"
{throttle_extra}

[gossip]
enabled = true
listen = "{gossip}"
network = "demo"
seeds = [{seeds}]
ca = "{ca}/ca.pem"
cert = "{ca}/demo{i}.pem"
key = "{ca}/demo{i}.key"
interval = "250ms"
anti_entropy_interval = "2s"
{tables}
"#,
        data = dir.join(format!("demo{i}")).display(),
        ca = ca.display(),
        seeds = seeds.join(", "),
        smtp_extra = extra.smtp,
        throttle_extra = extra.throttle,
        tables = extra.tables,
    )
}

/// A UDP port free now on 127.0.0.1 (the gossip listener binds it next).
fn free_udp_port() -> std::io::Result<SocketAddr> {
    std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()
}

/// One message in one SMTP session from `from_ip`; the reply that settled
/// it (the banner, a refusal, or the end of data), one line.
async fn send(
    from_ip: &str,
    server: SocketAddr,
    sender: &str,
    rcpt: &str,
    subject: &str,
) -> String {
    match tokio::time::timeout(
        Duration::from_secs(20),
        transaction(from_ip, server, sender, rcpt, subject),
    )
    .await
    {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => format!("connection failed: {e}"),
        Err(_) => "timed out".to_string(),
    }
}

async fn transaction(
    from_ip: &str,
    server: SocketAddr,
    sender: &str,
    rcpt: &str,
    subject: &str,
) -> std::io::Result<String> {
    let (mut read, mut write, banner) = greeted(from_ip, server).await?;
    if !banner.starts_with('2') {
        return Ok(banner);
    }
    let body = format!(
        "From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\nMessage-ID: <{}@demo>\r\n\r\nHello from the magicmx demo.\r\n.\r\n",
        crate::admin::new_token()
    );
    let steps = [
        "EHLO client.demo\r\n".to_string(),
        format!("MAIL FROM:<{sender}>\r\n"),
        format!("RCPT TO:<{rcpt}>\r\n"),
        "DATA\r\n".to_string(),
        body,
    ];
    for step in steps {
        write.write_all(step.as_bytes()).await?;
        let r = reply(&mut read).await?;
        if !(r.starts_with('2') || r.starts_with('3')) || step.ends_with(".\r\n") {
            let _ = write.write_all(b"QUIT\r\n").await;
            return Ok(r);
        }
    }
    Ok("no reply".into())
}

/// Connects to `server` from `from_ip` (any port) and reads the banner.
async fn greeted(
    from_ip: &str,
    server: SocketAddr,
) -> std::io::Result<(
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
    String,
)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(
        from_ip.parse::<IpAddr>().map_err(std::io::Error::other)?,
        0,
    ))?;
    let (read, write) = socket.connect(server).await?.into_split();
    let mut read = BufReader::new(read);
    let banner = reply(&mut read).await?;
    Ok((read, write, banner))
}

/// Connects from `from_ip`, reads the banner; if it is a 220, writes
/// `line` and returns the reply to it, else the banner.
async fn speak(from_ip: &str, server: SocketAddr, line: &str) -> String {
    let talk = async {
        let (mut read, mut write, banner) = greeted(from_ip, server).await?;
        if !banner.starts_with("220") {
            return Ok(banner);
        }
        write.write_all(line.as_bytes()).await?;
        reply(&mut read).await
    };
    match tokio::time::timeout(Duration::from_secs(20), talk).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => format!("connection failed: {e}"),
        Err(_) => "timed out".to_string(),
    }
}

/// The last line of one reply (multi-line replies read whole).
pub async fn reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(line.trim_end().to_string());
        }
    }
}

/// A directory under the system's temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> std::io::Result<TempDir> {
        let path = std::env::temp_dir().join(format!("magicmx-demo-{}", crate::admin::new_token()));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
