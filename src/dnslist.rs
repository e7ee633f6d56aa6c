//! The syntax of a DNS list site, as postscreen writes it in
//! `postscreen_dnsbl_sites`: `zone`, `zone*weight`, `zone=filter` or
//! `zone=filter*weight`, the filter an IPv4 pattern whose octets are
//! numbers, ranges or lists (`127.0.0.[2..11]`, `127.0.[0..255].[1;3;5..7]`).
//! A leaf module: `config` checks `[dnsbl] sites` with it and `dnsbl` looks
//! the sites up; it imports nothing from the crate.

use std::net::Ipv4Addr;

/// Most sites in `[dnsbl] sites` (each zone is one query per connection).
pub const MAX_SITES: usize = 32;

/// One octet of a filter: a union of inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Octet(Vec<(u8, u8)>);

impl Octet {
    fn contains(&self, v: u8) -> bool {
        self.0.iter().any(|&(lo, hi)| lo <= v && v <= hi)
    }

    fn parse(s: &str) -> Result<Octet, String> {
        let number = |t: &str| {
            t.trim()
                .parse::<u8>()
                .map_err(|_| format!("{t:?} is not a number from 0 to 255"))
        };
        let Some(inner) = s.strip_prefix('[') else {
            let v = number(s)?;
            return Ok(Octet(vec![(v, v)]));
        };
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| format!("{s:?} has no closing ']'"))?;
        let mut ranges = Vec::new();
        for part in inner.split(';') {
            match part.split_once("..") {
                Some((lo, hi)) => {
                    let (lo, hi) = (number(lo)?, number(hi)?);
                    if lo > hi {
                        return Err(format!("range {part:?} is empty"));
                    }
                    ranges.push((lo, hi));
                }
                None => {
                    let v = number(part)?;
                    ranges.push((v, v));
                }
            }
        }
        Ok(Octet(ranges))
    }
}

/// One entry of `[dnsbl] sites`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// Lower-case, no trailing dot.
    pub zone: String,
    /// Answers that count; `None`: any (valid) answer.
    filter: Option<[Octet; 4]>,
    /// Added to the score when listed; negative = allowlist.
    pub weight: i32,
}

impl Site {
    /// Parses postscreen's `zone[=filter][*weight]`. The error says what is
    /// wrong; the caller names the key and the entry.
    pub fn parse(entry: &str) -> Result<Site, String> {
        let entry = entry.trim();
        let (rest, weight) = match entry.rsplit_once('*') {
            Some((rest, w)) => {
                let w: i32 = w
                    .trim()
                    .parse()
                    .map_err(|_| format!("weight {w:?} is not an integer"))?;
                if w == 0 || w.unsigned_abs() > 1_000 {
                    return Err(format!("weight {w} must be between -1000 and 1000, not 0"));
                }
                (rest, w)
            }
            None => (entry, 1),
        };
        let (zone, filter) = match rest.split_once('=') {
            Some((zone, f)) => {
                let octets = split_octets(f.trim());
                if octets.len() != 4 {
                    return Err(format!(
                        "filter {f:?} needs four octets (like 127.0.0.[2..11])"
                    ));
                }
                let mut parsed = Vec::with_capacity(4);
                for o in octets {
                    parsed.push(Octet::parse(o).map_err(|e| format!("filter {f:?}: {e}"))?);
                }
                let filter: [Octet; 4] = parsed.try_into().expect("four octets");
                (zone, Some(filter))
            }
            None => (rest, None),
        };
        let zone = zone.trim().trim_end_matches('.').to_ascii_lowercase();
        if !is_zone(&zone) {
            return Err(format!("{zone:?} is not a DNS zone name"));
        }
        Ok(Site {
            zone,
            filter,
            weight,
        })
    }

    /// Does this site count `answer`?
    pub fn matches(&self, answer: Ipv4Addr) -> bool {
        match &self.filter {
            None => true,
            Some(f) => answer.octets().iter().zip(f).all(|(v, o)| o.contains(*v)),
        }
    }
}

/// Splits a filter at the dots that are not inside `[...]` (ranges are `a..b`).
fn split_octets(f: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in f.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            '.' if depth == 0 => {
                out.push(&f[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&f[start..]);
    out
}

fn is_zone(name: &str) -> bool {
    // Room for the 64 characters of an IPv6 nibble prefix.
    !name.is_empty()
        && name.len() <= 253 - 64
        && name.contains('.')
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn postscreen_syntax() {
        let s = Site::parse("zen.spamhaus.org=127.0.0.[2..11]*3").unwrap();
        assert_eq!(s.zone, "zen.spamhaus.org");
        assert_eq!(s.weight, 3);
        assert!(s.matches(ip4("127.0.0.2")));
        assert!(s.matches(ip4("127.0.0.11")));
        assert!(!s.matches(ip4("127.0.0.12")));
        assert!(!s.matches(ip4("127.0.1.2")));

        let w = Site::parse("List.DNSWL.org.=127.0.[0..255].[1..3]*-2").unwrap();
        assert_eq!(w.zone, "list.dnswl.org");
        assert_eq!(w.weight, -2);
        assert!(w.matches(ip4("127.0.15.1")));
        assert!(w.matches(ip4("127.0.0.3")));
        assert!(!w.matches(ip4("127.0.0.0")));

        let plain = Site::parse("bl.example.test").unwrap();
        assert_eq!(plain.weight, 1);
        assert!(plain.matches(ip4("127.0.0.200")));

        let list = Site::parse("bl.test=127.0.0.[2;4;10..12]").unwrap();
        assert!(list.matches(ip4("127.0.0.4")));
        assert!(list.matches(ip4("127.0.0.11")));
        assert!(!list.matches(ip4("127.0.0.3")));
        assert_eq!(Site::parse("bl.test*5").unwrap().weight, 5);
    }

    #[test]
    fn bad_sites_say_what_is_wrong() {
        for (entry, says) in [
            ("", "zone"),
            ("nodot", "zone"),
            ("bl.test=127.0.0", "four octets"),
            ("bl.test=127.0.0.[2..x]", "\"x\""),
            ("bl.test=127.0.0.[9..2]", "empty"),
            ("bl.test=127.0.0.256", "256"),
            ("bl.test=127.0.0.[2", "']'"),
            ("bl.test*x", "weight"),
            ("bl.test*0", "weight"),
            ("bl test", "zone"),
        ] {
            let err = Site::parse(entry).unwrap_err();
            assert!(err.contains(says), "{entry:?}: {err}");
        }
    }
}
