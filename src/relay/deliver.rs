//! One delivery attempt of one message to one domain's recipients.
//!
//! Input: the ordered MX hosts from route planning, the recipients of one
//! domain, the envelope and the stored body. Output: one [`RcptOutcome`] per
//! recipient, as data: delivery failures are never errors here.
//!
//! The SMTP client is lettre's low-level `AsyncSmtpConnection`, driven
//! command by command so that every RCPT gets its own reply (lettre's
//! transport stops at the first refused recipient). For each host, each
//! address is tried in turn: connect and EHLO; opportunistic STARTTLS without
//! certificate checks (like Postfix's `may`), and if the TLS handshake fails,
//! one reconnect in plain text; MAIL FROM (BODY=8BITMIME, SMTPUTF8 when the
//! envelope has them); one RCPT per recipient; DATA only if a recipient was
//! accepted; the body. The next address or host is tried only while no
//! recipient has been settled by a reply for the remaining ones: on a
//! connection error, a refused greeting or a `421`. Once the end of data has
//! been sent, a lost reply is a temporary failure, never a retry elsewhere
//! (the message may have been delivered).
//!
//! Each session runs in its own task, so that even a panic inside the SMTP
//! client on a malformed server reply only fails that session.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Quit, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use lettre::Address;
use tracing::{debug, info, instrument, warn, Instrument};

use crate::config::{Config, RelayTls};
use crate::dns::{Dns, DnsError};

/// The result for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The remote server took responsibility (its reply to the end of data).
    Delivered(String),
    /// Try again later (4xx, network error, timeout).
    TempFail(String),
    /// Give up and report (5xx, or an address that cannot be sent).
    PermFail(String),
}

impl RcptOutcome {
    pub fn reply(&self) -> &str {
        match self {
            RcptOutcome::Delivered(r) | RcptOutcome::TempFail(r) | RcptOutcome::PermFail(r) => r,
        }
    }
}

/// A recipient's outcome and the MX host that gave it (None: decided locally).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptResult {
    pub outcome: RcptOutcome,
    pub mx: Option<String>,
}

/// What a delivery attempt needs to know about the message.
#[derive(Debug, Clone)]
pub struct Message {
    pub queue_id: String,
    /// Envelope sender, "" for the null sender.
    pub sender: String,
    pub smtputf8: bool,
    pub eight_bit: bool,
    /// The body as stored: CRLF line endings, ends with CRLF unless empty.
    pub body: Arc<[u8]>,
}

