//! An accepted batch as the journal holds it: compact binary, versioned by
//! the journal's segment header, and holding no raw user id (users are
//! already [`UserHash`]es, event ids [`IdHash`]es).
//!
//! ```text
//! body   = u8 bot_len | bot | u32 count | i64 base_ts | event*
//! event  = u8 type | u8 flags | varint zigzag(ts - base_ts) | [u64 user] | [u64 id] | [u8 chat] | fields
//! ```
//!
//! Closed label values are written as their index in the enum's `ALL`, free
//! names as `u8 len | bytes`. Everything is little-endian.
//!
//! A `response` with any of the fields that came after the first format
//! (`tokens.cached`/`cache_write`/`reasoning`, `ttft_ms`, `provider`,
//! `cost`) sets `HAS_EXT` and carries `u8 ext | fields` after the rest, so
//! a record written before them decodes unchanged. The cost is stored as
//! counted (micro-units and where it came from): a replay never prices
//! again with a table that changed since.

use std::borrow::Cow;

use crate::dedupe::IdHash;
use crate::event::{
    CacheResult, ChatType, Cost, CostSource, Decision, Event, EventBody, Role, Score, ShortName,
    Status, Tokens, UserHash,
};

const HAS_USER: u8 = 1;
const HAS_ID: u8 = 2;
const HAS_CHAT: u8 = 4;
const HAS_A: u8 = 8;
const HAS_B: u8 = 16;
const HAS_EXT: u8 = 32;

const EXT_TOKENS: u8 = 1;
const EXT_TTFT: u8 = 2;
const EXT_PROVIDER: u8 = 4;
const EXT_COST: u8 = 8;

/// The extension bits a response needs.
fn ext_of(tokens: &Option<Tokens>, ttft: &Option<f64>, provider: bool, cost: bool) -> u8 {
    let more_tokens = tokens.is_some_and(|t| t.cached + t.cache_write + t.reasoning > 0);
    (more_tokens as u8 * EXT_TOKENS)
        | (ttft.is_some() as u8 * EXT_TTFT)
        | (provider as u8 * EXT_PROVIDER)
        | (cost as u8 * EXT_COST)
}

