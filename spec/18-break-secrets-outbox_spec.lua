-- Breaking the promises of spec 11 at edges it did not try.  The outbox
-- never sticks: a trigger that refuses one event's row, and a server that
-- ends sessions idle in a transaction (idle_in_transaction_session_timeout),
-- must not keep the other events of the claim (or the claim itself) from
-- being finished.  No secret is logged: a URI password written without
-- percent-encoding ('/', '@', '?' in it), which libpq reads as pieces of
-- other options.
local H = require "helpers"
local pg = H.pg
local outbox = require "pglisten.outbox"

local conns = H.conns(20)
local connect = conns.connect
after_each(conns.close)

local function fresh() return H.outbox_db(connect, "brk") end

---------------------------------------------------------------------------
-- No secret is logged: URI passwords libpq splits
---------------------------------------------------------------------------

local PORT, HOST = os.getenv("PGPORT"), "127.0.0.1"

-- `pw` is the password as the user wrote it between "user:" and the last
-- "@"; `pieces` are the parts of it that must never appear either (libpq
-- reads them as a host, a port or a database name).
local SPLIT = {
  { pw = "p@ss5ecret", pieces = { "ss5ecret" } },
  { pw = "p/ss5ecret", pieces = { "ss5ecret" } },
  { pw = "mid@dle/s3cr3tpart", pieces = { "s3cr3tpart", "dle/s3cr3tpart" } },
}

local function uri(pw, port, db)
  return ("postgresql://postgres:%s@%s:%s/%s"):format(pw, HOST, port, db)
end

local function assert_clean(text, shape, where)
  for _, s in ipairs({ shape.pw, table.unpack(shape.pieces) }) do
    assert.is_nil(text:find(s, 1, true), ("%s leaks %q of %q:\n%s"):format(where, s, shape.pw, text))
  end
end

describe("a URI password with an unencoded '@' or '/'", function()
  it("stays out of safe_conninfo, _redact and connect errors", function()
    for _, shape in ipairs(SPLIT) do
      local ci = uri(shape.pw, PORT, "postgres")
      assert_clean(pg.safe_conninfo(ci), shape, "safe_conninfo")
      local r = pg._redact("before " .. shape.pw .. " " .. table.concat(shape.pieces, " ") .. " after", ci)
      assert_clean(r, shape, "_redact")
      assert.matches("^before ", r)
      local c, err = pg.connect(ci, { timeout = 5 })
      if c then c:close() else assert_clean(err, shape, "connect error") end
      local l = pg.connect(ci, { lazy = true, timeout = 5 })
      if l then
        local ok, lerr = l:exec("SELECT 1")
        if not ok then assert_clean(lerr, shape, "lazy connect error") end
        l:close()
      end
    end
  end)

  it("stays out of the runner's log, as text and as JSON", function()
    local path = H.script("return { channels = { sec = function() end } }")
    for i, shape in ipairs(SPLIT) do
      local fmt = (i % 2 == 0) and "json" or "text"
      local p = H.start(path, { "--log-format", fmt, "--db", uri(shape.pw, PORT, "postgres") }, nil, false)
      H.eventually(function()
        local e = p.stderr()
        return e:find("retrying", 1, true) or e:find("listening", 1, true) or not p.running()
      end, 10)
      p.kill("TERM")
      p.wait(10)
      p.stop()
      assert_clean(p.stderr(), shape, "runner log (" .. fmt .. ")")
      local _, _, log = H.run_runner({ "--install", "--db", uri(shape.pw, PORT, "postgres") })
      assert_clean(log, shape, "--install")
    end
  end)
end)

