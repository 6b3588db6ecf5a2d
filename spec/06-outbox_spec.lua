-- Durable channels, the PostgreSQL side: schema pglisten (outbox, dead,
-- publish, notify_trigger) and the data layer pglisten.outbox, against a real
-- server.  Every test gets a database of its own.
local H = require "helpers"
local pg = H.pg
local outbox = require "pglisten.outbox"
local schema = require "pglisten.schema"

local json = pg.json

-- Connections opened by the running test, closed after it.  A query that
-- blocks (a lock wait where SKIP LOCKED should skip) fails after 10 s
-- instead of hanging the run.
local conns = H.conns(10)
local connect = conns.connect
after_each(conns.close)

-- A fresh database with the schema installed: conn, conninfo, dbname.
local function fresh() return H.outbox_db(connect, "outbox") end

local function one(conn, sql, ...)
  local rows = assert(conn:exec(sql, ...))
  return rows[1]
end

local function ids_of(events)
  local ids = {}
  for i, e in ipairs(events) do ids[i] = e.id end
  return ids
end

local function publish_n(conn, channel, n)
  local ids = {}
  for i = 1, n do ids[i] = assert(outbox.publish(conn, channel, "event " .. i)) end
  return ids
end

describe("pglisten.schema", function()
  it("is plain SQL with a version and a usage header", function()
    assert.equal(1, schema.version)
    assert.is_string(schema.sql)
    for line in schema.sql:gmatch("[^\n]+") do
      assert.is_nil(line:match("^%s*\\"), "psql meta-command: " .. line)
      assert.is_nil(line:upper():match("^%s*BEGIN%s*;") or line:upper():match("^%s*COMMIT%s*;"),
        "transaction control: " .. line)
    end
    assert.matches("EXECUTE FUNCTION pglisten.notify_trigger%('users_changed', 'notify', 'id'%)", schema.sql)
  end)

  it("installs twice without harm and keeps the data", function()
    local c = fresh()
    local id = assert(outbox.publish(c, "keep", "me"))
    assert.is_true(outbox.install(c))
    assert.is_true(outbox.install(c))
    assert.equal(1, outbox.pending(c, "keep"))
    assert.equal(id, one(c, "SELECT id FROM pglisten.outbox").id)
    local r = one(c, [[SELECT to_regclass('pglisten.outbox') IS NOT NULL AS o,
      to_regclass('pglisten.dead') IS NOT NULL AS d,
      to_regclass('pglisten.outbox_claim_idx') IS NOT NULL AS i,
      (SELECT count(*) FROM pg_proc WHERE proname = 'publish'
          AND pronamespace = 'pglisten'::regnamespace) AS publishes,
      to_regprocedure('pglisten.notify_trigger()') IS NOT NULL AS t]])
    assert.same({ o = true, d = true, i = true, publishes = 2, t = true }, r)
    -- the claiming index is (channel, run_at, id)
    assert.matches("%(channel, run_at, id%)",
      one(c, "SELECT pg_get_indexdef('pglisten.outbox_claim_idx'::regclass) AS d").d)
  end)

  it("installs from several sessions at once, also inside their transactions", function()
    local name, conninfo = H.createdb("outbox")
    local a = connect(conninfo)
    -- A installs inside a transaction it keeps open: the others must wait for it
    assert(a:exec("BEGIN"))
    assert.is_true(outbox.install(a))
    local path = H.file("schema.sql", schema.sql)
    local procs = {}
    for i = 1, 4 do
      procs[i] = H.spawn({ "psql", "-qX", "-v", "ON_ERROR_STOP=1", "-1", "-d", name, "-f", path })
    end
    local b = connect(conninfo)
    assert.truthy(H.eventually(function()
      return one(b, [[SELECT count(*) AS n FROM pg_stat_activity
        WHERE datname = $1 AND wait_event_type = 'Lock']], name).n == 4
    end, 10), "the other installers do not wait for the first")
    assert(a:exec("COMMIT"))
    for i = 1, 4 do
      assert.equal(0, procs[i].wait(20), procs[i].stderr())
      assert.is_nil(procs[i].stderr():find("ERROR", 1, true), procs[i].stderr())
    end
    -- and psql's own concurrent runs without a waiting first one
    for i = 1, 4 do
      procs[i] = H.spawn({ "psql", "-qX", "-v", "ON_ERROR_STOP=1", "-d", name, "-c", schema.sql })
    end
    for i = 1, 4 do assert.equal(0, procs[i].wait(20), procs[i].stderr()) end
    assert.is_true(outbox.install(b))
    assert.equal(0, outbox.pending(b))
  end)

  it("takes untyped literals, text and jsonb in SQL", function()
    local c = fresh()
    local a = one(c, "SELECT pglisten.publish('lit', 'plain text') AS id").id
    local b = one(c, [[SELECT pglisten.publish('lit', '{"a": 1}'::jsonb) AS id]]).id
    assert.equal("integer", math.type(a))
    assert.is_true(b > a)
    local rows = assert(c:exec("SELECT payload FROM pglisten.outbox ORDER BY id"))
    assert.equal("plain text", rows[1].payload)
    assert.same({ a = 1 }, json.decode(rows[2].payload))
    -- a NULL payload or an empty channel is refused with a clear message
    local r, err, code = c:exec("SELECT pglisten.publish('lit', NULL)")
    assert.is_nil(r); assert.equal("22004", code); assert.matches("must not be NULL", err)
    r, err, code = outbox.publish(c, "", "x")
    assert.is_nil(r); assert.equal("22023", code); assert.matches("non%-empty", err)
  end)
end)

