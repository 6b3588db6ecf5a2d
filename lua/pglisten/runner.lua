--- The lua-pglisten runner: the loop.
--
-- The C host (src/main.c) calls `main(argv)` (pglisten.cli) and exits with
-- what it returns: 0 after a clean shutdown, 1 on a fatal runtime error, 2 on
-- a usage or script error.
--
-- The loop waits on every source's socket and the signal pipe at once
-- (`core.poll`), reads what arrived into the dispatcher's lanes, dispatches,
-- runs the timers (`tick`), and handles signals (TERM/INT stop, HUP reload,
-- USR1 stats), reload and shutdown.  Everything else is a part with hooks
-- the loop calls:
--
--   sources  pglisten.sources.notify (LISTEN/NOTIFY), pglisten.sources.outbox
--            (durable channels)
--   services pglisten.services.leader (single active), pglisten.services.stats
--
-- A source may have: `pollfd()`/`events()` (the socket to wait on, nil for
-- none), `pending()` (data already buffered: read without waiting),
-- `read()`, `ack(note, ok)` (a note it delivered with `note.src` set is
-- settled), and, like a service, `connect(info)` (the listening connection
-- is up), `reload(old, new)`, `timeout(t)` (seconds until its next timer),
-- `tick(t)` and `close()`.  A source with its own connection and
-- acknowledgement (logical replication: confirm an LSN once its transaction
-- is handled) is one more entry in `sources`.
-- @module pglisten.runner

local pg = require "pglisten"
local host = require "pglisten.host"
local scriptmod = require "pglisten.script"
local dispatch = require "pglisten.dispatch"
local notify = require "pglisten.sources.notify"
local outbox_source = require "pglisten.sources.outbox"
local replication = require "pglisten.sources.replication"
local leader = require "pglisten.services.leader"
local stats = require "pglisten.services.stats"
local metrics = require "pglisten.services.metrics"
local sdnotify = require "pglisten.services.sdnotify"

local M = {}

local now = pg.monotonic
local poll = pg.core.poll

M.DEFAULTS = {
  reconnect_min = 0.1,
  reconnect_max = 30,
  heartbeat = 30,
  heartbeat_timeout = 10,
  stats_interval = 60,
  connect_timeout = 10,
  stop_grace = 3,        -- seconds to finish notifications already received after TERM
  drain = 256,           -- notifications taken from libpq per read
  retry_buffer = 10000,  -- notifications read ahead while a handler waits to retry
}

-- Compatibility: these lived here before the split.
M.permanent = notify.permanent
M.with_application_name = notify.with_application_name

local Runner = {}
Runner.__index = Runner
M.Runner = Runner

--- Settings: command line over script over defaults.
function M.settings(opts, spec)
  local D, rc = M.DEFAULTS, spec.reconnect or {}
  local s = {
    reconnect_min = opts["reconnect-min"] or rc.min or D.reconnect_min,
    reconnect_max = opts["reconnect-max"] or rc.max or D.reconnect_max,
    heartbeat = opts.heartbeat or spec.heartbeat or D.heartbeat,
    heartbeat_timeout = spec.heartbeat_timeout or D.heartbeat_timeout,
    stats_interval = opts["stats-interval"] or spec.stats_interval or D.stats_interval,
    connect_timeout = D.connect_timeout,
    read_ahead = D.retry_buffer,
  }
  if s.reconnect_max < s.reconnect_min then s.reconnect_max = s.reconnect_min end
  -- notes taken from libpq per read: enough to fill the largest batch
  local drain = spec.batch_size or D.drain
  for _, e in pairs(spec.channels) do
    if e.batch and e.batch > drain then drain = e.batch end
  end
  s.drain_max = drain
  return s
end

