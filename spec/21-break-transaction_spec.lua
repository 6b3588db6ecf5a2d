-- Breaking issue 10's "a transaction is never split" and "the connection's
-- view matches the server's" where nobody looked: nested transaction()
-- calls, a fn that swallows an error, multi-statement strings whose BEGIN or
-- COMMIT is not the first statement, timeouts, server restarts, lazy and
-- heal=false connections, the statement cache across a heal, and channels()
-- against pg_listening_channels().  Backends are really terminated.
local H = require "helpers"

local count, kill_later, kill_now = H.count_rows, H.kill_later, H.kill_now

local function server_channels(conn)
  local list = {}
  for i, row in ipairs(assert(conn:exec("SELECT ch FROM pg_listening_channels() AS ch ORDER BY ch COLLATE \"C\""))) do
    list[i] = row.ch
  end
  return list
end

local function ids(admin)
  local out = {}
  for i, row in ipairs(assert(admin:exec("SELECT id FROM tx21 ORDER BY id"))) do out[i] = row.id end
  return out
end

describe("break: transaction()", function()
  local c, admin
  before_each(function()
    c, admin = H.connect(), H.connect()
    assert(admin:exec("DROP TABLE IF EXISTS tx21; CREATE TABLE tx21 (id int PRIMARY KEY)"))
  end)
  after_each(function() c:close(); admin:close() end)

  it("a nested transaction() does not commit the outer one: an outer failure keeps nothing", function()
    local ok = c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx21 VALUES (1)"))
      assert(conn:transaction(function(inner) return inner:exec("INSERT INTO tx21 VALUES (2)") end))
      assert.equal("intrans", conn:txstatus())              -- still the outer block
      assert(conn:exec("INSERT INTO tx21 VALUES (3)"))
      error("outer fails after the inner one succeeded")
    end)
    assert.is_nil(ok)
    assert.same({}, ids(admin))
    assert.equal("idle", c:txstatus())
  end)

  it("a nested transaction() that fails rolls back only its own work", function()
    local inner_ok, inner_err
    local ok, err = c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx21 VALUES (1)"))
      inner_ok, inner_err = conn:transaction(function(inner)
        assert(inner:exec("INSERT INTO tx21 VALUES (2)"))
        return inner:exec("INSERT INTO tx21 VALUES (1)")     -- duplicate key: nil, err
      end)
      assert(conn:exec("INSERT INTO tx21 VALUES (3)"))      -- the outer block is usable
      return true
    end)
    assert.is_true(ok, err)
    assert.is_nil(inner_ok); assert.matches("duplicate", inner_err)
    assert.same({ 1, 3 }, ids(admin))
  end)

  it("a nested transaction() whose fn swallows a failure is 25P02 and leaves the outer block usable", function()
    local inner
    assert(c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx21 VALUES (1)"))
      inner = { conn:transaction(function(i)
        assert(i:exec("INSERT INTO tx21 VALUES (2)"))
        assert.is_nil(i:exec("INSERT INTO tx21 VALUES (2)"))  -- swallowed
        return true
      end) }
      return conn:exec("INSERT INTO tx21 VALUES (3)")
    end))
    assert.is_nil(inner[1]); assert.equal("25P02", inner[3]); assert.matches("nothing was committed", inner[2])
    assert.same({ 1, 3 }, ids(admin))
  end)

  it("transaction() inside a BEGIN sent through exec commits nothing before that block's COMMIT", function()
    assert(c:exec("BEGIN"))
    assert(c:exec("INSERT INTO tx21 VALUES (1)"))
    assert(c:transaction(function(conn) return conn:exec("INSERT INTO tx21 VALUES (2)") end))
    assert.equal("intrans", c:txstatus())
    assert.same({}, ids(admin))
    assert(c:exec("ROLLBACK"))
    assert.same({}, ids(admin))
  end)

  it("a nested transaction() whose connection is lost fails the outer one too", function()
    local inner
    local ok, _, code = c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx21 VALUES (1)"))
      inner = { conn:transaction(function(i)
        kill_now(admin, i)
        return i:exec("INSERT INTO tx21 VALUES (2)")
      end) }
      return conn:exec("INSERT INTO tx21 VALUES (3)")
    end)
    assert.is_nil(ok); assert.equal("08003", code)
    assert.is_nil(inner[1])
    assert.same({}, ids(admin))
    assert(c:exec("INSERT INTO tx21 VALUES (4)"))            -- healed outside
    assert.same({ 4 }, ids(admin))
  end)

  it("a fn that swallows a failed statement and returns success is not reported committed", function()
    local ok, err, code = c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx21 VALUES (1)"))
      local r = conn:exec("INSERT INTO tx21 VALUES (1)")     -- fails; fn ignores it
      assert.is_nil(r)
      return "done"
    end)
    assert.is_nil(ok)
    assert.matches("nothing was committed", err)
    assert.equal("25P02", code)
    assert.same({}, ids(admin))
    assert.equal("idle", c:txstatus())
  end)

  it("a fn that pcalls around the loss and goes on: every call fails, nothing heals inside", function()
    local results = {}
    local ok, _, code = c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx21 VALUES (1)"))
      kill_now(admin, conn)
      local okp = pcall(function() assert(conn:exec("INSERT INTO tx21 VALUES (2)")) end)
      results[#results + 1] = okp
      for i = 3, 6 do results[#results + 1] = (conn:exec("INSERT INTO tx21 VALUES ($1)", i)) ~= nil end
      results[#results + 1] = (conn:exec("SAVEPOINT s")) ~= nil
      results[#results + 1] = (conn:exec("RELEASE s")) ~= nil
      results[#results + 1] = (conn:listen("never")) ~= nil
      results[#results + 1] = (conn:notify("never", "x")) ~= nil
      return true
    end)
    assert.is_nil(ok); assert.equal("08003", code)
    for i, r in ipairs(results) do assert.is_false(r, "call " .. i) end
    assert.same({}, ids(admin))
    assert.same({}, c:channels())
    assert.same(server_channels(c), c:channels())
  end)

  it("a backend killed before BEGIN reaches the server: the transaction runs whole on a healed session", function()
    kill_now(admin, c)
    assert(c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx21 VALUES (1)"))
      return conn:exec("INSERT INTO tx21 VALUES (2)")
    end))
    assert.same({ 1, 2 }, ids(admin))
  end)

  it("a backend killed right after COMMIT: committed work stays, the next call heals", function()
    assert(c:transaction(function(conn) return conn:exec("INSERT INTO tx21 VALUES (1)") end))
    kill_now(admin, c)
    assert(c:transaction(function(conn) return conn:exec("INSERT INTO tx21 VALUES (2)") end))
    assert.same({ 1, 2 }, ids(admin))
  end)

  it("a query_timeout expiring inside transaction() is a lost transaction", function()
    c:settimeout(0.5)
    local later
    local ok, _, code = c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx21 VALUES (1)"))
      local r, _, e = conn:exec("SELECT pg_sleep(5)")
      assert.is_nil(r); assert.equal("08006", e)
      later = { conn:exec("INSERT INTO tx21 VALUES (2)") }
      return true
    end)
    assert.is_nil(ok); assert.equal("08003", code)
    assert.is_nil(later[1]); assert.equal("08003", later[3])
    assert.same({}, ids(admin))
  end)

  it("a server restart (-m immediate) mid-transaction fails it; nothing is kept", function()
    local later
    local ok, _, code = c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx21 VALUES (1)"))
      H.server("restart")
      later = { conn:exec("INSERT INTO tx21 VALUES (2)") }
      return conn:exec("INSERT INTO tx21 VALUES (3)")
    end)
    assert.is_nil(ok); assert.matches("^08", code)
    assert.is_nil(later[1]); assert.matches("^08", later[3])
    admin:close()
    admin = H.connect()
    assert.same({}, ids(admin))
    assert(c:exec("INSERT INTO tx21 VALUES (4)"))
    assert.same({ 4 }, ids(admin))
  end)
end)

describe("break: explicit transaction blocks through exec", function()
  local c, admin
  before_each(function()
    c, admin = H.connect(), H.connect()
    assert(admin:exec("DROP TABLE IF EXISTS tx21; CREATE TABLE tx21 (id int PRIMARY KEY)"))
  end)
  after_each(function() c:close(); admin:close() end)

  for _, begin in ipairs({ "  /* x */ begin;", "START TRANSACTION", "begin isolation level serializable",
    "-- a comment\nBeGiN WORK" }) do
    it(("%q then a kill: calls fail until ROLLBACK"):format(begin), function()
      assert(c:exec(begin))
      assert(c:exec("INSERT INTO tx21 VALUES (1)"))
      kill_now(admin, c)
      assert.is_nil(c:exec("INSERT INTO tx21 VALUES (2)"))
      local r, _, code = c:exec("INSERT INTO tx21 VALUES (3); COMMIT")
      assert.is_nil(r); assert.equal("08003", code)
      assert.same({}, ids(admin))
      assert(c:exec("rollback"))
      assert(c:exec("INSERT INTO tx21 VALUES (4)"))
      assert.same({ 4 }, ids(admin))
    end)
  end

  it("a BEGIN that is not the string's first statement, killed later in it: the block stays lost", function()
    local killer = kill_later(c:pid(), 0.5)
    local r, _, code = c:exec("SET application_name = 'x'; BEGIN; INSERT INTO tx21 VALUES (1); SELECT pg_sleep(10)")
    killer.wait(10)
    assert.is_nil(r); assert.equal("08006", code)
    r, _, code = c:exec("INSERT INTO tx21 VALUES (2); COMMIT")
    assert.is_nil(r); assert.equal("08003", code)
    assert.same({}, ids(admin))
  end)

  it("'COMMIT; BEGIN; ...' killed in the new block: the new block stays lost", function()
    assert(c:exec("BEGIN"))
    assert(c:exec("INSERT INTO tx21 VALUES (1)"))
    local killer = kill_later(c:pid(), 0.5)
    local r, err, code = c:exec("COMMIT; BEGIN; INSERT INTO tx21 VALUES (2); SELECT pg_sleep(10)")
    killer.wait(10)
    assert.is_nil(r); assert.equal("08007", code); assert.matches("unknown", err)
    r, err, code = c:exec("INSERT INTO tx21 VALUES (3); COMMIT")
    assert.is_nil(r, err); assert.equal("08003", code)
    assert.same({ 1 }, ids(admin))                          -- the first block did commit
    assert(c:exec("ROLLBACK"))
    assert(c:exec("INSERT INTO tx21 VALUES (4)"))
    assert.same({ 1, 4 }, ids(admin))
  end)

  it("a COMMIT in the middle of a string, killed after it, is not reported rolled back", function()
    assert(c:exec("BEGIN"))
    local killer = kill_later(c:pid(), 0.5)
    local r, err, code = c:exec("INSERT INTO tx21 VALUES (1); COMMIT; SELECT pg_sleep(10)")
    killer.wait(10)
    assert.is_nil(r)
    assert.equal("08007", code); assert.matches("unknown", err)
    assert.same({ 1 }, ids(admin))                          -- it did commit
    assert(c:exec("INSERT INTO tx21 VALUES (2)"))           -- outside a block: heals
    assert.same({ 1, 2 }, ids(admin))
  end)

  it("a COMMIT AND CHAIN in a string, killed after it: 08007, and the chained block stays lost", function()
    assert(c:exec("BEGIN"))
    local killer = kill_later(c:pid(), 0.5)
    local r, err, code = c:exec("INSERT INTO tx21 VALUES (1); COMMIT AND CHAIN; SELECT pg_sleep(10)")
    killer.wait(10)
    assert.is_nil(r)
    assert.equal("08007", code); assert.matches("unknown", err)
    assert.same({ 1 }, ids(admin))                          -- it did commit
    r, err, code = c:exec("INSERT INTO tx21 VALUES (2)")    -- inside the chained block
    assert.matches("ROLLBACK", err)
    assert.is_nil(r); assert.equal("08003", code)
    assert(c:exec("ROLLBACK"))
    assert.same({ 1 }, ids(admin))
  end)

  it("a string that ends its block ('...; ROLLBACK'), killed in it: the next call heals", function()
    assert(c:exec("BEGIN"))
    assert(c:exec("INSERT INTO tx21 VALUES (1)"))
    local killer = kill_later(c:pid(), 0.5)
    local r, _, code = c:exec("SELECT pg_sleep(10); ROLLBACK")
    killer.wait(10)
    assert.is_nil(r); assert.equal("08006", code)
    assert(c:exec("INSERT INTO tx21 VALUES (2)"))           -- outside a block, as the string meant
    assert.same({ 2 }, ids(admin))
  end)

  it("a BEGIN ATOMIC function body's ';' and END end no block: killed after it, the block stays lost", function()
    assert(c:exec("BEGIN"))
    assert(c:exec("INSERT INTO tx21 VALUES (1)"))
    local killer = kill_later(c:pid(), 0.5)
    local r, _, code = c:exec("CREATE FUNCTION pg_temp.f21() RETURNS int LANGUAGE sql BEGIN ATOMIC"
      .. " SELECT CASE WHEN true THEN 1 END; SELECT 2; END; SELECT pg_sleep(10)")
    killer.wait(10)
    assert.is_nil(r); assert.equal("08006", code)
    local err
    r, err, code = c:exec("INSERT INTO tx21 VALUES (2)")
    assert.is_nil(r, err); assert.equal("08003", code)
    assert(c:exec("ROLLBACK"))
    assert.same({}, ids(admin))
  end)

  it("a quoted ';' or a BEGIN inside a literal does not fool the statement splitter", function()
    local killer = kill_later(c:pid(), 0.5)
    local r, _, code = c:exec("SELECT 'x; BEGIN' AS a, $$; begin$$ AS b, \"begin\" FROM (SELECT 1 AS \"begin\") s;"
      .. " /* ; begin */ SELECT pg_sleep(10)")
    killer.wait(10)
    assert.is_nil(r); assert.equal("08006", code)
    assert(c:exec("INSERT INTO tx21 VALUES (1)"))           -- no block was open: heals
    assert.same({ 1 }, ids(admin))
  end)

  it("SAVEPOINT/RELEASE after the loss fail; ROLLBACK TO SAVEPOINT does not end the block", function()
    assert(c:exec("BEGIN; SAVEPOINT a; INSERT INTO tx21 VALUES (1)"))
    kill_now(admin, c)
    for _, sql in ipairs({ "SAVEPOINT b", "RELEASE a", "RELEASE SAVEPOINT a", "ROLLBACK TO a",
      "ROLLBACK TO SAVEPOINT a", "INSERT INTO tx21 VALUES (2)" }) do
      local r, _, code = c:exec(sql)
      assert.is_nil(r, sql); assert.matches("^0800[36]", code)
    end
    assert(c:exec("ABORT"))
    assert.same({}, ids(admin))
  end)

  it("a heal=false connection: fails inside until ROLLBACK, then stays broken (08006)", function()
    local h = H.connect(nil, { heal = false })
    assert(h:exec("BEGIN; INSERT INTO tx21 VALUES (1)"))
    kill_now(admin, h)
    local r, _, code = h:exec("INSERT INTO tx21 VALUES (2)")
    assert.is_nil(r); assert.equal("08006", code)
    assert(h:exec("ROLLBACK"))
    r, _, code = h:exec("INSERT INTO tx21 VALUES (3)")
    assert.is_nil(r); assert.equal("08006", code)
    assert.same({}, ids(admin))
    h:close()
  end)
end)

describe("break: lazy connections", function()
  local admin
  before_each(function()
    admin = H.connect()
    assert(admin:exec("DROP TABLE IF EXISTS tx21; CREATE TABLE tx21 (id int PRIMARY KEY)"))
  end)
  after_each(function() admin:close() end)

  it("a lazy connection's transaction() is never split, nested or killed", function()
    local c = H.connect(nil, { lazy = true })
    local ok = c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx21 VALUES (1)"))
      assert(conn:transaction(function(i) return i:exec("INSERT INTO tx21 VALUES (2)") end))
      kill_now(admin, conn)
      return conn:exec("INSERT INTO tx21 VALUES (3)")
    end)
    assert.is_nil(ok)
    assert.same({}, ids(admin))
    assert(c:exec("INSERT INTO tx21 VALUES (4)"))
    assert.same({ 4 }, ids(admin))
    c:close()
  end)
end)

