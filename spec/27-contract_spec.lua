-- The script contract without traps (issue 13): what a script may count on
-- when the runner runs it under systemd (cwd /), under --check, under
-- --tap, and the messages a user reads when something goes on or wrong.
-- Everything through the real runner binary and a real server.
local H = require "helpers"
local pg = H.pg

local script, lines = H.script, H.lines

local function notify(ch, payload)
  local c = H.connect()
  assert(c:notify(ch, payload))
  c:close()
end

-- Runs `argv` with its working directory `/`, as systemd does.
local function spawn_in_root(argv, env)
  local cmd = {}
  for i, a in ipairs(argv) do cmd[i] = H.q(a) end
  return H.spawn({ "sh", "-c", "cd / && exec " .. table.concat(cmd, " ") }, env)
end

describe("the script's own directory", function()
  it("is on package.path: require 'mylib' next to the script works from cwd /", function()
    local dir = H.file("scriptdir", "")
    os.remove(dir)
    assert(os.execute("mkdir -p " .. H.q(dir)))
    local f = assert(io.open(dir .. "/mylib27.lua", "w"))
    f:write("return { greet = function(s) return 'hello ' .. s end }\n")
    f:close()
    f = assert(io.open(dir .. "/main.lua", "w"))
    f:write([[
local mylib = require "mylib27"
return { channels = { c27lib = function(p) io.stdout:write(mylib.greet(p.who), "\n"); io.stdout:flush() end } }
]])
    f:close()
    local p = spawn_in_root({ H.runner, "--check", dir .. "/main.lua" })
    assert.equal(0, p.wait(20), p.stderr())
    assert.equal("c27lib\n", p.stdout())
    local r = spawn_in_root({ H.runner, dir .. "/main.lua" })
    H.finally(r.stop)
    assert(H.eventually(function() return r.stderr():find("listening", 1, true) or not r.running() end, 15),
      r.stderr())
    assert.truthy(r.running(), r.stderr())
    notify("c27lib", '{"who":"systemd"}')
    assert(H.eventually(function() return r.stdout():find("hello systemd", 1, true) end, 10), r.stdout())
    r.kill("TERM")
    assert.equal(0, r.wait(10))
  end)
end)

describe("--check", function()
  it("sets pglisten.checking and opens no connection (a lazy one that never connects)", function()
    -- a database that refuses connections: a real connect would fail the load
    local path = script([[
assert(pglisten.checking == true, "checking not set")
local db, err = pglisten.connect("host=127.0.0.1 port=1 dbname=nowhere connect_timeout=2")
assert(db, err)
local r, qerr = db:exec("SELECT 1")
out("exec", tostring(r), qerr)
return { channels = { c27check = function() end } }
]])
    local rc, out, err = H.run_runner({ "--check", path })
    assert.equal(0, rc, err)
    assert.truthy(out:find("exec nil not connected", 1, true), out)
    assert.truthy(out:find("c27check", 1, true), out)
    -- the script did not reach the server: nothing listens on port 1
    assert.falsy(out:find("Connection refused", 1, true), out)
  end)

  it("is false while the runner runs the script", function()
    local path = script([[
out("checking", tostring(pglisten.checking))
return { channels = { c27run = function() end } }
]])
    local p = H.start(path)
    H.finally(p.stop)
    assert.truthy(p.stdout():find("checking false", 1, true) or p.stdout():find("checking nil", 1, true),
      p.stdout())
  end)

  it("shows a script's error without the runner's own frames", function()
    local path = script([[
local function helper() error("boom in the script") end
helper()
return { channels = { a = function() end } }
]])
    local rc, out, err = H.run_runner({ "--check", path })
    assert.equal(2, rc)
    assert.equal("", out)
    assert.truthy(err:find("boom in the script", 1, true), err)
    assert.truthy(err:find("in main chunk", 1, true) or err:find("in local 'helper'", 1, true)
      or err:find("helper", 1, true), err)
    assert.falsy(err:find("pglisten/script.lua", 1, true), err)
    assert.falsy(err:find("pglisten/cli.lua", 1, true), err)
    assert.falsy(err:find("[C]: in function 'xpcall'", 1, true), err)
  end)
end)

