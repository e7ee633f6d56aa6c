//! spool: the durable on-disk queue.
//!
//! The SMTP server answers `250` after DATA only once the message and its
//! envelope are on disk and fsynced; a node killed at any moment loses no
//! message it acknowledged. Everything lives in one redb file,
//! `<spool dir>/spool.redb`: `meta` holds each [`QueueEntry`] (JSON behind a
//! CRC-32 of it), `body` the raw message bytes (their CRC-32 is in the
//! entry), so that an [`Spool::update`] (attempts, recipient states, next
//! attempt) never rewrites the body; `damaged` lists the messages found
//! damaged, with the reason; `info` holds the spool's identity.
//!
//! **Group commit.** An fsync costs about 1.4 ms here, so one commit per
//! message would cap the node near 700 messages/s. Every write
//! ([`Spool::store`], [`Spool::update`], [`Spool::remove`]) goes over a
//! bounded channel to one writer thread, which drains what is pending (up to
//! [`MAX_BATCH`] operations), applies it all in one write transaction,
//! commits once with [`Durability::Immediate`] and only then answers each
//! waiter. While one commit is being fsynced the next batch piles up, so the
//! batch grows with the load. A batch of removals alone (delivered mail) is
//! committed without an fsync ([`Durability::None`]): the next durable
//! commit (the next store, or at most [`LAZY_REMOVALS_FOR`] later, or at
//! close) makes it durable. A crash in between brings those messages back
//! and they are delivered again: a duplicate, never a loss, as when Postfix
//! unlinks a delivered queue file without an fsync. "Acknowledged means
//! fsynced" is untouched: every store, update and damage record is durable
//! before its waiter hears back. The file is opened in redb's `ExclusiveWriter`
//! mode with one-phase commits (checksummed commit slots): one fsync per
//! commit, where the multi-process mode needs two. Another process therefore
//! cannot open a running node's spool: `magicmx queue list` asks the node
//! over a Unix socket beside the file ([`serve_control`], [`CONTROL_SOCKET`])
//! and opens the file itself only when no node runs.
//!
//! **Work grows with what is due.** At open the spool reads every envelope
//! once and keeps an index in memory: due times (`next_attempt → id`), the
//! quarantine by arrival, the held messages, the damaged list, the
//! destinations of each message. The queue runner asks [`Spool::due`] and
//! [`Spool::next_due`], the admin gauges ask [`Spool::stats`]; neither reads
//! the file, so an idle node with 100,000 deferred messages does nothing.
//! The writer updates the index after each commit, before answering.
//!
//! **Damage is visible, never silent.** Every read of an envelope or a body
//! checks its checksum; a panic inside redb on a garbled page is caught.
//! A damaged message is never delivered (altered or not) and never dropped:
//! it leaves the index and goes to the damaged list with the reason
//! ([`Spool::damaged`], shown by `queue list` and `/status`), its records
//! stay on disk for `magicmx queue salvage` ([`salvage`]).
//!
//! **A missing spool is refused.** Beside the file, [`MARKER_FILE`] names
//! the spool's identity, also stored inside it. A marker whose spool is gone,
//! empty or another one means acknowledged mail was lost or moved: the node
//! refuses to start unless told `--new-spool` ([`OpenOptions::new_spool`]).
//!
//! **Faults heal.** After an I/O error (a full disk) redb refuses every
//! later write until the database is reopened. The writer reopens it before
//! the next batch (and rebuilds the index from the file), so stores succeed
//! again as soon as space is back; [`Spool::health`] says whether the last
//! commit failed, and [`Spool::probe`] checks again (for `/healthz`).
//!
//! Older spools (JSON records without a checksum, no identity) are read as
//! they are and adopted: their records are checked by size only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{
    Builder, ConcurrencyMode, Database, DatabaseError, Durability, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableError, TableHandle,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

/// Identifies a message in the spool: 16 uppercase hex digits, the
/// microseconds since the Unix epoch followed by 12 bits that make it unique.
/// Ids sort by the time the message was stored.
pub type QueueId = String;

/// Name of the spool file inside the spool directory.
pub const SPOOL_FILE: &str = "spool.redb";

/// The marker beside the spool file: the identity of the spool that must be there.
pub const MARKER_FILE: &str = "spool.marker";

/// Unix socket beside the spool file, served by a running node for `queue list`.
pub const CONTROL_SOCKET: &str = "queue.sock";

/// Most operations applied in one write transaction (one fsync).
pub const MAX_BATCH: usize = 512;
/// At most this long between a removal committed without fsync and the
/// durable commit that covers it (bounds the duplicates after a crash).
pub const LAZY_REMOVALS_FOR: Duration = Duration::from_millis(200);

/// Capacity of the channel to the writer thread; senders wait beyond it.
const CHANNEL_CAPACITY: usize = 2048;

/// redb's page cache. The spool is mostly written once and read once.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// What a health probe writes to check that the file system takes writes.
const PROBE_BYTES: usize = 256 * 1024;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const BODY: TableDefinition<&str, &[u8]> = TableDefinition::new("body");
const DAMAGED: TableDefinition<&str, &[u8]> = TableDefinition::new("damaged");
const INFO: TableDefinition<&str, &str> = TableDefinition::new("info");
const SPOOL_ID_KEY: &str = "spool_id";

/// Prefix of a checksummed `meta` record: magic, then the CRC-32 of the JSON.
const RECORD_MAGIC: &[u8; 4] = b"MXQ1";

/// How the message came to this node, recorded when it is stored (never
/// guessed later from its sender or client address).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Accepted on the inbound (MX) listener: held, then checked by the throttle.
    #[default]
    Inbound,
    /// From a trusted client of the outbound (smarthost) listener: never held back.
    Outbound,
    /// A delivery status notification made by this node.
    Dsn,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// `""` is the null reverse-path `<>`.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// Who sent the message to us.
    pub client_ip: IpAddr,
    pub helo: String,
    /// Unix seconds.
    pub received_at: u64,
    pub smtputf8: bool,
    /// `BODY=8BITMIME`.
    pub eight_bit: bool,
    /// How it came (spools written before this field read as `Inbound`).
    #[serde(default)]
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
    pub state: RcptState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RcptState {
    Pending,
    Delivered {
        reply: String,
    },
    /// Permanent failure (the relay sends the DSN).
    Failed {
        reply: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub id: QueueId,
    pub envelope: Envelope,
    /// Body length in bytes.
    pub size: u64,
    pub attempts: u32,
    /// Unix seconds.
    pub next_attempt: u64,
    pub last_error: Option<String>,
    pub quarantined: bool,
    /// Released from quarantine by the operator: relayed without the hold check.
    #[serde(default)]
    pub released: bool,
    /// CRC-32 of the body, set by the spool (`None` in spools written before it).
    #[serde(default)]
    pub body_crc: Option<u32>,
}

impl QueueEntry {
    /// The destinations (recipient domains, lower case) still pending.
    pub fn pending_domains(&self) -> Vec<String> {
        let mut domains: Vec<String> = self
            .envelope
            .recipients
            .iter()
            .filter(|r| r.state == RcptState::Pending)
            .filter_map(|r| r.address.rsplit_once('@'))
            .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        domains.sort();
        domains.dedup();
        domains
    }
}

/// A message found damaged: kept on disk, never delivered, listed with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Damaged {
    pub id: QueueId,
    pub reason: String,
    /// Unix seconds.
    pub found_at: u64,
}

/// Everything a listing shows: the readable entries (by next attempt) and the damaged ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub entries: Vec<QueueEntry>,
    pub damaged: Vec<Damaged>,
}

/// The queue's counters, kept up to date by the writer (no scan).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SpoolStats {
    /// Readable messages in the queue (quarantined included, damaged not).
    pub messages: usize,
    pub quarantined: usize,
    /// Inbound messages in their hold (not yet tried).
    pub held: usize,
    /// Deferred: tried at least once, waiting for their next attempt.
    pub deferred: usize,
    pub damaged: usize,
}

/// Whether the spool can take writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Health {
    Ok,
    /// The last commit (or reopen) failed: stores are answered with an error.
    Failing {
        reason: String,
        since: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("spool database error: {0}")]
    Database(String),
    #[error("spool record {id} is damaged: {reason}")]
    Corrupt { id: QueueId, reason: String },
    #[error("message {0} is not in the spool")]
    NotFound(QueueId),
    #[error("the spool is closed")]
    Closed,
    #[error("the spool is being reopened after an error: {0}")]
    Unavailable(String),
    /// The marker says a spool should be here, and it is missing, empty or another one.
    #[error("{0}")]
    Refused(String),
    /// Another process (a running node) holds the spool file.
    #[error("{0} is in use by a running node")]
    Locked(PathBuf),
}

macro_rules! redb_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for SpoolError {
            fn from(err: $t) -> Self {
                SpoolError::Database(err.to_string())
            }
        }
    )*};
}
redb_errors!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// How [`Spool::open_with`] treats a spool that should be there and is not.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Start a new, empty spool even though the marker names another one
    /// (the operator's `--new-spool`). A spool file that is there is kept:
    /// an empty one is moved aside, one with another identity is adopted.
    pub new_spool: bool,
}

/// The durable queue. Cheap to clone; every clone is the same spool.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

/// What the handles and the writer thread share.
struct Shared {
    dir: PathBuf,
    path: PathBuf,
    /// `None` once closed, or while the writer reopens the file.
    db: RwLock<Option<Arc<Database>>>,
    closed: AtomicBool,
    index: Mutex<Index>,
    health: Mutex<Health>,
    commits: AtomicU64,
    writes: AtomicU64,
}

struct Inner {
    shared: Arc<Shared>,
    /// `None` once closed; the writer stops when every sender is gone.
    sender: RwLock<Option<mpsc::Sender<Op>>>,
    /// Becomes `true` (or loses its sender) when the writer thread has ended.
    writer_done: watch::Receiver<bool>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Let the writer drain what is queued and release the file, so that
        // the spool can be reopened as soon as the last handle is gone.
        drop(write_lock(&self.sender).take());
        if let Some(handle) = lock(&self.writer).take() {
            if handle.join().is_err() {
                error!(path = %self.shared.path.display(), "spool writer thread panicked");
            }
        }
    }
}

