//! Start-up recovery of the sync to Redis, apart from the steady sync in
//! [`super`]: before the first sync every bot's totals are in Redis (seeded
//! from the store if not), this replica's claims from before its start are
//! settled, and its journal (and stopped replicas' in the same data
//! directory) is counted past what Redis holds; and when Redis turns out
//! to hold less of this replica than it confirmed (it lost data), the
//! difference is sent again from the journal.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::Utc;

use super::super::connection::Conn;
use super::super::pending::{PendingUsers, UserBudget};
use super::super::{ClusterError, Result, timed};
use super::{BotSync, Invocation, State, Syncer, cut, field};
use crate::dedupe::IdHash;
use crate::metrics::Metrics;
use crate::store::Stored;

impl Syncer {
    /// Sends again what Redis lost of this replica's counts for `b`: the
    /// journal's records past `before` (what the reseeded totals hold of
    /// it) up to what Redis had confirmed, counted afresh into a scratch
    /// copy of the bot. Marked with that confirmed mark, so it is added
    /// once however often it is sent, and a replica that dies before it is
    /// sent replays the same records at its next start.
    pub(super) async fn recover(
        &self,
        b: &mut BotSync,
        before: u64,
        now: i64,
        conn: &Conn,
    ) -> Result<()> {
        let lost = (before, b.confirmed);
        let Some(journal) = self.ingest.journal() else {
            tracing::warn!(
                bot = %b.bot.bot,
                "redis lost counts of this replica that the store had not received, and without a journal they cannot be sent again"
            );
            b.confirmed = before;
            return Ok(());
        };
        let scratch = Metrics::new(
            std::slice::from_ref(&b.bot.bot),
            self.max_label_values,
            self.metrics.calendar().tz(),
            0.0,
            crate::metrics::users::BookLimits::OFF,
        )
        .map_err(|e| ClusterError::Protocol(e.to_string()))?;
        let Some(copy) = scratch.bot(&b.bot.bot) else {
            return Ok(());
        };
        // The replayed events' runs go with the resent counts.
        if let Some((gap, max_users)) = b.bot.shared_book_limits() {
            copy.share_book(gap, max_users);
        }
        let dropped = prometheus::IntCounter::new("recovery_users_dropped", "unused")
            .map_err(|e| ClusterError::Protocol(e.to_string()))?;
        let users = PendingUsers::new(Arc::new(UserBudget::new(usize::MAX, dropped)));
        let (mut first, mut events) = (None, 0u64);
        journal.replay(lost.0, lost.1, |r| {
            first.get_or_insert(r.lsn);
            if let Ok(decoded) = crate::record::decode(r.body)
                && decoded.bot == &*b.bot.bot
            {
                for (event, _) in &decoded.events {
                    copy.apply(event);
                    if let Some(user) = event.user {
                        users.record(user, event.ts);
                    }
                }
                events += decoded.events.len() as u64;
            }
        })?;
        if first.is_none_or(|f| f > lost.0 + 1) {
            tracing::warn!(
                bot = %b.bot.bot,
                from = lost.0,
                to = lost.1,
                "redis lost counts of this replica and the journal no longer holds all of them: some are lost"
            );
        }
        let batch = cut(
            &copy,
            Some(&users),
            &HashMap::new(),
            &HashMap::new(),
            lost.1,
        );
        let users = batch.users.len();
        let mut conn = conn.clone();
        let answer: Vec<i64> =
            timed(self.invocation(b, Some(&batch), before, now).run(&mut conn)).await?;
        match answer.first() {
            Some(1 | 2) => {
                tracing::info!(
                    bot = %b.bot.bot,
                    events,
                    users,
                    from = lost.0,
                    to = lost.1,
                    "redis lost counts of this replica; sent again from the journal"
                );
                Ok(())
            }
            _ => Err(ClusterError::Protocol(format!(
                "recovery answered {answer:?}"
            ))),
        }
    }

