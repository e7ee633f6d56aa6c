//! Sans-IO parser of SMTP replies from a remote server (RFC 5321 4.2).
//!
//! [`parse`] looks at the bytes read so far and returns either one complete
//! reply and how many bytes it used, or "need more", or an error. It never
//! keeps state between calls, so the caller's buffer is the only memory, and
//! the bounds make that buffer bounded too: a line longer than
//! [`Limits::max_line`] octets (CRLF included) or a reply longer than
//! [`Limits::max_reply`] octets is an error as soon as it is seen, whether or
//! not its end has arrived. A server streaming bytes without CRLF for ever
//! costs at most `max_line` octets plus one read.
//!
//! Lines end with CRLF; a bare LF is taken as a line end too (as Postfix's
//! client does); the text of a line is cleaned of control characters so
//! that nothing from the remote side can put a CR, LF or NUL into a log,
//! the spool or a DSN.

use std::fmt;

/// Bounds on one reply, from `relay.max_reply_line_length` and
/// `relay.max_reply_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Octets per reply line, CRLF included (RFC 5321 4.5.3.1.5: 512).
    pub max_line: usize,
    /// Octets per reply, all its lines together.
    pub max_reply: usize,
}

/// One reply: its code and the text of each line (after `NNN ` / `NNN-`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawReply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl RawReply {
    /// Positive completion or intermediate (2xx, 3xx).
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// A line passed `max_line` octets.
    LineTooLong(usize),
    /// The reply passed `max_reply` octets.
    ReplyTooLong(usize),
    /// Not an SMTP reply (no code, lines of one reply with different codes).
    Malformed(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::LineTooLong(n) => write!(f, "reply line longer than {n} octets"),
            ParseError::ReplyTooLong(n) => write!(f, "reply longer than {n} octets"),
            ParseError::Malformed(why) => write!(f, "malformed reply: {why}"),
        }
    }
}

/// Parses one reply from the front of `buf`: `Ok(Some((reply, used)))`,
/// `Ok(None)` if more bytes are needed, or an error (the session cannot go
/// on: what follows in the stream is not trusted).
pub fn parse(buf: &[u8], limits: Limits) -> Result<Option<(RawReply, usize)>, ParseError> {
    let mut pos = 0;
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let rest = &buf[pos..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            // An unfinished line: is it already too long?
            if rest.len() >= limits.max_line {
                return Err(ParseError::LineTooLong(limits.max_line));
            }
            if pos + rest.len() > limits.max_reply {
                return Err(ParseError::ReplyTooLong(limits.max_reply));
            }
            return Ok(None);
        };
        let used = nl + 1;
        if used > limits.max_line {
            return Err(ParseError::LineTooLong(limits.max_line));
        }
        if pos + used > limits.max_reply {
            return Err(ParseError::ReplyTooLong(limits.max_reply));
        }
        let line = &rest[..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let (line_code, last, text) = parse_line(line)?;
        match code {
            None => code = Some(line_code),
            Some(c) if c != line_code => {
                return Err(ParseError::Malformed(format!(
                    "line with code {line_code} inside a {c} reply"
                )))
            }
            Some(_) => {}
        }
        lines.push(text);
        pos += used;
        if last {
            let code = code.unwrap_or(line_code);
            return Ok(Some((RawReply { code, lines }, pos)));
        }
    }
}

/// `NNN[ -]text` or `NNN` alone: the code, whether it is the last line, the text.
fn parse_line(line: &[u8]) -> Result<(u16, bool, String), ParseError> {
    let digits = line.get(..3).unwrap_or(line);
    let valid = digits.len() == 3
        && (b'2'..=b'5').contains(&digits[0])
        && digits[1].is_ascii_digit()
        && digits[2].is_ascii_digit();
    if !valid {
        return Err(ParseError::Malformed(format!(
            "line does not start with a reply code: {:?}",
            clean(&line[..line.len().min(40)])
        )));
    }
    let code = digits
        .iter()
        .fold(0u16, |n, &d| n * 10 + u16::from(d - b'0'));
    match line.get(3) {
        None => Ok((code, true, String::new())),
        Some(b' ') => Ok((code, true, clean(&line[4..]))),
        Some(b'-') => Ok((code, false, clean(&line[4..]))),
        Some(_) => Err(ParseError::Malformed(format!(
            "no space or hyphen after code {code}"
        ))),
    }
}

