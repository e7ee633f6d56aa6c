//! An SMTP server standing in for a domain's real MX: the "real MX" of
//! `magicmx demo`, and the one sink of the tests (the crate's unit tests
//! and, through `tests/common`, the integration tests).
//!
//! It records what it saw: every connection (at accept), every session
//! once it ended (the command lines, TLS, the client certificate), every
//! transaction that reached the end of DATA (envelope, data with
//! dot-stuffing removed and as on the wire, the reply it gave) and every
//! RCPT with the reply to it. It can be
//! scripted: per-recipient replies, a queue of replies for successive DATA
//! transfers, STARTTLS (or a STARTTLS that hangs up), a refused greeting.
//!
//! Like the DNS server beside it, it runs on its own thread and runtime,
//! so sync and async callers (and tests on a paused clock) use it alike;
//! dropping it stops it. Lines are read up to CRLF only, so a bare CR or LF
//! sent by the node stays visible inside the recorded data. Bounded like
//! any listener of the node: line length, message size, connections,
//! records kept, and time per line and per session.

use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::listener::{self, Admission, Bounds};

const MAX_LINE: usize = 64 * 1024;
const LINE_TIMEOUT: Duration = Duration::from_secs(60);
const SESSION_TIMEOUT: Duration = Duration::from_secs(600);
/// Command lines kept per session; later ones are answered, not kept.
const MAX_COMMANDS: usize = 10_000;

/// One transaction that reached the end of DATA.
#[derive(Clone)]
pub struct Txn {
    pub peer: SocketAddr,
    pub helo: String,
    pub tls: bool,
    /// Reverse path without the angle brackets; empty for the null sender.
    pub mail_from: String,
    /// Parameters after `MAIL FROM:<...>`, as sent.
    pub mail_params: String,
    /// Recipients the sink accepted.
    pub rcpts: Vec<String>,
    /// Recipients the sink refused in this transaction.
    pub refused: Vec<String>,
    /// The data as received, dot-stuffing removed, up to but excluding the
    /// final `.CRLF` line (so it ends with the last line's CRLF).
    pub data: Vec<u8>,
    /// The same exactly as on the wire (dot-stuffing kept).
    pub wire_data: Vec<u8>,
    /// The reply the sink gave after the data.
    pub reply: String,
}

impl Txn {
    pub fn accepted(&self) -> bool {
        self.reply.starts_with('2')
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    /// The first `Subject:` of the header section, unfolded no further
    /// than its first line; empty without one.
    pub fn subject(&self) -> String {
        let header = self.data.split(|&b| b == b'\n').take_while(|l| l != b"\r");
        header
            .filter(|l| l.len() > 8 && l[..8].eq_ignore_ascii_case(b"subject:"))
            .map(|l| String::from_utf8_lossy(&l[8..]).trim().to_string())
            .next()
            .unwrap_or_default()
    }
}

impl fmt::Debug for Txn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head: String = self.text().chars().take(600).collect();
        f.debug_struct("Txn")
            .field("peer", &self.peer)
            .field("tls", &self.tls)
            .field("mail_from", &self.mail_from)
            .field("mail_params", &self.mail_params)
            .field("rcpts", &self.rcpts)
            .field("refused", &self.refused)
            .field("reply", &self.reply)
            .field("data_len", &self.data.len())
            .field("data_head", &head)
            .finish()
    }
}

/// One connection, recorded when it ended.
#[derive(Debug, Clone, Default)]
pub struct Session {
    pub peer: Option<SocketAddr>,
    /// Every command line (not data lines), CRLF removed, in order.
    pub commands: Vec<String>,
    /// The session went on after a successful STARTTLS.
    pub tls: bool,
    /// The client certificate presented in the handshake (DER of the leaf).
    pub client_cert: Option<Vec<u8>>,
}

type RcptRule = dyn Fn(&str) -> Option<String> + Send + Sync;

/// How the sink behaves. Build with [`Sink::builder`].
#[derive(Clone)]
pub struct SinkBuilder {
    hostname: String,
    greeting_refusal: Option<String>,
    rcpt_rule: Option<Arc<RcptRule>>,
    data_replies: Vec<String>,
    data_reply: String,
    tls: Option<Arc<rustls::ServerConfig>>,
    starttls_hangs_up: bool,
    events: Option<mpsc::UnboundedSender<Txn>>,
    max_message: usize,
    max_connections: usize,
    max_kept: usize,
}

