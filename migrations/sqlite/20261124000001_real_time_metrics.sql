-- one row per series (metric name + labels), upserted by the flush task and
-- read back on start. the primary key is the only index needed.
create table real_time_metrics (
    metric       text not null,
    bot          text not null,
    -- the series' labels other than bot, as a canonical json object
    labels       text not null,
    value        real not null,
    -- unix seconds
    last_updated integer not null,
    primary key (metric, bot, labels)
) without rowid;
