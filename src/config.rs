//! `node.toml` → typed, validated configuration.
//!
//! Every section is a serde struct with `deny_unknown_fields`, so a typo is an
//! error rather than a silently ignored key. Defaults live in one place (the
//! `Default` impls below). `Config::validate` checks what serde cannot (ranges,
//! files that must exist, combinations) and every error names the key.
//! Relative paths are resolved against the directory of the config file, so
//! the shipped `node.toml` runs from anywhere.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::addr::canonical_ip;
use crate::names::is_host_name as is_hostname;
pub use crate::names::normalize_name;

/// A configuration problem; the message always names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// `value` must lie in `min..=max`: the bounds are what the code can take
/// (a tokio semaphore, a `u32` count, an `Instant` in the future) and what
/// makes sense for the key, so that a value `check-config` passes never
/// panics later inside a task.
fn in_range<T>(key: &'static str, value: T, min: T, max: T) -> Result<(), ConfigError>
where
    T: PartialOrd + fmt::Display + Copy,
{
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("{value} is out of range: must be between {min} and {max}"),
        ));
    }
    Ok(())
}

/// [`in_range`] for a duration.
fn dur_in_range(key: &'static str, value: Dur, min: Dur, max: Dur) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("{value} is out of range: must be between {min} and {max}"),
        ));
    }
    Ok(())
}

const fn ms(n: u64) -> Dur {
    Dur(Duration::from_millis(n))
}

const DAY: u64 = 86_400;

/// A duration written as a string: `500ms`, `30s`, `5m`, `1h`, `5d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
}

