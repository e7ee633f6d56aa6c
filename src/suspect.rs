//! The suspicion state of a source block: a score with its reasons.
//!
//! Every signal that tells a bot from a person lands here: a DNSBL or DNSWL
//! listing, a failed protocol test (pregreet, unauthorised pipelining,
//! non-SMTP commands, bare CR/LF), invalid recipients, a trap address, and
//! later a greylist pass (a negative weight). A [`SuspectState`] is data: a
//! bounded map from [`Kind`] to [`Signal`] (weight, expiry, detail) plus the
//! invalid-recipient counts per (origin, epoch), numbered like the
//! throttle's epochs so that they merge the same way.
//!
//! The state is built to travel over gossip: [`SuspectState::merge`] keeps,
//! per kind, the greatest signal (latest expiry, then weight, then detail),
//! and per (origin, epoch) the largest count; when more than `max_reasons`
//! kinds remain it keeps those ranked first by the same order, and it drops
//! counts older than the window behind the newest epoch. Each of these is a
//! maximum over a total order, so merge is idempotent, commutative and
//! associative (see the property tests), and re-sent or reordered state is
//! harmless. A signal added locally is a merge with a one-signal state.
//!
//! [`Policy`] holds `[suspect]` and turns a state into a [`Verdict`] with
//! pure functions: the score (expired signals ignored), whether the block is
//! allowlisted, a suspect or refused (with the reason for `550 5.7.1`), and
//! the lower limits of a suspect. The session and the throttle call these;
//! the words of the SMTP reply are the session's business, a [`Verdict`]
//! only carries data with a `Display`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::config::SuspectConfig;

/// The node a count comes from, numbered like the throttle's origins.
pub type Origin = u16;

/// Longest signal detail kept (bytes), so a state stays small on the wire.
pub const MAX_DETAIL: usize = 80;

/// A protocol test a client can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProtocolTest {
    /// Sent before the final `220 ` of the banner.
    Pregreet,
    /// Commands sent before the EHLO reply, or pipelined after HELO.
    Pipelining,
    /// `GET`, `POST`, `CONNECT`, ... or bytes that are not a verb.
    NonSmtp,
    /// A bare CR or LF in a command or in DATA.
    BareLf,
}

impl ProtocolTest {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolTest::Pregreet => "pregreet",
            ProtocolTest::Pipelining => "pipelining",
            ProtocolTest::NonSmtp => "non_smtp",
            ProtocolTest::BareLf => "bare_lf",
        }
    }
}

/// What a signal is about; a state holds at most one signal per kind.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "of")]
pub enum Kind {
    /// Listed in this DNSBL/DNSWL zone.
    Dnsbl(String),
    Protocol(ProtocolTest),
    /// Too many invalid recipients in the window (derived from the counts,
    /// see [`Policy::verdict`]; may also be stored by a peer that saw it).
    InvalidRecipients,
    /// Wrote to a trap address.
    Trap,
    /// Passed greylisting: a retrying, hence real, MTA (negative weight).
    GreylistPass,
}

impl ProtocolTest {
    pub fn from_name(name: &str) -> Option<ProtocolTest> {
        [
            ProtocolTest::Pregreet,
            ProtocolTest::Pipelining,
            ProtocolTest::NonSmtp,
            ProtocolTest::BareLf,
        ]
        .into_iter()
        .find(|t| t.as_str() == name)
    }
}

impl Kind {
    /// The name of the kind on the gossip wire (`dnsbl:<zone>`, `protocol:<test>`, ...).
    pub fn to_wire(&self) -> String {
        match self {
            Kind::Dnsbl(zone) => format!("dnsbl:{zone}"),
            Kind::Protocol(t) => format!("protocol:{}", t.as_str()),
            Kind::InvalidRecipients => "invalid_recipients".into(),
            Kind::Trap => "trap".into(),
            Kind::GreylistPass => "greylist_pass".into(),
        }
    }

