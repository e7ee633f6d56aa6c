//! Greylisting (`[greylist]`) end to end: a node in process, a real DNS
//! server (magicmx::demo::dns) listing a suspect block in `bl.test` and
//! serving the MX of `example.test` (a sink standing in for the real MX),
//! clients on real TCP from distinct 127.6.x.y blocks. The delay is 1s.

mod common;

use std::time::{Duration, Instant};

use common::client::{data_transfer, simple_message};
use common::inproc::InProc;
use common::{Client, DnsServer, Rec, Sink};

const DELAY: Duration = Duration::from_secs(1);

struct World {
    _dns: DnsServer,
    sink: Sink,
    node: InProc,
}

fn world(mode: &str) -> World {
    let sink = Sink::start("127.0.0.1");
    let dns = DnsServer::start(&[
        // RFC 5782 test entries (the zone's health check).
        Rec::A("2.0.0.127.bl.test", "127.0.0.2"),
        // 127.6.1.0/24 is listed: a suspect (score 3).
        Rec::A("10.1.6.127.bl.test", "127.0.0.4"),
        Rec::A("11.1.6.127.bl.test", "127.0.0.4"),
        Rec::Mx("example.test", 10, "real.example.test"),
        Rec::A("real.example.test", "127.0.0.1"),
        // SPF of pool.test authorises two /24s: one pool.
        Rec::Txt("pool.test", "v=spf1 ip4:127.6.7.0/24 ip4:127.6.8.0/24 -all"),
    ]);
    let node = InProc::start(&format!(
        "[accept]\ndomains = [\"example.test\"]\n\
         [dns]\nnameservers = [\"{}\"]\ntimeout = \"1s\"\n\
         [dnsbl]\nsites = [\"bl.test=127.0.0.[2..11]*3\"]\ntimeout = \"300ms\"\n\
         [relay]\nport = {}\ndeny_networks = []\ntls = \"none\"\nretry_initial = \"1s\"\n\
         [throttle]\nhold = \"100ms\"\n\
         [suspect]\npregreet_wait = \"0s\"\ntarpit_rate = 0\n\
         # One invalid recipient would show: a 451 must not count as one.\n\
         invalid_rcpt_threshold = 1\n\
         [greylist]\nenabled = true\nmode = \"{mode}\"\ndelay = \"1s\"\n",
        dns.addr,
        sink.addr.port(),
    ));
    World {
        _dns: dns,
        sink,
        node,
    }
}

/// One session from `src`: EHLO, MAIL, RCPT; with a 250 to RCPT also the
/// message. Returns the RCPT reply.
fn attempt(w: &World, src: &str, from: &str, rcpt: &str, subject: &str) -> String {
    let mut c = Client::connect_from(src, w.node.smtp);
    c.ehlo("mta.sender.test");
    c.expect(&format!("MAIL FROM:<{from}>"), 250);
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
    if r.code == 250 {
        c.expect("DATA", 354);
        c.send(&data_transfer(&simple_message(from, rcpt, subject)));
        assert_eq!(c.reply().code, 250);
    }
    c.cmd("QUIT");
    format!("{} {}", r.code, r.text())
}

fn explain(node: &InProc, ip: &str) -> serde_json::Value {
    let text = node.http_get(&format!("/explain?ip={ip}"));
    serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap()
}

