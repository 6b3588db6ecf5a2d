--- Dispatch: the one way a handler is called, and what follows.
--
-- Every handler call -- plain, batch, retry, durable -- goes through
-- `invoke(handler, arg, note)`: one xpcall whose message handler keeps the
-- error and its traceback.  The dispatcher takes notes from the lanes of
-- pglisten.ordering, decodes them (pglisten.decoders), calls `invoke`, and
-- settles the outcome: counted as handled; or retried after
-- `backoff.delay` (the lane waits, see pglisten.ordering); or logged and
-- passed to `on_error`.  Notes from a source that acknowledges (`note.src`)
-- are acknowledged once their outcome is final.
--
-- The fast path: a run of notes for plain channels (no batch, retry or
-- durable) at a lane's head is handled with the per-note work inlined (one C
-- decode, one invoke, one look at the signal flag), at most FAST_RUN at a
-- time so that the loop sees its timers.
-- @module pglisten.dispatch

local pg = require "pglisten"
local host = require "pglisten.host"
local backoff = require "pglisten.backoff"
local ordering = require "pglisten.ordering"
local stats = require "pglisten.services.stats"
local retryjob = require "pglisten.retryjob"

local ok_dec, decoders = pcall(require, "pglisten.decoders")
if not ok_dec then decoders = nil end

local M = {}
M.__index = M

local now = pg.monotonic
local traceback = debug.traceback
local xpcall, type, tostring = xpcall, type, tostring
local json_decode, cjson_decode = pg.json.safe.decode, pg.json.cjson_decode
local pending = host.pending

M.FAST_RUN = 64

--- A printable form of any error value.
function M.errstring(e)
  if type(e) == "string" then return e end
  local mt = getmetatable(e)
  if mt and mt.__tostring then local ok, s = pcall(tostring, e); if ok then return s end end
  if type(e) == "table" then
    local s = pg.json.safe.encode(e)
    if s then return "(error object) " .. s end
  end
  return ("(error object is a %s value)"):format(type(e))
end
local errstring = M.errstring

-- The traceback stops where the runner called the handler.
local last_traceback
local function msgh(e)
  local tb = traceback(errstring(e), 2)
  local cut = tb:find("\n%s*%[C%]: in function 'xpcall'")
  last_traceback = cut and tb:sub(1, cut - 1) or tb
  return e
end

--- Calls `fn(arg, note)`: true (and what fn returned), or false and the
-- error value; `dispatch.traceback()` is then the failure's traceback.  The
-- only way a handler (or on_connect) is called.  A tail call, so that the
-- fast path pays for one call frame only.
local function invoke(fn, arg, note)
  return xpcall(fn, msgh, arg, note)
end
M.invoke = invoke

--- The traceback of the last failed invoke.
function M.traceback() return last_traceback end

local function not_container(v)
  return ("payload is JSON but not an object or array (%s)"):format(type(v) == "userdata" and "null" or type(v))
end

-- Used until pglisten.decoders is there.
local FALLBACK = {
  raw = function(s) return s end,
  json = function(s)
    local v, err = json_decode(s)
    if v ~= nil and type(v) ~= "table" then return nil, not_container(v) end
    return v, err
  end,
  cjson = function(s)
    local v, err = cjson_decode(s)
    if v ~= nil and type(v) ~= "table" then return nil, not_container(v) end
    return v, err
  end,
}

--- The decoder function of a channel entry.
function M.decoder(entry)
  local f = entry.decoder
  if f then return f end
  if decoders then f = decoders.get(entry.decode or "json") end
  return f or FALLBACK[entry.decode or "json"]
end