    /// The kind of a wire name; None for a name this node does not know.
    pub fn from_wire(name: &str) -> Option<Kind> {
        if let Some(zone) = name.strip_prefix("dnsbl:") {
            let ok = !zone.is_empty()
                && zone.len() <= 253
                && zone
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            return ok.then(|| Kind::Dnsbl(zone.to_ascii_lowercase()));
        }
        if let Some(test) = name.strip_prefix("protocol:") {
            return ProtocolTest::from_name(test).map(Kind::Protocol);
        }
        match name {
            "invalid_recipients" => Some(Kind::InvalidRecipients),
            "trap" => Some(Kind::Trap),
            "greylist_pass" => Some(Kind::GreylistPass),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Dnsbl(zone) => write!(f, "listed in {zone}"),
            Kind::Protocol(t) => write!(f, "failed the {} test", t.as_str()),
            Kind::InvalidRecipients => f.write_str("too many invalid recipients"),
            Kind::Trap => f.write_str("wrote to a trap address"),
            Kind::GreylistPass => f.write_str("passed greylisting"),
        }
    }
}

/// One signal: its weight, until when it counts, and a short detail (the
/// DNSBL answer, the trap address, the count).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Signal {
    /// Field order is the merge order: latest expiry wins, then weight, then detail.
    pub expires_ms: u64,
    pub weight: i32,
    pub detail: String,
}

impl Signal {
    pub fn new(weight: i32, expires_ms: u64, detail: impl Into<String>) -> Signal {
        let mut detail: String = detail.into();
        if detail.len() > MAX_DETAIL {
            let mut cut = MAX_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        Signal {
            expires_ms,
            weight,
            detail,
        }
    }

    pub fn is_live(&self, now_ms: u64) -> bool {
        self.expires_ms > now_ms
    }
}

/// The bounds every merge applies (from `[suspect] max_reasons` and the
/// throttle window); all nodes of a network should use the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub max_reasons: usize,
    /// Epochs in the window: counts older than `newest - window_epochs + 1` go.
    pub window_epochs: u64,
}

/// The suspicion state of one block. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuspectState {
    signals: BTreeMap<Kind, Signal>,
    invalid: BTreeMap<(Origin, u64), u32>,
}

impl SuspectState {
    pub fn new() -> SuspectState {
        SuspectState::default()
    }

    pub fn is_empty(&self) -> bool {
        self.signals.is_empty() && self.invalid.is_empty()
    }

    /// The stored signals (expired ones included until [`Self::prune`]).
    pub fn signals(&self) -> impl Iterator<Item = (&Kind, &Signal)> {
        self.signals.iter()
    }

    /// The invalid-recipient counts: `((origin, epoch), count)`.
    pub fn invalid_counts(&self) -> impl Iterator<Item = (&(Origin, u64), &u32)> {
        self.invalid.iter()
    }

    /// Adds (merges) one signal.
    pub fn add(&mut self, kind: Kind, signal: Signal, bounds: Bounds) {
        merge_signal(&mut self.signals, kind, signal);
        truncate(&mut self.signals, bounds.max_reasons);
    }

    /// Merges one (origin, epoch) count: the larger one stays.
    pub fn add_invalid_count(&mut self, origin: Origin, epoch: u64, count: u32, bounds: Bounds) {
        let c = self.invalid.entry((origin, epoch)).or_insert(0);
        *c = (*c).max(count);
        self.trim_counts(bounds);
    }

    /// Counts one more invalid recipient seen by `origin` (normally this
    /// node) in `epoch`.
    pub fn count_invalid(&mut self, origin: Origin, epoch: u64, bounds: Bounds) {
        let c = self.invalid.get(&(origin, epoch)).copied().unwrap_or(0);
        self.add_invalid_count(origin, epoch, c.saturating_add(1), bounds);
    }

    /// Merges `other` into `self`. Idempotent, commutative, associative.
    pub fn merge(&mut self, other: &SuspectState, bounds: Bounds) {
        for (k, s) in &other.signals {
            merge_signal(&mut self.signals, k.clone(), s.clone());
        }
        truncate(&mut self.signals, bounds.max_reasons);
        for (key, c) in &other.invalid {
            let mine = self.invalid.entry(*key).or_insert(0);
            *mine = (*mine).max(*c);
        }
        self.trim_counts(bounds);
    }

    /// Invalid recipients of every origin in the epochs `first..=current`.
    pub fn invalid_in_window(&self, first: u64, current: u64) -> u32 {
        self.invalid
            .iter()
            .filter(|((_, e), _)| (first..=current).contains(e))
            .fold(0u32, |acc, (_, c)| acc.saturating_add(*c))
    }

    /// Drops expired signals and counts older than the window. Not part of
    /// merge (it depends on the clock); run it when sweeping.
    pub fn prune(&mut self, now_ms: u64, first_epoch: u64) {
        self.signals.retain(|_, s| s.is_live(now_ms));
        self.invalid.retain(|(_, e), _| *e >= first_epoch);
    }

