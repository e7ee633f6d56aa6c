//! Outbound relay: the queue runner and everything after the spool.
//!
//! Mail enters through the spool: the SMTP side stores a message and calls
//! `notify_one()` on [`Relay::wake`]. The [`QueueRunner`] (spawned by
//! [`Relay::run`]) works in three named steps:
//! - **scan** ([`QueueRunner::scan`]): asks the spool's in-memory index for
//!   the due messages and removes expired quarantine. It reads no record:
//!   its cost grows with what is due, not with what is stored, so an idle
//!   node with a large deferred queue sleeps until the earliest due time.
//! - **start ready** ([`QueueRunner::start_ready`]): starts a delivery task
//!   per due message, up to `relay.concurrency` in all and
//!   `relay.destination_concurrency` per recipient domain (like Postfix's
//!   `default_destination_concurrency_limit`), so that a slow or stalling
//!   destination holds a few slots and never delays the others. A message is
//!   never in two tasks at once.
//! - **on done** ([`QueueRunner::on_done`]): frees the slots; a task that
//!   died leaves its message in a short cooldown.
//!
//! Time is read from the node's [`Clock`], so tests move holds and retries
//! forward instead of sleeping.
//!
//! When a message's hold ends (its first attempt), the [`ReleaseGate`] (the
//! throttle) may send it to quarantine instead: kept on disk, never relayed
//! nor bounced, released by the operator or removed by the runner after
//! `throttle.quarantine_max_age`. Only inbound mail is gated: the spool
//! records each message's [`Origin`] (inbound, outbound client, DSN of this
//! node) and whether the operator released it, nothing is guessed later.
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
//! removed (one commit). A message whose envelope or body fails its checksum
//! is never sent: the spool moves it to its damaged list.

pub mod deliver;
pub mod dsn;
pub mod mx;
#[cfg(test)]
mod testutil;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::clock::Clock;
use crate::config::{Config, RelayConfig};
use crate::dns::{Dns, DnsError};
use crate::spool::{
    Envelope, Origin, QueueEntry, QueueId, RcptState, Recipient, Spool, SpoolError,
};

use deliver::{Diagnostic, RcptOutcome, RcptResult, Sessions, Status};
use dsn::FailedRcpt;
use mx::Plan;

/// With nothing due, the runner still looks at the index this often (a
/// safety net: every change that matters wakes it).
const IDLE_WAKE: Duration = Duration::from_secs(60);
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
/// Told of each recipient a real MX refused with `5.1.1` (unknown user)
/// after the node accepted it: recipient verification (`crate::verify`)
/// records it, and the throttle counts it for the client's block (an
/// invalid recipient, the suspects' signal), without the relay depending on
/// those modules. `client` is the address the message came from, for mail
/// taken on the inbound listener only (not outbound clients, not DSNs).
pub trait UnknownRecipients: Send + Sync {
    fn record_unknown(&self, address: &str, client: Option<IpAddr>);
}

pub struct Relay {
    config: Arc<Config>,
    spool: Spool,
    dns: Dns,
    wake: Arc<Notify>,
    gate: Option<Arc<dyn ReleaseGate>>,
    clock: Clock,
    /// Idle outbound sessions for reuse.
    sessions: Sessions,
    /// Told of every `5.1.1` a real MX gives after acceptance.
    verifier: Option<Arc<dyn UnknownRecipients>>,
}

impl Relay {
    pub fn new(config: Arc<Config>, spool: Spool, dns: Dns) -> Relay {
        Relay {
            sessions: Sessions::new(&config.relay),
            config,
            spool,
            dns,
            wake: Arc::new(Notify::new()),
            gate: None,
            clock: Clock::system(),
            verifier: None,
        }
    }

    /// Tells `verifier` of every relay-time `5.1.1` (unknown user) from a
    /// real MX ([`UnknownRecipients`]).
    pub fn with_verifier(mut self, verifier: Arc<dyn UnknownRecipients>) -> Relay {
        self.verifier = Some(verifier);
        self
    }

    /// Checks every inbound message with `gate` when its hold ends (first
    /// attempt, not released by the operator): quarantined messages are kept,
    /// never relayed nor bounced, and deleted after `throttle.quarantine_max_age`.
    pub fn with_gate(mut self, gate: Arc<dyn ReleaseGate>) -> Relay {
        self.gate = Some(gate);
        self
    }

