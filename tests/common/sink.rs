//! An SMTP server standing in for a domain's real MX. It records every
//! transaction that reached the end of DATA (envelope, raw un-dot-stuffed
//! data, peer, TLS, the reply it gave) and can be scripted: per-recipient
//! replies, a queue of replies for successive DATA commands, STARTTLS.
//!
//! Blocking std sockets, one thread per connection: the sink must be simple
//! enough to be obviously right. It reads lines up to CRLF only, so a bare
//! CR or LF sent by the node stays visible inside the recorded data.

use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::io::{LineConn, ReadLine};

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

type RcptRule = dyn Fn(&str) -> Option<String> + Send + Sync;

/// How the sink behaves. Build with `Sink::builder()`.
#[derive(Clone, Default)]
pub struct SinkBuilder {
    rcpt_rule: Option<Arc<RcptRule>>,
    data_replies: Vec<String>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl SinkBuilder {
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

    /// Replies given after successive DATA transfers, in order; `250` once
    /// they are used up.
    pub fn data_replies(mut self, replies: &[&str]) -> Self {
        self.data_replies = replies.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Offer STARTTLS with this configuration.
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Listen on `ip:port` (`port` 0 = any free port).
    pub fn start(self, ip: &str, port: u16) -> std::io::Result<Sink> {
        let ip: IpAddr = ip.parse().expect("sink IP");
        let listener = TcpListener::bind((ip, port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                txns: Vec::new(),
                connections: Vec::new(),
                rcpt_attempts: Vec::new(),
                starttls: 0,
                data_replies: self.data_replies.into_iter().collect(),
            }),
            changed: Condvar::new(),
            rcpt_rule: self.rcpt_rule,
            tls: self.tls,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let shared = shared.clone();
            let stop = stop.clone();
            thread::Builder::new()
                .name(format!("sink-{addr}"))
                .spawn(move || accept_loop(listener, shared, stop))?
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
    txns: Vec<Txn>,
    connections: Vec<SocketAddr>,
    /// Every RCPT TO seen: (address, reply line).
    rcpt_attempts: Vec<(String, String)>,
    starttls: usize,
    data_replies: VecDeque<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    rcpt_rule: Option<Arc<RcptRule>>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Sink {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Sink {
    pub fn builder() -> SinkBuilder {
        SinkBuilder::default()
    }

    /// A sink that accepts everything, on `ip` and any free port.
    pub fn start(ip: &str) -> Sink {
        Sink::builder().start(ip, 0).expect("start sink")
    }

    /// A port that was free a moment ago on `ip`, for a sink started later
    /// (the real MX is "down" until then).
    pub fn reserve_port(ip: &str) -> u16 {
        let ip: IpAddr = ip.parse().expect("IP");
        let l = TcpListener::bind((ip, 0)).expect("bind to reserve a port");
        l.local_addr().expect("local addr").port()
    }

    /// Two sinks on the same port, on two addresses (the real MX and a
    /// magic host that must never be contacted).
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
        self.shared.lock().txns.clone()
    }

    /// Transactions the sink accepted (2xx after DATA).
    pub fn messages(&self) -> Vec<Txn> {
        self.transactions()
            .into_iter()
            .filter(|t| t.accepted())
            .collect()
    }

    /// Peers of every connection accepted so far.
    pub fn connections(&self) -> Vec<SocketAddr> {
        self.shared.lock().connections.clone()
    }

    /// How many STARTTLS commands were received.
    pub fn starttls_commands(&self) -> usize {
        self.shared.lock().starttls
    }

    /// Every RCPT TO seen, in order: (address, reply line).
    pub fn all_rcpt_attempts(&self) -> Vec<(String, String)> {
        self.shared.lock().rcpt_attempts.clone()
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

    /// Waits until `pred` holds on the recorded transactions, or panics
    /// after `timeout` showing what was recorded.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[Txn]) -> bool,
    ) -> Vec<Txn> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if pred(&state.txns) {
                return state.txns.clone();
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
        self.stop.store(true, Ordering::SeqCst);
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

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                shared.lock().connections.push(peer);
                shared.changed.notify_all();
                let shared = shared.clone();
                let _ = thread::Builder::new()
                    .name(format!("sink-conn-{peer}"))
                    .spawn(move || {
                        let _ = stream.set_nonblocking(false);
                        session(stream, peer, &shared);
                    });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
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

fn session(stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let mut conn = LineConn::new(stream);
    conn.set_read_timeout(Duration::from_secs(60));
    let reply = |conn: &mut LineConn, text: &str| conn.write_all(text.as_bytes()).is_ok();
    if !reply(&mut conn, "220 sink.test ESMTP test sink\r\n") {
        return;
    }
    let mut helo = String::new();
    let mut mail: Option<(String, String)> = None;
    let mut rcpts: Vec<String> = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    loop {
        let line = match conn.read_line(b"\r\n") {
            ReadLine::Line(l) => l,
            ReadLine::Closed | ReadLine::Timeout => return,
        };
        let line = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
        let upper = line.to_ascii_uppercase();
        let verb = upper.split(' ').next().unwrap_or("").to_string();
        if verb == "STARTTLS" {
            shared.lock().starttls += 1;
        }
        let ok = match verb.as_str() {
            "EHLO" => {
                helo = line[4..].trim().to_string();
                let mut r = String::from(
                    "250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 100000000\r\n",
                );
                if shared.tls.is_some() && !conn.is_tls() {
                    r.push_str("250-STARTTLS\r\n");
                }
                r.push_str("250 ENHANCEDSTATUSCODES\r\n");
                reply(&mut conn, &r)
            }
            "HELO" => {
                helo = line[4..].trim().to_string();
                reply(&mut conn, "250 sink.test\r\n")
            }
            "STARTTLS" => match (&shared.tls, conn.is_tls()) {
                (Some(cfg), false) => {
                    if !conn.pending().is_empty() {
                        // Never carry plain-text bytes into the TLS session.
                        reply(&mut conn, "554 5.5.1 pipelined data after STARTTLS\r\n");
                        return;
                    }
                    if !reply(&mut conn, "220 2.0.0 ready to start TLS\r\n") {
                        return;
                    }
                    if conn.upgrade_server(cfg.clone()).is_err() {
                        return;
                    }
                    helo.clear();
                    mail = None;
                    rcpts.clear();
                    refused.clear();
                    true
                }
                _ => reply(&mut conn, "502 5.5.1 STARTTLS not available\r\n"),
            },
            "MAIL" if upper.starts_with("MAIL FROM:") => {
                mail = Some(parse_path(&line[10..]));
                rcpts.clear();
                refused.clear();
                reply(&mut conn, "250 2.1.0 ok\r\n")
            }
            "RCPT" if upper.starts_with("RCPT TO:") => {
                if mail.is_none() {
                    reply(&mut conn, "503 5.5.1 MAIL first\r\n")
                } else {
                    let (addr, _) = parse_path(&line[8..]);
                    let answer = shared
                        .rcpt_rule
                        .as_ref()
                        .and_then(|rule| rule(&addr))
                        .unwrap_or_else(|| "250 2.1.5 ok".to_string());
                    shared
                        .lock()
                        .rcpt_attempts
                        .push((addr.clone(), answer.clone()));
                    if answer.starts_with('2') {
                        rcpts.push(addr);
                    } else {
                        refused.push(addr);
                    }
                    reply(&mut conn, &format!("{answer}\r\n"))
                }
            }
            "DATA" => {
                if mail.is_none() || rcpts.is_empty() {
                    reply(&mut conn, "554 5.5.1 no valid recipients\r\n")
                } else {
                    if !reply(&mut conn, "354 end with <CRLF>.<CRLF>\r\n") {
                        return;
                    }
                    let mut data = Vec::new();
                    loop {
                        match conn.read_line(b"\r\n") {
                            ReadLine::Line(l) if l == b".\r\n" => break,
                            ReadLine::Line(l) => {
                                let l = if l.first() == Some(&b'.') {
                                    &l[1..]
                                } else {
                                    &l[..]
                                };
                                data.extend_from_slice(l);
                            }
                            ReadLine::Closed | ReadLine::Timeout => return,
                        }
                    }
                    let answer = {
                        let mut state = shared.lock();
                        let answer = state
                            .data_replies
                            .pop_front()
                            .unwrap_or_else(|| "250 2.0.0 ok: queued".to_string());
                        let (mail_from, mail_params) = mail.take().unwrap_or_default();
                        state.txns.push(Txn {
                            peer,
                            helo: helo.clone(),
                            tls: conn.is_tls(),
                            mail_from,
                            mail_params,
                            rcpts: std::mem::take(&mut rcpts),
                            refused: std::mem::take(&mut refused),
                            data,
                            reply: answer.clone(),
                        });
                        answer
                    };
                    shared.changed.notify_all();
                    reply(&mut conn, &format!("{answer}\r\n"))
                }
            }
            "RSET" => {
                mail = None;
                rcpts.clear();
                refused.clear();
                reply(&mut conn, "250 2.0.0 ok\r\n")
            }
            "NOOP" => reply(&mut conn, "250 2.0.0 ok\r\n"),
            "QUIT" => {
                reply(&mut conn, "221 2.0.0 bye\r\n");
                return;
            }
            _ => reply(&mut conn, "500 5.5.2 unknown command\r\n"),
        };
        if !ok {
            return;
        }
    }
}
