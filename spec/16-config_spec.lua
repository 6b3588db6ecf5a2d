-- Configuration that cannot be silently wrong: unknown keys refused with a
-- suggestion, reserved names, the table of decoders, and the validation of
-- retry and ordering.  The script errors are checked through the real runner
-- binary (--check and a real start), the rest at the module level.
local H = require "helpers"

local script, lines = H.script, H.lines

local function notify(ch, payload)
  local c = H.connect()
  assert(c:notify(ch, payload))
  c:close()
end

-- Both ways a script is loaded refuse it with exit 2 and the same message:
-- --check prints it on stderr, a real start logs it (quotes escaped).
local function refused(body, ...)
  local path = H.file("config.lua", body)
  local rc, out, err = H.run_runner({ "--check", path })
  assert.equal(2, rc, err)
  assert.equal("", out)
  assert.truthy(err:find(path, 1, true), err)
  for _, want in ipairs({ ... }) do
    assert.truthy(err:find(want, 1, true), ("wanted %q in: %s"):format(want, err))
  end
  local rc2, _, err2 = H.run_runner({ path })
  assert.equal(2, rc2, err2)
  assert.truthy(err2:find("cannot load script", 1, true), err2)
  assert.truthy(err2:find(path, 1, true), err2)
  for _, want in ipairs({ ... }) do
    want = want:gsub('[\\"]', "\\%0")
    assert.truthy(err2:find(want, 1, true), ("wanted %q in: %s"):format(want, err2))
  end
  return err
end

describe("a script with a misspelt key", function()
  local cases = {
    { "top level", "return { channels = { a = function() end },\n  hearbeat = 5 }",
      ":2: unknown key 'hearbeat' (did you mean 'heartbeat'?)" },
    { "top level, a longer key", "return { channels = { a = function() end }, single_activ = true }",
      "unknown key 'single_activ' (did you mean 'single_active'?)" },
    { "top level, a table", "return { channels = { a = function() end }, reconect = { min = 1 } }",
      "did you mean 'reconnect'?" },
    { "top level, ordering", "return { channels = { a = function() end }, odrering = 'channel' }",
      "did you mean 'ordering'?" },
    { "a channel entry", "return { channels = {\n  jobs = { handler = function() end,\n    durabel = true } } }",
      ':3: channels["jobs"]: unknown key \'durabel\' (did you mean \'durable\'?)' },
    { "a channel entry, retry",
      "return { channels = { a = { handler = function() end, retyr = { attempts = 2 } } } }",
      'channels["a"]: unknown key \'retyr\' (did you mean \'retry\'?)' },
    { "a channel entry, decode", "return { channels = { a = { handler = function() end, decdoe = 'raw' } } }",
      "did you mean 'decode'?" },
    { "inside retry",
      "return { channels = { a = { handler = function() end,\n  retry = { attempts = 2, backof = 1 } } } }",
      'channels["a"]: retry: unknown key \'backof\' (did you mean \'backoff\'?)' },
    { "inside retry, max_backoff", "return { channels = { a = { handler = function() end,\n"
      .. "  retry = { max_backof = 3 } } } }", "did you mean 'max_backoff'?" },
    { "inside reconnect", "return { channels = { a = function() end }, reconnect = { mni = 1 } }",
      "reconnect: unknown key 'mni' (did you mean 'min'?)" },
    { "inside replication", "return { channels = { a = function() end }, replication = { slto = 'x' } }",
      "replication: unknown key 'slto' (did you mean 'slot'?)" },
  }
  for _, case in ipairs(cases) do
    it("is refused with exit 2 and a suggestion: " .. case[1], function()
      refused(case[2], case[3])
    end)
  end

  it("far from every known key is refused with the list of known keys", function()
    local err = refused("return { channels = { a = function() end }, colour = 'blue' }", "unknown key 'colour'",
      "known keys: ")
    assert.is_nil(err:find("did you mean", 1, true))
    assert.truthy(err:find("heartbeat", 1, true))
  end)

  it("at the wrong level is refused with where it belongs", function()
    refused("return { channels = { a = function() end }, durable = true }",
      "unknown key 'durable' (durable is a channel setting: put it in a channel entry)")
    refused("return { channels = { a = { handler = function() end, heartbeat = 5 } } }",
      "unknown key 'heartbeat' (heartbeat is a script setting: put it beside 'channels')")
    refused("return { channels = { a = function() end }, durabel = true }",
      "unknown key 'durabel' (did you mean 'durable'? That is a channel setting: put it in a channel entry)")
  end)

  it("that is not a string is refused", function()
    refused("return { function() end, channels = { a = function() end } }", "unknown key [1]")
  end)

  it("is refused on SIGHUP too: the running script is kept", function()
    local path = script("return { channels = { a = function(row) out('a', row.k) end } }")
    local p = H.start(path)
    H.finally(function() p.stop() end)
    local f = assert(io.open(path, "w"))
    f:write("return { channels = { a = { handler = function() end, durabel = true } } }\n")
    f:close()
    p.kill("HUP")
    assert.truthy(H.eventually(function() return p.stderr():find("reload failed", 1, true) end, 10), p.stderr())
    assert.truthy(p.stderr():find("did you mean 'durable'?", 1, true), p.stderr())
    notify("a", '{"k":"still"}')
    assert.truthy(H.eventually(function() return p.stdout():find("a still", 1, true) end, 10), p.stdout())
  end)
end)