describe("a conninfo given where the SCRIPT goes (--db forgotten)", function()
  it("is not echoed with its secret when the script cannot be loaded, with or without --check", function()
    for _, ci in ipairs({ uri("s3cretK", PORT, "postgres"), "host=" .. HOST .. " password=s3cretK",
        "postgres://" .. HOST .. "/postgres?password=s3cretK" }) do
      for _, args in ipairs({ { ci }, { "--check", ci }, { "--log-format", "json", ci } }) do
        local rc, out, log = H.run_runner(args)
        assert.equal(2, rc, log)
        assert.is_nil((out .. log):find("s3cretK", 1, true), table.concat(args, " ") .. ":\n" .. out .. log)
        assert.matches("cannot", log, 1, true)
      end
    end
  end)
end)

describe("a URI password with an unencoded '?'", function()
  it("connects: the keepalives go where libpq reads the query, not into the database name", function()
    local ci = uri("p?ss5ecret", PORT, "postgres")
    local c, err = pg.connect(ci, { timeout = 5 })
    assert.is_not_nil(c, err)
    conns.keep(c)
    assert.equal("postgres", assert(c:exec("SELECT current_database() AS d"))[1].d)
    local set = {}
    for _, o in ipairs(assert(pg.core.conninfo_parse(pg.with_keepalives(ci)))) do set[o.keyword] = o.value end
    assert.same({ "1", "30", "p?ss5ecret", "postgres" },
      { set.keepalives, set.keepalives_idle, set.password, set.dbname })
  end)

  -- needs sources/notify.lua's with_application_name to add its option
  -- through pglisten.conninfo.add, as with_keepalives does
  it("lets the runner listen (application_name is added where libpq reads the query)", function()
    local path = H.script("return { channels = { sec = function() end } }")
    local p = H.start(path, { "--db", uri("p?ss5ecret", PORT, "postgres") }, nil, false)
    local up = H.eventually(function()
      return p.stderr():find("listening", 1, true) or not p.running()
    end, 10)
    p.kill("TERM")
    p.wait(10)
    p.stop()
    assert.truthy(up and p.stderr():find("listening", 1, true), p.stderr())
    assert.is_nil(p.stderr():find("ss5ecret", 1, true), p.stderr())
  end)
end)

describe("a conninfo with a zero byte", function()
  it("is refused, never connected with the part before the zero byte (sslmode, password dropped)", function()
    local ci = "host=" .. HOST .. " port=" .. PORT .. " dbname=postgres\0 sslmode=require password=z5ecret"
    local c, err = pg.connect(ci, { timeout = 5 })
    if c then c:close() end
    assert.is_nil(c, "connected without the options after the zero byte")
    assert.matches("zero byte", err, 1, true)
    local l, lerr = pg.connect(ci, { lazy = true })
    if l then l:close() end
    assert.is_nil(l)
    assert.matches("zero byte", lerr, 1, true)
    local s = pg.safe_conninfo(ci)
    assert.matches("zero byte", s, 1, true)
    assert.is_nil(s:find("z5ecret", 1, true))
    assert.is_nil(pg.core.conninfo_keys(ci))
    assert.is_nil(pg.core.conninfo_parse(ci))
  end)
end)

---------------------------------------------------------------------------
-- The outbox never sticks
---------------------------------------------------------------------------

local function one(conn, sql, ...)
  return assert(conn:exec(sql, ...))[1]
end

local function ids_of(events)
  local ids = {}
  for i, e in ipairs(events) do ids[i] = e.id end
  return ids
end

