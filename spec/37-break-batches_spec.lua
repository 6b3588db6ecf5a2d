-- Breaking two changes on purpose: the replication source's full batches
-- (b48ada5: repl:read reading the socket again, the channel cached per
-- relation id, the apply queue in three arrays, LSNs and short values
-- converted by hand) and execmany(sql, list, {savepoint = false})
-- (895e040: half a batch must never commit).
local H = require "spec.helpers"
local C = require "spec.cdc_helpers"
local pg = H.pg
local core = pg.core

---------------------------------------------------------------------------
-- The replication core, on its own
---------------------------------------------------------------------------

describe("replication core, broken on purpose (b48ada5)", function()
  local dbname, conninfo = H.createdb("brk37")
  local R = C.core(dbname, conninfo, "b37_")
  local stream, drop = R.stream, R.drop
  local function sql(s) return H.psql(s, dbname) end

  -- Reads (max per read) until `ncommits` commits came; returns the messages
  -- and the size of every non-empty read.
  local function collect(r, ncommits, max)
    local got, err, _, sizes = R.collect(r, C.commits(ncommits), 30, max)
    assert.is_nil(err)
    for _, n in ipairs(sizes) do assert.is_true(n <= max, "read(" .. max .. ") gave " .. n) end
    return got, sizes
  end

  it("formats every LSN as the server prints it, high part > 0 included, and parses it back", function()
    local c = H.connect("dbname=" .. dbname)
    H.finally(function() c:close() end)
    local cases = { 0, 1, 0xF, 0x10, 0xFFFFFFFF, 1 << 32, (1 << 32) | 0xABC, 0x123456789ABCDEF0,
      math.maxinteger, math.mininteger, -1, 0x0000000100000000 + 0xFFFFFFFF, 0x10 << 32 }
    for _, v in ipairs(cases) do
      -- the server's own text for the same LSN: pg_lsn plus the unsigned value
      local rows = assert(c:exec("SELECT ('0/0'::pg_lsn + ($1::numeric + CASE WHEN $1::numeric < 0 "
        .. "THEN 18446744073709551616 ELSE 0 END))::text AS t", v))
      local want = rows[1].t
      assert.equal(want, core.lsn_format(v), ("0x%x"):format(v))
      assert.equal(v, core.lsn_parse(want), want)
    end
    local now = assert(c:exec("SELECT pg_current_wal_lsn()::text AS t"))[1].t
    assert.equal(now, core.lsn_format(assert(core.lsn_parse(now))))
  end)
  it("sends integer parameters as the server reads them: 0, -1, the extremes, every digit count", function()
    local c = H.connect("dbname=" .. dbname)
    H.finally(function() c:close() end)
    local cases = { 0, -1, 1, 9, 10, -9, -10, 99, 100, math.maxinteger, math.mininteger, math.mininteger + 1,
      math.maxinteger - 1 }
    for d = 1, 18 do cases[#cases + 1] = 10 ^ d // 1 | 0; cases[#cases + 1] = -(10 ^ d // 1 | 0) + 1 end
    local list = {}
    for i, v in ipairs(cases) do
      local r = assert(c:exec("SELECT $1::text AS t, $1::numeric::bigint AS b", v))[1]
      assert.equal(("%d"):format(v), r.t); assert.equal(v, r.b)
      list[i] = { i, v }
    end
    assert(c:exec("CREATE TEMP TABLE ints (i int, v bigint)"))
    assert.equal(#cases, c:execmany("INSERT INTO ints VALUES ($1, $2)", list))
    local r = assert(c:exec("SELECT i, v, v::text AS t FROM ints ORDER BY i"))
    for i, v in ipairs(cases) do assert.equal(v, r[i].v); assert.equal(("%d"):format(v), r[i].t) end
  end)

  it("hands numeric, json, bool and integer values of 62 to 70 bytes over exactly as exec() reads them", function()
    sql("CREATE TABLE vals (id int PRIMARY KEY, n numeric, j json, jb jsonb, b bool, i8 bigint, f float8, s text)")
    local r, slot = stream("vals")
    local c = H.connect("dbname=" .. dbname)
    H.finally(function()
      c:close()
      drop(r, slot)
    end)
    local rows, id = {}, 0
    for len = 60, 70 do
      id = id + 1
      -- a numeric of `len` characters: digits, a point, a sign
      local digits = ("1234567890"):rep(8)
      local num = "-" .. digits:sub(1, len - 3) .. ".5"
      -- a json object of exactly `len` bytes
      local pad = len - #'{"k":""}'
      local js = '{"k":"' .. ("x"):rep(pad) .. '"}'
      assert.equal(len, #js)
      rows[#rows + 1] = id
      assert(c:exec("INSERT INTO vals VALUES ($1, $2::numeric, $3::json, $3::jsonb, $4, $5, $6, $7)", id, num, js,
        len % 2 == 0, len % 2 == 0 and math.mininteger or math.maxinteger, 1.2345678901234567e300,
        ("é"):rep(len // 2)))
      local chk = assert(c:exec("SELECT octet_length(n::text) AS ln, octet_length(j::text) AS lj FROM vals "
        .. "WHERE id = $1", id))[1]
      assert.equal(len, chk.ln); assert.equal(len, chk.lj)
    end
    assert(c:exec("INSERT INTO vals (id, n, j) VALUES (100, 'NaN', '\"63 bytes of a json string, escaped \\\" quote, "
      .. "to be sure. \"')"))
    local got = collect(r, #rows + 1, 1000)
    local n = 0
    for _, m in ipairs(got) do
      if m.op == "INSERT" then
        n = n + 1
        local want = assert(c:exec("SELECT * FROM vals WHERE id = $1", m.new.id))[1]
        for k, v in pairs(want) do
          assert.same(v, m.new[k], ("row %d column %s"):format(m.new.id, k))
          assert.equal(math.type(v), math.type(m.new[k]), ("row %d column %s"):format(m.new.id, k))
        end
      end
    end
    assert.equal(#rows + 1, n)
  end)

  it("fills a read up to max from a backlog the socket holds, in order, nothing twice", function()
    sql("CREATE TABLE back (id int PRIMARY KEY, v text)")
    local r, slot = stream("back")
    H.finally(function() drop(r, slot) end)
    for t = 0, 5 do
      sql(("INSERT INTO back SELECT g, 'v' || g FROM generate_series(%d, %d) g"):format(t * 2000 + 1, t * 2000 + 2000))
    end
    pg.sleep(1) -- the walsender sends while nobody reads
    local got, sizes = collect(r, 6, 3000)
    local ids, big = {}, 0
    for _, m in ipairs(got) do
      if m.op == "INSERT" then ids[#ids + 1] = m.new.id end
    end
    for _, k in ipairs(sizes) do if k > big then big = k end end
    assert.equal(12000, #ids)
    for i = 1, #ids do
      if ids[i] ~= i then error(("change %d is row %s"):format(i, tostring(ids[i]))) end
    end
    print(("\n  reads of at most 3000 over a 12,000-row backlog: %s"):format(table.concat(sizes, ",")))
    assert.equal(3000, big, "no read was filled: " .. table.concat(sizes, ","))
  end)
end)

---------------------------------------------------------------------------
-- The apply queue (three arrays since b48ada5), on its own
---------------------------------------------------------------------------

describe("the replication apply queue, broken on purpose (b48ada5)", function()
  local Apply
  setup(function()
    package.loaded["pglisten.host"] = package.loaded["pglisten.host"] or { pending = function() return false end }
    Apply = require "pglisten.replication.apply"
  end)

  local function new(sql)
    local log = setmetatable({}, { __index = function() return function() end end })
    local rt = { log = log, stats = { received = 0, handled = 0, failed_handler = 0, retries = 0 },
      dispatch = { on_error = function() end } }
    local c = { received = 0, handled = 0, failed_handler = 0, retries = 0, dead = 0 }
    return Apply.new(rt, c, sql or function() return nil, "no database here" end), c
  end

  -- A channel entry whose handler records its calls and fails `fails` times.
  local function entry(name, batch, fails, extra)
    local e = { name = name, batch = batch, retry = { attempts = 1000, backoff = 0, max_backoff = 0 }, calls = {} }
    for k, v in pairs(extra or {}) do e[k] = v end
    e.handler = function(evs)
      if not batch then evs = { evs } end
      local ids = {}
      for i, ev in ipairs(evs) do ids[i] = ev.id end
      e.calls[#e.calls + 1] = table.concat(ids, ",")
      if fails > 0 then
        fails = fails - 1
        error("failing on purpose")
      end
    end
    return e
  end

  it("a failed batch holds the flush position at the marks before it, its retry passes every mark it covers",
    function()
      local a = new()
      local A = entry("a", 3, 2)
      a:push(A, { id = 1 }, 1, 1, { commit_time = 1 }); a:mark(100, 1); a:mark(150)
      a:push(A, { id = 2 }, 2, 1, { commit_time = 2 }); a:mark(200, 2)
      a:push(A, { id = 3 }, 3, 1, { commit_time = 3 }); a:push(A, { id = 4 }, 4, 1, { commit_time = 3 }); a:mark(300, 3)
      assert.equal(4, a.events); assert.equal(8, a:len()); assert.equal(1, a:oldest_commit())
      a:handle(100)
      assert.equal(0, a.flushed); assert.truthy(a.job); assert.equal(4, a.events)
      a:handle(100)
      assert.equal(0, a.flushed)
      a:handle(100)
      assert.same({ "1,2,3", "1,2,3", "1,2,3", "4" }, A.calls)
      assert.equal(300, a.flushed); assert.equal(0, a.events); assert.equal(0, a:len())
      assert.is_nil(a:oldest_commit()); assert.is_nil(a.job)
      -- the queue starts again from 1 and works the same
      a:push(A, { id = 5 }, 5, 1, { commit_time = 4 }); a:mark(400, 4)
      assert.equal(2, a:len())
      a:handle(100)
      assert.equal(400, a.flushed); assert.equal("5", A.calls[5])
    end)

  it("interleaved channels: a batch stops at the other channel's event; singles one at a time, in order", function()
    local a = new()
    local A, B = entry("a", nil, 0), entry("b", 1000, 1)
    local order = {}
    local ha, hb = A.handler, B.handler
    A.handler = function(ev, note) order[#order + 1] = "a" .. ev.id; return ha(ev, note) end
    B.handler = function(evs, notes)
      local ok = pcall(hb, evs, notes)
      if not ok then error("b failed") end
      for _, ev in ipairs(evs) do order[#order + 1] = "b" .. ev.id end
    end
    a:push(A, { id = 1 }, 6, 1, {}); a:push(B, { id = 1 }, 7, 1, {}); a:push(B, { id = 2 }, 8, 1, {}); a:mark(10)
    a:push(A, { id = 2 }, 9, 1, {}); a:push(A, { id = 3 }, 10, 1, {}); a:push(B, { id = 3 }, 11, 1, {}); a:mark(20)
    for _ = 1, 10 do a:handle(100) end
    assert.same({ "a1", "b1", "b2", "a2", "a3", "b3" }, order)
    assert.same({ "1,2", "1,2", "3" }, B.calls)
    assert.equal(20, a.flushed)
  end)

  it("a budget stops between events, the flush position at the marks the handled jobs covered", function()
    local a = new()
    local A = entry("a", nil, 0)
    for i = 1, 5 do a:push(A, { id = i }, 12, 1, {}); a:mark(i * 10) end
    a:handle(2)
    assert.same({ "1", "2" }, A.calls)
    assert.equal(20, a.flushed) -- a job takes the marks that follow its events
    assert.equal(6, a:len())
    a:handle(2)
    assert.equal(40, a.flushed)
    a:handle(100)
    assert.equal(50, a.flushed); assert.equal(0, a:len())
  end)

  it("a reset while a job waits for its retry drops the job and the three arrays whole", function()
    local a = new()
    local A = entry("a", 10, 1)
    a:push(A, { id = 1 }, 13, 1, {}); a:mark(10); a:push(A, { id = 2 }, 14, 1, {})
    a:handle(100)
    assert.truthy(a.job); assert.equal(0, a.flushed)
    a:reset()
    assert.is_nil(a.job); assert.equal(0, a.events); assert.equal(0, a:len()); assert.is_false(a:ready())
    assert.is_nil(next(a.q)); assert.is_nil(next(a.qe)); assert.is_nil(next(a.qv))
    a:push(A, { id = 1 }, 15, 1, {}); a:mark(10); a:push(A, { id = 2 }, 16, 1, {}); a:mark(20)
    a:handle(100)
    assert.same({ "1,2", "1,2" }, A.calls)
    assert.equal(20, a.flushed); assert.equal(0, a:len())
  end)

  it('on_failure = "dead" that cannot record the batch keeps it at the head, the position unmoved', function()
    local a, c = new()
    local A = entry("a", 2, 1000, { on_failure = "dead", retry = { attempts = 2, backoff = 0, max_backoff = 0 } })
    a:push(A, { id = 1 }, 1, 1, {}); a:push(A, { id = 2 }, 2, 1, {}); a:mark(10)
    for _ = 1, 5 do a:handle(100) end
    assert.equal(0, a.flushed); assert.truthy(a.job); assert.equal(2, a.events); assert.equal(0, c.dead)
    assert.same({ "1,2", "1,2", "1,2", "1,2", "1,2" }, A.calls)
  end)
end)

---------------------------------------------------------------------------
-- The replication source through the runner
---------------------------------------------------------------------------

-- The handler's output lines, as tables of words.
local function words(p)
  local out = {}
  for _, l in ipairs(H.lines(p.stdout())) do
    local w = {}
    for x in l:gmatch("%S+") do w[#w + 1] = x end
    out[#out + 1] = w
  end
  return out
end

describe("replication source, broken on purpose (b48ada5)", function()
  for _, read in ipairs { 2048, 1 } do
  it(("routes a table renamed mid-transaction, renamed back, and dropped and made again by its name of the "
    .. "moment (%d messages per read)"):format(read), function()
      local src, dst, slot = C.setup("b37ren")
      C.sql("CREATE TABLE r (id int PRIMARY KEY)", src)
      local path = C.script(dst, ([[
require("pglisten.sources.replication").READ = %d
return {
  replication = { slot = %q },
  channels = {
    ["public.r"] = { source = "replication", handler = function(ev) out("r", ev.table, ev.new.id) end },
    ["public.r2"] = { source = "replication", batch = 10, handler = function(evs)
      for _, ev in ipairs(evs) do out("r2", ev.table, ev.new.id) end
    end },
  },
}
]]):format(read, slot))
      C.sql("CREATE TABLE r2 (id int PRIMARY KEY)", src) -- so that the publication has r2 when it starts
      local p = C.start(path, src)
      H.finally(function() C.cleanup({ p }, src, slot) end)
      C.sql("DROP TABLE r2", src)
      C.sql("INSERT INTO r VALUES (1)", src)
      C.sql("BEGIN; INSERT INTO r VALUES (2); ALTER TABLE r RENAME TO r2; INSERT INTO r2 VALUES (3); COMMIT", src)
      C.sql("ALTER TABLE r2 RENAME TO r3; INSERT INTO r3 VALUES (4)", src)
      C.sql("BEGIN; INSERT INTO r3 VALUES (5); ALTER TABLE r3 RENAME TO r; INSERT INTO r VALUES (6); COMMIT", src)
      C.sql(("DROP TABLE r; CREATE TABLE r (id int PRIMARY KEY); ALTER PUBLICATION %s ADD TABLE r; "
        .. "INSERT INTO r VALUES (7)"):format(slot), src)
      C.sql(("ALTER TABLE r RENAME TO r2; INSERT INTO r2 VALUES (8)"):format(slot), src)
      local ok = H.eventually(function() return #H.lines(p.stdout()) >= 6 end, 20)
      assert.truthy(ok, p.stdout() .. p.stderr())
      pg.sleep(0.3)
      assert.same({ "r r 1", "r r 2", "r2 r2 3", "r r 6", "r r 7", "r2 r2 8" }, H.lines(p.stdout()))
      assert.truthy(p.stderr():find("public.r3", 1, true), p.stderr())
    end)
  end

  it("a reload that gives a streamed, unserved table a channel routes its next change there", function()
    local src, dst, slot = C.setup("b37rel")
    C.sql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)", src)
    local body = [[
return {
  replication = { slot = %q },
  channels = {
    ["public.a"] = { source = "replication", handler = function(ev) out("a", ev.new.id) end },
    %s
  },
}
]]
    local path = C.script(dst, body:format(slot, ""))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    C.sql(("ALTER PUBLICATION %s ADD TABLE b"):format(slot), src)
    C.sql("INSERT INTO b VALUES (1); INSERT INTO a VALUES (1)", src)
    assert.truthy(H.eventually(function() return p.stderr():find("no channel serves", 1, true) end, 15), p.stderr())
    assert.truthy(H.eventually(function() return #H.lines(p.stdout()) >= 1 end, 15))
    H.rewrite(path, ("local TARGET = %q\n"):format("dbname=" .. dst) .. C.HANDLER .. body:format(slot,
      '["public.b"] = { source = "replication", batch = 5, handler = function(evs) '
      .. 'for _, ev in ipairs(evs) do out("b", ev.new.id) end end },'))
    p.kill("HUP")
    assert.truthy(H.eventually(function() return p.stderr():find("reloaded", 1, true) end, 15), p.stderr())
    C.sql("INSERT INTO b VALUES (2); INSERT INTO a VALUES (2)", src)
    assert.truthy(H.eventually(function() return #H.lines(p.stdout()) >= 3 end, 15), p.stderr())
    pg.sleep(0.3)
    assert.same({ "a 1", "b 2", "a 2" }, H.lines(p.stdout()))
  end)

  it("two tables interleaved in one transaction, batch 1 and batch 1000: every change once, in the order made",
    function()
      local src, dst, slot = C.setup("b37mix")
      C.sql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)", src)
      local p = C.run(src, dst, slot, [[
    ["public.a"] = { source = "replication", handler = function(ev, note) out("a", ev.new.id, note.seq) end },
    ["public.b"] = { source = "replication", batch = 1000, handler = function(evs, notes)
      assert(#evs <= 1000 and #evs == #notes)
      local ids = {}
      for i, ev in ipairs(evs) do ids[i] = ev.new.id .. ":" .. notes[i].seq end
      out("b", table.concat(ids, ","))
    end },]])
      C.sql([[BEGIN;
        INSERT INTO a VALUES (1);
        INSERT INTO b SELECT g FROM generate_series(1, 2500) g;
        INSERT INTO a VALUES (2);
        DO $$ BEGIN FOR i IN 1..300 LOOP
          INSERT INTO a VALUES (100 + i); INSERT INTO b VALUES (5000 + i); INSERT INTO b VALUES (6000 + i);
        END LOOP; END $$;
        INSERT INTO b SELECT g FROM generate_series(10001, 11500) g;
        COMMIT]], src)
      local want = { "a1" }
      for i = 1, 2500 do want[#want + 1] = "b" .. i end
      want[#want + 1] = "a2"
      for i = 1, 300 do
        want[#want + 1] = "a" .. (100 + i); want[#want + 1] = "b" .. (5000 + i); want[#want + 1] = "b" .. (6000 + i)
      end
      for i = 10001, 11500 do want[#want + 1] = "b" .. i end
      local got
      local ok = H.eventually(function()
        got = {}
        for _, w in ipairs(words(p)) do
          if w[1] == "a" then
            got[#got + 1] = { "a" .. w[2], tonumber(w[3]) }
          else
            for item in w[2]:gmatch("[^,]+") do
              local id, seq = item:match("^(%d+):(%d+)$")
              got[#got + 1] = { "b" .. id, tonumber(seq) }
            end
          end
        end
        return #got >= #want
      end, 30, 0.2)
      assert.truthy(ok, ("%d of %d changes: %s"):format(#got, #want, p.stderr()))
      assert.equal(#want, #got)
      for i = 1, #want do
        if got[i][1] ~= want[i] or got[i][2] ~= i then
          error(("change %d: got %s (seq %s), want %s"):format(i, got[i][1], tostring(got[i][2]), want[i]))
        end
      end
      -- batches of b never more than 1000, and broken at every change of a
      for _, w in ipairs(words(p)) do
        if w[1] == "b" then assert.is_true(select(2, w[2]:gsub(",", ",")) < 1000) end
      end
    end)

  it("a 20,000-change transaction read 7 messages at a time behind a 20-item queue, its handler failing 6 times "
    .. "mid-way: every change once, the slot never confirmed past the unhandled commit", function()
    local src, dst, slot = C.setup("b37big")
    C.sql("CREATE TABLE h (id int PRIMARY KEY)", src)
    C.sql("CREATE TABLE h (id int PRIMARY KEY)", dst)
    local path = C.script(dst, ([[
local rep = require "pglisten.sources.replication"
rep.READ, rep.HANDLE = 7, 5
require("pglisten.runner").DEFAULTS.retry_buffer = 20
local fails = 0
return {
  replication = { slot = %q },
  channels = {
    ["public.h"] = { source = "replication", batch = 50, retry = { attempts = 1000, backoff = 0.4, max_backoff = 0.4 },
      handler = function(evs, notes)
        assert(#evs <= 50 and #evs == #notes)
        for _, ev in ipairs(evs) do
          if ev.new.id == 15000 and fails < 6 then
            fails = fails + 1
            out("fail", fails)
            error("poison")
          end
        end
        local rows = {}
        for i, ev in ipairs(evs) do rows[i] = { ev.new.id } end
        assert(target:execmany("INSERT INTO h VALUES ($1)", rows))
      end },
  },
}
]]):format(slot))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    C.sql("INSERT INTO h VALUES (0)", src)
    assert.truthy(H.eventually(function() return C.sql("SELECT count(*) FROM h", dst) == "1" end, 15), p.stderr())
    local l1 = core.lsn_parse(C.sql("BEGIN; INSERT INTO h SELECT g FROM generate_series(1, 20000) g; "
      .. "SELECT pg_current_wal_insert_lsn(); COMMIT", src))
    assert.is_number(l1)
    local checked, worst = 0, 0
    local ok = H.eventually(function()
      -- the position first: a slot confirmed past the transaction had every row in the target before
      local cf = core.lsn_parse(C.confirmed(slot))
      if p.stdout():find("fail", 1, true) and C.sql("SELECT count(*) FROM h", dst) ~= "20001" then
        checked = checked + 1
        if cf > worst then worst = cf end
        assert.is_true(cf <= l1, ("confirmed %s, past the unhandled transaction (commit after %s)")
          :format(core.lsn_format(cf), core.lsn_format(l1)))
      end
      return C.sql("SELECT count(*) FROM h", dst) == "20001"
    end, 90, 0.1)
    assert.truthy(ok, C.sql("SELECT count(*) FROM h", dst) .. " rows; " .. p.stderr())
    assert.equal(6, #H.lines(p.stdout()))
    assert.is_true(checked >= 5, "the slot was checked " .. checked .. " times while blocked")
    assert.equal(C.digest(src, "h"), C.digest(dst, "h"))
    assert.truthy(H.eventually(function() return core.lsn_parse(C.confirmed(slot)) > l1 end, 20))
  end)

  it("SIGKILLed 3 times while it takes a 60,000-change backlog into pglisten.apply with savepoint = false, "
    .. "batches failing once after their writes: the target equals the source, nothing applied twice", function()
    local src, dst, slot = C.setup("b37kill")
    C.sql("CREATE TABLE big (id int PRIMARY KEY, v text)", src)
    C.sql("CREATE TABLE big (id int PRIMARY KEY, v text)", dst)
    local path = C.script(dst, ([[
local tried = {}
return {
  replication = { slot = %q },
  channels = {
    ["public.big"] = { source = "replication", batch = 1000,
      retry = { attempts = 1000, backoff = 0.05, max_backoff = 0.2 },
      handler = function(evs, notes)
        local key = notes[1].commit_lsn .. ":" .. notes[1].seq
        local ok, err = pglisten.apply(target, evs, notes, function(c, e)
          local rows = {}
          for i, ev in ipairs(e) do rows[i] = { ev.new.id, ev.new.v } end
          local n, xerr = c:execmany("INSERT INTO big VALUES ($1, $2)", rows, { savepoint = false })
          if not n then return nil, xerr end
          if not tried[key] then -- written, then failed: apply must roll it back with the position
            tried[key] = true
            return nil, "failing once after the write"
          end
          return true
        end)
        if not ok then error(err, 0) end
      end },
  },
}
]]):format(slot))
    local p = C.start(path, src)
    local procs = { p }
    H.finally(function() C.cleanup(procs, src, slot) end)
    p.kill("TERM")
    assert.equal(0, p.wait(10))
    for t = 0, 2 do
      C.sql(("INSERT INTO big SELECT g, 'v' || g FROM generate_series(%d, %d) g"):format(t * 20000 + 1,
        t * 20000 + 20000), src)
    end
    local want = C.digest(src, "big")
    for k = 1, 3 do
      local q = C.start(path, src)
      procs[#procs + 1] = q
      H.eventually(function() return tonumber(C.sql("SELECT count(*) FROM big", dst)) >= k * 12000 end, 30, 0.02)
      q.kill("KILL")
      q.wait(5)
    end
    local last = C.start(path, src)
    procs[#procs + 1] = last
    local ok = H.eventually(function() return C.digest(dst, "big") == want end, 90, 0.3)
    assert.truthy(ok, C.digest(dst, "big") .. " vs " .. want .. "\n" .. last.stderr())
    assert.is_nil(last.stderr():find("23505", 1, true), last.stderr())
    for _, q in ipairs(procs) do assert.is_nil(q.stderr():find("duplicate key", 1, true), q.stderr()) end
  end)
end)

describe("replication source under faults, broken on purpose (b48ada5)", function()
  it("walsender terminated 3 times mid-backlog while batches apply with savepoint = false: the target equals "
    .. "the source, nothing applied twice", function()
    local src, dst, slot = C.setup("b37ws")
    C.sql("CREATE TABLE big (id int PRIMARY KEY, v text)", src)
    C.sql("CREATE TABLE big (id int PRIMARY KEY, v text)", dst)
    local p = C.run(src, dst, slot, [[
    ["public.big"] = { source = "replication", batch = 700,
      retry = { attempts = 1000, backoff = 0.05, max_backoff = 0.2 },
      handler = function(evs, notes)
        local ok, err = pglisten.apply(target, evs, notes, function(c, e)
          local rows = {}
          for i, ev in ipairs(e) do rows[i] = { ev.new.id, ev.new.v } end
          local n, xerr = c:execmany("INSERT INTO big VALUES ($1, $2)", rows, { savepoint = false })
          if not n then return nil, xerr end
          pglisten.sleep(0.002 * #e / 100) -- slow enough for the kills to land mid-backlog
          return true
        end)
        if not ok then error(err, 0) end
      end },]])
    C.sql("BEGIN; INSERT INTO big SELECT g, 'v' || g FROM generate_series(1, 15000) g; COMMIT; "
      .. "INSERT INTO big SELECT g, 'w' || g FROM generate_series(15001, 40000) g", src)
    local want = C.digest(src, "big")
    local killed = {}
    local function walsender()
      local pid = C.sql(("SELECT active_pid FROM pg_replication_slots WHERE slot_name = '%s'"):format(slot), src)
      return pid ~= "" and not killed[pid] and pid or nil
    end
    for k = 1, 3 do
      H.eventually(function() return tonumber(C.sql("SELECT count(*) FROM big", dst)) >= k * 9000 end, 30, 0.02)
      -- the stream of the runner as it is now, not one the last kill already ended
      local pid = H.eventually(walsender, 30, 0.02)
      assert.truthy(pid, "no new walsender after kill " .. (k - 1))
      killed[pid] = true
      C.sql(("SELECT pg_terminate_backend(%s)"):format(pid), src)
    end
    local ok = H.eventually(function() return C.digest(dst, "big") == want end, 90, 0.3)
    assert.truthy(ok, C.digest(dst, "big") .. " vs " .. want .. "\n" .. p.stderr())
    assert.is_nil(p.stderr():find("duplicate key", 1, true), p.stderr())
    assert.is_true(H.count_matches(p.stderr(), "replication stream lost") >= 2, p.stderr())
  end)

  it('on_failure = "dead" buries a whole failing batch and the queue goes on after it, nothing lost or twice',
    function()
      local src, dst, slot = C.setup("b37dead")
      C.sql("CREATE TABLE d (id int PRIMARY KEY)", src)
      C.sql("CREATE TABLE d (id int PRIMARY KEY)", dst)
      local rc, _, ierr = H.run_runner({ "--install", "--db", "dbname=" .. src })
      assert.equal(0, rc, ierr)
      local p = C.run(src, dst, slot, [[
    ["public.d"] = { source = "replication", batch = 10, on_failure = "dead", retry = { attempts = 2, backoff = 0.05 },
      handler = function(evs)
        local rows = {}
        for i, ev in ipairs(evs) do
          if ev.new.id == 55 then error("no 55") end
          rows[i] = { ev.new.id }
        end
        assert(target:execmany("INSERT INTO d VALUES ($1)", rows))
        out(#evs)
      end },]])
      local l100 = core.lsn_parse(C.sql("BEGIN; INSERT INTO d SELECT g FROM generate_series(1, 100) g; "
        .. "SELECT pg_current_wal_insert_lsn(); COMMIT", src))
      C.sql("INSERT INTO d VALUES (1000)", src)
      assert.truthy(H.eventually(function() return C.sql("SELECT count(*) FROM d WHERE id = 1000", dst) == "1" end,
        20), p.stderr())
      local dead = C.sql("SELECT string_agg(payload::jsonb -> 'new' ->> 'id', ',' ORDER BY id) FROM pglisten.dead", src)
      local ids = {}
      for i in dead:gmatch("%d+") do ids[#ids + 1] = tonumber(i) end
      assert.truthy(#ids >= 1 and #ids <= 10, dead)
      local buried = {}
      for _, i in ipairs(ids) do buried[i] = true end
      assert.truthy(buried[55], dead)
      -- every other change is in the target once
      local n = tonumber(C.sql("SELECT count(*) FROM d", dst))
      assert.equal(101 - #ids, n)
      local has = {} -- how many times each of 1..100 is in the target, in one query
      for i, k in C.sql("SELECT string_agg(g || ':' || (SELECT count(*) FROM d WHERE id = g), ',' ORDER BY g) "
        .. "FROM generate_series(1, 100) g", dst):gmatch("(%d+):(%d+)") do
        has[tonumber(i)] = k
      end
      for i = 1, 100 do assert.equal(buried[i] and "0" or "1", has[i], "row " .. i) end
      -- the flush position passes the buried batch: a restart does not bring it again
      assert.truthy(H.eventually(function() return core.lsn_parse(C.confirmed(slot)) > l100 end, 20),
        C.confirmed(slot))
    end)

  it("execmany with savepoint = false: a query_timeout mid-batch inside a transaction commits nothing", function()
    local _, ci = H.createdb("b37to")
    local c = H.connect(ci)
    H.finally(function() c:close() end)
    assert(c:exec("CREATE TABLE em (id int PRIMARY KEY)"))
    local rows = {}
    for i = 1, 50 do rows[i] = { i } end
    c:settimeout(0.5)
    local res = table.pack(c:transaction(function(conn)
      assert(conn:exec("INSERT INTO em VALUES (-1)"))
      return conn:execmany("INSERT INTO em SELECT $1 FROM pg_sleep(CASE WHEN $1 = 30 THEN 1.5 ELSE 0 END)", rows,
        { savepoint = false })
    end))
    assert.is_nil(res[1])
    assert.matches("^08", tostring(res[3]), tostring(res[2]))
    c:settimeout(10)
    -- the timed-out backend may still be in its pg_sleep(1.5): count once it has ended
    assert.truthy(H.eventually(function()
      return H.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        .. "AND state = 'active' AND query LIKE 'INSERT INTO em %'", ci:match("dbname=(%S+)")) == "0"
    end, 10))
    assert.equal(0, assert(c:exec("SELECT count(*) AS n FROM em"))[1].n)
  end)
end)

---------------------------------------------------------------------------
-- execmany(sql, list, {savepoint = false}): half a batch never commits
---------------------------------------------------------------------------

describe("execmany with savepoint = false, broken on purpose (895e040)", function()
  local _, ci = H.createdb("b37em")
  local c, admin
  local INS = "INSERT INTO em (id, v) VALUES ($1, $2)"
  local NOSAVE = { savepoint = false }
  before_each(function()
    c = H.connect(ci)
    c:settimeout(60)
    admin = H.connect(ci)
    assert(admin:exec("DROP TABLE IF EXISTS em_child; DROP TABLE IF EXISTS em"))
    assert(admin:exec("CREATE TABLE em (id int PRIMARY KEY, v text)"))
  end)
  after_each(function() c:close(); admin:close() end)

  local function count() return assert(admin:exec("SELECT count(*) AS n FROM em"))[1].n end
  local function list(n, at, bad)
    local l = {}
    for i = 1, n do l[i] = { i, "v" .. i } end
    if at then l[at] = { at, bad } end
    return l
  end
  local function usable(conn)
    assert.equal("idle", conn:txstatus())
    assert.equal(1, assert(conn:exec("SELECT 1 AS one"))[1].one)
  end

  it("a backend terminated mid-batch inside transaction(): nothing of it commits, the connection heals", function()
    -- each tuple sleeps a little so that the kill lands while the batch runs
    assert(admin:exec("CREATE OR REPLACE FUNCTION em_slow(int) RETURNS int LANGUAGE sql AS "
      .. "'SELECT $1 FROM pg_sleep(0.0005)'"))
    local k = H.kill_later(c:pid(), 0.5)
    local t0 = H.now()
    local res = table.pack(c:transaction(function(conn)
      assert(conn:exec("INSERT INTO em VALUES (-1, 'outer')"))
      local n, err, code = conn:execmany("INSERT INTO em (id, v) VALUES (em_slow($1), $2)", list(20000), NOSAVE)
      if not n then return nil, err, code end
      return n
    end))
    k.wait(10)
    assert.is_nil(res[1], "the batch finished before the kill: " .. tostring(res[1]))
    assert.is_true(H.now() - t0 < 30)
    assert.matches("^08", tostring(res[3]), tostring(res[2]))
    assert.equal(0, count())
    -- the next use heals
    assert.equal(2, c:execmany(INS, list(2), NOSAVE))
    usable(c)
  end)

  it("a statement failing at Parse: the caller's block is aborted, no index, nothing commits", function()
    local res = table.pack(c:transaction(function(conn)
      assert(conn:exec("INSERT INTO em VALUES (-1, 'outer')"))
      local n, err, code, index = conn:execmany("INSERT INTO no_such_table VALUES ($1, $2)", list(3), NOSAVE)
      assert.is_nil(n); assert.equal("42P01", code); assert.is_nil(index)
      assert.equal("inerror", conn:txstatus())
      return true, err -- fn swallows the failure: COMMIT rolls back, and transaction() says so
    end))
    assert.is_nil(res[1]); assert.equal("25P02", res[3])
    assert.equal(0, count())
    usable(c)
  end)

  it("a deferred constraint fails at the caller's COMMIT: nothing of the batch nor the block commits", function()
    assert(admin:exec("CREATE TABLE em_child (id int PRIMARY KEY, parent int REFERENCES em (id) "
      .. "DEFERRABLE INITIALLY DEFERRED)"))
    local res = table.pack(c:transaction(function(conn)
      assert(conn:exec("INSERT INTO em VALUES (-1, 'outer')"))
      return conn:execmany("INSERT INTO em_child VALUES ($1, $2)", { { 1, -1 }, { 2, 12345 }, { 3, -1 } }, NOSAVE)
    end))
    assert.is_nil(res[1]); assert.equal("23503", res[3], tostring(res[2]))
    assert.equal(0, count())
    assert.equal(0, assert(admin:exec("SELECT count(*) AS n FROM em_child"))[1].n)
    usable(c)
  end)

  for _, case in ipairs { { sent = 1 }, { sent = 2 }, { sent = 3000 } } do
    it(("nested transaction(): a tuple raising after %d tuples were sent undoes the inner block only")
      :format(case.sent),
      function()
        local inner
        local res = table.pack(c:transaction(function(conn)
          assert(conn:exec("INSERT INTO em VALUES (-1, 'outer before')"))
          inner = table.pack(conn:transaction(function(c2)
            return c2:execmany(INS, list(case.sent + 1, case.sent + 1, function() end), NOSAVE)
          end))
          assert(conn:exec("INSERT INTO em VALUES (-2, 'outer after')"))
          return "committed"
        end))
        assert.is_nil(inner[1])
        assert.matches("cannot send a function", tostring(inner[2]))
        assert.equal("committed", res[1], tostring(res[2]))
        assert.same({ { id = -2 }, { id = -1 } }, (function()
          local r = assert(admin:exec("SELECT id FROM em ORDER BY id"))
          local out = {}
          for i = 1, r.n do out[i] = { id = r[i].id } end
          return out
        end)())
        -- and the same batch in the outer block itself: the whole block rolls back
        res = table.pack(c:transaction(function(conn)
          assert(conn:exec("INSERT INTO em VALUES (-3, 'outer')"))
          local ok = pcall(conn.execmany, conn, INS, list(case.sent + 1, case.sent + 1, function() end), NOSAVE)
          assert.is_false(ok)
          return true -- swallowed: the block is aborted all the same
        end))
        assert.is_nil(res[1]); assert.equal("25P02", res[3])
        assert.equal(2, count())
        usable(c)
      end)
  end

  it("a lazy connection passes the option on: no subtransaction, a typo raises, a refusal aborts the block",
    function()
      local lz = assert(pg.connect(ci, { lazy = true }))
      H.finally(function() lz:close() end)
      assert.has_error(function() lz:execmany(INS, list(1), { savepiont = false }) end)
      local res = table.pack(lz:transaction(function(conn)
        assert.equal(3, conn:execmany(INS, list(3), NOSAVE))
        local r = assert(conn:exec("SELECT count(*) FILTER (WHERE xmin::text = pg_current_xact_id()::text) AS top "
          .. "FROM em"))[1]
        assert.equal(3, r.top)
        return true
      end))
      assert.is_true(res[1], tostring(res[2]))
      assert.equal(3, count())
      res = table.pack(lz:transaction(function(conn)
        local n, err = conn:execmany(INS, list(3000, 2500, "zero\0byte"), NOSAVE)
        assert.is_nil(n)
        return true, err
      end))
      assert.is_nil(res[1]); assert.equal("25P02", res[3])
      assert.equal(3, count())
    end)

  it("pglisten.apply with savepoint = false: a failed batch leaves neither rows nor position, its retry "
    .. "applies once, a third try skips it", function()
    local function note(seq)
      return { system_id = "1", database = "d", slot = "s37", commit_lsn = "1/10", seq = seq }
    end
    local evs, notes = {}, {}
    for i = 1, 500 do evs[i], notes[i] = { id = i }, note(i) end
    assert(admin:exec("INSERT INTO em VALUES (250, 'in the way')"))
    local calls = 0
    local function fn(conn, e)
      calls = calls + 1
      local rows = {}
      for i, ev in ipairs(e) do rows[i] = { ev.id, "a" } end
      return conn:execmany(INS, rows, NOSAVE)
    end
    local ok, err, code = pg.apply(c, evs, notes, fn)
    assert.is_nil(ok); assert.equal("23505", code, err)
    assert.equal(1, count())
    assert.equal(0, assert(admin:exec("SELECT count(*) AS n FROM pglisten.applied WHERE slot = 's37'"))[1].n)
    assert(admin:exec("DELETE FROM em"))
    assert.equal(500, pg.apply(c, evs, notes, fn))
    assert.equal(500, count())
    assert.is_true(pg.apply(c, evs, notes, fn))
    assert.equal(2, calls)
    assert.equal("1/10 500", assert(admin:exec("SELECT lsn::text || ' ' || seq AS p FROM pglisten.applied "
      .. "WHERE slot = 's37'"))[1].p)
    usable(c)
  end)
end)
