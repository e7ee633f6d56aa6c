//! The operator's window: `/metrics` (Prometheus text), `/healthz`,
//! `/status` (JSON: hottest blocks, queue), `/explain?ip=…`, and the
//! quarantine actions `POST /quarantine/release?id=…` and
//! `POST /quarantine/delete?id=…` used by `magicmx queue quarantine`.
//!
//! A deliberately small HTTP/1.1 responder (one request per connection,
//! bounded request size, timeouts): the admin listener belongs on loopback
//! or a management network, and three GET routes do not justify a web
//! framework. Metrics are recorded with the `metrics` crate into a
//! Prometheus recorder installed once per process.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::spool::Spool;
use crate::throttle::{now_ms, BlockStatus, Throttle};

/// The process-wide Prometheus recorder (installed on first use).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first (tests); then
        // this handle renders nothing, which is harmless.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// What the admin endpoints read from.
#[derive(Clone)]
pub struct Admin {
    pub node: String,
    pub throttle: Arc<Throttle>,
    pub spool: Spool,
    pub relay_wake: Arc<tokio::sync::Notify>,
    pub gossip: Option<Arc<crate::gossip::Gossip>>,
}

#[derive(Serialize)]
struct Status {
    node: String,
    queue: QueueStatus,
    tracked_blocks: usize,
    penalised_blocks: usize,
    hottest: Vec<BlockStatus>,
    peers: Vec<crate::gossip::PeerStatus>,
}

#[derive(Serialize)]
struct QueueStatus {
    messages: usize,
    quarantined: usize,
    held: usize,
}

#[derive(Serialize)]
pub struct Explanation {
    pub ip: IpAddr,
    pub trusted: bool,
    pub verdict: String,
    #[serde(flatten)]
    pub status: BlockStatus,
}

impl Admin {
    /// Refreshes the gauges; called per scrape.
    fn gauges(&self) -> QueueStatus {
        let now = crate::smtp::unix_now();
        let entries = self.spool.entries().unwrap_or_default();
        let quarantined = entries.iter().filter(|e| e.quarantined).count();
        let held = entries
            .iter()
            .filter(|e| !e.quarantined && e.attempts == 0 && !e.released && e.next_attempt > now)
            .count();
        let q = QueueStatus {
            messages: entries.len(),
            quarantined,
            held,
        };
        metrics::gauge!("magicmx_spool_messages").set(q.messages as f64);
        metrics::gauge!("magicmx_spool_quarantined").set(q.quarantined as f64);
        metrics::gauge!("magicmx_spool_held").set(q.held as f64);
        metrics::gauge!("magicmx_throttle_tracked_blocks").set(self.throttle.tracked() as f64);
        metrics::gauge!("magicmx_throttle_penalised_blocks")
            .set(self.throttle.penalised(now_ms()) as f64);
        q
    }

    pub fn explain(&self, ip: IpAddr) -> Explanation {
        let now = now_ms();
        let status = self.throttle.status(self.throttle.block_of(ip), now);
        let trusted = self.throttle.is_trusted(ip);
        let verdict = if trusted {
            "accepted: trusted network, never counted or refused".to_string()
        } else if status.penalty_left_secs > 0 {
            format!(
                "refused: block {} is in the penalty box for {} more seconds (offense {})",
                status.block, status.penalty_left_secs, status.offenses
            )
        } else if let Some(r) = status.over {
            format!("refused: block {} is over its limit ({r})", status.block)
        } else {
            format!("accepted: block {} is under its limits", status.block)
        };
        Explanation {
            ip,
            trusted,
            verdict,
            status,
        }
    }

    async fn route(&self, method: &str, path: &str) -> (u16, &'static str, String) {
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
        match (method, path) {
            ("GET", "/healthz") => (200, TEXT, "ok\n".into()),
            ("GET", "/metrics") => {
                self.gauges();
                (200, "text/plain; version=0.0.4", prometheus().render())
            }
            ("GET", "/status") => {
                let queue = self.gauges();
                let now = now_ms();
                let s = Status {
                    node: self.node.clone(),
                    queue,
                    tracked_blocks: self.throttle.tracked(),
                    penalised_blocks: self.throttle.penalised(now),
                    hottest: self.throttle.hottest(20, now),
                    peers: self.gossip.as_ref().map(|g| g.peers()).unwrap_or_default(),
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

fn json<T: Serialize>(v: &T) -> String {
    let mut s =
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    s.push('\n');
    s
}

/// Serves the admin endpoints until shutdown.
pub async fn serve(listener: TcpListener, admin: Admin, shutdown: CancellationToken) {
    let admin = Arc::new(admin);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            if let Err(e) =
                tokio::time::timeout(Duration::from_secs(10), handle(stream, &admin)).await
            {
                debug!(%peer, error = %e, "admin request timed out");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, admin: &Admin) {
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
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, ctype, body) = admin.route(method, path).await;
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
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
pub async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("admin.listen {addr}: connect timed out"))?
        .map_err(|e| anyhow::anyhow!("admin.listen {addr}: {e} (is the node running?)"))?;
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
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
