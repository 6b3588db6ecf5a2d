-- Log lines are valid UTF-8, whatever bytes the events carry: a payload, a
-- channel name or a handler's error message with invalid UTF-8 must not
-- break a log collector (RFC 8259 JSON is UTF-8; journald, Vector, jq).
-- Invalid bytes are written as the four characters \xNN (lowercase hex, one
-- escape per byte); valid UTF-8 passes unchanged; text lines escape control
-- characters so that one record stays one line.
local H = require "helpers"
local pg = H.pg
local cjson = require "cjson"
local log = require "pglisten.log"

-- A printable picture of a line for failure messages.
local function show(s)
  return (s:gsub("[^\32-\126]", function(c) return ("<%02x>"):format(c:byte()) end))
end

local function assert_utf8(line)
  local n, pos = utf8.len(line)
  assert(n, ("invalid UTF-8 at byte %s of line: %s"):format(tostring(pos), show(line)))
end

-- A logger writing into a table; returns it and the lines written.
local function memlog(format, level)
  local lines = {}
  local out = { write = function(self, s, nl) lines[#lines + 1] = s; assert(nl == "\n"); return self end,
    flush = function() end }
  return log.new({ format = format, level = level or "debug", out = out }), lines
end

local CAFE, GRIN = "caf\195\169", "\240\159\152\128" -- 2-byte é, 4-byte U+1F600

-- input, and what a JSON line's decoded string holds for it
local cases = {
  { "plain ASCII", "hello", "hello" },
  { "2-, 3- and 4-byte characters", CAFE .. " \226\130\172 " .. GRIN, CAFE .. " \226\130\172 " .. GRIN },
  { "U+10FFFF and U+FFFF", "\244\143\191\191\239\191\191", "\244\143\191\191\239\191\191" },
  { "byte 0xFF", "a\255b", "a\\xffb" },
  { "a lone continuation byte", "a\128b", "a\\x80b" },
  { "an overlong '/' (C0 AF)", "a\192\175b", "a\\xc0\\xafb" },
  { "an overlong 3-byte NUL (E0 80 80)", "\224\128\128", "\\xe0\\x80\\x80" },
  { "a UTF-16 surrogate encoded in UTF-8 (ED A0 80)", "x\237\160\128", "x\\xed\\xa0\\x80" },
  { "a truncated 3-byte sequence at the end", "euro \226\130", "euro \\xe2\\x82" },
  { "a truncated 4-byte sequence before ASCII", GRIN:sub(1, 3) .. "ok", "\\xf0\\x9f\\x98ok" },
  { "above U+10FFFF (F4 90 80 80)", "\244\144\128\128", "\\xf4\\x90\\x80\\x80" },
  { "bytes F5 and F8", "\245\128\248z", "\\xf5\\x80\\xf8z" },
  { "invalid between valid characters", CAFE .. "\255" .. GRIN, CAFE .. "\\xff" .. GRIN },
}

describe("log lines as JSON", function()
  for _, c in ipairs(cases) do
    it("carry " .. c[1] .. " as valid UTF-8 (msg, field, key, nested)", function()
      local l, lines = memlog("json")
      l.error(c[2], { payload = c[2], nested = { list = { c[2] }, [c[2]] = c[2] } })
      assert.equal(1, #lines)
      assert_utf8(lines[1])
      local obj = cjson.decode(lines[1])
      assert.equal(c[3], obj.msg)
      assert.equal(c[3], obj.payload)
      assert.equal(c[3], obj.nested.list[1])
      assert.equal(c[3], obj.nested[c[3]])
    end)
  end

  it("leave user data alone: json.encode still writes the bytes as given", function()
    assert.equal('{"s":"a\255b"}', pg.json.encode({ s = "a\255b" }))
    local f = { s = "a\255b", t = { "\128" } }
    local l, lines = memlog("json")
    l.info("m", f)
    assert.equal("a\255b", f.s) -- the caller's table is not changed
    assert.equal("\128", f.t[1])
    assert_utf8(lines[1])
  end)

  it("still render fields JSON cannot hold (cycles, functions) by tostring", function()
    local cyc = { name = "\255" }
    cyc.self = cyc
    local l, lines = memlog("json")
    l.info("m", { cyc = cyc, fn = print, nested = { v = pg.null, ["\255"] = 1 }, n = 42, b = true, empty = {} })
    assert_utf8(lines[1])
    local obj = cjson.decode(lines[1])
    assert.matches("^table: ", obj.cyc)
    assert.matches("^function", obj.fn)
    assert.equal(cjson.null, obj.nested.v)
    assert.equal(1, obj.nested["\\xff"])
    assert.equal(42, obj.n)
    assert.is_true(obj.b)
  end)
end)

describe("log lines as text", function()
  for _, c in ipairs(cases) do
    it("carry " .. c[1] .. " as valid UTF-8", function()
      local l, lines = memlog("text")
      l.error(c[2], { payload = c[2], t = { c[2] } })
      assert.equal(1, #lines)
      assert_utf8(lines[1])
      assert.is_nil(lines[1]:find("\n", 1, true))
      if c[2] == c[3] then -- valid: unchanged, inside the message and the field
        assert.truthy(lines[1]:find(" " .. c[2] .. " ", 1, true), show(lines[1]))
      else -- the same \xNN escapes as in JSON
        assert.truthy(lines[1]:find(c[3] .. " ", 1, true), show(lines[1]))
        assert.truthy(lines[1]:find('payload="' .. c[3] .. '"', 1, true), show(lines[1]))
      end
    end)
  end

  it("escape control characters in the message, so one record is one line", function()
    local l, lines = memlog("text")
    l.error("one\ntwo\rthree\tfour\27[31mred\127", { error = "e\r\n\0x" })
    assert.equal(1, #lines)
    assert.is_nil(lines[1]:find("%c"), show(lines[1]))
    assert.truthy(lines[1]:find("one\\ntwo\\rthree\\tfour\\x1b[31mred\\x7f", 1, true), show(lines[1]))
    assert.truthy(lines[1]:find('error="e\\r\\n\\x00x"', 1, true), show(lines[1]))
  end)
end)

describe("the runner's log", function()
  local p, db
  local conns = H.conns(20)
  after_each(function()
    conns.close()
    if p then p.stop() end
  end)

  -- SQL_ASCII stores and sends any bytes, as a database of a legacy
  -- application may; a UTF8 database would refuse the invalid payloads.
  setup(function()
    db = ("logutf8_%d"):format(os.time() % 100000)
    H.psql("CREATE DATABASE " .. db .. " ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
  end)

  local SCRIPT = [[
return { channels = {
  j = function(row) end,
  ["r\255w"] = { decode = "raw", handler = function(s)
    out("handler got the bytes as sent:", s == "x\255y")
    error("bin \255\254 end\nsecond line caf\195\169 \240\159\152\128 " .. s, 0)
  end },
} }
]]

  local function run(format)
    local c = conns.connect(H.conninfo1(db))
    p = H.start(H.script(SCRIPT), { "--log-format", format, "--db", H.conninfo1(db) })
    assert(c:notify("j", "not json: caf\195\169 \255\254 \240\159\152\128 tail"))
    assert(c:notify("r\255w", "x\255y"))
    assert(H.eventually(function()
      local e = p.stderr()
      return e:find("payload rejected", 1, true) and e:find("handler failed", 1, true)
    end, 10), p.stderr())
    p.kill("TERM")
    assert.equal(0, p.wait(10))
    assert.equal("handler got the bytes as sent: true\n", p.stdout())
    local err = p.stderr()
    assert.truthy(err:find("\n$"))
    return H.lines(err)
  end

  it("as JSON: every line is valid UTF-8 JSON and keeps the readable parts", function()
    local byname = {}
    for _, line in ipairs(run("json")) do
      assert_utf8(line)
      local obj = cjson.decode(line)
      byname[obj.msg] = obj
    end
    assert.equal("r\\xffw", byname["handler failed"].channel)
    assert.equal("bin \\xff\\xfe end\nsecond line caf\195\169 \240\159\152\128 x\\xffy", byname["handler failed"].error)
    assert.equal("x\\xffy", byname["handler failed"].payload)
    assert.equal("not json: caf\195\169 \\xff\\xfe \240\159\152\128 tail", byname["payload rejected"].payload)
    assert.equal("j,r\\xffw", byname.listening.channels)
  end)

  it("as text: every line is valid UTF-8, one record per line", function()
    local lines = run("text")
    local failed
    for _, line in ipairs(lines) do
      assert_utf8(line)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ [A-Z]+ ", line)
      assert.is_nil(line:find("%c"), show(line))
      if line:find("handler failed", 1, true) then failed = line end
    end
    assert(failed, "no handler failed line")
    assert.truthy(failed:find('error="bin \\xff\\xfe end\\nsecond line caf\195\169 \240\159\152\128 x\\xffy"',
      1, true), show(failed))
  end)
end)
