//! The QUIC endpoint: one per node, on `[gossip] listen`, used both to
//! accept and to dial (so a peer's remote address is its gossip address).
//!
//! Connections are cached per peer address, whichever side opened them.
//! Every connection gets a reader task that hands datagrams (SWIM), whole
//! unidirectional streams (count deltas, at most [`MAX_MESSAGE`] bytes) and
//! bidirectional streams (anti-entropy) to the gossip core as [`Event`]s on
//! a bounded channel; when the channel is full the event is dropped and
//! counted, never queued without bound. Memory is bounded too: at most
//! [`MAX_STREAM_READS`] streams are read at once, queued stream messages
//! hold at most [`MAX_QUEUED_BYTES`], and one certificate (node name) has at
//! most [`MAX_CONNECTIONS_PER_NAME`] connections. Handshake failures (no
//! certificate, another CA) are logged and counted.
//!
//! Test hook: if the environment variable `MAGICMX_GOSSIP_BLOCK_FILE` names
//! a file, every socket address listed in it (one per line) is cut off at
//! this layer: nothing is sent to it and everything from it is dropped. The
//! file is re-read every 100 ms, so a test can open and heal a partition.
//! Only a build with the `fault-hooks` cargo feature reads the variable
//! (`cargo test --features fault-hooks`, or `interop`, which implies it); a
//! build without it, as every build for use is, ignores it, as it ignores
//! `MAGICMX_TEST_PANIC_TASK`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::tls::{self, COMMON_NAME};
use super::wire::MAX_MESSAGE;
use crate::slots::{self, KeyedSlots};

/// Most simultaneous connections (both directions).
const MAX_CONNECTIONS: usize = 1024;
/// Most simultaneous connections of one node name (one certificate).
const MAX_CONNECTIONS_PER_NAME: usize = 8;
/// Streams read at once, over all connections: each buffers up to
/// [`MAX_MESSAGE`]; the others wait (QUIC flow control holds the senders).
const MAX_STREAM_READS: usize = 16;
/// Bytes of stream messages waiting for the gossip core, over all peers.
const MAX_QUEUED_BYTES: usize = 64 << 20;
/// A dial that failed is not retried for this long.
const REDIAL_AFTER: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
pub const BLOCK_FILE_ENV: &str = "MAGICMX_GOSSIP_BLOCK_FILE";

/// An established connection, the node name its certificate carries and
/// the fingerprint of the certificate's public key.
#[derive(Clone)]
pub struct Peer {
    pub conn: quinn::Connection,
    pub name: String,
    pub key: crate::netkeys::Fingerprint,
}

