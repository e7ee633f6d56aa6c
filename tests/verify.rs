//! Recipient verification with the real MX at RCPT (issue 13): an in-process
//! sink stands in for the real MX and refuses unknown users; the node probes
//! it before answering RCPT.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::inproc::InProc;
use common::{simple_message, Client, DnsServer, Rec, Sink};

const KNOWN: &[&str] = &["bob@example.test", "carol@example.test"];

fn node(sink: &Sink, dns: &DnsServer, verify: &str) -> InProc {
    InProc::start_with_smtp(
        "max_errors = 1000\n",
        &format!(
            "[accept]\ndomains = [\"example.test\", \"down.test\"]\n\
             [throttle]\nhold = \"0s\"\n\
             [relay]\nport = {}\ndeny_networks = []\nretry_initial = \"1s\"\nretry_max = \"2s\"\ntls = \"none\"\n\
             [dns]\nnameservers = [\"{}\"]\n\
             [verify]\n{verify}",
            sink.addr.port(),
            dns.addr
        ),
    )
}

fn dns() -> DnsServer {
    DnsServer::start(&[
        Rec::Mx("example.test", 10, "mx.magic.test"),
        Rec::Mx("example.test", 20, "real.example.test"),
        Rec::A("real.example.test", "127.0.0.1"),
        // Nothing listens on 127.0.0.2 at the sink's port: an MX that is down.
        Rec::Mx("down.test", 10, "real.down.test"),
        Rec::A("real.down.test", "127.0.0.2"),
    ])
}

/// A real MX that knows only `KNOWN`, slow (3 s per RCPT) while `slow` is set.
fn real_mx(slow: Arc<AtomicBool>) -> Sink {
    Sink::builder()
        .rcpt_rule(move |a| {
            if slow.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_secs(3));
            }
            (!KNOWN.iter().any(|k| k.eq_ignore_ascii_case(a)))
                .then(|| "550 5.1.1 <".to_string() + a + ">: no such user")
        })
        .start("127.0.0.1", 0)
        .unwrap()
}

fn rcpt(c: &mut Client, a: &str) -> common::Reply {
    c.cmd(&format!("RCPT TO:<{a}>"))
}

#[test]
fn unknown_users_get_550_at_rcpt_and_known_ones_are_relayed() {
    let sink = real_mx(Arc::new(AtomicBool::new(false)));
    let dns = dns();
    let node = node(&sink, &dns, "");
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    c.expect("MAIL FROM:<alice@sender.test>", 250);
    let r = rcpt(&mut c, "nobody@example.test");
    assert_eq!(r.code, 550, "{r}");
    assert!(r.text().starts_with("5.1.1"), "{r}");
    let r = rcpt(&mut c, "bob@example.test");
    assert_eq!(r.code, 250, "{r}");
    // Again: refused from the cache, no second probe.
    assert_eq!(rcpt(&mut c, "NOBODY@example.test").code, 550);
    assert_eq!(sink.rcpt_attempts("nobody@example.test"), 1);
    c.expect("DATA", 354);
    c.send(&common::client::data_transfer(&simple_message(
        "alice@sender.test",
        "bob@example.test",
        "verified",
    )));
    assert_eq!(c.reply().code, 250);
    c.cmd("QUIT");
    let got = sink.wait_messages(1, Duration::from_secs(10));
    assert_eq!(got[0].rcpts, vec!["bob@example.test".to_string()]);
    // No DSN, ever: nothing else reaches the MX (a DSN to alice@sender.test
    // would have nowhere to go but it would be queued: the queue is empty).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sink.messages().len(), 1, "{:?}", sink.messages());
    let (_, list) = node.cli(&["queue", "list"]);
    assert!(list.contains("0 message(s)"), "{list}");
    // The probes used the null sender and never sent DATA.
    assert!(sink
        .all_rcpt_attempts()
        .iter()
        .all(|(a, _)| !a.starts_with("alice")));
}

