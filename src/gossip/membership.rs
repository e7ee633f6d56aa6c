//! Membership: SWIM (foca) over the gossip transport.
//!
//! A member's identity ([`NodeId`]) is its node name (the name in its
//! certificate; foca's `Addr`), its gossip and SMTP addresses and a `bump`
//! that starts at the process start time in milliseconds and grows on every
//! automatic rejoin: a restarted or renewed identity always wins the
//! conflict with an older one of the same name, so a restarted node rejoins
//! at once instead of waiting for the old identity to be forgotten.
//!
//! Foca's packets are protobuf (`Swim*` messages in `proto/gossip.proto`),
//! each item length-delimited so that foca can read them one after the
//! other. [`Members`] owns the foca instance, its timers and the table of
//! peers shown in `/status`; it is driven by the gossip task (packets in,
//! timers due) and hands back the packets to send. No I/O here.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::{Duration, Instant};

use foca::{
    AccumulatingRuntime, Foca, Header, Member, Message, NoCustomBroadcast, OwnedNotification,
    State, Timer,
};
use prost::bytes::{Buf, BufMut};
use prost::Message as _;
use rand_pcg::rand_core::SeedableRng;

use super::wire::{addr_from_wire, addr_to_wire, proto};
use crate::config::GossipConfig;

/// Largest SWIM packet foca produces or accepts: fits a QUIC datagram on
/// any path (1200-byte minimum MTU) with the envelope around it.
pub const SWIM_PACKET_MAX: usize = 1000;

/// A member of the network.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeId {
    pub name: String,
    pub gossip: SocketAddr,
    pub smtp: Vec<SocketAddr>,
    pub bump: u64,
}

