--- The replication source's start: one attempt to stream (connect, the
-- start-up checks, the publication and slot made when missing, an initial
-- snapshot begun and never finished started again, the snapshot, and
-- START_REPLICATION from the position handled so far), the standby wait
-- while another runner holds the slot, the plain connection to the
-- source database, and, while streaming, the served tables kept in the
-- publication.  Methods of pglisten.sources.replication, which takes
-- them in (kept apart only for the size of one file).
-- @module pglisten.replication.start

local pg = require "pglisten"
local backoff = require "pglisten.backoff"
local notify = require "pglisten.sources.notify"
local slotmod = require "pglisten.replication.slot"

local S = {}

local now = pg.monotonic
local core = pg.core
local lsn_parse, lsn_format = core.lsn_parse, core.lsn_format


--- The plain connection to the source database (checks, lag, pglisten.dead).
function S:sql()
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
function S:try_start()
  self.attempt = self.attempt + 1
  self.starting = true -- a reload to no replication table waits for the end (M:reload)
  local ok, err, fatal = self:open()
  self.starting = nil
  if self.retire_pending then
    self.retire_pending = nil
    return self:retire()
  end
  if ok then return end
  if err == "standby" then
    self.attempt, self.next_connect = 0, now() + self.STANDBY_RETRY
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
function S:prepare(sql)
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
function S:open()
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
function S:slot_gone()
  if not self.streamed then return end
  self.streamed = nil
  self.log.error("replication slot disappeared after this runner streamed from it (dropped by hand?): it is "
    .. "created again at the current position; " .. (self.cfg.snapshot and "the initial snapshot runs again"
      or "changes made in between are NOT delivered (resync the tables)"), { slot = self.cfg.slot,
    handled_to = lsn_format(self.apply.flushed) })
end

function S:standby(err)
  if not self.standing_by then
    self.standing_by = true
    self.log.info("standing by: the replication slot is in use by another runner", { slot = self.cfg.slot,
      error = err })
  end
  return nil, "standby"
end

function S:started(start)
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
function S:unfinished_snapshot(sql, row)
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
function S:create_slot(repl, sql)
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
function S:snapshot(snap, name, point)
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
      note.lsn_int = lsn_parse(note.lsn) -- as a streamed change's; no xid, no commit_time: no transaction made it
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

--- A served table the publication lost (dropped and created again, or
-- taken out by hand) is added back, and the log says that its changes
-- until then were not streamed; one still missing is said once.
function S:watch_publication()
  local sql = self:sql()
  if not sql then return end
  local added, missing = slotmod.watch_publication(sql, self.cfg)
  if not added then return end -- the source is unreachable or the publication gone: the stream says so
  local said = self.pub_said or {}
  self.pub_said = said
  if #added > 0 then
    for _, t in ipairs(added) do said[t] = nil end
    self.log.warn("tables the channels serve were not in the publication (dropped and created again?): added "
      .. "back; their changes before now were not streamed (backfill them)",
      { publication = self.cfg.publication, tables = table.concat(added, ",") })
  end
  for _, m in ipairs(missing) do
    local t, why = m[1], m[2]
    if said[t] ~= why then
      said[t] = why
      self.log.warn("a table a channel serves is not in the publication: its changes are not streamed",
        { publication = self.cfg.publication, table = t, why = why })
    end
  end
end

S.SHORT = 5 -- a stream lost sooner than this after it started is a relapse

-- The wait before streaming again: none after a stream that ran a while;
-- after streams lost again and again right after they started (the
-- walsender failing on the same change: a publication dropped by hand), the
-- reconnect backoff, growing -- not 100 connections a second.
function S:relapse(err, state)
  local short = self.started_at and now() - self.started_at < self.SHORT
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

return S
