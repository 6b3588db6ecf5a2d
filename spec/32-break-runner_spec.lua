-- Attacks on the runner rebuilt for issue 11 (loop, sources, services):
-- each test is a promise someone tried to break; the ones that broke it
-- came with a fix.
local H = require "helpers"

local script, lines, start = H.script, H.lines, H.start

local function rewrite(path, body)
  local f = assert(io.open(path, "w"))
  f:write([[
local pglisten = require "pglisten"
local function out(...)
  local t = table.pack(...)
  for i = 1, t.n do t[i] = tostring(t[i]) end
  io.stdout:write(table.concat(t, " ", 1, t.n), "\n")
  io.stdout:flush()
end
]] .. body)
  f:close()
end

local function count(s, pat)
  local n = 0
  for _ in s:gmatch(pat) do n = n + 1 end
  return n
end

describe("break: reconnect delays", function()
  it("refuses a --reconnect-min/max too small to wait (1e-300) or infinite, as the script's keys do", function()
    local path = script("return { channels = { a = function() end } }")
    for _, v in ipairs({ "1e-300", "0.0001", "1e999", "inf", "nan" }) do
      for _, o in ipairs({ "--reconnect-min", "--reconnect-max" }) do
        local p = H.spawn({ H.runner, o, v, "--db", "host=127.0.0.1 port=1", path })
        local rc = p.wait(3)
        if rc == nil then p.stop() end
        assert.equal(2, rc, o .. " " .. v .. " was accepted: " .. p.stderr())
      end
    end
  end)

  it("does not reconnect in a busy loop with the smallest delay it accepts", function()
    local path = script("return { channels = { a = function() end } }")
    local p = start(path, { "--db", "host=127.0.0.1 port=1", "--reconnect-min", "0.001",
      "--reconnect-max", "0.001", "-l", "debug" }, nil, false)
    H.sleep(1)
    p.stop()
    local n = count(p.stderr(), "reconnect attempt failed") + count(p.stderr(), "retrying")
    assert.is_true(n < 1500, ("%d attempts in 1 s"):format(n))
  end)
end)

describe("break: reload", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("says that adding or removing single_active on SIGHUP takes effect at the next start", function()
    local _, ci = H.createdb("brsa")
    local path = script("return { channels = { a = function(r) out('a', r.i) end } }")
    p = start(path, { "--db", ci })
    rewrite(path, "return { single_active = true, channels = { a = function(r) out('a', r.i) end } }")
    p.kill("HUP")
    assert(H.eventually(function() return p.stderr():find("reloaded", 1, true) end, 5), p.stderr())
    assert.matches("single_active changed; it takes effect at the next start", p.stderr())
  end)
end)
