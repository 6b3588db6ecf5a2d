--- Exactly-once application of a replication stream into a PostgreSQL
-- target: `pglisten.apply(target, events, notes, fn)`.
--
-- The replication source delivers at least once: after a SIGKILL, a lost
-- walsender or a server restart the slot sends again what came after its
-- confirmed position, and a plain handler re-applies old changes onto a
-- target that is already ahead of them (an order re-inserted for a user a
-- later transaction deleted: the foreign key fails, for ever).  apply()
-- does what PostgreSQL's own apply worker does with a replication origin:
-- the source position is recorded in the same target transaction that
-- applies the change, so the target holds exactly what it has applied.
--
-- The position of an event is `(commit_lsn, snapshot, seq)`, compared in
-- that order with snapshot rows first:
--   * a streamed change: its transaction's commit LSN, and `seq`, its
--     index among the transaction's changes (so a batch that ends in the
--     middle of a transaction is exact: the rest of it is applied, the part
--     already applied is not);
--   * a row of the initial snapshot: the slot's consistent point, the
--     snapshot flag, and its index in the snapshot.  Every streamed change
--     commits after the consistent point, so no snapshot row is ever applied
--     over a newer streamed change; a snapshot started again (its slot
--     recreated) has a later consistent point and replaces the rows of the
--     interrupted one.
-- The runner (pglisten.sources.replication) puts these into every note, with
-- the key: `note.system_id` (IDENTIFY_SYSTEM's systemid), `note.database`
-- and `note.slot`.
--
-- Where the position lives: a table, `pglisten.applied`, in the target,
-- one row per (system_id, database, slot), created on first use (CREATE
-- SCHEMA / CREATE TABLE IF NOT EXISTS; CREATE on the target database, no
-- superuser).  Not a replication origin: pg_replication_origin_create and
-- pg_replication_origin_xact_setup need superuser in PostgreSQL 15 (or an
-- explicit GRANT EXECUTE a superuser must make), an origin's name is
-- limited and it holds one LSN, not the finer (lsn, snapshot, seq); a table
-- works for any role that may create one and can be read with SELECT.
--
-- One transaction on the target, in this order:
--   1. one statement locks the position row (FOR UPDATE: two runners on one
--      slot, say during a takeover, never both apply), returns the position
--      before it, and moves it to the batch's last event (only forward);
--   2. the events at or before the old position are dropped;
--   3. `fn(target, events, notes)` runs with the rest (not at all when none
--      is left);
--   4. COMMIT.  The target commits with synchronous_commit on: when the
--      session's setting is `off`, apply sets it on for this transaction
--      (SET LOCAL), since a commit that could vanish in a crash must not
--      count as applied -- the slot is confirmed after it.
-- A failure anywhere rolls back fn's work and the position together; the
-- caller (the runner's retry and backoff) tries again, and whatever had
-- committed is skipped then.  A loss during COMMIT (08007, outcome unknown)
-- is safe for the same reason.
-- @module pglisten.apply

local core = require "pglisten.core"

local M = {}

local lsn_parse = core.lsn_parse

-- The position table.  Its order is (lsn, NOT snapshot, seq).
M.TABLE = [[
CREATE TABLE IF NOT EXISTS pglisten.applied (
  system_id  text NOT NULL,
  database   text NOT NULL,
  slot       text NOT NULL,
  lsn        pg_lsn NOT NULL,
  snapshot   boolean NOT NULL,
  seq        bigint NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (system_id, database, slot)
);
COMMENT ON TABLE pglisten.applied IS 'lua-pglisten: the source position applied to this database per
replication slot (pglisten.apply): the last applied event''s commit LSN (a snapshot row: the slot''s
consistent point), whether it was a snapshot row, and its index in its transaction (or snapshot)']]

-- Step 1, in one statement: the old position, locked, and the new one
-- written when it is ahead.  No row: not ahead (everything applied) or no
-- position yet (SELECT_OLD tells which).
local MOVE = [[
UPDATE pglisten.applied a
   SET lsn = $4::pg_lsn, snapshot = $5, seq = $6, applied_at = now()
  FROM (SELECT lsn, snapshot, seq FROM pglisten.applied
         WHERE system_id = $1 AND database = $2 AND slot = $3 FOR UPDATE) o
 WHERE a.system_id = $1 AND a.database = $2 AND a.slot = $3
   AND ($4::pg_lsn, NOT $5::boolean, $6::bigint) > (o.lsn, NOT o.snapshot, o.seq)
RETURNING o.lsn::text AS lsn, o.snapshot, o.seq, current_setting('synchronous_commit') AS sync]]

M.MOVE = MOVE -- (for the specs: two appliers at once)

local SELECT_OLD = [[
SELECT lsn::text AS lsn, snapshot, seq FROM pglisten.applied
 WHERE system_id = $1 AND database = $2 AND slot = $3 FOR UPDATE]]

-- Nothing applied yet: before every position.
local FIRST = [[
INSERT INTO pglisten.applied (system_id, database, slot, lsn, snapshot, seq)
VALUES ($1, $2, $3, '0/0', true, -1) ON CONFLICT DO NOTHING]]

local MISSING = { ["42P01"] = true, ["3F000"] = true }

---------------------------------------------------------------------------
-- Positions
---------------------------------------------------------------------------

local function lsn_of(v)
  if math.type(v) == "integer" then return v end
  return type(v) == "string" and lsn_parse(v) or nil
end

-- The position of a note: lsn, rank (0: snapshot row, 1: streamed), seq.
local function position(note, i)
  if type(note) ~= "table" then
    error(("pglisten.apply: note %d is not a table"):format(i), 3)
  end
  local lsn, seq = lsn_of(note.commit_lsn), math.tointeger(note.seq)
  if not lsn or not seq then
    error(("pglisten.apply: note %d has no position (commit_lsn and seq, as the replication source sets them)")
      :format(i), 3)
  end
  return lsn, note.snapshot and 0 or 1, seq
end

local function after(l1, r1, s1, l2, r2, s2)
  if l1 ~= l2 then return math.ult(l2, l1) end
  if r1 ~= r2 then return r1 > r2 end
  return s1 > s2
end

-- The key of the stream the notes come from.
local function key_of(note)
  local sys, db, slot = note.system_id, note.database, note.slot
  if sys == nil or db == nil or slot == nil then
    error("pglisten.apply: the notes carry no system_id, database and slot (the replication source sets them)", 3)
  end
  return tostring(sys), tostring(db), tostring(slot)
end

-- The events (and notes) after position `old` ({lsn, rank, seq}).
local function unapplied(events, notes, old)
  local ol, orank, oseq = lsn_parse(old.lsn), old.snapshot and 0 or 1, old.seq
  local l, r, s = position(notes[1], 1)
  if after(l, r, s, ol, orank, oseq) then return events, notes end -- the usual case: all new
  local ev, nt = {}, {}
  for i = 2, #events do
    l, r, s = position(notes[i], i)
    if after(l, r, s, ol, orank, oseq) then
      ev[#ev + 1], nt[#nt + 1] = events[i], notes[i]
    end
  end
  return ev, nt
end

---------------------------------------------------------------------------
-- The transaction
---------------------------------------------------------------------------

-- Creates pglisten.applied (its own transaction).  A runner that creates it
-- at the same moment wins the race; that is fine.
local function install(target)
  return target:transaction(function(c)
    local rows, err, code = c:exec("SELECT to_regnamespace('pglisten') IS NOT NULL AS has")
    if not rows then return nil, err, code end
    if not rows[1].has then
      rows, err, code = c:exec("CREATE SCHEMA IF NOT EXISTS pglisten")
      if not rows then return nil, err, code end
    end
    rows, err, code = c:exec(M.TABLE)
    if not rows then return nil, err, code end
    return true
  end)
end

-- Step 1: the old position ({lsn, snapshot, seq, sync}) with the row
-- locked, or false when everything is applied already; nil, err, code.
local function move(c, key, last)
  local sys, db, slot = key[1], key[2], key[3]
  for _ = 1, 2 do
    local rows, err, code = c:exec(MOVE, sys, db, slot, last.lsn, last.snapshot, last.seq)
    if not rows then return nil, err, code end
    if rows[1] then return rows[1] end
    rows, err, code = c:exec(SELECT_OLD, sys, db, slot)
    if not rows then return nil, err, code end
    if rows[1] then return false end -- locked, and not behind the batch
    rows, err, code = c:exec(FIRST, sys, db, slot)
    if not rows then return nil, err, code end
  end
  return nil, "pglisten.apply: the position row of slot " .. slot .. " vanished", "P0002"
end

local function results(ok, ...)
  if ok == nil and select("#", ...) == 0 then return true end
  return ok, ...
end

-- The body of the transaction: steps 1 to 3.
local function body(c, key, last, events, notes, fn, single, missing)
  local old, err, code = move(c, key, last)
  if old == nil then
    if MISSING[code] then missing.yes = true end
    return nil, err, code
  end
  if old == false then return true end
  local ev, nt = unapplied(events, notes, old)
  if #ev == 0 then return true end
  if old.sync == "off" then
    local ok
    ok, err, code = c:exec("SET LOCAL synchronous_commit = on")
    if not ok then return nil, err, code end
  end
  if single then return results(fn(c, ev[1], nt[1])) end
  return results(fn(c, ev, nt))
end

--- Applies `events` to the PostgreSQL connection `target` exactly once:
-- `fn(target, events, notes)` runs in one transaction on `target`, with
-- only the events not applied there yet, and the position of the last one
-- is recorded in `pglisten.applied` in the same transaction.
-- `events, notes` are a batch handler's arguments, or one event and its
-- note (a handler without `batch`; `fn` then gets one event and note too).
-- The notes must come from the replication source (or carry the same
-- fields: system_id, database, slot, commit_lsn, seq, snapshot).  Inside a
-- transaction block of `target` (a `transaction()`), fn runs under a
-- savepoint and the position commits with the outer block.
-- @param target a pglisten connection to the target database
-- @tparam table events the events (or one event)
-- @tparam table notes their notes (or one note)
-- @tparam function fn `fn(target, events, notes)`: writes through `target`;
--   raise or return nil, err to fail
-- @return fn's results (true when it returned none, or when every event was
--   applied already and fn was not called); or nil, err, sqlstate: nothing
--   was committed (08007: the COMMIT's outcome is unknown; the next attempt
--   finds out), and the handler should raise so that the runner retries
--   and does not confirm the slot
function M.apply(target, events, notes, fn)
  if type(target) ~= "table" and type(target) ~= "userdata" then
    error("bad argument #1 to 'apply' (connection expected, got " .. type(target) .. ")", 2)
  end
  local function want(v, n, what)
    if type(v) ~= what then
      error(("bad argument #%d to 'apply' (%s expected, got %s)"):format(n, what, type(v)), 3)
    end
  end
  want(events, 2, "table"); want(notes, 3, "table"); want(fn, 4, "function")
  local single = notes.commit_lsn ~= nil or events.op ~= nil
  if single then events, notes = { events }, { notes } end
  if #events ~= #notes then error("pglisten.apply: events and notes differ in length", 2) end
  if #events == 0 then return true end
  local key = { key_of(notes[1]) }
  local l, r, s = position(notes[#notes], #notes)
  local last = { lsn = core.lsn_format(l), snapshot = r == 0, seq = s }
  for attempt = 1, 2 do
    local missing = {}
    local res = table.pack(target:transaction(function(c)
      return body(c, key, last, events, notes, fn, single, missing)
    end))
    if not (missing.yes and attempt == 1) then return table.unpack(res, 1, res.n) end
    local ok, err, code = install(target)
    if not ok then return nil, "pglisten.apply: cannot create pglisten.applied: " .. tostring(err), code end
  end
end

return M
