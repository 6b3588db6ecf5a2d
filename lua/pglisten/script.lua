--- Loading and validating a handler script (README, "The handler script").
--
-- Every key a script may use is in one of the tables below (SCRIPT, CHANNEL,
-- RETRY, RECONNECT, REPLICATION) with its check: a key in none of them is
-- refused with a "did you mean" suggestion, so a misspelt `durable` cannot
-- pass unnoticed.  A channel's `ordered` keeps a durable channel's events
-- in order (pglisten.outbox claim, pglisten.sources.outbox).  `replication` and a channel's
-- `source`, `table` and `on_failure` configure the logical-replication
-- source (pglisten.sources.replication).  `decode` names an entry of pglisten.decoders.  Errors name the
-- file, and the line where one is known.
-- @module pglisten.script

local pg = require "pglisten"
local decoders = require "pglisten.decoders"

local M = {}

--- Channel names beginning with this are lua-pglisten's own (pglisten_outbox).
M.RESERVED_PREFIX = "pglisten_"
--- A retry's max_backoff when the script gives none (seconds).
M.MAX_BACKOFF = 30

local function fail(fmt, ...)
  error(fmt:format(...), 0)
end

----------------------------------------------------------------------------
-- Where: file and line
----------------------------------------------------------------------------

local function where(path, fn)
  if type(fn) == "function" then
    local info = debug.getinfo(fn, "S")
    if info and info.linedefined and info.linedefined > 0 and info.short_src then
      return ("%s:%d"):format(info.source:match("^@(.*)") or info.short_src, info.linedefined)
    end
  end
  return path
end

-- The line of `key = ...` in the script file when exactly one line has it.
local function key_line(path, key)
  if type(key) ~= "string" or not key:match("^[%a_][%w_]*$") then return nil end
  local f = io.open(path, "r")
  if not f then return nil end
  local pat, n, found = "%f[%w_]" .. key .. "%s*=%f[^=]", 0, nil
  for line in f:lines() do
    n = n + 1
    if line:find(pat) then
      if found then found = false; break end
      found = n
    end
  end
  f:close()
  return found or nil
end

----------------------------------------------------------------------------
-- Did you mean
----------------------------------------------------------------------------

-- Optimal string alignment distance (Levenshtein plus transpositions).
local function distance(a, b)
  local la, lb = #a, #b
  local d = {}
  for i = 0, la do d[i] = { [0] = i } end
  for j = 1, lb do d[0][j] = j end
  for i = 1, la do
    for j = 1, lb do
      local cost = a:byte(i) == b:byte(j) and 0 or 1
      local v = math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
      if i > 1 and j > 1 and a:byte(i) == b:byte(j - 1) and a:byte(i - 1) == b:byte(j) then
        v = math.min(v, d[i - 2][j - 2] + 1)
      end
      d[i][j] = v
    end
  end
  return d[la][lb]
end

