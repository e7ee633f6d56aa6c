//! magicmx: one node of a network of throttling relay MX servers.
//!
//! Data flows one way: `smtp` accepts mail (asking `dns` whether a recipient
//! domain is ours), `spool` makes it durable before the `250`, and `relay`
//! takes due messages from the spool and delivers them to the domain's real
//! MX. `run` wires the parts together under one shutdown signal.

pub mod addr;
pub mod admin;
pub mod clock;
pub mod config;
pub mod demo;
pub mod dns;
pub mod dnsbl;
pub mod dnslist;
pub mod gossip;
pub mod greylist;
pub mod hops;
pub mod listener;
pub mod names;
pub mod netkeys;
pub mod policy;
pub mod relay;
pub mod reply;
pub mod sign;
pub mod slots;
pub mod smtp;
pub mod spool;
pub mod suspect;
pub mod telemetry;
pub mod throttle;
pub mod verify;
pub mod zone;

use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use clock::Clock;
pub use config::Config;

/// File under `data_dir` holding the bound admin address of the running node.
pub const ADMIN_ADDR_FILE: &str = "admin.addr";

/// The admin address of the node that uses `config`: the one it bound (from
/// `data_dir/admin.addr`) when the config leaves the port to the system.
pub fn admin_addr(config: &Config) -> Option<std::net::SocketAddr> {
    let configured = config.admin.listen?;
    if configured.port() != 0 {
        return Some(configured);
    }
    std::fs::read_to_string(config.node.data_dir.join(ADMIN_ADDR_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// A running node: its parts, for the binary and for in-process tests.
pub struct Node {
    pub config: Arc<Config>,
    pub spool: spool::Spool,
    pub throttle: Arc<throttle::Throttle>,
    /// Bound SMTP addresses (useful when the config says port 0).
    pub smtp_addrs: Vec<std::net::SocketAddr>,
    /// Bound outbound (smarthost) addresses.
    pub outbound_addrs: Vec<std::net::SocketAddr>,
    pub admin_addr: Option<std::net::SocketAddr>,
    /// Bound `[policy] listen` address.
    pub policy_addr: Option<std::net::SocketAddr>,
    /// The clock every part reads (windows, penalties, epochs, schedules).
    pub clock: Clock,
    shutdown: CancellationToken,
    tasks: Essential,
}

impl Node {
    /// Opens the spool (recovering the queue), binds the listeners and starts
    /// every task. The node runs until `shutdown` is cancelled.
    pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Node> {
        Node::start_with_clock(config, shutdown, Clock::system()).await
    }

    /// [`Node::start`] on a given clock (tests pass a manual one).
    pub async fn start_with_clock(
        config: Config,
        shutdown: CancellationToken,
        clock: Clock,
    ) -> anyhow::Result<Node> {
        Node::start_with(config, shutdown, clock, spool::OpenOptions::default()).await
    }

    /// [`Node::start_with_clock`], opening the spool with `spool_options`
    /// (`magicmx run --new-spool`).
    pub async fn start_with(
        config: Config,
        shutdown: CancellationToken,
        clock: Clock,
        spool_options: spool::OpenOptions,
    ) -> anyhow::Result<Node> {
        let config = Arc::new(config);
        telemetry::prometheus();
        let spool = spool::Spool::open_with(&config.node.data_dir.join("spool"), spool_options)
            .with_context(|| {
                format!(
                    "node.data_dir: cannot open the spool in {}",
                    config.node.data_dir.display()
                )
            })?;
        let dns = dns::Dns::new(&config.dns).context("dns: cannot create the resolver")?;
        let mut throttle =
            throttle::Throttle::new(&config.throttle, &config.trust, &config.node.name)
                .with_peer_share(config.gossip.max_origin_share)
                .with_min_origins(config.gossip.min_origins_to_refuse)
                .with_suspect(suspect::Policy::from_config(&config))
                .with_greylist(greylist::Greylist::new(&config.greylist));
        if config.gossip.enabled && config.gossip.counts == config::GossipCounts::Owners {
            throttle = throttle.with_change_feed();
        }
        let throttle = Arc::new(throttle);
        let signer = match config.signing() {
            Some(signing) => {
                let (keys, _made) = sign::load_or_create(&signing, &config.node.data_dir, true)
                    .context("sign: cannot load the DKIM keys")?;
                info!(domain = %signing.domain, selector = %signing.selector, keys = keys.keys.len(), "DKIM signing on");
                Some(Arc::new(sign::Signer::new(
                    signing,
                    keys,
                    &dns,
                    &config.node.hostname,
                    config.dns.timeout.0,
                )))
            }
            None => None,
        };
        let verifier = Arc::new(verify::Verifier::new(
            config.clone(),
            dns.clone(),
            clock.clone(),
        ));
        let dnsbl =
            dnsbl::Dnsbl::new(&config.dnsbl, dns.clone()).map_err(|e| anyhow::anyhow!(e))?;
        let relay = relay::Relay::new(config.clone(), spool.clone(), dns.clone())
            .with_verifier(Arc::new(UnknownUsers(
                verifier.clone(),
                throttle.clone(),
                clock.clone(),
            )))
            .with_gate(Arc::new(ThrottleGate(
                throttle.clone(),
                config.clone(),
                clock.clone(),
            )))
            .with_clock(clock.clone());
        let wake = relay.wake();
        let ctx = Arc::new(
            smtp::Context::new(
                config.clone(),
                spool.clone(),
                dns,
                wake.clone(),
                throttle.clone(),
                dnsbl.is_enabled().then(|| dnsbl.clone()),
            )?
            .with_verifier(verifier.clone())
            .with_signer(signer)
            .with_clock(clock.clone()),
        );
        let listeners = smtp::bind(&config.smtp.listen, "smtp.listen").await?;
        let outbound = smtp::bind(&config.outbound.listen, "outbound.listen").await?;
        let outbound_addrs = outbound
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let smtp_addrs: Vec<std::net::SocketAddr> = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let admin_listener = match config.admin.listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("admin.listen: cannot bind {addr}: {e}"))?;
                info!(addr = %l.local_addr()?, "admin listening");
                Some(l)
            }
            None => None,
        };
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(addr) = admin_addr {
            // The CLI finds the running node here (the config may say port 0).
            let _ = std::fs::write(config.node.data_dir.join(ADMIN_ADDR_FILE), addr.to_string());
        }
        // The CLI proves it runs as the operator with this token (state changes).
        let admin_token = match admin_addr {
            Some(_) => {
                let token = admin::new_token();
                admin::write_token(&config.node.data_dir, &token).with_context(|| {
                    format!(
                        "node.data_dir: cannot write {}",
                        config.node.data_dir.join(admin::TOKEN_FILE).display()
                    )
                })?;
                Some(token)
            }
            None => None,
        };
        let gossip = if config.gossip.enabled {
            // Announce the bound SMTP addresses (the config may say port 0).
            let mut c = (*config).clone();
            c.smtp.listen = smtp_addrs.clone();
            Some(Arc::new(
                gossip::Gossip::start(
                    Arc::new(c),
                    throttle.clone(),
                    config.verify.enabled.then(|| verifier.clone()),
                    shutdown.clone(),
                )
                .await?,
            ))
        } else {
            None
        };
        let policy_listener = match config.policy.listen {
            Some(addr) => Some((
                policy::bind(addr).await?,
                policy::open_network_keys(&config)?,
            )),
            None => None,
        };
        let policy_addr = policy_listener
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok());
        info!(node = %config.node.name, queued = spool.len().unwrap_or(0), "node started");

        let mut tasks = Essential::default();
        tasks.spawn("relay", relay.run(shutdown.clone()));
        if dnsbl.is_enabled() {
            // Health checks and cache expiry; with no zones there is nothing
            // to run (and an essential task must not end before shutdown).
            tasks.spawn("dnsbl", dnsbl.clone().run(shutdown.clone()));
        }
        tasks.spawn(
            "spool control",
            spool::serve_control(spool.clone(), shutdown.clone()),
        );
        if !outbound.is_empty() {
            tasks.spawn(
                "outbound listener",
                smtp::serve(outbound, Arc::new(ctx.outbound()), shutdown.clone()),
            );
        }
        tasks.spawn(
            "smtp listener",
            smtp::serve(listeners, ctx, shutdown.clone()),
        );
        if let Some(l) = admin_listener {
            let a = admin::Admin {
                node: config.node.name.clone(),
                throttle: throttle.clone(),
                spool: spool.clone(),
                relay_wake: wake,
                gossip: gossip.clone(),
                dnsbl: dnsbl.is_enabled().then(|| dnsbl.clone()),
                hosts: config
                    .admin
                    .hosts
                    .iter()
                    .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                    .collect(),
                token: admin_token.clone().unwrap_or_default(),
                clock: clock.clone(),
            };
            tasks.spawn(
                "admin listener",
                admin::serve(
                    l,
                    a,
                    config.admin.max_connections,
                    config.admin.request_timeout.0,
                    shutdown.clone(),
                ),
            );
        }
        if let Some((l, network_keys)) = policy_listener {
            let peers: Option<policy::PeerAddrs> = gossip.clone().map(|g| {
                Arc::new(move || g.member_smtp_addrs().into_iter().map(|a| a.ip()).collect())
                    as policy::PeerAddrs
            });
            let mut server =
                policy::PolicyServer::new(policy::PolicySettings::from_config(&config), peers);
            if let Some(keys) = network_keys {
                server = server.with_network_keys(keys);
            }
            if let Some(g) = gossip.clone() {
                server = server.with_member_keys(Arc::new(move |key| g.member_with_key(key)));
            }
            tasks.spawn("policy listener", server.serve(l, shutdown.clone()));
        }
        if let Some(g) = gossip.clone() {
            // Its loops are essential too; joined at shutdown so that the
            // SWIM leave goes out before exit.
            tasks.spawn("gossip", async move { g.run().await });
        }
        tasks.spawn(
            "throttle sweep",
            sweep(
                throttle.clone(),
                config.throttle.epoch.0,
                clock.clone(),
                shutdown.clone(),
            ),
        );
        Ok(Node {
            config,
            spool,
            throttle,
            smtp_addrs,
            outbound_addrs,
            admin_addr,
            policy_addr,
            clock,
            shutdown,
            tasks,
        })
    }

    /// Waits until shutdown was requested and every task ended, then closes
    /// the spool (last, so that sessions storing a message finish first).
    ///
    /// Every task started here runs until shutdown. One that panics or ends
    /// before is a fault (a listener that died would leave a node that looks
    /// up but accepts nothing): it is logged, the node shuts down, and the
    /// error is returned so that `magicmx run` exits non-zero and the service
    /// manager restarts it.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let fault = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => None,
            f = self.tasks.first_fault(&self.shutdown) => f,
        };
        if let Some(why) = &fault {
            tracing::error!(reason = %why, "essential task failed; shutting the node down");
            metrics::counter!("magicmx_node_task_failures_total").increment(1);
            self.shutdown.cancel();
        }
        let drain = self.tasks.drain();
        match fault {
            // A fault: the rest gets a bounded time to answer 421 and stop.
            Some(_) => {
                if tokio::time::timeout(FAULT_DRAIN, drain).await.is_err() {
                    tracing::warn!("tasks still running after a fault; aborting them");
                    self.tasks.set.abort_all();
                }
            }
            None => drain.await,
        }
        self.spool.close().await;
        info!("node stopped");
        match fault {
            Some(why) => Err(anyhow::anyhow!(why)),
            None => Ok(()),
        }
    }
}

