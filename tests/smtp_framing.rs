//! The node's SMTP server under hostile input, over raw sockets: fake
//! end-of-data sequences and bare CR/LF (SMTP smuggling), over-long lines,
//! size and recipient limits, and commands pipelined behind STARTTLS.
//!
//! Each smuggling case sends a message whose body contains a fake
//! terminator followed by a complete second transaction, then the real
//! `CRLF.CRLF`. A correct node reads to the real end, refuses the message
//! with a 5xx, and never runs the smuggled commands: no extra replies, no
//! message at the sink. A control message sent afterwards shows the relay
//! works, so "nothing at the sink" is not just "nothing delivered yet".

mod common;

use std::time::Duration;

use common::client::{data_transfer, transaction};
use common::{simple_message, Client, DnsServer, Node, NodeConf, Rec, Sink};

const DELIVERY: Duration = Duration::from_secs(15);
const SILENCE: Duration = Duration::from_millis(800);

struct Env {
    sink: Sink,
    node: Node,
    _dns: DnsServer,
}

fn env(tune: impl FnOnce(NodeConf) -> NodeConf) -> Env {
    let sink = Sink::start("127.0.0.1");
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "real.example.test"),
        Rec::A("real.example.test", "127.0.0.1"),
    ]);
    let node = Node::start(tune(NodeConf::new(dns.addr, sink.addr.port())));
    Env {
        sink,
        node,
        _dns: dns,
    }
}

impl Env {
    /// Sends the control message (on `c` if the session is still usable,
    /// else on a new connection) and checks it is the only thing the sink
    /// ever got.
    fn control(&self, c: Option<&mut Client>, case: &str) {
        let mut fresh;
        let c = match c {
            Some(c) => c,
            None => {
                fresh = Client::connect(self.node.smtp_addr);
                fresh.ehlo("client.example.net");
                &mut fresh
            }
        };
        let msg = simple_message("alice@sender.test", "control@example.test", "control");
        let r = transaction(c, "alice@sender.test", &["control@example.test"], &msg);
        assert_eq!(r.code, 250, "{case}: control message refused: {r}");
        self.sink.wait_messages(1, DELIVERY);
        // Once the queue is empty nothing more can reach the sink.
        self.node.wait_queue_empty(DELIVERY);
        let all = self.sink.transactions();
        assert_eq!(
            all.len(),
            1,
            "{case}: the sink got more than the control message: {all:#?}"
        );
        assert_eq!(all[0].rcpts, vec!["control@example.test"], "{case}");
        assert!(!all[0].text().contains("smuggled"), "{case}: {:?}", all[0]);
    }
}

/// After a refused DATA: no stray replies, then the session is either
/// closed or still in a sane state (RSET and NOOP answered 250).
fn after_refusal(c: &mut Client, case: &str) -> bool {
    if !no_stray_reply(c, case) {
        return false;
    }
    c.expect("RSET", 250);
    c.expect("NOOP", 250);
    true
}

/// Sends `HELP`: the node answers in order, so a stray reply to anything
/// sent before would come ahead of HELP's `214`. No waiting for silence.
/// False if the node closed the session instead.
fn no_stray_reply(c: &mut Client, case: &str) -> bool {
    if c.try_send(b"HELP\r\n").is_err() {
        return false;
    }
    match c.next(common::client::REPLY_TIMEOUT) {
        common::Next::Reply(r) => {
            assert_eq!(r.code, 214, "{case}: a stray reply came before HELP's: {r}");
            true
        }
        common::Next::Closed => false,
        common::Next::Timeout => panic!("{case}: no reply to HELP"),
    }
}

fn smuggling_case(case: &str, fake_end: &[u8]) {
    let e = env(|c| c);
    let mut c = Client::connect(e.node.smtp_addr);
    c.ehlo("client.example.net");
    c.expect("MAIL FROM:<alice@sender.test>", 250);
    c.expect("RCPT TO:<user@example.test>", 250);
    c.expect("DATA", 354);
    let mut data = b"Subject: framing\r\n\r\nhello".to_vec();
    data.extend_from_slice(fake_end);
    data.extend_from_slice(
        b"MAIL FROM:<evil@sender.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n\
          Subject: smuggled\r\n\r\nsmuggled body\r\n.\r\n",
    );
    c.send(&data);
    let r = c.reply();
    assert_eq!(
        r.class(),
        5,
        "{case}: a message with a fake end of data must be refused, got {r}"
    );
    let open = after_refusal(&mut c, case);
    eprintln!(
        "{case}: refused with `{r}`, session {}",
        if open { "kept" } else { "closed" }
    );
    e.control(if open { Some(&mut c) } else { None }, case);
}

#[test]
fn smuggling_lf_dot_lf() {
    smuggling_case("\\n.\\n", b"\n.\n");
}

