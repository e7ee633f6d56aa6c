//! Delivery status notifications (bounces), RFC 3464.
//!
//! When recipients of a message fail for good, the queue runner calls
//! [`build`] and stores the result as a new spool message from the null
//! sender to the original sender. The message is a `multipart/report;
//! report-type=delivery-status` with three parts: a human-readable
//! explanation, the machine-readable `message/delivery-status`, and the
//! original message's header section as `text/rfc822-headers` (RFC 6522).
//!
//! Everything that comes from outside (addresses, remote replies, original
//! headers) is kept on its own line with CR and LF removed, so the result has
//! CRLF line endings only and no line longer than SMTP allows.

use chrono::{DateTime, Utc};
use rand::Rng;

use super::deliver::{Diagnostic, Status};

/// One recipient to report as failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRcpt {
    /// The recipient address as given in RCPT TO.
    pub address: String,
    /// The remote reply (`550 5.1.1 ...`) or the node's own reason
    /// (`5.1.10 ...`), typed: its status is reported as is.
    pub reply: Diagnostic,
    /// The MX host that gave the reply, if a remote one did.
    pub remote_mta: Option<String>,
}

/// What the report is about.
#[derive(Debug, Clone, Copy)]
pub struct Report<'a> {
    /// `node.hostname`: Reporting-MTA and the MAILER-DAEMON address.
    pub hostname: &'a str,
    pub queue_id: &'a str,
    /// The original envelope sender: the DSN goes to this address.
    pub sender: &'a str,
    /// When the node accepted the original message (unix seconds).
    pub arrival: u64,
    pub failed: &'a [FailedRcpt],
    /// The original message as stored (header section, blank line, body).
    pub original: &'a [u8],
    pub now: DateTime<Utc>,
}

/// Largest piece of the original header section copied into the report.
const MAX_ORIGINAL_HEADERS: usize = 64 * 1024;
/// Longest text put on one line (RFC 5322 allows 998 octets).
const MAX_TEXT: usize = 900;

/// Builds the DSN message: CRLF line endings, ready for the spool.
pub fn build(r: &Report<'_>) -> Vec<u8> {
    let headers = original_headers(r.original);
    let boundary = boundary(r.queue_id, &headers);
    let utf8 = !r.sender.is_ascii() || r.failed.iter().any(|f| !f.address.is_ascii());
    let charset = if utf8 { "utf-8" } else { "us-ascii" };
    let hostname = clean(r.hostname);

    let mut out = Lines::default();
    out.line(format!("Date: {}", r.now.to_rfc2822()));
    out.line(format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>"
    ));
    out.line(format!("To: <{}>", clean(r.sender)));
    out.line("Subject: Undelivered Mail Returned to Sender");
    out.line(format!(
        "Message-ID: <{}.{}.dsn@{hostname}>",
        clean(r.queue_id),
        r.now.timestamp()
    ));
    out.line("Auto-Submitted: auto-replied");
    out.line("MIME-Version: 1.0");
    out.line(format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\""
    ));
    out.line("");
    out.line("This is a MIME-encapsulated message.");
    out.line("");

    // 1. For people.
    out.line(format!("--{boundary}"));
    out.line("Content-Description: Notification");
    out.line(format!("Content-Type: text/plain; charset={charset}"));
    out.line("");
    out.line(format!("This is the mail system at host {hostname}."));
    out.line("");
    out.line("I'm sorry to have to inform you that your message could not");
    out.line("be delivered to one or more recipients. The reasons are below.");
    out.line("");
    for f in r.failed {
        let via = match &f.remote_mta {
            Some(mta) => format!(" (host {} said)", clean(mta)),
            None => String::new(),
        };
        out.line(format!("<{}>{via}:", clean(&f.address)));
        out.line(format!("    {}", clean(&f.reply.to_string())));
        out.line("");
    }

    // 2. For programs (RFC 3464).
    out.line(format!("--{boundary}"));
    out.line("Content-Description: Delivery report");
    out.line("Content-Type: message/delivery-status");
    out.line("");
    out.line(format!("Reporting-MTA: dns; {hostname}"));
    out.line(format!("X-Magicmx-Queue-ID: {}", clean(r.queue_id)));
    if let Some(arrival) = i64::try_from(r.arrival)
        .ok()
        .and_then(|s| DateTime::<Utc>::from_timestamp(s, 0))
    {
        out.line(format!("Arrival-Date: {}", arrival.to_rfc2822()));
    }
    for f in r.failed {
        out.line("");
        out.line(format!("Final-Recipient: rfc822; {}", clean(&f.address)));
        out.line("Action: failed");
        out.line(format!("Status: {}", status_of(&f.reply)));
        if let Some(mta) = &f.remote_mta {
            out.line(format!("Remote-MTA: dns; {}", clean(mta)));
        }
        out.line(format!("Diagnostic-Code: {}", diagnostic_code(&f.reply)));
    }
    out.line("");

    // 3. What was sent.
    out.line(format!("--{boundary}"));
    out.line("Content-Description: Undelivered Message Headers");
    out.line("Content-Type: text/rfc822-headers");
    out.line("");
    let mut bytes = out.0;
    bytes.extend_from_slice(&headers);
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

