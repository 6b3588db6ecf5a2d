--- Statistics: the runner's counters, logged every `stats_interval`
-- seconds and on SIGUSR1.  Hooks: timeout, tick.
-- @module pglisten.services.stats

local pg = require "pglisten"

local M = {}
M.__index = M

local now = pg.monotonic

--- The counters every part of the runner adds to.
function M.counters()
  return { received = 0, handled = 0, failed_decode = 0, failed_handler = 0, retries = 0, reconnects = 0, unrouted = 0 }
end

function M.new(rt)
  local self = setmetatable({ rt = rt, started = now() }, M)
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

--- One "stats" line.
function M:log()
  local s, d = self.rt.stats, self.rt.dispatch
  local oldest = d:oldest()
  self.rt.log.info("stats", {
    received = s.received, handled = s.handled, failed_decode = s.failed_decode,
    failed_handler = s.failed_handler, retries = s.retries, reconnects = s.reconnects,
    unrouted = s.unrouted, queued = d:queued(),
    oldest_unhandled_age = oldest and ("%.3f"):format(math.max(0, pg.now() - oldest)) or "0",
    uptime = ("%.0f"):format(now() - self.started),
  })
end

return M
