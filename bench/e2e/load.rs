//! The harness's own SMTP client, for what `smtp-source` cannot do: a
//! sequence number in every message (so the sink can time its arrival),
//! the exact moment each `250` came back, and source addresses bound to
//! many different loopback blocks (127.a.b.c, one /24 per block).
//!
//! Each message is one session, like `smtp-source` without `-d`: connect,
//! banner, EHLO, MAIL, RCPT, DATA, the message, `.`, QUIT. Every reply is
//! waited for (no pipelining).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

use crate::sink::SEQ_HEADER;

const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// What happened to one message.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// `250` after the data, at this instant.
    Acked(Instant),
    /// A refusal: the stage (`connect`, `mail`, `rcpt`, `data`, `end`) and the reply code.
    Refused(&'static str, u16),
    /// Connection closed, timeout, I/O error.
    Failed(String),
}

/// A 1 KB-ish message with `seq` in a header.
pub fn message(seq: u64, rcpt: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: <bench@client.test>\r\nTo: <{rcpt}>\r\nSubject: bench {seq}\r\nMessage-ID: <{seq}@client.test>\r\nDate: Mon, 23 Nov 2026 18:00:00 +0000\r\n{SEQ_HEADER}{seq}\r\n\r\n"
    )
    .into_bytes();
    let line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n";
    while m.len() < size {
        m.extend_from_slice(line);
    }
    m.extend_from_slice(b".\r\n");
    m
}

struct Conn {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
    line: String,
}

impl Conn {
    /// The code of a (possibly multi-line) reply; 0 if the server closed.
    async fn reply(&mut self) -> std::io::Result<u16> {
        loop {
            self.line.clear();
            let n = tokio::time::timeout(IO_TIMEOUT, self.r.read_line(&mut self.line))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "reply timeout")
                })??;
            if n == 0 {
                return Ok(0);
            }
            if self.line.len() < 4 || self.line.as_bytes()[3] != b'-' {
                return Ok(self
                    .line
                    .get(..3)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(999));
            }
        }
    }

    async fn cmd(&mut self, c: &[u8]) -> std::io::Result<u16> {
        self.w.write_all(c).await?;
        self.reply().await
    }
}

