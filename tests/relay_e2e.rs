//! End to end: a client sends to the node, the node relays to the domain's
//! real MX (a sink), found through a real DNS server, skipping magic hosts.
//! Covers the accept policy, the body passing through byte for byte, crash
//! safety of acknowledged mail, retries and delivery status notifications.

mod common;

use std::time::Duration;

use common::client::{data_transfer, transaction};
use common::{
    bare_cr_lf, count_header, send_mail, simple_message, split_first_header, Client, DnsServer,
    Node, NodeConf, Rec, Sink, Txn,
};

const DELIVERY: Duration = Duration::from_secs(15);

/// A message meant to trip a relay that does not pass data through
/// untouched: lines made of dots, dots at line starts, empty lines, 8-bit
/// bytes (UTF-8 and not), a long line, trailing spaces and tabs, a header
/// look-alike in the body.
fn tricky_message() -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(
        b"From: Alice <alice@sender.test>\r\n\
          To: <user@example.test>\r\n\
          Subject: =?utf-8?q?caf=C3=A9?= tricky\r\n\
          Message-ID: <tricky-1@sender.test>\r\n\
          Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\
          MIME-Version: 1.0\r\n\
          Content-Type: text/plain; charset=utf-8\r\n\
          Content-Transfer-Encoding: 8bit\r\n\
          X-Folded: first part\r\n\
          \tsecond part\r\n\
          \r\n",
    );
    m.extend_from_slice(b".\r\n");
    m.extend_from_slice(b"..\r\n");
    m.extend_from_slice(b".leading dot\r\n");
    m.extend_from_slice(b"...three dots\r\n");
    m.extend_from_slice(b" . space then dot\r\n");
    m.extend_from_slice(b"\r\n\r\n");
    m.extend_from_slice("caf\u{e9} na\u{ef}ve \u{20ac} \u{1f600}\r\n".as_bytes());
    m.extend_from_slice(b"latin-1 \xe9\xe8\xff\xfe bytes\r\n");
    let long: String = (0..980).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    m.extend_from_slice(long.as_bytes());
    m.extend_from_slice(b"\r\n");
    m.extend_from_slice(b"trailing spaces   \r\n\ttab first\r\nFrom the start of a line\r\n");
    m.extend_from_slice(b"Received: not a header, in the body\r\n");
    m.extend_from_slice(b"\r\n.\r\n.end\r\n");
    m
}

/// Panics with the first difference between two byte strings.
fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let ctx = |b: &[u8]| {
        String::from_utf8_lossy(&b[at.saturating_sub(40)..(at + 40).min(b.len())]).into_owned()
    };
    panic!(
        "{what}: differs at byte {at} (got {} bytes, want {})\n got: {:?}\nwant: {:?}",
        got.len(),
        want.len(),
        ctx(got),
        ctx(want)
    );
}

/// Checks that `txn` carries `original` with exactly one header field added
/// at the top, a `Received:`, and nothing else changed.
fn assert_one_received_then(txn: &Txn, original: &[u8]) {
    let (first, rest) = split_first_header(&txn.data);
    assert!(
        first.len() > 9 && first[..9].eq_ignore_ascii_case(b"Received:"),
        "first header is not the added Received: {:?}",
        String::from_utf8_lossy(first)
    );
    assert_bytes_eq(rest, original, "data after the added Received: header");
    assert_eq!(
        count_header(&txn.data, "received"),
        1,
        "exactly one Received: header expected in {:?}",
        txn
    );
    assert_eq!(
        bare_cr_lf(&txn.data),
        Vec::<usize>::new(),
        "bare CR/LF sent to the real MX"
    );
}

fn has_message(t: &[Txn], rcpt: &str) -> bool {
    t.iter()
        .any(|t| t.accepted() && t.rcpts.iter().any(|r| r == rcpt))
}

