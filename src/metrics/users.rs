//! The user book: per bot, what "new or returning", retention and sessions
//! need to know of each user, and nothing else.
//!
//! HyperLogLog sketches count distinct users but cannot say who is new,
//! whether a day's newcomers came back, or how long a conversation lasted.
//! The book remembers, per user (a keyed hash, never the id), the first day,
//! the days active within the first 31, the last day seen and the open
//! session: 20 bytes beside an 8-byte key, 32 with alignment.
//!
//! # Memory
//!
//! The table is an open-addressing Robin Hood table of 32-byte slots, filled
//! up to 24/25 before it grows. Keys are uniform (they are keyed hashes), so
//! a slot's home is the key scaled to the table's length: any length works,
//! and the last growth stops at what `max_users` needs, so a full book costs
//! 32 × 25/24 ≈ 33 bytes per user (a general-purpose map, at most 7/8 full
//! and doubling, would cost 37 to 74).
//!
//! # What is exact
//!
//! The book is counted from the same events as every series, journaled and
//! replayed with them, and stored at each flush in the same transaction as
//! the journal position (only the users that changed). Sessions end when the
//! gap passes: either a later event of the user finds it passed, or the
//! periodic [`UserBook::scan`] does, whichever comes first; an ended session
//! is marked so it is counted once.

use std::sync::{Mutex, MutexGuard};

pub use crate::store::{StoredUser, UserRow};

/// Days of activity remembered after the first: day +0 to +30.
pub const FIRST_DAYS: u32 = 31;

/// Session durations, seconds: 10 s to 4 h.
pub const SESSION_DURATION_BUCKETS: &[f64] = &[
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
];
/// Messages per session: 1 to 100.
pub const SESSION_MESSAGE_BUCKETS: &[f64] =
    &[1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 50.0, 100.0];

/// Changed since the last flush.
const DIRTY: u16 = 1;
/// The open session was counted as ended (by a scan): the next event starts
/// a new one without counting this one again.
const ENDED: u16 = 2;

/// What the book knows of one user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entry {
    /// Local day numbers (days since 1970-01-01), as `today::Calendar` gives.
    pub first_day: u16,
    pub last_day: u16,
    /// Bit i: active on `first_day + i`, for i < 31.
    pub days: u32,
    /// Unix seconds of the user's latest event, and of the open session's
    /// first; the messages the open session holds.
    pub last_ts: u32,
    pub session_start: u32,
    pub session_messages: u16,
    flags: u16,
}

impl Entry {
    /// An entry as the store holds it: nothing changed since.
    pub fn from_stored(u: &StoredUser) -> Self {
        Entry {
            first_day: u.first_day,
            last_day: u.last_day,
            days: u.days,
            last_ts: u.last_ts,
            session_start: u.session_start,
            session_messages: u.session_messages,
            flags: if u.ended { ENDED } else { 0 },
        }
    }

    /// The entry as the store keeps it.
    pub fn to_stored(&self) -> StoredUser {
        StoredUser {
            first_day: self.first_day,
            last_day: self.last_day,
            days: self.days,
            last_ts: self.last_ts,
            session_start: self.session_start,
            session_messages: self.session_messages,
            ended: self.ended(),
        }
    }

    pub fn ended(&self) -> bool {
        self.flags & ENDED != 0
    }

    fn active_on(&self, day: u16) -> bool {
        let offset = u32::from(day.wrapping_sub(self.first_day));
        day >= self.first_day && offset < FIRST_DAYS && self.days & (1 << offset) != 0
    }
}

/// One slot: key 0 is an empty slot (a real key of 0 is stored as 1).
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    key: u64,
    entry: Entry,
}

/// The Robin Hood table behind a book.
#[derive(Debug, Default)]
struct Table {
    slots: Vec<Slot>,
    len: usize,
}

impl Table {
    fn home(&self, key: u64) -> usize {
        ((u128::from(key) * self.slots.len() as u128) >> 64) as usize
    }

    /// How far the key in slot `i` sits from its home.
    fn distance(&self, i: usize, key: u64) -> usize {
        let home = self.home(key);
        if i >= home {
            i - home
        } else {
            i + self.slots.len() - home
        }
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() { 0 } else { i + 1 }
    }