    fn trim_counts(&mut self, bounds: Bounds) {
        let Some(newest) = self.invalid.keys().map(|(_, e)| *e).max() else {
            return;
        };
        let first = newest.saturating_sub(bounds.window_epochs.saturating_sub(1));
        self.invalid.retain(|(_, e), _| *e >= first);
    }
}

fn merge_signal(map: &mut BTreeMap<Kind, Signal>, kind: Kind, signal: Signal) {
    match map.get_mut(&kind) {
        Some(mine) if *mine >= signal => {}
        Some(mine) => *mine = signal,
        None => {
            map.insert(kind, signal);
        }
    }
}

/// Keeps the `max` signals ranked first: latest expiry, then weight, then
/// kind and detail (a total order that agrees with the per-kind merge order,
/// which is what keeps truncation associative).
fn truncate(map: &mut BTreeMap<Kind, Signal>, max: usize) {
    if map.len() <= max {
        return;
    }
    let mut ranked: Vec<(u64, i32, &Kind, &String)> = map
        .iter()
        .map(|(k, s)| (s.expires_ms, s.weight, k, &s.detail))
        .collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    let keep: BTreeSet<Kind> = ranked
        .into_iter()
        .take(max)
        .map(|(_, _, k, _)| k.clone())
        .collect();
    map.retain(|k, _| keep.contains(k));
}

/// One reason behind a score, for logs, `explain` and `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    #[serde(flatten)]
    pub kind: Kind,
    pub weight: i32,
    pub expires_ms: u64,
    pub detail: String,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

/// Where a score puts a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Negative score: an allowlisted sender, fast path (no tests, no tarpit).
    Allowlisted,
    Clean,
    /// At or above `threshold`: lower limits, tarpit, greylist.
    Suspect,
    /// At or above `refuse_threshold`: `550 5.7.1` at connect.
    Refused,
}

/// A block's verdict at one instant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub score: i32,
    pub level: Level,
    /// Live reasons, heaviest first.
    pub reasons: Vec<Reason>,
    #[serde(skip)]
    limit_factor: f64,
}

impl Verdict {
    pub fn is_suspect(&self) -> bool {
        self.level >= Level::Suspect
    }

    pub fn is_refused(&self) -> bool {
        self.level == Level::Refused
    }

    pub fn is_allowlisted(&self) -> bool {
        self.level == Level::Allowlisted
    }

    /// The refusal, if refused: displays as the text after `550 5.7.1 `.
    pub fn refusal(&self) -> Option<Refusal<'_>> {
        self.is_refused().then_some(Refusal(self))
    }

    /// A throttle limit as it applies to this block: scaled by
    /// `limit_factor` for a suspect (at least 1), unchanged otherwise.
    pub fn effective_limit(&self, limit: u32) -> u32 {
        if !self.is_suspect() {
            return limit;
        }
        let scaled = (f64::from(limit) * self.limit_factor).floor();
        (scaled as u32).clamp(1, limit.max(1))
    }

    /// [`Self::effective_limit`] for each of several limits (connections,
    /// messages, recipients).
    pub fn effective_limits<const N: usize>(&self, limits: [u32; N]) -> [u32; N] {
        limits.map(|l| self.effective_limit(l))
    }
}

/// The words of a refusal: `score 7: listed in bl.test (127.0.0.2), ...`.
#[derive(Debug, Clone, Copy)]
pub struct Refusal<'a>(&'a Verdict);

