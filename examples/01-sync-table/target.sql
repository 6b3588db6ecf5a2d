-- Example 1, the target database: the copy of users.  No trigger: only the
-- handler writes here.
--
--   psql -d TARGET -f examples/01-sync-table/target.sql
--
-- The handler turns the source's JSON rows into this table's row type with
-- json_populate_record(NULL::users, ...): the column names must match the
-- source's (extra source columns are ignored).

CREATE TABLE IF NOT EXISTS users (
  id         bigint PRIMARY KEY,
  email      text,
  name       text,
  bio        text,
  updated_at timestamptz
);
