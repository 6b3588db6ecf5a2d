-- Breaking "values arrive exact" (issue 10): the cases the first specs (09)
-- did not reach.  Float table keys, a locale whose decimal point is not '.'
-- (LC_NUMERIC set by a handler script or the program that loads the module),
-- and the edges of the number rule.
local H = require "helpers"
local pg = H.pg

local encode, decode = pg.json.encode, pg.json.safe.decode

-- The shortest "%.Ng" that reads back as x.
local function shortest(x)
  for p = 1, 17 do
    local s = ("%." .. p .. "g"):format(x)
    if tonumber(s) == x then return s end
  end
end

local function keys(t)
  local list = {}
  for k in pairs(t) do list[#list + 1] = k end
  table.sort(list)
  return list
end

describe("float table keys", function()
  it("leave in the shortest form, so distinct keys stay distinct", function()
    local s = encode({ [0.1 + 0.2] = "sum", [0.3] = "three" })
    local back = assert(decode(s))
    assert.same({ "0.3", shortest(0.1 + 0.2) }, keys(back))
    assert.equal("sum", back[shortest(0.1 + 0.2)])
    assert.equal("three", back["0.3"])
    for _, x in ipairs { 1 / 3, 2 ^ 63, 1e300, -2.5e-300, 5e-324, math.pi } do
      local k = next(assert(decode(encode({ [x] = true }))))
      assert.equal(shortest(x), k)
      assert.equal(x, tonumber(k))
    end
  end)
end)

describe("a number key and a string key that are the same JSON key", function()
  it("refuse to encode, rather than write the key twice and lose a value", function()
    for _, t in ipairs { { [1] = "a", ["1"] = "b" }, { [0.5] = 1, ["0.5"] = 2 }, { [-7] = 1, ["-7"] = 2, x = 3 } } do
      assert.has_error(function() encode(t) end)
      local s, err = pg.json.safe.encode(t)
      assert.is_nil(s)
      assert.matches("both", err)
    end
    assert.equal('{"2":"a"}', encode({ [2] = "a" }))
    local back = assert(decode(encode({ [2] = "two", ["1"] = "one" })))
    assert.same({ ["1"] = "one", ["2"] = "two" }, back)
  end)

  it("make exec raise before anything is sent", function()
    local c = H.connect()
    H.finally(function() c:close() end)
    assert.has_error(function() c:exec("SELECT $1::jsonb AS j", { [1] = "a", ["1"] = "b" }) end)
    assert.equal("a", assert(c:exec("SELECT $1::jsonb AS j", { [1] = "a", ["2"] = "b" }))[1].j["1"])
  end)
end)

describe("pglisten.unchanged (a TOASTed value the server did not send)", function()
  it("refuses to become JSON or a parameter, rather than arrive as {} in the target", function()
    assert.has_error(function() encode({ id = 1, bio = pg.unchanged }) end)
    local s, err = pg.json.safe.encode({ id = 1, bio = pg.unchanged })
    assert.is_nil(s)
    assert.matches("cannot encode pglisten.unchanged", err, 1, true)
    assert.matches("leave the column out", err, 1, true)
    local c = H.connect()
    H.finally(function() c:close() end)
    local ok, perr = pcall(c.exec, c, "SELECT $1::text AS bio", pg.unchanged)
    assert.is_false(ok); assert.matches("pglisten.unchanged", perr, 1, true)
    ok = pcall(c.execmany, c, "SELECT $1::text", { { "a" }, { pg.unchanged } })
    assert.is_false(ok)
    assert.equal("idle", c:txstatus())
    -- other tables with a metatable encode as before
    assert.equal("[1,2]", encode(setmetatable({ 1, 2 }, {})))
  end)
end)

---------------------------------------------------------------------------
-- Another locale: a child lua5.4 with LOCPATH pointing at locales that
-- localedef builds here, de_DE (',') and ps_AF (a two-byte decimal point).
---------------------------------------------------------------------------

local LOCALE_CHILD = [=[
package.cpath = arg[1] .. "/?.so;" .. package.cpath
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local pg = require "pglisten"
assert(os.setlocale(arg[2], "numeric"), "no locale " .. arg[2])
local bad = {}
local function check(what, got, want)
  if got ~= want or math.type(got) ~= math.type(want) then
    bad[#bad + 1] = ("%s: got %s %s, want %s"):format(what, math.type(got) or type(got),
      string.format("%q", got), string.format("%q", want))
  end
end
local enc, dec = pg.json.encode, pg.json.safe.decode
check("encode 0.5", enc(0.5), "0.5")
check("encode {1/3}", enc({ 1 / 3 }), "[0.3333333333333333]")
check("encode key 2.5", enc({ [2.5] = 1 }), '{"2.5":1}')
check("decode 0.5", dec("0.5"), 0.5)
check("decode 0.30", dec("[0.30]")[1], 0.3)
check("decode 1e-20", dec("1e-20"), 1e-20)
check("decode 250 digits", dec("1." .. ("0"):rep(248)), 1.0)
local c = assert(pg.connect(""))
local r = assert(c:exec("SELECT 0.5::float8 AS a, 1.25::float4 AS b, 0.1::numeric AS n, "
  .. "$1::float8 AS p, $1::text AS t, $2::jsonb AS j, $3::float8 AS q", 0.1, { 1 / 3 }, "2.5"))[1]
check("float8 column 0.5", r.a, 0.5)
check("float4 column 1.25", r.b, 1.25)
check("numeric column 0.1", r.n, 0.1)
check("parameter 0.1 through float8", r.p, 0.1)
check("parameter 0.1 as text", r.t, "0.1")
check("jsonb 1/3", r.j[1], 1 / 3)
check("string parameter '2.5' through float8", r.q, 2.5)
c:close()
io.write(#bad == 0 and "ok\n" or table.concat(bad, "\n") .. "\n")
]=]

describe("a locale whose decimal point is not '.'", function()
  local locpath, script
  setup(function()
    locpath = H.dir .. "/locales"
    os.execute("mkdir -p " .. H.q(locpath))
    for _, l in ipairs { "de_DE", "ps_AF" } do
      local out, ok = H.sh(("localedef -i %s -f UTF-8 %s"):format(l, H.q(locpath .. "/" .. l .. ".UTF-8")))
      assert(ok or out:match("^%s*$"), "localedef " .. l .. ": " .. out)
    end
    script = H.file("locale_child.lua", LOCALE_CHILD)
  end)

  for _, l in ipairs { "de_DE.UTF-8", "ps_AF.UTF-8" } do
    it("changes no number, " .. l, function()
      local out = H.sh(("LOCPATH=%s lua5.4 %s %s %s"):format(H.q(locpath), H.q(script), H.q(H.build), l))
      assert.equal("ok\n", out)
    end)
  end
end)
