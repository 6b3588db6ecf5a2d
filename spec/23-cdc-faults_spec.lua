-- The replication source under real faults: SIGKILL of the runner mid-stream,
-- pg_terminate_backend of the walsender, a server restart, two runners on one
-- slot, handlers that keep failing (blocked slot, on_failure = "dead"), and
-- the start-up checks that exit 1 with a message saying what to change.
local H = require "spec.helpers"
local C = require "spec.cdc_helpers"

local ITEMS = "CREATE TABLE items (id int PRIMARY KEY, n int, s text)"

-- Writes `txs` transactions of `per` changes each (inserts, then updates of
-- some of them), in the background of the spec: returns when done.
local function write(src, from, txs, per)
  local stmts = {}
  for t = 0, txs - 1 do
    local a = from + t * per
    stmts[#stmts + 1] = ("BEGIN; INSERT INTO items SELECT g, g, 's' || g FROM generate_series(%d, %d) g; "
      .. "UPDATE items SET n = n + 1 WHERE id %% 7 = 0 AND id BETWEEN %d AND %d; COMMIT;")
      :format(a, a + per - 1, a, a + per - 1)
  end
  C.sql(table.concat(stmts, "\n"), src)
end

local function items_script(dst, slot, extra)
  return C.script(dst, ([[
return {
  replication = { slot = %q },
  channels = {
    ["public.items"] = { source = "replication", batch = 50, %s handler = function(events, notes)
      for _, ev in ipairs(events) do upsert("items", ev) end
      out(#events, notes[#notes].lsn)
    end },
  },
}
]]):format(slot, extra or ""))
end

local function walsender(slot)
  local pid = C.sql(("SELECT active_pid FROM pg_replication_slots WHERE slot_name = '%s' AND active"):format(slot))
  return tonumber(pid)
end

describe("replication source faults", function()
  it("exits 1 when wal_level is not logical, saying what to change", function()
    assert.equal("0", C.sql("SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical'"),
      "a logical slot left by an earlier spec keeps the server from starting with wal_level = replica")
    local src, dst, slot = C.setup("wal")
    C.sql(ITEMS, src)
    local path = items_script(dst, slot)
    C.sql("ALTER SYSTEM SET wal_level = replica")
    H.server("restart")
    H.finally(function()
      C.sql("ALTER SYSTEM SET wal_level = logical") -- with-pg.sh sets it in postgresql.auto.conf too
      H.server("restart")
    end)
    local p = H.start(path, { "--db", "dbname=" .. src }, nil, false)
    local rc = p.wait(20)
    p.stop()
    assert.equal(1, rc, p.stderr())
    assert.matches("wal_level is replica, and logical replication needs wal_level = logical", p.stderr(), 1, true)
  end)

  it("exits 1 on a role without REPLICATION, a table without replica identity, no free slot", function()
    local src, dst, slot = C.setup("checks")
    C.sql(ITEMS .. "; CREATE TABLE nokey (a int); CREATE TABLE nothing (id int PRIMARY KEY); "
      .. "ALTER TABLE nothing REPLICA IDENTITY NOTHING", src)
    local function run(tbl, args)
      local path = C.script(dst, ([[
return { replication = { slot = %q }, channels = { [%q] = { source = "replication", handler = function() end } } }
]]):format(slot, tbl))
      local argv = { "--db", "dbname=" .. src .. (args or "") }
      local p = H.start(path, argv, nil, false)
      local rc = p.wait(20)
      p.stop()
      return rc, p.stderr()
    end
    local rc, err = run("public.nokey")
    assert.equal(1, rc, err)
    assert.matches("table public.nokey has no primary key, so its UPDATEs and DELETEs carry no replica identity: "
      .. "add a primary key, or ALTER TABLE public.nokey REPLICA IDENTITY FULL", err, 1, true)
    rc, err = run("public.nothing")
    assert.equal(1, rc, err)
    assert.matches("table public.nothing has REPLICA IDENTITY NOTHING", err, 1, true)
    rc, err = run("public.missing")
    assert.equal(1, rc, err)
    assert.matches("table public.missing does not exist", err, 1, true)
    local path = C.script(dst, ([[
return { replication = { slot = %q, create = false },
  channels = { ["public.items"] = { source = "replication", handler = function() end } } }
]]):format(slot))
    local p = H.start(path, { "--db", "dbname=" .. src }, nil, false)
    rc = p.wait(20)
    p.stop()
    assert.equal(1, rc, p.stderr())
    assert.matches(("publication %s does not exist (replication.create = false): CREATE PUBLICATION %s FOR TABLE "
      .. "public.items, or remove create = false"):format(slot, slot), p.stderr(), 1, true)
    C.sql(("CREATE PUBLICATION %s FOR TABLE items"):format(slot), src)
    p = H.start(path, { "--db", "dbname=" .. src }, nil, false)
    rc = p.wait(20)
    p.stop()
    assert.equal(1, rc, p.stderr())
    assert.matches(("replication slot %s does not exist (replication.create = false)"):format(slot), p.stderr(), 1,
      true)
    C.sql(("DROP PUBLICATION %s"):format(slot), src)
    C.sql("DROP ROLE IF EXISTS cdc_norepl; CREATE ROLE cdc_norepl LOGIN")
    C.sql("GRANT ALL ON SCHEMA public TO cdc_norepl; GRANT ALL ON ALL TABLES IN SCHEMA public TO cdc_norepl", src)
    H.finally(function()
      C.sql("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM cdc_norepl; REVOKE ALL ON SCHEMA public FROM cdc_norepl",
        src)
      C.sql("DROP ROLE IF EXISTS cdc_norepl")
    end)
    rc, err = run("public.items", " user=cdc_norepl")
    assert.equal(1, rc, err)
    assert.matches("role cdc_norepl lacks the REPLICATION attribute: ALTER ROLE cdc_norepl REPLICATION", err, 1, true)
    -- every slot taken (physical ones cost nothing)
    local max = tonumber(C.sql("SHOW max_replication_slots"))
    local used = tonumber(C.sql("SELECT count(*) FROM pg_replication_slots"))
    local fill = {}
    H.finally(function()
      for _, s in ipairs(fill) do C.sql(("SELECT pg_drop_replication_slot('%s')"):format(s)) end
    end)
    for i = 1, max - used do
      fill[i] = ("cdc_fill_%d"):format(i)
      C.sql(("SELECT pg_create_physical_replication_slot('%s')"):format(fill[i]))
    end
    rc, err = run("public.items")
    assert.equal(1, rc, err)
    assert.matches("replication slots (max_replication_slots) are in use: drop unused ones", err, 1, true)
    C.sql(("DROP PUBLICATION IF EXISTS %s"):format(slot), src)
  end)

  it("after SIGKILL mid-stream, a restart handles every change at least once; the target equals the source",
    function()
      local src, dst, slot = C.setup("kill")
      C.sql(ITEMS, src); C.sql(ITEMS, dst)
      local path = items_script(dst, slot, "retry = { attempts = 3, backoff = 0.05 },")
      local procs = { C.start(path, src) }
      H.finally(function() C.cleanup(procs, src, slot) end)
      write(src, 1, 40, 100)
      assert.truthy(H.eventually(function() return #H.lines(procs[1].stdout()) >= 5 end, 20))
      procs[1].kill("KILL")
      procs[1].wait(5)
      local handled_before = 0
      for _, l in ipairs(H.lines(procs[1].stdout())) do handled_before = handled_before + tonumber(l:match("^%d+")) end
      write(src, 4001, 10, 100)
      procs[2] = C.start(path, src)
      local ok, want, got = C.same(src, dst, "items", 40)
      assert.is_true(ok and true or false, ("target %s, source %s\n%s"):format(got, want, procs[2].stderr()))
      local total = handled_before
      for _, l in ipairs(H.lines(procs[2].stdout())) do total = total + tonumber(l:match("^%d+")) end
      -- 5000 inserts and their updates, some more than once
      assert.is_true(total >= 5000 + 5000 // 7, tostring(total))
    end)

  it("resumes with nothing missing after pg_terminate_backend of the walsender and after a server restart",
    function()
      local src, dst, slot = C.setup("term")
      C.sql(ITEMS, src); C.sql(ITEMS, dst)
      local path = items_script(dst, slot, "retry = { attempts = 20, backoff = 0.1, max_backoff = 0.5 },")
      local p = C.start(path, src)
      H.finally(function() C.cleanup({ p }, src, slot) end)
      write(src, 1, 5, 100)
      local pid = assert(H.eventually(function() return walsender(slot) end, 10))
      C.sql(("SELECT pg_terminate_backend(%d)"):format(pid))
      write(src, 501, 5, 100)
      assert.truthy(H.eventually(function() return p.stderr():find("replication stream lost", 1, true) end, 10),
        p.stderr())
      assert.truthy(H.eventually(function()
        local np = walsender(slot)
        return np and np ~= pid
      end, 10), p.stderr())
      local ok, want, got = C.same(src, dst, "items", 30)
      assert.is_true(ok and true or false, ("after terminate: target %s, source %s\n%s"):format(got, want, p.stderr()))
      H.server("restart")
      write(src, 1001, 5, 100)
      ok, want, got = C.same(src, dst, "items", 40)
      assert.is_true(ok and true or false, ("after restart: target %s, source %s\n%s"):format(got, want, p.stderr()))
      assert.truthy(p.running())
    end)

  it("a second runner on the slot stands by and takes over within 3 s of SIGKILL, without loss", function()
    local src, dst, slot = C.setup("two")
    C.sql(ITEMS, src); C.sql(ITEMS, dst)
    local path = items_script(dst, slot)
    local a = C.start(path, src)
    local procs = { a }
    H.finally(function() C.cleanup(procs, src, slot) end)
    local b = C.start(path, src, nil, "standing by")
    procs[2] = b
    write(src, 1, 5, 100)
    assert.is_true(C.same(src, dst, "items", 20) and true or false)
    assert.equal("", b.stdout())
    a.kill("KILL")
    local t0 = H.now()
    assert.truthy(H.eventually(function() return b.stderr():find("took over", 1, true) end, 10), b.stderr())
    local took = H.now() - t0
    print(("\n  standby took over the slot %.2f s after SIGKILL"):format(took))
    assert.is_true(took < 3, tostring(took))
    write(src, 501, 5, 100)
    assert.is_true(C.same(src, dst, "items", 20) and true or false, b.stderr())
  end)

  it("a handler that keeps failing blocks the slot (nothing skipped, stats show the lag) until it succeeds",
    function()
      local src, dst, slot = C.setup("block")
      C.sql(ITEMS, src); C.sql(ITEMS, dst)
      local flag = H.file("fail-flag", "x")
      local path = C.script(dst, ([[
local calls = 0
return {
  replication = { slot = %q },
  on_error = function(err, note, info)
    out("on_error", note.channel, info.blocked and "blocked" or "-", info.attempts)
  end,
  channels = {
    ["public.items"] = { source = "replication", retry = { attempts = 2, backoff = 0.05, max_backoff = 0.2 },
      handler = function(ev)
        if ev.new.id == 3 and io.open(%q) then error("target refuses 3") end
        upsert("items", ev)
      end },
  },
}
]]):format(slot, flag))
      local p = C.start(path, src, { "--stats-interval", "1" })
      H.finally(function() C.cleanup({ p }, src, slot) end)
      for i = 1, 5 do C.sql(("INSERT INTO items VALUES (%d, %d, 'x')"):format(i, i), src) end
      assert.truthy(H.eventually(function() return p.stdout():find("on_error public.items blocked", 1, true) end, 10))
      H.sleep(1.5)
      assert.equal("1,2", C.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM items", dst))
      local stats = H.eventually(function()
        local l = p.stderr():match("[^\n]*replication stats[^\n]*blocked=true[^\n]*")
        return l
      end, 5)
      assert.truthy(stats, p.stderr())
      assert.truthy(tonumber(stats:match("lag_bytes=(%d+)")) > 0, stats)
      assert.truthy(tonumber(stats:match("failed_handler=(%d+)")) >= 2, stats)
      assert.truthy(stats:match("confirmed_flush_lsn=%x+/%x+"), stats)
      os.remove(flag)
      assert.is_true(C.same(src, dst, "items", 20) and true or false, p.stderr())
    end)

  it('on_failure = "dead" records the event in pglisten.dead on the source and moves on', function()
    local src, dst, slot = C.setup("dead")
    C.sql(ITEMS, src); C.sql(ITEMS, dst)
    local path = C.script(dst, ([[
return {
  replication = { slot = %q },
  channels = {
    ["public.items"] = { source = "replication", on_failure = "dead", retry = { attempts = 2, backoff = 0.05 },
      handler = function(ev) if ev.new.id == 3 then error("no 3 today") end upsert("items", ev) end },
  },
}
]]):format(slot))
    -- without the outbox schema on the source: exit 1, saying so
    local early = H.start(path, { "--db", "dbname=" .. src }, nil, false)
    local erc = early.wait(20)
    early.stop()
    assert.equal(1, erc, early.stderr())
    assert.matches([[on_failure = \"dead\" (channel public.items) records failed events in pglisten.dead on the ]]
      .. "source database, and it has no schema pglisten: run lua-pglisten --install", early.stderr(), 1, true)
    local rc, _, ierr = H.run_runner({ "--install", "--db", "dbname=" .. src })
    assert.equal(0, rc, ierr)
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    for i = 1, 5 do C.sql(("INSERT INTO items VALUES (%d, %d, 'x')"):format(i, i), src) end
    assert.truthy(H.eventually(function()
      return C.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM items", dst) == "1,2,4,5"
    end, 20), p.stderr())
    local row = C.sql("SELECT channel || '|' || attempts || '|' || last_error || '|' || "
      .. "(payload::jsonb -> 'new' ->> 'id') || '|' || (payload::jsonb ->> 'op') FROM pglisten.dead", src)
    assert.matches("^public%.items|2|[^|]*no 3 today|3|INSERT$", row)
    assert.matches("moved to pglisten.dead", p.stderr(), 1, true)
  end)
end)