/// Most connections one attempt makes (over all hosts and addresses).
const MAX_CONNECTIONS: usize = 6;
/// QUIT is a courtesy: do not wait long for its reply.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Delivers `msg` to `recipients` (all of one domain) through `hosts`, in
/// order. Returns one result per recipient, in the same order.
#[instrument(name = "deliver", skip_all, fields(queue_id = %msg.queue_id, domain = %domain))]
pub async fn deliver(
    config: &Config,
    dns: &Dns,
    msg: &Message,
    domain: &str,
    hosts: &[String],
    recipients: &[String],
) -> Vec<RcptResult> {
    let mut results: Vec<Option<RcptResult>> = vec![None; recipients.len()];
    let local = |o: RcptOutcome| RcptResult {
        outcome: o,
        mx: None,
    };

    let sender = if msg.sender.is_empty() {
        None
    } else {
        match Address::from_str(&msg.sender) {
            Ok(a) => Some(a),
            Err(e) => {
                let reply = format!("5.1.7 bad sender address syntax <{}>: {e}", msg.sender);
                return vec![local(RcptOutcome::PermFail(reply)); recipients.len()];
            }
        }
    };
    let mut pending: Vec<(usize, Address)> = Vec::new();
    for (i, rcpt) in recipients.iter().enumerate() {
        match Address::from_str(rcpt) {
            Ok(a) => pending.push((i, a)),
            Err(e) => {
                results[i] = Some(local(RcptOutcome::PermFail(format!(
                    "5.1.3 bad recipient address syntax <{rcpt}>: {e}"
                ))))
            }
        }
    }

    let params = Arc::new(SessionParams {
        port: config.relay.port,
        hello: ClientId::Domain(config.node.hostname.clone()),
        tls: config.relay.tls,
        connect_timeout: config.relay.connect_timeout.0,
        command_timeout: config.relay.command_timeout.0,
        sender,
        smtputf8: msg.smtputf8,
        eight_bit: msg.eight_bit,
        body: msg.body.clone(),
    });

    let mut last_error = format!("4.4.4 no MX host of {domain} could be tried");
    let mut connections = 0;
    'hosts: for host in hosts {
        if pending.is_empty() {
            break;
        }
        let ips = match dns.addresses(host).await {
            Ok(ips) if !ips.is_empty() => ips,
            Ok(_) => {
                last_error = format!("4.4.4 MX host {host} has no address");
                debug!(mx = %host, "no address");
                continue;
            }
            Err(DnsError::NoDomain(_)) => {
                last_error = format!("4.4.4 MX host {host} does not exist");
                debug!(mx = %host, "no such host");
                continue;
            }
            Err(e) => {
                last_error = format!("4.4.3 address lookup of MX host {host} failed: {e}");
                debug!(mx = %host, error = %e, "address lookup failed");
                continue;
            }
        };
        for ip in ips {
            if connections >= MAX_CONNECTIONS || pending.is_empty() {
                break 'hosts;
            }
            if config.relay.is_denied(ip) {
                warn!(mx = %host, %ip, "MX address is in relay.deny_networks; not contacted");
                last_error =
                    format!("4.4.4 MX host {host} has address {ip}, in relay.deny_networks");
                continue;
            }
            connections += 1;
            let rcpts = std::mem::take(&mut pending);
            let task = tokio::spawn(
                session(params.clone(), host.clone(), ip, rcpts.clone()).in_current_span(),
            );
            let end = match task.await {
                Ok(end) => end,
                Err(e) => {
                    warn!(mx = %host, %ip, error = %e, "SMTP session task failed");
                    SessionEnd {
                        settled: Vec::new(),
                        unsettled: rcpts,
                        reason: format!("4.4.2 SMTP session with {host}[{ip}] failed: {e}"),
                    }
                }
            };
            for (i, outcome) in end.settled {
                results[i] = Some(RcptResult {
                    outcome,
                    mx: Some(host.clone()),
                });
            }
            pending = end.unsettled;
            if !pending.is_empty() {
                info!(mx = %host, %ip, reason = %end.reason, "trying next MX address");
                last_error = end.reason;
            }
        }
    }
    // Whatever no reply settled (all addresses failed, or too many tried).
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| local(RcptOutcome::TempFail(last_error.clone()))))
        .collect()
}

/// The body to hand to lettre: lettre appends `CRLF . CRLF` itself, so the
/// stored body's final CRLF (always there unless the body is empty) goes.
pub fn body_for_data(body: &[u8]) -> &[u8] {
    body.strip_suffix(b"\r\n").unwrap_or(body)
}

/// True if `body` has a CR not followed by LF or an LF not preceded by CR.
pub fn has_bare_cr_or_lf(body: &[u8]) -> bool {
    let mut prev_cr = false;
    for &b in body {
        match b {
            b'\n' if !prev_cr => return true,
            _ if prev_cr && b != b'\n' => return true,
            _ => {}
        }
        prev_cr = b == b'\r';
    }
    prev_cr
}

struct SessionParams {
    port: u16,
    hello: ClientId,
    tls: RelayTls,
    connect_timeout: Duration,
    command_timeout: Duration,
    sender: Option<Address>,
    smtputf8: bool,
    eight_bit: bool,
    body: Arc<[u8]>,
}

