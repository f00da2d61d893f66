//! A request body as a batch: JSON (one object or an array) or NDJSON,
//! each event checked as it is read, and serde's errors sorted into
//! malformed (400) and invalid (422).
//!
//! Apart from `raw.rs` because framing is its own concern: a
//! batch is refused whole, at the index of its first bad event, or as soon
//! as it passes `--max-batch`, without reading the rest.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::ops::{Deref, DerefMut};

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};

use super::fast;
use super::raw::{Object, RawEvent};
use super::{Event, ParseError, Result, UserKey};

/// How a request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON object or a JSON array of objects.
    Json,
    /// One JSON object per line.
    Ndjson,
}

/// A request's checked events, in a buffer that is used again: dropped, it
/// becomes its thread's spare, which the next batch read on that thread
/// fills. A 1,000-event batch is about 200 KB of events, past the 128 KiB
/// from which malloc maps a block of its own (`memory.rs`), so a fresh
/// buffer per request was mapped, faulted in page by page and unmapped
/// again every time.
#[derive(Debug, PartialEq)]
pub struct Events<'b>(Vec<Event<'b>>);

/// The largest buffer kept as a spare (about 5,000 events): a thread that
/// once read a bigger batch does not hold its memory for good.
const SPARE_BYTES: usize = 1 << 20;

thread_local! {
    /// Always empty, so no event outlives its body; `'static` only because
    /// a thread-local cannot name a request's lifetime.
    static SPARE: Cell<Vec<Event<'static>>> = const { Cell::new(Vec::new()) };
}

impl<'b> Events<'b> {
    /// This thread's spare (an empty buffer of a past batch), if any.
    fn spare() -> Self {
        // Vec<Event<'static>> is a Vec<Event<'b>> for any 'b (covariance).
        Events(SPARE.take())
    }
}

impl Drop for Events<'_> {
    fn drop(&mut self) {
        let mut events = std::mem::take(&mut self.0);
        if events.capacity() * std::mem::size_of::<Event>() > SPARE_BYTES {
            return;
        }
        events.clear();
        // Emptied, it holds nothing of the body, so it may outlive it: the
        // standard library collects an iterator of a Vec into the same
        // allocation when the item layouts match (`spare_is_reused` checks
        // it does; if it ever did not, a batch would only allocate again).
        let events: Vec<Event<'static>> = events
            .into_iter()
            .map(|_| unreachable!("emptied"))
            .collect();
        SPARE.set(events);
    }
}

impl<'b> Deref for Events<'b> {
    type Target = Vec<Event<'b>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Events<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// By value the buffer goes with the events, so it is not kept as a spare:
/// for callers that keep the events (tests, tools), not the request path.
impl<'b> IntoIterator for Events<'b> {
    type Item = Event<'b>;
    type IntoIter = std::vec::IntoIter<Event<'b>>;
    fn into_iter(mut self) -> Self::IntoIter {
        std::mem::take(&mut self.0).into_iter()
    }
}

impl<'a, 'b> IntoIterator for &'a Events<'b> {
    type Item = &'a Event<'b>;
    type IntoIter = std::slice::Iter<'a, Event<'b>>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Parses and checks a whole request body. Nothing is applied here: the
/// caller applies the events only when every one of them is valid.
pub fn parse_batch<'b>(
    body: &'b [u8],
    format: BodyFormat,
    max_batch: usize,
    now: i64,
    key: &UserKey,
) -> Result<Events<'b>> {
    read(body, format, max_batch, now, key, true)
}

/// [`parse_batch`] by serde_json alone, without the fast reader: the
/// reference the fast reader is held to, in tests and in the benchmark.
#[doc(hidden)]
pub fn parse_batch_serde<'b>(
    body: &'b [u8],
    format: BodyFormat,
    max_batch: usize,
    now: i64,
    key: &UserKey,
) -> Result<Events<'b>> {
    read(body, format, max_batch, now, key, false)
}

fn read<'b>(
    body: &'b [u8],
    format: BodyFormat,
    max_batch: usize,
    now: i64,
    key: &UserKey,
    fast: bool,
) -> Result<Events<'b>> {
    let mut events = Events::spare();
    match format {
        BodyFormat::Ndjson => parse_ndjson(body, max_batch, now, key, fast, &mut events)?,
        BodyFormat::Json => match body.iter().find(|b| !b.is_ascii_whitespace()) {
            None => {
                return Err(ParseError::Malformed {
                    message: "the request body is empty".into(),
                    index: None,
                });
            }
            // The fast reader first; whatever it does not take, serde
            // reads, and its answer stands (see `fast.rs`).
            Some(b'[') => {
                if !fast || fast::array(body, max_batch, now, key, &mut events).is_none() {
                    events.clear();
                    parse_array(body, max_batch, now, key, &mut events)?;
                }
            }
            Some(_) => match fast.then(|| fast::object(body, now, key)).flatten() {
                Some(event) => events.push(event),
                None => {
                    let Object(mut raw): Object<RawEvent> =
                        serde_json::from_slice(body).map_err(from_serde)?;
                    events.push(raw.check(now, key)?);
                }
            },
        },
    }
    Ok(events)
}

