//! The gossip wire format: the prost types generated from
//! `proto/gossip.proto`, and pure functions to seal and open envelopes and
//! to convert blocks and socket addresses. No I/O here.
//!
//! An envelope is accepted only if it decodes, carries this node's network
//! id and the same major protocol version, names a sender and has a body;
//! anything else is a [`Reject`] (the caller counts and logs it). Decoding
//! never panics on arbitrary bytes and sizes are bounded by the caller
//! ([`MAX_MESSAGE`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prost::Message as _;

use crate::suspect::{Bounds, Kind, Signal, SuspectState};
use crate::throttle::Block;

/// The generated protobuf types.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/magicmx.gossip.v1.rs"));
}

pub use proto::envelope::Body;
pub use proto::Envelope;

/// Major protocol version: envelopes with another one are dropped.
pub const VERSION: u32 = 1;
/// Minor protocol version: informational, additions only (1: suspect
/// states in count batches; 2: greylist entries and pools in them; 3:
/// recipient verdicts in them).
pub const MINOR: u32 = 3;
/// Largest envelope read from a stream.
pub const MAX_MESSAGE: usize = 4 << 20;

/// Why an envelope was dropped (the `reason` label of
/// `magicmx_gossip_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    Decode,
    Network,
    Version,
    NoSender,
    NoBody,
}

impl Reject {
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Decode => "decode",
            Reject::Network => "network",
            Reject::Version => "version",
            Reject::NoSender => "no_sender",
            Reject::NoBody => "no_body",
        }
    }
}

/// An envelope from `sender` on `network`.
pub fn seal(network: &str, sender: &str, body: Body) -> Envelope {
    Envelope {
        network: network.to_string(),
        version: VERSION,
        minor: MINOR,
        sender: sender.to_string(),
        body: Some(body),
    }
}

pub fn encode(envelope: &Envelope) -> Vec<u8> {
    envelope.encode_to_vec()
}

/// Decodes and checks an envelope: returns the claimed sender and the body.
pub fn open(bytes: &[u8], network: &str) -> Result<(String, Body), Reject> {
    let e = Envelope::decode(bytes).map_err(|_| Reject::Decode)?;
    check_envelope(e.network == network, e.version, VERSION, e.sender, e.body)
}

/// The checks every envelope version shares: this network, the expected
/// major version, a sender, a body.
pub fn check_envelope<B>(
    same_network: bool,
    version: u32,
    want_version: u32,
    sender: String,
    body: Option<B>,
) -> Result<(String, B), Reject> {
    if !same_network {
        return Err(Reject::Network);
    }
    if version != want_version {
        return Err(Reject::Version);
    }
    if sender.is_empty() {
        return Err(Reject::NoSender);
    }
    let body = body.ok_or(Reject::NoBody)?;
    Ok((sender, body))
}

/// A short name of the body's kind (the `kind` label of
/// `magicmx_gossip_messages_total`).
pub fn kind(body: &Body) -> &'static str {
    match body {
        Body::Swim(_) => "swim",
        Body::Delta(_) => "delta",
        Body::Summary(_) => "summary",
        Body::EpochDigest(_) => "epoch_digest",
        Body::Repair(_) => "repair",
        Body::RepairReply(_) => "repair_reply",
    }
}

/// A block as (network address octets, prefix length).
pub fn block_to_wire(block: &Block) -> (Vec<u8>, u32) {
    match block.0 {
        IpNet::V4(n) => (n.network().octets().to_vec(), n.prefix_len() as u32),
        IpNet::V6(n) => (n.network().octets().to_vec(), n.prefix_len() as u32),
    }
}

/// The block of (octets, prefix length); host bits are cleared. None if the
/// address is not 4 or 16 octets or the prefix is too long.
pub fn block_from_wire(bytes: &[u8], prefix_len: u32) -> Option<Block> {
    let net = match bytes.len() {
        4 => {
            let a: [u8; 4] = bytes.try_into().ok()?;
            let p = u8::try_from(prefix_len).ok()?;
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), p).ok()?.trunc())
        }
        16 => {
            let a: [u8; 16] = bytes.try_into().ok()?;
            let p = u8::try_from(prefix_len).ok()?;
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), p).ok()?.trunc())
        }
        _ => return None,
    };
    Some(Block(net))
}

