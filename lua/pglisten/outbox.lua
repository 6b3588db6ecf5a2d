--- Durable channels: the data layer over `pglisten.outbox`.
--
-- The runner calls these on a connection of their own (never the listening
-- one): `claim` opens a transaction and locks up to `limit` due events with
-- `FOR UPDATE SKIP LOCKED`, the handlers run, and `finish` deletes the done
-- ones, reschedules or buries the failed ones and commits.  Should the
-- runner die in between, the server rolls back and the events are claimable
-- again.  Values travel as `$n` parameters; schema and table names are fixed.
--
-- Runtime failures return `nil, err, sqlstate`; wrong argument types raise.
-- @module pglisten.outbox

local pg = require "pglisten"
local schema = require "pglisten.schema"

local M = {}

--- The channel `pglisten.publish` notifies; its payload is the durable
-- channel's name.
M.WAKEUP_CHANNEL = "pglisten_outbox"

--- Default attempts before an event moves to `pglisten.dead`.
M.MAX_ATTEMPTS = 10

local null = pg.null
local concat, floor, mtype = table.concat, math.floor, math.type

---------------------------------------------------------------------------
-- Arguments
---------------------------------------------------------------------------

local function check_conn(conn, fname)
  local t = type(conn)
  if (t ~= "userdata" and t ~= "table") or type(conn.exec) ~= "function" then
    error(("bad argument #1 to '%s' (pglisten connection expected, got %s)"):format(fname, t), 3)
  end
end

local function argerror(n, fname, msg)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), 3)
end

-- A PostgreSQL array literal of text: every element double-quoted, with
-- backslashes and double quotes escaped, so that no element can be read as
-- NULL, split at a comma or trimmed.
local function text_array(list, n, fname)
  if type(list) ~= "table" then argerror(n, fname, "array of strings expected, got " .. type(list)) end
  local parts = {}
  for i = 1, #list do
    local s = list[i]
    if type(s) ~= "string" then
      argerror(n, fname, ("element %d must be a string, got %s"):format(i, type(s)))
    end
    parts[i] = '"' .. s:gsub('[\\"]', "\\%0") .. '"'
  end
  return "{" .. concat(parts, ",") .. "}"
end

local function bigint_array(list, n, fname)
  if list == nil then return "{}", 0 end
  if type(list) ~= "table" then argerror(n, fname, "array of integer ids expected, got " .. type(list)) end
  local parts = {}
  for i = 1, #list do
    local id = list[i]
    if mtype(id) ~= "integer" then
      argerror(n, fname, ("element %d must be an integer id, got %s"):format(i, mtype(id) or type(id)))
    end
    parts[i] = ("%d"):format(id)
  end
  return "{" .. concat(parts, ",") .. "}", #parts
end

local function opt_string(v, n, fname, what)
  if v ~= nil and type(v) ~= "string" then
    argerror(n, fname, what .. " must be a string or nil, got " .. type(v))
  end
  return v
end

-- SQL NULL as nil in the tables handed to callers.
local function nonull(v)
  if v == null then return nil end
  return v
end

---------------------------------------------------------------------------
-- Installation and publishing
---------------------------------------------------------------------------

--- Installs (or updates) schema `pglisten`: runs `pglisten.schema.sql`.
-- Idempotent; concurrent installers wait for each other.
-- @param conn a pglisten connection
-- @return true, or nil, err, sqlstate
function M.install(conn)
  check_conn(conn, "install")
  local ok, err, code = conn:exec(schema.sql)
  if not ok then return nil, err, code end
  return true
end

--- Publishes a durable event: `pglisten.publish($1, $2)` inserts it into the
-- outbox and wakes the runner when the surrounding transaction commits.
-- @param conn a pglisten connection
-- @tparam string channel the durable channel
-- @tparam string|table payload a string, or a table sent as JSON
-- @return the event's id (integer), or nil, err, sqlstate
function M.publish(conn, channel, payload)
  check_conn(conn, "publish")
  if type(channel) ~= "string" then argerror(2, "publish", "string expected, got " .. type(channel)) end
  local tp = type(payload)
  if tp == "table" then
    local err
    payload, err = pg.json.safe.encode(payload)
    if not payload then return nil, "cannot encode the payload as JSON: " .. tostring(err) end
  elseif tp ~= "string" then
    argerror(3, "publish", "string or table expected, got " .. tp)
  end
  local rows, err, code = conn:exec("SELECT pglisten.publish($1::text, $2::text) AS id", channel, payload)
  if not rows then return nil, err, code end
  return rows[1].id
end

---------------------------------------------------------------------------
-- Claiming and finishing
---------------------------------------------------------------------------

local CLAIM = [[
SELECT id, channel, payload, attempts, created_at, last_error
  FROM pglisten.outbox
 WHERE channel = ANY($1::text[]) AND run_at <= now()
 ORDER BY id
 LIMIT $2
   FOR UPDATE SKIP LOCKED]]

