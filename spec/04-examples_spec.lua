-- The examples, end to end with the real runner: example 1 (a table kept in
-- sync, with its resync on every (re)connect), example 2 (fan-out to several
-- client databases), example 3 (several channels routed in one script) and
-- example 4 (change data capture from the WAL, source = "replication").
local H = require "helpers"
local pg = H.pg

local EX = H.root .. "/examples"

local function load_sql(db, file)
  local out, ok = H.sh(("psql -qX -v ON_ERROR_STOP=1 -d %s -f %s"):format(H.q(db), H.q(EX .. "/" .. file)))
  assert(ok, "psql -f " .. file .. " failed: " .. out)
end

local function wait_log(p, pattern, timeout, count)
  return H.eventually(function()
    local n = select(2, p.stderr():gsub(pattern, "%0"))
    return n >= (count or 1)
  end, timeout or 10, 0.05)
end

local function count_in(s, pattern)
  return select(2, s:gsub(pattern, "%0"))
end

-- Stops a runner with SIGTERM and checks it exits 0.
local function term(p)
  p.kill("TERM")
  local rc = p.wait(10)
  assert.equal(0, rc, "exit status after SIGTERM; stderr:\n" .. p.stderr())
end

---------------------------------------------------------------------------
-- Example 1
---------------------------------------------------------------------------

local COLS = { "id", "email", "name", "bio", "updated_at" }
local DUMP = "SELECT id::text AS id, email, name, bio, updated_at::text AS updated_at FROM users ORDER BY id"

-- The users table, row for row, as one string (NULL distinct from '').
local function dump(conn)
  local rows = assert(conn:exec(DUMP))
  local out = {}
  for i = 1, rows.n do
    local f = {}
    for j, k in ipairs(COLS) do
      local v = rows[i][k]
      f[j] = v == pg.null and "NULL" or ("%q"):format(v)
    end
    out[i] = table.concat(f, "|")
  end
  return table.concat(out, "\n"), rows.n
end

