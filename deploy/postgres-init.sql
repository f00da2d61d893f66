-- Run by the postgres image once, when its data volume is first
-- initialised (compose.yaml mounts it into /docker-entrypoint-initdb.d/):
-- the database of the "cluster" profile's replicas, apart from the single
-- process's "botmetrics", so the two never share a store.
create database botmetrics_cluster owner botmetrics;
