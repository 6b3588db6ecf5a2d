-- Exactly once into a PostgreSQL target (pglisten.apply, issue 15): the
-- source position recorded in the target's own transaction.  First the
-- function on its own (positions, split transactions, snapshot rows, the
-- row lock), then the real runner with a users/orders pair (orders.user_id
-- references users on both sides) under SIGKILL, walsender termination, a
-- crashed source server and a target that goes down and comes back.
local H = require "spec.helpers"
local C = require "spec.cdc_helpers"
local pg = H.pg

local T = {}

--- A database on the second server (the target, synchronous_commit = on).
function T.createdb(prefix)
  local name = H.createdb(prefix) -- a name of this run (made on server 1 too; harmless)
  H.psql("CREATE DATABASE " .. name, H.conninfo2())
  return name, H.conninfo2(name)
end

function T.sql(s, conninfo) return H.psql(s, conninfo) end

-- A note as the replication source makes it.
local function note(commit, seq, snap)
  return { system_id = "7000000000000000001", database = "src", slot = "s1", commit_lsn = commit, seq = seq,
    snapshot = snap or nil }
end

describe("pglisten.apply", function()
  local ci, conn
  setup(function()
    ci = select(2, T.createdb("apply"))
    conn = H.connect(ci)
    assert(conn:exec("CREATE TABLE t (k text PRIMARY KEY)"))
  end)
  teardown(function() if conn then conn:close() end end)

  local function keys(evs)
    local out = {}
    for i, e in ipairs(evs) do out[i] = e.k end
    return table.concat(out, ",")
  end

  local function apply(evs, notes)
    local got = "-"
    local ok, err, code = pg.apply(conn, evs, notes, function(c, e)
      got = keys(e)
      for _, ev in ipairs(e) do assert(c:exec("INSERT INTO t VALUES ($1)", ev.k)) end
    end)
    return got, ok, err, code
  end

  it("creates pglisten.applied on first use, skips what was applied, and is exact inside a split transaction",
    function()
      assert.equal("0", T.sql("SELECT count(*) FROM pg_namespace WHERE nspname = 'pglisten'", ci))
      -- transaction A (commit 0/100): 3 changes, B (0/200): 2 changes
      local A = { { k = "a1" }, { k = "a2" }, { k = "a3" } }
      local got, ok = apply({ A[1], A[2] }, { note("0/100", 1), note("0/100", 2) })
      assert.equal("a1,a2", got); assert.is_true(ok)
      assert.equal("0/100|false|2", T.sql("SELECT lsn || '|' || snapshot || '|' || seq FROM pglisten.applied", ci))
      -- sent again from the start of A after a restart, with the rest of A and B
      got, ok = apply({ A[1], A[2], A[3], { k = "b1" } }, { note("0/100", 1), note("0/100", 2), note("0/100", 3),
        note("0/200", 1) })
      assert.equal("a3,b1", got); assert.is_true(ok)
      -- everything applied already: fn is not called, true
      got, ok = apply({ A[3] }, { note("0/100", 3) })
      assert.equal("-", got); assert.is_true(ok)
      assert.equal("a1,a2,a3,b1", T.sql("SELECT string_agg(k, ',' ORDER BY k) FROM t", ci))
      assert.equal("0/200|false|1", T.sql("SELECT lsn || '|' || snapshot || '|' || seq FROM pglisten.applied", ci))
    end)

  it("orders snapshot rows before the streamed changes at their consistent point; a later snapshot replaces an "
    .. "earlier one", function()
      local k = { system_id = "7000000000000000001", database = "src", slot = "snap" }
      local function n(commit, seq, snap)
        local x = note(commit, seq, snap)
        x.slot = k.slot
        return x
      end
      local got = "-"
      local function ap(evs, notes)
        got = "-"
        return pg.apply(conn, evs, notes, function(_, e) got = keys(e) end)
      end
      assert(ap({ { k = "s1" }, { k = "s2" } }, { n("0/500", 1, true), n("0/500", 2, true) }))
      assert.equal("s1,s2", got)
      -- a stream change at the consistent point comes after the snapshot rows
      assert(ap({ { k = "x" } }, { n("0/500", 1) }))
      assert.equal("x", got)
      -- a snapshot row at the same point, sent again, is never applied over it
      assert(ap({ { k = "s2" } }, { n("0/500", 2, true) }))
      assert.equal("-", got)
      -- a snapshot done again (slot recreated) has a later point: applied
      assert(ap({ { k = "s1" } }, { n("0/900", 1, true) }))
      assert.equal("s1", got)
    end)

  it("one event and its note (a handler without batch) is applied as one", function()
    local ev = { k = "single" }
    local seen
    assert.is_true(pg.apply(conn, ev, note("0/300", 1), function(c, e, nt)
      seen = e.k .. "@" .. nt.commit_lsn
      assert(c:exec("INSERT INTO t VALUES ($1)", e.k))
    end))
    assert.equal("single@0/300", seen)
    assert.is_true(pg.apply(conn, ev, note("0/300", 1), function() error("applied twice") end))
  end)

  it("rolls back fn's work and the position together, returning nil, err, sqlstate", function()
    local ok, err, code = pg.apply(conn, { { k = "a1" } }, { note("0/400", 1) }, function(c, e)
      assert(c:exec("INSERT INTO t VALUES ('fresh')"))
      local r, e2, c2 = c:exec("INSERT INTO t VALUES ($1)", e[1].k) -- a1 exists: 23505
      if not r then return nil, e2, c2 end
    end)
    assert.is_nil(ok); assert.equal("23505", code); assert.truthy(err)
    assert.equal("0", T.sql("SELECT count(*) FROM t WHERE k = 'fresh'", ci))
    assert.equal("0/300|false|1", T.sql("SELECT lsn || '|' || snapshot || '|' || seq FROM pglisten.applied "
      .. "WHERE slot = 's1'", ci))
  end)

  it("locks the position row: a second applier waits, then skips what the first applied", function()
    local other = H.connect(ci)
    H.finally(function() other:close() end)
    assert(conn:exec("BEGIN"))
    -- the first applier, inside an open transaction: its position is not committed yet
    assert(pg.apply(conn, { { k = "c1" } }, { note("0/600", 1) }, function(c, e)
      assert(c:exec("INSERT INTO t VALUES ($1)", e[1].k))
    end))
    -- the second one, from a shell in the background, blocks on the row lock
    local sh = H.spawn({ "psql", "-qtAX", "-d", ci, "-c",
      "SELECT lsn FROM pglisten.applied WHERE slot = 's1' FOR UPDATE" })
    pg.sleep(0.5)
    assert.is_true(sh.running())
    assert(conn:exec("COMMIT"))
    assert.equal(0, sh.wait(10))
    assert.equal("0/600", (sh.stdout():gsub("%s+$", "")))
    local called = false
    assert.is_true(pg.apply(other, { { k = "c1" } }, { note("0/600", 1) }, function() called = true end))
    assert.is_false(called)
    -- two position statements at once: the one that waited reads the position the other committed
    assert(conn:exec("BEGIN"))
    assert(pg.apply(conn, { { k = "c2" } }, { note("0/700", 1) }, function() end))
    local move = require("pglisten.apply").MOVE
    sh = H.spawn({ "psql", "-qtAX", "-d", ci, "-c", ("PREPARE m(text, text, text, text, boolean, bigint) AS %s; "
      .. "EXECUTE m('7000000000000000001', 'src', 's1', '0/800', false, 1)"):format(move) })
    pg.sleep(0.5)
    assert.is_true(sh.running())
    assert(conn:exec("COMMIT"))
    assert.equal(0, sh.wait(10))
    assert.matches("^0/700|f|1|", sh.stdout())
    assert.equal("0/800", T.sql("SELECT lsn FROM pglisten.applied WHERE slot = 's1'", ci))
  end)

  it("raises on misuse: notes without a position", function()
    assert.has_error(function() pg.apply(conn, { { k = 1 } }, { { lsn = "0/1" } }, function() end) end)
    assert.has_error(function() pg.apply(conn, { { k = 1 } }, { note("0/1", 1) }, "no") end)
  end)
end)


