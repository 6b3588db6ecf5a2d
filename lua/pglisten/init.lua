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

-- It prints as "pglisten.null".  It stays lua-cjson's light userdata, so that
-- cjson.decode's nulls and scripts comparing with cjson.null agree with it;
-- a light userdata has no metatable of its own, only the one all light
-- userdata share: this __tostring gives the others their usual
-- "userdata: 0x..." text, and nothing else (no __index, no __eq) is set.
if not debug.getmetatable(cjson.null) then
  local null = cjson.null
  debug.setmetatable(null, {
    __name = "pglisten.null",
    __tostring = function(v)
      if v == null then return "pglisten.null" end
      return ("userdata: %p"):format(v)
    end,
  })
end

--- What an unchanged TOASTed column holds in a replication UPDATE event's
-- `new` (the server did not send it): a unique value printing as
-- "pglisten.unchanged".  Leave the column out of the upsert, or use
-- REPLICA IDENTITY FULL.
M.unchanged = core.unchanged
--- Exactly-once application into a PostgreSQL target (pglisten.apply).
function M.apply(...) return require("pglisten.apply").apply(...) end

--- Longest payload NOTIFY accepts is 7999 bytes (the server's limit is 8000
-- including the terminating zero).
M.MAX_PAYLOAD = 7999
--- Longest channel name: identifiers are NAMEDATALEN - 1 = 63 bytes.
M.MAX_CHANNEL = 63

---------------------------------------------------------------------------
-- JSON
---------------------------------------------------------------------------

-- The codec is pglisten.json; the core gets its encoder and decoder here.
M.json = require "pglisten.json"
local json_encode, json_decode = core.json_encode, core.json_decode

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
  return conninfo_lib.add(conninfo, add)
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
--   pglisten.lazy), `interruptible` (a stop signal of the runner also ends
--   an exec waiting for the server; see conn:interruptible).
--   nil, "interrupted" when the runner got SIGTERM/SIGINT.
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
  -- under --check (M.checking) every connection is lazy and never opened
  if opts.lazy or M.checking then return require("pglisten.lazy").new(M, conninfo, opts, redact) end
  local conn, err = core.connect(M.with_keepalives(conninfo or ""), timeout)
  if not conn then return nil, redact(err, conninfo) end
  if opts.query_timeout then conn:settimeout(opts.query_timeout) end
  if opts.statement_cache == false then conn:statement_cache(false) end
  if opts.interruptible then conn:interruptible(true) end
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

-- The transaction bookkeeping (s.intx, s.txlost, s.dirty) and the answers
-- of a call whose block was lost: pglisten.txstate.
local txstate = require "pglisten.txstate"
local end_tx, lost_tx_call, after_loss = txstate.end_tx, txstate.lost_call, txstate.after_loss

-- Re-reads the channels the server listens to (after a transaction block
-- with LISTEN/UNLISTEN in it ended).  Leaves the set dirty on failure.
local function reread_channels(conn, s)
  local rows = cexec(conn, "SELECT pg_listening_channels() AS ch")
  if not rows then return end
  local set = {}
  for _, row in ipairs(rows) do set[row.ch] = true end
  s.channels, s.dirty = set, nil
end

--- Reconnects with the same conninfo and LISTENs again to every channel.
-- A transaction block open on the old session is over (the server rolled
-- it back); calls run outside one afterwards.
-- @return true, or nil, err
function methods:reset(timeout)
  check_open(self)
  local s = st(self)
  end_tx(s)
  s.dirty = nil -- what a rolled-back transaction did is undone: s.channels holds
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

-- Before a call of `sql`: a broken connection outside a transaction is
-- reset; inside one the transaction is gone, and lost_tx_call answers until
-- the caller ends it.  Returns true to go on, or nil, err, sqlstate, or
-- nil, rows (a ROLLBACK answered here).
local alive = methods.alive
local function heal(conn, sql)
  local s, found = state[conn], false
  if not (s and s.txlost) then
    if alive(conn) then return true end
    s = st(conn)
    if s.intx then s.txlost, s.dirty, found = true, nil, true end -- lost while idle in it
  end
  if s.txlost then
    local go, err, code = lost_tx_call(s, sql, found)
    if not go then return nil, err, code end
  end
  if not s.heal then return nil, "connection lost", "08006" end
  return conn:reset()
end

-- After a call of `sql` that failed with `err, code` (nil after success):
-- notes whether a transaction block is open, marks it lost when the call
-- lost the connection inside one, and re-reads the channels when a block
-- that changed them is over.  Returns err, code, made to say what became
-- of the transaction when the connection was lost.
local function after_call(conn, sql, err, code)
  local s = state[conn]
  if not s then return err, code end
  if conn:status() ~= "ok" then return after_loss(s, sql, err, code) end
  local tx = conn:txstatus()
  s.intx = (tx == "intrans" or tx == "inerror") or nil
  if s.dirty and tx == "idle" then reread_channels(conn, s) end
  return err, code