describe("break: the statement cache across a heal", function()
  it("prepared names are prepared again on the new session, inside and outside a transaction", function()
    local c, admin = H.connect(), H.connect()
    assert(admin:exec("DROP TABLE IF EXISTS tx21; CREATE TABLE tx21 (id int PRIMARY KEY, v int)"))
    local q = "INSERT INTO tx21 VALUES ($1, $2)"
    for i = 1, 3 do assert(c:exec(q, i, i)) end             -- prepared by now
    kill_now(admin, c)
    assert(c:exec(q, 4, 4))                                 -- healed: not 26000
    assert(c:transaction(function(conn)
      for i = 5, 7 do assert(conn:exec(q, i, i)) end
      return true
    end))
    assert.equal(7, count(admin, "tx21"))
    -- stale (0A000) outside a block runs again; inside one the caller gets it
    local sel = "SELECT * FROM tx21 WHERE id = $1"
    for _ = 1, 3 do assert(c:exec(sel, 1)) end
    assert(admin:exec("ALTER TABLE tx21 ADD COLUMN w int DEFAULT 9"))
    assert.equal(9, assert(c:exec(sel, 1))[1].w)
    for _ = 1, 3 do assert(c:exec(sel, 1)) end             -- prepared again
    assert(admin:exec("ALTER TABLE tx21 ADD COLUMN z int DEFAULT 8"))
    local ok, err, code = c:transaction(function(conn) return conn:exec(sel, 1) end)
    assert.is_nil(ok, err); assert.equal("0A000", code)
    assert.equal("idle", c:txstatus())
    assert.equal(8, assert(c:exec(sel, 1))[1].z)
    c:close(); admin:close()
  end)
end)

