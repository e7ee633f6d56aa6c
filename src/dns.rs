//! The one DNS resolver of the node.
//!
//! Accept checks (`mx_delegation`), the relay's route planning and DNSBL
//! lookups all go through [`Dns`], a thin wrapper around hickory's
//! `TokioResolver`. It answers the two questions mail routing asks, in the
//! terms mail routing needs:
//!
//! * [`Dns::mx`]: the MX set of a domain, with the negative answers told
//!   apart, because they mean different things to a mail relay: NXDOMAIN
//!   (no such domain: permanent failure), NOERROR/NODATA (the domain exists
//!   but has no MX: implicit MX), a null MX (RFC 7505: the domain takes no
//!   mail), and a temporary failure (timeout, SERVFAIL, network: retry later).
//! * [`Dns::addresses`]: the A and AAAA records of a host.
//!
//! Every query is sent for an absolute name (trailing dot), so the search
//! domains of `resolv.conf` are never appended. Nameservers come from
//! `[dns] nameservers` (UDP, then TCP on truncation), or from the
//! `nameserver` lines of `/etc/resolv.conf` when that list is empty. The cache
//! is small and negative answers are kept only briefly.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts, ServerOrderingStrategy,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData};
use hickory_resolver::TokioResolver;

use crate::config::DnsConfig;

/// Where the system resolver configuration lives (read when no nameserver is configured).
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Responses kept in the cache.
const CACHE_SIZE: u64 = 1_024;
/// Upper bound on how long a positive answer is cached, whatever its TTL.
const POSITIVE_MAX_TTL: Duration = Duration::from_secs(300);
/// Upper bound on how long NXDOMAIN/NODATA is cached.
const NEGATIVE_MAX_TTL: Duration = Duration::from_secs(30);

/// The address of an RFC 5321 address literal (4.1.3): `[192.0.2.1]` or
/// `[IPv6:2001:db8::1]`. Anything else, a bare `192.0.2.1` included, is a
/// domain name.
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    let inner = host.strip_prefix('[')?.strip_suffix(']')?;
    match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => inner[5..]
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(IpAddr::V6),
        _ => inner.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4),
    }
}

/// A DNS failure. Negative answers that mean something for mail routing
/// (NXDOMAIN, NODATA, null MX) are not errors of [`Dns::mx`]: see [`MxAnswer`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// Timeout, SERVFAIL, REFUSED, network error: the answer may differ later.
    #[error("temporary DNS failure: {0}")]
    Temporary(String),
    /// NXDOMAIN for a host name ([`Dns::addresses`] only).
    #[error("{0}: no such domain")]
    NoDomain(String),
    /// The name cannot be a DNS name (empty, label too long, bad characters).
    #[error("invalid domain name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    /// The resolver could not be set up.
    #[error("DNS resolver setup: {0}")]
    Setup(String),
}

impl DnsError {
    /// True if asking again later may give a different answer.
    pub fn is_temporary(&self) -> bool {
        matches!(self, DnsError::Temporary(_))
    }
}

/// One usable MX host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    pub preference: u16,
    /// Lower-case, without the trailing dot.
    pub host: String,
}

/// What the DNS says about a domain's mail exchangers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxAnswer {
    /// The MX records, in the order received (not sorted).
    Hosts(Vec<MxHost>),
    /// A single MX whose exchange is `.` (RFC 7505): the domain accepts no mail.
    NullMx,
    /// The domain exists but has no MX record: its own name is the implicit MX.
    NoMx,
    /// NXDOMAIN: the domain does not exist.
    NoDomain,
}

