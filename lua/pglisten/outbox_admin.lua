--- Durable channels, the operator's side: the outbox's state per channel,
-- dead letters listed, replayed and purged (`lua-pglisten outbox ...` runs
-- these; pglisten.outbox is the runner's side).
--
-- Values travel as `$n` parameters.  Runtime failures return
-- `nil, err, sqlstate`; wrong argument types raise.
-- @module pglisten.outbox_admin

local util = require "pglisten.outbox_util"

local M = {}

local mtype, concat = math.type, table.concat
local check_conn, argerror, nonull = util.check_conn, util.argerror, util.nonull

-- (not util.opt_string: the operator's commands word it without a name)
local function opt_string(v, n, fname)
  if v ~= nil and type(v) ~= "string" then argerror(n, fname, "string or nil expected, got " .. type(v)) end
  return v
end

---------------------------------------------------------------------------
-- Durations
---------------------------------------------------------------------------

local UNIT = { s = 1, m = 60, h = 3600, d = 86400 }

--- Seconds in a duration such as `7d`, `12h`, `30m`, `45s` or `1d12h`:
-- whole numbers, each with one of the units s, m (minutes), h, d, largest
-- first, each unit once.  A number without a unit, another unit (`7M`,
-- `1w`, `1mo`), a fraction, a sign or spaces is refused: purging on a guess
-- deletes data.
-- @tparam string s
-- @return seconds (integer), or nil and why
function M.duration(s)
  if type(s) ~= "string" then return nil, "a duration must be a string, got " .. type(s) end
  local bad = ("invalid duration %q: use whole numbers with a unit s, m (minutes), h or d, e.g. 7d or 1d12h"):format(s)
  if s == "" or not s:match("^[%dsmhd]+$") then return nil, bad end
  local total, last, pos = 0, math.huge, 1
  while pos <= #s do
    local num, unit, nxt = s:match("^(%d+)([smhd])()", pos)
    if not num then return nil, bad end
    local size = UNIT[unit]
    if size >= last then return nil, bad .. " (each unit once, largest first)" end
    if #num > 9 then return nil, bad .. " (too large)" end
    total, last, pos = total + tonumber(num) * size, size, nxt
  end
  return total
end

---------------------------------------------------------------------------
-- Status
---------------------------------------------------------------------------

local STATUS = [[
SELECT channel, sum(waiting)::bigint AS waiting, sum(due)::bigint AS due, sum(dead)::bigint AS dead,
       extract(epoch FROM clock_timestamp() - min(oldest))::float8 AS oldest_age
  FROM (SELECT channel, count(*) AS waiting, count(*) FILTER (WHERE run_at <= clock_timestamp()) AS due,
               0 AS dead, min(created_at) AS oldest
          FROM pglisten.outbox WHERE $1::text IS NULL OR channel = $1::text GROUP BY channel
        UNION ALL
        SELECT channel, 0, 0, count(*), NULL
          FROM pglisten.dead WHERE $1::text IS NULL OR channel = $1::text GROUP BY channel) AS s
 GROUP BY channel
 ORDER BY channel]]

--- Per channel: events waiting in the outbox (due or not, claimed or not),
-- the oldest one's age, events due now, and dead letters.
-- @param conn a pglisten connection
-- @tparam[opt] string channel only this one
-- @return array of `{channel, waiting, due, dead, oldest_age}` (oldest_age
--   in seconds, nil when nothing waits), or nil, err, sqlstate
function M.status(conn, channel)
  check_conn(conn, "status")
  opt_string(channel, 2, "status")
  local rows, err, code = conn:exec(STATUS, channel)
  if not rows then return nil, err, code end
  local out = {}
  for i = 1, rows.n do
    local r = rows[i]
    out[i] = { channel = r.channel, waiting = r.waiting, due = r.due, dead = r.dead,
      oldest_age = nonull(r.oldest_age) }
  end
  return out
end

---------------------------------------------------------------------------
-- Dead letters
---------------------------------------------------------------------------

--- Dead letters, oldest id first, at most `limit`.
-- @param conn a pglisten connection
-- @tparam[opt] string channel only this one
-- @tparam[opt=100] integer limit
-- @return array of `{id, channel, payload, attempts, created_at, failed_at,
--   last_error}`, or nil, err, sqlstate
function M.dead(conn, channel, limit)
  check_conn(conn, "dead")
  opt_string(channel, 2, "dead")
  if limit == nil then limit = 100 end
  if mtype(limit) ~= "integer" or limit < 1 then argerror(3, "dead", "positive integer expected") end
  local rows, err, code = conn:exec([[
SELECT id, channel, payload, attempts, created_at::text AS created_at, failed_at::text AS failed_at, last_error
  FROM pglisten.dead
 WHERE $1::text IS NULL OR channel = $1::text
 ORDER BY id LIMIT $2]], channel, limit)
  if not rows then return nil, err, code end
  local out = {}
  for i = 1, rows.n do
    local r = rows[i]
    out[i] = { id = r.id, channel = r.channel, payload = r.payload, attempts = r.attempts,
      created_at = r.created_at, failed_at = nonull(r.failed_at), last_error = nonull(r.last_error) }
  end
  return out
end

local function id_array(ids)
  if ids == nil then return nil end
  if type(ids) ~= "table" then argerror(2, "replay", "array of integer ids or nil expected") end
  local parts = {}
  for i, id in ipairs(ids) do
    if mtype(id) ~= "integer" then argerror(2, "replay", ("element %d must be an integer id"):format(i)) end
    parts[i] = ("%d"):format(id)
  end
  return "{" .. concat(parts, ",") .. "}"
end

--- Moves dead letters back into the outbox: `pglisten.replay(ids, channel)`
-- in a transaction of its own.  With neither ids nor channel, all of them.
-- @param conn a pglisten connection
-- @tparam[opt] {integer,...} ids only these
-- @tparam[opt] string channel only this channel's
-- @return how many were replayed, or nil, err, sqlstate
function M.replay(conn, ids, channel)
  check_conn(conn, "replay")
  local arr = id_array(ids)
  opt_string(channel, 3, "replay")
  local rows, err, code = conn:exec("SELECT pglisten.replay($1::bigint[], $2::text) AS n", arr, channel)
  if not rows then return nil, err, code end
  return rows[1].n
end

--- Deletes dead letters that failed (finally) more than `seconds` ago.
-- @param conn a pglisten connection
-- @tparam number seconds
-- @tparam[opt] string channel only this channel's
-- @return how many were deleted, or nil, err, sqlstate
function M.purge(conn, seconds, channel)
  check_conn(conn, "purge")
  if type(seconds) ~= "number" or seconds < 0 then argerror(2, "purge", "seconds >= 0 expected") end
  opt_string(channel, 3, "purge")
  local rows, err, code = conn:exec([[
WITH gone AS (
  DELETE FROM pglisten.dead
   WHERE coalesce(failed_at, created_at) < clock_timestamp() - make_interval(secs => $1::float8)
     AND ($2::text IS NULL OR channel = $2::text)
  RETURNING 1)
SELECT count(*) AS n FROM gone]], seconds + 0.0, channel)
  if not rows then return nil, err, code end
  return rows[1].n
end

return M
