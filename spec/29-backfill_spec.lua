-- lua-pglisten backfill: a table's existing rows handed to a channel's
-- handler as INSERT events, in keyset pages, resumable after a real SIGKILL,
-- next to a runner that goes on handling live events.
local H = require "helpers"

local json = H.pg.json

local conns = H.conns(30)
local connect = conns.connect
after_each(conns.close)

-- A fresh database with the schema installed: conn, conninfo, dbname.
local function fresh() return H.outbox_db(connect, "backfill") end

local function one(c, sql, ...) return assert(c:exec(sql, ...))[1] end

local function backfill(ci, script, ...)
  local argv = { "backfill", "--db", ci, ... }
  argv[#argv + 1] = script
  return H.run_runner(argv)
end

-- A script whose channel `users` prints each event and note as one JSON line.
local function printing_script(extra)
  return H.script([[
return { channels = { users = { ]] .. (extra or "") .. [[ handler = function(ev, note)
  out(pglisten.json.encode({ op = ev.op, schema = ev.schema, table = ev.table, new = ev.new,
    old_is_null = ev.old == pglisten.json.null, backfill = note.backfill, payload = note.payload }))
end } } }
]])
end

local function events(stdout)
  local t = {}
  for _, l in ipairs(H.lines(stdout)) do t[#t + 1] = json.decode(l) end
  return t
end

describe("lua-pglisten backfill", function()
  it("hands every row, in key order and keyset pages, as the INSERT event the trigger sends", function()
    local c, ci = fresh()
    c:exec([[CREATE SCHEMA app; CREATE TABLE app."User s" (org int, id int, name text, PRIMARY KEY (org, id));
      CREATE TRIGGER cap AFTER INSERT ON app."User s" FOR EACH ROW
        EXECUTE FUNCTION pglisten.notify_trigger('cap', 'durable');
      INSERT INTO app."User s" SELECT o, i, 'n' || o || '-' || i FROM generate_series(1, 3) o, generate_series(1, 4) i
        ORDER BY random()]])
    local rc, out, err = backfill(ci, printing_script(), "--table", 'app."User s"', "--channel", "users",
      "--batch", "5")
    assert.equal(0, rc, err)
    local evs = events(out)
    assert.equal(12, #evs)
    local k = 0
    for o = 1, 3 do
      for i = 1, 4 do
        k = k + 1
        local e = evs[k]
        assert.same({ "INSERT", "app", "User s", o, i, true, true }, { e.op, e.schema, e.table, e.new.org, e.new.id,
          e.backfill, e.old_is_null })
        -- the very payload the capture trigger wrote for the row
        assert.equal(e.payload, one(c, [[SELECT payload FROM pglisten.outbox
          WHERE (payload::json -> 'new' ->> 'org')::int = $1 AND (payload::json -> 'new' ->> 'id')::int = $2]],
          o, i).payload)
      end
    end
    local r = one(c, "SELECT rows_done, last_key::text AS k, finished_at IS NOT NULL AS fin FROM pglisten.backfill")
    assert.same({ 12, '["3", "4"]', true }, { r.rows_done, r.k, r.fin })
    -- finished: a second run does nothing, --restart does it all again
    rc, out, err = backfill(ci, printing_script(), "--table", 'app."User s"', "--channel", "users")
    assert.same({ 0, "" }, { rc, out })
    assert.truthy(err:find("already finished", 1, true), err)
    rc, out = backfill(ci, printing_script(), "--table", 'app."User s"', "--channel", "users", "--restart")
    assert.equal(0, rc)
    assert.equal(12, #events(out))
  end)

  it("takes --where as SQL, each WHERE text a backfill of its own", function()
    local c, ci = fresh()
    c:exec("CREATE TABLE users (id int PRIMARY KEY, active bool); "
      .. "INSERT INTO users SELECT i, i % 3 = 0 FROM generate_series(1, 20) i")
    local rc, out, err = backfill(ci, printing_script(), "--table", "users", "--channel", "users",
      "--where", "active OR id = 1", "--batch", "2")
    assert.equal(0, rc, err)
    local ids = {}
    for i, e in ipairs(events(out)) do ids[i] = e.new.id end
    assert.same({ 1, 3, 6, 9, 12, 15, 18 }, ids)
    assert.same({ "public.users", "active OR id = 1", 7 },
      { one(c, "SELECT table_name FROM pglisten.backfill").table_name,
        one(c, "SELECT where_sql FROM pglisten.backfill").where_sql,
        one(c, "SELECT rows_done FROM pglisten.backfill").rows_done })
    -- a bad WHERE is the server's error, exit 1
    rc, out, err = backfill(ci, printing_script(), "--table", "users", "--channel", "users", "--where", "nope(")
    assert.equal("", out)
    assert.equal(1, rc, err)
    assert.truthy(err:find("syntax error", 1, true), err)
  end)

  it("refuses what it cannot do: exit 2 for usage, 1 for the database's no", function()
    local c, ci = fresh()
    c:exec("CREATE TABLE nokey (a int); CREATE VIEW v AS SELECT 1 AS a")
    local s = printing_script()
    for _, case in ipairs({
      { 2, { "--channel", "users" }, "needs --table" },
      { 2, { "--table", "nokey" }, "needs --channel" },
      { 2, { "--table", "nokey", "--channel", "other" }, 'has no channel "other"' },
      { 2, { "--table", "nokey", "--channel", "users", "--batch", "0" }, "whole number" },
      { 1, { "--table", "nokey", "--channel", "users" }, "has no primary key" },
      { 1, { "--table", "v", "--channel", "users" }, "is not a table" },
      { 1, { "--table", "missing", "--channel", "users" }, "does not exist" },
    }) do
      local rc, _, err = backfill(ci, s, table.unpack(case[2]))
      assert.equal(case[1], rc, err)
      assert.truthy(err:find(case[3], 1, true), err)
    end
    local rc, _, err = H.run_runner({ "backfill", "--db", "host=127.0.0.1 port=1 password=Sup3rSecret",
      "--table", "t", "--channel", "users", s })
    assert.equal(1, rc)
    assert.falsy(err:find("Sup3rSecret", 1, true), err)
  end)

  it("goes through the channel's retry settings, and a row that fails for good stops it before its page counts",
    function()
      local c, ci = fresh()
      c:exec("CREATE TABLE users (id int PRIMARY KEY); INSERT INTO users SELECT generate_series(1, 10);"
        .. "CREATE TABLE fail (id int, n int); INSERT INTO fail VALUES (7, 2); CREATE TABLE got (id int)")
      local script = H.script(([[
local db = pglisten.connect(%q)
return { channels = { users = { retry = { attempts = %s, backoff = 0.01 }, handler = function(ev)
  local r = db:exec("UPDATE fail SET n = n - 1 WHERE id = $1 AND n > 0 RETURNING n", ev.new.id)
  if r.n > 0 then error("not now") end
  db:exec("INSERT INTO got VALUES ($1)", ev.new.id)
end } } }
]]):format(ci, "tonumber(os.getenv('ATTEMPTS'))"))
      local p = H.spawn({ H.runner, "backfill", "--db", ci, "--table", "users", "--channel", "users",
        "--batch", "4", script }, { ATTEMPTS = "2" })
      assert.equal(1, p.wait(20), p.stderr())
      assert.truthy(p.stderr():find("rows of this page failed", 1, true), p.stderr())
      assert.equal(4, one(c, "SELECT rows_done FROM pglisten.backfill").rows_done)
      -- resumed with 3 attempts: the page 5..8 again (5, 6 and 8, which came after 7 in
      -- the failed page, twice), then the rest
      p = H.spawn({ H.runner, "backfill", "--db", ci, "--table", "users", "--channel", "users",
        "--batch", "4", script }, { ATTEMPTS = "3" })
      assert.equal(0, p.wait(20), p.stderr())
      local r = one(c, "SELECT count(*) AS n, count(DISTINCT id) AS d, "
        .. "string_agg(id::text, ',' ORDER BY id) FILTER (WHERE id IN (5, 6, 8)) AS twice FROM got")
      assert.same({ 13, 10, "5,5,6,6,8,8" }, { r.n, r.d, r.twice })
    end)

  it("resumes after a SIGKILL from its last finished page: every row at least once, no finished page again",
    function()
      local c, ci = fresh()
      local _, tci = H.createdb("backfilltgt")
      local t = connect(tci)
      c:exec("CREATE TABLE users (id int PRIMARY KEY, name text, n numeric); "
        .. "INSERT INTO users SELECT i, 'user ' || i, i * 1.5 FROM generate_series(1, 3000) i")
      t:exec("CREATE TABLE users (id int PRIMARY KEY, name text, n numeric); CREATE TABLE seen (id int)")
      local script = H.script(([[
local db = pglisten.connect(%q)
return { channels = { users = { handler = function(ev, note)
  assert(note.backfill)
  db:exec("INSERT INTO seen VALUES ($1)", ev.new.id)
  db:exec("INSERT INTO users VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET name = excluded.name, n = excluded.n",
    ev.new.id, ev.new.name, tostring(ev.new.n))
end } } }
]]):format(tci))
      local argv = { H.runner, "backfill", "--db", ci, "--table", "public.users", "--channel", "users",
        "--batch", "100", script }
      local p = H.spawn(argv)
      H.finally(function() p.stop() end)
      assert.truthy(H.eventually(function()
        local r = c:exec("SELECT rows_done FROM pglisten.backfill")
        return r and r[1] and r[1].rows_done >= 700
      end, 30), p.stderr())
      p.kill("KILL")
      assert.equal(137, p.wait(10))
      local recorded = one(c, "SELECT rows_done FROM pglisten.backfill").rows_done
      local seen_at_kill = one(t, "SELECT count(*) AS n FROM seen").n
      assert.truthy(recorded < 3000 and seen_at_kill >= recorded and seen_at_kill < recorded + 100,
        ("recorded %d, seen %d"):format(recorded, seen_at_kill))
      p = H.spawn(argv)
      assert.equal(0, p.wait(60), p.stderr())
      assert.truthy(p.stderr():find("backfill resuming", 1, true), p.stderr())
      -- the target equals the source
      local function dump(conn)
        return one(conn, "SELECT count(*) AS n, md5(string_agg(id || '|' || name || '|' || n, ',' ORDER BY id)) AS h "
          .. "FROM users")
      end
      assert.same(dump(c), dump(t))
      -- every row at least once; only the unfinished page's rows twice
      local r = one(t, [[SELECT count(DISTINCT id) AS d, coalesce(min(id), 0) AS lo, coalesce(max(id), 0) AS hi
        FROM (SELECT id FROM seen GROUP BY id HAVING count(*) > 1) AS x]])
      assert.equal(0, one(t, "SELECT count(*) AS n FROM generate_series(1, 3000) g(id) "
        .. "WHERE id NOT IN (SELECT id FROM seen)").n)
      assert.truthy(r.d <= 100, "rows handled twice: " .. r.d)
      if r.d > 0 then
        assert.truthy(r.lo > recorded and r.hi <= recorded + 100, ("twice: %d..%d, recorded %d"):format(r.lo, r.hi,
          recorded))
      end
      assert.equal(3000, one(c, "SELECT rows_done FROM pglisten.backfill WHERE finished_at IS NOT NULL").rows_done)
    end)

  it("converges with live events a runner handles meanwhile", function()
    local c, ci = fresh()
    local _, tci = H.createdb("backfilllive")
    local t = connect(tci)
    c:exec([[CREATE TABLE users (id int PRIMARY KEY, v int);
      INSERT INTO users SELECT i, 0 FROM generate_series(1, 1500) i;
      CREATE TRIGGER sync AFTER INSERT OR UPDATE OR DELETE ON users
        FOR EACH ROW EXECUTE FUNCTION pglisten.notify_trigger('users', 'durable')]])
    t:exec("CREATE TABLE users (id int PRIMARY KEY, v int)")
    local script = H.script(([[
local db = pglisten.connect(%q)
return { channels = { users = { durable = true, handler = function(ev, note)
  local row = ev.new
  if ev.op == "DELETE" then
    db:exec("DELETE FROM users WHERE id = $1", ev.old.id)
  elseif note.backfill then -- a live event, handled or still to come, knows better
    db:exec("INSERT INTO users VALUES ($1, $2) ON CONFLICT (id) DO NOTHING", row.id, row.v)
  else
    db:exec("INSERT INTO users VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = excluded.v", row.id, row.v)
  end
  if note.backfill then pglisten.sleep(0.001) end
end } } }
]]):format(tci))
    local runner = H.start(script, { "--db", ci })
    H.finally(function() runner.stop() end)
    local p = H.spawn({ H.runner, "backfill", "--db", ci, "--table", "users", "--channel", "users",
      "--batch", "50", script })
    local w = connect(ci)
    local k = 0
    while p.running() do
      k = k + 1
      w:exec("UPDATE users SET v = v + 1 WHERE id = $1 OR id = 1501 - $1", k * 7 % 1500 + 1)
      w:exec("INSERT INTO users VALUES ($1, 1)", 2000 + k)
      H.sleep(0.005)
    end
    assert.equal(0, p.wait(5), p.stderr())
    assert.truthy(k > 20, "writes during the backfill: " .. k)
    local function dump(conn)
      return one(conn, "SELECT count(*) AS n, md5(string_agg(id || ':' || v, ',' ORDER BY id)) AS h FROM users")
    end
    assert.truthy(H.eventually(function() return dump(c).h == dump(t).h end, 20),
      ("source %d rows, target %d"):format(dump(c).n, dump(t).n))
  end)

  it("shows progress on a terminal, log lines otherwise", function()
    local c, ci = fresh()
    c:exec("CREATE TABLE users (id int PRIMARY KEY); INSERT INTO users SELECT generate_series(1, 50); ANALYZE users")
    local s = H.script("return { channels = { users = function() pglisten.sleep(0.01) end } }")
    local rc, _, err = backfill(ci, s, "--table", "users", "--channel", "users", "--batch", "10")
    assert.equal(0, rc, err)
    assert.truthy(err:find("backfill finished.*rows=50"), err)
    assert.truthy(err:find("backfill progress", 1, true), err)
    assert.falsy(err:find("\r", 1, true))
    -- under a pseudo-terminal (script(1)): one line redrawn with \r
    local cmd = ("%s backfill --db %s --table users --channel users --batch 10 --restart %s"):format(
      H.q(H.runner), H.q(ci), H.q(s))
    local out, ok = H.sh("script -qec " .. H.q(cmd) .. " /dev/null")
    assert.truthy(ok, out)
    assert.truthy(out:find("\r\27%[Kbackfill public.users: %d+ rows/~50, %d+ rows/s, ETA %d:%d%d:%d%d"), out)
    assert.truthy(out:find("50 rows/~50", 1, true), out)
  end)
end)
