//! Black-box tests: the real application on port 0, real HTTP, a real
//! PostgreSQL (a fresh database per test) and real SQLite files.
//! One binary for every test file, so it links once.

mod helpers;

mod access;
mod active_users;
mod admin;
mod cluster;
mod cluster_users;
mod connections;
mod durability;
mod events;
mod exposition;
mod history;
mod many_bots;
mod page;
mod persistence;
mod process;
mod readme;
mod redis;
mod remote_write;
mod spend;
mod stack;
mod summary;
mod tls;
mod users;