describe("break: channels() equals pg_listening_channels()", function()
  local c, admin
  before_each(function() c, admin = H.connect(), H.connect() end)
  after_each(function() c:close(); admin:close() end)

  local function same(expected)
    assert.same(server_channels(c), c:channels())
    if expected then assert.same(expected, c:channels()) end
  end

  it("odd spellings through exec, UNLISTEN * in a rolled-back savepoint, heals", function()
    assert(c:exec('LiStEn "Mixed Case"; listen lower; /* c */ LISTEN "semi;colon"'))
    same({ "Mixed Case", "lower", "semi;colon" })
    assert(c:exec("BEGIN; SAVEPOINT s; UNLISTEN *; ROLLBACK TO SAVEPOINT s; COMMIT"))
    same({ "Mixed Case", "lower", "semi;colon" })
    assert(c:exec("BEGIN")); assert(c:exec("SAVEPOINT s")); assert(c:exec("unlisten *"))
    assert(c:exec("ROLLBACK TO s")); assert(c:exec("RELEASE s")); assert(c:exec("COMMIT"))
    same({ "Mixed Case", "lower", "semi;colon" })
    kill_now(admin, c)
    assert(c:exec("SELECT 1"))
    same({ "Mixed Case", "lower", "semi;colon" })
    assert(c:exec("DISCARD ALL"))
    same({})
  end)

  it("LISTEN inside transaction() lost before COMMIT is not listened to after the heal", function()
    assert(c:listen("kept"))
    assert.is_nil(c:transaction(function(conn)
      assert(conn:listen("pending"))
      assert(conn:exec('LISTEN "pending two"'))
      kill_now(admin, conn)
      return conn:exec("SELECT 1")
    end))
    assert(c:exec("SELECT 1"))
    same({ "kept" })
  end)

  it("100 channels committed, then the session dies: all are listened to again", function()
    local names = {}
    for i = 1, 100 do names[i] = ("ch%03d"):format(i) end
    assert(c:transaction(function(conn) return conn:listen(table.unpack(names)) end))
    same(names)
    kill_now(admin, c)
    assert(c:exec("SELECT 1"))
    same(names)
    assert(admin:notify("ch100", "hi"))
    local note = assert(c:wait(5))
    assert.equal("ch100", note.channel)
  end)
end)

