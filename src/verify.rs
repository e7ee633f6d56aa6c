//! Recipient verification with the real MX, at RCPT (issue 13).
//!
//! A magic node accepts for a domain without knowing its users; accepting an
//! unknown user and bouncing later sends a DSN to a (for spam, forged)
//! sender: backscatter. So before `250` to RCPT the node asks the domain's
//! real MX, the way Postfix's `reject_unverified_recipient` does: the
//! relay's MX plan (magic hosts skipped) and client ([`Probe`]): `EHLO`,
//! `MAIL FROM:<>`, `RCPT TO:<address>`, then `RSET`, `QUIT`.
//!
//! Answers are cached per address (`positive_ttl` for a 2xx, `negative_ttl`
//! for a 5xx); a 4xx, a broken session or a probe slower than `timeout` is
//! `450 4.2.0` and nothing is cached. Probes per domain are bounded per
//! minute (`max_probes_per_domain`, per node), so a dictionary attack costs
//! the real MX little: past the bound, uncached addresses get `450 4.2.0`
//! while cached good addresses are still accepted. The first probe of a
//! domain (then once per `positive_ttl`) also asks about a random local part:
//! a domain that accepts it accepts everything, is marked accept-all and is
//! not probed again. An idle probe session is kept a few seconds for the
//! next RCPT to the same domain, so the recipients of one transaction share
//! one connection. The relay records a `5.1.1` it gets after acceptance as a
//! negative entry ([`Verifier::record_unknown`]).
//!
//! Tables are bounded by `max_cache_entries` (addresses, and domains).
//!
//! The cache travels over gossip ([`Verifier::take_changes`],
//! [`Verifier::merge`]): verdicts and accept-all marks keyed by a SHA-256
//! prefix of the address (or domain), never the address itself, each with
//! the time it was learnt; the newest wins. So one node's probe serves the
//! network, and a dictionary attack spread over the nodes costs the real MX
//! at most `max_probes_per_domain` probes per minute per node (the budget
//! itself is per node: a shared budget would need agreement on every probe).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, info};

use crate::clock::Clock;
use crate::config::{Config, VerifyConfig};
use crate::dns::Dns;
use crate::relay::deliver::{Probe, ProbeAnswer};
use crate::relay::mx::{self, Plan};

/// What the real MX (or the cache) says about a recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Accept it (a 2xx, cached or fresh, or an accept-all domain).
    Valid,
    /// The real MX does not know this user: the `550 5.1.1` reply line.
    /// Also the invalid-recipient signal for the block (suspects).
    UnknownUser(String),
    /// Not verified now (MX down or slow, 4xx, probe budget spent) or not
    /// deliverable at all: the reply line (`450 4.2.0`, or a 5xx of the plan).
    Refuse(String),
}

/// A probe session kept for the next RCPT to the same domain this long.
const IDLE_PROBE: Duration = Duration::from_secs(5);
/// Idle probe sessions kept at most (over all domains).
const MAX_IDLE_PROBES: usize = 16;
/// RCPTs asked on one probe session at most.
const MAX_RCPTS_PER_PROBE: u32 = 50;

/// A cache key: the first 16 octets of SHA-256 over a tag and the
/// lowercased address (or domain).
pub type Key = [u8; 16];

/// A verdict and when it was learnt (unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub valid: bool,
    pub at_ms: u64,
}

/// Gossip rounds a changed entry is pushed for.
const PUSH_ROUNDS: u8 = 3;
/// A verdict from a peer may be this far ahead of this node's clock.
const MAX_SKEW_MS: u64 = 60_000;

/// Changed verdicts (address keys) and accept-all marks (domain keys).
pub type Changes = (Vec<(Key, Entry)>, Vec<(Key, Entry)>);

#[derive(Default)]
struct Domain {
    /// The minute (unix ms / 60000) `probes` counts.
    minute: u64,
    probes: u32,
}

#[derive(Default)]
struct State {
    addresses: HashMap<Key, Entry>,
    /// Probe budgets.
    domains: HashMap<String, Domain>,
    /// Accepts everything (`valid`), by domain key.
    accept_all: HashMap<Key, Entry>,
    /// Keys to push over gossip: (is a domain, key) -> rounds left.
    changed: HashMap<(bool, Key), u8>,
    /// Domain -> (session, since when idle, generation).
    idle: HashMap<String, (Probe, u64, u64)>,
    generation: u64,
}

