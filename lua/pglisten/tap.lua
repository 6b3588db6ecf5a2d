--- `lua-pglisten --tap CHANNEL...`: see what the triggers send.
--
-- The runner runs a spec derived from the script's: only the tapped
-- channels, each with a handler that prints the decoded event as one JSON
-- line on stdout (`{"channel":..,"payload":..,"pid":..,"received_at":..}`)
-- instead of the script's handler; no batch, no retry, no on_connect, no
-- on_error.  A durable channel is not claimed: its events stay in
-- pglisten.outbox for the real runner.  The tap reads them (never locks or
-- deletes them) on its own lazy connection when the outbox's wake-up
-- (`pglisten_outbox`) names a tapped channel, and once at the start, each
-- event once (ids only grow).
-- @module pglisten.tap

local pg = require "pglisten"
local outbox = require "pglisten.outbox"

local M = {}

local function emit(obj)
  local line = pg.json.safe.encode(obj)
  if not line then
    obj.payload = tostring(obj.payload)
    line = pg.json.safe.encode(obj) or '{"error":"event could not be encoded"}'
  end
  io.stdout:write(line, "\n")
  io.stdout:flush()
end

local function printer(name)
  return function(v, note)
    emit({ channel = name, payload = v, pid = note.pid, received_at = note.received_at })
  end
end

-- Prints the durable events of `names` with an id above the last printed.
local function peek(state, conn, names, entries)
  local r, err = conn:exec("SELECT id, channel, payload, attempts, extract(epoch FROM created_at)::float8 AS created_at"
    .. " FROM pglisten.outbox WHERE channel = ANY($1::text[]) AND id > $2 ORDER BY id LIMIT 1000",
    names, state.last)
  if not r then
    io.stderr:write("lua-pglisten: --tap: reading pglisten.outbox failed: ", tostring(err), "\n")
    return
  end
  for _, row in ipairs(r) do
    state.last = math.max(state.last, row.id)
    local e = entries[row.channel]
    local v, derr = require("pglisten.dispatch").decoder(e)(row.payload)
    emit({ channel = row.channel, payload = v == nil and row.payload or v, decode_error = derr, id = row.id,
      attempts = row.attempts, created_at = row.created_at, durable = true })
  end
end

-- The durable half: a handler for the wake-up channel and an on_connect.
local function durable_tap(spec, durable, db)
  local state, entries, names = { last = 0 }, {}, {}
  for _, n in ipairs(durable) do entries[n], names[#names + 1] = spec.channels[n], n end
  local lit = "{" .. table.concat((function()
    local q = {}
    for i, n in ipairs(names) do q[i] = '"' .. n:gsub('[\\"]', "\\%0") .. '"' end
    return q
  end)(), ",") .. "}"
  local conn
  local function wake(channel)
    if not entries[channel] then return end
    conn = conn or assert(pg.connect(db, { lazy = true }))
    peek(state, conn, lit, entries)
  end
  local function on_connect(c) peek(state, c, lit, entries) end
  return wake, on_connect
end

--- The spec that taps `names` (channels of `spec`); or nil, err.
-- `db` is the conninfo the runner uses (durable channels are read on it).
function M.apply(spec, names, db)
  local out = { path = spec.path, names = {}, channels = {}, ordering = spec.ordering,
    heartbeat = spec.heartbeat, heartbeat_timeout = spec.heartbeat_timeout, stats_interval = spec.stats_interval,
    reconnect = spec.reconnect, batch_size = spec.batch_size }
  local durable = {}
  for _, n in ipairs(names) do
    local e = spec.channels[n]
    if not e then
      return nil, ("--tap %s: the script has no channel %q (it has %s)"):format(n, n, table.concat(spec.names, ", "))
    end
    if e.source == "replication" then
      return nil, ("--tap %s: replication channels cannot be tapped"):format(n)
    end
    if e.durable then
      durable[#durable + 1] = n
    elseif not out.channels[n] then
      out.channels[n] = { name = n, decode = e.decode, decoder = e.decoder, handler = printer(n) }
      out.names[#out.names + 1] = n
    end
  end
  if #durable > 0 then
    local wake, on_connect = durable_tap(spec, durable, db or os.getenv("DATABASE_URL") or "")
    local w = outbox.WAKEUP_CHANNEL
    out.channels[w] = { name = w, decode = "raw", decoder = function(s) return s end, handler = wake }
    out.names[#out.names + 1] = w
    out.on_connect = on_connect
  end
  table.sort(out.names)
  return out
end

return M
