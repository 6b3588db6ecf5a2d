--- The outbox source: durable channels, served from `pglisten.outbox` on a
-- connection of its own (never the listening one: a long transaction there
-- would hold back the server's NOTIFY queue).
--
-- When the outbox is claimed: at start and after every reconnect (connect),
-- on a wake-up notification (`pglisten_outbox`, routed here by the
-- dispatcher), after a reload that keeps durable channels, when the
-- earliest retry is due (`retry_at`: the backoff of a failed event), and
-- every `poll_interval` seconds as the safety net (timeout/tick).  Only while
-- the listening connection is up (and leads, when single active).
--
-- A claim locks up to CLAIM due events with FOR UPDATE SKIP LOCKED; the
-- handler runs per event (or per run, for a batch channel) through
-- dispatch.invoke; `outbox.finish` deletes the handled ones and reschedules
-- the failed ones after `backoff.delay` (the channel's retry.backoff and
-- retry.max_backoff, 1 s and 30 s by default), or buries them in
-- `pglisten.dead` after `max_attempts`.  At least once: a runner that dies
-- mid-batch leaves its events to the next claimer.
--
-- It also watches for events nobody serves (see `orphans`).
-- @module pglisten.sources.outbox

local pg = require "pglisten"
local outbox = require "pglisten.outbox"
local backoff = require "pglisten.backoff"
local dispatch = require "pglisten.dispatch"
local stats = require "pglisten.services.stats"

local M = {}
M.__index = M

local now = pg.monotonic
local invoke, errstring = dispatch.invoke, dispatch.errstring

M.POLL_INTERVAL = 5  -- seconds between safety-net polls
M.CLAIM = 100        -- events claimed per transaction
M.WARN_EVERY = 60    -- seconds between two warnings about one channel

-- A text[] literal of channel names, every element quoted.
local function outbox_names(list)
  local lit = {}
  for i, n in ipairs(list) do lit[i] = '"' .. n:gsub('[\\"]', "\\%0") .. '"' end
  return "{" .. table.concat(lit, ",") .. "}"
end

--- The ordered ones (`ordered = true`) among durable channel names `names`.
function M.ordered(spec, names)
  local list = {}
  for _, n in ipairs(names) do
    if spec.channels[n].ordered then list[#list + 1] = n end
  end
  return list
end

--- Durable channel names of a spec, sorted.
function M.wants(spec)
  local list = {}
  for _, n in ipairs(spec.names) do
    if spec.channels[n].durable then list[#list + 1] = n end
  end
  return list
end

function M.new(rt)
  local self = setmetatable({ rt = rt, log = rt.log, stats = rt.stats, warned = {}, seen = {} }, M)
  self.names = M.wants(rt.spec)
  rt.dispatch:route(outbox.WAKEUP_CHANNEL, function(_, q)
    -- coalesce a run of wake-ups into one claim
    while q:peek() and q:peek().channel == outbox.WAKEUP_CHANNEL do q:pop() end
    self.due = self.due or "wake-up"
    rt:wake()
  end)
  return self
end

function M:poll_interval() return self.rt.spec.poll_interval or M.POLL_INTERVAL end

function M:connect(info)
  self.due = info.reconnect and "reconnect" or "start"
end

function M:reload(_, new)
  self.names = M.wants(new)
  if #self.names > 0 then self.due = "reload" end
end

function M:timeout(t)
  if not self.rt:active() then return nil end -- nothing to do until the listening connection is up
  self.next_poll = self.next_poll or (t + self:poll_interval())
  self.next_watch = self.next_watch or (t + self:watch_every())
  local due = self.next_watch
  if #self.names > 0 then
    if self.due then return 0 end
    due = math.min(due, self.next_poll, self.retry_at or math.huge)
  end
  return due - t
end

function M:tick(t)
  if self.rt:active() then
    if #self.names > 0 then
      local why = self.due or (t >= (self.next_poll or math.huge) and "poll")
        or (t >= (self.retry_at or math.huge) and "retry")
      if why then self:serve(why) end
    end
    if t >= (self.next_watch or math.huge) then
      self.next_watch = now() + self:watch_every()
      self:orphans()
    end
  end
end

function M:conn()
  local c = self.obconn
  if c and not c:isclosed() then return c end
  local err
  c, err = pg.connect(self.rt.db, { timeout = self.rt.settings.connect_timeout })
  if not c then return nil, err end
  self.obconn = c
  return c
end

-- A failed event's row for outbox.finish; remembers the earliest retry.
function M:failure(entry, ev, msg)
  local base, cap = backoff.of(entry)
  local wait = backoff.delay(ev.attempts + 1, base, cap)
  if not self.min_wait or wait < self.min_wait then self.min_wait = wait end
  return { id = ev.id, error = msg, attempts = ev.attempts, max_attempts = entry.max_attempts or outbox.MAX_ATTEMPTS,
    backoff = wait }
end

-- Decodes a run of claimed events; returns values and notes of the good ones.
function M:decode(entry, events, failed)
  local decode, values, notes = dispatch.decoder(entry), {}, {}
  for _, ev in ipairs(events) do
    local note = {
      channel = ev.channel, payload = ev.payload, id = ev.id, attempts = ev.attempts,
      created_at = ev.created_at, received_at = pg.now(), durable = true,
    }
    local v, err = decode(ev.payload)
    local c = stats.channel(self.stats, entry.name)
    -- a claimed event is received; claimed again after a failure, a retry
    c.received, self.stats.received = c.received + 1, self.stats.received + 1
    if ev.attempts > 0 then c.retries, self.stats.retries = c.retries + 1, self.stats.retries + 1 end
    if v == nil then
      self.stats.failed_decode = self.stats.failed_decode + 1
      c.failed_decode = c.failed_decode + 1
      self.log.error("durable event rejected", { channel = ev.channel, id = ev.id, error = err,
        payload = dispatch.excerpt(ev.payload) })
      failed[#failed + 1] = self:failure(entry, ev, err)
      self.rt.dispatch:on_error(err, note, { kind = "decode", channel = entry.name, durable = true })
    else
      values[#values + 1], notes[#notes + 1] = v, note
    end
  end
  return values, notes
end

-- Handles one claimed event or a run of them; adds to failed and done.
function M:handle(entry, events, failed, done)
  local values, notes = self:decode(entry, events, failed)
  if #notes == 0 then return end
  local ok, err, tb
  if entry.batch then
    ok, err = invoke(entry.handler, values, notes)
  else
    ok, err = invoke(entry.handler, values[1], notes[1])
  end
  if not ok then tb = dispatch.traceback() end
  for i, note in ipairs(notes) do
    if ok then
      done[#done + 1] = note.id
      self.stats.handled = self.stats.handled + 1
      local c = stats.channel(self.stats, entry.name)
      c.handled = c.handled + 1
    else
      local attempts = note.attempts + 1
      local maxa = entry.max_attempts or outbox.MAX_ATTEMPTS
      local msg = errstring(err)
      self.stats.failed_handler = self.stats.failed_handler + 1
      local c = stats.channel(self.stats, entry.name)
      c.failed_handler = c.failed_handler + 1
      failed[#failed + 1] = self:failure(entry, note, msg)
      if i == 1 then
        self.log.error(attempts >= maxa and "durable event failed for the last time; moved to pglisten.dead"
          or "durable event failed; will retry", {
          channel = entry.name, id = note.id, attempts = attempts, max_attempts = maxa, error = msg,
          traceback = tb, count = #notes > 1 and #notes or nil })
      end
      self.rt.dispatch:on_error(err, note, { kind = "handler", channel = entry.name, durable = true,
        attempts = attempts, traceback = tb, final = attempts >= maxa })
    end
  end
end

-- Splits a claim into runs (a batch channel's consecutive events) and handles them.
-- After a failure on an ordered channel, its later events of the claim are
-- left alone (neither done nor failed: they stay as they were, behind the
-- failed one; the failure's retry timer claims again, and takes them once
-- the failed one is handled or dead).
function M:handle_claim(events, failed, done)
  local channels, i, blocked = self.rt.spec.channels, 1, {}
  while i <= #events do
    local ev = events[i]
    local entry = channels[ev.channel]
    local run = { ev }
    i = i + 1
    if blocked[ev.channel] then entry = nil end
    if entry and entry.batch then
      while i <= #events and events[i].channel == ev.channel and #run < entry.batch do
        run[#run + 1] = events[i]
        i = i + 1
      end
    end
    local nfailed = #failed
    if entry then self:handle(entry, run, failed, done) end
    if entry and entry.ordered and #failed > nfailed then blocked[ev.channel] = true end
  end
end

-- The earliest failure of the batch just finished is due `min_wait` seconds
-- after its row was updated, which was before now: claim again then.
function M:schedule_retry()
  if not self.min_wait then return end
  local at = now() + self.min_wait + 0.05
  if not self.retry_at or at < self.retry_at then self.retry_at = at end
  self.min_wait = nil
end

local NEXT_DUE = [[
SELECT extract(epoch FROM min(run_at) - clock_timestamp())::float8 AS wait
  FROM pglisten.outbox WHERE channel = ANY($1::text[]) AND run_at > clock_timestamp()]]

-- After a retry: when the next event that waits for its backoff is due.
function M:next_retry(conn)
  local r = conn:exec(NEXT_DUE, outbox_names(self.names))
  local wait = r and r[1] and r[1].wait
  if type(wait) == "number" then
    local at = now() + wait + 0.05
    if not self.retry_at or at < self.retry_at then self.retry_at = at end
  end
end

--- Claims and handles due durable events until none is left (or the
-- runner stops).  Returns the number handled.
function M:serve(reason)
  -- a serve for another reason leaves the pending retry's time alone
  if reason == "retry" then self.retry_at = nil end
  self.due, self.min_wait = nil, nil
  self.next_poll = now() + self:poll_interval()
  local conn, err = self:conn()
  if not conn then
    self.log.warn("outbox: cannot connect", { error = err })
    return 0
  end
  local total = 0
  while not self.rt:stopping() do
    local events, cerr = outbox.claim(conn, self.names, M.CLAIM, M.ordered(self.rt.spec, self.names))
    if not events then
      self.log.warn("outbox: claim failed", { error = cerr, reason = reason })
      return total
    end
    if #events == 0 then break end
    local done, failed = {}, {}
    self:handle_claim(events, failed, done)
    local ok, ferr = outbox.finish(conn, done, failed)
    if not ok then
      -- rolled back: the events are claimable again (at-least-once)
      self.log.warn("outbox: finishing a batch failed; its events will be handled again", { error = ferr })
      return total
    end
    total = total + #done
    self:schedule_retry()
    self.rt:signals()
    if #events < M.CLAIM then break end
  end
  if reason == "retry" then self:next_retry(conn) end
  if total > 0 then self.log.debug("outbox served", { handled = total, reason = reason }) end
  return total
end

---------------------------------------------------------------------------
-- Events nobody serves
---------------------------------------------------------------------------

-- Seconds between two looks (and how long an event must have been due).
function M:watch_every()
  return math.max(3 * self:poll_interval(), 1)
end

local ORPHANS = [[
SELECT channel, count(*) AS n, min(id) AS first
  FROM pglisten.outbox
 WHERE run_at <= now() - make_interval(secs => $2::float8) AND NOT (channel = ANY($1::text[]))
 GROUP BY channel ORDER BY channel]]

--- Warns about outbox events waiting on channels that no running runner
-- seems to serve.  The heuristic: events of a channel this runner does not
-- serve durably have been due for longer than `watch_every` seconds (3 poll
-- intervals, at least 1 s), and the oldest of them is the same one as at the
-- last look (nobody made progress).  At most one warning per channel a
-- minute.  A runner without durable channels looks only when schema
-- pglisten exists, and keeps no connection open for it.
function M:orphans()
  local conn = self:conn()
  if not conn then return end
  local r = conn:exec("SELECT to_regclass('pglisten.outbox') IS NOT NULL AS has")
  if r and not r[1].has then self.next_watch = now() + M.WARN_EVERY end -- no schema: look again later
  if r and r[1].has then
    r = conn:exec(ORPHANS, outbox_names(self.names), self:watch_every() + 0.0)
    local t, seen = now(), {}
    for i = 1, r and r.n or 0 do
      local row = r[i]
      seen[row.channel] = row.first
      if self.seen[row.channel] == row.first and t - (self.warned[row.channel] or -math.huge) >= M.WARN_EVERY then
        self.warned[row.channel] = t
        self.log.warn("outbox events wait for a channel that no running runner serves durably",
          { channel = row.channel, count = row.n })
      end
    end
    self.seen = seen
  end
  if #self.names == 0 then
    conn:close()
    self.obconn = nil
  end
end

function M:close()
  if self.obconn then self.obconn:close() end
  self.obconn = nil
end

return M