    /// Before the first sync: every bot's totals are in Redis (seeded from
    /// the store if not), then this replica's journal, and any stopped
    /// replica's in the same data directory, is counted past what Redis
    /// holds of each, so a restart (or `kill -9`) neither loses nor repeats.
    pub(super) async fn prepare(&self, state: &mut State) -> Result<()> {
        let conn = timed(self.cluster.redis.conn()).await?;
        if !state.claims_settled {
            warn_about_eviction(conn.clone()).await;
            // First, so that claims (armed by it) work as soon as Redis
            // does, whatever the store is doing.
            {
                let claims = &self.claims;
                let bots: Vec<&str> = state.bots.iter().map(|b| &*b.bot.bot).collect();
                let (kept, dropped) = claims.resolve_own(&bots, &self.ingest.dedupe).await?;
                if kept + dropped > 0 {
                    tracing::info!(
                        confirmed = kept,
                        given_back = dropped,
                        "claims pending at the last stop settled against the journal"
                    );
                }
            }
            state.claims_settled = true;
        }
        let mut stored = None;
        let mut seeded = 0;
        for b in &state.bots {
            let mut c = conn.clone();
            let exists: bool = timed(
                redis::cmd("EXISTS")
                    .arg(b.keys.seeded())
                    .query_async(&mut c),
            )
            .await?;
            if !exists && self.seed(b, &mut stored).await? {
                seeded += 1;
            }
        }
        let Some(journal) = self.ingest.journal() else {
            return Ok(());
        };
        // Listed once: the journals adopted below are those whose marks
        // were read, held locked meanwhile.
        let orphans = if state.adopted {
            Vec::new()
        } else {
            journal.orphans()?
        };
        let mut ids = vec![journal.id().to_owned()];
        ids.extend(orphans.iter().map(|o| o.id.clone()));
        // applied[(replica, bot)]
        let mut applied: HashMap<(String, String), u64> = HashMap::new();
        for b in &state.bots {
            let mut c = conn.clone();
            let marks: Vec<Option<u64>> = timed(
                redis::cmd("HMGET")
                    .arg(b.keys.applied())
                    .arg(&ids)
                    .query_async(&mut c),
            )
            .await?;
            for (id, mark) in ids.iter().zip(marks) {
                applied.insert((id.clone(), b.bot.bot.to_string()), mark.unwrap_or(0));
            }
        }
        let mark = |replica: &str, bot: &str| {
            applied
                .get(&(replica.to_owned(), bot.to_owned()))
                .copied()
                .unwrap_or(0)
        };
        let own = journal.id().to_owned();
        for b in &mut state.bots {
            b.confirmed = mark(&own, &b.bot.bot);
        }
        let held = state.bots.iter().map(|b| b.confirmed).max().unwrap_or(0);
        if journal.skip_past(held) {
            tracing::warn!(
                held,
                on_disk = journal.recovered_lsn(),
                "redis holds records of this replica that its journal lost (a torn tail, or a failed write): numbering continues past them"
            );
        }
        // What other replicas took over from these journals' replicas
        // while they were gone (and counted): left out of the replay.
        let mut released: HashSet<(String, String, IdHash)> = HashSet::new();
        if !state.replayed || !state.adopted {
            for b in &state.bots {
                for id in &ids {
                    for h in self.claims.released(&b.bot.bot, id).await? {
                        released.insert((id.clone(), b.bot.bot.to_string(), h));
                    }
                }
            }
        }
        let was_released = |journal: &str, bot: &str, id: IdHash| {
            !released.is_empty() && released.contains(&(journal.to_owned(), bot.to_owned(), id))
        };
        if !state.replayed {
            let replayed = self
                .ingest
                .replay_own(
                    &self.metrics,
                    |bot| mark(&own, bot),
                    |bot, id| was_released(&own, bot, id),
                )
                .await?;
            state.replayed = true;
            tracing::info!(replica = %self.cluster.replica, seeded, ?replayed, "cluster mode: journal counted past what Redis holds");
        }
        if !state.adopted {
            let adopted = self
                .ingest
                .adopt_orphans(&self.metrics, orphans, mark, was_released)
                .await?;
            state.adopted = true;
            if adopted.records > 0 {
                tracing::info!(
                    ?adopted,
                    "stopped replicas' journals counted past what Redis holds"
                );
            }
        }
        Ok(())
    }

