--- The logical-replication source: channels with `source = "replication"`,
-- fed from a slot streamed with pgoutput (pglisten.core's replication
-- connection) instead of NOTIFY.
--
-- Its hooks, as the loop calls them:
--   tick     -- while not streaming: one attempt to start (connect, the
--               start-up checks, the publication and slot created when
--               missing, the initial snapshot, START_REPLICATION from the
--               position handled so far); a slot another runner streams
--               (55006) is tried again every STANDBY_RETRY seconds.  While
--               streaming: the Standby Status Update, every STATUS_INTERVAL
--               seconds, at once when the server asks, and within
--               STATUS_MIN seconds of a new flush position; the stats line.
--   pollfd/events/pending/read -- reading the stream into the queue of
--               pglisten.replication.apply and handling what may be handled
--   reload   -- a channel for a new table is added to the publication
--   close    -- the last status update, a clean end of the stream
--
-- The flush position reported is the end of the last transaction whose
-- events are all handled, or, with nothing pending and no transaction in
-- flight, the walEnd of the last keepalive (the apply worker's rule: an
-- idle slot does not hold WAL while other databases write).  A restart
-- resumes from the slot's confirmed position: at least once.
--
-- Start-up problems that waiting cannot fix (wal_level, the REPLICATION
-- attribute, no free slot, a table without replica identity) stop the
-- runner at its first start, exit status 1, with a message saying what to
-- change (pglisten.replication.slot).
-- @module pglisten.sources.replication

local pg = require "pglisten"
local backoff = require "pglisten.backoff"
local conninfo_lib = require "pglisten.conninfo"
local notify = require "pglisten.sources.notify"
local slotmod = require "pglisten.replication.slot"
local Apply = require "pglisten.replication.apply"

local M = {}
M.__index = M

local now = pg.monotonic
local core = pg.core
local lsn_parse, lsn_format = core.lsn_parse, core.lsn_format

M.STATUS_INTERVAL = 10  -- seconds between two status updates at most
M.STATUS_MIN = 1        -- a new flush position is reported within this
M.STANDBY_RETRY = 1     -- seconds between two tries of a slot in use
-- Messages taken per repl:read, and per turn of the loop while the socket
-- has more.  Small on purpose: measured on a 100,000-row backlog, taking
-- 1000-2048 messages per turn before handling them cost 1.5-2 x the CPU per
-- change of taking 256 (the decoded tables of a turn no longer fit the
-- cache), for fewer instructions.
M.READ = 256
M.FILL = 256
M.HANDLE = 1000         -- events handled per turn of the loop

--- The source's counters.
function M.counters()
  return { received = 0, handled = 0, failed_handler = 0, retries = 0, dead = 0, unrouted = 0 }
end

function M.new(rt)
  local self = setmetatable({ rt = rt, log = rt.log, c = M.counters(), received = 0 }, M)
  self.cfg = slotmod.config(rt.spec)
  self.apply = Apply.new(rt, self.c, function() return self:sql() end)
  self.next_connect, self.attempt, self.first, self.last_warn = now(), 0, true, -math.huge
  local set = core.conninfo_keys(rt.db)
  -- values in UTF-8 whatever the database's encoding (pgoutput and the
  -- snapshot send text in the client encoding; a LATIN1 database's bytes
  -- would fail every UTF-8 target), unless the user chose an encoding
  self.db = (set and not set.client_encoding and not os.getenv("PGCLIENTENCODING"))
    and conninfo_lib.add(rt.db, { "client_encoding=UTF8" }) or rt.db
  self.conninfo = (set and not set.application_name and not os.getenv("PGAPPNAME"))
    and conninfo_lib.add(self.db, { "application_name=lua-pglisten-replication" }) or self.db
  return self
end

---------------------------------------------------------------------------
-- The loop's hooks
---------------------------------------------------------------------------

local function room(self) return self.apply:len() < self.rt.settings.read_ahead end

function M:pollfd()
  if self.streaming and room(self) then
    local fd = self.repl:pollfd()
    if fd >= 0 then return fd end
    self.broken = true -- libpq closed the socket: the next read says why
  end
end
function M:events() return self.repl and self.repl:events() or "r" end
function M:pending()
  return self.streaming and ((self.more and room(self)) or self.broken or self.apply:ready()) or false
end

