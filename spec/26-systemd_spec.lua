-- systemd and containers (issue 13): the spec plays systemd's part with a
-- datagram socket of its own and checks what the runner tells it (READY,
-- RELOADING, STOPPING, STATUS, the watchdog's cadence, an abstract socket);
-- the shipped unit passes `systemd-analyze verify`; the man page reads with
-- a real `man -l` and covers every option of --help; `make install`
-- installs it.
local H = require "helpers"
local unix = require "socket.unix"

local script = H.script

-- Tools of the system run without the sanitizers the specs may preload.
local PLAIN = "env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS "

-- A bound datagram socket standing in for systemd's notification socket.
local function systemd()
  local path = H.file("notify.sock", "")
  os.remove(path)
  local s = assert(unix.dgram())
  assert(s:bind(path))
  local got = {}
  local sd = { path = path, got = got }
  -- Receives for `secs` seconds (or until `want(msgs)` is true).
  function sd.collect(secs, want)
    local deadline = H.now() + secs
    while H.now() < deadline do
      s:settimeout(math.max(0.01, math.min(0.05, deadline - H.now())))
      local m = s:receive()
      if m then got[#got + 1] = { t = H.now(), msg = m } end
      if want and want(got) then return true end
    end
    return want == nil
  end
  function sd.find(pat, from)
    for i = from or 1, #got do
      if got[i].msg:find(pat) then return i, got[i] end
    end
  end
  function sd.close() s:close(); os.remove(path) end
  return sd
end

local function dump(sd)
  local t = {}
  for i, g in ipairs(sd.got) do t[i] = ("%.3f %s"):format(g.t, (g.msg:gsub("\n", "|"))) end
  return table.concat(t, "\n")
end

describe("sd_notify", function()
  it("READY once listening, RELOADING then READY around SIGHUP, STATUS, STOPPING, and the watchdog", function()
    local sd = systemd()
    H.finally(sd.close)
    local path = script([[
return { channels = { s26 = function(p)
  if p.wedge then local t = pglisten.monotonic() + 1.5; while pglisten.monotonic() < t do end end
end } }
]])
    local p = H.start(path, nil, { NOTIFY_SOCKET = sd.path, WATCHDOG_USEC = "400000" }, false)
    H.finally(p.stop)
    assert(sd.collect(15, function() return sd.find("READY=1") end), dump(sd) .. p.stderr())
    local _, ready = sd.find("READY=1")
    assert.truthy(p.stderr():find("listening", 1, true), "READY before the listening line: " .. p.stderr())
    assert.truthy(ready.msg:find("\nSTATUS=listening on 1 channel; received 0, handled 0, failed 0, queued 0", 1, true),
      ready.msg)
    -- the watchdog: every WATCHDOG_USEC / 2 = 0.2 s
    local from = #sd.got + 1
    sd.collect(2.1)
    local pings = {}
    for i = from, #sd.got do
      if sd.got[i].msg == "WATCHDOG=1" then pings[#pings + 1] = sd.got[i].t end
    end
    local gaps = {}
    for i = 2, #pings do gaps[#gaps + 1] = pings[i] - pings[i - 1] end
    table.sort(gaps)
    local median = gaps[(#gaps + 1) // 2]
    print(("\n  watchdog: %d pings in 2.1 s, median gap %.3f s, longest %.3f s"):format(#pings, median or -1,
      gaps[#gaps] or -1))
    assert.truthy(#pings >= 6 and #pings <= 14, dump(sd))
    assert.truthy(median > 0.15 and median < 0.3, median)
    -- a wedged loop (a handler busy for 1.5 s) sends no ping meanwhile
    local c = H.connect()
    from = #sd.got + 1
    assert(c:notify("s26", '{"wedge":true}'))
    sd.collect(2.5)
    local longest, last = 0, nil
    for i = 1, #sd.got do
      if sd.got[i].msg == "WATCHDOG=1" then
        if last and i >= from then longest = math.max(longest, sd.got[i].t - last) end
        last = sd.got[i].t
      end
    end
    assert.truthy(longest > 1.2, "pings went on while a handler held the loop: " .. dump(sd))
    -- SIGHUP: RELOADING=1 (with MONOTONIC_USEC) then READY=1
    from = #sd.got + 1
    p.kill("HUP")
    assert(sd.collect(10, function() return sd.find("READY=1", sd.find("RELOADING=1", from) or math.huge) end),
      dump(sd))
    local _, rel = sd.find("RELOADING=1", from)
    assert.truthy(rel.msg:find("MONOTONIC_USEC=%d+"), rel.msg)
    -- STOPPING=1 on TERM
    from = #sd.got + 1
    p.kill("TERM")
    assert(sd.collect(10, function() return sd.find("STOPPING=1", from) end), dump(sd))
    assert.equal(0, p.wait(10))
    c:close()
  end)

  it("sends STATUS when the summary changes", function()
    local sd = systemd()
    H.finally(sd.close)
    -- a changed summary goes out within STATUS_EVERY (10 s, as README says);
    -- this runner's script makes it 1 s so that the spec does not wait 10 s
    assert.equal(10, require("pglisten.services.sdnotify").STATUS_EVERY)
    local path = script([[require("pglisten.services.sdnotify").STATUS_EVERY = 1
return { channels = { s26st = function() end } }]])
    local p = H.start(path, nil, { NOTIFY_SOCKET = sd.path }, false)
    H.finally(p.stop)
    assert(sd.collect(15, function() return sd.find("READY=1") end), dump(sd))
    local c = H.connect()
    assert(c:exec([[SELECT pg_notify('s26st', '{"i":' || i || '}') FROM generate_series(1, 3) i]]))
    c:close()
    assert(sd.collect(15, function() return sd.find("^STATUS=listening on 1 channel; received 3, handled 3") end),
      dump(sd))
    -- at most one STATUS a period: the READY one, then the changed one
    local first, last
    for _, g in ipairs(sd.got) do
      if g.msg:find("STATUS=", 1, true) then first, last = first or g.t, g.t end
    end
    assert.is_true(last - first >= 0.9, dump(sd))
  end)

  it("reaches a socket in the abstract namespace (NOTIFY_SOCKET=@name)", function()
    local py = io.popen("command -v python3"):read("l")
    if not py then
      pending("python3 is not installed: no abstract-socket listener")
      return
    end
    local name = ("pglisten-spec26-%d"):format(math.random(1, 1e9))
    local out = H.file("abstract.out", "")
    local listener = H.spawn({ py, "-c", ([[
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\0%s")
s.settimeout(20)
with open(sys.argv[1], "a") as f:
    f.write("bound\n"); f.flush()
    while True:
        m = s.recv(4096).decode()
        f.write(m.replace("\n", "|") + "\n"); f.flush()
        if "STOPPING=1" in m: break
]]):format(name), out })
    H.finally(listener.stop)
    assert(H.eventually(function() return H.read(out):find("bound", 1, true) end, 10), listener.stderr())
    local path = script("return { channels = { s26ab = function() end } }")
    local p = H.start(path, nil, { NOTIFY_SOCKET = "@" .. name })
    H.finally(p.stop)
    assert(H.eventually(function() return H.read(out):find("READY=1", 1, true) end, 10),
      H.read(out) .. listener.stderr())
    p.kill("TERM")
    assert.equal(0, p.wait(10))
    assert(H.eventually(function() return H.read(out):find("STOPPING=1", 1, true) end, 10), H.read(out))
    assert.falsy(p.stderr():find("sd_notify failed", 1, true), p.stderr())
  end)

  it("logs once, and runs on, when the socket is not there", function()
    local path = script("return { channels = { s26gone = function(p) print('handled') end } }")
    local p = H.start(path, nil, { NOTIFY_SOCKET = H.dir .. "/no-such.sock", WATCHDOG_USEC = "200000" })
    H.finally(p.stop)
    H.sleep(0.5)
    local _, n = p.stderr():gsub("sd_notify failed", "")
    assert.equal(1, n, p.stderr())
    assert.truthy(p.running())
  end)
end)

describe("examples/systemd/lua-pglisten@.service", function()
  local unit = H.read(H.root .. "/examples/systemd/lua-pglisten@.service")

  it("is Type=notify with a watchdog, restarts, a start limit and hardening", function()
    for _, line in ipairs({ "Type=notify", "WatchdogSec=", "Restart=on-failure", "RestartSec=",
      "StartLimitIntervalSec=", "StartLimitBurst=", "NoNewPrivileges=yes", "ProtectSystem=strict",
      "PrivateTmp=yes", "ExecReload=/bin/kill -HUP $MAINPID", "RestartPreventExitStatus=2" }) do
      assert.truthy(unit:find("\n" .. line, 1, true), line)
    end
    -- the start limit outlasts a database down at boot: bursts * RestartSec < interval
    local burst = tonumber(unit:match("\nStartLimitBurst=(%d+)"))
    local interval = tonumber(unit:match("\nStartLimitIntervalSec=(%d+)"))
    local restart = tonumber(unit:match("\nRestartSec=(%d+)"))
    assert.truthy(burst * restart < interval)
  end)

  it("passes systemd-analyze verify", function()
    local sa = io.popen("command -v systemd-analyze"):read("l")
    if not sa then
      pending("systemd-analyze is not installed")
      return
    end
    local dir = H.file("units", "")
    os.remove(dir)
    assert(os.execute("mkdir -p " .. H.q(dir)))
    local f = assert(io.open(dir .. "/lua-pglisten@.service", "w"))
    f:write((unit:gsub("/usr/local/bin/lua%-pglisten", H.runner)))
    f:close()
    local pipe = io.popen((PLAIN .. "%s verify --man=no %s 2>&1; echo rc=$?"):format(sa,
      H.q(dir .. "/lua-pglisten@orders.service")))
    local res = pipe:read("a")
    pipe:close()
    assert.equal("rc=0\n", res)
  end)
end)

describe("the man page", function()
  local page = H.root .. "/doc/lua-pglisten.1"

  local function man(file)
    local pipe = io.popen((PLAIN .. "MANWIDTH=80 MANPAGER=cat LC_ALL=C.UTF-8 man -l %s 2>&1"):format(H.q(file)))
    local s = pipe:read("a")
    pipe:close()
    return s
  end

  it("reads with man -l, and names every option of --help", function()
    local text = man(page)
    assert.truthy(text:find("LUA%-PGLISTEN%(1%)"), text)
    for _, section in ipairs({ "NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SIGNALS", "SYSTEMD",
      "ENVIRONMENT", "EXIT STATUS" }) do
      assert.truthy(text:find("\n" .. section .. "\n", 1, true), section)
    end
    local rc, help = H.run_runner({ "--help" })
    assert.equal(0, rc)
    local n = 0
    for opt in help:gmatch("%s(%-%-[%w-]+)") do
      n = n + 1
      assert.truthy(text:find(opt, 1, true), "the man page lacks " .. opt)
    end
    assert.truthy(n >= 15, n)
  end)

  it("has no roff warnings", function()
    local pipe = io.popen(PLAIN .. "groff -man -Tutf8 -ww -z " .. H.q(page) .. " 2>&1")
    local s = pipe:read("a")
    pipe:close()
    assert.equal("", s)
  end)

  it("is installed by make install into PREFIX/share/man/man1", function()
    local dest = H.file("prefix", "")
    os.remove(dest)
    -- a build directory of its own: `install` builds `all`, which must not
    -- touch the build under test (a sanitizer build); -O0: what is checked
    -- here is where the page goes, and that build compiles in a third of the time
    local cmd = (PLAIN .. "make -s BUILD=%s CFLAGS=-O0 PREFIX=%s install >/dev/null 2>&1"):format(
      H.q(H.dir .. "/build-man"), H.q(dest))
    assert.truthy(os.execute(cmd))
    local installed = dest .. "/share/man/man1/lua-pglisten.1"
    assert.equal(H.read(page), H.read(installed))
    assert.truthy(man(installed):find("SYNOPSIS", 1, true))
  end)
end)