    /// Seeds `b`'s totals into Redis from the store, unless a replica did
    /// already. `stored` caches the store's rows across bots of one sync.
    pub(super) async fn seed(&self, b: &BotSync, stored: &mut Option<Stored>) -> Result<bool> {
        if stored.is_none() {
            self.store.migrate().await?;
            *stored = Some(self.store.load().await?);
        }
        let Some(stored) = stored.as_ref() else {
            return Ok(false);
        };
        let bot = &*b.bot.bot;
        let now = Utc::now();
        let mut keys = vec![
            b.keys.series(),
            b.keys.applied(),
            b.keys.seeded(),
            b.keys.today(),
            b.keys.dirty(),
        ];
        // The book first, in parts, under a load token the seed checks:
        // nothing merges into it before the seeded marker is set.
        let token = format!(
            "{}:{}",
            self.cluster.replica,
            now.timestamp_nanos_opt().unwrap_or(0)
        );
        let book_loaded = if b.bot.shared_book_gap().is_some() {
            let rows = stored.users.get(bot).map_or(&[][..], |r| r.as_slice());
            if !self.seed_book(b, rows, &token).await? {
                return Ok(false);
            }
            keys.push(b.keys.book_load());
            keys.len()
        } else {
            0
        };
        let series: Vec<(String, String)> = stored
            .series
            .iter()
            .filter(|r| r.bot == bot && !crate::metrics::bot::derived(&r.metric))
            .filter(|r| r.value.is_finite())
            .map(|r| (field(&r.metric, &r.labels), r.value.to_string()))
            .collect();
        let applied: Vec<(String, String)> = stored
            .cluster_progress
            .iter()
            .filter(|p| p.bot == bot)
            .map(|p| (p.replica.clone(), p.applied.to_string()))
            .collect();
        let yesterday = (now - chrono::Duration::days(1)).date_naive();
        let today: Vec<(String, String)> = stored
            .daily
            .iter()
            .filter(|d| d.bot == bot && d.day >= yesterday)
            .map(|d| (format!("{}:{}", d.day, d.name), d.value.to_string()))
            .collect();
        let mut sketches = Vec::new();
        for s in stored.cluster_sketches.iter().filter(|s| s.bot == bot) {
            let key = format!("bm:{{{bot}}}:{}", s.sketch);
            if let Some(left) = b.keys.stored_sketch_ttl(&key, now.timestamp()) {
                keys.push(key);
                sketches.push((keys.len(), left, s.hll.clone()));
            }
        }
        let mut args: Vec<Vec<u8>> = [series.len(), applied.len(), today.len(), sketches.len()]
            .iter()
            .map(|n| n.to_string().into_bytes())
            .collect();
        args.push(now.to_rfc3339().into_bytes());
        args.push(book_loaded.to_string().into_bytes());
        args.push(token.into_bytes());
        for (f, v) in series.into_iter().chain(applied).chain(today) {
            args.push(f.into_bytes());
            args.push(v.into_bytes());
        }
        for (position, ttl, hll) in sketches {
            args.push(position.to_string().into_bytes());
            args.push(ttl.to_string().into_bytes());
            args.push(hll);
        }
        let mut conn = timed(self.cluster.redis.conn()).await?;
        let seeded: i64 =
            timed(Invocation::new(&self.seed_script, keys, args).run(&mut conn)).await?;
        if seeded == 1 {
            self.cluster.metrics.reseeds.inc();
            tracing::info!(bot, "cluster totals seeded into Redis from the store");
        }
        Ok(seeded == 1)
    }
}

impl Syncer {
    /// Loads a bot's stored book into Redis in parts (`book_seed.lua`):
    /// false when another replica took the load over or seeded first.
    async fn seed_book(
        &self,
        b: &BotSync,
        rows: &[crate::store::UserRow],
        token: &str,
    ) -> Result<bool> {
        /// Users per call: a few hundred KB of arguments.
        const PART: usize = 10_000;
        let script = redis::Script::new(include_str!("../lua/book_seed.lua"));
        let mut conn = timed(self.cluster.redis.conn()).await?;
        let mut parts = rows.chunks(PART).peekable();
        let mut first = true;
        loop {
            let part = parts.next().unwrap_or_default();
            let mut invocation = script.prepare_invoke();
            for key in [
                b.keys.book(),
                b.keys.book_changed(),
                b.keys.book_load(),
                b.keys.seeded(),
            ] {
                invocation.key(key);
            }
            invocation.arg(token).arg(if first { "1" } else { "0" });
            for row in part {
                let entry = crate::metrics::users::Entry::from_stored(&row.entry);
                invocation.arg(row.key.to_le_bytes().as_slice());
                invocation.arg(entry.pack().as_slice());
            }
            let landed: i64 = timed(invocation.invoke_async(&mut conn)).await?;
            if landed != 1 {
                return Ok(false);
            }
            first = false;
            if parts.peek().is_none() {
                return Ok(true);
            }
        }
    }
}

/// An evicting Redis may drop a bot's totals or claims under memory
/// pressure while its seeded marker stays, which no reseed would mend.
/// Best effort: managed Redis often refuses CONFIG, and that is fine.
async fn warn_about_eviction(mut conn: Conn) {
    let policy: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut conn)
        .await;
    if let Ok(policy) = policy
        && let Some(policy) = policy.get(1)
        && policy != "noeviction"
    {
        tracing::warn!(
            policy = %policy,
            "redis may evict keys under memory pressure (maxmemory-policy {policy}); cluster totals and dedupe claims need `maxmemory-policy noeviction`"
        );
    }
}
