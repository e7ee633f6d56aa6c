//! Tools for domain owners: the MX records to publish, and a check of what
//! the DNS actually says.
//!
//! A domain joins the network by publishing magic MX hosts (names under a
//! magic suffix) at the lowest preference number, so that every sender that
//! follows RFC 5321 tries them first, and by keeping its real MX at a higher
//! number. Trusted senders and magic nodes skip the magic names and reach the
//! real MX; the real MX refuses everyone else (see [`crate::policy`]).
//!
//! * [`zone_records`] prints those records in zone-file syntax (pure).
//! * [`check_domain`] looks the domain up through the node's resolver and
//!   reports line by line ([`Report`]): a magic host is most preferred, a real
//!   MX remains after skipping magic hosts, the hosts have addresses, and,
//!   with `probe`, that the real MX refuses a direct SMTP transaction from
//!   this host. The judgement on the MX answer is the pure [`assess`]; the
//!   address lookups and the probe are the I/O around it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::config::Config;
use crate::dns::{Dns, MxAnswer, MxHost};
use crate::names::normalize_name;

/// Preference of the magic MX records: the lowest published, tried first.
pub const MAGIC_PREFERENCE: u16 = 10;
/// Default preference of the real MX records.
pub const DEFAULT_REAL_PREFERENCE: u16 = 20;
/// Default TTL of the printed records, in seconds.
pub const DEFAULT_TTL: u32 = 3_600;
/// Real MX hosts probed at most.
const MAX_PROBES: usize = 5;
/// Bound on one probe reply (lines, octets per line).
const MAX_REPLY_LINES: usize = 100;
const MAX_REPLY_LINE: usize = 2_048;

/// Why records cannot be printed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZoneError {
    #[error("{what} {name:?} is not a valid host name")]
    BadName { what: &'static str, name: String },
    #[error("at least one {0} host is needed")]
    Missing(&'static str),
    #[error(
        "real MX {host} has preference {preference}, which must be greater than the magic \
         hosts' {MAGIC_PREFERENCE} (lower numbers are tried first)"
    )]
    Preference { host: String, preference: u16 },
    #[error("{0} is listed both as a magic host and as a real MX")]
    Both(String),
}

pub use crate::names::is_host_name;

/// The MX records to publish for `domain`, in zone-file syntax: every magic
/// host at [`MAGIC_PREFERENCE`], then each real MX at its preference, which
/// must be greater. Names are written absolute (trailing dot), lower-case.
pub fn zone_records(
    domain: &str,
    real_mx: &[(String, u16)],
    magic: &[String],
    ttl: u32,
) -> Result<String, ZoneError> {
    let check = |what: &'static str, name: &str| {
        if is_host_name(name) {
            Ok(normalize_name(name))
        } else {
            Err(ZoneError::BadName {
                what,
                name: name.to_string(),
            })
        }
    };
    let domain = check("domain", domain)?;
    if magic.is_empty() {
        return Err(ZoneError::Missing("magic"));
    }
    if real_mx.is_empty() {
        return Err(ZoneError::Missing("real MX"));
    }
    let mut magic_hosts: Vec<String> = Vec::new();
    for m in magic {
        let m = check("magic host", m)?;
        if !magic_hosts.contains(&m) {
            magic_hosts.push(m);
        }
    }
    let mut real_hosts: Vec<(String, u16)> = Vec::new();
    for (host, preference) in real_mx {
        let host = check("real MX", host)?;
        if *preference <= MAGIC_PREFERENCE {
            return Err(ZoneError::Preference {
                host,
                preference: *preference,
            });
        }
        if magic_hosts.contains(&host) {
            return Err(ZoneError::Both(host));
        }
        if !real_hosts.iter().any(|(h, _)| *h == host) {
            real_hosts.push((host, *preference));
        }
    }
    real_hosts.sort_by_key(|(_, p)| *p);

    let mut out = String::new();
    out += &format!("; MX records for {domain}: publish these in the {domain} zone.\n");
    out += &format!(
        "; Magic MX hosts at preference {MAGIC_PREFERENCE} are tried first by every sender;\n"
    );
    out += "; trusted senders skip them and deliver to the real MX directly.\n";
    for m in &magic_hosts {
        out += &format!("{domain}.\t{ttl}\tIN\tMX\t{MAGIC_PREFERENCE} {m}.\n");
    }
    for (h, p) in &real_hosts {
        out += &format!("{domain}.\t{ttl}\tIN\tMX\t{p} {h}.\n");
    }
    Ok(out)
}

