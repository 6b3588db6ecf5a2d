--- Example 1: keeps the users table of TARGET_URL equal to the one of
-- SOURCE_URL.
--
--   SOURCE_URL=postgres://.../app TARGET_URL=postgres://.../copy \
--     lua-pglisten --db "$SOURCE_URL" examples/01-sync-table/handler.lua
--
-- Each notification on users_changed (see source.sql) is applied to the
-- target: an upsert keyed by id, or a delete.  A notification that carries
-- only the key (the row was too large for NOTIFY) makes the handler read the
-- row from the source.  Notifications sent while the runner is not
-- listening are lost, so after every (re)connect on_connect resyncs: it
-- copies every source row into the target and deletes the target rows the
-- source no longer has, in batches.
--
-- Everything is idempotent, so replaying an event, or an event the resync
-- already covered, does no harm.  Events are applied in commit order and
-- each carries the row as it was committed, so the target converges on the
-- source.  Values always travel as $n parameters; rows travel as JSON text
-- that the server parses (json_populate_record), so that bigints and
-- timestamps keep every digit.

local pg = require "pglisten"
local logmod = require "pglisten.log"

local SOURCE_URL = os.getenv("SOURCE_URL")
local TARGET_URL = os.getenv("TARGET_URL")
if not SOURCE_URL or not TARGET_URL then
  error("set SOURCE_URL and TARGET_URL (conninfo strings or postgres:// URIs)", 0)
end

-- Rows per resync batch (each batch is one read and two writes).
local RESYNC_BATCH = math.tointeger(tonumber(os.getenv("RESYNC_BATCH") or "")) or 500

local log = logmod.new()

---------------------------------------------------------------------------
-- Connections: lazy, so that the script loads while a database is down (at
-- boot, say).  Each connects on its first query; one that cannot fails with
-- SQLSTATE 08001 and the channel's retry tries again.  Afterwards a broken
-- connection reconnects by itself on its next use.
---------------------------------------------------------------------------

local conns = {
  source = assert(pg.connect(SOURCE_URL, { lazy = true })),
  target = assert(pg.connect(TARGET_URL, { lazy = true })),
}

-- Runs a query on "source" or "target"; raises on error.
local function exec(name, sql, ...)
  local rows, err, code = conns[name]:exec(sql, ...)
  if not rows then
    error(("%s: %s%s"):format(name, err, code and (" [" .. code .. "]") or ""), 0)
  end
  return rows
end

---------------------------------------------------------------------------
-- SQL
---------------------------------------------------------------------------

-- An upsert of the rows `from` yields; it writes only rows that differ.
local function upsert_from(from)
  return ([[
INSERT INTO users (id, email, name, bio, updated_at)
SELECT id, email, name, bio, updated_at FROM %s
ON CONFLICT (id) DO UPDATE
   SET email = EXCLUDED.email, name = EXCLUDED.name, bio = EXCLUDED.bio,
       updated_at = EXCLUDED.updated_at
 WHERE (users.email, users.name, users.bio, users.updated_at)
       IS DISTINCT FROM (EXCLUDED.email, EXCLUDED.name, EXCLUDED.bio, EXCLUDED.updated_at)]]):format(from)
end

-- $1: a notification payload; its "row" is upserted.
local UPSERT_EVENT = upsert_from("json_populate_record(NULL::users, $1::json -> 'row')")
-- $1: a JSON array of rows.
local UPSERT_ROWS = upsert_from("json_populate_recordset(NULL::users, $1::json)")

local DELETE_ONE = "DELETE FROM users WHERE id = $1::bigint"

-- The row with id $1 as a JSON array of zero or one row.
local FETCH_ONE = [[
SELECT coalesce(json_agg(u), '[]')::text AS rows
  FROM (SELECT * FROM users WHERE id = $1::bigint) u]]

