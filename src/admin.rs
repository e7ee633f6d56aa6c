//! The operator's window: the dashboard at `/` (one self-contained HTML
//! page polling the JSON routes), `/metrics` (Prometheus text), `/healthz`,
//! `/status` (JSON: hottest blocks, queue, peers), `/history` (JSON:
//! per-minute tallies of the last hour), `/explain?ip=…`, and the
//! quarantine actions `POST /quarantine/release?id=…` and
//! `POST /quarantine/delete?id=…` used by `magicmx queue quarantine`.
//!
//! A deliberately small HTTP/1.1 responder (one request per connection,
//! bounded request size, timeouts): the admin listener belongs on loopback
//! or a management network, and a handful of routes do not justify a web
//! framework. Metrics are recorded with the `metrics` crate into a
//! Prometheus recorder installed once per process.
//!
//! What a web page in the operator's browser could do is closed off: every
//! request must name this listener in `Host` (its own address, `localhost`
//! or a name in `[admin] hosts`), so a DNS-rebinding page (whose requests
//! carry the attacker's name) is refused; every state change must carry
//! the node's token in `X-Magicmx-Token` (the token is in
//! `data_dir/admin.token`, readable by the operator and the CLI only), a
//! header no cross-site form can send. Connections are bounded by
//! `[admin] max_connections` through the node's one accept loop
//! ([`crate::listener`]), and each must complete within
//! `[admin] request_timeout`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::spool::Spool;
use crate::throttle::{BlockStatus, Throttle};

pub use crate::telemetry::prometheus;

/// What the admin endpoints read from.
#[derive(Clone)]
pub struct Admin {
    pub node: String,
    pub throttle: Arc<Throttle>,
    pub spool: Spool,
    pub relay_wake: Arc<tokio::sync::Notify>,
    pub gossip: Option<Arc<crate::gossip::Gossip>>,
    /// `[dnsbl]` zones, for `/status` (None: no sites).
    pub dnsbl: Option<crate::dnsbl::Dnsbl>,
    /// Names accepted in `Host` besides the listener's own address and
    /// `localhost` (`[admin] hosts`), lower-case.
    pub hosts: Vec<String>,
    /// Required in `X-Magicmx-Token` for every state change.
    pub token: String,
    /// The node's clock (what the throttle decides by).
    pub clock: crate::clock::Clock,
}

/// File under `data_dir` holding the running node's admin token.
pub const TOKEN_FILE: &str = "admin.token";

/// The header that carries the token.
pub const TOKEN_HEADER: &str = "X-Magicmx-Token";

/// A fresh random token (128 bits, hex).
pub fn new_token() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `token` to `data_dir/admin.token`, readable by its owner only.
pub fn write_token(data_dir: &std::path::Path, token: &str) -> std::io::Result<()> {
    use std::io::Write;
    let path = data_dir.join(TOKEN_FILE);
    let _ = std::fs::remove_file(&path);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&path)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()
}

/// The token of the node using `data_dir`, if it is running.
pub fn read_token(data_dir: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(data_dir.join(TOKEN_FILE))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The parts of a request head the routes look at.
#[derive(Debug, Default)]
struct Head<'a> {
    method: &'a str,
    path: &'a str,
    host: Option<&'a str>,
    token: Option<&'a str>,
}

fn parse_head(head: &str) -> Head<'_> {
    let mut lines = head.split("\r\n").flat_map(|l| l.split('\n'));
    let mut parts = lines.next().unwrap_or("").split_whitespace();
    let mut h = Head {
        method: parts.next().unwrap_or(""),
        path: parts.next().unwrap_or(""),
        ..Head::default()
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case("host") {
            h.host = Some(value);
        } else if name.trim().eq_ignore_ascii_case(TOKEN_HEADER) {
            h.token = Some(value);
        }
    }
    h
}

