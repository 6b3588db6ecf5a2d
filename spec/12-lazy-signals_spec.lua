-- A handler script that starts while its target is down (lazy connections),
-- and stop signals that arrive while a connect waits on a server that never
-- answers (the runner's own, a script's top level, a handler's).
local H = require "helpers"
local pg = H.pg
local socket = require "socket"

local script, start = H.script, H.start

local source, silent_server, time_to_exit = H.conninfo1, H.silent_server, H.time_to_exit

local function report(what, secs)
  io.stderr:write(("\n  [12-lazy-signals] %s: %.3f s\n"):format(what, secs))
end

describe("pglisten.connect(conninfo, { lazy = true })", function()
  it("returns at once without touching the network, connects on first use, tries again on the next", function()
    local s = silent_server()
    H.finally(s.close)
    local t0 = pg.monotonic()
    local c, err = pg.connect(s.conninfo, { lazy = true, timeout = 0.5 })
    local dt = pg.monotonic() - t0
    assert(c, err)
    assert.is_true(dt < 0.2, ("lazy connect took %.3f s"):format(dt))
    assert.equal(0, s.accepted(0.2)) -- no socket was opened
    -- no DNS either: a name that cannot resolve is the first use's error
    local d = assert(pg.connect("host=no-such-host.invalid dbname=x", { lazy = true }))
    local r, derr, dcode = d:exec("SELECT 1")
    assert.is_nil(r)
    assert.equal("08001", dcode)
    assert.matches("no%-such%-host%.invalid", derr)
    d:close()
    -- what needs no network answers without it
    assert.equal("bad", c:status())
    assert.equal("unknown", c:txstatus())
    assert.equal(0, c:pid())
    assert.equal(-1, c:pollfd())
    assert.is_false(c:alive())
    assert.same({}, c:channels())
    local batch = c:drain(10)
    assert.equal(0, batch.n)
    assert.is_false(c:isclosed())
    assert.matches("lazy", tostring(c))
    assert.equal(0, s.accepted(0.1))
    -- the first use connects (and times out on this server): 08001
    local rows, e, code = c:exec("SELECT 1")
    assert.is_nil(rows)
    assert.equal("08001", code)
    assert.matches("timeout", e)
    assert.equal(1, s.accepted(1))
    -- the next use tries again
    local ok, e2, code2 = c:ping()
    assert.is_nil(ok)
    assert.equal("08001", code2, e2)
    assert.equal(2, s.accepted(1))
    assert.is_true(c:close())
    assert.is_true(c:isclosed())
    assert.is_true(c:close()) -- idempotent
    assert.has_error(function() c:exec("SELECT 1") end, "attempt to use a closed connection")
    assert.has_error(function() c:channels() end, "attempt to use a closed connection")
    assert.matches("closed", tostring(c))
  end)

  it("behaves as a connection once connected: every method, healing, keepalives, <close>", function()
    local c = assert(pg.connect(nil, { lazy = true }))
    -- settings made before the first use apply to the session
    c:settimeout(5)
    assert.equal(5, c:gettimeout())
    assert.is_true(c:statement_cache(false))
    assert.is_false(c:statement_cache())
    assert.same({ dropped = 0 }, c:notices())
    assert.has_error(function() c:exec(42) end)
    assert.has_error(function() c:transaction("not a function") end)
    assert(c:listen("lazy_ch")) -- the first use
    assert.equal("ok", c:status())
    assert.equal("idle", c:txstatus())
    assert.is_true(c:pid() > 0)
    assert.is_true(c:pollfd() >= 0)
    assert.is_true(c:alive())
    assert.is_true(c:server_version() >= 150000)
    assert.equal(5, c:gettimeout())
    assert.is_false(c:statement_cache())
    assert.same({ "lazy_ch" }, c:channels())
    assert.matches("^pglisten%.conn %(pid %d+", tostring(c))
    assert.equal('"a b"', c:escape_identifier("a b"))
    assert.equal("r", c:events())
    -- keepalives, as on every connection: read from the socket itself
    local probe = socket.tcp() -- no descriptor of its own until used
    probe:setfd(c:pollfd())
    local ka, idle = probe:getoption("keepalive"), probe:getoption("tcp-keepidle")
    probe:setfd(-1) -- libpq's socket: not luasocket's to close
    probe:close()
    assert.is_true(ka)
    assert.equal(30, idle)
    -- notifications
    local o = H.connect()
    assert(o:notify("lazy_ch", "one"))
    local n = assert(c:wait(5))
    assert.equal("one", n.payload)
    assert(c:notify("lazy_ch", "two"))
    n = assert(c:wait(5))
    assert.equal("two", n.payload)
    -- queries
    assert(c:exec("CREATE TEMP TABLE lz (i int)"))
    assert.equal(3, c:execmany("INSERT INTO lz VALUES ($1)", { { 1 }, { 2 }, { 3 } }))
    local seen
    assert.equal(6, c:transaction(function(tx)
      seen = tx
      return tx:exec("SELECT sum(i)::int AS s FROM lz")[1].s
    end))
    assert.equal(c, seen)
    assert.is_true(c:ping())
    -- a broken connection heals on its next use and listens again
    local pid = c:pid()
    assert(o:exec("SELECT pg_terminate_backend($1)", pid))
    assert(H.eventually(function() return not c:alive() end, 5))
    assert(c:exec("SELECT 1"))
    assert.not_equal(pid, c:pid())
    assert(o:notify("lazy_ch", "three"))
    n = assert(c:wait(5))
    assert.equal("three", n.payload)
    assert(c:unlisten())
    assert.same({}, c:channels())
    assert.is_true(c:reset())
    o:close()
    -- <close> and close before any use
    local kept
    do
      local d <close> = assert(pg.connect(nil, { lazy = true }))
      assert(d:exec("SELECT 1"))
      kept = d
    end
    assert.is_true(kept:isclosed())
    local never = assert(pg.connect(nil, { lazy = true }))
    assert.is_true(never:close())
    assert.has_error(function() never:reset() end, "attempt to use a closed connection")
    c:close()
  end)

  it("a first use while the server is down returns 08001; the next use after it is up works", function()
    local tc = H.connect(H.conninfo2())
    tc:close()
    local down = false
    H.finally(function() if down then H.server2("start") end end)
    H.server2("stop")
    down = true
    local c = assert(pg.connect(H.conninfo2(), { lazy = true, timeout = 3 }))
    local rows, err, code = c:exec("SELECT 1")
    assert.is_nil(rows)
    assert.equal("08001", code)
    assert.matches("127%.0%.0%.1", err)
    H.server2("start")
    down = false
    rows = assert(c:exec("SELECT 42 AS v"))
    assert.equal(42, rows[1].v)
    c:close()
  end)

  it("raises for execmany options that are not {savepoint = boolean} before connecting", function()
    -- nothing listens there: a check left to the connection would be an 08001 that retry retries for ever
    local c = assert(pg.connect("host=127.0.0.1 port=1 connect_timeout=2", { lazy = true }))
    local sql = "INSERT INTO t VALUES ($1)"
    assert.has_error(function() c:execmany(sql, { { 1 } }, { savpoint = false }) end,
      "bad argument #3 to 'execmany' (unknown option savpoint; the option is savepoint)")
    assert.has_error(function() c:execmany(sql, { { 1 } }, "fast") end,
      "bad argument #3 to 'execmany' (table expected, got string)")
    assert.has_error(function() c:execmany(sql, { { 1 } }, { savepoint = "no" }) end,
      "bad argument #3 to 'execmany' (option savepoint is a string, boolean expected)")
    assert.has_error(function() c:execmany(sql, {}, { savpoint = false }) end)
    assert.equal(0, c:execmany(sql, {}, { savepoint = false }))
    local n, _, code = c:execmany(sql, { { 1 } }, { savepoint = false })
    assert.is_nil(n); assert.equal("08001", code)
    c:close()
  end)

  it("a conninfo libpq cannot parse fails at connect time, without the network; no password in errors", function()
    local c, err = pg.connect("host=127.0.0.1 password=s3cret 'oops", { lazy = true })
    assert.is_nil(c)
    assert.is_string(err)
    assert.is_nil(err:find("s3cret", 1, true), err)
    for _, ci in ipairs({
      "postgresql://app:s3cret@127.0.0.1:1/app",
      "host=127.0.0.1 port=1 user=app password=s3cret",
      "host=no-such-host.invalid password=s3cret",
    }) do
      local d = assert(pg.connect(ci, { lazy = true }))
      local rows, e, code = d:exec("SELECT 1")
      assert.is_nil(rows)
      assert.equal("08001", code)
      assert.is_nil(e:find("s3cret", 1, true), e)
      assert.is_nil(tostring(d):find("s3cret", 1, true))
      d:close()
    end
  end)
end)

describe("a runner whose servers are down at start", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("starts with source and target down, connects when they come up, syncs a NOTIFY into the target", function()
    local tc = H.connect(H.conninfo2())
    assert(tc:exec("DROP TABLE IF EXISTS lazy_got; CREATE TABLE lazy_got (i int PRIMARY KEY, v text)"))
    tc:close()
    local path = script(([[
local target = assert(pglisten.connect(%q, { lazy = true, timeout = 3 }))
return { channels = { lazy_sync = { retry = { attempts = 8, backoff = 0.25 }, handler = function(row)
  local ok, err, code = target:exec("INSERT INTO lazy_got VALUES ($1, $2) ON CONFLICT DO NOTHING", row.i, row.v)
  if not ok then error(err .. " [" .. tostring(code) .. "]", 0) end
  out("synced", row.i)
end } } }]]):format(H.conninfo2()))
    local down1, down2 = false, false
    H.finally(function()
      if down1 then H.server("start") end
      if down2 then H.server2("start") end
    end)
    H.server("stop")
    down1 = true
    H.server2("stop")
    down2 = true
    p = start(path, { "--db", source(), "--reconnect-max", "0.5" }, nil, false)
    -- it has tried and failed, then goes on trying (every 0.5 s at most) for 2 s more
    assert(H.eventually(function() return p.stderr():find("cannot connect yet", 1, true) or not p.running() end, 10),
      p.stderr())
    H.sleep(2)
    assert.is_true(p.running(), p.stderr())
    assert.is_nil(p.stderr():find("listening", 1, true), p.stderr())
    H.server("start")
    down1 = false
    assert(H.eventually(function() return p.stderr():find("listening", 1, true) end, 15), p.stderr())
    local c = H.connect()
    assert(c:notify("lazy_sync", { i = 1, v = "first" }))
    c:close()
    -- the target is still down: the first use fails with 08001, retry covers it
    assert(H.eventually(function() return p.stderr():find("handler failed; retrying", 1, true) end, 10),
      p.stderr())
    assert.matches("Connection refused.-%[08001%]", p.stderr())
    H.server2("start")
    down2 = false
    assert(H.eventually(function() return p.stdout():find("synced 1\n", 1, true) end, 15), p.stderr())
    tc = H.connect(H.conninfo2())
    assert.equal("first", tc:exec("SELECT v FROM lazy_got WHERE i = 1")[1].v)
    tc:close()
    assert.is_true(p.running())
  end)
end)

describe("stop signals during a connect", function()
  local p, s
  after_each(function()
    if p then p.stop() end
    if s then s.close() end
    p, s = nil, nil
  end)

  it("(a) SIGTERM while the runner's own connect waits: exit 0 within 0.5 s; USR1 does not break the wait", function()
    s = silent_server()
    p = start(script([[return { channels = { x = function() end } }]]), { "--db", s.conninfo }, nil, false)
    assert(H.eventually(function() return s.accepted(0) > 0 end, 10), p.stderr())
    H.sleep(0.3) -- libpq waits for the server's answer now
    p.kill("USR1")
    H.sleep(0.3)
    assert.is_true(p.running(), p.stderr())
    assert.is_nil(p.stderr():find("cannot connect", 1, true), p.stderr())
    assert.equal(1, s.accepted(0)) -- the same attempt still waits
    local rc, dt = time_to_exit(p, "TERM", 15)
    report("(a) runner's connect, SIGTERM to exit", dt)
    assert.equal(0, rc, p.stderr())
    assert.is_true(dt < 0.5, ("stopped %.3f s after SIGTERM\n%s"):format(dt, p.stderr()))
  end)

  it("(b) SIGTERM while the script's top level connects: exit 0 within 0.5 s, not 'cannot load script'", function()
    s = silent_server()
    p = start(script(([[
local c = assert(pglisten.connect(%q))
return { channels = { x = function() end } }]]):format(s.conninfo)), { "--db", source() }, nil, false)
    assert(H.eventually(function() return s.accepted(0) > 0 end, 10), p.stderr())
    H.sleep(0.3)
    local rc, dt = time_to_exit(p, "TERM", 15)
    report("(b) script's top-level connect, SIGTERM to exit", dt)
    assert.equal(0, rc, p.stderr())
    assert.is_true(dt < 0.5, ("stopped %.3f s after SIGTERM\n%s"):format(dt, p.stderr()))
    assert.is_nil(p.stderr():find("cannot load script", 1, true), p.stderr())
    assert.matches("signal", p.stderr())
  end)

  it("(c) SIGTERM while a handler connects: nil, 'interrupted'; exit 0 within 0.5 s; USR1/HUP do not", function()
    s = silent_server()
    p = start(script(([[
return { channels = {
  dial = function() out("dialing"); out("dial", pglisten.connect(%q)) end,
} }]]):format(s.conninfo)), { "--db", source() })
    local c = H.connect()
    assert(c:notify("dial", "{}"))
    c:close()
    assert(H.eventually(function() return s.accepted(0) > 0 end, 10), p.stderr())
    H.sleep(0.3)
    p.kill("USR1")
    H.sleep(0.2)
    p.kill("HUP")
    H.sleep(0.3)
    assert.is_nil(p.stdout():find("dial nil", 1, true), p.stdout()) -- still connecting
    assert.is_true(p.running())
    local rc, dt = time_to_exit(p, "TERM", 15)
    report("(c) handler's connect, SIGTERM to exit", dt)
    assert.equal(0, rc, p.stderr())
    assert.is_true(dt < 0.5, ("stopped %.3f s after SIGTERM\n%s"):format(dt, p.stderr()))
    assert.matches("dial nil interrupted\n", p.stdout())
  end)

  it("(c) a lazy connection's first use in a handler, SIGTERM: nil, 'interrupted', '08001'; exit 0 at once", function()
    s = silent_server()
    p = start(script(([[
local lazy = assert(pglisten.connect(%q, { lazy = true }))
return { channels = {
  dial = function() out("dial", lazy:exec("SELECT 1")) end,
} }]]):format(s.conninfo)), { "--db", source() })
    local c = H.connect()
    -- one transaction: both arrive together, the second waits in the queue
    -- and is handled in the stop's grace: a connect that starts after a
    -- stop signal fails at once, without the network
    assert(c:exec([[SELECT pg_notify('dial', '{"n":1}'), pg_notify('dial', '{"n":2}')]]))
    c:close()
    assert(H.eventually(function() return s.accepted(0) > 0 end, 10), p.stderr())
    H.sleep(0.3)
    local rc, dt = time_to_exit(p, "TERM", 15)
    report("(c) lazy first use in a handler, SIGTERM to exit", dt)
    assert.equal(0, rc, p.stderr())
    assert.is_true(dt < 0.5, ("stopped %.3f s after SIGTERM\n%s"):format(dt, p.stderr()))
    assert.equal("dial nil interrupted 08001\ndial nil interrupted 08001\n", p.stdout())
    assert.equal(1, s.accepted(0)) -- the second never reached the network
  end)

  it("USR1 during a script's connect lets the connect finish, and the runner still logs the statistics", function()
    local srv = assert(socket.bind("127.0.0.1", 0))
    local _, port = srv:getsockname()
    H.finally(function() srv:close() end)
    p = start(script(([[
local c = assert(pglisten.connect(%q))
out("connected", c:status(), c:exec("SELECT 7 AS v")[1].v)
return { channels = { x = function() end } }]]):format(("host=127.0.0.1 port=%d dbname=postgres"):format(port))),
      { "--db", source() }, nil, false)
    srv:settimeout(10)
    local client = assert(srv:accept())
    H.finally(function() client:close() end)
    H.sleep(0.3)
    p.kill("USR1")
    H.sleep(0.3)
    assert.is_true(p.running(), p.stderr())
    -- now relay to the real server until the script has its connection
    local up = assert(socket.connect("127.0.0.1", tonumber(os.getenv("PGPORT"))))
    H.finally(function() up:close() end)
    client:settimeout(0)
    up:settimeout(0)
    local deadline = pg.monotonic() + 10
    while pg.monotonic() < deadline and not p.stdout():find("connected", 1, true) do
      local ready = socket.select({ client, up }, nil, 0.05)
      for _, from in ipairs(ready) do
        local data, rerr, partial = from:receive(65536)
        local chunk = data or partial
        if chunk and #chunk > 0 then assert((from == client and up or client):send(chunk)) end
        if rerr == "closed" then deadline = 0 end
      end
    end
    assert.matches("connected ok 7\n", p.stdout(), 1, true)
    assert(H.eventually(function() return p.stderr():find("listening", 1, true) end, 10), p.stderr())
    assert(H.eventually(function() return p.stderr():find("stats", 1, true) end, 5), p.stderr())
    local rc = time_to_exit(p, "TERM", 15)
    assert.equal(0, rc, p.stderr())
  end)
end)
