--- pglisten: PostgreSQL LISTEN/NOTIFY and queries for Lua 5.4, on libpq.
--
-- The C core (`pglisten.core`) does the I/O: a non-blocking connect, a
-- listener that waits on the socket with a timeout, and queries.  This facade
-- adds what is policy: JSON, channel checks, LISTEN bookkeeping, password-free
-- messages, and healing a broken connection on its next use.
-- @module pglisten

local core = require "pglisten.core"
local cjson = require "cjson"

local M = {}

M._VERSION = "lua-pglisten " .. core._VERSION
--- The C core (pglisten.core), for the runner and the curious.
M.core = core

--- The value SQL NULL and JSON null come back as (lua-cjson's `cjson.null`).
M.null = cjson.null

--- Longest payload NOTIFY accepts is 7999 bytes (the server's limit is 8000
-- including the terminating zero).
M.MAX_PAYLOAD = 7999
--- Longest channel name: identifiers are NAMEDATALEN - 1 = 63 bytes.
M.MAX_CHANNEL = 63

---------------------------------------------------------------------------
-- JSON
---------------------------------------------------------------------------

-- Decoding is ours too (src/json.c, core.json_decode): lua-cjson 2.1.0
-- returns every number as a double, so a bigint id above 2^53 came back
-- rounded, and it was 40% of the runner's work per notification.  lua-cjson
-- stays for its null sentinel (scripts compare with `cjson.null`) and as a
-- channel's `decode = "cjson"`.
local json_encode, json_decode = core.json_encode, core.json_decode

--- JSON as this module uses it.  `encode` writes Lua integers exactly and
-- floats in the shortest form that reads back as the same double (3.0 as
-- 3, -0.0 as -0.0).  `decode` is strict RFC 8259 and rounds no number:
-- integers that fit 64 bits are Lua integers, other numbers floats when
-- the double's shortest form is the same value (0.30, 1e20), else their
-- text (12345678901234567890, 1e400); JSON null is `pglisten.null`.
-- `encode`/`decode` raise on bad input; `safe.encode`/`safe.decode` return
-- `nil, err` instead.
local function safe_json_encode(v)
  local ok, s = pcall(json_encode, v)
  if ok then return s end
  return nil, s
end

local function raising_decode(s)
  local v, err = json_decode(s)
  if v == nil then error(err, 2) end
  return v
end

M.json = {
  encode = json_encode,
  decode = raising_decode,
  null = cjson.null,
  safe = {
    encode = safe_json_encode,
    decode = json_decode,
  },
}

-- lua-cjson's decoder with integral numbers made integers again (up to
-- 2^53; it has rounded larger ones already): `decode = "cjson"`.
local cjson_safe = require("cjson.safe").new()
local cjson_decode, intify = cjson_safe.decode, core.intify
function M.json.cjson_decode(s)
  local v, err = cjson_decode(s)
  if v == nil then return nil, "invalid JSON: " .. tostring(err) end
  return intify(v)
end

core.setup(json_encode, json_decode, cjson.null)

--- Current time in seconds since the epoch, with microseconds.
M.now = core.now
--- Seconds on a monotonic clock (for measuring intervals).
M.monotonic = core.monotonic
--- Sleeps `seconds`; returns `nil, "interrupted"` when the runner got a signal.
M.sleep = core.sleep
--- libpq's version as an integer (150018 for 15.18).
M.libpq_version = core.libpq_version

---------------------------------------------------------------------------
-- Messages without passwords
---------------------------------------------------------------------------

-- pglisten.conninfo finds every option libpq marks secret (password,
-- sslpassword, ...) in keyword/value strings and URIs, and masks each in
-- every form it can take.
local conninfo_lib = require "pglisten.conninfo"

--- `redact(msg, conninfo)`: msg with every secret of conninfo masked.
local redact = conninfo_lib.redact
M._redact = redact

--- A conninfo fit for a log: rebuilt from libpq's parse as keyword=value
-- pairs, every secret as `********`; never the string as given.
M.safe_conninfo = conninfo_lib.safe

---------------------------------------------------------------------------
-- Connections
---------------------------------------------------------------------------

