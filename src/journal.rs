//! The journal: a local write-ahead log of accepted batches, written before
//! their 202 goes out, so an acknowledged event survives a crash.
//!
//! One concern in one file on purpose (about 750 lines before its tests):
//! the segment format, group commit, recovery of a torn tail, trimming and
//! adopting a stopped process's journal all rest on the same invariants
//! (LSN order, the lock file, what is on disk at open), and reading them
//! side by side is how they are checked.
//!
//! The verbs of the hot path and the flush are [`Journal::append`] +
//! [`Journal::commit`] (group commit), [`Journal::sync`], [`Journal::replay`]
//! and [`Journal::trim`]; the rest open, inspect (backlog, LSNs) and adopt
//! stopped processes' journals. Callers never see files or offsets, only
//! log sequence numbers (LSNs).
//!
//! # On disk
//!
//! A journal is a directory `<data-dir>/journal/j-<id>/` holding a `lock`
//! file (whoever holds its lock owns the journal) and segments named by their
//! first LSN. A segment opens with a header (magic `BMJ`, format version,
//! first LSN) followed by records, each framed as
//!
//! ```text
//! u32 length | u32 crc32(payload) | payload = u64 lsn | i64 unix seconds | body
//! ```
//!
//! all little-endian. As in SQLite's WAL frames and Redis' AOF loader, a
//! record whose length runs past the end of the file or whose checksum fails
//! is a torn write: it and everything after it in that segment are dropped
//! (the file is truncated there), never misread. Segments are never appended
//! to after a restart; writing resumes in a new one.
//!
//! # Durability
//!
//! Concurrent requests share one `write(2)`: the first to reach the file
//! writes everything queued so far (PostgreSQL's and Kafka's group commit).
//! With `everysec` a 202 waits for that write (it survives the process
//! being killed) and a background task fsyncs once a second (power loss
//! costs at most that second, as Redis' `appendfsync everysec`); with
//! `always` it waits for the fsync too; with `no` the kernel decides.
//!
//! # Failure
//!
//! A failed group write (a full disk) is cut off the segment, so none of
//! the records it carried stays on disk, and breaks the journal until
//! restart: the failed group's requests and every later one are refused,
//! while a record durable before the failure stays acknowledged. The
//! records that exist are then exactly the LSNs up to the last durable one,
//! where a snapshot is cut ([`Journal::cut_lsn`]); `ingest` counts a record
//! only once it is durable, so a refused request changes nothing. Under
//! `always` a failed fsync does the same: every record written since the
//! last fsync that succeeded belongs to a request still waiting, so all of
//! them are cut off the segment (the kernel may have written some of them;
//! a restart must not count what was refused).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use clap::ValueEnum;

/// When the journal is fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FsyncPolicy {
    /// Before every 202: no acknowledged event is lost even on power loss;
    /// each answer waits for the disk.
    Always,
    /// Once a second (the default): a 202 waits only for the write into the
    /// OS; power loss can cost the last second, a crash of the process
    /// nothing.
    Everysec,
    /// Never explicitly: the kernel writes back when it likes (typically
    /// within 30 s). A crash of the process loses nothing.
    No,
}

const MAGIC: &[u8; 4] = b"BMJ\x01";
const HEADER_LEN: u64 = 12;
const FRAME_LEN: usize = 8;
/// Longest record accepted when reading: far above any batch the HTTP limits
/// allow, so a garbage length is recognised as a torn tail.
const MAX_RECORD: u32 = 256 << 20;
/// A segment is closed once it is this large...
const SEGMENT_BYTES: u64 = 16 << 20;
/// ...or holds records this far apart (by their own times), so a quiet
/// journal can still be trimmed.
const SEGMENT_AGE: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("journal write failed: {0}")]
    Io(#[from] io::Error),
    #[error("an earlier journal write failed; nothing more is accepted until restart")]
    Broken,
    #[error(
        "the journal holds {bytes} bytes not yet in the store (--journal-max-bytes {max}); retry once the store has caught up"
    )]
    Full { bytes: u64, max: u64 },
}

pub type Result<T, E = JournalError> = std::result::Result<T, E>;

/// A segment already closed: it is only read and, once trimmed, deleted.
#[derive(Debug)]
struct Sealed {
    path: PathBuf,
    last: u64,
    bytes: u64,
    closed_at: SystemTime,
}

/// What is queued for the next group write.
struct Pending {
    buf: Vec<u8>,
    /// The last LSN handed out.
    last: u64,
    /// The latest time (unix seconds) of a record queued since the last
    /// group write.
    newest_at: i64,
}

struct Segment {
    file: File,
    path: PathBuf,
    bytes: u64,
    /// The time of its first record (unix seconds), `None` while it has
    /// none. Its age is measured by its records' times rather than a clock
    /// read per group write, which the single-event path would pay for
    /// every request.
    first_at: Option<i64>,
    /// The buffer of the last group write, emptied: swapped with the queue
    /// at the next one, so a group write allocates nothing.
    spare: Vec<u8>,
}

