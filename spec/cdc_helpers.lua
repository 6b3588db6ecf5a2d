-- Shared by the replication-source specs (22, 23, ...): databases, the
-- handler script with the README's upsert, starting the runner until it
-- streams, cleaning up slots, comparing source and target; and for the specs
-- of the replication core (17, 37, 39) raw replication connections (C.core).
local H = require "spec.helpers"

local C = {}
local slotseq = 0

--- A source and a target database, a slot name.
function C.setup(prefix)
  slotseq = slotseq + 1
  local src = H.createdb(prefix .. "s")
  local dst = H.createdb(prefix .. "t")
  return src, dst, ("cdc_%d_%d"):format(os.time() % 100000, slotseq)
end

function C.sql(s, db) return H.psql(s, db) end

--- The upsert a handler runs (README, "Change data capture"): unchanged
-- TOASTed columns are left out, so the target keeps its value.
C.HANDLER = [[
local target = assert(pglisten.connect(TARGET))
local function upsert(tbl, ev)
  if ev.op == "TRUNCATE" then return assert(target:exec("TRUNCATE " .. tbl)) end
  if ev.op == "DELETE" or (ev.old and ev.new and ev.old.id ~= ev.new.id) then
    assert(target:exec("DELETE FROM " .. tbl .. " WHERE id = $1", ev.old.id))
    if ev.op == "DELETE" then return end
  end
  local cols, ph, sets, vals = {}, {}, {}, {}
  for k, v in pairs(ev.new) do
    if v ~= pglisten.unchanged then
      vals[#vals + 1] = v
      cols[#cols + 1], ph[#ph + 1] = k, "$" .. #vals
      if k ~= "id" then sets[#sets + 1] = k .. " = EXCLUDED." .. k end
    end
  end
  assert(target:exec(("INSERT INTO %s (%s) VALUES (%s) ON CONFLICT (id) DO %s"):format(tbl,
    table.concat(cols, ", "), table.concat(ph, ", "),
    #sets > 0 and ("UPDATE SET " .. table.concat(sets, ", ")) or "NOTHING"), table.unpack(vals, 1, #vals)))
end
]]

--- A handler script: TARGET, then `body`.
function C.script(dst, body)
  return H.script(("local TARGET = %q\n"):format("dbname=" .. dst) .. C.HANDLER .. body)
end

--- Starts the runner and waits until it streams (or stands by).
function C.start(path, src, args, want, env)
  local argv = { "--db", "dbname=" .. src }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local p = H.start(path, argv, env, false)
  local ok = H.eventually(function()
    local e = p.stderr()
    return e:find(want or "streaming", 1, true) or not p.running()
  end, 20)
  assert(ok and p.running(), "runner did not stream: " .. p.stderr())
  return p
end

--- Starts the runner on a C.script (target `dst`) that streams `slot` from
-- `src` to `channels` (Lua text: the entries of its channels table) and
-- waits until it streams; C.cleanup stops it and drops the slot when the
-- test ends.  Returns the process and the script's path.
function C.run(src, dst, slot, channels) return C.run_script(src, dst, slot, channels) end

--- C.run with `opts`: `prelude` (Lua text before the script's return),
-- `repl` (more fields of its replication table, Lua text), `args` (the
-- runner's extra arguments).
function C.run_script(src, dst, slot, channels, opts)
  opts = opts or {}
  local path = C.script(dst, ("%s\nreturn {\n  replication = { slot = %q, %s },\n  channels = {\n%s\n  },\n}\n")
    :format(opts.prelude or "", slot, opts.repl or "", channels))
  local p = C.start(path, src, opts.args)
  H.finally(function() C.cleanup({ p }, src, slot) end)
  return p, path
end

--- Stops the runner, drops the slot and the publication.
function C.cleanup(procs, src, slot)
  for _, p in ipairs(procs) do p.stop() end
  H.eventually(function()
    return C.sql(("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '%s' AND active"):format(slot)) == "0"
  end, 10)
  C.sql(("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '%s'"):format(slot))
  C.sql(("DROP PUBLICATION IF EXISTS %s"):format(slot), src)
end

--- A digest of a table's rows.
function C.digest(db, tbl)
  return C.sql(("SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY id)), '') FROM %s t")
    :format(tbl), db)
end

function C.same(src, dst, tbl, timeout)
  local want
  local ok = H.eventually(function()
    want = C.digest(src, tbl)
    return C.digest(dst, tbl) == want
  end, timeout or 20, 0.2)
  return ok, want, C.digest(dst, tbl)
end

--- Waits until the walsenders of `slots` (names) have sent all WAL flushed
-- so far, so that what they stream sits in the clients' sockets; at most
-- `limit` s (default 1: the fixed wait this replaces), then goes on anyway.
function C.wait_sent(slots, limit)
  local names = {}
  for i, s in ipairs(slots) do names[i] = "'" .. s .. "'" end
  local lsn = C.sql("SELECT pg_current_wal_flush_lsn()")
  H.eventually(function()
    return C.sql(("SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid "
      .. "WHERE s.slot_name IN (%s) AND r.sent_lsn >= '%s'"):format(table.concat(names, ", "), lsn)) == tostring(#names)
  end, limit or 1, 0.02)
  H.sleep(0.05) -- from the walsender's send to the client's socket
end

function C.confirmed(slot)
  return C.sql(("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '%s'"):format(slot))
end

--- A function of a list of messages: how many are of `kind`.
function C.count(kind)
  return function(got)
    local n = 0
    for _, m in ipairs(got) do if m.kind == kind then n = n + 1 end end
    return n
  end
end

--- A function of a list of messages: true once `n` commits are in it.
function C.commits(n)
  local c = C.count("commit")
  return function(got) return c(got) >= n end
end

--- Raw replication connections (pglisten.core) to database `dbname`
-- (`conninfo`), their slots named `prefix`N_M:
--   R.slotname()           a new slot name
--   R.stream(tables, opts) a new publication over `tables` named as the new
--                          slot, the slot, the connection streaming it with
--                          START_REPLICATION options `opts`: returns r, slot
--   R.stream_on(pub, opts) the same on publication `pub`, which exists
--   R.drop(r, slot)        closes r, drops the slot and a publication of
--                          its name (once no walsender holds it)
--   R.collect(r, until_fn, timeout, max)  reads (up to `max` messages a
--                          read, default 1000) until until_fn(got) or
--                          `timeout` s (default 20); returns got, then nil
--                          or err, sqlstate or "timeout", and the sizes of
--                          the reads that brought messages
function C.core(dbname, conninfo, prefix)
  local core = H.pg.core
  local R, seq = {}, 0
  local function sql(s) return H.psql(s, dbname) end

  function R.slotname()
    seq = seq + 1
    return ("%s%d_%d"):format(prefix, os.time() % 100000, seq)
  end

  function R.stream_on(pub, opts, slot)
    slot = slot or R.slotname()
    local r = assert(core.replication_connect(conninfo, 20))
    local rows = assert(r:command(("CREATE_REPLICATION_SLOT %s LOGICAL pgoutput NOEXPORT_SNAPSHOT"):format(slot)))
    assert(rows[1].slot_name == slot, "the slot made is " .. tostring(rows[1].slot_name))
    local point = tostring(rows[1].consistent_point)
    assert(point:match("^%x+/%x+$"), "consistent_point " .. point)
    local o = { publication = pub }
    for k, v in pairs(opts or {}) do o[k] = v end
    assert(r:start(slot, 0, o))
    return r, slot
  end

  function R.stream(tables, opts)
    local slot = R.slotname()
    sql(("CREATE PUBLICATION %s FOR TABLE %s"):format(slot, tables))
    return R.stream_on(slot, opts, slot)
  end

  function R.drop(r, slot)
    if r and not r:isclosed() then r:close() end
    H.eventually(function()
      return sql(("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '%s' AND active"):format(slot)) == "0"
    end, 10)
    sql(("SELECT pg_drop_replication_slot('%s')"):format(slot))
    sql(("DROP PUBLICATION IF EXISTS %s"):format(slot))
  end

  function R.collect(r, until_fn, timeout, max)
    local got, sizes = {}, {}
    local deadline = H.pg.monotonic() + (timeout or 20)
    while H.pg.monotonic() < deadline do
      local msgs, err, state = r:read(max or 1000)
      if not msgs then return got, err, state, sizes end
      if #msgs > 0 then sizes[#sizes + 1] = #msgs end
      for _, m in ipairs(msgs) do got[#got + 1] = m end
      if until_fn(got) then return got, nil, nil, sizes end
      if #msgs == 0 then
        if r:pollfd() >= 0 then core.poll({ r:pollfd() }, 0.5) else H.pg.sleep(0.1) end
      end
    end
    return got, "timeout", nil, sizes
  end

  return R
end

--- A slot and a publication over `tables` (SQL text), both named `slot`,
-- made before the runner starts, so that a backlog written now is in the
-- slot when it reads.
function C.slot_first(src, slot, tables)
  C.sql(("SELECT pg_create_logical_replication_slot('%s', 'pgoutput')"):format(slot), src)
  C.sql(("CREATE PUBLICATION %s FOR TABLE %s"):format(slot, tables), src)
end

--- n single-row transactions into `tbl` (ids from .. from + n - 1).
function C.insert_commits(src, tbl, from, n)
  C.sql(("DO $$ BEGIN FOR i IN %d..%d LOOP INSERT INTO %s VALUES (i); COMMIT; END LOOP; END $$")
    :format(from, from + n - 1, tbl), src)
end

--- The ids of the "TAG id" lines of a runner's stdout, in order.
function C.ids(stdout, tag)
  local t = {}
  for _, l in ipairs(H.lines(stdout)) do
    local id = l:match("^" .. tag .. " (%d+)$")
    if id then t[#t + 1] = tonumber(id) end
  end
  return t
end

--- The counters of the last "replication stats" line of `stderr`, and the line.
function C.last_stats(stderr)
  local l = stderr:match(".*\n([^\n]*replication stats[^\n]*)")
  assert(l, stderr)
  local f = { line = l }
  for _, k in ipairs({ "received", "handled", "queued", "unrouted" }) do
    f[k] = tonumber(l:match(" " .. k .. "=(%d+)"))
  end
  return f
end

--- Rewrites a C.script at `path` (target `dst`) with `body`, for a reload.
function C.rewrite(path, dst, body)
  H.rewrite(path, ("local TARGET = %q\n"):format("dbname=" .. dst) .. C.HANDLER .. body)
end

--- Waits until the runner has logged its n-th "reloaded".
function C.reloaded(p, n)
  assert(H.eventually(function() return H.count_matches(p.stderr(), "reloaded") >= n end, 10), p.stderr())
end

--- A value of /proc/PID/status of process `p` (VmRSS, VmHWM: kB), or nil.
function C.vm(p, key)
  local f = io.open(("/proc/%d/status"):format(p.pid), "r")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return tonumber(s:match(key .. ":%s*(%d+)"))
end

--- Whether the ids of the "TAG id" lines of stdout (tag "id") increase:
-- true, ids; or false, ids, where they do not.
function C.increasing(stdout, tag)
  local t = C.ids(stdout, tag or "id")
  for k = 2, #t do
    if t[k] <= t[k - 1] then return false, t, ("%d after %d (line %d)"):format(t[k], t[k - 1], k) end
  end
  return true, t
end

--- pglisten.snapshot.run over a snapshot of database `db` exported by a
-- transaction held open meanwhile, with PAGE_BYTES `pb`; `opts.page` (rows
-- per page), `opts.publication`, `opts.between(n)` (after the n-th page).  Returns the rows
-- delivered per table, in order, and the page sizes.
function C.snapshot_rows(db, tables, pb, opts)
  opts = opts or {}
  local snapshot = require "pglisten.snapshot"
  local holder = H.connect("dbname=" .. db)
  assert(holder:exec("BEGIN ISOLATION LEVEL REPEATABLE READ"))
  local name = assert(holder:exec("SELECT pg_export_snapshot() AS s"))[1].s
  local saved = snapshot.PAGE_BYTES
  snapshot.PAGE_BYTES = pb
  local got, pages = {}, {}
  local ok, res, err, code = pcall(snapshot.run, nil, { conninfo = "dbname=" .. db, snapshot = name,
    tables = tables, truncate = false, page = opts.page, publication = opts.publication,
    deliver = function(t, events)
      got[t] = got[t] or {}
      for _, ev in ipairs(events) do got[t][#got[t] + 1] = ev.new end
      pages[#pages + 1] = #events
      if opts.between then opts.between(#pages) end
      return true
    end })
  snapshot.PAGE_BYTES = saved
  holder:exec("ROLLBACK")
  holder:close()
  assert(ok, res)
  assert(res, "snapshot.run: " .. tostring(err) .. " " .. tostring(code))
  return got, pages
end

return C
