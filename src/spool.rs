//! spool: the durable on-disk queue.
//!
//! The SMTP server answers `250` after DATA only once the message and its
//! envelope are on disk and fsynced; a node killed at any moment loses no
//! message it acknowledged. Everything lives in one redb file,
//! `<data dir>/spool.redb`, in two tables keyed by [`QueueId`]: `meta` holds
//! the JSON of each [`QueueEntry`] and `body` the raw message bytes, so that
//! an [`Spool::update`] (attempts, recipient states, next attempt) never
//! rewrites the body.
//!
//! Why one writer thread: an fsync costs about 1.4 ms here, so one commit per
//! message would cap the node near 700 messages/s. Instead every write
//! ([`Spool::store`], [`Spool::update`], [`Spool::remove`]) is sent over a
//! bounded channel to a dedicated thread, which drains what is pending (up to
//! [`MAX_BATCH`] operations), applies it all in one write transaction,
//! commits once with [`Durability::Immediate`] and only then answers each
//! waiter. While one commit is being fsynced the next batch piles up, so the
//! batch size grows with the load and one fsync covers many messages
//! (group commit). Reads ([`Spool::get`], [`Spool::body`], [`Spool::entries`])
//! use their own read transactions and never wait for the writer.
//!
//! The database is opened in redb's `SingleWriter` concurrency mode, so that
//! `magicmx queue list` ([`Spool::list_readonly`]) can open the spool of a
//! running node read-only from another process. Recovery is redb's: opening
//! the file after a crash repairs it to the last commit, which contains every
//! acknowledged message. A metadata record that does not parse is logged and
//! skipped by [`Spool::entries`], never fatal, and left on disk.

use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{
    Builder, ConcurrencyMode, Database, DatabaseError, Durability, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

/// Identifies a message in the spool: 16 uppercase hex digits, the
/// microseconds since the Unix epoch followed by 12 bits that make it unique.
/// Ids sort by the time the message was stored.
pub type QueueId = String;

/// Name of the spool file inside the data directory.
pub const SPOOL_FILE: &str = "spool.redb";

/// Most operations applied in one write transaction (one fsync).
pub const MAX_BATCH: usize = 256;

/// Capacity of the channel to the writer thread; senders wait beyond it.
const CHANNEL_CAPACITY: usize = 1024;

/// redb's page cache. The spool is mostly written once and read once.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const BODY: TableDefinition<&str, &[u8]> = TableDefinition::new("body");

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
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("spool database error: {0}")]
    Database(String),
    #[error("spool record {id} is corrupt")]
    Corrupt { id: QueueId },
    #[error("message {0} is not in the spool")]
    NotFound(QueueId),
    #[error("the spool is closed")]
    Closed,
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

/// The durable queue. Cheap to clone; every clone is the same spool.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// `None` once closed.
    db: RwLock<Option<Arc<Database>>>,
    /// `None` once closed; the writer stops when every sender is gone.
    sender: RwLock<Option<mpsc::Sender<Op>>>,
    commits: Arc<AtomicU64>,
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
                error!(path = %self.path.display(), "spool writer thread panicked");
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
}

impl Spool {
    /// Creates `dir` if needed, opens/creates `dir/spool.redb`, starts the writer thread.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        create_dir_durably(dir)?;
        let path = dir.join(SPOOL_FILE);
        let db = catch_unwind(AssertUnwindSafe(|| builder().create(&path)))
            .map_err(|_| {
                SpoolError::Database(format!(
                    "{}: the file is damaged (redb panicked while opening it)",
                    path.display()
                ))
            })?
            .map_err(|err| open_error(&path, err))?;
        // Every time, not only when the file is new: a node killed between
        // creating the file and this fsync would otherwise never make its
        // directory entry durable. One fsync per start.
        sync_dir(dir)?;
        // Create the tables, so that readers never find them missing.
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.open_table(META)?;
        txn.open_table(BODY)?;
        txn.commit()?;

        let db = Arc::new(db);
        let count = db
            .begin_read()
            .map_err(SpoolError::from)
            .and_then(|txn| Ok(txn.open_table(META)?.len()?))?;
        info!(path = %path.display(), messages = count, "spool opened");

