//! Background tasks, every one driven by [`every`]: the flush (the source's
//! totals → `real_time_metrics`), the history (→ `metrics_history`), the
//! journal's fsync, and in cluster mode the sync to Redis and the claims'
//! settling. Each loops around a public one-step function, which tests call
//! directly.
//!
//! A failed tick is counted (in `persist`) and logged once per change of
//! state, not once per tick, so an outage is one line when it starts and
//! one when it ends. The flush retries with backoff; on recovery it writes
//! the current values, so nothing counted meanwhile is lost.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::ingest::Ingest;
use crate::persist::{FlushOutcome, Persistence};

/// The first retry after a failed flush; doubled up to the flush interval.
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// How long the flush loop waits before its next flush, after
/// `failures_in_a_row` failed flushes: the interval while flushes succeed,
/// then 0.5 s, 1 s, 2 s, … doubling and never longer than the interval.
/// Quick retries make a short outage cost seconds, not a whole interval;
/// the doubling keeps a long one from becoming a reconnect storm.
pub fn flush_wait(failures_in_a_row: u32, interval: Duration) -> Duration {
    if failures_in_a_row == 0 {
        return interval;
    }
    // 2^31 × 0.5 s is 34 years: past any interval, so saturating is exact.
    let doublings = (failures_in_a_row - 1).min(31);
    FIRST_RETRY.saturating_mul(1u32 << doublings).min(interval)
}

/// How a periodic task retries and what the log calls it.
#[derive(Debug, Clone, Copy)]
pub struct Every {
    pub interval: Duration,
    /// Retry a failed step sooner ([`flush_wait`]) rather than at the next
    /// interval: for steps whose failure leaves counts waiting.
    pub retry_sooner: bool,
    /// The lines an outage's start and end are logged with; `None`: the
    /// step logs its own failures.
    pub log: Option<Log>,
}

/// What a periodic task logs when it starts failing (with the error) and
/// when it works again.
#[derive(Debug, Clone, Copy)]
pub struct Log {
    pub failed: &'static str,
    pub recovered: &'static str,
}

