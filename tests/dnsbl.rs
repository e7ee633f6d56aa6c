//! DNSBL / DNSWL lookups against a real DNS server in the test process.
//!
//! The hickory server of `tests/common/dns.rs` serves the zones `bl.test`
//! (a block list), `wl.test` (an allow list) and a few broken ones. In front
//! of it sits a small UDP relay that misbehaves for some zones the way real
//! servers do: `silent.test` never answers, `servfail.test` answers
//! SERVFAIL, `garbage.test` answers bytes that are not DNS. The node's
//! resolver (`magicmx::dns::Dns`) talks to the relay, which counts what it
//! forwards, so a test can tell a cached or paused zone from a queried one.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::inproc::InProc;
use common::{Client, DnsServer, NodeConf, Rec};
use magicmx::config::{DnsConfig, DnsblConfig, Dur};
use magicmx::dns::Dns;
use magicmx::dnsbl::{Dnsbl, Score};

const TIMEOUT: Duration = Duration::from_millis(300);

/// The zones: names are `<reversed client>.<zone>`.
fn records() -> Vec<Rec> {
    let mut r = vec![
        // RFC 5782 test entries.
        Rec::A("2.0.0.127.bl.test", "127.0.0.2"),
        Rec::A("2.0.0.127.wl.test", "127.0.0.2"),
        // 127.0.0.10 is listed with a code the filter counts, .15 with one it does not.
        Rec::A("10.0.0.127.bl.test", "127.0.0.4"),
        Rec::A("15.0.0.127.bl.test", "127.0.0.12"),
        // 127.0.0.11: "query refused" (Spamhaus, public resolver).
        Rec::A("11.0.0.127.bl.test", "127.255.255.254"),
        // 127.0.0.12: outside 127/8 (an expired zone pointing at a web server).
        Rec::A("12.0.0.127.bl.test", "192.0.2.80"),
        // 127.0.0.13: TXT only (NODATA for A).
        Rec::Txt("13.0.0.127.bl.test", "listed, see https://bl.test/"),
        // 127.0.0.20 is allowlisted.
        Rec::A("20.0.0.127.wl.test", "127.0.10.1"),
        // 2001:db8::1, nibble format.
        Rec::A(
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test",
            "127.0.0.3",
        ),
        // A zone that lists everyone (its health check must fail).
        Rec::A("2.0.0.127.all.test", "127.0.0.2"),
        Rec::A("1.0.0.127.all.test", "127.0.0.2"),
        // The refusing zone answers its test entry with the refusal too.
        Rec::A("2.0.0.127.refusing.test", "127.255.255.254"),
        Rec::A("10.0.0.127.refusing.test", "127.255.255.254"),
        Rec::A("10.0.0.127.other.test", "127.0.0.2"),
        // Clients of the node tests, each in a /24 of its own (the block is
        // what gets the score): 127.5.1.10 is listed with a "suspect" code,
        // 127.5.2.10 with a "refuse" code, 127.5.4.10 gets a "query
        // refused" answer, 127.5.5.20 is allowlisted.
        Rec::A("10.1.5.127.bl.test", "127.0.0.4"),
        Rec::A("10.2.5.127.bl.test", "127.0.0.2"),
        Rec::A("10.4.5.127.bl.test", "127.255.255.254"),
        Rec::A("20.5.5.127.wl.test", "127.0.10.1"),
    ];
    // 127.0.0.14: a hundred A records.
    for a in ADDRS {
        r.push(Rec::A("14.0.0.127.bl.test", a));
    }
    r
}

macro_rules! addrs {
    ($($n:literal)*) => { [$(concat!("127.0.2.", $n)),*] };
}
const ADDRS: [&str; 100] = addrs!(
    0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29
    30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59
    60 61 62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89
    90 91 92 93 94 95 96 97 98 99
);

/// A UDP relay in front of the DNS server that misbehaves per zone.
struct Front {
    addr: SocketAddr,
    /// Queries forwarded to the real server, per zone name suffix seen.
    forwarded: Arc<AtomicUsize>,
    /// Queries received for `silent.test`.
    silent: Arc<AtomicUsize>,
    _dns: DnsServer,
}

/// The question name of a DNS query, lower-case, no trailing dot.
fn qname(packet: &[u8]) -> Option<String> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *packet.get(i)? as usize;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(packet.get(i + 1..i + 1 + len)?).to_lowercase());
        i += 1 + len;
    }
    Some(labels.join("."))
}