impl FromStr for Dur {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("duration {s:?} has no unit (use ms, s, m, h or d)"))?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration {s:?} does not start with a number"))?;
        let ms_per = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(format!(
                    "duration {s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
                ))
            }
        };
        n.checked_mul(ms_per)
            .map(|ms| Dur(Duration::from_millis(ms)))
            .ok_or_else(|| format!("duration {s:?} is too large"))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, per) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms >= per && ms % per == 0 {
                return write!(f, "{}{unit}", ms / per);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub smtp: SmtpConfig,
    #[serde(default)]
    pub accept: AcceptConfig,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub throttle: ThrottleConfig,
    #[serde(default)]
    pub trust: TrustConfig,
    #[serde(default)]
    pub gossip: GossipConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub dnsbl: DnsblConfig,
    #[serde(default)]
    pub suspect: SuspectConfig,
    #[serde(default)]
    pub verify: VerifyConfig,
    #[serde(default)]
    pub greylist: GreylistConfig,
    #[serde(default)]
    pub sign: SignConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Name of this node in the network (later: in its certificate).
    pub name: String,
    /// Public host name: SMTP banner, EHLO name when relaying, `Received:` headers.
    pub hostname: String,
    /// Spool and state live here. Relative to the config file's directory.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Name suffixes of the network's magic MX hosts, e.g. `.magic.example.net`.
    #[serde(default)]
    pub magic_suffixes: Vec<String>,
    /// Other names of this node; MX hosts with these names are never relayed to.
    #[serde(default)]
    pub names: Vec<String>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    pub listen: Vec<SocketAddr>,
    /// Longest command or text line, in octets including CRLF (RFC 5321: 512 / 1000).
    pub max_line_length: usize,
    /// Largest message accepted, in octets (advertised with SIZE).
    pub max_message_size: usize,
    pub max_recipients: usize,
    /// Simultaneous inbound connections, all sources together.
    pub max_connections: usize,
    /// Simultaneous connections from one source block (trusted networks and
    /// outbound clients excepted), so that a few networks holding sessions
    /// open cannot take every slot.
    pub max_connections_per_block: usize,
    /// Simultaneous connections from one block family (IPv4 /16, IPv6 /32),
    /// same exemptions: a handful of neighbouring blocks cannot take more
    /// than this share of `max_connections` either.
    pub max_connections_per_family: usize,
    /// Wait for a command (RFC 5321 4.5.3.2: at least 5 minutes).
    pub command_timeout: Dur,
    /// Wait for each chunk of DATA (RFC 5321: 3 minutes per data block).
    pub data_timeout: Dur,
    /// The whole DATA phase must end within this: `data_timeout` bounds
    /// each chunk only, so a client dripping a byte per chunk would hold its
    /// slot (and the buffered body) for ever. 10 minutes takes a
    /// `max_message_size` message of 10 MiB over a link of ~20 KiB/s.
    pub data_deadline: Dur,
    /// The whole session must end within this (a client sending NOOPs, or
    /// message after message slowly, cannot hold a slot for ever). 30
    /// minutes is ample for a busy sender; it then reconnects.
    pub session_deadline: Dur,
    /// NOOP, RSET, VRFY, HELP and ETRN past this many (since the last
    /// accepted message) each count as an error, so `max_errors` ends a
    /// session that only chats; Postfix's `smtpd_junk_command_limit`.
    pub junk_command_limit: usize,
    /// Bytes of message data all unfinished DATAs may buffer together
    /// (each buffers its whole message in memory). Past it: `452 4.3.1`.
    /// At least `max_message_size`, so every message can fit alone.
    pub data_memory: usize,
    /// End the session after this many errors (bad commands, refused
    /// recipients), counted since the last accepted message; Postfix's
    /// `smtpd_hard_error_limit`.
    pub max_errors: usize,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec!["127.0.0.1:2525".parse().unwrap()],
            max_line_length: 1000,
            max_message_size: 10 * 1024 * 1024,
            max_recipients: 100,
            max_connections: 500,
            max_connections_per_block: 20,
            max_connections_per_family: 100,
            command_timeout: Dur::secs(300),
            data_timeout: Dur::secs(180),
            data_deadline: Dur::secs(600),
            session_deadline: Dur::secs(1800),
            junk_command_limit: 100,
            data_memory: 256 * 1024 * 1024,
            max_errors: 20,
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcceptConfig {
    /// Recipient domains this node accepts mail for.
    pub domains: Vec<String>,
    /// Also accept a domain whose MX set lists a host under `node.magic_suffixes`.
    pub mx_delegation: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayTls {
    /// STARTTLS when offered, plain text if it is not or the handshake fails.
    Opportunistic,
    /// Never STARTTLS.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Port of the real MX hosts.
    pub port: u16,
    /// Give up on a recipient (DSN) after this long in the queue.
    pub max_age: Dur,
    /// First retry delay; doubles per attempt up to `retry_max`.
    pub retry_initial: Dur,
    pub retry_max: Dur,
    /// Simultaneous deliveries (Postfix's `default_process_limit`, 100).
    pub concurrency: usize,
    /// Simultaneous deliveries to one recipient domain (Postfix's
    /// `default_destination_concurrency_limit`, 20): a slow or stalling
    /// destination holds at most this many of the `concurrency` slots.
    pub destination_concurrency: usize,
    /// TCP connection to a real MX.
    pub connect_timeout: Dur,
    /// Each of the greeting, the EHLO reply and STARTTLS (reply and
    /// handshake): an MX that never greets is left after this.
    pub greeting_timeout: Dur,
    /// Reply to MAIL FROM, each RCPT TO, RSET.
    pub command_timeout: Dur,
    /// Reply to DATA (the `354`).
    pub data_timeout: Dur,
    /// Each write of the message data (about 64 KiB).
    pub data_block_timeout: Dur,
    /// Reply after the final `.` of the message data.
    pub data_done_timeout: Dur,
    /// Octets per line of a remote reply, CRLF included (RFC 5321: 512);
    /// a longer line ends the attempt as a temporary failure.
    pub max_reply_line_length: usize,
    /// Octets per remote reply, all lines together.
    pub max_reply_size: usize,
    /// Transactions one outbound SMTP session serves at most (0: no reuse).
    pub connection_reuse_limit: u32,
    /// How long a clean session stays open, idle, for the next message to
    /// the same MX address (0s: no reuse).
    pub connection_cache_time: Dur,
    /// A message with more `Received:` headers than this is refused as a loop.
    pub max_received_headers: usize,
    pub tls: RelayTls,
    /// Never connect to an address in these networks, whatever DNS says:
    /// with `mx_delegation`, anyone can publish a domain whose "real MX"
    /// is this host's loopback or the operator's internal network.
    pub deny_networks: Vec<ipnet::IpNet>,
}

/// Loopback, "this network", private (RFC 1918, RFC 6598, ULA),
/// link-local and multicast addresses.
pub const DEFAULT_DENY_NETWORKS: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/3",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

impl RelayConfig {
    /// Is `ip` (IPv4-mapped IPv6 as IPv4) in `deny_networks`?
    pub fn is_denied(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.deny_networks.iter().any(|n| n.contains(&ip))
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            port: 25,
            max_age: Dur::secs(5 * 86_400),
            retry_initial: Dur::secs(60),
            retry_max: Dur::secs(3_600),
            concurrency: 100,
            destination_concurrency: 20,
            connect_timeout: Dur::secs(30),
            greeting_timeout: Dur::secs(120),
            command_timeout: Dur::secs(300),
            data_timeout: Dur::secs(120),
            data_block_timeout: Dur::secs(180),
            data_done_timeout: Dur::secs(600),
            max_reply_line_length: 512,
            max_reply_size: 4096,
            connection_reuse_limit: 100,
            connection_cache_time: Dur::secs(2),
            max_received_headers: 50,
            tls: RelayTls::Opportunistic,
            deny_networks: DEFAULT_DENY_NETWORKS
                .iter()
                .map(|n| n.parse().expect("a valid default network"))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Nameservers as `ip:port`; empty = the system's resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    pub timeout: Dur,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: Dur::secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// HTTP listener for /metrics, /healthz, /status; absent = off.
    pub listen: Option<SocketAddr>,
    /// Names accepted in a request's `Host` besides the listener's own
    /// address and `localhost` (e.g. the name a Prometheus scraper uses).
    pub hosts: Vec<String>,
    /// Simultaneous admin connections.
    pub max_connections: usize,
    /// A request must be read and answered within this.
    pub request_timeout: Dur,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: None,
            hosts: Vec::new(),
            max_connections: 16,
            request_timeout: Dur::secs(10),
        }
    }
}

/// Per-block limits, network-wide, per sliding window.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleConfig {
    /// Off: nothing is counted or refused (hold still applies).
    pub enabled: bool,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Sliding window the limits apply to.
    pub window: Dur,
    /// Counting granularity; the window is a whole number of epochs.
    pub epoch: Dur,
    pub max_connections: u32,
    pub max_messages: u32,
    pub max_recipients: u32,
    /// Time in the penalty box after passing a limit; doubles per offense.
    pub penalty: Dur,
    pub max_penalty: Dur,
    /// Connections of a penalised block answered with a full 421; later ones are closed without a banner.
    pub polite_refusals: u32,
    /// Bound of the block table.
    pub max_tracked_blocks: usize,
    /// Most of the block table one peer origin may fill with blocks this
    /// node has not seen itself (a share of `max_tracked_blocks`).
    pub peer_block_share: f64,
    /// Accepted mail waits this long before relay, so the node sees the network's counts.
    pub hold: Dur,
    /// Quarantined mail is deleted after this long.
    pub quarantine_max_age: Dur,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            enabled: true,
            ipv4_prefix: 24,
            ipv6_prefix: 48,
            window: Dur::secs(3_600),
            epoch: Dur::secs(60),
            max_connections: 120,
            max_messages: 60,
            max_recipients: 200,
            penalty: Dur::secs(15 * 60),
            max_penalty: Dur::secs(4 * 3_600),
            polite_refusals: 3,
            max_tracked_blocks: 1_000_000,
            peer_block_share: 0.1,
            hold: Dur::secs(5),
            quarantine_max_age: Dur::secs(7 * 86_400),
        }
    }
}

/// Sharing counts with peer nodes over QUIC (mutual TLS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipConfig {
    /// Off: the node throttles on its own counts only (no peers needed).
    pub enabled: bool,
    /// UDP address of the QUIC endpoint.
    pub listen: SocketAddr,
    /// Network id: messages from another network are dropped.
    pub network: String,
    /// Gossip addresses of nodes to join through; one live seed is enough.
    pub seeds: Vec<SocketAddr>,
    /// Network CA certificate (PEM); peers must present a certificate it signed.
    pub ca: Option<PathBuf>,
    /// This node's certificate and key (PEM), issued by the CA for `node.name`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Deltas are pushed this often.
    pub interval: Dur,
    /// Peers each push goes to.
    pub fanout: usize,
    /// Digest exchange with one random peer this often (repairs losses, restarts, partitions).
    pub anti_entropy_interval: Dur,
    /// A peer that does not answer probes for about this long is declared down.
    pub failure_timeout: Dur,
    /// Cap of one peer's contribution to a block's count, as a share of the limit (0 < share <= 1).
    pub max_origin_share: f64,
    /// Distinct origins (this node included) whose counts a block's count
    /// must hold before counts that are not this node's own may refuse it.
    pub min_origins_to_refuse: u32,
    /// How counts travel: to each block's owners, with hot blocks broadcast
    /// (`owners`), or every count to every node (`all`, the design before).
    pub counts: GossipCounts,
    /// Owner nodes per block (`counts = "owners"`).
    pub owners: usize,
    /// Owners broadcast a block once its network-wide count reaches this
    /// fraction of any limit (`counts = "owners"`).
    pub hot_fraction: f64,
}

