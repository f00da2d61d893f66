//! Events as the bot sends them, and the checked domain types they become.
//!
//! Parse, don't validate: a [`RawEvent`] is whatever serde read, an [`Event`]
//! is what may reach the registry. Every label value of an `Event` is either
//! a closed enum or a [`ShortName`], so nothing downstream checks again.
//! Strings borrow from the request body where they can, so a well-formed
//! event is parsed without allocating.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};

/// Longest accepted string `user_id`.
pub const MAX_USER_ID_LEN: usize = 256;
/// Longest accepted `event_id`: room for a UUID or a composite key.
pub const MAX_EVENT_ID_LEN: usize = 128;
/// How far in the future a `ts` may be (clock skew between bot and server).
pub const MAX_FUTURE_SECS: i64 = 300;

// Ranges of the numeric fields. Each is far beyond what a real bot sends,
// and small enough that a counter fed the maximum at 100,000 events a second
// for a thousand years stays finite (about 3e27 at most, against f64's 1.8e308),
// so no input can make a series infinite or NaN (Principle 6).

/// `duration_ms`: one day.
pub const MAX_DURATION_MS: f64 = 86_400_000.0;
/// `tokens.prompt` and `tokens.completion`, each: a billion tokens.
pub const MAX_TOKENS: u64 = 1_000_000_000;
/// `db_queries` for one message.
pub const MAX_DB_QUERIES: u32 = 1_000_000;
/// A `custom` event's `value`.
pub const MAX_CUSTOM_VALUE: f64 = 1e12;

/// True when `s` may be used as a free-form label value or a bot name:
/// Why a request body is not a batch of valid events. The parser owns it;
/// the HTTP layer maps it to a status and a JSON body (`error.rs`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The body is not well-formed JSON (or NDJSON).
    #[error("{message}")]
    Malformed {
        message: String,
        index: Option<usize>,
    },
    /// Well-formed JSON that is not a valid event.
    #[error("{message}")]
    Invalid {
        message: String,
        index: Option<usize>,
    },
    /// More events than `--max-batch`.
    #[error("{0}")]
    TooLarge(String),
}

impl ParseError {
    pub fn invalid(message: impl Into<String>) -> Self {
        ParseError::Invalid {
            message: message.into(),
            index: None,
        }
    }

    /// Attaches the position of the event at fault within a batch.
    pub fn at(self, i: usize) -> Self {
        match self {
            ParseError::Malformed { message, .. } => ParseError::Malformed {
                message,
                index: Some(i),
            },
            ParseError::Invalid { message, .. } => ParseError::Invalid {
                message,
                index: Some(i),
            },
            other => other,
        }
    }
}

pub type Result<T, E = ParseError> = std::result::Result<T, E>;

/// 1-64 characters of `[A-Za-z0-9_.:-]`.
pub fn is_short_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// A checked free-form label value (error kind, custom event, model, cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShortName<'a>(Cow<'a, str>);

