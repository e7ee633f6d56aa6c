//! Greylisting, keyed by sender pool and shared network-wide.
//!
//! A first attempt of a (pool, sender, recipient) triplet gets a temporary
//! error; a real MTA retries, most spam software does not. The pool is the
//! throttle block of the client (a big sender retrying from another
//! address of its /24 is not greylisted twice); the sender is normalised
//! ([`normalise_sender`]: `+ext` and BATV `prvs=…=` stripped, case-folded;
//! the null sender is keyed by its HELO). With `spf_pool` the session
//! passes `spf:<domain>` as the pool instead when SPF passes for the client
//! (checked in `smtp` through the node's resolver), so the retry from any
//! address the domain authorises is the same triplet. The key is a SHA-256 prefix of the
//! three, so the state carries no address and travels small over gossip.
//!
//! An [`Entry`] holds when the triplet was first seen (merged by minimum)
//! and when it passed (merged by maximum): both merges are idempotent,
//! commutative and associative, so a first attempt at node A and the retry
//! at node B pass once the peers have exchanged entries. A pool that passed
//! (or delivered) is remembered for `pass_ttl` (merged by maximum too) and
//! is not greylisted any more, like postgrey's auto-whitelist but for the
//! whole network.
//!
//! [`Greylist::check`] is the decision at RCPT: pure over the state and the
//! time given; the session turns its [`Check`] into `451 4.7.1` words. The
//! state is bounded by `max_entries` (the oldest entries go first) and swept
//! by [`Greylist::sweep`]: unpassed entries after `grey_ttl` (counted as
//! never returned), passed ones and pools after `pass_ttl`.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::{GreylistConfig, GreylistMode};

/// A hashed (pool, sender, recipient) triplet, or a hashed pool.
pub type Key = [u8; 16];

/// Gossip rounds a changed entry is pushed for.
const PUSH_ROUNDS: u8 = 3;

/// One triplet's state. `passed_ms == 0`: not passed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub first_ms: u64,
    pub passed_ms: u64,
}

impl Entry {
    /// Min of first-seen, max of passed: idempotent, commutative, associative.
    pub fn merge(self, o: Entry) -> Entry {
        Entry {
            first_ms: self.first_ms.min(o.first_ms),
            passed_ms: self.passed_ms.max(o.passed_ms),
        }
    }
}

/// Changed entries and pools for gossip: `(entries, (pool, passed_ms))`.
pub type Changes = (Vec<(Key, Entry)>, Vec<(Key, u64)>);

/// What greylisting says about one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Not greylisted: greylisting is off, does not apply to this block, or
    /// the pool or the triplet passed before.
    Accept,
    /// A first attempt (or one after `retry_window`): retry in this many ms.
    Greylisted { retry_in_ms: u64 },
    /// A retry before `delay`: retry in this many ms.
    TooEarly { retry_in_ms: u64 },
    /// A retry after `delay` within `retry_window`: accepted now, the pool
    /// is marked passed.
    Passed { waited_ms: u64 },
}

/// Why greylisting would (not) apply to a block, for `explain` and `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Applies {
    Disabled,
    /// The pool passed (or delivered) within `pass_ttl`.
    PoolPassed,
    /// Mode `suspects` and the block has no positive score.
    NotSuspect,
    /// Greylisted: a suspect block (positive score).
    Suspect,
    /// Greylisted: mode `unknown` and the pool was never seen delivering.
    Unknown,
    /// Greylisted: mode `all`.
    All,
}

impl Applies {
    pub fn greylisted(self) -> bool {
        matches!(self, Applies::Suspect | Applies::Unknown | Applies::All)
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    /// Pool → when it last passed or delivered (max-merge).
    pools: HashMap<Key, u64>,
    /// Changed entries and pools with their gossip rounds left.
    changed: HashMap<(bool, Key), u8>,
}

/// The greylist of one node. See the module documentation.
pub struct Greylist {
    cfg: GreylistConfig,
    state: Mutex<State>,
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn hash(parts: &[&str]) -> Key {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p.as_bytes());
    }
    let d = ctx.finish();
    let mut k = [0u8; 16];
    k.copy_from_slice(&d.as_ref()[..16]);
    k
}

