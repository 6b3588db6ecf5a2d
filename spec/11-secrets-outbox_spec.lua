-- Two promises at their edges.  The outbox never sticks: the bookkeeping of
-- one failed durable event (an error text the server refuses, a dead letter
-- that cannot be written, a delete that fails) cannot undo the others, and a
-- failing event's attempts always advance.  No secret is logged: every
-- conninfo option libpq marks secret (dispchar "*"), in every shape a
-- conninfo can take, stays out of safe_conninfo, connect errors and the
-- runner's log.
local H = require "helpers"
local pg = H.pg
local outbox = require "pglisten.outbox"

local conns = H.conns(20)
local connect = conns.connect
after_each(conns.close)

local function fresh() return H.outbox_db(connect, "secob") end

local function one(conn, sql, ...)
  return assert(conn:exec(sql, ...))[1]
end

local function publish_n(conn, channel, n, prefix)
  local ids = {}
  for i = 1, n do ids[i] = assert(outbox.publish(conn, channel, (prefix or "event ") .. i)) end
  return ids
end

local function ids_of(events)
  local ids = {}
  for i, e in ipairs(events) do ids[i] = e.id end
  return ids
end

-- A connection look-alike that counts the statements finish sends.
local function counting(c)
  local n = { exec = 0 }
  local w = {}
  function w.exec(_, ...)
    n.exec = n.exec + 1
    return c:exec(...)
  end
  function w.status() return c:status() end
  function w.txstatus() return c:txstatus() end
  function w.alive() return c:alive() end
  return w, n
end

local MB_ERROR = ("é"):rep(500000) -- 1,000,000 bytes of two-byte characters

---------------------------------------------------------------------------
-- The outbox never sticks: the data layer
---------------------------------------------------------------------------