end

-- LISTEN/UNLISTEN/DISCARD ALL as SQL text (never with parameters): the
-- channels are read from the server once outside a transaction block
local function mark_channels(self, sql, nparams)
  if nparams == 0 and (sql:find("[Ll][Ii][Ss][Tt][Ee][Nn]") or sql:find("[Dd][Ii][Ss][Cc][Aa][Rr][Dd]")) then
    st(self).dirty = true
  end
end

-- exec and exec_upto: heal first, then `call(self, ...)`, then follow what it did.
local function healed(self, sql, nparams, call, ...)
  local ok, err, code = heal(self, sql)
  if not ok then
    if type(err) == "table" then return err end -- a ROLLBACK answered by heal
    return nil, err, code
  end
  mark_channels(self, sql, nparams)
  local rows
  rows, err, code = call(self, ...)
  err, code = after_call(self, sql, err, code)
  return rows, err, code
end

--- Runs a query; parameters $1..$n travel separately from the SQL.
-- nil (or pglisten.null) is NULL; booleans, integers, floats and strings as
-- themselves; tables as JSON.  Without parameters several statements may be
-- given; the last one's result is returned.
-- When the connection is lost inside a transaction block, every call fails
-- (08006 for the one that finds the loss, 08003 after it) until the caller
-- ends the block: ROLLBACK/ABORT then succeeds (the server rolled it back),
-- COMMIT/END fails (nothing was committed), and the next call heals.
-- @return rows (array of rows keyed by column; `n`, `affected`, `command`),
--   or nil, err, sqlstate
function methods:exec(sql, ...)
  check_open(self)
  if type(sql) ~= "string" then
    error("bad argument #1 to 'exec' (string expected, got " .. type(sql) .. ")", 2)
  end
  return healed(self, sql, select("#", ...), cexec, sql, ...)
end

local cexec_upto = methods.exec_upto

