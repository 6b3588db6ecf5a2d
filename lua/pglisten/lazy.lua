--- Lazy connections: `pglisten.connect(conninfo, { lazy = true })`.
--
-- A handler script connects to its targets at its top level.  When a target
-- is not up yet (at boot, say), a plain connect fails, the script does not
-- load and the runner exits 2.  A lazy connection is returned at once
-- instead, without the network (no DNS lookup, no socket): the session is
-- opened on the first call that needs the server, and healed afterwards as
-- every connection is (`opts.heal`).  A first use that cannot connect
-- returns `nil, err, "08001"` (sqlstate_connection_unable_to_establish), as
-- any call on a broken connection returns a 08xxx code, so a channel's
-- `retry` covers it; the next use tries again.
--
-- Design: a Lua proxy, for lazy connections only.  It holds the conninfo
-- and the options until the first use, then forwards every method to a
-- connection made by `pglisten.connect` itself, so keepalives, password-free
-- messages and healing are the facade's, unchanged, and plain connections
-- (the runner's listening one, the hot path) do not pay for the
-- indirection.  The alternative, a C connection object with a deferred
-- PGconn, would have had every C method learn a third state besides open
-- and closed.  The price: a lazy connection is a table, not a
-- `pglisten.conn` userdata, so it cannot be passed where C wants one
-- (nothing in pglisten does that with a handler's connection), and
-- `conn:transaction(fn)` hands `fn` the proxy, not the session under it.
--
-- Before the first use, what needs no server answers without one:
-- `status()` "bad" (the next call connects, as after a broken connection),
-- `txstatus()` "unknown", `pid()` and `server_version()` 0, `pollfd()` -1,
-- `events()` "r", `timeout()` nil, `alive()` false, `channels()` {} (a
-- LISTEN connects), `drain()` an empty batch (nothing can have arrived),
-- `notices()` none, `unlisten()` true (nothing is listened to), an empty
-- `execmany` 0; `settimeout`, `gettimeout` and `statement_cache` keep
-- their setting for the session.  `close()` needs no server either;
-- afterwards every use raises "attempt to use a closed connection", as for
-- any connection.  Everything else (`exec`, `execmany`, `transaction`,
-- `listen`, `notify`, `wait`, `ping`, `escape_identifier`,
-- `reset`, and methods added to connections later) connects first;
-- `wait(t)` and `ping(t)` bound that connect by their `t`.
--
-- A conninfo libpq cannot parse is refused by `connect` itself: parsing it
-- (PQconninfoParse) needs no network, and a typo is no condition a retry
-- could fix.  A connect interrupted by a stop signal of the runner returns
-- `nil, "interrupted", "08001"`.
-- @module pglisten.lazy

local core = require "pglisten.core"

local M = {}

local methods = core.conn_methods
local CLOSED = "attempt to use a closed connection"

-- The proxy's own state lives under this key: no method name can collide.
local S = {}

local Lazy = {}
local meta = { __name = "pglisten.conn", __metatable = false }

-- The state of an open proxy; raises at the caller's caller on misuse.
local function state(self, level)
  local s = type(self) == "table" and rawget(self, S)
  if not s then error("bad self (a lazy pglisten connection expected)", level) end
  if s.closed then error(CLOSED, level) end
  return s
end

-- The session under the proxy, connecting when there is none yet.
-- Returns conn, or nil, err, "08001".
local function session(s, timeout)
  local c = s.conn
  if c then return c end
  if s.facade.checking then -- lua-pglisten --check: no side effects
    return nil, "not connected: lua-pglisten --check opens no connection", "08001"
  end
  local opts = s.opts
  if timeout then
    opts = {}
    for k, v in pairs(s.opts) do opts[k] = v end
    opts.timeout = timeout
  end
  local err
  c, err = s.facade.connect(s.conninfo, opts)
  if not c then return nil, err, "08001" end
  s.conn = c
  return c
end

local function argerror(n, fname, msg, level)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), level or 3)
end

-- The argument checks of forwarded methods, run before connecting, so that
-- misuse raises while the server is down too instead of coming back as a
-- connect error that `retry` would retry (the connection checks again).
local function channel_names(fname, need)
  return function(...)
    local n = select("#", ...)
    if n < need then argerror(1, fname, "channel name expected", 4) end
    for i = 1, n do
      local t = type((select(i, ...)))
      if t ~= "string" then argerror(i, fname, "channel name expected, got " .. t, 4) end
    end
  end
