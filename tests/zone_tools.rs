//! `magicmx zone` and `magicmx check-domain`, end to end: the printed
//! records are parsed and served by a real DNS server (hickory, in-process),
//! then `check-domain` reads them back through the node's resolver and, with
//! `--probe`, tries a direct transaction on SMTP sinks standing in for a
//! protected and an unprotected real MX.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::node::BIN;
use common::{DnsServer, NodeConf, Rec, Sink};

/// Runs `magicmx ARGS` and returns (success, stdout, stderr).
fn magicmx(args: &[&str]) -> (bool, String, String) {
    let out: Output = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN} {args:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// Parses the MX records of `magicmx zone` output into test DNS records,
/// checking the zone-file syntax on the way.
fn parse_zone(text: &str) -> Vec<Rec> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 6, "zone line {line:?}");
        assert!(f[0].ends_with('.'), "owner must be absolute: {line:?}");
        f[1].parse::<u32>()
            .unwrap_or_else(|_| panic!("TTL in {line:?}"));
        assert_eq!((f[2], f[3]), ("IN", "MX"), "{line:?}");
        let pref: u16 = f[4]
            .parse()
            .unwrap_or_else(|_| panic!("preference in {line:?}"));
        assert!(f[5].ends_with('.'), "exchange must be absolute: {line:?}");
        out.push(Rec::Mx(
            leak(f[0].trim_end_matches('.')),
            pref,
            leak(f[5].trim_end_matches('.')),
        ));
    }
    out
}

/// Writes a node config resolving through `dns`, relaying on `relay_port`.
fn config(dir: &Path, dns: &DnsServer, relay_port: u16) -> PathBuf {
    let conf = NodeConf::new(dns.addr, relay_port);
    let path = dir.join(format!("node-{relay_port}.toml"));
    std::fs::write(&path, conf.to_toml(&dir.join("data"))).unwrap();
    path
}

fn check(domain: &str, config: &Path, probe: bool) -> (bool, String) {
    let cfg = config.to_str().unwrap();
    let mut args = vec!["check-domain", domain, "--config", cfg];
    if probe {
        args.push("--probe");
    }
    let (ok, stdout, stderr) = magicmx(&args);
    (ok, format!("{stdout}\n[stderr] {stderr}"))
}

fn status_line<'a>(report: &'a str, status: &str, words: &str) -> Option<&'a str> {
    report
        .lines()
        .find(|l| l.starts_with(status) && l.contains(words))
}

#[test]
fn zone_output_loads_and_checks_out() {
    let (ok, zone, err) = magicmx(&[
        "zone",
        "example.test",
        "--real-mx",
        "mail.example.test",
        "--magic",
        "mx1.magic.test",
        "mx2.magic.test",
        "--ttl",
        "300",
    ]);
    assert!(ok, "{err}");
    let mut records = parse_zone(&zone);
    assert_eq!(records.len(), 3, "{zone}");
    let prefs: Vec<(String, u16)> = records
        .iter()
        .map(|r| match r {
            Rec::Mx(_, p, h) => (h.to_string(), *p),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        prefs,
        [
            ("mx1.magic.test".to_string(), 10),
            ("mx2.magic.test".to_string(), 10),
            ("mail.example.test".to_string(), 20),
        ]
    );

    // The protected real MX refuses direct mail at RCPT; the magic hosts
    // have addresses but nothing listens there (the check does not use them).
    let protected = Sink::builder()
        .rcpt_rule(|_| Some("450 4.7.1 deliver through the published MX hosts".into()))
        .start("127.0.91.1", 0)
        .unwrap();
    records.extend([
        Rec::A("mx1.magic.test", "127.0.91.10"),
        Rec::A("mx2.magic.test", "127.0.91.11"),
        Rec::A("mail.example.test", "127.0.91.1"),
    ]);
    let dns = DnsServer::start(&records);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &dns, protected.addr.port());

    let (ok, report) = check("example.test", &cfg, false);
    assert!(ok, "{report}");
    assert!(
        status_line(
            &report,
            "ok",
            "a magic host is most preferred: mx1.magic.test (10), mx2.magic.test (10)"
        )
        .is_some(),
        "{report}"
    );
    assert!(
        status_line(
            &report,
            "ok",
            "real MX after skipping magic hosts: mail.example.test (20)"
        )
        .is_some(),
        "{report}"
    );
    assert!(!report.contains("FAIL"), "{report}");

    let (ok, report) = check("example.test", &cfg, true);
    assert!(ok, "{report}");
    let line = status_line(&report, "ok", "refuses a direct transaction").expect(&report);
    assert!(line.contains("450 4.7.1"), "{line}");
    assert_eq!(protected.rcpt_attempts("postmaster@example.test"), 1);
    assert!(
        protected.transactions().is_empty(),
        "the probe never sends DATA"
    );
}

