-- What a replication source tells: the notes of the initial snapshot's rows
-- carry the same position fields as streamed ones (lsn, lsn_int,
-- commit_lsn), with no xid or commit time (no transaction made them); the
-- runner's "stats" line counts the changes no channel serves as unrouted,
-- as the source's own "replication stats" line does.
local H = require "spec.helpers"
local C = require "spec.cdc_helpers"

local function line_of(stderr, what)
  local l = stderr:match(".*\n([^\n]*" .. what .. "[^\n]*)")
  assert(l, stderr)
  return l
end

describe("replication notes and stats", function()
  it("snapshot rows' notes carry lsn, lsn_int and commit_lsn; xid and commit_time are nil", function()
    local src, dst, slot = C.setup("nsnap")
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", src)
    C.sql("INSERT INTO items SELECT g FROM generate_series(1, 3) g", src)
    local path = C.script(dst, ([[
local pglisten = require "pglisten"
return {
  replication = { slot = %q, snapshot = true },
  channels = {
    ["public.items"] = { source = "replication", handler = function(ev, note)
      if ev.op == "TRUNCATE" then return end
      local parsed = pglisten.core.lsn_parse(note.lsn)
      out(("note %%s %%d snapshot=%%s lsn_int=%%s same=%%s commit_lsn=%%s xid=%%s commit_time=%%s"):format(
        ev.op, ev.new.id, tostring(note.snapshot), math.type(note.lsn_int), tostring(parsed == note.lsn_int),
        tostring(note.commit_lsn ~= nil), tostring(note.xid), tostring(note.commit_time)))
    end },
  },
}
]]):format(slot))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    C.sql("INSERT INTO items VALUES (4)", src)
    assert.truthy(H.eventually(function() return p.stdout():find("note INSERT 4 ", 1, true) end, 20), p.stderr())
    local out = p.stdout()
    for id = 1, 3 do
      assert.truthy(out:find(("note INSERT %d snapshot=true lsn_int=integer same=true commit_lsn=true xid=nil "
        .. "commit_time=nil"):format(id), 1, true), out)
    end
    -- streamed: the same fields, and the transaction's
    local l = out:match("note INSERT 4 [^\n]*")
    assert.matches("snapshot=nil lsn_int=integer same=true commit_lsn=true xid=%d+ commit_time=[%d.]+$", l)
  end)

  it("counts the changes no channel serves in the runner's stats line too", function()
    local src, dst, slot = C.setup("nunr")
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", src)
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", dst)
    C.sql("CREATE TABLE extra (id int PRIMARY KEY)", src)
    C.slot_first(src, slot, "items, extra")
    local p = C.run(src, dst, slot, [[
    ["public.items"] = { source = "replication", handler = function(ev) upsert("items", ev) end },]])
    C.sql("INSERT INTO extra SELECT g FROM generate_series(1, 5) g", src)
    C.sql("INSERT INTO items VALUES (1)", src)
    assert.truthy(C.same(src, dst, "items", 20), p.stderr())
    p.kill("USR1")
    local global
    assert.truthy(H.eventually(function()
      for _, l in ipairs(H.lines(p.stderr())) do
        if l:find(" stats ", 1, true) and not l:find("replication stats", 1, true) then global = l end
      end
      return global and p.stderr():find("replication stats", 1, true)
    end, 10), p.stderr())
    assert.matches(" unrouted=5", line_of(p.stderr(), "replication stats"))
    assert.matches(" unrouted=5", global)
  end)
end)
