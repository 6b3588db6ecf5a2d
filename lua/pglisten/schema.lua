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
--                     the capture trigger function: a JSON event per changed
--                     row, FOR EACH ROW or FOR EACH STATEMENT (below), and
--                     one per TRUNCATE.
--   pglisten.key_columns(regclass), pglisten.keys_only_event(...)
--                     its helpers: the primary key's columns, and the event
--                     that replaces one too large for NOTIFY.
--
-- Publishing from SQL:
--   SELECT pglisten.publish('emails', '{"to": "a@example.com"}');
--
-- Trigger arguments: channel, mode, then key columns (optional):
--   TG_ARGV[0]   channel name (case-preserving; NOTIFY channels at most 63 bytes)
--   TG_ARGV[1]   'notify'  : pg_notify(channel, event) -- lost when nobody listens
--                'durable' : into pglisten.outbox, and one wake-up
--                            (pg_notify('pglisten_outbox', channel)) -- kept
--   TG_ARGV[2..] key columns, sent instead of the whole row when a 'notify'
--                event would be 8000 bytes or more; default: the primary key.
--                A name the table has no column of is an error, raised in the
--                writer's statement the first time a keys-only event is due.
--
-- Row level: one trigger for all three kinds of change.
--   CREATE TRIGGER users_sync
--     AFTER INSERT OR UPDATE OR DELETE ON users
--     FOR EACH ROW EXECUTE FUNCTION pglisten.notify_trigger('users_changed', 'notify', 'id');
--
-- Statement level, set-based: one trigger per kind of change (PostgreSQL
-- allows transition tables on a trigger of one event only); any table names.
-- Each statement's events go out with one INSERT ... SELECT ('durable') or
-- one query ('notify'); they equal the row-level form's, in the same order.
--   CREATE TRIGGER orders_ins AFTER INSERT ON orders
--     REFERENCING NEW TABLE AS new_rows
--     FOR EACH STATEMENT EXECUTE FUNCTION pglisten.notify_trigger('orders', 'durable');
--   CREATE TRIGGER orders_upd AFTER UPDATE ON orders
--     REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
--     FOR EACH STATEMENT EXECUTE FUNCTION pglisten.notify_trigger('orders', 'durable');
--   CREATE TRIGGER orders_del AFTER DELETE ON orders
--     REFERENCING OLD TABLE AS old_rows
--     FOR EACH STATEMENT EXECUTE FUNCTION pglisten.notify_trigger('orders', 'durable');
--   CREATE TRIGGER orders_trunc AFTER TRUNCATE ON orders
--     FOR EACH STATEMENT EXECUTE FUNCTION pglisten.notify_trigger('orders', 'durable');
--
-- The event (payload) is a JSON object, in this order:
--   {"op": "INSERT"|"UPDATE"|"DELETE", "schema": TG_TABLE_SCHEMA,
--    "table": TG_TABLE_NAME, "new": row or null, "old": row or null}
--   {"op": "TRUNCATE", "schema": .., "table": ..}
-- A row is to_json(row): its columns in table order, each value as to_json
-- writes it (numeric with all its digits, float8 and float4 in their
-- shortest exact form, -0 kept, NaN and Infinity as strings, json columns
-- as stored, jsonb as jsonb writes it).
-- A 'notify' event of 8000 bytes or more is replaced by its keys, so that the
-- writer's transaction never fails on NOTIFY's size limit:
--   {"op": .., "schema": .., "table": .., "new": {"id": 1}, "old": null, "keys_only": true}
-- and, if even that is too large:
--   {"op": .., "schema": .., "table": .., "keys_only": true, "too_large": true}
-- 'durable' events always carry the whole row (the outbox has no size limit).
--
-- The statement-level form, precisely:
--   * Order: a transition table is read in the order PostgreSQL filled it,
--     the order the rows were changed, which is the order the row-level
--     trigger fires in.  Outbox ids are given in that order.
--   * UPDATE: OLD TABLE and NEW TABLE carry no link between a row's two
--     versions.  PostgreSQL appends both versions of each updated row to
--     them together, so the n-th old row is the n-th new row's previous
--     version; the trigger pairs them by that position (row_number() over
--     each, a full join on it).  So an UPDATE that changes the primary key,
--     or a table with no key at all, pairs rightly.  That both tables are
--     filled in step is how PostgreSQL 10 to 15 work, not a documented
--     promise; spec/13-capture-trigger_spec.lua checks it.
--   * A statement making several kinds of change (INSERT ... ON CONFLICT DO
--     UPDATE, MERGE) sends one group of events per kind, in the order
--     PostgreSQL fires those triggers (an upsert's updates first), where the
--     row-level form interleaves them.
--   * On a partitioned table, the statement trigger names the table the
--     statement ran on; a row-level trigger names the partition.  An UPDATE
--     that moves a row to another partition is an UPDATE to the statement
--     trigger, and a DELETE (old partition) then an INSERT (new partition)
--     to the row-level one: PostgreSQL fires those row triggers.
--   * The transition table names are read from pg_trigger once per
--     statement, and the statement is planned each time: for statements
--     that change one row each, the row-level form is cheaper.
--
-- Every function here runs with search_path = pg_catalog, pg_temp (a SET
-- clause), so that a writer's search_path, which the trigger runs under,
-- cannot put its own to_json, ||, unnest ... in place of the built-in ones.
-- A column of a type whose text depends on search_path (regclass, regtype)
-- is therefore written schema-qualified unless it is in pg_catalog.
-- notify_trigger also runs with extra_float_digits = 1 (floats in their
-- shortest exact form), IntervalStyle = postgres and bytea_output = hex,
-- whatever the writer's session set: a writer with extra_float_digits = 0
-- would otherwise send 0.1 + 0.2 as 0.3.  TimeZone is the writer's: a
-- timestamptz is written with the writer's offset (the same instant).
-- Privileges: the trigger runs as the writer.  In 'durable' mode a writer
-- needs USAGE on schema pglisten and INSERT on pglisten.outbox (no sequence
-- privilege: the id is an identity column); 'notify' mode and the keys-only
-- event need only EXECUTE on the functions (granted to PUBLIC by default).

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
SET search_path = pg_catalog, pg_temp
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
SET search_path = pg_catalog, pg_temp
AS $pglisten$
  SELECT pglisten.publish($1, $2::text)
$pglisten$;

COMMENT ON FUNCTION pglisten.publish(text, jsonb) IS
  'pglisten.publish(text, text) for a jsonb payload';

CREATE OR REPLACE FUNCTION pglisten.key_columns(rel regclass)
RETURNS text[]
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $pglisten$
  SELECT array_agg(a.attname::text ORDER BY k.ord)
    FROM pg_catalog.pg_index i
    CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
   WHERE i.indrelid = rel AND i.indisprimary
$pglisten$;

COMMENT ON FUNCTION pglisten.key_columns(regclass) IS
  'The primary key columns of a table, in key order (NULL without a primary key)';

-- The event sent instead of one of 8000 bytes or more: the key columns of
-- the new and old rows (JSON objects), or too_large when even that does not fit.
CREATE OR REPLACE FUNCTION pglisten.keys_only_event(op text, schema_name text, table_name text,
                                                    new_row json, old_row json, keys text[])
RETURNS text
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $pglisten$
DECLARE
  e     text;
  nokey text;
BEGIN
  -- A key column the row does not have would be sent as null, which names
  -- no row: a misconfigured trigger, an error (named, at trigger time).
  SELECT k INTO nokey FROM unnest(keys) AS k
   WHERE k NOT IN (SELECT json_object_keys(coalesce(new_row, old_row))) LIMIT 1;
  IF nokey IS NOT NULL THEN
    RAISE EXCEPTION 'pglisten.notify_trigger: key column "%" is not a column of %.%', nokey, schema_name, table_name
      USING ERRCODE = 'undefined_column',
            HINT = 'The trigger arguments after the mode are column names, spelled as the table has them.';
  END IF;
  IF cardinality(keys) > 0 THEN
    e := json_build_object('op', op, 'schema', schema_name, 'table', table_name,
      'new', (SELECT json_object_agg(k, new_row -> k) FROM unnest(keys) AS k WHERE new_row IS NOT NULL),
      'old', (SELECT json_object_agg(k, old_row -> k) FROM unnest(keys) AS k WHERE old_row IS NOT NULL),
      'keys_only', true)::text;
  END IF;
  IF octet_length(e) < 8000 THEN
    RETURN e;
  END IF;
  RETURN json_build_object('op', op, 'schema', schema_name, 'table', table_name,
                           'keys_only', true, 'too_large', true)::text;
END
$pglisten$;

COMMENT ON FUNCTION pglisten.keys_only_event(text, text, text, json, json, text[]) IS
  'The keys-only event of pglisten.notify_trigger for one too large for NOTIFY';

CREATE OR REPLACE FUNCTION pglisten.notify_trigger()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- the settings to_json's text depends on, at their defaults (see the header)
SET extra_float_digits = 1
SET IntervalStyle = 'postgres'
SET bytea_output = 'hex'
AS $pglisten$
DECLARE
  event     text;
  new_t     name;
  old_t     name;
  rows_sql  text;
  n         bigint;
BEGIN
  -- Row level, configured well: the hot path.  Each step is an assignment
  -- or an IF, whose expression PL/pgSQL evaluates without the executor
  -- (PERFORM would start a query for every row).  The event is built from
  -- to_json pieces: no jsonb, which would parse and re-encode every row.
  IF TG_LEVEL = 'ROW' AND TG_WHEN = 'AFTER' AND TG_ARGV[0] <> '' THEN
    event := '{"op":"' || TG_OP || '","schema":' || to_json(TG_TABLE_SCHEMA::text)
      || ',"table":' || to_json(TG_TABLE_NAME::text)
      || ',"new":' || coalesce(to_json(NEW)::text, 'null')
      || ',"old":' || coalesce(to_json(OLD)::text, 'null') || '}';
    IF TG_ARGV[1] = 'notify' THEN
      IF octet_length(event) >= 8000 THEN
        -- Too large for NOTIFY: send the keys only, never fail the writer.
        event := pglisten.keys_only_event(TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME, to_json(NEW), to_json(OLD),
          CASE WHEN TG_NARGS > 2 THEN TG_ARGV[2:TG_NARGS - 1] ELSE pglisten.key_columns(TG_RELID) END);
      END IF;
      IF octet_length(TG_ARGV[0]) > 63 THEN
        RAISE EXCEPTION 'pglisten.notify_trigger: channel "%" of trigger "%" on %.% is % bytes; a NOTIFY channel is at most 63 bytes',
          TG_ARGV[0], TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME, octet_length(TG_ARGV[0])
          USING ERRCODE = 'invalid_parameter_value', HINT = 'Use a shorter channel, or mode ''durable''.';
      END IF;
      IF pg_catalog.pg_notify(TG_ARGV[0], event) IS NULL THEN END IF;
      RETURN NULL;
    ELSIF TG_ARGV[1] = 'durable' THEN
      INSERT INTO pglisten.outbox (channel, payload) VALUES (TG_ARGV[0], event);
      -- identical wake-ups in one transaction are folded into one by the server
      IF pg_catalog.pg_notify('pglisten_outbox', TG_ARGV[0]) IS NULL THEN END IF;
      RETURN NULL;
    END IF;
  END IF;

  -- Misconfiguration is an error at trigger time, named clearly.
  IF TG_WHEN <> 'AFTER' THEN
    RAISE EXCEPTION 'pglisten.notify_trigger: trigger "%" on %.% must be AFTER ... FOR EACH ROW or FOR EACH STATEMENT (it is % ... FOR EACH %)',
      TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_WHEN, TG_LEVEL
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF TG_NARGS < 2 THEN
    RAISE EXCEPTION 'pglisten.notify_trigger: trigger "%" on %.% needs the arguments (channel, mode[, key column...]), got % argument(s)',
      TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_NARGS
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF TG_ARGV[1] NOT IN ('notify', 'durable') THEN
    RAISE EXCEPTION 'pglisten.notify_trigger: invalid mode "%" in trigger "%" on %.% (expected ''notify'' or ''durable'')',
      TG_ARGV[1], TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF TG_ARGV[0] = '' THEN
    RAISE EXCEPTION 'pglisten.notify_trigger: empty channel name in trigger "%" on %.%',
      TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF TG_ARGV[1] = 'notify' AND octet_length(TG_ARGV[0]) > 63 THEN
    RAISE EXCEPTION 'pglisten.notify_trigger: channel "%" of trigger "%" on %.% is % bytes; a NOTIFY channel is at most 63 bytes',
      TG_ARGV[0], TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME, octet_length(TG_ARGV[0])
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Use a shorter channel, or mode ''durable''.';
  END IF;

  -- Statement level.  TRUNCATE: one event for the table.
  IF TG_OP = 'TRUNCATE' THEN
    event := '{"op":"TRUNCATE","schema":' || to_json(TG_TABLE_SCHEMA::text)
      || ',"table":' || to_json(TG_TABLE_NAME::text) || '}';
    IF TG_ARGV[1] = 'durable' THEN
      INSERT INTO pglisten.outbox (channel, payload) VALUES (TG_ARGV[0], event);
      PERFORM pg_catalog.pg_notify('pglisten_outbox', TG_ARGV[0]);
    ELSE
      PERFORM pg_catalog.pg_notify(TG_ARGV[0], event);
    END IF;
    RETURN NULL;
  END IF;

  -- INSERT, UPDATE, DELETE: the whole statement's rows from its transition
  -- tables, whose names (the trigger's REFERENCING clause) PL/pgSQL does not
  -- expose: read them once per statement.
  SELECT t.tgnewtable, t.tgoldtable INTO new_t, old_t
    FROM pg_catalog.pg_trigger t WHERE t.tgrelid = TG_RELID AND t.tgname = TG_NAME;
  IF (TG_OP <> 'DELETE' AND new_t IS NULL) OR (TG_OP <> 'INSERT' AND old_t IS NULL) THEN
    RAISE EXCEPTION 'pglisten.notify_trigger: statement-level % trigger "%" on %.% needs %',
      TG_OP, TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME,
      CASE TG_OP WHEN 'INSERT' THEN 'REFERENCING NEW TABLE AS name'
                 WHEN 'DELETE' THEN 'REFERENCING OLD TABLE AS name'
                 ELSE 'REFERENCING OLD TABLE AS name NEW TABLE AS name' END
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Create one statement-level trigger per event, or a row-level trigger for all three.';
  END IF;
  -- (n, o): the new and the old row as JSON text, in the statement's order.
  -- An UPDATE's two versions of a row are paired by their position in the
  -- two transition tables (see the header of this script).  The whole row
  -- is r.*: a bare r would be the table's column of that name, if it has one.
  rows_sql := CASE TG_OP
    WHEN 'INSERT' THEN format('SELECT to_json(r.*)::text AS n, NULL::text AS o FROM %I AS r', new_t)
    WHEN 'DELETE' THEN format('SELECT NULL::text AS n, to_json(r.*)::text AS o FROM %I AS r', old_t)
    ELSE format('SELECT nr.j AS n, orow.j AS o
                   FROM (SELECT row_number() OVER () AS i, to_json(r.*)::text AS j FROM %I AS r) AS nr
                   FULL JOIN (SELECT row_number() OVER () AS i, to_json(r.*)::text AS j FROM %I AS r) AS orow
                  USING (i) ORDER BY i', new_t, old_t)
  END;
  -- the event up to the new row: the same text as the row level's
  event := '{"op":"' || TG_OP || '","schema":' || to_json(TG_TABLE_SCHEMA::text)
    || ',"table":' || to_json(TG_TABLE_NAME::text) || ',"new":';

  IF TG_ARGV[1] = 'durable' THEN
    EXECUTE format($sql$
      INSERT INTO pglisten.outbox (channel, payload)
      SELECT $1, $2 || coalesce(r.n, 'null') || ',"old":' || coalesce(r.o, 'null') || '}'
        FROM (%s) AS r$sql$, rows_sql)
      USING TG_ARGV[0], event;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
      PERFORM pg_catalog.pg_notify('pglisten_outbox', TG_ARGV[0]);
    END IF;
    RETURN NULL;
  END IF;

  -- 'notify': one pg_notify per row, in order; an event too large for
  -- NOTIFY is replaced by its keys (the primary key's columns are looked up
  -- at most once per statement, and only if needed: an InitPlan).
  EXECUTE format($sql$
    SELECT count(pg_catalog.pg_notify($1,
             CASE WHEN octet_length(e.event) < 8000 THEN e.event
                  ELSE pglisten.keys_only_event($3, $4, $5, e.n::json, e.o::json,
                                                coalesce($6, (SELECT pglisten.key_columns($7)))) END))
      FROM (SELECT $2 || coalesce(r.n, 'null') || ',"old":' || coalesce(r.o, 'null') || '}' AS event, r.n, r.o
              FROM (%s) AS r OFFSET 0) AS e$sql$, rows_sql)
    INTO n
    USING TG_ARGV[0], event, TG_OP, TG_TABLE_SCHEMA::text, TG_TABLE_NAME::text,
          CASE WHEN TG_NARGS > 2 THEN TG_ARGV[2:TG_NARGS - 1] END, TG_RELID::regclass;
  RETURN NULL;
END
$pglisten$;

COMMENT ON FUNCTION pglisten.notify_trigger() IS
  'AFTER ... FOR EACH ROW, or FOR EACH STATEMENT with transition tables, or AFTER TRUNCATE: notify_trigger(channel, ''notify''|''durable''[, key column...]) sends {op, schema, table, new, old} per row';

-- Dead letters back into the outbox (lua-pglisten outbox replay calls it):
--   SELECT pglisten.replay();                          -- every dead letter
--   SELECT pglisten.replay(channel => 'emails');       -- one channel's
--   SELECT pglisten.replay(ids => ARRAY[41, 42]);      -- these ids
-- Each goes back with attempts = 0, run_at = now(), its created_at and
-- last_error kept, and under the id it had (OVERRIDING SYSTEM VALUE), so it
-- keeps its place in id order, the order events are claimed in.  Should
-- the outbox hold that id already (an identity reset), it gets a new id.
-- The dead rows are deleted first (their row locks make a concurrent replay
-- of the same ids wait, then find nothing); the events become claimable
-- when the caller's transaction commits, and the wake-up goes out then.
-- Returns how many were replayed.
CREATE OR REPLACE FUNCTION pglisten.replay(ids bigint[] DEFAULT NULL, channel text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
AS $pglisten$
DECLARE
  n bigint;
  chans text[];
BEGIN
  -- one statement: every part sees the same snapshot, and the ids the
  -- first INSERT could not keep go to the second, which gives new ones
  WITH moved AS (
    DELETE FROM pglisten.dead d
     WHERE (replay.ids IS NULL OR d.id = ANY(replay.ids))
       AND (replay.channel IS NULL OR d.channel = replay.channel)
    RETURNING d.id, d.channel, d.payload, d.created_at, d.last_error
  ), kept AS (
    INSERT INTO pglisten.outbox (id, channel, payload, created_at, run_at, attempts, last_error)
      OVERRIDING SYSTEM VALUE
    SELECT m.id, m.channel, m.payload, m.created_at, now(), 0, m.last_error FROM moved m ORDER BY m.id
    ON CONFLICT (id) DO NOTHING
    RETURNING pglisten.outbox.id
  ), renumbered AS (
    INSERT INTO pglisten.outbox (channel, payload, created_at, run_at, attempts, last_error)
    SELECT m.channel, m.payload, m.created_at, now(), 0, m.last_error
      FROM moved m WHERE m.id NOT IN (SELECT k.id FROM kept k) ORDER BY m.id
    RETURNING pglisten.outbox.id
  )
  SELECT count(*), array_agg(DISTINCT m.channel) INTO n, chans FROM moved m; -- (kept, renumbered: run to completion)
  FOR i IN 1 .. coalesce(cardinality(chans), 0) LOOP
    PERFORM pg_catalog.pg_notify('pglisten_outbox', chans[i]);
  END LOOP;
  RETURN n;
END
$pglisten$;

COMMENT ON FUNCTION pglisten.replay(bigint[], text) IS
  'Moves dead letters (these ids, this channel, or all) back into pglisten.outbox with attempts = 0 and wakes the runners; returns how many';

-- Backfills (lua-pglisten backfill): the key of the last page handled, per
-- table, channel and WHERE text, so that a killed backfill resumes there.
CREATE TABLE IF NOT EXISTS pglisten.backfill (
  table_name  text NOT NULL,
  channel     text NOT NULL,
  where_sql   text NOT NULL DEFAULT '',
  last_key    jsonb,                 -- the primary key of the last row handled, NULL: none yet
  rows_done   bigint NOT NULL DEFAULT 0,
  started_at  timestamptz NOT NULL DEFAULT now(),
  updated_at  timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz,
  PRIMARY KEY (table_name, channel, where_sql)
);
]]

return M