/// How long the other tasks get to stop after one of them failed.
const FAULT_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The node's tasks, each named, in one `JoinSet` so that the first one to
/// end (or panic) is seen at once.
#[derive(Default)]
struct Essential {
    set: tokio::task::JoinSet<()>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
}

impl Essential {
    fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let task = fault::inject(name, task);
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// The first task to end while `shutdown` is not cancelled, as a reason.
    /// Pending for ever if none does.
    async fn first_fault(&mut self, shutdown: &CancellationToken) -> Option<String> {
        loop {
            let Some(r) = self.set.join_next_with_id().await else {
                // No task at all: nothing can fail.
                std::future::pending::<()>().await;
                return None;
            };
            let (id, what) = match r {
                Ok((id, ())) => (id, "ended before shutdown".to_string()),
                Err(e) => {
                    let id = e.id();
                    (id, describe(e))
                }
            };
            if shutdown.is_cancelled() {
                continue;
            }
            let name = self.names.get(&id).copied().unwrap_or("task");
            return Some(format!("{name} {what}"));
        }
    }

    /// Waits for every remaining task; panics during shutdown are logged.
    async fn drain(&mut self) {
        while let Some(r) = self.set.join_next_with_id().await {
            if let Err(e) = r {
                if e.is_panic() {
                    let name = self.names.get(&e.id()).copied().unwrap_or("task");
                    tracing::error!(task = name, reason = %describe(e), "task failed during shutdown");
                }
            }
        }
    }
}

