//! Limits and edges of a single node that the other suites do not cover:
//! the total and per-block connection limits, the command timeout, graceful shutdown
//! (`421` to waiting sessions), a mail loop, the implicit MX and the null MX.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::inproc::InProc;
use common::{simple_message, wait_until, Client, DnsServer, Rec, Sink};

/// Reads what the server sends until it closes (or 10 s pass).
fn read_until_close(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn connections_over_the_total_limit_get_421() {
    let node = InProc::start_with_smtp("max_connections = 2\n", "");
    let a = Client::connect(node.smtp);
    let _b = Client::connect(node.smtp);
    let mut c = TcpStream::connect(node.smtp).unwrap();
    let text = read_until_close(&mut c);
    assert!(text.starts_with("421 4.3.2"), "third connection: {text:?}");
    // A slot frees up when a session ends.
    drop(a);
    assert!(
        wait_until(Duration::from_secs(5), || {
            let mut s = TcpStream::connect(node.smtp).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 3];
            s.read_exact(&mut buf).is_ok() && &buf == b"220"
        }),
        "no slot after a session ended"
    );
}

/// The first line a connection from `ip` gets (the banner or a refusal).
fn first_line_from(ip: &str, server: std::net::SocketAddr) -> (TcpStream, String) {
    let mut s = common::client::tcp_from(ip, server);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        match s.read(&mut b) {
            Ok(1) => line.push(b[0]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&line).into_owned())
}

