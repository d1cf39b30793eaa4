//! Lock-free, fill-once caches that let handles skip the family lookup
//! (hash + read lock) after the first occurrence of a label combination.

use std::sync::OnceLock;

/// A small table of `(key, value)` slots filled in order, each at most once.
///
/// Lookups scan the filled slots; the first occurrence of a key takes the
/// next free slot. When the table is full, [`SlotTable::get_or_init`]
/// returns `None` and the caller falls back to the (locking) family lookup.
#[derive(Debug)]
pub(crate) struct SlotTable<K, V, const N: usize> {
    slots: [OnceLock<(K, V)>; N],
}

impl<K, V, const N: usize> Default for SlotTable<K, V, N> {
    fn default() -> Self {
        Self {
            slots: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

impl<K: PartialEq + Copy, V, const N: usize> SlotTable<K, V, N> {
    pub(crate) fn get_or_init(&self, key: K, init: impl FnOnce() -> V) -> Option<&V> {
        let mut init = Some(init);
        for slot in &self.slots {
            let (k, v) = match slot.get() {
                Some(kv) => kv,
                None => slot.get_or_init(|| {
                    let v = match init.take() {
                        Some(f) => f(),
                        // Unreachable: a closure that ran filled its slot
                        // with `key`, so the scan returns right after it.
                        None => unreachable_init(),
                    };
                    (key, v)
                }),
            };
            if *k == key {
                return Some(v);
            }
        }
        None
    }
}

#[cold]
fn unreachable_init<V>() -> V {
    unreachable!("slot initializer runs at most once per lookup")
}

/// Slots indexed by a small integer, the array of each group of `G`
/// allocated on first use (e.g. HTTP status codes, grouped by hundred, so a
/// target that only ever sees 2xx pays for one group).
type Group<V, const G: usize> = Box<[OnceLock<V>; G]>;

#[derive(Debug)]
pub(crate) struct IndexedSlots<V, const G: usize> {
    groups: Box<[OnceLock<Group<V, G>>]>,
}

impl<V, const G: usize> IndexedSlots<V, G> {
    /// Room for indexes `0..groups * G`.
    pub(crate) fn new(groups: usize) -> Self {
        Self {
            groups: (0..groups).map(|_| OnceLock::new()).collect(),
        }
    }

    /// `None` when `idx` is out of range.
    pub(crate) fn get_or_init(&self, idx: usize, init: impl FnOnce() -> V) -> Option<&V> {
        let group = self.groups.get(idx / G)?;
        let group = group.get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
        Some(group[idx % G].get_or_init(init))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_table_fills_in_order_and_overflows() {
        let t: SlotTable<u32, u32, 2> = SlotTable::default();
        assert_eq!(t.get_or_init(7, || 70), Some(&70));
        assert_eq!(t.get_or_init(7, || 0), Some(&70));
        assert_eq!(t.get_or_init(8, || 80), Some(&80));
        assert_eq!(t.get_or_init(9, || 90), None);
        assert_eq!(t.get_or_init(8, || 0), Some(&80));
    }

    #[test]
    fn indexed_slots() {
        let s: IndexedSlots<u32, 100> = IndexedSlots::new(5);
        assert_eq!(s.get_or_init(0, || 1), Some(&1));
        assert_eq!(s.get_or_init(0, || 2), Some(&1));
        assert_eq!(s.get_or_init(499, || 3), Some(&3));
        assert_eq!(s.get_or_init(500, || 4), None);
    }
}