-- Rolls back what this module began; the caller gets the first error.
local function abort(conn, err, code)
  if conn:status() == "ok" and conn:txstatus() ~= "idle" then conn:exec("ROLLBACK") end
  return nil, err, code
end

--- Claims up to `limit` due events of the given durable channels, oldest
-- first, skipping those another connection holds.  Opens a transaction that
-- stays open, the events locked, until `finish`; when nothing is due it
-- commits at once and returns an empty array.
-- @param conn a pglisten connection, outside any transaction
-- @tparam {string,...} channels durable channel names
-- @tparam[opt=100] integer limit at most this many events
-- @return array of `{id, channel, payload, attempts, created_at, last_error}`
--   (last_error nil for a first attempt), or nil, err, sqlstate
function M.claim(conn, channels, limit)
  check_conn(conn, "claim")
  local list = text_array(channels, 2, "claim")
  if limit == nil then limit = 100 end
  if mtype(limit) ~= "integer" or limit < 1 then
    argerror(3, "claim", "positive integer expected, got " .. tostring(limit))
  end
  if #channels == 0 then return {} end
  if conn:status() == "ok" and conn:txstatus() ~= "idle" then
    return nil, "claim: the connection is already inside a transaction (finish the last claim first)"
  end
  local ok, err, code = conn:exec("BEGIN")
  if not ok then return nil, err, code end
  local rows
  rows, err, code = conn:exec(CLAIM, list, limit)
  if not rows then return abort(conn, err, code) end
  if rows.n == 0 then
    ok, err, code = conn:exec("COMMIT")
    if not ok then return abort(conn, err, code) end
    return {}
  end
  local events = {}
  for i = 1, rows.n do
    local r = rows[i]
    events[i] = {
      id = r.id, channel = r.channel, payload = r.payload, attempts = r.attempts,
      created_at = r.created_at, last_error = nonull(r.last_error),
    }
  end
  return events
end

local DELETE_DONE = "DELETE FROM pglisten.outbox WHERE id = ANY($1::bigint[])"

