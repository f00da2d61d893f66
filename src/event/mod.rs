//! Events as the bot sends them, and the checked domain types they become.
//!
//! Parse, don't validate: a `RawEvent` (`raw.rs`) is whatever serde read, an
//! [`Event`] is what may reach the registry. Every label value of an `Event`
//! is either a closed enum or a [`ShortName`], so nothing downstream checks
//! again. Strings borrow from the request body where they can, so a
//! well-formed event is parsed without allocating.
//!
//! This file holds the checked types and the limits they obey: what the rest
//! of the crate names. How a raw event becomes an `Event` is `raw.rs`; how a
//! request body becomes a batch of them is `batch.rs`.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

mod batch;
mod fast;
mod raw;

pub use batch::{BodyFormat, Events, parse_batch, parse_batch_serde};

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
/// `ttft_ms`: as `duration_ms`, one day.
pub const MAX_TTFT_MS: f64 = MAX_DURATION_MS;
/// `cost` of one call, in the configured currency: far above any single
/// LLM call, low enough that a sum of micro-units cannot overflow.
pub const MAX_COST: f64 = 1_000.0;
/// `db_queries` for one message.
pub const MAX_DB_QUERIES: u32 = 1_000_000;
/// A `custom` event's `value`.
pub const MAX_CUSTOM_VALUE: f64 = 1e12;

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

/// True when `s` may be used as a free-form label value or a bot name:
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

            /// The value named `text`, as the deserializer reads it.
            pub fn from_name(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
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
    TokenKind {
        Prompt => "prompt",
        Completion => "completion",
        Cached => "cached",
        CacheWrite => "cache_write",
        Reasoning => "reasoning",
    }
);
closed_enum!(
    /// Where a call's cost came from: the provider's figure in the event,
    /// or the price table.
    CostSource { Reported => "reported", Table => "table" }
);
closed_enum!(
    /// A `feedback` event's score: thumbs (−1 / +1) or a 1–5 rating, each
    /// its own label value, so a thumbs-up is never read as a rating of 1.
    Score {
        Down => "-1",
        Up => "+1",
        One => "1",
        Two => "2",
        Three => "3",
        Four => "4",
        Five => "5",
    }
);

