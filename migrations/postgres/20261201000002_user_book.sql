-- The user book (see src/metrics/users.rs): per bot, per user, what new vs
-- returning users, retention and sessions need. `user_key` is the user id's
-- keyed hash under the installation secret, never the id. Written by each
-- flush for the users that changed, in the same transaction as the journal
-- position; rows of forgotten users are deleted in it.
create table user_book (
    bot              text     not null,
    user_key         bigint   not null,
    -- local day numbers, days since 1970-01-01 in --timezone
    first_day        bigint   not null,
    last_day         bigint   not null,
    -- bit i: active on first_day + i (i < 31)
    days             bigint   not null,
    -- unix seconds
    last_ts          bigint   not null,
    session_start    bigint   not null,
    session_messages bigint   not null,
    session_ended    bigint   not null,
    primary key (bot, user_key)
);