/// The one loop around every periodic task: a step every `interval` (the
/// first one interval after start), retried as `every` says, until
/// `shutdown`. A failure is logged once when it starts and once when it
/// ends, not once per tick. The caller runs its own last step after it.
pub async fn every<F, Fut, T, E>(every: Every, mut step: F, shutdown: CancellationToken)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    T: std::fmt::Debug,
    E: std::fmt::Display,
{
    let mut failures: u32 = 0;
    loop {
        let wait = if every.retry_sooner {
            flush_wait(failures, every.interval)
        } else {
            every.interval
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
        match step().await {
            Ok(outcome) => {
                if let (Some(log), true) = (every.log, failures > 0) {
                    tracing::info!(?outcome, failures, "{}", log.recovered);
                } else {
                    tracing::trace!(?outcome, "periodic step done");
                }
                failures = 0;
            }
            Err(e) => {
                if let (Some(log), 0) = (every.log, failures) {
                    tracing::error!(error = %e, "{}", log.failed);
                }
                failures = failures.saturating_add(1);
            }
        }
    }
}

/// The flush loop: [`every`] around the flush, then the last flush on the
/// way out (what was counted since the last tick). Generic over the flush
/// so a test (with tokio's paused clock) sees exactly when each retry
/// happens.
pub async fn flush_loop_with<F, Fut, E>(
    mut flush: F,
    interval: Duration,
    shutdown: CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<FlushOutcome, E>>,
    E: std::fmt::Display,
{
    let task = Every {
        interval,
        retry_sooner: true,
        log: Some(Log {
            failed: "flush failed; counting continues in memory and the flush retries",
            recovered: "store reachable again; flush caught up",
        }),
    };
    every(task, &mut flush, shutdown).await;
    match flush().await {
        Ok(outcome) => tracing::info!(?outcome, "final flush done"),
        Err(e) => tracing::warn!(
            error = %e,
            "final flush failed; the journal keeps every acknowledged event and the next start counts them"
        ),
    }
}

pub async fn flush_loop(
    persistence: Arc<Persistence>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let flush = || async {
        let outcome = persistence.flush_once().await;
        if let Ok(FlushOutcome::Wrote { .. }) = outcome {
            crate::memory::give_back();
        }
        outcome
    };
    flush_loop_with(flush, interval, shutdown).await;
    // After the final flush: the lead goes back at once.
    persistence.finish().await;
}

/// Fsyncs the journal once a second (the `everysec` promise); the last
/// sync is [`final_journal_sync`], after the final flush.
pub async fn journal_sync_loop(ingest: Arc<Ingest>, shutdown: CancellationToken) {
    // Only `everysec` promises this tick: `always` fsyncs every commit, and
    // `no` leaves it to the kernel (it fsynced once a second too, until
    // `botmetrics_journal_fsyncs_total` showed it).
    if ingest
        .journal()
        .is_none_or(|j| j.policy() != crate::journal::FsyncPolicy::Everysec)
    {
        return;
    }
    let task = Every {
        interval: Duration::from_secs(1),
        retry_sooner: false,
        // A failure is logged where it happens and refuses new events.
        log: None,
    };
    let sync = || async {
        match ingest.journal() {
            Some(journal) => journal.sync().await,
            None => Ok(()),
        }
    };
    every(task, sync, shutdown).await;
}

/// The journal's last sync before exit: everything acknowledged is on disk.
pub async fn final_journal_sync(ingest: &Ingest) {
    if let Some(journal) = ingest.journal() {
        match journal.sync().await {
            Ok(()) => tracing::info!(last_lsn = journal.last_lsn(), "journal synced"),
            Err(e) => tracing::error!(error = %e, "final journal sync failed"),
        }
    }
}

/// A point per series every `interval`, and one last on the way out.
pub async fn history_loop(
    persistence: Arc<Persistence>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let task = Every {
        interval,
        retry_sooner: false,
        log: Some(Log {
            failed: "history write failed; the next tick tries again",
            recovered: "history writes work again",
        }),
    };
    let write = || async {
        let written = persistence.write_history_once().await;
        if matches!(written, Ok(n) if n > 0) {
            crate::memory::give_back();
        }
        written
    };
    every(task, write, shutdown).await;
    if let Err(e) = persistence.write_history_once().await {
        tracing::error!(error = %e, "final history write failed");
    }
}

/// One scan of every bot's user book at `now` (unix seconds): sessions
/// whose gap has passed end, users past memory go, cohorts and retention
/// gauges are counted again. Each bot's scan runs beside requests, never
/// inside a flush's cut.
pub async fn scan_users_once(metrics: &crate::metrics::Metrics, ingest: &Ingest, now: i64) {
    let started = std::time::Instant::now();
    let mut bytes = 0;
    for bot in metrics.bots().iter() {
        // A shared book lives in Redis: the lead's scan does it there.
        if !bot.book.enabled() || bot.shared_book_gap().is_some() {
            continue;
        }
        let scanned = ingest.alongside(|| bot.scan_users(now)).await;
        // The bot's own handles: a bot wiped meanwhile is out of the set
        // and takes them with it, rather than come back through a lookup.
        let s = &bot.counters;
        s.book_users.set(scanned.users as i64);
        s.book_fill
            .set(scanned.users as f64 / bot.book.limits().max_users as f64);
        s.book_evicted.inc_by(scanned.evicted);
        bytes += bot.book.bytes();
        if scanned.expired > 0 {
            tracing::info!(bot = %bot.bot, expired = scanned.expired, "users not seen within --user-memory forgotten");
        }
    }
    metrics.selfm.book_bytes.set(bytes as i64);
    metrics
        .selfm
        .book_scan_duration
        .observe(started.elapsed().as_secs_f64());
}

/// [`scan_users_once`] every `interval`.
pub async fn user_scan_loop(
    metrics: Arc<crate::metrics::Metrics>,
    ingest: Arc<Ingest>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let task = Every {
        interval,
        retry_sooner: false,
        log: None,
    };
    let scan = || async {
        scan_users_once(&metrics, &ingest, chrono::Utc::now().timestamp()).await;
        Ok::<_, std::convert::Infallible>(())
    };
    every(task, scan, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::time::Instant;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn the_backoff_doubles_from_half_a_second_to_the_interval() {
        let interval = Duration::from_secs(10);
        let waits: Vec<Duration> = (0..9).map(|n| flush_wait(n, interval)).collect();
        let expected = [10.0, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0].map(secs);
        assert_eq!(waits, expected);
        // Never longer than the interval, however short, and no overflow.
        assert_eq!(flush_wait(1, Duration::from_millis(200)), secs(0.2));
        assert_eq!(flush_wait(u32::MAX, interval), interval);
        assert_eq!(flush_wait(40, Duration::MAX), FIRST_RETRY * (1 << 31));
    }

    /// The loop itself follows that sequence: on tokio's paused clock, a
    /// store that fails five times then answers is tried at exactly
    /// 10, 10.5, 11.5, 13.5, 17.5, 25.5 s, then every 10 s again; the
    /// shutdown makes one last flush.
    #[tokio::test(start_paused = true)]
    async fn the_flush_loop_retries_on_that_schedule() {
        let started = Instant::now();
        let calls: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let shutdown = CancellationToken::new();
        let seen = calls.clone();
        let looping = tokio::spawn(flush_loop_with(
            move || {
                let seen = seen.clone();
                async move {
                    let mut seen = seen.lock().unwrap();
                    seen.push(started.elapsed());
                    if seen.len() <= 5 {
                        Err(crate::store::StoreError::Sql(sqlx::Error::PoolTimedOut))
                    } else {
                        Ok(FlushOutcome::Idle)
                    }
                }
            },
            Duration::from_secs(10),
            shutdown.clone(),
        ));
        tokio::time::sleep(secs(40.0)).await;
        shutdown.cancel();
        looping.await.unwrap();
        let calls = calls.lock().unwrap().clone();
        let expected = [10.0, 10.5, 11.5, 13.5, 17.5, 25.5, 35.5, 40.0].map(secs);
        assert_eq!(calls, expected);
    }
}