/// The node's resolver. Cheap to clone: clones share the connections and cache.
#[derive(Clone)]
pub struct Dns {
    resolver: Arc<TokioResolver>,
    /// Overall bound on one lookup, retries included.
    deadline: Duration,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns")
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl Dns {
    /// The resolver itself (a clone shares connections and cache), for
    /// checks done by other crates (SPF through mail-auth).
    pub fn resolver(&self) -> TokioResolver {
        (*self.resolver).clone()
    }

    /// Builds the resolver from `[dns]`. Does no I/O except reading
    /// `/etc/resolv.conf` when no nameserver is configured.
    pub fn new(cfg: &DnsConfig) -> Result<Dns, DnsError> {
        let (servers, use_hosts) = if cfg.nameservers.is_empty() {
            let text = std::fs::read_to_string(RESOLV_CONF).unwrap_or_default();
            (system_nameservers(&text), ResolveHosts::Auto)
        } else {
            // Configured servers are the whole truth: tests and operators
            // that set them do not want /etc/hosts answering instead.
            (cfg.nameservers.clone(), ResolveHosts::Never)
        };
        let name_servers = servers
            .iter()
            .map(|addr| {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for conn in &mut ns.connections {
                    conn.port = addr.port();
                }
                ns
            })
            .collect();
        let config = ResolverConfig::from_parts(None, Vec::new(), name_servers);

        let mut opts = ResolverOpts::default();
        opts.timeout = cfg.timeout.0;
        opts.attempts = 2;
        opts.cache_size = CACHE_SIZE;
        opts.positive_max_ttl = Some(POSITIVE_MAX_TTL);
        opts.negative_max_ttl = Some(NEGATIVE_MAX_TTL);
        opts.use_hosts_file = use_hosts;
        opts.server_ordering_strategy = ServerOrderingStrategy::UserProvidedOrder;
        opts.try_tcp_on_error = true;

        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| DnsError::Setup(e.to_string()))?;
        let attempts = u32::try_from(servers.len().max(1)).unwrap_or(u32::MAX);
        let deadline = cfg
            .timeout
            .0
            .saturating_mul(attempts.saturating_mul(2).saturating_add(1));
        Ok(Dns {
            resolver: Arc::new(resolver),
            deadline,
        })
    }

    /// The MX set of `domain`. NXDOMAIN, NODATA and null MX are answers,
    /// not errors; an error is temporary or an unusable name.
    pub async fn mx(&self, domain: &str) -> Result<MxAnswer, DnsError> {
        if ip_literal(domain).is_some() {
            // RFC 5321 5.1: an address literal is delivered to that address,
            // as if it were an implicit MX.
            return Ok(MxAnswer::NoMx);
        }
        let name = absolute_name(domain)?;
        let result = tokio::time::timeout(self.deadline, self.resolver.mx_lookup(name)).await;
        let lookup = match result {
            Err(_) => return Err(DnsError::Temporary(format!("MX {domain}: timed out"))),
            Ok(Ok(lookup)) => lookup,
            Ok(Err(err)) => {
                return match negative(&err) {
                    Some(Negative::NxDomain) => Ok(MxAnswer::NoDomain),
                    Some(Negative::NoData) => Ok(MxAnswer::NoMx),
                    None => Err(DnsError::Temporary(format!("MX {domain}: {err}"))),
                }
            }
        };
        let records: Vec<(u16, &Name)> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some((mx.preference, &mx.exchange)),
                _ => None,
            })
            .collect();
        Ok(classify_mx(&records))
    }

    /// The IPv4 and IPv6 addresses of `host`, IPv4 first. An IP literal is
    /// returned as is. A host that exists but has no address gives an empty
    /// list; NXDOMAIN gives [`DnsError::NoDomain`].
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        // An MX or implicit-MX host that is an address (bare or bracketed).
        if let Some(ip) = ip_literal(host).or_else(|| host.parse().ok()) {
            return Ok(vec![ip]);
        }
        let name = absolute_name(host)?;
        let v4 = async {
            tokio::time::timeout(self.deadline, self.resolver.ipv4_lookup(name.clone())).await
        };
        let v6 = async {
            tokio::time::timeout(self.deadline, self.resolver.ipv6_lookup(name.clone())).await
        };
        let (v4, v6) = tokio::join!(v4, v6);
        let mut out = Vec::new();
        let mut nxdomain = false;
        let mut temporary = None;
        for (kind, result) in [("A", v4), ("AAAA", v6)] {
            match result {
                Err(_) => temporary = Some(format!("{kind} {host}: timed out")),
                Ok(Ok(lookup)) => {
                    out.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                        _ => None,
                    }))
                }
                Ok(Err(err)) => match negative(&err) {
                    Some(Negative::NxDomain) => nxdomain = true,
                    Some(Negative::NoData) => {}
                    None => temporary = Some(format!("{kind} {host}: {err}")),
                },
            }
        }
        // One family answering is enough to try delivery; nothing at all plus
        // a failure may be the failure's fault, so it is temporary.
        if !out.is_empty() {
            out.dedup();
            return Ok(out);
        }
        if let Some(reason) = temporary {
            return Err(DnsError::Temporary(reason));
        }
        if nxdomain {
            return Err(DnsError::NoDomain(host.to_string()));
        }
        Ok(out)
    }
}

