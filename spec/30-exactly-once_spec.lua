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
  local db, ci, conn
  setup(function()
    db, ci = T.createdb("apply")
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
    finally(function() other:close() end)
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
  end)

  it("raises on misuse: notes without a position", function()
    assert.has_error(function() pg.apply(conn, { { k = 1 } }, { { lsn = "0/1" } }, function() end) end)
    assert.has_error(function() pg.apply(conn, { { k = 1 } }, { note("0/1", 1) }, "no") end)
  end)
end)