/// The end of the question section (after QTYPE and QCLASS).
fn question_end(packet: &[u8]) -> Option<usize> {
    let mut i = 12;
    loop {
        let len = *packet.get(i)? as usize;
        i += 1 + len;
        if len == 0 {
            return Some(i + 4).filter(|e| *e <= packet.len());
        }
    }
}

impl Front {
    fn start() -> Front {
        let dns = DnsServer::start(&records());
        let upstream = dns.addr;
        // UDP and TCP on one port: large answers come back truncated over
        // UDP and the resolver asks again over TCP, which is relayed as is.
        let (sock, tcp) = (0..50)
            .find_map(|_| {
                let udp = UdpSocket::bind("127.0.0.1:0").ok()?;
                let tcp = std::net::TcpListener::bind(udp.local_addr().ok()?).ok()?;
                Some((udp, tcp))
            })
            .expect("a port free for UDP and TCP");
        let addr = sock.local_addr().unwrap();
        thread::spawn(move || {
            for conn in tcp.incoming() {
                let Ok(down) = conn else { return };
                let Ok(up) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let (mut d2, mut u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                let (mut down, mut up) = (down, up);
                thread::spawn(move || std::io::copy(&mut down, &mut up));
                thread::spawn(move || std::io::copy(&mut u2, &mut d2));
            }
        });
        let forwarded = Arc::new(AtomicUsize::new(0));
        let silent = Arc::new(AtomicUsize::new(0));
        let (fwd, sil) = (forwarded.clone(), silent.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    return;
                };
                let query = buf[..n].to_vec();
                let name = qname(&query).unwrap_or_default();
                if name.ends_with("silent.test") {
                    sil.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                if name.ends_with("servfail.test") {
                    let Some(end) = question_end(&query) else {
                        continue;
                    };
                    let mut resp = query[..end].to_vec();
                    resp[2] = 0x81; // QR, RD
                    resp[3] = 0x82; // RA, SERVFAIL
                    resp[6..12].fill(0); // no answer, authority, additional
                    let _ = sock.send_to(&resp, from);
                    continue;
                }
                if name.ends_with("garbage.test") {
                    let mut resp = query[..2].to_vec();
                    resp.extend_from_slice(&[0x81, 0x80, 0xff, 0xff, 0, 9, 0xde, 0xad, 0xbe]);
                    let _ = sock.send_to(&resp, from);
                    continue;
                }
                fwd.fetch_add(1, Ordering::SeqCst);
                let sock = sock.try_clone().unwrap();
                thread::spawn(move || {
                    let up = UdpSocket::bind("127.0.0.1:0").unwrap();
                    up.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let _ = up.send_to(&query, upstream);
                    let mut b = [0u8; 4096];
                    if let Ok(n) = up.recv(&mut b) {
                        let _ = sock.send_to(&b[..n], from);
                    }
                });
            }
        });
        Front {
            addr,
            forwarded,
            silent,
            _dns: dns,
        }
    }

    fn dnsbl(&self, sites: &[&str]) -> Dnsbl {
        let dns = Dns::new(&DnsConfig {
            nameservers: vec![self.addr],
            timeout: Dur(Duration::from_secs(1)),
        })
        .unwrap();
        let cfg = DnsblConfig {
            sites: sites.iter().map(|s| s.to_string()).collect(),
            timeout: Dur(TIMEOUT),
            ..DnsblConfig::default()
        };
        Dnsbl::new(&cfg, dns).unwrap()
    }

    fn forwarded(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn zone_state(d: &Dnsbl, zone: &str) -> magicmx::dnsbl::ZoneStatus {
    d.status().into_iter().find(|z| z.zone == zone).unwrap()
}

#[tokio::test]
async fn a_listed_client_scores_an_unlisted_one_does_not() {
    let front = Front::start();
    let d = front.dnsbl(&[
        "bl.test=127.0.0.[2..11]*3",
        "wl.test=127.0.[0..255].[1..3]*-2",
    ]);
    let listed = d.lookup(ip("127.0.0.10")).await;
    assert_eq!(listed.total, 3, "{listed:?}");
    assert_eq!(listed.reasons.len(), 1);
    assert_eq!(listed.reasons[0].zone, "bl.test");
    assert_eq!(listed.reasons[0].answer.to_string(), "127.0.0.4");
    assert_eq!(listed.reasons[0].weight, 3);
    // IPv4-mapped IPv6 is the IPv4 client.
    assert_eq!(d.lookup(ip("::ffff:127.0.0.10")).await.total, 3);

    assert_eq!(d.lookup(ip("127.0.0.99")).await, Score::default());
    // Listed with a code the filter does not count.
    assert_eq!(d.lookup(ip("127.0.0.15")).await.total, 0);

    let allowed = d.lookup(ip("127.0.0.20")).await;
    assert_eq!(allowed.total, -2);
    assert!(allowed.is_allowlisted());
    assert_eq!(allowed.reasons[0].zone, "wl.test");

    // IPv6 in nibble format.
    assert_eq!(d.lookup(ip("2001:db8::1")).await.total, 3);
    assert_eq!(d.lookup(ip("2001:db8::2")).await.total, 0);

    // Answers are cached (positive and negative): no new query.
    let before = front.forwarded();
    assert_eq!(d.lookup(ip("127.0.0.10")).await.total, 3);
    assert_eq!(d.lookup(ip("127.0.0.99")).await.total, 0);
    assert_eq!(front.forwarded(), before);
    assert!(d.cache_len() >= 4);
    assert!(d
        .status()
        .iter()
        .all(|z| z.state == "active" && z.errors == 0));
}

#[tokio::test]
async fn a_query_refused_answer_is_an_error_never_a_listing() {
    let front = Front::start();
    // No filter: any valid answer would count.
    let d = front.dnsbl(&["bl.test*5", "other.test*1"]);
    let score = d.lookup(ip("127.0.0.11")).await;
    assert_eq!(score.total, 0, "127.255.255.254 must not list: {score:?}");
    let st = zone_state(&d, "bl.test");
    assert_eq!(st.state, "paused");
    assert_eq!(st.errors, 1);
    assert!(
        st.last_error.as_deref().unwrap().contains("refused"),
        "{st:?}"
    );
    assert!(st.paused_for_secs.unwrap() > 0);
    // The paused zone is not asked (fail open): 127.0.0.10 is listed in it,
    // but only other.test counts now.
    let before = front.forwarded();
    let score = d.lookup(ip("127.0.0.10")).await;
    assert_eq!(score.total, 1, "{score:?}");
    assert_eq!(front.forwarded(), before + 1, "only other.test was asked");

    // An answer outside 127/8 is an error as well.
    let d = front.dnsbl(&["bl.test*5"]);
    assert_eq!(d.lookup(ip("127.0.0.12")).await.total, 0);
    let st = zone_state(&d, "bl.test");
    assert_eq!(st.state, "paused");
    assert!(st.last_error.unwrap().contains("outside 127.0.0.0/8"));
}

#[tokio::test]
async fn a_zone_that_never_answers_costs_at_most_the_timeout() {
    let front = Front::start();
    let d = front.dnsbl(&["silent.test*5", "bl.test*3"]);
    for i in 0..3 {
        let start = Instant::now();
        let score = d.lookup(ip("127.0.0.10")).await;
        let took = start.elapsed();
        assert!(
            took <= TIMEOUT + Duration::from_millis(150),
            "lookup {i} took {took:?}"
        );
        // bl.test answered from cache or server; the silent zone refused no one.
        assert_eq!(score.total, 3, "{score:?}");
    }
    assert!(front.silent.load(Ordering::SeqCst) >= 3);
    let st = zone_state(&d, "silent.test");
    assert_eq!(st.errors, 3);
    assert!(st.last_error.unwrap().starts_with("timeout"));
    // Three timeouts in a row pause it: the next lookup costs nothing.
    assert_eq!(st.state, "paused");
    let start = Instant::now();
    assert_eq!(d.lookup(ip("127.0.0.99")).await.total, 0);
    assert!(start.elapsed() < TIMEOUT, "{:?}", start.elapsed());
}

#[tokio::test]
async fn odd_answer_shapes_never_panic_and_never_list_wrongly() {
    let front = Front::start();
    let d = front.dnsbl(&["bl.test*2", "servfail.test*5", "garbage.test*5"]);
    // TXT only: not listed.
    let start = Instant::now();
    assert_eq!(d.lookup(ip("127.0.0.13")).await.total, 0);
    assert!(start.elapsed() <= TIMEOUT + Duration::from_millis(150));
    // A hundred A records: listed once, with one reason.
    let many = d.lookup(ip("127.0.0.14")).await;
    assert_eq!(many.total, 2, "{many:?}");
    assert_eq!(many.reasons.len(), 1);
    // NXDOMAIN.
    assert_eq!(d.lookup(ip("127.0.0.77")).await.total, 0);
    // SERVFAIL and garbage are errors of their zones, never listings.
    assert!(zone_state(&d, "servfail.test").errors >= 1);
    assert!(zone_state(&d, "garbage.test").errors >= 1);
    assert_eq!(zone_state(&d, "bl.test").errors, 0);
    // IPv6 clients against every zone, too.
    assert_eq!(d.lookup(ip("2001:db8:ffff::9")).await.total, 0);
}

#[tokio::test]
async fn health_check_pauses_zones_that_fail_the_rfc5782_entries() {
    let front = Front::start();
    let d = front.dnsbl(&[
        "bl.test*3",
        "wl.test*-2",
        "all.test*4",
        "refusing.test*4",
        "silent.test*4",
    ]);
    d.health_check().await;
    let state = |z: &str| zone_state(&d, z).state;
    assert_eq!(state("bl.test"), "active");
    assert_eq!(state("wl.test"), "active");
    assert_eq!(state("all.test"), "unhealthy");
    assert!(zone_state(&d, "all.test")
        .last_error
        .unwrap()
        .contains("127.0.0.1 is listed"));
    assert_eq!(state("refusing.test"), "unhealthy");
    assert_eq!(state("silent.test"), "unhealthy");
    // Unhealthy zones are not asked: 127.0.0.10 is "listed" by refusing.test
    // and all.test would list anyone.
    let score = d.lookup(ip("127.0.0.10")).await;
    assert_eq!(score.total, 3, "{score:?}");
    let st = serde_json::to_value(d.status()).unwrap();
    assert_eq!(st.as_array().unwrap().len(), 5);
}

#[test]
fn an_invalid_sites_entry_names_the_key_and_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    let base =
        NodeConf::new("127.0.0.1:53".parse().unwrap(), 2525).to_toml(&dir.path().join("data"));
    for (entry, says) in [
        ("bl.test=127.0.0.[2..x]", "\"x\""),
        ("bl.test=127.0.0", "four octets"),
        ("bl.test*many", "weight"),
        ("not a zone", "zone"),
    ] {
        std::fs::write(
            &path,
            format!("{base}\n[dnsbl]\nsites = [\"zen.test\", {entry:?}]\n"),
        )
        .unwrap();
        let out = std::process::Command::new(common::node::BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{entry:?} accepted");
        assert!(stderr.contains("dnsbl.sites"), "{entry:?}: {stderr}");
        assert!(stderr.contains(entry), "{entry:?}: {stderr}");
        assert!(stderr.contains(says), "{entry:?}: {stderr}");
    }
    // The good ones pass.
    std::fs::write(
        &path,
        format!(
            "{base}\n[dnsbl]\nsites = [\"zen.test=127.0.0.[2..11]*3\", \"list.dnswl.test=127.0.[0..255].[1..3]*-2\"]\ntimeout = \"1500ms\"\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::node::BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------ the node

/// A node whose resolver is `front`, with `[dnsbl] sites` and extra config.
fn node(front: &Front, sites: &[&str], suspect: &str) -> InProc {
    let sites: Vec<String> = sites.iter().map(|s| format!("{s:?}")).collect();
    InProc::start(&format!(
        "[accept]\ndomains = [\"example.test\"]\n\
         [dns]\nnameservers = [\"{}\"]\ntimeout = \"1s\"\n\
         [dnsbl]\nsites = [{}]\ntimeout = \"{}ms\"\n\
         [throttle]\nmax_connections = 10\n\
         [suspect]\n{suspect}",
        front.addr,
        sites.join(", "),
        TIMEOUT.as_millis(),
    ))
}

const SITES: [&str; 3] = [
    "bl.test=127.0.0.[2..3]*5",
    "bl.test=127.0.0.[4..11]*3",
    "wl.test=127.0.[0..255].[1..3]*-2",
];

/// Connects from `src`; returns the first reply line and how long it took
/// to arrive whole.
fn first_line(src: &str, to: std::net::SocketAddr) -> (String, Duration) {
    use std::io::{BufRead, BufReader};
    let start = Instant::now();
    let s = common::client::tcp_from(src, to);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    let mut r = BufReader::new(s);
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        // A multi-line banner: its last line.
        if !line.starts_with("220-") {
            return (line, start.elapsed());
        }
    }
}

fn explain(node: &InProc, ip: &str) -> serde_json::Value {
    let text = node.http_get(&format!("/explain?ip={ip}"));
    let body = text.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap()
}

#[test]
fn a_listed_client_is_refused_or_slowed_an_unlisted_one_is_not() {
    let front = Front::start();
    let node = node(
        &front,
        &SITES,
        "pregreet_wait = \"300ms\"\ntarpit_rate = 50\ntarpit_time = \"500ms\"\nmax_tarpitted_per_block = 1\n",
    );
    // Listed with a refusing code: 550 5.7.1 at connect, with the reason.
    let (line, _) = first_line("127.5.2.10", node.smtp);
    assert!(
        line.starts_with("550 5.7.1 suspect score 5: listed in bl.test (127.0.0.2)"),
        "{line}"
    );
    // Unlisted: the banner at once, one line.
    let (line, took) = first_line("127.5.3.10", node.smtp);
    assert!(line.starts_with("220 "), "{line}");
    assert!(
        took < Duration::from_millis(250),
        "clean banner took {took:?}"
    );
    // Listed with a suspect code: served, but slowly (pregreet wait and
    // tarpit), with a fifth of the limits.
    let (line, took) = first_line("127.5.1.10", node.smtp);
    assert!(line.starts_with("220 "), "{line}");
    assert!(
        took >= Duration::from_millis(700),
        "suspect banner took {took:?}"
    );
    let e = explain(&node, "127.5.1.99");
    assert_eq!(e["suspect"]["level"], "suspect", "{e}");
    assert_eq!(e["suspect"]["score"], 3, "{e}");
    assert_eq!(e["suspect"]["reasons"][0]["of"], "bl.test", "{e}");
    assert_eq!(e["limits"]["connections"], 2, "{e}");
    // Only one tarpitted session per block: a second one at once is refused.
    let held = common::client::tcp_from("127.5.1.11", node.smtp);
    std::thread::sleep(Duration::from_millis(100));
    let (line, _) = first_line("127.5.1.12", node.smtp);
    assert!(
        line.starts_with("421 4.7.0 Too many suspect sessions"),
        "{line}"
    );
    drop(held);
    // The suspect's lower limit: its 3rd connection in the window is refused.
    std::thread::sleep(Duration::from_millis(300));
    let (line, _) = first_line("127.5.1.13", node.smtp);
    assert!(line.starts_with("421 4.7.0 Too much mail"), "{line}");
    // The clean block still has its 10.
    for _ in 0..5 {
        let (line, _) = first_line("127.5.3.10", node.smtp);
        assert!(line.starts_with("220 "), "{line}");
    }
    // `magicmx explain` prints score and reasons.
    let (ok, text) = node.cli(&["explain", "127.5.1.10"]);
    assert!(ok, "{text}");
    assert!(text.contains("suspect:  score 3 (suspect)"), "{text}");
    assert!(text.contains("+3 listed in bl.test (127.0.0.4)"), "{text}");
    let text = node.http_get("/status");
    let status: serde_json::Value =
        serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    // 127.5.1.0/24 (suspect) and 127.5.2.0/24 (refused).
    assert_eq!(status["suspect_blocks"], 2, "{status}");
    assert_eq!(status["suspects"][0]["block"], "127.5.2.0/24", "{status}");
    assert_eq!(status["dnsbl_zones"][0]["zone"], "bl.test", "{status}");
    let metrics = node.http_get("/metrics");
    assert!(metrics.contains("magicmx_suspect_blocks 2"), "{metrics}");
}

#[test]
fn a_query_refused_answer_or_a_silent_zone_refuses_no_one() {
    let front = Front::start();
    let node = node(&front, &["bl.test*5", "silent.test*5"], "");
    let (line, took) = first_line("127.5.4.10", node.smtp);
    assert!(line.starts_with("220 "), "{line}");
    // At most the timeout for the silent zone (in parallel with bl.test).
    assert!(took < TIMEOUT + Duration::from_millis(250), "took {took:?}");
    let e = explain(&node, "127.5.4.10");
    assert_eq!(e["suspect"]["score"], 0, "{e}");
    assert_eq!(e["suspect"]["level"], "clean", "{e}");
    let metrics = node.http_get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("magicmx_dnsbl_errors_total")
                && l.contains("zone=\"bl.test\"")
                && l.contains("kind=\"refused\"")),
        "{metrics}"
    );
    // And the next connection too: bl.test is paused, silent.test skipped
    // or timing out, never a listing.
    let (line, took) = first_line("127.5.4.11", node.smtp);
    assert!(line.starts_with("220 "), "{line}");
    assert!(took < TIMEOUT + Duration::from_millis(250), "took {took:?}");
}

#[test]
fn an_allowlisted_sender_skips_the_protocol_tests() {
    let front = Front::start();
    // A clean block gets the split banner too here, so pregreeting shows.
    let node = node(&front, &SITES, "pregreet_wait_clean = \"300ms\"\n");
    // A clean client that talks first fails the pregreet test: refused.
    let mut s = common::client::tcp_from("127.5.6.10", node.smtp);
    s.write_all(b"EHLO early.test\r\n").unwrap();
    let mut text = String::new();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.read_to_string(&mut text);
    assert!(text.starts_with("220-"), "{text}");
    assert!(
        text.contains("550 5.7.1 suspect score 5: failed the pregreet test"),
        "{text}"
    );
    assert_eq!(explain(&node, "127.5.6.77")["suspect"]["level"], "refused");
    // The allowlisted one: no test, one banner line at once, served.
    let mut s = common::client::tcp_from("127.5.5.20", node.smtp);
    s.write_all(b"EHLO early.test\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 512];
    let start = Instant::now();
    let mut got = String::new();
    while !got.contains("250 ") && start.elapsed() < Duration::from_secs(3) {
        let n = s.read(&mut buf).unwrap();
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.starts_with("220 "), "{got}");
    assert!(got.contains("250 "), "{got}");
    let e = explain(&node, "127.5.5.20");
    assert_eq!(
        e["suspect"]["level"], "clean",
        "the allowlisting is the address's: {e}"
    );
}

#[test]
fn invalid_recipients_and_traps_make_a_suspect() {
    let front = Front::start();
    let node = node(
        &front,
        &[],
        "invalid_rcpt_threshold = 3\ntrap_recipients = [\"trap@example.test\"]\ntarpit_rate = 0\n",
    );
    let mut c = Client::connect_from("127.5.7.10", node.smtp);
    c.ehlo("client.test");
    c.expect("MAIL FROM:<a@sender.test>", 250);
    for i in 0..2 {
        c.expect(&format!("RCPT TO:<u{i}@elsewhere.test>"), 550);
    }
    assert_eq!(explain(&node, "127.5.7.10")["suspect"]["level"], "clean");
    c.expect("RCPT TO:<u9@elsewhere.test>", 550);
    let e = explain(&node, "127.5.7.10");
    assert_eq!(e["suspect"]["level"], "suspect", "{e}");
    assert_eq!(
        e["suspect"]["reasons"][0]["kind"], "invalid_recipients",
        "{e}"
    );
    // A trap: at once, and never accepted.
    let mut c = Client::connect_from("127.5.8.10", node.smtp);
    c.ehlo("client.test");
    c.expect("MAIL FROM:<a@sender.test>", 250);
    let r = c.cmd("RCPT TO:<Trap@Example.test>");
    assert_eq!(r.code, 550, "{r}");
    let e = explain(&node, "127.5.8.10");
    assert_eq!(e["suspect"]["reasons"][0]["kind"], "trap", "{e}");
    assert_eq!(e["suspect"]["level"], "suspect", "{e}");
}

#[test]
fn python_smtplib_trips_no_test_and_sees_no_delay() {
    let front = Front::start();
    let node = node(&front, &SITES, "");
    let script = r#"
import smtplib, sys, time
t = time.monotonic()
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), source_address=("127.5.9.10", 0), timeout=10)
banner = time.monotonic() - t
s.ehlo("client.test")
s.sendmail("alice@sender.test", ["bob@example.test"], "Subject: hi\r\n\r\nhello\r\n")
s.quit()
print("%.3f %.3f" % (banner, time.monotonic() - t))
"#;
    for _ in 0..2 {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(node.smtp.ip().to_string())
            .arg(node.smtp.port().to_string())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let times: Vec<f64> = text
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect();
        eprintln!(
            "smtplib: banner after {}s, whole transaction {}s",
            times[0], times[1]
        );
        assert!(times[0] < 0.25, "banner after {}s", times[0]);
        assert!(times[1] < 1.0, "transaction took {}s", times[1]);
    }
    let e = explain(&node, "127.5.9.10");
    assert_eq!(e["suspect"]["score"], 0, "{e}");
    assert_eq!(e["suspect"]["reasons"].as_array().unwrap().len(), 0, "{e}");
}