/// `gossip.counts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GossipCounts {
    /// Each node sends its counts of a block to the block's owners; owners
    /// broadcast the blocks near a limit. A node's cost follows its own
    /// traffic, not the network's.
    Owners,
    /// Every count change goes to every node (epidemic).
    All,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            enabled: false,
            listen: "127.0.0.1:7401".parse().unwrap(),
            network: "magicmx".to_string(),
            seeds: Vec::new(),
            ca: None,
            cert: None,
            key: None,
            interval: Dur::secs(1),
            fanout: 3,
            anti_entropy_interval: Dur::secs(10),
            failure_timeout: Dur::secs(10),
            max_origin_share: 0.5,
            min_origins_to_refuse: 3,
            counts: GossipCounts::Owners,
            owners: 3,
            hot_fraction: 0.5,
        }
    }
}

/// The smarthost door for trusted senders: any domain, no throttle, no hold,
/// magic MX hosts skipped.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// Listeners; empty = no outbound mode.
    pub listen: Vec<SocketAddr>,
    /// Who may relay through them.
    pub clients: Vec<ipnet::IpNet>,
}

/// Postfix policy service for the real MX: refuse untrusted direct senders.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// TCP address for Postfix's `check_policy_service`; absent = off inside `run`.
    pub listen: Option<SocketAddr>,
    /// Addresses of magic nodes (always allowed), besides those learned from gossip.
    pub magic_nodes: Vec<ipnet::IpNet>,
    /// File of the network's certificate key fingerprints (`magicmx ca
    /// issue` appends to `DIR/network_keys`): a client whose TLS
    /// certificate key is listed is allowed. Reloaded when it changes.
    pub network_keys: Option<PathBuf>,
    /// Requests of a block answered DEFER_IF_PERMIT before REJECT.
    pub polite_refusals: u32,
    /// The polite count is per block per this period.
    pub polite_period: Dur,
    /// Simultaneous connections (each Postfix `smtpd` process keeps one).
    pub max_connections: usize,
    /// Simultaneous connections from one client address.
    pub max_connections_per_client: usize,
    /// A request (from its first byte, or from the connection's start)
    /// must be complete within this; a connection idle between requests
    /// is closed after `idle_timeout`.
    pub request_timeout: Dur,
    pub idle_timeout: Dur,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            listen: None,
            magic_nodes: Vec::new(),
            network_keys: None,
            polite_refusals: 3,
            polite_period: Dur::secs(3_600),
            max_connections: 1_000,
            max_connections_per_client: 200,
            request_timeout: Dur::secs(5),
            idle_timeout: Dur::secs(330),
        }
    }
}

/// DNS block and allow lists, postscreen's syntax (see `crate::dnsbl`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsblConfig {
    /// `zone[=filter][*weight]`, e.g. `zen.spamhaus.org=127.0.0.[2..11]*3`,
    /// `list.dnswl.org=127.0.[0..255].[1..3]*-2`. Empty = no lookups.
    pub sites: Vec<String>,
    /// Per query; all zones are asked at once, a late zone is skipped.
    pub timeout: Dur,
    /// Cached answers live their TTL clamped to `[min_ttl, max_ttl]`.
    pub min_ttl: Dur,
    pub max_ttl: Dur,
    /// Bound of the answer cache, (zone, address) pairs.
    pub max_cache_entries: usize,
    /// A zone that refuses queries or answers nonsense is left out this long.
    pub pause: Dur,
    /// RFC 5782 test entries are checked at start and this often.
    pub health_interval: Dur,
}

impl Default for DnsblConfig {
    fn default() -> Self {
        DnsblConfig {
            sites: Vec::new(),
            timeout: Dur(Duration::from_millis(1_500)),
            min_ttl: Dur::secs(60),
            max_ttl: Dur::secs(3_600),
            max_cache_entries: 100_000,
            pause: Dur::secs(300),
            health_interval: Dur::secs(300),
        }
    }
}

/// The suspicion state of a block (see `crate::suspect`): thresholds, how
/// much each signal weighs, how long it is remembered.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SuspectConfig {
    /// A block scoring at least this is a suspect: lower limits, tarpit, greylist.
    pub threshold: i32,
    /// A block scoring at least this is refused at connect (`550 5.7.1`).
    pub refuse_threshold: i32,
    /// A suspect's throttle limits are the normal ones times this.
    pub limit_factor: f64,
    /// A signal (other than a DNSBL listing, which lives its TTL) counts this long.
    pub reason_ttl: Dur,
    /// Bound of the reasons kept per block.
    pub max_reasons: usize,
    /// Weights of the protocol tests.
    pub pregreet_weight: i32,
    pub pipelining_weight: i32,
    pub non_smtp_weight: i32,
    pub bare_lf_weight: i32,
    /// Invalid recipients of a block in the throttle window that make it a suspect.
    pub invalid_rcpt_threshold: u32,
    pub invalid_rcpt_weight: i32,
    /// Addresses nobody writes to: one recipient here makes the block a suspect.
    pub trap_recipients: Vec<String>,
    pub trap_weight: i32,
    /// Protocol tests (pregreet, pipelining, non-SMTP) and the tarpit, for
    /// sessions that are not trusted, outbound clients or allowlisted.
    pub protocol_tests: bool,
    /// Wait between `220-` and the final `220 ` for a block with a positive score.
    pub pregreet_wait: Dur,
    /// The same wait for a block with no score (0: one `220 ` line; input
    /// already received before it still fails the test).
    pub pregreet_wait_clean: Dur,
    /// Replies to a suspect stutter at this many bytes per second (0: no tarpit)...
    pub tarpit_rate: u32,
    /// ... for this long from the start of the session.
    pub tarpit_time: Dur,
    /// Most sessions tarpitted at once, in total and per block; past that a
    /// suspect is refused (`421 4.7.0`) instead.
    pub max_tarpitted: usize,
    pub max_tarpitted_per_block: usize,
}

