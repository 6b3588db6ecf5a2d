-- Faults, for real: terminated backends, a restarted server, a stopped target,
-- a server that comes up late, a backend that stops answering, bad input,
-- and a million-notification burst against the memory bound.
local H = require "helpers"

local script, lines, start = H.script, H.lines, H.start

local function count(s, pat)
  return select(2, s:gsub(pat, ""))
end

-- Runs SQL in the background through psql (keeps going while the spec acts).
local function background_sql(sql, db)
  local f = H.file("bg.sql", sql)
  os.execute(("psql -qX %s -f %s >%s.out 2>&1 &"):format(db and ("-d " .. H.q(db)) or "", H.q(f), H.q(f)))
  return f .. ".out"
end

describe("reconnecting", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("after pg_terminate_backend: on_connect with info.reconnect, every later notification handled", function()
    local db, ci = H.createdb("term")
    local c = H.connect(ci)
    assert(c:exec("CREATE TABLE sent (i int PRIMARY KEY)"))
    p = start(script([[
return {
  channels = { flow = function(row) out("got", row.i) end },
  on_connect = function(db, info)
    local m = db:exec("SELECT coalesce(max(i), 0) AS m FROM sent")[1].m
    out("connect", info.reconnect, m, info.disconnected_for and "gap" or "first")
  end,
}]]), { "--db", ci })
    local done = background_sql([[
DO $$ BEGIN
  FOR i IN 1..1500 LOOP
    INSERT INTO sent VALUES (i);
    PERFORM pg_notify('flow', json_build_object('i', i)::text);
    COMMIT;
    PERFORM pg_sleep(0.002);
  END LOOP;
END $$;]], db)
    H.sleep(1)
    local old = assert(H.runner_backend(db))
    assert(c:exec("SELECT pg_terminate_backend($1)", old))
    assert(H.eventually(function()
      return H.read(done) ~= "" or c:exec("SELECT count(*) AS n FROM sent")[1].n == 1500
    end, 30))
    local m
    for _, l in ipairs(lines(p.stdout())) do
      local r, v = l:match("^connect (%a+) (%d+)")
      if r == "true" then m = tonumber(v) end
    end
    assert(H.eventually(function()
      for _, l in ipairs(lines(p.stdout())) do
        if l:match("^connect true") then m = tonumber(l:match("^connect true (%d+)")) end
      end
      return m and p.stdout():find("got 1500\n", 1, true)
    end, 20), p.stderr())
    assert.is_true(m > 0 and m < 1500, "reconnected at " .. tostring(m))
    local got = {}
    for _, l in ipairs(lines(p.stdout())) do
      local i = l:match("^got (%d+)")
      if i then got[tonumber(i)] = true end
    end
    for i = m + 1, 1500 do assert.is_true(got[i] == true, "notification " .. i .. " was lost") end
    assert.matches("connection lost", p.stderr())
    assert.matches("reconnected.-disconnected_for=", p.stderr())
    assert.is_not_nil(H.runner_backend(db))
    assert.is_true(H.runner_backend(db) ~= old)
    c:close()
  end)

  it("survives a server restart during a burst; on_connect resync makes target equal source", function()
    local src, srcci = H.createdb("rsrc")
    local _, dstci = H.createdb("rdst")
    local s = H.connect(srcci)
    assert(s:exec([[
      CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL);
      CREATE FUNCTION items_notify() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF TG_OP = 'DELETE' THEN
          PERFORM pg_notify('items', json_build_object('op', TG_OP, 'id', OLD.id)::text);
        ELSE
          PERFORM pg_notify('items', json_build_object('op', TG_OP, 'id', NEW.id, 'v', NEW.v)::text);
        END IF;
        RETURN NULL;
      END $$;
      CREATE TRIGGER items_t AFTER INSERT OR UPDATE OR DELETE ON items FOR EACH ROW EXECUTE FUNCTION items_notify();]]))
    s:close()
    local d = H.connect(dstci)
    assert(d:exec("CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL)"))
    p = start(script(([[
local target = assert(pglisten.connect(%q))
local function apply(row)
  if row.op == "DELETE" then
    assert(target:exec("DELETE FROM items WHERE id = $1", row.id))
  else
    assert(target:exec("INSERT INTO items (id, v) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = excluded.v",
      row.id, row.v))
  end
end
return {
  reconnect = { min = 0.05, max = 0.5 },
  channels = { items = { handler = apply, retry = { attempts = 30, backoff = 0.1 } } },
  on_connect = function(db, info)
    -- LISTEN is in place: copy the whole source, then remove what is gone
    local rows = assert(db:exec("SELECT id, v FROM items"))
    local ids = {}
    for _, r in ipairs(rows) do
      assert(target:exec("INSERT INTO items (id, v) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = excluded.v",
        r.id, r.v))
      ids[#ids + 1] = r.id
    end
    assert(target:exec("DELETE FROM items WHERE NOT (id = ANY($1::int[]))", "{" .. table.concat(ids, ",") .. "}"))
    out("resynced", info.reconnect, #rows)
  end,
}]]):format(dstci)), { "--db", srcci })
    -- a burst of changes from a client that keeps going across the restart
    local burst = H.file("burst.sh", ([[
for b in $(seq 0 59); do
  until psql -qX -d %s -c "INSERT INTO items SELECT g, 'v' || g FROM generate_series($b*50+1, $b*50+50) g;
      UPDATE items SET v = v || '!' WHERE id %% 7 = 0 AND id > $b*50 - 50;
      DELETE FROM items WHERE id %% 11 = 0 AND id > $b*50 - 50;" >/dev/null 2>&1; do sleep 0.1; done
  sleep 0.03
done
echo finished
]]):format(src))
    os.execute(("sh %s >%s.out 2>&1 &"):format(H.q(burst), H.q(burst)))
    H.sleep(0.8)
    H.server("restart")
    assert(H.eventually(function() return H.read(burst .. ".out"):find("finished", 1, true) end, 60))
    local function dump(ci)
      local c = H.connect(ci)
      local r = assert(c:exec("SELECT string_agg(id || ':' || v, ',' ORDER BY id) AS s, count(*) AS n FROM items"))
      c:close()
      return r[1].s, r[1].n
    end
    local want = dump(srcci)
    assert(H.eventually(function() return dump(dstci) == want end, 30),
      "target differs from source\n" .. p.stderr())
    local _, n = dump(dstci)
    assert.is_true(n > 2000)
    assert.matches("resynced true", p.stdout())
    assert.is_true(p.running())
    d:close()
  end)

  it("retry covers a target database stopped for 3 seconds: no row lost", function()
    local tc = H.connect(H.conninfo2())
    assert(tc:exec("DROP TABLE IF EXISTS got; CREATE TABLE got (i int PRIMARY KEY)"))
    tc:close()
    p = start(script(([[
local target = assert(pglisten.connect(%q))
return { channels = { t = { retry = { attempts = 10, backoff = 0.25 }, handler = function(row)
  assert(target:exec("INSERT INTO got VALUES ($1) ON CONFLICT DO NOTHING", row.i))
  out("ok", row.i)
end } } }]]):format(H.conninfo2())))
    background_sql([[
DO $$ BEGIN FOR i IN 1..300 LOOP
  PERFORM pg_notify('t', json_build_object('i', i)::text); COMMIT; PERFORM pg_sleep(0.015);
END LOOP; END $$;]])
    H.sleep(1)
    H.server2("stop")
    H.sleep(3)
    H.server2("start")
    assert(H.eventually(function() return p.stdout():find("ok 300\n", 1, true) end, 40), p.stderr())
    local c = H.connect(H.conninfo2())
    assert.equal(300, c:exec("SELECT count(*) AS n FROM got")[1].n)
    c:close()
    assert.matches("handler failed; retrying", p.stderr())
    -- order kept: ok lines are 1..300 in order
    local expect = 1
    for _, l in ipairs(lines(p.stdout())) do
      assert.equal("ok " .. expect, l); expect = expect + 1
    end
  end)

  it("connects to a server that comes up 5 seconds after the runner starts", function()
    H.server2("stop")
    local ok, err = pcall(function()
      p = start(script([[return { channels = { late = function(row) out("late", row.x) end } }]]),
        { "--db", H.conninfo2(), "--reconnect-max", "1" }, nil, false)
      H.sleep(5)
      assert.is_true(p.running(), p.stderr())
      assert.is_nil(p.stderr():find("listening", 1, true))
    end)
    H.server2("start")
    assert(ok, err)
    assert(H.eventually(function() return p.stderr():find("listening", 1, true) end, 10), p.stderr())
    local c = H.connect(H.conninfo2())
    assert(c:notify("late", { x = "made it" }))
    c:close()
    assert(H.eventually(function() return p.stdout():find("late made it", 1, true) end, 5))
    -- retried quietly: one warning, not one per attempt
    assert.is_true(count(p.stderr(), "cannot connect yet") <= 2, p.stderr())
  end)

  it("notices a backend that stops answering within heartbeat + timeout, and reconnects", function()
    local db, ci = H.createdb("hb")
    p = start(script([[
return { heartbeat = 1, heartbeat_timeout = 1, channels = { hb = function(row) out("hb", row.i) end } }]]),
      { "--db", ci })
    local pid = assert(H.runner_backend(db))
    os.execute("kill -STOP " .. pid)
    local t0 = H.now()
    local ok, err = pcall(function()
      assert(H.eventually(function() return p.stderr():find("heartbeat failed", 1, true) end, 6), p.stderr())
    end)
    local took = H.now() - t0
    os.execute("kill -CONT " .. pid)
    assert(ok, err)
    assert.is_true(took <= 1 + 1 + 0.8, ("noticed after %.2f s"):format(took))
    assert(H.eventually(function() return p.stderr():find("reconnected", 1, true) end, 10))
    local c = H.connect(ci)
    assert(c:notify("hb", { i = 1 }))
    c:close()
    assert(H.eventually(function() return p.stdout():find("hb 1", 1, true) end, 5))
  end)

  it("handler retries keep the order of later notifications", function()
    p = start(script([[
local fails = 0
return {
  channels = { r = { retry = { attempts = 3, backoff = 0.1 }, handler = function(row)
    if row.i == 1 and fails < 2 then fails = fails + 1; error("transient " .. fails) end
    out("r", row.i)
  end } },
  on_error = function(err) out("on_error", err) end,
}]]))
    local c = H.connect()
    for i = 1, 5 do assert(c:notify("r", { i = i })) end
    c:close()
    assert(H.eventually(function() return #lines(p.stdout()) >= 5 end, 10))
    assert.same({ "r 1", "r 2", "r 3", "r 4", "r 5" }, lines(p.stdout()))
    assert.equal(2, count(p.stderr(), "handler failed; retrying"))
    p.kill("USR1")
    assert(H.eventually(function() return p.stderr():find("retries=2", 1, true) end, 5))
  end)

  it("gives up after the attempts and calls on_error once", function()
    p = start(script([[
return {
  channels = { r = { retry = { attempts = 2, backoff = 0.05 }, handler = function() error("always") end } },
  on_error = function(err, note, info) out("on_error", info.attempts, note.payload) end,
}]]))
    local c = H.connect()
    assert(c:notify("r", "{}"))
    c:close()
    assert(H.eventually(function() return #lines(p.stdout()) >= 1 end, 5))
    H.sleep(0.3)
    assert.same({ "on_error 2 {}" }, lines(p.stdout()))
  end)

  it("logs statistics every stats_interval seconds", function()
    p = start(script([[return { stats_interval = 0.5, channels = { s = function() end } }]]))
    -- three within 1.8 s
    H.eventually(function() return count(p.stderr(), "INFO  stats") >= 3 end, 1.8)
    assert.is_true(count(p.stderr(), "INFO  stats") >= 3, p.stderr())
  end)

  it("exits 1 at once for a malformed conninfo", function()
    local rc, _, err = H.run_runner({ "--db", "host=127.0.0.1 port=", H.file("s.lua",
      "return { channels = { a = function() end } }") })
    assert.equal(1, rc)
    assert.matches("cannot connect", err)
  end)
end)

describe("bad input", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("logs and survives each case of the corpus", function()
    p = start(script([[
return {
  channels = {
    j = function(row) out("j", type(row), row.id or #row) end,
    raw = { decode = "raw", handler = function(t) out("raw", #t) end },
    tbl = function() error({ reason = "a table" }) end,
  },
  on_error = function(err, note, info) out("on_error", info.kind, note.channel) end,
  on_connect = function() out("on_connect"); error("on_connect broke") end,
}]]))
    local c = H.connect()
    local deep = ("["):rep(2000) .. ("]"):rep(2000)
    local cases = {
      { "j", "{invalid" }, { "j", "123" }, { "j", '"str"' }, { "j", "null" }, { "j", "[1,2,3]" },
      { "j", deep }, { "raw", ("x"):rep(7999) }, { "j", '{"id":' .. ("9"):rep(7000) .. "}" },
      { "tbl", "{}" }, { "j", '{"id":1}' },
    }
    for _, cs in ipairs(cases) do assert(c:notify(cs[1], cs[2])) end
    c:close()
    assert(H.eventually(function() return p.stdout():find("j table 1\n", 1, true) end, 10), p.stderr())
    local out = p.stdout()
    assert.matches("^on_connect\n", out)
    assert.equal(5, count(out, "on_error decode j"))   -- invalid, 123, "str", null, too deep
    assert.matches("j table " .. ("9"):rep(7000) .. "\n", out) -- a 7000-digit id arrives as its text
    assert.matches("j table 3", out)                      -- an array is a table
    assert.matches("raw 7999", out)
    assert.matches("on_error handler tbl", out)
    assert.matches("on_connect failed; listening goes on", p.stderr())
    assert.matches("nested deeper than 1000 levels", p.stderr())
    assert.is_true(p.running())
  end)

  it("passes invalid UTF-8 through (SQL_ASCII database) without dying", function()
    local name = "ascii_" .. os.time() % 100000
    H.psql("CREATE DATABASE " .. name .. " ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    local ci = "dbname=" .. name
    p = start(script([[
return { channels = { u = function(row) out("u", #row.s) end,
                      ur = { decode = "raw", handler = function(t) out("ur", #t) end } },
  on_error = function(err, note, info) out("on_error", info.kind) end }]]), { "--db", ci })
    local c = H.connect(ci)
    assert(c:exec([[SELECT pg_notify('ur', E'\xff\xfe\x80'), pg_notify('u', E'{"s":"\xff\xfe"}'),
      pg_notify('u', '{"s":"ok"}')]]))
    c:close()
    assert(H.eventually(function() return p.stdout():find("u 2\n", 1, true) end, 10), p.stderr())
    assert.matches("ur 3", p.stdout())
    assert.is_true(p.running())
  end)
end)

describe("memory", function()
  it("stays bounded under a one-million-notification burst with a slow handler", function()
    local _, ci = H.createdb("mem")
    local p = start(script([[
return { stats_interval = 0, channels = { m = function(row) pglisten.sleep(0.0002) end } }]]), { "--db", ci })
    local ok, err = pcall(function()
      local c = H.connect(ci)
      c:settimeout(120)
      assert(c:exec([[DO $$ BEGIN
        FOR k IN 0..999 LOOP
          PERFORM pg_notify('m', json_build_object('id', g, 'name', 'user' || g,
              'email', 'user' || g || '@example.com')::text)
            FROM generate_series(k * 1000 + 1, k * 1000 + 1000) g;
          COMMIT;
        END LOOP; END $$]]))
      -- the server holds what the runner has not read yet
      local usage = c:exec("SELECT pg_notification_queue_usage() AS u")[1].u
      c:close()
      H.sleep(1)
      local status = H.read("/proc/" .. p.pid .. "/status")
      local hwm = tonumber(status:match("VmHWM:%s*(%d+)"))
      assert.is_true(p.running())
      assert.is_true(hwm < 64 * 1024, ("peak RSS %d KiB"):format(hwm))
      assert.is_true(usage > 0, "server queue usage " .. tostring(usage))
      print(("\n  memory: runner peak RSS %.1f MiB with a 1,000,000-notification backlog; server queue %.4f full")
        :format(hwm / 1024, usage))
    end)
    p.stop()
    assert(ok, err)
  end)
end)
