-- A stop while on_connect waits for the notes of a lost connection: the
-- new connection's notes, read but held until on_connect runs, are dropped
-- unhandled (README, "What the runner guarantees about delivery") -- and
-- the stop's log lines count them with the rest.
local H = require "helpers"

describe("a stop while on_connect waits", function()
  it("counts the held notes of the new connection among those received but not handled", function()
    local db, ci = H.createdb("held")
    local c = H.connect(ci)
    local path = H.script([[return {
  reconnect = { min = 0.05, max = 0.2 },
  channels = {
    g = { retry = { attempts = 100, backoff = 0.2 }, handler = function(row) error("target down " .. row.i) end },
    a = { handler = function(row) out("a", row.k) end },
  },
  on_connect = function(db, info) out("on_connect", info.reconnect) end,
}]])
    local p = H.start(path, { "--db", ci })
    H.finally(function() p.stop() end)
    assert(c:notify("g", { i = 1 }))
    assert(H.eventually(function() return p.stderr():find("handler failed; retrying", 1, true) end, 10), p.stderr())
    -- the listening backend goes; the runner connects again and holds what comes
    local pid = H.lose_listener(c, db, p)
    assert(H.eventually(function()
      local now = H.runner_backend(db)
      return now and now ~= pid
    end, 15), p.stderr())
    for k = 1, 5 do assert(c:notify("a", { k = k })) end
    -- read (and held) by the runner: the server's queue for it is empty
    assert(H.eventually(function()
      p.kill("USR1")
      return p.stderr():find("received=[6-9]") or p.stderr():find("received=%d%d")
    end, 10), p.stderr())
    assert.is_nil(p.stdout():find("^a ") or p.stdout():find("\na "), p.stdout())
    local rc = H.time_to_exit(p, "TERM", 10)
    assert.equal(0, rc, p.stderr())
    local err = p.stderr()
    -- the retried note and the five held ones
    assert.matches("stopping: signal received[^\n]*queued=6", err)
    assert.matches("stopped with notifications received but not handled[^\n]*count=6", err)
    assert.matches("stats [^\n]*queued=6", err)
    assert.is_nil(p.stdout():find("a %d"), p.stdout())
  end)
end)
