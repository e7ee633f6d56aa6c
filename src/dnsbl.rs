//! DNS block and allow lists (DNSBL / DNSWL), scored the way postscreen does.
//!
//! `[dnsbl] sites` lists zones in postscreen's syntax: `zone`,
//! `zone*weight`, `zone=filter` or `zone=filter*weight`, where the filter is
//! an IPv4 pattern whose octets are numbers, ranges or lists
//! (`127.0.0.[2..11]`, `127.0.[0..255].[1;3;5..7]`). The weight defaults
//! to 1; a negative weight makes the zone an allowlist. A client address is
//! looked up in every zone at once (reversed octets for IPv4, reversed
//! nibbles for IPv6), each query within `timeout`; a zone that does not
//! answer in time is skipped (fail open). The [`Score`] is the sum of the
//! weights of the sites whose filter matched an answer, with the reasons.
//!
//! Answers are data, and an answer that is not a listing is an error, never
//! a listing: anything outside 127.0.0.0/8, and the "query refused" codes
//! (127.255.255.252–255 for Spamhaus, 127.0.0.255 for dnswl.org), which a
//! zone sends to resolvers it will not serve. Errors are counted in
//! `magicmx_dnsbl_errors_total{zone,kind}`, logged once per `pause` per zone,
//! and pause the zone for `pause` (refusals and bogus answers at once;
//! timeouts and SERVFAIL after a few in a row). A health check at start and
//! every `health_interval` asks each zone for the RFC 5782 test entries
//! (127.0.0.2 listed, 127.0.0.1 not); a zone that fails is left out until a
//! later check passes. [`Dnsbl::status`] reports every zone for `/status`.
//!
//! Answers are cached per (zone, address) for their TTL clamped to
//! `[min_ttl, max_ttl]`, at most `max_cache_entries` entries. Every query
//! goes through the node's one resolver ([`crate::dns::Dns`]); time is
//! tokio's clock, so tests can pause and advance it.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::DnsblConfig;
use crate::dns::{ARecords, Dns, DnsError};
pub use crate::dnslist::{Site, MAX_SITES};

/// Answers kept per cached lookup; a zone answering more is truncated.
const MAX_ANSWERS: usize = 16;
/// Timeouts or temporary failures in a row that pause a zone.
const FAILURES_TO_PAUSE: u32 = 3;

/// The DNS name to ask for `ip` in `zone`: reversed octets for IPv4
/// (`2.0.0.127.zone`), reversed nibbles for IPv6 (RFC 5782 2.4).
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(72 + zone.len());
    match crate::addr::canonical_ip(ip) {
        IpAddr::V4(a) => {
            let o = a.octets();
            let _ = write!(out, "{}.{}.{}.{}.", o[3], o[2], o[1], o[0]);
        }
        IpAddr::V6(a) => {
            for byte in a.octets().iter().rev() {
                let _ = write!(out, "{:x}.{:x}.", byte & 0x0f, byte >> 4);
            }
        }
    }
    out.push_str(zone);
    out
}

/// Why a zone's answer was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No answer within `timeout`.
    Timeout,
    /// SERVFAIL, REFUSED, network error.
    Temporary,
    /// A "query refused" code (127.255.255.252–255, 127.0.0.255).
    Refused,
    /// An address outside 127.0.0.0/8: the zone is broken or gone (some
    /// expired zones answer everything with a web server's address).
    OutOfRange,
    /// The RFC 5782 test entries did not answer as they must.
    Health,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Temporary => "temporary",
            ErrorKind::Refused => "refused",
            ErrorKind::OutOfRange => "out_of_range",
            ErrorKind::Health => "health",
        }
    }
}

/// What one zone said about one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Valid listing codes, with the smallest TTL of the answer.
    Listed(Vec<Ipv4Addr>, u32),
    /// Not listed (NXDOMAIN, NODATA), with the negative TTL if known.
    NotListed(Option<u32>),
    Error(ErrorKind, String),
}

/// A "query refused" answer: an error, never a listing.
pub fn is_refusal(a: Ipv4Addr) -> bool {
    let o = a.octets();
    (o[0..3] == [127, 255, 255] && o[3] >= 252) || a == Ipv4Addr::new(127, 0, 0, 255)
}

