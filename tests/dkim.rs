//! DKIM signing of relayed mail (issue 14), end to end: a node with
//! `[sign]` on relays a message to the real MX (the sink); the signatures are
//! checked over real DNS (the in-process hickory server) that serves the TXT
//! records `magicmx zone --dkim` printed, by mail-auth's verifier and, under
//! the `interop` feature, by dkimpy (a verifier nobody here wrote).
//! A message changed after signing fails; an `Authentication-Results` header
//! forged with the network's authserv-id never reaches the real MX, one of
//! another authserv-id does, and the node adds its own with the SPF and DKIM
//! results it saw for the sender.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::inproc::InProc;
use common::{send_mail, DnsServer, Rec, Sink, Txn};
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};

const DELIVERY: Duration = Duration::from_secs(20);
const DOMAIN: &str = "net.test";

/// The node's CLI with `--config dir/node.toml`: (success, stdout, stderr).
fn cli(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_magicmx"))
        .args(args)
        .arg("--config")
        .arg(dir.join("node.toml"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The records of `magicmx zone --dkim` (zone-file lines of quoted
/// strings) as records for the test DNS.
fn parse_zone(text: &str) -> Vec<Rec> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.splitn(5, '\t').collect();
        assert_eq!(fields.len(), 5, "not a zone line: {line:?}");
        assert_eq!((fields[2], fields[3]), ("IN", "TXT"), "{line:?}");
        let mut strings = Vec::new();
        let mut rest = fields[4];
        while let Some(start) = rest.find('"') {
            let end = start + 1 + rest[start + 1..].find('"').expect("closing quote");
            let s = &rest[start + 1..end];
            assert!(s.len() <= 255, "a TXT string over 255 octets: {line:?}");
            strings.push(s.to_string());
            rest = &rest[end + 1..];
        }
        let name: &'static str =
            Box::leak(fields[0].trim_end_matches('.').to_string().into_boxed_str());
        out.push(Rec::TxtStrings(name, strings));
    }
    out
}

/// The sender's own DKIM key (the "original sender" whose signature the
/// node verifies), its record, and a signed message.
struct Sender {
    key_record: Rec,
    key: Ed25519Key,
}

impl Sender {
    fn new() -> Sender {
        let der = Ed25519Key::generate_pkcs8().unwrap();
        let key = Ed25519Key::from_pkcs8_der(&der).unwrap();
        let value = format!(
            "v=DKIM1; k=ed25519; p={}",
            magicmx::sign::base64(&key.public_key())
        );
        Sender {
            key_record: Rec::Txt(
                "s1._domainkey.sender.test",
                Box::leak(value.into_boxed_str()),
            ),
            key,
        }
    }

    /// `message` with the sender's signature on top (From, To, Subject).
    fn sign(self, message: &[u8]) -> Vec<u8> {
        let sig = DkimSigner::from_key(self.key)
            .domain("sender.test")
            .selector("s1")
            .headers(["From", "To", "Subject"])
            .sign(message)
            .unwrap();
        let mut out = sig.to_header().into_bytes();
        out.extend_from_slice(message);
        out
    }
}

struct World {
    dns: DnsServer,
    sink: Sink,
    node: InProc,
    /// What `magicmx zone --dkim` printed.
    zone: String,
    sender: Option<Sender>,
}

fn world() -> World {
    let sink = Sink::start("127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    // The operator makes the keys and prints the records before the node
    // runs (the node would make missing keys itself on its first start).
    std::fs::write(
        dir.path().join("node.toml"),
        format!(
            "[node]\nname = \"t1\"\nhostname = \"node1.magic.test\"\ndata_dir = \"data\"\n\
             [smtp]\nlisten = [\"127.0.0.1:0\"]\n[sign]\ndomain = \"{DOMAIN}\"\n"
        ),
    )
    .unwrap();
    let (ok, init, err) = cli(dir.path(), &["sign", "init"]);
    assert!(ok, "sign init: {init}{err}");
    assert!(
        err.contains("t1.ed25519.pem") && err.contains("t1.rsa.pem"),
        "{err}"
    );
    assert!(!err.contains("PRIVATE") && !init.contains("PRIVATE"));
    let (ok, zone, err) = cli(dir.path(), &["zone", "--dkim"]);
    assert!(ok, "zone --dkim: {zone}{err}");
    assert_eq!(
        zone, init,
        "sign init prints the same records as zone --dkim"
    );
    // A second init keeps the keys.
    let (ok, again, err) = cli(dir.path(), &["sign", "init"]);
    assert!(ok && again == zone && err.is_empty(), "{again}{err}");

    let sender = Sender::new();
    let mut records = vec![
        Rec::Mx("example.test", 10, "mx.example.test"),
        Rec::A("mx.example.test", "127.0.0.1"),
        Rec::Txt("sender.test", "v=spf1 ip4:127.0.0.0/8 -all"),
        sender.key_record.clone(),
    ];
    records.extend(parse_zone(&zone));
    let dns = DnsServer::start(&records);
    let node = InProc::start_in(
        dir,
        "",
        &format!(
            "[accept]\ndomains = [\"example.test\"]\n\
             [dns]\nnameservers = [\"{}\"]\ntimeout = \"1s\"\n\
             [relay]\nport = {}\ndeny_networks = []\ntls = \"none\"\nretry_initial = \"1s\"\n\
             [throttle]\nhold = \"100ms\"\n\
             [suspect]\npregreet_wait = \"0s\"\ntarpit_rate = 0\n\
             [outbound]\nlisten = [\"127.0.0.1:0\"]\nclients = [\"127.0.0.0/8\"]\n\
             [sign]\ndomain = \"{DOMAIN}\"\n",
            dns.addr,
            sink.addr.port(),
        ),
    );
    World {
        dns,
        sink,
        node,
        zone,
        sender: Some(sender),
    }
}

/// A message from alice@sender.test, signed by sender.test, carrying a
/// forged network `Authentication-Results` and one of another site.
fn client_message(w: &mut World, subject: &str) -> Vec<u8> {
    let m = format!(
        "Authentication-Results: {DOMAIN}; dkim=pass header.d=bank.test; spf=pass smtp.mailfrom=ceo@bank.test\r\n\
         Authentication-Results: relay.other.test; spf=pass smtp.mailfrom=alice@sender.test\r\n\
         From: Alice <alice@sender.test>\r\n\
         To: <user@example.test>\r\n\
         Subject: {subject}\r\n\
         Message-ID: <{subject}@sender.test>\r\n\
         Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         Hello,\r\n\
         \r\n\
         the quarterly figures are attached.\r\n"
    );
    w.sender
        .take()
        .expect("one signed message")
        .sign(m.as_bytes())
}

fn relay_one(w: &mut World, subject: &str) -> Txn {
    let msg = client_message(w, subject);
    let r = send_mail(
        w.node.smtp,
        "alice@sender.test",
        &["user@example.test"],
        &msg,
    );
    assert_eq!(r.code, 250, "{}", r.text());
    let got = w.sink.wait_messages(1, DELIVERY);
    assert_eq!(got.len(), 1, "the message reached the real MX");
    got.into_iter().next().unwrap()
}

/// mail-auth's verdicts on `data`, over the test DNS: (d=, s=, algorithm, pass).
fn verify(dns: &DnsServer, data: &[u8]) -> Vec<(String, String, String, bool)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = magicmx::config::DnsConfig {
            nameservers: vec![dns.addr],
            ..Default::default()
        };
        let auth = MessageAuthenticator(magicmx::dns::Dns::new(&cfg).unwrap().resolver());
        let msg = AuthenticatedMessage::parse(data).expect("parsable");
        auth.verify_dkim(&msg)
            .await
            .iter()
            .map(|o| {
                let s = o.signature().expect("a signature");
                (
                    s.d.clone(),
                    s.s.clone(),
                    format!("{:?}", s.a),
                    *o.result() == DkimResult::Pass,
                )
            })
            .collect()
    })
}