/// One write operation for the writer thread, with the channel of its waiter.
enum Op {
    Store {
        envelope: Envelope,
        body: Vec<u8>,
        next_attempt: u64,
        reply: oneshot::Sender<Result<QueueEntry, SpoolError>>,
    },
    Update {
        entry: QueueEntry,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    Remove {
        id: QueueId,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    /// Records a damaged message (nobody waits).
    Damage { damaged: Damaged },
    /// Reopens if needed and checks that writes succeed.
    Probe { reply: oneshot::Sender<Health> },
}

/// Per message, what the index needs.
#[derive(Debug, Clone)]
struct Slot {
    next_attempt: u64,
    received_at: u64,
    quarantined: bool,
    held: bool,
    deferred: bool,
    /// Pending recipient domains.
    destinations: Arc<[String]>,
}

/// Up to `max` of `candidates` (due, earliest first) that `accept` takes,
/// with their destinations.
fn offer<'a>(
    index: &Index,
    candidates: impl IntoIterator<Item = &'a (u64, QueueId)>,
    max: usize,
    mut accept: impl FnMut(&str, &[String]) -> bool,
) -> Vec<(QueueId, Arc<[String]>)> {
    let mut out = Vec::new();
    for (_, id) in candidates {
        if out.len() >= max {
            break;
        }
        let Some(slot) = index.slots.get(id) else {
            continue;
        };
        if accept(id, &slot.destinations) {
            out.push((id.clone(), slot.destinations.clone()));
        }
    }
    out
}

/// The keys of a message in `Index::by_destination`: its pending
/// destinations, or `""` when it has none.
fn destination_keys(destinations: &[String]) -> impl Iterator<Item = &str> {
    let none = destinations.is_empty().then_some("");
    destinations.iter().map(String::as_str).chain(none)
}

/// The in-memory index of the spool (see the module comment).
#[derive(Default)]
struct Index {
    slots: HashMap<QueueId, Slot>,
    /// Not quarantined: by next attempt.
    due: BTreeSet<(u64, QueueId)>,
    /// Quarantined: by arrival.
    quarantine: BTreeSet<(u64, QueueId)>,
    /// Not quarantined, per pending destination (`""` for none): by next
    /// attempt, so that a destination at its concurrency limit costs
    /// nothing to skip ([`Spool::due_by_destination`]).
    by_destination: HashMap<String, BTreeSet<(u64, QueueId)>>,
    /// Held (inbound, never tried): by next attempt.
    held: BTreeSet<(u64, QueueId)>,
    deferred: usize,
    damaged: BTreeMap<QueueId, Damaged>,
}

impl Index {
    fn insert(&mut self, e: &QueueEntry) {
        self.remove(&e.id);
        if self.damaged.contains_key(&e.id) {
            return;
        }
        let slot = Slot {
            next_attempt: e.next_attempt,
            received_at: e.envelope.received_at,
            quarantined: e.quarantined,
            held: !e.quarantined
                && e.attempts == 0
                && !e.released
                && e.envelope.origin == Origin::Inbound,
            deferred: !e.quarantined && e.attempts > 0,
            destinations: e.pending_domains().into(),
        };
        if slot.quarantined {
            self.quarantine.insert((slot.received_at, e.id.clone()));
        } else {
            self.due.insert((slot.next_attempt, e.id.clone()));
            for d in destination_keys(&slot.destinations) {
                self.by_destination
                    .entry(d.to_string())
                    .or_default()
                    .insert((slot.next_attempt, e.id.clone()));
            }
        }
        if slot.held {
            self.held.insert((slot.next_attempt, e.id.clone()));
        }
        if slot.deferred {
            self.deferred += 1;
        }
        self.slots.insert(e.id.clone(), slot);
    }

    fn remove(&mut self, id: &str) -> Option<Slot> {
        let slot = self.slots.remove(id)?;
        let key = |t: u64| (t, id.to_string());
        if slot.quarantined {
            self.quarantine.remove(&key(slot.received_at));
        } else {
            self.due.remove(&key(slot.next_attempt));
            for d in destination_keys(&slot.destinations) {
                if let Some(set) = self.by_destination.get_mut(d) {
                    set.remove(&key(slot.next_attempt));
                    if set.is_empty() {
                        self.by_destination.remove(d);
                    }
                }
            }
        }
        if slot.held {
            self.held.remove(&key(slot.next_attempt));
        }
        if slot.deferred {
            self.deferred -= 1;
        }
        Some(slot)
    }

    fn damage(&mut self, d: Damaged) {
        self.remove(&d.id);
        self.damaged.entry(d.id.clone()).or_insert(d);
    }

    fn forget(&mut self, id: &str) {
        self.remove(id);
        self.damaged.remove(id);
    }
}

/// A change to the index, applied once its commit is durable.
enum Change {
    Insert(QueueEntry),
    Remove(QueueId),
    Damage(Damaged),
}

impl Spool {
    /// [`Spool::open_with`] with the default options.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        Spool::open_with(dir, OpenOptions::default())
    }

    /// Creates `dir` if needed, opens/creates `dir/spool.redb`, checks it
    /// against the marker, builds the index, starts the writer thread.
    pub fn open_with(dir: &Path, options: OpenOptions) -> Result<Spool, SpoolError> {
        create_dir_durably(dir)?;
        let path = dir.join(SPOOL_FILE);
        let db = open_checked(dir, &path, options)?;
        let db = Arc::new(db);
        let index = build_index(&db)?;
        info!(
            path = %path.display(),
            messages = index.slots.len(),
            damaged = index.damaged.len(),
            "spool opened"
        );
        if !index.damaged.is_empty() {
            warn!(
                damaged = index.damaged.len(),
                "the spool holds damaged messages (see `magicmx queue list`, `magicmx queue salvage`)"
            );
        }
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            path,
            db: RwLock::new(Some(db)),
            closed: AtomicBool::new(false),
            index: Mutex::new(index),
            health: Mutex::new(Health::Ok),
            commits: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        });

        let (sender, receiver) = mpsc::channel(CHANNEL_CAPACITY);
        let (done_tx, done_rx) = watch::channel(false);
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("spool-writer".into())
                .spawn(move || writer_thread(shared, receiver, done_tx))?
        };
        Ok(Spool {
            inner: Arc::new(Inner {
                shared,
                sender: RwLock::new(Some(sender)),
                writer_done: done_rx,
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    /// Durably stores a new message; resolves only after the commit that contains it is fsynced.
    ///
    /// If this future is dropped before the writer thread picks the message
    /// up, the message is not stored (its client never got a `250`). Once the
    /// writer has it, it is committed whether or not anyone still waits.
    pub async fn store(
        &self,
        envelope: Envelope,
        body: Vec<u8>,
        next_attempt: u64,
    ) -> Result<QueueEntry, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Store {
            envelope,
            body,
            next_attempt,
            reply,
        })
        .await?;
        answer.await.map_err(|_| writer_lost())?
    }

    /// Durably replaces the entry's metadata (attempts, recipient states,
    /// next_attempt, last_error, quarantined). The body, its size and its
    /// checksum stay as stored. [`SpoolError::NotFound`] if the message is no
    /// longer spooled, [`SpoolError::Corrupt`] if it was found damaged.
    pub async fn update(&self, entry: &QueueEntry) -> Result<(), SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Update {
            entry: entry.clone(),
            reply,
        })
        .await?;
        answer.await.map_err(|_| writer_lost())?
    }

    /// Durably removes the message (metadata, body, damage record).
    /// [`SpoolError::NotFound`] if it was not spooled.
    pub async fn remove(&self, id: &str) -> Result<(), SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Remove {
            id: id.to_string(),
            reply,
        })
        .await?;
        answer.await.map_err(|_| writer_lost())?
    }

    /// The stored body bytes, checked against the checksum in the entry. A
    /// body that does not match (or cannot be read) is reported damaged and
    /// [`SpoolError::Corrupt`] returned: it is never handed out altered.
    /// Reads the file: call it off the async runtime for large bodies.
    pub fn body(&self, id: &str) -> Result<Vec<u8>, SpoolError> {
        let result = self.guarded(id, |db| {
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            let Some(record) = meta.get(id)? else {
                return Err(SpoolError::NotFound(id.to_string()));
            };
            let entry = decode_entry(id, record.value())?;
            let table = txn.open_table(BODY)?;
            let Some(body) = table.get(id)? else {
                return Err(corrupt(id, "the body is missing"));
            };
            let body = body.value().to_vec();
            check_body(&entry, &body)?;
            Ok(body)
        });
        self.note(id, result)
    }

    /// The entry, `None` if it is not spooled, [`SpoolError::Corrupt`] if its
    /// record is damaged (it then goes to the damaged list).
    pub fn get(&self, id: &str) -> Result<Option<QueueEntry>, SpoolError> {
        if let Some(d) = lock(&self.inner.shared.index).damaged.get(id) {
            return Err(corrupt(id, &d.reason));
        }
        let result = self.guarded(id, |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(META)?;
            let record = table.get(id)?;
            match record {
                Some(record) => decode_entry(id, record.value()).map(Some),
                None => Ok(None),
            }
        });
        self.note(id, result)
    }

    /// Every readable entry, sorted by next_attempt then id (reads the whole
    /// file: for listings, not for the runner). Damaged records are skipped
    /// (they are in [`Spool::damaged`]).
    pub fn entries(&self) -> Result<Vec<QueueEntry>, SpoolError> {
        Ok(self.listing()?.entries)
    }

    /// What `queue list` shows: every readable entry and the damaged list.
    pub fn listing(&self) -> Result<Listing, SpoolError> {
        let db = self.db()?;
        let mut listing = read_listing(&*db)?;
        // Damage found by reads since the last commit is known to the index first.
        let known = lock(&self.inner.shared.index).damaged.clone();
        listing.entries.retain(|e| !known.contains_key(&e.id));
        for (id, d) in known {
            if !listing.damaged.iter().any(|x| x.id == id) {
                listing.damaged.push(d);
            }
        }
        listing.damaged.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(listing)
    }

    /// Up to `max` due messages (`next_attempt <= now`, not quarantined, not
    /// damaged), earliest first, for which `accept(id, destinations)` says
    /// yes. From the index: costs what is due, not what is stored.
    pub fn due(
        &self,
        now: u64,
        max: usize,
        accept: impl FnMut(&str, &[String]) -> bool,
    ) -> Vec<(QueueId, Arc<[String]>)> {
        let index = lock(&self.inner.shared.index);
        let due = index.due.range(..(now.saturating_add(1), String::new()));
        offer(&index, due, max, accept)
    }

    /// Like [`Spool::due`], but destination by destination: a destination
    /// for which `room(destination)` is 0 is skipped without looking at its
    /// messages, and at most `room` of each destination's earliest due
    /// messages that `skip` does not exclude are considered. The candidates
    /// are then offered to `accept` earliest first, up to `max`. So the
    /// cost is what can start, plus one look per destination, not the whole
    /// due queue (one busy destination holding thousands of due messages
    /// would otherwise be walked after every delivery), and a destination
    /// with room is never kept waiting behind a full one. A message without
    /// pending destinations is listed under `""`.
    pub fn due_by_destination(
        &self,
        now: u64,
        max: usize,
        room: impl Fn(&str) -> usize,
        skip: impl Fn(&str) -> bool,
        accept: impl FnMut(&str, &[String]) -> bool,
    ) -> Vec<(QueueId, Arc<[String]>)> {
        let index = lock(&self.inner.shared.index);
        let mut candidates: Vec<&(u64, QueueId)> = Vec::new();
        for (destination, set) in &index.by_destination {
            let room = room(destination);
            if room == 0 {
                continue;
            }
            candidates.extend(
                set.range(..(now.saturating_add(1), String::new()))
                    .filter(|(_, id)| !skip(id))
                    .take(room),
            );
        }
        candidates.sort_unstable();
        candidates.dedup();
        offer(&index, candidates, max, accept)
    }

    /// The earliest `next_attempt` of a message that is not quarantined.
    pub fn next_due(&self) -> Option<u64> {
        let index = lock(&self.inner.shared.index);
        index.due.first().map(|(t, _)| *t)
    }

    /// The earliest `next_attempt` after `now` of a message that is not quarantined.
    pub fn next_due_after(&self, now: u64) -> Option<u64> {
        let index = lock(&self.inner.shared.index);
        let next = index
            .due
            .range((now.saturating_add(1), String::new())..)
            .next()
            .map(|(t, _)| *t);
        next
    }

    /// When the oldest quarantined message arrived.
    pub fn first_quarantined(&self) -> Option<u64> {
        let index = lock(&self.inner.shared.index);
        index.quarantine.first().map(|(t, _)| *t)
    }

    /// Quarantined messages received at or before `received_before`.
    pub fn quarantined_before(&self, received_before: u64) -> Vec<QueueId> {
        let index = lock(&self.inner.shared.index);
        index
            .quarantine
            .range(..(received_before.saturating_add(1), String::new()))
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// The queue's counters (no file access). `now` decides which held messages still are.
    pub fn stats(&self, now: u64) -> SpoolStats {
        let index = lock(&self.inner.shared.index);
        SpoolStats {
            messages: index.slots.len(),
            quarantined: index.quarantine.len(),
            held: index
                .held
                .range((now.saturating_add(1), String::new())..)
                .count(),
            deferred: index.deferred,
            damaged: index.damaged.len(),
        }
    }

    /// The damaged list, by id.
    pub fn damaged(&self) -> Vec<Damaged> {
        lock(&self.inner.shared.index)
            .damaged
            .values()
            .cloned()
            .collect()
    }

    /// Reports `id` damaged: it leaves the queue and joins the damaged list
    /// (recorded durably in the background).
    pub fn mark_damaged(&self, id: &str, reason: &str) {
        let damaged = Damaged {
            id: id.to_string(),
            reason: reason.to_string(),
            found_at: unix_now(),
        };
        {
            let mut index = lock(&self.inner.shared.index);
            if index.damaged.contains_key(id) {
                return;
            }
            error!(
                queue_id = id,
                reason, "damaged message: kept on disk, not delivered"
            );
            metrics::counter!("magicmx_spool_damaged_total").increment(1);
            index.damage(damaged.clone());
        }
        if let Some(sender) = read_lock(&self.inner.sender).clone() {
            if sender.try_send(Op::Damage { damaged }).is_err() {
                warn!(
                    queue_id = id,
                    "spool busy: damage not recorded on disk (found again at the next read)"
                );
            }
        }
    }

    /// Whether the last commit succeeded (cheap; see [`Spool::probe`]).
    pub fn health(&self) -> Health {
        lock(&self.inner.shared.health).clone()
    }

    /// When failing, asks the writer to reopen the file and check that a
    /// write succeeds now; returns the health after that.
    pub async fn probe(&self) -> Health {
        if self.health() == Health::Ok {
            return Health::Ok;
        }
        let (reply, answer) = oneshot::channel();
        if self.send(Op::Probe { reply }).await.is_err() {
            return Health::Failing {
                reason: "the spool is closed".into(),
                since: unix_now(),
            };
        }
        answer.await.unwrap_or_else(|_| self.health())
    }

    /// Number of records in the spool file (cheap: no record is read).
    pub fn len(&self) -> Result<usize, SpoolError> {
        let db = self.db()?;
        let txn = db.begin_read()?;
        let len = txn.open_table(META)?.len()?;
        Ok(usize::try_from(len).unwrap_or(usize::MAX))
    }

    /// Whether the spool holds no message.
    pub fn is_empty(&self) -> Result<bool, SpoolError> {
        Ok(self.len()? == 0)
    }

    /// Number of durable commits (each one fsync) since [`Spool::open`].
    /// With group commit, and removals riding on the next durable commit,
    /// this grows much slower than [`Spool::writes`].
    pub fn commits(&self) -> u64 {
        self.inner.shared.commits.load(Ordering::Relaxed)
    }

    /// Number of write operations (stores, updates, removals) committed since open.
    pub fn writes(&self) -> u64 {
        self.inner.shared.writes.load(Ordering::Relaxed)
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.inner.shared.dir
    }

    /// Lists the spool in `dir` for `magicmx queue list`: asks the node
    /// that runs on it over [`CONTROL_SOCKET`], or, when none does, opens
    /// the file read-only. A missing spool lists as empty. When the last node
    /// that ran crashed and none runs now, the file needs redb's repair, which
    /// only a writer may do: the spool is then opened for writing just long
    /// enough to repair and list it, as the node's own start would.
    pub fn list_readonly(dir: &Path) -> Result<Listing, SpoolError> {
        match list_file(dir) {
            Err(SpoolError::Locked(path)) => list_from_node(dir).map_err(|e| {
                SpoolError::Database(format!(
                    "{} is in use by a running node, and asking it failed: {e}",
                    path.display()
                ))
            }),
            other => other,
        }
    }

    /// Stops the writer after finishing queued operations and closes the
    /// file; later calls return [`SpoolError::Closed`].
    pub async fn close(&self) {
        drop(write_lock(&self.inner.sender).take());
        let mut done = self.inner.writer_done.clone();
        // An error means the writer is gone too (its sender dropped).
        let _ = done.wait_for(|done| *done).await;
        let handle = lock(&self.inner.writer).take();
        if let Some(handle) = handle {
            // The thread has signalled its end: this join returns at once.
            if handle.join().is_err() {
                error!(path = %self.inner.shared.path.display(), "spool writer thread panicked");
            }
        }
        let shared = &self.inner.shared;
        shared.closed.store(true, Ordering::SeqCst);
        if write_lock(&shared.db).take().is_some() {
            info!(path = %shared.path.display(), "spool closed");
        }
    }

    async fn send(&self, op: Op) -> Result<(), SpoolError> {
        let sender = read_lock(&self.inner.sender)
            .clone()
            .ok_or(SpoolError::Closed)?;
        sender.send(op).await.map_err(|_| SpoolError::Closed)
    }

    fn db(&self) -> Result<Arc<Database>, SpoolError> {
        let shared = &self.inner.shared;
        match read_lock(&shared.db).clone() {
            Some(db) => Ok(db),
            None if shared.closed.load(Ordering::SeqCst) => Err(SpoolError::Closed),
            None => Err(SpoolError::Unavailable(match self.health() {
                Health::Failing { reason, .. } => reason,
                Health::Ok => "reopening".into(),
            })),
        }
    }

    /// Runs a read of message `id`, turning a panic inside redb (a garbled
    /// page) into [`SpoolError::Corrupt`].
    fn guarded<T>(
        &self,
        id: &str,
        read: impl FnOnce(&Database) -> Result<T, SpoolError>,
    ) -> Result<T, SpoolError> {
        let db = self.db()?;
        match catch_unwind(AssertUnwindSafe(|| read(&db))) {
            Ok(result) => result.map_err(|e| match e {
                SpoolError::Database(msg) if is_corruption(&msg) => corrupt(id, &msg),
                e => e,
            }),
            Err(_) => Err(corrupt(id, "the store panicked reading it (damaged page)")),
        }
    }

    /// Sends what a read found damaged to the damaged list.
    fn note<T>(&self, id: &str, result: Result<T, SpoolError>) -> Result<T, SpoolError> {
        if let Err(SpoolError::Corrupt { reason, .. }) = &result {
            self.mark_damaged(id, reason);
        }
        result
    }
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("path", &self.inner.shared.path)
            .finish_non_exhaustive()
    }
}