#[test]
fn relays_to_real_mx_skipping_magic_hosts_and_keeps_the_body() {
    let (real, magic) = Sink::pair_same_port(
        ("127.0.0.1", Sink::builder()),
        ("127.0.0.2", Sink::builder()),
    );
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "mx1.magic.test"),
        Rec::Mx("example.test", 20, "real.example.test"),
        Rec::A("mx1.magic.test", "127.0.0.2"),
        Rec::A("real.example.test", "127.0.0.1"),
    ]);
    let node = Node::start(NodeConf::new(dns.addr, real.addr.port()));

    let original = tricky_message();
    let mut c = Client::connect(node.smtp_addr);
    let ehlo = c.ehlo("client.example.net");
    let body_param = if ehlo.has_extension("8BITMIME") {
        " BODY=8BITMIME"
    } else {
        ""
    };
    c.expect(&format!("MAIL FROM:<alice@sender.test>{body_param}"), 250);
    c.expect("RCPT TO:<user@example.test>", 250);
    c.expect("DATA", 354);
    c.send(&data_transfer(&original));
    let r = c.reply();
    assert_eq!(r.code, 250, "end of data: {r}");
    c.expect("QUIT", 221);

    let msgs = real.wait_messages(1, DELIVERY);
    let m = &msgs[0];
    assert_eq!(m.mail_from, "alice@sender.test");
    assert_eq!(m.rcpts, vec!["user@example.test"]);
    assert_one_received_then(m, &original);

    // The node says what happened, with the queue id.
    node.wait_log(&["queue_id=", "delivered"], Duration::from_secs(5));

    node.wait_queue_empty(DELIVERY);
    assert_eq!(real.messages().len(), 1, "delivered more than once");
    assert!(
        magic.connections().is_empty(),
        "the magic MX host was contacted: {:?}",
        magic.connections()
    );
}

#[test]
fn accepts_only_listed_or_delegated_domains() {
    let (real, magic) = Sink::pair_same_port(
        ("127.0.0.1", Sink::builder()),
        ("127.0.0.2", Sink::builder()),
    );
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "real.example.test"),
        Rec::A("real.example.test", "127.0.0.1"),
        Rec::Mx("delegated.test", 10, "mx2.magic.test"),
        Rec::Mx("delegated.test", 20, "real.delegated.test"),
        Rec::A("mx2.magic.test", "127.0.0.2"),
        Rec::A("real.delegated.test", "127.0.0.1"),
        Rec::Mx("elsewhere.test", 10, "mx.elsewhere.test"),
        Rec::A("mx.elsewhere.test", "127.0.0.1"),
        Rec::A("nomx.test", "127.0.0.1"),
    ]);
    let refused = |r: &common::Reply, what: &str| {
        assert_eq!(r.code, 550, "{what}: {r}");
        assert!(r.text().contains("5.7.1"), "{what}: no 5.7.1 in {r}");
    };

    // Without delegation: only [accept] domains.
    let plain = Node::start(NodeConf::new(dns.addr, real.addr.port()));
    let mut c = Client::connect(plain.smtp_addr);
    c.ehlo("client.example.net");
    c.expect("MAIL FROM:<alice@sender.test>", 250);
    refused(&c.cmd("RCPT TO:<x@elsewhere.test>"), "unlisted domain");
    refused(
        &c.cmd("RCPT TO:<y@delegated.test>"),
        "magic MX but mx_delegation = false",
    );
    c.expect("RCPT TO:<user@example.test>", 250);
    c.expect("RCPT TO:<Other@EXAMPLE.TEST>", 250);
    c.expect("RSET", 250);
    c.expect("QUIT", 221);
    drop(plain);

    // With delegation: also domains whose MX set has a magic host.
    let delegating = Node::start(NodeConf::new(dns.addr, real.addr.port()).mx_delegation(true));
    let mut c = Client::connect(delegating.smtp_addr);
    c.ehlo("client.example.net");
    c.expect("MAIL FROM:<alice@sender.test>", 250);
    refused(&c.cmd("RCPT TO:<x@elsewhere.test>"), "non-magic MX");
    let r = c.cmd("RCPT TO:<z@ghost.test>");
    assert_eq!(r.class(), 5, "domain without DNS records: {r}");
    let r = c.cmd("RCPT TO:<w@nomx.test>");
    assert_eq!(r.class(), 5, "domain without MX: {r}");
    c.expect("RCPT TO:<y@delegated.test>", 250);
    c.expect("DATA", 354);
    let msg = simple_message("alice@sender.test", "y@delegated.test", "delegated-1");
    c.send(&data_transfer(&msg));
    assert_eq!(c.reply().code, 250);
    c.expect("QUIT", 221);

    let msgs = real.wait_messages(1, DELIVERY);
    assert_eq!(msgs[0].rcpts, vec!["y@delegated.test"]);
    assert_one_received_then(&msgs[0], &msg);
    delegating.wait_queue_empty(DELIVERY);
    assert_eq!(real.messages().len(), 1);
    assert!(magic.connections().is_empty(), "magic host contacted");
}

