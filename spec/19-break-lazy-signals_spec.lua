-- A reviewer's attacks on lazy connections and on stop signals during a
-- connect (issue 10): each test is a promise tried at an edge that
-- spec/12-lazy-signals does not reach.
local H = require "helpers"
local pg = H.pg
local outbox = require "pglisten.outbox"
local socket = require "socket"

local script, start = H.script, H.start

local function source(db)
  return ("host=127.0.0.1 port=%s dbname=%s"):format(os.getenv("PGPORT"), db or "postgres")
end

-- A TCP server that accepts and never answers (see spec 12); `port` may be
-- given to take over the port of a stopped server.
local function silent_server(port)
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

-- Sends `sig`, returns the exit status (nil if still running after
-- `limit`) and the seconds it took, on the monotonic clock.
local function time_to_exit(p, sig, limit)
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
    finally(s.close)
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
