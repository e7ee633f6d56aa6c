//! Screening a connection by who sends: the suspect pipeline at the socket.
//!
//! At connect ([`at_connect`]), a session that is not trusted nor an
//! outbound client has its address looked up in `[dnsbl] sites` (fail open,
//! within `timeout`); listings go into its block's state in the throttle
//! (gossiped from there), an allowlisting counts for this address only. The
//! block's verdict then decides: refused (`550 5.7.1` and the reason),
//! suspect (tarpit, lower limits: the throttle applies those itself) or
//! clean; an allowlisted sender skips the protocol tests and the tarpit.
//!
//! The pregreet test ([`pregreet`]) sends `220-`, waits (longer for a block
//! that already has a score) and fails a client that talks before the final
//! `220 `. The other tests run inside the session ([`super::session`]
//! reports them as events); [`Screen::failed`] scores them.
//!
//! The tarpit ([`Screen::write`]) writes a suspect's replies a byte at a
//! time at `tarpit_rate` for the first `tarpit_time` of the session: a timer
//! per byte, no thread. Tarpitted sessions are bounded in total and per
//! block by slots held for the session; past the bound a suspect is refused
//! with `421` instead, so that a botnet cannot fill memory with slow sessions.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::info;

use super::Context;
use crate::slots::{KeyedSlots, Slot};
use crate::suspect::{ProtocolTest, Verdict};
use crate::throttle::Block;

/// Longest a tarpit may run (`[suspect] tarpit_time` is validated below it).
pub const MAX_TARPIT: Duration = Duration::from_secs(60);
/// Most bytes taken from a pregreeting client (they are then fed to the session).
const MAX_PREGREET: usize = 4096;

/// The bounds of the tarpit, shared by every connection of a listener.
pub struct Tarpits {
    total: Arc<KeyedSlots<()>>,
    per_block: Arc<KeyedSlots<Block>>,
}

impl Tarpits {
    pub fn new(max_total: usize, max_per_block: usize) -> Tarpits {
        Tarpits {
            total: KeyedSlots::new(max_total),
            per_block: KeyedSlots::new(max_per_block),
        }
    }

    fn take(&self, block: Block) -> Option<(Slot<()>, Slot<Block>)> {
        let per_block = self.per_block.try_take(block)?;
        let total = self.total.try_take(())?;
        Some((total, per_block))
    }
}

/// What screening decided for one connection.
#[derive(Default)]
pub struct Screen {
    /// Signals of this session count against its block (not trusted, not
    /// an outbound client, not allowlisted): invalid recipients, traps.
    pub scored: bool,
    /// Run the protocol tests too (`[suspect] protocol_tests`).
    pub tests: bool,
    /// The wait between `220-` and `220 `; None: no pregreet test.
    pub pregreet_wait: Option<Duration>,
    /// Tarpit until then, at this many bytes per second.
    tarpit: Option<(Instant, u32)>,
    _tarpit_slots: Option<(Slot<()>, Slot<Block>)>,
}

/// [`at_connect`]'s answer.
pub enum Connect {
    Go(Screen),
    /// Write this reply line (no CRLF) and close.
    Refuse(String),
}

/// Scores the connection from `ip` and decides how to serve it. Exempt
/// sessions (trusted networks, outbound clients) are not asked about.
pub async fn at_connect(ctx: &Context, ip: IpAddr) -> Connect {
    let cfg = &ctx.config.suspect;
    let throttle = &ctx.throttle;
    let policy = throttle.policy();
    let mut own = Vec::new();
    if let Some(d) = ctx.dnsbl.as_ref().filter(|d| d.is_enabled()) {
        // Each zone is bounded by `timeout` already; this bounds the whole.
        let budget = ctx.config.dnsbl.timeout.0 + Duration::from_millis(50);
        let score = tokio::time::timeout(budget, d.lookup(ip))
            .await
            .unwrap_or_default();
        let now = ctx.clock.now_ms();
        let (allow, list): (Vec<_>, Vec<_>) = policy
            .dnsbl_signals(&score, now)
            .into_iter()
            .partition(|(_, s)| s.weight < 0);
        if !list.is_empty() {
            throttle.add_signals(ip, list, now);
        }
        own = allow;
    }
    let v = throttle.suspect_verdict_with(ip, &own, ctx.clock.now_ms());
    metrics::counter!("magicmx_suspect_connections_total", "level" => level_name(&v)).increment(1);
    if let Some(r) = v.refusal() {
        info!(client = %ip, block = %throttle.block_of(ip), score = v.score, reason = %r, "suspect refused at connect");
        return Connect::Refuse(format!("550 5.7.1 {r}"));
    }
    let scored = !v.is_allowlisted();
    let tests = scored && cfg.protocol_tests;
    let mut screen = Screen {
        scored,
        tests,
        ..Screen::default()
    };
    if !tests {
        return Connect::Go(screen);
    }
    screen.pregreet_wait = Some(match v.score > 0 {
        true => cfg.pregreet_wait.0,
        false => cfg.pregreet_wait_clean.0,
    });
    if v.is_suspect() && cfg.tarpit_rate > 0 && !cfg.tarpit_time.0.is_zero() {
        let Some(slots) = ctx.tarpits.take(throttle.block_of(ip)) else {
            metrics::counter!("magicmx_suspect_refusals_total", "reason" => "tarpit_full")
                .increment(1);
            info!(client = %ip, score = v.score, "suspect refused: tarpit full");
            return Connect::Refuse(
                "421 4.7.0 Too many suspect sessions from your network, try again later".into(),
            );
        };
        metrics::counter!("magicmx_suspect_tarpitted_total").increment(1);
        screen.tarpit = Some((Instant::now() + cfg.tarpit_time.0, cfg.tarpit_rate));
        screen._tarpit_slots = Some(slots);
    }
    Connect::Go(screen)
}

