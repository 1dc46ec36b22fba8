#!/usr/bin/env bash
# Runs once, when the official postgres image initialises a shard primary's empty data dir
# (mounted into /docker-entrypoint-initdb.d/): the replication role and its pg_hba line, the
# application role and the schema Weir's docker/weir.toml shards.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    --set=repl_password="$REPLICATION_PASSWORD" --set=app_password="$APP_PASSWORD" <<'SQL'
SET password_encryption = 'scram-sha-256';
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'repl_password';
CREATE ROLE app LOGIN PASSWORD :'app_password';
CREATE DATABASE shop OWNER app;
SQL

psql -v ON_ERROR_STOP=1 --username app --dbname shop <<'SQL'
-- Sharded by id (docker/weir.toml): shard i holds the ids PostgreSQL's
-- PARTITION BY HASH (id) would put in remainder i of 2.
CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL DEFAULT 0);
SQL

# The image's pg_hba.conf ends with `host all all all scram-sha-256`, which does not match
# replication connections; the replica's pg_basebackup and walreceiver need this line.
echo "host replication replicator all scram-sha-256" >>"$PGDATA/pg_hba.conf"