impl Default for SinkBuilder {
    fn default() -> Self {
        SinkBuilder {
            hostname: "sink.test".into(),
            greeting_refusal: None,
            rcpt_rule: None,
            data_replies: Vec::new(),
            data_reply: "250 2.0.0 ok: queued".into(),
            tls: None,
            starttls_hangs_up: false,
            events: None,
            max_message: 100_000_000,
            max_connections: 256,
            max_kept: 10_000,
        }
    }
}

impl SinkBuilder {
    /// The name in the greeting and the EHLO reply.
    pub fn hostname(mut self, name: &str) -> Self {
        self.hostname = name.to_string();
        self
    }

    /// Greets with `reply` (e.g. `"421 4.3.2 not now"`) and hangs up.
    pub fn refuse_greeting(mut self, reply: &str) -> Self {
        self.greeting_refusal = Some(reply.to_string());
        self
    }

    /// `rule(address)` returns `Some(reply line)` to refuse a recipient
    /// (e.g. `"550 5.1.1 no such user"`), `None` to accept it.
    pub fn rcpt_rule(
        mut self,
        rule: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.rcpt_rule = Some(Arc::new(rule));
        self
    }

    /// Refuses one address (case-insensitive) with `reply`.
    pub fn refuse_rcpt(self, address: &'static str, reply: &'static str) -> Self {
        self.rcpt_rule(move |a| a.eq_ignore_ascii_case(address).then(|| reply.to_string()))
    }

    /// Replies given after successive DATA transfers, in order; the
    /// default reply ([`SinkBuilder::data_reply`]) once they are used up.
    pub fn data_replies(mut self, replies: &[&str]) -> Self {
        self.data_replies = replies.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The reply after DATA when no scripted one is left
    /// (`250 2.0.0 ok: queued` unless set).
    pub fn data_reply(mut self, reply: &str) -> Self {
        self.data_reply = reply.to_string();
        self
    }

    /// Offer STARTTLS with this configuration.
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Offer STARTTLS, answer it with `220`, and hang up (the client's
    /// handshake fails).
    pub fn starttls_hangs_up(mut self) -> Self {
        self.starttls_hangs_up = true;
        self
    }

    /// Each transaction the sink accepted is also sent here as it happens.
    pub fn events(mut self, events: mpsc::UnboundedSender<Txn>) -> Self {
        self.events = Some(events);
        self
    }

    /// The largest message taken (data bytes on the wire); the session is
    /// closed on a larger one.
    pub fn max_message(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    /// Listen on `ip:port` (`port` 0 = any free port).
    pub fn start(self, ip: &str, port: u16) -> std::io::Result<Sink> {
        let ip: IpAddr = ip.parse().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("sink address {ip:?}: {e}"),
            )
        })?;
        let listener = std::net::TcpListener::bind((ip, port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                txns: VecDeque::new(),
                sessions: VecDeque::new(),
                connections: VecDeque::new(),
                rcpt_attempts: VecDeque::new(),
                starttls: 0,
                data_replies: self.data_replies.iter().cloned().collect(),
                max_kept: self.max_kept.max(1),
            }),
            changed: Condvar::new(),
        });
        let stop = CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            let script = Arc::new(self);
            thread::Builder::new()
                .name(format!("sink-{addr}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        if let Ok(listener) = TcpListener::from_std(listener) {
                            accept_loop(listener, script, shared, stop).await;
                        }
                    })
                })?
        };
        Ok(Sink {
            addr,
            shared,
            stop,
            thread: Some(thread),
        })
    }
}

struct State {
    txns: VecDeque<Txn>,
    sessions: VecDeque<Session>,
    connections: VecDeque<SocketAddr>,
    /// Every RCPT TO seen: (address, reply line).
    rcpt_attempts: VecDeque<(String, String)>,
    starttls: usize,
    data_replies: VecDeque<String>,
    /// Records of each kind kept (the oldest go first).
    max_kept: usize,
}

/// Appends `item`, dropping the oldest beyond `max`.
fn keep<T>(list: &mut VecDeque<T>, max: usize, item: T) {
    if list.len() >= max {
        list.pop_front();
    }
    list.push_back(item);
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the state and wakes the waiters.
    fn record<T>(&self, change: impl FnOnce(&mut State) -> T) -> T {
        let out = change(&mut self.lock());
        self.changed.notify_all();
        out
    }
}

/// A running sink; stops when dropped.
pub struct Sink {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    thread: Option<thread::JoinHandle<()>>,
}

impl Sink {
    pub fn builder() -> SinkBuilder {
        SinkBuilder::default()
    }

    /// A sink that accepts everything, on `ip` and any free port. For
    /// tests: panics if it cannot listen.
    pub fn start(ip: &str) -> Sink {
        Sink::builder().start(ip, 0).expect("start sink")
    }

