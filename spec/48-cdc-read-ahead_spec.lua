-- While a handler waits for its database, the replication source reads the
-- stream ahead (core.set_wait_hook): the runner decodes the next changes
-- while the target executes the last ones.  The hook itself (called by exec
-- and execmany while they wait, never from inside itself, removed when it
-- raises), batches filled by what was read during a wait, and a stream lost
-- while it is read ahead: acted on after the handler returns, nothing lost.
local H = require "spec.helpers"
local pg = H.pg
local core = pg.core

local C = require "spec.cdc_helpers"

describe("core.set_wait_hook", function()
  local c, d
  before_each(function()
    c = H.connect()
    d = H.connect()
  end)
  after_each(function()
    core.set_wait_hook(nil)
    c:close()
    d:close()
  end)

  it("is called while exec and execmany wait for the answer, again while it has more to do", function()
    local calls = 0
    assert.is_nil(core.set_wait_hook(function()
      calls = calls + 1
      return calls < 3 -- more to do, twice
    end))
    assert.equal("", c:exec("SELECT pg_sleep(0.2)")[1].pg_sleep)
    assert.equal(3, calls) -- the answer was not in after the first two
    calls = 0
    assert.equal(2, c:execmany("SELECT pg_sleep($1)", { { 0.1 }, { 0.1 } })) -- a row each
    assert.is_true(calls >= 1)
    local fn = core.set_wait_hook(nil)
    assert.equal("function", type(fn))
    calls = 0
    assert.truthy(c:exec("SELECT pg_sleep(0.05)"))
    assert.equal(0, calls)
  end)

  it("calls a hook that returned a descriptor again when it is readable, not at once", function()
    assert(d:exec("LISTEN wake"))
    local fd = d:pollfd()
    local calls, got = {}, 0
    core.set_wait_hook(function()
      calls[#calls + 1] = pg.monotonic()
      got = got + d:drain(10).n
      return fd -- nothing to do until d's socket is readable
    end)
    -- d is woken 0.3 s into c's wait, by another session
    local t0 = pg.monotonic()
    H.spawn({ "sh", "-c", "sleep 0.3; psql -qtAX -c 'NOTIFY wake'" })
    assert.equal("", c:exec("SELECT pg_sleep(1.5)")[1].pg_sleep)
    core.set_wait_hook(nil)
    -- once when the wait began, once when the notification came (it took it)
    assert.equal(2, #calls, "calls at " .. table.concat(calls, " "))
    assert.equal(1, got)
    assert.is_true(calls[2] - t0 >= 0.25, "the second call came at once")
    -- execmany waits the same way
    calls, got = {}, 0
    core.set_wait_hook(function()
      calls[#calls + 1] = pg.monotonic()
      got = got + d:drain(10).n
      return fd
    end)
    H.spawn({ "sh", "-c", "sleep 0.3; psql -qtAX -c 'NOTIFY wake'" })
    assert.equal(1, c:execmany("SELECT pg_sleep($1)", { { 1.5 } }))
    assert.equal(2, #calls, "calls at " .. table.concat(calls, " "))
    assert.equal(1, got)
  end)

  it("keeps a query's timeout while the descriptor a hook returned stays readable", function()
    assert(d:exec("LISTEN stuck"))
    assert(c:exec("NOTIFY stuck")) -- d's socket now holds a note that the hook never takes
    local fd, calls = d:pollfd(), 0
    pg.sleep(0.1)
    core.set_wait_hook(function()
      calls = calls + 1
      return fd
    end)
    c:settimeout(0.5)
    local t0 = pg.monotonic()
    local rows, err = c:exec("SELECT pg_sleep(5)")
    local took = pg.monotonic() - t0
    core.set_wait_hook(nil)
    assert.is_nil(rows)
    assert.matches("time", tostring(err))
    assert.is_true(took < 2.5, ("the 0.5 s timeout came after %.2f s (%d hook calls)"):format(took, calls))
  end)

  it("stops calling a hook once the answer is in", function()
    local calls = 0
    core.set_wait_hook(function()
      calls = calls + 1
      pg.sleep(0.05) -- longer than the query takes
      return true
    end)
    assert.truthy(c:exec("SELECT 1"))
    assert.equal(1, calls)
  end)

  it("is not called from a wait inside itself, and a query inside it works", function()
    local outer, inner, got = 0, 0, nil
    core.set_wait_hook(function()
      outer = outer + 1
      if outer == 1 then
        got = d:exec("SELECT 42 AS v")[1].v
        inner = outer - 1 -- a call from d's wait would have counted
      end
      return false
    end)
    assert.truthy(c:exec("SELECT pg_sleep(0.1)"))
    assert.equal(42, got)
    assert.equal(0, inner)
    assert.equal(1, outer)
    assert.equal("function", type(core.set_wait_hook(nil))) -- put back after its call
  end)

  it("drops a hook that raises, and the query goes on", function()
    local calls = 0
    core.set_wait_hook(function()
      calls = calls + 1
      error("hook broke")
    end)
    assert.equal(7, c:exec("SELECT 7 AS v FROM pg_sleep(0.05)")[1].v)
    assert.truthy(c:execmany("SELECT pg_sleep($1)", { { 0.05 } }))
    assert.equal(1, calls)
    assert.is_nil(core.set_wait_hook(nil))
  end)

  it("keeps what the hook set inside itself", function()
    local second = function() return false end
    core.set_wait_hook(function()
      core.set_wait_hook(second)
      return true
    end)
    assert.truthy(c:exec("SELECT pg_sleep(0.05)"))
    assert.equal(second, core.set_wait_hook(nil))
  end)

  it("keeps the hook a raising hook set in its place", function()
    local second = function() return false end
    core.set_wait_hook(function()
      core.set_wait_hook(second)
      error("raised after setting another")
    end)
    assert.truthy(c:exec("SELECT pg_sleep(0.05)"))
    assert.equal(second, core.set_wait_hook(nil))
  end)

  it("refuses what is not a function", function()
    assert.has_error(function() core.set_wait_hook(42) end)
    assert.has_error(function() core.set_wait_hook("x") end)
  end)
end)

describe("the replication source reading ahead", function()
  it("fills the next batch, whole, from what it read while the handler waited: from a backlog every batch is full",
    function()
    local src, dst, slot = C.setup("rahf")
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", src)
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", dst)
    C.slot_first(src, slot, "items")
    for k = 0, 5 do -- 6 transactions of 1000 rows
      C.sql(("INSERT INTO items SELECT g FROM generate_series(%d, %d) g"):format(k * 1000 + 1, k * 1000 + 1000), src)
    end
    local p = C.run(src, dst, slot, [[
    ["public.items"] = { source = "replication", batch = 1000, handler = function(events)
      local rows = {}
      for i, ev in ipairs(events) do rows[i] = { ev.new.id } end
      assert(target:exec("SELECT pg_sleep(0.3)")) -- the target at work: the runner reads on
      assert(target:execmany("INSERT INTO items VALUES ($1)", rows))
      out("batch " .. #events)
    end },]])
    assert.truthy(C.same(src, dst, "items", 30), p.stderr())
    local sizes = C.ids(p.stdout(), "batch")
    local total = 0
    for _, n in ipairs(sizes) do total = total + n end
    assert.equal(6000, total)
    -- the first batch is what the first turn read; the last, the rest; every
    -- other one was read while the batch before it waited for the target
    for i = 2, #sizes - 1 do
      assert.equal(1000, sizes[i], "batches: " .. table.concat(sizes, " "))
    end
    assert.is_true(#sizes <= 7, "batches: " .. table.concat(sizes, " "))
  end)

  it("acts on a stream lost while it read ahead once the handler returns, and loses nothing", function()
    local src, dst, slot = C.setup("rahl")
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", src)
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", dst)
    local p = C.run(src, dst, slot, ([[
    ["public.items"] = { source = "replication", batch = 100, handler = function(events)
      local admin = assert(pglisten.connect("dbname=%s"))
      if not KILLED then
        KILLED = true
        -- the walsender goes while this handler runs; the wait below reads ahead and meets its end
        assert(admin:exec("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
          %q))
        pglisten.sleep(0.2)
      end
      admin:close()
      local rows = {}
      for i, ev in ipairs(events) do rows[i] = { ev.new.id } end
      assert(target:exec("SELECT pg_sleep(0.05)"))
      assert(target:execmany("INSERT INTO items VALUES ($1) ON CONFLICT DO NOTHING", rows))
      out("batch " .. #events)
    end },]]):format(src, slot))
    for k = 0, 9 do
      C.sql(("INSERT INTO items SELECT g FROM generate_series(%d, %d) g"):format(k * 100 + 1, k * 100 + 100), src)
    end
    assert.truthy(C.same(src, dst, "items", 30), p.stderr())
    assert.truthy(H.eventually(function() return p.stderr():find("replication stream lost", 1, true) end, 10),
      p.stderr())
    assert.is_true(p.running())
    assert.is_nil(p.stderr():find("handler failed", 1, true), p.stderr())
    assert.is_nil(p.stderr():find("reading the stream ahead failed", 1, true), p.stderr())
  end)
end)
