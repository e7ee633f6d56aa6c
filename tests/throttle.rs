//! Throttling end to end: per-block limits at connect and RCPT, the penalty
//! box (polite refusals, then silence), trusted networks, hold and
//! quarantine, `magicmx explain`, and the refusals in `/metrics`.
//!
//! The node runs in-process (its own runtime on a thread) so that a test can
//! push peers' counts through `Throttle::merge`, the interface gossip uses.
//! Clients bind to different `127.a.b.c` addresses to be different blocks.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::inproc::InProc;
use common::{simple_message, wait_until, Client, DnsServer, Next, Rec, Sink};
use magicmx::throttle::{now_ms, Counts};

/// Connects from `ip` and returns what came first: a reply or a close.
fn connect_from(ip: &str, server: SocketAddr) -> Next {
    let mut conn = common::client::tcp_from(ip, server);
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 512];
    match conn.read(&mut buf) {
        Ok(0) | Err(_) => Next::Closed,
        Ok(n) => {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let code = text[..3].parse().unwrap_or(0);
            let _ = conn.write_all(b"QUIT\r\n");
            Next::Reply(common::Reply {
                code,
                lines: vec![text[4..].trim_end().to_string()],
            })
        }
    }
}

fn code(n: &Next) -> u16 {
    match n {
        Next::Reply(r) => r.code,
        _ => 0,
    }
}

const LIMITS: &str = "[accept]\ndomains = [\"example.test\"]\n\
    [throttle]\nmax_connections = 3\nmax_messages = 100\nmax_recipients = 4\n\
    window = \"2s\"\nepoch = \"1s\"\npenalty = \"3s\"\nmax_penalty = \"12s\"\npolite_refusals = 2\nhold = \"0s\"\n\
    [trust]\nnetworks = [\"127.9.0.0/16\"]\n";