/// A journal this process owns.
pub struct Journal {
    id: String,
    /// `<data-dir>/journal`, where other processes' journals are found.
    root: PathBuf,
    /// Which store this journal feeds (see [`Journal::open`]).
    store: String,
    dir: PathBuf,
    policy: FsyncPolicy,
    max_bytes: u64,
    /// Held for the life of the journal: the OS releases it if we die.
    _lock: File,
    pending: Mutex<Pending>,
    /// The segment being written; a tokio mutex because the group writer
    /// holds it across nothing but its own write and fsync.
    current: tokio::sync::Mutex<Segment>,
    sealed: Mutex<Vec<Sealed>>,
    written: AtomicU64,
    synced: AtomicU64,
    /// fsyncs done, of the current segment and of closed ones: what
    /// `--journal-fsync` promises is observable (`botmetrics_journal_fsyncs_total`).
    fsyncs: Arc<AtomicU64>,
    /// Woken whenever `written` or `synced` advance (or the journal breaks).
    progress: tokio::sync::Notify,
    /// The current segment's size, readable without its lock.
    current_bytes: AtomicU64,
    /// What the store has applied; bytes past it count against `max_bytes`.
    applied: AtomicU64,
    /// The last LSN found on disk at open: records up to it are replayed.
    recovered: u64,
    broken: AtomicBool,
    /// The fault seam: while set, every group write fails as a full disk
    /// does, after writing half of what it was given.
    fail_writes: AtomicBool,
    /// The fsync fault seam: while set, fsyncs of the current segment fail
    /// as a failing disk's do.
    fail_fsyncs: AtomicBool,
    /// The current segment's length at the start of its last fsync that
    /// succeeded: under `always`, what a failed fsync cuts it back to.
    durable: Mutex<(PathBuf, u64)>,
    /// The hold seam: while set, group writes wait (a slow disk), so a test
    /// can see that nothing is answered or counted before its record is
    /// written.
    hold_writes: AtomicBool,
    released: tokio::sync::Notify,
}

/// A record handed to [`Journal::replay`].
pub struct Record<'a> {
    pub lsn: u64,
    /// When it was appended (unix seconds).
    pub at: i64,
    pub body: &'a [u8],
}

/// An unlocked journal of a process that has stopped (or died): its records
/// past what the store applied still have to be counted.
pub struct Orphan {
    pub id: String,
    dir: PathBuf,
    lock: File,
}

/// What opening found.
pub struct Opened {
    pub journal: Journal,
    /// Records dropped from a torn tail.
    pub torn_bytes: u64,
}

impl Journal {
    /// Opens the journal under `data_dir` for `store` (the database it feeds):
    /// continues the first such journal no running process holds (this
    /// process's own, before a restart), or starts a new one.
    pub fn open(
        data_dir: &Path,
        store: &str,
        policy: FsyncPolicy,
        max_bytes: u64,
    ) -> Result<Opened> {
        let root = data_dir.join("journal");
        let dir_err = |path: &Path| {
            let path = path.to_owned();
            move |source| JournalError::Dir { path, source }
        };
        fs::create_dir_all(&root).map_err(dir_err(&root))?;
        // The first journal of this store that no running process holds is
        // this process's own from before a restart: continue it.
        let mine = unheld(&root, store, None)?
            .into_iter()
            .next()
            .map(|o| (o.id, o.dir, o.lock));
        let (id, dir, lock) = match mine {
            Some(found) => found,
            None => {
                let id = new_id();
                let dir = root.join(format!("j-{id}"));
                fs::create_dir_all(&dir).map_err(dir_err(&dir))?;
                fs::write(dir.join("store"), store).map_err(dir_err(&dir))?;
                let lock =
                    try_lock(&dir)
                        .map_err(dir_err(&dir))?
                        .ok_or_else(|| JournalError::Dir {
                            path: dir.clone(),
                            source: io::Error::other("a new journal is locked by someone else"),
                        })?;
                (id, dir, lock)
            }
        };
        let (sealed, last, torn_bytes) = recover(&dir)?;
        let current = Segment::create(&dir, last + 1)?;
        let journal = Journal {
            id,
            root,
            store: store.to_owned(),
            dir,
            policy,
            max_bytes,
            _lock: lock,
            pending: Mutex::new(Pending {
                buf: Vec::with_capacity(64 << 10),
                last,
                newest_at: i64::MIN,
            }),
            current: tokio::sync::Mutex::new(current),
            sealed: Mutex::new(sealed),
            written: AtomicU64::new(last),
            synced: AtomicU64::new(last),
            fsyncs: Arc::default(),
            progress: tokio::sync::Notify::new(),
            current_bytes: AtomicU64::new(HEADER_LEN),
            applied: AtomicU64::new(0),
            recovered: last,
            broken: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
            fail_fsyncs: AtomicBool::new(false),
            durable: Mutex::new((PathBuf::new(), 0)),
            hold_writes: AtomicBool::new(false),
            released: tokio::sync::Notify::new(),
        };
        Ok(Opened {
            journal,
            torn_bytes,
        })
    }

    /// The journals of this store that no running process holds: those of
    /// processes that stopped or died. Each is locked while its handle lives.
    pub fn orphans(&self) -> Result<Vec<Orphan>> {
        unheld(&self.root, &self.store, Some(&self.dir))
    }

    /// This journal's name in the store's progress table.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The last LSN handed out: every record up to it is in memory.
    pub fn last_lsn(&self) -> u64 {
        self.lock_pending().last
    }

