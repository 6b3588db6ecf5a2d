-- Breaking 89007d4 (a stop counts the notes held for on_connect) and 09547be
-- (a retry decodes the payloads again).  Real runner, real servers, real
-- backends terminated, real signals and sockets.
local H = require "helpers"
local unix = require "socket.unix"

-- A bound datagram socket standing in for systemd's notification socket
-- (as spec 26 does).
local function systemd()
  local path = H.file("notify.sock", "")
  os.remove(path)
  local s = assert(unix.dgram())
  assert(s:bind(path))
  local got = {}
  local sd = { path = path, got = got }
  function sd.drain()
    s:settimeout(0)
    while true do
      local m = s:receive()
      if not m then return end
      got[#got + 1] = m
    end
  end
  function sd.find(pat)
    sd.drain()
    for _, m in ipairs(got) do if m:find(pat) then return m end end
  end
  function sd.dump() sd.drain(); return (table.concat(got, "\n"):gsub("\n(%u+=)", " | %1")) end
  function sd.close() s:close(); os.remove(path) end
  return sd
end

local address = H.metrics_address

local function queue_length(p)
  local f = assert(io.popen(("env -u LD_PRELOAD curl -s -m 10 %s"):format(H.q("http://" .. address(p) .. "/metrics"))))
  local body = f:read("a")
  f:close()
  return tonumber(body:match('\nlua_pglisten_queue_length{source="notify"} (%d+)')), body
end

-- Waits for a USR1 stats line (written after the last one looked at) with
-- `received=N` and returns it.
local seen_to = setmetatable({}, { __mode = "k" })
local function stats_line(p, received)
  local line
  assert(H.eventually(function()
    p.kill("USR1")
    local e = p.stderr()
    for l in e:sub((seen_to[p] or 0) + 1):gmatch("[^\n]*stats [^\n]*") do
      if l:find("received=" .. received .. " ", 1, true) or l:find("received=" .. received .. "$") then line = l end
    end
    if line then seen_to[p] = #e end
    return line
  end, 10), p.stderr())
  return line
end

-- Until the runner listens on a backend other than `pid`; returns it.
local function new_backend(db, pid, p)
  local now
  assert(H.eventually(function()
    now = H.runner_backend(db)
    return now and now ~= pid
  end, 15), p.stderr())
  return now
end

describe("a stop while on_connect waits, seen from every count", function()
  it("metrics, stats, STATUS, stop lines and last words count held notes once, across a second loss", function()
    local sd = systemd()
    H.finally(sd.close)
    local db, ci = H.createdb("brk45")
    local c = H.connect(ci)
    local path = H.script([[return {
  reconnect = { min = 0.05, max = 0.2 },
  channels = {
    g = { retry = { attempts = 1000, backoff = 0.2 }, handler = function(row) error("target down " .. row.i) end },
    a = { batch = 10, handler = function(rows) for _, r in ipairs(rows) do out("a", r.k) end end },
  },
  on_connect = function(db, info) out("on_connect", info.reconnect) end,
}]])
    local p = H.start(path, { "--db", ci, "--metrics", "127.0.0.1:0" }, { NOTIFY_SOCKET = sd.path })
    H.finally(function() p.stop() end)
    assert(c:notify("g", { i = 1 }))
    assert(H.eventually(function() return p.stderr():find("handler failed; retrying", 1, true) end, 10), p.stderr())
    local pid = H.runner_backend(db)
    assert.is_number(pid, "no listening backend")
    assert(c:exec("SELECT pg_terminate_backend($1)", pid))
    pid = new_backend(db, pid, p)
    -- (the new backend shows in pg_stat_activity before it LISTENs)
    assert(H.eventually(function()
      return H.count_matches(p.stderr(), "on_connect waits for the notes received before the loss") == 1
    end, 15), p.stderr())
    for k = 1, 5 do assert(c:notify("a", { k = k })) end
    assert.matches("queued=6", stats_line(p, 6))
    local n, body = queue_length(p)
    assert.equal(6, n, body)
    -- a second loss while held: the held five go to the lanes, counted once
    assert(c:exec("SELECT pg_terminate_backend($1)", pid))
    new_backend(db, pid, p)
    assert(H.eventually(function()
      return H.count_matches(p.stderr(), "on_connect waits for the notes received before the loss") == 2
    end, 15), p.stderr())
    assert.matches("queued=6", stats_line(p, 6))
    for k = 6, 7 do assert(c:notify("a", { k = k })) end
    assert.matches("queued=8", stats_line(p, 8))
    n, body = queue_length(p)
    assert.equal(8, n, body)
    assert.is_nil(p.stdout():find("a %d"), p.stdout())
    -- the stop, then a second signal while the retry holds the lanes
    p.kill("TERM")
    assert(H.eventually(function() return p.stderr():find("stopping: signal received", 1, true) end, 10), p.stderr())
    H.sleep(0.3)
    p.kill("TERM")
    assert(H.eventually(function() return not p.running() end, 10), p.stderr())
    local err = p.stderr()
    assert.matches("stopping: signal received[^\n]*queued=8", err)
    assert.matches("second stop signal: exiting at once[^\n]*dropped=8", err)
    local stopping = sd.find("STOPPING=1")
    assert.truthy(stopping, sd.dump())
    assert.truthy(stopping:find("queued 8", 1, true), sd.dump())
    assert.is_nil(p.stdout():find("a %d"), p.stdout())
  end)
end)

describe("a retry whose decoder refuses the payload the second time", function()
  it("is a decode failure, not the handler's changed table; a batch keeps rows and notes aligned", function()
    local _, ci = H.createdb("brk45d")
    local c = H.connect(ci)
    local path = H.script([[
local seen = {}
require("pglisten.decoders").register("once", function(s)
  local t = pglisten.json.decode(s)
  if seen[s] and t.refuse_again then return nil, "replayed payload " .. t.id end
  if seen[s] and t.raise_again then error("key server down for " .. t.id) end
  seen[s] = true
  return t
end)
local tried = {}
local function once(key) if not tried[key] then tried[key] = true; error("target down for " .. key) end end
return {
  on_error = function(err, note, info)
    out("on_error", info.kind, info.channel, note.payload:match('"id": *(%d+)'))
  end,
  channels = {
    plain = { decode = "once", retry = { attempts = 3, backoff = 0.05 }, handler = function(row)
      row.cents = row.cents * 100
      once("plain" .. row.id)
      out("plain", row.id, row.cents)
    end },
    many = { decode = "once", batch = 10, retry = { attempts = 3, backoff = 0.05 }, handler = function(rows, notes)
      for _, row in ipairs(rows) do row.cents = row.cents * 100 end
      once("many")
      out("many", #rows, #notes)
      for k, row in ipairs(rows) do out("many", row.id, row.cents, notes[k].payload:match('"id": *(%d+)')) end
    end },
  },
}]])
    local p = H.start(path, { "--db", ci })
    H.finally(function() p.stop() end)
    assert(c:notify("plain", { id = 1, cents = 5, refuse_again = true }))
    assert(c:notify("plain", { id = 2, cents = 5, raise_again = true }))
    assert(c:notify("plain", { id = 3, cents = 5 }))
    assert(c:exec("BEGIN"))
    assert(c:notify("many", { id = 11, cents = 1 }))
    assert(c:notify("many", { id = 12, cents = 2, refuse_again = true }))
    assert(c:notify("many", { id = 13, cents = 3 }))
    assert(c:exec("COMMIT"))
    assert(H.eventually(function()
      local o = p.stdout()
      return o:find("plain 3 ", 1, true) and o:find("many 13 ", 1, true)
    end, 20), p.stdout() .. p.stderr())
    H.sleep(0.3)
    local o = p.stdout()
    assert.is_nil(o:find("plain 1 ", 1, true), o)
    assert.is_nil(o:find("plain 2 ", 1, true), o)
    assert.matches("plain 3 500\n", o, 1, true)
    assert.matches("on_error decode plain 1\n", o, 1, true)
    assert.matches("on_error decode plain 2\n", o, 1, true)
    assert.matches("on_error decode many 12\n", o, 1, true)
    assert.matches("many 2 2\nmany 11 100 11\nmany 13 300 13\n", o, 1, true)
    assert.is_nil(o:find("many 12 ", 1, true), o)
    local err = p.stderr()
    assert.matches("payload rejected[^\n]*replayed payload 1", err)
    assert.matches("payload rejected[^\n]*key server down for 2", err)
    assert.matches("payload rejected[^\n]*replayed payload 12", err)
    p.kill("USR1")
    assert(H.eventually(function() return p.stderr():find("stats [^\n]*failed_decode=3") end, 10), p.stderr())
  end)
end)

describe("a retry after a handler changed its notes", function()
  it("gets every note as sent: a batch's notes list emptied, a note's payload cleared; all counted", function()
    local _, ci = H.createdb("brk45n")
    local c = H.connect(ci)
    local path = H.script([[
local tried = {}
return {
  channels = {
    pop = { batch = 10, retry = { attempts = 3, backoff = 2 }, handler = function(rows, notes)
      out("pop", #rows, #notes)
      while #notes > 0 do           -- consumes what it writes
        local row, note = table.remove(rows, 1), table.remove(notes, 1)
        if not tried.pop then tried.pop = true; error("target down at " .. row.id) end
        out("pop", row.id, row.cents, note.payload:match('"id": *(%d+)'))
      end
    end },
    blank = { retry = { attempts = 3, backoff = 0.05 }, handler = function(row, note)
      row.cents = row.cents * 100
      note.payload = nil              -- done with the text
      if not tried.blank then tried.blank = true; error("target down") end
      out("blank", row.id, row.cents)
    end },
  },
}]])
    local p = H.start(path, { "--db", ci })
    H.finally(function() p.stop() end)
    assert(c:exec("BEGIN"))
    for i = 21, 23 do assert(c:notify("pop", { id = i, cents = i })) end
    assert(c:exec("COMMIT"))
    assert(c:notify("blank", { id = 31, cents = 5 }))
    -- while the emptied batch waits to retry, its three notes are queued
    assert(H.eventually(function() return p.stderr():find("handler failed; retrying[^\n]*channel=pop") end, 10),
      p.stderr())
    assert.matches("queued=4", stats_line(p, 4))
    assert(H.eventually(function() return p.stdout():find("blank 31 ", 1, true) end, 20), p.stdout() .. p.stderr())
    local o = p.stdout()
    assert.matches("pop 3 3\npop 3 3\npop 21 21 21\npop 22 22 22\npop 23 23 23\n", o, 1, true)
    assert.matches("blank 31 500\n", o, 1, true)
    p.kill("USR1")
    assert(H.eventually(function() return p.stderr():find("stats [^\n]*handled=4 ") end, 10), p.stderr())
  end)
end)

-- A guard: passes on 09547be too (the job keeps its old entry and decoder).
describe("a reload while a retry waits", function()
  it("retries with the old script's handler and decoder, on the payload as sent; new notes get the new ones", function()
    local _, ci = H.createdb("brk45r")
    local c = H.connect(ci)
    local v1 = [[
require("pglisten.decoders").register("kv", function(s) return { v = s, by = "old" } end)
local tried = false
return { channels = { r = { decode = "kv", retry = { attempts = 3, backoff = 1.5 }, handler = function(row)
  row.v = row.v .. "!"
  if not tried then tried = true; out("failing"); error("down") end
  out("r", "v1", row.v, row.by)
end } } }]]
    local path = H.script(v1)
    local p = H.start(path, { "--db", ci })
    H.finally(function() p.stop() end)
    assert(c:notify("r", "x"))
    assert(H.eventually(function() return p.stdout():find("failing", 1, true) end, 10), p.stderr())
    H.rewrite(path, (v1:gsub('"old"', '"new"'):gsub('"v1"', '"v2"')))
    p.kill("HUP")
    assert(H.eventually(function() return p.stderr():find("reloaded", 1, true) end, 10), p.stderr())
    assert(c:notify("r", "y"))
    assert(H.eventually(function() return p.stdout():find("r v2 ", 1, true) end, 15), p.stdout() .. p.stderr())
    local o = p.stdout()
    -- (the new script's handler fails its first note once too)
    assert.matches("failing\nr v1 x! old\nfailing\nr v2 y! new\n", o, 1, true)
  end)
end)

-- Before this spec's fix the runner died here ("attempt to get length of
-- a nil value" in dispatch.excerpt), on the fast path and the slow one.
describe("a handler that clears its note's payload and fails for good", function()
  it("is logged with the payload as received and passed to on_error; the runner goes on", function()
    local _, ci = H.createdb("brk45p")
    local c = H.connect(ci)
    local path = H.script([[
return {
  on_error = function(err, note, info) out("on_error", info.kind, info.channel, info.attempts) end,
  channels = {
    fast = function(row, note) note.payload = nil; error("down " .. row.id) end,
    slow = { retry = { attempts = 2, backoff = 0.05 }, handler = function(row, note)
      note.payload = nil; error("down " .. row.id)
    end },
    ok = function(row) out("ok", row.id) end,
  },
}]])
    local p = H.start(path, { "--db", ci })
    H.finally(function() p.stop() end)
    assert(c:notify("fast", { id = 1 }))
    assert(c:notify("slow", { id = 2 }))
    assert(c:notify("ok", { id = 3 }))
    assert(H.eventually(function() return p.stdout():find("ok 3", 1, true) or not p.running() end, 15),
      p.stdout() .. p.stderr())
    assert.is_true(p.running(), p.stderr())
    local o, err = p.stdout(), p.stderr()
    assert.matches("on_error handler fast 1\non_error handler slow 2\nok 3\n", o, 1, true)
    assert.matches('handler failed[^\n]*channel=fast[^\n]*payload="{\\"id\\": ?1}"', err)
    assert.matches('handler failed[^\n]*channel=slow[^\n]*payload="{\\"id\\": ?2}"', err)
  end)
end)
