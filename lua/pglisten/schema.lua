--- The PostgreSQL side of durable channels: schema `pglisten`.
--
-- `sql` is plain SQL (no psql meta-commands) that a migration tool can run
-- as it is, inside its own transaction or as one multi-statement string.
-- It is idempotent, and safe to run from several sessions at once: an
-- advisory lock held to the end of the transaction serializes installers,
-- and every statement is CREATE ... IF NOT EXISTS or CREATE OR REPLACE.
-- `outbox.install(conn)` runs it.
-- @module pglisten.schema

local M = {}

--- Version of the schema this `sql` installs (also in the schema's comment).
M.version = 1

--- The installation script.
M.sql = [[
-- lua-pglisten durable channels, schema version 1.
--
-- Objects (schema pglisten):
--   pglisten.outbox   durable events waiting for the runner, claimed with
--                     SELECT ... FOR UPDATE SKIP LOCKED
--   pglisten.dead     events that failed max_attempts times (dead letters)
--   pglisten.publish(channel text, payload text) RETURNS bigint
--   pglisten.publish(channel text, payload jsonb) RETURNS bigint
--                     inserts into pglisten.outbox and, in the same
--                     transaction, wakes the runner with
--                     pg_notify('pglisten_outbox', channel); returns the id.
--                     The wake-up is sent only on COMMIT, like the row.
--   pglisten.notify_trigger()
--                     AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW
--                     trigger function that sends a JSON event per row.
--
-- Publishing from SQL:
--   SELECT pglisten.publish('emails', '{"to": "a@example.com"}');
--
-- Trigger arguments: channel, mode, then key columns (optional):
--   TG_ARGV[0]   channel name (case-preserving; NOTIFY channels at most 63 bytes)
--   TG_ARGV[1]   'notify'  : pg_notify(channel, event) -- lost when nobody listens
--                'durable' : pglisten.publish(channel, event) -- kept in the outbox
--   TG_ARGV[2..] key columns, sent instead of the whole row when a 'notify'
--                event would be 8000 bytes or more; default: the primary key.
--
--   CREATE TRIGGER users_sync
--     AFTER INSERT OR UPDATE OR DELETE ON users
--     FOR EACH ROW EXECUTE FUNCTION pglisten.notify_trigger('users_changed', 'notify', 'id');
--
--   CREATE TRIGGER orders_sync
--     AFTER INSERT OR UPDATE OR DELETE ON orders
--     FOR EACH ROW EXECUTE FUNCTION pglisten.notify_trigger('orders', 'durable');
--
-- The event (payload) is a JSON object:
--   {"op": "INSERT"|"UPDATE"|"DELETE", "schema": TG_TABLE_SCHEMA,
--    "table": TG_TABLE_NAME, "new": row or null, "old": row or null}
-- A 'notify' event of 8000 bytes or more is replaced by its keys, so that the
-- writer's transaction never fails on NOTIFY's size limit:
--   {"op": .., "schema": .., "table": .., "new": {"id": 1}, "old": null, "keys_only": true}
-- and, if even that is too large:
--   {"op": .., "schema": .., "table": .., "keys_only": true, "too_large": true}
-- 'durable' events always carry the whole row (the outbox has no size limit).

-- Serialize concurrent installers until the end of this transaction (run the
-- script as one transaction, or as one multi-statement string, which the
-- server runs as one).  Keys: 0x70676c69 ('pgli'), 1.
SELECT pg_catalog.pg_advisory_xact_lock(1885826153, 1);

CREATE SCHEMA IF NOT EXISTS pglisten;

COMMENT ON SCHEMA pglisten IS 'lua-pglisten durable channels, schema version 1';

CREATE TABLE IF NOT EXISTS pglisten.outbox (
  id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  channel     text NOT NULL,
  payload     text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  run_at      timestamptz NOT NULL DEFAULT now(),
  attempts    int NOT NULL DEFAULT 0,
  last_error  text
);

-- Claiming: WHERE channel = ANY(..) AND run_at <= now() ORDER BY id
CREATE INDEX IF NOT EXISTS outbox_claim_idx ON pglisten.outbox (channel, run_at, id);

CREATE TABLE IF NOT EXISTS pglisten.dead (
  id          bigint PRIMARY KEY,  -- the id it had in pglisten.outbox
  channel     text NOT NULL,
  payload     text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  run_at      timestamptz NOT NULL DEFAULT now(),
  attempts    int NOT NULL DEFAULT 0,
  last_error  text,
  failed_at   timestamptz DEFAULT now()
);

CREATE INDEX IF NOT EXISTS dead_channel_idx ON pglisten.dead (channel, id);

CREATE OR REPLACE FUNCTION pglisten.publish(channel text, payload text)
RETURNS bigint
LANGUAGE plpgsql
AS $pglisten$
DECLARE
  new_id bigint;
BEGIN
  IF publish.channel IS NULL OR publish.channel = '' THEN
    RAISE EXCEPTION 'pglisten.publish: the channel must be a non-empty string'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF publish.payload IS NULL THEN
    RAISE EXCEPTION 'pglisten.publish: the payload of channel "%" must not be NULL', publish.channel
      USING ERRCODE = 'null_value_not_allowed';
  END IF;
  INSERT INTO pglisten.outbox (channel, payload)
    VALUES (publish.channel, publish.payload)
    RETURNING pglisten.outbox.id INTO new_id;
  -- Delivered at COMMIT, and only then; identical wake-ups in one
  -- transaction are folded into one by the server.
  PERFORM pg_catalog.pg_notify('pglisten_outbox', publish.channel);
  RETURN new_id;
END
$pglisten$;

COMMENT ON FUNCTION pglisten.publish(text, text) IS
  'Inserts a durable event into pglisten.outbox and wakes the runner (NOTIFY pglisten_outbox, channel); returns its id';

CREATE OR REPLACE FUNCTION pglisten.publish(channel text, payload jsonb)
RETURNS bigint
LANGUAGE sql
AS $pglisten$
  SELECT pglisten.publish($1, $2::text)
$pglisten$;

COMMENT ON FUNCTION pglisten.publish(text, jsonb) IS
  'pglisten.publish(text, text) for a jsonb payload';

CREATE OR REPLACE FUNCTION pglisten.notify_trigger()
RETURNS trigger
LANGUAGE plpgsql
AS $pglisten$
DECLARE
  channel   text;
  mode      text;
  keys      text[];
  new_row   jsonb;
  old_row   jsonb;
  event     jsonb;
  payload   text;
BEGIN
  -- Misconfiguration is an error at trigger time, named clearly.
  IF TG_LEVEL <> 'ROW' OR TG_WHEN <> 'AFTER' THEN
    RAISE EXCEPTION 'pglisten.notify_trigger: trigger "%" on %.% must be AFTER ... FOR EACH ROW (it is % ... FOR EACH %)',
      TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_WHEN, TG_LEVEL
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF TG_NARGS < 2 THEN
    RAISE EXCEPTION 'pglisten.notify_trigger: trigger "%" on %.% needs the arguments (channel, mode[, key column...]), got % argument(s)',
      TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_NARGS
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  channel := TG_ARGV[0];
  mode := TG_ARGV[1];
  IF mode IS NULL OR mode NOT IN ('notify', 'durable') THEN
    RAISE EXCEPTION 'pglisten.notify_trigger: invalid mode "%" in trigger "%" on %.% (expected ''notify'' or ''durable'')',
      mode, TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF channel IS NULL OR channel = '' THEN
    RAISE EXCEPTION 'pglisten.notify_trigger: empty channel name in trigger "%" on %.%',
      TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  IF TG_OP <> 'DELETE' THEN new_row := to_jsonb(NEW); END IF;
  IF TG_OP <> 'INSERT' THEN old_row := to_jsonb(OLD); END IF;
  -- SQL NULL becomes JSON null in jsonb_build_object
  event := jsonb_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                              'new', new_row, 'old', old_row);

  IF mode = 'durable' THEN
    PERFORM pglisten.publish(channel, event::text);
    RETURN NULL;
  END IF;

  payload := event::text;
  IF octet_length(payload) >= 8000 THEN
    -- Too large for NOTIFY: send the keys only, never fail the writer.
    IF TG_NARGS > 2 THEN
      keys := TG_ARGV[2:TG_NARGS - 1];
    ELSE
      SELECT array_agg(a.attname::text ORDER BY k.ord) INTO keys
        FROM pg_catalog.pg_index i
        CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
       WHERE i.indrelid = TG_RELID AND i.indisprimary;
    END IF;
    payload := NULL;
    IF keys IS NOT NULL AND cardinality(keys) > 0 THEN
      event := jsonb_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
        'new', (SELECT jsonb_object_agg(k, coalesce(new_row -> k, 'null'::jsonb)) FROM unnest(keys) AS k
                 WHERE new_row IS NOT NULL),
        'old', (SELECT jsonb_object_agg(k, coalesce(old_row -> k, 'null'::jsonb)) FROM unnest(keys) AS k
                 WHERE old_row IS NOT NULL),
        'keys_only', true);
      payload := event::text;
    END IF;
    IF payload IS NULL OR octet_length(payload) >= 8000 THEN
      payload := jsonb_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                                    'keys_only', true, 'too_large', true)::text;
    END IF;
  END IF;
  PERFORM pg_catalog.pg_notify(channel, payload);
  RETURN NULL;
END
$pglisten$;

COMMENT ON FUNCTION pglisten.notify_trigger() IS
  'AFTER ... FOR EACH ROW trigger: notify_trigger(channel, ''notify''|''durable''[, key column...]) sends {op, schema, table, new, old}';
]]

return M