    /// Reads time (due times, retries, expiry) from `clock`.
    pub fn with_clock(mut self, clock: Clock) -> Relay {
        self.clock = clock;
        self
    }

    /// Call `notify_one()` on this after storing a message: the runner looks
    /// at the spool at once instead of at its next due time.
    pub fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// The queue runner. Returns once `shutdown` is cancelled and every
    /// delivery in progress has finished or, after a short grace period,
    /// been abandoned before its outcome was recorded (the message then
    /// stays as it was in the spool and is tried again after a restart).
    pub async fn run(self, shutdown: CancellationToken) {
        QueueRunner::new(Arc::new(self)).run(shutdown).await
    }

    fn now(&self) -> u64 {
        self.clock.now_secs()
    }
}

/// A delivery in progress.
struct Running {
    id: QueueId,
    destinations: Arc<[String]>,
}

/// The queue runner's state (see the module comment for its steps).
pub struct QueueRunner {
    relay: Arc<Relay>,
    tasks: JoinSet<()>,
    running: HashMap<tokio::task::Id, Running>,
    in_flight: HashSet<QueueId>,
    /// Deliveries in progress per recipient domain.
    per_destination: HashMap<String, usize>,
    /// Messages whose delivery task died: not retried before this time.
    cooldown: HashMap<QueueId, u64>,
    /// Cancelled after the shutdown grace: deliveries stop where they are.
    abandon: CancellationToken,
}

impl QueueRunner {
    fn new(relay: Arc<Relay>) -> QueueRunner {
        QueueRunner {
            relay,
            tasks: JoinSet::new(),
            running: HashMap::new(),
            in_flight: HashSet::new(),
            per_destination: HashMap::new(),
            cooldown: HashMap::new(),
            abandon: CancellationToken::new(),
        }
    }

