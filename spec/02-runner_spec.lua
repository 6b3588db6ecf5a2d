-- The lua-pglisten binary, started on temporary handler scripts against the
-- real server: CLI, routing, decoding, failures, signals, reload.
local H = require "helpers"
local pg = H.pg

local script, lines, start = H.script, H.lines, H.start

local function notify(ch, payload)
  local c = H.connect()
  assert(c:notify(ch, payload))
  c:close()
end

local function wait_lines(p, n, timeout)
  return H.eventually(function()
    local l = lines(p.stdout())
    return #l >= n and l
  end, timeout or 10) or lines(p.stdout())
end

describe("lua-pglisten command line", function()
  it("prints help and version with exit 0", function()
    local rc, out = H.run_runner({ "--help" })
    assert.equal(0, rc)
    assert.matches("usage: lua%-pglisten", out)
    assert.matches("%-%-log%-format", out)
    rc, out = H.run_runner({ "-V" })
    assert.equal(0, rc)
    assert.matches("^lua%-pglisten %d+%.%d+%.%d+", out)
  end)

  it("exits 2 on usage errors", function()
    for _, args in ipairs({ {}, { "--bogus", "x.lua" }, { "-l", "loud", "x.lua" }, { "--log-format", "xml", "x.lua" },
      { "a.lua", "b.lua" }, { "--db" } }) do
      local rc, _, err = H.run_runner(args)
      assert.equal(2, rc, table.concat(args, " "))
      assert.matches("lua%-pglisten:", err)
    end
  end)

  it("--check prints the channels of a good script and exits 0", function()
    local path = script([[
return { channels = { b = function() end, a = { decode = "raw", handler = function() end },
  c = { handler = function() end, batch = 10, retry = { attempts = 2, backoff = 0.5 } } } }
]])
    local rc, out = H.run_runner({ "--check", path })
    assert.equal(0, rc)
    assert.same({ "a\tdecode=raw", "b", "c\tbatch=10 retry=2x0.5s" }, lines(out))
  end)

  local broken = {
    { "a syntax error", "return { channels = { a = function() end }\n  x = }", ":2:" },
    { "a script that raises", "local x = nil\nreturn x.y", ":2:" },
    { "no table", "return 42", "must return a table" },
    { "missing channels", "return { on_error = function() end }", "'channels' table" },
    { "empty channels", "return { channels = {} }", "empty" },
    { "a non-function entry", "return { channels = { a = 42 } }", 'channels%["a"%]' },
    { "a bad decode", "return { channels = {\n a = { decode = 'xml',\n handler = function() end } } }",
      ':3: channels%["a"%]: decode must be' },
    { "a too long channel", ("return { channels = { [%q] = function() end } }"):format(("x"):rep(64)),
      "invalid channel name" },
    { "a bad on_error", "return { channels = { a = function() end }, on_error = 'no' }",
      "on_error must be a function" },
  }
  for _, case in ipairs(broken) do
    it("--check rejects " .. case[1] .. " with exit 2, naming the file", function()
      local path = H.file("broken.lua", case[2])
      local rc, out, err = H.run_runner({ "--check", path })
      assert.equal(2, rc)
      assert.equal("", out)
      assert.truthy(err:find(path, 1, true), err)
      assert.matches(case[3], err)
    end)
  end

  it("exits 2 when the script is missing", function()
    local rc, _, err = H.run_runner({ H.dir .. "/no-such-script.lua" })
    assert.equal(2, rc)
    assert.matches("no%-such%-script", err)
  end)

  it("exits 1 at once on a conninfo that can never work, without logging its password", function()
    local path = script("return { channels = { a = function() end } }")
    local t0 = H.now()
    local rc, _, err = H.run_runner({ "--db", "postgres://u:topsecret@127.0.0.1:" .. os.getenv("PGPORT")
      .. "/no_such_db_here", path })
    assert.equal(1, rc)
    assert.matches("does not exist", err)
    assert.is_nil(err:find("topsecret", 1, true))
    assert.is_true(H.now() - t0 < 5)
  end)
end)

