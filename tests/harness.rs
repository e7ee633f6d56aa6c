//! Self-tests of the test harness (DNS server, sink, raw client, TLS
//! material), independent of the `magicmx` binary: when an end-to-end test
//! fails, these say whether the harness can be trusted.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::client::{data_transfer, transaction};
use common::{Client, DnsServer, Rec, Sink};
use hickory_server::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RData, RecordType};

fn query(server: std::net::SocketAddr, name: &str, rtype: RecordType) -> Message {
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.send_to(&m.to_vec().unwrap(), server).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).expect("DNS answer");
    Message::from_vec(&buf[..n]).unwrap()
}

#[test]
fn dns_server_answers_mx_a_nxdomain_nodata() {
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "mx1.magic.test"),
        Rec::Mx("example.test", 20, "real.example.test"),
        Rec::A("real.example.test", "127.0.0.1"),
        Rec::NullMx("null.test"),
        Rec::A("other.org", "127.0.0.9"),
    ]);

    let r = query(dns.addr, "example.test.", RecordType::MX);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    let mut mx: Vec<(u16, String)> = r
        .answers
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    mx.sort();
    assert_eq!(
        mx,
        vec![
            (10, "mx1.magic.test.".to_string()),
            (20, "real.example.test.".to_string())
        ]
    );

    let r = query(dns.addr, "real.example.test.", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(matches!(&r.answers[0].data, RData::A(a) if a.0.to_string() == "127.0.0.1"));

    // NODATA: the name exists, not with this type.
    let r = query(dns.addr, "real.example.test.", RecordType::MX);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty(), "{:?}", r.answers);

    // NXDOMAIN inside the zone.
    let r = query(dns.addr, "nowhere.test.", RecordType::MX);
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);

    // Null MX.
    let r = query(dns.addr, "null.test.", RecordType::MX);
    assert!(
        matches!(&r.answers[0].data, RData::MX(mx) if mx.preference == 0 && mx.exchange.is_root())
    );

    // A second zone.
    let r = query(dns.addr, "other.org.", RecordType::A);
    assert_eq!(r.answers.len(), 1);
}

#[test]
fn dns_server_works_with_hickory_resolver_over_udp_and_tcp() {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use hickory_resolver::Resolver;

    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "real.example.test"),
        Rec::A("real.example.test", "127.0.0.1"),
    ]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for proto in [ConnectionConfig::udp(), ConnectionConfig::tcp()] {
        let mut conn = proto;
        conn.port = dns.addr.port();
        let ns = NameServerConfig::new(dns.addr.ip(), true, vec![conn]);
        let config = ResolverConfig::from_parts(None, vec![], vec![ns]);
        let resolver = Resolver::builder_with_config(config, TokioRuntimeProvider::default())
            .build()
            .unwrap();
        rt.block_on(async {
            let mx = resolver
                .lookup("example.test.", RecordType::MX)
                .await
                .unwrap();
            assert_eq!(mx.answers().len(), 1);
            let ip = resolver.lookup_ip("real.example.test.").await.unwrap();
            assert_eq!(ip.iter().next().unwrap().to_string(), "127.0.0.1");
            assert!(resolver.lookup("nope.test.", RecordType::MX).await.is_err());
        });
    }
}

#[test]
fn sink_records_transactions_and_follows_its_script() {
    let sink = Sink::builder()
        .refuse_rcpt("bad@example.test", "550 5.1.1 no such user")
        .data_replies(&["451 4.3.0 try again later"])
        .start("127.0.0.1", 0)
        .unwrap();
    let body = b"Subject: t\r\n\r\n.leading dot\r\n..two\r\n\xe9t\xe9\r\n\r\nend\r\n".to_vec();

    let mut c = Client::connect(sink.addr);
    let ehlo = c.ehlo("harness.test");
    assert!(ehlo.has_extension("PIPELINING"));
    c.expect("MAIL FROM:<a@sender.test> BODY=8BITMIME", 250);
    c.expect("RCPT TO:<good@example.test>", 250);
    c.expect("RCPT TO:<bad@example.test>", 550);
    c.expect("DATA", 354);
    c.send(&data_transfer(&body));
    assert_eq!(c.reply().code, 451);
    let r = transaction(&mut c, "", &["good@example.test"], &body);
    assert_eq!(r.code, 250);
    // Pipelined commands are answered in order.
    c.send(b"RSET\r\nNOOP\r\nQUIT\r\n");
    assert_eq!(c.reply().code, 250);
    assert_eq!(c.reply().code, 250);
    assert_eq!(c.reply().code, 221);

    let all = sink.transactions();
    assert_eq!(all.len(), 2);
    assert!(!all[0].accepted());
    assert_eq!(all[0].refused, vec!["bad@example.test"]);
    assert_eq!(all[0].mail_params, "BODY=8BITMIME");
    let msgs = sink.wait_messages(1, Duration::from_secs(1));
    assert_eq!(msgs[0].mail_from, "");
    assert_eq!(msgs[0].rcpts, vec!["good@example.test"]);
    assert_eq!(msgs[0].data, body);
    assert_eq!(sink.rcpt_attempts("bad@example.test"), 1);
}

#[test]
fn sink_keeps_bare_lf_visible_and_supports_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let tls = common::tls::generate(dir.path(), "sink", &["sink.test"]);
    let sink = Sink::builder()
        .tls(tls.server_config())
        .start("127.0.0.1", 0)
        .unwrap();
    let mut c = Client::connect_from("127.0.9.9", sink.addr);
    assert!(c.ehlo("h.test").has_extension("STARTTLS"));
    c.expect("STARTTLS", 220);
    c.upgrade_tls(tls.client_config(), "sink.test").unwrap();
    assert!(!c.ehlo("h.test").has_extension("STARTTLS"));
    c.expect("MAIL FROM:<a@sender.test>", 250);
    c.expect("RCPT TO:<u@example.test>", 250);
    c.expect("DATA", 354);
    c.send(b"Subject: x\r\n\r\nbare\nlf\r\n.\r\n");
    assert_eq!(c.reply().code, 250);
    let m = &sink.wait_messages(1, Duration::from_secs(1))[0];
    assert!(m.tls);
    assert_eq!(m.peer.ip().to_string(), "127.0.9.9");
    assert_eq!(common::bare_cr_lf(&m.data), vec![18]);
}

#[test]
fn first_header_split_handles_folding() {
    let data = b"Received: from a\r\n\tby b; date\r\nSubject: x\r\n\r\nbody\r\n";
    let (h, rest) = common::split_first_header(data);
    assert_eq!(h, b"Received: from a\r\n\tby b; date\r\n");
    assert_eq!(rest, b"Subject: x\r\n\r\nbody\r\n");
    assert_eq!(common::count_header(data, "received"), 1);
}