/// How one line of a [`Report`] judges what it checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
    /// What was found, without judgement.
    Info,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Info => "info",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub status: Status,
    pub text: String,
}

/// The result of [`check_domain`]: one line per finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub domain: String,
    pub lines: Vec<Line>,
}

impl Report {
    fn new(domain: &str) -> Report {
        Report {
            domain: normalize_name(domain),
            lines: Vec::new(),
        }
    }

    fn push(&mut self, status: Status, text: impl Into<String>) {
        self.lines.push(Line {
            status,
            text: text.into(),
        });
    }

    /// True if no check failed (warnings allowed).
    pub fn ok(&self) -> bool {
        self.failures() == 0
    }

    pub fn failures(&self) -> usize {
        self.count(Status::Fail)
    }

    pub fn count(&self, status: Status) -> usize {
        self.lines.iter().filter(|l| l.status == status).count()
    }

    /// Lines with this status.
    pub fn with(&self, status: Status) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| l.status == status)
            .map(|l| l.text.as_str())
            .collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "check-domain {}", self.domain)?;
        for l in &self.lines {
            writeln!(f, "{:<5} {}", l.status, l.text)?;
        }
        let verdict = if self.ok() {
            "set up for magicmx"
        } else {
            "NOT set up correctly"
        };
        writeln!(
            f,
            "{} ok, {} warning(s), {} failure(s): {} is {verdict}",
            self.count(Status::Ok),
            self.count(Status::Warn),
            self.failures(),
            self.domain
        )
    }
}

/// The MX hosts of a domain split by kind, each sorted by preference.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub magic: Vec<MxHost>,
    pub real: Vec<MxHost>,
}