/// Classifies a resolver answer (`None`: timed out). Pure, total: every
/// answer shape gives an outcome.
pub fn classify(result: Option<Result<ARecords, DnsError>>) -> Outcome {
    match result {
        None => Outcome::Error(ErrorKind::Timeout, "timed out".into()),
        Some(Err(e)) => Outcome::Error(ErrorKind::Temporary, e.to_string()),
        Some(Ok(ARecords::Nothing { ttl })) => Outcome::NotListed(ttl),
        Some(Ok(ARecords::Found(records))) if records.is_empty() => Outcome::NotListed(None),
        Some(Ok(ARecords::Found(records))) => {
            if let Some((a, _)) = records.iter().find(|(a, _)| a.octets()[0] != 127) {
                return Outcome::Error(
                    ErrorKind::OutOfRange,
                    format!("answer {a} is outside 127.0.0.0/8"),
                );
            }
            if let Some((a, _)) = records.iter().find(|(a, _)| is_refusal(*a)) {
                return Outcome::Error(
                    ErrorKind::Refused,
                    format!("answer {a} means the query was refused (use a resolver of your own)"),
                );
            }
            let ttl = records.iter().map(|(_, t)| *t).min().unwrap_or(0);
            let mut addrs: Vec<Ipv4Addr> = records.into_iter().map(|(a, _)| a).collect();
            addrs.sort_unstable();
            addrs.dedup();
            addrs.truncate(MAX_ANSWERS);
            Outcome::Listed(addrs, ttl)
        }
    }
}

/// One site that listed the address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listing {
    pub zone: String,
    /// The (first matching) answer.
    pub answer: Ipv4Addr,
    pub weight: i32,
    /// How long the answer stays valid (its clamped TTL), for the suspect
    /// state's expiry.
    #[serde(skip)]
    pub ttl: Duration,
}

impl fmt::Display for Listing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, weight {})", self.zone, self.answer, self.weight)
    }
}

/// The result of a lookup: total weight and the listings behind it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Score {
    pub total: i32,
    pub reasons: Vec<Listing>,
}

impl Score {
    /// A negative total: the client is on an allowlist.
    pub fn is_allowlisted(&self) -> bool {
        self.total < 0
    }
}

/// A zone's state, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ZoneStatus {
    pub zone: String,
    /// `active`, `paused` (after errors) or `unhealthy` (failed its health check).
    pub state: &'static str,
    /// Seconds until a paused zone is asked again.
    pub paused_for_secs: Option<u64>,
    pub last_error: Option<String>,
    pub errors: u64,
}

#[derive(Debug, Default)]
struct ZoneState {
    paused_until: Option<Instant>,
    unhealthy: bool,
    failures_in_a_row: u32,
    errors: u64,
    last_error: Option<String>,
    last_logged: Option<Instant>,
}

struct CacheEntry {
    answers: Option<Arc<[Ipv4Addr]>>,
    /// TTL the entry was stored with (clamped).
    ttl: Duration,
    expires: Instant,
}

struct Inner {
    dns: Dns,
    sites: Vec<Site>,
    /// Distinct zones of `sites`; indices are zone ids.
    zones: Vec<String>,
    state: Vec<Mutex<ZoneState>>,
    cache: Mutex<HashMap<(u16, IpAddr), CacheEntry>>,
    timeout: Duration,
    min_ttl: Duration,
    max_ttl: Duration,
    max_cache_entries: usize,
    pause: Duration,
    health_interval: Duration,
}

/// The DNSBL/DNSWL client of the node. Cheap to clone.
#[derive(Clone)]
pub struct Dnsbl {
    inner: Arc<Inner>,
}

impl fmt::Debug for Dnsbl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dnsbl")
            .field("zones", &self.inner.zones)
            .finish()
    }
}

impl Dnsbl {
    /// Builds the client from `[dnsbl]` (validated). Does no I/O.
    pub fn new(cfg: &DnsblConfig, dns: Dns) -> Result<Dnsbl, String> {
        let sites = cfg
            .sites
            .iter()
            .map(|s| Site::parse(s).map_err(|e| format!("dnsbl.sites: {s:?}: {e}")))
            .collect::<Result<Vec<Site>, String>>()?;
        let mut zones: Vec<String> = Vec::new();
        for s in &sites {
            if !zones.contains(&s.zone) {
                zones.push(s.zone.clone());
            }
        }
        let state = zones.iter().map(|_| Mutex::default()).collect();
        Ok(Dnsbl {
            inner: Arc::new(Inner {
                dns,
                sites,
                zones,
                state,
                cache: Mutex::new(HashMap::new()),
                timeout: cfg.timeout.0,
                min_ttl: cfg.min_ttl.0,
                max_ttl: cfg.max_ttl.0,
                max_cache_entries: cfg.max_cache_entries,
                pause: cfg.pause.0,
                health_interval: cfg.health_interval.0,
            }),
        })
    }

