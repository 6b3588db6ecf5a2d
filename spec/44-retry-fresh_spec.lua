-- A retried handler gets the values as they were sent, not the tables its
-- failed attempt changed: a handler that scales a value and then fails
-- must not write it scaled twice on the retry.  Plain and batch channels
-- decode the payloads again for each retry (this failed before: 50000 for
-- 500); a durable event is claimed again from the outbox, decoded anew.
local H = require "helpers"

describe("a retry after a handler changed its row", function()
  it("gets the payload as sent: plain, batch and durable channels", function()
    local _, ci = H.createdb("fresh")
    local rc, out, err = H.run_runner({ "--install", "--db", ci })
    assert.equal(0, rc, out .. err)
    local c = H.connect(ci)
    local path = H.script([[
local tried = {}
local function once(key) if not tried[key] then tried[key] = true; error("target down for " .. key) end end
return {
  channels = {
    plain = { retry = { attempts = 3, backoff = 0.05 }, handler = function(row)
      row.cents = row.cents * 100          -- a transform in place
      row.tags[#row.tags + 1] = "seen"
      once("plain" .. row.id)
      out("plain", row.id, row.cents, #row.tags)
    end },
    many = { batch = 10, retry = { attempts = 3, backoff = 0.05 }, handler = function(rows)
      for _, row in ipairs(rows) do row.cents = row.cents * 100; row.id = nil end
      once("many")
      for _, row in ipairs(rows) do out("many", row.cents, tostring(row.id)) end
    end },
    durable = { durable = true, retry = { attempts = 3, backoff = 0.05 }, handler = function(row)
      row.cents = row.cents * 100
      once("durable" .. row.id)
      out("durable", row.id, row.cents)
    end },
  },
}]])
    local p = H.start(path, { "--db", ci })
    H.finally(function() p.stop() end)
    assert(c:notify("plain", { id = 1, cents = 5, tags = { "a" } }))
    assert(c:exec("BEGIN"))
    for i = 1, 3 do assert(c:notify("many", { id = i, cents = i })) end
    assert(c:exec("COMMIT"))
    assert(c:exec("SELECT pglisten.publish('durable', $1)", '{"id": 7, "cents": 3}'))
    assert(H.eventually(function()
      local o = p.stdout()
      return o:find("plain 1", 1, true) and H.count_matches(o, "many ") >= 3 and o:find("durable 7", 1, true)
    end, 20), p.stdout() .. p.stderr())
    local o = p.stdout()
    assert.matches("plain 1 500 2\n", o, 1, true)
    assert.matches("many 100 nil\nmany 200 nil\nmany 300 nil\n", o, 1, true)
    assert.matches("durable 7 300\n", o, 1, true)
    assert.equal(2, H.count_matches(p.stderr(), "handler failed; retrying"), p.stderr())
    assert.equal(1, H.count_matches(p.stderr(), "durable event failed; will retry"), p.stderr())
  end)
end)
