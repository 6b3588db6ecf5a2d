--- `lua-pglisten backfill --table T --channel C [--where SQL] [--batch N] SCRIPT`:
-- hands a table's existing rows to SCRIPT's handler of channel C as INSERT
-- events (`note.backfill = true`), a keyset page at a time, in primary-key
-- order (the data side is pglisten.backfill).
--
-- A process of its own, next to the runner that goes on handling live
-- events: it LISTENs to nothing.  Each page goes through the runner's one
-- dispatch path (pglisten.dispatch), so the channel's decode, batch and
-- retry settings apply; a page is recorded in pglisten.backfill once every
-- row of it is handled, and a killed backfill resumes after the last page
-- recorded.  A row whose handler fails for good stops the backfill (exit 1)
-- before its page is recorded: the next run redoes that page.
--
-- Exit status: 0 done (or stopped by TERM/INT after a finished page), 1 a
-- runtime failure, 2 a usage or script error.
-- @module pglisten.commands.backfill

local pg = require "pglisten"
local host = require "pglisten.host"
local args = require "pglisten.commands.args"
local data = require "pglisten.backfill"
local dispatch = require "pglisten.dispatch"
local stats = require "pglisten.services.stats"
local logmod = require "pglisten.log"
local scriptmod = require "pglisten.script"
local conninfo = require "pglisten.conninfo"

local M = {}

local now = pg.monotonic