impl<'a> ShortName<'a> {
    pub fn parse(field: &str, value: Cow<'a, str>) -> Result<Self> {
        if is_short_name(&value) {
            Ok(ShortName(value))
        } else {
            Err(ParseError::invalid(format!(
                "`{field}` must be 1-64 characters of [A-Za-z0-9_.:-], got {:?}",
                truncate(&value, 80)
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

macro_rules! closed_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        // By hand rather than derived: serde_json reports a derived enum
        // given a number as a syntax error (400), but `"role": 1` is
        // well-formed JSON with a mistyped field (422).
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        write!(f, "one of {}", $name::NAMES.join(", "))
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<$name, E> {
                        match v {
                            $($text => Ok($name::$variant),)+
                            _ => Err(E::unknown_variant(v, $name::NAMES)),
                        }
                    }
                }
                d.deserialize_str(V)
            }
        }

        impl $name {
            /// Every value, in exposition order: the closed label set.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The label values of [`Self::ALL`], in the same order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Position in [`Self::ALL`], used to index fixed arrays of series.
            pub fn index(self) -> usize {
                self as usize
            }
        }
    };
}

closed_enum!(
    /// Who wrote a message.
    Role { User => "user", Assistant => "assistant" }
);
closed_enum!(
    /// How an LLM call ended.
    Status { Success => "success", Error => "error", RateLimited => "rate_limited", Timeout => "timeout" }
);
closed_enum!(
    /// A cache lookup's outcome.
    CacheResult { Hit => "hit", Miss => "miss" }
);
closed_enum!(
    /// A consent decision (the `granted` boolean of a `consent` event).
    Decision { Granted => "granted", Denied => "denied" }
);
closed_enum!(
    /// Which side of an LLM call tokens were spent on.
    TokenKind { Prompt => "prompt", Completion => "completion" }
);
closed_enum!(
    /// The chat an event happened in (Telegram's chat types). Accepted and
    /// checked so bots can send it today; it is not yet a label.
    ChatType { Private => "private", Group => "group", Supergroup => "supergroup", Channel => "channel" }
);
closed_enum!(
    EventType {
        Message => "message",
        Response => "response",
        Cache => "cache",
        UserRegistered => "user_registered",
        Consent => "consent",
        LimitReached => "limit_reached",
        Error => "error",
        Custom => "custom",
    }
);

/// A user id: Telegram's integer ids, or any string id up to 256 characters.
/// The integer `42` and the string `"42"` are the same user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserId<'a> {
    Int(i128),
    Str(Cow<'a, str>),
}

impl<'de: 'a, 'a> Deserialize<'de> for UserId<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UserId<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer or a string of 1-256 characters")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
                Ok(UserId::Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
                Ok(UserId::Int(v.into()))
            }
            fn visit_borrowed_str<E: de::Error>(
                self,
                v: &'de str,
            ) -> std::result::Result<Self::Value, E> {
                check_user_id(v)?;
                Ok(UserId::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                check_user_id(v)?;
                Ok(UserId::Str(Cow::Owned(v.to_owned())))
            }
        }
        fn check_user_id<E: de::Error>(v: &str) -> std::result::Result<(), E> {
            if v.is_empty() || v.chars().count() > MAX_USER_ID_LEN {
                Err(E::custom(format_args!(
                    "user_id must be an integer or a string of 1-{MAX_USER_ID_LEN} characters"
                )))
            } else {
                Ok(())
            }
        }
        d.deserialize_any(V)
    }
}

impl UserId<'_> {
    /// Feeds the id to a hasher so that `42` and `"42"` hash alike, without
    /// allocating: integers are written as their decimal digits.
    pub fn hash_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            UserId::Str(s) => f(s.as_bytes()),
            UserId::Int(n) => {
                let mut buf = [0u8; 40];
                let mut i = buf.len();
                let negative = *n < 0;
                let mut v = n.unsigned_abs();
                loop {
                    i -= 1;
                    buf[i] = b'0' + (v % 10) as u8;
                    v /= 10;
                    if v == 0 {
                        break;
                    }
                }
                if negative {
                    i -= 1;
                    buf[i] = b'-';
                }
                f(&buf[i..])
            }
        }
    }
}

/// A user id after hashing: what stands for a user everywhere past parsing
/// (the sketches and the journal), so a raw id never outlives its request.
/// The key is fixed, so every process and replica hashes a user alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UserHash(pub u64);

/// The SipHash key for user ids. Fixed (not random per process) so sketches
/// and journals written by one run merge with the next run's; ids are never
/// stored, and a sketch register keeps only a maximum rank.
pub(crate) const USER_HASH_KEY: u128 = 0x6274_6d65_7472_6963_732d_686c_6c2d_7631;

static USER_HASHER: std::sync::LazyLock<hyperloglockless::DefaultHasher> =
    std::sync::LazyLock::new(|| {
        hyperloglockless::DefaultHasher::seeded(&USER_HASH_KEY.to_be_bytes())
    });

impl UserId<'_> {
    /// The keyed hash of this id.
    pub fn hash(&self) -> UserHash {
        use std::hash::BuildHasher;
        UserHash(self.hash_bytes(|bytes| USER_HASHER.hash_one(bytes)))
    }
}

/// `ts` as RFC 3339 text or unix seconds (integer or fractional).
#[derive(Debug, Clone, Copy, PartialEq)]
struct UnixSeconds(i64);

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
struct Object<T>(T);

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    #[serde(default)]
    prompt: u64,
    #[serde(default)]
    completion: u64,
}