local methods = core.conn_methods
local cexec, creset = methods.exec, methods.reset

-- Per-connection Lua state: channels listened to, timeout used to reconnect.
local state = setmetatable({}, { __mode = "k" })

-- Misuse after close raises at the caller's line, not the facade's.
local isclosed = methods.isclosed
local function check_open(conn)
  if isclosed(conn) then error("attempt to use a closed connection", 3) end
end

local function check_channel(ch, argn)
  if type(ch) ~= "string" then
    error(("bad argument #%d (channel name expected, got %s)"):format(argn, type(ch)), 3)
  end
  if ch == "" then return nil, "invalid channel name: empty" end
  if #ch > M.MAX_CHANNEL then
    return nil, ("invalid channel name %q: %d bytes, the limit is %d"):format(
      ch:sub(1, 20) .. "...", #ch, M.MAX_CHANNEL)
  end
  if ch:find("\0", 1, true) then return nil, "invalid channel name: contains a zero byte" end
  return ch
end

--- TCP keepalives that notice a dead peer within about a minute (libpq's
-- default leaves idle/interval to the kernel: two hours).
M.KEEPALIVES = { keepalives = "1", keepalives_idle = "30", keepalives_interval = "10", keepalives_count = "3" }

--- Adds M.KEEPALIVES to a conninfo for the keywords it does not set.
-- A conninfo libpq cannot parse is returned as it is (connect reports it).
function M.with_keepalives(conninfo)
  local set = core.conninfo_keys(conninfo)
  if not set then return conninfo end
  local add = {}
  for _, k in ipairs({ "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count" }) do
    if not set[k] then add[#add + 1] = k .. "=" .. M.KEEPALIVES[k] end
  end
  if #add == 0 then return conninfo end
  if conninfo:match("^postgres[a-z]*://") then
    return conninfo .. (conninfo:find("?", 1, true) and "&" or "?") .. table.concat(add, "&")
  end
  return (conninfo == "" and "" or (conninfo .. " ")) .. table.concat(add, " ")
end

--- Connects to PostgreSQL.
-- @tparam[opt] string conninfo keyword/value string or `postgres://` URI;
--   nil or "" uses libpq's defaults (PGHOST, PGPORT, PGUSER, ...).
-- @tparam[opt] table opts `timeout` (seconds to connect, default 10),
--   `query_timeout` (client-side bound for each query, default none),
--   `heal` (reconnect a broken connection on its next call, default true),
--   `statement_cache` (exec prepares a parameterized statement the second
--   time it runs it and executes it by name from then on; default true;
--   false for poolers that cannot keep prepared statements, such as
--   PgBouncer before 1.21 in transaction mode),
--   `lazy` (return at once without the network and connect on first use;
--   a first use that cannot connect returns nil, err, "08001"; see
--   pglisten.lazy).  nil, "interrupted" when the runner got SIGTERM/SIGINT.
-- @return conn, or nil and a message without the password
function M.connect(conninfo, opts)
  if conninfo ~= nil and type(conninfo) ~= "string" then
    error("bad argument #1 to 'connect' (string expected, got " .. type(conninfo) .. ")", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("bad argument #2 to 'connect' (table expected, got " .. type(opts) .. ")", 2)
  end
  opts = opts or {}
  local timeout = opts.timeout or 10
  if type(timeout) ~= "number" or timeout <= 0 then
    error("bad argument #2 to 'connect' (opts.timeout must be a positive number)", 2)
  end
  if opts.lazy then return require("pglisten.lazy").new(M, conninfo, opts, redact) end
  local conn, err = core.connect(M.with_keepalives(conninfo or ""), timeout)
  if not conn then return nil, redact(err, conninfo) end
  if opts.query_timeout then conn:settimeout(opts.query_timeout) end
  if opts.statement_cache == false then conn:statement_cache(false) end
  state[conn] = {
    channels = {},
    conninfo = conninfo,
    timeout = timeout,
    heal = opts.heal ~= false,
  }
  return conn
end

local function st(conn)
  local s = state[conn]
  if not s then
    s = { channels = {}, timeout = 10, heal = true }
    state[conn] = s
  end
  return s
end

--- Reconnects with the same conninfo and LISTENs again to every channel.
-- @return true, or nil, err
function methods:reset(timeout)
  check_open(self)
  local s = st(self)
  local ok, err = creset(self, timeout or s.timeout)
  if not ok then return nil, redact(err, s.conninfo), "08006" end
  local list = self:channels()
  if #list > 0 then
    local parts = {}
    for i, ch in ipairs(list) do parts[i] = "LISTEN " .. assert(self:escape_identifier(ch)) end
    local _, lerr, state_ = cexec(self, table.concat(parts, "; "))
    if lerr then return nil, lerr, state_ end
  end
  return true
end

-- A broken connection outside a transaction is reset before a call; inside
-- one the transaction is gone and the caller must know.
local alive = methods.alive
local function heal(conn)
  if alive(conn) then return true end
  local s = st(conn)
  if not s.heal then return nil, "connection lost", "08006" end
  if s.intx then
    s.intx = nil
    return nil, "connection lost inside a transaction; the transaction was rolled back", "08006"
  end
  return conn:reset()
end

--- Runs a query; parameters $1..$n travel separately from the SQL.
-- nil (or pglisten.null) is NULL; booleans, integers, floats and strings as
-- themselves; tables as JSON.  Without parameters several statements may be
-- given; the last one's result is returned.
-- @return rows (array of rows keyed by column; `n`, `affected`, `command`),
--   or nil, err, sqlstate
function methods:exec(sql, ...)
  check_open(self)
  if type(sql) ~= "string" then
    error("bad argument #1 to 'exec' (string expected, got " .. type(sql) .. ")", 2)
  end
  local ok, err, code = heal(self)
  if not ok then return nil, err, code end
  local rows
  rows, err, code = cexec(self, sql, ...)
  local s = state[self]
  if s then
    local tx = self:status() == "ok" and self:txstatus() or "idle"
    s.intx = (tx == "intrans" or tx == "inerror") or nil
  end
  return rows, err, code
end

local cexecmany = methods.execmany

--- Runs one statement for every parameter tuple of `list`, in libpq's
-- pipeline mode: the statement is prepared once and all tuples travel in one
-- round trip, inside one transaction.  Values convert as exec()'s parameters
-- do; a tuple's length is its field `n` when set, else `#tuple`, so a tuple
-- whose last value is nil needs `n` (`table.pack` sets it).  Outside a
-- transaction the batch is its own (BEGIN/COMMIT); inside one, e.g. in
-- `transaction(fn)`, it runs under `SAVEPOINT pgl_execmany` and a failure
-- rolls back only the batch, so the outer transaction stays usable.
-- The query timeout bounds each wait for the server, not the whole batch.
-- Not for COPY, and not for statements that cannot run in a transaction block.
-- @tparam string sql one statement with placeholders $1..$n
-- @tparam table list array of tuples (arrays of values)
-- @return the sum of the affected-row counts (0 for an empty list, which
--   sends nothing), or nil, err, sqlstate, index: index is the 1-based tuple
--   that failed (nil when the failure was not a tuple's); nothing of the
--   batch is kept and the connection is idle (or back in the caller's
--   transaction) and usable, unless sqlstate is "08006" (connection lost).
function methods:execmany(sql, list)
  check_open(self)
  if type(sql) ~= "string" then
    error("bad argument #1 to 'execmany' (string expected, got " .. type(sql) .. ")", 2)
  end
  if type(list) ~= "table" then
    error("bad argument #2 to 'execmany' (table expected, got " .. type(list) .. ")", 2)
  end
  if rawlen(list) == 0 then return 0 end
  local ok, err, code = heal(self)
  if not ok then return nil, err, code end
  local n, index
  n, err, code, index = cexecmany(self, sql, list)
  local s = state[self]
  if s then
    local tx = self:status() == "ok" and self:txstatus() or "idle"
    s.intx = (tx == "intrans" or tx == "inerror") or nil
  end
  return n, err, code, index
end

-- conn:wait([timeout]) is the C method itself (the hot path): the next
-- notification `{channel, payload, pid, received_at}`, or nil, "timeout", or
-- nil, err[, "08006"] when the connection was lost.

--- LISTENs to one or more channels (names are case-preserving, any bytes but
-- zero, at most 63 bytes; quoted with PQescapeIdentifier).
-- @return true, or nil, err, sqlstate
function methods:listen(...)
  check_open(self)
  local n = select("#", ...)
  if n == 0 then error("bad argument #1 to 'listen' (channel name expected)", 2) end
  local parts, names = {}, {}
  for i = 1, n do
    local ch, err = check_channel((select(i, ...)), i)
    if not ch then return nil, err end
    local q, qerr = self:escape_identifier(ch)
    if not q then return nil, qerr end
    parts[i], names[i] = "LISTEN " .. q, ch
  end
  local ok, err, code = self:exec(table.concat(parts, "; "))
  if not ok then return nil, err, code end
  local set = st(self).channels
  for _, ch in ipairs(names) do set[ch] = true end
  return true
end

--- UNLISTENs from the channels given, or from all channels with no argument.
-- @return true, or nil, err, sqlstate
function methods:unlisten(...)
  check_open(self)
  local n = select("#", ...)
  local set = st(self).channels
  if n == 0 then
    local ok, err, code = self:exec("UNLISTEN *")
    if not ok then return nil, err, code end
    for k in pairs(set) do set[k] = nil end
    return true
  end
  local parts, names = {}, {}
  for i = 1, n do
    local ch, err = check_channel((select(i, ...)), i)
    if not ch then return nil, err end
    parts[i], names[i] = "UNLISTEN " .. assert(self:escape_identifier(ch)), ch
  end
  local ok, err, code = self:exec(table.concat(parts, "; "))
  if not ok then return nil, err, code end
  for _, ch in ipairs(names) do set[ch] = nil end
  return true
end

--- The channels this connection listens to, sorted.
function methods:channels()
  check_open(self)
  local list = {}
  for ch in pairs(st(self).channels) do list[#list + 1] = ch end
  table.sort(list)
  return list
end

--- Sends a notification; the channel and payload travel as parameters of
-- `pg_notify($1, $2)`.  A table payload is sent as JSON.  Payloads of 8000
-- bytes or more are refused here, before they reach the server.
-- @return true, or nil, err, sqlstate
function methods:notify(channel, payload)
  check_open(self)
  local ch, err = check_channel(channel, 1)
  if not ch then return nil, err end
  local tp = type(payload)
  if tp == "table" then
    payload = json_encode(payload)
  elseif tp == "nil" then
    payload = ""
  elseif tp ~= "string" then
    error("bad argument #2 to 'notify' (string or table expected, got " .. tp .. ")", 2)
  end
  if #payload > M.MAX_PAYLOAD then
    return nil, ("payload too large: %d bytes; NOTIFY payloads must be shorter than 8000 bytes"):format(#payload)
  end
  local ok, code
  ok, err, code = self:exec("SELECT pg_notify($1, $2)", ch, payload)
  if not ok then return nil, err, code end
  return true
end

--- Runs `fn(conn)` inside BEGIN/COMMIT; rolls back when `fn` raises or returns
-- nil, err.  Returns what `fn` returned, or nil, err[, sqlstate].
function methods:transaction(fn)
  check_open(self)
  if type(fn) ~= "function" then
    error("bad argument #1 to 'transaction' (function expected, got " .. type(fn) .. ")", 2)
  end
  local ok, err, code = self:exec("BEGIN")
  if not ok then return nil, err, code end
  local res = table.pack(pcall(fn, self))
  if not res[1] or (res[2] == nil and res[3] ~= nil) then
    if self:status() == "ok" then cexec(self, "ROLLBACK") end
    st(self).intx = nil
    if not res[1] then return nil, tostring(res[2]) end
    return nil, res[3], res[4]
  end
  ok, err, code = self:exec("COMMIT")
  st(self).intx = nil
  if not ok then return nil, err, code end
  return table.unpack(res, 2, res.n)
end

return M