#[test]
fn smuggling_cr_dot_crlf() {
    smuggling_case("\\r.\\r\\n", b"\r.\r\n");
}

#[test]
fn smuggling_lf_dot_crlf() {
    smuggling_case("\\n.\\r\\n", b"\n.\r\n");
}

#[test]
fn smuggling_crlf_dot_lf() {
    smuggling_case("\\r\\n.\\n", b"\r\n.\n");
}

#[test]
fn smuggling_crlf_dot_cr() {
    smuggling_case("\\r\\n.\\r", b"\r\n.\r");
}

fn bare_in_data(case: &str, body: &[u8]) {
    let e = env(|c| c);
    let mut c = Client::connect(e.node.smtp_addr);
    c.ehlo("client.example.net");
    c.expect("MAIL FROM:<alice@sender.test>", 250);
    c.expect("RCPT TO:<user@example.test>", 250);
    c.expect("DATA", 354);
    let mut data = b"Subject: bare\r\n\r\n".to_vec();
    data.extend_from_slice(body);
    data.extend_from_slice(b"\r\n.\r\n");
    c.send(&data);
    let r = c.reply();
    assert_eq!(r.class(), 5, "{case}: must be refused, got {r}");
    let open = after_refusal(&mut c, case);
    eprintln!(
        "{case}: refused with `{r}`, session {}",
        if open { "kept" } else { "closed" }
    );
    e.control(if open { Some(&mut c) } else { None }, case);
}

#[test]
fn bare_cr_in_data_is_refused() {
    bare_in_data("bare CR", b"line with a bare\rCR inside");
}

#[test]
fn bare_lf_in_data_is_refused() {
    bare_in_data("bare LF", b"line with a bare\nLF inside");
}

#[test]
fn bare_lf_in_headers_is_refused() {
    bare_in_data("bare LF in header", b"X-A: 1\nX-B: 2\r\n\r\nbody");
}

/// A NUL ends a string for some receivers, so the part after it could be
/// read differently downstream: refused like a bare CR or LF, after the
/// real end of data, and the session goes on (a fake end of data after the
/// NUL does not end the message either).
#[test]
fn nul_in_data_is_refused_with_554_and_the_session_goes_on() {
    let e = env(|c| c);
    for body in [
        &b"Subject: nul\r\n\r\nbefore\0after"[..],
        b"Subject: a\0b\r\n\r\nbody",
        b"Subject: x\r\n\r\n\0\r\n.\0\r\nMAIL FROM:<evil@sender.test>\r\nSubject: smuggled",
    ] {
        let mut c = Client::connect(e.node.smtp_addr);
        c.ehlo("client.example.net");
        c.expect("MAIL FROM:<alice@sender.test>", 250);
        c.expect("RCPT TO:<user@example.test>", 250);
        c.expect("DATA", 354);
        let mut data = body.to_vec();
        data.extend_from_slice(b"\r\n.\r\n");
        c.send(&data);
        let r = c.reply();
        assert_eq!(r.code, 554, "{body:?}: {r}");
        assert!(r.text().starts_with("5.6.0 "), "{body:?}: {r}");
        assert!(after_refusal(&mut c, "NUL"), "{body:?}: session closed");
    }
    let mut c = Client::connect(e.node.smtp_addr);
    c.ehlo("client.example.net");
    e.control(Some(&mut c), "NUL");
    for t in e.sink.transactions() {
        assert!(!t.data.contains(&0), "NUL relayed: {t:?}");
    }
}

/// smtp-proto skips a CR anywhere in a command line; the node must not act
/// on a line other parsers read differently (`EHLO a\rX: y` is not
/// `EHLO aX: y`, `u@exam\rple.test` is not `u@example.test`). Refused with
/// `501 5.5.2` like Postfix; NUL likewise. The session goes on.
#[test]
fn bare_cr_or_nul_in_a_command_line_gets_501() {
    let e = env(|c| c);
    let mut c = Client::connect(e.node.smtp_addr);
    for line in [&b"EHLO a\rX: y\r\n"[..], b"EHLO a\0b\r\n"] {
        c.send(line);
        let r = c.reply();
        assert_eq!(r.code, 501, "{line:?}: {r}");
        assert!(r.text().starts_with("5.5.2 "), "{line:?}: {r}");
    }
    c.ehlo("client.example.net");
    c.expect("MAIL FROM:<alice@sender.test>", 250);
    for (line, status) in [
        (&b"RCPT TO:<u@exam\rple.test>\r\n"[..], "5.5.2 "),
        (b"RCPT TO:<user\r@example.test>\r\n", "5.5.2 "),
        // A NUL in an address: refused like other control characters there.
        (b"RCPT TO:<us\0er@example.test>\r\n", "5.1.3 "),
    ] {
        c.send(line);
        let r = c.reply();
        assert_eq!(r.code, 501, "{line:?}: {r}");
        assert!(r.text().starts_with(status), "{line:?}: {r}");
    }
    c.send(b"MAIL FROM:<ev\ril@sender.test>\r\n");
    assert_eq!(c.reply().code, 501);
    // No recipient was taken: DATA has none.
    assert_eq!(c.cmd("DATA").code, 554);
    c.expect("RSET", 250);
    e.control(Some(&mut c), "bare CR in a command");
}

