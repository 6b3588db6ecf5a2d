-- Breaking the promises of spec 11 at edges it did not try.  The outbox
-- never sticks: a trigger that refuses one event's row, and a server that
-- ends sessions idle in a transaction (idle_in_transaction_session_timeout),
-- must not keep the other events of the claim (or the claim itself) from
-- being finished.  No secret is logged: a URI password written without
-- percent-encoding ('/', '@', '?' in it), which libpq reads as pieces of
-- other options.
local H = require "helpers"
local pg = H.pg
local outbox = require "pglisten.outbox"

local opened = {}
local function connect(conninfo)
  local c = H.connect(conninfo, { query_timeout = 20 })
  opened[#opened + 1] = c
  return c
end

after_each(function()
  for i = #opened, 1, -1 do
    if not opened[i]:isclosed() then opened[i]:close() end
    opened[i] = nil
  end
end)

local function fresh()
  local name, conninfo = H.createdb("brk")
  local c = connect(conninfo)
  assert(outbox.install(c))
  return c, conninfo, name
end

---------------------------------------------------------------------------
-- No secret is logged: URI passwords libpq splits
---------------------------------------------------------------------------

local PORT, HOST = os.getenv("PGPORT"), "127.0.0.1"

-- `pw` is the password as the user wrote it between "user:" and the last
-- "@"; `pieces` are the parts of it that must never appear either (libpq
-- reads them as a host, a port or a database name).
local SPLIT = {
  { pw = "p@ss5ecret", pieces = { "ss5ecret" } },
  { pw = "p/ss5ecret", pieces = { "ss5ecret" } },
  { pw = "mid@dle/s3cr3tpart", pieces = { "s3cr3tpart", "dle/s3cr3tpart" } },
}

local function uri(pw, port, db)
  return ("postgresql://postgres:%s@%s:%s/%s"):format(pw, HOST, port, db)
end

local function assert_clean(text, shape, where)
  for _, s in ipairs({ shape.pw, table.unpack(shape.pieces) }) do
    assert.is_nil(text:find(s, 1, true), ("%s leaks %q of %q:\n%s"):format(where, s, shape.pw, text))
  end
end

describe("a URI password with an unencoded '@' or '/'", function()
  it("stays out of safe_conninfo, _redact and connect errors", function()
    for _, shape in ipairs(SPLIT) do
      local ci = uri(shape.pw, PORT, "postgres")
      assert_clean(pg.safe_conninfo(ci), shape, "safe_conninfo")
      local r = pg._redact("before " .. shape.pw .. " " .. table.concat(shape.pieces, " ") .. " after", ci)
      assert_clean(r, shape, "_redact")
      assert.matches("^before ", r)
      local c, err = pg.connect(ci, { timeout = 5 })
      if c then c:close() else assert_clean(err, shape, "connect error") end
      local l = pg.connect(ci, { lazy = true, timeout = 5 })
      if l then
        local ok, lerr = l:exec("SELECT 1")
        if not ok then assert_clean(lerr, shape, "lazy connect error") end
        l:close()
      end
    end
  end)

  it("stays out of the runner's log, as text and as JSON", function()
    local path = H.script("return { channels = { sec = function() end } }")
    for i, shape in ipairs(SPLIT) do
      local fmt = (i % 2 == 0) and "json" or "text"
      local p = H.start(path, { "--log-format", fmt, "--db", uri(shape.pw, PORT, "postgres") }, nil, false)
      H.eventually(function()
        local e = p.stderr()
        return e:find("retrying", 1, true) or e:find("listening", 1, true) or not p.running()
      end, 10)
      p.kill("TERM")
      p.wait(10)
      p.stop()
      assert_clean(p.stderr(), shape, "runner log (" .. fmt .. ")")
      local _, _, log = H.run_runner({ "--install", "--db", uri(shape.pw, PORT, "postgres") })
      assert_clean(log, shape, "--install")
    end
  end)
end)