end

local function opt_timeout(fname)
  return function(t)
    if t ~= nil and (type(t) ~= "number" or t < 0) then
      argerror(1, fname, "timeout must be a non-negative number", 4)
    end
  end
end

local precheck = {
  listen = channel_names("listen", 1),
  unlisten = channel_names("unlisten", 0),
  notify = function(ch, payload)
    if type(ch) ~= "string" then argerror(1, "notify", "channel name expected, got " .. type(ch), 4) end
    local t = type(payload)
    if t ~= "nil" and t ~= "string" and t ~= "table" then
      argerror(2, "notify", "string or table expected, got " .. t, 4)
    end
  end,
  escape_identifier = function(v)
    local t = type(v)
    if t ~= "string" and t ~= "number" then
      argerror(1, "escape_identifier", "string expected, got " .. (v == nil and "no value" or t), 4)
    end
  end,
  wait = opt_timeout("wait"),
  ping = opt_timeout("ping"),
}

-- A method that needs the server: connect, then the connection's own.
local function forward(name)
  local check = precheck[name]
  return function(self, ...)
    local s = state(self, 3)
    if check and not s.conn then check(...) end
    local c, err, code = session(s)
    if not c then return nil, err, code end
    return c[name](c, ...)
  end
end

-- Arguments checked before connecting, so that misuse raises even while
-- the server is down (after that the facade checks them again).
function Lazy:exec(sql, ...)
  local s = state(self, 3)
  if type(sql) ~= "string" then argerror(1, "exec", "string expected, got " .. type(sql)) end
  local c, err, code = session(s)
  if not c then return nil, err, code end
  return c:exec(sql, ...)
end

-- execmany's options, as the connection checks them (pipeline.c).
local function execmany_opts(opts)
  if opts == nil then return end
  if type(opts) ~= "table" then argerror(3, "execmany", "table expected, got " .. type(opts), 4) end
  for k, v in pairs(opts) do
    if k ~= "savepoint" then
      argerror(3, "execmany", ("unknown option %s; the option is savepoint"):format(
        type(k) == "string" and k or type(k)), 4)
    end
    if type(v) ~= "boolean" then
      argerror(3, "execmany", "option savepoint is a " .. type(v) .. ", boolean expected", 4)
    end
  end
end

function Lazy:execmany(sql, list, opts)
  local s = state(self, 3)
  if type(sql) ~= "string" then argerror(1, "execmany", "string expected, got " .. type(sql)) end
  if type(list) ~= "table" then argerror(2, "execmany", "table expected, got " .. type(list)) end
  execmany_opts(opts)
  if not s.conn and rawlen(list) == 0 then return 0 end -- sends nothing, as on a connection
  local c, err, code = session(s)
  if not c then return nil, err, code end
  return c:execmany(sql, list, opts)
end

--- Runs `fn(conn)` in a transaction of the session; `fn` gets the lazy
-- connection, whose calls go to the same session.
function Lazy:transaction(fn)
  local s = state(self, 3)
  if type(fn) ~= "function" then argerror(1, "transaction", "function expected, got " .. type(fn)) end
  local c, err, code = session(s)
  if not c then return nil, err, code end
  return c:transaction(function() return fn(self) end)
end

--- Connects (the first time) or reconnects and LISTENs again.
function Lazy:reset(timeout)
  local s = state(self, 3)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout <= 0) then
    argerror(1, "reset", "timeout must be a positive number")
  end
  if not s.conn then
    local c, err, code = session(s, timeout)
    if not c then return nil, err, code end
    return true
  end
  return s.conn:reset(timeout)
end

-- wait(t) and ping(t) bound all they do by t, a first connect included
-- (not by opts.timeout): an event loop's wait(0.1) must not block for 10 s.
-- wait(0) and ping(0) without a session answer "timeout" at once, as they
-- would on a session that has nothing yet.
local function bounded(name)
  local check, fwd = precheck[name], forward(name)
  Lazy[name] = function(self, t, ...)
    local s = state(self, 3)
    if s.conn or t == nil then return fwd(self, t, ...) end
    check(t)
    if t == 0 then return nil, "timeout" end
    local t0 = core.monotonic()
    local c, err, code = session(s, math.min(t, s.opts.timeout or 10))
    if not c then return nil, err, code end
    return c[name](c, math.max(0, t - (core.monotonic() - t0)), ...)
  end