    fn find(&self, key: u64) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let mut i = self.home(key);
        let mut dist = 0;
        loop {
            let k = self.slots[i].key;
            if k == key {
                return Some(i);
            }
            // Robin Hood keeps every run ordered by distance: a slot closer
            // to its home than we are to ours means the key is absent.
            if k == 0 || self.distance(i, k) < dist {
                return None;
            }
            i = self.next(i);
            dist += 1;
        }
    }

    /// Places a key known to be absent; the table has room. Returns its slot.
    fn place(&mut self, key: u64, entry: Entry) -> usize {
        let mut carried = Slot { key, entry };
        let mut i = self.home(key);
        let mut dist = 0;
        let mut placed = None;
        self.len += 1;
        loop {
            let k = self.slots[i].key;
            if k == 0 {
                self.slots[i] = carried;
                return placed.unwrap_or(i);
            }
            let d = self.distance(i, k);
            if d < dist {
                std::mem::swap(&mut self.slots[i], &mut carried);
                placed.get_or_insert(i);
                dist = d;
            }
            i = self.next(i);
            dist += 1;
        }
    }

    /// Empties slot `i`, shifting its run back so no gap breaks a probe.
    fn remove_at(&mut self, mut i: usize) {
        self.len -= 1;
        loop {
            let next = self.next(i);
            let k = self.slots[next].key;
            if k == 0 || self.distance(next, k) == 0 {
                self.slots[i] = Slot::default();
                return;
            }
            self.slots[i] = self.slots[next];
            i = next;
        }
    }

    fn full(&self) -> bool {
        (self.len + 1) * 25 > self.slots.len() * 24
    }

    /// A table of `len` slots holding this one's keys.
    fn resized(&self, len: usize) -> Table {
        let mut table = Table {
            slots: vec![Slot::default(); len.max(1)],
            len: 0,
        };
        for slot in self.slots.iter().filter(|s| s.key != 0) {
            table.place(slot.key, slot.entry);
        }
        table
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut Entry)> {
        self.slots
            .iter_mut()
            .filter(|s| s.key != 0)
            .map(|s| (s.key, &mut s.entry))
    }
}

/// What one event told the book.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Touched {
    /// The user was not in the book: new (first event within memory).
    pub new: bool,
    /// The user's first event of a later day than their first: returning.
    pub returning: bool,
    /// The user's previous session ended (the gap had passed).
    pub ended: Option<Session>,
}

/// An ended session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub seconds: u32,
    pub messages: u16,
    /// Unix seconds of its last event: the session belongs to that day.
    pub last_ts: u32,
}

/// How a book remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BookLimits {
    /// A gap longer than this ends a session, seconds.
    pub session_gap: u32,
    /// Users not seen for this many days are forgotten.
    pub memory_days: u32,
    /// At most this many users; past it the least recently seen go first.
    pub max_users: usize,
}

impl BookLimits {
    /// The defaults of `--session-gap`, `--user-memory` and
    /// `--max-users-per-bot`.
    pub const DEFAULT: BookLimits = BookLimits {
        session_gap: 1800,
        memory_days: 400,
        max_users: 1_000_000,
    };
    /// No book: nothing remembered (`--user-memory 0`, and scratch copies).
    pub const OFF: BookLimits = BookLimits {
        session_gap: 1800,
        memory_days: 0,
        max_users: 0,
    };
}

impl Default for BookLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One bot's users, with what the store does not hold yet of them.
#[derive(Debug)]
pub struct UserBook {
    limits: BookLimits,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    table: Table,
    /// Keys removed (forgotten, evicted, expired) since the last cut: the
    /// store's rows for them go in the next flush.
    gone: Vec<u64>,
    evicted: u64,
}

/// A cohort day's counts: users whose first day it was, and of them those
/// active on day +1, +7, +30 (classic) and on or after it (rolling).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cohort {
    pub day: u32,
    pub size: u32,
    pub classic: [u32; 3],
    pub rolling: [u32; 3],
}

/// The three retention days.
pub const RETENTION_DAYS: [u32; 3] = [1, 7, 30];

/// What a scan did, and what the book holds after it.
#[derive(Debug, Default)]
pub struct Scanned {
    pub ended: Vec<Session>,
    pub expired: usize,
    /// Users evicted at the bound since the last scan.
    pub evicted: u64,
    /// Every cohort of the book, by day, oldest first.
    pub cohorts: Vec<Cohort>,
    pub users: usize,
}

/// A book's changes since the last cut.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BookCut {
    pub changed: Vec<UserRow>,
    pub gone: Vec<u64>,
}

/// How a key is held: 0 marks an empty slot, so a real 0 is held as 1.
pub fn stored_key(key: u64) -> u64 {
    key.max(1)
}

fn day16(day: u32) -> u16 {
    u16::try_from(day).unwrap_or(u16::MAX)
}

fn secs32(ts: i64) -> u32 {
    u32::try_from(ts.max(0)).unwrap_or(u32::MAX)
}

/// A [`UserBook`] locked for a run of events: see [`UserBook::held`].
pub struct Held<'a> {
    book: &'a UserBook,
    inner: MutexGuard<'a, Inner>,
}