/// Judges a domain's MX answer (pure): adds its lines to `report` and
/// returns the hosts by kind.
pub fn assess(config: &Config, answer: &MxAnswer, report: &mut Report) -> Split {
    let domain = report.domain.clone();
    if config.node.magic_suffixes.is_empty() {
        report.push(
            Status::Fail,
            "node.magic_suffixes is empty: cannot tell magic MX hosts from real ones",
        );
        return Split::default();
    }
    let hosts = match answer {
        MxAnswer::NoDomain => {
            report.push(Status::Fail, format!("{domain} does not exist (NXDOMAIN)"));
            return Split::default();
        }
        MxAnswer::NullMx => {
            report.push(
                Status::Fail,
                format!("{domain} publishes a null MX (0 .): it takes no mail at all"),
            );
            return Split::default();
        }
        MxAnswer::NoMx => {
            report.push(
                Status::Fail,
                format!("{domain} has no MX records: publish magic MX records (magicmx zone)"),
            );
            return Split::default();
        }
        MxAnswer::Hosts(hosts) => hosts,
    };
    let mut hosts: Vec<MxHost> = hosts
        .iter()
        .map(|h| MxHost {
            preference: h.preference,
            host: normalize_name(&h.host),
        })
        .collect();
    hosts.sort_by(|a, b| (a.preference, &a.host).cmp(&(b.preference, &b.host)));
    hosts.dedup();
    let mut split = Split::default();
    for h in &hosts {
        let magic = config.is_magic_host(&h.host);
        let kind = if magic { " (magic)" } else { "" };
        report.push(
            Status::Info,
            format!("MX {} {}{kind}", h.preference, h.host),
        );
        if magic {
            split.magic.push(h.clone());
        } else {
            split.real.push(h.clone());
        }
    }
    let best = hosts.first().map_or(0, |h| h.preference);
    let names = |v: &[&MxHost]| {
        v.iter()
            .map(|h| format!("{} ({})", h.host, h.preference))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let best_magic: Vec<&MxHost> = split
        .magic
        .iter()
        .filter(|h| h.preference == best)
        .collect();
    let best_real: Vec<&MxHost> = split.real.iter().filter(|h| h.preference == best).collect();
    if split.magic.is_empty() {
        report.push(
            Status::Fail,
            format!(
                "no magic MX host (no name under {}): unknown senders reach the real MX directly",
                config.node.magic_suffixes.join(", ")
            ),
        );
    } else if best_magic.is_empty() {
        report.push(
            Status::Fail,
            format!(
                "the most preferred MX is not magic: {}; unknown senders try it before the \
                 magic hosts (give the magic hosts a lower preference number)",
                names(&best_real)
            ),
        );
    } else if !best_real.is_empty() {
        report.push(
            Status::Fail,
            format!(
                "real MX {} has the same preference as the magic hosts: senders pick at random \
                 between them (give the real MX a higher preference number)",
                names(&best_real)
            ),
        );
    } else {
        report.push(
            Status::Ok,
            format!("a magic host is most preferred: {}", names(&best_magic)),
        );
        let worst_magic = split.magic.iter().map(|h| h.preference).max().unwrap_or(0);
        let early: Vec<&MxHost> = split
            .real
            .iter()
            .filter(|h| h.preference < worst_magic)
            .collect();
        if !early.is_empty() {
            report.push(
                Status::Warn,
                format!(
                    "real MX {} is more preferred than some magic hosts: senders that fail on \
                     the first magic hosts reach it before the others",
                    names(&early)
                ),
            );
        }
    }
    if split.real.is_empty() {
        report.push(
            Status::Fail,
            "no real MX after skipping magic hosts: magic nodes and trusted senders have \
             nowhere to deliver (add the real MX at a higher preference number)",
        );
    } else {
        let real: Vec<&MxHost> = split.real.iter().collect();
        report.push(
            Status::Ok,
            format!("real MX after skipping magic hosts: {}", names(&real)),
        );
    }
    split
}

/// Looks up the selector record of each of the node's keys
/// (`<selector>-<k>._domainkey.<domain>`) and checks that it publishes
/// exactly that key (`k=` and `p=`).
pub async fn check_dkim(
    dns: &Dns,
    signing: &crate::config::Signing,
    keys: &crate::sign::Keys,
) -> Report {
    let mut report = Report::new(&signing.domain);
    for key in &keys.keys {
        let k = key.algorithm().key_type();
        let name = crate::sign::record_name(signing, key.algorithm());
        let found = match dns.txt(&name).await {
            Ok(found) => found,
            Err(e) => {
                report.push(Status::Fail, format!("cannot look up {name}: {e}"));
                continue;
            }
        };
        let keys_found: Vec<(String, Option<String>)> = found
            .iter()
            .filter(|t| t.trim_start().starts_with("v=DKIM1") || t.contains("p="))
            .map(|t| crate::sign::parse_record(t))
            .collect();
        let ours = crate::sign::base64(key.public_key());
        match keys_found.as_slice() {
            [] => report.push(
                Status::Fail,
                format!("{name}: no DKIM key record (publish the output of `magicmx zone --dkim`)"),
            ),
            [(kk, Some(p))] if kk == k && *p == ours => {
                report.push(Status::Ok, format!("{name} publishes the node's {k} key"))
            }
            [(kk, _)] if kk != k => report.push(
                Status::Fail,
                format!("{name}: the record is k={kk}, the node's key is k={k}"),
            ),
            [_] => report.push(
                Status::Fail,
                format!("{name}: the record publishes another key than the node's {k} key"),
            ),
            _ => report.push(
                Status::Fail,
                format!(
                    "{name}: {} key records; verifiers may try only one: publish one",
                    keys_found.len()
                ),
            ),
        }
    }
    report
}

/// Looks `domain` up and reports on its setup; with `probe`, also checks
/// that its real MX refuses a direct transaction from this host.
pub async fn check_domain(dns: &Dns, config: &Config, domain: &str, probe: bool) -> Report {
    let mut report = Report::new(domain);
    if !is_host_name(domain) {
        report.push(Status::Fail, format!("{domain:?} is not a domain name"));
        return report;
    }
    let answer = match dns.mx(&report.domain).await {
        Ok(a) => a,
        Err(e) => {
            report.push(Status::Fail, format!("cannot look up the MX records: {e}"));
            return report;
        }
    };
    let split = assess(config, &answer, &mut report);
    if split.magic.is_empty() && split.real.is_empty() {
        return report;
    }

    let mut magic_resolved = 0;
    for h in &split.magic {
        match dns.addresses(&h.host).await {
            Ok(a) if !a.is_empty() => magic_resolved += 1,
            Ok(_) => report.push(
                Status::Warn,
                format!("magic host {} has no address", h.host),
            ),
            Err(e) => report.push(Status::Warn, format!("magic host {}: {e}", h.host)),
        }
    }
    if !split.magic.is_empty() && magic_resolved == 0 {
        report.push(
            Status::Fail,
            "no magic host has an address: unknown senders fall through to the real MX",
        );
    }

    let mut targets: Vec<(String, IpAddr)> = Vec::new();
    for h in &split.real {
        match dns.addresses(&h.host).await {
            Ok(a) if !a.is_empty() => {
                let list: Vec<String> = a.iter().map(IpAddr::to_string).collect();
                report.push(
                    Status::Ok,
                    format!("real MX {} has address(es) {}", h.host, list.join(", ")),
                );
                targets.push((h.host.clone(), a[0]));
            }
            Ok(_) => report.push(Status::Fail, format!("real MX {} has no address", h.host)),
            Err(e) => report.push(Status::Fail, format!("real MX {}: {e}", h.host)),
        }
    }
    if !probe {
        return report;
    }
    if targets.is_empty() {
        report.push(Status::Fail, "probe: no real MX address to probe");
        return report;
    }
    let port = config.relay.port;
    let connect_timeout = config.relay.connect_timeout.0.min(Duration::from_secs(30));
    let command_timeout = config.relay.command_timeout.0.min(Duration::from_secs(30));
    for (host, ip) in targets.into_iter().take(MAX_PROBES) {
        let addr = SocketAddr::new(ip, port);
        let probe = Probe {
            addr,
            helo: &config.node.hostname,
            domain: &report.domain,
            connect_timeout,
            command_timeout,
        };
        match probe.run().await {
            Ok(ProbeOutcome::Refused {
                local,
                stage,
                reply,
            }) => report.push(
                Status::Ok,
                format!(
                    "real MX {host} [{addr}] refuses a direct transaction from this host \
                     ({local}): {stage} answered {reply}"
                ),
            ),
            Ok(ProbeOutcome::Accepted { local, reply }) => report.push(
                Status::Fail,
                format!(
                    "real MX {host} [{addr}] is NOT protected: it accepted RCPT TO \
                     <postmaster@{}> directly from this host ({local}): {reply} (run the probe \
                     from a host that is neither trusted nor a magic node; protect the real MX \
                     with magicmx policy)",
                    report.domain
                ),
            ),
            Err(e) => report.push(
                Status::Fail,
                format!("real MX {host} [{addr}]: cannot probe: {e}"),
            ),
        }
    }
    report
}

/// A direct SMTP transaction attempt, stopped before DATA.
struct Probe<'a> {
    addr: SocketAddr,
    helo: &'a str,
    domain: &'a str,
    connect_timeout: Duration,
    command_timeout: Duration,
}

