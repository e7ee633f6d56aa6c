//! Loop detection by `Received:` headers: one count and one rule, used by
//! the SMTP session at the end of DATA and by the relay before sending.
//!
//! The rule is about the message as it leaves this node, with this node's
//! own `Received:` on top: more than `relay.max_received_headers` such
//! headers is a loop. The session sees the message before the header is
//! added ([`hops_with_ours`]), the relay after ([`count_received`]), so both
//! decide alike: a message that arrives with exactly the limit is refused at
//! DATA (Postfix's `hopcount_limit` does the same) and never acknowledged
//! and then bounced. A leaf module: it imports nothing from the crate.

/// Number of `Received:` fields in the header section of `message`
/// (field name case-insensitive, blanks before the colon allowed,
/// continuation lines skipped; the body is not looked at).
pub fn count_received(message: &[u8]) -> usize {
    let mut count = 0;
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            continue;
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            if line[..colon]
                .trim_ascii_end()
                .eq_ignore_ascii_case(b"received")
            {
                count += 1;
            }
        }
    }
    count
}

/// Hops of a message once this node has added its own `Received:`.
pub fn hops_with_ours(incoming: &[u8]) -> usize {
    count_received(incoming).saturating_add(1)
}

/// Is a message with `hops` `Received:` headers (ours included) a loop?
pub fn is_loop(hops: usize, max_received_headers: usize) -> bool {
    hops > max_received_headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_headers_are_counted_in_the_header_section_only() {
        let msg = b"Received: from a\r\n\tby b\r\nreceived : from c\r\nX-Received: no\r\nSubject: hi\r\n\r\nReceived: in the body\r\n";
        assert_eq!(count_received(msg), 2);
        assert_eq!(count_received(b""), 0);
        assert_eq!(count_received(b"Received: x\r\nReceived: y\r\n"), 2);
        assert_eq!(
            count_received(b"Received: a\nreceived: b\n\nReceived: c\n"),
            2
        );
    }

    #[test]
    fn session_and_relay_agree_at_the_boundary() {
        let max = 3;
        let at_limit = b"Received: a\r\nReceived: b\r\nReceived: c\r\n\r\nx\r\n";
        let below = b"Received: a\r\nReceived: b\r\n\r\nx\r\n";
        // SMTP time: before our header.
        assert!(is_loop(hops_with_ours(at_limit), max));
        assert!(!is_loop(hops_with_ours(below), max));
        // Relay time: the stored message carries ours on top.
        let stored = [&b"Received: ours\r\n"[..], below].concat();
        assert!(!is_loop(count_received(&stored), max));
    }
}
