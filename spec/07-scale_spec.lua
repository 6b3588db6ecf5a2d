-- Durable channels and several runners, with the real binary: events
-- published while no runner runs, a runner killed mid-batch, retries and
-- dead letters, competing consumers, and single-active failover.
local H = require "helpers"

local start = H.start

-- A database with schema pglisten installed and a table `handled` where
-- handlers record (event id, runner tag).
local function setup()
  local db, ci = H.createdb("scale")
  local rc, out, err = H.run_runner({ "--install", "--db", ci })
  assert.equal(0, rc, out .. err)
  local c = H.connect(ci)
  assert(c:exec("CREATE TABLE handled (k int NOT NULL, tag text NOT NULL, at timestamptz DEFAULT clock_timestamp())"))
  return db, ci, c
end

-- A handler script recording into `handled`; `body` is the channel entry.
local function script(ci, tag, entry, extra)
  return H.file("scale.lua", ([[
local pglisten = require "pglisten"
local db = assert(pglisten.connect(%q))
local TAG = %q
local function record(k) assert(db:exec("INSERT INTO handled (k, tag) VALUES ($1, $2)", k, TAG)) end
return {
  poll_interval = 0.2,
  channels = { %s },
  %s
}]]):format(ci, tag, entry, extra or ""))
end

local function counts(c)
  local r = assert(c:exec("SELECT count(*) AS n, count(DISTINCT k) AS d FROM handled"))
  return r[1].n, r[1].d
end