/// Appends the encoding of `bot`'s events (those to count, each with its id
/// hash when it had an id) to `out`.
pub fn encode<'e, 'a: 'e>(
    out: &mut Vec<u8>,
    bot: &str,
    events: impl ExactSizeIterator<Item = (&'e Event<'a>, Option<IdHash>)>,
) {
    out.push(bot.len() as u8);
    out.extend_from_slice(bot.as_bytes());
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    // Events of one batch nearly always share their time (arrival): each
    // stores its difference from the first, usually one byte instead of 8.
    let mut events = events.peekable();
    let base = events.peek().map_or(0, |(e, _)| e.ts);
    out.extend_from_slice(&base.to_le_bytes());
    for (e, id) in events {
        let mut ext = 0;
        let (tag, a, b) = match &e.body {
            EventBody::Message { db_queries, .. } => (0u8, db_queries.is_some(), false),
            EventBody::Response {
                model,
                tokens,
                ttft_seconds,
                provider,
                cost,
                ..
            } => {
                ext = ext_of(tokens, ttft_seconds, provider.is_some(), cost.is_some());
                (1, model.is_some(), tokens.is_some())
            }
            EventBody::Feedback { reason, .. } => (8, reason.is_some(), false),
            EventBody::Cache { .. } => (2, false, false),
            EventBody::UserRegistered => (3, false, false),
            EventBody::Consent { .. } => (4, false, false),
            EventBody::LimitReached => (5, false, false),
            EventBody::Error { .. } => (6, false, false),
            EventBody::Custom { .. } => (7, false, false),
            EventBody::Forget => (9, false, false),
            EventBody::Wipe => (10, false, false),
        };
        let flags = (e.user.is_some() as u8 * HAS_USER)
            | (id.is_some() as u8 * HAS_ID)
            | (e.chat_type.is_some() as u8 * HAS_CHAT)
            | (a as u8 * HAS_A)
            | (b as u8 * HAS_B)
            | ((ext != 0) as u8 * HAS_EXT);
        out.push(tag);
        out.push(flags);
        varint(out, zigzag(e.ts.wrapping_sub(base)));
        if let Some(UserHash(u)) = e.user {
            out.extend_from_slice(&u.to_le_bytes());
        }
        if let Some(IdHash(i)) = id {
            out.extend_from_slice(&i.to_le_bytes());
        }
        if let Some(c) = e.chat_type {
            out.push(c.index() as u8);
        }
        match &e.body {
            EventBody::Message { role, db_queries } => {
                out.push(role.index() as u8);
                if let Some(q) = db_queries {
                    out.extend_from_slice(&q.to_le_bytes());
                }
            }
            EventBody::Response {
                status,
                duration_seconds,
                model,
                tokens,
                ttft_seconds,
                provider,
                cost,
            } => {
                out.push(status.index() as u8);
                out.extend_from_slice(&duration_seconds.to_le_bytes());
                if let Some(m) = model {
                    name(out, m.as_str());
                }
                if let Some(t) = tokens {
                    out.extend_from_slice(&t.prompt.to_le_bytes());
                    out.extend_from_slice(&t.completion.to_le_bytes());
                }
                if ext != 0 {
                    out.push(ext);
                }
                if let (true, Some(t)) = (ext & EXT_TOKENS != 0, tokens) {
                    for n in [t.cached, t.cache_write, t.reasoning] {
                        out.extend_from_slice(&n.to_le_bytes());
                    }
                }
                if let Some(ttft) = ttft_seconds {
                    out.extend_from_slice(&ttft.to_le_bytes());
                }
                if let Some(p) = provider {
                    name(out, p.as_str());
                }
                if let Some(c) = cost {
                    out.extend_from_slice(&c.micros.to_le_bytes());
                    out.push(c.source.index() as u8);
                }
            }
            EventBody::Feedback { score, reason } => {
                out.push(score.index() as u8);
                if let Some(r) = reason {
                    name(out, r.as_str());
                }
            }
            EventBody::Cache { result, cache } => {
                out.push(result.index() as u8);
                name(out, cache.as_str());
            }
            EventBody::UserRegistered
            | EventBody::LimitReached
            | EventBody::Forget
            | EventBody::Wipe => {}
            EventBody::Consent { decision } => out.push(decision.index() as u8),
            EventBody::Error { kind } => name(out, kind.as_str()),
            EventBody::Custom { name: n, value } => {
                name(out, n.as_str());
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
    }
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn name(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// A record that does not decode: written by another format version, or
/// damaged in a way its checksum did not catch.
#[derive(Debug, thiserror::Error)]
#[error("journal record does not decode at byte {0}")]
pub struct DecodeError(usize);

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError(self.at))?;
        let s = self.bytes.get(self.at..end).ok_or(DecodeError(self.at))?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let at = self.at;
        self.take(N)?.try_into().map_err(|_| DecodeError(at))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let at = self.at;
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(DecodeError(at))
    }
    fn f64(&mut self) -> Result<f64, DecodeError> {
        Ok(f64::from_le_bytes(self.array()?))
    }
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let at = self.at;
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError(at))
    }
    fn name(&mut self, field: &str) -> Result<ShortName<'a>, DecodeError> {
        let at = self.at;
        ShortName::parse(field, Cow::Borrowed(self.str()?)).map_err(|_| DecodeError(at))
    }
    fn pick<T: Copy>(&mut self, all: &[T]) -> Result<T, DecodeError> {
        let at = self.at;
        all.get(self.u8()? as usize).copied().ok_or(DecodeError(at))
    }
}

/// A decoded record: the bot, and each event with its id hash.
pub struct Decoded<'a> {
    pub bot: &'a str,
    pub events: Vec<(Event<'a>, Option<IdHash>)>,
}

