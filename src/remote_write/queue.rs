//! The bounded in-memory queue of pushes one receiver has not taken yet.
//!
//! Bounded in pushes (`--remote-write-queue`), not bytes: every push is one
//! snapshot of every series, so the bound is also a bound on how far back
//! an outage can be made good (120 pushes at 30 s: one hour). When full the
//! oldest push is dropped first, because the newest holds the current
//! totals: a counter's later value covers what the dropped one said, and a
//! receiver loses resolution, not counts.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;

/// One snapshot, encoded and compressed once and shared by every receiver.
#[derive(Debug, Clone)]
pub struct Push {
    /// Orders pushes; lets a sender tell that the push it sent is still the
    /// oldest (it may have been dropped while in flight).
    pub seq: u64,
    pub body: Bytes,
    pub samples: u64,
}

#[derive(Debug)]
pub struct Queue {
    pushes: Mutex<VecDeque<Push>>,
    bound: usize,
}

impl Queue {
    pub fn new(bound: usize) -> Self {
        Queue {
            pushes: Mutex::new(VecDeque::with_capacity(bound.min(1024))),
            bound: bound.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Push>> {
        // Held for a push or a pop only; a panic elsewhere leaves the
        // queue itself consistent.
        self.pushes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `push` at the back; returns the pushes dropped from the front
    /// to make room.
    pub fn add(&self, push: Push) -> Vec<Push> {
        let mut q = self.lock();
        let mut dropped = Vec::new();
        while q.len() >= self.bound {
            dropped.extend(q.pop_front());
        }
        q.push_back(push);
        dropped
    }

    pub fn oldest(&self) -> Option<Push> {
        self.lock().front().cloned()
    }

    /// Removes the push `seq` if it is still the oldest.
    pub fn done(&self, seq: u64) {
        let mut q = self.lock();
        if q.front().is_some_and(|p| p.seq == seq) {
            q.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(seq: u64) -> Push {
        Push {
            seq,
            body: Bytes::new(),
            samples: 10,
        }
    }

    #[test]
    fn a_full_queue_drops_its_oldest_first() {
        let q = Queue::new(3);
        for seq in 0..3 {
            assert!(q.add(push(seq)).is_empty());
        }
        let dropped = q.add(push(3));
        assert_eq!(dropped.iter().map(|p| p.seq).collect::<Vec<_>>(), [0]);
        assert_eq!(q.oldest().map(|p| p.seq), Some(1));
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn done_removes_only_the_push_that_is_still_oldest() {
        let q = Queue::new(2);
        q.add(push(0));
        q.add(push(1));
        // Push 0 was dropped while in flight: its success removes nothing.
        q.add(push(2));
        q.done(0);
        assert_eq!(q.oldest().map(|p| p.seq), Some(1));
        q.done(1);
        assert_eq!(q.oldest().map(|p| p.seq), Some(2));
    }
}