describe("a script with every known key", function()
  it("passes --check", function()
    local path = script([[
require("pglisten.decoders").register("kv", function(s) return { s } end)
return {
  channels = {
    plain = function() end,
    a = { handler = function() end, decode = "raw", batch = 10, source = "notify", ordered = false,
          retry = { attempts = 4, backoff = 0.5, max_backoff = 8 } },
    b = { handler = function() end, decode = "kv" },
    c = { handler = function() end, decode = "cjson", durable = true, max_attempts = 3, retry = { attempts = 2 } },
  },
  on_connect = function() end, on_error = function() end,
  reconnect = { min = 0.1, max = 30 }, heartbeat = 30, heartbeat_timeout = 10,
  stats_interval = 60, poll_interval = 5, batch_size = 256, single_active = "lock", ordering = "channel",
}
]])
    local rc, out, err = H.run_runner({ "--check", path })
    assert.equal(0, rc, err)
    assert.equal("", err)
    assert.same({ "a", "b", "c", "plain" }, (function()
      local t = {}
      for _, l in ipairs(lines(out)) do t[#t + 1] = l:match("^[^\t]+") end
      return t
    end)())
  end)
end)

describe("script.validate", function()
  local scriptmod = require "pglisten.script"
  local decoders = require "pglisten.decoders"
  local function h() end
  local function ok(t) return scriptmod.validate(t, "x.lua") end
  local function bad(t)
    local vok, err = pcall(scriptmod.validate, t, "x.lua")
    assert.is_false(vok, "accepted")
    return err
  end

  it("normalizes retry with a 30 s cap by default and validates each field", function()
    local spec = ok({ channels = { a = { handler = h, retry = { attempts = 2 } }, b = h,
      c = { handler = h, retry = { backoff = 60 } }, d = { handler = h, retry = {} } } })
    assert.same({ attempts = 2, backoff = 1, max_backoff = 30 }, spec.channels.a.retry)
    assert.is_nil(spec.channels.b.retry)
    -- a backoff above the default cap is the cap
    assert.same({ attempts = 3, backoff = 60, max_backoff = 60 }, spec.channels.c.retry)
    assert.same({ attempts = 3, backoff = 1, max_backoff = 30 }, spec.channels.d.retry)
    local cases = {
      { { attempts = 0 }, "retry.attempts must be an integer >= 1, got 0" },
      { { attempts = 1.5 }, "retry.attempts must be an integer >= 1, got 1.5" },
      { { attempts = "3" }, "retry.attempts must be an integer >= 1, got string" },
      { { backoff = -1 }, "retry.backoff must be a number >= 0, got -1" },
      { { backoff = 0 / 0 }, "retry.backoff must be a number >= 0" },
      { { backoff = 2, max_backoff = 1 }, "retry.max_backoff must be >= retry.backoff (2), got 1" },
      { { max_backoff = -1 }, "retry.max_backoff must be a number >= 0, got -1" },
      { { max_backoff = 0.5 }, "retry.max_backoff must be >= retry.backoff (1), got 0.5" },
    }
    for _, c in ipairs(cases) do
      local err = bad({ channels = { a = { handler = h, retry = c[1] } } })
      assert.truthy(err:find(c[2], 1, true), err)
    end
    assert.truthy(bad({ channels = { a = { handler = h, retry = 3 } } }):find("retry must be a table", 1, true))
    assert.same({ attempts = 5, backoff = 0, max_backoff = 0 },
      ok({ channels = { a = { handler = h, retry = { attempts = 5, backoff = 0, max_backoff = 0 } } } })
        .channels.a.retry)
  end)

  it("takes ordering = \"global\" (the default) or \"channel\"", function()
    assert.equal("global", ok({ channels = { a = h } }).ordering)
    assert.equal("global", ok({ channels = { a = h }, ordering = "global" }).ordering)
    assert.equal("channel", ok({ channels = { a = h }, ordering = "channel" }).ordering)
    local err = bad({ channels = { a = h }, ordering = "chanel" })
    assert.truthy(err:find('ordering must be "channel" or "global", got "chanel" (did you mean "channel"?)', 1, true),
      err)
    assert.truthy(bad({ channels = { a = h }, ordering = 1 }):find("ordering must be", 1, true))
  end)

  it("sets entry.decode and entry.decoder from the table of decoders", function()
    local spec = ok({ channels = { a = h, r = { handler = h, decode = "raw" },
      c = { handler = h, decode = "cjson" } } })
    assert.equal("json", spec.channels.a.decode)
    assert.equal(decoders.get("json"), spec.channels.a.decoder)
    assert.equal(decoders.get("raw"), spec.channels.r.decoder)
    assert.equal(decoders.get("cjson"), spec.channels.c.decoder)
    local err = bad({ channels = { a = { handler = h, decode = "xml" } } })
    assert.truthy(err:find('decode must be one of', 1, true), err)
    assert.truthy(err:find('"json"', 1, true) and err:find('"raw"', 1, true) and err:find('"cjson"', 1, true), err)
    err = bad({ channels = { a = { handler = h, decode = "jsn" } } })
    assert.truthy(err:find('(did you mean "json"?)', 1, true), err)
    assert.truthy(bad({ channels = { a = { handler = h, decode = 1 } } }):find("decode must be", 1, true))
    assert.truthy(bad({ channels = { a = { handler = h, decode = false } } }):find("got false", 1, true))
  end)

  it("refuses channel names beginning pglisten_", function()
    for _, name in ipairs({ "pglisten_outbox", "pglisten_x" }) do
      local err = bad({ channels = { [name] = h } })
      assert.truthy(err:find(('x.lua: channels: channel name "%s" is reserved'):format(name), 1, true), err)
    end
    ok({ channels = { pglisten = h, my_pglisten_x = h, PGLISTEN_x = h } })
  end)

  it("refuses max_attempts on a channel that is not durable", function()
    local err = bad({ channels = { a = { handler = h, max_attempts = 3 } } })
    assert.truthy(err:find("max_attempts applies to durable channels only", 1, true), err)
  end)

  it("knows the keys of coming versions, type-checks them, and refuses what this version lacks", function()
    local cases = {
      { { replication = { slot = "s", publication = "p", snapshot = true, create = false } },
        'replication: no channel has source = "replication"' },
      { { replication = { slot = 5 } }, "replication.slot must be a string, got number" },
      { { replication = { snapshot = "yes" } }, "replication.snapshot must be a boolean, got string" },
      { { replication = "crm" }, "replication must be a table" },
      { { metrics = 9187 }, "metrics must be a string \"ADDR:PORT\", got 9187" },
      { { metrics = "host:99999" }, "metrics must be a string \"ADDR:PORT\", got \"host:99999\"" },
      { { channels = { a = { handler = h, source = "replication" } } },
        'source = "replication" needs table = "schema.table" (or a channel named "schema.table"), got "a"' },
      { { channels = { a = { handler = h, source = "kafka" } } }, 'source must be "notify" or "replication"' },
      { { channels = { a = { handler = h, ordered = true } } }, "ordered applies to durable channels only" },
      { { channels = { a = { handler = h, ordered = 1 } } }, "ordered must be a boolean, got number" },
      { { channels = { a = { handler = h, table = "public.orders" } } }, "table applies to source = \"replication\"" },
      { { channels = { a = { handler = h, table = 7 } } }, "table must be a string" },
      { { channels = { a = { handler = h, on_failure = "dead" } } },
        "on_failure applies to source = \"replication\"" },
      { { channels = { a = { handler = h, on_failure = "skip" } } }, 'on_failure must be "block" or "dead"' },
    }
    for _, c in ipairs(cases) do
      local t = c[1]
      t.channels = t.channels or { a = h }
      local err = bad(t)
      assert.truthy(err:find(c[2], 1, true), err)
    end
    local spec = ok({ channels = { a = { handler = h, source = "notify", ordered = false } } })
    assert.equal("notify", spec.channels.a.source)
    assert.is_false(spec.channels.a.ordered)
    assert.is_true(ok({ channels = { a = { handler = h, durable = true, ordered = true } } }).channels.a.ordered)
  end)
end)

describe("pglisten.decoders", function()
  local decoders = require "pglisten.decoders"

  it("lists json, raw and cjson, sorted, and decodes as the runner always did", function()
    local names = decoders.names()
    for _, n in ipairs({ "cjson", "json", "raw" }) do
      assert.truthy(decoders.get(n), n)
    end
    local sorted = { table.unpack(names) }
    table.sort(sorted)
    assert.same(sorted, names)
    assert.same({ a = 9007199254740993 }, decoders.get("json")('{"a":9007199254740993}'))
    assert.same({ 1, 2 }, decoders.get("cjson")("[1,2]"))
    assert.equal(" not json ", decoders.get("raw")(" not json "))
    for _, how in ipairs({ "json", "cjson" }) do
      local d = decoders.get(how)
      for _, c in ipairs({ { "42", "number" }, { '"x"', "string" }, { "null", "null" }, { "true", "boolean" } }) do
        local v, err = d(c[1])
        assert.is_nil(v)
        assert.equal(("payload is JSON but not an object or array (%s)"):format(c[2]), err)
      end
      local v, err = d("{bad")
      assert.is_nil(v)
      assert.is_string(err)
    end
    assert.is_nil(decoders.get("nope"))
  end)

  it("registers a decoder, replaces it on a second register, and protects the runner from one that raises", function()
    decoders.register("test_upper", function(s) return { s:upper() } end)
    assert.same({ "ABC" }, decoders.get("test_upper")("abc"))
    local found = false
    for _, n in ipairs(decoders.names()) do found = found or n == "test_upper" end
    assert.is_true(found)
    decoders.register("test_upper", function(s) return { s:lower() } end)
    assert.same({ "abc" }, decoders.get("test_upper")("ABC"))
    decoders.register("test_raises", function() error("no good") end)
    local v, err = decoders.get("test_raises")("x")
    assert.is_nil(v)
    assert.truthy(err:find("no good", 1, true), err)
    decoders.register("test_nil", function() return nil end)
    v, err = decoders.get("test_nil")("x")
    assert.is_nil(v)
    assert.equal('decoder "test_nil" returned nothing', err)
    decoders.register("test_err", function() return nil, "bad kv" end)
    assert.same({ nil, "bad kv" }, { decoders.get("test_err")("x") })
  end)

  it("refuses to register over a built-in, or a bad name or function", function()
    for _, args in ipairs({ { "json", function() end }, { "raw", function() end }, { "cjson", function() end },
      { "", function() end }, { 5, function() end }, { "x", "notafunction" } }) do
      assert.has_error(function() decoders.register(table.unpack(args)) end)
    end
    assert.has_error(function() decoders.register("json", function() end) end,
      'decoder "json" is built in and cannot be replaced')
  end)
end)

describe("a registered decoder", function()
  local p
  after_each(function() if p then p.stop() end end)

  -- Waits on the runner's dispatch calling entry.decoder.
  it("decodes for a handler end to end, and its failures are decode failures", function()
    p = H.start(script([[
local decoders = require "pglisten.decoders"
decoders.register("kv", function(s)
  local t = {}
  for k, v in s:gmatch("(%w+)=(%w*)") do t[k] = v end
  if next(t) == nil then return nil, "no key=value pairs" end
  return t
end)
return {
  channels = {
    kv = { decode = "kv", handler = function(t) out("kv", t.a, t.b) end },
    kvb = { decode = "kv", batch = 10, handler = function(rows) out("kvb", #rows, rows[1].a) end },
  },
  on_error = function(err, note, info) out("error", info.kind, note.channel, err) end,
}]]))
    notify("kv", "a=1,b=two")
    notify("kv", "nothing here")
    notify("kvb", "a=x")
    assert.truthy(H.eventually(function() return #lines(p.stdout()) >= 3 end, 10), p.stdout() .. p.stderr())
    assert.same({ "kv 1 two", "error decode kv no key=value pairs", "kvb 1 x" }, lines(p.stdout()))
  end)
end)