impl Held<'_> {
    /// [`UserBook::touch`] under the held lock.
    pub fn touch(&mut self, key: u64, ts: i64, day: u32, message: bool) -> Touched {
        let book = self.book;
        if !book.enabled() {
            return Touched::default();
        }
        let key = stored_key(key);
        let (day, ts, m) = (day16(day), secs32(ts), u16::from(message));
        let inner = &mut *self.inner;
        let run = Run {
            day,
            start: ts,
            end: ts,
            messages: m,
        };
        if let Some(i) = inner.table.find(key) {
            let e = &mut inner.table.slots[i].entry;
            return touch_entry(e, &run, book.limits.session_gap);
        }
        if inner.table.len >= book.limits.max_users {
            book.evict(inner, day);
        }
        if inner.table.full() {
            let len = book.grown(inner.table.slots.len());
            inner.table = inner.table.resized(len);
        }
        let (entry, touched) = apply_run(None, &run, book.limits.session_gap);
        inner.table.place(key, entry);
        touched
    }

    /// [`UserBook::forget`] under the held lock.
    pub fn forget(&mut self, key: u64) -> bool {
        // No book (cluster mode, `--user-memory 0`): nothing is written
        // that would ever take the key away again.
        if !self.book.enabled() {
            return false;
        }
        let key = stored_key(key);
        let inner = &mut *self.inner;
        match inner.table.find(key) {
            Some(i) => {
                inner.table.remove_at(i);
                inner.gone.push(key);
                true
            }
            None => {
                // The store may still hold a row (not restored yet): its
                // deletion costs nothing if there is none.
                inner.gone.push(key);
                false
            }
        }
    }
}

