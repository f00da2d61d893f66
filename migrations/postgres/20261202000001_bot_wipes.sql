-- Bots wiped (DELETE /v1/admin/bots/{bot}?wipe=true), with the wipe's
-- generation (unix milliseconds): the flush that deletes a bot's rows
-- records it in the same transaction, so a later writer that learns of the
-- same wipe (cluster mode: every replica does) deletes nothing twice, and
-- never the rows of a bot created again under the name since.
create table bot_wipes (
    bot        text   not null primary key,
    generation bigint not null
);