fn builder() -> Builder {
    let mut builder = Builder::new();
    builder
        .set_concurrency_mode(ConcurrencyMode::ExclusiveWriter)
        .set_cache_size(CACHE_BYTES);
    builder
}

fn corrupt(id: &str, reason: &str) -> SpoolError {
    SpoolError::Corrupt {
        id: id.to_string(),
        reason: reason.to_string(),
    }
}

/// Does this redb error say that the file's content is damaged?
fn is_corruption(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("corrupt") || m.contains("checksum") || m.contains("invalid")
}

fn open_error(path: &Path, err: DatabaseError) -> SpoolError {
    match err {
        DatabaseError::DatabaseAlreadyOpen => SpoolError::Locked(path.to_path_buf()),
        DatabaseError::LockProtocolMismatch => SpoolError::Database(format!(
            "{} is open in a process that uses another redb version",
            path.display()
        )),
        DatabaseError::RepairAborted => SpoolError::Database(format!(
            "{} needs a repair after a crash; start the node to repair it",
            path.display()
        )),
        err => SpoolError::Database(format!(
            "{}: {err} (if the file is damaged, `magicmx queue salvage` copies what it can out of it)",
            path.display()
        )),
    }
}

/// Opens (creating if needed) with redb's panics caught.
fn create_db(path: &Path) -> Result<Database, SpoolError> {
    catch_unwind(AssertUnwindSafe(|| builder().create(path)))
        .map_err(|_| {
            SpoolError::Database(format!(
                "{}: the file is damaged (redb panicked while opening it); `magicmx queue salvage` copies what it can out of it",
                path.display()
            ))
        })?
        .map_err(|err| open_error(path, err))
}

