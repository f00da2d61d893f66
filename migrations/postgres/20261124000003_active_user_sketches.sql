-- hyperloglog registers per bot and time bucket (hour or day): the only trace
-- of users that is stored. no user id is ever written anywhere.
create table active_user_sketches (
    bot          text        not null,
    granularity  text        not null check (granularity in ('hour', 'day')),
    -- unix seconds divided by the bucket length
    bucket       bigint      not null,
    registers    bytea       not null,
    last_updated timestamptz not null,
    primary key (bot, granularity, bucket)
);

-- "today" counters for the summary: the local day they count and the count.
create table daily_counters (
    bot          text        not null,
    name         text        not null,
    day          date        not null,
    value        bigint      not null,
    last_updated timestamptz not null,
    primary key (bot, name)
);