impl Score {
    /// Whether the user liked the answer: a thumbs-up, or a rating of 4
    /// or 5 (the usual "top two boxes" of a five-point scale).
    pub fn is_positive(self) -> bool {
        matches!(self, Score::Up | Score::Four | Score::Five)
    }
}
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
        Feedback => "feedback",
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
                let v = n.unsigned_abs();
                // Every id serde reads fits 64 bits, whose division is
                // several times cheaper than 128-bit division per digit.
                match u64::try_from(v) {
                    Ok(mut v) => loop {
                        i -= 1;
                        buf[i] = b'0' + (v % 10) as u8;
                        v /= 10;
                        if v == 0 {
                            break;
                        }
                    },
                    Err(_) => {
                        let mut v = v;
                        loop {
                            i -= 1;
                            buf[i] = b'0' + (v % 10) as u8;
                            v /= 10;
                            if v == 0 {
                                break;
                            }
                        }
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
/// (the user book, the sketches and the journal), so a raw id never
/// outlives its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UserHash(pub u64);

/// The key user ids are hashed with: the installation's secret (see
/// `store::Store::secret`), shared by every replica through the store, so
/// every process hashes a user alike and nobody without the secret can
/// test a guessed id against a stored hash. SipHash-1-3 keyed with it.
#[derive(Clone)]
pub struct UserKey {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, not even in a debug print.
        f.write_str("UserKey(..)")
    }
}

/// The key compiled into versions before the installation secret: kept
/// only so tests can show that nothing stored is computable with it.
pub const LEGACY_USER_KEY: u128 = 0x6274_6d65_7472_6963_732d_686c_6c2d_7631;

impl UserKey {
    pub fn new(secret: [u8; 16]) -> Self {
        // As siphasher's `new_with_key` splits a 16-byte key: each half a
        // little-endian word.
        let key = u128::from_le_bytes(secret);
        UserKey {
            k0: key as u64,
            k1: (key >> 64) as u64,
        }
    }

    /// The fixed key of earlier versions (see [`LEGACY_USER_KEY`]).
    pub fn legacy() -> Self {
        Self::new(LEGACY_USER_KEY.to_be_bytes())
    }

    /// The keyed hash of `id`.
    pub fn hash(&self, id: &UserId<'_>) -> UserHash {
        UserHash(id.hash_bytes(|bytes| sip13_length_first(self.k0, self.k1, bytes)))
    }
}

/// SipHash-1-3 of `bytes.len()` as 8 little-endian bytes, then `bytes`:
/// what every stored user hash was computed as (the hyperloglockless
/// crate's seeded hasher, whose `hash_one(bytes)` is siphasher's streaming
/// `SipHasher13` fed the slice's length and then the slice), so the hashes
/// in stores, journals and Redis stay valid. In one pass with whole-word
/// loads, where the streaming hasher buffers its tail byte by byte: user
/// hashing was about 8 % of a batch's CPU. `tests::user_hashes_are_the_
/// streaming_hashers` holds the two to the same output.
fn sip13_length_first(k0: u64, k1: u64, bytes: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    let compress = |v: &mut [u64; 4], m: u64| {
        v[3] ^= m;
        round(v);
        v[0] ^= m;
    };
    compress(&mut v, bytes.len() as u64);
    let (words, tail) = bytes.as_chunks::<8>();
    for word in words {
        compress(&mut v, u64::from_le_bytes(*word));
    }
    let last = match (tail.len(), bytes.last_chunk::<8>()) {
        (0, _) => 0,
        // The last 8 bytes in one load, the ones already hashed shifted out.
        (t, Some(end)) => u64::from_le_bytes(*end) >> (64 - 8 * t),
        (t, None) => {
            let mut w = [0u8; 8];
            w[..t].copy_from_slice(tail);
            u64::from_le_bytes(w)
        }
    };
    // The length byte counts the 8 bytes of the length itself.
    compress(&mut v, last | ((bytes.len() as u64 + 8) & 0xff) << 56);
    v[2] ^= 0xff;
    round(&mut v);
    round(&mut v);
    round(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
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
        tokens: Option<Tokens>,
        /// Time to the first token of a streamed answer.
        ttft_seconds: Option<f64>,
        provider: Option<ShortName<'a>>,
        /// What the call cost: as reported, or priced from the table by
        /// `prices::Prices::price` before ingest journals it, so a replay
        /// counts what was acknowledged whatever the table says by then.
        /// `None` with tokens: unpriced.
        cost: Option<Cost>,
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
    Feedback {
        score: Score,
        reason: Option<ShortName<'a>>,
    },
    /// Not an event a bot posts: `DELETE /v1/users/{id}`, journaled like
    /// one so that the erasure survives a crash and replays in order.
    Forget,
    /// Not an event a bot posts either: `DELETE /v1/admin/bots/{bot}?wipe=true`,
    /// journaled alone in its record, so that a replay drops what the bot
    /// counted before it and the store's rows go at the next flush.
    Wipe,
}

/// A call's tokens. `prompt` includes `cached` and `cache_write`, as the
/// providers report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub cache_write: u64,
    pub reasoning: u64,
}

impl Tokens {
    /// Indexed like [`TokenKind::ALL`].
    pub fn by_kind(&self) -> [u64; 5] {
        [
            self.prompt,
            self.completion,
            self.cached,
            self.cache_write,
            self.reasoning,
        ]
    }

    pub fn total(&self) -> u64 {
        self.prompt
            .saturating_add(self.completion)
            .saturating_add(self.reasoning)
    }
}

/// A call's cost in integer micro-units of the currency (see `prices`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    pub micros: u64,
    pub source: CostSource,
}

