-- ordering = "global" | "channel": a channel that waits to retry, or whose
-- target is down, holds up no other channel under "channel"; "global"
-- keeps one server order as before.
local H = require "helpers"

local script, lines, start = H.script, H.lines, H.start

local function index(list, s)
  for i, v in ipairs(list) do if v == s then return i end end
end

local BODY = [[
local failed = false
return { ordering = %q, channels = {
  a = { retry = { attempts = 3, backoff = 1.5 }, handler = function(row)
    if not failed then failed = true; error("target busy") end
    out("a", row.i)
  end },
  b = function(row) out("b", row.i) end,
  jobs = { durable = true, handler = function(row) out("jobs", row.i) end },
} }]]

describe("ordering", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("'channel': a channel waiting to retry holds up neither plain nor durable channels", function()
    local _, ci = H.createdb("ordc")
    assert.equal(0, (H.run_runner({ "--install", "--db", ci })))
    p = start(script(BODY:format("channel")), { "--db", ci })
    local c = H.connect(ci)
    assert(c:notify("a", { i = 1 }))
    assert(c:notify("a", { i = 2 }))
    assert(c:notify("b", { i = 1 }))
    assert(c:notify("b", { i = 2 }))
    assert(c:exec("SELECT pglisten.publish('jobs', '{\"i\":1}')"))
    local got = H.eventually(function()
      local l = lines(p.stdout())
      return #l >= 5 and l
    end, 10)
    assert(got, p.stdout() .. p.stderr())
    -- b and jobs long before a's retry (1.5 s); a keeps its own order
    assert.is_true(index(got, "b 2") < index(got, "a 1"), table.concat(got, ","))
    assert.is_true(index(got, "jobs 1") < index(got, "a 1"), table.concat(got, ","))
    assert.is_true(index(got, "a 1") < index(got, "a 2"), table.concat(got, ","))
    assert.is_true(index(got, "b 1") < index(got, "b 2"))
  end)

  it("'global' (the default): one server order, a retry holds up everything behind it", function()
    local _, ci = H.createdb("ordg")
    assert.equal(0, (H.run_runner({ "--install", "--db", ci })))
    p = start(script(BODY:format("global")), { "--db", ci })
    local c = H.connect(ci)
    assert(c:notify("a", { i = 1 }))
    assert(c:notify("b", { i = 1 }))
    assert(c:notify("a", { i = 2 }))
    local got = H.eventually(function()
      local l = lines(p.stdout())
      return #l >= 3 and l
    end, 10)
    assert.same({ "a 1", "b 1", "a 2" }, got)
  end)

  it("'channel': with one channel's target down the others keep syncing; it catches up in order", function()
    local _, ci = H.createdb("ordt")
    p = start(script(([[
local target = assert(pglisten.connect(%q))
return { ordering = "channel", channels = {
  slowtarget = { retry = { attempts = 40, backoff = 0.25, max_backoff = 0.5 }, handler = function(row)
    assert(target:exec("SELECT $1::int AS i", row.i))
    out("t", row.i)
  end },
  other = function(row) out("o", row.i) end,
} }]]):format(H.conninfo2())), { "--db", ci })
    local c = H.connect(ci)
    H.server2("stop")
    local ok, err = pcall(function()
      for i = 1, 5 do assert(c:notify("slowtarget", { i = i })) end
      for i = 1, 5 do assert(c:notify("other", { i = i })) end
      assert(H.eventually(function() return p.stdout():find("o 5", 1, true) end, 5),
        "the other channel waited for the down target:\n" .. p.stdout() .. p.stderr())
      assert.is_nil(p.stdout():find("t 1", 1, true))
    end)
    H.server2("start")
    assert(ok, err)
    assert(H.eventually(function() return p.stdout():find("t 5", 1, true) end, 20), p.stdout() .. p.stderr())
    local ts = {}
    for _, l in ipairs(lines(p.stdout())) do if l:match("^t ") then ts[#ts + 1] = l end end
    assert.same({ "t 1", "t 2", "t 3", "t 4", "t 5" }, ts)
  end)
end)

describe("ordering = 'channel' while a channel waits", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("reads ahead at most the read-ahead limit (10,000) of its notes, and hands them all over in order", function()
    p = start(script([[
local failed, n, last = false, 0, 0
return { ordering = "channel", channels = {
  a = { retry = { attempts = 2, backoff = 3 }, handler = function(row)
    if not failed then failed = true; error("target busy") end
    n = n + 1
    if row.i ~= last + 1 then out("out of order", row.i, last) end
    last = row.i
    if n == 20000 then out("all", n) end
  end },
} }]]))
    local c = H.connect()
    assert(c:exec("SELECT pg_notify('a', json_build_object('i', g)::text) FROM generate_series(1, 20000) g"))
    H.sleep(1.5)
    p.kill("USR1")
    assert(H.eventually(function() return p.stderr():find("INFO  stats", 1, true) end, 5), p.stderr())
    local queued = tonumber(p.stderr():match("INFO  stats[^\n]* queued=(%d+)"))
    assert.is_true(queued >= 5000 and queued <= 10000 + 256, "queued=" .. tostring(queued))
    assert(H.eventually(function() return p.stdout():find("all 20000", 1, true) end, 30), p.stdout() .. p.stderr())
    assert.is_nil(p.stdout():find("out of order", 1, true))
  end)
end)
