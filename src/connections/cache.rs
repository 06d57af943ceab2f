//! The bounded cache of connections in memory ([`Cache`]): at most
//! `cache_size` [`Conn`]s, found by id without waiting, the least recently
//! used leaving first (CLOCK: each entry's `used` bit is set by a lookup and
//! cleared by the hand passing it; the hand takes the first entry it finds
//! unused).
//!
//! Why not moka (issue 20): a lookup in `moka::future::Cache` is a future
//! (the request path boxed it) and about 650 instructions, and an entry
//! costs about 360 bytes beside the connection. Here a lookup is one hash,
//! a shard's read lock and a probe, and an entry costs an index (4 bytes)
//! and a pointer (8 bytes). What moka also does (TinyLFU admission, TTLs,
//! eviction listeners) this cache has no use for: keep-alive reads
//! connections without caching them, and entries never expire by age.
//!
//! Concurrent misses for one id are coalesced by the pool (`Pool::load`),
//! not here; this module does not read the store.

use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use hashbrown::{DefaultHashBuilder, HashTable};

use super::Conn;
use crate::ground::{read, write};

/// Caches at least this large are split in [`SHARDS`] shards (a smaller
/// one is one shard, so `cache_size = 1` keeps one connection).
const SHARDED_FROM: u64 = 4_096;
const SHARDS: usize = 16;

/// The connections in memory.
pub(super) struct Cache {
    shards: Box<[RwLock<Shard>]>,
    hasher: DefaultHashBuilder,
}

struct Shard {
    /// Positions in `ring`, found by the hash of the connection's id.
    index: HashTable<u32>,
    /// The entries, in no order; the CLOCK hand goes round them.
    ring: Vec<Arc<Conn>>,
    hand: usize,
    capacity: usize,
}

impl Cache {
    /// A cache of at most `capacity` connections (at least one).
    pub(super) fn new(capacity: u64) -> Cache {
        let capacity = capacity.max(1);
        let n = if capacity >= SHARDED_FROM { SHARDS } else { 1 };
        let (each, rest) = (capacity / n as u64, capacity % n as u64);
        let shards = (0..n as u64)
            .map(|i| {
                let cap = each + u64::from(i < rest);
                RwLock::new(Shard {
                    index: HashTable::new(),
                    ring: Vec::new(),
                    hand: 0,
                    capacity: usize::try_from(cap.min(u64::from(u32::MAX))).unwrap_or(1),
                })
            })
            .collect();
        Cache {
            shards,
            hasher: DefaultHashBuilder::default(),
        }
    }

    fn shard(&self, hash: u64) -> &RwLock<Shard> {
        // The table's probe uses the hash's low and top bits; the shard
        // takes bits from the middle.
        let i = (hash >> 32) as usize % self.shards.len();
        &self.shards[i]
    }

    /// The connection `id`, marked used.
    #[inline]
    pub(super) fn get(&self, id: &str) -> Option<Arc<Conn>> {
        let hash = self.hasher.hash_one(id);
        let shard = read(self.shard(hash));
        let &i = shard
            .index
            .find(hash, |&i| shard.ring[i as usize].id == id)?;
        let conn = &shard.ring[i as usize];
        if !conn.used.load(Ordering::Relaxed) {
            conn.used.store(true, Ordering::Relaxed);
        }
        Some(Arc::clone(conn))
    }

    /// Keeps `conn` (in place of an entry of the same id), making room by
    /// evicting the least recently used entry of its shard when full.
    pub(super) fn insert(&self, conn: Arc<Conn>) {
        let hash = self.hasher.hash_one(conn.id.as_str());
        let mut shard = write(self.shard(hash));
        let Shard { index, ring, .. } = &mut *shard;
        if let Some(&mut i) = index.find_mut(hash, |&i| ring[i as usize].id == conn.id) {
            ring[i as usize] = conn;
            return;
        }
        if shard.ring.len() >= shard.capacity {
            let victim = shard.victim();
            let victim_hash = self.hasher.hash_one(shard.ring[victim].id.as_str());
            shard.remove_at(&self.hasher, victim_hash, victim);
        }
        let Shard { index, ring, .. } = &mut *shard;
        let at = u32::try_from(ring.len()).unwrap_or(u32::MAX);
        ring.push(conn);
        index.insert_unique(hash, at, |&i| {
            self.hasher.hash_one(ring[i as usize].id.as_str())
        });
    }

