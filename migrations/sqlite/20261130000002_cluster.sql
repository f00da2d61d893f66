-- cluster mode (--redis-url): the store is the record of the cluster, Redis
-- its cache. The replica holding the writer lease copies, in the same
-- transaction as the cluster totals in real_time_metrics, Redis' own
-- distinct-user sketches (raw HyperLogLog strings, restored as they are)
-- and how far Redis holds each replica's journal for each bot: after Redis
-- loses its data it is reseeded from these rows, and a replica that then
-- restarts replays exactly what the reseeded totals lack.
create table cluster_sketches (
    bot          text    not null,
    sketch       text    not null,
    hll          blob    not null,
    -- unix seconds
    last_updated integer not null,
    primary key (bot, sketch)
) without rowid;

create table cluster_progress (
    bot          text    not null,
    replica      text    not null,
    applied      integer not null,
    -- unix seconds
    last_updated integer not null,
    primary key (bot, replica)
) without rowid;