impl Cost {
    /// A reported cost in currency units: the provider's decimal figure,
    /// to the nearest micro-unit.
    pub fn reported(cost: f64) -> Cost {
        Cost {
            micros: (cost * 1e6).round() as u64,
            source: CostSource::Reported,
        }
    }
}

/// The cache name used when a `cache` event names none.
pub const DEFAULT_CACHE: &str = "default";
/// The model label used when a `response` reports tokens but no model.
pub const UNKNOWN_MODEL: &str = "unknown";

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Found by `cargo mutants` (BENCHMARKS.md): an error message quotes a
    /// bad value cut to 80 characters, whole when shorter, never split in
    /// a character.
    #[test]
    fn a_bad_name_is_quoted_cut_to_80_characters() {
        let message = |value: &str| match ShortName::parse("kind", value.to_owned().into()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{value:?} is not a short name"),
        };
        assert!(
            message("has space").ends_with(r#"got "has space""#),
            "{}",
            message("has space")
        );
        let long = "ü".repeat(100);
        let quoted = format!("got {:?}", "ü".repeat(80));
        assert!(message(&long).ends_with(&quoted), "{}", message(&long));
    }

    /// Also found by `cargo mutants`: positive is a thumbs-up or a 4-5
    /// rating, and nothing else.
    #[test]
    fn positive_ratings_are_a_thumbs_up_and_the_top_two() {
        let positive: Vec<&str> = Score::ALL
            .iter()
            .filter(|s| s.is_positive())
            .map(|s| s.as_str())
            .collect();
        assert_eq!(positive, ["+1", "4", "5"]);
    }

    /// And: a `user_id` of the wrong type says what it must be.
    #[test]
    fn a_user_id_of_the_wrong_type_says_what_it_must_be() {
        let err = serde_json::from_str::<UserId<'_>>("true").unwrap_err();
        assert!(
            err.to_string()
                .contains("an integer or a string of 1-256 characters"),
            "{err}"
        );
    }

    /// The one-pass hash is the streaming hasher every stored user hash
    /// came from, for every length a user id can have (up to 256
    /// characters of up to 4 bytes), many keys, and integer ids.
    #[test]
    fn user_hashes_are_the_streaming_hashers() {
        use std::hash::BuildHasher;
        let mut rng = crate::testing::Rng(0x2545_F491_4F6C_DD1D);
        let mut next = || rng.next();
        let mut keys: Vec<[u8; 16]> = vec![[0; 16], [0xFF; 16], LEGACY_USER_KEY.to_be_bytes()];
        keys.extend((0..20).map(|_| {
            let mut k = [0u8; 16];
            k[..8].copy_from_slice(&next().to_le_bytes());
            k[8..].copy_from_slice(&next().to_le_bytes());
            k
        }));
        for key in keys {
            let streaming = hyperloglockless::DefaultHasher::seeded(&key);
            let ours = UserKey::new(key);
            for len in 0..=1030 {
                let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let want = streaming.hash_one(bytes.as_slice());
                assert_eq!(
                    sip13_length_first(ours.k0, ours.k1, &bytes),
                    want,
                    "length {len}"
                );
            }
            for n in [0i128, 7, -7, 123_456_789, i64::MIN.into(), u64::MAX.into()] {
                let id = UserId::Int(n);
                let want = id.hash_bytes(|b| streaming.hash_one(b));
                assert_eq!(ours.hash(&id).0, want, "id {n}");
            }
        }
    }

    #[test]
    fn user_ids_hash_alike_as_int_and_string() {
        let a = UserId::Int(-1234567890123);
        let b = UserId::Str("-1234567890123".into());
        assert_eq!(a.hash_bytes(|x| x.to_vec()), b.hash_bytes(|x| x.to_vec()));
        assert_eq!(UserId::Int(0).hash_bytes(|x| x.to_vec()), b"0");
    }
}
