//! Connection reuse to the real MX (issue 17), seen from the real MX: an
//! in-process sink counts the connections and the transactions on each.
//! 100 messages arrive over far fewer than 100 connections; a session the
//! real MX broke (`421` after DATA) is never used again, and the message it
//! refused is delivered later on another connection, so nothing is lost.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::inproc::InProc;
use common::{simple_message, Client, DnsServer, Rec, Sink};

fn node(sink: &Sink, dns: &DnsServer) -> InProc {
    InProc::start(&format!(
        "[accept]\ndomains = [\"example.test\"]\n\
         [throttle]\nhold = \"0s\"\n\
         [trust]\nnetworks = [\"127.0.0.0/8\"]\n\
         [relay]\nport = {}\ndeny_networks = []\nretry_initial = \"1s\"\nretry_max = \"2s\"\ntls = \"none\"\n\
         [dns]\nnameservers = [\"{}\"]\n\
         [verify]\nenabled = false\n",
        sink.addr.port(),
        dns.addr
    ))
}

fn dns() -> DnsServer {
    DnsServer::start(&[
        Rec::Mx("example.test", 10, "real.example.test"),
        Rec::A("real.example.test", "127.0.0.1"),
    ])
}

/// Sends `n` messages over one client session.
fn send(node: &InProc, n: usize, tag: &str) {
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    for i in 0..n {
        let rcpt = format!("user{i}@example.test");
        let reply = common::client::transaction(
            &mut c,
            "alice@sender.test",
            &[rcpt.as_str()],
            &simple_message("alice@sender.test", &rcpt, &format!("{tag} {i}")),
        );
        assert_eq!(reply.code, 250, "{reply}");
    }
    c.expect("QUIT", 221);
}

#[test]
fn a_hundred_messages_share_few_connections() {
    let sink = Sink::start("127.0.0.1");
    let dns = dns();
    let node = node(&sink, &dns);
    std::thread::scope(|s| {
        for t in 0..4 {
            let node = &node;
            s.spawn(move || send(node, 25, &format!("batch {t}")));
        }
    });
    let got = sink.wait_messages(100, Duration::from_secs(60));
    assert_eq!(got.len(), 100);
    let connections = sink.connections().len();
    eprintln!("100 messages over {connections} connections");
    assert!(
        connections < 100,
        "100 messages over {connections} connections: no reuse"
    );
    // Every connection that carried mail carried it whole: one Received
    // header of this node per message.
    for t in &got {
        let text = String::from_utf8_lossy(&t.data);
        assert_eq!(text.matches("Received: from").count(), 1, "{text}");
    }
}

#[test]
fn a_session_the_real_mx_broke_is_not_reused_and_nothing_is_lost() {
    let sink = Sink::builder()
        .data_replies(&["421 4.3.0 mx.example.test closing the connection"])
        .start("127.0.0.1", 0)
        .unwrap();
    let dns = dns();
    let node = node(&sink, &dns);
    send(&node, 10, "after a broken session");
    // All ten arrive: the one refused with 421 is retried.
    let got = sink.wait_messages(10, Duration::from_secs(60));
    let subjects: HashSet<String> = got
        .iter()
        .map(|t| {
            let text = String::from_utf8_lossy(&t.data).into_owned();
            text.lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(subjects.len(), 10, "{subjects:?}");
    // Nothing was sent on the connection after its 421.
    let txns = sink.transactions();
    let broken = txns
        .iter()
        .position(|t| t.reply.starts_with("421"))
        .expect("the sink gave its 421");
    let peer = txns[broken].peer;
    assert!(
        txns[broken + 1..].iter().all(|t| t.peer != peer),
        "a transaction followed the 421 on the same connection {peer}"
    );
}
