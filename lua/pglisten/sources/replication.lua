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
local conninfo_lib = require "pglisten.conninfo"
local slotmod = require "pglisten.replication.slot"
local Apply = require "pglisten.replication.apply"
local SKIP = Apply.SKIP
local host = require "pglisten.host"

local M = {}
M.__index = M
for k, f in pairs(require "pglisten.replication.start") do M[k] = f end -- try_start, open, sql, ...

local now = pg.monotonic
local core = pg.core
local lsn_format = core.lsn_format

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
M.AHEAD = 512           -- events read ahead while a handler waits, at least (see ahead_room)
-- The queue's bound in bytes (of the messages as sent; decoded they take
-- more): wide rows stop the reading long before settings.read_ahead items.
M.QUEUE_BYTES = 64 * 1024 * 1024
M.ASK_AGAIN = 0.5       -- asked twice within this while events are pending: a shutdown (M:release)
M.PUB_CHECK = 5         -- seconds between two looks for tables gone from the publication

--- The source's counters.
function M.counters()
  return { received = 0, handled = 0, failed_handler = 0, retries = 0, dead = 0, unrouted = 0 }
end

function M.new(rt)
  local self = setmetatable({ rt = rt, log = rt.log, c = M.counters(), received = 0 }, M)
  self.cfg = slotmod.config(rt.spec)
  self.apply = Apply.new(rt, self.c, function() return self:sql() end)
  self.apply.skip = function(ev) self:unrouted(ev.schema, ev.table) end
  self.ahead = function()
    local ok, more = pcall(self.read_ahead, self)
    if ok then return more end
    self.ahead_lost = self.ahead_lost or { "reading the stream ahead failed: " .. tostring(more) }
  end
  -- a turn ends once a status update is due (at least every STATUS_MIN s
  -- while handling, whatever was read ahead) or the server asked for one
  self.turn_over = function() return self.reply_now or now() - self.last_status >= M.STATUS_MIN end
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

-- The caps count what is queued behind the job in flight (so that the next
-- batch is read while it runs): the queue holds twice a cap at most.
local function room(self)
  local items, bytes = self.apply:behind()
  return items < self.rt.settings.read_ahead and bytes < M.QUEUE_BYTES
end
-- One read: at most READ messages, and what fits the bytes left (one at least).
local function read_some(self)
  local _, bytes = self.apply:behind()
  local left = M.QUEUE_BYTES - bytes
  local msgs, info, state = self.repl:read(M.READ, "events", left)
  -- cut short by the bytes: libpq may hold more, which no poll would show
  if msgs then self.more = #msgs == M.READ or info.bytes >= left end
  return msgs, info, state
end
-- While a handler runs, the stream is read ahead until the changes queued
-- behind its job (served or not) fill the largest batch (at least AHEAD),
-- within the caps above: the next batch is whole when the answer comes.
local function ahead_room(self)
  local cfg = self.cfg
  local _, _, changes = self.apply:behind()
  return changes < math.max(M.AHEAD, cfg and cfg.max_batch or 0) and room(self)
end

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
    local msgs, info, state = read_some(self)
    if not msgs then
      self:lost(info, state)
      return nil
    end
    local k = #msgs
    n = n + k
    if k > 0 then self:take(msgs, info) end
    if not self.more then break end
  end
  if self.broken and n == 0 then
    self:lost("replication connection lost")
    return nil
  end
  -- while a handler waits for its database, the stream is read ahead
  core.set_wait_hook(self.ahead)
  self.apply:handle(M.HANDLE, self.apply.tail, self.turn_over)
  core.set_wait_hook(nil)
  local lost = self.ahead_lost
  if lost then
    self.ahead_lost = nil
    self:lost(lost[1], lost[2])
    return nil
  end
  if self.reply_now then self:status() end
  return n
end