/// The host part of a `Host` value (`name`, `name:port`, `[v6]:port`),
/// lower-case, without a trailing dot.
fn host_name(value: &str) -> String {
    let v = value.trim();
    let name = if let Some(rest) = v.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match v.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => v,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Equal in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[derive(Serialize)]
struct Status {
    node: String,
    queue: QueueStatus,
    tracked_blocks: usize,
    penalised_blocks: usize,
    hottest: Vec<BlockStatus>,
    /// Blocks that are suspects now, and the highest-scoring ones.
    suspect_blocks: usize,
    suspects: Vec<BlockStatus>,
    dnsbl_zones: Vec<crate::dnsbl::ZoneStatus>,
    greylist: GreylistStatus,
    peers: Vec<crate::gossip::PeerStatus>,
    /// `gossip.counts = "owners"`: what this node holds of the design.
    #[serde(skip_serializing_if = "Option::is_none")]
    owners: Option<OwnersStatus>,
}

#[derive(Serialize)]
struct OwnersStatus {
    /// Hot blocks this node has owners' reports of.
    hot_blocks: usize,
    /// Signed counts it keeps for the blocks it owns.
    owned_counts: usize,
}

#[derive(Serialize)]
struct QueueStatus {
    messages: usize,
    quarantined: usize,
    held: usize,
    deferred: usize,
    /// Messages found damaged (never delivered; see `damaged`).
    damaged_count: usize,
    damaged: Vec<crate::spool::Damaged>,
    health: crate::spool::Health,
}

#[derive(Serialize)]
pub struct Explanation {
    pub ip: IpAddr,
    pub trusted: bool,
    pub verdict: String,
    /// Would a recipient from this address be greylisted now, and why.
    pub greylist: crate::greylist::Applies,
    /// The block's owner nodes in this node's view (`gossip.counts =
    /// "owners"`): they sum its counts network-wide.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub owners: Vec<String>,
    /// The owners' latest reports of the block, if it is hot: the node
    /// uses their median (one lying owner cannot move it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub owner_reports: Vec<crate::gossip::HotReportStatus>,
    #[serde(flatten)]
    pub status: BlockStatus,
}

/// `/status`'s greylisting part.
#[derive(Serialize)]
struct GreylistStatus {
    enabled: bool,
    mode: crate::config::GreylistMode,
    /// Triplet entries and passed pools held.
    entries: usize,
    passed_pools: usize,
}

impl Admin {
    /// Refreshes the gauges; called per scrape. From the spool's counters:
    /// a scrape reads nothing from disk, whatever the queue holds.
    fn gauges(&self) -> QueueStatus {
        let now = crate::smtp::unix_now();
        let stats = self.spool.stats(now);
        let health = self.spool.health();
        metrics::gauge!("magicmx_spool_messages").set(stats.messages as f64);
        metrics::gauge!("magicmx_spool_quarantined").set(stats.quarantined as f64);
        metrics::gauge!("magicmx_spool_held").set(stats.held as f64);
        metrics::gauge!("magicmx_spool_deferred").set(stats.deferred as f64);
        metrics::gauge!("magicmx_spool_damaged").set(stats.damaged as f64);
        metrics::gauge!("magicmx_spool_healthy")
            .set(f64::from(u8::from(health == crate::spool::Health::Ok)));
        let q = QueueStatus {
            messages: stats.messages,
            quarantined: stats.quarantined,
            held: stats.held,
            deferred: stats.deferred,
            damaged_count: stats.damaged,
            damaged: if stats.damaged > 0 {
                self.spool.damaged()
            } else {
                Vec::new()
            },
            health,
        };
        metrics::gauge!("magicmx_throttle_tracked_blocks").set(self.throttle.tracked() as f64);
        metrics::gauge!("magicmx_throttle_penalised_blocks")
            .set(self.throttle.penalised(self.clock.now_ms()) as f64);
        metrics::gauge!("magicmx_suspect_blocks")
            .set(self.throttle.suspects(self.clock.now_ms()) as f64);
        for z in self.dnsbl.iter().flat_map(|d| d.status()) {
            metrics::gauge!("magicmx_dnsbl_zone_active", "zone" => z.zone.clone())
                .set(f64::from(u8::from(z.state == "active")));
        }
        q
    }

    pub fn explain(&self, ip: IpAddr) -> Explanation {
        let now = self.clock.now_ms();
        let status = self.throttle.status(self.throttle.block_of(ip), now);
        let trusted = self.throttle.is_trusted(ip);
        let verdict = if trusted {
            "accepted: trusted network, never counted or refused".to_string()
        } else if status.penalty_left_secs > 0 {
            format!(
                "refused: block {} is in the penalty box for {} more seconds (offense {})",
                status.block, status.penalty_left_secs, status.offenses
            )
        } else if let Some(r) = status.suspect.refusal() {
            format!(
                "refused: block {} is refused at connect ({r})",
                status.block
            )
        } else if let Some(r) = status.over {
            format!("refused: block {} is over its limit ({r})", status.block)
        } else if status.suspect.is_suspect() {
            format!(
                "accepted: block {} is a suspect (score {}): lower limits, tarpit",
                status.block, status.suspect.score
            )
        } else {
            format!("accepted: block {} is under its limits", status.block)
        };
        let greylist = match trusted {
            true => crate::greylist::Applies::Disabled,
            false => self.throttle.greylist().applies(
                &status.block.to_string(),
                status.suspect.score,
                now,
            ),
        };
        let (owners, owner_reports) = match (&self.gossip, trusted) {
            (Some(g), false) => (
                g.owners_of(&status.block).unwrap_or_default(),
                g.hot_reports(&status.block),
            ),
            _ => (Vec::new(), Vec::new()),
        };
        Explanation {
            ip,
            trusted,
            verdict,
            greylist,
            owners,
            owner_reports,
            status,
        }
    }

    /// Is `host` (a `Host` header value) a name of this listener, reached
    /// at `local` (the connection's own address)?
    fn host_allowed(&self, host: &str, local: IpAddr) -> bool {
        let name = host_name(host);
        if name == "localhost" || self.hosts.contains(&name) {
            return true;
        }
        name.parse::<IpAddr>()
            .is_ok_and(|ip| crate::smtp::canonical_ip(ip) == crate::smtp::canonical_ip(local))
    }

    /// Checks `Host` and, for a state change, the token; then routes.
    async fn request(
        &self,
        client: IpAddr,
        local: IpAddr,
        head: &Head<'_>,
    ) -> (u16, &'static str, String) {
        const TEXT: &str = "text/plain; charset=utf-8";
        match head.host {
            Some(h) if self.host_allowed(h, local) => {}
            _ => {
                metrics::counter!("magicmx_admin_refusals_total", "reason" => "host").increment(1);
                debug!(%client, host = ?head.host, "admin request for another host");
                return (
                    403,
                    TEXT,
                    "Host is not a name of this listener (see [admin] hosts)\n".into(),
                );
            }
        }
        if head.method != "GET" && !head.token.is_some_and(|t| same_secret(t, &self.token)) {
            metrics::counter!("magicmx_admin_refusals_total", "reason" => "token").increment(1);
            info!(%client, path = head.path, "admin state change without the token");
            return (
                403,
                TEXT,
                format!("a state change needs the {TOKEN_HEADER} header (data_dir/{TOKEN_FILE})\n"),
            );
        }
        self.route(client, head.method, head.path).await
    }

    /// `client` is the peer's address: the quarantine (senders, recipients,
    /// and the power to release or delete mail) is for local operators only,
    /// even when the listener is open to a metrics scraper.
    async fn route(&self, client: IpAddr, method: &str, path: &str) -> (u16, &'static str, String) {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        };
        const JSON: &str = "application/json";
        const TEXT: &str = "text/plain; charset=utf-8";
        const HTML: &str = "text/html; charset=utf-8";
        if path.starts_with("/quarantine") && !crate::addr::canonical_ip(client).is_loopback() {
            return (
                403,
                TEXT,
                "the quarantine is served to loopback clients only\n".into(),
            );
        }
        match (method, path) {
            ("GET", "/") => (200, HTML, self.dashboard(client)),
            ("GET", "/history") => {
                let now = crate::clock::system_ms() / 1000;
                (200, JSON, json(&crate::telemetry::history().last_hour(now)))
            }
            ("GET", "/healthz") => self.health().await,
            ("GET", "/metrics") => {
                self.gauges();
                (200, "text/plain; version=0.0.4", prometheus().render())
            }
            ("GET", "/status") => {
                let queue = self.gauges();
                let now = self.clock.now_ms();
                let s = Status {
                    node: self.node.clone(),
                    queue,
                    tracked_blocks: self.throttle.tracked(),
                    penalised_blocks: self.throttle.penalised(now),
                    hottest: self.throttle.hottest(20, now),
                    suspect_blocks: self.throttle.suspects(now),
                    suspects: self.throttle.top_suspects(20, now),
                    dnsbl_zones: self.dnsbl.as_ref().map(|d| d.status()).unwrap_or_default(),
                    greylist: {
                        let g = self.throttle.greylist();
                        let (entries, passed_pools) = g.len();
                        GreylistStatus {
                            enabled: g.is_enabled(),
                            mode: g.config().mode,
                            entries,
                            passed_pools,
                        }
                    },
                    peers: self.gossip.as_ref().map(|g| g.peers()).unwrap_or_default(),
                    owners: self.gossip.as_ref().and_then(|g| g.owners_sizes()).map(
                        |(hot_blocks, owned_counts)| OwnersStatus {
                            hot_blocks,
                            owned_counts,
                        },
                    ),
                };
                (200, JSON, json(&s))
            }
            ("GET", "/explain") => match param("ip").and_then(|v| v.parse::<IpAddr>().ok()) {
                Some(ip) => (200, JSON, json(&self.explain(ip))),
                None => (400, TEXT, "explain needs ?ip=ADDRESS\n".into()),
            },
            ("GET", "/quarantine") => {
                let list: Vec<_> = self
                    .spool
                    .entries()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|e| e.quarantined)
                    .collect();
                (200, JSON, json(&list))
            }
            ("POST", "/quarantine/release") | ("POST", "/quarantine/delete") => {
                let Some(id) = param("id") else {
                    return (400, TEXT, "needs ?id=QUEUE_ID\n".into());
                };
                let release = path.ends_with("release");
                match self.quarantine_action(&id, release).await {
                    Ok(msg) => (200, TEXT, msg),
                    Err((code, msg)) => (code, TEXT, msg),
                }
            }
            _ => (404, TEXT, "not found\n".into()),
        }
    }

    /// The dashboard page. It carries the token for its release and delete
    /// buttons only when served to a loopback client (who may use the
    /// quarantine anyway); a scraper on a management network gets the page
    /// without it. A cross-site page cannot read it: its requests fail the
    /// `Host` check, and the page itself sets no CORS header.
    fn dashboard(&self, client: IpAddr) -> String {
        const PAGE: &str = include_str!("dashboard.html");
        let token = if crate::addr::canonical_ip(client).is_loopback() {
            self.token.as_str()
        } else {
            ""
        };
        PAGE.replace("{{TOKEN}}", token)
            .replace("{{NODE}}", &html_escape(&self.node))
    }

    /// `/healthz`: 200 while the spool takes writes, 503 with the reason
    /// while it fails (a full disk); a failing spool is probed again first,
    /// so the answer turns 200 as soon as writes succeed again.
    async fn health(&self) -> (u16, &'static str, String) {
        const TEXT: &str = "text/plain; charset=utf-8";
        let health = tokio::time::timeout(Duration::from_secs(3), self.spool.probe())
            .await
            .unwrap_or_else(|_| self.spool.health());
        match health {
            crate::spool::Health::Ok => (200, TEXT, "ok\n".into()),
            crate::spool::Health::Failing { reason, since } => (
                503,
                TEXT,
                format!("spool failing since {since}: {reason}\n"),
            ),
        }
    }

    async fn quarantine_action(&self, id: &str, release: bool) -> Result<String, (u16, String)> {
        let entry = match self.spool.get(id) {
            Ok(Some(e)) if e.quarantined => e,
            Ok(_) => return Err((404, format!("{id}: no such quarantined message\n"))),
            Err(e) => return Err((500, format!("{id}: {e}\n"))),
        };
        if release {
            let mut e = entry;
            e.quarantined = false;
            e.released = true;
            e.next_attempt = crate::smtp::unix_now();
            self.spool
                .update(&e)
                .await
                .map_err(|err| (500, format!("{id}: {err}\n")))?;
            info!(queue_id = id, "released from quarantine");
            self.relay_wake.notify_one();
            Ok(format!("{id}: released\n"))
        } else {
            self.spool
                .remove(id)
                .await
                .map_err(|err| (500, format!("{id}: {err}\n")))?;
            info!(queue_id = id, "deleted from quarantine");
            Ok(format!("{id}: deleted\n"))
        }
    }
}

