-- append-only points, one per series per history tick. sqlite has no
-- partitions: retention deletes by time, which the index makes cheap.
create table metrics_history (
    -- unix seconds
    recorded_at integer not null,
    metric      text    not null,
    bot         text    not null,
    labels      text    not null,
    value       real    not null
);

create index metrics_history_metric_bot_time on metrics_history (metric, bot, recorded_at);
create index metrics_history_time on metrics_history (recorded_at);