    async fn run(mut self, shutdown: CancellationToken) {
        let stats = self.relay.spool.stats(self.relay.now());
        info!(
            queued = stats.messages,
            quarantined = stats.quarantined,
            deferred = stats.deferred,
            damaged = stats.damaged,
            "relay queue runner started"
        );
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let wake_at = self.scan().await;
            self.start_ready();
            let relay = self.relay.clone();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(done) = self.tasks.join_next_with_id() => self.on_done(done),
                _ = relay.wake.notified() => {}
                _ = relay.clock.sleep_until(wake_at.saturating_mul(1000)) => {}
            }
        }
        self.drain().await;
        info!("relay queue runner stopped");
    }

    /// Removes expired quarantine and returns when the runner must look
    /// again (Unix seconds): the next due time after now, the next
    /// quarantine expiry, the end of a cooldown, or [`IDLE_WAKE`] from now.
    /// Due messages that cannot start now (no free slot) start when a
    /// delivery ends, not on a timer.
    async fn scan(&mut self) -> u64 {
        let relay = &self.relay;
        let now = relay.now();
        let max_age = relay.config.throttle.quarantine_max_age.0.as_secs();
        for id in relay.spool.quarantined_before(now.saturating_sub(max_age)) {
            match relay.spool.remove(&id).await {
                Ok(()) => info!(queue_id = %id, "quarantine expired; removed"),
                Err(e) => {
                    warn!(queue_id = %id, error = %e, "cannot remove an expired quarantined message")
                }
            }
        }
        self.cooldown.retain(|_, until| *until > now);
        let mut wake_at = now.saturating_add(IDLE_WAKE.as_secs());
        if let Some(t) = relay.spool.next_due_after(now) {
            wake_at = wake_at.min(t);
        }
        if let Some(t) = relay.spool.first_quarantined() {
            wake_at = wake_at.min(t.saturating_add(max_age).saturating_add(1));
        }
        if let Some(t) = self.cooldown.values().min() {
            wake_at = wake_at.min(*t);
        }
        wake_at.max(now.saturating_add(1))
    }

    /// Starts a delivery for each due message that has a free slot, in all
    /// and for every one of its destinations.
    fn start_ready(&mut self) {
        let relay = self.relay.clone();
        let concurrency = relay.config.relay.concurrency.max(1);
        let per_destination = relay.config.relay.destination_concurrency.max(1);
        let free = concurrency.saturating_sub(self.in_flight.len());
        if free == 0 {
            return;
        }
        let now = relay.now();
        let mut planned: HashMap<String, usize> = HashMap::new();
        let (in_flight, cooldown, busy) = (&self.in_flight, &self.cooldown, &self.per_destination);
        let room = |d: &str| per_destination.saturating_sub(busy.get(d).copied().unwrap_or(0));
        let skip = |id: &str| in_flight.contains(id) || cooldown.contains_key(id);
        let ready = relay
            .spool
            .due_by_destination(now, free, room, skip, |id, destinations| {
                if skip(id) {
                    return false;
                }
                let full = destinations.iter().any(|d| {
                    busy.get(d).copied().unwrap_or(0) + planned.get(d).copied().unwrap_or(0)
                        >= per_destination
                });
                if full {
                    return false;
                }
                for d in destinations.iter() {
                    *planned.entry(d.clone()).or_default() += 1;
                }
                true
            });
        for (id, destinations) in ready {
            for d in destinations.iter() {
                *self.per_destination.entry(d.clone()).or_default() += 1;
            }
            let handle = self
                .tasks
                .spawn(process(relay.clone(), id.clone(), self.abandon.clone()));
            self.in_flight.insert(id.clone());
            self.running
                .insert(handle.id(), Running { id, destinations });
        }
    }

    /// A delivery task ended: free its slots.
    fn on_done(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let (task, panicked) = match done {
            Ok((task, ())) => (task, None),
            Err(e) => (e.id(), Some(e.to_string())),
        };
        let Some(Running { id, destinations }) = self.running.remove(&task) else {
            return;
        };
        self.in_flight.remove(&id);
        for d in destinations.iter() {
            if let Some(n) = self.per_destination.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    self.per_destination.remove(d);
                }
            }
        }
        if let Some(reason) = panicked {
            error!(queue_id = %id, error = %reason, "delivery task died; message kept");
            let pause = retry_delay(&self.relay.config.relay, 1);
            self.cooldown.insert(id, self.relay.now() + pause);
        }
    }

    /// At shutdown: lets deliveries in progress finish for a short grace, then abandons them.
    async fn drain(&mut self) {
        if self.tasks.is_empty() {
            return;
        }
        info!(
            in_flight = self.tasks.len(),
            "relay stopping: waiting for deliveries in progress"
        );
        let grace =
            tokio::time::sleep(SHUTDOWN_GRACE.min(self.relay.config.relay.command_timeout.0));
        tokio::pin!(grace);
        loop {
            tokio::select! {
                done = self.tasks.join_next() => if done.is_none() { break },
                _ = &mut grace => {
                    info!(in_flight = self.tasks.len(), "relay stopping: abandoning deliveries in progress");
                    self.abandon.cancel();
                    while self.tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
    }
}

/// One attempt of one message, from reading its body to removing it.
async fn process(relay: Arc<Relay>, id: QueueId, abandon: CancellationToken) {
    // The index may be a moment old: the operator may have deleted or
    // quarantined the message since.
    let mut entry = match relay.spool.get(&id) {
        Ok(Some(entry)) if !entry.quarantined && entry.next_attempt <= relay.now() => entry,
        Ok(_) => return,
        // The spool has put it on its damaged list: never sent.
        Err(SpoolError::Corrupt { .. }) => return,
        Err(e) => {
            warn!(queue_id = %id, error = %e, "cannot read the queue entry");
            return;
        }
    };
    if !has_pending(&entry) {
        let _ = remove(&relay, &id).await;
        return;
    }
    if let Some(reason) = release_check(&relay, &entry) {
        entry.quarantined = true;
        entry.last_error = Some(format!("quarantined: {reason}"));
        match relay.spool.update(&entry).await {
            Ok(()) => {
                metrics::counter!("magicmx_relay_quarantined_total").increment(1);
                crate::telemetry::history().record(
                    crate::telemetry::Tally::Quarantined,
                    relay.clock.now_ms() / 1000,
                );
                warn!(
                    queue_id = %id,
                    client = %entry.envelope.client_ip,
                    reason = %reason,
                    "quarantined"
                )
            }
            Err(e) => error!(queue_id = %id, error = %e, "cannot quarantine the message"),
        }
        return;
    }
    let spool = relay.spool.clone();
    let read_id = id.clone();
    let body = match tokio::task::spawn_blocking(move || spool.body(&read_id)).await {
        Ok(Ok(body)) => Ok(body),
        // Damaged: on the damaged list now, never delivered altered.
        Ok(Err(SpoolError::Corrupt { .. })) => return,
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let (body, results) = match body {
        Ok(body) => {
            let body: Arc<[u8]> = Arc::from(body);
            let results = tokio::select! {
                r = attempt(&relay, &entry, body.clone()) => r,
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
    settle(&relay, entry, &body, results).await;
}

/// At the end of the hold (first attempt of an inbound message not released
/// by the operator), asks the gate whether the message goes to quarantine.
/// Outbound clients' mail and this node's DSNs are never held back: their
/// origin is recorded in the spool.
fn release_check(relay: &Relay, entry: &QueueEntry) -> Option<String> {
    let gate = relay.gate.as_ref()?;
    if entry.attempts > 0 || entry.released || entry.envelope.origin != Origin::Inbound {
        return None;
    }
    gate.quarantine_reason(entry.envelope.client_ip)
}

/// Delivers the pending recipients; one result per envelope recipient,
/// None for those that were not pending.
async fn attempt(relay: &Relay, entry: &QueueEntry, body: Arc<[u8]>) -> Vec<Option<RcptResult>> {
    let config = &relay.config;
    let received = crate::hops::count_received(&body);
    if crate::hops::is_loop(received, config.relay.max_received_headers) {
        warn!(queue_id = %entry.id, received, "routing loop: too many Received headers");
        let reply = Diagnostic::local(
            Status::new(5, 4, 6),
            "routing loop detected (too many Received headers)",
        );
        return pending_with(entry, |_| local(RcptOutcome::PermFail(reply.clone())));
    }
    if let Some(why) = deliver::forbidden_in_data(&body) {
        // The SMTP side never stores such a body (NUL, bare CR or LF); a
        // damaged or hand-made spool entry must not be sent either.
        error!(queue_id = %entry.id, reason = why, "stored message cannot be sent");
        let reply = Diagnostic::local(Status::new(5, 6, 0), format!("{why} and cannot be sent"));
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
        let plan = match relay.dns.mx(&domain).await {
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
                    &relay.dns,
                    &relay.sessions,
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
async fn settle(relay: &Relay, entry: QueueEntry, body: &[u8], results: Vec<Option<RcptResult>>) {
    let now = relay.now();
    if let Some(v) = &relay.verifier {
        for (rcpt, result) in entry.envelope.recipients.iter().zip(&results) {
            if let Some(RcptResult {
                outcome: RcptOutcome::PermFail(d),
                ..
            }) = result
            {
                let s = d.status();
                if d.is_remote() && (s.class, s.subject, s.detail) == (5, 1, 1) {
                    let client = (entry.envelope.origin == crate::spool::Origin::Inbound)
                        .then_some(entry.envelope.client_ip);
                    v.record_unknown(&rcpt.address, client);
                }
            }
        }
    }
    let Settled {
        mut entry,
        mut events,
        newly_failed,
    } = apply(entry, &results, now, &relay.config.relay);

    // The DSN is stored before the failure is recorded: a crash in between
    // gives a second DSN after the restart, never none.
    if !newly_failed.is_empty() {
        if entry.envelope.sender.is_empty() {
            info!(
                queue_id = %entry.id,
                failed = newly_failed.len(),
                "no DSN: null sender"
            );
        } else if let Err(e) = queue_dsn(relay, &entry, body, &newly_failed, now).await {
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
                now.saturating_add(retry_delay(&relay.config.relay, entry.attempts));
        }
    }
    let queue_id = entry.id.as_str();
    // Nothing left to do: removing the entry is the only write (one commit
    // per delivered message instead of an update and then a removal).
    let done = !has_pending(&entry);
    if !done {
        if let Err(e) = relay.spool.update(&entry).await {
            error!(queue_id = %queue_id, error = %e, "cannot record delivery results; the message will be tried again");
            return;
        }
    }
    let now_secs = relay.clock.now_ms() / 1000;
    for ev in &events {
        let mx = ev.mx.as_deref().unwrap_or("");
        let (rcpt, reply) = (ev.rcpt.as_str(), ev.reply.as_str());
        let outcome = match ev.kind {
            EventKind::Delivered => "delivered",
            EventKind::Bounced => "bounced",
            EventKind::Deferred => "deferred",
            EventKind::Expired => "expired",
        };
        metrics::counter!("magicmx_relay_deliveries_total", "outcome" => outcome).increment(1);
        if ev.kind == EventKind::Delivered {
            crate::telemetry::history().record(crate::telemetry::Tally::Relayed, now_secs);
        }
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
    if done && !remove(relay, queue_id).await {
        // Record the outcome at least, so that the message is not delivered
        // again; a later attempt finds nothing pending and removes it.
        if let Err(e) = relay.spool.update(&entry).await {
            error!(queue_id = %queue_id, error = %e, "cannot record delivery results either");
        }
    }
}

async fn queue_dsn(
    relay: &Relay,
    entry: &QueueEntry,
    body: &[u8],
    failed: &[FailedRcpt],
    now: u64,
) -> Result<(), crate::spool::SpoolError> {
    let hostname = relay.config.node.hostname.as_str();
    let message = dsn::build(&dsn::Report {
        hostname,
        queue_id: &entry.id,
        sender: &entry.envelope.sender,
        arrival: entry.envelope.received_at,
        failed,
        original: body,
        now: chrono::DateTime::from_timestamp_millis(relay.clock.now_ms() as i64)
            .unwrap_or_else(chrono::Utc::now),
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
        origin: Origin::Dsn,
    };
    match relay.spool.store(envelope, message, now).await {
        Ok(stored) => {
            info!(
                queue_id = %entry.id,
                dsn_id = %stored.id,
                rcpt = %entry.envelope.sender,
                failed = failed.len(),
                "dsn queued"
            );
            relay.wake.notify_one();
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Removes a finished message; false if the spool refused.
async fn remove(relay: &Relay, queue_id: &str) -> bool {
    match relay.spool.remove(queue_id).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;
    use crate::relay::testutil::real_mx;

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
                origin: Origin::Inbound,
            },
            size: 10,
            attempts: 0,
            next_attempt: 1_000_000,
            last_error: None,
            quarantined: false,
            released: false,
            body_crc: None,
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

    fn relay_dns() -> crate::demo::dns::DnsServer {
        use crate::demo::dns::{DnsServer, Rec};
        DnsServer::start(&[
            Rec::Mx("relay.test", 10, "mx7.magic.test"),
            Rec::Mx("relay.test", 20, "mail.relay.test"),
            Rec::A("mail.relay.test", "127.0.0.1"),
        ])
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
        let sink = real_mx().start("127.0.0.1", 0).unwrap();
        let port = sink.addr.port();
        let dns = relay_dns();
        let config = node_config(port, dns.addr);
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let dns = Dns::new(&config.dns).unwrap();
        let now = crate::clock::system_ms() / 1000;
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
            entries.len() == 1 && entries[0].attempts == 1 && sink.transactions().len() == 2
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

        // The sink may have seen both on one reused connection: look at
        // transactions, not sessions.
        let seen = sink.transactions();
        let original = seen
            .iter()
            .find(|t| t.mail_from == "alice@relay.test")
            .expect("original transaction");
        assert!(original.refused.iter().any(|r| r == "later@relay.test"));
        let bounce = seen
            .iter()
            .find(|t| t.mail_from.is_empty())
            .expect("DSN transaction");
        assert!(bounce.rcpts.iter().any(|r| r == "alice@relay.test"));
        assert!(!sink
            .all_rcpt_attempts()
            .iter()
            .any(|(a, _)| a.contains("ok2@")));
        let dsn = String::from_utf8(bounce.wire_data.clone()).unwrap();
        assert!(is_crlf_only(&bounce.wire_data));
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

    /// Whatever is in the spool, the relay never emits a NUL, a bare CR or a
    /// bare LF: such messages are not sent (their senders get a DSN, which
    /// is clean too), the clean message goes out unchanged.
    #[tokio::test]
    async fn the_relay_never_emits_nul_or_bare_cr_lf() {
        let sink = real_mx().start("127.0.0.1", 0).unwrap();
        let port = sink.addr.port();
        let dns = relay_dns();
        let config = node_config(port, dns.addr);
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let dns = Dns::new(&config.dns).unwrap();
        let now = crate::clock::system_ms() / 1000;
        let bodies: [&[u8]; 4] = [
            b"Subject: nul\0in header\r\n\r\nhello\r\n",
            b"Subject: a\r\n\r\nnul\0in body\r\n",
            b"Subject: bare\nlf\r\nX: cr\rhere\r\n\r\nhello\r\n",
            b"Subject: clean\r\n\r\nhello\r\n",
        ];
        for body in bodies {
            spool
                .store(
                    envelope("alice@relay.test", &["ok@relay.test"], now),
                    body.to_vec(),
                    now,
                )
                .await
                .unwrap();
        }
        let relay = Relay::new(Arc::new(config), spool.clone(), dns);
        let token = CancellationToken::new();
        let runner = tokio::spawn(relay.run(token.clone()));
        eventually("the clean message and three DSNs sent", || {
            spool.entries().unwrap().is_empty() && sink.transactions().len() >= 4
        })
        .await;
        token.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), runner).await;
        let seen = sink.transactions();
        let data: Vec<&Vec<u8>> = seen
            .iter()
            .map(|t| &t.wire_data)
            .filter(|d| !d.is_empty())
            .collect();
        assert_eq!(data.len(), 4, "{seen:?}");
        for d in &data {
            assert!(
                !d.contains(&0),
                "NUL sent: {:?}",
                String::from_utf8_lossy(d)
            );
            assert!(
                is_crlf_only(d),
                "bare CR/LF sent: {:?}",
                String::from_utf8_lossy(d)
            );
        }
        let clean = data
            .iter()
            .filter(|d| !String::from_utf8_lossy(d).contains("delivery-status"))
            .collect::<Vec<_>>();
        assert_eq!(clean.len(), 1);
        assert!(clean[0].ends_with(b"Subject: clean\r\n\r\nhello\r\n"));
    }

    /// A destination that accepts TCP and never greets must not hold the
    /// slots of the others: with two slots and one per destination, mail
    /// to a healthy domain leaves at once behind three stalled messages.
    #[tokio::test]
    async fn a_stalling_destination_does_not_delay_another() {
        let sink = real_mx().start("127.0.0.1", 0).unwrap();
        let port = sink.addr.port();
        let stall = tokio::net::TcpListener::bind(("127.0.0.2", port))
            .await
            .unwrap();
        let held = Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = held.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = stall.accept().await {
                keep.lock().unwrap().push(sock);
            }
        });
        let dns = crate::demo::dns::DnsServer::start(&[
            crate::demo::dns::Rec::Mx("slow.test", 10, "mx.slow.test"),
            crate::demo::dns::Rec::A("mx.slow.test", "127.0.0.2"),
            crate::demo::dns::Rec::Mx("fast.test", 10, "mx.fast.test"),
            crate::demo::dns::Rec::A("mx.fast.test", "127.0.0.1"),
        ]);
        let mut config = node_config(port, dns.addr);
        config.relay.concurrency = 2;
        config.relay.destination_concurrency = 1;
        config.relay.command_timeout = crate::config::Dur::secs(30);
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let dns = Dns::new(&config.dns).unwrap();
        let now = crate::clock::system_ms() / 1000;
        for n in 0..3 {
            let rcpt = format!("u{n}@slow.test");
            spool
                .store(
                    envelope("a@fast.test", &[&rcpt], now),
                    b"S: x\r\n\r\nx\r\n".to_vec(),
                    now,
                )
                .await
                .unwrap();
        }
        spool
            .store(
                envelope("a@fast.test", &["ok@fast.test"], now),
                b"S: y\r\n\r\ny\r\n".to_vec(),
                now,
            )
            .await
            .unwrap();
        let relay = Relay::new(Arc::new(config), spool.clone(), dns);
        let token = CancellationToken::new();
        let runner = tokio::spawn(relay.run(token.clone()));
        tokio::time::timeout(Duration::from_secs(3), async {
            while sink.transactions().is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the healthy destination waited behind the stalled one");
        // The stalled destination holds exactly its one slot.
        assert_eq!(held.lock().unwrap().len(), 1);
        token.cancel();
        tokio::time::timeout(Duration::from_secs(10), runner)
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
        let sink = real_mx().start("127.0.0.1", 0).unwrap();
        let port = sink.addr.port();
        let dns = relay_dns();
        let config = node_config(port, dns.addr);
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let dns = Dns::new(&config.dns).unwrap();
        let now = crate::clock::system_ms() / 1000;
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
            sink.connections().is_empty(),
            "quarantined mail is never relayed"
        );
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), runner)
            .await
            .expect("runner stops")
            .unwrap();
    }
}