        let (sender, receiver) = mpsc::channel(CHANNEL_CAPACITY);
        let (done_tx, done_rx) = watch::channel(false);
        let commits = Arc::new(AtomicU64::new(0));
        let writer = {
            let db = db.clone();
            let commits = commits.clone();
            std::thread::Builder::new()
                .name("spool-writer".into())
                .spawn(move || writer_thread(db, receiver, commits, done_tx))?
        };
        Ok(Spool {
            inner: Arc::new(Inner {
                path,
                db: RwLock::new(Some(db)),
                sender: RwLock::new(Some(sender)),
                commits,
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
    /// next_attempt, last_error, quarantined). The body and its size stay as
    /// stored. [`SpoolError::NotFound`] if the message is no longer spooled.
    pub async fn update(&self, entry: &QueueEntry) -> Result<(), SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Update {
            entry: entry.clone(),
            reply,
        })
        .await?;
        answer.await.map_err(|_| writer_lost())?
    }

    /// Durably removes the message (metadata and body).
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

    /// The stored body bytes.
    pub fn body(&self, id: &str) -> Result<Vec<u8>, SpoolError> {
        let db = self.db()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(BODY)?;
        let body = table.get(id)?;
        match body {
            Some(body) => Ok(body.value().to_vec()),
            None => Err(SpoolError::NotFound(id.to_string())),
        }
    }

    /// The entry, `None` if it is not spooled, [`SpoolError::Corrupt`] if its
    /// record does not parse.
    pub fn get(&self, id: &str) -> Result<Option<QueueEntry>, SpoolError> {
        let db = self.db()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(META)?;
        let record = table.get(id)?;
        match record {
            Some(record) => parse_entry(id, record.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Every entry, sorted by next_attempt then id. Used at start (recovery)
    /// and by `queue list`. Corrupt records are logged and skipped.
    pub fn entries(&self) -> Result<Vec<QueueEntry>, SpoolError> {
        read_entries(&*self.db()?)
    }

    /// Number of messages in the spool (cheap: no record is read).
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

    /// Number of write transactions committed since [`Spool::open`]. With
    /// group commit this grows much slower than the number of writes.
    pub fn commits(&self) -> u64 {
        self.inner.commits.load(Ordering::Relaxed)
    }

    /// Opens the spool of a (possibly running) node read-only and lists it,
    /// for the `magicmx queue list` CLI. A running node shares the file
    /// (redb `SingleWriter` mode). A missing spool lists as empty. When the
    /// last node that ran crashed and none runs now, the file needs redb's
    /// repair, which only a writer may do: the spool is then opened for
    /// writing just long enough to repair and list it, as the node's own
    /// start would.
    pub fn list_readonly(dir: &Path) -> Result<Vec<QueueEntry>, SpoolError> {
        let path = dir.join(SPOOL_FILE);
        if !path.exists() {
            return Ok(Vec::new());
        }
        let read_only = || {
            catch_unwind(AssertUnwindSafe(|| builder().open_read_only(&path))).map_err(|_| {
                SpoolError::Database(format!(
                    "{}: the file is damaged (redb panicked while opening it)",
                    path.display()
                ))
            })
        };
        match read_only()? {
            Ok(db) => read_entries(&db),
            Err(DatabaseError::RepairAborted) => {
                debug!(path = %path.display(), "spool needs repair; opening it for writing");
                match catch_unwind(AssertUnwindSafe(|| builder().open(&path))) {
                    Ok(Ok(db)) => read_entries(&db),
                    // A node started meanwhile, and repaired the file.
                    Ok(Err(DatabaseError::DatabaseAlreadyOpen)) => match read_only()? {
                        Ok(db) => read_entries(&db),
                        Err(err) => Err(open_error(&path, err)),
                    },
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
                error!(path = %self.inner.path.display(), "spool writer thread panicked");
            }
        }
        if write_lock(&self.inner.db).take().is_some() {
            info!(path = %self.inner.path.display(), "spool closed");
        }
    }

    async fn send(&self, op: Op) -> Result<(), SpoolError> {
        let sender = read_lock(&self.inner.sender)
            .clone()
            .ok_or(SpoolError::Closed)?;
        sender.send(op).await.map_err(|_| SpoolError::Closed)
    }

    fn db(&self) -> Result<Arc<Database>, SpoolError> {
        read_lock(&self.inner.db).clone().ok_or(SpoolError::Closed)
    }
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn builder() -> Builder {
    let mut builder = Builder::new();
    builder
        .set_concurrency_mode(ConcurrencyMode::SingleWriter)
        .set_cache_size(CACHE_BYTES);
    builder
}

fn open_error(path: &Path, err: DatabaseError) -> SpoolError {
    match err {
        DatabaseError::DatabaseAlreadyOpen => SpoolError::Database(format!(
            "{} is locked by another process (is another magicmx node running on this data directory?)",
            path.display()
        )),
        DatabaseError::LockProtocolMismatch => SpoolError::Database(format!(
            "{} is open in a process that uses another redb version",
            path.display()
        )),
        DatabaseError::RepairAborted => SpoolError::Database(format!(
            "{} needs a repair after a crash; start the node to repair it",
            path.display()
        )),
        err => SpoolError::Database(format!("{}: {err}", path.display())),
    }
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

fn parse_entry(id: &str, bytes: &[u8]) -> Result<QueueEntry, SpoolError> {
    match serde_json::from_slice::<QueueEntry>(bytes) {
        Ok(entry) if entry.id == id => Ok(entry),
        Ok(entry) => {
            warn!(queue_id = id, found = %entry.id, "spool record holds another id; skipped");
            Err(SpoolError::Corrupt { id: id.to_string() })
        }
        Err(err) => {
            warn!(queue_id = id, error = %err, "corrupt spool record; skipped");
            Err(SpoolError::Corrupt { id: id.to_string() })
        }
    }
}

fn read_entries(db: &impl ReadableDatabase) -> Result<Vec<QueueEntry>, SpoolError> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(META) {
        Ok(table) => table,
        // A spool created by a node that never committed its tables.
        Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(err) => return Err(err.into()),
    };
    let mut entries = Vec::with_capacity(usize::try_from(table.len()?).unwrap_or(0));
    for record in table.iter()? {
        let (id, bytes) = record?;
        if let Ok(entry) = parse_entry(id.value(), bytes.value()) {
            entries.push(entry);
        }
    }
    entries.sort_by(|a, b| {
        a.next_attempt
            .cmp(&b.next_attempt)
            .then_with(|| a.id.cmp(&b.id))
    });
    Ok(entries)
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
fn writer_thread(
    db: Arc<Database>,
    mut receiver: mpsc::Receiver<Op>,
    commits: Arc<AtomicU64>,
    done: watch::Sender<bool>,
) {
    while let Some(first) = receiver.blocking_recv() {
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let size = batch.len();
        // A panic inside redb (a damaged file) drops the batch's reply
        // channels, so its waiters get an error; the thread carries on.
        if catch_unwind(AssertUnwindSafe(|| apply_batch(&db, batch, &commits))).is_err() {
            error!(batch = size, "spool writer panicked during a batch");
        }
    }
    // Release the file before telling close() that the writer is done.
    drop(db);
    done.send_replace(true);
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
}

impl Answer {
    fn send(self) {
        // A waiter that went away no longer needs its answer.
        match self {
            Answer::Entry(reply, result) => drop(reply.send(result)),
            Answer::Unit(reply, result) => drop(reply.send(result)),
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
    fn failed(self, msg: &str) -> Answer {
        let err = SpoolError::Database(msg.into());
        match self {
            Op::Store { reply, .. } => Answer::Entry(reply, Err(err)),
            Op::Update { reply, .. } | Op::Remove { reply, .. } => Answer::Unit(reply, Err(err)),
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

type Tables<'t> = (
    redb::Table<'t, &'static str, &'static [u8]>,
    redb::Table<'t, &'static str, &'static [u8]>,
);

/// Applies the batch in one transaction and answers every waiter.
/// Counts the commit in `commits` before anyone is answered.
fn apply_batch(db: &Database, batch: Vec<Op>, commits: &AtomicU64) {
    let mut answers = Vec::with_capacity(batch.len());
    let mut ops = batch.into_iter();
    let outcome = (|| -> Result<bool, String> {
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| e.to_string())?;
        // No quick-repair: it saves the allocator state at every commit, a
        // cost that grows with the file, to save a one-off repair after a
        // crash (about 1 s per 500 MB of spool here). SingleWriter mode
        // always commits in two phases, so the last commit is always valid.
        {
            let mut tables: Tables<'_> = (
                txn.open_table(META).map_err(|e| e.to_string())?,
                txn.open_table(BODY).map_err(|e| e.to_string())?,
            );
            for op in ops.by_ref() {
                apply(&mut tables, op, &mut answers)?;
            }
        }
        if answers.is_empty() {
            // Every store was abandoned by its waiter: nothing to commit.
            txn.abort().map_err(|e| e.to_string())?;
            return Ok(false);
        }
        txn.commit().map_err(|e| e.to_string())?;
        Ok(true)
    })();
    match outcome {
        Ok(committed) => {
            if committed {
                commits.fetch_add(1, Ordering::Relaxed);
            }
            answers.into_iter().for_each(Answer::send);
        }
        Err(msg) => {
            error!(error = %msg, batch = answers.len() + ops.len(), "spool write transaction failed");
            for answer in answers {
                answer.fail(&msg).send();
            }
            for op in ops {
                op.failed(&msg).send();
            }
        }
    }
}

/// Applies one operation and queues its answer. Skips a store whose waiter
/// is gone. `Err`: the transaction is broken (the answer carries the error).
fn apply(tables: &mut Tables<'_>, op: Op, answers: &mut Vec<Answer>) -> Result<(), String> {
    let (meta, body_table) = tables;
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
                while meta.get(id.as_str())?.is_some() || body_table.get(id.as_str())?.is_some() {
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
                };
                let json = serde_json::to_vec(&entry)
                    .map_err(|e| Failure::Op(SpoolError::Database(e.to_string())))?;
                body_table.insert(entry.id.as_str(), body.as_slice())?;
                meta.insert(entry.id.as_str(), json.as_slice())?;
                info!(queue_id = %entry.id, size = entry.size, recipients = entry.envelope.recipients.len(), "message spooled");
                Ok(entry)
            })();
            let (result, broken) = split_failure(result);
            answers.push(Answer::Entry(reply, result));
            broken
        }
        Op::Update { entry, reply } => {
            let result = (|| -> Result<(), Failure> {
                if meta.get(entry.id.as_str())?.is_none() {
                    return Err(Failure::Op(SpoolError::NotFound(entry.id.clone())));
                }
                let json = serde_json::to_vec(&entry)
                    .map_err(|e| Failure::Op(SpoolError::Database(e.to_string())))?;
                meta.insert(entry.id.as_str(), json.as_slice())?;
                debug!(queue_id = %entry.id, attempts = entry.attempts, next_attempt = entry.next_attempt, "spool entry updated");
                Ok(())
            })();
            let (result, broken) = split_failure(result);
            answers.push(Answer::Unit(reply, result));
            broken
        }
        Op::Remove { id, reply } => {
            let result = (|| -> Result<(), Failure> {
                let had_meta = meta.remove(id.as_str())?.is_some();
                let had_body = body_table.remove(id.as_str())?.is_some();
                if !had_meta && !had_body {
                    return Err(Failure::Op(SpoolError::NotFound(id.clone())));
                }
                info!(queue_id = %id, "message removed from spool");
                Ok(())
            })();
            let (result, broken) = split_failure(result);
            answers.push(Answer::Unit(reply, result));
            broken
        }
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
        })
        .unwrap();
        json.as_object_mut().unwrap().remove("released");
        let bytes = serde_json::to_vec(&json).unwrap();
        let entry = parse_entry("0000000000000001", &bytes).unwrap();
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
            Err(SpoolError::Corrupt { id }) if id == "00000000DEADBEEF"
        ));
        assert_eq!(
            Spool::list_readonly(dir.path()).unwrap(),
            stored,
            "list skips them too"
        );
    }

    #[tokio::test]
    async fn list_readonly_while_node_is_running() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Spool::list_readonly(dir.path()).unwrap(), vec![]);
        let spool = Spool::open(dir.path()).unwrap();
        let stored = store_some(&spool, 10).await;
        assert_eq!(Spool::list_readonly(dir.path()).unwrap(), stored);
        // The running spool keeps working, and the next listing sees new commits.
        let more = spool.store(envelope(50), body(50), 50).await.unwrap();
        let listed = Spool::list_readonly(dir.path()).unwrap();
        assert_eq!(listed.len(), 11);
        assert_eq!(listed.last(), Some(&more));
        // After a clean stop too.
        spool.close().await;
        assert_eq!(Spool::list_readonly(dir.path()).unwrap().len(), 11);
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
