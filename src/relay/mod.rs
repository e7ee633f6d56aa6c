//! Outbound relay: the queue runner and everything after the spool.
//!
//! Mail enters through the spool: the SMTP side stores a message and calls
//! `notify_one()` on [`Relay::wake`]. The runner ([`Relay::run`]) lists the
//! spool at start (recovery after a restart) and again whenever it is woken,
//! a delivery ends or the earliest `next_attempt` comes (at least every
//! second). Due, non-quarantined messages are delivered by up to
//! `relay.concurrency` tasks; a message is never in two tasks at once.
//!
//! When a message's hold ends (its first attempt), the [`ReleaseGate`] (the
//! throttle) may send it to quarantine instead: kept on disk, never relayed
//! nor bounced, released by the operator or removed by the runner after
//! `throttle.quarantine_max_age`.
//!
//! One attempt of one message: refuse it as a loop if it carries too many
//! `Received:` headers, then group the pending recipients by domain and, per
//! domain, look up the MX set ([`crate::dns`]), plan the route ([`mx`]) and
//! run one SMTP transaction ([`deliver`]). Outcomes are data: delivered and
//! permanently failed recipients change state, temporarily failed ones stay
//! pending with exponential backoff until `relay.max_age`, after which they
//! fail too. A DSN ([`dsn`]) for the recipients that just failed is stored
//! as a new message first (never for a null sender: no bounce loops), so that
//! a crash can duplicate a DSN but never lose one (if the DSN cannot be
//! stored, the failed recipients stay pending and are retried); then the new state is
//! persisted with `Spool::update`, or, with nothing pending, the message is
//! removed (one commit).

pub mod deliver;
pub mod dsn;
pub mod mx;
#[cfg(test)]
mod testutil;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{Config, RelayConfig};
use crate::dns::{Dns, DnsError};
use crate::spool::{Envelope, QueueEntry, QueueId, RcptState, Recipient, Spool};

use deliver::{Diagnostic, RcptOutcome, RcptResult, Sessions, Status};
use dsn::FailedRcpt;
use mx::Plan;

/// The runner looks at the spool at least this often.
const POLL: Duration = Duration::from_secs(1);
/// ... and at most this often: a scan reads every entry of the spool, so
/// the gap between scans is ten times what the last one took (at most a
/// tenth of the runner's time goes to scanning), and at least this.
const SCAN_GAP_MIN: Duration = Duration::from_millis(1);
/// At shutdown, deliveries in progress get this long to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Decides, when a message's hold ends, whether it is relayed or
/// quarantined (the throttle, seen network-wide, says whether the block the
/// message came from went over its limit meanwhile).
pub trait ReleaseGate: Send + Sync {
    /// `Some(reason)` to quarantine mail from `client` now.
    fn quarantine_reason(&self, client: IpAddr) -> Option<String>;
}

/// The outbound side of the node. Build it with [`Relay::new`], hand
/// [`Relay::wake`] to the SMTP side, then spawn [`Relay::run`].
pub struct Relay {
    config: Arc<Config>,
    spool: Spool,
    dns: Dns,
    wake: Arc<Notify>,
    gate: Option<Arc<dyn ReleaseGate>>,
}

struct Inner {
    config: Arc<Config>,
    spool: Spool,
    dns: Dns,
    /// Idle outbound sessions for reuse.
    sessions: Sessions,
    wake: Arc<Notify>,
    gate: Option<Arc<dyn ReleaseGate>>,
}

impl Relay {
    pub fn new(config: Arc<Config>, spool: Spool, dns: Dns) -> Relay {
        Relay {
            config,
            spool,
            dns,
            wake: Arc::new(Notify::new()),
            gate: None,
        }
    }

    /// Checks every message with `gate` when its hold ends (first attempt,
    /// not released by the operator): quarantined messages are kept, never
    /// relayed nor bounced, and deleted after `throttle.quarantine_max_age`.
    pub fn with_gate(mut self, gate: Arc<dyn ReleaseGate>) -> Relay {
        self.gate = Some(gate);
        self
    }