-- Waits until the target equals the source; fails with the first difference.
local function assert_synced(src, tgt, timeout, p)
  local a, b, na, nb
  local ok = H.eventually(function()
    a, na = dump(src)
    b, nb = dump(tgt)
    return a == b
  end, timeout or 30, 0.2)
  if not ok then
    local la, lb = {}, {}
    for l in (a .. "\n"):gmatch("(.-)\n") do la[#la + 1] = l end
    for l in (b .. "\n"):gmatch("(.-)\n") do lb[#lb + 1] = l end
    local i = 1
    while la[i] == lb[i] do i = i + 1 end
    error(("target differs from source (%d vs %d rows); first difference at row %d:\n  source: %s\n  target: %s%s")
      :format(na, nb, i, tostring(la[i]), tostring(lb[i]), p and ("\nrunner stderr:\n" .. p.stderr()) or ""), 2)
  end
  return na
end

local function sync_setup()
  local sname, sci = H.createdb("ex01src")
  local tname, tci = H.createdb("ex01tgt")
  load_sql(sname, "01-sync-table/source.sql")
  load_sql(tname, "01-sync-table/target.sql")
  return sname, sci, tname, tci
end

local function start_sync(sci, tci)
  local p = H.spawn({ H.runner, "--db", sci, "examples/01-sync-table/handler.lua" },
    { SOURCE_URL = sci, TARGET_URL = tci })
  assert(wait_log(p, " listening ", 10), "runner did not start listening:\n" .. p.stderr())
  return p
end

local SEED = [[
INSERT INTO users
SELECT i, 'user' || i || '@example.com', 'User ' || i,
       CASE WHEN i %% 10 = 0 THEN NULL WHEN i %% 10 = 1 THEN '' ELSE 'bio ' || md5(i::text) END,
       '2024-01-02 03:04:05.123456+00'::timestamptz + i * interval '1 second'
  FROM generate_series(%d, %d) i]]

describe("example 01-sync-table", function()
  it("copies the rows that exist before it starts and removes the target's extra rows", function()
    local sname, sci, tname, tci = sync_setup()
    H.psql(SEED:format(1, 250), sname)
    -- the target starts out wrong: a row the source lacks, a stale row
    H.psql([[INSERT INTO users VALUES (9999, 'gone@example.com', 'Gone', NULL, now()),
                                      (5, 'old@example.com', 'Old', 'old', now())]], tname)
    -- batches of 100: the resync takes several of them
    local p = H.spawn({ H.runner, "--db", sci, "examples/01-sync-table/handler.lua" },
      { SOURCE_URL = sci, TARGET_URL = tci, RESYNC_BATCH = "100" })
    H.finally(function() p.stop() end)
    assert(wait_log(p, " listening ", 10), p.stderr())
    local src, tgt = H.connect(sci), H.connect(tci)
    assert.equal(250, assert_synced(src, tgt, 20, p))
    assert(wait_log(p, "users resynced[^\n]*why=start", 5), p.stderr())
    assert.matches("users resynced[^\n]*deleted=1", p.stderr())
    assert.equal("0", H.psql("SELECT count(*) FROM users WHERE id = 9999", tname))
    -- a source with no rows empties the target
    H.psql("ALTER TABLE users DISABLE TRIGGER USER; DELETE FROM users; ALTER TABLE users ENABLE TRIGGER USER", sname)
    term(p)
    local p2 = start_sync(sci, tci)
    H.finally(function() p2.stop() end)
    assert.equal(0, assert_synced(src, tgt, 20, p2))
    term(p2)
    src:close(); tgt:close()
  end)

  it("follows bursts of inserts, updates and deletes, large rows and repeated payloads", function()
    local sname, sci, _, tci = sync_setup()
    H.psql(SEED:format(1, 50), sname)
    local p = start_sync(sci, tci)
    H.finally(function() p.stop() end)
    local src, tgt = H.connect(sci), H.connect(tci)
    assert_synced(src, tgt, 20, p)
    -- what the trigger sends, seen by a listener of our own
    local spy = H.connect(sci)
    assert(spy:listen("users_changed"))

    for k = 0, 3 do -- 4 transactions of 100 inserts
      H.psql(("BEGIN; " .. SEED .. "; COMMIT"):format(100 + k * 100, 199 + k * 100), sname)
    end
    H.psql([[BEGIN;
      UPDATE users SET name = name || ' (renamed)', updated_at = updated_at + interval '1 day' WHERE id % 3 = 0;
      DELETE FROM users WHERE id % 7 = 0;
      COMMIT]], sname)
    H.psql("UPDATE users SET email = upper(email), bio = NULL WHERE id BETWEEN 100 AND 160", sname)
    H.psql("DELETE FROM users WHERE id BETWEEN 450 AND 480", sname)
    -- one transaction: a->b->a on one row, delete/insert/delete of another,
    -- a key change; identical payloads would be folded into one by NOTIFY
    H.psql([[BEGIN;
      UPDATE users SET name = 'A' WHERE id = 101;
      UPDATE users SET name = 'B' WHERE id = 101;
      UPDATE users SET name = 'A' WHERE id = 101;
      DELETE FROM users WHERE id = 102;
      INSERT INTO users VALUES (102, 'back@example.com', 'Back', 'x', now());
      DELETE FROM users WHERE id = 102;
      UPDATE users SET id = 5000 WHERE id = 103;
      COMMIT]], sname)
    -- 20 kB: too large for NOTIFY, so the trigger sends the key only
    H.psql("INSERT INTO users VALUES (7000, 'big@example.com', 'Big', repeat('0123456789', 2000), now())", sname)
    H.psql("UPDATE users SET bio = repeat('abcdefghij', 2000) WHERE id = 7000", sname)
    H.psql("INSERT INTO users VALUES (7001, 'big2@example.com', 'Big2', repeat('z', 20000), now())", sname)

    local n = assert_synced(src, tgt, 30, p)
    assert.is_true(n > 300, "rows: " .. n)
    assert.equal("20000", H.psql("SELECT octet_length(bio) FROM users WHERE id = 7000", sname))
    local t7000 = assert(tgt:exec("SELECT bio FROM users WHERE id = 7000"))[1]
    assert.equal(string.rep("abcdefghij", 2000), t7000.bio)
    assert.equal("A", assert(tgt:exec("SELECT name FROM users WHERE id = 101"))[1].name)
    assert.equal(0, assert(tgt:exec("SELECT count(*) AS n FROM users WHERE id IN (102, 103)"))[1].n)
    assert.equal(1, assert(tgt:exec("SELECT count(*) AS n FROM users WHERE id = 5000"))[1].n)

    -- the payloads the trigger sent: small rows in full, large ones keys only
    local keys_only, full = 0, 0
    while true do
      local note = spy:wait(1)
      if not note then break end
      assert.is_true(#note.payload < 8000)
      local ev = pg.json.decode(note.payload)
      if ev.keys_only then
        keys_only = keys_only + 1
        assert.is_true(ev.id == "7000" or ev.id == "7001", note.payload)
      elseif ev.op ~= "DELETE" then
        full = full + 1
        assert.equal(ev.id, tostring(ev.row.id))
      end
    end
    assert.equal(3, keys_only)
    assert.is_true(full > 400, "full rows: " .. full)

    -- applying the latest events again changes nothing
    local last = assert(src:exec([[SELECT json_build_object('op', 'UPDATE', 'seq', 0, 'id', '101',
      'row', row_to_json(u))::text AS p FROM users u WHERE id = 101]]))[1].p
    assert(src:notify("users_changed", last))
    assert(src:notify("users_changed", '{"op":"DELETE","seq":0,"id":"102"}'))
    assert(src:notify("users_changed", '{"op":"UPDATE","seq":0,"id":"7000","keys_only":true}'))
    -- events are handled in order: once this one is in, so are the replays
    H.psql("UPDATE users SET name = 'sentinel' WHERE id = 1", sname)
    assert(H.eventually(function()
      return assert(tgt:exec("SELECT name FROM users WHERE id = 1"))[1].name == "sentinel"
    end, 10), p.stderr())
    assert_synced(src, tgt, 1, p)

    -- events were applied one by one: one resync (at start), no failure
    local err = p.stderr()
    assert.equal(1, count_in(err, "users resynced"), err)
    assert.is_nil(err:find("handler failed", 1, true), err)
    term(p)
    spy:close(); src:close(); tgt:close()
  end)

  it("resyncs what changed while its connection was down", function()
    local sname, sci, _, tci = sync_setup()
    H.psql(SEED:format(1, 200), sname)
    local p = start_sync(sci, tci)
    local src, tgt = H.connect(sci), H.connect(tci)
    H.finally(function()
      p.stop()
      H.psql("ALTER DATABASE " .. sname .. " WITH ALLOW_CONNECTIONS true")
    end)
    assert_synced(src, tgt, 20, p)

    -- mid-stream: changes flowing, then the runner's backend is killed and
    -- no new connection to the source is allowed for a while
    for k = 0, 3 do
      assert(src:exec(("BEGIN; " .. SEED .. "; COMMIT"):format(300 + k * 50, 349 + k * 50)))
    end
    H.psql("ALTER DATABASE " .. sname .. " WITH ALLOW_CONNECTIONS false")
    local killed = H.psql(([[SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                              WHERE datname = '%s' AND query LIKE 'LISTEN%%']]):format(sname))
    assert.equal("t", killed, "the runner's LISTEN backend was not found")
    assert(wait_log(p, "connection lost", 10), p.stderr())
    -- changes nobody hears about: their notifications are lost
    assert(src:exec("UPDATE users SET name = 'changed while away' WHERE id BETWEEN 10 AND 60"))
    assert(src:exec("DELETE FROM users WHERE id BETWEEN 100 AND 130"))
    assert(src:exec(SEED:format(1000, 1099)))
    assert(src:exec("INSERT INTO users VALUES (2000, 'big@example.com', 'Big', repeat('b', 20000), now())"))
    H.sleep(0.5)
    assert.equal(0, assert(tgt:exec("SELECT count(*) AS n FROM users WHERE id >= 1000"))[1].n)
    H.psql("ALTER DATABASE " .. sname .. " WITH ALLOW_CONNECTIONS true")

    assert(wait_log(p, " reconnected ", 20), p.stderr())
    assert_synced(src, tgt, 20, p)
    assert.matches("users resynced[^\n]*why=reconnect", p.stderr())
    -- and it keeps listening on the new connection
    assert(src:exec("UPDATE users SET name = 'after' WHERE id = 1"))
    assert_synced(src, tgt, 10, p)
    term(p)
    src:close(); tgt:close()
  end)
end)

---------------------------------------------------------------------------
-- Example 2
---------------------------------------------------------------------------

local ACCOUNTS = "SELECT id, name, plan, balance::text AS balance, active, updated_at::text AS t "
  .. "FROM accounts ORDER BY id"

local function accounts(db)
  return H.psql(ACCOUNTS, db)
end

describe("example 02-fan-out-accounts", function()
  local central, c1, c2

  before_each(function()
    central = H.createdb("ex02central")
    c1 = H.createdb("ex02client")
    c2 = H.createdb("ex02client")
    load_sql(central, "02-fan-out-accounts/central.sql")
    load_sql(c1, "02-fan-out-accounts/client.sql")
    load_sql(c2, "02-fan-out-accounts/client.sql")
  end)

  local function start(urls)
    local p = H.spawn({ H.runner, "--db", "dbname=" .. central, "examples/02-fan-out-accounts/handler.lua" },
      { CLIENT_URLS = urls })
    assert(wait_log(p, " listening ", 10), p.stderr())
    return p
  end

  local function same_everywhere(p)
    local want
    local ok = H.eventually(function()
      want = accounts(central)
      return accounts(c1) == want and accounts(c2) == want
    end, 15, 0.1)
    assert(ok, ("clients differ from central:\n%s\n--\n%s\n--\n%s\n%s"):format(
      want, accounts(c1), accounts(c2), p.stderr()))
    return want
  end

  it("applies every account change to both client databases", function()
    local p = start(("dbname=%s  dbname=%s"):format(c1, c2))
    H.finally(function() p.stop() end)
    H.psql([[INSERT INTO accounts (id, name, plan, balance) VALUES
               (1, 'Ada', 'pro', 1234.56), (2, 'Bob', 'free', 0.10), (9007199254740993, 'Big', 'free', 1)]], central)
    H.psql("UPDATE accounts SET plan = 'team', balance = balance + 0.01 WHERE id = 1", central)
    H.psql("DELETE FROM accounts WHERE id = 2", central)
    local rows = same_everywhere(p)
    assert.matches("1|Ada|team|1234.57|t|", rows, 1, true)
    assert.matches("9007199254740993|Big|", rows, 1, true)
    assert.is_nil(rows:find("Bob", 1, true))
    term(p)
  end)

  it("raises for a client that fails, retries, and reports it to on_error", function()
    local dead = "postgresql://postgres@127.0.0.1:1/nowhere"
    local p = start(("dbname=%s %s dbname=%s"):format(c1, dead, c2))
    H.finally(function() p.stop() end)
    H.psql("INSERT INTO accounts (id, name) VALUES (42, 'Zed')", central)
    -- the clients that work have it at once, whatever the dead one does
    same_everywhere(p)
    assert(wait_log(p, "account change not delivered to every client", 10), p.stderr())
    local err = p.stderr()
    assert.equal(2, count_in(err, "handler failed; retrying"), err)
    assert.matches("ERROR handler failed[^\n]*attempts=3", err)
    assert.matches("account 42: INSERT not applied on 1 of 3 clients", err, 1, true)
    assert.matches("127.0.0.1:1", err, 1, true)
    assert.matches("not delivered to every client[^\n]*attempts=3[^\n]*kind=handler", err)
    term(p)
  end)
end)

---------------------------------------------------------------------------
-- Example 3
---------------------------------------------------------------------------

describe("example 03-routing", function()
  it("routes each channel to its table, batches metrics, records failures", function()
    local db, ci = H.createdb("ex03")
    load_sql(db, "03-routing/schema.sql")
    local p = H.spawn({ H.runner, "--db", ci, "examples/03-routing/handler.lua" }, { TARGET_URL = ci })
    H.finally(function() p.stop() end)
    assert(wait_log(p, " listening ", 10), p.stderr())
    local c = H.connect(ci)

    assert(c:notify("orders", '{"id": 1, "customer": "ada", "total": 12.30}'))
    assert(c:notify("orders", { id = 2, customer = "bob", total = 5 }))
    assert(c:notify("orders", '{"id": 1, "customer": "ada", "total": 12.30}')) -- a replay
    assert(c:notify("orders", '{"id": 3, "customer": '))                       -- not JSON
    assert(c:notify("orders", '{"customer": "no id", "total": 1}'))           -- handler raises
    local line = "user 7 signed in; it's \"quoted\"\tand\nmultiline, {not json}"
    assert(c:notify("audit", line))
    assert(c:exec([[SELECT pg_notify('metrics', json_build_object('name', 'cpu', 'value', i * 0.5)::text)
                      FROM generate_series(1, 500) i]]))
    H.psql([[SELECT pg_notify('metrics', '{"name": "cpu"}');
             SELECT pg_notify('metrics', '{"name": "mem", "value": 1, "at": "not a date"}');
             SELECT pg_notify('metrics', '{"name": "mem", "value": 2, "at": "2024-05-06T07:08:09Z"}')]], db)

    local function n(sql) return assert(c:exec(sql))[1].n end
    assert(H.eventually(function()
      return n("SELECT count(*) AS n FROM metrics") == 501 and n("SELECT count(*) AS n FROM failed_events") == 4
    end, 15), p.stderr())

    local orders = assert(c:exec("SELECT order_id, customer, total::text AS total FROM orders_log ORDER BY order_id"))
    assert.equal(2, orders.n)
    assert.same({ 1, "ada", "12.30" }, { orders[1].order_id, orders[1].customer, orders[1].total })
    assert.same({ 2, "bob", "5.00" }, { orders[2].order_id, orders[2].customer, orders[2].total })

    local audit = assert(c:exec("SELECT line, sender_pid FROM audit_log"))
    assert.equal(1, audit.n)
    assert.equal(line, audit[1].line)
    assert.equal(c:pid(), audit[1].sender_pid)

    local m = assert(c:exec([[SELECT count(*) AS n, sum(value) AS total, count(DISTINCT xmin::text) AS stmts
                                FROM metrics WHERE name = 'cpu']]))[1]
    assert.equal(500, m.n)
    assert.equal(62625.0, m.total) -- 0.5 * (1 + ... + 500)
    -- 500 notifications in batches of up to 100: a handful of INSERTs
    assert.is_true(m.stmts >= 5 and m.stmts <= 20, "INSERT statements: " .. m.stmts)
    assert.equal("2024-05-06 07:08:09+00",
      assert(c:exec("SELECT (at AT TIME ZONE 'UTC')::text || '+00' AS t FROM metrics WHERE name = 'mem'"))[1].t)

    local f = assert(c:exec("SELECT channel, kind, error, payload FROM failed_events ORDER BY id"))
    local by = {}
    for i = 1, f.n do by[f[i].kind .. ":" .. f[i].payload] = f[i] end
    local dec = by['decode:{"id": 3, "customer": ']
    assert(dec, "invalid JSON not in failed_events")
    assert.equal("orders", dec.channel)
    assert.matches("invalid JSON", dec.error)
    local h = by['handler:{"customer": "no id", "total": 1}']
    assert(h, "handler failure not in failed_events")
    assert.matches("order without an integer id", h.error)
    assert(by['invalid:{"name": "cpu"}'], "invalid metric not in failed_events")
    local bad_at = by['invalid:{"name": "mem", "value": 1, "at": "not a date"}']
    assert(bad_at, "metric with a bad timestamp not in failed_events")
    assert.matches("22007", bad_at.error)

    term(p)
    c:close()
  end)
end)

---------------------------------------------------------------------------
-- Example 4: change data capture (source = "replication")
---------------------------------------------------------------------------

describe("example 04-cdc", function()
  local CDC_DUMP = [[SELECT (SELECT count(*) || ' ' || md5(coalesce(string_agg(u::text, E'\n' ORDER BY id), ''))
      FROM users u)
    || ' / ' || (SELECT count(*) || ' ' || md5(coalesce(string_agg(o::text, E'\n' ORDER BY id), '')) FROM orders o)]]

  it("copies the existing rows, then follows inserts, updates, deletes, TRUNCATE and unchanged TOAST, "
    .. "across a SIGKILL", function()
    local sname, sci = H.createdb("ex04src")
    local tname, tci = H.createdb("ex04tgt")
    load_sql(sname, "04-cdc/source.sql")
    load_sql(tname, "04-cdc/target.sql")
    H.psql([[INSERT INTO users SELECT i, 'u' || i || '@example.com', 'User ' || i, 'bio ' || i, now()
               FROM generate_series(1, 3000) i;
             INSERT INTO orders SELECT i, (i % 3000) + 1, i * 0.5, 'new', now()
               FROM generate_series(1, 6000) i]], sname)
    local slot = "ex04_" .. os.time() % 100000
    local env = { TARGET_URL = tci, CDC_SLOT = slot }
    local p = H.start(EX .. "/04-cdc/handler.lua", { "--db", sci }, env, false)
    H.finally(function() p.stop() end)
    assert(wait_log(p, "streaming", 60), p.stderr())
    assert.equal(H.psql(CDC_DUMP, sname), H.psql(CDC_DUMP, tname))
    -- the source position lives in the target (pglisten.apply): each change applied once
    assert.equal("1", H.psql(("SELECT count(*) FROM pglisten.applied WHERE slot = '%s' AND snapshot")
      :format(slot), tname))

    H.psql([[BEGIN;
      INSERT INTO users SELECT 5000, 'new@example.com', 'New', string_agg(md5(i::text), ''), now()
        FROM generate_series(1, 6000) i;                          -- 192 kB, TOASTed out of line
      INSERT INTO orders VALUES (9000, 5000, 12.34, 'new', now());
      COMMIT;
      UPDATE users SET name = 'Renamed' WHERE id = 5000;          -- bio unchanged, TOASTed
      UPDATE orders SET status = 'paid' WHERE user_id BETWEEN 1 AND 100;
      DELETE FROM users WHERE id BETWEEN 2900 AND 3000;           -- and their orders (cascade)
      UPDATE users SET id = 7000 WHERE id = 10 AND NOT EXISTS (SELECT 1 FROM orders WHERE user_id = 10)]], sname)
    assert(H.eventually(function() return H.psql(CDC_DUMP, sname) == H.psql(CDC_DUMP, tname) end, 30),
      p.stderr())
    local bio = "SELECT octet_length(bio) || ' ' || md5(bio) || ' ' || name FROM users WHERE id = 5000"
    assert.equal(H.psql(bio, sname), H.psql(bio, tname))
    assert.matches("^192000 %x+ Renamed$", H.psql(bio, tname))

    -- killed; the changes made while it is down are all applied when it starts again
    p.kill("KILL"); p.wait(10)
    H.psql([[INSERT INTO users SELECT i, 'd' || i, 'Down ' || i, NULL, now() FROM generate_series(10001, 12000) i;
      INSERT INTO orders SELECT i, i - 10000, 1, 'new', now() FROM generate_series(10001, 12000) i;
      DELETE FROM orders WHERE id <= 100]], sname)
    local p2 = H.start(EX .. "/04-cdc/handler.lua", { "--db", sci }, env, false)
    H.finally(function() p2.stop() end)
    assert(wait_log(p2, "streaming", 60), p2.stderr())
    assert.no_matches("initial snapshot", p2.stderr()) -- the slot exists: no second snapshot
    assert(H.eventually(function() return H.psql(CDC_DUMP, sname) == H.psql(CDC_DUMP, tname) end, 30),
      p2.stderr())
    H.psql("TRUNCATE users, orders", sname)
    assert(H.eventually(function() return H.psql("SELECT count(*) FROM users", tname) == "0" end, 30), p2.stderr())
    assert.equal("0", H.psql("SELECT count(*) FROM orders", tname))
    term(p2)
    assert.no_matches(" ERROR ", p2.stderr())
    local rc, _, err = H.run_runner({ "--db", sci, "--drop-slot", EX .. "/04-cdc/handler.lua" }, env)
    assert.equal(0, rc, err)
    assert.equal("0", H.psql(("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '%s'"):format(slot), sname))
  end)
end)

---------------------------------------------------------------------------
-- Examples 5 (a durable queue) and 6 (an SQLite target)
---------------------------------------------------------------------------

local function install_schema(ci)
  local rc, _, err = H.run_runner({ "--install", "--db", ci })
  assert.equal(0, rc, err)
end

local function outbox_tool(ci, ...)
  local argv = { "outbox", ... }
  argv[#argv + 1], argv[#argv + 2] = "--db", ci
  local rc, out, err = H.run_runner(argv)
  assert.equal(0, rc, err)
  return out
end

describe("example 5: a durable queue", function()
  it("retries, buries dead letters that outbox status and dead show, and sends them after a replay", function()
    local name, ci = H.createdb("ex05")
    install_schema(ci)
    load_sql(name, "05-durable-queue/schema.sql")
    load_sql(name, "05-durable-queue/schema.sql") -- idempotent
    local env = { MAIL_URL = ci, MAX_ATTEMPTS = "3", BACKOFF = "0.2" }
    local p = H.start(EX .. "/05-durable-queue/handler.lua", { "--db", ci }, env)
    H.finally(function() p.stop() end)
    H.psql("INSERT INTO emails (to_addr, subject) VALUES ('a@example.com', 'hello')", name)
    assert(H.eventually(function() return H.psql("SELECT count(*) FROM sent_mail", name) == "1" end, 10),
      p.stderr())

    -- the server down for a moment: retried, then sent
    H.psql("UPDATE mail_server SET up = false; INSERT INTO emails (to_addr, subject) VALUES ('b@example.com', 'two')",
      name)
    assert(wait_log(p, "will retry", 10), p.stderr())
    H.psql("UPDATE mail_server SET up = true", name)
    assert(H.eventually(function() return H.psql("SELECT count(*) FROM sent_mail", name) == "2" end, 10),
      p.stderr())
    assert.matches("sent e%-mail 2 after 1 failed attempt", p.stderr())

    -- down for longer than 3 attempts: dead letters
    H.psql("UPDATE mail_server SET up = false; INSERT INTO emails (to_addr, subject) "
      .. "VALUES ('c@example.com', 'three'), ('d@example.com', 'four')", name)
    local status = outbox_tool(ci, "status", "--format", "json")
    local rows = pg.json.decode(status)
    assert.equal("emails", rows[1].channel)
    assert.truthy(rows[1].waiting >= 1, status)
    assert(H.eventually(function() return H.psql("SELECT count(*) FROM pglisten.dead", name) == "2" end, 15),
      p.stderr())
    assert(wait_log(p, "moved to pglisten.dead", 5), p.stderr())
    rows = pg.json.decode(outbox_tool(ci, "status", "--format", "json"))
    assert.same({ "emails", 0, 0, 2 }, { rows[1].channel, rows[1].waiting, rows[1].due, rows[1].dead })
    local dead = outbox_tool(ci, "dead")
    assert.equal(2, count_in(dead, "emails%s+3 .- mail server unavailable: 421 try again later"), dead)

    -- back up; a replay sends both at once
    H.psql("UPDATE mail_server SET up = true", name)
    assert.equal("replayed 2 dead letters\n", outbox_tool(ci, "replay", "--all"))
    assert(H.eventually(function() return H.psql("SELECT count(*) FROM sent_mail", name) == "4" end, 10),
      p.stderr())
    assert.equal("3,4", H.psql("SELECT string_agg(email_id::text, ',' ORDER BY email_id) FROM sent_mail "
      .. "WHERE subject IN ('three', 'four')", name))
    rows = pg.json.decode(outbox_tool(ci, "status", "--format", "json"))
    assert.same({ 0, 0 }, { rows[1] and rows[1].waiting or 0, rows[1] and rows[1].dead or 0 })
    term(p)
  end)
end)

describe("example 6: an SQLite target", function()
  local ORDERS_PG = "SELECT id || '|' || customer || '|' || (total * 100)::bigint || '|' || status || '|' "
    .. "|| (to_json(updated_at) #>> '{}') FROM orders ORDER BY id"
  local function sqlite_dump(path)
    local out, ok = H.sh("sqlite3 " .. H.q(path) .. " " .. H.q(
      "SELECT id || '|' || customer || '|' || total_cents || '|' || status || '|' || updated_at "
      .. "FROM orders ORDER BY id"))
    assert(ok, out)
    return (out:gsub("%s+$", ""))
  end

  it("copies the existing orders with backfill and the live changes beside it", function()
    local name, ci = H.createdb("ex06")
    install_schema(ci)
    load_sql(name, "06-sqlite-target/source.sql")
    H.psql([[INSERT INTO orders (customer, total, status)
      SELECT 'customer ' || i || CASE WHEN i % 7 = 0 THEN ' O''Brien' ELSE '' END, i * 1.01, 'new'
        FROM generate_series(1, 800) i;
      DELETE FROM pglisten.outbox]], name) -- existing orders: the backfill's part
    local path = H.dir .. "/ex06-" .. name .. ".db"
    local env = { SQLITE_PATH = path }
    local p = H.start(EX .. "/06-sqlite-target/handler.lua", { "--db", ci }, env)
    H.finally(function() p.stop() end)
    local bf = H.spawn({ H.runner, "backfill", "--db", ci, "--table", "public.orders", "--channel", "orders",
      "--batch", "100", EX .. "/06-sqlite-target/handler.lua" }, env)
    -- live changes meanwhile: new orders, updates, deletes of rows the backfill has passed
    for i = 1, 20 do
      H.psql(("INSERT INTO orders (customer, total) VALUES ('live %d', %d.99); "
        .. "UPDATE orders SET status = 'paid', updated_at = now() WHERE id = %d"):format(i, i, i * 37), name)
    end
    assert.equal(0, bf.wait(60), bf.stderr())
    H.psql("DELETE FROM orders WHERE id IN (3, 5); UPDATE orders SET total = 12345678.91 WHERE id = 1", name)
    local want = H.psql(ORDERS_PG, name)
    assert(H.eventually(function() return sqlite_dump(path) == want end, 30),
      "sqlite differs:\n" .. p.stderr() .. bf.stderr())
    assert.equal(818, #H.lines(want))
    assert.matches("1|customer 1|1234567891|new|", sqlite_dump(path), 1, true)
    term(p)
    assert.no_matches(" ERROR ", p.stderr())
  end)
end)