describe("outbox.finish with errors the server would refuse", function()
  local cases = {
    { name = "an invalid UTF-8 byte", err = "bad byte \xff", want = "bad byte \u{FFFD}" },
    { name = "a zero byte", err = "zero\0byte", want = "zerobyte" },
    { name = "a truncated sequence at the end", err = "cut \xc3", want = "cut \u{FFFD}" },
    { name = "an overlong encoding", err = "over\xc0\xaflong", want = "over\u{FFFD}\u{FFFD}long" },
    { name = "a UTF-16 surrogate", err = "sur\xed\xa0\x80rogate", want = "sur\u{FFFD}\u{FFFD}\u{FFFD}rogate" },
    { name = "valid text", err = "plain, ça va? \u{1F600}", want = "plain, ça va? \u{1F600}" },
  }
  for _, case in ipairs(cases) do
    it("records " .. case.name .. " safely and keeps the handled events' deletes", function()
      local c = fresh()
      local ids = publish_n(c, "edge", 3)
      assert.same(ids, ids_of(assert(outbox.claim(c, { "edge" }, 10))))
      assert.is_true(outbox.finish(c, { ids[1], ids[3] },
        { { id = ids[2], error = case.err, attempts = 0, max_attempts = 5, backoff = 60 } }))
      assert.equal("idle", c:txstatus())
      assert.equal(1, outbox.pending(c, "edge"))
      local row = one(c, "SELECT attempts, last_error FROM pglisten.outbox WHERE id = $1", ids[2])
      assert.same({ attempts = 1, last_error = case.want }, row)
    end)
  end

  it("bounds a 1 MB error to 4000 bytes, cut on a character boundary", function()
    local c = fresh()
    local ids = publish_n(c, "big", 2)
    assert(outbox.claim(c, { "big" }, 10))
    assert.is_true(outbox.finish(c, { ids[1] }, { { id = ids[2], error = MB_ERROR, attempts = 0, backoff = 60 } }))
    local row = one(c, [[SELECT attempts, octet_length(last_error) AS bytes, last_error
      FROM pglisten.outbox WHERE id = $1]], ids[2])
    assert.equal(1, row.attempts)
    assert.is_true(row.bytes <= outbox.MAX_ERROR and row.bytes > 3000, "bytes: " .. row.bytes)
    assert.equal(1, outbox.pending(c, "big"))
    assert.equal(("é"):rep(1000), row.last_error:sub(1, 2000))
    assert.matches("1000000 bytes", row.last_error) -- says it was cut, and from what
    assert.truthy(utf8.len(row.last_error))
  end)

  it("buries after max_attempts whatever the error text, attempts advancing each time", function()
    local c = fresh()
    local id = publish_n(c, "doom", 1)[1]
    for attempt = 1, 3 do
      local ev = assert(outbox.claim(c, { "doom" }, 10))
      assert.same({ id }, ids_of(ev))
      assert.equal(attempt - 1, ev[1].attempts)
      assert.is_true(outbox.finish(c, {}, { { id = id, error = "nul\0 and \xff " .. attempt,
        attempts = ev[1].attempts, max_attempts = 3, backoff = 0 } }))
    end
    assert.equal(0, outbox.pending(c, "doom"))
    local dead = assert(outbox.dead(c, "doom"))
    assert.equal(1, #dead)
    assert.equal(3, dead[1].attempts)
    assert.equal("nul and \u{FFFD} 3", dead[1].last_error)
  end)

  it("sends O(1) statements for a claim of 100, however many failed", function()
    local c = fresh()
    local ids = publish_n(c, "many", 100)
    assert(outbox.claim(c, { "many" }, 100))
    local done, failed = {}, {}
    for i, id in ipairs(ids) do
      if i % 2 == 0 then done[#done + 1] = id
      else failed[#failed + 1] = { id = id, error = "e" .. i, attempts = 0, max_attempts = (i % 4 == 1) and 1 or 5,
        backoff = 30 } end
    end
    local w, n = counting(c)
    assert.is_true(outbox.finish(w, done, failed))
    assert.is_true(n.exec <= 4, n.exec .. " statements")
    assert.equal(25, outbox.pending(c, "many"))
    assert.equal(25, #assert(outbox.dead(c, "many")))
    assert.equal(25, one(c, "SELECT count(*) AS n FROM pglisten.outbox WHERE attempts = 1 AND last_error LIKE 'e%'").n)
  end)

  it("keeps the handled events' deletes when a dead letter cannot be written (its id is taken)", function()
    local c = fresh()
    local ids = publish_n(c, "taken", 2)
    assert(outbox.claim(c, { "taken" }, 2))
    assert(c:exec([[INSERT INTO pglisten.dead (id, channel, payload) VALUES ($1, 'taken', 'x')]], ids[2]))
    local ok = outbox.finish(c, { ids[1] }, { { id = ids[2], error = "last one", attempts = 0, max_attempts = 1 } })
    assert.is_true(ok)
    assert.equal("idle", c:txstatus())
    assert.same({ ids[2] }, ids_of(assert(c:exec("SELECT id FROM pglisten.outbox"))))
    local row = one(c, "SELECT attempts, last_error FROM pglisten.outbox WHERE id = $1", ids[2])
    assert.equal(1, row.attempts)
    assert.matches("last one", row.last_error)
    assert.matches("pglisten.dead", row.last_error, 1, true)
    assert.equal("x", one(c, "SELECT payload FROM pglisten.dead WHERE id = $1", ids[2]).payload) -- untouched
  end)

  it("advances attempts even when deleting the handled events fails", function()
    local c = fresh()
    assert(c:exec([[
CREATE FUNCTION public.no_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.payload = 'undeletable' THEN RAISE EXCEPTION 'refusing to delete event %', OLD.id; END IF;
  RETURN OLD;
END $$;
CREATE TRIGGER no_delete BEFORE DELETE ON pglisten.outbox FOR EACH ROW EXECUTE FUNCTION public.no_delete();]]))
    local stuck = assert(outbox.publish(c, "td", "undeletable"))
    local failing = assert(outbox.publish(c, "td", "fails"))
    assert(outbox.claim(c, { "td" }, 10))
    local ok, note = outbox.finish(c, { stuck },
      { { id = failing, error = "handler \xff", attempts = 0, backoff = 60 } })
    assert.is_true(ok)
    assert.matches("refusing to delete event", note)
    assert.equal("idle", c:txstatus())
    local rows = assert(c:exec(
      "SELECT id, attempts, last_error, run_at > now() AS later FROM pglisten.outbox ORDER BY id"))
    assert.equal(2, rows.n)
    assert.same({ stuck, 1, true }, { rows[1].id, rows[1].attempts, rows[1].later })
    assert.matches("refusing to delete event", rows[1].last_error)
    assert.same({ failing, 1, "handler \u{FFFD}", true },
      { rows[2].id, rows[2].attempts, rows[2].last_error, rows[2].later })
  end)

  it("changes nothing when the connection dies before finish: the events are claimable again", function()
    local c, conninfo = fresh()
    local ids = publish_n(c, "gone", 2)
    local a, z = connect(conninfo), connect(conninfo)
    assert(outbox.claim(a, { "gone" }, 10))
    assert(z:exec("SELECT pg_terminate_backend($1)", a:pid()))
    local ok, err = outbox.finish(a, { ids[1] }, { { id = ids[2], error = "x", attempts = 0, backoff = 0 } })
    assert.is_nil(ok)
    assert.is_string(err)
    local got = H.eventually(function()
      local ev = assert(outbox.claim(z, { "gone" }, 10))
      if #ev > 0 then return ev end
    end, 10)
    assert.same(ids, ids_of(got))
    assert.is_true(outbox.finish(z, ids))
  end)
end)

describe("outbox.error_text", function()
  it("replaces invalid bytes, drops zero bytes and bounds the length", function()
    assert.equal("ok", outbox.error_text("ok"))
    assert.equal("a\u{FFFD}b", outbox.error_text("a\xffb"))
    assert.equal("ab", outbox.error_text("a\0b"))
    assert.equal("unknown error", outbox.error_text(nil))
    local s = outbox.error_text(MB_ERROR)
    assert.is_true(#s <= outbox.MAX_ERROR)
    assert.truthy(utf8.len(s))
    -- a cut never splits a character, at any offset
    for pad = 0, 3 do
      local t = outbox.error_text(("x"):rep(pad) .. ("€"):rep(3000))
      assert.is_true(#t <= outbox.MAX_ERROR)
      assert.truthy(utf8.len(t), "pad " .. pad)
    end
  end)
end)

---------------------------------------------------------------------------
-- The outbox never sticks: the runner
---------------------------------------------------------------------------

describe("the runner on a durable handler raising odd errors", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("handles the good events once and buries the bad ones after max_attempts", function()
    local _, ci = H.createdb("secrun")
    local rc, out, err = H.run_runner({ "--install", "--db", ci })
    assert.equal(0, rc, out .. err)
    local c = connect(ci)
    assert(c:exec("CREATE TABLE handled (k int NOT NULL)"))
    -- bad events first, all in one claim with the good ones
    assert(c:exec([[BEGIN;
SELECT pglisten.publish('jobs', json_build_object('k', g)::text) FROM generate_series(1, 13) g;
COMMIT]]))
    local path = H.file("odd-errors.lua", ([[
local pglisten = require "pglisten"
local db = assert(pglisten.connect(%q))
local BAD = { [1] = "bad byte \xff", [2] = "zero\0byte", [3] = ("é"):rep(500000) }
return {
  poll_interval = 0.2,
  -- retried 0.1 s and 0.2 s after a failure, not 1 s and 2 s: the error texts are what is tested
  channels = { jobs = { durable = true, max_attempts = 3, retry = { backoff = 0.1 }, handler = function(row)
    assert(db:exec("INSERT INTO handled (k) VALUES ($1)", row.k))
    if BAD[row.k] then error(BAD[row.k], 0) end
  end } },
}]]):format(ci))
    p = H.start(path, { "--db", ci })
    local dead = H.eventually(function()
      local r = assert(c:exec("SELECT count(*) AS n FROM pglisten.dead"))
      return r[1].n == 3
    end, 20)
    local counts = {}
    for _, r in ipairs(assert(c:exec("SELECT k, count(*) AS n FROM handled GROUP BY k ORDER BY k"))) do
      counts[r.k] = r.n
    end
    assert.is_true(dead, "dead letters never written; handled per event: " .. pg.json.encode(counts))
    H.sleep(0.6) -- a few more polls: nothing is handled again
    for _, r in ipairs(assert(c:exec("SELECT k, count(*) AS n FROM handled GROUP BY k ORDER BY k"))) do
      counts[r.k] = r.n
    end
    for k = 1, 13 do
      assert.equal(k <= 3 and 3 or 1, counts[k], "event k=" .. k .. " handled " .. tostring(counts[k]) .. " times")
    end
    assert.equal(0, one(c, "SELECT count(*) AS n FROM pglisten.outbox").n)
    local rows = assert(c:exec([[SELECT (payload::json->>'k')::int AS k, attempts, last_error,
      octet_length(last_error) AS bytes FROM pglisten.dead ORDER BY 1]]))
    assert.same({ 1, 3, "bad byte \u{FFFD}" }, { rows[1].k, rows[1].attempts, rows[1].last_error })
    assert.same({ 2, 3, "zerobyte" }, { rows[2].k, rows[2].attempts, rows[2].last_error })
    assert.same({ 3, 3 }, { rows[3].k, rows[3].attempts })
    assert.is_true(rows[3].bytes <= 4000, rows[3].bytes .. " bytes")
    assert.equal(("é"):rep(100), rows[3].last_error:sub(1, 200))
    assert.is_true(p.running())
  end)
end)

---------------------------------------------------------------------------
-- No secret is logged
---------------------------------------------------------------------------

local PORT, HOST = os.getenv("PGPORT"), "127.0.0.1"

-- Conninfo shapes.  %P is a port, %D a database name.  `secrets` are the
-- values in the forms they take (raw as written and as libpq decodes them),
-- `parts` pieces of them: none may ever appear.
local SHAPES = {
  { ci = "host=" .. HOST .. " port=%P dbname=%D user=postgres sslpassword=k3ysecret password=s3cretA",
    secrets = { "k3ysecret", "s3cretA" } },
  { ci = "host=" .. HOST .. " port=%P dbname=%D password=first1secret user=postgres password=second2secret",
    secrets = { "first1secret", "second2secret" } },
  { ci = "password='s3cret with spaces' host=" .. HOST .. " port=%P dbname=%D",
    secrets = { "s3cret with spaces" }, parts = { "s3cret" } },
  { ci = [[host=]] .. HOST .. [[ port=%P dbname=%D password='it\'s a \\ s3cretB']],
    secrets = { [[it\'s a \\ s3cretB]], [[it's a \ s3cretB]] }, parts = { "s3cretB" } },
  { ci = [[host=]] .. HOST .. [[ port=%P dbname=%D password=back\slash5ecret]],
    secrets = { [[back\slash5ecret]], "backslash5ecret" }, parts = { "slash5ecret" } },
  { ci = "host = " .. HOST .. " port = %P dbname = %D password = spaced5ecret",
    secrets = { "spaced5ecret" } },
  { ci = "postgresql://postgres:s3cr%40et%3Ax@" .. HOST .. ":%P/%D",
    secrets = { "s3cr%40et%3Ax", "s3cr@et:x" }, parts = { "s3cr" } },
  { ci = "postgresql://postgres:pa:ss:word9@" .. HOST .. ":%P/%D",
    secrets = { "pa:ss:word9" }, parts = { "ss:word9" } },
  { ci = "postgresql://postgres@" .. HOST .. ":%P/%D?password=qu%65rysecret",
    secrets = { "qu%65rysecret", "querysecret" } },
  { ci = "postgres://postgres@" .. HOST .. ":%P/%D?sslpassword=sslk3ysecret&password=pw2secret",
    secrets = { "sslk3ysecret", "pw2secret" } },
  { ci = "postgresql://postgres:userinfo5ecret@" .. HOST .. ":%P/%D?password=query5ecret",
    secrets = { "userinfo5ecret", "query5ecret" } },
  { ci = "postgresql://postgres:%73%33%63%72%65%74%58%59@" .. HOST .. ":%P/%D",
    secrets = { "%73%33%63%72%65%74%58%59", "s3cretXY" } },
  { ci = "postgresql://postgres:p%C3%A4ss5ecret@" .. HOST .. ":%P/%D",
    secrets = { "p%C3%A4ss5ecret", "päss5ecret" }, parts = { "ss5ecret" } },
  -- libpq cannot parse these: nothing of them may be echoed raw
  { ci = "host=" .. HOST .. " port=%P dbname=%D password=s3cretC tail9piece", bad = true,
    secrets = { "s3cretC" }, parts = { "tail9piece" } },
  { ci = "host=" .. HOST .. " port=%P dbname=%D password='unterminated5ecret", bad = true,
    secrets = { "unterminated5ecret" } },
  { ci = "postgresql://postgres:s3cretD%zz@" .. HOST .. ":%P/%D", bad = true,
    secrets = { "s3cretD%zz" }, parts = { "s3cretD" } },
  { ci = "postgresql://postgres@" .. HOST .. ":%P/%D?password=qp5ecret&bogus%zz=1", bad = true,
    secrets = { "qp5ecret" } },
}

local function fill(shape, port, db)
  return (shape.ci:gsub("%%P", port):gsub("%%D", db))
end

local function assert_clean(text, shape, where)
  for _, list in ipairs({ shape.secrets, shape.parts or {} }) do
    for _, s in ipairs(list) do
      assert.is_nil(text:find(s, 1, true), ("%s leaks %q for %s:\n%s"):format(where, s, shape.ci, text))
    end
  end
end

describe("pglisten.safe_conninfo", function()
  it("shows no secret of any shape, and keeps what is not secret", function()
    for _, shape in ipairs(SHAPES) do
      local s = pg.safe_conninfo(fill(shape, PORT, "postgres"))
      assert.is_string(s)
      assert_clean(s, shape, "safe_conninfo")
      if not shape.bad then
        assert.matches(HOST, s, 1, true)
        assert.matches(PORT, s, 1, true)
        assert.matches("********", s, 1, true)
      end
    end
    assert.equal("(libpq defaults)", pg.safe_conninfo(nil))
    assert.equal("(libpq defaults)", pg.safe_conninfo(""))
  end)

  it("redacts every form of every secret in any message", function()
    for _, shape in ipairs(SHAPES) do
      local ci = fill(shape, PORT, "postgres")
      local msg = "before " .. table.concat(shape.secrets, " | ") .. " after \"" .. shape.secrets[1] .. "\""
      local r = pg._redact(msg, ci)
      assert_clean(r, shape, "_redact")
      assert.matches("^before ", r)
      assert.matches(" after ", r)
    end
  end)
end)

describe("pglisten.connect errors", function()
  it("name no secret, whether nothing listens, the database is missing or the conninfo is malformed", function()
    for _, shape in ipairs(SHAPES) do
      for _, target in ipairs({ { "1", "postgres" }, { PORT, "no_such_db_secrets" } }) do
        local ci = fill(shape, target[1], target[2])
        local c, err = pg.connect(ci, { timeout = 5 })
        assert.is_nil(c, ci)
        assert.is_string(err)
        assert_clean(err, shape, "connect error")
      end
    end
  end)
end)

describe("the runner's log", function()
  local procs = {}
  after_each(function()
    for _, p in ipairs(procs) do p.stop() end
    procs = {}
  end)

  it("shows no secret at start-up, failure or shutdown, as text and as JSON", function()
    local path = H.script("return { channels = { sec = function() end } }")
    for i, shape in ipairs(SHAPES) do
      local fmt = (i % 2 == 0) and "json" or "text"
      -- the test server trusts every password: the runner starts and logs "listening"
      if not shape.bad then
        local p = H.start(path, { "--log-format", fmt, "--db", fill(shape, PORT, "postgres") })
        procs[#procs + 1] = p
        p.kill("TERM")
        assert.equal(0, p.wait(10))
        local log = p.stderr()
        assert.matches("listening", log, 1, true)
        assert_clean(log, shape, "runner log (" .. fmt .. ")")
      end
      -- a database that does not exist (or a malformed conninfo): exit 1 with the conninfo logged
      local rc, _, log = H.run_runner({ "--log-format", fmt == "json" and "text" or "json", "--db",
        fill(shape, PORT, "no_such_db_secrets"), path })
      assert.equal(1, rc, log)
      assert.matches("cannot connect", log, 1, true)
      assert_clean(log, shape, "runner exit log")
      -- nothing listens: retries, warning once
      if i % 3 == 0 then
        local p = H.start(path, { "--log-format", fmt, "--db", fill(shape, "1", "postgres") }, nil, false)
        procs[#procs + 1] = p
        assert(H.eventually(function()
          return p.stderr():find("retrying", 1, true) or not p.running()
        end, 10), p.stderr())
        p.kill("TERM")
        p.wait(10)
        assert_clean(p.stderr(), shape, "runner retry log")
      end
    end
  end)
end)