-- A COMMIT that the server has written but not answered: with
-- synchronous_standby_names naming a standby that never comes, a COMMIT is
-- flushed locally and then waits for it; a backend terminated in that wait
-- has committed (its WARNING says so), and its client never hears it.
describe("break: a connection lost after the server committed", function()
  local admin
  before_each(function()
    admin = H.connect()
    assert(admin:exec("SET synchronous_commit = local"))
    assert(admin:exec("DROP TABLE IF EXISTS tx21; CREATE TABLE tx21 (id int PRIMARY KEY)"))
    assert(admin:exec("ALTER SYSTEM SET synchronous_standby_names = 'nobody21'"))
    assert(admin:exec("SELECT pg_reload_conf()"))
  end)
  after_each(function()
    assert(admin:exec("ALTER SYSTEM RESET synchronous_standby_names"))
    assert(admin:exec("SELECT pg_reload_conf()"))
    admin:close()
  end)

  local function waiting_conn()
    local c = H.connect()
    assert(c:exec("SET synchronous_commit = on"))            -- the test servers run with off
    assert(H.eventually(function()
      return assert(c:exec("SHOW synchronous_standby_names"))[1].synchronous_standby_names == "nobody21"
    end, 10))
    return c
  end

  it("execmany's own COMMIT is 08007 (outcome unknown), never a failure that rolled back", function()
    local c = waiting_conn()
    local killer = kill_later(c:pid(), 0.5)
    local n, err, code = c:execmany("INSERT INTO tx21 VALUES ($1)", { { 1 }, { 2 } })
    killer.wait(10)
    assert.is_nil(n)
    assert.equal("08007", code); assert.matches("unknown", err)
    assert.same({ 1, 2 }, ids(admin))                       -- it had committed
    c:close()
  end)

  it("transaction()'s COMMIT is 08007, and the next call heals", function()
    local c = waiting_conn()
    local killer
    local ok, err, code = c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx21 VALUES (1)"))
      killer = kill_later(conn:pid(), 0.5)
      return true
    end)
    killer.wait(10)
    assert.is_nil(ok); assert.equal("08007", code); assert.matches("unknown", err)
    assert.same({ 1 }, ids(admin))
    assert(c:exec("SET synchronous_commit = local; INSERT INTO tx21 VALUES (2)"))
    assert.same({ 1, 2 }, ids(admin))
    c:close()
  end)