    /// Call `notify_one()` on this after storing a message: the runner looks
    /// at the spool at once instead of at its next poll.
    pub fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// The queue runner. Returns once `shutdown` is cancelled and every
    /// delivery in progress has finished or, after a short grace period,
    /// been abandoned before its outcome was recorded (the message then
    /// stays as it was in the spool and is tried again after a restart).
    pub async fn run(self, shutdown: CancellationToken) {
        let inner = Arc::new(Inner {
            sessions: Sessions::new(&self.config.relay),
            config: self.config,
            spool: self.spool,
            dns: self.dns,
            wake: self.wake,
            gate: self.gate,
        });
        let concurrency = inner.config.relay.concurrency.max(1);
        let abandon = CancellationToken::new();
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut running: HashMap<tokio::task::Id, QueueId> = HashMap::new();
        let mut in_flight: HashSet<QueueId> = HashSet::new();
        // Messages whose delivery task died: not retried before this time.
        let mut cooldown: HashMap<QueueId, u64> = HashMap::new();
        // Due messages found by the last scan, not started yet (no free slot).
        let mut ready: VecDeque<QueueId> = VecDeque::new();
        // The spool may hold something new: scan it (at most every scan_gap).
        let mut dirty = true;
        let mut last_scan: Option<Instant> = None;
        let mut scan_gap = SCAN_GAP_MIN;
        let mut next_scan = Instant::now();

        match inner.spool.entries() {
            Ok(entries) => info!(
                queued = entries.len(),
                quarantined = entries.iter().filter(|e| e.quarantined).count(),
                "relay queue runner started"
            ),
            Err(e) => warn!(error = %e, "relay queue runner started, spool not readable"),
        }

        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let mut wake_at = next_scan;
            if dirty {
                let since = last_scan.map(|t| t.elapsed());
                if since.is_none_or(|s| s >= scan_gap) {
                    dirty = false;
                    let started = Instant::now();
                    last_scan = Some(started);
                    let now = unix_now();
                    cooldown.retain(|_, until| *until > now);
                    let (due, until_next) = scan(&inner).await;
                    scan_gap = started
                        .elapsed()
                        .saturating_mul(10)
                        .clamp(SCAN_GAP_MIN, POLL);
                    ready = due
                        .into_iter()
                        .filter(|id| !in_flight.contains(id) && !cooldown.contains_key(id))
                        .collect();
                    next_scan = Instant::now() + until_next.min(POLL);
                    wake_at = next_scan;
                } else if let Some(last) = last_scan {
                    // Not before the gap has passed, even if the next due
                    // message is already late (no spinning until then).
                    wake_at = last + scan_gap;
                }
            }
            while in_flight.len() < concurrency {
                let Some(id) = ready.pop_front() else { break };
                if in_flight.contains(&id) {
                    continue;
                }
                let handle = tasks.spawn(process(inner.clone(), id.clone(), abandon.clone()));
                running.insert(handle.id(), id.clone());
                in_flight.insert(id);
            }

            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(done) = tasks.join_next_with_id() => {
                    let (task, panicked) = match done {
                        Ok((task, ())) => (task, None),
                        Err(e) => (e.id(), Some(e.to_string())),
                    };
                    if let Some(id) = running.remove(&task) {
                        in_flight.remove(&id);
                        if let Some(reason) = panicked {
                            error!(queue_id = %id, error = %reason, "delivery task died; message kept");
                            let pause = retry_delay(&inner.config.relay, 1);
                            cooldown.insert(id, unix_now() + pause);
                        }
                    }
                }
                _ = inner.wake.notified() => dirty = true,
                _ = tokio::time::sleep_until(wake_at) => {
                    if Instant::now() >= next_scan {
                        dirty = true;
                    }
                }
            }
        }

        if !tasks.is_empty() {
            info!(
                in_flight = tasks.len(),
                "relay stopping: waiting for deliveries in progress"
            );
            let grace =
                tokio::time::sleep(SHUTDOWN_GRACE.min(inner.config.relay.command_timeout.0));
            tokio::pin!(grace);
            loop {
                tokio::select! {
                    done = tasks.join_next() => if done.is_none() { break },
                    _ = &mut grace => {
                        info!(in_flight = tasks.len(), "relay stopping: abandoning deliveries in progress");
                        abandon.cancel();
                        while tasks.join_next().await.is_some() {}
                        break;
                    }
                }
            }
        }
        info!("relay queue runner stopped");
    }
}

/// Lists the spool: the due, non-quarantined messages (earliest first) and
/// the time until the next one becomes due. Removes quarantined messages
/// older than `throttle.quarantine_max_age`.
async fn scan(inner: &Inner) -> (Vec<QueueId>, Duration) {
    let now_ms = unix_ms();
    let now = now_ms / 1000;
    let quarantine_max_age = inner.config.throttle.quarantine_max_age.0.as_secs();
    let entries = match inner.spool.entries() {
        Ok(entries) => entries,
        Err(e) => {
            warn!(error = %e, "cannot list the spool");
            return (Vec::new(), POLL);
        }
    };
    let mut due = Vec::new();
    let mut until_next = POLL;
    for entry in entries {
        if entry.quarantined {
            let age = now.saturating_sub(entry.envelope.received_at);
            if age >= quarantine_max_age {
                match inner.spool.remove(&entry.id).await {
                    Ok(()) => info!(queue_id = %entry.id, age, "quarantine expired; removed"),
                    Err(e) => {
                        warn!(queue_id = %entry.id, error = %e, "cannot remove an expired quarantined message")
                    }
                }
            }
        } else if entry.next_attempt <= now {
            due.push(entry.id);
        } else {
            let ms = entry
                .next_attempt
                .saturating_mul(1000)
                .saturating_sub(now_ms);
            until_next = until_next.min(Duration::from_millis(ms));
        }
    }
    (due, until_next)
}

