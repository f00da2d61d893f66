//! The fast reader: a batch in the shape bots actually send, read in one
//! pass straight into [`RawEvent`]s, then checked by the same
//! [`RawEvent::check`] as the serde reader.
//!
//! It knows only the well-formed common case: objects of known fields,
//! strings without escapes, plain integers and decimals. Anything else —
//! an escape, a `null`, an exponent, a duplicate or unknown field, a
//! mistyped value, a syntax error, an event that fails its check, a batch
//! over `--max-batch` — makes it give up (`None`), and the body is read
//! again by serde_json (`batch.rs`), whose answer is the one given. So
//! every accepted body yields exactly what serde would have read, and
//! every refused one keeps serde's code, message and index by
//! construction; `tests::agrees_with_serde` holds the two readers to that
//! on a corpus and on random mutations of it.
//!
//! Why by hand: serde_json's derived deserializer spends about four fifths
//! of a typed parse in its visitors rather than in scanning bytes, and the
//! SIMD readers measured against it (BENCHMARKS.md, issue 22) go through the
//! same visitors. Nothing here recurses, so no body can exhaust the stack.

use std::borrow::Cow;

use super::raw::{FIELDS, Object, RawEvent, RawTokens, UnixSeconds};
use super::{CacheResult, ChatType, Event, EventType, Role, Status, UserId, UserKey};

/// Powers of ten a decimal is divided by, as serde_json does: exact, so a
/// decimal of at most 15 significant digits reads to the same `f64`.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// A JSON array of event objects into `events`, or `None` to let
/// serde_json decide (what it left in `events` is then to be cleared).
pub(super) fn array<'b>(
    body: &'b [u8],
    max_batch: usize,
    now: i64,
    key: &UserKey,
    events: &mut Vec<Event<'b>>,
) -> Option<()> {
    let mut r = Reader::new(body)?;
    r.expect(b'[')?;
    // About 70 bytes an event: reserve once rather than grow by doubling.
    events.reserve((body.len() / 64).clamp(1, max_batch.max(1)));
    if r.peek()? == b']' {
        // Empty: serde's reader words that error.
        return None;
    }
    // One raw event for the whole batch, refilled and checked in place.
    let mut raw = RawEvent::blank();
    loop {
        if events.len() == max_batch {
            return None;
        }
        r.event(&mut raw)?;
        raw.check_then(now, key, |e| events.push(e)).ok()?;
        // Blank again for the next event: see `RawEvent::check`.
        debug_assert!(raw.is_blank());
        match r.next()? {
            b',' => continue,
            b']' => break,
            _ => return None,
        }
    }
    r.end()?;
    Some(())
}

/// One JSON object (a single event, or one NDJSON line).
pub(super) fn object<'b>(body: &'b [u8], now: i64, key: &UserKey) -> Option<Event<'b>> {
    let mut r = Reader::new(body)?;
    let mut raw = RawEvent::blank();
    r.event(&mut raw)?;
    let event = raw.check(now, key).ok()?;
    r.end()?;
    Some(event)
}

struct Reader<'b> {
    /// The body, checked as UTF-8 once: every string is then a slice of it
    /// between two quotes, which are always character boundaries.
    text: &'b str,
    b: &'b [u8],
    i: usize,
}

/// Bytes that end the fast scan of a string: the closing quote, an escape
/// (left to serde), or a control character (which JSON refuses).
const STOPS: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Where the first byte of [`STOPS`] is in `b`: eight bytes at a time, as
/// most strings here (field names, types, models) are a word or two long,
/// so the scan costs a few word operations rather than a branch per byte.
fn stop(b: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // The high bit of each byte below `n` (n <= 0x80). A borrow can only
    // mark bytes above a true one, so the lowest mark is exact.
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH;
    let chunks = b.chunks_exact(8);
    let tail = chunks.remainder();
    for (k, chunk) in chunks.enumerate() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let marks = below(w, 0x20)
            | below(w ^ (ONES * u64::from(b'"')), 1)
            | below(w ^ (ONES * u64::from(b'\\')), 1);
        if marks != 0 {
            return Some(8 * k + (marks.trailing_zeros() / 8) as usize);
        }
    }
    let done = b.len() - tail.len();
    tail.iter()
        .position(|&c| STOPS[c as usize])
        .map(|p| done + p)
}