    /// Where a snapshot taken while no request is in flight is cut: the
    /// last LSN handed out, or, once a write failed, the last one durable
    /// (every later record was refused and exists nowhere). Cutting there
    /// keeps the refused numbers out of the store's applied mark, so the
    /// records a restart appends under them are never taken as applied.
    pub fn cut_lsn(&self) -> u64 {
        let last = self.last_lsn();
        if !self.is_broken() {
            return last;
        }
        let durable = match self.policy {
            FsyncPolicy::Always => self.synced.load(Ordering::Acquire),
            FsyncPolicy::Everysec | FsyncPolicy::No => self.written.load(Ordering::Acquire),
        };
        durable.min(last)
    }

    /// The last LSN that was on disk when the journal was opened.
    pub fn recovered_lsn(&self) -> u64 {
        self.recovered
    }

    pub fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    /// fsyncs done since open.
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    /// Bytes of records the store has not applied yet, and the bound.
    pub fn backlog(&self) -> (u64, u64) {
        let applied = self.applied.load(Ordering::Relaxed);
        let sealed: u64 = self
            .lock_sealed()
            .iter()
            .filter(|s| s.last > applied)
            .map(|s| s.bytes)
            .sum();
        let pending = self.lock_pending().buf.len() as u64;
        // The current segment counts while it holds anything unapplied; a
        // segment the store holds whole is closed by `trim`.
        let current = if self.written.load(Ordering::Acquire) > applied {
            self.current_bytes.load(Ordering::Relaxed)
        } else {
            0
        };
        (sealed + current + pending, self.max_bytes)
    }

