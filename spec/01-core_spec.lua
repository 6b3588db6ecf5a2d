-- The pglisten core against a real server: connect, LISTEN/NOTIFY, wait,
-- exec and its type mapping, errors, life cycle.
local H = require "helpers"
local pg = H.pg

local function drain(conn, n, timeout)
  local got = {}
  while #got < n do
    local note, err = conn:wait(timeout or 5)
    if not note then return got, err end
    got[#got + 1] = note
  end
  return got
end

describe("pglisten.connect", function()
  it("uses libpq's environment for nil and empty conninfo", function()
    for _, ci in ipairs({ false, "" }) do
      local c = assert(pg.connect(ci or nil))
      assert.equal("ok", c:status())
      assert.is_true(c:pid() > 0)
      c:close()
    end
  end)

  it("accepts keyword/value strings and postgres:// URIs", function()
    local host, port = os.getenv("PGHOST"), os.getenv("PGPORT")
    local a = assert(pg.connect(("host=%s port=%s dbname=postgres user=postgres"):format(host, port)))
    local b = assert(pg.connect(("postgres://postgres@%s:%s/postgres"):format(host, port)))
    assert.equal(1, a:exec("SELECT 1 AS one")[1].one)
    assert.equal(1, b:exec("SELECT 1 AS one")[1].one)
    a:close(); b:close()
  end)

  it("fails fast with a clear message on a closed port", function()
    local t0 = H.now()
    local c, err = pg.connect("host=127.0.0.1 port=1 connect_timeout=5")
    assert.is_nil(c)
    assert.matches("Connection refused", err)
    assert.is_true(H.now() - t0 < 1, "took " .. (H.now() - t0))
  end)

  it("honours opts.timeout against a server that never answers", function()
    local socket = require "socket"
    local srv = assert(socket.bind("127.0.0.1", 0))
    local _, port = srv:getsockname()
    local t0 = H.now()
    local c, err = pg.connect("host=127.0.0.1 port=" .. port, { timeout = 0.4 })
    local took = H.now() - t0
    srv:close()
    assert.is_nil(c)
    assert.matches("timeout", err)
    assert.is_true(took >= 0.4 and took < 1.5, "took " .. took)
  end)

  it("never puts the password in an error", function()
    local cases = {
      "host=127.0.0.1 port=1 user=u password=s3cr3t-pw",
      "host=127.0.0.1 port=1 password='s3cr3t pw'",
      "postgres://u:s3cr3t-pw@127.0.0.1:1/db",
      "postgres://u:s3cr3t%40pw@127.0.0.1:1/db",
      "postgres://u@127.0.0.1:1/db?password=s3cr3t-pw",
      "postgres://u:s3cr3t-pw@127.0.0.1:1/db?bogus=1",
      "host=x password=s3cr3t-pw bad",
    }
    for _, ci in ipairs(cases) do
      local c, err = pg.connect(ci)
      assert.is_nil(c)
      assert.is_string(err)
      assert.is_nil(err:find("s3cr3t", 1, true), ci .. " -> " .. err)
    end
    assert.is_nil(pg.safe_conninfo("postgres://u:s3cr3t@h/db"):find("s3cr3t", 1, true))
  end)

  it("raises for arguments of the wrong type", function()
    assert.has_error(function() pg.connect(42) end)
    assert.has_error(function() pg.connect("", 5) end)
    assert.has_error(function() pg.connect("", { timeout = -1 }) end)
  end)
end)

describe("LISTEN/NOTIFY", function()
  local l, s
  before_each(function()
    l, s = H.connect(), H.connect()
  end)
  after_each(function()
    l:close(); s:close()
  end)

  it("round-trips on one channel, with channel, payload and pid", function()
    assert.is_true(l:listen("one"))
    assert.is_true(s:notify("one", "hello"))
    local note = assert(l:wait(5))
    assert.equal("one", note.channel)
    assert.equal("hello", note.payload)
    assert.equal(s:pid(), note.pid)
    assert.is_true(math.abs(note.received_at - os.time()) < 5)
  end)

  it("round-trips on several channels and unlistens", function()
    assert.is_true(l:listen("a", "b", "c"))
    assert.same({ "a", "b", "c" }, l:channels())
    for _, ch in ipairs({ "c", "a", "b" }) do assert(s:notify(ch, ch .. "!")) end
    local got = drain(l, 3)
    assert.same({ "c", "a", "b" }, { got[1].channel, got[2].channel, got[3].channel })
    assert.equal("a!", got[2].payload)
    assert.is_true(l:unlisten("a"))
    assert.same({ "b", "c" }, l:channels())
    assert(s:notify("a", "x")); assert(s:notify("b", "y"))
    assert.equal("b", assert(l:wait(5)).channel)
    assert.is_true(l:unlisten())
    assert.same({}, l:channels())
    assert(s:notify("b", "z"))
    assert.same({ nil, "timeout" }, { l:wait(0.2) })
  end)

  local odd = {
    "Mixed Case", 'a"b', "sp ace", "ünïcødé_канал_频道", "a'b", "a;b", "x\\y",
    "UPPER", "123start", ("x"):rep(63),
  }
  for _, ch in ipairs(odd) do
    it("handles the channel name " .. ("%q"):format(ch), function()
      assert.is_true(l:listen(ch))
      assert.same({ ch }, l:channels())
      assert.is_true(s:notify(ch, "p"))
      local note = assert(l:wait(5))
      assert.equal(ch, note.channel)
      -- the server listens to exactly this name, case and all
      assert.equal(ch, l:exec("SELECT pg_listening_channels() AS c")[1].c)
    end)
  end

  it("does not fold case: Mixed and mixed are two channels", function()
    assert(l:listen("Mixed"))
    assert(s:notify("mixed", "lower"))
    assert(s:notify("Mixed", "exact"))
    assert.equal("exact", assert(l:wait(5)).payload)
    assert.same({ nil, "timeout" }, { l:wait(0.1) })
  end)

  it("refuses channel names of 64+ bytes, empty names and zero bytes clearly", function()
    local ok, err = l:listen(("x"):rep(64))
    assert.is_nil(ok); assert.matches("64 bytes, the limit is 63", err)
    ok, err = l:listen(("é"):rep(32)) -- 64 bytes in 32 characters
    assert.is_nil(ok); assert.matches("64 bytes", err)
    ok, err = s:notify(("x"):rep(100), "p")
    assert.is_nil(ok); assert.matches("100 bytes", err)
    ok, err = l:listen("")
    assert.is_nil(ok); assert.matches("empty", err)
    ok, err = l:listen("a\0b")
    assert.is_nil(ok); assert.matches("zero byte", err)
    assert.same({}, l:channels())
    assert.has_error(function() l:listen(42) end)
    assert.has_error(function() l:listen() end)
  end)

  local payloads = {
    { "empty", "" },
    { "7999 bytes", ("p"):rep(7999) },
    { "multi-byte UTF-8", "héllo wörld — 日本語 😀" },
    { "quotes and backslashes", [[it's "quoted" \ back\slash \\ ' '' $1 $$]] },
    { "SQL-looking text", "'); DROP TABLE x; --" },
    { "JSON", '{"id":1,"s":"a\\"b"}' },
  }
  for _, case in ipairs(payloads) do
    it("carries a payload unchanged: " .. case[1], function()
      assert(l:listen("p"))
      assert.is_true(s:notify("p", case[2]))
      assert.equal(case[2], assert(l:wait(5)).payload)
    end)
  end

  it("sends a table payload as JSON", function()
    assert(l:listen("j"))
    assert(s:notify("j", { id = 7, name = "x" }))
    local v = pg.json.decode(assert(l:wait(5)).payload)
    assert.same({ id = 7, name = "x" }, v)
    assert.equal("integer", math.type(v.id))
  end)

  it("refuses a payload of 8000 bytes before it reaches the server", function()
    assert(l:listen("big"))
    local ok, err = s:notify("big", ("p"):rep(8000))
    assert.is_nil(ok)
    assert.matches("8000 bytes", err)
    assert.matches("shorter than 8000", err)
    ok = s:notify("big", { data = ("p"):rep(9000) })
    assert.is_nil(ok)
    assert.same({ nil, "timeout" }, { l:wait(0.2) })
    -- the connection is fine afterwards
    assert(s:notify("big", "small"))
    assert.equal("small", assert(l:wait(5)).payload)
  end)

  it("receives 50,000 notifications sent in one transaction, in order, none lost", function()
    local N = 50000
    assert(l:listen("bulk"))
    assert(s:exec(("SELECT count(pg_notify('bulk', g::text)) FROM generate_series(1, %d) g"):format(N)))
    local expect = 1
    while expect <= N do
      local note, err = l:wait(10)
      assert(note, err)
      assert.equal(expect, tonumber(note.payload))
      expect = expect + 1
    end
    assert.same({ nil, "timeout" }, { l:wait(0.1) })
  end)

  it("keeps order across transactions and senders", function()
    local s2 = H.connect()
    assert(l:listen("o"))
    for i = 1, 200 do
      assert((i % 2 == 0 and s or s2):notify("o", tostring(i)))
    end
    for i = 1, 200 do assert.equal(tostring(i), assert(l:wait(5)).payload) end
    s2:close()
  end)

  it("does not lose notifications that arrive while exec runs on the listener", function()
    assert(l:listen("during"))
    -- sent before the listener's query: read by libpq while it waits for rows
    for i = 1, 100 do assert(s:notify("during", "before" .. i)) end
    -- sent by another client while the listener's query is still running
    os.execute("(sleep 0.2; psql -qX -c \"SELECT pg_notify('during', 'while' || g) FROM generate_series(1, 100) g\" "
      .. ">/dev/null 2>&1) &")
    local rows = assert(l:exec("SELECT pg_sleep(1.0), 42 AS answer"))
    assert.equal(42, rows[1].answer)
    local got = drain(l, 200, 5)
    assert.equal(200, #got)
    for i = 1, 100 do
      assert.equal("before" .. i, got[i].payload)
      assert.equal("while" .. i, got[100 + i].payload)
    end
  end)

  it("returns buffered notifications without the socket: even after the backend is gone", function()
    assert(l:listen("buf"))
    for i = 1, 5 do assert(s:notify("buf", tostring(i))) end
    assert(l:exec("SELECT pg_sleep(0.2)")) -- libpq reads the five during this query
    assert(s:exec("SELECT pg_terminate_backend($1)", l:pid()))
    H.sleep(0.2)
    for i = 1, 5 do assert.equal(tostring(i), assert(l:wait(0)).payload) end
    local note, err, code = l:wait(1)
    assert.is_nil(note)
    assert.matches("connection lost", err)
    assert.equal("08006", code)
    assert.equal("bad", l:status())
  end)

  it("drain() returns what is already there without blocking", function()
    assert(l:listen("d"))
    assert.equal(0, l:drain(10).n)
    for i = 1, 30 do assert(s:notify("d", tostring(i))) end
    H.sleep(0.1)
    local got = {}
    H.eventually(function()
      local batch = l:drain(7)
      assert.is_true(batch.n <= 7)
      for i = 1, batch.n do got[#got + 1] = batch[i].payload end
      return #got == 30
    end, 5)
    for i = 1, 30 do assert.equal(tostring(i), got[i]) end
  end)
end)

describe("conn:wait", function()
  it("returns nil, 'timeout' within 50 ms of the time asked", function()
    local l = H.connect()
    assert(l:listen("quiet"))
    for _, t in ipairs({ 0, 0.05, 0.3 }) do
      local t0 = H.now()
      local note, err = l:wait(t)
      local took = H.now() - t0
      assert.is_nil(note)
      assert.equal("timeout", err)
      assert.is_true(took >= t and took < t + 0.05, ("asked %g s, took %g s"):format(t, took))
    end
    l:close()
  end)

  it("wakes as soon as a notification arrives", function()
    local l = H.connect()
    assert(l:listen("soon"))
    os.execute("(sleep 0.2; psql -qX -c \"NOTIFY soon, 'x'\" >/dev/null 2>&1) &")
    local t0 = H.now()
    local note = assert(l:wait(10))
    assert.equal("x", note.payload)
    assert.is_true(H.now() - t0 < 2)
    l:close()
  end)

  it("exposes pollfd, events and timeout for event loops", function()
    local l = H.connect()
    assert.is_true(math.type(l:pollfd()) == "integer" and l:pollfd() >= 0)
    assert.equal("r", l:events())
    assert.is_nil(l:timeout())
    l:close()
  end)

  it("raises on a negative timeout", function()
    local l = H.connect()
    assert.has_error(function() l:wait(-1) end)
    l:close()
  end)
end)

describe("conn:exec", function()
  local c
  before_each(function() c = H.connect() end)
  after_each(function() c:close() end)

  it("maps every documented type", function()
    local r = assert(c:exec([[SELECT 1::int2 AS i2, 2::int4 AS i4, 9007199254740993::int8 AS i8,
      42::oid AS o, 1.5::float4 AS f4, 0.1::float8 AS f8, 'Infinity'::float8 AS finf,
      12.25::numeric AS n1, 123456789012::numeric AS n2, 0.000123::numeric AS n3,
      123456789012345678901234::numeric AS nbig, 3.14159265358979323846::numeric AS nprec,
      true AS bt, false AS bf, '{"k":[1,2,{"z":null}]}'::json AS j, '{"a":1}'::jsonb AS jb,
      NULL::int AS nul, 'text' AS t, 'x'::varchar AS v, '2024-01-02'::date AS d,
      '\x0102'::bytea AS by, 'a1b2c3d4-0000-0000-0000-000000000000'::uuid AS u]]))
    local row = r[1]
    assert.equal(1, r.n)
    local function int(v, want) assert.equal("integer", math.type(v)); assert.equal(want, v) end
    local function flt(v, want) assert.equal("float", math.type(v)); assert.equal(want, v) end
    int(row.i2, 1); int(row.i4, 2); int(row.i8, 9007199254740993); int(row.o, 42)
    flt(row.f4, 1.5); flt(row.f8, 0.1); flt(row.finf, math.huge)
    flt(row.n1, 12.25); int(row.n2, 123456789012); flt(row.n3, 0.000123)
    assert.equal("123456789012345678901234", row.nbig)
    assert.equal("3.14159265358979323846", row.nprec)
    assert.is_true(row.bt); assert.is_false(row.bf)
    assert.same({ k = { 1, 2, { z = pg.null } } }, row.j)
    assert.equal("integer", math.type(row.j.k[1]))
    assert.same({ a = 1 }, row.jb)
    assert.equal(pg.null, row.nul)
    assert.equal("text", row.t); assert.equal("x", row.v); assert.equal("2024-01-02", row.d)
    assert.equal("\\x0102", row.by); assert.equal("a1b2c3d4-0000-0000-0000-000000000000", row.u)
  end)

  it("sends parameters separately from the SQL: nil, booleans, numbers, strings, tables", function()
    local r = assert(c:exec([[SELECT $1::int IS NULL AS isnull, $2::bool AS b, $3::int8 AS i,
        $4::float8 AS f, $5::text AS s, $6::jsonb AS j, $7::text IS NULL AS isnull2, $8::float8 AS huge]],
      nil, true, math.maxinteger, 0.1, "it's \"q\" \\ $1", { a = { 1, 2 } }, pg.null, -math.huge))
    local row = r[1]
    assert.is_true(row.isnull); assert.is_true(row.b)
    assert.equal(math.maxinteger, row.i)
    assert.equal(0.1, row.f)
    assert.equal("it's \"q\" \\ $1", row.s)
    assert.same({ a = { 1, 2 } }, row.j)
    assert.is_true(row.isnull2)
    assert.equal(-math.huge, row.huge)
  end)

  it("keeps values out of the SQL text (no injection)", function()
    assert(c:exec("CREATE TEMP TABLE inj (v text)"))
    assert(c:exec("INSERT INTO inj VALUES ($1)", "x'); DROP TABLE inj; --"))
    assert.equal("x'); DROP TABLE inj; --", c:exec("SELECT v FROM inj")[1].v)
  end)

  it("reports affected rows and the command tag", function()
    assert(c:exec("CREATE TEMP TABLE t (id int primary key, v text)"))
    local r = assert(c:exec("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 5) g"))
    assert.equal(5, r.affected); assert.equal(0, r.n); assert.equal("INSERT 0 5", r.command)
    r = assert(c:exec("UPDATE t SET v = $1 WHERE id > $2", "w", 3))
    assert.equal(2, r.affected)
    r = assert(c:exec("SELECT * FROM t ORDER BY id"))
    assert.equal(5, r.n); assert.equal(5, #r); assert.equal("w", r[5].v)
  end)

  it("runs several statements without parameters and returns the last", function()
    local r = assert(c:exec("CREATE TEMP TABLE m (x int); INSERT INTO m VALUES (1), (2); SELECT sum(x) AS s FROM m"))
    assert.equal(3, r[1].s)
  end)

  it("returns the SQLSTATE of a failure and stays usable", function()
    local r, err, code = c:exec("SELECT * FROM no_such_table")
    assert.is_nil(r)
    assert.matches('relation "no_such_table" does not exist', err)
    assert.equal("42P01", code)
    r, err, code = c:exec("SELECT 1/0")
    assert.is_nil(r); assert.equal("22012", code); assert.matches("division by zero", err)
    r, err, code = c:exec("SELEC 1")
    assert.is_nil(r); assert.equal("42601", code); assert.matches("syntax error", err)
    assert.equal(1, c:exec("SELECT 1 AS x")[1].x)
  end)

  it("refuses a string parameter with a zero byte, raises on unsendable types", function()
    local r, err = c:exec("SELECT $1::text", "a\0b")
    assert.is_nil(r); assert.matches("zero byte", err)
    assert.has_error(function() c:exec("SELECT $1", function() end) end)
    assert.has_error(function() c:exec(42) end)
  end)

  it("refuses COPY without wedging the connection", function()
    local r, err = c:exec("COPY (SELECT 1) TO STDOUT")
    assert.is_nil(r); assert.matches("COPY", err)
    assert(c:exec("CREATE TEMP TABLE cp (x int)"))
    r, err = c:exec("COPY cp FROM STDIN")
    assert.is_nil(r); assert.matches("COPY", err)
    assert.equal(1, c:exec("SELECT 1 AS x")[1].x)
  end)

  it("bounds a query by the client-side timeout and reports a dead connection", function()
    c:settimeout(0.3)
    local t0 = H.now()
    local r, err, code = c:exec("SELECT pg_sleep(5)")
    assert.is_nil(r)
    assert.matches("timeout", err)
    assert.equal("08006", code)
    assert.is_true(H.now() - t0 < 1.5)
  end)

  it("collects server notices instead of printing them", function()
    assert(c:exec("DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$"))
    local n = c:notices()
    assert.equal(1, #n)
    assert.matches("hello 42", n[1])
    assert.equal(0, #c:notices())
  end)

  it("pings with a bound", function()
    assert.is_true(c:ping(1))
  end)

  it("runs a transaction and rolls back when the function raises", function()
    assert(c:exec("CREATE TEMP TABLE tx (x int)"))
    assert.same({ "done" }, { c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx VALUES (1)")); return "done" end) })
    local ok, err = c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx VALUES (2)")); error("boom") end)
    assert.is_nil(ok); assert.matches("boom", err)
    assert.equal(1, c:exec("SELECT count(*) AS n FROM tx")[1].n)
    assert.equal("idle", c:txstatus())
  end)
end)

describe("a broken connection", function()
  it("heals on its next call outside a transaction, with its LISTENs", function()
    local l, s = H.connect(), H.connect()
    assert(l:listen("heal", "Heal Two"))
    local old = l:pid()
    assert(s:exec("SELECT pg_terminate_backend($1)", old))
    local _, err, code = l:wait(2)
    assert.equal("08006", code, err)
    assert.equal("bad", l:status())
    assert.equal(1, assert(l:exec("SELECT 1 AS x"))[1].x)
    assert.is_true(l:pid() ~= old)
    assert(s:notify("Heal Two", "back"))
    assert.equal("back", assert(l:wait(5)).payload)
    l:close(); s:close()
  end)

  it("fails clearly inside a transaction; the transaction is gone", function()
    local c, s = H.connect(), H.connect()
    assert(c:exec("CREATE TABLE IF NOT EXISTS heal_tx (x int)"))
    assert(c:exec("BEGIN"))
    assert(c:exec("INSERT INTO heal_tx VALUES (1)"))
    assert(s:exec("SELECT pg_terminate_backend($1)", c:pid()))
    H.sleep(0.1)
    local r, err = c:exec("INSERT INTO heal_tx VALUES (2)")
    assert.is_nil(r)
    assert.is_string(err)
    r, err = c:exec("SELECT count(*) AS n FROM heal_tx")
    assert.is_nil(r)                -- every call fails until the caller ends the transaction
    assert.matches("transaction", err)
    assert(c:exec("ROLLBACK"))
    r = assert(c:exec("SELECT count(*) AS n FROM heal_tx"))
    assert.equal(0, r[1].n)
    c:close(); s:close()
  end)
end)

describe("life cycle", function()
  it("raises on use after close; close is idempotent", function()
    local c = H.connect()
    assert.is_true(c:close())
    assert.is_true(c:close())
    assert.matches("closed", tostring(c))
    for _, m in ipairs({ "exec", "wait", "listen", "notify", "pid", "status", "pollfd" }) do
      local ok, err = pcall(c[m], c, "x")
      assert.is_false(ok)
      assert.matches("attempt to use a closed connection", err)
    end
  end)

  it("closes a <close> variable at the end of its scope", function()
    local pid, ref
    do
      local c <close> = H.connect()
      pid, ref = c:pid(), c
    end
    assert.is_true(ref:isclosed())
    local s = H.connect()
    assert.truthy(H.eventually(function()
      return s:exec("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1", pid)[1].n == 0
    end, 5))
    s:close()
  end)

  it("closes a collected connection", function()
    local pid
    do pid = H.connect():pid() end
    collectgarbage(); collectgarbage()
    local s = H.connect()
    assert.truthy(H.eventually(function()
      return s:exec("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1", pid)[1].n == 0
    end, 5))
    s:close()
  end)
end)

describe("JSON encoding", function()
  local cases = {
    { { id = 123456789012345 }, '{"id":123456789012345}' },
    { { id = math.maxinteger }, '{"id":9223372036854775807}' },
    { { 1, 2, 3 }, "[1,2,3]" },
    { {}, "{}" },
    { { f = 0.1 }, '{"f":0.1}' },
    { { f = 1.0 }, '{"f":1}' },
    { { s = 'q"b\\n\n\1' }, '{"s":"q\\"b\\\\n\\n\\u0001"}' },
    { { n = H.pg.null }, '{"n":null}' },
    { { nan = 0 / 0 }, '{"nan":null}' },
    { { u = "héllo" }, '{"u":"héllo"}' },
  }
  for i, case in ipairs(cases) do
    it("encodes case " .. i .. " as " .. case[2], function()
      assert.equal(case[2], pg.json.encode(case[1]))
    end)
  end

  it("keeps big integers exact through parameters and notify payloads", function()
    local c, l = H.connect(), H.connect()
    assert.equal("123456789012345", c:exec("SELECT ($1::jsonb->>'id') AS v", { id = 123456789012345 })[1].v)
    assert.equal(9007199254740993, c:exec("SELECT ($1::jsonb->>'id')::int8 AS v", { id = 9007199254740993 })[1].v)
    assert(l:listen("big"))
    assert(c:notify("big", { id = 123456789012345 }))
    assert.equal('{"id":123456789012345}', assert(l:wait(5)).payload)
    c:close(); l:close()
  end)

  it("refuses what JSON cannot carry: raises, or nil, err from the safe variant", function()
    local t = {}; t.self = t
    assert.has_error(function() pg.json.encode(t) end)
    assert.has_error(function() pg.json.encode({ f = print }) end)
    assert.has_error(function() pg.json.encode({ [true] = 1 }) end)
    local r, err = pg.json.safe.encode(t)
    assert.is_nil(r); assert.matches("nested deeper", err)
  end)
end)

describe("JSON decoding (core.json_decode)", function()
  local decode = pg.json.safe.decode

  it("keeps integers exact to 64 bits and floats as floats", function()
    local v = assert(decode([[{"big":9007199254740993,"max":9223372036854775807,"min":-9223372036854775808,
      "neg":-42,"zero":-0,"f":1.5,"one":1.0,"e":1e3,"E":-2.5E-3,"huge":123456789012345678901234567890}]]))
    assert.equal(9007199254740993, v.big); assert.equal("integer", math.type(v.big))
    assert.equal(math.maxinteger, v.max); assert.equal(math.mininteger, v.min)
    assert.equal(-42, v.neg); assert.equal(-math.huge, 1 / v.zero) -- "-0" keeps its sign
    assert.equal(1.5, v.f)
    assert.equal("float", math.type(v.one)); assert.equal("float", math.type(v.e)); assert.equal(1000.0, v.e)
    assert.equal(-0.0025, v.E)
    assert.equal("123456789012345678901234567890", v.huge) -- no double holds it: the text
  end)

  it("decodes strings, escapes, literals, arrays and nesting", function()
    local v = assert(decode([[ { "s" : "a\\\"b\/\b\f\n\r\t\u00e9\u20ac\ud83d\ude00\u0000z" ,
      "a" : [ true , false , null , [ ] , { } , "" ] } ]]))
    assert.equal('a\\"b/\b\f\n\r\té€😀\0z', v.s)
    assert.same({ true, false, pg.null }, { v.a[1], v.a[2], v.a[3] })
    assert.same({}, v.a[4]); assert.same({}, v.a[5]); assert.equal("", v.a[6]); assert.equal(6, #v.a)
    assert.equal(2, assert(decode('{"k":1,"k":2}')).k)                -- the last duplicate wins
    assert.equal("\n", assert(decode([["\n"]])))                    -- an escape first
    assert.same({ ["\t"] = "\"" }, assert(decode([[{"\t":"\""}]])))
    local deep = assert(decode(("["):rep(999) .. "7" .. ("]"):rep(999)))  -- 999 levels: accepted
    for _ = 1, 999 do deep = deep[1] end
    assert.equal(7, deep)
  end)

  it("builds large arrays and objects, and maps many distinct keys right", function()
    local parts, keys = {}, {}
    for i = 1, 3000 do parts[i] = tostring(i * 3) end
    local a = assert(decode("[" .. table.concat(parts, ",") .. "]"))
    assert.equal(3000, #a); assert.equal(3, a[1]); assert.equal(768, a[256]); assert.equal(771, a[257])
    assert.equal(9000, a[3000])
    for i = 1, 700 do keys[i] = ('"key%d":%d'):format(i, i) end
    local o = assert(decode("{" .. table.concat(keys, ",") .. "}"))
    local n = 0
    for k, val in pairs(o) do n = n + 1; assert.equal("key" .. val, k) end
    assert.equal(700, n)
    -- keys seen before come from a cache: same keys, other values, other order
    for round = 1, 3 do
      local seen = {}
      for i = 1, 200 do
        local j = (i * 7 + round) % 200 + 1
        seen[#seen + 1] = ('"k%d":"%d-%d"'):format(j, j, round)
      end
      local t = assert(decode("{" .. table.concat(seen, ",") .. "}"))
      for j = 1, 200 do assert.equal(j .. "-" .. round, t["k" .. j]) end
    end
  end)

  it("refuses what RFC 8259 refuses, saying where", function()
    local cases = {
      { "", "^invalid JSON: empty input$" },
      { "   ", "unexpected end of input %(byte 4%)" },
      { "{", "unexpected end of input" },
      { '{"a":1,}', "expected a string key at byte 8 %('}'%)" },
      { "[1,]", "unexpected character at byte 4 %(']'%)" },
      { "[1 2]", "expected ',' or ']' at byte 4" },
      { '{"a" 1}', "expected ':' at byte 6" },
      { "01", "unexpected data after the value at byte 2" },
      { "1.", "invalid number" }, { "-", "invalid number" }, { "1e", "invalid number" },
      { ".5", "unexpected character at byte 1" },
      { "NaN", "unexpected character" }, { "Infinity", "unexpected character" },
      { "0x10", "unexpected data after the value at byte 2" },
      { "nul", "unexpected character" }, { "tru", "unexpected character" },
      { '"abc', "unterminated string" },
      { [["a\xb"]], "invalid escape in a string at byte 3" },
      { [["\u12"]], "invalid \\u escape" },
      { [["\ud800"]], "unpaired UTF%-16 surrogate" },
      { [["\udc00x"]], "unpaired UTF%-16 surrogate" },
      { '"a' .. "\t" .. 'b"', "control character in a string at byte 3 %(0x09%)" },
      { '"' .. "\0" .. '"', "control character in a string at byte 2 %(0x00%)" },
      { "{} {}", "unexpected data after the value at byte 4" },
      { ("["):rep(1001) .. ("]"):rep(1001), "nested deeper than 1000 levels" },
      { "// c\n{}", "unexpected character at byte 1 %('/'%)" },
    }
    for _, c in ipairs(cases) do
      local v, err = decode(c[1])
      assert.is_nil(v, c[1])
      assert.matches("^invalid JSON: ", err)
      assert.matches(c[2], err)
    end
    assert.has_error(function() pg.json.decode("[1,]") end, "invalid JSON: unexpected character at byte 4 (']')")
  end)

  it("decodes or refuses 20,000 mutated payloads, never anything else (fixed seed)", function()
    local seeds = {
      [[{"id":1,"ts":1732372000123456,"name":"user1","email":"user1@example.com","active":true}]],
      [[{"a":[1,2.5e-3,-0,{"b":null}],"s":"x\u00e9\ud83d\ude00\n","t":[[],{}]}]],
    }
    local alphabet = '{}[]",:\\ -+.eE0123456789truefalsnu\1\31\127\255'
    local rng = 12345
    local function rand(n) rng = (rng * 1103515245 + 12345) % 2147483648; return rng % n + 1 end
    local ok, bad = 0, 0
    for i = 1, 20000 do
      local s = seeds[i % 2 + 1]
      for _ = 1, rand(4) do
        local at, how = rand(#s), rand(3)
        local ch = alphabet:sub(rand(#alphabet)):sub(1, 1)
        if how == 1 then s = s:sub(1, at - 1) .. s:sub(at + 1)           -- delete
        elseif how == 2 then s = s:sub(1, at - 1) .. ch .. s:sub(at)     -- insert
        else s = s:sub(1, at - 1) .. ch .. s:sub(at + 1) end             -- replace
      end
      if rand(10) == 1 then s = s:sub(1, rand(#s)) end                     -- truncate
      local v, err = decode(s)
      if v == nil then
        bad = bad + 1
        assert.matches("^invalid JSON: ", err, 1, false, s)
      else
        ok = ok + 1
      end
    end
    assert.is_true(ok > 100 and bad > 100, ("decoded %d, refused %d"):format(ok, bad))
  end)

  it("decodes json and jsonb columns with exact bigints", function()
    local c = H.connect()
    local r = assert(c:exec([[SELECT '{"id":9007199254740993,"x":[1.5,null]}'::jsonb AS b,
      '{"id":9223372036854775807}'::json AS j]]))[1]
    assert.equal(9007199254740993, r.b.id); assert.equal(1.5, r.b.x[1]); assert.equal(pg.null, r.b.x[2])
    assert.equal(math.maxinteger, r.j.id)
    -- what cannot be decoded comes back as the text
    r = assert(c:exec([[SELECT (repeat('[', 1001) || repeat(']', 1001))::json AS deep]]))[1]
    assert.equal(("["):rep(1001) .. ("]"):rep(1001), r.deep)
    c:close()
  end)

  it("keeps lua-cjson as json.cjson_decode (integral floats made integers)", function()
    local v = assert(pg.json.cjson_decode('{"a":1,"b":2.5,"n":null}'))
    assert.equal("integer", math.type(v.a)); assert.equal(2.5, v.b); assert.equal(pg.null, v.n)
    local bad, err = pg.json.cjson_decode("{bad")
    assert.is_nil(bad); assert.matches("^invalid JSON: ", err)
  end)
end)

describe("pglisten module", function()
  it("has null, _VERSION and json with safe variants", function()
    assert.is_string(pg._VERSION)
    assert.matches("^lua%-pglisten %d+%.%d+", pg._VERSION)
    assert.equal(require("cjson").null, pg.null)
    local v = pg.json.decode('{"a":1,"b":[2.5,null],"c":12345678901}')
    assert.equal("integer", math.type(v.a)); assert.equal(2.5, v.b[1]); assert.equal(pg.null, v.b[2])
    assert.equal("integer", math.type(v.c))
    assert.has_error(function() pg.json.decode("{bad") end)
    local r, err = pg.json.safe.decode("{bad")
    assert.is_nil(r); assert.is_string(err)
    assert.equal('{"a":1}', pg.json.encode({ a = 1 }))
    r, err = pg.json.safe.encode({ f = function() end })
    assert.is_nil(r); assert.is_string(err)
  end)
end)