describe("durable channels", function()
  local procs = {}
  after_each(function()
    for _, p in ipairs(procs) do p.stop() end
    procs = {}
  end)

  it("--sql prints the schema; --install applies it twice without harm", function()
    local rc, out = H.run_runner({ "--sql" })
    assert.equal(0, rc)
    assert.matches("CREATE SCHEMA IF NOT EXISTS pglisten", out)
    assert.matches("pglisten%.outbox", out)
    local _, ci = H.createdb("inst")
    for _ = 1, 2 do
      local rc2, out2, err2 = H.run_runner({ "--install", "--db", ci })
      assert.equal(0, rc2, err2)
      assert.matches("installed", out2)
    end
  end)

  it("handles 10,000 events published while no runner ran", function()
    local _, ci, c = setup()
    assert(c:exec("SELECT pglisten.publish('jobs', json_build_object('k', g)::text) FROM generate_series(1, 10000) g"))
    local p = start(script(ci, "a", "jobs = { durable = true, handler = function(row) record(row.k) end }"),
      { "--db", ci })
    procs[#procs + 1] = p
    assert(H.eventually(function() return counts(c) == 10000 end, 60), p.stderr())
    local n, d = counts(c)
    assert.equal(10000, n); assert.equal(10000, d)
    assert.truthy(H.eventually(function()
      return c:exec("SELECT count(*) AS n FROM pglisten.outbox")[1].n == 0
    end, 10))
    local r = c:exec("SELECT sum(k) AS s FROM handled")[1].s
    assert.equal(10000 * 10001 // 2, r)
  end)

  it("serves events published while it runs, on the wake-up", function()
    local _, ci, c = setup()
    local p = start(script(ci, "a", "jobs = { durable = true, handler = function(row) record(row.k) end }",
      "poll_interval = 60,"),
      { "--db", ci })
    procs[#procs + 1] = p
    for i = 1, 5 do assert(c:exec("SELECT pglisten.publish('jobs', $1)", ('{"k":%d}'):format(i))) end
    assert(H.eventually(function() return counts(c) == 5 end, 5), p.stderr())
  end)

  it("loses nothing when a runner is SIGKILLed mid-batch: the next one handles the rest", function()
    local _, ci, c = setup()
    assert(c:exec("SELECT pglisten.publish('jobs', json_build_object('k', g)::text) FROM generate_series(1, 300) g"))
    local slow = "jobs = { durable = true, handler = function(row) record(row.k); pglisten.sleep(0.01) end }"
    local p1 = start(script(ci, "first", slow), { "--db", ci })
    procs[#procs + 1] = p1
    assert(H.eventually(function() return counts(c) >= 50 end, 10))
    p1.kill("KILL")
    p1.wait(5)
    local before = counts(c)
    assert.is_true(before < 300)
    local p2 = start(script(ci, "second", slow), { "--db", ci })
    procs[#procs + 1] = p2
    assert(H.eventually(function()
      return c:exec("SELECT count(DISTINCT k) AS d FROM handled")[1].d == 300
    end, 30), p2.stderr())
    -- the last batch is deleted when its transaction commits, after its handlers ran
    assert.truthy(H.eventually(function()
      return c:exec("SELECT count(*) AS n FROM pglisten.outbox")[1].n == 0
    end, 10))
    -- at least once: the killed batch's events were handled again by the second
    local again = c:exec("SELECT count(*) AS n FROM handled WHERE tag = 'second' "
      .. "AND k IN (SELECT k FROM handled WHERE tag = 'first')")[1].n
    assert.is_true(again >= 1, "no event of the killed batch was handled again")
  end)

  it("retries a failing handler with backoff, handles it once, then the row is gone", function()
    local _, ci, c = setup()
    local p = start(script(ci, "a", [[
jobs = { durable = true, handler = function(row, note)
  if note.attempts < 2 then error("not yet (attempt " .. note.attempts .. ")") end
  record(row.k)
end } ]]), { "--db", ci })
    procs[#procs + 1] = p
    assert(c:exec("SELECT pglisten.publish('jobs', '{\"k\":1}')"))
    local t0 = H.now()
    assert(H.eventually(function() return counts(c) == 1 end, 15), p.stderr())
    local took = H.now() - t0
    assert.is_true(took >= 2.5, ("handled after %.2f s: backoff 1 s + 2 s expected"):format(took))
    H.sleep(0.5)
    assert.equal(1, (counts(c)))
    assert.equal(0, c:exec("SELECT count(*) AS n FROM pglisten.outbox")[1].n)
    assert.equal(0, c:exec("SELECT count(*) AS n FROM pglisten.dead")[1].n)
    assert.equal(2, select(2, p.stderr():gsub("durable event failed; will retry", "")))
  end)

  it("moves an always-failing event to pglisten.dead with its last error", function()
    local _, ci, c = setup()
    local p = start(script(ci, "a", [[
jobs = { durable = true, max_attempts = 2, retry = { backoff = 0.1 }, -- not the default 1 s: burial is tested
  handler = function(row) error("broken for good: " .. row.k) end } ]]),
      { "--db", ci })
    procs[#procs + 1] = p
    assert(c:exec("SELECT pglisten.publish('jobs', '{\"k\":7}')"))
    assert(H.eventually(function() return c:exec("SELECT count(*) AS n FROM pglisten.dead")[1].n == 1 end, 10),
      p.stderr())
    local d = c:exec("SELECT attempts, last_error, payload FROM pglisten.dead")[1]
    assert.equal(2, d.attempts)
    assert.matches("broken for good: 7", d.last_error)
    assert.equal('{"k":7}', d.payload)
    assert.equal(0, c:exec("SELECT count(*) AS n FROM pglisten.outbox")[1].n)
    assert.matches("moved to pglisten.dead", p.stderr())
  end)

  it("shares one durable channel among three runners: each event handled exactly once", function()
    local _, ci, c = setup()
    for i = 1, 3 do
      procs[#procs + 1] = start(script(ci, "r" .. i,
        "jobs = { durable = true, handler = function(row) record(row.k); pglisten.sleep(0.001) end }"), { "--db", ci })
    end
    assert(c:exec("SELECT pglisten.publish('jobs', json_build_object('k', g)::text) FROM generate_series(1, 3000) g"))
    assert(H.eventually(function() return counts(c) >= 3000 end, 60))
    H.sleep(0.5)
    local n, d = counts(c)
    assert.equal(3000, n); assert.equal(3000, d)
    local tags = c:exec("SELECT count(DISTINCT tag) AS t FROM handled")[1].t
    assert.is_true(tags >= 2, "only " .. tags .. " runner(s) took part")
  end)
end)

describe("single active", function()
  local procs = {}
  after_each(function()
    for _, p in ipairs(procs) do p.stop() end
    procs = {}
  end)

  it("lets one of three runners handle; when it is killed another takes over within 3 s", function()
    local _, ci, c = setup()
    local path = H.file("single.lua", ([[
local pglisten = require "pglisten"
local db = assert(pglisten.connect(%q))
local TAG = os.getenv("TAG")
return {
  single_active = true,
  channels = { plain = function(row) assert(db:exec("INSERT INTO handled (k, tag) VALUES ($1, $2)", row.k, TAG)) end },
  on_connect = function(conn, info) io.stdout:write("leader ", tostring(info.leader), "\n"); io.stdout:flush() end,
}]]):format(ci))
    for i = 1, 3 do procs[i] = start(path, { "--db", ci }, { TAG = "r" .. i }) end
    local leader
    assert(H.eventually(function()
      for i, p in ipairs(procs) do if p.stdout():find("leader true", 1, true) then leader = i end end
      return leader
    end, 5))
    local n = 0
    for _, p in ipairs(procs) do if p.stdout():find("leader true", 1, true) then n = n + 1 end end
    assert.equal(1, n)
    local s = H.connect(ci)
    for k = 1, 20 do assert(s:notify("plain", { k = k })) end
    assert(H.eventually(function() return counts(c) == 20 end, 5))
    assert.equal(1, c:exec("SELECT count(DISTINCT tag) AS t FROM handled")[1].t)
    assert.equal("r" .. leader, c:exec("SELECT min(tag) AS t FROM handled")[1].t)

    procs[leader].kill("KILL")
    local t0 = H.now()
    local new
    assert(H.eventually(function()
      for i, p in ipairs(procs) do
        if i ~= leader and p.stdout():find("leader true", 1, true) then new = i end
      end
      return new
    end, 5))
    local took = H.now() - t0
    assert.is_true(took < 3, ("takeover took %.2f s"):format(took))
    assert.matches("took over", procs[new].stderr())
    -- nothing sent after the takeover is lost
    for k = 21, 60 do assert(s:notify("plain", { k = k })) end
    assert(H.eventually(function()
      return c:exec("SELECT count(DISTINCT k) AS d FROM handled WHERE k > 20")[1].d == 40
    end, 5))
    assert.equal(40, c:exec("SELECT count(*) AS n FROM handled WHERE k > 20")[1].n)
    assert.equal("r" .. new, c:exec("SELECT min(tag) AS t FROM handled WHERE k > 20")[1].t)
    s:close()
  end)

  it("hands over when the leader's backend is terminated", function()
    local db, ci, c = setup()
    local path = H.file("single2.lua", [[
return { single_active = "my-lock", reconnect = { min = 0.5, max = 1 },
  channels = { plain = function() end },
  on_connect = function(conn, info) io.stdout:write("leader ", tostring(info.leader), "\n"); io.stdout:flush() end }]])
    procs[1] = start(path, { "--db", ci })
    assert(H.eventually(function() return procs[1].stdout():find("leader true", 1, true) end, 5))
    procs[2] = start(path, { "--db", ci })
    assert(H.eventually(function() return procs[2].stderr():find("standing by", 1, true) end, 5))
    local pid = assert(H.runner_backend(db))
    -- the standby holds a connection too, but not the lock: terminate the lock holder
    local holder = c:exec([[SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted]])[1].pid
    assert.is_truthy(pid)
    assert(c:exec("SELECT pg_terminate_backend($1)", holder))
    assert(H.eventually(function() return procs[2].stdout():find("leader true", 1, true) end, 3),
      procs[2].stderr())
  end)
end)