    /// Whether a write failed: nothing more is accepted until restart.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// The fault seam, for tests and fault drills: while `fail` is set, each
    /// group write writes half of what is queued and then fails with
    /// ENOSPC, as a disk that fills mid-write does.
    #[doc(hidden)]
    /// Holds every group write until called with `false`: see
    /// `hold_writes`. For tests, like [`Journal::fail_writes`].
    pub fn hold_writes(&self, hold: bool) {
        self.hold_writes.store(hold, Ordering::Release);
        if !hold {
            self.released.notify_waiters();
        }
    }

    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::Relaxed);
    }

    /// Makes fsyncs of the current segment fail (EIO) until called with
    /// `false`. For tests, like [`Journal::fail_writes`].
    #[doc(hidden)]
    pub fn fail_fsyncs(&self, fail: bool) {
        self.fail_fsyncs.store(fail, Ordering::Relaxed);
    }

    /// Refuses new records while the backlog is over the bound.
    pub fn check_room(&self) -> Result<()> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(JournalError::Broken);
        }
        let (bytes, max) = self.backlog();
        if bytes > max {
            return Err(JournalError::Full { bytes, max });
        }
        Ok(())
    }

    /// Makes every later record's LSN, and [`Journal::last_lsn`], greater
    /// than `lsn`: what a downstream (Redis) already holds under numbers
    /// this journal lost with a torn tail or a failed write must not be
    /// mistaken for new records that reuse them. Returns whether it moved.
    pub fn skip_past(&self, lsn: u64) -> bool {
        let mut pending = self.lock_pending();
        // Past it already, or at it with every record up to it found on
        // disk at open (nothing reuses its numbers): nothing to do.
        if pending.last > lsn || (pending.last == lsn && lsn <= self.recovered) {
            return false;
        }
        // One number with no record: the next cut is past `lsn` even if
        // nothing is appended before it.
        pending.last = lsn + 1;
        true
    }

    /// Queues a record and returns its LSN. Cheap and synchronous: call
    /// [`Journal::commit`] with the LSN before answering.
    pub fn append(&self, at: i64, body: &[u8]) -> u64 {
        let mut pending = self.lock_pending();
        let lsn = pending.last + 1;
        pending.last = lsn;
        let len = (16 + body.len()) as u32;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&lsn.to_le_bytes());
        crc.update(&at.to_le_bytes());
        crc.update(body);
        pending.newest_at = pending.newest_at.max(at);
        let buf = &mut pending.buf;
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&crc.finalize().to_le_bytes());
        buf.extend_from_slice(&lsn.to_le_bytes());
        buf.extend_from_slice(&at.to_le_bytes());
        buf.extend_from_slice(body);
        lsn
    }

    fn durable(&self, lsn: u64) -> bool {
        match self.policy {
            FsyncPolicy::Always => self.synced.load(Ordering::Acquire) >= lsn,
            FsyncPolicy::Everysec | FsyncPolicy::No => self.written.load(Ordering::Acquire) >= lsn,
        }
    }

    /// Returns once record `lsn` is as durable as the policy promises. The
    /// first caller to get the file writes everything queued, its own
    /// record and those of everyone waiting behind it.
    pub async fn commit(&self, lsn: u64) -> Result<()> {
        loop {
            // Durable first: a record written before a later write failed is
            // on disk, so it is acknowledged (and counted), never refused.
            if self.durable(lsn) {
                return Ok(());
            }
            if self.broken.load(Ordering::Relaxed) {
                return Err(JournalError::Broken);
            }
            // Whoever gets the file writes for everyone queued; the others
            // wait to be told, rather than queue for the file one by one.
            // The file is tried first: when nobody else writes (a lone
            // single event), that costs no registration with `progress`.
            let segment = match self.current.try_lock() {
                Ok(segment) => segment,
                Err(_) => {
                    // Registered before the checks, so a group write that
                    // ends in between still wakes this request; the file
                    // is tried again because that writer may have ended
                    // before the registration without covering `lsn`.
                    let progressed = self.progress.notified();
                    tokio::pin!(progressed);
                    progressed.as_mut().enable();
                    if self.durable(lsn) {
                        return Ok(());
                    }
                    match self.current.try_lock() {
                        Ok(segment) => segment,
                        Err(_) => {
                            progressed.await;
                            continue;
                        }
                    }
                }
            };
            let result = self
                .write_and_sync(segment, self.policy == FsyncPolicy::Always)
                .await;
            if let Err(e) = result {
                // What was taken from the queue may be half on disk: the
                // journal can no longer promise anything, so it says so.
                self.broken.store(true, Ordering::Relaxed);
                self.progress.notify_waiters();
                tracing::error!(error = %e, dir = %self.dir.display(), "journal write failed; new events are refused until restart");
                return Err(e.into());
            }
        }
    }

    /// One group write of everything queued, then (with `fsync`) an fsync
    /// of it, and a wake-up for every request waiting on either. The file
    /// lock is held for the write only: an fsync can take milliseconds, and
    /// the next group should be writing meanwhile (the fsync of a shared
    /// descriptor covers whatever reached the file before it). The fsync
    /// runs on the blocking pool, off the runtime's workers.
    async fn write_and_sync(
        &self,
        mut segment: tokio::sync::MutexGuard<'_, Segment>,
        fsync: bool,
    ) -> io::Result<()> {
        while self.hold_writes.load(Ordering::Acquire) {
            // Registered before the check, so a release in between wakes it.
            let released = self.released.notified();
            if !self.hold_writes.load(Ordering::Acquire) {
                break;
            }
            released.await;
        }
        let sealed = self.write_pending(&mut segment)?;
        let upto = self.written.load(Ordering::Acquire);
        let current = (fsync && self.synced.load(Ordering::Acquire) < upto)
            .then(|| segment.file.try_clone())
            .transpose()?;
        // What this fsync covers: the segment as it is now.
        let covers = (segment.path.clone(), segment.bytes);
        drop(segment);
        self.progress.notify_waiters();
        if let Some(sealed) = sealed {
            self.sync_sealed(sealed, fsync).await?;
        }
        if let Some(file) = current {
            let fail = self.fail_fsyncs.load(Ordering::Relaxed);
            let synced = tokio::task::spawn_blocking(move || {
                if fail {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                file.sync_data()
            })
            .await
            .map_err(io::Error::other)
            .and_then(|r| r);
            if let Err(e) = synced {
                // Broken at once, before any other request finds the file
                // free and writes after records that may not be on disk.
                self.broken.store(true, Ordering::Relaxed);
                if self.policy == FsyncPolicy::Always {
                    self.cut_to_durable().await;
                }
                return Err(e);
            }
            {
                let mut durable = self.durable.lock().unwrap_or_else(|p| p.into_inner());
                if durable.0 != covers.0 {
                    *durable = covers;
                } else {
                    durable.1 = durable.1.max(covers.1);
                }
            }
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.synced.fetch_max(upto, Ordering::AcqRel);
            self.progress.notify_waiters();
        }
        Ok(())
    }

    /// Under `always`, after a failed fsync: cuts the current segment back
    /// to where its last good fsync began. Every record past it belongs to
    /// a request still waiting for that fsync, refused now, so none of them
    /// may be counted after a restart. A segment not fsynced since it was
    /// created holds nothing durable past its header (synced at creation).
    async fn cut_to_durable(&self) {
        let mut segment = self.current.lock().await;
        let durable = {
            let durable = self.durable.lock().unwrap_or_else(|p| p.into_inner());
            if durable.0 == segment.path {
                durable.1
            } else {
                HEADER_LEN
            }
        };
        let cut = segment
            .file
            .set_len(durable)
            .and_then(|()| segment.file.seek(SeekFrom::Start(durable)).map(|_| ()));
        match cut {
            Ok(()) => {
                segment.bytes = durable;
                self.current_bytes.store(durable, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(
                error = %e,
                segment = %segment.path.display(),
                "journal: records of a failed fsync could not be cut off the segment; records refused with 503 may be counted after a restart"
            ),
        }
    }

    /// Writes what is queued; returns the segment it closed, if it reached
    /// its size or age, for the caller to fsync.
    fn write_pending(&self, segment: &mut Segment) -> io::Result<Option<File>> {
        // Checked under the file's lock, where it is set: no write after a
        // failed one may land past the cut and make its records look
        // written (`written` would then cover the refused ones).
        if self.is_broken() {
            return Ok(None);
        }
        let mut buf = std::mem::take(&mut segment.spare);
        buf.clear();
        let (last, newest_at) = {
            let mut pending = self.lock_pending();
            std::mem::swap(&mut pending.buf, &mut buf);
            let newest_at = std::mem::replace(&mut pending.newest_at, i64::MIN);
            (pending.last, newest_at)
        };
        if buf.is_empty() {
            segment.spare = buf;
            return Ok(None);
        }
        let written = self.write_all(&mut segment.file, &buf);
        let len = buf.len() as u64;
        segment.spare = buf;
        if let Err(e) = written {
            self.broken.store(true, Ordering::Relaxed);
            // Every request of this group is refused, so none of it may stay
            // on disk, whole records included: a restart would count them.
            // The file is cut back to where the group began.
            let undone = segment
                .file
                .set_len(segment.bytes)
                .and_then(|()| segment.file.seek(SeekFrom::Start(segment.bytes)));
            if let Err(cut) = undone {
                tracing::error!(
                    error = %cut,
                    segment = %segment.path.display(),
                    "journal: a failed write could not be cut off the segment; records refused with 503 may be counted after a restart"
                );
            }
            return Err(e);
        }
        segment.bytes += len;
        self.current_bytes.store(segment.bytes, Ordering::Relaxed);
        self.written.store(last, Ordering::Release);
        let first_at = *segment.first_at.get_or_insert(newest_at);
        let age = u64::try_from(newest_at.saturating_sub(first_at)).unwrap_or(0);
        if segment.bytes >= SEGMENT_BYTES || age >= SEGMENT_AGE.as_secs() {
            // The records are written, and their requests will be answered
            // 202: a segment that cannot be opened (a full disk) must not
            // refuse them. Writing goes on in this one; the next write
            // tries again.
            match self.rotate(segment, last) {
                Ok(sealed) => return Ok(Some(sealed)),
                Err(e) => tracing::warn!(
                    error = %e,
                    dir = %self.dir.display(),
                    "journal: could not open the next segment; the current one grows"
                ),
            }
        }
        Ok(None)
    }

    /// `file.write_all(buf)`, or the fault seam's half write and ENOSPC.
    fn write_all(&self, file: &mut File, buf: &[u8]) -> io::Result<()> {
        if self.fail_writes.load(Ordering::Relaxed) {
            file.write_all(&buf[..buf.len() / 2])?;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        file.write_all(buf)
    }

    /// Fsyncs a closed segment on the blocking pool: inline it would stall
    /// every request queued behind this write for the time it takes to sync
    /// 16 MiB. With `always` the caller waits (its records are in it);
    /// otherwise it runs in the background, well within the second.
    async fn sync_sealed(&self, file: File, wait: bool) -> io::Result<()> {
        if self.policy == FsyncPolicy::No {
            // Never explicitly: the kernel writes the closed file back.
            return Ok(());
        }
        let fsyncs = self.fsyncs.clone();
        let task = tokio::task::spawn_blocking(move || {
            file.sync_data().inspect(|()| {
                fsyncs.fetch_add(1, Ordering::Relaxed);
            })
        });
        if wait {
            return task.await.map_err(io::Error::other)?;
        }
        let dir = self.dir.clone();
        tokio::spawn(async move {
            if let Ok(Err(e)) = task.await {
                tracing::error!(error = %e, dir = %dir.display(), "journal: fsync of a closed segment failed");
            }
        });
        Ok(())
    }

    /// Closes the current segment (fsynced) and starts the next at `last + 1`.
    /// Closes the current segment and starts the next at `last + 1`;
    /// returns the closed file, which the caller fsyncs.
    fn rotate(&self, segment: &mut Segment, last: u64) -> io::Result<File> {
        let mut next = Segment::create(&self.dir, last + 1)?;
        next.spare = std::mem::take(&mut segment.spare);
        let old = std::mem::replace(segment, next);
        self.current_bytes.store(HEADER_LEN, Ordering::Relaxed);
        self.lock_sealed().push(Sealed {
            path: old.path,
            last,
            bytes: old.bytes,
            closed_at: SystemTime::now(),
        });
        Ok(old.file)
    }

    /// Writes whatever is queued and fsyncs: the once-a-second tick, and the
    /// last thing before exit.
    pub async fn sync(&self) -> Result<()> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(JournalError::Broken);
        }
        let segment = self.current.lock().await;
        self.write_and_sync(segment, true).await?;
        Ok(())
    }

    /// Calls `f` with every intact record whose LSN is in `(after, upto]`,
    /// in order, reading the segments from disk.
    pub fn replay(&self, after: u64, upto: u64, f: impl FnMut(Record<'_>)) -> Result<u64> {
        replay_dir(&self.dir, after, upto, f)
    }

    /// The store holds everything up to `applied`: segments wholly before
    /// it, and older than `keep` (ids in them are still wanted by dedupe
    /// after a restart), are deleted.
    pub async fn trim(&self, applied: u64, keep: Duration) -> Result<usize> {
        self.applied.fetch_max(applied, Ordering::Relaxed);
        {
            // The store holds everything written: close the segment, so that
            // it counts no more against the backlog and can be deleted.
            let mut segment = self.current.lock().await;
            if applied >= self.written.load(Ordering::Acquire)
                && segment.bytes > HEADER_LEN
                && self.lock_pending().buf.is_empty()
            {
                let sealed = self.rotate(&mut segment, applied)?;
                self.sync_sealed(sealed, false).await?;
            }
        }
        let now = SystemTime::now();
        let mut sealed = self.lock_sealed();
        let mut removed = 0;
        let mut kept = Vec::with_capacity(sealed.len());
        for s in sealed.drain(..) {
            let old = now.duration_since(s.closed_at).unwrap_or_default() >= keep;
            if s.last <= applied && old {
                fs::remove_file(&s.path)?;
                removed += 1;
            } else {
                kept.push(s);
            }
        }
        *sealed = kept;
        Ok(removed)
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_sealed(&self) -> std::sync::MutexGuard<'_, Vec<Sealed>> {
        self.sealed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Orphan {
    /// Every intact record past `after`.
    pub fn replay(&self, after: u64, f: impl FnMut(Record<'_>)) -> Result<u64> {
        replay_dir(&self.dir, after, u64::MAX, f)
    }

    /// Deletes the orphan once its records are safely elsewhere.
    pub fn remove(self) -> Result<()> {
        drop(self.lock);
        fs::remove_dir_all(&self.dir).map_err(|source| JournalError::Dir {
            path: self.dir.clone(),
            source,
        })
    }
}

impl Segment {
    fn create(dir: &Path, first: u64) -> io::Result<Segment> {
        let path = segment_path(dir, first);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let mut header = [0u8; HEADER_LEN as usize];
        header[..4].copy_from_slice(MAGIC);
        header[4..].copy_from_slice(&first.to_le_bytes());
        // The new name must survive power loss too, or a later fsync of
        // the file would save data nobody can find.
        let written = file
            .write_all(&header)
            .and_then(|()| file.sync_all())
            .and_then(|()| sync_dir(dir));
        if let Err(e) = written {
            // Not left behind: a segment named past records that the
            // current one goes on holding would mislead a replay.
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(Segment {
            file,
            path,
            bytes: HEADER_LEN,
            first_at: None,
            spare: Vec::new(),
        })
    }
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.wal"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn new_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let h = RandomState::new().hash_one((nanos, std::process::id()));
    format!("{h:016x}")
}

/// The journals under `root` written for `store` that no running process
/// holds (each locked now, oldest name first), leaving out `except`.
fn unheld(root: &Path, store: &str, except: Option<&Path>) -> Result<Vec<Orphan>> {
    let dir_err = |path: &Path| {
        let path = path.to_owned();
        move |source| JournalError::Dir { path, source }
    };
    let mut entries: Vec<PathBuf> = fs::read_dir(root)
        .map_err(dir_err(root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && Some(p.as_path()) != except)
        .collect();
    entries.sort();
    let mut found = Vec::new();
    for dir in entries {
        let Some(id) = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("j-"))
            .map(str::to_owned)
        else {
            continue;
        };
        // A journal written for another store is none of ours, even when
        // two configurations share a data directory.
        if fs::read_to_string(dir.join("store")).ok().as_deref() != Some(store) {
            continue;
        }
        // A journal a running process holds is skipped.
        if let Some(lock) = try_lock(&dir).map_err(dir_err(&dir))? {
            found.push(Orphan { id, dir, lock });
        }
    }
    Ok(found)
}

/// Locks `dir/lock` if nobody holds it.
fn try_lock(dir: &Path) -> io::Result<Option<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The segments of a journal directory, oldest first.
fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let first = p
                .file_name()?
                .to_str()?
                .strip_suffix(".wal")?
                .parse::<u64>()
                .ok()?;
            Some((first, p))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Reads one segment; calls `f` for each intact record; returns the byte
/// offset where intact records end and the last LSN seen.
fn scan(path: &Path, mut f: impl FnMut(Record<'_>)) -> io::Result<(u64, Option<u64>, u64)> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let total = bytes.len() as u64;
    if bytes.len() < HEADER_LEN as usize || &bytes[..4] != MAGIC {
        // A segment whose header never reached the disk holds nothing.
        return Ok((0, None, total));
    }
    let mut at = HEADER_LEN as usize;
    let mut last = None;
    while at + FRAME_LEN <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap_or_default());
        let start = at + FRAME_LEN;
        let end = start + len as usize;
        if !(16..=MAX_RECORD).contains(&len) || end > bytes.len() {
            break;
        }
        let payload = &bytes[start..end];
        if crc32fast::hash(payload) != crc {
            break;
        }
        let lsn = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
        let ts = i64::from_le_bytes(payload[8..16].try_into().unwrap_or_default());
        f(Record {
            lsn,
            at: ts,
            body: &payload[16..],
        });
        last = Some(lsn);
        at = end;
    }
    Ok((at as u64, last, total))
}

fn replay_dir(dir: &Path, after: u64, upto: u64, mut f: impl FnMut(Record<'_>)) -> Result<u64> {
    let mut count = 0;
    let list = segments(dir).map_err(|source| JournalError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    for (i, (_, path)) in list.iter().enumerate() {
        // A segment whose successor starts at or before `after` is wholly
        // applied: skip reading it.
        if list.get(i + 1).is_some_and(|(next, _)| *next <= after + 1) {
            continue;
        }
        scan(path, |r| {
            if r.lsn > after && r.lsn <= upto {
                count += 1;
                f(r);
            }
        })?;
    }
    Ok(count)
}

/// Finds what is on disk, truncating a torn tail.
fn recover(dir: &Path) -> Result<(Vec<Sealed>, u64, u64)> {
    let err = |source| JournalError::Dir {
        path: dir.to_owned(),
        source,
    };
    let mut sealed = Vec::new();
    let mut last = 0;
    let mut torn = 0;
    for (first, path) in segments(dir).map_err(err)? {
        // Numbering never goes back, even when every record was trimmed: the
        // store remembers how far it applied this journal, and a record that
        // reused a number below that would never be replayed. A segment's
        // name is the number its first record gets, written or not.
        last = last.max(first.saturating_sub(1));
        let (good, seen, total) = scan(&path, |_| {}).map_err(err)?;
        if good < total {
            torn += total - good;
            tracing::warn!(
                segment = %path.display(),
                dropped_bytes = total - good,
                "journal: dropping a torn tail (an incomplete write before a crash or power loss)"
            );
            if good == 0 {
                fs::remove_file(&path).map_err(err)?;
                continue;
            }
            let file = OpenOptions::new().write(true).open(&path).map_err(err)?;
            file.set_len(good).map_err(err)?;
            file.sync_all().map_err(err)?;
        }
        let Some(seg_last) = seen else {
            // Only a header: nothing to keep.
            fs::remove_file(&path).map_err(err)?;
            continue;
        };
        last = last.max(seg_last);
        sealed.push(Sealed {
            path,
            last: seg_last,
            bytes: good,
            closed_at: SystemTime::now(),
        });
    }
    Ok((sealed, last, torn))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(j: &Journal, after: u64) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        j.replay(after, u64::MAX, |r| out.push((r.lsn, r.body.to_vec())))
            .unwrap();
        out
    }

    #[tokio::test]
    async fn records_come_back_after_reopening() {
        let dir = tempdir();
        {
            let opened = Journal::open(&dir, "s", FsyncPolicy::Everysec, 1 << 30).unwrap();
            let j = opened.journal;
            for i in 0..10u8 {
                let lsn = j.append(100, &[i; 3]);
                j.commit(lsn).await.unwrap();
            }
        }
        let j = Journal::open(&dir, "s", FsyncPolicy::Everysec, 1 << 30)
            .unwrap()
            .journal;
        assert_eq!(j.recovered_lsn(), 10);
        let records = collect(&j, 7);
        assert_eq!(
            records,
            vec![(8, vec![7; 3]), (9, vec![8; 3]), (10, vec![9; 3])]
        );
        // Writing resumes after the recovered records.
        assert_eq!(j.append(100, b"x"), 11);
    }

    #[tokio::test]
    async fn numbers_a_downstream_holds_past_the_disk_are_never_reused() {
        let dir = tempdir();
        three_records(&dir, 10).await;
        let j = Journal::open(&dir, "s", FsyncPolicy::Everysec, 1 << 30)
            .unwrap()
            .journal;
        assert!(!j.skip_past(2), "behind the records on disk: nothing to do");
        assert!(!j.skip_past(3), "at them: nothing is reused");
        assert_eq!(j.last_lsn(), 3);
        // Redis holds up to 7: records 4..=7 were lost with a torn tail.
        let reused = j.append(1, b"new");
        assert_eq!(reused, 4, "appended before the downstream was asked");
        assert!(j.skip_past(7));
        assert_eq!(j.last_lsn(), 8, "a cut now is past what Redis holds");
        assert_eq!(j.append(1, b"next"), 9);
        assert!(!j.skip_past(8));
    }

    /// A journal with three records of `size` bytes, closed; the path of
    /// the segment that holds them.
    async fn three_records(dir: &Path, size: usize) -> PathBuf {
        let j = Journal::open(dir, "s", FsyncPolicy::Always, 1 << 30)
            .unwrap()
            .journal;
        for i in 0..3u8 {
            let lsn = j.append(1, &vec![i; size]);
            j.commit(lsn).await.unwrap();
        }
        j.current.lock().await.path.clone()
    }

    #[tokio::test]
    async fn a_failed_write_leaves_nothing_on_disk_and_refuses_what_follows() {
        let dir = tempdir();
        let (kept, failed) = {
            let j = Journal::open(&dir, "s", FsyncPolicy::Everysec, 1 << 30)
                .unwrap()
                .journal;
            let kept = j.append(1, b"kept");
            j.commit(kept).await.unwrap();
            // Half the group reaches the file, then ENOSPC.
            j.fail_writes(true);
            let failed = j.append(1, &[7; 100]);
            assert!(matches!(j.commit(failed).await, Err(JournalError::Io(_))));
            assert!(j.is_broken());
            assert_eq!(j.last_lsn(), failed);
            assert_eq!(
                j.cut_lsn(),
                kept,
                "a snapshot is cut at the last durable record"
            );
            // Broken until restart, even with space again...
            j.fail_writes(false);
            let after = j.append(1, b"after");
            assert!(matches!(j.commit(after).await, Err(JournalError::Broken)));
            assert!(matches!(j.check_room(), Err(JournalError::Broken)));
            assert!(j.sync().await.is_err());
            // ...but what was durable before the failure stays acknowledged.
            j.commit(kept).await.unwrap();
            (kept, failed)
        };
        let opened = Journal::open(&dir, "s", FsyncPolicy::Everysec, 1 << 30).unwrap();
        assert_eq!(
            opened.torn_bytes, 0,
            "the half write was cut off, not left torn"
        );
        assert_eq!(collect(&opened.journal, 0), vec![(kept, b"kept".to_vec())]);
        assert_eq!(opened.journal.recovered_lsn(), kept);
        assert!(failed > kept);
    }

    #[tokio::test]
    async fn a_failed_fsync_under_always_leaves_nothing_it_refused_on_disk() {
        let dir = tempdir();
        let (kept, failed) = {
            let j = Journal::open(&dir, "s", FsyncPolicy::Always, 1 << 30)
                .unwrap()
                .journal;
            let kept = j.append(1, b"kept");
            j.commit(kept).await.unwrap();
            // The write reaches the file; its fsync fails (EIO).
            j.fail_fsyncs(true);
            let failed = j.append(1, &[7; 100]);
            assert!(matches!(j.commit(failed).await, Err(JournalError::Io(_))));
            assert!(j.is_broken());
            j.fail_fsyncs(false);
            let after = j.append(1, b"after");
            assert!(matches!(j.commit(after).await, Err(JournalError::Broken)));
            // What was durable before stays acknowledged.
            j.commit(kept).await.unwrap();
            (kept, failed)
        };
        let opened = Journal::open(&dir, "s", FsyncPolicy::Always, 1 << 30).unwrap();
        assert_eq!(opened.torn_bytes, 0, "cut at a record boundary");
        assert_eq!(
            collect(&opened.journal, 0),
            vec![(kept, b"kept".to_vec())],
            "the record whose fsync failed was refused, so it is not on disk"
        );
        assert!(failed > kept);
    }

    #[tokio::test]
    async fn a_torn_tail_is_dropped_not_misread() {
        let dir = tempdir();
        let path = three_records(&dir, 100).await;
        // Cut the last record in half, as a crash mid-write would.
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 50)
            .unwrap();
        let opened = Journal::open(&dir, "s", FsyncPolicy::Everysec, 1 << 30).unwrap();
        assert!(opened.torn_bytes > 0);
        let records = collect(&opened.journal, 0);
        assert_eq!(records.len(), 2);
        assert_eq!(opened.journal.recovered_lsn(), 2);
    }

    #[tokio::test]
    async fn a_flipped_bit_fails_the_checksum() {
        let dir = tempdir();
        let path = three_records(&dir, 10).await;
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x10;
        fs::write(&path, bytes).unwrap();
        let j = Journal::open(&dir, "s", FsyncPolicy::Everysec, 1 << 30)
            .unwrap()
            .journal;
        assert_eq!(collect(&j, 0).len(), 2);
    }

    #[tokio::test]
    async fn a_held_journal_is_not_taken_and_an_unheld_one_is_an_orphan() {
        let dir = tempdir();
        let first = Journal::open(&dir, "s", FsyncPolicy::Everysec, 1 << 30).unwrap();
        let second = Journal::open(&dir, "s", FsyncPolicy::Everysec, 1 << 30).unwrap();
        assert_ne!(first.journal.id(), second.journal.id());
        let lsn = second.journal.append(1, b"left behind");
        second.journal.commit(lsn).await.unwrap();
        let second_id = second.journal.id().to_owned();
        drop(second);
        drop(first);
        // Both are free now: the first found is continued, the other is an
        // orphan whose records can be replayed.
        let third = Journal::open(&dir, "s", FsyncPolicy::Everysec, 1 << 30).unwrap();
        let orphans = third.journal.orphans().unwrap();
        assert_eq!(orphans.len(), 1);
        let all: Vec<&str> = [third.journal.id(), orphans[0].id.as_str()].to_vec();
        assert!(all.contains(&second_id.as_str()));
        // Another store's journals are never taken.
        let other = Journal::open(&dir, "another store", FsyncPolicy::Everysec, 1 << 30).unwrap();
        assert!(other.journal.orphans().unwrap().is_empty());
        assert!(!all.contains(&other.journal.id()));
    }

    #[tokio::test]
    async fn trim_deletes_applied_segments_and_the_backlog_has_a_bound() {
        let dir = tempdir();
        let j = Journal::open(&dir, "s", FsyncPolicy::No, 100)
            .unwrap()
            .journal;
        let lsn = j.append(1, &[0; 200]);
        j.commit(lsn).await.unwrap();
        assert!(matches!(j.check_room(), Err(JournalError::Full { .. })));
        assert_eq!(j.trim(lsn, Duration::ZERO).await.unwrap(), 1);
        j.check_room().unwrap();
        assert!(collect(&j, 0).is_empty());
    }

    #[tokio::test]
    async fn numbering_goes_on_after_everything_was_trimmed() {
        let dir = tempdir();
        {
            let j = Journal::open(&dir, "s", FsyncPolicy::Everysec, 1 << 30)
                .unwrap()
                .journal;
            for _ in 0..5 {
                let lsn = j.append(1, b"r");
                j.commit(lsn).await.unwrap();
            }
            assert_eq!(j.trim(5, Duration::ZERO).await.unwrap(), 1);
        }
        let j = Journal::open(&dir, "s", FsyncPolicy::Everysec, 1 << 30)
            .unwrap()
            .journal;
        assert_eq!(j.append(1, b"next"), 6, "numbers are never reused");
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("botmetrics-journal-test-{}", new_id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