impl Peer {
    pub fn addr(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// True if `claimed` may speak on this connection: it is exactly the
    /// name the certificate carries. (Certificate name matching would also
    /// take `NODE1` or `node1.` for `node1`: one certificate, many members.)
    pub fn accepts(&self, claimed: &str) -> bool {
        claimed == self.name
    }
}

/// What arrives from peers.
pub enum Event {
    Datagram(Peer, Bytes),
    /// A whole stream message; the [`Queued`] guard keeps its bytes in the
    /// transport's budget until the event is dropped.
    Uni(Peer, Vec<u8>, Queued),
    Bi(Peer, quinn::SendStream, quinn::RecvStream),
}

#[derive(Default)]
struct Slot {
    peer: Option<Peer>,
    failed_at: Option<Instant>,
}

pub struct Transport {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    slots: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Slot>>>>,
    events: mpsc::Sender<Event>,
    blocked: RwLock<HashSet<SocketAddr>>,
    connections: AtomicUsize,
    per_name: Arc<KeyedSlots<String>>,
    reads: Arc<tokio::sync::Semaphore>,
    queued: Arc<AtomicUsize>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// The bytes of one queued stream message, counted in the transport's
/// budget until the gossip core has handled (dropped) the event.
pub struct Queued {
    bytes: usize,
    total: Arc<AtomicUsize>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("address cut off by the test block file")]
    Blocked,
    #[error("recent dial failure")]
    Backoff,
    #[error("connect: {0}")]
    Connect(String),
    #[error("peer certificate carries no valid node name")]
    NoName,
    #[error("stream: {0}")]
    Stream(String),
    #[error("timed out")]
    Timeout,
}

pub fn count_out(kind: &'static str, bytes: usize) {
    metrics::counter!("magicmx_gossip_bytes_total", "direction" => "out").increment(bytes as u64);
    metrics::counter!("magicmx_gossip_messages_total", "direction" => "out", "kind" => kind)
        .increment(1);
}

pub fn count_in_bytes(bytes: usize) {
    metrics::counter!("magicmx_gossip_bytes_total", "direction" => "in").increment(bytes as u64);
}

pub fn dropped(reason: &'static str) {
    metrics::counter!("magicmx_gossip_dropped_total", "reason" => reason).increment(1);
}

impl Transport {
    /// Binds the endpoint; incoming events go to `events`.
    pub fn bind(
        listen: SocketAddr,
        server: quinn::ServerConfig,
        client: quinn::ClientConfig,
        events: mpsc::Sender<Event>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> std::io::Result<Arc<Transport>> {
        let endpoint = quinn::Endpoint::server(server, listen)?;
        let t = Arc::new(Transport {
            endpoint,
            client,
            slots: Mutex::new(HashMap::new()),
            events,
            blocked: RwLock::new(HashSet::new()),
            connections: AtomicUsize::new(0),
            per_name: KeyedSlots::new(MAX_CONNECTIONS_PER_NAME),
            reads: Arc::new(tokio::sync::Semaphore::new(MAX_STREAM_READS)),
            queued: Arc::new(AtomicUsize::new(0)),
            shutdown,
            tasks,
        });
        t.tasks.spawn(t.clone().accept_loop());
        // Test hook (see the module header): read only in a build with the
        // `fault-hooks` feature, which no build for use turns on.
        let hook = match cfg!(feature = "fault-hooks") {
            true => std::env::var_os(BLOCK_FILE_ENV),
            false => None,
        };
        if let Some(path) = hook {
            t.tasks
                .spawn(t.clone().watch_block_file(PathBuf::from(path)));
        }
        Ok(t)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    fn is_blocked(&self, addr: &SocketAddr) -> bool {
        let b = self.blocked.read().unwrap_or_else(|e| e.into_inner());
        !b.is_empty() && b.contains(addr)
    }

    /// True (and counted) if events from this peer must be dropped.
    pub fn drop_from(&self, addr: &SocketAddr) -> bool {
        if self.is_blocked(addr) {
            dropped("blocked");
            return true;
        }
        false
    }

    async fn watch_block_file(self: Arc<Self>, path: PathBuf) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let text = tokio::fs::read_to_string(&path).await.unwrap_or_default();
            let set: HashSet<SocketAddr> =
                text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            let mut b = self.blocked.write().unwrap_or_else(|e| e.into_inner());
            if *b != set {
                debug!(blocked = ?set, "gossip test block list changed");
                *b = set;
            }
        }
    }

    fn slot(&self, addr: SocketAddr) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(addr).or_default().clone()
    }

    /// A connection to `addr`: the cached one if still open, else a new one.
    pub async fn connect(self: &Arc<Self>, addr: SocketAddr) -> Result<Peer, SendError> {
        if self.is_blocked(&addr) {
            return Err(SendError::Blocked);
        }
        let slot = self.slot(addr);
        let mut s = slot.lock().await;
        if let Some(p) = &s.peer {
            if p.conn.close_reason().is_none() {
                return Ok(p.clone());
            }
            s.peer = None;
        }
        if s.failed_at.is_some_and(|t| t.elapsed() < REDIAL_AFTER) {
            return Err(SendError::Backoff);
        }
        let result = async {
            let connecting = self
                .endpoint
                .connect_with(self.client.clone(), addr, COMMON_NAME)
                .map_err(|e| SendError::Connect(e.to_string()))?;
            let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                .await
                .map_err(|_| SendError::Timeout)?
                .map_err(|e| SendError::Connect(e.to_string()))?;
            self.register(conn).ok_or(SendError::NoName)
        }
        .await;
        match result {
            Ok(p) => {
                s.peer = Some(p.clone());
                s.failed_at = None;
                Ok(p)
            }
            Err(e) => {
                s.failed_at = Some(Instant::now());
                debug!(peer = %addr, reason = %e, "gossip dial failed");
                dropped("connect");
                Err(e)
            }
        }
    }

    /// The cached open connection to `addr`, if any (never dials).
    pub fn cached(&self, addr: &SocketAddr) -> Option<Peer> {
        if self.is_blocked(addr) {
            return None;
        }
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(addr)
            .cloned()?;
        let s = slot.try_lock().ok()?;
        s.peer
            .as_ref()
            .filter(|p| p.conn.close_reason().is_none())
            .cloned()
    }