-- Moves the event to pglisten.dead when this failure is its last allowed
-- one (decided on the row's own attempts, which the claim keeps locked).
local BURY = [[
WITH gone AS (
  DELETE FROM pglisten.outbox
   WHERE id = $1 AND attempts + 1 >= $3::int
  RETURNING id, channel, payload, created_at, run_at, attempts
)
INSERT INTO pglisten.dead (id, channel, payload, created_at, run_at, attempts, last_error, failed_at)
SELECT id, channel, payload, created_at, run_at, attempts + 1, $2::text, clock_timestamp()
  FROM gone]]

-- clock_timestamp(): now() is the claim's start, maybe long ago.
local RETRY = [[
UPDATE pglisten.outbox
   SET attempts = attempts + 1, last_error = $2::text,
       run_at = clock_timestamp() + make_interval(secs => $3::float8)
 WHERE id = $1]]

local function check_failure(f, i)
  if type(f) ~= "table" then argerror(3, "finish", ("failure %d must be a table, got %s"):format(i, type(f))) end
  if mtype(f.id) ~= "integer" then
    argerror(3, "finish", ("failure %d: id must be an integer, got %s"):format(i, mtype(f.id) or type(f.id)))
  end
  local maxa = f.max_attempts
  if maxa == nil then maxa = M.MAX_ATTEMPTS end
  if mtype(maxa) ~= "integer" then
    argerror(3, "finish", ("failure %d: max_attempts must be an integer, got %s"):format(i, tostring(maxa)))
  end
  local backoff = f.backoff
  if backoff == nil then backoff = M.backoff((f.attempts or 0) + 1) end
  if type(backoff) ~= "number" or not (backoff >= 0 and backoff < math.huge) then
    argerror(3, "finish", ("failure %d: backoff must be a finite number of seconds >= 0, got %s"):format(
      i, tostring(backoff)))
  end
  if f.attempts ~= nil and mtype(f.attempts) ~= "integer" then
    argerror(3, "finish", ("failure %d: attempts must be an integer, got %s"):format(i, tostring(f.attempts)))
  end
  local msg = f.error
  if msg == nil then
    msg = "unknown error"
  elseif type(msg) ~= "string" then
    msg = tostring(msg)
  end
  return f.id, msg, maxa, backoff
end

--- Ends the transaction `claim` opened: deletes the events handled, and for
-- each failure either reschedules it (attempts + 1, last_error, run_at =
-- now + backoff) or, when attempts + 1 reaches max_attempts, moves it to
-- `pglisten.dead`; then commits.  On any error it rolls back, so that every
-- claimed event becomes claimable again.
-- @param conn the connection that claimed
-- @tparam {integer,...} done_ids ids handled successfully (may be empty or nil)
-- @tparam[opt] {table,...} failed `{id=, error=, attempts=, max_attempts=, backoff=}`:
--   `error` a message (kept as last_error); `attempts` as claimed;
--   `max_attempts` default `outbox.MAX_ATTEMPTS`; `backoff` seconds until the
--   next try, default `outbox.backoff(attempts + 1)`
-- @return true, or nil, err, sqlstate
function M.finish(conn, done_ids, failed)
  check_conn(conn, "finish")
  local done, ndone = bigint_array(done_ids, 2, "finish")
  if failed ~= nil and type(failed) ~= "table" then
    argerror(3, "finish", "array of failures expected, got " .. type(failed))
  end
  local fails = {}
  for i = 1, failed and #failed or 0 do fails[i] = table.pack(check_failure(failed[i], i)) end

  local tx = conn:status() == "ok" and conn:txstatus() or "lost"
  if tx ~= "intrans" then
    -- A lost connection took the transaction (and the locks) with it: the
    -- facade reports that once, on the next call, and heals on the one after.
    local ok, err, code = conn:exec("ROLLBACK")
    if ok then
      err, code = tx == "inerror"
        and "finish: the claim's transaction had failed; rolled back, its events are claimable again"
        or "finish: no claim is open on this connection (lost or already finished)", nil
    end
    return nil, err, code
  end
  local ok, err, code
  if ndone > 0 then
    ok, err, code = conn:exec(DELETE_DONE, done)
    if not ok then return abort(conn, err, code) end
  end
  for _, f in ipairs(fails) do
    local id, msg, maxa, backoff = f[1], f[2], f[3], f[4]
    ok, err, code = conn:exec(BURY, id, msg, maxa)
    if not ok then return abort(conn, err, code) end
    if ok.affected == 0 then
      ok, err, code = conn:exec(RETRY, id, msg, backoff + 0.0)
      if not ok then return abort(conn, err, code) end
    end
  end
  ok, err, code = conn:exec("COMMIT")
  if not ok then return abort(conn, err, code) end
  return true
end

--- Seconds to wait before the next try after `attempts` failures:
-- `min(cap, base * 2^(attempts - 1))`.
-- @tparam integer attempts failures so far (1 for the first)
-- @tparam[opt=1] number base seconds after the first failure
-- @tparam[opt=300] number cap the longest wait
-- @treturn number seconds
function M.backoff(attempts, base, cap)
  if type(attempts) ~= "number" then argerror(1, "backoff", "number expected, got " .. type(attempts)) end
  if base ~= nil and type(base) ~= "number" then argerror(2, "backoff", "number expected, got " .. type(base)) end
  if cap ~= nil and type(cap) ~= "number" then argerror(3, "backoff", "number expected, got " .. type(cap)) end
  base, cap = base or 1, cap or 300
  local n = floor(attempts)
  if n < 1 then n = 1 end
  if n > 1024 then return cap end -- 2^1024 overflows
  local s = base * 2.0 ^ (n - 1)
  if s > cap then return cap end
  return s
end

---------------------------------------------------------------------------
-- Inspection
---------------------------------------------------------------------------

--- The dead letters of a channel (all channels when nil), oldest first.
-- @param conn a pglisten connection
-- @tparam[opt] string channel
-- @return array of rows `{id, channel, payload, created_at, run_at,
--   attempts, last_error, failed_at}`, or nil, err, sqlstate
function M.dead(conn, channel)
  check_conn(conn, "dead")
  opt_string(channel, 2, "dead", "channel")
  local rows, err, code = conn:exec([[
SELECT id, channel, payload, created_at, run_at, attempts, last_error, failed_at
  FROM pglisten.dead
 WHERE $1::text IS NULL OR channel = $1::text
 ORDER BY id]], channel)
  if not rows then return nil, err, code end
  local out = {}
  for i = 1, rows.n do
    local r = rows[i]
    out[i] = {
      id = r.id, channel = r.channel, payload = r.payload, created_at = r.created_at,
      run_at = r.run_at, attempts = r.attempts, last_error = nonull(r.last_error),
      failed_at = nonull(r.failed_at),
    }
  end
  return out
end

--- How many events of a channel (all channels when nil) wait in the outbox,
-- due or not, claimed or not.
-- @param conn a pglisten connection
-- @tparam[opt] string channel
-- @return integer, or nil, err, sqlstate
function M.pending(conn, channel)
  check_conn(conn, "pending")
  opt_string(channel, 2, "pending", "channel")
  local rows, err, code = conn:exec(
    "SELECT count(*) AS n FROM pglisten.outbox WHERE $1::text IS NULL OR channel = $1::text", channel)
  if not rows then return nil, err, code end
  return rows[1].n
end

return M
