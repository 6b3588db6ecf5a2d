-- Spec 56 (breaker brk56): conn:exec_upto (8f94cb6), exec's results through
-- pgl_rows_append, and the snapshot's byte-bounded keyset pages.
-- BREAKs: max_bytes <= 0 takes no row (README: one row at least);
-- DEALLOCATE ALL and LISTEN through exec_upto are not followed as through
-- exec (statement cache, channels); a replica identity index whose
-- collation differs from the column's loses rows between pages.
-- exec's results were compared with 8f94cb6~1's by hand (12 queries, 6.9 MB
-- serialized: identical); the GUARD below pins them.
local H = require "spec.helpers"
local pg = H.pg
local C = require "spec.cdc_helpers"

describe("8f94cb6: conn:exec_upto", function()
  local c
  before_each(function() c = H.connect() end)
  after_each(function() c:close() end)

  -- BREAK.  README: "its rows taken ... while their values stay under
  -- max_bytes (one row at least, the last may pass it)".  max_bytes 0 or
  -- negative: no row at all, and rows.more = true (nor is it refused).
  it("BREAK: max_bytes 0 or negative still takes one row at least (or is refused)", function()
    for _, mb in ipairs({ 0, -1, math.mininteger }) do
      local ok, r = pcall(c.exec_upto, c, mb, "SELECT g FROM generate_series(1, 3) g")
      if ok and r then
        assert.is_true(r.n >= 1, ("max_bytes %d: n=%d more=%s"):format(mb, r.n, tostring(r.more)))
      end
    end
  end)

  -- GUARD.  Huge max_bytes takes everything; NULL-only rows count 0 bytes.
  it("GUARD: math.maxinteger takes all rows; NULL-only rows weigh 0 bytes", function()
    local r = assert(c:exec_upto(math.maxinteger, "SELECT g FROM generate_series(1, 1000) g"))
    assert.same({ 1000, false }, { r.n, r.more })
    assert.equal(1000, r[1000].g)
    r = assert(c:exec_upto(1, "SELECT NULL::text AS a, ''::text AS b FROM generate_series(1, 50) g"))
    assert.same({ 50, 0, false }, { r.n, r.bytes, r.more })
    assert.equal(pg.null, r[50].a)
  end)

  -- GUARD.  A statement that is not a SELECT runs whole, rows dropped or not.
  it("GUARD: INSERT ... RETURNING inserts every row though most are dropped", function()
    assert(c:exec("CREATE TEMP TABLE ins (id int, pad text)"))
    local r = assert(c:exec_upto(1000, "INSERT INTO ins SELECT g, repeat('p', 100) FROM generate_series(1, 5000) g "
      .. "RETURNING id, pad"))
    assert.is_true(r.more)
    assert.is_true(r.n >= 1 and r.n <= 10, tostring(r.n))
    assert.equal(5000, c:exec("SELECT count(*) AS n FROM ins")[1].n)
  end)

  -- GUARD.  A query_timeout firing between rows: the error, then healing.
  it("GUARD: a query_timeout mid-rows fails the call, 08006, and the next call heals", function()
    c:settimeout(0.5)
    local t0 = H.now()
    local r, err, code = c:exec_upto(1 << 20,
      "SELECT g, CASE WHEN g = 3 THEN pg_sleep(10) END AS s FROM generate_series(1, 5) g")
    assert.is_nil(r)
    assert.equal("08006", code)
    assert.matches("timeout", err)
    assert.is_true(H.now() - t0 < 8)
    c:settimeout(0)
    assert.equal(7, assert(c:exec_upto(100, "SELECT 7 AS x"))[1].x)
    assert.equal("idle", c:txstatus())
  end)

  -- GUARD.  The backend terminated among the rows (it ends itself).
  it("GUARD: the backend terminated mid-rows: an error, and the next call heals", function()
    local pid = c:pid()
    local r, err = c:exec_upto(1 << 20, "SELECT g, CASE WHEN g = 3 THEN pg_terminate_backend(pg_backend_pid()) "
      .. "END AS t, pg_sleep(0.05) FROM generate_series(1, 50) g")
    assert.is_nil(r, "rows came: " .. tostring(r and r.n))
    assert.truthy(err)
    r = assert(c:exec_upto(100, "SELECT pg_backend_pid() AS p"))
    assert.are_not.equal(pid, r[1].p)
  end)

  -- GUARD.  Inside a transaction block: an error among the rows aborts the
  -- block (inerror), ROLLBACK ends it.
  it("GUARD: BEGIN, exec_upto, an error among rows: inerror; ROLLBACK: idle, nothing kept", function()
    assert(c:exec("CREATE TEMP TABLE tx (id int)"))
    assert(c:exec("BEGIN"))
    assert(c:exec_upto(10, "INSERT INTO tx SELECT g FROM generate_series(1, 100) g RETURNING id"))
    assert.equal("intrans", c:txstatus())
    local r, _, code = c:exec_upto(1 << 20, "SELECT 10 / (3 - g) AS x FROM generate_series(1, 5) g")
    assert.same({ nil, "22012" }, { r, code })
    assert.equal("inerror", c:txstatus())
    r, _, code = c:exec_upto(10, "SELECT 1 AS x")
    assert.same({ nil, "25P02" }, { r, code })
    assert(c:exec("ROLLBACK"))
    assert.equal("idle", c:txstatus())
    assert.equal(0, c:exec("SELECT count(*) AS n FROM tx")[1].n)
  end)

  -- GUARD.  A connection lost inside a block: 08006, then 08003 until
  -- ROLLBACK, then it heals (exec's rules).
  it("GUARD: lost inside a block: 08006, 08003, ROLLBACK answered, then healed", function()
    assert(c:exec("BEGIN"))
    assert(c:exec_upto(10, "SELECT 1 AS x"))
    local admin = H.connect()
    H.kill_now(admin, c)
    admin:close()
    local r, _, code = c:exec_upto(10, "SELECT 2 AS x")
    assert.same({ nil, "08006" }, { r, code })
    r, _, code = c:exec_upto(10, "SELECT 3 AS x")
    assert.same({ nil, "08003" }, { r, code })
    assert(c:exec("ROLLBACK"))
    assert.equal(4, assert(c:exec_upto(10, "SELECT 4 AS x"))[1].x)
    assert.equal("idle", c:txstatus())
  end)

  -- GUARD.  Notifications that arrive while exec_upto reads rows are kept.
  it("GUARD: notifications arriving during exec_upto are all returned by wait afterwards", function()
    assert(c:listen("brk56ch"))
    local other = H.connect()
    H.finally(function() other:close() end)
    local done = os.tmpname()
    H.finally(function() os.remove(done) end)
    -- 5 notifications sent while the query sleeps between its rows
    os.execute(("(for i in 1 2 3 4 5; do psql -qtAX -c \"NOTIFY brk56ch, 'n$i'\" >/dev/null 2>&1; done; "
      .. "echo ok > %s) &"):format(done))
    local r = assert(c:exec_upto(5, "SELECT g, pg_sleep(0.1) FROM generate_series(1, 30) g"))
    assert.is_true(r.more)
    assert.truthy(H.eventually(function() return H.read(done) ~= "" end, 20))
    local got = {}
    for _ = 1, 5 do
      local note = c:wait(10)
      assert.truthy(note, "got " .. table.concat(got, ","))
      got[#got + 1] = note.payload
    end
    assert.same({ "n1", "n2", "n3", "n4", "n5" }, got)
  end)

  -- BREAK.  The Lua doc of exec_upto: "Parameters, healing and transaction
  -- blocks as exec's"; README: the statement cache "forgets itself on
  -- reconnect and on DISCARD ALL/DEALLOCATE ALL sent through exec".  Through
  -- exec_upto the cache is not told: inside a transaction block the next
  -- cached exec runs a statement the server no longer has, 26000, and the
  -- block is aborted; the same sequence with exec succeeds.
  it("BREAK: DEALLOCATE ALL through exec_upto inside a block: the next cached exec still works", function()
    local sql = "SELECT $1::int + 1 AS x"
    for _ = 1, 3 do assert(c:exec(sql, 1)) end -- prepared by now
    assert(c:exec("BEGIN"))
    assert(c:exec("DEALLOCATE ALL"))
    local r, err, code = c:exec(sql, 2)
    assert.truthy(r, "exec: " .. tostring(err) .. " " .. tostring(code))
    assert(c:exec("ROLLBACK"))
    for _ = 1, 3 do assert(c:exec(sql, 1)) end
    assert(c:exec("BEGIN"))
    assert(c:exec_upto(100, "DEALLOCATE ALL"))
    r, err, code = c:exec(sql, 2)
    c:exec("ROLLBACK")
    assert.truthy(r, "after exec_upto: " .. tostring(err) .. " " .. tostring(code))
    assert.equal(3, r[1].x)
  end)

  -- BREAK (minor).  "healing ... as exec's": LISTEN through exec is followed
  -- (conn:channels, re-LISTEN on heal); through exec_upto it is not.
  it("BREAK: LISTEN through exec_upto counts in channels() as through exec", function()
    assert(c:exec_upto(100, "LISTEN brk56up"))
    assert.same({ "brk56up" }, c:channels())
  end)

  -- GUARD.  conn:interruptible: a stop signal ends an exec_upto waiting
  -- between rows: nil, "interrupted", "08006"; the runner exits soon.
  it("GUARD: SIGTERM to the runner ends a handler's interruptible exec_upto mid-rows", function()
    local db = H.createdb("b56i")
    local p = H.start(H.script([[
local c = assert(pglisten.connect(nil, { interruptible = true }))
return { channels = { go = function()
  out("start")
  out("result", c:exec_upto(10, "SELECT g, pg_sleep(0.2) FROM generate_series(1, 300) g"))
end } }]]), { "--db", "dbname=" .. db })
    H.finally(function() p.stop() end)
    local n = H.connect("dbname=" .. db)
    assert(n:notify("go", "{}"))
    n:close()
    assert.truthy(H.eventually(function() return p.stdout():find("start", 1, true) end, 15), p.stderr())
    H.sleep(0.5) -- among the rows
    local t0 = H.now()
    p.kill("TERM")
    assert.truthy(H.eventually(function() return not p.running() end, 20), p.stderr())
    local dt = H.now() - t0
    assert.matches("result nil interrupted 08006", p.stdout())
    assert.is_true(dt < 15, ("exit %.1f s after SIGTERM"):format(dt))
  end)

  -- GUARD.  exec_upto's rows are exec's rows (values typed the same).
  it("GUARD: exec_upto(maxinteger) rows equal exec's rows, typed values included", function()
    local sql = [[SELECT g, g::numeric / 4 AS n, (g % 2 = 0) AS b, g::int8 * 1000000000000 AS i8,
      json_build_object('g', g, 'a', json_build_array(g, 1.5, NULL)) AS j, ('{"x":' || g || '}')::jsonb AS jb,
      CASE WHEN g % 3 = 0 THEN NULL ELSE g::text END AS t, g::float8 / 3 AS f, 1 AS g2, 2 AS g2
      FROM generate_series(1, 500) g]]
    local a = assert(c:exec(sql))
    local b = assert(c:exec_upto(math.maxinteger, sql))
    assert.same({ a.n, a.bytes, false }, { b.n, b.bytes, b.more })
    for i = 1, a.n do assert.same(a[i], b[i]) end
    assert.equal("integer", math.type(b[7].i8))
    assert.equal(pg.null, b[3].t)
  end)

  -- GUARD.  The statement cache and exec_upto side by side: same SQL.
  it("GUARD: exec and exec_upto of the same parameterized SQL, before and after", function()
    local sql = "SELECT g, $1::text AS t FROM generate_series(1, $2::int) g"
    for i = 1, 4 do
      assert.equal(i, #assert(c:exec(sql, "a", i)))
      local r = assert(c:exec_upto(1, sql, "b", i))
      assert.same({ 1, i > 1, "b" }, { r.n, r.more, r[1].t })
    end
    assert.equal(5, #assert(c:exec(sql, "a", 5)))
  end)
end)

describe("8f94cb6: exec's results through pgl_rows_append", function()
  local c
  before_each(function() c = H.connect() end)
  after_each(function() c:close() end)

  -- GUARD.  Shapes as before the change (checked against 8f94cb6~1 by hand).
  it("GUARD: 1600 columns, duplicate names, zero columns, 100,000 rows, typed values", function()
    local cols = {}
    for i = 1, 1600 do cols[i] = ("%d AS c%d"):format(i, i) end
    local r = assert(c:exec("SELECT " .. table.concat(cols, ", ")))
    assert.same({ 1, 1600, 1600, 1 }, { r.n, r[1].c1600, r[1].c1600, r[1].c1 })
    r = assert(c:exec("SELECT 1 AS a, 2 AS a, 3 AS b"))
    assert.same({ a = 2, b = 3 }, r[1])
    r = assert(c:exec("SELECT"))
    assert.same({ 1, 1, "SELECT 1" }, { r.n, r.affected, r.command })
    assert.same({}, r[1])
    r = assert(c:exec("SELECT FROM generate_series(1, 3)"))
    assert.same({ 3, 0 }, { r.n, r.bytes })
    r = assert(c:exec("SELECT g, md5(g::text) AS m FROM generate_series(1, 100000) g"))
    assert.same({ 100000, 100000, "SELECT 100000", 100000 }, { r.n, #r, r.command, r[100000].g })
    r = assert(c:exec([[SELECT '{"a":[1,2.5,null]}'::json AS j, '{"b":true}'::jsonb AS jb, 12.50::numeric AS n,
      true AS t, 9007199254740993::int8 AS i8, NULL::int AS nul, 'NaN'::numeric AS nan]]))
    local row = r[1]
    assert.same({ 1, 2.5 }, { row.j.a[1], row.j.a[2] })
    assert.is_true(row.jb.b)
    assert.equal(12.5, row.n)
    assert.is_true(row.t)
    assert.equal(9007199254740993, row.i8)
    assert.equal(math.type(row.i8), "integer")
    assert.equal(pg.null, row.nul)
    assert.equal("NaN", row.nan)
    r = assert(c:exec("CREATE TEMP TABLE z (a int); INSERT INTO z SELECT generate_series(1, 7)"))
    assert.same({ 0, 7, "INSERT 0 7", 0 }, { r.n, r.affected, r.command, r.bytes })
  end)
end)

-- Runs snapshot.run over an exported snapshot of `db` (a transaction held
-- open on `holder`), with PAGE_BYTES set to `pb`; returns the rows
-- delivered per table (in order) and the page sizes.
local function snap(db, tables, pb, between, extra)
  extra = extra or {}
  return C.snapshot_rows(db, tables, pb, { between = between, page = extra.page, publication = extra.publication })
end

describe("8f94cb6: snapshot pages by exec_upto", function()
  -- GUARD.  A text key under a non-C collation (mixed case, accents), small
  -- byte pages: every row once, in the collation's order.
  it("GUARD: text keys under a linguistic collation, pages cut by bytes: each row once", function()
    local db = H.createdb("b56c")
    local coll = H.psql("SELECT collname FROM pg_collation WHERE collname IN ('en-x-icu', 'en_US.utf8', 'und-x-icu') "
      .. "ORDER BY collname LIMIT 1", db)
    if coll == "" then coll = "C" end
    H.psql(([[CREATE TABLE words (k text COLLATE "%s" PRIMARY KEY, v text);
      INSERT INTO words SELECT w, repeat('v', (i %% 7)::int * 10) FROM unnest(ARRAY['a','A','á','Á','b','B','ab','Ab',
        'aB','AB','a b','a-b','ab ','é','e','E','É','ê','z','Z','ß','ss','SS','æ','ae','Æ','ø','o','Ø','ç','c',
        '1','10','2','_a','-a','.a']) WITH ORDINALITY AS t(w, i)]]):format(coll), db)
    local want = H.psql(([[SELECT string_agg(k, '|' ORDER BY k) FROM words]]), db)
    for _, pb in ipairs({ 1, 25, 60, 1 << 20 }) do
      local got = snap(db, { "words" }, pb)
      local ks = {}
      for i, r in ipairs(got.words) do ks[i] = r.k end
      assert.equal(want, table.concat(ks, "|"), ("PAGE_BYTES %d, collation %s"):format(pb, coll))
    end
  end)

  -- BREAK.  README: the snapshot reads "the rows the tables held", keyset
  -- on "the replica identity index".  The index's key is unique under the
  -- index's collation ("C" here), but the pages are ordered and compared
  -- with the column's collation (a nondeterministic, case-insensitive ICU
  -- one): 'a' and 'A' tie, and `(k) > ($1)` after a page that ended on 'a'
  -- skips 'A'.  A page cut by exec_upto's bytes (or by its LIMIT) between
  -- two tied keys loses rows.
  it("BREAK: a replica identity index whose collation differs from the column's: no row skipped", function()
    local db = H.createdb("b56n")
    H.psql([[CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
      CREATE TABLE ri (k text COLLATE ci NOT NULL, v text);
      CREATE UNIQUE INDEX ri_k ON ri (k COLLATE "C");
      ALTER TABLE ri REPLICA IDENTITY USING INDEX ri_k;
      INSERT INTO ri SELECT w, 'v' FROM unnest(ARRAY['a', 'A', 'b', 'B', 'c', 'C', 'ab', 'AB', 'Ab']) w]], db)
    local want = H.psql([[SELECT string_agg(k, '|' ORDER BY k COLLATE "C") FROM ri]], db)
    local bad = {}
    for _, pb in ipairs({ 1, 1 << 20 }) do
      for _, page in ipairs({ 1, 2, 1000 }) do
        local got = snap(db, { "ri" }, pb, nil, { page = page })
        local ks = {}
        for i, r in ipairs(got.ri or {}) do ks[i] = r.k end
        table.sort(ks)
        if table.concat(ks, "|") ~= want then
          bad[#bad + 1] = ("PAGE_BYTES %d, page %d: %d rows of 9 (%s)"):format(pb, page, #ks, table.concat(ks, "|"))
        end
      end
    end
    assert.equal("", table.concat(bad, "; "))
  end)

  -- GUARD.  A composite key (int, text, timestamptz), a ctid table updated
  -- and deleted from between pages, a row over the page bound among tiny
  -- ones, a publication row filter.
  it("GUARD: composite keys, ctid with changes between pages, a wide row, a row filter", function()
    local db = H.createdb("b56k")
    H.psql([[CREATE TABLE comp (a int, b text, t timestamptz, v text, PRIMARY KEY (a, b, t));
      INSERT INTO comp SELECT g % 3, chr(65 + g % 5),
        timestamptz '2020-01-01 00:00:00.123456+00' + g * interval '1.5 s', repeat('x', g % 11)
        FROM generate_series(1, 300) g;
      CREATE TABLE heap (n int, v text);
      ALTER TABLE heap REPLICA IDENTITY FULL;
      INSERT INTO heap SELECT CASE WHEN g % 4 = 0 THEN NULL ELSE g % 10 END, repeat('h', g % 13)
        FROM generate_series(1, 400) g;
      CREATE TABLE wide (id int PRIMARY KEY, body text);
      INSERT INTO wide SELECT g, 's' FROM generate_series(1, 50) g;
      UPDATE wide SET body = repeat('W', 3000) WHERE id = 5;
      CREATE TABLE filt (id int PRIMARY KEY, keep bool, v text);
      ALTER TABLE filt REPLICA IDENTITY FULL;
      INSERT INTO filt SELECT g, g % 3 = 0, repeat('f', g % 9) FROM generate_series(1, 200) g;
      CREATE PUBLICATION b56pub FOR TABLE comp, heap, wide, filt WHERE (keep)]], db)
    local want = {
      comp = H.psql("SELECT string_agg(a || b || t::text || v, '|' ORDER BY a, b, t) FROM comp", db),
      heap = H.psql("SELECT string_agg(coalesce(n::text, 'N') || v, '|' ORDER BY ctid) FROM heap", db),
      wide = H.psql("SELECT string_agg(id || ':' || length(body), '|' ORDER BY id) FROM wide", db),
      filt = H.psql("SELECT string_agg(id::text, '|' ORDER BY id) FROM filt WHERE keep", db),
    }
    local other = H.connect("dbname=" .. db)
    H.finally(function() other:close() end)
    local got, pages = snap(db, { "comp", "heap", "wide", "filt" }, 200, function(n)
      if n == 3 then -- after the snapshot: none of this may show
        local done_, e = other:exec("DELETE FROM heap WHERE n = 3; UPDATE heap SET v = 'changed' WHERE n = 5; "
          .. "INSERT INTO heap SELECT 99, 'new' FROM generate_series(1, 50); DELETE FROM comp WHERE a = 2; "
          .. "UPDATE wide SET body = 'w' WHERE id > 20; DELETE FROM filt WHERE id > 100")
        if not done_ then error("between pages: " .. tostring(e), 0) end
      end
    end, { publication = "b56pub" })
    local function tx(list, f) local o = {} for i, r in ipairs(list or {}) do o[i] = f(r) end return o end
    assert.equal(want.comp, table.concat(tx(got.comp, function(r) return r.a .. r.b .. r.t .. r.v end), "|"))
    local heapd = tx(got.heap, function(r) return (r.n == pg.null and "N" or tostring(r.n)) .. r.v end)
    assert.equal(want.heap, table.concat(heapd, "|"))
    assert.equal(want.wide, table.concat(tx(got.wide, function(r) return r.id .. ":" .. #r.body end), "|"))
    assert.equal(want.filt, table.concat(tx(got.filt, function(r) return r.id end), "|"))
    -- the changes between pages were committed (the source differs now)
    assert.are_not.equal(want.heap, H.psql("SELECT string_agg(coalesce(n::text, 'N') || v, '|' ORDER BY ctid) "
      .. "FROM heap", db))
    assert.equal("200", H.psql("SELECT count(*) FROM comp", db))
    print("\n  pages: " .. table.concat(pages, " "))
  end)
end)


describe("8f94cb6: the runner's snapshot, end to end", function()
  -- GUARD.  snapshot = true over a composite key (int, text, timestamptz)
  -- with a 17 MiB row among small ones, and a table without any key (ctid):
  -- the target equals the source, rows streamed after it too.
  it("GUARD: composite-key and ctid tables with a row over 16 MiB: target equals source", function()
    local src, dst, slot = C.setup("b56e")
    local ddl = [[CREATE TABLE comp (a int, b text, t timestamptz, body text, PRIMARY KEY (a, b, t));
      CREATE TABLE bag (n int, v text);]]
    C.sql(ddl, src)
    C.sql(ddl, dst)
    C.sql("ALTER TABLE bag REPLICA IDENTITY FULL", src)
    C.sql([[INSERT INTO comp SELECT g % 4, chr(65 + g % 6),
        timestamptz '2021-06-01 12:00:00.5+02' + g * interval '1 min', 'c' || g FROM generate_series(1, 3000) g;
      UPDATE comp SET body = repeat(md5('w'), 557057) WHERE a = 1 AND b = 'B' AND t = (SELECT min(t) FROM comp
        WHERE a = 1 AND b = 'B');
      INSERT INTO bag SELECT CASE WHEN g % 5 = 0 THEN NULL ELSE g % 7 END, 'b' || g FROM generate_series(1, 2500) g]],
      src)
    local path = C.script(dst, ([[
local function ins(tbl, rows, n)
  if #rows == 0 then return end
  local ph = {}
  for i = 1, n do ph[i] = "$" .. i end
  assert(target:execmany(("INSERT INTO %%s VALUES (%%s)"):format(tbl, table.concat(ph, ", ")), rows))
end
return {
  replication = { slot = %q, snapshot = true },
  channels = {
    ["public.comp"] = { source = "replication", batch = 5000, handler = function(events)
      local rows = {}
      for _, ev in ipairs(events) do
        if ev.op == "TRUNCATE" then assert(target:exec("TRUNCATE comp"))
        elseif ev.op == "INSERT" then rows[#rows + 1] = { ev.new.a, ev.new.b, ev.new.t, ev.new.body } end
      end
      ins("comp", rows, 4)
    end },
    ["public.bag"] = { source = "replication", batch = 5000, handler = function(events)
      local rows = {}
      for _, ev in ipairs(events) do
        if ev.op == "TRUNCATE" then assert(target:exec("TRUNCATE bag"))
        elseif ev.op == "INSERT" then rows[#rows + 1] = { ev.new.n, ev.new.v } end
      end
      ins("bag", rows, 2)
      out("bag " .. #rows)
    end },
  },
}
]]):format(slot))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    C.sql("INSERT INTO bag VALUES (42, 'streamed')", src)
    local dig = {
      comp = "SELECT count(*) || ':' || md5(string_agg(a || b || t::text || md5(body), ',' ORDER BY a, b, t)) "
        .. "FROM comp",
      bag = "SELECT count(*) || ':' || md5(string_agg(coalesce(n::text, 'N') || v, ',' ORDER BY v)) FROM bag",
    }
    for _, tbl in ipairs({ "comp", "bag" }) do
      local want
      local ok = H.eventually(function()
        want = C.sql(dig[tbl], src)
        return C.sql(dig[tbl], dst) == want
      end, 60, 0.2)
      assert.truthy(ok, tbl .. ": source " .. want .. ", target " .. C.sql(dig[tbl], dst) .. "\n" .. p.stderr())
    end
    assert.equal("2501", C.sql("SELECT count(*) FROM bag", dst))
  end)
end)