impl foca::Identity for NodeId {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(NodeId {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> String {
        self.name.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("SWIM packet does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("no room left in the SWIM packet")]
    Space,
    #[error("SWIM packet has an invalid field: {0}")]
    Invalid(&'static str),
}

fn id_to_wire(id: &NodeId) -> proto::NodeIdentity {
    proto::NodeIdentity {
        name: id.name.clone(),
        gossip: Some(addr_to_wire(&id.gossip)),
        smtp: id.smtp.iter().map(addr_to_wire).collect(),
        bump: id.bump,
    }
}

fn id_from_wire(id: Option<proto::NodeIdentity>) -> Result<NodeId, CodecError> {
    let id = id.ok_or(CodecError::Invalid("identity missing"))?;
    if id.name.is_empty() || id.name.len() > 253 {
        return Err(CodecError::Invalid("node name"));
    }
    // A bump is a start time in milliseconds plus a few renewals. One from
    // the far future would win every conflict against the real node's
    // identity (a forged "down" would keep it out).
    if id.bump > max_bump() {
        return Err(CodecError::Invalid("bump in the future"));
    }
    let gossip = id
        .gossip
        .as_ref()
        .and_then(addr_from_wire)
        .ok_or(CodecError::Invalid("gossip address"))?;
    let smtp = id
        .smtp
        .iter()
        .map(|a| addr_from_wire(a).ok_or(CodecError::Invalid("smtp address")))
        .collect::<Result<_, _>>()?;
    Ok(NodeId {
        name: id.name,
        gossip,
        smtp,
        bump: id.bump,
    })
}

/// The largest believable bump: now plus a day (clock skew, renewals).
fn max_bump() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now.saturating_add(86_400_000)
}

/// Foca's codec: protobuf, each item length-delimited.
pub struct SwimCodec;

fn header_to_wire(h: &Header<NodeId>) -> proto::SwimHeader {
    use proto::SwimKind as K;
    let (kind, probe, other) = match &h.message {
        Message::Ping(n) => (K::Ping, *n, None),
        Message::Ack(n) => (K::Ack, *n, None),
        Message::PingReq {
            target,
            probe_number,
        } => (K::PingReq, *probe_number, Some(target)),
        Message::IndirectPing {
            origin,
            probe_number,
        } => (K::IndirectPing, *probe_number, Some(origin)),
        Message::IndirectAck {
            target,
            probe_number,
        } => (K::IndirectAck, *probe_number, Some(target)),
        Message::ForwardedAck {
            origin,
            probe_number,
        } => (K::ForwardedAck, *probe_number, Some(origin)),
        Message::Announce => (K::Announce, 0, None),
        Message::Feed => (K::Feed, 0, None),
        Message::Gossip => (K::Gossip, 0, None),
        Message::Broadcast => (K::Broadcast, 0, None),
        Message::TurnUndead => (K::TurnUndead, 0, None),
    };
    proto::SwimHeader {
        src: Some(id_to_wire(&h.src)),
        src_incarnation: h.src_incarnation as u32,
        dst: Some(id_to_wire(&h.dst)),
        kind: kind as i32,
        probe_number: probe as u32,
        other: other.map(id_to_wire),
    }
}

fn header_from_wire(h: proto::SwimHeader) -> Result<Header<NodeId>, CodecError> {
    use proto::SwimKind as K;
    let probe_number =
        u8::try_from(h.probe_number).map_err(|_| CodecError::Invalid("probe number"))?;
    let kind = K::try_from(h.kind).map_err(|_| CodecError::Invalid("message kind"))?;
    let other = || id_from_wire(h.other.clone());
    let message = match kind {
        K::Ping => Message::Ping(probe_number),
        K::Ack => Message::Ack(probe_number),
        K::PingReq => Message::PingReq {
            target: other()?,
            probe_number,
        },
        K::IndirectPing => Message::IndirectPing {
            origin: other()?,
            probe_number,
        },
        K::IndirectAck => Message::IndirectAck {
            target: other()?,
            probe_number,
        },
        K::ForwardedAck => Message::ForwardedAck {
            origin: other()?,
            probe_number,
        },
        K::Announce => Message::Announce,
        K::Feed => Message::Feed,
        K::Gossip => Message::Gossip,
        K::Broadcast => Message::Broadcast,
        K::TurnUndead => Message::TurnUndead,
        K::Unspecified => return Err(CodecError::Invalid("message kind")),
    };
    Ok(Header {
        src: id_from_wire(h.src)?,
        src_incarnation: u16::try_from(h.src_incarnation)
            .map_err(|_| CodecError::Invalid("incarnation"))?,
        dst: id_from_wire(h.dst)?,
        message,
    })
}

impl foca::Codec<NodeId> for SwimCodec {
    type Error = CodecError;

    fn encode_header(
        &mut self,
        header: &Header<NodeId>,
        mut buf: impl BufMut,
    ) -> Result<(), CodecError> {
        header_to_wire(header)
            .encode_length_delimited(&mut buf)
            .map_err(|_| CodecError::Space)
    }

    fn decode_header(&mut self, mut buf: impl Buf) -> Result<Header<NodeId>, CodecError> {
        header_from_wire(proto::SwimHeader::decode_length_delimited(&mut buf)?)
    }

    fn encode_member(
        &mut self,
        member: &Member<NodeId>,
        mut buf: impl BufMut,
    ) -> Result<(), CodecError> {
        let state = match member.state() {
            State::Alive => proto::MemberState::Alive,
            State::Suspect => proto::MemberState::Suspect,
            State::Down => proto::MemberState::Down,
        };
        proto::SwimMember {
            id: Some(id_to_wire(member.id())),
            incarnation: member.incarnation() as u32,
            state: state as i32,
        }
        .encode_length_delimited(&mut buf)
        .map_err(|_| CodecError::Space)
    }

    fn decode_member(&mut self, mut buf: impl Buf) -> Result<Member<NodeId>, CodecError> {
        let m = proto::SwimMember::decode_length_delimited(&mut buf)?;
        let state = match proto::MemberState::try_from(m.state) {
            Ok(proto::MemberState::Alive) => State::Alive,
            Ok(proto::MemberState::Suspect) => State::Suspect,
            Ok(proto::MemberState::Down) => State::Down,
            Err(_) => return Err(CodecError::Invalid("member state")),
        };
        let incarnation =
            u16::try_from(m.incarnation).map_err(|_| CodecError::Invalid("incarnation"))?;
        Ok(Member::new(id_from_wire(m.id)?, incarnation, state))
    }
}

/// The sender's identity claimed in a SWIM packet's header (its name is
/// checked against the connection's certificate before foca sees the packet).
pub fn packet_source(packet: &[u8]) -> Option<NodeId> {
    if packet.len() > SWIM_PACKET_MAX {
        return None;
    }
    let mut buf = packet;
    let h = proto::SwimHeader::decode_length_delimited(&mut buf).ok()?;
    id_from_wire(h.src).ok()
}

/// Foca's parameters for a network of about `cluster_size` nodes, tuned so
/// that a dead node is declared down within `failure_timeout`: a probe
/// every sixth of it (a dead member is probed by some node within a couple
/// of periods, and the probe fails within one), then suspicion for a third
/// of it: about 3/6 + 2/6 of the timeout in the worst case.
pub fn foca_config(g: &GossipConfig, cluster_size: usize) -> foca::Config {
    let size =
        NonZeroU32::new(cluster_size.clamp(1, u32::MAX as usize) as u32).unwrap_or(NonZeroU32::MIN);
    let mut c = foca::Config::new_lan(size);
    let ft = g.failure_timeout.0;
    let period = (ft / 6).max(Duration::from_millis(15));
    c.probe_period = period;
    c.probe_rtt = (period / 3).max(Duration::from_millis(5));
    c.suspect_to_down_after = (ft / 3).max(period);
    c.max_packet_size = NonZeroUsize::new(SWIM_PACKET_MAX).unwrap_or(NonZeroUsize::MIN);
    // Identities renew themselves, so a down one can be forgotten after a
    // while; an hour keeps partitions healing through announces to down members.
    c.remove_down_after = Some(Duration::from_secs(3600));
    c.periodic_gossip = Some(foca::PeriodicParams {
        frequency: (period / 2).max(Duration::from_millis(20)),
        num_members: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
    });
    c.periodic_announce = Some(foca::PeriodicParams {
        frequency: g.anti_entropy_interval.0.max(Duration::from_millis(100)),
        num_members: NonZeroUsize::MIN,
    });
    c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
        frequency: ft.max(Duration::from_millis(100)),
        num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
    });
    c
}

/// What the gossip task must do after driving [`Members`].
#[derive(Debug, Default)]
pub struct Output {
    /// SWIM packets to send, by destination gossip address.
    pub send: Vec<(SocketAddr, String, Vec<u8>)>,
    /// Members that came up (or rejoined under a new identity): worth an
    /// early anti-entropy exchange.
    pub up: Vec<NodeId>,
    /// Members declared down.
    pub down: Vec<NodeId>,
    /// This node joined (its identity is known by an active member).
    pub joined: bool,
}

/// One peer as shown in `/status`.
#[derive(Debug, Clone)]
pub struct PeerRecord {
    pub id: NodeId,
    pub state: State,
    pub last_heard: Option<Instant>,
    pub down_since: Option<Instant>,
}

type Swim = Foca<NodeId, SwimCodec, rand_pcg::Pcg64Mcg, NoCustomBroadcast>;

/// The membership state machine: foca, its timers, the peer table.
pub struct Members {
    foca: Swim,
    runtime: AccumulatingRuntime<NodeId>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timer_events: HashMap<u64, Timer<NodeId>>,
    next_timer: u64,
    config: GossipConfig,
    last_size: usize,
    /// Peers by name.
    pub peers: HashMap<String, PeerRecord>,
    /// Each peer's identity as it announced it itself, in the header of a
    /// packet it sent on a connection that carries its certificate. SWIM
    /// spreads identities second-hand, and any certified peer could forge
    /// one (a member that does not exist, another member's SMTP
    /// addresses); only vouched identities are trusted with counts and
    /// with the real-MX policy's allowlist.
    vouched: HashMap<String, NodeId>,
}

impl Members {
    pub fn new(me: NodeId, config: &GossipConfig, seed: u64) -> Members {
        let foca = Foca::new(
            me,
            foca_config(config, 1),
            rand_pcg::Pcg64Mcg::seed_from_u64(seed),
            SwimCodec,
        );
        Members {
            foca,
            runtime: AccumulatingRuntime::new(),
            timers: BinaryHeap::new(),
            timer_events: HashMap::new(),
            next_timer: 0,
            vouched: HashMap::new(),
            config: config.clone(),
            last_size: 1,
            peers: HashMap::new(),
        }
    }

    pub fn identity(&self) -> &NodeId {
        self.foca.identity()
    }

    /// Sends an announce to `id` (a seed: only its name and address need
    /// to be right).
    pub fn announce(&mut self, id: NodeId, now: Instant) -> Result<Output, foca::Error> {
        let r = self.foca.announce(id, &mut self.runtime);
        let out = self.drain(now);
        r.map(|_| out)
    }

    /// A SWIM packet whose source identity `src` ([`packet_source`]) the
    /// caller has checked against the connection's certificate: that
    /// identity is vouched for by its own node.
    pub fn handle_packet(
        &mut self,
        src: NodeId,
        packet: &[u8],
        now: Instant,
    ) -> Result<Output, foca::Error> {
        let from = src.name.clone();
        if let Some(p) = self.peers.get_mut(&from) {
            p.last_heard = Some(now);
        }
        if self
            .vouched
            .get(&from)
            .is_none_or(|known| src.bump >= known.bump)
        {
            self.vouched.insert(src.name.clone(), src);
        }
        let r = self.foca.handle_data(packet, &mut self.runtime);
        let out = self.drain(now);
        if let Some(p) = self.peers.get_mut(&from) {
            p.last_heard = Some(now);
        }
        r.map(|_| out)
    }

    /// Declares this node down to a few members (graceful shutdown).
    pub fn leave(&mut self, now: Instant) -> Output {
        if let Err(e) = self.foca.leave_cluster(&mut self.runtime) {
            tracing::debug!(error = %e, "membership: leave");
        }
        self.drain(now)
    }

    /// When the next timer is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Fires every timer due at `now`.
    pub fn handle_timers(&mut self, now: Instant) -> Output {
        let mut due = Vec::new();
        while let Some(Reverse((at, n))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(t) = self.timer_events.remove(&n) {
                due.push(t);
            }
        }
        // Foca wants timers handled in their natural order.
        due.sort();
        let mut out = Output::default();
        for t in due {
            if let Err(e) = self.foca.handle_timer(t, &mut self.runtime) {
                tracing::debug!(error = %e, "membership timer");
            }
            out.merge(self.drain(now));
        }
        out
    }

    /// Active members other than this node.
    pub fn live(&self) -> impl Iterator<Item = &NodeId> {
        self.foca.iter_members().map(|m| m.id())
    }

    /// Live members whose identity they vouched for themselves (see
    /// `vouched`), as they announced it.
    pub fn vouched_live(&self) -> impl Iterator<Item = &NodeId> {
        self.foca
            .iter_members()
            .filter_map(|m| self.vouched.get(&m.id().name))
    }

    /// Is `name` a member (in the peer table) that has vouched for itself?
    pub fn is_vouched_member(&self, name: &str) -> bool {
        self.peers.contains_key(name) && self.vouched.contains_key(name)
    }

    pub fn live_count(&self) -> usize {
        self.foca.num_members()
    }

    fn drain(&mut self, now: Instant) -> Output {
        let mut out = Output::default();
        while let Some((to, data)) = self.runtime.to_send() {
            out.send.push((to.gossip, to.name.clone(), data.to_vec()));
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            let n = self.next_timer;
            self.next_timer += 1;
            self.timer_events.insert(n, timer);
            self.timers.push(Reverse((now + after, n)));
        }
        while let Some(note) = self.runtime.to_notify() {
            match note {
                OwnedNotification::MemberUp(id) => {
                    tracing::info!(peer = %id.name, addr = %id.gossip, "gossip peer up");
                    out.up.push(id);
                }
                OwnedNotification::Rename(old, new) => {
                    tracing::info!(peer = %new.name, old_bump = old.bump, bump = new.bump, "gossip peer restarted");
                    out.up.push(new);
                }
                OwnedNotification::MemberDown(id) => {
                    tracing::info!(peer = %id.name, reason = "failed", "gossip peer down");
                    out.down.push(id);
                }
                OwnedNotification::Active => {
                    tracing::info!("gossip joined the network");
                    out.joined = true;
                }
                OwnedNotification::Idle => tracing::info!("gossip: no live peer"),
                OwnedNotification::Rejoin(id) => {
                    tracing::info!(
                        bump = id.bump,
                        "gossip: declared down by the network, rejoined with a new identity"
                    );
                }
                OwnedNotification::Defunct => {
                    tracing::warn!("gossip: declared down and cannot rejoin")
                }
            }
        }
        self.refresh(now);
        out
    }

    /// Rebuilds the peer table from foca's view and retunes foca for the
    /// network size.
    fn refresh(&mut self, now: Instant) {
        let me = self.foca.identity().name.clone();
        let mut seen = HashSet::new();
        for m in self.foca.iter_membership_state() {
            let id = m.id();
            if id.name == me {
                continue;
            }
            seen.insert(id.name.clone());
            let p = self
                .peers
                .entry(id.name.clone())
                .or_insert_with(|| PeerRecord {
                    id: id.clone(),
                    state: m.state(),
                    last_heard: None,
                    down_since: None,
                });
            if p.id.bump <= id.bump {
                p.id = id.clone();
                if p.state != State::Down && m.state() == State::Down {
                    p.down_since = Some(now);
                }
                if m.state() != State::Down {
                    p.down_since = None;
                }
                p.state = m.state();
            }
        }
        self.peers.retain(|name, _| seen.contains(name));
        let size = self.foca.num_members() + 1;
        if size != self.last_size {
            self.last_size = size;
            if let Err(e) = self.foca.set_config(foca_config(&self.config, size)) {
                tracing::debug!(error = %e, "membership: cannot retune foca");
            }
        }
    }
}

impl Output {
    fn merge(&mut self, o: Output) {
        self.send.extend(o.send);
        self.up.extend(o.up);
        self.down.extend(o.down);
        self.joined |= o.joined;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Codec as _;

    fn id(name: &str, port: u16, bump: u64) -> NodeId {
        NodeId {
            name: name.into(),
            gossip: SocketAddr::from(([127, 0, 0, 1], port)),
            smtp: vec![SocketAddr::from(([127, 0, 0, 1], port + 1))],
            bump,
        }
    }

    #[test]
    fn codec_roundtrips_every_message() {
        let (a, b, t) = (id("a", 1, 5), id("b", 3, 6), id("t", 5, 7));
        let messages = vec![
            Message::Ping(1),
            Message::Ack(2),
            Message::PingReq {
                target: t.clone(),
                probe_number: 3,
            },
            Message::IndirectPing {
                origin: t.clone(),
                probe_number: 4,
            },
            Message::IndirectAck {
                target: t.clone(),
                probe_number: 5,
            },
            Message::ForwardedAck {
                origin: t.clone(),
                probe_number: 6,
            },
            Message::Announce,
            Message::Feed,
            Message::Gossip,
            Message::Broadcast,
            Message::TurnUndead,
        ];
        for message in messages {
            let h = Header {
                src: a.clone(),
                src_incarnation: 9,
                dst: b.clone(),
                message,
            };
            let mut buf = Vec::new();
            SwimCodec.encode_header(&h, &mut buf).unwrap();
            let m = Member::new(t.clone(), 3, State::Suspect);
            SwimCodec.encode_member(&m, &mut buf).unwrap();
            let mut r = buf.as_slice();
            assert_eq!(SwimCodec.decode_header(&mut r).unwrap(), h);
            assert_eq!(SwimCodec.decode_member(&mut r).unwrap(), m);
            assert!(r.is_empty());
            assert_eq!(packet_source(&buf).map(|s| s.name).as_deref(), Some("a"));
        }
    }

    /// A packet from `src` to `dst` carrying `members` as SWIM updates.
    fn packet(
        src: &NodeId,
        dst: &NodeId,
        message: Message<NodeId>,
        members: &[Member<NodeId>],
    ) -> Vec<u8> {
        let h = Header {
            src: src.clone(),
            src_incarnation: 0,
            dst: dst.clone(),
            message,
        };
        let mut buf = Vec::new();
        SwimCodec.encode_header(&h, &mut buf).unwrap();
        // Foca's layout: the header, a u16 count of updates, the updates.
        buf.put_u16(members.len() as u16);
        for m in members {
            SwimCodec.encode_member(m, &mut buf).unwrap();
        }
        buf
    }

    /// A certified peer can tell others about members that do not exist or
    /// give a real member other SMTP addresses: foca believes it, but only
    /// identities a node announced itself are vouched for.
    #[test]
    fn second_hand_identities_are_not_vouched() {
        let g = GossipConfig::default();
        let a = id("a", 10, 1);
        let mut members = Members::new(a.clone(), &g, 1);
        let now = Instant::now();
        let (evil, b) = (id("evil", 20, 1), id("b", 30, 1));
        let ghost = id("ghost", 40, 1);
        let mut forged_b = id("b", 30, 2);
        forged_b.smtp = vec![SocketAddr::from(([192, 0, 2, 66], 25))];
        let p = packet(
            &evil,
            &a,
            Message::Gossip,
            &[
                Member::alive(ghost.clone()),
                Member::alive(forged_b.clone()),
            ],
        );
        members.handle_packet(evil.clone(), &p, now).unwrap();
        assert!(
            members.live().any(|m| m.name == "ghost"),
            "foca took the update"
        );
        assert!(members.is_vouched_member("evil"));
        assert!(!members.is_vouched_member("ghost"));
        assert!(!members.is_vouched_member("b"));
        // b speaks for itself (an older bump than the forgery: still b's word).
        let p = packet(&b, &a, Message::Ping(1), &[]);
        let _ = members.handle_packet(b.clone(), &p, now);
        assert!(members.is_vouched_member("b"));
        let smtp: Vec<SocketAddr> = members
            .vouched_live()
            .flat_map(|m| m.smtp.clone())
            .collect();
        assert!(smtp.contains(&b.smtp[0]), "{smtp:?}");
        assert!(
            !smtp.contains(&forged_b.smtp[0]),
            "forged address allowed: {smtp:?}"
        );
        assert!(!smtp.contains(&ghost.smtp[0]), "ghost allowed: {smtp:?}");
        // An identity from the far future (to win every conflict) is refused.
        let mut future = id("b", 30, u64::MAX);
        future.smtp.clear();
        let mut buf = Vec::new();
        SwimCodec
            .encode_member(&Member::down(future), &mut buf)
            .unwrap();
        assert!(SwimCodec.decode_member(&mut buf.as_slice()).is_err());
    }

    #[test]
    fn codec_leaves_a_full_buffer_clean() {
        let m = Member::alive(id("a-long-name-to-take-room", 1, 1));
        let mut space = [0u8; 10];
        let mut buf = &mut space[..];
        assert!(SwimCodec.encode_member(&m, &mut buf).is_err());
        assert_eq!(buf.len(), 10);
    }

    #[test]
    fn newer_identities_win() {
        use foca::Identity as _;
        let old = id("a", 1, 5);
        let new = old.renew().unwrap();
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
        assert_eq!(old.addr(), new.addr());
    }

    #[test]
    fn failure_detection_fits_the_timeout() {
        let g = GossipConfig {
            failure_timeout: crate::config::Dur(Duration::from_secs(2)),
            ..GossipConfig::default()
        };
        let c = foca_config(&g, 3);
        assert!(c.probe_rtt < c.probe_period);
        assert!(c.probe_period * 3 + c.suspect_to_down_after <= g.failure_timeout.0);
    }

    /// Three in-memory members join through one seed, then one dies and the
    /// others declare it down; packets go through the real codec.
    #[test]
    fn members_join_and_detect_failures() {
        let g = GossipConfig {
            failure_timeout: crate::config::Dur(Duration::from_millis(800)),
            ..GossipConfig::default()
        };
        let mut nodes: Vec<Members> = (0..3)
            .map(|i| Members::new(id(&format!("n{i}"), 10 + i as u16 * 10, 1), &g, i as u64))
            .collect();
        let mut now = Instant::now();
        let mut inbox: Vec<(usize, String, Vec<u8>)> = Vec::new();
        let route = |out: Output, from: &str, inbox: &mut Vec<(usize, String, Vec<u8>)>| {
            for (addr, _, data) in out.send {
                let to = ((addr.port() - 10) / 10) as usize;
                inbox.push((to, from.to_string(), data));
            }
        };
        let seed = id("n0", 10, 0);
        for (i, node) in nodes.iter_mut().enumerate().skip(1) {
            let out = node.announce(seed.clone(), now).unwrap();
            route(out, &format!("n{i}"), &mut inbox);
        }
        let mut dead = None;
        for step in 0..400 {
            now += Duration::from_millis(10);
            if step == 100 {
                dead = Some(2);
            }
            for (to, from, data) in std::mem::take(&mut inbox) {
                if Some(to) == dead || dead.is_some_and(|d| from == format!("n{d}")) {
                    continue;
                }
                let Some(src) = packet_source(&data).filter(|s| s.name == from) else {
                    panic!("{from} sent a packet naming another source");
                };
                if let Ok(out) = nodes[to].handle_packet(src, &data, now) {
                    route(out, &format!("n{to}"), &mut inbox);
                }
            }
            for (i, node) in nodes.iter_mut().enumerate() {
                if Some(i) == dead {
                    continue;
                }
                let out = node.handle_timers(now);
                route(out, &format!("n{i}"), &mut inbox);
            }
            if step == 99 {
                for n in &nodes {
                    assert_eq!(n.live_count(), 2, "everyone knows everyone");
                }
            }
        }
        for n in &nodes[..2] {
            assert_eq!(n.live_count(), 1);
            assert_eq!(n.peers.get("n2").map(|p| p.state), Some(State::Down));
        }
    }

    // Hostile peers: SWIM packets with arbitrary bytes, or a well-formed
    // header with hostile values followed by hostile members, never panic
    // the membership, whatever timers fire afterwards.

    use proptest::prelude::*;

    /// Mostly a valid identity of one of four nodes (`n0` is the one under
    /// test), sometimes a hostile one.
    fn arb_identity() -> impl Strategy<Value = Option<proto::NodeIdentity>> {
        let valid = (0u16..4, 0u64..3)
            .prop_map(|(i, bump)| Some(id_to_wire(&id(&format!("n{i}"), 10 + i * 10, bump))));
        let addr = (
            prop_oneof![
                Just(vec![127, 0, 0, 1]),
                proptest::collection::vec(any::<u8>(), 16),
                proptest::collection::vec(any::<u8>(), 0..20),
            ],
            prop_oneof![Just(7401u32), any::<u32>()],
        )
            .prop_map(|(ip, port)| proto::SocketAddress { ip, port });
        let name = prop_oneof![
            3 => (0u8..4).prop_map(|i| format!("n{i}")),
            1 => Just(String::new()),
            1 => ".{0,300}",
        ];
        let hostile = proptest::option::of(
            (
                name,
                proptest::option::of(addr.clone()),
                proptest::collection::vec(addr, 0..3),
                prop_oneof![0u64..3, Just(u64::MAX), any::<u64>()],
            )
                .prop_map(|(name, gossip, smtp, bump)| proto::NodeIdentity {
                    name,
                    gossip,
                    smtp,
                    bump,
                }),
        );
        prop_oneof![8 => valid, 1 => hostile]
    }

    fn arb_packet() -> impl Strategy<Value = Vec<u8>> {
        let small = || prop_oneof![12 => 0u32..4, 1 => Just(u32::MAX), 1 => any::<u32>()];
        let to_me = Just(Some(id_to_wire(&id("n0", 10, 1))));
        let header = (
            prop_oneof![8 => (1u16..4).prop_map(|i| Some(id_to_wire(&id(&format!("n{i}"), 10 + i * 10, 0)))), 1 => arb_identity()],
            small(),
            prop_oneof![3 => to_me, 1 => arb_identity()],
            prop_oneof![12 => 1i32..12, 1 => any::<i32>()],
            small(),
            arb_identity(),
        )
            .prop_map(|(src, src_incarnation, dst, kind, probe_number, other)| {
                proto::SwimHeader {
                    src,
                    src_incarnation,
                    dst,
                    kind,
                    probe_number,
                    other,
                }
            });
        let member = (
            arb_identity(),
            small(),
            prop_oneof![12 => 1i32..4, 1 => any::<i32>()],
        )
            .prop_map(|(id, incarnation, state)| proto::SwimMember {
                id,
                incarnation,
                state,
            });
        prop_oneof![
            1 => proptest::collection::vec(any::<u8>(), 0..300),
            6 => (
                header,
                proptest::collection::vec(member, 0..5),
                prop_oneof![8 => Just(None), 1 => any::<u16>().prop_map(Some)],
                proptest::collection::vec(any::<u8>(), 0..4),
            )
                .prop_map(|(h, members, count, tail)| {
                    // Foca's layout: header, u16 number of members, members.
                    let mut buf = Vec::new();
                    h.encode_length_delimited(&mut buf).unwrap();
                    let count = count.unwrap_or(members.len() as u16);
                    buf.extend_from_slice(&count.to_be_bytes());
                    for m in members {
                        m.encode_length_delimited(&mut buf).unwrap();
                    }
                    buf.extend(tail);
                    buf
                }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn hostile_swim_packets_never_panic(
            packets in proptest::collection::vec(arb_packet(), 1..6),
        ) {
            let g = GossipConfig::default();
            let mut m = Members::new(id("n0", 10, 1), &g, 7);
            let mut now = Instant::now();
            for p in &packets {
                // As the gossip core does: only a packet with a readable
                // source reaches foca.
                if let Some(src) = packet_source(p) {
                    let _ = m.handle_packet(src, p, now);
                }
                now += Duration::from_millis(300);
                let _ = m.handle_timers(now);
            }
            // Let every timer run out (suspicion, removal of down members).
            for _ in 0..50 {
                now += Duration::from_secs(120);
                let _ = m.handle_timers(now);
            }
            prop_assert!(m.peers.keys().all(|n| !n.is_empty() && n.len() <= 253));
        }
    }
}