describe("outbox.publish", function()
  it("inserts a row and wakes pglisten_outbox with the channel name, on COMMIT only", function()
    local c, conninfo = fresh()
    local l = connect(conninfo)
    assert(l:listen(outbox.WAKEUP_CHANNEL))
    assert.equal("pglisten_outbox", outbox.WAKEUP_CHANNEL)

    assert(c:exec("BEGIN"))
    local id = assert(outbox.publish(c, "Emails Out", { to = "a@example.com", n = 1 }))
    assert.equal("integer", math.type(id))
    assert.same({ nil, "timeout" }, { l:wait(0.3) }) -- not before COMMIT
    assert.equal(0, outbox.pending(l, "Emails Out")) -- nor visible
    assert(c:exec("COMMIT"))
    local note = assert(l:wait(5))
    assert.equal("pglisten_outbox", note.channel)
    assert.equal("Emails Out", note.payload)
    assert.equal(c:pid(), note.pid)
    local row = one(c, "SELECT * FROM pglisten.outbox WHERE id = $1", id)
    assert.equal("Emails Out", row.channel)
    assert.same({ to = "a@example.com", n = 1 }, json.decode(row.payload))
    assert.equal(0, row.attempts)
    assert.equal(pg.null, row.last_error)

    -- rolled back: no row, no wake-up
    assert(c:exec("BEGIN"))
    assert(outbox.publish(c, "Emails Out", "lost"))
    assert(c:exec("ROLLBACK"))
    assert.same({ nil, "timeout" }, { l:wait(0.3) })
    assert.equal(1, outbox.pending(c, "Emails Out"))
    assert.equal(1, outbox.pending(c))
  end)

  it("keeps the payload byte for byte and raises on wrong types", function()
    local c = fresh()
    local s = [[it's "quoted" \ back\slash $1 ');DROP TABLE pglisten.outbox;-- ]] .. ("é"):rep(5000)
    local id = assert(outbox.publish(c, "raw", s))
    assert.equal(s, one(c, "SELECT payload FROM pglisten.outbox WHERE id = $1", id).payload)
    assert.has_error(function() outbox.publish(c, 42, "x") end)
    assert.has_error(function() outbox.publish(c, "raw", 42) end)
    assert.has_error(function() outbox.publish(c, "raw") end)
    assert.has_error(function() outbox.publish("conn", "raw", "x") end)
  end)
end)

