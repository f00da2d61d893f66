//! A request body as a batch: JSON (one object or an array) or NDJSON,
//! each event checked as it is read, and serde's errors sorted into
//! malformed (400) and invalid (422).
//!
//! Apart from `raw.rs` because framing is its own concern: a
//! batch is refused whole, at the index of its first bad event, or as soon
//! as it passes `--max-batch`, without reading the rest.
//!
//! Two JSON readers share the work. sonic-rs (SIMD) reads every body
//! first, through the same serde types and checks; only when it finds
//! anything wrong is the body read again by serde_json, whose answer is the
//! one given. So a bad body gets exactly the errors it always got (status,
//! message and index: serde_json's wording), at the cost of a second read
//! on the error path only, and a good one the faster reader. That holds as
//! long as sonic-rs accepts no body serde_json refuses and reads the same
//! values from the ones both accept: `tests::both_readers_agree` checks it
//! on a corpus of bad and good bodies.

use std::cell::{Cell, RefCell};
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};

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

/// Parses and checks a whole request body. Nothing is applied here: the
/// caller applies the events only when every one of them is valid.
pub fn parse_batch<'b>(
    body: &'b [u8],
    format: BodyFormat,
    max_batch: usize,
    now: i64,
    key: &UserKey,
) -> Result<Vec<Event<'b>>> {
    match fast_batch(body, format, max_batch, now, key) {
        Some(events) => Ok(events),
        None => reference_batch(body, format, max_batch, now, key),
    }
}

/// The batch as sonic-rs reads it, or `None` if anything about it is wrong
/// (malformed, invalid, too large, empty): the reference reader then says
/// what.
fn fast_batch<'b>(
    body: &'b [u8],
    format: BodyFormat,
    max_batch: usize,
    now: i64,
    key: &UserKey,
) -> Option<Vec<Event<'b>>> {
    let one = |json: &'b [u8]| {
        let Object(raw): Object<RawEvent> = sonic_rs::from_slice(json).ok()?;
        raw.check(now, key).ok()
    };
    let events = match format {
        BodyFormat::Ndjson => {
            let mut events = Vec::new();
            for line in lines(body) {
                if events.len() == max_batch {
                    return None;
                }
                events.push(one(line)?);
            }
            events
        }
        BodyFormat::Json => match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => {
                let batch = Batch::new(max_batch, now, key);
                let mut de = sonic_rs::Deserializer::from_slice(body);
                let events = (&batch).deserialize(&mut de).ok()?;
                de.end().ok()?;
                events
            }
            Some(_) => vec![one(body)?],
            None => return None,
        },
    };
    (!events.is_empty()).then_some(events)
}

/// serde_json's reading of a body: the reference, whose errors are the
/// ones a client gets. Public for the benchmark that sets the two readers
/// side by side; everything else calls [`parse_batch`].
#[doc(hidden)]
pub fn reference_batch<'b>(
    body: &'b [u8],
    format: BodyFormat,
    max_batch: usize,
    now: i64,
    key: &UserKey,
) -> Result<Vec<Event<'b>>> {
    match format {
        BodyFormat::Ndjson => parse_ndjson(body, max_batch, now, key),
        BodyFormat::Json => match body.iter().find(|b| !b.is_ascii_whitespace()) {
            None => Err(ParseError::Malformed {
                message: "the request body is empty".into(),
                index: None,
            }),
            Some(b'[') => parse_array(body, max_batch, now, key),
            Some(_) => {
                let Object(raw): Object<RawEvent> =
                    serde_json::from_slice(body).map_err(from_serde)?;
                Ok(vec![raw.check(now, key)?])
            }
        },
    }
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
) -> Result<Vec<Event<'b>>> {
    let mut events = Vec::new();
    for (i, line) in lines(body).enumerate() {
        if i == max_batch {
            return Err(too_many(max_batch));
        }
        let Object(raw): Object<RawEvent> =
            serde_json::from_slice(line).map_err(|e| from_serde(e).at(i))?;
        events.push(raw.check(now, key).map_err(|e| e.at(i))?);
    }
    if events.is_empty() {
        return Err(ParseError::Malformed {
            message: "the request body holds no events".into(),
            index: None,
        });
    }
    Ok(events)
}

/// The non-blank lines of an NDJSON body.
fn lines(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    body.split(|&b| b == b'\n')
        .filter(|l| l.iter().any(|b| !b.is_ascii_whitespace()))
}

/// A JSON array read element by element, each event checked as it is
/// read, with whichever reader: the index of the event at fault and the
/// batch's own refusal (past `--max-batch`, an invalid event) are kept
/// beside the reader's error.
struct Batch<'s> {
    max_batch: usize,
    now: i64,
    key: &'s UserKey,
    index: Cell<usize>,
    failure: RefCell<Option<ParseError>>,
}

