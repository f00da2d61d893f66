-- bots and their ingest tokens, managed at runtime (/v1/admin/bots) and
-- seeded from --tokens at start. A token is stored only as the hex SHA-256
-- of its text; `prefix` (the hash's first 8 hex characters) names it in
-- the API and logs without revealing anything of it. Every replica reads
-- these tables again every --sync-interval, so a change on one reaches all.
create table bots (
    bot        text   not null primary key,
    -- unix seconds
    created_at bigint not null
);

create table bot_tokens (
    hash       text   not null primary key,
    bot        text   not null references bots (bot) on delete cascade,
    prefix     text   not null,
    -- unix seconds
    created_at bigint not null
);

create index bot_tokens_by_bot on bot_tokens (bot);