/// Opens the spool file and checks it against the marker (see the module comment).
fn open_checked(dir: &Path, path: &Path, options: OpenOptions) -> Result<Database, SpoolError> {
    let marker_path = dir.join(MARKER_FILE);
    let marker = match std::fs::read_to_string(&marker_path) {
        Ok(text) => Some(text.trim().to_string()).filter(|t| !t.is_empty()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    let size = match std::fs::metadata(path) {
        Ok(m) => Some(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(expected) = &marker {
        let problem = match size {
            None => Some("is missing"),
            Some(0) => Some("is empty (truncated)"),
            Some(_) => None,
        };
        if let Some(problem) = problem {
            if !options.new_spool {
                return Err(SpoolError::Refused(format!(
                    "{} {problem}, but {} says spool {expected} should be there: acknowledged mail may be lost. \
                     Restore the file, or start with --new-spool to begin with an empty queue",
                    path.display(),
                    marker_path.display()
                )));
            }
            if size == Some(0) {
                let aside = path.with_extension(format!("redb.empty-{}", unix_now()));
                std::fs::rename(path, &aside)?;
                warn!(path = %path.display(), moved_to = %aside.display(), "--new-spool: empty spool file moved aside");
            }
            warn!(path = %path.display(), spool = %expected, "--new-spool: starting a new, empty spool");
        }
    }
    let db = create_db(path)?;
    // Every time, not only when the file is new: a node killed between
    // creating the file and this fsync would otherwise never make its
    // directory entry durable. One fsync per start.
    sync_dir(dir)?;
    // Create the tables, so that readers never find them missing; read the identity.
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    txn.set_two_phase_commit(false);
    let found = {
        txn.open_table(META)?;
        txn.open_table(BODY)?;
        txn.open_table(DAMAGED)?;
        let mut info = txn.open_table(INFO)?;
        let found = info.get(SPOOL_ID_KEY)?.map(|v| v.value().to_string());
        match (&marker, &found) {
            (Some(expected), Some(id)) if expected == id => {}
            (Some(expected), _) if !options.new_spool => {
                let what = match &found {
                    Some(id) => format!("is spool {id}"),
                    None => "is a new, empty spool".into(),
                };
                drop(info);
                txn.abort()?;
                return Err(SpoolError::Refused(format!(
                    "{} {what}, but {} says spool {expected} should be there: acknowledged mail may be lost. \
                     Restore the file, or start with --new-spool to go on with this one",
                    path.display(),
                    marker_path.display()
                )));
            }
            _ => {}
        }
        let id = match found {
            Some(id) => id,
            None => {
                let id = format!(
                    "{:016x}{:016x}",
                    rand::random::<u64>(),
                    rand::random::<u64>()
                );
                info.insert(SPOOL_ID_KEY, id.as_str())?;
                id
            }
        };
        id
    };
    txn.commit()?;
    if marker.as_deref() != Some(found.as_str()) {
        write_marker(dir, &found)?;
        info!(path = %marker_path.display(), spool = %found, "spool marker written");
    }
    Ok(db)
}

/// Writes the marker durably (temporary file, fsync, rename, directory fsync).
fn write_marker(dir: &Path, id: &str) -> Result<(), SpoolError> {
    let tmp = dir.join(format!("{MARKER_FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{id}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(MARKER_FILE))?;
    sync_dir(dir)
}

/// Reads every envelope once: the index at open (and after a reopen).
fn build_index(db: &Database) -> Result<Index, SpoolError> {
    let mut index = Index::default();
    let listing = match catch_unwind(AssertUnwindSafe(|| read_listing(db))) {
        Ok(listing) => listing?,
        Err(_) => {
            return Err(SpoolError::Database(
                "the spool's index pages are damaged (redb panicked reading them); \
                 `magicmx queue salvage` copies what it can out of the file"
                    .into(),
            ))
        }
    };
    for d in listing.damaged {
        index.damaged.insert(d.id.clone(), d);
    }
    for e in &listing.entries {
        index.insert(e);
    }
    Ok(index)
}

fn writer_lost() -> SpoolError {
    SpoolError::Database("the spool writer stopped before answering".into())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_lock<T>(rw: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    rw.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock<T>(rw: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    rw.write().unwrap_or_else(PoisonError::into_inner)
}

/// Creates `dir` (and its parents) and makes the new entries durable.
fn create_dir_durably(dir: &Path) -> Result<(), SpoolError> {
    if dir.is_dir() {
        return Ok(());
    }
    // Find the first missing ancestor, so that its parent gets fsynced too.
    let mut missing = dir.to_path_buf();
    while let Some(parent) = missing.parent() {
        if parent.as_os_str().is_empty() || parent.is_dir() {
            break;
        }
        missing = parent.to_path_buf();
    }
    std::fs::create_dir_all(dir)?;
    let mut current = dir.to_path_buf();
    loop {
        sync_dir(&current)?;
        if current == missing {
            break;
        }
        match current.parent() {
            Some(parent) => current = parent.to_path_buf(),
            None => break,
        }
    }
    if let Some(parent) = missing.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        sync_dir(parent)?;
    }
    Ok(())
}

/// fsync of a directory: makes the entries created in it durable.
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// CRC-32 (IEEE 802.3, as zlib), table-driven.
pub fn crc32(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in bytes {
        crc = table[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// A `meta` record: magic, CRC-32 of the JSON, the JSON.
fn encode_entry(entry: &QueueEntry) -> Result<Vec<u8>, SpoolError> {
    let json = serde_json::to_vec(entry).map_err(|e| SpoolError::Database(e.to_string()))?;
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(RECORD_MAGIC);
    out.extend_from_slice(&crc32(&json).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Decodes and checks a `meta` record (a checksummed one, or an older spool's bare JSON).
fn decode_entry(id: &str, bytes: &[u8]) -> Result<QueueEntry, SpoolError> {
    let json = if let Some(rest) = bytes.strip_prefix(RECORD_MAGIC) {
        if rest.len() < 4 {
            return Err(corrupt(id, "the envelope record is truncated"));
        }
        let (sum, json) = rest.split_at(4);
        let sum = u32::from_le_bytes([sum[0], sum[1], sum[2], sum[3]]);
        if crc32(json) != sum {
            return Err(corrupt(id, "envelope checksum mismatch"));
        }
        json
    } else {
        // A spool written before checksums: plain JSON.
        bytes
    };
    match serde_json::from_slice::<QueueEntry>(json) {
        Ok(entry) if entry.id == id => Ok(entry),
        Ok(entry) => Err(corrupt(
            id,
            &format!("the envelope record names another message ({})", entry.id),
        )),
        Err(err) => Err(corrupt(
            id,
            &format!("the envelope record does not parse: {err}"),
        )),
    }
}

/// Checks a body against its entry: the checksum, or (older spools) the size.
fn check_body(entry: &QueueEntry, body: &[u8]) -> Result<(), SpoolError> {
    if body.len() as u64 != entry.size {
        return Err(corrupt(
            &entry.id,
            &format!("body is {} bytes, {} were stored", body.len(), entry.size),
        ));
    }
    match entry.body_crc {
        Some(sum) if crc32(body) != sum => Err(corrupt(&entry.id, "body checksum mismatch")),
        _ => Ok(()),
    }
}

fn read_listing(db: &impl ReadableDatabase) -> Result<Listing, SpoolError> {
    let txn = db.begin_read()?;
    let mut listing = Listing::default();
    match txn.open_table(DAMAGED) {
        Ok(table) => {
            for record in table.iter()? {
                let (id, bytes) = record?;
                let d = serde_json::from_slice::<Damaged>(bytes.value()).unwrap_or(Damaged {
                    id: id.value().to_string(),
                    reason: "damaged (its damage record does not parse either)".into(),
                    found_at: 0,
                });
                listing.damaged.push(d);
            }
        }
        Err(TableError::TableDoesNotExist(_)) => {}
        Err(err) => return Err(err.into()),
    }
    let table = match txn.open_table(META) {
        Ok(table) => table,
        // A spool created by a node that never committed its tables.
        Err(TableError::TableDoesNotExist(_)) => return Ok(listing),
        Err(err) => return Err(err.into()),
    };
    listing.entries = Vec::with_capacity(usize::try_from(table.len()?).unwrap_or(0));
    for record in table.iter()? {
        let (id, bytes) = record?;
        let id = id.value();
        if listing.damaged.iter().any(|d| d.id == id) {
            continue;
        }
        match decode_entry(id, bytes.value()) {
            Ok(entry) => listing.entries.push(entry),
            Err(SpoolError::Corrupt { id, reason }) => {
                warn!(queue_id = %id, reason = %reason, "damaged spool record; listed as damaged");
                listing.damaged.push(Damaged {
                    id,
                    reason,
                    found_at: unix_now(),
                });
            }
            Err(e) => return Err(e),
        }
    }
    listing.entries.sort_by(|a, b| {
        a.next_attempt
            .cmp(&b.next_attempt)
            .then_with(|| a.id.cmp(&b.id))
    });
    listing.damaged.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(listing)
}

/// Lists the file directly; [`SpoolError::Locked`] when a node runs on it.
fn list_file(dir: &Path) -> Result<Listing, SpoolError> {
    let path = dir.join(SPOOL_FILE);
    if !path.exists() {
        return Ok(Listing::default());
    }
    let read_only = || {
        catch_unwind(AssertUnwindSafe(|| builder().open_read_only(&path))).map_err(|_| {
            SpoolError::Database(format!(
                "{}: the file is damaged (redb panicked while opening it)",
                path.display()
            ))
        })
    };
    let guarded = |f: &dyn Fn() -> Result<Listing, SpoolError>| {
        catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
            Err(SpoolError::Database(format!(
                "{}: the file is damaged (redb panicked while reading it); try `magicmx queue salvage`",
                path.display()
            )))
        })
    };
    match read_only()? {
        Ok(db) => guarded(&|| read_listing(&db)),
        Err(DatabaseError::RepairAborted) => {
            debug!(path = %path.display(), "spool needs repair; opening it for writing");
            match catch_unwind(AssertUnwindSafe(|| builder().open(&path))) {
                Ok(Ok(db)) => guarded(&|| read_listing(&db)),
                Ok(Err(err)) => Err(open_error(&path, err)),
                Err(_) => Err(SpoolError::Database(format!(
                    "{}: the file is damaged (redb panicked while repairing it)",
                    path.display()
                ))),
            }
        }
        Err(err) => Err(open_error(&path, err)),
    }
}

/// Asks the node running on `dir` for its listing over [`CONTROL_SOCKET`].
fn list_from_node(dir: &Path) -> Result<Listing, SpoolError> {
    use std::io::Read as _;
    let mut stream = std::os::unix::net::UnixStream::connect(dir.join(CONTROL_SOCKET))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.write_all(b"list\n")?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    serde_json::from_slice(&out)
        .map_err(|e| SpoolError::Database(format!("the node's answer does not parse: {e}")))
}

/// Serves `queue list` to the CLI on `<spool dir>/queue.sock` until
/// `shutdown`: one connection at a time (a listing is a read-only snapshot),
/// each bounded in time. The socket's permissions are the directory's.
pub async fn serve_control(spool: Spool, shutdown: tokio_util::sync::CancellationToken) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = spool.dir().join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot serve `queue list` to the CLI");
            return;
        }
    };
    loop {
        let mut stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let spool = spool.clone();
        let served = tokio::time::timeout(Duration::from_secs(60), async move {
            let mut request = [0u8; 16];
            let n = stream.read(&mut request).await.unwrap_or(0);
            if !request[..n].starts_with(b"list") {
                return;
            }
            let listing = tokio::task::spawn_blocking(move || spool.listing()).await;
            let answer = match listing {
                Ok(Ok(listing)) => serde_json::to_vec(&listing).unwrap_or_default(),
                _ => Vec::new(),
            };
            let _ = stream.write_all(&answer).await;
            let _ = stream.shutdown().await;
        })
        .await;
        if served.is_err() {
            debug!("control socket request timed out");
        }
    }
    let _ = std::fs::remove_file(&path);
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The last id handed out in this process, as a number.
static LAST_ID: AtomicU64 = AtomicU64::new(0);

/// A new id: 52 bits of microseconds since the epoch (enough until 2112),
/// then 12 random bits, forced above the previous id of this process so that
/// ids never repeat here and sort by time. Across restarts a repeat needs the
/// clock to step back and the same 12 random bits, and the writer still
/// checks that the id is free before using it.
fn new_queue_id() -> QueueId {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let candidate = ((micros & ((1 << 52) - 1)) << 12) | u64::from(rand::random::<u16>() & 0xFFF);
    let mut last = LAST_ID.load(Ordering::Relaxed);
    loop {
        let next = candidate.max(last.wrapping_add(1));
        match LAST_ID.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return format!("{next:016X}"),
            Err(seen) => last = seen,
        }
    }
}

/// The writer thread: one write transaction and one fsync per batch.
fn writer_thread(shared: Arc<Shared>, mut receiver: mpsc::Receiver<Op>, done: watch::Sender<bool>) {
    // Set after a failed commit: redb refuses every write after an I/O
    // error until the file is reopened.
    let mut broken = false;
    // A timer for the wait while removals are committed but not yet synced;
    // without one (it cannot fail short of resource exhaustion) every
    // commit is durable.
    let timer = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| warn!(error = %e, "spool writer: no timer; every commit is durable"))
        .ok();
    // When the oldest removal not yet synced was committed.
    let mut unsynced: Option<std::time::Instant> = None;
    loop {
        let first = match (&timer, unsynced) {
            (Some(rt), Some(since)) => {
                let left = LAZY_REMOVALS_FOR.saturating_sub(since.elapsed());
                match rt.block_on(async { tokio::time::timeout(left, receiver.recv()).await }) {
                    Ok(op) => op,
                    Err(_) => {
                        // Idle: make the removals durable now.
                        broken = broken || !sync(&shared);
                        unsynced = None;
                        continue;
                    }
                }
            }
            _ => receiver.blocking_recv(),
        };
        let Some(first) = first else { break };
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if broken {
            match reopen(&shared) {
                Ok(()) => broken = false,
                Err(msg) => {
                    set_failing(&shared, &msg);
                    let msg = format!("the spool cannot be reopened: {msg}");
                    for op in batch {
                        op.failed(&msg, &shared).send();
                    }
                    continue;
                }
            }
        }
        let Some(db) = read_lock(&shared.db).clone() else {
            for op in batch {
                op.failed("the spool is closed", &shared).send();
            }
            continue;
        };
        let size = batch.len();
        let removals_only = batch.iter().all(|op| matches!(op, Op::Remove { .. }));
        let lazy = timer.is_some()
            && removals_only
            && unsynced.is_none_or(|t| t.elapsed() < LAZY_REMOVALS_FOR);
        let durability = match lazy {
            true => Durability::None,
            false => Durability::Immediate,
        };
        // A panic inside redb (a damaged file) drops the batch's reply
        // channels, so its waiters get an error; the thread carries on.
        match catch_unwind(AssertUnwindSafe(|| {
            apply_batch(&db, batch, &shared, durability)
        })) {
            Ok(true) if lazy => {
                unsynced.get_or_insert_with(std::time::Instant::now);
            }
            Ok(true) => unsynced = None,
            Ok(false) => broken = true,
            Err(_) => {
                error!(batch = size, "spool writer panicked during a batch");
                set_failing(&shared, "the store panicked during a commit");
                broken = true;
            }
        }
    }
    if unsynced.is_some() && !broken {
        sync(&shared);
    }
    // Release the file before telling close() that the writer is done.
    drop(write_lock(&shared.db).take());
    done.send_replace(true);
}

/// An empty durable commit: makes every commit before it durable (one
/// fsync). False (and the spool marked failing) if it failed.
fn sync(shared: &Shared) -> bool {
    let Some(db) = read_lock(&shared.db).clone() else {
        return false;
    };
    let commit = || -> Result<(), String> {
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| e.to_string())?;
        txn.set_two_phase_commit(false);
        txn.commit().map_err(|e| e.to_string())
    };
    match catch_unwind(AssertUnwindSafe(commit)) {
        Ok(Ok(())) => {
            shared.commits.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("magicmx_spool_commits_total").increment(1);
            true
        }
        Ok(Err(msg)) => {
            error!(error = %msg, "spool sync of committed removals failed");
            set_failing(shared, &msg);
            false
        }
        Err(_) => {
            set_failing(shared, "the store panicked during a sync");
            false
        }
    }
}

fn set_failing(shared: &Shared, reason: &str) {
    let mut health = lock(&shared.health);
    if let Health::Failing { reason: r, .. } = &mut *health {
        *r = reason.to_string();
    } else {
        error!(
            reason,
            "spool failing: stores are refused until a commit succeeds"
        );
        metrics::counter!("magicmx_spool_failures_total").increment(1);
        *health = Health::Failing {
            reason: reason.to_string(),
            since: unix_now(),
        };
    }
}

fn set_ok(shared: &Shared) {
    let mut health = lock(&shared.health);
    if *health != Health::Ok {
        info!("spool recovered: commits succeed again");
        *health = Health::Ok;
    }
}

/// Closes and reopens the file after an I/O error, then rebuilds the index
/// from it (a failed commit may or may not have reached the disk).
fn reopen(shared: &Shared) -> Result<(), String> {
    let old = write_lock(&shared.db).take();
    if let Some(old) = old {
        // Readers hold a clone only for the length of one read.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(old);
    }
    let db = create_db(&shared.path).map_err(|e| e.to_string())?;
    let index = build_index(&db).map_err(|e| e.to_string())?;
    let mut kept = lock(&shared.index);
    // Damage found by reads and not yet on disk stays known.
    let mut index = index;
    for (id, d) in std::mem::take(&mut kept.damaged) {
        if !index.damaged.contains_key(&id) {
            index.damage(d);
        }
    }
    *kept = index;
    drop(kept);
    *write_lock(&shared.db) = Some(Arc::new(db));
    info!(path = %shared.path.display(), "spool reopened after an error");
    Ok(())
}

/// Checks that the file system takes a write of [`PROBE_BYTES`] and that a
/// commit succeeds (an empty one still writes and fsyncs the header).
fn probe(shared: &Shared, db: &Database) -> Result<(), String> {
    let path = shared.dir.join("probe.tmp");
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&vec![0u8; PROBE_BYTES])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    written.map_err(|e| format!("the file system refuses writes: {e}"))?;
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| e.to_string())?;
    txn.set_two_phase_commit(false);
    txn.open_table(META).map_err(|e| e.to_string())?;
    txn.commit().map_err(|e| e.to_string())
}

/// What a waiter gets back once the batch's fate is known.
enum Answer {
    Entry(
        oneshot::Sender<Result<QueueEntry, SpoolError>>,
        Result<QueueEntry, SpoolError>,
    ),
    Unit(
        oneshot::Sender<Result<(), SpoolError>>,
        Result<(), SpoolError>,
    ),
    None,
}

impl Answer {
    fn send(self) {
        // A waiter that went away no longer needs its answer.
        match self {
            Answer::Entry(reply, result) => drop(reply.send(result)),
            Answer::Unit(reply, result) => drop(reply.send(result)),
            Answer::None => {}
        }
    }

    /// The batch did not commit: a success becomes the batch's error.
    fn fail(self, msg: &str) -> Answer {
        match self {
            Answer::Entry(reply, Ok(_)) => {
                Answer::Entry(reply, Err(SpoolError::Database(msg.into())))
            }
            Answer::Unit(reply, Ok(())) => {
                Answer::Unit(reply, Err(SpoolError::Database(msg.into())))
            }
            failed => failed,
        }
    }
}

impl Op {
    fn failed(self, msg: &str, shared: &Shared) -> Answer {
        let err = SpoolError::Database(msg.into());
        match self {
            Op::Store { reply, .. } => Answer::Entry(reply, Err(err)),
            Op::Update { reply, .. } | Op::Remove { reply, .. } => Answer::Unit(reply, Err(err)),
            Op::Probe { reply } => {
                let _ = reply.send(lock(&shared.health).clone());
                Answer::None
            }
            Op::Damage { .. } => Answer::None,
        }
    }
}

/// An error while applying one operation: either the operation's own
/// (answered, the batch goes on) or the transaction's (the batch fails).
enum Failure {
    Op(SpoolError),
    Txn(String),
}

impl From<redb::StorageError> for Failure {
    fn from(err: redb::StorageError) -> Self {
        Failure::Txn(err.to_string())
    }
}

struct Tables<'t> {
    meta: redb::Table<'t, &'static str, &'static [u8]>,
    body: redb::Table<'t, &'static str, &'static [u8]>,
    damaged: redb::Table<'t, &'static str, &'static [u8]>,
}

/// Applies the batch in one transaction, updates the index, answers every
/// waiter. Returns false if the transaction failed (the file needs a reopen).
fn apply_batch(db: &Database, batch: Vec<Op>, shared: &Shared, durability: Durability) -> bool {
    let mut answers = Vec::with_capacity(batch.len());
    let mut changes = Vec::with_capacity(batch.len());
    let mut probes = Vec::new();
    let mut ops = batch.into_iter();
    let outcome = (|| -> Result<bool, String> {
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(durability).map_err(|e| e.to_string())?;
        // One-phase commit: one fsync, and redb's checksummed commit slots
        // make the last commit valid after a crash. No quick-repair: it
        // saves the allocator state at every commit, a cost that grows with
        // the file, to save a one-off repair after a crash (about 1 s per
        // 500 MB of spool here).
        txn.set_two_phase_commit(false);
        {
            let mut tables = Tables {
                meta: txn.open_table(META).map_err(|e| e.to_string())?,
                body: txn.open_table(BODY).map_err(|e| e.to_string())?,
                damaged: txn.open_table(DAMAGED).map_err(|e| e.to_string())?,
            };
            let index = lock(&shared.index);
            for op in ops.by_ref() {
                if let Op::Probe { reply } = op {
                    probes.push(reply);
                    continue;
                }
                apply(&mut tables, &index, op, &mut answers, &mut changes)?;
            }
        }
        if answers.is_empty() && changes.is_empty() && probes.is_empty() {
            // Every store was abandoned by its waiter: nothing to commit.
            txn.abort().map_err(|e| e.to_string())?;
            return Ok(false);
        }
        if !probes.is_empty() && changes.is_empty() {
            // Nothing else to prove that writes succeed: the probe's own check.
            txn.abort().map_err(|e| e.to_string())?;
            return probe(shared, db).map(|()| true);
        }
        txn.commit().map_err(|e| e.to_string())?;
        Ok(true)
    })();
    match outcome {
        Ok(committed) => {
            if committed {
                let writes = changes.len() as u64;
                shared.writes.fetch_add(writes, Ordering::Relaxed);
                if matches!(durability, Durability::Immediate) {
                    shared.commits.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("magicmx_spool_commits_total").increment(1);
                }
                metrics::counter!("magicmx_spool_writes_total").increment(writes);
                set_ok(shared);
            }
            {
                let mut index = lock(&shared.index);
                for change in changes {
                    match change {
                        Change::Insert(entry) => index.insert(&entry),
                        Change::Remove(id) => index.forget(&id),
                        Change::Damage(d) => index.damage(d),
                    }
                }
            }
            answers.into_iter().for_each(Answer::send);
            for probe in probes {
                let _ = probe.send(lock(&shared.health).clone());
            }
            true
        }
        Err(msg) => {
            error!(error = %msg, batch = answers.len() + ops.len(), "spool write transaction failed");
            set_failing(shared, &msg);
            for answer in answers {
                answer.fail(&msg).send();
            }
            for op in ops {
                op.failed(&msg, shared).send();
            }
            for probe in probes {
                let _ = probe.send(lock(&shared.health).clone());
            }
            false
        }
    }
}

/// Applies one operation and queues its answer and its index change. Skips
/// a store whose waiter is gone. `Err`: the transaction is broken (the
/// answer carries the error).
fn apply(
    t: &mut Tables<'_>,
    index: &Index,
    op: Op,
    answers: &mut Vec<Answer>,
    changes: &mut Vec<Change>,
) -> Result<(), String> {
    match op {
        Op::Store {
            envelope,
            body,
            next_attempt,
            reply,
        } => {
            if reply.is_closed() {
                // The SMTP session went away before the message was on disk:
                // it never got a 250, so the client will send it again.
                debug!("store abandoned by its caller; skipped");
                return Ok(());
            }
            let result = (|| -> Result<QueueEntry, Failure> {
                let mut id = new_queue_id();
                while t.meta.get(id.as_str())?.is_some() || t.body.get(id.as_str())?.is_some() {
                    id = new_queue_id();
                }
                let entry = QueueEntry {
                    id,
                    envelope,
                    size: body.len() as u64,
                    attempts: 0,
                    next_attempt,
                    last_error: None,
                    quarantined: false,
                    released: false,
                    body_crc: Some(crc32(&body)),
                };
                let record = encode_entry(&entry).map_err(Failure::Op)?;
                t.body.insert(entry.id.as_str(), body.as_slice())?;
                t.meta.insert(entry.id.as_str(), record.as_slice())?;
                debug!(queue_id = %entry.id, size = entry.size, recipients = entry.envelope.recipients.len(), "message spooled");
                Ok(entry)
            })();
            let (result, broken) = split_failure(result);
            if let Ok(entry) = &result {
                changes.push(Change::Insert(entry.clone()));
            }
            answers.push(Answer::Entry(reply, result));
            broken
        }
        Op::Update { entry, reply } => {
            let result = (|| -> Result<QueueEntry, Failure> {
                if let Some(d) = index.damaged.get(&entry.id) {
                    return Err(Failure::Op(corrupt(&entry.id, &d.reason)));
                }
                let stored = match t.meta.get(entry.id.as_str())? {
                    None => return Err(Failure::Op(SpoolError::NotFound(entry.id.clone()))),
                    Some(record) => decode_entry(&entry.id, record.value()).map_err(Failure::Op)?,
                };
                // The body is not rewritten: its size and checksum stay.
                let mut entry = entry;
                entry.size = stored.size;
                entry.body_crc = stored.body_crc;
                let record = encode_entry(&entry).map_err(Failure::Op)?;
                t.meta.insert(entry.id.as_str(), record.as_slice())?;
                debug!(queue_id = %entry.id, attempts = entry.attempts, next_attempt = entry.next_attempt, "spool entry updated");
                Ok(entry)
            })();
            let (result, broken) = split_failure(result);
            let result = result.map(|entry| changes.push(Change::Insert(entry)));
            answers.push(Answer::Unit(reply, result));
            broken
        }
        Op::Remove { id, reply } => {
            let result = (|| -> Result<(), Failure> {
                let had_meta = t.meta.remove(id.as_str())?.is_some();
                let had_body = t.body.remove(id.as_str())?.is_some();
                let had_damage = t.damaged.remove(id.as_str())?.is_some();
                if !had_meta && !had_body && !had_damage {
                    return Err(Failure::Op(SpoolError::NotFound(id.clone())));
                }
                debug!(queue_id = %id, "message removed from spool");
                Ok(())
            })();
            let (result, broken) = split_failure(result);
            if result.is_ok() {
                changes.push(Change::Remove(id));
            }
            answers.push(Answer::Unit(reply, result));
            broken
        }
        Op::Damage { damaged } => {
            if t.meta
                .get(damaged.id.as_str())
                .map_err(|e| e.to_string())?
                .is_none()
            {
                // Removed meanwhile: nothing to keep.
                return Ok(());
            }
            let json = serde_json::to_vec(&damaged).map_err(|e| e.to_string())?;
            t.damaged
                .insert(damaged.id.as_str(), json.as_slice())
                .map_err(|e| e.to_string())?;
            changes.push(Change::Damage(damaged));
            Ok(())
        }
        Op::Probe { .. } => Ok(()),
    }
}

/// The waiter's result, and `Err` if the transaction itself is broken.
fn split_failure<T>(result: Result<T, Failure>) -> (Result<T, SpoolError>, Result<(), String>) {
    match result {
        Ok(value) => (Ok(value), Ok(())),
        Err(Failure::Op(err)) => (Err(err), Ok(())),
        Err(Failure::Txn(msg)) => (Err(SpoolError::Database(msg.clone())), Err(msg)),
    }
}

/// What [`salvage`] did.
#[derive(Debug, Default)]
pub struct SalvageReport {
    /// Messages copied intact into the new spool.
    pub copied: Vec<QueueId>,
    /// What could not be read: id (or a description) and why.
    pub lost: Vec<(String, String)>,
    /// Where the damaged spool was moved.
    pub moved_to: PathBuf,
}

/// `magicmx queue salvage`: copies every readable message (envelope and
/// body checksums intact) out of the spool in `dir` into a fresh spool,
/// moves the damaged one aside (`<dir>.damaged-<unix time>`) and puts the
/// fresh one in its place, with a new marker. The node must be stopped.
pub fn salvage(dir: &Path) -> Result<SalvageReport, SpoolError> {
    let path = dir.join(SPOOL_FILE);
    if !path.exists() {
        return Err(SpoolError::NotFound(path.display().to_string()));
    }
    let mut report = SalvageReport::default();
    let source = match catch_unwind(AssertUnwindSafe(|| builder().open(&path))) {
        Ok(Ok(db)) => db,
        Ok(Err(DatabaseError::DatabaseAlreadyOpen)) => return Err(SpoolError::Locked(path)),
        Ok(Err(e)) => return Err(open_error(&path, e)),
        Err(_) => {
            return Err(SpoolError::Database(format!(
                "{}: redb panicked opening the file: nothing can be read from it",
                path.display()
            )))
        }
    };
    let stamp = unix_now();
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "spool".into());
    let fresh_dir = dir.with_file_name(format!("{name}.salvage-{stamp}"));
    create_dir_durably(&fresh_dir)?;
    let fresh = create_db(&fresh_dir.join(SPOOL_FILE))?;

    // The ids, as far as the index pages can be walked.
    let ids = walk_keys(&source, META, &mut report.lost);
    let body_ids = walk_keys(&source, BODY, &mut report.lost);
    let mut copy = Vec::new();
    for id in &ids {
        let read = catch_unwind(AssertUnwindSafe(
            || -> Result<(QueueEntry, Vec<u8>), SpoolError> {
                let txn = source.begin_read()?;
                let meta = txn.open_table(META)?;
                let record = meta
                    .get(id.as_str())?
                    .ok_or_else(|| corrupt(id, "the envelope vanished"))?;
                let entry = decode_entry(id, record.value())?;
                let body = txn
                    .open_table(BODY)?
                    .get(id.as_str())?
                    .ok_or_else(|| corrupt(id, "the body is missing"))?
                    .value()
                    .to_vec();
                check_body(&entry, &body)?;
                Ok((entry, body))
            },
        ));
        match read {
            Ok(Ok(pair)) => copy.push(pair),
            Ok(Err(SpoolError::Corrupt { reason, .. })) => report.lost.push((id.clone(), reason)),
            Ok(Err(e)) => report.lost.push((id.clone(), e.to_string())),
            Err(_) => report.lost.push((
                id.clone(),
                "the store panicked reading it (damaged page)".into(),
            )),
        }
    }
    for id in body_ids.iter().filter(|id| !ids.contains(id)) {
        report
            .lost
            .push((id.clone(), "a body without a readable envelope".into()));
    }
    let mut txn = fresh.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    txn.set_two_phase_commit(false);
    let new_id = format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    {
        let mut meta = txn.open_table(META)?;
        let mut body = txn.open_table(BODY)?;
        txn.open_table(DAMAGED)?;
        txn.open_table(INFO)?
            .insert(SPOOL_ID_KEY, new_id.as_str())?;
        for (mut entry, bytes) in copy {
            entry.body_crc = Some(crc32(&bytes));
            let record = encode_entry(&entry)?;
            body.insert(entry.id.as_str(), bytes.as_slice())?;
            meta.insert(entry.id.as_str(), record.as_slice())?;
            report.copied.push(entry.id);
        }
    }
    txn.commit()?;
    drop(fresh);
    drop(source);
    write_marker(&fresh_dir, &new_id)?;
    let aside = dir.with_file_name(format!("{name}.damaged-{stamp}"));
    std::fs::rename(dir, &aside)?;
    std::fs::rename(&fresh_dir, dir)?;
    if let Some(parent) = dir.parent() {
        sync_dir(if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        })?;
    }
    report.moved_to = aside;
    Ok(report)
}

/// The keys of `table`, as far as its pages can be read; what stops the
/// walk goes to `lost`.
fn walk_keys(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    lost: &mut Vec<(String, String)>,
) -> Vec<String> {
    let mut keys = Vec::new();
    let walked = catch_unwind(AssertUnwindSafe(|| -> Result<(), SpoolError> {
        let txn = db.begin_read()?;
        let t = match txn.open_table(table) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for record in t.iter()? {
            match record {
                Ok((k, _)) => keys.push(k.value().to_string()),
                Err(e) => {
                    return Err(SpoolError::Database(e.to_string()));
                }
            }
        }
        Ok(())
    }));
    let what = format!("the rest of table `{}`", table.name());
    match walked {
        Ok(Ok(())) => {}
        Ok(Err(e)) => lost.push((what, e.to_string())),
        Err(_) => lost.push((what, "the store panicked walking it (damaged page)".into())),
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::io::{BufRead, BufReader, Write};
    use std::net::Ipv4Addr;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    fn envelope(n: u64) -> Envelope {
        Envelope {
            sender: format!("sender{n}@example.org"),
            recipients: vec![
                Recipient {
                    address: format!("rcpt{n}@example.net"),
                    state: RcptState::Pending,
                },
                Recipient {
                    address: "postmaster@example.net".into(),
                    state: RcptState::Pending,
                },
            ],
            client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, (n % 250) as u8)),
            helo: "client.example.org".into(),
            received_at: 1_700_000_000 + n,
            smtputf8: n % 2 == 1,
            eight_bit: n % 3 == 1,
            origin: Origin::Inbound,
        }
    }

    /// About 1 KB, different for every `n`.
    fn body(n: u64) -> Vec<u8> {
        let mut body = format!("Subject: message {n}\r\n\r\n").into_bytes();
        while body.len() < 1000 {
            body.extend_from_slice(format!("line of message {n}\r\n").as_bytes());
        }
        body
    }

    #[tokio::test]
    async fn store_get_body_entries_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.len().unwrap(), 0);
        assert!(spool.is_empty().unwrap());

        let entry = spool.store(envelope(1), body(1), 1234).await.unwrap();
        assert_eq!(entry.id.len(), 16);
        assert!(entry
            .id
            .chars()
            .all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c)));
        assert_eq!(entry.envelope, envelope(1));
        assert_eq!(entry.size, body(1).len() as u64);
        assert_eq!(entry.attempts, 0);
        assert_eq!(entry.next_attempt, 1234);
        assert_eq!(entry.last_error, None);
        assert!(!entry.quarantined);

        assert_eq!(spool.get(&entry.id).unwrap(), Some(entry.clone()));
        assert_eq!(spool.body(&entry.id).unwrap(), body(1));
        assert_eq!(spool.entries().unwrap(), vec![entry.clone()]);
        assert_eq!(spool.len().unwrap(), 1);
        assert_eq!(spool.get("0000000000000000").unwrap(), None);
        assert!(matches!(
            spool.body("0000000000000000"),
            Err(SpoolError::NotFound(_))
        ));
        assert!(spool.commits() >= 1);
    }

    #[tokio::test]
    async fn update_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut entry = spool.store(envelope(7), body(7), 100).await.unwrap();
        let other = spool.store(envelope(8), body(8), 100).await.unwrap();

        entry.attempts = 3;
        entry.next_attempt = 999;
        entry.last_error = Some("451 4.3.0 try later".into());
        entry.quarantined = true;
        entry.released = true;
        entry.envelope.recipients[0].state = RcptState::Delivered {
            reply: "250 2.0.0 ok".into(),
        };
        entry.envelope.recipients[1].state = RcptState::Failed {
            reply: "550 5.1.1 no such user".into(),
        };
        spool.update(&entry).await.unwrap();
        assert_eq!(spool.get(&entry.id).unwrap(), Some(entry.clone()));
        assert_eq!(spool.body(&entry.id).unwrap(), body(7));
        // Sorted by next_attempt: the other one (100) comes first.
        assert_eq!(spool.entries().unwrap(), vec![other.clone(), entry.clone()]);

        spool.remove(&entry.id).await.unwrap();
        assert_eq!(spool.get(&entry.id).unwrap(), None);
        assert!(matches!(
            spool.body(&entry.id),
            Err(SpoolError::NotFound(id)) if id == entry.id
        ));
        assert_eq!(spool.len().unwrap(), 1);
        assert!(matches!(
            spool.remove(&entry.id).await,
            Err(SpoolError::NotFound(_))
        ));
        // A removed message is not brought back by a late update.
        assert!(matches!(
            spool.update(&entry).await,
            Err(SpoolError::NotFound(_))
        ));
        assert_eq!(spool.entries().unwrap(), vec![other]);
    }

    #[tokio::test]
    async fn entries_sorted_by_next_attempt_then_id() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut stored = Vec::new();
        for n in 0..20u64 {
            stored.push(
                spool
                    .store(envelope(n), body(n), 50 - (n % 5))
                    .await
                    .unwrap(),
            );
        }
        let mut expected = stored.clone();
        expected.sort_by(|a, b| (a.next_attempt, &a.id).cmp(&(b.next_attempt, &b.id)));
        assert_eq!(spool.entries().unwrap(), expected);
        // Ids of successive stores sort by time.
        assert!(stored.windows(2).all(|w| w[0].id < w[1].id));
    }

    #[test]
    fn records_without_released_still_parse() {
        let mut json = serde_json::to_value(QueueEntry {
            id: "0000000000000001".into(),
            envelope: envelope(1),
            size: 3,
            attempts: 0,
            next_attempt: 0,
            last_error: None,
            quarantined: true,
            released: false,
            body_crc: None,
        })
        .unwrap();
        json.as_object_mut().unwrap().remove("released");
        let bytes = serde_json::to_vec(&json).unwrap();
        let entry = decode_entry("0000000000000001", &bytes).unwrap();
        assert!(entry.quarantined && !entry.released);
    }

    #[test]
    fn ids_strictly_increase_in_process() {
        let mut last = new_queue_id();
        for _ in 0..100_000 {
            let id = new_queue_id();
            assert_eq!(id.len(), 16);
            assert!(id > last, "{id} after {last}");
            last = id;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ids_unique_over_10000_stores() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for t in 0..100u64 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..100u64 {
                    let n = t * 100 + i;
                    let entry = spool
                        .store(envelope(n), b"x\r\n".to_vec(), 0)
                        .await
                        .unwrap();
                    ids.push(entry.id);
                }
                ids
            }));
        }
        let mut ids = HashSet::new();
        for task in tasks {
            for id in task.await.unwrap() {
                assert!(ids.insert(id));
            }
        }
        assert_eq!(ids.len(), 10_000);
        assert_eq!(spool.len().unwrap(), 10_000);
        let listed: HashSet<_> = spool.entries().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(listed, ids);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_batches_concurrent_stores() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let before = spool.commits();
        let tasks: Vec<_> = (0..200u64)
            .map(|n| {
                let spool = spool.clone();
                tokio::spawn(async move { spool.store(envelope(n), body(n), 0).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let commits = spool.commits() - before;
        assert_eq!(spool.len().unwrap(), 200);
        assert!(commits >= 1);
        assert!(commits < 200 / 4, "200 stores took {commits} commits");
    }

    /// Issue 17: removals alone ride without an fsync, and are made
    /// durable by one sync once the writer has been idle for
    /// `LAZY_REMOVALS_FOR`, or at close; a store is always durable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removals_alone_are_synced_later_in_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let stored = store_some(&spool, 20).await;
        let before = spool.commits();
        for e in &stored[..10] {
            spool.remove(&e.id).await.unwrap();
        }
        assert_eq!(spool.commits(), before, "a removal alone was fsynced");
        assert_eq!(spool.len().unwrap(), 10);
        // A store after the removals: durable, and it covers them.
        spool.store(envelope(99), body(99), 0).await.unwrap();
        assert_eq!(spool.commits(), before + 1);
        // Removals, then idle: one sync within the bound.
        for e in &stored[10..15] {
            spool.remove(&e.id).await.unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while spool.commits() == before + 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            spool.commits(),
            before + 2,
            "the idle removals were not synced"
        );
        // The last removals before close are synced by close.
        for e in &stored[15..] {
            spool.remove(&e.id).await.unwrap();
        }
        spool.close().await;
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.len().unwrap(), 1, "removals lost or stores gone");
    }

    async fn store_some(spool: &Spool, count: u64) -> Vec<QueueEntry> {
        let mut stored = Vec::new();
        for n in 0..count {
            stored.push(spool.store(envelope(n), body(n), n).await.unwrap());
        }
        stored
    }

    #[tokio::test]
    async fn reopen_after_drop_finds_everything() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let stored = store_some(&spool, 30).await;
        let clone = spool.clone();
        drop(spool);
        drop(clone);
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.entries().unwrap(), stored);
        for entry in &stored {
            let n = entry.next_attempt;
            assert_eq!(spool.body(&entry.id).unwrap(), body(n));
        }
    }

    #[tokio::test]
    async fn close_finishes_queued_work_then_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let stored = store_some(&spool, 30).await;
        // Writes in flight when close() is called still complete.
        let pending: Vec<_> = (100..110u64)
            .map(|n| {
                let spool = spool.clone();
                tokio::spawn(async move { spool.store(envelope(n), body(n), n).await })
            })
            .collect();
        tokio::task::yield_now().await;
        spool.close().await;
        let mut late = 0;
        for task in pending {
            match task.await.unwrap() {
                Ok(_) => {}
                Err(SpoolError::Closed) => late += 1,
                Err(err) => panic!("unexpected {err}"),
            }
        }
        assert!(matches!(
            spool.store(envelope(1), body(1), 0).await,
            Err(SpoolError::Closed)
        ));
        assert!(matches!(spool.get(&stored[0].id), Err(SpoolError::Closed)));
        assert!(matches!(spool.entries(), Err(SpoolError::Closed)));
        assert!(matches!(
            spool.remove(&stored[0].id).await,
            Err(SpoolError::Closed)
        ));
        spool.close().await; // twice is fine

        // The file is released although `spool` still exists.
        let reopened = Spool::open(dir.path()).unwrap();
        let entries = reopened.entries().unwrap();
        assert_eq!(entries.len(), 30 + 10 - late);
        assert_eq!(&entries[..30], &stored[..]);
    }

    #[tokio::test]
    async fn corrupt_record_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let stored = store_some(&spool, 3).await;
        spool.close().await;
        {
            let db = builder().open(dir.path().join(SPOOL_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.insert("00000000DEADBEEF", b"{not json".as_slice())
                    .unwrap();
                // A record that parses but names another message.
                let mut moved = stored[0].clone();
                moved.id = "0000000000000001".into();
                let json = serde_json::to_vec(&moved).unwrap();
                meta.insert("0000000000000002", json.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.entries().unwrap(), stored);
        assert_eq!(spool.len().unwrap(), 5); // still on disk
        assert!(matches!(
            spool.get("00000000DEADBEEF"),
            Err(SpoolError::Corrupt { id, .. }) if id == "00000000DEADBEEF"
        ));
        spool.close().await;
        let listing = Spool::list_readonly(dir.path()).unwrap();
        assert_eq!(listing.entries, stored, "list skips them too");
        // ... and shows them as damaged, with the reason.
        let damaged: Vec<_> = listing.damaged.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(damaged, ["0000000000000002", "00000000DEADBEEF"]);
        assert!(
            listing.damaged[0].reason.contains("another message"),
            "{:?}",
            listing.damaged
        );
        assert!(
            listing.damaged[1].reason.contains("does not parse"),
            "{:?}",
            listing.damaged
        );
    }

    /// `queue list` of a running node: over the control socket.
    async fn list(dir: &Path) -> Vec<QueueEntry> {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || Spool::list_readonly(&dir))
            .await
            .unwrap()
            .unwrap()
            .entries
    }

    #[tokio::test]
    async fn list_readonly_while_node_is_running() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(list(dir.path()).await, vec![]);
        let spool = Spool::open(dir.path()).unwrap();
        let token = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(serve_control(spool.clone(), token.clone()));
        let stored = store_some(&spool, 10).await;
        assert_eq!(list(dir.path()).await, stored);
        // The running spool keeps working, and the next listing sees new commits.
        let more = spool.store(envelope(50), body(50), 50).await.unwrap();
        let listed = list(dir.path()).await;
        assert_eq!(listed.len(), 11);
        assert_eq!(listed.last(), Some(&more));
        // After a clean stop too.
        token.cancel();
        server.await.unwrap();
        spool.close().await;
        assert_eq!(list(dir.path()).await.len(), 11);
    }

    /// Overwrites every copy of `needle` in the spool file with `X`s.
    fn garble(dir: &Path, needle: &[u8]) -> usize {
        let path = dir.join(SPOOL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let mut hits = 0;
        let mut at = 0;
        while let Some(p) = bytes[at..].windows(needle.len()).position(|w| w == needle) {
            let start = at + p;
            bytes[start..start + needle.len()].fill(b'X');
            hits += 1;
            at = start + needle.len();
        }
        std::fs::write(&path, bytes).unwrap();
        hits
    }

    #[tokio::test]
    async fn damaged_body_is_never_handed_out_and_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let stored = store_some(&spool, 3).await;
        spool.close().await;
        // 14 bytes of message 1's body.
        assert!(garble(dir.path(), b"line of messag") > 0);
        let spool = Spool::open(dir.path()).unwrap();
        // Every body was garbled by the needle (they all contain it): none is handed out.
        for e in &stored {
            assert!(
                matches!(spool.body(&e.id), Err(SpoolError::Corrupt { ref reason, .. }) if reason.contains("checksum")),
                "{}",
                e.id
            );
        }
        let damaged = spool.damaged();
        assert_eq!(damaged.len(), 3, "{damaged:?}");
        assert!(spool.due(u64::MAX, 10, |_, _| true).is_empty());
        assert_eq!(spool.stats(0).damaged, 3);
        assert_eq!(spool.stats(0).messages, 0);
        assert!(matches!(
            spool.get(&stored[0].id),
            Err(SpoolError::Corrupt { .. })
        ));
        // The damage is recorded on disk: still listed after a restart.
        tokio::time::sleep(Duration::from_millis(100)).await;
        spool.close().await;
        let listing = Spool::list_readonly(dir.path()).unwrap();
        assert!(listing.entries.is_empty());
        assert_eq!(listing.damaged.len(), 3);
        assert!(listing.damaged[0].reason.contains("body checksum mismatch"));
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.damaged().len(), 3);
        assert!(spool.due(u64::MAX, 10, |_, _| true).is_empty());
    }

    #[tokio::test]
    async fn damaged_envelope_is_listed_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let stored = store_some(&spool, 3).await;
        spool.close().await;
        assert!(garble(dir.path(), b"sender1@example.org") > 0);
        let spool = Spool::open(dir.path()).unwrap();
        let damaged = spool.damaged();
        assert_eq!(damaged.len(), 1, "{damaged:?}");
        assert_eq!(damaged[0].id, stored[1].id);
        assert!(
            damaged[0].reason.contains("envelope checksum"),
            "{damaged:?}"
        );
        let due: Vec<_> = spool
            .due(u64::MAX, 10, |_, _| true)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(due, [stored[0].id.clone(), stored[2].id.clone()]);
        assert_eq!(spool.body(&stored[2].id).unwrap(), body(2));
    }

    #[tokio::test]
    async fn a_missing_or_emptied_spool_is_refused_unless_new() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        store_some(&spool, 2).await;
        spool.close().await;
        assert!(dir.path().join(MARKER_FILE).is_file());
        // Truncated to zero bytes.
        std::fs::write(dir.path().join(SPOOL_FILE), b"").unwrap();
        let err = Spool::open(dir.path()).unwrap_err();
        assert!(
            matches!(&err, SpoolError::Refused(m) if m.contains("--new-spool") && m.contains("empty")),
            "{err}"
        );
        // Deleted.
        std::fs::remove_file(dir.path().join(SPOOL_FILE)).unwrap();
        let err = Spool::open(dir.path()).unwrap_err();
        assert!(
            matches!(&err, SpoolError::Refused(m) if m.contains("missing")),
            "{err}"
        );
        // Replaced by another spool.
        let other = tempfile::tempdir().unwrap();
        Spool::open(other.path()).unwrap().close().await;
        std::fs::copy(other.path().join(SPOOL_FILE), dir.path().join(SPOOL_FILE)).unwrap();
        let err = Spool::open(dir.path()).unwrap_err();
        assert!(
            matches!(&err, SpoolError::Refused(m) if m.contains("is spool")),
            "{err}"
        );
        std::fs::remove_file(dir.path().join(SPOOL_FILE)).unwrap();
        // The operator says so: a new, empty spool, and a marker for it.
        let spool = Spool::open_with(dir.path(), OpenOptions { new_spool: true }).unwrap();
        assert_eq!(spool.len().unwrap(), 0);
        spool.close().await;
        Spool::open(dir.path()).unwrap().close().await;
    }

    #[tokio::test]
    async fn a_full_destination_is_skipped_and_others_are_not_kept_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        // 50 due messages for example.net, stored first, then one for
        // other.test and one whose recipients are all settled.
        let mut busy = Vec::new();
        for n in 0..50 {
            busy.push(spool.store(envelope(n), body(n), 100).await.unwrap());
        }
        let mut other = envelope(99);
        other.recipients.truncate(1);
        other.recipients[0].address = "x@other.test".into();
        let other = spool.store(other, body(99), 150).await.unwrap();
        let mut done = envelope(98);
        for r in &mut done.recipients {
            r.state = RcptState::Delivered {
                reply: "250 ok".into(),
            };
        }
        let done = spool.store(done, body(98), 160).await.unwrap();
        let room = |d: &str| usize::from(d != "example.net") * 5;
        let mut looked = 0;
        let due = spool.due_by_destination(
            200,
            10,
            room,
            |_| false,
            |_, _| {
                looked += 1;
                true
            },
        );
        let ids: Vec<_> = due.iter().map(|(id, _)| id.clone()).collect();
        // The full destination's 50 are not even offered.
        assert_eq!(ids, [other.id.clone(), done.id.clone()]);
        assert_eq!(looked, 2);
        // With room, a destination gives its earliest, at most `room`, and
        // skipped ones (in flight) do not use it.
        let in_flight = busy[0].id.clone();
        let due = spool.due_by_destination(200, 10, |_| 2, |id| id == in_flight, |_, _| true);
        let ids: Vec<_> = due.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(
            ids,
            [
                busy[1].id.clone(),
                busy[2].id.clone(),
                other.id.clone(),
                done.id.clone()
            ]
        );
        // Removed messages leave the per-destination index too.
        for e in &busy {
            spool.remove(&e.id).await.unwrap();
        }
        let due = spool.due_by_destination(200, 10, |_| 5, |_| false, |_, _| true);
        assert_eq!(due.len(), 2);
    }

    #[tokio::test]
    async fn index_tracks_due_held_deferred_and_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let a = spool.store(envelope(1), body(1), 100).await.unwrap();
        let mut b = spool.store(envelope(2), body(2), 200).await.unwrap();
        let mut c = spool.store(envelope(3), body(3), 300).await.unwrap();
        let s = spool.stats(150);
        assert_eq!(
            (s.messages, s.held, s.deferred, s.quarantined),
            (3, 2, 0, 0)
        );
        assert_eq!(spool.next_due(), Some(100));
        assert_eq!(spool.next_due_after(100), Some(200));
        let due: Vec<_> = spool
            .due(200, 10, |_, _| true)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(due, [a.id.clone(), b.id.clone()]);
        let (_, dest) = &spool.due(100, 1, |_, _| true)[0];
        assert_eq!(&dest[..], ["example.net".to_string()]);
        // A filter that refuses the first still gets the next.
        let due = spool.due(200, 1, |id, _| id != a.id);
        assert_eq!(due[0].0, b.id);
        b.attempts = 1;
        b.next_attempt = 1_000;
        spool.update(&b).await.unwrap();
        c.quarantined = true;
        spool.update(&c).await.unwrap();
        let s = spool.stats(150);
        assert_eq!(
            (s.messages, s.held, s.deferred, s.quarantined),
            (3, 0, 1, 1)
        );
        assert_eq!(spool.next_due_after(100), Some(1_000));
        assert_eq!(spool.quarantined_before(u64::MAX), [c.id.clone()]);
        assert_eq!(spool.first_quarantined(), Some(c.envelope.received_at));
        spool.remove(&a.id).await.unwrap();
        assert_eq!(spool.next_due(), Some(1_000));
        assert_eq!(spool.stats(0).messages, 2);
        // The same index is rebuilt at open.
        spool.close().await;
        let spool = Spool::open(dir.path()).unwrap();
        let s = spool.stats(150);
        assert_eq!(
            (s.messages, s.held, s.deferred, s.quarantined),
            (2, 0, 1, 1)
        );
        assert_eq!(spool.next_due(), Some(1_000));
    }

    #[tokio::test]
    async fn salvage_copies_the_readable_and_lists_the_rest() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("spool");
        let spool = Spool::open(&dir).unwrap();
        let stored = store_some(&spool, 5).await;
        spool.close().await;
        // Garble the envelope of message 3.
        assert!(garble(&dir, b"sender3@example.org") > 0);
        let report = salvage(&dir).unwrap();
        let mut copied = report.copied.clone();
        copied.sort();
        let want: Vec<_> = stored
            .iter()
            .filter(|e| e.next_attempt != 3)
            .map(|e| e.id.clone())
            .collect();
        assert_eq!(copied, want);
        assert_eq!(report.lost.len(), 1, "{:?}", report.lost);
        assert_eq!(report.lost[0].0, stored[3].id);
        assert!(report.moved_to.join(SPOOL_FILE).is_file());
        // The fresh spool is in place and opens without complaint.
        let spool = Spool::open(&dir).unwrap();
        assert_eq!(spool.stats(0).messages, 4);
        assert!(spool.damaged().is_empty());
        for e in stored.iter().filter(|e| e.next_attempt != 3) {
            assert_eq!(spool.body(&e.id).unwrap(), body(e.next_attempt));
            assert_eq!(spool.get(&e.id).unwrap().unwrap().envelope, e.envelope);
        }
    }

    #[test]
    fn open_creates_missing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/spool");
        let spool = Spool::open(&nested).unwrap();
        assert!(nested.join(SPOOL_FILE).is_file());
        assert_eq!(spool.len().unwrap(), 0);
    }

    const CRASH_ENV: &str = "MAGICMX_SPOOL_CRASH_CHILD_DIR";

    /// The child of `acknowledged_messages_survive_sigkill`: stores messages
    /// from several tasks and prints `ACK <id> <n>` once each store returned.
    #[test]
    #[ignore = "run by acknowledged_messages_survive_sigkill"]
    fn crash_child() {
        let Some(dir) = std::env::var_os(CRASH_ENV) else {
            return;
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let spool = Spool::open(Path::new(&dir)).unwrap();
            let next = Arc::new(AtomicU64::new(0));
            let deadline = Instant::now() + Duration::from_secs(20);
            let tasks: Vec<_> = (0..16)
                .map(|_| {
                    let spool = spool.clone();
                    let next = next.clone();
                    tokio::spawn(async move {
                        while Instant::now() < deadline {
                            let n = next.fetch_add(1, Ordering::Relaxed);
                            let entry = spool.store(envelope(n), body(n), n).await.unwrap();
                            let mut out = std::io::stdout().lock();
                            writeln!(out, "ACK {} {n}", entry.id).unwrap();
                            out.flush().unwrap();
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        });
    }

    #[test]
    fn acknowledged_messages_survive_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "spool::tests::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_ENV, dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines_tx, lines_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut words = line.split_whitespace();
                if words.next() != Some("ACK") {
                    continue;
                }
                let id = words.next().unwrap().to_string();
                let n: u64 = words.next().unwrap().parse().unwrap();
                if lines_tx.send((id, n)).is_err() {
                    break;
                }
            }
        });

        // Kill it mid-stream, once it has acknowledged a good number.
        let mut acked = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(3);
        while acked.len() < 400 && Instant::now() < deadline {
            if let Ok(ack) = lines_rx.recv_timeout(Duration::from_millis(50)) {
                acked.push(ack);
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        acked.extend(lines_rx.try_iter());
        assert!(
            acked.len() >= 20,
            "the child acknowledged only {}",
            acked.len()
        );

        // The listing CLI of a stopped, crashed node repairs and sees them all.
        let listed: HashSet<_> = Spool::list_readonly(dir.path())
            .unwrap()
            .entries
            .into_iter()
            .map(|e| e.id)
            .collect();
        for (id, _) in &acked {
            assert!(listed.contains(id), "acknowledged {id} is not listed");
        }
        let spool = Spool::open(dir.path()).unwrap();
        for (id, n) in &acked {
            let entry = spool
                .get(id)
                .unwrap()
                .unwrap_or_else(|| panic!("acknowledged {id} lost"));
            assert_eq!(entry.envelope, envelope(*n));
            assert_eq!(entry.next_attempt, *n);
            assert_eq!(entry.size, body(*n).len() as u64);
            assert_eq!(spool.body(id).unwrap(), body(*n));
        }
        // Whatever was stored but not yet acknowledged is intact too.
        for entry in spool.entries().unwrap() {
            assert_eq!(entry.envelope, envelope(entry.next_attempt));
            assert_eq!(spool.body(&entry.id).unwrap(), body(entry.next_attempt));
        }
    }

    /// Throughput of `store` with concurrent writers of 1 KB messages:
    /// `MAGICMX_SPOOL_BENCH_WRITERS=20 cargo test --release --lib spool::tests::bench_store_throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn bench_store_throughput() {
        let writers: u64 = std::env::var("MAGICMX_SPOOL_BENCH_WRITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        let seconds = std::env::var("MAGICMX_SPOOL_BENCH_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let spool = Spool::open(dir.path()).unwrap();
            let payload = vec![b'x'; 1024];
            let start = Instant::now();
            let deadline = start + Duration::from_secs(seconds);
            let tasks: Vec<_> = (0..writers)
                .map(|w| {
                    let spool = spool.clone();
                    let payload = payload.clone();
                    tokio::spawn(async move {
                        let mut done = 0u64;
                        let mut worst = Duration::ZERO;
                        while Instant::now() < deadline {
                            let t = Instant::now();
                            spool.store(envelope(w), payload.clone(), 0).await.unwrap();
                            worst = worst.max(t.elapsed());
                            done += 1;
                        }
                        (done, worst)
                    })
                })
                .collect();
            let mut total = 0;
            let mut worst = Duration::ZERO;
            for task in tasks {
                let (done, w) = task.await.unwrap();
                total += done;
                worst = worst.max(w);
            }
            let elapsed = start.elapsed().as_secs_f64();
            let commits = spool.commits();
            println!(
                "{writers} writers, 1 KB: {total} stores in {elapsed:.2} s = {:.0} stores/s, \
                 {commits} commits ({:.1} stores/commit), worst latency {worst:?}",
                total as f64 / elapsed,
                total as f64 / commits.max(1) as f64
            );
        });
    }
}