#[test]
fn acknowledged_mail_survives_sigkill_and_is_delivered_once() {
    // The real MX is down until the end: its port is only reserved.
    let port = Sink::reserve_port("127.0.0.1");
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "real.example.test"),
        Rec::A("real.example.test", "127.0.0.1"),
    ]);
    let mut node = Node::start(NodeConf::new(dns.addr, port));

    let msg = simple_message("alice@sender.test", "user@example.test", "crash-1");
    let r = send_mail(
        node.smtp_addr,
        "alice@sender.test",
        &["user@example.test"],
        &msg,
    );
    assert_eq!(r.code, 250, "end of data: {r}");
    // Crash right after the acknowledgement.
    node.kill();

    // The queue survived the crash: the message is listed, with its id
    // (first column) and envelope.
    let listing = node.queue_list();
    let lines: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains("alice@sender.test"))
        .collect();
    assert_eq!(lines.len(), 1, "queue list after SIGKILL:\n{listing}");
    assert!(lines[0].contains("user@example.test"), "{listing}");
    let id = lines[0].split_whitespace().next().unwrap().to_string();
    if let Some(logged) = node
        .log_lines_with(&["queue_id=", "received"])
        .first()
        .and_then(|l| common::node::queue_id(l))
    {
        assert_eq!(logged, id, "queue list id differs from the logged queue_id");
    }

    node.restart();
    // Still down: the node tries, fails, keeps the message.
    node.wait_log(&["deferred", "queue_id=", &id], Duration::from_secs(10));
    let listing = node.queue_list();
    assert!(
        listing.contains(&id),
        "queue list (node running, MX down) lacks {id}:\n{listing}"
    );

    let sink = Sink::builder()
        .start("127.0.0.1", port)
        .expect("bind the sink on the reserved port");
    let msgs = sink.wait_messages(1, DELIVERY);
    assert_one_received_then(&msgs[0], &msg);
    assert_eq!(msgs[0].mail_from, "alice@sender.test");
    assert_eq!(msgs[0].rcpts, vec!["user@example.test"]);

    node.wait_queue_empty(DELIVERY);
    assert_eq!(
        sink.transactions().len(),
        1,
        "delivered more than once: {:#?}",
        sink.transactions()
    );
    let listing = node.queue_list();
    assert!(
        !listing.contains(&id),
        "delivered message still queued:\n{listing}"
    );
}