impl UserBook {
    pub fn new(limits: BookLimits) -> Self {
        UserBook {
            limits,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn limits(&self) -> BookLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the book is on (`--user-memory 0` turns it off).
    pub fn enabled(&self) -> bool {
        self.limits.memory_days > 0 && self.limits.max_users > 0
    }

    pub fn len(&self) -> usize {
        self.lock().table.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Users evicted at the bound since the last scan.
    pub fn evicted(&self) -> u64 {
        self.lock().evicted
    }

    /// Bytes per slot of the table: what one remembered user costs, before
    /// the table's slack.
    pub const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

    /// Bytes the table holds, for the self-metric.
    pub fn bytes(&self) -> usize {
        self.lock().table.slots.len() * std::mem::size_of::<Slot>()
    }

    /// The slot length the table grows to next, never past what the bound
    /// needs at 24/25 full.
    fn grown(&self, now: usize) -> usize {
        let cap = (self.limits.max_users * 25).div_ceil(24) + 1;
        (now * 2).clamp(64, cap.max(64))
    }

    /// Records one event of `key` at unix seconds `ts` on local day `day`;
    /// `message`: the event is a message the user wrote.
    pub fn touch(&self, key: u64, ts: i64, day: u32, message: bool) -> Touched {
        self.held().touch(key, ts, day, message)
    }

    /// The book locked once for a run of events (a request's batch), so
    /// each of them costs no lock of its own.
    pub fn held(&self) -> Held<'_> {
        Held {
            book: self,
            inner: self.lock(),
        }
    }

    /// Forgets the least recently seen users: at least one, and about 1 %
    /// of the bound, so eviction runs once per hundredth of the bound's new
    /// users rather than once per user.
    fn evict(&self, inner: &mut Inner, today: u16) {
        let want = (self.limits.max_users / 100).max(1);
        // Users per last day seen (days ago, capped): the oldest days first
        // until `want` are covered.
        let mut per_age = vec![0usize; 1 + self.limits.memory_days as usize];
        let oldest = per_age.len() - 1;
        let age = |e: &Entry| (today.saturating_sub(e.last_day) as usize).min(oldest);
        for (_, e) in inner.table.iter_mut() {
            per_age[age(e)] += 1;
        }
        let mut cut_age = per_age.len();
        let mut covered = 0;
        while cut_age > 0 && covered < want {
            cut_age -= 1;
            covered += per_age[cut_age];
        }
        // Everyone older than the cut day goes, and of the cut day as many as
        // are still wanted, oldest event first within it.
        let mut older = covered - per_age[cut_age];
        let mut of_cut_day: Vec<(u32, u64)> = Vec::new();
        let mut gone = Vec::new();
        for (key, e) in inner.table.iter_mut() {
            let a = age(e);
            if a > cut_age {
                gone.push(key);
            } else if a == cut_age {
                of_cut_day.push((e.last_ts, key));
            }
        }
        of_cut_day.sort_unstable();
        for (_, key) in of_cut_day {
            if older >= want {
                break;
            }
            gone.push(key);
            older += 1;
        }
        for key in &gone {
            if let Some(i) = inner.table.find(*key) {
                inner.table.remove_at(i);
            }
        }
        inner.evicted += gone.len() as u64;
        inner.gone.extend(gone);
    }

    /// Removes a user: whether the book knew them.
    pub fn forget(&self, key: u64) -> bool {
        self.held().forget(key)
    }

    pub fn contains(&self, key: u64) -> bool {
        self.lock().table.find(stored_key(key)).is_some()
    }

    /// The entry of a user, for tests and the restore.
    pub fn get(&self, key: u64) -> Option<Entry> {
        let inner = self.lock();
        inner
            .table
            .find(stored_key(key))
            .map(|i| inner.table.slots[i].entry)
    }

    /// Ends the sessions whose gap has passed at `now`, forgets users not
    /// seen within memory, and counts every cohort. One pass under the
    /// book's lock: about 3 ms per million users.
    pub fn scan(&self, now: i64, today: u32) -> Scanned {
        let mut out = Scanned::default();
        if !self.enabled() {
            return out;
        }
        let (now, gap) = (secs32(now), self.limits.session_gap);
        let oldest = today.saturating_sub(self.limits.memory_days);
        let mut inner = self.lock();
        let mut expired = Vec::new();
        let mut cohorts = CohortCount::new();
        for (key, e) in inner.table.iter_mut() {
            match scan_entry(e, now, gap, oldest) {
                Scan::Expired => expired.push(key),
                Scan::Kept(ended) => {
                    out.ended.extend(ended);
                    count_cohort(&mut cohorts, e);
                }
            }
        }
        for key in &expired {
            if let Some(i) = inner.table.find(*key) {
                inner.table.remove_at(i);
            }
        }
        out.expired = expired.len();
        out.evicted = std::mem::take(&mut inner.evicted);
        inner.gone.extend(expired);
        out.users = inner.table.len;
        out.cohorts = cohorts_of(cohorts);
        out
    }

    /// What changed since the last cut; the changes count as stored until
    /// [`UserBook::not_stored`] hands them back.
    pub fn cut(&self) -> BookCut {
        let mut inner = self.lock();
        let mut cut = BookCut {
            gone: std::mem::take(&mut inner.gone),
            ..BookCut::default()
        };
        // A user gone and back since the last cut is written whole as
        // changed: deleting the row too would touch it twice in one flush.
        cut.gone.retain(|key| inner.table.find(*key).is_none());
        cut.gone.sort_unstable();
        cut.gone.dedup();
        for (key, e) in inner.table.iter_mut() {
            if e.flags & DIRTY != 0 {
                e.flags &= !DIRTY;
                cut.changed.push(UserRow {
                    key,
                    entry: e.to_stored(),
                });
            }
        }
        cut
    }

    /// A cut that was not written: its users are changed again.
    pub fn not_stored(&self, cut: &BookCut) {
        let mut inner = self.lock();
        for row in &cut.changed {
            if let Some(i) = inner.table.find(row.key) {
                inner.table.slots[i].entry.flags |= DIRTY;
            }
        }
        inner.gone.extend_from_slice(&cut.gone);
    }

    /// Puts stored users back (a restore): they count as stored.
    pub fn restore(&self, rows: &[UserRow]) {
        let mut inner = self.lock();
        // Room for all of them first: rows come from the store in key
        // order, and sorted keys placed one by one into a table that grows
        // as they come all land at its start, one run as long as the
        // table (a restore of a million users took minutes that way).
        let needed = ((inner.table.len + rows.len()) * 25).div_ceil(24) + 1;
        if needed > inner.table.slots.len() {
            inner.table = inner.table.resized(needed);
        }
        for row in rows {
            let key = stored_key(row.key);
            let entry = Entry::from_stored(&row.entry);
            match inner.table.find(key) {
                // Memory counted the user before the store answered: both
                // hold part of the truth.
                Some(i) => {
                    let held = &mut inner.table.slots[i].entry;
                    *held = merged(*held, entry);
                }
                None => {
                    if inner.table.full() {
                        let len = self.grown(inner.table.slots.len());
                        inner.table = inner.table.resized(len);
                    }
                    inner.table.place(key, entry);
                }
            }
        }
    }
}

/// What two entries of one user know together: the earlier first day, the
/// later last day, both sets of days, and the later session.
fn merged(a: Entry, b: Entry) -> Entry {
    let first = a.first_day.min(b.first_day);
    let days_of = |e: &Entry| {
        let shift = u32::from(e.first_day - first);
        if shift >= FIRST_DAYS {
            0
        } else {
            (e.days << shift) & ((1 << FIRST_DAYS) - 1)
        }
    };
    let later = if b.last_ts > a.last_ts { b } else { a };
    Entry {
        first_day: first,
        last_day: a.last_day.max(b.last_day),
        days: days_of(&a) | days_of(&b),
        flags: (a.flags & DIRTY) | (later.flags & ENDED),
        ..later
    }
}

/// What the periodic scan does to one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// Not seen within memory: forgotten.
    Expired,
    /// Kept; its open session ended now, when the gap has passed.
    Kept(Option<Session>),
}

/// The scan's rule for one entry at unix seconds `now` (the book's own
/// scan, and in cluster mode the lead's scan of Redis' book): users last
/// seen before day `oldest` expire; a session whose gap passed ends, once.
pub fn scan_entry(e: &mut Entry, now: u32, gap: u32, oldest: u32) -> Scan {
    if u32::from(e.last_day) < oldest {
        return Scan::Expired;
    }
    if e.flags & ENDED == 0 && now.saturating_sub(e.last_ts) > gap {
        e.flags |= ENDED | DIRTY;
        return Scan::Kept(Some(Session {
            seconds: e.last_ts - e.session_start,
            messages: e.session_messages,
            last_ts: e.last_ts,
        }));
    }
    Scan::Kept(None)
}

/// Cohorts being counted, by first day.
pub type CohortCount = std::collections::BTreeMap<u16, Cohort>;

/// Counts `e` into its cohort.
pub fn count_cohort(cohorts: &mut CohortCount, e: &Entry) {
    let c = cohorts.entry(e.first_day).or_default();
    c.size += 1;
    for (n, after) in RETENTION_DAYS.iter().enumerate() {
        let day = e.first_day.saturating_add(*after as u16);
        c.classic[n] += u32::from(e.active_on(day));
        c.rolling[n] += u32::from(e.last_day >= day);
    }
}

/// The counted cohorts, oldest first.
pub fn cohorts_of(cohorts: CohortCount) -> Vec<Cohort> {
    cohorts
        .into_iter()
        .map(|(day, c)| Cohort {
            day: u32::from(day),
            ..c
        })
        .collect()
}

impl Cohort {
    /// Bytes of one cohort in [`Cohort::encode_all`].
    const BYTES: usize = 32;

