//! Per-key bounds on things held open: SMTP sessions per source block,
//! gossip connections per node name.
//!
//! [`KeyedSlots::try_take`] hands out a [`Slot`] while fewer than the bound
//! are held for the key; dropping the slot gives it back. The map holds only
//! keys with a slot taken, so it is bounded by what is open.

use std::hash::Hash;
use std::sync::Arc;

use dashmap::DashMap;

/// At most `max` slots per key.
pub struct KeyedSlots<K: Eq + Hash + Clone> {
    open: DashMap<K, usize>,
    max: usize,
}

/// One slot of a key, released on drop.
pub struct Slot<K: Eq + Hash + Clone> {
    slots: Arc<KeyedSlots<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> KeyedSlots<K> {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(KeyedSlots {
            open: DashMap::new(),
            max,
        })
    }

    /// A slot for `key`, or None if `max` are already held.
    pub fn try_take(self: &Arc<Self>, key: K) -> Option<Slot<K>> {
        let mut n = self.open.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: self.clone(),
            key,
        })
    }
}

impl<K: Eq + Hash + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        self.slots.open.remove_if_mut(&self.key, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::KeyedSlots;

    #[test]
    fn bounded_per_key_and_released_on_drop() {
        let slots = KeyedSlots::new(2);
        let a1 = slots.try_take("a").expect("first");
        let _a2 = slots.try_take("a").expect("second");
        assert!(slots.try_take("a").is_none(), "third of the same key");
        let b = slots.try_take("b").expect("another key is not affected");
        drop(a1);
        assert!(slots.try_take("a").is_some(), "a slot came back");
        drop(b);
        assert!(!slots.open.contains_key("b"), "idle keys are forgotten");
    }
}
