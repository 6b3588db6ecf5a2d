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
local util = require "pglisten.outbox_util"
local finishing = require "pglisten.outbox_finish"

local M = {}

--- The channel `pglisten.publish` notifies; its payload is the durable
-- channel's name.
M.WAKEUP_CHANNEL = "pglisten_outbox"

--- Default attempts before an event moves to `pglisten.dead`.
M.MAX_ATTEMPTS = 10

local check_conn = util.check_conn
local argerror = util.argerror
local text_array = util.text_array
local opt_string = util.opt_string
local nonull = util.nonull
local abort = util.abort
local floor, mtype = math.floor, math.type

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
-- Claiming
---------------------------------------------------------------------------

-- $3: the ordered channels among $1; $4: those whose lock this claim holds.
-- An ordered channel's event is taken only when no earlier event of its
-- channel waits for a retry (run_at in the future): a failing event blocks
-- its channel.
local CLAIM = [[
SELECT id, channel, payload, attempts, created_at, last_error
  FROM pglisten.outbox o
 WHERE channel = ANY($1::text[]) AND run_at <= now()
   AND (NOT (channel = ANY($3::text[]))
        OR (channel = ANY($4::text[])
            AND NOT EXISTS (SELECT 1 FROM pglisten.outbox b
                             WHERE b.channel = o.channel AND b.run_at > now() AND b.id < o.id)))
 ORDER BY id
 LIMIT $2
   FOR UPDATE SKIP LOCKED]]

-- One claimer at a time per ordered channel: a transaction-level advisory
-- lock (keys 0x70676c6f 'pglo', hashtext(channel)) held until finish
-- commits, so that no runner takes event 2 while another holds event 1.
-- Not waited for: a channel another claim holds is left to it.
local LOCK_ORDERED = [[
SELECT coalesce(array_agg(c), '{}') AS locked
  FROM unnest($1::text[]) AS c
 WHERE pg_catalog.pg_try_advisory_xact_lock(1885826159, hashtext(c))]]


--- Claims up to `limit` due events of the given durable channels, oldest
-- first, skipping those another connection holds.  Opens a transaction that
-- stays open, the events locked, until `finish`; when nothing is due it
-- commits at once and returns an empty array.
-- @param conn a pglisten connection, outside any transaction
-- @tparam {string,...} channels durable channel names
-- @tparam[opt=100] integer limit at most this many events
-- @tparam[opt] {string,...} ordered those of `channels` that are ordered:
--   claimed by one connection at a time, and only up to their first event
--   that waits for a retry
-- @return array of `{id, channel, payload, attempts, created_at, last_error}`
--   (last_error nil for a first attempt), or nil, err, sqlstate
function M.claim(conn, channels, limit, ordered)
  check_conn(conn, "claim")
  local list = text_array(channels, 2, "claim")
  local olist = text_array(ordered or {}, 4, "claim")
  if limit == nil then limit = 100 end
  if mtype(limit) ~= "integer" or limit < 1 then
    argerror(3, "claim", "positive integer expected, got " .. tostring(limit))
  end
  if #channels == 0 then return {} end
  if conn:status() == "ok" and conn:txstatus() ~= "idle" then
    return nil, "claim: the connection is already inside a transaction (finish the last claim first)"
  end
  -- the events stay locked while the handlers run: a server that ends
  -- sessions idle in a transaction would roll every slow claim back, and
  -- its events would be handled again and again (SET LOCAL: for this claim).
  -- Read committed whatever the default: FOR UPDATE SKIP LOCKED claims by
  -- competing runners fail to serialize otherwise
  local ok, err, code = conn:exec(
    "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL idle_in_transaction_session_timeout = 0")
  if not ok then return abort(conn, err, code) end
  local locked = "{}"
  if ordered and #ordered > 0 then
    local r
    r, err, code = conn:exec(LOCK_ORDERED, olist)
    if not r then return abort(conn, err, code) end
    locked = r[1].locked
  end
  local rows
  rows, err, code = conn:exec(CLAIM, list, limit, olist, locked)
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

-- `finish`, `error_text` and `MAX_ERROR` live in pglisten.outbox_finish.

--- Longest `last_error` stored, in bytes.
M.MAX_ERROR = finishing.MAX_ERROR
M.error_text = finishing.error_text
M.finish = finishing.finish

---------------------------------------------------------------------------
-- Retries
---------------------------------------------------------------------------

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