/// Most signals and invalid-recipient counts read from one suspect entry
/// (a state holds at most `[suspect] max_reasons` ≤ 256 signals and the
/// counts of the window).
pub const MAX_SUSPECT_ITEMS: usize = 256;
/// Largest weight taken from a peer's signal (the config's bound).
const MAX_WEIGHT: i32 = 1_000;

/// A block's suspect state on the wire; `origin_name` names the throttle
/// origins of its invalid-recipient counts (counts of unknown origins are
/// left out).
pub fn suspect_to_wire(
    block: &Block,
    state: &SuspectState,
    origin_name: impl Fn(u16) -> Option<String>,
) -> proto::SuspectEntry {
    let (bytes, prefix_len) = block_to_wire(block);
    proto::SuspectEntry {
        block: bytes,
        prefix_len,
        signals: state
            .signals()
            .map(|(k, s)| proto::SuspectSignal {
                kind: k.to_wire(),
                expires_ms: s.expires_ms,
                weight: s.weight,
                detail: s.detail.clone(),
            })
            .collect(),
        invalid: state
            .invalid_counts()
            .filter_map(|((o, epoch), count)| {
                Some(proto::InvalidCount {
                    origin: origin_name(*o)?,
                    epoch: *epoch,
                    count: *count,
                })
            })
            .collect(),
    }
}

/// A peer's suspect entry as (block, state); None if the block is bad.
/// Unknown kinds are skipped (a newer peer), weights are clamped to the
/// config's bound and expiries to `max_expires_ms` (a peer cannot make a
/// signal eternal); `origin` maps a node name to a throttle origin.
pub fn suspect_from_wire(
    e: &proto::SuspectEntry,
    bounds: Bounds,
    max_expires_ms: u64,
    mut origin: impl FnMut(&str) -> Option<u16>,
) -> Option<(Block, SuspectState)> {
    let block = block_from_wire(&e.block, e.prefix_len)?;
    let mut st = SuspectState::new();
    for s in e.signals.iter().take(MAX_SUSPECT_ITEMS) {
        let Some(kind) = Kind::from_wire(&s.kind) else {
            continue;
        };
        let signal = Signal::new(
            s.weight.clamp(-MAX_WEIGHT, MAX_WEIGHT),
            s.expires_ms.min(max_expires_ms),
            s.detail
                .chars()
                .filter(|c| !c.is_control())
                .collect::<String>(),
        );
        st.add(kind, signal, bounds);
    }
    for c in e.invalid.iter().take(MAX_SUSPECT_ITEMS) {
        if let Some(o) = origin(&c.origin) {
            st.add_invalid_count(o, c.epoch, c.count, bounds);
        }
    }
    Some((block, st))
}

pub fn addr_to_wire(a: &SocketAddr) -> proto::SocketAddress {
    let ip = match a.ip() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    proto::SocketAddress {
        ip,
        port: a.port() as u32,
    }
}