    /// True if any site is configured.
    pub fn is_enabled(&self) -> bool {
        !self.inner.sites.is_empty()
    }

    /// Looks `ip` up in every zone that is not paused, in parallel, each
    /// query within `timeout`. Never fails: zones that do not answer are
    /// left out of the score.
    pub async fn lookup(&self, ip: IpAddr) -> Score {
        let ip = crate::addr::canonical_ip(ip);
        let inner = &self.inner;
        let now = Instant::now();
        let mut answers: Vec<(usize, Arc<[Ipv4Addr]>, Duration)> = Vec::new();
        let mut queries = tokio::task::JoinSet::new();
        for (z, zone) in inner.zones.iter().enumerate() {
            if !self.is_active(z, now) {
                continue;
            }
            if let Some((hit, ttl)) = self.cached(z, ip, now) {
                metrics::counter!("magicmx_dnsbl_cache_hits_total").increment(1);
                if let Some(a) = hit {
                    answers.push((z, a, ttl));
                }
                continue;
            }
            let dns = inner.dns.clone();
            let name = query_name(ip, zone);
            let timeout = inner.timeout;
            queries.spawn(async move {
                let r = tokio::time::timeout(timeout, dns.a_records(&name)).await;
                (z, classify(r.ok()))
            });
        }
        while let Some(joined) = queries.join_next().await {
            let Ok((z, outcome)) = joined else { continue };
            metrics::counter!("magicmx_dnsbl_queries_total").increment(1);
            match outcome {
                Outcome::Listed(addrs, ttl) => {
                    self.succeeded(z);
                    let ttl = self.clamp(Some(ttl));
                    let addrs: Arc<[Ipv4Addr]> = addrs.into();
                    self.store(z, ip, Some(addrs.clone()), ttl);
                    answers.push((z, addrs, ttl));
                }
                Outcome::NotListed(ttl) => {
                    self.succeeded(z);
                    self.store(z, ip, None, self.clamp(ttl));
                }
                Outcome::Error(kind, detail) => self.failed(z, kind, &detail),
            }
        }
        let mut score = Score::default();
        for site in &inner.sites {
            let Some((_, addrs, ttl)) = answers.iter().find(|(z, ..)| inner.zones[*z] == site.zone)
            else {
                continue;
            };
            if let Some(a) = addrs.iter().find(|a| site.matches(**a)) {
                metrics::counter!("magicmx_dnsbl_listed_total", "zone" => site.zone.clone())
                    .increment(1);
                score.total = score.total.saturating_add(site.weight);
                score.reasons.push(Listing {
                    zone: site.zone.clone(),
                    answer: *a,
                    weight: site.weight,
                    ttl: *ttl,
                });
            }
        }
        if !score.reasons.is_empty() {
            debug!(client = %ip, score = score.total, "DNSBL listings");
        }
        score
    }

    /// Asks every zone for the RFC 5782 test entries (127.0.0.2 must be
    /// listed, 127.0.0.1 must not), bypassing cache and pauses. A zone that
    /// fails is left out of lookups until a later check passes; a zone that
    /// passes is also un-paused.
    pub async fn health_check(&self) {
        let inner = &self.inner;
        let mut checks = tokio::task::JoinSet::new();
        for (z, zone) in inner.zones.iter().enumerate() {
            let dns = inner.dns.clone();
            let timeout = inner.timeout;
            let (listed, clean) = (
                query_name(Ipv4Addr::new(127, 0, 0, 2).into(), zone),
                query_name(Ipv4Addr::new(127, 0, 0, 1).into(), zone),
            );
            checks.spawn(async move {
                let ask = |name: String| {
                    let dns = dns.clone();
                    async move {
                        classify(
                            tokio::time::timeout(timeout, dns.a_records(&name))
                                .await
                                .ok(),
                        )
                    }
                };
                let (l, c) = tokio::join!(ask(listed), ask(clean));
                (z, health_verdict(&l, &c))
            });
        }
        while let Some(joined) = checks.join_next().await {
            let Ok((z, verdict)) = joined else { continue };
            let zone = &inner.zones[z];
            let mut st = self.zone_state(z);
            match verdict {
                Ok(()) => {
                    if st.unhealthy || st.paused_until.is_some() {
                        info!(zone = %zone, "DNSBL zone passes its health check again");
                    }
                    st.unhealthy = false;
                    st.paused_until = None;
                    st.failures_in_a_row = 0;
                }
                Err(why) => {
                    if !st.unhealthy {
                        warn!(zone = %zone, reason = %why, "DNSBL zone fails its health check: left out until it passes");
                    }
                    st.unhealthy = true;
                    st.errors += 1;
                    st.last_error = Some(format!("health check: {why}"));
                    metrics::counter!("magicmx_dnsbl_errors_total", "zone" => zone.clone(), "kind" => ErrorKind::Health.as_str()).increment(1);
                }
            }
        }
    }