---------------------------------------------------------------------------
-- The real runner: users and orders, orders.user_id -> users on both sides
---------------------------------------------------------------------------

local SOURCE = [[
CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL, ver int NOT NULL);
CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL REFERENCES users, amount int NOT NULL,
  ver int NOT NULL)]]

-- The target: the same tables and foreign key, and a trigger that counts
-- how often each row version is applied (app.n > 1: applied twice) and
-- refuses a row version older than the one it replaces.
local TARGET = SOURCE .. [[;
CREATE TABLE app (tbl text, id int, ver int, op text, n int NOT NULL, PRIMARY KEY (tbl, id, ver, op));
CREATE FUNCTION count_app() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
  IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
  IF TG_OP = 'UPDATE' AND NEW.ver < OLD.ver THEN
    RAISE EXCEPTION 'row % of % goes back from version % to %', OLD.id, TG_TABLE_NAME, OLD.ver, NEW.ver;
  END IF;
  INSERT INTO app VALUES (TG_TABLE_NAME, r.id, r.ver, TG_OP, 1)
    ON CONFLICT (tbl, id, ver, op) DO UPDATE SET n = app.n + 1;
  RETURN NULL;
END $$;
CREATE TRIGGER count_app AFTER INSERT OR UPDATE OR DELETE ON users FOR EACH ROW EXECUTE FUNCTION count_app();
CREATE TRIGGER count_app AFTER INSERT OR UPDATE OR DELETE ON orders FOR EACH ROW EXECUTE FUNCTION count_app()]]