--- The wait hook (core.set_wait_hook) while handlers run: one read of what
-- the stream has, queued behind the events being handled; true when the
-- stream may have more and there is room (called again until the handler's
-- answer comes), the stream's socket when it is drained and there is room
-- (called again when it is readable).  So the runner decodes the next changes while the target
-- executes the last ones, and the walsender is not held up by a full
-- socket.  It only queues: a lost stream is acted on once the handler has
-- returned (`ahead_lost`).
function M:read_ahead()
  -- a signal first: a reload routes what is read after it by the new script
  if not self.streaming or self.ahead_lost or not ahead_room(self) or host.pending() then return false end
  local msgs, info, state = read_some(self)
  if not msgs then
    self.ahead_lost = { info, state }
    return false
  end
  if #msgs > 0 then self:take(msgs, info) end
  if not ahead_room(self) then return false end
  if self.more then return true end
  -- the socket is drained: called again when the walsender sends more
  local fd = self.repl:pollfd()
  return fd >= 0 and fd
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
    if self.apply.flushed > self.sent or self.apply:len() > 0 then
      due = math.min(due, self.last_status + M.STATUS_MIN)
    end
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
  if t >= (self.next_pub_check or 0) then
    self.next_pub_check = t + M.PUB_CHECK
    self:watch_publication()
  end
  local since = t - self.last_status
  -- every STATUS_MIN while anything is queued, even inside a transaction
  -- that moves nothing: the turns of the loop end at that bound (M:read)
  local busy = self.apply.flushed > self.sent or self.apply:len() > 0
  if self.reply_now or since >= M.STATUS_INTERVAL or (busy and since >= M.STATUS_MIN) then
    self:status()
  end
end

---------------------------------------------------------------------------
-- The stream
---------------------------------------------------------------------------

-- A transaction's table (see pglisten.replication.apply): `from` a Begin
-- message or an earlier read's table, its changes received at `at`; `seq`
-- goes on from `from.seq`.
function M:tx_table(from, at)
  return { xid = from.xid, commit_lsn = from.commit_lsn or from.final_lsn, commit_time = from.commit_time,
    received_at = at, seq = from.seq or 0, slot = self.cfg.slot, system_id = self.system_id, database = self.database }
end

-- The transaction of a change: the one begun, or (a change outside any,
-- which pgoutput does not send) one made for it alone.
function M:tx_of(at)
  return self.tx or self:tx_table({}, at)
end

-- A TRUNCATE's events, one per table, those no channel serves skipped.
function M:truncate(m, at)
  local tx, by, n = self:tx_of(at), self.cfg.by_table, 0
  for _, rel in ipairs(m.relations) do
    tx.seq = tx.seq + 1 -- every change the publication sends counts (see take)
    local entry = by[rel.schema .. "." .. rel.table]
    if entry then n = n + 1 end
    self.apply:push(entry or SKIP, { op = "TRUNCATE", schema = rel.schema, table = rel.table }, m.lsn_int, tx.seq, tx)
  end
  return n
end

-- A change of a table the publication sends but no channel serves: it is
-- counted and skipped, and said once per table and run -- a served table
-- renamed mid-stream (the publication follows the table, not its name),
-- or one left in the publication by a reload or by hand.
function M:unrouted(schema, tbl)
  self.c.unrouted = self.c.unrouted + 1
  self.rt.stats.unrouted = self.rt.stats.unrouted + 1
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
  local entry = cfg.by_table[ev.schema .. "." .. ev.table] or false
  cfg.routes[relid] = entry
  return entry
end

local push = Apply.push

--- Queues what repl:read(n, "events") returned: a row change comes as its
-- event (no kind; its LSN and relation id in `info` at the same index),
-- everything else as a message; commits and keepalives become marks.
-- A change's index in its transaction counts every change the publication
-- sends, routed or not, so that a transaction sent again numbers its
-- changes alike: with commit_lsn, a change's exact position (pglisten.apply).
-- A change's received_at is the time of the read that brought it (a
-- transaction read over many turns gets a table per read).
function M:take(msgs, info)
  local cfg, apply, at, n = self.cfg, self.apply, pg.now(), 0
  local routes = cfg.routes or {}
  cfg.routes = routes
  -- begun in an earlier read: its changes read now were received now
  if self.tx then self.tx = self:tx_table(self.tx, at) end
  local lsns, relids, sizes = info.lsn, info.relid, info.size
  if info.wal_end > self.received then self.received = info.wal_end end
  for i = 1, #msgs do
    local m = msgs[i]
    local k = m.kind
    if k == nil then -- Insert, Update, Delete: the event itself
      local tx = self.tx or self:tx_of(at)
      local seq = tx.seq + 1
      tx.seq = seq
      local relid = relids[i]
      local entry = routes[relid]
      if entry == nil then entry = route(cfg, relid, m) end
      if entry then
        n = n + 1
        push(apply, entry, m, lsns[i], seq, tx, sizes[i])
      else -- skipped when it is reached, unless a reload gives it a channel first
        push(apply, SKIP, m, lsns[i], seq, tx, sizes[i])
      end
    elseif k == "relation" then
      routes = {}
      cfg.routes = routes
    elseif k == "begin" then
      self.tx = self:tx_table(m, at)
    elseif k == "commit" then
      apply:mark(m.end_lsn_int, m.commit_time)
      self.tx = nil
    elseif k == "truncate" then
      n = n + self:truncate(m, at)
    elseif k == "keepalive" then
      if m.reply_requested then self.reply_now = true end
      -- outside a transaction, everything up to walEnd has been sent
      if not self.tx and m.wal_end_int then apply:mark(m.wal_end_int) end
    end
  end
  self.c.received = self.c.received + n
  self.rt.stats.received = self.rt.stats.received + n
