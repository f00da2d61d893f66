-- how far into each process's journal the store has applied, written in the
-- same transaction as the totals it covers: on start, only journal records
-- past this point are replayed, so nothing is counted twice.
create table journal_progress (
    journal      text    not null primary key,
    applied      integer not null,
    -- unix seconds
    last_updated integer not null
) without rowid;