/// Addresses the relay client would refuse to send to are refused at once
/// (`553`), not accepted and then bounced by the node itself; a quoted
/// local part stays quoted all the way to the real MX.
#[test]
fn addresses_the_relay_would_refuse_get_553() {
    let e = env(|c| c);
    let mut c = Client::connect(e.node.smtp_addr);
    c.ehlo("client.example.net");
    let long = "l".repeat(65);
    let r = c.expect(&format!("MAIL FROM:<{long}@sender.test>"), 553);
    assert!(r.text().starts_with("5.1.7 "), "{r}");
    c.expect("MAIL FROM:<alice@sender.test>", 250);
    let r = c.expect(&format!("RCPT TO:<{long}@example.test>"), 553);
    assert!(r.text().starts_with("5.1.3 "), "{r}");
    let label = "d".repeat(64);
    let r = c.expect(&format!("RCPT TO:<u@{label}.example.test>"), 553);
    assert!(r.text().starts_with("5.1.3 "), "{r}");
    // 64 octets is fine, and so is a quoted local part.
    c.expect(&format!("RCPT TO:<{}@example.test>", "l".repeat(64)), 250);
    c.expect("RCPT TO:<\"john smith\"@example.test>", 250);
    c.expect("DATA", 354);
    c.send(&data_transfer(&simple_message(
        "alice@sender.test",
        "john@example.test",
        "quoted",
    )));
    assert_eq!(c.reply().code, 250);
    let got = e.sink.wait_messages(1, DELIVERY);
    let mut rcpts = got[0].rcpts.clone();
    rcpts.sort();
    assert_eq!(
        rcpts,
        vec![
            "\"john smith\"@example.test".to_string(),
            format!("{}@example.test", "l".repeat(64))
        ]
    );
}

#[test]
fn over_long_command_line_gets_500() {
    let e = env(|c| c);
    let mut c = Client::connect(e.node.smtp_addr);
    c.ehlo("client.example.net");
    // smtp.max_line_length (default 1000) counts the CRLF: this fits.
    let fits = format!("NOOP {}", "x".repeat(1000 - 2 - 5));
    c.expect(&fits, 250);
    let long = format!("NOOP {}", "x".repeat(3000));
    let r = c.cmd(&long);
    assert_eq!(r.code, 500, "over-long command line: {r}");
    match no_stray_reply(&mut c, "after 500") {
        false => e.control(None, "long command"),
        true => {
            c.expect("NOOP", 250);
            e.control(Some(&mut c), "long command");
        }
    }
}

#[test]
fn over_long_data_line_is_refused() {
    let e = env(|c| c);
    let mut c = Client::connect(e.node.smtp_addr);
    c.ehlo("client.example.net");
    c.expect("MAIL FROM:<alice@sender.test>", 250);
    c.expect("RCPT TO:<user@example.test>", 250);
    c.expect("DATA", 354);
    let msg = format!(
        "Subject: long\r\n\r\n{}\r\nsmuggled? no\r\n",
        "y".repeat(5000)
    );
    c.send(&data_transfer(msg.as_bytes()));
    let r = c.reply();
    assert_eq!(r.class(), 5, "over-long DATA line: {r}");
    let open = after_refusal(&mut c, "long data line");
    e.control(if open { Some(&mut c) } else { None }, "long data line");
}

#[test]
fn size_limit_552() {
    let e = env(|c| c.smtp("max_message_size", 4096));
    let mut c = Client::connect(e.node.smtp_addr);
    let ehlo = c.ehlo("client.example.net");
    assert!(
        ehlo.lines
            .iter()
            .any(|l| l.eq_ignore_ascii_case("SIZE 4096")),
        "EHLO does not advertise SIZE 4096: {ehlo}"
    );

    let r = c.cmd("MAIL FROM:<alice@sender.test> SIZE=100000");
    assert_eq!(r.code, 552, "declared SIZE over the limit: {r}");

    c.expect("MAIL FROM:<alice@sender.test>", 250);
    c.expect("RCPT TO:<user@example.test>", 250);
    c.expect("DATA", 354);
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    for i in 0..200 {
        big.extend_from_slice(
            format!("line {i:04} of a message that is too big for the node\r\n").as_bytes(),
        );
    }
    assert!(big.len() > 8000);
    c.send(&data_transfer(&big));
    let r = c.reply();
    assert_eq!(r.code, 552, "message over max_message_size: {r}");
    let open = after_refusal(&mut c, "oversize");
    e.control(if open { Some(&mut c) } else { None }, "oversize");
}