/// How one SMTP session ended.
struct SessionEnd {
    /// Recipients whose fate a reply decided.
    settled: Vec<(usize, RcptOutcome)>,
    /// Recipients still open: another address may take them.
    unsettled: Vec<(usize, Address)>,
    /// Why the session could not settle them.
    reason: String,
}

type Conn = AsyncSmtpConnection;

/// A reply, or why there is none.
enum Reply {
    /// 2xx/3xx.
    Positive(String),
    /// 4xx/5xx, with the full reply text.
    Negative { code: u16, text: String },
    /// Network error, timeout, unparseable reply.
    Broken(String),
}

/// Runs a command with a timeout and sorts the result.
async fn run<F>(timeout: Duration, fut: F) -> Reply
where
    F: std::future::Future<Output = Result<Response, lettre::transport::smtp::Error>>,
{
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Reply::Broken("timed out".into()),
        Ok(Ok(resp)) => Reply::Positive(response_text(&resp)),
        Ok(Err(e)) => sort_error(&e),
    }
}

fn sort_error(e: &lettre::transport::smtp::Error) -> Reply {
    match e.status() {
        Some(code) => {
            let code = u16::from(code);
            let text = std::error::Error::source(e)
                .map(|s| s.to_string())
                .unwrap_or_default();
            Reply::Negative {
                code,
                text: one_line(&format!("{code} {text}")),
            }
        }
        None => Reply::Broken(one_line(&e.to_string())),
    }
}

fn response_text(resp: &Response) -> String {
    let code = u16::from(resp.code());
    let lines: Vec<&str> = resp.message().collect();
    one_line(&format!("{code} {}", lines.join(" ")))
}

/// Replies are stored and put into DSNs: one line, bounded.
fn one_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string();
    if out.len() > 900 {
        let mut cut = 900;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

async fn connect(p: &SessionParams, ip: IpAddr) -> Result<Conn, Reply> {
    let tcp = match tokio::time::timeout(
        p.connect_timeout,
        tokio::net::TcpStream::connect((ip, p.port)),
    )
    .await
    {
        Err(_) => return Err(Reply::Broken("connection timed out".into())),
        Ok(Err(e)) => return Err(Reply::Broken(e.to_string())),
        Ok(Ok(tcp)) => tcp,
    };
    // lettre writes the body and the final `.` in separate writes; with
    // Nagle's algorithm on, the final `.` waits for the real MX's delayed
    // ACK (about 40 ms on Linux) on every message.
    let _ = tcp.set_nodelay(true);
    // Greeting and EHLO are not covered by the connect timeout.
    let limit = p.command_timeout.saturating_mul(2);
    let fut = AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &p.hello);
    match tokio::time::timeout(limit, fut).await {
        Err(_) => Err(Reply::Broken("timed out".into())),
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(sort_error(&e)),
    }
}

async fn session(
    p: Arc<SessionParams>,
    host: String,
    ip: IpAddr,
    rcpts: Vec<(usize, Address)>,
) -> SessionEnd {
    let peer = format!("{host}[{ip}]:{}", p.port);
    let retry = |rcpts: Vec<(usize, Address)>, settled, reason: String| SessionEnd {
        settled,
        unsettled: rcpts,
        reason,
    };

    let mut conn = match connect(&p, ip).await {
        Ok(c) => c,
        Err(Reply::Negative { text, .. }) => {
            return retry(
                rcpts,
                Vec::new(),
                format!("4.4.1 {peer} refused to talk: {text}"),
            )
        }
        Err(Reply::Broken(e) | Reply::Positive(e)) => {
            return retry(rcpts, Vec::new(), format!("4.4.1 connect to {peer}: {e}"))
        }
    };

    if p.tls == RelayTls::Opportunistic && conn.can_starttls() {
        match starttls(&p, &host, &mut conn).await {
            Ok(()) => debug!(mx = %host, %ip, "STARTTLS done"),
            Err(e) => {
                warn!(mx = %host, %ip, error = %e, "STARTTLS failed, reconnecting without TLS");
                drop(conn);
                conn = match connect(&p, ip).await {
                    Ok(c) => c,
                    Err(Reply::Negative { text, .. }) => {
                        return retry(
                            rcpts,
                            Vec::new(),
                            format!("4.4.1 {peer} refused to talk: {text}"),
                        )
                    }
                    Err(Reply::Broken(e) | Reply::Positive(e)) => {
                        return retry(rcpts, Vec::new(), format!("4.4.1 connect to {peer}: {e}"))
                    }
                };
            }
        }
    }

    let end = transaction(&p, &peer, &mut conn, rcpts).await;
    if !conn.has_broken() {
        let _ = tokio::time::timeout(QUIT_TIMEOUT, conn.command(Quit)).await;
    }
    end
}