    /// Cohorts as Redis keeps them for every replica (`bm:{bot}:cohorts`):
    /// eight little-endian u32 each (day, size, classic, rolling).
    pub fn encode_all(cohorts: &[Cohort]) -> Vec<u8> {
        let mut out = Vec::with_capacity(cohorts.len() * Self::BYTES);
        for c in cohorts {
            for n in [c.day, c.size]
                .into_iter()
                .chain(c.classic)
                .chain(c.rolling)
            {
                out.extend_from_slice(&n.to_le_bytes());
            }
        }
        out
    }

    /// What [`Cohort::encode_all`] wrote; a torn tail is left out.
    pub fn decode_all(bytes: &[u8]) -> Vec<Cohort> {
        bytes
            .chunks_exact(Self::BYTES)
            .map(|c| {
                let n: Vec<u32> = c
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Cohort {
                    day: n[0],
                    size: n[1],
                    classic: [n[2], n[3], n[4]],
                    rolling: [n[5], n[6], n[7]],
                }
            })
            .collect()
    }
}

/// A run of one user's events on one local day with no gap over the
/// session gap between them: what a cluster replica sends of a user per
/// sync (see [`BookDelta`]), and what one event is (a run of one).
///
/// A run never spans two days, so the days a user was active are exact
/// whatever the gap; two runs of consecutive days within the gap join one
/// session when they are applied in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub day: u16,
    pub start: u32,
    pub end: u32,
    /// Messages the user wrote in the run.
    pub messages: u16,
}

impl Run {
    /// One event at unix seconds `ts` on local day `day`.
    pub fn event(ts: i64, day: u32, message: bool) -> Run {
        let ts = secs32(ts);
        Run {
            day: day16(day),
            start: ts,
            end: ts,
            messages: u16::from(message),
        }
    }
}

/// The one rule of the book: what `run` does to the entry of its user
/// (`None`: not in the book), with a session ending at a gap over `gap`
/// seconds. The single process applies it per event; in cluster mode
/// `lua/book.lua` applies the same rule in Redis to each replica's runs
/// (a test runs both on the same inputs).
pub fn apply_run(entry: Option<Entry>, run: &Run, gap: u32) -> (Entry, Touched) {
    match entry {
        None => (
            Entry {
                first_day: run.day,
                last_day: run.day,
                days: 1,
                last_ts: run.end,
                session_start: run.start,
                session_messages: run.messages,
                flags: DIRTY,
            },
            Touched {
                new: true,
                ..Touched::default()
            },
        ),
        Some(mut e) => {
            let touched = touch_entry(&mut e, run, gap);
            (e, touched)
        }
    }
}