--- Reads what the stream has (without waiting) and handles what may be
-- handled.  Returns the messages read, or nil when the stream is lost.
function M:read()
  if not self.streaming then return 0 end
  local n = 0
  -- read on while the socket has more, up to FILL messages: a batch is
  -- filled from what the socket already holds, as for NOTIFY
  while n < M.FILL and room(self) do
    local msgs, info, state = self.repl:read(M.READ, "events")
    if not msgs then
      self:lost(info, state)
      return nil
    end
    local k = #msgs
    n = n + k
    self.more = k == M.READ
    if k > 0 then self:take(msgs, info) end
    if not self.more then break end
  end
  if self.broken and n == 0 then
    self:lost("replication connection lost")
    return nil
  end
  self.apply:handle(M.HANDLE)
  if self.reply_now then self:status() end
  return n
end

function M:timeout(t)
  if not self.cfg then return nil end
  local due = self.next_stats or math.huge
  if not self.streaming then
    if self.rt:stopping() then return nil end
    due = math.min(due, self.next_connect)
  else
    due = math.min(due, self.last_status + M.STATUS_INTERVAL)
    if self.reply_now then due = t end
    if self.apply.flushed > self.sent then due = math.min(due, self.last_status + M.STATUS_MIN) end
    if self.apply.job then due = math.min(due, self.apply.wait_until) end
  end
  return due - t
end

function M:tick(t)
  if not self.cfg then return end
  local iv = self.rt.settings.stats_interval
  if iv > 0 then
    self.next_stats = self.next_stats or (t + iv)
    if t >= self.next_stats then
      self.next_stats = t + iv
      self:log_stats()
    end
  end
  if not self.streaming then
    if t >= self.next_connect and not self.rt:stopping() then self:try_start() end
    return
  end
  local since = t - self.last_status
  if self.reply_now or since >= M.STATUS_INTERVAL or (self.apply.flushed > self.sent and since >= M.STATUS_MIN) then
    self:status()
  end
end

---------------------------------------------------------------------------
-- The stream
---------------------------------------------------------------------------

-- A change of a table some channel streams: the event, and its note with
-- the change's LSN (text and integer) and index in its transaction.
function M:event(entry, ev, lsn_text, lsn, seq)
  local tx = self.tx or {}
  self.c.received = self.c.received + 1
  self.rt.stats.received = self.rt.stats.received + 1
  self.apply:push(entry, ev,
    { channel = entry.name, lsn = lsn_text, lsn_int = lsn, commit_lsn = tx.commit_lsn, xid = tx.xid,
      commit_time = tx.commit_time, received_at = pg.now(), seq = seq, slot = self.cfg.slot,
      system_id = self.system_id, database = self.database })
end

-- The index of the next change in the transaction (every change the
-- publication sends counts, routed or not, so that a transaction sent again
-- numbers its changes alike): with commit_lsn, a change's exact position
-- (pglisten.apply).
function M:next_seq()
  local tx = self.tx
  if not tx then return 0 end
  tx.seq = (tx.seq or 0) + 1
  return tx.seq
end

-- A change of a table the publication sends but no channel serves: it is
-- counted and skipped, and said once per table and run -- a served table
-- renamed mid-stream (the publication follows the table, not its name),
-- or one left in the publication by a reload or by hand.
function M:unrouted(schema, tbl)
  self.c.unrouted = self.c.unrouted + 1
  local name = schema .. "." .. tbl
  local seen = self.unrouted_seen or {}
  self.unrouted_seen = seen
  if seen[name] then return end
  seen[name] = true
  self.log.warn("replication: changes of a table the publication sends but no channel serves are skipped "
    .. "(renamed? give it a channel, or remove it from the publication)", { slot = self.cfg.slot, table = name,
    publication = self.cfg.publication })
end

-- The channel of a change's table (false: none), cached by relation id
-- until the next Relation message (a table renamed comes with one) and
-- for the configuration it was found in (a reload makes a new one).
local function route(cfg, relid, ev)
  local routes = cfg.routes
  if not routes then
    routes = {}
    cfg.routes = routes
  end
  local entry = routes[relid]
  if entry == nil then
    entry = cfg.by_table[ev.schema .. "." .. ev.table] or false
    routes[relid] = entry
  end
  return entry
end