--- One statement whose rows are taken while their values stay under
-- `max_bytes` (one row at least; libpq's single-row mode): the rest are
-- read and dropped, and rows.more is true.  Parameters, healing and
-- transaction blocks as exec's.
-- @return rows (`n`, `bytes`, `more`), or nil, err, sqlstate
function methods:exec_upto(max_bytes, sql, ...)
  check_open(self)
  if math.type(max_bytes) ~= "integer" or type(sql) ~= "string" then
    error("bad arguments to 'exec_upto' (integer and string expected, got " .. type(max_bytes) .. " and "
      .. type(sql) .. ")", 2)
  end
  return healed(self, sql, select("#", ...), cexec_upto, max_bytes, sql, ...)
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
-- With `opts.savepoint = false` a batch inside a transaction runs without
-- that savepoint (a subtransaction per batch costs the server an XID and
-- its bookkeeping): for callers that roll the whole transaction back on any
-- failure, as `pglisten.apply` does.  A failure then leaves the transaction
-- aborted (later statements fail with 25P02, COMMIT rolls back), even one
-- found on the client side after some tuples ran, so half a batch can never
-- commit.  Outside a transaction the option changes nothing.
-- The query timeout bounds each wait for the server, not the whole batch.
-- Not for COPY, and not for statements that cannot run in a transaction block.
-- @tparam string sql one statement with placeholders $1..$n
-- @tparam table list array of tuples (arrays of values)
-- @tparam[opt] table opts `{savepoint = false}`; any other key raises
-- @return the sum of the affected-row counts (0 for an empty list, which
--   sends nothing), or nil, err, sqlstate, index: index is the 1-based tuple
--   that failed (nil when the failure was not a tuple's); nothing of the
--   batch is kept and the connection is idle (or back in the caller's
--   transaction) and usable, unless sqlstate is "08006" (connection lost)
--   or "08007": the connection was lost while the batch's own COMMIT was
--   under way (outside a transaction), and whether it committed is unknown.
function methods:execmany(sql, list, opts)
  check_open(self)
  if type(sql) ~= "string" then
    error("bad argument #1 to 'execmany' (string expected, got " .. type(sql) .. ")", 2)
  end
  if type(list) ~= "table" then
    error("bad argument #2 to 'execmany' (table expected, got " .. type(list) .. ")", 2)
  end
  if rawlen(list) == 0 then return cexecmany(self, sql, list, opts) end -- checks; sends nothing
  local ok, err, code = heal(self, "") -- never ends a transaction block
  if not ok then return nil, err, code end
  local n, index
  n, err, code, index = cexecmany(self, sql, list, opts)
  err, code = after_call(self, "", err, code)
  return n, err, code, index
end

-- conn:wait([timeout]) is the C method itself (the hot path): the next
-- notification `{channel, payload, pid, received_at}`, or nil, "timeout", or
-- nil, err[, "08006"] when the connection was lost.

-- Runs LISTEN/UNLISTEN `sql`; outside a transaction block the set changes
-- at once (`names`, or every channel for nil), inside one the server applies
-- it at COMMIT only, so the set is read again once the block is over.
local function change_channels(conn, sql, names, on)
  local ok, err, code = heal(conn, sql)
  if ok then
    ok, err, code = cexec(conn, sql)
    err, code = after_call(conn, sql, err, code)
  end
  if not ok then return nil, err, code end
  local s = st(conn)
  if s.intx then
    s.dirty = true
  elseif names then
    for _, ch in ipairs(names) do s.channels[ch] = on end
  else
    s.channels = {}
  end
  return true
end

--- LISTENs to one or more channels (names are case-preserving, any bytes but
-- zero, at most 63 bytes; quoted with PQescapeIdentifier).  Inside a
-- transaction block the server listens from its COMMIT on, and channels()
-- says so from then on.
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
  return change_channels(self, table.concat(parts, "; "), names, true)
end

--- UNLISTENs from the channels given, or from all channels with no argument
-- (inside a transaction block: from its COMMIT on).
-- @return true, or nil, err, sqlstate
function methods:unlisten(...)
  check_open(self)
  local n = select("#", ...)
  if n == 0 then return change_channels(self, "UNLISTEN *", nil) end
  local parts, names = {}, {}
  for i = 1, n do
    local ch, err = check_channel((select(i, ...)), i)
    if not ch then return nil, err end
    parts[i], names[i] = "UNLISTEN " .. assert(self:escape_identifier(ch)), ch
  end
  return change_channels(self, table.concat(parts, "; "), names, nil)
end

--- The channels this connection listens to, sorted: what the server has
-- committed, the same as `pg_listening_channels()` (LISTEN/UNLISTEN inside
-- a transaction block count from its COMMIT, not at all after a ROLLBACK).
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

local TX_ABORTED = "the transaction was aborted by an error inside it that fn did not pass on;"
  .. " the server rolled it back: nothing was committed"

-- transaction(fn) inside a transaction block: fn runs under a savepoint,
-- so its failure undoes only its own work and its success commits nothing
-- before the outer block does (a second BEGIN would be ignored and the
-- inner COMMIT would commit the outer block's work early).
local function sub_transaction(conn, fn)
  local ok, err, code = conn:exec("SAVEPOINT pglisten_tx")
  if not ok then return nil, err, code end
  local res = table.pack(pcall(fn, conn))
  local failed = not res[1] or (res[2] == nil and res[3] ~= nil)
  if not failed then
    ok, err, code = conn:exec("RELEASE SAVEPOINT pglisten_tx")
    if ok then return table.unpack(res, 2, res.n) end
    if code == "25P02" then err = TX_ABORTED end -- undone below, as for a failure
  end
  -- fails without the server when the connection is lost: the outer block is lost too
  conn:exec("ROLLBACK TO SAVEPOINT pglisten_tx; RELEASE SAVEPOINT pglisten_tx")
  if not res[1] then return nil, tostring(res[2]) end
  if failed then return nil, res[3], res[4] end
  return nil, err, code
end

--- Runs `fn(conn)` inside BEGIN/COMMIT; rolls back when `fn` raises or returns
-- nil, err.  Returns what `fn` returned, or nil, err[, sqlstate].  When the
-- connection is lost under `fn`, its later calls fail (08003) and so does
-- the transaction: nil, err, "08003" ("nothing was committed"); a loss
-- during the COMMIT itself is nil, err, "08007" (outcome unknown).  A
-- statement of `fn` that failed without `fn` passing the error on aborted
-- the block: nil, err, "25P02" (the server rolled it back at COMMIT).
-- Inside a transaction block (a transaction() in another) `fn` runs under
-- a savepoint: its failure rolls back its own work only, and its work is
-- committed with the outer block.
function methods:transaction(fn)
  check_open(self)
  if type(fn) ~= "function" then
    error("bad argument #1 to 'transaction' (function expected, got " .. type(fn) .. ")", 2)
  end
  local s = st(self)
  if s.intx or s.txlost then return sub_transaction(self, fn) end
  local ok, err, code = self:exec("BEGIN")
  if not ok then
    end_tx(s) -- this BEGIN's own loss: nothing to end
    return nil, err, code
  end
  local res = table.pack(pcall(fn, self))
  if not res[1] or (res[2] == nil and res[3] ~= nil) then
    self:exec("ROLLBACK") -- answered without the server when the connection was lost
    end_tx(s)
    if not res[1] then return nil, tostring(res[2]) end
    return nil, res[3], res[4]
  end
  ok, err, code = self:exec("COMMIT")
  end_tx(s)
  if not ok then return nil, err, code end
  if ok.command == "ROLLBACK" then return nil, TX_ABORTED, "25P02" end -- COMMIT of an aborted block
  return table.unpack(res, 2, res.n)
end

return M