describe("--tap CHANNEL", function()
  it("prints each decoded event as one JSON line instead of calling the handler", function()
    local path = script([[
return { channels = {
  c27tap = function(p) out("HANDLER CALLED") end,
  c27other = function(p) out("OTHER CALLED") end,
} }
]])
    local p = H.start(path, { "--tap", "c27tap" })
    H.finally(p.stop)
    notify("c27tap", '{"id":1,"name":"a\\"b","n":null}')
    notify("c27tap", '{"id":2}')
    notify("c27other", '{"id":3}')
    assert(H.eventually(function() return #lines(p.stdout()) >= 2 end, 10), p.stdout())
    H.sleep(0.3)
    local got = lines(p.stdout())
    assert.equal(2, #got, p.stdout())
    local e1 = assert(pg.json.decode(got[1]))
    assert.equal("c27tap", e1.channel)
    assert.equal(1, e1.payload.id)
    assert.equal('a"b', e1.payload.name)
    assert.equal(pg.null, e1.payload.n)
    assert.equal(2, assert(pg.json.decode(got[2])).payload.id)
    assert.falsy(p.stdout():find("CALLED", 1, true))
    p.kill("TERM")
    assert.equal(0, p.wait(10))
  end)

  it("leaves durable events in the outbox", function()
    local _, db = H.createdb("c27tap")
    local c = H.connect(db)
    assert(c:exec((require "pglisten.schema").sql))
    local path = script([[
return { channels = { c27dur = { durable = true, handler = function(p) out("HANDLER CALLED") end } } }
]])
    local p = H.start(path, { "--db", db, "--tap", "c27dur" })
    H.finally(p.stop)
    assert(c:exec("SELECT pglisten.publish('c27dur', '{\"id\":7}')"))
    assert(H.eventually(function() return #lines(p.stdout()) >= 1 end, 10), p.stdout() .. p.stderr())
    local e = assert(pg.json.decode(lines(p.stdout())[1]))
    assert.equal("c27dur", e.channel)
    assert.equal(7, e.payload.id)
    assert.is_true(e.durable)
    p.kill("TERM")
    assert.equal(0, p.wait(10))
    local r = assert(c:exec("SELECT count(*)::int AS n FROM pglisten.outbox WHERE channel = 'c27dur'"))
    assert.equal(1, r[1].n)
    c:close()
  end)
end)

describe("messages", function()
  it("a handler whose retry succeeds logs one INFO line with the attempts", function()
    local path = script([[
local n = 0
return { channels = { c27retry = { retry = { attempts = 5, backoff = 0.01 }, handler = function(p)
  n = n + 1
  if n < 3 then error("not yet") end
  out("done after", n)
end } } }
]])
    local p = H.start(path)
    H.finally(p.stop)
    notify("c27retry", "{}")
    assert(H.eventually(function() return p.stdout():find("done after 3", 1, true) end, 10), p.stderr())
    H.sleep(0.2)
    local info = {}
    for _, l in ipairs(lines(p.stderr())) do
      if l:find("INFO", 1, true) and l:find("c27retry", 1, true) and not l:find("listening", 1, true) then
        info[#info + 1] = l
      end
    end
    assert.equal(1, #info, p.stderr())
    assert.truthy(info[1]:find("attempts=3", 1, true), info[1])
  end)

  it("a second SIGTERM logs how many received notes it drops", function()
    local path = script([[
return { channels = { c27slow = function() os.execute("sleep 2") end } }
]])
    local p = H.start(path, { "--log-format", "json" })
    H.finally(p.stop)
    local c = H.connect()
    -- one transaction: all five arrive together
    assert(c:exec([[SELECT pg_notify('c27slow', '{"i":' || i || '}') FROM generate_series(1, 5) i]]))
    c:close()
    H.sleep(0.5) -- the first is in its handler, four wait
    p.kill("TERM")
    H.sleep(2.3) -- the first done, the second in its handler: four not handled
    p.kill("TERM")
    assert.equal(1, p.wait(10), p.stderr())
    local last
    for _, l in ipairs(lines(p.stderr())) do
      local o = pg.json.decode(l)
      if o and o.msg and o.msg:find("second stop signal", 1, true) then last = o end
    end
    assert.truthy(last, p.stderr())
    assert.equal(4, last.dropped)
  end)

  it("pglisten.null prints as pglisten.null", function()
    assert.equal("pglisten.null", tostring(pg.null))
    local c = H.connect()
    local r = assert(c:exec("SELECT NULL::int AS x"))
    assert.equal("pglisten.null", tostring(r[1].x))
    c:close()
    assert.equal("pglisten.null", tostring(pg.json.decode('{"a":null}').a))
    -- other light userdata keep printing as themselves
    assert.falsy(tostring(pg.core.conn_methods):find("pglisten.null", 1, true))
  end)

  it("the listening line names the durable channels too", function()
    local _, db = H.createdb("c27listen")
    local c = H.connect(db)
    assert(c:exec((require "pglisten.schema").sql))
    c:close()
    local path = script([[
return { channels = { c27plain = function() end, c27durable = { durable = true, handler = function() end } } }
]])
    local p = H.start(path, { "--db", db })
    H.finally(p.stop)
    local line
    for _, l in ipairs(lines(p.stderr())) do if l:find("listening", 1, true) then line = l end end
    assert.truthy(line:find("c27durable", 1, true), line)
    assert.truthy(line:find("c27plain", 1, true), line)
  end)

  it("--version prints libpq as major.minor", function()
    local rc, out = H.run_runner({ "--version" })
    assert.equal(0, rc)
    local v = pg.libpq_version()
    local want = v >= 100000 and ("%d.%d"):format(v // 10000, v % 10000)
      or ("%d.%d.%d"):format(v // 10000, v // 100 % 100, v % 100)
    assert.truthy(out:find("libpq " .. want .. ")", 1, true), out)
  end)
end)