fn too_many(max_batch: usize) -> ParseError {
    ParseError::TooLarge(format!(
        "a request may carry at most {max_batch} events (--max-batch)"
    ))
}

fn parse_ndjson<'b>(
    body: &'b [u8],
    max_batch: usize,
    now: i64,
    key: &UserKey,
    fast: bool,
    events: &mut Vec<Event<'b>>,
) -> Result<()> {
    let lines = body
        .split(|&b| b == b'\n')
        .filter(|l| l.iter().any(|b| !b.is_ascii_whitespace()));
    for (i, line) in lines.enumerate() {
        if i == max_batch {
            return Err(too_many(max_batch));
        }
        // A line's answer depends on that line alone: each is tried by
        // the fast reader, then by serde.
        if let Some(event) = fast.then(|| fast::object(line, now, key)).flatten() {
            events.push(event);
            continue;
        }
        let Object(mut raw): Object<RawEvent> =
            serde_json::from_slice(line).map_err(|e| from_serde(e).at(i))?;
        events.push(raw.check(now, key).map_err(|e| e.at(i))?);
    }
    if events.is_empty() {
        return Err(ParseError::Malformed {
            message: "the request body holds no events".into(),
            index: None,
        });
    }
    Ok(())
}

/// Reads a JSON array element by element, checking each event as it is
/// read, so the error names the index at fault and a batch over the limit is
/// refused without reading the rest.
fn parse_array<'b>(
    body: &'b [u8],
    max_batch: usize,
    now: i64,
    key: &UserKey,
    events: &mut Vec<Event<'b>>,
) -> Result<()> {
    struct Batch<'s, 'b> {
        max_batch: usize,
        now: i64,
        key: &'s UserKey,
        index: &'s Cell<usize>,
        failure: &'s RefCell<Option<ParseError>>,
        events: &'s mut Vec<Event<'b>>,
    }
    impl<'de> DeserializeSeed<'de> for Batch<'_, 'de> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(
            self,
            d: D,
        ) -> std::result::Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }
    impl<'de> Visitor<'de> for Batch<'_, 'de> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of events")
        }
        fn visit_seq<A: SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let events = self.events;
            events.reserve(seq.size_hint().unwrap_or(16).min(self.max_batch));
            while let Some(Object(mut raw)) = seq.next_element::<Object<RawEvent<'de>>>()? {
                let fail = |e: ParseError| {
                    *self.failure.borrow_mut() = Some(e);
                    de::Error::custom("rejected")
                };
                if events.len() == self.max_batch {
                    return Err(fail(too_many(self.max_batch)));
                }
                events.push(raw.check(self.now, self.key).map_err(fail)?);
                self.index.set(events.len());
            }
            Ok(())
        }
    }

    let index = Cell::new(0);
    let failure = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = Batch {
        max_batch,
        now,
        key,
        index: &index,
        failure: &failure,
        events,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    match parsed {
        Ok(()) if events.is_empty() => Err(ParseError::Invalid {
            message: "the batch holds no events".into(),
            index: None,
        }),
        Ok(()) => Ok(()),
        Err(e) => Err(match failure.into_inner() {
            Some(own @ ParseError::TooLarge(_)) => own,
            Some(own) => own.at(index.get()),
            None if e.is_syntax() || e.is_eof() || e.is_io() => from_serde(e),
            None => from_serde(e).at(index.get()),
        }),
    }
}