/// One attempt of one message, from reading its body to removing it.
async fn process(inner: Arc<Inner>, id: QueueId, abandon: CancellationToken) {
    // The scan may be a moment old: the operator may have deleted or
    // quarantined the message since.
    let mut entry = match inner.spool.get(&id) {
        Ok(Some(entry)) if !entry.quarantined && entry.next_attempt <= unix_now() => entry,
        Ok(_) => return,
        Err(e) => {
            warn!(queue_id = %id, error = %e, "cannot read the queue entry");
            return;
        }
    };
    if !has_pending(&entry) {
        let _ = remove(&inner, &id).await;
        return;
    }
    if let Some(reason) = release_check(&inner, &entry) {
        entry.quarantined = true;
        entry.last_error = Some(format!("quarantined: {reason}"));
        match inner.spool.update(&entry).await {
            Ok(()) => warn!(
                queue_id = %id,
                client = %entry.envelope.client_ip,
                reason = %reason,
                "quarantined"
            ),
            Err(e) => error!(queue_id = %id, error = %e, "cannot quarantine the message"),
        }
        return;
    }
    let spool = inner.spool.clone();
    let read_id = id.clone();
    let body = match tokio::task::spawn_blocking(move || spool.body(&read_id)).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let (body, results) = match body {
        Ok(body) => {
            let body: Arc<[u8]> = Arc::from(body);
            let results = tokio::select! {
                r = attempt(&inner, &entry, body.clone()) => r,
                _ = abandon.cancelled() => {
                    info!(queue_id = %id, "delivery abandoned at shutdown; message kept as it was");
                    return;
                }
            };
            (body, results)
        }
        Err(e) => {
            error!(queue_id = %id, error = %e, "cannot read the message body");
            let reply = Diagnostic::local(
                Status::new(4, 3, 0),
                format!("cannot read the queued message: {e}"),
            );
            let results = pending_with(&entry, |_| local(RcptOutcome::TempFail(reply.clone())));
            (Arc::from(Vec::new()), results)
        }
    };
    settle(&inner, entry, &body, results).await;
}

/// At the end of the hold (first attempt, not released by the operator, not
/// a DSN of this node), asks the gate whether the message goes to quarantine.
fn release_check(inner: &Inner, entry: &QueueEntry) -> Option<String> {
    let gate = inner.gate.as_ref()?;
    if entry.attempts > 0 || entry.released || is_own_dsn(entry, &inner.config) {
        return None;
    }
    gate.quarantine_reason(entry.envelope.client_ip)
}

/// DSNs are stored by [`queue_dsn`] from the null sender, 127.0.0.1 and the
/// node's own host name.
fn is_own_dsn(entry: &QueueEntry, config: &Config) -> bool {
    let e = &entry.envelope;
    e.sender.is_empty()
        && e.client_ip == IpAddr::V4(Ipv4Addr::LOCALHOST)
        && e.helo == config.node.hostname
}

/// Delivers the pending recipients; one result per envelope recipient,
/// None for those that were not pending.
async fn attempt(inner: &Inner, entry: &QueueEntry, body: Arc<[u8]>) -> Vec<Option<RcptResult>> {
    let config = &inner.config;
    let received = crate::hops::count_received(&body);
    if crate::hops::is_loop(received, config.relay.max_received_headers) {
        warn!(queue_id = %entry.id, received, "routing loop: too many Received headers");
        let reply = Diagnostic::local(
            Status::new(5, 4, 6),
            "routing loop detected (too many Received headers)",
        );
        return pending_with(entry, |_| local(RcptOutcome::PermFail(reply.clone())));
    }
    if deliver::has_bare_cr_or_lf(&body) {
        // The SMTP side never stores such a body; never send one either.
        error!(queue_id = %entry.id, "stored message has a bare CR or LF; not sent");
        let reply = Diagnostic::local(
            Status::new(5, 6, 0),
            "message has a bare CR or LF and cannot be sent",
        );
        return pending_with(entry, |_| local(RcptOutcome::PermFail(reply.clone())));
    }

    let mut results: Vec<Option<RcptResult>> = vec![None; entry.envelope.recipients.len()];
    let mut by_domain: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in entry.envelope.recipients.iter().enumerate() {
        if r.state != RcptState::Pending {
            continue;
        }
        match r.address.rsplit_once('@') {
            Some((local_part, domain)) if !local_part.is_empty() && !domain.is_empty() => by_domain
                .entry(crate::names::normalize_name(domain))
                .or_default()
                .push(i),
            _ => {
                results[i] = local(RcptOutcome::PermFail(Diagnostic::local(
                    Status::new(5, 1, 3),
                    format!("bad recipient address syntax <{}>", r.address),
                )))
            }
        }
    }

    let msg = deliver::Message {
        queue_id: entry.id.clone(),
        sender: entry.envelope.sender.clone(),
        smtputf8: entry.envelope.smtputf8,
        eight_bit: entry.envelope.eight_bit,
        body,
    };
    for (domain, idx) in by_domain {
        let plan = match inner.dns.mx(&domain).await {
            Ok(answer) => mx::plan(&domain, answer, config),
            Err(e @ (DnsError::InvalidName { .. } | DnsError::NoDomain(_))) => {
                Plan::PermFail(Diagnostic::local(
                    Status::new(5, 1, 2),
                    format!("bad destination domain {domain}: {e}"),
                ))
            }
            Err(e) => Plan::TempFail(Diagnostic::local(
                Status::new(4, 4, 3),
                format!("MX lookup for {domain} failed: {e}"),
            )),
        };
        debug!(queue_id = %entry.id, %domain, ?plan, "route");
        match plan {
            Plan::Hosts(hosts) => {
                let rcpts: Vec<String> = idx
                    .iter()
                    .map(|&i| entry.envelope.recipients[i].address.clone())
                    .collect();
                let out = deliver::deliver(
                    config,
                    &inner.dns,
                    &inner.sessions,
                    &msg,
                    &domain,
                    &hosts,
                    &rcpts,
                )
                .await;
                for (i, r) in idx.into_iter().zip(out) {
                    results[i] = Some(r);
                }
            }
            Plan::TempFail(reply) => {
                for i in idx {
                    results[i] = local(RcptOutcome::TempFail(reply.clone()));
                }
            }
            Plan::PermFail(reply) => {
                for i in idx {
                    results[i] = local(RcptOutcome::PermFail(reply.clone()));
                }
            }
        }
    }
    results
}

