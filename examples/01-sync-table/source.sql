-- Example 1, the source database: the users table and a trigger that
-- announces every change on channel users_changed.
--
--   psql -d SOURCE -f examples/01-sync-table/source.sql
--
-- Payload (text, JSON):
--   {"op":"INSERT"|"UPDATE"|"DELETE"|"TRUNCATE", "seq":N, "id":"42",
--    "old_id":"41" (an UPDATE that changed the key), "row":{...} | null}
-- or, when that would be 8000 bytes or more (NOTIFY's limit):
--   {"op":..., "seq":N, "id":"42", "old_id":..., "keys_only":true}
-- and the handler reads the row from the source itself.
--
-- Ids travel as text, so that any key type (bigint, numeric, uuid) reaches
-- the handler exactly as the source wrote it.
--
-- "seq" makes every payload unique.  PostgreSQL delivers a notification
-- only once when the same channel gets the same payload twice in one
-- transaction, so without it UPDATE a->b->a in one transaction would reach
-- the handler as a->b, and DELETE, INSERT, DELETE of one id as DELETE, INSERT.

CREATE TABLE IF NOT EXISTS users (
  id         bigint PRIMARY KEY,
  email      text,
  name       text,
  bio        text,
  updated_at timestamptz
);

CREATE SEQUENCE IF NOT EXISTS users_changed_seq;

CREATE OR REPLACE FUNCTION users_changed_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  key     bigint;
  old_key bigint;
  seq     bigint := nextval('users_changed_seq');
  payload text;
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    PERFORM pg_notify('users_changed', json_build_object('op', TG_OP, 'seq', seq)::text);
    RETURN NULL;
  END IF;
  IF TG_OP = 'DELETE' THEN
    key := OLD.id;
  ELSE
    key := NEW.id;
  END IF;
  IF TG_OP = 'UPDATE' AND OLD.id IS DISTINCT FROM NEW.id THEN
    old_key := OLD.id;
  END IF;
  payload := json_build_object(
    'op', TG_OP, 'seq', seq, 'id', key::text, 'old_id', old_key::text,
    'row', CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE row_to_json(NEW) END)::text;
  -- NOTIFY refuses 8000 bytes or more, and would fail the writer's
  -- transaction: send the key alone instead.
  IF octet_length(payload) >= 8000 THEN
    payload := json_build_object(
      'op', TG_OP, 'seq', seq, 'id', key::text, 'old_id', old_key::text,
      'keys_only', true)::text;
  END IF;
  PERFORM pg_notify('users_changed', payload);
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS users_changed ON users;
CREATE TRIGGER users_changed
  AFTER INSERT OR UPDATE OR DELETE ON users
  FOR EACH ROW EXECUTE FUNCTION users_changed_notify();

DROP TRIGGER IF EXISTS users_truncated ON users;
CREATE TRIGGER users_truncated
  AFTER TRUNCATE ON users
  FOR EACH STATEMENT EXECUTE FUNCTION users_changed_notify();