    /// A port that was free a moment ago on `ip`, for a sink started later
    /// (the real MX is "down" until then). For tests: panics on a bad IP.
    pub fn reserve_port(ip: &str) -> u16 {
        let ip: IpAddr = ip.parse().expect("IP");
        let l = std::net::TcpListener::bind((ip, 0)).expect("bind to reserve a port");
        l.local_addr().expect("local addr").port()
    }

    /// Two sinks on the same port, on two addresses (the real MX and a
    /// magic host that must never be contacted). For tests: panics when
    /// no port is free on both.
    pub fn pair_same_port(a: (&str, SinkBuilder), b: (&str, SinkBuilder)) -> (Sink, Sink) {
        for _ in 0..50 {
            let first = a.1.clone().start(a.0, 0).expect("start first sink");
            if let Ok(second) = b.1.clone().start(b.0, first.addr.port()) {
                return (first, second);
            }
        }
        panic!("could not bind two sinks on the same port");
    }

    /// Every transaction that reached the end of DATA, in order.
    pub fn transactions(&self) -> Vec<Txn> {
        self.shared.lock().txns.iter().cloned().collect()
    }

    /// Transactions the sink accepted (2xx after DATA).
    pub fn messages(&self) -> Vec<Txn> {
        self.transactions()
            .into_iter()
            .filter(|t| t.accepted())
            .collect()
    }

    /// Every session that ended, in the order they ended.
    pub fn sessions(&self) -> Vec<Session> {
        self.shared.lock().sessions.iter().cloned().collect()
    }

    /// Peers of every connection accepted so far.
    pub fn connections(&self) -> Vec<SocketAddr> {
        self.shared.lock().connections.iter().copied().collect()
    }

    /// How many STARTTLS commands were received.
    pub fn starttls_commands(&self) -> usize {
        self.shared.lock().starttls
    }

    /// Every RCPT TO seen, in order: (address, reply line).
    pub fn all_rcpt_attempts(&self) -> Vec<(String, String)> {
        self.shared.lock().rcpt_attempts.iter().cloned().collect()
    }

    /// How many times `address` was given in RCPT TO (accepted or not).
    pub fn rcpt_attempts(&self, address: &str) -> usize {
        self.shared
            .lock()
            .rcpt_attempts
            .iter()
            .filter(|(a, _)| a.eq_ignore_ascii_case(address))
            .count()
    }

    /// Waits (blocking the thread) until `pred` holds on the recorded
    /// transactions, or panics after `timeout` showing what was recorded.
    /// For sync tests; async ones poll [`Sink::transactions`].
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[Txn]) -> bool,
    ) -> Vec<Txn> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            let txns = state.txns.make_contiguous();
            if pred(txns) {
                return txns.to_vec();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "sink {}: timed out after {timeout:?} waiting for {what}; connections: {:?}; transactions: {:#?}",
                    self.addr, state.connections, state.txns
                );
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until at least `n` messages were accepted; returns them.
    pub fn wait_messages(&self, n: usize, timeout: Duration) -> Vec<Txn> {
        self.wait_for(timeout, &format!("{n} accepted message(s)"), |t| {
            t.iter().filter(|t| t.accepted()).count() >= n
        })
        .into_iter()
        .filter(|t| t.accepted())
        .collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if thread::panicking() {
            let s = self.shared.lock();
            eprintln!(
                "--- sink {} at failure: connections {:?}\ntransactions: {:#?}\nrcpt attempts: {:?}",
                self.addr, s.connections, s.txns, s.rcpt_attempts
            );
        }
    }
}

/// Serves on `listener` through the node's one bounded accept loop until
/// `stop`; a session still open then is cut short and recorded.
async fn accept_loop(
    listener: TcpListener,
    script: Arc<SinkBuilder>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let bounds = Bounds {
        name: "sink",
        max_connections: script.max_connections,
        busy: Some(b"421 4.3.2 too many connections\r\n"),
    };
    let admit = {
        let shared = shared.clone();
        move |peer| {
            shared.record(|s| keep(&mut s.connections, s.max_kept, peer));
            Admission::Accept(())
        }
    };
    let handle = {
        let stop = stop.clone();
        move |stream, peer| {
            let (script, shared, stop) = (script.clone(), shared.clone(), stop.clone());
            async move {
                let mut seen = Session {
                    peer: Some(peer),
                    ..Session::default()
                };
                let talk = session(stream, peer, &script, &shared, &mut seen);
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::timeout(SESSION_TIMEOUT, talk) => {}
                }
                shared.record(|s| keep(&mut s.sessions, s.max_kept, seen));
            }
        }
    };
    listener::serve(vec![listener], bounds, admit, handle, stop).await;
}

