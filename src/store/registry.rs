//! The bot registry's SQL (tables `bots`, `bot_tokens`), both dialects side
//! by side: the statements are small and differ only in placeholders.
//! Registry writes go through the pool, not the writer lease: any replica
//! may take an admin call, and the registry is not part of a flush.

use sqlx::Row;

use super::{Db, Result};

/// One stored token: its hash (hex SHA-256), bot and prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub hash: String,
    pub bot: String,
    pub prefix: String,
    pub created_at: i64,
}

/// Everything the registry holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryRows {
    /// `(bot, created_at)`, ordered by name.
    pub bots: Vec<(String, i64)>,
    pub tokens: Vec<TokenRow>,
}

macro_rules! on_db {
    ($db:expr, $pg:literal, $lite:literal, |$q:ident| $bind:expr) => {
        match $db {
            Db::Postgres(pool) => {
                let $q = sqlx::query($pg);
                $bind.execute(pool).await?.rows_affected()
            }
            Db::Sqlite(pool) => {
                let $q = sqlx::query($lite);
                $bind.execute(pool).await?.rows_affected()
            }
        }
    };
}

pub(super) async fn load(db: &Db) -> Result<RegistryRows> {
    const BOTS: &str = "select bot, created_at from bots order by bot";
    const TOKENS: &str =
        "select hash, bot, prefix, created_at from bot_tokens order by created_at, hash";
    let (bots, tokens) = match db {
        Db::Postgres(pool) => (
            sqlx::query(BOTS).fetch_all(pool).await?,
            sqlx::query(TOKENS).fetch_all(pool).await?,
        )
            .map_rows(),
        Db::Sqlite(pool) => (
            sqlx::query(BOTS).fetch_all(pool).await?,
            sqlx::query(TOKENS).fetch_all(pool).await?,
        )
            .map_rows(),
    }?;
    Ok(RegistryRows { bots, tokens })
}

type Decoded = (Vec<(String, i64)>, Vec<TokenRow>);

trait MapRows {
    fn map_rows(self) -> Result<Decoded>;
}

impl<R: Row> MapRows for (Vec<R>, Vec<R>)
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    fn map_rows(self) -> Result<Decoded> {
        let bots = self
            .0
            .iter()
            .map(|r| Ok((r.try_get("bot")?, r.try_get("created_at")?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let tokens = self
            .1
            .iter()
            .map(|r| {
                Ok(TokenRow {
                    hash: r.try_get("hash")?,
                    bot: r.try_get("bot")?,
                    prefix: r.try_get("prefix")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok((bots, tokens))
    }
}

/// Inserts a bot; `false` when it exists already.
pub(super) async fn insert_bot(db: &Db, bot: &str, now: i64) -> Result<bool> {
    let n = on_db!(
        db,
        "insert into bots (bot, created_at) values ($1, $2) on conflict (bot) do nothing",
        "insert into bots (bot, created_at) values (?1, ?2) on conflict (bot) do nothing",
        |q| q.bind(bot).bind(now)
    );
    Ok(n == 1)
}

/// Inserts a token of an existing bot; `false` when the hash exists already.
pub(super) async fn insert_token(db: &Db, row: &TokenRow) -> Result<bool> {
    let n = on_db!(
        db,
        "insert into bot_tokens (hash, bot, prefix, created_at) select $1, bot, $3, $4 from bots where bot = $2 on conflict (hash) do nothing",
        "insert into bot_tokens (hash, bot, prefix, created_at) select ?1, bot, ?3, ?4 from bots where bot = ?2 on conflict (hash) do nothing",
        |q| q
            .bind(&row.hash)
            .bind(&row.bot)
            .bind(&row.prefix)
            .bind(row.created_at)
    );
    Ok(n == 1)
}

/// Deletes one token by its hash; `false` when it was not there.
pub(super) async fn delete_token(db: &Db, hash: &str) -> Result<bool> {
    let n = on_db!(
        db,
        "delete from bot_tokens where hash = $1",
        "delete from bot_tokens where hash = ?1",
        |q| q.bind(hash)
    );
    Ok(n == 1)
}

/// Deletes a bot and its tokens; `false` when it was not there.
pub(super) async fn delete_bot(db: &Db, bot: &str) -> Result<bool> {
    on_db!(
        db,
        "delete from bot_tokens where bot = $1",
        "delete from bot_tokens where bot = ?1",
        |q| q.bind(bot)
    );
    let n = on_db!(
        db,
        "delete from bots where bot = $1",
        "delete from bots where bot = ?1",
        |q| q.bind(bot)
    );
    Ok(n == 1)
}