-- The closest of `known` (a sorted list) to `word`: within 1 edit for words
-- of up to 4 letters, 2 beyond.  Ties are all returned.
local function closest(word, known)
  if type(word) ~= "string" then return {} end
  local w, bound, best, out = word:lower(), #word <= 4 and 1 or 2, math.huge, {}
  for _, k in ipairs(known) do
    local dist = distance(w, k:lower())
    if dist <= bound and dist <= best then
      if dist < best then best, out = dist, {} end
      out[#out + 1] = k
    end
  end
  return out
end

local function quoted(list, q)
  local t = {}
  for i, s in ipairs(list) do t[i] = q:format(s) end
  if #t <= 2 then return table.concat(t, " or ") end
  return table.concat(t, ", ", 1, #t - 1) .. " or " .. t[#t]
end

local function sorted_keys(set)
  local t = {}
  for k in pairs(set) do t[#t + 1] = k end
  table.sort(t)
  return t
end

-- How a value is shown in a message.
local function shown(v)
  if type(v) == "string" then return ("%q"):format(v) end
  if type(v) == "number" or type(v) == "boolean" then return tostring(v) end
  return type(v)
end

----------------------------------------------------------------------------
-- Checks of one value: each returns the value (normalized) or raises
----------------------------------------------------------------------------

local function num(v, what, label, min, int)
  if v == nil then return nil end
  if type(v) ~= "number" or v ~= v or v < min or (int and math.type(v) ~= "integer") then
    fail("%s: %s must be %s >= %s, got %s", label, what, int and "an integer" or "a number",
      tostring(min), type(v) == "number" and tostring(v) or type(v))
  end
  return v
end

local function number(min, int)
  return function(v, label, what) return num(v, what, label, min, int) end
end

local function boolean(v, label, what)
  if v ~= nil and type(v) ~= "boolean" then fail("%s: %s must be a boolean, got %s", label, what, type(v)) end
  return v
end

local function func(v, label, what)
  if v ~= nil and type(v) ~= "function" then fail("%s: %s must be a function, got %s", label, what, type(v)) end
  return v
end

-- One of a list of strings, with a suggestion for a near miss.
local function one_of(list)
  table.sort(list)
  return function(v, label, what)
    if v == nil then return nil end
    for _, x in ipairs(list) do if v == x then return v end end
    local near = closest(v, list)
    fail("%s: %s must be %s%s, got %s%s", label, what, #list > 2 and "one of " or "", quoted(list, "%q"),
      shown(v), #near > 0 and (" (did you mean %s?)"):format(quoted(near, "%q")) or "")
  end
end

local function name63(v, label, what)
  if v == nil then return nil end
  if type(v) ~= "string" then fail("%s: %s must be a string, got %s", label, what, type(v)) end
  if v == "" or #v > pg.MAX_CHANNEL or v:find("\0", 1, true) then
    fail("%s: %s: invalid name %q (1 to %d bytes, no zero byte)", label, what, v, pg.MAX_CHANNEL)
  end
  return v
end

-- Refuses keys not in `keys`, naming the nearest known one.  A message
-- starts with `where` .. `prefix` (`where` is the file and the line of the
-- key when the file shows it once).  `others` is the key table of the other
-- level, for a key put at the wrong level.
local function refuse_unknown(t, keys, ctx, prefix, others)
  local bad = {}
  for k in pairs(t) do
    if keys[k] == nil then bad[#bad + 1] = k end
  end
  if #bad == 0 then return end
  table.sort(bad, function(a, b) return tostring(a) < tostring(b) end)
  local k = bad[1]
  local line = key_line(ctx.path, k)
  local known = sorted_keys(keys)
  local near = closest(k, known)
  local elsewhere = others and closest(k, sorted_keys(others.keys)) or {}
  local hint
  if #near > 0 then
    hint = ("did you mean %s?"):format(quoted(near, "'%s'"))
  elseif others and others.keys[k] ~= nil then
    hint = ("%s is a %s"):format(k, others.where)
  elseif #elsewhere > 0 then
    hint = ("did you mean %s? That is a %s"):format(quoted(elsewhere, "'%s'"), others.where)
  else
    hint = "known keys: " .. table.concat(known, ", ")
  end
  fail("%s%s: unknown key %s (%s)", line and ("%s:%d"):format(ctx.path, line) or ctx.at, prefix,
    type(k) == "string" and ("'%s'"):format(k) or ("[%s]"):format(tostring(k)), hint)
end

-- A nested table of settings (`what` in ctx): a table with known keys, each
-- checked.  ctx = { path = file, at = file[:line], prefix = ": channels[..]" }.
local function fields(v, ctx, what, keys, shape)
  local label = ctx.at .. ctx.prefix
  if type(v) ~= "table" then fail("%s: %s must be a table %s", label, what, shape) end
  refuse_unknown(v, keys, ctx, ctx.prefix .. ": " .. what)
  local out = {}
  for k, check in pairs(keys) do out[k] = check(v[k], label, what .. "." .. k) end
  return out
end

----------------------------------------------------------------------------
-- The keys
----------------------------------------------------------------------------

local RETRY = { attempts = number(1, true), backoff = number(0), max_backoff = number(0) }
local RECONNECT = { min = number(0.001), max = number(0.001) }
local function slot_name(v, label, what)
  if v ~= nil and not (name63(v, label, what)):match("^[a-z0-9_]+$") then
    fail("%s: %s must be lower-case letters, digits and underscores, got %q", label, what, v)
  end
  return v
end
local REPLICATION = { slot = slot_name, publication = name63, snapshot = boolean, create = boolean }

local function retry(v, ctx)
  if v == nil then return nil end
  local label = ctx.at .. ctx.prefix
  local r = fields(v, ctx, "retry", RETRY, "{ attempts = N, backoff = seconds, max_backoff = seconds }")
  r.attempts, r.backoff = r.attempts or 3, r.backoff or 1
  if r.max_backoff == nil then
    r.max_backoff = math.max(M.MAX_BACKOFF, r.backoff)
  elseif r.max_backoff < r.backoff then
    fail("%s: retry.max_backoff must be >= retry.backoff (%s), got %s", label, tostring(r.backoff),
      tostring(r.max_backoff))
  end
  return r
end

local function metrics(v, label, what)
  if v == nil then return nil end
  local port = type(v) == "string" and tonumber(v:match("^.*:(%d+)$") or v:match("^(%d+)$"))
  if not port or port < 1 or port > 65535 then
    fail('%s: %s must be a string "ADDR:PORT", got %s', label, what, shown(v))
  end
  return v
end

local CHANNEL = {
  handler = func,
  decode = false, -- checked against pglisten.decoders in channel_entry
  retry = false, -- checked by retry(), which needs the file for its own keys
  batch = number(1, true),
  durable = boolean,
  max_attempts = number(1, true),
  source = one_of({ "notify", "replication" }),
  table = function(v, label, what)
    if v ~= nil and (type(v) ~= "string" or v == "") then
      fail("%s: %s must be a string (\"schema.table\"), got %s", label, what, shown(v))
    end
    return v
  end,
  on_failure = one_of({ "block", "dead" }),
  ordered = boolean,
}

local SCRIPT = {
  channels = false, -- checked in M.validate
  on_connect = func,
  on_error = func,
  reconnect = false,
  heartbeat = number(0),
  heartbeat_timeout = number(0.001),
  stats_interval = number(0),
  poll_interval = number(0.01),
  batch_size = number(1, true),
  single_active = function(v, label, what)
    if v ~= nil and type(v) ~= "boolean" and type(v) ~= "string" then
      fail("%s: %s must be a boolean or a lock name (string)", label, what)
    end
    return v
  end,
  ordering = one_of({ "global", "channel" }),
  replication = false,
  metrics = metrics,
}

local IN_SCRIPT = { keys = SCRIPT, where = "script setting: put it beside 'channels'" }
local IN_CHANNEL = { keys = CHANNEL, where = "channel setting: put it in a channel entry" }

----------------------------------------------------------------------------
-- A channel entry
----------------------------------------------------------------------------

local function check_channel_name(name, path)
  if type(name) ~= "string" then
    fail("%s: channels: keys must be channel names (strings), got %s", path, type(name))
  end
  if name == "" or #name > pg.MAX_CHANNEL or name:find("\0", 1, true) then
    fail("%s: channels: invalid channel name %q (1 to %d bytes, no zero byte)", path, name, pg.MAX_CHANNEL)
  end
  if name:sub(1, #M.RESERVED_PREFIX) == M.RESERVED_PREFIX then
    fail("%s: channels: channel name %q is reserved (names beginning %s are lua-pglisten's own)",
      path, name, M.RESERVED_PREFIX)
  end
end

local function check_decode(e, label)
  local how = e.decode
  if how == nil then how = "json" end
  local fn = type(how) == "string" and decoders.get(how)
  if not fn then
    local names = decoders.names()
    local near = closest(how, names)
    fail("%s: decode must be one of %s (or a name given to pglisten.decoders.register), got %s%s", label,
      quoted(names, "%q"), shown(how), #near > 0 and (" (did you mean %s?)"):format(quoted(near, "%q")) or "")
  end
  return how, fn
end

-- A source = "replication" entry: its table ("schema.table": the `table`
-- key, else the channel name) and on_failure; keys of NOTIFY channels are
-- refused.  Its events are tables already: e.decoder passes them through.
local function replication_entry(e, v, name, label)
  local t = e.table or name
  if not t:match("^[^.]+%.[^.]+$") then
    fail('%s: source = "replication" needs table = "schema.table" (or a channel named "schema.table"), got %s',
      label, shown(t))
  end
  for _, k in ipairs({ "durable", "max_attempts", "decode" }) do
    if v[k] ~= nil then
      fail('%s: %s does not apply to source = "replication" channels (their events are tables already; '
        .. "retry and on_failure say what a failure does)", label, k)
    end
  end
  e.table, e.on_failure = t, e.on_failure or "block"
  e.decode, e.decoder = "raw", function(ev) return ev end
end

--- Normalizes one channel entry; raises a message naming file and line.
local function channel_entry(name, v, path)
  if type(v) == "function" then v = { handler = v } end
  if type(v) ~= "table" then
    fail("%s: channels[%q]: expected a function or a table with a handler, got %s", path, name, type(v))
  end
  local ctx = { path = path, at = where(path, v.handler), prefix = (": channels[%q]"):format(name) }
  local label = ctx.at .. ctx.prefix
  refuse_unknown(v, CHANNEL, ctx, ctx.prefix, IN_SCRIPT)
  if type(v.handler) ~= "function" then
    fail("%s: handler must be a function, got %s", label, type(v.handler))
  end
  local e = { name = name }
  for k, check in pairs(CHANNEL) do
    if check then e[k] = check(v[k], label, k) end
  end
  e.decode, e.decoder = check_decode(v, label)
  e.retry = retry(v.retry, ctx)
  if e.source == "replication" then
    replication_entry(e, v, name, label)
  end
  for _, k in ipairs({ "table", "on_failure" }) do
    if e[k] ~= nil and e.source ~= "replication" then
      fail('%s: %s applies to source = "replication" channels only', label, k)
    end
  end
  if e.ordered and not e.durable then
    fail("%s: ordered applies to durable channels only (a plain channel's notes are in order already: "
      .. "see the script's ordering)", label)
  end
  if e.max_attempts and not e.durable then
    fail("%s: max_attempts applies to durable channels only (a plain channel retries with retry = "
      .. "{ attempts = N })", label)
  end
  return e
end

----------------------------------------------------------------------------
-- The script
----------------------------------------------------------------------------

-- A slot name from the script's file name (lower case, [a-z0-9_], 63 bytes).
local function default_slot(path)
  local base = ((path or "script"):match("([^/]+)$") or "script"):gsub("%.lua$", "")
  return ("lua_pglisten_" .. base:lower():gsub("[^a-z0-9_]", "_")):sub(1, 63)
end

-- The replication settings, with defaults, when some channel streams from
-- the WAL; one channel per table.
local function replication(v, spec, ctx)
  local tables, any = {}, false
  for _, n in ipairs(spec.names) do
    local e = spec.channels[n]
    if e.source == "replication" then
      any = true
      if tables[e.table] then
        fail('%s: channels[%q] and channels[%q] both stream table %s: one channel per table',
          ctx.path, tables[e.table], n, e.table)
      end
      tables[e.table] = n
    end
  end
  if v == nil and not any then return nil end
  local r = fields(v or {}, ctx, "replication", REPLICATION,
    "{ slot = NAME, publication = NAME, snapshot = BOOL, create = BOOL }")
  if not any then
    fail('%s: replication: no channel has source = "replication" (name a table\'s channel, e.g. '
      .. '["public.users"] = { source = "replication", handler = ... })', ctx.path)
  end
  r.slot = r.slot or default_slot(ctx.path)
  r.publication = r.publication or r.slot
  r.snapshot = r.snapshot or false
  if r.create == nil then r.create = true end
  return r
end

--- Validates the table a script returned; returns the normalized spec.
-- Raises a message naming the file (and line) at the first problem.
function M.validate(t, path)
  if type(t) ~= "table" then
    fail("%s: the script must return a table with a 'channels' table, got %s", path, type(t))
  end
  local ctx = { path = path, at = path, prefix = "" }
  refuse_unknown(t, SCRIPT, ctx, "", IN_CHANNEL)
  if type(t.channels) ~= "table" then
    fail("%s: the script must return a table with a 'channels' table, got channels = %s", path, type(t.channels))
  end
  local spec = { path = path, channels = {}, names = {} }
  for name, v in pairs(t.channels) do
    check_channel_name(name, path)
    spec.channels[name] = channel_entry(name, v, path)
    spec.names[#spec.names + 1] = name
  end
  if #spec.names == 0 then
    fail("%s: 'channels' is empty: name at least one channel", path)
  end
  table.sort(spec.names)
  for k, check in pairs(SCRIPT) do
    if check then spec[k] = check(t[k], path, k) end
  end
  if t.reconnect ~= nil then
    spec.reconnect = fields(t.reconnect, ctx, "reconnect", RECONNECT, "{ min = seconds, max = seconds }")
  end
  spec.replication = replication(t.replication, spec, ctx)
  spec.ordering = spec.ordering or "global"
  return spec
end

--- Puts the directory of the script at `path` first on package.path
-- (`?.lua` and `?/init.lua`), once, so that `require "mylib"` finds the
-- module beside the script whatever the working directory (systemd's is /).
function M.add_script_dir(path)
  local dir = path:match("^(.*)/[^/]*$") or "."
  if dir == "" then dir = "/" end
  if dir:sub(-1) ~= "/" then dir = dir .. "/" end
  local entry = dir .. "?.lua;" .. dir .. "?/init.lua"
  if package.path:sub(1, #entry) ~= entry then package.path = entry .. ";" .. package.path end
end

--- Loads and runs a script file, and validates what it returns.
-- @return spec, or nil and a message naming the file (and line)
function M.load(path)
  local chunk, err = loadfile(path, "t")
  if not chunk then return nil, err end
  M.add_script_dir(path)
  local ok, res = xpcall(chunk, function(e)
    local msg = type(e) == "string" and e or ("(error object is a %s value)"):format(type(e))
    -- the script's frames only: the traceback stops where the runner called it
    local tb = debug.traceback(msg, 2)
    local cut = tb:find("\n%s*%[C%]: in function 'xpcall'")
    return cut and tb:sub(1, cut - 1) or tb
  end)
  if not ok then return nil, res end
  local vok, spec = pcall(M.validate, res, path)
  if not vok then return nil, spec end
  return spec
end

return M