#[derive(Default)]
struct Lines(Vec<u8>);

impl Lines {
    fn line(&mut self, s: impl AsRef<str>) {
        self.0.extend_from_slice(s.as_ref().as_bytes());
        self.0.extend_from_slice(b"\r\n");
    }
}

/// The RFC 3463 status to report: the reply's own enhanced status, else
/// the class of its code (`4.0.0`, `5.0.0`). A DSN only reports failures,
/// so a 2.x.x status is never returned.
pub fn status_of(reply: &Diagnostic) -> Status {
    let s = reply.status();
    if s.class == 2 {
        Status::new(5, 0, 0)
    } else {
        s
    }
}

/// `smtp; <reply>` for a remote SMTP reply, `X-magicmx; <reason>` for the
/// node's own reasons (RFC 3464 diagnostic-type).
fn diagnostic_code(reply: &Diagnostic) -> String {
    let kind = if reply.is_remote() {
        "smtp"
    } else {
        "X-magicmx"
    };
    format!("{kind}; {}", clean(&reply.to_string()))
}

/// One line of text: control characters (CR and LF included) become spaces,
/// length is capped.
fn clean(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

/// The header section of the original message, each line ending in CRLF,
/// without the blank line that ends it; capped at a line boundary.
fn original_headers(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if out.len() + line.len() + 2 > MAX_ORIGINAL_HEADERS {
            break;
        }
        // A stray CR or a NUL inside a line cannot be sent; the stored
        // message never has one, but the report must stay sendable regardless.
        out.extend(
            line.iter()
                .map(|&b| if b == b'\r' || b == 0 { b' ' } else { b }),
        );
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A MIME boundary that does not occur in the copied headers.
fn boundary(queue_id: &str, headers: &[u8]) -> String {
    let id: String = queue_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(32)
        .collect();
    let mut rng = rand::rng();
    loop {
        let b = format!("=_magicmx_{id}_{:016x}", rng.random::<u64>());
        if !contains(headers, b.as_bytes()) {
            return b;
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &[u8] = b"Received: from a by b\r\n\tfor <x@y>\r\nFrom: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: hello\r\n\r\nbody line\r\n--not a boundary\r\n";

    fn report(failed: &[FailedRcpt]) -> Vec<u8> {
        build(&Report {
            hostname: "mx1.magic.test",
            queue_id: "Q123",
            sender: "alice@example.com",
            arrival: 1_700_000_000,
            failed,
            original: ORIGINAL,
            now: DateTime::from_timestamp(1_700_000_600, 0).unwrap(),
        })
    }

    fn failed() -> Vec<FailedRcpt> {
        vec![
            FailedRcpt {
                address: "bob@example.org".into(),
                reply: Diagnostic::remote_line(550, "5.1.1 <bob@example.org>: user unknown"),
                remote_mta: Some("mail.example.org".into()),
            },
            FailedRcpt {
                address: "carol@nullmx.example".into(),
                reply: Diagnostic::local(Status::new(5, 1, 10), "domain accepts no mail (null MX)"),
                remote_mta: None,
            },
        ]
    }

    /// Splits a message into (headers, body), unfolding header lines.
    fn split(msg: &str) -> (Vec<(String, String)>, &str) {
        let (head, body) = msg.split_once("\r\n\r\n").expect("header/body separator");
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in head.split("\r\n") {
            if line.starts_with([' ', '\t']) {
                fields.last_mut().unwrap().1.push_str(line);
            } else {
                let (k, v) = line.split_once(':').expect("field");
                fields.push((k.to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        (fields, body)
    }

    fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn only_crlf_line_endings() {
        let msg = report(&failed());
        for (i, &b) in msg.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && msg[i - 1] == b'\r', "bare LF at {i}");
            }
            if b == b'\r' {
                assert_eq!(msg.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
        assert!(msg.ends_with(b"--\r\n"));
        assert!(msg.split(|&b| b == b'\n').all(|l| l.len() <= 1000));
    }

    #[test]
    fn structure_is_a_delivery_status_report() {
        let msg = String::from_utf8(report(&failed())).unwrap();
        let (top, body) = split(&msg);
        assert_eq!(
            field(&top, "from"),
            Some("Mail Delivery System <MAILER-DAEMON@mx1.magic.test>")
        );
        assert_eq!(field(&top, "to"), Some("<alice@example.com>"));
        assert_eq!(field(&top, "mime-version"), Some("1.0"));
        assert!(field(&top, "date").is_some());
        assert!(field(&top, "message-id").is_some());
        let ct = field(&top, "content-type").unwrap();
        assert!(ct.starts_with("multipart/report;"), "{ct}");
        assert!(ct.contains("report-type=delivery-status"), "{ct}");
        let boundary = ct
            .split("boundary=\"")
            .nth(1)
            .unwrap()
            .trim_end_matches('"');

        let close = format!("\r\n--{boundary}--\r\n");
        let inner = body
            .strip_suffix(&close)
            .expect("closing boundary at the end");
        let delimiter = format!("--{boundary}\r\n");
        let mut parts = inner.split(&delimiter);
        assert_eq!(
            parts.next().unwrap(),
            "This is a MIME-encapsulated message.\r\n\r\n"
        );
        let parts: Vec<&str> = parts.collect();
        assert_eq!(parts.len(), 3);

        let (h1, text) = split(parts[0]);
        assert!(field(&h1, "content-type")
            .unwrap()
            .starts_with("text/plain"));
        assert!(text.contains("<bob@example.org>"));
        assert!(text.contains("550 5.1.1"));

        let (h2, status) = split(parts[1]);
        assert_eq!(field(&h2, "content-type"), Some("message/delivery-status"));
        let groups: Vec<&str> = status.trim_end().split("\r\n\r\n").collect();
        assert_eq!(groups.len(), 3, "{status}");
        let (per_msg, _) = split(&format!("{}\r\n\r\n", groups[0]));
        assert_eq!(
            field(&per_msg, "reporting-mta"),
            Some("dns; mx1.magic.test")
        );
        assert!(field(&per_msg, "arrival-date").unwrap().contains("2023"));
        let (r1, _) = split(&format!("{}\r\n\r\n", groups[1]));
        assert_eq!(
            field(&r1, "final-recipient"),
            Some("rfc822; bob@example.org")
        );
        assert_eq!(field(&r1, "action"), Some("failed"));
        assert_eq!(field(&r1, "status"), Some("5.1.1"));
        assert_eq!(field(&r1, "remote-mta"), Some("dns; mail.example.org"));
        assert_eq!(
            field(&r1, "diagnostic-code"),
            Some("smtp; 550 5.1.1 <bob@example.org>: user unknown")
        );
        let (r2, _) = split(&format!("{}\r\n\r\n", groups[2]));
        assert_eq!(
            field(&r2, "final-recipient"),
            Some("rfc822; carol@nullmx.example")
        );
        assert_eq!(field(&r2, "status"), Some("5.1.10"));
        assert_eq!(field(&r2, "remote-mta"), None);
        assert!(field(&r2, "diagnostic-code")
            .unwrap()
            .starts_with("X-magicmx; 5.1.10"));

        let (h3, headers) = split(parts[2]);
        assert_eq!(field(&h3, "content-type"), Some("text/rfc822-headers"));
        assert!(headers.starts_with("Received: from a by b\r\n\tfor <x@y>\r\nFrom: Alice"));
        assert!(headers.ends_with("Subject: hello\r\n"), "{headers:?}");
        assert!(!headers.contains("body line"));
    }

    #[test]
    fn hostile_replies_stay_on_one_line() {
        let f = vec![FailedRcpt {
            address: "bob@example.org\r\nBcc: evil@example.net".into(),
            reply: Diagnostic::remote_line(
                550,
                &format!("5.7.1 no\r\nX-Injected: yes {}", "x".repeat(5000)),
            ),
            remote_mta: Some("mx\r\n.example".into()),
        }];
        let msg = String::from_utf8(report(&f)).unwrap();
        assert!(!msg.contains("\r\nBcc:"));
        assert!(!msg.contains("\r\nX-Injected"));
        assert!(msg.split("\r\n").all(|l| l.len() <= 998));
    }

    #[test]
    fn status_codes() {
        let s = |r: Diagnostic| status_of(&r).to_string();
        assert_eq!(
            s(Diagnostic::remote_line(550, "5.1.1 user unknown")),
            "5.1.1"
        );
        assert_eq!(
            s(Diagnostic::local(
                Status::new(5, 1, 10),
                "domain accepts no mail (null MX)"
            )),
            "5.1.10"
        );
        assert_eq!(
            s(Diagnostic::local(
                Status::new(4, 4, 7),
                "message expired: 451 4.3.0 try later"
            )),
            "4.4.7"
        );
        assert_eq!(s(Diagnostic::remote_line(554, "no enhanced code")), "5.0.0");
        assert_eq!(s(Diagnostic::remote_line(452, "too many")), "4.0.0");
        assert_eq!(
            s(Diagnostic::remote_line(550, "4.1.1 mismatched class")),
            "5.0.0"
        );
        assert_eq!(s(Diagnostic::remote_line(250, "2.0.0 ok")), "5.0.0");
    }

    #[test]
    fn headers_without_body_and_boundary_collisions() {
        assert_eq!(original_headers(b"A: b\r\nC: d\r\n"), b"A: b\r\nC: d\r\n");
        assert_eq!(original_headers(b""), b"");
        let b = boundary("Q1", b"X: =_magicmx_Q1_");
        assert!(b.starts_with("=_magicmx_Q1_"));
    }
}