    /// Names the connection after its certificate and starts its reader.
    fn register(self: &Arc<Self>, conn: quinn::Connection) -> Option<Peer> {
        let cert = tls::peer_cert(&conn)?;
        let Some(name) = tls::node_name_of(&cert) else {
            warn!(peer = %conn.remote_address(), reason = "certificate names no node", "gossip connection refused");
            conn.close(1u32.into(), b"no node name in certificate");
            dropped("certificate");
            return None;
        };
        let Some(key) = crate::netkeys::of_cert(&cert) else {
            conn.close(1u32.into(), b"certificate does not parse");
            dropped("certificate");
            return None;
        };
        let Some(slot) = self.per_name.try_take(name.clone()) else {
            warn!(peer = %conn.remote_address(), name = %name, reason = "too many connections for one node", "gossip connection refused");
            conn.close(2u32.into(), b"too many connections");
            dropped("connections_per_name");
            return None;
        };
        let peer = Peer { conn, name, key };
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.tasks.spawn(self.clone().read_loop(peer.clone(), slot));
        Some(peer)
    }

    async fn accept_loop(self: Arc<Self>) {
        loop {
            let incoming = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                i = self.endpoint.accept() => match i { Some(i) => i, None => return },
            };
            let remote = incoming.remote_address();
            if self.is_blocked(&remote) {
                dropped("blocked");
                incoming.ignore();
                continue;
            }
            if self.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                dropped("connections");
                incoming.refuse();
                continue;
            }
            let me = self.clone();
            self.tasks.spawn(async move {
                let conn = match tokio::time::timeout(CONNECT_TIMEOUT, incoming).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        warn!(peer = %remote, reason = %e, "gossip handshake failed");
                        dropped("handshake");
                        return;
                    }
                    Err(_) => {
                        warn!(peer = %remote, reason = "timeout", "gossip handshake failed");
                        dropped("handshake");
                        return;
                    }
                };
                if let Some(peer) = me.register(conn) {
                    debug!(peer = %peer.name, addr = %remote, "gossip connection accepted");
                    let slot = me.slot(remote);
                    let mut s = slot.lock().await;
                    s.peer = Some(peer);
                    s.failed_at = None;
                }
            });
        }
    }

    /// Reads the connection until it closes; `_slot` counts it against its
    /// node name meanwhile.
    async fn read_loop(self: Arc<Self>, peer: Peer, _slot: slots::Slot<String>) {
        let conn = peer.conn.clone();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                d = conn.read_datagram() => match d {
                    Ok(bytes) => {
                        count_in_bytes(bytes.len());
                        self.deliver(Event::Datagram(peer.clone(), bytes));
                    }
                    Err(_) => break,
                },
                u = conn.accept_uni() => match u {
                    Ok(mut recv) => {
                        let me = self.clone();
                        let peer = peer.clone();
                        self.tasks.spawn(async move {
                            let Ok(_reading) = me.reads.clone().acquire_owned().await else {
                                return;
                            };
                            match tokio::time::timeout(STREAM_TIMEOUT, recv.read_to_end(MAX_MESSAGE)).await {
                                Ok(Ok(bytes)) => {
                                    count_in_bytes(bytes.len());
                                    me.deliver_uni(peer, bytes);
                                }
                                Ok(Err(e)) => {
                                    debug!(peer = %peer.name, reason = %e, "gossip stream dropped");
                                    dropped("stream");
                                }
                                Err(_) => dropped("timeout"),
                            }
                        });
                    }
                    Err(_) => break,
                },
                b = conn.accept_bi() => match b {
                    Ok((send, recv)) => self.deliver(Event::Bi(peer.clone(), send, recv)),
                    Err(_) => break,
                },
            }
        }
        self.connections.fetch_sub(1, Ordering::Relaxed);
        debug!(peer = %peer.name, reason = ?conn.close_reason(), "gossip connection closed");
        // Forget the slot's connection if it is this one.
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer.addr())
            .cloned();
        if let Some(slot) = slot {
            let mut s = slot.lock().await;
            if s.peer
                .as_ref()
                .is_some_and(|p| p.conn.stable_id() == conn.stable_id())
            {
                s.peer = None;
            }
        }
    }

    fn deliver(&self, event: Event) {
        if self.events.try_send(event).is_err() {
            dropped("overload");
        }
    }

    /// Queues a stream message within the byte budget (else drops it:
    /// anti-entropy repairs what is lost).
    fn deliver_uni(&self, peer: Peer, bytes: Vec<u8>) {
        let n = bytes.len();
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > MAX_QUEUED_BYTES {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            dropped("overload");
            return;
        }
        let queued = Queued {
            bytes: n,
            total: self.queued.clone(),
        };
        self.deliver(Event::Uni(peer, bytes, queued));
    }

    /// Sends one message as a datagram, or as a stream when too large for one.
    pub async fn send_datagram(
        self: &Arc<Self>,
        addr: SocketAddr,
        bytes: Vec<u8>,
        kind: &'static str,
    ) -> Result<(), SendError> {
        let peer = self.connect(addr).await?;
        let n = bytes.len();
        if peer.conn.max_datagram_size().is_some_and(|max| n <= max) {
            peer.conn
                .send_datagram(Bytes::from(bytes))
                .map_err(|e| SendError::Stream(e.to_string()))?;
            count_out(kind, n);
            Ok(())
        } else {
            self.send_uni_on(&peer, &bytes, kind).await
        }
    }

    /// Sends one message on its own unidirectional stream.
    pub async fn send_uni(
        self: &Arc<Self>,
        addr: SocketAddr,
        bytes: &[u8],
        kind: &'static str,
    ) -> Result<(), SendError> {
        let peer = self.connect(addr).await?;
        self.send_uni_on(&peer, bytes, kind).await
    }

    /// Sends one message on its own stream and waits until the peer has
    /// acknowledged all of it (the SWIM leave at shutdown: a datagram, or
    /// data still in flight, would be dropped by the close that follows).
    pub async fn send_acknowledged(
        self: &Arc<Self>,
        addr: SocketAddr,
        bytes: &[u8],
        kind: &'static str,
    ) -> Result<(), SendError> {
        let peer = self.connect(addr).await?;
        let s = self.open_and_write(&peer, bytes, kind).await?;
        tokio::time::timeout(STREAM_TIMEOUT, s.stopped())
            .await
            .map_err(|_| SendError::Timeout)?
            .map_err(|e| SendError::Stream(e.to_string()))?;
        Ok(())
    }

    async fn send_uni_on(
        &self,
        peer: &Peer,
        bytes: &[u8],
        kind: &'static str,
    ) -> Result<(), SendError> {
        self.open_and_write(peer, bytes, kind).await.map(drop)
    }

    /// Opens a unidirectional stream, writes `bytes` and finishes it.
    async fn open_and_write(
        &self,
        peer: &Peer,
        bytes: &[u8],
        kind: &'static str,
    ) -> Result<quinn::SendStream, SendError> {
        let fut = async {
            let mut s = peer
                .conn
                .open_uni()
                .await
                .map_err(|e| SendError::Stream(e.to_string()))?;
            s.write_all(bytes)
                .await
                .map_err(|e| SendError::Stream(e.to_string()))?;
            s.finish().map_err(|e| SendError::Stream(e.to_string()))?;
            Ok::<quinn::SendStream, SendError>(s)
        };
        let s = tokio::time::timeout(STREAM_TIMEOUT, fut)
            .await
            .map_err(|_| SendError::Timeout)??;
        count_out(kind, bytes.len());
        Ok(s)
    }

    /// Opens a bidirectional stream to `addr` (anti-entropy).
    pub async fn open_bi(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<(Peer, quinn::SendStream, quinn::RecvStream), SendError> {
        let peer = self.connect(addr).await?;
        let (s, r) = tokio::time::timeout(STREAM_TIMEOUT, peer.conn.open_bi())
            .await
            .map_err(|_| SendError::Timeout)?
            .map_err(|e| SendError::Stream(e.to_string()))?;
        Ok((peer, s, r))
    }

    /// Closes every connection and waits (bounded) for the peers to be told.
    pub async fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Writes one length-prefixed frame (u32 big-endian length, then bytes).
pub async fn write_frame(
    s: &mut quinn::SendStream,
    bytes: &[u8],
    kind: &'static str,
) -> Result<(), SendError> {
    let len =
        u32::try_from(bytes.len()).map_err(|_| SendError::Stream("frame too large".into()))?;
    s.write_all(&len.to_be_bytes())
        .await
        .map_err(|e| SendError::Stream(e.to_string()))?;
    s.write_all(bytes)
        .await
        .map_err(|e| SendError::Stream(e.to_string()))?;
    count_out(kind, bytes.len() + 4);
    Ok(())
}

/// Reads one length-prefixed frame of at most [`MAX_MESSAGE`] bytes.
pub async fn read_frame(r: &mut quinn::RecvStream) -> Result<Vec<u8>, SendError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .await
        .map_err(|e| SendError::Stream(e.to_string()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        dropped("size");
        return Err(SendError::Stream(format!(
            "frame of {len} bytes is over the limit"
        )));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)
        .await
        .map_err(|e| SendError::Stream(e.to_string()))?;
    count_in_bytes(len + 4);
    Ok(buf)
}
