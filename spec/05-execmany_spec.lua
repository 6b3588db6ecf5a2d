-- conn:execmany(sql, list): one statement for many parameter tuples, in
-- libpq's pipeline mode, in one transaction (or a savepoint of the caller's).
local H = require "helpers"
local pg = H.pg

-- Idle, out of pipeline mode and usable: a multi-statement query only runs
-- through the simple protocol, which pipeline mode refuses.
local function assert_usable(c)
  assert.equal("ok", c:status())
  assert.equal("idle", c:txstatus())
  local r = assert(c:exec("SELECT 1 AS one; SELECT 2 AS two"))
  assert.equal(2, r[1].two)
end

local function count(c, tbl)
  return assert(c:exec("SELECT count(*) AS n FROM " .. tbl))[1].n
end

local function rows(n, fn)
  local list = {}
  for i = 1, n do list[i] = fn(i) end
  return list
end

describe("conn:execmany", function()
  local c
  before_each(function()
    c = H.connect()
    c:settimeout(60) -- a wedged pipeline fails the spec instead of hanging it
    assert(c:exec("CREATE TEMP TABLE em (id int PRIMARY KEY, v text, big bigint, tx text)"))
  end)
  after_each(function() c:close() end)

  it("inserts 10,000 rows in one call, in one transaction", function()
    local list = rows(10000, function(i) return { i, "v" .. i, i * 1000003 } end)
    local n = c:execmany("INSERT INTO em (id, v, big, tx) VALUES ($1, $2, $3, pg_current_xact_id()::text)", list)
    assert.equal(10000, n)
    assert.equal("integer", math.type(n))
    local r = assert(c:exec([[SELECT count(*) AS n, sum(id) AS s, sum(big) AS b,
      count(DISTINCT tx) AS txs, max(v) FILTER (WHERE id = 9999) AS v FROM em]]))[1]
    assert.equal(10000, r.n)
    assert.equal(50005000, r.s)
    assert.equal(50005000 * 1000003, r.b)
    assert.equal("v9999", r.v)
    assert.equal(1, r.txs) -- every row written by one transaction
    assert_usable(c)
  end)

  it("returns the sum of the affected-row counts, not the number of tuples", function()
    assert(c:exec("INSERT INTO em (id) SELECT g FROM generate_series(1, 100) g"))
    -- 50 even ids, then 20 multiples of 5 (10 of them even, updated again), then none
    assert.equal(70, c:execmany("UPDATE em SET v = $2 WHERE id % $1 = 0", { { 2, "a" }, { 5, "b" }, { 1000, "c" } }))
    assert.equal(0, c:execmany("UPDATE em SET v = 'x' WHERE id = $1", { { -1 }, { -2 } }))
    assert.equal(3, c:execmany("SELECT $1::int AS x", { { 1 }, { 2 }, { 3 } }))
  end)

  it("converts values as exec does: NULL, booleans, integers, floats, strings, JSON", function()
    assert(c:exec("CREATE TEMP TABLE mixed (k int, b bool, i bigint, f float8, t text, j jsonb, n int)"))
    local sql = "INSERT INTO mixed VALUES ($1, $2, $3, $4, $5, $6, $7)"
    assert.equal(4, c:execmany(sql, {
      { 1, true, math.maxinteger, 0.1, "it's \"q\" \\ $1", { a = { 1, 2 } }, nil, n = 7 },
      { 2, false, math.mininteger, -math.huge, "", { 1, "two" }, pg.null },
      table.pack(3, nil, nil, nil, nil, nil, nil),      -- holes, with n
      { 4, pg.null, 0, 1e300, "héllo — 日本語", { s = "x" }, 42 },
    }))
    local r = assert(c:exec("SELECT * FROM mixed ORDER BY k"))
    assert.equal(4, r.n)
    assert.same({ true, false, pg.null, pg.null }, { r[1].b, r[2].b, r[3].b, r[4].b })
    assert.same({ math.maxinteger, math.mininteger, pg.null, 0 }, { r[1].i, r[2].i, r[3].i, r[4].i })
    assert.equal(0.1, r[1].f); assert.equal(-math.huge, r[2].f); assert.equal(1e300, r[4].f)
    assert.equal("it's \"q\" \\ $1", r[1].t); assert.equal("", r[2].t); assert.equal("héllo — 日本語", r[4].t)
    assert.same({ a = { 1, 2 } }, r[1].j); assert.same({ 1, "two" }, r[2].j); assert.same({ s = "x" }, r[4].j)
    assert.same({ pg.null, pg.null, pg.null, 42 }, { r[1].n, r[2].n, r[3].n, r[4].n })
    assert.equal(pg.null, r[3].t)
  end)

  it("returns 0 for an empty list without a round trip", function()
    -- the server would reject this statement; nothing is sent, so nothing fails
    assert.equal(0, c:execmany("THIS IS NOT SQL", {}))
    assert.equal(0, c:execmany("INSERT INTO em (id) VALUES ($1)", {}))
    assert_usable(c)
  end)

  it("reports the failing tuple and keeps nothing of the batch (23505 at 500)", function()
    local list = rows(1000, function(i) return { i, "v" .. i } end)
    list[500] = { 1, "duplicate of tuple 1" }
    local n, err, code, index = c:execmany("INSERT INTO em (id, v) VALUES ($1, $2)", list)
    assert.is_nil(n)
    assert.matches("duplicate key value violates unique constraint", err)
    assert.equal("23505", code)
    assert.equal(500, index)
    assert.equal(0, count(c, "em")) -- tuples 1..499 were rolled back with the rest
    assert_usable(c)
    -- and the connection takes the corrected batch
    list[500] = { 500, "v500" }
    assert.equal(1000, c:execmany("INSERT INTO em (id, v) VALUES ($1, $2)", list))
    assert.equal(1000, count(c, "em"))
  end)

  it("reports a failure of the first and of the last tuple by index", function()
    assert(c:exec("INSERT INTO em (id) VALUES (7)"))
    local _, _, code, index = c:execmany("INSERT INTO em (id) VALUES ($1)", { { 7 }, { 8 } })
    assert.equal("23505", code); assert.equal(1, index)
    _, _, code, index = c:execmany("INSERT INTO em (id) VALUES ($1)", { { 8 }, { 9 }, { 7 } })
    assert.equal("23505", code); assert.equal(3, index)
    -- a tuple with fewer values than the statement has parameters
    _, _, code, index = c:execmany("INSERT INTO em (id, v) VALUES ($1, $2)", { { 10, "a" }, { 11 } })
    assert.equal("08P01", code); assert.equal(2, index)
    assert.equal(1, count(c, "em"))
    assert_usable(c)
  end)

  it("reports a syntax error in the statement with no index", function()
    local n, err, code, index = c:execmany("INSERT INTO em (id) VALUES ($1", { { 1 }, { 2 } })
    assert.is_nil(n)
    assert.matches("syntax error", err)
    assert.equal("42601", code)
    assert.is_nil(index)
    n, err, code, index = c:execmany("INSERT INTO no_such_table VALUES ($1)", { { 1 } })
    assert.is_nil(n); assert.equal("42P01", code); assert.is_nil(index)
    assert.matches("no_such_table", err)
    assert_usable(c)
  end)

  it("reports a failure at COMMIT (deferred constraint) with no index", function()
    assert(c:exec("CREATE TEMP TABLE d (id int, CONSTRAINT d_u UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)"))
    local n, _, code, index = c:execmany("INSERT INTO d VALUES ($1)", { { 1 }, { 2 }, { 1 } })
    assert.is_nil(n)
    assert.equal("23505", code)
    assert.is_nil(index)
    assert.equal(0, count(c, "d"))
    assert_usable(c)
  end)

  it("refuses a string with a zero byte, naming the tuple, and keeps nothing", function()
    local n, err, code, index = c:execmany("INSERT INTO em (id, v) VALUES ($1, $2)",
      { { 1, "a" }, { 2, "b" }, { 3, "c\0d" }, { 4, "e" } })
    assert.is_nil(n)
    assert.matches("tuple 3: parameter %$2 contains a zero byte", err)
    assert.is_nil(code)
    assert.equal(3, index)
    assert.equal(0, count(c, "em"))
    assert_usable(c)
  end)

  it("keeps a write-heavy, read-heavy batch moving (no pipeline deadlock)", function()
    -- 20 MB to the server and 60 MB back: far beyond both socket buffers, so
    -- the server blocks on its output unless we read while we write
    local pad = ("p"):rep(1000)
    local list = rows(20000, function(i) return { i, pad } end)
    local t0 = H.now()
    local n, err = c:execmany("SELECT $1::int AS v, repeat('x', 2000) || $2 AS pad", list)
    assert.equal(20000, n, err)
    assert.is_true(H.now() - t0 < 30)
    assert_usable(c)
  end)

  it("does not lose notifications that arrive while it runs", function()
    local s = H.connect()
    assert(c:listen("em_during"))
    for i = 1, 50 do assert(s:notify("em_during", "before" .. i)) end -- unread on the socket
    -- another client notifies while the batch sleeps through its 20 tuples
    os.execute("(sleep 0.3; psql -qX -c \"SELECT pg_notify('em_during', 'while' || g) FROM generate_series(1, 50) g\" "
      .. ">/dev/null 2>&1) &")
    local list = rows(20, function(i) return { 0.1, "self" .. i } end)
    -- the batch notifies too: delivered at its COMMIT, inside the pipeline's answer
    assert.equal(20, c:execmany("SELECT pg_sleep($1), pg_notify('em_during', $2)", list))
    local got = {}
    H.eventually(function()
      local note = c:wait(0.2)
      while note do
        got[#got + 1] = note.payload
        note = c:wait(0)
      end
      return #got >= 120
    end, 10, 0)
    assert.equal(120, #got)
    local seen = {}
    for _, p in ipairs(got) do seen[p] = (seen[p] or 0) + 1 end
    for i = 1, 50 do
      assert.equal("before" .. i, got[i]) -- in server order
      assert.equal(1, seen["while" .. i])
    end
    for i = 1, 20 do assert.equal(1, seen["self" .. i]) end
    s:close()
  end)

  it("bounds each wait by the query timeout, then heals", function()
    c:settimeout(0.3)
    local t0 = H.now()
    local n, err, code = c:execmany("SELECT pg_sleep($1)", { { 0 }, { 5 }, { 0 } })
    assert.is_nil(n)
    assert.matches("^timeout", err)
    assert.equal("08006", code)
    assert.is_true(H.now() - t0 < 1.5, "took " .. (H.now() - t0))
    assert.equal("bad", c:status())
    c:settimeout(60)
    assert.equal(2, c:execmany("SELECT $1::int", { { 1 }, { 2 } }))
    assert.equal("idle", c:txstatus())
  end)

  describe("inside conn:transaction", function()
    it("runs under a savepoint: a failure undoes only the batch", function()
      local res = { c:transaction(function(conn)
        assert(conn:exec("INSERT INTO em (id, v) VALUES (1, 'outer before')"))
        local n, err, code, index = conn:execmany("INSERT INTO em (id, v) VALUES ($1, $2)",
          { { 2, "batch" }, { 3, "batch" }, { 1, "batch dup" }, { 4, "batch" } })
        assert.is_nil(n); assert.is_string(err)
        assert.equal("23505", code); assert.equal(3, index)
        assert.equal("intrans", conn:txstatus()) -- still usable, not aborted
        assert(conn:exec("INSERT INTO em (id, v) VALUES (5, 'outer after')"))
        assert.equal(2, conn:execmany("INSERT INTO em (id, v) VALUES ($1, $2)", { { 6, "b2" }, { 7, "b2" } }))
        return "done"
      end) }
      assert.same({ "done" }, res)
      assert.equal("idle", c:txstatus())
      local r = assert(c:exec("SELECT id, v FROM em ORDER BY id"))
      assert.same({ 1, 5, 6, 7 }, { r[1].id, r[2].id, r[3].id, r[4].id })
      assert.equal(4, r.n)
      assert.equal("outer before", r[1].v)
    end)

    it("commits and rolls back with the outer transaction, and releases its savepoint", function()
      assert(c:transaction(function(conn)
        assert.equal(2, conn:execmany("INSERT INTO em (id) VALUES ($1)", { { 1 }, { 2 } }))
        -- released: nothing of that name is left to roll back to
        local ok, _, code = conn:exec("SAVEPOINT probe; ROLLBACK TO SAVEPOINT pgl_execmany")
        assert.is_nil(ok); assert.equal("3B001", code)
        return nil, "roll back"
      end) == nil)
      assert.equal(0, count(c, "em"))
      assert(c:transaction(function(conn)
        return conn:execmany("INSERT INTO em (id) VALUES ($1)", { { 1 }, { 2 } })
      end))
      assert.equal(2, count(c, "em"))
    end)

    it("refuses to run in a failed transaction", function()
      assert(c:exec("BEGIN"))
      assert.is_nil(c:exec("SELECT 1/0"))
      local n, _, code, index = c:execmany("INSERT INTO em (id) VALUES ($1)", { { 1 } })
      assert.is_nil(n); assert.equal("25P02", code); assert.is_nil(index)
      assert.equal("inerror", c:txstatus())
      assert(c:exec("ROLLBACK"))
      assert_usable(c)
    end)

    -- {savepoint = false}: for callers that roll everything back on failure
    -- (pglisten.apply); no subtransaction, and a failure aborts the block.
    local INS = "INSERT INTO em (id, v) VALUES ($1, $2)"
    local function top_level_rows(conn)
      -- rows written by the top-level transaction itself, not a subtransaction
      return assert(conn:exec("SELECT count(*) FILTER (WHERE xmin::text = pg_current_xact_id()::text) AS top, "
        .. "count(*) AS n FROM em"))[1]
    end

    it("with savepoint = false runs in the caller's transaction itself, no subtransaction", function()
      local res = table.pack(c:transaction(function(conn)
        assert.equal(3, conn:execmany(INS, { { 1, "a" }, { 2, "b" }, { 3, "c" } }, { savepoint = false }))
        local r = top_level_rows(conn)
        assert.equal(3, r.n); assert.equal(3, r.top)
        -- the default keeps its savepoint: those rows are a subtransaction's
        assert.equal(1, conn:execmany(INS, { { 4, "d" } }))
        r = top_level_rows(conn)
        assert.equal(4, r.n); assert.equal(3, r.top)
        local ok, _, code = conn:exec("SAVEPOINT probe; ROLLBACK TO SAVEPOINT pgl_execmany")
        assert.is_nil(ok); assert.equal("3B001", code)
        return nil, "roll back"
      end))
      res.n = nil
      -- (an assertion failing inside fn would make transaction() return nil, err too)
      assert.same({ nil, "roll back" }, res)
      assert.equal(0, count(c, "em"))
      assert(c:transaction(function(conn)
        return conn:execmany(INS, { { 1, "a" }, { 2, "b" } }, { savepoint = false })
      end))
      assert.equal(2, count(c, "em"))
      assert_usable(c)
    end)

    it("with savepoint = false a failed tuple aborts the caller's transaction: nothing commits", function()
      assert(c:exec("BEGIN"))
      assert(c:exec("INSERT INTO em (id, v) VALUES (1, 'outer')"))
      local n, err, code, index = c:execmany(INS, { { 2, "a" }, { 1, "dup" }, { 3, "c" } }, { savepoint = false })
      assert.is_nil(n); assert.matches("duplicate key", err)
      assert.equal("23505", code); assert.equal(2, index)
      assert.equal("inerror", c:txstatus())
      local _, _, c2 = c:exec("SELECT 1")
      assert.equal("25P02", c2)
      assert(c:exec("COMMIT")) -- the server turns it into a ROLLBACK
      assert.equal(0, count(c, "em"))
      assert_usable(c)
      local res = { c:transaction(function(conn)
        assert(conn:exec("INSERT INTO em (id, v) VALUES (1, 'outer')"))
        local ok, e2, k2 = conn:execmany(INS, { { 1, "dup" } }, { savepoint = false })
        assert.is_nil(ok)
        return nil, e2, k2
      end) }
      assert.is_nil(res[1]); assert.equal("23505", res[3])
      assert.equal(0, count(c, "em"))
      assert_usable(c)
    end)

    it("with savepoint = false a tuple refused on our side after others ran still aborts the block", function()
      local list = rows(3000, function(i) return { i, "v" } end)
      list[2500] = { 2500, "zero\0byte" }
      assert(c:exec("BEGIN"))
      local n, err, code, index = c:execmany(INS, list, { savepoint = false })
      assert.is_nil(n); assert.matches("tuple 2500: parameter %$2 contains a zero byte", err)
      assert.is_nil(code); assert.equal(2500, index)
      assert.equal("inerror", c:txstatus()) -- tuples 1..2499 ran: they must not commit
      assert(c:exec("COMMIT"))
      assert.equal(0, count(c, "em"))
      -- a value that raises, after tuples that ran
      assert(c:exec("BEGIN"))
      list[2500] = { 2500, function() end }
      local ok, rerr = pcall(c.execmany, c, INS, list, { savepoint = false })
      assert.is_false(ok); assert.matches("tuple 2500: cannot send a function", rerr)
      assert.equal("inerror", c:txstatus())
      assert(c:exec("COMMIT"))
      assert.equal(0, count(c, "em"))
      assert_usable(c)
    end)

    it("with savepoint = false outside a transaction changes nothing: the batch is its own", function()
      assert.equal(2, c:execmany(INS, { { 1, "a" }, { 2, "b" } }, { savepoint = false }))
      assert.equal(2, count(c, "em"))
      local n, _, code, index = c:execmany(INS, { { 3, "c" }, { 1, "dup" } }, { savepoint = false })
      assert.is_nil(n); assert.equal("23505", code); assert.equal(2, index)
      assert.equal(2, count(c, "em"))
      assert_usable(c)
    end)

    it("raises for options that are not {savepoint = boolean}, a typo included", function()
      assert.has_error(function() c:execmany(INS, { { 1, "a" } }, "fast") end,
        "bad argument #3 to 'execmany' (table expected, got string)")
      assert.has_error(function() c:execmany(INS, { { 1, "a" } }, { savpoint = false }) end,
        "bad argument #3 to 'execmany' (unknown option savpoint; the option is savepoint)")
      assert.has_error(function() c:execmany(INS, { { 1, "a" } }, { savepoint = "no" }) end,
        "bad argument #3 to 'execmany' (option savepoint is a string, boolean expected)")
      assert.has_error(function() c:execmany(INS, {}, { savpoint = false }) end)
      assert.equal(0, count(c, "em"))
      assert_usable(c)
    end)
  end)

  describe("a broken connection", function()
    local s
    before_each(function()
      s = H.connect()
      assert(s:exec("CREATE TABLE IF NOT EXISTS em_heal (id int PRIMARY KEY)"))
      assert(s:exec("TRUNCATE em_heal"))
    end)
    after_each(function() s:close() end)

    it("heals once the loss is known, outside a transaction", function()
      local old = c:pid()
      assert(s:exec("SELECT pg_terminate_backend($1)", old))
      local _, err, code = c:wait(2)
      assert.equal("08006", code, err)
      assert.equal("bad", c:status())
      assert.equal(2, c:execmany("INSERT INTO em_heal VALUES ($1)", { { 1 }, { 2 } }))
      assert.is_true(c:pid() ~= old)
      assert.equal(2, count(s, "em_heal"))
      assert_usable(c)
    end)

    it("heals right after pg_terminate_backend, at the latest on the next call", function()
      local old = c:pid()
      assert(s:exec("SELECT pg_terminate_backend($1)", old))
      H.sleep(0.2)
      local n, err, code = c:execmany("INSERT INTO em_heal VALUES ($1)", { { 1 }, { 2 } })
      if n == nil then -- the loss was only found by this call: reported as such
        assert.equal("08006", code, err)
        assert.equal(0, count(s, "em_heal"))
        n, err = c:execmany("INSERT INTO em_heal VALUES ($1)", { { 1 }, { 2 } })
      end
      assert.equal(2, n, err)
      assert.is_true(c:pid() ~= old)
      assert.equal(2, count(s, "em_heal"))
    end)

    it("reports a loss inside a transaction instead of healing", function()
      assert(c:exec("BEGIN"))
      assert(c:exec("INSERT INTO em_heal VALUES (100)"))
      assert(s:exec("SELECT pg_terminate_backend($1)", c:pid()))
      H.sleep(0.2)
      local n, err = c:execmany("INSERT INTO em_heal VALUES ($1)", { { 1 } })
      assert.is_nil(n)
      assert.is_string(err)
      assert.equal(0, count(s, "em_heal"))
    end)
  end)

  describe("misuse", function()
    it("raises for arguments of the wrong type", function()
      assert.has_error(function() c:execmany(42, {}) end, "bad argument #1 to 'execmany' (string expected, got number)")
      assert.has_error(function() c:execmany("SELECT $1", "x") end,
        "bad argument #2 to 'execmany' (table expected, got string)")
      assert.has_error(function() c:execmany("SELECT $1") end)
      assert_usable(c)
    end)

    it("raises for a bad tuple or value, after rolling back what was sent", function()
      local list = rows(3000, function(i) return { i } end)
      list[2500] = 42
      local ok, err = pcall(c.execmany, c, "INSERT INTO em (id) VALUES ($1)", list)
      assert.is_false(ok); assert.matches("tuple 2500 is a number, table expected", err)
      list[2500] = { function() end }
      ok, err = pcall(c.execmany, c, "INSERT INTO em (id) VALUES ($1)", list)
      assert.is_false(ok); assert.matches("tuple 2500: cannot send a function as parameter %$1", err)
      list[2500] = { 2500, n = "two" }
      ok, err = pcall(c.execmany, c, "INSERT INTO em (id) VALUES ($1)", list)
      assert.is_false(ok); assert.matches("field 'n'", err)
      assert.equal(0, count(c, "em"))
      assert_usable(c)
      -- inside a transaction the outer work survives the raise
      assert(c:exec("BEGIN"))
      assert(c:exec("INSERT INTO em (id) VALUES (-1)"))
      ok = pcall(c.execmany, c, "INSERT INTO em (id) VALUES ($1)", { { 1 }, { coroutine.create(print) } })
      assert.is_false(ok)
      assert.equal("intrans", c:txstatus())
      assert(c:exec("COMMIT"))
      assert.equal(1, count(c, "em"))
    end)

    it("raises for COPY, which cannot run in pipeline mode", function()
      assert.has_error(function() c:execmany("COPY em FROM STDIN", { {} }) end)
      assert.has_error(function()
        c:execmany(" /* a /* nested */ comment */ -- and a line\n copy em TO STDOUT", { {} })
      end)
      assert.equal(1, c:execmany("SELECT $1::int AS copy", { { 1 } }))
      assert_usable(c)
    end)

    it("raises on a closed connection", function()
      c:close()
      assert.has_error(function() c:execmany("SELECT 1", { {} }) end, "attempt to use a closed connection")
    end)
  end)
end)

-- The README's fastest batch recipe: the whole batch as one JSON parameter.
describe("a batch as one JSON parameter (json_populate_recordset)", function()
  it("writes every row exactly, nulls, 64-bit ids and unicode included, in one statement", function()
    local c = H.connect()
    assert(c:exec("CREATE TEMP TABLE jr (id bigint PRIMARY KEY, name text, score float8)"))
    local UPSERT = [[INSERT INTO jr (id, name, score)
      SELECT id, name, score FROM json_populate_recordset(NULL::jr, $1)
      ON CONFLICT (id) DO UPDATE SET name = excluded.name, score = excluded.score]]
    local list = {}
    for i = 1, 1000 do
      list[i] = { id = 9007199254740993 + i, name = (i % 7 == 0) and pg.null or ("n\"é\\" .. i), score = i / 3 }
    end
    local r = assert(c:exec(UPSERT, list))
    assert.equal(1000, r.affected)
    local got = assert(c:exec("SELECT id, name, score FROM jr ORDER BY id"))
    assert.equal(1000, got.n)
    for i = 1, 1000 do
      assert.equal(9007199254740993 + i, got[i].id)
      assert.equal(list[i].name, got[i].name)
      assert.equal(i / 3, got[i].score)
    end
    -- a batch holding two versions of one id must be collapsed first
    local ok, err, code = c:exec(UPSERT, { { id = 1, name = "a" }, { id = 1, name = "b" } })
    assert.is_nil(ok); assert.equal("21000", code); assert.matches("a second time", err)
    c:close()
  end)
end)
