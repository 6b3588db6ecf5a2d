-- A served table dropped and created again is no longer in the publication
-- (DROP TABLE takes it out), so its changes were not sent, in silence.
-- The streaming runner looks every few seconds, adds it back, and says that
-- the changes before were not streamed; a table still gone is said once.
local H = require "spec.helpers"

local C = require "spec.cdc_helpers"

-- The runner looks for tables gone from the publication every PUB_CHECK
-- seconds (5 by default); the scripts look every second, so that the specs
-- wait 1 s per look instead of 5.
local PUB_CHECK = 'require("pglisten.sources.replication").PUB_CHECK = 1\n'

describe("a served table dropped and created again", function()
  it("is added back to the publication, with a warning; its new rows stream", function()
    local src, dst, slot = C.setup("recr")
    C.sql("CREATE TABLE items (id int PRIMARY KEY, v text); CREATE TABLE other (id int PRIMARY KEY)", src)
    local path = C.script(dst, (PUB_CHECK .. [[
return {
  replication = { slot = %q },
  channels = {
    ["public.items"] = { source = "replication", handler = function(ev) out("items", ev.op, ev.new and ev.new.id) end },
    ["public.other"] = { source = "replication", handler = function(ev) out("other", ev.op, ev.new and ev.new.id) end },
  },
}
]]):format(slot))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    C.sql("INSERT INTO items VALUES (1, 'a')", src)
    assert.truthy(H.eventually(function() return p.stdout():find("items INSERT 1", 1, true) end, 15), p.stderr())
    C.sql("DROP TABLE items; CREATE TABLE items (id int PRIMARY KEY, v text); DROP TABLE other", src)
    assert.truthy(H.eventually(function()
      return p.stderr():find("were not in the publication (dropped and created again?): added back", 1, true)
    end, 20), p.stderr())
    C.sql("INSERT INTO items VALUES (2, 'b')", src)
    assert.truthy(H.eventually(function() return p.stdout():find("items INSERT 2", 1, true) end, 15), p.stderr())
    local err = p.stderr()
    assert.matches("added back[^\n]*tables=public%.items", err)
    -- the table that is gone: said once, however many looks
    assert.truthy(H.eventually(function()
      return p.stderr():find("a table a channel serves is not in the publication", 1, true)
    end, 20), p.stderr())
    H.sleep(3) -- three more looks
    assert.equal(1, H.count_matches(p.stderr(), "a table a channel serves is not in the publication"))
    assert.matches("not in the publication: its changes are not streamed[^\n]*table=public%.other", p.stderr())
    assert.equal("public.items", C.sql(("SELECT string_agg(schemaname || '.' || tablename, ',') "
      .. "FROM pg_publication_tables WHERE pubname = '%s'"):format(slot), src))
    assert.is_true(p.running())
  end)

  it("is not put back, nor added by a reload, without a replica identity: the writers' UPDATEs keep working", function()
    local src, dst, slot = C.setup("recrpk")
    C.sql("CREATE TABLE items (id int PRIMARY KEY, v text); CREATE TABLE loose (id int, v text)", src)
    local body = PUB_CHECK .. [[
return {
  replication = { slot = %q },
  channels = {
    ["public.items"] = { source = "replication", handler = function(ev) out("items", ev.op, ev.new and ev.new.id) end },
    %s
  },
}
]]
    local path = C.script(dst, body:format(slot, ""))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    -- recreated without a primary key
    C.sql("DROP TABLE items; CREATE TABLE items (id int, v text); INSERT INTO items VALUES (1, 'a')", src)
    assert.truthy(H.eventually(function()
      return p.stderr():find("table public.items has no primary key", 1, true)
    end, 20), p.stderr())
    C.sql("UPDATE items SET v = 'b' WHERE id = 1", src) -- raises if the table were published without identity
    -- a reload that adds a table without a primary key
    H.rewrite(path, ("local TARGET = %q\n"):format("dbname=" .. dst) .. C.HANDLER .. body:format(slot,
      [=[["public.loose"] = { source = "replication", handler = function(ev) out("loose", ev.op) end },]=]))
    p.kill("HUP")
    assert.truthy(H.eventually(function()
      return p.stderr():find("table public.loose has no primary key", 1, true)
    end, 20), p.stderr())
    C.sql("INSERT INTO loose VALUES (1, 'a'); UPDATE loose SET v = 'b'; DELETE FROM loose", src)
    assert.equal("", C.sql(("SELECT coalesce(string_agg(tablename, ','), '') FROM pg_publication_tables "
      .. "WHERE pubname = '%s'"):format(slot), src))
    assert.is_true(p.running())
  end)
end)
