//! A map with a bound on its entries that drops the least recently used one to make room: what
//! keeps the cuDNN path's plans (one per convolution shape) from growing with every image size
//! and batch size a server is asked for.
//!
//! Plans are built once per shape and looked up on every convolution, so lookups must be cheap
//! and insertions may be slow: an insertion already costs a cuDNN algorithm search (milliseconds).
//! Each entry carries the tick of its last use; making room scans for the oldest, O(entries), only
//! when an insertion finds the map full.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::Hash;

pub(super) struct PlanCache<K, V> {
    entries: HashMap<K, (V, u64)>,
    /// Ticks once per use; an entry's tick is its last use.
    clock: u64,
    /// Entries dropped to make room, for the plan summaries and the tests.
    evicted: u64,
}

#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
impl<K: Eq + Hash + Copy, V> PlanCache<K, V> {
    pub(super) fn new() -> Self {
        Self {
            entries: HashMap::new(),
            clock: 0,
            evicted: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn evicted(&self) -> u64 {
        self.evicted
    }

    pub(super) fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// The entry for `key`, now its most recently used.
    pub(super) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let now = self.tick();
        self.entries.get_mut(key).map(|(v, used)| {
            *used = now;
            v
        })
    }

    /// Sets `key`'s entry (most recently used) and returns it. A new key in a map holding
    /// `limit` entries or more first drops the least recently used ones until it fits (a limit
    /// of 0 counts as 1: the entry just made is always kept). Returns the dropped keys too.
    pub(super) fn insert(&mut self, key: K, value: V, limit: usize) -> (&mut V, Vec<K>) {
        let mut dropped = Vec::new();
        if !self.entries.contains_key(&key) {
            while self.entries.len() >= limit.max(1) {
                let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(k, _)| *k)
                else {
                    break;
                };
                self.entries.remove(&oldest);
                self.evicted += 1;
                dropped.push(oldest);
            }
        }
        let now = self.tick();
        let slot = match self.entries.entry(key) {
            Entry::Occupied(mut e) => {
                e.insert((value, now));
                e.into_mut()
            }
            Entry::Vacant(e) => e.insert((value, now)),
        };
        (&mut slot.0, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::PlanCache;

    #[test]
    fn keeps_at_most_the_limit_and_drops_the_least_recently_used() {
        let mut c = PlanCache::new();
        for k in 0..3 {
            let (v, dropped) = c.insert(k, k * 10, 3);
            assert_eq!((*v, dropped), (k * 10, vec![]));
        }
        // 0 used since 1 and 2 were made: 1 is now the least recently used.
        assert_eq!(c.get_mut(&0).copied(), Some(0));
        let (v, dropped) = c.insert(3, 30, 3);
        assert_eq!((*v, dropped), (30, vec![1]));
        assert_eq!(c.len(), 3);
        assert!(c.contains(&0) && !c.contains(&1) && c.contains(&2) && c.contains(&3));
        assert_eq!(c.get_mut(&1), None);
        // A lookup that misses is no use of anything: 2 goes next.
        let (_, dropped) = c.insert(4, 40, 3);
        assert_eq!(dropped, vec![2]);
        assert_eq!(c.evicted(), 2);
    }

    #[test]
    fn replacing_an_entry_drops_nothing_and_counts_as_a_use() {
        let mut c = PlanCache::new();
        c.insert('a', 1, 2);
        c.insert('b', 2, 2);
        let (v, dropped) = c.insert('a', 3, 2);
        assert_eq!((*v, dropped), (3, vec![]));
        // 'a' was just used: 'b' makes room.
        let (_, dropped) = c.insert('c', 4, 2);
        assert_eq!(dropped, vec!['b']);
        assert_eq!(c.get_mut(&'a').copied(), Some(3));
        assert_eq!(c.evicted(), 1);
    }

    #[test]
    fn a_lower_limit_drops_down_to_it_and_zero_keeps_the_new_entry() {
        let mut c = PlanCache::new();
        for k in 0..5u8 {
            c.insert(k, (), 8);
        }
        let (_, dropped) = c.insert(5, (), 2);
        assert_eq!(dropped, vec![0, 1, 2, 3]);
        assert_eq!(c.len(), 2);
        let (_, dropped) = c.insert(6, (), 0);
        assert_eq!(dropped, vec![4, 5]);
        assert_eq!(c.len(), 1);
        assert!(c.contains(&6));
    }
}