local function claim_all(c, n)
  local evs = assert(outbox.claim(c, { "jobs" }, 100))
  assert.equal(n, #evs)
  return evs
end

describe("outbox.finish when a trigger refuses one event's row", function()
  it("finishes the other events and advances the other failures", function()
    local c = fresh()
    -- a user's trigger that refuses to delete or update one row (an audit
    -- copy that fails for one payload, say)
    assert(c:exec([[
CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.payload LIKE '%poison%' THEN RAISE EXCEPTION 'refused event %', OLD.id; END IF;
  RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END $$;
CREATE TRIGGER refuse BEFORE DELETE OR UPDATE ON pglisten.outbox
  FOR EACH ROW EXECUTE FUNCTION public.refuse()]]))
    local ids = {}
    for i, p in ipairs({ "good", "good", "poison", "good", "fail", "fail" }) do
      ids[i] = assert(outbox.publish(c, "jobs", '"' .. p .. '"'))
    end
    local evs = claim_all(c, 6)
    local done, failed = {}, {}
    for _, ev in ipairs(evs) do
      if ev.payload == '"fail"' then
        failed[#failed + 1] = { id = ev.id, error = "no", attempts = ev.attempts, max_attempts = 2, backoff = 0 }
      else
        done[#done + 1] = ev.id
      end
    end
    local ok, note = outbox.finish(c, done, failed)
    assert.is_true(ok, note)
    local rows = assert(c:exec("SELECT id, attempts FROM pglisten.outbox ORDER BY id"))
    local left = {}
    for _, r in ipairs(rows) do left[#left + 1] = r.id .. ":" .. r.attempts end
    -- the good ones are gone, the failures advanced; the refused one stays, unadvanced
    assert.same({ ids[3] .. ":0", ids[5] .. ":1", ids[6] .. ":1" }, left)
    -- the failures reach pglisten.dead at their last attempt, the refused row notwithstanding
    evs = claim_all(c, 3)
    failed = {}
    for _, ev in ipairs(evs) do
      if ev.payload == '"fail"' then
        failed[#failed + 1] = { id = ev.id, error = "no", attempts = ev.attempts, max_attempts = 2, backoff = 0 }
      end
    end
    assert.is_true((outbox.finish(c, { ids[3] }, failed)))
    rows = assert(c:exec("SELECT id, attempts FROM pglisten.dead ORDER BY id"))
    assert.same({ { ids[5], 2 }, { ids[6], 2 } },
      { { rows[1].id, rows[1].attempts }, { rows[2].id, rows[2].attempts } })
    assert.equal(1, assert(outbox.pending(c, "jobs")))
  end)
end)

describe("outbox.finish when a deferred constraint refuses one event's delete", function()
  it("finishes the other events: the check runs inside finish, not at COMMIT", function()
    local c = fresh()
    -- a deferred foreign key from a user's table, say; here a constraint trigger
    assert(c:exec([[
CREATE FUNCTION public.refuse_later() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.payload LIKE '%poison%' THEN RAISE EXCEPTION 'refused event %', OLD.id; END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER refuse_later AFTER DELETE ON pglisten.outbox
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.refuse_later()]]))
    local ids = {}
    for i = 1, 4 do ids[i] = assert(outbox.publish(c, "jobs", i == 2 and '"poison"' or '"good"')) end
    local ok, err = outbox.finish(c, ids_of(claim_all(c, 4)))
    assert.is_true(ok, err)
    local rows = assert(c:exec("SELECT id, attempts FROM pglisten.outbox"))
    assert.equal(1, rows.n)
    assert.same({ ids[2], 1 }, { rows[1].id, rows[1].attempts })
  end)
end)

describe("competing claims when the database defaults to serializable", function()
  it("claim disjoint events and both finish (a claim is read committed)", function()
    local c, _, name = fresh()
    assert(c:exec("ALTER DATABASE " .. name .. " SET default_transaction_isolation = 'serializable'"))
    for i = 1, 6 do assert(outbox.publish(c, "jobs", '"e' .. i .. '"')) end
    local a, b = connect("dbname=" .. name), connect("dbname=" .. name)
    local ea, aerr = outbox.claim(a, { "jobs" }, 3)
    assert.is_table(ea, aerr)
    local eb, berr = outbox.claim(b, { "jobs" }, 3)
    assert.is_table(eb, berr)
    assert.same({ 3, 3 }, { #ea, #eb })
    local ok, err = outbox.finish(a, ids_of(ea))
    assert.is_true(ok, err)
    ok, err = outbox.finish(b, ids_of(eb))
    assert.is_true(ok, err)
    assert.equal(0, assert(outbox.pending(c, "jobs")))
    assert.equal("serializable", assert(a:exec("SHOW transaction_isolation"))[1].transaction_isolation)
  end)
end)

describe("a claim under idle_in_transaction_session_timeout", function()
  it("survives handlers slower than the timeout: finish deletes the events", function()
    local c, _, name = fresh()
    assert(c:exec("ALTER DATABASE " .. name .. " SET idle_in_transaction_session_timeout = '1s'"))
    local ob = connect("dbname=" .. name)
    for i = 1, 3 do assert(outbox.publish(c, "jobs", '"e' .. i .. '"')) end
    local evs = claim_all(ob, 3)
    H.sleep(1.6) -- the handlers run
    local ok, err = outbox.finish(ob, { evs[1].id, evs[2].id }, {
      { id = evs[3].id, error = "no", attempts = evs[3].attempts, max_attempts = 5, backoff = 0 } })
    assert.is_true(ok, err)
    local rows = assert(c:exec("SELECT id, attempts FROM pglisten.outbox"))
    assert.same({ evs[3].id, 1 }, { rows[1].id, rows[1].attempts })
    assert.equal(1, rows.n)
    -- the session's own setting is back after the claim
    local shown = assert(ob:exec("SHOW idle_in_transaction_session_timeout"))[1]
    assert.equal("1s", shown.idle_in_transaction_session_timeout)
  end)
end)

describe("outbox.error_text of an object whose __tostring raises", function()
  it("is a string: finish cannot raise inside the claim's transaction", function()
    local e = setmetatable({}, { __tostring = function() error("no") end })
    assert.equal("(an error table that tostring cannot show)", outbox.error_text(e))
    local c = fresh()
    local id = assert(outbox.publish(c, "jobs", "{}"))
    claim_all(c, 1)
    assert.is_true((outbox.finish(c, {}, { { id = id, error = e, attempts = 0, backoff = 0 } })))
    assert.equal("idle", c:txstatus())
    assert.equal(1, one(c, "SELECT attempts FROM pglisten.outbox").attempts)
  end)
end)

describe("the runner on a durable handler whose error object cannot be shown", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("buries the event after max_attempts and keeps running when __tostring raises", function()
    local _, ci = H.createdb("brkts")
    local rc, out, err = H.run_runner({ "--install", "--db", ci })
    assert.equal(0, rc, out .. err)
    local c = connect(ci)
    assert(c:exec("CREATE TABLE handled (k int NOT NULL)"))
    -- __tostring works once (the traceback), then raises; or always raises
    local path = H.file("tostring-raises.lua", ([[
local pglisten = require "pglisten"
local db = assert(pglisten.connect(%q))
local function object(k)
  local n = 0
  return setmetatable({}, { __tostring = function()
    n = n + 1
    if k == 1 and n == 1 then return "shown once" end
    error("cannot show " .. k)
  end })
end
return {
  poll_interval = 0.2,
  channels = { jobs = { durable = true, max_attempts = 2, retry = { backoff = 0.05 }, handler = function(row)
    assert(db:exec("INSERT INTO handled (k) VALUES ($1)", row.k))
    if row.k <= 2 then error(object(row.k)) end
  end } },
}]]):format(ci))
    p = H.start(path, { "--db", ci })
    assert(c:exec([[SELECT pglisten.publish('jobs', json_build_object('k', g)::text) FROM generate_series(1, 4) g]]))
    local buried = H.eventually(function()
      return one(c, "SELECT count(*) AS n FROM pglisten.dead").n == 2 or not p.running()
    end, 15)
    assert.is_true(p.running(), "the runner died: " .. p.stderr())
    assert.is_true(buried, p.stderr())
    local counts = {}
    for _, r in ipairs(assert(c:exec("SELECT k, count(*) AS n FROM handled GROUP BY k ORDER BY k"))) do
      counts[r.k] = r.n
    end
    assert.same({ 2, 2, 1, 1 }, counts)
    assert.equal(0, one(c, "SELECT count(*) AS n FROM pglisten.outbox").n)
  end)
end)