#[test]
fn probe_finds_an_unprotected_real_mx() {
    let open = Sink::start("127.0.92.1");
    let dns = DnsServer::start(&[
        Rec::Mx("open.test", 10, "mx1.magic.test"),
        Rec::Mx("open.test", 20, "mail.open.test"),
        Rec::A("mx1.magic.test", "127.0.92.10"),
        Rec::A("mail.open.test", "127.0.92.1"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &dns, open.addr.port());
    // The records alone are fine.
    let (ok, report) = check("open.test", &cfg, false);
    assert!(ok, "{report}");
    // The probe shows the real MX takes mail from anyone.
    let (ok, report) = check("open.test", &cfg, true);
    assert!(!ok, "{report}");
    assert!(
        status_line(&report, "FAIL", "NOT protected").is_some(),
        "{report}"
    );
    assert!(report.contains("check(s) failed"), "{report}");
    assert_eq!(open.rcpt_attempts("postmaster@open.test"), 1);
    assert!(open.transactions().is_empty());
}

#[test]
fn probe_of_an_unreachable_real_mx_fails() {
    let port = Sink::reserve_port("127.0.93.1");
    let dns = DnsServer::start(&[
        Rec::Mx("down.test", 10, "mx1.magic.test"),
        Rec::Mx("down.test", 20, "mail.down.test"),
        Rec::A("mx1.magic.test", "127.0.93.10"),
        Rec::A("mail.down.test", "127.0.93.1"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let (ok, report) = check("down.test", &config(dir.path(), &dns, port), true);
    assert!(!ok, "{report}");
    assert!(
        status_line(&report, "FAIL", "cannot probe").is_some(),
        "{report}"
    );
}

#[test]
fn misconfigured_domains() {
    let dns = DnsServer::start(&[
        // The real MX is tried first.
        Rec::Mx("first.test", 10, "mail.first.test"),
        Rec::Mx("first.test", 20, "mx1.magic.test"),
        Rec::A("mail.first.test", "127.0.94.1"),
        // Same preference: a coin toss.
        Rec::Mx("tie.test", 10, "mail.tie.test"),
        Rec::Mx("tie.test", 10, "mx1.magic.test"),
        Rec::A("mail.tie.test", "127.0.94.2"),
        // Only magic hosts: nowhere to relay.
        Rec::Mx("onlymagic.test", 10, "mx1.magic.test"),
        Rec::Mx("onlymagic.test", 20, "mx2.magic.test"),
        // No magic host at all.
        Rec::Mx("plain.test", 10, "mail.plain.test"),
        Rec::A("mail.plain.test", "127.0.94.3"),
        // Null MX.
        Rec::NullMx("nullmx.test"),
        // No MX at all.
        Rec::A("nomx.test", "127.0.94.4"),
        // Real MX without an address.
        Rec::Mx("noaddr.test", 10, "mx1.magic.test"),
        Rec::Mx("noaddr.test", 20, "mail.noaddr.test"),
        Rec::Txt("mail.noaddr.test", "no address here"),
        Rec::A("mx1.magic.test", "127.0.94.10"),
        Rec::A("mx2.magic.test", "127.0.94.11"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &dns, 2525);
    for (domain, words) in [
        (
            "first.test",
            "the most preferred MX is not magic: mail.first.test (10)",
        ),
        ("tie.test", "same preference as the magic hosts"),
        ("onlymagic.test", "no real MX after skipping magic hosts"),
        ("plain.test", "no magic MX host"),
        ("nullmx.test", "null MX"),
        ("nomx.test", "no MX records"),
        ("missing.test", "does not exist (NXDOMAIN)"),
        ("noaddr.test", "real MX mail.noaddr.test has no address"),
    ] {
        let (ok, report) = check(domain, &cfg, false);
        assert!(!ok, "{domain} must fail:\n{report}");
        assert!(
            status_line(&report, "FAIL", words).is_some(),
            "{domain}: {words:?}\n{report}"
        );
    }
}

#[test]
fn zone_command_errors_and_defaults() {
    // The real MX must come after the magic hosts.
    let (ok, _, err) = magicmx(&[
        "zone",
        "example.test",
        "--real-mx",
        "mail.example.test",
        "--real-preference",
        "10",
        "--magic",
        "mx1.magic.test",
    ]);
    assert!(!ok);
    assert!(err.contains("greater"), "{err}");
    let (ok, _, err) = magicmx(&[
        "zone",
        "bad domain",
        "--real-mx",
        "m.test",
        "--magic",
        "x.magic.test",
    ]);
    assert!(!ok);
    assert!(err.contains("not a valid host name"), "{err}");

    // Without --magic: the node's own host name, from its config.
    let dns = DnsServer::start(&[Rec::A("unused.test", "127.0.0.1")]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &dns, 2525);
    let (ok, zone, err) = magicmx(&[
        "zone",
        "example.test",
        "--real-mx",
        "mail.example.test",
        "--real-preference",
        "50",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let records = parse_zone(&zone);
    assert_eq!(records.len(), 2, "{zone}");
    assert!(zone.contains("IN\tMX\t10 node1.magic.test."), "{zone}");
    assert!(zone.contains("IN\tMX\t50 mail.example.test."), "{zone}");
}
