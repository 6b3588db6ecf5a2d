-- Shared helpers for the specs.  They run against the throwaway server that
-- scripts/with-pg.sh started (libpq PG* environment), and start real
-- processes (the runner, psql) the way a user would.
local pg = require "pglisten"

local H = {}

H.pg = pg
H.root = os.getenv("PWD") or "."
H.build = os.getenv("PGL_BUILD") or "build"
H.runner = H.root .. "/" .. H.build .. "/lua-pglisten"
H.dir = assert(os.getenv("PGL_TEST_DIR"), "run the specs with `make test` (PGL_TEST_DIR is not set)")
H.ctl = os.getenv("PGL_TEST_CTL")
H.pidfile = os.getenv("PGL_TEST_PIDS")

--- A connection to the test server, or an error.
function H.connect(conninfo, opts)
  return assert(pg.connect(conninfo, opts))
end

--- Shell-quotes a string.
function H.q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

--- Runs a shell command; returns its stdout and whether it succeeded.
function H.sh(cmd)
  local f = assert(io.popen(cmd .. " 2>&1", "r"))
  local out = f:read("a")
  local ok, _, code = f:close()
  return out, ok, code
end

--- Runs SQL through psql (a second, independent client).
function H.psql(sql, db)
  local out, ok = H.sh("psql -qtAX -v ON_ERROR_STOP=1 " .. (db and ("-d " .. H.q(db) .. " ") or "")
    .. "-c " .. H.q(sql))
  assert(ok, "psql failed: " .. out)
  return (out:gsub("%s+$", ""))
end

-- CREATE DATABASE (a copy of template1) takes about 0.2 s, and the specs
-- make a few hundred.  So a spare one is made in the background while a spec
-- runs, and H.createdb renames a spare when the server has one: the same
-- fresh copy of template1, made earlier.  Spares are named pgl_spare_N.
local SPARES = 2
local TAKE = [[DO $$ DECLARE s name; BEGIN
  SELECT datname INTO s FROM pg_database WHERE datname LIKE 'pgl\_spare\_%%' ORDER BY datname LIMIT 1;
  IF s IS NOT NULL THEN EXECUTE format('ALTER DATABASE %%I RENAME TO %%I', s, %s); END IF;
END $$;
SELECT (SELECT count(*) FROM pg_database WHERE datname = %s) || ' '
  || (SELECT count(*) FROM pg_database WHERE datname LIKE 'pgl\_spare\_%%')]]

--- A new database of this test run; returns its name and a conninfo.
local dbseq = 0
function H.createdb(prefix)
  dbseq = dbseq + 1
  local name = ("%s_%d_%d"):format(prefix or "t", os.time() % 100000, dbseq)
  local lit = "'" .. name .. "'"
  local out, ok = H.sh("psql -qtAX -c " .. H.q(TAKE:format(lit, lit)))
  local taken, spares = out:match("^(%d) (%d+)%s*$")
  if not (ok and taken == "1") then H.psql("CREATE DATABASE " .. name) end
  if (tonumber(spares) or 0) < SPARES then
    -- a unique number: H.file's paths are never used twice in a run
    local n = H.file("spare", ""):match("/(%d+)%-spare$")
    os.execute(("psql -qtAX -c 'CREATE DATABASE pgl_spare_%s' >/dev/null 2>&1 &"):format(n))
  end
  return name, "dbname=" .. name
end

--- Sleeps (seconds, fractions allowed).
H.sleep = pg.sleep
H.now = pg.monotonic

--- Polls `fn` until it returns a truthy value or `timeout` seconds pass.
function H.eventually(fn, timeout, step)
  local deadline = pg.monotonic() + (timeout or 10)
  local v
  repeat
    v = fn()
    if v then return v end
    pg.sleep(step or 0.05)
  until pg.monotonic() > deadline
  return fn()
end