--- Queues what repl:read(n, "events") returned: a row change comes as its
-- event (no kind; its LSN and relation id in `info` at the same index),
-- everything else as a message; commits and keepalives become marks.
function M:take(msgs, info)
  local cfg = self.cfg
  local by = cfg.by_table
  local lsns, texts, relids = info.lsn, info.lsn_text, info.relid
  if info.wal_end > self.received then self.received = info.wal_end end
  for i = 1, #msgs do
    local m = msgs[i]
    local k = m.kind
    if k == nil then -- Insert, Update, Delete: the event itself
      local seq = self:next_seq()
      local entry = route(cfg, relids[i], m)
      if entry then
        self:event(entry, m, texts[i], lsns[i], seq)
      else
        self:unrouted(m.schema, m.table)
      end
    elseif k == "relation" then
      cfg.routes = nil
    elseif k == "begin" then
      self.tx = { xid = m.xid, commit_lsn = m.final_lsn, commit_time = m.commit_time }
    elseif k == "commit" then
      self.apply:mark(m.end_lsn_int, m.commit_time)
      self.tx = nil
    elseif k == "truncate" then
      for _, rel in ipairs(m.relations) do
        local seq = self:next_seq()
        local entry = by[rel.schema .. "." .. rel.table]
        if entry then
          self:event(entry, { op = "TRUNCATE", schema = rel.schema, table = rel.table }, m.lsn, m.lsn_int, seq)
        else
          self:unrouted(rel.schema, rel.table)
        end
      end
    elseif k == "keepalive" then
      if m.reply_requested then self.reply_now = true end
      -- outside a transaction, everything up to walEnd has been sent
      if not self.tx and m.wal_end_int then self.apply:mark(m.wal_end_int) end
    end
  end
end

--- A Standby Status Update: written up to what was received, flushed and
-- applied up to what is handled.
function M:status()
  local f = self.apply.flushed
  local asked = self.reply_now
  self.reply_now, self.last_status = false, now()
  if f <= 0 then return end
  local w = self.received > f and self.received or f
  local ok, err, state = self.repl:confirm(w, f, f, false)
  if not ok then return self:lost(err, state) end
  self.sent = f
  if asked and self.apply.events > 0 then self:release() end
end

--- The server asked for our position (replyRequested) while events are
-- still pending.  It asks when it shuts down (a fast shutdown waits until
-- the client confirms everything it sent) or when it heard nothing for
-- wal_sender_timeout / 2.  Pending events may never finish in time (a
-- target on the same server, whose connection the shutdown killed first),
-- so what is handled is confirmed (above) and the stream is closed: the
-- walsender exits, the shutdown goes on, and streaming starts again soon
-- from the confirmed position (the pending events come again).
function M:release()
  self.log.info("the server asked for the position while events were pending (a shutdown?): confirmed what "
    .. "is handled and closed the stream; streaming again soon", { slot = self.cfg.slot,
    handled_to = lsn_format(self.apply.flushed), queued = self.apply.events })
  self:drop_repl()
  self.apply:reset()
  self.next_connect, self.attempt = now(), 0
end

--- The stream is gone: what was read but not handled is dropped (the
-- server sends it again), and streaming starts again soon.
function M:lost(err, state)
  if not self.repl then return end
  self.log.warn("replication stream lost; reconnecting", { slot = self.cfg.slot, error = err, sqlstate = state,
    handled_to = lsn_format(self.apply.flushed), queued = self.apply.events })
  self:drop_repl()
  self.apply:reset()
  self.rt.stats.reconnects = self.rt.stats.reconnects + 1
  self.next_connect, self.attempt = now() + self:relapse(err, state), 0
end

M.SHORT = 5 -- a stream lost sooner than this after it started is a relapse

-- The wait before streaming again: none after a stream that ran a while;
-- after streams lost again and again right after they started (the
-- walsender failing on the same change: a publication dropped by hand), the
-- reconnect backoff, growing -- not 100 connections a second.
function M:relapse(err, state)
  local short = self.started_at and now() - self.started_at < M.SHORT
  self.relapses = short and (self.relapses or 0) + 1 or 0
  if state == "42704" and tostring(err):find("publication", 1, true) and not self.said_publication then
    self.said_publication = true
    self.log.error("the publication was dropped while the slot had changes to send: the server cannot decode "
      .. "the slot past the drop (PostgreSQL before 18), so it fails again on every start; drop the slot "
      .. "(lua-pglisten --drop-slot) and start again, with snapshot = true to resync",
      { slot = self.cfg.slot, publication = self.cfg.publication })
  end
  if self.relapses == 0 then return 0 end
  local s = self.rt.settings
  return backoff.delay(self.relapses, s.reconnect_min, s.reconnect_max, 0.5)