/// The verifier of one node, shared by every SMTP session and the relay.
pub struct Verifier {
    config: Arc<Config>,
    cfg: VerifyConfig,
    dns: Dns,
    clock: Clock,
    state: Arc<Mutex<State>>,
}

fn hash(tag: &[u8], name: &str) -> Key {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(tag);
    ctx.update(name.to_ascii_lowercase().as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&ctx.finish().as_ref()[..16]);
    k
}

fn key(address: &str) -> Key {
    hash(b"magicmx-verify-address\0", address)
}

fn domain_key(domain: &str) -> Key {
    hash(b"magicmx-verify-domain\0", domain)
}

/// Inserts `e` at `k` in a table bounded by `max`: expired entries go
/// first, then (still full of fresh ones) a tenth, which are probed again
/// when asked (the probe budget still applies).
fn bounded_insert(
    table: &mut HashMap<Key, Entry>,
    k: Key,
    e: Entry,
    max: usize,
    fresh: impl Fn(&Entry) -> bool,
) {
    if table.len() >= max && !table.contains_key(&k) {
        table.retain(|_, e| fresh(e));
        if table.len() >= max {
            let drop: Vec<Key> = table.keys().take(max / 10 + 1).copied().collect();
            for k in drop {
                table.remove(&k);
            }
        }
    }
    table.insert(k, e);
}

