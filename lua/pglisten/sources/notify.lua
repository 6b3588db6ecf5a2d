--- The LISTEN/NOTIFY source: the listening connection.
--
-- Its hooks, as the loop calls them:
--   connect  -- tick while down: one attempt (through the leader service
--               when single active), LISTEN, `on_connect`, then the session
--               is put back to idle; failures wait `backoff.delay` (jittered).
--               After a reconnect, `on_connect` waits until the notes
--               received on the lost connection are settled; the new
--               connection's notes are read meanwhile but held (`hold`) and
--               go to the lanes after it: a resync is never followed by an
--               older note's write
--   pollfd/events/pending/read -- the socket the loop polls, and reading:
--               `conn:drain` into the dispatcher's lanes, up to `drain_max`
--               notes a read and while the lanes hold fewer than `read_ahead`
--   timeout/tick -- the heartbeat (an idle connection is pinged) and the
--               next reconnect
--   reload   -- LISTENs and UNLISTENs what the new spec wants and the old
--               did not (wants: every channel of the script, and the
--               outbox's wake-up channel when some channel is durable)
--   close    -- closes the connection
-- A lost connection first hands over the notes libpq has already parsed.
-- @module pglisten.sources.notify

local pg = require "pglisten"
local outbox = require "pglisten.outbox"
local backoff = require "pglisten.backoff"
local dispatch = require "pglisten.dispatch"
local conninfo_lib = require "pglisten.conninfo"
local stats = require "pglisten.services.stats"
local Queue = require "pglisten.queue"

local M = {}
M.__index = M

local now = pg.monotonic

local PERMANENT = {
  "password authentication failed", "authentication failed", "does not exist",
  "invalid connection option", 'missing "="', "invalid URI", "invalid port number",
  "invalid sslmode", "unterminated quoted string", "invalid integer value",
  "no password supplied", "is not permitted to log in", "pg_hba.conf",
  "invalid value for parameter", "invalid percent-encoded token", "unexpected spaces",
}

--- True when a connect error will not go away by retrying.
function M.permanent(err)
  for _, p in ipairs(PERMANENT) do
    if err:find(p, 1, true) then return true end
  end
  return false
end

--- Names the listening connection `lua-pglisten` in pg_stat_activity,
-- unless the conninfo (or PGAPPNAME) names it already.
function M.with_application_name(conninfo)
  local set = pg.core.conninfo_keys(conninfo)
  if not set or set.application_name or os.getenv("PGAPPNAME") then return conninfo end
  -- where libpq reads it, as with_keepalives does (a "?" in a password starts no query)
  return conninfo_lib.add(conninfo, { "application_name=lua-pglisten" })
end

--- The channels a spec wants LISTENed, sorted.  Durable channels are
-- listened to as well, only to warn about plain NOTIFYs sent to them.
function M.wants(spec)
  local list, durable = {}, false
  for _, n in ipairs(spec.names) do
    local e = spec.channels[n]
    if not e.source or e.source == "notify" then list[#list + 1] = n end
    if e.durable then durable = true end
  end
  if durable then list[#list + 1] = outbox.WAKEUP_CHANNEL end
  table.sort(list)
  return list
end

--- The durable channels of a spec, comma-separated (nil: none), for the
-- "listening" line: they are served from the outbox, not LISTENed.
function M.durable_names(spec)
  local t = {}
  for _, n in ipairs(spec.names) do if spec.channels[n].durable then t[#t + 1] = n end end
  return #t > 0 and table.concat(t, ",") or nil
end

--- A source for runtime `rt` (spec, log, stats, settings, dispatch, leader).
function M.new(rt)
  local self = setmetatable({ rt = rt, log = rt.log, stats = rt.stats, buf = {}, first = true }, M)
  self.conninfo = M.with_application_name(rt.db)
  self.next_connect, self.attempt, self.last_warn = now(), 0, -math.huge
  return self
end

function M:pollfd()
  local c = self.conn
  if c and not self:full() then return c:pollfd() end
end
function M:events() return self.conn and self.conn:events() or "r" end
--- True when more notes may be there without waiting (the last read brought some).
function M:pending()
  return self.more and self.conn ~= nil and not self:full()
end

--- Moves up to `max` notes libpq has (or the socket has, without waiting)
-- into the lanes.  Returns the count, or nil when the connection is lost.
function M:read(max)
  local conn = self.conn
  if not conn then return 0 end
  max = max or self.rt.settings.drain_max
  if self.deferred then -- held until on_connect has run (see connected), bounded alike
    local room = self.rt.settings.read_ahead - self:backlog()
    if room <= 0 then return 0 end
    if max > room then max = room end
  end
  local batch, err, code = conn:drain(max, self.buf)
  if not batch then
    self:lost(err .. (code and (" (" .. code .. ")") or ""))
    return nil
  end
  local n = batch.n
  -- read again before polling while reads bring notes: a busy socket costs
  -- no poll per read, an idle one one read that finds nothing
  self.more = n > 0
  if n > 0 then
    stats.received(self.stats, batch, n)
    if self.deferred then self:hold(batch, n) else self.rt.dispatch:append(batch, n) end
    self.last_io = now()
    self.stats.received = self.stats.received + n
  end
  return n
end

--- Reads every note the server sent before now (up to the read-ahead
-- limit), for a reload.  A ping first: a note committed before now may not
-- have reached the socket yet (its backend runs late on a loaded machine),
-- and the server sends it before the ping's answer.  No ping while the
-- lanes are full (see `full`).  While on_connect waits the notes are held
-- (see `hold`), stamped before the reload all the same.
function M:read_arrived()
  local limit = self.rt.settings.read_ahead
  if self.conn and not self:full() then
    local ok, err = self.conn:ping(self.rt.settings.heartbeat_timeout)
    if not ok then return self:lost("ping before reload failed: " .. tostring(err)) end
    self.last_io = now()
  end
  repeat
    local n = self:read()
  until not n or n < self.rt.settings.drain_max or self:backlog() >= limit
end

local NONE = Queue.new() -- no wake-ups behind one that is held back

--- While on_connect waits: keeps the new connection's notes (batch[1..n])
-- for after it.  An outbox wake-up goes to the outbox at once: durable
-- events do not depend on NOTIFY order, and must not wait for a retry.
function M:hold(batch, n)
  local held = self.held or { n = 0 }
  self.held = held
  local wake = self.rt.dispatch.routes[outbox.WAKEUP_CHANNEL]
  for i = 1, n do
    local note = batch[i]
    if wake and note.channel == outbox.WAKEUP_CHANNEL then
      wake(note, NONE)
    else
      held.n = held.n + 1
      held[held.n] = note
    end
  end
end

-- The held notes to the lanes, in server order: after on_connect, or when
-- their connection is lost (they were received before the loss).
function M:release()
  local held = self.held
  if not held then return end
  self.held = nil
  self.rt.dispatch:append(held, held.n)
end

--- Notes read and not handled yet: the lanes' and the held ones.
function M:backlog()
  return self.rt.dispatch:queued() + (self.held and self.held.n or 0)
end

-- Everything libpq has parsed, before the connection goes.
function M:drain_all()
  local conn = self.conn
  while true do
    local batch = conn:drain(self.rt.settings.drain_max, self.buf)
    if not batch or batch.n == 0 then return end
    stats.received(self.stats, batch, batch.n)
    self.rt.dispatch:append(batch, batch.n)
    self.stats.received = self.stats.received + batch.n
  end
end

--- The connection is gone: deliver what was parsed, close, reconnect soon.
function M:lost(err)
  if not self.conn then return end
  self:release()
  self:drain_all()
  self.log.warn("connection lost", { error = err, queued = self.rt.dispatch:queued() })
  if self.rt.leader then self.rt.leader:lost() end
  self.conn:close()
  self.conn, self.more, self.deferred = nil, false, nil
  self.lost_at, self.next_connect, self.attempt = now(), now(), 0
end

-- True while the lanes (and the held notes) hold the read-ahead limit:
-- nothing is read, and the heartbeat waits too, since a ping reads every
-- note the server has sent before its answer into libpq's own queue
-- (200 MB in 6 s of a stall at five pings a second), which is what the
-- limit is there to prevent.  A connection lost meanwhile is found when
-- reading resumes.
function M:full()
  return self:backlog() >= self.rt.settings.read_ahead
end

function M:timeout(t)
  if not self.conn then return self.next_connect - t end
  if self.deferred and self.rt.dispatch:queued() == 0 then return 0 end
  local hb = self.rt.settings.heartbeat
  if hb > 0 and not self:full() then return self.last_io + hb - t end
end

function M:tick(t)
  if not self.conn then
    if t >= self.next_connect and not self.rt:stopping() then self:connect() end
    return
  end
  if self.deferred and self.rt.dispatch:queued() == 0 then
    local info = self.deferred
    self.deferred, self.more = nil, true
    self:call_on_connect(info)
    self:release() -- (lost already released them when on_connect lost the connection)
    if not self.conn then return end
  end
  local s = self.rt.settings
  if s.heartbeat > 0 and t - self.last_io >= s.heartbeat and not self:full() then
    local ok, err = self.conn:ping(s.heartbeat_timeout)
    if ok then
      self.last_io, self.more = now(), true -- the ping may have brought notes
    else
      self:lost("heartbeat failed: " .. tostring(err))
    end
  end
end

-- One attempt: conn (listening), or nil, err ("standby": another leads).
function M:open()
  local leader = self.rt.leader
  local conn, err
  if leader then
    conn, err = leader:acquire(self.conninfo)
  else
    conn, err = pg.connect(self.conninfo,
      { timeout = self.rt.settings.connect_timeout, heal = false, interruptible = true })
  end
  if not conn then return nil, err end
  local wants = M.wants(self.rt.spec) -- none when every channel streams from the WAL
  local ok, lerr = true, nil
  if #wants > 0 then ok, lerr = conn:listen(table.unpack(wants)) end
  if not ok then
    conn:close()
    return nil, "LISTEN failed: " .. tostring(lerr)
  end
  return conn
end

--- One connection attempt; on failure the next one is scheduled.
function M:connect()
  self.attempt = self.attempt + 1
  local conn, err = self:open()
  if conn then return self:connected(conn) end
  local leader, s = self.rt.leader, self.rt.settings
  if err == "standby" then
    self.attempt = 0
    self.next_connect = now() + leader:standby()
    return
  end
  if self.first and M.permanent(err) then
    self.rt.fatal = err
    return
  end
  local wait = backoff.delay(self.attempt, s.reconnect_min, s.reconnect_max, 0.5)
  local t = now()
  -- one warning at first, then one every 30 s; every attempt at debug
  if t - self.last_warn >= 30 then
    self.log.warn(self.first and "cannot connect yet; retrying" or "reconnect failed; retrying",
      { error = err, attempt = self.attempt, next_in = ("%.2f"):format(wait) })
    self.last_warn = t
  else
    self.log.debug("reconnect attempt failed", { error = err, attempt = self.attempt })
  end
  self.next_connect = t + wait
end

function M:connected(conn)
  local first = self.first
  self.conn, self.last_io, self.first, self.more = conn, now(), false, true
  local info = { reconnect = not first, attempts = self.attempt }
  if not first then
    info.disconnected_for = now() - (self.lost_at or now())
    self.stats.reconnects = self.stats.reconnects + 1
    self.reconnects = (self.reconnects or 0) + 1 -- this source's own (metrics)
  end
  self.lost_at, self.attempt, self.last_warn = nil, 0, -math.huge
  self.log.info(first and "listening" or "reconnected", {
    db = pg.safe_conninfo(self.rt.db), pid = conn:pid(), channels = table.concat(M.wants(self.rt.spec), ","),
    durable = M.durable_names(self.rt.spec),
    attempts = info.attempts, disconnected_for = info.disconnected_for and ("%.3f"):format(info.disconnected_for),
  })
  self.rt:connected(info)
  -- the notes received on the lost connection are handled first (or given
  -- up after their retries): an on_connect that resyncs a target must not
  -- be followed by an older note that writes a stale value over it.  The
  -- lanes hold only this source's notes, so they are these; tick calls
  -- on_connect once they are settled, and until then what the new
  -- connection brings is held (see `hold`), so its notes still come after
  -- on_connect, and a second loss, a reload or the heartbeat work as ever
  local queued = self.rt.dispatch:queued()
  if self.rt.spec.on_connect and queued > 0 then
    self.deferred = info
    self.log.info("on_connect waits for the notes received before the loss", { queued = queued })
    return
  end
  self:call_on_connect(info)
end

-- on_connect, then the session back to idle: the server delivers nothing
-- to a session inside a transaction.
function M:call_on_connect(info)
  local f, conn = self.rt.spec.on_connect, self.conn
  if not f then return end
  local ok, err = self.rt.invoke(f, conn, info)
  if not ok then
    self.log.error("on_connect failed; listening goes on",
      { error = self.rt.errstring(err), traceback = dispatch.traceback() })
  end
  if conn:isclosed() or conn:status() ~= "ok" then return self:lost("connection lost in on_connect") end
  local tx = conn:txstatus()
  if tx ~= "idle" then
    local _, rerr = conn:exec("ROLLBACK")
    self.log.error("on_connect left the listening connection inside a transaction; rolled back",
      { txstatus = tx, error = rerr })
    if rerr then return self:lost("ROLLBACK after on_connect failed: " .. tostring(rerr)) end
  end
end

-- Sorted list of what is in `a` and not in `b`.
local function minus(a, b)
  local set, out = {}, {}
  for _, n in ipairs(b) do set[n] = true end
  for _, n in ipairs(a) do if not set[n] then out[#out + 1] = n end end
  return out
end

--- LISTENs to what the new spec wants and the old one did not, UNLISTENs
-- the reverse.
function M:reload(old, new)
  local conn = self.conn
  if not conn then return end
  local was, will = M.wants(old), M.wants(new)
  local added, removed = minus(will, was), minus(was, will)
  local ok, err = true, nil
  if #added > 0 then ok, err = conn:listen(table.unpack(added)) end
  if ok and #removed > 0 then ok, err = conn:unlisten(table.unpack(removed)) end
  if not ok then return self:lost("LISTEN after reload failed: " .. tostring(err)) end
  self.more = true
end

function M:close()
  if self.conn then self.conn:close() end
  self.conn = nil
end

return M
