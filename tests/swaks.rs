//! swaks (Debian's package), a second real SMTP client, completes
//! transactions against a node, in plain text and with STARTTLS, from an
//! untrusted loopback address; the node relays both to the real MX.
#![cfg(feature = "interop")]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{tls, DnsServer, Node, NodeConf, Rec, Sink};

const WAIT: Duration = Duration::from_secs(30);

/// Runs swaks against `server`; returns (success, transcript).
fn swaks(
    server: std::net::SocketAddr,
    source: &str,
    subject: &str,
    extra: &[&str],
) -> (bool, String) {
    let out = Command::new("swaks")
        .args(["--server", &server.ip().to_string()])
        .args(["--port", &server.port().to_string()])
        .args(["--local-interface", source])
        .args(["--from", "alice@sender.test"])
        .args(["--to", "bob@example.test"])
        .args(["--ehlo", "swaks.sender.test"])
        .args(["--header", &format!("Subject: {subject}")])
        .args([
            "--body",
            "Hello from swaks.\n.\nA line with a lone dot above.",
        ])
        .args(["--timeout", "20"])
        .args(extra)
        .output()
        .expect("run swaks (is it installed? see .ci/run)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The reply swaks printed for the end of data (the `<-` line after ` -> .`).
fn data_reply(transcript: &str) -> Option<&str> {
    let mut lines = transcript.lines();
    lines.find(|l| l.trim() == "-> ." || l.trim() == "~> .")?;
    lines
        .find(|l| l.trim_start().starts_with("<-") || l.trim_start().starts_with("<~"))
        .map(str::trim)
}

#[test]
fn swaks_plain_and_starttls() {
    let dir = tempfile::Builder::new()
        .prefix("magicmx-swaks-")
        .tempdir()
        .unwrap();
    let certs = tls::generate(dir.path(), "node", &["node1.magic.test"]);
    let real = Sink::start("127.0.201.1");
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "node1.magic.test"),
        Rec::Mx("example.test", 20, "mail.example.test"),
        Rec::A("node1.magic.test", "127.0.0.1"),
        Rec::A("mail.example.test", "127.0.201.1"),
    ]);
    let node = Node::start_in(dir, NodeConf::new(dns.addr, real.addr.port()).tls(&certs));

    let (ok, transcript) = swaks(node.smtp_addr, "127.0.200.1", "swaks-plain", &[]);
    assert!(ok, "swaks failed:\n{transcript}");
    let reply =
        data_reply(&transcript).unwrap_or_else(|| panic!("no reply to the data:\n{transcript}"));
    assert!(reply.contains("250"), "{reply}\n{transcript}");
    assert!(
        !transcript.contains("-> STARTTLS"),
        "plain run used TLS:\n{transcript}"
    );

    let (ok, transcript) = swaks(node.smtp_addr, "127.0.200.2", "swaks-tls", &["--tls"]);
    assert!(ok, "swaks --tls failed:\n{transcript}");
    assert!(transcript.contains("-> STARTTLS"), "{transcript}");
    assert!(transcript.contains("<-  220"), "{transcript}");
    assert!(transcript.contains("TLS started"), "{transcript}");
    let reply =
        data_reply(&transcript).unwrap_or_else(|| panic!("no reply to the data:\n{transcript}"));
    assert!(reply.contains("250"), "{reply}\n{transcript}");

    // Both reach the real MX through the node, bytes intact.
    let got = real.wait_messages(2, WAIT);
    let find = |subject: &str| {
        got.iter()
            .find(|t| t.text().contains(&format!("Subject: {subject}")))
            .unwrap_or_else(|| panic!("{subject} not relayed: {got:#?}"))
    };
    let plain = find("swaks-plain");
    let tls = find("swaks-tls");
    for t in [plain, tls] {
        assert_eq!(t.mail_from, "alice@sender.test");
        assert_eq!(t.rcpts, ["bob@example.test"]);
        assert!(
            t.text().contains("\r\n.\r\nA line with a lone dot above."),
            "{}",
            t.text()
        );
        assert!(common::bare_cr_lf(&t.data).is_empty());
    }
    assert!(
        plain
            .text()
            .contains("from swaks.sender.test ([127.0.200.1])"),
        "{}",
        plain.text()
    );
    assert!(plain.text().contains("with ESMTP\r\n") || plain.text().contains("with ESMTP "));
    assert!(
        tls.text()
            .contains("from swaks.sender.test ([127.0.200.2])"),
        "{}",
        tls.text()
    );
    assert!(tls.text().contains("with ESMTPS"), "{}", tls.text());
}
