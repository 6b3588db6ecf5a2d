--- Durable channels and single-active runners: extensions of the runner.
--
-- Durable channels are served from `pglisten.outbox` on a connection of
-- their own (never the listening one: a long transaction there would hold
-- back the server's NOTIFY queue).  The runner claims due events with
-- FOR UPDATE SKIP LOCKED on start, on every wake-up notification, after
-- every reconnect and every `poll_interval` seconds, calls the handler per
-- event (or per run of events for a batch channel), and finishes the batch:
-- handled events deleted; failed ones retried later with backoff, or moved
-- to `pglisten.dead` after `max_attempts`.  At-least-once: a runner that
-- dies mid-batch leaves its events to the next claimer.
--
-- Single active: runners with the same lock name (the script's file name and
-- channels, or `single_active = "name"`) on the same database elect a leader
-- with a session advisory lock held by the listening connection.  The others
-- stand by, trying every second; the lock goes with the leader's session, so
-- a dead leader (SIGKILL, terminated backend, lost network) is replaced
-- within about a second.
-- @module pglisten.scale

local pg = require "pglisten"
local outbox = require "pglisten.outbox"

local M = {}

local now = pg.monotonic

M.DEFAULTS = {
  poll_interval = 5,  -- seconds between safety-net polls of the outbox
  claim = 100,        -- events claimed per transaction
  standby_retry = 1,  -- seconds between a standby's tries for the lock
  backoff_base = 1,   -- seconds after the first failure of a durable event
  backoff_cap = 300,
}

--- The advisory lock name of a single-active runner.
function M.lock_name(spec)
  if type(spec.single_active) == "string" then return spec.single_active end
  local base = (spec.path or "script"):match("([^/]+)$") or "script"
  return "lua-pglisten:" .. base .. ":" .. table.concat(spec.names, ",")
end

--- Installs the extensions into a runner class (see pglisten.runner).
function M.extend(Runner)
  local base_wanted = Runner.wanted_channels
  local base_after_connect = Runner.after_connect
  local base_try_connect = Runner.try_connect
  local base_after_reload = Runner.after_reload

  -- Durable channel names, sorted.
  function Runner:durable_names()
    local list = {}
    for _, n in ipairs(self.spec.names) do
      if self.spec.channels[n].durable then list[#list + 1] = n end
    end
    return list
  end

  -- Plain channels, plus the wake-up channel when any channel is durable.
  function Runner:wanted_channels()
    local list = {}
    for _, n in ipairs(base_wanted(self)) do
      if not self.spec.channels[n].durable then list[#list + 1] = n end
    end
    if #self:durable_names() > 0 then list[#list + 1] = outbox.WAKEUP_CHANNEL end
    return list
  end

  -------------------------------------------------------------------------
  -- Single active
  -------------------------------------------------------------------------

  -- Connects; a single-active runner also needs the lock before it LISTENs.
  function Runner:try_connect()
    if not self.spec.single_active then return base_try_connect(self) end
    if self.yield_until and now() < self.yield_until then
      return nil, "standby" -- lost the lead: a waiting standby goes first
    end
    local conn = self.standby_conn
    if not conn or not conn:alive() then
      if conn then conn:close() end
      local err
      conn, err = pg.connect(self.listen_conninfo, { timeout = 10, heal = false })
      if not conn then return nil, err end
    end
    local r, err = conn:exec(
      "SELECT pg_try_advisory_lock(('x' || substr(md5($1), 1, 16))::bit(64)::bigint) AS leader",
      M.lock_name(self.spec))
    if not r then
      conn:close()
      self.standby_conn = nil
      return nil, err
    end
    if not r[1].leader then
      self.standby_conn = conn
      return nil, "standby"
    end
    self.standby_conn = nil
    local ok, lerr = self:listen_all(conn)
    if not ok then
      conn:close()
      return nil, "LISTEN failed: " .. tostring(lerr)
    end
    self.leader = true
    return conn
  end

  local base_lost = Runner.lost
  function Runner:lost(err)
    if self.leader then
      -- a leader that lost its session (and so its lock) lets the standbys,
      -- which try every standby_retry seconds, take over before it competes
      self.leader = false
      self.yield_until = now() + 1.5 * M.DEFAULTS.standby_retry
    end
    return base_lost(self, err)
  end

  function Runner:standby_wait()
    if not self.standing_by then
      self.standing_by = true
      self.log.info("standing by: another runner is active", { lock = M.lock_name(self.spec) })
    end
    pg.sleep(M.DEFAULTS.standby_retry)
  end

  -------------------------------------------------------------------------
  -- Durable channels
  -------------------------------------------------------------------------

  function Runner:outbox_conn()
    local c = self.obconn
    if c and not c:isclosed() then return c end
    local err
    c, err = pg.connect(self.db, { timeout = 10 })
    if not c then return nil, err end
    self.obconn = c
    return c
  end

  -- Handles one claimed event or a run of them; returns failures.
  function Runner:handle_durable(entry, events, failed, done)
    local values, notes = {}, {}
    for _, ev in ipairs(events) do
      local note = {
        channel = ev.channel, payload = ev.payload, id = ev.id, attempts = ev.attempts,
        created_at = ev.created_at, received_at = pg.now(), durable = true,
      }
      local v, err = self:decode(entry, note)
      if v == nil then
        self.stats.failed_decode = self.stats.failed_decode + 1
        self.log.error("durable event rejected", { channel = ev.channel, id = ev.id, error = err,
          payload = #ev.payload > 120 and (ev.payload:sub(1, 120) .. "...") or ev.payload })
        failed[#failed + 1] = { id = ev.id, error = err, attempts = ev.attempts,
          max_attempts = entry.max_attempts or outbox.MAX_ATTEMPTS,
          backoff = outbox.backoff(ev.attempts + 1, M.DEFAULTS.backoff_base, M.DEFAULTS.backoff_cap) }
        self:on_error(err, note, { kind = "decode", channel = entry.name, durable = true })
      else
        values[#values + 1], notes[#notes + 1] = v, note
      end
    end
    if #notes == 0 then return end
    local ok, err, tb
    if entry.batch then
      ok, err, tb = self:call_once(entry, values, notes)
    else
      ok, err, tb = self:call_once(entry, values[1], notes[1])
    end
    for i, note in ipairs(notes) do
      if ok then
        done[#done + 1] = note.id
        self.stats.handled = self.stats.handled + 1
      else
        local attempts = note.attempts + 1
        local maxa = entry.max_attempts or outbox.MAX_ATTEMPTS
        self.stats.failed_handler = self.stats.failed_handler + 1
        local msg = self.errstring(err)
        failed[#failed + 1] = { id = note.id, error = msg, attempts = note.attempts, max_attempts = maxa,
          backoff = outbox.backoff(attempts, M.DEFAULTS.backoff_base, M.DEFAULTS.backoff_cap) }
        if i == 1 then
          self.log.error(attempts >= maxa and "durable event failed for the last time; moved to pglisten.dead"
            or "durable event failed; will retry", {
            channel = entry.name, id = note.id, attempts = attempts, max_attempts = maxa, error = msg,
            traceback = tb, count = #notes > 1 and #notes or nil })
        end
        self:on_error(err, note, { kind = "handler", channel = entry.name, durable = true,
          attempts = attempts, traceback = tb, final = attempts >= maxa })
      end
    end
  end

  --- Claims and handles due durable events until none is left (or the
  -- runner stops).  Returns the number handled.
  function Runner:serve_outbox(reason)
    local names = self:durable_names()
    if #names == 0 then return 0 end
    self.outbox_due = false
    self.next_poll = now() + (self.spec.poll_interval or M.DEFAULTS.poll_interval)
    local conn, err = self:outbox_conn()
    if not conn then
      self.log.warn("outbox: cannot connect", { error = err })
      return 0
    end
    local total = 0
    while not self:stopping() do
      local events, cerr = outbox.claim(conn, names, M.DEFAULTS.claim)
      if not events then
        self.log.warn("outbox: claim failed", { error = cerr, reason = reason })
        return total
      end
      if #events == 0 then break end
      local done, failed = {}, {}
      local i = 1
      while i <= #events do
        local ev = events[i]
        local entry = self.spec.channels[ev.channel]
        local run = { ev }
        i = i + 1
        if entry and entry.batch then
          while i <= #events and events[i].channel == ev.channel and #run < entry.batch do
            run[#run + 1] = events[i]
            i = i + 1
          end
        end
        if entry then
          self:handle_durable(entry, run, failed, done)
        end
      end
      local ok, ferr = outbox.finish(conn, done, failed)
      if not ok then
        -- rolled back: the events are claimable again (at-least-once)
        self.log.warn("outbox: finishing a batch failed; its events will be handled again", { error = ferr })
        return total
      end
      total = total + #done
      self:signals()
      if #events < M.DEFAULTS.claim then break end
    end
    if total > 0 then self.log.debug("outbox served", { handled = total, reason = reason }) end
    return total
  end

  function Runner:after_connect(info)
    if self.spec.single_active then
      info.leader = true
      if self.standing_by then
        self.standing_by = false
        self.log.info("leading: took over as the active runner", { lock = M.lock_name(self.spec) })
      end
    end
    base_after_connect(self, info)
    self:serve_outbox(info.reconnect and "reconnect" or "start")
  end

  function Runner:route_special(note)
    if note.channel ~= outbox.WAKEUP_CHANNEL then return false end
    -- coalesce a run of wake-ups into one serve
    local q = self.queue
    while q:peek() and q:peek().channel == outbox.WAKEUP_CHANNEL do q:pop() end
    self:serve_outbox("wake-up")
    return true
  end

  function Runner:extra_timeout(t)
    if #self:durable_names() == 0 then return math.huge end
    self.next_poll = self.next_poll or (t + (self.spec.poll_interval or M.DEFAULTS.poll_interval))
    return self.next_poll - t
  end

  function Runner:extra_timers(t)
    if #self:durable_names() > 0 and self.next_poll and t >= self.next_poll then
      self:serve_outbox("poll")
    end
  end

  function Runner:after_reload(old)
    if base_after_reload then base_after_reload(self, old) end
    local had = false
    for _, n in ipairs(old.names) do if old.channels[n].durable then had = true end end
    local has = #self:durable_names() > 0
    if self.conn and has and not had then self.conn:listen(outbox.WAKEUP_CHANNEL) end
    if self.conn and had and not has then self.conn:unlisten(outbox.WAKEUP_CHANNEL) end
    if has then self:serve_outbox("reload") end
  end

  function Runner:close_extra()
    if self.obconn then self.obconn:close() end
    if self.standby_conn then self.standby_conn:close() end
    self.obconn, self.standby_conn = nil, nil
  end
end

return M