impl Default for SuspectConfig {
    fn default() -> Self {
        SuspectConfig {
            threshold: 1,
            refuse_threshold: 5,
            limit_factor: 0.2,
            reason_ttl: Dur::secs(3_600),
            max_reasons: 16,
            pregreet_weight: 5,
            pipelining_weight: 5,
            non_smtp_weight: 5,
            bare_lf_weight: 2,
            invalid_rcpt_threshold: 5,
            invalid_rcpt_weight: 3,
            trap_recipients: Vec::new(),
            trap_weight: 3,
            protocol_tests: true,
            pregreet_wait: Dur::secs(3),
            pregreet_wait_clean: Dur::secs(0),
            tarpit_rate: 1,
            tarpit_time: Dur::secs(10),
            max_tarpitted: 1_000,
            max_tarpitted_per_block: 4,
        }
    }
}

/// Which sessions greylisting applies to (see `crate::greylist`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GreylistMode {
    /// Only blocks with a positive suspicion score.
    Suspects,
    /// Also pools never seen delivering.
    Unknown,
    /// Every triplet (classic greylisting; the pool memory is not used).
    All,
}

/// Greylisting at RCPT for inbound, untrusted sessions (`src/greylist.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GreylistConfig {
    pub enabled: bool,
    pub mode: GreylistMode,
    /// A retry earlier than this after the first attempt is refused again.
    pub delay: Dur,
    /// A retry later than this after the first attempt starts over.
    pub retry_window: Dur,
    /// A passed triplet or pool is remembered this long (renewed by traffic).
    pub pass_ttl: Dur,
    /// An entry that never passed is kept this long (then counted as never returned).
    pub grey_ttl: Dur,
    /// Most entries (and most passed pools) kept; the oldest go first.
    pub max_entries: usize,
    /// Weight of the `greylist_pass` signal on the block (negative: less suspect).
    pub pass_weight: i32,
    /// The pool is the MAIL FROM domain when SPF passes for the client
    /// (checked through the node's resolver), else the throttle block.
    pub spf_pool: bool,
}

impl Default for GreylistConfig {
    fn default() -> Self {
        GreylistConfig {
            enabled: false,
            mode: GreylistMode::Suspects,
            delay: Dur::secs(60),
            retry_window: Dur::secs(DAY),
            pass_ttl: Dur::secs(36 * DAY),
            grey_ttl: Dur::secs(2 * DAY),
            max_entries: 1_000_000,
            pass_weight: -2,
            spf_pool: true,
        }
    }
}

/// Networks never counted nor refused by the throttle.
/// Recipient verification with the real MX at RCPT (`src/verify.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyConfig {
    /// Probe the real MX of accepted and delegated domains before `250`.
    pub enabled: bool,
    /// The RCPT reply waits at most this long for a probe; then `450 4.2.0`.
    pub timeout: Dur,
    /// A recipient the real MX accepted is not probed again for this long
    /// (also how long an accept-all domain stays marked).
    pub positive_ttl: Dur,
    /// A recipient the real MX refused is refused for this long.
    pub negative_ttl: Dur,
    /// Probes to one domain's real MX per minute at most (per node).
    pub max_probes_per_domain: u32,
    /// Bound of the verdict cache (addresses) and of the per-domain table.
    pub max_cache_entries: usize,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            enabled: true,
            timeout: Dur::secs(6),
            positive_ttl: Dur::secs(7 * 86_400),
            negative_ttl: Dur::secs(3 * 3_600),
            max_probes_per_domain: 60,
            max_cache_entries: 100_000,
        }
    }
}

/// A DKIM signing algorithm (`sign.algorithms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignAlgorithm {
    /// RFC 8463 `ed25519-sha256`.
    Ed25519,
    /// RFC 6376 `rsa-sha256`, 2048-bit keys.
    Rsa,
}

impl SignAlgorithm {
    /// The `k=` tag of the key record, also the key file's middle name.
    pub fn key_type(self) -> &'static str {
        match self {
            SignAlgorithm::Ed25519 => "ed25519",
            SignAlgorithm::Rsa => "rsa",
        }
    }
}

/// DKIM signing of relayed mail (`src/sign.rs`). Off while `domain` is unset.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignConfig {
    /// The network's signing domain (`d=`); signing is off when unset.
    pub domain: Option<String>,
    /// The node's selector (`s=`); default `node.name`.
    pub selector: Option<String>,
    /// The authserv-id of the `Authentication-Results` headers the node
    /// removes (forged by a client) and adds; default `domain`.
    pub authserv_id: Option<String>,
    /// One signature per algorithm (RFC 8463: both, since not every
    /// verifier knows Ed25519).
    pub algorithms: Vec<SignAlgorithm>,
}

impl Default for SignConfig {
    fn default() -> Self {
        SignConfig {
            domain: None,
            selector: None,
            authserv_id: None,
            algorithms: vec![SignAlgorithm::Ed25519, SignAlgorithm::Rsa],
        }
    }
}

/// What `[sign]` means once defaults are filled in (see [`Config::signing`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signing {
    pub domain: String,
    pub selector: String,
    pub authserv_id: String,
    pub algorithms: Vec<SignAlgorithm>,
}