#[test]
fn temporary_failure_is_retried() {
    let sink = Sink::builder()
        .data_replies(&["451 4.3.0 try again later"])
        .start("127.0.0.1", 0)
        .unwrap();
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "real.example.test"),
        Rec::A("real.example.test", "127.0.0.1"),
    ]);
    let node = Node::start(NodeConf::new(dns.addr, sink.addr.port()));
    let msg = simple_message("alice@sender.test", "user@example.test", "retry-1");
    let r = send_mail(
        node.smtp_addr,
        "alice@sender.test",
        &["user@example.test"],
        &msg,
    );
    assert_eq!(r.code, 250);

    sink.wait_messages(1, DELIVERY);
    let all = sink.transactions();
    assert!(all[0].reply.starts_with("451"), "{all:#?}");
    assert!(all[1].accepted(), "{all:#?}");
    assert_eq!(all[0].data, all[1].data, "retry sent different data");
    assert_one_received_then(&all[1], &msg);
    node.wait_log(&["queue_id=", "deferred"], Duration::from_secs(1));

    node.wait_queue_empty(DELIVERY);
    assert_eq!(sink.transactions().len(), 2, "sent again after the 250");
}

fn dsn_setup() -> (Sink, DnsServer) {
    let sink = Sink::builder()
        .refuse_rcpt(
            "bad@example.test",
            "550 5.1.1 <bad@example.test>: no such user",
        )
        .start("127.0.0.1", 0)
        .unwrap();
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "real.example.test"),
        Rec::A("real.example.test", "127.0.0.1"),
        Rec::Mx("sender.test", 10, "mx.sender.test"),
        Rec::A("mx.sender.test", "127.0.0.1"),
    ]);
    (sink, dns)
}

#[test]
fn permanent_failure_of_one_recipient_sends_a_dsn_to_the_sender() {
    let (sink, dns) = dsn_setup();
    let node = Node::start(NodeConf::new(dns.addr, sink.addr.port()));
    let msg = simple_message("alice@sender.test", "good@example.test", "dsn-1");
    let r = send_mail(
        node.smtp_addr,
        "alice@sender.test",
        &["good@example.test", "bad@example.test"],
        &msg,
    );
    assert_eq!(r.code, 250);

    let all = sink.wait_for(DELIVERY, "the message for good@ and a DSN to alice@", |t| {
        has_message(t, "good@example.test") && has_message(t, "alice@sender.test")
    });
    let good = all
        .iter()
        .find(|t| t.accepted() && t.rcpts.contains(&"good@example.test".to_string()))
        .unwrap();
    assert_eq!(good.mail_from, "alice@sender.test");
    assert_one_received_then(good, &msg);

    let dsn = all
        .iter()
        .find(|t| t.accepted() && t.rcpts.contains(&"alice@sender.test".to_string()))
        .unwrap();
    assert_eq!(dsn.mail_from, "", "a DSN must come from the null sender");
    assert_eq!(dsn.rcpts, vec!["alice@sender.test"]);
    let text = dsn.text();
    let flat = text.to_ascii_lowercase().replace('"', "");
    assert!(
        flat.contains("multipart/report"),
        "DSN is not multipart/report:\n{text}"
    );
    assert!(
        flat.contains("report-type=delivery-status"),
        "DSN lacks report-type=delivery-status:\n{text}"
    );
    assert!(
        flat.contains("message/delivery-status"),
        "no delivery-status part:\n{text}"
    );
    assert!(
        text.contains("bad@example.test"),
        "DSN does not name the recipient:\n{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("Status: 5.")),
        "DSN has no `Status: 5.x.x`:\n{text}"
    );
    assert!(
        flat.contains("action: failed"),
        "DSN has no `Action: failed`:\n{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("final-recipient") && l.contains("good@")),
        "DSN reports the delivered recipient:\n{text}"
    );
    assert!(bare_cr_lf(&dsn.data).is_empty(), "bare CR/LF in the DSN");

    node.wait_queue_empty(DELIVERY);
    let all = sink.transactions();
    let count = |rcpt: &str| {
        all.iter()
            .filter(|t| t.accepted() && t.rcpts.iter().any(|r| r == rcpt))
            .count()
    };
    assert_eq!(
        count("good@example.test"),
        1,
        "good@ delivered more than once"
    );
    assert_eq!(count("alice@sender.test"), 1, "more than one DSN");
    assert_eq!(
        sink.rcpt_attempts("bad@example.test"),
        1,
        "a 5xx recipient was retried"
    );
    node.wait_log(&["queue_id=", "bounced"], Duration::from_secs(1));
    let rows = common::node::queue_rows(&node.queue_list());
    assert!(rows.is_empty(), "messages left in the queue: {rows:#?}");
}

