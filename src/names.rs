//! DNS names: one normalisation (lower case, no trailing dot) and one
//! host-name check, shared by config validation, the zone tools, MX
//! resolution and the SMTP session. A leaf module: it imports nothing from
//! the crate.

/// Lower-case, without a trailing dot: the form names are compared in.
pub fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// True if `name` is a DNS host name: labels of letters, digits, `-` and `_`
/// (not starting or ending with `-`), at most 63 octets each and 253 in all;
/// one trailing dot allowed.
pub fn is_host_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise_and_check() {
        assert_eq!(normalize_name("MX.Example.ORG."), "mx.example.org");
        assert!(is_host_name("mx1.magic.test."));
        assert!(is_host_name("_dmarc.example.org"));
        for bad in [
            "",
            ".",
            "a..b",
            "-a.b",
            "a-.b",
            "a b.c",
            "a.b..",
            &"x".repeat(64),
        ] {
            assert!(!is_host_name(bad), "{bad:?}");
        }
        assert!(!is_host_name(&format!("{}.a", "abc.".repeat(63))));
    }
}