local USAGE = [[
usage: lua-pglisten backfill --table SCHEMA.TABLE --channel C [--where SQL]
                             [--batch N] [--restart] [--db CONNINFO] SCRIPT

Reads the rows of TABLE in primary-key order, N at a time (default 1000),
each page one short query, and hands each row to SCRIPT's handler of
channel C as an INSERT event {op, schema, table, new = row} with
note.backfill = true.  Run it next to the runner: live events go on.
Resumes after the last finished page (pglisten.backfill); --restart starts over.

  -d, --db CONNINFO     database (default: $DATABASE_URL, else libpq's PG* environment)
      --where SQL       only rows matching SQL (trusted SQL text from the operator)
  -l, --log-level LEVEL error | warn | info | debug (default info)
      --log-format FMT  text | json
Progress: a status line on a terminal, log lines otherwise.
Exit status: 0 done, 1 runtime failure, 2 usage or script error.
]]

local OPTIONS = {
  { short = "d", long = "db", arg = true },
  { long = "table", arg = true },
  { long = "channel", arg = true },
  { long = "where", arg = true },
  { long = "batch", arg = true, integer = true },
  { long = "restart" },
  { short = "l", long = "log-level", arg = true },
  { long = "log-format", arg = true },
  { short = "h", long = "help" },
}

M.LOG_EVERY = 5      -- seconds between two progress log lines
M.DRAW_EVERY = 0.2   -- seconds between two redraws of the terminal line

local function usage(msg)
  args.printerr(msg)
  io.stderr:write("Try 'lua-pglisten backfill --help'.\n")
  return 2
end

local function check(opts)
  if not opts.table then return "backfill needs --table SCHEMA.TABLE" end
  if not opts.channel then return "backfill needs --channel C" end
  if #opts ~= 1 then return #opts == 0 and "backfill: missing SCRIPT" or "backfill: one SCRIPT expected" end
  if opts["log-level"] and not logmod.LEVELS[opts["log-level"]] then
    return "invalid --log-level " .. opts["log-level"]
  end
  if opts["log-format"] and opts["log-format"] ~= "text" and opts["log-format"] ~= "json" then
    return "invalid --log-format " .. opts["log-format"] .. " (text or json)"
  end
end

---------------------------------------------------------------------------
-- Progress
---------------------------------------------------------------------------

local function clock(s)
  if not s or s ~= s or s == math.huge then return "?" end
  s = math.floor(s + 0.5)
  return ("%d:%02d:%02d"):format(s // 3600, s % 3600 // 60, s % 60)
end

-- A progress reporter: a redrawn line on a terminal, else log lines.
local function progress(log, tty, tname, total, done0)
  local t0, last_out = now(), -math.huge
  local P = {}
  function P.show(done, final)
    local t = now()
    if not final and t - last_out < (tty and M.DRAW_EVERY or M.LOG_EVERY) then return end
    last_out = t
    local rate = (done - done0) / math.max(t - t0, 1e-3)
    local eta = (total and total > done and rate > 0) and (total - done) / rate or (total and 0) or nil
    if tty then
      io.stderr:write(("\r\27[Kbackfill %s: %d rows%s, %.0f rows/s, ETA %s"):format(tname, done,
        total and ("/~%d"):format(math.max(total, done)) or "", rate, clock(eta)), final and "\n" or "")
      io.stderr:flush()
    else
      log.info(final and "backfill finished" or "backfill progress",
        { table = tname, rows = done, estimated = total, rate = math.floor(rate + 0.5), eta = eta and clock(eta) })
    end
  end
  return P
end

---------------------------------------------------------------------------
-- Pages
---------------------------------------------------------------------------

-- Runs the dispatcher until every note of the page is settled; returns how
-- many failed for good (decode or handler).
local function settle(d, st)
  local failed0 = st.failed_decode + st.failed_handler
  while d:queued() > 0 do
    if host.pending() then host.signals() end -- TERM/INT: stop after this page (host.stopping)
    if d:ready() then
      d:run()
    else
      local due = d:next_due()
      pg.sleep(math.max(0.001, math.min(0.1, (due or now()) - now())))
    end
  end
  return st.failed_decode + st.failed_handler - failed0
end

local function notes_of(page, entry)
  local notes, t = {}, pg.now()
  for i, row in ipairs(page) do
    notes[i] = { channel = entry.name, payload = row.payload, received_at = t, backfill = true,
      durable = entry.durable or nil, pid = 0 }
  end
  return notes
end

-- The loop over pages; returns the exit code.
local function run(job)
  local conn, log, st, d = job.conn, job.log, job.stats, job.dispatch
  local state, done = job.state, job.state.rows
  local show = progress(log, job.tty, job.t.qualified, job.total, done).show
  while true do
    if host.stopping() then
      if job.tty then io.stderr:write("\n") end
      log.info("backfill stopped by a signal; it resumes after the last finished page",
        { table = job.t.qualified, rows = done })
      return 0
    end
    local page, err = data.page(conn, job.t, job.where, state.last, job.batch)
    if not page then return job.fail("reading a page failed", err) end
    if #page == 0 then break end
    d:append(notes_of(page, job.entry), #page)
    local failed = settle(d, st)
    if failed > 0 then
      if job.tty then io.stderr:write("\n") end
      log.error("backfill stopped: rows of this page failed; the next run redoes the page",
        { table = job.t.qualified, failed = failed, rows = done })
      return 1
    end
    done, state.last = done + #page, page[#page].key
    local ok
    ok, err = data.record(conn, job.t.qualified, job.entry.name, job.where, state.last, done, false)
    if not ok then return job.fail("recording progress failed", err) end
    show(done)
  end
  local ok, err = data.record(conn, job.t.qualified, job.entry.name, job.where, state.last, done, true)
  if not ok then return job.fail("recording progress failed", err) end
  show(done, true)
  return 0
end

---------------------------------------------------------------------------
-- The command
---------------------------------------------------------------------------

-- The channel entry to backfill, or nil and a usage error.
local function channel_entry(spec, name, script)
  local entry = spec.channels[name]
  if not entry then return nil, ("%s has no channel %q"):format(script, name) end
  if entry.source == "replication" then
    return nil, ('channel %q has source = "replication": its slot\'s snapshot reads the existing rows'):format(name)
  end
  return entry
end

-- The connection, table and progress; returns a job, or nil and an exit code.
local function prepare(opts, log, entry)
  local db = args.db(opts)
  local function fail(what, err)
    log.error("backfill: " .. what, { error = conninfo.redact(tostring(err), db) })
    return 1
  end
  local conn, err = pg.connect(db)
  if not conn then
    log.error("backfill: cannot connect", { db = pg.safe_conninfo(db), error = err })
    return nil, 1
  end
  local t
  t, err = data.table(conn, opts.table)
  if not t then return nil, fail("cannot backfill " .. opts.table, err) end
  local code
  if opts.restart then
    local ok
    ok, err = data.forget(conn, t.qualified, entry.name, opts.where)
    if not ok then return nil, fail("cannot reset the progress", err) end
  end
  local state
  state, err, code = data.progress(conn, t.qualified, entry.name, opts.where)
  if not state then
    if code == "42P01" then err = "table pglisten.backfill is missing: run lua-pglisten --install (" .. err .. ")" end
    return nil, fail("cannot read the progress", err)
  end
  return { conn = conn, log = log, t = t, state = state, fail = fail, entry = entry, where = opts.where,
    batch = opts.batch or 1000, tty = os.execute("test -t 2") == true, total = data.estimate(conn, t, opts.where) }
end

--- Runs `lua-pglisten backfill ...` (`argv[first..]`); returns the exit code.
function M.main(argv, first)
  local opts, err = args.parse(OPTIONS, argv, first)
  if not opts then return usage("backfill: " .. err) end
  if opts.help then io.stdout:write(USAGE); return 0 end
  err = check(opts)
  if err then return usage(err) end
  local log = logmod.new({ level = opts["log-level"], format = opts["log-format"] })
  local spec
  spec, err = scriptmod.load(opts[1])
  if not spec then
    log.error("cannot load script", { script = opts[1], error = tostring(err) })
    return 2
  end
  local entry
  entry, err = channel_entry(spec, opts.channel, opts[1])
  if not entry then return usage("backfill: " .. err) end
  local job, rc = prepare(opts, log, entry)
  if not job then return rc end
  if job.state.finished then
    log.info("backfill already finished; --restart runs it again",
      { table = job.t.qualified, channel = entry.name, finished_at = job.state.finished, rows = job.state.rows })
    job.conn:close()
    return 0
  end
  job.stats = stats.counters()
  local rt = { spec = spec, log = log, stats = job.stats }
  function rt.topup() end -- a page is all there is: nothing more to read
  function rt.past_grace() return false end
  job.dispatch = dispatch.new(rt, spec.ordering)
  log.info(job.state.last and "backfill resuming" or "backfill starting", { table = job.t.qualified,
    channel = entry.name, rows = job.state.rows, estimated = job.total, batch = job.batch })
  rc = run(job)
  job.conn:close()
  return rc
end

return M