/// Records the results: persist, log, DSN, remove.
async fn settle(inner: &Inner, entry: QueueEntry, body: &[u8], results: Vec<Option<RcptResult>>) {
    let now = unix_now();
    let Settled {
        mut entry,
        mut events,
        newly_failed,
    } = apply(entry, &results, now, &inner.config.relay);

    // The DSN is stored before the failure is recorded: a crash in between
    // gives a second DSN after the restart, never none.
    if !newly_failed.is_empty() {
        if entry.envelope.sender.is_empty() {
            info!(
                queue_id = %entry.id,
                failed = newly_failed.len(),
                "no DSN: null sender"
            );
        } else if let Err(e) = queue_dsn(inner, &entry, body, &newly_failed, now).await {
            // Without its DSN a failure is not final: those recipients stay
            // queued and are tried again (and reported again) later.
            error!(queue_id = %entry.id, error = %e, "cannot queue the DSN; the failed recipients stay queued");
            for rcpt in entry.envelope.recipients.iter_mut() {
                let failed = newly_failed.iter().any(|f| f.address == rcpt.address);
                if failed && matches!(rcpt.state, RcptState::Failed { .. }) {
                    rcpt.state = RcptState::Pending;
                }
            }
            events.retain(|ev| !newly_failed.iter().any(|f| f.address == ev.rcpt));
            entry.last_error = Some(format!("4.3.0 cannot queue the DSN: {e}"));
            entry.next_attempt =
                now.saturating_add(retry_delay(&inner.config.relay, entry.attempts));
        }
    }
    let queue_id = entry.id.as_str();
    // Nothing left to do: removing the entry is the only write (one commit
    // per delivered message instead of an update and then a removal).
    let done = !has_pending(&entry);
    if !done {
        if let Err(e) = inner.spool.update(&entry).await {
            error!(queue_id = %queue_id, error = %e, "cannot record delivery results; the message will be tried again");
            return;
        }
    }
    for ev in &events {
        let mx = ev.mx.as_deref().unwrap_or("");
        let (rcpt, reply) = (ev.rcpt.as_str(), ev.reply.as_str());
        match ev.kind {
            EventKind::Delivered => {
                info!(queue_id = %queue_id, rcpt = %rcpt, mx = %mx, reply = %reply, "delivered")
            }
            EventKind::Bounced => {
                info!(queue_id = %queue_id, rcpt = %rcpt, mx = %mx, reply = %reply, "bounced")
            }
            EventKind::Deferred => info!(
                queue_id = %queue_id,
                rcpt = %rcpt,
                mx = %mx,
                reply = %reply,
                attempts = entry.attempts,
                next_attempt = entry.next_attempt,
                "deferred"
            ),
            EventKind::Expired => {
                warn!(queue_id = %queue_id, rcpt = %rcpt, mx = %mx, reply = %reply, "expired")
            }
        }
    }
    if done && !remove(inner, queue_id).await {
        // Record the outcome at least, so that the message is not delivered
        // again; a later attempt finds nothing pending and removes it.
        if let Err(e) = inner.spool.update(&entry).await {
            error!(queue_id = %queue_id, error = %e, "cannot record delivery results either");
        }
    }
}

