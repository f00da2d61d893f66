-- append-only points, one per series per history tick. partitioned by day so
-- retention drops whole partitions instead of deleting rows; the server
-- creates partitions ahead of time (see Store::maintain).
create table metrics_history (
    recorded_at timestamptz      not null,
    metric      text             not null,
    bot         text             not null,
    labels      jsonb            not null,
    value       double precision not null
) partition by range (recorded_at);

-- every read names a metric and a time range, usually a bot too.
create index metrics_history_metric_bot_time on metrics_history (metric, bot, recorded_at);
