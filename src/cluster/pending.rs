//! Users seen since the last sync to Redis, per bot: cluster mode's
//! [`UserNotes`].
//!
//! Redis's own HyperLogLogs hold the cluster-wide distinct counts, so each
//! replica sends the (already keyed and hashed) users it saw since its last
//! confirmed sync; a user already in a Redis sketch changes nothing there.
//! The set is bounded across every bot by one budget: during a long Redis
//! outage, users past it are left out of the cluster-wide count (and
//! counted in `botmetrics_sync_users_dropped_total`) rather than let memory
//! grow without end. The replica's own sketches still count them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::dedupe::UniformSet;
use crate::event::UserHash;
use crate::ingest::UserNotes;

const SHARDS: usize = 8;

/// (unix hour, user hash): the hour decides which Redis sketches it joins.
pub type PendingUser = (i32, u64);

/// The bound shared by every bot's pending users.
pub struct UserBudget {
    used: AtomicUsize,
    max: usize,
    pub dropped: prometheus::IntCounter,
}

impl UserBudget {
    pub fn new(max: usize, dropped: prometheus::IntCounter) -> Self {
        UserBudget {
            used: AtomicUsize::new(0),
            max,
            dropped,
        }
    }

    fn take_one(&self) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used < self.max).then_some(used + 1)
            })
            .is_ok()
    }

    /// Gives back the room of users Redis has confirmed.
    pub fn release(&self, n: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(n))
            });
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// The hash's top bits pick the shard: it is already uniform.
fn shard_of(user: UserHash) -> usize {
    (user.0 >> 61) as usize % SHARDS
}

fn hour_of(ts: i64) -> i32 {
    i32::try_from(ts.div_euclid(3600)).unwrap_or(i32::MAX)
}

/// Adds `user` to its hour's set in one shard, within the budget.
fn note(hours: &mut Vec<(i32, UniformSet)>, budget: &UserBudget, hour: i32, user: UserHash) {
    let i = match hours.iter().position(|(h, _)| *h == hour) {
        Some(i) => i,
        None => {
            hours.push((hour, UniformSet::default()));
            hours.len() - 1
        }
    };
    let users = &mut hours[i].1;
    if users.contains(&user.0) {
        return;
    }
    if budget.take_one() {
        users.insert(user.0);
    } else {
        budget.dropped.inc();
    }
}

/// Every bot's pending users: what `ingest` notes through [`UserNotes`],
/// and what the sync takes. A bot gets its set with its first user, so a
/// bot created at runtime (the admin API) needs nothing set up here.
pub struct Pending {
    bots: RwLock<HashMap<Arc<str>, Arc<PendingUsers>>>,
    pub budget: Arc<UserBudget>,
}

impl Pending {
    pub fn new(budget: Arc<UserBudget>) -> Self {
        Pending {
            bots: RwLock::default(),
            budget,
        }
    }

    /// Drops a wiped bot's users, giving their room back.
    pub fn forget(&self, bot: &str) {
        let gone = self
            .bots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(bot);
        if let Some(gone) = gone {
            let held: usize = gone
                .shards
                .iter()
                .map(|s| {
                    s.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .map(|(_, users)| users.len())
                        .sum::<usize>()
                })
                .sum();
            self.budget.release(held);
        }
    }

    pub fn of(&self, bot: &str) -> Option<Arc<PendingUsers>> {
        self.bots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(bot)
            .cloned()
    }
}

impl UserNotes for Pending {
    fn note(&self, bot: &str, users: &[(UserHash, i64)]) {
        if users.is_empty() {
            return;
        }
        // Nearly always there: a read lock, and no clone of the set.
        if let Some(pending) = self.bots.read().unwrap_or_else(|e| e.into_inner()).get(bot) {
            pending.record_many(users);
            return;
        }
        let pending = self
            .bots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(Arc::from(bot))
            .or_insert_with(|| Arc::new(PendingUsers::new(self.budget.clone())))
            .clone();
        pending.record_many(users);
    }
}

pub struct PendingUsers {
    budget: Arc<UserBudget>,
    /// Per shard, the users of each hour (nearly always one or two hours):
    /// an already uniform hash needs no hashing, so recording one costs a
    /// short lock and a probe.
    shards: [Mutex<Vec<(i32, UniformSet)>>; SHARDS],
}

impl PendingUsers {
    pub fn new(budget: Arc<UserBudget>) -> Self {
        PendingUsers {
            budget,
            shards: Default::default(),
        }
    }

    /// Notes a user active at `ts` (unix seconds), once per hour.
    pub fn record(&self, user: UserHash, ts: i64) {
        let budget = &self.budget;
        let mut hours = self.shards[shard_of(user)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        note(&mut hours, budget, hour_of(ts), user);
    }

    /// Notes a request's users, `(user, ts)`, taking each shard's lock once
    /// rather than once per user.
    pub fn record_many(&self, users: &[(UserHash, i64)]) {
        let budget = &self.budget;
        if users.len() < 2 * SHARDS {
            for &(user, ts) in users {
                self.record(user, ts);
            }
            return;
        }
        for (i, shard) in self.shards.iter().enumerate() {
            let mut hours = shard.lock().unwrap_or_else(|e| e.into_inner());
            for &(user, ts) in users.iter().filter(|(u, _)| shard_of(*u) == i) {
                note(&mut hours, budget, hour_of(ts), user);
            }
        }
    }

    /// Up to `limit` of the users recorded so far, taken out of the set.
    /// The budget stays taken until [`UserBudget::release`]: the users are
    /// in flight.
    pub fn take(&self, limit: usize) -> Vec<PendingUser> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let mut hours = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (hour, users) in hours.iter_mut() {
                let n = (limit - out.len()).min(users.len());
                let taken: Vec<u64> = users.iter().copied().take(n).collect();
                for u in &taken {
                    users.remove(u);
                }
                out.extend(taken.into_iter().map(|u| (*hour, u)));
            }
            hours.retain(|(_, users)| !users.is_empty());
            if out.len() == limit {
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_each_user_once_per_hour_within_the_budget() {
        let dropped = prometheus::IntCounter::new("d", "d").unwrap();
        let budget = Arc::new(UserBudget::new(3, dropped.clone()));
        let pending = PendingUsers::new(budget.clone());
        pending.record(UserHash(1), 10);
        pending.record(UserHash(1), 20);
        pending.record(UserHash(1), 3600);
        pending.record(UserHash(2), 10);
        pending.record(UserHash(3), 10);
        assert_eq!(budget.used(), 3);
        assert_eq!(
            dropped.get(),
            1,
            "the fourth distinct pair is past the budget"
        );
        // Many at once: the same users, each once.
        let many: Vec<(UserHash, i64)> = (0..40).map(|i| (UserHash(1 + i % 2), 10)).collect();
        pending.record_many(&many);
        assert_eq!(
            budget.used(),
            3,
            "users 1 and 2 of hour 0 are noted already"
        );
        let mut taken = pending.take(2);
        assert_eq!(taken.len(), 2, "at most the limit");
        taken.extend(pending.take(10));
        taken.sort();
        assert_eq!(taken, vec![(0, 1), (0, 2), (1, 1)]);
        assert!(pending.take(10).is_empty());
        assert_eq!(budget.used(), 3, "in flight until Redis confirms");
        budget.release(3);
        assert_eq!(budget.used(), 0);
    }
}
