-- Breaking ec121c9 + 5f0c43a + cacb9eb: the replication queue's byte cap,
-- the wait hook's file-descriptor protocol, and the snapshot's byte-bounded
-- pages.  BREAK tests fail on the HEAD they were written against (960d5ca);
-- GUARD tests pass there and would fail if the promise they hold broke.
local H = require "spec.helpers"
local C = require "spec.cdc_helpers"
local pg = H.pg
local core = pg.core

-- A connection whose socket stays readable for ever: a notification is
-- waiting in it and nothing reads it.  Returns the connection and its fd.
local function readable_forever()
  local d = H.connect()
  assert(d:exec("LISTEN forever"))
  H.psql("NOTIFY forever")
  local fd = d:pollfd()
  assert(H.eventually(function()
    local r = core.poll({ fd }, 0.2)
    return r and #r > 0
  end, 5), "the listener's socket never became readable")
  return d, fd
end

local function cpu_of(pid)
  local f = io.open(("/proc/%d/stat"):format(pid), "r")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  local rest = s:match("%) (.*)")
  local t = {}
  for w in rest:gmatch("%S+") do t[#t + 1] = w end
  return (tonumber(t[12]) + tonumber(t[13])) / 100 -- utime + stime, clock ticks
end

describe("5f0c43a: the wait hook's descriptor", function()
  local c, d
  after_each(function()
    core.set_wait_hook(nil)
    if c and not c:isclosed() then c:close() end
    if d and not d:isclosed() then d:close() end
  end)

  -- BREAK.  README: opts.query_timeout is "a client-side bound on each
  -- query"; the hook protocol adds a descriptor to the wait.  A hook whose
  -- descriptor stays readable (a socket with data nobody reads, a file, a
  -- pipe at EOF: "called again when it is readable") makes every poll of
  -- the wait return at once, and the deadline is only looked at when poll
  -- times out: it never does, so the query runs to its end (and the client
  -- spins on the hook meanwhile).
  it("BREAK: query_timeout still fires while the hook's descriptor stays readable", function()
    local fd
    d, fd = readable_forever()
    c = H.connect(nil, { query_timeout = 1 })
    local calls = 0
    core.set_wait_hook(function()
      calls = calls + 1
      return fd -- readable for ever: nothing here reads it
    end)
    local t0, cpu0 = pg.monotonic(), os.clock()
    local rows, err, state = c:exec("SELECT pg_sleep(4)")
    local took, cpu = pg.monotonic() - t0, os.clock() - cpu0
    core.set_wait_hook(nil)
    print(("\n  readable hook fd, query_timeout = 1, pg_sleep(4): %s %s after %.2f s, %d hook calls, %.2f s CPU")
      :format(rows and "rows" or tostring(err), tostring(state), took, calls, cpu))
    assert.is_nil(rows, ("the 1 s query_timeout did not fire: the query ran %.2f s to its end "
      .. "(%d hook calls, %.2f s CPU)"):format(took, calls, cpu))
    assert.is_true(took < 2.5, ("timed out after %.2f s"):format(took))
  end)

  -- GUARD.  Without a timeout the answer still wins: an exec finishes with
  -- the hook's descriptor readable all along, the same for execmany.
  it("GUARD: exec and execmany finish while the hook's descriptor stays readable (the answer first)", function()
    local fd
    d, fd = readable_forever()
    c = H.connect()
    local calls = 0
    core.set_wait_hook(function()
      calls = calls + 1
      return fd
    end)
    local t0, cpu0 = pg.monotonic(), os.clock()
    assert.equal("", c:exec("SELECT pg_sleep(0.5)")[1].pg_sleep)
    local took, cpu = pg.monotonic() - t0, os.clock() - cpu0
    assert.equal(2, c:execmany("SELECT pg_sleep($1)", { { 0.2 }, { 0.2 } }))
    core.set_wait_hook(nil)
    print(("\n  readable hook fd, pg_sleep(0.5): %.2f s, %d hook calls, %.2f s CPU"):format(took, calls, cpu))
    assert.is_true(took < 5)
    assert.is_true(calls >= 1)
  end)

  -- GUARD.  A descriptor the hook returns that is no descriptor (closed, a
  -- huge one, negative, a float, math.maxinteger): the wait goes on for the
  -- answer; no call storm from a closed one (dropped after one poll).
  it("GUARD: closed, negative, huge and float results leave the wait to the answer", function()
    c = H.connect(nil, { query_timeout = 10 })
    local d2 = H.connect()
    local closed = d2:pollfd()
    d2:close()
    for _, v in ipairs({ closed, -1, -5, 1 << 40, math.maxinteger, math.mininteger, 1000000, 2147483647 }) do
      local calls = 0
      core.set_wait_hook(function()
        calls = calls + 1
        return v
      end)
      local t0 = pg.monotonic()
      local rows, err = c:exec("SELECT pg_sleep(0.3)")
      local took = pg.monotonic() - t0
      core.set_wait_hook(nil)
      assert.truthy(rows, tostring(v) .. ": " .. tostring(err))
      assert.equal(1, calls, ("result %s: %d calls"):format(tostring(v), calls))
      assert.is_true(took >= 0.29 and took < 5, ("result %s: %.2f s"):format(tostring(v), took))
    end
    -- a float is no integer: its truth, called again now (64 in a row at most)
    local calls = 0
    core.set_wait_hook(function()
      calls = calls + 1
      return 3.0
    end)
    assert.truthy(c:exec("SELECT pg_sleep(0.3)"))
    core.set_wait_hook(nil)
    assert.is_true(calls >= 1 and calls <= 64, "float: " .. calls .. " calls")
  end)
end)