/// The header section's fields (unfolded), in order.
fn headers(data: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(data);
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_string();
    let mut out: Vec<String> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.push(' ');
                last.push_str(line.trim());
            }
        } else {
            out.push(line.to_string());
        }
    }
    out
}

fn assert_network_signatures(verdicts: &[(String, String, String, bool)], pass: bool) {
    for (sel, alg) in [("t1-ed25519", "Ed25519Sha256"), ("t1-rsa", "RsaSha256")] {
        let v = verdicts
            .iter()
            .find(|(d, s, ..)| d == DOMAIN && s == sel)
            .unwrap_or_else(|| panic!("no signature s={sel}: {verdicts:?}"));
        assert_eq!(v.2, alg, "{verdicts:?}");
        assert_eq!(v.3, pass, "s={sel}: {verdicts:?}");
    }
}

#[test]
fn relayed_mail_is_signed_and_verifies_over_dns() {
    let mut w = world();
    let txn = relay_one(&mut w, "signed-1");
    let h = headers(&txn.data);
    // Signatures first, then the node's A-R, then its Received.
    assert!(
        h[0].starts_with("DKIM-Signature:") && h[1].starts_with("DKIM-Signature:"),
        "{h:#?}"
    );
    assert!(
        h[2].starts_with(&format!("Authentication-Results: {DOMAIN};")),
        "{h:#?}"
    );
    assert!(h[3].starts_with("Received: from "), "{h:#?}");
    for sig in &h[..2] {
        let tags = sig.to_ascii_lowercase();
        assert!(tags.contains(&format!("d={DOMAIN}")), "{sig}");
        for name in [
            "from",
            "to",
            "subject",
            "date",
            "message-id",
            "received",
            "mime-version",
            "content-type",
        ] {
            assert!(
                tags.split("h=")
                    .nth(1)
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap()
                    .split(':')
                    .any(|x| x.trim() == name),
                "h= lacks {name}: {sig}"
            );
        }
    }

    let verdicts = verify(&w.dns, &txn.data);
    assert_network_signatures(&verdicts, true);
    // The sender's own signature survived the relay too.
    assert!(
        verdicts.iter().any(|(d, _, _, p)| d == "sender.test" && *p),
        "{verdicts:?}"
    );

    // Changed in transit: the body, then the node's own Received header.
    let text = txn.text();
    let body_changed = text.replace("quarterly figures", "quarterly f1gures");
    assert_ne!(body_changed, text);
    assert_network_signatures(&verify(&w.dns, body_changed.as_bytes()), false);
    let received_changed = text.replacen("by node1.magic.test", "by evil.test", 1);
    assert_ne!(received_changed, text);
    assert_network_signatures(&verify(&w.dns, received_changed.as_bytes()), false);

    // `check-domain --dkim` finds the published keys, over the node's resolver.
    let (ok, out) = w.node.cli(&["check-domain", "--dkim"]);
    assert!(ok, "{out}");
    let ok_lines = out.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(ok_lines, 2, "{out}");
}