-- The next batch of source rows after id $1 (NULL: from the start), at most
-- $2 of them: as a JSON array, and their ids as a bigint[] literal.
local RESYNC_READ = [[
SELECT count(*) AS n,
       max(u.id)::text AS last_id,
       coalesce(json_agg(u ORDER BY u.id), '[]')::text AS rows,
       coalesce(array_agg(u.id ORDER BY u.id), '{}')::text AS ids
  FROM (SELECT * FROM users
         WHERE $1::bigint IS NULL OR id > $1::bigint
         ORDER BY id LIMIT $2) u]]

-- Target rows in (after $1, up to $2] that the batch $3 does not hold.
local RESYNC_DELETE_RANGE = [[
DELETE FROM users
 WHERE ($1::bigint IS NULL OR id > $1::bigint) AND id <= $2::bigint
   AND id <> ALL ($3::bigint[])]]

-- Target rows after the last source id.
local RESYNC_DELETE_TAIL = "DELETE FROM users WHERE $1::bigint IS NULL OR id > $1::bigint"

---------------------------------------------------------------------------
-- Resync
---------------------------------------------------------------------------

--- Makes the target equal to the source, batch by batch (keyset
-- pagination on id).  Rows that change meanwhile are notified, and those
-- notifications are applied after the resync.  Returns rows written and
-- rows deleted.
local function resync()
  local after = pg.null -- last id done, as text
  local written, deleted = 0, 0
  while true do
    local b = exec("source", RESYNC_READ, after, RESYNC_BATCH)[1]
    if b.n == 0 then break end
    written = written + exec("target", UPSERT_ROWS, b.rows).affected
    deleted = deleted + exec("target", RESYNC_DELETE_RANGE, after, b.last_id, b.ids).affected
    after = b.last_id
    if b.n < RESYNC_BATCH then break end
  end
  deleted = deleted + exec("target", RESYNC_DELETE_TAIL, after).affected
  return written, deleted
end

-- Set when an event could not be applied: the next event resyncs first.
local stale = false

-- A resync that fails (it raises) leaves `stale` set.
local function run_resync(why)
  local t0 = pg.monotonic()
  stale = true
  local written, deleted = resync()
  stale = false
  log.info("users resynced", {
    why = why, written = written, deleted = deleted,
    seconds = ("%.3f"):format(pg.monotonic() - t0),
  })
end

---------------------------------------------------------------------------
-- Events
---------------------------------------------------------------------------

local function present(v)
  return v ~= nil and v ~= pg.null
end

--- Applies one users_changed event to the target.
local function apply(ev, note)
  if stale then run_resync("an earlier event failed") end
  local op = ev.op
  if op == "TRUNCATE" then
    exec("target", "DELETE FROM users")
    return
  end
  if type(ev.id) ~= "string" then
    error(("users_changed: payload without an id: %s"):format(note.payload), 0)
  end
  if op == "DELETE" then
    exec("target", DELETE_ONE, ev.id)
    return
  end
  if op ~= "INSERT" and op ~= "UPDATE" then
    error(("users_changed: unknown op %s"):format(tostring(op)), 0)
  end
  -- an UPDATE that changed the key: the old key goes
  if present(ev.old_id) then exec("target", DELETE_ONE, ev.old_id) end
  if ev.keys_only then
    -- too large for NOTIFY: the row as the source has it now (a later
    -- event would bring the same or newer), or gone
    local rows = exec("source", FETCH_ONE, ev.id)[1].rows
    if rows == "[]" then
      exec("target", DELETE_ONE, ev.id)
    else
      exec("target", UPSERT_ROWS, rows)
    end
  else
    exec("target", UPSERT_EVENT, note.payload)
  end
end

return {
  channels = {
    users_changed = {
      handler = apply,
      retry = { attempts = 5, backoff = 0.2 },
    },
  },

  -- After the LISTEN, on the first connect and on every reconnect:
  -- whatever happened while nobody listened is copied now.
  on_connect = function(_, info)
    run_resync(info.reconnect and "reconnect" or "start")
  end,

  -- An event that failed every retry (the runner has logged it): the next
  -- event resyncs first, so the target does not stay behind.
  on_error = function(_, note)
    if note and note.channel == "users_changed" then stale = true end
  end,
}
