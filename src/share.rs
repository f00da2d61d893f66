//! Work cut into pieces that the calling thread and a few scoped helper
//! threads take in turn: a large render and its gzip.
//!
//! Pieces are taken, not assigned: on a machine whose other core is busy a
//! helper may not run for a time slice or more, and a piece assigned to it
//! would hold the whole answer back. Here the calling thread simply takes
//! the next piece itself, so sharing is never much slower than doing it all
//! alone, and about `threads` times faster when the cores are free.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `work` applied to every item, on up to `threads` threads (the caller
/// being one of them); the results in the items' order.
pub fn share<I: Send, O: Send>(
    items: Vec<I>,
    threads: usize,
    work: impl Fn(I) -> O + Sync,
) -> Vec<O> {
    let helpers = threads.min(items.len()).saturating_sub(1);
    if helpers == 0 {
        return items.into_iter().map(work).collect();
    }
    let slots: Vec<Mutex<(Option<I>, Option<O>)>> = items
        .into_iter()
        .map(|item| Mutex::new((Some(item), None)))
        .collect();
    let next = AtomicUsize::new(0);
    let take = || {
        while let Some(slot) = slots.get(next.fetch_add(1, Ordering::Relaxed)) {
            let item = lock(slot).0.take();
            if let Some(item) = item {
                let out = work(item);
                lock(slot).1 = Some(out);
            }
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..helpers {
            // No thread to be had (a process at its limit): the caller
            // takes the pieces the helper would have.
            if std::thread::Builder::new()
                .name("botmetrics-share".into())
                .spawn_scoped(scope, take)
                .is_err()
            {
                break;
            }
        }
        take();
    });
    // The scope returns once every thread is done, and a thread that
    // panicked makes it panic: every slot holds its result here.
    slots
        .into_iter()
        .filter_map(|slot| slot.into_inner().unwrap_or_else(|p| p.into_inner()).1)
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_in_the_items_order() {
        for threads in [0, 1, 2, 3, 8] {
            for n in [0, 1, 2, 5, 100] {
                let items: Vec<usize> = (0..n).collect();
                let out = share(items, threads, |i| {
                    // Uneven pieces, so threads finish out of order.
                    std::thread::sleep(std::time::Duration::from_micros((i % 3) as u64 * 200));
                    i * 10
                });
                assert_eq!(out, (0..n).map(|i| i * 10).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn items_may_borrow_mutably() {
        let mut buffers = vec![Vec::new(); 6];
        let items: Vec<(usize, &mut Vec<u8>)> = buffers.iter_mut().enumerate().collect();
        let lens = share(items, 3, |(i, buf)| {
            buf.extend(std::iter::repeat_n(b'x', i));
            buf.len()
        });
        assert_eq!(lens, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(buffers[5], b"xxxxx");
    }

    #[test]
    fn helpers_do_take_pieces() {
        // With the caller held on its first piece, another thread must
        // take the rest, or this never ends.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Mutex::new(rx);
        let caller = std::thread::current().id();
        let who = share((0..4).collect(), 2, |i: usize| {
            let me = std::thread::current().id();
            if i == 0 {
                // Whoever took the first piece waits until the other
                // thread has done the last.
                let _ = lock(&rx).recv_timeout(std::time::Duration::from_secs(10));
            }
            if i == 3 {
                let _ = tx.send(());
            }
            me
        });
        assert!(who.iter().any(|t| *t != caller), "no helper ran");
    }
}
