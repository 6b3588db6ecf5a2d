-- Example 2, the central database: accounts, and a trigger that announces
-- every change on channel account_changed.
--
--   psql -d CENTRAL -f examples/02-fan-out-accounts/central.sql
--
-- Payload (text, JSON): {"op":"INSERT"|"UPDATE"|"DELETE", "seq":N, "id":"42",
-- "row":{...} | null}.  The id travels as text (any key type arrives exactly
-- as the source wrote it); "seq" keeps two changes of one transaction from
-- having the same payload, which PostgreSQL would deliver only once.
-- A NOTIFY payload must stay under 8000 bytes: the CHECKs keep an account
-- row well below that (example 1 shows what to do with large rows).

CREATE TABLE IF NOT EXISTS accounts (
  id         bigint PRIMARY KEY,
  name       text NOT NULL CHECK (octet_length(name) <= 200),
  plan       text NOT NULL DEFAULT 'free' CHECK (octet_length(plan) <= 50),
  balance    numeric(14, 2) NOT NULL DEFAULT 0,
  active     boolean NOT NULL DEFAULT true,
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE SEQUENCE IF NOT EXISTS account_changed_seq;

CREATE OR REPLACE FUNCTION account_changed_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('account_changed', json_build_object(
    'op', TG_OP,
    'seq', nextval('account_changed_seq'),
    'id', CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END::text,
    'row', CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE row_to_json(NEW) END)::text);
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS account_changed ON accounts;
CREATE TRIGGER account_changed
  AFTER INSERT OR UPDATE OR DELETE ON accounts
  FOR EACH ROW EXECUTE FUNCTION account_changed_notify();