/// Eight ASCII digits (the first in the lowest byte) as their number, or
/// `None` if any byte is not a digit: three multiplies instead of eight
/// dependent steps.
fn eight_digits(w: u64) -> Option<u64> {
    const LOW: u64 = u64::from_ne_bytes([0x0F; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0xF0; 8]);
    const THREES: u64 = u64::from_ne_bytes([0x30; 8]);
    const SIXES: u64 = u64::from_ne_bytes([0x06; 8]);
    // A digit is 0x30-0x39: high nibble 3, and adding 6 to its low nibble
    // does not carry into the high one (no byte carries into the next: a
    // byte that could is 0xFA or more, refused by the first test anyway).
    if w & HIGH != THREES || w.wrapping_add(SIXES) & HIGH != THREES {
        return None;
    }
    // Pairs, then fours, then all eight, each step a multiply and a shift.
    let v = (w & LOW).wrapping_mul(10 * (1 << 8) + 1) >> 8;
    let v = (v & 0x00FF_00FF_00FF_00FF).wrapping_mul(100 * (1 << 16) + 1) >> 16;
    Some((v & 0x0000_FFFF_0000_FFFF).wrapping_mul(10_000 * (1 << 32) + 1) >> 32)
}

/// A number as written: sign, digits as an integer, digits after the point.
struct Number {
    negative: bool,
    digits: u64,
    decimals: usize,
}

impl Number {
    fn unsigned(&self) -> Option<u64> {
        (!self.negative && self.decimals == 0).then_some(self.digits)
    }

    /// As serde_json reads it into an `f64`: an integer converted, a decimal
    /// divided by its power of ten. `-0` is left to serde (it is a float
    /// there, which an integer field refuses).
    fn float(&self) -> Option<f64> {
        if self.decimals == 0 {
            return match self.negative {
                false => Some(self.digits as f64),
                true => i64::try_from(self.digits)
                    .ok()
                    .filter(|d| *d > 0)
                    .map(|d| -d as f64),
            };
        }
        // Where the division is exact-rounded (Clinger's fast path) the
        // two readers agree bit for bit; past it, serde decides.
        if self.digits >= 1 << 53 || self.decimals >= POW10.len() {
            return None;
        }
        let f = self.digits as f64 / POW10[self.decimals];
        Some(if self.negative { -f } else { f })
    }

    fn signed(&self) -> Option<i64> {
        if self.decimals != 0 {
            return None;
        }
        let d = i64::try_from(self.digits).ok()?;
        match self.negative {
            false => Some(d),
            true if d > 0 => Some(-d),
            true => None,
        }
    }
}

/// Texts as the sixteen little-endian bytes of a body that starts with one
/// and its closing quote would hold them, from byte `skip` of each (field
/// names skip the first letter, matched by a `match`): (pattern, mask of
/// its bytes, its length). At most 15 bytes a text, quote excluded; the
/// longest here, `user_registered`, takes all 16.
const fn tails<const N: usize>(texts: &[&str], skip: usize) -> [Tail; N] {
    assert!(texts.len() == N);
    let mut tails = [(0, 0, 0); N];
    let mut t = 0;
    while t < N {
        let text = texts[t].as_bytes();
        let len = text.len() - skip + 1;
        assert!(len <= 16);
        let mut pattern = 0u128;
        let mut i = skip;
        while i < text.len() {
            pattern |= (text[i] as u128) << (8 * (i - skip));
            i += 1;
        }
        pattern |= (b'"' as u128) << (8 * (len - 1));
        let mask = if len == 16 {
            u128::MAX
        } else {
            (1u128 << (8 * len)) - 1
        };
        tails[t] = (pattern, mask, len);
        t += 1;
    }
    tails
}

/// (pattern, mask, length) of a text, as [`tails`] builds them.
type Tail = (u128, u128, usize);

/// Each field's name after its first letter, then the closing quote.
const FIELD_TAILS: [Tail; FIELDS.len()] = tails(&FIELDS, 1);
const TYPE_TAILS: [Tail; EventType::NAMES.len()] = tails(EventType::NAMES, 0);
const ROLE_TAILS: [Tail; Role::NAMES.len()] = tails(Role::NAMES, 0);
const STATUS_TAILS: [Tail; Status::NAMES.len()] = tails(Status::NAMES, 0);
const RESULT_TAILS: [Tail; CacheResult::NAMES.len()] = tails(CacheResult::NAMES, 0);

impl<'b> Reader<'b> {
    /// A reader of `body`, if it is UTF-8 (else serde words the error).
    fn new(body: &'b [u8]) -> Option<Self> {
        let text = std::str::from_utf8(body).ok()?;
        Some(Reader {
            text,
            b: body,
            i: 0,
        })
    }