function Runner.new(opts, spec, log)
  local self = setmetatable({ opts = opts, log = log }, Runner)
  if opts["single-active"] and not spec.single_active then spec.single_active = true end
  self.spec, self.settings = spec, M.settings(opts, spec)
  self.db = opts.db or os.getenv("DATABASE_URL") or ""
  self.stats = stats.counters()
  self.invoke, self.errstring = dispatch.invoke, dispatch.errstring
  self.ordering = spec.ordering or "global"
  self.dispatch = dispatch.new(self, self.ordering)
  self.leader = spec.single_active and leader.new(self) or nil
  self.stats_service = stats.new(self)
  self.notify = notify.new(self)
  self.outbox = outbox_source.new(self)
  self.replication = replication.new(self)
  self.sources = { self.notify, self.outbox, self.replication }
  -- hook order: the leader sets info.leader before the others see it
  self.parts = { self.leader, self.notify, self.outbox, self.replication, self.stats_service }
  if not self.leader then table.remove(self.parts, 1) end
  -- optional services (nil when not configured)
  self.metrics, self.sdnotify = metrics.new(self), sdnotify.new(self)
  if self.metrics then self.parts[#self.parts + 1] = self.metrics end
  if self.sdnotify then self.parts[#self.parts + 1] = self.sdnotify end
  self.next_tick = 0
  return self
end

function Runner:stopping() return self.stop_at ~= nil end
function Runner:past_grace() return self.stop_at ~= nil and now() > self.stop_at + M.DEFAULTS.stop_grace end
--- True while the listening connection is up (and leads, when single active).
function Runner:active() return self.notify.conn ~= nil end
--- Runs the timers at the next turn of the loop.
function Runner:wake() self.next_tick = 0 end
--- Reads up to `n` more notes that have already arrived (a batch topping up).
function Runner:topup(n) return self.notify:read(n) end

--- The listening connection is up: the parts' connect hooks.
function Runner:connected(info)
  for _, p in ipairs(self.parts) do
    if p ~= self.notify and p.connect then p:connect(info) end
  end
  self:wake()
end

--- Signals since the last look: TERM/INT stop, HUP reload, USR1 stats.
function Runner:signals()
  if not host.pending() then return end
  local sig = host.signals()
  if sig.TERM and not self.stop_at then
    self.stop_at = now()
    self.log.info("stopping: signal received", { queued = self.notify:backlog() })
    if self.sdnotify then self.sdnotify:stopping() end
  end
  if sig.HUP and not self.stop_at then
    if self.sdnotify then self.sdnotify:reloading() end
    self:reload()
    if self.sdnotify then self.sdnotify:ready() end
  end
  if sig.USR1 then
    self.stats_service:log()
    self.replication:log_stats()
  end
end

-- Seconds until the earliest timer of any part (nil: none).
function Runner:timeout(t)
  local due = math.huge
  for _, p in ipairs(self.parts) do
    local d = p.timeout and p:timeout(t)
    if d and d < due then due = d end
  end
  local r = self.dispatch:next_due()
  if r and r - t < due then due = r - t end
  if due == math.huge then return nil end
  return due > 0 and due or 0
end

--- Runs every part's timers.
function Runner:tick(t)
  for _, p in ipairs(self.parts) do
    if p.tick then p:tick(t) end
  end
  local d = self:timeout(now())
  self.next_tick = d and (now() + d) or math.huge
end

--- Waits until a source has data, a timer is due or a signal arrives, and
-- reads what arrived.
function Runner:wait()
  for _, s in ipairs(self.sources) do
    if s.pending and s:pending() then return s:read() end
  end
  local fds, srcs = {}, {}
  for _, s in ipairs(self.sources) do
    local fd = s.pollfd and s:pollfd()
    if fd then
      fds[#fds + 1] = { fd, s:events() }
      srcs[#srcs + 1] = s
    end
  end
  -- services' sockets (metrics): objects with pollfd, events and read
  for _, p in ipairs(self.parts) do
    for _, s in ipairs(p.pollables and p:pollables() or {}) do
      fds[#fds + 1] = { s:pollfd(), s:events() }
      srcs[#srcs + 1] = s
    end
  end
  local ready, err = poll(fds, self:timeout(now()))
  if ready then
    for _, i in ipairs(ready) do srcs[i]:read() end
  elseif err ~= "timeout" and err ~= "interrupted" then
    self.log.error("waiting failed", { error = err })
    pg.sleep(0.1)
  end
end

--- SIGHUP: loads the script again and lets every part take what changed.
-- A script that fails to load keeps the old one.
function Runner:reload()
  local spec, err = scriptmod.load(self.opts.script)
  if not spec then
    self.log.error("reload failed; keeping the running script", { error = err })
    return
  end
  if self.opts["single-active"] and not spec.single_active then spec.single_active = true end
  -- what has arrived so far is handled as the old script said (a channel
  -- that becomes durable still handles the plain notes already received)
  self.notify:read_arrived()
  local old = self.spec
  local added, removed = {}, {}
  for _, n in ipairs(spec.names) do if not old.channels[n] then added[#added + 1] = n end end
  for _, n in ipairs(old.names) do if not spec.channels[n] then removed[#removed + 1] = n end end
  if (spec.ordering or "global") ~= self.ordering then
    self.log.warn("ordering changed; it takes effect at the next start", { ordering = self.ordering })
  end
  if (not spec.single_active) ~= (not old.single_active) then
    self.log.warn("single_active changed; it takes effect at the next start",
      { single_active = tostring(old.single_active or false) })
  end
  self.spec, self.settings = spec, M.settings(self.opts, spec)
  self.dispatch:configure(spec)
  for _, p in ipairs(self.parts) do
    if p.reload then p:reload(old, spec) end
  end
  self.log.info("reloaded", { added = table.concat(added, ","), removed = table.concat(removed, ","),
    channels = table.concat(spec.names, ",") })
  self:wake()
end

--- The line a second stop signal writes as it exits (the host cannot call
-- Lua then): how many received notes it drops (those held for on_connect too).
function Runner:last_words()
  local n = self.notify:backlog()
  if n == self.last_words_n or not self.log.render then return end
  self.last_words_n = n
  host.last_words(self.log.render("warn", "second stop signal: exiting at once", { dropped = n }) .. "\n")
end

function Runner:shutdown()
  local left = self.notify:backlog() -- the lanes' and those held for on_connect
  if left > 0 then
    self.log.warn("stopped with notifications received but not handled", { count = left })
  end
  self.stats_service:log()
  self:close()
  self.log.info("stopped")
end

function Runner:close()
  for _, p in ipairs(self.parts) do
    if p.close then p:close() end
  end
end

--- The loop; returns the exit code.
function Runner:run()
  local d = self.dispatch
  self:tick(now())
  while true do
    if self.fatal then
      self.log.error("cannot connect", { db = pg.safe_conninfo(self.db), error = self.fatal })
      self:close()
      return 1
    end
    self:signals()
    if self.stop_at then
      if d:queued() == 0 or self:past_grace() then break end
      self:last_words()
      if d:ready() then
        d:run()
      else
        local due = d:next_due() or math.huge
        poll({}, math.max(0, math.min(due, self.stop_at + M.DEFAULTS.stop_grace) - now()))
      end
    elseif d:ready() then
      d:run()
      if now() >= self.next_tick then self:tick(now()) end
    else
      self:wait()
      self:tick(now())
    end
  end
  self:shutdown()
  return 0
end

--- Builds the runner for a spec.
function M.make_runner(opts, spec, log)
  return Runner.new(opts, spec, log)
end

--- Runs the program (pglisten.cli); returns the exit code.
function M.main(argv)
  return require("pglisten.cli").main(argv)
end

return M