/// "panicked: MESSAGE" (or "was cancelled").
fn describe(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return "was cancelled".to_string();
    }
    let p = e.into_panic();
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string());
    format!("panicked: {msg}")
}

/// A test-only fault: in a build with the `fault-hooks` feature,
/// `MAGICMX_TEST_PANIC_TASK=NAME` makes the task of that name panic shortly
/// after the node started, so tests can check that the node goes down with
/// it. A build without the feature (every build for use) does not read the
/// variable.
mod fault {
    use std::future::Future;
    use std::pin::Pin;

    pub(super) fn inject<F>(name: &'static str, task: F) -> Pin<Box<dyn Future<Output = ()> + Send>>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        #[cfg(feature = "fault-hooks")]
        if std::env::var("MAGICMX_TEST_PANIC_TASK").is_ok_and(|v| v == name) {
            return Box::pin(async move {
                tokio::select! {
                    _ = task => {}
                    _ = tokio::time::sleep(std::time::Duration::from_millis(300)) => {
                        panic!("injected fault (MAGICMX_TEST_PANIC_TASK={name})")
                    }
                }
            });
        }
        #[cfg(not(feature = "fault-hooks"))]
        let _ = name;
        Box::pin(task)
    }
}

/// Runs a node until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with(config, shutdown, spool::OpenOptions::default()).await
}

