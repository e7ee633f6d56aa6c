//! The node's one clock: wall time in milliseconds since the Unix epoch.
//!
//! Throttle windows and penalties, gossip epochs, the hold, retries and the
//! relay schedule all read time through a [`Clock`], passed in from the
//! composition root (`Node`), so that tests can move time instead of sleeping.
//! A leaf module: it imports nothing from the crate.
//!
//! Three kinds, one handle (cheap to clone, `Send + Sync`):
//! - [`Clock::system`]: the operating system's wall clock. Production.
//!   Epochs must be numbered alike on every node, so this is real wall time,
//!   not a monotonic clock anchored at start.
//! - [`Clock::manual`]: a clock that moves only when a test says so, through
//!   the [`ManualClock`] hand returned with it. For tests that run real
//!   sockets (QUIC, SMTP) on real tokio time and only want windows, penalties
//!   or holds to pass: `hand.advance(window)` instead of sleeping through it.
//!   [`Clock::sleep_until`] on a manual clock wakes when the hand passes the
//!   deadline, so a queue runner waiting for a due time wakes on `advance`.
//! - [`Clock::tokio`]: wall time at creation plus the time elapsed on tokio's
//!   clock, so `tokio::time::pause()` / `advance()` drive it (and timers and
//!   this clock agree). For single-threaded tests without real network peers:
//!   paused tokio time auto-advances whenever the runtime is idle, which
//!   would fire protocol timeouts while real packets are in flight.
//!
//! Durations that only bound a protocol step (command timeouts, QUIC idle,
//! SWIM probe timers) stay on tokio/std monotonic time: they are about the
//! peer on the other end of a socket, not about windows or schedules.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// A source of wall time in Unix milliseconds. See the module comment.
#[derive(Clone, Default)]
pub struct Clock(Kind);

#[derive(Clone, Default)]
enum Kind {
    #[default]
    System,
    Manual(Arc<Manual>),
    Tokio {
        start_ms: u64,
        start: tokio::time::Instant,
    },
}

struct Manual {
    now_ms: AtomicU64,
    moved: Notify,
}

/// The hand that moves a [`Clock::manual`] clock. Tests only.
#[derive(Clone)]
pub struct ManualClock(Arc<Manual>);

/// Wall time of the operating system, Unix ms (0 before 1970).
pub fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Clock {
    /// The operating system's wall clock.
    pub fn system() -> Clock {
        Clock(Kind::System)
    }

    /// A clock standing at `start_ms` (Unix ms) until its hand moves it.
    pub fn manual(start_ms: u64) -> (Clock, ManualClock) {
        let m = Arc::new(Manual {
            now_ms: AtomicU64::new(start_ms),
            moved: Notify::new(),
        });
        (Clock(Kind::Manual(m.clone())), ManualClock(m))
    }

    /// A manual clock starting at the current wall time.
    pub fn manual_now() -> (Clock, ManualClock) {
        Clock::manual(system_ms())
    }

    /// Wall time now, then moving with tokio's clock (pause/advance drive it).
    /// Must be called inside a tokio runtime.
    pub fn tokio() -> Clock {
        Clock(Kind::Tokio {
            start_ms: system_ms(),
            start: tokio::time::Instant::now(),
        })
    }

    /// Unix milliseconds now.
    pub fn now_ms(&self) -> u64 {
        match &self.0 {
            Kind::System => system_ms(),
            Kind::Manual(m) => m.now_ms.load(Ordering::Acquire),
            Kind::Tokio { start_ms, start } => {
                start_ms.saturating_add(start.elapsed().as_millis() as u64)
            }
        }
    }

    /// Unix seconds now (rounded down).
    pub fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }

    /// Is this a clock only a test moves?
    pub fn is_manual(&self) -> bool {
        matches!(self.0, Kind::Manual(_))
    }

    /// Waits until the clock reads at least `deadline_ms`.
    ///
    /// System and tokio clocks sleep on tokio's timer (re-checking, in case
    /// the wall clock was set back meanwhile); a manual clock wakes when its
    /// hand reaches the deadline. Cancel-safe.
    pub async fn sleep_until(&self, deadline_ms: u64) {
        match &self.0 {
            Kind::Manual(m) => loop {
                let moved = m.moved.notified();
                tokio::pin!(moved);
                // Register before reading, so an advance in between is seen.
                moved.as_mut().enable();
                if m.now_ms.load(Ordering::Acquire) >= deadline_ms {
                    return;
                }
                moved.await;
            },
            _ => loop {
                let now = self.now_ms();
                if now >= deadline_ms {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(deadline_ms - now)).await;
            },
        }
    }

    /// Waits for `d` on this clock.
    pub async fn sleep(&self, d: Duration) {
        let deadline = self.now_ms().saturating_add(d.as_millis() as u64);
        self.sleep_until(deadline).await;
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.0 {
            Kind::System => "system",
            Kind::Manual(_) => "manual",
            Kind::Tokio { .. } => "tokio",
        };
        write!(f, "Clock({kind}, {} ms)", self.now_ms())
    }
}

impl ManualClock {
    /// Moves the clock forward by `d` and wakes its sleepers.
    pub fn advance(&self, d: Duration) {
        self.0
            .now_ms
            .fetch_add(d.as_millis() as u64, Ordering::AcqRel);
        self.0.moved.notify_waiters();
    }

    /// Sets the clock to `ms` (forward or back) and wakes its sleepers.
    pub fn set_ms(&self, ms: u64) {
        self.0.now_ms.store(ms, Ordering::Release);
        self.0.moved.notify_waiters();
    }

    /// What the clock reads.
    pub fn now_ms(&self) -> u64 {
        self.0.now_ms.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_reads_wall_time() {
        let a = system_ms();
        let b = Clock::system().now_ms();
        assert!(b >= a && b - a < 5_000, "{a} {b}");
        assert!(a > 1_600_000_000_000);
    }

    #[test]
    fn manual_clock_moves_only_by_hand() {
        let (c, hand) = Clock::manual(1_000);
        assert_eq!(c.now_ms(), 1_000);
        assert_eq!(c.clone().now_ms(), 1_000);
        hand.advance(Duration::from_millis(2_500));
        assert_eq!(c.now_ms(), 3_500);
        assert_eq!(c.now_secs(), 3);
        hand.set_ms(10);
        assert_eq!(c.now_ms(), 10);
        assert!(c.is_manual() && !Clock::system().is_manual());
    }

    #[tokio::test]
    async fn manual_sleep_wakes_on_advance() {
        let (c, hand) = Clock::manual(0);
        let sleeper = tokio::spawn({
            let c = c.clone();
            async move { c.sleep(Duration::from_secs(60)).await }
        });
        tokio::task::yield_now().await;
        hand.advance(Duration::from_secs(30));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "woke before its deadline");
        hand.advance(Duration::from_secs(30));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("woke on advance")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let c = Clock::tokio();
        let t0 = c.now_ms();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(c.now_ms() - t0, 3_600_000);
        let before = c.now_ms();
        c.sleep(Duration::from_secs(90)).await; // auto-advances while paused
        assert!(c.now_ms() - before >= 90_000);
    }
}