end

--- A Standby Status Update: written up to what was received, flushed and
-- applied up to what is handled.
function M:status()
  self.apply:settle()
  local f = self.apply.flushed
  local asked = self.reply_now
  self.reply_now, self.last_status = false, now()
  if f <= 0 then return end
  local w = self.received > f and self.received or f
  local ok, err, state = self.repl:confirm(w, f, f, false)
  if not ok then return self:lost(err, state) end
  self.sent = f
  if not asked or self.apply.events == 0 then return end
  local again = self.asked_at and now() - self.asked_at < M.ASK_AGAIN
  self.asked_at = now()
  if again then self:release() end
end

--- The server asked for our position (replyRequested) while events are
-- still pending, and again at once after the answer.  It asks when it
-- heard nothing for wal_sender_timeout / 2 (answered: it asks no more for
-- as long), and when it shuts down: a fast shutdown waits until the client
-- confirms everything it sent, asking again after every answer.  Pending
-- events may never finish in time (a target on the same server, whose
-- connection the shutdown killed first), so what is handled is confirmed
-- (above) and the stream is closed: the walsender exits, the shutdown goes
-- on, and streaming starts again soon from the confirmed position (the
-- pending events come again).
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

function M:drop_repl()
  if self.repl then self.repl:close() end
  self.repl, self.streaming, self.more, self.tx, self.reply_now, self.broken = nil, false, false, nil, false, false
end

---------------------------------------------------------------------------
-- Reload, stats, close
---------------------------------------------------------------------------

function M:reload(_, new)
  local cfg = slotmod.config(new)
  local old = self.cfg
  self.retire_pending = nil
  if not cfg then
    -- during a start (the snapshot handles signals between its pages) the
    -- start finishes first
    if old and self.starting then self.retire_pending = true elseif old then self:retire() end
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
    if self.apply.job then
      self:restream()
    else -- what is queued and not handled yet goes to the new script, as what comes after
      local by = cfg.by_table
      self.apply:reroute(function(ev) return by[ev.schema .. "." .. ev.table] end)
    end
  end
end

--- A reload to a script with no replication table: the runner stops
-- streaming (or standing by for) the slot, after confirming what is
-- handled; the slot keeps the rest, as while no runner runs, for a later
-- reload or start with a replication script.  Never skipped: nothing is
-- confirmed that no handler had.
function M:retire()
  if self.streaming then self:status() end -- what is handled, commits read ahead included
  self.log.warn("no channel streams from the replication slot any more: this runner stops streaming it; "
    .. "the slot keeps the changes not handled until a script serves it again (or --drop-slot with a "
    .. "script that names it)", { slot = self.cfg.slot, handled_to = lsn_format(self.apply.flushed),
    queued = self.apply.events })
  self:drop_repl()
  self.apply:reset()
  if self.sqlconn then self.sqlconn:close() end
  self.sqlconn, self.cfg, self.standing_by = nil, nil, nil
end

--- A reload while a failed job waits for its retry (a handler that keeps
-- failing blocks the slot): the stream starts again from the position
-- handled, so that the changes not handled yet -- the failed ones first --
-- go to the new script's handlers, not to the old handler for ever.
-- Changes handled in a transaction not yet confirmed come again (at least
-- once).
function M:restream()
  local job = self.apply.job
  self.log.info("reload: the changes of the failing handler go to the new script (streaming again from the "
    .. "position handled)", { slot = self.cfg.slot, channel = job.entry.name,
    handled_to = lsn_format(self.apply.flushed), queued = self.apply.events })
  self:status()
  self:drop_repl()
  self.apply:reset()
  self.next_connect, self.attempt = now(), 0
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
