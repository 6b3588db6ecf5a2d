-- Attacks on the runner rebuilt for issue 11 (loop, sources, services):
-- each test is a promise someone tried to break; the ones that broke it
-- came with a fix.
local H = require "helpers"

local script, lines, start = H.script, H.lines, H.start

local rewrite, count = H.rewrite, H.count_matches

describe("break: reconnect delays", function()
  it("refuses a --reconnect-min/max too small to wait (1e-300) or infinite, as the script's keys do", function()
    local path = script("return { channels = { a = function() end } }")
    for _, v in ipairs({ "1e-300", "0.0001", "1e999", "inf", "nan" }) do
      for _, o in ipairs({ "--reconnect-min", "--reconnect-max" }) do
        local p = H.spawn({ H.runner, o, v, "--db", "host=127.0.0.1 port=1", path })
        local rc = p.wait(3)
        if rc == nil then p.stop() end
        assert.equal(2, rc, o .. " " .. v .. " was accepted: " .. p.stderr())
      end
    end
  end)

  it("does not reconnect in a busy loop with the smallest delay it accepts", function()
    local path = script("return { channels = { a = function() end } }")
    local p = start(path, { "--db", "host=127.0.0.1 port=1", "--reconnect-min", "0.001",
      "--reconnect-max", "0.001", "-l", "debug" }, nil, false)
    H.sleep(1)
    p.stop()
    local n = count(p.stderr(), "reconnect attempt failed") + count(p.stderr(), "retrying")
    assert.is_true(n < 1500, ("%d attempts in 1 s"):format(n))
  end)
end)

describe("break: reload", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("says that adding or removing single_active on SIGHUP takes effect at the next start", function()
    local _, ci = H.createdb("brsa")
    local path = script("return { channels = { a = function(r) out('a', r.i) end } }")
    p = start(path, { "--db", ci })
    rewrite(path, "return { single_active = true, channels = { a = function(r) out('a', r.i) end } }")
    p.kill("HUP")
    assert(H.eventually(function() return p.stderr():find("reloaded", 1, true) end, 5), p.stderr())
    assert.matches("single_active changed; it takes effect at the next start", p.stderr())
  end)
end)

