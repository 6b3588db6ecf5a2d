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

local function vm(p, key)
  local f = io.open(("/proc/%d/status"):format(p.pid), "r")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return tonumber(s:match(key .. ":%s*(%d+)"))
end

-- Starts a runner on a C.script: `prelude`, then `replication` options
-- (Lua text inside its table), then the channels.
local function run(src, dst, slot, repl, channels, args)
  local path = C.script(dst, ("return {\n  replication = { slot = %q, %s },\n  channels = {\n%s\n  },\n}\n")
    :format(slot, repl or "", channels))
  local p = C.start(path, src, args)
  H.finally(function() C.cleanup({ p }, src, slot) end)
  return p, path
end

describe("cacb9eb: snapshot pages bounded in bytes", function()
  -- BREAK.  README: "Pages keep memory small (up to 1,000 rows and about
  -- 16 MiB of values: 1 MiB rows come 15 at a time)".  A page's LIMIT is
  -- set from the last page's row size, so small rows first (in key order)
  -- and wide rows after them make one page of 1,000 wide rows: here
  -- 1,000 rows of 100 KB, a page of ~100 MB of values (and as much again
  -- in libpq), six times the bound.
  it("BREAK: wide rows after small ones in key order still come in pages of about 16 MiB", function()
    local src, dst, slot = C.setup("bspg")
    C.sql("CREATE TABLE docs (id int PRIMARY KEY, body text)", src)
    C.sql("CREATE TABLE docs (id int PRIMARY KEY, len int)", dst)
    C.sql("INSERT INTO docs SELECT g, 's' FROM generate_series(1, 10) g", src)
    C.sql("INSERT INTO docs SELECT g, repeat(md5(g::text), 3200) FROM generate_series(11, 1010) g", src) -- 100 KB
    local p = run(src, dst, slot, "snapshot = true", [[
    ["public.docs"] = { source = "replication", batch = 5000, handler = function(events, notes)
      local rows, bytes = {}, 0
      for _, ev in ipairs(events) do
        if ev.op == "TRUNCATE" then
          assert(target:exec("TRUNCATE docs"))
        else
          rows[#rows + 1] = { ev.new.id, #ev.new.body }
          bytes = bytes + #ev.new.body
        end
      end
      if #rows > 0 then assert(target:execmany("INSERT INTO docs VALUES ($1, $2)", rows)) end
      if notes[1].snapshot then out(("page %d %d"):format(#rows, bytes)) end
    end },]])
    assert.truthy(H.eventually(function()
      return C.sql("SELECT count(*) || ':' || coalesce(sum(len), 0) FROM docs", dst) == "1010:102400010"
    end, 60, 0.2), p.stderr() .. C.sql("SELECT count(*) || ':' || coalesce(sum(len), 0) FROM docs", dst))
    local pages, worst, list = 0, 0, {}
    for n, b in p.stdout():gmatch("page (%d+) (%d+)") do
      pages = pages + 1
      list[#list + 1] = n .. "/" .. ("%.1fMiB"):format(tonumber(b) / 1048576)
      if tonumber(b) > worst then worst = tonumber(b) end
    end
    local hwm = vm(p, "VmHWM")
    print(("\n  snapshot, 10 small rows then 1000 of 100 KB: pages (rows/values) %s; runner peak RSS %d MiB")
      :format(table.concat(list, " "), (hwm or 0) // 1024))
    assert.is_true(worst <= 2 * 16 * 1048576, ("a page of %.1f MiB of values (bound: about 16 MiB): %s")
      :format(worst / 1048576, table.concat(list, " ")))
  end)
end)
