//! The connection limit of one upstream pool (`routes.NAME.max_connections`)
//! and the signal checkouts wait on when nothing is free.
//!
//! A [`Slot`] is taken before connecting and held by the connection's task,
//! so a connection counts against the limit until it is really closed, not
//! merely out of the pool. This module does not open or pool connections.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::lock;

/// How many connections one pool has open, how many it may, and who waits.
pub(super) struct Capacity {
    counts: Mutex<Counts>,
    /// Something a waiting checkout may use appeared: a free slot, an idle
    /// connection, a new HTTP/2 connection or room on one.
    pub(super) changed: Notify,
}

struct Counts {
    open: usize,
    max: usize,
}

impl Capacity {
    pub(super) fn new(max: usize) -> Arc<Capacity> {
        Arc::new(Capacity {
            counts: Mutex::new(Counts { open: 0, max }),
            changed: Notify::new(),
        })
    }

    /// A slot for one more connection, unless the pool is at its limit.
    pub(super) fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let mut c = lock(&self.counts);
        (c.open < c.max).then(|| {
            c.open += 1;
            Slot(Arc::clone(self))
        })
    }

    /// Whether more connections are open than allowed (after a reload lowered
    /// the limit): a connection coming back is then closed, not pooled.
    pub(super) fn is_over(&self) -> bool {
        let c = lock(&self.counts);
        c.open > c.max
    }

    /// Sets the limit; waiters are woken when it grows.
    pub(super) fn set_max(&self, max: usize) {
        let grew = {
            let mut c = lock(&self.counts);
            let grew = max > c.max;
            c.max = max;
            grew
        };
        if grew {
            self.changed.notify_waiters();
        }
    }

    /// Raises the limit to at least `max` (routes sharing a pool: the
    /// largest of their limits wins).
    pub(super) fn raise_max(&self, max: usize) {
        let current = lock(&self.counts).max;
        if max > current {
            self.set_max(max);
        }
    }

    /// Connections open now.
    pub(super) fn open(&self) -> usize {
        lock(&self.counts).open
    }
}

/// One open connection's place under the limit; freed when dropped.
pub(super) struct Slot(Arc<Capacity>);

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut c = lock(&self.0.counts);
            c.open = c.open.saturating_sub(1);
        }
        self.0.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stop_at_the_limit_and_come_back_when_dropped() {
        let cap = Capacity::new(2);
        let a = cap.try_acquire().expect("first");
        let _b = cap.try_acquire().expect("second");
        assert!(cap.try_acquire().is_none());
        drop(a);
        assert_eq!(cap.open(), 1);
        assert!(cap.try_acquire().is_some());
    }

    #[test]
    fn a_lowered_limit_reports_the_excess() {
        let cap = Capacity::new(2);
        let _a = cap.try_acquire();
        let _b = cap.try_acquire();
        cap.raise_max(1);
        assert!(!cap.is_over(), "raise_max never lowers");
        cap.set_max(1);
        assert!(cap.is_over());
    }
}