/// The transaction being built.
#[derive(Default)]
struct Envelope {
    helo: String,
    mail: Option<(String, String)>,
    rcpts: Vec<String>,
    refused: Vec<String>,
}

impl Envelope {
    fn reset(&mut self) {
        self.mail = None;
        self.rcpts.clear();
        self.refused.clear();
    }
}

/// How one conversation (before or after STARTTLS) ended.
enum End<S> {
    Closed,
    /// The client asked for STARTTLS and was told to go ahead.
    StartTls(S),
}

async fn session(
    stream: TcpStream,
    peer: SocketAddr,
    script: &SinkBuilder,
    shared: &Shared,
    seen: &mut Session,
) {
    let mut stream = stream;
    if let Some(refusal) = &script.greeting_refusal {
        let _ = stream.write_all(format!("{refusal}\r\n").as_bytes()).await;
        return;
    }
    let greeting = format!("220 {} ESMTP test sink\r\n", script.hostname);
    if stream.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let mut env = Envelope::default();
    let conv = Conversation {
        peer,
        script,
        shared,
        tls: false,
    };
    let End::StartTls(plain) = conv.run(BufReader::new(stream), &mut env, seen).await else {
        return;
    };
    let Some(config) = &script.tls else {
        return;
    };
    let Ok(tls) = tokio_rustls::TlsAcceptor::from(config.clone())
        .accept(plain)
        .await
    else {
        return;
    };
    seen.tls = true;
    seen.client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec());
    env = Envelope::default();
    let conv = Conversation { tls: true, ..conv };
    conv.run(BufReader::new(tls), &mut env, seen).await;
}