-- The handler: plain INSERT/UPDATE/DELETE, each required to change exactly
-- one row (a change applied twice fails), only through pglisten.apply.
-- Snapshot rows are upserts (a restarted snapshot truncates first).
local HANDLER = [[
local target = assert(pglisten.connect(TARGET))
local COLS = { users = { "id", "name", "ver" }, orders = { "id", "user_id", "amount", "ver" } }
local function write(c, ev, nt)
  local t, cols = ev.table, COLS[ev.table]
  local sql, vals = nil, {}
  if ev.op == "TRUNCATE" then
    -- (a snapshot done again starts its tables' history anew)
    assert(c:exec("DELETE FROM app WHERE tbl = ANY ($1::text[])", t == "users" and "{users,orders}" or "{orders}"))
    return assert(c:exec(t == "users" and "TRUNCATE users, orders" or "TRUNCATE orders"))
  elseif ev.op == "DELETE" then
    sql, vals = "DELETE FROM " .. t .. " WHERE id = $1", { ev.old.id }
  else
    local ph, sets = {}, {}
    for i, k in ipairs(cols) do
      vals[i], ph[i] = ev.new[k], "$" .. i
      if i > 1 then sets[#sets + 1] = k .. " = $" .. i end
    end
    if ev.op == "UPDATE" then
      sql = ("UPDATE %s SET %s WHERE id = $1"):format(t, table.concat(sets, ", "))
    elseif nt.snapshot then
      sql = ("INSERT INTO %s VALUES (%s) ON CONFLICT (id) DO UPDATE SET %s"):format(t, table.concat(ph, ", "),
        table.concat(sets, ", "))
    else
      sql = ("INSERT INTO %s VALUES (%s)"):format(t, table.concat(ph, ", "))
    end
  end
  local r, err, code = c:exec(sql, table.unpack(vals))
  if not r then error(("%s %s %s: %s [%s]"):format(ev.op, t, tostring((ev.new or ev.old).id), err, code), 0) end
  if r.affected ~= 1 then
    error(("%s %s %s changed %d rows [affected]"):format(ev.op, t, tostring((ev.new or ev.old).id), r.affected), 0)
  end
end
local function handler(events, notes)
  local n = 0
  local ok, err, code = pglisten.apply(target, events, notes, function(c, evs, nts)
    n = #evs
    if SLOW then assert(c:exec("SELECT pg_sleep(0.002)")) end
    for i, ev in ipairs(evs) do write(c, ev, nts[i]) end
  end)
  if not ok then
    out("FAIL", code or "-", err)
    error(err, 0)
  end
  out("OK", n, #events - n)
end
local retry = { attempts = 1000, backoff = 0.05, max_backoff = 0.3 }
return {
  replication = { slot = SLOT, snapshot = SNAPSHOT },
  channels = {
    ["public.users"] = { source = "replication", batch = 5, handler = handler, retry = retry },
    ["public.orders"] = { source = "replication", batch = 5, handler = handler, retry = retry },
  },
}
]]

local function script(dst_ci, slot, opts)
  opts = opts or {}
  return H.script(("local TARGET, SLOT, SNAPSHOT, SLOW = %q, %q, %s, %s\n"):format(dst_ci, slot,
    tostring(opts.snapshot or false), tostring(opts.slow or false)) .. HANDLER)
end

-- The writer: random transactions of inserts, updates and deletes across
-- both tables, as a model of what the source holds.
local W = {}
W.__index = W

function W.new(src)
  local self = setmetatable({ conn = H.connect("dbname=" .. src), next_id = 1, txs = 0 }, W)
  self:reload()
  return self
end

-- The model from the source itself (after a crash the source may have lost
-- its last asynchronous commits).
function W:reload()
  self.users, self.orders, self.uids, self.oids = {}, {}, {}, {}
  for _, r in ipairs(assert(self.conn:exec("SELECT id, ver FROM users"))) do
    self.users[r.id] = { ver = r.ver, orders = {} }
    if r.id >= self.next_id then self.next_id = r.id + 1 end
  end
  for _, r in ipairs(assert(self.conn:exec("SELECT id, user_id, ver FROM orders"))) do
    self.orders[r.id] = { ver = r.ver, user = r.user_id }
    self.users[r.user_id].orders[r.id] = true
    if r.id >= self.next_id then self.next_id = r.id + 1 end
  end
end

local function pick(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  if #keys == 0 then return nil end
  table.sort(keys)
  return keys[math.random(#keys)]
end

-- One statement of a transaction, the model changed with it.
function W:op(stmts)
  local r, c = math.random(), #stmts
  local uid = pick(self.users)
  if r < 0.25 or not uid then
    local id = self.next_id
    self.next_id = id + 1
    self.users[id] = { ver = 1, orders = {} }
    stmts[c + 1] = ("INSERT INTO users VALUES (%d, 'u%d', 1)"):format(id, id)
  elseif r < 0.5 then
    local id = self.next_id
    self.next_id = id + 1
    self.orders[id] = { ver = 1, user = uid }
    self.users[uid].orders[id] = true
    stmts[c + 1] = ("INSERT INTO orders VALUES (%d, %d, %d, 1)"):format(id, uid, math.random(1000))
  elseif r < 0.65 then
    local u = self.users[uid]
    u.ver = u.ver + 1
    stmts[c + 1] = ("UPDATE users SET name = 'n%d', ver = %d WHERE id = %d"):format(math.random(1e6), u.ver, uid)
  elseif r < 0.8 then
    local oid = pick(self.orders)
    if not oid then return self:op(stmts) end
    local o = self.orders[oid]
    o.ver = o.ver + 1
    stmts[c + 1] = ("UPDATE orders SET amount = %d, ver = %d WHERE id = %d"):format(math.random(1000), o.ver, oid)
  elseif r < 0.92 then
    local oid = pick(self.orders)
    if not oid then return self:op(stmts) end
    self.users[self.orders[oid].user].orders[oid] = nil
    self.orders[oid] = nil
    stmts[c + 1] = ("DELETE FROM orders WHERE id = %d"):format(oid)
  else -- a user and its orders, the orders first
    for oid in pairs(self.users[uid].orders) do self.orders[oid] = nil end
    self.users[uid] = nil
    stmts[c + 1] = ("DELETE FROM orders WHERE user_id = %d; DELETE FROM users WHERE id = %d"):format(uid, uid)
  end
end

--- Writes `n` transactions of 1 to 6 statements each.
function W:write(n)
  local parts = {}
  for i = 1, n do
    local stmts = {}
    for _ = 1, math.random(6) do self:op(stmts) end
    parts[i] = "BEGIN; " .. table.concat(stmts, "; ") .. "; COMMIT;"
  end
  assert(self.conn:exec(table.concat(parts, "\n")))
  self.txs = self.txs + n
end

function W:close() self.conn:close() end

local function digest(ci, tbl)
  return T.sql(("SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY id)), '') FROM %s t")
    :format(tbl), ci)
end

local function same(src, dst_ci, timeout)
  return H.eventually(function()
    return digest("dbname=" .. src, "users") == digest(dst_ci, "users")
      and digest("dbname=" .. src, "orders") == digest(dst_ci, "orders")
  end, timeout or 60, 0.2)
end

-- What the runs printed: applied batches, events skipped, failures.
local function tally(procs)
  local t = { ok = 0, skipped = 0, fails = {} }
  for _, p in ipairs(procs) do
    for _, l in ipairs(H.lines(p.stdout())) do
      local n, s = l:match("^OK (%d+) (%d+)$")
      if n then
        t.ok, t.skipped = t.ok + tonumber(n), t.skipped + tonumber(s)
      elseif l:find("^FAIL") then
        t.fails[#t.fails + 1] = l
      end
    end
  end
  return t
end

-- Failures that only a change applied twice, or out of order, explains.
local function bad_failures(fails)
  local out = {}
  for _, l in ipairs(fails) do
    if l:find("%[23%d%d%d%]") or l:find("affected", 1, true) or l:find("goes back", 1, true) then
      out[#out + 1] = l
    end
  end
  return out
end

local function check_target(src, dst_ci, procs)
  local ok = same(src, dst_ci)
  local t = tally(procs)
  local logs = {}
  for _, p in ipairs(procs) do logs[#logs + 1] = p.stderr():sub(-1500) end
  assert.is_true(ok and true or false, ("target differs: users %s vs %s, orders %s vs %s\n%s"):format(
    digest(dst_ci, "users"), digest("dbname=" .. src, "users"), digest(dst_ci, "orders"),
    digest("dbname=" .. src, "orders"), table.concat(logs, "\n---\n")))
  assert.same({}, bad_failures(t.fails))
  assert.equal("0", T.sql("SELECT count(*) FROM app WHERE n > 1", dst_ci))
  return t
end

-- A seeded run: the seed (printed by the test), the source database with
-- SOURCE, the target's conninfo with TARGET, a slot name.
local function dbs(prefix)
  local seed = os.time()
  math.randomseed(seed)
  local src = H.createdb(prefix .. "s")
  local _, dst_ci = T.createdb(prefix .. "t")
  local slot = ("%s_%d_%d"):format(prefix, os.time() % 100000, math.random(1e6))
  C.sql(SOURCE, src); T.sql(TARGET, dst_ci)
  return seed, src, dst_ci, slot
end

describe("pglisten.apply under the runner", function()
  it("SIGKILL of the runner at random points, 6 times in one run: the target equals the source, no change "
    .. "applied twice, no foreign key failure", function()
    local seed, src, dst_ci, slot = dbs("eo")
    local path = script(dst_ci, slot, { slow = true })
    local w = W.new(src)
    local procs = {}
    H.finally(function()
      w:close()
      C.cleanup(procs, src, slot)
    end)
    local behind = 0
    for round = 1, 6 do
      local p
      if round == 1 then -- the slot is made at the first start: writes before it are not streamed
        p = C.start(path, src)
        w:write(120)
      else
        w:write(120)
        p = C.start(path, src)
      end
      procs[round] = p
      pg.sleep(0.2 + math.random() * 0.8)
      if digest("dbname=" .. src, "orders") ~= digest(dst_ci, "orders") then behind = behind + 1 end
      p.kill("KILL")
      assert.truthy(p.wait(5))
    end
    w:write(50)
    procs[#procs + 1] = C.start(path, src)
    local t = check_target(src, dst_ci, procs)
    print(("\n  seed %d: %d transactions, %d runs killed (%d while behind), %d events applied, %d skipped as "
      .. "applied already, %d handler failures"):format(seed, w.txs, 6, behind, t.ok, t.skipped, #t.fails))
    assert.is_true(behind >= 2, "the kills did not land mid-stream: " .. behind)
    assert.is_true(t.skipped > 0, "no change was sent again: the spec did not test the dedupe")
  end)

  it("walsender terminated, source server crashed (-m immediate) and restarted, target down and back, all "
    .. "mid-stream: the target equals the source, nothing applied twice", function()
    local seed, src, dst_ci, slot = dbs("eof")
    local path = script(dst_ci, slot, { slow = true })
    local p = C.start(path, src)
    local procs = { p }
    local w = W.new(src)
    H.finally(function()
      w:close()
      C.cleanup(procs, src, slot)
    end)
    local faults = { "walsender", "crash", "target", "walsender", "crash", "target" }
    local behind = 0
    for _, fault in ipairs(faults) do
      w:write(120)
      pg.sleep(0.1 + math.random() * 0.5)
      if digest("dbname=" .. src, "orders") ~= digest(dst_ci, "orders") then behind = behind + 1 end
      if fault == "walsender" then
        C.sql(("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '%s'")
          :format(slot))
      elseif fault == "crash" then
        -- the runner goes down with the machine's services: the slot's position
        -- on disk (saved at checkpoints) may be older than what was confirmed,
        -- so the next runner gets changes again that the target has
        p.kill("KILL")
        p.wait(5)
        H.server("crash")
        H.server("start")
        w:reload() -- asynchronous commits on the source may be gone
        p = C.start(path, src)
        procs[#procs + 1] = p
      else
        H.server2("stop")
        w:write(30)
        pg.sleep(0.5)
        H.server2("start")
      end
      assert.is_true(p.running(), p.stderr())
    end
    w:write(30)
    local t = check_target(src, dst_ci, procs)
    print(("\n  seed %d: %d transactions, %d faults (%d while behind), %d events applied, %d skipped, %d handler "
      .. "failures (the target down)"):format(seed, w.txs, #faults, behind, t.ok, t.skipped, #t.fails))
    assert.is_true(behind >= 3, "the faults did not land mid-stream: " .. behind)
    assert.is_true(t.skipped > 0, "no change was sent again: the spec did not test the dedupe")
  end)

  it("a snapshot interrupted by SIGKILL, then done again, and a runner killed after it: no snapshot row "
    .. "overwrites a newer streamed value", function()
    local seed, src, dst_ci, slot = dbs("eosn")
    C.sql("INSERT INTO users SELECT g, 'u' || g, 1 FROM generate_series(1, 2000) g; "
      .. "INSERT INTO orders SELECT g, 1 + g % 2000, g, 1 FROM generate_series(2001, 4000) g", src)
    local path = script(dst_ci, slot, { slow = true, snapshot = true })
    local w = W.new(src)
    local procs = {}
    H.finally(function()
      w:close()
      C.cleanup(procs, src, slot)
    end)
    -- 1: killed in the middle of the snapshot, while the source changes
    procs[1] = H.start(path, { "--db", "dbname=" .. src }, nil, false)
    assert.truthy(H.eventually(function()
      return tonumber(T.sql("SELECT count(*) FROM users", dst_ci)) >= 200
    end, 30), procs[1].stderr())
    w:write(40)
    procs[1].kill("KILL")
    procs[1].wait(5)
    assert.is_nil(procs[1].stderr():find("initial snapshot done", 1, true))
    -- 2: the snapshot again (a new slot), the stream after it, killed mid-stream
    w:write(40)
    procs[2] = C.start(path, src)
    assert.matches("the initial snapshot of this slot never finished", procs[2].stderr(), 1, true)
    w:write(150)
    pg.sleep(0.2 + math.random() * 0.5)
    procs[2].kill("KILL")
    procs[2].wait(5)
    -- 3: resumes from the slot, no snapshot this time
    w:write(40)
    procs[3] = C.start(path, src)
    assert.is_nil(procs[3].stderr():find("initial snapshot done", 1, true))
    local t = check_target(src, dst_ci, procs)
    print(("\n  seed %d: snapshot killed and done again, then %d transactions; %d events applied, %d skipped"):format(
      seed, w.txs, t.ok, t.skipped))
  end)
end)
