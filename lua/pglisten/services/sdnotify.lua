--- systemd's notification protocol (sd_notify), for `Type=notify` units.
--
-- Active when $NOTIFY_SOCKET is set (systemd sets it; a path, or an
-- abstract socket name beginning with '@').  Datagrams go through
-- `core.sd_notify` (a few lines of C: no libsystemd to link, and luasocket
-- cannot address an abstract socket).  What is sent:
--   READY=1                  once the listening connection is up the first
--                            time (the "listening" line)
--   RELOADING=1 and MONOTONIC_USEC=  when a SIGHUP reload begins, READY=1
--                            when it is done (also when the script failed
--                            to load and the old one goes on)
--   STOPPING=1               when a stop signal arrives, and at shutdown
--   STATUS=...               one line: channels, handled, failed, queued,
--                            connected or not; with READY and at most
--                            every STATUS_EVERY seconds while it changes
--   WATCHDOG=1               every WATCHDOG_USEC / 2 while the loop turns
--                            (from its timers: a handler that never returns
--                            stops the pings, and systemd restarts the unit)
-- WATCHDOG_PID, when set, must be this process.  A failed send is logged
-- once and never stops the runner.
-- Hooks: connect, timeout, tick, close; the loop calls reloading, ready
-- and stopping.
-- @module pglisten.services.sdnotify

local pg = require "pglisten"

local M = {}
M.__index = M

local now = pg.monotonic

M.STATUS_EVERY = 10

-- This process's pid, from /proc (Lua has no getpid).
local function getpid()
  local f = io.open("/proc/self/stat", "r")
  if not f then return nil end
  local s = f:read("l")
  f:close()
  return s and tonumber(s:match("^(%d+)"))
end

--- The watchdog interval in seconds from the environment, or nil.
function M.watchdog_interval(usec, wpid, pid)
  local us = tonumber(usec)
  if not us or us <= 0 then return nil end
  if wpid and wpid ~= "" and tonumber(wpid) ~= pid then return nil end
  return us / 2e6
end

--- The service for runtime `rt`, or nil when $NOTIFY_SOCKET is not set.
function M.new(rt, env)
  env = env or os.getenv
  local addr = env("NOTIFY_SOCKET")
  if not addr or addr == "" then return nil end
  local self = setmetatable({ rt = rt, addr = addr }, M)
  self.watchdog = M.watchdog_interval(env("WATCHDOG_USEC"), env("WATCHDOG_PID"), getpid())
  if self.watchdog then self.next_ping = now() + self.watchdog end
  return self
end

--- Sends `msg` (lines "KEY=value").
function M:send(msg)
  local ok, err = pg.core.sd_notify(self.addr, msg)
  if not ok and not self.warned then
    self.warned = true
    self.rt.log.warn("sd_notify failed", { socket = self.addr, error = err })
  end
  return ok
end

--- The one-line summary.
function M:status()
  local rt, s = self.rt, self.rt.stats
  local state = rt.stop_at and "stopping" or (rt:active() and "listening" or "connecting")
  return ("%s on %d channel%s; received %d, handled %d, failed %d, queued %d"):format(state, #rt.spec.names,
    #rt.spec.names == 1 and "" or "s", s.received, s.handled, s.failed_decode + s.failed_handler,
    rt.notify:backlog()) -- held for on_connect too
end

function M:ready()
  self.is_ready = true
  self.last_status = self:status()
  self.status_at = now()
  self:send("READY=1\nSTATUS=" .. self.last_status)
end

function M:reloading()
  self:send(("RELOADING=1\nMONOTONIC_USEC=%d\nSTATUS=reloading"):format(math.floor(now() * 1e6)))
end

function M:stopping()
  if self.stopped then return end
  self.stopped = true
  self:send("STOPPING=1\nSTATUS=" .. self:status())
end

function M:connect()
  if not self.is_ready then self:ready() end
end

function M:timeout(t)
  local due = self.next_ping or math.huge
  if self.is_ready then due = math.min(due, self.status_at + M.STATUS_EVERY) end
  if due == math.huge then return nil end
  return due - t
end

function M:tick(t)
  if self.next_ping and t >= self.next_ping then
    self.next_ping = t + self.watchdog
    self:send("WATCHDOG=1")
  end
  if self.is_ready and t >= self.status_at + M.STATUS_EVERY then
    self.status_at = t
    local st = self:status()
    if st ~= self.last_status then
      self.last_status = st
      self:send("STATUS=" .. st)
    end
  end
end

function M:close() self:stopping() end

return M