impl Dns {
    /// The TXT records at `name`, each record's strings joined (RFC 7208
    /// 3.3, RFC 6376 3.6.2.2). NXDOMAIN and NODATA give no records.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let fqdn = absolute_name(name)?;
        match tokio::time::timeout(self.deadline, self.resolver.txt_lookup(fqdn)).await {
            Err(_) => Err(DnsError::Temporary(format!("TXT {name}: timed out"))),
            Ok(Ok(lookup)) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => Some(
                        t.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Ok(Err(err)) => match negative(&err) {
                Some(_) => Ok(Vec::new()),
                None => Err(DnsError::Temporary(format!("TXT {name}: {err}"))),
            },
        }
    }
}

/// The A records at a name, for DNSBL lookups: each address with its TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ARecords {
    /// The addresses in the answer (CNAMEs followed), with their TTLs in seconds.
    Found(Vec<(Ipv4Addr, u32)>),
    /// NXDOMAIN or NODATA; `ttl` is the negative TTL when the server sent its SOA.
    Nothing { ttl: Option<u32> },
}

impl Dns {
    /// The A records of `name` with their TTLs. NXDOMAIN and NODATA are
    /// [`ARecords::Nothing`]; anything else that is not an answer is an error.
    /// No deadline beyond the resolver's own: callers with a budget (DNSBL)
    /// wrap the call in theirs.
    pub async fn a_records(&self, name: &str) -> Result<ARecords, DnsError> {
        let fqdn = absolute_name(name)?;
        let result = tokio::time::timeout(self.deadline, self.resolver.ipv4_lookup(fqdn)).await;
        match result {
            Err(_) => Err(DnsError::Temporary(format!("A {name}: timed out"))),
            Ok(Ok(lookup)) => Ok(ARecords::Found(
                lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some((a.0, r.ttl)),
                        _ => None,
                    })
                    .collect(),
            )),
            Ok(Err(err)) => match (negative(&err), &err) {
                (Some(_), NetError::Dns(hickory_resolver::net::DnsError::NoRecordsFound(nr))) => {
                    Ok(ARecords::Nothing {
                        ttl: nr.negative_ttl,
                    })
                }
                _ => Err(DnsError::Temporary(format!("A {name}: {err}"))),
            },
        }
    }
}

/// The negative answers that are facts about the name, not failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Negative {
    NxDomain,
    NoData,
}

/// hickory 0.26 reports NXDOMAIN and NOERROR/NODATA as
/// `NetError::Dns(DnsError::NoRecordsFound(NoRecords { response_code, .. }))`;
/// SERVFAIL, REFUSED and friends are `DnsError::ResponseCode`, and timeouts
/// and I/O have their own variants. Only the first kind is an answer.
fn negative(err: &NetError) -> Option<Negative> {
    if let NetError::Dns(hickory_resolver::net::DnsError::NoRecordsFound(nr)) = err {
        return match nr.response_code {
            ResponseCode::NXDomain => Some(Negative::NxDomain),
            ResponseCode::NoError => Some(Negative::NoData),
            _ => None,
        };
    }
    None
}

/// Turns MX records into an answer: a lone `.` exchange is a null MX;
/// `.` among other records is ignored (RFC 7505 says it must not happen).
fn classify_mx(records: &[(u16, &Name)]) -> MxAnswer {
    if records.is_empty() {
        return MxAnswer::NoMx;
    }
    if records.len() == 1 && records[0].1.is_root() {
        return MxAnswer::NullMx;
    }
    let hosts: Vec<MxHost> = records
        .iter()
        .filter(|(_, exchange)| !exchange.is_root())
        .map(|(preference, exchange)| MxHost {
            preference: *preference,
            host: crate::names::normalize_name(&exchange.to_ascii()),
        })
        .collect();
    if hosts.is_empty() {
        // Only `.` records, several of them: still a domain that takes no mail.
        return MxAnswer::NullMx;
    }
    MxAnswer::Hosts(hosts)
}