    /// Forgets the connection `id`, if it is here.
    pub(super) fn remove(&self, id: &str) {
        let hash = self.hasher.hash_one(id);
        write(self.shard(hash)).remove(&self.hasher, hash, id);
    }

    /// Calls `f` with every connection in memory.
    pub(super) fn for_each(&self, mut f: impl FnMut(&Arc<Conn>)) {
        for shard in &self.shards {
            read(shard).ring.iter().for_each(&mut f);
        }
    }

    /// How many connections are in memory.
    pub(super) fn len(&self) -> u64 {
        self.shards.iter().map(|s| read(s).ring.len() as u64).sum()
    }
}

impl Shard {
    /// Where the hand stops: the first entry not used since it last
    /// passed (clearing the bits of those it passes).
    fn victim(&mut self) -> usize {
        let len = self.ring.len();
        loop {
            if self.hand >= len {
                self.hand = 0;
            }
            let conn = &self.ring[self.hand];
            if !conn.used.swap(false, Ordering::Relaxed) {
                return self.hand;
            }
            self.hand += 1;
        }
    }

    /// Removes the entry of `id` (which hashes to `hash`), if it is here.
    fn remove(&mut self, hasher: &DefaultHashBuilder, hash: u64, id: &str) {
        let found = self.index.find(hash, |&i| self.ring[i as usize].id == id);
        if let Some(&at) = found {
            self.remove_at(hasher, hash, at as usize);
        }
    }

    /// Removes the entry at `at` in the ring (its id hashes to `hash`); the
    /// last entry moves into the hole, and its index follows it.
    fn remove_at(&mut self, hasher: &DefaultHashBuilder, hash: u64, at: usize) {
        let Shard { index, ring, .. } = self;
        if let Ok(entry) = index.find_entry(hash, |&i| i as usize == at) {
            entry.remove();
        }
        ring.swap_remove(at);
        let last = ring.len();
        if at != last {
            let moved = hasher.hash_one(ring[at].id.as_str());
            if let Some(i) = index.find_mut(moved, |&i| i as usize == last) {
                *i = at as u32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: &str) -> Arc<Conn> {
        Arc::new(Conn::new(id.to_owned()))
    }

    #[test]
    fn a_full_cache_evicts_what_was_not_used_since_the_hand_passed() {
        let cache = Cache::new(3);
        for id in ["a", "b", "c"] {
            cache.insert(conn(id));
        }
        assert!(cache.get("a").is_some());
        assert!(cache.get("c").is_some());
        cache.insert(conn("d"));
        assert_eq!(cache.len(), 3);
        assert!(cache.get("b").is_none(), "b was the one not used");
        for id in ["a", "c", "d"] {
            assert!(cache.get(id).is_some(), "{id}");
        }
        // Every entry used: the hand clears them all and takes the first.
        cache.insert(conn("e"));
        assert_eq!(cache.len(), 3);
        assert!(cache.get("e").is_some());
    }

    #[test]
    fn removal_keeps_every_other_entry_findable() {
        let cache = Cache::new(100);
        let ids: Vec<String> = (0..50).map(|i| format!("user-{i}")).collect();
        for id in &ids {
            cache.insert(conn(id));
        }
        for id in ids.iter().step_by(3) {
            cache.remove(id);
            cache.remove(id);
        }
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(cache.get(id).is_some(), i % 3 != 0, "{id}");
        }
        assert_eq!(cache.len(), 50 - 17);
        let mut seen = 0;
        cache.for_each(|_| seen += 1);
        assert_eq!(seen, 33);
    }

    #[test]
    fn an_insert_of_a_known_id_replaces_its_entry() {
        let cache = Cache::new(1);
        let first = conn("a");
        cache.insert(Arc::clone(&first));
        let second = conn("a");
        cache.insert(Arc::clone(&second));
        assert_eq!(cache.len(), 1);
        assert!(Arc::ptr_eq(&cache.get("a").expect("a"), &second));
        cache.insert(conn("b"));
        assert!(cache.get("a").is_none());
        assert!(cache.get("b").is_some());
    }

    #[test]
    fn a_large_cache_is_sharded_and_holds_exactly_its_capacity() {
        let cache = Cache::new(5_000);
        assert_eq!(cache.shards.len(), SHARDS);
        // Enough that every shard fills.
        for i in 0..20_000 {
            cache.insert(conn(&format!("u{i}")));
        }
        assert_eq!(cache.len(), 5_000);
        assert!(cache.get("u19999").is_some(), "the newest is kept");
    }
}