/// Reads one line ending in CRLF (a bare LF inside it is kept), of at most
/// [`MAX_LINE`] bytes; `None` at EOF, on a timeout or an over-long line.
async fn crlf_line<R: AsyncRead + Unpin>(r: &mut BufReader<R>, buf: &mut Vec<u8>) -> Option<()> {
    buf.clear();
    let deadline = tokio::time::Instant::now() + LINE_TIMEOUT;
    while !buf.ends_with(b"\r\n") {
        let room = (MAX_LINE + 1).checked_sub(buf.len()).filter(|n| *n > 0)?;
        let mut limited = (&mut *r).take(room as u64);
        let n = tokio::time::timeout_at(deadline, limited.read_until(b'\n', buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 || buf.len() > MAX_LINE {
            return None;
        }
    }
    Some(())
}

/// `<addr> params` after `MAIL FROM:` / `RCPT TO:`.
fn parse_path(arg: &str) -> (String, String) {
    let arg = arg.trim_start();
    match (arg.find('<'), arg.find('>')) {
        (Some(l), Some(r)) if l < r => (arg[l + 1..r].to_string(), arg[r + 1..].trim().to_string()),
        _ => {
            let mut it = arg.splitn(2, ' ');
            let a = it.next().unwrap_or("").to_string();
            (a, it.next().unwrap_or("").trim().to_string())
        }
    }
}

#[derive(Clone, Copy)]
struct Conversation<'a> {
    peer: SocketAddr,
    script: &'a SinkBuilder,
    shared: &'a Shared,
    tls: bool,
}

impl Conversation<'_> {
    /// Answers commands until the client leaves or STARTTLS is agreed.
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        self,
        mut conn: BufReader<S>,
        env: &mut Envelope,
        seen: &mut Session,
    ) -> End<S> {
        let mut buf = Vec::new();
        loop {
            if crlf_line(&mut conn, &mut buf).await.is_none() {
                return End::Closed;
            }
            let line = String::from_utf8_lossy(&buf[..buf.len() - 2]).into_owned();
            if seen.commands.len() < MAX_COMMANDS {
                seen.commands.push(line.clone());
            }
            let upper = line.to_ascii_uppercase();
            let verb = upper.split(' ').next().unwrap_or("");
            let reply = match verb {
                "EHLO" | "HELO" => {
                    env.helo = line[4..].trim().to_string();
                    self.ehlo(verb == "EHLO")
                }
                "STARTTLS" => {
                    self.shared.record(|s| s.starttls += 1);
                    if self.tls || (self.script.tls.is_none() && !self.script.starttls_hangs_up) {
                        "502 5.5.1 STARTTLS not available\r\n".to_string()
                    } else if !conn.buffer().is_empty() {
                        // Never carry plain-text bytes into the TLS session.
                        let _ = conn
                            .write_all(b"554 5.5.1 pipelined data after STARTTLS\r\n")
                            .await;
                        return End::Closed;
                    } else if conn
                        .write_all(b"220 2.0.0 ready to start TLS\r\n")
                        .await
                        .is_err()
                        || self.script.starttls_hangs_up
                    {
                        return End::Closed;
                    } else {
                        return End::StartTls(conn.into_inner());
                    }
                }
                "MAIL" if upper.starts_with("MAIL FROM:") => {
                    env.reset();
                    env.mail = Some(parse_path(&line[10..]));
                    "250 2.1.0 ok\r\n".to_string()
                }
                "RCPT" if upper.starts_with("RCPT TO:") => self.rcpt(env, &line[8..]),
                "DATA" if env.mail.is_none() || env.rcpts.is_empty() => {
                    "554 5.5.1 no valid recipients\r\n".to_string()
                }
                "DATA" => {
                    if conn
                        .write_all(b"354 end with <CRLF>.<CRLF>\r\n")
                        .await
                        .is_err()
                    {
                        return End::Closed;
                    }
                    let Some(reply) = self.data(&mut conn, env).await else {
                        return End::Closed;
                    };
                    reply
                }
                "RSET" => {
                    env.reset();
                    "250 2.0.0 ok\r\n".to_string()
                }
                "NOOP" => "250 2.0.0 ok\r\n".to_string(),
                "QUIT" => {
                    let _ = conn.write_all(b"221 2.0.0 bye\r\n").await;
                    return End::Closed;
                }
                _ => "500 5.5.2 unknown command\r\n".to_string(),
            };
            if conn.write_all(reply.as_bytes()).await.is_err() {
                return End::Closed;
            }
        }
    }

    fn ehlo(&self, extended: bool) -> String {
        let host = &self.script.hostname;
        if !extended {
            return format!("250 {host}\r\n");
        }
        let mut r = format!(
            "250-{host}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE {}\r\n",
            self.script.max_message
        );
        if !self.tls && (self.script.tls.is_some() || self.script.starttls_hangs_up) {
            r.push_str("250-STARTTLS\r\n");
        }
        r.push_str("250 ENHANCEDSTATUSCODES\r\n");
        r
    }

    fn rcpt(&self, env: &mut Envelope, arg: &str) -> String {
        if env.mail.is_none() {
            return "503 5.5.1 MAIL first\r\n".to_string();
        }
        let (addr, _) = parse_path(arg);
        let answer = self
            .script
            .rcpt_rule
            .as_ref()
            .and_then(|rule| rule(&addr))
            .unwrap_or_else(|| "250 2.1.5 ok".to_string());
        self.shared.record(|s| {
            keep(
                &mut s.rcpt_attempts,
                s.max_kept,
                (addr.clone(), answer.clone()),
            )
        });
        if answer.starts_with('2') {
            env.rcpts.push(addr);
        } else {
            env.refused.push(addr);
        }
        format!("{answer}\r\n")
    }

    /// Reads the data up to `.CRLF`, records the transaction and returns
    /// the reply; `None` if the client went away or sent too much.
    async fn data<S: AsyncRead + Unpin>(
        &self,
        conn: &mut BufReader<S>,
        env: &mut Envelope,
    ) -> Option<String> {
        let (mut wire, mut data, mut line) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            crlf_line(conn, &mut line).await?;
            if line == b".\r\n" {
                break;
            }
            if wire.len() + line.len() > self.script.max_message {
                return None;
            }
            wire.extend_from_slice(&line);
            data.extend_from_slice(line.strip_prefix(b".").unwrap_or(&line));
        }
        let (mail_from, mail_params) = env.mail.take().unwrap_or_default();
        let txn = self.shared.record(|s| {
            let reply = s
                .data_replies
                .pop_front()
                .unwrap_or_else(|| self.script.data_reply.clone());
            let txn = Txn {
                peer: self.peer,
                helo: env.helo.clone(),
                tls: self.tls,
                mail_from,
                mail_params,
                rcpts: std::mem::take(&mut env.rcpts),
                refused: std::mem::take(&mut env.refused),
                data,
                wire_data: wire,
                reply,
            };
            keep(&mut s.txns, s.max_kept, txn.clone());
            txn
        });
        env.reset();
        let reply = format!("{}\r\n", txn.reply);
        if let (Some(events), true) = (&self.script.events, txn.accepted()) {
            let _ = events.send(txn);
        }
        Some(reply)
    }
}
