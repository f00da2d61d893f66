-- hyperloglog registers per bot and time bucket (hour or day). no user id is
-- ever stored.
create table active_user_sketches (
    bot          text    not null,
    granularity  text    not null check (granularity in ('hour', 'day')),
    bucket       integer not null,
    registers    blob    not null,
    last_updated integer not null,
    primary key (bot, granularity, bucket)
) without rowid;

-- "today" counters for the summary: the local day (yyyy-mm-dd) and count.
create table daily_counters (
    bot          text    not null,
    name         text    not null,
    day          text    not null,
    value        integer not null,
    last_updated integer not null,
    primary key (bot, name)
) without rowid;