    /// Health checks now and every `health_interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        if !self.is_enabled() {
            return;
        }
        let mut tick = tokio::time::interval(self.inner.health_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = self.health_check() => {}
                    }
                    self.expire_cache();
                }
            }
        }
    }

    /// Every zone, for `/status`.
    pub fn status(&self) -> Vec<ZoneStatus> {
        let now = Instant::now();
        self.inner
            .zones
            .iter()
            .enumerate()
            .map(|(z, zone)| {
                let st = self.zone_state(z);
                let paused = st.paused_until.filter(|t| *t > now);
                ZoneStatus {
                    zone: zone.clone(),
                    state: if st.unhealthy {
                        "unhealthy"
                    } else if paused.is_some() {
                        "paused"
                    } else {
                        "active"
                    },
                    paused_for_secs: paused.map(|t| (t - now).as_secs().max(1)),
                    last_error: st.last_error.clone(),
                    errors: st.errors,
                }
            })
            .collect()
    }

    /// Cached lookups (for tests and `/status`).
    pub fn cache_len(&self) -> usize {
        self.inner.cache.lock().map(|c| c.len()).unwrap_or(0)
    }

    fn zone_state(&self, z: usize) -> std::sync::MutexGuard<'_, ZoneState> {
        self.inner.state[z]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_active(&self, z: usize, now: Instant) -> bool {
        let st = self.zone_state(z);
        !st.unhealthy && st.paused_until.is_none_or(|t| t <= now)
    }

    fn clamp(&self, ttl: Option<u32>) -> Duration {
        let ttl = Duration::from_secs(u64::from(ttl.unwrap_or(0)));
        ttl.clamp(self.inner.min_ttl, self.inner.max_ttl)
    }

    #[allow(clippy::type_complexity)]
    fn cached(
        &self,
        z: usize,
        ip: IpAddr,
        now: Instant,
    ) -> Option<(Option<Arc<[Ipv4Addr]>>, Duration)> {
        let mut cache = self.inner.cache.lock().ok()?;
        let key = (z as u16, ip);
        match cache.get(&key) {
            Some(e) if e.expires > now => Some((e.answers.clone(), e.ttl)),
            Some(_) => {
                cache.remove(&key);
                None
            }
            None => None,
        }
    }

    fn store(&self, z: usize, ip: IpAddr, answers: Option<Arc<[Ipv4Addr]>>, ttl: Duration) {
        let Ok(mut cache) = self.inner.cache.lock() else {
            return;
        };
        let now = Instant::now();
        if cache.len() >= self.inner.max_cache_entries {
            cache.retain(|_, e| e.expires > now);
        }
        if cache.len() >= self.inner.max_cache_entries {
            // Still full of live entries: make room by dropping one.
            if let Some(k) = cache.keys().next().copied() {
                cache.remove(&k);
            }
        }
        cache.insert(
            (z as u16, ip),
            CacheEntry {
                answers,
                ttl,
                expires: now + ttl,
            },
        );
    }

    fn expire_cache(&self) {
        let now = Instant::now();
        if let Ok(mut cache) = self.inner.cache.lock() {
            cache.retain(|_, e| e.expires > now);
        }
    }

    fn succeeded(&self, z: usize) {
        self.zone_state(z).failures_in_a_row = 0;
    }

    /// Counts an error, logs it once per `pause`, pauses the zone when the
    /// error says the zone will not serve us.
    fn failed(&self, z: usize, kind: ErrorKind, detail: &str) {
        let zone = &self.inner.zones[z];
        metrics::counter!("magicmx_dnsbl_errors_total", "zone" => zone.clone(), "kind" => kind.as_str()).increment(1);
        let now = Instant::now();
        let pause = self.inner.pause;
        let mut st = self.zone_state(z);
        st.errors += 1;
        st.last_error = Some(format!("{}: {detail}", kind.as_str()));
        st.failures_in_a_row = st.failures_in_a_row.saturating_add(1);
        let pause_now = match kind {
            ErrorKind::Refused | ErrorKind::OutOfRange => true,
            _ => st.failures_in_a_row >= FAILURES_TO_PAUSE,
        };
        if pause_now {
            st.paused_until = Some(now + pause);
            st.failures_in_a_row = 0;
        }
        if st
            .last_logged
            .is_none_or(|t| now.duration_since(t) >= pause)
        {
            st.last_logged = Some(now);
            warn!(
                zone = %zone,
                kind = kind.as_str(),
                error = %detail,
                paused = pause_now,
                "DNSBL query error (not a listing; logged once per pause period)"
            );
        }
    }
}

