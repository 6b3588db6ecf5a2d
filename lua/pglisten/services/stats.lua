--- Statistics: the runner's counters, logged every `stats_interval`
-- seconds and on SIGUSR1.  Hooks: timeout, tick.
--
-- What the counters count (README, "Statistics and metrics"):
--   received        notes read from the listening connection (every NOTIFY
--                   the server delivered, also on channels without a
--                   handler and the outbox's wake-ups), durable events
--                   claimed from the outbox (a retried event again at each
--                   claim) and rows streamed from the replication slot
--   handled         notes (a batch: each of its notes) whose handler
--                   returned without raising, on the first try or a retry
--   failed_decode   notes whose payload the channel's decoder refused
--   failed_handler  notes whose handler raised on its last attempt (a
--                   durable event: on every attempt, since it is retried
--                   from the outbox)
--   retries         handler calls that were retries of a failed one
--   reconnects      connections made again after being lost
--   unrouted        notes on channels without a handler (also plain
--                   NOTIFYs on durable channels)
-- `channels[name]` holds received, handled, failed_decode, failed_handler
-- and retries per channel (pglisten.services.metrics serves them).
-- @module pglisten.services.stats

local pg = require "pglisten"

local M = {}
M.__index = M

local now = pg.monotonic

--- The counters every part of the runner adds to.
function M.counters()
  return { received = 0, handled = 0, failed_decode = 0, failed_handler = 0, retries = 0, reconnects = 0, unrouted = 0,
    channels = {} }
end

--- The counters of channel `name` in `s` (made at its first note).
function M.channel(s, name)
  local c = s.channels[name]
  if not c then
    c = { received = 0, handled = 0, failed_decode = 0, failed_handler = 0, retries = 0 }
    s.channels[name] = c
  end
  return c
end

--- Counts `batch[1..n]` (notes) as received on their channels.
function M.received(s, batch, n)
  local by, channel = s.channels, M.channel
  for i = 1, n do
    local name = batch[i].channel
    local c = by[name] or channel(s, name)
    c.received = c.received + 1
  end
end

function M.new(rt)
  local self = setmetatable({ rt = rt, started = now(), started_at = pg.now() }, M)
  return self
end

function M:timeout(t)
  local iv = self.rt.settings.stats_interval
  if iv <= 0 then return nil end
  self.next_at = self.next_at or (self.started + iv)
  return self.next_at - t
end

function M:tick(t)
  local iv = self.rt.settings.stats_interval
  if iv > 0 and t >= (self.next_at or math.huge) then
    self:log()
    self.next_at = t + iv
  end
end

--- Seconds rounded to milliseconds, a number.
local function ms(x) return math.floor(x * 1000 + 0.5) / 1000 end

--- The figures of the "stats" line: numbers, never strings.
function M:figures()
  local s, d = self.rt.stats, self.rt.dispatch
  local oldest = d:oldest()
  return {
    received = s.received, handled = s.handled, failed_decode = s.failed_decode,
    failed_handler = s.failed_handler, retries = s.retries, reconnects = s.reconnects,
    unrouted = s.unrouted, queued = self.rt.notify:backlog(), -- held for on_connect too
    oldest_unhandled_age = oldest and ms(math.max(0, pg.now() - oldest)) or 0,
    uptime = math.floor(now() - self.started),
  }
end

--- One "stats" line.
function M:log()
  self.rt.log.info("stats", self:figures())
end

return M
