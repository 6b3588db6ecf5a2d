--- Applying a replication stream: the queue of decoded changes, their
-- handlers, and the position that may be reported as flushed.
--
-- The queue holds, in the order the server sent them, events (a change of
-- a table some channel streams: its channel entry in `qe`, its event in
-- `qv`, its LSN in `ql`, its index in the transaction in `qs` and its
-- transaction -- `{ xid, commit_lsn, commit_time, received_at, slot,
-- system_id, database }`, one table for its changes of one read -- in
-- `q`: arrays, not one more table per change; its message's bytes in
-- `qb`, summed in `bytes`) and marks (`{ lsn, time }` in `q`, false in
-- `qe`: a commit's end, or a keepalive's walEnd outside a transaction).
-- `events` counts the queued events some channel serves, `skipped` the
-- others.
-- A change's note is made from these when something can see it: the
-- handler, if it takes a second parameter (or `...`); `on_error`,
-- the log and pglisten.dead when it fails.  Measured on a 50,000-row
-- backlog into a batch handler that takes only the events, notes made for
-- every change cost 4.9 k of the runner's 30.6 k instructions per change.
-- Handling takes the head: a mark moves `flushed` to its LSN (every event
-- before it is handled); an event becomes a job -- one event, or for a
-- `batch = N` channel the run of up to N events of that channel at the
-- head, with the marks between them -- and the job's handler runs through
-- dispatch.invoke.  So events are handled in commit order, one at a time,
-- and the flush position never passes an event that is not handled.
--
-- A failed job is retried after `backoff.delay` (the channel's `retry`);
-- when its attempts are spent it is logged and passed to `on_error`, and
-- then either blocks the queue, retried with the growing backoff for as
-- long as it fails (`on_failure = "block"`, the default: nothing is
-- skipped), or is recorded in `pglisten.dead` and passed
-- (`on_failure = "dead"`; the outbox schema must exist on the source
-- database, `lua-pglisten --install`).
-- @module pglisten.replication.apply

local pg = require "pglisten"
local host = require "pglisten.host"
local backoff = require "pglisten.backoff"
local dispatch = require "pglisten.dispatch"

local M = {}
M.__index = M

local now = pg.monotonic
local invoke, errstring = dispatch.invoke, dispatch.errstring
local unchanged = pg.core.unchanged
local lsn_format = pg.core.lsn_format

-- Whether a handler can see its second argument (the notes): a Lua
-- function declaring two parameters or `...`, or anything else that can be
-- called.  Kept per function.
local takes_notes = setmetatable({}, { __mode = "k" })
local function wants_notes(fn)
  local w = takes_notes[fn]
  if w == nil then
    local info = type(fn) == "function" and debug.getinfo(fn, "u")
    w = not info or info.isvararg or info.nparams >= 2
    takes_notes[fn] = w
  end
  return w
end

--- An applier for runtime `rt`; `counters` is the source's; `sql()`
-- returns a plain connection to the source database (for pglisten.dead).
function M.new(rt, counters, sql)
  local self = setmetatable({ rt = rt, log = rt.log, c = counters, sql = sql, flushed = 0, events = 0 }, M)
  self:reset()
  return self
end

--- Forgets everything queued (the stream is restarted from `flushed`):
-- what was counted received comes again and is counted again.
function M:reset()
  local n = self.events or 0
  if n > 0 then self.c.received, self.rt.stats.received = self.c.received - n, self.rt.stats.received - n end
  self.q, self.qe, self.qv, self.ql, self.qs, self.head, self.tail, self.events = {}, {}, {}, {}, {}, 1, 0, 0
  self.qb, self.bytes, self.skipped = {}, 0, 0
  self.job, self.wait_until = nil, nil
end

--- The channel entry of a change no channel serves: queued like the
-- others (a reload may give it a channel), passed to `self.skip(ev)` when
-- it reaches the head.  Not counted in `events` (what is served).
M.SKIP = { name = "(no channel)" }
local SKIP = M.SKIP

--- Appends an event: its channel entry, the event, its LSN (an integer),
-- its index in its transaction, the transaction's table (see above) and
-- the bytes of its message (nil: none counted).
function M:push(entry, ev, lsn, seq, tx, size)
  local t = self.tail + 1
  self.q[t], self.qe[t], self.qv[t], self.ql[t], self.qs[t], self.tail = tx, entry, ev, lsn, seq, t
  if entry ~= SKIP then self.events = self.events + 1 else self.skipped = self.skipped + 1 end
  if size then self.qb[t], self.bytes = size, self.bytes + size end
end

-- Item i leaves the queue.
local function drop(self, i)
  local b = self.qb[i]
  if b then self.qb[i], self.bytes = nil, self.bytes - b end
  if self.qe[i] == SKIP then self.skipped = self.skipped - 1 end
  self.q[i], self.qe[i], self.qv[i], self.ql[i], self.qs[i] = nil, nil, nil, nil, nil
end

--- The note of the event at queue index i.
function M:note(i)
  local tx, lsn = self.q[i], self.ql[i]
  return { channel = self.qe[i].name, lsn = lsn_format(lsn), lsn_int = lsn, commit_lsn = tx.commit_lsn,
    xid = tx.xid, commit_time = tx.commit_time, received_at = tx.received_at, seq = self.qs[i], slot = tx.slot,
    system_id = tx.system_id, database = tx.database }
end

-- A job's notes, made now if they were not (the handler does not take them).
local function notes_of(self, job)
  local notes = job.notes
  if not notes then
    notes = {}
    for k, i in ipairs(job.at) do notes[k] = self:note(i) end
    job.notes = notes
  end
  return notes
end

--- After a reload: the events queued go to the channel entry `route(ev)`
-- returns (none: M.SKIP), as if they had been read after the reload.  No
-- job may be pending.
function M:reroute(route)
  local qe, qv, d = self.qe, self.qv, 0
  for i = self.head, self.tail do
    local was = qe[i]
    if was then
      local e = route(qv[i]) or SKIP
      qe[i] = e
      if (was == SKIP) ~= (e == SKIP) then d = d + (e == SKIP and -1 or 1) end -- `received` counts the served
    end
  end
  self.c.received, self.rt.stats.received, self.events = self.c.received + d, self.rt.stats.received + d,
    self.events + d
  self.skipped = self.skipped - d
end

--- Appends a mark: every event before it is handled once it is reached;
-- `lsn` (an integer) may then be reported as flushed, `time` (a commit's)
-- is the lag's reference.
function M:mark(lsn, time)
  local t = self.tail + 1
  self.q[t], self.qe[t], self.tail = { lsn = lsn, time = time }, false, t
end

--- Items queued (events and marks).
function M:len() return self.tail - self.head + 1 end

--- What is queued behind the job in flight (all of it when there is none):
-- items, bytes, and changes (served or not).
function M:behind()
  local job = self.job
  if not job then return self.tail - self.head + 1, self.bytes, self.events + self.skipped end
  return self.tail - job.last, self.bytes - job.bytes, self.events + self.skipped - #job.events
end

--- True when there is work that may be done now.
function M:ready()
  if self.job then return now() >= self.wait_until end
  return self.head <= self.tail
end

--- The commit time of the oldest event not yet handled, or nil.
function M:oldest_commit()
  local q, qe = self.q, self.qe
  for i = self.head, self.tail do
    local e = qe[i]
    if e and e ~= SKIP then return q[i].commit_time end
  end
end

-- The job at the head: its events, their queue indexes (`at`), the notes
-- if the handler takes them, and the last queue item it covers.
function M:next_job()
  local qe, qv, qb, j, tail = self.qe, self.qv, self.qb, self.head, self.tail
  local entry = qe[j]
  local want = entry.batch or 1
  local events, at, k, bytes = {}, {}, 0, 0
  while j <= tail do
    local e = qe[j]
    if e then
      if e ~= entry or k >= want then break end
      k = k + 1
      events[k], at[k], bytes = qv[j], j, bytes + (qb[j] or 0)
    end
    j = j + 1
  end
  local job = { entry = entry, events = events, at = at, last = j - 1, attempt = 0, bytes = bytes }
  if wants_notes(entry.handler) then notes_of(self, job) end
  return job
end

local function advance(self, it)
  if it.lsn > self.flushed then self.flushed = it.lsn end
  if it.time then self.commit_time = it.time end
end

-- A settled job: its items leave the queue, its marks move `flushed`.
function M:done(job)
  local q, qe = self.q, self.qe
  if job.last then
    for i = self.head, job.last do
      if not qe[i] then advance(self, q[i]) end
      drop(self, i)
    end
    self.head = job.last + 1
    self.events = self.events - #job.events
  end
  self.job, self.wait_until = nil, nil
  return true
end

--- Passes the marks at the head of the queue when no job waits: the
-- commits read ahead behind the last job handled, which a turn that ended
-- early (a signal) left there.  Called before the position is reported.
function M:settle()
  if self.job then return end
  local q, qe, h = self.q, self.qe, self.head
  while h <= self.tail and qe[h] == false do
    advance(self, q[h])
    drop(self, h)
    h = h + 1
  end
  self.head = h
end

--- Handles what may be handled now, up to `budget` events (or until a
-- signal arrives, or `stop()` is true after a job), starting no job past
-- queue index `limit` (what was queued when the turn began: what is read
-- ahead meanwhile waits for the next turn, so that the source answers the
-- server between turns).  A failed job stays at the head (`self.job`)
-- until its retry is due.
function M:handle(budget, limit, stop)
  local n, q, qe = 0, self.q, self.qe
  limit = limit or math.huge
  while n < budget do
    local job = self.job
    if job then
      if now() < self.wait_until or not self:attempt(job) then return end
    end
    local h = self.head
    local it = q[h]
    if not it or h > limit then break end
    local e = qe[h]
    if e == SKIP then
      self.skip(self.qv[h])
      drop(self, h)
      self.head = h + 1
    elseif e then
      job = self:next_job()
      self.job = job
      n = n + #job.events
      if not self:attempt(job) then return end
    else
      advance(self, it)
      drop(self, h)
      self.head = h + 1
    end
    if host.pending() or (stop and stop()) then break end
  end
  if self.head > self.tail and not self.job then
    self.q, self.qe, self.qv, self.ql, self.qs, self.qb, self.head, self.tail = {}, {}, {}, {}, {}, {}, 1, 0
  end
end

-- Runs a job once.  True when it is settled (handled, or buried in
-- pglisten.dead); false when it waits for a retry (`wait_until`).
function M:attempt(job)
  local entry, events, notes = job.entry, job.events, job.notes
  job.attempt = job.attempt + 1
  local ok, err
  if entry.batch then
    ok, err = invoke(entry.handler, events, notes)
  else
    ok, err = invoke(entry.handler, events[1], notes and notes[1])
  end
  if ok then
    self.c.handled = self.c.handled + #events
    self.rt.stats.handled = self.rt.stats.handled + #events
    return self:done(job)
  end
  return self:failed(job, err, dispatch.traceback())
end

-- Settles a failure: a retry later, or (spent) the log, on_error, and
-- pglisten.dead or the blocked queue.
function M:failed(job, err, tb)
  local entry, n, notes = job.entry, #job.events, notes_of(self, job)
  local attempts = entry.retry and entry.retry.attempts or 1
  local wait = backoff.delay(job.attempt, backoff.of(entry))
  local msg = errstring(err)
  self.c.failed_handler = self.c.failed_handler + n
  self.rt.stats.failed_handler = self.rt.stats.failed_handler + n
  local fields = { channel = entry.name, error = msg, attempt = job.attempt, of = attempts,
    lsn = notes[1].lsn, count = n > 1 and n or nil }
  if job.attempt < attempts then
    self.c.retries = self.c.retries + 1
    self.rt.stats.retries = self.rt.stats.retries + 1
    fields.retry_in = ("%.3f"):format(wait)
    self.log.warn("replication handler failed; retrying", fields)
  else
    fields.traceback = tb
    local dead = entry.on_failure == "dead"
    local buried, berr
    if dead then buried, berr = self:bury(job, msg) end
    if buried then
      self.log.error("replication handler failed for the last time; moved to pglisten.dead", fields)
    else
      fields.retry_in, fields.dead_letter_error = ("%.3f"):format(wait), berr
      self.log.error("replication handler failed; the slot waits until it succeeds (nothing is skipped)", fields)
    end
    local info = { kind = "handler", channel = entry.name, attempts = job.attempt, traceback = tb,
      replication = true, final = true, dead = buried or nil, blocked = not buried or nil,
      batch = entry.batch and notes or nil }
    for _, note in ipairs(notes) do self.rt.dispatch:on_error(err, note, info) end
    if buried then
      self.c.dead = self.c.dead + n
      return self:done(job)
    end
  end
  self.wait_until = now() + wait
  return false
end

-- A value for JSON: unchanged TOASTed columns are left out.
local function row_of(t)
  if type(t) ~= "table" then return t end
  local out = {}
  for k, v in pairs(t) do
    if v ~= unchanged then out[k] = v end
  end
  return out
end

local DEAD = [[
INSERT INTO pglisten.dead (id, channel, payload, attempts, last_error)
VALUES (nextval(pg_get_serial_sequence('pglisten.outbox', 'id')), $1, $2, $3, $4)]]

--- Records a job's events in pglisten.dead, in one transaction.
-- @return true, or nil, err
function M:bury(job, msg)
  local conn, err = self.sql()
  if not conn then return nil, err end
  local ok
  ok, err = conn:exec("BEGIN")
  if not ok then return nil, err end
  for i, ev in ipairs(job.events) do
    local note = job.notes[i]
    local payload
    payload, err = pg.json.safe.encode({ op = ev.op, schema = ev.schema, table = ev.table,
      new = row_of(ev.new), old = row_of(ev.old), lsn = note.lsn, commit_lsn = note.commit_lsn,
      xid = note.xid, commit_time = note.commit_time, snapshot = note.snapshot })
    if payload then ok, err = conn:exec(DEAD, job.entry.name, payload, job.attempt, msg) end
    if not payload or not ok then
      conn:exec("ROLLBACK")
      return nil, err
    end
  end
  ok, err = conn:exec("COMMIT")
  if not ok then return nil, err end
  return true
end

--- Hands `events` of one channel (the initial snapshot's rows) to its
-- handler now, in runs of `batch` (one at a time without it), with the
-- same retry and failure rules; waits out the backoff in place.
-- @return true, or nil, err (the runner stops, or the events cannot be handled)
function M:deliver(entry, events, notes)
  local step = entry.batch or 1
  for i = 1, #events, step do
    local job = { entry = entry, events = { table.unpack(events, i, math.min(#events, i + step - 1)) },
      notes = { table.unpack(notes, i, math.min(#notes, i + step - 1)) }, attempt = 0 }
    while not self:attempt(job) do
      while now() < self.wait_until do
        self.rt:signals()
        if self.rt:stopping() then return nil, "stopping" end
        pg.sleep(math.min(0.1, math.max(0, self.wait_until - now())))
      end
    end
    self.rt:signals()
    if self.rt:stopping() then return nil, "stopping" end
  end
  return true
end

return M