#[test]
fn forged_network_auth_results_never_reach_the_real_mx() {
    let mut w = world();
    let txn = relay_one(&mut w, "ar-1");
    let h = headers(&txn.data);
    let ar: Vec<&String> = h
        .iter()
        .filter(|l| {
            l.to_ascii_lowercase()
                .starts_with("authentication-results:")
        })
        .collect();
    let ours: Vec<&&String> = ar
        .iter()
        .filter(|l| l.contains(&format!(" {DOMAIN};")))
        .collect();
    assert_eq!(ours.len(), 1, "only the node's own: {ar:#?}");
    assert!(
        !txn.text().contains("bank.test"),
        "the forged header is gone"
    );
    assert!(
        ar.iter().any(|l| l.contains("relay.other.test;")),
        "{ar:#?}"
    );
    // What the node saw: the sender's signature and SPF both pass.
    let own = ours[0];
    assert!(
        own.contains("dkim=pass header.d=sender.test header.s=s1"),
        "{own}"
    );
    assert!(
        own.contains(&format!(
            "spf=pass ({DOMAIN}: domain of alice@sender.test designates 127.0.0.1"
        )),
        "{own}"
    );
    assert!(own.contains("smtp.mailfrom=alice@sender.test"), "{own}");
}

/// Trusted senders' mail through the outbound door is theirs: not signed
/// by the network, its headers untouched (even an A-R with the network's id).
#[test]
fn the_outbound_door_does_not_sign() {
    let mut w = world();
    let msg = client_message(&mut w, "outbound-1");
    let door = w.node.outbound.expect("outbound door");
    let r = send_mail(door, "alice@sender.test", &["user@example.test"], &msg);
    assert_eq!(r.code, 250, "{}", r.text());
    let got = w.sink.wait_messages(1, DELIVERY);
    assert_eq!(got.len(), 1);
    let h = headers(&got[0].data);
    assert!(h[0].starts_with("Received: from "), "{h:#?}");
    assert!(!h.iter().any(|l| l.contains("d=net.test")), "{h:#?}");
    assert!(got[0].text().contains("header.d=bank.test"), "left as sent");
    // The sender's own signature still verifies.
    let verdicts = verify(&w.dns, &got[0].data);
    assert_eq!(verdicts.len(), 1, "{verdicts:?}");
    assert!(
        verdicts[0].0 == "sender.test" && verdicts[0].3,
        "{verdicts:?}"
    );
}