describe("outbox.claim and outbox.finish", function()
  it("claims due rows of the channels asked, oldest first, up to the limit; finish deletes them", function()
    local c = fresh()
    local a = publish_n(c, "a", 2)
    local b = publish_n(c, "b", 1)
    local other = publish_n(c, "other", 1)
    local ev = assert(outbox.claim(c, { "a", "b" }, 2))
    assert.same({ a[1], a[2] }, ids_of(ev))
    assert.equal("intrans", c:txstatus()) -- the claim holds its transaction
    assert.same({ id = a[1], channel = "a", payload = "event 1", attempts = 0 },
      { id = ev[1].id, channel = ev[1].channel, payload = ev[1].payload, attempts = ev[1].attempts })
    assert.equal("integer", math.type(ev[1].id))
    assert.is_string(ev[1].created_at)
    assert.is_nil(ev[1].last_error)
    assert.is_true(outbox.finish(c, ids_of(ev)))
    assert.equal("idle", c:txstatus())
    assert.equal(0, outbox.pending(c, "a"))

    ev = assert(outbox.claim(c, { "a", "b" }, 10))
    assert.same(b, ids_of(ev))
    assert.is_true(outbox.finish(c, { b[1] }, {}))
    assert.equal(0, outbox.pending(c, "b"))
    assert.equal(1, outbox.pending(c, "other"))
    assert.same(other, ids_of(assert(c:exec("SELECT id FROM pglisten.outbox"))))
  end)

  it("commits at once when nothing is due and returns an empty array", function()
    local c = fresh()
    publish_n(c, "x", 1)
    local ev = assert(outbox.claim(c, { "nothing here" }, 10))
    assert.same({}, ev)
    assert.equal("idle", c:txstatus())
    assert.same({}, assert(outbox.claim(c, {}, 10)))
    assert.equal("idle", c:txstatus())
  end)

  it("refuses to claim inside an open transaction, and finish without a claim", function()
    local c = fresh()
    publish_n(c, "x", 1)
    assert(outbox.claim(c, { "x" }, 1))
    local ok, err = outbox.claim(c, { "x" }, 1)
    assert.is_nil(ok); assert.matches("already inside a transaction", err)
    assert.is_true(outbox.finish(c, {}))
    ok, err = outbox.finish(c, {})
    assert.is_nil(ok); assert.matches("no claim", err)
    assert.equal(1, outbox.pending(c, "x")) -- nothing was done
    -- a claim whose transaction broke is rolled back, not committed
    local ev = assert(outbox.claim(c, { "x" }, 1))
    assert.is_nil(c:exec("SELECT 1/0"))
    ok, err = outbox.finish(c, ids_of(ev))
    assert.is_nil(ok); assert.matches("had failed", err)
    assert.equal("idle", c:txstatus())
    assert.equal(1, outbox.pending(c, "x"))
  end)

  it("reschedules a failure: attempts + 1, last_error kept, run_at in the future", function()
    local c = fresh()
    local id = publish_n(c, "retry", 1)[1]
    local ev = assert(outbox.claim(c, { "retry" }, 10))
    assert.same({ id }, ids_of(ev))
    assert.is_true(outbox.finish(c, {}, {
      { id = id, error = "boom: it's \"bad\"", attempts = ev[1].attempts, max_attempts = 5, backoff = 60 } }))
    local row = one(c, [[SELECT attempts, last_error,
      run_at > now() + interval '55 seconds' AND run_at < now() + interval '65 seconds' AS later
      FROM pglisten.outbox WHERE id = $1]], id)
    assert.same({ attempts = 1, last_error = "boom: it's \"bad\"", later = true }, row)
    -- not due: an immediate claim returns nothing and holds no transaction
    assert.same({}, assert(outbox.claim(c, { "retry" }, 10)))
    assert.equal("idle", c:txstatus())

    -- a short backoff is honoured
    assert(c:exec("UPDATE pglisten.outbox SET run_at = now() WHERE id = $1", id))
    ev = assert(outbox.claim(c, { "retry" }, 10))
    assert.equal(1, ev[1].attempts)
    assert.equal("boom: it's \"bad\"", ev[1].last_error)
    assert.is_true(outbox.finish(c, {},
      { { id = id, error = "again", attempts = 1, max_attempts = 5, backoff = 0.5 } }))
    assert.same({}, assert(outbox.claim(c, { "retry" }, 10)))
    H.sleep(0.7)
    ev = assert(outbox.claim(c, { "retry" }, 10))
    assert.same({ id }, ids_of(ev))
    assert.equal(2, ev[1].attempts)
    assert.equal("again", ev[1].last_error)
    assert.is_true(outbox.finish(c, { id }))
    assert.equal(0, outbox.pending(c))
    assert.same({}, assert(outbox.dead(c, "retry")))
  end)

  it("moves an event to pglisten.dead after max_attempts, with its last error", function()
    local c = fresh()
    local id = publish_n(c, "doomed", 1)[1]
    local keep = publish_n(c, "doomed", 1)[1]
    for attempt = 1, 3 do
      local ev = assert(outbox.claim(c, { "doomed" }, 1))
      assert.same({ id }, ids_of(ev))
      assert.equal(attempt - 1, ev[1].attempts)
      assert.is_true(outbox.finish(c, {}, { { id = id, error = "fail " .. attempt,
        attempts = ev[1].attempts, max_attempts = 3, backoff = 0 } }))
      if attempt < 3 then
        assert.equal(attempt, one(c, "SELECT attempts FROM pglisten.outbox WHERE id = $1", id).attempts)
        assert.same({}, assert(outbox.dead(c, "doomed")))
      end
    end
    assert.equal(0, one(c, "SELECT count(*) AS n FROM pglisten.outbox WHERE id = $1", id).n)
    assert.equal(1, outbox.pending(c, "doomed")) -- the other one is untouched
    local dead = assert(outbox.dead(c, "doomed"))
    assert.equal(1, #dead)
    assert.equal(id, dead[1].id)
    assert.equal("doomed", dead[1].channel)
    assert.equal("event 1", dead[1].payload)
    assert.equal(3, dead[1].attempts)
    assert.equal("fail 3", dead[1].last_error)
    assert.is_string(dead[1].failed_at)
    assert.is_string(dead[1].created_at)
    assert.same({}, assert(outbox.dead(c, "someone else")))
    assert.equal(1, #assert(outbox.dead(c)))
    -- the other event is still claimable
    assert.same({ keep }, ids_of(assert(outbox.claim(c, { "doomed" }, 5))))
    assert.is_true(outbox.finish(c, { keep }))
  end)

  it("handles done and failed events in one finish", function()
    local c = fresh()
    local ids = publish_n(c, "mix", 3)
    assert(outbox.claim(c, { "mix" }, 3))
    assert.is_true(outbox.finish(c, { ids[1] }, {
      { id = ids[2], error = "retry me", attempts = 0, max_attempts = 5, backoff = 30 },
      { id = ids[3], error = "bury me", attempts = 0, max_attempts = 1, backoff = 30 },
    }))
    assert.same({ ids[2] }, ids_of(assert(c:exec("SELECT id FROM pglisten.outbox"))))
    assert.same({ ids[3] }, ids_of(assert(outbox.dead(c, "mix"))))
  end)

  it("rolls back everything when the claim's connection is lost: the events are claimable again", function()
    local c, conninfo = fresh()
    local ids = publish_n(c, "rb", 2)
    local a = connect(conninfo)
    assert(outbox.claim(a, { "rb" }, 2))
    assert(c:exec("SELECT pg_terminate_backend($1)", a:pid()))
    local ok, err = outbox.finish(a, { ids[1] }, {
      { id = ids[2], error = "x", attempts = 0, max_attempts = 1, backoff = 0 } })
    assert.is_nil(ok)
    assert.is_string(err)
    local got = H.eventually(function()
      local ev = assert(outbox.claim(c, { "rb" }, 5))
      if #ev > 0 then return ev end
    end, 10)
    assert.same(ids, ids_of(got))
    assert.equal(0, got[2].attempts)
    assert.is_true(outbox.finish(c, ids))
  end)

  it("gives two connections claiming at once disjoint rows (SKIP LOCKED)", function()
    local c, conninfo = fresh()
    local ids = publish_n(c, "work", 6)
    local a, b, z = connect(conninfo), connect(conninfo), connect(conninfo)
    local ea = assert(outbox.claim(a, { "work" }, 3))
    local eb = assert(outbox.claim(b, { "work" }, 10)) -- A has not finished
    assert.same({ ids[1], ids[2], ids[3] }, ids_of(ea))
    assert.same({ ids[4], ids[5], ids[6] }, ids_of(eb))
    assert.same({}, assert(outbox.claim(z, { "work" }, 10)))
    assert.equal(6, outbox.pending(z, "work")) -- claimed is not deleted
    assert.is_true(outbox.finish(b, ids_of(eb)))
    assert.is_true(outbox.finish(a, ids_of(ea)))
    assert.equal(0, outbox.pending(z, "work"))
  end)

  it("makes the rows of a terminated claimer claimable again", function()
    local c, conninfo = fresh()
    local ids = publish_n(c, "crash", 3)
    local a, b = connect(conninfo), connect(conninfo)
    assert.same(ids, ids_of(assert(outbox.claim(a, { "crash" }, 10))))
    assert.same({}, assert(outbox.claim(b, { "crash" }, 10)))
    assert(b:exec("SELECT pg_terminate_backend($1)", a:pid()))
    local got = H.eventually(function()
      local ev = assert(outbox.claim(b, { "crash" }, 10))
      if #ev > 0 then return ev end
    end, 10)
    assert.same(ids, ids_of(got))
    -- the dead claimer's finish fails and changes nothing
    local ok, err = outbox.finish(a, ids)
    assert.is_nil(ok)
    assert.is_string(err)
    assert.is_true(outbox.finish(b, {}, { { id = ids[1], error = "after crash", attempts = 0,
      max_attempts = 5, backoff = 0 } }))
    assert.equal(3, outbox.pending(b, "crash"))
    assert.equal(1, one(b, "SELECT attempts FROM pglisten.outbox WHERE id = $1", ids[1]).attempts)
  end)

  local odd = { "Mixed Case", "sp ace", 'a"b', "x\\y", "a,b", "{x}", "NULL", "a'b", " lead", "é, \"\\\"" }
  it("passes channel names with odd characters in the array parameter", function()
    local c = fresh()
    local want = {}
    for i, ch in ipairs(odd) do want[i] = assert(outbox.publish(c, ch, ch)) end
    publish_n(c, "mixed case", 1) -- not "Mixed Case"
    publish_n(c, "x", 1)
    local ev = assert(outbox.claim(c, odd, 100))
    assert.same(want, ids_of(ev))
    for i, e in ipairs(ev) do
      assert.equal(odd[i], e.channel)
      assert.equal(odd[i], e.payload)
    end
    assert.is_true(outbox.finish(c, ids_of(ev)))
    for _, ch in ipairs({ "Mixed Case", "NULL", "a,b" }) do
      assert.equal(0, outbox.pending(c, ch))
    end
    assert.equal(2, outbox.pending(c))
    -- one at a time, each name finds only its own event
    for _, ch in ipairs(odd) do assert(outbox.publish(c, ch, ch)) end
    for _, ch in ipairs(odd) do
      local one_ev = assert(outbox.claim(c, { ch }, 100))
      assert.equal(1, #one_ev, ch)
      assert.equal(ch, one_ev[1].channel)
      assert.is_true(outbox.finish(c, ids_of(one_ev)))
    end
  end)

  it("raises on arguments of the wrong type", function()
    local c = fresh()
    assert.has_error(function() outbox.claim(c, "a", 1) end)
    assert.has_error(function() outbox.claim(c, { "a", 1 }, 1) end)
    assert.has_error(function() outbox.claim(c, { "a" }, 0) end)
    assert.has_error(function() outbox.claim(c, { "a" }, 1.5) end)
    assert.has_error(function() outbox.claim(nil, { "a" }, 1) end)
    assert.has_error(function() outbox.finish(c, { "1" }) end)
    assert.has_error(function() outbox.finish(c, { 1.5 }) end)
    assert.has_error(function() outbox.finish(c, {}, { { id = "1" } }) end)
    assert.has_error(function() outbox.finish(c, {}, { { id = 1, backoff = -1 } }) end)
    assert.has_error(function() outbox.pending(c, 5) end)
    assert.equal("idle", c:txstatus())
  end)
end)

describe("outbox.backoff", function()
  it("doubles from base up to cap", function()
    local cases = {
      { { 1 }, 1 }, { { 2 }, 2 }, { { 3 }, 4 }, { { 9 }, 256 }, { { 10 }, 300 }, { { 5000 }, 300 },
      { { 0 }, 1 }, { { 1, 0.5 }, 0.5 }, { { 4, 0.5 }, 4 }, { { 4, 2, 10 }, 10 }, { { 3, 2, 10 }, 8 },
    }
    for _, case in ipairs(cases) do
      assert.equal(case[2], outbox.backoff(table.unpack(case[1])),
        "backoff(" .. table.concat(case[1], ", ") .. ")")
    end
    assert.has_error(function() outbox.backoff("1") end)
  end)
end)

describe("pglisten.notify_trigger", function()
  local function table_with_trigger(c, args, ddl)
    assert(c:exec(ddl or "CREATE TABLE items (id int PRIMARY KEY, name text, n int)"))
    local tbl = (ddl or "CREATE TABLE items"):match("CREATE TABLE ([%w_%.\"]+)")
    assert(c:exec(("CREATE TRIGGER sync AFTER INSERT OR UPDATE OR DELETE ON %s "
      .. "FOR EACH ROW EXECUTE FUNCTION pglisten.notify_trigger(%s)"):format(tbl, args)))
  end

  local function next_event(l)
    local note, err = l:wait(5)
    assert(note, err)
    return json.decode(note.payload), note
  end

  it("sends INSERT, UPDATE and DELETE events with op, schema, table, new and old", function()
    local c, conninfo = fresh()
    local l = connect(conninfo)
    assert(l:listen("items_changed"))
    table_with_trigger(c, "'items_changed', 'notify', 'id'")
    assert(c:exec("INSERT INTO items VALUES (1, 'a', 10)"))
    local ev = next_event(l)
    assert.same({ op = "INSERT", schema = "public", table = "items",
      new = { id = 1, name = "a", n = 10 }, old = pg.null }, ev)
    assert(c:exec("UPDATE items SET name = 'b', n = NULL WHERE id = 1"))
    ev = next_event(l)
    assert.same({ op = "UPDATE", schema = "public", table = "items",
      new = { id = 1, name = "b", n = pg.null }, old = { id = 1, name = "a", n = 10 } }, ev)
    assert(c:exec("DELETE FROM items"))
    ev = next_event(l)
    assert.same({ op = "DELETE", schema = "public", table = "items",
      new = pg.null, old = { id = 1, name = "b", n = pg.null } }, ev)
    -- one event per row, and none for a rolled-back change
    assert(c:exec("INSERT INTO items SELECT g, 'x', g FROM generate_series(1, 3) g"))
    for i = 1, 3 do assert.equal(i, next_event(l).new.id) end
    assert(c:exec("BEGIN")); assert(c:exec("INSERT INTO items VALUES (9, 'no', 0)")); assert(c:exec("ROLLBACK"))
    assert.same({ nil, "timeout" }, { l:wait(0.3) })
    assert.equal(0, outbox.pending(c)) -- 'notify' mode leaves the outbox alone
  end)

  it("names another schema and a mixed-case table and channel as they are", function()
    local c, conninfo = fresh()
    local l = connect(conninfo)
    assert(l:listen("Items Changed"))
    assert(c:exec([[CREATE SCHEMA "Shop"]]))
    table_with_trigger(c, "'Items Changed', 'notify'", [[CREATE TABLE "Shop"."Items" (id int PRIMARY KEY)]])
    assert(c:exec([[INSERT INTO "Shop"."Items" VALUES (5)]]))
    local ev, note = next_event(l)
    assert.equal("Items Changed", note.channel)
    assert.same({ op = "INSERT", schema = "Shop", table = "Items", new = { id = 5 }, old = pg.null }, ev)
  end)

  it("sends a row just under the limit whole", function()
    local c, conninfo = fresh()
    local l = connect(conninfo)
    assert(l:listen("docs"))
    table_with_trigger(c, "'docs', 'notify', 'id'", "CREATE TABLE docs (id int PRIMARY KEY, body text)")
    local body = ("b"):rep(7800)
    assert(c:exec("INSERT INTO docs VALUES (1, $1)", body))
    local ev, note = next_event(l)
    assert.is_true(#note.payload < 8000)
    assert.is_nil(ev.keys_only)
    assert.equal(body, ev.new.body)
  end)

  it("sends only the keys of a 20 kB row, and the writer's INSERT succeeds", function()
    local c, conninfo = fresh()
    local l = connect(conninfo)
    assert(l:listen("docs"))
    table_with_trigger(c, "'docs', 'notify', 'id'", "CREATE TABLE docs (id int PRIMARY KEY, body text)")
    local big = ("x"):rep(20000)
    local r = assert(c:exec("INSERT INTO docs VALUES (7, $1)", big))
    assert.equal(1, r.affected)
    local ev, note = next_event(l)
    assert.is_true(#note.payload < 8000)
    assert.same({ op = "INSERT", schema = "public", table = "docs", new = { id = 7 }, old = pg.null,
      keys_only = true }, ev)
    assert.equal(20000, one(c, "SELECT length(body) AS n FROM docs WHERE id = 7").n)
    -- an UPDATE that changes the key sends both keys
    assert(c:exec("UPDATE docs SET id = 8"))
    assert.same({ op = "UPDATE", schema = "public", table = "docs", new = { id = 8 }, old = { id = 7 },
      keys_only = true }, (next_event(l)))
    assert(c:exec("DELETE FROM docs"))
    assert.same({ op = "DELETE", schema = "public", table = "docs", new = pg.null, old = { id = 8 },
      keys_only = true }, (next_event(l)))
  end)

  it("defaults the keys to the primary key, in its column order", function()
    local c, conninfo = fresh()
    local l = connect(conninfo)
    assert(l:listen("pk"))
    table_with_trigger(c, "'pk', 'notify'",
      "CREATE TABLE pkt (a int, body text, b text, PRIMARY KEY (b, a))")
    assert(c:exec("INSERT INTO pkt VALUES (1, $1, 'k')", ("y"):rep(20000)))
    local ev = next_event(l)
    assert.same({ op = "INSERT", schema = "public", table = "pkt", new = { a = 1, b = "k" }, old = pg.null,
      keys_only = true }, ev)
  end)

  it("says too_large when even the keys do not fit, or there are none", function()
    local c, conninfo = fresh()
    local l = connect(conninfo)
    assert(l:listen("huge"))
    table_with_trigger(c, "'huge', 'notify', 'body'", "CREATE TABLE bigkey (id int PRIMARY KEY, body text)")
    table_with_trigger(c, "'huge', 'notify'", "CREATE TABLE nokey (body text)")
    assert(c:exec("INSERT INTO bigkey VALUES (1, $1)", ("z"):rep(20000)))
    assert.same({ op = "INSERT", schema = "public", table = "bigkey", keys_only = true, too_large = true },
      (next_event(l)))
    assert(c:exec("INSERT INTO nokey VALUES ($1)", ("z"):rep(20000)))
    assert.same({ op = "INSERT", schema = "public", table = "nokey", keys_only = true, too_large = true },
      (next_event(l)))
    assert.equal(1, one(c, "SELECT count(*) AS n FROM nokey").n)
  end)

  it("puts the whole 20 kB row into pglisten.outbox in 'durable' mode", function()
    local c, conninfo = fresh()
    local l = connect(conninfo)
    assert(l:listen("docs", outbox.WAKEUP_CHANNEL))
    table_with_trigger(c, "'docs', 'durable', 'id'", "CREATE TABLE docs (id int PRIMARY KEY, body text)")
    local big = ("x"):rep(20000)
    assert(c:exec("INSERT INTO docs VALUES (7, $1)", big))
    local note = assert(l:wait(5))
    assert.equal("pglisten_outbox", note.channel)
    assert.equal("docs", note.payload)
    assert.same({ nil, "timeout" }, { l:wait(0.3) }) -- nothing on "docs" itself
    local ev = assert(outbox.claim(c, { "docs" }, 10))
    assert.equal(1, #ev)
    assert.same({ op = "INSERT", schema = "public", table = "docs", new = { id = 7, body = big }, old = pg.null },
      json.decode(ev[1].payload))
    assert.is_true(outbox.finish(c, ids_of(ev)))
    assert(c:exec("DELETE FROM docs"))
    ev = assert(outbox.claim(c, { "docs" }, 10))
    assert.same({ op = "DELETE", schema = "public", table = "docs", new = pg.null, old = { id = 7, body = big } },
      json.decode(ev[1].payload))
    assert.is_true(outbox.finish(c, ids_of(ev)))
  end)

  it("raises at trigger time on an invalid mode, a missing mode or a BEFORE trigger", function()
    local c = fresh()
    table_with_trigger(c, "'items', 'bogus'")
    local r, err, code = c:exec("INSERT INTO items VALUES (1, 'a', 1)")
    assert.is_nil(r)
    assert.equal("22023", code)
    assert.matches('invalid mode "bogus"', err)
    assert.equal(0, one(c, "SELECT count(*) AS n FROM items").n)

    assert(c:exec("CREATE TABLE one_arg (id int)"))
    assert(c:exec([[CREATE TRIGGER t AFTER INSERT ON one_arg FOR EACH ROW
      EXECUTE FUNCTION pglisten.notify_trigger('one_arg')]]))
    r, err = c:exec("INSERT INTO one_arg VALUES (1)")
    assert.is_nil(r); assert.matches("channel, mode", err)

    assert(c:exec("CREATE TABLE before_t (id int)"))
    assert(c:exec([[CREATE TRIGGER t BEFORE INSERT ON before_t FOR EACH ROW
      EXECUTE FUNCTION pglisten.notify_trigger('b', 'notify')]]))
    r, err = c:exec("INSERT INTO before_t VALUES (1)")
    assert.is_nil(r); assert.matches("must be AFTER", err)
  end)
end)