impl<'s> Batch<'s> {
    fn new(max_batch: usize, now: i64, key: &'s UserKey) -> Self {
        Batch {
            max_batch,
            now,
            key,
            index: Cell::new(0),
            failure: RefCell::new(None),
        }
    }
}

impl<'de> DeserializeSeed<'de> for &Batch<'_> {
    type Value = Vec<Event<'de>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for &Batch<'_> {
    type Value = Vec<Event<'de>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of events")
    }
    fn visit_seq<A: SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut events = Vec::with_capacity(seq.size_hint().unwrap_or(16).min(self.max_batch));
        while let Some(Object(raw)) = seq.next_element::<Object<RawEvent<'de>>>()? {
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
        Ok(events)
    }
}

/// Reads a JSON array with serde_json, so the error names the index at
/// fault and a batch over the limit is refused without reading the rest.
fn parse_array<'b>(
    body: &'b [u8],
    max_batch: usize,
    now: i64,
    key: &UserKey,
) -> Result<Vec<Event<'b>>> {
    let batch = Batch::new(max_batch, now, key);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = (&batch)
        .deserialize(&mut de)
        .and_then(|events| de.end().map(|()| events));
    let Batch { index, failure, .. } = batch;
    match parsed {
        Ok(events) if events.is_empty() => Err(ParseError::Invalid {
            message: "the batch holds no events".into(),
            index: None,
        }),
        Ok(events) => Ok(events),
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

    /// The fast reader accepts no body the reference refuses and reads the
    /// same events from the bodies both accept; whatever it refuses, the
    /// reference's answer is the one given, so every error (status, message,
    /// index) is the reference's.
    #[test]
    fn both_readers_agree() {
        let key = crate::event::UserKey::legacy();
        let event = |body: &str| format!(r#"{{"type":"message","role":"user",{body}}}"#);
        let mut json: Vec<Vec<u8>> = [
            // Good bodies of every kind.
            r#"{"type":"message","role":"user","user_id":42,"db_queries":3,"chat_type":"group"}"#,
            r#"{"type":"response","status":"success","duration_ms":812.5,"model":"gpt-4o-mini","provider":"openai","ttft_ms":120,"tokens":{"prompt":300,"completion":50,"cached":100,"cache_write":20,"reasoning":7},"cost":0.00125}"#,
            r#"{"type":"cache","result":"hit","cache":"answers"}"#,
            r#"{"type":"user_registered","user_id":"u-1"}"#,
            r#"{"type":"consent","granted":false}"#,
            r#"{"type":"error","kind":"llm_timeout","event_id":"e-\"1\"\/x"}"#,
            r#"{"type":"custom","name":"voice_note","value":1.5e3}"#,
            r#"{"type":"feedback","score":4,"scale":5,"reason":"helpful"}"#,
            r#"{"type":"feedback","score":-1}"#,
            r#"{"type":"limit_reached","ts":"2027-01-15T08:00:00Z"}"#,
            r#"{"type":"limit_reached","ts":1799999999.75}"#,
            r#"{"ty\u0070e":"limit_reached","user_id":"\u00e9\ud83d\ude00"}"#,
            " \t\r\n{\"type\":\"limit_reached\"} \n",
            r#"[{"type":"limit_reached"},{"type":"message","role":"assistant","user_id":-7}]"#,
            // Numbers at and past the edges.
            r#"{"type":"response","status":"success","duration_ms":0.30000000000000004441}"#,
            r#"{"type":"response","status":"success","duration_ms":2.2250738585072011e-308}"#,
            r#"{"type":"response","status":"success","duration_ms":123.456e-2}"#,
            r#"{"type":"response","status":"success","duration_ms":1e400}"#,
            r#"{"type":"response","status":"success","duration_ms":-0}"#,
            r#"{"type":"custom","name":"n","value":9007199254740993}"#,
            // Malformed: syntax.
            "{",
            "[",
            "]",
            "nul",
            "[{\"type\":\"limit_reached\"},]",
            "{\"type\":\"limit_reached\",}",
            "{\"type\":\"limit_reached\"} x",
            "[{\"type\":\"limit_reached\"}] [",
            "[{\"type\":\"limit_reached\"}]]",
            "\u{feff}{\"type\":\"limit_reached\"}",
            "\u{c}{\"type\":\"limit_reached\"}",
            "{\"type\":\"limit_reached\"}\u{0}",
            "{'type':'limit_reached'}",
            "{type:\"limit_reached\"}",
            "{\"type\":\"error\",\"kind\":\"a\u{1}b\"}",
            "{\"type\":\"error\",\"kind\":\"a\tb\"}",
            r#"{"type":"error","kind":"a\xb"}"#,
            r#"{"type":"user_registered","user_id":"\ud800"}"#,
            r#"{"type":"user_registered","user_id":"\udc00x"}"#,
            r#"{"type":"user_registered","user_id":"\u12"}"#,
            // Malformed: numbers.
            r#"{"type":"message","role":"user","db_queries":01}"#,
            r#"{"type":"message","role":"user","db_queries":1.}"#,
            r#"{"type":"message","role":"user","db_queries":.5}"#,
            r#"{"type":"message","role":"user","db_queries":-}"#,
            r#"{"type":"message","role":"user","db_queries":+1}"#,
            r#"{"type":"message","role":"user","db_queries":1e}"#,
            r#"{"type":"custom","name":"n","value":NaN}"#,
            r#"{"type":"custom","name":"n","value":Infinity}"#,
            // Invalid: well-formed JSON that is not an event.
            "[]",
            "{}",
            "[{}]",
            "1",
            "\"message\"",
            r#"["message", 42]"#,
            r#"[{"type":"limit_reached"}, 1]"#,
            r#"{"type":null}"#,
            r#"{"type":1}"#,
            r#"{"type":"nope"}"#,
            r#"{"type":"limit_reached","type":"limit_reached"}"#,
            r#"{"type":"limit_reached","extra":1}"#,
            r#"{"type":"message"}"#,
            r#"{"type":"message","role":"user","db_queries":1.0}"#,
            r#"{"type":"message","role":"user","db_queries":-0}"#,
            r#"{"type":"message","role":"user","db_queries":4294967296}"#,
            r#"{"type":"message","role":"user","user_id":123456789012345678901234567890}"#,
            r#"{"type":"message","role":"user","user_id":-9223372036854775809}"#,
            r#"{"type":"message","role":"user","user_id":1.5}"#,
            r#"{"type":"message","role":"user","user_id":""}"#,
            r#"{"type":"message","role":"user","user_id":true}"#,
            r#"{"type":"response","status":"success","tokens":[1,2]}"#,
            r#"{"type":"response","status":"success","duration_ms":5,"tokens":{"prompt":1,"prompt":2}}"#,
            r#"{"type":"response","status":"success","duration_ms":5,"tokens":{"prompt":1,"cached":2}}"#,
            r#"{"type":"error","kind":"has space"}"#,
            r#"{"type":"limit_reached","ts":-1}"#,
            r#"{"type":"limit_reached","ts":"yesterday"}"#,
            r#"{"type":"limit_reached","ts":4102444800}"#,
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        json.push(event(r#""user_id":"é""#).into_bytes());
        // Invalid UTF-8 inside a string and outside one, and an overlong
        // encoding of NUL.
        json.push(b"{\"type\":\"error\",\"kind\":\"\xff\"}".to_vec());
        json.push(b"{\"type\":\"user_registered\",\"user_id\":\"\xc0\x80\"}".to_vec());
        json.push(b"{\"type\":\"limit_reached\"}\xff".to_vec());
        json.push(b"\xff".to_vec());
        json.push(format!("{}{}", "[".repeat(200), "]".repeat(200)).into_bytes());
        json.push(format!("[{}]", [r#"{"type":"limit_reached"}"#; 101].join(",")).into_bytes());
        let ndjson: Vec<Vec<u8>> = [
            "{\"type\":\"limit_reached\"}\n\n{\"type\":\"message\",\"role\":\"user\"}\r\n",
            "{\"type\":\"limit_reached\"}\n{oops\n",
            "{\"type\":\"limit_reached\"}\n{\"type\":1}\n",
            "{\"type\":\"limit_reached\"} {\"type\":\"limit_reached\"}\n",
            "[{\"type\":\"limit_reached\"}]\n",
            "\n \n",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .chain(std::iter::once(
            [r#"{"type":"limit_reached"}"#; 101].join("\n").into_bytes(),
        ))
        .collect();
        let corpus = json
            .iter()
            .map(|b| (b, BodyFormat::Json))
            .chain(ndjson.iter().map(|b| (b, BodyFormat::Ndjson)));
        let (mut good, mut bad) = (0, 0);
        for (body, format) in corpus {
            let shown = String::from_utf8_lossy(body);
            let reference = reference_batch(body, format, 100, NOW, &key);
            if let Some(fast) = fast_batch(body, format, 100, NOW, &key) {
                assert_eq!(reference.as_ref(), Ok(&fast), "{shown}");
            }
            assert_eq!(
                parse_batch(body, format, 100, NOW, &key),
                reference,
                "{shown}"
            );
            if reference.is_ok() {
                good += 1
            } else {
                bad += 1
            }
        }
        assert!(good >= 15 && bad >= 60, "{good} good, {bad} bad");
    }
}