/// Text of a reply line: invalid UTF-8 replaced, control characters
/// (CR, LF, NUL, ...) turned into spaces, ends trimmed.
fn clean(text: &[u8]) -> String {
    String::from_utf8_lossy(text)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_line: 512,
        max_reply: 4096,
    };

    fn one(input: &[u8]) -> Result<Option<(RawReply, usize)>, ParseError> {
        parse(input, L)
    }

    #[test]
    fn single_and_multi_line_replies() {
        let (r, used) = one(b"250 2.1.0 ok\r\nrest").unwrap().unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(r.lines, vec!["2.1.0 ok"]);
        assert_eq!(used, 14);

        let input = b"250-mx.test hello\r\n250-PIPELINING\r\n250 8BITMIME\r\n";
        let (r, used) = one(input).unwrap().unwrap();
        assert_eq!(r.lines, vec!["mx.test hello", "PIPELINING", "8BITMIME"]);
        assert_eq!(used, input.len());

        // A code alone, and a bare LF as line end.
        let (r, _) = one(b"354\n").unwrap().unwrap();
        assert_eq!((r.code, r.lines.len()), (354, 1));
    }

    #[test]
    fn every_split_gives_the_same_reply() {
        let input = b"220-mx.test ESMTP\r\n220 ready\r\n250 ok\r\n";
        let whole = one(input).unwrap().unwrap();
        assert_eq!(whole.1, 30);
        for cut in 0..whole.1 {
            assert_eq!(one(&input[..cut]).unwrap(), None, "cut at {cut}");
        }
        for cut in whole.1..=input.len() {
            assert_eq!(one(&input[..cut]).unwrap().unwrap(), whole);
        }
    }

    #[test]
    fn long_lines_and_replies_fail_before_their_end() {
        // A line of exactly 512 octets with its CRLF passes.
        let mut ok = b"250 ".to_vec();
        ok.resize(510, b'x');
        ok.extend_from_slice(b"\r\n");
        assert!(one(&ok).unwrap().is_some());
        let mut long = b"250 ".to_vec();
        long.resize(511, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(one(&long), Err(ParseError::LineTooLong(512)));
        // Without its end: refused as soon as the line cannot fit.
        assert_eq!(one(&[b'2'; 511]), Ok(None));
        assert_eq!(one(&[b'2'; 512]), Err(ParseError::LineTooLong(512)));

        let mut multi = Vec::new();
        while multi.len() <= 4096 {
            multi.extend_from_slice(b"250-a continuation line\r\n");
        }
        assert_eq!(one(&multi), Err(ParseError::ReplyTooLong(4096)));
    }

    #[test]
    fn malformed_replies_are_errors() {
        for bad in [
            &b"hello\r\n"[..],
            b"25\r\n",
            b"650 x\r\n",
            b"250x\r\n",
            b"250-a\r\n251 b\r\n",
        ] {
            assert!(
                matches!(one(bad), Err(ParseError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn control_characters_never_reach_the_text() {
        let (r, _) = one(b"550 5.1.1 a\0b\rc\x1bd\r\n").unwrap().unwrap();
        assert_eq!(r.lines, vec!["5.1.1 a b c d"]);
        let (r, _) = one(b"550 \xff\xfe\r\n").unwrap().unwrap();
        assert!(!r.lines[0].chars().any(|c| c.is_control()));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_stays_in_bounds(input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let small = Limits { max_line: 64, max_reply: 256 };
            if let Ok(Some((r, used))) = parse(&input, small) {
                proptest::prop_assert!(used <= 256 && used <= input.len());
                proptest::prop_assert!(r.lines.iter().all(|l| l.len() < 64 * 3));
            }
        }
    }
}
