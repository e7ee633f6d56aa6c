//! Loop detection at the `relay.max_received_headers` boundary: the SMTP
//! side and the relay count `Received:` alike, so a message is either
//! refused at DATA or relayed, never acknowledged and then bounced.

mod common;

use std::time::Duration;

use common::inproc::InProc;
use common::{simple_message, Client, DnsServer, Rec, Sink};

const MAX: usize = 5;

/// `hops` `Received:` headers on top of a small message from `a@sender.test`.
fn message_with_hops(hops: usize, subject: &str) -> Vec<u8> {
    let mut msg = Vec::new();
    for i in 0..hops {
        msg.extend_from_slice(format!("Received: from hop{i} by hop{}\r\n", i + 1).as_bytes());
    }
    msg.extend_from_slice(&simple_message("a@sender.test", "b@implicit.test", subject));
    msg
}

fn send(node: &InProc, msg: &[u8]) -> common::Reply {
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    common::client::transaction(&mut c, "a@sender.test", &["b@implicit.test"], msg)
}

#[test]
fn exactly_the_limit_is_refused_at_data_and_one_less_is_relayed() {
    let sink = Sink::start("127.0.0.1");
    let dns = DnsServer::start(&[
        Rec::A("implicit.test", "127.0.0.1"),
        Rec::Mx("sender.test", 10, "mail.sender.test"),
        Rec::A("mail.sender.test", "127.0.0.1"),
    ]);
    let node = InProc::start(&format!(
        "[accept]\ndomains = [\"implicit.test\"]\n\
         [throttle]\nhold = \"0s\"\n\
         [relay]\nport = {}\ndeny_networks = []\nretry_initial = \"1s\"\nretry_max = \"2s\"\ntls = \"none\"\nmax_received_headers = {MAX}\n\
         [dns]\nnameservers = [\"{}\"]\n",
        sink.addr.port(),
        dns.addr
    ));

    // Exactly MAX hops: with this node's own header it would leave with
    // MAX + 1, a loop. Refused at DATA, so nobody is bounced later.
    let r = send(&node, &message_with_hops(MAX, "at the limit"));
    assert_eq!(r.code, 554, "{r}");
    assert!(r.text().starts_with("5.4.6"), "{r}");

    // MAX - 1 hops: acknowledged and relayed with MAX headers, no DSN.
    let r = send(&node, &message_with_hops(MAX - 1, "below the limit"));
    assert_eq!(r.code, 250, "{r}");
    let got = sink.wait_messages(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "the message below the limit was not relayed");
    let t = &got[0];
    assert_eq!(
        t.rcpts,
        ["b@implicit.test"],
        "a DSN instead of the message?"
    );
    assert_eq!(common::count_header(&t.data, "Received"), MAX);
    // And nothing else comes: no DSN to a@sender.test for either message.
    std::thread::sleep(Duration::from_millis(300));
    let all = sink.transactions();
    assert!(
        all.iter().all(|t| t.rcpts != ["a@sender.test"]),
        "a bounce was sent: {all:?}"
    );
}