/// [`run`], opening the spool with `spool_options`.
pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    spool_options: spool::OpenOptions,
) -> anyhow::Result<()> {
    Node::start_with(config, shutdown, Clock::system(), spool_options)
        .await?
        .wait()
        .await
}

/// Forgets idle blocks once per epoch, keeping the table bounded.
async fn sweep(
    throttle: Arc<throttle::Throttle>,
    every: std::time::Duration,
    clock: Clock,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every.max(std::time::Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let now = clock.now_ms();
                let gone = throttle.sweep(now);
                if throttle.greylist().is_enabled() {
                    throttle.greylist().sweep(now);
                }
                if gone > 0 {
                    tracing::debug!(gone, tracked = throttle.tracked(), "swept idle blocks");
                }
            }
        }
    }
}

/// The release check of held mail: a message whose source block is over a
/// limit network-wide when its hold ends goes to quarantine. The relay asks
/// only for inbound mail (the spool records each message's origin), so
/// outbound clients' mail and DSNs are never held back.
struct ThrottleGate(Arc<throttle::Throttle>, Arc<Config>, Clock);

/// Where the relay's `5.1.1` after acceptance goes: a negative verification
/// entry, and an invalid recipient for the client's block.
struct UnknownUsers(Arc<verify::Verifier>, Arc<throttle::Throttle>, Clock);

impl relay::UnknownRecipients for UnknownUsers {
    fn record_unknown(&self, address: &str, client: Option<std::net::IpAddr>) {
        self.0.record_unknown(address);
        if let Some(ip) = client {
            let v = self.1.on_invalid_recipient(ip, address, self.2.now_ms());
            info!(
                client = %ip,
                block = %self.1.block_of(ip),
                rcpt = address,
                level = ?v.level,
                "unknown recipient at relay time counted for the block"
            );
        }
    }
}

impl relay::ReleaseGate for ThrottleGate {
    fn quarantine_reason(&self, client: std::net::IpAddr) -> Option<String> {
        if !self.1.throttle.enabled {
            return None;
        }
        self.0
            .over_limit(client, self.2.now_ms())
            .map(|r| format!("block {} over its limit ({r})", self.0.block_of(client)))
    }
}

/// The `queue list` table: one line per message, then the damaged
/// messages (never delivered, kept for `queue salvage`) with the reason.
pub fn spool_listing(entries: &[spool::QueueEntry], damaged: &[spool::Damaged]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<18} {:<30} {:>8} {:<20} {:<40} last error",
        "id", "sender", "attempts", "next attempt", "recipients"
    );
    for e in entries {
        let pending: Vec<&str> = e
            .envelope
            .recipients
            .iter()
            .filter(|r| r.state == spool::RcptState::Pending)
            .map(|r| r.address.as_str())
            .collect();
        let next = chrono::DateTime::from_timestamp(e.next_attempt as i64, 0)
            .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        let sender = if e.envelope.sender.is_empty() {
            "<>"
        } else {
            e.envelope.sender.as_str()
        };
        let state = if e.quarantined { " [quarantined]" } else { "" };
        let _ = writeln!(
            out,
            "{:<18} {:<30} {:>8} {:<20} {:<40} {}{}",
            e.id,
            sender,
            e.attempts,
            next,
            pending.join(","),
            e.last_error.as_deref().unwrap_or("-"),
            state
        );
    }
    let _ = writeln!(out, "{} message(s)", entries.len());
    if !damaged.is_empty() {
        let _ = writeln!(
            out,
            "damaged (kept on disk, never delivered; `magicmx queue salvage` copies the readable ones out):"
        );
        for d in damaged {
            let _ = writeln!(out, "{:<18} [damaged] {}", d.id, d.reason);
        }
        let _ = writeln!(out, "{} damaged", damaged.len());
    }
    out
}