#[test]
fn no_dsn_for_the_null_sender() {
    let (sink, dns) = dsn_setup();
    let node = Node::start(NodeConf::new(dns.addr, sink.addr.port()));
    let mut c = Client::connect(node.smtp_addr);
    c.ehlo("client.example.net");
    let msg = simple_message("", "good@example.test", "nulldsn-1");
    let r = transaction(&mut c, "", &["good@example.test", "bad@example.test"], &msg);
    assert_eq!(r.code, 250);
    c.expect("QUIT", 221);

    let msgs = sink.wait_messages(1, DELIVERY);
    assert_eq!(msgs[0].rcpts, vec!["good@example.test"]);
    assert_eq!(msgs[0].mail_from, "");
    // A DSN the node wrongly made would be queued before the original is
    // removed: an empty queue means none was made, or it was sent.
    node.wait_queue_empty(DELIVERY);
    let all = sink.transactions();
    assert_eq!(all.len(), 1, "extra transactions (a DSN?): {all:#?}");
    assert_eq!(
        sink.rcpt_attempts("bad@example.test"),
        1,
        "5xx recipient retried"
    );
    node.wait_log(&["queue_id=", "bounced"], Duration::from_secs(1));
    // A DSN to `<>` cannot reach the sink, so look for it in the node: the
    // queue must be empty, and no DSN logged (current wording: `dsn queued`).
    let rows = common::node::queue_rows(&node.queue_list());
    assert!(rows.is_empty(), "messages left in the queue: {rows:#?}");
    let dsn_lines = node.log_lines_with(&["dsn queued"]);
    assert!(
        dsn_lines.is_empty(),
        "a DSN was made for the null sender: {dsn_lines:#?}"
    );
}

#[test]
fn opportunistic_tls_to_the_real_mx() {
    let dir = tempfile::tempdir().unwrap();
    // Not trusted by the node (private CA): opportunistic TLS must still
    // deliver, encrypted without verification or in plain text after the
    // failed handshake.
    let tls = common::tls::generate(dir.path(), "mx", &["real.example.test"]);
    let sink = Sink::builder()
        .tls(tls.server_config())
        .start("127.0.0.1", 0)
        .unwrap();
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "real.example.test"),
        Rec::A("real.example.test", "127.0.0.1"),
    ]);
    let node = Node::start(NodeConf::new(dns.addr, sink.addr.port()).relay_tls("opportunistic"));
    let msg = simple_message("alice@sender.test", "user@example.test", "tls-1");
    assert_eq!(
        send_mail(
            node.smtp_addr,
            "alice@sender.test",
            &["user@example.test"],
            &msg
        )
        .code,
        250
    );
    let msgs = sink.wait_messages(1, DELIVERY);
    assert_one_received_then(&msgs[0], &msg);
    assert!(
        sink.starttls_commands() >= 1,
        "STARTTLS was offered and not tried"
    );
    eprintln!("delivered over TLS: {}", msgs[0].tls);

    // With relay.tls = "none" the node never tries.
    let node2 = Node::start(NodeConf::new(dns.addr, sink.addr.port()).relay_tls("none"));
    let before = sink.starttls_commands();
    let msg = simple_message("alice@sender.test", "user@example.test", "tls-2");
    assert_eq!(
        send_mail(
            node2.smtp_addr,
            "alice@sender.test",
            &["user@example.test"],
            &msg
        )
        .code,
        250
    );
    let msgs = sink.wait_messages(2, DELIVERY);
    assert!(!msgs[1].tls);
    assert_eq!(
        sink.starttls_commands(),
        before,
        "STARTTLS with relay.tls = none"
    );
}
