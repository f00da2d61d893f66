//! Pooled buffers for rendered pages: the registry renders `/metrics`
//! into one (`Metrics::render_page`), and the answer's body gives it back.
//! Kept with the registry that fills them, below the render cache that
//! serves the bodies.

use std::sync::Arc;

use bytes::Bytes;

/// Buffers for rendered pages, each handed back here when the last
/// response that sends it is done. A 1,000-bot `/metrics` page is 5 MB: a
/// fresh one per render was 5 MB of pages faulted in and zeroed by the
/// kernel every scrape, about a tenth of the render. One spare is kept
/// (the page being served, held by the cache until the next render
/// replaces it, is the other), so this holds at most one page more than
/// the cache does.
#[derive(Clone, Default)]
pub struct PagePool(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

/// Pages kept for the next render.
const SPARE_PAGES: usize = 1;

impl PagePool {
    /// An empty buffer: a page rendered before, when one is free.
    pub fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// `page` as a body, given back to the pool when its last clone drops.
    pub fn body(&self, page: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            page,
            pool: self.clone(),
        })
    }
}

struct Pooled {
    page: Vec<u8>,
    pool: PagePool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.page
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut spare = self.pool.0.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < SPARE_PAGES {
            let mut page = std::mem::take(&mut self.page);
            page.clear();
            spare.push(page);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page comes back to the pool only when the last body over it is
    /// gone, empty and with its capacity, and is never handed out while a
    /// response may still be sending it.
    #[test]
    fn a_page_returns_when_its_last_body_is_dropped() {
        let pool = PagePool::default();
        let mut page = pool.take();
        page.extend_from_slice(&[b'x'; 100_000]);
        let ptr = page.as_ptr();
        let body = pool.body(page);
        let clone = body.clone();
        drop(body);
        // Still held by `clone`: the pool has nothing to give.
        assert_eq!(pool.take().capacity(), 0);
        assert_eq!(&clone[..3], b"xxx");
        drop(clone);
        let again = pool.take();
        assert!(again.is_empty());
        assert!(again.capacity() >= 100_000);
        assert_eq!(again.as_ptr(), ptr);
        // At most SPARE_PAGES kept.
        let (a, b) = (pool.body(vec![1; 10]), pool.body(vec![2; 10]));
        drop((a, b));
        assert_eq!(pool.0.lock().unwrap().len(), SPARE_PAGES);
    }
}