async fn queue_dsn(
    inner: &Inner,
    entry: &QueueEntry,
    body: &[u8],
    failed: &[FailedRcpt],
    now: u64,
) -> Result<(), crate::spool::SpoolError> {
    let hostname = inner.config.node.hostname.as_str();
    let message = dsn::build(&dsn::Report {
        hostname,
        queue_id: &entry.id,
        sender: &entry.envelope.sender,
        arrival: entry.envelope.received_at,
        failed,
        original: body,
        now: chrono::Utc::now(),
    });
    let envelope = Envelope {
        sender: String::new(),
        recipients: vec![Recipient {
            address: entry.envelope.sender.clone(),
            state: RcptState::Pending,
        }],
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        helo: hostname.to_string(),
        received_at: now,
        smtputf8: !entry.envelope.sender.is_ascii(),
        eight_bit: !message.is_ascii(),
    };
    match inner.spool.store(envelope, message, now).await {
        Ok(stored) => {
            info!(
                queue_id = %entry.id,
                dsn_id = %stored.id,
                rcpt = %entry.envelope.sender,
                failed = failed.len(),
                "dsn queued"
            );
            inner.wake.notify_one();
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Removes a finished message; false if the spool refused.
async fn remove(inner: &Inner, queue_id: &str) -> bool {
    match inner.spool.remove(queue_id).await {
        Ok(()) => {
            info!(queue_id = %queue_id, "removed");
            true
        }
        Err(e) => {
            error!(queue_id = %queue_id, error = %e, "cannot remove a finished message");
            false
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventKind {
    Delivered,
    Bounced,
    Deferred,
    Expired,
}

/// One recipient's change of state, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    kind: EventKind,
    rcpt: String,
    mx: Option<String>,
    reply: String,
}

/// The entry after an attempt, and what changed.
#[derive(Debug)]
struct Settled {
    entry: QueueEntry,
    events: Vec<Event>,
    /// Recipients that failed in this attempt: the DSN reports exactly these.
    newly_failed: Vec<FailedRcpt>,
}

/// Applies an attempt's results to the entry (pure: no I/O, `now` given).
fn apply(
    mut entry: QueueEntry,
    results: &[Option<RcptResult>],
    now: u64,
    relay: &RelayConfig,
) -> Settled {
    let mut events = Vec::new();
    let mut newly_failed = Vec::new();
    let mut deferred: Vec<(usize, Option<String>, String)> = Vec::new();

    for (i, rcpt) in entry.envelope.recipients.iter_mut().enumerate() {
        if rcpt.state != RcptState::Pending {
            continue;
        }
        let Some(Some(result)) = results.get(i) else {
            continue;
        };
        let mx = result.mx.clone();
        match &result.outcome {
            RcptOutcome::Delivered(reply) => {
                let text = reply.to_string();
                events.push(event(EventKind::Delivered, &rcpt.address, mx, &text));
                rcpt.state = RcptState::Delivered { reply: text };
            }
            RcptOutcome::PermFail(reply) => {
                let text = reply.to_string();
                rcpt.state = RcptState::Failed {
                    reply: text.clone(),
                };
                newly_failed.push(FailedRcpt {
                    address: rcpt.address.clone(),
                    reply: reply.clone(),
                    remote_mta: mx.clone(),
                });
                events.push(event(EventKind::Bounced, &rcpt.address, mx, &text));
            }
            RcptOutcome::TempFail(reply) => deferred.push((i, mx, reply.to_string())),
        }
    }

    entry.attempts = entry.attempts.saturating_add(1);
    if let Some((_, _, reply)) = deferred.first() {
        entry.last_error = Some(reply.clone());
    }
    let max_age = relay.max_age.0.as_secs();
    let expired = now.saturating_sub(entry.envelope.received_at) >= max_age;
    if expired {
        // Everything still pending gives up now, deferred in this attempt or not.
        let last = entry
            .last_error
            .clone()
            .unwrap_or_else(|| "no attempt succeeded".into());
        for (i, rcpt) in entry.envelope.recipients.iter_mut().enumerate() {
            if rcpt.state != RcptState::Pending {
                continue;
            }
            let (mx, why) = match deferred.iter().find(|(j, _, _)| *j == i) {
                Some((_, mx, reply)) => (mx.clone(), reply.clone()),
                None => (None, last.clone()),
            };
            let typed = Diagnostic::local(Status::new(4, 4, 7), format!("message expired: {why}"));
            let reply = typed.to_string();
            rcpt.state = RcptState::Failed {
                reply: reply.clone(),
            };
            newly_failed.push(FailedRcpt {
                address: rcpt.address.clone(),
                reply: typed,
                remote_mta: mx.clone(),
            });
            events.push(event(EventKind::Expired, &rcpt.address, mx, &reply));
        }
    } else {
        for (i, mx, reply) in deferred {
            let address = &entry.envelope.recipients[i].address;
            events.push(event(EventKind::Deferred, address, mx, &reply));
        }
        if has_pending(&entry) {
            entry.next_attempt = now.saturating_add(retry_delay(relay, entry.attempts));
        }
    }
    Settled {
        entry,
        events,
        newly_failed,
    }
}

fn event(kind: EventKind, rcpt: &str, mx: Option<String>, reply: &str) -> Event {
    Event {
        kind,
        rcpt: rcpt.to_string(),
        mx,
        reply: reply.to_string(),
    }
}

/// Seconds to wait after the `attempts`-th attempt:
/// `min(retry_initial * 2^(attempts-1), retry_max)`, at least one second.
fn retry_delay(relay: &RelayConfig, attempts: u32) -> u64 {
    let exp = attempts.saturating_sub(1).min(63);
    let factor = 1u32.checked_shl(exp).unwrap_or(u32::MAX);
    let delay = relay
        .retry_initial
        .0
        .checked_mul(factor)
        .unwrap_or(Duration::MAX)
        .min(relay.retry_max.0);
    let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    secs.max(1)
}

fn has_pending(entry: &QueueEntry) -> bool {
    entry
        .envelope
        .recipients
        .iter()
        .any(|r| r.state == RcptState::Pending)
}

fn local(outcome: RcptOutcome) -> Option<RcptResult> {
    Some(RcptResult { outcome, mx: None })
}

/// The same result for every pending recipient.
fn pending_with(
    entry: &QueueEntry,
    f: impl Fn(usize) -> Option<RcptResult>,
) -> Vec<Option<RcptResult>> {
    entry
        .envelope
        .recipients
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if r.state == RcptState::Pending {
                f(i)
            } else {
                None
            }
        })
        .collect()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn unix_now() -> u64 {
    unix_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn relay_config() -> RelayConfig {
        RelayConfig {
            retry_initial: Dur::secs(60),
            retry_max: Dur::secs(3_600),
            max_age: Dur::secs(86_400),
            ..RelayConfig::default()
        }
    }

    fn entry(rcpts: &[&str]) -> QueueEntry {
        QueueEntry {
            id: "Q1".into(),
            envelope: Envelope {
                sender: "alice@example.com".into(),
                recipients: rcpts
                    .iter()
                    .map(|a| Recipient {
                        address: a.to_string(),
                        state: RcptState::Pending,
                    })
                    .collect(),
                client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                helo: "client.example.com".into(),
                received_at: 1_000_000,
                smtputf8: false,
                eight_bit: false,
            },
            size: 10,
            attempts: 0,
            next_attempt: 1_000_000,
            last_error: None,
            quarantined: false,
            released: false,
        }
    }

    fn remote(o: RcptOutcome) -> Option<RcptResult> {
        Some(RcptResult {
            outcome: o,
            mx: Some("mail.example.org".into()),
        })
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let r = relay_config();
        assert_eq!(retry_delay(&r, 1), 60);
        assert_eq!(retry_delay(&r, 2), 120);
        assert_eq!(retry_delay(&r, 3), 240);
        assert_eq!(retry_delay(&r, 6), 1_920);
        assert_eq!(retry_delay(&r, 7), 3_600);
        assert_eq!(retry_delay(&r, 1_000), 3_600);
        assert_eq!(retry_delay(&r, u32::MAX), 3_600);
        assert_eq!(retry_delay(&r, 0), 60);
        let fast = RelayConfig {
            retry_initial: Dur(Duration::from_millis(300)),
            retry_max: Dur::secs(10),
            ..relay_config()
        };
        assert_eq!(retry_delay(&fast, 1), 1);
        assert_eq!(retry_delay(&fast, 3), 2);
    }

    #[test]
    fn outcomes_change_states_and_defer_with_backoff() {
        let e = entry(&["a@x.org", "b@x.org", "c@x.org", "d@x.org"]);
        let mut done = e.clone();
        done.envelope.recipients[3].state = RcptState::Delivered {
            reply: "250 earlier".into(),
        };
        let results = vec![
            remote(RcptOutcome::Delivered("250 ok".into())),
            remote(RcptOutcome::PermFail("550 5.1.1 unknown".into())),
            remote(RcptOutcome::TempFail("450 4.2.0 later".into())),
            None,
        ];
        let now = 1_000_100;
        let s = apply(done, &results, now, &relay_config());
        let r = &s.entry.envelope.recipients;
        assert_eq!(
            r[0].state,
            RcptState::Delivered {
                reply: "250 ok".into()
            }
        );
        assert_eq!(
            r[1].state,
            RcptState::Failed {
                reply: "550 5.1.1 unknown".into()
            }
        );
        assert_eq!(r[2].state, RcptState::Pending);
        assert_eq!(
            r[3].state,
            RcptState::Delivered {
                reply: "250 earlier".into()
            }
        );
        assert_eq!(s.entry.attempts, 1);
        assert_eq!(s.entry.next_attempt, now + 60);
        assert_eq!(s.entry.last_error.as_deref(), Some("450 4.2.0 later"));
        assert_eq!(
            s.newly_failed,
            vec![FailedRcpt {
                address: "b@x.org".into(),
                reply: "550 5.1.1 unknown".into(),
                remote_mta: Some("mail.example.org".into()),
            }]
        );
        let kinds: Vec<EventKind> = s.events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            vec![
                EventKind::Delivered,
                EventKind::Bounced,
                EventKind::Deferred
            ]
        );

        // Second deferral: the delay doubles; the failure is not reported again.
        let s2 = apply(
            s.entry,
            &[
                None,
                None,
                remote(RcptOutcome::TempFail("451 again".into())),
                None,
            ],
            now + 60,
            &relay_config(),
        );
        assert_eq!(s2.entry.attempts, 2);
        assert_eq!(s2.entry.next_attempt, now + 60 + 120);
        assert!(s2.newly_failed.is_empty());
        assert!(has_pending(&s2.entry));
    }

    #[test]
    fn pending_recipients_expire_after_max_age() {
        let e = entry(&["a@x.org", "b@x.org"]);
        let now = e.envelope.received_at + 86_400;
        let results = vec![
            remote(RcptOutcome::TempFail("451 4.3.0 busy".into())),
            remote(RcptOutcome::Delivered("250 ok".into())),
        ];
        let s = apply(e, &results, now, &relay_config());
        let r = &s.entry.envelope.recipients;
        assert_eq!(
            r[0].state,
            RcptState::Failed {
                reply: "4.4.7 message expired: 451 4.3.0 busy".into()
            }
        );
        assert!(!has_pending(&s.entry));
        assert_eq!(s.newly_failed.len(), 1);
        assert_eq!(s.newly_failed[0].address, "a@x.org");
        assert_eq!(
            s.events
                .iter()
                .filter(|e| e.kind == EventKind::Expired)
                .count(),
            1
        );
        assert_eq!(
            dsn::status_of(&s.newly_failed[0].reply).to_string(),
            "4.4.7"
        );
    }

    #[test]
    fn not_expired_one_second_early() {
        let e = entry(&["a@x.org"]);
        let now = e.envelope.received_at + 86_399;
        let s = apply(
            e,
            &[remote(RcptOutcome::TempFail("451 busy".into()))],
            now,
            &relay_config(),
        );
        assert!(has_pending(&s.entry));
        assert!(s.newly_failed.is_empty());
    }

    #[test]
    fn all_done_means_nothing_pending() {
        let e = entry(&["a@x.org"]);
        let s = apply(
            e,
            &[remote(RcptOutcome::Delivered("250 ok".into()))],
            1_000_001,
            &relay_config(),
        );
        assert!(!has_pending(&s.entry));
        assert!(s.newly_failed.is_empty());
    }

    /// A node config relaying to `port` on whatever the DNS at `dns` says.
    fn node_config(port: u16, dns: std::net::SocketAddr) -> Config {
        let c = Config::parse(&format!(
            "[node]\nname = \"n1\"\nhostname = \"mx1.magic.test\"\nmagic_suffixes = [\".magic.test\"]\n\
             [relay]\nport = {port}\ntls = \"none\"\nconcurrency = 2\nmax_received_headers = 2\ndeny_networks = []\n\
             connect_timeout = \"2s\"\ncommand_timeout = \"5s\"\n\
             [dns]\nnameservers = [\"{dns}\"]\ntimeout = \"1s\"\n"
        ))
        .unwrap();
        c.validate().unwrap();
        c
    }

    async fn relay_dns() -> std::net::SocketAddr {
        use hickory_resolver::proto::rr::rdata::{A, MX};
        use hickory_resolver::proto::rr::{Name, RData};
        use std::str::FromStr;
        crate::dns::testutil::server(vec![
            (
                "relay.test",
                RData::MX(MX::new(10, Name::from_str("mx7.magic.test.").unwrap())),
            ),
            (
                "relay.test",
                RData::MX(MX::new(20, Name::from_str("mail.relay.test.").unwrap())),
            ),
            ("mail.relay.test", RData::A(A(Ipv4Addr::LOCALHOST))),
        ])
        .await
    }

    fn envelope(sender: &str, rcpts: &[&str], received_at: u64) -> Envelope {
        let mut e = entry(rcpts).envelope;
        e.sender = sender.into();
        e.received_at = received_at;
        e
    }

    /// Polls `check` every 20 ms for up to 10 s.
    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        for _ in 0..500 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for: {what}");
    }

    fn is_crlf_only(b: &[u8]) -> bool {
        !deliver::has_bare_cr_or_lf(b)
    }

    #[tokio::test]
    async fn runner_delivers_defers_bounces_and_stops() {
        let (port, sessions) = testutil::sink("127.0.0.1:0", testutil::Mode::Plain).await;
        let config = node_config(port, relay_dns().await);
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let dns = Dns::new(&config.dns).unwrap();
        let now = unix_now();
        let body = b"Received: from x by y\r\nSubject: hi\r\n\r\nhello\r\n".to_vec();
        let first = spool
            .store(
                envelope(
                    "alice@relay.test",
                    &["ok@relay.test", "bad@relay.test", "later@relay.test"],
                    now,
                ),
                body,
                now,
            )
            .await
            .unwrap();
        // Three Received headers, two allowed: a loop. Null sender: no DSN.
        let looping = b"Received: a\r\nReceived: b\r\nReceived: c\r\n\r\nx\r\n".to_vec();
        spool
            .store(envelope("", &["ok2@relay.test"], now), looping, now)
            .await
            .unwrap();

        let relay = Relay::new(Arc::new(config), spool.clone(), dns);
        let token = CancellationToken::new();
        let runner = tokio::spawn(relay.run(token.clone()));

        eventually("original deferred, DSN delivered, loop removed", || {
            let entries = spool.entries().unwrap();
            entries.len() == 1 && entries[0].attempts == 1 && sessions.lock().unwrap().len() == 2
        })
        .await;

        let e = spool
            .get(&first.id)
            .unwrap()
            .expect("original kept for its pending recipient");
        let r = &e.envelope.recipients;
        assert_eq!(
            r[0].state,
            RcptState::Delivered {
                reply: "250 2.0.0 queued as X1".into()
            }
        );
        assert_eq!(
            r[1].state,
            RcptState::Failed {
                reply: "550 5.1.1 no such user".into()
            }
        );
        assert_eq!(r[2].state, RcptState::Pending);
        assert_eq!(e.last_error.as_deref(), Some("450 4.2.0 try later"));
        assert!(e.next_attempt >= now + 60, "{} vs {now}", e.next_attempt);

        let seen = sessions.lock().unwrap().clone();
        let original = seen
            .iter()
            .find(|s| {
                s.commands
                    .iter()
                    .any(|c| c == "MAIL FROM:<alice@relay.test>")
            })
            .expect("original session");
        assert!(original
            .commands
            .iter()
            .any(|c| c == "RCPT TO:<later@relay.test>"));
        let bounce = seen
            .iter()
            .find(|s| s.commands.iter().any(|c| c == "MAIL FROM:<>"))
            .expect("DSN session");
        assert!(bounce
            .commands
            .iter()
            .any(|c| c == "RCPT TO:<alice@relay.test>"));
        assert!(!seen
            .iter()
            .any(|s| s.commands.iter().any(|c| c.contains("ok2@"))));
        let dsn = String::from_utf8(bounce.data.clone()).unwrap();
        assert!(is_crlf_only(&bounce.data));
        assert!(dsn.contains("report-type=delivery-status"), "{dsn}");
        assert!(
            dsn.contains("Final-Recipient: rfc822; bad@relay.test"),
            "{dsn}"
        );
        assert!(dsn.contains("Remote-MTA: dns; mail.relay.test"), "{dsn}");
        assert!(
            !dsn.contains("Final-Recipient: rfc822; later@relay.test"),
            "{dsn}"
        );
        assert!(dsn.contains("Subject: hi\r\n"), "{dsn}");

        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), runner)
            .await
            .expect("runner stops")
            .unwrap();
    }

    struct Quarantine;
    impl ReleaseGate for Quarantine {
        fn quarantine_reason(&self, _client: IpAddr) -> Option<String> {
            Some("block over its limit".into())
        }
    }

    #[tokio::test]
    async fn gate_quarantines_and_old_quarantine_expires() {
        let (port, sessions) = testutil::sink("127.0.0.1:0", testutil::Mode::Plain).await;
        let config = node_config(port, relay_dns().await);
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let dns = Dns::new(&config.dns).unwrap();
        let now = unix_now();
        let held = spool
            .store(
                envelope("a@relay.test", &["ok@relay.test"], now),
                b"S: x\r\n\r\nx\r\n".to_vec(),
                now,
            )
            .await
            .unwrap();
        let old_age = config.throttle.quarantine_max_age.0.as_secs() + 10;
        let mut old = spool
            .store(
                envelope("a@relay.test", &["ok@relay.test"], now - old_age),
                b"x\r\n".to_vec(),
                now + 3600,
            )
            .await
            .unwrap();
        old.quarantined = true;
        spool.update(&old).await.unwrap();

        let relay =
            Relay::new(Arc::new(config), spool.clone(), dns).with_gate(Arc::new(Quarantine));
        let token = CancellationToken::new();
        let runner = tokio::spawn(relay.run(token.clone()));
        eventually("held message quarantined, old one removed", || {
            let entries = spool.entries().unwrap();
            entries.len() == 1 && entries[0].quarantined
        })
        .await;
        let e = spool.get(&held.id).unwrap().unwrap();
        assert!(e.quarantined);
        assert_eq!(e.attempts, 0);
        assert!(e.last_error.unwrap().contains("block over its limit"));
        assert!(spool.get(&old.id).unwrap().is_none());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            sessions.lock().unwrap().is_empty(),
            "quarantined mail is never relayed"
        );
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), runner)
            .await
            .expect("runner stops")
            .unwrap();
    }
}
