//! The domain's "real MX": a minimal, fast SMTP sink on 127.0.0.1.
//!
//! It speaks just enough ESMTP for Postfix's and magicmx's SMTP clients
//! (EHLO with PIPELINING and 8BITMIME, MAIL, RCPT, DATA, RSET, NOOP, QUIT),
//! accepts everything, keeps nothing but, per message, the time the final
//! `.` arrived, keyed by the `X-Bench-Seq:` header the load generator puts
//! in every message. Messages without that header (from `smtp-source`) are
//! only counted. Replies are flushed only when no pipelined input is
//! waiting, so a pipelining client gets them in one write.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

pub const SEQ_HEADER: &str = "X-Bench-Seq: ";

#[derive(Default)]
pub struct SinkState {
    /// seq → arrival time at the sink.
    arrivals: Mutex<HashMap<u64, Instant>>,
    /// Per message, in arrival order: milliseconds from the `354` reply to
    /// the final `.` (the DATA phase). A client that writes the end of data
    /// in a separate small write with Nagle's algorithm on waits here for
    /// this side's delayed ACK (about 40 ms on Linux).
    dot_gaps: Mutex<Vec<(Instant, f64)>>,
    /// Every message, labelled or not.
    pub total: AtomicU64,
    /// Messages without a sequence header.
    pub unlabelled: AtomicU64,
}

impl SinkState {
    pub fn arrival(&self, seq: u64) -> Option<Instant> {
        self.arrivals.lock().unwrap().get(&seq).copied()
    }

    /// Arrivals whose seq is in `range`.
    pub fn arrivals_in(&self, range: std::ops::Range<u64>) -> Vec<(u64, Instant)> {
        self.arrivals
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| range.contains(s))
            .map(|(s, t)| (*s, *t))
            .collect()
    }

    /// Dot gaps of the messages that arrived after `since`.
    pub fn dot_gaps_since(&self, since: Instant) -> Vec<f64> {
        self.dot_gaps
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t >= since)
            .map(|(_, g)| *g)
            .collect()
    }

    pub fn count_in(&self, range: std::ops::Range<u64>) -> usize {
        self.arrivals
            .lock()
            .unwrap()
            .keys()
            .filter(|s| range.contains(s))
            .count()
    }
}

pub struct Sink {
    pub addr: SocketAddr,
    pub state: Arc<SinkState>,
}

impl Sink {
    pub async fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(SinkState::default());
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, s).await;
                });
            }
        });
        Sink { addr, state }
    }
}

async fn serve(stream: TcpStream, state: Arc<SinkState>) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut r = BufReader::with_capacity(32 * 1024, r);
    let mut w = BufWriter::with_capacity(4 * 1024, w);
    w.write_all(b"220 sink.bench.test ESMTP\r\n").await?;
    w.flush().await?;
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        match &verb[..] {
            b"EHLO" => {
                w.write_all(b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES\r\n")
                    .await?
            }
            b"HELO" => w.write_all(b"250 sink.bench.test\r\n").await?,
            b"MAIL" => w.write_all(b"250 2.1.0 Ok\r\n").await?,
            b"RCPT" => w.write_all(b"250 2.1.5 Ok\r\n").await?,
            b"RSET" | b"NOOP" => w.write_all(b"250 2.0.0 Ok\r\n").await?,
            b"QUIT" => {
                w.write_all(b"221 2.0.0 Bye\r\n").await?;
                w.flush().await?;
                return Ok(());
            }
            b"DATA" => {
                w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
                w.flush().await?;
                let mut seq = None;
                let mut in_headers = true;
                let data_start = Instant::now();
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" {
                        break;
                    }
                    if in_headers {
                        if line == b"\r\n" {
                            in_headers = false;
                        } else if line.starts_with(SEQ_HEADER.as_bytes()) {
                            seq = std::str::from_utf8(&line[SEQ_HEADER.len()..])
                                .ok()
                                .and_then(|s| s.trim().parse::<u64>().ok());
                        }
                    }
                }
                let now = Instant::now();
                let gap = now.duration_since(data_start).as_secs_f64() * 1000.0;
                state.dot_gaps.lock().unwrap().push((now, gap));
                state.total.fetch_add(1, Ordering::Relaxed);
                match seq {
                    Some(seq) => {
                        state.arrivals.lock().unwrap().entry(seq).or_insert(now);
                    }
                    None => {
                        state.unlabelled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                w.write_all(b"250 2.0.0 Ok: queued\r\n").await?;
            }
            _ => w.write_all(b"502 5.5.2 Error: command not recognized\r\n").await?,
        }
        if r.buffer().is_empty() {
            w.flush().await?;
        }
    }
}
