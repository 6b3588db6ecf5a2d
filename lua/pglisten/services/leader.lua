--- Leader election for single-active runners.
--
-- Runners with the same lock name on the same database elect a leader with
-- a session advisory lock held by the listening connection: the notify
-- source asks `acquire` for its connection.  The others stand by and try
-- every `standby_retry` seconds; the lock goes with the leader's session,
-- so a dead leader is replaced within about a second.
--
-- The lock name is fixed when the runner starts: `single_active = "name"`,
-- or "lua-pglisten:" and the script's file name.  It never depends on the
-- channels, so a reload cannot make a second leader.
--
-- Hooks: connect (info.leader, the "leading" line), lost (a leader that lost
-- its session lets the standbys go first), reload (a changed name is for the
-- next start), close.
-- @module pglisten.services.leader

local pg = require "pglisten"

local M = {}
M.__index = M

local now = pg.monotonic

M.STANDBY_RETRY = 1

--- The advisory lock name for a script path and its `single_active` value.
function M.lock_name(path, single_active)
  if type(single_active) == "string" then return single_active end
  local base = (path or "script"):match("([^/]+)$") or "script"
  return "lua-pglisten:" .. base
end

function M.new(rt)
  local self = setmetatable({ rt = rt, log = rt.log }, M)
  self.name = M.lock_name(rt.spec.path, rt.spec.single_active)
  return self
end

--- The listening connection, holding the lock; or nil, "standby"; or nil, err.
function M:acquire(conninfo)
  if self.yield_until and now() < self.yield_until then
    return nil, "standby" -- lost the lead: a waiting standby goes first
  end
  local conn = self.standby_conn
  if not conn or not conn:alive() then
    if conn then conn:close() end
    local err
    conn, err = pg.connect(conninfo, { timeout = self.rt.settings.connect_timeout, heal = false, interruptible = true })
    if not conn then return nil, err end
  end
  local r, err = conn:exec(
    "SELECT pg_try_advisory_lock(('x' || substr(md5($1), 1, 16))::bit(64)::bigint) AS leader", self.name)
  if not r then
    conn:close()
    self.standby_conn = nil
    return nil, err
  end
  if not r[1].leader then
    self.standby_conn = conn
    return nil, "standby"
  end
  self.standby_conn, self.leading = nil, true
  return conn
end

--- Another runner leads: logs it once; returns the seconds until the next try.
function M:standby()
  if not self.standing_by then
    self.standing_by = true
    self.log.info("standing by: another runner is active", { lock = self.name })
  end
  return M.STANDBY_RETRY
end

function M:connect(info)
  info.leader = true
  if self.standing_by then
    self.standing_by = false
    self.log.info("leading: took over as the active runner", { lock = self.name })
  end
end

function M:lost()
  if self.leading then
    self.leading = false
    self.yield_until = now() + 1.5 * M.STANDBY_RETRY
  end
end

function M:reload(_, new)
  local name = M.lock_name(new.path, new.single_active)
  if name ~= self.name then
    self.log.warn("single_active lock name changed; it takes effect at the next start",
      { lock = self.name, new = name })
  end
end

function M:close()
  if self.standby_conn then self.standby_conn:close() end
  self.standby_conn = nil
end

return M