/// The hashed pool of a throttle block (its CIDR text).
pub fn pool_key(pool: &str) -> Key {
    hash(&["pool", pool])
}

/// The hashed triplet.
pub fn triplet_key(pool: &str, sender: &str, helo: &str, rcpt: &str) -> Key {
    let sender = match sender.is_empty() {
        true => format!("<>@{}", helo.to_ascii_lowercase()),
        false => normalise_sender(sender),
    };
    hash(&["triplet", pool, &sender, &rcpt.to_ascii_lowercase()])
}

/// `Prvs=1234abcd=Bob+List@Example.TEST` → `bob@example.test`: the parts a
/// sender changes from one message (or retry) to the next are dropped.
pub fn normalise_sender(sender: &str) -> String {
    let sender = sender.to_lowercase();
    let (local, domain) = match sender.rsplit_once('@') {
        Some((l, d)) => (l, Some(d)),
        None => (sender.as_str(), None),
    };
    // BATV (draft-levine-smtp-batv): prvs=<tag>=local, or the older
    // local=tag form some senders use: keep what follows the tag.
    let local = match local
        .strip_prefix("prvs=")
        .or(local.strip_prefix("msprvs1="))
    {
        Some(rest) => rest.split_once('=').map_or(rest, |(_, l)| l),
        None => local,
    };
    let local = local.split_once('+').map_or(local, |(l, _)| l);
    match domain {
        Some(d) => format!("{local}@{d}"),
        None => local.to_string(),
    }
}

impl Greylist {
    pub fn new(cfg: &GreylistConfig) -> Greylist {
        Greylist {
            cfg: cfg.clone(),
            state: Mutex::new(State::default()),
        }
    }

    pub fn config(&self) -> &GreylistConfig {
        &self.cfg
    }