describe("break: reload mid-stream", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("adds 100 channels (unicode, 63 bytes, mixed case) in one reload and serves each", function()
    local _, ci = H.createdb("br100")
    local path = script("return { channels = { a = function(r) out('a', r.i) end } }")
    p = start(path, { "--db", ci })
    local names = { "MixedCase", ("é"):rep(31) .. "x", ("z"):rep(63), "with space", 'q"uote' }
    for i = #names + 1, 100 do names[i] = "ch" .. i end
    local parts = {}
    for _, n in ipairs(names) do parts[#parts + 1] = ("[%q] = function(r) out(%q, r.i) end"):format(n, n) end
    H.file("unused", "") -- keep H's counter moving
    rewrite(path, "return { channels = { a = function(r) out('a', r.i) end, " .. table.concat(parts, ", ") .. " } }")
    p.kill("HUP")
    assert(H.eventually(function() return p.stderr():find("reloaded", 1, true) end, 5), p.stderr())
    local c = H.connect(ci)
    for _, n in ipairs(names) do assert(c:notify(n, { i = 1 })) end
    assert(H.eventually(function() return #lines(p.stdout()) >= 100 end, 10), p.stdout() .. p.stderr())
    local got = {}
    for _, l in ipairs(lines(p.stdout())) do got[l] = true end
    for _, n in ipairs(names) do assert.is_true(got[n .. " 1"], n) end
  end)

  it("keeps the old script and its waiting retry after a reload with a typo", function()
    local _, ci = H.createdb("brtypo")
    local path = script([[
local n = 0
return { channels = { a = { retry = { attempts = 5, backoff = 0.5 }, handler = function(r)
  n = n + 1
  if n < 3 then error("down") end
  out("a", r.i)
end }, b = function(r) out("b", r.i) end } }]])
    p = start(path, { "--db", ci })
    local c = H.connect(ci)
    assert(c:notify("a", { i = 1 }))
    assert(H.eventually(function() return p.stderr():find("retrying", 1, true) end, 5), p.stderr())
    rewrite(path, "return { channels = { a = { retyr = 3, handler = function() end } } }")
    p.kill("HUP")
    assert(H.eventually(function() return p.stderr():find("reload failed", 1, true) end, 5), p.stderr())
    assert(c:notify("b", { i = 2 }))
    assert(H.eventually(function() return p.stdout():find("b 2", 1, true) end, 10), p.stdout() .. p.stderr())
    assert.same({ "a 1", "b 2" }, lines(p.stdout()))
  end)

  it("survives handlers that yield, raise odd values, and an on_error and on_connect that raise", function()
    local _, ci = H.createdb("brodd")
    p = start(script([[
local cyc = {}; cyc.self = cyc
return {
  on_connect = function() error(function() end) end,
  on_error = function() error(setmetatable({}, { __tostring = function() error("no") end })) end,
  channels = {
    y = function() coroutine.yield(1) end,
    t = function() error(cyc) end,
    n = function() error(nil) end,
    ok = function(r) out("ok", r.i) end,
  } }]]), { "--db", ci })
    local c = H.connect(ci)
    for _, ch in ipairs({ "y", "t", "n", "ok" }) do assert(c:notify(ch, { i = 1 })) end
    assert(H.eventually(function() return p.stdout():find("ok 1", 1, true) end, 5), p.stderr())
    assert.is_true(p.running())
    local e = p.stderr()
    assert.matches("on_connect failed", e)
    assert.matches("yield", e)
    assert.equal(3, count(e, "handler failed"), e)
    assert.equal(3, count(e, "on_error failed"), e)
  end)
end)

describe("break: ordering = 'channel'", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("keeps 10,000 notes of other channels flowing while one target is down 8 s; order kept, nothing lost", function()
    local _, ci = H.createdb("brch")
    local flag = H.dir .. "/brch-up"
    p = start(script(([[
local seen = { a = 0, b = 0 }
return { ordering = "channel", channels = {
  down = { retry = { attempts = 100, backoff = 0.5, max_backoff = 1 }, handler = function(r)
    local f = io.open(%q); if not f then error("target down") end; f:close()
    out("down", r.i)
  end },
  a = function(r)
    seen.a = seen.a + 1; assert(r.i == seen.a, "a out of order")
    if r.i %% 5000 == 0 then out("a", r.i) end
  end,
  b = function(r)
    seen.b = seen.b + 1; assert(r.i == seen.b, "b out of order")
    if r.i %% 5000 == 0 then out("b", r.i) end
  end,
} }]]):format(flag)), { "--db", ci })
    local c = H.connect(ci)
    local t0 = H.now()
    for i = 1, 50 do assert(c:notify("down", { i = i })) end
    assert(c:exec("SELECT count(pg_notify(CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, "
      .. "json_build_object('i', (g + 1) / 2)::text)) FROM generate_series(1, 10000) g"))
    assert(H.eventually(function()
      local o = p.stdout()
      return o:find("a 5000", 1, true) and o:find("b 5000", 1, true)
    end, 15), p.stdout() .. p.stderr():sub(-2000))
    assert.is_true(H.now() - t0 < 15, "the other channels waited for the down one")
    assert.is_nil(p.stdout():find("down", 1, true))
    local rss = tonumber(H.read("/proc/" .. p.pid .. "/status"):match("VmRSS:%s*(%d+)"))
    -- down 8 s in all: the retry is at its max_backoff after 2 tries, so a
    -- longer wait repeats the same state (the heartbeat is 30 s)
    H.sleep(math.max(0, 8 - (H.now() - t0)))
    H.file("flag", "")
    local f = assert(io.open(flag, "w")); f:close()
    assert(H.eventually(function() return p.stdout():find("down 50", 1, true) end, 10), p.stderr():sub(-2000))
    local downs = {}
    for _, l in ipairs(lines(p.stdout())) do
      local i = l:match("^down (%d+)$")
      if i then downs[#downs + 1] = tonumber(i) end
    end
    for i = 1, 50 do assert.equal(i, downs[i]) end
    assert.is_nil(p.stderr():find("out of order", 1, true))
    assert.is_true(rss < 64 * 1024, ("RSS %d kB"):format(rss))
  end)
end)

describe("break: the listening backend terminated", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("while a handler runs: the notes the server had sent before are all handled", function()
    local _, ci = H.createdb("brterm")
    p = start(script([[
return { channels = { a = function(r)
  if r.i == 1 then pglisten.sleep(2) end
  out("a", r.i)
end } }]]), { "--db", ci, "--reconnect-min", "0.1" })
    local c = H.connect(ci)
    assert(c:notify("a", { i = 1 }))
    H.sleep(0.3)
    for i = 2, 200 do assert(c:notify("a", { i = i })) end
    H.sleep(0.3)
    local pid = assert(H.runner_backend(ci:match("dbname=(%S+)")))
    assert(c:exec("SELECT pg_terminate_backend($1)", pid))
    assert(H.eventually(function() return p.stderr():find("reconnected", 1, true) end, 10), p.stderr())
    assert(H.eventually(function() return #lines(p.stdout()) >= 200 end, 5), p.stderr())
    local got = lines(p.stdout())
    for i = 1, 200 do assert.equal("a " .. i, got[i]) end
  end)
end)

describe("break: durable channels across a server restart", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("serves the outbox again after the server restarts mid-stream", function()
    local _, ci = H.createdb("brrst")
    assert.equal(0, (H.run_runner({ "--install", "--db", ci })))
    p = start(script([[
return { poll_interval = 0.5, channels = { jobs = { durable = true, handler = function(r)
  if r.i == 1 then pglisten.sleep(1) end
  out("jobs", r.i)
end } } }]]), { "--db", ci, "--reconnect-min", "0.1", "--reconnect-max", "0.5" })
    local c = H.connect(ci)
    for i = 1, 3 do assert(c:exec("SELECT pglisten.publish('jobs', $1::text)", ('{"i":%d}'):format(i))) end
    H.sleep(0.5)
    H.server("restart")
    c = H.connect(ci)
    for i = 4, 6 do assert(c:exec("SELECT pglisten.publish('jobs', $1::text)", ('{"i":%d}'):format(i))) end
    assert(H.eventually(function() return p.stdout():find("jobs 6", 1, true) end, 20),
      p.stdout() .. p.stderr():sub(-3000))
    local seen = {}
    for _, l in ipairs(lines(p.stdout())) do seen[l] = true end
    for i = 1, 6 do assert.is_true(seen["jobs " .. i], "jobs " .. i) end
  end)
end)

describe("break: memory while a channel waits", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("stays bounded by the read-ahead across heartbeats (a ping must not pull the queue into libpq)", function()
    local _, ci = H.createdb("brmem")
    p = start(script([[
return { ordering = "channel", channels = {
  stuck = { retry = { attempts = 1000, backoff = 5, max_backoff = 5 }, handler = function() error("target down") end },
} }]]), { "--db", ci, "--heartbeat", "0.2" })
    local c = H.connect(ci)
    local pad = ("x"):rep(2000)
    -- 100,000 notes of 2 kB (200 MB) queue behind the first one's retry
    for _ = 1, 10 do
      assert(c:exec("SELECT count(pg_notify('stuck', json_build_object('i', g, 'pad', $1::text)::text)) "
        .. "FROM generate_series(1, 10000) g", pad))
    end
    H.sleep(3)
    local function cpu()
      local f = H.read("/proc/" .. p.pid .. "/stat"):match("%) (.*)")
      local fields = {}
      for x in f:gmatch("%S+") do fields[#fields + 1] = x end
      return (tonumber(fields[12]) + tonumber(fields[13])) / 100
    end
    local c0 = cpu()
    H.sleep(3)
    -- while full it neither reads nor pings, and does not spin either
    assert.is_true(cpu() - c0 < 0.5, ("%.2f s of CPU in 3 s"):format(cpu() - c0))
    local rss = tonumber(H.read("/proc/" .. p.pid .. "/status"):match("VmRSS:%s*(%d+)"))
    -- 10,000 read-ahead notes of 2 kB are about 25 MB with their tables
    assert.is_true(rss < 80 * 1024, ("RSS %d MB"):format(rss // 1024))
  end)
end)

describe("break: a reload that removes a channel", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("still hands the notes it had received for it to the old handler", function()
    local _, ci = H.createdb("brrm")
    local path = script([[
return { channels = { a = function(r)
  if r.i == 1 then pglisten.sleep(1) end
  out("a", r.i)
end, b = function(r) out("b", r.i) end } }]])
    p = start(path, { "--db", ci })
    local c = H.connect(ci)
    for i = 1, 5 do assert(c:notify("a", { i = i })) end
    H.sleep(0.4)
    rewrite(path, "return { channels = { b = function(r) out('b', r.i) end } }")
    p.kill("HUP")
    assert(H.eventually(function() return p.stderr():find("reloaded", 1, true) end, 5), p.stderr())
    assert(c:notify("a", { i = 6 }))
    assert(c:notify("b", { i = 7 }))
    assert(H.eventually(function() return p.stdout():find("b 7", 1, true) end, 5), p.stderr())
    -- the five received before the reload, as the old script said; 6 came after
    assert.same({ "a 1", "a 2", "a 3", "a 4", "a 5", "b 7" }, lines(p.stdout()))
  end)
end)

describe("break: a plain NOTIFY on a channel durable before and after a reload", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("is ignored with the warning, not handed to the durable handler", function()
    local _, ci = H.createdb("brpd")
    assert.equal(0, (H.run_runner({ "--install", "--db", ci })))
    local body = [[
return { channels = { a = function(r)
  if r.i == 1 then os.execute("sleep 1") end
  out("a", r.i)
end, jobs = { durable = true, handler = function(r) out("jobs", r.i) end } } }]]
    local path = script(body)
    p = start(path, { "--db", ci })
    local c = H.connect(ci)
    -- read in one go: the plain note waits in the lane behind a 1 while the HUP comes
    assert(c:exec([[SELECT pg_notify('a', '{"i":1}'), pg_notify('jobs', '{"i":9}')]]))
    H.sleep(0.4)
    p.kill("HUP")
    assert(H.eventually(function() return p.stderr():find("reloaded", 1, true) end, 5), p.stderr())
    assert(c:exec("SELECT pglisten.publish('jobs', '{\"i\":2}')"))
    assert(H.eventually(function() return p.stdout():find("jobs 2", 1, true) end, 10), p.stderr())
    assert.is_nil(p.stdout():find("jobs 9", 1, true), p.stdout())
    assert.matches("plain notification on a durable channel ignored", p.stderr())
  end)
end)
