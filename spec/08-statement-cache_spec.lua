-- exec's statement cache: a parameterized statement run a second time is
-- prepared (pglisten_<id>) and executed by name; the cache survives what
-- can happen to prepared statements on a long-lived connection.
local H = require "helpers"

local function ours(c)
  local r = assert(c:exec(
    "SELECT name, statement FROM pg_prepared_statements WHERE name LIKE 'pglisten\\_%' ORDER BY name"))
  return r
end

describe("statement cache", function()
  local c
  before_each(function()
    c = H.connect()
    c:settimeout(30)
    assert(c:exec("CREATE TEMP TABLE sc (id int PRIMARY KEY, v text)"))
  end)
  after_each(function() c:close() end)

  local UPSERT = "INSERT INTO sc (id, v) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = excluded.v"

  it("prepares a statement the second time it runs, then runs it by name", function()
    assert.is_true(c:statement_cache())
    assert.equal(1, assert(c:exec(UPSERT, 1, "a")).affected)
    assert.equal(0, #ours(c))                         -- once: unnamed, as without the cache
    assert.equal(1, assert(c:exec(UPSERT, 2, "b")).affected)
    local p = ours(c)
    assert.equal(1, #p)
    assert.equal(UPSERT, p[1].statement)
    for i = 3, 50 do assert.equal(1, assert(c:exec(UPSERT, i, "v" .. i)).affected) end
    assert.equal(1, #ours(c))                          -- still the one statement
    local r = assert(c:exec("SELECT count(*) AS n, max(v) FILTER (WHERE id = 50) AS v FROM sc"))[1]
    assert.equal(50, r.n); assert.equal("v50", r.v)
    -- results and errors come back as they do unprepared
    assert.equal("v7", assert(c:exec("SELECT id, v FROM sc WHERE id = $1", 7))[1].v)
    local rows = assert(c:exec("SELECT id, v FROM sc WHERE id = $1", 8))
    assert.same({ id = 8, v = "v8" }, { id = rows[1].id, v = rows[1].v })
    local ok, err, code = c:exec(UPSERT, "not a number", "x")
    assert.is_nil(ok); assert.matches("invalid input syntax", err); assert.equal("22P02", code)
    assert.equal(1, assert(c:exec(UPSERT, 1, "again")).affected)
  end)

  it("returns a statement's own error when preparing it fails, and stays usable", function()
    local bad = "SELECT nope FROM sc WHERE id = $1"
    for _ = 1, 3 do
      local ok, err, code = c:exec(bad, 1)
      assert.is_nil(ok); assert.matches('column "nope" does not exist', err); assert.equal("42703", code)
    end
    assert.equal(0, #ours(c))
    assert.equal("idle", c:txstatus())
    -- in a transaction the error aborts it, exactly as unprepared
    assert(c:exec("BEGIN"))
    assert.is_nil((c:exec(bad, 1)))
    local _, _, code = c:exec("SELECT $1::int AS x", 1)
    assert.equal("25P02", code)
    assert(c:exec("ROLLBACK"))
    assert.equal(5, assert(c:exec("SELECT $1::int AS x", 5))[1].x)
  end)

  it("survives DISCARD ALL, DEALLOCATE ALL behind its back, and a name already taken", function()
    for i = 1, 3 do assert(c:exec(UPSERT, i, "a")) end
    assert.equal(1, #ours(c))
    assert(c:exec("DISCARD ALL"))                   -- seen: the cache forgets
    assert.equal(0, #ours(c))
    assert(c:exec("CREATE TEMP TABLE sc (id int PRIMARY KEY, v text)"))  -- DISCARD dropped it
    for i = 1, 3 do assert(c:exec(UPSERT, i, "b")) end
    assert.equal(1, #ours(c))
    -- not seen: DEALLOCATE ALL after another statement in one simple query
    assert(c:exec("SELECT 1; DEALLOCATE ALL"))
    assert.equal(0, #ours(c))
    assert.equal(1, assert(c:exec(UPSERT, 4, "c")).affected)  -- 26000, then run again unnamed
    assert.equal(1, assert(c:exec(UPSERT, 5, "c")).affected)  -- seen anew
    assert.equal(0, #ours(c))
    assert.equal(1, assert(c:exec(UPSERT, 6, "c")).affected)  -- prepared again
    assert.equal(1, #ours(c))
    -- a user's own statement holding the next name: the cache steps aside
    local taken = ours(c)[1].name:gsub("%d+$", function(d) return tostring(tonumber(d) + 1) end)
    assert(c:exec("PREPARE " .. taken .. " AS SELECT 42 AS answer"))
    local q = "SELECT v FROM sc WHERE id = $1"
    for _ = 1, 3 do assert.equal("c", assert(c:exec(q, 4))[1].v) end
    assert.equal(42, assert(c:exec("EXECUTE " .. taken))[1].answer)
  end)

  it("runs a statement again unnamed when its result type changed (ALTER TABLE)", function()
    local q = "SELECT * FROM sc WHERE id = $1"
    assert(c:exec(UPSERT, 1, "a"))
    for _ = 1, 3 do assert.equal("a", assert(c:exec(q, 1))[1].v) end
    assert(c:exec("ALTER TABLE sc ADD COLUMN extra int DEFAULT 7"))
    local r = assert(c:exec(q, 1))                  -- 0A000 from the old plan, then unnamed
    assert.equal(7, r[1].extra)
    for _ = 1, 3 do assert.equal(7, assert(c:exec(q, 1))[1].extra) end
    -- inside a transaction block the caller gets the error, as any client would
    assert(c:exec("ALTER TABLE sc ADD COLUMN more int DEFAULT 8"))
    local old = ours(c)
    assert.equal(1, #old)
    assert(c:exec("BEGIN"))
    local ok, err, code = c:exec(q, 1)
    assert.is_nil(ok); assert.equal("0A000", code); assert.matches("result type", err)
    assert(c:exec("ROLLBACK"))
    assert.equal(8, assert(c:exec(q, 1))[1].more)
    -- the stale statement was deallocated once outside the transaction
    for _, row in ipairs(ours(c)) do assert.are_not.equal(old[1].name, row.name) end
  end)

  it("never runs a statement twice: an 0A000 raised while it runs is returned as it is", function()
    assert(c:exec("CREATE TEMP SEQUENCE runs"))
    assert(c:exec([[CREATE FUNCTION pg_temp.fails(x int) RETURNS int LANGUAGE plpgsql AS $$
      BEGIN PERFORM nextval('runs'); RAISE EXCEPTION 'not here' USING ERRCODE = 'feature_not_supported'; END $$]]))
    for _ = 1, 4 do
      local ok, err, code = c:exec("SELECT pg_temp.fails($1)", 1)
      assert.is_nil(ok); assert.equal("0A000", code); assert.matches("not here", err)
    end
    assert.equal(4, assert(c:exec("SELECT last_value FROM runs"))[1].last_value)
  end)

  it("leaks nothing on the server: DISCARD TEMP keeps the cache, one-off statements spare prepared ones", function()
    local q = "SELECT $1::int AS x"
    for _ = 1, 5 do
      assert(c:exec(q, 1)); assert(c:exec(q, 2))
      assert(c:exec("DISCARD TEMP"))
    end
    local p = ours(c)
    assert.equal(1, #p); assert.equal(q, p[1].statement)
    for i = 1, 40 do assert(c:exec(("SELECT $1::int + %d AS once"):format(i), 1)) end
    p = ours(c)
    assert.equal(1, #p); assert.equal(q, p[1].statement)
    assert.equal(3, assert(c:exec(q, 3))[1].x)
  end)

  it("keeps at most 32 statements, evicting the least recently used", function()
    local function q(i) return ("SELECT $1::int + %d AS x"):format(i) end
    for i = 1, 40 do
      for _ = 1, 2 do assert.equal(i + 1, assert(c:exec(q(i), 1))[1].x) end
    end
    local p = ours(c)
    assert.is_true(#p <= 32, #p .. " prepared")
    assert.is_true(#p >= 30, #p .. " prepared")
    local kept = {}
    for _, row in ipairs(p) do kept[row.statement] = true end
    assert.is_true(kept[q(40)]); assert.is_nil(kept[q(1)])
    for i = 1, 40 do assert.equal(i + 1, assert(c:exec(q(i), 1))[1].x) end
  end)

  it("starts empty after a reconnect (a new session)", function()
    for i = 1, 3 do assert(c:exec("SELECT $1::int AS x", i)) end
    local pid = c:pid()
    local admin = H.connect()
    assert(admin:exec("SELECT pg_terminate_backend($1)", pid))
    admin:close()
    assert(H.eventually(function() return not c:alive() end, 5))
    -- healed on the next call: the statement is unknown to the new session
    assert.equal(5, assert(c:exec("SELECT $1::int AS x", 5))[1].x)
    assert.are_not.equal(pid, c:pid())
    assert.equal(6, assert(c:exec("SELECT $1::int AS x", 6))[1].x)
    assert.equal(7, assert(c:exec("SELECT $1::int AS x", 7))[1].x)
    assert.equal(1, #ours(c))
  end)

  it("is off with statement_cache = false", function()
    local d = H.connect(nil, { statement_cache = false })
    assert.is_false(d:statement_cache())
    for i = 1, 5 do assert.equal(i, assert(d:exec("SELECT $1::int AS x", i))[1].x) end
    assert.equal(0, #ours(d))
    assert.is_false(d:statement_cache(true))
    for i = 1, 3 do assert(d:exec("SELECT $1::int AS x", i)) end
    assert.equal(1, #ours(d))
    d:close()
  end)
end)
