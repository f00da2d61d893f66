-- one row per series (metric name + labels), written by the flush task and
-- read back on start: this table is what a restart restores from. the
-- primary key is the only index the flush and the restore need.
--
-- labels is text (a canonical json object, keys sorted), not jsonb: the
-- flush matches 10,000 keys per tick and text compares faster. cast it
-- (labels::jsonb) to query by label. fillfactor leaves room on each page so
-- the per-flush updates are heap-only (no index writes).
create table real_time_metrics (
    metric       text             not null,
    bot          text             not null,
    labels       text             not null,
    value        double precision not null,
    last_updated timestamptz      not null,
    primary key (metric, bot, labels)
) with (fillfactor = 50);
