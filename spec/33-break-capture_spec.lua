-- Attacks on pglisten.notify_trigger (issue 14's capture): writers whose
-- search_path is hostile, writers without privileges on the outbox, values
-- that must arrive exact, and the NOTIFY size boundary.
-- Against a real server, a database of its own per test.
local H = require "helpers"
local pg = H.pg
local json = pg.json

local conns = H.conns(60)
local connect = conns.connect
after_each(conns.close)

-- A fresh database with the schema installed: conn, conninfo, dbname.
local function fresh() return H.outbox_db(connect, "brkcap") end

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

describe("pglisten.notify_trigger and the writer's output settings", function()
  it("writes float8, float4, interval and bytea the same whatever the writer's session set", function()
    local c = fresh()
    assert(c:exec([[CREATE TABLE t (id int PRIMARY KEY, f float8, f4 float4, iv interval, b bytea)]]))
    triggers(c, "t", "durable")
    local insert = [[INSERT INTO t VALUES ($1, 0.1::float8 + 0.2::float8, 1.1::float4, '1 day 02:03:04', '\x00ff27')]]
    assert(c:exec(insert, 1))
    assert(c:exec([[SET extra_float_digits = -3]]))
    assert(c:exec([[SET IntervalStyle = 'sql_standard']]))
    assert(c:exec([[SET bytea_output = 'escape']]))
    assert(c:exec(insert, 2))
    assert(c:exec([[RESET ALL]]))
    local want = '{"op":"INSERT","schema":"public","table":"t","new":{"id":%d,"f":0.30000000000000004,'
      .. '"f4":1.1,"iv":"1 day 02:03:04","b":"\\\\x00ff27"},"old":null}'
    for _, ch in ipairs({ "row", "stmt" }) do
      local got = payloads(c, ch)
      assert.same({ want:format(1), want:format(2) }, got)
    end
  end)
end)

describe("pglisten.notify_trigger FOR EACH STATEMENT on a table whose columns share its query's names", function()
  it("sends whole rows for columns named r, n, o, i, j, e (INSERT, UPDATE, DELETE; both modes)", function()
    local c, conninfo = fresh()
    assert(c:exec([[CREATE TABLE t (id int PRIMARY KEY, r int, n int, o int, i int, j int, e int)]]))
    local l = connect(conninfo)
    assert(l:listen("note"))
    for _, mode in ipairs({ "durable", "notify" }) do
      local ch = mode == "durable" and "stmt" or "note"
      assert(c:exec(("CREATE TRIGGER ins_%s AFTER INSERT ON t REFERENCING NEW TABLE AS r FOR EACH STATEMENT "
        .. "EXECUTE FUNCTION pglisten.notify_trigger('%s', '%s')"):format(mode, ch, mode)))
      assert(c:exec(("CREATE TRIGGER upd_%s AFTER UPDATE ON t REFERENCING OLD TABLE AS o NEW TABLE AS n "
        .. "FOR EACH STATEMENT EXECUTE FUNCTION pglisten.notify_trigger('%s', '%s')"):format(mode, ch, mode)))
      assert(c:exec(("CREATE TRIGGER del_%s AFTER DELETE ON t REFERENCING OLD TABLE AS r FOR EACH STATEMENT "
        .. "EXECUTE FUNCTION pglisten.notify_trigger('%s', '%s')"):format(mode, ch, mode)))
    end
    assert(c:exec([[INSERT INTO t VALUES (1, 2, 3, 4, 5, 6, 7)]]))
    assert(c:exec([[UPDATE t SET e = 70]]))
    assert(c:exec([[DELETE FROM t]]))
    local row = '{"id":1,"r":2,"n":3,"o":4,"i":5,"j":6,"e":%d}'
    local want = {
      '{"op":"INSERT","schema":"public","table":"t","new":' .. row:format(7) .. ',"old":null}',
      '{"op":"UPDATE","schema":"public","table":"t","new":' .. row:format(70) .. ',"old":' .. row:format(7) .. '}',
      '{"op":"DELETE","schema":"public","table":"t","new":null,"old":' .. row:format(70) .. '}',
    }
    assert.same(want, payloads(c, "stmt"))
    local got = {}
    for k = 1, 3 do got[k] = assert(l:wait(10)).payload end
    assert.same(want, got)
  end)
end)

describe("pglisten.notify_trigger with a key column that the table does not have", function()
  it("fails a too-large row's write with an error naming the column, not a key of null", function()
    local c = fresh()
    assert(c:exec([[CREATE TABLE t (id int PRIMARY KEY, v text)]]))
    assert(c:exec([[CREATE TRIGGER bad_key AFTER INSERT ON t FOR EACH ROW
                    EXECUTE FUNCTION pglisten.notify_trigger('t', 'notify', 'ID')]]))
    assert(c:exec([[INSERT INTO t VALUES (1, 'small')]]))   -- whole: the key is not needed
    local ok, err = c:exec([[INSERT INTO t VALUES (2, repeat('x', 20000))]])
    assert.is_nil(ok)
    assert.matches('key column "ID" is not a column of public.t', err, 1, true)
    assert(c:exec([[DROP TRIGGER bad_key ON t]]))
    assert(c:exec([[CREATE TRIGGER bad_key_s AFTER INSERT ON t REFERENCING NEW TABLE AS n FOR EACH STATEMENT
                    EXECUTE FUNCTION pglisten.notify_trigger('t', 'notify', 'id', 'nope')]]))
    ok, err = c:exec([[INSERT INTO t VALUES (3, repeat('x', 20000))]])
    assert.is_nil(ok)
    assert.matches('key column "nope" is not a column of public.t', err, 1, true)
  end)
end)
