//! A real, independent SMTP client (Python 3's smtplib, driven by
//! `tests/py/smtp_send.py`) against the node: plain, STARTTLS and pipelined
//! transactions. Each message must reach the real MX (the sink).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{DnsServer, Node, NodeConf, Rec, Sink, Txn};

const DELIVERY: Duration = Duration::from_secs(15);

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/smtp_send.py")
}

fn python(node: &Node, mode: &str, subject: &str, rcpts: &[&str]) {
    let mut cmd = Command::new("python3");
    cmd.arg(script())
        .arg("--host")
        .arg(node.smtp_addr.ip().to_string())
        .arg("--port")
        .arg(node.smtp_addr.port().to_string())
        .arg("--mode")
        .arg(mode)
        .arg("--from")
        .arg("alice@sender.test")
        .arg("--subject")
        .arg(subject);
    for r in rcpts {
        cmd.arg("--rcpt").arg(r);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("smtp_send.py --mode {mode}:\n{stdout}{stderr}");
    assert!(
        out.status.success(),
        "smtplib {mode} transaction failed ({}):\n{stdout}{stderr}",
        out.status
    );
}

struct Env {
    sink: Sink,
    node: Node,
    _dns: DnsServer,
    _dir: Option<tempfile::TempDir>,
}

fn env(with_tls: bool) -> Env {
    let sink = Sink::start("127.0.0.1");
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "real.example.test"),
        Rec::A("real.example.test", "127.0.0.1"),
    ]);
    let mut conf = NodeConf::new(dns.addr, sink.addr.port());
    let mut dir = None;
    if with_tls {
        let d = tempfile::tempdir().unwrap();
        let tls = common::tls::generate(d.path(), "node", &["node1.magic.test"]);
        conf = conf.tls(&tls);
        dir = Some(d);
    }
    Env {
        node: Node::start(conf),
        sink,
        _dns: dns,
        _dir: dir,
    }
}

fn subject_of(t: &Txn) -> String {
    t.text()
        .lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or("")
        .to_string()
}

fn assert_body_intact(t: &Txn, subject: &str) {
    let text = t.text();
    assert!(
        text.contains(&format!(
            "Hello from smtplib ({subject}).\r\n.a line starting with a dot\r\n\r\nbye\r\n"
        )),
        "body changed: {text:?}"
    );
    assert!(text.ends_with("bye\r\n"), "{text:?}");
}

/// Every (subject, recipient) delivered, sorted; the relay may group
/// recipients of one domain in one transaction or not.
fn delivered(txns: &[Txn]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = txns
        .iter()
        .filter(|t| t.accepted())
        .flat_map(|t| t.rcpts.iter().map(move |r| (subject_of(t), r.clone())))
        .collect();
    out.sort();
    out
}

fn wait_delivered(sink: &Sink, want: &[(&str, &str)]) -> Vec<Txn> {
    let mut want: Vec<(String, String)> = want
        .iter()
        .map(|(s, r)| (s.to_string(), r.to_string()))
        .collect();
    want.sort();
    let all = sink.wait_for(DELIVERY, &format!("deliveries {want:?}"), |t| {
        want.iter().all(|w| delivered(t).contains(w))
    });
    // Nothing else, and nothing twice.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(delivered(&sink.transactions()), want);
    all.into_iter().filter(|t| t.accepted()).collect()
}

#[test]
fn smtplib_plain() {
    let e = env(false);
    python(&e.node, "plain", "py-plain", &["user@example.test"]);
    let msgs = wait_delivered(&e.sink, &[("py-plain", "user@example.test")]);
    assert_eq!(msgs[0].mail_from, "alice@sender.test");
    assert_body_intact(&msgs[0], "py-plain");
}

#[test]
fn smtplib_starttls() {
    let e = env(true);
    python(
        &e.node,
        "starttls",
        "py-tls",
        &["user@example.test", "other@example.test"],
    );
    let msgs = wait_delivered(
        &e.sink,
        &[
            ("py-tls", "user@example.test"),
            ("py-tls", "other@example.test"),
        ],
    );
    for m in &msgs {
        assert_eq!(m.mail_from, "alice@sender.test");
        assert_body_intact(m, "py-tls");
    }
}

#[test]
fn smtplib_pipelined() {
    let e = env(false);
    python(
        &e.node,
        "pipeline",
        "py-pipe",
        &["user@example.test", "other@example.test"],
    );
    let msgs = wait_delivered(
        &e.sink,
        &[
            ("py-pipe-1", "user@example.test"),
            ("py-pipe-1", "other@example.test"),
            ("py-pipe-2", "user@example.test"),
            ("py-pipe-2", "other@example.test"),
        ],
    );
    for m in &msgs {
        assert_body_intact(m, &subject_of(m));
    }
}