--- Registers `fn` to run when the current test ends, however it ends.
-- busted keeps only the last `finally` of a test (an earlier one is dropped
-- in silence), so specs call H.finally instead: the first call of a test
-- registers the one `finally`, which runs every cleanup of that test in
-- reverse order, each in pcall, and then fails with the errors of those
-- that failed.
-- busted's finally of a test -> its cleanups.  In the registry, so that a
-- spec requiring this module as "helpers" and, through cdc_helpers, as
-- "spec.helpers" (two copies) still has one list per test.
local registry = debug.getregistry()
registry["pglisten spec cleanups"] = registry["pglisten spec cleanups"] or setmetatable({}, { __mode = "k" })
local cleanups = registry["pglisten spec cleanups"]
-- The environment busted runs the spec files in: a proxy that looks a name
-- up in the running test's context, where `finally` is that test's own.
-- This module's globals are the plain _G, so the proxy is taken from the
-- spec file that requires this module (its main chunk is on the stack).
local function spec_env()
  for level = 2, 40 do
    local info = debug.getinfo(level, "f")
    if not info then break end
    for i = 1, math.huge do
      local name, env = debug.getupvalue(info.func, i)
      if not name then break end
      if name == "_ENV" and env ~= _ENV and type(env) == "table" then return env end
    end
  end
