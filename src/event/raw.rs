//! One event as serde reads it, and the checks that turn it into an
//! [`Event`].
//!
//! Kept apart from the checked types in `mod.rs`: everything here is the
//! wire format (which fields exist, which may be absent, how `ts` may be
//! written) and is private to the parser, while the types it produces are
//! what the rest of the crate uses.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::{
    CacheResult, ChatType, Cost, DEFAULT_CACHE, Decision, Event, EventBody, EventType, MAX_COST,
    MAX_CUSTOM_VALUE, MAX_DB_QUERIES, MAX_DURATION_MS, MAX_EVENT_ID_LEN, MAX_FUTURE_SECS,
    MAX_TOKENS, ParseError, Result, Role, Score, ShortName, Status, Tokens, UserId, UserKey,
};

/// `ts` as RFC 3339 text or unix seconds (integer or fractional).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct UnixSeconds(pub(super) i64);

impl<'de> Deserialize<'de> for UnixSeconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = UnixSeconds;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp or unix seconds")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<UnixSeconds, E> {
                if v < 0 {
                    return Err(E::custom("ts must not be before 1970"));
                }
                Ok(UnixSeconds(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<UnixSeconds, E> {
                i64::try_from(v)
                    .map(UnixSeconds)
                    .map_err(|_| E::custom("ts is out of range"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<UnixSeconds, E> {
                if v.is_finite() && (0.0..9.0e15).contains(&v) {
                    Ok(UnixSeconds(v as i64))
                } else {
                    Err(E::custom("ts is out of range"))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<UnixSeconds, E> {
                chrono::DateTime::parse_from_rfc3339(v)
                    .map(|t| UnixSeconds(t.timestamp()))
                    .map_err(|e| E::custom(format_args!("ts is not RFC 3339 ({e})")))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads `T` only from a JSON object. serde's derived structs also accept
/// an array of their fields in order, which would let `["message", 42]`
/// pass as an event; the contract says an event is an object.
#[derive(Debug)]
pub(super) struct Object<T>(pub(super) T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: de::MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokens {
    #[serde(default)]
    pub(super) prompt: u64,
    #[serde(default)]
    pub(super) completion: u64,
    #[serde(default)]
    pub(super) cached: u64,
    #[serde(default)]
    pub(super) cache_write: u64,
    #[serde(default)]
    pub(super) reasoning: u64,
}

/// An event exactly as sent. Every field of every type is optional here;
/// [`RawEvent::check`] decides which belong to the event's type.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEvent<'a> {
    #[serde(rename = "type")]
    pub(super) event_type: EventType,
    #[serde(borrow, default)]
    pub(super) user_id: Option<UserId<'a>>,
    #[serde(borrow, default)]
    pub(super) event_id: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(super) ts: Option<UnixSeconds>,
    #[serde(default)]
    pub(super) chat_type: Option<ChatType>,
    // message
    #[serde(default)]
    pub(super) role: Option<Role>,
    #[serde(default)]
    pub(super) db_queries: Option<u32>,
    // response
    #[serde(default)]
    pub(super) status: Option<Status>,
    #[serde(default)]
    pub(super) duration_ms: Option<f64>,
    #[serde(borrow, default)]
    pub(super) model: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(super) tokens: Option<Object<RawTokens>>,
    #[serde(default)]
    pub(super) ttft_ms: Option<f64>,
    #[serde(borrow, default)]
    pub(super) provider: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(super) cost: Option<f64>,
    // feedback
    #[serde(default)]
    pub(super) score: Option<i64>,
    #[serde(default)]
    pub(super) scale: Option<i64>,
    #[serde(borrow, default)]
    pub(super) reason: Option<Cow<'a, str>>,
    // cache
    #[serde(default)]
    pub(super) result: Option<CacheResult>,
    #[serde(borrow, default)]
    pub(super) cache: Option<Cow<'a, str>>,
    // consent
    #[serde(default)]
    pub(super) granted: Option<bool>,
    // error
    #[serde(borrow, default)]
    pub(super) kind: Option<Cow<'a, str>>,
    // custom
    #[serde(borrow, default)]
    pub(super) name: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(super) value: Option<f64>,
}

/// Every count within its range, and the cached and cache-written tokens
/// within the prompt they are part of.
fn check_tokens(t: RawTokens) -> Result<Tokens> {
    let all = [
        ("prompt", t.prompt),
        ("completion", t.completion),
        ("cached", t.cached),
        ("cache_write", t.cache_write),
        ("reasoning", t.reasoning),
    ];
    if let Some((field, _)) = all.iter().find(|(_, n)| *n > MAX_TOKENS) {
        return Err(ParseError::invalid(format!(
            "`tokens.{field}` must be an integer from 0 to {MAX_TOKENS}"
        )));
    }
    if t.cached + t.cache_write > t.prompt {
        return Err(ParseError::invalid(
            "`tokens.cached` and `tokens.cache_write` are part of `tokens.prompt`, so together at most it",
        ));
    }
    Ok(Tokens {
        prompt: t.prompt,
        completion: t.completion,
        cached: t.cached,
        cache_write: t.cache_write,
        reasoning: t.reasoning,
    })
}

/// Every field of an event, in one order: those any type may carry, then
/// [`TYPED_FIELDS`]. The fast reader's bit for a field is its place here.
pub(super) const FIELDS: [&str; 23] = [
    "type",
    "user_id",
    "event_id",
    "ts",
    "chat_type",
    "role",
    "db_queries",
    "status",
    "duration_ms",
    "model",
    "tokens",
    "ttft_ms",
    "provider",
    "cost",
    "score",
    "scale",
    "reason",
    "result",
    "cache",
    "granted",
    "kind",
    "name",
    "value",
];

/// The fields that belong to one event type or another, in the order an
/// error names the first misplaced one: [`FIELDS`] after the five any type
/// may carry.
const TYPED_FIELDS: &[&str] = FIELDS.split_at(5).1;

/// The mask of `names` among [`TYPED_FIELDS`], computed at compile time.
const fn fields(names: &[&str]) -> u32 {
    let mut mask = 0;
    let mut n = 0;
    while n < names.len() {
        let mut i = 0;
        while !same(names[n].as_bytes(), TYPED_FIELDS[i].as_bytes()) {
            i += 1;
            // A name not in the list fails the build here.
            assert!(i < TYPED_FIELDS.len(), "not a typed field");
        }
        mask |= 1 << i;
        n += 1;
    }
    mask
}

const fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

fn required<T>(field: &str, kind: EventType, v: Option<T>) -> Result<T> {
    v.ok_or_else(|| ParseError::invalid(format!("`{}` event needs field `{field}`", kind.as_str())))
}

impl<'a> RawEvent<'a> {
    /// An event with no field set, for the fast reader (`fast.rs`) to fill
    /// in; its type is a placeholder until the body names one.
    pub(super) fn blank() -> Self {
        RawEvent {
            event_type: EventType::Message,
            user_id: None,
            event_id: None,
            ts: None,
            chat_type: None,
            role: None,
            db_queries: None,
            status: None,
            duration_ms: None,
            model: None,
            tokens: None,
            ttft_ms: None,
            provider: None,
            cost: None,
            score: None,
            scale: None,
            reason: None,
            result: None,
            cache: None,
            granted: None,
            kind: None,
            name: None,
            value: None,
        }
    }

    /// No field set, as [`Self::blank`] and a successful [`Self::check`]
    /// leave it (its type aside, which every event must name).
    pub(super) fn is_blank(&self) -> bool {
        self.present_fields() == 0
            && self.user_id.is_none()
            && self.event_id.is_none()
            && self.ts.is_none()
            && self.chat_type.is_none()
    }

    /// The type-specific fields that are present, one bit each in
    /// [`TYPED_FIELDS`] order: a mask, so checking which belong to the
    /// event's type costs no string comparison.
    fn present_fields(&self) -> u32 {
        [
            self.role.is_some(),
            self.db_queries.is_some(),
            self.status.is_some(),
            self.duration_ms.is_some(),
            self.model.is_some(),
            self.tokens.is_some(),
            self.ttft_ms.is_some(),
            self.provider.is_some(),
            self.cost.is_some(),
            self.score.is_some(),
            self.scale.is_some(),
            self.reason.is_some(),
            self.result.is_some(),
            self.cache.is_some(),
            self.granted.is_some(),
            self.kind.is_some(),
            self.name.is_some(),
            self.value.is_some(),
        ]
        .into_iter()
        .enumerate()
        .fold(0, |mask, (i, present)| mask | (u32::from(present) << i))
    }

    /// The event `self` describes, if it is valid. Every field is moved
    /// out (taken), not copied: the fast reader fills one `RawEvent` per
    /// batch and checks it in place, and a valid event leaves it blank
    /// again (fields of other types were refused as foreign, its own and
    /// the common ones taken here), so the next event needs no 300-byte
    /// reset. What a refused event leaves does not matter: the fast reader
    /// then gives the whole body to serde.
    pub(super) fn check(&mut self, now: i64, key: &UserKey) -> Result<Event<'a>> {
        self.check_then(now, key, |event| event)
    }

    /// [`Self::check`], the event handed to `then` as it is built: the fast
    /// reader pushes it straight into the batch, where a returned `Result`
    /// of ~200 bytes was copied twice more on its way there (one in ten of
    /// a batch's parse cycles).
    #[inline(always)]
    pub(super) fn check_then<R>(
        &mut self,
        now: i64,
        key: &UserKey,
        then: impl FnOnce(Event<'a>) -> R,
    ) -> Result<R> {
        let kind = self.event_type;
        let allowed = match kind {
            EventType::Message => const { fields(&["role", "db_queries"]) },
            EventType::Response => {
                const {
                    fields(&[
                        "status",
                        "duration_ms",
                        "model",
                        "tokens",
                        "ttft_ms",
                        "provider",
                        "cost",
                    ])
                }
            }
            EventType::Feedback => const { fields(&["score", "scale", "reason"]) },
            EventType::Cache => const { fields(&["result", "cache"]) },
            EventType::UserRegistered | EventType::LimitReached => 0,
            EventType::Consent => const { fields(&["granted"]) },
            EventType::Error => const { fields(&["kind"]) },
            EventType::Custom => const { fields(&["name", "value"]) },
        };
        let foreign = self.present_fields() & !allowed;
        if foreign != 0 {
            return Err(ParseError::invalid(format!(
                "field `{}` does not belong to a `{}` event",
                TYPED_FIELDS[foreign.trailing_zeros() as usize],
                kind.as_str()
            )));
        }
        if let Some(id) = &self.event_id
            && (id.is_empty() || id.len() > MAX_EVENT_ID_LEN)
        {
            return Err(ParseError::invalid(format!(
                "`event_id` must be 1-{MAX_EVENT_ID_LEN} bytes"
            )));
        }
        let ts = match self.ts.take() {
            Some(UnixSeconds(ts)) if ts > now + MAX_FUTURE_SECS => {
                return Err(ParseError::invalid(format!(
                    "`ts` is {}s in the future; at most {MAX_FUTURE_SECS}s is allowed",
                    ts - now
                )));
            }
            // Within the allowed skew a future `ts` counts as now, so a
            // fast clock cannot start "today" or an hour's sketch early.
            Some(UnixSeconds(ts)) => ts.min(now),
            None => now,
        };
        let body = match kind {
            EventType::Message => {
                let db_queries = self.db_queries.take();
                if db_queries.is_some_and(|q| q > MAX_DB_QUERIES) {
                    return Err(ParseError::invalid(format!(
                        "`db_queries` must be an integer from 0 to {MAX_DB_QUERIES}"
                    )));
                }
                EventBody::Message {
                    role: required("role", kind, self.role.take())?,
                    db_queries,
                }
            }
            EventType::Response => {
                let duration_ms = required("duration_ms", kind, self.duration_ms.take())?;
                if !(0.0..=MAX_DURATION_MS).contains(&duration_ms) {
                    return Err(ParseError::invalid(format!(
                        "`duration_ms` must be a number from 0 to {MAX_DURATION_MS} (one day)"
                    )));
                }
                let tokens = match self.tokens.take() {
                    Some(Object(t)) => Some(check_tokens(t)?),
                    None => None,
                };
                let ttft_seconds = match self.ttft_ms.take() {
                    Some(ms) if !(0.0..=duration_ms).contains(&ms) => {
                        return Err(ParseError::invalid(format!(
                            "`ttft_ms` must be a number from 0 to `duration_ms` ({duration_ms}): the first token comes before the answer ends"
                        )));
                    }
                    Some(ms) => Some(ms / 1000.0),
                    None => None,
                };
                let cost = match self.cost.take() {
                    Some(c) if !(0.0..=MAX_COST).contains(&c) => {
                        return Err(ParseError::invalid(format!(
                            "`cost` must be a number from 0 to {MAX_COST} (what one call cost, in the configured currency)"
                        )));
                    }
                    Some(c) => Some(Cost::reported(c)),
                    None => None,
                };
                EventBody::Response {
                    status: required("status", kind, self.status.take())?,
                    duration_seconds: duration_ms / 1000.0,
                    model: self
                        .model
                        .take()
                        .map(|m| ShortName::parse("model", m))
                        .transpose()?,
                    tokens,
                    ttft_seconds,
                    provider: self
                        .provider
                        .take()
                        .map(|p| ShortName::parse("provider", p))
                        .transpose()?,
                    cost,
                }
            }
            EventType::Feedback => {
                let score = required("score", kind, self.score.take())?;
                let score = match (self.scale.take(), score) {
                    (None, -1) => Score::Down,
                    (None, 1) => Score::Up,
                    (None, _) => {
                        return Err(ParseError::invalid(
                            "`score` is -1 or 1 (thumbs); for a rating from 1 to 5 send `scale: 5`",
                        ));
                    }
                    (Some(5), 1..=5) => Score::ALL[(score + 1) as usize],
                    (Some(5), _) => {
                        return Err(ParseError::invalid(
                            "`score` must be an integer from 1 to 5 with `scale: 5`",
                        ));
                    }
                    (Some(_), _) => {
                        return Err(ParseError::invalid(
                            "`scale` must be 5 (a 1-5 rating); leave it out for thumbs (-1 or 1)",
                        ));
                    }
                };
                EventBody::Feedback {
                    score,
                    reason: self
                        .reason
                        .take()
                        .map(|r| ShortName::parse("reason", r))
                        .transpose()?,
                }
            }
            EventType::Cache => EventBody::Cache {
                result: required("result", kind, self.result.take())?,
                cache: match self.cache.take() {
                    Some(c) => ShortName::parse("cache", c)?,
                    None => ShortName(Cow::Borrowed(DEFAULT_CACHE)),
                },
            },
            EventType::UserRegistered => EventBody::UserRegistered,
            EventType::Consent => EventBody::Consent {
                decision: if required("granted", kind, self.granted.take())? {
                    Decision::Granted
                } else {
                    Decision::Denied
                },
            },
            EventType::LimitReached => EventBody::LimitReached,
            EventType::Error => EventBody::Error {
                kind: ShortName::parse("kind", required("kind", kind, self.kind.take())?)?,
            },
            EventType::Custom => {
                let value = self.value.take().unwrap_or(1.0);
                if !(0.0..=MAX_CUSTOM_VALUE).contains(&value) {
                    return Err(ParseError::invalid(format!(
                        "`value` must be a number from 0 to {MAX_CUSTOM_VALUE:e}"
                    )));
                }
                EventBody::Custom {
                    name: ShortName::parse("name", required("name", kind, self.name.take())?)?,
                    value,
                }
            }
        };
        Ok(then(Event {
            user: self.user_id.take().map(|id| key.hash(&id)),
            event_id: self.event_id.take(),
            ts,
            chat_type: self.chat_type.take(),
            body,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BodyFormat, parse_batch};
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn one(json: &str) -> Result<Event<'_>> {
        parse_batch(
            json.as_bytes(),
            BodyFormat::Json,
            100,
            NOW,
            &crate::event::UserKey::legacy(),
        )
        .map(|mut v| v.remove(0))
    }

    /// The wire name of a parsed body's type, to check it independently of
    /// how the parser maps names to variants.
    fn type_of(body: &EventBody<'_>) -> &'static str {
        match body {
            EventBody::Message { .. } => "message",
            EventBody::Response { .. } => "response",
            EventBody::Cache { .. } => "cache",
            EventBody::UserRegistered => "user_registered",
            EventBody::Consent { .. } => "consent",
            EventBody::LimitReached => "limit_reached",
            EventBody::Error { .. } => "error",
            EventBody::Custom { .. } => "custom",
            EventBody::Feedback { .. } => "feedback",
            EventBody::Forget => "forget",
            EventBody::Wipe => "wipe",
        }
    }

    #[test]
    fn every_type_parses() {
        let cases = [
            (
                r#"{"type":"message","user_id":1,"role":"user","db_queries":6}"#,
                "message",
            ),
            (
                r#"{"type":"response","status":"success","duration_ms":1200,"model":"gpt-4o","tokens":{"prompt":10,"completion":5}}"#,
                "response",
            ),
            (r#"{"type":"cache","result":"hit"}"#, "cache"),
            (
                r#"{"type":"user_registered","user_id":"abc"}"#,
                "user_registered",
            ),
            (r#"{"type":"consent","granted":false}"#, "consent"),
            (r#"{"type":"limit_reached","user_id":5}"#, "limit_reached"),
            (r#"{"type":"error","kind":"db_timeout"}"#, "error"),
            (
                r#"{"type":"custom","name":"voice_note","value":2.5}"#,
                "custom",
            ),
        ];
        for (json, expected) in cases {
            let event = one(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(type_of(&event.body), expected, "{json}");
        }
        // And the fields each type carries, exactly.
        let bodies = [
            (
                cases[0].0,
                EventBody::Message {
                    role: Role::User,
                    db_queries: Some(6),
                },
            ),
            (
                cases[1].0,
                EventBody::Response {
                    status: Status::Success,
                    duration_seconds: 1.2,
                    model: Some(ShortName("gpt-4o".into())),
                    tokens: Some(Tokens {
                        prompt: 10,
                        completion: 5,
                        ..Tokens::default()
                    }),
                    ttft_seconds: None,
                    provider: None,
                    cost: None,
                },
            ),
            (
                cases[2].0,
                EventBody::Cache {
                    result: CacheResult::Hit,
                    cache: ShortName(DEFAULT_CACHE.into()),
                },
            ),
            (cases[3].0, EventBody::UserRegistered),
            (
                cases[4].0,
                EventBody::Consent {
                    decision: Decision::Denied,
                },
            ),
            (cases[5].0, EventBody::LimitReached),
            (
                cases[6].0,
                EventBody::Error {
                    kind: ShortName("db_timeout".into()),
                },
            ),
            (
                cases[7].0,
                EventBody::Custom {
                    name: ShortName("voice_note".into()),
                    value: 2.5,
                },
            ),
        ];
        for (json, body) in bodies {
            assert_eq!(one(json).unwrap().body, body, "{json}");
        }
        let e = one(r#"{"type":"response","status":"timeout","duration_ms":1500}"#).unwrap();
        assert_eq!(
            e.body,
            EventBody::Response {
                status: Status::Timeout,
                duration_seconds: 1.5,
                model: None,
                tokens: None,
                ttft_seconds: None,
                provider: None,
                cost: None,
            }
        );
        let e = one(r#"{"type":"cache","result":"miss"}"#).unwrap();
        assert_eq!(
            e.body,
            EventBody::Cache {
                result: CacheResult::Miss,
                cache: ShortName(DEFAULT_CACHE.into())
            }
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(one(r#"{"type":"limit_reached"}"#).unwrap().ts, NOW);
        assert_eq!(
            one(r#"{"type":"limit_reached","ts":1700000000}"#)
                .unwrap()
                .ts,
            1_700_000_000
        );
        assert_eq!(
            one(r#"{"type":"limit_reached","ts":1700000000.7}"#)
                .unwrap()
                .ts,
            1_700_000_000
        );
        assert_eq!(
            one(r#"{"type":"limit_reached","ts":"2026-11-23T10:00:00Z"}"#)
                .unwrap()
                .ts,
            1_795_428_000
        );
        let future = format!(r#"{{"type":"limit_reached","ts":{}}}"#, NOW + 301);
        assert!(matches!(one(&future), Err(ParseError::Invalid { .. })));
        // Up to five minutes ahead is clock skew: accepted, and counted as
        // now (so a fast clock cannot start "today" or an hour early).
        for ahead in [1, 299, 300] {
            let near = format!(r#"{{"type":"limit_reached","ts":{}}}"#, NOW + ahead);
            assert_eq!(one(&near).unwrap().ts, NOW, "{ahead}s ahead");
        }
        let past = format!(r#"{{"type":"limit_reached","ts":{}}}"#, NOW - 1);
        assert_eq!(one(&past).unwrap().ts, NOW - 1);
        assert!(matches!(
            one(r#"{"type":"limit_reached","ts":"yesterday"}"#),
            Err(ParseError::Invalid { .. })
        ));
    }

    #[test]
    fn a_misplaced_field_is_named_by_its_own_bit() {
        // `present_fields` and TYPED_FIELDS list the fields in one order:
        // each field alone on an event of a type it does not belong to
        // must be the one the error names.
        let value = |name: &str| match name {
            "role" => r#""user""#,
            "status" => r#""success""#,
            "model" | "provider" | "reason" | "cache" | "kind" | "name" => r#""x""#,
            "tokens" => r#"{"prompt":1}"#,
            "result" => r#""hit""#,
            "granted" => "true",
            _ => "1",
        };
        for &name in TYPED_FIELDS {
            let (kind, own) = match name {
                "score" | "scale" | "reason" => ("cache", r#""result":"hit""#),
                _ => ("feedback", r#""score":1"#),
            };
            let json = format!(r#"{{"type":"{kind}",{own},"{name}":{}}}"#, value(name));
            match one(&json) {
                Err(ParseError::Invalid { message, .. }) => assert_eq!(
                    message,
                    format!("field `{name}` does not belong to a `{kind}` event"),
                    "{json}"
                ),
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn invalid_events_are_422() {
        for json in [
            r#"{"type":"nope"}"#,
            r#"{"type":1}"#,
            r#"{"type":"message","role":true}"#,
            r#"{"role":"user"}"#,
            r#"{"type":"message"}"#,
            r#"{"type":"message","role":"robot"}"#,
            r#"{"type":"message","role":"user","status":"success"}"#,
            r#"{"type":"message","role":"user","db_queries":-1}"#,
            r#"{"type":"message","role":"user","surprise":1}"#,
            r#"{"type":"response","status":"success","duration_ms":-5}"#,
            r#"{"type":"response","status":"success","duration_ms":"5"}"#,
            r#"{"type":"error","kind":"has space"}"#,
            r#"{"type":"custom","name":"x","value":-1}"#,
            r#"{"type":"consent","granted":"yes"}"#,
            r#"{"type":"limit_reached","user_id":""}"#,
            r#"{"type":"limit_reached","user_id":1.5}"#,
            r#"{"type":"limit_reached","event_id":""}"#,
            r#"[]"#,
            r#"42"#,
        ] {
            match parse_batch(
                json.as_bytes(),
                BodyFormat::Json,
                100,
                NOW,
                &crate::event::UserKey::legacy(),
            ) {
                Err(ParseError::Invalid { .. }) => {}
                other => panic!("{json}: expected invalid, got {other:?}"),
            }
        }
        let long_id = format!(
            r#"{{"type":"limit_reached","user_id":"{}"}}"#,
            "u".repeat(257)
        );
        assert!(matches!(one(&long_id), Err(ParseError::Invalid { .. })));
        let ok_id = format!(
            r#"{{"type":"limit_reached","user_id":"{}"}}"#,
            "u".repeat(256)
        );
        assert!(one(&ok_id).is_ok());
    }

    #[test]
    fn escaped_strings_are_accepted() {
        let e = one(r#"{"type":"error","kind":"db\u005ftimeout","user_id":"a\"b"}"#).unwrap();
        assert_eq!(
            e.body,
            EventBody::Error {
                kind: ShortName("db_timeout".into())
            }
        );
    }
}