local function excerpt(s, n)
  n = n or 120
  if type(s) ~= "string" then return nil end -- (a handler cleared its note's)
  if #s <= n then return s end
  return s:sub(1, n) .. ("... (%d bytes)"):format(#s)
end
M.excerpt = excerpt

--- A dispatcher for runtime `rt` (spec, log, stats, topup, past_grace).
function M.new(rt, mode)
  local self = setmetatable({ rt = rt, log = rt.log, stats = rt.stats, routes = {}, warned = {} }, M)
  self.lanes = ordering.new(mode)
  self:configure(rt.spec)
  return self
end

--- Takes the channel entries of a (re)loaded spec.
function M:configure(spec)
  if self.spec then
    self.reloaded_at = pg.now()
    -- a removed channel's notes received before the reload still go to its
    -- old handler (they would otherwise be dropped as unrouted)
    local removed = {}
    for name, r in pairs(self.removed or {}) do
      if not spec.channels[name] then removed[name] = r end
    end
    for name, e in pairs(self.channels) do
      if not spec.channels[name] then removed[name] = { entry = e, at = self.reloaded_at } end
    end
    self.removed = removed
    -- channels that were plain and become durable: their plain notes
    -- received before the reload are still handled
    local was_plain = {}
    for name, e in pairs(spec.channels) do
      local o = self.channels[name]
      if e.durable and o and not o.durable then was_plain[name] = self.reloaded_at end
    end
    for name, at in pairs(self.was_plain or {}) do
      if was_plain[name] == nil and spec.channels[name] and spec.channels[name].durable then was_plain[name] = at end
    end
    self.was_plain = was_plain
  end
  self.spec, self.channels = spec, spec.channels
  local fast = {}
  for name, e in pairs(spec.channels) do
    if not (e.batch or e.retry or e.durable or e.source) then fast[name] = e end
  end
  self.fast = fast
end

--- Sends notes on `channel` (which no entry names) to `fn(note)` instead.
function M:route(channel, fn) self.routes[channel] = fn end

--- Appends `batch[1..n]` in server order.
function M:append(batch, n) self.lanes:append(batch, n) end

function M:queued() return self.lanes:len() end
function M:ready(t) return self.lanes:ready(t or now()) end
function M:next_due() return self.lanes:next_due() end
function M:oldest() return self.current_at or self.lanes:oldest() end

function M:on_error(err, note, info)
  local f = self.spec.on_error
  if not f then return end
  local ok, e = xpcall(f, msgh, err, note, info)
  if not ok then
    self.log.error("on_error failed",
      { error = errstring(e), traceback = last_traceback, channel = note and note.channel })
  end
end

function M:decode_failed(entry, note, err)
  self.stats.failed_decode = self.stats.failed_decode + 1
  local c = stats.channel(self.stats, entry.name)
  c.failed_decode = c.failed_decode + 1
  self.log.error("payload rejected", {
    channel = note.channel, error = err, pid = note.pid, payload = excerpt(note.payload),
  })
  self:on_error(err, note, { kind = "decode", channel = entry.name })
end

-- `payload`: the first note's as received (its handler may have changed the note).
function M:handler_failed(entry, note, err, tb, attempts, notes, payload)
  self.stats.failed_handler = self.stats.failed_handler + (notes and #notes or 1)
  local c = stats.channel(self.stats, entry.name)
  c.failed_handler = c.failed_handler + (notes and #notes or 1)
  self.log.error("handler failed", {
    channel = entry.name, error = errstring(err), traceback = tb, attempts = attempts,
    payload = excerpt(payload or (note and note.payload)), count = notes and #notes or nil,
  })
  local info = { kind = "handler", channel = entry.name, attempts = attempts, traceback = tb }
  if notes then
    info.batch = notes
    for _, n in ipairs(notes) do self:on_error(err, n, info) end
  else
    self:on_error(err, note, info)
  end
end

--- Handles what may be handled now, a bounded amount: returns after at
-- most FAST_RUN notes per lane, or at a signal.
function M:run()
  local t = now()
  local lanes = self.lanes
  local single = lanes.single
  if single then return self:run_lane(single) end
  for _, lane in ipairs(lanes.list) do
    if ordering.lane_ready(lane, t) then self:run_lane(lane) end
    if pending() then return end
  end
end

-- One lane: a retry that is due, else the fast path, else one slow item.
function M:run_lane(lane)
  if lane.job then
    if now() >= lane.wait_until then self:attempt(lane, lane.job) end
    return
  end
  local q = lane.q
  local h, tail = q.head, q.tail
  local last = h + M.FAST_RUN - 1
  if last > tail then last = tail end
  local fast, handled, slow = self.fast, 0, false
  local by, channel_stats = self.stats.channels, stats.channel
  while h <= last do
    local note = q[h]
    local entry = fast[note.channel]
    if not entry then
      slow = true
      break
    end
    q[h] = nil
    h = h + 1
    local v, err
    local payload = note.payload
    if entry.decode == "json" then
      v, err = json_decode(payload)
      if v ~= nil and type(v) ~= "table" then v, err = nil, not_container(v) end
    else
      v, err = M.decoder(entry)(payload)
    end
    if v == nil then
      q.head = h
      self:decode_failed(entry, note, err)
    else
      self.current_at = note.received_at
      local ok, herr = invoke(entry.handler, v, note)
      if ok then
        handled = handled + 1
        local c = by[note.channel] or channel_stats(self.stats, note.channel)
        c.handled = c.handled + 1
      else
        q.head = h
        self:handler_failed(entry, note, herr, last_traceback, 1, nil, payload)
      end
    end
    if pending() then break end
  end
  self.current_at = nil
  self.stats.handled = self.stats.handled + handled
  if h > tail then
    q.head, q.tail = 1, 0
  else
    q.head = h
  end
  if slow then self:slow(lane) end
end

-- Rate-limited warning: a plain NOTIFY on a channel served durably.
function M:plain_on_durable(note)
  self.stats.unrouted = self.stats.unrouted + 1
  local t, last = now(), self.warned[note.channel]
  if last and t - last < 60 then return end
  self.warned[note.channel] = t
  self.log.warn("plain notification on a durable channel ignored: use pglisten.publish or a 'durable' trigger",
    { channel = note.channel, pid = note.pid })
end

-- Takes the lane's head (for a batch channel, the run of notes on that
-- channel at the head) and makes a job of it.
function M:slow(lane)
  local q = lane.q
  local note = q:pop()
  local entry = self.channels[note.channel]
  local gone = not entry and self.removed and self.removed[note.channel]
  if gone and not gone.entry.durable and note.received_at < gone.at then entry = gone.entry end
  if not entry then
    local route = self.routes[note.channel]
    if route then return route(note, q) end
    self.stats.unrouted = self.stats.unrouted + 1
    self.log.debug("notification on a channel with no handler", { channel = note.channel })
    return
  end
  -- a plain NOTIFY on a durable channel, unless it came while the channel was plain
  local plain_until = self.was_plain and self.was_plain[note.channel]
  if entry.durable and not note.durable and not (plain_until and note.received_at < plain_until) then
    return self:plain_on_durable(note)
  end
  local decode = M.decoder(entry)
  if not entry.batch then
    local v, err = decode(note.payload)
    if v == nil then
      self:decode_failed(entry, note, err)
      if note.src then note.src:ack(note, false) end
      return
    end
    return self:attempt(lane, { entry = entry, arg = v, note = note, attempt = 0 })
  end
  local want = entry.batch
  -- top up from what has already arrived, without waiting for more
  if q:len() + 1 < want then self.rt:topup(want - q:len() - 1) end
  local rows, notes, k, channel = {}, {}, 0, note.channel
  while true do
    local v, err = decode(note.payload)
    if v == nil then
      self:decode_failed(entry, note, err)
      if note.src then note.src:ack(note, false) end
    else
      k = k + 1
      rows[k], notes[k] = v, note
    end
    local nx = q[q.head]
    if k >= want or not nx or nx.channel ~= channel then break end
    note = q:pop()
  end
  if k == 0 then return end
  return self:attempt(lane, { entry = entry, arg = rows, note = notes[1], notes = notes, attempt = 0 })
end

-- Runs a job once; settles it: handled, waiting for a retry, or failed.
function M:attempt(lane, job)
  local entry = job.entry
  local attempts = entry.retry and entry.retry.attempts or 1
  job.attempt = job.attempt + 1
  lane.job, lane.wait_until = nil, nil
  if job.attempt == 1 then
    retryjob.keep(job, attempts > 1)
  elseif not retryjob.fresh(job, M.decoder(entry), function(n, err)
    self:decode_failed(entry, n, err)
    if n.src then n.src:ack(n, false) end
  end) then
    return
  end
  local count = job.sent and #job.sent or 1
  self.current_at = job.note.received_at
  local ok, err = invoke(entry.handler, job.arg, job.notes or job.note)
  local tb = not ok and last_traceback or nil
  self.current_at = nil
  if ok then
    self.stats.handled = self.stats.handled + count
    local c = stats.channel(self.stats, entry.name)
    c.handled = c.handled + count
    if job.attempt > 1 then
      self.log.info("handler succeeded after retrying", { channel = entry.name, attempts = job.attempt })
    end
    return self:settled(job, true)
  end
  if job.attempt < attempts and not self.rt:past_grace() then
    self.stats.retries = self.stats.retries + 1
    local c = stats.channel(self.stats, entry.name)
    c.retries = c.retries + 1
    local wait = backoff.delay(job.attempt, backoff.of(entry))
    self.log.warn("handler failed; retrying", {
      channel = entry.name, error = errstring(err), attempt = job.attempt, of = attempts,
      retry_in = ("%.3f"):format(wait),
    })
    lane.job, lane.wait_until = job, now() + wait
    return
  end
  self:handler_failed(entry, job.note, err, tb, job.attempt, job.sent, job.payload)
  return self:settled(job, false)
end

-- Acknowledges the notes of a settled job to the sources that want it.
function M:settled(job, ok)
  local notes = job.sent or { job.note }
  for _, n in ipairs(notes) do
    local src = n.src
    if src then src:ack(n, ok) end
  end
end

return M