fn level_name(v: &Verdict) -> &'static str {
    match v.level {
        crate::suspect::Level::Allowlisted => "allowlisted",
        crate::suspect::Level::Clean => "clean",
        crate::suspect::Level::Suspect => "suspect",
        crate::suspect::Level::Refused => "refused",
    }
}

/// The pregreet test: `220-` (unless the wait is 0), the wait, watching
/// for input. Returns what the client sent too early (empty: passed), or
/// None if it closed.
pub async fn pregreet<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    screen: &Screen,
    hostname: &str,
) -> Option<Vec<u8>> {
    let wait = screen.pregreet_wait?;
    if !wait.is_zero() {
        let first = format!("220-{hostname} ESMTP magicmx\r\n");
        if !screen.write(stream, first.as_bytes()).await {
            return None;
        }
    }
    let mut early = vec![0u8; MAX_PREGREET];
    // A zero wait still polls once: input already there fails the test.
    match tokio::time::timeout(wait, stream.read(&mut early)).await {
        Ok(Ok(0)) | Ok(Err(_)) => None,
        Ok(Ok(n)) => {
            early.truncate(n);
            Some(early)
        }
        Err(_) => Some(Vec::new()),
    }
}

impl Screen {
    /// Is the tarpit still running?
    pub fn tarpitting(&self) -> bool {
        self.tarpit.is_some_and(|(until, _)| Instant::now() < until)
    }

    /// Writes `bytes`, a byte at a time while the tarpit runs. False if the
    /// write failed.
    pub async fn write<S: AsyncWrite + Unpin>(&self, stream: &mut S, bytes: &[u8]) -> bool {
        let mut rest = bytes;
        if let Some((until, rate)) = self.tarpit {
            let gap = Duration::from_secs(1) / rate.max(1);
            while let Some((first, tail)) = rest.split_first() {
                if Instant::now() >= until {
                    break;
                }
                if stream.write_all(&[*first]).await.is_err() || stream.flush().await.is_err() {
                    return false;
                }
                rest = tail;
                tokio::time::sleep(gap).await;
            }
        }
        if rest.is_empty() {
            return true;
        }
        stream.write_all(rest).await.is_ok() && stream.flush().await.is_ok()
    }

    /// Scores a failed protocol test against the block of `ip` (if the
    /// tests run for this session). Returns the block's verdict afterwards.
    pub fn failed(&self, ctx: &Context, ip: IpAddr, test: ProtocolTest) -> Option<Verdict> {
        metrics::counter!("magicmx_suspect_protocol_failures_total", "test" => test.as_str(), "scored" => if self.tests { "yes" } else { "no" }).increment(1);
        if !self.tests {
            return None;
        }
        let now = ctx.clock.now_ms();
        let detail = match test {
            ProtocolTest::Pregreet => "sent before the banner",
            ProtocolTest::Pipelining => "pipelined without PIPELINING",
            ProtocolTest::NonSmtp => "not an SMTP command",
            ProtocolTest::BareLf => "bare CR or LF",
        };
        let signal = ctx.throttle.policy().protocol_signal(test, now, detail);
        let v = ctx.throttle.add_signals(ip, vec![signal], now);
        info!(client = %ip, block = %ctx.throttle.block_of(ip), test = test.as_str(), score = v.score, "protocol test failed");
        Some(v)
    }

    /// Scores a recipient: a trap address, or one the recipient check
    /// refused for good (`refused`: a 5xx reply). Returns the verdict.
    pub fn recipient(
        &self,
        ctx: &Context,
        ip: IpAddr,
        address: &str,
        refused: bool,
    ) -> Option<Verdict> {
        let trap = ctx.throttle.policy().is_trap(address);
        if !self.scored || !(refused || trap) {
            return None;
        }
        metrics::counter!("magicmx_suspect_invalid_recipients_total", "trap" => if trap { "yes" } else { "no" }).increment(1);
        let v = ctx
            .throttle
            .on_invalid_recipient(ip, address, ctx.clock.now_ms());
        if v.is_suspect() {
            info!(client = %ip, block = %ctx.throttle.block_of(ip), rcpt = address, trap, score = v.score, "invalid recipient");
        }
        Some(v)
    }
}