end)

describe("break: what a string does to a transaction block (pglisten.txblock)", function()
  local txblock = require "pglisten.txblock"
  -- { sql, open before, lost expected, maybe committed expected }
  local cases = {
    { "SELECT 1", false, false, false },
    { "SELECT 1", true, true, false },
    { "", true, true, false },                               -- execmany's own batch
    { "BEGIN; INSERT INTO t VALUES (1)", false, true, false },
    { "SET x = 1; BEGIN; SELECT 1", false, true, false },
    { "COMMIT", true, false, true },
    { "COMMIT", false, false, false },
    { "COMMIT; BEGIN; SELECT 1", true, true, true },
    { "INSERT INTO t VALUES (1); COMMIT; SELECT pg_sleep(1)", true, false, true },
    { "INSERT INTO t VALUES (1); COMMIT AND CHAIN; SELECT pg_sleep(1)", true, true, true },
    { "end and chain", true, true, true },
    { "ROLLBACK AND CHAIN; SELECT 1", true, true, false },
    { "ROLLBACK; BEGIN", true, true, false },
    { "ROLLBACK TO SAVEPOINT s; SELECT 1", true, true, false },
    { "SELECT 'x; BEGIN', $$; begin$$, $a$ ; begin $a$, \"begin;\"; SELECT 2", false, false, false },
    { "SELECT E'it\\'s; begin'; SELECT 2", false, false, false },
    { "/* ; begin /* nested ; */ begin */ SELECT 1", false, false, false },
    { "-- ; begin\nSELECT 1", false, false, false },
    { "SELECT $1::int", true, true, false },
    { "  /* x */ begin;", false, true, false },
    { "START TRANSACTION ISOLATION LEVEL SERIALIZABLE", false, true, false },
    { "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; END", true, true,
      false },
    { "create procedure p() begin atomic insert into t values (1); end; commit", true, false, true },
    { "SELECT CASE WHEN true THEN 1 END; END", true, false, true },
    { "CREATE RULE r AS ON INSERT TO t DO ALSO (NOTIFY a; COMMIT); SELECT 1", true, true, false },
  }
  for _, t in ipairs(cases) do
    it(("%q, %s before"):format(t[1], t[2] and "inside" or "outside"), function()
      local lost, committed = txblock.effect(t[1], t[2])
      assert.equal(t[3], lost, "lost")
      assert.equal(t[4], committed, "maybe committed")
    end)
  end
end)

describe("break: the outbox across a kill", function()
  local outbox = require "pglisten.outbox"

  it("a claim whose backend dies before finish: finish fails, nothing is deleted, the events come back", function()
    local c, admin = H.connect(), H.connect()
    assert(outbox.install(admin))
    assert(admin:exec("DELETE FROM pglisten.outbox WHERE channel = 'brk21'"))
    for i = 1, 3 do assert(outbox.publish(admin, "brk21", "e" .. i)) end
    local events = assert(outbox.claim(c, { "brk21" }, 10))
    assert.equal(3, #events)
    kill_now(admin, c)
    local ok, err = outbox.finish(c, { events[1].id, events[2].id },
      { { id = events[3].id, error = "x", attempts = events[3].attempts } })
    assert.is_nil(ok); assert.is_string(err)
    local again = assert(outbox.claim(c, { "brk21" }, 10))   -- healed: all three, attempts unchanged
    assert.equal(3, #again)
    for i, e in ipairs(again) do assert.equal(events[i].attempts, e.attempts) end
    assert(outbox.finish(c, { again[1].id, again[2].id, again[3].id }))
    assert.equal(0, assert(outbox.pending(admin, "brk21")))
    c:close(); admin:close()
  end)
end)