/// An event exactly as sent. Every field of every type is optional here;
/// [`RawEvent::check`] decides which belong to the event's type.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent<'a> {
    #[serde(rename = "type")]
    event_type: EventType,
    #[serde(borrow, default)]
    user_id: Option<UserId<'a>>,
    #[serde(borrow, default)]
    event_id: Option<Cow<'a, str>>,
    #[serde(default)]
    ts: Option<UnixSeconds>,
    #[serde(default)]
    chat_type: Option<ChatType>,
    // message
    #[serde(default)]
    role: Option<Role>,
    #[serde(default)]
    db_queries: Option<u32>,
    // response
    #[serde(default)]
    status: Option<Status>,
    #[serde(default)]
    duration_ms: Option<f64>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    tokens: Option<Object<RawTokens>>,
    // cache
    #[serde(default)]
    result: Option<CacheResult>,
    #[serde(borrow, default)]
    cache: Option<Cow<'a, str>>,
    // consent
    #[serde(default)]
    granted: Option<bool>,
    // error
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
    // custom
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(default)]
    value: Option<f64>,
}

/// A checked event: what the registry applies.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    /// Hashed as soon as the event is checked: the raw id goes no further.
    pub user: Option<UserHash>,
    pub event_id: Option<Cow<'a, str>>,
    /// Unix seconds; arrival time when the bot sent none.
    pub ts: i64,
    /// Checked and kept for the future; not a label (yet).
    pub chat_type: Option<ChatType>,
    pub body: EventBody<'a>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventBody<'a> {
    Message {
        role: Role,
        db_queries: Option<u32>,
    },
    Response {
        status: Status,
        duration_seconds: f64,
        model: Option<ShortName<'a>>,
        tokens: Option<[u64; 2]>,
    },
    Cache {
        result: CacheResult,
        cache: ShortName<'a>,
    },
    UserRegistered,
    Consent {
        decision: Decision,
    },
    LimitReached,
    Error {
        kind: ShortName<'a>,
    },
    Custom {
        name: ShortName<'a>,
        value: f64,
    },
}

/// The cache name used when a `cache` event names none.
pub const DEFAULT_CACHE: &str = "default";
/// The model label used when a `response` reports tokens but no model.
pub const UNKNOWN_MODEL: &str = "unknown";

fn required<T>(field: &str, kind: EventType, v: Option<T>) -> Result<T> {
    v.ok_or_else(|| ParseError::invalid(format!("`{}` event needs field `{field}`", kind.as_str())))
}