/// `name` as an absolute DNS name (trailing dot), IDNA-encoded if needed.
fn absolute_name(name: &str) -> Result<Name, DnsError> {
    let trimmed = name.trim();
    if trimmed.is_empty() || trimmed == "." {
        return Err(DnsError::InvalidName {
            name: name.to_string(),
            reason: "empty name".into(),
        });
    }
    let fqdn = if trimmed.ends_with('.') {
        trimmed.to_string()
    } else {
        format!("{trimmed}.")
    };
    let parsed = Name::from_utf8(&fqdn).or_else(|_| Name::from_ascii(&fqdn));
    match parsed {
        Ok(n) if n.is_fqdn() => Ok(n),
        Ok(_) => Err(DnsError::InvalidName {
            name: name.to_string(),
            reason: "not an absolute name".into(),
        }),
        Err(e) => Err(DnsError::InvalidName {
            name: name.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// The `nameserver` lines of a resolv.conf; 127.0.0.1:53 if there is none
/// (what the C library does too).
fn system_nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = resolv_conf
        .lines()
        .map(|l| l.split(['#', ';']).next().unwrap_or(""))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => {
                    // Drop an IPv6 zone (`fe80::1%eth0`): not expressible here.
                    let addr = addr.split('%').next().unwrap_or(addr);
                    addr.parse::<IpAddr>()
                        .ok()
                        .map(|ip| SocketAddr::new(ip, 53))
                }
                _ => None,
            }
        })
        .collect();
    if out.is_empty() {
        out.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 53));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    #[test]
    fn absolute_names_get_the_trailing_dot() {
        let n = absolute_name("Example.ORG").unwrap();
        assert!(n.is_fqdn());
        assert_eq!(n.to_ascii().to_lowercase(), "example.org.");
        assert!(absolute_name("example.org.").unwrap().is_fqdn());
        assert!(absolute_name("bücher.example")
            .unwrap()
            .to_ascii()
            .starts_with("xn--"));
        assert!(absolute_name("").is_err());
        assert!(absolute_name(".").is_err());
        assert!(absolute_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn mx_classification() {
        let root = Name::root();
        let a = name("MX1.Example.org.");
        let b = name("mx2.example.org.");
        assert_eq!(classify_mx(&[]), MxAnswer::NoMx);
        assert_eq!(classify_mx(&[(0, &root)]), MxAnswer::NullMx);
        assert_eq!(
            classify_mx(&[(10, &a), (20, &b)]),
            MxAnswer::Hosts(vec![
                MxHost {
                    preference: 10,
                    host: "mx1.example.org".into()
                },
                MxHost {
                    preference: 20,
                    host: "mx2.example.org".into()
                },
            ])
        );
        // A stray "." next to real hosts is dropped.
        assert_eq!(
            classify_mx(&[(0, &root), (20, &b)]),
            MxAnswer::Hosts(vec![MxHost {
                preference: 20,
                host: "mx2.example.org".into()
            }])
        );
    }

    #[test]
    fn resolv_conf_parsing() {
        let text = "# comment\nsearch corp.example\nnameserver 10.0.0.1\nnameserver  fe80::1%eth0 \nnameserver bogus\noptions ndots:2\n";
        assert_eq!(
            system_nameservers(text),
            vec![
                "10.0.0.1:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(
            system_nameservers(""),
            vec!["127.0.0.1:53".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn negative_answers_are_told_apart() {
        use hickory_resolver::net::NoRecords;
        use hickory_resolver::proto::op::Query;
        use hickory_resolver::proto::rr::RecordType;
        let q = Query::query(name("example.org."), RecordType::MX);
        let nx: NetError = NoRecords::new(q.clone(), ResponseCode::NXDomain).into();
        let nodata: NetError = NoRecords::new(q, ResponseCode::NoError).into();
        assert_eq!(negative(&nx), Some(Negative::NxDomain));
        assert_eq!(negative(&nodata), Some(Negative::NoData));
        assert_eq!(negative(&NetError::Timeout), None);
        let servfail = NetError::Dns(hickory_resolver::net::DnsError::ResponseCode(
            ResponseCode::ServFail,
        ));
        assert_eq!(negative(&servfail), None);
    }

    /// The zone of [`answers_from_a_real_server`], on the tests' one DNS
    /// server (`demo::dns`, shared with the integration tests).
    fn test_server() -> crate::demo::dns::DnsServer {
        use crate::demo::dns::{DnsServer, Rec};
        DnsServer::start(&[
            Rec::Mx("example.test", 20, "Mail.Example.test"),
            Rec::Mx("example.test", 10, "mx1.magic.test"),
            Rec::A("mail.example.test", "192.0.2.25"),
            Rec::Aaaa("mail.example.test", "2001:db8::25"),
            Rec::Aaaa("v6only.test", "2001:db8::6"),
            Rec::A("nomx.test", "192.0.2.26"),
            Rec::NullMx("null.test"),
        ])
    }

    fn dns_at(addr: SocketAddr) -> Dns {
        Dns::new(&DnsConfig {
            nameservers: vec![addr],
            timeout: crate::config::Dur(Duration::from_millis(300)),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn answers_from_a_real_server() {
        let server = test_server();
        let dns = dns_at(server.addr);
        let mut hosts = match dns.mx("EXAMPLE.test").await.unwrap() {
            MxAnswer::Hosts(h) => h,
            other => panic!("{other:?}"),
        };
        hosts.sort_by_key(|h| h.preference);
        assert_eq!(
            hosts,
            vec![
                MxHost {
                    preference: 10,
                    host: "mx1.magic.test".into()
                },
                MxHost {
                    preference: 20,
                    host: "mail.example.test".into()
                },
            ]
        );
        assert_eq!(dns.mx("null.test").await.unwrap(), MxAnswer::NullMx);
        assert_eq!(dns.mx("nomx.test.").await.unwrap(), MxAnswer::NoMx);
        assert_eq!(dns.mx("missing.test").await.unwrap(), MxAnswer::NoDomain);

        assert_eq!(
            dns.addresses("mail.example.test").await.unwrap(),
            vec![
                "192.0.2.25".parse::<IpAddr>().unwrap(),
                "2001:db8::25".parse().unwrap()
            ]
        );
        assert_eq!(
            dns.addresses("v6only.test").await.unwrap(),
            vec!["2001:db8::6".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            dns.addresses("null.test").await.unwrap(),
            Vec::<IpAddr>::new()
        );
        assert_eq!(
            dns.addresses("missing.test").await,
            Err(DnsError::NoDomain("missing.test".into()))
        );
        // Outside the server's zones: REFUSED, which says nothing about the name.
        assert!(dns.mx("example.org").await.unwrap_err().is_temporary());
    }

    #[tokio::test]
    async fn a_silent_server_is_a_temporary_failure() {
        // A UDP socket nobody reads: every query times out.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dns = dns_at(silent.local_addr().unwrap());
        let err = dns.mx("example.test").await.unwrap_err();
        assert!(err.is_temporary(), "{err}");
        assert!(dns
            .addresses("mail.example.test")
            .await
            .unwrap_err()
            .is_temporary());
    }

    #[tokio::test]
    async fn ip_literals_need_no_query() {
        let dns = Dns::new(&DnsConfig {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            timeout: crate::config::Dur::secs(1),
        })
        .unwrap();
        assert_eq!(
            dns.addresses("192.0.2.7").await.unwrap(),
            vec!["192.0.2.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            dns.addresses("[IPv6:2001:db8::1]").await.unwrap(),
            vec!["2001:db8::1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            dns.addresses("[IPv6:2001:db8::2]").await.unwrap(),
            vec!["2001:db8::2".parse::<IpAddr>().unwrap()]
        );
        // An address literal domain is its own implicit MX.
        assert_eq!(dns.mx("[192.0.2.7]").await.unwrap(), MxAnswer::NoMx);
        assert_eq!(ip_literal("[192.0.2.7"), None);
        assert_eq!(ip_literal("[mail.example.test]"), None);
        assert_eq!(ip_literal("192.0.2.7"), None, "a dot-atom is a name");
        assert_eq!(ip_literal("[IPv6:192.0.2.7]"), None);
        assert_eq!(ip_literal("[2001:db8::1]"), None, "IPv6 needs its tag");
    }
}