end

function M:drop_repl()
  if self.repl then self.repl:close() end
  self.repl, self.streaming, self.more, self.tx, self.reply_now, self.broken = nil, false, false, nil, false, false
end

---------------------------------------------------------------------------
-- Starting
---------------------------------------------------------------------------

--- The plain connection to the source database (checks, lag, pglisten.dead).
function M:sql()
  local c = self.sqlconn
  if c and not c:isclosed() and c:status() == "ok" then return c end
  if c then c:close() end
  local err
  c, err = pg.connect(self.db, { timeout = self.rt.settings.connect_timeout, interruptible = true })
  self.sqlconn = c
  return c, err
end

--- One attempt to start streaming; on failure the next one is scheduled
-- (or, at the first start, a fatal problem stops the runner).
function M:try_start()
  self.attempt = self.attempt + 1
  local ok, err, fatal = self:open()
  if ok then return end
  if err == "standby" then
    self.attempt, self.next_connect = 0, now() + M.STANDBY_RETRY
    return
  end
  if self.sqlconn and self.sqlconn:status() ~= "ok" then self.sqlconn:close() end
  if fatal and self.first then
    self.log.error("replication source cannot start", { slot = self.cfg.slot, error = err })
    self.rt.fatal = err
    return
  end
  local s = self.rt.settings
  local wait = backoff.delay(self.attempt, s.reconnect_min, s.reconnect_max, 0.5)
  local t = now()
  if t - self.last_warn >= 30 then
    self.log.warn("replication: cannot stream yet; retrying", { slot = self.cfg.slot, error = err,
      attempt = self.attempt, next_in = ("%.2f"):format(wait) })
    self.last_warn = t
  end
  self.next_connect = t + wait
end

-- The checks, the publication and the slot; returns the slot's row (false: missing).
function M:prepare(sql)
  local cfg = self.cfg
  local row, err = slotmod.slot(sql, cfg.slot)
  if row == nil then return nil, err end
  local ok, fatal
  ok, err, fatal = slotmod.check(sql, cfg, not row)
  if not ok then return nil, err, fatal end
  if row then
    ok, err, fatal = slotmod.usable(row, cfg.slot)
    if not ok then return nil, err, fatal end
  end
  local how, added
  ok, how, added = slotmod.ensure_publication(sql, cfg)
  if not ok then return nil, how, added end
  if how then
    self.log.info(how == "created" and "created publication" or "added tables to publication",
      { publication = cfg.publication, tables = table.concat(added or cfg.tables, ",") })
  end
  return row
end

-- One attempt: true (streaming), or nil, err[, fatal] ("standby": the slot is in use).
function M:open()
  local cfg = self.cfg
  local sql, err = self:sql()
  if not sql then return nil, err, notify.permanent(err) end
  local row, fatal
  row, err, fatal = self:prepare(sql)
  if row == nil then return nil, err, fatal end
  local repl = self.repl
  if not repl then
    repl, err = core.replication_connect(self.conninfo, self.rt.settings.connect_timeout)
    if not repl then return nil, err, notify.permanent(err) end
    self.repl = repl
    -- the stream's identity in every note (pglisten.apply keys its position on it)
    local ident, ierr = repl:command("IDENTIFY_SYSTEM")
    if not ident then
      self:drop_repl()
      return nil, ierr
    end
    self.system_id, self.database = ident[1].systemid, ident[1].dbname
  end
  if row and cfg.snapshot then
    row, err = self:unfinished_snapshot(sql, row)
    if row == nil then return nil, err end
    if row == "standby" then return self:standby(err) end
  end
  local start
  if row then
    start = lsn_parse(row.confirmed_flush_lsn or "0/0") or 0
  else
    self:slot_gone()
    start, err, fatal = self:create_slot(repl, sql)
    if not start then
      self:drop_repl()
      return nil, err, fatal
    end
  end
  if self.apply.flushed > start then start = self.apply.flushed end
  local ok, state
  ok, err, state = repl:start(cfg.slot, start, { publication = cfg.publication, proto_version = 1 })
  if not ok then
    if state == "55006" then return self:standby(err) end
    self:drop_repl()
    return nil, err
  end
  return self:started(start)