#[test]
fn a_down_or_slow_mx_gets_450_within_the_timeout_and_nothing_is_cached() {
    let slow = Arc::new(AtomicBool::new(false));
    let sink = real_mx(slow.clone());
    let dns = dns();
    let node = node(&sink, &dns, "timeout = \"1s\"\n");
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    c.expect("MAIL FROM:<alice@sender.test>", 250);
    assert_eq!(rcpt(&mut c, "bob@example.test").code, 250);

    // Down: connection refused.
    let t = Instant::now();
    let r = rcpt(&mut c, "bob@down.test");
    assert_eq!(r.code, 450, "{r}");
    assert!(r.text().starts_with("4.2.0"), "{r}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // Slow: the RCPT reply waits at most the timeout.
    slow.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let r = rcpt(&mut c, "carol@example.test");
    assert_eq!(r.code, 450, "{r}");
    assert!(r.text().starts_with("4.2.0"), "{r}");
    assert!(
        t.elapsed() < Duration::from_millis(2_500),
        "{:?}",
        t.elapsed()
    );
    // A cached good address is still accepted while the MX is slow.
    let t = Instant::now();
    assert_eq!(rcpt(&mut c, "bob@example.test").code, 250);
    assert!(t.elapsed() < Duration::from_millis(500));
    // Nothing was cached for carol: once the MX answers, she is accepted.
    slow.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(3));
    let r = rcpt(&mut c, "carol@example.test");
    assert_eq!(r.code, 250, "{r}");
}

#[test]
fn probes_per_domain_are_bounded() {
    let sink = real_mx(Arc::new(AtomicBool::new(false)));
    let dns = dns();
    let node = node(&sink, &dns, "max_probes_per_domain = 5\n");
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    c.expect("MAIL FROM:<spammer@sender.test>", 250);
    let mut codes = Vec::new();
    for i in 0..40 {
        codes.push(rcpt(&mut c, &format!("guess{i}@example.test")).code);
    }
    let probes = sink.all_rcpt_attempts().len();
    assert!(probes <= 5, "the real MX saw {probes} probes");
    assert!(codes.iter().all(|&c| c == 550 || c == 450), "{codes:?}");
    assert!(codes.contains(&550) && codes.contains(&450), "{codes:?}");
    // One probe connection served them (RCPTs of one transaction).
    assert_eq!(sink.connections().len(), 1, "{:?}", sink.connections());
}

#[test]
fn an_accept_all_domain_is_detected_with_one_probe() {
    let sink = Sink::start("127.0.0.1");
    let dns = dns();
    let node = node(&sink, &dns, "");
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    c.expect("MAIL FROM:<alice@sender.test>", 250);
    for i in 0..10 {
        assert_eq!(rcpt(&mut c, &format!("anyone{i}@example.test")).code, 250);
    }
    let probes = sink.all_rcpt_attempts();
    assert_eq!(probes.len(), 1, "{probes:?}");
    assert!(probes[0].0.starts_with("magicmx-verify-"), "{probes:?}");
    c.expect("DATA", 354);
    c.send(&common::client::data_transfer(&simple_message(
        "alice@sender.test",
        "anyone0@example.test",
        "accept-all",
    )));
    assert_eq!(c.reply().code, 250);
    let got = sink.wait_messages(1, Duration::from_secs(10));
    assert_eq!(got[0].rcpts.len(), 10);
}

/// A `5.1.1` the real MX gives at relay time (after a probe had said yes)
/// still makes a DSN, and also records a negative entry: the next RCPT for
/// that address is refused without a probe.
#[test]
fn a_relay_time_unknown_user_is_recorded() {
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    let sink = Sink::builder()
        .rcpt_rule(move |a| {
            if a.starts_with("magicmx-verify-") {
                return Some("550 5.1.1 no such user".into());
            }
            // Known at the probe, gone by the time the message is relayed.
            (counter.fetch_add(1, Ordering::SeqCst) > 0).then(|| "550 5.1.1 gone".to_string())
        })
        .start("127.0.0.1", 0)
        .unwrap();
    let dns = dns();
    let node = node(&sink, &dns, "");
    let r = common::send_mail(
        node.smtp,
        "alice@sender.test",
        &["leaver@example.test"],
        &simple_message("alice@sender.test", "leaver@example.test", "late"),
    );
    assert_eq!(r.code, 250, "{r}");
    assert!(
        common::wait_until(Duration::from_secs(10), || seen.load(Ordering::SeqCst) >= 2),
        "never relayed"
    );
    std::thread::sleep(Duration::from_millis(500));
    let before = sink.all_rcpt_attempts().len();
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    c.expect("MAIL FROM:<alice@sender.test>", 250);
    let r = rcpt(&mut c, "leaver@example.test");
    assert_eq!(r.code, 550, "{r}");
    assert!(r.text().starts_with("5.1.1"), "{r}");
    assert_eq!(sink.all_rcpt_attempts().len(), before, "probed again");
}