fn from_serde(e: serde_json::Error) -> ParseError {
    if e.is_data() {
        ParseError::invalid(e.to_string())
    } else {
        ParseError::Malformed {
            message: format!("invalid JSON: {e}"),
            index: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    /// A batch's buffer, dropped, is the next batch's on the same thread:
    /// no fresh mapping per request.
    #[test]
    fn spare_is_reused() {
        let one = r#"{"type":"message","role":"user","user_id":7}"#;
        let body = format!("[{}]", vec![one; 1000].join(","));
        let key = crate::event::UserKey::legacy();
        let first = parse_batch(body.as_bytes(), BodyFormat::Json, 10_000, NOW, &key).unwrap();
        let at = first.as_ptr();
        let capacity = first.capacity();
        drop(first);
        let second = parse_batch(body.as_bytes(), BodyFormat::Json, 10_000, NOW, &key).unwrap();
        assert_eq!((second.as_ptr(), second.capacity()), (at, capacity));
        assert_eq!(second.len(), 1000);
        // A single event, or a batch serde reads, takes the spare too.
        drop(second);
        let single = parse_batch(one.as_bytes(), BodyFormat::Json, 10, NOW, &key).unwrap();
        assert_eq!(single.as_ptr(), at);
        drop(single);
        let escaped = r#"[{"type":"message","role":"user","user_id":"\u0037"}]"#;
        let serde = parse_batch(escaped.as_bytes(), BodyFormat::Json, 10, NOW, &key).unwrap();
        assert_eq!(serde.as_ptr(), at);
    }

    /// A buffer past `SPARE_BYTES` is freed, not kept: one large batch does
    /// not pin its memory on the thread for good.
    #[test]
    fn a_large_buffer_is_not_kept() {
        let one = r#"{"type":"message","role":"user","user_id":7}"#;
        let n = SPARE_BYTES / std::mem::size_of::<Event>() + 100;
        let body = format!("[{}]", vec![one; n].join(","));
        let key = crate::event::UserKey::legacy();
        let large = parse_batch(body.as_bytes(), BodyFormat::Json, n, NOW, &key).unwrap();
        assert!(large.capacity() * std::mem::size_of::<Event>() > SPARE_BYTES);
        drop(large);
        let next = parse_batch(one.as_bytes(), BodyFormat::Json, 10, NOW, &key).unwrap();
        assert!(next.capacity() < n, "kept {} events' room", next.capacity());
    }

    #[test]
    fn malformed_bodies_are_400() {
        for json in [
            "",
            "   ",
            "{",
            r#"{"type":"message""#,
            r#"[{"type":"limit_reached"}"#,
            "nul",
            r#"{"type":"limit_reached"} x"#,
        ] {
            match parse_batch(
                json.as_bytes(),
                BodyFormat::Json,
                100,
                NOW,
                &crate::event::UserKey::legacy(),
            ) {
                Err(ParseError::Malformed { .. }) => {}
                other => panic!("{json:?}: expected malformed, got {other:?}"),
            }
        }
    }

    #[test]
    fn batch_errors_name_the_index() {
        let body =
            r#"[{"type":"limit_reached"},{"type":"limit_reached"},{"type":"message","role":"x"}]"#;
        match parse_batch(
            body.as_bytes(),
            BodyFormat::Json,
            100,
            NOW,
            &crate::event::UserKey::legacy(),
        ) {
            Err(ParseError::Invalid { index: Some(2), .. }) => {}
            other => panic!("{other:?}"),
        }
        let body = r#"[{"type":"limit_reached"},{"type":"custom"}]"#;
        match parse_batch(
            body.as_bytes(),
            BodyFormat::Json,
            100,
            NOW,
            &crate::event::UserKey::legacy(),
        ) {
            Err(ParseError::Invalid { index: Some(1), .. }) => {}
            other => panic!("{other:?}"),
        }
        let body = "{\"type\":\"limit_reached\"}\n\n{\"type\":\"limit_reached\"}\n{\"type\":1}\n";
        match parse_batch(
            body.as_bytes(),
            BodyFormat::Ndjson,
            100,
            NOW,
            &crate::event::UserKey::legacy(),
        ) {
            Err(ParseError::Invalid { index: Some(2), .. }) => {}
            other => panic!("{other:?}"),
        }
        let body = "{\"type\":\"limit_reached\"}\n{oops\n";
        match parse_batch(
            body.as_bytes(),
            BodyFormat::Ndjson,
            100,
            NOW,
            &crate::event::UserKey::legacy(),
        ) {
            Err(ParseError::Malformed { index: Some(1), .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn batch_size_is_capped() {
        let body = format!("[{}]", [r#"{"type":"limit_reached"}"#; 4].join(","));
        assert_eq!(
            parse_batch(
                body.as_bytes(),
                BodyFormat::Json,
                4,
                NOW,
                &crate::event::UserKey::legacy()
            )
            .unwrap()
            .len(),
            4
        );
        assert!(matches!(
            parse_batch(
                body.as_bytes(),
                BodyFormat::Json,
                3,
                NOW,
                &crate::event::UserKey::legacy()
            ),
            Err(ParseError::TooLarge(_))
        ));
        let nd = [r#"{"type":"limit_reached"}"#; 4].join("\n");
        assert!(matches!(
            parse_batch(
                nd.as_bytes(),
                BodyFormat::Ndjson,
                3,
                NOW,
                &crate::event::UserKey::legacy()
            ),
            Err(ParseError::TooLarge(_))
        ));
    }
}
