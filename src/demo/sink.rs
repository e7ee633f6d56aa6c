//! The demo's "real MX": a small SMTP server that accepts every message
//! and keeps its envelope and subject, so the demo can say what arrived.
//! Bounded like any listener of the node: lines, messages and connections.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

const MAX_LINE: usize = 4096;
const MAX_MESSAGE: usize = 1 << 20;
const MAX_CONNECTIONS: usize = 64;
const TIMEOUT: Duration = Duration::from_secs(30);

/// A message the sink accepted.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub sender: String,
    pub recipients: Vec<String>,
    pub subject: String,
}

/// A running sink.
pub struct MailSink {
    pub addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
}

impl MailSink {
    /// Listens on `ip:0` until `shutdown`; each arrival is also sent to
    /// `events` as it happens.
    pub async fn start(
        ip: &str,
        events: mpsc::UnboundedSender<Arrival>,
        shutdown: CancellationToken,
    ) -> std::io::Result<MailSink> {
        let listener = TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let kept = arrivals.clone();
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(s) => s,
                        Err(_) => continue,
                    },
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let (kept, events) = (kept.clone(), events.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = tokio::time::timeout(
                        TIMEOUT * 4,
                        session(stream, |a| {
                            kept.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(a.clone());
                            let _ = events.send(a);
                        }),
                    )
                    .await;
                });
            }
        });
        Ok(MailSink { addr, arrivals })
    }

    /// Everything accepted so far.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes; `None` at EOF, on a
/// timeout or an over-long line.
async fn line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Option<()> {
    use tokio::io::AsyncReadExt;
    buf.clear();
    let mut limited = r.take(MAX_LINE as u64);
    let n = tokio::time::timeout(TIMEOUT, limited.read_until(b'\n', buf))
        .await
        .ok()?
        .ok()?;
    (n > 0 && buf.ends_with(b"\n")).then_some(())
}

async fn session(stream: tokio::net::TcpStream, mut arrived: impl FnMut(Arrival)) -> Option<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut buf = Vec::new();
    write
        .write_all(b"220 mx.demo.test ESMTP demo sink\r\n")
        .await
        .ok()?;
    let (mut sender, mut recipients) = (String::new(), Vec::new());
    loop {
        line(&mut read, &mut buf).await?;
        let text = String::from_utf8_lossy(&buf).trim_end().to_string();
        let verb = text
            .split([' ', ':'])
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-mx.demo.test\r\n250 PIPELINING\r\n",
            "HELO" => b"250 mx.demo.test\r\n",
            "MAIL" => {
                sender = address(&text);
                recipients.clear();
                b"250 2.1.0 Ok\r\n"
            }
            "RCPT" => {
                recipients.push(address(&text));
                b"250 2.1.5 Ok\r\n"
            }
            "DATA" => {
                write
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await
                    .ok()?;
                let mut subject = String::new();
                let mut size = 0;
                loop {
                    line(&mut read, &mut buf).await?;
                    if buf == b".\r\n" {
                        break;
                    }
                    size += buf.len();
                    if size > MAX_MESSAGE {
                        return None;
                    }
                    if subject.is_empty()
                        && buf.len() > 9
                        && buf[..9].eq_ignore_ascii_case(b"subject: ")
                    {
                        subject = String::from_utf8_lossy(&buf[9..]).trim_end().to_string();
                    }
                }
                arrived(Arrival {
                    sender: std::mem::take(&mut sender),
                    recipients: std::mem::take(&mut recipients),
                    subject,
                });
                b"250 2.0.0 Ok: queued\r\n"
            }
            "RSET" => {
                sender.clear();
                recipients.clear();
                b"250 2.0.0 Ok\r\n"
            }
            "NOOP" => b"250 2.0.0 Ok\r\n",
            "QUIT" => {
                let _ = write.write_all(b"221 2.0.0 Bye\r\n").await;
                return Some(());
            }
            _ => b"502 5.5.2 Error: command not recognized\r\n",
        };
        write.write_all(reply).await.ok()?;
    }
}

/// The address between `<` and `>` of a MAIL or RCPT command.
fn address(command: &str) -> String {
    command
        .split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(a, _)| a.to_string())
        .unwrap_or_default()
}
