-- Attacks on pglisten.notify_trigger (issue 14's capture): writers whose
-- search_path is hostile, writers without privileges on the outbox, values
-- that must arrive exact, and the NOTIFY size boundary.
-- Against a real server, a database of its own per test.
local H = require "helpers"
local outbox = require "pglisten.outbox"
local pg = H.pg
local json = pg.json

local opened = {}
local function connect(conninfo)
  local c = H.connect(conninfo, { query_timeout = 60 })
  opened[#opened + 1] = c
  return c
end

local function fresh()
  local _, conninfo = H.createdb("brkcap")
  local c = connect(conninfo)
  assert(outbox.install(c))
  return c, conninfo
end

after_each(function()
  for i = #opened, 1, -1 do
    if not opened[i]:isclosed() then opened[i]:close() end
    opened[i] = nil
  end
end)

local function payloads(c, channel)
  local rows = assert(c:exec("SELECT payload FROM pglisten.outbox WHERE channel = $1 ORDER BY id", channel))
  local t = {}
  for i, r in ipairs(rows) do t[i] = r.payload end
  return t
end

local function triggers(c, tbl, mode)
  assert(c:exec(("CREATE TRIGGER r AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW "
    .. "EXECUTE FUNCTION pglisten.notify_trigger('row', '%s')"):format(tbl, mode)))
  assert(c:exec(("CREATE TRIGGER s AFTER INSERT ON %s REFERENCING NEW TABLE AS nr FOR EACH STATEMENT "
    .. "EXECUTE FUNCTION pglisten.notify_trigger('stmt', '%s')"):format(tbl, mode)))
end

describe("pglisten.notify_trigger and a hostile search_path", function()
  it("builds the same events when the writer's schema shadows to_json and ||", function()
    local c = fresh()
    assert(c:exec([[CREATE TABLE t (id int PRIMARY KEY, v text)]]))
    triggers(c, "t", "durable")
    assert(c:exec([[CREATE SCHEMA evil]]))
    assert(c:exec([[CREATE FUNCTION evil.to_json(anyelement) RETURNS json LANGUAGE sql
                    AS $$ SELECT '"hijacked"'::json $$]]))
    assert(c:exec([[CREATE FUNCTION evil.cat(text, text) RETURNS text LANGUAGE sql
                    AS $$ SELECT 'hijacked' $$]]))
    assert(c:exec([[CREATE OPERATOR evil.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.cat)]]))
    assert(c:exec([[INSERT INTO t VALUES (1, 'a')]]))
    assert(c:exec([[SET search_path = evil, pg_catalog, public]]))
    assert(c:exec([[INSERT INTO t VALUES (2, 'b')]]))
    assert(c:exec([[RESET search_path]]))
    local want = '{"op":"INSERT","schema":"public","table":"t","new":{"id":2,"v":"b"},"old":null}'
    assert.same(want, payloads(c, "row")[2])
    assert.same(want, payloads(c, "stmt")[2])
  end)

  it("sends the keys-only event, not the shadow's, for a too-large row in 'notify' mode", function()
    local c, conninfo = fresh()
    assert(c:exec([[CREATE TABLE t (id int PRIMARY KEY, v text)]]))
    triggers(c, "t", "notify")
    assert(c:exec([[CREATE SCHEMA evil]]))
    assert(c:exec([[CREATE FUNCTION evil.json_object_agg(text, json) RETURNS json LANGUAGE sql
                    AS $$ SELECT '"hijacked"'::json $$]]))
    assert(c:exec([[CREATE FUNCTION evil.unnest(text[]) RETURNS SETOF text LANGUAGE sql
                    AS $$ SELECT 'hijacked' $$]]))
    local l = connect(conninfo)
    assert(l:listen("row", "stmt"))
    assert(c:exec([[SET search_path = evil, pg_catalog, public]]))
    assert(c:exec([[INSERT INTO t VALUES (7, repeat('x', 20000))]]))
    assert(c:exec([[RESET search_path]]))
    local got = {}
    for _ = 1, 2 do
      local note = assert(l:wait(10))
      got[note.channel] = json.decode(note.payload)
    end
    local want = { op = "INSERT", schema = "public", table = "t", new = { id = 7 }, old = pg.null, keys_only = true }
    assert.same(want, got.row)
    assert.same(want, got.stmt)
  end)
end)

describe("pglisten.notify_trigger with a channel too long for NOTIFY", function()
  it("fails the writer with an error naming the trigger and the limit, row and statement level", function()
    local c = fresh()
    local long = ("c"):rep(64)
    assert(c:exec([[CREATE TABLE t (id int PRIMARY KEY)]]))
    assert(c:exec(("CREATE TRIGGER too_long_r AFTER INSERT ON t FOR EACH ROW "
      .. "EXECUTE FUNCTION pglisten.notify_trigger('%s', 'notify')"):format(long)))
    local ok, err = c:exec([[INSERT INTO t VALUES (1)]])
    assert.is_nil(ok)
    assert.matches('trigger "too_long_r" on public.t', err, 1, true)
    assert.matches("at most 63 bytes", err, 1, true)
    assert(c:exec([[DROP TRIGGER too_long_r ON t]]))
    assert(c:exec(("CREATE TRIGGER too_long_s AFTER INSERT ON t REFERENCING NEW TABLE AS n FOR EACH STATEMENT "
      .. "EXECUTE FUNCTION pglisten.notify_trigger('%s', 'notify')"):format(long)))
    ok, err = c:exec([[INSERT INTO t VALUES (2)]])
    assert.is_nil(ok)
    assert.matches('trigger "too_long_s" on public.t', err, 1, true)
    -- 63 bytes are fine, and 'durable' mode takes any length (the outbox's channel is text)
    assert(c:exec([[DROP TRIGGER too_long_s ON t]]))
    assert(c:exec(("CREATE TRIGGER ok_r AFTER INSERT ON t FOR EACH ROW "
      .. "EXECUTE FUNCTION pglisten.notify_trigger('%s', 'notify')"):format(long:sub(2))))
    assert(c:exec(("CREATE TRIGGER ok_d AFTER INSERT ON t FOR EACH ROW "
      .. "EXECUTE FUNCTION pglisten.notify_trigger('%s', 'durable')"):format(long .. long)))
    assert(c:exec([[INSERT INTO t VALUES (3)]]))
    assert.equal(1, #payloads(c, long .. long))
  end)
end)

describe("pglisten.notify_trigger and the writer's privileges", function()
  it("needs USAGE on pglisten and INSERT on the outbox in 'durable' mode, nothing in 'notify' mode", function()
    local c, conninfo = fresh()
    local role = "brkcap_writer_" .. tostring(os.time()) .. tostring(math.random(1000, 9999))
    assert(c:exec(("CREATE ROLE %s"):format(role)))
    assert(c:exec([[CREATE TABLE t (id int PRIMARY KEY)]]))
    assert(c:exec([[CREATE TABLE n (id int PRIMARY KEY)]]))
    assert(c:exec(("GRANT INSERT ON t, n TO %s"):format(role)))
    assert(c:exec([[CREATE TRIGGER d AFTER INSERT ON t REFERENCING NEW TABLE AS nr FOR EACH STATEMENT
                    EXECUTE FUNCTION pglisten.notify_trigger('d', 'durable')]]))
    assert(c:exec([[CREATE TRIGGER r AFTER INSERT ON n FOR EACH ROW
                    EXECUTE FUNCTION pglisten.notify_trigger('n', 'notify')]]))
    local l = connect(conninfo)
    assert(l:listen("n"))
    assert(c:exec(("SET ROLE %s"):format(role)))
    local ok, err = c:exec([[INSERT INTO t VALUES (1)]])
    assert.is_nil(ok)
    assert.matches("permission denied for schema pglisten", err, 1, true)
    assert(c:exec([[INSERT INTO n VALUES (1)]]))          -- notify mode: nothing to grant
    assert(c:exec([[RESET ROLE]]))
    assert.equal(1, json.decode(assert(l:wait(10)).payload).new.id)
    assert(c:exec(("GRANT USAGE ON SCHEMA pglisten TO %s"):format(role)))
    assert(c:exec(("GRANT INSERT ON pglisten.outbox TO %s"):format(role)))
    assert(c:exec(("SET ROLE %s"):format(role)))
    assert(c:exec([[INSERT INTO t VALUES (2)]]))
    assert(c:exec([[RESET ROLE]]))
    assert.same({ '{"op":"INSERT","schema":"public","table":"t","new":{"id":2},"old":null}' }, payloads(c, "d"))
    assert(c:exec(("DROP OWNED BY %s"):format(role)))
    assert(c:exec(("DROP ROLE %s"):format(role)))
  end)
end)