end

-- The slot is missing although this runner streamed from it: someone
-- dropped it.  It is created again at the server's current position, so
-- what was written in between never comes (unless a snapshot runs again):
-- said at ERROR, once per loss.
function M:slot_gone()
  if not self.streamed then return end
  self.streamed = nil
  self.log.error("replication slot disappeared after this runner streamed from it (dropped by hand?): it is "
    .. "created again at the current position; " .. (self.cfg.snapshot and "the initial snapshot runs again"
      or "changes made in between are NOT delivered (resync the tables)"), { slot = self.cfg.slot,
    handled_to = lsn_format(self.apply.flushed) })
end

function M:standby(err)
  if not self.standing_by then
    self.standing_by = true
    self.log.info("standing by: the replication slot is in use by another runner", { slot = self.cfg.slot,
      error = err })
  end
  return nil, "standby"
end

function M:started(start)
  self.streaming, self.more, self.first, self.streamed = true, true, false, true
  self.started_at = now()
  self.apply.flushed, self.sent, self.last_status = start, start, now()
  self.received = start
  self.log.info(self.standing_by and "streaming: took over the replication slot" or "streaming", {
    slot = self.cfg.slot, publication = self.cfg.publication, tables = table.concat(self.cfg.tables, ","),
    from = lsn_format(start), pid = self.repl:pid() })
  self.standing_by, self.attempt, self.last_warn = false, 0, -math.huge
  return true
end

-- A slot whose initial snapshot was begun and never finished (a runner
-- killed during it) is dropped: the snapshot starts again.  Returns the
-- row, false (dropped), "standby" (in use), or nil, err.
function M:unfinished_snapshot(sql, row)
  local ok, snap = pcall(require, "pglisten.snapshot")
  if not ok then return row end
  local pending, err = snap.pending(sql, self.cfg.slot)
  if pending == nil then return nil, err end
  if not pending then return row end
  if row.active then return "standby", "the slot is in use" end
  self.log.warn("the initial snapshot of this slot never finished; the slot is dropped and the snapshot "
    .. "starts again", { slot = self.cfg.slot })
  local _, derr, state = sql:exec("SELECT pg_drop_replication_slot($1)", self.cfg.slot)
  if derr then
    if state == "55006" then return "standby", derr end
    return nil, derr
  end
  self.streamed = nil -- our own drop
  return false
end

-- Creates the slot; with snapshot = true, hands the tables' rows over
-- first (recorded in pglisten.slots, pglisten.snapshot: all or nothing).
-- Returns the LSN to stream from, or nil, err, fatal.
function M:create_slot(repl, sql)
  local cfg = self.cfg
  if cfg.create == false then
    return nil, ("replication slot %s does not exist (replication.create = false): create it "
      .. "(SELECT pg_create_logical_replication_slot('%s', 'pgoutput')), or remove create = false")
      :format(cfg.slot, cfg.slot), true
  end
  local snap
  if cfg.snapshot then
    local ok, mod = pcall(require, "pglisten.snapshot")
    if not ok then return nil, "snapshot = true needs pglisten.snapshot: " .. tostring(mod), true end
    snap = mod
    local bok, berr, bstate = snap.begin(sql, cfg.slot)
    if not bok then
      return nil, "cannot record the snapshot in pglisten.slots: " .. tostring(berr), bstate == "42501"
    end
  end
  local rows, err, state = repl:command(("CREATE_REPLICATION_SLOT %s LOGICAL pgoutput %s")
    :format(cfg.slot, cfg.snapshot and "EXPORT_SNAPSHOT" or "NOEXPORT_SNAPSHOT"))
  if not rows then
    if state == "53400" then return nil, slotmod.slots_exhausted(), true end
    if state == "42710" then return nil, "replication slot " .. cfg.slot .. " was just created by another runner" end
    return nil, ("cannot create replication slot %s: %s"):format(cfg.slot, err), state == "42501"
  end
  local row = rows[1]
  self.log.info("created replication slot", { slot = cfg.slot, consistent_point = row.consistent_point })
  if snap then
    local ok, serr, sfatal = self:snapshot(snap, row.snapshot_name, row.consistent_point)
    if ok then ok, serr = snap.done(sql, cfg.slot) end
    if not ok then
      local _, derr = repl:command("DROP_REPLICATION_SLOT " .. cfg.slot)
      self.log.warn("initial snapshot failed; the slot is dropped and the snapshot starts again next time",
        { slot = cfg.slot, error = serr, drop_error = derr })
      return nil, "initial snapshot failed: " .. tostring(serr), sfatal
    end
  end
  return lsn_parse(row.consistent_point)