#[test]
fn check_domain_dkim_fails_when_the_records_are_not_the_nodes() {
    let w = world();
    // Records from another node's keys (made in another folder).
    let other = tempfile::tempdir().unwrap();
    std::fs::write(
        other.path().join("node.toml"),
        format!(
            "[node]\nname = \"t1\"\nhostname = \"node1.magic.test\"\ndata_dir = \"data\"\n\
             [smtp]\nlisten = [\"127.0.0.1:0\"]\n[sign]\ndomain = \"{DOMAIN}\"\n\
             [dns]\nnameservers = [\"{}\"]\ntimeout = \"1s\"\n",
            w.dns.addr
        ),
    )
    .unwrap();
    let (ok, _, err) = cli(other.path(), &["zone", "--dkim"]);
    assert!(
        !ok && err.contains("sign init"),
        "keys are not made by zone: {err}"
    );
    let (ok, out, err) = cli(other.path(), &["sign", "init"]);
    assert!(ok, "{err}");
    assert_ne!(out, w.zone, "new keys");
    let (ok, out, err) = cli(other.path(), &["check-domain", "--dkim"]);
    assert!(!ok, "{out}{err}");
    assert_eq!(out.matches("FAIL").count(), 2, "{out}");
    assert!(out.contains("another key than the node's"), "{out}");
}

#[test]
fn sign_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (sign, key) in [
        ("domain = \"not a domain\"", "sign.domain"),
        ("domain = \"net.test\"\nselector = \"a_b\"", "sign.selector"),
        ("domain = \"net.test\"\nalgorithms = []", "sign.algorithms"),
        (
            "domain = \"net.test\"\nalgorithms = [\"dsa\"]",
            "algorithms",
        ),
        (
            "domain = \"net.test\"\nauthserv_id = \"a;b\"",
            "sign.authserv_id",
        ),
        ("selector = \"s\"", "sign.selector"),
        ("domain = \"net.test\"\nkey = 1", "key"),
    ] {
        std::fs::write(
            dir.path().join("node.toml"),
            format!(
                "[node]\nname = \"t1\"\nhostname = \"node1.magic.test\"\n\
                 [smtp]\nlisten = [\"127.0.0.1:0\"]\n[sign]\n{sign}\n"
            ),
        )
        .unwrap();
        let (ok, out, err) = cli(dir.path(), &["check-config"]);
        assert!(!ok, "{sign}: {out}");
        assert!(err.contains(key), "{sign}: {err}");
    }
}

#[cfg(feature = "interop")]
mod interop {
    use super::*;

    /// dkimpy (PyPI) verifies each signature of `data` over the test DNS:
    /// one line per signature, `<selector> <algorithm> pass|fail`.
    fn dkimpy(dns: &DnsServer, data: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("msg.eml");
        std::fs::write(&file, data).unwrap();
        let script =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/dkim_verify.py");
        let out = Command::new("python3")
            .arg(script)
            .arg("--dns")
            .arg(dns.addr.to_string())
            .arg(&file)
            .output()
            .expect("python3");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "dkim_verify.py: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    #[test]
    fn dkimpy_verifies_both_signatures_and_fails_a_changed_message() {
        let mut w = world();
        let txn = relay_one(&mut w, "dkimpy-1");
        let out = dkimpy(&w.dns, &txn.data);
        assert!(out.contains("t1-ed25519 ed25519-sha256 pass"), "{out}");
        assert!(out.contains("t1-rsa rsa-sha256 pass"), "{out}");
        let changed = txn.text().replace("quarterly figures", "quarterly f1gures");
        let out = dkimpy(&w.dns, changed.as_bytes());
        assert!(out.contains("t1-ed25519 ed25519-sha256 fail"), "{out}");
        assert!(out.contains("t1-rsa rsa-sha256 fail"), "{out}");
        let changed = txn
            .text()
            .replacen("Subject: dkimpy-1", "Subject: dkimpy-2", 1);
        let out = dkimpy(&w.dns, changed.as_bytes());
        assert!(!out.contains("t1-ed25519 ed25519-sha256 pass"), "{out}");
        assert!(!out.contains("t1-rsa rsa-sha256 pass"), "{out}");
    }
}