fn metric(node: &InProc, name: &str) -> f64 {
    let text = node.http_get("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn suspects_are_greylisted_and_their_retry_after_the_delay_is_relayed() {
    let w = world("suspects");
    // A clean, never-seen block: not greylisted.
    assert_eq!(explain(&w.node, "127.6.3.10")["greylist"], "not_suspect");
    let r = attempt(
        &w,
        "127.6.3.10",
        "ham@clean.test",
        "user@example.test",
        "clean",
    );
    assert!(r.starts_with("250"), "{r}");
    // The listed block (looked up at connect): a suspect, greylisted.
    let first = Instant::now();
    let r = attempt(
        &w,
        "127.6.1.10",
        "bob@sender.test",
        "user@example.test",
        "grey",
    );
    assert!(r.starts_with("451 4.7.1"), "{r}");
    assert!(
        r.contains("Greylisted, please try again in 1 seconds"),
        "{r}"
    );
    let e = explain(&w.node, "127.6.1.10");
    assert_eq!(e["suspect"]["score"], 3, "{e}");
    assert_eq!(e["greylist"], "suspect", "{e}");
    // A retry too early (with a +ext the sender changes): 451 again.
    let r = attempt(
        &w,
        "127.6.1.10",
        "Bob+2@Sender.TEST",
        "user@example.test",
        "grey",
    );
    assert!(r.starts_with("451 4.7.1"), "{r}");
    assert!(r.contains("retried too early"), "{r}");
    // The 451s did not count as invalid recipients (threshold 1 here).
    let e = explain(&w.node, "127.6.1.10");
    let reasons = e["suspect"]["reasons"].as_array().unwrap();
    assert!(
        !reasons.iter().any(|r| r["kind"] == "invalid_recipients"),
        "{e}"
    );
    assert_eq!(e["suspect"]["score"], 3, "{e}");
    // After the delay, the retry from another address of the pool passes
    // and the message reaches the real MX.
    std::thread::sleep(DELAY.saturating_sub(first.elapsed()) + Duration::from_millis(100));
    let r = attempt(
        &w,
        "127.6.1.11",
        "bob@sender.test",
        "user@example.test",
        "grey",
    );
    assert!(r.starts_with("250"), "{r}");
    let got = w.sink.wait_messages(2, Duration::from_secs(15));
    assert!(
        got.iter()
            .any(|t| t.mail_from == "bob@sender.test" && t.text().contains("Subject: grey")),
        "{got:?}"
    );
    // The pass lowered the block's suspicion and the pool passed.
    let e = explain(&w.node, "127.6.1.10");
    assert_eq!(e["suspect"]["score"], 1, "{e}");
    assert_eq!(e["greylist"], "pool_passed", "{e}");
    let r = attempt(&w, "127.6.1.10", "eve@other.test", "user@example.test", "x");
    assert!(r.starts_with("250"), "{r}");
    assert!(metric(&w.node, "magicmx_greylist_greylisted_total") >= 1.0);
    assert!(metric(&w.node, "magicmx_greylist_too_early_total") >= 1.0);
    assert!(metric(&w.node, "magicmx_greylist_passed_total") >= 1.0);
    let (ok, text) = w.node.cli(&["explain", "127.6.1.10"]);
    assert!(ok, "{text}");
    assert!(text.contains("greylist: no (the pool passed"), "{text}");
    let text = w.node.http_get("/status");
    let status: serde_json::Value =
        serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(status["greylist"]["enabled"], true, "{status}");
    assert_eq!(status["greylist"]["mode"], "suspects", "{status}");
    assert_eq!(status["greylist"]["passed_pools"], 2, "{status}");
}

#[test]
fn unknown_mode_greylists_a_never_seen_block_until_it_passed() {
    let w = world("unknown");
    assert_eq!(explain(&w.node, "127.6.5.10")["greylist"], "unknown");
    let first = Instant::now();
    let r = attempt(&w, "127.6.5.10", "", "user@example.test", "bounce");
    assert!(r.starts_with("451 4.7.1"), "{r}");
    std::thread::sleep(DELAY.saturating_sub(first.elapsed()) + Duration::from_millis(100));
    // The null sender is keyed by its HELO: the same HELO passes.
    let r = attempt(&w, "127.6.5.10", "", "user@example.test", "bounce");
    assert!(r.starts_with("250"), "{r}");
    // After one passed delivery, the block is not greylisted.
    assert_eq!(explain(&w.node, "127.6.5.10")["greylist"], "pool_passed");
    let r = attempt(
        &w,
        "127.6.5.12",
        "new@sender.test",
        "other@example.test",
        "y",
    );
    assert!(r.starts_with("250"), "{r}");
    let got = w.sink.wait_messages(2, Duration::from_secs(15));
    assert_eq!(got.len(), 2, "{got:?}");
}

#[test]
fn an_spf_pool_retrying_from_another_block_passes_without_spf_it_does_not() {
    let w = world("unknown");
    let first = Instant::now();
    let r = attempt(
        &w,
        "127.6.7.10",
        "bob@pool.test",
        "user@example.test",
        "pool",
    );
    assert!(r.starts_with("451 4.7.1"), "{r}");
    let r = attempt(
        &w,
        "127.6.9.10",
        "bob@nospf.test",
        "user@example.test",
        "nospf",
    );
    assert!(r.starts_with("451 4.7.1"), "{r}");
    std::thread::sleep(DELAY.saturating_sub(first.elapsed()) + Duration::from_millis(100));
    // The retry comes from the other /24 SPF authorises: the same pool.
    let r = attempt(
        &w,
        "127.6.8.10",
        "bob@pool.test",
        "user@example.test",
        "pool",
    );
    assert!(r.starts_with("250"), "{r}");
    // Without SPF the pool is the block: another /24 is a first attempt.
    let r = attempt(
        &w,
        "127.6.10.10",
        "bob@nospf.test",
        "user@example.test",
        "nospf",
    );
    assert!(r.starts_with("451 4.7.1"), "{r}");
    assert!(r.contains("please try again in 1 seconds"), "{r}");
    let got = w.sink.wait_messages(1, Duration::from_secs(15));
    assert!(
        got.iter().any(|t| t.mail_from == "bob@pool.test"),
        "{got:?}"
    );
    assert!(
        !got.iter().any(|t| t.mail_from == "bob@nospf.test"),
        "{got:?}"
    );
}
