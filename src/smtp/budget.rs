//! A global byte budget for message data in flight.
//!
//! Each unfinished DATA buffers its message in memory; without a bound, a
//! few hundred clients each sending most of a large message and never the
//! final dot would take gigabytes. Every session takes its buffer's
//! capacity out of one shared [`MemoryBudget`] (`smtp.data_memory`) through
//! a [`Reservation`], an RAII guard: it grows as the buffer does and gives
//! everything back when dropped, whichever way the DATA ends (stored,
//! refused, connection lost, task cancelled), so no path can leak budget.
//! Past the budget the session answers `452 4.3.1` and stores nothing.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes of message data all sessions may hold together.
#[derive(Clone)]
pub struct MemoryBudget(Arc<Inner>);

struct Inner {
    limit: usize,
    used: AtomicUsize,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> MemoryBudget {
        MemoryBudget(Arc::new(Inner {
            limit,
            used: AtomicUsize::new(0),
        }))
    }

    /// No bound (tests, tools).
    pub fn unlimited() -> MemoryBudget {
        MemoryBudget::new(usize::MAX)
    }

    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// Bytes reserved now, all sessions together.
    pub fn in_use(&self) -> usize {
        self.0.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        self.0
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.0.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.0.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Reserves `n` bytes, or None if that would pass the limit.
    pub fn reserve(&self, n: usize) -> Option<Reservation> {
        self.take(n).then(|| Reservation {
            budget: self.clone(),
            held: n,
        })
    }
}

impl fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBudget")
            .field("limit", &self.0.limit)
            .field("in_use", &self.in_use())
            .finish()
    }
}

/// Bytes held out of a [`MemoryBudget`]; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: MemoryBudget,
    held: usize,
}

impl Reservation {
    pub fn held(&self) -> usize {
        self.held
    }

    /// Holds `n` bytes from now on. Shrinking always succeeds; growing
    /// fails (and holds what it held) if the budget has not enough left.
    pub fn resize(&mut self, n: usize) -> bool {
        if n <= self.held {
            self.budget.give(self.held - n);
            self.held = n;
            return true;
        }
        if !self.budget.take(n - self.held) {
            return false;
        }
        self.held = n;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_grow_within_the_limit_and_give_back_on_drop() {
        let b = MemoryBudget::new(100);
        let mut r = b.reserve(40).unwrap();
        assert_eq!(b.in_use(), 40);
        let s = b.reserve(50).unwrap();
        assert!(b.reserve(11).is_none());
        assert!(!r.resize(51), "over the limit");
        assert_eq!(r.held(), 40);
        assert!(r.resize(50));
        assert_eq!(b.in_use(), 100);
        assert!(r.resize(10));
        assert_eq!(b.in_use(), 60);
        drop(s);
        drop(r);
        assert_eq!(b.in_use(), 0);
        assert!(MemoryBudget::unlimited().reserve(usize::MAX).is_some());
    }
}
