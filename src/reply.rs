//! One SMTP reply as data: code, enhanced status, text.
//!
//! Deep layers (throttle, recipient checks, policy, relay outcomes) return a
//! [`Reply`] or a reason that becomes one; the SMTP writer and the DSN turn it
//! into words on the wire (`Display` writes the reply line without CRLF), so
//! nothing parses a reply string to find its code or status again. A leaf
//! module: it imports nothing from the crate.

use std::borrow::Cow;
use std::fmt;

/// An RFC 3463 enhanced status code `class.subject.detail`, e.g. `4.7.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl Status {
    pub const fn new(class: u8, subject: u16, detail: u16) -> Status {
        Status {
            class,
            subject,
            detail,
        }
    }

    /// Parses `c.sss.ddd` (class 2, 4 or 5; RFC 3463 allows up to three
    /// digits per subject and detail).
    pub fn parse(s: &str) -> Option<Status> {
        let mut it = s.split('.');
        let (c, sub, det) = (it.next()?, it.next()?, it.next()?);
        if it.next().is_some() {
            return None;
        }
        let num = |p: &str, max: usize| {
            (!p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u16>().ok())
                .flatten()
        };
        let class = num(c, 1)? as u8;
        if !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some(Status::new(class, num(sub, 3)?, num(det, 3)?))
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// An SMTP reply: `code [status] text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code (RFC 5321 4.2), 200..=599.
    pub code: u16,
    pub status: Option<Status>,
    /// One line of text, without CR or LF.
    pub text: Cow<'static, str>,
}

impl Reply {
    /// A reply with an enhanced status. CR and LF in `text` become spaces, so
    /// a reply can never inject a line.
    pub fn new(code: u16, status: Status, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            status: Some(status),
            text: one_line(text.into()),
        }
    }

    /// A reply without an enhanced status (greeting, HELO, ...).
    pub fn plain(code: u16, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            status: None,
            text: one_line(text.into()),
        }
    }

    /// 2xx / 3xx.
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: do not retry.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The enhanced status, or the RFC 3463 default for the code's class
    /// (`2.0.0`, `4.0.0`, `5.0.0`).
    pub fn status_or_default(&self) -> Status {
        self.status
            .unwrap_or(Status::new((self.code / 100).clamp(2, 5) as u8, 0, 0))
    }

    /// Parses one reply line as a remote server wrote it (`250 2.1.0 Ok`,
    /// `550-5.1.1 ...`, `421 bye`): for the relay's edge, where replies come
    /// from the network. Returns None if there is no valid three-digit code.
    pub fn parse(line: &str) -> Option<Reply> {
        let line = line.trim_end_matches(['\r', '\n']);
        let b = line.as_bytes();
        if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
            return None;
        }
        if b.len() > 3 && b[3] != b' ' && b[3] != b'-' {
            return None;
        }
        let code: u16 = line[..3].parse().ok()?;
        if !(200..=599).contains(&code) {
            return None;
        }
        let rest = line.get(4..).unwrap_or("");
        let (status, text) = match rest.split_once(' ') {
            Some((s, t)) => match Status::parse(s) {
                Some(st) => (Some(st), t),
                None => (None, rest),
            },
            None => match Status::parse(rest) {
                Some(st) => (Some(st), ""),
                None => (None, rest),
            },
        };
        Some(Reply {
            code,
            status,
            text: one_line(Cow::Owned(text.to_string())),
        })
    }
}

fn one_line(t: Cow<'static, str>) -> Cow<'static, str> {
    if t.contains(['\r', '\n']) {
        Cow::Owned(t.replace(['\r', '\n'], " "))
    } else {
        t
    }
}

impl fmt::Display for Reply {
    /// The reply line without CRLF: `450 4.7.1 text`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(s) = self.status {
            write!(f, " {s}")?;
        }
        if !self.text.is_empty() {
            write!(f, " {}", self.text)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_writes_the_line() {
        let r = Reply::new(450, Status::new(4, 7, 1), "Too much mail");
        assert_eq!(r.to_string(), "450 4.7.1 Too much mail");
        assert!(r.is_transient() && !r.is_permanent() && !r.is_positive());
        assert_eq!(Reply::plain(221, "bye").to_string(), "221 bye");
    }

    #[test]
    fn text_cannot_inject_a_line() {
        let r = Reply::new(550, Status::new(5, 1, 1), "a\r\n250 ok");
        assert_eq!(r.to_string(), "550 5.1.1 a  250 ok");
    }

    #[test]
    fn parse_round_trips_and_refuses_junk() {
        for line in [
            "250 2.1.0 Ok",
            "550 5.7.1 <a@b>: Relay access denied",
            "421 bye",
        ] {
            assert_eq!(Reply::parse(line).unwrap().to_string(), line);
        }
        let r = Reply::parse("550-5.1.1 no such user\r\n").unwrap();
        assert_eq!(
            (r.code, r.status, &*r.text),
            (550, Some(Status::new(5, 1, 1)), "no such user")
        );
        assert_eq!(
            Reply::parse("452 4.3.1").unwrap().status,
            Some(Status::new(4, 3, 1))
        );
        assert_eq!(Reply::parse("250 9.9.9 x").unwrap().status, None);
        for junk in ["", "25", "abc def", "2500 x", "099 x", "700 x", "250x"] {
            assert!(Reply::parse(junk).is_none(), "{junk:?}");
        }
        assert_eq!(
            Reply::plain(451, "x").status_or_default(),
            Status::new(4, 0, 0)
        );
    }
}
