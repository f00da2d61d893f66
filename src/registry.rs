//! The bots and their ingest tokens: who may post events as which bot.
//!
//! The registry lives in the store (tables `bots`, `bot_tokens`), so it
//! survives restarts and every replica on one store shares it. Each process
//! holds a snapshot in memory (the hot path reads only that) and reads the
//! store again after each change it makes and every `--sync-interval`, so
//! a change made on one replica reaches every other within one interval.
//!
//! A token is kept only as its SHA-256: the store, the snapshot and the
//! logs never hold one. A token is named by its *prefix*, the first 8 hex
//! characters of that hash, which reveals nothing of the token.
//!
//! `--tokens` seeds the registry at start: its bots and tokens are added
//! when missing, never removed; what the admin API added stays. A token the
//! flag gives to one bot but the store holds for another stops the start.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::config::Tokens;
use crate::metrics::Metrics;
use crate::store::registry::{RegistryRows, TokenRow};
use crate::store::{Store, StoreError};

/// Random bytes in a generated token (hex-encoded after `bm_`).
const TOKEN_BYTES: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no bot `{0}`")]
    UnknownBot(String),
    #[error("bot `{0}` exists already")]
    Duplicate(String),
    #[error("bot `{bot}` has no token with prefix `{prefix}`")]
    UnknownToken { bot: String, prefix: String },
    #[error(
        "--tokens: a token of bot `{flag}` is registered to bot `{stored}` in the store; give it to one bot only (or remove it: DELETE /v1/admin/bots/{stored}/tokens/{prefix})"
    )]
    Disagree {
        flag: String,
        stored: String,
        prefix: String,
    },
    #[error("the operating system gave no random bytes")]
    Random,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A bot as the admin API lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BotInfo {
    pub bot: String,
    pub created_at: i64,
    /// Its tokens' prefixes, oldest first.
    pub tokens: Vec<String>,
}

/// What the snapshot answers: the bot of a token's hash, and the listing.
#[derive(Debug, Default)]
struct Snapshot {
    by_hash: HashMap<[u8; 32], Arc<str>>,
    bots: Vec<BotInfo>,
}

impl Snapshot {
    fn of_rows(rows: &RegistryRows) -> Snapshot {
        let mut bots: Vec<BotInfo> = rows
            .bots
            .iter()
            .map(|(bot, created_at)| BotInfo {
                bot: bot.clone(),
                created_at: *created_at,
                tokens: Vec::new(),
            })
            .collect();
        let mut by_hash = HashMap::new();
        let names: HashMap<&str, Arc<str>> = rows
            .bots
            .iter()
            .map(|(b, _)| (b.as_str(), Arc::from(b.as_str())))
            .collect();
        for t in &rows.tokens {
            let (Some(name), Some(hash)) = (names.get(t.bot.as_str()), unhex(&t.hash)) else {
                continue;
            };
            by_hash.insert(hash, name.clone());
            if let Some(info) = bots.iter_mut().find(|b| b.bot == t.bot) {
                info.tokens.push(t.prefix.clone());
            }
        }
        Snapshot { by_hash, bots }
    }

    /// The snapshot of `--tokens` alone, served until the store answers.
    fn of_flag(tokens: &Tokens) -> Snapshot {
        let mut rows = RegistryRows::default();
        for bot in tokens.bots() {
            rows.bots.push((bot.to_string(), 0));
        }
        for (token, bot) in tokens.pairs() {
            rows.tokens.push(token_row(bot, token, 0));
        }
        Snapshot::of_rows(&rows)
    }
}

