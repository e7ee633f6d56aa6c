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

struct Entry {
    valid: bool,
    at_ms: u64,
}

#[derive(Default)]
struct Domain {
    /// The minute (unix ms / 60000) `probes` counts.
    minute: u64,
    probes: u32,
    /// (accepts everything, when that was learnt).
    accept_all: Option<(bool, u64)>,
}

#[derive(Default)]
struct State {
    addresses: HashMap<String, Entry>,
    domains: HashMap<String, Domain>,
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

fn key(address: &str) -> String {
    address.to_ascii_lowercase()
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
        (now.saturating_sub(e.at_ms) < self.ttl_ms(e.valid)).then_some(e.valid)
    }

    /// Records a verdict (probe, or the relay's `5.1.1`).
    fn record(&self, address: &str, valid: bool) {
        let now = self.clock.now_ms();
        let max = self.cfg.max_cache_entries;
        let (pos, neg) = (self.ttl_ms(true), self.ttl_ms(false));
        let mut st = self.lock();
        if st.addresses.len() >= max && !st.addresses.contains_key(&key(address)) {
            st.addresses
                .retain(|_, e| now.saturating_sub(e.at_ms) < if e.valid { pos } else { neg });
            if st.addresses.len() >= max {
                // Still full of fresh entries: forget a tenth (they are probed
                // again when asked; the probe budget still applies).
                let drop: Vec<String> = st.addresses.keys().take(max / 10 + 1).cloned().collect();
                for k in drop {
                    st.addresses.remove(&k);
                }
            }
        }
        st.addresses
            .insert(key(address), Entry { valid, at_ms: now });
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
        let (all, at) = st.domains.get(domain)?.accept_all?;
        (now.saturating_sub(at) < self.ttl_ms(true)).then_some(all)
    }

    fn set_accept_all(&self, domain: &str, all: bool) {
        let now = self.clock.now_ms();
        let mut st = self.lock();
        if let Some(d) = st.domains.get_mut(domain) {
            d.accept_all = Some((all, now));
        }
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

impl crate::relay::UnknownRecipients for Verifier {
    /// A relay-time `5.1.1` from the real MX: the next RCPT for `address`
    /// is refused without a probe.
    fn record_unknown(&self, address: &str) {
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
    use crate::relay::UnknownRecipients;

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
}
