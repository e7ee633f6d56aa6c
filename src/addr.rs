//! Address canonicalisation: one rule for "which address is this", used by
//! the throttle (block keys), config (trust, outbound clients, deny lists),
//! policy and admin. A leaf module: it imports nothing from the crate.

use std::net::IpAddr;

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are IPv4: a dual-stack
/// listener must not give one sender two identities.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_v6_is_v4() {
        let ip: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(canonical_ip(ip), "192.0.2.7".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(canonical_ip(v6), v6);
        let v4: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(canonical_ip(v4), v4);
    }
}