/// The bots, their tokens, and where they are kept.
pub struct Registry {
    /// `botmetrics_admin_requests_total{action,outcome}`.
    calls: prometheus::IntCounterVec,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    seed: Tokens,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Whether the store has been read (and `--tokens` written to it).
    seeded: tokio::sync::Mutex<bool>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry that answers from `--tokens` until [`Registry::refresh`]
    /// first reads the store.
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        seed: Tokens,
    ) -> prometheus::Result<Registry> {
        let snapshot = RwLock::new(Arc::new(Snapshot::of_flag(&seed)));
        let calls = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "botmetrics_admin_requests_total",
                "Admin API calls (/v1/admin/bots) by action and outcome (ok, or the error code).",
            ),
            &["action", "outcome"],
        )?;
        metrics.registry.register(Box::new(calls.clone()))?;
        Ok(Registry {
            calls,
            store,
            metrics,
            seed,
            snapshot,
            seeded: tokio::sync::Mutex::new(false),
        })
    }

    /// Counts one admin call.
    pub fn count(&self, action: &str, outcome: &str) {
        self.calls.with_label_values(&[action, outcome]).inc();
    }

    fn current(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The bot a bearer token belongs to.
    pub fn bot_for(&self, token: &str) -> Option<Arc<str>> {
        let hash = sha256(token);
        let snapshot = self.current();
        let (stored, bot) = snapshot.by_hash.get_key_value(&hash)?;
        // The map found it by the hash; the constant-time check is the one
        // a hand-written `==` on secrets would otherwise be.
        bool::from(stored.ct_eq(&hash)).then(|| bot.clone())
    }

    /// True while no token at all is registered.
    pub fn is_empty(&self) -> bool {
        self.current().by_hash.is_empty()
    }

    pub fn bots(&self) -> Vec<BotInfo> {
        self.current().bots.clone()
    }

    /// Reads the store into the snapshot (writing `--tokens` into it the
    /// first time) and counts every bot it names. On error the snapshot in
    /// use stays.
    pub async fn refresh(&self) -> Result<(), RegistryError> {
        let mut seeded = self.seeded.lock().await;
        if !*seeded {
            self.store.migrate().await?;
            self.write_seed().await?;
            *seeded = true;
        }
        let rows = self.store.load_registry().await?;
        let snapshot = Snapshot::of_rows(&rows);
        for info in &snapshot.bots {
            if self.metrics.bot(&info.bot).is_none() {
                self.metrics.add_bot(&info.bot);
            }
        }
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
        Ok(())
    }

    async fn write_seed(&self) -> Result<(), RegistryError> {
        let now = chrono::Utc::now().timestamp();
        for bot in self.seed.bots() {
            self.store.insert_bot(bot, now).await?;
        }
        let stored = self.store.load_registry().await?;
        for (token, bot) in self.seed.pairs() {
            let row = token_row(bot, token, now);
            match stored.tokens.iter().find(|t| t.hash == row.hash) {
                Some(t) if t.bot != row.bot => {
                    return Err(RegistryError::Disagree {
                        flag: row.bot,
                        stored: t.bot.clone(),
                        prefix: t.prefix.clone(),
                    });
                }
                Some(_) => {}
                None => {
                    self.store.insert_token(&row).await?;
                }
            }
        }
        Ok(())
    }

    /// Creates a bot with one new token; the token is returned, once.
    pub async fn create(&self, bot: &str) -> Result<(String, String), RegistryError> {
        self.refresh().await?;
        let now = chrono::Utc::now().timestamp();
        if !self.store.insert_bot(bot, now).await? {
            return Err(RegistryError::Duplicate(bot.to_owned()));
        }
        let issued = self.issue(bot, now).await;
        self.refresh().await?;
        issued
    }

    /// Adds a token to an existing bot (rotation: both stay valid until the
    /// old one is revoked).
    pub async fn add_token(&self, bot: &str) -> Result<(String, String), RegistryError> {
        self.refresh().await?;
        self.known(bot)?;
        let issued = self.issue(bot, chrono::Utc::now().timestamp()).await;
        self.refresh().await?;
        issued
    }

    async fn issue(&self, bot: &str, now: i64) -> Result<(String, String), RegistryError> {
        let token = new_token()?;
        let row = token_row(bot, &token, now);
        if !self.store.insert_token(&row).await? {
            // The bot went between the check and the insert (another
            // replica revoked it): nothing was written.
            return Err(RegistryError::UnknownBot(bot.to_owned()));
        }
        Ok((token, row.prefix))
    }

    /// Revokes one token of a bot by its prefix.
    pub async fn revoke_token(&self, bot: &str, prefix: &str) -> Result<(), RegistryError> {
        self.refresh().await?;
        self.known(bot)?;
        let rows = self.store.load_registry().await?;
        let unknown = || RegistryError::UnknownToken {
            bot: bot.to_owned(),
            prefix: prefix.to_owned(),
        };
        let hash = rows
            .tokens
            .iter()
            .find(|t| t.bot == bot && t.prefix == prefix)
            .map(|t| t.hash.clone())
            .ok_or_else(unknown)?;
        self.store.delete_token(&hash).await?;
        self.refresh().await
    }

    /// Revokes a bot and every token of it: its ingestion is refused from
    /// the moment this returns (on this replica).
    pub async fn revoke_bot(&self, bot: &str) -> Result<(), RegistryError> {
        self.refresh().await?;
        self.known(bot)?;
        self.store.delete_bot(bot).await?;
        self.refresh().await
    }

    fn known(&self, bot: &str) -> Result<(), RegistryError> {
        if self.current().bots.iter().any(|b| b.bot == bot) {
            Ok(())
        } else {
            Err(RegistryError::UnknownBot(bot.to_owned()))
        }
    }
}

fn token_row(bot: &str, token: &str, now: i64) -> TokenRow {
    let hash = hex(&sha256(token));
    TokenRow {
        prefix: hash[..8].to_owned(),
        hash,
        bot: bot.to_owned(),
        created_at: now,
    }
}

/// The prefix that names a token: the first 8 hex characters of its
/// SHA-256 (`printf %s "$TOKEN" | sha256sum | cut -c1-8`).
pub fn prefix_of(token: &str) -> String {
    hex(&sha256(token))[..8].to_owned()
}

fn sha256(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// `bm_` and 48 hex characters from the OS's random source.
fn new_token() -> Result<String, RegistryError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| RegistryError::Random)?;
    Ok(format!("bm_{}", hex(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Compares two secrets in constant time (for `--admin-token` and
/// `--metrics-token`).
pub fn same_secret(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_named_by_their_hash() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_ne!(a, b);
        assert!(
            a.starts_with("bm_") && a.len() == 3 + 2 * TOKEN_BYTES,
            "{a}"
        );
        let row = token_row("bot", "secret", 1);
        assert_eq!(
            row.hash,
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
        assert_eq!(row.prefix, "2bb80d53");
        assert_eq!(unhex(&row.hash), Some(sha256("secret")));
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
