//! The process-wide metrics recorder: installed once, by whichever part
//! starts first (the node, or `magicmx policy` on its own), rendered by the
//! admin listener's `/metrics`. A leaf module: it imports nothing from the
//! crate, so the policy service does not depend on the admin listener.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

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

/// What the dashboard's chart counts per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    /// A message stored in the spool (acknowledged with `250`).
    Received,
    /// A connection, command or recipient refused by the throttle or a
    /// suspect check.
    Refused,
    /// A recipient delivered to the real MX.
    Relayed,
    /// A message sent to quarantine instead of relayed.
    Quarantined,
}

const TALLIES: usize = 4;
/// Minutes kept: the dashboard shows the last hour.
pub const HISTORY_MINUTES: usize = 60;

/// One minute of the history: its start (Unix seconds) and the tallies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Minute {
    pub start: u64,
    pub received: u64,
    pub refused: u64,
    pub relayed: u64,
    pub quarantined: u64,
}

/// Per-minute tallies of the last hour, for the dashboard's chart: a ring of
/// [`HISTORY_MINUTES`] slots, each tagged with its minute, so memory is fixed
/// and a slot left from an hour ago is recognised as stale, not counted.
/// Process-wide like the metrics recorder (in-process test clusters and
/// `magicmx demo` share it).
pub struct History {
    slots: std::sync::Mutex<[(u64, [u64; TALLIES]); HISTORY_MINUTES]>,
}

impl History {
    pub const fn new() -> History {
        History {
            slots: std::sync::Mutex::new([(u64::MAX, [0; TALLIES]); HISTORY_MINUTES]),
        }
    }

    /// Counts one `tally` at `now_secs` (Unix seconds).
    pub fn record(&self, tally: Tally, now_secs: u64) {
        let minute = now_secs / 60;
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut slots[(minute % HISTORY_MINUTES as u64) as usize];
        if slot.0 != minute {
            *slot = (minute, [0; TALLIES]);
        }
        slot.1[tally as usize] += 1;
    }

    /// The last hour up to `now_secs`, oldest first, one entry per minute
    /// (zeros where nothing happened).
    pub fn last_hour(&self, now_secs: u64) -> Vec<Minute> {
        let now = now_secs / 60;
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        (now.saturating_sub(HISTORY_MINUTES as u64 - 1)..=now)
            .map(|minute| {
                let slot = &slots[(minute % HISTORY_MINUTES as u64) as usize];
                let t = if slot.0 == minute {
                    slot.1
                } else {
                    [0; TALLIES]
                };
                Minute {
                    start: minute * 60,
                    received: t[Tally::Received as usize],
                    refused: t[Tally::Refused as usize],
                    relayed: t[Tally::Relayed as usize],
                    quarantined: t[Tally::Quarantined as usize],
                }
            })
            .collect()
    }
}

impl Default for History {
    fn default() -> History {
        History::new()
    }
}

/// The process-wide history.
pub fn history() -> &'static History {
    static HISTORY: History = History::new();
    &HISTORY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_last_hour_per_minute() {
        let h = History::new();
        let t0 = 1_000_000 * 60;
        h.record(Tally::Received, t0);
        h.record(Tally::Received, t0 + 59);
        h.record(Tally::Relayed, t0 + 60);
        let hour = h.last_hour(t0 + 60);
        assert_eq!(hour.len(), HISTORY_MINUTES);
        assert_eq!(hour[HISTORY_MINUTES - 2].received, 2);
        assert_eq!(hour[HISTORY_MINUTES - 1].relayed, 1);
        assert_eq!(hour[HISTORY_MINUTES - 1].start, t0 + 60);
        // The relayed minute is still inside the hour one hour on...
        let later = h.last_hour(t0 + 3600);
        assert_eq!(later[0].relayed, 1);
        assert!(later.iter().all(|m| m.received == 0));
        // ...and a minute later the same slots are stale, not counted again.
        let later = h.last_hour(t0 + 3660);
        assert!(later.iter().all(|m| m.received == 0 && m.relayed == 0));
        h.record(Tally::Refused, t0 + 3660);
        let later = h.last_hour(t0 + 3660);
        assert_eq!(later[HISTORY_MINUTES - 1].refused, 1);
        assert_eq!(later[HISTORY_MINUTES - 1].received, 0);
    }
}