#[test]
fn blocks_are_throttled_penalised_and_released() {
    // Virtual time: the penalty and the window pass when the test says so.
    let (node, clock) = InProc::start_manual("", LIMITS);

    // Block 127.1.1.0/24: three connections are fine...
    for i in 1..=3 {
        let n = connect_from(&format!("127.1.1.{i}"), node.smtp);
        assert_eq!(code(&n), 220, "connection {i}: {n:?}");
    }
    // ...the fourth passes the limit: 421 4.7.0 with the reason...
    let n = connect_from("127.1.1.4", node.smtp);
    match &n {
        Next::Reply(r) => {
            assert_eq!(r.code, 421, "{r}");
            assert!(r.text().starts_with("4.7.0"), "{r}");
            assert!(r.text().contains("too_many_connections"), "{r}");
        }
        other => panic!("expected 421, got {other:?}"),
    }
    // ...the next one is still polite (polite_refusals = 2) and names the penalty...
    let n = connect_from("127.1.1.5", node.smtp);
    assert_eq!(code(&n), 421, "{n:?}");
    // ...after that the node closes without a banner.
    for i in 6..=8 {
        let n = connect_from(&format!("127.1.1.{i}"), node.smtp);
        assert!(
            matches!(n, Next::Closed),
            "connection {i} should be closed silently: {n:?}"
        );
    }

    // Another block is not affected.
    let n = connect_from("127.2.2.1", node.smtp);
    assert_eq!(code(&n), 220, "{n:?}");

    // A trusted network is never refused, however much it connects.
    for i in 0..20 {
        let n = connect_from(&format!("127.9.{}.{}", i % 3, i + 1), node.smtp);
        assert_eq!(code(&n), 220, "trusted connection {i}: {n:?}");
    }

    // explain says why.
    let (ok, text) = node.cli(&["explain", "127.1.1.77"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("refused") && text.contains("penalty box"),
        "{text}"
    );
    let (ok, text) = node.cli(&["explain", "127.9.9.9"]);
    assert!(ok && text.contains("trusted"), "{text}");

    // /status lists the hot block with its penalty.
    let status = node.http_get("/status");
    assert!(status.contains("127.1.1.0/24"), "{status}");

    // After the penalty (3 s) the block is accepted again (the window is 2 s).
    clock.advance(Duration::from_millis(3300));
    let n = connect_from("127.1.1.9", node.smtp);
    assert_eq!(code(&n), 220, "after the penalty: {n:?}");

    // Recipients: a fresh block gets 4 recipients, the 5th is 450 4.7.1.
    let mut c = Client::connect_from("127.3.3.1", node.smtp);
    c.ehlo("client.test");
    c.expect("MAIL FROM:<a@sender.test>", 250);
    for i in 1..=4 {
        c.expect(&format!("RCPT TO:<u{i}@example.test>"), 250);
    }
    let r = c.cmd("RCPT TO:<u5@example.test>");
    assert_eq!(r.code, 450, "{r}");
    assert!(r.text().starts_with("4.7.1"), "{r}");
    assert!(r.text().contains("too_many_recipients"), "{r}");
    // And another block still gets its recipients.
    let mut c2 = Client::connect_from("127.4.4.1", node.smtp);
    c2.ehlo("client.test");
    c2.expect("MAIL FROM:<a@sender.test>", 250);
    c2.expect("RCPT TO:<u1@example.test>", 250);

    // /metrics shows the refusals by reason.
    let metrics = node.http_get("/metrics");
    for want in [
        r#"magicmx_throttle_refusals_total{stage="connect",reason="too_many_connections"}"#,
        r#"magicmx_throttle_refusals_total{stage="connect",reason="penalty_box"}"#,
        r#"magicmx_throttle_drops_total{stage="connect",reason="penalty_box"}"#,
        r#"magicmx_throttle_refusals_total{stage="rcpt",reason="too_many_recipients"}"#,
        "magicmx_throttle_tracked_blocks",
    ] {
        assert!(metrics.contains(want), "/metrics lacks {want}:\n{metrics}");
    }
}

#[test]
fn mail_from_a_block_that_goes_over_during_the_hold_is_quarantined() {
    let sink = Sink::start("127.0.0.1");
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "mx1.magic.test"),
        Rec::Mx("example.test", 20, "real.example.test"),
        Rec::A("real.example.test", "127.0.0.1"),
        Rec::Mx("sender.test", 10, "real.example.test"),
    ]);
    let tail = format!(
        "[accept]\ndomains = [\"example.test\"]\n\
         [throttle]\nmax_connections = 10\nmax_messages = 10\nmax_recipients = 10\nwindow = \"60s\"\nepoch = \"1s\"\nhold = \"2s\"\n\
         [relay]\nport = {}\ndeny_networks = []\nretry_initial = \"1s\"\nretry_max = \"2s\"\ntls = \"none\"\n\
         [dns]\nnameservers = [\"{}\"]\n",
        sink.addr.port(),
        dns.addr
    );
    let node = InProc::start(&tail);

    // A message from block 127.5.5.0/24 is accepted and held.
    let msg = simple_message("alice@sender.test", "bob@example.test", "held");
    let r = send_from(
        "127.5.5.5",
        node.smtp,
        "alice@sender.test",
        "bob@example.test",
        &msg,
    );
    assert_eq!(r.code, 250, "{r}");
    let id = r.text().rsplit(' ').next().unwrap().to_string();

    // During the hold, peers report a flood from the same block. One peer
    // alone is capped at half the limit, so two peers report.
    let block = node.throttle.block_of("127.5.5.5".parse().unwrap());
    let epoch = node.throttle.epoch_of(now_ms());
    let flood = Counts {
        connections: 50,
        messages: 50,
        recipients: 50,
    };
    for peer in ["peer-a", "peer-b"] {
        let origin = node.throttle.origin(peer);
        node.throttle.merge(origin, block, epoch, flood, now_ms());
    }
    assert!(node
        .throttle
        .over_limit("127.5.5.5".parse().unwrap(), now_ms())
        .is_some());

    // At release it goes to quarantine: listed, not delivered, no DSN.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let (_, text) = node.cli(&["queue", "quarantine", "list"]);
            text.contains(&id)
        }),
        "message {id} never showed up in quarantine"
    );
    // The queue holds the quarantined message alone (a DSN would be there
    // until sent): nothing more can reach the sink.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let (_, text) = node.cli(&["queue", "list"]);
            let rows = common::node::queue_rows(&text);
            rows.len() == 1 && rows[0].contains(&id) && rows[0].contains("[quarantined]")
        }),
        "the queue holds more than the quarantined message:\n{}",
        node.cli(&["queue", "list"]).1
    );
    assert!(
        sink.transactions().is_empty(),
        "quarantined mail (or a DSN) was sent: {:?}",
        sink.transactions()
    );

    // The operator releases it; it is delivered (the release skips the check).
    let (ok, text) = node.cli(&["queue", "quarantine", "release", &id]);
    assert!(ok, "{text}");
    assert!(
        wait_until(Duration::from_secs(10), || sink.transactions().len() == 1),
        "released message not delivered"
    );
    let t = &sink.transactions()[0];
    assert_eq!(t.rcpts, vec!["bob@example.test".to_string()]);
    assert!(wait_until(Duration::from_secs(5), || {
        let (_, text) = node.cli(&["queue", "list"]);
        text.contains("0 message(s)")
    }));
    // A second message from a quiet block sails through after the hold.
    let msg = simple_message("carol@sender.test", "bob@example.test", "fine");
    let r = send_from(
        "127.6.6.6",
        node.smtp,
        "carol@sender.test",
        "bob@example.test",
        &msg,
    );
    assert_eq!(r.code, 250, "{r}");
    assert!(wait_until(Duration::from_secs(10), || sink
        .transactions()
        .len()
        == 2));
    // Deleting from quarantine: unknown ids are refused with a clear error.
    let (ok, text) = node.cli(&["queue", "quarantine", "delete", "NOSUCHID"]);
    assert!(
        !ok && text.contains("no such quarantined message"),
        "{text}"
    );
}