#[derive(Debug)]
enum ProbeOutcome {
    /// Refused at `stage` with `reply`: protected.
    Refused {
        local: IpAddr,
        stage: &'static str,
        reply: String,
    },
    /// RCPT accepted: not protected.
    Accepted { local: IpAddr, reply: String },
}

impl Probe<'_> {
    async fn run(&self) -> Result<ProbeOutcome, String> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| "connection timed out".to_string())?
            .map_err(|e| format!("cannot connect: {e}"))?;
        let local = stream.local_addr().map_err(|e| e.to_string())?.ip();
        let mut conn = BufReader::new(stream);
        let refused = |stage, reply| {
            Ok(ProbeOutcome::Refused {
                local,
                stage,
                reply,
            })
        };
        let (code, text) = self.reply(&mut conn).await?;
        if code / 100 != 2 {
            return refused("the greeting", text);
        }
        let (code, text) = self
            .command(&mut conn, &format!("EHLO {}", self.helo))
            .await?;
        if code / 100 != 2 {
            let (code, text2) = self
                .command(&mut conn, &format!("HELO {}", self.helo))
                .await?;
            if code / 100 != 2 {
                return refused("EHLO", format!("{text} / HELO: {text2}"));
            }
        }
        let (code, text) = self.command(&mut conn, "MAIL FROM:<>").await?;
        if code / 100 != 2 {
            self.quit(&mut conn).await;
            return refused("MAIL FROM", text);
        }
        let rcpt = format!("RCPT TO:<postmaster@{}>", self.domain);
        let (code, text) = self.command(&mut conn, &rcpt).await?;
        let _ = self.command(&mut conn, "RSET").await;
        self.quit(&mut conn).await;
        if code / 100 == 2 {
            Ok(ProbeOutcome::Accepted { local, reply: text })
        } else {
            refused("RCPT TO", text)
        }
    }

    async fn quit(&self, conn: &mut BufReader<TcpStream>) {
        let _ = self.command(conn, "QUIT").await;
        let _ = conn.get_mut().shutdown().await;
    }

    async fn command(
        &self,
        conn: &mut BufReader<TcpStream>,
        line: &str,
    ) -> Result<(u16, String), String> {
        let bytes = format!("{line}\r\n");
        let write = conn.get_mut().write_all(bytes.as_bytes());
        tokio::time::timeout(self.command_timeout, write)
            .await
            .map_err(|_| format!("{line}: timed out"))?
            .map_err(|e| format!("{line}: {e}"))?;
        self.reply(conn).await
    }

    /// One (multi-line) reply: its code and its lines joined.
    async fn reply(&self, conn: &mut BufReader<TcpStream>) -> Result<(u16, String), String> {
        let mut text: Vec<String> = Vec::new();
        let read = async {
            loop {
                let mut line = Vec::new();
                let n = (&mut *conn)
                    .take(MAX_REPLY_LINE as u64)
                    .read_until(b'\n', &mut line)
                    .await
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed".to_string());
                }
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                let code = line
                    .get(..3)
                    .and_then(|c| c.parse::<u16>().ok())
                    .filter(|c| (200..600).contains(c))
                    .ok_or_else(|| format!("malformed reply {line:?}"))?;
                let last = line.as_bytes().get(3) != Some(&b'-');
                text.push(line);
                if last {
                    return Ok(code);
                }
                if text.len() >= MAX_REPLY_LINES {
                    return Err("reply too long".to_string());
                }
            }
        };
        let code = tokio::time::timeout(self.command_timeout, read)
            .await
            .map_err(|_| "no reply in time".to_string())??;
        Ok((code, text.last().cloned().unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let mut c = Config::parse("[node]\nname = \"t\"\nhostname = \"mx1.magic.test\"\n").unwrap();
        c.node.magic_suffixes = vec![".magic.test".into()];
        c
    }

    fn hosts(list: &[(u16, &str)]) -> MxAnswer {
        MxAnswer::Hosts(
            list.iter()
                .map(|(p, h)| MxHost {
                    preference: *p,
                    host: h.to_string(),
                })
                .collect(),
        )
    }

    fn assessed(answer: MxAnswer) -> (Report, Split) {
        let mut r = Report::new("example.test");
        let s = assess(&config(), &answer, &mut r);
        (r, s)
    }

    #[test]
    fn records_magic_first() {
        let out = zone_records(
            "Example.ORG.",
            &[("mail.example.org".into(), 20)],
            &[
                "mx2.magic.example.net".into(),
                "mx1.magic.example.net.".into(),
            ],
            300,
        )
        .unwrap();
        let records: Vec<&str> = out.lines().filter(|l| !l.starts_with(';')).collect();
        assert_eq!(
            records,
            [
                "example.org.\t300\tIN\tMX\t10 mx2.magic.example.net.",
                "example.org.\t300\tIN\tMX\t10 mx1.magic.example.net.",
                "example.org.\t300\tIN\tMX\t20 mail.example.org.",
            ]
        );
    }

    #[test]
    fn records_errors() {
        let real = |p| vec![("mail.example.org".to_string(), p)];
        let magic = vec!["mx1.magic.example.net".to_string()];
        assert!(matches!(
            zone_records("example.org", &real(10), &magic, 300),
            Err(ZoneError::Preference { preference: 10, .. })
        ));
        assert!(zone_records("example.org", &real(11), &magic, 300).is_ok());
        assert_eq!(
            zone_records("example.org", &real(20), &[], 300),
            Err(ZoneError::Missing("magic"))
        );
        assert_eq!(
            zone_records("example.org", &[], &magic, 300),
            Err(ZoneError::Missing("real MX"))
        );
        assert!(matches!(
            zone_records("exa mple.org", &real(20), &magic, 300),
            Err(ZoneError::BadName { what: "domain", .. })
        ));
        assert!(matches!(
            zone_records("example.org", &[("-bad".into(), 20)], &magic, 300),
            Err(ZoneError::BadName { .. })
        ));
        assert_eq!(
            zone_records(
                "example.org",
                &[("MX1.magic.example.net".into(), 20)],
                &magic,
                300
            ),
            Err(ZoneError::Both("mx1.magic.example.net".into()))
        );
        let e = zone_records("example.org", &real(5), &magic, 300).unwrap_err();
        assert!(e.to_string().contains("greater"), "{e}");
    }

    #[test]
    fn good_domain() {
        let (r, s) = assessed(hosts(&[(20, "mail.example.test"), (10, "mx1.magic.test")]));
        assert!(r.ok(), "{r}");
        assert_eq!(r.count(Status::Ok), 2, "{r}");
        assert_eq!(s.real.len(), 1);
        assert_eq!(s.magic.len(), 1);
        assert!(r
            .to_string()
            .contains("a magic host is most preferred: mx1.magic.test (10)"));
    }

    #[test]
    fn magic_not_most_preferred() {
        let (r, _) = assessed(hosts(&[(5, "mail.example.test"), (10, "mx1.magic.test")]));
        assert!(!r.ok());
        assert!(
            r.with(Status::Fail)[0].contains("most preferred MX is not magic"),
            "{r}"
        );
    }

    #[test]
    fn same_preference_fails() {
        let (r, _) = assessed(hosts(&[(10, "mail.example.test"), (10, "mx1.magic.test")]));
        assert!(!r.ok());
        assert!(r.with(Status::Fail)[0].contains("same preference"), "{r}");
    }

    #[test]
    fn interleaved_warns() {
        let (r, _) = assessed(hosts(&[
            (10, "mx1.magic.test"),
            (15, "mail.example.test"),
            (20, "mx2.magic.test"),
        ]));
        assert!(r.ok(), "{r}");
        assert_eq!(r.count(Status::Warn), 1, "{r}");
    }

    #[test]
    fn only_magic_or_only_real() {
        let (r, _) = assessed(hosts(&[(10, "mx1.magic.test"), (20, "mx2.magic.test")]));
        assert!(!r.ok());
        assert!(r.with(Status::Fail)[0].contains("no real MX"), "{r}");
        let (r, _) = assessed(hosts(&[(10, "mail.example.test")]));
        assert!(!r.ok());
        assert!(r.with(Status::Fail)[0].contains("no magic MX host"), "{r}");
    }

    #[test]
    fn negative_answers_fail() {
        for (answer, word) in [
            (MxAnswer::NullMx, "null MX"),
            (MxAnswer::NoMx, "no MX records"),
            (MxAnswer::NoDomain, "NXDOMAIN"),
        ] {
            let (r, _) = assessed(answer);
            assert!(!r.ok());
            assert!(r.with(Status::Fail)[0].contains(word), "{r}");
        }
    }

    #[test]
    fn host_names() {
        assert!(is_host_name("a.b-c.example."));
        assert!(is_host_name("_dmarc.example"));
        assert!(!is_host_name(""));
        assert!(!is_host_name("a..b"));
        assert!(!is_host_name("a b"));
        assert!(!is_host_name(&"a".repeat(64)));
    }
}