pub fn decode(bytes: &[u8]) -> Result<Decoded<'_>, DecodeError> {
    let mut r = Reader { bytes, at: 0 };
    let bot = r.str()?;
    let count = u32::from_le_bytes(r.array()?) as usize;
    let base = i64::from_le_bytes(r.array()?);
    // Each event takes at least 3 bytes: a count that cannot fit is damage.
    if count > bytes.len() / 3 {
        return Err(DecodeError(r.at));
    }
    let mut events = Vec::with_capacity(count);
    for _ in 0..count {
        let at = r.at;
        let tag = r.u8()?;
        let flags = r.u8()?;
        let delta = r.varint()?;
        let ts = base.wrapping_add(((delta >> 1) as i64) ^ -((delta & 1) as i64));
        let user = (flags & HAS_USER != 0)
            .then(|| r.u64().map(UserHash))
            .transpose()?;
        let id = (flags & HAS_ID != 0)
            .then(|| r.u64().map(IdHash))
            .transpose()?;
        let chat_type = (flags & HAS_CHAT != 0)
            .then(|| r.pick(ChatType::ALL))
            .transpose()?;
        let body = match tag {
            0 => EventBody::Message {
                role: r.pick(Role::ALL)?,
                db_queries: (flags & HAS_A != 0)
                    .then(|| r.array().map(u32::from_le_bytes))
                    .transpose()?,
            },
            1 => {
                let status = r.pick(Status::ALL)?;
                let duration_seconds = r.f64()?;
                let model = (flags & HAS_A != 0).then(|| r.name("model")).transpose()?;
                let mut tokens = (flags & HAS_B != 0)
                    .then(|| {
                        Ok::<_, DecodeError>(Tokens {
                            prompt: r.u64()?,
                            completion: r.u64()?,
                            ..Tokens::default()
                        })
                    })
                    .transpose()?;
                let ext = if flags & HAS_EXT != 0 { r.u8()? } else { 0 };
                if ext & EXT_TOKENS != 0 {
                    let t = tokens.as_mut().ok_or(DecodeError(r.at))?;
                    t.cached = r.u64()?;
                    t.cache_write = r.u64()?;
                    t.reasoning = r.u64()?;
                }
                let ttft_seconds = (ext & EXT_TTFT != 0).then(|| r.f64()).transpose()?;
                let provider = (ext & EXT_PROVIDER != 0)
                    .then(|| r.name("provider"))
                    .transpose()?;
                let cost = (ext & EXT_COST != 0)
                    .then(|| {
                        Ok::<_, DecodeError>(Cost {
                            micros: r.u64()?,
                            source: r.pick(CostSource::ALL)?,
                        })
                    })
                    .transpose()?;
                EventBody::Response {
                    status,
                    duration_seconds,
                    model,
                    tokens,
                    ttft_seconds,
                    provider,
                    cost,
                }
            }
            8 => EventBody::Feedback {
                score: r.pick(Score::ALL)?,
                reason: (flags & HAS_A != 0).then(|| r.name("reason")).transpose()?,
            },
            2 => EventBody::Cache {
                result: r.pick(CacheResult::ALL)?,
                cache: r.name("cache")?,
            },
            3 => EventBody::UserRegistered,
            4 => EventBody::Consent {
                decision: r.pick(Decision::ALL)?,
            },
            5 => EventBody::LimitReached,
            9 => EventBody::Forget,
            10 => EventBody::Wipe,
            6 => EventBody::Error {
                kind: r.name("kind")?,
            },
            7 => EventBody::Custom {
                name: r.name("name")?,
                value: r.f64()?,
            },
            _ => return Err(DecodeError(at)),
        };
        events.push((
            Event {
                user,
                event_id: None,
                ts,
                chat_type,
                body,
            },
            id,
        ));
    }
    if r.at != bytes.len() {
        return Err(DecodeError(r.at));
    }
    Ok(Decoded { bot, events })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{BodyFormat, parse_batch};

    #[test]
    fn every_event_type_round_trips() {
        let body = r#"[
            {"type":"message","user_id":1,"role":"user","db_queries":6,"chat_type":"group"},
            {"type":"message","role":"assistant"},
            {"type":"response","status":"success","duration_ms":1500,"model":"gpt-4o","tokens":{"prompt":10,"completion":20}},
            {"type":"response","status":"timeout","duration_ms":0.5},
            {"type":"cache","result":"hit","cache":"answers"},
            {"type":"user_registered","user_id":"abc"},
            {"type":"consent","granted":false},
            {"type":"limit_reached","event_id":"x1"},
            {"type":"error","kind":"db_timeout"},
            {"type":"custom","name":"tip","value":2.5},
            {"type":"response","status":"success","duration_ms":900,"model":"gpt-4o-mini","provider":"openai",
             "tokens":{"prompt":100,"completion":20,"cached":40,"cache_write":10,"reasoning":5},"ttft_ms":120},
            {"type":"response","status":"success","duration_ms":900,"model":"x","cost":0.0125},
            {"type":"response","status":"error","duration_ms":900,"model":"unknown-model","tokens":{"prompt":1}},
            {"type":"feedback","user_id":7,"score":-1,"reason":"too_long"},
            {"type":"feedback","score":4,"scale":5}
        ]"#;
        let mut events = parse_batch(
            body.as_bytes(),
            BodyFormat::Json,
            100,
            1_800_000_000,
            &crate::event::UserKey::legacy(),
        )
        .unwrap();
        // Priced as ingest journals them: the cost goes into the record.
        crate::prices::Prices::builtin().price(&mut events);
        assert!(
            matches!(&events[10].body, EventBody::Response { cost: Some(c), .. } if c.source == CostSource::Table),
            "{:?}",
            events[10]
        );
        let ids: Vec<Option<IdHash>> = events
            .iter()
            .map(|e| e.event_id.as_deref().map(|id| IdHash::of("bot", id)))
            .collect();
        let mut out = Vec::new();
        encode(&mut out, "bot", events.iter().zip(ids.iter().copied()));
        let decoded = decode(&out).unwrap();
        assert_eq!(decoded.bot, "bot");
        assert_eq!(decoded.events.len(), events.len());
        for ((got, id), (want, want_id)) in decoded.events.iter().zip(events.iter().zip(&ids)) {
            let want = Event {
                event_id: None,
                ..want.clone()
            };
            assert_eq!(got, &want);
            assert_eq!(id, want_id);
        }
    }

    #[test]
    fn times_round_trip_whatever_their_spread() {
        for spread in [
            0i64,
            1,
            -1,
            63,
            -64,
            300,
            -86_400 * 400,
            i64::from(i32::MAX),
        ] {
            let body = format!(
                r#"[{{"type":"limit_reached","ts":1700000000}},{{"type":"limit_reached","ts":{}}}]"#,
                1_700_000_000 + spread
            );
            let events = parse_batch(
                body.as_bytes(),
                BodyFormat::Json,
                2,
                i64::MAX / 2,
                &crate::event::UserKey::legacy(),
            )
            .unwrap();
            let mut out = Vec::new();
            encode(&mut out, "b", events.iter().map(|e| (e, None)));
            let got: Vec<i64> = decode(&out)
                .unwrap()
                .events
                .iter()
                .map(|(e, _)| e.ts)
                .collect();
            assert_eq!(got, vec![1_700_000_000, 1_700_000_000 + spread]);
        }
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let events = parse_batch(
            br#"{"type":"error","kind":"x"}"#,
            BodyFormat::Json,
            1,
            0,
            &crate::event::UserKey::legacy(),
        )
        .unwrap();
        let mut out = Vec::new();
        encode(&mut out, "b", events.iter().map(|e| (e, None)));
        for cut in 0..out.len() {
            assert!(decode(&out[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = out.clone();
        let n = bad.len();
        bad[n - 2] = 0xff; // the name's length
        assert!(decode(&bad).is_err());
    }
}
