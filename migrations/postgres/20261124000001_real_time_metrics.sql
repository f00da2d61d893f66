-- one row per series (metric name + labels), upserted by the flush task and
-- read back on start: this table is what a restart restores from. the
-- primary key is the only index the upsert and the restore need.
create table real_time_metrics (
    metric       text             not null,
    bot          text             not null,
    -- the series' labels other than bot, as a json object: {"role": "user"}
    labels       jsonb            not null,
    value        double precision not null,
    last_updated timestamptz      not null,
    primary key (metric, bot, labels)
);
