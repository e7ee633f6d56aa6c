//! nmap's `smtp-open-relay` script (Debian's nmap package), a relay checker
//! nobody here wrote, runs its 16 relay tricks against a node and finds no
//! open relay: plain foreign recipients, `%` and `!` routing, quoted and
//! doubled `@`, source routes and address literals. The node's banner name is
//! the domain it serves, so the tricks that hide a foreign recipient behind a
//! served domain (`relaytest%elsewhere.test@example.test`) are tried too.
//! A plain message for the served domain is still accepted and relayed.
#![cfg(feature = "interop")]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{send_mail, simple_message, DnsServer, Node, NodeConf, Rec, Sink};

fn nmap_open_relay(node: &Node) -> String {
    let args = "smtp-open-relay.domain=elsewhere.test,smtp-open-relay.ip=127.0.0.1";
    let out = Command::new("nmap")
        .args(["-Pn", "-sT", "-n", "--script", "+smtp-open-relay"])
        .args(["--script-args", args])
        .args(["-p", &node.smtp_addr.port().to_string()])
        .arg(node.smtp_addr.ip().to_string())
        .output()
        .expect("run nmap (is it installed? see .ci/run)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "nmap failed:\n{text}");
    text
}

fn check(mx_delegation: bool) {
    let real = Sink::start("127.0.203.1");
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "node1.magic.test"),
        Rec::Mx("example.test", 20, "mail.example.test"),
        Rec::A("mail.example.test", "127.0.203.1"),
        Rec::Mx("elsewhere.test", 10, "mail.elsewhere.test"),
        Rec::A("mail.elsewhere.test", "127.0.203.2"),
    ]);
    let mut conf = NodeConf::new(dns.addr, real.addr.port()).mx_delegation(mx_delegation);
    conf.hostname = "example.test".into();
    let node = Node::start(conf);

    let report = nmap_open_relay(&node);
    assert!(
        report.contains("smtp-open-relay: Server doesn't seem to be an open relay"),
        "nmap's verdict (mx_delegation = {mx_delegation}):\n{report}"
    );
    let refused = node.log_lines_with(&["recipient refused"]);
    assert!(
        refused
            .iter()
            .any(|l| l.contains("sender-specified routing")),
        "the %-hack tests did not reach the routing check:\n{}",
        refused.join("\n")
    );

    // Nothing nmap sent was queued; the served domain still works.
    let r = send_mail(
        node.smtp_addr,
        "alice@sender.test",
        &["bob@example.test"],
        &simple_message("alice@sender.test", "bob@example.test", "after nmap"),
    );
    assert_eq!(r.code, 250, "{}", r.text());
    let got = real.wait_messages(1, Duration::from_secs(30));
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].rcpts, ["bob@example.test"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(real.messages().len(), 1, "nmap's mail was relayed");
}

#[test]
fn nmap_finds_no_open_relay() {
    check(false);
}

#[test]
fn nmap_finds_no_open_relay_with_mx_delegation() {
    check(true);
}
