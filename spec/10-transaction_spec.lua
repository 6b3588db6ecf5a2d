-- A connection's promises at their edges: a transaction whose connection is
-- lost is never continued outside it, channels() is what the server has
-- committed, the statement cache never reads English, and SQL with a zero
-- byte is refused.  Backends are really terminated (pg_terminate_backend).
local H = require "helpers"

local count, kill_later, kill_now = H.count_rows, H.kill_later, H.kill_now

describe("a transaction is never split", function()
  local c, admin
  before_each(function()
    c, admin = H.connect(), H.connect()
    assert(admin:exec("DROP TABLE IF EXISTS tx10; CREATE TABLE tx10 (id int)"))
  end)
  after_each(function() c:close(); admin:close() end)

  it("transaction(): a backend killed during a statement fails it; none of its rows are kept", function()
    local old, errs = c:pid(), {}
    local killer = kill_later(old, 0.5)
    local ok, err, code = c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx10 VALUES (1), (2)"))
      local r, e, s = conn:exec("SELECT pg_sleep(10)")          -- terminated under it
      errs[#errs + 1] = { r, e, s }
      -- a careless fn carries on: none of this may run outside the transaction
      for i = 3, 5 do errs[#errs + 1] = { conn:exec("INSERT INTO tx10 VALUES ($1)", i) } end
      errs[#errs + 1] = { conn:execmany("INSERT INTO tx10 VALUES ($1)", { { 6 }, { 7 } }) }
      return "done"
    end)
    killer.wait(10)
    assert.is_nil(ok)
    assert.matches("transaction", err)
    assert.equal("08003", code)
    assert.is_nil(errs[1][1]); assert.equal("08006", errs[1][3])
    for i = 2, #errs do
      assert.is_nil(errs[i][1]); assert.equal("08003", errs[i][3]); assert.matches("transaction", errs[i][2])
    end
    assert.equal(0, count(admin, "tx10"))
    -- outside the transaction the connection heals
    assert.equal(1, assert(c:exec("SELECT 1 AS x"))[1].x)
    assert.are_not.equal(old, c:pid())
    assert.equal("idle", c:txstatus())
    assert(c:transaction(function(conn) return conn:exec("INSERT INTO tx10 VALUES (8)") end))
    assert.equal(1, count(admin, "tx10"))
  end)

  it("transaction(): a backend killed between statements fails it; none of its rows are kept", function()
    local seen = {}
    local ok, err, code = c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx10 VALUES (1)"))
      kill_now(admin, conn)
      seen[1] = { conn:exec("INSERT INTO tx10 VALUES (2)") }  -- finds the loss
      seen[2] = { conn:exec("INSERT INTO tx10 VALUES (3)") }
      return true
    end)
    assert.is_nil(ok); assert.matches("nothing was committed", err); assert.equal("08003", code)
    assert.is_nil(seen[1][1]); assert.equal("08006", seen[1][3]); assert.matches("transaction", seen[1][2])
    assert.is_nil(seen[2][1]); assert.equal("08003", seen[2][3])
    assert.equal(0, count(admin, "tx10"))
    assert.equal(1, assert(c:exec("SELECT 1 AS x"))[1].x)
  end)

  it("transaction(): a fn that returns nil, err after the loss gets its own error back", function()
    local ok, err = c:transaction(function(conn)
      kill_now(admin, conn)
      return conn:exec("INSERT INTO tx10 VALUES (1)")
    end)
    assert.is_nil(ok); assert.matches("transaction", err)
    assert.equal(0, count(admin, "tx10"))
    assert.equal(1, assert(c:exec("SELECT 1 AS x"))[1].x)
  end)

  it("explicit BEGIN through exec: every call fails until ROLLBACK, then the next one heals", function()
    local old = c:pid()
    assert(c:exec("BEGIN"))
    assert(c:exec("INSERT INTO tx10 VALUES (1)"))
    kill_now(admin, c)
    local r, err, code = c:exec("INSERT INTO tx10 VALUES (2)")
    assert.is_nil(r); assert.equal("08006", code); assert.matches("inside a transaction", err)
    for _ = 1, 3 do
      r, err, code = c:exec("INSERT INTO tx10 VALUES (3)")
      assert.is_nil(r); assert.equal("08003", code); assert.matches("ROLLBACK", err)
    end
    r, err, code = c:exec("SELECT $1::int AS x", 1)
    assert.is_nil(r, err); assert.equal("08003", code)
    r, err, code = c:execmany("INSERT INTO tx10 VALUES ($1)", { { 4 } })
    assert.is_nil(r, err); assert.equal("08003", code)
    r, err, code = c:exec("ROLLBACK TO SAVEPOINT nope")       -- does not end the transaction
    assert.is_nil(r, err); assert.equal("08003", code)
    assert.equal(0, count(admin, "tx10"))
    r = assert(c:exec("ROLLBACK"))                            -- the server rolled it back already
    assert.equal("ROLLBACK", r.command)
    assert.equal(1, assert(c:exec("SELECT 1 AS x"))[1].x)    -- heals
    assert.are_not.equal(old, c:pid())
    assert(c:exec("INSERT INTO tx10 VALUES (5)"))
    assert.equal(1, count(admin, "tx10"))
  end)

  it("a ROLLBACK followed by more statements ends the lost transaction and runs the rest healed", function()
    assert(c:exec("BEGIN"))
    assert(c:exec("INSERT INTO tx10 VALUES (1)"))
    kill_now(admin, c)
    local r = assert(c:exec("/* done */ rollback work; INSERT INTO tx10 VALUES (2); SELECT count(*) AS n FROM tx10"))
    assert.equal(1, r[1].n)
    assert.equal("idle", c:txstatus())
  end)

  it("a COMMIT after the loss reports failure, never a commit", function()
    -- the COMMIT is the first call after the loss
    assert(c:exec("BEGIN"))
    assert(c:exec("INSERT INTO tx10 VALUES (1)"))
    kill_now(admin, c)
    local r, err, code = c:exec("COMMIT")
    assert.is_nil(r); assert.equal("08006", code); assert.matches("nothing was committed", err)
    assert.equal(1, assert(c:exec("SELECT 1 AS x"))[1].x)
    -- after other failed calls, spelled END
    assert(c:exec("BEGIN"))
    assert(c:exec("INSERT INTO tx10 VALUES (2)"))
    kill_now(admin, c)
    assert.is_nil(c:exec("INSERT INTO tx10 VALUES (3)"))
    r, err, code = c:exec("  end work")
    assert.is_nil(r); assert.equal("08003", code); assert.matches("nothing was committed", err)
    assert.equal(0, count(admin, "tx10"))
    assert.equal(1, assert(c:exec("SELECT 1 AS x"))[1].x)
    assert.equal("idle", c:txstatus())
  end)

  it("a connection lost during the COMMIT itself is 08007 (outcome unknown), and the next call heals", function()
    -- a deferred constraint trigger makes the COMMIT run long enough to be killed under
    assert(admin:exec([[CREATE OR REPLACE FUNCTION tx10_slow() RETURNS trigger LANGUAGE plpgsql AS
      $$ BEGIN PERFORM pg_sleep(10); RETURN NULL; END $$;
      CREATE CONSTRAINT TRIGGER tx10_slow AFTER INSERT ON tx10 DEFERRABLE INITIALLY DEFERRED
      FOR EACH ROW EXECUTE FUNCTION tx10_slow()]]))
    local killer
    local ok, err, code = c:transaction(function(conn)
      assert(conn:exec("INSERT INTO tx10 VALUES (1)"))
      killer = kill_later(conn:pid(), 0.5)
      return true
    end)
    killer.wait(10)
    assert.is_nil(ok); assert.equal("08007", code); assert.matches("COMMIT", err)
    assert.equal(0, count(admin, "tx10"))
    assert.equal(1, assert(c:exec("SELECT 1 AS x"))[1].x)
    assert.equal("idle", c:txstatus())
  end)

  it("a connection lost during a statement of an explicit transaction stays lost until it ends", function()
    assert(c:exec("BEGIN"))
    assert(c:exec("INSERT INTO tx10 VALUES (1)"))
    local killer = kill_later(c:pid(), 0.5)
    local r, _, code = c:exec("SELECT pg_sleep(10)")
    killer.wait(10)
    assert.is_nil(r); assert.equal("08006", code)
    r, _, code = c:exec("INSERT INTO tx10 VALUES (2)")
    assert.is_nil(r); assert.equal("08003", code)
    assert(c:exec("ABORT"))
    assert(c:exec("INSERT INTO tx10 VALUES (3)"))
    assert.same({ { id = 3 } }, { assert(admin:exec("SELECT id FROM tx10"))[1] })
  end)

  it("execmany in a transaction: a batch killed under it fails the rest and the transaction", function()
    local out = {}
    local killer
    local ok, _, code = c:transaction(function(conn)
      assert.equal(2, assert(conn:execmany("INSERT INTO tx10 VALUES ($1)", { { 1 }, { 2 } })))
      killer = kill_later(conn:pid(), 0.5)
      out[1] = { conn:execmany("INSERT INTO tx10 SELECT $1::int FROM pg_sleep(10)", { { 3 }, { 4 } }) }
      out[2] = { conn:execmany("INSERT INTO tx10 VALUES ($1)", { { 5 } }) }
      return true
    end)
    killer.wait(10)
    assert.is_nil(ok); assert.equal("08003", code)
    assert.is_nil(out[1][1]); assert.equal("08006", out[1][3])
    assert.is_nil(out[2][1]); assert.equal("08003", out[2][3])
    assert.equal(0, count(admin, "tx10"))
    assert.equal(1, assert(c:execmany("INSERT INTO tx10 VALUES ($1)", { { 6 } })))  -- heals
    assert.equal(1, count(admin, "tx10"))
  end)

  it("a BEGIN that starts a multi-statement string and loses the connection counts as inside", function()
    local killer = kill_later(c:pid(), 0.5)
    local r, _, code = c:exec("BEGIN; INSERT INTO tx10 VALUES (1); SELECT pg_sleep(10)")
    killer.wait(10)
    assert.is_nil(r); assert.equal("08006", code)
    r, _, code = c:exec("INSERT INTO tx10 VALUES (2)")
    assert.is_nil(r); assert.equal("08003", code)
    r, _, code = c:exec("COMMIT")
    assert.is_nil(r); assert.equal("08003", code)
    assert.equal(0, count(admin, "tx10"))
  end)
end)

describe("channels() follows what the server has committed", function()
  local c, admin
  before_each(function() c, admin = H.connect(), H.connect() end)
  after_each(function() c:close(); admin:close() end)

  local function server_channels(conn)
    local list = {}
    for i, row in ipairs(assert(conn:exec("SELECT ch FROM pg_listening_channels() AS ch ORDER BY ch COLLATE \"C\""))) do
      list[i] = row.ch
    end
    return list
  end
  local function same_as_server(expected)
    local mine = c:channels()
    assert.same(server_channels(c), mine)
    assert.same(expected, mine)
    assert.same(expected, c:channels())
  end

  it("after COMMIT, ROLLBACK, savepoints, transaction(), exec; and a heal LISTENs to that set", function()
    assert(c:listen("keep"))
    same_as_server({ "keep" })
    assert(c:exec("BEGIN")); assert(c:listen("rolled")); same_as_server({ "keep" })
    assert(c:exec("ROLLBACK")); same_as_server({ "keep" })
    assert(c:exec("BEGIN")); assert(c:listen("committed")); assert(c:exec("COMMIT"))
    same_as_server({ "committed", "keep" })
    assert(c:exec("BEGIN"))
    assert(c:exec("SAVEPOINT s")); assert(c:listen("undone")); assert(c:exec("ROLLBACK TO SAVEPOINT s"))
    assert(c:listen("Saved One")); assert(c:exec("RELEASE s"))
    assert(c:exec("COMMIT"))
    same_as_server({ "Saved One", "committed", "keep" })
    assert(c:exec("BEGIN")); assert(c:unlisten("keep")); assert(c:exec("ROLLBACK"))
    same_as_server({ "Saved One", "committed", "keep" })
    assert(c:exec("BEGIN")); assert(c:unlisten()); assert(c:exec("ROLLBACK"))
    same_as_server({ "Saved One", "committed", "keep" })
    assert.is_nil(c:transaction(function(conn) assert(conn:listen("raised")); error("no") end))
    same_as_server({ "Saved One", "committed", "keep" })
    assert(c:transaction(function(conn) return conn:listen("in_tx") end))
    same_as_server({ "Saved One", "committed", "in_tx", "keep" })
    assert(c:exec("LISTEN by_exec; UNLISTEN committed"))
    same_as_server({ "Saved One", "by_exec", "in_tx", "keep" })
    -- a transaction whose connection is lost applied nothing
    assert(c:exec("BEGIN")); assert(c:listen("lost")); assert(c:unlisten("keep"))
    kill_now(admin, c)
    assert.is_nil(c:exec("SELECT 1"))
    assert(c:exec("ROLLBACK"))
    local expected = { "Saved One", "by_exec", "in_tx", "keep" }
    same_as_server(expected)                                 -- healed, LISTENs again
    -- and a heal outside a transaction: exactly the committed set hears NOTIFY
    kill_now(admin, c)
    assert.equal(1, assert(c:exec("SELECT 1 AS x"))[1].x)
    same_as_server(expected)
    local all = { "keep", "rolled", "committed", "undone", "Saved One", "raised", "in_tx", "by_exec", "lost" }
    for _, ch in ipairs(all) do assert(admin:notify(ch, ch)) end
    assert(admin:notify("keep", "last"))
    local heard = {}
    while true do
      local note = assert(c:wait(5))
      if note.payload == "last" then break end
      heard[#heard + 1] = note.channel
    end
    table.sort(heard)
    assert.same(expected, heard)
  end)
end)

-- A server of our own whose messages are German (Debian's postgres .mo
-- catalogs; LANGUAGE in the server's environment picks them, with
-- lc_messages = C.UTF-8).  Returns a conninfo and a stop function.
local function german_server()
  local bin = os.getenv("PGBIN") or H.sh("ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1"):gsub("%s+$", "")
  -- as the postgres user when root, and without make check's sanitizer preload
  local as = "env -u LD_PRELOAD " .. (H.sh("id -u"):match("^0%s") and "runuser -u postgres -- " or "")
  local dir = H.file("de", "") .. ".d"
  local function run(cmd)
    local out, ok = H.sh(as .. cmd)
    assert(ok, cmd .. ": " .. out)
  end
  run("mkdir " .. H.q(dir))
  run(("%s/initdb -D %s/data -A trust -U postgres --no-sync"):format(H.q(bin), H.q(dir)))
  run(("env LANGUAGE=de %s/pg_ctl -D %s/data -l %s/log -w -o %s start"):format(H.q(bin), H.q(dir), H.q(dir),
    H.q("-p 5432 -k " .. dir .. " -c listen_addresses='' -c lc_messages=C.UTF-8")))
  local pid = H.read(dir .. "/data/postmaster.pid"):match("^(%d+)")
  if pid and H.pidfile then
    local f = io.open(H.pidfile, "a"); if f then f:write(pid, "\n"); f:close() end
  end
  return ("host=%s port=5432 user=postgres dbname=postgres"):format(dir), function()
    H.sh(as .. ("%s/pg_ctl -D %s/data -m immediate -w stop"):format(H.q(bin), H.q(dir)))
  end
end

describe("the statement cache decides on SQLSTATE, not on message text", function()
  it("re-runs a stale statement unnamed when the server's messages are German", function()
    local conninfo, stop = german_server()
    H.finally(stop)
    local c = H.connect(conninfo)
    local _, err = c:exec("SELECT 1/0")
    assert.matches("Division durch Null", err)                -- the server speaks German
    assert(c:exec("CREATE TABLE de (id int, v text); INSERT INTO de VALUES (1, 'a')"))
    local q = "SELECT * FROM de WHERE id = $1"
    for _ = 1, 3 do assert.equal("a", assert(c:exec(q, 1))[1].v) end
    assert(c:exec("ALTER TABLE de ADD COLUMN extra int DEFAULT 7"))
    local r, e = c:exec(q, 1)                                -- 0A000 in German, then unnamed
    assert.is_table(r, e)
    assert.equal(7, r[1].extra)
    -- 26000 (DEALLOCATE ALL behind the cache's back, as a pooler might)
    local q2 = "SELECT $1::int + 1 AS y"
    assert(c:exec(q2, 1)); assert(c:exec(q2, 1))            -- prepared now
    assert(c:exec("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$"))
    r, e = c:exec(q2, 1)                                     -- 26000 in German, then unnamed
    assert.is_table(r, e)
    assert.equal(2, r[1].y)
    c:close()
  end)

  local function runs_once(errcode, text)
    local c = H.connect()
    assert(c:exec("CREATE TEMP SEQUENCE runs10"))
    assert(c:exec(([[CREATE FUNCTION pg_temp.fails10(x int) RETURNS int LANGUAGE plpgsql AS $$
      BEGIN PERFORM nextval('runs10'); RAISE EXCEPTION '%s' USING ERRCODE = '%s'; END $$]]):format(text, errcode)))
    for _ = 1, 4 do
      local ok, err, code = c:exec("SELECT pg_temp.fails10($1)", 1)
      assert.is_nil(ok); assert.equal(errcode, code); assert.matches(text, err, 1, true)
    end
    assert.equal(4, assert(c:exec("SELECT last_value FROM runs10"))[1].last_value)
    c:close()
  end

  it("never runs a statement twice for an 0A000 raised while it runs, whatever its text", function()
    runs_once("0A000", "cached plan must not change result type")
  end)

  it("never runs a statement twice for a 26000 raised while it runs", function()
    runs_once("26000", 'prepared statement "pglisten_2" does not exist')
  end)
end)

describe("SQL with a zero byte", function()
  local c
  before_each(function()
    c = H.connect()
    assert(c:exec("DROP TABLE IF EXISTS zb10; CREATE TABLE zb10 (id int)"))
  end)
  after_each(function() c:close() end)

  it("is refused by exec, with or without parameters, and nothing runs", function()
    local r, err = c:exec("SELECT 1\0; DROP TABLE zb10")
    assert.is_nil(r); assert.matches("zero byte", err)
    r, err = c:exec("INSERT INTO zb10 VALUES ($1)\0; DROP TABLE zb10", 1)
    assert.is_nil(r); assert.matches("zero byte", err)
    r, err = c:exec("INSERT INTO zb10 VALUES (1)\0")
    assert.is_nil(r); assert.matches("zero byte", err)
    assert.equal(0, count(c, "zb10"))
  end)

  it("is refused by execmany, and nothing runs", function()
    local r, err = c:execmany("INSERT INTO zb10 VALUES ($1)\0; DROP TABLE zb10", { { 1 }, { 2 } })
    assert.is_nil(r); assert.matches("zero byte", err)
    assert.equal(0, count(c, "zb10"))
    assert.equal("idle", c:txstatus())
  end)
end)