/// A DKIM selector: one or more dot-separated labels of letters, digits
/// and hyphens (RFC 6376 3.1).
/// Room is left in the last label for the key type the node appends
/// (`-ed25519`).
pub fn is_selector(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63 * 4
        && s.rsplit('.').next().is_some_and(|l| l.len() <= 63 - 8)
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    pub networks: Vec<ipnet::IpNet>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without validating (the error names line, column and key).
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.node.data_dir);
        for p in [
            &mut self.gossip.ca,
            &mut self.gossip.cert,
            &mut self.gossip.key,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        if let Some(p) = self.smtp.tls_cert.as_mut() {
            fix(p);
        }
        if let Some(p) = self.policy.network_keys.as_mut() {
            fix(p);
        }
        if let Some(p) = self.smtp.tls_key.as_mut() {
            fix(p);
        }
    }

    /// Checks what the types cannot; every error names its key. One method
    /// per section (its ranges first, then how its keys relate), then the
    /// checks that span sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.node.validate()?;
        self.accept.validate()?;
        self.smtp.validate()?;
        self.relay.validate()?;
        self.dns.validate()?;
        self.admin.validate()?;
        self.throttle.validate()?;
        self.outbound.validate()?;
        self.gossip.validate()?;
        self.policy.validate()?;
        self.dnsbl.validate()?;
        self.verify.validate()?;
        self.greylist.validate()?;
        self.suspect.validate()?;
        if self.accept.mx_delegation && self.node.magic_suffixes.is_empty() {
            return Err(invalid(
                "accept.mx_delegation",
                "needs node.magic_suffixes to know which MX hosts are magic",
            ));
        }
        self.validate_sign()?;
        Ok(())
    }

    /// `[sign]` with its defaults filled in; None when signing is off.
    pub fn signing(&self) -> Option<Signing> {
        let s = &self.sign;
        let domain = normalize_name(s.domain.as_deref()?);
        let selector = s
            .selector
            .clone()
            .unwrap_or_else(|| self.node.name.trim().to_string())
            .to_ascii_lowercase();
        let authserv_id = s
            .authserv_id
            .clone()
            .map(|a| a.trim().to_string())
            .unwrap_or_else(|| domain.clone());
        let mut algorithms = Vec::new();
        for a in &s.algorithms {
            if !algorithms.contains(a) {
                algorithms.push(*a);
            }
        }
        Some(Signing {
            domain,
            selector,
            authserv_id,
            algorithms,
        })
    }

    fn validate_sign(&self) -> Result<(), ConfigError> {
        let s = &self.sign;
        let Some(domain) = &s.domain else {
            for (key, set) in [
                ("sign.selector", s.selector.is_some()),
                ("sign.authserv_id", s.authserv_id.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        key,
                        "needs sign.domain (signing is off without it)",
                    ));
                }
            }
            return Ok(());
        };
        if !is_hostname(domain) {
            return Err(invalid(
                "sign.domain",
                format!("{domain:?} is not a domain name"),
            ));
        }
        match &s.selector {
            Some(sel) if !is_selector(sel) => {
                return Err(invalid(
                    "sign.selector",
                    format!("{sel:?} is not a DKIM selector (labels of letters, digits and hyphens)"),
                ))
            }
            Some(_) => {}
            None if !is_selector(self.node.name.trim()) => {
                return Err(invalid(
                    "sign.selector",
                    format!(
                        "is needed: node.name {:?} is not a DKIM selector (labels of letters, digits and hyphens)",
                        self.node.name
                    ),
                ))
            }
            None => {}
        }
        if let Some(id) = &s.authserv_id {
            // RFC 8601: a token; the header is parsed by its first word.
            let ok = !id.trim().is_empty()
                && id.trim().bytes().all(|b| {
                    b.is_ascii_graphic() && !matches!(b, b';' | b'(' | b')' | b'"' | b'\\')
                });
            if !ok {
                return Err(invalid(
                    "sign.authserv_id",
                    format!("{id:?} is not an authserv-id (one word, no ; ( ) or quotes)"),
                ));
            }
        }
        if s.algorithms.is_empty() {
            return Err(invalid(
                "sign.algorithms",
                "needs at least one of \"ed25519\", \"rsa\" (unset sign.domain to turn signing off)",
            ));
        }
        Ok(())
    }

    /// True if `host` is under one of the magic suffixes (case-insensitive,
    /// trailing dot ignored).
    pub fn is_magic_host(&self, host: &str) -> bool {
        let host = normalize_name(host);
        self.node.magic_suffixes.iter().any(|s| {
            let s = normalize_name(s);
            let s = s.trim_start_matches('.');
            host == s || host.ends_with(&format!(".{s}"))
        })
    }

    /// True if `host` is one of this node's own names.
    pub fn is_own_name(&self, host: &str) -> bool {
        let host = normalize_name(host);
        std::iter::once(&self.node.hostname)
            .chain(self.node.names.iter())
            .any(|n| normalize_name(n) == host)
    }

    /// True if `ip` may relay through the outbound listener.
    pub fn is_outbound_client(&self, ip: std::net::IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.outbound.clients.iter().any(|n| n.contains(&ip))
    }

    /// True if `domain` is listed in `[accept] domains`.
    pub fn is_accepted_domain(&self, domain: &str) -> bool {
        let domain = normalize_name(domain);
        self.accept
            .domains
            .iter()
            .any(|d| normalize_name(d) == domain)
    }
}

impl NodeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(invalid("node.name", "must not be empty"));
        }
        if !is_hostname(&self.hostname) {
            return Err(invalid(
                "node.hostname",
                format!("{:?} is not a valid host name", self.hostname),
            ));
        }
        for s in &self.magic_suffixes {
            if !is_hostname(s.trim_start_matches('.')) {
                return Err(invalid(
                    "node.magic_suffixes",
                    format!("{s:?} is not a domain suffix"),
                ));
            }
        }
        Ok(())
    }
}

impl AcceptConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for d in &self.domains {
            if !is_hostname(d) {
                return Err(invalid(
                    "accept.domains",
                    format!("{d:?} is not a domain name"),
                ));
            }
        }
        Ok(())
    }
}

impl SmtpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
        in_range("smtp.max_line_length", s.max_line_length, 512, 65_536)?;
        in_range("smtp.max_message_size", s.max_message_size, 1024, 1 << 30)?;
        in_range("smtp.max_recipients", s.max_recipients, 1, 100_000)?;
        in_range("smtp.max_connections", s.max_connections, 1, 1_000_000)?;
        in_range(
            "smtp.max_connections_per_block",
            s.max_connections_per_block,
            1,
            1_000_000,
        )?;
        in_range(
            "smtp.max_connections_per_family",
            s.max_connections_per_family,
            1,
            1_000_000,
        )?;
        in_range("smtp.max_errors", s.max_errors, 1, 1_000_000)?;
        dur_in_range(
            "smtp.command_timeout",
            s.command_timeout,
            Dur::secs(1),
            Dur::secs(3_600),
        )?;
        dur_in_range(
            "smtp.data_timeout",
            s.data_timeout,
            Dur::secs(1),
            Dur::secs(3_600),
        )?;
        // Deadlines are added to the clock: bounded, so that never overflows.
        dur_in_range(
            "smtp.session_deadline",
            s.session_deadline,
            Dur::secs(1),
            Dur::secs(DAY),
        )?;
        dur_in_range(
            "smtp.data_deadline",
            s.data_deadline,
            Dur::secs(1),
            Dur::secs(DAY),
        )?;
        in_range("smtp.data_memory", s.data_memory, 1024, 1 << 40)?;
        in_range(
            "smtp.junk_command_limit",
            s.junk_command_limit,
            1,
            1_000_000,
        )?;
        if s.listen.is_empty() {
            return Err(invalid("smtp.listen", "needs at least one address"));
        }
        if s.data_deadline.0 > s.session_deadline.0 {
            return Err(invalid(
                "smtp.data_deadline",
                "must be at most smtp.session_deadline",
            ));
        }
        if s.data_memory < s.max_message_size {
            return Err(invalid(
                "smtp.data_memory",
                "must be at least smtp.max_message_size",
            ));
        }
        match (&s.tls_cert, &s.tls_key) {
            (Some(_), None) => Err(invalid("smtp.tls_key", "is required with smtp.tls_cert")),
            (None, Some(_)) => Err(invalid("smtp.tls_cert", "is required with smtp.tls_key")),
            (Some(c), Some(k)) => {
                readable_file("smtp.tls_cert", c)?;
                readable_file("smtp.tls_key", k)
            }
            (None, None) => Ok(()),
        }
    }
}