/// With verification off, unknown users are accepted and then refused by
/// the real MX with `5.1.1` at relay time: each still makes a DSN, and each
/// counts as an invalid recipient of the client's block, which becomes a
/// suspect at `invalid_rcpt_threshold`; another block is untouched.
#[test]
fn relay_time_unknown_users_count_for_the_block() {
    let sink = real_mx(Arc::new(AtomicBool::new(false)));
    let dns = dns();
    let node = node(
        &sink,
        &dns,
        "enabled = false\n[suspect]\ninvalid_rcpt_threshold = 2\ntarpit_rate = 0\n",
    );
    let explain = |ip: &str| -> serde_json::Value {
        let text = node.http_get(&format!("/explain?ip={ip}"));
        serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap()
    };
    for i in 0..2 {
        let mut c = Client::connect_from("127.6.1.10", node.smtp);
        c.ehlo("client.test");
        let to = format!("nobody{i}@example.test");
        let r = common::client::transaction(
            &mut c,
            "alice@sender.test",
            &[&to],
            &simple_message("alice@sender.test", &to, "unknown"),
        );
        assert_eq!(r.code, 250, "accepted without verification: {r}");
    }
    let suspect = common::wait_until(Duration::from_secs(10), || {
        explain("127.6.1.99")["suspect"]["level"] == "suspect"
    });
    let e = explain("127.6.1.99");
    assert!(suspect, "the block did not become a suspect: {e}");
    assert_eq!(
        e["suspect"]["reasons"][0]["kind"], "invalid_recipients",
        "{e}"
    );
    assert_eq!(explain("127.6.2.10")["suspect"]["level"], "clean");
    // Both attempts were relayed and refused by the real MX.
    assert_eq!(sink.rcpt_attempts("nobody0@example.test"), 1);
    assert_eq!(sink.rcpt_attempts("nobody1@example.test"), 1);
}

/// A dictionary attack from one block: up to 10,000 RCPTs to random local
/// parts, over as many sessions as the node allows. The real MX sees at
/// most `max_probes_per_domain` probes (the test runs well within the
/// minute), the unknown users make the block a suspect, and another block
/// is not touched.
#[test]
fn a_dictionary_attack_costs_the_real_mx_little_and_makes_a_suspect() {
    use std::io::{BufRead, BufReader, Write};
    let sink = real_mx(Arc::new(AtomicBool::new(false)));
    let dns = dns();
    let node = node(&sink, &dns, "max_probes_per_domain = 60\n");
    let started = Instant::now();
    let (mut sent, mut sessions, mut unknown) = (0, 0, 0);
    'attack: while sent < 10_000 && started.elapsed() < Duration::from_secs(40) {
        sessions += 1;
        let stream = common::client::tcp_from("127.0.9.1", node.smtp);
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        let mut reply = || -> String {
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return String::new();
                }
                if line.as_bytes().get(3) != Some(&b'-') {
                    return line;
                }
            }
        };
        let banner = reply();
        if !banner.starts_with("220") {
            // Refused at connect: the attack is over.
            break;
        }
        let _ = w.write_all(b"EHLO bot.test\r\n");
        reply();
        let _ = w.write_all(b"MAIL FROM:<x@bot.test>\r\n");
        let mail = reply();
        assert!(mail.starts_with("250"), "MAIL: {mail:?}");
        for _ in 0..90 {
            let _ = w.write_all(
                format!("RCPT TO:<{}@example.test>\r\n", magicmx::admin::new_token()).as_bytes(),
            );
            sent += 1;
            let line = reply();
            if line.starts_with("550 5.1.1") {
                unknown += 1;
            }
            if line.is_empty() || line.starts_with("421") {
                continue 'attack;
            }
            if sent >= 10_000 {
                break 'attack;
            }
        }
        let _ = w.write_all(b"QUIT\r\n");
    }
    let probes = sink.all_rcpt_attempts().len();
    eprintln!("{sent} RCPTs in {sessions} sessions, {unknown} unknown users, {probes} probes");
    assert!(
        probes <= 60,
        "the real MX saw {probes} probes for {sent} RCPTs"
    );
    assert!(unknown >= 5, "only {unknown} unknown users reported");
    assert!(
        sent < 10_000,
        "the node let {sent} RCPTs through without refusing the block"
    );
    let now = magicmx::clock::system_ms();
    let attacker = node
        .throttle
        .suspect_verdict("127.0.9.1".parse().unwrap(), now);
    assert!(
        attacker.is_suspect(),
        "after {sent} RCPTs in {sessions} sessions the block is not a suspect: {attacker:?}"
    );
    let other = node
        .throttle
        .suspect_verdict("127.0.10.1".parse().unwrap(), now);
    assert!(!other.is_suspect(), "{other:?}");
}