end

-- The initial snapshot (pglisten.snapshot) in the slot's exported snapshot:
-- each page of a table's rows goes to its channel's handler as INSERT
-- events, note.snapshot = true.
function M:snapshot(snap, name, point)
  local by = self.cfg.by_table
  local seq = 0 -- a row's position: (the consistent point, snapshot, seq), before every streamed change
  local function deliver(tbl, rows, notes)
    local entry = by[tbl]
    local events = {}
    for i, r in ipairs(rows) do
      events[i] = { op = r.op, schema = r.schema, table = r.table, new = r.new, old = r.old }
      local note = notes[i]
      note.channel, note.received_at = entry.name, pg.now()
      seq = seq + 1
      note.seq, note.commit_lsn, note.lsn = seq, point, note.lsn or point
      note.slot, note.system_id, note.database = self.cfg.slot, self.system_id, self.database
    end
    self.c.received = self.c.received + #events
    return self.apply:deliver(entry, events, notes)
  end
  local t0 = now()
  local ok, err = snap.run(self.rt, { conninfo = self.db, snapshot = name, tables = self.cfg.tables,
    page = 1000, publication = self.cfg.publication, deliver = deliver })
  if ok then
    self.log.info("initial snapshot done", { slot = self.cfg.slot, seconds = ("%.3f"):format(now() - t0) })
  end
  return ok, err
end

---------------------------------------------------------------------------
-- Reload, stats, close
---------------------------------------------------------------------------

function M:reload(_, new)
  local cfg = slotmod.config(new)
  local old = self.cfg
  if not cfg then
    if old then self.log.warn("no channel streams from the replication slot any more; it stays until "
      .. "the next start", { slot = old.slot }) end
    return
  end
  if old and (cfg.slot ~= old.slot or cfg.publication ~= old.publication) then
    self.log.warn("replication slot or publication changed; it takes effect at the next start",
      { slot = old.slot, publication = old.publication })
    cfg.slot, cfg.publication = old.slot, old.publication
  end
  self.cfg = cfg
  if not old then
    self.next_connect = now()
    return
  end
  if self.streaming then
    local sql, err = self:sql()
    local ok, how, added
    if sql then ok, how, added = slotmod.ensure_publication(sql, cfg) end
    if not sql or not ok then
      self.log.error("reload: cannot add the new tables to the publication", { publication = cfg.publication,
        error = err or how })
    elseif how then
      self.log.info("added tables to publication", { publication = cfg.publication,
        tables = table.concat(added or cfg.tables, ",") })
    end
  end
end

--- The source's figures: counters, lag and the slot's confirmed position.
function M:figures()
  local c, a = self.c, self.apply
  local f = { slot = self.cfg.slot, received = c.received, handled = c.handled, failed_handler = c.failed_handler,
    retries = c.retries, dead = c.dead, unrouted = c.unrouted, queued = a.events,
    blocked = a.job and a.job.attempt > 0 or nil, flushed = lsn_format(a.flushed), streaming = self.streaming or false }
  local oldest = a:oldest_commit()
  f.lag_seconds = oldest and ("%.3f"):format(math.max(0, pg.now() - (a.commit_time or oldest))) or "0"
  local sql = self.sqlconn
  if sql and not sql:isclosed() then
    local bytes, confirmed = slotmod.lag(sql, self.cfg.slot)
    if bytes then f.lag_bytes, f.confirmed_flush_lsn = ("%.0f"):format(bytes), confirmed end
  end
  return f
end

--- One "replication stats" line.
function M:log_stats()
  if not self.cfg then return end
  self.log.info("replication stats", self:figures())
end

function M:close()
  if self.streaming then
    self:status()
    if self.repl then self.repl:finish() end
  end
  if self.cfg then self:log_stats() end
  self:drop_repl()
  if self.sqlconn then self.sqlconn:close() end
  self.sqlconn = nil
end

return M