/// One run of a known user.
fn touch_entry(e: &mut Entry, run: &Run, gap: u32) -> Touched {
    let mut out = Touched::default();
    let day = run.day;
    if day > e.last_day {
        out.returning = day > e.first_day;
        e.last_day = day;
    }
    if day < e.first_day {
        // A late event from before the first day: the user came earlier
        // than thought. The days shift; those past +30 fall off.
        let shift = u32::from(e.first_day - day);
        e.days = if shift >= 32 { 0 } else { e.days << shift };
        e.days = (e.days | 1) & ((1 << FIRST_DAYS) - 1);
        e.first_day = day;
    } else {
        let offset = u32::from(day - e.first_day);
        if offset < FIRST_DAYS {
            e.days |= 1 << offset;
        }
    }
    if run.start > e.last_ts.saturating_add(gap) {
        if e.flags & ENDED == 0 {
            out.ended = Some(Session {
                seconds: e.last_ts - e.session_start,
                messages: e.session_messages,
                last_ts: e.last_ts,
            });
        }
        e.flags &= !ENDED;
        e.session_start = run.start;
        e.session_messages = run.messages;
        e.last_ts = run.end;
    } else if run.end >= e.session_start.saturating_sub(gap) {
        // Within the open session (or just before its start: a late event
        // that extends it back).
        e.session_start = e.session_start.min(run.start);
        e.last_ts = e.last_ts.max(run.end);
        e.session_messages = e.session_messages.saturating_add(run.messages);
    }
    // Older than the open session's gap: it belonged to a session already
    // counted, so sessions leave it be; its day was marked above.
    e.flags |= DIRTY;
    out
}

/// Bytes of an entry packed for Redis (`lua/book.lua` reads the same
/// layout with `struct.unpack('<HHIIIHH')`).
pub const PACKED_BYTES: usize = 20;

impl Entry {
    /// The entry as Redis keeps it: little-endian, in field order; of the
    /// flags only "ended" (Redis keeps what changed in a set of its own).
    pub fn pack(&self) -> [u8; PACKED_BYTES] {
        let mut out = [0u8; PACKED_BYTES];
        out[0..2].copy_from_slice(&self.first_day.to_le_bytes());
        out[2..4].copy_from_slice(&self.last_day.to_le_bytes());
        out[4..8].copy_from_slice(&self.days.to_le_bytes());
        out[8..12].copy_from_slice(&self.last_ts.to_le_bytes());
        out[12..16].copy_from_slice(&self.session_start.to_le_bytes());
        out[16..18].copy_from_slice(&self.session_messages.to_le_bytes());
        out[18..20].copy_from_slice(&(self.flags & ENDED).to_le_bytes());
        out
    }

    /// An entry packed by [`Entry::pack`] (or the script); `None` when the
    /// bytes are not one.
    pub fn unpack(bytes: &[u8]) -> Option<Entry> {
        let b: &[u8; PACKED_BYTES] = bytes.try_into().ok()?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(Entry {
            first_day: u16_at(0),
            last_day: u16_at(2),
            days: u32_at(4),
            last_ts: u32_at(8),
            session_start: u32_at(12),
            session_messages: u16_at(16),
            flags: u16_at(18) & ENDED,
        })
    }
}

/// What one replica saw of a bot's users since its last sync, in cluster
/// mode, where the book lives in Redis: per user the runs of its events
/// (merged by the gap as they come, so a user costs one run per day and
/// session, not one per event), and the users forgotten.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BookDelta {
    pub runs: std::collections::HashMap<u64, Vec<Run>>,
    /// Users erased: the script removes them before it applies the runs.
    pub forgets: Vec<u64>,
}

