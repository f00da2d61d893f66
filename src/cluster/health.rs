//! Whether the hot path should ask Redis at all (issue 17, item 2).
//!
//! A hung Redis (SIGSTOP, a VM paused, a full network buffer) does not
//! refuse a command: it never answers. Without a gate, every request with
//! ids would wait for its own claim timeout. So the replica keeps one
//! opinion of Redis, shared by every request and the summary:
//!
//! * *trusted*: requests ask Redis. The first request whose round trip is
//!   still unanswered after [`SLOW`] raises doubt and becomes the
//!   *sentinel*: it alone waits for its answer (up to the claim timeout),
//!   so a Redis that is only slow keeps deduping; every other request past
//!   [`SLOW`], and every new one, decides locally at once.
//! * *in doubt*: nobody waits. When the sentinel's round trip fails, the
//!   back-off [`BACKOFF`] is counted from that moment (not from a request's
//!   arrival, which made half of it pass unseen). Once it is over, the next
//!   request (still deciding locally) starts one background probe; the
//!   probe's answer trusts Redis again, its failure starts another
//!   back-off.
//!
//! So while Redis does not answer, each request waits at most [`SLOW`],
//! and one per outage (the sentinel) waits the claim timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a round trip may go unanswered before the replica doubts
/// Redis: far above a healthy claim (well under a millisecond), below
/// anything a client would call slow.
pub const SLOW: Duration = Duration::from_millis(150);

/// After a failed round trip, how long before Redis is probed again.
pub const BACKOFF: Duration = Duration::from_secs(1);

/// What a caller about to ask Redis should do.
#[derive(Debug)]
pub enum Admit {
    /// Ask; if no answer within [`SLOW`], call [`Health::slow`].
    Ask,
    /// Decide locally at once.
    Local,
    /// Decide locally at once, and start the one probe (holding this
    /// guard until it has an answer).
    Probe(Watch),
}

pub struct Health {
    base: Instant,
    /// Set while Redis is in doubt: nobody waits on it.
    doubt: AtomicBool,
    backoff: Duration,
    /// Milliseconds since `base` before which no probe is started.
    retry_at: AtomicU64,
    /// Held by the sentinel or the probe: at most one round trip is waited
    /// for while Redis is in doubt.
    watching: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self::with_backoff(BACKOFF)
    }

    pub fn with_backoff(backoff: Duration) -> Self {
        Health {
            base: Instant::now(),
            backoff,
            doubt: AtomicBool::new(false),
            retry_at: AtomicU64::new(0),
            watching: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn in_doubt(&self) -> bool {
        self.doubt.load(Ordering::Acquire)
    }

    /// Whether to ask Redis now.
    pub fn admit(self: &Arc<Self>) -> Admit {
        if !self.in_doubt() {
            return Admit::Ask;
        }
        if self.now_ms() < self.retry_at.load(Ordering::Acquire) {
            return Admit::Local;
        }
        match self.watch() {
            Some(w) => Admit::Probe(w),
            None => Admit::Local,
        }
    }

    /// A round trip has gone [`SLOW`] without an answer: Redis is in doubt.
    /// `Some` for the one caller that should go on waiting (the sentinel),
    /// `None` for everyone else, who decides locally now.
    pub fn slow(self: &Arc<Self>) -> Option<Watch> {
        self.doubt.store(true, Ordering::Release);
        self.watch()
    }

    /// Redis answered: trust it again.
    pub fn answered(&self) {
        self.doubt.store(false, Ordering::Release);
    }

    /// A round trip failed or timed out: in doubt for the back-off from now.
    pub fn failed(&self) {
        let backoff = u64::try_from(self.backoff.as_millis()).unwrap_or(u64::MAX);
        let until = self.now_ms().saturating_add(backoff);
        self.retry_at.store(until, Ordering::Release);
        self.doubt.store(true, Ordering::Release);
    }

    fn watch(self: &Arc<Self>) -> Option<Watch> {
        self.watching
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        Some(Watch(self.clone()))
    }
}

/// The right to be the one round trip waited for while Redis is in doubt,
/// given up when dropped however its holder ends: a request dropped
/// mid-wait must not keep every later probe from starting.
pub struct Watch(Arc<Health>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.watching.store(false, Ordering::Release);
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watch")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sentinel_waits_and_everyone_else_decides_locally() {
        let health = Arc::new(Health::with_backoff(Duration::from_millis(200)));
        assert!(matches!(health.admit(), Admit::Ask));
        // Three round trips go slow together: only the first waits on.
        let sentinel = health.slow().expect("the first slow caller waits");
        assert!(health.slow().is_none());
        assert!(health.slow().is_none());
        // Meanwhile nobody asks, and no probe starts beside the sentinel.
        assert!(matches!(health.admit(), Admit::Local));
        // The sentinel times out: in doubt for the back-off from now.
        health.failed();
        drop(sentinel);
        assert!(matches!(health.admit(), Admit::Local));
        std::thread::sleep(Duration::from_millis(250));
        // Then exactly one probe; the others still decide locally.
        let Admit::Probe(probe) = health.admit() else {
            panic!("a probe is due after the back-off");
        };
        assert!(matches!(health.admit(), Admit::Local));
        // The probe fails: another back-off, counted from its failure.
        health.failed();
        drop(probe);
        assert!(matches!(health.admit(), Admit::Local));
        std::thread::sleep(Duration::from_millis(250));
        let Admit::Probe(probe) = health.admit() else {
            panic!("a second probe after the second back-off");
        };
        // It answers: everyone asks again.
        health.answered();
        drop(probe);
        assert!(matches!(health.admit(), Admit::Ask));
        assert!(!health.in_doubt());
    }

    #[test]
    fn a_dropped_sentinel_lets_the_next_probe_start() {
        let health = Arc::new(Health::with_backoff(Duration::ZERO));
        let sentinel = health.slow().expect("sentinel");
        drop(sentinel); // its request was dropped mid-wait, no verdict
        assert!(health.in_doubt());
        assert!(matches!(health.admit(), Admit::Probe(_)));
    }
}