impl fmt::Display for Refusal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "suspect score {}", self.0.score)?;
        for (i, r) in self
            .0
            .reasons
            .iter()
            .filter(|r| r.weight > 0)
            .take(3)
            .enumerate()
        {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// `[suspect]` as pure functions over a [`SuspectState`].
#[derive(Debug, Clone)]
pub struct Policy {
    threshold: i32,
    refuse_threshold: i32,
    limit_factor: f64,
    reason_ttl_ms: u64,
    bounds: Bounds,
    epoch_ms: u64,
    pregreet_weight: i32,
    pipelining_weight: i32,
    non_smtp_weight: i32,
    bare_lf_weight: i32,
    invalid_rcpt_threshold: u32,
    invalid_rcpt_weight: i32,
    trap_weight: i32,
    traps: BTreeSet<String>,
}

impl Policy {
    /// `epoch_ms` and `window_epochs` are the throttle's (`[throttle] epoch`
    /// and `window / epoch`), so invalid recipients count in the same window.
    pub fn new(cfg: &SuspectConfig, epoch_ms: u64, window_epochs: u64) -> Policy {
        Policy {
            threshold: cfg.threshold,
            refuse_threshold: cfg.refuse_threshold,
            limit_factor: cfg.limit_factor,
            reason_ttl_ms: u64::try_from(cfg.reason_ttl.0.as_millis()).unwrap_or(u64::MAX),
            bounds: Bounds {
                max_reasons: cfg.max_reasons.max(1),
                window_epochs: window_epochs.max(1),
            },
            epoch_ms: epoch_ms.max(1),
            pregreet_weight: cfg.pregreet_weight,
            pipelining_weight: cfg.pipelining_weight,
            non_smtp_weight: cfg.non_smtp_weight,
            bare_lf_weight: cfg.bare_lf_weight,
            invalid_rcpt_threshold: cfg.invalid_rcpt_threshold.max(1),
            invalid_rcpt_weight: cfg.invalid_rcpt_weight,
            trap_weight: cfg.trap_weight,
            traps: cfg
                .trap_recipients
                .iter()
                .map(|t| normalize_address(t))
                .collect(),
        }
    }

    /// From the whole config (the throttle's epoch and window).
    pub fn from_config(cfg: &crate::config::Config) -> Policy {
        let epoch_ms = u64::try_from(cfg.throttle.epoch.0.as_millis())
            .unwrap_or(1)
            .max(1);
        let window_ms = u64::try_from(cfg.throttle.window.0.as_millis()).unwrap_or(1);
        Policy::new(&cfg.suspect, epoch_ms, (window_ms / epoch_ms).max(1))
    }

    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    pub fn epoch_of(&self, now_ms: u64) -> u64 {
        now_ms / self.epoch_ms
    }

    /// Score, level and live reasons of `state` at `now_ms`.
    pub fn verdict(&self, state: &SuspectState, now_ms: u64) -> Verdict {
        let mut reasons: Vec<Reason> = state
            .signals
            .iter()
            .filter(|(_, s)| s.is_live(now_ms))
            .map(|(k, s)| Reason {
                kind: k.clone(),
                weight: s.weight,
                expires_ms: s.expires_ms,
                detail: s.detail.clone(),
            })
            .collect();
        // The invalid-recipient rule, derived from the merged counts so that
        // counts from several nodes add up to it even if none saw enough.
        let current = self.epoch_of(now_ms);
        let first = current.saturating_sub(self.bounds.window_epochs - 1);
        let invalid = state.invalid_in_window(first, current);
        if invalid >= self.invalid_rcpt_threshold
            && !reasons.iter().any(|r| r.kind == Kind::InvalidRecipients)
        {
            reasons.push(Reason {
                kind: Kind::InvalidRecipients,
                weight: self.invalid_rcpt_weight,
                expires_ms: (current + 1).saturating_mul(self.epoch_ms),
                detail: format!("{invalid} in the window"),
            });
        }
        reasons.sort_by(|a, b| b.weight.cmp(&a.weight).then_with(|| a.kind.cmp(&b.kind)));
        let score = reasons
            .iter()
            .fold(0i32, |acc, r| acc.saturating_add(r.weight));
        let level = if score < 0 {
            Level::Allowlisted
        } else if score >= self.refuse_threshold {
            Level::Refused
        } else if score >= self.threshold {
            Level::Suspect
        } else {
            Level::Clean
        };
        Verdict {
            score,
            level,
            reasons,
            limit_factor: self.limit_factor,
        }
    }

    pub fn is_suspect(&self, state: &SuspectState, now_ms: u64) -> bool {
        self.verdict(state, now_ms).is_suspect()
    }

    pub fn is_refused(&self, state: &SuspectState, now_ms: u64) -> bool {
        self.verdict(state, now_ms).is_refused()
    }

    /// The signal of a failed protocol test, to [`SuspectState::add`].
    pub fn protocol_signal(&self, test: ProtocolTest, now_ms: u64, detail: &str) -> (Kind, Signal) {
        let weight = match test {
            ProtocolTest::Pregreet => self.pregreet_weight,
            ProtocolTest::Pipelining => self.pipelining_weight,
            ProtocolTest::NonSmtp => self.non_smtp_weight,
            ProtocolTest::BareLf => self.bare_lf_weight,
        };
        (
            Kind::Protocol(test),
            Signal::new(weight, now_ms.saturating_add(self.reason_ttl_ms), detail),
        )
    }

    /// The signals of a DNSBL lookup: one per listing, living its (clamped) TTL.
    pub fn dnsbl_signals(&self, score: &crate::dnsbl::Score, now_ms: u64) -> Vec<(Kind, Signal)> {
        score
            .reasons
            .iter()
            .map(|l| {
                let ttl = u64::try_from(l.ttl.as_millis()).unwrap_or(u64::MAX);
                (
                    Kind::Dnsbl(l.zone.clone()),
                    Signal::new(l.weight, now_ms.saturating_add(ttl), l.answer.to_string()),
                )
            })
            .collect()
    }

    /// Is `rcpt` one of `trap_recipients` (case-insensitive)?
    pub fn is_trap(&self, rcpt: &str) -> bool {
        !self.traps.is_empty() && self.traps.contains(&normalize_address(rcpt))
    }

    /// The trap signal if `rcpt` is a trap address.
    pub fn trap_signal(&self, rcpt: &str, now_ms: u64) -> Option<(Kind, Signal)> {
        self.is_trap(rcpt).then(|| {
            (
                Kind::Trap,
                Signal::new(
                    self.trap_weight,
                    now_ms.saturating_add(self.reason_ttl_ms),
                    normalize_address(rcpt),
                ),
            )
        })
    }

    /// Records one invalid recipient (refused by the recipient check, or
    /// `5.1.1` from the real MX) seen by `origin`; a trap address also adds
    /// its signal. Returns the verdict afterwards.
    pub fn on_invalid_recipient(
        &self,
        state: &mut SuspectState,
        origin: Origin,
        rcpt: &str,
        now_ms: u64,
    ) -> Verdict {
        state.count_invalid(origin, self.epoch_of(now_ms), self.bounds);
        if let Some((k, s)) = self.trap_signal(rcpt, now_ms) {
            state.add(k, s, self.bounds);
        }
        self.verdict(state, now_ms)
    }
}

/// Lower-case, no angle brackets, no trailing dot on the domain.
fn normalize_address(a: &str) -> String {
    a.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: Bounds = Bounds {
        max_reasons: 3,
        window_epochs: 4,
    };

    fn policy() -> Policy {
        let cfg = SuspectConfig {
            trap_recipients: vec!["Trap@Example.test".into()],
            ..SuspectConfig::default()
        };
        Policy::new(&cfg, 60_000, 60)
    }

    #[test]
    fn score_levels_and_refusal() {
        let p = policy();
        let mut st = SuspectState::new();
        let now = 1_000_000;
        assert_eq!(p.verdict(&st, now).level, Level::Clean);
        st.add(
            Kind::Dnsbl("bl.test".into()),
            Signal::new(3, now + 60_000, "127.0.0.2"),
            p.bounds(),
        );
        let v = p.verdict(&st, now);
        assert_eq!((v.score, v.level), (3, Level::Suspect));
        assert!(v.refusal().is_none());
        assert_eq!(v.effective_limit(60), 12);
        assert_eq!(v.effective_limit(2), 1, "never below 1");
        assert_eq!(v.effective_limits([120, 60, 200]), [24, 12, 40]);

        let (k, s) = p.protocol_signal(ProtocolTest::Pregreet, now, "sent before the banner");
        st.add(k, s, p.bounds());
        let v = p.verdict(&st, now);
        assert_eq!((v.score, v.level), (8, Level::Refused));
        let text = v.refusal().unwrap().to_string();
        assert!(
            text.starts_with("suspect score 8: failed the pregreet test"),
            "{text}"
        );
        assert!(text.contains("listed in bl.test (127.0.0.2)"), "{text}");

        // The listing expires; the protocol failure lives reason_ttl.
        let later = now + 60_000;
        assert_eq!(p.verdict(&st, later).score, 5);
        assert_eq!(p.verdict(&st, now + 3_600_000).level, Level::Clean);

        // An allowlist outweighs.
        let mut wl = SuspectState::new();
        wl.add(
            Kind::Dnsbl("wl.test".into()),
            Signal::new(-2, now + 60_000, "127.0.10.1"),
            p.bounds(),
        );
        let v = p.verdict(&wl, now);
        assert!(v.is_allowlisted());
        assert_eq!(v.effective_limit(60), 60);
    }

    #[test]
    fn invalid_recipients_and_traps() {
        let p = policy();
        let now = 10 * 60_000;
        let mut st = SuspectState::new();
        for _ in 0..4 {
            assert!(!p
                .on_invalid_recipient(&mut st, 0, "nobody@example.test", now)
                .is_suspect());
        }
        // The fifth, seen by a peer, makes it.
        let mut peer = SuspectState::new();
        peer.count_invalid(1, p.epoch_of(now), p.bounds());
        st.merge(&peer, p.bounds());
        let v = p.verdict(&st, now);
        assert!(v.is_suspect());
        assert_eq!(v.reasons[0].kind, Kind::InvalidRecipients);
        assert_eq!(v.reasons[0].detail, "5 in the window");
        // Out of the window: forgotten.
        assert!(!p.is_suspect(&st, now + 60 * 60_000));

        let mut st = SuspectState::new();
        assert!(p.is_trap("<trap@example.TEST>"));
        assert!(!p.is_trap("trap2@example.test"));
        let v = p.on_invalid_recipient(&mut st, 0, "TRAP@example.test", now);
        assert!(v.is_suspect());
        assert_eq!(v.reasons[0].kind, Kind::Trap);
    }

    #[test]
    fn kinds_roundtrip_on_the_wire() {
        for k in [
            Kind::Dnsbl("bl.test".into()),
            Kind::Protocol(ProtocolTest::Pregreet),
            Kind::Protocol(ProtocolTest::NonSmtp),
            Kind::InvalidRecipients,
            Kind::Trap,
            Kind::GreylistPass,
        ] {
            assert_eq!(Kind::from_wire(&k.to_wire()), Some(k));
        }
        for bad in ["", "dnsbl:", "dnsbl:a b", "protocol:x", "nope"] {
            assert_eq!(Kind::from_wire(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reasons_are_bounded() {
        let mut st = SuspectState::new();
        for i in 0..10u64 {
            st.add(
                Kind::Dnsbl(format!("z{i}.test")),
                Signal::new(1, 1_000 + i, ""),
                B,
            );
        }
        assert_eq!(st.signals().count(), 3);
        // The latest-expiring stay.
        assert!(st.signals().all(|(_, s)| s.expires_ms >= 1_007));
        for e in 0..100 {
            st.count_invalid(0, e, B);
        }
        assert_eq!(st.invalid_counts().count(), 4);
        assert_eq!(Signal::new(1, 1, "é".repeat(100)).detail.len(), MAX_DETAIL);
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            (0..4u8).prop_map(|z| Kind::Dnsbl(format!("z{z}.test"))),
            Just(Kind::Protocol(ProtocolTest::Pregreet)),
            Just(Kind::Protocol(ProtocolTest::NonSmtp)),
            Just(Kind::Trap),
            Just(Kind::GreylistPass),
        ]
    }

    fn state() -> impl Strategy<Value = SuspectState> {
        let signal = (
            kind(),
            0..5u64,
            -3..5i32,
            prop_oneof![Just(""), Just("a"), Just("b")],
        );
        let count = (0..3u16, 0..8u64, 0..5u32);
        (
            proptest::collection::vec(signal, 0..8),
            proptest::collection::vec(count, 0..8),
        )
            .prop_map(|(signals, counts)| {
                let mut st = SuspectState::new();
                for (k, e, w, d) in signals {
                    st.add(k, Signal::new(w, e, d), B);
                }
                for (o, e, c) in counts {
                    st.add_invalid_count(o, e, c, B);
                }
                st
            })
    }

    fn merged(a: &SuspectState, b: &SuspectState) -> SuspectState {
        let mut m = a.clone();
        m.merge(b, B);
        m
    }

    proptest! {
        #[test]
        fn merge_is_idempotent(a in state()) {
            prop_assert_eq!(merged(&a, &a), a);
        }

        #[test]
        fn merge_is_commutative(a in state(), b in state()) {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
        }

        #[test]
        fn merge_is_associative(a in state(), b in state(), c in state()) {
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
        }

        #[test]
        fn adding_is_merging_a_singleton(a in state(), k in kind(), e in 0..5u64, w in -3..5i32) {
            let mut added = a.clone();
            added.add(k.clone(), Signal::new(w, e, ""), B);
            let mut one = SuspectState::new();
            one.add(k, Signal::new(w, e, ""), B);
            prop_assert_eq!(added, merged(&a, &one));
        }
    }
}