impl<'a> RawEvent<'a> {
    /// Names of the type-specific fields that are present.
    fn present_fields(&self) -> impl Iterator<Item = &'static str> {
        [
            ("role", self.role.is_some()),
            ("db_queries", self.db_queries.is_some()),
            ("status", self.status.is_some()),
            ("duration_ms", self.duration_ms.is_some()),
            ("model", self.model.is_some()),
            ("tokens", self.tokens.is_some()),
            ("result", self.result.is_some()),
            ("cache", self.cache.is_some()),
            ("granted", self.granted.is_some()),
            ("kind", self.kind.is_some()),
            ("name", self.name.is_some()),
            ("value", self.value.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, present)| present.then_some(name))
    }

    fn check(self, now: i64) -> Result<Event<'a>> {
        let kind = self.event_type;
        let allowed: &[&str] = match kind {
            EventType::Message => &["role", "db_queries"],
            EventType::Response => &["status", "duration_ms", "model", "tokens"],
            EventType::Cache => &["result", "cache"],
            EventType::UserRegistered | EventType::LimitReached => &[],
            EventType::Consent => &["granted"],
            EventType::Error => &["kind"],
            EventType::Custom => &["name", "value"],
        };
        if let Some(field) = self.present_fields().find(|f| !allowed.contains(f)) {
            return Err(ParseError::invalid(format!(
                "field `{field}` does not belong to a `{}` event",
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
        let ts = match self.ts {
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
                if self.db_queries.is_some_and(|q| q > MAX_DB_QUERIES) {
                    return Err(ParseError::invalid(format!(
                        "`db_queries` must be an integer from 0 to {MAX_DB_QUERIES}"
                    )));
                }
                EventBody::Message {
                    role: required("role", kind, self.role)?,
                    db_queries: self.db_queries,
                }
            }
            EventType::Response => {
                let duration_ms = required("duration_ms", kind, self.duration_ms)?;
                if !(0.0..=MAX_DURATION_MS).contains(&duration_ms) {
                    return Err(ParseError::invalid(format!(
                        "`duration_ms` must be a number from 0 to {MAX_DURATION_MS} (one day)"
                    )));
                }
                if let Some(Object(t)) = &self.tokens
                    && (t.prompt > MAX_TOKENS || t.completion > MAX_TOKENS)
                {
                    return Err(ParseError::invalid(format!(
                        "`tokens.prompt` and `tokens.completion` must be integers from 0 to {MAX_TOKENS}"
                    )));
                }
                EventBody::Response {
                    status: required("status", kind, self.status)?,
                    duration_seconds: duration_ms / 1000.0,
                    model: self
                        .model
                        .map(|m| ShortName::parse("model", m))
                        .transpose()?,
                    tokens: self.tokens.map(|Object(t)| [t.prompt, t.completion]),
                }
            }
            EventType::Cache => EventBody::Cache {
                result: required("result", kind, self.result)?,
                cache: match self.cache {
                    Some(c) => ShortName::parse("cache", c)?,
                    None => ShortName(Cow::Borrowed(DEFAULT_CACHE)),
                },
            },
            EventType::UserRegistered => EventBody::UserRegistered,
            EventType::Consent => EventBody::Consent {
                decision: if required("granted", kind, self.granted)? {
                    Decision::Granted
                } else {
                    Decision::Denied
                },
            },
            EventType::LimitReached => EventBody::LimitReached,
            EventType::Error => EventBody::Error {
                kind: ShortName::parse("kind", required("kind", kind, self.kind)?)?,
            },
            EventType::Custom => {
                let value = self.value.unwrap_or(1.0);
                if !(0.0..=MAX_CUSTOM_VALUE).contains(&value) {
                    return Err(ParseError::invalid(format!(
                        "`value` must be a number from 0 to {MAX_CUSTOM_VALUE:e}"
                    )));
                }
                EventBody::Custom {
                    name: ShortName::parse("name", required("name", kind, self.name)?)?,
                    value,
                }
            }
        };
        Ok(Event {
            user: self.user_id.as_ref().map(UserId::hash),
            event_id: self.event_id,
            ts,
            chat_type: self.chat_type,
            body,
        })
    }
}

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
pub fn parse_batch(
    body: &[u8],
    format: BodyFormat,
    max_batch: usize,
    now: i64,
) -> Result<Vec<Event<'_>>> {
    match format {
        BodyFormat::Ndjson => parse_ndjson(body, max_batch, now),
        BodyFormat::Json => match body.iter().find(|b| !b.is_ascii_whitespace()) {
            None => Err(ParseError::Malformed {
                message: "the request body is empty".into(),
                index: None,
            }),
            Some(b'[') => parse_array(body, max_batch, now),
            Some(_) => {
                let Object(raw): Object<RawEvent> =
                    serde_json::from_slice(body).map_err(from_serde)?;
                Ok(vec![raw.check(now)?])
            }
        },
    }
}

fn too_many(max_batch: usize) -> ParseError {
    ParseError::TooLarge(format!(
        "a request may carry at most {max_batch} events (--max-batch)"
    ))
}

fn parse_ndjson(body: &[u8], max_batch: usize, now: i64) -> Result<Vec<Event<'_>>> {
    let mut events = Vec::new();
    let lines = body
        .split(|&b| b == b'\n')
        .filter(|l| l.iter().any(|b| !b.is_ascii_whitespace()));
    for (i, line) in lines.enumerate() {
        if i == max_batch {
            return Err(too_many(max_batch));
        }
        let Object(raw): Object<RawEvent> =
            serde_json::from_slice(line).map_err(|e| from_serde(e).at(i))?;
        events.push(raw.check(now).map_err(|e| e.at(i))?);
    }
    if events.is_empty() {
        return Err(ParseError::Malformed {
            message: "the request body holds no events".into(),
            index: None,
        });
    }
    Ok(events)
}

