-- The runner's defects that came from its old shape (issue 11), each with
-- the real binary: reload between plain and durable, one leader across a
-- reload, on_connect leaving a transaction, notes parsed before a lost
-- connection, reconnect delays of 0, durable backoff, and the runtime
-- warnings about plain NOTIFYs on durable channels and unserved outbox rows.
local H = require "helpers"

local script, lines, start = H.script, H.lines, H.start

local rewrite, count = H.rewrite, H.count_matches

local function installed_db(prefix)
  local db, ci = H.createdb(prefix)
  local rc, out, err = H.run_runner({ "--install", "--db", ci })
  assert.equal(0, rc, out .. err)
  return db, ci, H.connect(ci)
end

describe("reload", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("switches a channel between plain and durable: each way it is served the new way", function()
    local _, ci, c = installed_db("rl")
    local plain = [[return { poll_interval = 60, channels = {
      a = function(row, note) out("a", row.k, note.durable and "durable" or "plain") end } }]]
    local durable = [[return { poll_interval = 60, channels = {
      a = { durable = true,
            handler = function(row, note) out("a", row.k, note.durable and "durable" or "plain") end } } }]]
    local path = script(plain)
    p = start(path, { "--db", ci })
    assert(c:notify("a", { k = 1 }))
    assert(H.eventually(function() return p.stdout():find("a 1 plain", 1, true) end, 5), p.stderr())
    -- plain -> durable: published events are served, plain NOTIFYs are not handled
    rewrite(path, durable)
    p.kill("HUP")
    assert(H.eventually(function() return count(p.stderr(), "reloaded") == 1 end, 5), p.stderr())
    assert(c:exec("SELECT pglisten.publish('a', '{\"k\":2}')"))
    assert(H.eventually(function() return p.stdout():find("a 2 durable", 1, true) end, 5), p.stderr())
    assert(c:notify("a", { k = 3 }))
    assert(H.eventually(function() return p.stderr():find("use pglisten.publish", 1, true) end, 5), p.stderr())
    assert.is_nil(p.stdout():find("a 3", 1, true))
    -- durable -> plain: the channel is LISTENed and its NOTIFYs handled
    rewrite(path, plain)
    p.kill("HUP")
    assert(H.eventually(function() return count(p.stderr(), "reloaded") == 2 end, 5), p.stderr())
    assert(c:notify("a", { k = 4 }))
    assert(H.eventually(function() return p.stdout():find("a 4 plain", 1, true) end, 5),
      "not handled after the switch back to plain:\n" .. p.stdout() .. p.stderr())
  end)

  it("still handles the plain notes that arrived before a plain -> durable reload", function()
    local _, ci, c = installed_db("rlq")
    local body = [[return { channels = {
      a = { %s handler = function(row) out("a", row.k); pglisten.sleep(0.3) end } } }]]
    local path = script(body:format(""))
    p = start(path, { "--db", ci })
    for k = 1, 4 do assert(c:notify("a", { k = k })) end
    assert(H.eventually(function() return p.stdout():find("a 1", 1, true) end, 5), p.stderr())
    rewrite(path, body:format("durable = true,"))
    p.kill("HUP")
    assert(H.eventually(function() return p.stdout():find("a 4", 1, true) end, 5),
      "notes received while the channel was plain were dropped:\n" .. p.stdout() .. p.stderr())
    assert.same({ "a 1", "a 2", "a 3", "a 4" }, lines(p.stdout()))
  end)

  it("handles the plain notes sent before a plain -> durable reload but delivered during it", function()
    local db, ci, c = installed_db("rls")
    local body = [[return { channels = { a = { %s handler = function(row) out("a", row.k) end } } }]]
    local path = script(body:format(""))
    p = start(path, { "--db", ci })
    -- the runner's backend stalls: the notes committed meanwhile stay in the
    -- server until it runs again, after the HUP (a loaded machine's delay)
    local pid = assert(H.runner_backend(db))
    os.execute("kill -STOP " .. pid)
    local ok, err = pcall(function()
      for k = 1, 3 do assert(c:notify("a", { k = k })) end
      rewrite(path, body:format("durable = true,"))
      p.kill("HUP")
      H.sleep(1) -- the runner takes the HUP and waits on its backend
    end)
    os.execute("kill -CONT " .. pid)
    assert(ok, err)
    assert(H.eventually(function() return count(p.stderr(), "reloaded") == 1 end, 10), p.stderr())
    assert(H.eventually(function() return p.stdout():find("a 3", 1, true) end, 10),
      "notes sent while the channel was plain were dropped:\n" .. p.stdout() .. p.stderr())
    assert.same({ "a 1", "a 2", "a 3" }, lines(p.stdout()))
    assert.is_nil(p.stderr():find("plain notification on a durable channel", 1, true), p.stderr())
  end)

  it("never makes a second leader: a reload that adds a channel keeps the lock name", function()
    local _, ci, c = installed_db("lead")
    assert(c:exec("CREATE TABLE handled (k int NOT NULL, tag text NOT NULL)"))
    local body = [[
local db = assert(pglisten.connect(%q))
return { single_active = true, channels = {
  plain = function(row) assert(db:exec("INSERT INTO handled (k, tag) VALUES ($1, $2)", row.k, os.getenv("TAG"))) end,
  %s } }]]
    local path = script(body:format(ci, ""))
    local a = start(path, { "--db", ci }, { TAG = "a" })
    local b = start(path, { "--db", ci }, { TAG = "b" })
    local ok, err = pcall(function()
      assert(H.eventually(function()
        return (a.stderr() .. b.stderr()):find("standing by", 1, true)
      end, 5))
      rewrite(path, body:format(ci, "extra = function() end,"))
      a.kill("HUP"); b.kill("HUP")
      assert(H.eventually(function()
        return a.stderr():find("reloaded", 1, true) and b.stderr():find("reloaded", 1, true)
      end, 5), a.stderr() .. b.stderr())
      H.sleep(2.5) -- a standby tries every second
      local s = H.connect(ci)
      for k = 1, 20 do assert(s:notify("plain", { k = k })) end
      assert(H.eventually(function()
        return c:exec("SELECT count(DISTINCT k) AS n FROM handled")[1].n == 20
      end, 5))
      H.sleep(0.5)
      local r = c:exec("SELECT count(*) AS n, count(DISTINCT tag) AS t FROM handled")[1]
      assert.equal(20, r.n, "a notification was handled twice: two leaders")
      assert.equal(1, r.t)
    end)
    a.stop(); b.stop()
    assert(ok, err)
  end)

  it("delivers the notes libpq had parsed when a reload's LISTEN finds the connection lost", function()
    local db, ci = H.createdb("lost")
    local path = script([[return { channels = {
      slow = function(row) out("slow", row.i); pglisten.sleep(1.5) end,
      fast = function(row) out("fast", row.i) end } }]])
    p = start(path, { "--db", ci })
    local c = H.connect(ci)
    assert(c:notify("slow", { i = 1 }))
    assert(H.eventually(function() return p.stdout():find("slow 1", 1, true) end, 5))
    -- while the handler sleeps: notes reach the client's socket, then its backend dies
    for i = 1, 3 do assert(c:notify("fast", { i = i })) end
    H.sleep(0.3)
    local pid = assert(H.runner_backend(db))
    assert(c:exec("SELECT pg_terminate_backend($1)", pid))
    rewrite(path, [[return { channels = {
      slow = function(row) out("slow", row.i) end,
      fast = function(row) out("fast", row.i) end,
      added = function() end } }]])
    p.kill("HUP")
    assert(H.eventually(function() return p.stderr():find("reconnected", 1, true) end, 10), p.stderr())
    assert(H.eventually(function() return p.stdout():find("fast 3", 1, true) end, 3),
      "notes parsed before the loss were dropped:\n" .. p.stdout() .. p.stderr())
    assert.same({ "slow 1", "fast 1", "fast 2", "fast 3" }, lines(p.stdout()))
  end)
end)

describe("the listening session", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("is put back to idle after an on_connect that leaves a transaction open, with an error logged", function()
    p = start(script([[return {
  channels = { a = function(row) out("a", row.k) end },
  on_connect = function(conn) assert(conn:exec("BEGIN")); assert(conn:exec("SELECT 1")) end,
}]]))
    assert(H.eventually(function() return p.stderr():find("rolled back", 1, true) end, 5), p.stderr())
    local c = H.connect()
    assert(c:notify("a", { k = 1 }))
    assert(H.eventually(function() return p.stdout():find("a 1", 1, true) end, 5),
      "nothing delivered after on_connect:\n" .. p.stderr())
    assert.matches("ERROR on_connect left the listening connection inside a transaction", p.stderr())
  end)

  it("is put back to idle after an on_connect that leaves an aborted transaction", function()
    p = start(script([[return {
  channels = { a = function(row) out("a", row.k) end },
  on_connect = function(conn) conn:exec("BEGIN"); conn:exec("SELECT 1/0") end,
}]]))
    local c = H.connect()
    assert(c:notify("a", { k = 2 }))
    assert(H.eventually(function() return p.stdout():find("a 2", 1, true) end, 5), p.stderr())
    assert.matches("txstatus=inerror", p.stderr())
  end)
end)

describe("reconnect delays", function()
  it("must be > 0: --reconnect-min 0 and --reconnect-max 0 are usage errors", function()
    local path = script("return { channels = { a = function() end } }")
    for _, o in ipairs({ "--reconnect-min", "--reconnect-max" }) do
      local p = H.spawn({ H.runner, o, "0", path })
      local rc = p.wait(3)
      if rc == nil then p.stop() end
      assert.equal(2, rc, o .. " 0 was accepted: " .. p.stderr())
      assert.matches("needs a number > 0", p.stderr())
    end
  end)
end)

describe("durable channels", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("retry after the documented backoff (1 s, 2 s), not at the next poll", function()
    local _, ci, c = installed_db("dback")
    p = start(script([[return { poll_interval = 60, channels = {
  jobs = { durable = true, handler = function(row, note)
    out("try", note.attempts, ("%.1f"):format(pglisten.monotonic()))
    if note.attempts < 2 then error("not yet") end
    out("done", row.k)
  end } } }]]), { "--db", ci })
    assert(c:exec("SELECT pglisten.publish('jobs', '{\"k\":1}')"))
    assert(H.eventually(function() return p.stdout():find("done 1", 1, true) end, 10),
      "the retries waited for the poll:\n" .. p.stdout() .. p.stderr())
    local t = {}
    for _, l in ipairs(lines(p.stdout())) do
      local a, at = l:match("^try (%d) ([%d.]+)")
      if a then t[tonumber(a)] = tonumber(at) end
    end
    assert.is_true(t[1] - t[0] >= 0.9 and t[1] - t[0] < 2.5, ("first retry after %.1f s"):format(t[1] - t[0]))
    assert.is_true(t[2] - t[1] >= 1.9 and t[2] - t[1] < 3.5, ("second retry after %.1f s"):format(t[2] - t[1]))
  end)

  it("keep a pending retry's time when a wake-up claims in between", function()
    local _, ci, c = installed_db("dwake")
    assert(c:exec("SELECT pglisten.publish('jobs', '{\"k\":1}')"))
    p = start(script([[return { poll_interval = 60, channels = {
  jobs = { durable = true, handler = function(row, note)
    if row.k == 1 and note.attempts < 1 then error("not yet") end
    out("done", row.k, note.attempts)
  end } } }]]), { "--db", ci })
    assert(H.eventually(function() return p.stderr():find("will retry", 1, true) end, 5), p.stderr())
    assert(c:exec("SELECT pglisten.publish('jobs', '{\"k\":2}')"))
    assert(H.eventually(function() return p.stdout():find("done 2", 1, true) end, 5), p.stderr())
    assert(H.eventually(function() return p.stdout():find("done 1 1", 1, true) end, 4),
      "the retry waited for the poll after a wake-up:\n" .. p.stdout() .. p.stderr())
  end)

  it("warns about outbox events waiting on a channel no running runner serves durably", function()
    local _, ci, c = installed_db("orph")
    -- a 'durable' trigger, but the script serves the channel as plain
    p = start(script([[return { poll_interval = 0.2, channels = {
      users = function() end, jobs = { durable = true, handler = function() end } } }]]), { "--db", ci })
    assert(c:exec("SELECT pglisten.publish('users', '{\"id\":1}')"))
    assert(c:exec("SELECT pglisten.publish('users', '{\"id\":2}')"))
    assert(H.eventually(function()
      return p.stderr():find("no running runner serves", 1, true)
    end, 10), p.stderr())
    local line = p.stderr():match("[^\n]*no running runner serves[^\n]*")
    assert.matches("channel=users", line)
    assert.matches("count=2", line)
    H.sleep(2)
    assert.equal(1, count(p.stderr(), "no running runner serves"), "warned more than once a minute")
  end)
end)

describe("core.poll", function()
  local pg = H.pg
  it("waits on several sockets at once and says which are ready", function()
    local l1, l2, s = H.connect(), H.connect(), H.connect()
    assert(l1:listen("x")); assert(l2:listen("y"))
    assert.same({ nil, "timeout" }, { pg.core.poll({ l1:pollfd(), l2:pollfd() }, 0.1) })
    assert(s:notify("y", "1"))
    local ready = assert(pg.core.poll({ l1:pollfd(), { l2:pollfd(), "r" } }, 5))
    assert.same({ 2 }, ready)
    assert.equal("1", l2:drain(10)[1].payload)
    assert.same({ nil, "timeout" }, { pg.core.poll({}, 0.05) })
    assert.has_error(function() pg.core.poll({ -1 }) end)
    assert.has_error(function() pg.core.poll({ { l1:pollfd(), "x" } }) end)
    assert.has_error(function() pg.core.poll({}, -1) end)
    l1:close(); l2:close(); s:close()
  end)
end)

describe("the runner's shape", function()
  it("keeps its modules under 400 lines and their functions under 60; nothing patches the runner", function()
    local files = { "runner.lua", "cli.lua", "dispatch.lua", "ordering.lua", "backoff.lua", "queue.lua",
      "sources/notify.lua", "sources/outbox.lua", "services/leader.lua", "services/stats.lua" }
    for _, f in ipairs(files) do
      local path = H.root .. "/lua/pglisten/" .. f
      local n, from, name = 0, nil, nil
      for l in io.lines(path) do
        n = n + 1
        if l:match("^local function ") or l:match("^function ") then from, name = n, l end
        if l == "end" and from then
          assert.is_true(n - from + 1 <= 60, ("%s:%d: %s is %d lines"):format(f, from, name, n - from + 1))
          from = nil
        end
      end
      assert.is_true(n <= 400, f .. " has " .. n .. " lines")
    end
    assert.is_nil(io.open(H.root .. "/lua/pglisten/scale.lua", "r"), "scale.lua still rewrites the runner")
  end)
end)

describe("a runner that waits", function()
  -- CPU seconds (user + system) a process has used so far
  local function cpu(pid)
    local f = assert(io.open("/proc/" .. pid .. "/stat", "r"))
    local s = f:read("a")
    f:close()
    local fields = {}
    for x in s:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = x end
    return (tonumber(fields[12]) + tonumber(fields[13])) / 100
  end
  -- CPU seconds each of `procs` (name -> process) uses in the same `secs`
  local function idle_cpu(procs, secs)
    local c0 = {}
    for name, p in pairs(procs) do c0[name] = cpu(p.pid) end
    H.sleep(secs)
    local used = {}
    for name, p in pairs(procs) do used[name] = cpu(p.pid) - c0[name] end
    return used
  end

  it("uses almost no CPU while it cannot connect, stands by, or waits to retry", function()
    local _, ci = H.createdb("idle")
    local path = script([[return { single_active = true, heartbeat = 0.3, poll_interval = 0.2, channels = {
      a = { retry = { attempts = 2, backoff = 5 }, handler = function() error("down") end },
      jobs = { durable = true, handler = function() end } } }]])
    local down = start(path, { "--db", "host=127.0.0.1 port=1 connect_timeout=1" }, nil, false)
    local leader = start(path, { "--db", ci })
    local standby = start(path, { "--db", ci })
    local ok, err = pcall(function()
      assert(H.eventually(function() return standby.stderr():find("standing by", 1, true) end, 5))
      local c = H.connect(ci)
      assert(c:notify("a", "{}"))
      assert(H.eventually(function() return leader.stderr():find("retrying", 1, true) end, 5), leader.stderr())
      for name, used in pairs(idle_cpu({ down = down, leader = leader, standby = standby }, 2)) do
        assert.is_true(used < 0.1, ("%s runner used %.2f s of CPU in 2 s"):format(name, used))
      end
    end)
    down.stop(); leader.stop(); standby.stop()
    assert(ok, err)
  end)
end)