pub fn addr_from_wire(a: &proto::SocketAddress) -> Option<SocketAddr> {
    let port = u16::try_from(a.port).ok()?;
    let ip = match a.ip.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(a.ip.as_slice()).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(a.ip.as_slice()).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn envelope_roundtrip_and_checks() {
        let e = seal("net", "a", Body::Swim(vec![1, 2, 3]));
        let bytes = encode(&e);
        let (sender, body) = open(&bytes, "net").unwrap();
        assert_eq!(sender, "a");
        assert_eq!(body, Body::Swim(vec![1, 2, 3]));
        assert_eq!(open(&bytes, "other"), Err(Reject::Network));
        let mut v2 = e.clone();
        v2.version = 2;
        assert_eq!(open(&encode(&v2), "net"), Err(Reject::Version));
        let mut nobody = e.clone();
        nobody.body = None;
        assert_eq!(open(&encode(&nobody), "net"), Err(Reject::NoBody));
        let mut anon = e;
        anon.sender.clear();
        assert_eq!(open(&encode(&anon), "net"), Err(Reject::NoSender));
        assert_eq!(open(&[0xff, 0xff, 0xff], "net"), Err(Reject::Decode));
    }

    #[test]
    fn blocks_roundtrip_and_are_normalised() {
        for s in ["10.1.2.0/24", "2001:db8:1::/48", "0.0.0.0/0", "::/0"] {
            let b = Block(s.parse().unwrap());
            let (bytes, p) = block_to_wire(&b);
            assert_eq!(block_from_wire(&bytes, p), Some(b));
        }
        // Host bits are cleared, so one block has one key.
        assert_eq!(
            block_from_wire(&[10, 1, 2, 77], 24),
            Some(Block("10.1.2.0/24".parse().unwrap()))
        );
        assert_eq!(block_from_wire(&[10, 1, 2, 0], 33), None);
        assert_eq!(block_from_wire(&[10, 1, 2], 24), None);
        assert_eq!(block_from_wire(&[0; 16], 129), None);
        assert_eq!(block_from_wire(&[10, 1, 2, 0], u32::MAX), None);
    }

    #[test]
    fn addrs_roundtrip() {
        for s in ["127.0.0.1:25", "[::1]:7401"] {
            let a: SocketAddr = s.parse().unwrap();
            assert_eq!(addr_from_wire(&addr_to_wire(&a)), Some(a));
        }
        let bad = proto::SocketAddress {
            ip: vec![1, 2, 3],
            port: 1,
        };
        assert_eq!(addr_from_wire(&bad), None);
        let bad_port = proto::SocketAddress {
            ip: vec![1, 2, 3, 4],
            port: 70_000,
        };
        assert_eq!(addr_from_wire(&bad_port), None);
    }

    #[test]
    fn suspect_states_roundtrip_and_are_bounded() {
        use crate::suspect::ProtocolTest;
        let b = Bounds {
            max_reasons: 8,
            window_epochs: 10,
        };
        let block = Block("10.1.2.0/24".parse().unwrap());
        let mut st = SuspectState::new();
        st.add(
            Kind::Protocol(ProtocolTest::Pregreet),
            Signal::new(5, 10_000, "sent before the banner"),
            b,
        );
        st.add(
            Kind::Dnsbl("bl.test".into()),
            Signal::new(3, 9_000, "127.0.0.2"),
            b,
        );
        st.add_invalid_count(0, 7, 4, b);
        let names = |o: u16| (o == 0).then(|| "a".to_string());
        let wire = suspect_to_wire(&block, &st, names);
        let back = suspect_from_wire(&wire, b, u64::MAX, |n| (n == "a").then_some(0));
        assert_eq!(back, Some((block, st.clone())));

        // A hostile peer: eternal, huge, unknown, control characters.
        let mut bad = wire.clone();
        bad.signals[0].expires_ms = u64::MAX;
        bad.signals[0].weight = i32::MAX;
        bad.signals[0].detail = "a\r\nb".into();
        bad.signals.push(proto::SuspectSignal {
            kind: "from_the_future".into(),
            ..Default::default()
        });
        let (_, got) = suspect_from_wire(&bad, b, 50_000, |_| None).unwrap();
        let sigs: Vec<_> = got.signals().collect();
        assert_eq!(sigs.len(), 2);
        assert!(sigs
            .iter()
            .all(|(_, s)| s.expires_ms <= 50_000 && s.weight <= 1_000));
        assert!(sigs.iter().all(|(_, s)| !s.detail.contains('\n')));
        assert_eq!(got.invalid_counts().count(), 0, "unknown origin");
        bad.block = vec![1, 2, 3];
        assert_eq!(suspect_from_wire(&bad, b, 50_000, |_| None), None);
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder (structured and mutated
        /// envelopes of every kind: `ledger` and `membership` tests).
        #[test]
        fn open_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = open(&bytes, "net");
        }

        /// Arbitrary block and address fields give a normalised value or None.
        #[test]
        fn wire_values_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..20),
            prefix in prop_oneof![0u32..130, any::<u32>()],
            port in any::<u32>(),
        ) {
            if let Some(b) = block_from_wire(&bytes, prefix) {
                prop_assert_eq!(block_from_wire(&block_to_wire(&b).0, prefix), Some(b));
            }
            let a = proto::SocketAddress { ip: bytes, port };
            if let Some(addr) = addr_from_wire(&a) {
                prop_assert_eq!(addr_from_wire(&addr_to_wire(&addr)), Some(addr));
            }
        }
    }
}