impl RelayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let r = self;
        in_range("relay.port", r.port, 1, u16::MAX)?;
        dur_in_range("relay.max_age", r.max_age, ms(1), Dur::secs(365 * DAY))?;
        dur_in_range(
            "relay.retry_initial",
            r.retry_initial,
            ms(1),
            Dur::secs(DAY),
        )?;
        dur_in_range("relay.retry_max", r.retry_max, ms(1), Dur::secs(30 * DAY))?;
        in_range("relay.concurrency", r.concurrency, 1, 10_000)?;
        in_range(
            "relay.destination_concurrency",
            r.destination_concurrency,
            1,
            10_000,
        )?;
        for (key, d) in [
            ("relay.connect_timeout", r.connect_timeout),
            ("relay.greeting_timeout", r.greeting_timeout),
            ("relay.command_timeout", r.command_timeout),
            ("relay.data_timeout", r.data_timeout),
            ("relay.data_block_timeout", r.data_block_timeout),
            ("relay.data_done_timeout", r.data_done_timeout),
        ] {
            dur_in_range(key, d, ms(100), Dur::secs(3_600))?;
        }
        in_range(
            "relay.max_reply_line_length",
            r.max_reply_line_length,
            64,
            65_536,
        )?;
        in_range(
            "relay.max_reply_size",
            r.max_reply_size,
            r.max_reply_line_length,
            1 << 20,
        )?;
        in_range(
            "relay.connection_reuse_limit",
            r.connection_reuse_limit,
            0,
            1_000_000,
        )?;
        dur_in_range(
            "relay.connection_cache_time",
            r.connection_cache_time,
            ms(0),
            Dur::secs(300),
        )?;
        in_range(
            "relay.max_received_headers",
            r.max_received_headers,
            1,
            1_000,
        )?;
        if r.retry_max < r.retry_initial {
            return Err(invalid(
                "relay.retry_max",
                "must not be less than relay.retry_initial",
            ));
        }
        if r.max_age < r.retry_initial {
            return Err(invalid(
                "relay.max_age",
                "must not be less than relay.retry_initial",
            ));
        }
        Ok(())
    }
}

impl DnsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        dur_in_range("dns.timeout", self.timeout, ms(1), Dur::secs(60))
    }
}

impl AdminConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        in_range("admin.max_connections", self.max_connections, 1, 100_000)?;
        dur_in_range(
            "admin.request_timeout",
            self.request_timeout,
            ms(100),
            Dur::secs(3_600),
        )
    }
}

impl ThrottleConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let t = self;
        in_range("throttle.ipv4_prefix", t.ipv4_prefix, 1, 32)?;
        in_range("throttle.ipv6_prefix", t.ipv6_prefix, 1, 128)?;
        dur_in_range("throttle.epoch", t.epoch, ms(100), Dur::secs(DAY))?;
        dur_in_range("throttle.window", t.window, ms(100), Dur::secs(30 * DAY))?;
        for (key, v) in [
            ("throttle.max_connections", t.max_connections),
            ("throttle.max_messages", t.max_messages),
            ("throttle.max_recipients", t.max_recipients),
        ] {
            in_range(key, v, 1, 1_000_000_000)?;
        }
        dur_in_range("throttle.penalty", t.penalty, ms(0), Dur::secs(30 * DAY))?;
        dur_in_range(
            "throttle.max_penalty",
            t.max_penalty,
            ms(0),
            Dur::secs(365 * DAY),
        )?;
        in_range("throttle.polite_refusals", t.polite_refusals, 0, 1_000_000)?;
        in_range(
            "throttle.max_tracked_blocks",
            t.max_tracked_blocks,
            1,
            100_000_000,
        )?;
        dur_in_range("throttle.hold", t.hold, ms(0), Dur::secs(DAY))?;
        dur_in_range(
            "throttle.quarantine_max_age",
            t.quarantine_max_age,
            ms(0),
            Dur::secs(365 * DAY),
        )?;
        if t.window < t.epoch || t.window.0.as_millis() % t.epoch.0.as_millis() != 0 {
            return Err(invalid(
                "throttle.window",
                "must be a whole number of throttle.epoch (at least one)",
            ));
        }
        if t.window.0.as_millis() / t.epoch.0.as_millis() > 10_000 {
            return Err(invalid(
                "throttle.window",
                "is more than 10000 epochs; use a longer throttle.epoch",
            ));
        }
        if t.max_penalty < t.penalty {
            return Err(invalid(
                "throttle.max_penalty",
                "must not be less than throttle.penalty",
            ));
        }
        if !(t.peer_block_share > 0.0 && t.peer_block_share <= 1.0) {
            return Err(invalid(
                "throttle.peer_block_share",
                "must be more than 0 and at most 1",
            ));
        }
        Ok(())
    }
}

impl OutboundConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.is_empty() && self.clients.is_empty() {
            return Err(invalid(
                "outbound.clients",
                "is required with outbound.listen (nobody could use it)",
            ));
        }
        Ok(())
    }
}

impl GossipConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let g = self;
        dur_in_range("gossip.interval", g.interval, ms(10), Dur::secs(3_600))?;
        in_range("gossip.fanout", g.fanout, 1, 1_000)?;
        dur_in_range(
            "gossip.anti_entropy_interval",
            g.anti_entropy_interval,
            ms(1),
            Dur::secs(DAY),
        )?;
        dur_in_range(
            "gossip.failure_timeout",
            g.failure_timeout,
            ms(100),
            Dur::secs(DAY),
        )?;
        in_range(
            "gossip.min_origins_to_refuse",
            g.min_origins_to_refuse,
            1,
            16,
        )?;
        in_range("gossip.owners", g.owners, 1, 16)?;
        if !(g.hot_fraction > 0.0 && g.hot_fraction <= 1.0) {
            return Err(invalid(
                "gossip.hot_fraction",
                "out of range: must be more than 0 and at most 1",
            ));
        }
        if g.enabled {
            for (key, p) in [
                ("gossip.ca", &g.ca),
                ("gossip.cert", &g.cert),
                ("gossip.key", &g.key),
            ] {
                match p {
                    None => return Err(invalid(key, "is required when gossip.enabled = true")),
                    Some(p) => readable_file(key, p)?,
                }
            }
            if g.network.trim().is_empty() {
                return Err(invalid("gossip.network", "must not be empty"));
            }
        }
        if !(g.max_origin_share > 0.0 && g.max_origin_share <= 1.0) {
            return Err(invalid(
                "gossip.max_origin_share",
                "must be more than 0 and at most 1",
            ));
        }
        Ok(())
    }
}