describe("lua-pglisten handlers", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("routes each channel to its handler, JSON decoded and raw", function()
    p = start(script([[
return {
  channels = {
    users = function(row, note)
      out("users", math.type(row.id), row.id, row.name, note.channel, note.pid > 0, type(note.received_at))
    end,
    ["Mixed Case"] = function(row) out("mixed", row.k) end,
    audit = { decode = "raw", handler = function(text, note) out("audit", text, note.payload == text) end },
    nulls = function(row) out("nulls", row.v == pglisten.null) end,
  },
}]]))
    notify("users", { id = 7, name = "ann" })
    notify("audit", "plain text, not JSON")
    notify("Mixed Case", '{"k":"v"}')
    notify("nulls", '{"v":null}')
    notify("other", '{"ignored":true}')
    local l = wait_lines(p, 4)
    assert.same({ "users integer 7 ann users true number", "audit plain text, not JSON true", "mixed v",
      "nulls true" }, l)
  end)

  it("hands handlers integers exact to 64 bits, and decodes with lua-cjson on request", function()
    p = start(script([[
return {
  channels = {
    big = function(row) out("big", math.type(row.id), row.id, math.type(row.f), row.f) end,
    old = { decode = "cjson", handler = function(row) out("old", row.id, math.type(row.small), row.small) end },
  },
}]]))
    notify("big", '{"id":9007199254740993,"f":1.0}')
    notify("old", '{"id":9007199254740993,"small":12}')
    local l = wait_lines(p, 2)
    -- lua-cjson reads numbers as doubles: 2^53 + 1 arrives rounded
    assert.same({ "big integer 9007199254740993 float 1.0", "old 9007199254740992 integer 12" }, l)
  end)

  it("fills a batch beyond one read (256) from notes that have already arrived", function()
    local go = H.file("go", "")
    os.remove(go)
    p = start(script(([[
local go = %q
return {
  channels = { b = { decode = "raw", batch = 1000, handler = function(rows)
    out("batch", #rows, rows[1], rows[#rows])
  end } },
  on_connect = function()
    while not io.open(go) do pglisten.sleep(0.01) end
  end,
}]]):format(go)))
    local c = H.connect()
    assert(c:exec("BEGIN"))
    assert(c:exec("SELECT pg_notify('b', g::text) FROM generate_series(1, 1000) g"))
    assert(c:exec("COMMIT"))
    c:close()
    assert(io.open(go, "w")):close()
    local total = 0
    local l = H.eventually(function()
      local got, n = lines(p.stdout()), 0
      for _, line in ipairs(got) do n = n + tonumber(line:match("^batch (%d+)")) end
      total = n
      return n >= 1000 and got
    end, 10)
    assert(l, p.stdout() .. p.stderr())
    assert.equal(1000, total)
    local first, lo, hi = l[1]:match("^batch (%d+) (%d+) (%d+)$")
    assert.equal("1", lo)
    assert.is_true(tonumber(first) > 256, "first batch: " .. l[1])
    assert.equal(tonumber(first), tonumber(hi))
  end)

  it("rejects invalid JSON to on_error and goes on", function()
    p = start(script([[
return {
  channels = { j = function(row) out("ok", row.n) end },
  on_error = function(err, note, info) out("on_error", info.kind, note.channel, note.payload) end,
}]]))
    notify("j", "{not json")
    notify("j", "42")
    notify("j", "")
    notify("j", '{"n":1}')
    local l = wait_lines(p, 4)
    assert.same({ "on_error decode j {not json", "on_error decode j 42", "on_error decode j ", "ok 1" }, l)
    local err = p.stderr()
    assert.matches('payload rejected.-channel=j.-invalid JSON.-payload="{not json"', err)
  end)

  it("logs a raising handler with traceback and note, calls on_error, goes on", function()
    p = start(script([[
return {
  channels = { h = function(row) if row.fail then error("handler broke on " .. row.id) end out("ok", row.id) end },
  on_error = function(err, note, info)
    out("on_error", info.kind, tostring(err):match("handler broke on %d+"), pglisten.json.decode(note.payload).id)
  end,
}]]))
    notify("h", { id = 1, fail = true })
    notify("h", { id = 2 })
    local l = wait_lines(p, 2)
    assert.same({ "on_error handler handler broke on 1 1", "ok 2" }, l)
    local err = p.stderr()
    assert.matches("ERROR handler failed", err)
    assert.matches("stack traceback", err)
    assert.matches('payload="{.-\\"fail\\":true', err)
  end)

  it("survives an on_error that raises, and a handler that raises a table", function()
    p = start(script([[
return {
  channels = { h = function(row) if row.id == 1 then error({ code = 42 }) end out("ok", row.id) end },
  on_error = function(err, note) out("on_error", type(err), err.code) error("on_error itself broke") end,
}]]))
    notify("h", { id = 1 })
    notify("h", { id = 2 })
    local l = wait_lines(p, 2)
    assert.same({ "on_error table 42", "ok 2" }, l)
    assert.matches("on_error failed.-on_error itself broke", p.stderr())
    assert.matches('error="%(error object%) {\\"code\\":42}"', p.stderr())
    assert.is_true(p.running())
  end)

  it("runs handlers one at a time in server order", function()
    p = start(script([[
local n = 0
return { channels = {
  a = function(row) n = n + 1; out("a", row.i, n) end,
  b = { decode = "raw", handler = function(t) n = n + 1; out("b", t, n) end } } }]]))
    local c = H.connect()
    assert(c:exec("SELECT pg_notify(CASE WHEN g % 3 = 0 THEN 'b' ELSE 'a' END, "
      .. "CASE WHEN g % 3 = 0 THEN g::text ELSE json_build_object('i', g)::text END) FROM generate_series(1, 300) g"))
    c:close()
    local l = wait_lines(p, 300)
    assert.equal(300, #l)
    for i = 1, 300 do
      assert.equal(((i % 3 == 0) and "b " or "a ") .. i .. " " .. i, l[i])
    end
  end)

  it("keeps server order across plain, batch, retry and unrouted channels mixed in one stream", function()
    p = start(script([[
local failed = {}
return { channels = {
  a = function(row) out(row.i) end,
  b = { batch = 5, handler = function(rows) for _, r in ipairs(rows) do out(r.i) end end },
  c = { retry = { attempts = 2, backoff = 0.01 }, handler = function(row)
    if row.i % 2 == 0 and not failed[row.i] then failed[row.i] = true; error("once") end
    out(row.i)
  end },
  d = { decode = "raw", handler = function(t) out(t) end } } }]]))
    local c = H.connect()
    -- a: 1-3 mod 11, b: runs of 4-7, c: 8-9, d: 10, e: unrouted (no output)
    assert(c:exec([[SELECT pg_notify(CASE WHEN g % 11 < 4 THEN 'a' WHEN g % 11 < 8 THEN 'b'
      WHEN g % 11 < 10 THEN 'c' WHEN g % 22 = 10 THEN 'd' ELSE 'e' END,
      CASE WHEN g % 22 = 10 THEN g::text ELSE json_build_object('i', g)::text END)
      FROM generate_series(1, 440) g]]))
    c:close()
    local want = {}
    for g = 1, 440 do
      local m = g % 11
      if not (m == 10 and g % 22 ~= 10) then want[#want + 1] = tostring(g) end
    end
    local l = wait_lines(p, #want)
    assert.same(want, l)
  end)

  it("gives on_connect the listening connection after the LISTENs", function()
    p = start(script([[
return {
  channels = { a = function() end, ["Bee Cee"] = function() end },
  on_connect = function(db, info)
    local r = db:exec("SELECT string_agg(c, ',' ORDER BY c) AS l FROM pg_listening_channels() c")
    out("on_connect", r[1].l, tostring(info.reconnect), db:pid() > 0)
  end,
}]]))
    assert.same({ "on_connect Bee Cee,a false true" }, wait_lines(p, 1))
  end)

  it("logs as JSON, one object per line, and never the password", function()
    local port = os.getenv("PGPORT")
    p = start(script("return { channels = { j = function(row) error('x') end } }"),
      { "--log-format", "json", "--db", ("postgresql://postgres:pw-in-url@127.0.0.1:%s/postgres"):format(port) })
    notify("j", { a = 1 })
    H.eventually(function() return p.stderr():find("handler failed", 1, true) end, 5)
    p.kill("TERM")
    assert.equal(0, p.wait(10))
    local err = p.stderr()
    assert.is_nil(err:find("pw-in-url", 1, true))
    local n = 0
    for line in err:gmatch("[^\n]+") do
      local obj = assert(pg.json.decode(line), line)
      assert.is_string(obj.ts); assert.is_string(obj.level); assert.is_string(obj.msg)
      n = n + 1
    end
    assert.is_true(n >= 3)
  end)
end)

describe("lua-pglisten signals", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("SIGTERM during a slow handler lets it finish, then exits 0", function()
    p = start(script([[
return { channels = { slow = function(row)
  out("start", row.i)
  pglisten.sleep(1.0)
  out("done", row.i)
end } }]]))
    notify("slow", { i = 1 })
    assert(H.eventually(function() return p.stdout():find("start 1", 1, true) end, 5))
    local t0 = H.now()
    p.kill("TERM")
    local rc = p.wait(10)
    assert.equal(0, rc)
    assert.matches("done 1", p.stdout())
    assert.is_true(H.now() - t0 < 5)
    assert.matches("stopped", p.stderr())
  end)

  it("a second SIGTERM exits at once", function()
    p = start(script([[
return { channels = { stuck = function() out("stuck"); local t = os.time() while os.time() - t < 30 do end end } }]]))
    notify("stuck", {})
    assert(H.eventually(function() return p.stdout():find("stuck", 1, true) end, 5))
    p.kill("TERM")
    H.sleep(0.2)
    assert.is_true(p.running())
    p.kill("TERM")
    local rc = p.wait(3)
    assert.is_not_nil(rc)
    assert.is_true(rc ~= 0)
  end)

  it("SIGTERM when idle exits 0 within a second", function()
    p = start(script("return { channels = { a = function() end } }"))
    local t0 = H.now()
    p.kill("INT")
    assert.equal(0, p.wait(5))
    assert.is_true(H.now() - t0 < 1)
  end)

  it("SIGUSR1 logs statistics", function()
    p = start(script("return { channels = { a = function() end, b = function() error('x') end } }"))
    notify("a", {}); notify("b", {}); notify("a", "bad json")
    H.eventually(function() return p.stderr():find("payload rejected", 1, true) end, 5)
    p.kill("USR1")
    assert(H.eventually(function() return p.stderr():find("INFO  stats", 1, true) end, 5))
    local line = p.stderr():match("INFO  stats[^\n]*")
    assert.matches("received=3", line)
    assert.matches("handled=1", line)
    assert.matches("failed_decode=1", line)
    assert.matches("failed_handler=1", line)
    assert.matches("reconnects=0", line)
    assert.matches("oldest_unhandled_age=", line)
  end)

  it("SIGHUP reloads the script, LISTENs to an added channel, loses nothing meanwhile", function()
    local path = H.file("reload.lua", [[
local function out(...) io.stdout:write(table.concat({ ... }, " "), "\n"); io.stdout:flush() end
return { channels = { flow = function(row) out("flow", row.i) end } }]])
    p = start(path)
    -- a steady flow of notifications from another process while we reload
    local N = 400
    os.execute(("psql -qX -c \"DO \\$\\$ BEGIN FOR i IN 1..%d LOOP "
      .. "PERFORM pg_notify('flow', json_build_object('i', i)::text); "
      .. "COMMIT; PERFORM pg_sleep(0.005); END LOOP; END \\$\\$\" >/dev/null 2>&1 &"):format(N))
    H.sleep(0.5)
    local f = assert(io.open(path, "w"))
    f:write([[
local function out(...) io.stdout:write(table.concat({ ... }, " "), "\n"); io.stdout:flush() end
return { channels = {
  flow = function(row) out("flow", row.i) end,
  added = { decode = "raw", handler = function(t) out("added", t) end } } }]])
    f:close()
    p.kill("HUP")
    assert(H.eventually(function() return p.stderr():find("reloaded", 1, true) end, 5), p.stderr())
    notify("added", "hello")
    local got = H.eventually(function()
      local seen, added = 0, false
      for _, l in ipairs(lines(p.stdout())) do
        if l:match("^flow") then seen = seen + 1 end
        if l == "added hello" then added = true end
      end
      return seen == N and added
    end, 20)
    assert.truthy(got, "flow lines: " .. select(2, p.stdout():gsub("flow", "")) .. "\n" .. p.stderr())
    local expect = 1
    for _, l in ipairs(lines(p.stdout())) do
      local i = l:match("^flow (%d+)")
      if i then assert.equal(expect, tonumber(i)); expect = expect + 1 end
    end
  end)

  it("SIGHUP with a broken script keeps the old one", function()
    local path = H.file("reload2.lua", [[
return { channels = { keep = function(row) io.stdout:write("keep ", row.i, "\n"); io.stdout:flush() end } }]])
    p = start(path)
    local f = assert(io.open(path, "w")); f:write("return { channels = "); f:close()
    p.kill("HUP")
    assert(H.eventually(function() return p.stderr():find("reload failed", 1, true) end, 5))
    notify("keep", { i = 1 })
    assert.same({ "keep 1" }, wait_lines(p, 1))
  end)
end)

describe("the installed runner", function()
  it("finds its modules with no LUA_PATH after luarocks make into a tree", function()
    local tree, copy = H.dir .. "/tree", H.dir .. "/rocksrc"
    -- from a copy of the sources, as a user's checkout would be; CFLAGS=-O0:
    -- where things are installed is what is checked, and it compiles 3 x faster
    local out, ok = H.sh(("mkdir -p %s && cd %s && cp -r src lua rockspec Makefile doc %s && cd %s && "
      .. "luarocks --lua-version=5.4 --tree=%s make --deps-mode=none rockspec/lua-pglisten-scm-1.rockspec "
      .. "CFLAGS='-O0 -fPIC'")
      :format(H.q(copy), H.q(H.root), H.q(copy), H.q(copy), H.q(tree)))
    assert(ok, out)
    local bin = tree .. "/bin/lua-pglisten"
    local path = script([[
local cjson = require "cjson"
return { channels = { inst = function(row) out("installed", row.x, pglisten._VERSION ~= nil) end } }]])
    local rc, vout = H.run_runner({ "--version" })
    assert.equal(0, rc)
    local p = H.spawn({ "env", "-u", "LUA_PATH", "-u", "LUA_CPATH", "-u", "LUA_PATH_5_4", "-u", "LUA_CPATH_5_4",
      "HOME=" .. H.dir, bin, path })
    assert(H.eventually(function() return p.stderr():find("listening", 1, true) or not p.running() end, 10), p.stderr())
    notify("inst", { x = "yes" })
    local got = H.eventually(function() return p.stdout():find("installed yes true", 1, true) end, 5)
    p.kill("TERM")
    assert.equal(0, p.wait(5))
    assert.truthy(got, p.stderr())
    assert.truthy(vout)
  end)
end)