async fn starttls(p: &SessionParams, host: &str, conn: &mut Conn) -> Result<(), String> {
    // rustls wants a DNS name or an IP address, not `[192.0.2.1]`.
    let name = crate::dns::ip_literal(host).map_or_else(|| host.to_string(), |ip| ip.to_string());
    let tls = TlsParameters::builder(name)
        .dangerous_accept_invalid_certs(true)
        .dangerous_accept_invalid_hostnames(true)
        .build_rustls()
        .map_err(|e| e.to_string())?;
    let limit = p.command_timeout.saturating_mul(3);
    match tokio::time::timeout(limit, conn.starttls(tls, &p.hello)).await {
        Err(_) => Err("timed out".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(())) => Ok(()),
    }
}

/// MAIL, RCPT, DATA, body on an open connection.
async fn transaction(
    p: &SessionParams,
    peer: &str,
    conn: &mut Conn,
    rcpts: Vec<(usize, Address)>,
) -> SessionEnd {
    let info = conn.server_info().clone();
    let mut mail_params = Vec::new();
    if p.smtputf8 {
        let needs_utf8 = p.sender.as_ref().is_some_and(|a| !a.to_string().is_ascii())
            || rcpts.iter().any(|(_, a)| !a.to_string().is_ascii());
        if info.supports_feature(Extension::SmtpUtfEight) {
            mail_params.push(MailParameter::SmtpUtfEight);
        } else if needs_utf8 {
            let reply = format!("5.6.7 {peer} does not support SMTPUTF8, needed for this message");
            return SessionEnd {
                settled: rcpts
                    .into_iter()
                    .map(|(i, _)| (i, RcptOutcome::PermFail(reply.clone())))
                    .collect(),
                unsettled: Vec::new(),
                reason: reply,
            };
        }
    }
    if p.eight_bit && info.supports_feature(Extension::EightBitMime) {
        // Without 8BITMIME the body goes as is, like Postfix does by default.
        mail_params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    let t = p.command_timeout;

    let all = |rcpts: Vec<(usize, Address)>, o: RcptOutcome| SessionEnd {
        settled: rcpts.into_iter().map(|(i, _)| (i, o.clone())).collect(),
        unsettled: Vec::new(),
        reason: o.reply().to_string(),
    };

    match run(t, conn.command(Mail::new(p.sender.clone(), mail_params))).await {
        Reply::Positive(_) => {}
        Reply::Negative { code: 421, text } => {
            return SessionEnd {
                settled: Vec::new(),
                unsettled: rcpts,
                reason: format!("4.4.2 {peer} closed the session: {text}"),
            }
        }
        Reply::Negative { code, text } if code >= 500 => {
            return all(rcpts, RcptOutcome::PermFail(text))
        }
        Reply::Negative { text, .. } => return all(rcpts, RcptOutcome::TempFail(text)),
        Reply::Broken(e) => {
            return SessionEnd {
                settled: Vec::new(),
                unsettled: rcpts,
                reason: format!("4.4.2 lost connection with {peer} while sending MAIL FROM: {e}"),
            }
        }
    }

    let mut settled = Vec::new();
    let mut accepted: Vec<(usize, Address)> = Vec::new();
    let mut rest = rcpts.into_iter();
    while let Some((i, addr)) = rest.next() {
        match run(t, conn.command(Rcpt::new(addr.clone(), Vec::new()))).await {
            Reply::Positive(_) => accepted.push((i, addr)),
            Reply::Negative { code: 421, text } => {
                let mut unsettled = accepted;
                unsettled.push((i, addr));
                unsettled.extend(rest);
                return SessionEnd {
                    settled,
                    unsettled,
                    reason: format!("4.4.2 {peer} closed the session: {text}"),
                };
            }
            Reply::Negative { code, text } if code >= 500 => {
                settled.push((i, RcptOutcome::PermFail(text)))
            }
            Reply::Negative { text, .. } => settled.push((i, RcptOutcome::TempFail(text))),
            Reply::Broken(e) => {
                let mut unsettled = accepted;
                unsettled.push((i, addr));
                unsettled.extend(rest);
                return SessionEnd {
                    settled,
                    unsettled,
                    reason: format!("4.4.2 lost connection with {peer} while sending RCPT TO: {e}"),
                };
            }
        }
    }
    if accepted.is_empty() {
        return SessionEnd {
            settled,
            unsettled: Vec::new(),
            reason: String::new(),
        };
    }

    match run(t, conn.command(Data)).await {
        Reply::Positive(_) => {}
        Reply::Negative { code: 421, text } => {
            return SessionEnd {
                settled,
                unsettled: accepted,
                reason: format!("4.4.2 {peer} closed the session: {text}"),
            }
        }
        Reply::Negative { code, text } => {
            let o = if code >= 500 {
                RcptOutcome::PermFail(text)
            } else {
                RcptOutcome::TempFail(text)
            };
            settled.extend(accepted.into_iter().map(|(i, _)| (i, o.clone())));
            return SessionEnd {
                settled,
                unsettled: Vec::new(),
                reason: String::new(),
            };
        }
        Reply::Broken(e) => {
            return SessionEnd {
                settled,
                unsettled: accepted,
                reason: format!("4.4.2 lost connection with {peer} while sending DATA: {e}"),
            }
        }
    }

    // From here on the server may have the message: whatever happens, the
    // accepted recipients are settled by this session.
    let body = body_for_data(&p.body);
    let o = match run(t, conn.message(body)).await {
        Reply::Positive(text) => RcptOutcome::Delivered(text),
        Reply::Negative { code, text } if code >= 500 => RcptOutcome::PermFail(text),
        Reply::Negative { text, .. } => RcptOutcome::TempFail(text),
        Reply::Broken(e) => RcptOutcome::TempFail(format!(
            "4.4.2 lost connection with {peer} after sending the message: {e}"
        )),
    };
    settled.extend(accepted.into_iter().map(|(i, _)| (i, o.clone())));
    SessionEnd {
        settled,
        unsettled: Vec::new(),
        reason: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::testutil::{sink, tls_acceptor, Mode};

    #[test]
    fn one_trailing_crlf_is_stripped() {
        assert_eq!(body_for_data(b"a\r\nb\r\n"), b"a\r\nb");
        assert_eq!(body_for_data(b"a\r\n\r\n"), b"a\r\n");
        assert_eq!(body_for_data(b""), b"");
        assert_eq!(body_for_data(b"no newline"), b"no newline");
    }

    #[test]
    fn bare_cr_and_lf_are_found() {
        assert!(!has_bare_cr_or_lf(b"a\r\nb\r\n"));
        assert!(!has_bare_cr_or_lf(b""));
        assert!(has_bare_cr_or_lf(b"a\nb\r\n"));
        assert!(has_bare_cr_or_lf(b"a\rb\r\n"));
        assert!(has_bare_cr_or_lf(b"a\r\n\r"));
        assert!(has_bare_cr_or_lf(b"\n"));
    }

    fn config(port: u16) -> Config {
        config_tls(port, "none")
    }

    fn config_tls(port: u16, tls: &str) -> Config {
        let c = Config::parse(&format!(
            "[node]\nname = \"n1\"\nhostname = \"mx1.magic.test\"\n[relay]\nport = {port}\ndeny_networks = []\nconnect_timeout = \"2s\"\ncommand_timeout = \"5s\"\ntls = \"{tls}\"\n[dns]\nnameservers = [\"127.0.0.1:9\"]\ntimeout = \"1s\"\n"
        ))
        .unwrap();
        c.validate().unwrap();
        c
    }

    fn message(sender: &str, body: &[u8]) -> Message {
        Message {
            queue_id: "Q1".into(),
            sender: sender.into(),
            smtputf8: false,
            eight_bit: true,
            body: Arc::from(body),
        }
    }

    #[tokio::test]
    async fn per_recipient_outcomes_and_exact_body() {
        let (port, sessions) = sink("127.0.0.1:0", Mode::Plain).await;
        let c = config(port);
        let dns = Dns::new(&c.dns).unwrap();
        let body = b"Subject: t\r\n\r\n.leading dot\r\nlast line\r\n";
        let rcpts: Vec<String> = [
            "ok@example.org",
            "bad@example.org",
            "later@example.org",
            "not an address",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = deliver(
            &c,
            &dns,
            &message("alice@example.com", body),
            "example.org",
            &["127.0.0.1".to_string()],
            &rcpts,
        )
        .await;
        assert_eq!(out.len(), 4);
        assert_eq!(
            out[0].outcome,
            RcptOutcome::Delivered("250 2.0.0 queued as X1".into())
        );
        assert_eq!(out[0].mx.as_deref(), Some("127.0.0.1"));
        assert_eq!(
            out[1].outcome,
            RcptOutcome::PermFail("550 5.1.1 no such user".into())
        );
        assert_eq!(
            out[2].outcome,
            RcptOutcome::TempFail("450 4.2.0 try later".into())
        );
        assert!(matches!(&out[3].outcome, RcptOutcome::PermFail(r) if r.starts_with("5.1.3 ")));
        assert_eq!(out[3].mx, None);

        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = sessions.lock().unwrap().clone();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].commands[0], "EHLO mx1.magic.test");
        assert_eq!(
            s[0].commands[1],
            "MAIL FROM:<alice@example.com> BODY=8BITMIME"
        );
        // Dot-stuffed on the wire, trailing CRLF not doubled.
        assert_eq!(
            s[0].data,
            b"Subject: t\r\n\r\n..leading dot\r\nlast line\r\n"
        );
        assert!(s[0].commands.iter().any(|c| c == "QUIT"));
    }

    #[tokio::test]
    async fn null_sender_and_no_data_without_accepted_rcpt() {
        let (port, sessions) = sink("127.0.0.1:0", Mode::Plain).await;
        let c = config(port);
        let dns = Dns::new(&c.dns).unwrap();
        let out = deliver(
            &c,
            &dns,
            &message("", b"x\r\n"),
            "example.org",
            &["127.0.0.1".to_string()],
            &["bad@example.org".to_string()],
        )
        .await;
        assert!(matches!(&out[0].outcome, RcptOutcome::PermFail(_)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = sessions.lock().unwrap().clone();
        assert_eq!(s[0].commands[1], "MAIL FROM:<> BODY=8BITMIME");
        assert!(!s[0].commands.iter().any(|c| c == "DATA"));
    }

    #[tokio::test]
    async fn refused_greeting_and_dead_hosts_are_temporary() {
        let (port, _) = sink("127.0.0.1:0", Mode::Refuse).await;
        let c = config(port);
        let dns = Dns::new(&c.dns).unwrap();
        // 127.0.0.3: nothing listens there, the connection is refused.
        let out = deliver(
            &c,
            &dns,
            &message("a@example.com", b"x\r\n"),
            "example.org",
            &["127.0.0.1".to_string(), "127.0.0.3".to_string()],
            &["ok@example.org".to_string()],
        )
        .await;
        match &out[0].outcome {
            RcptOutcome::TempFail(r) => assert!(r.starts_with("4.4.1 connect to 127.0.0.3"), "{r}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(out[0].mx, None);
    }

    #[tokio::test]
    async fn next_host_after_a_refused_greeting_or_connection() {
        let (port, sessions) = sink("127.0.0.1:0", Mode::Plain).await;
        let (_, refused) = sink(&format!("127.0.0.2:{port}"), Mode::Refuse).await;
        let c = config(port);
        let dns = Dns::new(&c.dns).unwrap();
        let out = deliver(
            &c,
            &dns,
            &message("a@example.com", b"x\r\n"),
            "example.org",
            &["127.0.0.3".into(), "127.0.0.2".into(), "127.0.0.1".into()],
            &["ok@example.org".to_string()],
        )
        .await;
        assert!(
            matches!(&out[0].outcome, RcptOutcome::Delivered(_)),
            "{out:?}"
        );
        assert_eq!(out[0].mx.as_deref(), Some("127.0.0.1"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(sessions.lock().unwrap().len(), 1);
        assert_eq!(refused.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn opportunistic_starttls_without_verification() {
        let (port, sessions) = sink("127.0.0.1:0", Mode::StartTls(Some(tls_acceptor()))).await;
        let c = config_tls(port, "opportunistic");
        let dns = Dns::new(&c.dns).unwrap();
        // The certificate is self-signed and for "localhost": accepted anyway.
        let out = deliver(
            &c,
            &dns,
            &message("a@example.com", b"S: t\r\n\r\nbody\r\n"),
            "example.org",
            &["127.0.0.1".into()],
            &["ok@example.org".to_string()],
        )
        .await;
        assert!(
            matches!(&out[0].outcome, RcptOutcome::Delivered(_)),
            "{out:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = sessions.lock().unwrap().clone();
        assert_eq!(s.len(), 1);
        assert!(s[0].tls);
        assert_eq!(
            s[0].commands
                .iter()
                .filter(|c| c.starts_with("EHLO"))
                .count(),
            2
        );
        assert_eq!(s[0].data, b"S: t\r\n\r\nbody\r\n");
    }

    #[tokio::test]
    async fn failed_tls_handshake_falls_back_to_plain_text() {
        let (port, sessions) = sink("127.0.0.1:0", Mode::StartTls(None)).await;
        let c = config_tls(port, "opportunistic");
        let dns = Dns::new(&c.dns).unwrap();
        let out = deliver(
            &c,
            &dns,
            &message("a@example.com", b"x\r\n"),
            "example.org",
            &["127.0.0.1".into()],
            &["ok@example.org".to_string()],
        )
        .await;
        assert!(
            matches!(&out[0].outcome, RcptOutcome::Delivered(_)),
            "{out:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = sessions.lock().unwrap().clone();
        assert_eq!(s.len(), 2, "{s:?}");
        let plain = s.iter().find(|x| !x.data.is_empty()).unwrap();
        assert!(!plain.tls);
        assert!(!plain.commands.iter().any(|c| c == "STARTTLS"));
    }

    #[tokio::test]
    async fn tls_none_never_starts_tls() {
        let (port, sessions) = sink("127.0.0.1:0", Mode::StartTls(Some(tls_acceptor()))).await;
        let c = config_tls(port, "none");
        let dns = Dns::new(&c.dns).unwrap();
        let out = deliver(
            &c,
            &dns,
            &message("a@example.com", b"x\r\n"),
            "example.org",
            &["127.0.0.1".into()],
            &["ok@example.org".to_string()],
        )
        .await;
        assert!(
            matches!(&out[0].outcome, RcptOutcome::Delivered(_)),
            "{out:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = sessions.lock().unwrap().clone();
        assert!(!s[0].tls);
        assert!(!s[0].commands.iter().any(|c| c == "STARTTLS"));
    }
}