impl PolicyConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let p = self;
        in_range("policy.polite_refusals", p.polite_refusals, 0, 1_000_000)?;
        dur_in_range(
            "policy.polite_period",
            p.polite_period,
            ms(1),
            Dur::secs(365 * DAY),
        )?;
        in_range("policy.max_connections", p.max_connections, 1, 1_000_000)?;
        in_range(
            "policy.max_connections_per_client",
            p.max_connections_per_client,
            1,
            1_000_000,
        )?;
        dur_in_range(
            "policy.request_timeout",
            p.request_timeout,
            ms(100),
            Dur::secs(3_600),
        )?;
        dur_in_range(
            "policy.idle_timeout",
            p.idle_timeout,
            Dur::secs(1),
            Dur::secs(DAY),
        )
    }
}

impl DnsblConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let d = self;
        dur_in_range("dnsbl.timeout", d.timeout, ms(10), Dur::secs(30))?;
        dur_in_range("dnsbl.min_ttl", d.min_ttl, ms(1), Dur::secs(7 * DAY))?;
        dur_in_range("dnsbl.max_ttl", d.max_ttl, ms(1), Dur::secs(7 * DAY))?;
        in_range(
            "dnsbl.max_cache_entries",
            d.max_cache_entries,
            1,
            100_000_000,
        )?;
        dur_in_range("dnsbl.pause", d.pause, ms(1), Dur::secs(7 * DAY))?;
        dur_in_range(
            "dnsbl.health_interval",
            d.health_interval,
            Dur::secs(1),
            Dur::secs(DAY),
        )?;
        if d.sites.len() > crate::dnslist::MAX_SITES {
            return Err(invalid(
                "dnsbl.sites",
                format!("at most {} entries", crate::dnslist::MAX_SITES),
            ));
        }
        for entry in &d.sites {
            crate::dnslist::Site::parse(entry)
                .map_err(|why| invalid("dnsbl.sites", format!("entry {entry:?}: {why}")))?;
        }
        if d.max_ttl < d.min_ttl {
            return Err(invalid(
                "dnsbl.max_ttl",
                "must not be less than dnsbl.min_ttl",
            ));
        }
        Ok(())
    }
}

impl VerifyConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let v = self;
        dur_in_range("verify.timeout", v.timeout, ms(100), Dur::secs(300))?;
        dur_in_range(
            "verify.positive_ttl",
            v.positive_ttl,
            Dur::secs(1),
            Dur::secs(365 * DAY),
        )?;
        dur_in_range(
            "verify.negative_ttl",
            v.negative_ttl,
            Dur::secs(1),
            Dur::secs(365 * DAY),
        )?;
        in_range(
            "verify.max_probes_per_domain",
            v.max_probes_per_domain,
            1,
            1_000_000,
        )?;
        in_range(
            "verify.max_cache_entries",
            v.max_cache_entries,
            1,
            100_000_000,
        )
    }
}

impl GreylistConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let g = self;
        dur_in_range("greylist.delay", g.delay, ms(0), Dur::secs(DAY))?;
        dur_in_range(
            "greylist.retry_window",
            g.retry_window,
            Dur::secs(1),
            Dur::secs(30 * DAY),
        )?;
        if g.retry_window <= g.delay {
            return Err(invalid(
                "greylist.retry_window",
                "must be longer than greylist.delay",
            ));
        }
        dur_in_range(
            "greylist.grey_ttl",
            g.grey_ttl,
            Dur::secs(1),
            Dur::secs(60 * DAY),
        )?;
        if g.grey_ttl < g.retry_window {
            return Err(invalid(
                "greylist.grey_ttl",
                "must not be shorter than greylist.retry_window",
            ));
        }
        dur_in_range(
            "greylist.pass_ttl",
            g.pass_ttl,
            Dur::secs(1),
            Dur::secs(366 * DAY),
        )?;
        in_range("greylist.max_entries", g.max_entries, 1, 100_000_000)?;
        in_range("greylist.pass_weight", g.pass_weight, -1_000_000, 0)
    }
}