    pub fn is_enabled(&self) -> bool {
        self.cfg.enabled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pool_passed(&self, st: &State, pool: &Key, now_ms: u64) -> bool {
        st.pools
            .get(pool)
            .is_some_and(|t| t.saturating_add(ms(self.cfg.pass_ttl.0)) > now_ms)
    }

    /// Would a block with this suspicion `score` and throttle `pool` be
    /// greylisted, and why?
    pub fn applies(&self, pool: &str, score: i32, now_ms: u64) -> Applies {
        if !self.cfg.enabled {
            return Applies::Disabled;
        }
        let passed = self.pool_passed(&self.lock(), &pool_key(pool), now_ms);
        match self.cfg.mode {
            // Classic greylisting: every triplet, whatever its pool did.
            GreylistMode::All => Applies::All,
            _ if passed => Applies::PoolPassed,
            _ if score > 0 => Applies::Suspect,
            GreylistMode::Unknown => Applies::Unknown,
            GreylistMode::Suspects => Applies::NotSuspect,
        }
    }

    /// The decision at RCPT for a session whose block has `score`.
    pub fn check(
        &self,
        pool: &str,
        score: i32,
        sender: &str,
        helo: &str,
        rcpt: &str,
        now_ms: u64,
    ) -> Check {
        if !self.applies(pool, score, now_ms).greylisted() {
            return Check::Accept;
        }
        let key = triplet_key(pool, sender, helo, rcpt);
        let delay = ms(self.cfg.delay.0);
        let window = ms(self.cfg.retry_window.0);
        let mut st = self.lock();
        let fresh = Entry {
            first_ms: now_ms,
            passed_ms: 0,
        };
        let entry = match st.entries.get(&key).copied() {
            Some(e) if e.passed_ms > 0 && !self.expired(&e, now_ms) => {
                return Check::Accept;
            }
            // Within the window: a retry.
            Some(e) if now_ms.saturating_sub(e.first_ms) <= window => e,
            // None, or a retry after the window: starts over.
            _ => {
                self.insert(&mut st, key, fresh);
                return Check::Greylisted { retry_in_ms: delay };
            }
        };
        let waited = now_ms.saturating_sub(entry.first_ms);
        if waited < delay {
            return Check::TooEarly {
                retry_in_ms: delay - waited,
            };
        }
        let passed = Entry {
            passed_ms: now_ms,
            ..entry
        };
        st.entries.insert(key, passed);
        st.changed.insert((false, key), PUSH_ROUNDS);
        let pk = pool_key(pool);
        let t = st.pools.entry(pk).or_insert(0);
        *t = (*t).max(now_ms);
        st.changed.insert((true, pk), PUSH_ROUNDS);
        Check::Passed { waited_ms: waited }
    }

    /// A message from `pool` was accepted: its pool is known for another
    /// `pass_ttl` (renewed by traffic).
    pub fn delivered(&self, pool: &str, now_ms: u64) {
        if !self.cfg.enabled {
            return;
        }
        let pk = pool_key(pool);
        let mut st = self.lock();
        let t = st.pools.entry(pk).or_insert(0);
        // Gossip a renewal at most once a day per pool, not per message.
        let renew = now_ms.saturating_sub(*t) > 86_400_000;
        *t = (*t).max(now_ms);
        if renew {
            st.changed.insert((true, pk), PUSH_ROUNDS);
        }
    }

    fn insert(&self, st: &mut State, key: Key, entry: Entry) {
        if !st.entries.contains_key(&key) && st.entries.len() >= self.cfg.max_entries {
            // Full: the oldest first-seen goes (a linear scan, rare: the
            // sweep keeps the map below the bound in normal operation).
            if let Some(old) = st
                .entries
                .iter()
                .min_by_key(|(k, e)| (e.passed_ms.max(e.first_ms), **k))
                .map(|(k, _)| *k)
            {
                st.entries.remove(&old);
                metrics::counter!("magicmx_greylist_evicted_total").increment(1);
            }
        }
        st.entries.insert(key, entry);
        st.changed.insert((false, key), PUSH_ROUNDS);
    }

    /// Merges a peer's entry. Stale ones (unpassed and past the retry
    /// window, or passed and past `pass_ttl`) are ignored.
    pub fn merge_entry(&self, key: Key, other: Entry, now_ms: u64) -> bool {
        // An unpassed entry past the retry window is no first attempt any
        // more: merging its older first-seen would undo a restart here.
        let stale = other.passed_ms == 0
            && other.first_ms.saturating_add(ms(self.cfg.retry_window.0)) < now_ms;
        if stale || self.expired(&other, now_ms) {
            return false;
        }
        let mut st = self.lock();
        let merged = match st.entries.get(&key) {
            Some(mine)
                if mine.first_ms.saturating_add(ms(self.cfg.retry_window.0)) < now_ms
                    && mine.passed_ms == 0 =>
            {
                other
            }
            Some(mine) => mine.merge(other),
            None => other,
        };
        if st.entries.get(&key) == Some(&merged) {
            return false;
        }
        self.insert(&mut st, key, merged);
        true
    }

    /// Merges a peer's pool pass.
    pub fn merge_pool(&self, key: Key, passed_ms: u64, now_ms: u64) -> bool {
        if passed_ms.saturating_add(ms(self.cfg.pass_ttl.0)) <= now_ms {
            return false;
        }
        let mut st = self.lock();
        let t = st.pools.entry(key).or_insert(0);
        if *t >= passed_ms {
            return false;
        }
        *t = passed_ms;
        if st.pools.len() > self.cfg.max_entries {
            if let Some(old) = st
                .pools
                .iter()
                .min_by_key(|(k, t)| (**t, **k))
                .map(|(k, _)| *k)
            {
                st.pools.remove(&old);
            }
        }
        st.changed.insert((true, key), PUSH_ROUNDS);
        true
    }

    fn expired(&self, e: &Entry, now_ms: u64) -> bool {
        match e.passed_ms {
            0 => e.first_ms.saturating_add(ms(self.cfg.grey_ttl.0)) <= now_ms,
            p => p.saturating_add(ms(self.cfg.pass_ttl.0)) <= now_ms,
        }
    }

    /// Up to `max` changed entries and pools for gossip (each is pushed a
    /// few rounds): `(entries, pools)`.
    pub fn take_changes(&self, max: usize) -> Changes {
        let mut st = self.lock();
        let keys: Vec<(bool, Key)> = st.changed.keys().take(max).copied().collect();
        let (mut entries, mut pools) = (Vec::new(), Vec::new());
        for k in keys {
            let rounds = st.changed.get_mut(&k).map(|r| {
                *r = r.saturating_sub(1);
                *r
            });
            if rounds == Some(0) {
                st.changed.remove(&k);
            }
            match k {
                (false, key) => entries.extend(st.entries.get(&key).map(|e| (key, *e))),
                (true, key) => pools.extend(st.pools.get(&key).map(|t| (key, *t))),
            }
        }
        (entries, pools)
    }

    /// Drops expired entries and pools; counts the unpassed ones that
    /// expired as never returned. Returns how many entries went.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let mut st = self.lock();
        let before = st.entries.len();
        let mut never = 0u64;
        let entries = std::mem::take(&mut st.entries);
        st.entries = entries
            .into_iter()
            .filter(|(_, e)| {
                let gone = self.expired(e, now_ms);
                never += u64::from(gone && e.passed_ms == 0);
                !gone
            })
            .collect();
        let ttl = ms(self.cfg.pass_ttl.0);
        st.pools.retain(|_, t| t.saturating_add(ttl) > now_ms);
        let State {
            entries,
            changed,
            pools,
            ..
        } = &mut *st;
        changed.retain(|(pool, k), _| match pool {
            true => pools.contains_key(k),
            false => entries.contains_key(k),
        });
        metrics::counter!("magicmx_greylist_never_returned_total").increment(never);
        metrics::gauge!("magicmx_greylist_entries").set(st.entries.len() as f64);
        before - st.entries.len()
    }

