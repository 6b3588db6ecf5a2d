-- A reviewer's attacks on lazy connections and on stop signals during a
-- connect (issue 10): each test is a promise tried at an edge that
-- spec/12-lazy-signals does not reach.
local H = require "helpers"
local pg = H.pg
local outbox = require "pglisten.outbox"
local socket = require "socket"

local script, start = H.script, H.start

local source, silent_server, time_to_exit = H.conninfo1, H.silent_server, H.time_to_exit

local function report(what, secs)
  io.stderr:write(("\n  [19-break] %s: %.3f s\n"):format(what, secs))
end

-- Stops server 2 and runs fn(); server 2 is started again afterwards, also
-- when fn fails.
local function with_server2_down(fn)
  H.server2("stop")
  local ok, err = pcall(fn)
  H.server2("start")
  assert(ok, err)
end

describe("a lazy connection at its edges", function()
  it("after close() before any use, every method raises, offline ones included", function()
    local c = assert(pg.connect("host=127.0.0.1 port=1", { lazy = true }))
    assert.is_true(c:close())
    for _, call in ipairs({
      function() c:status() end, function() c:pid() end, function() c:pollfd() end,
      function() c:events() end, function() c:drain(1) end, function() c:settimeout(1) end,
      function() c:gettimeout() end, function() c:statement_cache(false) end,
      function() c:notices() end, function() c:listen("x") end, function() c:wait(0) end,
      function() c:transaction(function() end) end, function() c:execmany("SELECT 1", { { 1 } }) end,
      function() outbox.publish(c, "ch", "p") end,
    }) do
      assert.has_error(call, "attempt to use a closed connection")
    end
    assert.equal("pglisten.conn (closed)", tostring(c))
  end)

  it("is itself: ==, getmetatable hidden, rawequal to what transaction hands fn", function()
    local c = assert(pg.connect(nil, { lazy = true }))
    local d = assert(pg.connect(nil, { lazy = true }))
    assert.is_true(c == c)
    assert.is_false(c == d)
    assert.is_false(getmetatable(c))
    local seen
    assert.is_true(c:transaction(function(tx) seen = tx; return true end))
    assert.is_true(rawequal(c, seen))
    c:close(); d:close()
  end)

  it("works with pglisten.outbox: publish, claim, finish, pending, dead", function()
    local _, ci = H.createdb("brklazyob")
    local c = assert(pg.connect(ci, { lazy = true }))
    assert.is_true(outbox.install(c))
    local id = assert(outbox.publish(c, "lz", { n = 1 }))
    local ev = assert(outbox.claim(c, { "lz" }, 10))
    assert.equal(1, #ev)
    assert.equal(id, ev[1].id)
    assert.is_true(outbox.finish(c, { id }, {}))
    assert.equal(0, outbox.pending(c, "lz"))
    c:close()
  end)

  it("outbox.publish on a lazy connection whose server is down: nil, err, 08001; works once it is up", function()
    with_server2_down(function()
      local c = assert(pg.connect(H.conninfo2(), { lazy = true, timeout = 2 }))
      local id, err, code = outbox.publish(c, "lz", "p")
      assert.is_nil(id)
      assert.equal("08001", code, err)
      local ev, cerr, ccode = outbox.claim(c, { "lz" }, 10)
      assert.is_nil(ev)
      assert.equal("08001", ccode, cerr)
      c:close()
    end)
  end)

  it("a transaction whose backend is killed in the middle fails and keeps none of its rows", function()
    local tc = H.connect(H.conninfo2())
    assert(tc:exec("DROP TABLE IF EXISTS brk_tx; CREATE TABLE brk_tx (i int)"))
    local c = assert(pg.connect(H.conninfo2(), { lazy = true }))
    local after = {}
    local ok, err, code = c:transaction(function(tx) -- the first use: BEGIN connects
      assert(tx:exec("INSERT INTO brk_tx VALUES (1)"))
      assert(tc:exec("SELECT pg_terminate_backend($1)", tx:pid()))
      H.eventually(function() return not tx:alive() end, 5)
      after[1] = table.pack(tx:exec("INSERT INTO brk_tx VALUES (2)"))
      after[2] = table.pack(tx:exec("INSERT INTO brk_tx VALUES (3)")) -- must not heal here
      return true
    end)
    assert.is_nil(ok)
    assert.is_string(err)
    assert.matches("^08", code or "")
    assert.is_nil(after[1][1])
    assert.is_nil(after[2][1])
    assert.equal(0, tc:exec("SELECT count(*)::int AS n FROM brk_tx")[1].n)
    -- and the connection heals outside the transaction
    assert(c:exec("INSERT INTO brk_tx VALUES (4)"))
    assert.equal(1, tc:exec("SELECT count(*)::int AS n FROM brk_tx")[1].n)
    c:close(); tc:close()
  end)

  it("a first use inside another lazy connection's transaction, during a server restart of its own", function()
    local a = assert(pg.connect(nil, { lazy = true }))
    local b = assert(pg.connect(H.conninfo2(), { lazy = true, timeout = 2 }))
    local r1, r2
    with_server2_down(function()
      assert(a:transaction(function(tx)
        r1 = table.pack(b:exec("SELECT 1 AS v")) -- nested first use, b's server down
        return tx:exec("SELECT 1")
      end))
    end)
    assert.is_nil(r1[1])
    assert.equal("08001", r1[3])
    assert(a:transaction(function()
      r2 = assert(b:exec("SELECT 2 AS v"))
      return true
    end))
    assert.equal(2, r2[1].v)
    a:close(); b:close()
  end)

  it("LISTEN before the first connect, then a reconnect: listens again", function()
    local c = assert(pg.connect(H.conninfo2(), { lazy = true }))
    assert(c:listen("brk_lz"))
    local o = H.connect(H.conninfo2())
    local pid = c:pid()
    assert(o:exec("SELECT pg_terminate_backend($1)", pid))
    assert(H.eventually(function() return not c:alive() end, 5))
    assert(c:exec("SELECT 1")) -- heals (ping does not, on any connection)
    assert.not_equal(pid, c:pid())
    assert(o:notify("brk_lz", "again"))
    local n = assert(c:wait(5))
    assert.equal("again", n.payload)
    local r = assert(c:exec("SELECT pg_listening_channels() AS ch"))
    assert.equal(1, r.n)
    assert.equal("brk_lz", r[1].ch)
    o:close(); c:close()
  end)

  it("settings made before the first use: settimeout(0), statement_cache(false) reach the session", function()
    local c = assert(pg.connect(nil, { lazy = true, query_timeout = 3 }))
    assert.equal(3, c:gettimeout())
    c:settimeout(0) -- no bound, as on a connection
    assert.is_false(c:statement_cache(false) == nil)
    local plain = H.connect()
    plain:settimeout(0)
    assert.equal(plain:gettimeout(), c:gettimeout())
    assert(c:exec("SELECT 1"))
    assert.equal(plain:gettimeout(), c:gettimeout())
    assert.is_false(c:statement_cache())
    plain:close(); c:close()
  end)

  it("misuse raises before the first use too, also while the server is down", function()
    local c = assert(pg.connect("host=127.0.0.1 port=1", { lazy = true }))
    for name, call in pairs({
      ["listen()"] = function() c:listen() end,
      ["listen(42)"] = function() c:listen(42) end,
      ["unlisten(true)"] = function() c:unlisten(true) end,
      ["notify()"] = function() c:notify() end,
      ["notify('ch', 42)"] = function() c:notify("ch", 42) end,
      ["escape_identifier()"] = function() c:escape_identifier() end,
      ["wait('soon')"] = function() c:wait("soon") end,
      ["wait(-1)"] = function() c:wait(-1) end,
      ["ping('soon')"] = function() c:ping("soon") end,
    }) do
      local ok, err = pcall(call)
      assert.is_false(ok, name .. " returned instead of raising")
      assert.matches("bad argument", err, 1, true)
      assert.matches("19%-break%-lazy%-signals_spec%.lua", err) -- at the caller's line
    end
    assert.equal(0, c:pid()) -- and none of them tried to connect
    c:close()
  end)

  it("ping(t) and wait(t) before the first connect are bounded by t, not by the connect timeout", function()
    local s = silent_server()
    H.finally(s.close)
    local c = assert(pg.connect(s.conninfo, { lazy = true, timeout = 4 }))
    for _, call in ipairs({ function() return c:ping(0.3) end, function() return c:wait(0.3) end }) do
      local t0 = pg.monotonic()
      local r, err = call()
      local dt = pg.monotonic() - t0
      assert.is_nil(r)
      assert.is_string(err)
      assert.is_true(dt < 1.5, ("took %.3f s for a 0.3 s bound: %s"):format(dt, err))
    end
    c:close()
  end)

  it("a bad opts.query_timeout raises at connect, as for a plain connection, not at each first use", function()
    for _, qt in ipairs({ -1, "x", true }) do
      assert.has_error(function() pg.connect(nil, { query_timeout = qt }) end)
      local ok, err = pcall(function() return pg.connect(nil, { lazy = true, query_timeout = qt }) end)
      assert.is_false(ok, "lazy connect accepted query_timeout = " .. tostring(qt))
      assert.matches("query_timeout", err, 1, true)
      assert.matches("19%-break%-lazy%-signals_spec%.lua", err)
    end
  end)

  it("what needs no server answers without one while it is down: empty execmany, unlisten", function()
    local c = assert(pg.connect("host=127.0.0.1 port=1", { lazy = true }))
    assert.equal(0, c:execmany("INSERT INTO t VALUES ($1)", {}))
    assert.is_true(c:unlisten())
    assert.is_true(c:unlisten("a", "b"))
    assert.same({}, c:channels())
    assert.equal(0, c:pid()) -- no connect was tried
    c:close()
  end)

  it("opts.interruptible reaches the session, lazy or not; off by default", function()
    local plain = H.connect()
    assert.is_false(plain:interruptible())
    plain:close()
    for _, lazy in ipairs({ false, true }) do
      local c = assert(pg.connect(nil, { lazy = lazy, interruptible = true }))
      assert(c:exec("SELECT 1"))
      assert.is_true(c:interruptible())
      assert.is_true(c:interruptible(false))
      assert.is_false(c:interruptible())
      c:close()
    end
  end)

  it("reset(t) with t <= 0 raises (t < 0 was no deadline at all: deadline_in(-1)), lazy or not", function()
    local plain = H.connect()
    local lazy = assert(pg.connect(nil, { lazy = true }))
    for _, c in ipairs({ plain, lazy }) do
      for _, t in ipairs({ -1, 0, "x" }) do
        local ok, err = pcall(function() return c:reset(t) end)
        assert.is_false(ok, ("reset(%s) returned instead of raising"):format(tostring(t)))
        assert.matches("bad argument", err, 1, true)
      end
    end
    assert(plain:exec("SELECT 1"))
    plain:close(); lazy:close()
  end)

  it("first uses and heals during a server restart: rows or nil, err, 08xxx, in the timeout; never raise", function()
    local used = assert(pg.connect(H.conninfo2(), { lazy = true, timeout = 2 }))
    assert(used:exec("SELECT 1"))
    local done = H.dir .. "/brk-restart.done"
    os.remove(done)
    assert(os.execute(("(%s restart >/dev/null 2>&1; touch %s) &"):format(H.ctl2, H.q(done))))
    H.finally(function()
      H.eventually(function() return io.open(done) end, 60)
      if not pcall(H.connect, H.conninfo2()) then H.server2("start") end
    end)
    local results, worst = {}, 0
    local deadline = pg.monotonic() + 30
    repeat
      for _, c in ipairs({ assert(pg.connect(H.conninfo2(), { lazy = true, timeout = 2 })), used }) do
        local t0 = pg.monotonic()
        local ok, r, _, code = pcall(c.exec, c, "SELECT 1 AS v")
        worst = math.max(worst, pg.monotonic() - t0)
        assert.is_true(ok, tostring(r))
        if r then
          assert.equal(1, r[1].v)
        else
          assert.matches("^08", code or "", 1, false)
          results[#results + 1] = code
        end
        if c ~= used then c:close() end
      end
      pg.sleep(0.02)
    until io.open(done) or pg.monotonic() > deadline
    assert(H.eventually(function() return used:exec("SELECT 1") end, 10))
    report(("restart: %d failed uses, slowest call"):format(#results), worst)
    assert.is_true(worst < 4.5, ("a call took %.3f s"):format(worst))
    used:close()
  end)

  it("a dropped lazy connection is collected and its session closed", function()
    local o = H.connect()
    local function sessions()
      return o:exec("SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = 'brk_gc'")[1].n
    end
    do
      local c = assert(pg.connect("application_name=brk_gc", { lazy = true }))
      assert(c:exec("SELECT 1"))
      assert.equal(1, sessions())
    end
    collectgarbage(); collectgarbage()
    assert(H.eventually(function() return sessions() == 0 end, 5))
    o:close()
  end)

  it("no secret in the error of a first use that times out or is refused, in any conninfo form", function()
    local s = silent_server()
    H.finally(s.close)
    for _, ci in ipairs({
      ("postgresql://app:s3cret@127.0.0.1:%d/app"):format(s.port),
      ("host=127.0.0.1 port=%d password='s3 cret' sslpassword=s3cret"):format(s.port),
      "postgresql://app:s3cret@127.0.0.1:1/app?sslpassword=s3cret",
    }) do
      local c = assert(pg.connect(ci, { lazy = true, timeout = 0.3 }))
      for _, r in ipairs({ table.pack(c:exec("SELECT 1")), table.pack(c:reset()), table.pack(c:ping()) }) do
        assert.is_nil(r[1])
        assert.is_nil(tostring(r[2]):find("s3", 1, true), r[2])
      end
      c:close()
    end
  end)
end)

-- A relay on 127.0.0.1 to server 1: the first `pass` clients are relayed,
-- later ones are accepted and held without an answer.  `pump(secs)` moves
-- bytes for that long; `cut(i)` closes relayed client i on both sides.
local function relay(pass)
  local srv = assert(socket.bind("127.0.0.1", 0))
  local _, port = srv:getsockname()
  local r = { port = port, clients = 0, conninfo = ("host=127.0.0.1 port=%d dbname=postgres"):format(port) }
  local pairs_, held, peer = {}, {}, {}
  function r.pump(secs)
    local deadline = pg.monotonic() + (secs or 0)
    repeat
      local watch = { srv }
      for _, p in ipairs(pairs_) do
        if p.open then watch[#watch + 1] = p.c; watch[#watch + 1] = p.u end
      end
      local ready = socket.select(watch, nil, 0.02)
      for _, s in ipairs(ready) do
        if s == srv then
          srv:settimeout(0)
          local c = srv:accept()
          if c then
            r.clients = r.clients + 1
            if r.clients <= pass then
              local u = assert(socket.connect("127.0.0.1", tonumber(os.getenv("PGPORT"))))
              c:settimeout(0); u:settimeout(0)
              local p = { c = c, u = u, open = true }
              pairs_[#pairs_ + 1] = p
              peer[c], peer[u] = u, c
            else
              held[#held + 1] = c
            end
          end
        elseif peer[s] then
          local data, err, partial = s:receive(65536)
          local chunk = data or partial
          if chunk and #chunk > 0 then peer[s]:send(chunk) end
          if err == "closed" then
            for _, p in ipairs(pairs_) do
              if p.c == s or p.u == s then p.open = false; p.c:close(); p.u:close() end
            end
          end
        end
      end
    until pg.monotonic() >= deadline
    return r.clients
  end
  function r.held() return #held end
  function r.cut(i)
    local p = pairs_[i]
    p.open = false
    p.c:close(); p.u:close()
  end
  function r.close()
    for _, p in ipairs(pairs_) do p.c:close(); p.u:close() end
    for _, c in ipairs(held) do c:close() end
    srv:close()
  end
  return r
end

-- Pumps `r` until cond() holds (or `limit` seconds pass); returns cond().
local function pump_until(r, cond, limit)
  local deadline = pg.monotonic() + (limit or 10)
  while not cond() and pg.monotonic() < deadline do r.pump(0.05) end
  return cond()
end

describe("stop signals during a connect, at the edges", function()
  local p, s
  after_each(function()
    if p then p.stop() end
    if s then s.close() end
    p, s = nil, nil
  end)

  it("SIGTERM while the runner's connect waits on a full-backlog listener (SYN dropped): exit 0 < 0.5 s", function()
    local srv = assert(socket.bind("127.0.0.1", 0, 0))
    local _, port = srv:getsockname()
    local fillers = {}
    H.finally(function()
      for _, f in ipairs(fillers) do f:close() end
      srv:close()
    end)
    -- fill the accept queue: connects that do not complete at once mean the
    -- kernel drops SYNs now
    for _ = 1, 8 do
      local f = socket.tcp()
      f:settimeout(0)
      f:connect("127.0.0.1", port)
      fillers[#fillers + 1] = f
    end
    local probe = socket.tcp()
    probe:settimeout(0.3)
    local ok = probe:connect("127.0.0.1", port)
    probe:close()
    assert.is_nil(ok, "the listener still completes handshakes")
    p = start(script([[return { channels = { x = function() end } }]]),
      { "--db", ("host=127.0.0.1 port=%d dbname=x"):format(port) }, nil, false)
    H.sleep(1)
    assert.is_true(p.running(), p.stderr())
    assert.is_nil(p.stderr():find("cannot connect", 1, true), p.stderr())
    local rc, dt = time_to_exit(p, "TERM", 15)
    report("SYN-dropped connect, SIGTERM to exit", dt)
    assert.equal(0, rc, p.stderr())
    assert.is_true(dt < 0.5, ("stopped %.3f s after SIGTERM\n%s"):format(dt, p.stderr()))
  end)

  it("SIGINT as SIGTERM; HUP during the runner's own connect does not end it", function()
    s = silent_server()
    p = start(script([[return { channels = { x = function() end } }]]), { "--db", s.conninfo }, nil, false)
    assert(H.eventually(function() return s.accepted(0) > 0 end, 10), p.stderr())
    H.sleep(0.3)
    p.kill("HUP")
    H.sleep(0.5)
    assert.is_true(p.running(), p.stderr())
    assert.equal(1, s.accepted(0)) -- the same attempt still waits
    assert.is_nil(p.stderr():find("retrying", 1, true), p.stderr())
    local rc, dt = time_to_exit(p, "INT", 15)
    report("runner's connect, SIGINT to exit", dt)
    assert.equal(0, rc, p.stderr())
    assert.is_true(dt < 0.5, ("stopped %.3f s after SIGINT\n%s"):format(dt, p.stderr()))
  end)

  it("SIGTERM while a handler's connection heals (reset) against a server that never answers", function()
    local tc = H.connect(H.conninfo2())
    tc:close()
    p = start(script(([[
local target = assert(pglisten.connect(%q))
return { channels = { heal = function() out("pid", target:pid()); out("heal", target:exec("SELECT 1")) end } }
]]):format(H.conninfo2())), { "--db", source() })
    with_server2_down(function()
      s = silent_server(tonumber(H.port2))
      local c = H.connect()
      assert(c:notify("heal", "{}"))
      c:close()
      assert(H.eventually(function() return s.accepted(0) > 0 end, 10), p.stderr())
      H.sleep(0.3)
      assert.is_true(p.running(), p.stderr())
      local rc, dt = time_to_exit(p, "TERM", 15)
      report("handler's heal (reset), SIGTERM to exit", dt)
      s.close(); s = nil
      assert.equal(0, rc, p.stderr())
      assert.is_true(dt < 0.5, ("stopped %.3f s after SIGTERM\n%s"):format(dt, p.stderr()))
      assert.matches("heal nil interrupted", p.stdout())
    end)
  end)

  it("SIGTERM while the outbox connection (durable channel) connects: exit 0 < 0.5 s", function()
    local name, ci = H.createdb("brkob")
    local oc = H.connect(ci)
    assert(outbox.install(oc))
    oc:close()
    local r = relay(1) -- the listening connection passes, the outbox's is held
    H.finally(r.close)
    p = start(script([[return { channels = { jobs = { durable = true, handler = function() end } } }]]),
      { "--db", (r.conninfo:gsub("dbname=postgres", "dbname=" .. name)) }, nil, false)
    assert(pump_until(r, function() return r.held() > 0 end, 15), p.stderr())
    assert(p.stderr():find("listening", 1, true), p.stderr())
    r.pump(0.3)
    assert.is_true(p.running(), p.stderr())
    local rc, dt = time_to_exit(p, "TERM", 15)
    report("outbox connection's connect, SIGTERM to exit", dt)
    assert.equal(0, rc, p.stderr())
    assert.is_true(dt < 0.5, ("stopped %.3f s after SIGTERM\n%s"):format(dt, p.stderr()))
  end)

  it("SIGTERM while a single-active standby reconnects: exit 0 < 0.5 s", function()
    local path = script([[return { single_active = "brk-standby", channels = { x = function() end } }]])
    local leader = start(path, { "--db", source() })
    H.finally(leader.stop)
    local r = relay(1)
    H.finally(r.close)
    p = start(path, { "--db", r.conninfo }, nil, false)
    assert(pump_until(r, function() return p.stderr():find("standing by", 1, true) end, 15), p.stderr())
    r.cut(1) -- the standby's connection dies; its next try connects again, and is held
    assert(pump_until(r, function() return r.held() > 0 end, 10), p.stderr())
    r.pump(0.3)
    assert.is_true(p.running(), p.stderr())
    local rc, dt = time_to_exit(p, "TERM", 15)
    report("standby's reconnect, SIGTERM to exit", dt)
    assert.equal(0, rc, p.stderr())
    assert.is_true(dt < 0.5, ("stopped %.3f s after SIGTERM\n%s"):format(dt, p.stderr()))
  end)
end)

-- A server that completes the startup (trust: AuthenticationOk, ReadyForQuery)
-- and then never answers a query: what a pooler does whose own server is
-- down (PgBouncer queues the query up to query_wait_timeout, 120 s).
local function frozen_server()
  local srv = assert(socket.bind("127.0.0.1", 0))
  local _, port = srv:getsockname()
  local held = {}
  local f = { conninfo = ("host=127.0.0.1 port=%d dbname=x sslmode=disable gssencmode=disable"):format(port) }
  local function msg(kind, body) return kind .. string.pack(">I4", #body + 4) .. body end
  -- Accepts one client and answers its startup; true when done.
  function f.serve(timeout)
    srv:settimeout(timeout)
    local c = srv:accept()
    if not c then return false end
    held[#held + 1] = c
    c:settimeout(5)
    local len = assert(c:receive(4))
    assert(c:receive(string.unpack(">I4", len) - 4))
    assert(c:send(msg("R", string.pack(">I4", 0))
      .. msg("S", "server_version\0" .. "15.0\0") .. msg("S", "client_encoding\0UTF8\0")
      .. msg("S", "standard_conforming_strings\0on\0")
      .. msg("K", string.pack(">I4I4", 4242, 1)) .. msg("Z", "I")))
    return true
  end
  function f.close()
    for _, c in ipairs(held) do c:close() end
    srv:close()
  end
  return f
end

describe("a stop while the runner's LISTEN waits on a server that took the connection but does not answer", function()
  local p, f
  after_each(function()
    if p then p.stop() end
    if f then f.close() end
    p, f = nil, nil
  end)

  -- The runner's LISTEN (and the leader's lock query) ran on conn:exec,
  -- whose waits no stop signal ended, with no query timeout: the runner
  -- never exited on SIGTERM (measured: still running 5 s after it; systemd
  -- SIGKILLs it at TimeoutStopSec).
  for _, case in ipairs({ { "LISTEN", "" }, { "single-active lock query", "single_active = 'brk-frozen', " } }) do
    it(("SIGTERM while the runner's %s waits: exit 0 within 0.5 s"):format(case[1]), function()
      f = frozen_server()
      p = start(script(("return { %schannels = { x = function() end } }"):format(case[2])),
        { "--db", f.conninfo }, nil, false)
      assert(f.serve(10), p.stderr())
      H.sleep(0.5)
      assert.is_true(p.running(), p.stderr())
      local rc, dt = time_to_exit(p, "TERM", 5)
      report(("frozen server's %s, SIGTERM to exit"):format(case[1]), dt)
      assert.equal(0, rc, p.stderr())
      assert.is_true(dt < 0.5, ("stopped %.3f s after SIGTERM\n%s"):format(dt, p.stderr()))
    end)
  end
end)

describe("a single-active runner with a durable channel, started while both servers are down", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("connects when they come up, leads, claims the event published before, syncs the ones after", function()
    local name, ci = H.createdb("brkdown")
    local c = H.connect(ci)
    assert(outbox.install(c))
    local before = assert(outbox.publish(c, "jobs", { i = 1 }))
    c:close()
    local tc = H.connect(H.conninfo2())
    assert(tc:exec("DROP TABLE IF EXISTS brk_down; CREATE TABLE brk_down (i int PRIMARY KEY, via text)"))
    tc:close()
    local path = script(([[
local target = assert(pglisten.connect(%q, { lazy = true, timeout = 2 }))
local function put(i, via)
  local ok, err, code = target:exec("INSERT INTO brk_down VALUES ($1, $2) ON CONFLICT DO NOTHING", i, via)
  if not ok then error(err .. " [" .. tostring(code) .. "]", 0) end
  out("synced", i, via)
end
return { single_active = "brk-down", reconnect = { min = 0.1, max = 0.5 }, poll_interval = 0.5, channels = {
  jobs = { durable = true, handler = function(ev) put(ev.i, "durable") end },
  plain = { retry = { attempts = 10, backoff = 0.3 }, handler = function(row) put(row.i, "notify") end },
} }]]):format(H.conninfo2()))
    local down1, down2 = true, true
    H.server("stop")
    H.server2("stop")
    H.finally(function()
      if down1 then H.server("start") end
      if down2 then H.server2("start") end
    end)
    p = start(path, { "--db", source(name) }, nil, false)
    -- it has tried and failed, then goes on trying (every 0.5 s at most) for 1.5 s more
    assert(H.eventually(function() return p.stderr():find("cannot connect yet", 1, true) or not p.running() end, 10),
      p.stderr())
    H.sleep(1.5)
    assert.is_true(p.running(), p.stderr())
    H.server2("start")
    down2 = false
    H.server("start")
    down1 = false
    assert(H.eventually(function() return p.stderr():find("listening", 1, true) end, 15), p.stderr())
    assert(H.eventually(function() return p.stdout():find("synced 1 durable", 1, true) end, 15), p.stderr())
    c = H.connect(ci)
    local after = assert(outbox.publish(c, "jobs", { i = 2 }))
    assert(c:notify("plain", { i = 3 }))
    assert(after > before)
    assert(H.eventually(function()
      return p.stdout():find("synced 2 durable", 1, true) and p.stdout():find("synced 3 notify", 1, true)
    end, 15), p.stdout() .. p.stderr())
    assert(H.eventually(function() return outbox.pending(c, "jobs") == 0 end, 5))
    c:close()
    tc = H.connect(H.conninfo2())
    assert.equal(3, tc:exec("SELECT count(*)::int AS n FROM brk_down")[1].n)
    tc:close()
    local rc = time_to_exit(p, "TERM", 5)
    assert.equal(0, rc, p.stderr())
  end)
end)

describe("stop signals around a script load", function()
  local p, s
  after_each(function()
    if p then p.stop() end
    if s then s.close() end
    p, s = nil, nil
  end)

  it("SIGTERM while a SIGHUP reload's top-level connect waits: exit 0 < 0.5 s", function()
    s = silent_server()
    local path = script(([[
if io.open(%q) then
  local c = assert(pglisten.connect(%q))
end
return { channels = { x = function() end } }]]):format(H.dir .. "/brk-reload-flag", s.conninfo))
    p = start(path, { "--db", source() })
    local flag = assert(io.open(H.dir .. "/brk-reload-flag", "w")) -- the next load connects to the silent server
    flag:close()
    H.finally(function() os.remove(H.dir .. "/brk-reload-flag") end)
    p.kill("HUP")
    assert(H.eventually(function() return s.accepted(0) > 0 end, 10), p.stderr())
    H.sleep(0.3)
    assert.is_true(p.running(), p.stderr())
    local rc, dt = time_to_exit(p, "TERM", 15)
    report("a reload's top-level connect, SIGTERM to exit", dt)
    assert.equal(0, rc, p.stderr())
    assert.is_true(dt < 0.5, ("stopped %.3f s after SIGTERM\n%s"):format(dt, p.stderr()))
  end)

  it("a script that fails to load during a stop exits 0 and still logs why it failed", function()
    s = silent_server()
    p = start(script(([[
local c = assert(pglisten.connect(%q))
return { channels = { x = function() end } }]]):format(s.conninfo)), { "--db", source() }, nil, false)
    assert(H.eventually(function() return s.accepted(0) > 0 end, 10), p.stderr())
    H.sleep(0.2)
    local rc = time_to_exit(p, "TERM", 5)
    assert.equal(0, rc, p.stderr())
    assert.matches("signal received while loading", p.stderr(), 1, true)
    assert.matches("interrupted", p.stderr(), 1, true) -- the script's own error
  end)

  it("two SIGTERMs during a connect: gone at once (status 0 or 1), never waits", function()
    s = silent_server()
    p = start(script([[return { channels = { x = function() end } }]]), { "--db", s.conninfo }, nil, false)
    assert(H.eventually(function() return s.accepted(0) > 0 end, 10), p.stderr())
    H.sleep(0.2)
    local t0 = pg.monotonic()
    p.kill("TERM")
    p.kill("TERM")
    local rc = p.wait(5)
    local dt = pg.monotonic() - t0
    report("two SIGTERMs during a connect, to exit", dt)
    assert.is_true(rc == 0 or rc == 1, tostring(rc) .. p.stderr())
    assert.is_true(dt < 0.5, ("%.3f s"):format(dt))
  end)
end)

-- libpq resolves a host name inside PQconnectStart, with the blocking
-- getaddrinfo(); no signal ends that (glibc's resolver retries on EINTR).
-- A name in /etc/hosts resolves at once and this machine has no DNS to
-- stall, so a preloaded getaddrinfo() stalls "*.slow.test" for 2 s and then
-- answers 127.0.0.1: the documented limit, measured, and the promise that
-- the connect after the lookup does not wait out its timeout.
describe("a stop during a host name lookup", function()
  local p, s
  after_each(function()
    if p then p.stop() end
    if s then s.close() end
    p, s = nil, nil
  end)

  local function shim()
    local src = H.file("slowdns.c", [[
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <string.h>
#include <time.h>
typedef int (*gai_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);
int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res) {
  gai_fn real = (gai_fn)dlsym(RTLD_NEXT, "getaddrinfo");
  size_t n = node ? strlen(node) : 0;
  if (n > 10 && strcmp(node + n - 10, ".slow.test") == 0) {
    struct timespec t = {2, 0};
    while (nanosleep(&t, &t) != 0)
      ; /* as a resolver that retries after EINTR */
    return real("127.0.0.1", service, hints, res);
  }
  return real(node, service, hints, res);
}
]])
    local so = src:gsub("%.c$", ".so")
    local out, ok = H.sh(("cc -shared -fPIC -o %s %s -ldl 2>&1"):format(H.q(so), H.q(src)))
    assert(ok, out)
    return so
  end

  it("SIGTERM in the lookup: exit 0 once the lookup returns, no connect timeout waited after it", function()
    if os.getenv("PGL_SANITIZE") then return end -- a preload beside ASan's runtime
    local so = shim()
    s = silent_server()
    p = start(script([[return { channels = { x = function() end } }]]),
      { "--db", ("host=db.slow.test port=%d dbname=x"):format(s.port) }, { LD_PRELOAD = so }, false)
    H.sleep(0.7) -- inside the 2 s lookup
    assert.is_true(p.running(), p.stderr())
    local rc, dt = time_to_exit(p, "TERM", 15)
    report("SIGTERM 0.7 s into a 2 s name lookup, to exit", dt)
    assert.equal(0, rc, p.stderr())
    assert.is_true(dt < 2.5, ("stopped %.3f s after SIGTERM\n%s"):format(dt, p.stderr()))
    assert.is_true(dt > 0.8, ("%.3f s: did the lookup stall?\n%s"):format(dt, p.stderr()))
  end)
end)