impl Verifier {
    pub fn new(config: Arc<Config>, dns: Dns, clock: Clock) -> Verifier {
        Verifier {
            cfg: config.verify.clone(),
            config,
            dns,
            clock,
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ttl_ms(&self, valid: bool) -> u64 {
        let d = if valid {
            self.cfg.positive_ttl
        } else {
            self.cfg.negative_ttl
        };
        d.0.as_millis() as u64
    }

    /// The cached verdict of `address`, if fresh.
    pub fn cached(&self, address: &str) -> Option<bool> {
        let now = self.clock.now_ms();
        let st = self.lock();
        let e = st.addresses.get(&key(address))?;
        self.fresh(false, e, now).then_some(e.valid)
    }

    /// Is `e` still good? A verdict lives its TTL; an accept-all mark
    /// (`domain`) lives `positive_ttl` whatever it says.
    fn fresh(&self, domain: bool, e: &Entry, now_ms: u64) -> bool {
        now_ms.saturating_sub(e.at_ms) < self.ttl_ms(domain || e.valid)
    }

    /// Records a verdict (probe, or the relay's `5.1.1`).
    fn record(&self, address: &str, valid: bool) {
        let e = Entry {
            valid,
            at_ms: self.clock.now_ms(),
        };
        self.insert(false, key(address), e);
    }

    /// Stores `e` at `k` (an address, or a domain's accept-all mark) and
    /// marks it for gossip.
    fn insert(&self, domain: bool, k: Key, e: Entry) {
        self.insert_if(domain, k, e, false);
    }

    /// [`Verifier::insert`], or (`only_newer`) only if `e` is newer than
    /// what is held, checked and stored under one lock. True if stored.
    fn insert_if(&self, domain: bool, k: Key, e: Entry, only_newer: bool) -> bool {
        let now = self.clock.now_ms();
        let max = self.cfg.max_cache_entries;
        let mut st = self.lock();
        let table = match domain {
            false => &mut st.addresses,
            true => &mut st.accept_all,
        };
        if only_newer && table.get(&k).is_some_and(|old| e.at_ms <= old.at_ms) {
            return false;
        }
        bounded_insert(table, k, e, max, |e| self.fresh(domain, e, now));
        if !domain {
            metrics::gauge!("magicmx_verify_cache_entries").set(st.addresses.len() as f64);
        }
        if st.changed.len() < max {
            st.changed.insert((domain, k), PUSH_ROUNDS);
        }
        true
    }

    /// Up to `max` changed verdicts and accept-all marks for gossip (each
    /// is pushed a few rounds).
    pub fn take_changes(&self, max: usize) -> Changes {
        let mut st = self.lock();
        let keys: Vec<(bool, Key)> = st.changed.keys().take(max).copied().collect();
        let (mut addresses, mut domains) = (Vec::new(), Vec::new());
        for k in keys {
            if let Some(r) = st.changed.get_mut(&k) {
                *r = r.saturating_sub(1);
                if *r == 0 {
                    st.changed.remove(&k);
                }
            }
            match k {
                (false, k) => addresses.extend(st.addresses.get(&k).map(|e| (k, *e))),
                (true, k) => domains.extend(st.accept_all.get(&k).map(|e| (k, *e))),
            }
        }
        (addresses, domains)
    }

    /// Merges a verdict (`domain`: an accept-all mark) from a peer: the
    /// newest wins. An entry already expired, or from too far in the
    /// future, is ignored. True if it taught this node something (it is
    /// then forwarded in turn).
    pub fn merge(&self, domain: bool, k: Key, e: Entry) -> bool {
        let now = self.clock.now_ms();
        if e.at_ms > now.saturating_add(MAX_SKEW_MS) || !self.fresh(domain, &e, now) {
            return false;
        }
        self.insert_if(domain, k, e, true)
    }

    /// Verdicts and accept-all marks held now.
    pub fn len(&self) -> (usize, usize) {
        let st = self.lock();
        (st.addresses.len(), st.accept_all.len())
    }

    /// Takes `n` probes of `domain`'s budget for this minute, if there is
    /// room. Also says whether accept-all detection is due.
    fn reserve(&self, domain: &str, n: u32) -> bool {
        let now = self.clock.now_ms();
        let minute = now / 60_000;
        let max_domains = self.cfg.max_cache_entries;
        let mut st = self.lock();
        if st.domains.len() >= max_domains && !st.domains.contains_key(domain) {
            st.domains.retain(|_, d| d.minute == minute);
            if st.domains.len() >= max_domains {
                return false;
            }
        }
        let d = st.domains.entry(domain.to_string()).or_default();
        if d.minute != minute {
            d.minute = minute;
            d.probes = 0;
        }
        if d.probes.saturating_add(n) > self.cfg.max_probes_per_domain {
            return false;
        }
        d.probes += n;
        true
    }

    /// Some(accepts everything) if known and fresh.
    fn accept_all(&self, domain: &str) -> Option<bool> {
        let now = self.clock.now_ms();
        let st = self.lock();
        let e = st.accept_all.get(&domain_key(domain))?;
        self.fresh(true, e, now).then_some(e.valid)
    }

    fn set_accept_all(&self, domain: &str, all: bool) {
        let e = Entry {
            valid: all,
            at_ms: self.clock.now_ms(),
        };
        self.insert(true, domain_key(domain), e);
    }

    /// Verifies `address` (of `domain`): cache, accept-all mark, then a probe
    /// bounded by `verify.timeout`.
    pub async fn check(&self, address: &str, domain: &str) -> Check {
        let domain = crate::names::normalize_name(domain);
        match self.cached(address) {
            Some(true) => return Check::Valid,
            Some(false) => {
                metrics::counter!("magicmx_verify_total", "result" => "cached_unknown")
                    .increment(1);
                return Check::UnknownUser(unknown_reply(address, "cached"));
            }
            None => {}
        }
        if self.accept_all(&domain) == Some(true) {
            return Check::Valid;
        }
        let probe = tokio::time::timeout(self.cfg.timeout.0, self.probe(address, &domain));
        let check = match probe.await {
            Ok(c) => c,
            Err(_) => {
                info!(rcpt = address, timeout = %self.cfg.timeout, "recipient verification timed out");
                Check::Refuse(temp_reply(
                    address,
                    "verification with the real MX timed out",
                ))
            }
        };
        let result = match &check {
            Check::Valid => "valid",
            Check::UnknownUser(_) => "unknown",
            Check::Refuse(_) => "unverified",
        };
        metrics::counter!("magicmx_verify_total", "result" => result).increment(1);
        check
    }

    async fn probe(&self, address: &str, domain: &str) -> Check {
        let detect = self.accept_all(domain).is_none();
        if !self.reserve(domain, 1) {
            metrics::counter!("magicmx_verify_budget_spent_total").increment(1);
            debug!(rcpt = address, domain, "probe budget of the domain spent");
            return Check::Refuse(temp_reply(
                address,
                "too many verifications for this domain, try again later",
            ));
        }
        // The random probe only if the budget also has room for it.
        let detect = detect && self.reserve(domain, 1);
        let mut probe = match self.take_idle(domain) {
            Some(p) => p,
            None => {
                let hosts = match self.dns.mx(domain).await {
                    Ok(answer) => match mx::plan(domain, answer, &self.config) {
                        Plan::Hosts(h) => h,
                        Plan::TempFail(d) => {
                            return Check::Refuse(temp_reply(address, &d.to_string()))
                        }
                        Plan::PermFail(d) => {
                            return Check::Refuse(format!(
                                "550 {} <{address}>: Recipient address rejected: {d}",
                                d.status()
                            ))
                        }
                    },
                    Err(e) => return Check::Refuse(temp_reply(address, &format!("DNS: {e}"))),
                };
                match Probe::open(&self.config, &self.dns, &hosts).await {
                    Ok(p) => p,
                    Err(d) if d.is_remote() && d.status().class == 5 => {
                        // The MX refuses the null sender: it cannot be
                        // verified, so treat it like an accept-all domain
                        // (relayed as before verification existed).
                        info!(domain, reply = %d, "real MX refuses verification: treated as accept-all");
                        self.set_accept_all(domain, true);
                        return Check::Valid;
                    }
                    Err(d) => {
                        info!(rcpt = address, reason = %d, "real MX not reachable for verification");
                        return Check::Refuse(temp_reply(address, "the real MX is not reachable"));
                    }
                }
            }
        };
        if detect {
            let random = format!("magicmx-verify-{:016x}@{domain}", rand::random::<u64>());
            match probe.rcpt(&random).await {
                Ok(ProbeAnswer::Valid) => {
                    info!(domain, "domain accepts every address: marked accept-all");
                    self.set_accept_all(domain, true);
                    self.put_idle(domain, probe);
                    return Check::Valid;
                }
                Ok(ProbeAnswer::Invalid(_)) => self.set_accept_all(domain, false),
                Ok(ProbeAnswer::TempFail(_)) => {}
                Err(d) => return Check::Refuse(temp_reply(address, &d.to_string())),
            }
        }
        let answer = probe.rcpt(address).await;
        let check = match answer {
            Ok(ProbeAnswer::Valid) => {
                self.record(address, true);
                Check::Valid
            }
            Ok(ProbeAnswer::Invalid(d)) => {
                info!(rcpt = address, reply = %d, "real MX does not know the recipient");
                self.record(address, false);
                Check::UnknownUser(unknown_reply(address, &d.to_string()))
            }
            Ok(ProbeAnswer::TempFail(d)) => Check::Refuse(temp_reply(address, &d.to_string())),
            Err(d) => return Check::Refuse(temp_reply(address, &d.to_string())),
        };
        self.put_idle(domain, probe);
        check
    }

    fn take_idle(&self, domain: &str) -> Option<Probe> {
        let now = self.clock.now_ms();
        let (p, at, _) = self.lock().idle.remove(domain)?;
        if now.saturating_sub(at) < IDLE_PROBE.as_millis() as u64 && p.is_sound() {
            Some(p)
        } else {
            p.close();
            None
        }
    }

    /// Keeps a sound probe session for the next RCPT to `domain`, closing it
    /// (RSET, QUIT) after [`IDLE_PROBE`] if nobody took it.
    fn put_idle(&self, domain: &str, probe: Probe) {
        if !probe.is_sound() || probe.rcpts >= MAX_RCPTS_PER_PROBE {
            probe.close();
            return;
        }
        let mut st = self.lock();
        if st.idle.len() >= MAX_IDLE_PROBES && !st.idle.contains_key(domain) {
            drop(st);
            probe.close();
            return;
        }
        st.generation += 1;
        let generation = st.generation;
        let since = self.clock.now_ms();
        if let Some((old, _, _)) = st
            .idle
            .insert(domain.to_string(), (probe, since, generation))
        {
            old.close();
        }
        drop(st);
        let state = Arc::downgrade(&self.state);
        let domain = domain.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(IDLE_PROBE).await;
            let Some(state) = state.upgrade() else { return };
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            // Only if it is still the session put there by this call.
            if st.idle.get(&domain).is_some_and(|e| e.2 == generation) {
                if let Some((p, _, _)) = st.idle.remove(&domain) {
                    drop(st);
                    p.close();
                }
            }
        });
    }
}