impl BookDelta {
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.forgets.is_empty()
    }

    /// Adds one event of `key`.
    pub fn add(&mut self, key: u64, ts: i64, day: u32, message: bool, gap: u32) {
        let event = Run::event(ts, day, message);
        let runs = self.runs.entry(stored_key(key)).or_default();
        let near = |r: &Run| {
            r.day == event.day
                && event.start <= r.end.saturating_add(gap)
                && event.end >= r.start.saturating_sub(gap)
        };
        let mut merged = event;
        // The event may bridge two runs of its day: all it touches join it.
        runs.retain(|r| {
            if near(r) {
                merged.start = merged.start.min(r.start);
                merged.end = merged.end.max(r.end);
                merged.messages = merged.messages.saturating_add(r.messages);
                false
            } else {
                true
            }
        });
        let at = runs
            .iter()
            .position(|r| r.start > merged.start)
            .unwrap_or(runs.len());
        runs.insert(at, merged);
    }

    /// Forgets `key`: its runs so far go, and Redis drops its entry.
    pub fn forget(&mut self, key: u64) {
        let key = stored_key(key);
        self.runs.remove(&key);
        self.forgets.push(key);
    }

    /// Whether `key` has runs here.
    pub fn has(&self, key: u64) -> bool {
        self.runs.contains_key(&stored_key(key))
    }

    /// Users with runs.
    pub fn users(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GAP: u32 = 1800;

    fn book(max_users: usize) -> UserBook {
        UserBook::new(BookLimits {
            session_gap: GAP,
            memory_days: 400,
            max_users,
        })
    }

    const DAY: i64 = 86_400;
    const T0: i64 = 20_000 * DAY;

    fn day_of(ts: i64) -> u32 {
        (ts / DAY) as u32
    }

    fn touch(b: &UserBook, key: u64, ts: i64) -> Touched {
        b.touch(key, ts, day_of(ts), true)
    }

    #[test]
    fn a_user_is_new_once_and_returning_on_a_later_day() {
        let b = book(100);
        assert!(touch(&b, 7, T0).new);
        let again = touch(&b, 7, T0 + 60);
        assert!(!again.new && !again.returning);
        let next_day = touch(&b, 7, T0 + DAY);
        assert!(!next_day.new && next_day.returning);
        assert!(!touch(&b, 7, T0 + DAY + 60).returning, "once per day");
        let e = b.get(7).unwrap();
        assert_eq!(e.days, 0b11);
        assert_eq!(u32::from(e.last_day), day_of(T0 + DAY));
    }

    #[test]
    fn a_session_ends_one_second_past_the_gap_and_not_at_it() {
        let b = book(100);
        touch(&b, 1, T0);
        assert_eq!(touch(&b, 1, T0 + i64::from(GAP)).ended, None);
        let end = touch(&b, 1, T0 + 2 * i64::from(GAP) + 1).ended.unwrap();
        assert_eq!(
            end,
            Session {
                seconds: GAP,
                messages: 2,
                last_ts: (T0 + i64::from(GAP)) as u32
            }
        );
    }

    #[test]
    fn a_scan_ends_a_passed_session_once_and_the_next_event_does_not_count_it_again() {
        let b = book(100);
        touch(&b, 1, T0);
        touch(&b, 1, T0 + 100);
        let early = b.scan(T0 + 100 + i64::from(GAP), day_of(T0));
        assert!(early.ended.is_empty(), "at the gap the session is open");
        let s = b.scan(T0 + 101 + i64::from(GAP), day_of(T0));
        assert_eq!(s.ended.len(), 1);
        assert_eq!((s.ended[0].seconds, s.ended[0].messages), (100, 2));
        assert!(b.scan(T0 + 10 * DAY, day_of(T0)).ended.is_empty());
        assert_eq!(touch(&b, 1, T0 + 5 * DAY).ended, None);
    }

    #[test]
    fn cohorts_count_classic_and_rolling_retention() {
        let b = book(100);
        // Three users on day 0: one back on day 1 and day 7, one on day 8
        // only, one never.
        for k in 1..=3 {
            touch(&b, k, T0);
        }
        touch(&b, 1, T0 + DAY);
        touch(&b, 1, T0 + 7 * DAY);
        touch(&b, 2, T0 + 8 * DAY);
        touch(&b, 4, T0 + DAY);
        let s = b.scan(T0 + 9 * DAY, day_of(T0 + 9 * DAY));
        let day0 = s.cohorts.iter().find(|c| c.day == day_of(T0)).unwrap();
        assert_eq!(day0.size, 3);
        assert_eq!(day0.classic, [1, 1, 0]);
        assert_eq!(day0.rolling, [2, 2, 0]);
        let day1 = s.cohorts.iter().find(|c| c.day == day_of(T0) + 1).unwrap();
        assert_eq!(day1.size, 1);
    }

    #[test]
    fn the_table_holds_every_key_through_growth_and_removal() {
        let b = book(1_000_000);
        let keys: Vec<u64> = (1..=50_000u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        for k in &keys {
            assert!(touch(&b, *k, T0).new);
        }
        for k in keys.iter().step_by(3) {
            assert!(b.forget(*k));
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(b.contains(*k), i % 3 != 0, "key {i}");
        }
        assert_eq!(b.len(), keys.len() - keys.len().div_ceil(3));
        assert!(!b.forget(keys[0]), "forgotten already");
    }

    #[test]
    fn at_the_bound_the_least_recently_seen_go_first() {
        let b = book(1_000);
        for k in 1..=1_000u64 {
            // Users 1..=500 last seen on day 0, the rest on day 1.
            let ts = if k <= 500 { T0 } else { T0 + DAY };
            touch(&b, k.wrapping_mul(0x9E37_79B9_7F4A_7C15), ts);
        }
        assert_eq!(b.len(), 1_000);
        touch(&b, 5_000_000, T0 + 2 * DAY);
        assert_eq!(b.len(), 1_000 - 10 + 1);
        assert_eq!(b.evicted(), 10);
        let gone = b.cut().gone;
        assert_eq!(gone.len(), 10);
        for k in gone {
            let n = (1..=1_000u64)
                .find(|n| n.wrapping_mul(0x9E37_79B9_7F4A_7C15) == k)
                .unwrap();
            assert!(n <= 500, "user {n} was seen on day 1");
        }
        for k in 501..=1_000u64 {
            assert!(b.contains(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        }
    }

    #[test]
    fn a_cut_takes_each_change_once_and_a_failed_write_hands_it_back() {
        let b = book(100);
        touch(&b, 1, T0);
        touch(&b, 2, T0);
        b.forget(2);
        let cut = b.cut();
        assert_eq!(cut.changed.len(), 1);
        assert_eq!(cut.gone, vec![2]);
        assert_eq!(b.cut(), BookCut::default());
        b.not_stored(&cut);
        assert_eq!(b.cut(), cut);
    }

    #[test]
    fn a_restored_book_answers_as_the_original() {
        let b = book(100);
        touch(&b, 1, T0);
        touch(&b, 1, T0 + 100);
        let rows = b.cut().changed;
        let r = book(100);
        r.restore(&rows);
        assert_eq!(r.get(1), b.get(1));
        assert_eq!(r.cut(), BookCut::default(), "restored rows are stored");
        assert_eq!(touch(&r, 1, T0 + 4000).ended, touch(&b, 1, T0 + 4000).ended);
    }

    #[test]
    fn a_restore_of_rows_in_key_order_spreads_them_over_the_table() {
        // The store hands rows back sorted by key: placed into a table
        // that grew as they came, they would pile up in one run.
        let b = book(1_000_000);
        let mut rows: Vec<UserRow> = (1..=200_000u64)
            .map(|i| UserRow {
                key: i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                entry: StoredUser {
                    first_day: 20_000,
                    last_day: 20_000,
                    days: 1,
                    ..StoredUser::default()
                },
            })
            .collect();
        rows.sort_by_key(|r| r.key);
        b.restore(&rows);
        assert_eq!(b.len(), rows.len());
        let inner = b.lock();
        let longest = (0..inner.table.slots.len())
            .filter(|i| inner.table.slots[*i].key != 0)
            .map(|i| inner.table.distance(i, inner.table.slots[i].key))
            .max()
            .unwrap();
        assert!(longest < 1_000, "a key sits {longest} slots from its home");
    }

    #[test]
    fn users_not_seen_within_memory_are_forgotten_by_the_scan() {
        let b = UserBook::new(BookLimits {
            session_gap: GAP,
            memory_days: 10,
            max_users: 100,
        });
        touch(&b, 1, T0);
        touch(&b, 2, T0 + 5 * DAY);
        let s = b.scan(T0 + 11 * DAY, day_of(T0 + 11 * DAY));
        assert_eq!((s.expired, s.users), (1, 1));
        assert!(!b.contains(1) && b.contains(2));
    }

    #[test]
    fn a_full_book_costs_about_33_bytes_per_user() {
        assert_eq!(std::mem::size_of::<Slot>(), 32);
        let b = book(100_000);
        for k in 1..=100_000u64 {
            touch(&b, k.wrapping_mul(0x9E37_79B9_7F4A_7C15), T0);
        }
        assert_eq!(b.len(), 100_000);
        assert!(b.bytes() <= 100_000 * 34, "{} bytes", b.bytes());
    }

    #[test]
    fn a_delta_keeps_one_run_per_day_and_session_and_the_runs_give_the_events_answer() {
        let mut d = BookDelta::default();
        // Out of order, within the gap of each other: one run; a day later
        // and past the gap: two more.
        for ts in [
            T0 + 100,
            T0,
            T0 + 50,
            T0 + DAY,
            T0 + DAY + i64::from(GAP) + 1,
        ] {
            d.add(9, ts, day_of(ts), true, GAP);
        }
        let runs = &d.runs[&9];
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert_eq!(
            (runs[0].start, runs[0].end, runs[0].messages),
            (T0 as u32, (T0 + 100) as u32, 3)
        );
        // Two runs a second apart join when an event bridges them.
        let mut d = BookDelta::default();
        d.add(1, T0, day_of(T0), false, GAP);
        d.add(1, T0 + 2 * i64::from(GAP), day_of(T0), true, GAP);
        assert_eq!(d.runs[&1].len(), 2);
        d.add(1, T0 + i64::from(GAP), day_of(T0), true, GAP);
        assert_eq!(d.runs[&1].len(), 1);
        assert_eq!(d.runs[&1][0].messages, 2);
        // Applied in order, the runs leave the entry the events leave.
        let events = [T0, T0 + 60, T0 + DAY, T0 + 3 * DAY, T0 + 3 * DAY + 10];
        let b = book(10);
        let mut d = BookDelta::default();
        for ts in events {
            touch(&b, 5, ts);
            d.add(5, ts, day_of(ts), true, GAP);
        }
        let mut e = None;
        for r in &d.runs[&5] {
            e = Some(apply_run(e, r, GAP).0);
        }
        assert_eq!(e.map(|e| e.pack()), b.get(5).map(|e| e.pack()));
        d.forget(5);
        assert!(d.runs.is_empty() && d.forgets == vec![5]);
    }

    #[test]
    fn an_entry_packs_into_20_bytes_and_back() {
        let e = Entry {
            first_day: 20_001,
            last_day: 20_031,
            days: 0x7FFF_FFFF,
            last_ts: u32::MAX,
            session_start: 7,
            session_messages: 65_535,
            flags: ENDED | DIRTY,
        };
        let back = Entry::unpack(&e.pack()).unwrap();
        assert_eq!(back, Entry { flags: ENDED, ..e });
        assert_eq!(Entry::unpack(&[0; 19]), None);
    }
}
