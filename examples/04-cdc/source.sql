-- Example 4, the source database: two tables with a foreign key between
-- them.  No trigger: the runner reads their changes from the WAL through a
-- logical replication slot and a publication, which it creates on its first
-- start (replication = { slot = ..., publication = ... } in handler.lua).
--
-- The server needs wal_level = logical (and free max_replication_slots /
-- max_wal_senders); the runner's role needs REPLICATION (or superuser),
-- ownership of the tables for CREATE PUBLICATION, and CREATE on the
-- database the first time (pglisten.slots, where the initial snapshot is
-- recorded as done).  See README.md.
CREATE TABLE users (
  id         bigint PRIMARY KEY,
  email      text NOT NULL,
  name       text NOT NULL,
  bio        text,                 -- large values are TOASTed: see pglisten.unchanged
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders (
  id         bigint PRIMARY KEY,
  user_id    bigint NOT NULL REFERENCES users ON DELETE CASCADE,
  amount     numeric(12, 2) NOT NULL,
  status     text NOT NULL DEFAULT 'new',
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON orders (user_id);

-- The other way out of pglisten.unchanged: the old row, whole, in every
-- UPDATE and DELETE (ev.old holds every column; more WAL per change).
--   ALTER TABLE users REPLICA IDENTITY FULL;