/// Reads a JSON array element by element, checking each event as it is
/// read, so the error names the index at fault and a batch over the limit is
/// refused without reading the rest.
fn parse_array(body: &[u8], max_batch: usize, now: i64) -> Result<Vec<Event<'_>>> {
    struct Batch<'s> {
        max_batch: usize,
        now: i64,
        index: &'s Cell<usize>,
        failure: &'s RefCell<Option<ParseError>>,
    }
    impl<'de> DeserializeSeed<'de> for Batch<'_> {
        type Value = Vec<Event<'de>>;
        fn deserialize<D: Deserializer<'de>>(
            self,
            d: D,
        ) -> std::result::Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }
    impl<'de> Visitor<'de> for Batch<'_> {
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
                events.push(raw.check(self.now).map_err(fail)?);
                self.index.set(events.len());
            }
            Ok(events)
        }
    }

    let index = Cell::new(0);
    let failure = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = Batch {
        max_batch,
        now,
        index: &index,
        failure: &failure,
    }
    .deserialize(&mut de)
    .and_then(|events| de.end().map(|()| events));
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

    fn one(json: &str) -> Result<Event<'_>> {
        parse_batch(json.as_bytes(), BodyFormat::Json, 100, NOW).map(|mut v| v.remove(0))
    }

    #[test]
    fn short_names() {
        assert!(is_short_name("gpt-4o-mini"));
        assert!(is_short_name("a.b:c_d-e"));
        assert!(!is_short_name(""));
        assert!(!is_short_name(&"x".repeat(65)));
        assert!(!is_short_name("has space"));
        assert!(!is_short_name("üml"));
        assert!(!is_short_name("quote\""));
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
                    tokens: Some([10, 5]),
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
                tokens: None
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
            match parse_batch(json.as_bytes(), BodyFormat::Json, 100, NOW) {
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
            match parse_batch(json.as_bytes(), BodyFormat::Json, 100, NOW) {
                Err(ParseError::Malformed { .. }) => {}
                other => panic!("{json:?}: expected malformed, got {other:?}"),
            }
        }
    }

    #[test]
    fn batch_errors_name_the_index() {
        let body =
            r#"[{"type":"limit_reached"},{"type":"limit_reached"},{"type":"message","role":"x"}]"#;
        match parse_batch(body.as_bytes(), BodyFormat::Json, 100, NOW) {
            Err(ParseError::Invalid { index: Some(2), .. }) => {}
            other => panic!("{other:?}"),
        }
        let body = r#"[{"type":"limit_reached"},{"type":"custom"}]"#;
        match parse_batch(body.as_bytes(), BodyFormat::Json, 100, NOW) {
            Err(ParseError::Invalid { index: Some(1), .. }) => {}
            other => panic!("{other:?}"),
        }
        let body = "{\"type\":\"limit_reached\"}\n\n{\"type\":\"limit_reached\"}\n{\"type\":1}\n";
        match parse_batch(body.as_bytes(), BodyFormat::Ndjson, 100, NOW) {
            Err(ParseError::Invalid { index: Some(2), .. }) => {}
            other => panic!("{other:?}"),
        }
        let body = "{\"type\":\"limit_reached\"}\n{oops\n";
        match parse_batch(body.as_bytes(), BodyFormat::Ndjson, 100, NOW) {
            Err(ParseError::Malformed { index: Some(1), .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn batch_size_is_capped() {
        let body = format!("[{}]", [r#"{"type":"limit_reached"}"#; 4].join(","));
        assert_eq!(
            parse_batch(body.as_bytes(), BodyFormat::Json, 4, NOW)
                .unwrap()
                .len(),
            4
        );
        assert!(matches!(
            parse_batch(body.as_bytes(), BodyFormat::Json, 3, NOW),
            Err(ParseError::TooLarge(_))
        ));
        let nd = [r#"{"type":"limit_reached"}"#; 4].join("\n");
        assert!(matches!(
            parse_batch(nd.as_bytes(), BodyFormat::Ndjson, 3, NOW),
            Err(ParseError::TooLarge(_))
        ));
    }

    #[test]
    fn user_ids_hash_alike_as_int_and_string() {
        let a = UserId::Int(-1234567890123);
        let b = UserId::Str("-1234567890123".into());
        assert_eq!(a.hash_bytes(|x| x.to_vec()), b.hash_bytes(|x| x.to_vec()));
        assert_eq!(UserId::Int(0).hash_bytes(|x| x.to_vec()), b"0");
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