impl SuspectConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
        in_range("suspect.threshold", s.threshold, 1, 1_000_000)?;
        in_range("suspect.refuse_threshold", s.refuse_threshold, 1, 1_000_000)?;
        dur_in_range(
            "suspect.reason_ttl",
            s.reason_ttl,
            Dur::secs(1),
            Dur::secs(30 * DAY),
        )?;
        in_range("suspect.max_reasons", s.max_reasons, 1, 256)?;
        in_range(
            "suspect.invalid_rcpt_threshold",
            s.invalid_rcpt_threshold,
            1,
            1_000_000,
        )?;
        if s.refuse_threshold < s.threshold {
            return Err(invalid(
                "suspect.refuse_threshold",
                "must not be less than suspect.threshold",
            ));
        }
        if !(s.limit_factor > 0.0 && s.limit_factor <= 1.0) {
            return Err(invalid(
                "suspect.limit_factor",
                "must be more than 0 and at most 1",
            ));
        }
        for (key, w) in [
            ("suspect.pregreet_weight", s.pregreet_weight),
            ("suspect.pipelining_weight", s.pipelining_weight),
            ("suspect.non_smtp_weight", s.non_smtp_weight),
            ("suspect.bare_lf_weight", s.bare_lf_weight),
            ("suspect.invalid_rcpt_weight", s.invalid_rcpt_weight),
            ("suspect.trap_weight", s.trap_weight),
        ] {
            in_range(key, w, 0, 1_000)?;
        }
        for (key, d) in [
            ("suspect.pregreet_wait", s.pregreet_wait),
            ("suspect.pregreet_wait_clean", s.pregreet_wait_clean),
            ("suspect.tarpit_time", s.tarpit_time),
        ] {
            dur_in_range(key, d, ms(0), Dur::secs(60))?;
        }
        in_range("suspect.tarpit_rate", s.tarpit_rate, 0, 1_000_000)?;
        in_range("suspect.max_tarpitted", s.max_tarpitted, 0, 1_000_000)?;
        if s.max_tarpitted_per_block > s.max_tarpitted {
            return Err(invalid(
                "suspect.max_tarpitted_per_block",
                "must not be more than suspect.max_tarpitted",
            ));
        }
        for t in &s.trap_recipients {
            match t.rsplit_once('@') {
                Some((local, domain)) if !local.is_empty() && is_hostname(domain) => {}
                _ => {
                    return Err(invalid(
                        "suspect.trap_recipients",
                        format!("{t:?} is not an address (local@domain)"),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// `path` must name a readable file.
fn readable_file(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    if !path.is_file() {
        return Err(invalid(
            key,
            format!("{} is not a readable file", path.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[node]\nname = \"n1\"\nhostname = \"mx1.magic.test\"\n";

    #[test]
    fn durations_parse_and_print() {
        assert_eq!("30s".parse::<Dur>().unwrap(), Dur::secs(30));
        assert_eq!("5m".parse::<Dur>().unwrap(), Dur::secs(300));
        assert_eq!("1h".parse::<Dur>().unwrap(), Dur::secs(3600));
        assert_eq!("5d".parse::<Dur>().unwrap(), Dur::secs(432_000));
        assert_eq!(
            "250ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(250)
        );
        assert!("5".parse::<Dur>().is_err());
        assert!("m".parse::<Dur>().is_err());
        assert!("5y".parse::<Dur>().is_err());
        assert_eq!(Dur::secs(300).to_string(), "5m");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        c.validate().unwrap();
        assert_eq!(c.relay.port, 25);
        assert_eq!(c.relay.max_age, Dur::secs(5 * 86_400));
        assert_eq!(c.smtp.max_line_length, 1000);
        // The relay never connects to loopback or private addresses by default.
        for denied in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "fe80::1",
        ] {
            assert!(c.relay.is_denied(denied.parse().unwrap()), "{denied}");
        }
        for allowed in ["192.0.2.1", "8.8.8.8", "2001:db8::1"] {
            assert!(!c.relay.is_denied(allowed.parse().unwrap()), "{allowed}");
        }
        let open = Config::parse(&format!("{MINIMAL}[relay]\ndeny_networks = []\n")).unwrap();
        assert!(!open.relay.is_denied("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn smtp_deadlines_and_junk_limit_are_validated() {
        for (tail, key) in [
            ("session_deadline = \"25h\"\n", "smtp.session_deadline"),
            ("session_deadline = \"0s\"\n", "smtp.session_deadline"),
            ("data_deadline = \"0s\"\n", "smtp.data_deadline"),
            (
                "data_deadline = \"2h\"\nsession_deadline = \"1h\"\n",
                "smtp.data_deadline",
            ),
            ("junk_command_limit = 0\n", "smtp.junk_command_limit"),
            ("data_memory = 1000000\n", "smtp.data_memory"),
        ] {
            let c = Config::parse(&format!("{MINIMAL}[smtp]\n{tail}")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{tail}: {err}");
        }
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.smtp.data_deadline, Dur::secs(600));
        assert_eq!(c.smtp.session_deadline, Dur::secs(1800));
        assert_eq!(c.smtp.junk_command_limit, 100);
        assert_eq!(c.smtp.data_memory, 256 << 20);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse(&format!("{MINIMAL}[smtp]\nmax_lines = 3\n")).unwrap_err();
        assert!(err.contains("max_lines"), "{err}");
    }

    #[test]
    fn bad_duration_is_named() {
        let err = Config::parse(&format!("{MINIMAL}[relay]\nmax_age = \"5 years\"\n")).unwrap_err();
        assert!(err.contains("max_age"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.accept.mx_delegation = true;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("accept.mx_delegation"), "{err}");
        let mut c = Config::parse(MINIMAL).unwrap();
        c.smtp.tls_cert = Some("x.pem".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("smtp.tls_key"));
    }

    #[test]
    fn greylist_windows_must_nest() {
        let text = format!("{MINIMAL}[greylist]\ndelay = \"5m\"\nretry_window = \"5m\"\n");
        let err = Config::parse(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("greylist.retry_window:"), "{err}");
        let text = format!("{MINIMAL}[greylist]\nretry_window = \"3d\"\n");
        let err = Config::parse(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("greylist.grey_ttl:"), "{err}");
        let text = format!("{MINIMAL}[greylist]\nmode = \"some\"\n");
        assert!(Config::parse(&text).is_err());
    }

    #[test]
    fn over_range_values_are_refused_by_key() {
        // (section, key, value): each past what the code can take.
        let cases = [
            ("smtp", "max_connections", "2305843009213693952"),
            ("smtp", "max_connections_per_block", "18446744073709551615"),
            ("smtp", "max_message_size", "18446744073709551615"),
            ("smtp", "max_recipients", "10000000"),
            ("smtp", "command_timeout", "\"100000d\""),
            ("relay", "concurrency", "1000000000"),
            ("relay", "max_age", "\"1000000d\""),
            ("relay", "connection_reuse_limit", "4294967295"),
            ("throttle", "max_tracked_blocks", "18446744073709551615"),
            ("throttle", "max_connections", "4294967295"),
            ("throttle", "hold", "\"100000d\""),
            ("gossip", "fanout", "1000000"),
            ("gossip", "owners", "0"),
            ("gossip", "owners", "100"),
            ("gossip", "hot_fraction", "0.0"),
            ("gossip", "hot_fraction", "1.5"),
            ("policy", "max_connections", "4611686018427387904"),
            ("admin", "max_connections", "4611686018427387904"),
            ("dnsbl", "max_cache_entries", "18446744073709551615"),
            ("suspect", "max_reasons", "100000"),
            ("verify", "timeout", "\"1h\""),
            ("verify", "max_probes_per_domain", "0"),
            ("greylist", "delay", "\"2d\""),
            ("greylist", "pass_ttl", "\"1000d\""),
            ("greylist", "max_entries", "0"),
            ("greylist", "pass_weight", "3"),
        ];
        for (section, key, value) in cases {
            let text = format!("{MINIMAL}[{section}]\n{key} = {value}\n");
            let c = Config::parse(&text).unwrap_or_else(|e| panic!("{section}.{key}: {e}"));
            let err = c
                .validate()
                .expect_err(&format!("{section}.{key} = {value} accepted"));
            let err = err.to_string();
            assert!(
                err.starts_with(&format!("{section}.{key}:")) && err.contains("out of range"),
                "{section}.{key}: {err}"
            );
        }
        // The defaults and the shipped node.toml are inside every range.
        Config::parse(MINIMAL).unwrap().validate().unwrap();
        let shipped = include_str!("../node.toml");
        Config::parse(shipped).unwrap().validate().unwrap();
    }

    #[test]
    fn magic_and_own_names() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.node.magic_suffixes = vec![".magic.test".into()];
        assert!(c.is_magic_host("mx1.magic.test."));
        assert!(c.is_magic_host("MX1.Magic.Test"));
        assert!(!c.is_magic_host("notmagic.test"));
        assert!(!c.is_magic_host("xmagic.test"));
        assert!(c.is_own_name("mx1.magic.test."));
    }
}