    fn skip_ws(&mut self) {
        while let Some(c) = self.b.get(self.i) {
            if !matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                break;
            }
            self.i += 1;
        }
    }

    /// The next byte that is not whitespace, left unread.
    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.b.get(self.i).copied()
    }

    /// The next byte that is not whitespace, read.
    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// Nothing but whitespace left.
    fn end(&mut self) -> Option<()> {
        self.peek().is_none().then_some(())
    }

    /// A string without escapes, borrowed from the body.
    fn string(&mut self) -> Option<&'b str> {
        self.expect(b'"')?;
        let start = self.i;
        let len = stop(&self.b[start..])?;
        if self.b[start + len] != b'"' {
            return None;
        }
        self.i = start + len + 1;
        self.text.get(start..start + len)
    }

    fn number(&mut self) -> Option<Number> {
        let negative = self.peek()? == b'-';
        if negative {
            self.i += 1;
        }
        let int_start = self.i;
        let mut digits = self.digits(0);
        let count = self.i - int_start;
        // JSON has no leading zeros; serde says so.
        if count == 0 || (count > 1 && self.b[int_start] == b'0') {
            return None;
        }
        let mut decimals = 0;
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            let frac_start = self.i;
            digits = self.digits(digits);
            decimals = self.i - frac_start;
            if decimals == 0 {
                return None;
            }
        }
        // Past 19 digits in all a u64 may overflow: serde decides those.
        if count + decimals > 19 || matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            return None;
        }
        Some(Number {
            negative,
            digits,
            decimals,
        })
    }

    /// A run of digits appended to `to`, read without an overflow check per
    /// digit: `number` gives up past 19 digits, the most a u64 always holds,
    /// so what wrapped is never used.
    ///
    /// Eight digits at a time while eight follow (a `ts` has ten, a
    /// Telegram user id nine or ten), then one by one.
    fn digits(&mut self, mut to: u64) -> u64 {
        while let Some(word) = self.b[self.i..].first_chunk::<8>() {
            let Some(eight) = eight_digits(u64::from_le_bytes(*word)) else {
                break;
            };
            to = to.wrapping_mul(100_000_000).wrapping_add(eight);
            self.i += 8;
        }
        while let Some(c @ b'0'..=b'9') = self.b.get(self.i).copied() {
            to = to.wrapping_mul(10).wrapping_add(u64::from(c - b'0'));
            self.i += 1;
        }
        to
    }

    fn boolean(&mut self) -> Option<bool> {
        self.skip_ws();
        let rest = &self.b[self.i..];
        if rest.starts_with(b"true") {
            self.i += 4;
            Some(true)
        } else if rest.starts_with(b"false") {
            self.i += 5;
            Some(false)
        } else {
            None
        }
    }

    /// A string field's value (not `null`: serde reads that as absent).
    fn cow(&mut self) -> Option<Cow<'b, str>> {
        self.string().map(Cow::Borrowed)
    }

    fn user_id(&mut self) -> Option<UserId<'b>> {
        if self.peek()? == b'"' {
            let s = self.string()?;
            // Serde's visitor refuses these; let it word the error.
            if s.is_empty() || s.chars().count() > super::MAX_USER_ID_LEN {
                return None;
            }
            return Some(UserId::Str(Cow::Borrowed(s)));
        }
        let start = self.i;
        let n = self.number()?;
        if n.decimals != 0 || (n.negative && n.signed().is_none()) {
            return None;
        }
        // An integer id hashes as its decimal digits (`UserId::hash_bytes`),
        // and what `number` takes is already those: no leading zero, no
        // `-0` (`signed` refuses it), no exponent. So the text is kept and
        // the hash skips printing the number back.
        Some(UserId::Str(Cow::Borrowed(&self.text[start..self.i])))
    }

    fn ts(&mut self) -> Option<UnixSeconds> {
        // RFC 3339 text goes through serde and chrono.
        let n = self.number()?;
        if n.negative {
            return None;
        }
        if n.decimals == 0 {
            return i64::try_from(n.digits).ok().map(UnixSeconds);
        }
        let f = n.float()?;
        (0.0..9.0e15).contains(&f).then_some(UnixSeconds(f as i64))
    }

    fn tokens(&mut self) -> Option<RawTokens> {
        let mut t = RawTokens::default();
        let mut seen = 0u8;
        self.expect(b'{')?;
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(t);
        }
        loop {
            let name = self.string()?;
            self.expect(b':')?;
            let (bit, slot) = match name {
                "prompt" => (1, &mut t.prompt),
                "completion" => (2, &mut t.completion),
                "cached" => (4, &mut t.cached),
                "cache_write" => (8, &mut t.cache_write),
                "reasoning" => (16, &mut t.reasoning),
                _ => return None,
            };
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            *slot = self.number()?.unsigned()?;
            match self.next()? {
                b',' => continue,
                b'}' => return Some(t),
                _ => return None,
            }
        }
    }

    /// A field name, as its bit in [`FIELDS`]: compared straight from the
    /// bytes, closing quote included, with the names that start with its
    /// first letter, so the usual name is not scanned for its end and then
    /// compared again. One with an escape, or not a field, is read as a
    /// string: an escaped field is serde's to read, and an unknown one its
    /// to refuse.
    fn field(&mut self) -> Option<u32> {
        self.skip_ws();
        if let [b'"', first, tail @ ..] = &self.b[self.i..] {
            let candidates: &[u32] = match first {
                b't' => &[0, 3, 10, 11],
                b'u' => &[1],
                b'e' => &[2],
                b'c' => &[4, 13, 18],
                b'r' => &[5, 16, 17],
                b'd' => &[6, 8],
                b's' => &[7, 14, 15],
                b'm' => &[9],
                b'p' => &[12],
                b'g' => &[19],
                b'k' => &[20],
                b'n' => &[21],
                b'v' => &[22],
                _ => &[],
            };
            // Sixteen bytes at once against each candidate's tail and quote
            // (no call into memcmp for a few bytes); near the body's end
            // the slices are compared.
            let word = tail.first_chunk::<16>().map(|w| u128::from_le_bytes(*w));
            for &bit in candidates {
                let (pattern, mask, len) = FIELD_TAILS[bit as usize];
                let found = match word {
                    Some(word) => word & mask == pattern,
                    None => tail.get(..len) == Some(&pattern.to_le_bytes()[..len]),
                };
                if found {
                    self.i += len + 2;
                    return Some(bit);
                }
            }
        }
        let name = self.string()?;
        FIELDS.iter().position(|f| *f == name).map(|bit| bit as u32)
    }

    /// A string value of a closed set, as its index in `names`: matched
    /// from the bytes as a field name is (`tails` built from `names`); one
    /// with an escape, or not in the set, is read as a string and looked
    /// up (serde reads the one, refuses the other).
    fn closed(&mut self, names: &[&str], tails: &[Tail]) -> Option<usize> {
        self.skip_ws();
        if let [b'"', rest @ ..] = &self.b[self.i..]
            && let Some(word) = rest.first_chunk::<16>()
        {
            let word = u128::from_le_bytes(*word);
            if let Some(k) = tails
                .iter()
                .position(|&(pattern, mask, _)| word & mask == pattern)
            {
                self.i += 1 + tails[k].2;
                return Some(k);
            }
        }
        let text = self.string()?;
        names.iter().position(|n| *n == text)
    }

    /// One event object, each field read by its type. A field seen twice
    /// or unknown gives up, as `deny_unknown_fields` and serde's duplicate
    /// check would refuse it.
    ///
    /// Fills `e`, which must come blank (new, or after a successful
    /// [`RawEvent::check`], which takes every field).
    fn event(&mut self, e: &mut RawEvent<'b>) -> Option<()> {
        debug_assert!(e.is_blank());
        // One bit per field: `type` is bit 0, and must be set at the end.
        let mut seen = 0u32;
        self.expect(b'{')?;
        if self.peek()? == b'}' {
            return None;
        }
        loop {
            let bit = self.field()?;
            self.expect(b':')?;
            match bit {
                0 => {
                    e.event_type = EventType::ALL[self.closed(EventType::NAMES, &TYPE_TAILS)?];
                }
                1 => {
                    e.user_id = Some(self.user_id()?);
                }
                2 => {
                    e.event_id = Some(self.cow()?);
                }
                3 => {
                    e.ts = Some(self.ts()?);
                }
                4 => {
                    e.chat_type = Some(ChatType::from_name(self.string()?)?);
                }
                5 => {
                    e.role = Some(Role::ALL[self.closed(Role::NAMES, &ROLE_TAILS)?]);
                }
                6 => {
                    e.db_queries = Some(u32::try_from(self.number()?.unsigned()?).ok()?);
                }
                7 => {
                    e.status = Some(Status::ALL[self.closed(Status::NAMES, &STATUS_TAILS)?]);
                }
                8 => {
                    e.duration_ms = Some(self.number()?.float()?);
                }
                9 => {
                    e.model = Some(self.cow()?);
                }
                10 => {
                    e.tokens = Some(Object(self.tokens()?));
                }
                11 => {
                    e.ttft_ms = Some(self.number()?.float()?);
                }
                12 => {
                    e.provider = Some(self.cow()?);
                }
                13 => {
                    e.cost = Some(self.number()?.float()?);
                }
                14 => {
                    e.score = Some(self.number()?.signed()?);
                }
                15 => {
                    e.scale = Some(self.number()?.signed()?);
                }
                16 => {
                    e.reason = Some(self.cow()?);
                }
                17 => {
                    e.result =
                        Some(CacheResult::ALL[self.closed(CacheResult::NAMES, &RESULT_TAILS)?]);
                }
                18 => {
                    e.cache = Some(self.cow()?);
                }
                19 => {
                    e.granted = Some(self.boolean()?);
                }
                20 => {
                    e.kind = Some(self.cow()?);
                }
                21 => {
                    e.name = Some(self.cow()?);
                }
                22 => {
                    e.value = Some(self.number()?.float()?);
                }
                _ => return None,
            }
            if seen & (1 << bit) != 0 {
                return None;
            }
            seen |= 1 << bit;
            match self.next()? {
                b',' => continue,
                b'}' => break,
                _ => return None,
            }
        }
        (seen & 1 != 0).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BodyFormat, parse_batch, parse_batch_serde};
    use super::*;
    use crate::testing::Rng;

    const NOW: i64 = 1_800_000_000;

    fn key() -> UserKey {
        UserKey::legacy()
    }

    /// Both readers on the same body, every framing: the same events, or
    /// the same error with the same index.
    fn agree(body: &[u8]) {
        for format in [BodyFormat::Json, BodyFormat::Ndjson] {
            for max in [3, 1000] {
                let fast = parse_batch(body, format, max, NOW, &key());
                let serde = parse_batch_serde(body, format, max, NOW, &key());
                assert_eq!(
                    fast,
                    serde,
                    "{format:?}, max {max}: {:?}",
                    String::from_utf8_lossy(body)
                );
                // Bit for bit, -0.0 and 0.0 included.
                if let (Ok(a), Ok(b)) = (&fast, &serde) {
                    assert_eq!(format!("{a:?}"), format!("{b:?}"));
                }
            }
        }
    }

    /// Every field of every type, in the shapes bots send.
    const EVENTS: &[&str] = &[
        r#"{"type":"message","role":"user","user_id":123456789,"db_queries":6}"#,
        r#"{"type":"message","role":"assistant","user_id":"u-42","ts":1799999000,"chat_type":"private"}"#,
        r#"{"type":"message","role":"user","user_id":-100123,"ts":1799999000.75}"#,
        r#"{"type":"response","status":"success","duration_ms":312.5,"model":"gpt-4o-mini","tokens":{"prompt":300,"completion":50}}"#,
        r#"{"type":"response","status":"timeout","duration_ms":9000,"model":"claude-3.5","provider":"anthropic","ttft_ms":120.25,"cost":0.00125,"tokens":{"prompt":300,"completion":50,"cached":100,"cache_write":20,"reasoning":7},"user_id":7,"event_id":"evt-1"}"#,
        r#"{"type":"response","status":"rate_limited","duration_ms":0,"tokens":{}}"#,
        r#"{"type":"feedback","score":-1,"user_id":1}"#,
        r#"{"type":"feedback","score":4,"scale":5,"reason":"too_long"}"#,
        r#"{"type":"cache","result":"hit","cache":"answers"}"#,
        r#"{"type":"cache","result":"miss"}"#,
        r#"{"type":"user_registered","user_id":99}"#,
        r#"{"type":"consent","granted":true}"#,
        r#"{"type":"consent","granted":false,"user_id":"x"}"#,
        r#"{"type":"limit_reached","user_id":5}"#,
        // Integer ids are hashed from their text: the widest and the zero.
        r#"{"type":"limit_reached","user_id":9999999999999999999}"#,
        r#"{"type":"limit_reached","user_id":-9223372036854775807}"#,
        r#"{"type":"limit_reached","user_id":0}"#,
        r#"{"type":"error","kind":"llm_timeout"}"#,
        r#"{"type":"custom","name":"voice_note","value":1}"#,
        r#"{"type":"custom","name":"voice_note","value":2.5,"ts":"2027-01-15T08:00:00Z"}"#,
        "{ \"type\" : \"message\" ,\n\t\"role\":\"user\"\r}",
    ];

    #[test]
    fn takes_the_common_shapes() {
        // The fast reader must read these itself (a reader that always
        // gave up would pass `agrees_with_serde` trivially).
        for event in EVENTS.iter().filter(|e| !e.contains("2027-")) {
            let body = format!("[{event},{event}]");
            assert!(
                array(body.as_bytes(), 1000, NOW, &key(), &mut Vec::new()).is_some(),
                "not taken: {body}"
            );
            assert!(object(event.as_bytes(), NOW, &key()).is_some());
        }
    }

    /// One raw event serves a whole batch: every event after every other
    /// reads as serde reads it, so no field is carried over.
    #[test]
    fn no_field_outlives_its_event() {
        for a in EVENTS {
            for b in EVENTS {
                agree(format!("[{a},{b}]").as_bytes());
            }
        }
    }

    #[test]
    fn agrees_with_serde_on_the_corpus() {
        let all = format!("[{}]", EVENTS.join(","));
        agree(all.as_bytes());
        agree(EVENTS.join("\n").as_bytes());
        for event in EVENTS {
            agree(event.as_bytes());
            agree(format!("[{event}]").as_bytes());
        }
        // What the fast reader leaves to serde, each inside a valid batch.
        let odd = [
            r#"{"type":"message","role":"us\u0065r"}"#,
            r#"{"t\u0079pe":"message","role":"user"}"#,
            r#"{"type":"message","role":"user","user_id":null}"#,
            r#"{"type":"message","role":"user","user_id":""}"#,
            r#"{"type":"message","role":"user","user_id":1.5}"#,
            r#"{"type":"message","role":"user","user_id":-0}"#,
            r#"{"type":"message","role":"user","user_id":18446744073709551615}"#,
            r#"{"type":"message","role":"user","user_id":18446744073709551616}"#,
            r#"{"type":"message","role":"user","user_id":-9223372036854775808}"#,
            r#"{"type":"message","role":"user","role":"user"}"#,
            r#"{"type":"message","type":"message","role":"user"}"#,
            r#"{"type":"message","role":"user","extra":1}"#,
            r#"{"type":"message","role":"robot"}"#,
            r#"{"type":"message","role":1}"#,
            r#"{"type":"message"}"#,
            r#"{"role":"user"}"#,
            r#"{}"#,
            r#"{"type":"message","role":"user","db_queries":4294967296}"#,
            r#"{"type":"message","role":"user","db_queries":-1}"#,
            r#"{"type":"message","role":"user","db_queries":1.0}"#,
            r#"{"type":"message","role":"user","db_queries":01}"#,
            r#"{"type":"message","role":"user","ts":-1}"#,
            r#"{"type":"message","role":"user","ts":1e9}"#,
            r#"{"type":"message","role":"user","ts":9999999999999999999}"#,
            r#"{"type":"message","role":"user","ts":1800000301}"#,
            r#"{"type":"response","status":"success","duration_ms":1e3}"#,
            r#"{"type":"response","status":"success","duration_ms":1E3}"#,
            r#"{"type":"response","status":"success","duration_ms":-0}"#,
            r#"{"type":"response","status":"success","duration_ms":-0.0}"#,
            r#"{"type":"response","status":"success","duration_ms":-5}"#,
            r#"{"type":"response","status":"success","duration_ms":1.}"#,
            r#"{"type":"response","status":"success","duration_ms":.5}"#,
            r#"{"type":"response","status":"success","duration_ms":0.30000000000000004}"#,
            r#"{"type":"response","status":"success","duration_ms":9007199254740993}"#,
            r#"{"type":"response","status":"success","duration_ms":123456.78901234567890}"#,
            r#"{"type":"response","status":"success","duration_ms":86400000.0000001}"#,
            r#"{"type":"response","status":"success","duration_ms":5,"ttft_ms":6}"#,
            r#"{"type":"response","status":"success","duration_ms":5,"tokens":{"prompt":1,"cached":2}}"#,
            r#"{"type":"response","status":"success","duration_ms":5,"tokens":{"prompt":1,"prompt":1}}"#,
            r#"{"type":"response","status":"success","duration_ms":5,"tokens":{"other":1}}"#,
            r#"{"type":"response","status":"success","duration_ms":5,"tokens":[1,2]}"#,
            r#"{"type":"response","status":"success","duration_ms":5,"tokens":{"prompt":-1}}"#,
            r#"{"type":"response","status":"success","duration_ms":5,"model":"bad model"}"#,
            r#"{"type":"response","status":"success","duration_ms":5,"cost":1001}"#,
            r#"{"type":"feedback","score":-0}"#,
            r#"{"type":"feedback","score":0}"#,
            r#"{"type":"feedback","score":6,"scale":5}"#,
            r#"{"type":"consent","granted":1}"#,
            r#"{"type":"consent","granted":tru}"#,
            r#"{"type":"custom","name":"n","value":1e13}"#,
            "{\"type\":\"error\",\"kind\":\"a\u{1}b\"}",
            "{\"type\":\"error\",\"kind\":\"\u{e9}t\u{e9}\"}",
            r#"{"type":"message","role":"user",}"#,
            r#"{"type":"message","role":"user""#,
            r#"{"type":"message" "role":"user"}"#,
            r#"{"type":"message","role":"user"} x"#,
            r#"["type","message"]"#,
            r#"42"#,
            r#"null"#,
        ];
        for o in odd {
            agree(o.as_bytes());
            agree(format!("[{},{o}]", EVENTS[0]).as_bytes());
            agree(format!("{}\n{o}\n", EVENTS[0]).as_bytes());
        }
        for body in [
            "[]",
            "[,]",
            "[1]",
            "[{\"type\":\"limit_reached\"},]",
            "[{\"type\":\"limit_reached\"}",
            "[{\"type\":\"limit_reached\"}]]",
            "\u{feff}[{\"type\":\"limit_reached\"}]",
            " \n[ {\"type\":\"limit_reached\"} , {\"type\":\"limit_reached\"} ]\n ",
            "[{\"type\":\"limit_reached\"}]\u{c}",
        ] {
            agree(body.as_bytes());
        }
        agree(b"[{\"type\":\"error\",\"kind\":\"\xff\"}]");
        agree(b"{\"type\":\"message\",\"role\":\"user\",\"user_id\":\"\xc3\"}");
        // Deeper than anything either reader takes: refused, never a crash.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        agree(deep.as_bytes());
        let deep = format!(
            "[{{\"type\":\"message\",\"role\":{}1{}}}]",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        agree(deep.as_bytes());
    }

    #[test]
    fn agrees_with_serde_on_mutated_bodies() {
        const ALPHABET: &[u8] = b"{}[]:,\"\\ .-+eE0123456789aeflnrstu\x00\x1f\xc3\xff\n";
        let base = format!("[{}]", EVENTS.join(","));
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut body = base.clone().into_bytes();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(body.len());
                match rng.below(3) {
                    0 => body[at] = ALPHABET[rng.below(ALPHABET.len())],
                    1 => body.insert(at, ALPHABET[rng.below(ALPHABET.len())]),
                    _ => {
                        body.remove(at);
                    }
                }
            }
            agree(&body);
        }
    }

    /// The word-at-a-time scan finds the same first stop as a byte loop,
    /// at every offset and length, whatever surrounds it: bytes just above
    /// and below each stop (a borrow between bytes is where such scans go
    /// wrong), UTF-8, and none at all.
    /// Every field is found by its first letter, under its own bit, and a
    /// name that only starts like one is not taken for it.
    #[test]
    fn field_names_are_matched_from_the_bytes() {
        for (bit, name) in FIELDS.iter().enumerate() {
            // Short bodies compare slices, long ones sixteen bytes at once.
            let pad = " ".repeat(20);
            for body in [
                format!(r#""{name}":1"#),
                format!(r#" "{name}" :1"#),
                format!(r#""{name}":1{pad}"#),
            ] {
                let mut r = Reader::new(body.as_bytes()).expect("utf-8");
                assert_eq!(r.field(), Some(bit as u32), "{body}");
                assert_eq!(r.next(), Some(b':'), "{body}: read up to the colon");
            }
            for near in [
                format!(r#""{name}s":1"#),
                format!(r#""{name}"#),
                format!(r#""{name}s":1{pad}"#),
                format!(r#""{}":1{pad}"#, &name[..name.len() - 1]),
            ] {
                let mut r = Reader::new(near.as_bytes()).expect("utf-8");
                assert_eq!(r.field(), None, "{near}");
            }
        }
        let mut r = Reader::new(br#""ty\u0070e":1"#).expect("utf-8");
        assert_eq!(r.field(), None, "an escaped name is serde's");
    }

    /// Every value of the closed sets read from the bytes is found, short
    /// or long body, and a text that only starts like one is not.
    #[test]
    fn closed_values_are_matched_from_the_bytes() {
        let sets: [(&[&str], &[Tail]); 4] = [
            (EventType::NAMES, &TYPE_TAILS),
            (Role::NAMES, &ROLE_TAILS),
            (Status::NAMES, &STATUS_TAILS),
            (CacheResult::NAMES, &RESULT_TAILS),
        ];
        let pad = " ".repeat(20);
        for (names, tails) in sets {
            for (k, name) in names.iter().enumerate() {
                for body in [format!(r#""{name}","#), format!(r#" "{name}",{pad}"#)] {
                    let mut r = Reader::new(body.as_bytes()).expect("utf-8");
                    assert_eq!(r.closed(names, tails), Some(k), "{body}");
                    assert_eq!(r.next(), Some(b','), "{body}: read up to the quote");
                }
                for near in [format!(r#""{name}x",{pad}"#), format!(r#""{name}x","#)] {
                    let mut r = Reader::new(near.as_bytes()).expect("utf-8");
                    assert_eq!(r.closed(names, tails), None, "{near}");
                }
            }
        }
    }

    #[test]
    fn the_word_scan_finds_the_first_stop() {
        const BYTES: &[u8] = b"\x00\x1f\x20\x21\"\x23\\\x5b\x5daz09\x7f\x80\xc3\xa9\xff";
        let mut rng = Rng(7);
        for _ in 0..200_000 {
            let len = rng.below(40);
            let mut b: Vec<u8> = (0..len).map(|_| BYTES[rng.below(BYTES.len())]).collect();
            // Mostly plain text, so long runs without a stop are tried too.
            for c in b.iter_mut() {
                if rng.below(4) != 0 {
                    *c = b'a' + (rng.below(26) as u8);
                }
            }
            let naive = b.iter().position(|&c| STOPS[c as usize]);
            assert_eq!(stop(&b), naive, "{b:?}");
        }
        assert_eq!(stop(b""), None);
        assert_eq!(stop(b"gpt-4o-mini\""), Some(11));
        assert_eq!(
            stop("caf\u{e9} au lait, tr\u{e8}s bien\"".as_bytes()),
            Some(25)
        );
    }

    /// Eight digits at once read as one by one, and any word with a byte
    /// that is not a digit is refused.
    #[test]
    fn eight_digits_are_read_as_one_by_one() {
        let mut rng = Rng(99);
        for _ in 0..200_000 {
            let mut w = [0u8; 8];
            for b in &mut w {
                *b = match rng.below(8) {
                    0 => rng.next() as u8,
                    1 => [b'/', b':', b'.', b'-', 0xB0, 0xBA, 0x3A, 0xF9][rng.below(8)],
                    _ => b'0' + rng.below(10) as u8,
                };
            }
            let naive = w.iter().try_fold(0u64, |n, &c| {
                c.is_ascii_digit().then(|| n * 10 + u64::from(c - b'0'))
            });
            assert_eq!(eight_digits(u64::from_le_bytes(w)), naive, "{w:?}");
        }
        assert_eq!(
            eight_digits(u64::from_le_bytes(*b"12345678")),
            Some(12_345_678)
        );
        assert_eq!(
            eight_digits(u64::from_le_bytes(*b"99999999")),
            Some(99_999_999)
        );
        assert_eq!(eight_digits(u64::from_le_bytes(*b"00000000")), Some(0));
        assert_eq!(eight_digits(u64::from_le_bytes(*b"1234567:")), None);
        // Numbers of every length up to 20 digits, at the end of the body
        // and before a comma, read as serde reads them.
        for len in 1..=20 {
            for first in [b'1', b'9'] {
                let mut text = vec![first];
                text.extend((1..len).map(|_| b'0' + rng.below(10) as u8));
                let text = String::from_utf8(text).unwrap();
                agree(format!(r#"{{"type":"message","role":"user","user_id":{text}}}"#).as_bytes());
                agree(format!(r#"[{{"type":"custom","name":"n","value":{text}}},{{"type":"custom","name":"n","value":{text}.5}}]"#).as_bytes());
            }
        }
    }

    #[test]
    fn decimals_read_to_the_same_bits() {
        let mut rng = Rng(42);
        for _ in 0..50_000 {
            let int = rng.next() % [10, 1_000, 100_000, 100_000_000][rng.below(4)];
            let decimals = rng.below(18);
            let frac = rng.next() % 10u64.pow(decimals.min(18) as u32).max(1);
            let text = match decimals {
                0 => format!("{int}"),
                d => format!("{int}.{frac:0d$}"),
            };
            let body = format!(r#"{{"type":"custom","name":"n","value":{text}}}"#);
            agree(body.as_bytes());
            let body = format!(r#"{{"type":"response","status":"success","duration_ms":{text}}}"#);
            agree(body.as_bytes());
        }
    }
}