pub async fn connect(target: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let fut = async {
        match source {
            None => TcpStream::connect(target).await,
            Some(ip) => {
                let s = TcpSocket::new_v4()?;
                s.bind(SocketAddr::new(ip, 0))?;
                s.connect(target).await
            }
        }
    };
    tokio::time::timeout(IO_TIMEOUT, fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"))?
}

/// One message in one session.
pub async fn send_one(
    target: SocketAddr,
    source: Option<IpAddr>,
    rcpt: &str,
    body: &[u8],
) -> Outcome {
    match session(target, source, rcpt, body).await {
        Ok(o) => o,
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

async fn session(
    target: SocketAddr,
    source: Option<IpAddr>,
    rcpt: &str,
    body: &[u8],
) -> std::io::Result<Outcome> {
    let stream = connect(target, source).await?;
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut c = Conn {
        r: BufReader::new(r),
        w,
        line: String::new(),
    };
    let code = c.reply().await?;
    if code != 220 {
        return Ok(Outcome::Refused("connect", code));
    }
    let code = c.cmd(b"EHLO client.test\r\n").await?;
    if code != 250 {
        return Ok(Outcome::Refused("ehlo", code));
    }
    let code = c.cmd(b"MAIL FROM:<bench@client.test>\r\n").await?;
    if code != 250 {
        return Ok(Outcome::Refused("mail", code));
    }
    let code = c.cmd(format!("RCPT TO:<{rcpt}>\r\n").as_bytes()).await?;
    if code != 250 && code != 251 {
        let _ = c.cmd(b"QUIT\r\n").await;
        return Ok(Outcome::Refused("rcpt", code));
    }
    let code = c.cmd(b"DATA\r\n").await?;
    if code != 354 {
        return Ok(Outcome::Refused("data", code));
    }
    let code = c.cmd(body).await?;
    let now = Instant::now();
    let _ = c.cmd(b"QUIT\r\n").await;
    if code == 250 {
        Ok(Outcome::Acked(now))
    } else {
        Ok(Outcome::Refused("end", code))
    }
}

/// A closed-loop run: `concurrency` sessions at a time until `messages`
/// were tried. Message `i` has seq `first_seq + i` and comes from
/// `sources[i % len]` (the system's choice if empty).
pub struct Spec {
    pub target: SocketAddr,
    pub messages: usize,
    pub concurrency: usize,
    pub sources: Vec<IpAddr>,
    pub size: usize,
    pub first_seq: u64,
    pub rcpt: String,
}

pub struct Run {
    pub started: Instant,
    /// When the last session ended.
    pub finished: Instant,
    /// seq → ack time.
    pub acks: Vec<(u64, Instant)>,
    /// "stage code" → count.
    pub refused: BTreeMap<String, usize>,
    pub failed: usize,
    pub first_failure: Option<String>,
}

/// Outcomes as sessions end, from many tasks at once.
#[derive(Default)]
struct Tally {
    acks: Mutex<Vec<(u64, Instant)>>,
    refused: Mutex<BTreeMap<String, usize>>,
    failed: Mutex<(usize, Option<String>)>,
}

impl Tally {
    fn record(&self, seq: u64, outcome: Outcome) {
        match outcome {
            Outcome::Acked(t) => self.acks.lock().unwrap().push((seq, t)),
            Outcome::Refused(stage, code) => {
                *self
                    .refused
                    .lock()
                    .unwrap()
                    .entry(format!("{stage} {code}"))
                    .or_insert(0) += 1
            }
            Outcome::Failed(e) => {
                let mut f = self.failed.lock().unwrap();
                f.0 += 1;
                f.1.get_or_insert(e);
            }
        }
    }

    fn into_run(self, started: Instant) -> Run {
        let (failed, first_failure) = self.failed.into_inner().unwrap();
        Run {
            started,
            finished: Instant::now(),
            acks: self.acks.into_inner().unwrap(),
            refused: self.refused.into_inner().unwrap(),
            failed,
            first_failure,
        }
    }
}

/// Waits for every task, then turns the tally into a [`Run`].
async fn finish(
    tasks: Vec<tokio::task::JoinHandle<()>>,
    tally: Arc<Tally>,
    started: Instant,
) -> Run {
    for t in tasks {
        let _ = t.await;
    }
    Arc::into_inner(tally)
        .expect("every task has ended")
        .into_run(started)
}

pub async fn closed_loop(spec: Spec) -> Run {
    let spec = Arc::new(spec);
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..spec.concurrency {
        let (spec, next, tally) = (spec.clone(), next.clone(), tally.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= spec.messages {
                    return;
                }
                let seq = spec.first_seq + i as u64;
                let source =
                    (!spec.sources.is_empty()).then(|| spec.sources[i % spec.sources.len()]);
                let body = message(seq, &spec.rcpt, spec.size);
                tally.record(seq, send_one(spec.target, source, &spec.rcpt, &body).await);
            }
        }));
    }
    finish(workers, tally, started).await
}

/// Source addresses in `count` different /24 blocks: 127.B.C.1 with B
/// from `first_octet` on.
pub fn blocks(first_octet: u8, count: usize) -> Vec<IpAddr> {
    (0..count)
        .map(|i| IpAddr::from([127, first_octet + (i / 250) as u8, (i % 250) as u8 + 1, 1]))
        .collect()
}

/// An open-loop run: `messages` sessions started at `rate` per second
/// (whatever the server's pace, up to `max_open` at once), from 127.0.0.1.
pub async fn open_loop(
    target: SocketAddr,
    rate: f64,
    messages: usize,
    first_seq: u64,
    size: usize,
    rcpt: &str,
) -> Run {
    let tally = Arc::new(Tally::default());
    let sem = Arc::new(tokio::sync::Semaphore::new(200));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(messages);
    for i in 0..messages {
        tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        let permit = sem.clone().acquire_owned().await.unwrap();
        let tally = tally.clone();
        let rcpt = rcpt.to_string();
        let seq = first_seq + i as u64;
        tasks.push(tokio::spawn(async move {
            let _p = permit;
            let body = message(seq, &rcpt, size);
            tally.record(seq, send_one(target, None, &rcpt, &body).await);
        }));
    }
    finish(tasks, tally, started).await
}
