-- The outbox's operator tools, against a real server and the real binary:
-- `lua-pglisten outbox status|dead|replay|purge` and pglisten.replay(); and
-- durable ordering (`ordered = true`) with competing runners.
local H = require "helpers"
local pg = H.pg
local outbox = require "pglisten.outbox"

local json = pg.json

local conns = H.conns(20)
local connect = conns.connect
after_each(conns.close)

local function fresh() return H.outbox_db(connect, "obtools") end

local function one(conn, sql, ...)
  return assert(conn:exec(sql, ...))[1]
end

-- Buries events as the runner does (through outbox.finish at the last attempt).
local function bury(conn, channel, n, err)
  local ids = {}
  for i = 1, n do ids[i] = assert(outbox.publish(conn, channel, ('{"n":%d}'):format(i))) end
  local ev = assert(outbox.claim(conn, { channel }, 1000))
  local fails = {}
  for i, e in ipairs(ev) do fails[i] = { id = e.id, error = err or ("boom " .. e.id), max_attempts = 1 } end
  assert(outbox.finish(conn, {}, fails))
  return ids
end

local function tool(ci, ...)
  local argv = { "outbox", ... }
  argv[#argv + 1], argv[#argv + 2] = "--db", ci
  return H.run_runner(argv)
end

describe("lua-pglisten outbox status", function()
  it("shows per channel the events waiting, the oldest's age, the due ones and the dead letters", function()
    local c, ci = fresh()
    bury(c, "mail", 2)
    for i = 1, 3 do outbox.publish(c, "mail", '{"i":' .. i .. '}') end
    outbox.publish(c, "sms", "{}")
    -- one mail event not due for an hour, all of them created 90 s ago
    c:exec("UPDATE pglisten.outbox SET created_at = now() - interval '90 seconds'")
    c:exec("UPDATE pglisten.outbox SET run_at = now() + interval '1 hour' "
      .. "WHERE id = (SELECT max(id) FROM pglisten.outbox WHERE channel = 'mail')")
    local rc, out, err = tool(ci, "status", "--format", "json")
    assert.equal(0, rc, err)
    local rows = json.decode(out)
    assert.equal(2, #rows)
    assert.same({ "mail", 3, 2, 2 }, { rows[1].channel, rows[1].waiting, rows[1].due, rows[1].dead })
    assert.same({ "sms", 1, 1, 0 }, { rows[2].channel, rows[2].waiting, rows[2].due, rows[2].dead })
    assert.truthy(rows[1].oldest_age_seconds >= 90 and rows[1].oldest_age_seconds < 200, out)
    rc, out = tool(ci, "status")
    assert.equal(0, rc)
    assert.truthy(out:find("CHANNEL", 1, true))
    assert.truthy(out:find("mail%s+3%s+1m3%ds%s+2%s+2\n"), out)
    assert.truthy(out:find("sms%s+1%s+1m3%ds%s+1%s+0\n"), out)
    -- a channel with dead letters only, and --channel
    c:exec("DELETE FROM pglisten.outbox")
    rc, out = tool(ci, "status", "--format=json", "--channel", "mail")
    assert.equal(0, rc)
    rows = json.decode(out)
    assert.equal(1, #rows)
    assert.equal(0, rows[1].waiting)
    assert.equal(json.null, rows[1].oldest_age_seconds)
    c:exec("DELETE FROM pglisten.dead")
    rc, out = tool(ci, "status", "--format", "json")
    assert.same({ 0, "[]\n" }, { rc, out })
  end)

  it("exits 1 without secrets when the database cannot be reached, 2 on a usage error", function()
    local rc, _, err = H.run_runner({ "outbox", "status", "--db",
      "host=127.0.0.1 port=1 user=x password=Very$ecret connect_timeout=2" })
    assert.equal(1, rc, err)
    assert.falsy(err:find("Very$ecret", 1, true), err)
    assert.truthy(err:find("cannot connect", 1, true), err)
    for _, argv in ipairs({ { "outbox" }, { "outbox", "nope" }, { "outbox", "status", "--format", "xml" },
      { "outbox", "status", "extra" }, { "outbox", "replay" }, { "outbox", "replay", "--id", "x" },
      { "outbox", "replay", "--id", "1", "--all" }, { "outbox", "purge", "--older-than", "7d" },
      { "outbox", "purge", "--dead" }, { "outbox", "dead", "--limit", "0" }, { "outbox", "status", "--bogus" } }) do
      rc, _, err = H.run_runner(argv)
      assert.equal(2, rc, table.concat(argv, " ") .. ": " .. err)
      assert.truthy(err:find("lua-pglisten: outbox", 1, true), err)
    end
  end)
end)

describe("lua-pglisten outbox dead", function()
  it("lists dead letters with their last error, by channel and up to --limit", function()
    local c, ci = fresh()
    local ids = bury(c, "mail", 3, "smtp said 550\nmailbox unavailable")
    bury(c, "sms", 1, "no signal")
    local rc, out, err = tool(ci, "dead", "--format", "json", "--channel", "mail", "--limit", "2")
    assert.equal(0, rc, err)
    local rows = json.decode(out)
    assert.same({ ids[1], ids[2] }, { rows[1].id, rows[2].id })
    assert.equal("smtp said 550\nmailbox unavailable", rows[1].last_error)
    assert.equal(1, rows[1].attempts)
    rc, out = tool(ci, "dead")
    assert.equal(0, rc)
    local lines = H.lines(out)
    assert.equal(5, #lines, out)
    assert.truthy(lines[2]:find("mail.*smtp said 550 mailbox unavailable$"), lines[2])
    assert.truthy(lines[5]:find("sms.*no signal$"), lines[5])
  end)
end)

describe("lua-pglisten outbox replay", function()
  it("moves dead letters back with attempts 0, created_at and id kept, and sends the wake-up", function()
    local c, ci = fresh()
    local ids = bury(c, "mail", 3)
    c:exec("UPDATE pglisten.dead SET created_at = '2020-01-02 03:04:05+00'")
    local l = connect(ci)
    assert(l:listen(outbox.WAKEUP_CHANNEL))
    local rc, out, err = tool(ci, "replay", "--id", tostring(ids[1]), "--id=" .. ids[3])
    assert.equal(0, rc, err)
    assert.equal("replayed 2 dead letters\n", out)
    local rows = assert(c:exec("SELECT id, attempts, created_at = '2020-01-02 03:04:05+00' AS kept, "
      .. "run_at <= now() AS due, last_error FROM pglisten.outbox ORDER BY id"))
    assert.equal(2, rows.n)
    assert.same({ ids[1], 0, true, true }, { rows[1].id, rows[1].attempts, rows[1].kept, rows[1].due })
    assert.equal("boom " .. ids[1], rows[1].last_error)
    assert.equal(ids[3], rows[2].id)
    assert.equal(ids[2], one(c, "SELECT string_agg(id::text, ',') AS s FROM pglisten.dead").s + 0)
    local n = assert(l:wait(5))
    assert.same({ outbox.WAKEUP_CHANNEL, "mail" }, { n.channel, n.payload })
    -- --all, within a channel
    bury(c, "sms", 1)
    rc, out = tool(ci, "replay", "--all", "--channel", "sms")
    assert.same({ 0, "replayed 1 dead letter\n" }, { rc, out })
    assert.equal(1, one(c, "SELECT count(*) AS n FROM pglisten.dead").n)
    assert.equal(3, one(c, "SELECT pglisten.replay() AS n").n + 2) -- SQL: the last one
    assert.equal(0, one(c, "SELECT count(*) AS n FROM pglisten.dead").n)
  end)

  it("gives a new id to a dead letter whose id the outbox holds already", function()
    local c, ci = fresh()
    local ids = bury(c, "mail", 1)
    -- the same id in the outbox again (an identity reset, or a hand-made row)
    c:exec("INSERT INTO pglisten.outbox (id, channel, payload) OVERRIDING SYSTEM VALUE VALUES ($1, 'other', 'x')",
      ids[1])
    local rc, out, err = tool(ci, "replay", "--all")
    assert.equal(0, rc, err)
    assert.equal("replayed 1 dead letter\n", out)
    local r = one(c, "SELECT id, attempts FROM pglisten.outbox WHERE channel = 'mail'")
    assert.truthy(r.id > ids[1])
    assert.equal("x", one(c, "SELECT payload FROM pglisten.outbox WHERE id = $1", ids[1]).payload)
  end)

  it("is safe against a concurrent replay of the same ids and invisible to claims until it commits", function()
    local c, ci = fresh()
    local ids = bury(c, "mail", 2)
    local a = connect(ci)
    assert(a:exec("BEGIN"))
    assert.equal(2, one(a, "SELECT pglisten.replay() AS n").n)
    -- a runner claiming meanwhile sees nothing yet
    assert.same({}, assert(outbox.claim(c, { "mail" }, 10)))
    -- a second replay waits for the first's row locks, then finds nothing
    local p = H.spawn({ "psql", "-qtAX", "-d", ci, "-c", "SELECT pglisten.replay()" })
    H.sleep(0.5)
    assert.truthy(p.running())
    assert(a:exec("COMMIT"))
    assert.equal(0, p.wait(10))
    assert.equal("0", (p.stdout():gsub("%s+", "")))
    assert.equal(2, one(c, "SELECT count(*) AS n FROM pglisten.outbox").n)
    local ev = assert(outbox.claim(c, { "mail" }, 10))
    assert.same(ids, { ev[1].id, ev[2].id })
    assert(outbox.finish(c, { ids[1], ids[2] }))
  end)

  it("makes a running runner handle the replayed events at once", function()
    local c, ci = fresh()
    c:exec("CREATE TABLE ok (on_ boolean); INSERT INTO ok VALUES (false); CREATE TABLE got (id bigint)")
    local script = H.script(([[
local db = pglisten.connect(%q)
return { poll_interval = 120, channels = { mail = { durable = true, max_attempts = 2,
  retry = { backoff = 0.05 },
  handler = function(_, note)
    if not db:exec("SELECT on_ FROM ok")[1].on_ then error("smtp down") end
    db:exec("INSERT INTO got VALUES ($1)", note.id)
  end } } }
]]):format(ci))
    local p = H.start(script, { "--db", ci })
    H.finally(function() p.stop() end)
    local id = outbox.publish(c, "mail", "{}")
    assert.truthy(H.eventually(function() return one(c, "SELECT count(*) AS n FROM pglisten.dead").n == 1 end, 15),
      p.stderr())
    local rc, out = tool(ci, "dead")
    assert.equal(0, rc)
    assert.truthy(out:find("smtp down", 1, true), out)
    c:exec("UPDATE ok SET on_ = true")
    local t0 = H.now()
    rc = tool(ci, "replay", "--all")
    assert.equal(0, rc)
    assert.truthy(H.eventually(function() return one(c, "SELECT count(*) AS n FROM got").n == 1 end, 10),
      p.stderr())
    assert.truthy(H.now() - t0 < 10) -- the wake-up, not the 120 s poll
    assert.equal(id, one(c, "SELECT id FROM got").id)
    -- the handler's insert commits on its own connection before the runner's
    -- outbox.finish deletes the event: wait for that commit, then check that
    -- the event was handled once and is neither waiting nor dead
    assert.truthy(H.eventually(function() return one(c, "SELECT count(*) AS n FROM pglisten.outbox").n == 0 end, 15),
      "the handled event was not marked done:\n" .. p.stderr())
    assert.same({ 1, 0 }, { one(c, "SELECT count(*) AS n FROM got").n,
      one(c, "SELECT count(*) AS n FROM pglisten.dead").n })
  end)
end)

describe("lua-pglisten outbox purge", function()
  it("deletes dead letters that failed longer ago than --older-than", function()
    local c, ci = fresh()
    local ids = bury(c, "mail", 4)
    c:exec("UPDATE pglisten.dead SET failed_at = now() - interval '8 days' WHERE id IN ($1, $2)", ids[1], ids[2])
    c:exec("UPDATE pglisten.dead SET failed_at = now() - interval '6 days' WHERE id = $1", ids[3])
    local rc, out, err = tool(ci, "purge", "--dead", "--older-than", "7d")
    assert.equal(0, rc, err)
    assert.equal("purged 2 dead letters\n", out)
    rc, out = tool(ci, "purge", "--dead", "--older-than", "5d23h59m")
    assert.same({ 0, "purged 1 dead letter\n" }, { rc, out })
    assert.equal(ids[4], one(c, "SELECT id FROM pglisten.dead").id)
  end)

  it("parses durations and refuses ambiguous ones", function()
    local admin = require "pglisten.outbox_admin"
    for s, want in pairs({ ["7d"] = 604800, ["45s"] = 45, ["30m"] = 1800, ["12h"] = 43200, ["1d12h"] = 129600,
      ["2h30m15s"] = 9015, ["0s"] = 0 }) do
      assert.equal(want, admin.duration(s), s)
    end
    for _, s in ipairs({ "", "7", "7M", "7D", "1w", "1mo", "1.5d", "-1d", "+1d", " 7d", "7d ", "1h1d", "1d1d",
      "d", "7dd", "1e3s", "9999999999d" }) do
      local v, err = admin.duration(s)
      assert.is_nil(v, s)
      assert.truthy(err:find("invalid duration", 1, true), s)
    end
    local rc, _, err = H.run_runner({ "outbox", "purge", "--dead", "--older-than", "7" })
    assert.equal(2, rc)
    assert.truthy(err:find('invalid duration "7"', 1, true), err)
  end)
end)

describe("ordered durable channels", function()
  -- A script whose durable channel `q` records each handled id in got
  -- (seq: the order handled); an id in fail(id, n) fails n more times.
  local function ordered_script(ci, ordered, extra)
    return H.script(([[
local db = pglisten.connect(%q)
return { poll_interval = 60, channels = { q = { durable = true, ordered = %s, max_attempts = %s,
  retry = { backoff = 0.2, max_backoff = 0.2 },
  handler = function(_, note)
    local r = db:exec("UPDATE fail SET n = n - 1 WHERE id = $1 AND n > 0 RETURNING n", note.id)
    if r.n > 0 then error("failing on purpose") end
    %s
    db:exec("INSERT INTO got (id, pid) VALUES ($1, $2)", note.id, pglisten.core and 0 or 0)
  end } } }
]]):format(ci, tostring(ordered), extra and extra.max or 10, extra and extra.body or ""))
  end

  local function setup()
    local c, ci = fresh()
    c:exec("CREATE TABLE got (seq serial, id bigint, pid int); CREATE TABLE fail (id bigint, n int)")
    return c, ci
  end

  local function handled(c)
    local rows = assert(c:exec("SELECT id FROM got ORDER BY seq"))
    local t = {}
    for i = 1, rows.n do t[i] = rows[i].id end
    return t
  end

  it("is accepted by --check on a durable channel", function()
    local _, ci = setup()
    local rc, out, err = H.run_runner({ "--check", ordered_script(ci, true) })
    assert.equal(0, rc, err)
    assert.truthy(out:find("^q\t"), out)
  end)

  it("without it, later events overtake a failing one", function()
    local c, ci = setup()
    local p = H.start(ordered_script(ci, false), { "--db", ci })
    H.finally(function() p.stop() end)
    c:exec("INSERT INTO fail SELECT 1, 2")
    c:exec("SELECT pglisten.publish('q', '{}') FROM generate_series(1, 4)")
    assert.truthy(H.eventually(function() return #handled(c) == 4 end, 20), p.stderr())
    assert.same({ 2, 3, 4, 1 }, handled(c))
  end)

  it("with it, a failing event blocks its channel and later events wait for it", function()
    local c, ci = setup()
    local p = H.start(ordered_script(ci, true), { "--db", ci })
    H.finally(function() p.stop() end)
    c:exec("INSERT INTO fail SELECT 1, 2")
    c:exec("SELECT pglisten.publish('q', '{}') FROM generate_series(1, 4)")
    assert.truthy(H.eventually(function() return #handled(c) == 4 end, 20), p.stderr())
    assert.same({ 1, 2, 3, 4 }, handled(c))
    assert.equal(0, one(c, "SELECT count(*) AS n FROM fail WHERE n > 0").n)
  end)

  it("lets later events go once the failing one is dead, without waiting for the poll", function()
    local c, ci = setup()
    local p = H.start(ordered_script(ci, true, { max = 2 }), { "--db", ci })
    H.finally(function() p.stop() end)
    c:exec("INSERT INTO fail SELECT 2, 100")
    c:exec("SELECT pglisten.publish('q', '{}') FROM generate_series(1, 4)")
    assert.truthy(H.eventually(function() return #handled(c) == 3 end, 15), p.stderr())
    assert.same({ 1, 3, 4 }, handled(c))
    assert.equal(2, one(c, "SELECT id FROM pglisten.dead").id)
  end)

  it("keeps the order across competing runners", function()
    local c, ci = setup()
    local script = ordered_script(ci, true, { body = "pglisten.sleep(0.02)" })
    local p1 = H.start(script, { "--db", ci })
    local p2 = H.start(script, { "--db", ci })
    H.finally(function() p1.stop(); p2.stop() end)
    c:exec("INSERT INTO fail SELECT 5, 1")
    local pub = connect(ci)
    for _ = 1, 12 do
      pub:exec("SELECT pglisten.publish('q', '{}') FROM generate_series(1, 5)")
      H.sleep(0.03)
    end
    assert.truthy(H.eventually(function() return #handled(c) == 60 end, 30), p1.stderr() .. p2.stderr())
    local want = {}
    for i = 1, 60 do want[i] = i end
    assert.same(want, handled(c))
  end)
end)