/// The health verdict from the answers for 127.0.0.2 and 127.0.0.1.
fn health_verdict(listed: &Outcome, clean: &Outcome) -> Result<(), String> {
    match listed {
        Outcome::Listed(..) => {}
        Outcome::NotListed(_) => return Err("test entry 127.0.0.2 is not listed".into()),
        Outcome::Error(kind, d) => {
            return Err(format!("test entry 127.0.0.2: {}: {d}", kind.as_str()))
        }
    }
    match clean {
        Outcome::NotListed(_) => Ok(()),
        Outcome::Listed(a, _) => Err(format!(
            "test entry 127.0.0.1 is listed ({}): the zone lists everyone",
            a.first().map(|a| a.to_string()).unwrap_or_default()
        )),
        Outcome::Error(kind, d) => Err(format!("test entry 127.0.0.1: {}: {d}", kind.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn query_names() {
        assert_eq!(
            query_name("192.0.2.99".parse().unwrap(), "bl.test"),
            "99.2.0.192.bl.test"
        );
        assert_eq!(
            query_name("::ffff:192.0.2.99".parse().unwrap(), "bl.test"),
            "99.2.0.192.bl.test"
        );
        // RFC 5782 2.4's example.
        assert_eq!(
            query_name(
                "2001:db8:1:2:3:4:567:89ab".parse().unwrap(),
                "ugly.example.com"
            ),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com"
        );
    }

    #[test]
    fn errors_are_never_listings() {
        let found = |v: &[&str]| {
            Some(Ok(ARecords::Found(
                v.iter().map(|a| (ip4(a), 300)).collect(),
            )))
        };
        for refused in [
            "127.255.255.252",
            "127.255.255.254",
            "127.255.255.255",
            "127.0.0.255",
        ] {
            assert!(
                matches!(
                    classify(found(&[refused])),
                    Outcome::Error(ErrorKind::Refused, _)
                ),
                "{refused}"
            );
            // Even next to a real code.
            assert!(matches!(
                classify(found(&["127.0.0.2", refused])),
                Outcome::Error(ErrorKind::Refused, _)
            ));
        }
        assert!(matches!(
            classify(found(&["127.0.0.2", "192.0.2.1"])),
            Outcome::Error(ErrorKind::OutOfRange, _)
        ));
        assert!(matches!(
            classify(None),
            Outcome::Error(ErrorKind::Timeout, _)
        ));
        assert!(matches!(
            classify(Some(Err(DnsError::Temporary("SERVFAIL".into())))),
            Outcome::Error(ErrorKind::Temporary, _)
        ));
        assert_eq!(classify(found(&[])), Outcome::NotListed(None));
        assert_eq!(
            classify(Some(Ok(ARecords::Nothing { ttl: Some(5) }))),
            Outcome::NotListed(Some(5))
        );
        // Many records: deduplicated, bounded, smallest TTL.
        let many: Vec<(Ipv4Addr, u32)> = (0..=255u8)
            .flat_map(|i| [(Ipv4Addr::new(127, 0, 1, i), 100 + u32::from(i)); 2])
            .collect();
        match classify(Some(Ok(ARecords::Found(many)))) {
            Outcome::Listed(a, ttl) => {
                assert_eq!(a.len(), MAX_ANSWERS);
                assert_eq!(ttl, 100);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn health_verdicts() {
        let listed = Outcome::Listed(vec![ip4("127.0.0.2")], 60);
        let clean = Outcome::NotListed(None);
        assert!(health_verdict(&listed, &clean).is_ok());
        assert!(health_verdict(&clean, &clean).is_err());
        assert!(health_verdict(&listed, &listed).is_err());
        let refused = Outcome::Error(ErrorKind::Refused, "x".into());
        assert!(health_verdict(&refused, &clean).is_err());
        assert!(health_verdict(&listed, &refused).is_err());
    }
}
