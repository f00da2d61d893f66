//! Background tasks: the flush loop (memory → `real_time_metrics`) and the
//! history loop (memory → `metrics_history`). Each is a loop around a public
//! one-step function of [`Persistence`], which tests call directly.
//!
//! A failed tick is counted (in `persist.rs`) and logged once per change
//! of state, not once per tick, so an outage is one line when it starts and
//! one when it ends. The flush retries with backoff; on recovery it writes
//! the current values, so nothing counted meanwhile is lost.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::ingest::Ingest;
use crate::persist::{FlushOutcome, Persistence};
use crate::store;

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

pub async fn flush_loop(
    persistence: Arc<Persistence>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    flush_loop_with(|| persistence.flush_once(), interval, shutdown).await;
}

/// The flush loop around any flush: the seam that lets a test (with tokio's
/// paused clock) see exactly when each retry happens.
pub async fn flush_loop_with<F, Fut>(mut flush: F, interval: Duration, shutdown: CancellationToken)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = store::Result<FlushOutcome>>,
{
    let mut failures: u32 = 0;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(flush_wait(failures, interval)) => {}
        }
        match flush().await {
            Ok(outcome) => {
                if failures > 0 {
                    tracing::info!(?outcome, failures, "store reachable again; flush caught up");
                } else if let FlushOutcome::Wrote {
                    series,
                    sketches,
                    daily,
                } = outcome
                {
                    tracing::debug!(series, sketches, daily, "flushed");
                }
                failures = 0;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::error!(error = %e, "flush failed; counting continues in memory and the flush retries");
                }
                failures = failures.saturating_add(1);
            }
        }
    }
    // The last flush on the way out: what was counted since the last tick.
    match flush().await {
        Ok(outcome) => tracing::info!(?outcome, "final flush done"),
        Err(e) => tracing::warn!(
            error = %e,
            "final flush failed; the journal keeps every acknowledged event and the next start counts them"
        ),
    }
}

/// Fsyncs the journal once a second (the `everysec` promise), and once
/// more on the way out, after the final flush.
pub async fn journal_sync_loop(ingest: Arc<Ingest>, shutdown: CancellationToken) {
    let Some(journal) = ingest.journal() else {
        return;
    };
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        // A failure is logged where it happens and refuses new events.
        let _ = journal.sync().await;
    }
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

pub async fn history_loop(
    persistence: Arc<Persistence>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut failing = false;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match persistence.write_history_once().await {
            Ok(points) => {
                if failing {
                    tracing::info!(points, "history writes work again");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::error!(error = %e, "history write failed; the next tick tries again");
                    failing = true;
                }
            }
        }
    }
    if let Err(e) = persistence.write_history_once().await {
        tracing::error!(error = %e, "final history write failed");
    }
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
                        Err(store::StoreError::Sql(sqlx::Error::PoolTimedOut))
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