#[test]
fn connections_over_the_per_block_limit_get_421() {
    let node = InProc::start_with_smtp(
        "max_connections_per_block = 2\n",
        "[trust]\nnetworks = [\"127.9.0.0/16\"]\n",
    );
    // Two sessions from 127.1.1.0/24 stay open...
    let (a, first) = first_line_from("127.1.1.1", node.smtp);
    assert!(first.starts_with("220 "), "{first}");
    let (_b, second) = first_line_from("127.1.1.2", node.smtp);
    assert!(second.starts_with("220 "), "{second}");
    // ...the third from the same block is refused...
    let (_c, third) = first_line_from("127.1.1.3", node.smtp);
    assert!(
        third.starts_with("421 4.7.0"),
        "third from the block: {third}"
    );
    // ...while another block and a trusted network are not affected.
    let (_d, other) = first_line_from("127.2.2.1", node.smtp);
    assert!(other.starts_with("220 "), "{other}");
    let trusted: Vec<_> = (1..=4)
        .map(|i| first_line_from(&format!("127.9.0.{i}"), node.smtp))
        .collect();
    for (_, line) in &trusted {
        assert!(line.starts_with("220 "), "trusted: {line}");
    }
    // A slot of the block frees up when one of its sessions ends.
    drop(a);
    assert!(
        wait_until(Duration::from_secs(5), || first_line_from(
            "127.1.1.4",
            node.smtp
        )
        .1
        .starts_with("220 ")),
        "no slot for the block after one of its sessions ended"
    );
    let metrics = node.http_get("/metrics");
    assert!(
        metrics.contains(r#"magicmx_smtp_refusals_total{reason="connections_per_block"}"#),
        "{metrics}"
    );
}

/// A few dozen slow sessions from a handful of neighbouring blocks (one
/// /16) cannot take every slot: the block family's share is bounded too,
/// so a legitimate sender elsewhere still gets its banner.
#[test]
fn slow_sessions_from_a_few_blocks_cannot_lock_out_others() {
    let node = InProc::start_with_smtp(
        "max_connections = 12
max_connections_per_block = 3
max_connections_per_family = 6
",
        "",
    );
    let mut held = Vec::new();
    let mut refused = 0;
    // 30 sessions from six /24s of 127.5.0.0/16, each kept open.
    for i in 0..30 {
        let ip = format!("127.5.{}.{}", i % 6 + 1, i / 6 + 1);
        let (s, line) = first_line_from(&ip, node.smtp);
        if line.starts_with("220 ") {
            held.push(s);
        } else {
            assert!(line.starts_with("421 4.7.0"), "{ip}: {line}");
            refused += 1;
        }
    }
    assert_eq!(held.len(), 6, "the family holds at most its share");
    assert_eq!(refused, 24);
    for ip in ["127.6.0.1", "127.7.0.1", "127.8.0.1"] {
        let (_s, line) = first_line_from(ip, node.smtp);
        assert!(line.starts_with("220 "), "a sender from {ip}: {line}");
    }
    let metrics = node.http_get("/metrics");
    assert!(
        metrics.contains(r#"magicmx_smtp_refusals_total{reason="connections_per_family"}"#),
        "{metrics}"
    );
}

#[test]
fn idle_sessions_time_out_with_421() {
    let node = InProc::start_with_smtp("command_timeout = \"1s\"\n", "");
    let mut s = TcpStream::connect(node.smtp).unwrap();
    let start = Instant::now();
    let text = read_until_close(&mut s);
    assert!(text.starts_with("220 "), "{text:?}");
    assert!(text.contains("\r\n421 4.4.2 "), "{text:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

/// A command line dripped one byte at a time, each well within the
/// timeout, still has to be complete within `command_timeout`.
#[test]
fn a_dripped_command_line_times_out() {
    use std::io::Write;
    // The client talks before the banner: that is the pregreet test's
    // business (tests/dnsbl.rs), not this one's.
    let node = InProc::start_with_smtp(
        "command_timeout = \"1s\"\n",
        "[suspect]\nprotocol_tests = false\n",
    );
    let mut s = TcpStream::connect(node.smtp).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    // One byte every 100 ms for up to 4 s: never idle for the timeout.
    let refused_after = loop {
        if start.elapsed() > Duration::from_secs(4) {
            break None;
        }
        let _ = s.write_all(b"N");
        match s.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if String::from_utf8_lossy(&got).contains("421 4.4.2 ") {
            break Some(start.elapsed());
        }
    };
    let text = String::from_utf8_lossy(&got);
    let after = refused_after.unwrap_or_else(|| panic!("no 421 while dripping: {text:?}"));
    assert!(after < Duration::from_millis(2500), "421 after {after:?}");
}

#[test]
fn shutdown_answers_421_to_waiting_sessions() {
    let node = InProc::start_with_smtp("", "");
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    c.expect("MAIL FROM:<a@sender.test>", 250);
    node.shutdown.cancel();
    let r = c.reply();
    assert_eq!(r.code, 421, "{r}");
    assert!(r.text().starts_with("4.3.2"), "{r}");
}

fn relay_env() -> (Sink, DnsServer) {
    let sink = Sink::start("127.0.0.1");
    let dns = DnsServer::start(&[
        // implicit.test has no MX, only an address: the implicit MX.
        Rec::A("implicit.test", "127.0.0.1"),
        Rec::NullMx("null.test"),
        Rec::Mx("sender.test", 10, "mail.sender.test"),
        Rec::A("mail.sender.test", "127.0.0.1"),
    ]);
    (sink, dns)
}

fn relay_tail(sink: &Sink, dns: &DnsServer) -> String {
    format!(
        "[accept]\ndomains = [\"implicit.test\", \"null.test\"]\n\
         [throttle]\nhold = \"0s\"\n\
         [relay]\nport = {}\ndeny_networks = []\nretry_initial = \"1s\"\nretry_max = \"2s\"\ntls = \"none\"\n\
         [dns]\nnameservers = [\"{}\"]\n",
        sink.addr.port(),
        dns.addr
    )
}

#[test]
fn implicit_mx_and_null_mx() {
    let (sink, dns) = relay_env();
    let node = InProc::start(&relay_tail(&sink, &dns));
    let msg = simple_message("alice@sender.test", "bob@implicit.test", "implicit");
    let r = common::send_mail(node.smtp, "alice@sender.test", &["bob@implicit.test"], &msg);
    assert_eq!(r.code, 250, "{r}");
    assert!(
        wait_until(Duration::from_secs(10), || sink
            .transactions()
            .iter()
            .any(|t| t.rcpts == ["bob@implicit.test"])),
        "implicit MX: not delivered to the domain's address"
    );

    // Null MX: permanent failure, a DSN to the sender, never a delivery attempt.
    let msg = simple_message("alice@sender.test", "carol@null.test", "nullmx");
    let r = common::send_mail(node.smtp, "alice@sender.test", &["carol@null.test"], &msg);
    assert_eq!(r.code, 250, "{r}");
    assert!(
        wait_until(Duration::from_secs(10), || sink
            .transactions()
            .iter()
            .any(|t| t.rcpts == ["alice@sender.test"])),
        "no DSN for the null MX domain"
    );
    let txns = sink.transactions();
    let dsn = txns
        .iter()
        .find(|t| t.rcpts == ["alice@sender.test"])
        .unwrap();
    assert_eq!(dsn.mail_from, "", "a DSN has a null sender");
    let text = dsn.text();
    assert!(text.contains("report-type=delivery-status"), "{text}");
    assert!(
        text.contains("carol@null.test") && text.contains("5.1.10"),
        "{text}"
    );
    assert!(!txns
        .iter()
        .any(|t| t.rcpts.iter().any(|r| r.ends_with("@null.test"))));
}

/// RFC 5321 address literals: `MAIL FROM:<alice@[127.0.0.1]>` is taken,
/// and the DSN for a refused recipient goes to that address, no DNS asked.
#[test]
fn address_literal_sender_gets_its_dsn_at_that_address() {
    let (sink, dns) = relay_env();
    let node = InProc::start(&relay_tail(&sink, &dns));
    let msg = simple_message("alice@[127.0.0.1]", "carol@null.test", "literal");
    let r = common::send_mail(node.smtp, "alice@[127.0.0.1]", &["carol@null.test"], &msg);
    assert_eq!(r.code, 250, "{r}");
    assert!(
        wait_until(Duration::from_secs(10), || sink
            .transactions()
            .iter()
            .any(|t| t.accepted() && t.rcpts == ["alice@[127.0.0.1]"])),
        "no DSN delivered to the literal: {:?}",
        sink.transactions()
    );
    // An address literal recipient is no served domain: relaying denied.
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    c.expect("MAIL FROM:<alice@[127.0.0.1]>", 250);
    let r = c.cmd("RCPT TO:<bob@[127.0.0.1]>");
    assert_eq!(r.code, 550, "{r}");
    assert!(r.text().contains("relaying denied"), "{r}");
}

/// With the default `relay.deny_networks`, a domain whose MX resolves to
/// loopback (or any private network) is never contacted: anyone could
/// publish such a domain and, with `mx_delegation`, reach the node's own
/// host or the operator's internal network through it.
#[test]
fn mx_addresses_in_denied_networks_are_never_contacted() {
    let (sink, dns) = relay_env();
    let tail = relay_tail(&sink, &dns).replace("deny_networks = []\n", "");
    let node = InProc::start(&tail);
    let msg = simple_message("alice@sender.test", "bob@implicit.test", "denied");
    let r = common::send_mail(node.smtp, "alice@sender.test", &["bob@implicit.test"], &msg);
    assert_eq!(r.code, 250, "{r}");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let (_, text) = node.cli(&["queue", "list"]);
            text.contains("in relay.deny_networks")
        }),
        "queue list does not say why: {}",
        node.cli(&["queue", "list"]).1
    );
    assert!(
        sink.connections().is_empty(),
        "a denied address was contacted: {:?}",
        sink.connections()
    );
}

#[test]
fn too_many_received_headers_is_a_loop() {
    let (sink, dns) = relay_env();
    let node = InProc::start(&relay_tail(&sink, &dns));
    let mut msg = Vec::new();
    for i in 0..51 {
        msg.extend_from_slice(format!("Received: from hop{i} by hop{}\r\n", i + 1).as_bytes());
    }
    msg.extend_from_slice(&simple_message("a@sender.test", "b@implicit.test", "loop"));
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    c.expect("MAIL FROM:<a@sender.test>", 250);
    c.expect("RCPT TO:<b@implicit.test>", 250);
    c.expect("DATA", 354);
    c.send(&common::client::data_transfer(&msg));
    let r = c.reply();
    assert_eq!(r.code, 554, "{r}");
    assert!(r.text().starts_with("5.4.6"), "{r}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(sink.transactions().is_empty());
}

/// Drips `byte` every 200 ms on `c` until the server answers (or 8 s pass);
/// returns the reply and when it came.
fn drip_until_reply(c: &mut Client, byte: &[u8]) -> (common::Next, Duration) {
    let start = Instant::now();
    loop {
        if c.try_send(byte).is_err() {
            return (common::Next::Closed, start.elapsed());
        }
        match c.next(Duration::from_millis(200)) {
            common::Next::Timeout if start.elapsed() < Duration::from_secs(8) => continue,
            other => return (other, start.elapsed()),
        }
    }
}

const ACCEPT: &str = "[accept]\ndomains = [\"example.test\"]\n";

/// `data_timeout` bounds each chunk only: a client dripping a byte now and
/// then must still finish its DATA within `data_deadline`, else `421 4.4.2`
/// and the connection closes; nothing of the message is acknowledged.
#[test]
fn a_dripped_data_phase_ends_at_the_data_deadline() {
    let node = InProc::start_with_smtp("data_timeout = \"1s\"\ndata_deadline = \"2s\"\n", ACCEPT);
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    c.expect("MAIL FROM:<a@sender.test>", 250);
    c.expect("RCPT TO:<u@example.test>", 250);
    c.expect("DATA", 354);
    c.send(b"Subject: slow\r\n\r\n");
    let (next, after) = drip_until_reply(&mut c, b"x");
    match next {
        common::Next::Reply(r) => {
            assert_eq!(r.code, 421, "{r}");
            assert!(r.text().starts_with("4.4.2 "), "{r}");
            assert!(r.text().ends_with("Error: timeout exceeded"), "{r}");
        }
        other => panic!("no 421 while dripping DATA: {other:?}"),
    }
    assert!(after < Duration::from_millis(3500), "421 after {after:?}");
    assert!(matches!(
        c.next(Duration::from_secs(5)),
        common::Next::Closed
    ));
    let (ok, list) = node.cli(&["queue", "list"]);
    assert!(ok && !list.contains("u@example.test"), "{list}");
    let metrics = node.http_get("/metrics");
    assert!(
        metrics.contains(r#"magicmx_smtp_timeouts_total{kind="data_deadline"}"#),
        "{metrics}"
    );
}

/// A client that keeps talking (each command well within
/// `command_timeout`) still has to end within `session_deadline`.
#[test]
fn a_chatty_session_ends_at_the_session_deadline() {
    let node = InProc::start_with_smtp(
        "session_deadline = \"2s\"\ndata_deadline = \"2s\"\n",
        ACCEPT,
    );
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    let start = Instant::now();
    let r = loop {
        assert!(start.elapsed() < Duration::from_secs(8), "no deadline");
        let r = c.cmd("NOOP");
        if r.code != 250 {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(r.code, 421, "{r}");
    assert!(r.text().starts_with("4.4.2 "), "{r}");
    assert!(
        start.elapsed() < Duration::from_millis(3500),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(
        c.next(Duration::from_secs(5)),
        common::Next::Closed
    ));
}

/// NOOP, RSET, VRFY and HELP are answered, but past `junk_command_limit`
/// each counts as an error, so `max_errors` closes a session that only
/// chats (Postfix's `smtpd_junk_command_limit`).
#[test]
fn junk_commands_past_the_limit_close_the_session() {
    let node = InProc::start_with_smtp("junk_command_limit = 5\nmax_errors = 3\n", ACCEPT);
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    for cmd in ["NOOP", "RSET", "VRFY u", "HELP", "NOOP", "NOOP", "RSET"] {
        assert_eq!(c.cmd(cmd).class(), 2, "{cmd}");
    }
    // The eighth is the third error: answered, then 421 and close.
    c.expect("NOOP", 250);
    let r = c.reply();
    assert_eq!(r.code, 421, "{r}");
    assert!(r.text().starts_with("4.7.0 "), "{r}");
    assert!(matches!(
        c.next(Duration::from_secs(5)),
        common::Next::Closed
    ));
    // A session that sends mail between its junk commands is not chatting.
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    for i in 0..4 {
        for _ in 0..4 {
            c.expect("NOOP", 250);
        }
        c.expect("MAIL FROM:<a@sender.test>", 250);
        c.expect("RCPT TO:<u@example.test>", 250);
        c.expect("DATA", 354);
        c.send(&common::client::data_transfer(&simple_message(
            "a@sender.test",
            "u@example.test",
            &format!("m{i}"),
        )));
        assert_eq!(c.reply().code, 250);
    }
    c.expect("QUIT", 221);
}

/// Unfinished DATAs share one memory budget (`smtp.data_memory`): past it
/// a new DATA gets `452 4.3.1` at once, a body that runs out of it gets
/// `452 4.3.1` after its end (nothing acknowledged that was not stored),
/// and the memory comes back when a DATA ends, so the others go on.
#[test]
fn data_in_flight_is_bounded_by_the_memory_budget() {
    let node = InProc::start_with_smtp("max_message_size = 200000\ndata_memory = 200000\n", ACCEPT);
    let start_data = |i: usize| {
        let mut c = Client::connect_from(&format!("127.3.{i}.1"), node.smtp);
        c.ehlo("client.test");
        c.expect("MAIL FROM:<a@sender.test>", 250);
        c.expect("RCPT TO:<u@example.test>", 250);
        c
    };
    // Three DATAs take their first 64 KiB buffers (192 KiB of 195 KiB).
    let mut held: Vec<Client> = (1..=3)
        .map(|i| {
            let mut c = start_data(i);
            c.expect("DATA", 354);
            c
        })
        .collect();
    // A fourth cannot start.
    let mut late = start_data(4);
    let r = late.expect("DATA", 452);
    assert!(
        r.text().starts_with("4.3.1 Insufficient system storage"),
        "{r}"
    );
    // The first grows past the budget mid-body: 452 after its end.
    let line = format!("{}\r\n", "x".repeat(998));
    held[0].send(format!("Subject: big\r\n\r\n{}.\r\n", line.repeat(100)).as_bytes());
    let r = held[0].reply();
    assert_eq!(r.code, 452, "{r}");
    assert!(r.text().starts_with("4.3.1 "), "{r}");
    // The others finish, and the late one now gets its turn.
    for c in &mut held[1..] {
        c.send(b"Subject: small\r\n\r\nhello\r\n.\r\n");
        assert_eq!(c.reply().code, 250);
    }
    late.expect("DATA", 354);
    late.send(b"Subject: late\r\n\r\nhello\r\n.\r\n");
    assert_eq!(late.reply().code, 250);
    // The refused session goes on too.
    held[0].expect("MAIL FROM:<a@sender.test>", 250);
}