/// Text made safe for HTML content and attribute values.
fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn json<T: Serialize>(v: &T) -> String {
    let mut s =
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    s.push('\n');
    s
}

/// Serves the admin endpoints until shutdown, at most `max_connections` at
/// once, each request within `timeout`.
pub async fn serve(
    listener: TcpListener,
    admin: Admin,
    max_connections: usize,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let admin = Arc::new(admin);
    let bounds = crate::listener::Bounds {
        name: "admin",
        max_connections,
        busy: Some(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ),
    };
    let handle = move |stream: TcpStream, peer: std::net::SocketAddr| {
        let admin = admin.clone();
        async move {
            let local = stream
                .local_addr()
                .map(|a| a.ip())
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
            if tokio::time::timeout(timeout, handle(stream, peer.ip(), local, &admin))
                .await
                .is_err()
            {
                debug!(%peer, "admin request timed out");
            }
        }
    };
    crate::listener::serve(
        vec![listener],
        bounds,
        |_| crate::listener::Admission::Accept(()),
        handle,
        shutdown,
    )
    .await;
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    client: IpAddr,
    local: IpAddr,
    admin: &Admin,
) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 8192 {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n",
                )
                .await;
            return;
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let head = parse_head(head);
    let (code, ctype, body) = admin.request(client, local, &head).await;
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A one-shot HTTP request to a running node's admin listener (for the CLI).
/// `token` (the node's `admin.token`) is sent for state changes.
pub async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("admin.listen {addr}: connect timed out"))?
        .map_err(|e| anyhow::anyhow!("admin.listen {addr}: {e} (is the node running?)"))?;
    let token = token
        .map(|t| format!("{TOKEN_HEADER}: {t}\r\n"))
        .unwrap_or_default();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{token}Connection: close\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("admin.listen {addr}: bad HTTP response"))?;
    Ok((code, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config as ProptestConfig, TestRunner};

    use crate::config::{ThrottleConfig, TrustConfig};

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// Runs one request through [`handle`] over an in-memory stream.
    async fn exchange(admin: &Admin, request: &[u8]) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(4096);
        let talk = async {
            // The server may answer (431) and close before reading it all.
            let _ = client.write_all(request).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        };
        let ((), out) = tokio::join!(handle(server, LOCAL, LOCAL, admin), talk);
        out
    }

    /// An HTTP/1.1 response with a known status and a correct
    /// Content-Length, or nothing (no complete request head arrived).
    fn check_response(out: &[u8]) -> Option<u16> {
        if out.is_empty() {
            return None;
        }
        let text = std::str::from_utf8(out).expect("UTF-8 response");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or("");
        let code: u16 = status
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status:?}"));
        assert!([200, 400, 403, 404, 431, 500].contains(&code), "{status}");
        if code != 431 {
            let length = lines
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|l| l.parse::<usize>().ok())
                .expect("Content-Length");
            assert_eq!(length, body.len(), "{text}");
        }
        Some(code)
    }

    fn arb_request() -> impl Strategy<Value = Vec<u8>> {
        let method = proptest::sample::select(vec!["GET", "POST", "get", "PUT", "", "GET GET"]);
        let path = proptest::sample::select(vec![
            "/healthz",
            "/metrics",
            "/status",
            "/explain",
            "/quarantine",
            "/quarantine/release",
            "/quarantine/delete",
            "/",
            "",
            "*",
        ]);
        let query = prop_oneof![
            Just(String::new()),
            proptest::sample::select(vec![
                "?ip=192.0.2.1",
                "?ip=::ffff:192.0.2.1",
                "?ip=2001:db8::1",
                "?ip=",
                "?ip",
                "?id=",
                "?id=0000000000000001",
                "?id=../../etc/passwd",
                "?id=%00&id=x",
                "?&&==&?",
            ])
            .prop_map(str::to_string),
            "\\?[ -~]{0,40}",
            "\\?.{0,20}",
        ];
        let tail = proptest::sample::select(vec![
            &b" HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b" HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
            b" HTTP/1.1\n\n",
            b" HTTP/1.1\r\n",
            b"",
        ]);
        prop_oneof![
            4 => (method, path, query, tail).prop_map(|(m, p, q, t)| {
                let mut r = format!("{m} {p}{q}").into_bytes();
                r.extend_from_slice(t);
                r
            }),
            2 => proptest::collection::vec(any::<u8>(), 0..300),
            1 => (any::<u8>(), 0usize..20_000, any::<bool>()).prop_map(|(b, n, end)| {
                let mut r = vec![b; n];
                if end {
                    r.extend_from_slice(b"\r\n\r\n");
                }
                r
            }),
        ]
    }

    #[test]
    fn arbitrary_requests_get_well_formed_answers() {
        let dir = tempfile::tempdir().unwrap();
        let admin = Admin {
            node: "n1".into(),
            throttle: Arc::new(Throttle::new(
                &ThrottleConfig::default(),
                &TrustConfig::default(),
                "n1",
            )),
            spool: Spool::open(dir.path()).unwrap(),
            relay_wake: Arc::new(tokio::sync::Notify::new()),
            gossip: None,
            dnsbl: None,
            hosts: vec!["mgmt.example.net".into()],
            clock: crate::clock::Clock::system(),
            token: "s3cret".into(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let healthz = rt.block_on(exchange(
            &admin,
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:8025\r\n\r\n",
        ));
        assert_eq!(check_response(&healthz), Some(200));
        assert!(healthz.ends_with(b"\r\n\r\nok\n"));
        // The quarantine is for local operators; metrics are for anyone let in.
        let remote: IpAddr = "192.0.2.9".parse().unwrap();
        for (method, path, want) in [
            ("GET", "/quarantine", 403),
            ("POST", "/quarantine/release?id=X", 403),
            ("POST", "/quarantine/delete?id=X", 403),
            ("GET", "/metrics", 200),
        ] {
            let (code, _, _) = rt.block_on(admin.route(remote, method, path));
            assert_eq!(code, want, "{method} {path} from {remote}");
        }
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let (code, _, _) = rt.block_on(admin.route(mapped, "GET", "/quarantine"));
        assert_eq!(code, 200);
        let mut runner = TestRunner::new(ProptestConfig::with_cases(256));
        runner
            .run(&arb_request(), |request| {
                let out = rt.block_on(exchange(&admin, &request));
                let code = check_response(&out);
                let head_end = request.windows(4).position(|w| w == b"\r\n\r\n");
                match head_end {
                    None => prop_assert!(code.is_none() || code == Some(431)),
                    // The head is read in chunks of up to 1024 octets.
                    Some(p) if p + 4 + 1024 <= 8192 => {
                        prop_assert!(code.is_some() && code != Some(431))
                    }
                    Some(_) => prop_assert!(code.is_some()),
                }
                Ok(())
            })
            .unwrap();
    }

    /// A DNS-rebinding page names its own host; a cross-site form cannot
    /// send the token header. Both are refused; the operator's requests pass.
    #[test]
    fn host_and_token_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let admin = Admin {
            node: "n1".into(),
            throttle: Arc::new(Throttle::new(
                &ThrottleConfig::default(),
                &TrustConfig::default(),
                "n1",
            )),
            spool: Spool::open(dir.path()).unwrap(),
            relay_wake: Arc::new(tokio::sync::Notify::new()),
            gossip: None,
            dnsbl: None,
            hosts: vec!["mgmt.example.net".into()],
            clock: crate::clock::Clock::system(),
            token: "s3cret".into(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let code = |req: &str| {
            let out = rt.block_on(exchange(&admin, req.as_bytes()));
            check_response(&out).expect("an answer")
        };
        for host in [
            "127.0.0.1:8025",
            "127.0.0.1",
            "localhost:8025",
            "LOCALHOST",
            "mgmt.example.net:9000",
            "Mgmt.Example.Net.",
        ] {
            assert_eq!(
                code(&format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n")),
                200,
                "{host}"
            );
        }
        for host in ["evil.example:8025", "127.0.0.2:8025", "", "[::1]:8025"] {
            assert_eq!(
                code(&format!("GET /quarantine HTTP/1.1\r\nHost: {host}\r\n\r\n")),
                403,
                "{host:?}"
            );
        }
        assert_eq!(code("GET /healthz HTTP/1.1\r\n\r\n"), 403, "no Host");
        let post = |extra: &str| {
            code(&format!(
                "POST /quarantine/delete?id=X HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Content-Type: application/x-www-form-urlencoded\r\n\r\n"
            ))
        };
        assert_eq!(post(""), 403, "a form post without the token");
        assert_eq!(post("X-Magicmx-Token: guess\r\n"), 403, "a wrong token");
        assert_eq!(
            post("x-magicmx-token: s3cret\r\n"),
            404,
            "the operator (no such message)"
        );
        assert_eq!(host_name("[::1]:80"), "::1");
        assert_eq!(host_name("a.b:80"), "a.b");
    }
}
