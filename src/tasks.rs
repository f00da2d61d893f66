//! Background tasks: the flush loop (memory → `real_time_metrics`) and the
//! history loop (memory → `metrics_history`). Each is a loop around a public
//! one-step function of [`Persistence`], which tests call directly.
//!
//! A failed tick is counted (in `persist.rs`) and logged once per change
//! of state, not once per tick, so an outage is one line when it starts and
//! one when it ends. The flush retries with backoff; on recovery it writes
//! the current values, so nothing counted meanwhile is lost.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::ingest::Ingest;
use crate::persist::{FlushOutcome, Persistence};

/// The first retry after a failed flush; doubled up to the flush interval.
const FIRST_RETRY: Duration = Duration::from_millis(500);

pub async fn flush_loop(
    persistence: Arc<Persistence>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut failing = false;
    let mut wait = interval;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
        match persistence.flush_once().await {
            Ok(outcome) => {
                if failing {
                    tracing::info!(?outcome, "store reachable again; flush caught up");
                    failing = false;
                } else if let FlushOutcome::Wrote {
                    series,
                    sketches,
                    daily,
                } = outcome
                {
                    tracing::debug!(series, sketches, daily, "flushed");
                }
                wait = interval;
            }
            Err(e) => {
                if !failing {
                    tracing::error!(error = %e, "flush failed; counting continues in memory and the flush retries");
                    failing = true;
                    wait = FIRST_RETRY;
                } else {
                    wait = (wait * 2).min(interval);
                }
            }
        }
    }
    // The last flush on the way out: what was counted since the last tick.
    match persistence.flush_once().await {
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