end
bounded("wait")
bounded("ping")

-- Without a session: fixed answers; with one: the session's.
local function offline(name, ...)
  local answer = table.pack(...)
  Lazy[name] = function(self, ...)
    local c = state(self, 3).conn
    if c then return c[name](c, ...) end
    return table.unpack(answer, 1, answer.n)
  end
end
offline("status", "bad")
offline("txstatus", "unknown")
offline("pid", 0)
offline("server_version", 0)
offline("pollfd", -1)
offline("events", "r")
offline("timeout", nil)
offline("alive", false)

--- Without a session nothing is listened to: true at once, no connect.
function Lazy:unlisten(...)
  local s = state(self, 3)
  if s.conn then return s.conn:unlisten(...) end
  precheck.unlisten(...)
  return true
end

function Lazy:channels()
  local c = state(self, 3).conn
  if c then return c:channels() end
  return {}
end

function Lazy:notices()
  local c = state(self, 3).conn
  if c then return c:notices() end
  return { dropped = 0 }
end

function Lazy:drain(max, into)
  local c = state(self, 3).conn
  if c then return c:drain(max, into) end
  local n = math.tointeger(tonumber(max))
  if not n or n <= 0 then argerror(1, "drain", "a positive integer expected") end
  local t = type(into) == "table" and into or {}
  local k = 1
  while rawget(t, k) ~= nil do
    t[k] = nil
    k = k + 1
  end
  t.n = 0
  return t
end

function Lazy:settimeout(t)
  local s = state(self, 3)
  if s.conn then return s.conn:settimeout(t) end
  if t ~= nil and (type(t) ~= "number" or t < 0) then
    argerror(1, "settimeout", "timeout must be a non-negative number")
  end
  s.opts.query_timeout = (t and t > 0) and t or nil
end

function Lazy:gettimeout()
  local s = state(self, 3)
  if s.conn then return s.conn:gettimeout() end
  return s.opts.query_timeout
end

function Lazy:statement_cache(...)
  local s = state(self, 3)
  if s.conn then return s.conn:statement_cache(...) end
  local was = s.opts.statement_cache ~= false
  if select("#", ...) > 0 then s.opts.statement_cache = (...) and true or false end
  return was
end

--- Closes the session if there is one; idempotent, needs no server.
function Lazy:close()
  local s = type(self) == "table" and rawget(self, S)
  if not s then error("bad self (a lazy pglisten connection expected)", 2) end
  s.closed = true
  if s.conn then s.conn:close() end
  s.conn = nil
  return true
end

function Lazy:isclosed()
  local s = type(self) == "table" and rawget(self, S)
  if not s then error("bad self (a lazy pglisten connection expected)", 2) end
  return s.closed
end

-- Every other method connects first; methods added to connections after
-- this module was loaded are found too.
meta.__index = function(_, k)
  local f = Lazy[k]
  if f == nil and type(methods[k]) == "function" then
    f = forward(k)
    Lazy[k] = f
  end
  return f
end

-- No __gc: the session is a connection of its own, closed by its own __gc.
meta.__close = function(self) self:close() end

meta.__tostring = function(self)
  local s = rawget(self, S)
  if s.closed then return "pglisten.conn (closed)" end
  if s.conn then return tostring(s.conn) end
  return "pglisten.conn (lazy, not connected)"
end

--- A lazy connection.  `facade` is the pglisten module (its `connect` opens
-- the session), `opts` connect's options (checked by the caller; `lazy` is
-- dropped), `redact(msg, conninfo)` removes secrets from a message.
-- @return the connection, or nil, err when libpq cannot parse `conninfo`
function M.new(facade, conninfo, opts, redact)
  local qt = opts.query_timeout -- checked now, as connect's settimeout does, not at each first use
  if qt ~= nil and (type(qt) ~= "number" or qt < 0) then
    error("bad argument #2 to 'connect' (opts.query_timeout must be a non-negative number)", 3)
  end
  local ok, perr = core.conninfo_keys(conninfo or "")
  if not ok then return nil, redact(perr, conninfo) end
  local copy = {}
  for k, v in pairs(opts) do copy[k] = v end
  copy.lazy = nil
  return setmetatable({ [S] = { facade = facade, conninfo = conninfo, opts = copy, closed = false } }, meta)
end

return M