impl Verifier {
    /// A relay-time `5.1.1` from the real MX: the next RCPT for `address`
    /// is refused without a probe.
    pub fn record_unknown(&self, address: &str) {
        metrics::counter!("magicmx_verify_relay_unknown_total").increment(1);
        self.record(address, false);
    }
}

fn unknown_reply(address: &str, why: &str) -> String {
    let why: String = why.chars().filter(|c| !c.is_control()).take(200).collect();
    format!("550 5.1.1 <{address}>: Recipient address rejected: unknown user ({why})")
}

fn temp_reply(address: &str, why: &str) -> String {
    let why: String = why.chars().filter(|c| !c.is_control()).take(200).collect();
    format!("450 4.2.0 <{address}>: Recipient address verification failed: {why}; try again later")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> (Verifier, crate::clock::ManualClock) {
        let mut c = Config::parse("[node]\nname = \"n\"\nhostname = \"mx.magic.test\"\n").unwrap();
        c.verify.max_probes_per_domain = 3;
        c.verify.max_cache_entries = 4;
        let dns = Dns::new(&c.dns).unwrap();
        let (clock, manual) = Clock::manual(1_000_000_000);
        (Verifier::new(Arc::new(c), dns, clock), manual)
    }

    #[test]
    fn verdicts_expire_after_their_ttl() {
        let (v, clock) = verifier();
        v.record("Bob@Example.Test", true);
        v.record_unknown("nobody@example.test");
        assert_eq!(v.cached("bob@example.test"), Some(true));
        assert_eq!(v.cached("NOBODY@example.test"), Some(false));
        clock.advance(Duration::from_secs(3 * 3_600));
        assert_eq!(v.cached("nobody@example.test"), None, "negative_ttl is 3h");
        assert_eq!(v.cached("bob@example.test"), Some(true));
        clock.advance(Duration::from_secs(7 * 86_400));
        assert_eq!(v.cached("bob@example.test"), None, "positive_ttl is 7d");
    }

    #[test]
    fn probe_budget_is_per_domain_per_minute() {
        let (v, clock) = verifier();
        for _ in 0..3 {
            assert!(v.reserve("example.test", 1));
        }
        assert!(!v.reserve("example.test", 1));
        assert!(
            v.reserve("other.test", 1),
            "another domain has its own budget"
        );
        clock.advance(Duration::from_secs(60));
        assert!(v.reserve("example.test", 1), "a new minute, a new budget");
    }

    #[test]
    fn the_cache_is_bounded() {
        let (v, _clock) = verifier();
        for i in 0..100 {
            v.record(&format!("u{i}@example.test"), true);
        }
        assert!(v.lock().addresses.len() <= 4);
        assert_eq!(v.cached("u99@example.test"), Some(true));
    }

    #[test]
    fn verdicts_travel_as_hashes_and_the_newest_wins() {
        let (a, clock) = verifier();
        let (b, b_clock) = verifier();
        b_clock.set_ms(clock.now_ms());
        a.record("Bob@Example.Test", true);
        a.set_accept_all("all.test", true);
        let (verdicts, domains) = a.take_changes(100);
        assert_eq!(verdicts.len(), 1);
        assert_eq!(domains.len(), 1);
        assert_eq!(
            verdicts[0].0,
            key("bob@example.test"),
            "a hash, not the address"
        );
        for (k, e) in &verdicts {
            assert!(b.merge(false, *k, *e));
            assert!(
                !b.merge(false, *k, *e),
                "the same entry again teaches nothing"
            );
        }
        for (k, e) in &domains {
            assert!(b.merge(true, *k, *e));
        }
        assert_eq!(b.cached("bob@example.test"), Some(true));
        assert_eq!(b.accept_all("all.test"), Some(true));
        // What b learnt it forwards in turn.
        assert_eq!(b.take_changes(100).0.len(), 1);
        // A newer verdict wins; an older one does not.
        clock.advance(Duration::from_secs(10));
        b_clock.advance(Duration::from_secs(10));
        let k = key("bob@example.test");
        let newer = Entry {
            valid: false,
            at_ms: clock.now_ms(),
        };
        let older = Entry {
            valid: true,
            at_ms: clock.now_ms() - 5_000,
        };
        assert!(b.merge(false, k, newer));
        assert!(!b.merge(false, k, older));
        assert_eq!(b.cached("bob@example.test"), Some(false));
        // Expired or from the future: ignored.
        let stale = Entry {
            valid: false,
            at_ms: clock.now_ms() - 4 * 3_600_000,
        };
        assert!(!b.merge(false, key("old@example.test"), stale));
        let future = Entry {
            valid: true,
            at_ms: clock.now_ms() + 3_600_000,
        };
        assert!(!b.merge(false, key("new@example.test"), future));
        // Pushed a few rounds, then no more.
        for _ in 0..PUSH_ROUNDS {
            a.take_changes(100);
        }
        assert_eq!(a.take_changes(100), (vec![], vec![]));
    }
}