end
local busted_env = spec_env()
function H.finally(fn)
  assert(type(fn) == "function", "H.finally takes a function")
  local fin = assert(busted_env and busted_env.finally, "H.finally: no running busted test")
  local list = cleanups[fin]
  if not list then
    list = {}
    cleanups[fin] = list
    fin(function()
      local errs = {}
      for i = #list, 1, -1 do
        local ok, err = pcall(list[i])
        if not ok then errs[#errs + 1] = tostring(err) end
      end
      if #errs > 0 then error("cleanup failed: " .. table.concat(errs, "; "), 0) end
    end)
  end
  list[#list + 1] = fn
end

--- Server control: H.server("restart"|"stop"|"start").
function H.server(action)
  assert(H.ctl, "PGL_TEST_CTL is not set")
  local out, ok = H.sh(H.ctl .. " " .. action)
  assert(ok, "pg_ctl " .. action .. " failed: " .. out)
end

--- The second server (a target that goes down on its own).
H.port2 = os.getenv("PGL_TEST_PORT2")
H.ctl2 = os.getenv("PGL_TEST_CTL2")
function H.server2(action)
  assert(H.ctl2, "PGL_TEST_CTL2 is not set")
  local out, ok = H.sh(H.ctl2 .. " " .. action)
  assert(ok, "pg_ctl (server 2) " .. action .. " failed: " .. out)
end
function H.conninfo2(db)
  return ("host=127.0.0.1 port=%s dbname=%s"):format(H.port2, db or "postgres")
end
--- The first server (PGPORT) as a TCP conninfo, database `db` (default postgres).
function H.conninfo1(db)
  return ("host=127.0.0.1 port=%s dbname=%s"):format(os.getenv("PGPORT"), db or "postgres")
end

--- Connections a spec file opens, closed after each test:
-- `local conns = H.conns(20)` and `after_each(conns.close)`; then
-- conns.connect(conninfo) opens one (H.connect, query_timeout 20 s) and
-- conns.keep(c) adds one opened otherwise.
function H.conns(query_timeout)
  local opened = {}
  local t = {}
  function t.keep(c)
    opened[#opened + 1] = c
    return c
  end
  function t.connect(conninfo)
    return t.keep(H.connect(conninfo, { query_timeout = query_timeout }))
  end
  function t.close()
    for i = #opened, 1, -1 do
      if not opened[i]:isclosed() then opened[i]:close() end
      opened[i] = nil
    end
  end
  return t
end

--- A fresh database (H.createdb(prefix)) with the outbox schema installed,
-- opened by connect(conninfo): returns conn, conninfo, dbname.
function H.outbox_db(connect, prefix)
  local name, conninfo = H.createdb(prefix)
  local c = connect(conninfo)
  assert(require("pglisten.outbox").install(c))
  return c, conninfo, name
end

--- The count(*) of table `tbl` (a trusted name) through connection c.
function H.count_rows(c, tbl)
  return assert(c:exec("SELECT count(*) AS n FROM " .. tbl))[1].n
end

--- Terminates backend `pid` from a psql started in the background, `after`
-- seconds from now (while the caller's statement runs); returns the process.
function H.kill_later(pid, after)
  return H.spawn({ "sh", "-c", ("sleep %g; psql -qtAX -c 'SELECT pg_terminate_backend(%d)'"):format(after, pid) })
end

--- Terminates c's backend from connection `admin` and waits until c's
-- socket says so (the FATAL message and EOF arrive one after the other;
-- alive() reads what is there without sending anything).
function H.kill_now(admin, c)
  assert(admin:exec("SELECT pg_terminate_backend($1)", c:pid()))
  assert(H.eventually(function() return not c:alive() end, 10))
end

--- A TCP server on 127.0.0.1 (on `port`, default any free one) that accepts
-- and never answers: the kernel completes the handshake and libpq waits for
-- the server's reply for ever.  Fields: port, conninfo; accepted(t) waits up
-- to t s for one more client and returns how many came (they are held open);
-- close() closes them and the server.
function H.silent_server(port)
  local socket = require "socket"
  local srv = assert(socket.bind("127.0.0.1", port or 0))
  local _, p = srv:getsockname()
  local held = {}
  local s = { port = p, conninfo = ("host=127.0.0.1 port=%d dbname=nobody"):format(p) }
  function s.accepted(timeout)
    srv:settimeout(timeout or 0)
    local c = srv:accept()
    if c then held[#held + 1] = c end
    return #held
  end
  function s.close()
    for _, c in ipairs(held) do c:close() end
    srv:close()
  end
  return s
end

--- Sends signal `sig` to process p (from H.spawn) and measures, on the
-- monotonic clock, how long it takes to exit (its watcher writes the status
-- as soon as it is reaped).  Returns the exit status (nil if still running
-- after `limit` s) and the seconds.
function H.time_to_exit(p, sig, limit)
  local t0 = pg.monotonic()
  p.kill(sig)
  local rc
  repeat
    rc = p.rc()
    if rc then break end
    pg.sleep(0.005)
  until pg.monotonic() - t0 > limit
  return rc, pg.monotonic() - t0
end

--- The backend pid of the runner listening on database `db`, or nil.
function H.runner_backend(db)
  local c = H.connect()
  local r = c:exec("SELECT pid FROM pg_stat_activity WHERE application_name = 'lua-pglisten' AND datname = $1",
    db or "postgres")
  c:close()
  return r and r[1] and r[1].pid
end

--- Terminates the runner's listening backend on `db` (through connection
-- `c`) and waits until the runner says it has a new one and waits for the
-- old notes (the `n`th "on_connect waits" line, default 1).  Returns the
-- terminated backend's pid.
function H.lose_listener(c, db, p, n)
  local pid = H.runner_backend(db)
  assert(type(pid) == "number", "no listening backend")
  assert(c:exec("SELECT pg_terminate_backend($1)", pid))
  assert(H.eventually(function()
    return H.count_matches(p.stderr(), "on_connect waits for the notes received before the loss") >= (n or 1)
  end, 15), p.stderr())
  return pid
end

--- The address the runner serves metrics on (its "serving metrics" line).
function H.metrics_address(p)
  local a
  H.eventually(function()
    a = p.stderr():match("serving metrics address=(%S+)")
    return a
  end, 10)
  return assert(a, "no 'serving metrics' line: " .. p.stderr())
end

-- A path in the test dir that no earlier spec used: busted reloads this
-- module for every spec file, so a counter alone would repeat.
local fileseq = 0
local function fresh(fmt)
  while true do
    fileseq = fileseq + 1
    local path = fmt:format(fileseq)
    local f = io.open(path, "r")
    if not f and not io.open(path .. ".pid", "r") then return path end
    if f then f:close() end
  end
end

--- Writes a file into the test dir; returns its path.
function H.file(name, content)
  local path = fresh(H.dir .. "/%d-" .. name)
  local f = assert(io.open(path, "w"))
  f:write(content)
  f:close()
  return path
end

function H.read(path)
  local f = io.open(path, "r")
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end

--- Starts a process in the background.  Returns a handle with
-- `pid`, `out` (path of stdout), `err` (stderr), `rcfile`, and methods
-- `kill(sig)`, `wait(timeout)` -> exit code or nil, `stderr()`, `stdout()`.
-- The pid is recorded so that with-pg.sh kills it if a spec leaves it behind.
function H.spawn(argv, env)
  local base = fresh(H.dir .. "/proc%d")
  local parts = {}
  for k, v in pairs(env or {}) do parts[#parts + 1] = k .. "=" .. H.q(v) end
  local cmd = {}
  for i, a in ipairs(argv) do cmd[i] = H.q(a) end
  -- a watcher shell records the exit status; the spec's own shell returns at once
  local watcher = ("sh -c %s >/dev/null 2>&1 &"):format(H.q(
    ("%s exec %s >%s 2>%s </dev/null & pid=$!; echo $pid >%s; echo $pid >>%s; wait $pid; echo $? >%s"):format(
      #parts > 0 and ("export " .. table.concat(parts, " ") .. ";") or "",
      table.concat(cmd, " "), H.q(base .. ".out"), H.q(base .. ".err"), H.q(base .. ".pid"), H.q(H.pidfile),
      H.q(base .. ".rc"))))
  assert(os.execute(watcher))
  local pid = H.eventually(function()
    local s = H.read(base .. ".pid"):match("%d+")
    return s and tonumber(s)
  end, 5, 0.01)
  assert(pid, "could not start " .. argv[1])
  local p = { pid = pid, out = base .. ".out", err = base .. ".err", rcfile = base .. ".rc" }
  function p.kill(sig)
    os.execute(("kill -%s %d 2>/dev/null"):format(sig or "TERM", pid))
  end
  function p.rc()
    local s = H.read(p.rcfile):match("%d+")
    return s and tonumber(s)
  end
  function p.wait(timeout)
    return H.eventually(p.rc, timeout or 10, 0.02)
  end
  function p.running() return p.rc() == nil end
  function p.stderr() return H.read(p.err) end
  function p.stdout() return H.read(p.out) end
  --- Kills the process if it still runs (for `finally`).
  function p.stop()
    if p.rc() == nil then
      p.kill("KILL")
      p.wait(5)
    end
  end
  return p
end

--- Lines of a string, empty ones dropped.
function H.lines(s)
  local t = {}
  for l in s:gmatch("[^\n]+") do t[#t + 1] = l end
  return t
end

--- A handler script file whose handlers can call out(...) to print one line
-- (arguments tostring'ed) on stdout; `pglisten` is required already.
local PRELUDE = [[
local pglisten = require "pglisten"
local function out(...)
  local t = table.pack(...)
  for i = 1, t.n do t[i] = tostring(t[i]) end
  io.stdout:write(table.concat(t, " ", 1, t.n), "\n")
  io.stdout:flush()
end
]]
function H.script(body)
  return H.file("handler.lua", PRELUDE .. body)
end

--- Writes a handler script over `path` (a file from H.script), with the
-- same prelude (out(...), `pglisten` required), for a reload.
function H.rewrite(path, body)
  local f = assert(io.open(path, "w"))
  f:write(PRELUDE .. body)
  f:close()
end

--- How many times Lua pattern `pat` matches in string `s`.
function H.count_matches(s, pat)
  local n = 0
  for _ in s:gmatch(pat) do n = n + 1 end
  return n
end

--- Starts the runner on `path` and, unless wait_for is false, waits until
-- it listens or stands by (its log says so); raises if it exits instead.
function H.start(path, args, env, wait_for)
  local argv = { H.runner }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  argv[#argv + 1] = path
  local p = H.spawn(argv, env)
  if wait_for ~= false then
    assert(H.eventually(function()
      local e = p.stderr()
      return e:find("listening", 1, true) or e:find("standing by", 1, true) or not p.running()
    end, 15), "runner did not start: " .. p.stderr())
    assert(p.running(), "runner exited: " .. p.stderr())
  end
  return p
end

--- Runs the runner to completion (for --check, --help and the like).
function H.run_runner(args, env)
  local p = H.spawn({ H.runner, table.unpack(args) }, env)
  local rc = p.wait(20)
  return rc, p.stdout(), p.stderr()
end

return H