#[test]
fn too_many_recipients_452() {
    let e = env(|c| c.smtp("max_recipients", 3));
    let mut c = Client::connect(e.node.smtp_addr);
    c.ehlo("client.example.net");
    c.expect("MAIL FROM:<alice@sender.test>", 250);
    for i in 1..=3 {
        c.expect(&format!("RCPT TO:<u{i}@example.test>"), 250);
    }
    let r = c.cmd("RCPT TO:<u4@example.test>");
    assert_eq!(r.code, 452, "recipient over max_recipients: {r}");
    c.expect("DATA", 354);
    let msg = simple_message("alice@sender.test", "u1@example.test", "rcpts");
    c.send(&data_transfer(&msg));
    assert_eq!(c.reply().code, 250);
    // The relay may split recipients over transactions: collect them all.
    let want = ["u1@example.test", "u2@example.test", "u3@example.test"];
    let all = e.sink.wait_for(DELIVERY, "u1..u3 delivered", |t| {
        want.iter().all(|w| {
            t.iter()
                .any(|t| t.accepted() && t.rcpts.iter().any(|r| r == w))
        })
    });
    let mut rcpts: Vec<String> = all
        .iter()
        .filter(|t| t.accepted())
        .flat_map(|t| t.rcpts.clone())
        .collect();
    rcpts.sort();
    assert_eq!(rcpts, want, "u4 must not be delivered, nor anyone twice");
}

fn tls_env() -> (Env, common::tls::TlsFiles, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let tls = common::tls::generate(dir.path(), "node", &["node1.magic.test", "localhost"]);
    let e = env(|c| c.tls(&tls));
    (e, tls, dir)
}

#[test]
fn starttls_then_transaction() {
    let (e, tls, _dir) = tls_env();
    let mut c = Client::connect(e.node.smtp_addr);
    let ehlo = c.ehlo("client.example.net");
    assert!(
        ehlo.has_extension("STARTTLS"),
        "STARTTLS not offered: {ehlo}"
    );
    assert!(
        ehlo.has_extension("PIPELINING"),
        "PIPELINING not offered: {ehlo}"
    );
    c.expect("STARTTLS", 220);
    c.upgrade_tls(tls.client_config(), "node1.magic.test")
        .expect("TLS handshake with the node");
    let ehlo = c.ehlo("client.example.net");
    assert!(
        !ehlo.has_extension("STARTTLS"),
        "STARTTLS offered again inside TLS: {ehlo}"
    );
    let msg = simple_message("alice@sender.test", "user@example.test", "over-tls");
    let r = transaction(&mut c, "alice@sender.test", &["user@example.test"], &msg);
    assert_eq!(r.code, 250);
    e.sink.wait_messages(1, DELIVERY);
}

#[test]
fn commands_pipelined_after_starttls_are_not_executed() {
    let (e, tls, _dir) = tls_env();
    let mut c = Client::connect(e.node.smtp_addr);
    c.ehlo("client.example.net");
    c.send(b"STARTTLS\r\nNOOP\r\n");
    let first = c.reply();
    if first.code != 220 {
        // Refusing STARTTLS itself because of the pipelined bytes is fine;
        // then nothing was injected into a TLS session.
        assert!(
            first.class() == 4 || first.class() == 5,
            "STARTTLS with pipelined data: {first}"
        );
        eprintln!("STARTTLS with a pipelined NOOP refused: `{first}`");
        return;
    }
    // The 220 must be the last thing sent in plain text.
    let plain_after = c.next(Duration::from_millis(300));
    assert!(
        matches!(plain_after, common::Next::Timeout | common::Next::Closed),
        "plain-text reply after the STARTTLS 220 (the NOOP ran before TLS?): {plain_after:?}"
    );
    if c.upgrade_tls(tls.client_config(), "node1.magic.test")
        .is_err()
    {
        // The node closed instead of negotiating: acceptable.
        return;
    }
    match c.next(Duration::from_millis(1000)) {
        common::Next::Timeout => {
            // Discarded silently: the session must work normally.
            c.ehlo("client.example.net");
            c.expect("NOOP", 250);
        }
        common::Next::Closed => {}
        common::Next::Reply(r) => {
            assert!(
                r.class() == 4 || r.class() == 5,
                "the NOOP pipelined behind STARTTLS was executed inside TLS: {r}"
            );
            if let common::Next::Reply(extra) = c.next(SILENCE) {
                panic!("second unsolicited reply inside TLS: {extra}");
            }
        }
    }
}