    /// Entries and pools held now.
    pub fn len(&self) -> (usize, usize) {
        let st = self.lock();
        (st.entries.len(), st.pools.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn cfg(mode: GreylistMode) -> GreylistConfig {
        GreylistConfig {
            enabled: true,
            mode,
            delay: Dur::secs(60),
            ..GreylistConfig::default()
        }
    }

    #[test]
    fn senders_are_normalised() {
        assert_eq!(
            normalise_sender("Bob+List@Example.TEST"),
            "bob@example.test"
        );
        assert_eq!(
            normalise_sender("prvs=1234abcd=bob@example.test"),
            "bob@example.test"
        );
        assert_eq!(
            normalise_sender("PRVS=0123456789=Bob+x@example.test"),
            "bob@example.test"
        );
        assert_eq!(normalise_sender("bob@example.test"), "bob@example.test");
        assert_ne!(
            triplet_key("10.0.0.0/24", "", "a.test", "r@x.test"),
            triplet_key("10.0.0.0/24", "", "b.test", "r@x.test")
        );
    }

    #[test]
    fn retry_after_delay_passes_and_too_early_does_not() {
        let g = Greylist::new(&cfg(GreylistMode::Suspects));
        let p = "10.0.0.0/24";
        assert_eq!(g.check(p, 0, "a@b", "h", "r@x", 0), Check::Accept);
        assert_eq!(
            g.check(p, 3, "a@b", "h", "r@x", 1_000),
            Check::Greylisted {
                retry_in_ms: 60_000
            }
        );
        assert_eq!(
            g.check(p, 3, "a+1@b", "h", "r@x", 31_000),
            Check::TooEarly {
                retry_in_ms: 30_000
            }
        );
        assert_eq!(
            g.check(p, 3, "a@b", "h", "r@x", 61_000),
            Check::Passed { waited_ms: 60_000 }
        );
        // The pool passed: another sender is not greylisted either.
        assert_eq!(g.check(p, 3, "c@d", "h", "r@x", 62_000), Check::Accept);
        assert_eq!(g.applies(p, 3, 62_000), Applies::PoolPassed);
    }

    #[test]
    fn a_retry_after_the_window_starts_over() {
        let g = Greylist::new(&cfg(GreylistMode::All));
        let p = "10.0.0.0/24";
        assert!(matches!(
            g.check(p, 0, "a@b", "h", "r@x", 0),
            Check::Greylisted { .. }
        ));
        let late = 25 * 3_600_000;
        assert!(matches!(
            g.check(p, 0, "a@b", "h", "r@x", late),
            Check::Greylisted { .. }
        ));
        assert!(matches!(
            g.check(p, 0, "a@b", "h", "r@x", late + 60_000),
            Check::Passed { .. }
        ));
    }

    #[test]
    fn unknown_mode_greylists_never_seen_pools_until_they_deliver() {
        let g = Greylist::new(&cfg(GreylistMode::Unknown));
        assert_eq!(g.applies("10.0.0.0/24", 0, 0), Applies::Unknown);
        g.delivered("10.0.0.0/24", 0);
        assert_eq!(g.applies("10.0.0.0/24", 0, 1), Applies::PoolPassed);
    }

    #[test]
    fn merges_are_idempotent_and_commutative() {
        let a = Entry {
            first_ms: 5,
            passed_ms: 0,
        };
        let b = Entry {
            first_ms: 3,
            passed_ms: 9,
        };
        assert_eq!(a.merge(b), b.merge(a));
        assert_eq!(a.merge(a), a);
        assert_eq!(a.merge(b).merge(b), a.merge(b));
        // A first attempt at A and the retry at B: B learns A's entry.
        let na = Greylist::new(&cfg(GreylistMode::All));
        let nb = Greylist::new(&cfg(GreylistMode::All));
        let p = "10.0.0.0/24";
        assert!(matches!(
            na.check(p, 0, "a@b", "h", "r@x", 0),
            Check::Greylisted { .. }
        ));
        let (entries, _) = na.take_changes(10);
        for (k, e) in entries {
            assert!(nb.merge_entry(k, e, 1));
        }
        assert!(matches!(
            nb.check(p, 0, "a@b", "h", "r@x", 60_000),
            Check::Passed { .. }
        ));
    }

    #[test]
    fn a_stale_peer_entry_does_not_undo_a_restart() {
        let g = Greylist::new(&cfg(GreylistMode::All));
        let p = "10.0.0.0/24";
        let day = 25 * 3_600_000;
        assert!(matches!(
            g.check(p, 0, "a@b", "h", "r@x", day),
            Check::Greylisted { .. }
        ));
        let key = triplet_key(p, "a@b", "h", "r@x");
        let old = Entry {
            first_ms: 1,
            passed_ms: 0,
        };
        assert!(!g.merge_entry(key, old, day + 1));
        assert!(matches!(
            g.check(p, 0, "a@b", "h", "r@x", day + 60_000),
            Check::Passed { .. }
        ));
    }

    #[test]
    fn entries_are_bounded_and_swept() {
        let g = Greylist::new(&GreylistConfig {
            max_entries: 2,
            ..cfg(GreylistMode::All)
        });
        for (i, r) in ["a@x", "b@x", "c@x"].iter().enumerate() {
            g.check("p", 0, "s@b", "h", r, i as u64);
        }
        assert_eq!(g.len().0, 2);
        let ttl = ms(g.cfg.grey_ttl.0);
        assert_eq!(g.sweep(ttl + 10), 2);
    }
}