/// One transaction from a chosen source address.
fn send_from(ip: &str, server: SocketAddr, from: &str, to: &str, msg: &[u8]) -> common::Reply {
    let mut c = Client::connect_from(ip, server);
    c.ehlo("client.test");
    common::client::transaction(&mut c, from, &[to], msg)
}

/// Issue 9, a hostile peer: peers gossiping far more blocks than the table
/// holds never make this node's own blocks uncounted. Each peer creates at
/// most its share of the table; a new local block evicts a quiet peer block;
/// a local block over its limit is still refused.
#[test]
fn a_flooding_peer_cannot_make_local_blocks_uncounted() {
    let node = InProc::start(
        "[accept]\ndomains = [\"example.test\"]\n\
         [throttle]\nmax_connections = 3\nwindow = \"60s\"\nepoch = \"1s\"\nmax_tracked_blocks = 100\nhold = \"0s\"\n",
    );
    let one = Counts {
        connections: 1,
        messages: 0,
        recipients: 0,
    };
    // Ten peers, each with a thousand blocks (ten times the whole table).
    for p in 0..10u8 {
        let origin = node.throttle.origin(&format!("peer-{p}"));
        let epoch = node.throttle.epoch_of(now_ms());
        for i in 0..1000u32 {
            let ip = std::net::IpAddr::from([10 + p, (i / 256) as u8, (i % 256) as u8, 1]);
            let block = magicmx::throttle::block_of(ip, 24, 48);
            node.throttle.merge(origin, block, epoch, one, now_ms());
        }
    }
    assert!(
        node.throttle.tracked() <= 100,
        "{}",
        node.throttle.tracked()
    );
    // Thirty new local blocks: every one is counted.
    for b in 1..=30 {
        let ip = format!("127.20.{b}.1");
        assert_eq!(code(&connect_from(&ip, node.smtp)), 220, "{ip}");
        let block = node.throttle.block_of(ip.parse().unwrap());
        assert_eq!(
            node.throttle.status(block, now_ms()).counts.connections,
            1,
            "local block {block} is uncounted after a peer flood"
        );
    }
    // And throttled: the fourth connection from one of them is refused.
    for i in 2..=3 {
        assert_eq!(
            code(&connect_from(&format!("127.20.1.{i}"), node.smtp)),
            220
        );
    }
    assert_eq!(code(&connect_from("127.20.1.4", node.smtp)), 421);
}
